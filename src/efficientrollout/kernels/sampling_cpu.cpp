// Token draws in one pass per row: the keyed race of sampling.race and the inverse-CDF draw of
// sampling.inverse_cdf. The race in PyTorch ops spends its time dispatching ~50 small ops
// (0.4 ms a call at one row on a Xeon core); the inverse CDF's float64 cumsum over the
// vocabulary is not vectorized by ATen (0.33 ms a row: 21 ms of a 64-row plain step's ~38 ms of
// sampling). Same hash, arrivals and first-arrival rule (the lowest index wins a tie); the same
// CDF rule (the first token whose cumulative mass exceeds u times the total): both pick the
// PyTorch versions' tokens up to the rounding of sums taken in another order. sample_rows fuses
// a whole sampling.sample (no top-k / top-p) into one pass per row: in ATen its argmax,
// division, log-softmax and gathers took ~25 ms for 64 rows of SmolLM2's vocabulary.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace efficientrollout {
namespace {

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x2C1B3C6Du;
  return x ^ (x >> 16);
}

// -log(U) for U = (h + 0.5) / 2^32, h the hash of id under the row's key (sampling.race_uniforms)
inline double exponential(uint32_t id, uint32_t lo, uint32_t hi) {
  return -std::log((static_cast<double>(mix32(mix32(id ^ lo) ^ hi)) + 0.5) * (1.0 / 4294967296.0));
}

// row[start:stop] summed in Acc over `Lanes` running sums, which the compiler keeps in vector
// registers (one running sum would serialize on the adds' latency)
template <typename Acc, int Lanes>
Acc block_sum(const float* row, int64_t start, int64_t stop) {
  Acc lanes[Lanes] = {};
  int64_t i = start;
  for (; i + Lanes <= stop; i += Lanes)
    for (int j = 0; j < Lanes; ++j) lanes[j] += row[i + j];
  Acc s = 0;
  for (int j = 0; j < Lanes; ++j) s += lanes[j];
  for (; i < stop; ++i) s += row[i];
  return s;
}

// The race's pick from row[0..V) (any positive scale: arrivals scale alike)
int64_t race_row(const float* row, int64_t V, uint32_t lo, uint32_t hi, int64_t group) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  const int64_t groups = (V + group - 1) / group;
  int64_t best_group = 0;
  double first = inf;
  for (int64_t g = 0; g < groups; ++g) {  // round 1: groups race with their masses (ids V + g)
    const int64_t start = g * group, stop = std::min(start + group, V);
    const float mass = block_sum<float, 16>(row, start, stop);
    const double t = mass > 0.f ? exponential(static_cast<uint32_t>(V + g), lo, hi) / mass : inf;
    if (t < first) first = t, best_group = g;
  }
  const int64_t start = best_group * group, stop = std::min(start + group, V);
  int64_t token = start;
  first = inf;
  for (int64_t i = start; i < stop; ++i) {  // round 2: the winning group's tokens
    const double t = row[i] > 0.f ? exponential(static_cast<uint32_t>(i), lo, hi) / row[i] : inf;
    if (t < first) first = t, token = i;
  }
  return token;
}

constexpr int64_t kCdfBlock = 64;  // tokens per partial sum of the inverse-CDF draw

// The first token of row[0..V) whose cumulative mass exceeds u * total, given the row's sums per
// kCdfBlock tokens (sums[k]) and their total
int64_t inverse_cdf_row(const float* row, int64_t V, double u, const double* sums, double total) {
  const int64_t blocks = (V + kCdfBlock - 1) / kCdfBlock;
  const double target = u * total;
  double cum = 0.0;
  for (int64_t k = 0; k < blocks; ++k) {
    if (cum + sums[k] <= target && k + 1 < blocks) {
      cum += sums[k];
      continue;
    }
    const int64_t start = k * kCdfBlock, stop = std::min(start + kCdfBlock, V);
    for (int64_t i = start; i < stop; ++i)
      if ((cum += row[i]) > target) return i;
  }
  int64_t token = V - 1;  // u within rounding of 1 (or no finite mass): the last token with mass
  while (token > 0 && !(row[token] > 0.f)) --token;
  return token;
}

}  // namespace

at::Tensor race(const at::Tensor& probs, const at::Tensor& keys, int64_t group) {
  TORCH_CHECK(probs.dim() == 2 && probs.scalar_type() == at::kFloat, "race: probs must be [b, V] fp32");
  TORCH_CHECK(keys.dim() == 2 && keys.size(1) == 2 && keys.scalar_type() == at::kLong && keys.size(0) == probs.size(0),
              "race: keys must be [b, 2] int64");
  TORCH_CHECK(group > 0, "race: group must be positive");
  const at::Tensor p = probs.contiguous(), k = keys.contiguous();
  const int64_t b = p.size(0), V = p.size(1);
  at::Tensor out = at::empty({b}, keys.options());
  const float* pp = p.data_ptr<float>();
  const int64_t* kp = k.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, b, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      op[r] = race_row(pp + r * V, V, static_cast<uint32_t>(kp[2 * r]), static_cast<uint32_t>(kp[2 * r + 1]), group);
  });
  return out;
}

at::Tensor inverse_cdf(const at::Tensor& probs, const at::Tensor& uniforms) {
  TORCH_CHECK(probs.dim() == 2 && probs.scalar_type() == at::kFloat, "inverse_cdf: probs must be [b, V] fp32");
  TORCH_CHECK(uniforms.dim() == 1 && uniforms.size(0) == probs.size(0) && uniforms.scalar_type() == at::kDouble,
              "inverse_cdf: uniforms must be [b] float64");
  const at::Tensor p = probs.contiguous(), u = uniforms.contiguous();
  const int64_t b = p.size(0), V = p.size(1), blocks = (V + kCdfBlock - 1) / kCdfBlock;
  at::Tensor out = at::empty({b}, probs.options().dtype(at::kLong));
  const float* pp = p.data_ptr<float>();
  const double* up = u.data_ptr<double>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, b, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> sums(blocks);
    for (int64_t r = begin; r < end; ++r) {
      const float* row = pp + r * V;
      double total = 0.0;
      for (int64_t k = 0; k < blocks; ++k) {
        sums[k] = block_sum<double, 8>(row, k * kCdfBlock, std::min((k + 1) * kCdfBlock, V));
        total += sums[k];
      }
      op[r] = inverse_cdf_row(row, V, up[r], sums.data(), total);
    }
  });
  return out;
}

// sampling.sample for rows without top-k / top-p, in one pass per row: the argmax, the softmax of
// logits / T (T = 1 for greedy rows, T <= 0) as e^(z - max z) with its block sums, the draw from
// those weights (race with keys, else inverse CDF with uniforms; the same picks as on the
// normalised probabilities up to rounding), and the token's log-prob z - max z - log(sum). As
// in PyTorch, a T so small that logits / T overflow gives a non-finite log-prob.
std::tuple<at::Tensor, at::Tensor> sample_rows(const at::Tensor& logits, const at::Tensor& temperature,
                                               const std::optional<at::Tensor>& uniforms,
                                               const std::optional<at::Tensor>& keys, int64_t group) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat, "sample_rows: logits must be [b, V] fp32");
  const int64_t b = logits.size(0), V = logits.size(1), blocks = (V + kCdfBlock - 1) / kCdfBlock;
  TORCH_CHECK(temperature.dim() == 1 && temperature.size(0) == b && temperature.scalar_type() == at::kFloat,
              "sample_rows: temperature must be [b] fp32");
  TORCH_CHECK(!uniforms || (uniforms->dim() == 1 && uniforms->size(0) == b && uniforms->scalar_type() == at::kDouble),
              "sample_rows: uniforms must be [b] float64");
  TORCH_CHECK(!keys || (keys->dim() == 2 && keys->size(0) == b && keys->size(1) == 2 && keys->scalar_type() == at::kLong),
              "sample_rows: keys must be [b, 2] int64");
  TORCH_CHECK(group > 0, "sample_rows: group must be positive");
  const at::Tensor x = logits.contiguous(), t = temperature.contiguous();
  const at::Tensor u = uniforms ? uniforms->contiguous() : at::Tensor(), k = keys ? keys->contiguous() : at::Tensor();
  at::Tensor tokens = at::empty({b}, logits.options().dtype(at::kLong)), logprobs = at::empty({b}, logits.options());
  const float* xp = x.data_ptr<float>();
  const float* tp = t.data_ptr<float>();
  const double* up = u.defined() ? u.data_ptr<double>() : nullptr;
  const int64_t* kp = k.defined() ? k.data_ptr<int64_t>() : nullptr;
  int64_t* op = tokens.data_ptr<int64_t>();
  float* lp = logprobs.data_ptr<float>();
  for (int64_t r = 0; r < b; ++r)
    TORCH_CHECK(!(tp[r] > 0.f) || up || kp, "sample_rows: sampled rows need uniforms or keys");
  at::parallel_for(0, b, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weights(V);
    std::vector<double> sums(blocks);
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xp + r * V;
      const bool sampled = tp[r] > 0.f;
      const float temp = sampled ? tp[r] : 1.f;
      float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
      for (int64_t j = 0; j < V; ++j) mx = std::max(mx, row[j]);
      int64_t argmax = 0;
      while (argmax < V && !(row[argmax] == mx)) ++argmax;
      argmax = std::min(argmax, V - 1);
      const float zmax = mx / temp;  // max(x / T), as division is monotonic
      double total = 0.0;
      for (int64_t kb = 0; kb < blocks; ++kb) {
        const int64_t start = kb * kCdfBlock, stop = std::min(start + kCdfBlock, V);
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t j = start; j < stop; ++j) {
          const float d = row[j] / temp - zmax;
          const float w = d < -87.f ? 0.f : exp_nonpositive(d);
          weights[j] = w;
          s += w;
        }
        sums[kb] = s;
        total += s;
      }
      int64_t token = argmax;
      if (sampled)
        token = kp ? race_row(weights.data(), V, static_cast<uint32_t>(kp[2 * r]), static_cast<uint32_t>(kp[2 * r + 1]), group)
                   : inverse_cdf_row(weights.data(), V, up[r], sums.data(), total);
      op[r] = token;
      lp[r] = static_cast<float>(static_cast<double>(row[token] / temp - zmax) - std::log(total));
    }
  });
  return {tokens, logprobs};
}

}  // namespace efficientrollout

TORCH_LIBRARY_FRAGMENT(efficientrollout, m) {
  m.def("race(Tensor probs, Tensor keys, int group) -> Tensor");
  m.def("inverse_cdf(Tensor probs, Tensor uniforms) -> Tensor");
  m.def("sample_rows(Tensor logits, Tensor temperature, Tensor? uniforms, Tensor? keys, int group) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(efficientrollout, CPU, m) {
  m.impl("race", &efficientrollout::race);
  m.impl("inverse_cdf", &efficientrollout::inverse_cdf);
  m.impl("sample_rows", &efficientrollout::sample_rows);
}
