"""The public API as a user meets it: jit, vmap, scan, backend choice and the A/B switch."""

from __future__ import annotations

import importlib
import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as fm
from jax_flashmla._src import kernels, platform, primitive


def small_decode(rng, b=3, s_q=2, h_q=4, h_kv=1, page=16, max_len=70):
    lens = rng.integers(0, max_len, b).astype(np.int32)
    blocks = -(-max_len // page)
    table = rng.permutation(b * blocks).reshape(b, blocks).astype(np.int32)
    q = jnp.asarray(rng.normal(size=(b, s_q, h_q, 576)) / 10, jnp.bfloat16)
    cache = jnp.asarray(rng.normal(size=(b * blocks, page, h_kv, 576)) / 10, jnp.bfloat16)
    return q, cache, jnp.asarray(table), jnp.asarray(lens)


def test_public_names():
    assert set(fm.FFI_TARGETS) >= {"jax_flashmla_mla_metadata", "jax_flashmla_combine"}
    for name in set(fm.__all__) - {"FFI_TARGETS"}:
        assert callable(getattr(fm, name)), name
        assert getattr(fm, name).__doc__, f"{name} needs a docstring"


def test_ffi_targets_come_from_the_kernel_families():
    """FFI_TARGETS lists the kernel of every family module in _src/kernels (each registers
    itself when the op using it is imported), and a family without a kernel has no primitive."""
    at_import = primitive.registered()
    for module in pkgutil.iter_modules(kernels.__path__):
        importlib.import_module(f"{kernels.__name__}.{module.name}")
    assert primitive.registered() == at_import, "a family module that no op imports"
    names = [family.name for family in at_import]
    assert len(set(names)) == len(names) == len(list(pkgutil.iter_modules(kernels.__path__)))
    assert tuple(f.ffi_target for f in at_import if f.ffi_target is not None) == fm.FFI_TARGETS
    assert {"jax_flashmla_mla_metadata", "jax_flashmla_combine"} <= set(fm.FFI_TARGETS)
    assert "jax_flashmla_decode_dense_sm90" in fm.FFI_TARGETS
    for family in at_import:
        assert (family.primitive is None) == (family.ffi_target is None), family.name


def test_decode_jit_matches_eager_and_accepts_metadata(rng):
    q, cache, table, lens = small_decode(rng)
    eager = fm.flash_mla_with_kvcache(q, cache, table, lens, 512, causal=True)
    metadata, splits = fm.get_mla_metadata(lens, 2 * 4, 1)
    jitted = jax.jit(lambda *a: fm.flash_mla_with_kvcache(*a, 512, metadata, splits, causal=True))(
        q, cache, table, lens
    )
    for x, y in zip(eager, jitted, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_decode_vmap_over_a_leading_axis(rng):
    items = [small_decode(rng) for _ in range(3)]
    stacked = [jnp.stack(parts) for parts in zip(*items, strict=True)]
    outs = jax.vmap(lambda q, c, t, n: fm.flash_mla_with_kvcache(q, c, t, n, 512))(*stacked)
    for i, item in enumerate(items):
        single = fm.flash_mla_with_kvcache(*item, 512)
        np.testing.assert_allclose(
            np.asarray(outs[0][i], np.float32), np.asarray(single[0], np.float32), atol=1e-2
        )
        np.testing.assert_allclose(np.asarray(outs[1][i]), np.asarray(single[1]), rtol=1e-5)


def test_decode_in_scan_over_layers(rng):
    q, cache, table, lens = small_decode(rng)
    caches = jnp.stack([cache, cache * 2, -cache])
    metadata, splits = fm.get_mla_metadata(lens, 8, 1)

    def layer(x, layer_cache):
        out, _ = fm.flash_mla_with_kvcache(x, layer_cache, table, lens, 512, metadata, splits)
        return x, out

    _, outs = jax.jit(lambda q, c: jax.lax.scan(layer, q, c))(q, caches)
    for i in range(3):
        single, _ = fm.flash_mla_with_kvcache(q, caches[i], table, lens, 512)
        np.testing.assert_array_equal(np.asarray(outs[i]), np.asarray(single))


def test_metadata_vmap_and_jit(rng):
    lens = jnp.asarray(rng.integers(0, 9000, (4, 16)), jnp.int32)
    batched = jax.jit(jax.vmap(lambda x: fm.get_mla_metadata(x, 128, 1)))(lens)
    for i in range(4):
        single = fm.get_mla_metadata(lens[i], 128, 1)
        np.testing.assert_array_equal(batched[0][i], single[0])
        np.testing.assert_array_equal(batched[1][i], single[1])


def test_mha_grad_through_public_op(rng):
    cu = jnp.array([0, 5, 5, 12], jnp.int32)
    q, k, v = (jnp.asarray(rng.normal(size=(12, 2, d)) / 10, jnp.bfloat16) for d in (128, 128, 128))

    def loss(q, k, v):
        out, _ = fm.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, causal=True)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for g in grads:
        assert g.dtype == jnp.bfloat16 and np.isfinite(np.asarray(g, np.float32)).all()
    qkv = jnp.concatenate([q, k, v], axis=-1)
    packed = fm.flash_attn_varlen_qkvpacked_func(qkv, cu, 7, 128, causal=True)
    plain = fm.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, causal=True)
    np.testing.assert_array_equal(np.asarray(packed[0]), np.asarray(plain[0]))
    kv = jnp.concatenate([k, v], axis=-1)
    kvpacked = fm.flash_attn_varlen_kvpacked_func(q, kv, cu, cu, 7, 7, 128, causal=True)
    np.testing.assert_array_equal(np.asarray(kvpacked[0]), np.asarray(plain[0]))


def test_sparse_prefill_and_fp8_decode_run_under_jit(rng):
    q = jnp.asarray(rng.normal(size=(8, 64, 576)) / 10, jnp.bfloat16)
    kv = jnp.asarray(rng.normal(size=(40, 1, 576)) / 10, jnp.bfloat16)
    idx = jnp.asarray(rng.integers(-2, 45, (8, 1, 128)), jnp.int32)
    out, max_logits, lse = jax.jit(lambda *a: fm.flash_mla_sparse_fwd(*a, 0.05))(q, kv, idx)
    assert out.shape == (8, 64, 512) and max_logits.shape == lse.shape == (8, 64)

    cache = jnp.asarray(rng.normal(size=(4, 16, 1, 576)) / 10, jnp.bfloat16)
    fp8 = fm.quantize_k_cache(cache)
    indices = jnp.asarray(rng.integers(-1, 64, (2, 1, 64)), jnp.int32)
    qd = jnp.asarray(rng.normal(size=(2, 1, 64, 576)) / 10, jnp.bfloat16)
    out, lse = jax.jit(
        lambda q, c, i: fm.flash_mla_with_kvcache(
            q, c, None, None, 512, is_fp8_kvcache=True, indices=i
        )
    )(qd, fp8, indices)
    assert out.shape == (2, 1, 64, 512) and lse.shape == (2, 64, 1)


def test_fp8_dense_decode_equals_decode_on_dequantised_cache(rng):
    q, cache, table, lens = small_decode(rng, h_q=8)
    fp8 = fm.quantize_k_cache(cache)
    out, lse = fm.flash_mla_with_kvcache(q, fp8, table, lens, 512, is_fp8_kvcache=True)
    ref = fm.flash_mla_with_kvcache(q, fm.dequantize_k_cache(fp8), table, lens, 512)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref[0]))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(ref[1]))


def test_choose_implementation(monkeypatch):
    with platform.assume_device():
        if platform.extension() is not None:
            assert platform.choose_implementation("op", None) == "cuda"
            assert platform.choose_implementation("op", "cuda") == "cuda"
            monkeypatch.setenv(platform.FORCE_XLA_ENV, "other,op")
            assert platform.choose_implementation("op", "cuda") == "xla"
            monkeypatch.setenv(platform.FORCE_XLA_ENV, "all")
            assert platform.choose_implementation("op", None) == "xla"
            monkeypatch.delenv(platform.FORCE_XLA_ENV)
        assert platform.choose_implementation("op", None, "no kernel for this") == "xla"
        reason = platform.extension_unavailable_reason() or "no kernel for this"
        with pytest.raises(ValueError, match="op: implementation='cuda' is unavailable: ") as e:
            platform.choose_implementation("op", "cuda", "no kernel for this")
        assert reason in str(e.value)
    assert platform.choose_implementation("op", "xla") == "xla"


def test_main_job_runs(capsys):
    """On a Hopper GPU the kernels are checked against their references; elsewhere only the
    references run and the report says why (tests/test_main.py covers that report)."""
    from jax_flashmla.__main__ import main

    assert main(["--runs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "jax_flashmla" in printed
    if platform.device_unsupported_reason():
        assert "Hopper" in printed and "all checks passed" not in printed
    else:
        assert "all checks passed" in printed
