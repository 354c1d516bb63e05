// Gathering rows into a shared-memory stage of 64-dim chunks (64 rows x 128 bytes, 128-byte
// swizzled: 16-byte unit u of row r at unit u ^ (r % 8), the layout wgmma reads) with 16-byte
// cp.async, 8 threads per row: the loaders of the dense decode (pages that are not a multiple of
// 64 tokens) and of the sparse prefill kernels.
#pragma once

#include <cstdint>

#include "kernels/sm90/hopper.cuh"
#include "kernels/sm90/mla_tile.cuh"

namespace jfm::sm90 {

// Thread j of the 8 that copy row `row`: 16-byte unit j of each of the `kChunks` chunk rows of
// `src` (chunk c at src + c * 128) into the stage at `stage` (its chunks kStageChunkBytes
// apart), or, where `copies` is false, zeros without reading `src`. Returns the pass's 4 row
// bits, the same in every lane: bit g says whether lane group g (lanes 8g..8g+7) copied its row.
template <int kChunks, int kStageChunkBytes = kChunkBytes>
__device__ __forceinline__ uint32_t copy_row_units(uint32_t stage, int row, int j,
                                                   const uint8_t* src, bool copies) {
  const uint32_t dst = stage + row * 128 + ((j ^ (row % 8)) << 4);
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    cp_async_16(dst + c * kStageChunkBytes, src + c * 128, copies ? 16 : 0);
  }
  const uint32_t ballot = __ballot_sync(0xffffffffu, copies);
  return (ballot & 1u) | ((ballot >> 7) & 2u) | ((ballot >> 14) & 4u) | ((ballot >> 21) & 8u);
}

}  // namespace jfm::sm90
