// C++ test of the sparse FP8 decode (scheduler + decode kernel + combine, no JAX) against a
// float64 CPU reference, on small shapes, so that it also runs under compute-sanitizer.
// Contract and tolerances: docs/ops.md (sparse decode: out abs 1e-3 / rel 2.01/128 / cos 5e-6,
// lse abs 1e-6 / rel 8.01/65536; inf/NaN positions must coincide; a query with nothing
// selected gives out 0 and lse +inf).
//
// Inputs: FP8 caches in the three layouts written byte by byte: e4m3 values with exponent
// fields 0-9 (zero and subnormals included) and power-of-two scales (V32: float32; MODEL1:
// e8m0), so that the dequantised value, e4m3 * scale, is exact in float64 and in bfloat16; RoPE
// values N(0, 1) / 10 in bfloat16; q likewise. E4M3 has every dim an e4m3 value and one scale
// for the case, not a power of two (the kernel applies it in float32, exactly). Indices select
// tokens of the cache at random, with -1, num_blocks * page, 2^31 - 1 and -2^31 mixed in,
// duplicates in some cases, runs of 16 consecutive tokens in others; topk_length and
// extra_topk_length (clamped, 0 and past topk included) where a case has them. Every byte of
// every token that no counted valid slot selects is 0xFF (NaN as e4m3, as a float32 scale
// and as bfloat16 RoPE). out, lse and the partial buffers are filled with NaN before every
// launch, so an output the kernel forgets to write fails. Buffers are allocated at their exact
// sizes, so memcheck sees any access past them. Each case also runs twice and must give the
// same bits.
//
// Every case runs with num_parts as the JAX op computes it (max(SMs / (s_q * ceil(h_q / 64)),
// 1)), with 1 (nothing split), 5 (odd splits) and 132, and with the schedule the op makes
// (from the lengths) or get_mla_metadata's (fixed at topk + extra_topk).
//
// Built by CMake with -DJAX_FLASHMLA_BUILD_TESTS=ON (ctest runs it), on a Hopper GPU:
//   decode_sparse_check [name-filter]
//   compute-sanitizer --tool memcheck decode_sparse_check
// Prints one line per (case, num_parts) and "ALL PASS" at the end; exits 1 on any failure.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
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
#include "kernels/common/scheduler.cuh"
#include "kernels/sm90/decode_sparse/decode_sparse.cuh"

namespace {

using jfm::Fp8Layout;

constexpr int kDv = jfm::kHeadDimV;
constexpr int kBlockSlots = 64;

// docs/ops.md, sparse decode.
constexpr double kOutAbs = 1e-3, kOutRel = 2.01 / 128, kOutCos = 5e-6;
constexpr double kLseAbs = 1e-6, kLseRel = 8.01 / 65536;

struct Source {  // one cache and its slots
  int page, topk;
  int num_blocks;
  bool lengths;  // per-request counted slots given
};

struct Case {
  std::string name;
  Fp8Layout layout;
  int b, s_q, h_q;
  Source main;
  Source extra;  // extra.topk == 0: none
  bool sink = false;
  bool duplicates = false;
  float scale_mul = 1.f;  // softmax_scale = scale_mul / sqrt(d_qk)
  bool runs = false;      // slots in runs of 16 consecutive tokens, as a dense page gives
};

// The scale of the E4M3 caches of every case (not a power of two).
constexpr float kE4m3Scale = 0.0371f;

std::vector<Case> all_cases() {
  const Fp8Layout v32 = Fp8Layout::kV32, model1 = Fp8Layout::kModel1, e4m3 = Fp8Layout::kE4M3;
  const Source none{1, 0, 0, false};
  return {
      {"v32-b2-sq1-h64-topk64-page64", v32, 2, 1, 64, {64, 64, 6, false}, none},
      {"v32-b3-sq2-h128-topk128-page61-sink", v32, 3, 2, 128, {61, 128, 9, false}, none, true},
      {"v32-b4-sq1-h16-topk576-page2-lengths", v32, 4, 1, 16, {2, 576, 900, true}, none, true},
      {"v32-b2-sq4-h1-topk128-page1-dup", v32, 2, 4, 1, {1, 128, 300, false}, none, false, true},
      {"v32-b2-sq2-h96-topk256-page69-scale4", v32, 2, 2, 96, {69, 256, 10, true}, none, true,
       false, 4.f},
      {"v32-b3-sq1-h32-topk64-page64-negscale", v32, 3, 1, 32, {64, 64, 4, false}, none, false,
       false, -2.f},
      {"model1-b2-sq1-h64-topk64-page64", model1, 2, 1, 64, {64, 64, 6, false}, none},
      {"model1-b3-sq2-h128-topk128-page61-extra", model1, 3, 2, 128, {61, 128, 9, true},
       {5, 64, 7, true}, true},
      {"model1-b4-sq3-h8-topk576-page53-extra", model1, 4, 3, 8, {53, 576, 60, false},
       {2, 128, 100, false}, true},
      {"model1-b2-sq1-h48-topk128-page1-lengths", model1, 2, 1, 48, {1, 128, 400, true}, none,
       false, true},
      {"model1-b2-sq2-h128-topk192-page576", model1, 2, 2, 128, {576, 192, 2, false},
       {69, 64, 3, true}},
      // CTA pairs (h_q > 64) with requests of 0 to 3 blocks, and a second tile of 8 heads.
      {"v32-b4-sq2-h128-topk192-page16-lengths", v32, 4, 2, 128, {16, 192, 60, true}, none, true},
      {"model1-b3-sq1-h72-topk256-page64", model1, 3, 1, 72, {64, 256, 12, false}, none},
      {"e4m3-b3-sq2-h128-topk128-page61-sink", e4m3, 3, 2, 128, {61, 128, 9, false}, none, true},
      {"e4m3-b4-sq1-h16-topk576-page2-lengths", e4m3, 4, 1, 16, {2, 576, 900, true}, none, true},
      {"e4m3-b2-sq3-h64-topk192-page1-extra-dup", e4m3, 2, 3, 64, {1, 192, 500, false},
       {16, 64, 9, true}, false, true},
      // Tiles of 24 and 8 heads (the narrow kernel's) with an extra cache, lengths, invalid
      // indices and duplicates.
      {"v32-b5-sq2-h24-topk192-page16-extra-lengths", v32, 5, 2, 24, {16, 192, 80, true},
       {3, 64, 20, true}, true},
      {"e4m3-b3-sq1-h8-topk128-page53-extra-dup", e4m3, 3, 1, 8, {53, 128, 12, false},
       {1, 64, 150, true}, false, true},
      // Runs of consecutive tokens (one bulk copy per run in the narrow kernel's V32 fetch).
      {"v32-b3-sq2-h16-topk256-page64-lengths-runs", v32, 3, 2, 16, {64, 256, 20, true}, none,
       true, false, 1.f, true},
      {"e4m3-b2-sq1-h32-topk128-page16-runs", e4m3, 2, 1, 32, {16, 128, 40, false}, none, false,
       false, 1.f, true},
      // The narrow kernel over MODEL1 (even pages in every cache: a token's data and the
      // 16-byte unit of its scale record, shared with a neighbour, copied apart), and the
      // plain kernel where one cache's page is odd.
      {"model1-b4-sq2-h16-topk256-page64-extra-lengths", model1, 4, 2, 16, {64, 256, 20, true},
       {2, 128, 90, true}, true},
      {"model1-b3-sq1-h32-topk192-page2-dup-runs", model1, 3, 1, 32, {2, 192, 300, false}, none,
       false, true, 1.f, true},
      {"model1-b2-sq3-h24-topk128-page576-extra", model1, 2, 3, 24, {576, 128, 2, false},
       {16, 64, 8, false}, true},
      {"model1-b2-sq1-h16-topk128-page16-extra-page69", model1, 2, 1, 16, {16, 128, 20, true},
       {69, 64, 3, false}},
  };
}

// e4m3 (fn) value of a byte that is not NaN.
double e4m3_value(uint8_t byte) {
  const int sign = byte >> 7, exponent = (byte >> 3) & 15, mantissa = byte & 7;
  const double magnitude = exponent == 0 ? std::ldexp(mantissa / 8.0, -6)
                                         : std::ldexp(1.0 + mantissa / 8.0, exponent - 7);
  return sign ? -magnitude : magnitude;
}

struct LayoutShape {
  int d_qk, nope, tile, bytes_per_token;
};
LayoutShape shape_of(Fp8Layout layout) {
  switch (layout) {
    case Fp8Layout::kV32: return {576, 512, 128, 656};
    case Fp8Layout::kModel1: return {512, 448, 64, 584};
    default: return {576, 576, 576, 576};  // E4M3: every dim e4m3, one scale per cache
  }
}

// One cache: its bytes and, per token, the dequantised row (what the reference reads).
struct Cache {
  std::vector<uint8_t> bytes;
  std::vector<double> rows;  // [tokens, d_qk]
  int64_t tokens = 0;
};

// Writes token t (block t / page, row t % page) of the cache with random values.
void write_token(Fp8Layout layout, int page, int64_t t, std::mt19937& rng, Cache& cache) {
  const LayoutShape s = shape_of(layout);
  std::uniform_int_distribution<int> exponent(0, 9), mantissa(0, 7), sign(0, 1), scale_exp(-5, -2);
  std::normal_distribution<float> gauss(0.f, 0.1f);
  const int64_t block = t / page, row = t % page;
  uint8_t* block_base = cache.bytes.data() + block * page * s.bytes_per_token;
  uint8_t* data = block_base + row * (layout == Fp8Layout::kV32 ? 656 : 576);
  double* out = &cache.rows[size_t(t) * s.d_qk];
  if (layout == Fp8Layout::kE4M3) {
    for (int d = 0; d < s.d_qk; ++d) {
      const uint8_t byte =
          static_cast<uint8_t>(sign(rng) << 7 | exponent(rng) << 3 | mantissa(rng));
      data[d] = byte;
      out[d] = e4m3_value(byte) * double(kE4m3Scale);
    }
    return;
  }
  for (int tile = 0; tile < s.nope / s.tile; ++tile) {
    const int e = scale_exp(rng);
    if (layout == Fp8Layout::kV32) {
      const float scale = std::ldexp(1.f, e);
      std::memcpy(data + 512 + 4 * tile, &scale, 4);
    } else {
      block_base[size_t(page) * 576 + row * 8 + tile] = static_cast<uint8_t>(127 + e);
    }
    for (int k = 0; k < s.tile; ++k) {
      const int d = tile * s.tile + k;
      const uint8_t byte =
          static_cast<uint8_t>(sign(rng) << 7 | exponent(rng) << 3 | mantissa(rng));
      data[d] = byte;
      out[d] = std::ldexp(e4m3_value(byte), e);
    }
  }
  if (layout == Fp8Layout::kModel1) block_base[size_t(page) * 576 + row * 8 + 7] = 0;
  uint8_t* rope = data + (layout == Fp8Layout::kV32 ? 528 : 448);
  for (int k = 0; k < 64; ++k) {
    const uint16_t bits = float_to_bf16(std::clamp(gauss(rng), -1.f, 1.f));
    std::memcpy(rope + 2 * k, &bits, 2);
    out[s.nope + k] = bf16_to_float(bits);
  }
}

struct SourceData {
  Cache cache;
  std::vector<int32_t> indices;  // [b, s_q, topk]
  std::vector<int32_t> lengths;  // [b] or empty
  std::vector<int> counted;      // [b]: clamp(lengths, 0, topk) or topk
};

SourceData make_source(const Case& c, const Source& src, std::mt19937& rng) {
  const LayoutShape s = shape_of(c.layout);
  SourceData out;
  out.cache.tokens = int64_t{src.num_blocks} * src.page;
  out.cache.bytes.assign(size_t(out.cache.tokens) * s.bytes_per_token, 0xFF);
  out.cache.rows.assign(size_t(out.cache.tokens) * s.d_qk, std::nan(""));
  std::uniform_int_distribution<int64_t> token(0, out.cache.tokens - 1);
  std::uniform_int_distribution<int> kind(0, 19);
  const int32_t bad[4] = {-1, static_cast<int32_t>(out.cache.tokens), 2147483647,
                          std::numeric_limits<int32_t>::min()};
  for (int i = 0; i < c.b; ++i) {
    int count = src.topk;
    if (src.lengths) {
      // 0, past topk, and values in between, by request.
      const int choices[4] = {src.topk / 2 + 3, 0, src.topk + 70, src.topk - 1};
      out.lengths.push_back(choices[i % 4]);
      count = std::clamp(out.lengths.back(), 0, src.topk);
    }
    out.counted.push_back(count);
  }
  out.indices.resize(size_t(c.b) * c.s_q * src.topk);
  std::vector<char> used(out.cache.tokens, 0);
  for (int i = 0; i < c.b; ++i) {
    for (int q = 0; q < c.s_q; ++q) {
      int32_t* slots = &out.indices[(size_t(i) * c.s_q + q) * src.topk];
      for (int k = 0; k < src.topk; ++k) {
        const int r = kind(rng);
        slots[k] = r < 2 ? bad[r + (k % 2) * 2] : static_cast<int32_t>(token(rng));
        if (c.duplicates && k > 0 && r == 19) slots[k] = slots[k - 1];
      }
      // By groups of 16 slots: random (as above), a run from a random token, a run that ends
      // at the cache's last token, a run broken by an invalid index.
      for (int k0 = 0; c.runs && k0 + 16 <= src.topk; k0 += 16) {
        const int mode = (k0 / 16 + i + q) % 4;
        if (mode == 0) continue;
        const int64_t first =
            mode == 2 ? out.cache.tokens - 16 : token(rng) % (out.cache.tokens - 15);
        for (int k = 0; k < 16; ++k) slots[k0 + k] = static_cast<int32_t>(first + k);
        if (mode == 3) slots[k0 + 5] = bad[k0 / 16 % 4];
      }
      for (int k = 0; k < src.topk; ++k) {
        if (k < out.counted[i] && slots[k] >= 0 && slots[k] < out.cache.tokens) used[slots[k]] = 1;
      }
    }
  }
  for (int64_t t = 0; t < out.cache.tokens; ++t) {
    if (used[t]) write_token(c.layout, src.page, t, rng, out.cache);
  }
  return out;
}

struct Inputs {
  SourceData main, extra;
  std::vector<uint16_t> q_bits;
  std::vector<float> sink;
  float softmax_scale;
};

Inputs make_inputs(const Case& c, uint32_t seed) {
  std::mt19937 rng(seed);
  Inputs in;
  in.main = make_source(c, c.main, rng);
  if (c.extra.topk > 0) in.extra = make_source(c, c.extra, rng);
  std::normal_distribution<float> gauss(0.f, 0.1f);
  in.q_bits.resize(size_t(c.b) * c.s_q * c.h_q * shape_of(c.layout).d_qk);
  for (uint16_t& x : in.q_bits) x = float_to_bf16(std::clamp(gauss(rng), -1.f, 1.f));
  if (c.sink) {
    std::normal_distribution<float> unit(0.f, 1.f);
    for (int h = 0; h < c.h_q; ++h) {
      in.sink.push_back(h % 3 == 0 ? INFINITY : h % 3 == 1 ? -INFINITY : unit(rng));
    }
  }
  in.softmax_scale = c.scale_mul / std::sqrt(float(shape_of(c.layout).d_qk));
  return in;
}

// float64 reference: out [b, s_q, h_q, 512], lse [b, h_q, s_q].
void reference(const Case& c, const Inputs& in, std::vector<double>& out, std::vector<double>& lse) {
  const int d_qk = shape_of(c.layout).d_qk;
  out.assign(size_t(c.b) * c.s_q * c.h_q * kDv, 0.0);
  lse.assign(size_t(c.b) * c.h_q * c.s_q, INFINITY);
  for (int i = 0; i < c.b; ++i) {
    for (int q = 0; q < c.s_q; ++q) {
      std::vector<const double*> keys;
      const auto collect = [&](const Source& src, const SourceData& data) {
        const int32_t* slots = &data.indices[(size_t(i) * c.s_q + q) * src.topk];
        for (int k = 0; k < data.counted[i]; ++k) {
          if (slots[k] >= 0 && slots[k] < data.cache.tokens) {
            keys.push_back(&data.cache.rows[size_t(slots[k]) * d_qk]);
          }
        }
      };
      collect(c.main, in.main);
      if (c.extra.topk > 0) collect(c.extra, in.extra);
      for (int h = 0; h < c.h_q; ++h) {
        if (keys.empty()) continue;  // out 0, lse +inf
        const uint16_t* qrow = &in.q_bits[((size_t(i) * c.s_q + q) * c.h_q + h) * d_qk];
        std::vector<double> scores(keys.size());
        double max_score = -INFINITY;
        for (size_t k = 0; k < keys.size(); ++k) {
          double dot = 0;
          for (int d = 0; d < d_qk; ++d) dot += double(bf16_to_float(qrow[d])) * keys[k][d];
          scores[k] = dot * in.softmax_scale;
          max_score = std::max(max_score, scores[k]);
        }
        double sum = 0;
        for (double& x : scores) sum += (x = std::exp(x - max_score));
        const double row_lse = max_score + std::log(sum);
        double factor = 1.0 / sum;
        if (!in.sink.empty()) factor /= 1.0 + std::exp(double(in.sink[h]) - row_lse);
        double* o = &out[((size_t(i) * c.s_q + q) * c.h_q + h) * kDv];
        for (size_t k = 0; k < keys.size(); ++k) {
          for (int d = 0; d < kDv; ++d) o[d] += scores[k] * factor * keys[k][d];
        }
        lse[(size_t(i) * c.h_q + h) * c.s_q + q] = row_lse;
      }
    }
  }
}

struct Result {
  std::vector<uint16_t> out;
  std::vector<float> lse;
};

// Scheduler + decode + combine for one case and num_parts; outputs poisoned first.
Result run(const Case& c, const Inputs& in, int num_parts, bool lengths_schedule) {
  const int64_t out_elems = int64_t{c.b} * c.s_q * c.h_q * kDv;
  const int64_t lse_elems = int64_t{c.b} * c.h_q * c.s_q;
  const int64_t rows = c.b + num_parts;
  DeviceBuffers buffers;
  jfm::SparseDecodeParams p;
  p.q = buffers.copy(in.q_bits);
  const auto source = [&](const Source& src, const SourceData& data, jfm::SparseKeySource& dst) {
    dst.cache = buffers.copy(data.cache.bytes);
    dst.indices = buffers.copy(data.indices);
    dst.topk_length = buffers.copy(data.lengths);
    dst.num_blocks = src.num_blocks;
    dst.page = src.page;
    dst.topk = src.topk;
  };
  source(c.main, in.main, p.main);
  if (c.extra.topk > 0) source(c.extra, in.extra, p.extra);
  p.attn_sink = buffers.copy(in.sink);
  p.tile_metadata =
      static_cast<jfm::MetadataRow*>(buffers.poisoned(sizeof(jfm::MetadataRow) * num_parts));
  p.num_splits = static_cast<int32_t*>(buffers.poisoned(sizeof(int32_t) * (c.b + 1)));
  p.out = buffers.poisoned(out_elems * 2);
  p.lse = static_cast<float*>(buffers.poisoned(lse_elems * 4));
  p.partial_o = static_cast<float*>(buffers.poisoned(rows * c.s_q * c.h_q * kDv * 4));
  p.partial_lse = static_cast<float*>(buffers.poisoned(rows * c.s_q * c.h_q * 4));
  p.batch = c.b;
  p.s_q = c.s_q;
  p.h_q = c.h_q;
  p.num_parts = num_parts;
  p.softmax_scale = in.softmax_scale;
  p.layout = c.layout;
  if (c.layout == Fp8Layout::kE4M3) p.k_scale = buffers.copy(std::vector<float>{kE4m3Scale});

  // The schedule, as the op makes it: per-request whole blocks of counted slots, or fixed.
  jfm::SchedulerParams sched;
  std::vector<int32_t> weights;
  if (lengths_schedule) {
    for (int i = 0; i < c.b; ++i) {
      int64_t w = (in.main.counted[i] + kBlockSlots - 1) / kBlockSlots * kBlockSlots;
      if (c.extra.topk > 0) w += (in.extra.counted[i] + kBlockSlots - 1) / kBlockSlots * kBlockSlots;
      weights.push_back(static_cast<int32_t>(w));
    }
    sched.cache_seqlens = buffers.copy(weights);
  } else {
    sched.fixed_length = c.main.topk + c.extra.topk;
  }
  sched.tile_scheduler_metadata = const_cast<jfm::MetadataRow*>(p.tile_metadata);
  sched.num_splits = const_cast<int32_t*>(p.num_splits);
  sched.batch = c.b;
  sched.num_parts = num_parts;
  CHECK(jfm::launch_scheduler(sched, nullptr));
  if (const char* error = jfm::sparse_decode_params_error(p)) {
    std::fprintf(stderr, "params: %s\n", error);
    std::exit(1);
  }
  CHECK(jfm::launch_sparse_decode(p, nullptr));
  CHECK(cudaDeviceSynchronize());
  Result r;
  r.out.resize(out_elems);
  r.lse.resize(lse_elems);
  CHECK(cudaMemcpy(r.out.data(), p.out, out_elems * 2, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(r.lse.data(), p.lse, lse_elems * 4, cudaMemcpyDeviceToHost));
  return r;
}

bool check(const Case& c, const Inputs& in, const Result& got, int num_parts, bool lengths_schedule,
           const Result& again) {
  std::vector<double> out, lse;
  reference(c, in, out, lse);
  long bad_out = 0, bad_lse = 0, nan_out = 0;
  double max_err = 0, dot = 0, norms = 0;
  for (size_t k = 0; k < out.size(); ++k) {
    const double a = bf16_to_float(got.out[k]);
    nan_out += std::isnan(a);
    if (!close_to(a, out[k], kOutAbs, kOutRel)) ++bad_out;
    if (std::isfinite(a)) {
      max_err = std::max(max_err, std::fabs(a - out[k]));
      dot += a * out[k];
      norms += a * a + out[k] * out[k];
    }
  }
  for (size_t k = 0; k < lse.size(); ++k) {
    bad_lse += !close_to(got.lse[k], lse[k], kLseAbs, kLseRel);
  }
  const double cos = norms > 0 ? 1 - 2 * dot / norms : 0;
  const bool same = got.out == again.out &&
                    std::memcmp(got.lse.data(), again.lse.data(), got.lse.size() * 4) == 0;
  const bool ok = bad_out == 0 && bad_lse == 0 && nan_out == 0 && cos <= kOutCos && same;
  std::printf("%s %s parts %d (%s schedule): out max|err| %.3g (%ld bad) cos %.1e, lse %ld bad, "
              "NaN out %ld, repeat %s\n",
              ok ? "PASS" : "FAIL", c.name.c_str(), num_parts, lengths_schedule ? "lengths" : "fixed",
              max_err, bad_out, cos, bad_lse, nan_out, same ? "bitwise equal" : "DIFFERS");
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string filter = argc > 1 ? argv[1] : "";
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  bool all_ok = true;
  int runs = 0;
  uint32_t seed = 1;
  for (const Case& c : all_cases()) {
    if (!filter.empty() && c.name.find(filter) == std::string::npos) continue;
    const Inputs in = make_inputs(c, seed++);
    const int op_parts = std::max(sms / (c.s_q * ((c.h_q + 63) / 64)), 1);
    for (int parts : {op_parts, 1, 5, 132}) {
      for (bool lengths_schedule : {true, false}) {
        const Result got = run(c, in, parts, lengths_schedule);
        const Result again = run(c, in, parts, lengths_schedule);
        all_ok &= check(c, in, got, parts, lengths_schedule, again);
        ++runs;
      }
    }
  }
  std::printf(all_ok ? "ALL PASS (%d runs)\n" : "SOME FAILED (%d runs)\n", runs);
  return all_ok ? 0 : 1;
}
