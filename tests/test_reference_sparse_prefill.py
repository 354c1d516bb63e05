"""The pure-JAX sparse prefill reference against the float64 NumPy oracle (CPU, small shapes)."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import oracle_decode as od
import pytest

from jax_flashmla.reference.sparse_prefill import sparse_prefill

_prefill = jax.jit(sparse_prefill, static_argnames=("sm_scale", "d_v", "chunk_size"))


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    # A fixed seed per test (and parameter set), so failures reproduce.
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def _run(inputs, sm_scale, *, attn_sink=None, chunk_size=None, d_v=512):
    topk_length = inputs["topk_length"]
    out, max_logits, lse = _prefill(
        jnp.asarray(inputs["q"]),
        jnp.asarray(inputs["kv"]),
        jnp.asarray(inputs["indices"]),
        sm_scale=sm_scale,
        d_v=d_v,
        attn_sink=None if attn_sink is None else jnp.asarray(attn_sink),
        topk_length=None if topk_length is None else jnp.asarray(topk_length),
        chunk_size=chunk_size,
    )
    return np.asarray(out), np.asarray(max_logits), np.asarray(lse)


def _check(inputs, sm_scale, *, attn_sink=None, d_v=512):
    out, max_logits, lse = _run(inputs, sm_scale, attn_sink=attn_sink, d_v=d_v)
    ref_out, ref_max, ref_lse = od.sparse_prefill_oracle(
        inputs["q"],
        inputs["kv"],
        inputs["indices"],
        sm_scale,
        d_v,
        attn_sink=attn_sink,
        topk_length=inputs["topk_length"],
    )
    assert out.dtype == od.BF16 and max_logits.dtype == np.float32 and lse.dtype == np.float32
    od.check_close(out, ref_out, name="out", **od.SPARSE_PREFILL_OUT_TOL)
    od.check_close(max_logits, ref_max, name="max_logits", **od.SPARSE_PREFILL_LSE_TOL)
    od.check_close(lse, ref_lse, name="lse", **od.SPARSE_PREFILL_LSE_TOL)
    lonely = np.isinf(ref_lse)
    assert np.all(out.astype(np.float32)[lonely] == 0.0)
    assert np.all(lse[lonely] == np.inf) and np.all(max_logits[lonely] == -np.inf)
    assert np.all(np.isfinite(out.astype(np.float32)))
    return out, max_logits, lse


@pytest.mark.parametrize("d_qk", [512, 576])
@pytest.mark.parametrize("with_topk_length", [False, True])
def test_prefill_matches_oracle(rng, d_qk, with_topk_length):
    inputs = od.make_sparse_prefill_inputs(
        rng, s_q=12, s_kv=300, h_q=16, topk=64, d_qk=d_qk, with_topk_length=with_topk_length
    )
    _check(inputs, d_qk**-0.5)


def test_prefill_rows_without_valid_index(rng):
    inputs = od.make_sparse_prefill_inputs(
        rng, s_q=6, s_kv=100, h_q=8, topk=64, out_of_range_frac=0.2, with_topk_length=True
    )
    inputs["indices"][2] = -1
    inputs["indices"][3, 0, :] = np.array([-5, 100, 2**31 - 1, -(2**31)] * 16, np.int32)
    out, max_logits, lse = _check(inputs, 576**-0.5)
    for t in (0, 2, 3):  # token 0 has topk_length 0
        assert np.all(lse[t] == np.inf) and np.all(max_logits[t] == -np.inf)
        assert np.all(out[t].astype(np.float32) == 0.0)


def test_prefill_attn_sink_and_scale(rng):
    h_q = 8
    sink = np.array([0.5, -1.0, 3.0, -np.inf, np.inf, 10.0, -10.0, 0.0], np.float32)
    inputs = od.make_sparse_prefill_inputs(
        rng, s_q=8, s_kv=200, h_q=h_q, topk=128, with_topk_length=True
    )
    out, max_logits, lse = _check(inputs, 1.3, attn_sink=sink)
    # The sink touches out only.
    _, max_plain, lse_plain = _run(inputs, 1.3)
    od.assert_same_up_to_rounding(lse, lse_plain, name="lse")
    od.assert_same_up_to_rounding(max_logits, max_plain, name="max_logits")
    assert np.all(out[:, 4].astype(np.float32) == 0.0)


@pytest.mark.parametrize(("d_qk", "d_v"), [(576, 256), (576, 576), (256, 256), (448, 512)])
def test_prefill_rejects_other_head_dims(d_qk, d_v):
    """Only d_qk 512 / 576 with d_v 512: another width is an error, never a result."""
    q = jnp.zeros((2, 4, d_qk), jnp.bfloat16)
    kv = jnp.zeros((8, 1, d_qk), jnp.bfloat16)
    indices = jnp.zeros((2, 1, 64), jnp.int32)
    with pytest.raises(ValueError, match=f"sparse_prefill: .*got d_qk {d_qk} and d_v {d_v}"):
        sparse_prefill(q, kv, indices, 0.1, d_v=d_v)


@pytest.mark.parametrize("chunk_size", [1, 5, 16])
def test_prefill_chunking_matches_whole(rng, chunk_size):
    inputs = od.make_sparse_prefill_inputs(
        rng, s_q=37, s_kv=150, h_q=4, topk=64, with_topk_length=True
    )
    whole = _run(inputs, 0.05)
    parts = _run(inputs, 0.05, chunk_size=chunk_size)
    for a, b, name in zip(parts, whole, ("out", "max_logits", "lse"), strict=True):
        od.assert_same_up_to_rounding(a, b, name=name)


def test_prefill_long_prompt_memory_is_bounded():
    # s_q = 70000, topk = 2048, h_q = 128: unchunked, the fp32 logits alone would take 73 GB
    # and the gathered fp32 keys 330 GB. Compile only (no run) and read XLA's estimate of the
    # temporaries. On an H200 they come to about 0.8 GB; XLA:CPU also upcasts the whole of q
    # and out to fp32 outside the loop (about 20 GB), so the bound here only proves chunking.
    s_q, s_kv, h_q, d_qk, topk = 70000, 70000, 128, 576, 2048
    args = (
        jax.ShapeDtypeStruct((s_q, h_q, d_qk), jnp.bfloat16),
        jax.ShapeDtypeStruct((s_kv, 1, d_qk), jnp.bfloat16),
        jax.ShapeDtypeStruct((s_q, 1, topk), jnp.int32),
    )
    compiled = _prefill.lower(*args, sm_scale=d_qk**-0.5).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        pytest.skip("this backend gives no memory analysis")
    logits_bytes = s_q * h_q * topk * 4
    assert stats.temp_size_in_bytes < logits_bytes // 2, stats.temp_size_in_bytes
