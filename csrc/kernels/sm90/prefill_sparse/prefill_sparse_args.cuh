// Host-visible pieces of the sparse prefill kernels: their argument blocks. Free of CuTe so that
// the launcher compiles quickly; the kernel header includes it.
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
};

struct BackwardArgs {
  CUtensorMap q_map;      // as KernelArgs
  CUtensorMap d_out_map;  // d_out [s_q, h_q, 512], box {64, q_box_rows, 1}
  SparsePrefillBackwardParams params;
  float scale_log2;    // softmax_scale * log2(e)
  int32_t q_box_rows;  // min(h_q, 64): rows one TMA box of q or d_out brings
};

// Implemented per head dim (576, 512) in prefill_sparse_d<d_qk>.cu and
// prefill_sparse_backward_d<d_qk>.cu.
template <int kHeadDimQK>
cudaError_t launch_typed(const KernelArgs& args, cudaStream_t stream);
template <int kHeadDimQK>
cudaError_t launch_backward_typed(const BackwardArgs& args, cudaStream_t stream);

}  // namespace jfm::sm90::prefill_sparse
