"""One speculative decode step for slots 0..b-1: K drafter steps over the shared KV cache, one
target forward over the K+1 positions, lossless acceptance. Tensor work only; the engine does
the bookkeeping. Two couplings of draft and target (SpeculationConfig.coupling):

- race (sampling.race): the drafter races its distribution with the key plain sampling would
  use at that position, the target races its own at every position, and drafts are accepted
  while they equal the target's winners; the step emits the target's winners, exactly the
  tokens plain sampling draws, whatever K is (up to the rounding differences of a K+1-wide
  forward against a 1-wide one).
- rejection: standard speculative sampling (verify.py), uniforms keyed by (seed, position,
  stream): 1 = draft token, 2 = acceptance test, 3 = correction / bonus token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from ...sampling import (
    SamplingBatch,
    draw,
    filtered_probs,
    inverse_cdf,
    race_keys,
    scaled_logprobs,
    seeded_uniform,
)
from ...speculation.verify import accept_lengths, verify
from .runner import ModelRunner


@dataclass(slots=True)
class SpecOutcome:
    n_accepted: list[int]  # per row
    emitted: list[list[int]]  # per row: n_accepted + 1 tokens
    logprobs: list[list[float]]  # the target's log-probs of the emitted tokens
    draft_s: float  # seconds for all K drafter steps
    verify_s: float


def _per_position(hash_rows, seeds: list[int], positions: Tensor) -> Tensor:
    """positions [b, T] → hash_rows(seeds, positions) of each (row's seed, position), [b, T, ...]
    on positions' device."""
    b, T = positions.shape
    out = torch.as_tensor(hash_rows([s for s in seeds for _ in range(T)], positions.reshape(-1).tolist()))
    return out.view(b, T, *out.shape[1:]).to(positions.device)


def _uniforms(seeds: list[int], positions: Tensor, stream: int) -> Tensor:
    """positions [b, T] → uniforms [b, T] (float64)."""
    return _per_position(lambda s, p: seeded_uniform(s, p, stream), seeds, positions)


@torch.inference_mode()
def speculative_step(
    runner: ModelRunner, drafter, last_tokens: list[int], last_positions: list[int], seeds: list[int], params: SamplingBatch, k: int,
    coupling: str = "rejection",
) -> SpecOutcome:
    dev, b, sampled = runner.device, len(last_tokens), params.any_sampled
    greedy = params.temperature == 0
    race = sampled and coupling == "race"
    last = torch.tensor(last_tokens, device=dev)
    positions = torch.tensor(last_positions, device=dev)[:, None] + torch.arange(k + 1, device=dev)  # [b, K+1]
    kv_len = max(last_positions) + k + 1

    t0 = time.perf_counter()
    keys = _per_position(race_keys, seeds, positions + 1) if race else None  # the token drafted / verified at each position + 1
    draft_u = _uniforms(seeds, positions[:, 1:], 1) if sampled and not race else None
    cur, drafts, draft_probs = last, [], []
    for i in range(k):
        logits = runner.forward(cur[:, None], positions[:, i : i + 1], kv_len, decoder=drafter)[:, 0]
        cur = logits.argmax(-1)
        if race:
            cur = torch.where(greedy, cur, draw(scaled_logprobs(logits, params.temperature), params, keys=keys[:, i]))
        elif sampled:
            probs = filtered_probs(scaled_logprobs(logits, params.temperature), params)
            cur = torch.where(greedy, cur, inverse_cdf(probs, draft_u[:, i]))
            draft_probs.append(probs)
        drafts.append(cur)
    drafts_t = torch.stack(drafts, dim=1)  # [b, K]
    runner.synchronize()
    t1 = time.perf_counter()

    logits = runner.forward(torch.cat((last[:, None], drafts_t), dim=1), positions, kv_len)  # [b, K+1, V]
    V = logits.shape[-1]
    flat = params.repeat_rows(k + 1)
    logprobs = scaled_logprobs(logits.view(-1, V), flat.temperature)  # [b*(K+1), V]
    if race:  # the target's own picks, as plain steps would make them; drafts stand while they match
        picks = torch.where(flat.temperature > 0, draw(logprobs, flat, keys=keys.view(-1, 2)), logits.view(-1, V).argmax(-1))
        emitted = picks.view(b, k + 1)
        n = accept_lengths(drafts_t == emitted[:, :k])
    elif sampled:
        n, emitted = verify(
            drafts_t, torch.stack(draft_probs, dim=1), filtered_probs(logprobs, flat).view(b, k + 1, V),
            logits.argmax(-1), greedy, _uniforms(seeds, positions[:, 1:], 2), _uniforms(seeds, positions + 1, 3),
        )
    else:
        zeros = torch.zeros(b, k + 1, device=dev)
        n, emitted = verify(drafts_t, None, None, logits.argmax(-1), greedy, zeros[:, :k], zeros)
    lp = logprobs.view(b, k + 1, V).gather(-1, emitted[..., None]).squeeze(-1)  # [b, K+1]
    n_list, em, lps = n.tolist(), emitted.tolist(), lp.tolist()
    t2 = time.perf_counter()
    return SpecOutcome(n_list, [em[i][: n_list[i] + 1] for i in range(b)], [lps[i][: n_list[i] + 1] for i in range(b)], t1 - t0, t2 - t1)
