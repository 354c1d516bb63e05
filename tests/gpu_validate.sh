#!/usr/bin/env bash
# Everything a change to the kernels must pass on a Hopper GPU (H100/H200) before it lands, in
# parts that each take under 10 minutes (times measured or estimated on the H200, 16 cores):
#
#   bash tests/gpu_validate.sh kernel    # build; quick dense GPU tests (~250-300 s); the C++
#                                        # tests decode_check and graph_capture (TMA and
#                                        # gathering variants), plain and under memcheck
#                                        # (~20-90 s)
#   bash tests/gpu_validate.sh sparse    # build; the C++ tests decode_sparse_check and
#                                        # graph_capture sparse, plain and under memcheck
#                                        # (~10 s); quick sparse GPU tests (100-150 s on an
#                                        # H100)
#   bash tests/gpu_validate.sh prefill-sparse  # build; the C++ test prefill_sparse_check
#                                              # (forward and backward), plain and under
#                                              # memcheck; quick sparse prefill GPU tests,
#                                              # forward (~25 s on an H100) and gradient
#                                              # (~3 min)
#   bash tests/gpu_validate.sh bench         # build; benchmarks/bench_decode.py and its plot
#                                            # (~230 s)
#   bash tests/gpu_validate.sh bench-sparse  # build; benchmarks/bench_decode_sparse.py and its
#                                            # plot (~60 s on an H100)
#   bash tests/gpu_validate.sh bench-fp8     # build; benchmarks/bench_decode_fp8.py (dense
#                                            # decode over the FP8 caches) and its plot
#   bash tests/gpu_validate.sh bench-prefill-sparse  # build; benchmarks/bench_prefill_sparse.py
#                                                    # and its plot (both directions: ~300 s
#                                                    # on an H100 without the peers)
# The benchmarks time FlashMLA and FA3's MLA mode beside ours when their setup script is found:
# ${JFM_PEERS:-../shared/peers}/setup_peers.sh. Only the repository travels to a GPU machine:
# copy the peers folder into an ignored folder of the checkout (e.g. .peers), carry it and set
# JFM_PEERS=.peers.
#   bash tests/gpu_validate.sh matrix [PAGE]  # build; the full matrix's part of one page size
#                                             # (64, 1, 16 or 256) in parallel shards (~300 s
#                                             # at page 64)
#   bash tests/gpu_validate.sh memcheck           # build; memcheck over the quick tests of
#                                                 # test_gpu_decode_dense.py (~85 s on an H100)
#   bash tests/gpu_validate.sh memcheck-rules     # build; memcheck over the rescale and
#                                                 # input-rule tests (~20 s on an H100)
#   bash tests/gpu_validate.sh memcheck-schedule  # build; memcheck over the schedule tests but
#                                                 # command buffers (~40 s on an H100)
#   bash tests/gpu_validate.sh memcheck-graphs    # build; memcheck over the schedule's
#                                                 # command-buffer test (~35 s on an H100)
#   bash tests/gpu_validate.sh memcheck-sparse    # build; memcheck over the quick tests of
#                                                 # test_gpu_decode_sparse.py (~120 s on an
#                                                 # H100) and test_gpu_decode_fp8_dense.py
#
# Under the sanitizer a dense pytest test takes ~1.3 s on an H100 with its reference on the host
# (tests/gpu_memcheck.sh); split a part over several calls with -k where needed.
# The C++ tests (decode_check and graph_capture in the kernel part, decode_sparse_check in the
# sparse part) cover the kernels' input rules under memcheck in seconds.
# The memcheck parts together cover every quick test but those of test_gpu_command_buffers.py,
# which profile with CUPTI (not under compute-sanitizer); tests/cpp/graph_capture replays the
# kernels from a CUDA graph under memcheck instead. The quick run is stopped after 540 s (a hung
# kernel), leaving its log; so is the quick sparse run.
#
# JAX_FLASHMLA_REQUIRE_GPU=1 is set: GPU tests that cannot run here (no Hopper GPU, no
# compiled extension) stop pytest with an error instead of passing as skipped.
#
# Logs and results go to ${JFM_LOG_DIR:-/tmp/jax_flashmla_logs}: quick_tests.log,
# quick_sparse_tests.log, quick_prefill_sparse_tests.log, NAME.txt and NAME_memcheck.txt for
# each C++ test NAME (decode_check, decode_sparse_check, prefill_sparse_check, graph_capture,
# graph_capture_gather, graph_capture_sparse), decode_dense.{json,txt,png},
# decode_sparse.{json,txt,png}, decode_dense_fp8.{json,txt,png}, prefill_sparse.{json,txt,png},
# the full matrix shard logs, memcheck_{decode,rules,schedule,graphs,sparse}.log. Exit status non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${JFM_LOG_DIR:-/tmp/jax_flashmla_logs}
mkdir -p "$logs"
py=${PYTHON:-python3}
export JAX_FLASHMLA_REQUIRE_GPU=1
status=0
# The quick GPU subset of the dense decode, in this order (the input-rule tests, with the
# largest schedules, last), and of the sparse decode.
QUICK_FILES=(tests/test_gpu_decode_dense.py tests/test_gpu_schedule.py
             tests/test_gpu_decode_rescale.py tests/test_gpu_command_buffers.py
             tests/test_gpu_decode_inputs.py tests/test_gpu_sharding.py)
SPARSE_QUICK_FILES=(tests/test_gpu_decode_sparse.py tests/test_gpu_decode_fp8_dense.py)
PREFILL_SPARSE_QUICK_FILES=(tests/test_gpu_prefill_sparse.py
                            tests/test_gpu_prefill_sparse_grad.py)
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
build_cpp_tests() {  # the C++ tests of tests/cpp, in build/cpp
  local generator=()
  command -v ninja > /dev/null && generator=(-G Ninja)
  cmake -S . -B build/cpp "${generator[@]}" -DPython_EXECUTABLE="$(command -v "$py")" \
    -DCMAKE_BUILD_TYPE=Release -DJAX_FLASHMLA_BUILD_TESTS=ON > "$logs/cpp_build.log" 2>&1 &&
    cmake --build build/cpp -j 16 >> "$logs/cpp_build.log" 2>&1
}
quick_tests() {  # quick_tests LOG FILES...: the quick GPU tests of FILES, logged in LOG
  local log=$logs/$1
  shift
  timeout -k 30 -s INT 540 "$py" -P -m pytest -q -p no:cacheprovider -m "gpu and not full" \
    "$@" > "$log" 2>&1
  local rc=$?
  tail -3 "$log"
  return $rc
}
cpp_tests() {  # cpp_tests BUILD_PID TEST...: waits for build_cpp_tests, runs each TEST
  # (PROGRAM or PROGRAM:ARGUMENT), then each under memcheck, whatever the plain run said
  wait "$1" || { tail -20 "$logs/cpp_build.log"; return 1; }
  shift
  local rc=0 spec name run
  for run in plain memcheck; do
    for spec in "$@"; do
      local command=("build/cpp/${spec%%:*}")
      [[ $spec == *:* ]] && command+=("${spec#*:}")
      name=${spec/:/_}
      # Time limits stop a hung kernel. graph_capture provokes a failing cudaMalloc on
      # purpose: API errors are not reported.
      if [ "$run" = plain ]; then
        timeout -k 10 120 "${command[@]}" > "$logs/$name.txt" 2>&1 || rc=1
        echo "$spec: $(tail -1 "$logs/$name.txt")"
      else
        timeout -k 10 300 compute-sanitizer --tool memcheck --report-api-errors no \
          --error-exitcode 1 "${command[@]}" > "$logs/${name}_memcheck.txt" 2>&1 || rc=1
        echo "$spec under memcheck: $(tail -1 "$logs/${name}_memcheck.txt")"
      fi
    done
  done
  return $rc
}
peers() {  # FlashMLA and FA3's MLA mode for the side-by-side figures, where they are
  local dir=${JFM_PEERS:-../shared/peers}
  if [ -f "$dir/setup_peers.sh" ]; then
    # shellcheck disable=SC1091
    source "$dir/setup_peers.sh" > "$logs/peers.log" 2>&1 || tail -3 "$logs/peers.log"
  else
    echo "no peers at $dir (set JFM_PEERS): the benchmarks run without FlashMLA"
  fi
}
bench() {  # bench SCRIPT RESULT: benchmarks/bench_SCRIPT.py into RESULT.{json,txt}, plotted
  "$py" -P "benchmarks/bench_$1.py" --json "$logs/$2.json" > "$logs/$2.txt" &&
    "$py" -P "benchmarks/plot_$1.py" "$logs/$2.json" &&
    cat "$logs/$2.txt"
}
memcheck() {  # memcheck NAME SELECTION FILES...: pytest -k SELECTION, log in $logs/memcheck_NAME.log
  local name=$1 selection=$2
  shift 2
  LOG="$logs/memcheck_$name.log" bash tests/gpu_memcheck.sh -vv -k "$selection" "$@" > /dev/null
  local rc=$?
  tail -2 "$logs/memcheck_$name.log"
  return $rc
}
case "${1:-}" in
  kernel)
    build_cpp_tests &
    cpp_build=$!
    step build build
    step "quick GPU tests" quick_tests quick_tests.log "${QUICK_FILES[@]}"
    step "C++ tests + memcheck" cpp_tests "$cpp_build" decode_check graph_capture \
      graph_capture:gather ;;
  sparse)
    build_cpp_tests &
    cpp_build=$!
    step build build
    step "C++ sparse tests + memcheck" cpp_tests "$cpp_build" decode_sparse_check \
      graph_capture:sparse
    step "quick sparse GPU tests" quick_tests quick_sparse_tests.log "${SPARSE_QUICK_FILES[@]}" ;;
  prefill-sparse)
    build_cpp_tests &
    cpp_build=$!
    step build build
    step "C++ sparse prefill test + memcheck" cpp_tests "$cpp_build" prefill_sparse_check
    step "quick sparse prefill GPU tests" quick_tests quick_prefill_sparse_tests.log \
      "${PREFILL_SPARSE_QUICK_FILES[@]}" ;;
  bench)
    step build build
    peers
    step "bench, dense decode" bench decode decode_dense ;;
  bench-sparse)
    step build build
    peers
    step "bench, sparse decode" bench decode_sparse decode_sparse ;;
  bench-fp8)
    step build build
    peers
    step "bench, dense decode over FP8 caches" bench decode_fp8 decode_dense_fp8 ;;
  bench-prefill-sparse)
    step build build
    peers
    step "bench, sparse prefill" bench prefill_sparse prefill_sparse ;;
  matrix)
    step build build
    step "full matrix, small batches, page ${2:-64}" env LOG_DIR="$logs/full_small_${2:-64}" \
      bash tests/gpu_full_matrix.sh small "${2:-64}"
    step "full matrix, b 64, page ${2:-64}" env LOG_DIR="$logs/full_b64_${2:-64}" \
      bash tests/gpu_full_matrix.sh b64 "${2:-64}" ;;
  memcheck)
    step build build
    step "memcheck, quick decode tests" memcheck decode quick tests/test_gpu_decode_dense.py ;;
  memcheck-rules)
    step build build
    step "memcheck, rescale and input-rule tests" memcheck rules quick \
      tests/test_gpu_decode_rescale.py tests/test_gpu_decode_inputs.py ;;
  memcheck-schedule)
    step build build
    step "memcheck, schedule tests" memcheck schedule "not command_buffers" \
      tests/test_gpu_schedule.py ;;
  memcheck-graphs)
    step build build
    step "memcheck, command-buffer test" memcheck graphs command_buffers \
      tests/test_gpu_schedule.py ;;
  memcheck-sparse)
    step build build
    step "memcheck, quick sparse decode tests" memcheck sparse quick \
      tests/test_gpu_decode_sparse.py tests/test_gpu_decode_fp8_dense.py ;;
  *) echo "usage: $0 kernel|sparse|prefill-sparse|bench|bench-sparse|bench-fp8|bench-prefill-sparse|matrix|memcheck|memcheck-rules|memcheck-schedule|memcheck-graphs|memcheck-sparse" >&2
     exit 2 ;;
esac
exit $status
