"""References of the split-KV scheduler and of the combine step (the kernels' exact maths).

Scheduler. Each request i costs n_i = ceil(len_i / block_tokens) blocks plus a fixed overhead
c. Laid end to end, request i occupies cost positions [S_i, S_i + n_i + c) with S the
exclusive prefix sum; block j of request i sits at S_i + j and the overhead after its blocks.
A request of length 0 still owns position S_i so that one part writes its (lonely) output.
The line is cut into num_parts equal parts of P = ceil(T / num_parts) positions, and part p
processes every block whose position lies in [pP, (p+1)P). A request crossing a cut is split;
its pieces are merged by the combine step. Unlike a greedy fill, every quantity here is a
prefix sum or a binary search, so the CUDA kernel computes it in parallel with no loop over
requests.

Positions reach b * (2**25 + c) for int32 lengths, past int32 once b >= 64, so they are
computed in 64-bit integers (as the CUDA scheduler does) whatever jax_enable_x64 says; every
result fits int32 (num_splits[b] <= b + num_parts - 1, which get_mla_metadata bounds).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_flashmla._src.geometry import METADATA_FIELDS, MetadataField


def _empty_row(b: int) -> np.ndarray:
    """The row of a part with no work: begin_req b, end_req -1, every other field 0."""
    row = np.zeros(METADATA_FIELDS, np.int32)
    row[MetadataField.BEGIN_REQ] = b
    row[MetadataField.END_REQ] = -1
    return row


def mla_metadata(
    cache_seqlens: jax.Array,
    *,
    num_parts: int,
    block_tokens: int,
    fixed_overhead: int,
    fixed_length: int = -1,
) -> tuple[jax.Array, jax.Array]:
    """Split-KV schedule: (tile_scheduler_metadata int32 [num_parts, 8], num_splits [b+1]).

    Row p of the metadata holds the fields of `MetadataField`: [begin_req, end_req
    (inclusive), begin_block (in begin_req), end_block (exclusive, in end_req),
    begin_split_idx (this part's piece of begin_req), begin_req is split, end_req is split, 0];
    an empty part is [b, -1, 0, 0, 0, 0, 0, 0]. num_splits is the exclusive prefix sum of the
    number of pieces of each request. Negative lengths count as 0. fixed_length >= 0 replaces
    every length (sparse decode: each request attends topk keys); the schedule then depends
    on no array and is computed with NumPy at trace time (XLA would constant-fold it slowly).
    """
    (b,) = cache_seqlens.shape
    if b == 0:
        return jnp.tile(_empty_row(0), (num_parts, 1)), jnp.zeros((1,), jnp.int32)
    if fixed_length >= 0:
        lengths = np.full((b,), fixed_length, np.int64)
        metadata, num_splits = _schedule(np, lengths, num_parts, block_tokens, fixed_overhead)
        return jnp.asarray(metadata), jnp.asarray(num_splits)
    with jax.enable_x64(True):
        lengths = jnp.maximum(cache_seqlens.astype(jnp.int64), 0)
        return _schedule(jnp, lengths, num_parts, block_tokens, fixed_overhead)


def _schedule(xp, lengths, num_parts, block_tokens, fixed_overhead):
    """The scheme on int64 `lengths` (>= 0) with the array module xp (numpy, or jax.numpy
    with 64-bit integers enabled); returns int32 (metadata, num_splits)."""
    (b,) = lengths.shape
    n = (lengths + block_tokens - 1) // block_tokens
    cost = n + fixed_overhead
    start = xp.cumsum(cost) - cost  # S_i
    total = xp.sum(cost)
    payload = xp.maximum((total + num_parts - 1) // num_parts, 1)  # P
    span_end = start + xp.maximum(n, 1)  # strictly increasing since fixed_overhead >= 1
    pieces = (span_end - 1) // payload - start // payload + 1
    num_splits = xp.concatenate([xp.zeros((1,), xp.int64), xp.cumsum(pieces)])

    part = xp.arange(num_parts, dtype=xp.int64)
    part_lo = part * payload
    part_hi = part_lo + payload
    begin = xp.searchsorted(span_end, part_lo, side="right")
    end = xp.searchsorted(start, part_hi, side="left") - 1
    empty = begin > end
    begin_c = xp.clip(begin, 0, b - 1)
    end_c = xp.clip(end, 0, b - 1)
    fields = {
        MetadataField.BEGIN_REQ: begin,
        MetadataField.END_REQ: end,
        MetadataField.BEGIN_BLOCK: xp.maximum(part_lo - start[begin_c], 0),
        MetadataField.END_BLOCK: xp.minimum(part_hi - start[end_c], n[end_c]),
        MetadataField.BEGIN_SPLIT_IDX: part - start[begin_c] // payload,
        MetadataField.IS_FIRST_REQ_SPLIT: pieces[begin_c] > 1,
        MetadataField.IS_LAST_REQ_SPLIT: pieces[end_c] > 1,
        MetadataField.PAD: xp.zeros_like(begin),
    }
    # Every field of a non-empty part lies in [-1, max(b, n_i)]: int32 is exact.
    rows = xp.stack([fields[f].astype(xp.int32) for f in MetadataField], axis=1)
    metadata = xp.where(empty[:, None], _empty_row(b), rows)
    return metadata, num_splits.astype(xp.int32)


def combine_splits(
    partial_o: jax.Array,
    partial_lse: jax.Array,
    num_splits: jax.Array,
    attn_sink: jax.Array | None,
    *,
    out_dtype: np.dtype,
) -> tuple[jax.Array, jax.Array]:
    """Merge split-KV partials into (out [b, s_q, h_q, d_v] out_dtype, lse f32 [b, h_q, s_q]).

    Request i's pieces are rows num_splits[i] .. num_splits[i+1]-1 of partial_o
    [R, s_q, h_q, d_v] and partial_lse [R, s_q, h_q]; a piece that saw no attendable key has
    lse -inf. With m = max lse_s: lse = m + log sum exp(lse_s - m) and out = sum
    exp(lse_s - lse) O_s; rows with no key anywhere are 0 with lse +inf. attn_sink f32 [h_q]
    scales out by 1 / (1 + exp(sink - lse)) and leaves lse as it is.
    """
    rows, s_q, h_q, d_v = partial_o.shape
    b = num_splits.shape[0] - 1
    if b == 0:
        return jnp.zeros((0, s_q, h_q, d_v), out_dtype), jnp.zeros((0, h_q, s_q), jnp.float32)
    # Row r belongs to request seg[r]; rows past num_splits[b] are unused workspace (seg = b,
    # dropped by the segment reductions and masked so that garbage there cannot leak).
    seg = jnp.searchsorted(num_splits, jnp.arange(rows), side="right") - 1
    used = seg < b
    part_lse = jnp.where(used[:, None, None], partial_lse, -jnp.inf)
    m = jax.ops.segment_max(part_lse, seg, num_segments=b)  # -inf: no key in any piece
    lonely = m == -jnp.inf
    m_safe = jnp.where(lonely, 0.0, m)
    weights = jnp.exp(part_lse - m_safe[jnp.minimum(seg, b - 1)])  # 0 for empty pieces
    total = jax.ops.segment_sum(weights, seg, num_segments=b)
    total_safe = jnp.where(lonely, 1.0, total)
    lse = jnp.where(lonely, jnp.inf, m_safe + jnp.log(total_safe))
    weighted = jnp.where(used[:, None, None, None], partial_o, 0.0) * weights[..., None]
    out = jax.ops.segment_sum(weighted, seg, num_segments=b) / total_safe[..., None]
    out = jnp.where(lonely[..., None], 0.0, out)
    if attn_sink is not None:
        factor = 1.0 / (1.0 + jnp.exp(attn_sink[None, None, :] - lse))
        out = out * jnp.where(lonely, 0.0, factor)[..., None]
    return out.astype(out_dtype), jnp.transpose(lse, (0, 2, 1)).astype(jnp.float32)
