"""Tests of jax_flashmla.ops.quant against an independent NumPy byte-level implementation."""

from __future__ import annotations

import math
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_flashmla.ops.quant import (
    FP8_LAYOUTS,
    dequantize_k_cache,
    dequantize_k_cache_e4m3,
    infer_fp8_layout,
    quantize_k_cache,
    quantize_k_cache_e4m3,
)

PAGE_SIZES = [1, 2, 53, 64]
LAYOUTS = ["V32", "MODEL1"]
# (d_qk, d_nope, tile, bytes_per_token) written out here rather than read from FP8_LAYOUTS.
SPEC = {"V32": (576, 512, 128, 656), "MODEL1": (512, 448, 64, 584)}


# ---------------------------------------------------------------------------------------------
# Independent NumPy implementation (bytes assembled with struct / tobytes).
# ---------------------------------------------------------------------------------------------


def np_tile_scale_exp(tile: np.ndarray) -> int:
    """Exponent e of the power-of-two scale 2^e of one tile (float32 values)."""
    amax = np.float32(np.max(np.abs(tile)))
    y = max(amax / np.float32(448.0), np.float32(1e-4))
    return math.ceil(math.log2(float(y)))


def np_quantize_token(x: np.ndarray, layout: str) -> tuple[bytes, bytes, list[int]]:
    """Returns (nope e4m3 bytes, rope bf16 bytes, scale exponents) of one token row."""
    _, d_nope, tile, _ = SPEC[layout]
    x32 = x.astype(np.float32)
    nope, exps = [], []
    for t in range(d_nope // tile):
        seg = x32[t * tile : (t + 1) * tile]
        e = np_tile_scale_exp(seg)
        exps.append(e)
        q = (seg / np.float32(2.0**e)).astype(ml_dtypes.float8_e4m3fn)
        nope.append(q.view(np.uint8).tobytes())
    rope = x[d_nope:].astype(ml_dtypes.bfloat16).view("<u2").tobytes()
    return b"".join(nope), rope, exps


def np_quantize(k_cache: np.ndarray, layout: str) -> np.ndarray:
    """uint8 [num_blocks, page, 1, bytes_per_token] of the layout."""
    nb, page = k_cache.shape[:2]
    bpt = SPEC[layout][3]
    blocks = []
    for b in range(nb):
        if layout == "V32":
            rows = []
            for p in range(page):
                nope, rope, exps = np_quantize_token(k_cache[b, p, 0], layout)
                scales = struct.pack("<4f", *[2.0**e for e in exps])
                rows.append(nope + scales + rope)
            blocks.append(b"".join(rows))
        else:
            toks, scales = [], []
            for p in range(page):
                nope, rope, exps = np_quantize_token(k_cache[b, p, 0], layout)
                toks.append(nope + rope)
                scales.append(bytes([e + 127 for e in exps]) + b"\x00")
            blocks.append(b"".join(toks) + b"".join(scales))
    flat = np.frombuffer(b"".join(blocks), dtype=np.uint8)
    return flat.reshape(nb, page, 1, bpt)


def np_dequantize(raw: np.ndarray, layout: str) -> np.ndarray:
    """float32 [num_blocks, page, 1, d_qk] from uint8 bytes of the layout."""
    d_qk, d_nope, tile, bpt = SPEC[layout]
    nb, page = raw.shape[:2]
    out = np.zeros((nb, page, 1, d_qk), np.float32)
    for b in range(nb):
        blk = raw[b].reshape(-1).tobytes()
        for p in range(page):
            if layout == "V32":
                tok = blk[p * bpt : (p + 1) * bpt]
                nope, rope = tok[:d_nope], tok[d_nope + 16 :]
                scales = list(struct.unpack("<4f", tok[d_nope : d_nope + 16]))
            else:
                tok = blk[p * 576 : (p + 1) * 576]
                nope, rope = tok[:d_nope], tok[d_nope:]
                sb = blk[page * 576 + p * 8 : page * 576 + p * 8 + 7]
                scales = [2.0 ** (e - 127) for e in sb]
            q = np.frombuffer(nope, np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
            for t, s in enumerate(scales):
                q[t * tile : (t + 1) * tile] *= np.float32(s)
            r = np.frombuffer(rope, "<u2").view(ml_dtypes.bfloat16).astype(np.float32)
            out[b, p, 0] = np.concatenate([q, r])
    return out


def make_cache(seed: int, nb: int, page: int, layout: str, dtype=jnp.bfloat16) -> np.ndarray:
    """Random cache whose 64-wide groups span many magnitudes, with one all-zero NoPE tile."""
    d_qk, _, tile, _ = SPEC[layout]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((nb, page, 1, d_qk)).astype(np.float32)
    mags = 10.0 ** rng.uniform(-4, 3, size=(nb, page, 1, d_qk // 64))
    x = x * np.repeat(mags, 64, axis=-1).astype(np.float32)
    x[0, 0, 0, tile : 2 * tile] = 0.0  # an all-zero tile: the 1e-4 floor applies
    return np.asarray(jnp.asarray(x).astype(dtype))


def as_bytes(a: jax.Array) -> np.ndarray:
    return np.asarray(a).view(np.uint8)


# ---------------------------------------------------------------------------------------------


def test_layout_table():
    for name, (d_qk, d_nope, tile, bpt) in SPEC.items():
        lay = FP8_LAYOUTS[name]
        assert (lay.d_qk, lay.d_nope, lay.tile, lay.bytes_per_token) == (d_qk, d_nope, tile, bpt)
        assert lay.d_rope == 64 and lay.d_nope + lay.d_rope == lay.d_qk
        assert lay.d_v == 512
        assert infer_fp8_layout(bpt) == name
    assert FP8_LAYOUTS["V32"].num_tiles == 4 and FP8_LAYOUTS["MODEL1"].num_tiles == 7


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("page", PAGE_SIZES)
def test_bytes_match_numpy(layout: str, page: int):
    x = make_cache(page, 3, page, layout)
    got = quantize_k_cache(jnp.asarray(x), layout=layout)
    assert got.dtype == jnp.float8_e4m3fn
    assert got.shape == (3, page, 1, SPEC[layout][3])
    want = np_quantize(x, layout)
    np.testing.assert_array_equal(as_bytes(got), want)
    # Dequantisation agrees exactly with the NumPy decoder, from fp8 and from uint8 input.
    ref = np_dequantize(want, layout)
    for arr in (got, jnp.asarray(want)):
        deq = dequantize_k_cache(arr, dtype=jnp.float32)
        assert deq.shape == (3, page, 1, SPEC[layout][0]) and deq.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(deq), ref)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bytes_match_numpy_float32_input(layout: str):
    x = make_cache(7, 2, 5, layout, dtype=jnp.float32)
    got = quantize_k_cache(jnp.asarray(x), layout=layout)
    np.testing.assert_array_equal(as_bytes(got), np_quantize(x, layout))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("page", PAGE_SIZES)
def test_round_trip(layout: str, page: int):
    _, d_nope, tile, _ = SPEC[layout]
    x = make_cache(100 + page, 2, page, layout)
    xq = quantize_k_cache(jnp.asarray(x), layout=layout)
    deq = np.asarray(dequantize_k_cache(xq, layout=layout, dtype=jnp.float32))
    x32 = x.astype(np.float32)
    # RoPE is carried as bf16 bits: exact.
    np.testing.assert_array_equal(deq[..., d_nope:], x32[..., d_nope:])
    # NoPE: round-to-nearest e4m3 after a power-of-two scale. Normal e4m3 values are off by at
    # most half an ulp (2^-4 relative); subnormals by half the subnormal step (2^-10 * scale).
    xt = x32[..., :d_nope].reshape(*x.shape[:3], -1, tile)
    dt = deq[..., :d_nope].reshape(xt.shape)
    amax = np.abs(xt).max(-1, keepdims=True)
    scale = 2.0 ** np.ceil(np.log2(np.maximum(amax / 448.0, 1e-4)))
    err = np.abs(dt - xt)
    assert np.all(err <= np.maximum(2.0**-4 * np.abs(xt), 2.0**-10 * scale))
    # And on aggregate the error is far smaller than the worst case.
    assert np.linalg.norm(err) <= 0.05 * np.linalg.norm(xt)
    # Default output dtype is bf16.
    assert dequantize_k_cache(xq).dtype == jnp.bfloat16


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scales_are_powers_of_two_with_floor(layout: str):
    _, d_nope, tile, _ = SPEC[layout]
    page = 6
    x = make_cache(3, 2, page, layout)
    raw = as_bytes(quantize_k_cache(jnp.asarray(x), layout=layout))
    n = d_nope // tile
    if layout == "V32":
        scales = raw[..., d_nope : d_nope + 4 * n].copy().view("<f4").astype(np.float64)
        exps = np.log2(scales)
        assert np.all(exps == np.round(exps))
        pad_ok = True
    else:
        sb = raw.reshape(2, -1)[:, page * 576 :].reshape(2, page, 8)
        exps = sb[..., :n].astype(np.int64) - 127
        pad_ok = np.all(sb[..., 7] == 0)
    assert pad_ok
    exps = exps.reshape(2, page, n)
    # Tile 1 of token (0, 0) is all zero: scale = 2^ceil(log2(1e-4)) = 2^-13.
    assert exps[0, 0, 1] == -13
    # The scale is the smallest power of two with amax / scale <= 448.
    amax = np.abs(x.astype(np.float32)[..., :d_nope].reshape(2, page, n, tile)).max(-1)
    big = amax / 448.0 > 1e-4
    assert np.all(amax[big] / 2.0 ** exps[big] <= 448.0)
    assert np.all(amax[big] / 2.0 ** (exps[big] - 1) > 448.0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_jit(layout: str):
    x = jnp.asarray(make_cache(11, 2, 64, layout))
    q = jax.jit(quantize_k_cache, static_argnames="layout")(x, layout=layout)
    np.testing.assert_array_equal(as_bytes(q), as_bytes(quantize_k_cache(x, layout=layout)))
    deq = jax.jit(dequantize_k_cache, static_argnames=("layout", "dtype"))(q, dtype=jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(deq), np.asarray(dequantize_k_cache(q, dtype=jnp.float32))
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_finite_tile_dequantises_to_nan(layout: str):
    d_qk, _, tile, _ = SPEC[layout]
    x = np.array(make_cache(5, 1, 2, layout))
    x[0, 1, 0, 3] = np.nan
    x[0, 1, 0, tile + 1] = np.inf
    x[0, 1, 0, d_qk - 1] = np.inf  # RoPE: kept as is
    deq = np.asarray(dequantize_k_cache(quantize_k_cache(jnp.asarray(x), layout=layout)))
    assert np.all(np.isnan(deq[0, 1, 0, : 2 * tile]))
    assert np.all(np.isfinite(deq[0, 1, 0, 2 * tile : d_qk - 1]))
    assert deq[0, 1, 0, d_qk - 1] == np.inf
    assert np.all(np.isfinite(deq[0, 0]))


QUANT_REJECTS = [
    # (inputs, kwargs, error, message pattern); every message names the op and the argument.
    ("rank", lambda g: g[0], {}, ValueError, r"k_cache must have rank 4"),
    (
        "h_kv",
        lambda g: jnp.zeros((2, 4, 2, 576), jnp.bfloat16),
        {},
        ValueError,
        r"k_cache must have h_kv",
    ),
    (
        "V32 width",
        lambda g: g[..., :512],
        {},
        ValueError,
        r"k_cache's last dim must be 576.*got 512",
    ),
    (
        "MODEL1 width",
        lambda g: g,
        {"layout": "MODEL1"},
        ValueError,
        r"k_cache's last dim must be 512.*got 576",
    ),
    (
        "unknown layout",
        lambda g: g,
        {"layout": "V33"},
        ValueError,
        r"layout must be one of 'V32', 'MODEL1'; got 'V33'",
    ),
    ("layout None", lambda g: g, {"layout": None}, TypeError, r"layout must be a string.*got None"),
    (
        "int cache",
        lambda g: g.astype(jnp.int32),
        {},
        TypeError,
        r"k_cache must have dtype .*got int32",
    ),
    (
        "fp8 cache",
        lambda g: g.astype(jnp.float8_e4m3fn),
        {},
        TypeError,
        r"k_cache must have dtype .*got float8_e4m3fn",
    ),
    ("None cache", lambda g: None, {}, TypeError, r"k_cache must be a JAX array; got NoneType"),
    ("list cache", lambda g: [[1.0]], {}, TypeError, r"k_cache must be a JAX array; got list"),
]


@pytest.mark.parametrize(
    "make,kwargs,error,pattern", [c[1:] for c in QUANT_REJECTS], ids=[c[0] for c in QUANT_REJECTS]
)
def test_quantize_rejects(make, kwargs, error, pattern):
    good = jnp.zeros((2, 4, 1, 576), jnp.bfloat16)
    with pytest.raises(error, match="^quantize_k_cache: " + pattern):
        quantize_k_cache(make(good), **kwargs)


DEQUANT_REJECTS = [
    ("rank", lambda q: q[0], {}, ValueError, r"quant_k_cache must have rank 4"),
    (
        "h_kv",
        lambda q: jnp.concatenate([q, q], axis=2),
        {},
        ValueError,
        r"quant_k_cache must have h_kv",
    ),
    (
        "no layout has it",
        lambda q: jnp.zeros((2, 4, 1, 600), jnp.uint8),
        {},
        ValueError,
        r"quant_k_cache's last dim must be the bytes per token of an FP8 layout, 656 \(V32\), "
        r"584 \(MODEL1\); got 600",
    ),
    (
        "layout width",
        lambda q: q,
        {"layout": "MODEL1"},
        ValueError,
        r"quant_k_cache's last dim must be 584.*got 656",
    ),
    (
        "layout case",
        lambda q: q,
        {"layout": "v32"},
        ValueError,
        r"layout must be one of 'V32', 'MODEL1'; got 'v32'",
    ),
    ("layout type", lambda q: q, {"layout": 32}, TypeError, r"layout must be a string"),
    (
        "bf16 bytes",
        lambda q: jnp.zeros((2, 4, 1, 656), jnp.bfloat16),
        {},
        TypeError,
        r"quant_k_cache must have dtype float8_e4m3fn or uint8; got bfloat16",
    ),
    (
        "int8 dtype",
        lambda q: q,
        {"dtype": jnp.int8},
        TypeError,
        r"dtype must be bfloat16 or float16 or float32",
    ),
    ("None dtype", lambda q: q, {"dtype": None}, TypeError, r"dtype must be .*; got None"),
    (
        "unknown dtype name",
        lambda q: q,
        {"dtype": "bf16"},
        TypeError,
        r"dtype must be .*; got 'bf16'",
    ),
    ("float64 dtype", lambda q: q, {"dtype": np.float64}, TypeError, r"dtype must be .*float64"),
    ("list dtype", lambda q: q, {"dtype": [jnp.bfloat16]}, TypeError, r"dtype must be"),
    (
        "None cache",
        lambda q: None,
        {},
        TypeError,
        r"quant_k_cache must be a JAX array; got NoneType",
    ),
]


@pytest.mark.parametrize(
    "make,kwargs,error,pattern",
    [c[1:] for c in DEQUANT_REJECTS],
    ids=[c[0] for c in DEQUANT_REJECTS],
)
def test_dequantize_rejects(make, kwargs, error, pattern):
    q = quantize_k_cache(jnp.zeros((2, 4, 1, 576), jnp.bfloat16))
    with pytest.raises(error, match="^dequantize_k_cache: " + pattern):
        dequantize_k_cache(make(q), **kwargs)


def test_dtype_names_accepted():
    """Dtype arguments may be scalar types, dtypes or their names."""
    q = quantize_k_cache(jnp.zeros((1, 2, 1, 576), jnp.bfloat16))
    for dtype in (jnp.float16, np.dtype("float16"), "float16", np.float16):
        assert dequantize_k_cache(q, dtype=dtype).dtype == jnp.float16
    assert dequantize_k_cache(q, dtype="bfloat16").dtype == jnp.bfloat16


def test_infer_fp8_layout_rejects():
    with pytest.raises(ValueError, match=r"^infer_fp8_layout: bytes_per_token .* got 576"):
        infer_fp8_layout(576)


# ---------------------------------------------------------------------------------------------
# The plain scaled "E4M3" cache
# ---------------------------------------------------------------------------------------------


def np_e4m3(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """e4m3 of clip(x / scale, +-448) (scale broadcast over dim 2, the KV heads)."""
    y = x.astype(np.float32) / np.asarray(scale, np.float32).reshape(-1, 1)
    return np.clip(y, -448, 448).astype(ml_dtypes.float8_e4m3fn)


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("h_kv", [1, 3])
def test_e4m3_round_trip(per_head: bool, h_kv: int):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 5, h_kv, 576)).astype(np.float32)
    x *= np.float32(10.0) ** rng.integers(-3, 3, size=(1, 1, h_kv, 1))  # heads of other sizes
    x = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
    cache, k_scale = quantize_k_cache_e4m3(jnp.asarray(x, jnp.bfloat16), per_head=per_head)
    assert cache.dtype == jnp.float8_e4m3fn and cache.shape == x.shape
    assert k_scale.dtype == jnp.float32
    axes = (0, 1, 3) if per_head else None
    want_scale = np.max(np.abs(x), axis=axes) / np.float32(448)
    assert k_scale.shape == np.shape(want_scale)
    np.testing.assert_allclose(np.asarray(k_scale), want_scale, rtol=1e-6)
    np.testing.assert_array_equal(
        np.asarray(cache).view(np.uint8), np_e4m3(x, np.asarray(k_scale)).view(np.uint8)
    )
    deq = np.asarray(dequantize_k_cache_e4m3(cache, k_scale, dtype=jnp.float32))
    scale = np.asarray(k_scale, np.float32).reshape(-1, 1)
    # e4m3: 3 mantissa bits (relative error <= 2^-4), subnormal spacing 2^-9 times the scale.
    assert np.all(np.abs(deq - x) <= 2.0**-4 * np.abs(x) + 2.0**-9 * scale)
    np.testing.assert_array_equal(
        deq, np.asarray(cache).astype(np.float32) * np.broadcast_to(scale, x.shape[2:])
    )


def test_e4m3_given_scale_saturates_and_keeps_nan():
    x = np.zeros((1, 2, 2, 576), np.float32)
    x[0, 0, 0, :4] = [1.0, -1.0, 1e6, np.nan]
    x[0, 1, 1, :2] = [0.3, -5.0]
    k_scale = jnp.asarray([0.01, 0.002], jnp.float32)
    cache, returned = quantize_k_cache_e4m3(jnp.asarray(x), k_scale)
    assert returned is k_scale
    values = np.asarray(cache).astype(np.float32)
    np.testing.assert_array_equal(values[0, 0, 0, :3], [96.0, -96.0, 448.0])  # 100 ties to 96
    assert np.isnan(values[0, 0, 0, 3])
    np.testing.assert_array_equal(values[0, 1, 1, :2], [144.0, -448.0])
    for scale in (jnp.float32(0.5), jnp.asarray([0.5], jnp.float32)):
        np.testing.assert_array_equal(
            np.asarray(quantize_k_cache_e4m3(jnp.asarray(x), scale)[0]).view(np.uint8),
            np_e4m3(x, np.float32(0.5)).view(np.uint8),
        )


def test_e4m3_zero_and_non_finite_caches():
    cache, k_scale = quantize_k_cache_e4m3(jnp.zeros((1, 2, 1, 576), jnp.bfloat16))
    assert float(k_scale) == 1.0 and not np.asarray(cache).view(np.uint8).any()
    x = jnp.zeros((1, 2, 1, 576), jnp.float32).at[0, 1, 0, 9].set(jnp.inf)
    cache, k_scale = quantize_k_cache_e4m3(x)
    assert np.isnan(float(k_scale))
    assert np.isnan(np.asarray(dequantize_k_cache_e4m3(cache, k_scale), np.float32)).all()


def test_e4m3_jit_and_uint8_bytes():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 2, 576)), jnp.bfloat16)
    cache, k_scale = jax.jit(quantize_k_cache_e4m3, static_argnames="per_head")(x, per_head=True)
    raw = jax.lax.bitcast_convert_type(cache, jnp.uint8)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(dequantize_k_cache_e4m3)(raw, k_scale)),
        np.asarray(dequantize_k_cache_e4m3(cache, k_scale)),
    )


E4M3_REJECTS = [
    # (function, arguments, keyword arguments, error, message pattern)
    (quantize_k_cache_e4m3, lambda x, s: (x[0],), {}, ValueError, r"k_cache must have rank 4"),
    (
        quantize_k_cache_e4m3,
        lambda x, s: (x.astype(jnp.float8_e4m3fn),),
        {},
        TypeError,
        r"k_cache must have dtype .*got float8_e4m3fn",
    ),
    (
        quantize_k_cache_e4m3,
        lambda x, s: (x, s[:1]),
        {"per_head": True},
        ValueError,
        r"per_head chooses how k_scale is computed",
    ),
    (
        quantize_k_cache_e4m3,
        lambda x, s: (x, jnp.ones((3,), jnp.float32)),
        {},
        ValueError,
        r"k_scale must have shape \[\], \[1\] .* \[h_kv\] = \[2\] .*got \(3,\)",
    ),
    (
        quantize_k_cache_e4m3,
        lambda x, s: (x, s.astype(jnp.bfloat16)),
        {},
        TypeError,
        r"k_scale must have dtype float32; got bfloat16",
    ),
    (quantize_k_cache_e4m3, lambda x, s: (x,), {"per_head": 1}, TypeError, r"per_head must be"),
    (
        dequantize_k_cache_e4m3,
        lambda x, s: (x, s),
        {},
        TypeError,
        r"quant_k_cache must have dtype float8_e4m3fn or uint8; got bfloat16",
    ),
    (
        dequantize_k_cache_e4m3,
        lambda x, s: (x.astype(jnp.float8_e4m3fn), None),
        {},
        TypeError,
        r"k_scale must be a JAX array; got NoneType",
    ),
    (
        dequantize_k_cache_e4m3,
        lambda x, s: (x.astype(jnp.float8_e4m3fn), s),
        {"dtype": jnp.int8},
        TypeError,
        r"dtype must be bfloat16 or float16 or float32",
    ),
]


@pytest.mark.parametrize(
    "fn,make,kwargs,error,pattern",
    E4M3_REJECTS,
    ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(E4M3_REJECTS)],
)
def test_e4m3_rejects(fn, make, kwargs, error, pattern):
    x = jnp.zeros((2, 4, 2, 576), jnp.bfloat16)
    k_scale = jnp.ones((2,), jnp.float32)
    with pytest.raises(error, match=f"^{fn.__name__}: " + pattern):
        fn(*make(x, k_scale), **kwargs)
