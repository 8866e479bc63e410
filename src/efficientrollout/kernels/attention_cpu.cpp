// Decode/verify attention in bf16 on AVX512-BF16 CPUs: the path every bf16 step takes.
//
// Measured inside a SmolLM2 step (batch 1, 256 cached keys, 2 cores), the generic kernel in
// decode_cpu.cpp took 80 us per layer at one query per row and 165 us at 8 (a verify), a quarter
// of the target's step and a third of the drafter's, for 200 KB of keys and values. The weights
// streamed between layers evict the cache, and it read each row's keys one head slice at a time
// with scalar conversions, so it waited on memory latency. Here a work unit is one row's chunk
// of keys with all its heads: it streams whole key/value rows, prefetched a block ahead, computes
// 16 scores at a time with `vdpbf16ps` (bf16 products, fp32 sums) and P.V two keys at a time
// with it too. In isolation (hot cache, per layer, 2 cores): 1 row x 1 query, 256 keys 6-8 us;
// 2 rows x 4 queries (a verify), 1000 keys 68 us (158 us with P.V in fp32 FMAs and each
// query's scores summed horizontally; compute-bound there).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <limits>
#include <vector>

#include "kernels.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>

namespace {

constexpr int64_t kKeys = 16;  // keys per score block (one vector of scores)
constexpr int64_t kManyQueries = 6;  // queries per kv head from which scores go through transposed keys
constexpr int kQueriesPerPass = 12;  // their accumulators in registers

// v[i] holds partial sums of score i → one vector whose lane i is the total of v[i]
inline __m512 sum16(const __m512* v) {
  __m512 r[8], s[4];
  for (int i = 0; i < 8; ++i)  // lanes: [a0+a2, b0+b2, a1+a3, b1+b3] per 128 bits
    r[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // [a, b, c, d] per 128 bits: sums of each source's 128-bit slice
    s[i] = _mm512_add_ps(_mm512_shuffle_ps(r[2 * i], r[2 * i + 1], 0x44), _mm512_shuffle_ps(r[2 * i], r[2 * i + 1], 0xEE));
  const __m512 x01 = _mm512_add_ps(_mm512_shuffle_f32x4(s[0], s[1], 0x88), _mm512_shuffle_f32x4(s[0], s[1], 0xDD));
  const __m512 x23 = _mm512_add_ps(_mm512_shuffle_f32x4(s[2], s[3], 0x88), _mm512_shuffle_f32x4(s[2], s[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x01, x23, 0x88), _mm512_shuffle_f32x4(x01, x23, 0xDD));
}

// r[i] lane j → r[j] lane i: a 16 x 16 transpose of 32-bit elements
inline void transpose16(__m512i* r) {
  __m512i t[16], u[16];
  for (int a = 0; a < 8; ++a) {  // per 128 bits: [r2a[j], r2a+1[j], r2a[j+1], r2a+1[j+1]]
    t[2 * a] = _mm512_unpacklo_epi32(r[2 * a], r[2 * a + 1]);
    t[2 * a + 1] = _mm512_unpackhi_epi32(r[2 * a], r[2 * a + 1]);
  }
  for (int b = 0; b < 4; ++b) {  // u[4b+c], 128-bit lane L: element 4L+c of rows 4b..4b+3
    u[4 * b] = _mm512_unpacklo_epi64(t[4 * b], t[4 * b + 2]);
    u[4 * b + 1] = _mm512_unpackhi_epi64(t[4 * b], t[4 * b + 2]);
    u[4 * b + 2] = _mm512_unpacklo_epi64(t[4 * b + 1], t[4 * b + 3]);
    u[4 * b + 3] = _mm512_unpackhi_epi64(t[4 * b + 1], t[4 * b + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // element 4L+c: 128-bit lane L of u[c], u[4+c], u[8+c], u[12+c]
    const __m512i x01 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44), x23 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
    const __m512i y01 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44), y23 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(x01, y01, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(x01, y01, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(x23, y23, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(x23, y23, 0xDD);
  }
}

inline void prefetch_row(const uint16_t* row, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(reinterpret_cast<const char*>(row) + off, _MM_HINT_T0);
}

// One unit: row bi's keys s0..s1-1, every head. Leaves per query (h * T + t) the unnormalised
// partial softmax: max `pm`, sum `psum`, P.V `pacc` [D].
template <int D>
void attend_chunk(const uint16_t* qp, const int64_t* qs, const uint16_t* kp, const int64_t* ks, const uint16_t* vp,
                  const int64_t* vs, const int64_t* visible, int64_t bi, int64_t T, int64_t H, int64_t Hkv, int64_t s0,
                  int64_t s1, float scale, float* sc, float* pm, float* psum, float* pacc) {
  constexpr int QB = 256 / D;  // queries per P.V pass: QB * D/16 = 16 accumulators in registers
  const int64_t g = H / Hkv, Q = H * T, n = s1 - s0, stride = (n + 31) / 32 * 32;  // scores per query, padded
  const int64_t row_bytes = Hkv * D * 2;  // one position's keys (or values), all heads
  auto key = [&](int64_t s, int64_t hk) { return kp + bi * ks[0] + s * ks[1] + hk * ks[2]; };
  auto value = [&](int64_t s, int64_t hk) { return vp + bi * vs[0] + s * vs[1] + hk * vs[2]; };
  for (int64_t s = s0; s < std::min(s1, s0 + kKeys); ++s) prefetch_row(key(s, 0), row_bytes);
  auto prefetch_block = [&](int64_t sb) {  // this block's values (for P.V) and the next block's keys
    for (int64_t s = sb; s < std::min(s1, sb + kKeys); ++s) {
      prefetch_row(value(s, 0), row_bytes);
      if (s + kKeys < s1) prefetch_row(key(s + kKeys, 0), row_bytes);
    }
  };
  const __m512 vscale = _mm512_set1_ps(scale);
  if (g * T >= kManyQueries) {
    // Many queries per kv head (verify): transpose each block of 16 keys once into D/2 vectors of
    // bf16 pairs (lane i: key i), so each query's 16 scores are D/2 vdpbf16ps with its pair of
    // dimensions broadcast, with no horizontal sums.
    for (int64_t sb = s0; sb < s1; sb += kKeys) {
      prefetch_block(sb);
      for (int64_t hk = 0; hk < Hkv; ++hk) {
        __m512i kt[D / 2];
        for (int half = 0; half < D / 32; ++half) {
          __m512i r[16];
          for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(key(std::min(sb + i, s1 - 1), hk) + 32 * half);
          transpose16(r);
          for (int j = 0; j < 16; ++j) kt[16 * half + j] = r[j];
        }
        for (int64_t qb = hk * g * T; qb < (hk + 1) * g * T; qb += kQueriesPerPass) {
          const int64_t nq = std::min<int64_t>(kQueriesPerPass, (hk + 1) * g * T - qb);
          const uint32_t* qd[kQueriesPerPass];
          for (int j = 0; j < nq; ++j)
            qd[j] = reinterpret_cast<const uint32_t*>(qp + bi * qs[0] + (qb + j) % T * qs[1] + (qb + j) / T * qs[2]);
          __m512 acc[kQueriesPerPass];
          for (int j = 0; j < kQueriesPerPass; ++j) acc[j] = _mm512_setzero_ps();
          for (int d = 0; d < D / 2; ++d)
            for (int j = 0; j < nq; ++j)
              acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)kt[d], (__m512bh)_mm512_set1_epi32(static_cast<int>(qd[j][d])));
          for (int j = 0; j < nq; ++j) _mm512_storeu_ps(sc + (qb + j) * stride + (sb - s0), _mm512_mul_ps(acc[j], vscale));
        }
      }
    }
  } else {
    for (int64_t qi = 0; qi < Q; ++qi) {  // qi = h * T + t
      const int64_t h = qi / T, t = qi % T, hk = h / g;
      const uint16_t* qr = qp + bi * qs[0] + t * qs[1] + h * qs[2];
      __m512bh qv[D / 32];
      for (int d = 0; d < D / 32; ++d) qv[d] = (__m512bh)_mm512_loadu_si512(qr + 32 * d);
      for (int64_t sb = s0; sb < s1; sb += kKeys) {
        if (qi == 0) prefetch_block(sb);  // the pass that streams the rows in
        __m512 acc[kKeys];
        for (int64_t i = 0; i < kKeys; ++i) {
          const uint16_t* kr = key(std::min(sb + i, s1 - 1), hk);
          acc[i] = _mm512_setzero_ps();
          for (int d = 0; d < D / 32; ++d) acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_loadu_si512(kr + 32 * d), qv[d]);
        }
        _mm512_storeu_ps(sc + qi * stride + (sb - s0), _mm512_mul_ps(sum16(acc), vscale));
      }
    }
  }
  for (int64_t qi = 0; qi < Q; ++qi)  // softmax over the keys each query may see (the rest weigh 0)
    std::tie(pm[qi], psum[qi]) = efficientrollout::partial_softmax(sc + qi * stride, std::min(visible[qi % T], s1) - s0, stride);
  // P.V with vdpbf16ps over pairs of keys: the probabilities rounded to bf16 (as the reference
  // path's probs.to(bf16) @ values), each pair's two value rows interleaved per dimension
  // (unpack*_epi16 within 128-bit lanes, so accumulator lane l of vector m holds dimension
  // dim(m, l); undone at the store).
  auto* pairs = reinterpret_cast<uint32_t*>(sc + Q * stride);  // [Q][stride / 2] bf16 pairs
  for (int64_t qi = 0; qi < Q; ++qi)
    for (int64_t j = 0; j < stride; j += 32) {
      const float* row = sc + qi * stride + j;
      _mm512_storeu_si512(pairs + qi * stride / 2 + j / 2, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(row + 16), _mm512_loadu_ps(row)));
    }
  auto dim = [](int m, int l) { return 32 * (m / 2) + 8 * (l / 4) + 4 * (m % 2) + l % 4; };
  for (int64_t hk = 0; hk < Hkv; ++hk)
    for (int64_t qb = hk * g * T; qb < (hk + 1) * g * T; qb += QB) {  // QB queries of this kv head per pass
      const int64_t nq = std::min<int64_t>(QB, (hk + 1) * g * T - qb);
      __m512 acc[QB][D / 16];
      for (int j = 0; j < QB; ++j)
        for (int m = 0; m < D / 16; ++m) acc[j][m] = _mm512_setzero_ps();
      for (int64_t s = s0; s < s1; s += 2) {
        const uint16_t* va = value(s, hk);
        const uint16_t* vb = value(std::min(s + 1, s1 - 1), hk);  // an odd last key pairs with itself at weight 0
        __m512i u[D / 16];
        for (int m = 0; m < D / 32; ++m) {
          const __m512i a = _mm512_loadu_si512(va + 32 * m), b = _mm512_loadu_si512(vb + 32 * m);
          u[2 * m] = _mm512_unpacklo_epi16(a, b);
          u[2 * m + 1] = _mm512_unpackhi_epi16(a, b);
        }
        for (int j = 0; j < nq; ++j) {
          const __m512bh p = (__m512bh)_mm512_set1_epi32(static_cast<int>(pairs[(qb + j) * stride / 2 + (s - s0) / 2]));
          for (int m = 0; m < D / 16; ++m) acc[j][m] = _mm512_dpbf16_ps(acc[j][m], (__m512bh)u[m], p);
        }
      }
      for (int j = 0; j < nq; ++j)
        for (int m = 0; m < D / 16; ++m) {
          alignas(64) float lanes[16];
          _mm512_store_ps(lanes, acc[j][m]);
          for (int l = 0; l < 16; ++l) pacc[(qb + j) * D + dim(m, l)] = lanes[l];
        }
    }
}

template <int D>
void attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions, int64_t kv_len,
               at::Tensor& out) {
  const int64_t T = q.size(1), H = q.size(2), Hkv = k.size(2), Q = H * T;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const auto* qp = reinterpret_cast<const uint16_t*>(q.const_data_ptr<at::BFloat16>());
  const auto* kp = reinterpret_cast<const uint16_t*>(k.const_data_ptr<at::BFloat16>());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.const_data_ptr<at::BFloat16>());
  auto* op = reinterpret_cast<uint16_t*>(out.mutable_data_ptr<at::BFloat16>());  // [b, T, H, D]
  const auto qs = q.strides(), ks = k.strides(), vs = v.strides();
  efficientrollout::chunked_attention(
      q.size(0), T, Q, D, positions.const_data_ptr<int64_t>(), kv_len,
      [&](int64_t bi, int64_t s0, int64_t s1, const int64_t* visible, float* pm, float* psum, float* pacc) {
        thread_local std::vector<float> sc;  // scores, then their bf16 pairs
        sc.resize(std::max<size_t>(sc.size(), Q * ((s1 - s0 + 31) / 32 * 32) * 3 / 2));
        attend_chunk<D>(qp, qs.data(), kp, ks.data(), vp, vs.data(), visible, bi, T, H, Hkv, s0, s1, scale, sc.data(), pm, psum, pacc);
      },
      [&](int64_t bi, int64_t qi, const float* acc, float inv) {
        uint16_t* dst = op + ((bi * T + qi % T) * H + qi / T) * D;
        for (int d = 0; d < D; d += 16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(acc + d), _mm512_set1_ps(inv))));
      });
}

}  // namespace
#endif

namespace efficientrollout {

bool attention_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                    int64_t kv_len, at::Tensor& out) {
#if defined(__AVX512BF16__)
  if (q.scalar_type() != at::kBFloat16) return false;
  switch (q.size(3)) {
    case 64: attention<64>(q, k, v, positions, kv_len, out); return true;
    case 128: attention<128>(q, k, v, positions, kv_len, out); return true;
  }
#endif
  return false;
}

}  // namespace efficientrollout
