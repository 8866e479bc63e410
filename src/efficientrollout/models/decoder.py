"""Our own compact decoder for the Llama / Qwen2 / Qwen3 families.

Why not transformers' modeling code: speculation needs to own the KV cache and the step. The
cache is static and written by position ([L, B, S, Hkv, D], one row per batch slot), so a
verify pass simply overwrites rejected draft positions and positions advance per row: no
rollback. q/k/v and gate/up are fused into single linears (fewer ops per step); every linear
is an `nn.Linear`, so torchao's `quantize_` can derive a drafter from the same modules.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..kernels import cpu_ops, panel_ops, streamed_linear_op
from .config import ModelConfig


# SDPA's cuDNN backend (PyTorch's first choice for bf16 on Hopper) builds a cuDNN graph for every
# new shape: on an H100 (torch 2.11), when decode steps still used SDPA, a bf16 engine step of a
# SmolLM2-shaped model cost 50-63 ms where fp32, which never takes cuDNN, cost 18-24 ms: one
# graph build per step. Decode and verify no longer use SDPA on CUDA (`cached_attention`), but
# prefill does, and a wave's prompt lengths are new shapes too. The other backends have no
# per-shape set-up.
_CUDA_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    if x.device.type == "cpu" and (kernels := cpu_ops()) is not None:  # one kernel, bit-identical to below (bf16)
        return kernels.rms_norm(x, weight, eps)  # (fp32: ATen's "fused" rms_norm is ~8 ops, 14 us a call, 0.8 ms a step)
    if x.dtype == torch.float32:  # one fused kernel; same math as below
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    if x.is_cuda:  # the same order in 4 kernels instead of 8 (CUDA-graph step 2-6% faster, H200)
        return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)
    # Reference op order for low precision: normalise in fp32, cast back, then scale.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """"Rotate half" RoPE: x*cos + cat(-x2, x1)*sin, written as x*cos + cat(x2, x1)*cat(-sin, sin)
    (bit-identical, fewer ops). x [b, T, H, D]; cos, sin_signed [b, T, 1, D]."""
    b, T, H, D = x.shape
    swapped = x.view(b, T, H, 2, D // 2).flip(-2).view(b, T, H, D)
    return x * cos + swapped * sin_signed


def cached_attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """Attention of a few new queries per row over the cache, as two batched matmuls.

    Why not SDPA: on CPUs in bf16, `scaled_dot_product_attention` with a mask over the cache
    costs 0.17 ms per layer at batch 4, 0.67 ms at 16 and 2.7 ms at 64 (one query each, 100
    keys; measured on a 2-core AVX512-BF16 CPU), most of a batch-64 step; these matmuls take
    0.06, 0.09 and 0.19 ms. On CUDA, with SDPA (a mask over the cache, GQA) CUDA-graph steps of
    a bf16 model with Llama-3-8B's layers took 1.3x (1 row, 512 keys) to 3.3x (16 rows, 2000
    keys) as long as with these matmuls on an H200, and launched more copy kernels
    (docs/profile_h200_llama8b_8layers_attention.txt). Scores are softmaxed in fp32.
    q [b, H, T, D]; keys, values [b, Hkv, S, D]; mask [b, 1, T, S] (True: visible) → [b, H, T, D]."""
    b, H, T, D = q.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    g = H // Hkv  # query heads per kv head (GQA): their queries share one matmul
    scores = torch.matmul(q.reshape(b, Hkv, g * T, D), keys.transpose(-1, -2)).float() * D**-0.5  # [b, Hkv, g*T, S]
    scores = scores.view(b, Hkv, g, T, S).masked_fill(~mask[:, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype).view(b, Hkv, g * T, S)
    return torch.matmul(probs, values).view(b, H, T, D)


class Linear(nn.Linear):
    """nn.Linear that can run from a oneDNN-prepacked copy of its weight on CPU.

    Measured on a 2-core AVX2 CPU (fp32, all 120 layer linears of SmolLM2): prepacked oneDNN
    is 1.3x faster than torch's default GEMM at 1 row, 2.3x at 4, 1.4x at 16 and 64. The
    packed copy is derived state: `pack()` again after the weights change.

    On AVX512-BF16 CPUs, 1-12 rows of a layer-sized bf16 linear run our weight-streaming kernel
    (kernels/gemv_cpu.cpp) instead: all 120 layer linears of SmolLM2 take 0.81x oneDNN's time
    at 1 row, 0.84x at 2, 0.92x at 4, 0.75x at 8, 0.79x at 12 (2 cores); at 16 rows it is
    compute-bound and 1.1x. On AVX2+FMA CPUs, fp32 weights take our fp32 kernel
    (kernels/gemv_f32_cpu.cpp) at 1-12 rows: 0.81x oneDNN's time at 1 row, 0.62x at 4 (2-core
    AVX512 CPU, fp32 engine; unmeasured on an AVX2-only CPU), the LM head included
    (GEMV_MAX_WEIGHT). oneDNN keeps large bf16 weights (the LM head, where it streams at ~80
    GB/s) and larger batches. On AVX-512 CPUs an fp32 weight is kept as panels
    (kernels/panels_f32_cpu.cpp) instead of oneDNN's copy, and from 5 rows up runs there
    (`f32_linear`): SmolLM2's 120 layer linears 0.53x oneDNN's time at 12 rows, 0.61x at 24,
    0.97x at 512-2048 (one core)."""

    packed: Tensor | None = None
    stream = None  # our kernel for 1-12 rows of this linear (bf16_gemv, f32_gemv), where one serves it
    panels: Tensor | None = None  # fp32 on AVX-512 CPUs: the weight as panels (f32_linear), in place of oneDNN's copy

    def pack(self) -> None:
        w = self.weight
        if self.panels is not None and panel_ops(w) is not None:  # new weights: refreshed in place, no new memory
            self.panels.copy_(w.detach().view(-1, 16, w.shape[1]).transpose(1, 2))
            return
        # oneDNN's copy is refreshed in place through a temporary of this linear's size: a new
        # copy each time cost a model's worth of fresh pages (first update of SmolLM2 fp32: 1.07 s)
        if self.packed is not None and w.device.type == "cpu" and (self.packed.dtype, self.packed.shape) == (w.dtype, w.shape):
            self.packed.copy_(torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1))
            return
        self.packed = self.stream = self.panels = None
        if (ops := panel_ops(w)) is not None:
            self.panels = ops.f32_panels(w.detach())
        elif w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available():
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1)
            except RuntimeError:  # e.g. bf16 on a CPU without AVX512: keep the default GEMM
                pass
        if w.numel() <= GEMV_MAX_WEIGHT or w.dtype == torch.float32:
            self.stream = streamed_linear_op(w)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.panels is not None:
            y = cpu_ops().f32_linear(x2, self.weight, self.panels, self.bias)
        elif self.stream is not None and x2.shape[0] <= GEMV_MAX_ROWS:
            y = self.stream(x2, self.weight, self.bias)
        elif self.packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(x2, self.packed, self.bias, "none", [], "")
        else:
            return F.linear(x, self.weight, self.bias)
        return y.view(*lead, y.shape[-1])

    def gemv_weights(self) -> list[Tensor] | None:
        """The weights as `decode_stack` takes them, where our kernel (bf16 or fp32) serves this linear."""
        if self.panels is not None and self.stream is not None:
            return [self.weight, self.panels]
        return [self.weight] if self.stream is not None else None


GEMV_MAX_ROWS = 12
# decode/verify rows the fused layers take where fp32 panels serve every linear (SmolLM2, one core:
# verify of 16-18 rows 0.91-0.94x the module path's time)
FUSED_PANEL_ROWS = 32
# bf16 weights of up to this many elements: every layer linear of small models, not a 49k-token LM
# head, where oneDNN is as fast (0.8-1.1x at 1-12 rows). fp32 weights of any size: our kernel
# takes SmolLM2's fp32 LM head in 0.49-0.73x oneDNN's time at 2-12 rows (one or two threads,
# AVX512-BF16 CPU; 1 row: 0.96-1.02x).
GEMV_MAX_WEIGHT = 4 << 20


class KVCache(nn.Module):
    """Preallocated keys and values, [layers, slots, max_seq_len, kv_heads, head_dim] each."""

    def __init__(self, cfg: ModelConfig, slots: int, max_seq_len: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        shape = (cfg.num_layers, slots, max_seq_len, cfg.num_kv_heads, cfg.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot `src`'s first `length` positions into slot `dst` (batch compaction)."""
        self.k[:, dst, :length].copy_(self.k[:, src, :length])
        self.v[:, dst, :length].copy_(self.v[:, src, :length])


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.input_norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.qkv = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        if cfg.qk_norm:
            self.q_norm = nn.Parameter(torch.ones(cfg.head_dim))
            self.k_norm = nn.Parameter(torch.ones(cfg.head_dim))
        self.o = Linear(cfg.q_size, cfg.hidden_size, bias=False)
        self.post_norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.gate_up = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: "StepContext", k_cache: Tensor, v_cache: Tensor) -> Tensor:
        cfg = self.cfg
        b, T, _ = x.shape
        h = rms_norm(x, self.input_norm, cfg.rms_norm_eps)
        qkv = self.qkv(h).view(b, T, cfg.num_heads + 2 * cfg.num_kv_heads, cfg.head_dim)
        if ctx.kernels is not None and not cfg.qk_norm:  # decode/verify on CPU: one kernel
            q = ctx.kernels.rope_and_cache(qkv, cos, sin, k_cache, v_cache, ctx.rows, ctx.positions, cfg.num_heads)
        else:
            qk, v = qkv.split([cfg.num_heads + cfg.num_kv_heads, cfg.num_kv_heads], dim=2)
            if cfg.qk_norm:
                q, k = qk.split([cfg.num_heads, cfg.num_kv_heads], dim=2)
                qk = torch.cat((rms_norm(q, self.q_norm, cfg.rms_norm_eps), rms_norm(k, self.k_norm, cfg.rms_norm_eps)), dim=2)
            q, k = apply_rope(qk, cos, sin).split([cfg.num_heads, cfg.num_kv_heads], dim=2)  # RoPE on q and k at once
            k_cache[ctx.rows_bt, ctx.positions] = k
            v_cache[ctx.rows_bt, ctx.positions] = v
        if ctx.kv_len is None:
            # Prefill: prompts start at position 0, attend the fresh keys causally.
            attn = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
            ).transpose(1, 2)
        elif ctx.kernels is not None:  # our CPU kernel reads the cache in place: [b, T, H, D]
            attn = ctx.kernels.decode_attention(q, k_cache, v_cache, ctx.positions, ctx.kv_len)
        else:
            # Decode / verify: rows are cache slots 0..b-1, attend the cache up to kv_len.
            keys = k_cache[:b, : ctx.kv_len].transpose(1, 2)  # [b, Hkv, S, D]
            values = v_cache[:b, : ctx.kv_len].transpose(1, 2)
            if x.is_cuda or (b > 1 and x.dtype != torch.float32):
                attn = cached_attention(q.transpose(1, 2), keys, values, ctx.mask)
            else:  # fp32 and single rows on CPUs: SDPA is as fast or faster
                attn = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=ctx.mask, enable_gqa=True)
            attn = attn.transpose(1, 2)
        x = x + self.o(attn.reshape(b, T, cfg.q_size))
        h = rms_norm(x, self.post_norm, cfg.rms_norm_eps)
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def visible_keys(positions: Tensor, kv_len: int) -> Tensor:
    """Which of the first kv_len cached keys each query sees: key j iff j <= its position.
    positions [b, T] → mask [b, 1, T, kv_len]."""
    return (torch.arange(kv_len, device=positions.device) <= positions[:, :, None])[:, None]


class StepContext:
    """Per-step indexing shared by all layers: which cache rows and positions the tokens occupy."""

    __slots__ = ("rows", "rows_bt", "positions", "kv_len", "mask", "kernels")

    def __init__(self, positions: Tensor, rows: Tensor | None, kv_len: int | None, kernels=None):
        b, T = positions.shape
        self.positions = positions  # [b, T]
        if rows is None:
            rows = torch.arange(b, device=positions.device)
        self.rows = rows
        self.rows_bt = rows[:, None].expand(b, T)
        self.kv_len = kv_len
        self.kernels = kernels  # torch.ops namespace of our CPU decode kernels, or None
        self.mask = None
        if kv_len is not None and kernels is None:
            # key j is visible to the query at position p iff j <= p  → [b, 1, T, kv_len]
            self.mask = visible_keys(positions, kv_len)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, inv_freq: Tensor, rope_scale: float, max_seq_len: int):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self._fused: tuple | None = None  # see fused_layers()
        self._fused_rows = GEMV_MAX_ROWS  # rows the fused layers take: more where every linear has fp32 panels
        self.graph_epoch = 0  # bumped when linears get new tensors: CUDA graphs holding the old ones are stale
        self.graphed = False  # CUDA graphs hold its tensors: refresh them in place where possible
        self.register_buffer("cos", torch.empty(max_seq_len, cfg.head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, cfg.head_dim), persistent=False)
        self._init_rope(inv_freq, rope_scale, max_seq_len)

    @classmethod
    def empty(cls, cfg: ModelConfig, inv_freq: Tensor, rope_scale: float, max_seq_len: int, dtype: torch.dtype, device: torch.device) -> "Decoder":
        """Allocate without initialising (the weights are loaded next)."""
        with torch.device("meta"):
            decoder = cls(cfg, inv_freq, rope_scale, max_seq_len)
        decoder = decoder.to_empty(device=device).to(dtype)
        if cfg.tie_word_embeddings:  # to_empty gives each module its own tensor
            decoder.lm_head.weight = decoder.embed.weight
        decoder._init_rope(inv_freq, rope_scale, max_seq_len)
        return decoder

    def _init_rope(self, inv_freq: Tensor, rope_scale: float, max_seq_len: int) -> None:
        if self.cos.is_meta:
            return
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq.float())
        cos, sin = angles.cos() * rope_scale, angles.sin() * rope_scale  # [S, D/2], fp32 like the reference
        self.cos = torch.cat((cos, cos), dim=-1).to(self.cos.device)
        self.sin = torch.cat((-sin, sin), dim=-1).to(self.sin.device)  # signed: see apply_rope

    def forward(self, tokens: Tensor, positions: Tensor, cache: KVCache, rows: Tensor | None = None, kv_len: int | None = None) -> Tensor:
        """tokens, positions [b, T] → final hidden states [b, T, hidden].

        rows=None, kv_len=n: decode/verify for cache slots 0..b-1 attending positions < n.
        rows=slots, kv_len=None: prefill of prompts (starting at position 0) into those slots.
        """
        if kv_len is not None and (layers := self.fused_layers()) is not None and tokens.numel() <= self._fused_rows:
            return self._forward_fused(tokens, positions, cache, kv_len, layers)
        ctx = StepContext(positions, rows, kv_len, None if kv_len is None else self.decode_kernels(tokens))
        x = self.embed(tokens)
        cos = self.cos[positions].to(x.dtype)[:, :, None]
        sin = self.sin[positions].to(x.dtype)[:, :, None]
        with sdpa_kernel(_CUDA_SDPA) if x.is_cuda else nullcontext():
            for i, layer in enumerate(self.layers):
                x = layer(x, cos, sin, ctx, cache.k[i], cache.v[i])
        return rms_norm(x, self.norm, self.cfg.rms_norm_eps)

    def _forward_fused(self, tokens: Tensor, positions: Tensor, cache: KVCache, kv_len: int, layers: tuple) -> Tensor:
        """A few rows of decode/verify with all layers in one C++ call (kernels/layer_cpu.cpp):
        the same kernels as the layer code above, without the interpreter between them."""
        cfg, kernels = self.cfg, cpu_ops()
        b, T = tokens.shape
        x = self.embed(tokens).view(b * T, cfg.hidden_size)
        cos, sin = self.cos[positions].to(x.dtype), self.sin[positions].to(x.dtype)  # [b, T, D]
        x = kernels.decode_stack(x, *layers, cfg.rms_norm_eps, cos, sin, cache.k, cache.v, torch.arange(b), positions, kv_len, cfg.num_heads)
        return rms_norm(x.view(b, T, cfg.hidden_size), self.norm, cfg.rms_norm_eps)

    def fused_layers(self) -> tuple[list[Tensor], list[int]] | None:
        """`decode_stack`'s weights and counts, or None where a layer cannot run there (no
        kernels, QK-norm models, fp16, a linear our kernels do not serve). Derived state: call
        `invalidate_fused()` when linears or their weights' tensors change."""
        if self._fused is None:
            self._fused = self._build_fused() or ()
        return self._fused or None

    def invalidate_fused(self) -> None:
        self._fused = None

    def _build_fused(self) -> tuple[list[Tensor], list[int]] | None:
        if self.cfg.qk_norm or self.norm.device.type != "cpu" or self.norm.dtype not in (torch.bfloat16, torch.float32) or cpu_ops() is None:
            return None
        weights, counts, panels = [], [], True
        for layer in self.layers:
            linears = [getattr(layer, name).gemv_weights() for name in ("qkv", "o", "gate_up", "down")]
            if any(w is None for w in linears):
                return None
            bias = [] if layer.qkv.bias is None else [layer.qkv.bias]
            weights += [layer.input_norm, layer.post_norm, *bias, *(w for ws in linears for w in ws)]
            counts += [len(bias), *(len(ws) for ws in linears)]
            panels = panels and all(len(ws) == 2 and ws[0].dtype == torch.float32 for ws in linears)  # [w, panels]: f32_linear
        self._fused_rows = FUSED_PANEL_ROWS if panels else GEMV_MAX_ROWS
        return weights, counts

    def decode_kernels(self, tokens: Tensor):
        """Our CPU kernels (RoPE and cache write, attention) for decode and verify on CPUs. Per
        layer against SDPA: bf16 3-7x faster at one query per row (AVX512-BF16, 2 cores); fp32
        2.3-3x at 1-16 rows and 1.4-1.5x at 4 queries per row (one core, 384 keys)."""
        if tokens.device.type != "cpu":
            return None
        return cpu_ops()

    def pack_weights(self) -> None:
        """(Re)derive the CPU fast-path copies of every linear; call after loading weights."""
        for m in self.modules():
            if isinstance(m, Linear):
                m.pack()
        self.invalidate_fused()

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden).float()

    def hf_parameter_views(self) -> dict[str, Tensor]:
        """Every checkpoint tensor name (HF naming) → the view of our parameters it fills."""
        cfg, views = self.cfg, {}
        views["model.embed_tokens.weight"] = self.embed.weight
        views["model.norm.weight"] = self.norm
        if not cfg.tie_word_embeddings:
            views["lm_head.weight"] = self.lm_head.weight
        q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            views[p + "input_layernorm.weight"] = layer.input_norm
            views[p + "post_attention_layernorm.weight"] = layer.post_norm
            for name, lo, hi in (("q_proj", 0, q), ("k_proj", q, q + kv), ("v_proj", q + kv, q + 2 * kv)):
                views[p + f"self_attn.{name}.weight"] = layer.qkv.weight[lo:hi]
                if cfg.attention_bias:
                    views[p + f"self_attn.{name}.bias"] = layer.qkv.bias[lo:hi]
            if cfg.qk_norm:
                views[p + "self_attn.q_norm.weight"] = layer.q_norm
                views[p + "self_attn.k_norm.weight"] = layer.k_norm
            views[p + "self_attn.o_proj.weight"] = layer.o.weight
            views[p + "mlp.gate_proj.weight"] = layer.gate_up.weight[:inter]
            views[p + "mlp.up_proj.weight"] = layer.gate_up.weight[inter:]
            views[p + "mlp.down_proj.weight"] = layer.down.weight
        return views
