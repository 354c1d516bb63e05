// FFI targets of the sparse (top-k) MLA prefill over a BF16 KV array. An absent optional
// operand is passed with a zero-sized dim (named below).
//
// "jax_flashmla_prefill_sparse_sm90", the forward:
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
//
// "jax_flashmla_prefill_sparse_backward_sm90", the backward (prefill_sparse_backward.cuh):
//   operands:   q            bfloat16 [s_q, h_q, d_qk]
//               kv           bfloat16 [s_kv, 1, d_qk]
//               indices      int32[s_q, 1, topk]
//               topk_length  int32[s_q], or int32[0] for none
//               d_out        bfloat16 [s_q, h_q, 512], the sink factor applied
//               lse          float32[s_q, h_q]
//               row_shift    float32[s_q, h_q]
//               fixed_scale  float32[1] for dkv summed in 64-bit fixed point (bitwise
//                            repeatable), or float32[0] for float32 sums
//   results:    dq           bfloat16 [s_q, h_q, d_qk]
//               dkv          float32[s_kv, 1, d_qk]
//               dkv_fixed    uint32[s_kv, 1, d_qk, 2] with fixed_scale (the int64 sums,
//                            workspace), else uint32[0]
//   attributes: softmax_scale (f32)
#include <string>

#include <cuda_runtime_api.h>

#include "ffi/ffi_helpers.h"
#include "ffi/registry.h"
#include "kernels/sm90/prefill_sparse/prefill_sparse.cuh"
#include "kernels/sm90/prefill_sparse/prefill_sparse_backward.cuh"
#include "xla/ffi/api/ffi.h"

namespace jfm {
namespace {

namespace ffi = ::xla::ffi;
using ffi_helpers::check_buffer;
using ffi_helpers::kAnyDim;

constexpr const char* kTarget = "jax_flashmla_prefill_sparse_sm90";
constexpr const char* kBackwardTarget = "jax_flashmla_prefill_sparse_backward_sm90";

// q, kv and indices, checked for `target`; their sizes into s_q, h_q, d_qk, s_kv and topk.
ffi::Error check_qkv(const char* target, ffi::AnyBuffer q, ffi::AnyBuffer kv,
                     ffi::AnyBuffer indices, int64_t& s_q, int64_t& h_q, int64_t& d_qk,
                     int64_t& s_kv, int64_t& topk) {
  const auto bf16 = {ffi::DataType::BF16};
  JFM_RETURN_IF_ERROR(
      check_buffer(target, "q", q, bf16, {kAnyDim, kAnyDim, kAnyDim}, "[s_q, h_q, d_qk]"));
  const auto qd = q.dimensions();
  s_q = qd[0];
  h_q = qd[1];
  d_qk = qd[2];
  if (d_qk != kHeadDimQK && d_qk != kHeadDimLatent) {
    return ffi_helpers::invalid_argument(
        target, "q's d_qk must be 576 or 512; got " + ffi_helpers::describe(q));
  }
  JFM_RETURN_IF_ERROR(check_buffer(target, "kv", kv, bf16, {kAnyDim, 1, d_qk}, "[s_kv, 1, d_qk]"));
  JFM_RETURN_IF_ERROR(check_buffer(target, "indices", indices, {ffi::DataType::S32},
                                   {s_q, 1, kAnyDim}, "[s_q, 1, topk]"));
  s_kv = kv.dimensions()[0];
  topk = indices.dimensions()[2];
  return ffi::Error::Success();
}

// topk_length ([s_q], or [0] for none), checked for `target`: its data, or nullptr.
ffi::Error check_topk_length(const char* target, ffi::AnyBuffer topk_length, int64_t s_q,
                             const int32_t*& data) {
  const auto s32 = {ffi::DataType::S32};
  JFM_RETURN_IF_ERROR(
      check_buffer(target, "topk_length", topk_length, s32, {kAnyDim}, "[s_q] (or [0] for none)"));
  data = nullptr;
  if (topk_length.dimensions()[0] != 0) {
    JFM_RETURN_IF_ERROR(check_buffer(target, "topk_length", topk_length, s32, {s_q}, "[s_q]"));
    data = static_cast<const int32_t*>(topk_length.untyped_data());
  }
  return ffi::Error::Success();
}

ffi::Error PrefillSparseImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer kv,
                             ffi::AnyBuffer indices, ffi::AnyBuffer attn_sink,
                             ffi::AnyBuffer topk_length, ffi::Result<ffi::AnyBuffer> out,
                             ffi::Result<ffi::AnyBuffer> max_logits,
                             ffi::Result<ffi::AnyBuffer> lse, float softmax_scale) {
  const auto bf16 = {ffi::DataType::BF16};
  const auto f32 = {ffi::DataType::F32};
  SparsePrefillParams params;
  int64_t s_q, h_q, d_qk;
  JFM_RETURN_IF_ERROR(
      check_qkv(kTarget, q, kv, indices, s_q, h_q, d_qk, params.s_kv, params.topk));
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "attn_sink", attn_sink, f32, {kAnyDim},
                                   "[h_q] (or [0] for none)"));
  if (attn_sink.dimensions()[0] != 0) {
    JFM_RETURN_IF_ERROR(check_buffer(kTarget, "attn_sink", attn_sink, f32, {h_q}, "[h_q]"));
    params.attn_sink = static_cast<const float*>(attn_sink.untyped_data());
  }
  JFM_RETURN_IF_ERROR(check_topk_length(kTarget, topk_length, s_q, params.topk_length));
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
  params.h_q = h_q;
  params.d_qk = d_qk;
  params.softmax_scale = softmax_scale;
  return ffi_helpers::launch(kTarget, params, stream, sparse_prefill_params_error,
                             launch_sparse_prefill);
}

ffi::Error PrefillSparseBackwardImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer kv,
                                     ffi::AnyBuffer indices, ffi::AnyBuffer topk_length,
                                     ffi::AnyBuffer d_out, ffi::AnyBuffer lse,
                                     ffi::AnyBuffer row_shift, ffi::AnyBuffer fixed_scale,
                                     ffi::Result<ffi::AnyBuffer> dq,
                                     ffi::Result<ffi::AnyBuffer> dkv,
                                     ffi::Result<ffi::AnyBuffer> dkv_fixed, float softmax_scale) {
  const auto bf16 = {ffi::DataType::BF16};
  const auto f32 = {ffi::DataType::F32};
  SparsePrefillBackwardParams params;
  int64_t s_q, h_q, d_qk;
  JFM_RETURN_IF_ERROR(
      check_qkv(kBackwardTarget, q, kv, indices, s_q, h_q, d_qk, params.s_kv, params.topk));
  JFM_RETURN_IF_ERROR(check_topk_length(kBackwardTarget, topk_length, s_q, params.topk_length));
  JFM_RETURN_IF_ERROR(check_buffer(kBackwardTarget, "d_out", d_out, bf16, {s_q, h_q, kHeadDimV},
                                   "[s_q, h_q, 512]"));
  JFM_RETURN_IF_ERROR(check_buffer(kBackwardTarget, "lse", lse, f32, {s_q, h_q}, "[s_q, h_q]"));
  JFM_RETURN_IF_ERROR(
      check_buffer(kBackwardTarget, "row_shift", row_shift, f32, {s_q, h_q}, "[s_q, h_q]"));
  JFM_RETURN_IF_ERROR(
      check_buffer(kBackwardTarget, "dq", *dq, bf16, {s_q, h_q, d_qk}, "[s_q, h_q, d_qk]"));
  JFM_RETURN_IF_ERROR(check_buffer(kBackwardTarget, "dkv", *dkv, f32, {params.s_kv, 1, d_qk},
                                   "[s_kv, 1, d_qk]"));
  JFM_RETURN_IF_ERROR(check_buffer(kBackwardTarget, "fixed_scale", fixed_scale, f32, {kAnyDim},
                                   "[1] (or [0] for float32 sums)"));
  const bool fixed_point = fixed_scale.dimensions()[0] != 0;
  const auto u32 = {ffi::DataType::U32};
  if (fixed_point) {
    JFM_RETURN_IF_ERROR(
        check_buffer(kBackwardTarget, "fixed_scale", fixed_scale, f32, {1}, "[1]"));
    JFM_RETURN_IF_ERROR(check_buffer(kBackwardTarget, "dkv_fixed", *dkv_fixed, u32,
                                     {params.s_kv, 1, d_qk, 2}, "[s_kv, 1, d_qk, 2]"));
    params.fixed_scale = static_cast<const float*>(fixed_scale.untyped_data());
    params.dkv_fixed = static_cast<int64_t*>(dkv_fixed->untyped_data());
  } else {
    JFM_RETURN_IF_ERROR(
        check_buffer(kBackwardTarget, "dkv_fixed", *dkv_fixed, u32, {0}, "[0] (no fixed_scale)"));
  }
  params.q = q.untyped_data();
  params.kv = kv.untyped_data();
  params.indices = static_cast<const int32_t*>(indices.untyped_data());
  params.d_out = d_out.untyped_data();
  params.lse = static_cast<const float*>(lse.untyped_data());
  params.row_shift = static_cast<const float*>(row_shift.untyped_data());
  params.dq = dq->untyped_data();
  params.dkv = static_cast<float*>(dkv->untyped_data());
  params.s_q = s_q;
  params.h_q = h_q;
  params.d_qk = d_qk;
  params.softmax_scale = softmax_scale;
  return ffi_helpers::launch(kBackwardTarget, params, stream,
                             sparse_prefill_backward_params_error, launch_sparse_prefill_backward);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFlashmlaPrefillSparseBackwardSm90, jfm::PrefillSparseBackwardImpl,
                              ::xla::ffi::Ffi::Bind()
                                  .Ctx<::xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<::xla::ffi::AnyBuffer>()  // q
                                  .Arg<::xla::ffi::AnyBuffer>()  // kv
                                  .Arg<::xla::ffi::AnyBuffer>()  // indices
                                  .Arg<::xla::ffi::AnyBuffer>()  // topk_length
                                  .Arg<::xla::ffi::AnyBuffer>()  // d_out
                                  .Arg<::xla::ffi::AnyBuffer>()  // lse
                                  .Arg<::xla::ffi::AnyBuffer>()  // row_shift
                                  .Arg<::xla::ffi::AnyBuffer>()  // fixed_scale
                                  .Ret<::xla::ffi::AnyBuffer>()  // dq
                                  .Ret<::xla::ffi::AnyBuffer>()  // dkv
                                  .Ret<::xla::ffi::AnyBuffer>()  // dkv_fixed
                                  .Attr<float>("softmax_scale"),
                              {::xla::ffi::Traits::kCmdBufferCompatible});
