"""Plain-JAX references of MLA decode: dense over a paged cache, sparse over selected tokens.

Both compute in fp32 on the upcast inputs (einsums at HIGHEST precision, so no TF32/bf16 passes
on GPU) and round only the output to the query dtype. Keys that must not be read are never
gathered from where they point, and every masked position is removed with `where`, so NaN or Inf
in unread cache rows cannot reach the results.

Memory: a call is split into chunks of rows (requests) that are processed one after another
in a `lax.fori_loop`; a chunk's fp32 intermediates stay near `CHUNK_BYTES` (see each function).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jax_flashmla._src.geometry import HEAD_DIM_QK, HEAD_DIM_V, SPARSE_HEAD_DIMS_QK

_HIGHEST = lax.Precision.HIGHEST

# Target size of one chunk's intermediates (gathered keys in fp32, logits, probabilities).
CHUNK_BYTES = 1 << 30


def _attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    valid: jax.Array,
    scale: float | jax.Array,
    sink: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Masked softmax attention in fp32; the one place that handles lonely rows and NaN keys.

    q [..., m, d], k [..., n, d], v [..., n, dv]; valid: bool with q's rank, broadcastable to
    [..., m, n]; sink: None or fp32 broadcastable to [..., m].
    Returns out [..., m, dv] fp32, lse [..., m] fp32 (+inf for a row with no valid key) and
    max_logits [..., m] fp32 (-inf for such a row). The sink scales `out` only.
    """
    # float32, or float64 for float64 inputs (a finite-difference check of the gradient).
    compute = jnp.promote_types(jnp.result_type(q, k, v), jnp.float32)
    q = q.astype(compute)
    # A key nobody may see can hold NaN; zero it in K and V, as 0 * NaN would still be NaN
    # (in V's product here, in K's product in the gradient).
    key_seen = jnp.any(valid, axis=-2)[..., None]
    k = jnp.where(key_seen, k.astype(compute), 0.0)
    v = jnp.where(key_seen, v.astype(compute), 0.0)

    logits = jnp.einsum("...md,...nd->...mn", q, k, precision=_HIGHEST) * scale
    # `where`, not a multiply by the mask: NaN/Inf logits of unread keys must vanish.
    logits = jnp.where(valid, logits, -jnp.inf)
    # `initial` keeps an empty key axis (topk = 0) legal.
    max_logits = jnp.max(logits, axis=-1, initial=-jnp.inf)
    lonely = max_logits == -jnp.inf
    # The shift cancels out of every result: no gradient flows through it (nor through a tie
    # of maxima).
    shift = jax.lax.stop_gradient(jnp.where(lonely, 0.0, max_logits))
    probs = jnp.exp(logits - shift[..., None])  # masked entries: exp(-inf) = 0
    denom = jnp.sum(probs, axis=-1)  # >= 1 for any row with a valid key
    lse = jnp.where(lonely, jnp.inf, shift + jnp.log(jnp.where(lonely, 1.0, denom)))

    out = jnp.einsum("...mn,...nd->...md", probs, v, precision=_HIGHEST)
    out = out / jnp.where(lonely, 1.0, denom)[..., None]
    if sink is not None:
        # out *= 1 / (1 + exp(sink - lse)) = sigmoid(lse - sink): sink = -inf -> 1, +inf -> 0,
        # with a finite derivative at both. Lonely rows (lse = +inf) take 0 instead of
        # (+inf) - sink, which may be NaN and would poison the gradient; `where` below zeroes
        # their out anyway.
        out = out * jax.nn.sigmoid(jnp.where(lonely, 0.0, lse - sink.astype(lse.dtype)))[..., None]
    out = jnp.where(lonely[..., None], 0.0, out)
    return out, lse, max_logits


def _rows_per_chunk(bytes_per_row: int, chunk_size: int | None) -> int:
    """Rows per loop step: the caller's choice, else as many as fit in CHUNK_BYTES."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    return max(1, CHUNK_BYTES // max(1, bytes_per_row))


def _map_row_chunks(
    fn: Callable[..., tuple[jax.Array, ...]],
    rows: tuple[jax.Array, ...],
    chunk: int,
) -> tuple[jax.Array, ...]:
    """Applies fn to consecutive `chunk`-row slices of the leading axis of `rows`, in order.

    Row r of every output must depend on row r of the inputs only. Slices are read with
    dynamic_slice and results written in place into the full outputs, so neither the inputs
    nor the outputs are copied or padded (padding a 70000-token prompt would duplicate GBs).
    The last slice is shifted back to end at the last row; rows it shares with the previous
    one are simply computed twice.
    """
    n = rows[0].shape[0]
    if n <= chunk:
        return fn(*rows)
    num_chunks = -(-n // chunk)
    shapes = jax.eval_shape(
        fn, *(jax.ShapeDtypeStruct((chunk, *x.shape[1:]), x.dtype) for x in rows)
    )
    init = tuple(jnp.zeros((n, *s.shape[1:]), s.dtype) for s in shapes)

    def body(i: jax.Array, outs: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        start = jnp.minimum(i * chunk, n - chunk)
        results = fn(*(lax.dynamic_slice_in_dim(x, start, chunk, axis=0) for x in rows))
        return tuple(
            lax.dynamic_update_slice_in_dim(o, r, start, axis=0)
            for o, r in zip(outs, results, strict=True)
        )

    return lax.fori_loop(0, num_chunks, body, init)


def _check_float(name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got {x.dtype}")


def _check_head_dims(
    fn: str, d_qk: int, d_v: int, allowed_d_qk: tuple[int, ...], v_name: str = "head_dim_v"
) -> None:
    """MLA's head dims; any other width is an error, never a result of that width."""
    if d_qk not in allowed_d_qk or d_v != HEAD_DIM_V:
        want = " or ".join(str(d) for d in allowed_d_qk)
        raise ValueError(
            f"{fn}: d_qk (q's last dim) must be {want} and {v_name} {HEAD_DIM_V}; got "
            f"d_qk {d_qk} and {v_name} {d_v}"
        )


def dense_decode(
    q: jax.Array,
    k_cache: jax.Array,
    block_table: jax.Array,
    cache_seqlens: jax.Array,
    *,
    head_dim_v: int = HEAD_DIM_V,
    softmax_scale: float | None = None,
    causal: bool = False,
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Dense MLA decode over a paged KV cache (docs/ops.md, dense decode).

    q [b, s_q, h_q, 576] (bf16/fp16/fp32); k_cache [num_blocks, page, h_kv, 576], same dtype;
    block_table int32 [b, max_blocks]; cache_seqlens int32 [b]; head_dim_v 512, V =
    K[..., :512]. Query head h reads KV head h // (h_q // h_kv).

    Request i attends its first L_i = clamp(cache_seqlens[i], 0, max_blocks * page) tokens
    (negative lengths count as 0; lengths past the table's capacity are cut to it), token t
    being row t % page of block block_table[i, t // page]. A token whose block id lies outside
    [0, num_blocks) is masked: never gathered from that id, never attended. With `causal`,
    query j sees keys t <= L_i - s_q + j (bottom-right aligned). Returns out
    [b, s_q, h_q, 512] in q's dtype and lse [b, h_q, s_q] fp32; queries with no visible key
    give out 0 and lse +inf.

    Footprint: with n = max_blocks * page, one request costs about
    n * (h_kv * d_qk * 6 + s_q * h_q * 12) bytes (its pages gathered in the cache dtype and in
    fp32, plus fp32 logits, probabilities and mask); requests are processed `chunk_size` at a
    time (default: as many as fit in CHUNK_BYTES), e.g. 6 at a time for s_k = 32768, h_q = 128.
    """
    if q.ndim != 4 or k_cache.ndim != 4:
        raise ValueError(f"q and k_cache must be 4-D, got {q.shape} and {k_cache.shape}")
    _check_float("q", q)
    b, s_q, h_q, d_qk = q.shape
    num_blocks, page, h_kv, d_k = k_cache.shape
    _check_head_dims("dense_decode", d_qk, head_dim_v, (HEAD_DIM_QK,))
    if d_k != d_qk:
        raise ValueError(f"q head dim {d_qk} != k_cache head dim {d_k}")
    if k_cache.dtype != q.dtype:
        raise TypeError(f"k_cache dtype {k_cache.dtype} != q dtype {q.dtype}")
    if h_kv < 1 or h_q % h_kv != 0:
        raise ValueError(f"h_q ({h_q}) must be a multiple of h_kv ({h_kv})")
    if block_table.ndim != 2 or block_table.shape[0] != b:
        raise ValueError(f"block_table must be [{b}, max_blocks], got {block_table.shape}")
    if cache_seqlens.shape != (b,):
        raise ValueError(f"cache_seqlens must be [{b}], got {cache_seqlens.shape}")
    if num_blocks < 1:
        raise ValueError("k_cache has no blocks")

    group = h_q // h_kv
    max_blocks = block_table.shape[1]
    n = max_blocks * page
    scale = d_qk**-0.5 if softmax_scale is None else softmax_scale
    out_dtype = q.dtype

    def one_chunk(q_c: jax.Array, bt_c: jax.Array, len_c: jax.Array) -> tuple[jax.Array, ...]:
        c = q_c.shape[0]
        length = jnp.clip(len_c, 0, n)  # L_i
        # A block id outside the cache masks its tokens; gather block 0 in its place.
        block_ok = (bt_c >= 0) & (bt_c < num_blocks)
        keys = jnp.take(k_cache, jnp.where(block_ok, bt_c, 0), axis=0)  # [c, max_blocks, ...]
        keys = keys.reshape(c, n, h_kv, d_qk).transpose(0, 2, 1, 3)  # [c, h_kv, n, d]

        pos = jnp.arange(n)
        token_ok = jnp.repeat(block_ok, page, axis=1)  # [c, n]
        valid = ((pos[None, :] < length[:, None]) & token_ok)[:, None, :]  # [c, 1, n]
        if causal:
            last_visible = length[:, None] - s_q + jnp.arange(s_q)[None, :]  # [c, s_q]
            valid = valid & (pos[None, None, :] <= last_visible[:, :, None])  # [c, s_q, n]
        # Rows of the grouped query are (query token, head within the group).
        valid = jnp.broadcast_to(valid[:, None, :, None, :], (c, 1, s_q, group, n))
        valid = valid.reshape(c, 1, s_q * group, n)

        qg = q_c.reshape(c, s_q, h_kv, group, d_qk).transpose(0, 2, 1, 3, 4)
        qg = qg.reshape(c, h_kv, s_q * group, d_qk)
        out, lse, _ = _attend(qg, keys, keys[..., :head_dim_v], valid, scale)

        out = out.reshape(c, h_kv, s_q, group, head_dim_v).transpose(0, 2, 1, 3, 4)
        out = out.reshape(c, s_q, h_q, head_dim_v).astype(out_dtype)
        lse = lse.reshape(c, h_kv, s_q, group).transpose(0, 1, 3, 2).reshape(c, h_q, s_q)
        return out, lse

    itemsize = jnp.dtype(k_cache.dtype).itemsize
    per_request = n * (h_kv * d_qk * (itemsize + 4) + s_q * h_q * 12)
    chunk = _rows_per_chunk(per_request, chunk_size)
    out, lse = _map_row_chunks(
        one_chunk, (q, block_table.astype(jnp.int32), cache_seqlens.astype(jnp.int32)), chunk
    )
    return out, lse


def _gather_selected(
    cache: jax.Array, idx: jax.Array, length: jax.Array, name: str
) -> tuple[jax.Array, jax.Array]:
    """Gathers the tokens `idx` [c, s_q, t] points at in cache [num_blocks, page, 1, d].

    A slot counts if 0 <= idx < num_blocks * page and slot < length[c]. Slots that do not
    count read token 0 instead of their (possibly wild) index and are reported False.
    Returns keys [c, s_q, t, d] in the cache dtype and the mask [c, s_q, t].
    """
    num_blocks, page, h_kv, d = cache.shape
    if h_kv != 1:
        raise ValueError(f"{name} must have one KV head, got shape {cache.shape}")
    num_tokens = num_blocks * page
    flat = cache.reshape(num_tokens, d)
    ok = (idx >= 0) & (idx < num_tokens)
    ok = ok & (jnp.arange(idx.shape[-1])[None, None, :] < length[:, None, None])
    keys = jnp.take(flat, jnp.where(ok, idx, 0), axis=0, mode="clip")
    return keys, ok


def sparse_decode(
    q: jax.Array,
    k_cache: jax.Array,
    indices: jax.Array,
    *,
    topk_length: jax.Array | None = None,
    attn_sink: jax.Array | None = None,
    extra_k_cache: jax.Array | None = None,
    extra_indices: jax.Array | None = None,
    extra_topk_length: jax.Array | None = None,
    softmax_scale: float | None = None,
    head_dim_v: int = HEAD_DIM_V,
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Sparse (top-k) MLA decode on an already dequantised cache (docs/ops.md, sparse decode).

    q [b, s_q, h_q, d_qk], d_qk 576 ("V32") or 512 ("MODEL1"), head_dim_v 512;
    k_cache [num_blocks, page, 1, d_qk] (bf16/fp32, dequantised);
    indices int32 [b, s_q, topk], value = block * page + row in the flattened cache; any value
    < 0 or >= num_blocks * page is invalid. topk_length int32 [b]: only the first
    topk_length[i] slots of request i count. extra_k_cache [num_blocks2, page2, 1, d_qk] with
    extra_indices [b, s_q, extra_topk] (+ extra_topk_length [b]) adds more keys to the same
    softmax. Duplicate indices are separate keys. attn_sink fp32 [h_q] scales out by
    1 / (1 + exp(sink - lse)); lse is returned without it. V = K[..., :head_dim_v].
    Returns out [b, s_q, h_q, head_dim_v] in q's dtype and lse [b, h_q, s_q] fp32; rows with
    no valid key give out 0 and lse +inf whatever the sink.

    Footprint per request: s_q * T * (d_qk * (itemsize + 4) + h_q * 12) bytes with T the total
    selected slots; requests are processed `chunk_size` at a time (default: CHUNK_BYTES).
    """
    if q.ndim != 4 or k_cache.ndim != 4:
        raise ValueError(f"q and k_cache must be 4-D, got {q.shape} and {k_cache.shape}")
    _check_float("q", q)
    _check_float("k_cache", k_cache)
    b, s_q, h_q, d_qk = q.shape
    _check_head_dims("sparse_decode", d_qk, head_dim_v, SPARSE_HEAD_DIMS_QK)
    if k_cache.shape[-1] != d_qk:
        raise ValueError(f"q head dim {d_qk} != k_cache head dim {k_cache.shape[-1]}")
    if indices.ndim != 3 or indices.shape[:2] != (b, s_q):
        raise ValueError(f"indices must be [{b}, {s_q}, topk], got {indices.shape}")
    topk = indices.shape[2]
    if topk_length is not None and topk_length.shape != (b,):
        raise ValueError(f"topk_length must be [{b}], got {topk_length.shape}")
    if attn_sink is not None and attn_sink.shape != (h_q,):
        raise ValueError(f"attn_sink must be [{h_q}], got {attn_sink.shape}")
    has_extra = extra_k_cache is not None
    if has_extra != (extra_indices is not None):
        raise ValueError("extra_k_cache and extra_indices must be given together")
    if extra_topk_length is not None and not has_extra:
        raise ValueError("extra_topk_length given without extra_k_cache")
    if has_extra:
        _check_float("extra_k_cache", extra_k_cache)
        if extra_k_cache.ndim != 4 or extra_k_cache.shape[-1] != d_qk:
            raise ValueError(f"extra_k_cache must be [blocks, page, 1, {d_qk}]")
        if extra_indices.ndim != 3 or extra_indices.shape[:2] != (b, s_q):
            raise ValueError(f"extra_indices must be [{b}, {s_q}, k], got {extra_indices.shape}")
        if extra_topk_length is not None and extra_topk_length.shape != (b,):
            raise ValueError(f"extra_topk_length must be [{b}], got {extra_topk_length.shape}")

    scale = d_qk**-0.5 if softmax_scale is None else softmax_scale
    out_dtype = q.dtype

    def lengths(given: jax.Array | None, slots: int) -> jax.Array:
        # No length given: every slot counts.
        return jnp.full((b,), slots, jnp.int32) if given is None else given.astype(jnp.int32)

    rows = [q, indices.astype(jnp.int32), lengths(topk_length, topk)]
    total_slots = topk
    if has_extra:
        extra_topk = extra_indices.shape[2]
        rows += [extra_indices.astype(jnp.int32), lengths(extra_topk_length, extra_topk)]
        total_slots += extra_topk

    def one_chunk(q_c: jax.Array, idx_c: jax.Array, len_c: jax.Array, *extra: jax.Array):
        keys, ok = _gather_selected(k_cache, idx_c, len_c, "k_cache")
        if has_extra:
            keys2, ok2 = _gather_selected(extra_k_cache, extra[0], extra[1], "extra_k_cache")
            # One softmax over both selections: simply concatenate the key sets.
            keys = jnp.concatenate([keys.astype(jnp.float32), keys2.astype(jnp.float32)], 2)
            ok = jnp.concatenate([ok, ok2], axis=2)
        # Batch (request, query token); rows = query heads; keys = selected tokens.
        out, lse, _ = _attend(
            q_c, keys, keys[..., :head_dim_v], ok[:, :, None, :], scale, attn_sink
        )
        return out.astype(out_dtype), lse.transpose(0, 2, 1)

    itemsize = jnp.dtype(k_cache.dtype).itemsize
    per_request = s_q * total_slots * (d_qk * (itemsize + 4) + h_q * 12)
    chunk = _rows_per_chunk(per_request, chunk_size)
    out, lse = _map_row_chunks(one_chunk, tuple(rows), chunk)
    return out, lse
