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
//   metadata[P_n][8]        per part: see MetadataField; empty part: [b, -1, 0, ...]
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace jfm {

inline constexpr int kMetadataFields = 8;

// Column index inside one row of tile_scheduler_metadata.
enum MetadataField : int {
  kBeginReq = 0,         // first request of the part (b if the part is empty)
  kEndReq = 1,           // last request of the part, inclusive (-1 if empty)
  kBeginBlock = 2,       // first block of begin_req handled here
  kEndBlock = 3,         // one past the last block of end_req handled here
  kBeginSplitIdx = 4,    // index of this part's piece among begin_req's splits
  kIsFirstReqSplit = 5,  // 1 when begin_req has more than one split
  kIsLastReqSplit = 6,   // 1 when end_req has more than one split
  kMetadataPad = 7,      // always 0
};

struct SchedulerParams {
  const int32_t* cache_seqlens = nullptr;  // [batch], device; unused if fixed_length >= 0
  int32_t* tile_scheduler_metadata = nullptr;  // [num_parts, kMetadataFields], device
  int32_t* num_splits = nullptr;               // [batch + 1], device
  int64_t batch = 0;
  int64_t num_parts = 1;
  int64_t block_tokens = 64;
  int64_t fixed_overhead = 5;
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
