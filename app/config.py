"""Every server setting in one place, with its default and the reason for it.

`ServerConfig` is built by `python -m app` from flags and environment (`DOMINO_API_KEY`), and by
tests directly. Nothing else in `app/` reads flags or the environment.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field, field_validator

from domino_backend.methods import METHODS
from domino_backend.settings import EngineSettings
from domino_backend.engine import MAX_STOPS

# Loopback by default: the server runs models on the user's machine and has no key unless asked to.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
API_KEY_ENV = "DOMINO_API_KEY"
BACKEND_KEY_ENV = "DOMINO_BACKEND_API_KEY"
# Chat and raw prompts with more characters than this many per allowed token are refused before
# tokenizing (FIM text is cut to it around the cursor): tokenizing a huge prompt only to refuse it
# costs memory the allocator keeps (bench/hostile_session.py). Code and prose run 3-5 characters
# per token; only long runs of one repeated character come near 16.
PROMPT_CHARS_PER_TOKEN = 16


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- network
    host: str = DEFAULT_HOST
    port: int = Field(DEFAULT_PORT, ge=0, le=65535)  # 0 = pick a free port (tests)
    ui: bool = False  # the Gradio UI at `/` (`python -m app` turns it on; `--no-ui` serves the APIs alone)

    # --- backend: the in-process engine, or any OpenAI-compatible server
    target: str = "coder"  # profile name, HF folder or hub id
    draft: str | None = None  # None = the profile's default drafter, "none" = ar/ngram only
    dtype: str = "auto"
    quant: str = "auto"  # the target's Linear weights: domino_backend.quant.QUANT_MODES
    threads: int | None = None  # torch threads; None = every core, one fewer while ASR/TTS run (engine_backend)
    # Default decoding method when a request names none; "auto" is resolved by
    # domino_backend.methods.resolve. Lossless either way.
    method: str = "auto"
    engine: EngineSettings = Field(default_factory=EngineSettings)  # draft length, trees, lookup, caches
    backend_url: str | None = None  # e.g. http://gpu-box:30000/v1 (SGLang, vLLM, llama.cpp, another Domino)
    backend_model: str | None = None  # model name sent to the remote backend (default: its first model)
    backend_api_key: str | None = None  # sent as Bearer to the remote backend, never logged
    backend_timeout_s: float = Field(300.0, gt=0)

    # --- scheduling: a bounded queue answers `overloaded` instead of letting latency grow without end
    max_active: int = Field(8, ge=1)  # requests advanced together, one batched engine round at a time
    max_queue: int = Field(64, ge=0)  # requests waiting for an active slot; beyond this: overloaded / 429
    # prompt + max_tokens summed over admitted requests (their KV memory); beyond it: overloaded / 429
    max_tokens_in_flight: int = Field(65536, ge=1)

    # --- limits (clear errors, never a crash)
    max_message_bytes: int = Field(1 << 20, ge=1024)  # one WebSocket message or one HTTP body
    # Frames above this are refused by the transport itself (close 1009) so a client cannot make us
    # buffer gigabytes; between max_message_bytes and this they get an `error` and the socket lives.
    transport_max_bytes: int = Field(16 << 20, ge=1024)
    max_prompt_tokens: int = Field(8192, ge=1)  # checked on the tokens; see max_prompt_chars for the cheap check
    max_tokens_limit: int = Field(1024, ge=1)  # upper bound on a request's max_tokens
    default_max_tokens: int = Field(128, ge=1)  # WebSocket requests that give none
    max_inflight_per_connection: int = Field(16, ge=1)
    # The only stop-string check clients meet (app/edge.check_request). The engine's own MAX_STOPS
    # bounds its per-round scan for every caller; the server's limit may not exceed it.
    max_stop_strings: int = Field(8, ge=0, le=MAX_STOPS)

    # --- security
    api_key: str | None = None  # None = no auth (loopback default)
    # Browsers may open a WebSocket to any host, so a page on the web could drive a local model;
    # we only accept browser Origins on this list. Requests without Origin (IDEs, curl) pass.
    allowed_origins: list[str] = Field(
        default_factory=lambda: ["http://localhost", "http://127.0.0.1", "vscode-webview://*", "vscode-file://*"]
    )
    # DNS rebinding: a web page whose own name resolves to 127.0.0.1 reaches a loopback server with
    # that name in Host (the Origin check stops its POSTs, not its GETs). So when bound to loopback
    # only loopback Host names are served (localhost, 127.x, ::1), plus these names ("*" = any).
    # Bound beyond loopback, any Host is served unless names are given here.
    allowed_hosts: list[str] = Field(default_factory=list)

    log_level: str = "info"

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v != "auto" and v not in METHODS:
            raise ValueError(f"unknown method {v!r}; choose from auto, {', '.join(METHODS)}")
        return v

    @field_validator("api_key", "backend_api_key")
    @classmethod
    def _empty_is_none(cls, v: str | None) -> str | None:
        return v or None

    @field_validator("allowed_hosts")
    @classmethod
    def _lower_hosts(cls, v: list[str]) -> list[str]:
        return [h.strip().lower().strip("[]") for h in v]

    @property
    def max_prompt_chars(self) -> int:
        return self.max_prompt_tokens * PROMPT_CHARS_PER_TOKEN

    @classmethod
    def with_env(cls, **kw) -> ServerConfig:
        """Like the constructor, but unset keys come from $DOMINO_API_KEY / $DOMINO_BACKEND_API_KEY."""
        if not kw.get("api_key"):
            kw["api_key"] = os.environ.get(API_KEY_ENV) or None
        if not kw.get("backend_api_key"):
            kw["backend_api_key"] = os.environ.get(BACKEND_KEY_ENV) or None
        return cls(**kw)

    def safe_dict(self) -> dict:
        """Settings for logs and /health: secrets replaced by whether they are set."""
        d = self.model_dump()
        for k in ("api_key", "backend_api_key"):
            d[k] = "set" if d[k] else None
        return d
