// FFI target "jax_flashmla_mla_metadata": the split-KV scheduler.
//
//   operands:   cache_seqlens           int32[b]
//   results:    tile_scheduler_metadata int32[P_n, 8]   (P_n >= 1 read from this shape)
//               num_splits              int32[b + 1]
//   attributes: block_tokens (int64), fixed_overhead (int64),
//               fixed_length (int64; -1: use cache_seqlens, >= 0: every request
//               has this many tokens)
#include <cuda_runtime_api.h>

#include "ffi/ffi_helpers.h"
#include "ffi/registry.h"
#include "kernels/common/scheduler.cuh"
#include "xla/ffi/api/ffi.h"

namespace jfm {
namespace {

namespace ffi = ::xla::ffi;
using ffi_helpers::check_buffer;
using ffi_helpers::kAnyDim;

constexpr const char* kTarget = "jax_flashmla_mla_metadata";

ffi::Error MlaMetadataImpl(cudaStream_t stream, ffi::AnyBuffer cache_seqlens,
                           ffi::Result<ffi::AnyBuffer> tile_scheduler_metadata,
                           ffi::Result<ffi::AnyBuffer> num_splits, int64_t block_tokens,
                           int64_t fixed_overhead, int64_t fixed_length) {
  const auto s32 = {ffi::DataType::S32};
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "cache_seqlens", cache_seqlens, s32, {kAnyDim}, "[b]"));
  const int64_t batch = cache_seqlens.dimensions()[0];
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "tile_scheduler_metadata", *tile_scheduler_metadata,
                                   s32, {kAnyDim, kMetadataFields}, "[num_sm_parts, 8]"));
  JFM_RETURN_IF_ERROR(
      check_buffer(kTarget, "num_splits", *num_splits, s32, {batch + 1}, "[b + 1]"));

  SchedulerParams params;
  params.cache_seqlens = static_cast<const int32_t*>(cache_seqlens.untyped_data());
  params.tile_scheduler_metadata =
      static_cast<MetadataRow*>(tile_scheduler_metadata->untyped_data());
  params.num_splits = static_cast<int32_t*>(num_splits->untyped_data());
  params.batch = batch;
  params.num_parts = tile_scheduler_metadata->dimensions()[0];
  params.block_tokens = block_tokens;
  params.fixed_overhead = fixed_overhead;
  params.fixed_length = fixed_length;
  return ffi_helpers::launch(kTarget, params, stream, scheduler_params_error, launch_scheduler);
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
