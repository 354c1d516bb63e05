"""Plain-JAX reference of sparse (top-k) MLA prefill in bf16 (docs/ops.md, sparse prefill),
and of its gradient in the form the Hopper backward kernel takes.

Each query token attends to its own selection of KV tokens, so the keys are gathered per token:
[s_q, topk, d_qk]. For long prompts (s_q in the tens of thousands) that cannot be done at
once, so query tokens are processed in fixed-size chunks, one after another. `sparse_prefill`
is differentiable by JAX (each chunk rematerialised in the backward pass, so its memory stays
that of one chunk); `sparse_prefill_backward` spells the same gradient out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jax_flashmla._src.geometry import HEAD_DIM_V, SPARSE_HEAD_DIMS_QK
from jax_flashmla.reference.decode import (
    _HIGHEST,
    _attend,
    _check_head_dims,
    _map_row_chunks,
    _rows_per_chunk,
)


def slot_counts(topk_length: jax.Array | None, s_q: int, topk: int) -> jax.Array:
    """int32 [s_q]: how many leading slots of each token count (topk_length, else all topk)."""
    if topk_length is None:
        return jnp.full((s_q,), topk, jnp.int32)
    return topk_length.astype(jnp.int32)


def counted_valid_slots(slots: jax.Array, counts: jax.Array, s_kv: int) -> jax.Array:
    """bool [tokens, topk]: slot j of a token selects a kv row: it counts (j < its count) and its
    index is in [0, s_kv). The one rule of which slots are read."""
    in_count = jnp.arange(slots.shape[-1])[None, :] < counts[:, None]
    return in_count & (slots >= 0) & (slots < s_kv)


def sparse_prefill(
    q: jax.Array,
    kv: jax.Array,
    indices: jax.Array,
    sm_scale: float,
    d_v: int = HEAD_DIM_V,
    attn_sink: jax.Array | None = None,
    topk_length: jax.Array | None = None,
    *,
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sparse MLA prefill: query token t attends to kv[indices[t, 0, :]].

    q [s_q, h_q, d_qk] (d_qk 512 or 576, d_v 512); kv [s_kv, 1, d_qk]; indices int32 [s_q, 1, topk],
    a value < 0 or >= s_kv is invalid; topk_length int32 [s_q]: only the first topk_length[t]
    slots of token t count. Duplicate indices are separate keys. V = kv[..., :d_v].
    attn_sink fp32 [h_q] scales out by 1 / (1 + exp(sink - lse)) and changes nothing else.
    Returns out [s_q, h_q, d_v] in q's dtype, max_logits [s_q, h_q] fp32 (max of
    sm_scale * q.k over valid keys, -inf when there is none) and lse [s_q, h_q] fp32 (+inf
    when there is none; such rows have out 0).

    Footprint per query token: topk * (d_qk * 6 + h_q * 12) bytes (gathered keys in bf16 and
    fp32, fp32 logits/probabilities/mask); tokens go `chunk_size` at a time, by default as many
    as fit in CHUNK_BYTES (105 for h_q = 128, topk = 2048, d_qk = 576).
    """
    if q.ndim != 3 or kv.ndim != 3:
        raise ValueError(
            f"q must be [s_q, h_q, d_qk] and kv [s_kv, 1, d_qk], got {q.shape}, {kv.shape}"
        )
    if not jnp.issubdtype(q.dtype, jnp.floating) or not jnp.issubdtype(kv.dtype, jnp.floating):
        raise TypeError(f"q and kv must be floating point, got {q.dtype} and {kv.dtype}")
    s_q, h_q, d_qk = q.shape
    s_kv, h_kv, d_k = kv.shape
    if h_kv != 1:
        raise ValueError(f"kv must have one KV head, got shape {kv.shape}")
    _check_head_dims("sparse_prefill", d_qk, d_v, SPARSE_HEAD_DIMS_QK, "d_v")
    if d_k != d_qk:
        raise ValueError(f"q head dim {d_qk} != kv head dim {d_k}")
    if indices.ndim != 3 or indices.shape[:2] != (s_q, 1):
        raise ValueError(f"indices must be [{s_q}, 1, topk], got {indices.shape}")
    topk = indices.shape[2]
    if topk_length is not None and topk_length.shape != (s_q,):
        raise ValueError(f"topk_length must be [{s_q}], got {topk_length.shape}")
    if attn_sink is not None and attn_sink.shape != (h_q,):
        raise ValueError(f"attn_sink must be [{h_q}], got {attn_sink.shape}")

    flat = kv[:, 0, :]
    out_dtype = q.dtype
    lengths = slot_counts(topk_length, s_q, topk)

    def one_chunk(q_c: jax.Array, idx_c: jax.Array, len_c: jax.Array) -> tuple[jax.Array, ...]:
        ok = counted_valid_slots(idx_c, len_c, s_kv)  # [c, topk]
        # Slots that do not count read token 0 instead of their (possibly wild) index.
        keys = jnp.take(flat, jnp.where(ok, idx_c, 0), axis=0, mode="clip")  # [c, topk, d]
        # Batch = query token; rows = heads; keys = that token's selection.
        out, lse, max_logits = _attend(
            q_c, keys, keys[..., :d_v], ok[:, None, :], sm_scale, attn_sink
        )
        return out.astype(out_dtype), max_logits, lse

    per_token = topk * (d_qk * (jnp.dtype(kv.dtype).itemsize + 4) + h_q * 12)
    chunk = _rows_per_chunk(per_token, chunk_size)
    out, max_logits, lse = _map_row_chunks(
        jax.checkpoint(one_chunk), (q, indices[:, 0, :].astype(jnp.int32), lengths), chunk
    )
    return out, max_logits, lse


def sparse_prefill_backward(
    q: jax.Array,
    kv: jax.Array,
    indices: jax.Array,
    d_out: jax.Array,
    lse: jax.Array,
    row_shift: jax.Array,
    sm_scale: float,
    topk_length: jax.Array | None = None,
    *,
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The gradient of `sparse_prefill` with respect to q and kv, in float32, from the terms the
    Hopper backward kernel takes (the ops module folds the attention sink and lse's cotangent
    into them).

    With P[t, h, j] = exp(sm_scale * q[t, h] . k_j - lse[t, h]) over the counted valid slots j
    of token t (0 elsewhere), k_j = kv[indices[t, 0, j], 0] and v_j its first 512 dims:
      dP = d_out[t, h] . v_j,  dS = P * (dP + row_shift[t, h]),
      dq[t, h] = sm_scale * sum_j dS k_j,
      dkv[row j] += sm_scale * dS q[t, h], and its first 512 dims += P d_out[t, h].
    q, kv, indices and topk_length as in `sparse_prefill`; d_out [s_q, h_q, 512], lse and
    row_shift [s_q, h_q]. A lonely query (lse = +inf) contributes nothing. Returns dq
    [s_q, h_q, d_qk] and dkv [s_kv, 1, d_qk], float32.
    """
    s_q, h_q, d_qk = q.shape
    s_kv = kv.shape[0]
    topk = indices.shape[2]
    d_v = d_out.shape[2]
    flat = kv[:, 0, :].astype(jnp.float32)
    lengths = slot_counts(topk_length, s_q, topk)
    rows = (
        q.astype(jnp.float32),
        indices[:, 0, :].astype(jnp.int32),
        lengths,
        d_out.astype(jnp.float32),
        lse.astype(jnp.float32),
        row_shift.astype(jnp.float32),
    )
    per_token = topk * (d_qk * 12 + h_q * 16)
    chunk = min(s_q, _rows_per_chunk(per_token, chunk_size))

    def one_chunk(first_new, q_c, idx_c, len_c, dout_c, lse_c, shift_c):
        # Tokens before `first_new` (of a last chunk shifted back) were done by the previous one.
        fresh = jnp.arange(q_c.shape[0]) >= first_new
        ok = counted_valid_slots(idx_c, len_c, s_kv)
        safe = jnp.where(ok, idx_c, 0)
        keys = jnp.where(ok[..., None], jnp.take(flat, safe, axis=0), 0.0)  # [c, topk, d]
        logits = jnp.einsum("chd,ctd->cht", q_c, keys, precision=_HIGHEST) * sm_scale
        probs = jnp.where(ok[:, None, :], jnp.exp(logits - lse_c[..., None]), 0.0)
        d_probs = jnp.einsum("chv,ctv->cht", dout_c, keys[..., :d_v], precision=_HIGHEST)
        d_scores = (
            sm_scale * probs * (d_probs + jnp.where(jnp.isinf(lse_c), 0.0, shift_c)[..., None])
        )
        dq_c = jnp.einsum("cht,ctd->chd", d_scores, keys, precision=_HIGHEST)
        d_rows = jnp.einsum("cht,chd->ctd", d_scores, q_c, precision=_HIGHEST)
        d_rows = d_rows.at[..., :d_v].add(
            jnp.einsum("cht,chv->ctv", probs, dout_c, precision=_HIGHEST)
        )
        d_rows = jnp.where((ok & fresh[:, None])[..., None], d_rows, 0.0)
        return dq_c, safe, d_rows

    def body(i, carry):
        dq, dkv = carry
        start = jnp.minimum(i * chunk, s_q - chunk)
        sliced = (lax.dynamic_slice_in_dim(x, start, chunk, axis=0) for x in rows)
        dq_c, safe, d_rows = one_chunk(i * chunk - start, *sliced)
        dq = lax.dynamic_update_slice_in_dim(dq, dq_c, start, axis=0)
        dkv = dkv.at[safe.reshape(-1)].add(d_rows.reshape(-1, d_qk))
        return dq, dkv

    init = (jnp.zeros((s_q, h_q, d_qk), jnp.float32), jnp.zeros((s_kv, d_qk), jnp.float32))
    if s_q == 0:
        dq, dkv = init
    else:
        dq, dkv = lax.fori_loop(0, -(-s_q // chunk), body, init)
    return dq, dkv[:, None, :]
