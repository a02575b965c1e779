"""FIM prompts for code completion: the current file around the cursor, plus context files in the
model family's repo-level format (domino_backend.prompts holds the templates and their tokens).

Within a token budget the text nearest the cursor survives: the cursor's line always, then whole
lines outward from it, the prefix first (it predicts the hole best) with the suffix capped at a
share of what the current file gets, and context files, most relevant (last) first, each kept whole
or cut to its first lines, within their own share. Cuts fall on line boundaries, so the model
never sees half a line at an edge of its context. A file without context files that fits the
budget whole is kept whole; otherwise lines are measured one by one as they are taken, so a huge
file costs the lines kept, not the whole file.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.backend import ExtraFile
from domino_backend.prompts import DEFAULT_FILENAME, REPO_NAME, build_fim, encode_text, fim_template, plain_context


# A file of at most this many characters per budget token is first tried whole (one tokenization
# instead of one per line and another for the result); longer ones cannot fit and go line by line.
WHOLE_CHARS_PER_TOKEN = 8


@dataclass(frozen=True)
class Budget:
    tokens: int  # the whole prompt, template tokens included
    suffix_share: float = 0.25  # of the current file's tokens at most after the cursor (more if the prefix is short)
    context_share: float = 0.5  # of the budget at most for context files

    def __post_init__(self):
        if self.tokens < 1 or not 0 <= self.suffix_share <= 1 or not 0 <= self.context_share <= 1:
            raise ValueError(f"bad FIM budget {self}")


def prompt_ids(tokenizer, prefix: str, suffix: str = "", files=(), filename: str | None = None,
               budget: Budget | int | None = None) -> list[int]:
    """Token ids of the FIM prompt; with a budget, trimmed to it at line boundaries. If even the
    cursor's line does not fit, the prompt is that line alone (over budget, for the caller's own
    length check to refuse)."""
    files = list(files)
    if budget is None:
        return build_fim(tokenizer, prefix, suffix, files, filename)
    b = budget if isinstance(budget, Budget) else Budget(budget)
    if not files and len(prefix) + len(suffix) <= WHOLE_CHARS_PER_TOKEN * b.tokens:
        ids = build_fim(tokenizer, prefix, suffix, [], filename)  # a file that fits whole is kept whole
        if len(ids) <= b.tokens:
            return ids
    count = lambda s: len(encode_text(tokenizer, s)) if s else 0  # noqa: E731

    head_at = prefix.rfind("\n") + 1  # the cursor's line starts here
    rest_end = suffix.find("\n")
    rest_end = len(suffix) if rest_end < 0 else rest_end
    fixed = len(build_fim(tokenizer, prefix[head_at:], suffix[:rest_end], [], filename))
    avail = b.tokens - fixed
    if avail <= 0:
        return build_fim(tokenizer, prefix[head_at:], suffix[:rest_end], [], filename)

    kept, used = _take_files(tokenizer, files, filename, int(avail * b.context_share), count)
    avail -= used

    before, after = prefix[:head_at], suffix[rest_end:]
    s_end, s_used = _take_forward(after, int(avail * b.suffix_share), count, leading_newline=True)
    p_start, p_used = _take_back(before, avail - s_used, count)
    if p_start == 0:  # the whole prefix fit: the suffix may have what it left
        s_end, s_used = _take_forward(after, avail - p_used, count, leading_newline=True)
    p, s = prefix[p_start:], suffix[:rest_end + s_end]

    # Lines were measured one by one; the joined text can come out a few tokens different.
    while True:
        ids = build_fim(tokenizer, p, s, kept, filename)
        if len(ids) <= b.tokens:
            return ids
        if len(p) > len(prefix) - head_at:  # drop the farthest line before the cursor
            p = p[p.find("\n") + 1:]
        elif len(s) > rest_end:  # then the farthest line after it
            s = s[:s.rfind("\n")]
        elif kept:  # then the least relevant context file
            kept = kept[1:]
        else:
            return ids


def _take_files(tokenizer, files: list, filename: str | None, cap: int, count) -> tuple[list[ExtraFile], int]:
    """Context files within `cap` tokens, most relevant (last) first; the first one that does not
    fit whole is cut to its first lines and ends the list. Returns them in the client's order, and
    their tokens."""
    if not files or cap <= 0:
        return [], 0
    template = fim_template(tokenizer)
    repo = template is not None and template.repo is not None
    # Tokens a repo-level prompt adds once: the repo line and the current file's header.
    header = 2 + count(f"{REPO_NAME}\n") + count(f"{filename or DEFAULT_FILENAME}\n") if repo else 0
    left = cap - header
    out: list[ExtraFile] = []
    for f in reversed(files):
        fixed = 1 + count(f"{f.filename}\n") if repo else count("\n\n")
        end, used = _take_forward(f.text, left - fixed, count)
        if fixed > left or (end == 0 and f.text):
            break
        out.append(ExtraFile(f.filename, f.text[:end]))
        left -= fixed + used
        if end < len(f.text):
            break
    return out[::-1], (cap - left if out else 0)


def _take_back(text: str, cap: int, count) -> tuple[int, int]:
    """Start of the longest tail of `text` (which ends at a line start) made of whole lines within
    `cap` tokens, and its tokens."""
    pos, used = len(text), 0
    while pos > 0:
        start = text.rfind("\n", 0, pos - 1) + 1
        cost = count(text[start:pos])
        if used + cost > cap:
            break
        pos, used = start, used + cost
    return pos, used


def _take_forward(text: str, cap: int, count, leading_newline: bool = False) -> tuple[int, int]:
    """End of the longest head of `text` made of whole lines within `cap` tokens, and its tokens.
    leading_newline: `text` starts with the line break that ends the cursor's line, and each unit
    is a line break and the line after it."""
    pos, used = 0, 0
    while pos < len(text):
        if leading_newline:
            end = text.find("\n", pos + 1)
            end = len(text) if end < 0 else end
        else:
            end = text.find("\n", pos)
            end = len(text) if end < 0 else end + 1
        cost = count(text[pos:end])
        if used + cost > cap:
            break
        pos, used = end, used + cost
    return pos, used


def remote_prompt(prefix: str, files=()) -> str:
    """The prompt for servers that take FIM as prompt + suffix (OpenAI `/v1/completions`): they have
    no repo format, so context files go in front of the code as text."""
    return plain_context(files) + prefix
