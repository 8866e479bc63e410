"""The only part of the native engine that touches tensors: prefill and decode over the cache.

Running sequences occupy cache slots 0..b-1 (the engine compacts the batch when one leaves),
so a decode step reads the contiguous prefix cache[:, :b] and needs no gather.

CUDA graphs (`EngineConfig.cuda_graphs`). Eager decoding on a GPU is launch-bound: measured on an
H100 (torch 2.11, SmolLM2 bf16), a step launched ~900 kernels and kept the GPU busy ~2.4 ms of
13-15 ms, the same at 1 and at 64 rows, and a random model with Llama-3-8B's layer shape
streamed its weights at a third of the card's bandwidth. `StepGraphs` replays each decode,
draft and verify forward as one graph: one per (decoder, rows padded to a power of two, width,
key length padded to a power of two), captured on first use. Padding is free of side effects
because the rows past the running ones are free cache slots, and keys past a row's position are
masked. Measured (H100, random model with Llama-3-8B's layers, 8 of them, bf16): a 1-row step
2.9x faster than eager, 4 rows 1.6x; at 16-64 rows with 513 keys it was slower, since keys are
padded to 1024 and attention (then SDPA) was most of those steps. Off by default.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...models import Decoder, KVCache


class ModelRunner:
    def __init__(self, decoder: Decoder, max_batch_size: int, max_seq_len: int, cuda_graphs: bool = False, max_width: int = 9):
        self.decoder = decoder
        p = next(decoder.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.cache = KVCache(decoder.cfg, max_batch_size, max_seq_len, self.dtype, self.device)
        self.graphs: StepGraphs | None = None
        if cuda_graphs:
            if self.device.type != "cuda":
                raise ValueError(f"cuda_graphs needs a CUDA device, not {self.device}")
            self.graphs = StepGraphs(self, capture=True, max_width=max_width)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], slots: list[int]) -> Tensor:
        """Write the prompts' K/V into `slots`; logits [n, V] at each prompt's last token.

        Equal prompts (the n samples of a request: a GRPO group) run through the model once; the
        first one's K/V are copied into the others' slots."""
        first: dict[tuple[int, ...], int] = {}
        source = [first.setdefault(tuple(p), i) for i, p in enumerate(prompts)]
        unique = sorted(first.values())
        if len(unique) == len(prompts):
            return self._prefill(prompts, slots)
        logits = self._prefill([prompts[i] for i in unique], [slots[i] for i in unique])
        for i, j in enumerate(source):
            if i != j:
                self.cache.move(slots[j], slots[i], len(prompts[i]))
        row = {j: r for r, j in enumerate(unique)}
        return logits[[row[j] for j in source]]

    def _prefill(self, prompts: list[list[int]], slots: list[int]) -> Tensor:
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        width = int(lengths.max())
        # Right padding: a short row writes junk K/V past its end; decode overwrites each of
        # those positions before any query can see it (keys j <= position only).
        tokens = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p)
        tokens = tokens.to(self.device)
        positions = torch.arange(width, device=self.device).expand(len(prompts), width)
        rows = torch.tensor(slots, device=self.device)
        hidden = self.decoder(tokens, positions, self.cache, rows=rows)  # [n, width, hidden]
        last = hidden[torch.arange(len(prompts), device=self.device), lengths - 1]
        return self.decoder.logits(last)

    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int]) -> Tensor:
        """One token per running slot 0..b-1 at its position; logits [b, V] for the next one."""
        tok = torch.tensor(tokens, device=self.device)[:, None]
        pos = torch.tensor(positions, device=self.device)[:, None]
        return self.forward(tok, pos, max(positions) + 1)[:, 0]

    @torch.inference_mode()
    def forward(self, tokens: Tensor, positions: Tensor, kv_len: int, decoder: Decoder | None = None) -> Tensor:
        """tokens/positions [b, T] for slots 0..b-1 → logits [b, T, V]. `decoder` may be the
        drafter, which shares this cache."""
        decoder = decoder or self.decoder
        if self.graphs is not None and (logits := self.graphs.run(decoder, tokens, positions, kv_len)) is not None:
            return logits
        return decoder.logits(decoder(tokens, positions, self.cache, kv_len=kv_len))

    @property
    def captures(self) -> int:
        """CUDA graphs captured so far (a step that captured one is no measure of step cost)."""
        return 0 if self.graphs is None else self.graphs.captures

    def synchronize(self) -> None:
        """Wait for queued device work, so wall-clock step timings mean something on CUDA."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def move(self, src: int, dst: int, length: int) -> None:
        self.cache.move(src, dst, length)


def _pow2_at_least(n: int, floor: int, cap: int) -> int | None:
    """The smallest floor * 2^i >= n, at most cap (cap itself if n fits only there); None if n > cap."""
    if n > cap:
        return None
    size = floor
    while size < n:
        size *= 2
    return min(size, cap)


class _Graph:
    """One captured forward: its static inputs and the decoder epoch it holds."""

    __slots__ = ("epoch", "tokens", "positions", "pad", "graph", "forward", "logits")


class StepGraphs:
    """Decode / draft / verify forwards replayed from CUDA graphs (see the module docstring).

    `run` pads `b` rows to B (a power of two, at most the cache's slots) with token 0 at
    positions 0..T-1 of free slots, and the key length to S (a power of two from 256, at most
    the cache's length); widths above `max_width` run eagerly. Every graph of a decoder writes
    its logits [B, T, V] (fp32, contiguous) at the start of that decoder's one buffer of
    slots x max_width x V, so graphs add no output memory; logits are valid until the next
    replay: callers use them within the step.
    `captures` counts captures (a step that captured is no step cost for the gate).
    `capture=False` runs the same padded forward eagerly (tests check the padding on CPUs with
    it). A decoder's graphs are dropped when its `graph_epoch` changes (its linears got new
    tensors); the drafter refreshes its weights in place once graphed, so updates keep them."""

    MIN_KEYS = 256

    def __init__(self, runner: ModelRunner, capture: bool = True, max_width: int = 9):
        self.runner, self.capture, self.max_width = runner, capture, max_width
        self.slots, self.max_len = runner.cache.k.shape[1], runner.cache.k.shape[2]
        self.graphs: dict[tuple, _Graph] = {}
        self.outputs: dict[int, Tensor] = {}  # id(decoder) -> its logits buffer (flat)
        self.captures = 0
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def run(self, decoder: Decoder, tokens: Tensor, positions: Tensor, kv_len: int) -> Tensor | None:
        b, T = tokens.shape
        B = _pow2_at_least(b, 1, self.slots)
        S = _pow2_at_least(kv_len, self.MIN_KEYS, self.max_len)
        if B is None or S is None or T > self.max_width:
            return None
        key = (id(decoder), B, T, S)
        g = self.graphs.get(key)
        if g is not None and g.epoch != decoder.graph_epoch:  # new tensors: every graph of it is stale
            for stale in [k for k in self.graphs if k[0] == key[0]]:
                del self.graphs[stale]
            g = None
        if g is None:
            g = self.graphs[key] = self._build(decoder, B, T, S)
        g.tokens[:b].copy_(tokens)
        g.positions[:b].copy_(positions)
        if b < B:  # rows of a larger batch may remain from the last replay
            g.tokens[b:].zero_()
            g.positions[b:].copy_(g.pad)
        if g.graph is not None:
            g.graph.replay()
        else:
            g.forward()
        return g.logits[:b]

    def _build(self, decoder: Decoder, B: int, T: int, S: int) -> _Graph:
        dev, cache = self.runner.device, self.runner.cache
        decoder.graphed = True  # from now on its weights are refreshed in place (Drafter.requantize)
        V = decoder.cfg.vocab_size
        flat = self.outputs.get(id(decoder))
        if flat is None:
            flat = self.outputs[id(decoder)] = torch.zeros(self.slots * self.max_width * V, device=dev)
        g = _Graph()
        g.logits = flat[: B * T * V].view(B, T, V)
        g.epoch, g.graph = decoder.graph_epoch, None
        g.tokens = torch.zeros(B, T, dtype=torch.long, device=dev)
        g.pad = torch.arange(T, device=dev)  # a padding row's positions
        # Until the first real step: positions S-T..S-1, at or past every running row's current
        # position (a step's keys end at kv_len <= S), which a step writes before any query reads.
        g.positions = (S - T + g.pad).repeat(B, 1)
        g.forward = lambda: g.logits.copy_(decoder.lm_head(decoder(g.tokens, g.positions, cache, kv_len=S)))
        if not self.capture:
            return g
        self.captures += 1
        side = torch.cuda.Stream(dev)  # warm-up (lazy library state) outside the graph
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                g.forward()
        torch.cuda.current_stream(dev).wait_stream(side)
        g.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g.graph, pool=self.pool):
            g.forward()
        return g
