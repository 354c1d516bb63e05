// Kernel launches, all through cudaLaunchKernelEx: the launch status is returned, never read
// from (or cleared out of) the runtime's last-error slot, where it would mix with errors of
// other libraries on the thread; and launches made while a stream is captured (CUDA graphs)
// need nothing else.
//
// Programmatic dependent launch (sm_90+): a kernel launched with `pdl` may start while the
// kernel before it on the stream is still running, once every CTA of that kernel has called
// pdl_launch_dependents() or exited. It must call pdl_wait() (which returns when the previous
// kernel has completed and its memory is visible) before touching anything that kernel writes.
// Both are no-ops when the kernel was launched without the attribute, and on architectures
// older than sm_90. Captured into CUDA graphs as programmatic edges.
#pragma once

#include <cuda_runtime.h>  // cudaLaunchKernelEx (C++ overload)

#include <atomic>

namespace jfm {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

struct LaunchShape {
  dim3 grid;
  dim3 block;
  size_t smem_bytes = 0;
  dim3 cluster = dim3(1, 1, 1);  // CTAs per thread-block cluster; (1, 1, 1): no clusters
  bool pdl = false;              // allow programmatic dependent launch after the previous kernel
};

template <typename... KernelParams, typename... Args>
cudaError_t launch_kernel(void (*kernel)(KernelParams...), const LaunchShape& shape,
                          cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = shape.grid;
  config.blockDim = shape.block;
  config.dynamicSmemBytes = shape.smem_bytes;
  config.stream = stream;
  cudaLaunchAttribute attributes[2];
  unsigned count = 0;
  if (shape.pdl) {
    attributes[count].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attributes[count].val.programmaticStreamSerializationAllowed = 1;
    ++count;
  }
  if (shape.cluster.x * shape.cluster.y * shape.cluster.z > 1) {
    attributes[count].id = cudaLaunchAttributeClusterDimension;
    attributes[count].val.clusterDim.x = shape.cluster.x;
    attributes[count].val.clusterDim.y = shape.cluster.y;
    attributes[count].val.clusterDim.z = shape.cluster.z;
    ++count;
  }
  config.attrs = attributes;
  config.numAttrs = count;
  return cudaLaunchKernelEx(&config, kernel, static_cast<KernelParams>(args)...);
}

// What `query(device)` returns for the current device, computed on the device's first call
// and cached from then on, once `usable(result)` holds (an unusable result, e.g. a failed
// query, is returned and asked for again next time). For one-time launch setup (shared-memory
// limits, occupancy): the cache makes later launches free of runtime calls, as stream capture
// wants. Each call site (lambda type) has its own cache.
template <typename Query, typename Usable>
auto per_device_once(Query query, Usable usable) -> decltype(query(0)) {
  using Result = decltype(query(0));
  constexpr int kMaxDevices = 64;
  enum : int { kEmpty, kWriting, kReady };
  static std::atomic<int> state[kMaxDevices] = {};
  static Result cache[kMaxDevices];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) {
    return query(device);
  }
  if (state[device].load(std::memory_order_acquire) == kReady) return cache[device];
  const Result result = query(device);
  int expected = kEmpty;
  if (usable(result) &&
      state[device].compare_exchange_strong(expected, kWriting, std::memory_order_acq_rel)) {
    cache[device] = result;
    state[device].store(kReady, std::memory_order_release);
  }
  return result;
}

// The one-time setup of `kKernel`, a kernel whose warpgroups move registers between them with
// setmaxnreg, on the current device (cached per device): its dynamic shared-memory limit raised
// to `smem_bytes`, and its compiled register count checked against `launch_registers`, the pool
// the split assumes (with fewer, setmaxnreg.inc would wait forever: the launch is refused with
// cudaErrorInvalidConfiguration instead). A template on the kernel itself, so that each kernel
// has its own cache. Only calls that are legal while a stream is captured.
template <auto kKernel>
cudaError_t prepare_register_split_kernel(int launch_registers, int smem_bytes) {
  return per_device_once(
      [&](int) {
        cudaFuncAttributes attributes;
        cudaError_t status = cudaFuncGetAttributes(&attributes, kKernel);
        if (status == cudaSuccess && attributes.numRegs != launch_registers) {
          status = cudaErrorInvalidConfiguration;
        }
        if (status != cudaSuccess) return status;
        return cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    smem_bytes);
      },
      [](cudaError_t status) { return status == cudaSuccess; });
}

}  // namespace jfm
