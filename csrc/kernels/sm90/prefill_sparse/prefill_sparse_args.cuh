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
};

// The grid of both directions: one CTA per (query token, head tile) along x, the head tiles of
// a token adjacent so that they run at the same time; the later ones then gather the token's
// rows from L2 (and the backward's atomics meet the same dkv rows there) even when kv is far
// larger than L2. The launchers keep s_q * head_tiles <= 2^31 - 1.
inline dim3 token_major_grid(int64_t s_q, int32_t head_tiles) {
  return dim3(static_cast<unsigned>(s_q * head_tiles));
}

struct CtaWork {
  int64_t token;
  int head_tile;
};

__device__ __forceinline__ CtaWork cta_work(int32_t head_tiles) {
  const unsigned tiles = static_cast<unsigned>(head_tiles);
  return {static_cast<int64_t>(blockIdx.x / tiles), static_cast<int>(blockIdx.x % tiles)};
}

// Implemented per head dim (576, 512) in prefill_sparse_d<d_qk>.cu and
// prefill_sparse_backward_d<d_qk>.cu.
template <int kHeadDimQK>
cudaError_t launch_typed(const KernelArgs& args, cudaStream_t stream);
template <int kHeadDimQK>
cudaError_t launch_backward_typed(const BackwardArgs& args, cudaStream_t stream);

}  // namespace jfm::sm90::prefill_sparse
