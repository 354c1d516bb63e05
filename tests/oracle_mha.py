"""Oracles of dense varlen MHA prefill: a float64 NumPy forward, a plain jax.numpy version to
differentiate (in float64 under jax.enable_x64), and the tolerances (the comparison rule is
oracle_decode.check_close)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def mha_varlen_oracle(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    softmax_scale: float | None = None,
    causal: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Forward of varlen MHA in float64 with plain loops over sequences and heads.

    q [total_q, h, d_qk], k [total_k, h_k, d_qk], v [total_k, h_k, d_v] (any array-likes);
    cu_seqlens [b + 1]. Returns (out float64 [total_q, h, d_v], lse float64 [total_q, h]).
    Queries with no visible key (and tokens outside every sequence) get out 0, lse +inf.
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    cu_q = [int(x) for x in np.asarray(cu_seqlens_q)]
    cu_k = [int(x) for x in np.asarray(cu_seqlens_k)]
    total_q, h, d_qk = q.shape
    h_k = k.shape[1]
    group = h // h_k
    scale = d_qk**-0.5 if softmax_scale is None else softmax_scale
    out = np.zeros((total_q, h, v.shape[2]), np.float64)
    lse = np.full((total_q, h), np.inf, np.float64)
    for i in range(len(cu_q) - 1):
        q0, sq = cu_q[i], cu_q[i + 1] - cu_q[i]
        k0, sk = cu_k[i], cu_k[i + 1] - cu_k[i]
        for head in range(h):
            kh = head // group
            for r in range(sq):
                n_vis = min(sk, sk - sq + r + 1) if causal else sk
                if n_vis <= 0:
                    continue
                keys = k[k0 : k0 + n_vis, kh]
                vals = v[k0 : k0 + n_vis, kh]
                s = scale * (keys @ q[q0 + r, head])
                mx = s.max()
                e = np.exp(s - mx)
                out[q0 + r, head] = (e @ vals) / e.sum()
                lse[q0 + r, head] = mx + np.log(e.sum())
    return out, lse


def mha_varlen_jnp(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    softmax_scale: float | None = None,
    causal: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """The same attention in jax.numpy, in q's dtype (pass float64 arrays under
    jax.enable_x64 for a float64 gradient oracle): one dense softmax over all packed keys with
    a visibility mask built on the host from cu_seqlens (host arrays).

    Returns (out [total_q, h, d_v], lse [total_q, h]); rows with no visible key (and tokens
    outside every sequence) are out 0, lse +inf, and pass no gradient.
    """
    cu_q = [int(x) for x in np.asarray(cu_seqlens_q)]
    cu_k = [int(x) for x in np.asarray(cu_seqlens_k)]
    total_q, h, d_qk = q.shape
    total_k = k.shape[0]
    group = h // k.shape[1]
    scale = d_qk**-0.5 if softmax_scale is None else softmax_scale
    visible = np.zeros((total_q, total_k), bool)
    for i in range(len(cu_q) - 1):
        sq, sk = cu_q[i + 1] - cu_q[i], cu_k[i + 1] - cu_k[i]
        rows, cols = np.arange(sq)[:, None], np.arange(sk)[None, :]
        block = cols <= sk - sq + rows if causal else np.ones((sq, sk), bool)
        visible[cu_q[i] : cu_q[i + 1], cu_k[i] : cu_k[i + 1]] = block
    seen = visible.any(axis=1)[:, None]  # [total_q, 1]: rows with at least one key
    keys = jnp.repeat(k, group, axis=1)  # query head j reads KV head j // group
    vals = jnp.repeat(v, group, axis=1)
    s = scale * jnp.einsum("qhd,khd->qhk", q, keys)
    # Hidden scores get a large finite value, not -inf, so that no gradient is NaN; rows with
    # no key at all are replaced at the end.
    s = jnp.where(visible[:, None, :], s, -1e30)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.exp(s - lse[..., None]) * visible[:, None, :]
    out = jnp.einsum("qhk,khd->qhd", p, vals)
    out = jnp.where(seen[..., None], out, 0.0)
    lse = jnp.where(seen, lse, jnp.inf)
    return out, lse


# Tolerances of docs/ops.md for MHA prefill (forward and backward).
MHA_OUT_TOL = {"abs_tol": 1e-3, "rel_tol": 8.01 / 128, "cos_tol": 7e-6}
MHA_LSE_TOL = {"abs_tol": 1e-6, "rel_tol": 2.01 / 65536}
