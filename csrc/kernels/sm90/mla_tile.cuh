// The attention math the Hopper MLA decode kernels share, for one 64-row query tile against
// 64-key blocks held in shared memory as 64-dim chunks (64 rows x 128 bytes, 128-byte
// swizzled): S = Q K^T on wgmma, an online softmax against a lazily raised reference max, the
// hand-over of P from the score warpgroup to the value warpgroup, and O += P V in two halves of
// 256 columns. Each kernel supplies its own loading, masking rule and epilogue.
//
// Accumulator layout (wgmma m64nNk16, fp32): thread t of a warpgroup holds rows
// 16 (t / 32) + (t % 32) / 4 and that + 8, and per 8 columns the two columns 2 (t % 4) + {0, 1}.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <utility>

#include <cute/arch/mma_sm90_gmma.hpp>

#include "kernels/common/mla_geometry.cuh"
#include "kernels/sm90/hopper.cuh"

namespace jfm::sm90 {

namespace GMMA = cute::SM90::GMMA;

constexpr int kChunkElems = 64;              // elements in one 128-byte swizzled row
constexpr int kChunkBytes = 64 * 128;        // one 64-row x 64-element chunk
constexpr int kHalfV = kHeadDimV / 2;        // 256 output columns per math warpgroup
constexpr int kAccumulators = kHalfV / 2;    // fp32 accumulators per math thread
constexpr int kConsumerThreads = 256;        // the two math warpgroups
constexpr float kLn2 = 0.6931471805599453f;
// How far (log2 units) a row's scores may exceed its reference max before the reference is
// raised and O rescaled: P stays <= 2^8, far from overflowing fp32 sums or bf16.
constexpr float kRescaleSlack = 8.f;

// Named barriers of the math warpgroups (0 is __syncthreads).
constexpr uint32_t kBarPReady = 1;  // + stage (2 stages): the score warpgroup published P
constexpr uint32_t kBarRowSum = 3;  // the score warpgroup published a request's row sums

template <typename Element>
struct ElementTraits;

template <>
struct ElementTraits<__nv_bfloat16> {
  using ScoreMma = GMMA::MMA_64x64x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::K>;
  using ValueMmaRS = GMMA::MMA_64x256x16_F32BF16BF16_RS<GMMA::Major::K, GMMA::Major::MN>;
  using ValueMmaSS = GMMA::MMA_64x256x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::MN>;
  __device__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

template <>
struct ElementTraits<__half> {
  using ScoreMma = GMMA::MMA_64x64x16_F32F16F16_SS<GMMA::Major::K, GMMA::Major::K>;
  using ValueMmaRS = GMMA::MMA_64x256x16_F32F16F16_RS<GMMA::Major::K, GMMA::Major::MN>;
  using ValueMmaSS = GMMA::MMA_64x256x16_F32F16F16_SS<GMMA::Major::K, GMMA::Major::MN>;
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

// A math thread's place in the accumulator tile.
struct AccumulatorRows {
  int lane;
  int quad_col;  // first of the two key / output columns this thread holds per 8
  int rows[2];   // its two rows within the 64-row tile
  int p_row;     // row of this lane's stmatrix / ldmatrix address in the P tile
};

__device__ __forceinline__ AccumulatorRows accumulator_rows() {
  const int tid = threadIdx.x % 128;
  const int warp = tid / 32;
  AccumulatorRows t;
  t.lane = tid % 32;
  t.quad_col = (t.lane % 4) * 2;
  t.rows[0] = warp * 16 + t.lane / 4;
  t.rows[1] = t.rows[0] + 8;
  t.p_row = warp * 16 + (t.lane / 8) % 2 * 8 + t.lane % 8;
  return t;
}

// P goes from the score to the value warpgroup through shared memory (64 x 64, 128-byte
// swizzled rows), one stmatrix / ldmatrix x4 per 16 keys k16: this lane's address in it is row
// p_row, 16-byte unit 2 k16 + lane / 16.
__device__ __forceinline__ int p_offset(const AccumulatorRows& t, int k16) {
  return t.p_row * 128 + (((2 * k16 + t.lane / 16) ^ (t.p_row & 7)) << 4);
}

// Issues S = Q K^T over kChunks chunks of 64 dims (4 k-steps of 16 each), both operands in
// shared memory; K's chunks kKvChunkBytes apart (a stage of fewer than 64 rows packs them
// closer: S's columns past its rows then read the next chunk's first rows). Asynchronous: S is
// there after wgmma_wait<0>().
template <typename Element, int kChunks, int kKvChunkBytes = kChunkBytes>
__device__ __forceinline__ void issue_scores(const uint8_t* q, const uint8_t* kv,
                                             float (&s)[32]) {
  wgmma_fence();
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint64_t a = smem_desc_sw128(smem_address(q + c * kChunkBytes) + k * 32, 0, 1024);
      const uint64_t b = smem_desc_sw128(smem_address(kv + c * kKvChunkBytes) + k * 32, 0, 1024);
      mma_ss<typename ElementTraits<Element>::ScoreMma>(a, b, s, c > 0 || k > 0,
                                                        std::make_index_sequence<32>{});
    }
  }
  wgmma_commit();
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
// wait for the row max before exponentiating. `attends(i, h, e)` says whether row h attends
// the key in column 8 i + quad_col + e of the block. Writes each row's factor (1 unless its
// reference was raised; O is rescaled here then).
template <typename Element, typename Attends>
__device__ __forceinline__ void online_softmax(float (&s)[32], const Attends& attends,
                                               float scale_log2, SoftmaxRows& rows,
                                               float (&o)[kAccumulators], uint32_t (&packed)[16],
                                               float (&factor)[2]) {
  float block_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int i = 0; i < 8; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s[i * 4 + h * 2 + e];
        x = attends(i, h, e) ? x * scale_log2 : -INFINITY;
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

// The score warpgroup hands P and the row factors to the value warpgroup: P with stmatrix into
// `p_tile`. kPForWgmma: the value warpgroup's wgmma reads P there (async proxy), so the writes
// are fenced for it; else it reads P back with ldmatrix (generic proxy, no fence).
template <bool kPForWgmma = false>
__device__ __forceinline__ void publish_p(uint8_t* p_tile, const uint32_t (&packed)[16],
                                          const float (&factor)[2], float* row_factor,
                                          const AccumulatorRows& t, int stage) {
#pragma unroll
  for (int k16 = 0; k16 < 4; ++k16) {
    stmatrix_x4(p_tile + p_offset(t, k16), packed[4 * k16], packed[4 * k16 + 1],
                packed[4 * k16 + 2], packed[4 * k16 + 3]);
  }
  if constexpr (kPForWgmma) fence_proxy_async_smem();
  if (t.lane % 4 == 0) {
    row_factor[t.rows[0]] = factor[0];
    row_factor[t.rows[1]] = factor[1];
  }
  named_barrier_arrive(kBarPReady + stage, kConsumerThreads);
}

// The value warpgroup waits for P and the row factors, rescaling its half of O first where
// needed.
__device__ __forceinline__ void receive_factors(const float* row_factor, const AccumulatorRows& t,
                                                int stage, float (&o)[kAccumulators]) {
  named_barrier_sync(kBarPReady + stage, kConsumerThreads);
  const float factor[2] = {row_factor[t.rows[0]], row_factor[t.rows[1]]};
  if (__any_sync(0xffffffff, factor[0] != 1.f || factor[1] != 1.f)) scale_rows(o, factor);
}

// The same, then P read back into registers.
__device__ __forceinline__ void receive_p(const uint8_t* p_tile, const float* row_factor,
                                          const AccumulatorRows& t, int stage,
                                          float (&o)[kAccumulators], uint32_t (&packed)[16]) {
  receive_factors(row_factor, t, stage, o);
#pragma unroll
  for (int k16 = 0; k16 < 4; ++k16) ldmatrix_x4(p_tile + p_offset(t, k16), packed + 4 * k16);
}

// O[:, half] += P V[:, half]: P from registers, V (256 columns starting at `v`, 4 chunks
// kVChunkBytes apart) from shared memory.
template <typename Element, int kVChunkBytes = kChunkBytes>
__device__ __forceinline__ void accumulate_pv(const uint32_t (&packed)[16], const uint8_t* v,
                                              float (&o)[kAccumulators]) {
  wgmma_fence();
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint64_t b = smem_desc_sw128(smem_address(v) + k * 2048, kVChunkBytes, 1024);
    mma_rs<typename ElementTraits<Element>::ValueMmaRS>(packed + 4 * k, b, o,
                                                        std::make_index_sequence<kAccumulators>{});
  }
  wgmma_commit();
  wgmma_wait<0>();
}

// O[:, half] += P V[:, half] with P from shared memory too (`p_tile`, as publish_p<true> left
// it: 64 x 64, 128-byte swizzled rows, the layout of a K-major A operand), which keeps P out of
// the value warpgroup's registers.
template <typename Element>
__device__ __forceinline__ void accumulate_pv_ss(const uint8_t* p_tile, const uint8_t* v,
                                                 float (&o)[kAccumulators]) {
  wgmma_fence();
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint64_t a = smem_desc_sw128(smem_address(p_tile) + k * 32, 0, 1024);
    const uint64_t b = smem_desc_sw128(smem_address(v) + k * 2048, kChunkBytes, 1024);
    mma_ss<typename ElementTraits<Element>::ValueMmaSS>(a, b, o, true,
                                                        std::make_index_sequence<kAccumulators>{});
  }
  wgmma_commit();
  wgmma_wait<0>();
}

// The final row sums of a request, summed over the quad by the score warpgroup and shared with
// the value warpgroup through `shared_sum` (one of two buffers, alternating per request).
__device__ __forceinline__ void share_row_sums(bool score_wg, const AccumulatorRows& t,
                                               float* shared_sum, SoftmaxRows& rows) {
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
}

// share_row_sums, and the row maxima too through `shared_max` (ordered by the same barrier),
// for a value warpgroup that needs each row's lse (to apply an attention sink).
__device__ __forceinline__ void share_row_sums_and_maxima(bool score_wg, const AccumulatorRows& t,
                                                          float* shared_sum, float* shared_max,
                                                          SoftmaxRows& rows) {
  if (score_wg && t.lane % 4 == 0) {
    shared_max[t.rows[0]] = rows.max[0];
    shared_max[t.rows[1]] = rows.max[1];
  }
  share_row_sums(score_wg, t, shared_sum, rows);
  if (!score_wg) {
    rows.max[0] = shared_max[t.rows[0]];
    rows.max[1] = shared_max[t.rows[1]];
  }
}

// Writes row h of this thread's half of O (columns col0 ...), each value times `factor`: fp32
// to `dst` (a partial row) or packed to the 16-bit output row.
__device__ __forceinline__ void store_partial_row(float* dst, const float (&o)[kAccumulators],
                                                  int h, float factor) {
#pragma unroll
  for (int i = 0; i < kHalfV / 8; ++i) {
    *reinterpret_cast<float2*>(dst + i * 8) =
        make_float2(o[i * 4 + h * 2] * factor, o[i * 4 + h * 2 + 1] * factor);
  }
}
template <typename Element>
__device__ __forceinline__ void store_output_row(Element* dst, const float (&o)[kAccumulators],
                                                 int h, float factor) {
#pragma unroll
  for (int i = 0; i < kHalfV / 8; ++i) {
    *reinterpret_cast<uint32_t*>(dst + i * 8) =
        ElementTraits<Element>::pack(o[i * 4 + h * 2] * factor, o[i * 4 + h * 2 + 1] * factor);
  }
}
// The same row stored 16 bytes at a time: the 4 lanes of a quad hold 2 of every 8 consecutive
// columns (lane c: 2c and 2c + 1), so a 4 x 4 transpose of packed pairs within the quad (two
// exchanges of two values) gives lane c all 8 columns of group 4g + c: a quarter of the store
// instructions, in whole 32-byte sectors. The sparse prefill's forward, whose epilogue writes a
// whole tile per item, takes 14% less time so at 8 blocks per item (d_qk 512, topk 512); the
// sparse decode spills with it. `row` is the output row at column col0; the lanes of a quad
// call it together.
template <typename Element>
__device__ __forceinline__ void store_output_row_wide(Element* row, const float (&o)[kAccumulators],
                                                      int h, float factor, int lane) {
  const unsigned quad = 0xFu << (lane & ~3);
  const bool high = lane & 2, odd = lane & 1;
#pragma unroll
  for (int g = 0; g < kHalfV / 32; ++g) {
    uint32_t v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int i = 4 * g + k;
      v[k] = ElementTraits<Element>::pack(o[i * 4 + h * 2] * factor,
                                          o[i * 4 + h * 2 + 1] * factor);
    }
    // Swap the off-diagonal 2 x 2 blocks with lane ^ 2, then within the blocks with lane ^ 1.
    uint32_t r0 = __shfl_xor_sync(quad, high ? v[0] : v[2], 2);
    uint32_t r1 = __shfl_xor_sync(quad, high ? v[1] : v[3], 2);
    if (high) {
      v[0] = r0, v[1] = r1;
    } else {
      v[2] = r0, v[3] = r1;
    }
    r0 = __shfl_xor_sync(quad, odd ? v[0] : v[1], 1);
    r1 = __shfl_xor_sync(quad, odd ? v[2] : v[3], 1);
    if (odd) {
      v[0] = r0, v[2] = r1;
    } else {
      v[1] = r0, v[3] = r1;
    }
    *reinterpret_cast<uint4*>(row + (4 * g + lane % 4) * 8) = make_uint4(v[0], v[1], v[2], v[3]);
  }
}

// Query rows past `loaded_rows` of a tile narrower than its `tile_rows` rows (64 heads, or the
// narrow sparse decode's 16 or 32) are never loaded: zeroed once (by all `threads` threads of
// the CTA), so that S of those rows is 0, not whatever shared memory held. `q` holds `chunks`
// chunks of the tile, each tile_rows x 128 bytes.
__device__ __forceinline__ void zero_unloaded_query_rows(uint8_t* q, int chunks, int loaded_rows,
                                                         int threads,
                                                         int tile_rows = kQueryTileRows) {
  const int units_per_chunk = (tile_rows - loaded_rows) * 8;
  for (int u = threadIdx.x; u < chunks * units_per_chunk; u += threads) {
    const int chunk = u / units_per_chunk, rest = u % units_per_chunk;
    *reinterpret_cast<uint4*>(q + chunk * tile_rows * 128 + (loaded_rows + rest / 8) * 128 +
                              (rest % 8) * 16) = make_uint4(0, 0, 0, 0);
  }
  fence_proxy_async_smem();
}

}  // namespace jfm::sm90
