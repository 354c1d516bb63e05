"""Differentiating a forward-only op raises a TypeError that names the op and the ops that do
have gradients, on the kernel path and on the reference path; stop_gradient lets it through."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_api import small_decode

import jax_flashmla as fm
from jax_flashmla._src import platform


def decode_case(rng):
    q, cache, table, lens = small_decode(rng, page=64, max_len=150)
    return (
        "flash_mla_with_kvcache",
        lambda q, c: fm.flash_mla_with_kvcache(q, c, table, lens, 512),
        (q, cache),
    )


def sparse_decode_case(rng):
    q = jnp.asarray(rng.normal(size=(2, 1, 16, 576)) / 10, jnp.bfloat16)
    cache = fm.quantize_k_cache(jnp.asarray(rng.normal(size=(3, 16, 1, 576)) / 10, jnp.bfloat16))
    indices = jnp.asarray(rng.integers(-1, 48, (2, 1, 64)), jnp.int32)
    sink = jnp.zeros((16,), jnp.float32)

    def fn(q, sink):
        return fm.flash_mla_with_kvcache(
            q, cache, None, None, 512, is_fp8_kvcache=True, indices=indices, attn_sink=sink
        )

    return "flash_mla_with_kvcache", fn, (q, sink)


def combine_case(rng):
    partial_o = jnp.asarray(rng.normal(size=(5, 1, 4, 16)), jnp.float32)
    partial_lse = jnp.asarray(rng.normal(size=(5, 1, 4)), jnp.float32)
    splits = jnp.array([0, 2, 3], jnp.int32)
    return (
        "combine_splits",
        lambda o, lse: fm.combine_splits(o, lse, splits),
        (partial_o, partial_lse),
    )


CASES = {
    "dense decode": decode_case,
    "sparse decode": sparse_decode_case,
    "combine": combine_case,
}


def loss_of(fn):
    return lambda *args: sum(
        jnp.sum(jnp.where(jnp.isfinite(y), y, 0).astype(jnp.float32)) for y in fn(*args)
    )


def assert_names_op(info, op):
    message = str(info.value)
    assert message.startswith(f"{op} is forward-only"), message
    assert "flash_attn_varlen_func" in message and "flash_attn_varlen_qkvpacked_func" in message


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("transform", ["grad", "jvp", "vjp", "jit_grad"])
def test_differentiation_raises(rng, case, transform):
    op, fn, args = CASES[case](rng)
    calls = {
        "grad": lambda: jax.grad(loss_of(fn), argnums=(0, 1))(*args),
        "jvp": lambda: jax.jvp(fn, args, tuple(jnp.ones_like(a) for a in args)),
        "vjp": lambda: jax.vjp(fn, *args),
        "jit_grad": lambda: jax.jit(jax.grad(loss_of(fn)))(*args),
    }
    with pytest.raises(TypeError) as info:
        calls[transform]()
    assert_names_op(info, op)


@pytest.mark.skipif(platform.extension() is None, reason=platform.extension_unavailable_reason())
def test_kernel_path_raises_too():
    """Traced for a Hopper GPU, where the custom calls are chosen."""
    q = jax.ShapeDtypeStruct((2, 1, 16, 576), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((4, 64, 1, 576), jnp.bfloat16)
    table = jnp.zeros((2, 2), jnp.int32)
    lens = jnp.array([10, 100], jnp.int32)

    def loss(q, cache):
        out, _ = fm.flash_mla_with_kvcache(q, cache, table, lens, 512, implementation="cuda")
        return jnp.sum(out.astype(jnp.float32))

    with platform.assume_device():
        hlo = jax.jit(loss).trace(q, cache).lower(lowering_platforms=("cuda",)).as_text()
        assert "@jax_flashmla_decode_dense_sm90" in hlo
        with pytest.raises(TypeError) as info:
            jax.jit(jax.grad(loss)).trace(q, cache)
    assert_names_op(info, "flash_mla_with_kvcache")

    po = jax.ShapeDtypeStruct((4, 1, 8, 512), jnp.float32)
    pl = jax.ShapeDtypeStruct((4, 1, 8), jnp.float32)
    splits = jnp.array([0, 2, 3], jnp.int32)
    with platform.assume_device(), pytest.raises(TypeError) as info:
        jax.jit(
            jax.grad(lambda o, lse: jnp.sum(fm.combine_splits(o, lse, splits)[1]), argnums=1)
        ).trace(po, pl)
    assert_names_op(info, "combine_splits")


@pytest.mark.parametrize("case", sorted(CASES))
def test_stop_gradient_lets_the_op_be_a_constant(rng, case):
    _, fn, args = CASES[case](rng)

    def loss(*args):
        consts = [jax.lax.stop_gradient(a) for a in args]
        return loss_of(fn)(*consts) + sum(jnp.sum(a.astype(jnp.float32)) for a in args)

    grads = jax.grad(loss, argnums=tuple(range(len(args))))(*args)
    for g, a in zip(grads, args, strict=True):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.ones(a.shape, np.float32))


def test_transforms_other_than_differentiation_still_work(rng):
    """jit and vmap see the wrapped op unchanged (the sharding tests cover shard_map)."""
    _, fn, args = decode_case(rng)
    eager = fn(*args)
    jitted = jax.jit(fn)(*args)
    batched = jax.vmap(fn)(*(jnp.stack([a, a]) for a in args))
    for e, j, v in zip(eager, jitted, batched, strict=True):
        np.testing.assert_array_equal(np.asarray(e), np.asarray(j))
        np.testing.assert_array_equal(np.asarray(v[1]), np.asarray(e))


def test_metadata_is_integer_only(rng):
    """get_mla_metadata has only an int32 array: jax.grad refuses it before the op runs, and
    jvp / vjp carry float0 (no gradient) through it, as for any integer function."""
    lens = jnp.asarray(rng.integers(0, 500, 4), jnp.int32)

    def fn(lens):
        return fm.get_mla_metadata(lens, 16, 1)

    with pytest.raises(TypeError, match="grad requires real- or complex-valued inputs"):
        jax.grad(lambda x: jnp.sum(fn(x)[1]).astype(jnp.float32))(lens)
    tangent = np.zeros(lens.shape, jax.dtypes.float0)
    primals, tangents = jax.jvp(fn, (lens,), (tangent,))
    assert all(t.dtype == jax.dtypes.float0 for t in tangents)
    np.testing.assert_array_equal(primals[1], fn(lens)[1])
