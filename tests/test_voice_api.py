"""`/v1/voice` on a real server on loopback, with the real voice parts (Silero VAD, Whisper tiny.en,
Piper): questions are Piper speech streamed in real time, replies are checked as audio.

Where what the LLM says does not matter, the scripted engine of server_fakes answers (its words
alpha, beta, gamma, ... one per round); the end-to-end test uses the small embedded model.
"""

import json
import socket
import time

import numpy as np
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from agents.voice.audio import float_to_int16, to_16k, wav_bytes
from agents.voice.parts import get_asr, get_tts
from app.config import ServerConfig
from app.engine_backend import EngineBackend
from app.voice_client import VoiceClient
from server_fakes import FakeEngine, ServerThread

pytestmark = pytest.mark.slow  # loads Whisper, Piper and Silero (and one test the tiny LLM)

RATE = 16000


def words(text: str) -> list[str]:
    return "".join(c if c.isalnum() else " " for c in text.lower()).split()


@pytest.fixture(scope="module")
def say():
    """Text -> Piper speech at 16 kHz int16 (the same synthesis every run)."""
    tts = get_tts("piper")
    cache = {}

    def speech(text: str, rate: int = RATE) -> np.ndarray:
        if (text, rate) not in cache:
            pcm = np.concatenate(list(tts.synthesize(text))).astype(np.float32) / 32768
            cache[text, rate] = float_to_int16(to_16k(pcm, tts.sample_rate) if rate == RATE else pcm)
        return cache[text, rate]

    return speech


def serve(real: bool = False, **cfg):
    """A server with the scripted engine, or (real) the engine of cfg.target, once it has loaded."""
    c = ServerConfig(port=0, log_level="warning", **{"method": "ar", **cfg})
    srv = ServerThread(c, EngineBackend(c, None if real else FakeEngine(0.01))).start()
    deadline = time.monotonic() + 600
    while srv.app.state.backend.health()["status"] == "loading":
        assert time.monotonic() < deadline, "the model did not load"
        time.sleep(0.2)
    return srv


@pytest.fixture(scope="module")
def server():
    srv = serve()
    srv.app.state.voice.cfg.max_reply_tokens = 6  # "alpha beta gamma / delta eps zeta": about 2 s of speech
    yield srv
    srv.stop()


@pytest.fixture
def voice(server):
    """The server's VoiceConfig for one test (sessions copy it at `start`), restored afterwards."""
    cfg = server.app.state.voice.cfg
    saved = cfg.model_copy()
    yield cfg
    server.app.state.voice.cfg = saved


def url(srv) -> str:
    return srv.url.replace("http", "ws") + "/v1/voice"


def counter(srv, name: str, **labels) -> float:
    import httpx

    text = httpx.get(srv.url + "/metrics").text
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (not sel or all(f'{k}="{v}"' in line for k, v in labels.items())):
            total += float(line.rsplit(" ", 1)[1])
    return total


def session_of(srv):
    (conn,) = srv.app.state.voice.connections
    return conn.session


def playing(vc: VoiceClient, seconds: float) -> None:
    """Wait (streaming silence, as an open microphone does) until `seconds` of reply audio arrived."""
    rate = vc.ready["audio_sample_rate"]
    deadline = time.monotonic() + 60
    while len(vc.reply_audio()) < seconds * rate:
        assert time.monotonic() < deadline, "the reply audio did not come"
        vc.stream(np.zeros(RATE // 50, np.int16))


# ---- end to end, real LLM -----------------------------------------------------------------------
def test_spoken_question_gets_a_spoken_answer(say):
    srv = serve(real=True, target="tiny", method="ar")
    try:
        srv.app.state.voice.cfg.max_reply_tokens = 40
        with VoiceClient(url(srv), sample_rate=RATE) as vc:
            assert vc.ready["type"] == "ready" and vc.ready["audio_sample_rate"] == 22050
            vc.stream(say("What is the capital of France?"))
            done = vc.stream_silence_until("turn_done", timeout=180)
            assert {"capital", "france"} <= set(words(done["transcript"]))
            assert done["outcome"] == "done" and done["reply"].strip()
            heard = vc.reply_audio(done["turn"])
            assert len(heard) > 0.5 * 22050
            # the reply audio is speech, and it says the reply: run it back through the ASR
            back = words(get_asr("tiny").transcribe(to_16k(heard.astype(np.float32) / 32768, 22050)))
            said = words(done["heard"])
            assert len(set(said) & set(back)) >= 0.6 * len(set(said)), (said, back)
            t = done["timings"]
            # the turn starts after the early-turn silence, and the stages add up to voice-to-voice
            assert t["transcript_ms"] >= srv.app.state.voice.cfg.early_turn_ms - 50
            assert t["voice_to_voice_ms"] >= t["transcript_ms"] + t["ttft_ms"]
            assert done["llm"]["method"] == "ar" and done["llm"]["tokens"] > 0
        assert counter(srv, "domino_voice_stage_seconds_count", stage="voice_to_voice") == 1
        assert counter(srv, "domino_requests_total", api="voice") >= 1
    finally:
        srv.stop()


# ---- barge-in and backchannels ------------------------------------------------------------------
def test_barge_in_stops_the_audio_cancels_generation_and_keeps_the_heard_part(server, voice, say):
    voice.max_reply_tokens = 400  # far longer than the test: the reply is still being generated
    cancelled = counter(server, "domino_requests_total", api="voice", finish_reason="cancelled")
    with VoiceClient(url(server), sample_rate=RATE) as vc:
        vc.send({"type": "text", "text": "count for me"})
        playing(vc, 1.5)
        t_speech = vc.stream(say("Please stop talking for a moment."), until=lambda: vc.of("turn_done"))
        done = vc.stream_silence_until("turn_done", turn=1)
        rate = vc.ready["audio_sample_rate"]
        detected = next(t for t, m in vc.events if m["type"] == "vad" and m["event"] == "speech_start" and t > t_speech)
        assert done["outcome"] == "interrupted"
        # the listener's audio ran dry about 300 ms after the server heard the speech (the lead,
        # ~0.16 s, plus arrival jitter on a busy machine), and no reply audio came after that
        end, last = -1.0, -1.0
        for t, turn, b in vc.audio:
            if turn == 1:
                end, last = max(end, t) + len(b) / 2 / rate, t
        assert end - detected < 0.4, end - detected
        assert last < detected + 0.1
        heard = done["heard"]
        said, generated = words(heard), words(done["reply"])
        assert said and generated[: len(said)] == said and len(said) < len(generated)
        # the interrupting speech is the next user turn; the history keeps only the heard part
        nxt = vc.stream_silence_until(lambda m: m["type"] == "transcript" and m["turn"] > 1 and m["final"])
        # (Whisper tiny.en heard "stop" as "start" once, on a loaded machine: two of its words suffice)
        assert len({"please", "stop", "talking", "moment"} & set(words(nxt["text"]))) >= 2, nxt["text"]
        vc.wait_for("reply_delta", turn=nxt["turn"])  # answered: the words are in the history
        history = session_of(server).history
        assert history == [{"role": "user", "content": "count for me"}, {"role": "assistant", "content": heard},
                           {"role": "user", "content": nxt["text"]}]
    deadline = time.monotonic() + 5
    while counter(server, "domino_requests_total", api="voice", finish_reason="cancelled") <= cancelled:
        assert time.monotonic() < deadline, "the interrupted generation was not cancelled"
        time.sleep(0.05)


def test_a_backchannel_does_not_interrupt(server, voice, say):
    voice.max_reply_tokens = 12  # about four lines: a reply that ends during the test
    with VoiceClient(url(server), sample_rate=RATE) as vc:
        vc.send({"type": "text", "text": "tell me"})
        playing(vc, 1.0)
        vc.stream(say("Yeah."))
        done = vc.stream_silence_until("turn_done", turn=1)
        assert done["outcome"] == "done" and done["heard"] == done["reply"].strip()
        assert vc.of("vad", event="speech_start")  # it was heard, as speech...
        assert not vc.of("audio_end", interrupted=True)  # ...and not taken as a barge-in
        assert len(vc.of("turn_done")) == 1 and session_of(server).history[-1]["role"] == "assistant"


# ---- bad input ----------------------------------------------------------------------------------
def test_bad_frames_get_errors_and_lose_nothing(server, say):
    with connect(url(server), max_size=None) as ws:
        ws.send(np.zeros(320, np.int16).tobytes())
        assert json.loads(ws.recv(10))["code"] == "not_started"
        for bad in ({"type": "start", "sample_rate": 96000}, {"type": "start", "sample_rate": 4000},
                    {"type": "start", "sample_rate": "16000"}, {"type": "start", "tts": "coqui"},
                    {"type": "start", "voice": "../../etc/passwd"}, {"type": "start", "method": "magic"}):
            ws.send(json.dumps(bad))
            m = json.loads(ws.recv(10))
            assert m["type"] == "error" and m["code"] == "invalid_request", (bad, m)
        ws.send("{not json")
        assert json.loads(ws.recv(10))["code"] == "bad_json"
        ws.send(json.dumps({"type": "dance"}))
        assert json.loads(ws.recv(10))["code"] == "unknown_type"
    with VoiceClient(url(server), sample_rate=22050) as vc:  # resampled to 16 kHz by the server
        assert vc.ready["sample_rate"] == 22050
        rng = np.random.default_rng(0)
        vc.send(b"\x01\x02\x03")  # odd length
        vc.send(b"\0" * (server.app.state.voice.cfg.max_frame_bytes + 2))
        vc.send(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())  # random bytes
        vc.send(wav_bytes(say("What time is it?"), RATE))  # a WAV file, header and all
        vc.send(say("What time is it?", rate=22050).astype(">i2").tobytes())  # big-endian
        vc.stream(say("What time is it?", rate=22050))  # the session goes on
        done = vc.stream_silence_until("turn_done")
        assert {"what", "time"} <= set(words(done["transcript"]))
        assert [m["code"] for m in vc.of("error")] == ["bad_audio", "frame_too_large"] + ["not_pcm16"] * 3
        noise, wav, swapped = (m["message"] for m in vc.of("error", code="not_pcm16"))
        assert "noise" in noise and "WAV" in wav and "big-endian" in swapped


def test_long_silence_and_idle_close(server, voice):
    with VoiceClient(url(server), sample_rate=RATE) as vc:
        vc.stream(np.zeros(RATE * 60, np.int16), realtime=False)  # a minute of silence, at once
        session = session_of(server)
        deadline = time.monotonic() + 30
        while session.stream_s < 60 - 0.01:
            assert time.monotonic() < deadline, "the server did not take the audio"
            time.sleep(0.05)
        assert len(session._chunks) < 50  # what it keeps is a fraction of a second
        assert not vc.of("vad") and not vc.of("error")
    voice.max_session_idle_s = 1.0
    with VoiceClient(url(server), sample_rate=RATE) as vc:
        vc.stream(np.zeros(RATE // 5, np.int16))  # a moment of an open microphone in a silent room
        m = vc.wait_for("error", code="idle_timeout", timeout=15)
        assert "closed" in m["message"]
        deadline = time.monotonic() + 5
        while vc.closed is None:
            assert time.monotonic() < deadline, "the server did not close the idle session"
            time.sleep(0.05)
    assert not server.app.state.voice.connections


def _raw_ws(port: int, path: str = "/v1/voice") -> socket.socket:
    """A WebSocket client that reads nothing after the handshake (tiny receive buffer)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    assert b"101" in s.recv(4096).split(b"\r\n")[0]
    return s


def _send_text(s: socket.socket, text: str) -> None:
    data = text.encode()
    mask = b"\1\2\3\4"
    s.sendall(bytes([0x81, 0x80 | len(data)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))


def test_a_client_that_never_reads_is_dropped_and_the_server_goes_on(server, voice):
    voice.max_reply_tokens = 400
    voice.send_timeout_s = 1.0
    dropped = counter(server, "domino_request_errors_total", api="voice", code="client_not_reading")
    s = _raw_ws(server.port)
    try:
        _send_text(s, json.dumps({"type": "start", "sample_rate": RATE}))
        _send_text(s, json.dumps({"type": "text", "text": "talk for a long time"}))
        deadline = time.monotonic() + 60
        while counter(server, "domino_request_errors_total", api="voice", code="client_not_reading") <= dropped:
            assert time.monotonic() < deadline, "the stuck client was never dropped"
            time.sleep(0.2)
        deadline = time.monotonic() + 10
        while server.app.state.voice.connections or server.wait_idle(0.1)["active"]:
            assert time.monotonic() < deadline, "the session or its generation outlived the drop"
            time.sleep(0.1)
        with VoiceClient(url(server), sample_rate=RATE) as vc:  # the server goes on
            vc.send({"type": "ping", "id": "p"})
            assert vc.wait_for("pong", timeout=10)["id"] == "p"
    finally:
        s.close()


def test_disconnect_mid_reply_cancels_generation_and_frees_the_slot(server, voice):
    voice.max_reply_tokens = 400
    cancelled = counter(server, "domino_requests_total", api="voice", finish_reason="cancelled")
    vc = VoiceClient(url(server), sample_rate=RATE)
    vc.send({"type": "text", "text": "go on and on"})
    vc.wait_for("audio_start", timeout=60)
    vc.close()
    deadline = time.monotonic() + 5
    while counter(server, "domino_requests_total", api="voice", finish_reason="cancelled") <= cancelled:
        assert time.monotonic() < deadline, "the generation went on after the client left"
        time.sleep(0.05)
    assert server.wait_idle(5)["active"] == 0 and not server.app.state.voice.connections


def test_two_sessions_do_not_hear_each_other(server, say):
    import threading

    phrases = {"a": "Please open the garden window.", "b": "How many apples are in the basket?"}
    clients = {k: VoiceClient(url(server), sample_rate=RATE) for k in phrases}
    try:
        done = {}

        def talk(k):
            clients[k].stream(say(phrases[k]))
            done[k] = clients[k].stream_silence_until("turn_done")

        threads = [threading.Thread(target=talk, args=(k,)) for k in phrases]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        # each heard its own speech (tiny.en may mishear one word, e.g. "garden" as "guardian") ...
        assert {"garden", "window"} & set(words(done["a"]["transcript"]))
        assert {"apples", "basket"} & set(words(done["b"]["transcript"]))
        # ... and none of the other's
        assert not {"apples", "basket"} & set(words(done["a"]["transcript"]))
        assert not {"garden", "window"} & set(words(done["b"]["transcript"]))
        for k in phrases:  # each heard its own speech once: one utterance, one turn
            assert len(clients[k].of("turn_done")) == 1 and len(clients[k].of("vad", event="speech_start")) == 1
    finally:
        for c in clients.values():
            c.close()


# ---- admission ----------------------------------------------------------------------------------
def test_key_origin_and_session_cap():
    srv = serve(api_key="sekret")
    try:
        with pytest.raises(InvalidStatus) as e:
            connect(url(srv))
        assert e.value.response.status_code == 401
        with pytest.raises(InvalidStatus) as e:
            connect(url(srv), additional_headers={"Authorization": "Bearer sekret"}, origin="https://evil.example")
        assert e.value.response.status_code == 403
        srv.app.state.voice.cfg.max_sessions = 1
        with VoiceClient(url(srv) + "?token=sekret", sample_rate=RATE, origin="http://localhost:3000") as vc:
            assert vc.ready["type"] == "ready"
            with connect(url(srv), additional_headers={"Authorization": "Bearer sekret"}) as ws:
                m = json.loads(ws.recv(10))
                assert m["code"] == "overloaded"
                with pytest.raises(Exception):
                    ws.recv(10)
                assert ws.close_code == 1013
            vc.send({"type": "config", "tts": "espeak", "method": "ar"})
            m = vc.wait_for(lambda m: m["type"] == "ready" and m["tts"] == "espeak", timeout=30)
            assert m["method"] == "ar" and m["audio_sample_rate"] > 0
    finally:
        srv.stop()
