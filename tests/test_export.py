"""jax.export of functions using the ops: CPU (reference) with a serialisation round trip, and
CUDA (the kernels' FFI custom calls, allowed through DisabledSafetyCheck)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jax_flashmla as fm
from jax_flashmla._src import platform

S = jax.ShapeDtypeStruct
ARGS = (
    S((4, 1, 16, 576), jnp.bfloat16),
    S((8, 64, 1, 576), jnp.bfloat16),
    S((4, 2), jnp.int32),
    S((4,), jnp.int32),
)


def decode(*args):
    return fm.flash_mla_with_kvcache(*args, 512, causal=True)


def test_export_cpu_round_trip(rng):
    exported = export.export(jax.jit(decode), platforms=["cpu"])(*ARGS)
    restored = export.deserialize(exported.serialize())
    q = jnp.asarray(rng.normal(size=ARGS[0].shape) / 10, jnp.bfloat16)
    cache = jnp.asarray(rng.normal(size=ARGS[1].shape) / 10, jnp.bfloat16)
    table = jnp.arange(8, dtype=jnp.int32).reshape(4, 2)
    lens = jnp.array([5, 70, 0, 128], jnp.int32)
    for x, y in zip(
        restored.call(q, cache, table, lens), decode(q, cache, table, lens), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.skipif(platform.extension() is None, reason="needs the compiled extension")
def test_export_cuda_with_the_targets_allowed():
    with platform.assume_device():
        allowed = [export.DisabledSafetyCheck.custom_call(t) for t in fm.FFI_TARGETS]
        # A new function: jit caches traces per function, and the CPU test traced `decode`.
        exported = export.export(
            jax.jit(lambda *a: decode(*a)), platforms=["cuda"], disabled_checks=allowed
        )(*ARGS)
    text = exported.mlir_module()
    assert "@jax_flashmla_mla_metadata" in text and "@jax_flashmla_decode_dense_sm90" in text
    assert exported.platforms == ("cuda",)
