// FFI target "jax_flashmla_decode_dense_sm90": dense MLA decode over a paged BF16/FP16 cache,
// the decode kernel followed by the split-KV combine.
//
//   operands:   q              bfloat16 or float16 [b, s_q, h_q, 576]
//               k_cache        q's dtype [num_blocks, 64, h_kv, 576]
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

#include <string>

#include "ffi/ffi_helpers.h"
#include "ffi/registry.h"
#include "kernels/sm90/decode_dense/decode_dense.cuh"
#include "xla/ffi/api/ffi.h"

namespace jfm {
namespace {

namespace ffi = ::xla::ffi;
using ffi_helpers::check_array;
using ffi_helpers::check_dim;
using ffi_helpers::invalid_argument;

constexpr const char* kTarget = "jax_flashmla_decode_dense_sm90";

ffi::Error DecodeDenseImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
                           ffi::AnyBuffer block_table, ffi::AnyBuffer cache_seqlens,
                           ffi::AnyBuffer tile_metadata, ffi::AnyBuffer num_splits,
                           ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                           ffi::Result<ffi::AnyBuffer> partial_o,
                           ffi::Result<ffi::AnyBuffer> partial_lse, float softmax_scale,
                           bool causal) {
  const auto half_types = {ffi::DataType::BF16, ffi::DataType::F16};
  JFM_RETURN_IF_ERROR(check_array(kTarget, "q", q, half_types, 4, "[b, s_q, h_q, 576]"));
  JFM_RETURN_IF_ERROR(check_array(kTarget, "k_cache", k_cache, {q.element_type()}, 4,
                                  "[num_blocks, 64, h_kv, 576]"));
  JFM_RETURN_IF_ERROR(check_array(kTarget, "block_table", block_table, {ffi::DataType::S32}, 2,
                                  "[b, max_blocks_per_seq]"));
  JFM_RETURN_IF_ERROR(
      check_array(kTarget, "cache_seqlens", cache_seqlens, {ffi::DataType::S32}, 1, "[b]"));
  JFM_RETURN_IF_ERROR(check_array(kTarget, "tile_metadata", tile_metadata, {ffi::DataType::S32},
                                  2, "[num_parts, 8]"));
  JFM_RETURN_IF_ERROR(
      check_array(kTarget, "num_splits", num_splits, {ffi::DataType::S32}, 1, "[b + 1]"));

  const auto qd = q.dimensions();
  const int64_t b = qd[0], s_q = qd[1], h_q = qd[2];
  const auto kd = k_cache.dimensions();
  const int64_t parts = tile_metadata.dimensions()[0];
  JFM_RETURN_IF_ERROR(check_dim(kTarget, "q", q, 3, kDecodeHeadDimQK, "[b, s_q, h_q, 576]",
                                "d_qk of the kernel"));
  JFM_RETURN_IF_ERROR(check_dim(kTarget, "k_cache", k_cache, 1, kDecodePageSize,
                                "[num_blocks, 64, h_kv, 576]", "page size of the kernel"));
  JFM_RETURN_IF_ERROR(check_dim(kTarget, "k_cache", k_cache, 3, kDecodeHeadDimQK,
                                "[num_blocks, 64, h_kv, 576]", "d_qk of the kernel"));
  JFM_RETURN_IF_ERROR(
      check_dim(kTarget, "block_table", block_table, 0, b, "[b, max_blocks_per_seq]", "b"));
  JFM_RETURN_IF_ERROR(check_dim(kTarget, "cache_seqlens", cache_seqlens, 0, b, "[b]", "b"));
  JFM_RETURN_IF_ERROR(check_dim(kTarget, "tile_metadata", tile_metadata, 1, 8, "[num_parts, 8]",
                                "8 fields per part"));
  JFM_RETURN_IF_ERROR(check_dim(kTarget, "num_splits", num_splits, 0, b + 1, "[b + 1]", "b + 1"));
  const char* out_shape = "[b, s_q, h_q, 512]";
  for (int axis = 0; axis < 3; ++axis) {
    JFM_RETURN_IF_ERROR(check_dim(kTarget, "out", *out, axis, qd[axis], out_shape, "as q"));
  }
  JFM_RETURN_IF_ERROR(check_dim(kTarget, "out", *out, 3, kDecodeHeadDimV, out_shape, "d_v"));
  JFM_RETURN_IF_ERROR(check_dim(kTarget, "lse", *lse, 0, b, "[b, h_q, s_q]", "b"));
  JFM_RETURN_IF_ERROR(check_dim(kTarget, "lse", *lse, 1, h_q, "[b, h_q, s_q]", "h_q"));
  JFM_RETURN_IF_ERROR(check_dim(kTarget, "lse", *lse, 2, s_q, "[b, h_q, s_q]", "s_q"));
  const char* partial_shape = "[b + num_parts, s_q, h_q, 512]";
  JFM_RETURN_IF_ERROR(
      check_dim(kTarget, "partial_o", *partial_o, 0, b + parts, partial_shape, "b + num_parts"));
  JFM_RETURN_IF_ERROR(check_dim(kTarget, "partial_lse", *partial_lse, 0, b + parts,
                                "[b + num_parts, s_q, h_q]", "b + num_parts"));

  DenseDecodeParams params;
  params.q = q.untyped_data();
  params.k_cache = k_cache.untyped_data();
  params.block_table = static_cast<const int32_t*>(block_table.untyped_data());
  params.cache_seqlens = static_cast<const int32_t*>(cache_seqlens.untyped_data());
  params.tile_metadata = static_cast<const int32_t*>(tile_metadata.untyped_data());
  params.num_splits = static_cast<const int32_t*>(num_splits.untyped_data());
  params.out = out->untyped_data();
  params.lse = static_cast<float*>(lse->untyped_data());
  params.partial_o = static_cast<float*>(partial_o->untyped_data());
  params.partial_lse = static_cast<float*>(partial_lse->untyped_data());
  params.batch = b;
  params.s_q = s_q;
  params.h_q = h_q;
  params.h_kv = kd[2];
  params.num_blocks = kd[0];
  params.max_blocks_per_seq = block_table.dimensions()[1];
  params.num_parts = parts;
  params.softmax_scale = softmax_scale;
  params.causal = causal;
  params.dtype = q.element_type() == ffi::DataType::BF16 ? DecodeDtype::kBF16 : DecodeDtype::kF16;
  if (const char* message = dense_decode_params_error(params)) {
    return invalid_argument(kTarget, message);
  }
  const cudaError_t err = launch_dense_decode(params, stream);
  if (err != cudaSuccess) return ffi_helpers::cuda_error(kTarget, "dense decode launch", err);
  return ffi::Error::Success();
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
