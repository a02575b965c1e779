"""Turn a GenRequest into prompt token ids for the in-process engine.

FIM requests are built by the code agent (`agents.code.fim`: repo context, budget trimming), chat
requests by the model's chat template (`domino_backend.prompts.encode_chat`); in both, what the
client wrote is tokenized as text and only the template inserts control tokens. Raw `text` prompts
(OpenAI /v1/completions without `suffix`) do parse control tokens, on purpose: clients such as
Continue render FIM templates themselves and send them as plain prompts.
"""

from __future__ import annotations

from agents.code.fim import prompt_ids
from domino_backend.prompts import encode_chat

from .backend import GenRequest, RequestError


def build_prompt(tokenizer, req: GenRequest, budget: int | None = None) -> list[int]:
    """Token ids for `req`; RequestError for input the model cannot take. budget: the prompt limit,
    which FIM prompts are trimmed to around the cursor (the caller refuses anything still over it)."""
    if tokenizer is None:
        raise RequestError("invalid_request", "this model has no tokenizer; text requests are not possible")
    try:
        if req.kind == "fim":
            ids = prompt_ids(tokenizer, req.prefix, req.suffix, req.extra, req.filename, budget)
        elif req.kind == "chat":
            ids = encode_chat(tokenizer, req.messages)
        else:
            ids = list(tokenizer.encode(req.prompt, add_special_tokens=False))
    except ValueError as e:  # prompts' messages about bad messages / missing chat template
        raise RequestError("invalid_request", str(e)) from None
    if not ids:
        raise RequestError("invalid_request", "the prompt is empty: send a prefix, prompt or messages with text")
    return ids
