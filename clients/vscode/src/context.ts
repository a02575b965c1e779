// What a completion request carries besides the cursor: windows of the file around it, and a few
// recently edited files. Plain text in, plain text out (no `vscode`), so Node tests cover it.

import type { ExtraFile } from "./protocol";

/**
 * (prefix, suffix) around `offset`: at most `prefixChars` before and `suffixChars` after, cut at
 * line starts so the model never sees half a line at the edge (the cursor's own line is always
 * whole, however long).
 */
export function cursorWindow(text: string, offset: number, prefixChars: number, suffixChars: number): [string, string] {
  let start = Math.max(0, offset - prefixChars);
  if (start > 0) {
    const lineStart = text.indexOf("\n", start - 1) + 1; // the first line that starts inside the window
    start = lineStart > 0 && lineStart <= offset ? lineStart : text.lastIndexOf("\n", offset - 1) + 1;
  }
  let end = Math.min(text.length, offset + suffixChars);
  if (end < text.length) {
    const lineEnd = text.lastIndexOf("\n", end); // the last line that ends inside the window
    const cursorLineEnd = text.indexOf("\n", offset);
    end = lineEnd >= offset ? lineEnd + 1 : cursorLineEnd < 0 ? text.length : cursorLineEnd + 1;
  }
  return [text.slice(start, offset), text.slice(offset, end)];
}

/** The first `maxChars` of `text`, cut at a line end (whole text when it fits). */
export function headOf(text: string, maxChars: number): string {
  if (text.length <= maxChars) return text;
  const cut = text.lastIndexOf("\n", maxChars);
  return cut > 0 ? text.slice(0, cut + 1) : text.slice(0, maxChars);
}

/**
 * Files the user touched lately, most recent last: the order the server's `extra` field wants
 * (most relevant last). Holds text getters, so a file is read when a request is built, not on
 * every keystroke.
 */
export class RecentFiles {
  private entries = new Map<string, { filename: string; read: () => string }>();

  constructor(private readonly capacity: number) {}

  touch(key: string, filename: string, read: () => string): void {
    this.entries.delete(key); // re-insert: Map keeps insertion order
    this.entries.set(key, { filename, read });
    while (this.entries.size > this.capacity) this.entries.delete(this.entries.keys().next().value!);
  }

  forget(key: string): void {
    this.entries.delete(key);
  }

  /** Up to `count` files other than `currentKey`, each cut to `maxChars`, most recent last. */
  extra(currentKey: string, count: number, maxChars: number): ExtraFile[] {
    if (count <= 0) return [];
    const others = [...this.entries].filter(([k]) => k !== currentKey).slice(-count);
    return others.map(([, e]) => ({ filename: e.filename, text: headOf(e.read(), maxChars) }));
  }
}
