// Weight-streaming fp32 linears for 1-12 rows on AVX2+FMA CPUs: the fp32 engines' decode, draft
// and small-verify steps (CPUs without native bf16 run fp32), and their int8 drafters.
//
// oneDNN's fp32 GEMM reads SmolLM2's layer weights at 24-28 GB/s at 1-4 rows on our 2-core
// AVX512 CPU, where a plain read reaches ~44 GB/s; this kernel streams them at 34-39 GB/s: all
// 120 layer linears 12.5 vs 15.4 ms at 1 row, 11.0 vs 17.6 ms at 4. Each weight row is
// prefetched at its place in the next block of R rows: a fixed 2 KB ahead fell inside the block
// being read (8 fp32 rows of SmolLM2's 576-wide layers span 18 KB), and with cold weights (160
// copies of SmolLM2's four layer linears, one thread) the kernel then took 1.4x / 1.7x / 1.5x as
// long at 1 / 2 / 4 rows; an fp32 engine step on one core, batch 1-4, went from 33-48 to 25-37 ms
// (bench_step, AVX512-BF16 CPU, 2026-11-26).
// Beyond 2 rows the FMAs bound it: tiles of R weight rows x MB input rows (R*MB = 12 with 8 lanes;
// a tile of 1 weight row x 8 or 12 input rows loaded 9 or 13 vectors per 8 or 12 FMAs) took the
// 120 linears from 19 / 25 / 36 ms to 14.5 / 22 / 30 ms at 3-4 / 8 / 12 rows (one core, cold
// weights, same results bit for bit); oneDNN needs 26 / 31 / 35 ms. Where the CPU has AVX-512,
// the same tiles 16 lanes wide (twice the FMAs per instruction at the same rate on this CPU, 32
// registers: R*MB up to 24) took them, two interleaved runs, fp32 weights from 17.5-19.0 /
// 22.1-22.5 / 29.5-30.0 ms to 15.8-16.2 / 17.5-17.7 / 24.8-24.9 ms at 5 / 8 / 12 rows (1-4 rows:
// no faster, so they keep 8 lanes); int8 weights from 4.6-4.7 / 9.4 / 12.9-13.1 / 25.8-25.9 ms
// to 3.2-3.8 / 4.7-4.8 / 6.8-6.9 / 13.1 ms at 1 / 4 / 6 / 12 rows (2026-11-27).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

namespace {

// One SIMD width: 8 fp32 lanes (AVX2) or, where the CPU has AVX-512, 16. Weights load as fp32:
// fp32 as they are, int8 converted exactly.
struct Avx2 {
  using V = __m256;
  static constexpr int L = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const int8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(V v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
  }
};

#if defined(__AVX512F__)
struct Avx512 {
  using V = __m512;
  static constexpr int L = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }
};
#endif

// y rows m0.. (`used` <= MB of them) at columns n..n+R-1 = (x . w) * scale + bias (scale: int8
// weights only): R*MB independent accumulation chains hide the FMA latency, and each step of L
// along K loads R + MB vectors for R*MB FMAs. `ahead`: where to prefetch from each weight row
// (0: nothing): at every step with 8 lanes (as measured before AVX-512 tiles existed), once per
// 64-byte line with 16.
template <class S, int MB, int R, typename W>
inline void tile(const float* xp, const W* wp, const float* sp, const float* bp, float* yp, int64_t K, int64_t N, int64_t n,
                 int64_t m0, int64_t used, int64_t ahead) {
  using V = typename S::V;
  constexpr int64_t line = 64 / sizeof(W);
  const float* xrow[MB];
  for (int m = 0; m < MB; ++m) xrow[m] = xp + (m0 + std::min<int64_t>(m, used - 1)) * K;
  V acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = S::zero();
  for (int64_t k = 0; k < K; k += S::L)
    for (int r = 0; r < R; ++r) {  // one weight vector live at a time: R*MB + 2 registers
      const W* w = wp + (n + r) * K + k;
      if (ahead && (S::L == 8 || k % line == 0)) _mm_prefetch(reinterpret_cast<const char*>(w + ahead), _MM_HINT_T0);
      const V wv = S::load(w);
      for (int m = 0; m < MB; ++m) acc[r][m] = S::fma(wv, S::load(xrow[m] + k), acc[r][m]);
    }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < used; ++m) yp[(m0 + m) * N + n + r] = S::sum(acc[r][m]) * (sp ? sp[n + r] : 1.f) + (bp ? bp[n + r] : 0.f);
}

// Output columns n0..n1-1 for all M input rows (tile_passes, kernels.h).
template <class S, int MB, int R, typename W>
void rows_f32(const float* xp, const W* wp, const float* sp, const float* bp, float* yp, int64_t K, int64_t N, int64_t n0,
              int64_t n1, int64_t M) {
  efficientrollout::tile_passes<MB, R>([&](auto r, int64_t n, int64_t m0, int64_t used, int64_t ahead) {
    tile<S, MB, decltype(r)::value>(xp, wp, sp, bp, yp, K, N, n, m0, used, ahead);
  }, K, sizeof(W), n0, n1, M);
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
#if defined(__AVX512F__)
  // AVX-512 (16 lanes, 32 registers: up to 24 accumulators) where it pays: fp32 weights from 5
  // rows (at 1-4 rows the 8-lane tiles read memory as fast), int8 weights at every row count
  // (converting them to fp32 costs FMA-port time, which 16 lanes halve). Tiles per row count
  // measured (SmolLM2's 120 layer linears, cold, one core of an AVX512-BF16 CPU).
  if (K % 16 == 0 && (std::is_same_v<W, int8_t> || M >= 5)) {
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
      if constexpr (std::is_same_v<W, float>) {
        switch (M) {
          case 5: case 6: rows_f32<Avx512, 6, 3>(xp, wp, sp, bp, yp, K, N, n0, n1, M); break;
          case 7: case 8: rows_f32<Avx512, 8, 3>(xp, wp, sp, bp, yp, K, N, n0, n1, M); break;
          default: rows_f32<Avx512, 12, 2>(xp, wp, sp, bp, yp, K, N, n0, n1, M);
        }
      } else {  // more rows than 5 in passes of 3 or 4: 12 rows of a 1536-wide input (74 KB) would not stay in L1
        switch (M) {
          case 1: rows_f32<Avx512, 1, 8>(xp, wp, sp, bp, yp, K, N, n0, n1, M); break;
          case 2: rows_f32<Avx512, 2, 8>(xp, wp, sp, bp, yp, K, N, n0, n1, M); break;
          case 3: case 6: rows_f32<Avx512, 3, 8>(xp, wp, sp, bp, yp, K, N, n0, n1, M); break;
          case 5: rows_f32<Avx512, 5, 4>(xp, wp, sp, bp, yp, K, N, n0, n1, M); break;
          default: rows_f32<Avx512, 4, 6>(xp, wp, sp, bp, yp, K, N, n0, n1, M);
        }
      }
    });
    return y;
  }
#endif
  // input rows per pass: as even as passes of at most 6 make them (a pass of fewer rows than its
  // tile computes the missing ones anyway)
  const int64_t per_pass = (M + (M + 5) / 6 - 1) / ((M + 5) / 6);
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    switch (per_pass) {
      case 1: rows_f32<Avx2, 1, 8>(xp, wp, sp, bp, yp, K, N, n0, n1, M); break;
      case 2: rows_f32<Avx2, 2, 4>(xp, wp, sp, bp, yp, K, N, n0, n1, M); break;
      case 3: rows_f32<Avx2, 3, 4>(xp, wp, sp, bp, yp, K, N, n0, n1, M); break;
      case 4: rows_f32<Avx2, 4, 3>(xp, wp, sp, bp, yp, K, N, n0, n1, M); break;
      case 5: rows_f32<Avx2, 5, 2>(xp, wp, sp, bp, yp, K, N, n0, n1, M); break;
      default: rows_f32<Avx2, 6, 2>(xp, wp, sp, bp, yp, K, N, n0, n1, M);
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
