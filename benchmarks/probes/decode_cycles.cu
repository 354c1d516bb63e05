// Probe: times the dense decode kernel from C++ (no JAX): median of 100 launches after 50 of
// warm-up (each launch synchronised), the median per-launch time of 20 launches back to back
// (as a jitted loop runs them: lower clocks, the figure to compare), the host's time to
// enqueue one launch, and, built with -DJFM_KERNEL_SPAN (csrc/kernels/common/span.cuh), the
// cycles per KV block of the first CTA and the SM clock of the last launch. The clock swings
// between ~1.25 and ~1.8 GHz on the H200 under this load (power), so compare variants by
// cycles per block, and by the JAX benchmark for time.
//
// Inputs as benchmarks/bench_decode.py: lengths ~ max(N(s_k, s_k/2), s_q), a randomly
// permuted block table, uniform random bf16 values.
//
// Built by CMake with -DJAX_FLASHMLA_BUILD_PROBES=ON (target decode_cycles, with the span probe
// switched on; see benchmarks/probes/README.md), run on the H200:
//   decode_cycles [b] [s_q] [h_q] [s_k] [causal] [page]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

// One translation unit holds the kernel, its launcher and the span record (the scheduler and
// the combine come from the kernel objects).
#include "kernels/sm90/decode_dense/decode_dense.cu"
#include "kernels/sm90/decode_dense/decode_dense_bf16.cu"
#include "kernels/common/scheduler.cuh"

#include "cuda_check.h"

__global__ void fill_random(__nv_bfloat16* x, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 16;
    h *= 2246822519u;
    h ^= h >> 13;
    x[i] = __float2bfloat16((static_cast<float>(h & 0xFFFF) / 65535.f - 0.5f) * 0.3f);
  }
}

int main(int argc, char** argv) {
  const int b = argc > 1 ? std::atoi(argv[1]) : 128;
  const int s_q = argc > 2 ? std::atoi(argv[2]) : 1;
  const int h_q = argc > 3 ? std::atoi(argv[3]) : 128;
  const int s_k = argc > 4 ? std::atoi(argv[4]) : 4096;
  const bool causal = argc > 5 && std::atoi(argv[5]) != 0;
  const int page = argc > 6 ? std::atoi(argv[6]) : jfm::kDefaultPageSize;
  const int h_kv = 1;
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));

  std::mt19937 rng(0);
  std::normal_distribution<double> normal;
  std::vector<int> lengths(b);
  for (int& len : lengths) len = std::max<int>(s_q, static_cast<int>(s_k + s_k / 2.0 * normal(rng)));
  const int max_len = *std::max_element(lengths.begin(), lengths.end());
  const int max_blocks = (max_len + page - 1) / page;
  const int num_blocks = b * max_blocks;
  std::vector<int> table(num_blocks);
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), rng);
  const double mean_len = std::accumulate(lengths.begin(), lengths.end(), 0.0) / b;

  const int rows_per_kv = s_q * h_q / h_kv;
  const int num_parts = std::max(prop.multiProcessorCount / h_kv / ((rows_per_kv + jfm::kQueryTileRows - 1) / jfm::kQueryTileRows), 1);
  const size_t q_elems = size_t(b) * s_q * h_q * jfm::kHeadDimQK;
  const size_t cache_elems = size_t(num_blocks) * page * h_kv * jfm::kHeadDimQK;
  __nv_bfloat16 *q, *cache, *out;
  float *lse, *partial_o, *partial_lse;
  int *d_table, *d_lengths, *num_splits;
  jfm::MetadataRow* metadata;
  CHECK(cudaMalloc(&q, q_elems * 2));
  CHECK(cudaMalloc(&cache, cache_elems * 2));
  CHECK(cudaMalloc(&out, size_t(b) * s_q * h_q * jfm::kHeadDimV * 2));
  CHECK(cudaMalloc(&lse, size_t(b) * s_q * h_q * 4));
  CHECK(cudaMalloc(&partial_o, size_t(b + num_parts) * s_q * h_q * jfm::kHeadDimV * 4));
  CHECK(cudaMalloc(&partial_lse, size_t(b + num_parts) * s_q * h_q * 4));
  CHECK(cudaMalloc(&d_table, num_blocks * 4));
  CHECK(cudaMalloc(&d_lengths, b * 4));
  CHECK(cudaMalloc(&metadata, num_parts * sizeof(jfm::MetadataRow)));
  CHECK(cudaMalloc(&num_splits, (b + 1) * 4));
  fill_random<<<1024, 256>>>(q, q_elems, 1);
  fill_random<<<4096, 256>>>(cache, cache_elems, 2);
  CHECK(cudaMemcpy(d_table, table.data(), num_blocks * 4, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(d_lengths, lengths.data(), b * 4, cudaMemcpyHostToDevice));

  jfm::SchedulerParams sp;
  sp.cache_seqlens = d_lengths;
  sp.tile_scheduler_metadata = metadata;
  sp.num_splits = num_splits;
  sp.batch = b;
  sp.num_parts = num_parts;
  CHECK(jfm::launch_scheduler(sp, 0));

  jfm::DenseDecodeParams p;
  p.q = q;
  p.k_cache = cache;
  p.block_table = d_table;
  p.cache_seqlens = d_lengths;
  p.tile_metadata = metadata;
  p.num_splits = num_splits;
  p.out = out;
  p.lse = lse;
  p.partial_o = partial_o;
  p.partial_lse = partial_lse;
  p.batch = b;
  p.s_q = s_q;
  p.h_q = h_q;
  p.h_kv = h_kv;
  p.num_blocks = num_blocks;
  p.page = page;
  p.max_blocks_per_seq = max_blocks;
  p.num_parts = num_parts;
  p.softmax_scale = 1.f / std::sqrt(float(jfm::kHeadDimQK));
  p.causal = causal;

  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  // Median per-launch time of `reps` timed groups of `launches` back-to-back launches, after
  // `warmup` untimed groups.
  const auto median_us = [&](int warmup, int reps, int launches) {
    std::vector<float> times;
    for (int rep = 0; rep < warmup + reps; ++rep) {
      CHECK(cudaEventRecord(e0));
      for (int i = 0; i < launches; ++i) CHECK(jfm::launch_dense_decode(p, 0));
      CHECK(cudaEventRecord(e1));
      CHECK(cudaEventSynchronize(e1));
      float ms;
      CHECK(cudaEventElapsedTime(&ms, e0, e1));
      if (rep >= warmup) times.push_back(ms * 1e3f / launches);
    }
    std::sort(times.begin(), times.end());
    return double(times[times.size() / 2]);
  };
  // One launch per group, long enough for the clocks to settle as under a sustained load.
  const double us = median_us(50, 100, 1);
  // Back to back, as a jitted loop of calls runs them: 20 launches per group.
  std::printf("  back to back: %.1f us per launch\n", median_us(0, 15, 20));
  // The host's time to enqueue one call (the launcher's checks, tensor maps and two kernel
  // launches), median of 15 groups of 20: where it nears the figure above, a loop of such calls
  // is limited by the host, not by the GPU.
  {
    std::vector<double> host;
    for (int rep = 0; rep < 15; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < 20; ++i) CHECK(jfm::launch_dense_decode(p, 0));
      const auto t1 = std::chrono::steady_clock::now();
      CHECK(cudaDeviceSynchronize());
      host.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count() / 20);
    }
    std::sort(host.begin(), host.end());
    std::printf("  host enqueue: %.1f us per launch\n", host[host.size() / 2]);
  }
  const double flops = double(b) * s_q * h_q * mean_len * 2 * (jfm::kHeadDimQK + jfm::kHeadDimV);
  std::printf("b %d s_q %d h_q %d s_k %d causal %d: mean len %.0f, %d parts, %.1f us, %.1f TFLOPS\n",
              b, s_q, h_q, s_k, causal, mean_len, num_parts, us, flops / us / 1e6);

#ifdef JFM_KERNEL_SPAN
  {
    // Blocks of part 0 (the CTA whose score warpgroup marked its span).
    jfm::MetadataRow part;
    CHECK(cudaMemcpy(&part, metadata, sizeof(part), cudaMemcpyDeviceToHost));
    long blocks = 0;
    for (int req = part.begin_req; req <= part.end_req; ++req) {
      const int n = (lengths[req] + jfm::kSchedulerBlockTokens - 1) / jfm::kSchedulerBlockTokens;
      const int lo = req == part.begin_req ? part.begin_block : 0;
      const int hi = req == part.end_req ? std::min(part.end_block, n) : n;
      blocks += std::max(hi - lo, 0);
    }
    unsigned long long span[4];
    CHECK(cudaMemcpyFromSymbol(span, jfm_span, sizeof(span)));
    const double cycles = double(span[2] - span[0]), ns = double(span[3] - span[1]);
    std::printf("  CTA 0: %ld blocks, %.0f cycles (%.0f per block), %.0f MHz\n", blocks, cycles,
                cycles / std::max(blocks, 1L), cycles / ns * 1e3);
  }
#endif
  return 0;
}
