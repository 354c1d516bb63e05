// FFI target "jax_flashmla_decode_sparse_sm90": sparse (top-k) MLA decode over FP8 caches, the
// decode kernel followed by the split-KV combine. An absent optional operand is passed with a
// zero-sized dim (named below).
//
//   operands:   q                  bfloat16 [b, s_q, h_q, d_qk]   (d_qk 512 for MODEL1, else 576)
//               k_cache            float8_e4m3fn or uint8 [num_blocks, page, 1, 656 | 584 | 576]
//                                  (the layout: V32, MODEL1 or E4M3)
//               indices            int32[b, s_q, topk]
//               topk_length        int32[b], or int32[0] for none
//               attn_sink          float32[h_q], or float32[0] for none
//               extra_k_cache      k_cache's dtype and layout [extra_num_blocks, extra_page, 1, ...]
//               extra_indices      int32[b, s_q, extra_topk]; extra_topk 0: no extra cache
//               extra_topk_length  int32[b], or int32[0] for none
//               k_scale            float32[1], the scale of an E4M3 cache; float32[0] otherwise
//               tile_metadata      int32[num_parts, 8]   (get_mla_metadata)
//               num_splits         int32[b + 1]
//   results:    out                bfloat16 [b, s_q, h_q, 512]
//               lse                float32[b, h_q, s_q]
//               partial_o          float32[b + num_parts, s_q, h_q, 512]   (workspace)
//               partial_lse        float32[b + num_parts, s_q, h_q]        (workspace)
//   attributes: softmax_scale (f32)
#include <string>

#include <cuda_runtime_api.h>

#include "ffi/ffi_helpers.h"
#include "ffi/registry.h"
#include "kernels/sm90/decode_sparse/decode_sparse.cuh"
#include "xla/ffi/api/ffi.h"

namespace jfm {
namespace {

namespace ffi = ::xla::ffi;
using ffi_helpers::check_buffer;
using ffi_helpers::kAnyDim;

constexpr const char* kTarget = "jax_flashmla_decode_sparse_sm90";

// An optional int32 [b] operand: nullptr when it has 0 elements.
ffi::Error optional_lengths(const char* name, const ffi::AnyBuffer& buf, int64_t b,
                            const int32_t*& out) {
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, name, buf, {ffi::DataType::S32}, {kAnyDim},
                                   "[b] (or [0] for none)"));
  out = nullptr;
  if (buf.dimensions()[0] == 0) return ffi::Error::Success();
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, name, buf, {ffi::DataType::S32}, {b}, "[b]"));
  out = static_cast<const int32_t*>(buf.untyped_data());
  return ffi::Error::Success();
}

ffi::Error DecodeSparseImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
                            ffi::AnyBuffer indices, ffi::AnyBuffer topk_length,
                            ffi::AnyBuffer attn_sink, ffi::AnyBuffer extra_k_cache,
                            ffi::AnyBuffer extra_indices, ffi::AnyBuffer extra_topk_length,
                            ffi::AnyBuffer k_scale, ffi::AnyBuffer tile_metadata,
                            ffi::AnyBuffer num_splits,
                            ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                            ffi::Result<ffi::AnyBuffer> partial_o,
                            ffi::Result<ffi::AnyBuffer> partial_lse, float softmax_scale) {
  const auto s32 = {ffi::DataType::S32};
  const auto f32 = {ffi::DataType::F32};
  const auto fp8 = {ffi::DataType::F8E4M3FN, ffi::DataType::U8};
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "q", q, {ffi::DataType::BF16},
                                   {kAnyDim, kAnyDim, kAnyDim, kAnyDim}, "[b, s_q, h_q, d_qk]"));
  const auto qd = q.dimensions();
  const int64_t b = qd[0], s_q = qd[1], h_q = qd[2], d_qk = qd[3];
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "k_cache", k_cache, fp8,
                                   {kAnyDim, kAnyDim, 1, kAnyDim},
                                   "[num_blocks, page, 1, bytes per token]"));
  // The layout is the one whose bytes per token are the cache's last dim.
  const int64_t token_bytes = k_cache.dimensions()[3];
  const Fp8Layout layout =
      token_bytes == fp8_bytes_per_token(Fp8Layout::kV32)     ? Fp8Layout::kV32
      : token_bytes == fp8_bytes_per_token(Fp8Layout::kModel1) ? Fp8Layout::kModel1
                                                               : Fp8Layout::kE4M3;
  if (token_bytes != fp8_bytes_per_token(layout) || d_qk != fp8_head_dim_qk(layout)) {
    return ffi_helpers::invalid_argument(
        kTarget, "k_cache's last dim must be 656 (V32, d_qk 576), 584 (MODEL1, d_qk 512) or 576 "
                 "(E4M3, d_qk 576), with q's d_qk that of its layout; got " +
                     ffi_helpers::describe(k_cache) + " and " + ffi_helpers::describe(q));
  }
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "indices", indices, s32, {b, s_q, kAnyDim},
                                   "[b, s_q, topk]"));
  SparseDecodeParams params;
  JFM_RETURN_IF_ERROR(optional_lengths("topk_length", topk_length, b, params.main.topk_length));
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "attn_sink", attn_sink, f32, {kAnyDim},
                                   "[h_q] (or [0] for none)"));
  if (attn_sink.dimensions()[0] != 0) {
    JFM_RETURN_IF_ERROR(check_buffer(kTarget, "attn_sink", attn_sink, f32, {h_q}, "[h_q]"));
    params.attn_sink = static_cast<const float*>(attn_sink.untyped_data());
  }
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "extra_indices", extra_indices, s32,
                                   {b, s_q, kAnyDim}, "[b, s_q, extra_topk]"));
  const bool has_extra = extra_indices.dimensions()[2] != 0;
  if (has_extra) {
    JFM_RETURN_IF_ERROR(check_buffer(kTarget, "extra_k_cache", extra_k_cache,
                                     {k_cache.element_type()}, {kAnyDim, kAnyDim, 1, token_bytes},
                                     "[extra_num_blocks, extra_page, 1, bytes per token]"));
    JFM_RETURN_IF_ERROR(optional_lengths("extra_topk_length", extra_topk_length, b,
                                         params.extra.topk_length));
  }
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "k_scale", k_scale, f32,
                                   {layout == Fp8Layout::kE4M3 ? 1 : 0},
                                   "[1] for an E4M3 cache, else [0]"));
  if (layout == Fp8Layout::kE4M3) {
    params.k_scale = static_cast<const float*>(k_scale.untyped_data());
  }
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "tile_metadata", tile_metadata, s32,
                                   {kAnyDim, kMetadataFields}, "[num_parts, 8]"));
  const int64_t rows = b + tile_metadata.dimensions()[0];
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "num_splits", num_splits, s32, {b + 1}, "[b + 1]"));
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "out", *out, {ffi::DataType::BF16},
                                   {b, s_q, h_q, kHeadDimV}, "[b, s_q, h_q, 512]"));
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "lse", *lse, f32, {b, h_q, s_q}, "[b, h_q, s_q]"));
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "partial_o", *partial_o, f32,
                                   {rows, s_q, h_q, kHeadDimV}, "[b + num_parts, s_q, h_q, 512]"));
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "partial_lse", *partial_lse, f32, {rows, s_q, h_q},
                                   "[b + num_parts, s_q, h_q]"));

  params.q = q.untyped_data();
  params.main.cache = k_cache.untyped_data();
  params.main.indices = static_cast<const int32_t*>(indices.untyped_data());
  params.main.num_blocks = k_cache.dimensions()[0];
  params.main.page = k_cache.dimensions()[1];
  params.main.topk = indices.dimensions()[2];
  if (has_extra) {
    params.extra.cache = extra_k_cache.untyped_data();
    params.extra.indices = static_cast<const int32_t*>(extra_indices.untyped_data());
    params.extra.num_blocks = extra_k_cache.dimensions()[0];
    params.extra.page = extra_k_cache.dimensions()[1];
    params.extra.topk = extra_indices.dimensions()[2];
  }
  params.tile_metadata = static_cast<const MetadataRow*>(tile_metadata.untyped_data());
  params.num_splits = static_cast<const int32_t*>(num_splits.untyped_data());
  params.out = out->untyped_data();
  params.lse = static_cast<float*>(lse->untyped_data());
  params.partial_o = static_cast<float*>(partial_o->untyped_data());
  params.partial_lse = static_cast<float*>(partial_lse->untyped_data());
  params.batch = b;
  params.s_q = s_q;
  params.h_q = h_q;
  params.num_parts = tile_metadata.dimensions()[0];
  params.softmax_scale = softmax_scale;
  params.layout = layout;
  return ffi_helpers::launch(kTarget, params, stream, sparse_decode_params_error,
                             launch_sparse_decode);
}

}  // namespace
}  // namespace jfm

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFlashmlaDecodeSparseSm90, jfm::DecodeSparseImpl,
                              ::xla::ffi::Ffi::Bind()
                                  .Ctx<::xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<::xla::ffi::AnyBuffer>()  // q
                                  .Arg<::xla::ffi::AnyBuffer>()  // k_cache
                                  .Arg<::xla::ffi::AnyBuffer>()  // indices
                                  .Arg<::xla::ffi::AnyBuffer>()  // topk_length
                                  .Arg<::xla::ffi::AnyBuffer>()  // attn_sink
                                  .Arg<::xla::ffi::AnyBuffer>()  // extra_k_cache
                                  .Arg<::xla::ffi::AnyBuffer>()  // extra_indices
                                  .Arg<::xla::ffi::AnyBuffer>()  // extra_topk_length
                                  .Arg<::xla::ffi::AnyBuffer>()  // k_scale
                                  .Arg<::xla::ffi::AnyBuffer>()  // tile_metadata
                                  .Arg<::xla::ffi::AnyBuffer>()  // num_splits
                                  .Ret<::xla::ffi::AnyBuffer>()  // out
                                  .Ret<::xla::ffi::AnyBuffer>()  // lse
                                  .Ret<::xla::ffi::AnyBuffer>()  // partial_o
                                  .Ret<::xla::ffi::AnyBuffer>()  // partial_lse
                                  .Attr<float>("softmax_scale"),
                              {::xla::ffi::Traits::kCmdBufferCompatible});
