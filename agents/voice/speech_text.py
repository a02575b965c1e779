"""Turn a chunk of a chat reply (markdown, code, URLs, symbols, emoji) into text a TTS can read aloud.

Pure functions. Code blocks are never read out: they become `CODE_PHRASE` (the transcript keeps the
code). Short inline code is read as words ("`user_id`" -> "user id"); long inline code is treated
like a block. Markdown markup is dropped and its structure kept as pauses (a heading or list item
ends with a full stop). Emoji are dropped: their Unicode names ("grinning face with smiling eyes")
are noise when spoken.
"""

from __future__ import annotations

import re

CODE_PHRASE = "(code shown in the transcript)"
INLINE_CODE_MAX_CHARS = 40  # longer inline code is an expression nobody wants read character by character

_FENCE = re.compile(r"^[ \t]*```.*?(?:^[ \t]*```[^\n]*$|\Z)", re.S | re.M)
_INLINE_CODE = re.compile(r"`([^`\n]+)`")
_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
# A URL's trailing punctuation ends the sentence, it is not part of the link.
_URL = re.compile(r"\b(?:https?://|www\.)([\w.-]*\w)(?::\d+)?(?:[/?#][^\s<>()]*?)?(?=[.,;:!?]*(?:\s|$))", re.I)
# Markers must sit at word edges: my_var_name and 2*3*4 are not emphasis.
_EMPHASIS = re.compile(r"(?<![\w*])(\*\*|__|~~|\*|_)(?=[^\s*_])(.+?)(?<=[^\s*_])\1(?![\w*])")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M)
_LIST_ITEM = re.compile(r"^\s*(?:[-*+•]|\d+[.)])\s+", re.M)
_QUOTE = re.compile(r"^\s*>\s?", re.M)
_RULE = re.compile(r"^\s*(?:[-*_]\s*){3,}$", re.M)
_TABLE_SEP = re.compile(r"^\s*\|?\s*:?-{2,}:?\s*(?:\|\s*:?-{2,}:?\s*)*\|?\s*$", re.M)
_EMOJI = re.compile(
    "[\U0001f000-\U0001faff\U00002600-\U000027bf\U0001f1e6-\U0001f1ff\u2b00-\u2bff\ufe0f\u200d\u20e3]"
)

# Multi-character operators first, so "==" is never read as two "=".
_SYMBOLS = [
    ("===", " equals "),
    ("!==", " is not equal to "),
    ("==", " equals "),
    ("!=", " is not equal to "),
    ("<=", " less than or equal to "),
    (">=", " greater than or equal to "),
    ("->", " to "),
    ("=>", " to "),
    ("→", " to "),
    ("←", " from "),
    ("&&", " and "),
    ("||", " or "),
    ("++", " plus plus "),
    ("…", "..."),
    ("—", ", "),
    ("–", " to "),
    ("×", " times "),
    ("÷", " divided by "),
    ("±", " plus or minus "),
    ("°", " degrees "),
    ("≈", " about "),
    ("&", " and "),
    ("@", " at "),
    ("=", " equals "),
    ("+", " plus "),
    ("<", " less than "),
    (">", " greater than "),
    ("^", " to the power of "),
]
_SYMBOL_RE = re.compile("|".join(re.escape(s) for s, _ in _SYMBOLS))
_SYMBOL_WORDS = dict(_SYMBOLS)


def to_speech(text: str) -> str:
    """A reply chunk -> plain speakable text ("" when nothing in it is worth saying)."""
    text = _FENCE.sub(lambda m: f"\n{CODE_PHRASE}\n", text)
    text = _INLINE_CODE.sub(lambda m: _say_inline_code(m.group(1)), text)
    text = _IMAGE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _URL.sub(lambda m: _say_domain(m.group(1)), text)
    text = _RULE.sub("", text)
    text = _TABLE_SEP.sub("", text)
    text = _HEADING.sub(r"\1", text)
    text = _QUOTE.sub("", text)
    text = _LIST_ITEM.sub("", text)
    for _ in range(2):  # nested emphasis: ***bold italic***
        text = _EMPHASIS.sub(r"\2", text)
    text = _EMOJI.sub("", text)
    lines = [_say_symbols(line.strip().strip("|").replace("|", ",")) for line in text.splitlines()]
    lines = [line for line in lines if line]
    # A line that ends without punctuation (heading, list item, table row) still ends a phrase.
    spoken = [ln if ln[-1] in ".!?,;:)" or i == len(lines) - 1 else ln + "." for i, ln in enumerate(lines)]
    return _tidy(" ".join(spoken))


def _say_inline_code(code: str) -> str:
    if len(code) > INLINE_CODE_MAX_CHARS:
        return CODE_PHRASE
    code = re.sub(r"\(\s*\)", "", code)  # foo() -> foo
    code = re.sub(r"(?<=\w)\.(?=\w)", " dot ", code)  # main.py -> main dot py
    return code.replace("_", " ").replace("/", " slash ")


def _say_domain(host: str) -> str:
    host = re.sub(r"^www\.", "", host.lower()).rstrip(".,;:!?")
    return host.replace(".", " dot ")


def _say_symbols(line: str) -> str:
    line = re.sub(r"(\d)\s*%", r"\1 percent", line)
    line = re.sub(r"#\s*(\d)", r"number \1", line)
    line = re.sub(r"\$\s*(\d[\d,.]*)", r"\1 dollars", line)
    line = re.sub(r"~\s*(\d)", r"about \1", line)
    line = re.sub(r"\band/or\b", "and or", line)
    line = re.sub(r"(?<=\w)/(?=\w)", " or ", line)  # yes/no, read/write
    line = re.sub(r"(?<=\w)_(?=\w)", " ", line)  # snake_case words outside backticks
    line = re.sub(r"(?<=\d)\s*\*\s*(?=\d)", " times ", line)
    line = _SYMBOL_RE.sub(lambda m: _SYMBOL_WORDS[m.group(0)], line)
    # Whatever markup is left has no spoken form.
    return re.sub(r"[#*_~`\\{}\[\]]", " ", line).strip()


def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([.,;:!?)])", r"\1", text)
    text = re.sub(r"([(])\s+", r"\1", text)
    text = re.sub(r"([.,;:!?])(?:\s*[.,;:])+", r"\1", text)  # ". ," left by removed parts
    return text.strip(" ,;:")
