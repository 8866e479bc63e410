"""Requests to prompt token ids, the same way for every backend: the same chat template, the
same ids, so a request means the same thing whichever engine serves it."""

from __future__ import annotations

from pathlib import Path

from ..protocol import RolloutRequest


class PromptError(ValueError):
    """A request this engine cannot serve (bad tokens, too long, too new a policy version)."""


def encode_prompt(tokenizer, request: RolloutRequest, vocab_size: int, max_seq_len: int, model_path: Path) -> list[int]:
    """The prompt's token ids; PromptError if they cannot be served, including when the chat
    template or the tokenizer fails on this request (an empty chat, say)."""
    try:
        ids = _encode(tokenizer, request, vocab_size, model_path)
    except PromptError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the template or tokenizer raises, it is this request's
        raise PromptError(f"could not encode the prompt ({type(exc).__name__}: {exc})") from exc
    if not ids:
        raise PromptError("the prompt is empty")
    if len(ids) >= max_seq_len:
        raise PromptError(f"prompt has {len(ids)} tokens; this engine's max_seq_len is {max_seq_len}")
    return list(ids)


def _encode(tokenizer, request: RolloutRequest, vocab_size: int, model_path: Path) -> list[int]:
    if request.prompt_token_ids is not None:
        ids = request.prompt_token_ids
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise PromptError(f"prompt_token_ids out of range [0, {vocab_size}): {bad[:5]}")
    elif request.messages is not None:
        if tokenizer.chat_template is None:
            raise PromptError(f"the model at {model_path} has no chat template; send prompt text or token ids")
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        ids = tokenizer.encode(request.prompt)
    return ids
