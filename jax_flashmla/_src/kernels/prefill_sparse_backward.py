"""The gradient of the sparse MLA prefill (the Hopper backward kernel); its launch limits are
the forward's (prefill_sparse.launch_limit_error)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_flashmla._src.primitive import KernelPrimitive
from jax_flashmla.reference import sparse_prefill


class SparsePrefillBackwardKernel(KernelPrimitive):
    """(q, kv, indices, topk_length, d_out, lse, row_shift, fixed_scale) -> (dq bf16,
    dkv float32).

    The gradient in the form `reference.sparse_prefill.sparse_prefill_backward` defines (the
    attention sink and lse's cotangent folded into d_out and row_shift by the op); an absent
    topk_length is int32[0]. dkv stays float32 so that shards can sum it before rounding.
    fixed_scale float32[1] has the kernel sum dkv in 64-bit fixed point, bitwise repeatable
    (`fixed_point_scale`; the int64 sums are a hidden workspace result), float32[0] in
    float32.
    """

    name = "jax_flashmla_prefill_sparse_backward"
    ffi_target = "jax_flashmla_prefill_sparse_backward_sm90"
    workspace_results = 1

    def abstract(
        self, q, kv, indices, topk_length, d_out, lse, row_shift, fixed_scale, *, sm_scale
    ):
        # The int64 sums as pairs of uint32 (JAX has no int64 without x64).
        fixed_shape = (*kv.shape, 2) if fixed_scale.shape[0] else (0,)
        return (
            jax.core.ShapedArray(q.shape, jnp.bfloat16),
            jax.core.ShapedArray(kv.shape, jnp.float32),
            jax.core.ShapedArray(fixed_shape, jnp.uint32),
        )

    def reference(
        self, q, kv, indices, topk_length, d_out, lse, row_shift, fixed_scale, *, sm_scale
    ):
        # Deterministic either way (XLA's scatter-add on the CPU sums in a fixed order).
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

#: The fixed-point sums stay within +-2^SUM_BITS (int64: 63 bits and a sign).
SUM_BITS = 61


def fixed_point_scale(
    q: jax.Array,
    kv: jax.Array,
    indices: jax.Array,
    topk_length: jax.Array | None,
    d_out: jax.Array,
    row_shift: jax.Array,
    sm_scale: float,
) -> jax.Array:
    """float32[1]: a power of two 2^F such that every dkv sum of the kernel's, times 2^F, stays
    within +-2^SUM_BITS, from a bound on its addends: a slot adds, per head and dim,
    sm_scale * P (dP + shift) q + P d_out with P <= 1 and |dP| <= |d_out| |v|, so a row's sum is
    at most (times the slots selecting it, the most any row has) h_q * (|sm_scale| (max |d_out|_2
    max |v|_2 + max |shift|) max |q| + max |d_out|). Only rows some counted valid slot selects
    count (the others may hold NaN). 2^F is 1 where the bound is 0 or not finite."""
    s_q, h_q, _ = q.shape
    s_kv = kv.shape[0]
    slots = indices[:, 0, :]
    counts = sparse_prefill.slot_counts(topk_length, s_q, indices.shape[2])
    valid = sparse_prefill.counted_valid_slots(slots, counts, s_kv)
    selections = jnp.zeros((s_kv,), jnp.int32).at[jnp.where(valid, slots, s_kv)].add(1, mode="drop")
    rows = kv[:, 0, :].astype(jnp.float32)
    v_norm = jnp.max(
        jnp.where(selections > 0, jnp.linalg.norm(rows[:, : d_out.shape[2]], axis=1), 0.0),
        initial=0.0,
    )
    d_out = d_out.astype(jnp.float32)
    d_out_norm = jnp.max(jnp.linalg.norm(d_out, axis=2), initial=0.0)
    addend = h_q * (
        abs(sm_scale)
        * (d_out_norm * v_norm + jnp.max(jnp.abs(row_shift), initial=0.0))
        * jnp.max(jnp.abs(q.astype(jnp.float32)), initial=0.0)
        + jnp.max(jnp.abs(d_out), initial=0.0)
    )
    # 2x for the rounding of the bound itself and of P.
    bound = 2.0 * jnp.max(selections, initial=0).astype(jnp.float32) * addend
    usable = jnp.isfinite(bound) & (bound > 0)
    exponent = jnp.floor(SUM_BITS - jnp.log2(jnp.where(usable, bound, 1.0)))
    # ldexp, not exp2: exactly a power of two.
    power = jnp.ldexp(jnp.float32(1.0), jnp.clip(exponent, -126, 126).astype(jnp.int32))
    return jnp.where(usable, power, 1.0).reshape(1)
