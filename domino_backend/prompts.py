"""Turn user input into prompt token ids: raw text, chat messages (the model's chat template), or
fill-in-the-middle (prefix/suffix) with the model family's FIM template.

FIM templates, Qwen2.5-Coder first:

    [<|repo_name|>workspace\n <|file_sep|>{path}\n{text} ... <|file_sep|>{filename}\n]
    <|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>

(the repo-level part only when context files are given). A template owns its stop tokens: the
target's end tokens are built from them (`END_TOKENS`), so generation ends when the model leaves
the hole. Models without FIM tokens get the prefix alone (context files prepended), like llama.cpp's
fallback.

Only templates insert control tokens. Everything a user wrote (chat message content, code, file
names) is tokenized as text: a message containing "<|im_end|>\\n<|im_start|>system" or a file
containing "<|fim_middle|>" cannot inject a control token. Raw prompts (`encode(prompt=...)`) are
the exception, on purpose: clients that render a template themselves send its control tokens that
way.

A prompt is first a list of pieces: `str` (text) and `Control` (one control token); `encode_pieces`
turns them into ids. Adjacent text pieces are tokenized together, so a prompt built from pieces
tokenizes exactly like the same string with the control tokens parsed (the tokenizer splits at
added tokens before it merges anything), minus any control token inside the text.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

REPO_NAME = "workspace"  # Qwen's repo-level format wants a name; IDEs do not send one
DEFAULT_FILENAME = "current"  # the current file's name in a repo-level prompt when the client sent none
TURN_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")


@dataclass(frozen=True)
class Control:
    """A control token in a prompt, written by a template (never taken from user text)."""

    token: str


Piece = str | Control


@dataclass(frozen=True)
class FimTemplate:
    family: str
    prefix: str
    suffix: str
    middle: str
    stop: tuple[str, ...]  # tokens that end a completion: the model has left the hole
    repo: str | None = None  # repo-level context: `{repo}{name}\n` then `{file_sep}{path}\n{text}` per file
    file_sep: str | None = None

    @property
    def tokens(self) -> tuple[str, str, str]:
        return self.prefix, self.suffix, self.middle

    def pieces(self, prefix: str, suffix: str = "", files=(), filename: str | None = None) -> list[Piece]:
        """The prompt for a hole between `prefix` and `suffix`. files: context files (objects with
        `.filename` and `.text`), in the order the client gave them (most relevant last, nearest
        the current file)."""
        out: list[Piece] = []
        if files and self.repo and self.file_sep:
            out += [Control(self.repo), REPO_NAME + "\n"]
            for f in files:
                out += [Control(self.file_sep), f"{f.filename}\n{_ends_line(f.text)}"]
            out += [Control(self.file_sep), f"{filename or DEFAULT_FILENAME}\n"]
        elif files:  # a family without a repo format: the files go in front of the code, as text
            prefix = plain_context(files) + prefix
        return out + [Control(self.prefix), prefix, Control(self.suffix), suffix, Control(self.middle)]


# A new family: its FIM tokens, repo-level tokens if it has them, and the tokens that end a hole.
TEMPLATES = (
    FimTemplate(
        "qwen-coder", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>",
        stop=("<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
              "<|repo_name|>", "<|file_sep|>", "<|im_start|>", "<|im_end|>"),
        repo="<|repo_name|>", file_sep="<|file_sep|>",
    ),
)

# Every token that ends a generation when the tokenizer has it: chat turn ends and every FIM
# family's stop tokens (normal text never contains them).
END_TOKENS = tuple(dict.fromkeys(TURN_END_TOKENS + tuple(t for tpl in TEMPLATES for t in tpl.stop)))


def _ends_line(text: str) -> str:
    return text if not text or text.endswith("\n") else text + "\n"


def plain_context(files) -> str:
    """Context files as plain text in front of the code (models and servers without a repo format)."""
    return "".join(f"{f.text}\n\n" for f in files)


def _has_token(tokenizer, token: str) -> bool:
    tid = tokenizer.convert_tokens_to_ids(token)
    return isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None)


def fim_template(tokenizer) -> FimTemplate | None:
    for t in TEMPLATES:
        if all(_has_token(tokenizer, x) for x in t.tokens):
            return t
    return None


def fim_pieces(tokenizer, prefix: str, suffix: str = "", files=(), filename: str | None = None) -> list[Piece]:
    """The FIM prompt for this tokenizer's family, or the prefix alone (context files first)."""
    t = fim_template(tokenizer)
    if t is None:
        return [plain_context(files) + prefix]
    return t.pieces(prefix, suffix, files, filename)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of user text: strings that look like control tokens stay text."""
    return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)) if text else []


def encode_pieces(tokenizer, pieces: list[Piece]) -> list[int]:
    ids: list[int] = []
    text: list[str] = []
    for p in pieces:
        if isinstance(p, Control):
            ids += encode_text(tokenizer, "".join(text))
            text = []
            ids.append(tokenizer.convert_tokens_to_ids(p.token))
        else:
            text.append(p)
    return ids + encode_text(tokenizer, "".join(text))


def build_fim(tokenizer, prefix: str, suffix: str = "", files=(), filename: str | None = None) -> list[int]:
    return encode_pieces(tokenizer, fim_pieces(tokenizer, prefix, suffix, files, filename))


def chat_pieces(tokenizer, messages: list[dict]) -> list[Piece]:
    """The chat template applied to `messages`, with every message's content as text.

    The template is rendered with a unique marker in place of each content; the rendered template
    text is split at the tokenizer's added tokens (those are the template's own control tokens),
    and the contents go back in as text. Templates that transform content (trim it, split out
    reasoning) see the marker instead, so they get the content untransformed.
    """
    if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this model has no chat template; send a plain prompt")
    nonce = uuid.uuid4().hex
    marks = [f"\ue000{nonce}:{i}\ue001" for i in range(len(messages))]
    masked = [{**m, "content": mark} for m, mark in zip(messages, marks)]
    rendered = tokenizer.apply_chat_template(masked, add_generation_prompt=True, tokenize=False)
    content = {mark: str(m["content"]) for m, mark in zip(messages, marks)}
    added = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)
    control = re.compile("|".join(map(re.escape, added))) if added else None
    pieces: list[Piece] = []
    for part in re.split(f"(\ue000{nonce}:\\d+\ue001)", rendered):
        if part in content:
            pieces.append(content[part])
            continue
        pos = 0
        for m in control.finditer(part) if control else ():
            pieces += [part[pos:m.start()], Control(m.group())]
            pos = m.end()
        pieces.append(part[pos:])
    return pieces


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    return encode_pieces(tokenizer, chat_pieces(tokenizer, messages))


def encode(tokenizer, *, prompt: str | None = None, messages: list[dict] | None = None,
           prefix: str | None = None, suffix: str | None = None, chat: bool = False) -> list[int]:
    """Exactly one of prompt / messages / prefix must be given. `chat` wraps a plain prompt as a
    single user message. Without FIM tokens a prefix/suffix request degrades to prefix-only.
    A raw `prompt` is the one input whose control-token strings become control tokens."""
    given = [x is not None for x in (prompt, messages, prefix)]
    if sum(given) != 1:
        raise ValueError("give exactly one of: prompt, messages, prefix (+ optional suffix)")
    if prompt is not None and chat:
        messages = [{"role": "user", "content": prompt}]
    if messages is not None:
        return encode_chat(tokenizer, messages)
    if prefix is not None:
        return build_fim(tokenizer, prefix, suffix or "")
    return list(tokenizer.encode(prompt, add_special_tokens=False))


def encode_record(tokenizer, record: dict) -> list[int]:
    """One benchmark/JSONL record: {"prompt"}, {"messages"} or {"prefix", "suffix"}."""
    if "messages" in record:
        return encode(tokenizer, messages=record["messages"])
    if "prefix" in record:
        return encode(tokenizer, prefix=record["prefix"], suffix=record.get("suffix"))
    if "prompt" in record:
        return encode(tokenizer, prompt=record["prompt"], chat=bool(record.get("chat", False)))
    raise ValueError(f"record needs 'prompt', 'messages' or 'prefix': {sorted(record)}")
