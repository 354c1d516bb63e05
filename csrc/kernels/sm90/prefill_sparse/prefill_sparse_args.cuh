// Host-visible pieces of the sparse prefill kernels: their argument blocks and grid. Free of
// CuTe so that the launcher compiles quickly; the kernel header includes it.
#pragma once

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/sm90/prefill_sparse/prefill_sparse.cuh"
#include "kernels/sm90/prefill_sparse/prefill_sparse_backward.cuh"

namespace jfm::sm90::prefill_sparse {

struct KernelArgs {
  CUtensorMap q_map;  // q [s_q, h_q, d_qk], box {64, q_box_rows, 1}
  SparsePrefillParams params;
  float scale_log2;    // softmax_scale * log2(e)
  int32_t q_box_rows;  // min(h_q, 64): query rows one TMA box brings
  int32_t head_tiles;  // ceil(h_q / 64)
};

struct BackwardArgs {
  CUtensorMap q_map;      // as KernelArgs
  CUtensorMap d_out_map;  // d_out [s_q, h_q, 512], box {64, q_box_rows, 1}
  SparsePrefillBackwardParams params;
  float scale_log2;    // softmax_scale * log2(e)
  int32_t q_box_rows;  // min(h_q, 64): rows one TMA box of q or d_out brings
  int32_t head_tiles;  // ceil(h_q / 64)
  // 1: head tiles 2j and 2j + 1 of a token share a 2-CTA cluster (whenever the head tiles are
  // even: both head dims have room for the exchange buffers)
  int32_t pair_tiles;
};

// The work items of both directions: one per (query token, head tile), numbered with the head
// tiles of a token adjacent, so that CTAs working on them at the same time share the token's
// rows: the later tiles gather them from L2 (and the backward's atomics meet the same dkv rows
// there) even when kv is far larger than L2. The launchers keep s_q * head_tiles <= 2^31 - 1.
__host__ __device__ inline int64_t work_items(int64_t s_q, int32_t head_tiles) {
  return s_q * head_tiles;
}

struct CtaWork {
  int64_t token;
  int head_tile;
};

__device__ __forceinline__ CtaWork work_item(int64_t item, int32_t head_tiles) {
  return {item / head_tiles, static_cast<int>(item % head_tiles)};
}

// Implemented per head dim (576, 512) in prefill_sparse_d<d_qk>.cu and
// prefill_sparse_backward_d<d_qk>.cu.
template <int kHeadDimQK>
cudaError_t launch_typed(const KernelArgs& args, cudaStream_t stream);
template <int kHeadDimQK>
cudaError_t launch_backward_typed(const BackwardArgs& args, cudaStream_t stream);

}  // namespace jfm::sm90::prefill_sparse
