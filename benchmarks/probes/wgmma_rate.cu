// Probe: issue rate of the wgmma shapes the dense decode uses, one CTA per SM, one or two
// warpgroups issuing at once, operands in shared memory (128-byte swizzle, as the kernel lays
// them out). Prints cycles per instruction and the fraction of the SM's dense bf16 peak
// (2048 FMA per cycle). Answers: is S = Q K^T (m64n64k16, both operands from shared memory)
// at the tensor peak, and what do two warpgroups get when they issue together?
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \
//       -Icsrc -I$CUTLASS/include -o /tmp/wgmma_rate benchmarks/probes/wgmma_rate.cu
//   /tmp/wgmma_rate
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <utility>

#include <cute/arch/mma_sm90_gmma.hpp>

#include "kernels/sm90/hopper.cuh"

using namespace jfm::sm90;
namespace GMMA = cute::SM90::GMMA;

using Mma64 = GMMA::MMA_64x64x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::K>;
using Mma128 = GMMA::MMA_64x128x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::K>;
using Mma256SS = GMMA::MMA_64x256x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::MN>;
using Mma256RS = GMMA::MMA_64x256x16_F32BF16BF16_RS<GMMA::Major::K, GMMA::Major::MN>;

template <typename Mma, size_t... I>
__device__ __forceinline__ void ss(uint64_t a, uint64_t b, float* d, std::index_sequence<I...>) {
  Mma::fma(a, b, d[I]..., GMMA::ScaleOut::One);
}
template <typename Mma, size_t... I>
__device__ __forceinline__ void rs(const uint32_t* a, uint64_t b, float* d,
                                   std::index_sequence<I...>) {
  Mma::fma(a[0], a[1], a[2], a[3], b, d[I]..., GMMA::ScaleOut::One);
}

constexpr int kReps = 64;
constexpr int kSmem = 200 * 1024;

// kind 0: 36 x m64n64k16 SS (S of one 64-token block); 1: 18 x m64n128k16 SS (S of two
// blocks, same FLOPs); 2: 4 x m64n256k16 SS (half of P V); 3: 4 x m64n256k16 RS.
template <int kKind>
__global__ void __launch_bounds__(256, 1) rate_kernel(int issuing_wgs, unsigned long long* out,
                                                      float* sink) {
  extern __shared__ __align__(1024) uint8_t smem[];
  for (int i = threadIdx.x; i < kSmem / 16; i += blockDim.x) {
    reinterpret_cast<uint4*>(smem)[i] = make_uint4(0x3c003c00u, 0, 0x3c003c00u, 0);
  }
  __syncthreads();
  const int wg = threadIdx.x / 128;
  if (wg >= issuing_wgs) return;
  const uint32_t base = smem_address(smem) + wg * 8192;  // the two warpgroups read apart
  constexpr int kAcc = kKind == 0 ? 32 : kKind == 1 ? 64 : 128;
  float d[kAcc];
  for (int i = 0; i < kAcc; ++i) d[i] = 0.f;
  uint32_t a_regs[4] = {0x3c003c00u, 0x3c003c00u, 0x3c003c00u, 0x3c003c00u};
  const unsigned long long t0 = clock64();
  for (int r = 0; r < kReps; ++r) {
    wgmma_fence();
    if constexpr (kKind == 0) {
#pragma unroll
      for (int i = 0; i < 36; ++i) {
        const uint64_t a = smem_desc_sw128(base + (i / 4) * 8192 + (i % 4) * 32, 0, 1024);
        const uint64_t b = smem_desc_sw128(base + 81920 + (i / 4) * 8192 + (i % 4) * 32, 0, 1024);
        ss<Mma64>(a, b, d, std::make_index_sequence<kAcc>{});
      }
    } else if constexpr (kKind == 1) {
#pragma unroll
      for (int i = 0; i < 18; ++i) {
        const uint64_t a = smem_desc_sw128(base + (i / 2) * 8192 + (i % 2) * 32, 0, 1024);
        // 128 rows of B per chunk; 4 chunks reused so that it fits the buffer.
        const uint64_t b =
            smem_desc_sw128(base + 81920 + (i / 2 % 4) * 16384 + (i % 2) * 32, 0, 1024);
        ss<Mma128>(a, b, d, std::make_index_sequence<kAcc>{});
      }
    } else if constexpr (kKind == 2) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint64_t a = smem_desc_sw128(base + k * 32, 0, 1024);
        const uint64_t b = smem_desc_sw128(base + 81920 + k * 2048, 8192, 1024);
        ss<Mma256SS>(a, b, d, std::make_index_sequence<kAcc>{});
      }
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint64_t b = smem_desc_sw128(base + 81920 + k * 2048, 8192, 1024);
        rs<Mma256RS>(a_regs, b, d, std::make_index_sequence<kAcc>{});
      }
    }
    wgmma_commit();
    wgmma_wait<0>();
    for (int i = 0; i < kAcc; ++i) pin(d[i]);
  }
  const unsigned long long t1 = clock64();
  float acc = 0.f;
  for (int i = 0; i < kAcc; ++i) acc += d[i];
  sink[blockIdx.x * 256 + threadIdx.x] = acc;
  if (threadIdx.x % 128 == 0 && blockIdx.x == 0) out[wg] = t1 - t0;
}

template <int kKind>
void run(const char* name, int instructions, double flop_per_instruction, int sms) {
  unsigned long long* out;
  float* sink;
  cudaMalloc(&out, 2 * sizeof(unsigned long long));
  cudaMalloc(&sink, sms * 256 * sizeof(float));
  cudaFuncSetAttribute(rate_kernel<kKind>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  for (int wgs = 1; wgs <= 2; ++wgs) {
    for (int warm = 0; warm < 3; ++warm) rate_kernel<kKind><<<sms, 256, kSmem>>>(wgs, out, sink);
    cudaDeviceSynchronize();
    unsigned long long cycles[2] = {0, 0};
    cudaMemcpy(cycles, out, sizeof(cycles), cudaMemcpyDeviceToHost);
    const double per = double(cycles[0]) / (kReps * instructions);
    // Peak: 2048 bf16 FMA = 4096 FLOP per cycle per SM, shared by the issuing warpgroups.
    const double peak_fraction = flop_per_instruction * wgs / (per * 4096.0);
    std::printf("%-28s %d WG: %6.1f cycles per instruction, %.2f of peak\n", name, wgs, per,
                peak_fraction);
  }
  cudaFree(out);
  cudaFree(sink);
}

int main() {
  int sms;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  run<0>("m64n64k16 SS (S, 1 block)", 36, 2.0 * 64 * 64 * 16, sms);
  run<1>("m64n128k16 SS (S, 2 blocks)", 18, 2.0 * 64 * 128 * 16, sms);
  run<2>("m64n256k16 SS (P V half)", 4, 2.0 * 64 * 256 * 16, sms);
  run<3>("m64n256k16 RS (P V half)", 4, 2.0 * 64 * 256 * 16, sms);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) std::printf("CUDA error: %s\n", cudaGetErrorString(err));
  return 0;
}
