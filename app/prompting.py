"""Turn a GenRequest into prompt token ids for the in-process engine.

FIM templates are chosen from the tokenizer's vocabulary (the model family), Qwen2.5-Coder first:

    [<|repo_name|>workspace\n <|file_sep|>{path}\n{text} ... <|file_sep|>{filename}\n]
    <|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>

(the repo-level part only when extra files are sent). The target's eos ids already hold every Qwen
FIM/repo stop token, so generation ends when the model leaves the hole. Models without FIM tokens
get the prefix alone (extra files prepended), like llama.cpp's fallback.

User text in a FIM request is code, not markup: it is tokenized with `split_special_tokens`, so a
file containing the literal string "<|fim_middle|>" cannot inject a control token. Raw `text`
prompts (OpenAI /v1/completions) do parse special tokens, because clients such as Continue render
FIM templates themselves and send them as plain prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

from domino_backend.prompts import encode as encode_prompt

from .backend import GenRequest, RequestError

REPO_NAME = "workspace"  # Qwen's repo-level format wants a name; the IDE does not send one


@dataclass(frozen=True)
class FimTemplate:
    family: str
    prefix: str
    suffix: str
    middle: str
    repo: str | None = None
    file_sep: str | None = None


# Add a family here together with its stop tokens in domino_backend.target.END_TOKENS.
TEMPLATES = (
    FimTemplate("qwen-coder", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|repo_name|>", "<|file_sep|>"),
)


def fim_template(tokenizer) -> FimTemplate | None:
    vocab = tokenizer.get_vocab()
    for t in TEMPLATES:
        if all(x in vocab for x in (t.prefix, t.suffix, t.middle)):
            return t
    return None


def _text(tokenizer, s: str) -> list[int]:
    return list(tokenizer.encode(s, add_special_tokens=False, split_special_tokens=True)) if s else []


def _special(tokenizer, token: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(token)]


def build_fim(tokenizer, prefix: str, suffix: str, extra=(), filename: str | None = None) -> list[int]:
    t = fim_template(tokenizer)
    if t is None:  # prefix-only fallback: context files first, then the code before the cursor
        head = "".join(f"{f.text}\n\n" for f in extra)
        return _text(tokenizer, head + prefix)
    ids: list[int] = []
    if extra and t.repo and t.file_sep:
        ids += _special(tokenizer, t.repo) + _text(tokenizer, REPO_NAME + "\n")
        for f in extra:
            ids += _special(tokenizer, t.file_sep) + _text(tokenizer, f"{f.filename}\n{f.text}\n")
        ids += _special(tokenizer, t.file_sep) + _text(tokenizer, f"{filename or 'current'}\n")
    ids += _special(tokenizer, t.prefix) + _text(tokenizer, prefix)
    ids += _special(tokenizer, t.suffix) + _text(tokenizer, suffix)
    ids += _special(tokenizer, t.middle)
    return ids


def build_prompt(tokenizer, req: GenRequest) -> list[int]:
    """Token ids for `req`; RequestError for input the model cannot take."""
    if tokenizer is None:
        raise RequestError("invalid_request", "this model has no tokenizer; text requests are not possible")
    try:
        if req.kind == "fim":
            ids = build_fim(tokenizer, req.prefix, req.suffix, req.extra, req.filename)
        elif req.kind == "chat":
            ids = encode_prompt(tokenizer, messages=req.messages)
        else:
            ids = list(tokenizer.encode(req.prompt, add_special_tokens=False))
    except ValueError as e:  # prompts.encode's messages about bad messages / missing chat template
        raise RequestError("invalid_request", str(e)) from None
    if not ids:
        raise RequestError("invalid_request", "the prompt is empty: send a prefix, prompt or messages with text")
    return ids
