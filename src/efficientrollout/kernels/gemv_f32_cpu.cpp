// Weight-streaming fp32 linears for 1-12 rows on AVX2+FMA CPUs: the fp32 engines' decode, draft
// and small-verify steps (CPUs without native bf16 run fp32).
//
// oneDNN's fp32 GEMM reads SmolLM2's layer weights at 24-28 GB/s at 1-4 rows on our 2-core
// AVX512 CPU, where a plain read reaches ~44 GB/s; this kernel (AVX2 only, so it is the same
// code on AVX2-only CPUs) streams them at 34-39 GB/s: all 120 layer linears 12.5 vs 15.4 ms at
// 1 row, 11.0 vs 17.6 ms at 4. Each weight row is prefetched at its place in the next block of
// R rows: a fixed 2 KB ahead fell inside the block being read (8 fp32 rows of SmolLM2's
// 576-wide layers span 18 KB), and with cold weights (160 copies of SmolLM2's four layer
// linears, one thread) the kernel then took 1.4x / 1.7x / 1.5x as long at 1 / 2 / 4 rows; an
// fp32 engine step on one core, batch 1-4, went from 33-48 to 25-37 ms (bench_step, AVX512-BF16 CPU, 2026-11-26).
// Beyond 2 rows the FMAs bound it: tiles of R weight rows x MB input rows (R*MB = 12; a tile of 1
// weight row x 8 or 12 input rows loaded 9 or 13 vectors per 8 or 12 FMAs, and 5-7 rows ran the
// 8-row tile) took the 120 linears from 19 / 25 / 36 ms to 14.5 / 22 / 30 ms at 3-4 / 8 / 12
// rows (one core, cold weights, same results bit for bit); oneDNN needs 26 / 31 / 35 ms.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

namespace {

// 8 weights as fp32: fp32 as they are, int8 converted exactly
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// y rows m0.. (`used` <= MB of them) at columns n..n+R-1 = (x . w) * scale + bias (scale: int8
// weights only): R*MB independent accumulation chains hide the FMA latency, and each step of 8
// along K loads R + MB vectors for R*MB FMAs. `ahead`: where to prefetch from each weight row
// (0: nothing).
template <int MB, int R, typename W>
inline void tile(const float* xp, const W* wp, const float* sp, const float* bp, float* yp, int64_t K, int64_t N, int64_t n,
                 int64_t m0, int64_t used, int64_t ahead) {
  const float* xrow[MB];
  for (int m = 0; m < MB; ++m) xrow[m] = xp + (m0 + std::min<int64_t>(m, used - 1)) * K;
  __m256 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8)
    for (int r = 0; r < R; ++r) {
      const W* w = wp + (n + r) * K + k;
      if (ahead) _mm_prefetch(reinterpret_cast<const char*>(w + ahead), _MM_HINT_T0);
      const __m256 wv = load8(w);
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xrow[m] + k), acc[r][m]);
    }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < used; ++m) {
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r][m]), _mm256_extractf128_ps(acc[r][m], 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_movehdup_ps(h));
      yp[(m0 + m) * N + n + r] = _mm_cvtss_f32(h) * (sp ? sp[n + r] : 1.f) + (bp ? bp[n + r] : 0.f);
    }
}

// Output columns n0..n1-1 for all M input rows, MB rows per tile. More than MB input rows go in
// passes over a block of NB weight rows, which the first pass brings in (so later passes read it
// from cache, not memory).
template <int MB, int R, typename W>
void rows_f32(const float* xp, const W* wp, const float* sp, const float* bp, float* yp, int64_t K, int64_t N, int64_t n0,
              int64_t n1, int64_t M) {
  const int64_t passes = (M + MB - 1) / MB, NB = passes > 1 ? 4 * R : R;
  // Prefetch each row's place in the next block (at least 2 KB ahead): a fixed distance from a
  // row of this block lands inside this block when its rows span more than it.
  const int64_t ahead = std::max<int64_t>(NB * K, 2048 / static_cast<int64_t>(sizeof(W)));
  for (int64_t nb = n0; nb < n1; nb += NB) {
    const int64_t ne = std::min(nb + NB, n1);
    for (int64_t pass = 0; pass < passes; ++pass) {
      const int64_t m0 = pass * MB, used = std::min<int64_t>(MB, M - m0), pre = pass == 0 ? ahead : 0;
      int64_t n = nb;
      for (; n + R <= ne; n += R) tile<MB, R>(xp, wp, sp, bp, yp, K, N, n, m0, used, pre);
      for (; n < ne; ++n) tile<MB, 1>(xp, wp, sp, bp, yp, K, N, n, m0, used, pre);
    }
  }
}

}  // namespace
#endif

namespace efficientrollout {

bool f32_gemv_available() {
#if defined(__AVX2__) && defined(__FMA__)
  return true;
#else
  return false;
#endif
}

}  // namespace efficientrollout

namespace {

// What f32_gemv and int8_f32_gemv share: checks, the output, the bias in fp32, the stream over
// `wp` (the data of `w`; `scale` defined for int8 weights only).
template <typename W>
at::Tensor streamed_f32(const at::Tensor& x, const at::Tensor& w, const W* wp, const float* sp, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(efficientrollout::f32_gemv_available(), "our fp32 streamed linears need a CPU with AVX2 and FMA");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && x.scalar_type() == at::kFloat, "x [M, K] fp32, w [N, K]");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 12 && x.size(1) % 8 == 0 && w.is_contiguous(), "1-12 rows; K a multiple of 8; contiguous w");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto xc = x.contiguous();
  auto y = at::empty({M, N}, x.options());
  at::Tensor b;
  if (bias.has_value()) b = bias->to(at::kFloat).contiguous();
#if defined(__AVX2__) && defined(__FMA__)
  const float* xp = xc.const_data_ptr<float>();
  const float* bp = bias.has_value() ? b.const_data_ptr<float>() : nullptr;
  float* yp = y.mutable_data_ptr<float>();
  // input rows per pass: as even as passes of at most 6 make them (a pass of fewer rows than its
  // tile computes the missing ones anyway)
  const int64_t per_pass = (M + (M + 5) / 6 - 1) / ((M + 5) / 6);
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    switch (per_pass) {
      case 1: rows_f32<1, 8>(xp, wp, sp, bp, yp, K, N, n0, n1, M); break;
      case 2: rows_f32<2, 4>(xp, wp, sp, bp, yp, K, N, n0, n1, M); break;
      case 3: rows_f32<3, 4>(xp, wp, sp, bp, yp, K, N, n0, n1, M); break;
      case 4: rows_f32<4, 3>(xp, wp, sp, bp, yp, K, N, n0, n1, M); break;
      case 5: rows_f32<5, 2>(xp, wp, sp, bp, yp, K, N, n0, n1, M); break;
      default: rows_f32<6, 2>(xp, wp, sp, bp, yp, K, N, n0, n1, M);
    }
  });
#endif
  return y;
}

}  // namespace

namespace efficientrollout {

at::Tensor f32_gemv(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  // x [M, K] fp32, w [N, K] fp32 (nn.Linear layout), bias [N] or none → y [M, N] fp32
  TORCH_CHECK(w.scalar_type() == at::kFloat, "w [N, K] fp32");
  return streamed_f32(x, w, w.const_data_ptr<float>(), nullptr, bias);
}

at::Tensor int8_f32_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const c10::optional<at::Tensor>& bias) {
  // x [M, K] fp32, q [N, K] int8, scale [N] fp32 (per output row) → y [M, N] = x . (q * scale)^T + bias, fp32:
  // an fp32 target's int8 drafter, weights read at a byte each and activations kept in fp32
  TORCH_CHECK(q.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat && scale.numel() == q.size(0) && scale.is_contiguous(),
              "q [N, K] int8, scale [N] fp32 contiguous");
  return streamed_f32(x, q, q.const_data_ptr<int8_t>(), scale.const_data_ptr<float>(), bias);
}

}  // namespace efficientrollout

TORCH_LIBRARY_FRAGMENT(efficientrollout, m) {
  m.def("f32_gemv(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("int8_f32_gemv(Tensor x, Tensor q, Tensor scale, Tensor? bias) -> Tensor");
  m.def("f32_gemv_available() -> bool", [] { return efficientrollout::f32_gemv_available(); });
}

TORCH_LIBRARY_IMPL(efficientrollout, CPU, m) {
  m.impl("f32_gemv", &efficientrollout::f32_gemv);
  m.impl("int8_f32_gemv", &efficientrollout::int8_f32_gemv);
}
