"""The split-KV scheduler and combine references against plain-Python / float64 oracles."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla
from jax_flashmla.reference.schedule import combine_splits, mla_metadata

BLOCK, OVERHEAD = 64, 5


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
    metadata, num_splits = mla_metadata(
        jnp.asarray(lengths, jnp.int32),
        num_parts=num_parts,
        block_tokens=BLOCK,
        fixed_overhead=OVERHEAD,
        fixed_length=fixed_length,
    )
    metadata, num_splits = np.asarray(metadata), np.asarray(num_splits)
    n, owner = schedule_oracle(lengths, num_parts, fixed_length)
    pieces = [len({p for (i, _), p in owner.items() if i == r}) for r in range(b)]
    np.testing.assert_array_equal(num_splits, np.concatenate([[0], np.cumsum(pieces)]))
    assert num_splits[-1] <= b + num_parts - 1  # the workspace has b + num_parts rows
    seen = {}
    for p, row in enumerate(metadata):
        begin, end, begin_block, end_block, split, first_split, last_split, pad = row
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
    metadata, num_splits = mla_metadata(
        jnp.zeros((0,), jnp.int32), num_parts=4, block_tokens=BLOCK, fixed_overhead=OVERHEAD
    )
    assert num_splits.tolist() == [0]
    assert metadata.tolist() == [[0, -1, 0, 0, 0, 0, 0, 0]] * 4


def test_get_mla_metadata_sizes_parts_like_flashmla():
    lens = jnp.array([10, 4000], jnp.int32)
    # 132 SMs / h_kv / ceil(s_q*h_q/h_kv / 64)
    assert jax_flashmla.get_mla_metadata(lens, 128, 1)[0].shape == (66, 8)
    assert jax_flashmla.get_mla_metadata(lens, 16, 1)[0].shape == (132, 8)
    assert jax_flashmla.get_mla_metadata(lens, 64, 2)[0].shape == (66, 8)
    assert jax_flashmla.get_mla_metadata(lens, 512, 8)[0].shape == (2, 8)
    assert jax_flashmla.get_mla_metadata(lens, 64 * 200, 1)[0].shape == (1, 8)


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


def make_partials(rng, b, s_q, h, d, rows_extra=3, empty_fraction=0.2):
    pieces = rng.integers(1, 4, b)
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
