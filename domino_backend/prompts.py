"""Turn user input into prompt token ids: raw text, chat messages (the model's chat template), or
fill-in-the-middle (prefix/suffix) when the tokenizer has FIM tokens."""

from __future__ import annotations

FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"


def has_fim(tokenizer) -> bool:
    vocab = tokenizer.get_vocab()
    return all(t in vocab for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE))


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
        if has_fim(tokenizer):
            text = f"{FIM_PREFIX}{prefix}{FIM_SUFFIX}{suffix or ''}{FIM_MIDDLE}"
            return tokenizer.encode(text, add_special_tokens=False)
        prompt = prefix
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
