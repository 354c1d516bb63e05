"""Sparse (top-k) MLA decode over FP8 caches (the Hopper kernel), and its launch limits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_flashmla._src.geometry import HEAD_DIM_V, INT32_MAX, QUERY_TILE_ROWS
from jax_flashmla._src.primitive import KernelPrimitive
from jax_flashmla.ops import quant
from jax_flashmla.reference import decode

#: CUDA's limit on the y and z grid dimensions (query tokens, head tiles).
GRID_YZ_MAX = 65535


class SparseDecodeKernel(KernelPrimitive):
    """(q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices,
    extra_topk_length, k_scale, metadata, num_splits) -> (out, lse) and the split-KV workspace
    (partial_o, partial_lse) of b + num_parts rows.

    The caches are FP8 in `layout` ("V32", "MODEL1", or "E4M3" with its scale k_scale
    float32 [1]). An absent optional operand is a zero-sized array (see `with_placeholders`):
    topk_length, attn_sink, extra_topk_length and k_scale of length 0, and extra_indices with
    extra_topk 0 (extra_k_cache is then ignored). metadata and num_splits may be None on the
    reference path.
    """

    name = "jax_flashmla_decode_sparse"
    ffi_target = "jax_flashmla_decode_sparse_sm90"
    workspace_results = 2

    def abstract(
        self,
        q,
        k_cache,
        indices,
        topk_length,
        attn_sink,
        extra_k_cache,
        extra_indices,
        extra_topk_length,
        k_scale,
        metadata,
        num_splits,
        *,
        softmax_scale,
        layout,
    ):
        b, s_q, h_q, _ = q.shape
        rows = b + metadata.shape[0]
        return (
            jax.core.ShapedArray((b, s_q, h_q, HEAD_DIM_V), jnp.bfloat16),
            jax.core.ShapedArray((b, h_q, s_q), jnp.float32),
            jax.core.ShapedArray((rows, s_q, h_q, HEAD_DIM_V), jnp.float32),
            jax.core.ShapedArray((rows, s_q, h_q), jnp.float32),
        )

    def reference(
        self,
        q,
        k_cache,
        indices,
        topk_length,
        attn_sink,
        extra_k_cache,
        extra_indices,
        extra_topk_length,
        k_scale,
        metadata,
        num_splits,
        *,
        softmax_scale,
        layout,
    ):
        # The schedule (None when the caller gave none) only distributes the kernel's work.
        def given(x):
            return x if x.shape[0] else None

        has_extra = extra_indices.shape[2] > 0

        def dequantised(cache):
            if layout == quant.SCALED_LAYOUT:
                return quant.dequantize_k_cache_e4m3(cache, k_scale, dtype=jnp.bfloat16)
            return quant.dequantize_k_cache(cache, layout=layout, dtype=jnp.bfloat16)

        return decode.sparse_decode(
            q,
            dequantised(k_cache),
            indices,
            topk_length=given(topk_length),
            attn_sink=given(attn_sink),
            extra_k_cache=dequantised(extra_k_cache) if has_extra else None,
            extra_indices=extra_indices if has_extra else None,
            extra_topk_length=given(extra_topk_length) if has_extra else None,
            softmax_scale=softmax_scale,
            head_dim_v=HEAD_DIM_V,
        )

    def ffi_attributes(self, *, softmax_scale, layout):
        return {"softmax_scale": np.float32(softmax_scale)}


decode_sparse = SparseDecodeKernel()


def with_placeholders(
    q,
    k_cache,
    indices,
    topk_length,
    attn_sink,
    extra_k_cache,
    extra_indices,
    extra_topk_length,
    k_scale=None,
) -> tuple[jax.Array, ...]:
    """The family's first nine operands, absent (None) optional ones as zero-sized arrays
    (k_scale, when given, is already float32 [1])."""
    b, s_q = q.shape[:2]

    def empty(dtype):
        return jnp.zeros((0,), dtype)

    if extra_indices is None:
        extra_k_cache = jnp.zeros((0, 1, 1, k_cache.shape[3]), k_cache.dtype)
        extra_indices = jnp.zeros((b, s_q, 0), jnp.int32)
    return (
        q,
        k_cache,
        indices,
        empty(jnp.int32) if topk_length is None else topk_length,
        empty(jnp.float32) if attn_sink is None else attn_sink,
        extra_k_cache,
        extra_indices,
        empty(jnp.int32) if extra_topk_length is None else extra_topk_length,
        empty(jnp.float32) if k_scale is None else k_scale,
    )


def head_tiles(h_q: int) -> int:
    """CTAs per query token: tiles of QUERY_TILE_ROWS heads."""
    return -(-h_q // QUERY_TILE_ROWS)


def launch_limit_error(*, batch: int, s_q: int, h_q: int, num_parts: int) -> str:
    """Which of the kernel's run-time limits these sizes break ("" when none)."""
    limits = (
        (s_q <= GRID_YZ_MAX, f"s_q must be <= {GRID_YZ_MAX} (grid y); got {s_q}"),
        (
            head_tiles(h_q) <= GRID_YZ_MAX,
            f"head tiles (ceil(h_q / {QUERY_TILE_ROWS})) must be <= {GRID_YZ_MAX} (grid z); "
            f"got {head_tiles(h_q)} for h_q {h_q}",
        ),
        (
            batch * s_q <= INT32_MAX,
            f"batch * s_q must be <= 2**31 - 1; got {batch} * {s_q} = {batch * s_q}",
        ),
        (
            batch + num_parts <= INT32_MAX,
            f"batch + num_sm_parts must be <= 2**31 - 1; got {batch} + {num_parts}",
        ),
    )
    return next((message for ok, message in limits if not ok), "")
