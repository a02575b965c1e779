"""`/v1/voice`: the voice agent over a WebSocket, one conversation per connection (docs/voice-api.md).

Client -> server: binary frames of PCM16 mono audio at the rate announced by `start`, and JSON
`start`, `config`, `text`, `playback`, `interrupt`, `end`, `ping`. Server -> client: JSON `ready`,
`state`, `vad`, `transcript`, `reply_delta`, `audio_start`, binary PCM16 reply audio, `audio_end`,
`turn_done`, `error`, `pong`. The turn-taking itself is `agents.voice.session.VoiceSession`.

Admission is /v1/ws's (Host, Origin, key), plus a cap on open sessions (`overloaded`). A bad frame
gets an `error` and changes nothing. Output goes through a bounded queue, written by one task: a
client that stops reading is dropped (its generation cancelled) and nothing else waits on it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import socket
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.websockets import WebSocket

from agents.voice.audio import StreamResampler, pcm16_to_float
from agents.voice.config import VoiceConfig
from agents.voice.parts import SAMPLE_RATE, VoiceError
from agents.voice.session import VoiceSession, load_parts

from .backend import Backend, RequestError
from .config import ServerConfig
from .edge import decode_message, encode_json, validation_message
from .metrics import Metrics
from .scheduler import SIDE_WORK
from .security import admit_websocket

log = logging.getLogger("domino.server")

# Output messages a client may leave unread. Audio is paced (a few frames ahead), so only a
# client that stops reading fills this: it is then dropped.
OUT_QUEUE = 256
# What the kernel may buffer for a voice socket. Paced audio keeps a reading client's share near
# empty (a few KB in flight), so a full buffer means a client that stopped reading, and the writer's
# send timeout then notices within seconds instead of after megabytes of autotuned buffer.
SOCKET_SEND_BUFFER = 64 << 10
CLOSE_FLUSH_S = 2.0  # at the end, how long the last messages may take to go out
CLIENT_TTS = ("piper", "kokoro", "espeak")  # coqui loads model files from a path: server-side only
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # a voice *name*: clients never pass file paths
# Containers and codecs people send by mistake instead of raw PCM16: each signature is long enough
# (or checked whole, for JSON) that real audio practically never starts with it.
_NOT_PCM = ((re.compile(rb"RIFF....WAVE", re.S), "a WAV file (send its samples without the header)"),
            (re.compile(rb"OggS\x00"), "Ogg audio"), (re.compile(rb"\x1aE\xdf\xa3"), "WebM/Matroska (MediaRecorder) audio"),
            (re.compile(rb"ID3[\x02-\x04]\x00"), "MP3 audio"), (re.compile(rb"fLaC"), "FLAC audio"),
            (re.compile(rb"PK\x03\x04"), "a ZIP file"))


class _Msg(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class _Settings(_Msg):
    asr: str | None = None
    tts: str | None = None
    voice: str | None = Field(None, max_length=64)
    method: str | None = Field(None, max_length=64)
    partials: bool | None = None  # partial transcripts while the user speaks (one ASR run per second)


class Start(_Settings):
    type: Literal["start"]
    sample_rate: int = SAMPLE_RATE


class Config(_Settings):
    type: Literal["config"]


class Text(_Msg):
    type: Literal["text"]
    text: str = Field(min_length=1, max_length=4000)


class Playback(_Msg):
    type: Literal["playback"]
    turn: int
    played_ms: float = Field(ge=0)


class Interrupt(_Msg):
    type: Literal["interrupt"]


class End(_Msg):
    type: Literal["end"]


class Ping(_Msg):
    type: Literal["ping"]
    id: str | None = Field(None, max_length=128)


ClientMessage = TypeAdapter(Annotated[Start | Config | Text | Playback | Interrupt | End | Ping,
                                      Field(discriminator="type")])
TYPES = ("start", "config", "text", "playback", "interrupt", "end", "ping")


class Refused(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def server_transport(ws: WebSocket):
    """The asyncio transport under a WebSocket where the server exposes it (uvicorn: the protocol
    behind the ASGI `receive`, which no middleware wraps), else None."""
    return getattr(getattr(ws._receive, "__self__", None), "transport", None)


def cap_send_buffer(ws: WebSocket, size: int) -> None:
    """SO_SNDBUF for this connection (where reachable; else the kernel's default, and a client that
    stops reading is noticed later)."""
    transport = server_transport(ws)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def not_pcm16(data: bytes) -> str | None:
    """What the frame is if it is clearly not PCM16 little-endian audio, else None.

    Besides known file headers: full-scale noise whose neighbouring samples are uncorrelated is
    what random bytes, compressed audio or big-endian samples look like; any real sound, however
    loud, has strongly correlated neighbours at these rates.
    """
    for magic, what in _NOT_PCM:
        if magic.match(data):
            return what
    if data[:1] == b"{" and data.rstrip()[-1:] == b"}":
        try:
            json.loads(data)
            return "JSON (send it as a text frame)"
        except ValueError:
            pass
    x = np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2").astype(np.float64)
    if len(x) < 256 or np.mean(np.abs(x)) < 8000:
        return None
    x -= x.mean()
    corr = float(np.dot(x[1:], x[:-1]) / (np.dot(x, x) + 1e-9))
    return "full-scale noise (random bytes, a compressed format or big-endian samples?)" if abs(corr) < 0.3 else None


class VoiceConnection:
    """One WebSocket = one VoiceSession; it is also the session's Sink."""

    _ids = itertools.count(1)

    def __init__(self, ws: WebSocket, backend: Backend, cfg: ServerConfig, vcfg: VoiceConfig, metrics: Metrics):
        self.ws, self.backend, self.cfg, self.vcfg, self.metrics = ws, backend, cfg, vcfg, metrics
        self.id = next(self._ids)
        self.out: asyncio.Queue = asyncio.Queue(maxsize=OUT_QUEUE)
        self.session: VoiceSession | None = None
        self.resampler: StreamResampler | None = None
        self.rate = SAMPLE_RATE  # of the client's audio, from `start`
        self.dropped: str | None = None
        self.end_reason = "closed"  # "end" when the client said so
        self._audio_error: str | None = None  # last bad-audio message: repeats are not reported per frame
        self._reader: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    # ---- Sink (called by the session; never blocks) ---------------------------------------------
    def event(self, msg: dict) -> None:
        self._put(encode_json(msg))

    def audio(self, pcm16: bytes) -> None:
        self._put(pcm16)

    def _put(self, item: str | bytes) -> None:
        if self.dropped:
            return
        try:
            self.out.put_nowait(item)
        except asyncio.QueueFull:
            self._drop("client_not_reading")

    def _drop(self, reason: str) -> None:
        if not self.dropped:
            self.dropped = reason
            self.metrics.error("voice", reason)
            log.info("voice %d dropped: %s", self.id, reason)
            if self._reader is not None:
                self._reader.cancel()

    def fail(self, code: str, message: str) -> None:
        self.metrics.error("voice", code)
        self.event({"type": "error", "code": code, "message": message})

    # ---- the connection ---------------------------------------------------------------------------
    async def run(self) -> None:
        writer = asyncio.create_task(self._write())
        self._reader = asyncio.create_task(self._read())
        try:
            await asyncio.wait({self._reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._reader.cancel()
            if self.session is not None:  # cancels generation and TTS; the last turn_done is queued
                await self.session.close(self.dropped or self.end_reason)
            for t in self._tasks:
                t.cancel()
            if self.dropped:
                writer.cancel()  # it may be stuck on a client that reads nothing: drop the socket too,
                transport = server_transport(self.ws)  # with what it still buffers for that client
                if transport is not None:
                    transport.abort()
            else:
                self._put(b"")  # b"": the writer's stop mark, after everything queued
                try:
                    await asyncio.wait_for(writer, CLOSE_FLUSH_S)
                    await asyncio.wait_for(self.ws.close(1000), CLOSE_FLUSH_S)
                except Exception:  # noqa: BLE001 - a timeout, or the peer is gone already
                    writer.cancel()

    async def _write(self) -> None:
        while (item := await self.out.get()) != b"":
            send = self.ws.send_bytes(item) if isinstance(item, bytes) else self.ws.send_text(item)
            try:
                await asyncio.wait_for(send, self.vcfg.send_timeout_s)
            except asyncio.TimeoutError:
                return self._drop("client_not_reading")
            except Exception:  # noqa: BLE001 - the peer went away: nothing more can be sent
                self.dropped = self.dropped or "disconnected"
                return

    async def _read(self) -> None:
        while True:
            msg = await self.ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            try:
                if msg.get("bytes") is not None:
                    await self.on_audio(msg["bytes"])
                elif await self.on_text(msg.get("text") or "") == "end":
                    self.end_reason = "end"
                    return
            except Refused as e:
                self.fail(e.code, e.message)
            except Exception:  # noqa: BLE001 - a bug costs this frame an `internal` error, not the session
                log.exception("voice %d frame failed", self.id)
                self.fail("internal", "internal server error")

    # ---- audio frames ---------------------------------------------------------------------------
    async def on_audio(self, data: bytes) -> None:
        if self.session is None:
            raise Refused("not_started", "send a `start` message with the sample rate before any audio")
        code, what = None, None
        if len(data) > self.vcfg.max_frame_bytes:
            code, what = "frame_too_large", f"an audio frame may have at most {self.vcfg.max_frame_bytes} bytes"
        elif len(data) % 2:
            code, what = "bad_audio", "PCM16 frames have an even number of bytes"
        elif kind := not_pcm16(data):
            code, what = "not_pcm16", f"this frame is not PCM16 little-endian mono audio: it looks like {kind}"
        if code is not None:
            if what != self._audio_error:  # one error per run of alike bad frames, not one per frame
                self._audio_error = what
                self.fail(code, what + "; the frame was dropped")
            return
        self._audio_error = None
        await self.session.feed(self.resampler.feed(pcm16_to_float(data)))

    # ---- JSON messages --------------------------------------------------------------------------
    async def on_text(self, text: str) -> str | None:
        try:
            obj = decode_message(text, self.cfg.max_message_bytes)
        except RequestError as e:
            raise Refused(e.code, e.message) from None
        if obj.get("type") not in TYPES:
            raise Refused("unknown_type", f"`type` must be one of {', '.join(TYPES)}")
        try:
            m = ClientMessage.validate_python(obj)
        except ValidationError as e:
            raise Refused("invalid_request", validation_message(e, skip=1)) from None
        if isinstance(m, Ping):
            self.event({"type": "pong", "id": m.id})
        elif isinstance(m, Start):
            await self.start(m)
        elif self.session is None:
            raise Refused("not_started", f"send `start` before `{m.type}`")
        elif isinstance(m, Config):
            await self.configure(m)
        elif isinstance(m, Text):
            await self.session.say(m.text)
        elif isinstance(m, Playback):
            self.session.playback(m.turn, m.played_ms)
        elif isinstance(m, Interrupt):
            self.session.interrupt()
        elif isinstance(m, End):
            return "end"
        return None

    def _settings(self, m: _Settings, base: VoiceConfig) -> VoiceConfig:
        """The session's VoiceConfig: the server's, with what the client may choose."""
        if m.tts is not None and m.tts not in CLIENT_TTS and m.tts != base.tts:
            raise Refused("invalid_request", f"tts must be one of {', '.join(CLIENT_TTS)}")
        if m.voice is not None and not _NAME.fullmatch(m.voice):
            raise Refused("invalid_request", "voice must be a voice name (letters, digits, _ . -), not a path")
        methods = self.backend.health().get("methods")
        if m.method is not None and methods and m.method not in methods:
            raise Refused("invalid_request", f"unknown method {m.method!r}; this server has {', '.join(methods)}")
        update = {k: v for k, v in (("asr", m.asr), ("tts", m.tts), ("voice", m.voice), ("method", m.method))
                  if v is not None}
        if m.tts is not None and m.tts != base.tts and m.voice is None:
            update["voice"] = None  # another engine's voice name means nothing to this one
        try:
            return VoiceConfig(**{**base.model_dump(), **update})
        except ValidationError as e:
            raise Refused("invalid_request", validation_message(e)) from None

    async def _load(self, cfg: VoiceConfig):
        try:
            return await asyncio.to_thread(load_parts, cfg)
        except VoiceError as e:
            raise Refused("voice_unavailable", str(e)) from None

    async def start(self, m: Start) -> None:
        if self.session is not None:
            raise Refused("already_started", "this session has started; open a new connection for another")
        try:
            rate = self.vcfg.check_sample_rate(m.sample_rate)
        except ValueError as e:
            raise Refused("invalid_request", str(e)) from None
        cfg = self._settings(m, self.vcfg)
        vad, asr, tts = await self._load(cfg)
        self.session = VoiceSession(self.backend, cfg, self, vad=vad, asr=asr, tts=tts,
                                    method=cfg.method,
                                    offload=SIDE_WORK.run,  # the engine knows when ASR/TTS use the CPU
                                    on_turn=self._on_turn, on_result=lambda r: self.metrics.observe(r, "voice", "chat"),
                                    name=f"voice {self.id}")
        self.session.partials = bool(m.partials)
        self.rate, self.resampler = rate, StreamResampler(rate, SAMPLE_RATE)
        self._ready()
        self._spawn(self.session.warm_up())
        self._spawn(self._end_when_closed(self.session))

    async def configure(self, m: Config) -> None:
        s = self.session
        cfg = self._settings(m, s.cfg)
        _, s.asr, s.tts = await self._load(cfg)  # the next turn uses them; a reply in progress keeps its voice
        s.cfg = cfg
        s.method = cfg.method
        s.partials = s.partials if m.partials is None else m.partials
        self._ready()

    def _ready(self) -> None:
        s = self.session
        self.event({"type": "ready", "session": self.id, "sample_rate": self.rate, "audio_sample_rate": s.tts.sample_rate,
                    "asr": s.cfg.asr, "tts": s.cfg.tts, "voice": s.cfg.voice,
                    "method": s.method or self.backend.default_method, "partials": s.partials})

    async def _end_when_closed(self, session: VoiceSession) -> None:
        await session.closed.wait()  # the session closed itself (idle): so does the connection
        if self._reader is not None:
            self._reader.cancel()

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_turn(self, done: dict) -> None:
        self.metrics.voice_turns.labels(done["outcome"]).inc()
        for name, ms in done["timings"].items():
            if ms is not None:
                self.metrics.voice_stage.labels(name.removesuffix("_ms")).observe(ms / 1000)


class VoiceSurface:
    def __init__(self, cfg: VoiceConfig):
        self.cfg = cfg  # each session starts from a copy: changes apply to later sessions
        self.connections: set[VoiceConnection] = set()

    async def endpoint(self, websocket: WebSocket) -> None:
        st = websocket.app.state
        cfg: ServerConfig = st.cfg
        if not await admit_websocket(websocket, "voice"):
            return
        await websocket.accept()
        if len(self.connections) >= self.cfg.max_sessions:  # ASR and TTS run per session on the server's CPU
            st.metrics.error("voice", "overloaded")
            await websocket.send_text(encode_json({"type": "error", "code": "overloaded", "message":
                                                   f"{len(self.connections)} voice sessions are open; try again later"}))
            return await websocket.close(1013)
        cap_send_buffer(websocket, SOCKET_SEND_BUFFER)
        conn = VoiceConnection(websocket, st.backend, cfg, self.cfg, st.metrics)
        self.connections.add(conn)
        st.metrics.voice_sessions.inc()
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            st.metrics.voice_sessions.dec()


def attach(app, backend: Backend, cfg: ServerConfig) -> None:
    """`/v1/voice`: the voice agent (models load on the first session, then stay loaded)."""
    logging.getLogger("faster_whisper").setLevel(logging.WARNING)  # it logs every utterance at info
    app.state.voice = VoiceSurface(VoiceConfig())
    app.add_api_websocket_route("/v1/voice", app.state.voice.endpoint)
