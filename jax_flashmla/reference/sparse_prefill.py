"""Plain-JAX reference of sparse (top-k) MLA prefill in bf16 (docs/ops.md, sparse prefill).

Each query token attends to its own selection of KV tokens, so the keys are gathered per token:
[s_q, topk, d_qk]. For long prompts (s_q in the tens of thousands) that cannot be done at
once, so query tokens are processed in fixed-size chunks, one after another.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_flashmla._src.geometry import HEAD_DIM_V, SPARSE_HEAD_DIMS_QK
from jax_flashmla.reference.decode import (
    _attend,
    _check_head_dims,
    _map_row_chunks,
    _rows_per_chunk,
)


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
    if topk_length is None:
        lengths = jnp.full((s_q,), topk, jnp.int32)
    else:
        lengths = topk_length.astype(jnp.int32)

    def one_chunk(q_c: jax.Array, idx_c: jax.Array, len_c: jax.Array) -> tuple[jax.Array, ...]:
        ok = (idx_c >= 0) & (idx_c < s_kv)
        ok = ok & (jnp.arange(topk)[None, :] < len_c[:, None])  # [c, topk]
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
        one_chunk, (q, indices[:, 0, :].astype(jnp.int32), lengths), chunk
    )
    return out, max_logits, lse
