// Launchers of the sparse prefill, forward and backward: checks, tensor maps, the kernels.
#include <cuda.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include "kernels/common/launch.cuh"
#include "kernels/sm90/prefill_sparse/prefill_sparse_args.cuh"
#include "kernels/sm90/tensor_map.h"

namespace jfm {
namespace {

int64_t head_tiles(int64_t h_q) { return (h_q + kQueryTileRows - 1) / kQueryTileRows; }

// The query-side rules both directions share.
const char* shape_error(int64_t s_q, int64_t s_kv, int64_t h_q, int64_t d_qk, int64_t topk,
                        const int32_t* indices, const void* kv, float softmax_scale) {
  if (s_q < 0 || s_kv < 0 || h_q < 1) return "sizes must be positive (s_q, s_kv may be 0)";
  if (d_qk != kHeadDimQK && d_qk != kHeadDimLatent) return "d_qk must be 576 or 512";
  if (topk < 64 || topk % 64 != 0 || topk > INT_MAX) {
    return "topk must be a positive multiple of 64 and <= 2^31 - 1";
  }
  if (indices == nullptr) return "indices are missing";
  // The work items (token, head tile) are the backward's grid x; the TMA coordinates are int32.
  if (s_q > INT_MAX || h_q > INT_MAX || s_q * head_tiles(h_q) > INT_MAX) {
    return "s_q * ceil(h_q / 64) (work items) must be <= 2^31 - 1";
  }
  if (s_kv > 0 && kv == nullptr) return "kv is missing";
  if (!std::isfinite(softmax_scale)) return "softmax_scale must be finite";
  return nullptr;
}

bool misaligned(const void* ptr, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes != 0;
}

// A map over a [s_q, h_q, dims] bf16 tensor: one box is up to 64 heads of one query token,
// 64 dims.
bool encode_token_map(CUtensorMap* map, const void* base, int64_t s_q, int64_t h_q, int64_t dims,
                      int32_t box_rows) {
  const cuuint64_t row_bytes = static_cast<cuuint64_t>(dims) * 2;
  return sm90::encode_map_16bit<3>(
      map, base,
      {static_cast<cuuint64_t>(dims), static_cast<cuuint64_t>(h_q), static_cast<cuuint64_t>(s_q)},
      {row_bytes, row_bytes * h_q}, {64, static_cast<cuuint32_t>(box_rows), 1});
}

// dkv = dkv_fixed / fixed_scale, element by element (a grid-stride loop): the backward's
// fixed-point sums as float32, each rounded once.
__global__ void fixed_point_to_float(const SparsePrefillBackwardParams p) {
  const double inverse = 1.0 / static_cast<double>(*p.fixed_scale);
  const int64_t count = p.s_kv * p.d_qk;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    p.dkv[i] = static_cast<float>(static_cast<double>(p.dkv_fixed[i]) * inverse);
  }
}

// The backward kernel itself, for s_q > 0.
cudaError_t launch_backward(const SparsePrefillBackwardParams& p, cudaStream_t stream) {
  sm90::prefill_sparse::BackwardArgs args{};
  args.params = p;
  args.scale_log2 = p.softmax_scale * 1.4426950408889634f;
  args.q_box_rows = static_cast<int32_t>(std::min<int64_t>(p.h_q, kQueryTileRows));
  args.head_tiles = static_cast<int32_t>(head_tiles(p.h_q));
  args.pair_tiles = args.head_tiles % 2 == 0 ? 1 : 0;
  if (!encode_token_map(&args.q_map, p.q, p.s_q, p.h_q, p.d_qk, args.q_box_rows) ||
      !encode_token_map(&args.d_out_map, p.d_out, p.s_q, p.h_q, kHeadDimV, args.q_box_rows)) {
    return cudaErrorInvalidValue;
  }
  return p.d_qk == kHeadDimQK
             ? sm90::prefill_sparse::launch_backward_typed<kHeadDimQK>(args, stream)
             : sm90::prefill_sparse::launch_backward_typed<kHeadDimLatent>(args, stream);
}

}  // namespace

const char* sparse_prefill_params_error(const SparsePrefillParams& p) {
  const char* error =
      shape_error(p.s_q, p.s_kv, p.h_q, p.d_qk, p.topk, p.indices, p.kv, p.softmax_scale);
  if (error != nullptr) return error;
  if (misaligned(p.q, 16) || misaligned(p.kv, 16) || misaligned(p.out, 16)) {
    return "q, kv and out must be 16-byte aligned";
  }
  return nullptr;
}

cudaError_t launch_sparse_prefill(const SparsePrefillParams& p, cudaStream_t stream) {
  if (sparse_prefill_params_error(p) != nullptr) return cudaErrorInvalidValue;
  if (p.s_q == 0) return cudaSuccess;

  sm90::prefill_sparse::KernelArgs args{};
  args.params = p;
  args.scale_log2 = p.softmax_scale * 1.4426950408889634f;
  args.q_box_rows = static_cast<int32_t>(std::min<int64_t>(p.h_q, kQueryTileRows));
  args.head_tiles = static_cast<int32_t>(head_tiles(p.h_q));
  if (!encode_token_map(&args.q_map, p.q, p.s_q, p.h_q, p.d_qk, args.q_box_rows)) {
    return cudaErrorInvalidValue;
  }
  return p.d_qk == kHeadDimQK ? sm90::prefill_sparse::launch_typed<kHeadDimQK>(args, stream)
                              : sm90::prefill_sparse::launch_typed<kHeadDimLatent>(args, stream);
}

const char* sparse_prefill_backward_params_error(const SparsePrefillBackwardParams& p) {
  const char* error =
      shape_error(p.s_q, p.s_kv, p.h_q, p.d_qk, p.topk, p.indices, p.kv, p.softmax_scale);
  if (error != nullptr) return error;
  if (p.s_q > 0 && (p.d_out == nullptr || p.lse == nullptr || p.row_shift == nullptr ||
                    p.dq == nullptr)) {
    return "d_out, lse, row_shift and dq are missing";
  }
  if (p.s_kv > 0 && p.dkv == nullptr) return "dkv is missing";
  if (p.dkv_fixed != nullptr && p.fixed_scale == nullptr) return "fixed_scale is missing";
  if (misaligned(p.q, 16) || misaligned(p.kv, 16) || misaligned(p.d_out, 16) ||
      misaligned(p.dq, 16) || misaligned(p.dkv, 16) || misaligned(p.dkv_fixed, 16)) {
    return "q, kv, d_out, dq, dkv and dkv_fixed must be 16-byte aligned";
  }
  return nullptr;
}

cudaError_t launch_sparse_prefill_backward(const SparsePrefillBackwardParams& p,
                                           cudaStream_t stream) {
  if (sparse_prefill_backward_params_error(p) != nullptr) return cudaErrorInvalidValue;
  const int64_t dkv_count = p.s_kv * p.d_qk;
  if (dkv_count > 0) {
    const cudaError_t zeroed =
        p.dkv_fixed != nullptr
            ? cudaMemsetAsync(p.dkv_fixed, 0, dkv_count * sizeof(int64_t), stream)
            : cudaMemsetAsync(p.dkv, 0, dkv_count * sizeof(float), stream);
    if (zeroed != cudaSuccess) return zeroed;
  }
  if (p.s_q > 0) {
    const cudaError_t launched = launch_backward(p, stream);
    if (launched != cudaSuccess) return launched;
  }
  if (p.dkv_fixed == nullptr || dkv_count == 0) return cudaSuccess;
  const LaunchShape convert{
      dim3(static_cast<unsigned>(std::min<int64_t>((dkv_count + 255) / 256, 8192))), dim3(256)};
  return launch_kernel(fixed_point_to_float, convert, stream, p);
}

}  // namespace jfm
