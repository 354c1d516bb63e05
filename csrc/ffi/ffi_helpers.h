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

#include "kernels/common/mla_geometry.cuh"
#include "xla/ffi/api/ffi.h"

namespace jfm::ffi_helpers {

namespace ffi = ::xla::ffi;
using ::jfm::ElementType;

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

// A dimension check_buffer reads but does not check.
inline constexpr int64_t kAnyDim = -1;

// Checks an operand or result: dtype one of `dtypes`, rank dims.size(), and every dimension
// that is not kAnyDim. `layout` names the shape, e.g. "[b, s_q, h_q, 512]". The handlers'
// one check per buffer: ranks and dims must hold before a handler reads dims or a kernel
// indexes the buffer.
inline ffi::Error check_buffer(std::string_view target, std::string_view arg,
                               const ffi::AnyBuffer& buf,
                               std::initializer_list<ffi::DataType> dtypes,
                               std::initializer_list<int64_t> dims, std::string_view layout) {
  bool ok = false;
  for (ffi::DataType dtype : dtypes) ok = ok || dtype == buf.element_type();
  const auto got = buf.dimensions();
  ok = ok && got.size() == dims.size();
  size_t axis = 0;
  for (int64_t want : dims) {
    if (ok && want != kAnyDim && got[axis] != want) ok = false;
    ++axis;
  }
  // Every call of a handler runs this: the message is built only when there is one to give.
  if (ok) return ffi::Error::Success();
  std::string expected_dims = "(";
  axis = 0;
  for (int64_t want : dims) {
    if (axis++) expected_dims += ", ";
    expected_dims += want == kAnyDim ? "*" : std::to_string(want);
  }
  expected_dims += dims.size() == 1 ? ",)" : ")";
  std::string expected;
  for (ffi::DataType dtype : dtypes) {
    if (!expected.empty()) expected += " or ";
    expected += dtype_name(dtype);
  }
  return invalid_argument(target, std::string(arg) + " must be a " + expected + " array of shape " +
                                      std::string(layout) + " = " + expected_dims + "; got " +
                                      describe(buf));
}

// The kernels' element type of a 16-bit float buffer (checked by check_buffer first).
inline ElementType element_type(const ffi::AnyBuffer& buf) {
  return buf.element_type() == ffi::DataType::F16 ? ElementType::kF16 : ElementType::kBF16;
}

// The tail every handler shares: the kernel's own parameter check (limits the shapes cannot
// show: grid sizes, int32 coordinates, alignment), then the launch.
template <typename Params>
ffi::Error launch(std::string_view target, const Params& params, cudaStream_t stream,
                  const char* (*params_error)(const Params&),
                  cudaError_t (*launch_fn)(const Params&, cudaStream_t)) {
  if (const char* message = params_error(params)) return invalid_argument(target, message);
  const cudaError_t err = launch_fn(params, stream);
  if (err != cudaSuccess) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string(target) + ": kernel launch failed: " +
                                                     cudaGetErrorName(err) + ": " +
                                                     cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

}  // namespace jfm::ffi_helpers

// Returns from the enclosing handler when `expr` (an ffi::Error) is a failure.
#define JFM_RETURN_IF_ERROR(expr)                   \
  do {                                              \
    ::xla::ffi::Error jfm_error_ = (expr);          \
    if (jfm_error_.failure()) return jfm_error_;    \
  } while (0)
