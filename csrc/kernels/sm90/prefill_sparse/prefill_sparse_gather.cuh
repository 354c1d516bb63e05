// The sparse prefill kernels' loaders (forward and backward): the query-side head tiles by
// TMA, and the gather, in which a loader warpgroup copies a token's blocks of 64 selected kv
// rows straight into a shared-memory stage of 64-dim chunks (row_gather.cuh), the rows of a
// block by the 8 threads of lane group `lane / 8`. A slot that selects nothing (not counted,
// or an index outside [0, s_kv)) is zero-filled: no byte of it is read.
#pragma once

#include <cstdint>

#include "kernels/sm90/hopper.cuh"
#include "kernels/sm90/mla_tile.cuh"
#include "kernels/sm90/row_gather.cuh"

namespace jfm::sm90::prefill_sparse {

constexpr int kBlockSlots = 64;   // selected rows per KV block (one 64-row chunk high)
constexpr int kLoaderThreads = 128;
constexpr int kRowThreads = 8;  // loader threads per row: 8 x 16 bytes = 64 dims of one chunk

// Rows per loader thread in a block of kSlots slots (a multiple of 16): 4 at 64 slots.
template <int kSlots = kBlockSlots>
constexpr int kPasses = kSlots * kRowThreads / kLoaderThreads;

// Slots of token `token` that count: clamp(topk_length[token], 0, topk), or topk.
__device__ __forceinline__ int counted_slots(const int32_t* topk_length, int64_t topk,
                                             int64_t token) {
  return topk_length == nullptr ? static_cast<int>(topk)
                                : min(max(topk_length[token], 0), static_cast<int>(topk));
}

__device__ __forceinline__ int32_t load_index(const int32_t* address) {
  int32_t v;
  asm volatile("ld.global.nc.L1::no_allocate.s32 %0, [%1];" : "=r"(v) : "l"(address));
  return v;
}

// The row of a block of kSlots slots that loader thread (warp, lane) copies in pass `pass`:
// loader warp w copies rows kSlots / 4 * w onwards.
template <int kSlots = kBlockSlots>
__device__ __forceinline__ int loader_row(int warp, int lane, int pass) {
  return warp * (kSlots / 4) + pass * 4 + lane / kRowThreads;
}

// This thread's slot indices of block `blk`, -1 where a slot does not count.
template <int kSlots = kBlockSlots>
struct BlockSlots {
  int32_t index[kPasses<kSlots>];
};

template <int kSlots>
__device__ __forceinline__ BlockSlots<kSlots> block_slots(const int32_t* token_indices,
                                                          int counted, int blk, int warp,
                                                          int lane) {
  BlockSlots<kSlots> b;
#pragma unroll
  for (int pass = 0; pass < kPasses<kSlots>; ++pass) {
    const int slot = blk * kSlots + loader_row<kSlots>(warp, lane, pass);
    b.index[pass] = slot < counted ? load_index(token_indices + slot) : -1;
  }
  return b;
}

__device__ __forceinline__ bool selects_row(int32_t index, int64_t s_kv) {
  return index >= 0 && index < s_kv;
}

// Issues this thread's copies of one block into the stage at `stage_base` (kv: the kv array,
// rows of kHeadDimQK bf16; the stage's chunks kSlots rows high) and returns the warp's
// kSlots / 4 attending bits (bit r: its row r selects a kv row), the same in every lane.
template <int kHeadDimQK, int kSlots>
__device__ __forceinline__ uint32_t gather_block(const uint8_t* kv, int64_t s_kv,
                                                 const BlockSlots<kSlots>& slots,
                                                 uint32_t stage_base, int warp, int lane) {
  constexpr int kQKChunks = kHeadDimQK / kChunkElems;
  constexpr int64_t kRowBytes = kHeadDimQK * 2;
  const int j = lane % kRowThreads;
  uint32_t attending = 0;
#pragma unroll
  for (int pass = 0; pass < kPasses<kSlots>; ++pass) {
    const int row = loader_row<kSlots>(warp, lane, pass);
    const int32_t index = slots.index[pass];
    const bool selects = selects_row(index, s_kv);
    // A slot that selects nothing reads no byte: its row is zero-filled from row 0's address.
    const uint8_t* src = kv + j * 16 + (selects ? index : 0) * kRowBytes;
    attending |= copy_row_units<kQKChunks, kSlots * 128>(stage_base, row, j, src, selects)
                 << (4 * pass);
  }
  return attending;
}

// One thread: TMA loads of the `kChunks` 64-dim chunks of the 64-row head tile at `head0` of
// token `token` ([s_q, h_q, d] through `map`) into consecutive chunks at `dst`, completing on
// `bar` (whose expected bytes the caller sets).
template <int kChunks>
__device__ __forceinline__ void load_head_tile(uint8_t* dst, const CUtensorMap* map,
                                               uint64_t* bar, int head0, int64_t token) {
  for (int c = 0; c < kChunks; ++c) {
    tma_load_3d(dst + c * kChunkBytes, map, bar, c * kChunkElems, head0,
                static_cast<int>(token), kCacheEvictNormal);
  }
}

// The loader warpgroup's walk over a token's `blocks` blocks, the CTA's blocks `first` onwards
// (a persistent CTA counts on from its earlier tokens' blocks): block blk goes into stage
// n % kStages, n = first + blk (stage s at stage0 + s * stage_bytes, barriers kv_full[s] and
// kv_empty[s]) once the math warpgroups have freed it; each thread arrives on kv_full once its
// copies land, and `publish(blk, stage, slots, attending)` stores what the math warpgroups need
// beside the rows (the mask, row numbers), then arrives on kv_full from the threads that
// stored. Slot indices are read a block ahead. Copies may still be in flight on return (the
// caller waits for them before it exits). Blocks are kSlots slots (stage chunks kSlots rows).
template <int kHeadDimQK, int kStages, int kSlots = kBlockSlots, class Publish>
__device__ __forceinline__ void gather_token_blocks(const int32_t* token_indices, int counted,
                                                    int blocks, uint32_t first,
                                                    const uint8_t* kv,
                                                    int64_t s_kv, uint32_t stage0,
                                                    uint32_t stage_bytes, uint64_t* kv_full,
                                                    uint64_t* kv_empty, int warp, int lane,
                                                    Publish publish) {
  BlockSlots<kSlots> slots = block_slots<kSlots>(token_indices, counted, 0, warp, lane);
  for (int blk = 0; blk < blocks; ++blk) {
    const uint32_t n = first + blk;
    const int stage = n % kStages;
    BlockSlots<kSlots> next = slots;
    if (blk + 1 < blocks) next = block_slots<kSlots>(token_indices, counted, blk + 1, warp, lane);
    mbarrier_wait(&kv_empty[stage], (n / kStages % 2) ^ 1);
    const uint32_t attending = gather_block<kHeadDimQK, kSlots>(
        kv, s_kv, slots, stage0 + stage * stage_bytes, warp, lane);
    cp_async_arrive(&kv_full[stage]);
    publish(blk, stage, slots, attending);
    slots = next;
  }
}

}  // namespace jfm::sm90::prefill_sparse
