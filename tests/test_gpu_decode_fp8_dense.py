"""Dense decode over the FP8 caches (implementation="cuda") against the fp32 reference, on the
GPU: the V32 cache and the plain "E4M3" cache with its k_scale, both with one KV head, and the
E4M3 cache with several KV heads (one kernel call per KV head) and a scale per KV head.

`flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512, is_fp8_kvcache=True,
implementation="cuda")` runs the sparse FP8 decode kernel over each query's visible positions
(dequantised on chip, docs/design/decode_sparse_fp8_sm90.md). The comparison side is the dense
reference (`jax_flashmla.reference.decode.dense_decode`) in fp32 on the cache as
`dequantize_k_cache` / `dequantize_k_cache_e4m3` return it in float32, so quantisation error is
not part of the tolerance: the dense-decode tolerances of docs/ops.md hold.

Data as test_gpu_decode_dense.py: q and the bf16 cache ~ N(0, 1) / 10, varlen or fixed lengths,
randomly permuted block tables whose entries past each request's blocks are 2147480000, and
NaN in every cache row no request may read; the cache is then quantised. V32
(`quantize_k_cache`): an unreadable token has NaN e4m3 bytes, NaN float32 scales and NaN RoPE
values, so any read of it shows up as NaN. E4M3 (`quantize_k_cache_e4m3` with k_scale 16 times
the readable values' amax / 448): an unreadable token's bytes are e4m3 NaN, which the kernel
reads as 480 (docs/design/decode_sparse_fp8_sm90.md), 17 times any readable value, so a read of
one moves the output far past the tolerance. Device memory is poisoned before each kernel call.

Cases, for each layout: a sample of the dense matrix at h_kv 1 that covers every batch size,
s_q, s_k, head count, varlen and causal, at pages 1, 16, 53 and 64; lengths 0 and past the
table's capacity; a wild block id inside a request's length (its tokens masked); and bitwise
determinism. E4M3 with 2 and 4 KV heads: a few shapes of the matrix, k_scale per KV head.

    python -P -m pytest -q -m gpu tests/test_gpu_decode_fp8_dense.py
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gpu_util import poison_device_memory, reference_placement
from oracle_decode import DENSE_DECODE_LSE_TOL, DENSE_DECODE_OUT_TOL, GARBAGE_BLOCK, check_close
from test_gpu_decode_dense import D_V, Inputs, make_layout, make_values, seed_of

import jax_flashmla as fm
from jax_flashmla.reference import decode as reference_decode

pytestmark = pytest.mark.gpu


LAYOUTS = ("V32", "E4M3")


@dataclasses.dataclass(frozen=True)
class Fp8Inputs:
    """A decode call's inputs with the cache quantised to `layout` (k_scale: E4M3's, [1] or
    [h_kv])."""

    inputs: Inputs
    layout: str
    k_scale: jax.Array | None

    def args(self) -> tuple:
        return (*self.inputs.args(), self.k_scale)


@functools.partial(jax.jit, static_argnames=("causal",))
def _kernel(q, fp8_cache, block_table, cache_seqlens, k_scale, *, causal):
    return fm.flash_mla_with_kvcache(
        q,
        fp8_cache,
        block_table,
        cache_seqlens,
        D_V,
        causal=causal,
        is_fp8_kvcache=True,
        k_scale=k_scale,
        implementation="cuda",
    )


@functools.partial(
    jax.jit, static_argnames=("causal",), compiler_options={"xla_gpu_autotune_level": 0}
)
def _reference(q, fp8_cache, block_table, cache_seqlens, k_scale, *, causal):
    """The fp32 reference on the dequantised cache."""
    if k_scale is None:
        cache = fm.dequantize_k_cache(fp8_cache, layout="V32", dtype=jnp.float32)
    else:
        cache = fm.dequantize_k_cache_e4m3(fp8_cache, k_scale, dtype=jnp.float32)
    return reference_decode.dense_decode(
        q.astype(jnp.float32), cache, block_table, cache_seqlens, head_dim_v=D_V, causal=causal
    )


@functools.partial(jax.jit, static_argnames=("per_head",))
def _e4m3_scale(cache: jax.Array, per_head: bool) -> jax.Array:
    """16 times the readable values' amax / 448, as [1] or per KV head [h_kv]: readable values
    use e4m3 up to 28."""
    magnitude = jnp.abs(cache.astype(jnp.float32))
    if per_head:
        return 16 * jnp.nanmax(magnitude, axis=(0, 1, 3)) / 448
    return jnp.reshape(16 * jnp.nanmax(magnitude) / 448, (1,))


def fp8_inputs(inputs: Inputs, layout: str) -> Fp8Inputs:
    """The same inputs with the cache quantised (NaN rows stay NaN); E4M3 with several KV heads
    gets a scale per KV head."""
    if layout == "V32":
        return Fp8Inputs(
            dataclasses.replace(inputs, k_cache=fm.quantize_k_cache(inputs.k_cache)), layout, None
        )
    k_scale = _e4m3_scale(inputs.k_cache, per_head=inputs.k_cache.shape[2] > 1)
    cache, _ = fm.quantize_k_cache_e4m3(inputs.k_cache, k_scale)
    return Fp8Inputs(dataclasses.replace(inputs, k_cache=cache), layout, k_scale)


def run_and_check(fp8: Fp8Inputs, *, causal: bool) -> tuple[np.ndarray, np.ndarray]:
    b, s_q, h_q, _ = fp8.inputs.q.shape
    poison_device_memory(max(b * s_q * h_q * D_V * 4, 1 << 20))
    out, lse = (np.asarray(x) for x in _kernel(*fp8.args(), causal=causal))
    assert out.shape == (b, s_q, h_q, D_V) and out.dtype == np.dtype(jnp.bfloat16)
    assert lse.shape == (b, h_q, s_q) and lse.dtype == np.float32
    ref_out, ref_lse = (
        np.asarray(x) for x in _reference(*reference_placement(fp8.args()), causal=causal)
    )
    check_close(out, ref_out, name="out", **DENSE_DECODE_OUT_TOL)
    check_close(lse, ref_lse, name="lse", **DENSE_DECODE_LSE_TOL)
    lonely = np.isinf(ref_lse)
    assert np.all(lse[lonely] == np.inf)
    assert np.all(out.astype(np.float32)[lonely.transpose(0, 2, 1)] == 0.0)
    return out, lse


@dataclasses.dataclass(frozen=True)
class Case:
    b: int
    s_q: int
    s_k: int
    h_q: int
    varlen: bool
    causal: bool
    page: int

    @property
    def id(self) -> str:
        return (
            f"b{self.b}-sq{self.s_q}-sk{self.s_k}-h{self.h_q}-"
            f"{'varlen' if self.varlen else 'fixed'}-{'causal' if self.causal else 'noncausal'}"
            f"-page{self.page}"
        )


def _sample() -> list[Case]:
    """Every value of every axis at least once, deterministic, kept small."""
    rng = np.random.default_rng(656)
    axes = {
        "b": (1, 2, 6, 64),
        "s_q": (1, 2, 4),
        "s_k": (20, 140, 4096),
        "h_q": (1, 9, 16, 64, 128),
        "varlen": (False, True),
        "causal": (False, True),
        "page": (1, 16, 53, 64),
    }
    every = [Case(*values) for values in itertools.product(*axes.values())]
    cheap = [c for c in every if c.b * c.s_k * c.s_q * c.h_q <= 6 * 4096 * 4 * 128]
    order = rng.permutation(len(cheap))
    missing = {name: set(values) for name, values in axes.items()}
    chosen = []
    for i in order:
        case = cheap[i]
        if any(getattr(case, name) in missing[name] for name in axes):
            chosen.append(case)
            for name in axes:
                missing[name].discard(getattr(case, name))
    assert not any(missing.values()), missing
    chosen += [cheap[i] for i in order[:40] if cheap[i] not in chosen][: max(0, 24 - len(chosen))]
    return chosen


CASES = _sample()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("fp8_layout", LAYOUTS)
def test_quick_fp8_dense_matrix(fp8_layout, case: Case):
    rng = np.random.default_rng(seed_of("fp8", case.id))
    layout = make_layout(
        rng, b=case.b, s_q=case.s_q, s_k=case.s_k, varlen=case.varlen, page=case.page
    )
    values = make_values(seed_of("fp8", case.id), layout, s_q=case.s_q, h_q=case.h_q, h_kv=1)
    run_and_check(fp8_inputs(values, fp8_layout), causal=case.causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("fp8_layout", LAYOUTS)
def test_quick_fp8_dense_lengths_and_wild_ids(fp8_layout, causal):
    """Lengths 0, negative and past the table's capacity (cut to it); a wild block id inside a
    request's length masks that block's tokens."""
    rng = np.random.default_rng(7)
    seqlens = (0, -3, 130, 64 * 3 + 5, 10**6)
    readable = (0, 0, 130, 64 * 3 + 5, 5 * 64)  # the last request reads its whole table
    layout = make_layout(rng, b=5, s_q=2, s_k=0, varlen=False, seqlens=readable, max_blocks=5)
    table = layout.block_table.copy()
    table[3, 1] = GARBAGE_BLOCK  # inside request 3's length: its 64 tokens are masked
    values = make_values(11, dataclasses.replace(layout, block_table=table), s_q=2, h_q=16, h_kv=1)
    values = dataclasses.replace(values, cache_seqlens=jnp.asarray(seqlens, jnp.int32))
    run_and_check(fp8_inputs(values, fp8_layout), causal=causal)


@pytest.mark.parametrize("fp8_layout", LAYOUTS)
def test_quick_fp8_dense_deterministic(fp8_layout):
    rng = np.random.default_rng(3)
    layout = make_layout(rng, b=6, s_q=2, s_k=1000, varlen=True)
    fp8 = fp8_inputs(make_values(5, layout, s_q=2, h_q=128, h_kv=1), fp8_layout)
    first = run_and_check(fp8, causal=True)
    for _ in range(3):
        again = [np.asarray(x) for x in _kernel(*fp8.args(), causal=True)]
        for a, b in zip(first, again, strict=True):
            np.testing.assert_array_equal(
                a.view(f"u{a.dtype.itemsize}"), b.view(f"u{b.dtype.itemsize}")
            )


@pytest.mark.parametrize(
    ("h_kv", "b", "s_q", "s_k", "group", "page", "causal"),
    [
        (2, 3, 1, 300, 16, 64, False),
        (2, 2, 2, 1000, 64, 16, True),
        (4, 4, 3, 140, 8, 1, True),
        (4, 1, 1, 4096, 32, 53, False),
    ],
)
def test_quick_e4m3_dense_kv_heads(h_kv, b, s_q, s_k, group, page, causal):
    """An E4M3 cache with several KV heads and a scale per KV head: each KV head's query heads
    attend its keys only (one kernel call per KV head over a view of the cache)."""
    rng = np.random.default_rng(h_kv * 100 + group)
    layout = make_layout(rng, b=b, s_q=s_q, s_k=s_k, varlen=True, page=page)
    values = make_values(17 + h_kv, layout, s_q=s_q, h_q=h_kv * group, h_kv=h_kv)
    fp8 = fp8_inputs(values, "E4M3")
    assert fp8.k_scale.shape == (h_kv,)
    run_and_check(fp8, causal=causal)
