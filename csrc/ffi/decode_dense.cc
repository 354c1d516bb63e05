// FFI target "jax_flashmla_decode_dense_sm90": dense MLA decode over a paged BF16/FP16 cache,
// the decode kernel followed by the split-KV combine.
//
//   operands:   q              bfloat16 or float16 [b, s_q, h_q, 576]
//               k_cache        q's dtype [num_blocks, page, h_kv, 576]
//               block_table    int32[b, max_blocks_per_seq]
//               cache_seqlens  int32[b]
//               tile_metadata  int32[num_parts, 8]   (get_mla_metadata)
//               num_splits     int32[b + 1]
//   results:    out            q's dtype [b, s_q, h_q, 512]
//               lse            float32[b, h_q, s_q]
//               partial_o      float32[b + num_parts, s_q, h_q, 512]   (workspace)
//               partial_lse    float32[b + num_parts, s_q, h_q]        (workspace)
//   attributes: softmax_scale (f32), causal (bool)
#include <cuda_runtime_api.h>

#include "ffi/ffi_helpers.h"
#include "ffi/registry.h"
#include "kernels/sm90/decode_dense/decode_dense.cuh"
#include "xla/ffi/api/ffi.h"

namespace jfm {
namespace {

namespace ffi = ::xla::ffi;
using ffi_helpers::check_buffer;
using ffi_helpers::kAnyDim;

constexpr const char* kTarget = "jax_flashmla_decode_dense_sm90";

ffi::Error DecodeDenseImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
                           ffi::AnyBuffer block_table, ffi::AnyBuffer cache_seqlens,
                           ffi::AnyBuffer tile_metadata, ffi::AnyBuffer num_splits,
                           ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                           ffi::Result<ffi::AnyBuffer> partial_o,
                           ffi::Result<ffi::AnyBuffer> partial_lse, float softmax_scale,
                           bool causal) {
  const auto s32 = {ffi::DataType::S32};
  const auto f32 = {ffi::DataType::F32};
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "q", q, {ffi::DataType::BF16, ffi::DataType::F16},
                                   {kAnyDim, kAnyDim, kAnyDim, kHeadDimQK}, "[b, s_q, h_q, 576]"));
  const int64_t b = q.dimensions()[0], s_q = q.dimensions()[1], h_q = q.dimensions()[2];
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "k_cache", k_cache, {q.element_type()},
                                   {kAnyDim, kAnyDim, kAnyDim, kHeadDimQK},
                                   "[num_blocks, page, h_kv, 576]"));
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "block_table", block_table, s32, {b, kAnyDim},
                                   "[b, max_blocks_per_seq]"));
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "cache_seqlens", cache_seqlens, s32, {b}, "[b]"));
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "tile_metadata", tile_metadata, s32,
                                   {kAnyDim, kMetadataFields}, "[num_parts, 8]"));
  const int64_t rows = b + tile_metadata.dimensions()[0];
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "num_splits", num_splits, s32, {b + 1}, "[b + 1]"));
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "out", *out, {q.element_type()},
                                   {b, s_q, h_q, kHeadDimV}, "[b, s_q, h_q, 512]"));
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "lse", *lse, f32, {b, h_q, s_q}, "[b, h_q, s_q]"));
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "partial_o", *partial_o, f32,
                                   {rows, s_q, h_q, kHeadDimV}, "[b + num_parts, s_q, h_q, 512]"));
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "partial_lse", *partial_lse, f32, {rows, s_q, h_q},
                                   "[b + num_parts, s_q, h_q]"));

  DenseDecodeParams params;
  params.q = q.untyped_data();
  params.k_cache = k_cache.untyped_data();
  params.block_table = static_cast<const int32_t*>(block_table.untyped_data());
  params.cache_seqlens = static_cast<const int32_t*>(cache_seqlens.untyped_data());
  params.tile_metadata = static_cast<const MetadataRow*>(tile_metadata.untyped_data());
  params.num_splits = static_cast<const int32_t*>(num_splits.untyped_data());
  params.out = out->untyped_data();
  params.lse = static_cast<float*>(lse->untyped_data());
  params.partial_o = static_cast<float*>(partial_o->untyped_data());
  params.partial_lse = static_cast<float*>(partial_lse->untyped_data());
  params.batch = b;
  params.s_q = s_q;
  params.h_q = h_q;
  params.h_kv = k_cache.dimensions()[2];
  params.num_blocks = k_cache.dimensions()[0];
  params.page = k_cache.dimensions()[1];
  params.max_blocks_per_seq = block_table.dimensions()[1];
  params.num_parts = tile_metadata.dimensions()[0];
  params.softmax_scale = softmax_scale;
  params.causal = causal;
  params.dtype = ffi_helpers::element_type(q);
  return ffi_helpers::launch(kTarget, params, stream, dense_decode_params_error,
                             launch_dense_decode);
}

}  // namespace
}  // namespace jfm

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFlashmlaDecodeDenseSm90, jfm::DecodeDenseImpl,
                              ::xla::ffi::Ffi::Bind()
                                  .Ctx<::xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<::xla::ffi::AnyBuffer>()  // q
                                  .Arg<::xla::ffi::AnyBuffer>()  // k_cache
                                  .Arg<::xla::ffi::AnyBuffer>()  // block_table
                                  .Arg<::xla::ffi::AnyBuffer>()  // cache_seqlens
                                  .Arg<::xla::ffi::AnyBuffer>()  // tile_metadata
                                  .Arg<::xla::ffi::AnyBuffer>()  // num_splits
                                  .Ret<::xla::ffi::AnyBuffer>()  // out
                                  .Ret<::xla::ffi::AnyBuffer>()  // lse
                                  .Ret<::xla::ffi::AnyBuffer>()  // partial_o
                                  .Ret<::xla::ffi::AnyBuffer>()  // partial_lse
                                  .Attr<float>("softmax_scale")
                                  .Attr<bool>("causal"),
                              {::xla::ffi::Traits::kCmdBufferCompatible});
