// The sparse prefill kernel for d_qk 576.
#include "kernels/sm90/prefill_sparse/prefill_sparse_kernel.cuh"

namespace jfm::sm90::prefill_sparse {
template cudaError_t launch_typed<576>(const KernelArgs&, cudaStream_t);
}  // namespace jfm::sm90::prefill_sparse
