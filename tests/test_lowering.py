"""The CUDA path without a GPU: ops lower to their FFI custom calls with the right operands,
results and attributes, and the same primitives lower to their references elsewhere."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as fm
from jax_flashmla._src import platform, primitive
from jax_flashmla._src.geometry import (
    METADATA_FIELDS,
    SCHEDULER_BLOCK_TOKENS,
    SCHEDULER_FIXED_OVERHEAD,
)
from jax_flashmla.reference.schedule import combine_splits, mla_metadata

pytestmark = pytest.mark.skipif(
    platform.extension() is None, reason=platform.extension_unavailable_reason()
)


def cuda_hlo(fn, *args) -> str:
    with platform.assume_device():
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def custom_calls(hlo: str) -> list[str]:
    return [line for line in hlo.splitlines() if "stablehlo.custom_call" in line]


def test_extension_registers_every_target():
    """Every custom call a kernel family can emit has a handler in the extension."""
    names = set(platform.extension().registrations())
    assert set(fm.FFI_TARGETS) == set(primitive.ffi_targets())
    assert {"jax_flashmla_mla_metadata", "jax_flashmla_combine"} <= set(fm.FFI_TARGETS)
    assert set(fm.FFI_TARGETS) <= names
    assert "sm_90a" in platform.extension().compiled_architectures()


def test_metadata_lowers_to_custom_call():
    lens = jax.ShapeDtypeStruct((5,), jnp.int32)
    (call,) = custom_calls(cuda_hlo(lambda x: fm.get_mla_metadata(x, 128, 1), lens))
    assert "@jax_flashmla_mla_metadata" in call
    assert f"(tensor<5xi32>) -> (tensor<66x{METADATA_FIELDS}xi32>, tensor<6xi32>)" in call
    for attribute in (
        "block_tokens = 64 : i64",
        "fixed_overhead = 5 : i64",
        "fixed_length = -1 : i64",
    ):
        assert attribute in call, call
    # Sparse decode: parts per query token and 64-head tile (here s_q 2, h_q 64).
    (call,) = custom_calls(
        cuda_hlo(lambda x: fm.get_mla_metadata(x, 128, 1, num_heads_q=64, topk=2048), lens)
    )
    assert "fixed_length = 2048 : i64" in call and f"tensor<66x{METADATA_FIELDS}xi32>" in call


def test_combine_lowers_to_custom_call():
    args = (
        jax.ShapeDtypeStruct((10, 2, 16, 512), jnp.float32),
        jax.ShapeDtypeStruct((10, 2, 16), jnp.float32),
        jax.ShapeDtypeStruct((5,), jnp.int32),
    )
    (call,) = custom_calls(cuda_hlo(lambda *a: fm.combine_splits(*a, out_dtype=jnp.float16), *args))
    assert "@jax_flashmla_combine" in call
    assert re.search(
        r"\(tensor<10x2x16x512xf32>, tensor<10x2x16xf32>, tensor<5xi32>, "
        r"tensor<0xf32>\) -> \(tensor<4x2x16x512xf16>, tensor<4x16x2xf32>\)",
        call,
    )
    sink = jax.ShapeDtypeStruct((16,), jnp.float32)
    (call,) = custom_calls(cuda_hlo(fm.combine_splits, *args, sink))
    assert "tensor<16xf32>) -> (tensor<4x2x16x512xbf16>" in call


def test_calls_use_the_typed_ffi():
    """Attributes travel as a typed-FFI dictionary (the handlers' command-buffer traits live in
    C++ and are exercised by the GPU tests under XLA command buffers)."""
    lens = jax.ShapeDtypeStruct((5,), jnp.int32)
    (call,) = custom_calls(cuda_hlo(lambda x: fm.get_mla_metadata(x, 128, 1), lens))
    assert "mhlo.backend_config = {block_tokens = 64 : i64" in call
    assert 'backend_config = ""' in call


def test_vmap_lowers_to_a_loop_of_custom_calls():
    lens = jax.ShapeDtypeStruct((3, 5), jnp.int32)
    hlo = cuda_hlo(jax.vmap(lambda x: fm.get_mla_metadata(x, 128, 1)), lens)
    assert len(custom_calls(hlo)) == 1 and "stablehlo.while" in hlo


def test_primitives_fall_back_to_reference_on_cpu(rng):
    """Bound under an assumed GPU but run on the CPU: the reference lowering answers."""
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU lowering")
    lens = jnp.asarray(rng.integers(0, 5000, 9), jnp.int32)
    with platform.assume_device():
        metadata, num_splits = jax.jit(lambda x: fm.get_mla_metadata(x, 128, 1))(lens)
        batched = jax.jit(jax.vmap(lambda x: fm.get_mla_metadata(x, 128, 1)))(
            jnp.stack([lens, lens // 2])
        )
    scheme = {"block_tokens": SCHEDULER_BLOCK_TOKENS, "fixed_overhead": SCHEDULER_FIXED_OVERHEAD}
    ref = mla_metadata(lens, num_parts=66, **scheme)
    np.testing.assert_array_equal(metadata, ref[0])
    np.testing.assert_array_equal(num_splits, ref[1])
    np.testing.assert_array_equal(batched[1][1], mla_metadata(lens // 2, num_parts=66, **scheme)[1])

    partial_o = jnp.asarray(rng.normal(size=(6, 1, 2, 8)), jnp.float32)
    partial_lse = jnp.asarray(rng.normal(size=(6, 1, 2)), jnp.float32)
    splits = jnp.array([0, 2, 3, 5], jnp.int32)
    with platform.assume_device():
        out, lse = jax.jit(fm.combine_splits)(partial_o, partial_lse, splits)
    ref_out, ref_lse = combine_splits(partial_o, partial_lse, splits, None, out_dtype=jnp.bfloat16)
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(lse, ref_lse)


def test_dense_decode_lowers_to_metadata_then_kernel():
    q = jax.ShapeDtypeStruct((4, 2, 128, 576), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((40, 64, 1, 576), jnp.bfloat16)
    table = jax.ShapeDtypeStruct((4, 10), jnp.int32)
    lens = jax.ShapeDtypeStruct((4,), jnp.int32)
    hlo = cuda_hlo(
        lambda *a: fm.flash_mla_with_kvcache(*a, 512, softmax_scale=0.1, causal=True),
        q,
        cache,
        table,
        lens,
    )
    metadata_call, decode_call = custom_calls(hlo)
    assert "@jax_flashmla_mla_metadata" in metadata_call
    assert "@jax_flashmla_decode_dense_sm90" in decode_call
    assert (
        "(tensor<4x2x128x576xbf16>, tensor<40x64x1x576xbf16>, tensor<4x10xi32>, tensor<4xi32>, "
        f"tensor<33x{METADATA_FIELDS}xi32>, tensor<5xi32>) -> (tensor<4x2x128x512xbf16>, "
        "tensor<4x128x2xf32>, "
        "tensor<37x2x128x512xf32>, tensor<37x2x128xf32>)"
    ) in decode_call
    assert "causal = true" in decode_call and "softmax_scale = 1.000000e-01 : f32" in decode_call


@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.parametrize("layout, d_qk, token_bytes", [("V32", 576, 656), ("MODEL1", 512, 584)])
def test_sparse_decode_lowers_to_custom_call(layout, d_qk, token_bytes, with_lengths):
    """Sparse decode: the schedule (from the lengths when given, else fixed at topk +
    extra_topk), then the kernel with every optional operand, absent ones zero-sized."""
    b, s_q, h_q, topk, extra_topk = 3, 2, 16, 128, 64
    q = jax.ShapeDtypeStruct((b, s_q, h_q, d_qk), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((10, 7, 1, token_bytes), jnp.float8_e4m3fn)
    extra_cache = jax.ShapeDtypeStruct((4, 5, 1, token_bytes), jnp.float8_e4m3fn)
    indices = jax.ShapeDtypeStruct((b, s_q, topk), jnp.int32)
    extra_indices = jax.ShapeDtypeStruct((b, s_q, extra_topk), jnp.int32)
    lengths = jax.ShapeDtypeStruct((b,), jnp.int32)

    def call(q, cache, indices, extra_cache, extra_indices, lengths):
        return fm.flash_mla_with_kvcache(
            q,
            cache,
            None,
            None,
            512,
            softmax_scale=0.25,
            is_fp8_kvcache=True,
            indices=indices,
            extra_k_cache=extra_cache,
            extra_indices_in_kvcache=extra_indices,
            topk_length=lengths if with_lengths else None,
            implementation="cuda",
        )

    hlo = cuda_hlo(call, q, cache, indices, extra_cache, extra_indices, lengths)
    metadata_call, decode_call = custom_calls(hlo)
    parts = 132 // s_q
    assert "@jax_flashmla_mla_metadata" in metadata_call
    fixed = -1 if with_lengths else topk + extra_topk
    assert f"fixed_length = {fixed} : i64" in metadata_call
    assert "@jax_flashmla_decode_sparse_sm90" in decode_call
    topk_length = f"tensor<{b}xi32>" if with_lengths else "tensor<0xi32>"
    assert (
        f"(tensor<{b}x{s_q}x{h_q}x{d_qk}xbf16>, tensor<10x7x1x{token_bytes}xf8E4M3FN>, "
        f"tensor<{b}x{s_q}x{topk}xi32>, {topk_length}, tensor<0xf32>, "
        f"tensor<4x5x1x{token_bytes}xf8E4M3FN>, tensor<{b}x{s_q}x{extra_topk}xi32>, "
        f"tensor<0xi32>, tensor<0xf32>, tensor<{parts}x{METADATA_FIELDS}xi32>, "
        f"tensor<{b + 1}xi32>) -> "
        f"(tensor<{b}x{s_q}x{h_q}x512xbf16>, tensor<{b}x{h_q}x{s_q}xf32>, "
        f"tensor<{b + parts}x{s_q}x{h_q}x512xf32>, tensor<{b + parts}x{s_q}x{h_q}xf32>)"
    ) in decode_call, decode_call
    assert "softmax_scale = 2.500000e-01 : f32" in decode_call


def test_dense_decode_kernel_takes_every_page_size():
    """Any page size runs the dense kernel (the FP8 caches run the sparse kernel:
    tests/test_decode_fp8_dense.py, tests/test_decode_e4m3.py)."""
    q = jax.ShapeDtypeStruct((2, 1, 16, 576), jnp.bfloat16)
    table = jax.ShapeDtypeStruct((2, 4), jnp.int32)
    lens = jax.ShapeDtypeStruct((2,), jnp.int32)
    for page in (1, 32, 53, 128):
        cache = jax.ShapeDtypeStruct((8, page, 1, 576), jnp.bfloat16)
        hlo = cuda_hlo(lambda *a: fm.flash_mla_with_kvcache(*a, 512), q, cache, table, lens)
        assert custom_calls(hlo), page
