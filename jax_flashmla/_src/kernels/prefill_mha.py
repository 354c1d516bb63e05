"""Dense MHA prefill over variable-length sequences, forward (the backward differentiates the
reference). The kernel is not built yet."""

from __future__ import annotations

from jax_flashmla._src.primitive import KernelPrimitive
from jax_flashmla.reference import mha


class MhaPrefillKernel(KernelPrimitive):
    """(q, k, v, cu_seqlens_q, cu_seqlens_k) -> (out, lse)."""

    name = "jax_flashmla_prefill_mha"
    ffi_target = None

    def reference(self, q, k, v, cu_q, cu_k, *, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
        return mha.mha_varlen(
            q,
            k,
            v,
            cu_q,
            cu_k,
            max_seqlen_q,
            max_seqlen_k,
            softmax_scale=softmax_scale,
            causal=causal,
        )


prefill_mha = MhaPrefillKernel()
