"""The quantized self-drafter: every kernel approximates the target linear it was derived from,
shares everything but the linears with the target, and re-derives from live weights."""

from __future__ import annotations

import pytest
import torch

from efficientrollout import cpu
from efficientrollout.kernels import cpu_ops, int8_gemv_op
from efficientrollout.models.decoder import GEMV_MAX_ROWS, Linear
from efficientrollout.speculation.drafter import PACKED_MAX_ROWS, Drafter, QuantLinear, pick_kernel

AVX512 = cpu.avx512()
KERNELS = ["torchao", "w8a8"] + (["fbgemm"] if "fbgemm" in torch.backends.quantized.supported_engines else []) + (
    ["int8pack", "int4pack"] if AVX512 else [])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_kernels_approximate_the_target_linear(kernel, dtype):
    if dtype == torch.bfloat16 and kernel == "fbgemm":
        pytest.skip("FBGEMM serves fp32 engines (CPUs without AVX512)")
    torch.manual_seed(0)
    target = Linear(128, 48, bias=True).to(dtype)
    target.pack()
    q = QuantLinear(target, kernel, group_size=64)
    for x in (torch.randn(2, 2, 128, dtype=dtype), torch.randn(8, 3, 128, dtype=dtype)):  # within and beyond packed range
        exact = target(x).float()
        approx = q(x)
        assert approx.shape == exact.shape and approx.dtype == dtype
        rel = (approx.float() - exact).norm() / exact.norm()
        assert 0 < rel < (0.15 if kernel == "int4pack" and x.shape[0] == 2 else 0.05), rel


@pytest.mark.skipif(not AVX512, reason="the packed CPU kernels need AVX512")
@pytest.mark.parametrize("kernel", ["int8pack", "int4pack"])
def test_packed_kernels_hand_large_batches_to_fbgemm_over_the_same_int8_weights(kernel):
    torch.manual_seed(0)
    target = Linear(128, 48, bias=False).to(torch.bfloat16)
    target.pack()
    q = QuantLinear(target, kernel, group_size=64)
    n = GEMV_MAX_ROWS if kernel == "int8pack" and q.gemv is not None else PACKED_MAX_ROWS[kernel]  # our int8 kernel, else the packed one
    x = torch.randn(n + 1, 128, dtype=torch.bfloat16)
    fbgemm = QuantLinear(target, "fbgemm")
    if "fbgemm" in torch.backends.quantized.supported_engines:
        assert q.wide is None  # packed on first use, not at every weight update
        source, q._source = q._source, (None,)  # from the int8 rows it keeps: the SGLang worker's source weight may be gone by then
        assert torch.equal(q(x), fbgemm(x))  # beyond the packed kernel's rows: the FBGEMM path
        assert q.wide is not None
        q._source = source
        q.requantize()
        assert q.wide is None
    else:
        assert torch.equal(q(x), target(x))
    assert not torch.equal(q(x[:n]), fbgemm(x[:n]))  # within them: the packed kernel itself


def test_drafter_shares_all_but_linears_and_follows_live_weights(tiny_engine):
    decoder = tiny_engine.decoder
    drafter = Drafter(decoder)
    assert drafter.kernel == pick_kernel(tiny_engine.device, dtype=next(decoder.parameters()).dtype)
    assert drafter.decoder.embed.weight is decoder.embed.weight
    assert drafter.decoder.layers[0].input_norm is decoder.layers[0].input_norm
    assert isinstance(drafter.decoder.layers[0].qkv, QuantLinear) and isinstance(decoder.layers[0].qkv, Linear)
    assert len(drafter.linears) == 4 * len(decoder.layers) + 1
    x = torch.randn(2, 1, decoder.cfg.hidden_size, device=tiny_engine.device)
    before = drafter.decoder.layers[0].gate_up(x)
    original = decoder.layers[0].gate_up.weight.detach().clone()
    try:
        with torch.no_grad():
            decoder.layers[0].gate_up.weight.mul_(2.0)
        assert torch.allclose(drafter.decoder.layers[0].gate_up(x), before)  # stale until re-derived
        assert drafter.requantize() > 0
        assert torch.allclose(drafter.decoder.layers[0].gate_up(x), 2 * before, rtol=0.05, atol=0.05)
    finally:
        with torch.no_grad():
            decoder.layers[0].gate_up.weight.copy_(original)
        decoder.pack_weights()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels need CUDA")
@pytest.mark.parametrize("kernel", ["int4", "torchao", "int8pack", "w8a8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_kernels_approximate_the_target_linear(kernel, dtype):
    """1, 5 and 40 rows: the 8-bit tensor-core kernels pad few rows to what cuBLAS takes."""
    torch.manual_seed(0)
    target = Linear(576, 200, bias=True).to("cuda", dtype)  # 200 rows: fp8 pads them to a multiple of 16
    q = QuantLinear(target, kernel, group_size=64)
    for rows in (1, 5, 40):
        x = torch.randn(rows, 576, device="cuda", dtype=dtype)
        exact, approx = target(x).float(), q(x)
        assert approx.shape == exact.shape and approx.dtype == dtype
        rel = (approx.float() - exact).norm() / exact.norm()
        assert 0 < rel < (0.15 if kernel == "int4" else 0.05), (rows, rel)


def test_the_int8_kernel_follows_the_targets_dtype():
    """fp32 targets draft with our int8 kernels at 1-12 rows where they exist (FBGEMM beyond),
    else with FBGEMM wherever it exists (ATen's int8pack with fp32 activations measured 3-9x
    slower than the target); bf16 targets with int8pack on AVX512 CPUs."""
    dev, fbgemm = torch.device("cpu"), "fbgemm" in torch.backends.quantized.supported_engines
    ours = int8_gemv_op(torch.empty(0, 64)) is not None
    if ours:
        assert pick_kernel(dev, dtype=torch.float32) == "int8pack"
    elif fbgemm:
        assert pick_kernel(dev, dtype=torch.float32) == "fbgemm"
    if AVX512:
        assert pick_kernel(dev, dtype=torch.bfloat16) == "int8pack"


@pytest.mark.skipif(int8_gemv_op(torch.empty(0, 64)) is None or "fbgemm" not in torch.backends.quantized.supported_engines,
                    reason="needs our CPU kernels and FBGEMM")
def test_an_fp32_drafter_keeps_fp32_activations_at_few_rows():
    """FBGEMM quantizes each call's activations to int8, per tensor: with SmolLM2's outlier
    channels that cost acceptance (0.79 at batch 1, 0.65 at 16, where weight-only int8 drafts
    accepted 0.92). At 1-12 rows our int8 kernels keep the activations (fp32, or bf16 where
    AVX512-BF16 makes that as fast): closer to the target than FBGEMM's at every row count.
    On AVX512-VNNI CPUs they quantize them per row instead (int8_vnni_gemv): an outlier channel
    then coarsens its row (GRPO replays: 0.86-0.91 accepted vs 0.93-0.95, rollouts 0.98x as long),
    bounded here by a step of max|x| / 127 per activation."""
    vnni = cpu_ops() is not None and cpu_ops().int8_vnni_available()
    torch.manual_seed(0)
    target = Linear(256, 96, bias=False)
    with torch.no_grad():
        target.weight.copy_(torch.randn(96, 256) * 0.05)
    target.pack()
    ours, fbgemm = QuantLinear(target, "int8pack"), QuantLinear(target, "fbgemm")
    for rows in (1, 4, 12):
        x = torch.randn(rows, 256)
        x[:, 7] *= 30  # an outlier channel, as LLM hidden states have
        exact = target(x)
        err = {name: ((q(x) - exact).norm() / exact.norm()).item() for name, q in (("ours", ours), ("fbgemm", fbgemm))}
        assert ours(x).dtype == torch.float32, rows
        if vnni:  # rounding each activation to 1/254 of its row's max: ~0.03 relative here
            assert err["ours"] < 0.05 and err["fbgemm"] < 0.05, (rows, err)
            x[:, 7] /= 30  # without the outlier: finer steps
            assert ((ours(x) - target(x)).norm() / target(x).norm()).item() < 0.02  # with the weights' own rounding
        else:
            assert err["ours"] < err["fbgemm"] / 2, (rows, err)


@pytest.mark.skipif(int8_gemv_op(torch.empty(0, 72)) is None, reason="needs our CPU kernels (AVX2 and FMA)")
def test_an_fp32_drafter_of_any_cpu_runs_int8_weights_with_fp32_activations():
    """A width our bf16 kernels do not take (72: not a multiple of 32) runs the AVX2 int8 kernel,
    the one CPUs without AVX512-BF16 use for every fp32 drafter: the dequantized linear's result."""
    torch.manual_seed(0)
    target = Linear(72, 40, bias=True)
    target.pack()
    q = QuantLinear(target, "int8pack")
    assert q.gemv_op is not None
    x = torch.randn(3, 72)
    qdata, scale = q.gemv
    want = torch.nn.functional.linear(x, qdata.float() * scale[:, None], target.bias)
    if cpu_ops().int8_vnni_available():  # int8 activations there (see above)
        assert (q(x) - want).norm() <= 0.02 * want.norm()
    else:
        torch.testing.assert_close(q(x), want, atol=1e-5, rtol=1e-5)


def test_a_drafter_kernel_must_exist_and_suit_the_device():
    with pytest.raises(ValueError, match="cannot run on cpu"):
        pick_kernel(torch.device("cpu"), override="fp8")
    with pytest.raises(ValueError, match="cannot run on cpu"):
        pick_kernel(torch.device("cpu"), override="int9")
    assert pick_kernel(torch.device("cpu"), override="w8a8") == "w8a8"


@pytest.mark.parametrize("kernel", ["w8a8"] + (["fp8"] if torch.cuda.is_available() else []))
def test_8bit_tensor_core_kernels_serve_a_vocabulary_head_of_any_size(kernel):
    """A drafter vocabulary head keeps N rows of the LM head (any N); cuBLAS wants N % 16 == 0:
    the kernels pad the weights and return N columns, also after the rows change."""
    from efficientrollout.speculation.drafter import _Rows

    device = "cuda" if kernel == "fp8" else "cpu"
    torch.manual_seed(0)
    head = Linear(64, 100, bias=False).to(device)
    q = QuantLinear(_Rows(head, torch.arange(20, device=device)), kernel)
    x = torch.randn(3, 64, device=device)
    assert q(x).shape == (3, 20)
    q._source = (_Rows(head, torch.arange(37, device=device)),)
    q.requantize()
    exact = head(x)[:, :37]
    assert q(x).shape == (3, 37) and ((q(x) - exact).norm() / exact.norm()) < 0.05


def test_8bit_tensor_core_kernels_need_widths_divisible_by_16():
    with pytest.raises(ValueError, match="divisible by 16"):
        QuantLinear(Linear(72, 32, bias=False), "w8a8")


def test_int4_needs_a_fast_kernel_and_a_dividing_group_size():
    if AVX512:
        assert pick_kernel(torch.device("cpu"), bits=4) == "int4pack"
    else:
        with pytest.raises(ValueError, match="int4"):
            pick_kernel(torch.device("cpu"), bits=4)
    with pytest.raises(ValueError, match="does not divide"):
        QuantLinear(Linear(576, 64), "int4", group_size=128)


def test_vocab_head_keeps_the_most_emitted_tokens_and_their_exact_logits(tiny_engine):
    decoder = tiny_engine.decoder
    full, small = Drafter(decoder), Drafter(decoder, vocab=4)
    assert not small.head.refresh() and small.head.ids is None  # nothing observed: the whole vocabulary
    small.head.observe([7, 7, 7, 300, 300, 42, 9, 5])
    assert small.head.refresh()
    assert small.head.ids.tolist() == [5, 7, 9, 300]  # 7 and 300 by count, then ties to the lower ids
    x = torch.randn(3, decoder.cfg.hidden_size, device=tiny_engine.device)
    got, want = small.decoder.logits(x), full.decoder.logits(x)
    kept = small.head.ids
    # the same quantized rows: bit-identical on CPUs; cuBLAS may split a 4-row GEMM differently
    exact = tiny_engine.device.type == "cpu"
    torch.testing.assert_close(got[:, kept], want[:, kept], rtol=0 if exact else 1e-5, atol=0 if exact else 1e-4)
    others = torch.ones(got.shape[-1], dtype=torch.bool)
    others[kept] = False
    assert torch.isinf(got[:, others]).all() and (got[:, others] < 0).all()
    assert small.head.coverage() == 7 / 8  # 42 was seen once and dropped
    small.head.observe([1000] * 4)
    assert not small.head.refresh()  # 12 tokens seen, subset chosen at 8: waits until 16
    small.head.observe([1000] * 4)
    assert small.head.refresh() and 1000 in small.head.ids.tolist()


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_draft_refreshed_in_place_keeps_its_tensors_and_takes_the_new_weights(kernel):
    """What CUDA graphs over the draft need (SGLang worker): after a weight update the draft's
    tensors are the same memory, holding the new weights' quantization."""
    torch.manual_seed(0)
    dtype = torch.float32 if kernel == "fbgemm" else torch.bfloat16
    target = Linear(128, 48, bias=False).to(dtype)
    target.pack()
    draft = QuantLinear(target, kernel, group_size=64)

    def storages(t):
        if isinstance(t, (tuple, list)):
            return [p for x in t for p in storages(x)]
        if hasattr(t, "__tensor_flatten__"):
            return [p for n in t.__tensor_flatten__()[0] for p in storages(getattr(t, n))]
        return [t.data_ptr()] if isinstance(t, torch.Tensor) else []  # FBGEMM's packed weights: no tensors

    before, x = storages([draft.weight, draft.gemv or []]), torch.randn(12, 128, dtype=dtype)
    old = draft(x)
    with torch.no_grad():
        target.weight.copy_(torch.randn_like(target.weight))
    target.pack()
    draft.copy_(QuantLinear(target, kernel, group_size=64))
    assert storages([draft.weight, draft.gemv or []]) == before
    fresh = QuantLinear(target, kernel, group_size=64)
    for rows in (x[:2], x):  # our GEMV or the packed kernel, and the FBGEMM fallback beyond them
        assert torch.equal(draft(rows), fresh(rows))
    assert not torch.equal(draft(x), old)


def test_bench_step_measures_each_drafters_acceptance(tiny_dir):
    """scripts/bench_step.py --samples replays sampled replies through target and drafters: the
    unquantized drafter agrees everywhere (its races too), the int8 one less or as often, the replay reproduces
    the engine's own log-probs (a drafter's keys and values left in the cache would not), and
    each batch size gets a predicted speed-up."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_step.py"
    out = subprocess.run([sys.executable, str(script), "--model", str(tiny_dir), "--dtype", "float32", "--batches", "1,2", "--contexts", "16",
                          "--ks", "1,3", "--repeats", "1", "--drafters", "exact,int8", "--samples", "14", "--max-new-tokens", "10"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.splitlines()[-1])
    exact, int8 = summary["acceptance"]["exact"], summary["acceptance"]["int8"]
    assert exact["positions"] == int8["positions"] > 14  # two groups of rows (12 + 2), several positions each
    assert exact["accept"] == pytest.approx(1.0, abs=1e-5) and exact["greedy"] == 1.0 and exact["race"] == 1.0
    assert 0.0 < int8["accept"] <= exact["accept"] + 1e-6 and 0.0 <= int8["greedy"] <= 1.0 and 0.0 < int8["race"] <= 1.0
    assert summary["target_logprob_gap"] < 1e-3
    for row in summary["rows"]:
        assert row["predicted_speedup_int8"] > 0 and row["predicted_speedup_exact"] > 0
