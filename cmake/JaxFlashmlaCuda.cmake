# CUDA helpers for jax_flashmla.
#
#   jfm_detect_cuda(<out_var>)
#       Sets <out_var> to TRUE when a usable CUDA compiler exists (CUDA >= 12.5,
#       needed by the kernels), FALSE otherwise. Never fails the configure step.
#
#   jfm_add_cuda_objects(<name> ARCHS <arch>... SOURCES <file>...)
#       OBJECT library compiled by nvcc for exactly the listed architectures
#       (e.g. "90a" -> -gencode=arch=compute_90a,code=sm_90a), with the project's
#       CUDA flags, the csrc/ include root and the CUTLASS/CuTe headers.
#
#   jfm_add_cuda_executable(<name> ARCHS <arch>... SOURCES <file>... [DEFINES <def>...]
#                           [OBJECTS <object library>...])
#       A program (C++ test or probe) built with the same flags, linked with the
#       given kernel object libraries and the static CUDA runtime.

include_guard(GLOBAL)
include(CheckLanguage)

function(jfm_detect_cuda out_var)
  set(_have FALSE)
  if(NOT JAX_FLASHMLA_BUILD_CUDA)
    set(_why "JAX_FLASHMLA_BUILD_CUDA is OFF")
  else()
    # check_language() does not look again when CMAKE_CUDA_COMPILER is already
    # set, so an explicitly given compiler that does not exist is caught here.
    if(DEFINED CMAKE_CUDA_COMPILER AND CMAKE_CUDA_COMPILER)
      if(NOT IS_ABSOLUTE "${CMAKE_CUDA_COMPILER}")
        find_program(_jfm_given_nvcc NAMES "${CMAKE_CUDA_COMPILER}")
        if(_jfm_given_nvcc)
          set(CMAKE_CUDA_COMPILER "${_jfm_given_nvcc}" CACHE FILEPATH "CUDA compiler" FORCE)
        endif()
      endif()
      if(NOT EXISTS "${CMAKE_CUDA_COMPILER}")
        set(_why "CMAKE_CUDA_COMPILER='${CMAKE_CUDA_COMPILER}' does not exist")
        set(CMAKE_CUDA_COMPILER "" CACHE FILEPATH "CUDA compiler" FORCE)
      endif()
    endif()
    if(NOT _why)
      check_language(CUDA)
      if(NOT CMAKE_CUDA_COMPILER)
        set(_why "no CUDA compiler (nvcc) was found; set CUDACXX or put nvcc on PATH")
      else()
        # Ask nvcc for its version without enabling the language yet.
        execute_process(COMMAND "${CMAKE_CUDA_COMPILER}" --version
                        OUTPUT_VARIABLE _ver_out RESULT_VARIABLE _ver_rc ERROR_QUIET)
        string(REGEX MATCH "release ([0-9]+\\.[0-9]+)" _m "${_ver_out}")
        if(NOT _ver_rc EQUAL 0 OR NOT CMAKE_MATCH_1)
          set(_why "could not run '${CMAKE_CUDA_COMPILER} --version'")
        elseif(CMAKE_MATCH_1 VERSION_LESS 12.5)
          set(_why "CUDA ${CMAKE_MATCH_1} is too old (the kernels need CUDA >= 12.5: sm_90a and cudaGetDriverEntryPointByVersion)")
        else()
          set(_have TRUE)
        endif()
      endif()
    endif()
  endif()
  if(NOT _have)
    message(WARNING
      "jax_flashmla: ${_why}.\n"
      "The CUDA extension jax_flashmla._C will NOT be built: the package installs as pure "
      "Python and every op runs on the XLA reference backend.")
  endif()
  set(${out_var} ${_have} PARENT_SCOPE)
endfunction()

# "90a" -> "-gencode=arch=compute_90a,code=sm_90a". Only real (SASS) code is
# embedded: arch-specific "a" targets are not forward compatible anyway.
function(jfm_gencode_flags out_var)
  set(_flags)
  foreach(_arch IN LISTS ARGN)
    list(APPEND _flags "-gencode=arch=compute_${_arch},code=sm_${_arch}")
  endforeach()
  set(${out_var} ${_flags} PARENT_SCOPE)
endfunction()

# The one set of CUDA flags: kernels of the module, C++ tests and probes alike.
function(jfm_cuda_target_setup target)
  jfm_gencode_flags(_gencode ${ARGN})
  set_target_properties(${target} PROPERTIES
    CUDA_ARCHITECTURES OFF          # we pass -gencode ourselves
    CUDA_STANDARD 17
    CUDA_STANDARD_REQUIRED ON
    CUDA_EXTENSIONS OFF
    CXX_STANDARD 17
    POSITION_INDEPENDENT_CODE ON
    CUDA_RUNTIME_LIBRARY Static)
  set(_cuda_flags ${_gencode} --expt-relaxed-constexpr -O3 -lineinfo)
  if(JAX_FLASHMLA_PTXAS_VERBOSE)
    list(APPEND _cuda_flags "-Xptxas=-v")
  endif()
  target_compile_options(${target} PRIVATE "$<$<COMPILE_LANGUAGE:CUDA>:${_cuda_flags}>")
  target_include_directories(${target} PRIVATE "${JFM_CSRC_DIR}")
  target_link_libraries(${target} PRIVATE jfm_cutlass CUDA::toolkit)
endfunction()

function(jfm_add_cuda_objects name)
  cmake_parse_arguments(PARSE_ARGV 1 ARG "" "" "ARCHS;SOURCES")
  if(NOT ARG_ARCHS)
    message(FATAL_ERROR "jfm_add_cuda_objects(${name}): no ARCHS given")
  endif()
  add_library(${name} OBJECT ${ARG_SOURCES})
  jfm_cuda_target_setup(${name} ${ARG_ARCHS})
endfunction()

function(jfm_add_cuda_executable name)
  cmake_parse_arguments(PARSE_ARGV 1 ARG "" "" "ARCHS;SOURCES;DEFINES;OBJECTS")
  add_executable(${name} ${ARG_SOURCES})
  jfm_cuda_target_setup(${name} ${ARG_ARCHS})
  target_compile_definitions(${name} PRIVATE ${ARG_DEFINES})
  foreach(_objs IN LISTS ARG_OBJECTS)
    target_sources(${name} PRIVATE $<TARGET_OBJECTS:${_objs}>)
  endforeach()
  target_link_libraries(${name} PRIVATE CUDA::cudart_static)
endfunction()
