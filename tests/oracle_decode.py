"""Float64 NumPy oracles, test-data builders and the comparison rule for the MLA ops.

Everything here is plain NumPy and deliberately shares no code with jax_flashmla: the oracles
loop over requests, tokens and heads and gather keys one by one, so they are slow but easy to
check by eye. Inputs may be bf16/fp16/fp32 NumPy arrays (or JAX arrays); they are converted
to float64 first. The builders follow docs/ops.md (test data): values ~ N(0, 1) / 10
clamped to [-1, 1], random block placement, garbage block-table entries and NaN in every
cache element that must not be read.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from collections.abc import Sequence

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
FP16 = np.dtype(np.float16)

# Value the tests put in block-table entries that must never be dereferenced.
GARBAGE_BLOCK = 2147480000

# Tolerances of docs/ops.md, as keyword arguments for check_close.
DENSE_DECODE_OUT_TOL = {"abs_tol": 8e-4, "rel_tol": 2.01 / 128, "cos_tol": 5e-6}
DENSE_DECODE_LSE_TOL = {"abs_tol": 1e-6, "rel_tol": 8.01 / 65536}
SPARSE_DECODE_OUT_TOL = {"abs_tol": 1e-3, "rel_tol": 2.01 / 128, "cos_tol": 5e-6}
SPARSE_DECODE_LSE_TOL = {"abs_tol": 1e-6, "rel_tol": 8.01 / 65536}
SPARSE_PREFILL_OUT_TOL = {"abs_tol": 8e-4, "rel_tol": 3.01 / 128, "cos_tol": 7e-6}
SPARSE_PREFILL_LSE_TOL = {"abs_tol": 1e-6, "rel_tol": 2.01 / 65536}


# ----------------------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------------------


def check_close(
    actual,
    ref,
    *,
    abs_tol: float,
    rel_tol: float,
    cos_tol: float | None = None,
    name: str = "value",
) -> None:
    """Asserts the tolerance rule of docs/ops.md; raises AssertionError describing the failure.

    - non-finite positions (inf / NaN) must coincide exactly, with the same value;
    - each finite element passes if |a - r| < abs_tol or |a - r| / (|r| + 1e-6) < rel_tol;
    - if cos_tol is given, 1 - 2 sum(a r) / sum(a^2 + r^2) over the finite positions, in
      float64, must be <= cos_tol.
    """
    a = np.asarray(actual).astype(np.float64)
    r = np.asarray(ref).astype(np.float64)
    if a.shape != r.shape:
        raise AssertionError(f"{name}: shape {a.shape} != reference shape {r.shape}")

    a_finite = np.isfinite(a)
    r_finite = np.isfinite(r)
    same_special = (a == r) | (np.isnan(a) & np.isnan(r))
    special_bad = (a_finite != r_finite) | (~a_finite & ~r_finite & ~same_special)
    if special_bad.any():
        where = np.argwhere(special_bad)
        first = tuple(int(i) for i in where[0])
        raise AssertionError(
            f"{name}: inf/NaN positions differ at {len(where)} of {a.size} elements; "
            f"first at {first}: actual {a[first]!r}, reference {r[first]!r}"
        )

    with np.errstate(invalid="ignore"):  # inf - inf at the (already checked) special places
        err = np.where(r_finite, np.abs(a - r), 0.0)
    passes = (err < abs_tol) | (err / (np.abs(np.where(r_finite, r, 0.0)) + 1e-6) < rel_tol)
    failing = r_finite & ~passes
    if failing.any():
        worst = np.unravel_index(np.argmax(np.where(failing, err, -1.0)), a.shape)
        worst = tuple(int(i) for i in worst)
        raise AssertionError(
            f"{name}: {int(failing.sum())} of {a.size} elements out of tolerance "
            f"(abs_tol {abs_tol:g}, rel_tol {rel_tol:g}); worst at {worst}: actual "
            f"{a[worst]!r}, reference {r[worst]!r}, |diff| {err[worst]:.3e}"
        )

    if cos_tol is not None:
        af = a[r_finite]
        rf = r[r_finite]
        denom = float(np.sum(af * af + rf * rf))
        cos_diff = 0.0 if denom == 0.0 else 1.0 - 2.0 * float(np.sum(af * rf)) / denom
        if cos_diff > cos_tol:
            raise AssertionError(f"{name}: cosine difference {cos_diff:.3e} > {cos_tol:g}")


def assert_same_up_to_rounding(actual, expected, *, name: str = "value") -> None:
    """Asserts two runs of one computation agree up to rounding.

    For results of the same fp32 math evaluated with another grouping (e.g. another chunk size,
    which on GPU may pick another matmul algorithm): each element within 1e-6 absolutely (for
    values near 0, where a dot product's rounding is large relative to its result) or within
    4 fp32 ulp / 1 ulp of a bf16 or fp16 output; the same inf/NaN positions.
    """
    a = np.asarray(actual)
    e = np.asarray(expected)
    assert a.dtype == e.dtype and a.shape == e.shape, (name, a.dtype, e.dtype, a.shape, e.shape)
    eps = 2.0**-7 if a.dtype == BF16 else float(np.finfo(a.dtype).eps)
    ulps = 4 if a.dtype == np.float32 else 1
    check_close(a, e, abs_tol=1e-6, rel_tol=ulps * eps * 1.0001, name=name)


# ----------------------------------------------------------------------------------------------
# Oracles
# ----------------------------------------------------------------------------------------------


def _f64(x) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


def _attend_one(query: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float):
    """One query row against its key list: (out [dv], lse, max_logit); lonely -> 0, inf, -inf."""
    if keys.shape[0] == 0:
        return np.zeros(values.shape[1]), np.inf, -np.inf
    logits = scale * (keys @ query)
    top = logits.max()
    weights = np.exp(logits - top)
    total = weights.sum()
    return (weights @ values) / total, top + np.log(total), top


def _sink_factor(sink: float, lse: float) -> float:
    if np.isinf(lse):  # lonely row: output stays 0 whatever the sink
        return 1.0
    with np.errstate(over="ignore"):
        return float(1.0 / (1.0 + np.exp(sink - lse)))


def dense_decode_oracle(
    q,
    k_cache,
    block_table,
    cache_seqlens,
    *,
    head_dim_v: int = 512,
    softmax_scale: float | None = None,
    causal: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Dense paged decode. Returns out [b, s_q, h_q, dv] and lse [b, h_q, s_q], float64.

    Request i covers the positions t < L_i = min(max(cache_seqlens[i], 0), max_blocks * page);
    position t is row t % page of block block_table[i, t // page], and is no key at all when
    that block id is not in [0, num_blocks). With causal, query s sees the positions
    t <= L_i - s_q + s.
    """
    q = _f64(q)
    k_cache = _f64(k_cache)
    block_table = np.asarray(block_table)
    cache_seqlens = np.asarray(cache_seqlens)
    b, s_q, h_q, d_qk = q.shape
    num_blocks, page, h_kv = k_cache.shape[:3]
    group = h_q // h_kv
    scale = d_qk**-0.5 if softmax_scale is None else softmax_scale
    capacity = block_table.shape[1] * page
    out = np.zeros((b, s_q, h_q, head_dim_v))
    lse = np.zeros((b, h_q, s_q))
    for i in range(b):
        length = min(max(int(cache_seqlens[i]), 0), capacity)
        positions, rows = [], []
        for t in range(length):
            block = int(block_table[i, t // page])
            if 0 <= block < num_blocks:
                positions.append(t)
                rows.append(k_cache[block, t % page])
        for s in range(s_q):
            limit = length - s_q + s + 1 if causal else length  # positions t < limit
            seen = [row for t, row in zip(positions, rows, strict=True) if t < limit]
            tokens = np.stack(seen) if seen else np.zeros((0, h_kv, d_qk))
            for h in range(h_q):
                keys = tokens[:, h // group, :]
                o, l, _ = _attend_one(q[i, s, h], keys, keys[:, :head_dim_v], scale)
                out[i, s, h] = o
                lse[i, h, s] = l
    return out, lse


def _selected_rows(cache: np.ndarray, idx: np.ndarray, length: int) -> list[np.ndarray]:
    """Rows of cache [num_blocks, page, 1, d] picked by the first `length` valid slots."""
    num_blocks, page = cache.shape[0], cache.shape[1]
    rows = []
    for slot in range(min(length, idx.shape[0])):
        value = int(idx[slot])
        if 0 <= value < num_blocks * page:
            rows.append(cache[value // page, value % page, 0])
    return rows


def sparse_decode_oracle(
    q,
    k_cache,
    indices,
    *,
    topk_length=None,
    attn_sink=None,
    extra_k_cache=None,
    extra_indices=None,
    extra_topk_length=None,
    softmax_scale: float | None = None,
    head_dim_v: int = 512,
) -> tuple[np.ndarray, np.ndarray]:
    """Sparse decode on a dequantised cache. Returns out [b, s_q, h_q, dv], lse [b, h_q, s_q]."""
    q = _f64(q)
    k_cache = _f64(k_cache)
    indices = np.asarray(indices)
    b, s_q, h_q, d_qk = q.shape
    scale = d_qk**-0.5 if softmax_scale is None else softmax_scale
    if extra_k_cache is not None:
        extra_k_cache = _f64(extra_k_cache)
        extra_indices = np.asarray(extra_indices)
    out = np.zeros((b, s_q, h_q, head_dim_v))
    lse = np.zeros((b, h_q, s_q))
    for i in range(b):
        count = indices.shape[2] if topk_length is None else int(topk_length[i])
        for s in range(s_q):
            rows = _selected_rows(k_cache, indices[i, s], count)
            if extra_k_cache is not None:
                extra_count = (
                    extra_indices.shape[2]
                    if extra_topk_length is None
                    else int(extra_topk_length[i])
                )
                rows += _selected_rows(extra_k_cache, extra_indices[i, s], extra_count)
            keys = np.stack(rows) if rows else np.zeros((0, d_qk))
            for h in range(h_q):
                o, l, _ = _attend_one(q[i, s, h], keys, keys[:, :head_dim_v], scale)
                if attn_sink is not None:
                    o = o * _sink_factor(float(attn_sink[h]), l)
                out[i, s, h] = o
                lse[i, h, s] = l
    return out, lse


def sparse_prefill_oracle(
    q, kv, indices, sm_scale: float, d_v: int = 512, attn_sink=None, topk_length=None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse prefill. Returns out [s_q, h_q, d_v], max_logits [s_q, h_q], lse [s_q, h_q]."""
    q = _f64(q)
    kv = _f64(kv)
    indices = np.asarray(indices)
    s_q, h_q, _ = q.shape
    s_kv = kv.shape[0]
    topk = indices.shape[2]
    out = np.zeros((s_q, h_q, d_v))
    max_logits = np.zeros((s_q, h_q))
    lse = np.zeros((s_q, h_q))
    for t in range(s_q):
        count = topk if topk_length is None else int(topk_length[t])
        picked = [int(j) for j in indices[t, 0, : max(0, min(count, topk))]]
        picked = [j for j in picked if 0 <= j < s_kv]
        keys = kv[picked, 0, :] if picked else np.zeros((0, kv.shape[2]))
        for h in range(h_q):
            o, l, m = _attend_one(q[t, h], keys, keys[:, :d_v], sm_scale)
            if attn_sink is not None:
                o = o * _sink_factor(float(attn_sink[h]), l)
            out[t, h] = o
            max_logits[t, h] = m
            lse[t, h] = l
    return out, max_logits, lse


# ----------------------------------------------------------------------------------------------
# Test data
# ----------------------------------------------------------------------------------------------


def random_values(rng: np.random.Generator, shape: Sequence[int], dtype) -> np.ndarray:
    """N(0, 1) / 10 clamped to [-1, 1], rounded to `dtype` (FlashMLA's test distribution)."""
    x = np.clip(rng.standard_normal(tuple(shape)) / 10.0, -1.0, 1.0)
    return x.astype(np.float32).astype(dtype)


def make_seqlens(
    rng: np.random.Generator,
    b: int,
    s_k: int,
    *,
    s_q: int = 1,
    varlen: bool = False,
    zero_requests: Sequence[int] = (),
) -> np.ndarray:
    """int32 [b]: s_k each, or max(N(s_k, s_k / 2), s_q) if varlen; 0 for `zero_requests`."""
    if varlen:
        lengths = np.maximum(rng.normal(s_k, s_k / 2, size=b), s_q).astype(np.int32)
    else:
        lengths = np.full(b, s_k, np.int32)
    lengths[list(zero_requests)] = 0
    return lengths


def make_paged_cache(
    rng: np.random.Generator,
    seqlens: Sequence[int],
    *,
    page: int,
    h_kv: int,
    d_qk: int,
    dtype,
    extra_blocks_per_seq: int = 1,
    spare_blocks: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A paged cache holding len(seqlens) requests, in randomly permuted blocks.

    Each request owns max_blocks = ceil(max(seqlens) / page) + extra_blocks_per_seq block-table
    entries; `spare_blocks` more blocks belong to nobody. Entries past a request's
    ceil(len / page) blocks are GARBAGE_BLOCK. NaN fills every element no request may read: rows
    at or past a request's length, the blocks it does not use and the spare blocks.
    Returns k_cache [num_blocks, page, h_kv, d_qk] (dtype) and block_table int32 [b, max_blocks].
    """
    seqlens = [int(x) for x in seqlens]
    b = len(seqlens)
    max_blocks = -(-max(seqlens, default=0) // page) + extra_blocks_per_seq
    max_blocks = max(max_blocks, 1)
    num_blocks = b * max_blocks + spare_blocks
    owned = rng.permutation(num_blocks)[: b * max_blocks].reshape(b, max_blocks)
    cache = np.clip(rng.standard_normal((num_blocks, page, h_kv, d_qk)) / 10.0, -1.0, 1.0)
    cache = cache.astype(np.float32)
    readable = np.zeros((num_blocks, page), bool)
    block_table = owned.astype(np.int32)
    for i, length in enumerate(seqlens):
        positions = np.arange(length)
        readable[owned[i, positions // page], positions % page] = True
        block_table[i, -(-length // page) :] = GARBAGE_BLOCK
    cache[~readable] = np.nan
    return cache.astype(dtype), block_table


def make_dense_decode_inputs(
    rng: np.random.Generator,
    *,
    b: int,
    s_q: int,
    s_k: int,
    h_q: int,
    h_kv: int,
    d_qk: int = 576,
    page: int = 64,
    dtype=BF16,
    varlen: bool = False,
    seqlens: Sequence[int] | None = None,
    zero_requests: Sequence[int] = (),
    spare_blocks: int = 2,
) -> dict[str, np.ndarray]:
    """q, k_cache, block_table, cache_seqlens (NumPy; q and k_cache in `dtype`).

    `seqlens` overrides the drawn lengths (e.g. lengths < s_q for causal lonely queries).
    """
    if seqlens is None:
        lengths = make_seqlens(rng, b, s_k, s_q=s_q, varlen=varlen, zero_requests=zero_requests)
    else:
        lengths = np.asarray(seqlens, np.int32)
    k_cache, block_table = make_paged_cache(
        rng, lengths, page=page, h_kv=h_kv, d_qk=d_qk, dtype=dtype, spare_blocks=spare_blocks
    )
    return {
        "q": random_values(rng, (b, s_q, h_q, d_qk), dtype),
        "k_cache": k_cache,
        "block_table": block_table,
        "cache_seqlens": lengths,
    }


#: Block ids outside any cache, with what makes each of them sharp: -1 and the int32 extremes;
#: 2**31 - 64, whose token offset id * 64 wraps to -4096 in int32; 2**26 + 1 and 2**19 + 2,
#: which alias blocks 1 and 2 when id * 64 (a token index) or id * 64 * 576 * 2 (a byte offset,
#: bf16 with one KV head) wraps around 2**32; GARBAGE_BLOCK. `make_wild_block_table_inputs`
#: adds num_blocks itself.
WILD_BLOCK_IDS = (-1, -(2**31), 2**31 - 1, 2**31 - 64, 2**26 + 1, 2**19 + 2, GARBAGE_BLOCK)


def wrapped_aliases(block_id: int, strides: Sequence[int]) -> set[int]:
    """Blocks that `block_id` reaches when block_id * stride wraps around 2**32, for each
    stride (in elements or bytes). Read as int32, a wrapped value >= 2**31 is negative and
    points before the cache; below 2**31 both readings agree."""
    return {(block_id * stride) % 2**32 // stride for stride in strides}


def make_wild_block_table_inputs(
    rng: np.random.Generator,
    *,
    seqlens: Sequence[int],
    max_blocks: int,
    s_q: int,
    h_q: int,
    h_kv: int,
    page: int = 64,
    d_qk: int = 576,
    dtype=BF16,
    wild_entries: Sequence[tuple[int, int]] = (),
    spare_blocks: int = 4,
) -> dict[str, np.ndarray]:
    """Dense decode inputs for the effective-length and bad-block-id rules.

    `seqlens` go in as given (negative, or past the table's capacity max_blocks * page, are
    allowed). Each request owns max_blocks distinct blocks; blocks 0 .. spare_blocks - 1
    belong to nobody. Entry (i, j) of `wild_entries` replaces block_table[i, j] by one of
    WILD_BLOCK_IDS or num_blocks (in turn). NaN fills every cache element that no request may
    read: rows past each effective length, the blocks behind wild entries, the spare blocks,
    and so every block a wild id reaches when its offset wraps around 2**32 (the builder
    asserts that each such block is one of these).
    """
    b = len(seqlens)
    capacity = max_blocks * page
    num_blocks = spare_blocks + b * max_blocks
    owned = (spare_blocks + rng.permutation(b * max_blocks)).reshape(b, max_blocks)
    block_table = owned.astype(np.int64)
    wild_ids = (*WILD_BLOCK_IDS, num_blocks)
    for k, (i, j) in enumerate(wild_entries):
        block_table[i, j] = wild_ids[k % len(wild_ids)]

    cache = np.clip(rng.standard_normal((num_blocks, page, h_kv, d_qk)) / 10.0, -1.0, 1.0)
    readable = np.zeros((num_blocks, page), bool)
    for i, length in enumerate(seqlens):
        for t in range(min(max(int(length), 0), capacity)):
            block = int(block_table[i, t // page])
            if 0 <= block < num_blocks:
                readable[block, t % page] = True
    cache[~readable] = np.nan
    itemsize = np.dtype(dtype).itemsize
    strides = (page, page * h_kv * d_qk, page * h_kv * d_qk * itemsize)
    for block_id in block_table[(block_table < 0) | (block_table >= num_blocks)]:
        for alias in wrapped_aliases(int(block_id), strides):
            assert alias >= num_blocks or not readable[alias].any(), (block_id, alias)
    return {
        "q": random_values(rng, (b, s_q, h_q, d_qk), dtype),
        "k_cache": cache.astype(np.float32).astype(dtype),
        "block_table": block_table.astype(np.int32),
        "cache_seqlens": np.asarray(seqlens, np.int64).astype(np.int32),
    }


def make_sparse_cache_and_indices(
    rng: np.random.Generator,
    *,
    b: int,
    s_q: int,
    topk: int,
    page: int,
    s_kv: int,
    d_qk: int = 576,
    dtype=BF16,
    varlen: bool = True,
    invalid_frac: float = 0.1,
    out_of_range_frac: float = 0.0,
    duplicates: bool = False,
    topk_length: Sequence[int] | None = None,
    nan_unselected: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """A paged single-head cache and top-k indices into it, for sparse decode.

    Request i has a context of length ~ max(N(s_kv, s_kv / 2), 1) (or s_kv) laid out through a
    random block table; each (request, query token) selects topk context positions (distinct
    unless `duplicates`; -1 for missing ones when the context is shorter than topk), stored as
    physical_block * page + row. Then `invalid_frac` of the slots become -1 and
    `out_of_range_frac` become other invalid values (< -1 or >= num_blocks * page).
    NaN fills every token outside the contexts; with `nan_unselected`, also every token no
    counted slot (valid, and before topk_length[i]) selects.
    Returns k_cache [num_blocks, page, 1, d_qk] (dtype) and indices int32 [b, s_q, topk].
    """
    seqlens = make_seqlens(rng, b, s_kv, varlen=varlen)
    seqlens = np.maximum(seqlens, 1)
    cache, block_table = make_paged_cache(
        rng, seqlens, page=page, h_kv=1, d_qk=d_qk, dtype=np.float32, spare_blocks=1
    )
    num_tokens = cache.shape[0] * page
    indices = np.full((b, s_q, topk), -1, np.int64)
    for i in range(b):
        length = int(seqlens[i])
        for s in range(s_q):
            if duplicates:
                positions = rng.integers(0, length, size=topk)
            else:
                positions = rng.permutation(length)[:topk]
            physical = block_table[i, positions // page].astype(np.int64) * page + positions % page
            slots = rng.permutation(topk)[: len(physical)]
            indices[i, s, slots] = physical
    draw = rng.random(indices.shape)
    indices[draw < invalid_frac] = -1
    wild = (draw >= invalid_frac) & (draw < invalid_frac + out_of_range_frac)
    choices = np.array([-2, -(2**31), num_tokens, num_tokens + 7, 2**31 - 1], np.int64)
    indices[wild] = rng.choice(choices, size=int(wild.sum()))
    indices = indices.astype(np.int32)

    if nan_unselected:
        used = np.zeros(num_tokens, bool)
        for i in range(b):
            count = topk if topk_length is None else int(topk_length[i])
            counted = indices[i, :, : max(0, min(count, topk))].reshape(-1)
            counted = counted[(counted >= 0) & (counted < num_tokens)]
            used[counted] = True
        flat = cache.reshape(num_tokens, d_qk)
        flat[~used] = np.nan
    return cache.astype(dtype), indices


def make_sparse_prefill_inputs(
    rng: np.random.Generator,
    *,
    s_q: int,
    s_kv: int,
    h_q: int,
    topk: int,
    d_qk: int = 576,
    dtype=BF16,
    invalid_frac: float = 0.1,
    out_of_range_frac: float = 0.05,
    with_topk_length: bool = False,
    nan_unselected: bool = True,
) -> dict[str, np.ndarray | None]:
    """q [s_q, h_q, d_qk], kv [s_kv, 1, d_qk], indices int32 [s_q, 1, topk], topk_length.

    Each token selects distinct positions of [0, s_kv) (-1 pads when s_kv < topk); then
    `invalid_frac` slots become -1 and `out_of_range_frac` become other invalid values (< -1 or
    >= s_kv). topk_length (if asked) is uniform in [0, topk] with 0 and topk both present.
    With `nan_unselected`, kv rows no counted slot selects are NaN.
    """
    indices = np.full((s_q, 1, topk), -1, np.int64)
    for t in range(s_q):
        positions = rng.permutation(s_kv)[:topk]
        indices[t, 0, rng.permutation(topk)[: len(positions)]] = positions
    draw = rng.random(indices.shape)
    indices[draw < invalid_frac] = -1
    wild = (draw >= invalid_frac) & (draw < invalid_frac + out_of_range_frac)
    choices = np.array([-2, -(2**31), s_kv, s_kv + 3, 2**31 - 1], np.int64)
    indices[wild] = rng.choice(choices, size=int(wild.sum()))
    indices = indices.astype(np.int32)

    topk_length = None
    if with_topk_length:
        topk_length = rng.integers(0, topk + 1, size=s_q).astype(np.int32)
        topk_length[0] = 0
        if s_q > 1:
            topk_length[1] = topk

    kv = np.clip(rng.standard_normal((s_kv, 1, d_qk)) / 10.0, -1.0, 1.0).astype(np.float32)
    if nan_unselected:
        used = np.zeros(s_kv, bool)
        for t in range(s_q):
            count = topk if topk_length is None else int(topk_length[t])
            counted = indices[t, 0, :count]
            used[counted[(counted >= 0) & (counted < s_kv)]] = True
        kv[~used] = np.nan
    return {
        "q": random_values(rng, (s_q, h_q, d_qk), dtype),
        "kv": kv.astype(dtype),
        "indices": indices,
        "topk_length": topk_length,
    }


# ----------------------------------------------------------------------------------------------
# FP8 caches for sparse decode: the byte layouts of docs/ops.md, read independently in NumPy
# ----------------------------------------------------------------------------------------------

#: Per layout: (d_qk, NoPE dims, NoPE values per scale, bytes per token). V32 keeps each token's
#: 656 bytes together (512 e4m3 | 4 float32 scales | 64 bf16); MODEL1 stores a block's page * 576
#: token bytes (448 e4m3 | 64 bf16 each) and then its page * 8 scale bytes (7 e8m0 | 1 pad each).
FP8_LAYOUT_SIZES = {"V32": (576, 512, 128, 656), "MODEL1": (512, 448, 64, 584)}
#: MODEL1: the token bytes and the scale bytes of one token.
MODEL1_TOKEN_BYTES = 576
MODEL1_SCALE_BYTES = 8


def fp8_layout_of(cache) -> str:
    """The layout whose bytes per token are the last dim of `cache`."""
    width = np.shape(cache)[-1]
    for name, sizes in FP8_LAYOUT_SIZES.items():
        if sizes[3] == width:
            return name
    raise ValueError(f"no FP8 layout has {width} bytes per token")


def e4m3fn_values() -> np.ndarray:
    """float64 [256]: the value of each float8_e4m3fn bit pattern (bias 7, no infinities;
    S.1111.111 is NaN), from the format's definition."""
    values = np.empty(256)
    for byte in range(256):
        sign = -1.0 if byte & 0x80 else 1.0
        exponent, mantissa = (byte >> 3) & 0xF, byte & 0x7
        if exponent == 0xF and mantissa == 0x7:
            values[byte] = np.nan
        elif exponent == 0:
            values[byte] = sign * mantissa / 8.0 * 2.0**-6
        else:
            values[byte] = sign * (1.0 + mantissa / 8.0) * 2.0 ** (exponent - 7)
    return values


@functools.cache
def _e4m3fn_table() -> np.ndarray:
    table = e4m3fn_values()
    table.flags.writeable = False
    return table


def fp8_cache_bytes(cache) -> np.ndarray:
    """The raw bytes of an FP8 cache (float8_e4m3fn or uint8, NumPy or JAX) as uint8."""
    raw = np.asarray(cache)
    assert raw.dtype.itemsize == 1, raw.dtype
    return raw.view(np.uint8)


def _bf16_bits_to_f64(raw: np.ndarray) -> np.ndarray:
    """uint8 [..., 2 n] little-endian bfloat16 patterns -> float64 [..., n]."""
    bits = np.ascontiguousarray(raw).view("<u2").astype(np.uint32) << 16
    return bits.view(np.float32).astype(np.float64)


def dequantize_fp8_tokens(cache, tokens) -> np.ndarray:
    """float64 [n, d_qk]: the dequantised rows of the flat token ids `tokens` (int [n], each in
    [0, num_blocks * page)) of an FP8 cache [num_blocks, page, 1, bytes per token]."""
    raw = fp8_cache_bytes(cache)
    layout = fp8_layout_of(raw)
    d_qk, d_nope, tile, width = FP8_LAYOUT_SIZES[layout]
    num_blocks, page = raw.shape[:2]
    block, row = np.divmod(np.asarray(tokens, np.int64), page)
    if layout == "V32":
        token = raw[block, row, 0]
        scales = np.ascontiguousarray(token[:, d_nope : d_nope + 16]).view("<f4")
        rope = token[:, d_nope + 16 :]
    else:
        flat = raw.reshape(num_blocks, page * width)
        split = page * MODEL1_TOKEN_BYTES
        token = flat[:, :split].reshape(num_blocks, page, MODEL1_TOKEN_BYTES)[block, row]
        exponents = flat[:, split:].reshape(num_blocks, page, MODEL1_SCALE_BYTES)[block, row]
        exponents = exponents[:, : d_nope // tile].astype(np.int64)
        scales = np.where(exponents == 255, np.nan, np.ldexp(1.0, exponents - 127))
        rope = token[:, d_nope:]
    nope = _e4m3fn_table()[token[:, :d_nope]].reshape(len(block), d_nope // tile, tile)
    nope *= scales[:, :, None]
    out = np.empty((len(block), d_qk))
    out[:, :d_nope] = nope.reshape(len(block), d_nope)
    out[:, d_nope:] = _bf16_bits_to_f64(rope)
    return out


def dequantize_fp8_cache(cache) -> np.ndarray:
    """float64 [num_blocks, page, 1, d_qk]: a whole FP8 cache, dequantised."""
    raw = fp8_cache_bytes(cache)
    num_blocks, page = raw.shape[:2]
    return dequantize_fp8_tokens(raw, np.arange(num_blocks * page)).reshape(num_blocks, page, 1, -1)


def counted_valid_slots(indices: np.ndarray, lengths, num_tokens: int) -> np.ndarray:
    """bool [b, s_q, topk]: slot j of request i counts (j < lengths[i] clamped to [0, topk])
    and holds a token id in [0, num_tokens)."""
    b, _, topk = indices.shape
    count = np.full(b, topk) if lengths is None else np.clip(np.asarray(lengths, np.int64), 0, topk)
    counted = np.arange(topk)[None, None, :] < count[:, None, None]
    values = np.asarray(indices, np.int64)
    return counted & (values >= 0) & (values < num_tokens)


def counted_tokens(indices, lengths, num_tokens: int) -> np.ndarray:
    """bool [num_tokens]: the tokens that some counted valid slot selects."""
    values = np.asarray(indices, np.int64)
    used = np.zeros(num_tokens, bool)
    used[values[counted_valid_slots(values, lengths, num_tokens)]] = True
    return used


def sparse_decode_fp8_oracle(
    q,
    k_cache,
    indices,
    *,
    topk_length=None,
    attn_sink=None,
    extra_k_cache=None,
    extra_indices=None,
    extra_topk_length=None,
    softmax_scale: float | None = None,
    head_dim_v: int = 512,
    workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`sparse_decode_oracle` on the dequantised FP8 caches, vectorised for large shapes (b 321,
    h_q 128, 4096 keys per query). Returns out [b, s_q, h_q, dv], lse [b, h_q, s_q], float64.

    k_cache, extra_k_cache: FP8 caches (raw bytes, V32 or MODEL1). Per request, the distinct
    tokens that its counted valid slots select are dequantised once (dequantize_fp8_tokens);
    each (request, query token) then attends its slots' rows (a token selected twice is two
    keys) with all heads in one float64 matrix product. `workers` threads (default: one per
    CPU) gather the keys of a chunk of requests, then this thread runs the chunk's products
    (which use BLAS threads of their own).
    """
    q = _f64(q)
    b, s_q, h_q, d_qk = q.shape
    scale = d_qk**-0.5 if softmax_scale is None else softmax_scale
    sources = [(fp8_cache_bytes(k_cache), np.asarray(indices), topk_length)]
    if extra_k_cache is not None:
        sources.append(
            (fp8_cache_bytes(extra_k_cache), np.asarray(extra_indices), extra_topk_length)
        )
    for cache, slots, _ in sources:
        assert FP8_LAYOUT_SIZES[fp8_layout_of(cache)][0] == d_qk, (cache.shape, d_qk)
        assert slots.shape[:2] == (b, s_q), slots.shape
    sink = None if attn_sink is None else _f64(attn_sink)

    def request_keys(i: int) -> list[np.ndarray]:
        """Per query token of request i, float64 [keys, d_qk]: the rows of its counted valid
        slots in slot order, main cache first."""
        parts = [[] for _ in range(s_q)]
        for cache, slots, lengths in sources:
            num_tokens = cache.shape[0] * cache.shape[1]
            count = None if lengths is None else np.asarray(lengths)[i : i + 1]
            valid = counted_valid_slots(slots[i : i + 1], count, num_tokens)[0]
            tokens, where = np.unique(slots[i][valid].astype(np.int64), return_inverse=True)
            rows = dequantize_fp8_tokens(cache, tokens)
            for s, part in enumerate(np.split(where, np.cumsum(valid.sum(axis=1))[:-1])):
                parts[s].append(rows[part])
        return [np.concatenate(p) for p in parts]

    out = np.zeros((b, s_q, h_q, head_dim_v))
    lse = np.full((b, h_q, s_q), np.inf)  # lonely rows keep out 0 and lse +inf, whatever the sink
    workers = workers or os.cpu_count() or 1
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for first in range(0, b, 2 * workers):
            chunk = range(first, min(b, first + 2 * workers))
            for i, keys in zip(chunk, list(pool.map(request_keys, chunk)), strict=True):
                for s, k in enumerate(keys):
                    if k.shape[0] == 0:
                        continue
                    logits = scale * (q[i, s] @ k.T)  # [h_q, keys]
                    top = logits.max(axis=1)
                    weights = np.exp(logits - top[:, None])
                    total = weights.sum(axis=1)
                    # All of k, then V's columns: contiguous operands for BLAS.
                    o = (weights @ k)[:, :head_dim_v] / total[:, None]
                    row_lse = top + np.log(total)
                    if sink is not None:
                        with np.errstate(over="ignore"):
                            o *= (1.0 / (1.0 + np.exp(sink - row_lse)))[:, None]
                    out[i, s] = o
                    lse[i, :, s] = row_lse
    return out, lse


def sparse_cache_blocks(b: int, s_k: int, page: int, *, length_cap: int = 2) -> int:
    """Blocks of the cache make_sparse_selection lays out: ceil(length_cap * s_k / page) per
    request, and one spare block that belongs to nobody."""
    return b * -(-length_cap * s_k // page) + 1


def make_sparse_selection(
    rng: np.random.Generator,
    *,
    b: int,
    s_q: int,
    topk: int,
    page: int,
    s_k: int,
    varlen: bool = True,
    length_cap: int = 2,
    invalid_frac: float = 0.05,
    out_of_range_frac: float = 0.02,
    duplicates: bool = False,
) -> tuple[np.ndarray, int, np.ndarray]:
    """Top-k indices into a paged cache, drawn as make_sparse_cache_and_indices draws them but
    vectorised (b = 321 with topk 2048 in well under a second), and without the cache.

    Request i has a context of max(N(s_k, s_k / 2), 1) tokens (s_k without varlen), capped at
    length_cap * s_k, laid out through a random block table in a cache of
    sparse_cache_blocks(b, s_k, page, length_cap=length_cap) blocks. Each (request, query
    token) picks topk context positions (distinct unless `duplicates`; -1 for missing ones when
    the context is shorter), stored as physical_block * page + row in random slots. Then
    `invalid_frac` of the slots become -1 and `out_of_range_frac` other invalid values (< -1 or
    >= num_blocks * page). Returns (indices int32 [b, s_q, topk], num_blocks, context lengths
    int32 [b]).
    """
    cap = length_cap * s_k
    max_blocks = -(-cap // page)
    num_blocks = sparse_cache_blocks(b, s_k, page, length_cap=length_cap)
    num_tokens = num_blocks * page
    lengths = np.clip(make_seqlens(rng, b, s_k, varlen=varlen), 1, cap).astype(np.int64)
    owned = rng.permutation(num_blocks)[: b * max_blocks].reshape(b, max_blocks)
    span = lengths[:, None, None]
    if duplicates:
        positions = (rng.random((b, s_q, topk)) * span).astype(np.int64)
        present = np.ones(positions.shape, bool)
    else:
        # A random order of each context (the positions past its length sort last).
        keys = rng.random((b, s_q, cap))
        keys[np.broadcast_to(np.arange(cap) >= span, keys.shape)] = 2.0
        positions = np.argsort(keys, axis=-1)[..., :topk]
        present = positions < span
        if cap < topk:
            pad = ((0, 0), (0, 0), (0, topk - cap))
            positions = np.pad(positions, pad)
            present = np.pad(present, pad)
    requests = np.arange(b)[:, None, None]
    physical = owned[requests, positions // page] * page + positions % page
    indices = np.where(present, physical, -1)
    shuffle = np.argsort(rng.random(indices.shape), axis=-1)
    indices = np.take_along_axis(indices, shuffle, axis=-1)
    draw = rng.random(indices.shape)
    indices[draw < invalid_frac] = -1
    wild = (draw >= invalid_frac) & (draw < invalid_frac + out_of_range_frac)
    choices = np.array([-2, -(2**31), num_tokens, num_tokens + 7, 2**31 - 1], np.int64)
    indices[wild] = rng.choice(choices, size=int(wild.sum()))
    return indices.astype(np.int32), num_blocks, lengths.astype(np.int32)
