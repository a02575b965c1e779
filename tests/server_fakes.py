"""Run a real uvicorn server in a background thread on a free loopback port (tests, benchmarks).

    with ServerThread(ServerConfig(port=0, ...), backend) as srv:
        srv.url      # http://127.0.0.1:PORT
        srv.ws_url   # ws://127.0.0.1:PORT/v1/ws
"""

from __future__ import annotations

import threading
import time

import uvicorn

from app.backend import Backend
from app.config import ServerConfig
from app.server import create_app, uvicorn_config


class ServerThread:
    def __init__(self, cfg: ServerConfig, backend: Backend | None = None, ready_timeout: float = 60.0):
        self.cfg = cfg  # port 0 = a free port, read back after start
        self.app = create_app(self.cfg, backend)
        self.server = uvicorn.Server(uvicorn_config(self.app, self.cfg))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self.ready_timeout = ready_timeout
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    def start(self) -> ServerThread:
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread died while starting")
            if time.monotonic() - t0 > self.ready_timeout:
                raise TimeoutError("the server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    def wait_idle(self, timeout: float = 3.0) -> dict:
        """Poll until the backend has no active request (or timeout); returns its final load."""
        t0 = time.monotonic()
        while self.app.state.backend.load()["active"] and time.monotonic() - t0 < timeout:
            time.sleep(0.02)
        return self.app.state.backend.load()

    def __enter__(self) -> ServerThread:
        return self if self.thread.is_alive() else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- a scripted engine: the real scheduler and APIs without model weights ----------------------
class FakeTokenizer:
    """Character-level tokenizer with Qwen FIM/chat tokens (ids >= 1000), enough for app/prompting."""

    SPECIAL = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|repo_name|>", "<|file_sep|>", "<|im_end|>")
    chat_template = "fake"

    def get_vocab(self) -> dict[str, int]:
        return {t: 1000 + i for i, t in enumerate(self.SPECIAL)}

    def get_added_vocab(self) -> dict[str, int]:
        return self.get_vocab()

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.get_vocab().get(token)  # like HF: no exception for an unknown token

    chars_encoded = 0  # over all instances: lets tests check that refused prompts were never tokenized

    def encode(self, text: str, add_special_tokens: bool = False, split_special_tokens: bool = False) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # as HF fast tokenizers do with a lone surrogate
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")
        FakeTokenizer.chars_encoded += len(text)
        ids, i = [], 0
        while i < len(text):
            hit = None if split_special_tokens else next((t for t in self.SPECIAL if text.startswith(t, i)), None)
            if hit:
                ids.append(self.get_vocab()[hit])
                i += len(hit)
            else:
                ids.append(min(ord(text[i]), 999))
                i += 1
        return ids

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        text = "".join(f"{m['role']}: {m['content']}<|im_end|>\n" for m in messages) + "assistant: "
        return self.encode(text) if tokenize else text


class FakeGeneration:
    """One word per round (`FakeEngine.step`, `round_s` seconds a round), like Generation: the words cycle through
    WORDS (a line break every fourth word), so the output depends only on the token count."""

    WORDS = ("alpha", " beta", " gamma", "\n", "delta", " eps", " zeta", "\n")

    def __init__(self, prompt_ids, req, round_s: float):
        from domino_backend.engine import Stats

        self.prompt_ids, self.req, self.round_s = prompt_ids, req, round_s
        self.stats = Stats(method=req.method, prompt_tokens=len(prompt_ids))
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self._cancel = threading.Event()
        self._t0: float | None = None

    def cancel(self) -> None:
        self._cancel.set()

    def prefill_rows(self) -> int:
        return 0  # the first round's word stands for the prefill

    def cap_drafts(self, n) -> None:
        pass

    def advance(self) -> str:
        """One round's word (the wait is the engine's: FakeEngine.step)."""
        if self._t0 is None:
            self._t0 = time.perf_counter()
        if self._cancel.is_set():
            self.finish_reason = "cancelled"
            return ""
        if not self.token_ids:
            self.stats.prefill_s = self.round_s
        else:
            k = 0 if self.req.method == "ar" else 4
            self.stats.record(k, min(k, 1))
        word = self.WORDS[len(self.token_ids) % len(self.WORDS)]
        self.token_ids.append(len(self.token_ids))
        self.text += word
        if len(self.token_ids) >= self.req.max_new_tokens:
            self.finish_reason = "length"
        return word

    def close(self) -> None:
        self.stats.new_tokens = len(self.token_ids)
        if self._t0 is not None:
            self.stats.total_s = time.perf_counter() - self._t0



class FakeEngine:
    def __init__(self, round_s: float = 0.01, max_context: int = 4096):
        from types import SimpleNamespace

        self.round_s = round_s
        from torch import nn

        # model: a module without Linear layers (`/health` reports the weight format)
        self.target = SimpleNamespace(tokenizer=FakeTokenizer(), max_context=max_context, model=nn.Module())
        self.draft = SimpleNamespace(has_head=True)  # a drafter with a Domino head: every method runs
        self.placeholder_draft = False
        self.started = 0  # generations begun: lets tests check that cancelled work never started

    def stream(self, prompt_ids, req):
        if req.max_new_tokens <= 0:
            raise ValueError("max_new_tokens must be positive")
        self.started += 1
        return FakeGeneration(prompt_ids, req, self.round_s)

    def step(self, gens, max_rows=None, stop=None) -> list:
        """One batched round: every generation's next word after one round's time."""
        time.sleep(self.round_s)
        return [g.advance() for g in gens]
