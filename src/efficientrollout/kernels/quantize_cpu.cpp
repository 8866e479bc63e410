// The drafter's int8 weights in one pass: torchao's numbers (Int8Tensor.from_hp with PerRow, the
// symmetric per-row int8 the drafter uses) without its five passes over the weights. torchao
// computes, per row: scale = max|w| / 127.5 (at least fp32 eps), q = clamp(round(w * (1 / scale)),
// -128, 127), rounding half to even; so does this, bit for bit (tests/test_kernels.py). Re-deriving
// SmolLM2's drafter after a weight update took 0.75-1.15 s through torchao on one core.
//
// x * inv is rounded by the float-to-int conversion (round to nearest even under the default
// MXCSR mode, which torch keeps) and saturated to int8 by the packing, which is the same as
// rounding then clamping. Finite weights only: engines refuse non-finite ones when loading.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace efficientrollout {
namespace {

float row_absmax(const float* x, int64_t K) {
  float m = 0.f;
  int64_t k = 0;
#if defined(__AVX512F__)
  __m512 v = _mm512_setzero_ps();
  for (; k + 16 <= K; k += 16) v = _mm512_max_ps(v, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  m = _mm512_reduce_max_ps(v);
#elif defined(__AVX2__)
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) v = _mm256_max_ps(v, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
  float lanes[8];
  _mm256_storeu_ps(lanes, v);
  for (float lane : lanes) m = std::max(m, lane);
#endif
  for (; k < K; ++k) m = std::max(m, std::fabs(x[k]));
  return m;
}

void quantize_row(const float* x, int8_t* q, float inv, int64_t K) {
  int64_t k = 0;
#if defined(__AVX512F__)
  const __m512 s = _mm512_set1_ps(inv);
  for (; k + 16 <= K; k += 16)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), s))));
#elif defined(__AVX2__)
  const __m256 s = _mm256_set1_ps(inv);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo the packs' lane interleaving
  for (; k + 32 <= K; k += 32) {
    __m256i i[4];
    for (int j = 0; j < 4; ++j) i[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8 * j), s));
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), _mm256_permutevar8x32_epi32(packed, order));
  }
#endif
  for (; k < K; ++k) q[k] = static_cast<int8_t>(std::clamp(std::nearbyint(x[k] * inv), -128.f, 127.f));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> int8_quantize_rows(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.device().is_cpu(), "int8_quantize_rows: a 2-D CPU tensor");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16, "int8_quantize_rows: fp32 or bf16 weights");
  const at::Tensor src = w.contiguous();
  const int64_t N = src.size(0), K = src.size(1);
  at::Tensor q = at::empty({N, K}, src.options().dtype(at::kChar));
  at::Tensor scale = at::empty({N}, src.options().dtype(at::kFloat));
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  const bool bf16 = src.scalar_type() == at::kBFloat16;
  // ~1M weights per task: a layer's worth runs on one thread (split, it waited on a busy core)
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    std::vector<float> widened(bf16 ? K : 0);  // bf16 rows widen exactly to fp32, as torchao's w.float()
    for (int64_t n = n0; n < n1; ++n) {
      const float* x;
      if (bf16) {
        const at::BFloat16* row = src.data_ptr<at::BFloat16>() + n * K;
        for (int64_t k = 0; k < K; ++k) widened[k] = static_cast<float>(row[k]);
        x = widened.data();
      } else {
        x = src.data_ptr<float>() + n * K;
      }
      const float s = std::max(row_absmax(x, K) / 127.5f, FLT_EPSILON);
      sp[n] = s;
      quantize_row(x, qp + n * K, 1.f / s, K);
    }
  });
  return {q, scale};
}

}  // namespace efficientrollout

TORCH_LIBRARY_FRAGMENT(efficientrollout, m) {
  m.def("int8_quantize_rows(Tensor w) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(efficientrollout, CPU, m) {
  m.impl("int8_quantize_rows", &efficientrollout::int8_quantize_rows);
}
