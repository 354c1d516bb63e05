"""flash_attn_varlen_func and its packed forms: dense MHA prefill with gradients."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_flashmla._src import checks, platform, sharding
from jax_flashmla._src.geometry import MHA_HEAD_DIMS
from jax_flashmla._src.kernels.prefill_mha import prefill_mha

OP = "flash_attn_varlen_func"
QKV_PACKED_OP = "flash_attn_varlen_qkvpacked_func"
KV_PACKED_OP = "flash_attn_varlen_kvpacked_func"

_HEAD_DIMS_DOC = ", ".join(str(pair) for pair in MHA_HEAD_DIMS)
_BF16 = (jnp.bfloat16,)
_NO_KERNEL = "the MHA prefill kernel is not built yet"


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
        [total_k, h_k, d_v]; h a positive multiple of h_k (GQA); (d_qk, d_v) in
        {(192, 128), (128, 128)}.
      cu_seqlens_q, cu_seqlens_k: int32 [b + 1], non-decreasing, starting at 0 (lengths may
        be 0).
      max_seqlen_q, max_seqlen_k: static ints >= 0, upper bounds of the sequence lengths.
      softmax_scale: static float finite in float32 (zero and negative included), default
        d_qk ** -0.5.
      causal: static bool.
      implementation: None, "cuda" or "xla" (see `flash_mla_with_kvcache`).

    Returns:
      out: bfloat16 [total_q, h, d_v] (0 for a query with no key).
      lse: float32 [total_q, h] (+inf for a query with no key). Both are differentiated: a
        loss may use out, lse or both (lonely rows pass no gradient through lse).

    Raises:
      TypeError: a non-array or wrong dtype for an array argument; non-Python static
        arguments.
      ValueError: wrong ranks or shapes, (d_qk, d_v) not supported, h not a multiple of h_k,
        cu_seqlens empty or of different lengths, negative max_seqlen, a softmax_scale not
        finite in float32, or implementation "cuda" where no kernel can take these inputs.
    """
    checks.check_array(OP, "q", q, ndim=3, dtypes=_BF16, shape_doc="[total_q, h, d_qk]")
    d_qk = q.shape[2]
    checks.check_array(
        OP, "k", k, dtypes=_BF16, shape=(None, None, d_qk), shape_doc=f"[total_k, h_k, {d_qk}]"
    )
    total_k, h_k, _ = k.shape
    checks.check_array(
        OP, "v", v, dtypes=_BF16, shape=(total_k, h_k, None), shape_doc=f"[{total_k}, {h_k}, d_v]"
    )
    d_v = v.shape[2]
    _check_head_dims(OP, d_qk, d_v, f"({d_qk}, {d_v})")
    _check_heads(OP, "q", "k", q.shape[1], h_k)
    _check_cu_seqlens(OP, "cu_seqlens_q", cu_seqlens_q, "cu_seqlens_k", cu_seqlens_k)
    statics = _statics(OP, max_seqlen_q, max_seqlen_k, softmax_scale, d_qk, causal)
    platform.choose_implementation(OP, implementation, _NO_KERNEL)
    return _mha(q, k, v, cu_seqlens_q, cu_seqlens_k, statics)


def _statics(op: str, max_seqlen_q, max_seqlen_k, softmax_scale, d_qk: int, causal) -> tuple:
    """The checked static arguments: (op, max_seqlen_q, max_seqlen_k, softmax_scale, causal)."""
    return (
        op,
        checks.check_int(op, "max_seqlen_q", max_seqlen_q, minimum=0),
        checks.check_int(op, "max_seqlen_k", max_seqlen_k, minimum=0),
        checks.check_scale(op, "softmax_scale", softmax_scale, d_qk**-0.5),
        checks.check_bool(op, "causal", causal),
    )


def _check_head_dims(op: str, d_qk: int, d_v: int, got: str) -> None:
    if (d_qk, d_v) not in MHA_HEAD_DIMS:
        raise ValueError(f"{op}: (d_qk, d_v) must be one of {_HEAD_DIMS_DOC}; got {got}")


def _check_heads(op: str, q_name: str, k_name: str, h: int, h_k: int) -> None:
    if h_k < 1 or h < 1 or h % h_k:
        raise ValueError(
            f"{op}: {q_name}'s heads must be a positive multiple of {k_name}'s heads; "
            f"got {h} and {h_k}"
        )


def _check_cu_seqlens(op: str, q_name: str, cu_q: object, k_name: str, cu_k: object) -> None:
    for name, x in ((q_name, cu_q), (k_name, cu_k)):
        checks.check_array(op, name, x, ndim=1, dtypes=checks.INT32, shape_doc="[batch + 1]")
        if x.shape[0] < 1:
            raise ValueError(f"{op}: {name} must have at least one entry ([batch + 1]); got (0,)")
    if cu_k.shape != cu_q.shape:
        raise ValueError(
            f"{op}: {k_name} must have the shape of {q_name}, {tuple(cu_q.shape)}; "
            f"got {tuple(cu_k.shape)}"
        )


# Heads (k g) = KV heads x query heads per KV head may be sharded; tokens stay whole because a
# variable-length sequence may cross any token boundary.
_MHA_DIMS = ("t (k g) d", "u k d", "u k e", "c", "c")


# statics: (name of the op called, max_seqlen_q, max_seqlen_k, softmax_scale, causal).
@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _mha(q, k, v, cu_q, cu_k, statics):
    return _mha_forward(q, k, v, cu_q, cu_k, statics)


def _reference(q, k, v, cu_q, cu_k, statics):
    _, max_q, max_k, scale, causal = statics
    return prefill_mha(
        q,
        k,
        v,
        cu_q,
        cu_k,
        use_kernel=False,
        max_seqlen_q=max_q,
        max_seqlen_k=max_k,
        softmax_scale=scale,
        causal=causal,
    )


def _mha_forward(q, k, v, cu_q, cu_k, statics):
    return sharding.partitioned_call(
        statics[0],
        lambda *xs: _reference(*xs, statics),
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

    def grads_f32(q, k, v, cu_q, cu_k, d_out, d_lse):
        # In float32 (the reference computes in it anyway) so that partial sums over sharded
        # heads are rounded to the input dtype once, as in the unsharded call. Both outputs
        # are differentiated: d_lse enters as dS += P * d_lse.
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        _, pullback = jax.vjp(lambda q, k, v: _reference(q, k, v, cu_q, cu_k, statics), *f32)
        return pullback((d_out.astype(jnp.float32), d_lse.astype(jnp.float32)))

    def grads(q, k, v, cu_q, cu_k, d_out, d_lse):
        return tuple(
            g.astype(x.dtype)
            for g, x in zip(grads_f32(q, k, v, cu_q, cu_k, d_out, d_lse), (q, k, v), strict=True)
        )

    def per_shard(factor_axes):
        # Query heads of one KV head split across devices: each holds part of dk and dv.
        group_axes = factor_axes.get("g", ())

        def sharded_grads(q, k, v, cu_q, cu_k, d_out, d_lse):
            dq, dk, dv = grads_f32(q, k, v, cu_q, cu_k, d_out, d_lse)
            if group_axes:
                dk, dv = jax.lax.psum(dk, group_axes), jax.lax.psum(dv, group_axes)
            return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)

        return sharded_grads

    dq, dk, dv = sharding.partitioned_call(
        statics[0],
        grads,
        (q, k, v, cu_q, cu_k, *cotangents),
        (*_MHA_DIMS, "t (k g) e", "t (k g)"),
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
    """`flash_attn_varlen_func` on qkv packed on its last axis, with the same sequences for
    queries and keys (and as many KV heads as query heads). Gradients flow to qkv.

    Args:
      qkv: bfloat16 [total, h, 2 * head_dim_qk + d_v]: q | k | v on the last axis;
        (head_dim_qk, d_v) in {(192, 128), (128, 128)}, i.e. last dim 512 or 384.
      cu_seqlens: int32 [b + 1], as cu_seqlens_q and cu_seqlens_k.
      max_seqlen: static int >= 0, as max_seqlen_q and max_seqlen_k.
      head_dim_qk: static int, the width of q and of k in the packed axis.
      softmax_scale, causal, implementation: as in `flash_attn_varlen_func`.

    Returns and raises as `flash_attn_varlen_func`, its errors naming these arguments.
    """
    op = QKV_PACKED_OP
    checks.check_array(
        op, "qkv", qkv, ndim=3, dtypes=_BF16, shape_doc="[total, h, 2 * head_dim_qk + d_v]"
    )
    d = checks.check_int(op, "head_dim_qk", head_dim_qk, minimum=1)
    width = qkv.shape[2]
    _check_head_dims(op, d, width - 2 * d, f"head_dim_qk {d} and qkv's last dim {width}")
    if qkv.shape[1] < 1:
        raise ValueError(f"{op}: qkv must have at least one head; got shape {tuple(qkv.shape)}")
    _check_cu_seqlens(op, "cu_seqlens", cu_seqlens, "cu_seqlens", cu_seqlens)
    max_len = checks.check_int(op, "max_seqlen", max_seqlen, minimum=0)
    statics = (
        op,
        max_len,
        max_len,
        checks.check_scale(op, "softmax_scale", softmax_scale, d**-0.5),
        checks.check_bool(op, "causal", causal),
    )
    platform.choose_implementation(op, implementation, _NO_KERNEL)
    q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
    return _mha(q, k, v, cu_seqlens, cu_seqlens, statics)


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
    """`flash_attn_varlen_func` with k and v packed on the last axis of kv. Gradients flow to
    q and kv.

    Args:
      q: bfloat16 [total_q, h, head_dim_qk].
      kv: bfloat16 [total_k, h_k, head_dim_qk + d_v]: k | v on the last axis; h a positive
        multiple of h_k; (head_dim_qk, d_v) in {(192, 128), (128, 128)}.
      head_dim_qk: static int, the width of q and of k in the packed axis.
      The other arguments are those of `flash_attn_varlen_func`.

    Returns and raises as `flash_attn_varlen_func`, its errors naming these arguments.
    """
    op = KV_PACKED_OP
    checks.check_array(op, "q", q, ndim=3, dtypes=_BF16, shape_doc="[total_q, h, head_dim_qk]")
    checks.check_array(
        op, "kv", kv, ndim=3, dtypes=_BF16, shape_doc="[total_k, h_k, head_dim_qk + d_v]"
    )
    d = checks.check_int(op, "head_dim_qk", head_dim_qk, minimum=1)
    if q.shape[2] != d:
        raise ValueError(
            f"{op}: q's last dim must be head_dim_qk ({d}); got shape {tuple(q.shape)}"
        )
    width = kv.shape[2]
    _check_head_dims(op, d, width - d, f"head_dim_qk {d} and kv's last dim {width}")
    _check_heads(op, "q", "kv", q.shape[1], kv.shape[1])
    _check_cu_seqlens(op, "cu_seqlens_q", cu_seqlens_q, "cu_seqlens_k", cu_seqlens_k)
    statics = _statics(op, max_seqlen_q, max_seqlen_k, softmax_scale, d, causal)
    platform.choose_implementation(op, implementation, _NO_KERNEL)
    return _mha(q, kv[..., :d], kv[..., d:], cu_seqlens_q, cu_seqlens_k, statics)
