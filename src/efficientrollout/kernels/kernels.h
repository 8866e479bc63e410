// The kernels each .cpp file defines, for the ones that compose them (layer_cpu.cpp).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <utility>

namespace efficientrollout {

// e^x for x <= 0 (softmax after subtracting the max), vectorizable: 2^n * p(r), r = x - n ln2,
// |r| <= ln2/2, degree-6 Taylor polynomial; relative error < 2e-7 (libm's expf is scalar here).
#pragma omp declare simd
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504f);
  const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// One query's softmax over a chunk of keys, unnormalised: row[0..seen) becomes e^(score - max),
// row[seen..len) (keys it may not see) 0. Returns the max (-inf when it sees none) and the sum,
// which the chunks' merge combines.
inline std::pair<float, float> partial_softmax(float* row, int64_t seen, int64_t len) {
  seen = std::max<int64_t>(seen, 0);
  float mx = -std::numeric_limits<float>::infinity(), sum = 0.f;
  for (int64_t j = 0; j < seen; ++j) mx = std::max(mx, row[j]);
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < seen; ++j) {
    row[j] = exp_nonpositive(row[j] - mx);
    sum += row[j];
  }
  std::fill(row + seen, row + len, 0.f);
  return {mx, sum};
}

// bf16 decode attention on AVX512-BF16 CPUs into `out`; false where it does not serve (dtype, head_dim)
bool attention_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                    int64_t kv_len, at::Tensor& out);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                            int64_t kv_len);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
at::Tensor rope_and_cache(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_cache,
                          at::Tensor v_cache, const at::Tensor& rows, const at::Tensor& positions, int64_t num_heads);
bool bf16_gemv_available();
at::Tensor bf16_gemv(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias);
at::Tensor f32_gemv(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias);
at::Tensor int8_f32_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const c10::optional<at::Tensor>& bias);
at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const c10::optional<at::Tensor>& bias);

}  // namespace efficientrollout
