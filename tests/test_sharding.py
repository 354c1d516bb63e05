"""Sharding rules on 8 virtual CPU devices: automatic sharding runs every op per shard (equal
results, no all-gather / all-to-all of q, caches or outputs), and the ops work inside
shard_map and pmap with device-local cache pools."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from test_api import small_decode

import jax_flashmla as fm

pytestmark = pytest.mark.skipif(len(jax.devices("cpu")) < 8, reason="needs 8 CPU devices")


def auto_mesh(shape=(2, 4), names=("data", "model")):
    devices = np.array(jax.devices("cpu")[: int(np.prod(shape))]).reshape(shape)
    return jax.sharding.Mesh(devices, names, axis_types=(AxisType.Auto,) * len(shape))


def collectives(compiled_text: str) -> list[str]:
    return re.findall(r"\b(all-gather|all-to-all|all-reduce|collective-permute)\b", compiled_text)


def decode_inputs(rng, **shape):
    """test_api's paged-cache inputs, with a batch and head count that 2 x 4 devices split."""
    return small_decode(rng, **{"b": 8, "h_q": 8, "max_len": 90, **shape})


def run_sharded(fn, args, specs, mesh):
    placed = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(args, specs, strict=True)]
    jitted = jax.jit(fn)
    text = jitted.lower(*placed).compile().as_text()
    return jitted(*placed), text


def assert_same(sharded, single):
    """Equal up to fp32 rounding order: XLA may fuse the reference differently per shard shape
    (inf positions must match exactly; bf16 outputs within one unit in the last place)."""
    for x, y in zip(sharded, single, strict=True):
        if not jnp.issubdtype(y.dtype, jnp.floating):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
            continue
        rtol = 1e-6 if y.dtype == jnp.float32 else 2.0**-7
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        np.testing.assert_array_equal(np.isinf(x), np.isinf(y))
        finite = np.isfinite(y)
        np.testing.assert_allclose(x[finite], y[finite], rtol=rtol, atol=1e-6)


DECODE_LAYOUTS = {
    "heads": (P(None, None, "model"), P(), P(), P()),
    "batch": (P("data"), P(), P("data"), P("data")),
    "batch_and_heads": (P("data", None, "model"), P(), P("data"), P("data")),
}


@pytest.mark.parametrize("layout", sorted(DECODE_LAYOUTS))
@pytest.mark.parametrize("with_metadata", [False, True])
def test_dense_decode_auto_sharding(rng, layout, with_metadata):
    q, cache, table, lens = decode_inputs(rng)
    mesh = auto_mesh()

    def decode(q, cache, table, lens):
        metadata = fm.get_mla_metadata(lens, 2 * 8, 1) if with_metadata else (None, None)
        return fm.flash_mla_with_kvcache(q, cache, table, lens, 512, *metadata, causal=True)

    out, text = run_sharded(decode, (q, cache, table, lens), DECODE_LAYOUTS[layout], mesh)
    assert collectives(text) == [], collectives(text)
    assert_same(out, decode(q, cache, table, lens))
    want = tuple(DECODE_LAYOUTS[layout][0])
    got = tuple(out[0].sharding.spec)
    assert got + (None,) * (4 - len(got)) == want + (None,) * (4 - len(want))


def test_dense_decode_gqa_shards_cache_heads(rng):
    q, cache, table, lens = decode_inputs(rng, h_q=8, h_kv=4)
    mesh = auto_mesh()
    specs = (P(None, None, "model"), P(None, None, "model"), P(), P())

    def decode(*a):
        return fm.flash_mla_with_kvcache(*a, 512)

    out, text = run_sharded(decode, (q, cache, table, lens), specs, mesh)
    assert collectives(text) == []
    assert_same(out, decode(q, cache, table, lens))


def test_e4m3_cache_and_scales_shard_with_cache_heads(rng):
    """The plain e4m3 cache and its per-KV-head k_scale split over the KV heads with q's heads:
    the dequantisation runs per shard, nothing is gathered."""
    q, cache, table, lens = decode_inputs(rng, h_q=8, h_kv=4)
    fp8, k_scale = fm.quantize_k_cache_e4m3(cache, per_head=True)
    mesh = auto_mesh()
    specs = (P(None, None, "model"), P(None, None, "model"), P(), P(), P("model"))

    def decode(q, cache, table, lens, k_scale):
        return fm.flash_mla_with_kvcache(
            q, cache, table, lens, 512, is_fp8_kvcache=True, k_scale=k_scale
        )

    out, text = run_sharded(decode, (q, fp8, table, lens, k_scale), specs, mesh)
    assert collectives(text) == [], collectives(text)
    assert_same(out, decode(q, fp8, table, lens, k_scale))


def test_cache_sharded_along_blocks_is_resharded_not_wrong(rng):
    """An unsupported input sharding is resharded (documented), and the answer stays right."""
    q, cache, table, lens = decode_inputs(rng)
    mesh = auto_mesh()
    specs = (P("data"), P("model"), P("data"), P("data"))

    def decode(*a):
        return fm.flash_mla_with_kvcache(*a, 512)

    out, text = run_sharded(decode, (q, cache, table, lens), specs, mesh)
    assert "all-gather" in collectives(text)  # the cache is replicated for the kernel
    assert_same(out, decode(q, cache, table, lens))


def test_sparse_decode_auto_sharding(rng):
    q = jnp.asarray(rng.normal(size=(8, 1, 16, 576)) / 10, jnp.bfloat16)
    cache = fm.quantize_k_cache(jnp.asarray(rng.normal(size=(6, 16, 1, 576)) / 10, jnp.bfloat16))
    indices = jnp.asarray(rng.integers(-1, 96, (8, 1, 64)), jnp.int32)
    sink = jnp.asarray(rng.normal(size=16), jnp.float32)
    topk_length = jnp.asarray(rng.integers(0, 65, 8), jnp.int32)
    mesh = auto_mesh()

    def decode(q, cache, indices, sink, topk_length):
        return fm.flash_mla_with_kvcache(
            q,
            cache,
            None,
            None,
            512,
            is_fp8_kvcache=True,
            indices=indices,
            attn_sink=sink,
            topk_length=topk_length,
        )

    specs = (P("data", None, "model"), P(), P("data"), P("model"), P("data"))
    out, text = run_sharded(decode, (q, cache, indices, sink, topk_length), specs, mesh)
    assert collectives(text) == []
    assert_same(out, decode(q, cache, indices, sink, topk_length))


def test_dense_decode_in_shard_map_with_device_local_pools(rng):
    """Data parallel serving: each device owns a cache pool and a block table of local ids."""
    devices = 8
    per_device = [decode_inputs(rng, b=2) for _ in range(devices)]
    q, cache, table, lens = (jnp.concatenate(parts) for parts in zip(*per_device, strict=True))
    mesh = auto_mesh((devices,), ("data",))

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=P("data"), out_specs=(P("data"), P("data")))
    def decode(q, cache, table, lens):
        metadata = fm.get_mla_metadata(lens, 2 * 8, 1)
        return fm.flash_mla_with_kvcache(q, cache, table, lens, 512, *metadata)

    out, lse = decode(q, cache, table, lens)
    for d, item in enumerate(per_device):
        single_out, single_lse = fm.flash_mla_with_kvcache(*item, 512)
        np.testing.assert_array_equal(np.asarray(out[2 * d : 2 * d + 2]), np.asarray(single_out))
        np.testing.assert_array_equal(np.asarray(lse[2 * d : 2 * d + 2]), np.asarray(single_lse))


def test_dense_decode_under_pmap(rng):
    per_device = [decode_inputs(rng, b=2) for _ in range(8)]
    stacked = [jnp.stack(parts) for parts in zip(*per_device, strict=True)]
    out, lse = jax.pmap(
        lambda *a: fm.flash_mla_with_kvcache(*a, 512), devices=jax.devices("cpu")[:8]
    )(*stacked)
    for d, item in enumerate(per_device):
        single = fm.flash_mla_with_kvcache(*item, 512)
        np.testing.assert_array_equal(np.asarray(out[d]), np.asarray(single[0]))
        np.testing.assert_array_equal(np.asarray(lse[d]), np.asarray(single[1]))


def test_sparse_prefill_auto_sharding(rng):
    q = jnp.asarray(rng.normal(size=(16, 8, 576)) / 10, jnp.bfloat16)
    kv = jnp.asarray(rng.normal(size=(40, 1, 576)) / 10, jnp.bfloat16)
    indices = jnp.asarray(rng.integers(-3, 45, (16, 1, 64)), jnp.int32)
    topk_length = jnp.asarray(rng.integers(0, 65, 16), jnp.int32)
    sink = jnp.asarray(rng.normal(size=8), jnp.float32)
    mesh = auto_mesh()

    def prefill(q, kv, indices, sink, topk_length):
        return fm.flash_mla_sparse_fwd(
            q, kv, indices, 0.05, attn_sink=sink, topk_length=topk_length
        )

    specs = (P("data", "model"), P(), P("data"), P("model"), P("data"))
    out, text = run_sharded(prefill, (q, kv, indices, sink, topk_length), specs, mesh)
    assert collectives(text) == []
    assert_same(out, prefill(q, kv, indices, sink, topk_length))


@pytest.mark.parametrize(
    "layout",
    [
        ("tokens_and_heads", P("data", "model"), P("data"), P("model")),
        ("tokens", P(("data", "model")), P(("data", "model")), P()),
        ("heads", P(None, "model"), P(), P("model")),
    ],
    ids=lambda layout: layout[0],
)
def test_sparse_prefill_gradients_sharded(rng, layout):
    """dq, dkv and d_sink with q sharded over tokens and / or heads: kv stays replicated (no
    all-gather or all-to-all), each shard's share of dkv and d_sink is summed (all-reduce)."""
    _, q_spec, token_spec, head_spec = layout
    q = jnp.asarray(rng.normal(size=(16, 8, 576)) / 10, jnp.bfloat16)
    kv = jnp.asarray(rng.normal(size=(40, 1, 576)) / 10, jnp.bfloat16)
    indices = jnp.asarray(rng.integers(-3, 45, (16, 1, 64)), jnp.int32)
    topk_length = jnp.asarray(rng.integers(0, 65, 16), jnp.int32)
    sink = jnp.asarray(rng.normal(size=8), jnp.float32)
    w_out = jnp.asarray(rng.normal(size=(16, 8, 512)), jnp.float32)
    mesh = auto_mesh()

    def loss(q, kv, sink, indices, topk_length):
        out, _, lse = fm.flash_mla_sparse_fwd(
            q, kv, indices, 0.05, attn_sink=sink, topk_length=topk_length
        )
        return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(jnp.where(jnp.isinf(lse), 0, lse))

    grads = jax.grad(loss, argnums=(0, 1, 2))
    args = (q, kv, sink, indices, topk_length)
    specs = (q_spec, P(), head_spec, token_spec, token_spec)
    got, text = run_sharded(grads, args, specs, mesh)
    assert not {"all-gather", "all-to-all"} & set(collectives(text))
    want = grads(*args)
    for g, w in zip(got, want, strict=True):  # summed in another order: one rounding apart
        w = np.asarray(w, np.float32)
        np.testing.assert_allclose(
            np.asarray(g, np.float32), w, rtol=2.0**-7, atol=2.0**-8 * np.abs(w).max()
        )


@pytest.mark.parametrize("h,h_k", [(8, 8), (8, 2), (4, 1)])
def test_mha_heads_sharded_forward_and_gradients(rng, h, h_k):
    cu = jnp.array([0, 5, 5, 16], jnp.int32)
    q = jnp.asarray(rng.normal(size=(16, h, 128)) / 10, jnp.bfloat16)
    k = jnp.asarray(rng.normal(size=(16, h_k, 128)) / 10, jnp.bfloat16)
    v = jnp.asarray(rng.normal(size=(16, h_k, 128)) / 10, jnp.bfloat16)
    d_out = jnp.asarray(rng.normal(size=(16, h, 128)), jnp.float32)
    # KV heads are sharded when there are several, else the query heads of the one KV head.
    devices = min(4, h_k) if h_k > 1 else 4
    mesh = auto_mesh((devices,), ("model",))

    def loss(q, k, v):
        out, _ = fm.flash_attn_varlen_func(q, k, v, cu, cu, 11, 11, causal=True)
        return jnp.sum(out.astype(jnp.float32) * d_out)

    def forward_and_grads(q, k, v):
        out = fm.flash_attn_varlen_func(q, k, v, cu, cu, 11, 11, causal=True)
        return (*out, *jax.grad(loss, argnums=(0, 1, 2))(q, k, v))

    kv_spec = P(None, "model") if h_k > 1 else P()
    specs = (P(None, "model"), kv_spec, kv_spec)
    got, text = run_sharded(forward_and_grads, (q, k, v), specs, mesh)
    assert not {"all-gather", "all-to-all"} & set(collectives(text))
    want = forward_and_grads(q, k, v)
    assert_same(got[:2], want[:2])
    for g, w in zip(got[2:], want[2:], strict=True):  # bf16 gradients: one rounding apart
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=2.0**-7, atol=1e-6
        )


def test_explicit_mesh_axes_say_what_to_do(rng):
    """jax.make_mesh's default (Explicit) axes: a clear error, and shard_map still works."""
    q, cache, table, lens = decode_inputs(rng)
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    set_mesh = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh
    with set_mesh(mesh):
        q_sharded = jax.device_put(q, NamedSharding(mesh, P("data", None, "model")))
        with pytest.raises(
            ValueError, match=r"flash_mla_with_kvcache: mesh axes .* Explicit.*Auto"
        ):
            jax.jit(lambda *a: fm.flash_mla_with_kvcache(*a, 512))(q_sharded, cache, table, lens)
        specs = (P("data"), P(), P("data"), P("data"))
        placed = [
            jax.device_put(x, NamedSharding(mesh, s))
            for x, s in zip((q, cache, table, lens), specs, strict=True)
        ]
        per_device = jax.jit(
            jax.shard_map(
                lambda *a: fm.flash_mla_with_kvcache(*a, 512),
                mesh=mesh,
                in_specs=specs,
                out_specs=(P("data"), P("data")),
            )
        )(*placed)
    assert_same(per_device, fm.flash_mla_with_kvcache(q, cache, table, lens, 512))


def _all_ops_per_device(rng):
    """One call of every op on small per-device inputs: (name, fn, args) triples."""
    q, cache, table, lens = decode_inputs(rng, b=2)
    fp8 = fm.quantize_k_cache(cache)
    indices = jnp.asarray(rng.integers(-1, cache.shape[0] * 16, (2, 2, 64)), jnp.int32)
    pq = jnp.asarray(rng.normal(size=(4, 8, 576)) / 10, jnp.bfloat16)
    kv = jnp.asarray(rng.normal(size=(20, 1, 576)) / 10, jnp.bfloat16)
    p_idx = jnp.asarray(rng.integers(-2, 22, (4, 1, 64)), jnp.int32)
    cu = jnp.array([0, 3, 7], jnp.int32)
    mq, mk, mv = (jnp.asarray(rng.normal(size=(7, 2, 128)) / 10, jnp.bfloat16) for _ in range(3))
    splits = jnp.array([0, 2, 3], jnp.int32)
    po = jnp.asarray(rng.normal(size=(4, 1, 8, 16)), jnp.float32)
    pl = jnp.asarray(rng.normal(size=(4, 1, 8)), jnp.float32)
    return [
        ("metadata", lambda lens: fm.get_mla_metadata(lens, 16, 1), (lens,)),
        ("dense decode", lambda *a: fm.flash_mla_with_kvcache(*a, 512), (q, cache, table, lens)),
        (
            "sparse decode",
            lambda q, c, i: fm.flash_mla_with_kvcache(
                q, c, None, None, 512, is_fp8_kvcache=True, indices=i
            ),
            (q, fp8, indices),
        ),
        ("sparse prefill", lambda *a: fm.flash_mla_sparse_fwd(*a, 0.05), (pq, kv, p_idx)),
        (
            "mha",
            lambda q, k, v, cu: fm.flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, causal=True),
            (mq, mk, mv, cu),
        ),
        (
            "mha grad",
            lambda q, k, v, cu: jax.grad(
                lambda q: jnp.sum(
                    fm.flash_attn_varlen_func(q, k, v, cu, cu, 4, 4)[0].astype(jnp.float32)
                )
            )(q),
            (mq, mk, mv, cu),
        ),
        ("combine", lambda po, pl, s: fm.combine_splits(po, pl, s), (po, pl, splits)),
    ]


@pytest.mark.parametrize("transform", ["shard_map", "pmap"])
def test_every_op_per_device(rng, transform):
    """Each device runs its own inputs (its own cache pool): results equal the single calls."""
    per_device = [_all_ops_per_device(rng) for _ in range(8)]
    mesh = auto_mesh((8,), ("data",))
    for k, (name, fn, _) in enumerate(per_device[0]):
        args = [
            jnp.stack([ops[k][2][i] for ops in per_device]) for i in range(len(per_device[0][k][2]))
        ]
        if transform == "pmap":
            got = jax.pmap(fn, devices=jax.devices("cpu")[:8])(*args)
        else:

            def local(*xs, fn=fn):  # shard_map keeps the device axis: drop it inside
                out = fn(*(x[0] for x in xs))
                return jax.tree.map(lambda y: y[None], out)

            got = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("data"), out_specs=P("data")))(
                *args
            )
        for d, ops in enumerate(per_device):
            want = ops[k][1](*ops[k][2])
            for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                np.testing.assert_array_equal(np.asarray(g[d]), np.asarray(w), err_msg=name)
