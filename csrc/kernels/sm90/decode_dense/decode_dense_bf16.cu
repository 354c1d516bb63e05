// The dense decode kernel instantiated for __nv_bfloat16.
#include "kernels/sm90/decode_dense/decode_dense_kernel.cuh"

namespace jfm::sm90::decode_dense {
template cudaError_t launch_typed<__nv_bfloat16>(const KernelArgs&, cudaStream_t);
}  // namespace jfm::sm90::decode_dense
