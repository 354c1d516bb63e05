"""The gradient of the sparse MLA prefill (the Hopper backward kernel); its launch limits are
the forward's (prefill_sparse.launch_limit_error)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_flashmla._src.primitive import KernelPrimitive
from jax_flashmla.reference import sparse_prefill


class SparsePrefillBackwardKernel(KernelPrimitive):
    """(q, kv, indices, topk_length, d_out, lse, row_shift) -> (dq bf16, dkv float32).

    The gradient in the form `reference.sparse_prefill.sparse_prefill_backward` defines (the
    attention sink and lse's cotangent folded into d_out and row_shift by the op); an absent
    topk_length is int32[0]. dkv stays float32 so that shards can sum it before rounding.
    """

    name = "jax_flashmla_prefill_sparse_backward"
    ffi_target = "jax_flashmla_prefill_sparse_backward_sm90"

    def abstract(self, q, kv, indices, topk_length, d_out, lse, row_shift, *, sm_scale):
        return (
            jax.core.ShapedArray(q.shape, jnp.bfloat16),
            jax.core.ShapedArray(kv.shape, jnp.float32),
        )

    def reference(self, q, kv, indices, topk_length, d_out, lse, row_shift, *, sm_scale):
        dq, dkv = sparse_prefill.sparse_prefill_backward(
            q,
            kv,
            indices,
            d_out,
            lse,
            row_shift,
            sm_scale,
            topk_length=topk_length if topk_length.shape[0] else None,
        )
        return dq.astype(jnp.bfloat16), dkv

    def ffi_attributes(self, *, sm_scale):
        return {"softmax_scale": np.float32(sm_scale)}


prefill_sparse_backward = SparsePrefillBackwardKernel()
