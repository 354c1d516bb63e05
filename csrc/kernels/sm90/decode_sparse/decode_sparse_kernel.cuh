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
// The narrow kernel (h_q <= 32, V32 and E4M3) has the same roles over other tiles: the staged
// loader (staged_load_role: raw tokens by bulk copies into a ring, dequantised from shared
// memory) and the narrow math (narrow_math_role: heads as the wgmma N dimension).
#pragma once

#include <cuda_bf16.h>

#include <climits>
#include <cstdint>
#include <type_traits>
#include <utility>

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
constexpr int kThreads = 384;
constexpr int kLoaderThreads = 128;
// Named barrier of the staged loaders (the math warpgroups use 1-3, mla_tile.cuh).
constexpr uint32_t kBarRawConverted = 4;
// The staged loaders' warps each fetch a quarter of every block into the raw ring.
constexpr int kFetchSlots = kBlockSlots / (kLoaderThreads / 32);
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

// Where a kernel variant keeps its tiles. The plain one (kNarrowHeads 0): the 64-row query
// tile and two K stages, which the loaders fill from registers. The narrow one (kNarrowHeads
// 16 or 32: h_q up to that) puts the heads in the wgmma N dimension, so its query tile has
// kNarrowHeads rows, and copies each selected token into a ring of raw stages by the copy
// engine, dequantising from there into one K stage; the ring takes the room of the second K
// stage and of the query rows it does not need. Bulk copies move 16-byte units between
// 16-byte aligned addresses: V32 and E4M3 tokens are whole records of 656 and 576 bytes;
// a MODEL1 token is its 576 data bytes and the 16-byte aligned unit holding its 8-byte scale
// record (its own and a neighbour's of the same page), which needs even pages (a block of
// page * 584 bytes then starts 16-byte aligned; the launcher checks).
template <Fp8Layout kLayout, int kNarrowHeads>
struct Geometry {
  static constexpr bool kNarrow = kNarrowHeads > 0;
  static constexpr int kQRows = kNarrow ? kNarrowHeads : kQueryTileRows;
  static constexpr int kQChunkStride = kQRows * 128;  // one 64-dim chunk of every query row
  static constexpr int kQBytes = kStageChunks * kQChunkStride;
  static constexpr int kKvStages = kNarrow ? 1 : 2;
  static constexpr int kRawStages = kNarrow ? 2 : 0;
  static constexpr int kTokenBytes = static_cast<int>(fp8_bytes_per_token(kLayout));
  static constexpr bool kSplitToken = kLayout == Fp8Layout::kModel1;  // data and scale apart
  // The bytes of a selected token in a raw stage (MODEL1: the scale unit after the data).
  static constexpr int kRawTokenBytes =
      kSplitToken ? LayoutTraits<Fp8Layout::kModel1>::kTokenDataBytes + 16 : kTokenBytes;
  // A token's place in a raw stage: an odd number of 16-byte units apart, so that the same unit
  // of 8 consecutive tokens lies in 8 distinct bank groups (V32 656 bytes, E4M3 and MODEL1
  // 592).
  static constexpr int kRawTokenStride = ((kRawTokenBytes / 16) | 1) * 16;
  static constexpr int kRawStageBytes = kBlockSlots * kRawTokenStride;
  static_assert(!kNarrow || kRawTokenBytes % 16 == 0, "bulk copies move whole 16-byte units");
  static_assert(kNarrowHeads == 0 || kNarrowHeads == 16 || kNarrowHeads == 32,
                "a narrow tile has 16 or 32 heads");
};

template <int kBytes>
struct RawRing {
  uint8_t raw[kBytes];  // the raw stages, kRawStageBytes each (a 1024-byte multiple)
};
template <>
struct RawRing<0> {};

// How the narrow math warpgroups exchange per-head values (a head's 64 keys of a block lie in
// the 4 warps of the score warpgroup): partial maxima and, per request parity, partial sums
// per warp, the final maxima, and the factors of a block's rescale for the value warpgroup.
struct ColumnExchange {
  float block_max[4][32];
  float sum[2][4][32];
  float max[2][32];
  float factor[32];
};
struct NoExchange {};

template <class G>
struct alignas(1024) SharedStorage : RawRing<G::kRawStages * G::kRawStageBytes> {
  uint8_t q[G::kQBytes];
  uint8_t kv[G::kKvStages][kStageBytes];
  float row_factor[G::kKvStages][kQueryTileRows];  // exp2(m_old - m_new) per row and block
  float row_sum[2][kQueryTileRows];                // final softmax denominators, per request parity
  float row_max[2][kQueryTileRows];                // final reference maxima, per request parity
  uint64_t kv_full[G::kKvStages];
  uint64_t kv_empty[G::kKvStages];
  uint64_t q_full;
  uint64_t q_empty;
  uint64_t raw_full[2];  // narrow: a raw stage's copies have landed
  // Narrow: bit t of word w = slot kFetchSlots w + t of the raw stage selects a token (one word
  // per loader warp).
  uint16_t raw_selected[2][kLoaderThreads / 32];
  // Narrow MODEL1: bit t of word w = the scale record of slot kFetchSlots w + t is the second
  // half of its 16-byte unit.
  uint16_t raw_scale_high[2][kLoaderThreads / 32];
  // Word g of a stage: bit t = slot 8 g + t selects a token (bits 8-31 repeat bits 0-7; one
  // word per loader warp and pass, so that a CTA of a pair can send its words to the other
  // with 4-byte stores).
  alignas(16) uint32_t attending[G::kKvStages][kBlockSlots / 8];
  std::conditional_t<G::kNarrow, ColumnExchange, NoExchange> columns;
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

// The caches are read-only for the kernel's lifetime: non-coherent loads. Each asks L2 for the
// token's next 256 bytes too and keeps its line in L1 (evict_last): the 64-row kernel is 7-11%
// faster so than with loads that bypass L1 and fetch 32-byte sectors (performance log).
__device__ __forceinline__ uint4 load_16(const uint8_t* address) {
  uint4 v;
  asm volatile("ld.global.nc.L1::evict_last.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(address));
  return v;
}
__device__ __forceinline__ uint2 load_8(const uint8_t* address) {
  uint2 v;
  asm volatile("ld.global.nc.L1::evict_last.L2::256B.v2.u32 {%0, %1}, [%2];"
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

// Thread 0 of the loaders: request `req`'s query tile by TMA into `q` (chunks kQChunkStride
// bytes apart), once the math warpgroups are done with the previous one. One Q per request,
// also for a request without blocks here, so that the Q barriers' phase is the request's
// parity in the part on both sides.
template <Fp8Layout kLayout, int kQChunkStride, class Storage>
__device__ __forceinline__ void load_query_tile(const KernelArgs& args, Storage& smem,
                                                const MetadataRow& part, int req, int token,
                                                int head_tile) {
  mbarrier_wait(&smem.q_empty, ((req - part.begin_req) & 1) ^ 1);
  mbarrier_arrive_expect_tx(&smem.q_full,
                            LayoutTraits<kLayout>::kQKChunks * 128 * args.q_box_rows);
  for (int c = 0; c < LayoutTraits<kLayout>::kQKChunks; ++c) {
    tma_load_3d(smem.q + c * kQChunkStride, &args.q_map, &smem.q_full, c * kChunkElems,
                head_tile * kQueryTileRows, static_cast<int>(req * args.params.s_q + token),
                kCacheEvictNormal);
  }
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
__device__ __forceinline__ void load_role(const KernelArgs& args,
                                          SharedStorage<Geometry<kLayout, 0>>& smem,
                                          const MetadataRow& part, int token, int head_tile) {
  using L = LayoutTraits<kLayout>;
  constexpr int kStages = Geometry<kLayout, 0>::kKvStages;
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
    if (tid == 0) {
      load_query_tile<kLayout, kChunkBytes>(args, smem, part, req, token, head_tile);
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

// ---- Staged load role (h_q <= 32; V32 and E4M3) ------------------------------------------

// Walks a part's blocks in the order the math warpgroups take them: request by request, the
// blocks [lo, hi) of each request that has any.
struct BlockCursor {
  const KernelArgs& args;
  const MetadataRow& part;
  int token;
  int req;
  int blk;
  RequestWork w;

  __device__ BlockCursor(const KernelArgs& a, const MetadataRow& pt, int tok)
      : args(a), part(pt), token(tok), req(pt.begin_req - 1), blk(0) {
    next_request();
  }
  __device__ bool valid() const { return req <= part.end_req; }
  __device__ void next_request() {
    while (++req <= part.end_req) {
      w = request_work(args, part, req);
      blk = w.lo;
      if (w.lo < w.hi) return;
    }
  }
  __device__ void advance() {
    if (++blk >= w.hi) next_request();
  }
  __device__ BlockSlots slots() const { return block_slots(args.params, w, req, token, blk); }
};

// Each loader warp's share of a raw stage: its kFetchSlots slots, lane l < kFetchSlots copying
// the token of slot kFetchSlots * warp + l (one bulk copy each, two for MODEL1's data and scale
// unit; the copies a warp issues go out one at a time, so all four warps issue). Lane 0 first
// announces the warp's bytes on the stage's barrier and records which slots select a token.
// Where a token's place in the stage is its size (V32), a run of consecutive tokens (the warp's
// slots over one page of a dense cache) goes in one copy.
template <class G>
__device__ __forceinline__ void fetch_block(SharedStorage<G>& smem, const SparseKeySource& source,
                                            int32_t index, int raw_stage, int warp, int lane) {
  const int64_t num_tokens = source.num_blocks * source.page;
  const bool selects = lane < kFetchSlots && index >= 0 && index < num_tokens;
  const uint32_t ballot = __ballot_sync(0xffffffffu, selects);
  const int32_t first = __shfl_sync(0xffffffffu, index, 0);
  const bool in_run = lane >= kFetchSlots || int64_t{index} == int64_t{first} + lane;
  const bool one_run = G::kRawTokenStride == G::kTokenBytes &&
                       ballot == (1u << kFetchSlots) - 1 && __all_sync(0xffffffffu, in_run);
  const uint8_t* cache = static_cast<const uint8_t*>(source.cache);
  const uint8_t* data;              // the token's record, or MODEL1's data bytes
  const uint8_t* scale = nullptr;   // MODEL1: the 16-byte unit holding its scale record
  bool scale_high = false;          // MODEL1: the record is that unit's second half
  if constexpr (G::kSplitToken) {
    using L = LayoutTraits<Fp8Layout::kModel1>;
    // 0 <= index < 2^31 and page < 2^31 for a selecting slot: a 32-bit division is exact.
    const uint32_t page = static_cast<uint32_t>(source.page);
    const uint32_t block = selects ? static_cast<uint32_t>(index) / page : 0u;
    const uint32_t row = selects ? static_cast<uint32_t>(index) - block * page : 0u;
    const uint8_t* block_base = cache + int64_t{block} * page * G::kTokenBytes;
    data = block_base + int64_t{row} * L::kTokenDataBytes;
    const int64_t record =
        int64_t{page} * L::kTokenDataBytes + int64_t{row} * L::kScaleRecordBytes;
    scale = block_base + (record & ~int64_t{15});
    scale_high = (record & 15) != 0;
  } else {
    data = cache + int64_t{index} * G::kTokenBytes;
  }
  const uint32_t high_ballot = __ballot_sync(0xffffffffu, selects && scale_high);
  uint64_t* full = &smem.raw_full[raw_stage];
  if (lane == 0) {
    smem.raw_selected[raw_stage][warp] = static_cast<uint16_t>(ballot);
    if constexpr (G::kSplitToken) {
      smem.raw_scale_high[raw_stage][warp] = static_cast<uint16_t>(high_ballot);
    }
    mbarrier_arrive_expect_tx(full, __popc(ballot) * G::kRawTokenBytes);
  }
  __syncwarp();  // the bytes are announced before any copy can complete
  const uint32_t place = smem_address(smem.raw) + raw_stage * G::kRawStageBytes +
                         (warp * kFetchSlots + lane) * G::kRawTokenStride;
  if constexpr (G::kSplitToken) {
    if (selects) {
      constexpr uint32_t kDataBytes = G::kRawTokenBytes - 16;
      bulk_copy_to_shared(place, data, kDataBytes, full);
      bulk_copy_to_shared(place + kDataBytes, scale, 16, full);
    }
  } else {
    if (one_run ? lane == 0 : selects) {
      bulk_copy_to_shared(place, data, (one_run ? kFetchSlots : 1) * G::kTokenBytes, full);
    }
  }
}

// All 128 loader threads: a raw stage dequantised into the K stage. Each group of 8 threads
// (a shared-memory phase) takes 8 consecutive slots and every other 16-byte piece of them, so
// that its loads (a raw stage's tokens are an odd number of units apart) and its stores (rows
// of a 128-byte swizzle) each hit 8 distinct bank groups. A slot that selects nothing is
// stored as zeros (the raw stage holds whatever was there before).
template <Fp8Layout kLayout, class G>
__device__ __forceinline__ void convert_block(SharedStorage<G>& smem, int raw_stage,
                                              uint64_t selected, uint64_t scale_high, int tid) {
  using L = LayoutTraits<kLayout>;
  const int group = tid / 8;
  const int row = (group % 8) * 8 + tid % 8;
  const int first = group / 8;  // pieces first, first + 2, ...
  const bool selects = (selected >> row) & 1;
  const uint32_t src = smem_address(smem.raw) + raw_stage * G::kRawStageBytes +
                       row * G::kRawTokenStride;
  const uint32_t dst = smem_address(smem.kv[0]) + row * 128;
  const int swizzle = row % 8;
  // Every load of the thread's share first, so that they are in flight together (loads
  // and uses interleaved piece by piece waited out one load's latency each).
  constexpr int kPieces = L::kE4m3Pieces / 2;
  constexpr int kRopeUnits = L::kBf16Rope ? 4 : 0;
  uint4 raw[kPieces + kRopeUnits];
#pragma unroll
  for (int i = 0; i < kPieces + kRopeUnits; ++i) raw[i] = make_uint4(0, 0, 0, 0);
  uint4 scales = make_uint4(0, 0, 0, 0);
  if (selects) {
    if constexpr (kLayout == Fp8Layout::kV32) scales = load_shared_16(src + kHeadDimLatent);
    if constexpr (kLayout == Fp8Layout::kModel1) {
      const uint4 unit = load_shared_16(src + L::kTokenDataBytes);
      const bool high = (scale_high >> row) & 1;
      scales = make_uint4(high ? unit.z : unit.x, high ? unit.w : unit.y, 0, 0);
    }
#pragma unroll
    for (int i = 0; i < kPieces; ++i) raw[i] = load_shared_16(src + (first + 2 * i) * 16);
    if constexpr (L::kBf16Rope) {
#pragma unroll
      for (int i = 0; i < kRopeUnits; ++i) {
        raw[kPieces + i] = load_shared_16(src + L::kRopeOffset + (first + 2 * i) * 16);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kPieces; ++i) {
    const int piece = first + 2 * i;
    uint4 lo, hi;
    // Pieces 2 i and 2 i + 1 share their scale (one per 8 pieces): a constant index.
    dequantize_piece<L::kScaledPieces>(raw[i], piece_scale<kLayout>(scales, 2 * i), lo, hi);
    const uint32_t row_of_chunk = dst + (piece / 4) * kChunkBytes;
    const int unit = (piece % 4) * 2;
    store_shared_16(row_of_chunk + ((unit ^ swizzle) << 4), lo);
    store_shared_16(row_of_chunk + (((unit + 1) ^ swizzle) << 4), hi);
  }
  if constexpr (L::kBf16Rope) {
#pragma unroll
    for (int i = 0; i < kRopeUnits; ++i) {
      const int unit = first + 2 * i;
      store_shared_16(dst + L::kRopeChunk * kChunkBytes + ((unit ^ swizzle) << 4),
                      raw[kPieces + i]);
    }
  }
  if (tid < kBlockSlots / 8) {
    smem.attending[0][tid] = static_cast<uint32_t>(selected >> (8 * tid)) & 0xFFu;
  }
}

// WG0 of the staged kernel: for each request with work, the query tile (thread 0, TMA), then
// its blocks: the four warps keep the raw stages two blocks ahead of the conversion (the blocks
// of the next requests included), each fetching its quarter of a block, the slot indices of
// the next fetch read a fetch ahead; all 128 threads convert each raw stage into the K stage
// once the math warpgroups have freed it.
template <Fp8Layout kLayout, int kNarrowHeads>
__device__ __forceinline__ void staged_load_role(
    const KernelArgs& args, SharedStorage<Geometry<kLayout, kNarrowHeads>>& smem,
    const MetadataRow& part, int token, int head_tile) {
  using G = Geometry<kLayout, kNarrowHeads>;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  BlockCursor fetch(args, part, token);
  int32_t fetch_index = -1;
  uint32_t fetched = 0;
  const auto read_fetch_index = [&] {
    if (!fetch.valid()) return;
    fetch_index = lane < kFetchSlots ? slot_index(fetch.slots(), warp * kFetchSlots + lane) : -1;
  };
  const auto fetch_next = [&] {
    if (!fetch.valid()) return;
    fetch_block<G>(smem, *fetch.slots().source, fetch_index, fetched % G::kRawStages, warp, lane);
    ++fetched;
    fetch.advance();
    read_fetch_index();
  };
  if (tid == 0) prefetch_tensor_map(&args.q_map);
  read_fetch_index();
  for (int s = 0; s < G::kRawStages; ++s) fetch_next();
  uint32_t blocks_done = 0;  // raw stage = blocks_done % 2, its phase = blocks_done / 2 % 2
  for (int req = part.begin_req; req <= part.end_req; ++req) {
    const RequestWork w = request_work(args, part, req);
    if (tid == 0) {
      load_query_tile<kLayout, G::kQChunkStride>(args, smem, part, req, token, head_tile);
    }
#pragma unroll 1
    for (int blk = w.lo; blk < w.hi; ++blk, ++blocks_done) {
      const int raw_stage = blocks_done % G::kRawStages;
      mbarrier_wait(&smem.raw_full[raw_stage], blocks_done / G::kRawStages % 2);
      uint64_t selected = 0, scale_high = 0;
#pragma unroll
      for (int k = 0; k < kLoaderThreads / 32; ++k) {
        selected |= static_cast<uint64_t>(smem.raw_selected[raw_stage][k]) << (kFetchSlots * k);
        if constexpr (G::kSplitToken) {
          scale_high |= static_cast<uint64_t>(smem.raw_scale_high[raw_stage][k])
                        << (kFetchSlots * k);
        }
      }
      mbarrier_wait(&smem.kv_empty[0], (blocks_done % 2) ^ 1);
      convert_block<kLayout>(smem, raw_stage, selected, scale_high, tid);
      fence_proxy_async_smem();  // the stores before the wgmma reads of the stage
      mbarrier_arrive(&smem.kv_full[0]);
      named_barrier_sync(kBarRawConverted, kLoaderThreads);  // the raw stage is read
      fetch_next();
    }
  }
}

// ---- Math warpgroups ------------------------------------------------------------------------

// Epilogue of one request: WG1 shares the final row sums and maxima, both warpgroups normalise
// their half of O (times `value_scale`, the scale of values stored unscaled) and store it: the
// output (times the sink factor) and lse of an unsplit request, else its fp32 partial row (the
// combine kernel applies the sink).
template <class Storage>
__device__ __forceinline__ void finish_request(const KernelArgs& args, Storage& smem,
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
__device__ __forceinline__ void math_role(const KernelArgs& args,
                                          SharedStorage<Geometry<kLayout, 0>>& smem,
                                          const MetadataRow& part, int token, int head_tile) {
  using L = LayoutTraits<kLayout>;
  constexpr int kStages = Geometry<kLayout, 0>::kKvStages;
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

// ---- Narrow math (h_q <= 32): heads as the wgmma N dimension ----------------------------
//
// With N = kNarrowHeads heads, a block is S^T = K Q^T (m64nNk16: the block's 64 keys from the
// K stage as the A operand, Q [N, d_qk] as the B operand), the online softmax down each column
// (a head's 64 keys lie in the 4 warps of the score warpgroup: each warp reduces its 16 over
// lanes, the warps through shared memory), P^T to shared memory as a K-major B operand (a head
// per row, stmatrix .trans), then O^T += V^T P^T (m64nNk16 per 64 dims, V^T read from the K
// stage as an MN-major A operand). WG1 computes S^T, the softmax, P^T and O^T's dims 0-255,
// WG2 O^T's dims 256-511. In an accumulator thread t of a warpgroup holds rows (keys, or dims)
// 16 (t / 32) + (t % 32) / 4 and that + 8, and per 8 heads the heads 2 (t % 4) + {0, 1}:
// element 4 j + 2 h + e is row half h, head 8 j + 2 (t % 4) + e.

template <int kHeads>
struct NarrowTile {
  static constexpr int kCols = kHeads / 2;  // fp32 accumulators per thread and m64nN tile
  static constexpr int kHeld = kHeads / 4;  // heads a thread holds: index 2 j + e
  static constexpr int kOTiles = 4;         // 64-dim tiles of O^T per warpgroup
  using ScoreMma = std::conditional_t<
      kHeads == 16, GMMA::MMA_64x16x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::K>,
      GMMA::MMA_64x32x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::K>>;
  using ValueMma = std::conditional_t<
      kHeads == 16, GMMA::MMA_64x16x16_F32BF16BF16_SS<GMMA::Major::MN, GMMA::Major::K>,
      GMMA::MMA_64x32x16_F32BF16BF16_SS<GMMA::Major::MN, GMMA::Major::K>>;
  __device__ static int head(int lane, int held) {
    return (held / 2) * 8 + (lane % 4) * 2 + held % 2;
  }
};

// Named barriers of the narrow math (kBarPReady and kBarRowSum as in mla_tile.cuh).
constexpr uint32_t kBarColumnMax = 5;  // the score warpgroup's warps published their maxima

// O^T[dims of this warpgroup's tile c] += V^T P^T over the block's 64 keys.
template <int kHeads>
__device__ __forceinline__ void accumulate_pv_transposed(
    const uint8_t* v_chunk, const uint8_t* p_tile,
    float (&o)[NarrowTile<kHeads>::kOTiles][NarrowTile<kHeads>::kCols]) {
  using T = NarrowTile<kHeads>;
  wgmma_fence();
#pragma unroll
  for (int c = 0; c < T::kOTiles; ++c) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint64_t a =
          smem_desc_sw128(smem_address(v_chunk + c * kChunkBytes) + k * 2048, kChunkBytes, 1024);
      const uint64_t b = smem_desc_sw128(smem_address(p_tile) + k * 32, 0, 1024);
      mma_ss<typename T::ValueMma>(a, b, o[c], true, std::make_index_sequence<T::kCols>{});
    }
  }
  wgmma_commit();
  wgmma_wait<0>();
}

// The epilogue of one request in the narrow math: the score warpgroup shares each head's sum
// (per warp) and final max, both warpgroups normalise their dims of O^T and store them: the
// output (times the sink factor) and lse of an unsplit request, else its fp32 partial rows.
template <int kHeads, class Storage>
__device__ __forceinline__ void finish_narrow_request(
    const KernelArgs& args, Storage& smem, const RequestWork& w, int req, int token,
    bool score_wg, int& request_parity, const float (&max)[NarrowTile<kHeads>::kHeld],
    const float (&sum)[NarrowTile<kHeads>::kHeld], float value_scale,
    const float (&o)[NarrowTile<kHeads>::kOTiles][NarrowTile<kHeads>::kCols]) {
  using T = NarrowTile<kHeads>;
  const SparseDecodeParams& p = args.params;
  const int tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32;
  ColumnExchange& x = smem.columns;
  if (score_wg) {
#pragma unroll
    for (int i = 0; i < T::kHeld; ++i) {
      float s = sum[i];
      s += __shfl_xor_sync(0xffffffffu, s, 4);
      s += __shfl_xor_sync(0xffffffffu, s, 8);
      s += __shfl_xor_sync(0xffffffffu, s, 16);
      if (lane < 4) {
        x.sum[request_parity][warp][T::head(lane, i)] = s;
        if (warp == 0) x.max[request_parity][T::head(lane, i)] = max[i];
      }
    }
  }
  named_barrier_sync(kBarRowSum, kConsumerThreads);
  const int dim0 = (score_wg ? 0 : T::kOTiles) * kChunkElems + warp * 16 + lane / 4;
#pragma unroll
  for (int i = 0; i < T::kHeld; ++i) {
    const int head = T::head(lane, i);
    if (head >= p.h_q) continue;  // a padding column
    const float total = x.sum[request_parity][0][head] + x.sum[request_parity][1][head] +
                        x.sum[request_parity][2][head] + x.sum[request_parity][3][head];
    const float head_max = x.max[request_parity][head];
    const bool lonely = total == 0.f;
    const float lse = (head_max + log2f(total)) * kLn2;
    float factor = lonely ? 0.f : value_scale / total;
    if (!w.split && p.attn_sink != nullptr && !lonely) {
      factor *= 1.f / (1.f + expf(p.attn_sink[head] - lse));
    }
    const int64_t row_index =
        (static_cast<int64_t>(w.split ? w.split_row : req) * p.s_q + token) * p.h_q + head;
    const int j = i / 2, e = i % 2;
#pragma unroll
    for (int c = 0; c < T::kOTiles; ++c) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int dim = dim0 + c * kChunkElems + h * 8;
        const float value = o[c][j * 4 + h * 2 + e] * factor;
        if (w.split) {
          p.partial_o[row_index * kHeadDimV + dim] = value;
        } else {
          static_cast<Element*>(p.out)[row_index * kHeadDimV + dim] = __float2bfloat16_rn(value);
        }
      }
    }
    if (score_wg && warp == 0 && lane < 4) {
      if (w.split) {
        p.partial_lse[row_index] = lonely ? -INFINITY : lse;
      } else {
        p.lse[(static_cast<int64_t>(req) * p.h_q + head) * p.s_q + token] =
            lonely ? INFINITY : lse;
      }
    }
  }
  request_parity ^= 1;
}

// WG1 (score_wg) and WG2 of the narrow kernel: every request of the part, block by block, then
// its epilogue.
template <Fp8Layout kLayout, int kHeads, bool score_wg>
__device__ __forceinline__ void narrow_math_role(const KernelArgs& args,
                                                 SharedStorage<Geometry<kLayout, kHeads>>& smem,
                                                 const MetadataRow& part, int token) {
  using L = LayoutTraits<kLayout>;
  using G = Geometry<kLayout, kHeads>;
  using T = NarrowTile<kHeads>;
  const int tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32;
  const int keys[2] = {warp * 16 + lane / 4, warp * 16 + lane / 4 + 8};
  ColumnExchange& x = smem.columns;
  // E4M3 keys and values sit in the stage unscaled: the cache's scale goes into S's scale and
  // O's normalisation instead.
  const float k_scale = kLayout == Fp8Layout::kE4M3 ? *args.params.k_scale : 1.f;
  const float scale_log2 = args.scale_log2 * k_scale;
  uint8_t* kv = smem.kv[0];
  uint8_t* p_tile = kv + kPChunk * kChunkBytes;  // P^T: kHeads rows of 64 keys
  uint32_t blocks_done = 0;  // the K stage's phase = blocks_done % 2
  int request_parity = 0;    // also the phase of the Q barriers (one Q per request)
  for (int req = part.begin_req; req <= part.end_req; ++req) {
    const RequestWork w = request_work(args, part, req);
    float o[T::kOTiles][T::kCols];
#pragma unroll
    for (int c = 0; c < T::kOTiles; ++c) {
#pragma unroll
      for (int i = 0; i < T::kCols; ++i) o[c][i] = 0.f;
    }
    float max[T::kHeld], sum[T::kHeld];  // per held head (the score warpgroup's)
#pragma unroll
    for (int i = 0; i < T::kHeld; ++i) {
      max[i] = -INFINITY;
      sum[i] = 0.f;
    }
    if (score_wg) {
      mbarrier_wait(&smem.q_full, request_parity);
      if (w.lo >= w.hi) mbarrier_arrive(&smem.q_empty);  // nothing to score
    }
    for (int blk = w.lo; blk < w.hi; ++blk, ++blocks_done) {
      mbarrier_wait(&smem.kv_full[0], blocks_done % 2);
      uint64_t attending = 0;
#pragma unroll
      for (int g = 0; g < kBlockSlots / 8; ++g) {
        attending |= static_cast<uint64_t>(smem.attending[0][g] & 0xFFu) << (8 * g);
      }
      if (score_wg && attending == 0 && blk == w.hi - 1) mbarrier_arrive(&smem.q_empty);
      if (attending != 0) {
        float factor[T::kHeld];
        if (score_wg) {
          float s[T::kCols];
          wgmma_fence();
#pragma unroll
          for (int c = 0; c < L::kQKChunks; ++c) {
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              const uint64_t a =
                  smem_desc_sw128(smem_address(kv + c * kChunkBytes) + k * 32, 0, 1024);
              const uint64_t b =
                  smem_desc_sw128(smem_address(smem.q + c * G::kQChunkStride) + k * 32, 0, 1024);
              mma_ss<typename T::ScoreMma>(a, b, s, c > 0 || k > 0,
                                           std::make_index_sequence<T::kCols>{});
            }
          }
          wgmma_commit();
          wgmma_wait<0>();
          if (blk == w.hi - 1) mbarrier_arrive(&smem.q_empty);  // Q is free for the next request
          // Mask, scale and each head's maximum over the block: this warp's 16 keys, then all 64.
          const bool attends[2] = {((attending >> keys[0]) & 1) != 0,
                                   ((attending >> keys[1]) & 1) != 0};
          float block_max[T::kHeld];
#pragma unroll
          for (int i = 0; i < T::kHeld; ++i) {
            const int j = i / 2, e = i % 2;
            float m = -INFINITY;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              float& v = s[j * 4 + h * 2 + e];
              v = attends[h] ? v * scale_log2 : -INFINITY;
              m = fmaxf(m, v);
            }
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 4));
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 8));
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 16));
            if (lane < 4) x.block_max[warp][T::head(lane, i)] = m;
          }
          named_barrier_sync(kBarColumnMax, 128);
#pragma unroll
          for (int i = 0; i < T::kHeld; ++i) {
            const int head = T::head(lane, i);
            block_max[i] = fmaxf(fmaxf(x.block_max[0][head], x.block_max[1][head]),
                                 fmaxf(x.block_max[2][head], x.block_max[3][head]));
            // The reference max is raised only when the block exceeds it by kRescaleSlack.
            factor[i] = 1.f;
            if (block_max[i] > max[i] + kRescaleSlack) {
              factor[i] = fast_exp2(max[i] - softmax_base(block_max[i]));
              max[i] = block_max[i];
            }
          }
          uint32_t packed[T::kCols / 2];  // P^T, bfloat16 pairs: register 2 j + h
#pragma unroll
          for (int i = 0; i < T::kHeld; ++i) {
            const int j = i / 2, e = i % 2;
            const float base = softmax_base(max[i]);
            float block_sum = 0.f;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              float& v = s[j * 4 + h * 2 + e];
              v = fast_exp2(v - base);
              block_sum += v;
            }
            sum[i] = sum[i] * factor[i] + block_sum;
          }
#pragma unroll
          for (int j = 0; j < kHeads / 8; ++j) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              packed[2 * j + h] =
                  ElementTraits<Element>::pack(s[j * 4 + h * 2], s[j * 4 + h * 2 + 1]);
            }
          }
          // Matrix q of an x4 store is heads 8 (2 n + q / 2) .. + 7 x keys 16 warp + 8 (q % 2)
          // .. + 7; stored transposed, lane l's row is head 8 (2 n + l / 16) + l % 8, whose
          // 16-byte unit 2 warp + (l / 8) % 2 holds those keys.
#pragma unroll
          for (int n = 0; n < kHeads / 16; ++n) {
            const int head = 8 * (2 * n + lane / 16) + lane % 8;
            const int unit = 2 * warp + (lane / 8) % 2;
            stmatrix_x4_trans(smem_address(p_tile) + head * 128 + ((unit ^ (head % 8)) << 4),
                              packed[4 * n], packed[4 * n + 1], packed[4 * n + 2],
                              packed[4 * n + 3]);
          }
          fence_proxy_async_smem();  // P^T before the wgmma reads of it
          if (warp == 0 && lane < 4) {
#pragma unroll
            for (int i = 0; i < T::kHeld; ++i) x.factor[T::head(lane, i)] = factor[i];
          }
          named_barrier_sync(kBarPReady, kConsumerThreads);
        } else {
          named_barrier_sync(kBarPReady, kConsumerThreads);
#pragma unroll
          for (int i = 0; i < T::kHeld; ++i) factor[i] = x.factor[T::head(lane, i)];
        }
        bool rescale = false;
#pragma unroll
        for (int i = 0; i < T::kHeld; ++i) rescale |= factor[i] != 1.f;
        if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
          for (int c = 0; c < T::kOTiles; ++c) {
#pragma unroll
            for (int i = 0; i < T::kCols; ++i) o[c][i] *= factor[(i / 4) * 2 + i % 2];
          }
        }
        accumulate_pv_transposed<kHeads>(kv + (score_wg ? 0 : T::kOTiles) * kChunkBytes, p_tile, o);
      }
      mbarrier_arrive(&smem.kv_empty[0]);
    }
    finish_narrow_request<kHeads>(args, smem, w, req, token, score_wg, request_parity, max, sum,
                                  k_scale, o);
  }
}

// kPaired: h_q > 64, the two head tiles of a part and query token run as a cluster of two CTAs
// that share the gathering (each loads half of every block for both). kNarrowHeads (16 or 32):
// the narrow kernel (Geometry), for h_q up to that.
template <Fp8Layout kLayout, bool kPaired, int kNarrowHeads>
__global__ void __launch_bounds__(kThreads, 1)
    sparse_decode_kernel(const __grid_constant__ KernelArgs args) {
  using G = Geometry<kLayout, kNarrowHeads>;
  using Storage = SharedStorage<G>;
  static_assert(!(kPaired && G::kNarrow), "a narrow tile is never paired");
  extern __shared__ uint8_t smem_raw[];
  Storage& smem = *reinterpret_cast<Storage*>(
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
    for (int s = 0; s < G::kKvStages; ++s) {
      mbarrier_init(&smem.kv_full[s], kLoaderThreads);
      mbarrier_init(&smem.kv_empty[s], kConsumerThreads + (kPaired ? kConsumerThreads / 32 : 0));
    }
    for (int s = 0; s < G::kRawStages; ++s) mbarrier_init(&smem.raw_full[s], kLoaderThreads / 32);
    mbarrier_init(&smem.q_full, 1);
    mbarrier_init(&smem.q_empty, 128);
    fence_barrier_init();
  }
  if (args.q_box_rows < G::kQRows) {
    zero_unloaded_query_rows(smem.q, kStageChunks, args.q_box_rows, kThreads, G::kQRows);
  }
  if constexpr (kPaired) {
    cluster_sync();  // the other CTA's barriers are ready before anything reaches them
  } else {
    __syncthreads();
  }

  // Each role its own copy of the code, compiled to its own register count.
  if (threadIdx.x < kLoaderThreads) {
    registers_decrease<kLoaderRegisters>();
    if constexpr (G::kNarrow) {
      staged_load_role<kLayout, kNarrowHeads>(args, smem, part, token, head_tile);
    } else {
      load_role<kLayout, kPaired>(args, smem, part, token, head_tile);
    }
  } else if (threadIdx.x < kLoaderThreads + 128) {
    registers_increase<kScoreRegisters>();
    if constexpr (G::kNarrow) {
      narrow_math_role<kLayout, kNarrowHeads, true>(args, smem, part, token);
    } else {
      math_role<kLayout, kPaired, true>(args, smem, part, token, head_tile);
    }
  } else {
    registers_decrease<kValueRegisters>();  // setmaxnreg.inc may not lower the count
    if constexpr (G::kNarrow) {
      narrow_math_role<kLayout, kNarrowHeads, false>(args, smem, part, token);
    } else {
      math_role<kLayout, kPaired, false>(args, smem, part, token, head_tile);
    }
  }
  // The other CTA may still store into this one's shared memory or arrive on its barriers
  // until it is done too.
  if constexpr (kPaired) cluster_sync();
}

template <Fp8Layout kLayout, bool kPaired, int kNarrowHeads>
cudaError_t launch_variant(const KernelArgs& args, cudaStream_t stream) {
  constexpr auto kKernel = sparse_decode_kernel<kLayout, kPaired, kNarrowHeads>;
  // + slack to align the storage to 1024 bytes
  constexpr int kSmemBytes =
      static_cast<int>(sizeof(SharedStorage<Geometry<kLayout, kNarrowHeads>>)) + 1024;
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
// one-time setup on the device (launch.cuh): paired when there are two head tiles, narrow when
// the layout allows it and h_q <= 32.
template <Fp8Layout kLayout>
cudaError_t launch_typed(const KernelArgs& args, cudaStream_t stream) {
  if (args.head_tiles == 2) return launch_variant<kLayout, true, 0>(args, stream);
  const SparseDecodeParams& p = args.params;
  // MODEL1's narrow copies need 16-byte aligned blocks (Geometry): even pages in every cache.
  const bool copyable =
      kLayout != Fp8Layout::kModel1 ||
      (p.main.page % 2 == 0 && (p.extra.cache == nullptr || p.extra.page % 2 == 0));
  if (copyable && p.h_q <= 16) return launch_variant<kLayout, false, 16>(args, stream);
  if (copyable && p.h_q <= 32) return launch_variant<kLayout, false, 32>(args, stream);
  return launch_variant<kLayout, false, 0>(args, stream);
}

}  // namespace jfm::sm90::decode_sparse
