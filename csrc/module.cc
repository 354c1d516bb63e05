// nanobind module jax_flashmla._C: hands the FFI handlers to Python.
//
//   registrations()          -> dict[str, capsule]  target name -> XLA_FFI_Handler*
//   cuda_runtime_version()   -> int                 CUDART_VERSION at build time
//   compiled_architectures() -> list[str]           e.g. ["sm_90a"]
#include <string>
#include <vector>

#include <cuda_runtime_api.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "ffi/registry.h"
#include "jfm_build_info.h"

namespace nb = nanobind;

namespace {

nb::dict registrations() {
  nb::dict targets;
#define JFM_ADD_TARGET(name, symbol) targets[name] = nb::capsule(reinterpret_cast<void*>(&symbol));
  JFM_FFI_TARGETS(JFM_ADD_TARGET)
#undef JFM_ADD_TARGET
  return targets;
}

std::vector<std::string> compiled_architectures() {
  std::vector<std::string> archs;
  const std::string csv = JFM_COMPILED_ARCHS;
  size_t begin = 0;
  while (begin < csv.size()) {
    size_t end = csv.find(',', begin);
    if (end == std::string::npos) end = csv.size();
    if (end > begin) archs.push_back(csv.substr(begin, end - begin));
    begin = end + 1;
  }
  return archs;
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "jax_flashmla CUDA extension: XLA FFI handlers for the MLA kernels";
  m.def("registrations", &registrations,
        "FFI target name -> PyCapsule of its XLA_FFI_Handler, for "
        "jax.ffi.register_ffi_target(name, capsule, platform='CUDA').");
  m.def(
      "cuda_runtime_version", [] { return static_cast<int>(CUDART_VERSION); },
      "CUDART_VERSION the module was built with (e.g. 13000); cudart is linked statically.");
  m.def("compiled_architectures", &compiled_architectures,
        "SASS targets embedded in the module, e.g. ['sm_90a'].");
  m.attr("cuda_compiler_version") = JFM_CUDA_COMPILER_VERSION;
}
