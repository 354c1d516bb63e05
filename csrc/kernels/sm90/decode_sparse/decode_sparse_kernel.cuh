// The sparse FP8 MLA decode kernel for sm_90a. Included by one translation unit per layout.
//
// Roles (384 threads, three warpgroups), one device function each:
//   load_role (WG0, all 128 threads): the query tile by TMA (one thread), and every block of 64
//     selected tokens: each token is gathered by 4 threads with 16-byte loads straight into
//     registers (the whole block in flight at once, its slot indices read a block ahead),
//     dequantised (FP8 x scale to bfloat16, exactly) and stored into the stage's
//     128-byte-swizzled K chunks, zeros for a slot that selects nothing; the stage's mask of
//     attending slots goes beside it. A 2-stage ring, completed on mbarriers by all 128
//     threads. At h_q > 64 the two head tiles of a part run as a cluster of two CTAs, each
//     gathering half of every block into both CTAs' stages (st.async to the other one).
//   WG1 and WG2, the math warpgroups, as in the dense decode (mla_tile.cuh): WG1 computes S,
//     the online softmax under the stage's mask, hands P to WG2 through the stage's chunk 8
//     (V32's RoPE chunk, which nothing reads once S is done; unused by MODEL1) and accumulates
//     O[:, 0:256]; WG2 accumulates O[:, 256:512] with P read by its wgmma straight from there.
//     A block with no attending slot is skipped.
//   finish_request, the epilogue: the output (with the attention sink applied) and lse of an
//     unsplit request, else its fp32 partial row for the combine kernel.
#pragma once

#include <cuda_bf16.h>

#include <climits>
#include <cstdint>

#include "kernels/common/launch.cuh"
#include "kernels/common/schedule_piece.cuh"
#include "kernels/sm90/decode_sparse/decode_sparse_args.cuh"
#include "kernels/sm90/hopper.cuh"
#include "kernels/sm90/mla_tile.cuh"

namespace jfm::sm90::decode_sparse {

using Element = __nv_bfloat16;

constexpr int kBlockSlots = 64;   // selected tokens per KV block (one 64-row chunk high)
constexpr int kStageChunks = 9;   // the K chunks of the widest layout
constexpr int kPChunk = 8;        // where P goes once S is computed
constexpr int kStageBytes = kStageChunks * kChunkBytes;
constexpr int kStages = 2;
constexpr int kThreads = 384;
constexpr int kLoaderThreads = 128;
// Each selected token is gathered by 4 loader threads, thread j taking the 16-byte columns j,
// j + 4, j + 8, ... of its bytes (4 threads read 64 contiguous bytes per load); a pass covers
// 32 slots and a block two passes, whose loads are all in flight at once.
constexpr int kTokenThreads = 4;
constexpr int kPassSlots = kLoaderThreads / kTokenThreads;  // 32
constexpr int kPasses = kBlockSlots / kPassSlots;           // tokens per thread per block: 2
// Registers per thread after the split: the CTA keeps what it was launched with, 168 per
// thread (384 threads, one CTA per SM), so the loaders must give up as many as the math
// warpgroups take, or setmaxnreg.inc waits forever. Both math warpgroups hold O (128); WG1 also
// S (32), P (16) and the softmax state, while WG2 reads P from shared memory (wgmma with both
// operands there), which leaves the loaders room for a whole block's loads (2 tokens of 11
// 16-byte loads), their dequantisation and the next block's slot indices.
constexpr uint32_t kLaunchRegisters = 168;
constexpr uint32_t kScoreRegisters = 208;
constexpr uint32_t kValueRegisters = 160;
constexpr uint32_t kLoaderRegisters = 136;
static_assert(128 * (kScoreRegisters + kValueRegisters + kLoaderRegisters) <=
                  kThreads * kLaunchRegisters,
              "the math warpgroups take no more registers than the loaders give up");
static_assert(kScoreRegisters >= kLaunchRegisters && kValueRegisters <= kLaunchRegisters &&
                  kLoaderRegisters <= kLaunchRegisters,
              "WG1 raises its count (setmaxnreg.inc), WG2 and the loaders lower theirs (.dec)");

// Where a layout keeps a token's parts (docs/ops.md, FP8 cache layouts).
template <Fp8Layout kLayout>
struct LayoutTraits;

template <>
struct LayoutTraits<Fp8Layout::kV32> {
  static constexpr int kQKChunks = 9;        // 512 NoPE + 64 RoPE dims
  static constexpr int kE4m3Pieces = 32;     // 16-byte pieces of e4m3 values: the NoPE dims
  static constexpr bool kScaledPieces = true;  // the pieces carry their own scales
  static constexpr bool kBf16Rope = true;    // the RoPE dims are stored as bfloat16
  static constexpr int kRopeChunk = 8;
  static constexpr int kRopeOffset = 528;    // after 512 e4m3 values and 4 float32 scales
};

template <>
struct LayoutTraits<Fp8Layout::kModel1> {
  static constexpr int kQKChunks = 8;        // 448 NoPE + 64 RoPE dims
  static constexpr int kE4m3Pieces = 28;
  static constexpr bool kScaledPieces = true;
  static constexpr bool kBf16Rope = true;
  static constexpr int kRopeChunk = 7;
  static constexpr int kRopeOffset = 448;
  static constexpr int kTokenDataBytes = 576;  // per token, then page * 8 bytes of scales
  static constexpr int kScaleRecordBytes = 8;
};

// Every one of the 576 dims an e4m3 value; the cache's one scale is not applied here but folded
// into the softmax scale (S = scale * Q K_e4m3^T) and the output (O = scale * P V_e4m3), exactly
// in float32, so the stage holds the e4m3 values themselves.
template <>
struct LayoutTraits<Fp8Layout::kE4M3> {
  static constexpr int kQKChunks = 9;
  static constexpr int kE4m3Pieces = 36;  // the 576 values, RoPE included
  static constexpr bool kScaledPieces = false;
  static constexpr bool kBf16Rope = false;
};

struct alignas(1024) SharedStorage {
  uint8_t q[kStageChunks * kChunkBytes];
  uint8_t kv[kStages][kStageBytes];
  float row_factor[kStages][kQueryTileRows];  // exp2(m_old - m_new) per row and block
  float row_sum[2][kQueryTileRows];           // final softmax denominators, per request parity
  float row_max[2][kQueryTileRows];           // final reference maxima, per request parity
  uint64_t kv_full[kStages];
  uint64_t kv_empty[kStages];
  uint64_t q_full;
  uint64_t q_empty;
  // Word g of a stage: bit t = slot 8 g + t selects a token (bits 8-31 repeat bits 0-7; one
  // word per loader warp and pass, so that a CTA of a pair can send its words to the other
  // with 4-byte stores).
  alignas(16) uint32_t attending[kStages][kBlockSlots / 8];
};

// ---- FP8 to bfloat16 ------------------------------------------------------------------------

// Two e4m3 values of `word` (bytes 0 and 1 when kHigh is 0, else bytes 2 and 3), as bfloat16
// bit patterns of 2^-120 times their values: sign, exponent and mantissa moved into bfloat16's
// fields, whose exponent bias is 120 more than e4m3's. Exact for every finite value, zero and
// subnormals included (the bfloat16 products below keep subnormals). One byte permute puts
// each value in the low byte of its 16-bit half and its sign bit replicated over the high byte
// (prmt's sign mode), so a shift by 4 and one mask finish it: the sign lands on bit 15,
// exponent and mantissa on bits 10-4.
template <int kHigh>
__device__ __forceinline__ uint32_t e4m3_pair_bits(uint32_t word) {
  constexpr uint32_t kSelector = kHigh ? 0xB3A2 : 0x9180;  // sign of byte, byte, per half
  uint32_t bits;
  asm("{\n"
      ".reg .b32 spread;\n"
      "prmt.b32 spread, %1, 0, %2;\n"
      "shl.b32 spread, spread, 4;\n"
      "and.b32 %0, spread, 0x87F087F0;\n"
      "}"
      : "=r"(bits)
      : "r"(word), "n"(kSelector));
  return bits;
}

__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, __nv_bfloat162 b) {
  const __nv_bfloat162 r = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&a), b);
  return *reinterpret_cast<const uint32_t*>(&r);
}

// 16 e4m3 values (one 16-byte piece) times `scale` (kScaled) or as they are, as 16 bfloat16
// values in two 16-byte units. The factor 2^120 goes in first, on its own, so that no scale can
// overflow it.
template <bool kScaled>
__device__ __forceinline__ void dequantize_piece(const uint4& piece, __nv_bfloat162 scale,
                                                 uint4& lo, uint4& hi) {
  const __nv_bfloat162 two_pow_120 = __bfloat162bfloat162(__ushort_as_bfloat16(0x7B80));
  const uint32_t words[4] = {piece.x, piece.y, piece.z, piece.w};
  uint32_t out[8];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {  // values 4k + {0, 1}, then 4k + {2, 3}
      const uint32_t bits = half ? e4m3_pair_bits<1>(words[k]) : e4m3_pair_bits<0>(words[k]);
      const uint32_t value = bf16x2_mul(bits, two_pow_120);
      out[2 * k + half] = kScaled ? bf16x2_mul(value, scale) : value;
    }
  }
  lo = make_uint4(out[0], out[1], out[2], out[3]);
  hi = make_uint4(out[4], out[5], out[6], out[7]);
}

// An e8m0 exponent byte as bfloat16 2^(e - 127); 0 is the subnormal 2^-127, 255 is NaN.
__device__ __forceinline__ __nv_bfloat16 e8m0_to_bf16(uint32_t e) {
  const unsigned short bits =
      e == 0 ? 0x0040 : (e == 255 ? 0x7FC0 : static_cast<unsigned short>(e << 7));
  return __ushort_as_bfloat16(bits);
}

// ---- Global loads ---------------------------------------------------------------------------

// The caches are read-only for the kernel's lifetime: non-coherent loads, not kept in L1.
__device__ __forceinline__ uint4 load_16(const uint8_t* address) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(address));
  return v;
}
__device__ __forceinline__ uint2 load_8(const uint8_t* address) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];"
               : "=r"(v.x), "=r"(v.y)
               : "l"(address));
  return v;
}
// 16 bytes at an address that is 8-byte aligned (MODEL1 tokens of blocks with an odd page).
__device__ __forceinline__ uint4 load_16_of_8_aligned(const uint8_t* address) {
  if ((reinterpret_cast<uintptr_t>(address) & 15) == 0) return load_16(address);
  const uint2 a = load_8(address), b = load_8(address + 8);
  return make_uint4(a.x, a.y, b.x, b.y);
}

// ---- The schedule ---------------------------------------------------------------------------

// Slots of request `req` that count in `source`: clamp(topk_length[req], 0, topk), or topk.
__device__ __forceinline__ int counted_slots(const SparseKeySource& source, int req) {
  if (source.cache == nullptr) return 0;
  const int topk = static_cast<int>(source.topk);
  return source.topk_length == nullptr ? topk : min(max(source.topk_length[req], 0), topk);
}

// What a part does for request `req`: its range of the request's blocks, main blocks first
// then extra ones, and its result row (schedule_piece.cuh).
struct RequestWork : RequestPiece {
  int main_slots, extra_slots;  // counted slots of each source
  int main_blocks;              // blocks [0, main_blocks) are main, the rest extra
};

__device__ __forceinline__ RequestWork request_work(const KernelArgs& args,
                                                    const MetadataRow& part, int req) {
  const SparseDecodeParams& p = args.params;
  RequestWork w;
  w.main_slots = counted_slots(p.main, req);
  w.extra_slots = counted_slots(p.extra, req);
  w.main_blocks = (w.main_slots + kBlockSlots - 1) / kBlockSlots;
  const int blocks = w.main_blocks + (w.extra_slots + kBlockSlots - 1) / kBlockSlots;
  static_cast<RequestPiece&>(w) = request_piece(part, req, blocks, p.num_splits, args.partial_rows);
  return w;
}

// ---- Load role ------------------------------------------------------------------------------

// One selected token as a loader thread holds it: thread j of the token's 4 holds the e4m3
// pieces j + 4 i (16 values each; piece j + 4 i fills units 2 j and 2 j + 1 of K chunk i), and
// in the layouts with bfloat16 RoPE the RoPE units j and j + 4 and the token's scales.
template <Fp8Layout kLayout>
struct TokenShare {
  static constexpr int kPieces = LayoutTraits<kLayout>::kE4m3Pieces / kTokenThreads;
  uint4 pieces[kPieces];
  uint4 rope[2];
  uint4 scales;  // V32: 4 x float32; MODEL1: 8 e8m0 bytes in .x and .y
  bool selects;  // the slot counts and its index is inside the cache
};

// Issues the loads of thread j's share of the token selected by `index` (nothing, and zeros,
// when the index is outside [0, num_tokens); an uncounted slot comes as -1).
template <Fp8Layout kLayout>
__device__ __forceinline__ TokenShare<kLayout> gather_token(const uint8_t* cache,
                                                            int64_t num_tokens, int64_t page,
                                                            int32_t index, int j) {
  using L = LayoutTraits<kLayout>;
  using Share = TokenShare<kLayout>;
  Share share;
  share.selects = index >= 0 && index < num_tokens;
  const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int i = 0; i < Share::kPieces; ++i) share.pieces[i] = zero;
  share.rope[0] = share.rope[1] = share.scales = zero;
  if (!share.selects) return share;
  if constexpr (kLayout == Fp8Layout::kE4M3) {
    const uint8_t* column = cache + int64_t{index} * fp8_bytes_per_token(kLayout) + j * 16;
#pragma unroll
    for (int i = 0; i < Share::kPieces; ++i) share.pieces[i] = load_16(column + 64 * i);
  } else if constexpr (kLayout == Fp8Layout::kV32) {
    const uint8_t* token = cache + int64_t{index} * fp8_bytes_per_token(kLayout);
    const uint8_t* column = token + j * 16;  // the loads below: immediate offsets from here
#pragma unroll
    for (int i = 0; i < Share::kPieces; ++i) share.pieces[i] = load_16(column + 64 * i);
    share.rope[0] = load_16(column + L::kRopeOffset);
    share.rope[1] = load_16(column + L::kRopeOffset + 64);
    share.scales = load_16(token + kHeadDimLatent);
  } else {
    // 0 <= index < 2^31 and page < 2^31: a 32-bit division is exact.
    const uint32_t block = static_cast<uint32_t>(index) / static_cast<uint32_t>(page);
    const uint32_t row = static_cast<uint32_t>(index) - block * static_cast<uint32_t>(page);
    const uint8_t* block_base = cache + int64_t{block} * page * fp8_bytes_per_token(kLayout);
    const uint8_t* column = block_base + int64_t{row} * L::kTokenDataBytes + j * 16;
#pragma unroll
    for (int i = 0; i < Share::kPieces; ++i) {
      share.pieces[i] = load_16_of_8_aligned(column + 64 * i);
    }
    share.rope[0] = load_16_of_8_aligned(column + L::kRopeOffset);
    share.rope[1] = load_16_of_8_aligned(column + L::kRopeOffset + 64);
    const uint2 record =
        load_8(block_base + page * L::kTokenDataBytes + int64_t{row} * L::kScaleRecordBytes);
    share.scales = make_uint4(record.x, record.y, 0, 0);
  }
  return share;
}

// The scale of e4m3 piece `piece`, as bfloat16 (both halves); none for E4M3 (see its traits).
template <Fp8Layout kLayout>
__device__ __forceinline__ __nv_bfloat162 piece_scale(const uint4& scales, int piece) {
  const uint32_t words[4] = {scales.x, scales.y, scales.z, scales.w};
  if constexpr (kLayout == Fp8Layout::kV32) {
    return __float2bfloat162_rn(__uint_as_float(words[piece / 8]));  // one per 128 values
  } else if constexpr (kLayout == Fp8Layout::kModel1) {
    const int tile = piece / 4;  // one e8m0 exponent per 64 values
    return __bfloat162bfloat162(e8m0_to_bf16((words[tile / 4] >> (8 * (tile % 4))) & 0xFF));
  } else {
    return __float2bfloat162_rn(1.f);
  }
}

// Where a loader thread's stores go: its own CTA's stage and, in a pair, the other CTA's same
// stage (st.async, counted on that CTA's full barrier).
template <bool kPaired>
struct StageTarget {
  uint32_t stage;      // shared::cta address of the stage
  uint32_t peer;       // shared::cluster address of the other CTA's stage (pairs)
  uint32_t peer_full;  // shared::cluster address of the other CTA's full barrier (pairs)

  __device__ __forceinline__ void put(uint32_t offset, const uint4& v) const {
    store_shared_16(stage + offset, v);
    if constexpr (kPaired) store_async_16(peer + offset, v, peer_full);
  }
};

// Stores thread j's share of a token, dequantised, into row `row` of the stage's chunks
// (16-byte unit u of a row sits at unit u ^ (row % 8)). The 8 threads of a store phase hold
// the same j and 8 consecutive rows, so they hit 8 distinct bank groups.
template <Fp8Layout kLayout, bool kPaired>
__device__ __forceinline__ void store_token(const StageTarget<kPaired>& target,
                                            const TokenShare<kLayout>& share, int row, int j) {
  using L = LayoutTraits<kLayout>;
  const int swizzle = row % 8;
  const uint32_t lo_unit = row * 128 + (((2 * j) ^ swizzle) << 4);
  const uint32_t hi_unit = row * 128 + (((2 * j + 1) ^ swizzle) << 4);
#pragma unroll
  for (int i = 0; i < TokenShare<kLayout>::kPieces; ++i) {
    uint4 lo, hi;
    dequantize_piece<L::kScaledPieces>(share.pieces[i],
                                       piece_scale<kLayout>(share.scales, j + 4 * i), lo, hi);
    target.put(lo_unit + i * kChunkBytes, lo);
    target.put(hi_unit + i * kChunkBytes, hi);
  }
  if constexpr (L::kBf16Rope) {
    const uint32_t rope_row = row * 128 + L::kRopeChunk * kChunkBytes;
    target.put(rope_row + ((j ^ swizzle) << 4), share.rope[0]);
    target.put(rope_row + (((j + 4) ^ swizzle) << 4), share.rope[1]);
  }
}

// Where block `blk` of request `req` (its main blocks first, then its extra ones) takes its
// slots from.
struct BlockSlots {
  const SparseKeySource* source;
  const int32_t* index;  // the block's first slot
  int counted;           // slots of the block that count (may exceed 64)
};

__device__ __forceinline__ BlockSlots block_slots(const SparseDecodeParams& p,
                                                  const RequestWork& w, int req, int token,
                                                  int blk) {
  const bool extra = blk >= w.main_blocks;
  const SparseKeySource& source = extra ? p.extra : p.main;
  const int first_slot = (extra ? blk - w.main_blocks : blk) * kBlockSlots;
  return {&source,
          source.indices + (static_cast<int64_t>(req) * p.s_q + token) * source.topk + first_slot,
          (extra ? w.extra_slots : w.main_slots) - first_slot};
}

// The index that slot `slot` of a block selects, -1 for a slot that does not count.
__device__ __forceinline__ int32_t slot_index(const BlockSlots& b, int slot) {
  return slot < b.counted ? b.index[slot] : -1;
}

// Bytes one CTA of a pair writes into the other per block: its 32 rows of every K chunk the
// layout fills, and its 4 words of the attending mask.
template <Fp8Layout kLayout>
constexpr uint32_t kPeerBlockBytes =
    kPassSlots * (LayoutTraits<kLayout>::kQKChunks * 128) + 4 * sizeof(uint32_t);

// WG0: for each request with work, the query tile (thread 0, TMA), then its blocks of 64 slots
// through the stage ring, all 128 threads gathering and dequantising: one token per thread and
// pass of 32 slots, two passes per block (in a pair, one: the CTA's half of the block). A
// block's loads are all issued before the wait for a free stage, and its slot indices are read
// while the previous block's loads are in flight, so that each block costs one round trip to
// memory.
template <Fp8Layout kLayout, bool kPaired>
__device__ __forceinline__ void load_role(const KernelArgs& args, SharedStorage& smem,
                                          const MetadataRow& part, int token, int head_tile) {
  using L = LayoutTraits<kLayout>;
  constexpr int kTokens = kPaired ? 1 : kPasses;  // per thread and block
  const SparseDecodeParams& p = args.params;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int j = lane / 8;  // the token's 16-byte columns j, j + 4, ...
  const uint32_t rank = kPaired ? cluster_rank() : 0;  // in a pair, the CTA's half of a block
  const uint32_t peer_rank = rank ^ 1;
  int slot[kTokens];  // this thread's slots of every block: 8 per warp and pass
#pragma unroll
  for (int k = 0; k < kTokens; ++k) {
    slot[k] = (kPaired ? static_cast<int>(rank) : k) * kPassSlots + warp * 8 + lane % 8;
  }
  if (tid == 0) prefetch_tensor_map(&args.q_map);
  uint32_t blocks_done = 0;  // stage = blocks_done % 2, its phase = blocks_done / 2 % 2
  for (int req = part.begin_req; req <= part.end_req; ++req) {
    const RequestWork w = request_work(args, part, req);
    // Q comes for every request, also one without blocks here, so that the Q barriers' phases
    // follow the request count on both sides.
    if (tid == 0) {
      // One Q per request: the Q barriers' phase is the request's parity in the part.
      mbarrier_wait(&smem.q_empty, ((req - part.begin_req) & 1) ^ 1);
      mbarrier_arrive_expect_tx(&smem.q_full, L::kQKChunks * 128 * args.q_box_rows);
      for (int c = 0; c < L::kQKChunks; ++c) {
        tma_load_3d(smem.q + c * kChunkBytes, &args.q_map, &smem.q_full, c * kChunkElems,
                    head_tile * kQueryTileRows, static_cast<int>(req * p.s_q + token),
                    kCacheEvictNormal);
      }
    }
    if (w.lo >= w.hi) continue;
    int32_t next_index[kTokens];
    {
      const BlockSlots first = block_slots(p, w, req, token, w.lo);
#pragma unroll
      for (int k = 0; k < kTokens; ++k) next_index[k] = slot_index(first, slot[k]);
    }
#pragma unroll 1
    for (int blk = w.lo; blk < w.hi; ++blk, ++blocks_done) {
      const int stage = blocks_done % kStages;
      const SparseKeySource& source = *block_slots(p, w, req, token, blk).source;
      int32_t index[kTokens];
#pragma unroll
      for (int k = 0; k < kTokens; ++k) index[k] = next_index[k];
      // The next block's indices go out first, while few registers are live.
      if (blk + 1 < w.hi) {
        const BlockSlots next = block_slots(p, w, req, token, blk + 1);
#pragma unroll
        for (int k = 0; k < kTokens; ++k) next_index[k] = slot_index(next, slot[k]);
      }
      TokenShare<kLayout> shares[kTokens];
#pragma unroll
      for (int k = 0; k < kTokens; ++k) {
        shares[k] = gather_token<kLayout>(static_cast<const uint8_t*>(source.cache),
                                          source.num_blocks * source.page, source.page, index[k],
                                          j);
      }
      mbarrier_wait(&smem.kv_empty[stage], (blocks_done / kStages % 2) ^ 1);
      const uint32_t local = smem_address(smem.kv[stage]);
      StageTarget<kPaired> target{local, 0, 0};
      if constexpr (kPaired) {
        target.peer = cluster_peer_address(local, peer_rank);
        target.peer_full = cluster_peer_address(smem_address(&smem.kv_full[stage]), peer_rank);
      }
#pragma unroll
      for (int k = 0; k < kTokens; ++k) {
        // Bits 0-7 (column 0) are this warp's 8 tokens of the pass (each byte repeats them).
        const uint32_t ballot = __ballot_sync(0xffffffffu, shares[k].selects);
        if (lane == 0) {
          const uint32_t word = smem_address(&smem.attending[stage][slot[k] / 8]);
          store_shared_4(word, ballot);
          if constexpr (kPaired) {
            store_async_4(cluster_peer_address(word, peer_rank), ballot, target.peer_full);
          }
        }
      }
#pragma unroll
      for (int k = 0; k < kTokens; ++k) store_token<kLayout, kPaired>(target, shares[k], slot[k], j);
      fence_proxy_async_smem();  // the stores before the wgmma reads of this stage
      // In a pair, thread 0's arrival also announces the bytes the other CTA sends.
      if (kPaired && tid == 0) {
        mbarrier_arrive_expect_tx(&smem.kv_full[stage], kPeerBlockBytes<kLayout>);
      } else {
        mbarrier_arrive(&smem.kv_full[stage]);
      }
    }
  }
}

// ---- Math warpgroups ------------------------------------------------------------------------

// Epilogue of one request: WG1 shares the final row sums and maxima, both warpgroups normalise
// their half of O (times `value_scale`, the scale of values stored unscaled) and store it: the
// output (times the sink factor) and lse of an unsplit request, else its fp32 partial row (the
// combine kernel applies the sink).
__device__ __forceinline__ void finish_request(const KernelArgs& args, SharedStorage& smem,
                                               const RequestWork& w, int req, int token,
                                               int head_tile, bool score_wg,
                                               const AccumulatorRows& t, int& request_parity,
                                               SoftmaxRows& rows, float value_scale,
                                               const float (&o)[kAccumulators]) {
  const SparseDecodeParams& p = args.params;
  share_row_sums_and_maxima(score_wg, t, smem.row_sum[request_parity],
                            smem.row_max[request_parity], rows);
  request_parity ^= 1;
  const int col0 = score_wg ? 0 : kHalfV;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int head = head_tile * kQueryTileRows + t.rows[h];
    if (head >= p.h_q) continue;  // a padding row of the last tile
    const bool lonely = rows.sum[h] == 0.f;
    const float lse = (rows.max[h] + log2f(rows.sum[h])) * kLn2;
    float factor = lonely ? 0.f : value_scale / rows.sum[h];
    if (!w.split && p.attn_sink != nullptr && !lonely) {
      factor *= 1.f / (1.f + expf(p.attn_sink[head] - lse));
    }
    const int64_t row_index =
        (static_cast<int64_t>(w.split ? w.split_row : req) * p.s_q + token) * p.h_q + head;
    if (w.split) {
      store_partial_row(p.partial_o + row_index * kHeadDimV + col0 + t.quad_col, o, h, factor);
    } else {
      store_output_row(static_cast<Element*>(p.out) + row_index * kHeadDimV + col0 + t.quad_col,
                       o, h, factor);
    }
    if (score_wg && t.lane % 4 == 0) {
      if (w.split) {
        p.partial_lse[row_index] = lonely ? -INFINITY : lse;
      } else {
        p.lse[(static_cast<int64_t>(req) * p.h_q + head) * p.s_q + token] =
            lonely ? INFINITY : lse;
      }
    }
  }
}

// WG1 (score_wg) and WG2: every request of the part, block by block, then its epilogue. In a
// pair, a stage is free once both CTAs' math warpgroups are done with it (each warp also
// arrives on the other CTA's empty barrier).
template <Fp8Layout kLayout, bool kPaired, bool score_wg>
__device__ __forceinline__ void math_role(const KernelArgs& args, SharedStorage& smem,
                                          const MetadataRow& part, int token, int head_tile) {
  using L = LayoutTraits<kLayout>;
  const AccumulatorRows t = accumulator_rows();
  // E4M3 keys and values sit in the stages unscaled: the cache's scale goes into S's scale
  // and O's normalisation instead.
  const float k_scale = kLayout == Fp8Layout::kE4M3 ? *args.params.k_scale : 1.f;
  const float scale_log2 = args.scale_log2 * k_scale;
  uint32_t blocks_done = 0;  // stage = blocks_done % 2, its phase = blocks_done / 2 % 2
  int request_parity = 0;    // also the phase of the Q barriers (one Q per request)
  for (int req = part.begin_req; req <= part.end_req; ++req) {
    const RequestWork w = request_work(args, part, req);
    float o[kAccumulators];  // 64 x 256 accumulator slice
#pragma unroll
    for (int i = 0; i < kAccumulators; ++i) o[i] = 0.f;
    SoftmaxRows rows = {{-INFINITY, -INFINITY}, {0.f, 0.f}};
    if (score_wg) {
      mbarrier_wait(&smem.q_full, request_parity);
      if (w.lo >= w.hi) mbarrier_arrive(&smem.q_empty);  // nothing to score
    }
    for (int blk = w.lo; blk < w.hi; ++blk, ++blocks_done) {
      const int stage = blocks_done % kStages;
      mbarrier_wait(&smem.kv_full[stage], blocks_done / kStages % 2);
      // In a pair the other CTA's half came by st.async (generic proxy) and is read by wgmma
      // (async proxy): the proxy fence goes on this side, after the barrier acquired it.
      if constexpr (kPaired) fence_proxy_async_smem();
      uint8_t* kv = smem.kv[stage];
      uint8_t* p_tile = kv + kPChunk * kChunkBytes;
      uint64_t attending = 0;
#pragma unroll
      for (int g = 0; g < kBlockSlots / 8; ++g) {
        attending |= static_cast<uint64_t>(smem.attending[stage][g] & 0xFFu) << (8 * g);
      }
      if (score_wg) {
        if (attending != 0) {
          float s[32];
          issue_scores<Element, L::kQKChunks>(smem.q, kv, s);
          wgmma_wait<0>();
          if (blk == w.hi - 1) mbarrier_arrive(&smem.q_empty);  // Q is free for the next request
          const uint64_t mine = attending >> t.quad_col;
          const auto attends = [&](int i, int, int e) { return (mine >> (i * 8 + e)) & 1; };
          uint32_t packed[16];
          float factor[2];
          online_softmax<Element>(s, attends, scale_log2, rows, o, packed, factor);
          publish_p<true>(p_tile, packed, factor, smem.row_factor[stage], t, stage);
          accumulate_pv<Element>(packed, kv, o);
        } else if (blk == w.hi - 1) {
          mbarrier_arrive(&smem.q_empty);
        }
      } else if (attending != 0) {
        receive_factors(smem.row_factor[stage], t, stage, o);
        accumulate_pv_ss<Element>(p_tile, kv + 4 * kChunkBytes, o);
      }
      mbarrier_arrive(&smem.kv_empty[stage]);
      if constexpr (kPaired) {
        __syncwarp();
        if (t.lane == 0) {
          mbarrier_arrive_cluster(
              cluster_peer_address(smem_address(&smem.kv_empty[stage]), cluster_rank() ^ 1));
        }
      }
    }
    finish_request(args, smem, w, req, token, head_tile, score_wg, t, request_parity, rows,
                   k_scale, o);
  }
}

// kPaired: h_q > 64, the two head tiles of a part and query token run as a cluster of two CTAs
// that share the gathering (each loads half of every block for both).
template <Fp8Layout kLayout, bool kPaired>
__global__ void __launch_bounds__(kThreads, 1)
    sparse_decode_kernel(const __grid_constant__ KernelArgs args) {
  extern __shared__ uint8_t smem_raw[];
  SharedStorage& smem = *reinterpret_cast<SharedStorage*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const int part_index = blockIdx.x, token = blockIdx.y, head_tile = blockIdx.z;

  // Launched with programmatic dependent launch: wait for the previous kernel on the stream
  // (which may produce q, the indices or the metadata), then let the combine kernel launch.
  pdl_wait();
  pdl_launch_dependents();
  // Both CTAs of a pair read the same part, so both return here or neither does.
  const MetadataRow part = load_part(args.params.tile_metadata, part_index, args.params.batch);
  if (part.begin_req > part.end_req) return;  // an empty part

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&smem.kv_full[s], kLoaderThreads);
      mbarrier_init(&smem.kv_empty[s], kConsumerThreads + (kPaired ? kConsumerThreads / 32 : 0));
    }
    mbarrier_init(&smem.q_full, 1);
    mbarrier_init(&smem.q_empty, 128);
    fence_barrier_init();
  }
  if (args.q_box_rows < kQueryTileRows) {
    zero_unloaded_query_rows(smem.q, kStageChunks, args.q_box_rows, kThreads);
  }
  if constexpr (kPaired) {
    cluster_sync();  // the other CTA's barriers are ready before anything reaches them
  } else {
    __syncthreads();
  }

  // Each role its own copy of the code, compiled to its own register count.
  if (threadIdx.x < kLoaderThreads) {
    registers_decrease<kLoaderRegisters>();
    load_role<kLayout, kPaired>(args, smem, part, token, head_tile);
  } else if (threadIdx.x < kLoaderThreads + 128) {
    registers_increase<kScoreRegisters>();
    math_role<kLayout, kPaired, true>(args, smem, part, token, head_tile);
  } else {
    registers_decrease<kValueRegisters>();  // setmaxnreg.inc may not lower the count
    math_role<kLayout, kPaired, false>(args, smem, part, token, head_tile);
  }
  // The other CTA may still store into this one's shared memory or arrive on its barriers
  // until it is done too.
  if constexpr (kPaired) cluster_sync();
}

constexpr int kSmemBytes = static_cast<int>(sizeof(SharedStorage)) + 1024;  // + alignment slack

template <Fp8Layout kLayout, bool kPaired>
cudaError_t launch_variant(const KernelArgs& args, cudaStream_t stream) {
  constexpr auto kKernel = sparse_decode_kernel<kLayout, kPaired>;
  const cudaError_t setup =
      prepare_register_split_kernel<kKernel>(kLaunchRegisters, kSmemBytes);
  if (setup != cudaSuccess) return setup;
  const dim3 grid(static_cast<unsigned>(args.params.num_parts),
                  static_cast<unsigned>(args.params.s_q), static_cast<unsigned>(args.head_tiles));
  const LaunchShape shape{grid, dim3(kThreads), kSmemBytes, dim3(1, 1, kPaired ? 2 : 1),
                          /*pdl=*/true};
  return launch_kernel(kKernel, shape, stream, args);
}

// Launches the kernel for one layout (instantiated in decode_sparse_<layout>.cu), after its
// one-time setup on the device (launch.cuh): paired when there are two head tiles.
template <Fp8Layout kLayout>
cudaError_t launch_typed(const KernelArgs& args, cudaStream_t stream) {
  if (args.head_tiles == 2) return launch_variant<kLayout, true>(args, stream);
  return launch_variant<kLayout, false>(args, stream);
}

}  // namespace jfm::sm90::decode_sparse
