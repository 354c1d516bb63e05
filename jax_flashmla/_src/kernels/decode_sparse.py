"""Sparse (top-k) MLA decode over an FP8 cache. The kernel is not built yet."""

from __future__ import annotations

import jax.numpy as jnp

from jax_flashmla._src.geometry import HEAD_DIM_V
from jax_flashmla._src.primitive import KernelPrimitive
from jax_flashmla.ops import quant
from jax_flashmla.reference import decode


class SparseDecodeKernel(KernelPrimitive):
    """(q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices,
    extra_topk_length) -> (out, lse). The caches are FP8 in `layout`; an absent optional
    operand is None."""

    name = "jax_flashmla_decode_sparse"
    ffi_target = None

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
        *,
        softmax_scale,
        layout,
    ):
        def dequantised(cache):
            if cache is None:
                return None
            return quant.dequantize_k_cache(cache, layout=layout, dtype=jnp.bfloat16)

        return decode.sparse_decode(
            q,
            dequantised(k_cache),
            indices,
            topk_length=topk_length,
            attn_sink=attn_sink,
            extra_k_cache=dequantised(extra_k_cache),
            extra_indices=extra_indices,
            extra_topk_length=extra_topk_length,
            softmax_scale=softmax_scale,
            head_dim_v=HEAD_DIM_V,
        )


decode_sparse = SparseDecodeKernel()
