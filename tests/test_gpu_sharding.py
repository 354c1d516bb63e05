"""Sharded ops on two or more GPUs (the nvidia-h200-x2 machine): automatic sharding over query
heads and over batch, and shard_map with device-local cache pools, each compared with the
single-device result. The dense decode runs its Hopper kernel; the other ops their reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from test_sharding import _all_ops_per_device, assert_same, collectives

import jax_flashmla as fm

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        jax.default_backend() != "gpu" or len(jax.devices()) < 2, reason="needs 2 or more GPUs"
    ),
]


def gpu_mesh(name: str):
    devices = np.array(jax.devices()[:2])
    return jax.sharding.Mesh(devices, (name,), axis_types=(AxisType.Auto,))


def kernel_decode_inputs(rng, b=8, s_q=1, h_q=128, s_k=3000):
    lens = np.maximum(rng.normal(s_k, s_k / 2, b), 1).astype(np.int32)
    blocks = -(-int(lens.max()) // 64)
    table = rng.permutation(b * blocks).reshape(b, blocks).astype(np.int32)
    q = jnp.asarray(rng.normal(size=(b, s_q, h_q, 576)) / 10, jnp.bfloat16)
    cache = jnp.asarray(rng.normal(size=(b * blocks, 64, 1, 576)) / 10, jnp.bfloat16)
    return q, cache, jnp.asarray(table), jnp.asarray(lens)


@pytest.mark.parametrize("layout", ["heads", "batch"])
def test_dense_decode_kernel_sharded(rng, layout):
    q, cache, table, lens = kernel_decode_inputs(rng)
    axis = "model" if layout == "heads" else "data"
    mesh = gpu_mesh(axis)
    specs = {
        "heads": (P(None, None, "model"), P(), P(), P()),
        "batch": (P("data"), P(), P("data"), P("data")),
    }[layout]
    placed = [
        jax.device_put(x, NamedSharding(mesh, s))
        for x, s in zip((q, cache, table, lens), specs, strict=True)
    ]
    decode = jax.jit(lambda *a: fm.flash_mla_with_kvcache(*a, 512, implementation="cuda"))
    text = decode.lower(*placed).compile().as_text()
    assert not {"all-gather", "all-to-all"} & set(collectives(text)), collectives(text)
    assert "jax_flashmla_decode_dense_sm90" in text
    sharded = decode(*placed)
    single = jax.jit(lambda *a: fm.flash_mla_with_kvcache(*a, 512, implementation="cuda"))(
        q, cache, table, lens
    )
    for x, y in zip(sharded, single, strict=True):  # the kernel is per row: bitwise equal
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_every_op_in_shard_map_with_device_local_pools(rng):
    per_device = [_all_ops_per_device(rng) for _ in range(2)]
    mesh = gpu_mesh("data")
    for k, (_, fn, _) in enumerate(per_device[0]):
        args = [
            jnp.stack([ops[k][2][i] for ops in per_device]) for i in range(len(per_device[0][k][2]))
        ]

        def local(*xs, fn=fn):
            return jax.tree.map(lambda y: y[None], fn(*(x[0] for x in xs)))

        got = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("data"), out_specs=P("data")))(
            *args
        )
        for d, ops in enumerate(per_device):
            want = ops[k][1](*ops[k][2])
            for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                assert_same((g[d],), (w,))
