// VS Code wiring: settings, the API key in SecretStorage, the inline-completion provider and the
// status bar. The protocol and the completion logic live in protocol.ts / completer.ts (no `vscode`).

import * as vscode from "vscode";
import { Completer, CompletionSettings, DEFAULT_SETTINGS, Suggestion } from "./completer";
import { RecentFiles } from "./context";
import { ConnectionState, DominoClient } from "./protocol";

const SECRET = "domino.apiKey";
const RECENT_FILES = 8; // remembered; `domino.extraFiles` of them are sent

function config(): vscode.WorkspaceConfiguration {
  return vscode.workspace.getConfiguration("domino");
}

function settings(): CompletionSettings {
  const c = config();
  const d = DEFAULT_SETTINGS;
  return {
    debounceMs: c.get("debounceMs", d.debounceMs),
    maxTokens: c.get("maxTokens", d.maxTokens),
    multilineMaxTokens: c.get("multilineMaxTokens", d.multilineMaxTokens),
    deadlineMs: c.get("deadlineMs", d.deadlineMs),
    method: c.get("method", d.method),
    prefixChars: c.get("prefixChars", d.prefixChars),
    suffixChars: c.get("suffixChars", d.suffixChars),
  };
}

/** `domino.enable`: {"*": default, languageId: bool}, as editors' per-language switches go. */
function enabledFor(languageId: string): boolean {
  const table = config().get<Record<string, boolean>>("enable", {});
  return table[languageId] ?? table["*"] ?? true;
}

class StatusBar {
  private item = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Right, 100);
  private last: Suggestion | null = null;
  private state: ConnectionState = "disconnected";
  private detail = "";

  constructor() {
    this.item.command = "domino.showStatus";
    this.render();
    this.item.show();
  }

  setState(state: ConnectionState, detail: string): void {
    this.state = state;
    this.detail = detail;
    this.render();
  }

  setLast(s: Suggestion): void {
    this.last = s;
    this.render();
  }

  /** One line for the status message: connection, then the last completion's numbers. */
  summary(): string {
    const s = this.last;
    const numbers = s ? `last completion ${speed(s)}` : "no completion yet";
    return `Domino: ${this.state} (${this.detail}); ${numbers}`;
  }

  private render(): void {
    const icon = { connected: "$(zap)", connecting: "$(sync~spin)", disconnected: "$(debug-disconnect)",
                   unauthorized: "$(key)" }[this.state];
    const numbers = this.state === "connected" && this.last ? ` ${speed(this.last)}` : "";
    this.item.text = `${icon} Domino${numbers}`;
    this.item.tooltip = this.summary();
    this.item.backgroundColor = this.state === "unauthorized"
      ? new vscode.ThemeColor("statusBarItem.errorBackground") : undefined;
  }

  dispose(): void {
    this.item.dispose();
  }
}

/** "420 ms · τ 2.4 · 38 tok/s": keystroke to suggestion, tokens per verify round, decoding speed. */
function speed(s: Suggestion): string {
  const spec = s.completion.spec;
  const parts = [`${Math.round(s.latencyMs)} ms`];
  if (spec) parts.push(`τ ${spec.tau.toFixed(1)}`, `${Math.round(spec.tokens_per_s)} tok/s`);
  return parts.join(" · ");
}

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  const url = () => config().get("serverUrl", "ws://127.0.0.1:8000/v1/ws");
  const client = new DominoClient({ url: url(), apiKey: (await context.secrets.get(SECRET)) ?? "" });
  const completer = new Completer(client, settings);
  const status = new StatusBar();
  const recent = new RecentFiles(RECENT_FILES);
  client.onState((state, detail) => status.setState(state, detail));
  completer.onCompletion((s) => status.setLast(s));

  const remember = (d: vscode.TextDocument) => {
    if (d.uri.scheme === "file" || d.uri.scheme === "untitled") {
      recent.touch(d.uri.toString(), vscode.workspace.asRelativePath(d.uri), () => d.getText());
    }
  };
  vscode.workspace.textDocuments.forEach(remember);

  const provider: vscode.InlineCompletionItemProvider = {
    async provideInlineCompletionItems(document, position, ctx, token) {
      if (!enabledFor(document.languageId) || client.state === "unauthorized") return undefined;
      const abort = new AbortController();
      const sub = token.onCancellationRequested(() => abort.abort()); // VS Code's cancel -> the API's cancel
      try {
        const key = document.uri.toString();
        const s = await completer.complete({
          key, filename: vscode.workspace.asRelativePath(document.uri), languageId: document.languageId,
          text: document.getText(), offset: document.offsetAt(position),
        }, {
          // Typing gets one line; an explicit trigger (editor.action.inlineSuggest.trigger, Alt+\) a block.
          multiline: ctx.triggerKind === vscode.InlineCompletionTriggerKind.Invoke,
          extra: recent.extra(key, config().get("extraFiles", 3), 4000),
          signal: abort.signal,
        });
        if (!s || token.isCancellationRequested) return undefined;
        return [new vscode.InlineCompletionItem(s.text, new vscode.Range(position, position))];
      } catch {
        return undefined; // connection trouble shows in the status bar, not as a popup per keystroke
      } finally {
        sub.dispose();
      }
    },
  };

  context.subscriptions.push(
    status,
    { dispose: () => client.dispose() },
    vscode.languages.registerInlineCompletionItemProvider({ pattern: "**" }, provider),
    vscode.workspace.onDidChangeTextDocument((e) => remember(e.document)),
    vscode.workspace.onDidOpenTextDocument(remember),
    vscode.workspace.onDidCloseTextDocument((d) => recent.forget(d.uri.toString())),
    vscode.workspace.onDidChangeConfiguration((e) => {
      if (e.affectsConfiguration("domino.serverUrl")) client.reconfigure({ url: url() });
    }),
    context.secrets.onDidChange(async (e) => {
      if (e.key === SECRET) client.reconfigure({ apiKey: (await context.secrets.get(SECRET)) ?? "" });
    }),
    vscode.commands.registerCommand("domino.setApiKey", async () => {
      const key = await vscode.window.showInputBox({
        prompt: "API key of the Domino server (empty: none). Kept in VS Code's secret storage.",
        password: true, ignoreFocusOut: true,
      });
      if (key === undefined) return;
      if (key) await context.secrets.store(SECRET, key);
      else await context.secrets.delete(SECRET);
    }),
    vscode.commands.registerCommand("domino.reconnect", () => client.reconnect()),
    vscode.commands.registerCommand("domino.showStatus", async () => {
      const pick = await vscode.window.showInformationMessage(status.summary(), "Reconnect", "Set API Key");
      if (pick === "Reconnect") client.reconnect();
      else if (pick === "Set API Key") await vscode.commands.executeCommand("domino.setApiKey");
    }),
  );
  client.connect();
}

export function deactivate(): void {}
