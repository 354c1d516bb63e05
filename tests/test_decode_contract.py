"""Dense decode's contract at its edges, against the float64 oracle: effective lengths (negative,
past the block table's capacity), block ids outside the cache (masked, never read), and the
trace-time rules of the op: head dims in every implementation and the kernel's size limits."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import oracle_decode as od
import pytest

import jax_flashmla as fm
from jax_flashmla._src import platform
from jax_flashmla.reference.decode import dense_decode

S = jax.ShapeDtypeStruct
PAGE = 64
MAX_BLOCKS = 3
CAPACITY = MAX_BLOCKS * PAGE
INT32_MAX = 2**31 - 1

# Lengths: negative, 0, inside, exactly the capacity, past it, int32's largest.
SEQLENS = (-5, 0, 37, CAPACITY, CAPACITY + 100, INT32_MAX, 150, -(2**31))
# (request, block-table entry) pairs inside each request's effective length that get a block id
# outside the cache (od.WILD_BLOCK_IDS, then num_blocks). Request 2 loses its only block.
WILD_ENTRIES = ((2, 0), (3, 1), (4, 0), (4, 2), (5, 1), (6, 0), (6, 2), (3, 2))

_reference = jax.jit(dense_decode, static_argnames=("softmax_scale", "causal", "chunk_size"))


def wild_inputs(rng, *, s_q=1, h_q=4, h_kv=1, dtype=od.BF16, page=PAGE):
    return od.make_wild_block_table_inputs(
        rng,
        seqlens=SEQLENS,
        max_blocks=MAX_BLOCKS,
        s_q=s_q,
        h_q=h_q,
        h_kv=h_kv,
        page=page,
        dtype=dtype,
        wild_entries=WILD_ENTRIES,
    )


def check_against_oracle(out, lse, inputs, **kwargs):
    ref_out, ref_lse = od.dense_decode_oracle(
        inputs["q"], inputs["k_cache"], inputs["block_table"], inputs["cache_seqlens"], **kwargs
    )
    out, lse = np.asarray(out), np.asarray(lse)
    od.check_close(out, ref_out, name="out", **od.DENSE_DECODE_OUT_TOL)
    od.check_close(lse, ref_lse, name="lse", **od.DENSE_DECODE_LSE_TOL)
    lonely = np.isinf(ref_lse)
    assert np.all(out.astype(np.float64)[lonely.transpose(0, 2, 1)] == 0.0)
    assert np.all(lse[lonely] == np.inf) and np.all(np.isfinite(out.astype(np.float64)))
    return ref_lse


def test_wild_block_ids_are_sharp():
    """The test data plants what it says: every wild id is outside the cache, and the ids
    built to alias blocks 1 and 2 through 32-bit wrap-around do."""
    num_blocks = 4 + len(SEQLENS) * MAX_BLOCKS
    assert all(not 0 <= i < num_blocks for i in od.WILD_BLOCK_IDS)
    assert 1 in od.wrapped_aliases(2**26 + 1, [PAGE])  # token index id * 64
    assert 2 in od.wrapped_aliases(2**19 + 2, [PAGE * 576 * 2])  # bf16 byte offset


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    ("s_q", "h_q", "h_kv", "dtype"),
    [(1, 4, 1, od.BF16), (3, 4, 1, od.FP16), (2, 8, 2, od.BF16)],
)
def test_reference_effective_length_and_wild_ids(rng, causal, s_q, h_q, h_kv, dtype):
    inputs = wild_inputs(rng, s_q=s_q, h_q=h_q, h_kv=h_kv, dtype=dtype)
    out, lse = _reference(*(jnp.asarray(inputs[k]) for k in inputs), causal=causal)
    ref_lse = check_against_oracle(out, lse, inputs, causal=causal)
    # Negative lengths and a request whose only block id is wild: every query lonely.
    assert np.all(np.isinf(ref_lse[[0, 1, 2, 7]]))
    # A length past the capacity attends the whole table (less its wild blocks).
    assert np.all(np.isfinite(ref_lse[[3, 4, 5, 6]]))


def test_reference_other_page_size_and_chunks(rng):
    """Same rules at page 16 (reference only) and with one request per chunk."""
    inputs = wild_inputs(rng, s_q=2, h_q=4, page=16)
    arrays = [jnp.asarray(inputs[k]) for k in inputs]
    out, lse = _reference(*arrays, causal=True)
    check_against_oracle(out, lse, inputs, causal=True)
    chunked = _reference(*arrays, causal=True, chunk_size=1)
    od.assert_same_up_to_rounding(np.asarray(chunked[0]), np.asarray(out), name="out")
    od.assert_same_up_to_rounding(np.asarray(chunked[1]), np.asarray(lse), name="lse")


def test_length_past_capacity_equals_capacity(rng):
    """L = clamp(len, 0, capacity): a longer length gives exactly the capacity's result, a
    negative one exactly that of 0."""
    inputs = wild_inputs(rng, s_q=2)
    lens = np.asarray(inputs["cache_seqlens"])
    clamped = np.clip(lens.astype(np.int64), 0, CAPACITY).astype(np.int32)
    assert not np.array_equal(lens, clamped)
    arrays = [jnp.asarray(inputs[k]) for k in ("q", "k_cache", "block_table")]
    for causal in (False, True):
        got = _reference(*arrays, jnp.asarray(lens), causal=causal)
        want = _reference(*arrays, jnp.asarray(clamped), causal=causal)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("implementation", [None, "xla"])
def test_public_op_follows_the_rules(rng, implementation):
    inputs = wild_inputs(rng, s_q=2, h_q=8, h_kv=2)
    metadata = fm.get_mla_metadata(jnp.asarray(inputs["cache_seqlens"]), 2 * 4, 2)
    out, lse = jax.jit(
        lambda q, c, t, n, m, s: fm.flash_mla_with_kvcache(
            q, c, t, n, 512, m, s, causal=True, implementation=implementation
        )
    )(*(jnp.asarray(inputs[k]) for k in inputs), *metadata)
    check_against_oracle(out, lse, inputs, causal=True)


# ------------------------------------------------------------------------------------------
# Head dims (every implementation) and the kernel's limits (trace time)
# ------------------------------------------------------------------------------------------


def dense_structs(b=2, s_q=1, h_q=16, h_kv=1, d=576, page=64, blocks=4):
    return (
        S((b, s_q, h_q, d), jnp.bfloat16),
        S((blocks, page, h_kv, d), jnp.bfloat16),
        S((b, 2), jnp.int32),
        S((b,), jnp.int32),
    )


@pytest.mark.parametrize("implementation", [None, "xla", "cuda"])
@pytest.mark.parametrize(("d_qk", "d_v"), [(576, 256), (512, 512), (576, 576), (64, 32)])
def test_dense_head_dims_rejected_everywhere(implementation, d_qk, d_v):
    with platform.assume_device(), pytest.raises(ValueError) as info:
        jax.jit(lambda *a: fm.flash_mla_with_kvcache(*a, d_v, implementation=implementation)).trace(
            *dense_structs(d=d_qk)
        )
    message = str(info.value)
    assert message.startswith("flash_mla_with_kvcache: dense decode needs d_qk"), message
    assert f"got d_qk {d_qk} and head_dim_v {d_v}" in message


@pytest.mark.parametrize("implementation", [None, "xla", "cuda"])
@pytest.mark.parametrize(("d_qk", "d_v", "bytes_per_token"), [(576, 256, 656), (512, 448, 584)])
def test_sparse_head_dims_rejected_everywhere(implementation, d_qk, d_v, bytes_per_token):
    q = S((2, 1, 64, d_qk), jnp.bfloat16)
    cache = S((4, 64, 1, bytes_per_token), jnp.float8_e4m3fn)
    indices = S((2, 1, 64), jnp.int32)
    with pytest.raises(ValueError, match=rf"sparse decode needs d_qk .*got d_qk {d_qk} and head"):
        jax.jit(
            lambda q, c, i: fm.flash_mla_with_kvcache(
                q, c, None, None, d_v, is_fp8_kvcache=True, indices=i, implementation=implementation
            )
        ).trace(q, cache, indices)


@pytest.mark.parametrize("implementation", [None, "xla", "cuda"])
def test_sparse_prefill_head_dims_rejected_everywhere(implementation):
    q, kv = S((4, 64, 576), jnp.bfloat16), S((8, 1, 576), jnp.bfloat16)
    idx = S((4, 1, 64), jnp.int32)
    with pytest.raises(ValueError, match=r"flash_mla_sparse_fwd: d_qk must be 512 or 576.*d_v 256"):
        jax.jit(
            lambda *a: fm.flash_mla_sparse_fwd(*a, 0.1, d_v=256, implementation=implementation)
        ).trace(q, kv, idx)


# (description, q/cache/table/lens shapes, the limit the message names)
LIMIT_CASES = [
    ("h_kv", dense_structs(b=1, h_q=65536, h_kv=65536), "h_kv must be <= 65535 (grid y)"),
    (
        "query tiles",
        dense_structs(b=1, s_q=64 * 65535 + 1, h_q=1),
        "query tiles per KV head must be <= 65535 (grid z); got 65536",
    ),
    (
        "query tiles, wide groups",
        dense_structs(b=1, s_q=32768, h_q=192),
        "query tiles per KV head must be <= 65535 (grid z); got 98304",
    ),
    ("b * s_q", dense_structs(b=2**16, s_q=2**15, h_q=1), "batch * s_q must be <= 2**31 - 1"),
    (
        "num_blocks",
        dense_structs(blocks=2**25),
        "num_blocks * page_block_size must be <= 2**31 - 1; got 33554432 * 64",
    ),
    ("b + parts", dense_structs(b=INT32_MAX - 131), "batch + num_sm_parts must be <= 2**31 - 1"),
]


@pytest.mark.skipif(platform.extension() is None, reason=platform.extension_unavailable_reason())
@pytest.mark.parametrize(
    ("structs", "limit"), [c[1:] for c in LIMIT_CASES], ids=[c[0] for c in LIMIT_CASES]
)
def test_kernel_limits_checked_at_trace_time(structs, limit):
    """implementation="cuda" names the limit; None falls back to the reference, saying why."""
    with platform.assume_device():
        with pytest.raises(ValueError) as info:
            jax.jit(lambda *a: fm.flash_mla_with_kvcache(*a, 512, implementation="cuda")).trace(
                *structs
            )
        assert "flash_mla_with_kvcache: implementation='cuda' is unavailable: " in str(info.value)
        assert limit in str(info.value)
        with pytest.warns(RuntimeWarning, match="runs its XLA reference: " + re.escape(limit)):
            traced = jax.jit(lambda *a: fm.flash_mla_with_kvcache(*a, 512)).trace(*structs)
        hlo = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert "jax_flashmla_decode_dense" not in hlo


@pytest.mark.skipif(platform.extension() is None, reason=platform.extension_unavailable_reason())
def test_kernel_limits_let_the_largest_sizes_through():
    """One below each limit, the kernel is chosen."""
    cases = [
        dense_structs(b=1, h_q=65535, h_kv=65535),
        dense_structs(b=1, s_q=64 * 65535, h_q=1),
        dense_structs(b=2**16 - 1, s_q=2**15, h_q=1),
        dense_structs(blocks=2**25 - 1),
    ]
    with platform.assume_device():
        for structs in cases:
            traced = jax.jit(
                lambda *a: fm.flash_mla_with_kvcache(*a, 512, implementation="cuda")
            ).trace(*structs)
            assert (
                "@jax_flashmla_decode_dense_sm90"
                in traced.lower(lowering_platforms=("cuda",)).as_text()
            )


# ------------------------------------------------------------------------------------------
# Sparse decode: the kernel path's trace-time rules and schedule
# ------------------------------------------------------------------------------------------


def sparse_structs(*, b=2, s_q=1, h_q=64, topk=128, blocks=4, page=64):
    return (
        S((b, s_q, h_q, 576), jnp.bfloat16),
        S((blocks, page, 1, 656), jnp.float8_e4m3fn),
        S((b, s_q, topk), jnp.int32),
    )


def sparse_call(implementation, **kwargs):
    def call(q, cache, indices, *rest):
        return fm.flash_mla_with_kvcache(
            q,
            cache,
            None,
            None,
            512,
            *rest,
            is_fp8_kvcache=True,
            indices=indices,
            implementation=implementation,
            **kwargs,
        )

    return call


SPARSE_LIMIT_CASES = [
    ("s_q", sparse_structs(b=1, s_q=65536, h_q=1), "s_q must be <= 65535 (grid y)"),
    ("b * s_q", sparse_structs(b=2**16 + 1, s_q=2**15, h_q=1), "batch * s_q must be <= 2**31 - 1"),
    (
        "b + parts",
        sparse_structs(b=INT32_MAX - 131, h_q=1),
        "batch + num_sm_parts must be <= 2**31 - 1",
    ),
]


@pytest.mark.skipif(platform.extension() is None, reason=platform.extension_unavailable_reason())
@pytest.mark.parametrize(
    ("structs", "limit"),
    [c[1:] for c in SPARSE_LIMIT_CASES],
    ids=[c[0] for c in SPARSE_LIMIT_CASES],
)
def test_sparse_kernel_limits_checked_at_trace_time(structs, limit):
    with platform.assume_device(), pytest.raises(ValueError) as info:
        jax.jit(sparse_call("cuda")).trace(*structs)
    assert "flash_mla_with_kvcache: implementation='cuda' is unavailable: " in str(info.value)
    assert limit in str(info.value)


@pytest.mark.skipif(platform.extension() is None, reason=platform.extension_unavailable_reason())
def test_sparse_kernel_is_the_default_on_hopper():
    """implementation=None and "cuda" both lower to the kernel on a Hopper GPU; "xla" does not."""
    structs = sparse_structs()
    texts = {}
    with platform.assume_device():
        for implementation in (None, "cuda", "xla"):
            lowered = jax.jit(sparse_call(implementation)).trace(*structs)
            texts[implementation] = lowered.lower(lowering_platforms=("cuda",)).as_text()
    assert "@jax_flashmla_decode_sparse_sm90" in texts[None]
    assert "@jax_flashmla_decode_sparse_sm90" in texts["cuda"]
    assert "@jax_flashmla_decode_sparse_sm90" not in texts["xla"]


@pytest.mark.parametrize(
    ("s_q", "h_q", "parts"), [(1, 64, 132), (2, 16, 66), (2, 128, 33), (1, 96, 66), (3, 1, 44)]
)
def test_sparse_schedule_parts_per_token_and_head_tile(s_q, h_q, parts):
    """get_mla_metadata with topk: max(132 // (s_q * ceil(h_q / 64)), 1) parts; the op checks
    a passed schedule against the same count."""
    lens = jnp.zeros((3,), jnp.int32)
    metadata, num_splits = fm.get_mla_metadata(
        lens, s_q * h_q, 1, num_heads_q=h_q, is_fp8_kvcache=True, topk=128
    )
    assert metadata.shape == (parts, 8) and num_splits.shape == (4,)
    q, cache, indices = (
        jnp.zeros(s.shape, s.dtype) for s in sparse_structs(b=3, s_q=s_q, h_q=h_q, blocks=2)
    )
    out, lse = sparse_call("xla")(q, cache, indices, metadata, num_splits)
    assert out.shape == (3, s_q, h_q, 512) and lse.shape == (3, h_q, s_q)
    dense_parts = fm.get_mla_metadata(lens, s_q * h_q, 1)
    if dense_parts[0].shape[0] != parts:
        with pytest.raises(ValueError, match="num_heads_q="):
            sparse_call("xla")(q, cache, indices, *dense_parts)


def test_sparse_schedule_needs_num_heads_q():
    lens = jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match=r"with topk \(sparse decode\), num_heads_q must be given"):
        fm.get_mla_metadata(lens, 128, 1, topk=128)
    with pytest.raises(ValueError, match="num_heads_q must be given and divide"):
        fm.get_mla_metadata(lens, 100, 1, num_heads_q=64, topk=128)


def test_sparse_schedule_from_lengths():
    """Without a schedule the op weighs each request by its counted slots in whole blocks of 64,
    main and extra; with no lengths at all, every request gets topk + extra_topk."""
    from jax_flashmla.ops.decode import _sparse_schedule
    from jax_flashmla.reference.schedule import mla_metadata

    b, s_q, h_q, topk, extra_topk = 4, 2, 16, 128, 64
    q = jnp.zeros((b, s_q, h_q, 576), jnp.bfloat16)
    indices = jnp.zeros((b, s_q, topk), jnp.int32)
    extra_indices = jnp.zeros((b, s_q, extra_topk), jnp.int32)
    given = {
        "topk_length": jnp.array([0, 70, 500, -3], jnp.int32),
        "extra_indices_in_kvcache": extra_indices,
        "extra_topk_length": jnp.array([10, 0, 64, 65], jnp.int32),
    }
    parts = 132 // s_q
    # main: 0, 128, 128, 0; extra: 64, 0, 64, 64
    want = mla_metadata(
        jnp.array([64, 128, 192, 64], jnp.int32),
        num_parts=parts,
        block_tokens=64,
        fixed_overhead=5,
    )
    got = _sparse_schedule(q, indices, given)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    got = _sparse_schedule(q, indices, {"extra_indices_in_kvcache": extra_indices})
    want = mla_metadata(
        jnp.zeros((b,), jnp.int32),
        num_parts=parts,
        block_tokens=64,
        fixed_overhead=5,
        fixed_length=topk + extra_topk,
    )
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
