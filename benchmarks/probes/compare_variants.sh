#!/usr/bin/env bash
# Compares dense-decode kernel variants on the H200 in one device call: builds
# decode_cycles.cu (with the span probe) against each variant's copy of csrc/, and
# decode_check.cu against the variants to verify, then runs the checks and, config by config,
# every variant one after the other (interleaved, so that clock drift hits all alike).
#
#   VARIANTS="csrc scratch/v2" CHECKS="scratch/v2" CONFIGS="128,1,128,4096,0 128,2,128,4096,1" \
#       bash benchmarks/probes/compare_variants.sh
#
# A variant is a patch against csrc/ (paths a/kernels/..., b/kernels/...; e.g.
# benchmarks/probes/variants/name.patch), applied to a copy of csrc/, or a directory laid out
# like csrc/ holding only the files it changes, laid over a copy. Scratch variants should stay
# untracked but not ignored, so that the device tool carries them. CONFIGS entries are
# decode_cycles.cu's arguments (b, s_q, h_q, s_k, causal) joined by commas.
#
# TRACE="csrc scratch/v2" (optional) also builds decode_cycles.cu with -DJFM_KERNEL_TRACE against
# those variants and, for each TRACE_CONFIGS entry (default: the first of CONFIGS), writes the
# event trace of one launch to $TRACE_DIR (default /tmp) and prints trace_summary.py's summary.
#
# NCU_CONFIGS="128,2,128,16384,0" (optional): for each entry and each of VARIANTS, one launch
# under ncu (--clock-control none): DRAM bytes read and the kernel's time. The H200 runs these
# kernels at its power cap, so bytes that need not move cost time too.
set -uo pipefail
cd "$(dirname "$0")/../.."
cutlass=$(python3 -c "import cutlass_library, os; print(os.path.dirname(cutlass_library.__file__))")/source
flags=(-std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -I"$cutlass/include")
name() { echo "$1" | tr '/' '_'; }
# The include root of a variant: csrc itself, or a copy of csrc with the variant laid over it
# (made once, before any build reads it).
root() { if [ "$1" = csrc ]; then echo csrc; else echo "/tmp/variant_$(name "$1")"; fi; }
for v in $(printf '%s\n' ${VARIANTS:-} ${CHECKS:-} ${TRACE:-} | sort -u); do
  [ "$v" = csrc ] && continue
  rm -rf "$(root "$v")" && cp -r csrc "$(root "$v")" || exit 1
  if [ -d "$v" ]; then
    cp -r "$v"/. "$(root "$v")"/
  else
    patch -s -d "$(root "$v")" -p1 < "$v" || { echo "patch $v does not apply to csrc/"; exit 1; }
  fi
done

for v in ${VARIANTS:-}; do
  r=$(root "$v")
  nvcc "${flags[@]}" -I"$r" -DJFM_KERNEL_SPAN -o "/tmp/cycles_$(name "$v")" \
    benchmarks/probes/decode_cycles.cu "$r/kernels/common/scheduler.cu" "$r/kernels/common/combine.cu" &
done
for v in ${CHECKS:-}; do
  r=$(root "$v")
  nvcc "${flags[@]}" -I"$r" -o "/tmp/check_$(name "$v")" \
    benchmarks/probes/decode_check.cu "$r/kernels/common/scheduler.cu" "$r/kernels/common/combine.cu" &
done
for v in ${TRACE:-}; do
  r=$(root "$v")
  nvcc "${flags[@]}" -I"$r" -DJFM_KERNEL_SPAN -DJFM_KERNEL_TRACE -o "/tmp/trace_$(name "$v")" \
    benchmarks/probes/decode_cycles.cu "$r/kernels/common/scheduler.cu" "$r/kernels/common/combine.cu" &
done
wait

status=0
for v in ${CHECKS:-}; do
  echo "== check $v"
  timeout 120 "/tmp/check_$(name "$v")" > "/tmp/check_$(name "$v").txt" 2>&1 || status=1
  grep -v "^PASS" "/tmp/check_$(name "$v").txt" | tail -8
done
for config in ${CONFIGS:-}; do
  for v in ${VARIANTS:-}; do
    echo "== $v ${config//,/ }"
    timeout 60 "/tmp/cycles_$(name "$v")" ${config//,/ } | grep -v "^b "
  done
done
configs=(${CONFIGS:-})
for config in ${TRACE_CONFIGS:-${configs[0]:-}}; do
  for v in ${TRACE:-}; do
    out="${TRACE_DIR:-/tmp}/trace_$(name "$v")_${config//,/_}.txt"
    echo "== trace $v ${config//,/ } -> $out"
    JFM_TRACE_OUT="$out" timeout 60 "/tmp/trace_$(name "$v")" ${config//,/ } | grep "CTA 0"
    [ -f "$out" ] && python3 benchmarks/probes/trace_summary.py "$out"
  done
done
for config in ${NCU_CONFIGS:-}; do
  for v in ${VARIANTS:-}; do
    echo "== ncu $v ${config//,/ }"
    ncu --clock-control none -k regex:dense_decode --launch-skip 40 --launch-count 1 \
      --metrics dram__bytes_read.sum,gpu__time_duration.sum "/tmp/cycles_$(name "$v")" \
      ${config//,/ } 2>&1 | grep -E "dram__|gpu__"
  done
done
exit $status
