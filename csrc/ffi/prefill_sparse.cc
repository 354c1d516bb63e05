// FFI target "jax_flashmla_prefill_sparse_sm90": sparse (top-k) MLA prefill over a BF16 KV
// array. An absent optional operand is passed with a zero-sized dim (named below).
//
//   operands:   q            bfloat16 [s_q, h_q, d_qk]   (d_qk 576 or 512)
//               kv           bfloat16 [s_kv, 1, d_qk]
//               indices      int32[s_q, 1, topk]
//               attn_sink    float32[h_q], or float32[0] for none
//               topk_length  int32[s_q], or int32[0] for none
//   results:    out          bfloat16 [s_q, h_q, 512]
//               max_logits   float32[s_q, h_q]
//               lse          float32[s_q, h_q]
//   attributes: softmax_scale (f32)
#include <string>

#include <cuda_runtime_api.h>

#include "ffi/ffi_helpers.h"
#include "ffi/registry.h"
#include "kernels/sm90/prefill_sparse/prefill_sparse.cuh"
#include "xla/ffi/api/ffi.h"

namespace jfm {
namespace {

namespace ffi = ::xla::ffi;
using ffi_helpers::check_buffer;
using ffi_helpers::kAnyDim;

constexpr const char* kTarget = "jax_flashmla_prefill_sparse_sm90";

ffi::Error PrefillSparseImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer kv,
                             ffi::AnyBuffer indices, ffi::AnyBuffer attn_sink,
                             ffi::AnyBuffer topk_length, ffi::Result<ffi::AnyBuffer> out,
                             ffi::Result<ffi::AnyBuffer> max_logits,
                             ffi::Result<ffi::AnyBuffer> lse, float softmax_scale) {
  const auto bf16 = {ffi::DataType::BF16};
  const auto s32 = {ffi::DataType::S32};
  const auto f32 = {ffi::DataType::F32};
  JFM_RETURN_IF_ERROR(
      check_buffer(kTarget, "q", q, bf16, {kAnyDim, kAnyDim, kAnyDim}, "[s_q, h_q, d_qk]"));
  const auto qd = q.dimensions();
  const int64_t s_q = qd[0], h_q = qd[1], d_qk = qd[2];
  if (d_qk != kHeadDimQK && d_qk != kHeadDimLatent) {
    return ffi_helpers::invalid_argument(
        kTarget, "q's d_qk must be 576 or 512; got " + ffi_helpers::describe(q));
  }
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "kv", kv, bf16, {kAnyDim, 1, d_qk}, "[s_kv, 1, d_qk]"));
  JFM_RETURN_IF_ERROR(
      check_buffer(kTarget, "indices", indices, s32, {s_q, 1, kAnyDim}, "[s_q, 1, topk]"));
  SparsePrefillParams params;
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "attn_sink", attn_sink, f32, {kAnyDim},
                                   "[h_q] (or [0] for none)"));
  if (attn_sink.dimensions()[0] != 0) {
    JFM_RETURN_IF_ERROR(check_buffer(kTarget, "attn_sink", attn_sink, f32, {h_q}, "[h_q]"));
    params.attn_sink = static_cast<const float*>(attn_sink.untyped_data());
  }
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "topk_length", topk_length, s32, {kAnyDim},
                                   "[s_q] (or [0] for none)"));
  if (topk_length.dimensions()[0] != 0) {
    JFM_RETURN_IF_ERROR(
        check_buffer(kTarget, "topk_length", topk_length, s32, {s_q}, "[s_q]"));
    params.topk_length = static_cast<const int32_t*>(topk_length.untyped_data());
  }
  JFM_RETURN_IF_ERROR(
      check_buffer(kTarget, "out", *out, bf16, {s_q, h_q, kHeadDimV}, "[s_q, h_q, 512]"));
  JFM_RETURN_IF_ERROR(
      check_buffer(kTarget, "max_logits", *max_logits, f32, {s_q, h_q}, "[s_q, h_q]"));
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "lse", *lse, f32, {s_q, h_q}, "[s_q, h_q]"));

  params.q = q.untyped_data();
  params.kv = kv.untyped_data();
  params.indices = static_cast<const int32_t*>(indices.untyped_data());
  params.out = out->untyped_data();
  params.max_logits = static_cast<float*>(max_logits->untyped_data());
  params.lse = static_cast<float*>(lse->untyped_data());
  params.s_q = s_q;
  params.s_kv = kv.dimensions()[0];
  params.h_q = h_q;
  params.d_qk = d_qk;
  params.topk = indices.dimensions()[2];
  params.softmax_scale = softmax_scale;
  return ffi_helpers::launch(kTarget, params, stream, sparse_prefill_params_error,
                             launch_sparse_prefill);
}

}  // namespace
}  // namespace jfm

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFlashmlaPrefillSparseSm90, jfm::PrefillSparseImpl,
                              ::xla::ffi::Ffi::Bind()
                                  .Ctx<::xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<::xla::ffi::AnyBuffer>()  // q
                                  .Arg<::xla::ffi::AnyBuffer>()  // kv
                                  .Arg<::xla::ffi::AnyBuffer>()  // indices
                                  .Arg<::xla::ffi::AnyBuffer>()  // attn_sink
                                  .Arg<::xla::ffi::AnyBuffer>()  // topk_length
                                  .Ret<::xla::ffi::AnyBuffer>()  // out
                                  .Ret<::xla::ffi::AnyBuffer>()  // max_logits
                                  .Ret<::xla::ffi::AnyBuffer>()  // lse
                                  .Attr<float>("softmax_scale"),
                              {::xla::ffi::Traits::kCmdBufferCompatible});
