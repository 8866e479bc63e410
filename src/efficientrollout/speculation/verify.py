"""Lossless verification of K draft tokens per row, vectorised (no per-row Python loop).

Greedy rows accept while the draft equals the target's argmax, then emit the target's argmax.
Sampled rows use standard speculative sampling: accept draft d_k with probability
min(1, p_t(d_k) / p_d(d_k)); at the first rejection emit a sample of norm(max(0, p_t - p_d));
when all K are accepted emit a bonus sample of p_t at position K. p_t and p_d are the
*filtered* distributions (temperature, top-k, top-p applied identically to both), so the
emitted tokens follow exactly the distribution plain sampling draws from.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..sampling import inverse_cdf


def accept_lengths(accepted: Tensor) -> Tensor:
    """accepted [b, K] bool → number of leading accepted drafts per row [b]."""
    return accepted.long().cumprod(dim=1).sum(dim=1)


def verify(
    drafts: Tensor,  # [b, K] draft tokens
    draft_probs: Tensor | None,  # [b, K, V] filtered drafter distributions (None if every row is greedy)
    target_probs: Tensor | None,  # [b, K+1, V] filtered target distributions (None if every row is greedy)
    target_argmax: Tensor,  # [b, K+1]
    greedy: Tensor,  # [b] bool
    u_accept: Tensor,  # [b, K] uniforms for the acceptance tests
    u_resample: Tensor,  # [b, K+1] uniforms; a row uses the one at its accept count n
) -> tuple[Tensor, Tensor]:
    """→ (n_accepted [b], emitted [b, K+1]): row i emits emitted[i, : n_accepted[i] + 1]."""
    b, K = drafts.shape
    rows = torch.arange(b, device=drafts.device)
    accepted = drafts == target_argmax[:, :K]
    if target_probs is not None:
        assert draft_probs is not None
        p_t = target_probs[:, :K].gather(-1, drafts[..., None]).squeeze(-1)
        p_d = draft_probs.gather(-1, drafts[..., None]).squeeze(-1)
        # u < p_t / p_d, written without dividing (p_d > 0 for every drafted token)
        sampled_accept = u_accept.to(p_t) * p_d < p_t
        accepted = torch.where(greedy[:, None], accepted, sampled_accept)
    n = accept_lengths(accepted)
    last = target_argmax[rows, n]
    if target_probs is not None:
        pt_n = target_probs[rows, n]  # [b, V]
        pd_n = torch.zeros_like(pt_n)
        rejected = n < K
        if K > 0:
            pd_n[rejected] = draft_probs[rows[rejected], n[rejected]]
        residual = (pt_n - pd_n).clamp_(min=0)
        mass = residual.sum(-1, keepdim=True)
        # p_t == p_d exactly leaves no residual mass; then any rejection was impossible
        residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), pt_n)
        drawn = inverse_cdf(residual, u_resample[rows, n])
        last = torch.where(greedy, last, drawn)
    emitted = torch.cat((drafts, torch.zeros_like(drafts[:, :1])), dim=1)
    emitted[rows, n] = last
    return n, emitted
