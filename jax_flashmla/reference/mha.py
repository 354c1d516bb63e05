"""Pure-JAX reference of dense varlen MHA prefill (forward; the backward comes from autodiff).

Sequences are packed along the token axis and described by exclusive prefix sums
``cu_seqlens`` (device arrays, never read on the host). Every query is scored against every
key of the packed batch and a mask keeps only same-sequence (and, when causal, visible) keys.
The query axis is processed in fixed-size chunks with :func:`jax.lax.map`, each chunk under
:func:`jax.checkpoint`, so forward and backward memory is O(chunk * h * total_k), not
O(total_q * h * total_k).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jax_flashmla._src import checks
from jax_flashmla._src.geometry import MHA_HEAD_DIMS

__all__ = ["mha_varlen"]

_OP = "mha_varlen"
_FLOATS = (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64)

# Upper bound on the elements of one chunk's [chunk, h, total_k] score block (64 MiB in fp32).
_MAX_SCORE_ELEMENTS = 1 << 24
_MAX_CHUNK = 512


def _segments(cu_seqlens: jax.Array, total: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per packed token: (sequence id, position in the sequence, whether it is in a sequence).

    Tokens outside [cu_seqlens[0], cu_seqlens[-1]) belong to no sequence. With zero-length
    sequences several prefix sums are equal; counting the ends <= t picks the non-empty one.
    """
    b = cu_seqlens.shape[0] - 1
    t = jnp.arange(total, dtype=jnp.int32)
    seq = jnp.searchsorted(cu_seqlens[1:], t, side="right").astype(jnp.int32)
    valid = (t >= cu_seqlens[0]) & (t < cu_seqlens[-1])
    seq = jnp.minimum(seq, b - 1)
    pos = t - cu_seqlens[seq]
    return seq, pos, valid


def _default_chunk(total_q: int, h: int, total_k: int) -> int:
    chunk = _MAX_CHUNK
    while chunk > 1 and chunk * h * max(total_k, 1) > _MAX_SCORE_ELEMENTS:
        chunk //= 2
    # No point in a chunk (much) larger than the whole query axis.
    while chunk > 1 and chunk // 2 >= total_q:
        chunk //= 2
    return chunk


def _check_inputs(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cu_seqlens_q: jax.Array,
    cu_seqlens_k: jax.Array,
    max_seqlen_q: Any,
    max_seqlen_k: Any,
) -> None:
    checks.check_array(_OP, "q", q, ndim=3, dtypes=_FLOATS, shape_doc="[total_q, h, d_qk]")
    _, h, d_qk = q.shape
    checks.check_array(
        _OP, "k", k, dtypes=_FLOATS, shape=(None, None, d_qk), shape_doc=f"[total_k, h_k, {d_qk}]"
    )
    total_k, h_k, _ = k.shape
    checks.check_array(
        _OP,
        "v",
        v,
        dtypes=_FLOATS,
        shape=(total_k, h_k, None),
        shape_doc=f"[{total_k}, {h_k}, d_v]",
    )
    if (d_qk, v.shape[2]) not in MHA_HEAD_DIMS:
        raise ValueError(
            f"{_OP}: (d_qk, d_v) must be one of {', '.join(map(str, MHA_HEAD_DIMS))}; "
            f"got ({d_qk}, {v.shape[2]})"
        )
    if h_k < 1 or h % h_k:
        raise ValueError(f"{_OP}: q's heads must be a multiple of k's heads; got {h} and {h_k}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        checks.check_array(_OP, name, cu, ndim=1, dtypes=checks.INT32, shape_doc="[batch + 1]")
        if cu.shape[0] < 1:
            raise ValueError(f"{_OP}: {name} must have at least one entry ([batch + 1]); got (0,)")
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(
            f"{_OP}: cu_seqlens_k must have the shape of cu_seqlens_q, "
            f"{tuple(cu_seqlens_q.shape)}; got {tuple(cu_seqlens_k.shape)}"
        )
    checks.check_int(_OP, "max_seqlen_q", max_seqlen_q, minimum=0)
    checks.check_int(_OP, "max_seqlen_k", max_seqlen_k, minimum=0)


@functools.partial(
    jax.jit,
    static_argnames=(
        "max_seqlen_q",
        "max_seqlen_k",
        "softmax_scale",
        "causal",
        "query_chunk_size",
    ),
)
def mha_varlen(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cu_seqlens_q: jax.Array,
    cu_seqlens_k: jax.Array,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float | None = None,
    causal: bool = False,
    *,
    query_chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Dense varlen multi-head attention with GQA and bottom-right causal masking.

    Args:
      q: [total_q, h, d_qk] floating (bf16 in the tests).
      k: [total_k, h_k, d_qk], h % h_k == 0; query head i uses kv head i // (h // h_k).
      v: [total_k, h_k, d_v]; (d_qk, d_v) one of MHA_HEAD_DIMS.
      cu_seqlens_q: int32 [b + 1], exclusive prefix sums of the query lengths (traced values).
      cu_seqlens_k: int32 [b + 1], same for the keys.
      max_seqlen_q: static upper bound of the query lengths (validated, otherwise unused:
        the reference masks densely).
      max_seqlen_k: static upper bound of the key lengths (same).
      softmax_scale: scale of q.k; default d_qk ** -0.5.
      causal: bottom-right causal: query i of a sequence of sq queries and sk keys sees key j
        iff j <= sk - sq + i.
      query_chunk_size: static number of query tokens per lax.map step; default picks a power
        of two that keeps a chunk's score block under 2^24 elements.

    Returns:
      (out, lse): out [total_q, h, d_v] in q.dtype; lse [total_q, h] float32, the natural-log
      logsumexp of softmax_scale * q.k over the attended keys. A query with nothing to attend
      (empty key sequence, fully masked causal row, or a token outside [cu_seqlens_q[0],
      cu_seqlens_q[-1])) gets out 0 and lse +inf. Keys outside [cu_seqlens_k[0],
      cu_seqlens_k[-1]) are never read (NaN there is harmless, in the gradients too).

    Differentiable w.r.t. q, k and v; the gradients are finite for lonely queries.

    Raises:
      ValueError: wrong ranks or mismatched shapes, unsupported (d_qk, d_v), h % h_k != 0,
        cu_seqlens not [b + 1] or of different lengths, negative max_seqlen, bad
        query_chunk_size.
      TypeError: non-array or non-floating q/k/v, cu_seqlens not int32, max_seqlen not an int.
    """
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    total_q, h, d_qk = q.shape
    total_k, h_k, _ = k.shape
    d_v = v.shape[2]
    g = h // h_k
    b = cu_seqlens_q.shape[0] - 1
    scale = checks.check_scale(_OP, "softmax_scale", softmax_scale, d_qk**-0.5)
    if query_chunk_size is None:
        chunk = _default_chunk(total_q, h, total_k)
    else:
        chunk = checks.check_int(_OP, "query_chunk_size", query_chunk_size, minimum=1)

    if b == 0 or total_q == 0 or total_k == 0:
        # No sequence or no key at all: every query is lonely.
        return jnp.zeros((total_q, h, d_v), q.dtype), jnp.full((total_q, h), jnp.inf, jnp.float32)

    cu_q, cu_k = cu_seqlens_q, cu_seqlens_k
    q_seq, q_pos, q_valid = _segments(cu_q, total_q)
    k_seq, k_pos, k_valid = _segments(cu_k, total_k)
    len_q = cu_q[1:] - cu_q[:-1]
    len_k = cu_k[1:] - cu_k[:-1]
    # Last visible key position of each query (bottom-right alignment); unused if not causal.
    q_last = len_k[q_seq] - len_q[q_seq] + q_pos

    # Zero the keys/values no query may read: the where keeps NaN garbage out of the products
    # and (being a select) routes no gradient to those rows.
    kf = jnp.where(k_valid[:, None, None], k.astype(jnp.float32), 0.0)
    vf = jnp.where(k_valid[:, None, None], v.astype(jnp.float32), 0.0)

    n_chunks = -(-total_q // chunk)
    pad = n_chunks * chunk - total_q

    def pad_rows(x: jax.Array, fill: Any) -> jax.Array:
        widths = [(0, pad)] + [(0, 0)] * (x.ndim - 1)
        return jnp.pad(x, widths, constant_values=fill)

    qf = jnp.where(q_valid[:, None, None], q.astype(jnp.float32), 0.0)
    xs = (
        pad_rows(qf, 0.0).reshape(n_chunks, chunk, h_k, g, d_qk),
        pad_rows(q_seq, 0).reshape(n_chunks, chunk),
        pad_rows(q_last, 0).reshape(n_chunks, chunk),
        pad_rows(q_valid, False).reshape(n_chunks, chunk),
    )
    hi = jax.lax.Precision.HIGHEST

    @jax.checkpoint
    def one_chunk(
        kf: jax.Array, vf: jax.Array, args: tuple[jax.Array, ...]
    ) -> tuple[jax.Array, jax.Array]:
        qc, seq_c, last_c, valid_c = args
        mask = valid_c[:, None] & k_valid[None, :] & (seq_c[:, None] == k_seq[None, :])
        if causal:
            mask = mask & (k_pos[None, :] <= last_c[:, None])
        mask = mask[:, None, None, :]  # [chunk, 1, 1, total_k]
        s = jnp.einsum("cngd,tnd->cngt", qc, kf, precision=hi) * scale
        s = jnp.where(mask, s, -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True)
        lonely = m == -jnp.inf
        # The max only stabilises the exponent; its gradient cancels, so stop it (and keep
        # lonely rows at a finite shift so that exp(-inf - 0) = 0 rather than NaN).
        m = jax.lax.stop_gradient(jnp.where(lonely, 0.0, m))
        p = jnp.exp(s - m)  # masked entries: exp(-inf) = 0, with zero gradient
        l = jnp.sum(p, axis=-1, keepdims=True)
        # Double where: lonely rows divide by and take the log of 1, then get replaced, so
        # neither the forward nor the gradient ever sees 0/0 or log(0).
        l_safe = jnp.where(lonely, 1.0, l)
        o = jnp.einsum("cngt,tnd->cngd", p, vf, precision=hi) / l_safe
        o = jnp.where(lonely, 0.0, o)
        lse = jnp.where(lonely, jnp.inf, m + jnp.log(l_safe))[..., 0]
        return o.reshape(chunk, h, d_v), lse.reshape(chunk, h)

    out, lse = jax.lax.map(lambda a: one_chunk(kf, vf, a), xs)
    out = out.reshape(n_chunks * chunk, h, d_v)[:total_q].astype(q.dtype)
    lse = lse.reshape(n_chunks * chunk, h)[:total_q]
    return out, lse
