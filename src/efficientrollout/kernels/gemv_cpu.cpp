// Weight-streaming linears for a few rows (decode, draft, small verify) on AVX512-BF16 CPUs.
//
// At 1-12 rows a linear is a pass over its weights; oneDNN's bf16 GEMM reads them at ~35 GB/s
// on our 2-core CPU, against ~78 GB/s that a plain streaming read reaches. Here each thread
// streams a contiguous block of weight rows once and feeds every input row from it with
// `vdpbf16ps` (32 bf16 products per instruction, fp32 accumulation).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "kernels.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMaxRows = 12;  // from 16 rows oneDNN is faster: we are compute-bound there
constexpr int64_t kPrefetch = 4096;  // bytes ahead in the weight stream, at least

}  // namespace

namespace efficientrollout {

bool bf16_gemv_available() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

}  // namespace efficientrollout

namespace {

#if defined(__AVX512BF16__)
// 32 weights as bf16: bf16 as they are, int8 converted exactly (|q| <= 127)
inline __m512bh load_weights(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline __m512bh load_weights(const int8_t* p) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
  return _mm512_cvtne2ps_pbh(hi, lo);
}

// Output rows n0..n1-1 of y = (x . w) * scale + bias for M input rows (scale: int8 weights
// only). R weight rows at a time, so R*M accumulation chains are independent: one chain per
// accumulator would wait on vdpbf16ps' latency, not on memory.
template <int M, typename W>
void gemv_rows(const uint16_t* xp, const W* wp, const float* sp, const float* bp, uint16_t* yp, int64_t K, int64_t N,
               int64_t n0, int64_t n1, int64_t used = M) {
  // `used` <= M input rows are real: the others repeat the last one and are not stored
  constexpr int R = M >= 8 ? 1 : M >= 4 ? 2 : M >= 2 ? 4 : 8;
  // Prefetch each row's place in the next block of R rows (or kPrefetch bytes ahead, if that
  // is further): a fixed distance from a row of this block lands inside this block when R rows
  // span more than it, and those lines are already on their way. With cold bf16 weights (one
  // thread) the fixed distance took 1.2-1.5x as long at 1-6 rows, int8 weights 1.15x at 1 row.
  const int64_t ahead = std::max<int64_t>(R * K, kPrefetch / static_cast<int64_t>(sizeof(W)));
  const uint16_t* xrow[M];
  for (int m = 0; m < M; ++m) xrow[m] = xp + std::min<int64_t>(m, used - 1) * K;
  for (int64_t n = n0; n < n1; n += R) {
    const int rows = static_cast<int>(std::min<int64_t>(R, n1 - n));
    __m512 acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
      for (int r = 0; r < rows; ++r) {  // x rows are loaded per use: from L1, and 12 would not fit in registers
        _mm_prefetch(reinterpret_cast<const char*>(wp + (n + r) * K + k + ahead), _MM_HINT_T0);
        const __m512bh wv = load_weights(wp + (n + r) * K + k);
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv, (__m512bh)_mm512_loadu_si512(xrow[m] + k));
      }
    }
    for (int r = 0; r < rows; ++r)
      for (int m = 0; m < used; ++m) {
        const float dot = _mm512_reduce_add_ps(acc[r][m]) * (sp ? sp[n + r] : 1.f);
        yp[m * N + n + r] = c10::BFloat16(dot + (bp ? bp[n + r] : 0.f)).x;
      }
  }
}

// y [M, N] for M = 1..12 rows, each thread a contiguous block of output rows (it streams its
// slice of the weights once)
template <typename W>
void gemv(int64_t M, const uint16_t* xp, const W* wp, const float* sp, const float* bp, uint16_t* yp, int64_t K, int64_t N) {
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    switch (M) {
      case 1: gemv_rows<1>(xp, wp, sp, bp, yp, K, N, n0, n1); break;
      case 2: gemv_rows<2>(xp, wp, sp, bp, yp, K, N, n0, n1); break;
      case 3: gemv_rows<3>(xp, wp, sp, bp, yp, K, N, n0, n1); break;
      case 4: gemv_rows<4>(xp, wp, sp, bp, yp, K, N, n0, n1); break;
      case 5: gemv_rows<5>(xp, wp, sp, bp, yp, K, N, n0, n1); break;
      case 6: gemv_rows<6>(xp, wp, sp, bp, yp, K, N, n0, n1); break;
      case 7: gemv_rows<7>(xp, wp, sp, bp, yp, K, N, n0, n1); break;
      case 8: gemv_rows<8>(xp, wp, sp, bp, yp, K, N, n0, n1); break;
      default: gemv_rows<12>(xp, wp, sp, bp, yp, K, N, n0, n1, M); break;
    }
  });
}
#endif

// What bf16_gemv and int8_gemv share: checks, the output, the bias in fp32, the stream over `wp`
// (the data of `w`; `scale` defined for int8 weights only).
template <typename W>
at::Tensor streamed_linear(const at::Tensor& x, const at::Tensor& w, const W* wp, const at::Tensor& scale,
                           const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(efficientrollout::bf16_gemv_available(), "our streamed linears need a CPU with AVX512-BF16");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && x.scalar_type() == at::kBFloat16, "x [M, K] bf16, w [N, K]");
  TORCH_CHECK(x.size(0) <= kMaxRows && x.size(1) % 32 == 0 && w.is_contiguous(), "at most 12 rows; K a multiple of 32; contiguous w");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto xc = x.contiguous();
  auto y = at::empty({M, N}, x.options());
  at::Tensor b32;
  if (bias.has_value()) b32 = bias->to(at::kFloat).contiguous();
#if defined(__AVX512BF16__)
  gemv(M, reinterpret_cast<const uint16_t*>(xc.const_data_ptr<at::BFloat16>()), wp,
       scale.defined() ? scale.const_data_ptr<float>() : nullptr, bias.has_value() ? b32.const_data_ptr<float>() : nullptr,
       reinterpret_cast<uint16_t*>(y.mutable_data_ptr<at::BFloat16>()), K, N);
#endif
  return y;
}

}  // namespace

namespace efficientrollout {

at::Tensor bf16_gemv(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  // x [M, K] bf16, w [N, K] bf16 (nn.Linear layout), bias [N] or none → y [M, N] bf16
  TORCH_CHECK(w.scalar_type() == at::kBFloat16, "bf16 weights");
  return streamed_linear(x, w, reinterpret_cast<const uint16_t*>(w.const_data_ptr<at::BFloat16>()), at::Tensor(), bias);
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const c10::optional<at::Tensor>& bias) {
  // x [M, K] bf16, q [N, K] int8, scale [N] fp32, bias [N] or none → y [M, N] bf16
  TORCH_CHECK(q.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat && scale.numel() == q.size(0),
              "int8 weights, an fp32 scale per row");
  return streamed_linear(x, q, q.const_data_ptr<int8_t>(), scale.contiguous(), bias);
}

}  // namespace efficientrollout

TORCH_LIBRARY_FRAGMENT(efficientrollout, m) {
  m.def("bf16_gemv(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("int8_gemv(Tensor x, Tensor q, Tensor scale, Tensor? bias) -> Tensor");
  m.def("bf16_gemv_available() -> bool", [] { return efficientrollout::bf16_gemv_available(); });
}

TORCH_LIBRARY_IMPL(efficientrollout, CPU, m) {
  m.impl("bf16_gemv", &efficientrollout::bf16_gemv);
  m.impl("int8_gemv", &efficientrollout::int8_gemv);
}
