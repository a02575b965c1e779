"""Turn a GenRequest into prompt token ids for the in-process engine (FIM templates live in
domino_backend.prompts). Raw `text` prompts (OpenAI /v1/completions) do parse special tokens,
because clients such as Continue render FIM templates themselves and send them as plain prompts.
"""

from __future__ import annotations

from domino_backend.prompts import build_fim
from domino_backend.prompts import encode as encode_prompt

from .backend import GenRequest, RequestError


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
