// An fp32 target's int8 drafter linears for 1-12 rows with int8 activations, on AVX512-VNNI
// CPUs: each activation row is quantized to int8 (one scale per row, max |x| / 127) and the
// products are VNNI dot products (vpdpbusd: 64 int8 multiply-adds per instruction, where the
// fp32 path converts each weight to fp32 first and does 16 per FMA).
//
// vpdpbusd multiplies unsigned by signed bytes: the weights become unsigned by flipping their
// sign bit (w + 128), so the sum carries 128 * sum(x) too, which each row's quantization
// computes once and takes off. y = (sum - 128 * sum(xq)) * x_scale * w_scale + bias.
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
// zeros); the last weight vector of a row is loaded under a mask where K % 64 != 0.
template <int MB, int R>
inline void tile(const int8_t* xq, const int8_t* wp, const int32_t* xsum, const float* xs, const float* sp, const float* bp, float* yp,
                 int64_t K, int64_t Kp, int64_t N, int64_t n, int64_t m0, int64_t used, int64_t ahead) {
  const int8_t* xrow[MB];
  for (int m = 0; m < MB; ++m) xrow[m] = xq + (m0 + std::min<int64_t>(m, used - 1)) * Kp;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 mask = K - k >= 64 ? ~__mmask64(0) : (__mmask64(1) << (K - k)) - 1;
    for (int r = 0; r < R; ++r) {
      const int8_t* w = wp + (n + r) * K + k;
      if (ahead) _mm_prefetch(reinterpret_cast<const char*>(w + ahead), _MM_HINT_T0);
      const __m512i wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, w), flip);  // w + 128, unsigned
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_dpbusd_epi32(acc[r][m], wv, _mm512_loadu_si512(xrow[m] + k));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < used; ++m) {
      const int32_t dot = _mm512_reduce_add_epi32(acc[r][m]) - 128 * xsum[m0 + m];
      yp[(m0 + m) * N + n + r] = static_cast<float>(dot) * xs[m0 + m] * sp[n + r] + (bp ? bp[n + r] : 0.f);
    }
}

// Output columns n0..n1-1 for all M rows (tile_passes, kernels.h, as gemv_f32_cpu.cpp's rows_f32).
template <int MB, int R>
void rows(const int8_t* xq, const int8_t* wp, const int32_t* xsum, const float* xs, const float* sp, const float* bp, float* yp,
          int64_t K, int64_t Kp, int64_t N, int64_t n0, int64_t n1, int64_t M) {
  efficientrollout::tile_passes<MB, R>([&](auto r, int64_t n, int64_t m0, int64_t used, int64_t ahead) {
    tile<MB, decltype(r)::value>(xq, wp, xsum, xs, sp, bp, yp, K, Kp, N, n, m0, used, ahead);
  }, K, 1, n0, n1, M);
}

// Row m of x to int8 (round to nearest even of x * 127 / max|x|; all zeros for a zero row):
// writes Kp bytes (zeros past K), returns the row's scale and sets the sum of its int8 values.
float quantize_row(const float* x, int8_t* q, int64_t K, int64_t Kp, int32_t* sum) {
  __m512 amax = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  float top = _mm512_reduce_max_ps(amax);
  for (; k < K; ++k) top = std::max(top, std::fabs(x[k]));
  const float inv = top > 0.f ? 127.f / top : 0.f;
  const __m512 vinv = _mm512_set1_ps(inv);
  __m512i total = _mm512_setzero_si512();
  for (k = 0; k + 16 <= K; k += 16) {
    const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), vinv));  // nearest even
    total = _mm512_add_epi32(total, v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtsepi32_epi8(v));
  }
  int32_t s = _mm512_reduce_add_epi32(total);
  for (; k < K; ++k) {
    const int32_t v = static_cast<int32_t>(std::nearbyint(x[k] * inv));
    q[k] = static_cast<int8_t>(v);
    s += v;
  }
  std::fill(q + K, q + Kp, int8_t(0));
  *sum = s;
  return top / 127.f;
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
  int32_t xsum[12];
  float xs[12];
  for (int64_t m = 0; m < M; ++m)
    xs[m] = quantize_row(xc.const_data_ptr<float>() + m * K, xq.mutable_data_ptr<int8_t>() + m * Kp, K, Kp, &xsum[m]);
  const int8_t* xp = xq.const_data_ptr<int8_t>();
  const int8_t* wp = q.const_data_ptr<int8_t>();
  const float* sp = scale.const_data_ptr<float>();
  const float* bp = bias.has_value() ? b.const_data_ptr<float>() : nullptr;
  float* yp = y.mutable_data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    switch (M) {
      case 1: rows<1, 8>(xp, wp, xsum, xs, sp, bp, yp, K, Kp, N, n0, n1, M); break;
      case 2: rows<2, 8>(xp, wp, xsum, xs, sp, bp, yp, K, Kp, N, n0, n1, M); break;
      case 3: case 6: rows<3, 8>(xp, wp, xsum, xs, sp, bp, yp, K, Kp, N, n0, n1, M); break;
      case 5: rows<5, 4>(xp, wp, xsum, xs, sp, bp, yp, K, Kp, N, n0, n1, M); break;
      default: rows<4, 6>(xp, wp, xsum, xs, sp, bp, yp, K, Kp, N, n0, n1, M);
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
