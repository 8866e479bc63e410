"""The only part of the native engine that touches tensors: prefill and decode over the cache.

Running sequences occupy cache slots 0..b-1 (the engine compacts the batch when one leaves),
so a decode step reads the contiguous prefix cache[:, :b] and needs no gather.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...models import Decoder, KVCache


class ModelRunner:
    def __init__(self, decoder: Decoder, max_batch_size: int, max_seq_len: int):
        self.decoder = decoder
        p = next(decoder.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.cache = KVCache(decoder.cfg, max_batch_size, max_seq_len, self.dtype, self.device)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], slots: list[int]) -> Tensor:
        """Write the prompts' K/V into `slots`; logits [n, V] at each prompt's last token."""
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
        return decoder.logits(decoder(tokens, positions, self.cache, kv_len=kv_len))

    def synchronize(self) -> None:
        """Wait for queued device work, so wall-clock step timings mean something on CUDA."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def move(self, src: int, dst: int, length: int) -> None:
        self.cache.move(src, dst, length)
