"""Tests of jax_flashmla.reference.mha.mha_varlen: forward vs a float64 oracle, gradients vs a
naive per-sequence JAX implementation, lonely queries, jit and vmap."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import oracle_mha
import pytest
from oracle_decode import check_close

from jax_flashmla.reference.mha import mha_varlen

OUT_TOL = oracle_mha.MHA_OUT_TOL
LSE_TOL = oracle_mha.MHA_LSE_TOL
DIMS = [(192, 128), (128, 128)]
HEADS = [(8, 2), (4, 4)]  # (h, h_k): GQA and plain MHA


def make_rng(*key: object) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def randn(rng: np.random.Generator, shape: tuple[int, ...]) -> jax.Array:
    """bf16 N(0, 1) / 10 clamped to [-1, 1], as in FlashMLA's tests."""
    x = np.clip(rng.standard_normal(shape) / 10, -1, 1).astype(np.float32)
    return jnp.asarray(x, jnp.bfloat16)


def make_case(
    rng: np.random.Generator,
    h: int,
    h_k: int,
    d_qk: int,
    d_v: int,
    b: int = 5,
    extra_q: int = 0,
    extra_k: int = 0,
):
    """Random varlen batch with an empty query sequence, an empty key sequence and a sequence
    with more queries than keys (so causal rows without visible keys); s_q != s_k in general.
    ``extra_q`` / ``extra_k`` trailing tokens belong to no sequence."""
    sq = rng.integers(1, 12, size=b)
    sk = rng.integers(1, 20, size=b)
    sq[1] = 0
    sk[2] = 0
    sq[3], sk[3] = 9, 4
    cu_q = np.concatenate([[0], np.cumsum(sq)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(sk)]).astype(np.int32)
    total_q, total_k = int(cu_q[-1]) + extra_q, int(cu_k[-1]) + extra_k
    q = randn(rng, (total_q, h, d_qk))
    k = randn(rng, (total_k, h_k, d_qk))
    v = randn(rng, (total_k, h_k, d_v))
    return q, k, v, cu_q, cu_k, int(sq.max()), int(sk.max())


def naive_mha(q, k, v, cu_q, cu_k, softmax_scale=None, causal=False):
    """Per-sequence dense softmax in float32 (cu_* are NumPy: the loop is unrolled)."""
    total_q, h, d_qk = q.shape
    h_k, d_v = k.shape[1], v.shape[2]
    scale = d_qk**-0.5 if softmax_scale is None else softmax_scale
    hi = jax.lax.Precision.HIGHEST
    outs, lses = [], []
    for i in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        sq, sk = q1 - q0, k1 - k0
        if sq == 0:
            continue
        if sk == 0:
            outs.append(jnp.zeros((sq, h, d_v), jnp.float32))
            lses.append(jnp.full((sq, h), jnp.inf, jnp.float32))
            continue
        qs = q[q0:q1].astype(jnp.float32)
        ks = jnp.repeat(k[k0:k1].astype(jnp.float32), h // h_k, axis=1)
        vs = jnp.repeat(v[k0:k1].astype(jnp.float32), h // h_k, axis=1)
        s = jnp.einsum("qhd,khd->hqk", qs, ks, precision=hi) * scale
        rows, cols = np.arange(sq)[:, None], np.arange(sk)[None, :]
        mask = cols <= sk - sq + rows if causal else np.ones((sq, sk), bool)
        # A large finite fill (not -inf) keeps fully masked rows finite; the mask product then
        # zeroes them.
        s = jnp.where(mask, s, -1e30)
        p = jax.nn.softmax(s, axis=-1) * mask
        outs.append(jnp.einsum("hqk,khd->qhd", p, vs, precision=hi))
        lse = jax.nn.logsumexp(s, axis=-1).T
        lses.append(jnp.where(mask.any(-1)[:, None], lse, jnp.inf))
    n_pad = total_q - int(cu_q[-1])
    outs.append(jnp.zeros((n_pad, h, d_v), jnp.float32))
    lses.append(jnp.full((n_pad, h), jnp.inf, jnp.float32))
    return jnp.concatenate(outs).astype(q.dtype), jnp.concatenate(lses)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("h,h_k", HEADS)
@pytest.mark.parametrize("d_qk,d_v", DIMS)
def test_forward_vs_oracle(d_qk: int, d_v: int, h: int, h_k: int, causal: bool):
    rng = make_rng("fwd", d_qk, d_v, h, h_k, causal)
    q, k, v, cu_q, cu_k, mq, mk = make_case(rng, h, h_k, d_qk, d_v)
    out, lse = mha_varlen(q, k, v, jnp.asarray(cu_q), jnp.asarray(cu_k), mq, mk, causal=causal)
    assert out.shape == (q.shape[0], h, d_v) and out.dtype == q.dtype
    assert lse.shape == (q.shape[0], h) and lse.dtype == jnp.float32
    ref_out, ref_lse = oracle_mha.mha_varlen_oracle(q, k, v, cu_q, cu_k, causal=causal)
    check_close(out, ref_out, name="out", **OUT_TOL)
    check_close(lse, ref_lse, name="lse", **LSE_TOL)
    # The case builder guarantees lonely queries: check they are exactly (0, +inf).
    lonely = np.isinf(ref_lse)
    assert lonely.any()
    assert np.all(np.asarray(lse)[lonely] == np.inf)
    assert np.all(np.asarray(out, np.float32)[lonely] == 0)


def test_forward_softmax_scale_chunking_and_stray_tokens():
    """Explicit scale; a chunk size that does not divide total_q; tokens past cu_seqlens[-1]
    (the stray keys hold NaN and must not be read)."""
    rng = make_rng("chunk")
    q, k, v, cu_q, cu_k, mq, mk = make_case(rng, 4, 2, 128, 128, b=4, extra_q=3, extra_k=4)
    k = k.at[-4:].set(jnp.nan)
    v = v.at[-4:].set(jnp.nan)
    ref_out, ref_lse = oracle_mha.mha_varlen_oracle(
        q, k, v, cu_q, cu_k, softmax_scale=0.3, causal=True
    )
    assert np.all(np.isinf(ref_lse[-3:]))
    for chunk in (None, 1, 7):
        out, lse = mha_varlen(
            q, k, v, jnp.asarray(cu_q), jnp.asarray(cu_k), mq, mk, 0.3, True,
            query_chunk_size=chunk,
        )  # fmt: skip
        check_close(out, ref_out, name=f"out[chunk={chunk}]", **OUT_TOL)
        check_close(lse, ref_lse, name=f"lse[chunk={chunk}]", **LSE_TOL)


def _grads(fn, q, k, v, ct_out, ct_lse):
    def loss(q, k, v):
        out, lse = fn(q, k, v)
        # lse is +inf on lonely rows; take the finite part (the cotangent there is 0 anyway).
        lse = jnp.where(jnp.isinf(lse), 0.0, lse)
        return jnp.sum(out.astype(jnp.float32) * ct_out) + jnp.sum(lse * ct_lse)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize(
    "d_qk,d_v,h,h_k,causal",
    [(192, 128, 8, 2, True), (128, 128, 4, 4, False), (192, 128, 4, 4, False),
     (128, 128, 8, 2, True)],
)  # fmt: skip
def test_gradients_vs_naive(d_qk: int, d_v: int, h: int, h_k: int, causal: bool):
    rng = make_rng("grad", d_qk, d_v, h, h_k, causal)
    q, k, v, cu_q, cu_k, mq, mk = make_case(rng, h, h_k, d_qk, d_v)
    ct_out = jnp.asarray(rng.standard_normal((q.shape[0], h, d_v)), jnp.float32)
    ct_lse = jnp.asarray(rng.standard_normal((q.shape[0], h)), jnp.float32)

    def ours(q, k, v):
        return mha_varlen(q, k, v, jnp.asarray(cu_q), jnp.asarray(cu_k), mq, mk, causal=causal)

    def naive(q, k, v):
        return naive_mha(q, k, v, cu_q, cu_k, causal=causal)

    got = _grads(ours, q, k, v, ct_out, ct_lse)
    want = _grads(naive, q, k, v, ct_out, ct_lse)
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert g.dtype == w.dtype == jnp.bfloat16
        assert np.all(np.isfinite(np.asarray(g, np.float32))), name
        check_close(g, w, name=name, **OUT_TOL)


def test_gradients_finite_with_lonely_queries_and_nan_padding():
    """Zero-length sequences, causal rows with no visible key, stray query tokens, and NaN in
    the stray key rows: every gradient is finite and the stray rows get exactly 0."""
    rng = make_rng("lonely")
    q, k, v, cu_q, cu_k, mq, mk = make_case(rng, 4, 2, 128, 128, extra_q=2, extra_k=3)
    k = k.at[-3:].set(jnp.nan)
    v = v.at[-3:].set(jnp.nan)
    ct_out = jnp.ones((q.shape[0], 4, 128), jnp.float32)
    ct_lse = jnp.ones((q.shape[0], 4), jnp.float32)

    def ours(q, k, v):
        return mha_varlen(q, k, v, jnp.asarray(cu_q), jnp.asarray(cu_k), mq, mk, causal=True)

    out, lse = ours(q, k, v)
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    dq, dk, dv = (np.asarray(g, np.float32) for g in _grads(ours, q, k, v, ct_out, ct_lse))
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert np.all(np.isfinite(g)), name
    lonely = np.isinf(np.asarray(lse)).all(-1)
    assert lonely.sum() >= 2 + 5  # the stray tokens, sequence 2 (s_k = 0), sequence 3's rows
    assert np.all(dq[lonely] == 0)
    assert np.all(dk[-3:] == 0) and np.all(dv[-3:] == 0)

    # The lse itself as the loss, +inf rows included: the gradient still is finite.
    dq2 = jax.grad(lambda q: jnp.sum(jnp.where(jnp.isinf(ours(q, k, v)[1]), 0.0, 1.0)))(q)
    assert np.all(np.isfinite(np.asarray(dq2, np.float32)))


def test_jit_and_vmap():
    rng = make_rng("vmap")
    h, h_k, d_qk, d_v, n = 4, 2, 192, 128, 2
    _, _, _, cu_q, cu_k, mq, mk = make_case(rng, h, h_k, d_qk, d_v, b=4)
    tq, tk = int(cu_q[-1]), int(cu_k[-1])
    qs = randn(rng, (n, tq, h, d_qk))
    ks = randn(rng, (n, tk, h_k, d_qk))
    vs = randn(rng, (n, tk, h_k, d_v))
    cu_qj, cu_kj = jnp.asarray(cu_q), jnp.asarray(cu_k)

    @jax.jit
    def batched(qs, ks, vs, cu_q, cu_k):
        fn = lambda q, k, v: mha_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=True)  # noqa: E731
        return jax.vmap(fn)(qs, ks, vs)

    outs, lses = batched(qs, ks, vs, cu_qj, cu_kj)
    assert outs.shape == (n, tq, h, d_v) and lses.shape == (n, tq, h)
    # jit with static max_seqlen / causal, called positionally like FlashAttention's API.
    jitted = jax.jit(mha_varlen, static_argnums=(5, 6, 7, 8))
    for i in range(n):
        out_i, lse_i = jitted(qs[i], ks[i], vs[i], cu_qj, cu_kj, mq, mk, None, True)
        ref_out, ref_lse = oracle_mha.mha_varlen_oracle(
            qs[i], ks[i], vs[i], cu_q, cu_k, causal=True
        )
        check_close(out_i, ref_out, name="out", **OUT_TOL)
        check_close(outs[i], ref_out, name="vmap out", **OUT_TOL)
        check_close(lses[i], ref_lse, name="vmap lse", **LSE_TOL)
        check_close(lse_i, ref_lse, name="lse", **LSE_TOL)


def test_empty_inputs():
    q = jnp.zeros((3, 2, 128), jnp.bfloat16)
    k = jnp.zeros((0, 1, 128), jnp.bfloat16)
    v = jnp.zeros((0, 1, 128), jnp.bfloat16)
    cu = jnp.array([0, 3], jnp.int32)
    out, lse = mha_varlen(q, k, v, cu, jnp.array([0, 0], jnp.int32), 3, 0)
    assert out.shape == (3, 2, 128) and np.all(np.asarray(out, np.float32) == 0)
    assert np.all(np.asarray(lse) == np.inf)


BAD_INPUTS = [
    # (id, argument changes, error, message after "mha_varlen: ")
    ("q rank", {"q": lambda q: q[0]}, ValueError, r"q must have rank 3"),
    ("q None", {"q": lambda q: None}, TypeError, r"q must be a JAX array; got NoneType"),
    ("q int", {"q": lambda q: q.astype(jnp.int32)}, TypeError, r"q must have dtype .*int32"),
    ("v tokens", {"v": lambda v: v[:4]}, ValueError, r"v must have shape \[5, 2, \*\]"),
    ("k head dim", {"k": lambda k: k[..., :64]}, ValueError, r"k must have shape \[\*, \*, 128\]"),
    ("head dims", {"v": lambda v: v[..., :64]}, ValueError,
     r"\(d_qk, d_v\) must be one of \(192, 128\), \(128, 128\); got \(128, 64\)"),
    ("heads", {"q": lambda q: q[:, :3]}, ValueError, r"q's heads must be a multiple of k's heads"),
    ("cu_seqlens_k length", {"cuk": lambda c: c[:2]}, ValueError,
     r"cu_seqlens_k must have the shape of cu_seqlens_q, \(3,\); got \(2,\)"),
    ("cu_seqlens_q rank", {"cu": lambda c: c[None], "cuk": lambda c: c[None]}, ValueError,
     r"cu_seqlens_q must have rank 1 \[batch \+ 1\]"),
    ("cu_seqlens_q float", {"cu": lambda c: c.astype(jnp.float32)}, TypeError,
     r"cu_seqlens_q must have dtype int32"),
    ("cu_seqlens_q int64-like", {"cu": lambda c: c.astype(jnp.int16)}, TypeError,
     r"cu_seqlens_q must have dtype int32"),
]  # fmt: skip


@pytest.mark.parametrize(
    "changes,error,pattern", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_inputs_raise(changes, error, pattern):
    args = {
        "q": jnp.zeros((6, 4, 128), jnp.bfloat16),
        "k": jnp.zeros((5, 2, 128), jnp.bfloat16),
        "v": jnp.zeros((5, 2, 128), jnp.bfloat16),
        "cu": jnp.array([0, 2, 6], jnp.int32),
        "cuk": jnp.array([0, 1, 5], jnp.int32),
    }
    for name, change in changes.items():
        args[name] = change(args[name])
    with pytest.raises(error, match="^mha_varlen: " + pattern):
        mha_varlen(*args.values(), 4, 4)


def test_bad_statics_raise():
    q = k = v = jnp.zeros((6, 4, 128), jnp.bfloat16)
    cu = jnp.array([0, 2, 6], jnp.int32)
    with pytest.raises(ValueError, match=r"^mha_varlen: max_seqlen_k must be >= 0; got -1"):
        mha_varlen(q, k, v, cu, cu, 4, -1)
    with pytest.raises(TypeError, match=r"^mha_varlen: max_seqlen_q must be a Python int"):
        mha_varlen(q, k, v, cu, cu, 4.0, 4)
    with pytest.raises(ValueError, match=r"^mha_varlen: query_chunk_size must be >= 1; got 0"):
        mha_varlen(q, k, v, cu, cu, 4, 4, query_chunk_size=0)
    with pytest.raises(ValueError, match=r"^mha_varlen: softmax_scale must be finite in float32"):
        mha_varlen(q, k, v, cu, cu, 4, 4, float("inf"))
