// The list of FFI targets exported by jax_flashmla._C. Adding a kernel means
// adding one X(...) line here (in the list of the architecture its kernels
// are compiled for) and the handler's source to the matching list in
// CMakeLists.txt. module.cc turns the list into registrations().
#pragma once

#include "xla/ffi/api/c_api.h"

// X(target name as seen from Python, extern "C" handler symbol)
#define JFM_FFI_TARGETS_COMMON(X)                      \
  X("jax_flashmla_mla_metadata", JaxFlashmlaMlaMetadata) \
  X("jax_flashmla_combine", JaxFlashmlaCombine)

// Handlers whose kernels exist only for sm_90a (built when 90a is targeted).
#if defined(JAX_FLASHMLA_WITH_SM90)
#define JFM_FFI_TARGETS_SM90(X)                                     \
  X("jax_flashmla_decode_dense_sm90", JaxFlashmlaDecodeDenseSm90)   \
  X("jax_flashmla_decode_sparse_sm90", JaxFlashmlaDecodeSparseSm90) \
  X("jax_flashmla_prefill_sparse_sm90", JaxFlashmlaPrefillSparseSm90) \
  X("jax_flashmla_prefill_sparse_backward_sm90", JaxFlashmlaPrefillSparseBackwardSm90)
#else
#define JFM_FFI_TARGETS_SM90(X)
#endif

// Handlers whose kernels exist only for sm_100a.
#if defined(JAX_FLASHMLA_WITH_SM100)
#define JFM_FFI_TARGETS_SM100(X)
#else
#define JFM_FFI_TARGETS_SM100(X)
#endif

#define JFM_FFI_TARGETS(X) JFM_FFI_TARGETS_COMMON(X) JFM_FFI_TARGETS_SM90(X) JFM_FFI_TARGETS_SM100(X)

#define JFM_DECLARE_FFI_HANDLER(name, symbol) \
  extern "C" XLA_FFI_Error* symbol(XLA_FFI_CallFrame* call_frame);
JFM_FFI_TARGETS(JFM_DECLARE_FFI_HANDLER)
#undef JFM_DECLARE_FFI_HANDLER
