// Programmatic dependent launch (sm_90+): a kernel launched with the attribute below may start
// while the kernel before it on the stream is still running, once every CTA of that kernel
// has called pdl_launch_dependents() or exited. It must call pdl_wait() (which returns when
// the previous kernel has completed and its memory is visible) before touching anything that
// kernel writes. Both are no-ops when the kernel was launched without the attribute, and on
// architectures older than sm_90. Captured into CUDA graphs as programmatic edges.
#pragma once

#include <cuda_runtime.h>  // cudaLaunchKernelEx (C++ overload)

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

// Launches `kernel` on `stream` with programmatic stream serialisation allowed, in clusters of
// `cluster` CTAs (dim3(1, 1, 1): no clusters).
template <typename... KernelParams, typename... Args>
cudaError_t launch_with_pdl(void (*kernel)(KernelParams...), dim3 grid, dim3 block, dim3 cluster,
                            size_t smem_bytes, cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  cudaLaunchAttribute attribute[2];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  attribute[1].id = cudaLaunchAttributeClusterDimension;
  attribute[1].val.clusterDim.x = cluster.x;
  attribute[1].val.clusterDim.y = cluster.y;
  attribute[1].val.clusterDim.z = cluster.z;
  config.attrs = attribute;
  config.numAttrs = cluster.x * cluster.y * cluster.z > 1 ? 2 : 1;
  return cudaLaunchKernelEx(&config, kernel, static_cast<KernelParams>(args)...);
}

}  // namespace jfm
