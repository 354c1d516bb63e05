// Split-KV combine: merges the fp32 partial outputs of a request's splits into
// the final output and LSE. Plain C++ interface, no JAX/XLA/CuTe includes.
//
// For request i, query token t, head h, with splits s in
// [num_splits[i], num_splits[i+1]) (rows of the partial buffers):
//   m = max_s lse_s
//   m == -inf or no split:  out = 0, lse = +inf            ("lonely" row)
//   otherwise:              lse = m + log(sum_s exp(lse_s - m))
//                           out = sum_s exp(lse_s - lse) * O_s   (fp32, rounded once)
//   attn_sink given:        out *= 1 / (1 + exp(sink[h] - lse)); lse unchanged,
//                           lonely rows stay 0 / +inf.
// A split whose lse is -inf saw no key: it contributes nothing and its partial
// output row is not read.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "kernels/common/mla_geometry.cuh"

namespace jfm {

struct CombineParams {
  // Inputs, all contiguous, row-major.
  const float* partial_o = nullptr;    // [num_partial_rows, seqlen_q, num_heads, head_dim_v]
  const float* partial_lse = nullptr;  // [num_partial_rows, seqlen_q, num_heads], natural log
  const int32_t* num_splits = nullptr; // [batch + 1], exclusive prefix sum of splits
  const float* attn_sink = nullptr;    // [num_heads] or nullptr (no sink)
  // Outputs.
  void* out = nullptr;                 // [batch, seqlen_q, num_heads, head_dim_v], out_dtype
  float* lse = nullptr;                // [batch, num_heads, seqlen_q]
  int64_t batch = 0;
  int64_t seqlen_q = 0;
  int64_t num_heads = 0;
  int64_t head_dim_v = 0;              // a multiple of 8 (16-byte loads; 8 is the tested rule)
  int64_t num_partial_rows = 0;        // split indices are clamped to it (no OOB reads)
  ElementType out_dtype = ElementType::kBF16;
  // true: requests with exactly one split are left untouched (their output
  // and lse were written directly by the attention kernel); false: every
  // request is finalised from its partials.
  bool skip_unsplit = false;
};

// nullptr when the parameters are valid, else a static message.
const char* combine_params_error(const CombineParams& params);

// Launches the combine kernel on `stream` (no-op for an empty output). Returns
// cudaErrorInvalidValue for bad parameters (see combine_params_error), else
// the launch status. No allocation, no synchronisation (graph capturable).
cudaError_t launch_combine(const CombineParams& params, cudaStream_t stream);

}  // namespace jfm
