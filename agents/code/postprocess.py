"""Where a code completion ends: single-line and multi-line (block) stop rules, applied while the
text streams, and the trimming of text that is already after the cursor.

Modes (`GenRequest.single_line` / `multi_line`; neither = the model's text untouched):

- **line**: the first line that has content, without its line break. Blank lines before it are
  kept (a completion at the end of `def f():` starts on the next line).
- **block**: line by line, the completion stops *before* a line that
  - dedents below the block it is writing: the indentation of its first line with content, or, when
    the cursor's line opens a block (`def f():|`, `if (x) {|`), the opener's own indentation. At
    the opener's indentation a closing line (`}`, `)`) is kept and ends the completion, unless it
    opens again (`} else {`), and a continuation keyword (`else:`, `except`) goes on;
  - starts a new top-level definition (column 0, the language's keywords: `def`, `func`, `fn`, ...)
    after the completion already has content;
  - repeats the first non-blank line after the cursor, indentation included (the model is
    re-typing code that is there).
  Blank lines before the line it stops at are dropped.
- Both modes: the end of the completion that repeats the start of the rest of the cursor's line is
  trimmed (`foo(a, b)` before a `)` that is already there becomes `foo(a, b`), when that leaves
  the brackets and quotes of the line no less balanced. Only punctuation is trimmed, or the whole
  rest of the line.

Streaming: `feed(delta)` returns the text that is certain (rules decide a line from its
indentation and first word, so text is held back only around line starts and at a possible overlap)
and whether a rule ended the completion; `finish()` returns what is left when generation ends.
The emitted pieces always concatenate to the final text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Protocol

from app.backend import GenRequest, RequestError

from .languages import GENERIC, Language, language_for

Mode = Literal["line", "block"]

_WORD = re.compile(r"\w")
_PAIRS = {")": "(", "]": "[", "}": "{"}


class Postprocessor(Protocol):
    """What a backend drives: text in, certain text out; True once a rule ended the completion."""

    def feed(self, delta: str) -> tuple[str, bool]: ...

    def finish(self) -> str: ...


@dataclass(frozen=True)
class Cursor:
    head: str = ""  # the cursor's line up to the cursor
    rest: str = ""  # the cursor's line after the cursor
    next_line: str = ""  # the first non-blank line after the cursor's line, no trailing blanks ("" if none)

    @classmethod
    def at(cls, prefix: str, suffix: str) -> Cursor:
        head = prefix[prefix.rfind("\n") + 1:]
        end = suffix.find("\n")
        if end < 0:
            return cls(head, suffix)
        next_line, pos = "", end + 1
        while pos < len(suffix) and not next_line:  # lazily: a suffix can be a whole file
            stop = suffix.find("\n", pos)
            stop = len(suffix) if stop < 0 else stop
            next_line, pos = suffix[pos:stop].rstrip(), stop + 1
        return cls(head, suffix[:end], next_line)


def indent_width(line: str) -> int:
    ws = line[:len(line) - len(line.lstrip(" \t"))]
    return len(ws.expandtabs(4))


def unbalanced(text: str) -> int:
    """Brackets without a partner plus unterminated quotes (per line); brackets in quotes don't count."""
    stack: list[str] = []
    bad, quote, escaped = 0, None, False
    for ch in text:
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
            elif ch == "\n":  # strings end at the line: a stray apostrophe must not hide the rest
                bad, quote = bad + 1, None
        elif ch in "\"'`":
            quote = ch
        elif ch in "([{":
            stack.append(ch)
        elif ch in _PAIRS:
            if stack and stack[-1] == _PAIRS[ch]:
                stack.pop()
            else:
                bad += 1
    return bad + len(stack) + (quote is not None)


def _overlaps(completion: str, rest: str, limit: int, end: int | None = None) -> list[int]:
    """Lengths k (<= limit) of a start of `rest` that `completion[:end]` ends with and that may be
    trimmed: punctuation only, or the whole rest of the line."""
    out = []
    for k in range(1, min(len(rest), limit) + 1):
        t = rest[:k]
        if completion.endswith(t, 0, end) and (not _WORD.search(t) or t.rstrip() == rest.rstrip()):
            out.append(k)
    return out


def trim_overlap(head: str, completion: str, rest: str, keep: int = 0) -> str:
    """`completion` without an end that repeats the start of `rest` (see the module doc); the
    first `keep` characters are never touched (they were already sent)."""
    best_k, best = 0, unbalanced(head + completion + rest)
    for k in _overlaps(completion, rest, len(completion) - keep):
        score = unbalanced(head + completion[:-k] + rest)
        if score <= best:  # a tie trims: the text is there already
            best_k, best = k, score
    return completion[:len(completion) - best_k]


_HOLD, _KEEP, _BLANK, _STOP_BEFORE, _STOP_AFTER = range(5)


class Completion:
    """One completion's stop rules over its streamed text (see the module doc)."""

    def __init__(self, mode: Mode, cursor: Cursor = Cursor(), language: Language = GENERIC):
        if mode not in ("line", "block"):
            raise ValueError(f"mode must be 'line' or 'block', got {mode!r}")
        self.mode, self.cursor, self.lang = mode, cursor, language
        self.seen = ""  # everything generated
        self.sent = 0  # characters of `seen` handed out
        self.text: str | None = None  # the final text, once decided
        self._pos = 0  # start of the first undecided line in `seen`
        self._line = 0  # its number; line 0 continues the cursor's line
        self._kept = 0  # end of the last text with content that is kept
        self._content = False  # a line before the current one has content
        self._cursor_indent = indent_width(cursor.head)
        # Indentation of the block being written: set by the first line with content, and again by
        # the first line after line 0 when the cursor's line opens a block.
        self._block: int | None = None
        self._block_line = -1  # the line that set it (its verdict must not change as it grows)
        self._opens = False  # the cursor's line, completed by line 0, ends with a block opener

    # ---- streaming ------------------------------------------------------------------------------
    def feed(self, delta: str) -> tuple[str, bool]:
        if self.text is not None:
            return "", True
        self.seen += delta
        cut = self._advance(final=False)
        if cut is not None:
            return self._settle(cut), True
        safe = self._kept - self._held_overlap()
        out = self.seen[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return out, False

    def finish(self) -> str:
        """Generation ended: the rest of the final text (empty once a rule ended it)."""
        if self.text is not None:
            return ""
        cut = self._advance(final=True)
        return self._settle(len(self.seen) if cut is None else cut)

    def _settle(self, cut: int) -> str:
        self.text = trim_overlap(self.cursor.head, self.seen[:cut], self.cursor.rest, keep=self.sent)
        out = self.text[self.sent:]
        self.sent = len(self.text)
        return out

    def _held_overlap(self) -> int:
        return max(_overlaps(self.seen, self.cursor.rest, self._kept - self.sent, end=self._kept), default=0)

    # ---- rules ----------------------------------------------------------------------------------
    def _advance(self, final: bool) -> int | None:
        """Decide lines while possible; the cut (end of the final text) once a rule stops."""
        while True:
            end = self.seen.find("\n", self._pos)
            complete = end >= 0 or final
            line = self.seen[self._pos:end if end >= 0 else len(self.seen)]
            verdict = self._verdict(line, complete)
            if verdict == _HOLD:
                return None
            if verdict == _STOP_BEFORE:
                return self._kept
            if verdict == _STOP_AFTER:
                return self._pos + len(line)
            if verdict == _KEEP:
                if self._block is None:
                    self._block, self._block_line = self._indent(line), self._line
                self._kept = self._pos + len(line)
            if end < 0:
                return None
            self._content = self._content or verdict == _KEEP
            if self._line == 0:
                self._opens = (self.cursor.head + line).rstrip().endswith(tuple(self.lang.openers))
                if self._opens:
                    self._block = None
            self._pos, self._line = end + 1, self._line + 1

    def _indent(self, line: str) -> int:
        """The indentation of `line` in the file (line 0 sits after the cursor's text)."""
        if self._line > 0:
            return indent_width(line)
        if self.cursor.head.strip():
            return self._cursor_indent
        return indent_width(self.cursor.head + line)

    def _verdict(self, line: str, complete: bool) -> int:
        code = line.lstrip(" \t")
        if not code.strip():
            return _BLANK if complete else _HOLD
        echo = self._echo(line, complete)
        if echo is not None:
            return echo
        if self.mode == "line":
            return _STOP_AFTER if complete else _KEEP
        if self._line == 0:
            return _KEEP
        ind = indent_width(line)
        if self._block is None or self._block_line == self._line:  # it starts the block: not below the cursor
            return _STOP_BEFORE if ind < self._cursor_indent else _KEEP
        if ind < self._block:
            return self._dedent(code, ind, complete)
        if ind == 0 and self._content:
            starts = self.lang.starts("top_level", code, complete)
            if starts is None:
                return _HOLD
            if starts:
                return _STOP_BEFORE
        return _KEEP

    def _echo(self, line: str, complete: bool) -> int | None:
        """Repeating the next line of the file (indentation included) ends the completion before
        it; None = not an echo."""
        nxt = self.cursor.next_line
        if self._line == 0:  # line 0 is a whole line only on an otherwise empty cursor line
            if self.cursor.head.strip() or self.cursor.rest.strip():
                return None
            line = self.cursor.head + line
        if not nxt or not nxt.startswith(line.rstrip()):
            return None
        if not complete:
            return _HOLD
        return _STOP_BEFORE if line.rstrip() == nxt else None

    def _dedent(self, code: str, ind: int, complete: bool) -> int:
        opened = self._opens and self._block > self._cursor_indent
        if not opened or ind != self._cursor_indent:
            return _STOP_BEFORE
        if code[0] in self.lang.closers:  # `}` closing the block the cursor opened
            if not complete:
                return _HOLD
            return _KEEP if code.rstrip().endswith(tuple(self.lang.openers)) else _STOP_AFTER
        goes_on = self.lang.starts("continuations", code, complete)
        if goes_on is None:
            return _HOLD
        return _KEEP if goes_on else _STOP_BEFORE


def mode_of(req: GenRequest) -> Mode | None:
    if req.single_line and req.multi_line:
        raise RequestError("invalid_request", "single_line and multi_line exclude each other")
    return "line" if req.single_line else "block" if req.multi_line else None


def for_request(req: GenRequest) -> Completion | None:
    """The stop rules a request asked for (None: the model's text untouched). FIM requests know
    the cursor's surroundings and language; other requests get the line rule alone."""
    mode = mode_of(req)
    if mode is None:
        return None
    if req.kind != "fim":
        return Completion(mode)
    return Completion(mode, Cursor.at(req.prefix, req.suffix), language_for(req.language, req.filename))
