"""llama.cpp as an outside reference in `bench` (method `llamacpp`): llama-cpp-python running the very
GGUF an embedded profile is built from, fed our prompt token ids, greedy, timed like our methods.

What a CPU user would run instead of Domino, so its tokens/s is the number to beat. Its output is
not expected to equal our `ar`'s: llama.cpp computes on the quantized blocks, we on de-quantized
weights; `bench` reports how long the outputs agree instead of asserting it.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from pathlib import Path

from .engine import Stats

INSTALL_HINT = "`bash setup.sh dev` builds it for this CPU (and caches the wheel)"


class LlamaCpp:
    """One llama.cpp context on `gguf`, reused for every prompt of a benchmark run."""

    def __init__(self, gguf: Path | str, n_ctx: int, threads: int):
        try:
            import llama_cpp
        except ImportError as e:
            raise RuntimeError(f"the bench method llamacpp needs the package llama-cpp-python: {INSTALL_HINT}") from e
        self.version = llama_cpp.__version__
        self.gguf, self.threads = str(gguf), threads
        # Prompt and generation threads both pinned: llama-cpp-python's default is half the cores.
        self.llm = llama_cpp.Llama(model_path=self.gguf, n_ctx=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, verbose=False)

    def same_tokens(self, text: str, ids: Sequence[int]) -> bool:
        """Does llama.cpp tokenize `text` (special tokens parsed, BOS as the model says) into `ids`?"""
        return self.llm.tokenize(text.encode(), add_bos=True, special=True) == list(ids)

    def generate(self, ids: Sequence[int], max_new_tokens: int, eos_ids: Collection[int]) -> tuple[list[int], Stats]:
        """Greedy continuation of `ids`, stopped at the first of `eos_ids` (not included) like the engine.
        `prefill_s` is the time to the first token; `total_s` includes it, as the engine's does."""
        # A full prefill every call: generate() would otherwise keep the KV of a prefix shared with
        # the previous call (the warm-up runs the first prompt too).
        self.llm.reset()
        toks: list[int] = []
        first = 0.0
        t0 = time.perf_counter()
        gen = self.llm.generate(list(ids), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0)
        for tok in gen:
            if not toks:
                first = time.perf_counter() - t0
            if tok in eos_ids:
                break
            toks.append(tok)
            if len(toks) >= max_new_tokens:
                break
        dt = time.perf_counter() - t0
        gen.close()
        return toks, Stats(method="llamacpp", prompt_tokens=len(ids), new_tokens=len(toks), prefill_s=first, total_s=dt)
