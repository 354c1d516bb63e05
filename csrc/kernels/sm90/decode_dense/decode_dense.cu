// Launcher of the dense decode: tensor maps, the decode kernel, then the split-KV combine.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include "kernels/common/combine.cuh"
#include "kernels/sm90/decode_dense/decode_dense_args.cuh"
#include "kernels/sm90/tensor_map.h"

namespace jfm {
namespace {

using sm90::decode_dense::KernelArgs;
using sm90::decode_dense::TileShape;
using sm90::encode_map_16bit;

constexpr int64_t kMaxGridYZ = 65535;

}  // namespace

const char* dense_decode_params_error(const DenseDecodeParams& p) {
  if (p.batch < 0 || p.s_q < 1 || p.h_q < 1 || p.h_kv < 1 || p.num_blocks < 0 || p.page < 1 ||
      p.max_blocks_per_seq < 0 || p.num_parts < 1) {
    return "sizes must be positive (batch, num_blocks and max_blocks_per_seq may be 0)";
  }
  if (p.h_q % p.h_kv != 0) return "h_q must be a multiple of h_kv";
  if (p.h_kv > kMaxGridYZ) return "h_kv must be <= 65535 (grid y)";
  if (sm90::decode_dense::tile_shape(p.s_q, p.h_q, p.h_kv).num_tiles > kMaxGridYZ) {
    return "query tiles per KV head (tile_shape) must be <= 65535 (grid z)";
  }
  if (p.num_parts > INT_MAX) return "num_parts must be <= 2^31 - 1 (grid x)";
  if (p.batch * p.s_q > INT_MAX) return "batch * s_q must be <= 2^31 - 1 (TMA coordinates)";
  if (p.page > INT_MAX / std::max<int64_t>(p.num_blocks, 1)) {
    return "num_blocks * page must be <= 2^31 - 1 (TMA coordinates)";
  }
  if (p.batch + p.num_parts > INT_MAX) return "batch + num_parts must be <= 2^31 - 1";
  const auto misaligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16; };
  if (misaligned(p.q) || misaligned(p.k_cache) || misaligned(p.out) || misaligned(p.partial_o)) {
    return "q, k_cache, out and partial_o must be 16-byte aligned";
  }
  if (!std::isfinite(p.softmax_scale)) return "softmax_scale must be finite";
  return nullptr;
}

cudaError_t launch_dense_decode(const DenseDecodeParams& p, cudaStream_t stream) {
  if (dense_decode_params_error(p) != nullptr) return cudaErrorInvalidValue;
  if (p.batch == 0) return cudaSuccess;

  KernelArgs args{};
  args.params = p;
  args.tile = sm90::decode_dense::tile_shape(p.s_q, p.h_q, p.h_kv);
  args.scale_log2 = p.softmax_scale * 1.4426950408889634f;
  args.seq_capacity =
      static_cast<int32_t>(std::min<int64_t>(p.max_blocks_per_seq * p.page, INT_MAX));
  args.page = static_cast<int32_t>(p.page);
  args.partial_rows = static_cast<int32_t>(p.batch + p.num_parts);
  const TileShape& tile = args.tile;
  const cuuint64_t row_bytes = kHeadDimQK * 2;
  // q [batch * s_q, h_kv, group, 576]: one box is a tile of query rows for one 64-dim chunk.
  const bool q_ok = encode_map_16bit<4>(
      &args.q_map, p.q,
      {kHeadDimQK, static_cast<cuuint64_t>(tile.group), static_cast<cuuint64_t>(p.h_kv),
       static_cast<cuuint64_t>(p.batch * p.s_q)},
      {row_bytes, row_bytes * tile.group, row_bytes * p.h_q},
      {64, static_cast<cuuint32_t>(tile.heads_per_tile), 1,
       static_cast<cuuint32_t>(tile.s_per_tile)});
  // k_cache [num_blocks * page, h_kv, 576]: one box is 64 dims of one KV head over a block's
  // 64 tokens, or over a page where pages are smaller (no map where the loaders gather).
  const bool kv_ok =
      p.num_blocks == 0 ||
      sm90::decode_dense::block_loader(p.page) == sm90::decode_dense::BlockLoader::kGather ||
      encode_map_16bit<3>(
          &args.kv_map, p.k_cache,
          {kHeadDimQK, static_cast<cuuint64_t>(p.h_kv),
           static_cast<cuuint64_t>(p.num_blocks * p.page)},
          {row_bytes, row_bytes * p.h_kv},
          {64, 1, static_cast<cuuint32_t>(sm90::decode_dense::box_tokens(p.page))});
  if (!q_ok || !kv_ok) return cudaErrorInvalidValue;

  cudaError_t err = p.dtype == ElementType::kBF16
                        ? sm90::decode_dense::launch_typed<__nv_bfloat16>(args, stream)
                        : sm90::decode_dense::launch_typed<__half>(args, stream);
  if (err != cudaSuccess) return err;

  CombineParams combine;
  combine.partial_o = p.partial_o;
  combine.partial_lse = p.partial_lse;
  combine.num_splits = p.num_splits;
  combine.out = p.out;
  combine.lse = p.lse;
  combine.batch = p.batch;
  combine.seqlen_q = p.s_q;
  combine.num_heads = p.h_q;
  combine.head_dim_v = kHeadDimV;
  combine.num_partial_rows = p.batch + p.num_parts;
  combine.out_dtype = p.dtype;
  combine.skip_unsplit = true;
  return launch_combine(combine, stream);
}

}  // namespace jfm
