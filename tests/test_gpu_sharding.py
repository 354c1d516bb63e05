"""Sharded ops on two or more GPUs: automatic sharding of the dense decode kernel over query
heads and over batch, and every op in shard_map with device-local cache pools.

The automatically sharded kernel is compared with the fp32 reference under the dense-decode
tolerances of docs/ops.md, not bit for bit with the single-device kernel: each shard schedules
its own split-KV work, so the splits (and the rounding) differ. Skipped with fewer than 2 GPUs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from test_gpu_decode_dense import D_V, build_inputs, check_against_reference, seed_of
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


#: (q, cache, block_table, cache_seqlens) specs and the mesh axis, per layout.
LAYOUTS = {
    "heads": ((P(None, None, "model"), P(), P(), P()), "model"),
    "batch": ((P("data"), P(), P("data"), P("data")), "data"),
}


@pytest.mark.parametrize("with_metadata", [False, True], ids=["no-metadata", "metadata"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_dense_decode_kernel_sharded(layout, with_metadata):
    inputs = build_inputs(
        seed_of("sharded", layout), b=8, s_q=2, s_k=3000, h_q=128, h_kv=1, varlen=True
    )
    specs, axis = LAYOUTS[layout]
    mesh = gpu_mesh(axis)
    placed = [
        jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(inputs.args(), specs, strict=True)
    ]

    @jax.jit
    def decode(q, cache, table, lens):
        # Metadata built for the global shapes: each shard schedules itself instead.
        metadata = fm.get_mla_metadata(lens, 2 * 128, 1) if with_metadata else (None, None)
        return fm.flash_mla_with_kvcache(
            q, cache, table, lens, D_V, *metadata, causal=True, implementation="cuda"
        )

    text = decode.lower(*placed).compile().as_text()
    assert not {"all-gather", "all-to-all"} & set(collectives(text)), collectives(text)
    decode_targets = [t for t in fm.FFI_TARGETS if "decode" in t]
    assert any(f'custom_call_target="{t}"' in text for t in decode_targets), decode_targets
    out, lse = decode(*placed)
    got, want = tuple(out.sharding.spec), tuple(specs[0])
    assert got + (None,) * (4 - len(got)) == want + (None,) * (4 - len(want)), got
    check_against_reference(inputs, np.asarray(out), np.asarray(lse), causal=True)


def test_every_op_in_shard_map_with_device_local_pools(rng):
    """Each device runs the ops on its own inputs (its own cache pool) with the shapes of a
    single call, so it computes what the single call on that device computes."""
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
