// Launcher of the sparse FP8 decode: the query tensor map, the decode kernel, then the split-KV
// combine.
#include <cuda.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include "kernels/common/combine.cuh"
#include "kernels/sm90/decode_sparse/decode_sparse_args.cuh"
#include "kernels/sm90/tensor_map.h"

namespace jfm {
namespace {

constexpr int64_t kMaxGridYZ = 65535;

const char* key_source_error(const SparseKeySource& source) {
  if (source.indices == nullptr) return "a cache needs its indices";
  if (source.num_blocks < 0 || source.page < 1) {
    return "num_blocks must be >= 0 and page >= 1 for every cache";
  }
  if (source.topk < 64 || source.topk % 64 != 0 || source.topk > INT_MAX) {
    return "topk must be a positive multiple of 64 and <= 2^31 - 1 for every cache";
  }
  if (reinterpret_cast<uintptr_t>(source.cache) % 16 != 0) {
    return "the FP8 caches must be 16-byte aligned";
  }
  return nullptr;
}

}  // namespace

const char* sparse_decode_params_error(const SparseDecodeParams& p) {
  if (p.batch < 0 || p.s_q < 1 || p.h_q < 1 || p.num_parts < 1) {
    return "sizes must be positive (batch may be 0)";
  }
  if (p.layout != Fp8Layout::kV32 && p.layout != Fp8Layout::kModel1 &&
      p.layout != Fp8Layout::kE4M3) {
    return "unknown FP8 layout";
  }
  if (p.layout == Fp8Layout::kE4M3 && p.k_scale == nullptr) {
    return "the E4M3 layout needs k_scale";
  }
  if (p.main.cache == nullptr) return "k_cache is missing";
  if (const char* error = key_source_error(p.main)) return error;
  if (p.extra.cache != nullptr) {
    if (const char* error = key_source_error(p.extra)) return error;
  }
  if (p.s_q > kMaxGridYZ) return "s_q must be <= 65535 (grid y)";
  if ((p.h_q + kQueryTileRows - 1) / kQueryTileRows > kMaxGridYZ) {
    return "h_q must be <= 65535 * 64 (grid z)";
  }
  if (p.num_parts > INT_MAX) return "num_parts must be <= 2^31 - 1 (grid x)";
  if (p.batch * p.s_q > INT_MAX) return "batch * s_q must be <= 2^31 - 1 (TMA coordinates)";
  if (p.batch + p.num_parts > INT_MAX) return "batch + num_parts must be <= 2^31 - 1";
  const auto misaligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16; };
  if (misaligned(p.q) || misaligned(p.out) || misaligned(p.partial_o)) {
    return "q, out and partial_o must be 16-byte aligned";
  }
  if (!std::isfinite(p.softmax_scale)) return "softmax_scale must be finite";
  return nullptr;
}

cudaError_t launch_sparse_decode(const SparseDecodeParams& p, cudaStream_t stream) {
  if (sparse_decode_params_error(p) != nullptr) return cudaErrorInvalidValue;
  if (p.batch == 0) return cudaSuccess;

  sm90::decode_sparse::KernelArgs args{};
  args.params = p;
  args.scale_log2 = p.softmax_scale * 1.4426950408889634f;
  args.q_box_rows = static_cast<int32_t>(std::min<int64_t>(p.h_q, kQueryTileRows));
  args.head_tiles = static_cast<int32_t>((p.h_q + kQueryTileRows - 1) / kQueryTileRows);
  args.partial_rows = static_cast<int32_t>(p.batch + p.num_parts);
  const int64_t d_qk = fp8_head_dim_qk(p.layout);
  const cuuint64_t row_bytes = static_cast<cuuint64_t>(d_qk) * 2;
  // q [batch * s_q, h_q, d_qk]: one box is up to 64 heads of one query token, 64 dims.
  if (!sm90::encode_map_16bit<3>(
          &args.q_map, p.q,
          {static_cast<cuuint64_t>(d_qk), static_cast<cuuint64_t>(p.h_q),
           static_cast<cuuint64_t>(p.batch * p.s_q)},
          {row_bytes, row_bytes * p.h_q}, {64, static_cast<cuuint32_t>(args.q_box_rows), 1})) {
    return cudaErrorInvalidValue;
  }

  cudaError_t err;
  switch (p.layout) {
    case Fp8Layout::kV32:
      err = sm90::decode_sparse::launch_typed<Fp8Layout::kV32>(args, stream);
      break;
    case Fp8Layout::kModel1:
      err = sm90::decode_sparse::launch_typed<Fp8Layout::kModel1>(args, stream);
      break;
    default:
      err = sm90::decode_sparse::launch_typed<Fp8Layout::kE4M3>(args, stream);
  }
  if (err != cudaSuccess) return err;

  CombineParams combine;
  combine.partial_o = p.partial_o;
  combine.partial_lse = p.partial_lse;
  combine.num_splits = p.num_splits;
  combine.attn_sink = p.attn_sink;
  combine.out = p.out;
  combine.lse = p.lse;
  combine.batch = p.batch;
  combine.seqlen_q = p.s_q;
  combine.num_heads = p.h_q;
  combine.head_dim_v = kHeadDimV;
  combine.num_partial_rows = p.batch + p.num_parts;
  combine.out_dtype = ElementType::kBF16;
  combine.skip_unsplit = true;
  return launch_combine(combine, stream);
}

}  // namespace jfm
