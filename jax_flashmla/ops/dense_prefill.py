"""flash_attn_varlen_func and its packed forms: dense MHA prefill with gradients."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_flashmla._src import checks, platform, sharding
from jax_flashmla.reference import mha as reference

OP = "flash_attn_varlen_func"

#: (d_qk, d_v) pairs of the MHA prefill (DeepSeek's 128 + 64 RoPE / 128, and plain 128 / 128).
SUPPORTED_HEAD_DIMS = ((192, 128), (128, 128))


def flash_attn_varlen_func(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cu_seqlens_q: jax.Array,
    cu_seqlens_k: jax.Array,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    implementation: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Variable-length multi-head attention; differentiable with respect to q, k and v.

    Sequence i holds query tokens cu_seqlens_q[i]:cu_seqlens_q[i+1] and key tokens
    cu_seqlens_k[i]:cu_seqlens_k[i+1]; with causal, query j of a sequence of lengths (sq, sk)
    sees key t iff t <= sk - sq + j (bottom-right aligned).

    Args:
      q: bfloat16 [total_q, h, d_qk]; k: bfloat16 [total_k, h_k, d_qk]; v: bfloat16
        [total_k, h_k, d_v]; h % h_k == 0 (GQA); (d_qk, d_v) in {(192, 128), (128, 128)}.
      cu_seqlens_q, cu_seqlens_k: int32 [b + 1], non-decreasing, starting at 0 (lengths may
        be 0).
      max_seqlen_q, max_seqlen_k: static ints, upper bounds of the sequence lengths.
      softmax_scale: static float, default d_qk ** -0.5.
      causal: static bool.
      implementation: None, "cuda" or "xla" (see `flash_mla_with_kvcache`).

    Returns:
      out: bfloat16 [total_q, h, d_v] (0 for a query with no key).
      lse: float32 [total_q, h] (+inf for a query with no key); not differentiated.

    Raises:
      TypeError: wrong dtypes or non-Python static arguments.
      ValueError: wrong ranks or shapes, unsupported head dims, h % h_k != 0, cu_seqlens of
        different lengths, or implementation "cuda" where no kernel can take these inputs.
    """
    checks.check_array(OP, "q", q, ndim=3, dtypes=(jnp.bfloat16,), shape_doc="[total_q, h, d_qk]")
    _, h, d_qk = q.shape
    checks.check_array(
        OP,
        "k",
        k,
        ndim=3,
        dtypes=(jnp.bfloat16,),
        shape=(None, None, d_qk),
        shape_doc=f"[total_k, h_k, {d_qk}]",
    )
    total_k, h_k, _ = k.shape
    checks.check_array(
        OP,
        "v",
        v,
        ndim=3,
        dtypes=(jnp.bfloat16,),
        shape=(total_k, h_k, None),
        shape_doc=f"[{total_k}, {h_k}, d_v]",
    )
    d_v = v.shape[2]
    if (d_qk, d_v) not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"{OP}: (d_qk, d_v) must be one of {SUPPORTED_HEAD_DIMS}; got ({d_qk}, {d_v})"
        )
    if h_k < 1 or h % h_k:
        raise ValueError(f"{OP}: q's heads must be a multiple of k's heads; got {h} and {h_k}")
    checks.check_array(
        OP, "cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=checks.INT32, shape_doc="[batch + 1]"
    )
    checks.check_array(
        OP,
        "cu_seqlens_k",
        cu_seqlens_k,
        ndim=1,
        dtypes=checks.INT32,
        shape=cu_seqlens_q.shape,
        shape_doc=f"[{cu_seqlens_q.shape[0]}]",
    )
    if cu_seqlens_q.shape[0] < 1:
        raise ValueError(f"{OP}: cu_seqlens_q must have at least one entry (batch + 1)")
    max_q = checks.check_int(OP, "max_seqlen_q", max_seqlen_q, minimum=0)
    max_k = checks.check_int(OP, "max_seqlen_k", max_seqlen_k, minimum=0)
    scale = checks.check_scale(OP, "softmax_scale", softmax_scale, d_qk**-0.5)
    causal = checks.check_bool(OP, "causal", causal)
    platform.choose_implementation(OP, implementation, "the MHA prefill kernel is not built yet")
    return _mha(q, k, v, cu_seqlens_q, cu_seqlens_k, (max_q, max_k, scale, causal))


# Heads (k g) = KV heads x query heads per KV head may be sharded; tokens stay whole because a
# variable-length sequence may cross any token boundary.
_MHA_DIMS = ("t (k g) d", "u k d", "u k e", "c", "c")


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _mha(q, k, v, cu_q, cu_k, statics):
    return _mha_forward(q, k, v, cu_q, cu_k, statics)


def _mha_forward(q, k, v, cu_q, cu_k, statics):
    max_q, max_k, scale, causal = statics

    def compute(q, k, v, cu_q, cu_k):
        return reference.mha_varlen(
            q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=causal
        )

    return sharding.partitioned_call(
        OP,
        compute,
        (q, k, v, cu_q, cu_k),
        _MHA_DIMS,
        ("t (k g) e", "t (k g)"),
        shardable=frozenset(sharding.head_factor(k.shape[1])),
        given_sizes={"g": q.shape[1] // k.shape[1]},
    )


def _mha_fwd(q, k, v, cu_q, cu_k, statics):
    return _mha_forward(q, k, v, cu_q, cu_k, statics), (q, k, v, cu_q, cu_k)


def _mha_bwd(statics, residuals, cotangents):
    q, k, v, cu_q, cu_k = residuals
    d_out, _ = cotangents  # lse is not differentiated
    max_q, max_k, scale, causal = statics

    def grads_f32(q, k, v, cu_q, cu_k, d_out):
        # In float32 (the reference computes in it anyway) so that partial sums over sharded
        # heads are rounded to the input dtype once, as in the unsharded call.
        def out_only(q, k, v):
            return reference.mha_varlen(
                q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=causal
            )[0]

        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        return jax.vjp(out_only, *f32)[1](d_out.astype(jnp.float32))

    def grads(q, k, v, cu_q, cu_k, d_out):
        return tuple(
            g.astype(x.dtype)
            for g, x in zip(grads_f32(q, k, v, cu_q, cu_k, d_out), (q, k, v), strict=True)
        )

    def per_shard(factor_axes):
        # Query heads of one KV head split across devices: each holds part of dk and dv.
        group_axes = factor_axes.get("g", ())

        def sharded_grads(q, k, v, cu_q, cu_k, d_out):
            dq, dk, dv = grads_f32(q, k, v, cu_q, cu_k, d_out)
            if group_axes:
                dk, dv = jax.lax.psum(dk, group_axes), jax.lax.psum(dv, group_axes)
            return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)

        return sharded_grads

    dq, dk, dv = sharding.partitioned_call(
        OP,
        grads,
        (q, k, v, cu_q, cu_k, d_out),
        (*_MHA_DIMS, "t (k g) e"),
        ("t (k g) d", "u k d", "u k e"),
        shardable=frozenset(sharding.head_factor(k.shape[1])),
        given_sizes={"g": q.shape[1] // k.shape[1]},
        local_fn=per_shard,
    )
    return dq, dk, dv, None, None


_mha.defvjp(_mha_fwd, _mha_bwd)


def flash_attn_varlen_qkvpacked_func(
    qkv: jax.Array,
    cu_seqlens: jax.Array,
    max_seqlen: int,
    head_dim_qk: int,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    implementation: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`flash_attn_varlen_func` on qkv [total, h, 2 * head_dim_qk + d_v] (q | k | v on the last
    axis), with the same sequences for queries and keys. Gradients flow to qkv."""
    checks.check_array(
        "flash_attn_varlen_qkvpacked_func",
        "qkv",
        qkv,
        ndim=3,
        shape_doc="[total, h, 2 * head_dim_qk + d_v]",
    )
    d = checks.check_int("flash_attn_varlen_qkvpacked_func", "head_dim_qk", head_dim_qk, minimum=1)
    return flash_attn_varlen_func(
        qkv[..., :d],
        qkv[..., d : 2 * d],
        qkv[..., 2 * d :],
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
        softmax_scale=softmax_scale,
        causal=causal,
        implementation=implementation,
    )


def flash_attn_varlen_kvpacked_func(
    q: jax.Array,
    kv: jax.Array,
    cu_seqlens_q: jax.Array,
    cu_seqlens_k: jax.Array,
    max_seqlen_q: int,
    max_seqlen_k: int,
    head_dim_qk: int,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    implementation: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`flash_attn_varlen_func` with kv [total_k, h_k, head_dim_qk + d_v] (k | v on the last
    axis). Gradients flow to q and kv."""
    checks.check_array(
        "flash_attn_varlen_kvpacked_func",
        "kv",
        kv,
        ndim=3,
        shape_doc="[total_k, h_k, head_dim_qk + d_v]",
    )
    d = checks.check_int("flash_attn_varlen_kvpacked_func", "head_dim_qk", head_dim_qk, minimum=1)
    return flash_attn_varlen_func(
        q,
        kv[..., :d],
        kv[..., d:],
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale=softmax_scale,
        causal=causal,
        implementation=implementation,
    )
