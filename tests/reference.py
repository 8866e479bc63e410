"""Slow obvious references: transformers' own model, no KV cache, one full forward per token."""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy_reference(hf_model, prompt_ids: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    ids = list(prompt_ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = hf_model(torch.tensor([ids])).logits[0, -1]
        tok = int(logits.argmax())
        out.append(tok)
        ids.append(tok)
        if tok in eos:
            break
    return out


@torch.no_grad()
def reference_logprobs(hf_model, prompt_ids: list[int], output_ids: list[int], temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) of each output token, recomputed in one forward (as a trainer does)."""
    ids = torch.tensor([prompt_ids + output_ids])
    logits = hf_model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
    t = temperature if temperature > 0 else 1.0
    return torch.log_softmax(logits / t, dim=-1).gather(-1, torch.tensor(output_ids)[:, None]).squeeze(-1)
