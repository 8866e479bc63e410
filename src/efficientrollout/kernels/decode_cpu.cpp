// CPU kernels for the decode step, where ATen's ops cost far more than their work.
//
// decode_attention: a few new queries per row attend their row's cached keys/values. With
// 1-5 queries and hundreds of keys the work is tiny (a SmolLM2 layer at 400 keys reads 300 KB),
// but SDPA costs 50-170 us per layer and bf16 matmuls ~25 us each on a 2-core CPU. One pass
// here reads each key and value once per kv head, in fp32 math, for every query sharing it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernels.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

template <typename T>
inline float to_f(T v) { return static_cast<float>(v); }


constexpr int64_t kBlock = 16;

template <typename scalar_t>
void attention_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& positions, int64_t kv_len, at::Tensor& out) {
  // q [b, T, H, D] (any strides, unit last), k/v [slots, S, Hkv, D] (unit last), positions [b, T].
  // Work unit: one chunk of one row's keys (split-K, so a lone row still uses every core) for
  // `hpu` of its kv heads and the g*T queries sharing each (GQA). Whole key rows (all heads)
  // where rows and chunks give every core work: a unit reading one head's third of each key
  // row wastes the prefetcher's work; one kv head per unit only for few rows of short context.
  // Each unit leaves an unnormalised partial (max, sum, acc) per query; a second pass merges.
  const int64_t b = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), Hkv = k.size(2);
  const int64_t threads = at::get_num_threads(), g = H / Hkv;
  const int64_t max_chunks = (kv_len + 127) / 128;  // at least 128 keys per chunk
  auto chunks_for = [&](int64_t rows) { return std::max<int64_t>(1, std::min(max_chunks, (2 * threads + rows - 1) / rows)); };
  const bool whole_rows = b * chunks_for(b) >= 2 * threads;  // enough units without splitting heads
  const int64_t hpu = whole_rows ? Hkv : 1, groups = Hkv / hpu, chunks = chunks_for(b * groups);
  const int64_t Q = hpu * g * T;  // queries per unit, indexed (hh * g + j) * T + t: head (hk0 + hh) * g + j
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const auto qs = q.strides(), ks = k.strides(), vs = v.strides();
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();  // [b, T, H, D] contiguous

  const int64_t chunk = (kv_len + chunks - 1) / chunks;
  const int64_t units = b * groups * chunks;
  std::vector<float> part_max(units * Q), part_sum(units * Q), part_acc(units * Q * D);
  auto visible = [&](int64_t bi, int64_t t) { return std::min(pos[bi * T + t], kv_len - 1) + 1; };

  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(Q * D), vf(hpu * D), kt(hpu * D * kBlock), sc(Q * chunk);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t bi = unit / (groups * chunks), hk0 = unit / chunks % groups * hpu, s0 = unit % chunks * chunk;
      int64_t s1 = 0;  // keys this unit reads: s0..s1-1
      for (int64_t t = 0; t < T; ++t) s1 = std::max(s1, visible(bi, t));
      s1 = std::min(s1, s0 + chunk);
      float* pm = &part_max[unit * Q];
      float* psum = &part_sum[unit * Q];
      float* pacc = &part_acc[unit * Q * D];
      std::fill(pacc, pacc + Q * D, 0.f);
      if (s1 <= s0) {
        std::fill(pm, pm + Q, -std::numeric_limits<float>::infinity());
        std::fill(psum, psum + Q, 0.f);
        continue;
      }
      for (int64_t hj = 0; hj < hpu * g; ++hj)
        for (int64_t t = 0; t < T; ++t) {
          const scalar_t* src = qp + bi * qs[0] + t * qs[1] + (hk0 * g + hj) * qs[2];
          float* dst = &qf[(hj * T + t) * D];
          for (int64_t d = 0; d < D; ++d) dst[d] = to_f(src[d]) * scale;
        }
      if (Q <= 9) {  // few queries per key (decode): dot products straight off each key
        for (int64_t s = s0; s < s1; ++s) {
          const scalar_t* ksrc = kp + bi * ks[0] + s * ks[1];
          for (int64_t hh = 0; hh < hpu; ++hh)
            for (int64_t d = 0; d < D; ++d) vf[hh * D + d] = to_f(ksrc[(hk0 + hh) * ks[2] + d]);
          for (int64_t qi = 0; qi < Q; ++qi) {
            const float* qr = &qf[qi * D];
            const float* kr = &vf[qi / (g * T) * D];
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < D; ++d) dot += qr[d] * kr[d];
            sc[qi * chunk + (s - s0)] = dot;
          }
        }
      } else {  // many queries per key (verify, GQA): transposing a block of keys pays off
        for (int64_t sb = s0; sb < s1; sb += kBlock) {  // scores, kBlock keys at a time
          const int64_t nb = std::min(kBlock, s1 - sb);
          // kt [hpu, D, kBlock]: the block's keys transposed, so each query's kBlock dot products
          // are kBlock-wide FMAs with no horizontal sums
          for (int64_t i = 0; i < kBlock; ++i) {
            const scalar_t* ksrc = kp + bi * ks[0] + (sb + std::min(i, nb - 1)) * ks[1];
            for (int64_t hh = 0; hh < hpu; ++hh)
              for (int64_t d = 0; d < D; ++d) kt[(hh * D + d) * kBlock + i] = to_f(ksrc[(hk0 + hh) * ks[2] + d]);
          }
          for (int64_t qi = 0; qi < Q; ++qi) {
            const float* qr = &qf[qi * D];
            const float* kr = &kt[qi / (g * T) * D * kBlock];
            float dots[kBlock] = {};
            for (int64_t d = 0; d < D; ++d) {
              const float qd = qr[d];
#pragma omp simd
              for (int64_t i = 0; i < kBlock; ++i) dots[i] += qd * kr[d * kBlock + i];
            }
            std::copy(dots, dots + nb, &sc[qi * chunk + (sb - s0)]);
          }
        }
      }
      for (int64_t qi = 0; qi < Q; ++qi)  // local softmax over the keys this query may see
        std::tie(pm[qi], psum[qi]) = efficientrollout::partial_softmax(&sc[qi * chunk], std::min(visible(bi, qi % T), s1) - s0, s1 - s0);
      for (int64_t s = s0; s < s1; ++s) {
        const scalar_t* vsrc = vp + bi * vs[0] + s * vs[1];
        for (int64_t hh = 0; hh < hpu; ++hh)
          for (int64_t d = 0; d < D; ++d) vf[hh * D + d] = to_f(vsrc[(hk0 + hh) * vs[2] + d]);
        for (int64_t qi = 0; qi < Q; ++qi) {
          const float p = sc[qi * chunk + (s - s0)];
          const float* vr = &vf[qi / (g * T) * D];
          float* ar = &pacc[qi * D];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ar[d] += p * vr[d];
        }
      }
    }
  });
  at::parallel_for(0, b * H * T, 16, [&](int64_t begin, int64_t end) {  // merge the chunks
    std::vector<float> acc(D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bi = i / (H * T), h = i / T % H, t = i % T, qi = (h % (hpu * g)) * T + t;
      const int64_t first = (bi * groups + h / (hpu * g)) * chunks;  // this query's units
      float mx = -std::numeric_limits<float>::infinity(), sum = 0.f;
      for (int64_t c = 0; c < chunks; ++c) mx = std::max(mx, part_max[(first + c) * Q + qi]);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t u = (first + c) * Q + qi;
        if (part_sum[u] == 0.f) continue;
        const float w = std::exp(part_max[u] - mx);
        sum += w * part_sum[u];
        const float* pa = &part_acc[u * D];
        for (int64_t d = 0; d < D; ++d) acc[d] += w * pa[d];
      }
      scalar_t* dst = op + ((bi * T + t) * H + h) * D;
      const float inv = 1.f / sum;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(acc[d] * inv);
    }
  });
}

}  // namespace

namespace efficientrollout {

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& positions, int64_t kv_len) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q [b,T,H,D], k/v [slots,S,Hkv,D]");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "head_dim must be contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), "one dtype");
  TORCH_CHECK(q.size(2) % k.size(2) == 0 && q.size(3) == k.size(3) && k.sizes() == v.sizes(), "shapes");
  TORCH_CHECK(k.size(0) >= q.size(0) && kv_len >= 1 && kv_len <= k.size(1), "kv_len / slots out of range");
  auto p = positions.to(at::kLong).contiguous();
  TORCH_CHECK(p.size(0) == q.size(0) && p.size(1) == q.size(1), "positions [b, T]");
  auto out = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options());
  if (attention_bf16(q, k, v, p, kv_len, out)) return out;  // attention_cpu.cpp: the bf16 fast path
  if (attention_f32(q, k, v, p, kv_len, out)) return out;  // attention_f32_cpu.cpp: the fp32 one
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention",
                                  [&] { attention_kernel<scalar_t>(q, k, v, p, kv_len, out); });
  return out;
}

}  // namespace efficientrollout

namespace {

// RMSNorm in the reference op order for low precision (HF Llama): normalise in fp32, round to
// the input dtype, then multiply by the weight and round again. One kernel instead of eight ops.
template <typename scalar_t>
void rms_norm_kernel(const at::Tensor& x, const at::Tensor& w, double eps, at::Tensor& out) {
  const int64_t n = x.size(-1), rows = x.numel() / n;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* wp = w.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = xp + r * n;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < n; ++i) ss += to_f(xr[i]) * to_f(xr[i]);
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + static_cast<float>(eps));
      for (int64_t i = 0; i < n; ++i)
        op[r * n + i] = static_cast<scalar_t>(to_f(wp[i]) * to_f(static_cast<scalar_t>(to_f(xr[i]) * inv)));
    }
  });
}

}  // namespace

namespace efficientrollout {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.scalar_type() == w.scalar_type() && w.dim() == 1 && x.size(-1) == w.size(0), "x [..., n], w [n]");
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto out = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm",
                                  [&] { rms_norm_kernel<scalar_t>(xc, wc, eps, out); });
  return out;
}

}  // namespace efficientrollout

namespace {

// RoPE ("rotate half") on q and k, and the K/V write into the cache, in one pass over qkv.
// Rounds like the op sequence it replaces: round(x*cos) + round(swapped*sin_signed), rounded.
template <typename scalar_t>
void rope_kernel(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                 at::Tensor& v_cache, const at::Tensor& rows, const at::Tensor& positions, int64_t H, at::Tensor& q_out) {
  const int64_t b = qkv.size(0), T = qkv.size(1), D = qkv.size(3), Hkv = k_cache.size(2), half = D / 2;
  const scalar_t* xp = qkv.const_data_ptr<scalar_t>();
  const scalar_t* cp = cos.const_data_ptr<scalar_t>();
  const scalar_t* sp = sin.const_data_ptr<scalar_t>();
  const int64_t* rp = rows.const_data_ptr<int64_t>();
  const int64_t* pp = positions.const_data_ptr<int64_t>();
  scalar_t* kc = k_cache.mutable_data_ptr<scalar_t>();
  scalar_t* vc = v_cache.mutable_data_ptr<scalar_t>();
  scalar_t* qo = q_out.mutable_data_ptr<scalar_t>();
  const auto kcs = k_cache.strides(), vcs = v_cache.strides();
  at::parallel_for(0, b * T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt) {
      const scalar_t* x = xp + bt * (H + 2 * Hkv) * D;
      const scalar_t* c = cp + bt * D;
      const scalar_t* sn = sp + bt * D;
      const int64_t row = rp[bt / T], p = pp[bt];
      TORCH_CHECK(row >= 0 && row < k_cache.size(0) && p >= 0 && p < k_cache.size(1), "slot or position out of range");
      for (int64_t h = 0; h < H + Hkv; ++h) {
        scalar_t* dst = h < H ? qo + (bt * H + h) * D : kc + row * kcs[0] + p * kcs[1] + (h - H) * kcs[2];
        const scalar_t* xh = x + h * D;
        for (int64_t d = 0; d < D; ++d) {
          const scalar_t a = static_cast<scalar_t>(to_f(xh[d]) * to_f(c[d]));
          const scalar_t r = static_cast<scalar_t>(to_f(xh[d < half ? d + half : d - half]) * to_f(sn[d]));
          dst[d] = static_cast<scalar_t>(to_f(a) + to_f(r));
        }
      }
      for (int64_t h = 0; h < Hkv; ++h)
        std::copy(x + (H + Hkv + h) * D, x + (H + Hkv + h + 1) * D, vc + row * vcs[0] + p * vcs[1] + h * vcs[2]);
    }
  });
}

}  // namespace

namespace efficientrollout {

at::Tensor rope_and_cache(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_cache,
                          at::Tensor v_cache, const at::Tensor& rows, const at::Tensor& positions, int64_t num_heads) {
  // qkv [b, T, H + 2 Hkv, D]; cos/sin [b, T, D]; caches [slots, S, Hkv, D]; rows [b]; positions [b, T] → q [b, T, H, D]
  TORCH_CHECK(qkv.dim() == 4 && qkv.is_contiguous() && cos.is_contiguous() && sin.is_contiguous(), "contiguous qkv, cos, sin");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1 && k_cache.sizes() == v_cache.sizes(), "caches");
  TORCH_CHECK(qkv.size(2) == num_heads + 2 * k_cache.size(2) && qkv.size(3) == k_cache.size(3) && qkv.size(3) % 2 == 0, "head counts");
  TORCH_CHECK(cos.scalar_type() == qkv.scalar_type() && sin.scalar_type() == qkv.scalar_type() && k_cache.scalar_type() == qkv.scalar_type(), "one dtype");
  auto r = rows.to(at::kLong).contiguous();
  auto p = positions.to(at::kLong).contiguous();
  TORCH_CHECK(r.numel() == qkv.size(0) && p.numel() == qkv.size(0) * qkv.size(1), "rows [b], positions [b, T]");
  auto q = at::empty({qkv.size(0), qkv.size(1), num_heads, qkv.size(3)}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rope_and_cache",
                                  [&] { rope_kernel<scalar_t>(qkv, cos, sin, k_cache, v_cache, r, p, num_heads, q); });
  return q;
}

}  // namespace efficientrollout

TORCH_LIBRARY(efficientrollout, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor positions, int kv_len) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("rope_and_cache(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor rows, Tensor positions, int num_heads) -> Tensor");
}

TORCH_LIBRARY_IMPL(efficientrollout, CPU, m) {
  m.impl("decode_attention", &efficientrollout::decode_attention);
  m.impl("rms_norm", &efficientrollout::rms_norm);
  m.impl("rope_and_cache", &efficientrollout::rope_and_cache);
}
