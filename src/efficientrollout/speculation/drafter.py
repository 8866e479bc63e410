"""The self-drafter: the target's own live weights, quantized with torchao.

Same architecture, so it runs the target's Decoder code over the *same* KV cache: every module
is shared except the linears, which become QuantLinear views of the target's linears. Draft
K/V written at draft positions are overwritten by the verify pass. `requantize()` re-derives
all int8 weights from the live target weights (call it after every weight update).

Quantization is torchao's int8 symmetric per-channel (Int8Tensor.from_hp, PerRow), on CPUs
computed in one pass by our kernel with the same numbers (`int8_rows`). Execution
picks the fastest int8 kernel the device has (measured on the 2-core AVX2 dev CPU, all 121
linears of SmolLM2 vs the fp32 oneDNN target): FBGEMM's int8 GEMM (activations quantized per
call) at 0.20-0.47x the target's time for 1-64 rows, where ATen's `_weight_int8pack_mm` was
1.8-41x *slower* than fp32 (it is only fast with AVX512). On AVX512 CPUs: `_weight_int8pack_mm`;
on CUDA: torchao's Int8Tensor itself (see `pick_kernel` for what GPUs measured).

But FBGEMM quantizes every call's activations to int8 (per tensor, 7 bits), and SmolLM2's
hidden states have outlier channels: an fp32 engine's drafts were accepted 0.79 of the time at
batch 1 and 0.65 at 16 (temperature 1, K = 4), where weight-only int8 (fp32 activations) gave
0.92 / 0.93. So at 1-12 rows (where speculation pays) fp32 targets draft with our int8 GEMV
(`int8_gemv_op`): over fp32 activations (`int8_f32_gemv`, 0.92 accepted), on AVX512-BF16 CPUs
from 7 rows over bf16 copies of them (0.91 accepted), where that kernel is the faster one
(`int8_linear_f32`). On AVX512-VNNI CPUs the activations are quantized after all, in blocks of
64 (8 bits, max|x| / 127 each block; `int8_vnni_gemv`): 64 int8 products per instruction take
the linears to 0.70-0.92x the fp32-activation kernel's time at 1-12 rows. With one scale per
row, as first written, outlier channels coarsened the whole row: the chance a draft is
accepted at the first position (`scripts/bench_step.py --samples 48`: 8,278 positions of
replies at temperature 1, Intel Xeon, Emerald Rapids) was 0.926, against 0.975 with fp32
activations; per block of 64 it is 0.960, for a drafter step of the same cost at 1 row and
4-8% dearer at 2-8 rows. bf16 targets on AVX512-VNNI CPUs draft with the same kernel over fp32
copies of their activations (`int8_linear_bf16`): 0.58 / 0.55 / 0.68 / 0.81 of a bf16 target's
step at 1 / 2 / 4 / 8 rows on that Xeon, where the bf16-activation kernel cost 0.78 / 0.86 /
0.94 / 1.28 (acceptance 0.955 vs 0.968). A drafter step is 0.28 / 0.30 / 0.42 / 0.51 / 0.54 of the target's at batch
1 / 2 / 4 / 6 / 8 (one core of the AVX512-BF16 CPU, 384 cached positions, 2026-11-27; FBGEMM
took 0.42 / 0.43 / 0.45 / - / 0.47 of an older, slower target); FBGEMM beyond 12 rows.

int4 (group-wise, asymmetric, torchao's `groupwise_affine_quantize_tensor`): on CUDA in torchao's
tinygemm tile-packed layout; on AVX512 CPUs packed for ATen's `_weight_int4pack_mm_for_cpu`.
Measured on a 2-core AVX512-BF16 CPU, all 121 linears of SmolLM2 with cold weights: int4 runs at
0.32x the bf16 target's time at 1 row, 0.35x at 2, 0.49x at 4, 0.76x at 8 (int8pack: 0.53, 0.61,
0.60, 1.11), but both GEMV-style kernels lose from about 8 rows up (16: 1.1-1.5x, 64: 1.7-2.0x).
FBGEMM's int8 GEMM (activations quantized per call, VNNI on these CPUs) holds 0.66-0.75x from 4
to 64 rows. So on CPUs each packed kernel serves the rows where it wins (`PACKED_MAX_ROWS`) and
larger batches run FBGEMM over the same int8 weights; the drafter is cheaper than the target at
every batch size.
"""

from __future__ import annotations

import copy
import functools
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import cpu
from ..kernels import cpu_ops, gemv_ops, int8_gemv_op
from ..models.decoder import GEMV_MAX_ROWS, Decoder, Linear
from .gate import DRAFTER_KERNELS


PACKED_MAX_ROWS = {"int8pack": 4, "int4pack": 8}  # on CPUs, beyond this FBGEMM is faster (measured above)
CPU_ONLY, CUDA_ONLY = ("fbgemm", "int4pack"), ("fp8", "int4")


def pick_kernel(device: torch.device, bits: int = 8, dtype: torch.dtype = torch.bfloat16, override: str = "auto") -> str:
    """The int8 (or int4) kernel for a drafter of a `dtype` target on `device`. On CPUs
    `int8pack`: our int8 GEMV at 1-12 rows (bf16, or fp32 targets: see the module docstring),
    ATen's `_weight_int8pack_mm` (bf16 with AVX512; with fp32 activations 2.9 / 8.7x slower than
    the target) or FBGEMM beyond; FBGEMM where our kernels cannot run.
    On GPUs no 8-bit kernel beat the bf16 target (H100/H200, CUDA graphs, Llama-3-8B layer
    shapes, 1-64 rows; bench_step): torchao's int8 weight-only tensor (the default here) cost
    1.1-4.0x its step (it widens the weight to bf16 on every call), ATen's CUDA
    `_weight_int8pack_mm` 4.9-9.4x, fp8 (`drafter_kernel="fp8"`: e4m3 weights and activations,
    row-wise scales) 1.0-1.4x, and fp8 drafts of a tiny random model were accepted less often
    (greedy, K=4: 0.37-0.45 where int8's passed 0.6). On GPUs draft with int4."""
    if override != "auto":
        wrong = override in (CUDA_ONLY if device.type == "cpu" else CPU_ONLY)
        if override not in DRAFTER_KERNELS or wrong:
            raise ValueError(f"drafter kernel {override!r} cannot run on {device.type}: choose from {DRAFTER_KERNELS} "
                             f"(CPU only: {CPU_ONLY}; CUDA only: {CUDA_ONLY})")
        return override
    if bits == 4:
        if device.type == "cuda":
            return "int4"
        if device.type == "cpu" and cpu.avx512():
            return "int4pack"
        raise ValueError(f"the int4 drafter needs a fast int4 kernel (CUDA, or an AVX512 CPU); {device} has none (use int8)")
    if device.type != "cpu":
        return "torchao"
    fbgemm = "fbgemm" in torch.backends.quantized.supported_engines
    if cpu.avx512() and (dtype == torch.bfloat16 or not fbgemm):
        return "int8pack"
    if dtype == torch.float32 and int8_gemv_op(torch.empty(0, 8)) is not None:
        return "int8pack"  # our fp32 int8 kernel at 1-12 rows (FBGEMM beyond): see the module docstring
    return "fbgemm" if fbgemm else "torchao"


def drafter_kernel(drafter: str, device: torch.device, dtype: torch.dtype, override: str = "auto") -> str:
    """The QuantLinear kernel of a `drafter` (SpeculationConfig.drafter: int8 | int4 | exact,
    the last keeping the exact weights) for a `dtype` target on `device`."""
    return "none" if drafter == "exact" else pick_kernel(device, 4 if drafter == "int4" else 8, dtype, override)


def torchao_int8_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """torchao's symmetric per-row int8 of `w` (`Int8Tensor.from_hp(w.float(), PerRow())`): int8
    rows and an fp32 scale each."""
    from torchao.quantization import Int8Tensor, PerRow

    q = Int8Tensor.from_hp(w.float(), granularity=PerRow())
    return q.qdata.contiguous(), q.scale.reshape(-1).float()


def int8_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """`torchao_int8_rows(w)`; on CPUs our kernel computes the same numbers in one pass
    (quantize_cpu.cpp, bit for bit): SmolLM2's fp32 drafter re-derives in 0.1 s instead of 0.8-1.1."""
    if w.device.type == "cpu" and w.dim() == 2 and w.dtype in (torch.float32, torch.bfloat16) and (ops := cpu_ops()) is not None:
        return ops.int8_quantize_rows(w)
    return torchao_int8_rows(w)


class QuantLinear(nn.Module):
    """An int8 copy of a target Linear; `kernel="none"` keeps the exact weights (tests)."""

    def __init__(self, source: Linear, kernel: str, group_size: int = 64):
        super().__init__()
        self._source = (source,)  # a tuple: not registered as a submodule, never quantized twice
        self.kernel = kernel
        self.group_size = group_size
        if kernel in ("w8a8", "fp8") and source.in_features % 16:
            raise ValueError(f"the {kernel} drafter needs layer widths divisible by 16, not {source.in_features}")
        if kernel == "int4" and source.in_features % group_size:
            raise ValueError(f"int4 group size {group_size} does not divide the layer width {source.in_features}")
        self.requantize()

    def requantize(self) -> None:
        from torchao.quantization import Int8Tensor, PerRow

        src = self._source[0]
        w, bias = src.weight.detach(), None if src.bias is None else src.bias.detach()
        self.out_features = w.shape[0]  # a vocabulary head's rows change at every refresh
        self.gemv: list[Tensor] | None = None  # our kernels' weights for this linear, where they serve it
        self.gemv_op = None  # and our int8 kernel for 1-12 rows of it (int8pack)
        self.bias = bias
        if self.kernel == "none":
            self.weight = w
            return
        self.wide = None  # the packed CPU kernels' FBGEMM copy for batches beyond their range
        if self.kernel in ("w8a8", "fp8"):
            wq, w_scale = _quantize_rows(w, self.kernel, w8a8_cpu_weight_qmax() if w.device.type == "cpu" else None)  # [N, K], [N, 1]
            # cuBLAS wants N % 16 == 0 (a drafter vocabulary head may not be): zero rows, sliced off in forward
            self.weight = _pad_rows(wq, -w.shape[0] % 16), _pad_rows(w_scale, -w.shape[0] % 16, 1.0).t().contiguous()
            return
        if self.kernel == "int4":
            from torchao.quantization import Int4TilePackedTo4dTensor

            self.weight = Int4TilePackedTo4dTensor.from_hp(w.bfloat16(), [1, self.group_size])
            return
        if self.kernel not in ("fbgemm", "int8pack", "int4pack"):  # torchao's int8 tensor
            self.weight = Int8Tensor.from_hp(w, granularity=PerRow())
            return
        # FBGEMM, and the packed CPU kernels' FBGEMM copy (packed on first use: _wide), take these int8 weights
        qdata, scale = int8_rows(w)
        if self.kernel == "fbgemm":
            self.weight = _fbgemm_pack(qdata, scale, bias)
            return
        self.int8_rows = qdata, scale  # not the source's weight: the SGLang worker's may be gone by then
        if self.kernel == "int8pack":
            self.weight = (qdata, scale.to(w.dtype))
            self.gemv_op = int8_gemv_op(w)
            if self.gemv_op is not None:  # our int8 kernels: int8 weight, fp32 scale per row
                self.gemv = [self.weight[0], scale.contiguous()]
        else:  # int4pack
            from torchao.quantization.utils import groupwise_affine_quantize_tensor

            qdata, scales_and_zeros = groupwise_affine_quantize_tensor(w.bfloat16(), 4, self.group_size, torch.bfloat16)
            self.weight = (torch._convert_weight_to_int4pack_for_cpu(qdata, 1), scales_and_zeros)
            if bias is None and gemv_ops(w) is not None:  # decode_layer calls ATen's int4 kernel itself
                self.gemv = [*self.weight, torch.tensor(self.group_size)]

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel == "none":
            return F.linear(x, self.weight, self.bias)
        if self.kernel == "fbgemm":
            return _fbgemm_linear(x, self.weight)
        if self.kernel in ("w8a8", "fp8"):
            lead, rows = x.shape[:-1], x.reshape(-1, x.shape[-1])
            y = _dynamic_mm(rows, *self.weight, self.kernel)[:, : self.out_features].view(*lead, -1)
            return y if self.bias is None else y + self.bias
        if self.kernel in PACKED_MAX_ROWS:
            lead, rows = x.shape[:-1], x.reshape(-1, x.shape[-1])
            if self.kernel == "int8pack" and self.gemv is not None and rows.shape[0] <= GEMV_MAX_ROWS:
                return self.gemv_op(rows, *self.gemv, self.bias).view(*lead, -1)
            slow = self.kernel == "int8pack" and x.dtype == torch.float32  # ATen's int8pack with fp32 activations: 3-9x the target
            if x.device.type == "cpu" and (rows.shape[0] > PACKED_MAX_ROWS[self.kernel] or slow):
                return self._source[0](x) if self._wide() is None else _fbgemm_linear(x, self.wide)
            if self.kernel == "int8pack":
                y = torch._weight_int8pack_mm(rows.contiguous(), *self.weight)
            else:
                packed, scales_and_zeros = self.weight
                y = torch._weight_int4pack_mm_for_cpu(rows.bfloat16().contiguous(), packed, self.group_size, scales_and_zeros).to(x.dtype)
            y = y.view(*lead, y.shape[-1])
            return y if self.bias is None else y + self.bias
        if self.kernel == "int4":
            return F.linear(x.bfloat16(), self.weight, None if self.bias is None else self.bias.bfloat16()).to(x.dtype)
        return F.linear(x, self.weight, self.bias)

    def _wide(self):
        """The packed CPU kernels' FBGEMM copy for batches beyond their range (None: no FBGEMM
        here), made on first use: packing it was 60% of a re-quantization (SmolLM2 in fp32 on
        one core, 0.7 s of which linear_prepack 0.4), paid at every weight update, and the gate
        rarely drafts that many rows."""
        if self.wide is None and "fbgemm" in torch.backends.quantized.supported_engines:
            self.wide = _fbgemm_pack(*self.int8_rows, self.bias)
        return self.wide

    def copy_(self, other: "QuantLinear") -> None:
        """Take `other`'s quantized weights into this layer's own tensors, in place: a CUDA graph
        captured with this layer keeps reading the same memory (SGLang worker, per-K graphs).
        FBGEMM's packed weights (CPU only, in no graph) are taken over as they are."""
        if self.kernel == "fbgemm":
            self.weight = other.weight
        elif not (_copy_into(self.weight, other.weight) and _copy_into(self.gemv, other.gemv)):
            raise ValueError(f"the {self.kernel} drafter's weights cannot be refreshed in place")
        self.wide, self.int8_rows = getattr(other, "wide", None), getattr(other, "int8_rows", None)

    def gemv_weights(self) -> list[Tensor] | None:
        """The weights as `decode_layer` takes them, where our kernels serve this linear."""
        return self.gemv


def _copy_into(dst, src) -> bool:
    """Copy tensor `src` into `dst` in place (tuples and torchao tensor subclasses: their inner
    tensors); False where it cannot be done (another shape or layout)."""
    if dst is None or src is None:
        return dst is src
    if isinstance(dst, (tuple, list)):
        return isinstance(src, (tuple, list)) and len(dst) == len(src) and all(map(_copy_into, dst, src))
    if not isinstance(dst, Tensor) or type(dst) is not type(src):
        return False
    if hasattr(dst, "__tensor_flatten__"):
        names, _ = dst.__tensor_flatten__()
        return all(_copy_into(getattr(dst, n), getattr(src, n)) for n in names)
    if dst.shape != src.shape or dst.dtype != src.dtype:
        return False
    dst.copy_(src)
    return True


def _quantize_rows(t: Tensor, kernel: str, qmax: float | None = None) -> tuple[Tensor, Tensor]:
    """Each row of t [M, K] scaled to the 8-bit range (int8 for w8a8, fp8 e4m3 for fp8), or to
    +-qmax: (q [M, K], scale [M, 1] fp32) with t ~ q * scale."""
    tf = t.float()
    qmax = qmax or (127.0 if kernel == "w8a8" else torch.finfo(torch.float8_e4m3fn).max)
    scale = tf.abs().amax(1, keepdim=True).clamp(min=1e-12) / qmax
    q = tf / scale
    return (q.round().clamp(-qmax, qmax).to(torch.int8) if kernel == "w8a8" else q.to(torch.float8_e4m3fn)), scale


def _pad_rows(t: Tensor, n: int, value: float = 0.0) -> Tensor:
    """t with n more rows of `value` (8-bit tensors through their bytes: F.pad takes no fp8)."""
    if n == 0:
        return t
    if t.element_size() == 1:
        return F.pad(t.view(torch.int8), (0, 0, 0, n), value=int(value)).view(t.dtype)
    return F.pad(t, (0, 0, 0, n), value=value)


def _dynamic_mm(x: Tensor, w: Tensor, w_scale: Tensor, kernel: str) -> Tensor:
    """x [M, K] @ w [N, K].T with x quantized per row on the fly (int8 or fp8 e4m3) and both
    scales applied to the result: 8-bit weights *and* 8-bit tensor-core math, where weight-only
    kernels widen the weights to bf16. On CUDA, cuBLAS wants more than 16 rows (int8; padded to
    32) or a multiple of 16 (fp8): few rows are padded with zeros, which costs little beside
    reading the weights."""
    m = x.shape[0]
    xq, x_scale = _quantize_rows(x, kernel)  # [M, K], [M, 1]
    if x.is_cuda:
        pad = max(32 - m, 0) if kernel == "w8a8" else -m % 16
        xq, x_scale = _pad_rows(xq, pad), _pad_rows(x_scale, pad, 1.0)
    if kernel == "w8a8":
        y = torch._int_mm(xq, w.t()) * x_scale * w_scale
    else:
        y = torch._scaled_mm(xq, w.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16)  # row-wise scales: bf16 out only
    return y[:m].to(x.dtype)


@functools.cache
def w8a8_cpu_weight_qmax() -> float:
    """127, or 63 where this process's oneDNN int8 GEMM (torch._int_mm on CPUs) saturates. Without
    VNNI it adds pairs of u8 x s8 products in 16 bits, which overflow with full-range int8 weights
    (w8a8 drafts 16% off the target's linear on AVX2, against 1%); 7-bit weights never do. Checked
    once, on the worst case, against an int32 matmul (tests/test_cpu_isa.py checks both)."""
    a, b = torch.full((4, 64), 127, dtype=torch.int8), torch.full((64, 8), 127, dtype=torch.int8)
    return 127.0 if torch._int_mm(a, b).equal(a.int() @ b.int()) else 63.0

# FBGEMM quantizes the activations per call, to 7 bits unless told otherwise: without VNNI its
# u8 x s8 products may saturate a 16-bit sum at 8 bits. With VNNI they cannot, and 8 bits
# lifted the fp32 drafter's acceptance at batch 16 from 0.65 to 0.75 (SmolLM2, K = 4).
_FBGEMM_REDUCE_RANGE = not cpu.vnni()


def _fbgemm_pack(qdata: Tensor, scale: Tensor, bias: Tensor | None):
    """FBGEMM's packed weights for int8 rows `qdata` [N, K] with a scale each (symmetric)."""
    qt = torch._make_per_channel_quantized_tensor(qdata, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(qt, None if bias is None else bias.float())


def _fbgemm_linear(x: Tensor, packed) -> Tensor:
    lead = x.shape[:-1]
    y = torch.ops.quantized.linear_dynamic(x.reshape(-1, x.shape[-1]).float(), packed, _FBGEMM_REDUCE_RANGE)
    return y.view(*lead, y.shape[-1]).to(x.dtype)


class _Rows:
    """Some output rows of a linear, as a QuantLinear's source: gathered from the live weights
    at every requantize."""

    def __init__(self, linear: Linear, ids: Tensor):
        self.linear, self.ids, self.in_features = linear, ids, linear.in_features

    @property
    def weight(self) -> Tensor:
        return self.linear.weight[self.ids]

    @property
    def bias(self) -> Tensor | None:
        return None if self.linear.bias is None else self.linear.bias[self.ids]

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class VocabHead(nn.Module):
    """The drafter's LM head, over the tokens rollouts actually emit.

    The LM head is a fifth of SmolLM2's weights (49,152 rows of 576), read at every draft step,
    and the responses of one RL task use a small part of the vocabulary. Once `observe` has seen
    `size` output tokens, `refresh` keeps the head's rows for the `size` most frequent ones
    (chosen again whenever the count doubles); every other token gets logit -inf, so the drafter
    never proposes it. Verification stays exact: a token the drafter cannot propose is still
    emitted whenever the target picks it (greedy) or through the residual distribution
    (sampling), only never as an accepted draft.

    Measured (SmolLM2, AVX512-BF16, 16 long-tail prompts, K=4, head chosen from earlier waves):
    greedy, 8192 tokens: acceptance 0.72 vs 0.69, wave 4.2 vs 4.55 s. Sampling at temperature 1:
    the kept tokens cover 88% (8192), 94% (16384), 97% (24576) of a new wave's tokens, and the
    acceptance lost outweighs the cheaper head (8192: 0.55 vs 0.65, wave 5.7 vs 5.0 s; 16384 and
    24576: 4.4 vs 4.3 s; an int4 head instead: 4.5 s). So it is off by default."""

    def __init__(self, quant: QuantLinear, size: int):
        super().__init__()
        self.quant, self.size = quant, size
        self.full: Linear = quant._source[0]
        self.vocab = self.full.out_features
        self.counts = np.zeros(self.vocab, np.int64)
        self.ids: Tensor | None = None  # the kept tokens, ascending; None: the full vocabulary
        self._chosen_at = 0  # tokens observed when the subset was last chosen

    @property
    def enabled(self) -> bool:
        return 0 < self.size < self.vocab

    def observe(self, tokens: list[int]) -> None:
        if self.enabled:  # off (the default): nothing to count for
            np.add.at(self.counts, np.asarray(tokens, np.int64), 1)

    def refresh(self) -> bool:
        """Choose the subset (again) if the observed count has doubled since; True if it did."""
        seen = int(self.counts.sum())
        if not self.enabled or seen < max(self.size, 2 * self._chosen_at):
            return False
        ids = np.sort(np.argsort(-self.counts, kind="stable")[: self.size])
        self.ids = torch.from_numpy(ids).to(self.full.weight.device)
        self.quant._source = (_Rows(self.full, self.ids),)
        self.quant.requantize()
        self._chosen_at = seen
        return True

    def coverage(self) -> float:
        """Fraction of the observed tokens the head can propose."""
        seen = self.counts.sum()
        return 1.0 if self.ids is None or not seen else float(self.counts[self.ids.cpu().numpy()].sum() / seen)

    def forward(self, x: Tensor) -> Tensor:
        y = self.quant(x)
        if self.ids is None:
            return y
        return y.new_full((*y.shape[:-1], self.vocab), float("-inf")).index_copy_(y.dim() - 1, self.ids, y)


def _share_structure(module: nn.Module) -> nn.Module:
    """A copy of the module tree whose parameters and buffers are the *same* tensors."""
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = {name: _share_structure(child) for name, child in module._modules.items()}
    return clone


class Drafter:
    """Holds the drafter decoder; `decoder(...)` has the target Decoder's call signature."""

    def __init__(self, target: Decoder, kernel: str | None = None, group_size: int = 64, vocab: int = 0):
        param = next(target.parameters())
        self.kernel = kernel or pick_kernel(param.device, dtype=param.dtype)
        self.decoder: Decoder = _share_structure(target)
        self.linears: list[QuantLinear] = []
        for parent in self.decoder.modules():
            for name, child in list(parent._modules.items()):
                if isinstance(child, Linear):
                    q = QuantLinear(child, self.kernel, group_size)
                    parent._modules[name] = q
                    self.linears.append(q)
        self.head = VocabHead(self.decoder.lm_head, vocab)  # see VocabHead: vocab=0 keeps every token
        self.decoder.lm_head = self.head
        self.decoder.invalidate_fused()  # the copy must not reuse the target's fused layers
        self.requantize_s = 0.0
        self.stale = False  # the target's weights changed since the last requantize()

    def refresh_head(self) -> bool:
        """Choose the drafter's vocabulary again where due (VocabHead.refresh); True if it changed,
        and with it the head's tensors, so CUDA graphs holding the old ones are stale."""
        if not self.head.refresh():
            return False
        self.decoder.graph_epoch += 1
        return True

    def ensure_fresh(self) -> None:
        """Re-quantize if the target's weights changed: before any draft, never from old weights."""
        if self.stale:
            self.requantize()

    def requantize(self) -> float:
        """Re-derive every quantized weight from the live target weights; returns seconds."""
        t0 = time.perf_counter()
        in_place = self.decoder.graphed  # CUDA graphs read these tensors: copy new weights into them
        for q in self.linears:
            if in_place:
                try:
                    q.copy_(QuantLinear(q._source[0], q.kernel, q.group_size))
                    continue
                except ValueError:  # a layout that cannot be copied in place: new tensors, recapture
                    in_place = False
            q.requantize()
        self.decoder.invalidate_fused()
        if not in_place:
            self.decoder.graph_epoch += 1
        self.stale = False
        self.requantize_s = time.perf_counter() - t0
        return self.requantize_s
