// Small helpers shared by the FFI handlers: argument checks that produce
// messages naming the target and the argument, and CUDA error conversion.
// Host-only; never include CuTe/CUTLASS here.
//
// Messages are built with std::string and std::to_string only, never with
// iostreams: with the H200 toolchain (static libstdc++ pieces in the module)
// formatting an integer through std::ostringstream inside a handler crashed
// the process instead of returning the error.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>

#include <cuda_runtime_api.h>

#include "xla/ffi/api/ffi.h"

namespace jfm::ffi_helpers {

namespace ffi = ::xla::ffi;

// NumPy-style name of an XLA dtype, as a JAX user would write it.
inline std::string dtype_name(ffi::DataType dtype) {
  switch (dtype) {
    case ffi::DataType::PRED: return "bool";
    case ffi::DataType::S8: return "int8";
    case ffi::DataType::S16: return "int16";
    case ffi::DataType::S32: return "int32";
    case ffi::DataType::S64: return "int64";
    case ffi::DataType::U8: return "uint8";
    case ffi::DataType::U16: return "uint16";
    case ffi::DataType::U32: return "uint32";
    case ffi::DataType::U64: return "uint64";
    case ffi::DataType::F16: return "float16";
    case ffi::DataType::BF16: return "bfloat16";
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::F64: return "float64";
    case ffi::DataType::F8E4M3FN: return "float8_e4m3fn";
    case ffi::DataType::F8E5M2: return "float8_e5m2";
    default:
      return "dtype#" + std::to_string(static_cast<int>(dtype));
  }
}

// "(2, 3)", "(5,)", "()"
template <typename Dims>
std::string shape_string(const Dims& dims) {
  std::string out = "(";
  for (size_t d = 0; d < dims.size(); ++d) {
    if (d) out += ", ";
    out += std::to_string(dims[d]);
  }
  if (dims.size() == 1) out += ',';
  out += ')';
  return out;
}

// "float32(2, 3)"
inline std::string describe(const ffi::AnyBuffer& buf) {
  return dtype_name(buf.element_type()) + shape_string(buf.dimensions());
}

inline ffi::Error invalid_argument(std::string_view target, const std::string& message) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, std::string(target) + ": " + message);
}

// Checks dtype (one of `dtypes`) and rank of an operand or result. `layout`
// names the expected shape, e.g. "[b, s_q, h_q, d_v]".
inline ffi::Error check_array(std::string_view target, std::string_view arg,
                              const ffi::AnyBuffer& buf,
                              std::initializer_list<ffi::DataType> dtypes, size_t rank,
                              std::string_view layout) {
  bool dtype_ok = false;
  for (ffi::DataType dtype : dtypes) dtype_ok = dtype_ok || dtype == buf.element_type();
  if (dtype_ok && buf.dimensions().size() == rank) return ffi::Error::Success();
  std::string expected;
  for (ffi::DataType dtype : dtypes) {
    if (!expected.empty()) expected += " or ";
    expected += dtype_name(dtype);
  }
  return invalid_argument(target, std::string(arg) + " must be a " + expected + " array of rank " +
                                      std::to_string(rank) + " with shape " + std::string(layout) +
                                      "; got " + describe(buf));
}

// Checks one dimension against its expected value.
inline ffi::Error check_dim(std::string_view target, std::string_view arg,
                            const ffi::AnyBuffer& buf, size_t axis, int64_t expected,
                            std::string_view layout, std::string_view why) {
  const int64_t got = buf.dimensions()[axis];
  if (got == expected) return ffi::Error::Success();
  return invalid_argument(target, std::string(arg) + " must have shape " + std::string(layout) +
                                      " with dimension " + std::to_string(axis) + " equal to " +
                                      std::to_string(expected) + " (" + std::string(why) +
                                      "); got shape " + shape_string(buf.dimensions()));
}

inline bool is_aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

inline ffi::Error cuda_error(std::string_view target, std::string_view what, cudaError_t err) {
  return ffi::Error(ffi::ErrorCode::kInternal, std::string(target) + ": " + std::string(what) +
                                                   " failed: " + cudaGetErrorName(err) + ": " +
                                                   cudaGetErrorString(err));
}

}  // namespace jfm::ffi_helpers

// Returns from the enclosing handler when `expr` (an ffi::Error) is a failure.
#define JFM_RETURN_IF_ERROR(expr)                   \
  do {                                              \
    ::xla::ffi::Error jfm_error_ = (expr);          \
    if (jfm_error_.failure()) return jfm_error_;    \
  } while (0)
