// The extension's protocol client and completer under Node, driven line by line over stdin so a
// test can act between steps (restart the server, type the next key).
//
//   node out/test/harness.js            stdin: one JSON command a line; stdout: one JSON answer a line
//
// Commands ({"op": ..., "tag": ...}; the answer carries the same tag):
//   connect {url, apiKey?, debounceMs?}   make the client; answers once the state is not "connecting"
//   complete {req, ...}                   DominoClient.complete(req): {completion} or {error: {code, message}}
//   cancel {target}                       abort the `complete` whose tag is `target`
//   type {doc, multiline?}                Completer.complete(doc): {suggestion: {text, latencyMs, ...} | null}
//   state {want, timeoutMs}               wait until the connection state is `want`
//   inflight                              requests sent and not answered
//   window {text, offset, prefixChars, suffixChars}   cursorWindow(...): {prefix, suffix}
// State changes are reported as {"event": "state", "state", "detail"}.

import * as readline from "node:readline";
import { Completer, DEFAULT_SETTINGS } from "../src/completer";
import { cursorWindow } from "../src/context";
import { DominoClient, RequestFailed } from "../src/protocol";

let client: DominoClient | null = null;
let completer: Completer | null = null;
const aborts = new Map<string, AbortController>();

function out(obj: object): void {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

function failure(e: unknown): object {
  if (e instanceof RequestFailed) return { error: { code: e.code, message: e.message } };
  return { error: { code: "exception", message: String(e) } };
}

function waitState(c: DominoClient, want: (s: string) => boolean, timeoutMs: number): Promise<string> {
  return new Promise((resolve) => {
    if (want(c.state)) return resolve(c.state);
    const timer = setTimeout(() => (sub.dispose(), resolve(c.state)), timeoutMs);
    const sub = c.onState((s) => {
      if (want(s)) (clearTimeout(timer), sub.dispose(), resolve(s));
    });
  });
}

async function handle(cmd: any): Promise<object> {
  switch (cmd.op) {
    case "connect": {
      client?.dispose();
      client = new DominoClient({ url: cmd.url, apiKey: cmd.apiKey, initialBackoffMs: 100, maxBackoffMs: 1000 });
      client.onState((state, detail) => out({ event: "state", state, detail }));
      const settings = { ...DEFAULT_SETTINGS, debounceMs: cmd.debounceMs ?? DEFAULT_SETTINGS.debounceMs };
      completer = new Completer(client, () => settings);
      client.connect();
      const state = await waitState(client, (s) => s !== "connecting", 10_000);
      return { state, detail: client.detail };
    }
    case "complete": {
      const ac = new AbortController();
      aborts.set(cmd.tag, ac);
      try {
        return { completion: await client!.complete(cmd.req, ac.signal) };
      } catch (e) {
        return failure(e);
      } finally {
        aborts.delete(cmd.tag);
      }
    }
    case "cancel":
      aborts.get(cmd.target)?.abort();
      return { cancelled: aborts.has(cmd.target) };
    case "type":
      try {
        return { suggestion: await completer!.complete(cmd.doc, { multiline: cmd.multiline }) };
      } catch (e) {
        return failure(e);
      }
    case "state":
      return { state: await waitState(client!, (s) => s === cmd.want, cmd.timeoutMs ?? 10_000) };
    case "inflight":
      return { inflight: client!.inflight };
    case "window": {
      const [prefix, suffix] = cursorWindow(cmd.text, cmd.offset, cmd.prefixChars, cmd.suffixChars);
      return { prefix, suffix };
    }
    default:
      return { error: { code: "unknown_op", message: String(cmd.op) } };
  }
}

const rl = readline.createInterface({ input: process.stdin });
rl.on("line", (line) => {
  let cmd: any;
  try {
    cmd = JSON.parse(line);
  } catch {
    return out({ error: { code: "bad_command", message: line } });
  }
  handle(cmd).then((r) => out({ tag: cmd.tag, ...r }));
});
rl.on("close", () => {
  client?.dispose();
  process.exit(0);
});
