// FFI target "jax_flashmla_mla_metadata": the split-KV scheduler.
//
//   operands:   cache_seqlens           int32[b]
//   results:    tile_scheduler_metadata int32[P_n, 8]   (P_n read from this shape)
//               num_splits              int32[b + 1]
//   attributes: block_tokens (int64), fixed_overhead (int64),
//               fixed_length (int64; -1: use cache_seqlens, >= 0: every request
//               has this many tokens)
#include <string>

#include <cuda_runtime_api.h>

#include "ffi/ffi_helpers.h"
#include "ffi/registry.h"
#include "kernels/common/scheduler.cuh"
#include "xla/ffi/api/ffi.h"

namespace jfm {
namespace {

namespace ffi = ::xla::ffi;
using ffi_helpers::check_array;
using ffi_helpers::check_dim;
using ffi_helpers::invalid_argument;

constexpr const char* kTarget = "jax_flashmla_mla_metadata";

ffi::Error MlaMetadataImpl(cudaStream_t stream, ffi::AnyBuffer cache_seqlens,
                           ffi::Result<ffi::AnyBuffer> tile_scheduler_metadata,
                           ffi::Result<ffi::AnyBuffer> num_splits, int64_t block_tokens,
                           int64_t fixed_overhead, int64_t fixed_length) {
  JFM_RETURN_IF_ERROR(
      check_array(kTarget, "cache_seqlens", cache_seqlens, {ffi::DataType::S32}, 1, "[b]"));
  JFM_RETURN_IF_ERROR(check_array(kTarget, "tile_scheduler_metadata", *tile_scheduler_metadata,
                                  {ffi::DataType::S32}, 2, "[num_sm_parts, 8]"));
  JFM_RETURN_IF_ERROR(
      check_array(kTarget, "num_splits", *num_splits, {ffi::DataType::S32}, 1, "[b + 1]"));

  const int64_t batch = cache_seqlens.dimensions()[0];
  const int64_t num_parts = tile_scheduler_metadata->dimensions()[0];
  JFM_RETURN_IF_ERROR(check_dim(kTarget, "tile_scheduler_metadata", *tile_scheduler_metadata, 1,
                                kMetadataFields, "[num_sm_parts, 8]", "8 int32 fields per part"));
  JFM_RETURN_IF_ERROR(check_dim(kTarget, "num_splits", *num_splits, 0, batch + 1, "[b + 1]",
                                "b = cache_seqlens.shape[0]"));
  if (num_parts < 1) {
    return invalid_argument(kTarget, "tile_scheduler_metadata must have at least one part "
                                     "(num_sm_parts >= 1); got shape " +
                                         ffi_helpers::shape_string(
                                             tile_scheduler_metadata->dimensions()));
  }
  if (block_tokens < 1 || block_tokens > kSchedulerMaxOverhead) {
    return invalid_argument(kTarget, "block_tokens must be in [1, 2^30]; got " +
                                         std::to_string(block_tokens));
  }
  if (fixed_overhead < 1 || fixed_overhead > kSchedulerMaxOverhead) {
    return invalid_argument(kTarget, "fixed_overhead must be in [1, 2^30]; got " +
                                         std::to_string(fixed_overhead));
  }
  if (fixed_length < -1 || fixed_length > 2147483647) {
    return invalid_argument(kTarget,
                            "fixed_length must be -1 (use cache_seqlens) or a token count in "
                            "[0, 2^31 - 1]; got " +
                                std::to_string(fixed_length));
  }

  SchedulerParams params;
  params.cache_seqlens = static_cast<const int32_t*>(cache_seqlens.untyped_data());
  params.tile_scheduler_metadata = static_cast<int32_t*>(tile_scheduler_metadata->untyped_data());
  params.num_splits = static_cast<int32_t*>(num_splits->untyped_data());
  params.batch = batch;
  params.num_parts = num_parts;
  params.block_tokens = block_tokens;
  params.fixed_overhead = fixed_overhead;
  params.fixed_length = fixed_length;
  if (const char* message = scheduler_params_error(params)) {
    return invalid_argument(kTarget, message);
  }

  const cudaError_t err = launch_scheduler(params, stream);
  if (err != cudaSuccess) return ffi_helpers::cuda_error(kTarget, "scheduler kernel launch", err);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jfm

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFlashmlaMlaMetadata, jfm::MlaMetadataImpl,
                              ::xla::ffi::Ffi::Bind()
                                  .Ctx<::xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<::xla::ffi::AnyBuffer>()  // cache_seqlens
                                  .Ret<::xla::ffi::AnyBuffer>()  // tile_scheduler_metadata
                                  .Ret<::xla::ffi::AnyBuffer>()  // num_splits
                                  .Attr<int64_t>("block_tokens")
                                  .Attr<int64_t>("fixed_overhead")
                                  .Attr<int64_t>("fixed_length"),
                              {::xla::ffi::Traits::kCmdBufferCompatible});
