"""Sparse (top-k) MLA prefill over a BF16 KV array (the Hopper kernel), and the launch limits of
both directions' kernels (the backward's family: prefill_sparse_backward.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_flashmla._src.geometry import HEAD_DIM_V, INT32_MAX, QUERY_TILE_ROWS
from jax_flashmla._src.primitive import KernelPrimitive
from jax_flashmla.reference import sparse_prefill


class SparsePrefillKernel(KernelPrimitive):
    """(q, kv, indices, attn_sink, topk_length) -> (out, max_logits, lse).

    An absent optional operand is a zero-sized array (`sink_placeholder`,
    `lengths_placeholder`): attn_sink and topk_length of length 0.
    """

    name = "jax_flashmla_prefill_sparse"
    ffi_target = "jax_flashmla_prefill_sparse_sm90"

    def abstract(self, q, kv, indices, attn_sink, topk_length, *, sm_scale):
        s_q, h_q, _ = q.shape
        return (
            jax.core.ShapedArray((s_q, h_q, HEAD_DIM_V), jnp.bfloat16),
            jax.core.ShapedArray((s_q, h_q), jnp.float32),
            jax.core.ShapedArray((s_q, h_q), jnp.float32),
        )

    def reference(self, q, kv, indices, attn_sink, topk_length, *, sm_scale):
        def given(x):
            return x if x.shape[0] else None

        return sparse_prefill.sparse_prefill(
            q,
            kv,
            indices,
            sm_scale,
            d_v=HEAD_DIM_V,
            attn_sink=given(attn_sink),
            topk_length=given(topk_length),
        )

    def ffi_attributes(self, *, sm_scale):
        return {"softmax_scale": np.float32(sm_scale)}


prefill_sparse = SparsePrefillKernel()


def sink_placeholder(attn_sink: jax.Array | None) -> jax.Array:
    """attn_sink as the kernels take it: float32[0] when absent."""
    return jnp.zeros((0,), jnp.float32) if attn_sink is None else attn_sink


def lengths_placeholder(topk_length: jax.Array | None) -> jax.Array:
    """topk_length as the kernels take it: int32[0] when absent."""
    return jnp.zeros((0,), jnp.int32) if topk_length is None else topk_length


def launch_limit_error(*, s_q: int, h_q: int, topk: int) -> str:
    """Which of the kernel's run-time limits these sizes break ("" when none)."""
    head_tiles = -(-h_q // QUERY_TILE_ROWS)
    limits = (
        (
            topk >= 64 and topk % 64 == 0,
            f"topk must be a positive multiple of 64; got {topk}",
        ),
        (
            s_q * head_tiles <= INT32_MAX,
            f"s_q * ceil(h_q / {QUERY_TILE_ROWS}) (the kernels' work items: a query token and "
            f"{QUERY_TILE_ROWS} of its heads each) must be <= 2**31 - 1; "
            f"got {s_q * head_tiles} for s_q {s_q}, h_q {h_q}",
        ),
    )
    return next((message for ok, message in limits if not ok), "")
