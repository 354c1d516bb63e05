// The dense MLA decode kernel for sm_90a. Included by one translation unit per element type.
//
// Roles (384 threads, three warpgroups), one device function each:
//   load_role (WG0): TMA loads of the query tile (one thread) and of every 64-token KV block (9
//     chunks of 64 dims x 64 rows, 128-byte swizzled) into a 2-stage ring: by TMA where pages
//     hold whole blocks or a block is whole pages of 16 or 32 tokens (one thread,
//     load_block_tma), else gathered token by token with cp.async by all 128 threads
//     (gather_block). Beside each stage, the mask of its rows that hold a loaded token; a token
//     whose page id is out of range is never read.
//   WG1, the score warpgroup: issue_scores (S = Q K^T on wgmma, both operands in shared
//     memory), online_softmax (fp32, against a lazily raised reference max: O is rescaled only
//     when a row's scores pass its reference by more than 2^8, so almost never after the first
//     blocks), publish_p (P to WG2 through shared memory, in the block's RoPE chunk, which
//     nothing reads once S is done), then accumulate_pv for O[:, 0:256] with P from registers.
//   WG2, the value warpgroup: receive_p (rescales O[:, 256:512] by WG1's per-row factors when
//     one is not 1, reads P back into registers), then accumulate_pv for O[:, 256:512].
//   Both: finish_request, the epilogue (row sums shared, outputs normalised and stored).
// So the tensor cores alternate between WG1's S of block j+1 and WG2's half of P V of block j.
// The query tiles that share a KV head run as CTA pairs of one cluster (launch_typed), so that
// each KV block comes from DRAM once.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "kernels/common/combine.cuh"
#include "kernels/common/launch.cuh"
#include "kernels/common/schedule_piece.cuh"
#include "kernels/common/span.cuh"
#include "kernels/sm90/decode_dense/decode_dense_args.cuh"
#include "kernels/sm90/hopper.cuh"
#include "kernels/sm90/mla_tile.cuh"
#include "kernels/sm90/row_gather.cuh"

namespace jfm::sm90::decode_dense {

constexpr int kBlockTokens = kChunkElems;              // tokens per KV block: one chunk high
constexpr int kQKChunks = kHeadDimQK / kChunkElems;   // 9
constexpr int kTileBytes = kQKChunks * kChunkBytes;   // a 64 x 576 tile
constexpr int kRopeChunk = kQKChunks - 1;             // holds P once S is computed
constexpr int kStages = 2;
constexpr int kThreads = 384;
constexpr int kLoaderThreads = 128;
constexpr int kRowThreads = 8;  // gathering loader threads per row: 8 x 16 bytes per chunk row
static_assert(kBlockTokens == kSchedulerBlockTokens, "a KV block is the scheduler's unit");

struct alignas(1024) SharedStorage {
  uint8_t q[kTileBytes];
  uint8_t kv[kStages][kTileBytes];
  float row_factor[kStages][kQueryTileRows];  // exp2(m_old - m_new) per row and block
  float row_sum[2][kQueryTileRows];           // final softmax denominators, per request parity
  uint64_t kv_full[kStages];
  uint64_t kv_empty[kStages];
  uint64_t q_full;
  uint64_t q_empty;
  uint64_t kv_rows[kStages];  // bit r: row r of the stage holds a loaded token
};

// ---- The schedule ---------------------------------------------------------------------------

// What a part does for request `req`: its block range and result row (schedule_piece.cuh)
// and the tokens it attends.
struct RequestWork : RequestPiece {
  int length;  // tokens attended: cache_seqlens[req] clamped to [0, seq_capacity]
};

__device__ __forceinline__ RequestWork request_work(const KernelArgs& args,
                                                    const MetadataRow& part, int req) {
  const DenseDecodeParams& p = args.params;
  RequestWork w;
  w.length = min(max(p.cache_seqlens[req], 0), args.seq_capacity);
  const int blocks = w.length / kBlockTokens + (w.length % kBlockTokens != 0);
  static_cast<RequestPiece&>(w) = request_piece(part, req, blocks, p.num_splits, args.partial_rows);
  return w;
}

// ---- Load role ------------------------------------------------------------------------------

// Where a request's KV blocks come from: its block-table row, its length and the KV head.
struct BlockLoad {
  const int32_t* table;  // the request's block table row
  int length;            // tokens attended
  int last_page;         // the table entry of the request's last token
  int kv_head;
};

// The pages of one KV block loaded by TMA: one (a block is part of a page of 64 or more
// tokens), or 64 / page whole pages of 16 or 32 tokens, each its own box of every chunk.
template <BlockLoader kLoader>
struct BlockPages {
  static constexpr int kMax = kLoader == BlockLoader::kPageBoxes ? kBlockTokens / kMinBoxTokens : 1;
  int box_tokens;    // rows of one page's box
  int32_t id[kMax];  // page ids; -1 past the block's pages or the length
};

// The page ids of block `blk`, read before the loader waits for a stage so that the table
// reads overlap the wait. Every entry is read unconditionally (clamped to the request's last
// page), so the reads are in flight together rather than one after another.
template <BlockLoader kLoader>
__device__ __forceinline__ BlockPages<kLoader> block_pages(const KernelArgs& args,
                                                           const BlockLoad& load, int blk) {
  BlockPages<kLoader> pages;
  pages.box_tokens = kLoader == BlockLoader::kPageBoxes ? args.page : kBlockTokens;
  const int first_token = blk * kBlockTokens;
  const int first = first_token / args.page;  // the block's first block-table entry
  int32_t entry[pages.kMax];
#pragma unroll
  for (int i = 0; i < pages.kMax; ++i) entry[i] = load.table[min(first + i, load.last_page)];
#pragma unroll
  for (int i = 0; i < pages.kMax; ++i) {
    const int token = first_token + i * pages.box_tokens;
    pages.id[i] = i * pages.box_tokens < kBlockTokens && token < load.length ? entry[i] : -1;
  }
  return pages;
}

// One thread: block `blk` by TMA, 9 chunks of 64 dims from each of its pages (a box of a page
// lands at its rows of the chunk; chunks and those rows sit at multiples of 1024 bytes, so the
// 128-byte swizzle is that of a whole-block box). A page past the length or whose id is out of
// range is not read: its rows stay out of the stage's row mask, and a block with no page loaded
// has its full barrier completed by a plain arrival.
template <BlockLoader kLoader>
__device__ __forceinline__ void load_block_tma(const KernelArgs& args, SharedStorage& smem,
                                               int stage, const BlockLoad& load, int blk,
                                               const BlockPages<kLoader>& pages) {
  const DenseDecodeParams& p = args.params;
  const uint64_t box_rows = ~0ull >> (kBlockTokens - pages.box_tokens);
  uint64_t rows = 0;
#pragma unroll
  for (int i = 0; i < pages.kMax; ++i) {
    if (pages.id[i] >= 0 && pages.id[i] < p.num_blocks) rows |= box_rows << (i * pages.box_tokens);
  }
  smem.kv_rows[stage] = rows;  // published by the arrival below (release)
  if (rows == 0) {
    mbarrier_arrive(&smem.kv_full[stage]);
    return;
  }
  mbarrier_arrive_expect_tx(&smem.kv_full[stage], __popcll(rows) * kQKChunks * 128);
#pragma unroll
  for (int i = 0; i < pages.kMax; ++i) {
    if (((rows >> (i * pages.box_tokens)) & 1) == 0) continue;
    const int token = blk * kBlockTokens + i * pages.box_tokens;
    const int row = pages.id[i] * args.page + token % args.page;
    uint8_t* dst = smem.kv[stage] + i * pages.box_tokens * 128;
    for (int c = 0; c < kQKChunks; ++c) {
      tma_load_3d(dst + c * kChunkBytes, &args.kv_map, &smem.kv_full[stage], c * kChunkElems,
                  load.kv_head, row, args.kv_cache_hint);
    }
  }
}

// All 128 loader threads: block `blk` token by token with cp.async, for pages that are not a
// multiple of 64 tokens (a block spans pages). Row r goes to the 8 threads of lane group
// lane / 8 of warp r / 16: thread j copies 16-byte unit j of each chunk row into unit
// j ^ (r % 8). A row whose token is past the length or whose page id is out of range is
// zero-filled without a read. Each thread arrives on the full barrier once its copies land;
// lane 0 of each warp stores its 16 bits of the row mask and arrives too.
template <typename Element>
__device__ __forceinline__ void gather_block(const KernelArgs& args, SharedStorage& smem,
                                             int stage, const BlockLoad& load, int blk) {
  const DenseDecodeParams& p = args.params;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, j = lane % kRowThreads;
  const int64_t row_bytes = p.h_kv * kHeadDimQK * static_cast<int64_t>(sizeof(Element));
  const uint8_t* head = static_cast<const uint8_t*>(p.k_cache) +
                        load.kv_head * kHeadDimQK * static_cast<int64_t>(sizeof(Element)) + j * 16;
  const uint32_t stage_base = smem_address(smem.kv[stage]);
  uint32_t rows = 0;
#pragma unroll 1  // one row at a time: the loaders have 40 registers
  for (int pass = 0; pass < kBlockTokens * kRowThreads / kLoaderThreads; ++pass) {
    const int row = warp * 16 + pass * 4 + lane / kRowThreads;
    const int token = blk * kBlockTokens + row;
    const uint32_t page_index = static_cast<uint32_t>(token) / static_cast<uint32_t>(args.page);
    const int32_t physical = token < load.length ? load.table[page_index] : -1;
    const bool loads = physical >= 0 && physical < p.num_blocks;
    const int64_t cache_row =
        loads ? int64_t{physical} * args.page + (token - page_index * args.page) : 0;
    const uint8_t* src = head + cache_row * row_bytes;
    rows |= copy_row_units<kQKChunks>(stage_base, row, j, src, loads) << (4 * pass);
  }
  cp_async_arrive(&smem.kv_full[stage]);
  if (lane == 0) {
    reinterpret_cast<uint16_t*>(&smem.kv_rows[stage])[warp] = static_cast<uint16_t>(rows);
    mbarrier_arrive(&smem.kv_full[stage]);
  }
}

// Arrivals that complete a stage's full barrier: the TMA thread, or every gathering thread and
// lane 0 of each loader warp.
template <BlockLoader kLoader>
constexpr uint32_t kFullArrivals =
    kLoader == BlockLoader::kGather ? kLoaderThreads + kLoaderThreads / 32 : 1;

// WG0: for each request with work, the query tile (thread 0), then its KV blocks through the
// stage ring (thread 0 by TMA, or all 128 threads gathering).
template <typename Element, BlockLoader kLoader>
__device__ __forceinline__ void load_role(const KernelArgs& args, SharedStorage& smem,
                                          const MetadataRow& part, int kv_head, int s0, int j0) {
  const DenseDecodeParams& p = args.params;
  const TileShape& tile = args.tile;
  constexpr bool kGather = kLoader == BlockLoader::kGather;
  if (!kGather && threadIdx.x != 0) return;
  if (threadIdx.x == 0) {
    prefetch_tensor_map(&args.q_map);
    if (!kGather) prefetch_tensor_map(&args.kv_map);
  }
  const uint32_t q_bytes = kQKChunks * 128 * tile.heads_per_tile * tile.s_per_tile;
  int stage = 0;
  uint32_t kv_phase = 0, q_phase = 0;
  for (int req = part.begin_req; req <= part.end_req; ++req) {
    const RequestWork w = request_work(args, part, req);
    if (w.lo >= w.hi) continue;
    if (threadIdx.x == 0) {
      mbarrier_wait(&smem.q_empty, q_phase ^ 1);
      mbarrier_arrive_expect_tx(&smem.q_full, q_bytes);
      for (int c = 0; c < kQKChunks; ++c) {
        tma_load_4d(smem.q + c * kChunkBytes, &args.q_map, &smem.q_full, c * kChunkElems, j0,
                    kv_head, static_cast<int>(req * p.s_q + s0));
      }
    }
    q_phase ^= 1;
    const BlockLoad load{p.block_table + req * p.max_blocks_per_seq, w.length,
                         (w.length - 1) / args.page, kv_head};
    for (int blk = w.lo; blk < w.hi; ++blk) {
      if constexpr (kGather) {
        mbarrier_wait(&smem.kv_empty[stage], kv_phase ^ 1);
        gather_block<Element>(args, smem, stage, load, blk);
      } else {
        const BlockPages<kLoader> pages = block_pages<kLoader>(args, load, blk);
        mbarrier_wait(&smem.kv_empty[stage], kv_phase ^ 1);
        load_block_tma<kLoader>(args, smem, stage, load, blk, pages);
      }
      if (++stage == kStages) {
        stage = 0;
        kv_phase ^= 1;
      }
    }
  }
  if (kGather) cp_async_wait_all();  // no copy in flight when the thread exits
}

// ---- Math warpgroups ------------------------------------------------------------------------

// A math thread's place in the 64-row tile: its accumulator rows and the query token and head
// of each.
struct ThreadRows : AccumulatorRows {
  int token[2];     // query token of each row
  int head[2];      // query head of each row
  bool valid[2];    // the row is a real (token, head) of this tile
};

__device__ __forceinline__ ThreadRows thread_rows(const TileShape& tile, int64_t s_q, int kv_head,
                                                  int s0, int j0) {
  ThreadRows t;
  static_cast<AccumulatorRows&>(t) = accumulator_rows();
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int s = s0 + t.rows[h] / tile.heads_per_tile;
    const int j = j0 + t.rows[h] % tile.heads_per_tile;
    t.valid[h] = t.rows[h] < tile.heads_per_tile * tile.s_per_tile && s < s_q && j < tile.group;
    t.token[h] = s;
    t.head[h] = kv_head * tile.group + j;
  }
  return t;
}

// A block loaded by TMA comes in whole pages: its rows past the sequence end, and those of a page
// that was not loaded, may hold anything (NaN). Zero the V part of every row not in `keep` so
// that 0 * NaN cannot reach the output through P V. (The gather zero-fills every row it does
// not load.)
__device__ __forceinline__ void zero_values_except(uint8_t* kv, uint64_t keep) {
  const int first = __ffsll(static_cast<long long>(~keep)) - 1;  // first row to zero
  const int units = (kBlockTokens - first) * (kHeadDimV / 8);
  for (int u = threadIdx.x % 128; u < units; u += 128) {
    const int row = first + u / (kHeadDimV / 8);
    if ((keep >> row) & 1) continue;
    const int piece = u % (kHeadDimV / 8);  // 16-byte piece of the row's V
    const int chunk = piece / 8, unit = piece % 8;
    *reinterpret_cast<uint4*>(kv + chunk * kChunkBytes + row * 128 + unit * 16) =
        make_uint4(0, 0, 0, 0);
  }
  fence_proxy_async_smem();  // the zeros before the wgmma reads of V
}

// Epilogue of one request: WG1 shares the final row sums, both warpgroups normalise their half
// of O and store it: the output and lse of an unsplit request, else its fp32 partial row.
template <typename Element>
__device__ __forceinline__ void finish_request(const KernelArgs& args, SharedStorage& smem,
                                               const RequestWork& w, int req, bool score_wg,
                                               const ThreadRows& t, int& request_parity,
                                               SoftmaxRows& rows, const float (&o)[kAccumulators]) {
  const DenseDecodeParams& p = args.params;
  share_row_sums(score_wg, t, smem.row_sum[request_parity], rows);
  request_parity ^= 1;
  const int col0 = score_wg ? 0 : kHalfV;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (!t.valid[h]) continue;
    const float inv = rows.sum[h] > 0.f ? 1.f / rows.sum[h] : 0.f;
    const int64_t row_index =
        (static_cast<int64_t>(w.split ? w.split_row : req) * p.s_q + t.token[h]) * p.h_q +
        t.head[h];
    if (w.split) {
      store_partial_row(p.partial_o + row_index * kHeadDimV + col0 + t.quad_col, o, h, inv);
    } else {
      store_output_row(static_cast<Element*>(p.out) + row_index * kHeadDimV + col0 + t.quad_col,
                       o, h, inv);
    }
    if (score_wg && t.lane % 4 == 0) {
      const bool lonely = rows.sum[h] == 0.f;
      const float lse = (rows.max[h] + log2f(rows.sum[h])) * kLn2;
      if (w.split) {
        p.partial_lse[row_index] = lonely ? -INFINITY : lse;
      } else {
        p.lse[(static_cast<int64_t>(req) * p.h_q + t.head[h]) * p.s_q + t.token[h]] =
            lonely ? INFINITY : lse;
      }
    }
  }
}

// WG1 and WG2: every request of the part, block by block, then its epilogue. A block of several
// pages may hold rows that were not loaded: the stage's row mask masks their keys; a block of
// one page is loaded whole or not at all, and its softmax has no mask test.
template <typename Element, BlockLoader kLoader>
__device__ __forceinline__ void math_role(const KernelArgs& args, SharedStorage& smem,
                                          const MetadataRow& part, int kv_head, int s0, int j0) {
  const DenseDecodeParams& p = args.params;
  const bool score_wg = threadIdx.x / 128 == 1;
  constexpr bool kMasked = kLoader != BlockLoader::kWholePages;
  const ThreadRows t = thread_rows(args.tile, p.s_q, kv_head, s0, j0);
  int stage = 0;
  uint32_t kv_phase = 0, q_phase = 0;
  int request_parity = 0;
  for (int req = part.begin_req; req <= part.end_req; ++req) {
    const RequestWork w = request_work(args, part, req);
    float o[kAccumulators];  // 64 x 256 accumulator slice
#pragma unroll
    for (int i = 0; i < kAccumulators; ++i) o[i] = 0.f;
    SoftmaxRows rows = {{-INFINITY, -INFINITY}, {0.f, 0.f}};
    int key_limit[2];  // keys t < key_limit[h] are attendable for row h (bottom-right causal)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      key_limit[h] = p.causal ? min(w.length, w.length - static_cast<int>(p.s_q) + t.token[h] + 1)
                              : w.length;
    }
    if (score_wg && w.lo < w.hi) {
      mbarrier_wait(&smem.q_full, q_phase);
      q_phase ^= 1;
    }
    for (int blk = w.lo; blk < w.hi; ++blk) {
      mbarrier_wait(&smem.kv_full[stage], kv_phase);
      uint8_t* kv = smem.kv[stage];
      uint8_t* p_tile = kv + kRopeChunk * kChunkBytes;
      // Uniform per warp (the loader wrote it before completing the barrier). Branching on
      // it ahead of S keeps the softmax's warp shuffles free of divergence checks; issuing S
      // first, to hide this load, made ptxas add them (8% more cycles per block, H100).
      const uint64_t loaded = smem.kv_rows[stage];
      const bool present = loaded != 0;
      if (score_wg) {
        if (present) {
          float s[32];
          issue_scores<Element, kQKChunks>(smem.q, kv, s);
          wgmma_wait<0>();
          if (blk == w.hi - 1) mbarrier_arrive(&smem.q_empty);  // Q is free for the next request
          if constexpr (kLoader != BlockLoader::kGather) {
            const int valid_rows = w.length - blk * kBlockTokens;
            const uint64_t in_length =
                valid_rows < kBlockTokens ? ~0ull >> (kBlockTokens - valid_rows) : ~0ull;
            const uint64_t keep = loaded & in_length;
            if (keep != ~0ull) zero_values_except(kv, keep);
          }
          uint32_t packed[16];
          float factor[2];
          const auto attends = [&](int i, int h, int e) {
            const int column = i * 8 + t.quad_col + e;
            const bool in_length = blk * kBlockTokens + column < key_limit[h];
            if constexpr (kMasked) return in_length && ((loaded >> column) & 1);
            return in_length;
          };
          online_softmax<Element>(s, attends, args.scale_log2, rows, o, packed, factor);
          publish_p(p_tile, packed, factor, smem.row_factor[stage], t, stage);
          accumulate_pv<Element>(packed, kv, o);
          // P's generic-proxy writes before the TMA (async proxy) refills this stage.
          fence_proxy_async_smem();
        } else if (blk == w.hi - 1) {
          mbarrier_arrive(&smem.q_empty);
        }
      } else if (present) {
        uint32_t packed[16];
        receive_p(p_tile, smem.row_factor[stage], t, stage, o, packed);
        accumulate_pv<Element>(packed, kv + 4 * kChunkBytes, o);
      }
      mbarrier_arrive(&smem.kv_empty[stage]);
      if (++stage == kStages) {
        stage = 0;
        kv_phase ^= 1;
      }
    }
    finish_request<Element>(args, smem, w, req, score_wg, t, request_parity, rows, o);
  }
}

template <typename Element, BlockLoader kLoader>
__global__ void __launch_bounds__(kThreads, 1)
    dense_decode_kernel(const __grid_constant__ KernelArgs args) {
  extern __shared__ uint8_t smem_raw[];
  SharedStorage& smem = *reinterpret_cast<SharedStorage*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const int part_index = blockIdx.x, kv_head = blockIdx.y, q_tile = blockIdx.z;

  // Launched with programmatic dependent launch: wait for the previous kernel on the stream
  // (which may produce q or the metadata), then let the combine kernel launch early.
  pdl_wait();
  pdl_launch_dependents();
  const MetadataRow part = load_part(args.params.tile_metadata, part_index, args.params.batch);
  if (part.begin_req > part.end_req) return;  // an empty part

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&smem.kv_full[s], kFullArrivals<kLoader>);
      mbarrier_init(&smem.kv_empty[s], kConsumerThreads);
    }
    mbarrier_init(&smem.q_full, 1);
    mbarrier_init(&smem.q_empty, 128);
    fence_barrier_init();
  }
  __syncthreads();

  const int s0 = (q_tile / args.tile.head_tiles) * args.tile.s_per_tile;
  const int j0 = (q_tile % args.tile.head_tiles) * args.tile.heads_per_tile;
  if (threadIdx.x / 128 == 0) {
    registers_decrease<40>();
    load_role<Element, kLoader>(args, smem, part, kv_head, s0, j0);
    return;
  }
  registers_increase<232>();
  if (threadIdx.x / 128 == 1) JFM_SPAN_BEGIN();
  math_role<Element, kLoader>(args, smem, part, kv_head, s0, j0);
  if (threadIdx.x / 128 == 1) JFM_SPAN_END();
}

// The query tiles of one (part, KV head) all read the same KV blocks. Launched in clusters of
// kClusterTiles, the tiles of a cluster share a GPC, so a block's second read hits the L2
// instead of going to DRAM again (H200, s_q 2, s_k 16384: 5.1 GB read from DRAM without
// clusters, 2.5 GB with, for 2.5 GB of cache; 7-9% less time). Clusters of 4 would leave SMs
// idle on the H200 (its GPCs do not divide into them).
constexpr int kClusterTiles = 2;
constexpr int kSmemBytes = static_cast<int>(sizeof(SharedStorage)) + 1024;  // + alignment slack

// What launch_typed needs to know of the device once: the kernel's shared-memory limit is set
// and how many CTAs stay resident, plainly and in clusters. Made on a device's first launch,
// with calls that are legal while a stream is captured, and cached (per element type).
struct DeviceSetup {
  cudaError_t status;  // of setting the shared-memory limit
  int plain_ctas;      // resident CTAs of a plain launch; 0 if unknown
  int cluster_ctas;    // resident CTAs in clusters of kClusterTiles; 0 if unknown
};

template <typename Element, BlockLoader kLoader>
DeviceSetup query_device_setup(int device) {
  const auto kernel = dense_decode_kernel<Element, kLoader>;
  // A failed query sets the runtime's last error; clear it only if it was clear before, so
  // that an error of someone else's stays for them to see.
  const bool error_slot_clear = cudaPeekAtLastError() == cudaSuccess;
  DeviceSetup setup{
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes), 0,
      0};
  int sms = 0, per_sm = 0;
  bool failed = setup.status != cudaSuccess;
  if (!failed && cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) ==
                     cudaSuccess &&
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, kSmemBytes) ==
          cudaSuccess) {
    setup.plain_ctas = sms * per_sm;
  } else {
    failed = true;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(1, 1, kClusterTiles);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = kSmemBytes;
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = 1;
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = kClusterTiles;
  config.attrs = &attribute;
  config.numAttrs = 1;
  int clusters = 0;
  if (!failed && cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) == cudaSuccess) {
    setup.cluster_ctas = clusters * kClusterTiles;
  } else {
    failed = true;
  }
  if (failed && error_slot_clear) (void)cudaGetLastError();
  return setup;
}

template <typename Element, BlockLoader kLoader>
DeviceSetup device_setup() {
  return per_device_once(
      [](int device) { return query_device_setup<Element, kLoader>(device); },
      [](const DeviceSetup& setup) { return setup.status == cudaSuccess && setup.plain_ctas > 0; });
}

// Launches one variant of the kernel: in clusters of kClusterTiles query tiles where their
// number allows it and clusters keep as many CTAs resident as a plain launch. A KV block all of
// whose readers are in one cluster is dead once they have read it (evict first); otherwise it
// stays in the L2 for the other tiles' reads (evict normal).
template <typename Element, BlockLoader kLoader>
cudaError_t launch_variant(const KernelArgs& args, cudaStream_t stream) {
  const DeviceSetup setup = device_setup<Element, kLoader>();
  if (setup.status != cudaSuccess) return setup.status;
  const dim3 grid(static_cast<unsigned>(args.params.num_parts),
                  static_cast<unsigned>(args.params.h_kv),
                  static_cast<unsigned>(args.tile.num_tiles));
  const int64_t grid_ctas = int64_t{grid.x} * grid.y * grid.z;
  const bool clustered = args.tile.num_tiles % kClusterTiles == 0 && setup.plain_ctas > 0 &&
                         setup.cluster_ctas >= std::min<int64_t>(grid_ctas, setup.plain_ctas);
  const int cluster_tiles = clustered ? kClusterTiles : 1;
  KernelArgs launch_args = args;
  launch_args.kv_cache_hint =
      cluster_tiles == args.tile.num_tiles ? kCacheEvictFirst : kCacheEvictNormal;
  const LaunchShape shape{grid, dim3(kThreads), kSmemBytes, dim3(1, 1, cluster_tiles),
                          /*pdl=*/true};
  return launch_kernel(dense_decode_kernel<Element, kLoader>, shape, stream, launch_args);
}

// Launches the kernel for one element type (instantiated in decode_dense_<type>.cu), with the
// block loader of the cache's page size.
template <typename Element>
cudaError_t launch_typed(const KernelArgs& args, cudaStream_t stream) {
  switch (block_loader(args.page)) {
    case BlockLoader::kWholePages:
      return launch_variant<Element, BlockLoader::kWholePages>(args, stream);
    case BlockLoader::kPageBoxes:
      return launch_variant<Element, BlockLoader::kPageBoxes>(args, stream);
    case BlockLoader::kGather:
      break;
  }
  return launch_variant<Element, BlockLoader::kGather>(args, stream);
}

}  // namespace jfm::sm90::decode_dense
