// The kernels each .cpp file defines, for the ones that compose them (layer_cpu.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

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

// The frame of our decode attention kernels (attention_cpu.cpp, attention_f32_cpu.cpp): each row's
// keys split into chunks of >= 64, so that a few rows still give every core work. A unit is one
// row's chunk with all its heads: attend(bi, s0, s1, visible, pm, psum, pacc) leaves for each of
// the row's Q = H*T queries (qi = h * T + t) the unnormalised partial softmax over keys s0..s1-1
// (visible[t]: how many keys query t may see): max pm[qi], sum psum[qi], P.V pacc[qi * D ..].
// A second pass merges each query's chunks and calls store(bi, qi, acc, 1 / sum) (acc: D floats).
template <typename Attend, typename Store>
void chunked_attention(int64_t b, int64_t T, int64_t Q, int64_t D, const int64_t* positions, int64_t kv_len, Attend attend,
                       Store store) {
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = std::max<int64_t>(1, std::min((kv_len + 63) / 64, (2 * threads + b - 1) / b));
  const int64_t chunk = (kv_len + chunks - 1) / chunks, units = b * chunks;
  std::vector<int64_t> visible(b * T);  // keys 0..visible-1 are visible to query (bi, t)
  for (int64_t i = 0; i < b * T; ++i) visible[i] = std::min(positions[i], kv_len - 1) + 1;
  std::vector<float> part_max(units * Q), part_sum(units * Q), part_acc(units * Q * D);
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t bi = unit / chunks, s0 = unit % chunks * chunk;
      const int64_t* vis = &visible[bi * T];
      const int64_t s1 = std::min(s0 + chunk, *std::max_element(vis, vis + T));
      float* pm = &part_max[unit * Q];
      float* psum = &part_sum[unit * Q];
      float* pacc = &part_acc[unit * Q * D];
      if (s1 <= s0) {
        std::fill(pm, pm + Q, -std::numeric_limits<float>::infinity());
        std::fill(psum, psum + Q, 0.f);
        std::fill(pacc, pacc + Q * D, 0.f);
        continue;
      }
      attend(bi, s0, s1, vis, pm, psum, pacc);
    }
  });
  at::parallel_for(0, b * Q, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bi = i / Q, qi = i % Q;
      float mx = -std::numeric_limits<float>::infinity(), sum = 0.f;
      for (int64_t c = 0; c < chunks; ++c) mx = std::max(mx, part_max[(bi * chunks + c) * Q + qi]);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t u = (bi * chunks + c) * Q + qi;
        if (part_sum[u] == 0.f) continue;
        const float w = std::exp(part_max[u] - mx);
        sum += w * part_sum[u];
        const float* pa = &part_acc[u * D];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[d] += w * pa[d];
      }
      store(bi, qi, acc.data(), 1.f / sum);
    }
  });
}

// bf16 decode attention on AVX512-BF16 CPUs into `out`; false where it does not serve (dtype, head_dim)
bool attention_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                    int64_t kv_len, at::Tensor& out);
// fp32 decode attention on AVX2+FMA CPUs into `out`; false where it does not serve (dtype, head_dim)
bool attention_f32(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                   int64_t kv_len, at::Tensor& out);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                            int64_t kv_len);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
at::Tensor rope_and_cache(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_cache,
                          at::Tensor v_cache, const at::Tensor& rows, const at::Tensor& positions, int64_t num_heads);
bool bf16_gemv_available();
bool f32_gemv_available();
at::Tensor bf16_gemv(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias);
at::Tensor f32_gemv(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias);
at::Tensor int8_f32_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const c10::optional<at::Tensor>& bias);
at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const c10::optional<at::Tensor>& bias);
bool f32_panels_available();
at::Tensor f32_panel_linear(const at::Tensor& x, const at::Tensor& panels, const c10::optional<at::Tensor>& bias);
at::Tensor f32_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& panels, const c10::optional<at::Tensor>& bias);
bool int8_vnni_available();
at::Tensor int8_vnni_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const c10::optional<at::Tensor>& bias);

// The weight-streaming linears' outer loop (gemv_f32_cpu.cpp, int8_vnni_cpu.cpp): output columns
// n0..n1-1 for all M input rows, MB rows per tile. More than MB input rows go in passes over a
// block of NB weight rows, which the first pass brings in (so later passes read it from cache,
// not memory). The first pass prefetches each row's place in the next block (at least 2 KB
// ahead): a fixed distance from a row of this block lands inside this block when its rows span
// more than it. `tile(r, n, m0, used, ahead)` computes columns n..n+r-1 for input rows m0..
// (`used` of them), r a std::integral_constant (R, or 1 for a block's last columns), `ahead` in
// weight elements of `elem` bytes (0: no prefetch).
template <int MB, int R, class Tile>
inline void tile_passes(Tile&& tile, int64_t K, int64_t elem, int64_t n0, int64_t n1, int64_t M) {
  const int64_t passes = (M + MB - 1) / MB, NB = passes > 1 ? 4 * R : R;
  const int64_t ahead = std::max<int64_t>(NB * K, 2048 / elem);
  for (int64_t nb = n0; nb < n1; nb += NB) {
    const int64_t ne = std::min(nb + NB, n1);
    for (int64_t pass = 0; pass < passes; ++pass) {
      const int64_t m0 = pass * MB, used = std::min<int64_t>(MB, M - m0), pre = pass == 0 ? ahead : 0;
      int64_t n = nb;
      for (; n + R <= ne; n += R) tile(std::integral_constant<int, R>{}, n, m0, used, pre);
      for (; n < ne; ++n) tile(std::integral_constant<int, 1>{}, n, m0, used, pre);
    }
  }
}

}  // namespace efficientrollout
