// Host-visible pieces of the dense decode kernel: its argument block and query tiling.
// Free of CuTe so that the launcher compiles quickly; the kernel header includes it.
#pragma once

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/sm90/decode_dense/decode_dense.cuh"

namespace jfm::sm90::decode_dense {

// How the query rows of one KV head are cut into tiles of at most 64 rows: a tile holds
// `heads_per_tile` consecutive heads of `s_per_tile` consecutive query tokens (row r of the
// tile is token s0 + r / heads_per_tile, head j0 + r % heads_per_tile of the group).
struct TileShape {
  int group;           // h_q / h_kv query heads per KV head
  int heads_per_tile;
  int s_per_tile;
  int head_tiles;      // tiles across the group's heads
  int64_t num_tiles;   // tiles per (request, KV head)
};

inline TileShape tile_shape(int64_t s_q, int64_t h_q, int64_t h_kv) {
  TileShape t;
  const int64_t group = h_q / h_kv;
  if (group >= kQueryTileRows) {
    t.heads_per_tile = kQueryTileRows;
    t.s_per_tile = 1;
    t.head_tiles = static_cast<int>((group + kQueryTileRows - 1) / kQueryTileRows);
    t.num_tiles = s_q * t.head_tiles;
  } else {
    t.heads_per_tile = static_cast<int>(group);
    t.s_per_tile = static_cast<int>(s_q < kQueryTileRows / group ? s_q : kQueryTileRows / group);
    t.head_tiles = 1;
    t.num_tiles = (s_q + t.s_per_tile - 1) / t.s_per_tile;
  }
  t.group = static_cast<int>(group);
  return t;
}

// How the loaders bring a cache's 64-token KV blocks into shared memory, by page size.
enum class BlockLoader {
  kWholePages,  // pages a multiple of 64 tokens: a block is part of one page, one TMA box a chunk
  kPageBoxes,   // pages of 16 or 32 tokens: a block is 64 / page pages, one TMA box a page a chunk
  kGather,      // any other page: token by token with cp.async (a block may start mid-page)
};

// The smallest page loaded by TMA boxes. A smaller page (1, 2, 8) would take 72 or more boxes a
// block; the gather copies those.
constexpr int64_t kMinBoxTokens = 16;

inline BlockLoader block_loader(int64_t page) {
  if (page % kSchedulerBlockTokens == 0) return BlockLoader::kWholePages;
  if (page >= kMinBoxTokens && kSchedulerBlockTokens % page == 0) return BlockLoader::kPageBoxes;
  return BlockLoader::kGather;
}

// Rows of one TMA box of the KV map: a whole block, or a whole page where pages are smaller.
inline int64_t box_tokens(int64_t page) {
  return block_loader(page) == BlockLoader::kWholePages ? kSchedulerBlockTokens : page;
}

struct KernelArgs {
  CUtensorMap q_map;   // [batch * s_q, h_kv, group, 576] viewed 4-D, box {64, hpt, 1, spt}
  CUtensorMap kv_map;  // [num_blocks * page, h_kv, 576] viewed 3-D, box {64, 1, box_tokens};
                       // unset where blocks are gathered
  DenseDecodeParams params;
  TileShape tile;
  float scale_log2;        // softmax_scale * log2(e)
  int32_t seq_capacity;    // tokens the block table covers: max_blocks_per_seq * page, <= INT32_MAX
  int32_t page;            // tokens per cache block
  int32_t partial_rows;    // rows of partial_o / partial_lse: batch + num_parts
  uint64_t kv_cache_hint;  // L2 eviction policy of the KV loads (set by launch_typed)
};

// Implemented per element type in decode_dense_bf16.cu / decode_dense_f16.cu.
template <typename Element>
cudaError_t launch_typed(const KernelArgs& args, cudaStream_t stream);

}  // namespace jfm::sm90::decode_dense
