"""The split-KV scheduler and combine references against plain-Python / float64 oracles."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla
from jax_flashmla._src import platform
from jax_flashmla._src.geometry import (
    METADATA_FIELDS,
    SCHEDULER_BLOCK_TOKENS,
    SCHEDULER_FIXED_OVERHEAD,
    MetadataField,
)
from jax_flashmla.reference.schedule import combine_splits, mla_metadata

BLOCK, OVERHEAD = SCHEDULER_BLOCK_TOKENS, SCHEDULER_FIXED_OVERHEAD
INT32_MAX = 2**31 - 1

_schedule = jax.jit(
    mla_metadata, static_argnames=("num_parts", "block_tokens", "fixed_overhead", "fixed_length")
)


def run_schedule(lengths, num_parts, fixed_length=-1):
    metadata, num_splits = _schedule(
        jnp.asarray(lengths, jnp.int32),
        num_parts=num_parts,
        block_tokens=BLOCK,
        fixed_overhead=OVERHEAD,
        fixed_length=fixed_length,
    )
    assert metadata.dtype == jnp.int32 and num_splits.dtype == jnp.int32
    return np.asarray(metadata), np.asarray(num_splits)


def schedule_oracle(lengths, num_parts, fixed_length=-1):
    """Walk the cost line block by block: which part processes which block of which request."""
    lengths = [fixed_length if fixed_length >= 0 else max(int(x), 0) for x in lengths]
    n = [math.ceil(x / BLOCK) for x in lengths]
    total = sum(k + OVERHEAD for k in n)
    payload = max(math.ceil(total / num_parts), 1)
    owner = {}  # (request, block) -> part; a zero-length request owns "block" 0
    position = 0
    for i, blocks in enumerate(n):
        for j in range(max(blocks, 1)):
            owner[(i, j)] = (position + j) // payload
        position += blocks + OVERHEAD
    return n, owner


def check_schedule(lengths, num_parts, fixed_length=-1):
    b = len(lengths)
    metadata, num_splits = run_schedule(lengths, num_parts, fixed_length)
    n, owner = schedule_oracle(lengths, num_parts, fixed_length)
    pieces = [len({p for (i, _), p in owner.items() if i == r}) for r in range(b)]
    np.testing.assert_array_equal(num_splits, np.concatenate([[0], np.cumsum(pieces)]))
    assert num_splits[-1] <= b + num_parts - 1  # the workspace has b + num_parts rows
    seen = {}
    for p, row in enumerate(metadata):
        f = MetadataField
        begin, end, begin_block, end_block = row[
            [f.BEGIN_REQ, f.END_REQ, f.BEGIN_BLOCK, f.END_BLOCK]
        ]
        split, first_split, last_split, pad = row[
            [f.BEGIN_SPLIT_IDX, f.IS_FIRST_REQ_SPLIT, f.IS_LAST_REQ_SPLIT, f.PAD]
        ]
        assert pad == 0
        if begin > end:
            assert list(row) == [b, -1, 0, 0, 0, 0, 0, 0], row
            continue
        for i in range(begin, end + 1):
            lo = begin_block if i == begin else 0
            hi = end_block if i == end else n[i]
            if n[i] == 0:
                assert (lo, hi) == (0, 0)
                seen[(i, 0)] = p
            for j in range(lo, hi):
                assert (i, j) not in seen, "block processed twice"
                seen[(i, j)] = p
        first_part = min(q for (i, _), q in owner.items() if i == begin)
        assert split == p - first_part
        assert first_split == (pieces[begin] > 1) and last_split == (pieces[end] > 1)
    assert seen == owner, "every block processed exactly once, by the part that owns it"


@pytest.mark.parametrize("num_parts", [1, 3, 66, 132])
def test_schedule_matches_oracle(rng, num_parts):
    for b in (1, 2, 7, 64):
        lengths = np.maximum(rng.normal(3000, 1500, b), 0).astype(int)
        lengths[rng.random(b) < 0.2] = 0
        check_schedule(list(lengths), num_parts)


def test_schedule_edge_cases():
    check_schedule([0], 5)
    check_schedule([0, 0, 0], 132)
    check_schedule([1], 132)
    check_schedule([64, 65, 128, 129], 4)
    check_schedule([100_000], 132)
    check_schedule([5, 7], 132, fixed_length=2048)


def test_schedule_empty_batch():
    metadata, num_splits = run_schedule([], 4)
    assert num_splits.tolist() == [0]
    assert metadata.tolist() == [[0, -1, 0, 0, 0, 0, 0, 0]] * 4


def test_get_mla_metadata_sizes_parts_like_flashmla():
    lens = jnp.array([10, 4000], jnp.int32)
    # 132 SMs / h_kv / ceil(s_q*h_q/h_kv / 64)
    assert jax_flashmla.get_mla_metadata(lens, 128, 1)[0].shape == (66, METADATA_FIELDS)
    assert jax_flashmla.get_mla_metadata(lens, 16, 1)[0].shape == (132, METADATA_FIELDS)
    assert jax_flashmla.get_mla_metadata(lens, 64, 2)[0].shape == (66, METADATA_FIELDS)
    assert jax_flashmla.get_mla_metadata(lens, 512, 8)[0].shape == (2, METADATA_FIELDS)
    assert jax_flashmla.get_mla_metadata(lens, 64 * 200, 1)[0].shape == (1, METADATA_FIELDS)


# ------------------------------------------------------------------------------------------
# Lengths near 2**31 and large batches: cost positions past int32
# ------------------------------------------------------------------------------------------


def closed_form_schedule(lengths, num_parts, fixed_length=-1):
    """The scheme in Python integers (exact at any size), request by request: each request's
    span of cost positions and the parts it meets. Returns (metadata, num_splits) as int64."""
    lengths = [fixed_length if fixed_length >= 0 else max(int(x), 0) for x in lengths]
    b = len(lengths)
    n = [-(-x // BLOCK) for x in lengths]
    total = sum(k + OVERHEAD for k in n)
    payload = max(-(-total // num_parts), 1)
    metadata = np.zeros((num_parts, METADATA_FIELDS), np.int64)
    metadata[:, MetadataField.BEGIN_REQ] = b
    metadata[:, MetadataField.END_REQ] = -1
    num_splits = [0]
    start = 0
    for i, blocks in enumerate(n):
        span_end = start + max(blocks, 1)
        first, last = start // payload, (span_end - 1) // payload
        pieces = last - first + 1
        num_splits.append(num_splits[-1] + pieces)
        for p in range(first, last + 1):
            row = metadata[p]
            if row[MetadataField.END_REQ] == -1:  # i is the first request of part p
                row[MetadataField.BEGIN_REQ] = i
                row[MetadataField.BEGIN_BLOCK] = max(p * payload - start, 0)
                row[MetadataField.BEGIN_SPLIT_IDX] = p - first
                row[MetadataField.IS_FIRST_REQ_SPLIT] = pieces > 1
            row[MetadataField.END_REQ] = i
            row[MetadataField.END_BLOCK] = min((p + 1) * payload - start, blocks)
            row[MetadataField.IS_LAST_REQ_SPLIT] = pieces > 1
        start += blocks + OVERHEAD
    return metadata, np.array(num_splits, np.int64)


def check_bounds(metadata, num_splits, lengths, num_parts):
    b = len(lengths)
    assert np.all(np.diff(num_splits) >= 1), "every request has at least one piece"
    assert num_splits[0] == 0 and num_splits[-1] <= b + num_parts - 1
    f = MetadataField
    used = metadata[:, f.BEGIN_REQ] <= metadata[:, f.END_REQ]
    rows = metadata[used]
    assert np.all((rows[:, f.BEGIN_REQ] >= 0) & (rows[:, f.END_REQ] < b))
    n = -(-np.maximum(np.asarray(lengths, np.int64), 0) // BLOCK)
    assert np.all(
        (rows[:, f.BEGIN_BLOCK] >= 0)
        & (rows[:, f.BEGIN_BLOCK] < np.maximum(n, 1)[rows[:, f.BEGIN_REQ]])
    )
    assert np.all((rows[:, f.END_BLOCK] >= 0) & (rows[:, f.END_BLOCK] <= n[rows[:, f.END_REQ]]))
    pieces = np.diff(num_splits)
    assert np.all(rows[:, f.BEGIN_SPLIT_IDX] < pieces[rows[:, f.BEGIN_REQ]])
    empty = metadata[~used]
    assert np.all(empty == [b, -1, 0, 0, 0, 0, 0, 0])


def near_int32_max_lengths(rng, b):
    lengths = rng.integers(INT32_MAX - 10**6, INT32_MAX, b, endpoint=True)
    lengths[:: max(b // 7, 1)] = INT32_MAX
    lengths[1 :: max(b // 5, 1)] = INT32_MAX - 63
    lengths[2 :: max(b // 3, 1)] = 0
    lengths[3 :: max(b // 4, 1)] = -(2**31)
    return lengths.astype(np.int32)


@pytest.mark.parametrize("b", [64, 1000, 300_000])
@pytest.mark.parametrize("num_parts", [1, 66, 132])
def test_schedule_exact_past_int32(rng, b, num_parts):
    """Positions reach b * 2**25: exact against Python integers, in bounds, non-decreasing."""
    lengths = near_int32_max_lengths(rng, b)
    metadata, num_splits = run_schedule(lengths, num_parts)
    want_metadata, want_splits = closed_form_schedule(lengths, num_parts)
    np.testing.assert_array_equal(num_splits, want_splits)
    np.testing.assert_array_equal(metadata, want_metadata)
    check_bounds(metadata, num_splits, lengths, num_parts)


def test_closed_form_agrees_with_block_walk(rng):
    """The closed form used past int32 is the scheme of the block-by-block oracle."""
    for num_parts in (1, 5, 66):
        lengths = list(np.maximum(rng.normal(2000, 1500, 40), -10).astype(int))
        metadata, num_splits = closed_form_schedule(lengths, num_parts)
        got = run_schedule(lengths, num_parts)
        np.testing.assert_array_equal(got[0], metadata)
        np.testing.assert_array_equal(got[1], num_splits)
        check_schedule(lengths, num_parts)


def test_schedule_fixed_length_near_int32_max():
    topk = INT32_MAX - 63  # the largest multiple of 64 in int32
    lengths = np.zeros(300_000, np.int32)
    metadata, num_splits = run_schedule(lengths, 132, fixed_length=topk)
    want = closed_form_schedule(lengths, 132, fixed_length=topk)
    np.testing.assert_array_equal(metadata, want[0])
    np.testing.assert_array_equal(num_splits, want[1])
    got = jax.jit(lambda x: jax_flashmla.get_mla_metadata(x, 16, 1, num_heads_q=16, topk=topk))(
        lengths
    )
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_get_mla_metadata_exact_on_every_path(rng):
    """The public op (reference path) and the primitive's CPU lowering (the kernel path traced
    for a Hopper GPU, run on the CPU) give the exact schedule, with or without jax_enable_x64."""
    lengths = near_int32_max_lengths(rng, 5000)
    want = closed_form_schedule(lengths, 66)
    got = [jax.jit(lambda x: jax_flashmla.get_mla_metadata(x, 128, 1))(lengths)]
    with jax.enable_x64(True):
        got.append(jax.jit(lambda x: jax_flashmla.get_mla_metadata(x, 128, 1))(lengths))
    if platform.extension() is not None and jax.default_backend() == "cpu":
        with platform.assume_device():
            got.append(jax.jit(lambda x: jax_flashmla.get_mla_metadata(x, 128, 1))(lengths))
    for metadata, num_splits in got:
        assert metadata.dtype == num_splits.dtype == jnp.int32
        np.testing.assert_array_equal(metadata, want[0])
        np.testing.assert_array_equal(num_splits, want[1])


def test_get_mla_metadata_rejects_counts_past_int32():
    """num_splits counts up to b + num_sm_parts - 1 pieces in int32: a larger batch is refused
    at trace time in every implementation."""
    lens = jax.ShapeDtypeStruct((INT32_MAX - 131,), jnp.int32)  # 132 parts at 16 query rows
    for implementation in (None, "xla", "cuda"):
        with pytest.raises(
            ValueError, match=r"get_mla_metadata: batch \+ num_sm_parts must be <= 2\*\*31 - 1"
        ):
            jax.jit(
                lambda x, impl=implementation: jax_flashmla.get_mla_metadata(
                    x, 16, 1, implementation=impl
                )
            ).trace(lens)
    # One request fewer fits.
    jax.jit(lambda x: jax_flashmla.get_mla_metadata(x, 16, 1)).trace(
        jax.ShapeDtypeStruct((INT32_MAX - 132,), jnp.int32)
    )


def combine_oracle(partial_o, partial_lse, num_splits, sink):
    b = len(num_splits) - 1
    _, s_q, h, d = partial_o.shape
    out = np.zeros((b, s_q, h, d))
    lse = np.zeros((b, h, s_q))
    for i in range(b):
        rows = range(num_splits[i], num_splits[i + 1])
        for t in range(s_q):
            for k in range(h):
                ls = np.array([partial_lse[r, t, k] for r in rows], np.float64)
                if len(ls) == 0 or np.all(ls == -np.inf):
                    lse[i, k, t] = np.inf
                    continue
                m = ls.max()
                total = np.log(np.sum(np.exp(ls - m))) + m
                acc = sum(
                    np.exp(lr - total) * partial_o[r, t, k].astype(np.float64)
                    for lr, r in zip(ls, rows, strict=True)
                )
                if sink is not None:
                    acc = acc / (1 + np.exp(np.float64(sink[k]) - total))
                out[i, t, k] = acc
                lse[i, k, t] = total
    return out, lse


def make_partials(rng, b, s_q, h, d, rows_extra=3, empty_fraction=0.2, max_pieces=3):
    pieces = rng.integers(1, max_pieces + 1, b)
    pieces[rng.random(b) < 0.2] = 1
    num_splits = np.concatenate([[0], np.cumsum(pieces)]).astype(np.int32)
    rows = int(num_splits[-1]) + rows_extra
    partial_o = rng.normal(size=(rows, s_q, h, d)).astype(np.float32)
    partial_lse = rng.normal(2.0, 3.0, size=(rows, s_q, h)).astype(np.float32)
    empty = rng.random((rows, s_q, h)) < empty_fraction
    partial_lse[empty] = -np.inf
    partial_o[empty] = 0.0
    partial_o[num_splits[-1] :] = np.nan  # unused workspace rows must never be read
    partial_lse[num_splits[-1] :] = np.nan
    return partial_o, partial_lse, num_splits


@pytest.mark.parametrize("with_sink", [False, True])
@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float16])
def test_combine_reference(rng, with_sink, out_dtype):
    b, s_q, h, d = 6, 2, 3, 16
    partial_o, partial_lse, num_splits = make_partials(rng, b, s_q, h, d)
    partial_lse[num_splits[2] : num_splits[3]] = -np.inf  # a request with no key anywhere
    partial_o[num_splits[2] : num_splits[3]] = 0
    sink = np.array([0.5, -np.inf, np.inf], np.float32) if with_sink else None
    out, lse = jax.jit(combine_splits, static_argnames="out_dtype")(
        partial_o, partial_lse, num_splits, sink, out_dtype=out_dtype
    )
    ref_out, ref_lse = combine_oracle(partial_o, partial_lse, num_splits, sink)
    assert out.dtype == out_dtype and lse.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out, np.float64), ref_out, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(np.asarray(lse), ref_lse, rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(out)[2] == 0) and np.all(np.asarray(lse)[2] == np.inf)
    if with_sink:
        assert np.all(np.asarray(out)[:, :, 2] == 0)  # sink +inf silences the head
