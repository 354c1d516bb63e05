"""The gradient of flash_mla_sparse_fwd on the CPU: the reference's JAX derivative (what
implementation="xla" differentiates) against float64 central differences; the Hopper kernel's
form of the gradient (`reference.sparse_prefill_backward` behind the kernel path, which the
lowering runs on the CPU) against that derivative, sink and topk_length folded in by the op;
lonely queries get zero gradients; max_logits refuses a gradient; the fixed-point scale of the
deterministic mode keeps every sum in range; jit and vmap.
The GPU kernel itself: tests/test_gpu_prefill_sparse_grad.py; sharding: tests/test_sharding.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as fm
from jax_flashmla._src import platform
from jax_flashmla._src.kernels import prefill_sparse_backward
from jax_flashmla.reference import sparse_prefill as reference


def make_case(rng, *, s_q=6, h_q=3, d_qk=576, s_kv=50, topk=64, sink=True, lengths=True):
    """Inputs with invalid indices, duplicates, a lonely token (2) and, with `sink`, heads at
    +inf, -inf and a finite sink."""
    q = rng.normal(size=(s_q, h_q, d_qk)) / 10
    kv = rng.normal(size=(s_kv, 1, d_qk)) / 10
    indices = rng.integers(-4, s_kv + 4, size=(s_q, 1, topk)).astype(np.int32)
    indices[0, 0, :8] = indices[0, 0, 8]  # a run of one row
    indices[2] = -1
    attn_sink = None
    if sink:
        attn_sink = np.resize(np.array([0.5, np.inf, -np.inf], np.float32), h_q)
    topk_length = None
    if lengths:
        topk_length = rng.integers(0, topk + 8, size=s_q).astype(np.int32)
        topk_length[0] = topk
    return q, kv, indices, attn_sink, topk_length


def loss_fn(
    indices, attn_sink, topk_length, weights, *, sm_scale, implementation, deterministic=False
):
    """A scalar of out and lse (lonely queries' lse left out): every cotangent non-zero."""
    w_out, w_lse = weights

    def loss(q, kv, sink):
        out, _, lse = fm.flash_mla_sparse_fwd(
            q,
            kv,
            indices,
            sm_scale,
            attn_sink=sink,
            topk_length=topk_length,
            implementation=implementation,
            deterministic=deterministic,
        )
        finite_lse = jnp.where(jnp.isinf(lse), 0.0, lse)
        return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(finite_lse * w_lse)

    return loss


def weights_for(rng, s_q, h_q):
    return (
        jnp.asarray(rng.normal(size=(s_q, h_q, 512)), jnp.float32),
        jnp.asarray(rng.normal(size=(s_q, h_q)), jnp.float32),
    )


def bf16(x):
    return None if x is None else jnp.asarray(x, jnp.bfloat16)


def device(x):
    return None if x is None else jnp.asarray(x)


@pytest.mark.parametrize("d_qk", [512, 576])
def test_reference_gradient_matches_float64_central_differences(rng, d_qk):
    """The reference in float64 (it computes in its inputs' precision from float32 up): the
    derivative along random directions against central differences."""
    q, kv, indices, _, topk_length = make_case(rng, d_qk=d_qk, sink=False)
    sink = np.array([0.3, -0.2, 1.0])
    w_out = rng.normal(size=(q.shape[0], q.shape[1], 512))
    w_lse = rng.normal(size=q.shape[:2])
    scale = d_qk**-0.5
    with jax.enable_x64(True):

        def loss(q, kv, sink):
            out, _, lse = reference.sparse_prefill(
                q,
                kv,
                jnp.asarray(indices),
                scale,
                attn_sink=sink,
                topk_length=jnp.asarray(topk_length),
            )
            return jnp.sum(out * w_out) + jnp.sum(jnp.where(jnp.isinf(lse), 0.0, lse) * w_lse)

        args = tuple(jnp.asarray(x, jnp.float64) for x in (q, kv, sink))
        grads = jax.grad(loss, argnums=(0, 1, 2))(*args)
        for _ in range(3):
            direction = [rng.normal(size=a.shape) for a in args]
            norm = np.sqrt(sum(np.sum(d**2) for d in direction))
            direction = tuple(jnp.asarray(d / norm) for d in direction)
            eps = 1e-4
            plus = loss(*(a + eps * d for a, d in zip(args, direction, strict=True)))
            minus = loss(*(a - eps * d for a, d in zip(args, direction, strict=True)))
            numeric = float((plus - minus) / (2 * eps))
            analytic = float(sum(jnp.sum(g * d) for g, d in zip(grads, direction, strict=True)))
            assert abs(numeric - analytic) <= 1e-7 * max(1.0, abs(analytic)), (numeric, analytic)


@pytest.mark.parametrize("d_qk", [512, 576])
@pytest.mark.parametrize("sink", [False, True], ids=["nosink", "sink"])
@pytest.mark.parametrize("lengths", [False, True], ids=["all-slots", "lengths"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["float", "fixed"])
def test_kernel_form_matches_the_reference_derivative(rng, d_qk, sink, lengths, deterministic):
    """implementation="cuda" traced for a Hopper GPU runs, on the CPU, the primitives' CPU
    lowering: the forward reference and `sparse_prefill_backward`, the gradient as the kernel
    computes it from the folded sink and lse terms. It must equal JAX's derivative of the
    reference (implementation="xla") up to bf16 rounding of dq and dkv."""
    q, kv, indices, attn_sink, topk_length = make_case(rng, d_qk=d_qk, sink=sink, lengths=lengths)
    args = (bf16(q), bf16(kv), device(attn_sink))
    weights = weights_for(rng, q.shape[0], q.shape[1])
    grads = {}
    for implementation in ("xla", "cuda"):
        loss = loss_fn(
            jnp.asarray(indices),
            device(attn_sink),
            device(topk_length),
            weights,
            sm_scale=d_qk**-0.5,
            implementation=implementation,
            deterministic=deterministic,
        )
        argnums = (0, 1, 2) if sink else (0, 1)
        with platform.assume_device():
            compiled = jax.jit(jax.grad(loss, argnums=argnums)).lower(*args).compile()
        grads[implementation] = compiled(*args)
    for name, got, want in zip(("dq", "dkv", "d_sink"), grads["cuda"], grads["xla"], strict=False):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.all(np.isfinite(got)), name
        # Two bf16 roundings apart at most (dq, dkv); d_sink is float32 on both sides.
        tol = 2.0**-7 if name != "d_sink" else 1e-5
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max(), err_msg=name)


@pytest.mark.parametrize("implementation", ["xla", "cuda"])
def test_lonely_queries_get_zero_gradients(rng, implementation):
    """Token 2 selects nothing (out 0, lse +inf): its dq is exactly 0, and its d_out adds
    nothing anywhere."""
    q, kv, indices, attn_sink, topk_length = make_case(rng)
    weights = weights_for(rng, q.shape[0], q.shape[1])
    lonely_only = (weights[0] * (jnp.arange(q.shape[0]) == 2)[:, None, None], weights[1] * 0)
    args = (bf16(q), bf16(kv), device(attn_sink))
    with platform.assume_device():
        for w, check_all in ((weights, False), (lonely_only, True)):
            loss = loss_fn(
                jnp.asarray(indices),
                device(attn_sink),
                device(topk_length),
                w,
                sm_scale=0.05,
                implementation=implementation,
            )
            dq, dkv, d_sink = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)
            assert np.all(np.asarray(dq[2], np.float32) == 0)
            if check_all:
                for g in (dq, dkv, d_sink):
                    assert np.all(np.asarray(g, np.float32) == 0)


@pytest.mark.parametrize("implementation", ["xla", "cuda"])
def test_max_logits_has_no_gradient(rng, implementation):
    q, kv, indices, _, _ = make_case(rng, sink=False, lengths=False)

    def loss(q):
        _, max_logits, _ = fm.flash_mla_sparse_fwd(
            q, bf16(kv), jnp.asarray(indices), 0.05, implementation=implementation
        )
        return jnp.sum(jnp.where(jnp.isinf(max_logits), 0.0, max_logits))

    with platform.assume_device(), pytest.raises(TypeError, match="max_logits has no gradient"):
        jax.grad(loss)(bf16(q))

    def loss_stopped(q):
        _, max_logits, _ = fm.flash_mla_sparse_fwd(
            q, bf16(kv), jnp.asarray(indices), 0.05, implementation=implementation
        )
        return jnp.sum(jnp.where(jnp.isinf(max_logits), 0.0, jax.lax.stop_gradient(max_logits)))

    with platform.assume_device():
        assert np.all(np.asarray(jax.grad(loss_stopped)(bf16(q)), np.float32) == 0)


def test_gradient_under_jit_and_vmap(rng):
    """vmap over a leading batch of independent prefills: each slice's gradient equals the
    unbatched one (the reference path)."""
    cases = [make_case(rng, sink=False, lengths=False) for _ in range(2)]
    indices = jnp.asarray(cases[0][2])
    weights = weights_for(rng, 6, 3)
    loss = loss_fn(indices, None, None, weights, sm_scale=0.05, implementation="xla")
    qs = jnp.stack([bf16(c[0]) for c in cases])
    kvs = jnp.stack([bf16(c[1]) for c in cases])
    batched = jax.jit(jax.vmap(jax.grad(lambda q, kv: loss(q, kv, None), argnums=(0, 1))))(qs, kvs)
    for i in range(2):
        single = jax.grad(lambda q, kv: loss(q, kv, None), argnums=(0, 1))(qs[i], kvs[i])
        for b, s in zip(batched, single, strict=True):
            np.testing.assert_allclose(
                np.asarray(b[i], np.float32), np.asarray(s, np.float32), rtol=2.0**-7, atol=1e-6
            )


@pytest.mark.parametrize("scale_mul", [1.0, 300.0, 1e-6])
def test_fixed_point_scale_keeps_every_sum_in_range(rng, scale_mul):
    """The kernel's deterministic sums emulated in int64 (one addend per slot and dim, summed
    over the heads first, as a CTA's product does; then times the scale and rounded): every
    partial sum stays within +-2^61, and the sums divided by the scale equal the float64 dkv
    to far better than float32 rounding of the largest element."""
    q, kv, indices, _, topk_length = make_case(rng, sink=False, s_kv=20)
    q, kv = q * scale_mul, kv * scale_mul
    s_q, h_q, d_qk = q.shape
    d_out = rng.normal(size=(s_q, h_q, 512))
    row_shift = rng.normal(size=(s_q, h_q))
    sm_scale = d_qk**-0.5
    lse = np.asarray(
        reference.sparse_prefill(
            jnp.asarray(q, jnp.float32),
            jnp.asarray(kv, jnp.float32),
            jnp.asarray(indices),
            sm_scale,
            topk_length=jnp.asarray(topk_length),
        )[2]
    )
    fixed = float(
        prefill_sparse_backward.fixed_point_scale(
            jnp.asarray(q, jnp.float32),
            jnp.asarray(kv, jnp.float32),
            jnp.asarray(indices),
            jnp.asarray(topk_length),
            jnp.asarray(d_out, jnp.float32),
            jnp.asarray(row_shift, jnp.float32),
            sm_scale,
        )[0]
    )
    assert fixed > 0 and np.log2(fixed) == np.floor(np.log2(fixed))  # a power of two
    sums = np.zeros((kv.shape[0], d_qk), np.int64)
    exact = np.zeros((kv.shape[0], d_qk))
    for t in range(s_q):
        for j in range(min(max(int(topk_length[t]), 0), indices.shape[2])):
            row = indices[t, 0, j]
            if not 0 <= row < kv.shape[0] or np.isinf(lse[t]).any():
                continue
            k = kv[row, 0]
            prob = np.exp(sm_scale * q[t] @ k - lse[t])  # [h_q]
            d_score = sm_scale * prob * (d_out[t] @ k[:512] + row_shift[t])
            addend = d_score @ q[t]
            addend[:512] += prob @ d_out[t]
            exact[row] += addend
            sums[row] += np.rint(addend.astype(np.float32) * np.float32(fixed)).astype(np.int64)
            assert np.abs(sums[row]).max() < 2.0**61
    got = sums / fixed
    np.testing.assert_allclose(got, exact, rtol=0, atol=2.0**-20 * np.abs(exact).max() + 1e-30)


def test_deterministic_must_be_a_bool(rng):
    q, kv, indices, _, _ = make_case(rng, sink=False, lengths=False)
    with pytest.raises(TypeError, match="deterministic must be a Python bool"):
        fm.flash_mla_sparse_fwd(bf16(q), bf16(kv), jnp.asarray(indices), 0.1, deterministic=1)
