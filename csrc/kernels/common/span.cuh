// Optional timing of one CTA, for benchmarks/probes/decode_cycles.cu. Compiled in only with
// -DJFM_KERNEL_SPAN; otherwise the macros expand to nothing.
//
// The first CTA's score warpgroup records (clock64, globaltimer) when it starts and ends, which
// gives its cycles per KV block and the SM clock of the launch. (Per-block clock reads inside
// the loop were tried too: they change the code the compiler generates and the timings with it.)
#pragma once

#ifdef JFM_KERNEL_SPAN
// Defined here: only the probe's single translation unit is built with JFM_KERNEL_SPAN.
__device__ unsigned long long jfm_span[4];  // start cycles, start ns, end cycles, end ns

__device__ __forceinline__ void jfm_span_mark(int which) {
  if (blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0 && threadIdx.x % 128 == 0) {
    unsigned long long ns;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
    jfm_span[2 * which] = clock64();
    jfm_span[2 * which + 1] = ns;
  }
}
#define JFM_SPAN_BEGIN() jfm_span_mark(0)
#define JFM_SPAN_END() jfm_span_mark(1)
#else
#define JFM_SPAN_BEGIN()
#define JFM_SPAN_END()
#endif

// Optional event trace of the first CTA, for studying a kernel's schedule (decode_cycles.cu
// with -DJFM_KERNEL_TRACE writes it out): thread 0 of each warpgroup appends (clock64, event)
// at each JFM_TRACE(event). It changes the generated code, so it shows where the time goes,
// not how fast the untraced kernel is.
#ifdef JFM_KERNEL_TRACE
constexpr int kJfmTraceCapacity = 8192;
__device__ unsigned long long jfm_trace[4][kJfmTraceCapacity];  // clock64 << 8 | event
__device__ int jfm_trace_count[4];
#define JFM_TRACE_INIT() int jfm_trace_i = 0
#define JFM_TRACE(event)                                                                   \
  do {                                                                                     \
    if (blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0 && threadIdx.x % 128 == 0 && \
        jfm_trace_i < kJfmTraceCapacity) {                                                 \
      jfm_trace[threadIdx.x / 128][jfm_trace_i++] = (clock64() << 8) | (event);            \
      jfm_trace_count[threadIdx.x / 128] = jfm_trace_i;                                    \
    }                                                                                      \
  } while (0)
// Records `event` only if the mbarrier phase `parity` of the shared-memory barrier at `bar`
// has not completed yet (checked once, without waiting): shows which waits really wait.
#define JFM_TRACE_IF_PENDING(bar, parity, event)                                            \
  do {                                                                                      \
    uint32_t jfm_done;                                                                      \
    asm volatile(                                                                           \
        "{\n.reg .pred p;\nmbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\n"          \
        "selp.u32 %0, 1, 0, p;\n}\n"                                                         \
        : "=r"(jfm_done)                                                                    \
        : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(bar))), "r"(parity)            \
        : "memory");                                                                        \
    if (!jfm_done) JFM_TRACE(event);                                                        \
  } while (0)
#else
#define JFM_TRACE_INIT()
#define JFM_TRACE(event)
#define JFM_TRACE_IF_PENDING(bar, parity, event)
#endif
