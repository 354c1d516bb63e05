#!/usr/bin/env bash
# Compares dense-decode kernel variants on a Hopper GPU: builds the decode_cycles probe and the
# decode_check test for each variant with the project's CMake targets (the one set of flags),
# runs the checks, then, configuration by configuration, every variant one after the other
# (interleaved, so that clock drift hits all alike).
#
#   VARIANTS="csrc benchmarks/probes/variants/v2.patch" CHECKS="benchmarks/probes/variants/v2.patch" \
#       CONFIGS="128,1,128,4096,0 128,2,128,4096,1" bash benchmarks/probes/compare_variants.sh
#
# A variant is `csrc` (the tree as it is), a patch against csrc/ (paths a/kernels/...,
# b/kernels/...), applied to a copy of the repository, or a directory laid out like csrc/
# holding only the files it changes, laid over a copy. CONFIGS entries are decode_cycles'
# arguments (b, s_q, h_q, s_k, causal[, page]) joined by commas.
#
# EXTRA_CHECKS="decode_sparse_check" (optional): further C++ tests of tests/cpp, built and run
# for each of CHECKS after decode_check (for a variant of code the decode kernels share, such as
# the combine).
#
# NCU_CONFIGS="128,2,128,16384,0" (optional): for each entry and each of VARIANTS, one launch
# under ncu (--clock-control none): DRAM bytes read and the kernel's time. The H200 runs these
# kernels at its power cap, so bytes that need not move cost time too.
set -uo pipefail
cd "$(dirname "$0")/../.."
name() { echo "$1" | tr '/.' '__'; }
build() {  # build <variant> <targets...>: prints the build directory
  local v=$1; shift
  local src=. dir="build/variant_$(name "$v")"
  if [ "$v" != csrc ]; then
    src="/tmp/variant_src_$(name "$v")"
    rm -rf "$src" && mkdir -p "$src" &&
      git ls-files -z |  # the tracked files that exist (a deletion may not be committed yet)
      xargs -0 -n 256 sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' _ |
      xargs -0 cp --parents -t "$src" || return 1
    if [ -d "$v" ]; then
      cp -r "$v"/. "$src/csrc/"
    else
      patch -s -d "$src/csrc" -p1 < "$v" || { echo "patch $v does not apply to csrc/" >&2; return 1; }
    fi
    dir="$src/build"
  fi
  cmake -S "$src" -B "$dir" -G Ninja -DPython_EXECUTABLE="$(command -v python3)" \
    -DCMAKE_BUILD_TYPE=Release -DJAX_FLASHMLA_BUILD_TESTS=ON -DJAX_FLASHMLA_BUILD_PROBES=ON \
    > "$dir.configure.log" 2>&1 || { tail -20 "$dir.configure.log" >&2; return 1; }
  ninja -C "$dir" "$@" >&2 || return 1
  echo "$dir"
}

declare -A dirs
status=0
for v in $(printf '%s\n' ${VARIANTS:-} ${CHECKS:-} | sort -u); do
  mkdir -p build
  dirs[$v]=$(build "$v" decode_cycles decode_check ${EXTRA_CHECKS:-}) ||
    { echo "build of $v failed"; exit 1; }
done
for v in ${CHECKS:-}; do
  for test in decode_check ${EXTRA_CHECKS:-}; do
    echo "== check $v ($test)"
    log="/tmp/check_$(name "$v")_$test.txt"
    timeout 300 "${dirs[$v]}/$test" > "$log" 2>&1 || status=1
    grep -v "^PASS" "$log" | tail -8
  done
done
for config in ${CONFIGS:-}; do
  for v in ${VARIANTS:-}; do
    echo "== $v ${config//,/ }"
    timeout 60 "${dirs[$v]}/decode_cycles" ${config//,/ } | grep -v "^b "
  done
done
for config in ${NCU_CONFIGS:-}; do
  for v in ${VARIANTS:-}; do
    echo "== ncu $v ${config//,/ }"
    ncu --clock-control none -k regex:dense_decode --launch-skip 40 --launch-count 1 \
      --metrics dram__bytes_read.sum,gpu__time_duration.sum "${dirs[$v]}/decode_cycles" \
      ${config//,/ } 2>&1 | grep -E "dram__|gpu__"
  done
done
exit $status
