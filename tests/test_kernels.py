"""Our C++ CPU decode kernels against the PyTorch ops they replace (the slow obvious path)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import efficientrollout.models.decoder as decoder_module
from efficientrollout.kernels import cpu_ops
from efficientrollout.models.decoder import apply_rope

OPS = cpu_ops()
pytestmark = pytest.mark.skipif(OPS is None, reason="no C++ compiler here: the CPU kernels could not be built")


def _reference_attention(q, k_cache, v_cache, positions, kv_len):
    """fp32 SDPA over the cache with the visibility mask: q [b, T, H, D] → [b, T, H, D]."""
    b = q.shape[0]
    keys, values = (c[:b, :kv_len].transpose(1, 2).float() for c in (k_cache, v_cache))
    mask = (torch.arange(kv_len) <= positions[:, :, None])[:, None]
    out = F.scaled_dot_product_attention(q.transpose(1, 2).float(), keys, values, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)


@pytest.mark.parametrize("dtype,D", [(torch.float32, 16), (torch.float32, 64), (torch.float32, 128), (torch.bfloat16, 16),
                                     (torch.float16, 16), (torch.bfloat16, 64), (torch.bfloat16, 128)])
@pytest.mark.parametrize("b,T,S", [(1, 1, 7), (1, 1, 700), (3, 4, 40), (5, 1, 300), (2, 6, 1000), (1, 8, 257)])
def test_decode_attention_matches_sdpa(dtype, D, b, T, S):
    """Head sizes 64 and 128 in bf16 take the AVX512-BF16 kernel (attention_cpu.cpp) where the CPU
    has it; fp32 the AVX2 kernel (attention_f32_cpu.cpp) at every head size here."""
    torch.manual_seed(b * 100 + T + S)
    H, Hkv = 6, 2
    qkv = torch.randn(b, T, H + 2 * Hkv, D, dtype=dtype)
    q = qkv[:, :, :H]  # a strided view, as the decoder passes it
    k_cache, v_cache = torch.randn(2, 8, 1024, Hkv, D, dtype=dtype)
    # rows at different depths; a row may see fewer keys than kv_len (the batch's longest)
    ends = torch.tensor([S - 1 - 3 * i for i in range(b)]).clamp(min=T - 1)
    positions = ends[:, None] - torch.arange(T - 1, -1, -1)
    out = OPS.decode_attention(q, k_cache, v_cache, positions, S)
    want = _reference_attention(q, k_cache, v_cache, positions, S)
    atol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), want, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rms_norm_is_bit_identical_to_the_reference_op_order(dtype):
    torch.manual_seed(0)
    x, w = torch.randn(5, 3, 576, dtype=dtype) * 3, (torch.rand(576) + 0.5).to(dtype)
    xf = x.float()
    want = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    got = OPS.rms_norm(x, w, 1e-5)
    if dtype == torch.bfloat16:  # the engine's default CPU precision: exactly the same bits
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, atol=2e-3 if dtype == torch.float16 else 1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_and_cache_write_match_the_torch_ops(dtype):
    torch.manual_seed(1)
    b, T, H, Hkv, D, slots, S = 3, 4, 6, 2, 16, 5, 64
    qkv = torch.randn(b, T, H + 2 * Hkv, D, dtype=dtype)
    angles = torch.randn(b, T, 1, D // 2)
    cos = torch.cat((angles.cos(), angles.cos()), -1).to(dtype)
    sin = torch.cat((-angles.sin(), angles.sin()), -1).to(dtype)
    rows, positions = torch.tensor([4, 0, 2]), torch.tensor([[3, 4, 5, 6], [10, 11, 12, 13], [0, 1, 2, 3]])
    k_cache, v_cache = torch.zeros(2, slots, S, Hkv, D, dtype=dtype)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    qk, v = qkv.split([H + Hkv, Hkv], dim=2)
    want_q, k = apply_rope(qk, cos, sin).split([H, Hkv], dim=2)
    want_k[rows[:, None].expand(b, T), positions] = k
    want_v[rows[:, None].expand(b, T), positions] = v
    q = OPS.rope_and_cache(qkv, cos, sin, k_cache, v_cache, rows, positions, H)
    assert torch.equal(v_cache, want_v)
    if dtype == torch.bfloat16:  # each product rounds to bf16 first, as the ops do: the same bits
        assert torch.equal(q, want_q) and torch.equal(k_cache, want_k)
    else:  # fp32: the compiler may fuse multiply-add (one rounding less)
        torch.testing.assert_close(q, want_q, atol=1e-6, rtol=0)
        torch.testing.assert_close(k_cache, want_k, atol=1e-6, rtol=0)
    with pytest.raises(RuntimeError, match="out of range"):
        OPS.rope_and_cache(qkv, cos, sin, k_cache, v_cache, rows, positions + S, H)


@pytest.mark.parametrize("model_dir", ["tiny_dir", "tiny64_dir"])
def test_bf16_decode_with_kernels_matches_the_torch_path(model_dir, request, monkeypatch):
    """The whole bf16 decoder (prefill, then decode and verify steps) with and without the kernels."""
    from efficientrollout.engines.native.runner import ModelRunner
    from efficientrollout.models import load_model

    loaded = load_model(request.getfixturevalue(model_dir), torch.bfloat16, torch.device("cpu"), max_seq_len=128)
    runner = ModelRunner(loaded.decoder, max_batch_size=3, max_seq_len=128)
    runner.prefill([[5, 17, 300, 42, 9], [8, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8]], slots=[0, 1, 2])
    tokens, positions = torch.tensor([[11, 12, 13], [21, 22, 23], [31, 32, 33]]), torch.tensor([[5, 6, 7], [3, 4, 5], [8, 9, 10]])
    fast = runner.forward(tokens, positions, kv_len=11)
    monkeypatch.setattr(decoder_module, "cpu_ops", lambda: None)
    loaded.decoder.invalidate_fused()  # derived from the kernels: built again without them
    slow = runner.forward(tokens, positions, kv_len=11)
    # bf16 rounding of the attention output differs; logits stay within bf16 noise of each other
    assert (fast - slow).abs().max() < 0.05 * slow.abs().max()
    assert (fast.argmax(-1) == slow.argmax(-1)).float().mean() > 0.95


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_layers_equal_the_module_path_for_target_and_drafter(tiny_dir, dtype):
    """decode_stack (one C++ call for all layers) runs the same kernels as the Python layer code:
    the same bits, for the target and its int8 (and, in bf16, int4) drafters, at decode and
    verify shapes (beyond 12 rows where fp32 panels serve every linear). fp32 layers call the
    module path's ATen ops for SiLU from C++."""
    from efficientrollout.engines.native.runner import ModelRunner
    from efficientrollout.models import load_model
    from efficientrollout.speculation import Drafter

    if OPS is None or not (OPS.bf16_gemv_available() if dtype == torch.bfloat16 else OPS.f32_gemv_available()):
        pytest.skip("the fused layers need AVX512-BF16 (bf16) or AVX2 and FMA (fp32)")
    loaded = load_model(tiny_dir, dtype, torch.device("cpu"), max_seq_len=128)
    runner = ModelRunner(loaded.decoder, max_batch_size=3, max_seq_len=128)
    drafters = [Drafter(loaded.decoder, kernel="int8pack")]
    if dtype == torch.bfloat16:
        drafters.append(Drafter(loaded.decoder, kernel="int4pack", group_size=32))
    runner.prefill([[5, 17, 300, 42, 9], [8, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8]], slots=[0, 1, 2])
    decoders = [loaded.decoder] + [d.decoder for d in drafters]
    assert all(d.fused_layers() is not None for d in decoders)
    assert decoders[1].fused_layers()[0][2] is not loaded.decoder.fused_layers()[0][2]  # its own int8 weights
    if dtype == torch.float32 and OPS.f32_panels_available():
        assert loaded.decoder._fused_rows >= 15 and decoders[1]._fused_rows == 12  # int8 drafters: 1-12 rows
    for tokens, positions in ((torch.tensor([[11], [21], [31]]), torch.tensor([[5], [3], [8]])),
                              (torch.tensor([[11, 12], [21, 22], [31, 32]]), torch.tensor([[5, 6], [3, 4], [8, 9]])),
                              (torch.arange(15).view(3, 5) + 40, torch.tensor([[5], [3], [4]]) + torch.arange(5))):  # 15 rows: fp32 panels
        for decoder in decoders:
            fused = runner.forward(tokens, positions, kv_len=10, decoder=decoder)
            decoder._fused = ()  # "no fused layers": the module path
            slow = runner.forward(tokens, positions, kv_len=10, decoder=decoder)
            decoder.invalidate_fused()
            assert torch.equal(fused, slow)


# rows: every tile choice; width 96 runs the 16-lane tiles where the CPU has AVX-512, 40 (not a
# multiple of 16) the 8-lane ones everywhere; 200 outputs leave a remainder after 3, 6 or 8
@pytest.mark.skipif(OPS is None or not OPS.f32_gemv_available(), reason="the fp32 streamed linear needs AVX2 and FMA")
@pytest.mark.parametrize("width", [96, 40])
@pytest.mark.parametrize("rows", range(1, 13))
def test_f32_streamed_linear_matches_f_linear(rows, width):
    torch.manual_seed(rows)
    x, w, bias = torch.randn(rows, width), torch.randn(200, width), torch.randn(200)
    for b in (None, bias):
        torch.testing.assert_close(OPS.f32_gemv(x, w, b), F.linear(x, w, b), atol=1e-4, rtol=1e-5)
    with pytest.raises(RuntimeError, match="1-12 rows"):
        OPS.f32_gemv(torch.randn(13, width), w, None)


@pytest.mark.skipif(OPS is None or not OPS.f32_gemv_available(), reason="the fp32 streamed linear needs AVX2 and FMA")
@pytest.mark.parametrize("width", [96, 40])
@pytest.mark.parametrize("rows", range(1, 13))
def test_int8_weights_with_fp32_activations_match_the_dequantized_linear(rows, width):
    """An fp32 target's int8 drafter: int8 weights, a scale per output row, activations kept in
    fp32 (int8_f32_gemv), or cast to bf16 or quantized to int8 where those kernels are faster
    (int8_linear_f32)."""
    torch.manual_seed(rows)
    x, q = torch.randn(rows, width), torch.randint(-127, 128, (200, width), dtype=torch.int8)
    scale, bias = torch.rand(200) / 100, torch.randn(200)
    for b in (None, bias):
        want = F.linear(x, q.float() * scale[:, None], b)
        torch.testing.assert_close(OPS.int8_f32_gemv(x, q, scale, b), want, atol=1e-4, rtol=1e-4)
        mixed = OPS.int8_linear_f32(x, q, scale, b)  # bf16: 2^-9 relative error per activation; int8: 1/254 of the row's max
        assert (mixed - want).norm() <= 0.03 * want.norm()


@pytest.mark.skipif(OPS is None or not OPS.int8_vnni_available(), reason="int8 activations (VNNI) need AVX512-VNNI")
@pytest.mark.parametrize("width", [576, 160, 100, 40])
@pytest.mark.parametrize("rows", range(1, 13))
def test_int8_activations_on_vnni_match_the_same_quantization_in_torch(rows, width):
    """int8_vnni_gemv quantizes the activations to int8 in blocks of 64 (round(x * 127 / max|x|)
    per block) and takes exact integer dot products per block: the same as that quantization in
    float64, to fp32 rounding, at every tile and at widths that are not a multiple of 64 (masked
    loads); an outlier coarsens its own block only; a zero row stays zero."""
    torch.manual_seed(rows * 1000 + width)
    x, q = torch.randn(rows, width) * 3 + 1, torch.randint(-128, 128, (200, width), dtype=torch.int8)
    x[0, width // 3] = 50.0  # an outlier channel sets its block's scale
    if rows > 2:
        x[1] = 0.0
    scale, bias = torch.rand(200) / 100, torch.randn(200)
    blocks = F.pad(x, (0, -width % 64)).view(rows, -1, 64)
    amax = blocks.abs().amax(2, keepdim=True)
    xq = torch.where(amax > 0, torch.round(blocks * (127.0 / amax)), 0.0) * (amax / 127)  # dequantized, per block
    xq = xq.view(rows, -1)[:, :width].double()
    for b in (None, bias):
        want = (xq @ q.double().T) * scale.double() + (0 if b is None else b.double())
        got = OPS.int8_vnni_gemv(x, q, scale, b)
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
        row_amax = x.abs().amax(1, keepdim=True)
        per_row = torch.round(x * (127.0 / row_amax.clamp(min=1e-30))) * (row_amax / 127)  # one scale per row, as before
        per_row_want = (per_row.double() @ q.double().T) * scale.double() + (0 if b is None else b.double())
        assert width <= 64 or (per_row_want - want).abs().max() > 1e-3 * want.abs().max()
    if rows > 2:
        assert torch.equal(OPS.int8_vnni_gemv(x, q, scale, None)[1], torch.zeros(200))


@pytest.mark.skipif(OPS is None or not OPS.bf16_gemv_available(), reason="the bf16 kernels need AVX512-BF16")
@pytest.mark.parametrize("rows", [1, 2, 5, 12])
def test_a_bf16_targets_int8_linear_runs_vnni_where_the_cpu_has_it(rows):
    """int8_linear_bf16 (a bf16 target's drafter linear): int8_vnni_gemv over fp32 copies of the
    activations on AVX512-VNNI CPUs, the faster kernel there, else int8_gemv; either way within
    int8's error of the dequantized linear."""
    torch.manual_seed(rows)
    x, q = torch.randn(rows, 576).bfloat16(), torch.randint(-127, 128, (200, 576), dtype=torch.int8)
    scale, bias = torch.rand(200) / 100, torch.randn(200).bfloat16()
    got = OPS.int8_linear_bf16(x, q, scale, bias)
    chosen = OPS.int8_vnni_gemv(x.float(), q, scale, bias).bfloat16() if OPS.int8_vnni_available() else OPS.int8_gemv(x, q, scale, bias)
    assert got.dtype == torch.bfloat16 and torch.equal(got, chosen)
    exact = F.linear(x.float(), q.float() * scale[:, None], bias.float())
    assert (got.float() - exact).norm() <= 0.03 * exact.norm()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 576), (33, 100), (5, 7), (3, 47)])
def test_int8_rows_are_torchaos_numbers_bit_for_bit(dtype, shape):
    """The drafter's weights quantized in one pass give exactly torchao's Int8Tensor.from_hp
    (PerRow): scale max|w| / 127.5 (at least fp32 eps), round half to even, clamp to int8; at
    every width (vector bodies and scalar tails), for ties, a row's extremes, a zero row and a
    row below eps."""
    from torchao.quantization import Int8Tensor, PerRow

    torch.manual_seed(shape[0] * shape[1])
    w = torch.randn(shape) * torch.rand(shape[0], 1) * 4
    w[0, 0] = 40.0  # an outlier sets its row's scale
    if shape[0] >= 5:
        w[1] = 0.0
        w[2] = 1e-30
        w[3, : min(7, shape[1])] = torch.tensor([127.5, 0.5, 1.5, 2.5, -0.5, -2.5, -127.5])[: min(7, shape[1])]  # scale 1: ties
    w = w.to(dtype)
    q, scale = OPS.int8_quantize_rows(w)
    ref = Int8Tensor.from_hp(w.float(), granularity=PerRow())
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.equal(q, ref.qdata) and torch.equal(scale, ref.scale.reshape(-1).float())
    if shape[1] >= 7 and shape[0] >= 5:
        assert q[3, :7].tolist() == [127, 0, 2, 2, 0, -2, -128]


@pytest.mark.skipif(OPS is None or not OPS.f32_panels_available(), reason="fp32 panel linears need AVX-512")
@pytest.mark.parametrize("shape", [(208, 96), (48, 40), (16, 8)])
def test_fp32_panel_linears_match_f_linear_at_any_row_count(shape):
    """Panels [N/16, K, 16]: every tile (1-12 rows, passes beyond), whole groups of panels and the
    odd ones after them (208 = 13 panels), any input width; f32_linear streams 1-4 rows."""
    torch.manual_seed(shape[1])
    w, bias = torch.randn(shape), torch.randn(shape[0])
    panels = OPS.f32_panels(w)
    assert panels.shape == (shape[0] // 16, shape[1], 16) and torch.equal(panels.transpose(1, 2).reshape(shape), w)
    for rows in [*range(1, 26), 37]:
        x = torch.randn(rows, shape[1])
        for b in (None, bias):
            torch.testing.assert_close(OPS.f32_panel_linear(x, panels, b), F.linear(x, w, b), atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(OPS.f32_linear(x, w, panels, b), F.linear(x, w, b), atol=1e-4, rtol=1e-5)
    assert OPS.f32_linear(torch.randn(0, shape[1]), w, panels, bias).shape == (0, shape[0])
    with pytest.raises(RuntimeError, match="multiple of 16"):
        OPS.f32_panels(torch.randn(20, 8))


def test_a_built_kernel_loads_past_a_build_lock_left_by_a_killed_process(tmp_path):
    """An engine killed while compiling leaves torch's build lock behind; every later engine
    used to wait on it forever. A finished build loads without taking the lock."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    built = next(Path(p) for p in torch.ops.loaded_libraries if "efficientrollout_cpu_" in p)
    build = tmp_path / "efficientrollout" / "kernels" / built.parent.name
    build.mkdir(parents=True)
    shutil.copy(built, build / built.name)
    (build / "lock").touch()
    code = "from efficientrollout.kernels import cpu_ops; assert cpu_ops() is not None"
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)}, timeout=120, check=True)
