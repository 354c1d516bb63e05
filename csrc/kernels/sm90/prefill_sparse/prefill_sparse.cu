// Launcher of the sparse prefill: checks, the query tensor map, the kernel.
#include <cuda.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include "kernels/sm90/prefill_sparse/prefill_sparse_args.cuh"
#include "kernels/sm90/tensor_map.h"

namespace jfm {
namespace {

constexpr int64_t kMaxGridY = 65535;

}  // namespace

const char* sparse_prefill_params_error(const SparsePrefillParams& p) {
  if (p.s_q < 0 || p.s_kv < 0 || p.h_q < 1) return "sizes must be positive (s_q, s_kv may be 0)";
  if (p.d_qk != kHeadDimQK && p.d_qk != kHeadDimLatent) return "d_qk must be 576 or 512";
  if (p.topk < 64 || p.topk % 64 != 0 || p.topk > INT_MAX) {
    return "topk must be a positive multiple of 64 and <= 2^31 - 1";
  }
  if (p.indices == nullptr) return "indices are missing";
  if (p.s_q > INT_MAX) return "s_q must be <= 2^31 - 1 (grid x, TMA coordinates)";
  if ((p.h_q + kQueryTileRows - 1) / kQueryTileRows > kMaxGridY) {
    return "h_q must be <= 65535 * 64 (grid y)";
  }
  const auto misaligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16; };
  if (misaligned(p.q) || misaligned(p.kv) || misaligned(p.out)) {
    return "q, kv and out must be 16-byte aligned";
  }
  if (p.s_kv > 0 && p.kv == nullptr) return "kv is missing";
  if (!std::isfinite(p.softmax_scale)) return "softmax_scale must be finite";
  return nullptr;
}

cudaError_t launch_sparse_prefill(const SparsePrefillParams& p, cudaStream_t stream) {
  if (sparse_prefill_params_error(p) != nullptr) return cudaErrorInvalidValue;
  if (p.s_q == 0) return cudaSuccess;

  sm90::prefill_sparse::KernelArgs args{};
  args.params = p;
  args.scale_log2 = p.softmax_scale * 1.4426950408889634f;
  args.q_box_rows = static_cast<int32_t>(std::min<int64_t>(p.h_q, kQueryTileRows));
  const cuuint64_t row_bytes = static_cast<cuuint64_t>(p.d_qk) * 2;
  // q [s_q, h_q, d_qk]: one box is up to 64 heads of one query token, 64 dims.
  if (!sm90::encode_map_16bit<3>(
          &args.q_map, p.q,
          {static_cast<cuuint64_t>(p.d_qk), static_cast<cuuint64_t>(p.h_q),
           static_cast<cuuint64_t>(p.s_q)},
          {row_bytes, row_bytes * p.h_q}, {64, static_cast<cuuint32_t>(args.q_box_rows), 1})) {
    return cudaErrorInvalidValue;
  }
  return p.d_qk == kHeadDimQK ? sm90::prefill_sparse::launch_typed<kHeadDimQK>(args, stream)
                              : sm90::prefill_sparse::launch_typed<kHeadDimLatent>(args, stream);
}

}  // namespace jfm
