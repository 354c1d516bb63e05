"""Sparse (top-k) MLA prefill over a BF16 KV array. The kernel is not built yet."""

from __future__ import annotations

from jax_flashmla._src.geometry import HEAD_DIM_V
from jax_flashmla._src.primitive import KernelPrimitive
from jax_flashmla.reference import sparse_prefill


class SparsePrefillKernel(KernelPrimitive):
    """(q, kv, indices, attn_sink, topk_length) -> (out, max_logits, lse); an absent optional
    operand is None."""

    name = "jax_flashmla_prefill_sparse"
    ffi_target = None

    def reference(self, q, kv, indices, attn_sink, topk_length, *, sm_scale):
        return sparse_prefill.sparse_prefill(
            q, kv, indices, sm_scale, d_v=HEAD_DIM_V, attn_sink=attn_sink, topk_length=topk_length
        )


prefill_sparse = SparsePrefillKernel()
