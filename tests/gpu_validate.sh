#!/usr/bin/env bash
# Everything a change to the dense decode kernel must pass on the H200 before it lands, in
# three parts that each fit one 10-minute device call (times measured 2026-12-01 on the H200):
#
#   bash tests/gpu_validate.sh kernel    # build, quick GPU tests (~240 s), decode_check plain
#                                        # and under memcheck (~20-90 s), bench_decode.py (~230 s)
#   bash tests/gpu_validate.sh matrix    # build, full matrix in parallel shards (~300 s)
#   bash tests/gpu_validate.sh memcheck           # build, memcheck over the quick decode tests
#                                                 # but command buffers (~350 s)
#   bash tests/gpu_validate.sh memcheck-schedule  # build, memcheck over the schedule tests but
#                                                 # command buffers (240-600 s: varies by call)
#   bash tests/gpu_validate.sh memcheck-graphs    # build, memcheck over both command-buffer
#                                                 # tests (355 s + 41 s)
#
# The three memcheck parts together cover every quick decode and schedule test; each needs its
# own device call.
#
# Logs and results go to $OUT (the device tool's output folder; default /tmp/jax_flashmla_out):
# pytest logs, decode_check.txt, decode_check_memcheck.txt, decode_dense.{json,txt,png},
# full matrix shard logs, memcheck_{decode,schedule,graphs}.log. Exit status non-zero if any
# step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/jax_flashmla_out}
mkdir -p "$out"
py=${PYTHON:-python3}
status=0
step() {  # step NAME COMMAND...: runs, logs the time and the exit status
  local name=$1 t0=$SECONDS
  shift
  "$@" || { echo "FAILED: $name"; status=1; }
  echo "== $name: $((SECONDS - t0)) s"
}
build() {
  "$py" -m pip install -q --no-index --no-deps .whl/*.whl 2>/dev/null || true  # CUTLASS wheel
  CMAKE_BUILD_PARALLEL_LEVEL=16 "$py" -m pip install -q --no-build-isolation --no-deps .
}
quick_tests() {
  "$py" -P -m pytest -q -p no:cacheprovider -m "gpu and not full" \
    tests/test_gpu_decode_dense.py tests/test_gpu_schedule.py > "$out/quick_tests.log" 2>&1
  local rc=$?
  tail -3 "$out/quick_tests.log"
  return $rc
}
decode_check() {
  local cutlass
  cutlass=$("$py" -c "import cutlass_library, os; print(os.path.dirname(cutlass_library.__file__))")/source
  nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -Icsrc \
    -I"$cutlass/include" -o /tmp/decode_check benchmarks/probes/decode_check.cu \
    csrc/kernels/common/scheduler.cu csrc/kernels/common/combine.cu || return 1
  /tmp/decode_check > "$out/decode_check.txt" 2>&1 || { tail -5 "$out/decode_check.txt"; return 1; }
  tail -1 "$out/decode_check.txt"
  compute-sanitizer --tool memcheck --error-exitcode 1 /tmp/decode_check \
    > "$out/decode_check_memcheck.txt" 2>&1 || { tail -5 "$out/decode_check_memcheck.txt"; return 1; }
  tail -1 "$out/decode_check_memcheck.txt"
}
bench() {
  "$py" -P benchmarks/bench_decode.py --json "$out/decode_dense.json" > "$out/decode_dense.txt" &&
    "$py" -P benchmarks/plot_decode.py "$out/decode_dense.json" &&
    cat "$out/decode_dense.txt"
}
memcheck() {  # memcheck NAME SELECTION FILES...: pytest -k SELECTION, log in $out/memcheck_NAME.log
  local name=$1 selection=$2
  shift 2
  LOG="$out/memcheck_$name.log" bash tests/gpu_memcheck.sh -vv -k "$selection" "$@" > /dev/null
  local rc=$?
  tail -2 "$out/memcheck_$name.log"
  return $rc
}
case "${1:-}" in
  kernel)
    step build build
    step "quick GPU tests" quick_tests
    step "decode_check + memcheck" decode_check
    step bench bench ;;
  matrix)
    step build build
    step "full matrix, small batches" env LOG_DIR="$out/full_small" bash tests/gpu_full_matrix.sh small
    step "full matrix, b 64" env LOG_DIR="$out/full_b64" bash tests/gpu_full_matrix.sh b64 ;;
  memcheck)
    step build build
    step "memcheck, quick decode tests" memcheck decode "quick and not command_buffers" \
      tests/test_gpu_decode_dense.py ;;
  memcheck-schedule)
    step build build
    step "memcheck, schedule tests" memcheck schedule "not command_buffers" \
      tests/test_gpu_schedule.py ;;
  memcheck-graphs)
    step build build
    step "memcheck, command-buffer tests" memcheck graphs command_buffers \
      tests/test_gpu_decode_dense.py tests/test_gpu_schedule.py ;;
  *) echo "usage: $0 kernel|matrix|memcheck|memcheck-schedule|memcheck-graphs" >&2; exit 2 ;;
esac
exit $status
