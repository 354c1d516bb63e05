// MEASURED AND NOT ADOPTED (kept in git history only): seesaw3, a rework of the staged seesaw
// dense decode kernel for sm_90a (WG1 runs P0 V0_R under its own softmax; pages read a pair ahead; stmatrix P stores). Correct (decode_check ALL PASS) but slower than kernel
// v1.2: results/h200/probes/decode_cycles_variants.txt, 2026-12-01 stop 9, and NOTES.md.
//
// 256 threads: two math warpgroups, no producer. Math warpgroup m owns the output columns
// [256 m, 256 m + 256) and the KV blocks of stage m (blocks lo + 2p + m of a request). One
// iteration handles the pair (b in stage 0, b + 1 in stage 1), both S already in registers:
//   WG0: softmax of S0 -> publish its reference max and factor -> O_L += P0 V0_L (P from
//        registers) -> stage 0's V_L chunks are free: load block b + 2's into them -> take
//        WG1's factor, P0 to shared memory at WG1's reference -> O_L += P1 V1_L (P1 from
//        shared memory) -> S0' = Q K(b + 2)^T as its chunks land -> free stage 1's V_L chunks.
//   WG1: take WG0's max and factor -> softmax of S1 -> publish -> P1 to shared memory ->
//        O_R += P1 V1_R -> O_R += P0 V0_R -> free stage 1's and stage 0's upper chunks (V_R and
//        the RoPE chunk) -> S1' = Q K(b + 3)^T.
// The TMA for a chunk group is issued by the warpgroup that frees it, right when it does (one
// mbarrier per 8 KB chunk), so each block's loads run while the rest of the iteration
// computes. P1 lives in Q's RoPE chunk (Q's RoPE part is held in registers; S's last chunk is
// an RS wgmma), P0 in a buffer of its own, so a K stage's RoPE chunk is free after S.
// The softmax reference max is raised lazily (kRescaleSlack), so the factors are almost always
// 1 and the rescales are skipped.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include <cute/arch/mma_sm90_gmma.hpp>

#include "kernels/common/combine.cuh"
#include "kernels/common/pdl.cuh"
#include "kernels/common/span.cuh"
#include "kernels/sm90/decode_dense/decode_dense_args.cuh"
#include "kernels/sm90/hopper.cuh"
#include "kernels/sm90/seesaw_helpers.cuh"

namespace jfm::sm90::decode_dense {

namespace GMMA = cute::SM90::GMMA;

constexpr int kChunkElems = 64;                            // elements in a 128-byte row
constexpr int kChunkBytes = 64 * 128;                      // one 64-row x 64-element chunk
constexpr int kQKChunks = kDecodeHeadDimQK / kChunkElems;  // 9
constexpr int kTileBytes = kQKChunks * kChunkBytes;        // a 64 x 576 tile
constexpr int kRopeChunk = kQKChunks - 1;
constexpr int kHalfChunks = 4;                             // chunks of one V half
constexpr int kThreads = 256;
constexpr int kHalfV = kDecodeHeadDimV / 2;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kRescaleSlack = 8.f;  // log2 units: P <= 2^8

// Named barriers (0 is __syncthreads), each between the two math warpgroups (256 threads).
constexpr uint32_t kBarP0 = 3;      // P0, WG0's reference max and factor are published
constexpr uint32_t kBarP1 = 4;      // P1, WG1's likewise
constexpr uint32_t kBarRope = 5;    // both copied Q's RoPE chunk to registers (P1 may go there)
constexpr uint32_t kBarRowSum = 6;  // both published a request's row sums
constexpr uint32_t kBarZeroed = 7;  // + warpgroup (128 threads): V rows past the end zeroed

struct SharedStorage {
  uint8_t q[kTileBytes];  // the RoPE chunk holds P1 once both warpgroups copied it
  uint8_t kv[2][kTileBytes];
  uint8_t p0[kChunkBytes];
  float ref[2][kDecodeTileRows];     // reference max after WG0's / WG1's block
  float factor[2][kDecodeTileRows];  // the factor each applied (1 unless raised)
  float row_sum[2][kDecodeTileRows];
  uint64_t kv_full[2][kQKChunks];
  uint64_t q_full;
};

template <typename Element>
struct ElementTraits;

template <>
struct ElementTraits<__nv_bfloat16> {
  using ScoreMmaSS = GMMA::MMA_64x64x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::K>;
  using ScoreMmaRS = GMMA::MMA_64x64x16_F32BF16BF16_RS<GMMA::Major::K, GMMA::Major::K>;
  using ValueMmaRS = GMMA::MMA_64x256x16_F32BF16BF16_RS<GMMA::Major::K, GMMA::Major::MN>;
  using ValueMmaSS = GMMA::MMA_64x256x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::MN>;
  __device__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __device__ static float2 unpack(uint32_t x) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&x));
  }
};

template <>
struct ElementTraits<__half> {
  using ScoreMmaSS = GMMA::MMA_64x64x16_F32F16F16_SS<GMMA::Major::K, GMMA::Major::K>;
  using ScoreMmaRS = GMMA::MMA_64x64x16_F32F16F16_RS<GMMA::Major::K, GMMA::Major::K>;
  using ValueMmaRS = GMMA::MMA_64x256x16_F32F16F16_RS<GMMA::Major::K, GMMA::Major::MN>;
  using ValueMmaSS = GMMA::MMA_64x256x16_F32F16F16_SS<GMMA::Major::K, GMMA::Major::MN>;
  __device__ static uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __device__ static float2 unpack(uint32_t x) {
    return __half22float2(*reinterpret_cast<__half2*>(&x));
  }
};

template <typename Mma, size_t... I>
__device__ __forceinline__ void mma_ss(uint64_t a, uint64_t b, float* d, bool accumulate,
                                       std::index_sequence<I...>) {
  Mma::fma(a, b, d[I]..., accumulate ? GMMA::ScaleOut::One : GMMA::ScaleOut::Zero);
}
template <typename Mma, size_t... I>
__device__ __forceinline__ void mma_rs(const uint32_t* a, uint64_t b, float* d, bool accumulate,
                                       std::index_sequence<I...>) {
  Mma::fma(a[0], a[1], a[2], a[3], b, d[I]...,
           accumulate ? GMMA::ScaleOut::One : GMMA::ScaleOut::Zero);
}

struct RequestWork {
  int length;
  int lo, hi;
  int split_row;
  bool split;
};

__device__ __forceinline__ RequestWork request_work(const DenseDecodeParams& p, const int* meta,
                                                    int req) {
  RequestWork w;
  w.length = max(p.cache_seqlens[req], 0);
  const int blocks = (w.length + kDecodePageSize - 1) / kDecodePageSize;
  const bool first = req == meta[0], last = req == meta[1];
  w.lo = first ? meta[2] : 0;
  w.hi = last ? min(meta[3], blocks) : blocks;
  w.split_row = p.num_splits[req] + (first ? meta[4] : 0);
  w.split = p.num_splits[req + 1] - p.num_splits[req] > 1;
  return w;
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float softmax_base(float ref) { return ref == -INFINITY ? 0.f : ref; }

template <int N>
__device__ __forceinline__ void pin_all(float (&x)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) pin(x[i]);
}

__device__ __forceinline__ uint64_t opaque(uint64_t x) {
  asm volatile("" : "+l"(x));
  return x;
}

// O (128 floats per thread; element i in row half (i / 2) % 2) *= factor per row.
__device__ __forceinline__ void rescale_rows(float (&o)[kHalfV / 2], const float (&f)[2]) {
#pragma unroll
  for (int i = 0; i < kHalfV / 2; ++i) o[i] *= f[(i / 2) % 2];
}

template <typename Element>
__global__ void __launch_bounds__(kThreads, 1)
    dense_decode_kernel(const __grid_constant__ KernelArgs args) {
  using Traits = ElementTraits<Element>;
  extern __shared__ uint8_t smem_raw[];
  SharedStorage& smem = *reinterpret_cast<SharedStorage*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const DenseDecodeParams& p = args.params;
  const TileShape& tile = args.tile;
  const int part = blockIdx.x, kv_head = blockIdx.y, q_tile = blockIdx.z;
  const int mw = threadIdx.x / 128;  // math warpgroup
  const int tid = threadIdx.x % 128;
  const int warp = tid / 32, lane = tid % 32;
  const int quad_col = (lane % 4) * 2;
  const int rows[2] = {warp * 16 + lane / 4, warp * 16 + lane / 4 + 8};

  pdl_wait();
  pdl_launch_dependents();
  int meta[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) meta[i] = p.tile_metadata[part * 8 + i];
  if (meta[0] > meta[1]) return;

  if (threadIdx.x == 0) {
    for (int s = 0; s < 2; ++s) {
      for (int c = 0; c < kQKChunks; ++c) mbarrier_init(&smem.kv_full[s][c], 1);
    }
    mbarrier_init(&smem.q_full, 1);
    fence_barrier_init();
    prefetch_tensor_map(&args.q_map);
    prefetch_tensor_map(&args.kv_map);
  }
  __syncthreads();
  if (mw == 0) JFM_SPAN_BEGIN();
  JFM_TRACE_INIT();

  const int s0 = (q_tile / tile.head_tiles) * tile.s_per_tile;
  const int j0 = (q_tile % tile.head_tiles) * tile.heads_per_tile;
  int row_s[2], row_head[2];
  bool row_valid[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int s = s0 + rows[h] / tile.heads_per_tile;
    const int j = j0 + rows[h] % tile.heads_per_tile;
    row_valid[h] = rows[h] < tile.heads_per_tile * tile.s_per_tile && s < p.s_q &&
                   j < tile.group;
    row_s[h] = s;
    row_head[h] = kv_head * tile.group + j;
  }
  const int col0 = mw * kHalfV;
  const uint32_t q_bytes = kQKChunks * 128 * tile.heads_per_tile * tile.s_per_tile;

  // Loads chunks [c_begin, c_end) of cache page `page` into `stage`; every thread calls it,
  // thread 0 of the warpgroup issues (predicated: no branch).
  const auto load_chunks = [&](bool pred, int stage, int page, int c_begin, int c_end) {
    const int token = page * kDecodePageSize;
    const bool issue = pred && tid == 0;
    for (int c = c_begin; c < c_end; ++c) {
      mbarrier_arrive_expect_tx_if(issue, &smem.kv_full[stage][c], kChunkBytes);
      tma_load_3d_if(issue, smem.kv[stage] + c * kChunkBytes, &args.kv_map,
                     &smem.kv_full[stage][c], c * kChunkElems, kv_head, token, kCacheEvictFirst);
    }
  };

  // Blocks loaded into each stage so far (barrier parities); scalars, not an array that
  // `mw` would index into local memory.
  uint32_t uses0 = 0, uses1 = 0;
  uint32_t q_phase = 0;
  for (int req = meta[0]; req <= meta[1]; ++req) {
    const RequestWork w = request_work(p, meta, req);
    const int n = max(w.hi - w.lo, 0);
    float o[kHalfV / 2];
#pragma unroll
    for (int i = 0; i < kHalfV / 2; ++i) o[i] = 0.f;
    float ref[2] = {-INFINITY, -INFINITY};  // reference max this warpgroup's O is relative to
    float row_sum[2] = {0.f, 0.f};          // share of the row sums of this warpgroup's blocks
    int key_limit[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      key_limit[h] = p.causal ? min(w.length, w.length - static_cast<int>(p.s_q) + row_s[h] + 1)
                              : w.length;
    }

    if (n > 0) {
      // Q and the first block of each stage (everything is free: the previous request ended
      // with a barrier of both warpgroups).
      if (threadIdx.x == 0) {
        mbarrier_arrive_expect_tx(&smem.q_full, q_bytes);
        for (int c = 0; c < kQKChunks; ++c) {
          tma_load_4d(smem.q + c * kChunkBytes, &args.q_map, &smem.q_full, c * kChunkElems, j0,
                      kv_head, static_cast<int>(req * p.s_q + s0));
        }
      }
      if (mw == 0 || n > 1) {
        load_chunks(true, mw, p.block_table[req * p.max_blocks_per_seq + w.lo + mw], 0,
                    kQKChunks);
      }
      mbarrier_wait(&smem.q_full, q_phase);
      q_phase ^= 1;
    }
    uint32_t q_rope[16];  // Q's RoPE chunk as wgmma A fragments (4 k-steps)
    if (n > 0) {
      const int row = warp * 16 + (lane / 8) % 2 * 8 + lane % 8;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int unit = 2 * k + lane / 16;
        uint32_t r[4];
        ldmatrix_x4(smem.q + kRopeChunk * kChunkBytes + row * 128 + ((unit ^ (row & 7)) << 4), r);
#pragma unroll
        for (int e = 0; e < 4; ++e) q_rope[4 * k + e] = r[e];
      }
      named_barrier_sync(kBarRope, 256);
    }

    float s[32];  // S of this warpgroup's current block
    // S = Q K^T for the block in `stage` (use `use`), committed as one group, chunk by chunk
    // in the order the chunks are loaded: V_L, RoPE, V_R. Q's RoPE part is in registers (an
    // RS product; not first: an RS product right behind the first mbarrier wait makes ptxas
    // serialise the wgmma pipeline, C7520).
    const auto issue_scores = [&](int stage, uint32_t use) {
      const uint32_t parity = use & 1;
      const uint64_t q_desc = opaque(smem_desc_sw128(smem_address(smem.q), 0, 1024));
      const uint64_t kv_desc = opaque(smem_desc_sw128(smem_address(smem.kv[stage]), 0, 1024));
#pragma unroll
      for (int i9 = 0; i9 < kQKChunks; ++i9) {
        const int c = i9 == kHalfChunks ? kRopeChunk : i9 < kHalfChunks ? i9 : i9 - 1;
        mbarrier_wait(&smem.kv_full[stage][c], parity);
        JFM_TRACE(10 + i9);
        pin_all(s);
        wgmma_fence();  // after the wait's branch, so that ptxas need not insert one
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const uint64_t b = kv_desc + ((c * kChunkBytes + k * 32) >> 4);
          if (c == kRopeChunk) {
            mma_rs<typename Traits::ScoreMmaRS>(q_rope + 4 * k, b, s, i9 > 0 || k > 0,
                                                std::make_index_sequence<32>{});
          } else {
            const uint64_t a = q_desc + ((c * kChunkBytes + k * 32) >> 4);
            mma_ss<typename Traits::ScoreMmaSS>(a, b, s, i9 > 0 || k > 0,
                                                std::make_index_sequence<32>{});
          }
        }
      }
      wgmma_commit();
    };
    // After S of block `blk` (in `stage`) is done: rows past the sequence end may hold
    // anything (NaN); zero their V so that 0 * NaN cannot reach O.
    const auto zero_tail = [&](int stage, int blk) {
      const int valid_rows = w.length - blk * kDecodePageSize;
      if (valid_rows < kDecodePageSize) {
        uint8_t* kv = smem.kv[stage];
        const int units = (kDecodePageSize - valid_rows) * (kDecodeHeadDimV / 8);
        for (int u = tid; u < units; u += 128) {
          const int row = valid_rows + u / (kDecodeHeadDimV / 8);
          const int piece = u % (kDecodeHeadDimV / 8);
          *reinterpret_cast<uint4*>(kv + (piece / 8) * kChunkBytes + row * 128 +
                                    (piece % 8) * 16) = make_uint4(0, 0, 0, 0);
        }
        fence_proxy_async_smem();
        named_barrier_sync(kBarZeroed + mw, 128);
      }
    };
    // Softmax of s (block `blk`) against reference `base_ref`: P (packed), its row sums, and
    // whether the warp's rows raise the reference (then new_ref / factor are set).
    uint32_t packed[16];
    const auto softmax = [&](int blk, const float (&base_ref)[2], float (&new_ref)[2],
                             float (&factor)[2], float (&sum)[2]) {
      float block_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int i = 0; i < 8; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int key = blk * kDecodePageSize + i * 8 + quad_col + e;
            float& x = s[i * 4 + h * 2 + e];
            x = key < key_limit[h] ? x * args.scale_log2 : -INFINITY;
            block_max[h] = fmaxf(block_max[h], x);
          }
        }
      }
      const auto exponentiate = [&](const float (&r)[2]) {
        const float base[2] = {softmax_base(r[0]), softmax_base(r[1])};
        sum[0] = sum[1] = 0.f;
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          const float p0 = fast_exp2(s[2 * i] - base[i % 2]);
          const float p1 = fast_exp2(s[2 * i + 1] - base[i % 2]);
          sum[i % 2] += p0 + p1;
          packed[i] = Traits::pack(p0, p1);
        }
      };
      exponentiate(base_ref);
      bool raise = false;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        block_max[h] = fmaxf(block_max[h], __shfl_xor_sync(0xffffffff, block_max[h], 1));
        block_max[h] = fmaxf(block_max[h], __shfl_xor_sync(0xffffffff, block_max[h], 2));
        raise |= block_max[h] > base_ref[h] + kRescaleSlack;
        new_ref[h] = base_ref[h];
        factor[h] = 1.f;
      }
      if (__any_sync(0xffffffff, raise)) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          new_ref[h] = fmaxf(base_ref[h], block_max[h]);
          factor[h] = fast_exp2(base_ref[h] - softmax_base(new_ref[h]));
        }
        exponentiate(new_ref);
      }
    };
    // P (packed) to `dst`, a 64 x 64 swizzled K-major tile.
    const auto store_p = [&](uint8_t* dst) {
      const int row = warp * 16 + (lane / 8) % 2 * 8 + lane % 8;
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const int unit = 2 * t + lane / 16;
        stmatrix_x4(dst + row * 128 + ((unit ^ (row & 7)) << 4), packed[4 * t],
                    packed[4 * t + 1], packed[4 * t + 2], packed[4 * t + 3]);
      }
      fence_proxy_async_smem();
    };
    const auto pv_registers = [&](int stage, int half) {
      const uint32_t kv_addr = smem_address(smem.kv[stage]);
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint64_t b = smem_desc_sw128(kv_addr + half * kHalfChunks * kChunkBytes + k * 2048,
                                           kChunkBytes, 1024);
        mma_rs<typename Traits::ValueMmaRS>(packed + 4 * k, b, o, true,
                                            std::make_index_sequence<kHalfV / 2>{});
      }
      wgmma_commit();
    };
    const auto pv_shared = [&](const uint8_t* p_tile, int stage, int half) {
      const uint32_t kv_addr = smem_address(smem.kv[stage]);
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint64_t a = smem_desc_sw128(smem_address(p_tile) + k * 32, 0, 1024);
        const uint64_t b = smem_desc_sw128(kv_addr + half * kHalfChunks * kChunkBytes + k * 2048,
                                           kChunkBytes, 1024);
        mma_ss<typename Traits::ValueMmaSS>(a, b, o, true, std::make_index_sequence<kHalfV / 2>{});
      }
      wgmma_commit();
    };
    const auto publish = [&](const float (&r)[2], const float (&f)[2]) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // the quad's 4 lanes store the same values
        smem.ref[mw][rows[h]] = r[h];
        smem.factor[mw][rows[h]] = f[h];
      }
    };

    // One pair: blocks b (stage 0) and, if kHas1, b + 1 (stage 1); kNext0 / kNext1: blocks
    // b + 2 / b + 3 exist (their loads and S are issued here). WG1 runs a softmax behind WG0:
    // it starts its P0 V0_R as soon as P0 is published and computes its own softmax under it,
    // so that the tensor cores work during both softmaxes and stage 0 is refilled early.
    const auto pair = [&](int b, uint32_t pair_index, auto has1, auto next0, auto next1) {
      constexpr bool kHas1 = decltype(has1)::value;
      constexpr bool kNext0 = decltype(next0)::value;
      constexpr bool kNext1 = decltype(next1)::value;
      const uint32_t use0 = uses0 + pair_index, use1 = uses1 + pair_index;
      // The next pair's pages, read now so that their loads need not wait for them.
      const int* table = p.block_table + req * p.max_blocks_per_seq;
      const int page0 = kNext0 ? table[b + 2] : 0;
      const int page1 = kNext1 ? table[b + 3] : 0;
      uint8_t* const p1_tile = smem.q + kRopeChunk * kChunkBytes;
      if (mw == 0) {
        JFM_TRACE(1);
        float new_ref[2], f0[2], sum[2];
        softmax(b, ref, new_ref, f0, sum);
        store_p(smem.p0);
        publish(new_ref, f0);
        named_barrier_arrive(kBarP0, 256);
        JFM_TRACE(2);
        if (__any_sync(0xffffffff, f0[0] != 1.f || f0[1] != 1.f)) rescale_rows(o, f0);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          row_sum[h] = row_sum[h] * f0[h] + sum[h];
          ref[h] = new_ref[h];
        }
        pin_all(o);
        pv_registers(0, 0);
        wgmma_wait<0>();
        JFM_TRACE(3);
        pin_all(o);
        load_chunks(kNext0, 0, page0, 0, kHalfChunks);
        load_chunks(kNext0, 0, page0, kRopeChunk, kQKChunks);
        if constexpr (kHas1) {
          named_barrier_sync(kBarP1, 256);
          JFM_TRACE(4);
          float f1[2];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            f1[h] = smem.factor[1][rows[h]];
            ref[h] = smem.ref[1][rows[h]];
            row_sum[h] *= f1[h];
          }
          if (__any_sync(0xffffffff, f1[0] != 1.f || f1[1] != 1.f)) rescale_rows(o, f1);
          for (int c = 0; c < kHalfChunks; ++c) mbarrier_wait(&smem.kv_full[1][c], use1 & 1);
          pin_all(o);
          pv_shared(p1_tile, 1, 0);
          JFM_TRACE(5);
        }
        if constexpr (kNext0) {
          issue_scores(0, use0 + 1);
          JFM_TRACE(6);
          if constexpr (kHas1) {
            wgmma_wait<1>();
            pin_all(o);
            load_chunks(kNext1, 1, page1, 0, kHalfChunks);
          }
          wgmma_wait<0>();
          JFM_TRACE(7);
          pin_all(o);
          pin_all(s);
          zero_tail(0, b + 2);
        } else {
          wgmma_wait<0>();
          pin_all(o);
        }
      } else {
        JFM_TRACE(21);
        named_barrier_sync(kBarP0, 256);
        JFM_TRACE(22);
        float r0[2], f0[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          r0[h] = smem.ref[0][rows[h]];
          f0[h] = smem.factor[0][rows[h]];
          row_sum[h] *= f0[h];
        }
        if (__any_sync(0xffffffff, f0[0] != 1.f || f0[1] != 1.f)) rescale_rows(o, f0);
        for (int c = 0; c < kHalfChunks; ++c) {
          mbarrier_wait(&smem.kv_full[0][kHalfChunks + c], use0 & 1);
        }
        pin_all(o);
        pv_shared(smem.p0, 0, 1);
        JFM_TRACE(23);
        if constexpr (kHas1) {
          float new_ref[2], f1[2], sum[2];
          softmax(b + 1, r0, new_ref, f1, sum);
          store_p(p1_tile);
          publish(new_ref, f1);
          named_barrier_arrive(kBarP1, 256);
          JFM_TRACE(24);
          wgmma_wait<0>();
          JFM_TRACE(25);
          pin_all(o);
          load_chunks(kNext0, 0, page0, kHalfChunks, 2 * kHalfChunks);
          load_chunks(kNext1, 1, page1, kRopeChunk, kQKChunks);
          if (__any_sync(0xffffffff, f1[0] != 1.f || f1[1] != 1.f)) rescale_rows(o, f1);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            row_sum[h] = row_sum[h] * f1[h] + sum[h];
            ref[h] = new_ref[h];
          }
          pin_all(o);
          pv_registers(1, 1);
          JFM_TRACE(26);
          wgmma_wait<0>();
          JFM_TRACE(27);
          pin_all(o);
          load_chunks(kNext1, 1, page1, kHalfChunks, 2 * kHalfChunks);
          if constexpr (kNext1) {
            issue_scores(1, use1 + 1);
            JFM_TRACE(29);
            wgmma_wait<0>();
            JFM_TRACE(28);
            pin_all(s);
            zero_tail(1, b + 3);
          }
        } else {
#pragma unroll
          for (int h = 0; h < 2; ++h) ref[h] = r0[h];
          wgmma_wait<0>();
          pin_all(o);
        }
      }
    };

    if (n > 0) {
      // The first pair's S.
      if (mw == 0 || n > 1) {
        issue_scores(mw, mw == 0 ? uses0 : uses1);
        wgmma_wait<0>();
        pin_all(s);
        zero_tail(mw, w.lo + mw);
      }
      uint32_t pair_index = 0;
      for (int b = w.lo; b < w.hi; b += 2, ++pair_index) {
        if (b + 3 < w.hi) {
          pair(b, pair_index, std::true_type{}, std::true_type{}, std::true_type{});
        } else if (b + 2 < w.hi) {
          pair(b, pair_index, std::true_type{}, std::true_type{}, std::false_type{});
        } else if (b + 1 < w.hi) {
          pair(b, pair_index, std::true_type{}, std::false_type{}, std::false_type{});
        } else {
          pair(b, pair_index, std::false_type{}, std::false_type{}, std::false_type{});
        }
      }
      uses0 += (n + 1) / 2;
      uses1 += n / 2;
    }

    // ---- Finish the request: both halves of O are relative to the same reference.
    float(*shared_sum)[kDecodeTileRows] = smem.row_sum;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_sum[h] += __shfl_xor_sync(0xffffffff, row_sum[h], 1);
      row_sum[h] += __shfl_xor_sync(0xffffffff, row_sum[h], 2);
      if (lane % 4 == 0) shared_sum[mw][rows[h]] = row_sum[h];
    }
    named_barrier_sync(kBarRowSum, 256);
#pragma unroll
    for (int h = 0; h < 2; ++h) row_sum[h] += shared_sum[1 - mw][rows[h]];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (!row_valid[h]) continue;
      const float inv = row_sum[h] > 0.f ? 1.f / row_sum[h] : 0.f;
      const int64_t row_index = (static_cast<int64_t>(w.split ? w.split_row : req) * p.s_q +
                                 row_s[h]) * p.h_q + row_head[h];
      if (w.split) {
        float* dst = p.partial_o + row_index * kDecodeHeadDimV + col0 + quad_col;
#pragma unroll
        for (int i = 0; i < kHalfV / 8; ++i) {
          *reinterpret_cast<float2*>(dst + i * 8) =
              make_float2(o[i * 4 + h * 2] * inv, o[i * 4 + h * 2 + 1] * inv);
        }
      } else {
        Element* dst = static_cast<Element*>(p.out) + row_index * kDecodeHeadDimV + col0 + quad_col;
#pragma unroll
        for (int i = 0; i < kHalfV / 8; ++i) {
          *reinterpret_cast<uint32_t*>(dst + i * 8) =
              Traits::pack(o[i * 4 + h * 2] * inv, o[i * 4 + h * 2 + 1] * inv);
        }
      }
      if (mw == 0 && lane % 4 == 0) {
        const bool lonely = row_sum[h] == 0.f;
        const float lse = (ref[h] + log2f(row_sum[h])) * kLn2;
        if (w.split) {
          p.partial_lse[row_index] = lonely ? -INFINITY : lse;
        } else {
          p.lse[(static_cast<int64_t>(req) * p.h_q + row_head[h]) * p.s_q + row_s[h]] =
              lonely ? INFINITY : lse;
        }
      }
    }
    // Both warpgroups are done with every buffer before the next request's loads.
    named_barrier_sync(kBarRowSum, 256);
  }
  if (mw == 0) JFM_SPAN_END();
}

template <typename Element>
cudaError_t launch_typed(const KernelArgs& args, cudaStream_t stream) {
  const auto kernel = dense_decode_kernel<Element>;
  const int smem_bytes = static_cast<int>(sizeof(SharedStorage)) + 1024;  // + alignment slack
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(args.params.num_parts),
                  static_cast<unsigned>(args.params.h_kv),
                  static_cast<unsigned>(args.tile.num_tiles));
  return launch_with_pdl(kernel, grid, dim3(kThreads), smem_bytes, stream, args);
}

}  // namespace jfm::sm90::decode_dense
