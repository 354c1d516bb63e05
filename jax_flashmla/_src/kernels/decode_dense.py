"""Dense MLA decode over a paged BF16/FP16 cache (the Hopper kernel), and its launch limits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_flashmla._src.geometry import HEAD_DIM_V, INT32_MAX, QUERY_TILE_ROWS
from jax_flashmla._src.primitive import KernelPrimitive
from jax_flashmla.reference import decode

#: CUDA's limit on the y and z grid dimensions (KV heads, query tiles).
GRID_YZ_MAX = 65535


class DenseDecodeKernel(KernelPrimitive):
    """(q, k_cache, block_table, cache_seqlens, metadata, num_splits) -> (out, lse) and the
    split-KV workspace (partial_o, partial_lse) of b + num_parts rows."""

    name = "jax_flashmla_decode_dense"
    ffi_target = "jax_flashmla_decode_dense_sm90"
    workspace_results = 2

    def abstract(
        self, q, k_cache, block_table, cache_seqlens, metadata, num_splits, *, softmax_scale, causal
    ):
        b, s_q, h_q, _ = q.shape
        rows = b + metadata.shape[0]
        return (
            jax.core.ShapedArray((b, s_q, h_q, HEAD_DIM_V), q.dtype),
            jax.core.ShapedArray((b, h_q, s_q), jnp.float32),
            jax.core.ShapedArray((rows, s_q, h_q, HEAD_DIM_V), jnp.float32),
            jax.core.ShapedArray((rows, s_q, h_q), jnp.float32),
        )

    def reference(
        self, q, k_cache, block_table, cache_seqlens, metadata, num_splits, *, softmax_scale, causal
    ):
        # The schedule (None when the caller gave none) only distributes the kernel's work.
        return decode.dense_decode(
            q,
            k_cache,
            block_table,
            cache_seqlens,
            head_dim_v=HEAD_DIM_V,
            softmax_scale=softmax_scale,
            causal=causal,
        )

    def ffi_attributes(self, *, softmax_scale, causal):
        return {"softmax_scale": np.float32(softmax_scale), "causal": bool(causal)}


decode_dense = DenseDecodeKernel()


def query_tiles(s_q: int, h_q: int, h_kv: int) -> int:
    """CTAs per request and KV head: tiles of QUERY_TILE_ROWS query rows, each holding whole
    query tokens of one head group, or one token's slice of a group wider than a tile."""
    group = h_q // h_kv
    if group >= QUERY_TILE_ROWS:
        return s_q * -(-group // QUERY_TILE_ROWS)
    tokens_per_tile = min(s_q, QUERY_TILE_ROWS // group)
    return -(-s_q // tokens_per_tile)


def launch_limit_error(
    *, batch: int, s_q: int, h_q: int, h_kv: int, num_blocks: int, page: int, num_parts: int
) -> str:
    """Which of the kernel's run-time limits these sizes break ("" when none)."""
    tiles = query_tiles(s_q, h_q, h_kv)
    limits = (
        (h_kv <= GRID_YZ_MAX, f"h_kv must be <= {GRID_YZ_MAX} (grid y); got {h_kv}"),
        (
            tiles <= GRID_YZ_MAX,
            f"query tiles per KV head must be <= {GRID_YZ_MAX} (grid z); got {tiles} for "
            f"s_q {s_q}, h_q {h_q}, h_kv {h_kv}",
        ),
        (
            batch * s_q <= INT32_MAX,
            f"batch * s_q must be <= 2**31 - 1; got {batch} * {s_q} = {batch * s_q}",
        ),
        (
            num_blocks * page <= INT32_MAX,
            f"num_blocks * page_block_size must be <= 2**31 - 1; got {num_blocks} * {page}",
        ),
        (
            batch + num_parts <= INT32_MAX,
            f"batch + num_sm_parts must be <= 2**31 - 1; got {batch} + {num_parts}",
        ),
    )
    return next((message for ok, message in limits if not ok), "")
