// From a keystroke to a suggestion: debounce, build the request, send it, keep the newest.
//
// The editor asks at every keystroke. A request first waits `debounceMs`; if a newer keystroke in
// the same document arrived meanwhile it is dropped without reaching the server. Sent requests carry
// the document key, so the server cancels the older one of a document as soon as a newer arrives
// (its engine slot is freed before the new one queues), and the editor's cancellation (the user
// typed on, moved the cursor) sends `cancel`. No `vscode` here: extension.ts adapts the editor's
// types, the tests drive this class under Node.

import { cursorWindow } from "./context";
import { Completion, DominoClient, ExtraFile, RequestFailed } from "./protocol";

export interface CompletionSettings {
  debounceMs: number;
  /** Token budget of a single-line (typing) and a multi-line (explicit trigger) completion. */
  maxTokens: number;
  multilineMaxTokens: number;
  /** The server ends a request after this long and returns what it has. */
  deadlineMs: number;
  /** Decoding method; "" = the server's default. */
  method: string;
  prefixChars: number;
  suffixChars: number;
}

export const DEFAULT_SETTINGS: CompletionSettings = {
  debounceMs: 75,
  maxTokens: 64,
  multilineMaxTokens: 256,
  deadlineMs: 2000,
  method: "",
  prefixChars: 8000,
  suffixChars: 2000,
};

/** One state of the editor: the whole text and the cursor (a UTF-16 offset, as editors count). */
export interface DocumentSnapshot {
  key: string; // the document's URI: the server's supersede key
  filename: string;
  languageId: string;
  text: string;
  offset: number;
}

export interface Suggestion {
  text: string;
  completion: Completion;
  /** From the keystroke (the call) to the answer, debounce included. */
  latencyMs: number;
}

export interface CompleteOptions {
  multiline?: boolean;
  extra?: ExtraFile[];
  signal?: AbortSignal;
}

export class Completer {
  private generation = new Map<string, number>(); // per document: the newest call wins
  private listeners: ((s: Suggestion) => void)[] = [];

  constructor(private readonly client: DominoClient, private readonly settings: () => CompletionSettings) {}

  /** Called with every completion the server finished (not cancelled): the status bar's numbers. */
  onCompletion(listener: (s: Suggestion) => void): void {
    this.listeners.push(listener);
  }

  /**
   * The suggestion at the cursor, or null when there is none to show: superseded by a newer call
   * for the document, cancelled, empty, or the server could not be reached (then the error is
   * thrown, except for cancellation).
   */
  async complete(doc: DocumentSnapshot, opts: CompleteOptions = {}): Promise<Suggestion | null> {
    const started = performance.now();
    const gen = (this.generation.get(doc.key) ?? 0) + 1;
    this.generation.set(doc.key, gen);
    const s = this.settings();
    if (s.debounceMs > 0 && !(await sleep(s.debounceMs, opts.signal))) return null;
    if (this.generation.get(doc.key) !== gen) return null; // a newer keystroke took over during the wait

    const [prefix, suffix] = cursorWindow(doc.text, doc.offset, s.prefixChars, s.suffixChars);
    const multiline = opts.multiline ?? false;
    let completion: Completion;
    try {
      completion = await this.client.complete({
        prefix, suffix, language: doc.languageId, filename: doc.filename, extra: opts.extra ?? [],
        max_tokens: multiline ? s.multilineMaxTokens : s.maxTokens,
        single_line: !multiline, multi_line: multiline, deadline_ms: s.deadlineMs,
        document: doc.key, ...(s.method ? { method: s.method } : {}),
      }, opts.signal);
    } catch (e) {
      if (e instanceof RequestFailed && e.code === "cancelled") return null;
      throw e;
    }
    if (completion.finishReason === "cancelled" || completion.finishReason === "error") return null;
    const suggestion = { text: completion.text, completion, latencyMs: performance.now() - started };
    for (const l of this.listeners) l(suggestion);
    if (opts.signal?.aborted || this.generation.get(doc.key) !== gen || !completion.text.trim()) return null;
    return suggestion;
  }
}

/** Wait `ms`; false if the signal aborted first. */
function sleep(ms: number, signal?: AbortSignal): Promise<boolean> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve(false);
    const onAbort = () => (clearTimeout(timer), resolve(false));
    const timer = setTimeout(() => (signal?.removeEventListener("abort", onAbort), resolve(true)), ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}
