// Probe: how fast can every SM stream 72 KB KV blocks (64 tokens x 576 bf16) into shared
// memory with TMA, the way the dense decode kernel does, and does a 2-CTA cluster with TMA
// multicast help when two CTAs read the same blocks?
//
// One producer thread per CTA loads each block as 9 boxes of 64 x 64 (128-byte swizzle) into
// a ring of `stages` buffers; one consumer thread waits for each block, spins `delay` cycles
// (standing in for the block's matrix work) and releases it. Patterns:
//   distinct   each CTA reads its own blocks (all traffic from DRAM)
//   shared     CTAs 2k and 2k+1 read the same blocks at about the same time (L2 hits)
//   multicast  CTAs 2k and 2k+1 form a cluster; each loads half the boxes of a block and
//              multicasts them to both
// Footprint: "dram" = 8192 blocks (604 MB, as b=128 at s_k=4096), "l2" = 256 blocks (18 MB).
//
// Build and run on the H200 (sm_90a):
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -o /tmp/tma_stream \
//       benchmarks/probes/tma_stream.cu && /tmp/tma_stream
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

#include "cuda_check.h"

namespace {

constexpr int kBoxes = 9;
constexpr int kBoxBytes = 64 * 128;
constexpr int kBlockBytes = kBoxes * kBoxBytes;

__device__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ void bar_init(uint64_t* b, uint32_t n) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(b)), "r"(n));
}
__device__ void bar_wait(uint64_t* b, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\nw_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra w_%=;\n}\n" ::"r"(smem_u32(b)),
      "r"(parity)
      : "memory");
}
__device__ void bar_expect(uint64_t* b, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(b)),
               "r"(bytes)
               : "memory");
}
__device__ void bar_arrive_cluster(uint64_t* b, uint32_t cta) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_u32(b)), "r"(cta));
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" ::"r"(remote)
               : "memory");
}
__device__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::
                   : "memory");
}
__device__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
__device__ void tma_box(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c2,
                        uint16_t mask, bool multicast) {
  const uint64_t hint = 0x12F0000000000000ull;  // evict first
  if (multicast) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
        ".multicast::cluster.L2::cache_hint [%0], [%1, {%3, %4, %5}], [%2], %6, %7;" ::"r"(
            smem_u32(dst)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(bar)), "r"(c0), "r"(0), "r"(c2),
        "h"(mask), "l"(hint)
        : "memory");
  } else {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
        ".L2::cache_hint [%0], [%1, {%3, %4, %5}], [%2], %6;" ::"r"(smem_u32(dst)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(bar)), "r"(c0), "r"(0), "r"(c2),
        "l"(hint)
        : "memory");
  }
}

struct Args {
  const int* block_ids;
  int blocks_per_part;
  int share;  // CTAs per part
  int delay;
  bool multicast;
  int stages;
  unsigned long long* clock_info;  // [grid][2]: cycles, ns of the consumer loop
};

__global__ void __launch_bounds__(64, 1) stream_kernel(const __grid_constant__ CUtensorMap map,
                                                       const Args a) {
  extern __shared__ __align__(1024) uint8_t smem[];
  uint8_t* buf = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem) + 1023) & ~1023ull);
  uint64_t* full = reinterpret_cast<uint64_t*>(buf + a.stages * kBlockBytes);
  uint64_t* empty = full + a.stages;
  const uint32_t rank = a.multicast ? cluster_rank() : 0;
  if (threadIdx.x == 0) {
    for (int s = 0; s < a.stages; ++s) {
      bar_init(&full[s], 1);
      bar_init(&empty[s], a.multicast ? 2 : 1);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  if (a.multicast) cluster_sync(); else __syncthreads();
  const int part = blockIdx.x / a.share;
  const int* ids = a.block_ids + part * a.blocks_per_part;
  if (threadIdx.x == 0) {
    int stage = 0;
    uint32_t phase = 0;
    for (int i = 0; i < a.blocks_per_part; ++i) {
      bar_wait(&empty[stage], phase ^ 1);
      bar_expect(&full[stage], kBlockBytes);
      for (int c = 0; c < kBoxes; ++c) {
        if (a.multicast && (c & 1) != static_cast<int>(rank)) continue;
        tma_box(buf + stage * kBlockBytes + c * kBoxBytes, &map, &full[stage], c * 64,
                ids[i] * 64, 0x3, a.multicast);
      }
      if (++stage == a.stages) { stage = 0; phase ^= 1; }
    }
  } else if (threadIdx.x == 32) {
    unsigned long long t0, c0 = clock64();
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    int stage = 0;
    uint32_t phase = 0;
    for (int i = 0; i < a.blocks_per_part; ++i) {
      bar_wait(&full[stage], phase);
      const long long start = clock64();
      while (clock64() - start < a.delay) {}
      if (a.multicast) {
        bar_arrive_cluster(&empty[stage], 0);
        bar_arrive_cluster(&empty[stage], 1);
      } else {
        asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(&empty[stage]))
                     : "memory");
      }
      if (++stage == a.stages) { stage = 0; phase ^= 1; }
    }
    unsigned long long t1, c1 = clock64();
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t1));
    a.clock_info[blockIdx.x * 2] = c1 - c0;
    a.clock_info[blockIdx.x * 2 + 1] = t1 - t0;
  }
  __syncwarp();
  if (a.multicast) cluster_sync();
}

using EncodeFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                              const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                              const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                              CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

}  // namespace

int main() {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  const int num_blocks = 8192;
  void* cache;
  CHECK(cudaMalloc(&cache, size_t(num_blocks) * kBlockBytes));
  CHECK(cudaMemset(cache, 0x3c, size_t(num_blocks) * kBlockBytes));
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult q;
  CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q));
  CUtensorMap map;
  const cuuint64_t dims[3] = {576, 1, cuuint64_t(num_blocks) * 64};
  const cuuint64_t strides[2] = {1152, 1152};
  const cuuint32_t box[3] = {64, 1, 64}, estr[3] = {1, 1, 1};
  if (reinterpret_cast<EncodeFn>(fn)(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, cache, dims,
                                     strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                     CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                     CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS) {
    std::fprintf(stderr, "tensor map encode failed\n");
    return 1;
  }
  int* ids_dev;
  CHECK(cudaMalloc(&ids_dev, num_blocks * sizeof(int)));
  unsigned long long* clock_dev;
  CHECK(cudaMalloc(&clock_dev, sms * 2 * sizeof(unsigned long long)));
  std::vector<unsigned long long> clock_host(sms * 2);
  CHECK(cudaFuncSetAttribute(stream_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             3 * kBlockBytes + 2048));
  CHECK(cudaFuncSetAttribute(stream_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  std::printf("%-10s %-5s %6s %6s %10s %12s %12s %12s %8s\n", "pattern", "foot", "stages",
              "delay", "us", "us/block", "smem GB/s", "L2->SM GB/s", "SM MHz");
  const char* patterns[3] = {"distinct", "shared", "multicast"};
  for (int footprint : {num_blocks, 256}) {
    std::vector<int> ids(num_blocks);
    std::mt19937 rng(1);
    std::vector<int> perm(num_blocks);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int i = 0; i < num_blocks; ++i) ids[i] = perm[i] % footprint;
    CHECK(cudaMemcpy(ids_dev, ids.data(), num_blocks * sizeof(int), cudaMemcpyHostToDevice));
    for (int pattern = 0; pattern < 3; ++pattern) {
      for (int stages = 1; stages <= 3; ++stages) {
        for (int delay : {0, 2600, 3800}) {
          Args a;
          a.block_ids = ids_dev;
          a.share = pattern == 0 ? 1 : 2;
          a.multicast = pattern == 2;
          a.stages = stages;
          a.delay = delay;
          a.clock_info = clock_dev;
          const int grid = sms / a.share * a.share;
          a.blocks_per_part = num_blocks / (grid / a.share);
          cudaLaunchConfig_t cfg = {};
          cfg.gridDim = dim3(grid);
          cfg.blockDim = dim3(64);
          cfg.dynamicSmemBytes = stages * kBlockBytes + 2048;
          cudaLaunchAttribute attr[1];
          attr[0].id = cudaLaunchAttributeClusterDimension;
          attr[0].val.clusterDim.x = a.multicast ? 2 : 1;
          attr[0].val.clusterDim.y = 1;
          attr[0].val.clusterDim.z = 1;
          cfg.attrs = attr;
          cfg.numAttrs = 1;
          std::vector<float> times;
          for (int rep = 0; rep < 6; ++rep) {
            CHECK(cudaEventRecord(e0));
            CHECK(cudaLaunchKernelEx(&cfg, stream_kernel, map, a));
            CHECK(cudaEventRecord(e1));
            CHECK(cudaEventSynchronize(e1));
            float ms;
            CHECK(cudaEventElapsedTime(&ms, e0, e1));
            if (rep > 0) times.push_back(ms);
          }
          CHECK(cudaGetLastError());
          std::sort(times.begin(), times.end());
          const double us = times[times.size() / 2] * 1e3;
          CHECK(cudaMemcpy(clock_host.data(), clock_dev, grid * 2 * sizeof(unsigned long long),
                           cudaMemcpyDeviceToHost));
          double mhz = 0;
          for (int i = 0; i < grid; ++i) mhz += double(clock_host[2 * i]) / clock_host[2 * i + 1];
          mhz = mhz / grid * 1e3;
          const double smem_bytes = double(grid) * a.blocks_per_part * kBlockBytes;
          const double l2_bytes = a.multicast ? smem_bytes / 2 : smem_bytes;
          std::printf("%-10s %-5s %6d %6d %10.1f %12.3f %12.0f %12.0f %8.0f\n", patterns[pattern],
                      footprint == num_blocks ? "dram" : "l2", stages, delay, us,
                      us / a.blocks_per_part, smem_bytes / us / 1e3, l2_bytes / us / 1e3, mhz);
        }
      }
    }
  }
  return 0;
}
