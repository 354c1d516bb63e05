// FFI target "jax_flashmla_combine": standalone split-KV combine. Every request
// is finalised from its partials (skip_unsplit = false).
//
//   operands:   partial_o    float32[R, s_q, h_q, d_v]   (R >= b, usually b + num_sm_parts)
//               partial_lse  float32[R, s_q, h_q]
//               num_splits   int32[b + 1]
//               attn_sink    float32[h_q], or float32[0] for none
//   results:    out          bfloat16 or float16 [b, s_q, h_q, d_v]
//               lse          float32[b, h_q, s_q]
//   attributes: none
#include <string>

#include <cuda_runtime_api.h>

#include "ffi/ffi_helpers.h"
#include "ffi/registry.h"
#include "kernels/common/combine.cuh"
#include "xla/ffi/api/ffi.h"

namespace jfm {
namespace {

namespace ffi = ::xla::ffi;
using ffi_helpers::check_array;
using ffi_helpers::check_dim;
using ffi_helpers::invalid_argument;

constexpr const char* kTarget = "jax_flashmla_combine";

ffi::Error CombineImpl(cudaStream_t stream, ffi::AnyBuffer partial_o, ffi::AnyBuffer partial_lse,
                       ffi::AnyBuffer num_splits, ffi::AnyBuffer attn_sink,
                       ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse) {
  constexpr const char* kPartialO = "[R, s_q, h_q, d_v]";
  constexpr const char* kPartialLse = "[R, s_q, h_q]";
  constexpr const char* kOut = "[b, s_q, h_q, d_v]";
  constexpr const char* kLse = "[b, h_q, s_q]";
  JFM_RETURN_IF_ERROR(
      check_array(kTarget, "partial_o", partial_o, {ffi::DataType::F32}, 4, kPartialO));
  JFM_RETURN_IF_ERROR(
      check_array(kTarget, "partial_lse", partial_lse, {ffi::DataType::F32}, 3, kPartialLse));
  JFM_RETURN_IF_ERROR(
      check_array(kTarget, "num_splits", num_splits, {ffi::DataType::S32}, 1, "[b + 1]"));
  JFM_RETURN_IF_ERROR(check_array(kTarget, "attn_sink", attn_sink, {ffi::DataType::F32}, 1,
                                  "[h_q] (or [0] for no sink)"));
  JFM_RETURN_IF_ERROR(
      check_array(kTarget, "out", *out, {ffi::DataType::BF16, ffi::DataType::F16}, 4, kOut));
  JFM_RETURN_IF_ERROR(check_array(kTarget, "lse", *lse, {ffi::DataType::F32}, 3, kLse));

  const auto po = partial_o.dimensions();
  const int64_t rows = po[0], seqlen_q = po[1], heads = po[2], head_dim_v = po[3];
  if (num_splits.dimensions()[0] < 1) {
    return invalid_argument(kTarget, "num_splits must have shape [b + 1] with b >= 0; got " +
                                         ffi_helpers::describe(num_splits));
  }
  const int64_t batch = num_splits.dimensions()[0] - 1;

  if (head_dim_v <= 0 || head_dim_v % 8 != 0) {
    return invalid_argument(kTarget, "partial_o must have shape [R, s_q, h_q, d_v] with d_v a "
                                     "positive multiple of 8; got " +
                                         ffi_helpers::describe(partial_o));
  }
  if (rows < batch) {
    return invalid_argument(
        kTarget, "partial_o must have at least b = num_splits.shape[0] - 1 = " +
                     std::to_string(batch) + " rows (R >= b); got " +
                     ffi_helpers::describe(partial_o));
  }
  JFM_RETURN_IF_ERROR(check_dim(kTarget, "partial_lse", partial_lse, 0, rows, kPartialLse,
                                "R = partial_o.shape[0]"));
  JFM_RETURN_IF_ERROR(check_dim(kTarget, "partial_lse", partial_lse, 1, seqlen_q, kPartialLse,
                                "s_q = partial_o.shape[1]"));
  JFM_RETURN_IF_ERROR(check_dim(kTarget, "partial_lse", partial_lse, 2, heads, kPartialLse,
                                "h_q = partial_o.shape[2]"));
  const int64_t sink_len = attn_sink.dimensions()[0];
  if (sink_len != 0 && sink_len != heads) {
    return invalid_argument(kTarget, "attn_sink must have shape [h_q] = (" +
                                         std::to_string(heads) +
                                         ",) or (0,) for no sink; got " +
                                         ffi_helpers::describe(attn_sink));
  }
  JFM_RETURN_IF_ERROR(check_dim(kTarget, "out", *out, 0, batch, kOut, "b = num_splits.shape[0] - 1"));
  JFM_RETURN_IF_ERROR(check_dim(kTarget, "out", *out, 1, seqlen_q, kOut, "s_q = partial_o.shape[1]"));
  JFM_RETURN_IF_ERROR(check_dim(kTarget, "out", *out, 2, heads, kOut, "h_q = partial_o.shape[2]"));
  JFM_RETURN_IF_ERROR(
      check_dim(kTarget, "out", *out, 3, head_dim_v, kOut, "d_v = partial_o.shape[3]"));
  JFM_RETURN_IF_ERROR(check_dim(kTarget, "lse", *lse, 0, batch, kLse, "b = num_splits.shape[0] - 1"));
  JFM_RETURN_IF_ERROR(check_dim(kTarget, "lse", *lse, 1, heads, kLse, "h_q = partial_o.shape[2]"));
  JFM_RETURN_IF_ERROR(check_dim(kTarget, "lse", *lse, 2, seqlen_q, kLse, "s_q = partial_o.shape[1]"));

  CombineParams params;
  params.partial_o = static_cast<const float*>(partial_o.untyped_data());
  params.partial_lse = static_cast<const float*>(partial_lse.untyped_data());
  params.num_splits = static_cast<const int32_t*>(num_splits.untyped_data());
  params.attn_sink = sink_len > 0 ? static_cast<const float*>(attn_sink.untyped_data()) : nullptr;
  params.out = out->untyped_data();
  params.lse = static_cast<float*>(lse->untyped_data());
  params.batch = batch;
  params.seqlen_q = seqlen_q;
  params.num_heads = heads;
  params.head_dim_v = head_dim_v;
  params.num_partial_rows = rows;
  params.out_dtype = out->element_type() == ffi::DataType::BF16 ? OutDtype::kBF16 : OutDtype::kF16;
  params.skip_unsplit = false;
  if (const char* message = combine_params_error(params)) {
    return invalid_argument(kTarget, message);
  }

  const cudaError_t err = launch_combine(params, stream);
  if (err != cudaSuccess) return ffi_helpers::cuda_error(kTarget, "combine kernel launch", err);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jfm

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFlashmlaCombine, jfm::CombineImpl,
                              ::xla::ffi::Ffi::Bind()
                                  .Ctx<::xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<::xla::ffi::AnyBuffer>()  // partial_o
                                  .Arg<::xla::ffi::AnyBuffer>()  // partial_lse
                                  .Arg<::xla::ffi::AnyBuffer>()  // num_splits
                                  .Arg<::xla::ffi::AnyBuffer>()  // attn_sink
                                  .Ret<::xla::ffi::AnyBuffer>()  // out
                                  .Ret<::xla::ffi::AnyBuffer>(), // lse
                              {::xla::ffi::Traits::kCmdBufferCompatible});
