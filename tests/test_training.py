"""Training pipeline on a tiny random target: objective pieces, an end-to-end run, exact resume."""

import copy
import json

import pytest
import torch

from domino_backend.checkpoint import load_draft
from domino_backend.engine import Engine, GenerationRequest
from domino_backend.settings import EngineSettings
from domino_backend.training.capture import CapturedData, CaptureSet, capture, interleave
from domino_backend.training.objective import build_blocks, lambda_base, sample_anchors
from domino_backend.training.trainer import TrainConfig, lr_at, train
from tiny import CharTokenizer, tiny_draft, tiny_draft_config, tiny_target


def test_lambda_decays_linearly_over_the_whole_run_and_clips():
    assert lambda_base(0, 1000) == 1.0
    assert lambda_base(250, 1000) == pytest.approx(0.75)
    assert lambda_base(500, 1000) == pytest.approx(0.5)
    assert lambda_base(1000, 1000) == 0.0
    assert lambda_base(5000, 1000) == 0.0
    assert lambda_base(250, 1000, decay_ratio=0.5) == pytest.approx(0.5)  # script default halves the window
    assert lambda_base(600, 1000, decay_ratio=0.5) == 0.0
    assert lambda_base(0, 1000, start=3.0) == 1.0  # clipped to [0, 1]
    assert lambda_base(0, 0) == 1.0  # a zero-length run still has a valid window


def test_anchors_stay_on_response_tokens_and_inside_the_sequence():
    mask = torch.zeros(50, dtype=torch.bool)
    mask[10:20] = True
    mask[30:50] = True
    for seed in range(20):
        a = sample_anchors(mask, 8, torch.Generator().manual_seed(seed))
        assert len(a) == 8 and (a[1:] > a[:-1]).all()  # sorted, distinct
        assert mask[a].all() and mask[a + 1].all()  # anchor and its first label are response tokens
        assert (a <= 48).all()
    assert sample_anchors(torch.zeros(10, dtype=torch.bool), 4, torch.Generator()).numel() == 0


def test_blocks_mask_labels_and_weights():
    ids = torch.arange(100, 130)
    mask = torch.ones(30, dtype=torch.bool)
    mask[:5] = False
    mask[20] = False  # a non-response token inside the window
    anchors = torch.tensor([5, 16, 26])
    b = build_blocks(ids, mask, anchors, block_size=4, num_drafts=4, mask_token_id=7, gamma=2.0)
    assert b.block_ids[:, 0].tolist() == [105, 116, 126] and (b.block_ids[:, 1:] == 7).all()
    assert b.positions[1].tolist() == [16, 17, 18, 19]
    assert b.labels[0].tolist() == [106, 107, 108, 109]
    assert b.weights[0].tolist() == pytest.approx([1.0, 0.60653, 0.36788, 0.22313], rel=1e-4)
    assert b.weights[1, 3] == 0  # label at 20 is not a response token
    assert b.weights[2, 3] == 0 and b.labels[2, 3] == 0  # label past the end
    m = b.mask[0, 0]
    q = 4 * 1  # first query of block 1 (anchor 16)
    assert m[q, :16].all() and not m[q, 16:30].any()  # context strictly before its anchor
    assert m[q, 30 + 4:30 + 8].all() and not m[q, 30:30 + 4].any() and not m[q, 30 + 8:].any()


def test_cosine_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) == pytest.approx(5e-4, rel=0.05)
    assert lr_at(99, cfg) < 1e-5


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    """Target-regenerated data: the tiny target writes its own responses, then features are captured."""
    target = tiny_target("qwen3", vocab=48, peak=3.0, seed=5)
    engine = Engine(target)
    tmp = tmp_path_factory.mktemp("train")
    recs = tmp / "records.jsonl"
    with recs.open("w") as f:
        for i in range(12):
            g = torch.Generator().manual_seed(i)
            prompt = torch.randint(0, 40, (6,), generator=g).tolist()
            resp = engine.generate(prompt, GenerationRequest(max_new_tokens=40, method="ar", temperature=0.0 if i % 3 else 0.7, seed=i)).token_ids
            f.write(json.dumps({"id": i, "split": "train" if i < 10 else "heldout", "prompt_ids": prompt,
                                "response_ids": resp}) + "\n")
    layers = [1, 2]
    assert capture(target.model, [recs], tmp / "cap", layers) == 10
    assert capture(target.model, [recs], tmp / "cap", layers) == 0  # resume: nothing left to do
    # A run killed mid-write leaves a partial index line: resume drops it and redoes that sequence.
    index = tmp / "cap" / "index.jsonl"
    lines = index.read_text().splitlines(keepends=True)
    index.write_text("".join(lines[:-1]) + lines[-1][:20])
    assert capture(target.model, [recs], tmp / "cap", layers) == 1
    assert len(index.read_text().splitlines()) == 10
    return target, CapturedData(tmp / "cap"), tmp


def test_capture_interleaves_record_files_so_a_partial_capture_keeps_the_mix():
    windows, fim, chat = [f"w{i}" for i in range(60)], [f"f{i}" for i in range(30)], [f"c{i}" for i in range(10)]
    out = interleave([windows, fim, chat])
    assert sorted(out) == sorted(windows + fim + chat)
    for group in (windows, fim, chat):
        assert [x for x in out if x in group] == group  # each file keeps its own order
        for k in range(1, len(out) + 1):  # every prefix holds each file's share, +-1 record
            assert abs(sum(x in group for x in out[:k]) - k * len(group) / len(out)) <= 1


def test_capture_matches_a_fresh_forward(captured):
    target, data, _ = captured
    seq = data[3]
    with torch.no_grad():
        o = target.model(input_ids=seq.ids[None], output_hidden_states=True)
    ref = torch.cat([o.hidden_states[2][0], o.hidden_states[3][0]], -1)
    assert torch.allclose(seq.feats, ref, atol=2e-3, rtol=1e-3)  # stored as float16
    assert seq.loss_mask.sum() == 40 and not seq.loss_mask[:6].any()


def test_several_captures_train_as_one_set_and_other_layers_are_refused(captured, tmp_path):
    target, data, tmp = captured
    assert capture(target.model, [tmp / "records.jsonl"], tmp_path / "again", [1, 2]) == 10
    both = CaptureSet([tmp / "cap", tmp_path / "again"])
    assert len(both) == 20 and both.num_tokens == 2 * data.num_tokens and not both.has_labels
    for i in (0, 7, 10, 19):
        a, b = both[i], data[i % 10]
        assert a.ids.equal(b.ids) and a.loss_mask.equal(b.loss_mask) and torch.allclose(a.feats, b.feats, atol=2e-3)
    assert both.top_tokens(8, target.vocab_size).equal(data.top_tokens(8, target.vocab_size))
    capture(target.model, [tmp / "records.jsonl"], tmp_path / "other", [1])
    with pytest.raises(ValueError, match="captured layers"):
        CaptureSet([tmp / "cap", tmp_path / "other"])


def _cfg(target, **kw):
    return tiny_draft_config(target, block_size=4, target_layer_ids=[1, 2], **kw)


def test_tiny_training_run_learns_and_exports_a_loadable_public_checkpoint(captured, tmp_path):
    target, data, _ = captured
    cfg = TrainConfig(steps=150, lr=8e-3, num_anchors=16, gamma=4.0, save_every=75)
    model = train(_cfg(target), target.model, data, tmp_path / "run", cfg, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 150 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    first, last = sum(r["loss_final"] for r in log[:10]) / 10, sum(r["loss_final"] for r in log[-10:]) / 10
    assert last < first * 0.8
    lams = [r["lambda"] for r in log]
    assert lams[0] == 1.0 and lams[-1] < 0.05 and all(a >= b for a, b in zip(lams, lams[1:]))
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    exported = load_draft(tmp_path / "run" / "final")
    names = set(exported.state_dict())
    assert {"fc.weight", "hidden_norm.weight", "norm.weight", "prefix_gru.weight_ih_l0", "embed_proj.2.weight"} <= names
    raw = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert raw["architectures"] == ["DFlashDraftModel"] and raw["dflash_config"]["projector_type"] == "domino"
    # The trained drafter runs in the engine and stays lossless.
    engine = Engine(target, exported.float())
    seq = data[0]
    prompt = seq.ids[~seq.loss_mask].tolist()
    ref = engine.generate(prompt, GenerationRequest(max_new_tokens=30, method="ar")).token_ids
    assert engine.generate(prompt, GenerationRequest(max_new_tokens=30, method="domino")).token_ids == ref
    assert model.training is False


def test_resume_continues_exactly(captured, tmp_path):
    target, data, _ = captured
    cfg = TrainConfig(steps=12, lr=3e-3, num_anchors=8, gamma=4.0, save_every=6)
    straight = train(_cfg(target), target.model, data, tmp_path / "a", cfg, progress=False)
    # Simulate a crash after the checkpoint at step 6: keep ckpt at 6, then resume.
    cfg6 = TrainConfig(**{**cfg.__dict__, "steps": 12})
    partial_dir = tmp_path / "b"
    import domino_backend.training.trainer as tr

    real_save = tr._save
    calls = []

    def crash_after_first_save(*a, **k):
        real_save(*a, **k)
        calls.append(1)
        raise KeyboardInterrupt

    tr._save = crash_after_first_save
    try:
        with pytest.raises(KeyboardInterrupt):
            train(_cfg(target), target.model, data, partial_dir, cfg6, progress=False)
    finally:
        tr._save = real_save
    resumed = train(_cfg(target), target.model, data, partial_dir, cfg6, progress=False)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k
    steps = [json.loads(line)["step"] for line in (partial_dir / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))
    # A capture that grew (or shrank) since the checkpoint would silently change what each step draws.
    fewer = copy.copy(data)
    fewer.index = data.index[:-1]
    with pytest.raises(ValueError, match="other data"):
        train(_cfg(target), target.model, fewer, partial_dir, cfg6, progress=False)


def test_ablation_flags_change_the_objective(captured, tmp_path):
    target, data, _ = captured
    cfg = TrainConfig(steps=4, num_anchors=8, gamma=4.0, curriculum=False)
    train(_cfg(target), target.model, data, tmp_path / "nocur", cfg, progress=False)
    log = [json.loads(line) for line in (tmp_path / "nocur" / "log.jsonl").read_text().splitlines()]
    assert all(r["lambda"] == 0.0 for r in log)
    cfg = TrainConfig(steps=4, num_anchors=8, gamma=4.0, use_head=False)
    m = train(_cfg(target, projector_type=None), target.model, data, tmp_path / "dflash", cfg, progress=False)
    assert not m.has_head


def test_reduced_vocabulary_training_scores_the_most_frequent_tokens(captured, tmp_path):
    target, data, _ = captured
    cfg = TrainConfig(steps=6, num_anchors=8, gamma=4.0)
    model = train(_cfg(target, draft_vocab_size=24), target.model, data, tmp_path / "rv", cfg, progress=False)
    ids = set(model.draft_token_ids().tolist())
    assert len(ids) == 24
    counts = torch.zeros(target.vocab_size, dtype=torch.long)
    for i in range(len(data)):
        counts += torch.bincount(data[i].ids, minlength=target.vocab_size)
    assert int(counts[list(ids)].min()) >= int(counts[[t for t in range(target.vocab_size) if t not in ids]].max())
    assert torch.equal(load_draft(tmp_path / "rv" / "final").draft_token_ids(), model.draft_token_ids())


def test_prompt_set_splits_by_file_and_exports_heldout_bench_files(tmp_path):
    from domino_backend.bench import read_prompts
    from domino_backend.training.data import build_prompts, write_heldout_bench

    src = tmp_path / "src"
    for i in range(30):  # small "source files" (> 2000 bytes, > 40 lines: the size filter)
        (src / f"m{i}.py").parent.mkdir(exist_ok=True)
        (src / f"m{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x + {j}\n" for j in range(100)))
    path = build_prompts(tmp_path / "p.jsonl", n_code=30, n_chat=20, seed=1, holdout_frac=0.3, source=src)
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    by_file = {}
    for r in recs:
        if "file" in r:
            by_file.setdefault(r["file"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_file.values())  # a file is entirely train or entirely held out
    assert {"train", "heldout"} <= {r["split"] for r in recs}
    assert len({json.dumps(r.get("messages")) for r in recs if r["kind"] == "chat"}) == 20  # deduplicated
    files = write_heldout_bench(path, tmp_path / "bench")
    code = read_prompts(files["code"])
    assert code and all("prefix" in r or "prompt" in r for r in code)
    held = {r["prefix"] for r in recs if r["split"] == "heldout" and "prefix" in r}
    assert all(r.get("prefix", r.get("prompt")) in held for r in code)


def test_source_records_come_only_from_train_files_and_are_real_code(tmp_path):
    from domino_backend.training.data import source_records, split_of

    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"m{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x + {j}\n" for j in range(100)))
    tok = CharTokenizer()
    path = source_records(tok, tmp_path / "s.jsonl", n=100, holdout_frac=0.3, window=200, context=16, source=src)
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    n_train = sum(split_of(f"m{i}.py", 0.3) == "train" for i in range(30))
    assert 0 < len(recs) == n_train < 30  # one window per train file, none from held-out files
    for r in recs:
        assert split_of(r["file"], 0.3) == "train" and r["kind"] == "source"
        assert len(r["prompt_ids"]) == 16 and len(r["prompt_ids"]) + len(r["response_ids"]) <= 200
        text = tok.decode(r["prompt_ids"] + r["response_ids"])
        assert text in (src / r["file"]).read_text()  # labels are the file's own text
    assert len({r["id"] for r in recs}) == len(recs)
    # FIM records: the prompt holds text before the hole, the response is the hole's real lines.
    path = source_records(tok, tmp_path / "f.jsonl", n=100, holdout_frac=0.3, source=src, fim_frac=1.0)
    fims = [json.loads(line) for line in path.read_text().splitlines()]
    assert fims and all(r["kind"] == "source_fim" for r in fims)
    for r in fims:
        text, hole = (src / r["file"]).read_text(), tok.decode(r["response_ids"])
        assert hole.endswith("\n") and hole in text and 1 <= hole.count("\n") <= 12
        assert text[:text.index(hole)].endswith(tok.decode(r["prompt_ids"])[-50:])


def test_warm_start_begins_from_the_exported_drafter_and_rejects_another_shape(captured, tmp_path):
    target, data, _ = captured
    cfg = TrainConfig(steps=8, lr=3e-3, num_anchors=8, gamma=4.0)
    train(_cfg(target), target.model, data, tmp_path / "a", cfg, progress=False)
    frozen = TrainConfig(steps=2, lr=0.0, num_anchors=8, gamma=4.0, init=str(tmp_path / "a" / "final"))
    train(_cfg(target), target.model, data, tmp_path / "b", frozen, progress=False)
    a, b = load_draft(tmp_path / "a" / "final").state_dict(), load_draft(tmp_path / "b" / "final").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="another drafter configuration"):
        train(tiny_draft_config(target, block_size=6, target_layer_ids=[1, 2]), target.model, data,
              tmp_path / "c", frozen, progress=False)


def test_target_labels_are_the_targets_greedy_tokens_and_resume(captured):
    target, _, tmp = captured
    from domino_backend.training.capture import label_targets

    cap = tmp / "cap"
    assert label_targets(target.model, cap, top_tokens=None) == 10
    assert label_targets(target.model, cap, top_tokens=None) == 0  # resume: all labelled
    data = CapturedData(cap)
    agree = total = 0
    for i in range(len(data)):
        seq = data[i]
        with torch.no_grad():
            ref = target.model(input_ids=seq.ids[None]).logits[0].argmax(-1)
        agree += int((seq.target_next == ref).sum())
        total += len(ref)
    assert agree / total > 0.97  # the re-run starts from float16 features: rare near-ties may flip
    # Training on them runs, and scores drafts against the target's own tokens.
    cfg = TrainConfig(steps=30, lr=8e-3, num_anchors=16, gamma=4.0, save_every=30, target_labels=True)
    train(_cfg(target), target.model, data, tmp / "run_tl", cfg, progress=False)
    log = [json.loads(line) for line in (tmp / "run_tl" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 30 and sum(r["loss"] for r in log[-5:]) < sum(r["loss"] for r in log[:5])
    # A cut-off tail (killed mid-write) is redone; a different vocabulary setting is refused.
    labels = cap / "labels.i32"
    full = labels.read_bytes()
    labels.write_bytes(full[:-10])
    assert label_targets(target.model, cap, top_tokens=None) == 1
    assert labels.read_bytes() == full
    with pytest.raises(ValueError, match="delete it"):
        label_targets(target.model, cap, top_tokens=16)
    # Restricted to the top tokens, a label is the best token of that set.
    labels.unlink()
    label_targets(target.model, cap, top_tokens=16)
    top = set(data.top_tokens(16, target.vocab_size).tolist())
    assert set(CapturedData(cap)[0].target_next.tolist()) <= top
    labels.unlink()
    (cap / "labels.json").unlink()


def test_target_labels_supervise_drafts_only_along_the_targets_greedy_chain():
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    mask = torch.ones(10, dtype=torch.bool)
    greedy = ids.roll(-1)  # the target agrees with the data everywhere ...
    greedy[3] = 42  # ... except after position 3, where it would say 42 instead of 4
    b = build_blocks(ids, mask, torch.tensor([1, 4]), block_size=4, num_drafts=4, mask_token_id=99, gamma=2.0,
                     target_next=greedy)
    assert b.labels[0].tolist() == [2, 3, 42, 5]
    # Drafts 1-3 of the first block are reachable (data = greedy chain so far); draft 4 follows the data's 4,
    # which verification would never have accepted, so it is not supervised.
    assert (b.weights[0, :3] > 0).all() and b.weights[0, 3] == 0
    assert b.labels[1].tolist() == [5, 6, 7, 8] and (b.weights[1] > 0).all()
    plain = build_blocks(ids, mask, torch.tensor([1, 4]), block_size=4, num_drafts=4, mask_token_id=99, gamma=2.0)
    assert plain.labels[0].tolist() == [2, 3, 4, 5] and (plain.weights > 0).all()


def test_training_on_target_labels_needs_the_label_step(captured, tmp_path):
    target, data, _ = captured
    with pytest.raises(ValueError, match="label"):
        train(_cfg(target), target.model, data, tmp_path / "run", TrainConfig(steps=2, target_labels=True), progress=False)


def test_generate_regenerates_train_prompts_only_resumes_and_matches_plain_decoding(tmp_path):
    """Batched, left-padded regeneration gives each prompt exactly its own greedy continuation;
    held-out prompts are never generated; `limit` and resume split the work without repeats."""
    from domino_backend.training.data import generate_responses

    class Tok(CharTokenizer):
        pad_token_id = eos_token_id = None

    target, tok = tiny_target("qwen3", vocab=96, peak=3.0, seed=2), Tok()
    texts = ["def f(x):", "import os\nprint", "a", "class A:\n    pass\n", "x = [1, 2", "return y", "for i in"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "kind": "prefix", "prefix": t, "split": "heldout" if i == 1 else "train"})
                               + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "records.jsonl"
    eos = 95
    assert generate_responses(target.model, tok, prompts, out, max_new_tokens=10, batch_size=4, sample_frac=0.0,
                              eos_ids={eos}, limit=4) == 4
    assert generate_responses(target.model, tok, prompts, out, max_new_tokens=10, batch_size=4, sample_frac=0.0,
                              eos_ids={eos}) == 2
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in recs) == [0, 2, 3, 4, 5, 6]
    engine = Engine(target)
    for r in recs:
        assert r["prompt_ids"] == tok.encode(texts[r["id"]])
        ref = engine.generate(r["prompt_ids"], GenerationRequest(max_new_tokens=10, method="ar", temperature=0.0)).token_ids
        cut = ref.index(eos) + 1 if eos in ref else len(ref)
        assert r["response_ids"] == ref[:cut]


@pytest.mark.parametrize("shift_label", [True, False])
def test_the_engine_drafts_with_exactly_what_the_trainer_optimises(shift_label):
    """Train/inference parity (the context, position and shift-label slips of method doc §7.2): every
    block the engine drafts during real generations (chunked prefill, then a prefix-cache hit) gives
    the same draft hidden states as the trainer's forward at that anchor over the finished
    sequence's teacher-forced features."""
    target = tiny_target("qwen3", vocab=48, peak=3.0, seed=5)
    draft = tiny_draft(target, seed=1, shift_label=shift_label)
    calls = []
    forward_block = draft.forward_block

    def spy(block_emb, block_pos, cache):
        z = forward_block(block_emb, block_pos, cache)
        calls.append((int(block_pos[0, 0]), block_emb[0, 0].clone(), z[0].clone()))
        return z

    draft.forward_block = spy
    engine = Engine(target, draft, EngineSettings(prefill_chunk=8))
    prompt = torch.randint(0, 40, (21,), generator=torch.Generator().manual_seed(3)).tolist()
    cfg = draft.cfg
    for _ in range(2):  # the second run starts from the prefix cache's snapshot
        calls.clear()
        out = engine.generate(prompt, GenerationRequest(max_new_tokens=30, method="domino", temperature=0.0,
                                                        adaptive_drafts=False))
        seq = torch.tensor(prompt + out.token_ids)
        with torch.no_grad():
            o = target.model(input_ids=seq[None], output_hidden_states=True)
            feats = torch.cat([o.hidden_states[i + 1][0] for i in cfg.target_layer_ids], dim=-1)
            anchors = torch.tensor([pos for pos, *_ in calls])
            blk = build_blocks(seq, torch.ones(len(seq), dtype=torch.bool), anchors, cfg.block_size,
                               cfg.num_drafts, cfg.mask_token_id, gamma=4.0)
            emb = target.embed(blk.block_ids)
            n, b = blk.block_ids.shape
            z = draft.forward_train(emb.reshape(1, n * b, -1), blk.positions.reshape(1, -1), feats[None],
                                    blk.mask).reshape(n, b, -1)
        assert len(calls) >= 5 and anchors[0] == len(prompt)
        for i, (_, anchor_emb, z_engine) in enumerate(calls):
            assert torch.equal(anchor_emb, emb[i, 0])  # the anchor is the sequence's token at that position
            assert torch.allclose(z_engine, z[i], atol=1e-4, rtol=1e-4)
