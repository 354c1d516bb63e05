"""Float64 NumPy oracle of dense varlen MHA prefill and its tolerances (the comparison rule is
oracle_decode.check_close)."""

from __future__ import annotations

from typing import Any

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


# Tolerances of semantics.md for MHA prefill (forward and backward).
MHA_OUT_TOL = {"abs_tol": 1e-3, "rel_tol": 8.01 / 128, "cos_tol": 7e-6}
MHA_LSE_TOL = {"abs_tol": 1e-6, "rel_tol": 2.01 / 65536}
