#!/usr/bin/env bash
# Runs the full GPU test matrix of the dense decode (JAX_FLASHMLA_FULL=1) on one GPU as
# parallel pytest shards, each with its own compilation cache: the shards' compilations use
# the host's cores while the other shards run on the GPU. The matrix has one part per page
# size (64, 1, 16, 256); run each part by itself. Measured on the H200 (16 cores) at page 64:
# the first three shards together 113 s, the b = 64 shards together 132 s.
#
#   bash tests/gpu_full_matrix.sh small [PAGE]  # b in {1, 2, 6} (1704 cases), and at page 64
#                                               # the other full tests (30)
#   bash tests/gpu_full_matrix.sh b64 [PAGE]    # b = 64, one shard per s_q (565 cases)
#
# Logs go to $LOG_DIR (default /tmp/jax_flashmla_full); the exit status is non-zero if any
# shard failed. Requires the package installed with its CUDA extension:
# JAX_FLASHMLA_REQUIRE_GPU=1 makes the shards fail, not skip, where the kernels cannot run.
set -uo pipefail
cd "$(dirname "$0")/.."
log_dir=${LOG_DIR:-/tmp/jax_flashmla_full}
mkdir -p "$log_dir"
page=${2:-64}
case "$page" in
  64) of_page="not page" ;;  # the case ids name every page but 64: -page001, -page016, ...
  1|16|256) of_page=$(printf "page%03d" "$page") ;;
  *) echo "usage: $0 small|b64 [64|1|16|256]" >&2; exit 2 ;;
esac
case "${1:-}" in
  small) shards=("test_full_matrix and ([b1- or [b2-) and $of_page"
                 "test_full_matrix and [b6- and $of_page")
         [ "$page" = 64 ] && shards+=("not test_full_matrix") ;;
  b64) shards=("test_full_matrix and [b64-sq1 and $of_page"
               "test_full_matrix and [b64-sq2 and $of_page"
               "test_full_matrix and [b64-sq4 and $of_page") ;;
  *) echo "usage: $0 small|b64 [64|1|16|256]" >&2; exit 2 ;;
esac
export JAX_FLASHMLA_REQUIRE_GPU=1 JAX_FLASHMLA_FULL=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # the shards share the GPU
pids=()
for i in "${!shards[@]}"; do
  JAX_COMPILATION_CACHE_DIR="/tmp/jax_flashmla_cache_$i" "${PYTHON:-python3}" -P -m pytest -q \
    -p no:cacheprovider -rf -m "gpu and full" tests/test_gpu_decode_dense.py \
    -k "${shards[$i]}" > "$log_dir/shard_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || status=1
  echo "== ${shards[$i]}: $(tail -1 "$log_dir/shard_$i.log")"
done
exit $status
