// The dense MLA decode kernel for sm_90a. Included by one translation unit per element type.
//
// Roles (384 threads, three warpgroups), one device function each:
//   load_role (WG0, one thread): TMA loads of the query tile and of every 64-token KV block (9
//     chunks of 64 dims x 64 rows, 128-byte swizzled) into a 2-stage ring. A block whose id is
//     out of range is not loaded; its stage is marked absent.
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
#include <atomic>
#include <cstdint>
#include <utility>

#include <cute/arch/mma_sm90_gmma.hpp>

#include "kernels/common/combine.cuh"
#include "kernels/common/launch.cuh"
#include "kernels/common/span.cuh"
#include "kernels/sm90/decode_dense/decode_dense_args.cuh"
#include "kernels/sm90/hopper.cuh"

namespace jfm::sm90::decode_dense {

namespace GMMA = cute::SM90::GMMA;

constexpr int kChunkElems = 64;                       // elements in one 128-byte swizzled row
constexpr int kChunkBytes = 64 * 128;                 // one 64-row x 64-element chunk
constexpr int kQKChunks = kHeadDimQK / kChunkElems;   // 9
constexpr int kTileBytes = kQKChunks * kChunkBytes;   // a 64 x 576 tile
constexpr int kRopeChunk = kQKChunks - 1;             // holds P once S is computed
constexpr int kStages = 2;
constexpr int kThreads = 384;
constexpr int kHalfV = kHeadDimV / 2;                 // 256 output columns per math warpgroup
constexpr int kAccumulators = kHalfV / 2;             // fp32 accumulators per math thread
constexpr int kConsumerThreads = 256;
constexpr float kLn2 = 0.6931471805599453f;
// How far (log2 units) a row's scores may exceed its reference max before the reference is
// raised and O rescaled: P stays <= 2^8, far from overflowing fp32 sums or bf16.
constexpr float kRescaleSlack = 8.f;
static_assert(kKernelPageSize == kChunkElems, "a KV block is one 64-row chunk high");

// Named barriers (0 is __syncthreads).
constexpr uint32_t kBarPReady = 1;  // + stage: WG1 published P and the row factors
constexpr uint32_t kBarRowSum = 3;  // WG1 published the final row sums of a request

struct alignas(1024) SharedStorage {
  uint8_t q[kTileBytes];
  uint8_t kv[kStages][kTileBytes];
  float row_factor[kStages][kQueryTileRows];  // exp2(m_old - m_new) per row and block
  float row_sum[2][kQueryTileRows];           // final softmax denominators, per request parity
  uint64_t kv_full[kStages];
  uint64_t kv_empty[kStages];
  uint64_t q_full;
  uint64_t q_empty;
  int32_t kv_present[kStages];  // 0: the stage's block id was out of range, nothing loaded
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

// exp2 as one MUFU.EX2 (exp2f adds range handling around it). Inputs are <= 2^kRescaleSlack
// here (scores minus their reference max), -inf gives +0; the relative error, ~2^-22, is far
// below bf16's. Measured on the H200: 7% fewer cycles per KV block than exp2f.
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

// ---- The schedule ---------------------------------------------------------------------------

// The part's metadata row with its request range clamped to the batch.
__device__ __forceinline__ MetadataRow load_part(const KernelArgs& args, int part) {
  MetadataRow row = args.params.tile_metadata[part];
  row.begin_req = max(row.begin_req, 0);
  row.end_req = min(row.end_req, static_cast<int32_t>(args.params.batch) - 1);
  return row;
}

// What a part does for request `req`: the KV block range [lo, hi) and where its result goes.
struct RequestWork {
  int length;     // tokens attended: cache_seqlens[req] clamped to [0, seq_capacity]
  int lo, hi;     // block range
  int split_row;  // row of partial_o / partial_lse when split
  bool split;     // the request is split across parts: write partials
};

__device__ __forceinline__ RequestWork request_work(const KernelArgs& args,
                                                    const MetadataRow& part, int req) {
  const DenseDecodeParams& p = args.params;
  RequestWork w;
  w.length = min(max(p.cache_seqlens[req], 0), args.seq_capacity);
  const int blocks = w.length / kKernelPageSize + (w.length % kKernelPageSize != 0);
  const bool first = req == part.begin_req, last = req == part.end_req;
  w.lo = first ? max(part.begin_block, 0) : 0;
  w.hi = last ? min(part.end_block, blocks) : blocks;
  const int64_t split_row = int64_t{p.num_splits[req]} + (first ? part.begin_split_idx : 0);
  w.split_row = static_cast<int>(min(max(split_row, int64_t{0}), int64_t{args.partial_rows} - 1));
  w.split = p.num_splits[req + 1] - p.num_splits[req] > 1;
  return w;
}

// ---- Load role ------------------------------------------------------------------------------

// One thread of WG0: for each request with work, the query tile, then its KV blocks through
// the stage ring. A block id outside [0, num_blocks) is never read: its stage is marked absent
// and its full barrier completed by a plain arrival, with no bytes expected.
__device__ __forceinline__ void load_role(const KernelArgs& args, SharedStorage& smem,
                                          const MetadataRow& part, int kv_head, int s0, int j0) {
  const DenseDecodeParams& p = args.params;
  const TileShape& tile = args.tile;
  prefetch_tensor_map(&args.q_map);
  prefetch_tensor_map(&args.kv_map);
  const uint32_t q_bytes = kQKChunks * 128 * tile.heads_per_tile * tile.s_per_tile;
  int stage = 0;
  uint32_t kv_phase = 0, q_phase = 0;
  for (int req = part.begin_req; req <= part.end_req; ++req) {
    const RequestWork w = request_work(args, part, req);
    if (w.lo >= w.hi) continue;
    mbarrier_wait(&smem.q_empty, q_phase ^ 1);
    q_phase ^= 1;
    mbarrier_arrive_expect_tx(&smem.q_full, q_bytes);
    for (int c = 0; c < kQKChunks; ++c) {
      tma_load_4d(smem.q + c * kChunkBytes, &args.q_map, &smem.q_full, c * kChunkElems, j0,
                  kv_head, static_cast<int>(req * p.s_q + s0));
    }
    const int32_t* table = p.block_table + req * p.max_blocks_per_seq;
    for (int blk = w.lo; blk < w.hi; ++blk) {
      const int32_t physical = table[blk];
      const bool present = physical >= 0 && physical < p.num_blocks;
      mbarrier_wait(&smem.kv_empty[stage], kv_phase ^ 1);
      smem.kv_present[stage] = present;  // published by the arrival below (release)
      if (present) {
        mbarrier_arrive_expect_tx(&smem.kv_full[stage], kTileBytes);
        for (int c = 0; c < kQKChunks; ++c) {
          tma_load_3d(smem.kv[stage] + c * kChunkBytes, &args.kv_map, &smem.kv_full[stage],
                      c * kChunkElems, kv_head, physical * kKernelPageSize, args.kv_cache_hint);
        }
      } else {
        mbarrier_arrive(&smem.kv_full[stage]);
      }
      if (++stage == kStages) {
        stage = 0;
        kv_phase ^= 1;
      }
    }
  }
}

// ---- Math warpgroups ------------------------------------------------------------------------

// A math thread's place in the 64-row tile: its two accumulator rows (h = 0, 1) and the
// query token and head of each.
struct ThreadRows {
  int lane;
  int quad_col;     // first of the two key / output columns this thread holds per 8
  int rows[2];      // rows within the tile
  int token[2];     // query token of each row
  int head[2];      // query head of each row
  bool valid[2];    // the row is a real (token, head) of this tile
  int p_row;        // row of this lane's stmatrix / ldmatrix address in the P tile
};

__device__ __forceinline__ ThreadRows thread_rows(const TileShape& tile, int64_t s_q, int kv_head,
                                                  int s0, int j0) {
  const int tid = threadIdx.x % 128;
  const int warp = tid / 32;
  ThreadRows t;
  t.lane = tid % 32;
  t.quad_col = (t.lane % 4) * 2;
  t.rows[0] = warp * 16 + t.lane / 4;
  t.rows[1] = t.rows[0] + 8;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int s = s0 + t.rows[h] / tile.heads_per_tile;
    const int j = j0 + t.rows[h] % tile.heads_per_tile;
    t.valid[h] = t.rows[h] < tile.heads_per_tile * tile.s_per_tile && s < s_q && j < tile.group;
    t.token[h] = s;
    t.head[h] = kv_head * tile.group + j;
  }
  t.p_row = warp * 16 + (t.lane / 8) % 2 * 8 + t.lane % 8;
  return t;
}

// P goes from WG1 to WG2 through shared memory (64 x 64, 128-byte swizzled rows), one
// stmatrix / ldmatrix x4 per 16 keys k16: this lane's address in it is row p_row, 16-byte unit
// 2 k16 + lane / 16.
__device__ __forceinline__ int p_offset(const ThreadRows& t, int k16) {
  return t.p_row * 128 + (((2 * k16 + t.lane / 16) ^ (t.p_row & 7)) << 4);
}

// Issues S = Q K^T over the 576 dims: 9 chunks x 4 k-steps of 16, both operands in shared
// memory. Asynchronous: S is there after wgmma_wait<0>().
template <typename Element>
__device__ __forceinline__ void issue_scores(const uint8_t* q, const uint8_t* kv,
                                             float (&s)[32]) {
  wgmma_fence();
#pragma unroll
  for (int c = 0; c < kQKChunks; ++c) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint64_t a = smem_desc_sw128(smem_address(q + c * kChunkBytes) + k * 32, 0, 1024);
      const uint64_t b = smem_desc_sw128(smem_address(kv + c * kChunkBytes) + k * 32, 0, 1024);
      mma_ss<typename ElementTraits<Element>::ScoreMma>(a, b, s, c > 0 || k > 0,
                                                        std::make_index_sequence<32>{});
    }
  }
  wgmma_commit();
}

// Rows past the sequence end in its last block may hold anything (NaN): zero their V part so
// that 0 * NaN cannot reach the output through P V.
__device__ __forceinline__ void zero_value_tail(uint8_t* kv, int valid_rows) {
  const int units = (kKernelPageSize - valid_rows) * (kHeadDimV / 8);
  for (int u = threadIdx.x % 128; u < units; u += 128) {
    const int row = valid_rows + u / (kHeadDimV / 8);
    const int piece = u % (kHeadDimV / 8);  // 16-byte piece of the row's V
    const int chunk = piece / 8, unit = piece % 8;
    *reinterpret_cast<uint4*>(kv + chunk * kChunkBytes + row * 128 + unit * 16) =
        make_uint4(0, 0, 0, 0);
  }
  fence_proxy_async_smem();  // the zeros before the wgmma reads of V
}

// Per-row state of the online softmax: the reference max (log2 domain, -inf until a key is
// seen) that P, O and the row sum are relative to, and this thread's share of the row sum.
struct SoftmaxRows {
  float max[2];
  float sum[2];
};

__device__ __forceinline__ void scale_rows(float (&o)[kAccumulators], const float (&factor)[2]) {
#pragma unroll
  for (int i = 0; i < kAccumulators; ++i) o[i] *= factor[(i / 2) % 2];
}

// Masks and exponentiates one block's scores into P (packed in the register layout of a wgmma
// A operand), against a reference max that is raised lazily: only when a row's max exceeds it
// by more than kRescaleSlack. So P <= 2^kRescaleSlack, and most blocks neither rescale O nor
// wait for the row max before exponentiating. Keys t >= key_limit[h] are masked for row h.
// Writes each row's factor (1 unless its reference was raised; O is rescaled here then).
template <typename Element>
__device__ __forceinline__ void online_softmax(float (&s)[32], int blk, const int (&key_limit)[2],
                                               float scale_log2, const ThreadRows& t,
                                               SoftmaxRows& rows, float (&o)[kAccumulators],
                                               uint32_t (&packed)[16], float (&factor)[2]) {
  float block_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int i = 0; i < 8; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int key = blk * kKernelPageSize + i * 8 + t.quad_col + e;
        float& x = s[i * 4 + h * 2 + e];
        x = key < key_limit[h] ? x * scale_log2 : -INFINITY;
        block_max[h] = fmaxf(block_max[h], x);
      }
    }
  }
  float block_sum[2];
  const auto exponentiate = [&] {
    const float base[2] = {softmax_base(rows.max[0]), softmax_base(rows.max[1])};
    block_sum[0] = block_sum[1] = 0.f;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const float p0 = fast_exp2(s[2 * i] - base[i % 2]);
      const float p1 = fast_exp2(s[2 * i + 1] - base[i % 2]);
      block_sum[i % 2] += p0 + p1;
      packed[i] = ElementTraits<Element>::pack(p0, p1);
    }
  };
  exponentiate();  // against the current reference, while the row max is reduced
  bool raise = false;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    block_max[h] = fmaxf(block_max[h], __shfl_xor_sync(0xffffffff, block_max[h], 1));
    block_max[h] = fmaxf(block_max[h], __shfl_xor_sync(0xffffffff, block_max[h], 2));
    raise |= block_max[h] > rows.max[h] + kRescaleSlack;
  }
  factor[0] = factor[1] = 1.f;
  if (__any_sync(0xffffffff, raise)) {  // per warp: its 16 rows
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float new_max = fmaxf(rows.max[h], block_max[h]);
      factor[h] = fast_exp2(rows.max[h] - softmax_base(new_max));
      rows.max[h] = new_max;
    }
    exponentiate();
    scale_rows(o, factor);
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) rows.sum[h] = rows.sum[h] * factor[h] + block_sum[h];
}

// WG1 hands P and the row factors to WG2: P with stmatrix into the stage's RoPE chunk (WG2
// reads it back with ldmatrix, a generic-proxy read: no proxy fence on this path).
__device__ __forceinline__ void publish_p(uint8_t* p_tile, const uint32_t (&packed)[16],
                                          const float (&factor)[2], float* row_factor,
                                          const ThreadRows& t, int stage) {
#pragma unroll
  for (int k16 = 0; k16 < 4; ++k16) {
    stmatrix_x4(p_tile + p_offset(t, k16), packed[4 * k16], packed[4 * k16 + 1],
                packed[4 * k16 + 2], packed[4 * k16 + 3]);
  }
  if (t.lane % 4 == 0) {
    row_factor[t.rows[0]] = factor[0];
    row_factor[t.rows[1]] = factor[1];
  }
  named_barrier_arrive(kBarPReady + stage, kConsumerThreads);
}

// WG2 takes P and the row factors from WG1, rescaling its half of O first where needed.
__device__ __forceinline__ void receive_p(const uint8_t* p_tile, const float* row_factor,
                                          const ThreadRows& t, int stage,
                                          float (&o)[kAccumulators], uint32_t (&packed)[16]) {
  named_barrier_sync(kBarPReady + stage, kConsumerThreads);
  const float factor[2] = {row_factor[t.rows[0]], row_factor[t.rows[1]]};
  if (__any_sync(0xffffffff, factor[0] != 1.f || factor[1] != 1.f)) scale_rows(o, factor);
#pragma unroll
  for (int k16 = 0; k16 < 4; ++k16) ldmatrix_x4(p_tile + p_offset(t, k16), packed + 4 * k16);
}

// O[:, half] += P V[:, half]: P from registers, V (256 columns starting at `v`) from shared
// memory.
template <typename Element>
__device__ __forceinline__ void accumulate_pv(const uint32_t (&packed)[16], const uint8_t* v,
                                              float (&o)[kAccumulators]) {
  wgmma_fence();
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint64_t b = smem_desc_sw128(smem_address(v) + k * 2048, kChunkBytes, 1024);
    mma_rs<typename ElementTraits<Element>::ValueMmaRS>(packed + 4 * k, b, o,
                                                        std::make_index_sequence<kAccumulators>{});
  }
  wgmma_commit();
  wgmma_wait<0>();
}

// Epilogue of one request: WG1 shares the final row sums, both warpgroups normalise their half
// of O and store it: the output and lse of an unsplit request, else its fp32 partial row.
template <typename Element>
__device__ __forceinline__ void finish_request(const KernelArgs& args, SharedStorage& smem,
                                               const RequestWork& w, int req, bool score_wg,
                                               const ThreadRows& t, int& request_parity,
                                               SoftmaxRows& rows, const float (&o)[kAccumulators]) {
  const DenseDecodeParams& p = args.params;
  float* shared_sum = smem.row_sum[request_parity];
  if (score_wg) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      rows.sum[h] += __shfl_xor_sync(0xffffffff, rows.sum[h], 1);
      rows.sum[h] += __shfl_xor_sync(0xffffffff, rows.sum[h], 2);
      if (t.lane % 4 == 0) shared_sum[t.rows[h]] = rows.sum[h];
    }
  }
  named_barrier_sync(kBarRowSum, kConsumerThreads);
  if (!score_wg) {
    rows.sum[0] = shared_sum[t.rows[0]];
    rows.sum[1] = shared_sum[t.rows[1]];
  }
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
      float* dst = p.partial_o + row_index * kHeadDimV + col0 + t.quad_col;
#pragma unroll
      for (int i = 0; i < kHalfV / 8; ++i) {
        *reinterpret_cast<float2*>(dst + i * 8) =
            make_float2(o[i * 4 + h * 2] * inv, o[i * 4 + h * 2 + 1] * inv);
      }
    } else {
      Element* dst = static_cast<Element*>(p.out) + row_index * kHeadDimV + col0 + t.quad_col;
#pragma unroll
      for (int i = 0; i < kHalfV / 8; ++i) {
        *reinterpret_cast<uint32_t*>(dst + i * 8) =
            ElementTraits<Element>::pack(o[i * 4 + h * 2] * inv, o[i * 4 + h * 2 + 1] * inv);
      }
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

// WG1 and WG2: every request of the part, block by block, then its epilogue.
template <typename Element>
__device__ __forceinline__ void math_role(const KernelArgs& args, SharedStorage& smem,
                                          const MetadataRow& part, int kv_head, int s0, int j0) {
  const DenseDecodeParams& p = args.params;
  const bool score_wg = threadIdx.x / 128 == 1;
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
      // Uniform per warp (the producer wrote it before completing the barrier). Branching on
      // it ahead of S keeps the softmax's warp shuffles free of divergence checks; issuing S
      // first, to hide this load, made ptxas add them (8% more cycles per block, H100).
      const bool present = smem.kv_present[stage];
      if (score_wg) {
        if (present) {
          float s[32];
          issue_scores<Element>(smem.q, kv, s);
          wgmma_wait<0>();
          if (blk == w.hi - 1) mbarrier_arrive(&smem.q_empty);  // Q is free for the next request
          const int valid_rows = w.length - blk * kKernelPageSize;
          if (valid_rows < kKernelPageSize) zero_value_tail(kv, valid_rows);
          uint32_t packed[16];
          float factor[2];
          online_softmax<Element>(s, blk, key_limit, args.scale_log2, t, rows, o, packed, factor);
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

template <typename Element>
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
  const MetadataRow part = load_part(args, part_index);
  if (part.begin_req > part.end_req) return;  // an empty part

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

  const int s0 = (q_tile / args.tile.head_tiles) * args.tile.s_per_tile;
  const int j0 = (q_tile % args.tile.head_tiles) * args.tile.heads_per_tile;
  if (threadIdx.x / 128 == 0) {
    registers_decrease<40>();
    if (threadIdx.x == 0) load_role(args, smem, part, kv_head, s0, j0);
    return;
  }
  registers_increase<232>();
  if (threadIdx.x / 128 == 1) JFM_SPAN_BEGIN();
  math_role<Element>(args, smem, part, kv_head, s0, j0);
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

template <typename Element>
DeviceSetup query_device_setup(int device) {
  const auto kernel = dense_decode_kernel<Element>;
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

template <typename Element>
DeviceSetup device_setup() {
  constexpr int kMaxDevices = 64;
  enum : int { kEmpty, kWriting, kReady };
  static std::atomic<int> state[kMaxDevices] = {};
  static DeviceSetup cache[kMaxDevices];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) {
    return query_device_setup<Element>(device);
  }
  if (state[device].load(std::memory_order_acquire) == kReady) return cache[device];
  const DeviceSetup setup = query_device_setup<Element>(device);
  int expected = kEmpty;
  if (setup.status == cudaSuccess && setup.plain_ctas > 0 &&
      state[device].compare_exchange_strong(expected, kWriting, std::memory_order_acq_rel)) {
    cache[device] = setup;
    state[device].store(kReady, std::memory_order_release);
  }
  return setup;
}

// Launches the kernel for one element type (instantiated in decode_dense_<type>.cu): in
// clusters of kClusterTiles query tiles where their number allows it and clusters keep as many
// CTAs resident as a plain launch. A KV block all of whose readers are in one cluster is dead
// once they have read it (evict first); otherwise it stays in the L2 for the other tiles'
// reads (evict normal).
template <typename Element>
cudaError_t launch_typed(const KernelArgs& args, cudaStream_t stream) {
  const DeviceSetup setup = device_setup<Element>();
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
  return launch_kernel(dense_decode_kernel<Element>, shape, stream, launch_args);
}

}  // namespace jfm::sm90::decode_dense
