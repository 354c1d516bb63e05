"""The CUDA scheduler and combine kernels against their references, on the GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gpu_util import poison_device_memory, reference_placement, run_with_command_buffers
from test_schedule import combine_oracle, make_partials

import jax_flashmla as fm
from jax_flashmla._src.geometry import METADATA_FIELDS
from jax_flashmla._src.platform import target_device
from jax_flashmla.reference.schedule import combine_splits

pytestmark = pytest.mark.gpu


def metadata_both(lens, rows_per_head, h_kv, **kwargs):
    fn = jax.jit(
        lambda x, impl: fm.get_mla_metadata(x, rows_per_head, h_kv, **kwargs, implementation=impl),
        static_argnums=1,
    )
    return fn(lens, "cuda"), fn(reference_placement(lens), "xla")


@pytest.mark.parametrize("b", [1, 2, 6, 64, 128, 1000, 32768])
@pytest.mark.parametrize("rows_per_head,h_kv", [(128, 1), (16, 1), (256, 1), (64, 2), (9, 3)])
def test_metadata_kernel_equals_reference(rng, b, rows_per_head, h_kv):
    lens = np.maximum(rng.normal(4096, 2048, b), 0).astype(np.int32)
    lens[rng.random(b) < 0.3] = 0
    (metadata, splits), (ref_metadata, ref_splits) = metadata_both(
        jnp.asarray(lens), rows_per_head, h_kv
    )
    np.testing.assert_array_equal(np.asarray(metadata), np.asarray(ref_metadata))
    np.testing.assert_array_equal(np.asarray(splits), np.asarray(ref_splits))


#: Lengths of every size: empty, page edges, negative (count as 0), and near 2**31 - 1 with a
#: batch whose summed costs overflow int32.
EDGE_LENGTHS = (
    [0],
    [0] * 300,
    [1],
    [2**30],
    [64, 65, 128, 129],
    list(range(0, 20000, 37)),
    [-1, -(2**31), 5, 0],
    [2**31 - 1] * 64,
    [2**31 - 1, -5, 0, 7, 2**31 - 64] * 20,
)


def test_metadata_kernel_edge_cases(rng):
    for lens in EDGE_LENGTHS:
        (m, s), (rm, rs) = metadata_both(jnp.asarray(lens, jnp.int32), 128, 1)
        np.testing.assert_array_equal(np.asarray(m), np.asarray(rm), err_msg=str(lens[:5]))
        np.testing.assert_array_equal(np.asarray(s), np.asarray(rs))
    # Sparse decode with s_q 2, h_q 64: every request weighs topk, whatever its length.
    (m, s), (rm, rs) = metadata_both(
        jnp.asarray(rng.integers(0, 9, 77), jnp.int32), 128, 1, topk=2048, num_heads_q=64
    )
    np.testing.assert_array_equal(np.asarray(m), np.asarray(rm))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(rs))


def test_metadata_uses_device_sm_count():
    lens = jnp.ones((4,), jnp.int32)
    metadata, _ = fm.get_mla_metadata(lens, 16, 1, implementation="cuda")
    assert metadata.shape == (target_device().num_sms, METADATA_FIELDS)


@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("with_sink", [False, True])
@pytest.mark.parametrize(
    "b,s_q,h,d,max_pieces",
    [
        (1, 1, 1, 512, 3),
        (6, 2, 128, 512, 3),
        (64, 1, 16, 512, 3),
        (5, 3, 7, 128, 3),
        (2, 1, 3, 200, 3),  # d_v not a multiple of 128
        (3, 1, 16, 512, 40),  # up to 40 pieces per request
        (128, 2, 128, 512, 3),
    ],
)
def test_combine_kernel_matches_reference(rng, out_dtype, with_sink, b, s_q, h, d, max_pieces):
    partial_o, partial_lse, num_splits = make_partials(rng, b, s_q, h, d, max_pieces=max_pieces)
    sink = None
    if with_sink:
        sink = rng.normal(size=h).astype(np.float32)
        sink[0] = np.inf
        sink[-1] = -np.inf
    args = [jnp.asarray(x) for x in (partial_o, partial_lse, num_splits)]
    sink_arg = None if sink is None else jnp.asarray(sink)
    poison_device_memory(b * s_q * h * d * 4)
    out, lse = jax.jit(fm.combine_splits, static_argnames=("out_dtype", "implementation"))(
        *args, sink_arg, out_dtype=out_dtype, implementation="cuda"
    )
    ref_out, ref_lse = combine_splits(*reference_placement((*args, sink_arg)), out_dtype=out_dtype)
    out, lse, ref_out, ref_lse = map(np.asarray, (out, lse, ref_out, ref_lse))
    assert out.dtype == np.dtype(out_dtype) and lse.dtype == np.float32
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref_lse))
    np.testing.assert_allclose(lse, ref_lse, rtol=8.01 / 65536, atol=1e-6)
    # Both round the same fp32 sums once; allow one unit in the last place.
    ulp = 2.0**-7 if out_dtype == jnp.bfloat16 else 2.0**-10
    np.testing.assert_allclose(
        out.astype(np.float32), ref_out.astype(np.float32), rtol=ulp, atol=1e-6
    )
    if b <= 6 and h <= 16:
        oracle_out, oracle_lse = combine_oracle(partial_o, partial_lse, num_splits, sink)
        np.testing.assert_allclose(lse, oracle_lse, rtol=8.01 / 65536, atol=1e-6)
        np.testing.assert_allclose(out.astype(np.float64), oracle_out, rtol=2 * ulp, atol=1e-5)


def test_combine_kernel_is_deterministic(rng):
    args = [jnp.asarray(x) for x in make_partials(rng, 32, 2, 64, 512)]
    first = fm.combine_splits(*args, implementation="cuda")
    for _ in range(3):
        again = fm.combine_splits(*args, implementation="cuda")
        for x, y in zip(first, again, strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


COMMAND_BUFFER_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
import jax_flashmla as fm
from jax_flashmla._src.geometry import METADATA_FIELDS
lens = jnp.asarray(np.random.default_rng(0).integers(0, 9000, 128), jnp.int32)
step = jax.jit(lambda x: fm.get_mla_metadata(x, 128, 1, implementation="cuda"))
for _ in range(3):
    m, s = step(lens)
ref = fm.get_mla_metadata(lens, 128, 1, implementation="xla")
assert (np.asarray(m) == np.asarray(ref[0])).all() and (np.asarray(s) == np.asarray(ref[1])).all()
rng = np.random.default_rng(1)
po = jnp.asarray(rng.normal(size=(200, 2, 16, 512)), jnp.float32)
pl = jnp.asarray(rng.normal(size=(200, 2, 16)), jnp.float32)
comb = jax.jit(lambda a, b, c: fm.combine_splits(a, b, c, implementation="cuda"))
for _ in range(3):
    out, lse = comb(po, pl, s)
ref_out, ref_lse = fm.combine_splits(po, pl, s, implementation="xla")
np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), rtol=1e-4)
np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32), rtol=1e-2)
q = jnp.asarray(rng.normal(size=(128, 1, 128, 576)) / 10, jnp.bfloat16)
cache = jnp.asarray(rng.normal(size=(128 * 141, 64, 1, 576)) / 10, jnp.bfloat16)
table = jnp.arange(128 * 141, dtype=jnp.int32).reshape(128, 141)
decode = jax.jit(lambda *a: fm.flash_mla_with_kvcache(*a, 512, implementation="cuda"))
for _ in range(3):
    dec_out, dec_lse = decode(q, cache, table, lens)
ref_out, ref_lse = fm.flash_mla_with_kvcache(q, cache, table, lens, 512, implementation="xla")
np.testing.assert_allclose(np.asarray(dec_lse), np.asarray(ref_lse), rtol=1e-4)
np.testing.assert_allclose(np.asarray(dec_out, np.float32), np.asarray(ref_out, np.float32),
                           atol=2e-3, rtol=2e-2)
print("command buffers ok")
"""


def test_kernels_under_command_buffers():
    assert "command buffers ok" in run_with_command_buffers(COMMAND_BUFFER_SCRIPT)
