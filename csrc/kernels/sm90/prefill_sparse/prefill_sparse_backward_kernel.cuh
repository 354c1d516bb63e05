// The backward kernel of the sparse prefill for sm_90a (the math: prefill_sparse_backward.cuh).
// Included by one translation unit per head dim.
//
// One CTA per work item (query token, tile of 64 query heads; work_item: the head tiles of a
// token adjacent in the grid); roles (384 threads, three warpgroups), one device function each:
//   load_role (WG0): q and d_out of the tile by TMA (one thread), then every block of 64
//     selected rows into the one kv stage (prefill_sparse_gather.cuh), with the block's kv row
//     numbers and attending mask beside it (double-buffered: the math warpgroups still add
//     into the previous block's rows while the next block lands).
//   score_role (WG1): S = Q K^T, P = exp(S - lse) under the mask, published to WG2; takes
//     back scale * dS; dq[:, 0:256] (and the RoPE dims 512:576) += dS K.
//   value_role (WG2): dP = d_out V^T; with P, scale * dS = scale * P (dP + shift), published to
//     WG1; dq[:, 256:512] += dS K.
//   Both then free the stage for the next block and add the block's dkv rows in chunks of 64
//   dims, dkv[rows, chunk] += dS^T Q[:, chunk] (+ P^T d_out[:, chunk] for the first 512 dims),
//   with atomic additions (add_dkv_chunk; float32 vectors, or 64-bit fixed point for a
//   bitwise repeatable dkv, which the launcher then turns into float32): WG1 chunks 0-3, WG2
//   chunks 4-7 and the RoPE chunk. finish_dq writes dq.
// With an even number of head tiles, the two tiles of a token run as a 2-CTA cluster that sums
// its dkv partials in shared memory before the atomics (DkvExchange); d_qk 576 takes blocks of
// 48 slots to make room for that (SharedStorage).
// P and dS pass through shared memory as 64 x 64 bf16 tiles (heads x slots): read back with
// ldmatrix as wgmma A fragments for dq, and transposed by wgmma (MN-major A) for dkv.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/common/launch.cuh"
#include "kernels/sm90/hopper.cuh"
#include "kernels/sm90/mla_tile.cuh"
#include "kernels/sm90/prefill_sparse/prefill_sparse_args.cuh"
#include "kernels/sm90/prefill_sparse/prefill_sparse_gather.cuh"

namespace jfm::sm90::prefill_sparse::backward {

using Element = __nv_bfloat16;

constexpr int kVChunks = kHeadDimV / kChunkElems;       // 8: d_out tile, the V dims
constexpr int kThreads = 384;
constexpr float kLog2e = 1.4426950408889634f;
// Registers: launched with 168 per thread (384 threads, one CTA per SM); WG1 holds dq[:, 0:256]
// and the RoPE dims (160), S (32) and P; WG2 dq[:, 256:512] (128), dP (32) and P / dS; the
// loaders indices and addresses. With 200 for WG2 ptxas spills; with these, nothing.
constexpr uint32_t kLaunchRegisters = 168;
constexpr uint32_t kScoreRegisters = 224;
constexpr uint32_t kValueRegisters = 208;
constexpr uint32_t kLoaderRegisters = 72;
static_assert(128 * (kScoreRegisters + kValueRegisters + kLoaderRegisters) <=
                  kThreads * kLaunchRegisters,
              "the math warpgroups take no more registers than the loaders give up");

// Named barriers of the math warpgroups (0 is __syncthreads).
constexpr uint32_t kBarP = 1;          // WG1 published P
constexpr uint32_t kBarDs = 2;         // WG2 published scale * dS
constexpr uint32_t kBarBlockDone = 3;  // both finished with the P and dS tiles of a block

// Per head dim: blocks of kSlots selected rows, 64 at d_qk 512 and 48 at d_qk 576, where a
// 64-row stage would leave no room for the exchange buffers (224 KB of the 227 in use). The
// math keeps its 64-slot shapes over a shorter stage: S and dP read, for slots kSlots..63, the
// next chunk's first rows (or the zero rows after the last chunk), which their mask turns into
// P = dS = 0, so dq gains nothing from them and their dkv rows (rows[] -1) are never added.
template <int kHeadDimQK>
struct alignas(1024) SharedStorage {
  static constexpr int kQKChunks = kHeadDimQK / kChunkElems;
  static constexpr int kSlots = kHeadDimQK == kHeadDimLatent ? 64 : 48;
  static constexpr int kStageChunkBytes = kSlots * 128;
  static constexpr int kPadBytes = (kQueryTileRows - kSlots) * 128;  // zeros after the stage

  uint8_t q[kQKChunks * kChunkBytes];
  uint8_t d_out[kVChunks * kChunkBytes];
  uint8_t kv[kQKChunks * kStageChunkBytes + kPadBytes];
  uint8_t p[kChunkBytes];   // P, bf16 [heads x slots]
  uint8_t ds[kChunkBytes];  // scale * dS, bf16 [heads x slots]
  uint8_t exchange[2][kChunkBytes];  // per math warpgroup: the partner's dkv partial (DkvExchange)
  int32_t rows[2][kQueryTileRows];  // per block parity: the kv row of each slot, -1 for none
  uint16_t attending[2][4];  // per block parity and loader warp: bit t = its slot t selects
  uint64_t kv_full;
  uint64_t kv_empty;
  uint64_t inputs_full;       // q and d_out
  uint64_t exchange_full[2];  // per math warpgroup: the partner's partial landed (DkvExchange)
  uint64_t exchange_empty[2];  // per math warpgroup: the partner has read what this CTA sent
};

// Arrivals that complete a block: every loader thread's copies, then the 16 threads that store
// the block's row numbers (lanes 0, 8, 16, 24 of each loader warp; lane 0 also its mask).
constexpr uint32_t kBlockArrivals = kLoaderThreads + 16;

// ---- Load role ------------------------------------------------------------------------------

template <int kHeadDimQK>
__device__ __forceinline__ void load_role(const BackwardArgs& args,
                                          SharedStorage<kHeadDimQK>& smem, int64_t token,
                                          int head_tile, int blocks, int counted) {
  using Storage = SharedStorage<kHeadDimQK>;
  constexpr int kQKChunks = Storage::kQKChunks, kSlots = Storage::kSlots;
  const SparsePrefillBackwardParams& p = args.params;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  if (tid == 0) {
    prefetch_tensor_map(&args.q_map);
    prefetch_tensor_map(&args.d_out_map);
    mbarrier_arrive_expect_tx(&smem.inputs_full,
                              (kQKChunks + kVChunks) * 128 * args.q_box_rows);
    const int head0 = head_tile * kQueryTileRows;
    load_head_tile<kQKChunks>(smem.q, &args.q_map, &smem.inputs_full, head0, token);
    load_head_tile<kVChunks>(smem.d_out, &args.d_out_map, &smem.inputs_full, head0, token);
  }
  // One stage; the row numbers and the mask alternate with the block's parity.
  gather_token_blocks<kHeadDimQK, 1, kSlots>(
      p.indices + token * p.topk, counted, blocks, 0, static_cast<const uint8_t*>(p.kv), p.s_kv,
      smem_address(smem.kv), 0, &smem.kv_full, &smem.kv_empty, warp, lane,
      [&](int blk, int, const BlockSlots<kSlots>& slots, uint32_t attending) {
        if (lane % kRowThreads != 0) return;
        const int parity = blk % 2;
#pragma unroll
        for (int pass = 0; pass < kPasses<kSlots>; ++pass) {
          const int32_t index = slots.index[pass];
          smem.rows[parity][loader_row<kSlots>(warp, lane, pass)] =
              selects_row(index, p.s_kv) ? index : -1;
        }
        if (lane == 0) smem.attending[parity][warp] = static_cast<uint16_t>(attending);
        mbarrier_arrive(&smem.kv_full);  // releases the stores above
      });
  cp_async_wait_all();
}

// ---- Math warpgroups ------------------------------------------------------------------------

using RopeMmaRS = GMMA::MMA_64x64x16_F32BF16BF16_RS<GMMA::Major::K, GMMA::Major::MN>;
using TransposedMmaSS = GMMA::MMA_64x64x16_F32BF16BF16_SS<GMMA::Major::MN, GMMA::Major::MN>;

// Two 16-bit values of a packed register as floats.
__device__ __forceinline__ float2 unpack(uint32_t packed) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&packed));
}

// P of one block (A-fragment layout, packed bf16): exp2(s * scale_log2 - lse_log2) where the
// slot attends (bit 8 i + e of `mine` for column 8 i + quad_col + e), else 0.
__device__ __forceinline__ void block_probabilities(const float (&s)[32], uint64_t mine,
                                                    float scale_log2,
                                                    const float (&lse_log2)[2],
                                                    uint32_t (&packed)[16]) {
#pragma unroll
  for (int m = 0; m < 16; ++m) {
    const int group = m / 2, h = m % 2;
    const bool a0 = (mine >> (group * 8)) & 1, a1 = (mine >> (group * 8 + 1)) & 1;
    const float p0 = a0 ? fast_exp2(s[2 * m] * scale_log2 - lse_log2[h]) : 0.f;
    const float p1 = a1 ? fast_exp2(s[2 * m + 1] * scale_log2 - lse_log2[h]) : 0.f;
    packed[m] = ElementTraits<Element>::pack(p0, p1);
  }
}

// A 64 x 64 bf16 tile (A-fragment layout) to shared memory, made visible to the other math
// warpgroup's ldmatrix and to both warpgroups' wgmma, then announced on `barrier`.
__device__ __forceinline__ void publish_tile(uint8_t* tile, const uint32_t (&packed)[16],
                                             const AccumulatorRows& t, uint32_t barrier) {
#pragma unroll
  for (int k16 = 0; k16 < 4; ++k16) {
    stmatrix_x4(tile + p_offset(t, k16), packed[4 * k16], packed[4 * k16 + 1],
                packed[4 * k16 + 2], packed[4 * k16 + 3]);
  }
  fence_proxy_async_smem();
  named_barrier_arrive(barrier, kConsumerThreads);
}

// The tile the other math warpgroup published on `barrier`, in the A-fragment layout.
__device__ __forceinline__ void receive_tile(const uint8_t* tile, const AccumulatorRows& t,
                                             uint32_t barrier, uint32_t (&packed)[16]) {
  named_barrier_sync(barrier, kConsumerThreads);
#pragma unroll
  for (int k16 = 0; k16 < 4; ++k16) ldmatrix_x4(tile + p_offset(t, k16), packed + 4 * k16);
}

// dq[:, rope dims] += dS K[:, 512:576] (d_qk 576): dS from registers, K's RoPE chunk from the
// stage. Issued only; the caller commits and waits.
__device__ __forceinline__ void issue_rope_dq(const uint32_t (&ds)[16], const uint8_t* rope,
                                              float (&dq_rope)[32]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint64_t b = smem_desc_sw128(smem_address(rope) + k * 2048, kChunkBytes, 1024);
    mma_rs<RopeMmaRS>(ds + 4 * k, b, dq_rope, std::make_index_sequence<32>{});
  }
}

// The dkv exchange of a head-tile pair (an even number of head tiles): the two CTAs of a 2-CTA
// cluster hold two head tiles of one token, so their dkv partials cover the same rows. Per
// chunk, the warps of the slots this CTA keeps (warps 0-1 of each math warpgroup in rank 0,
// warps 2-3 in rank 1) add the partner's partial of the same slots, which the partner's warps of
// the same index send by st.async into this warpgroup's exchange buffer (8 KB), and issue the
// atomics; the other warps send. One atomic per dkv value and pair instead of one per head tile.
// kWg: the math warpgroup, 0 (WG1) or 1 (WG2).
template <int kWg>
struct DkvExchange {
  bool active;
  uint32_t rank;       // in the cluster
  uint32_t exchanges;  // so far: the barriers' phase
};

template <int kWg>
__device__ __forceinline__ DkvExchange<kWg> dkv_exchange(bool active) {
  return {active, active ? cluster_rank() : 0u, 0u};
}

// One chunk's exchange (acc: this warpgroup's 64 slots x 64 dims). Returns whether this thread
// keeps its slots (acc then holds the pair's sum).
template <class Storage, int kWg>
__device__ __forceinline__ bool exchange_dkv_chunk(const Storage& smem, float (&acc)[32],
                                                   DkvExchange<kWg>& x, int lane) {
  const int warp = threadIdx.x / 32 % 4;
  const uint32_t phase = x.exchanges++ % 2;
  const int unit = (warp % 2) * 32 + lane;  // 8 units of 16 bytes per thread, 64 threads apart
  const uint8_t* buffer = smem.exchange[kWg];
  uint64_t* full = const_cast<uint64_t*>(&smem.exchange_full[kWg]);
  uint64_t* empty = const_cast<uint64_t*>(&smem.exchange_empty[kWg]);
  if (static_cast<uint32_t>(warp / 2) == x.rank) {
    if (warp % 2 == 0 && lane == 0) mbarrier_arrive_expect_tx(full, kChunkBytes);
    mbarrier_wait(full, phase);
    const float4* in = reinterpret_cast<const float4*>(buffer);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float4 v = in[i * 64 + unit];
      acc[4 * i] += v.x;
      acc[4 * i + 1] += v.y;
      acc[4 * i + 2] += v.z;
      acc[4 * i + 3] += v.w;
    }
    __syncwarp();
    if (lane == 0) mbarrier_arrive_cluster(cluster_peer_address(smem_address(empty), x.rank ^ 1));
    return true;
  }
  mbarrier_wait(empty, phase ^ 1);
  const uint32_t partner_buffer = cluster_peer_address(smem_address(buffer), x.rank ^ 1);
  const uint32_t partner_full = cluster_peer_address(smem_address(full), x.rank ^ 1);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const uint4 v = make_uint4(__float_as_uint(acc[4 * i]), __float_as_uint(acc[4 * i + 1]),
                               __float_as_uint(acc[4 * i + 2]), __float_as_uint(acc[4 * i + 3]));
    store_async_16(partner_buffer + (i * 64 + unit) * 16, v, partner_full);
  }
  return false;
}

// dkv[rows, 64 c : 64 c + 64] += (scale dS)^T Q[:, chunk c] (+ P^T d_out[:, chunk c] when
// kWithValue), for the block's slots that select a row: accumulators 64 slots x 64 dims, both
// operands transposed from the [heads x ...] tiles, then one float32 vector atomic addition
// per pair of columns, or two 64-bit fixed-point ones (`fixed_scale`: p.dkv_fixed's scale).
template <bool kWithValue, class Storage, int kWg>
__device__ __forceinline__ void add_dkv_chunk(const Storage& smem, int c,
                                              const int32_t* rows, const AccumulatorRows& t,
                                              const SparsePrefillBackwardParams& p,
                                              float fixed_scale, DkvExchange<kWg>& x) {
  float acc[32];
  wgmma_fence();
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint64_t a = smem_desc_sw128(smem_address(smem.ds) + k * 2048, kChunkBytes, 1024);
    const uint64_t b =
        smem_desc_sw128(smem_address(smem.q + c * kChunkBytes) + k * 2048, kChunkBytes, 1024);
    mma_ss<TransposedMmaSS>(a, b, acc, k > 0, std::make_index_sequence<32>{});
  }
  if constexpr (kWithValue) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint64_t a = smem_desc_sw128(smem_address(smem.p) + k * 2048, kChunkBytes, 1024);
      const uint64_t b = smem_desc_sw128(smem_address(smem.d_out + c * kChunkBytes) + k * 2048,
                                         kChunkBytes, 1024);
      mma_ss<TransposedMmaSS>(a, b, acc, true, std::make_index_sequence<32>{});
    }
  }
  wgmma_commit();
  wgmma_wait<0>();
  if (x.active && !exchange_dkv_chunk(smem, acc, x, t.lane)) return;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int32_t row = rows[t.rows[h]];
    if (row < 0) continue;
    const int64_t offset = row * p.d_qk + c * kChunkElems + t.quad_col;
    if (p.dkv_fixed != nullptr) {
      int64_t* dst = p.dkv_fixed + offset;
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const float value = acc[(i / 2) * 4 + h * 2 + i % 2];
        red_add_s64(dst + (i / 2) * 8 + i % 2, __float2ll_rn(value * fixed_scale));
      }
    } else {
      float* dst = p.dkv + offset;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        red_add_f32x2(dst + i * 8, acc[i * 4 + h * 2], acc[i * 4 + h * 2 + 1]);
      }
    }
  }
}

// Writes `n` columns of this thread's dq accumulators (fp32, n / 2 per thread) to the bf16 dq
// rows starting at column `col0`, for the heads of the tile below h_q.
template <int kColumns>
__device__ __forceinline__ void finish_dq(const SparsePrefillBackwardParams& p, int64_t token,
                                          int head_tile, int col0, const AccumulatorRows& t,
                                          const float* dq) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int head = head_tile * kQueryTileRows + t.rows[h];
    if (head >= p.h_q) continue;  // a padding row of the last tile
    Element* dst =
        static_cast<Element*>(p.dq) + (token * p.h_q + head) * p.d_qk + col0 + t.quad_col;
#pragma unroll
    for (int i = 0; i < kColumns / 8; ++i) {
      *reinterpret_cast<uint32_t*>(dst + i * 8) =
          ElementTraits<Element>::pack(dq[i * 4 + h * 2], dq[i * 4 + h * 2 + 1]);
    }
  }
}

// Waits for block `blk` in the stage, makes its rows (cp.async, generic proxy) visible to
// wgmma (async proxy) and returns its attending mask (bit t: slot t selects a row). A block
// with no attending slot is freed for the loaders at once: 0 tells the caller to skip it.
template <class Storage>
__device__ __forceinline__ uint64_t take_block(Storage& smem, int blk) {
  mbarrier_wait(&smem.kv_full, blk % 2);
  fence_proxy_async_smem();
  uint64_t attending = 0;  // loader warp w's bits are slots kSlots / 4 * w onwards
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    attending |= static_cast<uint64_t>(smem.attending[blk % 2][w]) << (w * Storage::kSlots / 4);
  }
  if (attending == 0) mbarrier_arrive(&smem.kv_empty);
  return attending;
}

// WG1.
template <int kHeadDimQK>
__device__ __forceinline__ void score_role(const BackwardArgs& args,
                                           SharedStorage<kHeadDimQK>& smem, int64_t token,
                                           int head_tile, int blocks) {
  using Storage = SharedStorage<kHeadDimQK>;
  constexpr int kQKChunks = Storage::kQKChunks, kStageChunk = Storage::kStageChunkBytes;
  constexpr bool kRope = kHeadDimQK > kHeadDimLatent;  // the RoPE dims of d_qk 576
  const SparsePrefillBackwardParams& p = args.params;
  const AccumulatorRows t = accumulator_rows();
  float dq[kAccumulators];  // dq[:, 0:256]
  float dq_rope[32];        // dq[:, 512:576]
#pragma unroll
  for (int i = 0; i < kAccumulators; ++i) dq[i] = 0.f;
#pragma unroll
  for (int i = 0; i < 32; ++i) dq_rope[i] = 0.f;
  float lse_log2[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int head = head_tile * kQueryTileRows + t.rows[h];
    // A padding row gets P = 0.
    lse_log2[h] = head < p.h_q ? p.lse[token * p.h_q + head] * kLog2e : INFINITY;
  }
  const float fixed_scale = p.dkv_fixed != nullptr ? *p.fixed_scale : 0.f;
  DkvExchange<0> x = dkv_exchange<0>(args.pair_tiles != 0);
  mbarrier_wait(&smem.inputs_full, 0);
  for (int blk = 0; blk < blocks; ++blk) {
    const uint64_t attending = take_block(smem, blk);
    if (attending == 0) continue;  // WG2 skips it too
    uint32_t packed[16];
    {
      float s[32];
      issue_scores<Element, kQKChunks, kStageChunk>(smem.q, smem.kv, s);
      wgmma_wait<0>();
      block_probabilities(s, attending >> t.quad_col, args.scale_log2, lse_log2, packed);
    }
    publish_tile(smem.p, packed, t, kBarP);
    receive_tile(smem.ds, t, kBarDs, packed);
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint64_t b = smem_desc_sw128(smem_address(smem.kv) + k * 2048, kStageChunk, 1024);
      mma_rs<typename ElementTraits<Element>::ValueMmaRS>(
          packed + 4 * k, b, dq, std::make_index_sequence<kAccumulators>{});
    }
    if constexpr (kRope) issue_rope_dq(packed, smem.kv + (kQKChunks - 1) * kStageChunk, dq_rope);
    wgmma_commit();
    wgmma_wait<0>();
    mbarrier_arrive(&smem.kv_empty);
    const int32_t* rows = smem.rows[blk % 2];
#pragma unroll 1
    for (int c = 0; c < 4; ++c) add_dkv_chunk<true>(smem, c, rows, t, p, fixed_scale, x);
    named_barrier_sync(kBarBlockDone, kConsumerThreads);
  }
  finish_dq<kHalfV>(p, token, head_tile, 0, t, dq);
  if constexpr (kRope) finish_dq<kHeadDimRope>(p, token, head_tile, kHeadDimLatent, t, dq_rope);
}

// WG2.
template <int kHeadDimQK>
__device__ __forceinline__ void value_role(const BackwardArgs& args,
                                           SharedStorage<kHeadDimQK>& smem, int64_t token,
                                           int head_tile, int blocks) {
  constexpr int kStageChunk = SharedStorage<kHeadDimQK>::kStageChunkBytes;
  constexpr bool kRope = kHeadDimQK > kHeadDimLatent;  // the RoPE dims of d_qk 576
  const SparsePrefillBackwardParams& p = args.params;
  const AccumulatorRows t = accumulator_rows();
  float dq[kAccumulators];  // dq[:, 256:512]
#pragma unroll
  for (int i = 0; i < kAccumulators; ++i) dq[i] = 0.f;
  float shift[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int head = head_tile * kQueryTileRows + t.rows[h];
    shift[h] = head < p.h_q ? p.row_shift[token * p.h_q + head] : 0.f;
  }
  const float scale = p.softmax_scale;
  const float fixed_scale = p.dkv_fixed != nullptr ? *p.fixed_scale : 0.f;
  DkvExchange<1> x = dkv_exchange<1>(args.pair_tiles != 0);
  mbarrier_wait(&smem.inputs_full, 0);
  for (int blk = 0; blk < blocks; ++blk) {
    if (take_block(smem, blk) == 0) continue;
    uint32_t packed[16];
    {
      float dp[32];
      issue_scores<Element, kVChunks, kStageChunk>(smem.d_out, smem.kv, dp);
      wgmma_wait<0>();
      receive_tile(smem.p, t, kBarP, packed);
#pragma unroll
      for (int m = 0; m < 16; ++m) {
        const float2 pr = unpack(packed[m]);
        packed[m] = ElementTraits<Element>::pack(scale * pr.x * (dp[2 * m] + shift[m % 2]),
                                                 scale * pr.y * (dp[2 * m + 1] + shift[m % 2]));
      }
    }
    publish_tile(smem.ds, packed, t, kBarDs);
    accumulate_pv<Element, kStageChunk>(packed, smem.kv + 4 * kStageChunk, dq);
    mbarrier_arrive(&smem.kv_empty);
    const int32_t* rows = smem.rows[blk % 2];
#pragma unroll 1
    for (int c = 4; c < kVChunks; ++c) add_dkv_chunk<true>(smem, c, rows, t, p, fixed_scale, x);
    if constexpr (kRope) add_dkv_chunk<false>(smem, kVChunks, rows, t, p, fixed_scale, x);
    named_barrier_sync(kBarBlockDone, kConsumerThreads);
  }
  finish_dq<kHalfV>(p, token, head_tile, kHalfV, t, dq);
}

template <int kHeadDimQK>
__global__ void __launch_bounds__(kThreads, 1)
    sparse_prefill_backward_kernel(const __grid_constant__ BackwardArgs args) {
  extern __shared__ uint8_t smem_raw[];
  using Storage = SharedStorage<kHeadDimQK>;
  Storage& smem = *reinterpret_cast<Storage*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const auto [token, head_tile] = work_item(blockIdx.x, args.head_tiles);
  const int counted = counted_slots(args.params.topk_length, args.params.topk, token);
  const int blocks = (counted + Storage::kSlots - 1) / Storage::kSlots;

  if (threadIdx.x == 0) {
    mbarrier_init(&smem.kv_full, kBlockArrivals);
    mbarrier_init(&smem.kv_empty, kConsumerThreads);
    mbarrier_init(&smem.inputs_full, 1);
    for (int wg = 0; wg < 2; ++wg) {
      mbarrier_init(&smem.exchange_full[wg], 1);
      mbarrier_init(&smem.exchange_empty[wg], 2);  // lane 0 of the partner's 2 keeping warps
    }
    fence_barrier_init();
  }
  if (args.q_box_rows < kQueryTileRows) {
    // Rows of heads past h_q: zero, so that they add nothing to dkv (P^T d_out: 0 * garbage
    // could be NaN).
    zero_unloaded_query_rows(smem.q, Storage::kQKChunks, args.q_box_rows, kThreads);
    zero_unloaded_query_rows(smem.d_out, kVChunks, args.q_box_rows, kThreads);
  }
  if constexpr (Storage::kSlots < kQueryTileRows) {
    // The slots past kSlots: no kv row (both parities), and zero rows after the stage's last
    // chunk for the 64-row reads of it.
    for (int i = threadIdx.x; i < 2 * (kQueryTileRows - Storage::kSlots); i += kThreads) {
      smem.rows[i % 2][Storage::kSlots + i / 2] = -1;
    }
    uint8_t* pad = smem.kv + Storage::kQKChunks * Storage::kStageChunkBytes;
    for (int i = threadIdx.x; i < Storage::kPadBytes / 16; i += kThreads) {
      reinterpret_cast<uint4*>(pad)[i] = make_uint4(0, 0, 0, 0);
    }
    fence_proxy_async_smem();
  }
  // With pairs, the partner's barriers must be initialised before the first exchange.
  if (args.pair_tiles != 0) {
    cluster_sync();
  } else {
    __syncthreads();
  }

  if (threadIdx.x < kLoaderThreads) {
    registers_decrease<kLoaderRegisters>();
    load_role<kHeadDimQK>(args, smem, token, head_tile, blocks, counted);
  } else if (threadIdx.x < 2 * 128) {
    registers_increase<kScoreRegisters>();
    score_role<kHeadDimQK>(args, smem, token, head_tile, blocks);
  } else {
    registers_increase<kValueRegisters>();
    value_role<kHeadDimQK>(args, smem, token, head_tile, blocks);
  }
  // The partner may still arrive on this CTA's barriers (or write its buffers) until it is done.
  if (args.pair_tiles != 0) cluster_sync();
}

template <int kHeadDimQK>  // + alignment slack
constexpr int kSmemBytes = static_cast<int>(sizeof(SharedStorage<kHeadDimQK>)) + 1024;

}  // namespace jfm::sm90::prefill_sparse::backward

namespace jfm::sm90::prefill_sparse {

// Launches the backward kernel for one head dim (instantiated in
// prefill_sparse_backward_d<d_qk>.cu), after its one-time setup on the device (launch.cuh).
template <int kHeadDimQK>
cudaError_t launch_backward_typed(const BackwardArgs& args, cudaStream_t stream) {
  constexpr auto kKernel = backward::sparse_prefill_backward_kernel<kHeadDimQK>;
  constexpr int kSmemBytes = backward::kSmemBytes<kHeadDimQK>;
  const cudaError_t setup =
      prepare_register_split_kernel<kKernel>(backward::kLaunchRegisters, kSmemBytes);
  if (setup != cudaSuccess) return setup;
  const dim3 grid(static_cast<unsigned>(work_items(args.params.s_q, args.head_tiles)));
  const LaunchShape shape{grid, dim3(backward::kThreads), kSmemBytes,
                          dim3(args.pair_tiles != 0 ? 2 : 1, 1, 1)};
  return launch_kernel(kKernel, shape, stream, args);
}

}  // namespace jfm::sm90::prefill_sparse
