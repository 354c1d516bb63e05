// Split-KV scheduler ("MLA metadata"): assigns every request's KV blocks to a
// fixed number of SM parts. Plain C++ interface, no JAX/XLA/CuTe includes.
//
// Definitions (int64 inside, int32 outputs), with b requests, P_n parts,
// block size B and fixed overhead c >= 1:
//   n_i  = ceil(max(len_i, 0) / B)            blocks of request i
//   S_i  = sum_{j<i} (n_j + c),  T = S_b      cost positions
//   P    = max(ceil(T / P_n), 1)              payload of one part
//   span_i = [S_i, S_i + max(n_i, 1))         block j of request i is at S_i + j
//   part p covers cost positions [p*P, (p+1)*P) and handles every request
//   whose span meets that range (a contiguous range of requests).
//   k_i = floor((S_i + max(n_i,1) - 1) / P) - floor(S_i / P) + 1   splits of i
// Outputs:
//   num_splits[b+1]         exclusive prefix sum of k_i (num_splits[b] <= b + P_n - 1)
//   metadata[P_n]           one MetadataRow per part (mla_geometry.cuh)
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "kernels/common/mla_geometry.cuh"

namespace jfm {

struct SchedulerParams {
  const int32_t* cache_seqlens = nullptr;  // [batch], device; unused if fixed_length >= 0
  MetadataRow* tile_scheduler_metadata = nullptr;  // [num_parts], device
  int32_t* num_splits = nullptr;               // [batch + 1], device
  int64_t batch = 0;
  int64_t num_parts = 1;
  int64_t block_tokens = kSchedulerBlockTokens;
  int64_t fixed_overhead = kSchedulerFixedOverhead;
  int64_t fixed_length = -1;  // >= 0: every request has this many tokens
};

// Largest accepted fixed_overhead / block_tokens (keeps every sum in int64).
inline constexpr int64_t kSchedulerMaxOverhead = int64_t{1} << 30;

// nullptr when the parameters are valid, else a static message naming the
// offending field. The launcher returns cudaErrorInvalidValue in that case.
const char* scheduler_params_error(const SchedulerParams& params);

// One CUDA block; no host synchronisation, no allocation (graph capturable).
// Any batch size works (requests are streamed through the block in tiles).
cudaError_t launch_scheduler(const SchedulerParams& params, cudaStream_t stream);

}  // namespace jfm
