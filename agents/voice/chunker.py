"""Cut streamed reply text into speakable chunks, so speech starts before the reply is finished.

A chunk ends at
* a sentence end: ``.``, ``!`` or ``?`` (closing quotes/brackets/emphasis may follow) followed by
  whitespace, except after abbreviations (Mr., e.g.), initials (J.), and list numbers at the start
  of a line ("1."); ``3.14`` or ``main.py`` never qualify, since no whitespace follows the dot;
* a line break (list items, headings and paragraphs have no final punctuation);
* a clause mark (``,`` ``;`` ``:``) followed by whitespace, once the chunk has `clause_words` words:
  long first sentences then reach TTS early, short clauses are not chopped into odd prosody;
* with `phrase_chars` set (the reply's first chunk, where every word is on the listener's wait),
  just before a conjunction, relative word or preposition ("and", "which", "in", "by" ...) once
  the chunk has that many characters (what it costs to say, better than words: "H-D-T-T-P" is one
  word of many syllables and tokens): a phrase boundary, in a sentence without commas;
* the end of a fenced code block: the block is one chunk (speech_text replaces it) and nothing
  inside a fence or inline code ever splits;
* `max_chars` without any of these (a run-on reply still gets spoken).
"""

from __future__ import annotations

import re

_CLOSERS = "\"')]}*_”’»"
# Never sentence ends: titles and Latin abbreviations are followed by more of the same sentence.
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs approx fig e.g i.e cf al viz incl dept est".split()
)
_WORD_BEFORE = re.compile(r"(\S+)$")
# Words that open a new phrase (conjunctions, relative words, prepositions): a chunk may end just
# before one (see `phrase_chars`).
PHRASE_STARTS = frozenset(
    "and but or so because which who whom whose where when while if although though since unless whereas "
    "in on at for to with of by from into about over after before during through without within between".split()
)
_NEXT_WORD = re.compile(r"\s+([A-Za-z]+)(?=[\s,.;:!?])")


class SentenceChunker:
    def __init__(self, clause_words: int | None = 8, max_chars: int = 300, phrase_chars: int | None = None):
        self.clause_words = clause_words  # None: split at sentences only
        self.phrase_chars = phrase_chars  # None: never before a conjunction or preposition
        self.max_chars = max_chars
        self._buf = ""

    def feed(self, delta: str) -> list[str]:
        """Add streamed text; return the chunks it completes (stripped, non-empty)."""
        self._buf += delta
        return self._drain(final=False)

    def flush(self) -> list[str]:
        """End of the reply: return whatever is left as chunks."""
        out = self._drain(final=True)
        rest, self._buf = self._buf.strip(), ""
        return out + ([rest] if rest else [])

    def _drain(self, final: bool) -> list[str]:
        out = []
        while (cut := _boundary(self._buf, final, self.clause_words, self.max_chars, self.phrase_chars)) is not None:
            chunk, self._buf = self._buf[:cut].strip(), self._buf[cut:]
            if chunk:
                out.append(chunk)
        return out


def split_sentences(text: str) -> list[str]:
    """A whole text as sentence chunks (what a TTS speaks one at a time)."""
    chunker = SentenceChunker(clause_words=None)
    return chunker.feed(text) + chunker.flush()


def _boundary(buf: str, final: bool, clause_words: int | None, max_chars: int,
              phrase_chars: int | None = None) -> int | None:
    """Index just past the first chunk end in `buf`, or None if no chunk is complete yet."""
    in_fence = in_inline = False
    line_start = True
    i, n = 0, len(buf)
    while i < n:
        if buf.startswith("```", i) and line_start:
            end = buf.find("\n", i)
            if end < 0:
                return None  # fence line still arriving
            if in_fence:
                return end + 1  # the whole block (and anything before it) is one chunk
            in_fence = True
            i, line_start = end + 1, True
            continue
        c = buf[i]
        if in_fence:
            line_start = c == "\n"
            i += 1
            continue
        if c == "`":
            in_inline = not in_inline
        elif c == "\n":
            in_inline = False
            if buf[:i].strip():
                return i + 1
        elif not in_inline and c in ".!?":
            j = i
            while j < n and buf[j] in ".!?":
                j += 1
            while j < n and buf[j] in _CLOSERS:
                j += 1
            if j == n and not final:
                return None  # the next character decides
            if (j == n or buf[j].isspace()) and (c != "." or not _no_sentence_end(buf[:i])):
                return j
            i = j
            line_start = False
            continue
        elif not in_inline and c in ",;:" and clause_words and i + 1 < n and buf[i + 1].isspace():
            if len(buf[:i].split()) >= clause_words:
                return i + 1
        elif not in_inline and phrase_chars and c in " \t" and i and not buf[i - 1].isspace():
            # the next word must be whole (followed by a space or mark) to be told from "android"
            m = _NEXT_WORD.match(buf, i)
            if m and m.group(1).lower() in PHRASE_STARTS and len(buf[:i].strip()) >= phrase_chars:
                return i + 1
        line_start = c == "\n" or (line_start and c in " \t")
        i += 1
    if not in_fence and n > max_chars:
        cut = buf.rfind(" ", 0, max_chars)
        return cut + 1 if cut > 0 else max_chars
    return None


def _no_sentence_end(before: str) -> bool:
    """Is the '.' that follows `before` part of an abbreviation, an initial or a list number?"""
    m = _WORD_BEFORE.search(before)
    if not m:
        return False
    word = m.group(1).lstrip("(\"'*_").lower()
    if word in ABBREVIATIONS or re.fullmatch(r"(?:[a-z]\.)+[a-z]", word):
        return True
    if len(word) == 1 and word.isalpha() and m.group(1)[-1].isupper():
        return True  # an initial: "J. R. R. Tolkien"
    line = before[before.rfind("\n") + 1 :]
    return word.isdigit() and line.strip() == m.group(1)  # "1." opening a list item
