// Extra Hopper wrappers the staged seesaw kernel uses (predicated TMA and mbarrier arrive,
// ldmatrix, stmatrix); lives with the variant until the variant is adopted.
#pragma once

#include <cstdint>

#include <cuda.h>

#include "kernels/sm90/hopper.cuh"

namespace jfm::sm90 {

// ---- predicated forms (no branch: usable while wgmma is in flight) ----------------------
__device__ __forceinline__ void mbarrier_arrive_expect_tx_if(bool pred, uint64_t* bar,
                                                             uint32_t bytes) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %0, 0;\n"
      "@p mbarrier.arrive.expect_tx.shared::cta.b64 _, [%1], %2;\n}\n" ::"r"(
          static_cast<int>(pred)),
      "r"(smem_address(bar)), "r"(bytes)
      : "memory");
}

__device__ __forceinline__ void tma_load_3d_if(bool pred, void* smem_dst, const CUtensorMap* map,
                                               uint64_t* bar, int32_t c0, int32_t c1, int32_t c2,
                                               uint64_t cache_hint) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %0, 0;\n"
      "@p cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
      ".L2::cache_hint [%1], [%2, {%4, %5, %6}], [%3], %7;\n}\n" ::"r"(static_cast<int>(pred)),
      "r"(smem_address(smem_dst)), "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_address(bar)),
      "r"(c0), "r"(c1), "r"(c2), "l"(cache_hint)
      : "memory");
}

// ---- ldmatrix / stmatrix: 8 x 8 matrices of 16-bit values in the mma fragment layout ---------
// Lane l gives the address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void ldmatrix_x4(const void* row_address, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row_address))
               : "memory");
}
__device__ __forceinline__ void stmatrix_x4(void* row_address, uint32_t r0, uint32_t r1,
                                            uint32_t r2, uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(
                   smem_address(row_address)),
               "r"(r0), "r"(r1), "r"(r2), "r"(r3)
               : "memory");
}

}  // namespace jfm::sm90
