"""Turn user input into prompt token ids: raw text, chat messages (the model's chat template), or
fill-in-the-middle (prefix/suffix) with the model family's FIM template.

FIM templates, Qwen2.5-Coder first:

    [<|repo_name|>workspace\n <|file_sep|>{path}\n{text} ... <|file_sep|>{filename}\n]
    <|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>

(the repo-level part only when extra files are given). The target's end tokens already hold every
Qwen FIM/repo marker, so generation ends when the model leaves the hole. Models without FIM tokens
get the prefix alone (extra files prepended), like llama.cpp's fallback. User code in a FIM request
is tokenized with `split_special_tokens`: a file containing the literal "<|fim_middle|>" cannot
inject a control token.
"""

from __future__ import annotations

from dataclasses import dataclass

REPO_NAME = "workspace"  # Qwen's repo-level format wants a name; IDEs do not send one


@dataclass(frozen=True)
class FimTemplate:
    family: str
    prefix: str
    suffix: str
    middle: str
    repo: str | None = None
    file_sep: str | None = None

    @property
    def tokens(self) -> tuple[str, str, str]:
        return self.prefix, self.suffix, self.middle


# Add a family here together with its stop tokens in domino_backend.target.END_TOKENS.
TEMPLATES = (
    FimTemplate("qwen-coder", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|repo_name|>", "<|file_sep|>"),
)


def _has_token(tokenizer, token: str) -> bool:
    tid = tokenizer.convert_tokens_to_ids(token)
    return isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None)


def fim_template(tokenizer) -> FimTemplate | None:
    for t in TEMPLATES:
        if all(_has_token(tokenizer, x) for x in t.tokens):
            return t
    return None


def _text(tokenizer, s: str) -> list[int]:
    return list(tokenizer.encode(s, add_special_tokens=False, split_special_tokens=True)) if s else []


def build_fim(tokenizer, prefix: str, suffix: str = "", extra=(), filename: str | None = None) -> list[int]:
    """extra: context files, objects with `.filename` and `.text`."""
    t = fim_template(tokenizer)
    if t is None:  # prefix-only fallback: context files first, then the code before the cursor
        return _text(tokenizer, "".join(f"{f.text}\n\n" for f in extra) + prefix)
    special = tokenizer.convert_tokens_to_ids
    ids: list[int] = []
    if extra and t.repo and t.file_sep:
        ids += [special(t.repo)] + _text(tokenizer, REPO_NAME + "\n")
        for f in extra:
            ids += [special(t.file_sep)] + _text(tokenizer, f"{f.filename}\n{f.text}\n")
        ids += [special(t.file_sep)] + _text(tokenizer, f"{filename or 'current'}\n")
    ids += [special(t.prefix)] + _text(tokenizer, prefix)
    ids += [special(t.suffix)] + _text(tokenizer, suffix)
    ids += [special(t.middle)]
    return ids


def encode(tokenizer, *, prompt: str | None = None, messages: list[dict] | None = None,
           prefix: str | None = None, suffix: str | None = None, chat: bool = False) -> list[int]:
    """Exactly one of prompt / messages / prefix must be given. `chat` wraps a plain prompt as a
    single user message. Without FIM tokens a prefix/suffix request degrades to prefix-only."""
    given = [x is not None for x in (prompt, messages, prefix)]
    if sum(given) != 1:
        raise ValueError("give exactly one of: prompt, messages, prefix (+ optional suffix)")
    if prompt is not None and chat:
        messages = [{"role": "user", "content": prompt}]
    if messages is not None:
        if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise ValueError("messages must be a non-empty list of {role, content} objects")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("this model has no chat template; send a plain prompt")
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    if prefix is not None:
        return build_fim(tokenizer, prefix, suffix or "")
    return tokenizer.encode(prompt, add_special_tokens=False)


def encode_record(tokenizer, record: dict) -> list[int]:
    """One benchmark/JSONL record: {"prompt"}, {"messages"} or {"prefix", "suffix"}."""
    if "messages" in record:
        return encode(tokenizer, messages=record["messages"])
    if "prefix" in record:
        return encode(tokenizer, prefix=record["prefix"], suffix=record.get("suffix"))
    if "prompt" in record:
        return encode(tokenizer, prompt=record["prompt"], chat=bool(record.get("chat", False)))
    raise ValueError(f"record needs 'prompt', 'messages' or 'prefix': {sorted(record)}")
