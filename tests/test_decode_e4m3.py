"""Dense decode over the plain scaled e4m3 cache ("E4M3", k_scale per cache or per KV head):
against the float64 oracle on the cache as NumPy dequantises it, with e4m3 NaN in every cache
element that no request may read (rows past each length, blocks behind wild block ids, spare
blocks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import oracle_decode as od
import pytest

import jax_flashmla as fm
from jax_flashmla._src import platform

S = jax.ShapeDtypeStruct
PAGE = 16
SEQLENS = (-5, 0, 37, 3 * PAGE, 3 * PAGE + 9, 20)
WILD_ENTRIES = ((2, 1), (3, 0), (4, 2))


def e4m3_inputs(rng, *, s_q: int, h_q: int, h_kv: int, per_head: bool):
    """Wild-block-table inputs (od.make_wild_block_table_inputs) with the cache quantised by
    NumPy: e4m3(clip(x / k_scale, +-448)), k_scale = amax / 448 over what may be read; and
    the dequantised cache, float64, for the oracle."""
    inputs = od.make_wild_block_table_inputs(
        rng,
        seqlens=SEQLENS,
        max_blocks=3,
        s_q=s_q,
        h_q=h_q,
        h_kv=h_kv,
        page=PAGE,
        wild_entries=WILD_ENTRIES,
    )
    x = inputs["k_cache"].astype(np.float32)  # NaN where nothing may read
    amax = np.nanmax(np.abs(x), axis=(0, 1, 3) if per_head else None)
    k_scale = (np.asarray(amax, np.float32) / np.float32(448)).astype(np.float32)
    per_kv_head = k_scale.reshape(-1, 1)
    cache = np.clip(x / per_kv_head, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    dequantised = cache.astype(np.float64) * per_kv_head.astype(np.float64)
    return inputs, cache, k_scale, dequantised


@pytest.mark.parametrize("implementation", [None, "xla"])
@pytest.mark.parametrize(
    ("s_q", "h_q", "h_kv", "per_head", "causal"),
    [(1, 4, 1, False, False), (2, 8, 2, True, True), (3, 6, 3, False, True)],
)
def test_e4m3_decode_matches_oracle(rng, implementation, s_q, h_q, h_kv, per_head, causal):
    inputs, cache, k_scale, dequantised = e4m3_inputs(
        rng, s_q=s_q, h_q=h_q, h_kv=h_kv, per_head=per_head
    )
    assert np.isnan(cache.astype(np.float32)).any()  # the poison is there, and never read
    call = jax.jit(
        lambda q, c, t, n, s: fm.flash_mla_with_kvcache(
            q,
            c,
            t,
            n,
            512,
            causal=causal,
            is_fp8_kvcache=True,
            k_scale=s,
            implementation=implementation,
        )
    )
    out, lse = call(
        jnp.asarray(inputs["q"]),
        jnp.asarray(cache),
        jnp.asarray(inputs["block_table"]),
        jnp.asarray(inputs["cache_seqlens"]),
        jnp.asarray(k_scale),
    )
    ref_out, ref_lse = od.dense_decode_oracle(
        inputs["q"], dequantised, inputs["block_table"], inputs["cache_seqlens"], causal=causal
    )
    out, lse = np.asarray(out), np.asarray(lse)
    assert out.dtype == np.dtype(jnp.bfloat16) and np.isfinite(out.astype(np.float32)).all()
    od.check_close(out, ref_out, name="out", **od.DENSE_DECODE_OUT_TOL)
    od.check_close(lse, ref_lse, name="lse", **od.DENSE_DECODE_LSE_TOL)
    assert np.all(lse[np.isinf(ref_lse)] == np.inf)


def test_e4m3_scale_shapes_and_named_layout(rng):
    """k_scale [], [1] and [h_kv] holding one value agree; fp8_layout="E4M3" is what the last
    dim already says."""
    inputs, cache, k_scale, _ = e4m3_inputs(rng, s_q=1, h_q=4, h_kv=2, per_head=False)
    args = [jnp.asarray(inputs[k]) for k in ("q",)] + [jnp.asarray(cache)]
    args += [jnp.asarray(inputs[k]) for k in ("block_table", "cache_seqlens")]
    results = [
        fm.flash_mla_with_kvcache(*args, 512, is_fp8_kvcache=True, k_scale=jnp.asarray(s))
        for s in (k_scale, k_scale.reshape(1), np.repeat(k_scale.reshape(1), 2))
    ]
    results.append(
        fm.flash_mla_with_kvcache(
            *args, 512, is_fp8_kvcache=True, fp8_layout="E4M3", k_scale=jnp.asarray(k_scale)
        )
    )
    for out, lse in results[1:]:
        np.testing.assert_array_equal(np.asarray(out), np.asarray(results[0][0]))
        np.testing.assert_array_equal(np.asarray(lse), np.asarray(results[0][1]))


def test_e4m3_equals_decode_on_dequantised_cache(rng):
    """The op attends exactly the cache dequantize_k_cache_e4m3 returns (bf16)."""
    inputs, _, _, _ = e4m3_inputs(rng, s_q=2, h_q=8, h_kv=2, per_head=True)
    x = jnp.asarray(np.nan_to_num(inputs["k_cache"].astype(np.float32)), jnp.bfloat16)
    cache, k_scale = fm.quantize_k_cache_e4m3(x, per_head=True)
    rest = [jnp.asarray(inputs[k]) for k in ("block_table", "cache_seqlens")]
    q = jnp.asarray(inputs["q"])
    got = fm.flash_mla_with_kvcache(q, cache, *rest, 512, is_fp8_kvcache=True, k_scale=k_scale)
    want = fm.flash_mla_with_kvcache(q, fm.dequantize_k_cache_e4m3(cache, k_scale), *rest, 512)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.skipif(platform.extension() is None, reason=platform.extension_unavailable_reason())
def test_e4m3_kernel_takes_every_kv_head_count():
    """The E4M3 cache runs the sparse kernel, by default and with implementation="cuda": once
    with one KV head (k_scale [] or [1]), once per KV head with more (any k_scale shape); past
    the int32 token indices of the cache's view "cuda" says which limit."""

    def call(implementation):
        return lambda q, c, t, n, s: fm.flash_mla_with_kvcache(
            q, c, t, n, 512, is_fp8_kvcache=True, k_scale=s, implementation=implementation
        )

    def structs(h_kv, scale_shape, blocks=8):
        return (
            S((2, 1, 16, 576), jnp.bfloat16),
            S((blocks, 64, h_kv, 576), jnp.float8_e4m3fn),
            S((2, 4), jnp.int32),
            S((2,), jnp.int32),
            S(scale_shape, jnp.float32),
        )

    def lowered(implementation, *args):
        return (
            jax.jit(call(implementation)).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        )

    kernel = "@jax_flashmla_decode_sparse_sm90("
    with platform.assume_device():
        for implementation in (None, "cuda"):
            for scale_shape in ((), (1,)):
                assert lowered(implementation, *structs(1, scale_shape)).count(kernel) == 1
            for scale_shape in ((), (1,), (4,)):
                assert lowered(implementation, *structs(4, scale_shape)).count(kernel) == 4
        with pytest.raises(ValueError) as info:
            jax.jit(call("cuda")).trace(*structs(2, (), blocks=2**24))
    message = str(info.value)
    assert "implementation='cuda' is unavailable" in message
    assert "num_blocks * page * h_kv must be <= 2**31 - 1" in message and "* 2 =" in message
