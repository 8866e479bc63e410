// Decode/verify attention in fp32 on AVX2+FMA CPUs: the path every fp32 step takes (CPUs without
// native bf16 run fp32, and so does any engine asked for the trainer's fp32 log-probs).
//
// SDPA with a mask over the cache took 363 us per SmolLM2 layer at 6 rows x 384 keys (one core,
// AVX512-BF16 CPU, caches cold as in a step): ~10 GB/s for 3.5 MB of keys and values, half of a
// drafter step at 6 rows. Here a work unit is one row's chunk of keys with all its heads, so it
// streams whole key rows (every head's slice of a position is one contiguous row) with the next
// block prefetched; scores come 8 keys at a time (8 accumulators, one horizontal reduction per
// 8 scores), P.V 32 keys at a time so that their value rows stay in L1 across the queries.
// 256-bit vectors on AVX2 CPUs; where the CPU has AVX-512, scores and P.V run 16 lanes wide
// (head sizes a multiple of 16): this core issues two 16-lane FMAs a cycle, and a verify's
// queries make the kernel compute-bound in cache. SmolLM2, 30 layers, 384 keys, one core, three
// interleaved runs: 6 rows 5.5-6.0 -> 4.7-5.2 ms cold (2.3-2.4 vs 3.2 hot), 6 rows x 2 queries
// 8.0-9.1 -> 6.0-7.8, 4 rows x 3 queries 7.3-7.7 -> 5.6-6.0 (2026-11-27).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <limits>
#include <vector>

#include "kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

namespace {

constexpr int64_t kKeys = 8;  // keys per score block: one vector of scores
constexpr int64_t kValues = 32;  // keys per P.V block

// lane i of the result = the sum of v[i]'s lanes
inline __m256 sum8(const __m256* v) {
  const __m256 ab = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));  // [v0..v3 low | v0..v3 high]
  const __m256 cd = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

inline void prefetch_rows(const float* first, int64_t row_stride, int64_t rows, int64_t row_bytes) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t off = 0; off < row_bytes; off += 64)
      _mm_prefetch(reinterpret_cast<const char*>(first + r * row_stride) + off, _MM_HINT_T0);
}

// One unit: row bi's keys s0..s1-1, every head. qf [Q, D]: the row's queries (qi = h * T + t),
// pre-scaled. Leaves per query the unnormalised partial softmax: max `pm`, sum `psum`, P.V `pacc`.
template <int D>
void attend_chunk(const float* qf, const float* kp, const int64_t* ks, const float* vp, const int64_t* vs,
                  const int64_t* visible, int64_t bi, int64_t T, int64_t H, int64_t Hkv, int64_t s0, int64_t s1, float* sc,
                  float* pm, float* psum, float* pacc) {
  constexpr int DP = D < 64 ? D : 64;  // dimensions per P.V pass: DP/8 accumulators in registers
  const int64_t g = H / Hkv, Q = H * T, stride = (s1 - s0 + kKeys - 1) / kKeys * kKeys;
  const int64_t row_bytes = Hkv * D * 4;  // one position's keys (or values), all heads
  const float* krow = kp + bi * ks[0];
  const float* vrow = vp + bi * vs[0];
  prefetch_rows(krow + s0 * ks[1], ks[1], std::min(kKeys, s1 - s0), row_bytes);
  for (int64_t sb = s0; sb < s1; sb += kKeys) {
    if (sb + kKeys < s1) prefetch_rows(krow + (sb + kKeys) * ks[1], ks[1], std::min(kKeys, s1 - sb - kKeys), row_bytes);
    const float* key[kKeys];
    for (int64_t i = 0; i < kKeys; ++i) key[i] = krow + std::min(sb + i, s1 - 1) * ks[1];  // past s1: weight 0 below
    for (int64_t qi = 0; qi < Q; ++qi) {
      const int64_t hoff = qi / T / g * ks[2];
      const float* qr = qf + qi * D;
      __m256 acc[kKeys];
#if defined(__AVX512F__)
      if constexpr (D % 16 == 0) {  // 16 lanes: half the FMAs and loads, then each key's two halves added
        __m512 wide[kKeys];
        for (int64_t i = 0; i < kKeys; ++i) wide[i] = _mm512_setzero_ps();
        for (int c = 0; c < D; c += 16) {
          const __m512 qv = _mm512_loadu_ps(qr + c);
          for (int64_t i = 0; i < kKeys; ++i) wide[i] = _mm512_fmadd_ps(_mm512_loadu_ps(key[i] + hoff + c), qv, wide[i]);
        }
        for (int64_t i = 0; i < kKeys; ++i)
          acc[i] = _mm256_add_ps(_mm512_castps512_ps256(wide[i]), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(wide[i]), 1)));
      } else
#endif
      {
        for (int64_t i = 0; i < kKeys; ++i) acc[i] = _mm256_setzero_ps();
        for (int c = 0; c < D; c += 8) {
          const __m256 qv = _mm256_loadu_ps(qr + c);
          for (int64_t i = 0; i < kKeys; ++i) acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(key[i] + hoff + c), qv, acc[i]);
        }
      }
      _mm256_storeu_ps(sc + qi * stride + (sb - s0), sum8(acc));
    }
  }
  prefetch_rows(vrow + s0 * vs[1], vs[1], std::min(kValues, s1 - s0), row_bytes);
  for (int64_t qi = 0; qi < Q; ++qi)  // softmax over the keys each query may see (the rest weigh 0)
    std::tie(pm[qi], psum[qi]) = efficientrollout::partial_softmax(sc + qi * stride, std::min(visible[qi % T], s1) - s0, stride);
  std::fill(pacc, pacc + Q * D, 0.f);
  for (int64_t pb = s0; pb < s1; pb += kValues) {
    const int64_t pe = std::min(pb + kValues, s1);
    if (pe < s1) prefetch_rows(vrow + pe * vs[1], vs[1], std::min(kValues, s1 - pe), row_bytes);
    for (int64_t qi = 0; qi < Q; ++qi) {
      const int64_t hoff = qi / T / g * vs[2];
      const float* p = sc + qi * stride - s0;
#if defined(__AVX512F__)
      if constexpr (DP % 16 == 0) {  // 16 lanes
        for (int dp = 0; dp < D; dp += DP) {
          float* out = pacc + qi * D + dp;
          __m512 acc[DP / 16];
          for (int c = 0; c < DP / 16; ++c) acc[c] = _mm512_loadu_ps(out + 16 * c);
          for (int64_t s = pb; s < pe; ++s) {
            const __m512 w = _mm512_set1_ps(p[s]);
            const float* vr = vrow + s * vs[1] + hoff + dp;
            for (int c = 0; c < DP / 16; ++c) acc[c] = _mm512_fmadd_ps(_mm512_loadu_ps(vr + 16 * c), w, acc[c]);
          }
          for (int c = 0; c < DP / 16; ++c) _mm512_storeu_ps(out + 16 * c, acc[c]);
        }
        continue;
      }
#endif
      for (int dp = 0; dp < D; dp += DP) {
        float* out = pacc + qi * D + dp;
        __m256 acc[DP / 8];
        for (int c = 0; c < DP / 8; ++c) acc[c] = _mm256_loadu_ps(out + 8 * c);
        for (int64_t s = pb; s < pe; ++s) {
          const __m256 w = _mm256_broadcast_ss(p + s);
          const float* vr = vrow + s * vs[1] + hoff + dp;
          for (int c = 0; c < DP / 8; ++c) acc[c] = _mm256_fmadd_ps(_mm256_loadu_ps(vr + 8 * c), w, acc[c]);
        }
        for (int c = 0; c < DP / 8; ++c) _mm256_storeu_ps(out + 8 * c, acc[c]);
      }
    }
  }
}

template <int D>
void attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions, int64_t kv_len,
               at::Tensor& out) {
  const int64_t T = q.size(1), H = q.size(2), Q = H * T;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const float* qp = q.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();  // [b, T, H, D]
  const auto qs = q.strides(), ks = k.strides(), vs = v.strides();
  efficientrollout::chunked_attention(
      q.size(0), T, Q, D, positions.const_data_ptr<int64_t>(), kv_len,
      [&](int64_t bi, int64_t s0, int64_t s1, const int64_t* visible, float* pm, float* psum, float* pacc) {
        thread_local std::vector<float> qf, sc;  // the row's queries, pre-scaled; scores
        qf.resize(Q * D);
        sc.resize(std::max<size_t>(sc.size(), Q * ((s1 - s0 + kKeys - 1) / kKeys * kKeys)));
        for (int64_t qi = 0; qi < Q; ++qi) {
          const float* src = qp + bi * qs[0] + qi % T * qs[1] + qi / T * qs[2];
          for (int64_t d = 0; d < D; ++d) qf[qi * D + d] = src[d] * scale;
        }
        attend_chunk<D>(qf.data(), k.const_data_ptr<float>(), ks.data(), v.const_data_ptr<float>(), vs.data(), visible, bi, T, H,
                        k.size(2), s0, s1, sc.data(), pm, psum, pacc);
      },
      [&](int64_t bi, int64_t qi, const float* acc, float inv) {
        float* dst = op + ((bi * T + qi % T) * H + qi / T) * D;
        for (int d = 0; d < D; d += 8) _mm256_storeu_ps(dst + d, _mm256_mul_ps(_mm256_loadu_ps(acc + d), _mm256_set1_ps(inv)));
      });
}

}  // namespace
#endif

namespace efficientrollout {

bool attention_f32(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                   int64_t kv_len, at::Tensor& out) {
#if defined(__AVX2__) && defined(__FMA__)
  if (q.scalar_type() != at::kFloat) return false;
  switch (q.size(3)) {
    case 16: attention<16>(q, k, v, positions, kv_len, out); return true;
    case 32: attention<32>(q, k, v, positions, kv_len, out); return true;
    case 64: attention<64>(q, k, v, positions, kv_len, out); return true;
    case 128: attention<128>(q, k, v, positions, kv_len, out); return true;
  }
#endif
  return false;
}

}  // namespace efficientrollout
