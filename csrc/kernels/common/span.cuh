// The one probe switch of the kernels: built with -DJFM_KERNEL_SPAN (only the decode_cycles
// probe is), the first CTA's score warpgroup records (clock64, globaltimer) when it starts and
// ends, which gives its cycles per KV block and the SM clock of the launch. Otherwise the
// macros expand to nothing and the kernels' code is unchanged. (Finer trace points inside the
// loop change the code the compiler generates, and the timings with it.)
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
