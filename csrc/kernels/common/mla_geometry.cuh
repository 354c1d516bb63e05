// The shapes the kernels are built around and the row layout of the split-KV schedule: the one
// C++ definition of each, shared by the scheduler, the kernels, the FFI handlers and the module
// (which exports them so that a test can hold them against jax_flashmla/_src/geometry.py, their
// Python twin).
#pragma once

#include <cstdint>

namespace jfm {

inline constexpr int kHeadDimLatent = 512;  // latent ("NoPE") dims; V is these dims of a row
inline constexpr int kHeadDimRope = 64;     // rotary dims after them
inline constexpr int kHeadDimQK = kHeadDimLatent + kHeadDimRope;
inline constexpr int kHeadDimV = kHeadDimLatent;
inline constexpr int kDefaultPageSize = 64;          // FlashMLA's page, the tests' default
inline constexpr int kSchedulerBlockTokens = 64;    // tokens per scheduling unit (a KV block)
inline constexpr int kSchedulerFixedOverhead = 5;   // per-request cost, in blocks
inline constexpr int kQueryTileRows = 64;           // query rows of one decode CTA

// One row (one SM part) of tile_scheduler_metadata, as the scheduler writes it and the decode
// kernels read it. An empty part is {batch, -1, 0, 0, 0, 0, 0, 0}.
struct MetadataRow {
  int32_t begin_req;           // first request of the part
  int32_t end_req;             // last request, inclusive
  int32_t begin_block;         // first KV block of begin_req handled here
  int32_t end_block;           // one past the last KV block of end_req handled here
  int32_t begin_split_idx;     // index of this part's piece among begin_req's pieces
  int32_t is_first_req_split;  // 1 when begin_req has several pieces
  int32_t is_last_req_split;   // 1 when end_req has several pieces
  int32_t pad;                 // always 0
};
inline constexpr int kMetadataFields = sizeof(MetadataRow) / sizeof(int32_t);
static_assert(sizeof(MetadataRow) == 32, "the metadata row is 8 int32 fields, 32-byte aligned");

// Element type of the 16-bit tensors a kernel reads or writes (q, cache, out).
enum class ElementType : int { kBF16 = 0, kF16 = 1 };

}  // namespace jfm
