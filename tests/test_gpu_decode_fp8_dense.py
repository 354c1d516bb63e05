"""Dense decode over the V32 FP8 cache (implementation="cuda") against the fp32 reference, on
the GPU.

`flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512, is_fp8_kvcache=True,
implementation="cuda")` runs the sparse FP8 decode kernel over each query's visible positions
(dequantised on chip, docs/design/decode_sparse_fp8_sm90.md). The comparison side is the dense
reference (`jax_flashmla.reference.decode.dense_decode`) in fp32 on the cache as
`dequantize_k_cache` returns it, so quantisation error is not part of the tolerance: the
dense-decode tolerances of docs/ops.md hold.

Data as test_gpu_decode_dense.py: q and the bf16 cache ~ N(0, 1) / 10, varlen or fixed lengths,
randomly permuted block tables whose entries past each request's blocks are 2147480000, and
NaN in every cache row no request may read; the cache is then quantised by `quantize_k_cache`,
so an unreadable token has NaN e4m3 bytes, NaN float32 scales and NaN RoPE values, and any read
of it shows up as NaN. Device memory is poisoned before each kernel call.

Cases: a sample of the dense matrix at h_kv 1 (the V32 layout holds one KV head) that covers
every batch size, s_q, s_k, head count, varlen and causal, at pages 1, 16, 53 and 64; lengths
0 and past the table's capacity; a wild block id inside a request's length (its tokens masked);
and bitwise determinism.

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


@functools.partial(jax.jit, static_argnames=("causal",))
def _kernel(q, fp8_cache, block_table, cache_seqlens, *, causal):
    return fm.flash_mla_with_kvcache(
        q,
        fp8_cache,
        block_table,
        cache_seqlens,
        D_V,
        causal=causal,
        is_fp8_kvcache=True,
        implementation="cuda",
    )


@functools.partial(
    jax.jit, static_argnames=("causal",), compiler_options={"xla_gpu_autotune_level": 0}
)
def _reference(q, fp8_cache, block_table, cache_seqlens, *, causal):
    """The fp32 reference on the dequantised cache."""
    cache = fm.dequantize_k_cache(fp8_cache, layout="V32", dtype=jnp.float32)
    return reference_decode.dense_decode(
        q.astype(jnp.float32), cache, block_table, cache_seqlens, head_dim_v=D_V, causal=causal
    )


_quantize = jax.jit(functools.partial(fm.quantize_k_cache, layout="V32"))


def fp8_inputs(inputs: Inputs) -> Inputs:
    """The same inputs with the cache quantised to V32 (NaN rows stay NaN in every byte)."""
    return dataclasses.replace(inputs, k_cache=_quantize(inputs.k_cache))


def run_and_check(inputs: Inputs, *, causal: bool) -> tuple[np.ndarray, np.ndarray]:
    b, s_q, h_q, _ = inputs.q.shape
    poison_device_memory(max(b * s_q * h_q * D_V * 4, 1 << 20))
    out, lse = (np.asarray(x) for x in _kernel(*inputs.args(), causal=causal))
    assert out.shape == (b, s_q, h_q, D_V) and out.dtype == np.dtype(jnp.bfloat16)
    assert lse.shape == (b, h_q, s_q) and lse.dtype == np.float32
    ref_out, ref_lse = (
        np.asarray(x) for x in _reference(*reference_placement(inputs.args()), causal=causal)
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
def test_quick_fp8_dense_matrix(case: Case):
    rng = np.random.default_rng(seed_of("fp8", case.id))
    layout = make_layout(
        rng, b=case.b, s_q=case.s_q, s_k=case.s_k, varlen=case.varlen, page=case.page
    )
    values = make_values(seed_of("fp8", case.id), layout, s_q=case.s_q, h_q=case.h_q, h_kv=1)
    run_and_check(fp8_inputs(values), causal=case.causal)


@pytest.mark.parametrize("causal", [False, True])
def test_quick_fp8_dense_lengths_and_wild_ids(causal):
    """Lengths 0, negative and past the table's capacity (cut to it); a wild block id inside a
    request's length masks that block's tokens."""
    rng = np.random.default_rng(7)
    seqlens = (0, -3, 130, 64 * 3 + 5, 10**6)
    readable = (0, 0, 130, 64 * 3 + 5, 5 * 64)  # the last request reads its whole table
    layout = make_layout(rng, b=5, s_q=2, s_k=0, varlen=False, seqlens=readable, max_blocks=5)
    table = layout.block_table.copy()
    table[3, 1] = GARBAGE_BLOCK  # inside request 3's length: its 64 tokens are masked
    values = make_values(11, dataclasses.replace(layout, block_table=table), s_q=2, h_q=16, h_kv=1)
    inputs = dataclasses.replace(fp8_inputs(values), cache_seqlens=jnp.asarray(seqlens, jnp.int32))
    run_and_check(inputs, causal=causal)


def test_quick_fp8_dense_deterministic():
    rng = np.random.default_rng(3)
    layout = make_layout(rng, b=6, s_q=2, s_k=1000, varlen=True)
    inputs = fp8_inputs(make_values(5, layout, s_q=2, h_q=128, h_kv=1))
    first = run_and_check(inputs, causal=True)
    for _ in range(3):
        again = [np.asarray(x) for x in _kernel(*inputs.args(), causal=True)]
        for a, b in zip(first, again, strict=True):
            np.testing.assert_array_equal(
                a.view(f"u{a.dtype.itemsize}"), b.view(f"u{b.dtype.itemsize}")
            )
