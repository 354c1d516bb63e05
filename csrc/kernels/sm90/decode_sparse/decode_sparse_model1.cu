// The sparse decode kernel for the MODEL1 FP8 layout.
#include "kernels/sm90/decode_sparse/decode_sparse_kernel.cuh"

namespace jfm::sm90::decode_sparse {
template cudaError_t launch_typed<Fp8Layout::kModel1>(const KernelArgs&, cudaStream_t);
}  // namespace jfm::sm90::decode_sparse
