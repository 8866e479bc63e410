// The decoder layers for 1-12 rows (decode, draft and small verify) in one call.
//
// At these shapes the time between weight reads is Python: ~25 torch calls and 5 module calls
// per layer cost ~90 us of interpreter time on our 2-core CPU, a quarter of the batch-1 step.
// Here the layer is the same sequence of kernels, called from C++. A linear is given as a
// list: [w] (bf16 weight, bf16_gemv), [q, scale] (int8 weight, fp32 scale per row, int8_gemv)
// or [packed, scales_and_zeros, group_size] (ATen's CPU int4 layout, _weight_int4pack_mm_for_cpu).
// fp32 layers (CPUs without native bf16 run fp32) take the same kernels but for the linears
// (linear_f32) and silu * up (ATen's two ops, as the module path).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "kernels.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

// An fp32 target's int8 drafter linear, 1-12 rows: on AVX512-VNNI CPUs int8_vnni_gemv (int8
// activations, VNNI dot products); elsewhere int8_f32_gemv (fp32 activations), except where the
// bf16 kernel over bf16 copies of them is faster: AVX512-BF16 CPUs from 7 rows (SmolLM2's 120
// layer linears, cold, one core: fp32 activations 3.3-4.2 / 4.7-5.0 / 6.1 / 6.7-6.9 ms at 1-2 /
// 4 / 5 / 6 rows, bf16 with the casts 4.1-5.0 / 6.3-6.4 / 6.2-6.8 / 6.6-6.9; at 7 / 8 / 10 rows
// 8.7 / 8.8 / 12.8 against 6.8 / 7.5 / 10.7).
at::Tensor int8_linear_f32(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const c10::optional<at::Tensor>& bias) {
  if (efficientrollout::int8_vnni_available()) return efficientrollout::int8_vnni_gemv(x, q, scale, bias);
  bool bf16 = efficientrollout::bf16_gemv_available() && x.size(1) % 32 == 0;
#if defined(__AVX512F__)
  bf16 = bf16 && x.size(0) > 6;
#endif
  if (bf16) return efficientrollout::int8_gemv(x.to(at::kBFloat16), q, scale, bias).to(at::kFloat);
  return efficientrollout::int8_f32_gemv(x, q, scale, bias);
}

// A bf16 target's int8 drafter linear, 1-12 rows: on AVX512-VNNI CPUs int8_vnni_gemv over fp32
// copies of the activations (quantized to int8 per block of 64 there), elsewhere int8_gemv over
// the bf16 activations. SmolLM2's 120 layer linears, one core of the Intel Xeon (Emerald Rapids):
// VNNI 0.58 / 0.40 / 0.42 / 0.42 / 0.60 / 0.45 of int8_gemv's time at 1 / 2 / 4 / 6 / 8 / 12 rows.
at::Tensor int8_linear_bf16(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const c10::optional<at::Tensor>& bias) {
  if (efficientrollout::int8_vnni_available()) return efficientrollout::int8_vnni_gemv(x.to(at::kFloat), q, scale, bias).to(at::kBFloat16);
  return efficientrollout::int8_gemv(x, q, scale, bias);
}

// An fp32 linear of 1-12 rows (up to decoder.py's FUSED_PANEL_ROWS with panels): [w] (fp32
// weight, f32_gemv), [w, panels] (fp32 weight and its panels, f32_linear) or [q, scale] (int8
// weight, int8_linear_f32), as decoder.py's Linear and kernels/__init__.py's int8_gemv_op choose
// for the module path.
at::Tensor linear_f32(const at::Tensor& x, at::TensorList w, const c10::optional<at::Tensor>& bias) {
  if (w.size() == 1) return efficientrollout::f32_gemv(x, w[0], bias);
  TORCH_CHECK(w.size() == 2, "an fp32 linear is [fp32 w], [fp32 w, panels] or [int8 q, scale]");
  if (w[0].scalar_type() == at::kFloat) return efficientrollout::f32_linear(x, w[0], w[1], bias);
  return int8_linear_f32(x, w[0], w[1], bias);
}

at::Tensor linear(const at::Tensor& x, at::TensorList w, const c10::optional<at::Tensor>& bias) {
  if (x.scalar_type() == at::kFloat) return linear_f32(x, w, bias);
  if (w.size() == 1) return efficientrollout::bf16_gemv(x, w[0], bias);
  if (w.size() == 2) return int8_linear_bf16(x, w[0], w[1], bias);
  TORCH_CHECK(w.size() == 3 && !bias.has_value(), "a linear is [bf16 w], [int8 q, scale] or [int4 packed, scales_and_zeros, group_size]");
  return at::_weight_int4pack_mm_for_cpu(x, w[0], w[2].item<int64_t>(), w[1]);
}

#if defined(__AVX512BF16__)
// exp_nonpositive (kernels.h) on 16 lanes
inline __m512 exp_nonpositive16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(_mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693145752f))), _mm512_mul_ps(n, _mm512_set1_ps(1.42860677e-6f)));
  __m512 p = _mm512_set1_ps(1.0f / 720);
  for (const float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

inline __m512 load16(const at::BFloat16* p) { return _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
#endif

// silu(gate) * up over [n, 2I] → [n, I], rounding like the two bf16 ops it replaces (fp32: those
// two ATen ops, as the module path calls them)
at::Tensor silu_mul(const at::Tensor& gate_up) {
  const int64_t n = gate_up.size(0), I = gate_up.size(1) / 2;
  if (gate_up.scalar_type() == at::kFloat) return at::silu(gate_up.narrow(1, 0, I)) * gate_up.narrow(1, I, I);
  auto out = at::empty({n, I}, gate_up.options());
  const auto* g = gate_up.const_data_ptr<at::BFloat16>();
  auto* o = out.mutable_data_ptr<at::BFloat16>();
  for (int64_t r = 0; r < n; ++r) {
    int64_t i = 0;
#if defined(__AVX512BF16__)
    for (; i + 16 <= I; i += 16) {
      const __m512 x = load16(g + r * 2 * I + i);
      const __m512 e = exp_nonpositive16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
      const __mmask16 pos = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ);
      const __m512 sigmoid = _mm512_div_ps(_mm512_mask_blend_ps(pos, e, _mm512_set1_ps(1.f)), _mm512_add_ps(_mm512_set1_ps(1.f), e));
      const __m512 s = _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(_mm512_mul_ps(x, sigmoid)));
      const __m256bh y = _mm512_cvtneps_pbh(_mm512_mul_ps(s, load16(g + r * 2 * I + I + i)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + r * I + i), (__m256i)y);
    }
#endif
    for (; i < I; ++i) {  // sigmoid from e^-|x| (our vectorizable exp; libm's is scalar)
      const float x = static_cast<float>(g[r * 2 * I + i]);
      const float e = efficientrollout::exp_nonpositive(-std::fabs(x));
      const float sigmoid = x >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
      const at::BFloat16 s = static_cast<at::BFloat16>(x * sigmoid);
      o[r * I + i] = static_cast<at::BFloat16>(static_cast<float>(s) * static_cast<float>(g[r * 2 * I + I + i]));
    }
  }
  return out;
}

at::Tensor decode_layer(const at::Tensor& x, const at::Tensor& input_norm, const at::Tensor& post_norm, double eps,
                        at::TensorList qkv, const c10::optional<at::Tensor>& qkv_bias, at::TensorList o,
                        at::TensorList gate_up, at::TensorList down, const at::Tensor& cos, const at::Tensor& sin,
                        at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& rows, const at::Tensor& positions,
                        int64_t kv_len, int64_t num_heads) {
  // x [b*T, hidden] bf16 or fp32; cos/sin [b, T, D]; caches [slots, S, Hkv, D]; positions [b, T] → [b*T, hidden]
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) && positions.dim() == 2,
              "x [b*T, hidden] bf16 or fp32");
  const int64_t b = positions.size(0), T = positions.size(1), D = k_cache.size(3), Hkv = k_cache.size(2);
  TORCH_CHECK(x.size(0) == b * T, "x rows must be b*T");
  auto h = efficientrollout::rms_norm(x, input_norm, eps);
  auto qkv_out = linear(h, qkv, qkv_bias).view({b, T, num_heads + 2 * Hkv, D});
  auto q = efficientrollout::rope_and_cache(qkv_out, cos, sin, k_cache, v_cache, rows, positions, num_heads);
  auto attn = efficientrollout::decode_attention(q, k_cache, v_cache, positions, kv_len).view({b * T, num_heads * D});
  auto x1 = at::add(x, linear(attn, o, c10::nullopt));
  auto act = silu_mul(linear(efficientrollout::rms_norm(x1, post_norm, eps), gate_up, c10::nullopt));
  return at::add(x1, linear(act, down, c10::nullopt));
}

// All layers in one call: the interpreter and the dispatcher cost ~15 us per op call, 0.45 ms
// per SmolLM2 step with one call per layer. `weights` holds each layer's tensors in order:
// input_norm, post_norm, the qkv bias if any, then the qkv, o, gate_up and down linears;
// `counts` holds 5 ints per layer: has-bias and the number of tensors of each linear.
at::Tensor decode_stack(const at::Tensor& x, at::TensorList weights, at::IntArrayRef counts, double eps,
                        const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_cache, at::Tensor v_cache,
                        const at::Tensor& rows, const at::Tensor& positions, int64_t kv_len, int64_t num_heads) {
  // caches [layers, slots, S, Hkv, D]
  TORCH_CHECK(counts.size() % 5 == 0 && static_cast<int64_t>(counts.size()) / 5 == k_cache.size(0), "5 counts per layer");
  auto h = x;
  size_t at = 0;
  for (size_t layer = 0; layer < counts.size() / 5; ++layer) {
    const int64_t* c = &counts[layer * 5];
    TORCH_CHECK(at + 2 + c[0] + c[1] + c[2] + c[3] + c[4] <= weights.size(), "fewer weights than counts");
    const at::Tensor& input_norm = weights[at];
    const at::Tensor& post_norm = weights[at + 1];
    c10::optional<at::Tensor> bias;
    if (c[0]) bias = weights[at + 2];
    at += 2 + c[0];
    auto take = [&](int64_t n) { auto w = weights.slice(at, n); at += n; return w; };
    const auto qkv = take(c[1]), o = take(c[2]), gate_up = take(c[3]), down = take(c[4]);
    h = decode_layer(h, input_norm, post_norm, eps, qkv, bias, o, gate_up, down, cos, sin, k_cache.select(0, layer),
                     v_cache.select(0, layer), rows, positions, kv_len, num_heads);
  }
  return h;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(efficientrollout, m) {
  m.def("decode_stack(Tensor x, Tensor[] weights, int[] counts, float eps, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, Tensor rows, Tensor positions, int kv_len, int num_heads) -> Tensor");
  m.def("int8_linear_f32(Tensor x, Tensor q, Tensor scale, Tensor? bias) -> Tensor");
  m.def("int8_linear_bf16(Tensor x, Tensor q, Tensor scale, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(efficientrollout, CPU, m) {
  m.impl("decode_stack", &decode_stack);
  m.impl("int8_linear_f32", &int8_linear_f32);
  m.impl("int8_linear_bf16", &int8_linear_bf16);
}
