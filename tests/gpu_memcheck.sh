#!/usr/bin/env bash
# Runs GPU tests under compute-sanitizer memcheck, instrumenting only this package's kernels
# (their names hold "jfm"; XLA's own kernels run uninstrumented, or start-up alone takes many
# minutes). XLA's default allocator crashes the sanitized process (segfaults at varying tests,
# measured on the H200 with compute-sanitizer 2025.3.1); the platform allocator (plain
# cudaMalloc) does not, but is slower: ~4 s per test.
#
#   bash tests/gpu_memcheck.sh -k quick tests/test_gpu_decode_dense.py
#   bash tests/gpu_memcheck.sh tests/test_gpu_schedule.py
#
# The dense decode and schedule tests compute their reference on the host here
# (JAX_FLASHMLA_HOST_REFERENCE=1, gpu_util.reference_placement), keeping the reference's XLA and
# cuBLAS GPU programs out of the sanitized process: with the reference on the GPU a quick dense
# test took ~21 s on an H100, on the host 1.3 s (62 tests in 82 s).
#
# Arguments go to pytest (after -m "gpu and not full"). Exit status: pytest's, or 1 if the
# sanitizer reported an error. JAX_FLASHMLA_REQUIRE_GPU=1: GPU tests that cannot run here stop
# pytest with an error instead of passing as skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
log=${LOG:-/tmp/jax_flashmla_memcheck.log}
JAX_FLASHMLA_REQUIRE_GPU=1 XLA_PYTHON_CLIENT_ALLOCATOR=platform XLA_PYTHON_CLIENT_PREALLOCATE=false \
  JAX_FLASHMLA_HOST_REFERENCE=1 \
  compute-sanitizer --tool memcheck --kernel-name kns=jfm --print-limit 20 --error-exitcode 1 \
  "${PYTHON:-python3}" -P -m pytest -q -p no:cacheprovider -m "gpu and not full" "$@" 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
