// The backward kernel of the sparse prefill for d_qk 576.
#include "kernels/sm90/prefill_sparse/prefill_sparse_backward_kernel.cuh"

namespace jfm::sm90::prefill_sparse {
template cudaError_t launch_backward_typed<576>(const BackwardArgs&, cudaStream_t);
}  // namespace jfm::sm90::prefill_sparse
