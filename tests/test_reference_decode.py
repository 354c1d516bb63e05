"""The pure-JAX decode references against the float64 NumPy oracles (CPU, small shapes)."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import oracle_decode as od
import pytest

from jax_flashmla.reference.decode import dense_decode, sparse_decode

_dense = jax.jit(
    dense_decode, static_argnames=("head_dim_v", "softmax_scale", "causal", "chunk_size")
)
_sparse = jax.jit(sparse_decode, static_argnames=("softmax_scale", "head_dim_v", "chunk_size"))


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    # A fixed seed per test (and parameter set), so failures reproduce.
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def _run_dense(inputs: dict[str, np.ndarray], **kwargs):
    out, lse = _dense(
        jnp.asarray(inputs["q"]),
        jnp.asarray(inputs["k_cache"]),
        jnp.asarray(inputs["block_table"]),
        jnp.asarray(inputs["cache_seqlens"]),
        **kwargs,
    )
    return np.asarray(out), np.asarray(lse)


def _check_dense(inputs: dict[str, np.ndarray], **kwargs) -> tuple[np.ndarray, np.ndarray]:
    out, lse = _run_dense(inputs, **kwargs)
    ref_out, ref_lse = od.dense_decode_oracle(
        inputs["q"], inputs["k_cache"], inputs["block_table"], inputs["cache_seqlens"], **kwargs
    )
    assert out.dtype == inputs["q"].dtype and lse.dtype == np.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    od.check_close(out, ref_out, name="out", **od.DENSE_DECODE_OUT_TOL)
    od.check_close(lse, ref_lse, name="lse", **od.DENSE_DECODE_LSE_TOL)
    _check_lonely(out, lse, ref_lse)
    return out, lse


def _check_lonely(out: np.ndarray, lse: np.ndarray, ref_lse: np.ndarray) -> None:
    """Rows the oracle finds lonely: out exactly 0, lse exactly +inf; all others finite."""
    lonely = np.isinf(ref_lse)  # [b, h_q, s_q]
    lonely_rows = lonely.transpose(0, 2, 1)  # [b, s_q, h_q], like out's leading dims
    out64 = out.astype(np.float64)
    assert np.all(out64[lonely_rows] == 0.0)
    assert np.all(lse[lonely] == np.inf)
    assert np.all(np.isfinite(out64))
    assert np.all(np.isfinite(lse[~lonely]))


# (dtype, b, s_q, s_k, h_q, h_kv, causal, varlen)
DENSE_CASES = [
    (od.BF16, 2, 1, 200, 16, 1, False, True),
    (od.FP16, 2, 1, 130, 16, 1, False, False),
    (od.BF16, 3, 2, 150, 8, 2, True, True),
    (od.FP16, 2, 4, 100, 6, 3, True, True),
    (od.BF16, 2, 4, 64, 6, 3, False, False),
    (od.BF16, 1, 2, 70, 1, 1, True, False),
    (od.FP16, 2, 2, 90, 8, 8, False, True),
    (od.BF16, 2, 4, 120, 4, 2, True, False),
]


@pytest.mark.parametrize(
    ("dtype", "b", "s_q", "s_k", "h_q", "h_kv", "causal", "varlen"), DENSE_CASES
)
def test_dense_matches_oracle(rng, dtype, b, s_q, s_k, h_q, h_kv, causal, varlen):
    inputs = od.make_dense_decode_inputs(
        rng, b=b, s_q=s_q, s_k=s_k, h_q=h_q, h_kv=h_kv, dtype=dtype, varlen=varlen
    )
    _check_dense(inputs, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_dense_zero_lengths(rng, causal):
    inputs = od.make_dense_decode_inputs(
        rng, b=4, s_q=2, s_k=80, h_q=4, h_kv=1, varlen=True, zero_requests=(0, 2)
    )
    out, lse = _check_dense(inputs, causal=causal)
    assert np.all(out[[0, 2]].astype(np.float32) == 0.0)
    assert np.all(lse[[0, 2]] == np.inf)


def test_dense_causal_lonely_queries(rng):
    # s_q = 4 > length: query i sees keys j <= len - 4 + i, so the first 4 - len are lonely.
    inputs = od.make_dense_decode_inputs(
        rng, b=4, s_q=4, s_k=0, h_q=4, h_kv=2, seqlens=[1, 3, 0, 70]
    )
    out, lse = _check_dense(inputs, causal=True)
    assert np.all(lse[0, :, :3] == np.inf) and np.all(np.isfinite(lse[0, :, 3]))
    assert np.all(lse[1, :, :1] == np.inf) and np.all(np.isfinite(lse[1, :, 1:]))
    assert np.all(lse[2] == np.inf)
    assert np.all(np.isfinite(lse[3]))
    assert np.all(out[0, :3].astype(np.float32) == 0.0)


@pytest.mark.parametrize("page", [16, 53])
def test_dense_other_page_sizes(rng, page):
    inputs = od.make_dense_decode_inputs(
        rng, b=3, s_q=2, s_k=110, h_q=8, h_kv=1, page=page, varlen=True, zero_requests=(1,)
    )
    _check_dense(inputs, causal=True)


def test_dense_custom_scale(rng):
    inputs = od.make_dense_decode_inputs(rng, b=2, s_q=2, s_k=100, h_q=8, h_kv=2, varlen=True)
    # A large scale makes the softmax far from uniform.
    _check_dense(inputs, softmax_scale=2.5, causal=True)


@pytest.mark.parametrize(("d_qk", "d_v"), [(64, 32), (576, 256), (512, 512), (576, 576)])
def test_dense_rejects_other_head_dims(d_qk, d_v):
    """Only d_qk 576 with d_v 512: another width is an error, never a result of that width."""
    q = jnp.zeros((1, 1, 4, d_qk), jnp.bfloat16)
    cache = jnp.zeros((2, 8, 1, d_qk), jnp.bfloat16)
    bt, lens = jnp.zeros((1, 2), jnp.int32), jnp.ones((1,), jnp.int32)
    with pytest.raises(ValueError, match=f"dense_decode: .*got d_qk {d_qk} and head_dim_v {d_v}"):
        dense_decode(q, cache, bt, lens, head_dim_v=d_v)


@pytest.mark.parametrize(("d_qk", "d_v"), [(576, 256), (64, 64), (448, 512)])
def test_sparse_rejects_other_head_dims(d_qk, d_v):
    q = jnp.zeros((1, 1, 4, d_qk), jnp.bfloat16)
    cache = jnp.zeros((2, 8, 1, d_qk), jnp.bfloat16)
    indices = jnp.zeros((1, 1, 64), jnp.int32)
    with pytest.raises(ValueError, match=f"sparse_decode: .*got d_qk {d_qk} and head_dim_v {d_v}"):
        sparse_decode(q, cache, indices, head_dim_v=d_v)


def test_dense_inf_in_unread_cache(rng):
    inputs = od.make_dense_decode_inputs(
        rng, b=3, s_q=2, s_k=90, h_q=4, h_kv=1, varlen=True, zero_requests=(2,)
    )
    cache = inputs["k_cache"].astype(np.float32)
    cache[np.isnan(cache)] = np.inf
    cache[..., ::2][np.isinf(cache[..., ::2])] = -np.inf
    inputs["k_cache"] = cache.astype(od.BF16)
    _check_dense(inputs, causal=True)


def test_dense_chunking_matches_whole(rng):
    inputs = od.make_dense_decode_inputs(
        rng, b=5, s_q=2, s_k=70, h_q=4, h_kv=2, varlen=True, zero_requests=(3,)
    )
    whole = _run_dense(inputs, causal=True)
    for chunk in (1, 2):
        parts = _run_dense(inputs, causal=True, chunk_size=chunk)
        od.assert_same_up_to_rounding(parts[0], whole[0], name="out")
        od.assert_same_up_to_rounding(parts[1], whole[1], name="lse")


def test_dense_rejects_bad_shapes():
    q = jnp.zeros((1, 1, 6, 576), jnp.bfloat16)
    cache = jnp.zeros((2, 4, 4, 576), jnp.bfloat16)
    bt = jnp.zeros((1, 2), jnp.int32)
    lens = jnp.ones((1,), jnp.int32)
    with pytest.raises(ValueError, match="multiple"):
        dense_decode(q, cache, bt, lens)
    with pytest.raises(TypeError):
        dense_decode(q, cache.astype(jnp.float16)[:, :, :1], bt, lens)


# ------------------------------------------------------------------------------------------
# Sparse decode
# ------------------------------------------------------------------------------------------


def _check_sparse(q, k_cache, indices, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    jax_kwargs = {
        k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()
    }
    out, lse = _sparse(jnp.asarray(q), jnp.asarray(k_cache), jnp.asarray(indices), **jax_kwargs)
    out, lse = np.asarray(out), np.asarray(lse)
    ref_out, ref_lse = od.sparse_decode_oracle(q, k_cache, indices, **kwargs)
    assert out.dtype == q.dtype and lse.dtype == np.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    od.check_close(out, ref_out, name="out", **od.SPARSE_DECODE_OUT_TOL)
    od.check_close(lse, ref_lse, name="lse", **od.SPARSE_DECODE_LSE_TOL)
    _check_lonely(out, lse, ref_lse)
    return out, lse


def _sparse_inputs(rng, *, b, s_q, h_q, topk, page, s_kv=200, d_qk=576, **kwargs):
    cache, indices = od.make_sparse_cache_and_indices(
        rng, b=b, s_q=s_q, topk=topk, page=page, s_kv=s_kv, d_qk=d_qk, **kwargs
    )
    q = od.random_values(rng, (b, s_q, h_q, d_qk), od.BF16)
    return q, cache, indices


@pytest.mark.parametrize("page", [2, 53, 64, 69])
def test_sparse_page_sizes_and_invalid_indices(rng, page):
    q, cache, indices = _sparse_inputs(
        rng, b=2, s_q=2, h_q=16, topk=64, page=page, invalid_frac=0.15, out_of_range_frac=0.1
    )
    _check_sparse(q, cache, indices)


def test_sparse_fp32_dequantised_cache(rng):
    q, cache, indices = _sparse_inputs(
        rng, b=2, s_q=1, h_q=8, topk=64, page=64, dtype=np.float32, out_of_range_frac=0.05
    )
    _check_sparse(q, cache, indices)


def test_sparse_topk_length(rng):
    lengths = np.array([0, 17, 64], np.int32)
    q, cache, indices = _sparse_inputs(
        rng, b=3, s_q=2, h_q=8, topk=64, page=64, topk_length=lengths, out_of_range_frac=0.05
    )
    _, lse = _check_sparse(q, cache, indices, topk_length=lengths)
    assert np.all(lse[0] == np.inf)


def test_sparse_attn_sink(rng):
    sink = np.array([0.5, -1.0, 3.0, -np.inf, np.inf, 10.0, -10.0, 0.0], np.float32)
    lengths = np.array([0, 40, 128], np.int32)
    q, cache, indices = _sparse_inputs(
        rng, b=3, s_q=2, h_q=8, topk=128, page=61, topk_length=lengths
    )
    indices[2, 1, :] = -1  # a lonely row in a request that otherwise has keys
    out, lse = _check_sparse(q, cache, indices, topk_length=lengths, attn_sink=sink)
    # Lonely rows: 0 / +inf even under sink = +inf; other rows: +inf sink zeroes the output.
    assert np.all(lse[0] == np.inf) and np.all(lse[2, :, 1] == np.inf)
    assert np.all(out[1, :, 4].astype(np.float32) == 0.0)
    # The sink does not change the lse.
    _, lse_plain = _sparse(
        jnp.asarray(q), jnp.asarray(cache), jnp.asarray(indices), topk_length=jnp.asarray(lengths)
    )
    od.assert_same_up_to_rounding(lse, np.asarray(lse_plain), name="lse")


def test_sparse_extra_cache(rng):
    lengths = np.array([64, 30], np.int32)
    extra_lengths = np.array([0, 50], np.int32)
    q, cache, indices = _sparse_inputs(
        rng, b=2, s_q=2, h_q=8, topk=64, page=64, topk_length=lengths, out_of_range_frac=0.05
    )
    extra_cache, extra_indices = od.make_sparse_cache_and_indices(
        rng,
        b=2,
        s_q=2,
        topk=64,
        page=53,
        s_kv=150,
        topk_length=extra_lengths,
        out_of_range_frac=0.05,
    )
    indices[1, 0, :] = -1  # keys from the extra cache only
    sink = np.linspace(-2.0, 2.0, 8).astype(np.float32)
    _check_sparse(
        q,
        cache,
        indices,
        topk_length=lengths,
        attn_sink=sink,
        extra_k_cache=extra_cache,
        extra_indices=extra_indices,
        extra_topk_length=extra_lengths,
    )


def test_sparse_extra_cache_all_slots(rng):
    # Without extra_topk_length every extra slot counts; the extra topk differs from topk.
    q, cache, indices = _sparse_inputs(rng, b=2, s_q=1, h_q=4, topk=64, page=69)
    extra_cache, extra_indices = od.make_sparse_cache_and_indices(
        rng, b=2, s_q=1, topk=128, page=2, s_kv=90, dtype=np.float32
    )
    _check_sparse(q, cache, indices, extra_k_cache=extra_cache, extra_indices=extra_indices)


def test_sparse_model1_layout(rng):
    # MODEL1: d_qk = 512 and V is all 512 dims.
    q, cache, indices = _sparse_inputs(rng, b=2, s_q=2, h_q=8, topk=64, page=64, d_qk=512)
    _check_sparse(q, cache, indices, head_dim_v=512)


def test_sparse_duplicates_and_custom_scale(rng):
    q, cache, indices = _sparse_inputs(
        rng, b=2, s_q=2, h_q=8, topk=64, page=64, s_kv=20, duplicates=True, varlen=False
    )
    assert any(len(np.unique(row)) < row.size for row in indices.reshape(-1, 64))
    _check_sparse(q, cache, indices, softmax_scale=1.7)


def test_sparse_chunking_matches_whole(rng):
    lengths = np.array([64, 0, 33], np.int32)
    q, cache, indices = _sparse_inputs(
        rng, b=3, s_q=2, h_q=4, topk=64, page=53, topk_length=lengths
    )
    args = (jnp.asarray(q), jnp.asarray(cache), jnp.asarray(indices))
    whole = _sparse(*args, topk_length=jnp.asarray(lengths))
    parts = _sparse(*args, topk_length=jnp.asarray(lengths), chunk_size=2)
    od.assert_same_up_to_rounding(np.asarray(parts[0]), np.asarray(whole[0]), name="out")
    od.assert_same_up_to_rounding(np.asarray(parts[1]), np.asarray(whole[1]), name="lse")


# ------------------------------------------------------------------------------------------
# The comparison rule itself
# ------------------------------------------------------------------------------------------


def test_check_close_rule():
    ref = np.array([1.0, 0.0, np.inf, 100.0])
    od.check_close(ref + np.array([5e-4, 5e-4, 0, 1.0]), ref, abs_tol=8e-4, rel_tol=2.01 / 128)
    with pytest.raises(AssertionError, match="out of tolerance"):
        od.check_close(ref + np.array([0.1, 0, 0, 0]), ref, abs_tol=8e-4, rel_tol=2.01 / 128)
    with pytest.raises(AssertionError, match="inf/NaN"):
        od.check_close(np.array([1.0, 0.0, 7.0, 100.0]), ref, abs_tol=1, rel_tol=1)
    with pytest.raises(AssertionError, match="inf/NaN"):
        od.check_close(np.array([1.0, 0.0, -np.inf, 100.0]), ref, abs_tol=1, rel_tol=1)
    with pytest.raises(AssertionError, match="inf/NaN"):
        od.check_close(np.array([1.0, np.nan, np.inf, 100.0]), ref, abs_tol=1, rel_tol=1)
    with pytest.raises(AssertionError, match="cosine"):
        od.check_close(
            np.array([1.0, -1.0]), np.array([1.0, 1.0]), abs_tol=3, rel_tol=0, cos_tol=5e-6
        )
