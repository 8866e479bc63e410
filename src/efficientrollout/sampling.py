"""Token selection and log-probs, vectorised over the batch.

Reproducible seeds without per-row generators: each draw takes its uniform from a counter-based
hash of (sample seed, token position, stream), so a sample's tokens depend on its own seed and
logits only, never on its batch neighbours. Tokens are drawn by inverse CDF in vocabulary order
(filters only zero entries out), which keeps that independence when neighbours use top-k/top-p.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def derive_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a request seeded with `seed`."""
    return int(_splitmix64(np.array([seed ^ _splitmix64(np.array([index], np.uint64))[0]], np.uint64))[0]) >> 1


def seeded_uniform(seeds: list[int], positions: list[int], stream: int = 0) -> np.ndarray:
    """One uniform in [0, 1) per row, a pure function of (seed, position, stream); float64, 53 bits."""
    s = np.asarray(seeds, dtype=np.uint64)
    p = np.asarray(positions, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = _splitmix64(_splitmix64(s) ^ (p * np.uint64(0xD1B54A32D192ED03) + np.uint64(stream)))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(slots=True)
class SamplingBatch:
    """Per-row sampling parameters as tensors, built once per batch composition."""

    temperature: Tensor  # [b] fp32; 0 → greedy
    top_p: Tensor  # [b] fp32
    top_k: Tensor  # [b] int64; 0 → off
    any_sampled: bool
    any_filtered: bool

    @classmethod
    def build(cls, temperature: list[float], top_p: list[float], top_k: list[int], device: torch.device) -> "SamplingBatch":
        return cls(
            temperature=torch.tensor(temperature, dtype=torch.float32, device=device),
            top_p=torch.tensor(top_p, dtype=torch.float32, device=device),
            top_k=torch.tensor(top_k, dtype=torch.int64, device=device),
            any_sampled=any(t > 0 for t in temperature),
            any_filtered=any(t > 0 and (p < 1.0 or k > 0) for t, p, k in zip(temperature, top_p, top_k)),
        )

    def repeat_rows(self, times: int) -> "SamplingBatch":
        """Row i's parameters for each of its `times` positions (row-major)."""
        return SamplingBatch(self.temperature.repeat_interleave(times), self.top_p.repeat_interleave(times),
                             self.top_k.repeat_interleave(times), self.any_sampled, self.any_filtered)


def scaled_logprobs(logits: Tensor, temperature: Tensor) -> Tensor:
    """log_softmax(logits / T) over the full vocabulary, T = 1 where T == 0 (greedy). [b, V] fp32."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    return torch.log_softmax(logits.float() / t[:, None], dim=-1)


def filtered_probs(logprobs: Tensor, params: SamplingBatch) -> Tensor:
    """The distribution actually sampled from: top-k then top-p applied to exp(logprobs), renormalised."""
    probs = logprobs.exp()
    if not params.any_filtered:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(probs.shape[-1], device=probs.device)
    sampled = params.temperature > 0  # greedy rows are never filtered
    k = torch.where(sampled & (params.top_k > 0), params.top_k, probs.shape[-1])
    top_p = torch.where(sampled, params.top_p, torch.ones_like(params.top_p))
    # keep a token while the mass before it is < top_p (so the first token always stays)
    keep = (rank[None] < k[:, None]) & ((sorted_probs.cumsum(-1) - sorted_probs < top_p[:, None]) | (top_p[:, None] >= 1.0))
    keep_vocab = torch.zeros_like(keep).scatter_(-1, order, keep)
    probs = probs * keep_vocab
    return probs / probs.sum(-1, keepdim=True)


def inverse_cdf(probs: Tensor, uniforms: Tensor) -> Tensor:
    """Token per row with P(token) = probs[row, token]; uniforms [b] in [0, 1)."""
    cdf = probs.double().cumsum(-1)
    target = (uniforms.to(cdf) * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def sample(logits: Tensor, params: SamplingBatch, uniforms: Tensor) -> tuple[Tensor, Tensor]:
    """logits [b, V] → (tokens [b], their log-probs [b]) with the documented log-prob definition."""
    logprobs = scaled_logprobs(logits, params.temperature)
    tokens = logits.argmax(-1)
    if params.any_sampled:
        drawn = inverse_cdf(filtered_probs(logprobs, params), uniforms)
        tokens = torch.where(params.temperature > 0, drawn, tokens)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
