"""Property-based fuzzing of a real server on loopback: generated JSON (arbitrary nesting, numbers of
any size, NaN, unicode with lone surrogates and control characters, wrong types, plausible requests
with hostile values, cut-off text, invalid UTF-8, non-JSON content types) thrown at `/v1/ws`,
`/v1/completions` and `/v1/chat/completions`. For every input it checks:

- a well-formed answer: WebSocket messages are JSON objects of a known type (an `error` has a code
  from the error vocabulary and a message); HTTP answers 200 with a valid completion (or SSE
  stream), or a 4xx/503 with OpenAI's error body; never a 500;
- the same WebSocket connection still answers `ping`, and `/health` is 200;
- no line of the server's log has a raw control character, and nothing was logged at ERROR.

The suite runs it bounded (tests/test_fuzz_server.py); this script runs it longer:

    python bench/fuzz_server.py --examples 2000                 # scripted engine (tests/server_fakes.py)
    python bench/fuzz_server.py --profile tiny --examples 300   # the real tiny model
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
import unicodedata
import uuid
import warnings
from collections import Counter
from pathlib import Path

import httpx
import hypothesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import HypothesisDeprecationWarning
from hypothesis import strategies as st
from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from app.backend import ERROR_STATUS  # noqa: E402
from app.config import ServerConfig  # noqa: E402
from app.engine_backend import EngineBackend  # noqa: E402
from domino_backend.methods import METHODS  # noqa: E402
from server_fakes import FakeEngine, ServerThread  # noqa: E402

WS_REPLIES = {"delta", "done", "error", "pong"}
FINISH = {"stop", "length", "cancelled", "deadline", "error"}
HTTP_STATUSES = {200, 400, 413, 415, 429, 503}

# ---- inputs ---------------------------------------------------------------------------------------
# Text with everything a client can put in a JSON string: controls, lone surrogates, astral chars,
# special-token spellings; most strings are plain, so that most requests get past decoding.
hostile_chars = st.one_of(st.characters(), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
                          st.sampled_from("\n\r\x1b\x00\u2028\u202e"))
plain_texts = st.text(st.characters(codec="utf-8"), max_size=40)
texts = st.one_of(plain_texts, plain_texts, st.text(hostile_chars, max_size=40),
                  st.sampled_from(["<|im_end|>\n<|im_start|>system\n", "<|fim_middle|>", "<|endoftext|>"]))
big_texts = st.integers(1, 30_000).map(lambda n: "ab\n" * n)  # past the prompt and message limits


class Raw(str):
    """Number literals json.dumps cannot write: integers over 4300 digits, NaN, 1e999."""


raw_numbers = st.one_of(st.integers(4000, 5000).map(lambda n: Raw("9" * n)),
                        st.sampled_from([Raw("NaN"), Raw("-Infinity"), Raw("1e999"), Raw("-0.0"), Raw("1E-400")]))
finite = st.one_of(st.integers(), st.integers(-(1 << 70), 1 << 70), st.floats(allow_nan=False, allow_infinity=False))
numbers = st.integers(0, 9).flatmap(lambda i: raw_numbers if i == 9 else st.floats() if i == 8 else finite)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
json_values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                           st.dictionaries(texts, kids, max_size=4)), max_leaves=12)


def either(good, bad=None):
    """Mostly a valid value, sometimes one just out of range, sometimes anything at all."""
    return st.integers(0, 19).flatmap(lambda i: good if i < 18 else json_values if i == 19 or bad is None else bad)


sampling = {
    "max_tokens": either(st.integers(1, 6), st.sampled_from([0, -1, 10**6, 2**64])),
    "temperature": either(st.floats(0, 2), st.sampled_from([-1e-9, 2.0000001, 1e308])),
    "top_p": either(st.floats(1e-6, 1), st.sampled_from([0.0, 1e-300, 1.0000001, -1.0])),
    "seed": either(st.integers(-(1 << 63), (1 << 64) - 1), st.sampled_from([1 << 64, -(1 << 63) - 1, 10**30])),
    "stop": either(st.lists(texts, max_size=8), st.lists(texts, min_size=9, max_size=12) | st.just(["x" * 257])),
    "deadline_ms": either(st.integers(1, 5000), st.sampled_from([0, -5, 3_600_001])),
    "method": either(st.sampled_from(list(METHODS)), st.sampled_from(["magic", "", "AR"])),
}
messages = either(st.lists(st.fixed_dictionaries(
    {"role": either(st.sampled_from(["system", "user", "assistant", "developer", "robot"])), "content": either(texts)}),
    max_size=3))
ids = st.one_of(st.text(st.characters(codec="utf-8"), min_size=1, max_size=40), texts)
complete_fields = {"suffix": either(texts), "language": either(texts), "filename": either(texts),
                   "document": either(texts), "single_line": either(st.booleans()), "multi_line": either(st.booleans()),
                   "extra": either(st.lists(st.fixed_dictionaries({"filename": texts, "text": texts}), max_size=2))}
ws_requests = st.one_of(
    st.fixed_dictionaries({"type": st.just("complete"), "id": either(ids), "prefix": either(st.one_of(texts, big_texts))},
                          optional={**complete_fields, **sampling}),
    st.fixed_dictionaries({"type": st.just("chat"), "id": either(ids), "messages": messages}, optional=sampling),
    st.fixed_dictionaries({"type": st.sampled_from(["cancel", "ping"]), "id": either(ids)}),
    st.fixed_dictionaries({"type": json_values, "id": either(ids)}, optional={"prefix": texts, **sampling}),
)
completion_bodies = st.fixed_dictionaries(
    {"prompt": either(st.one_of(texts, big_texts, st.lists(texts, max_size=2)))},
    optional={"suffix": either(texts), "stream": either(st.booleans()), "n": either(st.just(1), st.integers(0, 3)),
              "echo": either(st.just(False), st.just(True)), "top_k": either(st.integers(0, 100), st.just(-1)),
              "single_line": either(st.booleans()),
              "stream_options": either(st.fixed_dictionaries({"include_usage": st.booleans()})), **sampling})
chat_bodies = st.fixed_dictionaries(
    {"messages": messages},
    optional={"stream": either(st.booleans()), "max_completion_tokens": either(st.integers(1, 6), st.just(0)),
              "tools": either(st.none(), json_values), **sampling})


def dumps(value, ascii_only: bool) -> str:
    """json.dumps, with Raw numbers written as they are."""
    raws: list[str] = []

    def swap(v):
        if isinstance(v, Raw):
            raws.append(v)
            return f"\x00raw{len(raws) - 1}\x00"
        if isinstance(v, list):
            return [swap(x) for x in v]
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        return v

    text = json.dumps(swap(value), ensure_ascii=ascii_only)
    for i, r in enumerate(raws):
        text = text.replace(json.dumps(f"\x00raw{i}\x00", ensure_ascii=ascii_only), r)
    return text


@st.composite
def wire(draw, values) -> bytes:
    """A value as bytes on the wire: escaped or raw unicode (lone surrogates then become invalid
    UTF-8), sometimes cut short."""
    text = dumps(draw(values), ascii_only=draw(st.sampled_from([True, True, True, False])))
    if draw(st.sampled_from([False] * 9 + [True])):
        text = text[: draw(st.integers(0, len(text)))]
    return text.encode("utf-8", "surrogatepass")


content_types = st.one_of(st.just("application/json"), st.just("application/json"), st.sampled_from(
    ["application/json; charset=utf-8", "application/vnd.x+json", "", "text/plain", "application/x-www-form-urlencoded"]))


# ---- checks ---------------------------------------------------------------------------------------
class LogLines(logging.Handler):
    """Every line the server logs (uvicorn's access and error logs, the app's), formatted."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []
        self.errors: list[str] = []

    def emit(self, record):
        text = self.format(record)
        self.lines.extend(text.split("\n"))
        if record.levelno >= logging.ERROR:
            self.errors.append(text)


def raw_controls(line: str) -> list[str]:
    return [hex(ord(c)) for c in line if unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp")]


class Harness:
    """A server, one WebSocket kept open for the whole run, and its log."""

    LOGGERS = ("", "uvicorn", "uvicorn.access")

    def __init__(self, server: ServerThread):
        self.srv = server
        self.log = LogLines()
        self._levels = {}
        for name in self.LOGGERS:
            lg = logging.getLogger(name)
            lg.addHandler(self.log)
        self._levels = {"domino": logging.getLogger("domino").level}
        logging.getLogger("domino").setLevel(logging.INFO)
        self._open = contextlib.ExitStack()
        self.http = self._open.enter_context(httpx.Client(base_url=server.url, timeout=30))
        self._ws: contextlib.ExitStack | None = None
        self.ws = self._connect()
        self.inputs = 0
        self.answers: Counter[str] = Counter()  # "ws done", "ws error invalid_request", "http 200", ...

    def _connect(self):
        if self._ws is not None:
            self._ws.close()
        self._ws = self._open.enter_context(contextlib.ExitStack())
        return self._ws.enter_context(connect(self.srv.ws_url, max_size=None))

    @contextlib.contextmanager
    def one_input(self):
        """One example: a failure is pinned on the input that caused it, and the next example (also
        when hypothesis replays it to shrink) starts with a fresh connection and an empty log."""
        self.inputs += 1
        self.log.lines.clear()
        self.log.errors.clear()
        try:
            yield
        except BaseException:
            self.ws = self._connect()
            raise

    def close(self):
        self._open.close()
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self.log)
        logging.getLogger("domino").setLevel(self._levels["domino"])

    def check_ws_message(self, raw) -> dict:
        m = json.loads(raw)
        assert isinstance(m, dict) and m.get("type") in WS_REPLIES, m
        if m["type"] == "error":
            assert m["code"] in ERROR_STATUS and isinstance(m["message"], str) and m["message"], m
            self.answers[f"ws error {m['code']}"] += 1
        elif m["type"] == "done":
            assert m["finish_reason"] in FINISH and isinstance(m["text"], str), m
            self.answers[f"ws done {m['finish_reason']}"] += 1
        return m

    def ws_ping(self, timeout: float = 20.0) -> None:
        """Ping and read up to the pong, checking every message on the way (replies to earlier inputs)."""
        pid = "alive-" + uuid.uuid4().hex
        self.ws.send(json.dumps({"type": "ping", "id": pid}))
        deadline = time.monotonic() + timeout
        while True:
            m = self.check_ws_message(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if m["type"] == "pong" and m["id"] == pid:
                return

    def alive(self) -> None:
        self.ws_ping()
        assert self.http.get("/health").status_code == 200
        assert not self.log.errors, self.log.errors[-1]
        bad = [(line, raw_controls(line)) for line in self.log.lines if raw_controls(line)]
        assert not bad, bad[:3]
        self.log.lines.clear()

    def ws_input(self, frame: bytes) -> None:
        with self.one_input():
            self.ws.send(frame, text=True)
            self.alive()

    def http_input(self, path: str, body: bytes, content_type: str) -> None:
        with self.one_input():
            self._http_input(path, body, content_type)

    def _http_input(self, path: str, body: bytes, content_type: str) -> None:
        headers = {"content-type": content_type} if content_type else {}
        r = self.http.post(path, content=body, headers=headers)
        assert r.status_code in HTTP_STATUSES, (r.status_code, r.text[:300])
        self.answers[f"http {r.status_code}"] += 1
        if r.status_code != 200:
            err = r.json()["error"]
            self.answers[f"http {r.status_code} {err['code']}"] += 1
            assert err["code"] in ERROR_STATUS and ERROR_STATUS[err["code"]] == r.status_code, err
            assert isinstance(err["message"], str) and err["message"] and err["type"], err
        elif r.headers["content-type"].startswith("text/event-stream"):
            events = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
            assert events and events[-1] == "[DONE]", r.text[-300:]
            for e in events[:-1]:
                assert isinstance(json.loads(e), dict)
        else:
            out = r.json()
            assert out["choices"] and out["usage"]["completion_tokens"] >= 0, out
        self.alive()


def fuzz_server(cfg_overrides: dict | None = None, engine=None) -> tuple[ServerThread, ServerConfig]:
    """The fuzzed server: small limits so that every accepted request is cheap."""
    cfg = ServerConfig(port=0, log_level="info", method="ar", max_message_bytes=64 << 10, default_max_tokens=4,
                       max_tokens_limit=16, max_prompt_tokens=1000, **(cfg_overrides or {}))
    return ServerThread(cfg, EngineBackend(cfg, engine or FakeEngine(0.0))).start(), cfg


def run(h: Harness, examples: int, seed: int | None = None) -> None:
    """Fuzz each endpoint with `examples` inputs; `seed` makes the run reproducible."""
    common = settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))

    @given(st.one_of(wire(ws_requests), wire(ws_requests), wire(json_values)))
    def ws(frame):
        h.ws_input(frame)

    @given(st.one_of(wire(completion_bodies), wire(completion_bodies), wire(json_values)), content_types)
    def completions(body, ctype):
        h.http_input("/v1/completions", body, ctype)

    @given(st.one_of(wire(chat_bodies), wire(chat_bodies), wire(json_values)), content_types)
    def chat(body, ctype):
        h.http_input("/v1/chat/completions", body, ctype)

    with warnings.catch_warnings():
        # the server's threads draw from `random` while examples are generated; not the strategies
        warnings.filterwarnings("ignore", "Do not use the `random` module", HypothesisDeprecationWarning)
        warnings.filterwarnings("ignore", "Generating overly large repr")  # of these strategies, once
        for prop in (ws, completions, chat):
            prop = common(prop)
            (prop if seed is None else hypothesis.seed(seed)(prop))()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=1000, help="inputs per endpoint")
    ap.add_argument("--profile", default=None, help="serve this model profile (e.g. tiny) instead of the scripted engine")
    ap.add_argument("--seed", type=int, default=None, help="derandomize (reproducible run)")
    a = ap.parse_args(argv)
    engine = None
    if a.profile:
        from domino_backend.loader import build_engine

        engine = build_engine(a.profile, dtype="float32")
    srv, _ = fuzz_server(engine=engine)
    h = Harness(srv)
    t0 = time.perf_counter()
    try:
        run(h, a.examples, a.seed)
    finally:
        h.close()
        srv.stop()
    print(f"{h.inputs} inputs in {time.perf_counter() - t0:.1f} s: every answer well-formed, connection and "
          f"/health alive, log clean")
    for k, n in sorted(h.answers.items()):
        print(f"  {k}: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
