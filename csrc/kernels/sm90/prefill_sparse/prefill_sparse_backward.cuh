// The backward pass of the sparse (top-k) MLA prefill on Hopper (sm_90a): the plain interface.
// No JAX/XLA/CuTe includes: the FFI handler includes only this header.
//
// For query token t, head h and a counted slot j selecting kv row r_j (the forward's rules,
// prefill_sparse.cuh), with s_j = scale * q . k_j and P_j = exp(s_j - lse):
//   dP_j  = do . v_j                          (do: the cotangent of out times the sink factor)
//   dS_j  = P_j (dP_j + shift)                (shift: the per-row term of the chain rule)
//   dq    = scale * sum_j dS_j k_j
//   dkv[r_j]       += scale * dS_j q          (all d_qk dims)
//   dkv[r_j, :512] += P_j do                  (V is the first 512 dims of a row)
// The caller folds the attention sink and the cotangent of lse into `d_out` and `row_shift`:
// with f = 1 / (1 + exp(sink - lse)) (1 without a sink), D = sum(d_out_orig * out) and dlse
// the cotangent of lse, d_out = f * d_out_orig and row_shift = dlse - f * D.
//
// One CTA per (query token, tile of 64 query heads), as the forward. dq is written whole
// (0 for a token with nothing selected). dkv is float32, summed with atomic additions, by
// default in float32 (the order of the additions, hence the last bits of dkv, may differ
// between runs); or, with `dkv_fixed`, in 64-bit fixed point (integer additions commute: dkv is
// bitwise repeatable), each addend times `*fixed_scale` (a power of two the caller chooses so
// that no sum leaves +-2^62) rounded to an integer, then dkv = sum / *fixed_scale.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "kernels/common/mla_geometry.cuh"

namespace jfm {

struct SparsePrefillBackwardParams {
  const void* q = nullptr;               // bfloat16 [s_q, h_q, d_qk]
  const void* kv = nullptr;              // bfloat16 [s_kv, 1, d_qk]
  const int32_t* indices = nullptr;      // [s_q, 1, topk]: rows of kv
  const int32_t* topk_length = nullptr;  // [s_q] or nullptr (every slot counts)
  const void* d_out = nullptr;           // bfloat16 [s_q, h_q, 512], sink factor applied
  const float* lse = nullptr;            // [s_q, h_q], the forward's (natural log)
  const float* row_shift = nullptr;      // [s_q, h_q]
  void* dq = nullptr;                    // bfloat16 [s_q, h_q, d_qk]
  float* dkv = nullptr;                  // [s_kv, 1, d_qk]
  int64_t* dkv_fixed = nullptr;          // [s_kv, d_qk] workspace, or nullptr (float32 sums)
  const float* fixed_scale = nullptr;    // [1]: with dkv_fixed, the fixed-point scale
  int64_t s_q = 0;
  int64_t s_kv = 0;
  int64_t h_q = 0;
  int64_t d_qk = 0;   // 576 or 512
  int64_t topk = 0;   // a positive multiple of 64
  float softmax_scale = 0.f;  // any finite value
};

// nullptr when the parameters are valid for the kernel, else a static message naming the
// limit (sizes, head dims, grid limits, alignment).
const char* sparse_prefill_backward_params_error(const SparsePrefillBackwardParams& params);

// Zeroes dkv (or dkv_fixed), launches the kernel on `stream` (then the conversion of dkv_fixed
// into dkv). No allocation, no synchronisation, nothing read from or written to the runtime's
// last-error slot (graph capturable, also on the first call). Returns the first CUDA error.
cudaError_t launch_sparse_prefill_backward(const SparsePrefillBackwardParams& params,
                                           cudaStream_t stream);

}  // namespace jfm
