// What the C++ kernel checks share: bfloat16 bits to and from float, host vectors to device
// buffers of their exact size (DeviceBuffers owns a launch's), and the tolerance rule for one
// element.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cuda_check.h"

inline float bf16_to_float(uint16_t bits) {
  const uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float x) {
  return static_cast<__nv_bfloat16_raw>(__float2bfloat16_rn(x)).x;
}

// A device copy of `host`, allocated at its exact size (so that memcheck sees any access past
// it); nullptr for an empty vector.
template <typename T>
T* to_device(const std::vector<T>& host) {
  T* ptr = nullptr;
  if (host.empty()) return nullptr;
  CHECK(cudaMalloc(&ptr, host.size() * sizeof(T)));
  CHECK(cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return ptr;
}

// The device buffers of one launch, freed together when it goes out of scope: copies of host
// vectors and NaN-poisoned outputs, each at its exact size.
class DeviceBuffers {
 public:
  DeviceBuffers() = default;
  DeviceBuffers(const DeviceBuffers&) = delete;
  DeviceBuffers& operator=(const DeviceBuffers&) = delete;
  ~DeviceBuffers() {
    for (void* ptr : owned_) CHECK(cudaFree(ptr));
  }

  // A device copy of `host` (to_device), nullptr for an empty vector.
  template <typename T>
  T* copy(const std::vector<T>& host) {
    T* ptr = to_device(host);
    if (ptr != nullptr) owned_.push_back(ptr);
    return ptr;
  }

  // `bytes` of device memory filled with 0xFF bytes (NaN in every float type), nullptr for 0.
  void* poisoned(size_t bytes) {
    void* ptr = nullptr;
    if (bytes == 0) return ptr;
    CHECK(cudaMalloc(&ptr, bytes));
    CHECK(cudaMemset(ptr, 0xFF, bytes));
    owned_.push_back(ptr);
    return ptr;
  }

 private:
  std::vector<void*> owned_;
};

// `a` against the reference `r`: inf and NaN must match exactly, finite values within the
// absolute or the relative tolerance.
inline bool close_to(double a, double r, double abs_tol, double rel_tol) {
  if (std::isinf(r) || std::isnan(r)) return std::isnan(r) ? std::isnan(a) : a == r;
  if (!std::isfinite(a)) return false;
  return std::fabs(a - r) < abs_tol || std::fabs(a - r) / (std::fabs(r) + 1e-6) < rel_tol;
}
