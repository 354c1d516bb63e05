// nanobind module jax_flashmla._C: hands the FFI handlers to Python.
//
//   registrations()          -> dict[str, capsule]  target name -> XLA_FFI_Handler*
//   cuda_runtime_version()   -> int                 CUDART_VERSION at build time
//   compiled_architectures() -> list[str]           e.g. ["sm_90a"]
//   constants()              -> dict[str, int]      mla_geometry.cuh, named as in
//                                                   jax_flashmla/_src/geometry.py
#include <cstddef>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "ffi/registry.h"
#include "kernels/common/mla_geometry.cuh"
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

// The shared facts of mla_geometry.cuh under their Python names, so that a test can hold
// them against jax_flashmla/_src/geometry.py.
nb::dict constants() {
  nb::dict c;
  c["HEAD_DIM_LATENT"] = jfm::kHeadDimLatent;
  c["HEAD_DIM_ROPE"] = jfm::kHeadDimRope;
  c["HEAD_DIM_QK"] = jfm::kHeadDimQK;
  c["HEAD_DIM_V"] = jfm::kHeadDimV;
  c["DEFAULT_PAGE_SIZE"] = jfm::kDefaultPageSize;
  c["SCHEDULER_BLOCK_TOKENS"] = jfm::kSchedulerBlockTokens;
  c["SCHEDULER_FIXED_OVERHEAD"] = jfm::kSchedulerFixedOverhead;
  c["QUERY_TILE_ROWS"] = jfm::kQueryTileRows;
  c["METADATA_FIELDS"] = jfm::kMetadataFields;
#define JFM_FIELD(python_name, member) \
  c["MetadataField." python_name] = static_cast<int>(offsetof(jfm::MetadataRow, member) / 4);
  JFM_FIELD("BEGIN_REQ", begin_req)
  JFM_FIELD("END_REQ", end_req)
  JFM_FIELD("BEGIN_BLOCK", begin_block)
  JFM_FIELD("END_BLOCK", end_block)
  JFM_FIELD("BEGIN_SPLIT_IDX", begin_split_idx)
  JFM_FIELD("IS_FIRST_REQ_SPLIT", is_first_req_split)
  JFM_FIELD("IS_LAST_REQ_SPLIT", is_last_req_split)
  JFM_FIELD("PAD", pad)
#undef JFM_FIELD
  return c;
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
  m.def("constants", &constants,
        "The kernels' shared sizes and metadata row layout (csrc/kernels/common/mla_geometry.cuh).");
  m.attr("cuda_compiler_version") = JFM_CUDA_COMPILER_VERSION;
}
