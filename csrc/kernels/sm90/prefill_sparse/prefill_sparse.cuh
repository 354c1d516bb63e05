// Sparse (top-k) MLA prefill over a BF16 KV array on Hopper (sm_90a): the plain interface.
// No JAX/XLA/CuTe includes: the FFI handler includes only this header.
//
// Query token t attends the KV rows its `indices` select: out[t, h] = softmax(scale * q[t, h] .
// K_sel) V_sel, K = kv rows (d_qk dims), V = their first 512 dims. One CTA handles one query
// token and one tile of up to 64 query heads: it gathers the selected rows in blocks of 64
// slots straight into shared memory (asynchronous copies), computes S = Q K^T and
// O += softmax(S) V on wgmma and writes out, max_logits and lse. No split: a token's work is at
// most topk / 64 blocks, and s_q tokens give the grid its parallelism.
//
// What any input does (the reference implements the same rules):
// - token t counts the first L_t = clamp(topk_length[t], 0, topk) slots of its indices (all
//   topk without topk_length); a counted slot whose index is outside [0, s_kv) selects nothing
//   and is never read; duplicated indices count twice;
// - max_logits[t, h] is the largest scale * q . k over the selected keys, lse[t, h] the natural
//   logsumexp of those logits; a query with nothing selected gets out 0, max_logits -inf and
//   lse +inf;
// - attn_sink[h] scales out by 1 / (1 + exp(attn_sink[h] - lse)); lse and max_logits are
//   returned without it.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "kernels/common/mla_geometry.cuh"

namespace jfm {

struct SparsePrefillParams {
  const void* q = nullptr;               // bfloat16 [s_q, h_q, d_qk]
  const void* kv = nullptr;              // bfloat16 [s_kv, 1, d_qk]
  const int32_t* indices = nullptr;      // [s_q, 1, topk]: rows of kv
  const int32_t* topk_length = nullptr;  // [s_q] or nullptr (every slot counts)
  const float* attn_sink = nullptr;      // [h_q] or nullptr
  void* out = nullptr;                   // bfloat16 [s_q, h_q, 512]
  float* max_logits = nullptr;           // [s_q, h_q]
  float* lse = nullptr;                  // [s_q, h_q]
  int64_t s_q = 0;
  int64_t s_kv = 0;
  int64_t h_q = 0;
  int64_t d_qk = 0;   // 576 or 512
  int64_t topk = 0;   // a positive multiple of 64
  float softmax_scale = 0.f;  // any finite value
};

// nullptr when the parameters are valid for the kernel, else a static message naming the
// limit (sizes, head dims, grid limits, alignment).
const char* sparse_prefill_params_error(const SparsePrefillParams& params);

// Launches the kernel on `stream`. No allocation, no synchronisation, nothing read from or
// written to the runtime's last-error slot (graph capturable, also on the first call). Returns
// the first CUDA error.
cudaError_t launch_sparse_prefill(const SparsePrefillParams& params, cudaStream_t stream);

}  // namespace jfm
