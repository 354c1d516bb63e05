// C++ test of the dense decode (scheduler + decode kernel + combine, no JAX) against a float64
// CPU reference, on small shapes, so that it also runs under compute-sanitizer. Contract and
// tolerances: docs/ops.md (dense decode: out abs 8e-4 / rel 2.01/128 / cos 5e-6, lse abs 1e-6
// / rel 8.01/65536; inf/NaN positions must coincide; lonely rows give out 0, lse +inf).
//
// Inputs: q and the cache ~ N(0, 1) / 10 clamped to [-1, 1] rounded to the element type; a
// randomly permuted block table whose entries past a request's blocks are, in turn, an
// in-range block full of NaN, 2147480000 (the garbage value of the tests) or -1; NaN
// (all-ones bits) in every cache element no request may read (rows at or past a request's
// length in its last page, unused and spare blocks). Some cases also put out-of-range block
// ids inside a request's used range (-1, num_blocks, 2^31 - 1, and an id whose id * 64 wraps in
// int32 onto a NaN block): those tokens must be masked. Others pass lengths past what the
// block table covers (up to 2^31 - 1) or negative ones: the kernel attends
// clamp(len, 0, max_blocks_per_seq * 64) tokens. out, lse and the partial buffers are filled
// with NaN before every launch, so an output the kernel forgets to write fails. Buffers are
// allocated at their exact sizes, so memcheck sees any access past them.
//
// Every case runs with num_parts as the JAX op computes it (max(SMs / h_kv / ceil(s_q * h_q /
// h_kv / 64), 1)), with 1 (nothing split), 5 (odd splits) and 132.
//
// Built by CMake with -DJAX_FLASHMLA_BUILD_TESTS=ON (ctest runs it), on a Hopper GPU:
//   decode_check [name-filter]
//   compute-sanitizer --tool memcheck decode_check
// Prints one line per (case, num_parts) and "ALL PASS" at the end; exits 1 on any failure.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cuda_check.h"
#include "kernels/common/mla_geometry.cuh"
#include "kernels/common/scheduler.cuh"
#include "kernels/sm90/decode_dense/decode_dense.cuh"

namespace {

constexpr int kDqk = jfm::kHeadDimQK, kDv = jfm::kHeadDimV;
constexpr int kGarbageBlock = 2147480000;  // what the tests put past a request's blocks
constexpr uint16_t kNaN16 = 0xFFFF;        // NaN as bf16 and as fp16

// docs/ops.md, dense decode.
constexpr double kOutAbs = 8e-4, kOutRel = 2.01 / 128, kOutCos = 5e-6;
constexpr double kLseAbs = 1e-6, kLseRel = 8.01 / 65536;

struct Case {
  std::string name;
  int b, s_q, h_q, h_kv;
  std::vector<int> lengths;
  bool causal;
  bool fp16 = false;
  float scale_mul = 1.f;  // softmax_scale = scale_mul / sqrt(576); > 1 sharpens the softmax
  // > 0: block-table entries inside the used range that are out of range: entry j of request
  // i when (i + j) % bad_block_every == 1 (cycling through the kinds of bad id).
  int bad_block_every = 0;
  // > 0: the block table has this many entries per request, fewer than the lengths need:
  // the kernel attends clamp(len, 0, table_blocks * page) tokens.
  int table_blocks = 0;
  // Tokens per cache block: multiples of 64, 16 and 32 are loaded by TMA, other pages
  // gathered.
  int page = jfm::kDefaultPageSize;
};

uint16_t to_bits(float x, bool fp16) {
  if (fp16) return static_cast<__half_raw>(__float2half_rn(x)).x;
  return static_cast<__nv_bfloat16_raw>(__float2bfloat16_rn(x)).x;
}

float from_bits(uint16_t bits, bool fp16) {
  if (fp16) {
    __half_raw r;
    r.x = bits;
    return __half2float(__half(r));
  }
  uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Lengths ~ N(mean, sd), at least 1, reproducible.
std::vector<int> around(int b, double mean, double sd, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal(mean, sd);
  std::vector<int> v(b);
  for (int& x : v) x = std::max(1, static_cast<int>(normal(rng)));
  return v;
}

std::vector<Case> all_cases() {
  return {
      {"b4-sq1-h128-len1/63/64/1000", 4, 1, 128, 1, {1, 63, 64, 1000}, false},
      {"b3-sq2-h128-causal-len0/200/3000", 3, 2, 128, 1, {0, 200, 3000}, true},
      {"b2-sq8-h16-causal-len8/513", 2, 8, 16, 1, {8, 513}, true},
      {"b5-sq1-h64-len0/0/4096/65/130", 5, 1, 64, 1, {0, 0, 4096, 65, 130}, false},
      {"b2-sq4-h9x3-causal-len5/777", 2, 4, 9, 3, {5, 777}, true},
      {"b2-sq1-h126x2-len640/129", 2, 1, 126, 2, {640, 129}, false},
      {"b1-sq1-h1-len300", 1, 1, 1, 1, {300}, false},
      {"b8-sq1-h128-len~1500", 8, 1, 128, 1, around(8, 1500, 150, 7), false},
      // Causal with len < s_q: the first s_q - len queries see no key (lonely).
      {"b2-sq4-h16-causal-len2/3", 2, 4, 16, 1, {2, 3}, true},
      {"b2-sq2-h64x8-causal-len100/600", 2, 2, 64, 8, {100, 600}, true},
      {"b2-sq2-h32-noncausal-len70/10", 2, 2, 32, 1, {70, 10}, false},
      {"b2-sq2-h128-causal-len0/0", 2, 2, 128, 1, {0, 0}, true},
      {"fp16-b3-sq2-h128-causal-len64/1/900", 3, 2, 128, 1, {64, 1, 900}, true, true},
      // Logits with sd ~2: the running max moves across blocks, rescaling matters.
      {"sharp-b2-sq1-h64-len1200/257", 2, 1, 64, 1, {1200, 257}, false, false, 8.f},
      // Any finite scale: negative and zero.
      {"negscale-b2-sq2-h64-causal-len300/1000", 2, 2, 64, 1, {300, 1000}, true, false, -3.f},
      {"zeroscale-b2-sq1-h16-len200/70", 2, 1, 16, 1, {200, 70}, false, false, 0.f},
      // Out-of-range block ids inside the used range are masked, split and unsplit.
      {"badblocks-b3-sq1-h128-len2000/640/300", 3, 1, 128, 1, {2000, 640, 300}, false, false,
       1.f, 3},
      {"badblocks-b2-sq2-h64x2-causal-len900/129", 2, 2, 64, 2, {900, 129}, true, false, 1.f, 2},
      {"badblocks-fp16-b2-sq1-h32-len1500/64", 2, 1, 32, 1, {1500, 64}, false, true, 1.f, 4},
      // Lengths past the block table's capacity (and negative) are clamped.
      {"clamp-b4-sq1-h128-len2147483647/100/-5/700", 4, 1, 128, 1,
       {2147483647, 100, -5, 700}, false, false, 1.f, 0, 5},
      {"clamp-b2-sq2-h64-causal-len5000/2147483000", 2, 2, 64, 1, {5000, 2147483000}, true,
       false, 1.f, 2, 12},
      // Other page sizes, with bad block ids inside the used range.
      {"page1-b3-sq1-h128-len700/1/65", 3, 1, 128, 1, {700, 1, 65}, false, false, 1.f, 5, 0, 1},
      {"page16-b2-sq2-h64-causal-len300/17", 2, 2, 64, 1, {300, 17}, true, false, 1.f, 3, 0, 16},
      {"page32-fp16-b3-sq1-h128-len500/33/31", 3, 1, 128, 1, {500, 33, 31}, false, true, 1.f, 2,
       0, 32},
      {"page16-clamp-b2-sq1-h16x2-len2147483647/40", 2, 1, 16, 2, {2147483647, 40}, false, false,
       1.f, 0, 7, 16},
      {"page53-fp16-b2-sq1-h9x3-len600/53", 2, 1, 9, 3, {600, 53}, false, true, 1.f, 2, 0, 53},
      {"page128-b2-sq2-h128-causal-len1000/129", 2, 2, 128, 1, {1000, 129}, true, false, 1.f, 2,
       0, 128},
      {"page53-clamp-b2-sq1-h16-len2147483647/90", 2, 1, 16, 1, {2147483647, 90}, false, false,
       1.f, 0, 4, 53},
  };
}

// Host copies of one case's inputs. Cache and q as raw 16-bit values (what the device gets)
// and as floats (what the reference reads).
struct Inputs {
  int max_blocks = 0, num_blocks = 0;
  std::vector<int> lengths;  // tokens attended: clamp(case length, 0, max_blocks * page)
  std::vector<int> table;    // [b, max_blocks]
  std::vector<char> present;  // [b, max_blocks]: the entry is a block id in range
  std::vector<uint16_t> q_bits, cache_bits;
  std::vector<float> q, cache;
};

Inputs make_inputs(const Case& c, uint32_t seed) {
  Inputs in;
  std::mt19937 rng(seed);
  std::normal_distribution<float> gauss(0.f, 0.1f);
  const auto normal = [&gauss](std::mt19937& g) { return std::clamp(gauss(g), -1.f, 1.f); };
  if (c.table_blocks > 0) {
    in.max_blocks = c.table_blocks;
  } else {
    // One block-table entry more than the longest request needs: every request has entries
    // past its blocks.
    const int max_len = *std::max_element(c.lengths.begin(), c.lengths.end());
    in.max_blocks = (max_len + c.page - 1) / c.page + 1;
  }
  for (int len : c.lengths) {
    in.lengths.push_back(static_cast<int>(
        std::clamp<int64_t>(len, 0, int64_t{in.max_blocks} * c.page)));
  }
  // Two spare blocks that nobody owns (NaN).
  in.num_blocks = c.b * in.max_blocks + 2;
  std::vector<int> perm(in.num_blocks);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  const int spare = perm[in.num_blocks - 1];
  // Out-of-range ids, the last one wrapping onto the spare NaN block in int32: id * 64 =
  // spare * 64 + 2^32.
  const int bad_ids[4] = {-1, in.num_blocks, 2147483647, spare + (1 << 26)};

  const size_t row = size_t(c.h_kv) * kDqk;  // one token of the cache
  in.cache_bits.assign(size_t(in.num_blocks) * c.page * row, kNaN16);
  in.table.resize(size_t(c.b) * in.max_blocks);
  in.present.resize(in.table.size());
  int bad = 0;
  for (int i = 0; i < c.b; ++i) {
    const int used = (in.lengths[i] + c.page - 1) / c.page;
    for (int j = 0; j < in.max_blocks; ++j) {
      const int block = perm[size_t(i) * in.max_blocks + j];
      int& entry = in.table[size_t(i) * in.max_blocks + j];
      const bool bad_here = c.bad_block_every > 0 && (i + j) % c.bad_block_every == 1;
      if (j < used && !bad_here) {
        entry = block;
        in.present[size_t(i) * in.max_blocks + j] = 1;
        const int rows = std::min(c.page, in.lengths[i] - j * c.page);
        uint16_t* dst = &in.cache_bits[size_t(block) * c.page * row];
        for (size_t e = 0; e < size_t(rows) * row; ++e) dst[e] = to_bits(normal(rng), c.fp16);
      } else if (j < used) {
        entry = bad_ids[bad++ % 4];  // its tokens are masked; its own block stays NaN
      } else {
        // Never to be read: a NaN block in range, or values no block has.
        const int kind = (i + j) % 3;
        entry = kind == 0 ? block : kind == 1 ? kGarbageBlock : -1;
      }
    }
  }
  in.q_bits.resize(size_t(c.b) * c.s_q * c.h_q * kDqk);
  for (uint16_t& x : in.q_bits) x = to_bits(normal(rng), c.fp16);

  in.q.resize(in.q_bits.size());
  for (size_t i = 0; i < in.q.size(); ++i) in.q[i] = from_bits(in.q_bits[i], c.fp16);
  in.cache.resize(in.cache_bits.size());
  for (size_t i = 0; i < in.cache.size(); ++i) in.cache[i] = from_bits(in.cache_bits[i], c.fp16);
  return in;
}

// Keys query token s of a request of `len` tokens may see: [0, visible).
int visible_keys(const Case& c, int len, int s) {
  if (!c.causal) return len;
  return std::clamp(len - c.s_q + s + 1, 0, len);  // bottom-right: keys j <= len - s_q + s
}

template <typename F>
void parallel_for(int n, F body) {
  const int workers = std::clamp<int>(std::thread::hardware_concurrency(), 1, 32);
  std::atomic<int> next{0};
  std::vector<std::thread> pool;
  for (int w = 0; w < workers; ++w) {
    pool.emplace_back([&] {
      std::vector<double> scratch;
      for (int i; (i = next.fetch_add(1)) < n;) body(i, scratch);
    });
  }
  for (std::thread& t : pool) t.join();
}

// out [b, s_q, h_q, 512], lse [b, h_q, s_q] (the kernel's layouts), float64; lonely rows 0 / +inf.
struct Reference {
  std::vector<double> out, lse;
};

Reference reference(const Case& c, const Inputs& in, double scale) {
  Reference ref;
  ref.out.assign(size_t(c.b) * c.s_q * c.h_q * kDv, 0.0);
  ref.lse.assign(size_t(c.b) * c.h_q * c.s_q, 0.0);
  const int group = c.h_q / c.h_kv;
  parallel_for(c.b * c.s_q * c.h_q, [&](int r, std::vector<double>& p) {
    const int head = r % c.h_q, s = r / c.h_q % c.s_q, req = r / c.h_q / c.s_q;
    const int kv_head = head / group;
    const int* table = &in.table[size_t(req) * in.max_blocks];
    const char* present = &in.present[size_t(req) * in.max_blocks];
    // The attended keys: visible, in a block whose id is in range.
    std::vector<int> keys;
    for (int t = 0; t < visible_keys(c, in.lengths[req], s); ++t) {
      if (present[t / c.page]) keys.push_back(t);
    }
    double& lse = ref.lse[(size_t(req) * c.h_q + head) * c.s_q + s];
    if (keys.empty()) {
      lse = std::numeric_limits<double>::infinity();
      return;
    }
    const float* q = &in.q[size_t(r) * kDqk];
    auto key = [&](int t) {
      const size_t token_row = size_t(table[t / c.page]) * c.page + t % c.page;
      return &in.cache[(token_row * c.h_kv + kv_head) * kDqk];
    };
    const size_t n = keys.size();
    p.resize(n);
    double mx = -std::numeric_limits<double>::infinity();
    for (size_t i = 0; i < n; ++i) {
      const float* k = key(keys[i]);
      double acc[8] = {};  // independent chains: the sum need not wait on each add
      for (int d = 0; d < kDqk; d += 8) {
        for (int u = 0; u < 8; ++u) acc[u] += double(q[d + u]) * double(k[d + u]);
      }
      const double dot = ((acc[0] + acc[1]) + (acc[2] + acc[3])) +
                         ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      p[i] = scale * dot;
      mx = std::max(mx, p[i]);
    }
    double sum = 0;
    for (size_t i = 0; i < n; ++i) sum += (p[i] = std::exp(p[i] - mx));
    double* o = &ref.out[size_t(r) * kDv];
    for (size_t i = 0; i < n; ++i) {
      const float* v = key(keys[i]);
      const double w = p[i] / sum;
      for (int d = 0; d < kDv; ++d) o[d] += w * double(v[d]);
    }
    lse = mx + std::log(sum);
  });
  return ref;
}

struct Stats {
  double out_err = 0, lse_err = 0, cos_diff = 0;
  long out_bad = 0, lse_bad = 0, out_nan = 0, lse_nan = 0, special = 0, lonely_nonzero = 0;
  bool pass() const {
    return out_bad == 0 && lse_bad == 0 && out_nan == 0 && lse_nan == 0 && special == 0 &&
           lonely_nonzero == 0 && cos_diff <= kOutCos;
  }
};

bool within(double err, double ref, double abs_tol, double rel_tol) {
  return err < abs_tol || err / (std::fabs(ref) + 1e-6) < rel_tol;
}

Stats compare(const Case& c, const Reference& ref, const std::vector<uint16_t>& out,
              const std::vector<float>& lse) {
  Stats st;
  double dot = 0, norms = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    const double a = from_bits(out[i], c.fp16), r = ref.out[i];  // r is always finite
    if (std::isnan(a)) ++st.out_nan;
    if (!std::isfinite(a)) {
      ++st.special;
      continue;
    }
    const double err = std::fabs(a - r);
    st.out_err = std::max(st.out_err, err);
    if (!within(err, r, kOutAbs, kOutRel)) ++st.out_bad;
    dot += a * r;
    norms += a * a + r * r;
  }
  st.cos_diff = norms == 0 ? 0 : 1 - 2 * dot / norms;
  for (int req = 0; req < c.b; ++req) {
    for (int h = 0; h < c.h_q; ++h) {
      for (int s = 0; s < c.s_q; ++s) {
        const size_t i = (size_t(req) * c.h_q + h) * c.s_q + s;
        const double a = lse[i], r = ref.lse[i];
        if (std::isnan(a)) ++st.lse_nan;
        if (std::isinf(r)) {
          // Lonely: lse exactly +inf and the output row exactly 0.
          if (a != r) ++st.special;
          const size_t o = ((size_t(req) * c.s_q + s) * c.h_q + h) * kDv;
          for (int d = 0; d < kDv; ++d) st.lonely_nonzero += from_bits(out[o + d], c.fp16) != 0.f;
          continue;
        }
        if (!std::isfinite(a)) {
          ++st.special;
          continue;
        }
        const double err = std::fabs(a - r);
        st.lse_err = std::max(st.lse_err, err);
        if (!within(err, r, kLseAbs, kLseRel)) ++st.lse_bad;
      }
    }
  }
  return st;
}

template <typename T>
T* device_copy(const std::vector<T>& host) {
  T* d = nullptr;
  CHECK(cudaMalloc(&d, std::max<size_t>(host.size(), 1) * sizeof(T)));
  if (!host.empty()) {
    CHECK(cudaMemcpy(d, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  return d;
}

// One launch of scheduler + decode (+ combine) with `num_parts`; returns the comparison.
Stats run_once(const Case& c, const Inputs& in, const Reference& ref, float scale, int num_parts,
               uint16_t* d_q, uint16_t* d_cache, int* d_table, int* d_lengths, int* splits_out) {
  const size_t rows = size_t(c.b) * c.s_q * c.h_q;
  const size_t partial_rows = size_t(c.b + num_parts) * c.s_q * c.h_q;
  void* out;
  float *lse, *partial_o, *partial_lse;
  jfm::MetadataRow* metadata;
  int* num_splits;
  CHECK(cudaMalloc(&out, rows * kDv * 2));
  CHECK(cudaMalloc(&lse, rows * 4));
  CHECK(cudaMalloc(&partial_o, partial_rows * kDv * 4));
  CHECK(cudaMalloc(&partial_lse, partial_rows * 4));
  CHECK(cudaMalloc(&metadata, size_t(num_parts) * sizeof(jfm::MetadataRow)));
  CHECK(cudaMalloc(&num_splits, size_t(c.b + 1) * 4));
  // All-ones bytes: NaN in bf16, fp16 and fp32; garbage in the schedule.
  CHECK(cudaMemset(out, 0xFF, rows * kDv * 2));
  CHECK(cudaMemset(lse, 0xFF, rows * 4));
  CHECK(cudaMemset(partial_o, 0xFF, partial_rows * kDv * 4));
  CHECK(cudaMemset(partial_lse, 0xFF, partial_rows * 4));
  CHECK(cudaMemset(metadata, 0xFF, size_t(num_parts) * sizeof(jfm::MetadataRow)));
  CHECK(cudaMemset(num_splits, 0xFF, size_t(c.b + 1) * 4));

  jfm::SchedulerParams sp;
  sp.cache_seqlens = d_lengths;
  sp.tile_scheduler_metadata = metadata;
  sp.num_splits = num_splits;
  sp.batch = c.b;
  sp.num_parts = num_parts;
  CHECK(jfm::launch_scheduler(sp, 0));

  jfm::DenseDecodeParams p;
  p.q = d_q;
  p.k_cache = d_cache;
  p.block_table = d_table;
  p.cache_seqlens = d_lengths;
  p.tile_metadata = metadata;
  p.num_splits = num_splits;
  p.out = out;
  p.lse = lse;
  p.partial_o = partial_o;
  p.partial_lse = partial_lse;
  p.batch = c.b;
  p.s_q = c.s_q;
  p.h_q = c.h_q;
  p.h_kv = c.h_kv;
  p.num_blocks = in.num_blocks;
  p.page = c.page;
  p.max_blocks_per_seq = in.max_blocks;
  p.num_parts = num_parts;
  p.softmax_scale = scale;
  p.causal = c.causal;
  p.dtype = c.fp16 ? jfm::ElementType::kF16 : jfm::ElementType::kBF16;
  if (const char* msg = jfm::dense_decode_params_error(p)) {
    std::fprintf(stderr, "%s: bad params: %s\n", c.name.c_str(), msg);
    std::exit(1);
  }
  CHECK(jfm::launch_dense_decode(p, 0));
  CHECK(cudaDeviceSynchronize());

  std::vector<uint16_t> h_out(rows * kDv);
  std::vector<float> h_lse(rows);
  CHECK(cudaMemcpy(h_out.data(), out, h_out.size() * 2, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(h_lse.data(), lse, h_lse.size() * 4, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(splits_out, num_splits + c.b, 4, cudaMemcpyDeviceToHost));
  CHECK(cudaFree(out));
  CHECK(cudaFree(lse));
  CHECK(cudaFree(partial_o));
  CHECK(cudaFree(partial_lse));
  CHECK(cudaFree(metadata));
  CHECK(cudaFree(num_splits));
  return compare(c, ref, h_out, h_lse);
}

}  // namespace

int main(int argc, char** argv) {
  const char* filter = argc > 1 ? argv[1] : "";
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s, %d SMs; tolerances: out abs %g rel %g cos %g, lse abs %g rel %g\n", prop.name,
              prop.multiProcessorCount, kOutAbs, kOutRel, kOutCos, kLseAbs, kLseRel);

  bool all_pass = true;
  int runs = 0;
  const std::vector<Case> cases = all_cases();
  for (size_t ci = 0; ci < cases.size(); ++ci) {
    const Case& c = cases[ci];
    if (c.name.find(filter) == std::string::npos) continue;
    const Inputs in = make_inputs(c, 1000 + static_cast<uint32_t>(ci));
    const float scale = c.scale_mul / std::sqrt(float(kDqk));
    const Reference ref = reference(c, in, scale);

    uint16_t* d_q = device_copy(in.q_bits);
    uint16_t* d_cache = device_copy(in.cache_bits);
    int* d_table = device_copy(in.table);
    int* d_lengths = device_copy(c.lengths);

    const int rows_per_kv = c.s_q * c.h_q / c.h_kv;
    const int default_parts =
        std::max(prop.multiProcessorCount / c.h_kv / ((rows_per_kv + 63) / 64), 1);
    std::vector<int> parts;
    for (int n : {default_parts, 1, 5, 132}) {
      if (std::find(parts.begin(), parts.end(), n) == parts.end()) parts.push_back(n);
    }
    for (int num_parts : parts) {
      int total_splits = 0;
      const Stats st = run_once(c, in, ref, scale, num_parts, d_q, d_cache, d_table, d_lengths,
                                &total_splits);
      ++runs;
      all_pass &= st.pass();
      std::printf(
          "%s %-38s parts %3d (%3d splits): out max|err| %.2e (%ld bad) cos %.1e, lse max|err| "
          "%.2e (%ld bad), NaN out %ld lse %ld, inf/NaN mismatch %ld, lonely nonzero %ld\n",
          st.pass() ? "PASS" : "FAIL", c.name.c_str(), num_parts, total_splits, st.out_err,
          st.out_bad, st.cos_diff, st.lse_err, st.lse_bad, st.out_nan, st.lse_nan, st.special,
          st.lonely_nonzero);
      std::fflush(stdout);
    }
    CHECK(cudaFree(d_q));
    CHECK(cudaFree(d_cache));
    CHECK(cudaFree(d_table));
    CHECK(cudaFree(d_lengths));
  }
  if (runs == 0) {
    std::printf("no case matches \"%s\"\n", filter);
    return 1;
  }
  std::printf(all_pass ? "ALL PASS (%d runs)\n" : "SOME FAILED (%d runs)\n", runs);
  return all_pass ? 0 : 1;
}
