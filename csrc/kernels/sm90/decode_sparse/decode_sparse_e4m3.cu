// The sparse decode kernel for the E4M3 FP8 layout (plain e4m3 values, one scale per cache).
#include "kernels/sm90/decode_sparse/decode_sparse_kernel.cuh"

namespace jfm::sm90::decode_sparse {
template cudaError_t launch_typed<Fp8Layout::kE4M3>(const KernelArgs&, cudaStream_t);
}  // namespace jfm::sm90::decode_sparse
