// Split-KV scheduler kernel. See scheduler.cuh for the definitions.
//
// How the work is laid out: one block streams the requests in tiles of
// kThreads * kItems (kItems consecutive requests per thread). A first pass
// sums the costs to get the payload P; the second pass computes S_i with a
// block scan, k_i, and num_splits with a second scan. Every field of every
// metadata row has exactly one writer, chosen from request i's own values:
//  - the "begin" fields of part p belong to the request i with
//    E_{i-1} <= p*P < E_i  (E_i = S_i + max(n_i, 1), E_{-1} = 0): i is then
//    the first request whose span reaches past p*P. If i's span starts only in
//    a later part (S_i >= (p+1)*P), part p lies in the overhead gap before i
//    and i writes it as an empty row instead.
//  - the "end" fields of part p belong to the request i with
//    S_i < (p+1)*P <= S_{i+1} (no upper bound for the last request), written
//    only if i's span reaches into part p (otherwise p is empty, see above).
//  - parts after the last request's span are empty (written by all threads).
// Nothing is stored per request in shared memory, so the batch size is not
// limited by shared memory; no atomics, fully deterministic.
#include "kernels/common/scheduler.cuh"
#include "kernels/common/launch.cuh"

#include <limits>

namespace jfm {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 4;
constexpr int64_t kTile = int64_t{kThreads} * kItems;
static_assert(kWarps <= 32, "the second level of the block scan is one warp wide");

// Exclusive prefix sum of one value per thread over the whole block. `scratch`
// holds kWarps + 1 elements; `total` receives the block-wide sum. Every thread
// of the block must call it (it synchronises).
template <typename T>
__device__ T block_exclusive_sum(T value, T* scratch, T& total) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  T inclusive = value;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const T neighbour = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += neighbour;
  }
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const T own = lane < kWarps ? scratch[lane] : T{0};
    T running = own;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const T neighbour = __shfl_up_sync(0xffffffffu, running, offset);
      if (lane >= offset) running += neighbour;
    }
    if (lane < kWarps) scratch[lane] = running - own;
    if (lane == 31) scratch[kWarps] = running;
  }
  __syncthreads();
  const T result = scratch[warp] + inclusive - value;
  total = scratch[kWarps];
  __syncthreads();  // scratch may be reused right away
  return result;
}

// Blocks of one request. Lengths are int32 and block_tokens <= 2^30, so
// len + block_tokens - 1 < 2^32 and an unsigned 32-bit division is exact.
__device__ __forceinline__ int64_t blocks_of_length(int64_t len, uint32_t block_tokens) {
  return len > 0 ? static_cast<int64_t>((static_cast<uint32_t>(len) + block_tokens - 1u) /
                                        block_tokens)
                 : 0;
}

// Blocks of requests first .. first + kItems - 1 (0 past the batch). One
// 16-byte load when the group is complete (XLA buffers are 16-byte aligned
// and first is a multiple of kItems).
__device__ __forceinline__ void load_blocks(const SchedulerParams& p, uint32_t block_tokens,
                                            int64_t first, int64_t (&blocks)[kItems]) {
  static_assert(kItems == 4, "one int4 per thread");
  if (p.fixed_length >= 0) {
    const int64_t n = blocks_of_length(p.fixed_length, block_tokens);
#pragma unroll
    for (int j = 0; j < kItems; ++j) blocks[j] = first + j < p.batch ? n : 0;
    return;
  }
  if (first + kItems <= p.batch &&
      reinterpret_cast<uintptr_t>(p.cache_seqlens) % sizeof(int4) == 0) {
    const int4 v = __ldg(reinterpret_cast<const int4*>(p.cache_seqlens + first));
    blocks[0] = blocks_of_length(v.x, block_tokens);
    blocks[1] = blocks_of_length(v.y, block_tokens);
    blocks[2] = blocks_of_length(v.z, block_tokens);
    blocks[3] = blocks_of_length(v.w, block_tokens);
    return;
  }
#pragma unroll
  for (int j = 0; j < kItems; ++j)
    blocks[j] = first + j < p.batch ? blocks_of_length(__ldg(p.cache_seqlens + first + j), block_tokens)
                                    : 0;
}

// x / payload for 0 <= x <= T. 64-bit division is a long software sequence on
// the GPU; every position fits 32 bits unless T >= 2^32 (huge batches of very
// long requests), so take the 32-bit path whenever the whole range allows.
struct PayloadDivider {
  int64_t payload;
  bool narrow;
  __device__ __forceinline__ int64_t operator()(int64_t x) const {
    return narrow ? static_cast<int64_t>(static_cast<uint32_t>(x) / static_cast<uint32_t>(payload))
                  : x / payload;
  }
};

__device__ __forceinline__ void write_empty_row(MetadataRow* row, int64_t batch) {
  *row = MetadataRow{static_cast<int32_t>(batch), -1, 0, 0, 0, 0, 0, 0};
}

// Writes the metadata fields owned by request i (see the comment at the top).
//   start = S_i, blocks = n_i, first_part = S_i / P, last_part = (E_i - 1) / P,
//   begin_from = first part whose start position is >= E_{i-1} (0 for i == 0),
//   end_to = last part whose end position is <= S_{i+1} (last_part for i == b-1).
__device__ __forceinline__ void write_request_rows(const SchedulerParams& p, int64_t payload,
                                                   int64_t i, int64_t start, int64_t blocks,
                                                   int64_t first_part, int64_t last_part,
                                                   int64_t begin_from, int64_t end_to,
                                                   int32_t splits) {
  const int32_t is_split = splits > 1 ? 1 : 0;
  for (int64_t part = begin_from; part <= last_part; ++part) {
    MetadataRow* row = p.tile_scheduler_metadata + part;
    if (part < first_part) {  // part lies in the overhead gap before request i
      write_empty_row(row, p.batch);
      continue;
    }
    const int64_t part_start = part * payload;
    row->begin_req = static_cast<int32_t>(i);
    row->begin_block = static_cast<int32_t>(part_start > start ? part_start - start : 0);
    row->begin_split_idx = static_cast<int32_t>(part - first_part);
    row->is_first_req_split = is_split;
    row->pad = 0;
  }
  const int64_t end_part = min(last_part, end_to);
  for (int64_t part = first_part; part <= end_part; ++part) {
    MetadataRow* row = p.tile_scheduler_metadata + part;
    const int64_t part_end = (part + 1) * payload;
    row->end_req = static_cast<int32_t>(i);
    row->end_block = static_cast<int32_t>(min(part_end - start, blocks));
    row->is_last_req_split = is_split;
  }
}

__global__ void __launch_bounds__(kThreads) mla_scheduler_kernel(const SchedulerParams p) {
  __shared__ int64_t scratch_cost[kWarps + 1];
  __shared__ int32_t scratch_splits[kWarps + 1];
  __shared__ int64_t tail_first_part;

  const int64_t batch = p.batch;
  const int64_t overhead = p.fixed_overhead;
  const uint32_t block_tokens = static_cast<uint32_t>(p.block_tokens);
  const int64_t thread_offset = int64_t{threadIdx.x} * kItems;

  if (threadIdx.x == 0) {
    tail_first_part = 0;  // overwritten by the thread of request batch-1
    if (batch == 0) p.num_splits[0] = 0;
  }

  // Pass 1: total cost T and payload P.
  int64_t total_cost = 0;
  if (p.fixed_length >= 0) {
    total_cost = batch * (blocks_of_length(p.fixed_length, block_tokens) + overhead);
  } else {
    int64_t local = 0;
    for (int64_t tile = 0; tile < batch; tile += kTile) {
      int64_t blocks[kItems];
      load_blocks(p, block_tokens, tile + thread_offset, blocks);
#pragma unroll
      for (int j = 0; j < kItems; ++j)
        local += tile + thread_offset + j < batch ? blocks[j] + overhead : 0;
    }
    block_exclusive_sum(local, scratch_cost, total_cost);
  }
  const int64_t payload = max((total_cost + p.num_parts - 1) / p.num_parts, int64_t{1});
  const PayloadDivider div_p{payload, total_cost <= int64_t{0xffffffff}};

  // Pass 2: tiles of kTile requests, kItems consecutive ones per thread.
  int64_t cost_carry = 0;
  int32_t split_carry = 0;
  for (int64_t tile = 0; tile < batch; tile += kTile) {
    const int64_t first = tile + thread_offset;
    int64_t blocks[kItems];
    load_blocks(p, block_tokens, first, blocks);
    // Blocks of the request just before this thread's first one.
    int64_t prev_blocks = 0;
    if (first > 0 && first < batch) {
      prev_blocks = blocks_of_length(
          p.fixed_length >= 0 ? p.fixed_length : int64_t{__ldg(p.cache_seqlens + first - 1)},
          block_tokens);
    }
    int64_t local_cost = 0;
#pragma unroll
    for (int j = 0; j < kItems; ++j) local_cost += first + j < batch ? blocks[j] + overhead : 0;
    int64_t tile_cost;
    const int64_t first_start = cost_carry + block_exclusive_sum(local_cost, scratch_cost, tile_cost);

    int64_t start[kItems + 1];
    int64_t first_part[kItems + 1];
    int64_t last_part[kItems];
    int32_t splits[kItems];
    int32_t local_splits = 0;
    start[0] = first_start;
    first_part[0] = div_p(first_start);
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const bool valid = first + j < batch;
      last_part[j] = div_p(start[j] + (blocks[j] > 0 ? blocks[j] : 1) - 1);
      splits[j] = valid ? static_cast<int32_t>(last_part[j] - first_part[j] + 1) : 0;
      local_splits += splits[j];
      start[j + 1] = start[j] + (valid ? blocks[j] + overhead : 0);
      first_part[j + 1] = valid ? div_p(start[j + 1]) : first_part[j];
    }
    int32_t tile_splits;
    int32_t split_offset =
        split_carry + block_exclusive_sum(local_splits, scratch_splits, tile_splits);

    // Last part reached by the span of the request before this thread's first.
    int64_t prev_last_part = -1;
    if (first > 0 && first < batch) {
      const int64_t prev_end = first_start - (prev_blocks + overhead) + (prev_blocks > 0 ? prev_blocks : 1);
      prev_last_part = div_p(prev_end - 1);
    }
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t i = first + j;
      if (i >= batch) break;
      p.num_splits[i] = split_offset;
      const int64_t end_to = i + 1 < batch ? first_part[j + 1] - 1 : last_part[j];
      write_request_rows(p, payload, i, start[j], blocks[j], first_part[j], last_part[j],
                         prev_last_part + 1, end_to, splits[j]);
      prev_last_part = last_part[j];
      split_offset += splits[j];
      if (i == batch - 1) {
        p.num_splits[batch] = split_offset;
        tail_first_part = last_part[j] + 1;
      }
    }
    cost_carry += tile_cost;
    split_carry += tile_splits;
  }

  __syncthreads();
  for (int64_t part = tail_first_part + threadIdx.x; part < p.num_parts; part += kThreads) {
    write_empty_row(p.tile_scheduler_metadata + part, batch);
  }
}

}  // namespace

const char* scheduler_params_error(const SchedulerParams& p) {
  constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
  if (p.batch < 0) return "batch must be >= 0";
  if (p.num_parts < 1) return "num_parts must be >= 1";
  if (p.batch + p.num_parts > kInt32Max) return "batch + num_parts must fit in int32";
  if (p.block_tokens < 1 || p.block_tokens > kSchedulerMaxOverhead)
    return "block_tokens must be in [1, 2^30]";
  if (p.fixed_overhead < 1 || p.fixed_overhead > kSchedulerMaxOverhead)
    return "fixed_overhead must be in [1, 2^30]";
  if (p.fixed_length < -1 || p.fixed_length > kInt32Max)
    return "fixed_length must be -1 or a token count in [0, 2^31-1]";
  if (p.tile_scheduler_metadata == nullptr || p.num_splits == nullptr)
    return "output pointers must not be null";
  if (p.fixed_length < 0 && p.batch > 0 && p.cache_seqlens == nullptr)
    return "cache_seqlens must not be null when fixed_length is -1";
  return nullptr;
}

cudaError_t launch_scheduler(const SchedulerParams& params, cudaStream_t stream) {
  if (scheduler_params_error(params) != nullptr) return cudaErrorInvalidValue;
  return launch_kernel(mla_scheduler_kernel, LaunchShape{dim3(1), dim3(kThreads)}, stream, params);
}

}  // namespace jfm
