// Host-visible pieces of the sparse decode kernel: its argument block. Free of CuTe so that the
// launcher compiles quickly; the kernel header includes it.
#pragma once

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/sm90/decode_sparse/decode_sparse.cuh"

namespace jfm::sm90::decode_sparse {

struct KernelArgs {
  CUtensorMap q_map;  // q [batch * s_q, h_q, d_qk] viewed 3-D, box {64, q_box_rows, 1}
  SparseDecodeParams params;
  float scale_log2;      // softmax_scale * log2(e)
  int32_t q_box_rows;    // min(h_q, 64): query rows one TMA box brings
  int32_t head_tiles;    // ceil(h_q / 64)
  int32_t partial_rows;  // rows of partial_o / partial_lse: batch + num_parts
};

// Implemented per layout in decode_sparse_<layout>.cu.
template <Fp8Layout kLayout>
cudaError_t launch_typed(const KernelArgs& args, cudaStream_t stream);

}  // namespace jfm::sm90::decode_sparse
