"""The sparse prefill's backward kernel (the gradient of flash_mla_sparse_fwd with
implementation="cuda") against JAX's derivative of the float32 reference, on the GPU.

Each test differentiates L = sum(out * W) + sum(lse * w) (W, w ~ N(0, 1); the lse of lonely
queries left out) with respect to q, kv and attn_sink, once through the kernels and once through
the reference (implementation="xla"), on the inputs of test_gpu_prefill_sparse.py: NaN in every
kv row that no counted valid slot selects, invalid and duplicated indices, a third of the sink
heads at +inf and a third at -inf. Device memory is poisoned with NaN before the kernel path
runs. Tolerance (docs/ops.md, sparse prefill gradient): for dq and dkv (bfloat16) a relative L2
error of at most 2^-7 and every element within 2^-5 of the largest reference magnitude of its
tensor (the kernel rounds P and dS to bfloat16 for its products); for d_sink (float32, from the
bfloat16 out: measured 1.0e-2 at h_q 8) 2^-5 and 2^-4. Lonely queries get a dq of exactly 0.

Cases: a sample of FlashMLA's sparse-prefill matrix (d_qk 512 / 576, h_q 64 / 128, the regular
and irregular (s_kv, topk) pairs, s_q 1 / 62, topk_length and sink on and off) and beyond it
h_q 8, 16, 32, 96 (partial head tiles), topk 64 and 192, every index invalid, duplicated
indices, dq bitwise repeatable, and the deterministic mode (dkv bitwise repeatable too).

    python -P -m pytest -q -m gpu tests/test_gpu_prefill_sparse_grad.py   # ~3 min on an H100

The reference's derivative runs on the GPU here too, and under compute-sanitizer its many XLA
programs make a test take minutes: the backward kernel's memcheck run is the C++ test
tests/cpp/prefill_sparse_check.cu (`tests/gpu_validate.sh prefill-sparse`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gpu_util import poison_device_memory
from test_gpu_prefill_sparse import make_inputs

import jax_flashmla as fm

pytestmark = pytest.mark.gpu

#: (relative L2 error, largest error over the tensor's largest magnitude) per gradient.
TOLERANCE = {"dq": (2.0**-7, 2.0**-5), "dkv": (2.0**-7, 2.0**-5), "d_sink": (2.0**-5, 2.0**-4)}


@functools.partial(
    jax.jit, static_argnames=("sm_scale", "implementation", "with_sink", "deterministic")
)
def _gradients(
    q,
    kv,
    indices,
    attn_sink,
    topk_length,
    w_out,
    w_lse,
    *,
    sm_scale,
    implementation,
    with_sink,
    deterministic,
):
    def loss(q, kv, sink):
        out, _, lse = fm.flash_mla_sparse_fwd(
            q,
            kv,
            indices,
            sm_scale,
            512,
            sink,
            topk_length,
            implementation=implementation,
            deterministic=deterministic,
        )
        finite_lse = jnp.where(jnp.isinf(lse), 0.0, lse)
        return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(finite_lse * w_lse)

    return jax.grad(loss, argnums=(0, 1, 2) if with_sink else (0, 1))(q, kv, attn_sink)


def gradients(
    inputs, implementation: str, seed: int, deterministic: bool = False
) -> list[np.ndarray]:
    q, kv, indices, attn_sink, topk_length = inputs.kernel_args()
    s_q, h_q, _ = q.shape
    rng = np.random.default_rng(seed)
    w_out = jnp.asarray(rng.standard_normal((s_q, h_q, 512)), jnp.float32)
    w_lse = jnp.asarray(rng.standard_normal((s_q, h_q)), jnp.float32)
    if implementation == "cuda":
        poison_device_memory(max(4 * q.size + 8 * kv.size, 1 << 20))
    grads = _gradients(
        q,
        kv,
        indices,
        attn_sink,
        topk_length,
        w_out,
        w_lse,
        sm_scale=inputs.default_scale,
        implementation=implementation,
        with_sink=attn_sink is not None,
        deterministic=deterministic,
    )
    return [np.asarray(g, np.float32) for g in grads]


def check_gradients(inputs, seed: int = 0, deterministic: bool = False) -> list[np.ndarray]:
    """Kernel gradients against the reference's; returns the kernel's."""
    got = gradients(inputs, "cuda", seed, deterministic)
    want = gradients(inputs, "xla", seed)
    for name, g, w in zip(("dq", "dkv", "d_sink"), got, want, strict=False):
        assert g.shape == w.shape, (name, g.shape, w.shape)
        assert np.all(np.isfinite(g)), f"{name}: {np.sum(~np.isfinite(g))} non-finite values"
        rel_l2, of_peak = TOLERANCE[name]
        norm = np.linalg.norm(w)
        rel = np.linalg.norm(g - w) / max(norm, 1e-30)
        worst = np.abs(g - w).max() / max(np.abs(w).max(), 1e-30)
        assert rel <= rel_l2 or norm == 0, f"{name}: relative L2 error {rel:.3g}"
        assert worst <= of_peak or norm == 0, f"{name}: max error {worst:.3g} of the peak"
        if norm == 0:
            assert np.all(g == 0), f"{name}: nonzero where the reference is 0"
    lonely = inputs.counted_keys() == 0
    assert np.all(got[0][lonely] == 0), "lonely queries must get dq 0"
    return got


# (d_qk, h_q, s_kv, topk, s_q, topk_length, sink): FlashMLA's matrix, sampled.
MATRIX_SAMPLE = [
    (576, 128, 128, 128, 62, False, False),
    (576, 64, 592, 128, 62, True, True),
    (512, 128, 1521, 512, 62, True, False),
    (512, 64, 95, 128, 1, False, True),
    (576, 128, 1840, 256, 62, True, True),
    (512, 128, 114, 384, 62, False, False),
    (576, 64, 153, 256, 62, True, True),
    (512, 64, 512, 512, 1, False, False),
]


@pytest.mark.parametrize(
    "d_qk,h_q,s_kv,topk,s_q,lengths,sink",
    MATRIX_SAMPLE,
    ids=[
        f"d{c[0]}-h{c[1]}-kv{c[2]}-k{c[3]}-sq{c[4]}{'-L' if c[5] else ''}{'-S' if c[6] else ''}"
        for c in MATRIX_SAMPLE
    ],
)
def test_quick_gradient_matrix(d_qk, h_q, s_kv, topk, s_q, lengths, sink):
    inputs = make_inputs(
        d_qk * 7 + h_q + s_kv + topk + s_q,
        s_q=s_q,
        s_kv=s_kv,
        h_q=h_q,
        topk=topk,
        d_qk=d_qk,
        topk_length=lengths,
        sink=sink,
    )
    check_gradients(inputs)


@pytest.mark.parametrize("h_q", [8, 16, 32, 96])
def test_quick_gradient_other_head_counts(h_q):
    inputs = make_inputs(h_q, s_q=40, s_kv=700, h_q=h_q, topk=256, d_qk=576, topk_length=True)
    check_gradients(inputs)


@pytest.mark.parametrize("topk,s_kv", [(64, 300), (192, 150)])
def test_quick_gradient_topk_not_a_multiple_of_128(topk, s_kv):
    inputs = make_inputs(topk, s_q=30, s_kv=s_kv, h_q=64, topk=topk, d_qk=512, topk_length=True)
    check_gradients(inputs)


def test_quick_gradient_every_index_invalid():
    inputs = make_inputs(5, s_q=8, s_kv=100, h_q=64, topk=128, d_qk=576)
    inputs = inputs.replace(indices=np.full_like(inputs.indices, -1))
    got = check_gradients(inputs)
    for g in got[:2]:
        assert np.all(g == 0)


def test_quick_gradient_duplicated_indices():
    """Runs of one row over many slots, and a whole token on one row: the row's dkv gathers
    every slot's share."""
    inputs = make_inputs(9, s_q=20, s_kv=300, h_q=64, topk=128, d_qk=576)
    indices = inputs.indices.copy()
    indices[0, 0, :] = 7
    indices[1, 0, ::2] = 11
    check_gradients(inputs.replace(indices=indices))


def test_quick_gradient_dq_is_repeatable():
    """dq bitwise the same on every run; dkv (atomic float32 sums) only within rounding."""
    inputs = make_inputs(3, s_q=62, s_kv=1000, h_q=128, topk=512, d_qk=576, topk_length=True)
    first = gradients(inputs, "cuda", 1)
    for _ in range(2):
        again = gradients(inputs, "cuda", 1)
        np.testing.assert_array_equal(again[0], first[0])
        np.testing.assert_allclose(again[1], first[1], rtol=2.0**-7, atol=1e-6)


@pytest.mark.parametrize("d_qk", [512, 576])
def test_quick_gradient_deterministic_mode(d_qk):
    """deterministic=True: dkv summed in 64-bit fixed point, within the same tolerance and
    bitwise repeatable, dq too."""
    inputs = make_inputs(4, s_q=62, s_kv=1000, h_q=128, topk=512, d_qk=d_qk, topk_length=True)
    first = check_gradients(inputs, 1, deterministic=True)
    again = gradients(inputs, "cuda", 1, deterministic=True)
    for f, a in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, f)
