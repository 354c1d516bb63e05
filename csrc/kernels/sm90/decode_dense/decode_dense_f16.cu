// The dense decode kernel instantiated for __half.
#include "kernels/sm90/decode_dense/decode_dense_kernel.cuh"

namespace jfm::sm90::decode_dense {
template cudaError_t launch_typed<__half>(const KernelArgs&, cudaStream_t);
}  // namespace jfm::sm90::decode_dense
