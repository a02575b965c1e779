// Voice tab client: talks to the server's /v1/voice WebSocket straight from the browser (protocol:
// docs/voice-api.md). Microphone -> AudioWorklet (resampled to 16 kHz PCM16, 20 ms frames) -> socket;
// reply audio (PCM16) -> WebAudio, scheduled gap-free. Playback pauses the moment the server reports
// speech (barge-in; it resumes if that was only a backchannel) and is dropped when the reply is
// interrupted. The play position goes back as `playback` acks, so the server knows what was heard.
// Called by the gr.HTML component's js_on_load as dominoVoice(element, options). Test hooks: the
// .dv element counts data-frames-sent, data-audio-chunks and data-turns.
function dominoVoice(root, opts) {
  const FRAME = 320; // samples per frame at 16 kHz = 20 ms
  const RATE = 16000;
  const PTT_TAIL_MS = 700; // silence sent after a push-to-talk release: the server's VAD ends the turn as after a pause
  const ACK_MS = 200; // how often the play position is reported while a reply plays
  const PREROLL_FRAMES = 150; // the last 3 s of speech before the server is ready are sent once it is
  const STAGES = [ // turn_done.timings -> strip segments (the four add up to voice-to-voice)
    ["transcript_ms", "end of speech → transcript (silence wait + ASR)"], ["ttft_ms", "LLM first token"],
    ["first_sentence_ms", "first sentence"], ["first_audio_ms", "first audio (TTS)"]];
  const $ = (sel) => root.querySelector(sel);
  root.innerHTML = `
    <div class="dv">
      <div class="dv-bar">
        <button class="dv-start primary" type="button">Start conversation</button>
        <button class="dv-ptt" type="button" disabled title="Hold (or hold Space) while you speak">Hold to talk</button>
        <button class="dv-hush" type="button" disabled title="Stop the assistant's reply">Stop reply</button>
        <label class="dv-mode"><input type="checkbox" class="dv-ptt-mode"> push-to-talk</label>
        <span class="dv-state">idle</span>
        <span class="dv-meter" title="microphone level"><i></i></span>
      </div>
      <div class="dv-msg" role="status"></div>
      <div class="dv-log" aria-live="polite"></div>
      <form class="dv-type"><input type="text" placeholder="…or type a message; the reply is still spoken" aria-label="typed message">
        <button type="submit">Send</button></form>
      <div class="dv-lat-title">Latency per turn (ms): end of speech → transcript · LLM first token · first sentence · first audio = voice-to-voice</div>
      <div class="dv-lat"></div>
    </div>`;
  const box = $(".dv"), count = (k) => { box.dataset[k] = String(Number(box.dataset[k] || 0) + 1); };
  const startBtn = $(".dv-start"), pttBtn = $(".dv-ptt"), hushBtn = $(".dv-hush"), pttMode = $(".dv-ptt-mode");
  const stateEl = $(".dv-state"), meter = $(".dv-meter i"), msg = $(".dv-msg"), log = $(".dv-log"), lat = $(".dv-lat");
  let ws = null, cap = null, play = null, ready = false, pttHeld = false, running = false, ackTimer = null;
  let early = []; // frames captured while the speech models load
  const turns = new Map(); // turn id -> {user, bot} bubbles
  const say = (html, kind = "") => { msg.className = "dv-msg " + kind; msg.innerHTML = html; };
  const setState = (s) => { stateEl.textContent = s.replace("_", " "); stateEl.dataset.state = s; };
  const progress = '<div class="dm-progress"><div></div></div>';

  if (!opts.available) {
    say(opts.reason, "warn");
    [startBtn, $(".dv-type input"), $(".dv-type button")].forEach((el) => { el.disabled = true; });
    return;
  }

  function bubble(turn, who) {
    let t = turns.get(turn);
    if (!t) { t = {}; turns.set(turn, t); }
    if (!t[who]) {
      t[who] = document.createElement("div");
      t[who].className = "dv-b dv-" + who;
      log.appendChild(t[who]);
    }
    return t[who];
  }
  const scroll = () => { log.scrollTop = log.scrollHeight; };

  // ---- playback: its own AudioContext, so pausing it never stops the microphone
  function player() {
    const ctx = new AudioContext();
    let next = 0, rate = 22050, turn = null, sources = [];
    return {
      setTurn(t, r) { turn = t; rate = r || rate; },
      push(buf) {
        const pcm = new Int16Array(buf), f = new Float32Array(pcm.length);
        for (let i = 0; i < pcm.length; i++) f[i] = pcm[i] / 32768;
        const ab = ctx.createBuffer(1, f.length, rate);
        ab.copyToChannel(f, 0);
        const src = ctx.createBufferSource();
        src.buffer = ab; src.connect(ctx.destination);
        next = Math.max(next, ctx.currentTime + 0.03);
        src.start(next);
        sources.push({src, turn, start: next, dur: ab.duration});
        next += ab.duration;
        count("audioChunks");
      },
      // ms of `t`'s reply played so far (the context's clock stops while it is suspended)
      played(t) {
        const now = ctx.currentTime;
        return 1000 * sources.filter((s) => s.turn === t).reduce((a, s) => a + Math.min(Math.max(now - s.start, 0), s.dur), 0);
      },
      current() { return turn; },
      pause() { if (ctx.state === "running") ctx.suspend(); },
      resume() { if (ctx.state === "suspended") ctx.resume(); },
      flush() { sources.forEach((s) => { try { s.src.stop(); } catch (e) {} }); sources = []; next = 0; ctx.resume(); },
      forget(t) { sources = sources.filter((s) => s.turn !== t || ctx.currentTime < s.start + s.dur); },
      playing() { return ctx.currentTime < next; },
      unlock() { return ctx.resume(); },
    };
  }

  // ---- capture: an AudioWorklet (loaded from a Blob URL: no file to fetch) resamples to 16 kHz PCM16
  const WORKLET = `
    class Capture extends AudioWorkletProcessor {
      constructor() { super(); this.step = sampleRate / ${RATE}; this.pos = 0; this.out = new Int16Array(${FRAME}); this.n = 0; this.sq = 0; }
      process(inputs) {
        const x = inputs[0] && inputs[0][0];
        if (!x) return true;
        // linear interpolation at 16 kHz positions (the browser's noise suppression already band-limits speech)
        while (this.pos < x.length - 1) {
          const i = Math.floor(this.pos), a = this.pos - i, v = x[i] * (1 - a) + x[i + 1] * a;
          this.out[this.n++] = Math.max(-1, Math.min(1, v)) * 32767;
          this.sq += v * v;
          if (this.n === ${FRAME}) {
            this.port.postMessage({pcm: this.out.buffer, rms: Math.sqrt(this.sq / ${FRAME})}, [this.out.buffer]);
            this.out = new Int16Array(${FRAME}); this.n = 0; this.sq = 0;
          }
          this.pos += this.step;
        }
        this.pos -= x.length;
        return true;
      }
    }
    registerProcessor("dm-capture", Capture);`;

  async function microphone() {
    if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw Object.assign(new Error("insecure"), {name: "InsecureContext"});
    }
    const stream = await navigator.mediaDevices.getUserMedia({audio: {
      echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1}});
    const ctx = new AudioContext();
    const url = URL.createObjectURL(new Blob([WORKLET], {type: "application/javascript"}));
    await ctx.audioWorklet.addModule(url);
    URL.revokeObjectURL(url);
    const node = new AudioWorkletNode(ctx, "dm-capture");
    const mute = ctx.createGain(); mute.gain.value = 0; // keeps the graph pulled without playing the mic back
    ctx.createMediaStreamSource(stream).connect(node).connect(mute).connect(ctx.destination);
    node.port.onmessage = (e) => {
      meter.style.width = Math.min(100, e.data.rms * 400) + "%";
      if (pttMode.checked && !pttHeld) return;
      if (!ready) { early.push(e.data.pcm); if (early.length > PREROLL_FRAMES) early.shift(); return; }
      send(e.data.pcm);
    };
    return {stop() { stream.getTracks().forEach((t) => t.stop()); ctx.close(); }};
  }

  function send(pcm) { if (ws && ws.readyState === 1) { ws.send(pcm); count("framesSent"); } }

  function micError(e) {
    const here = location.protocol + "//" + location.host;
    if (e.name === "InsecureContext") {
      return `The browser allows the microphone only on <b>https://</b> pages or on <b>http://localhost</b>, and this page is <code>${here}</code>. ` +
        `Open <code>http://localhost:${location.port || 80}/</code> on the machine that runs Domino (an SSH tunnel works: ` +
        `<code>ssh -L ${location.port || 80}:localhost:${location.port || 80} host</code>), or serve it behind https. You can still type below: replies are spoken.`;
    }
    if (e.name === "NotAllowedError" || e.name === "SecurityError") {
      return "The microphone is blocked for this page. Allow it (the icon in the address bar), then press Start again. Meanwhile you can type below: replies are spoken.";
    }
    if (e.name === "NotFoundError") return "No microphone found. Plug one in and press Start again, or type below.";
    return "Could not open the microphone (" + (e.message || e.name) + "). You can type below: replies are spoken.";
  }

  function connect() {
    return new Promise((resolve, reject) => {
      const proto = location.protocol === "https:" ? "wss://" : "ws://";
      const sock = new WebSocket(proto + location.host + opts.path);
      sock.binaryType = "arraybuffer";
      sock.onopen = () => { sock.send(JSON.stringify({type: "start", sample_rate: RATE, partials: true})); resolve(sock); };
      sock.onerror = () => reject(new Error("could not connect to " + opts.path));
      sock.onclose = (e) => {
        if (ws !== sock) return;
        stop(false);
        if (e.code !== 1000 || !msg.classList.contains("warn")) say("The voice connection closed" + (e.reason ? " (" + e.reason + ")" : "") + ". Press Start to talk again.", "warn");
      };
      sock.onmessage = (e) => (typeof e.data === "string" ? onEvent(JSON.parse(e.data)) : play.push(e.data));
    });
  }

  function onEvent(m) {
    switch (m.type) {
      case "ready":
        ready = true;
        early.forEach(send); // whoever spoke while the models loaded is heard too
        early = [];
        say(cap ? `Listening (speech ${m.asr}, voice ${m.tts}, ${m.method}). ` +
              (pttMode.checked ? "Hold the button (or Space) while you speak." : "Speak any time; talk over a reply to interrupt it.")
            : `Connected (voice ${m.tts}, ${m.method}): type below.`, "ok");
        break;
      case "state": setState(m.state); break;
      case "vad":
        if (m.event === "speech_start") { play.pause(); ack(); } // stop talking over the user at once
        else play.resume(); // speech ended without taking the turn (a backchannel): the reply goes on
        break;
      case "transcript": {
        const b = bubble(m.turn, "user");
        b.textContent = m.text; b.classList.toggle("partial", !m.final); scroll();
        break;
      }
      case "reply_delta": bubble(m.turn, "bot").textContent += m.text; scroll(); break;
      case "audio_start": play.setTurn(m.turn, m.sample_rate); play.resume(); break;
      case "audio_end": if (m.interrupted) play.flush(); break;
      case "turn_done": turnDone(m); break;
      case "error":
        say("⚠️ " + (m.message || m.code) + (m.code === "voice_unavailable" ? " — install the voice parts with <code>bash setup.sh</code>." : ""), "warn");
        break;
    }
  }

  function ack() {
    const t = play && play.current();
    if (t != null && ws && ws.readyState === 1) ws.send(JSON.stringify({type: "playback", turn: t, played_ms: play.played(t)}));
  }

  function turnDone(m) {
    if (m.outcome === "interrupted") play.flush();
    play.forget(m.turn);
    const b = turns.get(m.turn);
    if (b && b.bot && m.outcome === "interrupted") { // show what was heard; the rest struck through
      const heard = m.heard || "", rest = document.createElement("span");
      rest.className = "dv-unheard"; rest.textContent = (m.reply || "").slice(heard.length);
      b.bot.textContent = heard; b.bot.append(rest);
    }
    const t = m.timings || {};
    if (t.voice_to_voice_ms == null && t.ttft_ms == null) return;
    const total = STAGES.reduce((s, [k]) => s + (t[k] || 0), 0) || 1;
    const segs = STAGES.map(([k, name], i) => t[k] == null ? "" :
      `<span class="dv-seg s${i}" style="flex:${Math.max(t[k], 1) / total}" title="${name}: ${Math.round(t[k])} ms">${Math.round(t[k])}</span>`).join("");
    const llm = m.llm || {};
    const extra = [llm.method, llm.tau ? "τ " + llm.tau.toFixed(2) : "", llm.tokens_per_s ? llm.tokens_per_s + " tok/s" : ""]
      .filter(Boolean).join(" · ");
    const row = document.createElement("div");
    row.className = "dv-lat-row";
    row.innerHTML = `<span class="dv-lat-turn">#${m.turn}</span><span class="dv-strip">${segs}</span>` +
      `<span class="dv-v2v">${t.voice_to_voice_ms == null ? "typed" : Math.round(t.voice_to_voice_ms) + " ms"}</span>` +
      `<span class="dv-llm">${extra}</span>`;
    lat.prepend(row);
    count("turns");
  }

  async function start() {
    startBtn.disabled = true;
    say("Connecting… the first conversation loads the speech models, which can take a minute." + progress, "info");
    play = play || player();
    await play.unlock(); // inside the click: browsers only start audio after a user gesture
    try { cap = await microphone(); } catch (e) { cap = null; say(micError(e), "warn"); }
    try {
      ws = await connect();
    } catch (e) {
      say("⚠️ " + e.message, "warn"); startBtn.disabled = false; if (cap) cap.stop(); cap = null; return;
    }
    running = true;
    pttBtn.disabled = !cap; hushBtn.disabled = false;
    startBtn.textContent = "End conversation"; startBtn.disabled = false;
    if (cap) say("Connected. Loading the speech models…" + progress, "info");
    ackTimer = setInterval(() => { if (play.playing()) ack(); }, ACK_MS);
  }

  function stop(close = true) {
    running = false; ready = false; early = []; pttHeld = false; pttBtn.disabled = true; hushBtn.disabled = true;
    clearInterval(ackTimer);
    if (cap) { cap.stop(); cap = null; }
    if (play) play.flush();
    const sock = ws; ws = null;
    if (close && sock && sock.readyState <= 1) { try { sock.send(JSON.stringify({type: "end"})); } catch (e) {} sock.close(1000); }
    meter.style.width = "0"; setState("idle");
    startBtn.textContent = "Start conversation"; startBtn.disabled = false;
  }

  function hush() { if (ws && ws.readyState === 1) ws.send(JSON.stringify({type: "interrupt"})); play.flush(); }
  function pttDown() { if (!cap || !pttMode.checked || pttHeld) return; if (play.playing()) hush(); pttHeld = true; pttBtn.classList.add("held"); }
  function pttUp() {
    if (!pttHeld) return;
    pttHeld = false; pttBtn.classList.remove("held");
    const zeros = new Int16Array(FRAME);
    for (let i = 0; i < Math.ceil(PTT_TAIL_MS / 20); i++) (ready ? send : (f) => early.push(f))(zeros.buffer.slice(0));
  }

  startBtn.addEventListener("click", () => (running ? stop() : start()));
  hushBtn.addEventListener("click", hush);
  pttBtn.addEventListener("pointerdown", pttDown);
  ["pointerup", "pointerleave"].forEach((ev) => pttBtn.addEventListener(ev, pttUp));
  document.addEventListener("keydown", (e) => {
    if (e.code === "Space" && pttMode.checked && running && e.target === document.body) { e.preventDefault(); pttDown(); }
  });
  document.addEventListener("keyup", (e) => { if (e.code === "Space" && pttHeld) pttUp(); });
  $(".dv-type").addEventListener("submit", async (e) => {
    e.preventDefault();
    const input = $(".dv-type input"), text = input.value.trim();
    if (!text) return;
    if (!running) await start();
    if (ws && ws.readyState === 1) { ws.send(JSON.stringify({type: "text", text})); input.value = ""; }
  });
}
