// Dense MLA decode over a paged BF16/FP16 KV cache on Hopper (sm_90a), any page size: the plain
// interface.
// No JAX/XLA/CuTe includes: the FFI handler includes only this header.
//
// One CTA handles one split-KV part (a row of the scheduler metadata), one KV head and one
// tile of up to 64 query rows (s_q x the h_q / h_kv heads sharing the KV head). For each
// request of its part it streams the part's 64-token KV blocks through shared memory (by TMA
// where pages are a multiple of 64 tokens, else a cp.async gather per token),
// computes S = Q K^T and O += softmax(S) V on wgmma, and writes either the final output (an
// unsplit request) or an fp32 partial output and LSE that the combine kernel merges.
//
// What any input does (the reference implements the same rules):
// - request i attends tokens t < L_i = clamp(cache_seqlens[i], 0, max_blocks_per_seq * page);
//   token t is row t % page of physical block block_table[i, t / page];
// - a token whose block id is outside [0, num_blocks) is masked (never read); a query with no
//   attendable token gets out 0 and lse +inf;
// - metadata rows and num_splits are clamped to the batch and the workspace, so that even a
//   schedule not made by the scheduler cannot make the kernel read or write out of bounds.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "kernels/common/mla_geometry.cuh"

namespace jfm {

struct DenseDecodeParams {
  const void* q = nullptr;                     // [batch, s_q, h_q, 576]
  const void* k_cache = nullptr;               // [num_blocks, page, h_kv, 576]
  const int32_t* block_table = nullptr;        // [batch, max_blocks_per_seq]
  const int32_t* cache_seqlens = nullptr;      // [batch]
  const MetadataRow* tile_metadata = nullptr;  // [num_parts], from the scheduler
  const int32_t* num_splits = nullptr;         // [batch + 1]
  void* out = nullptr;                         // [batch, s_q, h_q, 512], q's dtype
  float* lse = nullptr;                        // [batch, h_q, s_q]
  float* partial_o = nullptr;                  // [batch + num_parts, s_q, h_q, 512]
  float* partial_lse = nullptr;                // [batch + num_parts, s_q, h_q]
  int64_t batch = 0;
  int64_t s_q = 0;
  int64_t h_q = 0;
  int64_t h_kv = 0;
  int64_t num_blocks = 0;
  int64_t page = 0;  // tokens per block of the cache, any positive size
  int64_t max_blocks_per_seq = 0;
  int64_t num_parts = 0;
  float softmax_scale = 0.f;  // any finite value
  bool causal = false;
  ElementType dtype = ElementType::kBF16;
};

// nullptr when the parameters are valid for the kernel, else a static message naming the
// limit (sizes, grid limits, int32 coordinates, alignment).
const char* dense_decode_params_error(const DenseDecodeParams& params);

// Launches the decode kernel and then the combine kernel on `stream`. No allocation, no
// synchronisation, nothing read from or written to the runtime's last-error slot (graph
// capturable, also on the first call). Returns the first CUDA error.
cudaError_t launch_dense_decode(const DenseDecodeParams& params, cudaStream_t stream);

}  // namespace jfm
