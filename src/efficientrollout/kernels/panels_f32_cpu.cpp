// fp32 linears over weight panels on AVX-512 CPUs: the fp32 engines' linears from 5 rows up
// (verify, wider decode batches, prefill), in place of oneDNN's prepacked GEMM.
//
// The weight [N, K] is kept a second time as panels [N/16, K, 16]: 16 output columns of one input
// position side by side, a panel's K positions one after another. A tile of MB input rows x NJ
// panels keeps MB*NJ accumulators of 16 outputs each; per input position it loads NJ weight
// vectors and broadcasts MB activations for MB*NJ FMAs, and it never sums across lanes (the
// streamed kernel of gemv_f32_cpu.cpp dots along K and sums 16 lanes per output at the end). Rows
// beyond MB go in passes over the tile's panels, which the first pass brings into cache.
// SmolLM2's 120 layer linears, one core of an AVX512-BF16 CPU, cold weights: 15.8 ms at 12 rows
// (the streamed kernel 24.9, oneDNN prepacked 32.2; reading 424 MB takes 12.5 ms), 25.4 at 24
// rows (oneDNN 41.4); 4 layers at 512 / 2048 rows 61 / 237 ms (oneDNN 63 / 244, the default GEMM
// 136 / 534). Compute-bound in cache: 118 GMAC/s at 12 rows (the streamed kernel 73; this core's
// FMA peak is 133). At 1-4 rows the streamed kernel reads memory as fast or faster: f32_linear
// picks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "kernels.h"

#if defined(__AVX512F__)
#include <immintrin.h>

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kAhead = 64;  // input positions each panel stream is prefetched ahead (4 KB)

// y rows m0..m0+MB-1, columns of panels p..p+NJ-1 = x . w + bias. `pre`: prefetch (first pass).
template <int MB, int NJ>
inline void tile(const float* xp, const float* pp, const float* bp, float* yp, int64_t K, int64_t N, int64_t p, int64_t m0,
                 bool pre) {
  __m512 acc[MB][NJ];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NJ; ++j) acc[m][j] = _mm512_setzero_ps();
  const float* x = xp + m0 * K;
  const float* w = pp + p * K * kLanes;
  for (int64_t k = 0; k < K; ++k) {
    __m512 wv[NJ];
    for (int j = 0; j < NJ; ++j) {
      const float* wj = w + (j * K + k) * kLanes;
      if (pre) _mm_prefetch(reinterpret_cast<const char*>(wj + kAhead * kLanes), _MM_HINT_T0);
      wv[j] = _mm512_loadu_ps(wj);
    }
    for (int m = 0; m < MB; ++m) {
      const __m512 xb = _mm512_set1_ps(x[m * K + k]);
      for (int j = 0; j < NJ; ++j) acc[m][j] = _mm512_fmadd_ps(wv[j], xb, acc[m][j]);
    }
  }
  for (int j = 0; j < NJ; ++j) {
    const __m512 b = bp ? _mm512_loadu_ps(bp + (p + j) * kLanes) : _mm512_setzero_ps();
    for (int m = 0; m < MB; ++m) _mm512_storeu_ps(yp + (m0 + m) * N + (p + j) * kLanes, _mm512_add_ps(acc[m][j], b));
  }
}

// The tile of `rows` (1..MB) rows: tile<rows, NJ>.
template <int MB, int NJ, int R = 1>
inline void tile_rows(int64_t rows, const float* xp, const float* pp, const float* bp, float* yp, int64_t K, int64_t N, int64_t p,
                      int64_t m0, bool pre) {
  if constexpr (R < MB) {
    if (rows != R) return tile_rows<MB, NJ, R + 1>(rows, xp, pp, bp, yp, K, N, p, m0, pre);
  }
  tile<R, NJ>(xp, pp, bp, yp, K, N, p, m0, pre);
}

// Panels p0..p1-1 for all M rows: passes of MB rows (the last takes what is left) over each group
// of NJ panels; panels past the last whole group go one at a time.
template <int MB, int NJ>
void panel_rows(const float* xp, const float* pp, const float* bp, float* yp, int64_t K, int64_t N, int64_t p0, int64_t p1,
                int64_t M) {
  int64_t p = p0;
  for (; p + NJ <= p1; p += NJ)
    for (int64_t m0 = 0; m0 < M; m0 += MB) tile_rows<MB, NJ>(std::min<int64_t>(MB, M - m0), xp, pp, bp, yp, K, N, p, m0, m0 == 0);
  for (; p < p1; ++p)
    for (int64_t m0 = 0; m0 < M; m0 += MB) tile_rows<MB, 1>(std::min<int64_t>(MB, M - m0), xp, pp, bp, yp, K, N, p, m0, m0 == 0);
}

}  // namespace
#endif

namespace efficientrollout {

bool f32_panels_available() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

at::Tensor f32_panels(const at::Tensor& w) {
  // w [N, K] fp32 (nn.Linear layout) → panels [N/16, K, 16]
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.size(0) % 16 == 0, "w [N, K] fp32, N a multiple of 16");
  return w.view({w.size(0) / 16, 16, w.size(1)}).transpose(1, 2).contiguous();
}

at::Tensor f32_panel_linear(const at::Tensor& x, const at::Tensor& panels, const c10::optional<at::Tensor>& bias) {
  // x [M, K] fp32, panels [N/16, K, 16] (f32_panels), bias [N] or none → y [M, N] fp32
  TORCH_CHECK(f32_panels_available(), "fp32 panel linears need a CPU with AVX-512");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && panels.dim() == 3 && panels.scalar_type() == at::kFloat &&
                  panels.size(2) == 16 && panels.size(1) == x.size(1) && panels.is_contiguous(),
              "x [M, K] fp32, panels [N/16, K, 16] fp32 contiguous");
  const int64_t M = x.size(0), K = x.size(1), P = panels.size(0), N = P * 16;
  auto xc = x.contiguous();
  auto y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  at::Tensor b;
  if (bias.has_value()) b = bias->to(at::kFloat).contiguous();
#if defined(__AVX512F__)
  const float* xp = xc.const_data_ptr<float>();
  const float* pp = panels.const_data_ptr<float>();
  const float* bp = bias.has_value() ? b.const_data_ptr<float>() : nullptr;
  float* yp = y.mutable_data_ptr<float>();
  // 24 accumulators at most (of 32 registers); passes of up to 12 rows
  at::parallel_for(0, P, 4, [&](int64_t p0, int64_t p1) {
    if (M <= 6) panel_rows<6, 4>(xp, pp, bp, yp, K, N, p0, p1, M);
    else if (M <= 8) panel_rows<8, 3>(xp, pp, bp, yp, K, N, p0, p1, M);
    else panel_rows<12, 2>(xp, pp, bp, yp, K, N, p0, p1, M);
  });
#endif
  return y;
}

at::Tensor f32_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& panels, const c10::optional<at::Tensor>& bias) {
  // an fp32 linear kept as w [N, K] and its panels: 1-4 rows stream w (f32_gemv), more (or none) run the panels
  if (x.size(0) >= 1 && x.size(0) <= 4 && x.size(1) % 8 == 0 && f32_gemv_available()) return f32_gemv(x, w, bias);
  return f32_panel_linear(x, panels, bias);
}

}  // namespace efficientrollout

TORCH_LIBRARY_FRAGMENT(efficientrollout, m) {
  m.def("f32_linear(Tensor x, Tensor w, Tensor panels, Tensor? bias) -> Tensor");
  m.def("f32_panels(Tensor w) -> Tensor");
  m.def("f32_panel_linear(Tensor x, Tensor panels, Tensor? bias) -> Tensor");
  m.def("f32_panels_available() -> bool", [] { return efficientrollout::f32_panels_available(); });
}

TORCH_LIBRARY_IMPL(efficientrollout, CPU, m) {
  m.impl("f32_linear", &efficientrollout::f32_linear);
  m.impl("f32_panels", &efficientrollout::f32_panels);
  m.impl("f32_panel_linear", &efficientrollout::f32_panel_linear);
}
