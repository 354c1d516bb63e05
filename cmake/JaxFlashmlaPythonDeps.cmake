# Locates the header-only build dependencies that ship as Python packages, by
# asking the interpreter that runs the build (${Python_EXECUTABLE}):
#
#   JFM_XLA_FFI_INCLUDE_DIR   jax.ffi.include_dir()          (xla/ffi/api/ffi.h)
#   JFM_CUTLASS_INCLUDE_DIRS  nvidia-cutlass wheel: cutlass_library/source/include
#                             and cutlass_library/source/tools/util/include
#   nanobind_DIR              python -m nanobind --cmake_dir
#
# JAX_FLASHMLA_CUTLASS_DIR (a CUTLASS source checkout) overrides the wheel.

include_guard(GLOBAL)

function(jfm_python_query out_var what code)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "${code}"
    OUTPUT_VARIABLE _out
    ERROR_VARIABLE _err
    RESULT_VARIABLE _rc
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _rc EQUAL 0 OR _out STREQUAL "")
    message(FATAL_ERROR
      "jax_flashmla: could not locate ${what} with ${Python_EXECUTABLE}.\n${_err}")
  endif()
  string(REPLACE "\n" ";" _out "${_out}")
  set(${out_var} "${_out}" PARENT_SCOPE)
endfunction()

# --- XLA FFI headers --------------------------------------------------------
jfm_python_query(JFM_XLA_FFI_INCLUDE_DIR
  "the XLA FFI headers (jax.ffi.include_dir(); is jax installed?)"
  [=[
import jax.ffi
print(jax.ffi.include_dir())
]=])
if(NOT EXISTS "${JFM_XLA_FFI_INCLUDE_DIR}/xla/ffi/api/ffi.h")
  message(FATAL_ERROR "jax_flashmla: ${JFM_XLA_FFI_INCLUDE_DIR}/xla/ffi/api/ffi.h not found")
endif()

# --- CUTLASS / CuTe headers -------------------------------------------------
if(JAX_FLASHMLA_CUTLASS_DIR)
  set(JFM_CUTLASS_INCLUDE_DIRS
    "${JAX_FLASHMLA_CUTLASS_DIR}/include"
    "${JAX_FLASHMLA_CUTLASS_DIR}/tools/util/include")
else()
  jfm_python_query(JFM_CUTLASS_INCLUDE_DIRS
    "the CUTLASS headers (pip install nvidia-cutlass==4.2.0.0)"
    [=[
import os, cutlass_library
root = os.path.join(os.path.dirname(cutlass_library.__file__), "source")
print(os.path.join(root, "include"))
print(os.path.join(root, "tools", "util", "include"))
]=])
endif()
list(GET JFM_CUTLASS_INCLUDE_DIRS 0 _jfm_cutlass_main)
if(NOT EXISTS "${_jfm_cutlass_main}/cute/tensor.hpp")
  message(FATAL_ERROR "jax_flashmla: CuTe headers not found under ${_jfm_cutlass_main}")
endif()

# --- nanobind ----------------------------------------------------------------
if(NOT nanobind_DIR)
  jfm_python_query(nanobind_DIR "nanobind's CMake directory (pip install nanobind)"
    [=[
import nanobind
print(nanobind.cmake_dir())
]=])
endif()

message(STATUS "jax_flashmla: XLA FFI headers: ${JFM_XLA_FFI_INCLUDE_DIR}")
message(STATUS "jax_flashmla: CUTLASS headers: ${JFM_CUTLASS_INCLUDE_DIRS}")
message(STATUS "jax_flashmla: nanobind: ${nanobind_DIR}")
