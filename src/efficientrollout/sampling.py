"""Token selection and log-probs, vectorised over the batch.

Reproducible seeds without per-row generators: each draw takes its randomness from a
counter-based hash of (sample seed, token position, stream), so a sample's tokens depend on its
own seed and logits only, never on its batch neighbours. Two ways to turn that into a token:

- inverse CDF in vocabulary order (`inverse_cdf`; filters only zero entries out), what plain
  steps and rejection sampling draw with (the default coupling);
- an exponential race (`race`): token i arrives at E_i / p_i, E_i = -log U_i with U_i hashed
  from (seed, position, i), and the first arrival wins, which is a draw from p. Two
  distributions raced with the same key mostly pick the same token where they are alike, so a
  drafter racing with the target's key drafts the token plain sampling will pick as often as
  it can (speculative.py, `--coupling race`). The race runs in two rounds, groups of ids then tokens, which
  hashes ~450 ids per row instead of the vocabulary. (A race over the top 64 tokens with the
  rest as one competitor was cheaper still but coupled badly: at temperature 1 the rest often
  wins, and its pick by inverse CDF almost never matches: drafts accepted 0.74 vs 0.91 by
  rejection sampling, SmolLM2, K = 4.)

On CPUs both run as one C++ pass per row (kernels/sampling_cpu.cpp), and so does a whole
`sample` without top-k / top-p (softmax, draw and log-prob); the race on GPUs as one Triton
kernel (kernels/sampling_triton.py); the rest as PyTorch ops.
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


def _seeded_hash(seeds: list[int], positions: list[int], stream: int) -> np.ndarray:
    s = np.asarray(seeds, dtype=np.uint64)
    p = np.asarray(positions, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _splitmix64(_splitmix64(s) ^ (p * np.uint64(0xD1B54A32D192ED03) + np.uint64(stream)))


def seeded_uniform(seeds: list[int], positions: list[int], stream: int = 0) -> np.ndarray:
    """One uniform in [0, 1) per row, a pure function of (seed, position, stream); float64, 53 bits."""
    return (_seeded_hash(seeds, positions, stream) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


RACE_STREAM = 4  # the race's key stream (speculative.py uses 1-3 for rejection sampling)
RACE_GROUP = 256  # vocabulary ids per group of the race's first round (race())


def race_keys(seeds: list[int], positions: list[int]) -> Tensor:
    """Per row the race key of (seed, position): [n, 2] int64, two 32-bit halves."""
    h = _seeded_hash(seeds, positions, RACE_STREAM)
    return torch.from_numpy(np.stack((h & np.uint64(0xFFFFFFFF), h >> np.uint64(32)), axis=-1).astype(np.int64))


_M32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit bijection that spreads every input bit over the output (xorshift-multiply rounds);
    int64 holding 0..2^32-1, and multipliers below 2^31 so no product overflows."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def race_uniforms(keys: Tensor, ids: Tensor) -> Tensor:
    """keys [b, 2], token ids [b, M] → U [b, M] in (0, 1), float64: a pure function of (key, id)."""
    h = _mix32(_mix32(ids ^ keys[:, :1]) ^ keys[:, 1:])
    return (h.double() + 0.5) * (1.0 / (1 << 32))


def race(probs: Tensor, keys: Tensor) -> Tensor:
    """A token per row drawn from probs [b, V] by the keyed race (module docstring), in two rounds:
    the vocabulary's groups of RACE_GROUP consecutive ids race with their masses, then the winning
    group's tokens race with theirs (each round exact, so the pick is a draw from probs)."""
    if (ops := _cpu_draws(probs)) is not None:
        return ops.race(probs, keys, RACE_GROUP)
    if probs.is_cuda and probs.dtype == torch.float32:
        from .kernels.sampling_triton import race_op

        if (op := race_op(probs.device)) is not None:
            return op(probs, keys, RACE_GROUP)
    return race_torch(probs, keys)


def _cpu_draws(probs: Tensor):
    """Our CPU kernels where they can draw from `probs` (fp32 on a CPU: kernels/sampling_cpu.cpp,
    one pass per row), else None (the PyTorch versions)."""
    if probs.device.type != "cpu" or probs.dtype != torch.float32:
        return None
    from .kernels import cpu_ops

    return cpu_ops()


def race_torch(probs: Tensor, keys: Tensor) -> Tensor:
    """`race` in PyTorch ops (any device)."""
    b, V = probs.shape
    groups = -(-V // RACE_GROUP)
    padded = probs if V == groups * RACE_GROUP else torch.nn.functional.pad(probs, (0, groups * RACE_GROUP - V))
    padded = padded.view(b, groups, RACE_GROUP)
    group_ids = V + torch.arange(groups, device=probs.device).expand(b, groups)  # ids no token has
    g = _first_arrival(race_uniforms(keys, group_ids), padded.sum(-1))
    ids = g[:, None] * RACE_GROUP + torch.arange(RACE_GROUP, device=probs.device)
    return g * RACE_GROUP + _first_arrival(race_uniforms(keys, ids), padded[torch.arange(b, device=probs.device), g])


def _first_arrival(u: Tensor, rates: Tensor) -> Tensor:
    """Index of the first arrival when entry j arrives at -log(u_j) / rates_j (never at rate 0)."""
    return (-torch.log(u) / rates.double()).argmin(-1)


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
    """Token per row with P(token) = probs[row, token]; uniforms [b] in [0, 1): the first token
    whose cumulative mass exceeds u times the row's total."""
    ops = _cpu_draws(probs)
    return ops.inverse_cdf(probs, uniforms.double()) if ops is not None else inverse_cdf_torch(probs, uniforms)


def inverse_cdf_torch(probs: Tensor, uniforms: Tensor) -> Tensor:
    """`inverse_cdf` in PyTorch ops (any device)."""
    cdf = probs.double().cumsum(-1)
    target = (uniforms.to(cdf) * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def draw(logprobs: Tensor, params: SamplingBatch, keys: Tensor | None = None, uniforms: Tensor | None = None) -> Tensor:
    """A draw per row from the filtered distribution of scaled log-probs [b, V]: by race with
    `keys` [b, 2], else by inverse CDF with `uniforms` [b] (callers keep the argmax in greedy rows)."""
    probs = filtered_probs(logprobs, params)
    return race(probs, keys) if keys is not None else inverse_cdf(probs, uniforms)


def sample(logits: Tensor, params: SamplingBatch, keys: Tensor | None = None, uniforms: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """logits [b, V] → (tokens [b], their log-probs [b]) with the documented log-prob definition;
    sampled rows drawn as `draw` draws them (on CPUs without top-k / top-p: one C++ pass per row,
    the same picks and log-probs up to rounding)."""
    if not params.any_filtered and (ops := _cpu_draws(logits := logits.float())) is not None:
        return ops.sample_rows(logits, params.temperature, None if uniforms is None else uniforms.double(), keys, RACE_GROUP)
    return sample_torch(logits, params, keys, uniforms)


def sample_torch(logits: Tensor, params: SamplingBatch, keys: Tensor | None = None, uniforms: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`sample` in PyTorch ops (with `draw`'s kernels)."""
    logprobs = scaled_logprobs(logits, params.temperature)
    tokens = logits.argmax(-1)
    if params.any_sampled:
        tokens = torch.where(params.temperature > 0, draw(logprobs, params, keys, uniforms), tokens)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
