// The dense MLA decode kernel for sm_90a. Included by one translation unit per element type.
//
// Roles (384 threads, three warpgroups):
//   WG0, producer: one thread issues TMA loads of the query tile and of every 64-token KV
//     block (9 chunks of 64 dims x 64 rows, 128-byte swizzled) into a 2-stage ring.
//   WG1, "score" warpgroup: S = Q K^T on wgmma (both operands in shared memory), the online
//     softmax in fp32 against a lazily raised reference max (O is rescaled only when a row's
//     scores pass its reference by more than 2^8, so almost never after the first blocks),
//     P handed to WG2 through shared memory (in the block's RoPE chunk, which nothing reads
//     once S is done), then O[:, 0:256] += P V[:, 0:256] with P from registers.
//   WG2, "value" warpgroup: rescales O[:, 256:512] by WG1's per-row factors when one is not 1,
//     and adds P V[:, 256:512] with P read from shared memory into registers.
// So the tensor cores alternate between WG1's S of block j+1 and WG2's half of P V of block j.
// The query tiles that share a KV head run as CTA pairs of one cluster (launch_typed), so that
// each KV block comes from DRAM once.
// JFM_TRACE events (recorded only in probe builds, span.cuh): producer 20 the Q buffer is free
// for the next request, 21 a stage is free; WG1 10 the request's Q landed, 1 KV block landed,
// 2 S done, 5 exponentials done, 6 P stored, 3 P published, 4 its P V done, 8 its stage
// released, 9 its next block not there yet; WG2 12 P received, 13 P V done, 18 its stage
// released, 19 its next block not there yet; both 14 the request's blocks done, 15 row sums
// shared, 16 its outputs stored.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <utility>

#include <cute/arch/mma_sm90_gmma.hpp>

#include "kernels/common/combine.cuh"
#include "kernels/common/pdl.cuh"
#include "kernels/common/span.cuh"
#include "kernels/sm90/decode_dense/decode_dense_args.cuh"
#include "kernels/sm90/hopper.cuh"

namespace jfm::sm90::decode_dense {

namespace GMMA = cute::SM90::GMMA;

constexpr int kChunkElems = 64;                  // elements in one 128-byte swizzled row
constexpr int kChunkBytes = 64 * 128;            // one 64-row x 64-element chunk
constexpr int kQKChunks = kDecodeHeadDimQK / kChunkElems;  // 9
constexpr int kTileBytes = kQKChunks * kChunkBytes;        // a 64 x 576 tile
constexpr int kRopeChunk = kQKChunks - 1;        // holds P once S is computed
constexpr int kStages = 2;
constexpr int kThreads = 384;
constexpr int kHalfV = kDecodeHeadDimV / 2;      // 256 output columns per math warpgroup
constexpr int kConsumerThreads = 256;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// How far (log2 units) a row's scores may exceed its reference max before the reference is
// raised and O rescaled: P stays <= 2^8, far from overflowing fp32 sums or bf16.
constexpr float kRescaleSlack = 8.f;

// Named barriers (0 is __syncthreads).
constexpr uint32_t kBarPReady = 1;  // + stage: WG1 published P and the row factors
constexpr uint32_t kBarRowSum = 3;  // WG1 published the final row sums of a request

struct alignas(1024) SharedStorage {
  uint8_t q[kTileBytes];
  uint8_t kv[kStages][kTileBytes];
  float row_factor[kStages][kDecodeTileRows];  // exp2(m_old - m_new) per row and block
  float row_sum[2][kDecodeTileRows];           // final softmax denominators, per request parity
  uint64_t kv_full[kStages];
  uint64_t kv_empty[kStages];
  uint64_t q_full;
  uint64_t q_empty;
};

template <typename Element>
struct ElementTraits;

template <>
struct ElementTraits<__nv_bfloat16> {
  using ScoreMma = GMMA::MMA_64x64x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::K>;
  using ValueMmaRS = GMMA::MMA_64x256x16_F32BF16BF16_RS<GMMA::Major::K, GMMA::Major::MN>;
  __device__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

template <>
struct ElementTraits<__half> {
  using ScoreMma = GMMA::MMA_64x64x16_F32F16F16_SS<GMMA::Major::K, GMMA::Major::K>;
  using ValueMmaRS = GMMA::MMA_64x256x16_F32F16F16_RS<GMMA::Major::K, GMMA::Major::MN>;
  __device__ static uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

// Calls a CuTe wgmma wrapper with an accumulator array spread into its N register arguments.
template <typename Mma, size_t... I>
__device__ __forceinline__ void mma_ss(uint64_t a, uint64_t b, float* d, bool accumulate,
                                       std::index_sequence<I...>) {
  Mma::fma(a, b, d[I]..., accumulate ? GMMA::ScaleOut::One : GMMA::ScaleOut::Zero);
}
template <typename Mma, size_t... I>
__device__ __forceinline__ void mma_rs(const uint32_t* a, uint64_t b, float* d,
                                       std::index_sequence<I...>) {
  Mma::fma(a[0], a[1], a[2], a[3], b, d[I]..., GMMA::ScaleOut::One);
}

// The KV range [lo, hi) (in 64-token blocks) a part processes for request `req`, and where
// its result goes.
struct RequestWork {
  int length;     // cache_seqlens[req]
  int lo, hi;     // block range
  int split_row;  // row of partial_o / partial_lse when split
  bool split;     // the request is split across parts: write partials
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

// exp2 as one MUFU.EX2 (exp2f adds range handling around it). Inputs are <= 0 here (scores
// minus their running max), -inf gives +0; the relative error, ~2^-22, is far below bf16's.
// Measured on the H200: 7% fewer cycles per KV block than exp2f.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The value a row's P is taken relative to: its reference max, or 0 while every key so far is
// masked (max -inf), so that exp2(-inf - 0) = 0.
__device__ __forceinline__ float softmax_base(float row_max) {
  return row_max == -INFINITY ? 0.f : row_max;
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
  const int warpgroup = threadIdx.x / 128;
  JFM_TRACE_INIT();  // event trace for probes (span.cuh); nothing unless JFM_KERNEL_TRACE

  // Launched with programmatic dependent launch: wait for the previous kernel on the stream
  // (which may produce q or the metadata), then let the combine kernel launch early.
  pdl_wait();
  pdl_launch_dependents();
  int meta[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) meta[i] = p.tile_metadata[part * 8 + i];
  if (meta[0] > meta[1]) return;  // an empty part

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&smem.kv_full[s], 1);
      mbarrier_init(&smem.kv_empty[s], kConsumerThreads);
    }
    mbarrier_init(&smem.q_full, 1);
    mbarrier_init(&smem.q_empty, 128);
    fence_barrier_init();
  }
  __syncthreads();

  const int s0 = (q_tile / tile.head_tiles) * tile.s_per_tile;
  const int j0 = (q_tile % tile.head_tiles) * tile.heads_per_tile;

  if (warpgroup == 0) {
    // ---------------------------------------------------------------- producer
    registers_decrease<40>();
    if (threadIdx.x != 0) return;
    prefetch_tensor_map(&args.q_map);
    prefetch_tensor_map(&args.kv_map);
    const uint32_t q_bytes = kQKChunks * 128 * tile.heads_per_tile * tile.s_per_tile;
    int stage = 0;
    uint32_t kv_phase = 0, q_phase = 0;
    for (int req = meta[0]; req <= meta[1]; ++req) {
      const RequestWork w = request_work(p, meta, req);
      if (w.lo >= w.hi) continue;
      mbarrier_wait(&smem.q_empty, q_phase ^ 1);
      JFM_TRACE(20);
      q_phase ^= 1;
      mbarrier_arrive_expect_tx(&smem.q_full, q_bytes);
      for (int c = 0; c < kQKChunks; ++c) {
        tma_load_4d(smem.q + c * kChunkBytes, &args.q_map, &smem.q_full, c * kChunkElems, j0,
                    kv_head, static_cast<int>(req * p.s_q + s0));
      }
      const int* table = p.block_table + req * p.max_blocks_per_seq;
      for (int blk = w.lo; blk < w.hi; ++blk) {
        const int physical = table[blk];
        mbarrier_wait(&smem.kv_empty[stage], kv_phase ^ 1);
        JFM_TRACE(21);
        mbarrier_arrive_expect_tx(&smem.kv_full[stage], kTileBytes);
        for (int c = 0; c < kQKChunks; ++c) {
          tma_load_3d(smem.kv[stage] + c * kChunkBytes, &args.kv_map, &smem.kv_full[stage],
                      c * kChunkElems, kv_head, physical * kDecodePageSize, args.kv_cache_hint);
        }
        if (++stage == kStages) {
          stage = 0;
          kv_phase ^= 1;
        }
      }
    }
    return;
  }

  // -------------------------------------------------------------------- math warpgroups
  registers_increase<232>();
  if (warpgroup == 1) JFM_SPAN_BEGIN();
  const bool score_wg = warpgroup == 1;
  const int tid = threadIdx.x % 128;
  const int warp = tid / 32, lane = tid % 32;
  const int quad_col = (lane % 4) * 2;
  // This thread's two accumulator rows within the 64-row tile.
  const int rows[2] = {warp * 16 + lane / 4, warp * 16 + lane / 4 + 8};
  // P goes from WG1 to WG2 through shared memory (64 x 64, 128-byte swizzled rows), one
  // stmatrix / ldmatrix x4 per 16 keys t: this lane's address in it is row
  // warp * 16 + (lane / 8) % 2 * 8 + lane % 8, 16-byte unit 2 t + lane / 16.
  const int p_row = warp * 16 + (lane / 8) % 2 * 8 + lane % 8;
  const auto p_offset = [&](int t) {
    return p_row * 128 + (((2 * t + lane / 16) ^ (p_row & 7)) << 4);
  };
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
  const int col0 = score_wg ? 0 : kHalfV;

  int stage = 0;
  uint32_t kv_phase = 0, q_phase = 0;
  int request_parity = 0;
  for (int req = meta[0]; req <= meta[1]; ++req) {
    const RequestWork w = request_work(p, meta, req);
    float o[kHalfV / 2];  // 64 x 256 accumulator slice: 128 per thread
#pragma unroll
    for (int i = 0; i < kHalfV / 2; ++i) o[i] = 0.f;
    // Per row: the reference max (log2 domain, -inf until a key is seen) that P, O and the row
    // sum are relative to, and this thread's share of the row sum.
    float row_max[2] = {-INFINITY, -INFINITY};
    float row_sum[2] = {0.f, 0.f};
    // Keys t < key_limit[h] are attendable for row h (bottom-right causal).
    int key_limit[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      key_limit[h] = p.causal ? min(w.length, w.length - static_cast<int>(p.s_q) + row_s[h] + 1)
                              : w.length;
    }

    if (score_wg && w.lo < w.hi) {
      mbarrier_wait(&smem.q_full, q_phase);
      JFM_TRACE(10);
      q_phase ^= 1;
    }
    for (int blk = w.lo; blk < w.hi; ++blk) {
      JFM_TRACE_IF_PENDING(&smem.kv_full[stage], kv_phase, score_wg ? 9 : 19);  // must wait
      mbarrier_wait(&smem.kv_full[stage], kv_phase);
      JFM_TRACE(1);
      uint8_t* kv = smem.kv[stage];
      uint8_t* p_tile = kv + kRopeChunk * kChunkBytes;
      if (score_wg) {
        // ---- S = Q K^T over the 576 dims: 9 chunks x 4 k-steps of 16.
        float s[32];
        wgmma_fence();
#pragma unroll
        for (int c = 0; c < kQKChunks; ++c) {
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const uint64_t a = smem_desc_sw128(smem_address(smem.q + c * kChunkBytes) + k * 32,
                                               0, 1024);
            const uint64_t b = smem_desc_sw128(smem_address(kv + c * kChunkBytes) + k * 32, 0,
                                               1024);
            mma_ss<typename Traits::ScoreMma>(a, b, s, c > 0 || k > 0,
                                              std::make_index_sequence<32>{});
          }
        }
        wgmma_commit();
        wgmma_wait<0>();
        JFM_TRACE(2);
        if (blk == w.hi - 1) mbarrier_arrive(&smem.q_empty);  // Q is free for the next request

        // ---- Rows past the sequence end in its last block may hold anything (NaN): zero
        // their V part so that 0 * NaN cannot reach the output through P V.
        const int valid_rows = w.length - blk * kDecodePageSize;
        if (valid_rows < kDecodePageSize) {
          const int units = (kDecodePageSize - valid_rows) * (kDecodeHeadDimV / 8);
          for (int u = tid; u < units; u += 128) {
            const int row = valid_rows + u / (kDecodeHeadDimV / 8);
            const int piece = u % (kDecodeHeadDimV / 8);  // 16-byte piece of the row's V
            const int chunk = piece / 8, unit = piece % 8;
            *reinterpret_cast<uint4*>(kv + chunk * kChunkBytes + row * 128 + unit * 16) =
                make_uint4(0, 0, 0, 0);
          }
          fence_proxy_async_smem();  // the zeros before the wgmma reads of V
        }

        // ---- Online softmax in the log2 domain, against a reference max that is raised lazily:
        // only when a row's max exceeds it by more than kRescaleSlack. So P <= 2^kRescaleSlack,
        // and most blocks neither rescale O nor wait for the row max before exponentiating.
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
        uint32_t packed[16];  // P in the register layout of a wgmma A operand (row i % 2)
        float block_sum[2];
        const auto exponentiate = [&] {
          const float base[2] = {softmax_base(row_max[0]), softmax_base(row_max[1])};
          block_sum[0] = block_sum[1] = 0.f;
#pragma unroll
          for (int i = 0; i < 16; ++i) {
            const float p0 = fast_exp2(s[2 * i] - base[i % 2]);
            const float p1 = fast_exp2(s[2 * i + 1] - base[i % 2]);
            block_sum[i % 2] += p0 + p1;
            packed[i] = Traits::pack(p0, p1);
          }
        };
        exponentiate();  // against the current reference, while the row max is reduced
        JFM_TRACE(5);
        bool raise = false;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          block_max[h] = fmaxf(block_max[h], __shfl_xor_sync(0xffffffff, block_max[h], 1));
          block_max[h] = fmaxf(block_max[h], __shfl_xor_sync(0xffffffff, block_max[h], 2));
          raise |= block_max[h] > row_max[h] + kRescaleSlack;
        }
        float factor[2] = {1.f, 1.f};
        if (__any_sync(0xffffffff, raise)) {  // per warp: its 16 rows
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float new_max = fmaxf(row_max[h], block_max[h]);
            factor[h] = fast_exp2(row_max[h] - softmax_base(new_max));
            row_max[h] = new_max;
          }
          exponentiate();
#pragma unroll
          for (int i = 0; i < kHalfV / 2; ++i) o[i] *= factor[(i / 2) % 2];
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) row_sum[h] = row_sum[h] * factor[h] + block_sum[h];
        // P to shared memory for WG2, which reads it back into registers with ldmatrix (a
        // generic-proxy read: no proxy fence on this path).
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          stmatrix_x4(p_tile + p_offset(t), packed[4 * t], packed[4 * t + 1], packed[4 * t + 2],
                      packed[4 * t + 3]);
        }
        if (lane % 4 == 0) {
          smem.row_factor[stage][rows[0]] = factor[0];
          smem.row_factor[stage][rows[1]] = factor[1];
        }
        JFM_TRACE(6);
        named_barrier_arrive(kBarPReady + stage, kConsumerThreads);
        JFM_TRACE(3);

        // ---- O[:, 0:256] += P V[:, 0:256] (O was rescaled above if needed)
        wgmma_fence();
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const uint64_t b = smem_desc_sw128(smem_address(kv) + k * 2048, kChunkBytes, 1024);
          mma_rs<typename Traits::ValueMmaRS>(packed + 4 * k, b, o,
                                              std::make_index_sequence<kHalfV / 2>{});
        }
        wgmma_commit();
        wgmma_wait<0>();
        JFM_TRACE(4);
      } else {
        // ---- O[:, 256:512] = O * factor + P V[:, 256:512], P from WG1 via shared memory.
        named_barrier_sync(kBarPReady + stage, kConsumerThreads);
        JFM_TRACE(12);
        const float factor[2] = {smem.row_factor[stage][rows[0]],
                                 smem.row_factor[stage][rows[1]]};
        if (__any_sync(0xffffffff, factor[0] != 1.f || factor[1] != 1.f)) {
#pragma unroll
          for (int i = 0; i < kHalfV / 2; ++i) o[i] *= factor[(i / 2) % 2];
        }
        uint32_t packed[16];  // P, read back in the layout WG1 holds it in
#pragma unroll
        for (int t = 0; t < 4; ++t) ldmatrix_x4(p_tile + p_offset(t), packed + 4 * t);
        wgmma_fence();
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const uint64_t b = smem_desc_sw128(smem_address(kv + 4 * kChunkBytes) + k * 2048,
                                             kChunkBytes, 1024);
          mma_rs<typename Traits::ValueMmaRS>(packed + 4 * k, b, o,
                                              std::make_index_sequence<kHalfV / 2>{});
        }
        wgmma_commit();
        wgmma_wait<0>();
        JFM_TRACE(13);
      }
      // P's generic-proxy writes before the TMA (async proxy) refills this stage.
      if (score_wg) fence_proxy_async_smem();
      mbarrier_arrive(&smem.kv_empty[stage]);
      JFM_TRACE(score_wg ? 8 : 18);  // then 8 -> 1 (18 -> 1) is the wait for the next block
      if (++stage == kStages) {
        stage = 0;
        kv_phase ^= 1;
      }
    }

    // ---- Finish the request: share the row sums, normalise, write out.
    JFM_TRACE(14);
    float* shared_sum = smem.row_sum[request_parity];
    if (score_wg) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        row_sum[h] += __shfl_xor_sync(0xffffffff, row_sum[h], 1);
        row_sum[h] += __shfl_xor_sync(0xffffffff, row_sum[h], 2);
        if (lane % 4 == 0) shared_sum[rows[h]] = row_sum[h];
      }
    }
    named_barrier_sync(kBarRowSum, kConsumerThreads);
    JFM_TRACE(15);
    if (!score_wg) {
      row_sum[0] = shared_sum[rows[0]];
      row_sum[1] = shared_sum[rows[1]];
    }
    request_parity ^= 1;
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
      if (score_wg && lane % 4 == 0) {
        const bool lonely = row_sum[h] == 0.f;
        const float lse = (row_max[h] + log2f(row_sum[h])) * kLn2;
        if (w.split) {
          p.partial_lse[row_index] = lonely ? -INFINITY : lse;
        } else {
          p.lse[(static_cast<int64_t>(req) * p.h_q + row_head[h]) * p.s_q + row_s[h]] =
              lonely ? INFINITY : lse;
        }
      }
    }
    JFM_TRACE(16);
  }
  if (warpgroup == 1) JFM_SPAN_END();
}

// The query tiles of one (part, KV head) all read the same KV blocks. Launched in clusters of
// kClusterTiles, the tiles of a cluster share a GPC, so a block's second read hits the L2
// instead of going to DRAM again (H200, s_q 2, s_k 16384: 5.1 GB read from DRAM without
// clusters, 2.5 GB with, for 2.5 GB of cache; 7-9% less time). Clusters of 4 would leave SMs
// idle on the H200 (its GPCs do not divide into them).
constexpr int kClusterTiles = 2;

// CTAs of the kernel resident at once on the current device when launched in clusters of
// `cluster_tiles` CTAs along z (1: plain launch); 0 if unknown. Cached per device.
template <typename Element>
int resident_ctas(int cluster_tiles, int smem_bytes) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices][2] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  std::atomic<int>* slot = device < kMaxDevices ? &cache[device][cluster_tiles > 1] : nullptr;
  if (slot != nullptr && slot->load() > 0) return slot->load();
  const auto kernel = dense_decode_kernel<Element>;
  int ctas = 0;
  if (cluster_tiles == 1) {
    int sms = 0, per_sm = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess &&
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem_bytes) ==
            cudaSuccess) {
      ctas = sms * per_sm;
    }
  } else {
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(1, 1, cluster_tiles);
    config.blockDim = dim3(kThreads);
    config.dynamicSmemBytes = smem_bytes;
    cudaLaunchAttribute attribute;
    attribute.id = cudaLaunchAttributeClusterDimension;
    attribute.val.clusterDim.x = 1;
    attribute.val.clusterDim.y = 1;
    attribute.val.clusterDim.z = cluster_tiles;
    config.attrs = &attribute;
    config.numAttrs = 1;
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) == cudaSuccess) {
      ctas = clusters * cluster_tiles;
    }
  }
  cudaGetLastError();  // a failed query is not an error of the launch
  if (slot != nullptr && ctas > 0) slot->store(ctas);
  return ctas;
}

// Launches the kernel for one element type (instantiated in decode_dense_<type>.cu): in
// clusters of kClusterTiles query tiles where their number allows it and clusters keep as many
// CTAs resident as a plain launch. A KV block all of whose readers are in one cluster is dead
// once they have read it (evict first); otherwise it stays in the L2 for the other tiles'
// reads (evict normal).
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
  const int64_t grid_ctas = int64_t{grid.x} * grid.y * grid.z;
  const int plain_resident = resident_ctas<Element>(1, smem_bytes);
  const bool clustered = args.tile.num_tiles % kClusterTiles == 0 && plain_resident > 0 &&
                         resident_ctas<Element>(kClusterTiles, smem_bytes) >=
                             std::min<int64_t>(grid_ctas, plain_resident);
  const int cluster_tiles = clustered ? kClusterTiles : 1;
  KernelArgs launch_args = args;
  launch_args.kv_cache_hint =
      cluster_tiles == args.tile.num_tiles ? kCacheEvictFirst : kCacheEvictNormal;
  return launch_with_pdl(kernel, grid, dim3(kThreads), dim3(1, 1, cluster_tiles), smem_bytes,
                         stream, launch_args);
}

}  // namespace jfm::sm90::decode_dense
