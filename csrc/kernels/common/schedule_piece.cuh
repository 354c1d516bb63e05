// How a decode kernel reads its row of the split-KV schedule (scheduler.cuh): the part's
// request range and, per request, the blocks it handles and where their result goes. Both
// are clamped, so that even a schedule not made by the scheduler cannot make a kernel read
// or write out of bounds.
#pragma once

#include <cstdint>

#include "kernels/common/mla_geometry.cuh"

namespace jfm {

// Row `part` of the schedule with its request range clamped to [0, batch).
__device__ __forceinline__ MetadataRow load_part(const MetadataRow* metadata, int part,
                                                 int64_t batch) {
  MetadataRow row = metadata[part];
  row.begin_req = max(row.begin_req, 0);
  row.end_req = min(row.end_req, static_cast<int32_t>(batch) - 1);
  return row;
}

// What a part does for request `req`, which has `blocks` blocks of work.
struct RequestPiece {
  int lo, hi;     // block range
  int split_row;  // row of partial_o / partial_lse when split
  bool split;     // the request is split across parts: write partials
};

__device__ __forceinline__ RequestPiece request_piece(const MetadataRow& part, int req,
                                                      int blocks, const int32_t* num_splits,
                                                      int32_t partial_rows) {
  RequestPiece w;
  const bool first = req == part.begin_req, last = req == part.end_req;
  w.lo = first ? max(part.begin_block, 0) : 0;
  w.hi = last ? min(part.end_block, blocks) : blocks;
  const int64_t split_row = int64_t{num_splits[req]} + (first ? part.begin_split_idx : 0);
  w.split_row = static_cast<int>(min(max(split_row, int64_t{0}), int64_t{partial_rows} - 1));
  w.split = num_splits[req + 1] - num_splits[req] > 1;
  return w;
}

}  // namespace jfm
