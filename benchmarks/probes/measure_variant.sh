#!/usr/bin/env bash
# Measures staged variants of a sparse kernel on a Hopper GPU in one go, the main question
# first, so that a run cut short still answers it: for each variant, builds the package from
# the tree with its patches applied (and the op's C++ check beside it, in parallel), times
# CONFIGS with the op's benchmark beside FlashMLA (its err column compares the two outputs),
# runs the C++ check plainly and under memcheck, then the op's quick GPU tests, and takes the
# patches out again.
#
#   PATCHES="benchmarks/probes/variants/sparse_rolling_loader.patch" JFM_PEERS=.peers \
#       bash benchmarks/probes/measure_variant.sh decode V32,128,16,2048 V32,64,128,2048
#   PATCHES="benchmarks/probes/variants/prefill_index_prefetch.patch" \
#       bash benchmarks/probes/measure_variant.sh prefill 512,64,512,8192
#   PATCHES="a.patch; a.patch b.patch" BASELINE=1 MEMCHECK=0 QUICK=0 \
#       bash benchmarks/probes/measure_variant.sh decode V32,128,16,2048
#
# OP: decode (decode_sparse_check, bench_decode_sparse.py, CONFIGS as LAYOUT,B,H_Q,TOPK),
# prefill (prefill_sparse_check, bench_prefill_sparse.py forward only, D_QK,H_Q,TOPK,S_KV) or
# prefill-backward (the same check, the backward's benchmark and quick gradient tests, ~3 min).
# PATCHES: variants separated by ";", each a list of patches against csrc/ (paths
# a/kernels/...) applied in order to the working tree and taken back out after it; empty
# measures the tree as it is. BASELINE=1 first times the CONFIGS on the tree without them
# (into the same log), for ratios within one run. MEMCHECK=0 skips the runs under
# compute-sanitizer (~1-4 min each). EXTRA_BENCH: another benchmark and its arguments, run
# after each variant's and the baseline's (e.g. "benchmarks/bench_decode_fp8.py --only
# 128,1,16,16384,0"). QUICK=0 skips the quick tests (100-150 s on an H100 for
# decode, ~25 s for prefill, ~3 min for its gradient). Logs go to
# ${JFM_LOG_DIR:-/tmp/jax_flashmla_logs}. Exit status non-zero if a step failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
logs=${JFM_LOG_DIR:-/tmp/jax_flashmla_logs}
mkdir -p "$logs"
py=${PYTHON:-python3}
export JAX_FLASHMLA_REQUIRE_GPU=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
case "${1:-}" in
  decode)
    check=decode_sparse_check bench=(benchmarks/bench_decode_sparse.py)
    quick=(tests/test_gpu_decode_sparse.py tests/test_gpu_decode_fp8_dense.py) ;;
  prefill)
    check=prefill_sparse_check bench=(benchmarks/bench_prefill_sparse.py --directions fwd)
    quick=(tests/test_gpu_prefill_sparse.py) ;;
  prefill-backward)
    check=prefill_sparse_check bench=(benchmarks/bench_prefill_sparse.py --directions bwd)
    quick=(tests/test_gpu_prefill_sparse_grad.py) ;;
  *) echo "usage: [PATCHES=...] $0 decode|prefill|prefill-backward CONFIG..."; exit 2 ;;
esac
shift
status=0
t0=$SECONDS
elapsed() { echo "== $1: $((SECONDS - t0)) s"; }

install_package() {  # the package from the tree as it is now
  CMAKE_BUILD_PARALLEL_LEVEL=16 "$py" -m pip install -q --no-build-isolation --no-deps . \
    > "$logs/build.log" 2>&1 || { tail -30 "$logs/build.log"; exit 1; }
}
only=()
for config in "$@"; do only+=(--only "$config"); done
bench_configs() {  # bench_configs LABEL [--json FILE]: times CONFIGS, appends to variant_bench.txt
  [ ${#only[@]} -gt 0 ] || return 0
  echo "# $1" >> "$logs/variant_bench.txt"
  timeout 300 "$py" -P "${bench[@]}" "${only[@]}" --runs 5 "${@:2}" \
    >> "$logs/variant_bench.txt" 2>&1 || status=1
  grep -v Warning "$logs/variant_bench.txt" | tail -$((${#only[@]} + 2))
  elapsed "bench ($1)"
}
extra_bench() {  # extra_bench LABEL TAG: EXTRA_BENCH, if given
  [ -n "${EXTRA_BENCH:-}" ] || return 0
  # shellcheck disable=SC2086
  timeout 300 "$py" -P $EXTRA_BENCH --runs 5 > "$logs/$2_extra_bench.txt" 2>&1 || status=1
  grep -v Warning "$logs/$2_extra_bench.txt" | tail -6
  elapsed "extra bench ($1)"
}

"$py" -m pip install -q --no-index --no-deps .whl/*.whl 2> /dev/null || true  # CUTLASS wheel
peers=${JFM_PEERS:-../shared/peers}/setup_peers.sh
# shellcheck disable=SC1090
[ -f "$peers" ] && source "$peers" > "$logs/peers.log" 2>&1
: > "$logs/variant_bench.txt"
if [ "${BASELINE:-0}" != 0 ]; then
  install_package
  bench_configs "the tree without PATCHES"
  extra_bench "the tree without PATCHES" baseline
fi

applied=()
unapply() {
  local i
  for ((i = ${#applied[@]} - 1; i >= 0; i--)); do
    patch -s -R -d csrc -p1 < "${applied[i]}"
  done
  applied=()
}
trap unapply EXIT

generator=()
command -v ninja > /dev/null && generator=(-G Ninja)
cmake -S . -B build/cpp "${generator[@]}" -DPython_EXECUTABLE="$(command -v "$py")" \
  -DCMAKE_BUILD_TYPE=Release -DJAX_FLASHMLA_BUILD_TESTS=ON > "$logs/cpp_build.log" 2>&1 ||
  { tail -20 "$logs/cpp_build.log"; exit 1; }

measure() {  # measure LABEL: the tree as it is now, built, timed and checked
  local label=$1 tag=${2:-variant}
  cmake --build build/cpp -j 16 --target "$check" >> "$logs/cpp_build.log" 2>&1 &
  local cpp_build=$!
  install_package
  elapsed "build ($label)"
  bench_configs "$label" --json "$logs/${tag}_bench.json"
  extra_bench "$label" "$tag"
  wait "$cpp_build" || { tail -20 "$logs/cpp_build.log"; status=1; return; }
  timeout -k 10 120 "build/cpp/$check" > "$logs/${check}_$tag.txt" 2>&1 || status=1
  echo "$check ($label): $(tail -1 "$logs/${check}_$tag.txt")"
  if [ "${MEMCHECK:-1}" != 0 ]; then
    timeout -k 10 300 compute-sanitizer --tool memcheck --error-exitcode 1 "build/cpp/$check" \
      > "$logs/${check}_${tag}_memcheck.txt" 2>&1 || status=1
    echo "$check under memcheck ($label): $(tail -1 "$logs/${check}_${tag}_memcheck.txt")"
  fi
  elapsed "checks ($label)"
  if [ "${QUICK:-1}" != 0 ]; then
    timeout -k 30 -s INT 300 "$py" -P -m pytest -q -p no:cacheprovider -m "gpu and not full" \
      "${quick[@]}" > "$logs/quick_tests_$tag.log" 2>&1 || status=1
    tail -3 "$logs/quick_tests_$tag.log"
    elapsed "quick tests ($label)"
  fi
}

IFS=';' read -r -d '' -a variants <<< "${PATCHES:-}" || true  # newlines allowed
[ ${#variants[@]} -gt 0 ] || variants=("")
n=0
for variant in "${variants[@]}"; do
  n=$((n + 1))
  for patch_file in $variant; do
    patch -s -d csrc -p1 < "$patch_file" || { echo "$patch_file does not apply to csrc/"; exit 1; }
    applied+=("$patch_file")
  done
  label="PATCHES: $(echo $variant)"
  [ -n "$(echo $variant)" ] || label="the tree"
  measure "$label" "variant$n"
  unapply
done
exit $status
