// An fp32 target's int8 drafter linears for 1-12 rows with int8 activations, on AVX512-VNNI
// CPUs: the activations are quantized to int8 in blocks of 64 (one scale per block, max |x| /
// 127) and the products are VNNI dot products (vpdpbusd: 64 int8 multiply-adds per
// instruction, where the fp32 path converts each weight to fp32 first and does 16 per FMA).
//
// Blocks, not rows: SmolLM2's activations have outlier channels, and one scale per row let
// them coarsen every other channel of it. Measured (`scripts/bench_step.py --samples`: 48
// replies at temperature 1, the drafter's chance of acceptance at the first draft position):
// 0.926 with a scale per row, 0.960 per block of 64, 0.975 with fp32 activations. A block is
// one vector, so each block's integer dot product is scaled in fp32 as it is added.
//
// vpdpbusd multiplies unsigned by signed bytes: the weights become unsigned by flipping their
// sign bit (w + 128), so the sum carries 128 * sum(x) too, which each row's quantization
// computes once and takes off. y = (sum_b xs_b * dot_b - 128 * sum_b xs_b * sum(xq_b)) * w_scale + bias.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "kernels.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>

namespace {

// R weight rows x MB input rows, R*MB accumulators and the weight vector live (the activations
// are the instruction's memory operand). Rows of `xq` are `Kp` bytes (K padded to 64 with
// zeros), with a scale per block of 64 in `xs` (Kp / 64 per row); the last weight vector of a
// row is loaded under a mask where K % 64 != 0. `corr` is each row's 128 * sum_b xs_b * sum(xq_b).
template <int MB, int R>
inline void tile(const int8_t* xq, const int8_t* wp, const float* corr, const float* xs, const float* sp, const float* bp, float* yp,
                 int64_t K, int64_t Kp, int64_t N, int64_t n, int64_t m0, int64_t used, int64_t ahead) {
  const int8_t* xrow[MB];
  const float* srow[MB];
  for (int m = 0; m < MB; ++m) {
    const int64_t row = m0 + std::min<int64_t>(m, used - 1);
    xrow[m] = xq + row * Kp;
    srow[m] = xs + row * (Kp / 64);
  }
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80)), zero = _mm512_setzero_si512();
  __m512 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 mask = K - k >= 64 ? ~__mmask64(0) : (__mmask64(1) << (K - k)) - 1;
    __m512 scale[MB];
    for (int m = 0; m < MB; ++m) scale[m] = _mm512_set1_ps(srow[m][k / 64]);
    for (int r = 0; r < R; ++r) {
      const int8_t* w = wp + (n + r) * K + k;
      if (ahead) _mm_prefetch(reinterpret_cast<const char*>(w + ahead), _MM_HINT_T0);
      const __m512i wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, w), flip);  // w + 128, unsigned
      for (int m = 0; m < MB; ++m) {
        // 16 lanes of 4 products each: |lane| <= 4 * 255 * 127, exact in fp32
        const __m512i dot = _mm512_dpbusd_epi32(zero, wv, _mm512_loadu_si512(xrow[m] + k));
        acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale[m], acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < used; ++m)
      yp[(m0 + m) * N + n + r] = (_mm512_reduce_add_ps(acc[r][m]) - corr[m0 + m]) * sp[n + r] + (bp ? bp[n + r] : 0.f);
}

// Output columns n0..n1-1 for all M rows (tile_passes, kernels.h, as gemv_f32_cpu.cpp's rows_f32).
template <int MB, int R>
void rows(const int8_t* xq, const int8_t* wp, const float* corr, const float* xs, const float* sp, const float* bp, float* yp,
          int64_t K, int64_t Kp, int64_t N, int64_t n0, int64_t n1, int64_t M) {
  efficientrollout::tile_passes<MB, R>([&](auto r, int64_t n, int64_t m0, int64_t used, int64_t ahead) {
    tile<MB, decltype(r)::value>(xq, wp, corr, xs, sp, bp, yp, K, Kp, N, n, m0, used, ahead);
  }, K, 1, n0, n1, M);
}

// A row of x to int8, block by block of 64 (round to nearest even of x * 127 / max|x| over
// the block; all zeros for a zero block): writes Kp bytes (zeros past K) and Kp / 64 scales,
// returns 128 * sum_b scale_b * sum(q_b) (see tile).
float quantize_row(const float* x, int8_t* q, float* scales, int64_t K, int64_t Kp) {
  std::fill(q + K, q + Kp, int8_t(0));
  float corr = 0.f;
  for (int64_t k0 = 0; k0 < Kp; k0 += 64) {
    const int64_t len = std::max<int64_t>(0, std::min<int64_t>(64, K - k0));
    const __mmask16 tail = len % 16 ? static_cast<__mmask16>((1u << (len % 16)) - 1) : 0;
    __m512 amax = _mm512_setzero_ps();
    for (int64_t k = 0; k < len; k += 16)
      amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(k + 16 <= len ? __mmask16(0xFFFF) : tail, x + k0 + k)));
    const float top = _mm512_reduce_max_ps(amax);
    const __m512 inv = _mm512_set1_ps(top > 0.f ? 127.f / top : 0.f);
    __m512i total = _mm512_setzero_si512();
    for (int64_t k = 0; k < len; k += 16) {
      const __mmask16 m = k + 16 <= len ? __mmask16(0xFFFF) : tail;
      const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + k0 + k), inv));  // nearest even
      total = _mm512_add_epi32(total, v);
      _mm_mask_storeu_epi8(q + k0 + k, m, _mm512_cvtsepi32_epi8(v));
    }
    scales[k0 / 64] = top / 127.f;
    corr += 128.f * scales[k0 / 64] * static_cast<float>(_mm512_reduce_add_epi32(total));
  }
  return corr;
}

}  // namespace
#endif

namespace efficientrollout {

bool int8_vnni_available() {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return true;
#else
  return false;
#endif
}

at::Tensor int8_vnni_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const c10::optional<at::Tensor>& bias) {
  // x [M, K] fp32 (quantized per row here), q [N, K] int8, scale [N] fp32 → y [M, N] fp32
  TORCH_CHECK(int8_vnni_available(), "int8_vnni_gemv needs a CPU with AVX512-VNNI");
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && x.size(1) == q.size(1) && x.scalar_type() == at::kFloat, "x [M, K] fp32, q [N, K]");
  TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous() && scale.scalar_type() == at::kFloat && scale.numel() == q.size(0) &&
                  scale.is_contiguous(), "q [N, K] int8 contiguous, scale [N] fp32 contiguous");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 12, "1-12 rows");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0), Kp = (K + 63) / 64 * 64;
  auto y = at::empty({M, N}, x.options());
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  auto xc = x.contiguous();
  at::Tensor b;
  if (bias.has_value()) b = bias->to(at::kFloat).contiguous();
  auto xq = at::empty({M, Kp}, x.options().dtype(at::kChar));
  auto scales = at::empty({M, Kp / 64}, x.options());
  float corr[12];
  float* xs = scales.mutable_data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    corr[m] = quantize_row(xc.const_data_ptr<float>() + m * K, xq.mutable_data_ptr<int8_t>() + m * Kp, xs + m * (Kp / 64), K, Kp);
  const int8_t* xp = xq.const_data_ptr<int8_t>();
  const int8_t* wp = q.const_data_ptr<int8_t>();
  const float* sp = scale.const_data_ptr<float>();
  const float* bp = bias.has_value() ? b.const_data_ptr<float>() : nullptr;
  float* yp = y.mutable_data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    switch (M) {
      case 1: rows<1, 8>(xp, wp, corr, xs, sp, bp, yp, K, Kp, N, n0, n1, M); break;
      case 2: rows<2, 8>(xp, wp, corr, xs, sp, bp, yp, K, Kp, N, n0, n1, M); break;
      case 3: case 6: rows<3, 8>(xp, wp, corr, xs, sp, bp, yp, K, Kp, N, n0, n1, M); break;
      case 5: rows<5, 4>(xp, wp, corr, xs, sp, bp, yp, K, Kp, N, n0, n1, M); break;
      default: rows<4, 6>(xp, wp, corr, xs, sp, bp, yp, K, Kp, N, n0, n1, M);
    }
  });
#endif
  return y;
}

}  // namespace efficientrollout

TORCH_LIBRARY_FRAGMENT(efficientrollout, m) {
  m.def("int8_vnni_gemv(Tensor x, Tensor q, Tensor scale, Tensor? bias) -> Tensor");
  m.def("int8_vnni_available() -> bool", [] { return efficientrollout::int8_vnni_available(); });
}

TORCH_LIBRARY_IMPL(efficientrollout, CPU, m) {
  m.impl("int8_vnni_gemv", &efficientrollout::int8_vnni_gemv);
}
