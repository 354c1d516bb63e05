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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def mla_metadata(
    cache_seqlens: jax.Array,
    *,
    num_parts: int,
    block_tokens: int,
    fixed_overhead: int,
    fixed_length: int = -1,
) -> tuple[jax.Array, jax.Array]:
    """Split-KV schedule: (tile_scheduler_metadata int32 [num_parts, 8], num_splits [b+1]).

    Row p of the metadata is [begin_req, end_req (inclusive), begin_block (in begin_req),
    end_block (exclusive, in end_req), begin_split_idx (this part's piece of begin_req),
    begin_req is split, end_req is split, 0]; an empty part is [b, -1, 0, 0, 0, 0, 0, 0].
    num_splits is the exclusive prefix sum of the number of pieces of each request.
    fixed_length >= 0 replaces every length (sparse decode: each request attends topk keys).
    """
    (b,) = cache_seqlens.shape
    if b == 0:
        empty_row = jnp.array([0, -1, 0, 0, 0, 0, 0, 0], jnp.int32)
        return jnp.tile(empty_row, (num_parts, 1)), jnp.zeros((1,), jnp.int32)
    lengths = cache_seqlens.astype(jnp.int32)
    if fixed_length >= 0:
        lengths = jnp.full((b,), fixed_length, jnp.int32)
    lengths = jnp.maximum(lengths, 0)
    n = lengths // block_tokens + (lengths % block_tokens > 0)
    cost = n + fixed_overhead
    start = jnp.cumsum(cost) - cost  # S_i
    total = jnp.sum(cost)
    payload = jnp.maximum((total + num_parts - 1) // num_parts, 1)  # P
    span_end = start + jnp.maximum(n, 1)  # strictly increasing since fixed_overhead >= 1
    pieces = (span_end - 1) // payload - start // payload + 1
    num_splits = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(pieces)])

    part_lo = jnp.arange(num_parts, dtype=jnp.int32) * payload
    part_hi = part_lo + payload
    begin = jnp.searchsorted(span_end, part_lo, side="right").astype(jnp.int32)
    end = (jnp.searchsorted(start, part_hi, side="left") - 1).astype(jnp.int32)
    empty = begin > end
    begin_c = jnp.clip(begin, 0, b - 1)
    end_c = jnp.clip(end, 0, b - 1)
    begin_block = jnp.maximum(part_lo - start[begin_c], 0)
    end_block = jnp.minimum(part_hi - start[end_c], n[end_c])
    begin_split = jnp.arange(num_parts, dtype=jnp.int32) - start[begin_c] // payload
    rows = jnp.stack(
        [
            begin,
            end,
            begin_block,
            end_block,
            begin_split,
            (pieces[begin_c] > 1).astype(jnp.int32),
            (pieces[end_c] > 1).astype(jnp.int32),
            jnp.zeros_like(begin),
        ],
        axis=1,
    )
    empty_row = jnp.array([b, -1, 0, 0, 0, 0, 0, 0], jnp.int32)
    metadata = jnp.where(empty[:, None], empty_row, rows).astype(jnp.int32)
    return metadata, num_splits.astype(jnp.int32)


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
