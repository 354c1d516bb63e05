// Sparse (top-k) MLA decode over an FP8 cache on Hopper (sm_90a): the plain interface.
// No JAX/XLA/CuTe includes: the FFI handler includes only this header.
//
// Each query token (request i, token s) attends the cache tokens its `indices` select, plus
// those its `extra_indices` select in a second cache; the caches hold FP8 tokens in one of three
// layouts (docs/ops.md, FP8 cache layouts) and are dequantised on chip. One CTA handles one
// split-KV part (a row of the scheduler metadata), one query token and one tile of up to 64
// query heads: for each request of its part it gathers the selected tokens in blocks of 64
// slots, dequantises them into shared memory, computes S = Q K^T and O += softmax(S) V on
// wgmma, and writes the final output (an unsplit request) or an fp32 partial output and LSE
// that the combine kernel merges.
//
// What any input does (the reference implements the same rules):
// - request i counts the first L_i = clamp(topk_length[i], 0, topk) slots of each token's
//   indices (all topk without topk_length), and likewise the extra slots; the kernel's work for
//   the request is ceil(L_i / 64) + ceil(extra L_i / 64) blocks of 64 slots, main blocks first;
// - a counted slot whose index is outside [0, num_blocks * page) selects nothing (never read);
//   a query with nothing selected gets out 0 and lse +inf; duplicated indices count twice;
// - attn_sink[h] scales out by 1 / (1 + exp(attn_sink[h] - lse)); lse is returned without it;
// - metadata rows and num_splits are clamped to the batch and the workspace, so that even a
//   schedule not made by the scheduler cannot make the kernel read or write out of bounds (a
//   schedule that does not cover a request's blocks gives a wrong result for that request).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "kernels/common/mla_geometry.cuh"

namespace jfm {

// The FP8 token layouts (docs/ops.md): "V32", 656 bytes per token, d_qk 576; "MODEL1", 584
// bytes per token (576 bytes of data per token, then the block's 8-byte scale records), d_qk
// 512; "E4M3", 576 e4m3 values per token, d_qk 576, one float32 scale for the whole cache.
enum class Fp8Layout : int { kV32 = 0, kModel1 = 1, kE4M3 = 2 };

// One FP8 cache and the slots that select from it.
struct SparseKeySource {
  const void* cache = nullptr;           // [num_blocks, page, 1, bytes per token], FP8 bytes
  const int32_t* indices = nullptr;      // [batch, s_q, topk]: block * page + row
  const int32_t* topk_length = nullptr;  // [batch] or nullptr (every slot counts)
  int64_t num_blocks = 0;
  int64_t page = 0;
  int64_t topk = 0;  // a positive multiple of 64
};

struct SparseDecodeParams {
  const void* q = nullptr;                     // bfloat16 [batch, s_q, h_q, d_qk]
  SparseKeySource main;
  SparseKeySource extra;                       // extra.cache == nullptr: no extra cache
  const float* attn_sink = nullptr;            // [h_q] or nullptr
  const MetadataRow* tile_metadata = nullptr;  // [num_parts], from the scheduler
  const int32_t* num_splits = nullptr;         // [batch + 1]
  void* out = nullptr;                         // bfloat16 [batch, s_q, h_q, 512]
  float* lse = nullptr;                        // [batch, h_q, s_q]
  float* partial_o = nullptr;                  // [batch + num_parts, s_q, h_q, 512]
  float* partial_lse = nullptr;                // [batch + num_parts, s_q, h_q]
  int64_t batch = 0;
  int64_t s_q = 0;
  int64_t h_q = 0;
  int64_t num_parts = 0;
  float softmax_scale = 0.f;  // any finite value
  Fp8Layout layout = Fp8Layout::kV32;
  const float* k_scale = nullptr;  // E4M3: the caches' scale (one float32), else unused
};

// Bytes per token of a layout, and the query/key head dim it holds.
inline constexpr int64_t fp8_bytes_per_token(Fp8Layout layout) {
  return layout == Fp8Layout::kV32 ? 656 : layout == Fp8Layout::kModel1 ? 584 : kHeadDimQK;
}
inline constexpr int64_t fp8_head_dim_qk(Fp8Layout layout) {
  return layout == Fp8Layout::kModel1 ? kHeadDimV : kHeadDimQK;
}

// nullptr when the parameters are valid for the kernel, else a static message naming the
// limit (sizes, grid limits, int32 coordinates, alignment).
const char* sparse_decode_params_error(const SparseDecodeParams& params);

// Launches the decode kernel and then the combine kernel on `stream`. No allocation, no
// synchronisation, nothing read from or written to the runtime's last-error slot (graph
// capturable, also on the first call). Returns the first CUDA error.
cudaError_t launch_sparse_decode(const SparseDecodeParams& params, cudaStream_t stream);

}  // namespace jfm
