"""Dense decode over a V32 FP8 cache on the kernel path: each query token's visible positions,
mapped through the block table, become the sparse decode kernel's indices. Here (no GPU needed):
that mapping gives exactly dense decode's keys (lengths negative, zero and past the table's
capacity; block ids outside the cache, also ones whose token offset wraps around int32; causal
and not; pages 1, 16 and 64), and the op lowers to the sparse kernel for it. On the GPU,
tests/test_gpu_decode_fp8_dense.py checks the kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import oracle_decode as od
import pytest

import jax_flashmla as fm
from jax_flashmla._src import platform
from jax_flashmla.ops import decode as decode_op
from jax_flashmla.reference.decode import dense_decode, sparse_decode

S = jax.ShapeDtypeStruct
INT32_MAX = 2**31 - 1
SEQLENS = (-5, 0, 37, 130, 3 * 64 + 100, INT32_MAX, 150)
WILD_ENTRIES = ((2, 0), (3, 1), (4, 2), (6, 1))


def wild_inputs(rng, *, page: int, s_q: int, h_q: int, h_kv: int) -> tuple[jax.Array, ...]:
    """float32 q, cache, block table and lengths with SEQLENS and WILD_ENTRIES over tables of
    3 * 64 tokens (NaN in every cache row nobody may read)."""
    max_blocks = -(-3 * 64 // page)
    inputs = od.make_wild_block_table_inputs(
        rng,
        seqlens=SEQLENS,
        max_blocks=max_blocks,
        s_q=s_q,
        h_q=h_q,
        h_kv=h_kv,
        page=page,
        dtype=np.float32,
        wild_entries=[(i, j * max_blocks // 3) for i, j in WILD_ENTRIES],
    )
    return tuple(jnp.asarray(inputs[k]) for k in ("q", "k_cache", "block_table", "cache_seqlens"))


@pytest.mark.parametrize("page", [1, 16, 64])
@pytest.mark.parametrize(("s_q", "causal"), [(1, False), (3, False), (3, True)])
def test_positions_as_indices_attend_the_dense_keys(rng, page, s_q, causal):
    q, cache, table, lengths = wild_inputs(rng, page=page, s_q=s_q, h_q=4, h_kv=1)
    max_blocks = table.shape[1]
    indices, topk_length = decode_op._positions_as_indices(
        table, lengths, s_q=s_q, page=page, num_blocks=cache.shape[0], causal=causal
    )
    assert indices.shape[2] % 64 == 0 and indices.shape[2] >= max_blocks * page
    # Nothing past a request's length, or behind a wild id, is selected; NaN marks those rows.
    flat = np.asarray(cache).reshape(-1, cache.shape[-1])
    chosen = np.asarray(indices)
    assert np.isfinite(flat[chosen[chosen >= 0]]).all()
    got = sparse_decode(q, cache, indices, topk_length=topk_length, head_dim_v=512)
    want = dense_decode(q, cache, table, lengths, head_dim_v=512, causal=causal)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("h_kv", "page"), [(2, 16), (3, 1), (4, 64)])
def test_kv_head_tokens_attend_each_kv_heads_keys(rng, h_kv, page):
    """A cache with several KV heads, read one KV head at a time as a one-head cache of page *
    h_kv tokens per block: each KV head's query heads attend exactly dense decode's keys of
    that head (every token nobody may read is NaN, in all heads)."""
    s_q, group = 2, 3
    q, cache, table, lengths = wild_inputs(rng, page=page, s_q=s_q, h_q=h_kv * group, h_kv=h_kv)
    positions, topk_length = decode_op._positions_as_indices(
        table, lengths, s_q=s_q, page=page, num_blocks=cache.shape[0], causal=True
    )
    want_out, want_lse = dense_decode(q, cache, table, lengths, head_dim_v=512, causal=True)
    for head in range(h_kv):
        tokens, indices = decode_op._kv_head_tokens(cache, positions, head)
        assert tokens.shape == (cache.shape[0], page * h_kv, 1, 576)
        chosen = np.asarray(indices)
        flat = np.asarray(tokens).reshape(-1, 576)
        assert np.isfinite(flat[chosen[chosen >= 0]]).all()
        heads = slice(head * group, (head + 1) * group)
        out, lse = sparse_decode(
            q[:, :, heads], tokens, indices, topk_length=topk_length, head_dim_v=512
        )
        np.testing.assert_allclose(out, want_out[:, :, heads], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(lse, want_lse[:, heads], rtol=1e-5, atol=1e-6)


def dense_fp8_structs(*, b=2, s_q=1, h_q=16, blocks=8, page=64, max_blocks=4):
    return (
        S((b, s_q, h_q, 576), jnp.bfloat16),
        S((blocks, page, 1, 656), jnp.float8_e4m3fn),
        S((b, max_blocks), jnp.int32),
        S((b,), jnp.int32),
    )


def dense_fp8_call(implementation, causal=False):
    def call(q, cache, table, lengths):
        return fm.flash_mla_with_kvcache(
            q,
            cache,
            table,
            lengths,
            512,
            causal=causal,
            is_fp8_kvcache=True,
            implementation=implementation,
        )

    return call


@pytest.mark.skipif(platform.extension() is None, reason=platform.extension_unavailable_reason())
@pytest.mark.parametrize("causal", [False, True])
def test_v32_dense_runs_the_sparse_kernel_on_hopper(causal):
    """implementation=None and "cuda" lower to the sparse kernel; "xla" does not."""
    with platform.assume_device():
        for implementation in (None, "cuda", "xla"):
            text = (
                jax.jit(dense_fp8_call(implementation, causal))
                .trace(*dense_fp8_structs(page=16))
                .lower(lowering_platforms=("cuda",))
                .as_text()
            )
            assert ("@jax_flashmla_decode_sparse_sm90" in text) == (implementation != "xla")


@pytest.mark.skipif(platform.extension() is None, reason=platform.extension_unavailable_reason())
def test_v32_dense_token_index_limit_checked_at_trace_time():
    """Token indices are int32: num_blocks * page past 2**31 - 1 has no kernel."""
    structs = dense_fp8_structs(blocks=2**25, page=64)
    with platform.assume_device(), pytest.raises(ValueError) as info:
        jax.jit(dense_fp8_call("cuda")).trace(*structs)
    assert "implementation='cuda' is unavailable" in str(info.value)
    assert "num_blocks * page * h_kv must be <= 2**31 - 1" in str(info.value)
