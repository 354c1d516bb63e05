"""FP8 KV-cache quantisation for MLA decode: the "V32" and "MODEL1" byte layouts, and the plain
scaled "E4M3" cache.

The FP8 cache is an array of raw bytes typed ``jnp.float8_e4m3fn`` (FlashMLA stores it as a
``torch.float8_e4m3fn`` tensor). Only the NoPE bytes are genuine e4m3 values; the scale and
RoPE bytes are reinterpreted with :func:`jax.lax.bitcast_convert_type` (little-endian, which
is the byte order of every platform JAX runs on).

Layouts (``h_kv == 1``):

* ``"V32"`` (d_qk = 576 = 512 NoPE + 64 RoPE), 656 bytes per token, each token on its own:
  ``512 x e4m3`` NoPE | ``4 x float32`` scales (one per 128-value tile) | ``64 x bf16`` RoPE.
  The JAX cache is ``[num_blocks, page, 1, 656]``.
* ``"MODEL1"`` (d_qk = 512 = 448 NoPE + 64 RoPE), 584 bytes per token, laid out per block of
  ``page`` tokens: first ``page * 576`` bytes hold the tokens (``448 x e4m3`` | ``64 x bf16``
  each), then ``page * 8`` bytes of scales (per token ``7 x e8m0`` exponents, one per 64-value
  tile, and one zero pad byte). The JAX cache is ``[num_blocks, page, 1, 584]`` whose rows are
  *not* tokens: only the flattened bytes of each block are meaningful.

The quantiser, per tile: ``scale = 2 ** ceil(log2(max(amax / 448, 1e-4)))`` and
``q = e4m3(x / scale)`` (round to nearest even). A power-of-two scale makes ``x / scale``
exact, so the only rounding is the e4m3 cast; ``amax / 448`` is evaluated in float32.

The ``"E4M3"`` cache (dense decode only, any ``h_kv``), as vLLM stores FP8 MLA caches, is no
byte layout: ``float8_e4m3fn [num_blocks, page, h_kv, d_qk]`` holding every dim (RoPE
included) as e4m3, with one float32 ``k_scale`` for the whole cache or one per KV head, passed
beside it: a value is ``float32(e4m3) * k_scale``. :func:`quantize_k_cache_e4m3` and
:func:`dequantize_k_cache_e4m3` make and read it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_flashmla._src import checks

__all__ = [
    "FP8_LAYOUTS",
    "SCALED_LAYOUT",
    "Fp8Layout",
    "dequantize_k_cache",
    "dequantize_k_cache_e4m3",
    "infer_fp8_layout",
    "quantize_k_cache",
    "quantize_k_cache_e4m3",
]

# Largest finite float8_e4m3fn value.
_E4M3_MAX = 448.0
# Floor of the per-tile scale before rounding up to a power of two (avoids 0 / 0 on zero tiles).
_SCALE_FLOOR = 1e-4
# Dtypes of a dequantised cache, and of the raw bytes of a quantised one.
_FLOAT_TYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_BYTE_TYPES = (jnp.float8_e4m3fn, jnp.uint8)
#: Name of the plain e4m3 cache with a float32 scale per tensor or per KV head (no byte layout:
#: not in FP8_LAYOUTS).
SCALED_LAYOUT = "E4M3"


@dataclasses.dataclass(frozen=True)
class Fp8Layout:
    """Static description of one FP8 KV-cache byte layout.

    Attributes:
      name: layout name, a key of :data:`FP8_LAYOUTS`.
      d_qk: head dim of the dequantised K row (NoPE + RoPE).
      d_nope: leading dims stored as e4m3 with per-tile scales.
      d_rope: trailing dims stored as raw bf16.
      d_v: leading dims of the dequantised row that form V.
      tile: number of NoPE values sharing one scale.
      bytes_per_token: bytes per token in the cache (last dim of the JAX cache array).
      scale_format: ``"float32"`` (4 bytes per scale) or ``"e8m0"`` (1 exponent byte).
      scales_per_block: False when each token's scales sit inside the token's bytes (V32);
        True when a block stores all token bytes first and all scales after them (MODEL1).
    """

    name: str
    d_qk: int
    d_nope: int
    d_rope: int
    d_v: int
    tile: int
    bytes_per_token: int
    scale_format: str
    scales_per_block: bool

    @property
    def num_tiles(self) -> int:
        """Number of scales per token."""
        return self.d_nope // self.tile

    @property
    def token_bytes(self) -> int:
        """Bytes of NoPE + RoPE data per token (scales excluded)."""
        return self.d_nope + 2 * self.d_rope

    @property
    def scale_bytes(self) -> int:
        """Bytes of scale data per token, padding included."""
        return self.bytes_per_token - self.token_bytes


FP8_LAYOUTS: dict[str, Fp8Layout] = {
    "V32": Fp8Layout(
        name="V32",
        d_qk=576,
        d_nope=512,
        d_rope=64,
        d_v=512,
        tile=128,
        bytes_per_token=656,
        scale_format="float32",
        scales_per_block=False,
    ),
    "MODEL1": Fp8Layout(
        name="MODEL1",
        d_qk=512,
        d_nope=448,
        d_rope=64,
        d_v=512,
        tile=64,
        bytes_per_token=584,
        scale_format="e8m0",
        scales_per_block=True,
    ),
}


def infer_fp8_layout(bytes_per_token: int) -> str:
    """Returns the layout name whose token size is ``bytes_per_token`` (656 or 584).

    Raises:
      ValueError: if no layout has that many bytes per token.
    """
    return _layout_for_bytes("infer_fp8_layout", "bytes_per_token", bytes_per_token)


def _layout_for_bytes(op: str, name: str, bytes_per_token: int) -> str:
    for layout in FP8_LAYOUTS.values():
        if layout.bytes_per_token == bytes_per_token:
            return layout.name
    known = ", ".join(f"{v.bytes_per_token} ({v.name})" for v in FP8_LAYOUTS.values())
    raise ValueError(
        f"{op}: {name} must be the bytes per token of an FP8 layout, {known}; got {bytes_per_token}"
    )


def _check_cache(op: str, name: str, x: Any, dtypes: tuple, last_dim: int, what: str) -> None:
    """An FP8-layout cache operand: rank 4 [num_blocks, page, 1, last_dim] of `dtypes`."""
    checks.check_array(
        op, name, x, ndim=4, dtypes=dtypes, shape_doc=f"[num_blocks, page, 1, {what}]"
    )
    if x.shape[2] != 1:
        raise ValueError(
            f"{op}: {name} must have h_kv (dim 2) 1 for an FP8 cache; got shape {tuple(x.shape)}"
        )
    if x.shape[3] != last_dim:
        raise ValueError(f"{op}: {name}'s last dim must be {last_dim} ({what}); got {x.shape[3]}")


def _tile_scales(x: jax.Array, tile: int) -> tuple[jax.Array, jax.Array]:
    """Per-tile power-of-two scales of ``x`` (float32 [..., n * tile]).

    Returns (scale float32 [..., n], e8m0 exponent byte as int32 [..., n]). A tile holding a
    NaN or an infinity gets a NaN scale (e8m0 byte 255), so its values dequantise to NaN.
    """
    tiles = x.reshape(*x.shape[:-1], x.shape[-1] // tile, tile)
    # reduce_max propagates NaN, so a non-finite tile yields a non-finite amax.
    amax = jnp.max(jnp.abs(tiles), axis=-1)
    y = jnp.maximum(amax / jnp.float32(_E4M3_MAX), jnp.float32(_SCALE_FLOOR))
    # ceil(log2(y)) from the float32 bits, exactly: y >= 1e-4 is a normal number, so it is
    # 2^(E-127) * (1 + M / 2^23), which rounds up to 2^(E-127) iff M == 0, else 2^(E-126).
    bits = jax.lax.bitcast_convert_type(y, jnp.uint32)
    biased_exp = (bits >> 23).astype(jnp.int32)
    has_mantissa = (bits & jnp.uint32(0x7FFFFF)) != 0
    byte = biased_exp + has_mantissa.astype(jnp.int32)
    finite = jnp.isfinite(y)
    byte = jnp.where(finite, byte, 255)
    scale = jax.lax.bitcast_convert_type((byte.astype(jnp.uint32) << 23), jnp.float32)
    scale = jnp.where(finite, scale, jnp.float32(jnp.nan))
    return scale, byte


def _quantize_tiles(x: jax.Array, scale: jax.Array, tile: int) -> jax.Array:
    """e4m3 bytes (uint8 [..., n * tile]) of ``x / scale`` per tile; x, scale float32."""
    tiles = x.reshape(*x.shape[:-1], scale.shape[-1], tile)
    q = (tiles / scale[..., None]).astype(jnp.float8_e4m3fn)
    q = jax.lax.bitcast_convert_type(q, jnp.uint8)
    return q.reshape(x.shape)


def _to_bytes(x: jax.Array) -> jax.Array:
    """Raw little-endian bytes of ``x``: [..., n] -> uint8 [..., n * itemsize]."""
    b = jax.lax.bitcast_convert_type(x, jnp.uint8)
    if b.ndim == x.ndim:  # one-byte dtypes keep their shape
        return b
    return b.reshape(*x.shape[:-1], x.shape[-1] * b.shape[-1])


def _from_bytes(b: jax.Array, dtype: Any) -> jax.Array:
    """Inverse of :func:`_to_bytes`: uint8 [..., n * itemsize] -> dtype [..., n]."""
    itemsize = np.dtype(dtype).itemsize
    if itemsize == 1:
        return jax.lax.bitcast_convert_type(b, dtype)
    b = b.reshape(*b.shape[:-1], b.shape[-1] // itemsize, itemsize)
    return jax.lax.bitcast_convert_type(b, dtype)


def quantize_k_cache(k_cache: jax.Array, *, layout: str = "V32") -> jax.Array:
    """Quantises a bf16 (or fp16/fp32) MLA K cache into an FP8 cache. Jittable (layout static).

    Args:
      k_cache: bfloat16, float16 or float32 [num_blocks, page, 1, d]; d = 576 for "V32",
        512 for "MODEL1".
        Dims [0, d_nope) are quantised per tile; the last 64 (RoPE) are stored as bf16.
      layout: "V32" or "MODEL1" (see the module docstring for the byte layouts).

    Returns:
      float8_e4m3fn [num_blocks, page, 1, 656] for "V32", [num_blocks, page, 1, 584] for
      "MODEL1" (raw bytes: only the NoPE bytes are real e4m3 values). For MODEL1 the
      flattened bytes of each block are [page * 576 token bytes | page * 8 scale bytes], i.e.
      a block stride of page * 584 bytes. FlashMLA's torch buffer pads each block stride up to
      a multiple of 576 bytes; to use such a buffer here, drop that padding at the end of each
      block (and to hand ours to FlashMLA, add it).

    Raises:
      TypeError: k_cache not an array of bfloat16, float16 or float32; layout not a string.
      ValueError: unknown layout name; k_cache not rank 4, h_kv != 1, or wrong last dim.

    Non-finite NoPE values turn their whole tile into NaN; RoPE values are cast to bf16 as-is.
    """
    op = "quantize_k_cache"
    checks.check_choice(op, "layout", layout, tuple(FP8_LAYOUTS))
    lay = FP8_LAYOUTS[layout]
    _check_cache(op, "k_cache", k_cache, _FLOAT_TYPES, lay.d_qk, f"d_qk of layout {lay.name!r}")
    return _quantize(k_cache, layout)


@functools.partial(jax.jit, static_argnames=("layout",))
def _quantize(k_cache: jax.Array, layout: str) -> jax.Array:
    lay = FP8_LAYOUTS[layout]
    num_blocks, page = k_cache.shape[0], k_cache.shape[1]
    x = k_cache[:, :, 0, :]  # [num_blocks, page, d_qk]
    nope = x[..., : lay.d_nope].astype(jnp.float32)
    scale, scale_byte = _tile_scales(nope, lay.tile)
    nope_bytes = _quantize_tiles(nope, scale, lay.tile)
    rope_bytes = _to_bytes(x[..., lay.d_nope :].astype(jnp.bfloat16))

    if lay.scale_format == "float32":
        scale_bytes = _to_bytes(scale)
        out = jnp.concatenate([nope_bytes, scale_bytes, rope_bytes], axis=-1)
    else:
        pad = lay.scale_bytes - lay.num_tiles
        scale_bytes = jnp.concatenate(
            [scale_byte.astype(jnp.uint8), jnp.zeros((num_blocks, page, pad), jnp.uint8)],
            axis=-1,
        )
        tokens = jnp.concatenate([nope_bytes, rope_bytes], axis=-1)
        out = jnp.concatenate(
            [tokens.reshape(num_blocks, -1), scale_bytes.reshape(num_blocks, -1)], axis=-1
        )
    # Concatenate as uint8 and reinterpret once: the scale/RoPE bytes may be e4m3 NaN patterns.
    out = out.reshape(num_blocks, page, 1, lay.bytes_per_token)
    return jax.lax.bitcast_convert_type(out, jnp.float8_e4m3fn)


def _e8m0_to_float32(byte: jax.Array) -> jax.Array:
    """e8m0 exponent bytes (uint8) -> float32 2 ** (byte - 127); 255 is NaN."""
    bits = byte.astype(jnp.uint32) << 23
    # byte 0 is 2^-127, a float32 subnormal whose bits are not byte << 23.
    bits = jnp.where(byte == 0, jnp.uint32(0x00400000), bits)
    bits = jnp.where(byte == 255, jnp.uint32(0x7FC00000), bits)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def dequantize_k_cache(
    quant_k_cache: jax.Array, *, layout: str | None = None, dtype: Any = jnp.bfloat16
) -> jax.Array:
    """Dequantises an FP8 cache made by :func:`quantize_k_cache`. Jittable (layout static).

    Args:
      quant_k_cache: float8_e4m3fn or uint8 [num_blocks, page, 1, 656 ("V32") or 584
        ("MODEL1")], holding the raw bytes of the layout.
      layout: "V32", "MODEL1", or None to infer it from the last dim.
      dtype: bfloat16, float16 or float32, the dtype of the result.

    Returns:
      [num_blocks, page, 1, 576] ("V32") or [num_blocks, page, 1, 512] ("MODEL1") in
      ``dtype``: NoPE dims are ``float32(e4m3) * scale`` (then cast), RoPE dims the stored
      bf16 values.

    Raises:
      TypeError: quant_k_cache not an array of float8_e4m3fn or uint8; dtype not one of the
        three above; layout neither None nor a string.
      ValueError: unknown layout name; quant_k_cache not rank 4, h_kv != 1, or a last dim
        that does not match the layout (or, with layout None, no layout).
    """
    op = "dequantize_k_cache"
    name = "quant_k_cache"
    checks.check_array(
        op,
        name,
        quant_k_cache,
        ndim=4,
        dtypes=_BYTE_TYPES,
        shape_doc="[num_blocks, page, 1, bytes_per_token]",
    )
    out_dtype = checks.check_dtype(op, "dtype", dtype, _FLOAT_TYPES)
    if layout is None:
        layout = _layout_for_bytes(op, f"{name}'s last dim", quant_k_cache.shape[3])
    checks.check_choice(op, "layout", layout, tuple(FP8_LAYOUTS))
    lay = FP8_LAYOUTS[layout]
    _check_cache(
        op,
        name,
        quant_k_cache,
        _BYTE_TYPES,
        lay.bytes_per_token,
        f"bytes per token of layout {lay.name!r}",
    )
    return _dequantize(quant_k_cache, layout, out_dtype)


@functools.partial(jax.jit, static_argnames=("layout", "out_dtype"))
def _dequantize(quant_k_cache: jax.Array, layout: str, out_dtype: np.dtype) -> jax.Array:
    lay = FP8_LAYOUTS[layout]
    in_dtype = jnp.dtype(quant_k_cache.dtype)
    shape = quant_k_cache.shape
    num_blocks, page = shape[0], shape[1]
    raw = quant_k_cache[:, :, 0, :]
    if in_dtype != jnp.dtype(jnp.uint8):
        raw = jax.lax.bitcast_convert_type(raw, jnp.uint8)

    if lay.scale_format == "float32":
        nope_b = raw[..., : lay.d_nope]
        scale = _from_bytes(raw[..., lay.d_nope : lay.d_nope + 4 * lay.num_tiles], jnp.float32)
        rope_b = raw[..., lay.d_nope + 4 * lay.num_tiles :]
    else:
        flat = raw.reshape(num_blocks, page * lay.bytes_per_token)
        tokens = flat[:, : page * lay.token_bytes].reshape(num_blocks, page, lay.token_bytes)
        scale_b = flat[:, page * lay.token_bytes :].reshape(num_blocks, page, lay.scale_bytes)
        nope_b = tokens[..., : lay.d_nope]
        rope_b = tokens[..., lay.d_nope :]
        scale = _e8m0_to_float32(scale_b[..., : lay.num_tiles])

    q = _from_bytes(nope_b, jnp.float8_e4m3fn).astype(jnp.float32)
    q = q.reshape(num_blocks, page, lay.num_tiles, lay.tile) * scale[..., None]
    nope = q.reshape(num_blocks, page, lay.d_nope).astype(out_dtype)
    rope = _from_bytes(rope_b, jnp.bfloat16).astype(out_dtype)
    out = jnp.concatenate([nope, rope], axis=-1)
    return out.reshape(num_blocks, page, 1, lay.d_qk)


def check_k_scale(op: str, k_scale: Any, h_kv: int) -> None:
    """k_scale of an "E4M3" cache: float32 [], [1] or [h_kv]."""
    checks.check_array(op, "k_scale", k_scale, dtypes=checks.FLOAT32)
    if tuple(k_scale.shape) not in ((), (1,), (h_kv,)):
        raise ValueError(
            f"{op}: k_scale must have shape [], [1] (one scale for the cache) or [h_kv] = "
            f"[{h_kv}] (one per KV head); got {tuple(k_scale.shape)}"
        )


def _check_e4m3_cache(op: str, name: str, x: Any, dtypes: tuple) -> None:
    checks.check_array(op, name, x, ndim=4, dtypes=dtypes, shape_doc="[num_blocks, page, h_kv, d]")


def quantize_k_cache_e4m3(
    k_cache: jax.Array, k_scale: jax.Array | None = None, *, per_head: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Quantises an MLA K cache into the plain scaled "E4M3" cache. Jittable.

    Args:
      k_cache: bfloat16, float16 or float32 [num_blocks, page, h_kv, d].
      k_scale: float32 [], [1] or [h_kv], the scale to use (as a checkpoint's calibrated
        k_scale); None computes it: amax / 448 over the cache (or over each KV head with
        per_head), 1 where amax is 0.
      per_head: static bool, with k_scale None: one scale per KV head instead of one for the
        cache.

    Returns:
      (float8_e4m3fn [num_blocks, page, h_kv, d], float32 k_scale: the one given, or [] /
      [h_kv] with per_head): each value is ``e4m3(clip(x / k_scale, -448, 448))``, rounded to
      nearest even, so values past 448 * k_scale saturate. NaN stays NaN; a computed scale of
      a cache holding a NaN or an infinity is NaN (the cache then dequantises to NaN).

    Raises:
      TypeError: k_cache not an array of bfloat16, float16 or float32; k_scale not float32;
        per_head not a bool.
      ValueError: k_cache not rank 4; k_scale of another shape; both k_scale and per_head.
    """
    op = "quantize_k_cache_e4m3"
    _check_e4m3_cache(op, "k_cache", k_cache, _FLOAT_TYPES)
    per_head = checks.check_bool(op, "per_head", per_head)
    h_kv = k_cache.shape[2]
    if k_scale is None:
        return _quantize_e4m3_computed(k_cache, per_head)
    if per_head:
        raise ValueError(f"{op}: per_head chooses how k_scale is computed; k_scale was given")
    check_k_scale(op, k_scale, h_kv)
    return _quantize_e4m3(k_cache, k_scale), k_scale


@functools.partial(jax.jit, static_argnames=("per_head",))
def _quantize_e4m3_computed(k_cache: jax.Array, per_head: bool) -> tuple[jax.Array, jax.Array]:
    axes = (0, 1, 3) if per_head else None
    # reduce_max propagates NaN: a non-finite cache gets a non-finite scale.
    amax = jnp.max(jnp.abs(k_cache.astype(jnp.float32)), axis=axes)
    k_scale = jnp.where(amax == 0, jnp.float32(1), amax / jnp.float32(_E4M3_MAX))
    k_scale = jnp.where(jnp.isfinite(k_scale), k_scale, jnp.float32(jnp.nan))
    return _quantize_e4m3(k_cache, k_scale), k_scale


def _per_head(k_scale: jax.Array) -> jax.Array:
    """k_scale [], [1] or [h_kv] broadcast against [num_blocks, page, h_kv, d]."""
    return jnp.reshape(k_scale, (-1, 1)) if k_scale.ndim else k_scale


@jax.jit
def _quantize_e4m3(k_cache: jax.Array, k_scale: jax.Array) -> jax.Array:
    x = k_cache.astype(jnp.float32) / _per_head(k_scale)
    return jnp.clip(x, -_E4M3_MAX, _E4M3_MAX).astype(jnp.float8_e4m3fn)


def dequantize_k_cache_e4m3(
    quant_k_cache: jax.Array, k_scale: jax.Array, *, dtype: Any = jnp.bfloat16
) -> jax.Array:
    """Dequantises an "E4M3" cache: ``float32(e4m3) * k_scale``, cast to ``dtype``. Jittable.

    Args:
      quant_k_cache: float8_e4m3fn (or its raw bytes as uint8) [num_blocks, page, h_kv, d].
      k_scale: float32 [], [1] or [h_kv].
      dtype: bfloat16, float16 or float32, the dtype of the result.

    Raises:
      TypeError: quant_k_cache not float8_e4m3fn or uint8; k_scale not float32; dtype not
        one of the three above.
      ValueError: quant_k_cache not rank 4; k_scale of another shape.
    """
    op = "dequantize_k_cache_e4m3"
    _check_e4m3_cache(op, "quant_k_cache", quant_k_cache, _BYTE_TYPES)
    check_k_scale(op, k_scale, quant_k_cache.shape[2])
    out_dtype = checks.check_dtype(op, "dtype", dtype, _FLOAT_TYPES)
    return _dequantize_e4m3(quant_k_cache, k_scale, out_dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def _dequantize_e4m3(quant_k_cache: jax.Array, k_scale: jax.Array, out_dtype) -> jax.Array:
    values = quant_k_cache
    if jnp.dtype(values.dtype) == jnp.dtype(jnp.uint8):
        values = jax.lax.bitcast_convert_type(values, jnp.float8_e4m3fn)
    return (values.astype(jnp.float32) * _per_head(k_scale)).astype(out_dtype)
