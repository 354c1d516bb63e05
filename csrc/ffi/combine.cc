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
using ffi_helpers::check_buffer;
using ffi_helpers::kAnyDim;

constexpr const char* kTarget = "jax_flashmla_combine";

ffi::Error CombineImpl(cudaStream_t stream, ffi::AnyBuffer partial_o, ffi::AnyBuffer partial_lse,
                       ffi::AnyBuffer num_splits, ffi::AnyBuffer attn_sink,
                       ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse) {
  const auto f32 = {ffi::DataType::F32};
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "partial_o", partial_o, f32,
                                   {kAnyDim, kAnyDim, kAnyDim, kAnyDim}, "[R, s_q, h_q, d_v]"));
  const auto po = partial_o.dimensions();
  const int64_t rows = po[0], s_q = po[1], h_q = po[2], d_v = po[3];
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "partial_lse", partial_lse, f32, {rows, s_q, h_q},
                                   "[R, s_q, h_q]"));
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "num_splits", num_splits, {ffi::DataType::S32},
                                   {kAnyDim}, "[b + 1]"));
  const int64_t batch = num_splits.dimensions()[0] - 1;
  if (batch < 0 || batch > rows) {
    return ffi_helpers::invalid_argument(
        kTarget, "num_splits must have shape [b + 1] with 0 <= b <= R = " +
                     std::to_string(rows) + "; got " + ffi_helpers::describe(num_splits));
  }
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "attn_sink", attn_sink, f32, {kAnyDim},
                                   "[h_q] (or [0] for no sink)"));
  const int64_t sink_len = attn_sink.dimensions()[0];
  if (sink_len != 0) {
    JFM_RETURN_IF_ERROR(check_buffer(kTarget, "attn_sink", attn_sink, f32, {h_q}, "[h_q]"));
  }
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "out", *out, {ffi::DataType::BF16, ffi::DataType::F16},
                                   {batch, s_q, h_q, d_v}, "[b, s_q, h_q, d_v]"));
  JFM_RETURN_IF_ERROR(check_buffer(kTarget, "lse", *lse, f32, {batch, h_q, s_q}, "[b, h_q, s_q]"));

  CombineParams params;
  params.partial_o = static_cast<const float*>(partial_o.untyped_data());
  params.partial_lse = static_cast<const float*>(partial_lse.untyped_data());
  params.num_splits = static_cast<const int32_t*>(num_splits.untyped_data());
  params.attn_sink = sink_len > 0 ? static_cast<const float*>(attn_sink.untyped_data()) : nullptr;
  params.out = out->untyped_data();
  params.lse = static_cast<float*>(lse->untyped_data());
  params.batch = batch;
  params.seqlen_q = s_q;
  params.num_heads = h_q;
  params.head_dim_v = d_v;
  params.num_partial_rows = rows;
  params.out_dtype = ffi_helpers::element_type(*out);
  params.skip_unsplit = false;
  return ffi_helpers::launch(kTarget, params, stream, combine_params_error, launch_combine);
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
