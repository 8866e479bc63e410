"""The keyed race (sampling.race) as one Triton kernel for GPUs.

In PyTorch ops the race is ~40 small kernels, launch-bound: 0.64 ms a draw on an H100, a
quarter of a graphed SmolLM2 step. Here each row is one program: round 1 walks the groups a
tile at a time (their masses summed in fp32, arrivals in fp64, the earliest kept), round 2
races the winning group's tokens. Same hash, arrivals and first-arrival rule (the lowest index
wins a tie) as the PyTorch and C++ versions; the same picks up to the order of the group sums.
"""

from __future__ import annotations

import functools
import logging

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines: sampling.race uses the C++ or PyTorch race
    triton = None

log = logging.getLogger(__name__)


if triton is not None:

    @triton.jit
    def mix32(x):
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x2C1B3C6D
        return x ^ (x >> 16)

    @triton.jit
    def exponential(ids, lo, hi):
        h = mix32(mix32(ids.to(tl.uint32) ^ lo) ^ hi)
        return -tl.log((h.to(tl.float64) + 0.5) * (1.0 / 4294967296.0))

    @triton.jit
    def race_kernel(probs, keys, out, V, groups, stride, GROUP: tl.constexpr, TILE: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        row = probs + r * stride
        lo = tl.load(keys + 2 * r).to(tl.uint32)
        hi = tl.load(keys + 2 * r + 1).to(tl.uint32)
        within = tl.arange(0, GROUP)
        first = tl.full((), float("inf"), tl.float64)
        best = tl.full((), 0, tl.int32)
        for g0 in range(0, groups, TILE):  # round 1: groups race with their masses (ids V + g)
            g = g0 + tl.arange(0, TILE)
            ids = g[:, None] * GROUP + within[None, :]
            mass = tl.sum(tl.load(row + ids, mask=ids < V, other=0.0), axis=1)
            t = tl.where((mass > 0) & (g < groups), exponential(V + g, lo, hi) / mass.to(tl.float64), float("inf"))
            tile_first = tl.min(t, axis=0)
            tile_best = g0 + tl.argmin(t, axis=0)
            best = tl.where(tile_first < first, tile_best, best)
            first = tl.minimum(first, tile_first)
        ids = best * GROUP + within  # round 2: the winning group's tokens
        p = tl.load(row + ids, mask=ids < V, other=0.0)
        t = tl.where(p > 0, exponential(ids, lo, hi) / p.to(tl.float64), float("inf"))
        tl.store(out + r, (best * GROUP + tl.argmin(t, axis=0)).to(tl.int64))


def race_op(device: torch.device | None = None):
    """A `race(probs, keys, group)` for CUDA tensors, or None without Triton or where the kernel
    does not build or does not pick what the PyTorch race picks on `device` (checked once per
    device on a small probe; a warning says why)."""
    if triton is None:
        return None
    return _race if device is None or _works_on(str(device)) else None


@functools.cache
def _works_on(device: str) -> bool:
    from ..sampling import RACE_GROUP, race_keys, race_torch

    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(8, 3 * RACE_GROUP + 5, generator=gen) * 3, -1).to(device)
    keys = race_keys(list(range(8)), [1] * 8).to(device)
    try:
        if torch.equal(_race(probs, keys, RACE_GROUP), race_torch(probs, keys)):
            return True
        log.warning("the Triton race picks other tokens than the PyTorch race on %s; using PyTorch's", device)
    except Exception as exc:  # noqa: BLE001 - a Triton or driver that cannot build it: PyTorch's race still works
        log.warning("the Triton race is unavailable on %s (%s: %s); using PyTorch's", device, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    return False


def _race(probs: torch.Tensor, keys: torch.Tensor, group: int) -> torch.Tensor:
    """A pick per row of probs [b, V] fp32 by the race keyed by keys [b, 2]; `group` ids per
    group of round 1 (a power of two)."""
    if probs.dim() != 2 or probs.dtype != torch.float32 or keys.shape != (probs.shape[0], 2) or keys.dtype != torch.int64:
        raise ValueError("race: probs must be [b, V] fp32 and keys [b, 2] int64")
    if group <= 0 or group & (group - 1):
        raise ValueError("race: group must be a power of two")
    probs, keys = probs.contiguous(), keys.to(probs.device).contiguous()
    out = torch.empty(probs.shape[0], dtype=torch.int64, device=probs.device)
    if probs.shape[0]:
        V = probs.shape[1]
        race_kernel[(probs.shape[0],)](probs, keys, out, V, -(-V // group), probs.stride(0), GROUP=group, TILE=8, num_warps=4)
    return out

