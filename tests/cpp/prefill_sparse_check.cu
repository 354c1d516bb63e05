// C++ test of the sparse bfloat16 prefill (one kernel, no JAX) against a float64 CPU reference,
// on small shapes, so that it also runs under compute-sanitizer.
// Contract and tolerances: docs/ops.md (sparse prefill: out abs 8e-4 / rel 3.01/128 / cos 7e-6,
// lse and max_logits abs 1e-6 / rel 2.01/65536; inf/NaN positions must coincide; a query with
// nothing selected gives out exactly 0, max_logits -inf and lse +inf, sink or not).
//
// Inputs: q and the kv rows N(0, 1) / 10 clamped to [-1, 1] in bfloat16. Indices select kv rows
// at random, with -1, s_kv, 2^31 - 1 and -2^31 mixed in, duplicates in some cases, and a tail
// of -1 where s_kv is short of topk (as an indexer pads a short context); one case has no
// valid index at all. topk_length (0, 1, topk, past topk and negative included) where a case
// has it. Every kv row that no counted valid slot selects is NaN (all-ones bits), so a read of
// it shows. out, max_logits and lse are filled with NaN before every launch, so an output the
// kernel forgets to write fails. Buffers are allocated at their exact sizes, so memcheck sees
// any access past them. Each case runs twice and must give the same bits.
//
// Then the backward kernel on the same cases, with dkv summed in float32 and in 64-bit fixed
// point (then bitwise repeatable): d_out ~ N(0, 1) and the cotangent of lse ~ N(0, 1),
// folded with the sink as the ops module does (prefill_sparse_backward.cuh: d_out times the
// sink factor in bfloat16, row_shift = dlse - f * sum(d_out * out) from the float64 forward),
// the forward's lse from the float64 reference; dq and dkv against a float64 reference of the
// same formulas: relative L2 error <= 2^-7 and every element within 2^-5 of the tensor's largest
// magnitude (docs/ops.md, sparse prefill gradient); dq of a lonely query and dkv rows that no
// counted valid slot selects (NaN in kv) exactly 0; dq poisoned with NaN before the launch and
// bitwise repeatable, dkv (atomic float32 sums) within rounding.
//
// Then the parameter checks: sizes, head dims, topk, alignment and scales the kernel cannot
// take give a message from sparse_prefill_params_error and cudaErrorInvalidValue from the
// launch, with nothing written and nothing left in the last-error slot; s_q 0 launches
// nothing and succeeds.
//
// Built by CMake with -DJAX_FLASHMLA_BUILD_TESTS=ON (ctest runs it), on a Hopper GPU:
//   prefill_sparse_check [name-filter]
//   compute-sanitizer --tool memcheck prefill_sparse_check
// Prints one line per case and per parameter check, and "ALL PASS" at the end; exits 1 on any
// failure.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "check_util.h"
#include "kernels/common/mla_geometry.cuh"
#include "kernels/sm90/prefill_sparse/prefill_sparse.cuh"
#include "kernels/sm90/prefill_sparse/prefill_sparse_backward.cuh"

namespace {

constexpr int kDv = jfm::kHeadDimV;
constexpr uint16_t kNaN16 = 0xFFFF;  // NaN as bfloat16

// docs/ops.md, sparse prefill.
constexpr double kOutAbs = 8e-4, kOutRel = 3.01 / 128, kOutCos = 7e-6;
constexpr double kLseAbs = 1e-6, kLseRel = 2.01 / 65536;

struct Case {
  std::string name;
  int d_qk, s_q, h_q, s_kv, topk;
  bool lengths = false;     // per-token counted slots given
  bool sink = false;
  bool duplicates = false;  // some slots repeat the one before
  bool lonely = false;      // no valid index anywhere: every query is lonely
  float scale_mul = 1.f;    // softmax_scale = scale_mul / sqrt(d_qk)
};

std::vector<Case> all_cases() {
  return {
      {"d576-sq1-h64-topk64-skv4096", 576, 1, 64, 4096, 64},
      // s_kv < topk: random tokens repeat, and a -1 tail.
      {"d576-sq4-h128-topk128-skv100", 576, 4, 128, 100, 128},
      {"d576-sq40-h16-topk576-skv2000-lengths-sink", 576, 40, 16, 2000, 576, true, true},
      {"d576-sq3-h128-topk2048-skv3000-sink-dup", 576, 3, 128, 3000, 2048, false, true, true},
      {"d576-sq6-h1-topk64-skv300-negscale", 576, 6, 1, 300, 64, false, false, false, false, -4.f},
      {"d576-sq8-h64-topk128-skv64-lonely-sink", 576, 8, 64, 64, 128, true, true, false, true},
      {"d512-sq8-h8-topk128-skv500-dup", 512, 8, 8, 500, 128, false, false, true},
      {"d512-sq9-h48-topk576-skv1500-lengths", 512, 9, 48, 1500, 576, true},
      {"d512-sq2-h96-topk2048-skv2500-lengths-sink", 512, 2, 96, 2500, 2048, true, true},
      // Backward: two full head tiles paired in a cluster, slots repeating their neighbours and
      // s_kv < topk, so a pair adds to one dkv row several times per block.
      {"d512-sq5-h128-topk256-skv150-dup", 512, 5, 128, 150, 256, false, false, true},
      // softmax_scale ~11, logits with sd ~2.6: the running max moves, rescaling matters.
      {"d512-sq4-h64-topk128-skv700-bigscale-sink", 512, 4, 64, 700, 128, false, true, false,
       false, 256.f},
      {"d512-sq33-h16-topk64-skv20-lengths", 512, 33, 16, 20, 64, true},
      // No kv at all (a null pointer): every query is lonely.
      {"d512-sq3-h16-topk64-skv0-lonely", 512, 3, 16, 0, 64, false, false, false, true},
      {"d576-sq2-h16-topk64-skv200-zeroscale", 576, 2, 16, 200, 64, false, false, false, false,
       0.f},
      // More work items than SMs: the forward's persistent CTAs take several each, some with
      // no block at all (length 0), the stage ring running on across them.
      {"d512-sq300-h64-topk128-skv1000-lengths", 512, 300, 64, 1000, 128, true},
  };
}

struct Inputs {
  std::vector<uint16_t> q_bits;   // [s_q, h_q, d_qk]
  std::vector<uint16_t> kv_bits;  // [s_kv, d_qk]
  std::vector<int32_t> indices;   // [s_q, topk]
  std::vector<int32_t> lengths;   // [s_q] or empty
  std::vector<int> counted;       // [s_q]: clamp(lengths, 0, topk) or topk
  std::vector<float> sink;        // [h_q] or empty
  float softmax_scale;
};

Inputs make_inputs(const Case& c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> gauss(0.f, 0.1f);
  Inputs in;
  for (int t = 0; t < c.s_q; ++t) {
    int count = c.topk;
    if (c.lengths) {
      // Partial blocks, 0, one key, all, past topk and negative, by token.
      const int choices[8] = {c.topk / 2 + 3, 0, c.topk + 70, 1, c.topk, -5, c.topk - 1, INT_MIN};
      in.lengths.push_back(choices[t % 8]);
      count = std::clamp(in.lengths.back(), 0, c.topk);
    }
    in.counted.push_back(count);
  }
  std::uniform_int_distribution<int32_t> token(0, std::max(c.s_kv - 1, 0));
  std::uniform_int_distribution<int> kind(0, 19);
  const int32_t bad[4] = {-1, c.s_kv, INT_MAX, INT_MIN};
  in.indices.resize(size_t(c.s_q) * c.topk);
  std::vector<char> used(c.s_kv, 0);
  for (int t = 0; t < c.s_q; ++t) {
    int32_t* slots = &in.indices[size_t(t) * c.topk];
    const int64_t context = int64_t{c.s_kv} - t;  // slots past it are padding
    for (int k = 0; k < c.topk; ++k) {
      const int r = kind(rng);
      slots[k] = r < 2 ? bad[r + (k % 2) * 2] : token(rng);
      if (c.duplicates && k > 0 && r == 19) slots[k] = slots[k - 1];
      if (k >= context) slots[k] = -1;
      if (c.lonely) slots[k] = bad[k % 4];
      if (k < in.counted[t] && slots[k] >= 0 && slots[k] < c.s_kv) used[slots[k]] = 1;
    }
  }
  in.kv_bits.assign(size_t(c.s_kv) * c.d_qk, kNaN16);
  for (int64_t row = 0; row < c.s_kv; ++row) {
    if (!used[row]) continue;
    uint16_t* dst = &in.kv_bits[size_t(row) * c.d_qk];
    for (int d = 0; d < c.d_qk; ++d) dst[d] = float_to_bf16(std::clamp(gauss(rng), -1.f, 1.f));
  }
  in.q_bits.resize(size_t(c.s_q) * c.h_q * c.d_qk);
  for (uint16_t& x : in.q_bits) x = float_to_bf16(std::clamp(gauss(rng), -1.f, 1.f));
  if (c.sink) {
    // +inf, -inf, and finite values near a typical lse, where the factor is far from 0 and 1.
    std::normal_distribution<float> near(std::log(float(c.topk)), 1.f);
    for (int h = 0; h < c.h_q; ++h) {
      in.sink.push_back(h % 3 == 0 ? INFINITY : h % 3 == 1 ? -INFINITY : near(rng));
    }
  }
  in.softmax_scale = c.scale_mul / std::sqrt(float(c.d_qk));
  return in;
}

struct Reference {
  std::vector<double> out;              // [s_q, h_q, 512]
  std::vector<double> max_logits, lse;  // [s_q, h_q]
  std::vector<char> lonely;             // [s_q]: nothing selected
};

// float64 reference of the rules in prefill_sparse.cuh.
Reference reference(const Case& c, const Inputs& in) {
  Reference ref;
  const size_t rows = size_t(c.s_q) * c.h_q;
  ref.out.assign(rows * kDv, 0.0);
  ref.max_logits.assign(rows, -INFINITY);
  ref.lse.assign(rows, INFINITY);
  ref.lonely.assign(c.s_q, 0);
  std::vector<double> keys, q(c.d_qk), scores;
  for (int t = 0; t < c.s_q; ++t) {
    keys.clear();
    const int32_t* slots = &in.indices[size_t(t) * c.topk];
    for (int k = 0; k < in.counted[t]; ++k) {
      if (slots[k] < 0 || slots[k] >= c.s_kv) continue;
      const uint16_t* row = &in.kv_bits[size_t(slots[k]) * c.d_qk];
      for (int d = 0; d < c.d_qk; ++d) keys.push_back(bf16_to_float(row[d]));
    }
    const size_t n = keys.size() / c.d_qk;
    ref.lonely[t] = n == 0;
    if (n == 0) continue;  // out 0, max_logits -inf, lse +inf
    scores.resize(n);
    for (int h = 0; h < c.h_q; ++h) {
      const size_t r = size_t(t) * c.h_q + h;
      for (int d = 0; d < c.d_qk; ++d) q[d] = bf16_to_float(in.q_bits[r * c.d_qk + d]);
      double max_score = -INFINITY;
      for (size_t k = 0; k < n; ++k) {
        const double* key = &keys[k * c.d_qk];
        double dot = 0;
        for (int d = 0; d < c.d_qk; ++d) dot += q[d] * key[d];
        scores[k] = dot * in.softmax_scale;
        max_score = std::max(max_score, scores[k]);
      }
      double sum = 0;
      for (double& x : scores) sum += (x = std::exp(x - max_score));
      const double row_lse = max_score + std::log(sum);
      double factor = 1.0 / sum;
      if (!in.sink.empty()) factor /= 1.0 + std::exp(double(in.sink[h]) - row_lse);
      double* o = &ref.out[r * kDv];
      for (size_t k = 0; k < n; ++k) {
        const double w = scores[k] * factor;
        const double* v = &keys[k * c.d_qk];  // V: the first 512 dims
        for (int d = 0; d < kDv; ++d) o[d] += w * v[d];
      }
      ref.max_logits[r] = max_score;
      ref.lse[r] = row_lse;
    }
  }
  return ref;
}

struct Result {
  std::vector<uint16_t> out;
  std::vector<float> max_logits, lse;
};

// What the forward's and the backward's params share: the case's inputs on the device (in
// `buffers`) and its sizes.
template <typename Params>
void set_inputs_and_sizes(Params& p, const Case& c, const Inputs& in, DeviceBuffers& buffers) {
  p.q = buffers.copy(in.q_bits);
  p.kv = buffers.copy(in.kv_bits);
  p.indices = buffers.copy(in.indices);
  p.topk_length = buffers.copy(in.lengths);
  p.s_q = c.s_q;
  p.s_kv = c.s_kv;
  p.h_q = c.h_q;
  p.d_qk = c.d_qk;
  p.topk = c.topk;
  p.softmax_scale = in.softmax_scale;
}

// One launch on fresh buffers, outputs poisoned first.
Result run(const Case& c, const Inputs& in) {
  const int64_t rows = int64_t{c.s_q} * c.h_q;
  DeviceBuffers buffers;
  jfm::SparsePrefillParams p;
  set_inputs_and_sizes(p, c, in, buffers);
  p.attn_sink = buffers.copy(in.sink);
  p.out = buffers.poisoned(rows * kDv * 2);
  p.max_logits = static_cast<float*>(buffers.poisoned(rows * 4));
  p.lse = static_cast<float*>(buffers.poisoned(rows * 4));
  if (const char* error = jfm::sparse_prefill_params_error(p)) {
    std::fprintf(stderr, "%s: params: %s\n", c.name.c_str(), error);
    std::exit(1);
  }
  CHECK(jfm::launch_sparse_prefill(p, nullptr));
  CHECK(cudaDeviceSynchronize());
  Result r;
  r.out.resize(rows * kDv);
  r.max_logits.resize(rows);
  r.lse.resize(rows);
  CHECK(cudaMemcpy(r.out.data(), p.out, rows * kDv * 2, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(r.max_logits.data(), p.max_logits, rows * 4, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(r.lse.data(), p.lse, rows * 4, cudaMemcpyDeviceToHost));
  return r;
}

bool check(const Case& c, const Reference& ref, const Result& got, const Result& again) {
  long bad_out = 0, bad_max = 0, bad_lse = 0, nan_out = 0, lonely_nonzero = 0;
  double max_err = 0, dot = 0, norms = 0;
  for (size_t k = 0; k < ref.out.size(); ++k) {
    const double a = bf16_to_float(got.out[k]);
    nan_out += std::isnan(a);
    if (!close_to(a, ref.out[k], kOutAbs, kOutRel)) ++bad_out;
    // A lonely row is exactly 0, not merely within tolerance of it.
    if (ref.lonely[k / (size_t(c.h_q) * kDv)] && a != 0) ++lonely_nonzero;
    if (std::isfinite(a)) {
      max_err = std::max(max_err, std::fabs(a - ref.out[k]));
      dot += a * ref.out[k];
      norms += a * a + ref.out[k] * ref.out[k];
    }
  }
  for (size_t k = 0; k < ref.lse.size(); ++k) {
    bad_max += !close_to(got.max_logits[k], ref.max_logits[k], kLseAbs, kLseRel);
    bad_lse += !close_to(got.lse[k], ref.lse[k], kLseAbs, kLseRel);
  }
  const double cos = norms > 0 ? 1 - 2 * dot / norms : 0;
  const size_t rows = got.lse.size();
  const bool same =
      got.out == again.out &&
      std::memcmp(got.max_logits.data(), again.max_logits.data(), rows * 4) == 0 &&
      std::memcmp(got.lse.data(), again.lse.data(), rows * 4) == 0;
  const bool ok = bad_out == 0 && bad_max == 0 && bad_lse == 0 && nan_out == 0 &&
                  lonely_nonzero == 0 && cos <= kOutCos && same;
  std::printf("%s %s: out max|err| %.3g (%ld bad) cos %.1e, max_logits %ld bad, lse %ld bad, "
              "NaN out %ld, lonely nonzero %ld, repeat %s\n",
              ok ? "PASS" : "FAIL", c.name.c_str(), max_err, bad_out, cos, bad_max, bad_lse,
              nan_out, lonely_nonzero, same ? "bitwise equal" : "DIFFERS");
  return ok;
}

// ---- Backward ------------------------------------------------------------------------------

constexpr double kGradRelL2 = 1.0 / 128, kGradOfPeak = 1.0 / 32;

struct BackwardInputs {
  std::vector<uint16_t> d_out_bits;  // [s_q, h_q, 512]: f * d_out in bfloat16
  std::vector<float> lse, row_shift;  // [s_q, h_q]
};

BackwardInputs make_backward_inputs(const Case& c, const Inputs& in, const Reference& ref,
                                    uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> gauss(0.0, 1.0);
  BackwardInputs b;
  const size_t rows = size_t(c.s_q) * c.h_q;
  b.d_out_bits.resize(rows * kDv);
  b.lse.resize(rows);
  b.row_shift.resize(rows);
  for (size_t r = 0; r < rows; ++r) {
    const int h = static_cast<int>(r % c.h_q);
    const double lse = ref.lse[r];
    const bool lonely = std::isinf(lse);
    double f = 1.0;
    if (!in.sink.empty() && !lonely) f = 1.0 / (1.0 + std::exp(double(in.sink[h]) - lse));
    double d_rows = 0;
    for (int d = 0; d < kDv; ++d) {
      const double g = gauss(rng);
      d_rows += g * ref.out[r * kDv + d];
      b.d_out_bits[r * kDv + d] = float_to_bf16(static_cast<float>(f * g));
    }
    b.lse[r] = static_cast<float>(lse);
    b.row_shift[r] = lonely ? 0.f : static_cast<float>(gauss(rng) - f * d_rows);
  }
  return b;
}

struct Gradients {
  std::vector<double> dq, dkv;  // [s_q, h_q, d_qk], [s_kv, d_qk]
  double largest_abs_sum = 0;   // of a dkv element's addends: bounds the fixed-point sums
};

// float64 reference of prefill_sparse_backward.cuh's formulas.
Gradients backward_reference(const Case& c, const Inputs& in, const BackwardInputs& b) {
  Gradients g;
  g.dq.assign(size_t(c.s_q) * c.h_q * c.d_qk, 0.0);
  g.dkv.assign(size_t(c.s_kv) * c.d_qk, 0.0);
  std::vector<double> q(c.d_qk), d_out(kDv), abs_sum(g.dkv.size(), 0.0);
  for (int t = 0; t < c.s_q; ++t) {
    const int32_t* slots = &in.indices[size_t(t) * c.topk];
    for (int h = 0; h < c.h_q; ++h) {
      const size_t r = size_t(t) * c.h_q + h;
      if (std::isinf(b.lse[r])) continue;
      for (int d = 0; d < c.d_qk; ++d) q[d] = bf16_to_float(in.q_bits[r * c.d_qk + d]);
      for (int d = 0; d < kDv; ++d) d_out[d] = bf16_to_float(b.d_out_bits[r * kDv + d]);
      for (int k = 0; k < in.counted[t]; ++k) {
        if (slots[k] < 0 || slots[k] >= c.s_kv) continue;
        const uint16_t* row = &in.kv_bits[size_t(slots[k]) * c.d_qk];
        double dot = 0, d_prob = 0;
        for (int d = 0; d < c.d_qk; ++d) dot += q[d] * bf16_to_float(row[d]);
        for (int d = 0; d < kDv; ++d) d_prob += d_out[d] * bf16_to_float(row[d]);
        const double prob = std::exp(dot * in.softmax_scale - double(b.lse[r]));
        const double d_score = in.softmax_scale * prob * (d_prob + b.row_shift[r]);
        double* dq = &g.dq[r * c.d_qk];
        double* dkv = &g.dkv[size_t(slots[k]) * c.d_qk];
        double* sums = &abs_sum[size_t(slots[k]) * c.d_qk];
        for (int d = 0; d < c.d_qk; ++d) {
          dq[d] += d_score * bf16_to_float(row[d]);
          const double addend = d_score * q[d] + (d < kDv ? prob * d_out[d] : 0.0);
          dkv[d] += addend;
          sums[d] += std::fabs(addend);
        }
      }
    }
  }
  for (double x : abs_sum) g.largest_abs_sum = std::max(g.largest_abs_sum, x);
  return g;
}

struct BackwardResult {
  std::vector<uint16_t> dq;
  std::vector<float> dkv;
};

// One backward launch on fresh buffers, dq and dkv poisoned first; dkv summed in 64-bit fixed
// point scaled by `fixed_scale` where that is not 0.
BackwardResult run_backward(const Case& c, const Inputs& in, const BackwardInputs& b,
                            float fixed_scale = 0.f) {
  const int64_t rows = int64_t{c.s_q} * c.h_q;
  DeviceBuffers buffers;
  jfm::SparsePrefillBackwardParams p;
  set_inputs_and_sizes(p, c, in, buffers);
  p.d_out = buffers.copy(b.d_out_bits);
  p.lse = buffers.copy(b.lse);
  p.row_shift = buffers.copy(b.row_shift);
  p.dq = buffers.poisoned(rows * c.d_qk * 2);
  p.dkv = static_cast<float*>(buffers.poisoned(size_t(c.s_kv) * c.d_qk * 4));
  if (fixed_scale != 0.f) {
    p.dkv_fixed = static_cast<int64_t*>(buffers.poisoned(size_t(c.s_kv) * c.d_qk * 8));
    p.fixed_scale = buffers.copy(std::vector<float>{fixed_scale});
  }
  if (const char* error = jfm::sparse_prefill_backward_params_error(p)) {
    std::fprintf(stderr, "%s: backward params: %s\n", c.name.c_str(), error);
    std::exit(1);
  }
  CHECK(jfm::launch_sparse_prefill_backward(p, nullptr));
  CHECK(cudaDeviceSynchronize());
  BackwardResult result;
  result.dq.resize(rows * c.d_qk);
  result.dkv.resize(size_t(c.s_kv) * c.d_qk);
  CHECK(cudaMemcpy(result.dq.data(), p.dq, result.dq.size() * 2, cudaMemcpyDeviceToHost));
  if (!result.dkv.empty()) {
    CHECK(cudaMemcpy(result.dkv.data(), p.dkv, result.dkv.size() * 4, cudaMemcpyDeviceToHost));
  }
  return result;
}

// Relative L2 error and largest error over the largest reference magnitude; counts non-finite
// values.
struct GradientError {
  double rel_l2 = 0, of_peak = 0;
  long non_finite = 0;
  bool ok() const { return non_finite == 0 && rel_l2 <= kGradRelL2 && of_peak <= kGradOfPeak; }
};

template <typename Get>
GradientError gradient_error(const std::vector<double>& want, Get got) {
  GradientError e;
  double diff2 = 0, norm2 = 0, peak = 0, worst = 0;
  for (size_t k = 0; k < want.size(); ++k) {
    const double a = got(k);
    if (!std::isfinite(a)) {
      ++e.non_finite;
      continue;
    }
    diff2 += (a - want[k]) * (a - want[k]);
    norm2 += want[k] * want[k];
    peak = std::max(peak, std::fabs(want[k]));
    worst = std::max(worst, std::fabs(a - want[k]));
  }
  e.rel_l2 = norm2 > 0 ? std::sqrt(diff2 / norm2) : std::sqrt(diff2);
  e.of_peak = peak > 0 ? worst / peak : worst;
  return e;
}

// `fixed`: dkv summed in fixed point, so `again` must match it bit for bit.
bool check_backward(const Case& c, const Inputs& in, const Gradients& want,
                    const BackwardResult& got, const BackwardResult& again, bool fixed) {
  const GradientError dq =
      gradient_error(want.dq, [&](size_t k) { return double(bf16_to_float(got.dq[k])); });
  const GradientError dkv = gradient_error(want.dkv, [&](size_t k) { return double(got.dkv[k]); });
  // Exact zeros: dq of lonely queries, dkv of rows nothing selects.
  long stray = 0;
  for (int t = 0; t < c.s_q; ++t) {
    bool lonely = true;
    const int32_t* slots = &in.indices[size_t(t) * c.topk];
    for (int k = 0; k < in.counted[t]; ++k) lonely &= slots[k] < 0 || slots[k] >= c.s_kv;
    if (!lonely) continue;
    for (size_t k = 0; k < size_t(c.h_q) * c.d_qk; ++k) {
      stray += bf16_to_float(got.dq[size_t(t) * c.h_q * c.d_qk + k]) != 0.f;
    }
  }
  std::vector<char> used(c.s_kv, 0);
  for (int t = 0; t < c.s_q; ++t) {
    const int32_t* slots = &in.indices[size_t(t) * c.topk];
    for (int k = 0; k < in.counted[t]; ++k) {
      if (slots[k] >= 0 && slots[k] < c.s_kv) used[slots[k]] = 1;
    }
  }
  for (size_t k = 0; k < got.dkv.size(); ++k) stray += !used[k / c.d_qk] && got.dkv[k] != 0.f;
  const bool same_dq = got.dq == again.dq;
  const GradientError dkv_again =
      gradient_error(std::vector<double>(got.dkv.begin(), got.dkv.end()),
                     [&](size_t k) { return double(again.dkv[k]); });
  const bool dkv_close = fixed ? got.dkv == again.dkv : dkv_again.rel_l2 <= 1e-6;
  const bool ok = dq.ok() && dkv.ok() && stray == 0 && same_dq && dkv_close;
  std::printf("%s backward%s %s: dq rel L2 %.2e, max %.2e of peak, dkv rel L2 %.2e, max %.2e of "
              "peak, non-finite %ld, stray nonzero %ld, dq repeat %s, dkv repeat rel %.1e\n",
              ok ? "PASS" : "FAIL", fixed ? " (fixed point)" : "", c.name.c_str(), dq.rel_l2,
              dq.of_peak, dkv.rel_l2,
              dkv.of_peak, dq.non_finite + dkv.non_finite, stray,
              same_dq ? "bitwise equal" : "DIFFERS", dkv_again.rel_l2);
  return ok;
}

// A parameter check: what it changes in valid parameters, and whether the result must still
// be accepted (launching nothing).
struct ParamsCase {
  std::string name;
  void (*change)(jfm::SparsePrefillParams&);
  bool accepted;
};

std::vector<ParamsCase> params_cases() {
  using P = jfm::SparsePrefillParams;
  return {
      {"params-d_qk-600", [](P& p) { p.d_qk = 600; }, false},
      {"params-topk-100", [](P& p) { p.topk = 100; }, false},
      {"params-topk-0", [](P& p) { p.topk = 0; }, false},
      {"params-h_q-0", [](P& p) { p.h_q = 0; }, false},
      {"params-s_q-negative", [](P& p) { p.s_q = -1; }, false},
      {"params-q-misaligned", [](P& p) { p.q = static_cast<const char*>(p.q) + 2; }, false},
      {"params-scale-inf", [](P& p) { p.softmax_scale = INFINITY; }, false},
      {"params-scale-nan", [](P& p) { p.softmax_scale = std::nanf(""); }, false},
      // 3 * 2^30 (token, head tile) CTAs: past the grid's x dimension.
      {"params-grid-x", [](P& p) { p.s_q = int64_t{1} << 30; p.h_q = 192; }, false},
      {"params-s_q-0", [](P& p) { p.s_q = 0; }, true},
  };
}

bool all_bytes(const std::vector<uint8_t>& bytes, uint8_t value) {
  return std::all_of(bytes.begin(), bytes.end(), [&](uint8_t b) { return b == value; });
}

// Each change of valid parameters (s_q 2, h_q 64, s_kv 64, d_qk 576, topk 64, every slot
// valid): rejected ones give a message and cudaErrorInvalidValue, s_q 0 gives neither; in both
// the poisoned outputs stay as they were and the last-error slot stays clear.
bool check_params(const std::string& filter, int& runs) {
  constexpr int kSq = 2, kHq = 64, kSkv = 64, kDqk = 576, kTopk = 64;
  const size_t rows = kSq * kHq;
  std::vector<uint16_t> q_bits(rows * kDqk, float_to_bf16(0.01f));
  std::vector<uint16_t> kv_bits(size_t(kSkv) * kDqk, float_to_bf16(0.02f));
  std::vector<int32_t> indices(kSq * kTopk);
  for (size_t k = 0; k < indices.size(); ++k) indices[k] = static_cast<int32_t>(k % kSkv);
  jfm::SparsePrefillParams base;
  base.q = to_device(q_bits);
  base.kv = to_device(kv_bits);
  base.indices = to_device(indices);
  void* out = nullptr;
  float *max_logits = nullptr, *lse = nullptr;
  CHECK(cudaMalloc(&out, rows * kDv * 2));
  CHECK(cudaMalloc(&max_logits, rows * 4));
  CHECK(cudaMalloc(&lse, rows * 4));
  base.out = out;
  base.max_logits = max_logits;
  base.lse = lse;
  base.s_q = kSq;
  base.s_kv = kSkv;
  base.h_q = kHq;
  base.d_qk = kDqk;
  base.topk = kTopk;
  base.softmax_scale = 1.f / std::sqrt(float(kDqk));
  bool all_ok = true;
  // The changes below must be what makes the kernel refuse.
  if (const char* error = jfm::sparse_prefill_params_error(base)) {
    std::printf("FAIL params-base: valid parameters rejected: %s\n", error);
    all_ok = false;
  }
  for (const ParamsCase& pc : params_cases()) {
    if (!filter.empty() && pc.name.find(filter) == std::string::npos) continue;
    jfm::SparsePrefillParams p = base;
    pc.change(p);
    CHECK(cudaMemset(out, 0xFF, rows * kDv * 2));
    CHECK(cudaMemset(max_logits, 0xFF, rows * 4));
    CHECK(cudaMemset(lse, 0xFF, rows * 4));
    CHECK(cudaDeviceSynchronize());
    (void)cudaGetLastError();  // clear, so that what is there afterwards is the launcher's
    const char* error = jfm::sparse_prefill_params_error(p);
    const cudaError_t launched = jfm::launch_sparse_prefill(p, nullptr);
    CHECK(cudaDeviceSynchronize());
    const cudaError_t last = cudaPeekAtLastError();
    std::vector<uint8_t> out_bytes(rows * kDv * 2), max_bytes(rows * 4), lse_bytes(rows * 4);
    CHECK(cudaMemcpy(out_bytes.data(), out, out_bytes.size(), cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(max_bytes.data(), max_logits, max_bytes.size(), cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(lse_bytes.data(), lse, lse_bytes.size(), cudaMemcpyDeviceToHost));
    const bool untouched =
        all_bytes(out_bytes, 0xFF) && all_bytes(max_bytes, 0xFF) && all_bytes(lse_bytes, 0xFF);
    const bool verdict_ok = pc.accepted ? error == nullptr && launched == cudaSuccess
                                        : error != nullptr && launched == cudaErrorInvalidValue;
    const bool ok = verdict_ok && untouched && last == cudaSuccess;
    std::printf("%s %s: %s (%s), launch %s, outputs %s, last error %s\n", ok ? "PASS" : "FAIL",
                pc.name.c_str(), error == nullptr ? "accepted" : "rejected",
                error == nullptr ? "no message" : error, cudaGetErrorName(launched),
                untouched ? "untouched" : "WRITTEN", cudaGetErrorName(last));
    all_ok &= ok;
    ++runs;
  }
  for (const void* ptr : {base.q, base.kv, static_cast<const void*>(base.indices),
                          static_cast<const void*>(out), static_cast<const void*>(max_logits),
                          static_cast<const void*>(lse)}) {
    CHECK(cudaFree(const_cast<void*>(ptr)));
  }
  return all_ok;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string filter = argc > 1 ? argv[1] : "";
  bool all_ok = true;
  int runs = 0;
  const std::vector<Case> cases = all_cases();
  for (size_t ci = 0; ci < cases.size(); ++ci) {
    const Case& c = cases[ci];
    if (!filter.empty() && c.name.find(filter) == std::string::npos) continue;
    // Seeded by position, so that a filtered run sees the same data as the full one.
    const Inputs in = make_inputs(c, 1 + static_cast<uint32_t>(ci));
    const Reference ref = reference(c, in);
    const Result got = run(c, in);
    const Result again = run(c, in);
    all_ok &= check(c, ref, got, again);
    const BackwardInputs b = make_backward_inputs(c, in, ref, 101 + static_cast<uint32_t>(ci));
    const Gradients want = backward_reference(c, in, b);
    const BackwardResult grads = run_backward(c, in, b);
    const BackwardResult grads_again = run_backward(c, in, b);
    all_ok &= check_backward(c, in, want, grads, grads_again, false);
    // The fixed-point sums: a power of two that keeps every sum within +-2^61 (as the ops
    // module's bound does, from the exact sums of absolute addends here).
    const double exponent = std::floor(61.0 - std::log2(2 * want.largest_abs_sum));
    const float fixed_scale =
        want.largest_abs_sum > 0 ? static_cast<float>(std::exp2(std::min(126.0, exponent))) : 1.f;
    const BackwardResult fixed = run_backward(c, in, b, fixed_scale);
    const BackwardResult fixed_again = run_backward(c, in, b, fixed_scale);
    all_ok &= check_backward(c, in, want, fixed, fixed_again, true);
    std::fflush(stdout);
    runs += 3;
  }
  all_ok &= check_params(filter, runs);
  if (runs == 0) {
    std::printf("no case matches \"%s\"\n", filter.c_str());
    return 1;
  }
  std::printf(all_ok ? "ALL PASS (%d runs)\n" : "SOME FAILED (%d runs)\n", runs);
  return all_ok ? 0 : 1;
}
