// The sparse prefill kernel for sm_90a. Included by one translation unit per head dim.
//
// Persistent CTAs, one per SM, each taking the work items (query token, tile of 64 query
// heads; work_item) blockIdx.x, blockIdx.x + gridDim.x, ...: the next item's query tile and
// first blocks load while the math warpgroups finish the current one. Roles (384 threads,
// three warpgroups), one device function each:
//   load_role (WG0, all 128 threads): per item, the query tile by TMA (one thread, once the
//     score warpgroup has computed the last S of the item before), and every block of 64
//     selected rows: each row is copied by 8 threads with 16-byte cp.async straight into the
//     stage's 128-byte-swizzled K chunks (a slot that selects nothing is zero-filled without a
//     read), the stage's 64-bit mask of attending slots beside it. A 2-stage ring over the
//     CTA's blocks of all its items: each thread arrives on the stage's barrier when its copies
//     land; the slot indices are read a block ahead.
//   WG1 and WG2, the math warpgroups, as in the decode kernels (mla_tile.cuh): WG1 computes S,
//     the online softmax under the stage's mask (and the exact row maxima for max_logits),
//     hands P to WG2 through the stage's chunk 8 (the RoPE chunk of d_qk 576, which nothing
//     reads once S is done; unused by d_qk 512) and accumulates O[:, 0:256]; WG2 accumulates
//     O[:, 256:512]. A block with no attending slot is skipped.
//   finish_token, the epilogue: out (with the attention sink applied), max_logits and lse.
#pragma once

#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>

#include "kernels/common/launch.cuh"
#include "kernels/sm90/hopper.cuh"
#include "kernels/sm90/mla_tile.cuh"
#include "kernels/sm90/prefill_sparse/prefill_sparse_args.cuh"
#include "kernels/sm90/prefill_sparse/prefill_sparse_gather.cuh"

namespace jfm::sm90::prefill_sparse {

using Element = __nv_bfloat16;

constexpr int kStageChunks = 9;   // the K chunks of d_qk 576
constexpr int kPChunk = 8;        // where P goes once S is computed
constexpr int kStageBytes = kStageChunks * kChunkBytes;
constexpr int kStages = 2;
constexpr int kThreads = 384;
// Registers per thread after the split: the CTA keeps what it was launched with, 168 per thread
// (384 threads, one CTA per SM), so the loaders must give up as many as the math warpgroups
// take, or setmaxnreg.inc waits forever. The score warpgroup holds O (128), S (32), P (16) and
// the row maxima; the value warpgroup O and P; the loaders only indices and addresses.
constexpr uint32_t kLaunchRegisters = 168;
constexpr uint32_t kScoreRegisters = 216;
constexpr uint32_t kValueRegisters = 184;
constexpr uint32_t kLoaderRegisters = 104;
static_assert(128 * (kScoreRegisters + kValueRegisters + kLoaderRegisters) <=
                  kThreads * kLaunchRegisters,
              "the math warpgroups take no more registers than the loaders give up");
static_assert(kLoaderRegisters <= kLaunchRegisters && kValueRegisters >= kLaunchRegisters,
              "the loaders decrease their registers, both math warpgroups increase theirs");

struct alignas(1024) SharedStorage {
  uint8_t q[kStageChunks * kChunkBytes];
  uint8_t kv[kStages][kStageBytes];
  float row_factor[kStages][kQueryTileRows];  // exp2(m_old - m_new) per row and block
  // Final softmax denominators and reference maxima, per item parity: WG1 may write the next
  // item's before WG2 has read these.
  float row_sum[2][kQueryTileRows];
  float row_max[2][kQueryTileRows];
  uint64_t kv_full[kStages];
  uint64_t kv_empty[kStages];
  uint64_t q_full;
  uint64_t q_empty;  // WG1 computed the item's last S: the next query tile may land
  uint16_t attending[kStages][4];  // per loader warp: bit t = its slot t selects a row
};

// Arrivals that complete a stage: every loader thread's copies, then the 4 loader warps'
// attending masks.
constexpr uint32_t kStageArrivals = kLoaderThreads + 4;

// This CTA's work items: `visit(k, work, counted, blocks, first)` for its k-th item, with the
// token's counted slots and blocks, `first` the CTA's blocks before it (the stage ring runs on
// across items).
template <class Visit>
__device__ __forceinline__ void for_each_item(const KernelArgs& args, Visit visit) {
  const SparsePrefillParams& p = args.params;
  const int64_t items = work_items(p.s_q, args.head_tiles);
  uint32_t first = 0;
  int k = 0;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x, ++k) {
    const CtaWork work = work_item(item, args.head_tiles);
    const int counted = counted_slots(p.topk_length, p.topk, work.token);
    const int blocks = (counted + kBlockSlots - 1) / kBlockSlots;
    visit(k, work, counted, blocks, first);
    first += blocks;
  }
}

// WG0: per item, the token's blocks of 64 slots through the stage ring
// (prefill_sparse_gather.cuh) and the query tile (thread 0, TMA, into the buffer WG1 releases
// after the item before's last S). The query tile goes out after the first block's copies, so
// that these are in flight while WG1 finishes the item before.
template <int kHeadDimQK>
__device__ __forceinline__ void load_role(const KernelArgs& args, SharedStorage& smem) {
  constexpr int kQKChunks = kHeadDimQK / kChunkElems;
  const SparsePrefillParams& p = args.params;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  if (tid == 0) prefetch_tensor_map(&args.q_map);
  for_each_item(args, [&](int k, const CtaWork& work, int counted, int blocks, uint32_t first) {
    const auto load_query = [&] {
      if (tid != 0) return;
      if (k > 0) mbarrier_wait(&smem.q_empty, (k - 1) % 2);
      mbarrier_arrive_expect_tx(&smem.q_full, kQKChunks * 128 * args.q_box_rows);
      load_head_tile<kQKChunks>(smem.q, &args.q_map, &smem.q_full,
                                work.head_tile * kQueryTileRows, work.token);
    };
    if (blocks == 0) load_query();
    gather_token_blocks<kHeadDimQK, kStages>(
        p.indices + work.token * p.topk, counted, blocks, first,
        static_cast<const uint8_t*>(p.kv), p.s_kv, smem_address(smem.kv[0]), kStageBytes,
        smem.kv_full, smem.kv_empty, warp, lane,
        [&](int blk, int stage, const BlockSlots<>&, uint32_t attending) {
          if (lane == 0) {
            smem.attending[stage][warp] = static_cast<uint16_t>(attending);
            mbarrier_arrive(&smem.kv_full[stage]);  // releases the mask store
          }
          if (blk == 0) load_query();
        });
  });
  cp_async_wait_all();
}

// ---- Math warpgroups ------------------------------------------------------------------------

// The epilogue: WG1 shares the final row sums and maxima (WG2 needs the lse for the sink
// factor), both warpgroups normalise their half of O and store it times the sink factor; WG1
// writes max_logits and lse.
__device__ __forceinline__ void finish_token(const KernelArgs& args, SharedStorage& smem,
                                             int parity, int64_t token, int head_tile,
                                             bool score_wg, const AccumulatorRows& t,
                                             SoftmaxRows& rows,
                                             const float (&logit_max)[2],
                                             const float (&o)[kAccumulators]) {
  const SparsePrefillParams& p = args.params;
  share_row_sums_and_maxima(score_wg, t, smem.row_sum[parity], smem.row_max[parity], rows);
  const int col0 = score_wg ? 0 : kHalfV;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int head = head_tile * kQueryTileRows + t.rows[h];
    if (head >= p.h_q) continue;  // a padding row of the last tile
    const bool lonely = rows.sum[h] == 0.f;
    const float lse = (rows.max[h] + log2f(rows.sum[h])) * kLn2;
    float factor = lonely ? 0.f : 1.f / rows.sum[h];
    if (p.attn_sink != nullptr && !lonely) {
      factor *= 1.f / (1.f + expf(p.attn_sink[head] - lse));
    }
    const int64_t row_index = token * p.h_q + head;
    store_output_row_wide(static_cast<Element*>(p.out) + row_index * kHeadDimV + col0, o, h,
                          factor, t.lane);
    if (score_wg && t.lane % 4 == 0) {
      p.lse[row_index] = lonely ? INFINITY : lse;
      p.max_logits[row_index] = logit_max[h] * kLn2;
    }
  }
}

// WG1 (score_wg) and WG2: per item, the token's blocks, then its epilogue. One instance per
// warpgroup, so that each is compiled within its own register count (setmaxnreg).
template <int kHeadDimQK, bool score_wg>
__device__ __forceinline__ void math_role(const KernelArgs& args, SharedStorage& smem) {
  constexpr int kQKChunks = kHeadDimQK / kChunkElems;
  const AccumulatorRows t = accumulator_rows();
  for_each_item(args, [&](int k, const CtaWork& work, int, int blocks, uint32_t first) {
    float o[kAccumulators];  // 64 x 256 accumulator slice
#pragma unroll
    for (int i = 0; i < kAccumulators; ++i) o[i] = 0.f;
    SoftmaxRows rows = {{-INFINITY, -INFINITY}, {0.f, 0.f}};
    // The exact row maxima of the logits (log2 units), this thread's columns; the reference
    // max of the online softmax may trail them by up to kRescaleSlack.
    float logit_max[2] = {-INFINITY, -INFINITY};
    if (score_wg) mbarrier_wait(&smem.q_full, k % 2);
    for (int blk = 0; blk < blocks; ++blk) {
      const uint32_t n = first + blk;
      const int stage = n % kStages;
      mbarrier_wait(&smem.kv_full[stage], n / kStages % 2);
      // The rows arrived through the generic proxy (cp.async); wgmma reads them through the
      // async proxy.
      fence_proxy_async_smem();
      uint8_t* kv = smem.kv[stage];
      uint8_t* p_tile = kv + kPChunk * kChunkBytes;
      const uint64_t attending = *reinterpret_cast<const uint64_t*>(smem.attending[stage]);
      // The item's last S frees the query tile for the next item's.
      const bool releases_q = score_wg && blk == blocks - 1;
      if (attending != 0) {
        if constexpr (score_wg) {
          float s[32];
          issue_scores<Element, kQKChunks>(smem.q, kv, s);
          wgmma_wait<0>();
          if (releases_q) mbarrier_arrive(&smem.q_empty);
          const uint64_t mine = attending >> t.quad_col;
          const auto attends = [&](int i, int, int e) { return (mine >> (i * 8 + e)) & 1; };
          uint32_t packed[16];
          float factor[2];
          online_softmax<Element>(s, attends, args.scale_log2, rows, o, packed, factor);
          // s holds the masked logits now (log2 units, -inf where masked).
#pragma unroll
          for (int i = 0; i < 32; ++i) {
            logit_max[(i / 2) % 2] = fmaxf(logit_max[(i / 2) % 2], s[i]);
          }
          publish_p(p_tile, packed, factor, smem.row_factor[stage], t, stage);
          accumulate_pv<Element>(packed, kv, o);
        } else {
          uint32_t packed[16];
          receive_p(p_tile, smem.row_factor[stage], t, stage, o, packed);
          accumulate_pv<Element>(packed, kv + 4 * kChunkBytes, o);
        }
      } else if (releases_q) {
        mbarrier_arrive(&smem.q_empty);
      }
      mbarrier_arrive(&smem.kv_empty[stage]);
    }
    if constexpr (score_wg) {
      if (blocks == 0) mbarrier_arrive(&smem.q_empty);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        logit_max[h] = fmaxf(logit_max[h], __shfl_xor_sync(0xffffffff, logit_max[h], 1));
        logit_max[h] = fmaxf(logit_max[h], __shfl_xor_sync(0xffffffff, logit_max[h], 2));
      }
    }
    finish_token(args, smem, k % 2, work.token, work.head_tile, score_wg, t, rows, logit_max,
                 o);
  });
}

template <int kHeadDimQK>
__global__ void __launch_bounds__(kThreads, 1)
    sparse_prefill_kernel(const __grid_constant__ KernelArgs args) {
  extern __shared__ uint8_t smem_raw[];
  SharedStorage& smem = *reinterpret_cast<SharedStorage*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&smem.kv_full[s], kStageArrivals);
      mbarrier_init(&smem.kv_empty[s], kConsumerThreads);
    }
    mbarrier_init(&smem.q_full, 1);
    mbarrier_init(&smem.q_empty, 128);
    fence_barrier_init();
  }
  if (args.q_box_rows < kQueryTileRows) {
    // The rows past the box: TMA never writes them, so zeroing them once serves every item.
    zero_unloaded_query_rows(smem.q, kStageChunks, args.q_box_rows, kThreads);
  }
  __syncthreads();

  if (threadIdx.x < kLoaderThreads) {
    registers_decrease<kLoaderRegisters>();
    load_role<kHeadDimQK>(args, smem);
  } else if (threadIdx.x < 2 * 128) {
    registers_increase<kScoreRegisters>();
    math_role<kHeadDimQK, true>(args, smem);
  } else {
    registers_increase<kValueRegisters>();
    math_role<kHeadDimQK, false>(args, smem);
  }
}

constexpr int kSmemBytes = static_cast<int>(sizeof(SharedStorage)) + 1024;  // + alignment slack

// The current device's SMs (one persistent CTA each), asked once per device; 0 if the query
// failed.
inline int device_sms() {
  return per_device_once(
      [](int device) {
        int sms = 0;
        const cudaError_t status =
            cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
        return status == cudaSuccess ? sms : 0;
      },
      [](int sms) { return sms > 0; });
}

// Launches the kernel for one head dim (instantiated in prefill_sparse_d<d_qk>.cu), after its
// one-time setup on the device (launch.cuh): a CTA per SM, or per work item if there are fewer.
template <int kHeadDimQK>
cudaError_t launch_typed(const KernelArgs& args, cudaStream_t stream) {
  constexpr auto kKernel = sparse_prefill_kernel<kHeadDimQK>;
  const cudaError_t setup =
      prepare_register_split_kernel<kKernel>(kLaunchRegisters, kSmemBytes);
  if (setup != cudaSuccess) return setup;
  const int sms = device_sms();
  if (sms == 0) return cudaErrorInvalidDevice;
  const int64_t ctas = std::min<int64_t>(work_items(args.params.s_q, args.head_tiles), sms);
  const LaunchShape shape{dim3(static_cast<unsigned>(ctas)), dim3(kThreads), kSmemBytes};
  return launch_kernel(kKernel, shape, stream, args);
}

}  // namespace jfm::sm90::prefill_sparse
