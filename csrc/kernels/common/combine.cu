// Split-KV combine kernel. See combine.cuh for the math.
//
// One warp per output row (i, t, h). The warp first reduces the split LSEs
// (lanes stride over the splits), then walks the splits once per 256-element
// slice of d_v: lane l reads float4 number l and l + 32 of the slice, so every
// load instruction of the warp covers 512 contiguous bytes. Split weights are
// recomputed per slice from the (L1-resident) LSEs instead of being staged.
#include "kernels/common/combine.cuh"
#include "kernels/common/launch.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace jfm {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpsPerBlock * 32;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // rows beyond are handled by striding

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename OutT>
struct OutConvert;

template <>
struct OutConvert<__nv_bfloat16> {
  __device__ static uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t bits;
    memcpy(&bits, &v, sizeof(bits));
    return bits;
  }
};

template <>
struct OutConvert<__half> {
  __device__ static uint32_t pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    uint32_t bits;
    memcpy(&bits, &v, sizeof(bits));
    return bits;
  }
};

// Stores 4 consecutive outputs (8 bytes, aligned since head_dim_v % 4 == 0).
template <typename OutT>
__device__ __forceinline__ void store4(OutT* dst, float4 v) {
  uint2 bits;
  bits.x = OutConvert<OutT>::pack(v.x, v.y);
  bits.y = OutConvert<OutT>::pack(v.z, v.w);
  *reinterpret_cast<uint2*>(dst) = bits;
}

__device__ __forceinline__ void fma4(float4& acc, float w, float4 x) {
  acc.x = fmaf(w, x.x, acc.x);
  acc.y = fmaf(w, x.y, acc.y);
  acc.z = fmaf(w, x.z, acc.z);
  acc.w = fmaf(w, x.w, acc.w);
}

__device__ __forceinline__ float4 scale4(float4 v, float s) {
  return make_float4(v.x * s, v.y * s, v.z * s, v.w * s);
}

template <typename OutT>
__global__ void __launch_bounds__(kThreads) combine_kernel(const CombineParams p) {
  // Launched programmatically behind the decode kernel: wait for its partials, then let the
  // next kernel on the stream start its own prologue.
  pdl_wait();
  pdl_launch_dependents();
  const int lane = threadIdx.x & 31;
  const int64_t heads = p.num_heads;
  const int64_t tokens_heads = p.seqlen_q * heads;  // partial rows are this far apart
  const int64_t rows = p.batch * tokens_heads;
  const int64_t vec_per_row = p.head_dim_v / 4;
  const int64_t warp_stride = int64_t{gridDim.x} * kWarpsPerBlock;
  const float neg_inf = -INFINITY;

  for (int64_t row = int64_t{blockIdx.x} * kWarpsPerBlock + (threadIdx.x >> 5); row < rows;
       row += warp_stride) {
    const int64_t req = row / tokens_heads;
    const int64_t token_head = row - req * tokens_heads;
    const int64_t token = token_head / heads;
    const int64_t head = token_head - token * heads;

    // Split range, clamped so that inconsistent num_splits cannot read out of bounds.
    int64_t first = __ldg(p.num_splits + req);
    int64_t last = __ldg(p.num_splits + req + 1);
    first = min(max(first, int64_t{0}), p.num_partial_rows);
    last = min(max(last, first), p.num_partial_rows);
    const int num = static_cast<int>(last - first);
    if (p.skip_unsplit && num == 1) continue;

    const float* lse_in = p.partial_lse + first * tokens_heads + token_head;
    float* lse_out = p.lse + (req * heads + head) * p.seqlen_q + token;
    OutT* out = reinterpret_cast<OutT*>(p.out) + row * p.head_dim_v;

    float max_lse = neg_inf;
    for (int s = lane; s < num; s += 32) max_lse = fmaxf(max_lse, lse_in[s * tokens_heads]);
    max_lse = warp_max(max_lse);

    if (max_lse == neg_inf) {  // no split saw an attendable key (or no split at all)
      for (int64_t v = lane; v < vec_per_row; v += 32)
        store4(out + v * 4, make_float4(0.f, 0.f, 0.f, 0.f));
      if (lane == 0) *lse_out = INFINITY;
      continue;
    }

    float sum = 0.f;
    for (int s = lane; s < num; s += 32) sum += expf(lse_in[s * tokens_heads] - max_lse);
    sum = warp_sum(sum);
    const float lse = max_lse + logf(sum);
    const float sink_scale =
        p.attn_sink != nullptr ? 1.f / (1.f + expf(__ldg(p.attn_sink + head) - lse)) : 1.f;

    const float4* o_in = reinterpret_cast<const float4*>(
        p.partial_o + (first * tokens_heads + token_head) * p.head_dim_v);
    const int64_t o_split_stride = tokens_heads * vec_per_row;  // in float4

    for (int64_t base = 0; base < vec_per_row; base += 64) {
      const int64_t v0 = base + lane;
      const int64_t v1 = base + 32 + lane;
      const bool has0 = v0 < vec_per_row;
      const bool has1 = v1 < vec_per_row;
      float4 acc0 = make_float4(0.f, 0.f, 0.f, 0.f);
      float4 acc1 = acc0;
#pragma unroll 2
      for (int s = 0; s < num; ++s) {
        const float split_lse = lse_in[s * tokens_heads];
        if (split_lse == neg_inf) continue;  // warp-uniform
        const float w = expf(split_lse - lse);
        const float4* src = o_in + s * o_split_stride;
        if (has0) fma4(acc0, w, __ldcs(src + v0));
        if (has1) fma4(acc1, w, __ldcs(src + v1));
      }
      if (has0) store4(out + v0 * 4, scale4(acc0, sink_scale));
      if (has1) store4(out + v1 * 4, scale4(acc1, sink_scale));
    }
    if (lane == 0) *lse_out = lse;
  }
}

}  // namespace

const char* combine_params_error(const CombineParams& p) {
  if (p.batch < 0 || p.seqlen_q < 0 || p.num_heads < 0 || p.num_partial_rows < 0)
    return "sizes must be >= 0";
  if (p.head_dim_v <= 0 || p.head_dim_v % 8 != 0) return "head_dim_v must be a positive multiple of 8";
  if (p.out_dtype != ElementType::kBF16 && p.out_dtype != ElementType::kF16)
    return "out_dtype must be bfloat16 or float16";
  const int64_t rows = p.batch * p.seqlen_q * p.num_heads;
  if (rows == 0) return nullptr;
  if (p.out == nullptr || p.lse == nullptr || p.num_splits == nullptr) return "null pointer";
  if (p.num_partial_rows > 0 && (p.partial_o == nullptr || p.partial_lse == nullptr))
    return "null pointer";
  if (reinterpret_cast<uintptr_t>(p.partial_o) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(p.out) % 8 != 0)
    return "partial_o must be 16-byte and out 8-byte aligned";
  return nullptr;
}

cudaError_t launch_combine(const CombineParams& params, cudaStream_t stream) {
  if (combine_params_error(params) != nullptr) return cudaErrorInvalidValue;
  const int64_t rows = params.batch * params.seqlen_q * params.num_heads;
  if (rows == 0) return cudaSuccess;
  const int64_t blocks = std::min((rows + kWarpsPerBlock - 1) / kWarpsPerBlock, kMaxBlocks);
  const dim3 grid(static_cast<unsigned>(blocks));
  const auto kernel = params.out_dtype == ElementType::kBF16 ? combine_kernel<__nv_bfloat16>
                                                            : combine_kernel<__half>;
  const LaunchShape shape{grid, dim3(kThreads), 0, dim3(1, 1, 1), /*pdl=*/true};
  return launch_kernel(kernel, shape, stream, params);
}

}  // namespace jfm
