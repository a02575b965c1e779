"""The docs' result tables, generated from bench/results/*.json.

Every table in README.md and docs/benchmarks.md sits between markers

    <!-- report:NAME -->
    ...generated, do not edit...
    <!-- /report -->

and NAME is one entry of `TABLES`. `python bench/report.py` rewrites those blocks in place from the
JSON files; `--check` rewrites nothing and exits 1 if any block differs from what the JSON gives
(tests/test_report.py runs it). A table whose results file is absent says which command makes it.

A new results file is one `Table(...)` line below: its marker name, its file(s) under
bench/results, the command that writes them and a renderer (`methods_table` for `bench` reports,
`rows_table` for any file holding a list of flat rows).

    python bench/report.py           # rewrite the tables
    python bench/report.py --check   # exit 1 if a table is stale
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = "bench/results"
DOCS = ("README.md", "docs/benchmarks.md")
REFERENCES = ("hf", "llamacpp")  # `bench`'s outside references: they draft nothing
MARKER = re.compile(r"(<!-- report:([\w-]+) -->\n)(.*?)(<!-- /report -->)", re.S)


@dataclass(frozen=True)
class Table:
    name: str  # the marker name
    sources: tuple[str, ...]  # file names or globs under bench/results; all must match for the table
    command: str  # what writes them
    render: Callable[[list[tuple[str, dict]]], list[str]]  # [(file name, data)] -> markdown lines


# --- formatting ---------------------------------------------------------------------------------

def weights(rep: dict) -> str:
    """How the target ran: its dtype, and int8 weights when quantized (reports before `quant` existed ran as loaded)."""
    dtype = rep.get("dtype", "?")
    return f"int8 (activations {dtype})" if rep.get("quant") == "int8" else dtype


def num(x, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}" if abs(x) >= 10_000 else str(x)
    if isinstance(x, float):
        if 0 < abs(x) < 0.5 * 10 ** -nd:  # rather than 0.00 (a KL divergence): 3 significant digits
            return f"{x:.3g}"
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{nd}f}"
    return str(x)


def markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def bold_max(cells: list[str], values: list[float | None]) -> list[str]:
    """Bold the cell(s) holding the largest value (None never wins)."""
    present = [v for v in values if v is not None]
    best = max(present, default=None)
    return [f"**{c}**" if v is not None and v == best else c for c, v in zip(cells, values)]


def source_line(files: list[str], command: str) -> str:
    paths = ", ".join(f"`{RESULTS}/{f}`" for f in files)
    return f"`{command}` → {paths}"


# --- renderers ----------------------------------------------------------------------------------

def methods_table(found: list[tuple[str, dict]], positions: int = 4) -> list[str]:
    """A `python -m domino_backend bench` report: one row per method."""
    (name, rep), = found
    methods = rep["methods"]
    drafting = [m for m in methods if m not in ("ar", *REFERENCES)]
    speed = [rep["speedup"][m] if m in drafting else None for m in methods]
    tau = [methods[m]["tau"] if m in drafting else None for m in methods]
    speed_cells = bold_max([f"{rep['speedup'][m]:.2f}x" for m in methods], speed)
    tau_cells = bold_max([num(methods[m]["tau"]) if methods[m]["tau"] else "-" for m in methods], tau)
    width = min(positions, max((len(r["per_position_acceptance"]) for r in methods.values()), default=0))
    rows = []
    for i, m in enumerate(methods):
        r = methods[m]
        rounds = sum(r["accept_hist"])  # rounds by accepted count: their sum is the round count
        per_round = [num(r[k] * 1e3 / rounds if rounds else None, 1) for k in ("draft_s", "verify_s")]
        acc = " / ".join(f"{a:.2f}" for a in r["per_position_acceptance"][:width]) or "-"
        rows.append([f"`{m}`", num(r["tokens_per_s"]), speed_cells[i], tau_cells[i], str(rep["lossless"][m]),
                     *per_round, acc])
    draft = f"`{rep['draft']}`" if rep.get("draft") else "the profile's default"
    caption = (f"{rep['num_prompts']} prompts, greedy, {rep['max_new_tokens']} new tokens, target "
               f"`{rep.get('target', '?')}` in {weights(rep)}, drafter: {draft}"
               + (f", at most {rep['max_drafts']} drafts per round" if rep.get("max_drafts") else ""))
    pos = " / ".join(str(j) for j in range(1, width + 1))
    return [caption + ".", "", *markdown(
        ["method", "tok/s", "speedup vs ar", "τ", "lossless", "draft ms / round", "verify ms / round",
         f"acceptance at draft position {pos}"], rows)]


def summary_table(found: list[tuple[str, dict]]) -> list[str]:
    """Held-out code and chat side by side: the README's one table."""
    (_, code), (_, chat) = found
    methods = [m for m in code["methods"] if m in chat["methods"]]
    cols = []
    for rep in (code, chat):
        drafting = [m if m != "ar" else None for m in methods]
        sp = bold_max([f"{rep['speedup'][m]:.2f}x" for m in methods],
                      [rep["speedup"][m] if d else None for m, d in zip(methods, drafting)])
        tau = bold_max([num(rep["methods"][m]["tau"]) for m in methods],
                       [rep["methods"][m]["tau"] if d else None for m, d in zip(methods, drafting)])
        cols.append((sp, tau))
    rows = [[f"`{m}`", num(code["methods"][m]["tokens_per_s"]), cols[0][0][i], cols[0][1][i],
             num(chat["methods"][m]["tokens_per_s"]), cols[1][0][i], cols[1][1][i],
             str(code["lossless"][m] and chat["lossless"][m])] for i, m in enumerate(methods)]
    caption = (f"Held-out prompts never seen in training ({code['num_prompts']} code, {chat['num_prompts']} chat), "
               f"greedy, {code['max_new_tokens']} new tokens, target `{code.get('target', '?')}` in "
               f"{weights(code)}, all methods in one process.")
    return [caption, "", *markdown(["method", "code tok/s", "code speedup", "code τ", "chat tok/s",
                                    "chat speedup", "chat τ", "lossless"], rows)]


def llamacpp_table(found: list[tuple[str, dict]]) -> list[str]:
    """`bench/run_llamacpp.sh`: per prompt set, `ar`, one drafting method and llama.cpp on the same GGUF."""
    rows, info = [], {}
    for name, rep in found:
        methods = rep["methods"]
        ours = next((m for m in methods if m not in ("ar", *REFERENCES)), None)
        tps = {m: r["tokens_per_s"] for m, r in methods.items()}
        llama = tps.get("llamacpp")
        vs_llama = {m: f"{tps[m] / llama:.2f}x" if llama and tps.get(m) else "-" for m in ("ar", ours)}
        same = "-"
        if "llamacpp" in methods:
            info = rep.get("llamacpp", info)
            prefix = rep["ar_prefix"]["llamacpp"]
            equal = sum(a == b for a, b in zip(methods["llamacpp"]["output_ids"], methods["ar"]["output_ids"]))
            same = f"{equal}/{len(prefix)} ({sum(prefix) / len(prefix):.0f} tokens)"
        rows.append([f"`{rep.get('prompts', name)}`, {rep['num_prompts']}", num(tps["ar"]), f"`{ours}`" if ours else "-",
                     num(tps.get(ours)), f"{rep['speedup'][ours]:.2f}x" if ours else "-",
                     num(methods[ours]["tau"]) if ours else "-", num(llama), vs_llama["ar"], vs_llama[ours], same])
    _, first = found[0]
    caption = (f"Greedy, {first['max_new_tokens']} new tokens, target `{first.get('target', '?')}` in "
               f"{weights(first)}; llama.cpp (llama-cpp-python {info.get('version', '?')}, "
               f"{info.get('threads', '?')} threads like ours) runs the GGUF the target is built from, "
               "in the same process, on the same prompt token ids.")
    return [caption, "", *markdown(["prompts", "`ar` tok/s", "drafting method", "tok/s", "speedup vs ar", "τ",
                                    "llama.cpp tok/s", "`ar` / llama.cpp", "drafting / llama.cpp",
                                    "outputs = `ar`'s (mean same prefix)"], rows)]


def tree_table(found: list[tuple[str, dict]]) -> list[str]:
    """`bench/tree_replay.py`: τ of the chain and of trees of N nodes, per prompt group."""
    (_, rep), = found
    shapes = ["chain", *(f"tree{n}" for n in rep["sizes"])]
    header = ["prompts", f"chain of {rep['num_drafts']}", *(f"tree of {n}" for n in rep["sizes"])]
    rows = [[group, *bold_max([num(taus.get(s)) for s in shapes], [taus.get(s) for s in shapes])]
            for group, taus in rep["tau"].items()]
    return [f"τ by draft shape, replayed on held-out `ar` outputs (no timing; {rep['num_drafts']} drafts per round).",
            "", *markdown(header, rows)]


def load_table(found: list[tuple[str, dict]]) -> list[str]:
    """`bench/load_completions.py`: one row per (method, clients) cell, then the voice-like stream
    under load and the served/bench speed of one request."""
    (_, rep), = found
    rows = [[f"`{c['method']}`", str(c["clients"]), str(c["requests"]), str(c["errors"]),
             f"{num(c['ttft_p50_ms'], 0)} / {num(c['ttft_p95_ms'], 0)}",
             f"{num(c['total_p50_ms'], 0)} / {num(c['total_p95_ms'], 0)}",
             num(c["completions_per_s"]), num(c["tokens_per_s"]), num(c["mean_tau"]), num(c.get("mean_batch"), 1)]
            for c in rep["cells"]]
    passes = rep.get("passes", 1)
    kind = "single-line FIM completions" if rep.get("single_line", True) else "FIM completions without stop rules"
    caption = (f"Profile `{rep['profile']}`, {kind} of at most {rep['max_tokens']} tokens, "
               + (f"every cell {rep['keystrokes_per_file'] * passes} keystrokes in each of {rep['files']} files, a "
                  f"method's cells the same ones ({passes} passes; in each the methods take turns, each over the "
                  "client counts, in alternating orders and on keystrokes of their own)"
                  if rep.get("interleaved") else
                  f"every cell the same {rep['keystrokes_per_file'] * passes} keystrokes in each of {rep['files']} files"
                  f"{f' ({passes} passes over the client counts, ascending then descending)' if passes > 1 else ''}")
               + ", "
               f"{rep['threads'] or 'default'} engine thread(s), loopback; mean batch = requests per engine round "
               f"(largest: {num(rep.get('max_batch'), 0)}).")
    out = [caption, "", *markdown(["method", "clients", "requests", "errors", "TTFT p50 / p95 ms",
                                   "total p50 / p95 ms", "completions/s", "tok/s", "mean τ", "mean batch"], rows)]
    if rep.get("scaling"):
        out += ["", *markdown(["method", "completions/s, most clients / fewest", "each pass"],
                              [[f"`{x['method']}`", f"{x['clients']} / {x['vs_clients']}: **{num(x['ratio'])}×**",
                                ", ".join(num(r) for r in x["pass_ratios"])] for x in rep["scaling"]])]
    if rep.get("mixed"):
        out += ["", *markdown(["method", "voice-like first sentence p50 ms, alone", "with 8 completion clients",
                               "growth", "completion TTFT p50 ms meanwhile"],
                              [[f"`{m['method']}`", num(m["first_sentence_alone_p50_ms"], 0),
                                num(m["first_sentence_loaded_p50_ms"], 0),
                                f"{num(m['growth'] and 100 * m['growth'], 0)} %",
                                num(m["completion_ttft_p50_ms"], 0)] for m in rep["mixed"]])]
    if rep.get("speed"):
        out += ["", *markdown(["method", "one request served tok/s", "engine alone tok/s",
                               "served / bench (median of paired passes)", "range"],
                              [[f"`{s['method']}`", num(s["served_tok_s"]), num(s["bench_tok_s"]),
                                num(s["served_vs_bench"]), f"{num(min(s['pair_ratios']))}–{num(max(s['pair_ratios']))}"]
                               for s in rep["speed"]])]
    return out


def kernels_table(found: list[tuple[str, dict]]) -> list[str]:
    """`bench/kernels_gpu.py`: kernel parity, then the rollout per batch size (one block per file)."""
    out = []
    for name, rep in found:
        k = rep.get("kernels", {})
        out += [f"`{name}`: {rep.get('gpu', rep.get('device', '?'))}, torch {rep.get('torch', '?')}, "
                f"triton {rep.get('triton', '?')}, {rep.get('dtype', '?')}, shapes "
                f"{', '.join(f'{k}={v}' for k, v in rep.get('shapes', {}).items())}, "
                f"status {rep.get('status', '?')}. Kernel parity: argmax match {num(k.get('head_argmax_match'))}, "
                f"sample match {num(k.get('head_sample_match'))}, accept lengths exact {k.get('accept_exact', '-')}.",
                ""]
        cols = [("batch", "batch", 0), ("Triton = reference", "triton_vs_reference_token_match", 2),
                ("Triton = SGLang K=0", "triton_vs_sglang_k0_token_match", 2),
                ("identical prefix", "triton_vs_sglang_k0_mean_identical_prefix", 1),
                ("Triton graph ms", "ms_triton_graph_replay", 2), ("reference graph ms", "ms_reference_graph_replay", 2),
                ("Triton eager ms", "ms_triton_eager", 2), ("SGLang K=0 eager ms", "ms_sglang_k0_eager", 2)]
        out += markdown([c[0] for c in cols], [[num(r.get(key), nd) for _, key, nd in cols]
                                               for r in rep.get("rollout", [])])
        out.append("")
    return out[:-1]


def thread_table(found: list[tuple[str, dict]]) -> list[str]:
    """`bench/engine_thread.py`: one row per thread layout."""
    (_, rep), = found
    rows = [[f"`{name}`", num(r["tokens_per_s"]), f"{num(r['vs_main'])}x", num(r["voluntary_switches_per_token"], 1)]
            for name, r in rep["layouts"].items()]
    caption = (f"Profile `{rep['profile']}`, `{rep['method']}`, {rep['tokens']} tokens, median of {rep['runs']} runs, "
               f"{rep['threads']} torch threads, each layout in a fresh process.")
    return [caption, "", *markdown(["layout", "tok/s", "vs main", "voluntary switches / token"], rows)]


def rows_table(found: list[tuple[str, dict]]) -> list[str]:
    """Any results file holding a list of rows (the first list of objects at its top level, or the
    file itself): one column per field, nested objects flattened one level; top-level scalars
    become the caption."""
    out = []
    for name, rep in found:
        rows = rep if isinstance(rep, list) else next(
            (v for v in rep.values() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)), [])
        flat = [{f"{k} {kk}" if isinstance(v, dict) else k: vv
                 for k, v in r.items() for kk, vv in (v.items() if isinstance(v, dict) else [(None, v)])
                 if not isinstance(vv, (list, dict))} for r in rows]
        cols = list(dict.fromkeys(k for r in flat for k in r))
        meta = {k: v for k, v in rep.items() if not isinstance(v, (list, dict))} if isinstance(rep, dict) else {}
        caption = ", ".join(f"{k} {num(v)}" for k, v in meta.items())
        out += [f"`{name}`" + (f": {caption}." if caption else "."), "",
                *markdown(cols, [[num(r.get(c)) for c in cols] for r in flat]), ""]
    return out[:-1]


TABLES: dict[str, Table] = {t.name: t for t in (
    Table("heldout_summary", ("heldout_code.json", "heldout_chat.json"), "bash bench/run_heldout.sh", summary_table),
    Table("heldout_code", ("heldout_code.json",), "bash bench/run_heldout.sh", methods_table),
    Table("heldout_chat", ("heldout_chat.json",), "bash bench/run_heldout.sh", lambda f: methods_table(f, 3)),
    Table("llamacpp", ("llamacpp_*.json",), "bash bench/run_llamacpp.sh", llamacpp_table),
    Table("tree_replay", ("tree_replay.json",), "python bench/tree_replay.py", tree_table),
    Table("coder", ("coder.json",), "bash bench/run_coder.sh", methods_table),
    Table("load_tiny", ("load_tiny.json",), "bash bench/run_load.sh", load_table),
    Table("load_coder", ("load_coder.json",), "PROFILE=coder bash bench/run_load.sh", load_table),
    Table("kernels_gpu", ("kernels_h200.json",), "python bench/kernels_gpu.py", kernels_table),
    Table("kernels_sglang_parity", ("kernels_h200_cpu_check.json",), "python bench/kernels_gpu.py --cpu-parity",
          rows_table),
    Table("engine_thread", ("engine_thread.json",), "python bench/engine_thread.py", thread_table),
    Table("voice_latency", ("voice_latency.json",), "python bench/voice_latency.py", rows_table),
    Table("cpu_linear", ("cpu_linear.json",), "python bench/cpu_linear.py", rows_table),
    Table("cpu_forward", ("cpu_forward.json",), "python bench/cpu_forward.py", rows_table),
    # The same benchmarks on a CPU with AVX2 but no AVX512 (results in bench/results/avx2/)
    Table("llamacpp_avx2", ("avx2/llamacpp_*.json",), "RESULTS=bench/results/avx2 bash bench/run_llamacpp.sh",
          llamacpp_table),
    Table("cpu_linear_avx2", ("avx2/cpu_linear.json",),
          "python bench/cpu_linear.py --json bench/results/avx2/cpu_linear.json", rows_table),
    Table("cpu_forward_avx2", ("avx2/cpu_forward.json",),
          "python bench/cpu_forward.py --json bench/results/avx2/cpu_forward.json", rows_table),
    Table("load_coder_avx2", ("avx2/load_coder.json",),
          "PROFILE=coder REQUESTS=2 bash bench/run_load.sh --speed-runs 2 --json bench/results/avx2/load_coder.json "
          "--plot docs/img/load_avx2.png", load_table),
    Table("load_coder_whole_avx2", ("avx2/load_coder_whole.json",),
          "python bench/load_completions.py --spawn --profile coder --clients 1,16 --requests 1 --whole "
          "--max-tokens 96 --voice-turns 0 --speed-runs 0 --json bench/results/avx2/load_coder_whole.json", load_table),
    Table("load_coder_voice_avx2", ("avx2/load_coder_voice.json",),
          "python bench/load_completions.py --spawn --profile coder --clients 1 --requests 1 --passes 1 "
          "--max-tokens 24 --voice-turns 10 --speed-runs 0 --json bench/results/avx2/load_coder_voice.json", load_table),
    Table("cpu_attention", ("cpu_attention.json",), "python bench/cpu_attention.py", rows_table),
    Table("quant_quality", ("quant_quality.json",), "python bench/quant_quality.py", rows_table),
)}


# --- docs ---------------------------------------------------------------------------------------

def render(table: Table, root: Path = ROOT) -> str:
    """The block between a table's markers (ends with a newline)."""
    found = []
    for pattern in table.sources:
        files = sorted((root / RESULTS).glob(pattern))
        if not files:
            return f"_No results yet: `{table.command}` writes `{RESULTS}/{pattern}`._\n"
        found += [(f.relative_to(root / RESULTS).as_posix(), json.loads(f.read_text())) for f in files]
    lines = table.render(found)
    return "\n".join([*lines, "", source_line([f for f, _ in found], table.command)]) + "\n"


def update(text: str, root: Path = ROOT, where: str = "") -> str:
    """`text` with every report block regenerated; unknown table names raise ValueError."""
    def sub(m: re.Match) -> str:
        if m[2] not in TABLES:
            raise ValueError(f"{where}: unknown report table {m[2]!r}; known: {', '.join(TABLES)}")
        return m[1] + render(TABLES[m[2]], root) + m[4]
    return MARKER.sub(sub, text)


def run(root: Path = ROOT, docs: tuple[str, ...] = DOCS, check: bool = False) -> list[str]:
    """Regenerate the docs' tables (or only compare, with `check`); returns the stale files."""
    stale = []
    for rel in docs:
        path = root / rel
        old = path.read_text()
        new = update(old, root, rel)
        if new != old:
            stale.append(rel)
            if not check:
                path.write_text(new)
    return stale


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is stale")
    args = ap.parse_args(argv)
    try:
        stale = run(check=args.check)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    for rel in stale:
        print(f"{rel}: tables {'stale (run python bench/report.py)' if args.check else 'rewritten'}",
              file=sys.stderr)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
