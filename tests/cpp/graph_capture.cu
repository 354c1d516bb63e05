// C++ test: the launch functions are safe to capture into a CUDA graph, also on their very
// first call in a process, and the replayed graph gives the same bits as eager launches.
// `graph_capture` checks the dense decode (page 64: blocks by TMA); `graph_capture gather` the
// dense decode with pages of 16 tokens (its gathering variant); `graph_capture sparse` the
// sparse FP8 decode (V32 cache, page 61, an attention sink), each in a process of its own, so
// that each launcher's one-time setup runs under the capture.
//
// 1. A foreign, non-sticky error is left in the runtime's last-error slot (an impossible
//    cudaMalloc), as another library on the thread might leave one.
// 2. The scheduler and the dense decode (decode kernel + combine) are captured on a stream in
//    cudaStreamCaptureModeGlobal, the strictest mode, before any eager launch: the decode's
//    one-time device setup (shared-memory limit, occupancy queries) runs inside the capture.
//    Every launch must return cudaSuccess and the capture must end in a valid graph.
// 3. Right after our launches the slot holds the foreign error, or nothing: our code never
//    clears it (it reads the slot only to know whether it may clear an error of its own), but
//    the runtime's own calls in the one-time setup may (on an H100, CUDA 13.0, the slot read
//    cudaSuccess afterwards, with compute-sanitizer showing the foreign error still there
//    inside our setup and no failing call of ours). What must never be there is an error of
//    ours. (Under compute-sanitizer the impossible cudaMalloc and the reads of its error are
//    reported as API errors; run memcheck on this test with --report-api-errors no.)
// 4. The graph is replayed for three different queries (written between replays) and
//    compared bit for bit with eager launches on the same inputs; outputs are filled with NaN
//    before each run, so anything left unwritten shows.
//
// Built by CMake with -DJAX_FLASHMLA_BUILD_TESTS=ON (ctest runs it), on a Hopper GPU. Prints
// "PASS" and exits 0, or says what failed and exits 1.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cuda_check.h"
#include "kernels/common/mla_geometry.cuh"
#include "kernels/common/scheduler.cuh"
#include "kernels/sm90/decode_dense/decode_dense.cuh"
#include "kernels/sm90/decode_sparse/decode_sparse.cuh"

namespace {

// The dense cases: kCacheTokens tokens per request, in pages of `page` tokens.
constexpr int kBatch = 6, kSq = 2, kHq = 128, kCacheTokens = 40 * 64, kNumParts = 66;
constexpr int kDqk = jfm::kHeadDimQK, kDv = jfm::kHeadDimV;
// The sparse case: V32 tokens of 656 bytes in blocks of 61, 256 slots per query token.
constexpr int kSparsePage = 61, kSparseBlocks = 33, kTopk = 256, kTokenBytes = 656;
constexpr int kSparseTokens = kSparsePage * kSparseBlocks;
constexpr int kSparseParts = 132 / (kSq * 2);  // as the op computes it for h_q 128

bool sparse = false;  // which decode the test captures (argv[1] == "sparse")
int page = jfm::kDefaultPageSize;  // the dense cache's page (argv[1] == "gather": 16)

int max_blocks() { return kCacheTokens / page; }  // block-table entries per request

bool failed = false;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAIL: %s\n", what);
    failed = true;
  }
}

// bf16 bits of small random values (2^-5 <= |x| < 2^-2).
std::vector<uint16_t> random_bf16(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> exponent(0x7a, 0x7c), mantissa(0, 127), sign(0, 1);
  std::vector<uint16_t> v(n);
  for (uint16_t& x : v) x = uint16_t(sign(rng) << 15 | (exponent(rng) << 7) | mantissa(rng));
  return v;
}

template <typename T>
T* device_alloc(size_t count) {
  T* ptr = nullptr;
  CHECK(cudaMalloc(&ptr, count * sizeof(T)));
  return ptr;
}

struct Buffers {
  uint16_t *q, *cache, *out;
  int *table, *lengths, *num_splits;
  jfm::MetadataRow* metadata;
  float *lse, *partial_o, *partial_lse;
  uint8_t* fp8_cache;  // the sparse case's cache, indices and sink
  int* indices;
  float* sink;
};

// A V32 cache of random tokens: e4m3 values with exponent fields 0-9, scales 2^-3, bf16 RoPE.
std::vector<uint8_t> random_v32_cache(uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> exponent(0, 9), low(0, 15);
  std::vector<uint8_t> bytes(size_t(kSparseTokens) * kTokenBytes);
  const std::vector<uint16_t> rope = random_bf16(size_t(kSparseTokens) * 64, seed + 1);
  const float scale = 0.125f;
  for (int t = 0; t < kSparseTokens; ++t) {
    uint8_t* token = &bytes[size_t(t) * kTokenBytes];
    for (int d = 0; d < 512; ++d) {
      token[d] = uint8_t((low(rng) & 8) << 4 | exponent(rng) << 3 | (low(rng) & 7));
    }
    for (int k = 0; k < 4; ++k) std::memcpy(token + 512 + 4 * k, &scale, 4);
    std::memcpy(token + 528, &rope[size_t(t) * 64], 128);
  }
  return bytes;
}

constexpr size_t kQElems = size_t(kBatch) * kSq * kHq * kDqk;
constexpr size_t kOutElems = size_t(kBatch) * kSq * kHq * kDv;
constexpr size_t kLseElems = size_t(kBatch) * kHq * kSq;
constexpr size_t kPartialRows = size_t(kBatch + kNumParts) * kSq * kHq;

// Scheduler then decode (+ combine) on `stream`; returns the first error.
cudaError_t enqueue(const Buffers& d, cudaStream_t stream) {
  jfm::SchedulerParams sp;
  sp.tile_scheduler_metadata = d.metadata;
  sp.num_splits = d.num_splits;
  sp.batch = kBatch;
  if (sparse) {
    sp.fixed_length = kTopk;
    sp.num_parts = kSparseParts;
  } else {
    sp.cache_seqlens = d.lengths;
    sp.num_parts = kNumParts;
  }
  if (cudaError_t err = jfm::launch_scheduler(sp, stream); err != cudaSuccess) return err;
  if (sparse) {
    jfm::SparseDecodeParams p;
    p.q = d.q;
    p.main.cache = d.fp8_cache;
    p.main.indices = d.indices;
    p.main.num_blocks = kSparseBlocks;
    p.main.page = kSparsePage;
    p.main.topk = kTopk;
    p.attn_sink = d.sink;
    p.tile_metadata = d.metadata;
    p.num_splits = d.num_splits;
    p.out = d.out;
    p.lse = d.lse;
    p.partial_o = d.partial_o;
    p.partial_lse = d.partial_lse;
    p.batch = kBatch;
    p.s_q = kSq;
    p.h_q = kHq;
    p.num_parts = kSparseParts;
    p.softmax_scale = 1.f / 24.f;
    p.layout = jfm::Fp8Layout::kV32;
    return jfm::launch_sparse_decode(p, stream);
  }
  jfm::DenseDecodeParams p;
  p.q = d.q;
  p.k_cache = d.cache;
  p.block_table = d.table;
  p.cache_seqlens = d.lengths;
  p.tile_metadata = d.metadata;
  p.num_splits = d.num_splits;
  p.out = d.out;
  p.lse = d.lse;
  p.partial_o = d.partial_o;
  p.partial_lse = d.partial_lse;
  p.batch = kBatch;
  p.s_q = kSq;
  p.h_q = kHq;
  p.h_kv = 1;
  p.num_blocks = kBatch * max_blocks();
  p.page = page;
  p.max_blocks_per_seq = max_blocks();
  p.num_parts = kNumParts;
  p.softmax_scale = 1.f / 24.f;
  p.causal = true;
  p.dtype = jfm::ElementType::kBF16;
  return jfm::launch_dense_decode(p, stream);
}

void poison_outputs(const Buffers& d, cudaStream_t stream) {
  CHECK(cudaMemsetAsync(d.out, 0xFF, kOutElems * 2, stream));
  CHECK(cudaMemsetAsync(d.lse, 0xFF, kLseElems * 4, stream));
}

struct Result {
  std::vector<uint16_t> out;
  std::vector<float> lse;
};

Result read_back(const Buffers& d, cudaStream_t stream) {
  CHECK(cudaStreamSynchronize(stream));
  Result r{std::vector<uint16_t>(kOutElems), std::vector<float>(kLseElems)};
  CHECK(cudaMemcpy(r.out.data(), d.out, kOutElems * 2, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(r.lse.data(), d.lse, kLseElems * 4, cudaMemcpyDeviceToHost));
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  sparse = argc > 1 && std::strcmp(argv[1], "sparse") == 0;
  if (argc > 1 && std::strcmp(argv[1], "gather") == 0) page = 16;
  std::printf("graph capture of the %s decode\n",
              sparse ? "sparse FP8" : page == 16 ? "dense (page 16, gathered)" : "dense");
  cudaStream_t stream;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  Buffers d;
  d.q = device_alloc<uint16_t>(kQElems);
  d.cache = device_alloc<uint16_t>(size_t(kBatch) * kCacheTokens * kDqk);
  d.out = device_alloc<uint16_t>(kOutElems);
  d.table = device_alloc<int>(size_t(kBatch) * max_blocks());
  d.lengths = device_alloc<int>(kBatch);
  d.num_splits = device_alloc<int>(kBatch + 1);
  d.metadata = device_alloc<jfm::MetadataRow>(kNumParts);
  d.lse = device_alloc<float>(kLseElems);
  d.partial_o = device_alloc<float>(kPartialRows * kDv);
  d.partial_lse = device_alloc<float>(kPartialRows);

  const std::vector<uint16_t> cache = random_bf16(size_t(kBatch) * kCacheTokens * kDqk, 7);
  CHECK(cudaMemcpy(d.cache, cache.data(), cache.size() * 2, cudaMemcpyHostToDevice));
  std::vector<int> table(size_t(kBatch) * max_blocks());
  for (size_t i = 0; i < table.size(); ++i) table[i] = int((i * 37) % table.size());
  CHECK(cudaMemcpy(d.table, table.data(), table.size() * 4, cudaMemcpyHostToDevice));
  const int lengths[kBatch] = {2500, 1, 0, 700, 2560, 64};
  CHECK(cudaMemcpy(d.lengths, lengths, sizeof(lengths), cudaMemcpyHostToDevice));
  const std::vector<uint8_t> fp8_cache = random_v32_cache(9);
  d.fp8_cache = device_alloc<uint8_t>(fp8_cache.size());
  CHECK(cudaMemcpy(d.fp8_cache, fp8_cache.data(), fp8_cache.size(), cudaMemcpyHostToDevice));
  std::vector<int> indices(size_t(kBatch) * kSq * kTopk);
  for (size_t i = 0; i < indices.size(); ++i) {
    // Mostly tokens of the cache, some -1 and some past its end.
    indices[i] = i % 17 == 3 ? -1 : i % 23 == 5 ? kSparseTokens + 1 : int((i * 131) % kSparseTokens);
  }
  d.indices = device_alloc<int>(indices.size());
  CHECK(cudaMemcpy(d.indices, indices.data(), indices.size() * 4, cudaMemcpyHostToDevice));
  std::vector<float> sink(kHq);
  for (int h = 0; h < kHq; ++h) sink[h] = h % 3 == 0 ? INFINITY : h % 3 == 1 ? -INFINITY : 1.f;
  d.sink = device_alloc<float>(kHq);
  CHECK(cudaMemcpy(d.sink, sink.data(), kHq * 4, cudaMemcpyHostToDevice));
  std::vector<std::vector<uint16_t>> queries;
  for (uint32_t i = 0; i < 3; ++i) queries.push_back(random_bf16(kQElems, 100 + i));
  CHECK(cudaDeviceSynchronize());

  // 1. A foreign error in the last-error slot.
  void* impossible = nullptr;
  const cudaError_t foreign = cudaMalloc(&impossible, size_t{1} << 62);
  expect(foreign != cudaSuccess && cudaPeekAtLastError() == foreign,
         "an impossible cudaMalloc leaves its error in the last-error slot");

  // 2. The first launches of the process, captured.
  cudaGraph_t graph;
  CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  const cudaError_t captured = enqueue(d, stream);
  // Read before any call of the test's own: what the runtime does to the slot in later calls
  // (ending the capture, building the graph) is not ours to check.
  const cudaError_t slot_after_launches = cudaPeekAtLastError();
  const cudaError_t ended = cudaStreamEndCapture(stream, &graph);
  if (captured != cudaSuccess) {
    std::fprintf(stderr, "launch under capture: %s\n", cudaGetErrorString(captured));
  }
  expect(captured == cudaSuccess, "scheduler + decode launch under stream capture");
  expect(ended == cudaSuccess, "the capture ends in a graph");
  if (failed) return 1;
  size_t nodes = 0;
  CHECK(cudaGraphGetNodes(graph, nullptr, &nodes));
  std::printf("captured graph: %zu nodes (scheduler, decode, combine)\n", nodes);
  expect(nodes == 3, "the graph holds the scheduler, decode and combine kernels");

  // 3. No error of ours in the slot.
  std::printf("last-error slot after our launches: %s (the foreign error was %s)\n",
              cudaGetErrorName(slot_after_launches), cudaGetErrorName(foreign));
  expect(slot_after_launches == foreign || slot_after_launches == cudaSuccess,
         "no error of ours in the last-error slot after our launches");
  (void)cudaGetLastError();

  // 4. Replays against eager launches, bit for bit.
  cudaGraphExec_t exec;
  CHECK(cudaGraphInstantiate(&exec, graph, 0));
  for (size_t i = 0; i < queries.size(); ++i) {
    CHECK(cudaMemcpyAsync(d.q, queries[i].data(), kQElems * 2, cudaMemcpyHostToDevice, stream));
    poison_outputs(d, stream);
    CHECK(cudaGraphLaunch(exec, stream));
    const Result replayed = read_back(d, stream);
    poison_outputs(d, stream);
    CHECK(enqueue(d, stream));
    const Result eager = read_back(d, stream);
    const bool same =
        std::memcmp(replayed.out.data(), eager.out.data(), kOutElems * 2) == 0 &&
        std::memcmp(replayed.lse.data(), eager.lse.data(), kLseElems * 4) == 0;
    long nan_out = 0;
    for (uint16_t x : eager.out) nan_out += (x & 0x7F80) == 0x7F80 && (x & 0x7F) != 0;
    std::printf("query %zu: replay %s eager, %ld NaN outputs\n", i,
                same ? "==" : "!=", nan_out);
    expect(same, "graph replay and eager launch give the same bits");
    expect(nan_out == 0, "every output written (no NaN left from the poison)");
  }
  CHECK(cudaGraphExecDestroy(exec));
  CHECK(cudaGraphDestroy(graph));
  CHECK(cudaStreamDestroy(stream));
  std::printf(failed ? "FAIL\n" : "PASS\n");
  return failed ? 1 : 0;
}
