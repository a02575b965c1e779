// The client of Domino's WebSocket completion API (`/v1/ws`, docs/websocket-api.md).
//
// It imports nothing from `vscode`, so it runs (and is tested) under Node alone. One connection
// carries every request; the connection is re-opened with exponential back-off when it drops, and
// at once when a request needs it. A refused key (HTTP 401 at the handshake) stops the retries
// until the options change: retrying a wrong key cannot succeed.

import WebSocket from "ws";

export type ConnectionState = "connecting" | "connected" | "disconnected" | "unauthorized";

export interface ExtraFile {
  filename: string;
  text: string;
}

/** The fields of a `complete` message, less `type` and `id` (the client numbers requests). */
export interface CompleteRequest {
  prefix: string;
  suffix?: string;
  language?: string;
  filename?: string;
  extra?: ExtraFile[];
  max_tokens?: number;
  temperature?: number;
  stop?: string[];
  single_line?: boolean;
  multi_line?: boolean;
  deadline_ms?: number;
  document?: string;
  method?: string;
}

/** The engine's statistics of one request (`done.spec`); null when it never ran a round. */
export interface Spec {
  method: string;
  tau: number;
  tokens_per_s: number;
  [key: string]: unknown;
}

export interface Timings {
  queue_ms: number;
  prefill_ms: number | null;
  ttft_ms: number | null;
  total_ms: number;
}

/** A request that ended with `done`: finishReason is stop | length | cancelled | deadline | error. */
export interface Completion {
  id: string;
  text: string;
  finishReason: string;
  timings: Timings;
  usage: { prompt_tokens: number; completion_tokens: number; total_tokens: number };
  spec: Spec | null;
  /** Client-side milliseconds from `complete()` to the `done` frame. */
  elapsedMs: number;
}

/** A request that got no `done`: the server's `error` frame, or a connection that failed. */
export class RequestFailed extends Error {
  constructor(public readonly code: string, message: string) {
    super(message);
    this.name = "RequestFailed";
  }
}

export interface ClientOptions {
  url: string;
  apiKey?: string;
  /** First reconnect delay; doubled after every failed attempt up to maxBackoffMs. */
  initialBackoffMs?: number;
  maxBackoffMs?: number;
  /** How long a request waits for the connection to open before it fails with `not_connected`. */
  connectTimeoutMs?: number;
}

const DEFAULTS = { initialBackoffMs: 250, maxBackoffMs: 10_000, connectTimeoutMs: 3_000 };

interface Pending {
  resolve: (c: Completion) => void;
  reject: (e: RequestFailed) => void;
  started: number;
}

type StateListener = (state: ConnectionState, detail: string) => void;

export class DominoClient {
  private opts: Required<ClientOptions>;
  private ws: WebSocket | null = null;
  private pending = new Map<string, Pending>();
  private listeners: StateListener[] = [];
  private nextId = 0;
  private backoffMs: number;
  private retryTimer: NodeJS.Timeout | null = null;
  private disposed = false;
  private _state: ConnectionState = "disconnected";
  private _detail = "";

  constructor(options: ClientOptions) {
    this.opts = { apiKey: "", ...DEFAULTS, ...options };
    this.backoffMs = this.opts.initialBackoffMs;
  }

  get state(): ConnectionState {
    return this._state;
  }

  get detail(): string {
    return this._detail;
  }

  /** Requests sent and not yet answered with `done` or `error`. */
  get inflight(): number {
    return this.pending.size;
  }

  onState(listener: StateListener): { dispose(): void } {
    this.listeners.push(listener);
    return { dispose: () => (this.listeners = this.listeners.filter((l) => l !== listener)) };
  }

  /** Open the connection now (and keep it open). */
  connect(): void {
    if (this.disposed || this.ws) return;
    this.clearRetry();
    this.setState("connecting", this.opts.url);
    const headers: Record<string, string> = {};
    if (this.opts.apiKey) headers["Authorization"] = `Bearer ${this.opts.apiKey}`;
    const ws = new WebSocket(this.opts.url, { headers, handshakeTimeout: this.opts.connectTimeoutMs });
    this.ws = ws;
    let refused = false;
    ws.on("open", () => {
      this.backoffMs = this.opts.initialBackoffMs;
      this.setState("connected", this.opts.url);
    });
    ws.on("unexpected-response", (_req, res) => {
      refused = true;
      const status = res.statusCode ?? 0;
      res.resume();
      ws.terminate();
      this.drop(ws);
      if (status === 401) this.setState("unauthorized", "the server refused the API key (HTTP 401)");
      else this.retryLater(`the server refused the connection (HTTP ${status})`);
    });
    ws.on("message", (data, isBinary) => {
      if (!isBinary) this.onMessage(data.toString());
    });
    ws.on("error", (err) => {
      if (!refused) this._detail = err.message;
    });
    ws.on("close", () => {
      if (refused || this.ws !== ws) return;
      this.drop(ws);
      this.retryLater(this._detail && this._state === "connecting" ? this._detail : "connection closed");
    });
  }

  /** New URL or key: drop the connection and open a new one. */
  reconfigure(options: Partial<ClientOptions>): void {
    this.opts = { ...this.opts, ...options };
    this.reconnect();
  }

  reconnect(): void {
    if (this.ws) {
      const ws = this.ws;
      this.drop(ws);
      ws.close();
    }
    this.backoffMs = this.opts.initialBackoffMs;
    this.connect();
  }

  /**
   * Send a `complete`; resolves with its `done` (finishReason "cancelled" when the signal aborted
   * it or a newer request for the same `document` superseded it). Rejects with RequestFailed on
   * an `error` frame, a lost connection, or no connection within connectTimeoutMs.
   */
  async complete(req: CompleteRequest, signal?: AbortSignal): Promise<Completion> {
    const started = performance.now();
    if (signal?.aborted) throw new RequestFailed("cancelled", "cancelled before it was sent");
    const ws = await this.open(signal);
    const id = `c${++this.nextId}`;
    return new Promise<Completion>((resolve, reject) => {
      this.pending.set(id, { resolve, reject, started });
      const onAbort = () => this.sendJson(ws, { type: "cancel", id });
      signal?.addEventListener("abort", onAbort, { once: true });
      const cleanup = () => signal?.removeEventListener("abort", onAbort);
      const p = this.pending.get(id)!;
      p.resolve = (c) => (cleanup(), resolve(c));
      p.reject = (e) => (cleanup(), reject(e));
      this.sendJson(ws, { ...req, type: "complete", id });
    });
  }

  dispose(): void {
    this.disposed = true;
    this.clearRetry();
    if (this.ws) {
      const ws = this.ws;
      this.drop(ws);
      ws.close();
    }
    this.listeners = [];
  }

  // ---- internals ---------------------------------------------------------------------------

  private async open(signal?: AbortSignal): Promise<WebSocket> {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) return this.ws;
    if (this._state === "unauthorized") throw new RequestFailed("unauthorized", this._detail);
    if (!this.ws) this.connect(); // a request is a reason to retry now rather than after the back-off
    return new Promise<WebSocket>((resolve, reject) => {
      const timer = setTimeout(() => finish(new RequestFailed("not_connected", `no connection to ${this.opts.url}: ${this._detail}`)),
        this.opts.connectTimeoutMs);
      const sub = this.onState((state, detail) => {
        if (state === "connected" && this.ws) finish(this.ws);
        else if (state === "unauthorized") finish(new RequestFailed("unauthorized", detail));
        else if (state === "disconnected") finish(new RequestFailed("not_connected", `no connection to ${this.opts.url}: ${detail}`));
      });
      const onAbort = () => finish(new RequestFailed("cancelled", "cancelled while connecting"));
      signal?.addEventListener("abort", onAbort, { once: true });
      const finish = (r: WebSocket | RequestFailed) => {
        clearTimeout(timer);
        sub.dispose();
        signal?.removeEventListener("abort", onAbort);
        if (r instanceof RequestFailed) reject(r);
        else resolve(r);
      };
    });
  }

  private onMessage(text: string): void {
    let m: any;
    try {
      m = JSON.parse(text);
    } catch {
      return; // the server sends JSON only; anything else is not ours to answer
    }
    const p = typeof m?.id === "string" ? this.pending.get(m.id) : undefined;
    if (!p) return; // deltas are not needed (the ghost text is shown whole), pongs, errors without an id
    if (m.type === "done") {
      this.pending.delete(m.id);
      p.resolve({
        id: m.id, text: m.text ?? "", finishReason: m.finish_reason, timings: m.timings, usage: m.usage,
        spec: m.spec ?? null, elapsedMs: performance.now() - p.started,
      });
    } else if (m.type === "error") {
      this.pending.delete(m.id);
      p.reject(new RequestFailed(m.code, m.message));
    }
  }

  private sendJson(ws: WebSocket, obj: object): void {
    if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(obj));
  }

  /** Forget a socket: its requests fail (the server cancels them when the socket closes). */
  private drop(ws: WebSocket): void {
    if (this.ws !== ws) return;
    this.ws = null;
    const failed = [...this.pending.values()];
    this.pending.clear();
    for (const p of failed) p.reject(new RequestFailed("disconnected", "the connection to the server was lost"));
  }

  private retryLater(detail: string): void {
    this.setState("disconnected", detail);
    if (this.disposed) return;
    this.clearRetry();
    this.retryTimer = setTimeout(() => this.connect(), this.backoffMs);
    this.backoffMs = Math.min(this.backoffMs * 2, this.opts.maxBackoffMs);
  }

  private clearRetry(): void {
    if (this.retryTimer) clearTimeout(this.retryTimer);
    this.retryTimer = null;
  }

  private setState(state: ConnectionState, detail: string): void {
    this._state = state;
    this._detail = detail;
    for (const l of [...this.listeners]) l(state, detail);
  }
}
