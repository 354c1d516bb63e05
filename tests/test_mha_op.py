"""The public MHA prefill op, flash_attn_varlen_func and its packed forms: gradients of losses
that use out, lse or both against jax.grad of a float64 jax.numpy oracle (causal or not, GQA,
empty sequences, stray tokens), a finite-difference spot check, the sharded backward on 8 CPU
devices, and the packed forms against the unpacked op."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import oracle_mha
import pytest
from jax.sharding import PartitionSpec as P
from oracle_decode import check_close
from test_reference_mha import make_case, make_rng, randn
from test_sharding import auto_mesh, collectives, run_sharded

import jax_flashmla as fm

GRAD_TOL = oracle_mha.MHA_OUT_TOL


def loss_fn(attention, ct_out, ct_lse):
    """sum(out * ct_out) + sum(lse * ct_lse) over the rows with a key (lse is +inf elsewhere)."""

    def loss(q, k, v):
        out, lse = attention(q, k, v)
        lse = jnp.where(jnp.isinf(lse), 0.0, lse)
        return jnp.sum(out.astype(ct_out.dtype) * ct_out) + jnp.sum(
            lse.astype(ct_lse.dtype) * ct_lse
        )

    return loss


def op_grads(q, k, v, cu_q, cu_k, mq, mk, causal, ct_out, ct_lse):
    def attention(q, k, v):
        return fm.flash_attn_varlen_func(
            q, k, v, jnp.asarray(cu_q), jnp.asarray(cu_k), mq, mk, causal=causal
        )

    return jax.jit(jax.grad(loss_fn(attention, ct_out, ct_lse), argnums=(0, 1, 2)))(q, k, v)


def oracle_grads(q, k, v, cu_q, cu_k, causal, ct_out, ct_lse):
    """jax.grad of the float64 oracle at the (bf16) inputs, as float64 NumPy arrays."""
    with jax.enable_x64(True):
        args = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)]
        cts = [jnp.asarray(np.asarray(c, np.float64)) for c in (ct_out, ct_lse)]

        def attention(q, k, v):
            return oracle_mha.mha_varlen_jnp(q, k, v, cu_q, cu_k, causal=causal)

        grads = jax.jit(jax.grad(loss_fn(attention, *cts), argnums=(0, 1, 2)))(*args)
        return [np.asarray(g) for g in grads]


def cotangents(rng, total_q, h, d_v, loss):
    """(ct_out, ct_lse) float32; ct_out holds bf16 values, since out is bf16 and its cotangent
    reaches the op rounded to bf16 (the oracle must see the same one)."""
    ct_out = rng.standard_normal((total_q, h, d_v)).astype(jnp.bfloat16).astype(np.float32)
    ct_lse = rng.standard_normal((total_q, h)).astype(np.float32)
    if loss == "lse":
        ct_out = np.zeros_like(ct_out)
    return jnp.asarray(ct_out), jnp.asarray(ct_lse)


@pytest.mark.parametrize(
    "d_qk,d_v,h,h_k,causal,loss",
    [(192, 128, 8, 2, True, "out+lse"), (128, 128, 4, 4, False, "out+lse"),
     (192, 128, 4, 1, False, "out+lse"), (128, 128, 8, 2, True, "lse"),
     (192, 128, 4, 4, False, "lse")],
)  # fmt: skip
def test_gradients_vs_float64_oracle(d_qk, d_v, h, h_k, causal, loss):
    """make_case holds an empty query sequence, an empty key sequence, a sequence with more
    queries than keys, and tokens past cu_seqlens[-1]."""
    rng = make_rng("op grad", d_qk, d_v, h, h_k, causal, loss)
    q, k, v, cu_q, cu_k, mq, mk = make_case(rng, h, h_k, d_qk, d_v, extra_q=2, extra_k=3)
    ct_out, ct_lse = cotangents(rng, q.shape[0], h, d_v, loss)
    got = op_grads(q, k, v, cu_q, cu_k, mq, mk, causal, ct_out, ct_lse)
    want = oracle_grads(q, k, v, cu_q, cu_k, causal, ct_out, ct_lse)
    # The differentiated oracle computes what the loop oracle does.
    with jax.enable_x64(True):
        args = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)]
        jnp_out, jnp_lse = oracle_mha.mha_varlen_jnp(*args, cu_q, cu_k, causal=causal)
    loop_out, loop_lse = oracle_mha.mha_varlen_oracle(q, k, v, cu_q, cu_k, causal=causal)
    np.testing.assert_allclose(np.asarray(jnp_out), loop_out, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(jnp_lse), loop_lse, rtol=1e-12)
    for name, g, w, x in zip(("dq", "dk", "dv"), got, want, (q, k, v), strict=True):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        check_close(g, w, name=name, **GRAD_TOL)
    # The lse term moves dq and dk out of tolerance: a backward that dropped the lse
    # cotangent would fail above.
    without_lse = oracle_grads(q, k, v, cu_q, cu_k, causal, ct_out, jnp.zeros_like(ct_lse))
    for name, g, w0 in zip(("dq", "dk"), got, without_lse, strict=False):
        with pytest.raises(AssertionError, match="out of tolerance"):
            check_close(g, w0, name=name, **GRAD_TOL)
    if loss == "lse":  # lse does not depend on v
        assert np.all(np.asarray(got[2], np.float32) == 0)


def test_finite_difference_spot_check():
    """Central differences of the loss along random directions against <grad, direction>.

    Inputs are multiples of 2^-6 and the steps +-2^-6, so every perturbed input is exact in
    bf16; the loss is evaluated in float32 (out rounded to bf16, lse float32)."""
    rng = make_rng("finite difference")
    cu_q = jnp.array([0, 5, 5, 12, 20], jnp.int32)
    cu_k = jnp.array([0, 7, 9, 9, 19], jnp.int32)
    h, h_k = 4, 2

    def grid(shape):
        return jnp.asarray(rng.integers(-16, 17, shape) / 64.0, jnp.bfloat16)

    q, k, v = grid((20, h, 192)), grid((19, h_k, 192)), grid((19, h_k, 128))
    for loss_kind in ("out+lse", "lse"):
        ct_out, ct_lse = cotangents(rng, 20, h, 128, loss_kind)

        def attention(q, k, v):
            return fm.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 8, 9, causal=True)

        loss = jax.jit(loss_fn(attention, ct_out, ct_lse))
        grads = jax.jit(jax.grad(loss_fn(attention, ct_out, ct_lse), argnums=(0, 1, 2)))(q, k, v)
        for i, name in enumerate(("q", "k", "v")):
            if loss_kind == "lse" and name == "v":
                continue
            direction = jnp.asarray(rng.integers(-1, 2, grads[i].shape) / 64.0, jnp.bfloat16)
            plus, minus = [q, k, v], [q, k, v]
            plus[i] = plus[i] + direction
            minus[i] = minus[i] - direction
            finite_difference = (float(loss(*plus)) - float(loss(*minus))) / 2
            analytic = float(jnp.sum(grads[i].astype(jnp.float32) * direction.astype(jnp.float32)))
            assert abs(analytic) > 1e-3, (loss_kind, name, analytic)
            assert abs(finite_difference - analytic) <= 2e-2 * abs(analytic), (
                loss_kind,
                name,
                finite_difference,
                analytic,
            )


@pytest.mark.skipif(len(jax.devices("cpu")) < 8, reason="needs 8 CPU devices")
@pytest.mark.parametrize("h,h_k", [(8, 8), (8, 2), (4, 1)])
def test_sharded_backward_with_lse(h, h_k):
    """Heads sharded over 4 devices: dk and dv summed over the devices that share a KV head,
    the lse cotangent included; no all-gather or all-to-all."""
    rng = make_rng("sharded", h, h_k)
    cu = np.array([0, 5, 5, 16], np.int32)
    q, k, v = randn(rng, (16, h, 128)), randn(rng, (16, h_k, 128)), randn(rng, (16, h_k, 128))
    ct_out, ct_lse = cotangents(rng, 16, h, 128, "out+lse")
    mesh = auto_mesh((min(4, h_k) if h_k > 1 else 4,), ("model",))

    def attention(q, k, v):
        return fm.flash_attn_varlen_func(
            q, k, v, jnp.asarray(cu), jnp.asarray(cu), 11, 11, causal=True
        )

    grad = jax.grad(loss_fn(attention, ct_out, ct_lse), argnums=(0, 1, 2))
    kv_spec = P(None, "model") if h_k > 1 else P()
    got, text = run_sharded(grad, (q, k, v), (P(None, "model"), kv_spec, kv_spec), mesh)
    assert not {"all-gather", "all-to-all"} & set(collectives(text))
    want = oracle_grads(q, k, v, cu, cu, True, ct_out, ct_lse)
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        check_close(g, w, name=name, **GRAD_TOL)


def test_packed_forms_equal_the_unpacked_op():
    """Outputs bitwise, and gradients of a loss on out and lse land in the packed arrays."""
    rng = make_rng("packed")
    cu = jnp.array([0, 6, 6, 13], jnp.int32)
    q, k = randn(rng, (13, 4, 192)), randn(rng, (13, 4, 192))
    v = randn(rng, (13, 4, 128))
    ct_out, ct_lse = cotangents(rng, 13, 4, 128, "out+lse")

    def plain(q, k, v):
        return fm.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, causal=True)

    def qkv_packed(qkv):
        return fm.flash_attn_varlen_qkvpacked_func(qkv, cu, 7, 192, causal=True)

    def kv_packed(q, kv):
        return fm.flash_attn_varlen_kvpacked_func(q, kv, cu, cu, 7, 7, 192, causal=True)

    want = plain(q, k, v)
    qkv = jnp.concatenate([q, k, v], axis=-1)
    kv = jnp.concatenate([k, v], axis=-1)
    for got in (qkv_packed(qkv), kv_packed(q, kv)):
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))

    loss = loss_fn(plain, ct_out, ct_lse)
    dq, dk, dv = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    d_qkv = jax.grad(lambda x: loss_fn(lambda *a: qkv_packed(x), ct_out, ct_lse)(q, k, v))(qkv)
    np.testing.assert_array_equal(np.asarray(d_qkv), np.asarray(jnp.concatenate([dq, dk, dv], -1)))
    d_q, d_kv = jax.grad(
        lambda a, b: loss_fn(lambda *_: kv_packed(a, b), ct_out, ct_lse)(q, k, v), argnums=(0, 1)
    )(q, kv)
    np.testing.assert_array_equal(np.asarray(d_q), np.asarray(dq))
    np.testing.assert_array_equal(np.asarray(d_kv), np.asarray(jnp.concatenate([dk, dv], -1)))
