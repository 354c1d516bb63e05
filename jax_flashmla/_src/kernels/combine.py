"""The split-KV merge, also run by the decode kernels inside their own custom call."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_flashmla._src.primitive import KernelPrimitive
from jax_flashmla.reference import schedule


class CombineKernel(KernelPrimitive):
    """(partial_o, partial_lse, num_splits, attn_sink) -> (out, lse).

    partial_o f32 [R, s_q, h_q, d_v], partial_lse f32 [R, s_q, h_q], num_splits int32 [b+1],
    attn_sink f32 [h_q] or [0] (no sink); out [b, s_q, h_q, d_v] in `out_dtype`,
    lse f32 [b, h_q, s_q].
    """

    name = "jax_flashmla_combine"
    ffi_target = "jax_flashmla_combine"

    def abstract(self, partial_o, partial_lse, num_splits, attn_sink, *, out_dtype):
        _, s_q, h_q, d_v = partial_o.shape
        b = num_splits.shape[0] - 1
        return (
            jax.core.ShapedArray((b, s_q, h_q, d_v), out_dtype),
            jax.core.ShapedArray((b, h_q, s_q), jnp.float32),
        )

    def reference(self, partial_o, partial_lse, num_splits, attn_sink, *, out_dtype):
        sink = attn_sink if attn_sink.shape[0] else None
        return schedule.combine_splits(
            partial_o, partial_lse, num_splits, sink, out_dtype=out_dtype
        )


combine = CombineKernel()
