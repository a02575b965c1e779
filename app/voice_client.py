"""A `/v1/voice` client: streams audio in real time and collects what comes back, with arrival times.

Used by `python -m app.client voice FILE.wav`, bench/voice_latency.py and the API tests:

    with VoiceClient("ws://127.0.0.1:8000/v1/voice", sample_rate=16000) as vc:
        vc.stream(pcm_int16)                    # real time, 20 ms frames
        done = vc.stream_silence_until("turn_done")
        audio = vc.reply_audio(done["turn"])    # int16 at vc.ready["audio_sample_rate"]
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np

FRAME_S = 0.02  # what a browser's audio worklet typically delivers


def _matcher(pred, match: dict):
    if callable(pred):
        return pred
    return lambda m: m["type"] == pred and all(m.get(k) == v for k, v in match.items())


class VoiceClient:
    def __init__(self, url: str, token: str | None = None, sample_rate: int = 16000, origin: str | None = None,
                 open_timeout: float = 120.0, **settings):
        from websockets.sync.client import connect

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._conn = connect(url, additional_headers=headers, origin=origin, max_size=None, open_timeout=open_timeout)
        self.ws = self._conn.__enter__()
        self.rate = sample_rate
        self.t0 = time.perf_counter()
        self.events: list[tuple[float, dict]] = []  # (seconds since t0, message)
        self.audio: list[tuple[float, int | None, bytes]] = []  # (arrival, turn, PCM16 frame)
        self.closed: Exception | None = None
        self._turn: int | None = None  # the turn of the last audio_start: reply frames belong to it
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="voice-client", daemon=True)
        self._reader.start()
        self.send({"type": "start", "sample_rate": sample_rate, **settings})
        self.ready = self.wait_for(lambda m: m["type"] in ("ready", "error"), timeout=open_timeout)

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def _read(self) -> None:
        try:
            while True:
                msg = self.ws.recv()
                with self._cv:
                    if isinstance(msg, bytes):
                        self.audio.append((self.now(), self._turn, msg))
                    else:
                        m = json.loads(msg)
                        if m["type"] == "audio_start":
                            self._turn = m["turn"]
                        self.events.append((self.now(), m))
                    self._cv.notify_all()
        except Exception as e:  # noqa: BLE001 - closed by either side: waiters see it
            with self._cv:
                self.closed = e
                self._cv.notify_all()

    def send(self, obj: dict | bytes) -> None:
        self.ws.send(obj if isinstance(obj, bytes) else json.dumps(obj))

    def of(self, pred, **match) -> list[dict]:
        """Messages so far matching `pred`: a type name (plus field values) or a predicate."""
        test = _matcher(pred, match)
        with self._cv:
            return [m for _, m in self.events if test(m)]

    def wait_for(self, pred, timeout: float = 30.0, **match) -> dict:
        """The first message (in arrival order) matching `pred`, waiting for it if need be."""
        test = _matcher(pred, match)
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                hit = next((m for _, m in self.events if test(m)), None)
                if hit is not None:
                    return hit
                if self.closed is not None:
                    raise ConnectionError(f"connection closed while waiting: {self.closed!r}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {pred if isinstance(pred, str) else 'matching'} message in {timeout} s")
                self._cv.wait(left)

    def stream(self, pcm: np.ndarray, realtime: bool = True, until=None) -> float:
        """Send int16 samples at self.rate in FRAME_S frames, paced like a microphone; returns the time
        (since t0) the first frame went out. `until`: stop early once this predicate of the messages holds."""
        pcm = np.asarray(pcm, dtype=np.int16)
        step = max(1, int(self.rate * FRAME_S))
        start = self.now()
        for k, i in enumerate(range(0, len(pcm), step)):
            if realtime:  # an absolute schedule: no drift over long streams
                time.sleep(max(0.0, start + (k + 1) * FRAME_S - self.now()))
            self.send(pcm[i : i + step].astype("<i2").tobytes())
            if until is not None and k % 5 == 0 and until():
                break
        return start

    def stream_silence_until(self, pred, timeout: float = 60.0, **match) -> dict:
        """Keep the microphone open (silence, real time) until a matching message arrives; the VAD
        needs the silence to find the end of a turn."""
        deadline = self.now() + timeout
        while self.now() < deadline:
            found = self.of(pred, **match)
            if found:
                return found[0]
            if self.closed is not None:
                raise ConnectionError(f"connection closed while waiting: {self.closed!r}")
            self.stream(np.zeros(int(self.rate * 0.2), np.int16))
        raise TimeoutError(f"no {pred if isinstance(pred, str) else 'matching'} message {match} in {timeout} s")

    def reply_audio(self, turn: int | None = None) -> np.ndarray:
        """The reply audio received (for one turn, or all), as int16."""
        with self._cv:
            frames = [b for _, t, b in self.audio if turn is None or t == turn]
        return np.frombuffer(b"".join(frames), dtype="<i2")

    def played_until(self, rate: int) -> float:
        """When a player that starts each frame on arrival (or when the one before ends) runs dry."""
        end = -1.0
        with self._cv:
            for t, _, b in self.audio:
                end = max(end, t) + len(b) / 2 / rate
        return end

    def close(self) -> None:
        try:
            self._conn.__exit__(None, None, None)
        finally:
            self._reader.join(5)

    def __enter__(self) -> VoiceClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_cli(args) -> int:
    """`python -m app.client voice FILE.wav [--out reply.wav]`: stream the file in real time, keep the
    microphone open (silence) until the turn is done, print transcript, reply and timings."""
    import sys

    from websockets.exceptions import InvalidStatus, WebSocketException

    from agents.voice.audio import float_to_int16, read_wav, write_wav

    url = args.url[: -len("/v1/ws")] + "/v1/voice" if args.url.endswith("/v1/ws") else args.url
    try:
        pcm, rate = read_wav(args.wav)
    except (OSError, ValueError, EOFError) as e:
        print(f"error: cannot read {args.wav}: {e}", file=sys.stderr)
        return 2
    settings = {"method": args.method} if args.method else {}
    try:
        with VoiceClient(url, token=args.token, sample_rate=rate, **settings) as vc:
            if vc.ready["type"] == "error":
                print(f"error [{vc.ready['code']}]: {vc.ready['message']}", file=sys.stderr)
                return 1
            vc.stream(np.concatenate([float_to_int16(pcm), np.zeros(rate // 2, np.int16)]))
            done = vc.stream_silence_until("turn_done", timeout=120)
            errors = vc.of("error")
            if args.json:
                for _, m in vc.events:
                    print(json.dumps(m))
            else:
                print(f"you:       {done['transcript']}", flush=True)
                print(f"assistant: {done['reply'].strip()}", flush=True)
            t, llm = done["timings"], done.get("llm") or {}
            stages = ", ".join(f"{k.removesuffix('_ms')} {v:.0f}" for k, v in t.items() if v is not None)
            print(f"[{done['outcome']}; ms: {stages}; {llm.get('method', '-')} tau {llm.get('tau', '-')}, "
                  f"{llm.get('tokens_per_s', '-')} tok/s]", file=sys.stderr)
            for e in errors:
                print(f"error [{e['code']}]: {e['message']}", file=sys.stderr)
            if args.out:
                audio = vc.reply_audio(done["turn"])
                write_wav(args.out, audio, vc.ready["audio_sample_rate"])
                print(f"reply audio: {len(audio) / vc.ready['audio_sample_rate']:.1f} s -> {args.out}", file=sys.stderr)
            return 1 if done["outcome"] == "error" else 0
    except InvalidStatus as e:
        print(f"error: the server refused the connection ({e.response.status_code}); "
              "check --token and the server's --allow-origin", file=sys.stderr)
    except (OSError, WebSocketException, TimeoutError, ConnectionError) as e:
        print(f"error: cannot talk to {url}: {e}", file=sys.stderr)
    return 2
