"""Float64 NumPy oracle of dense varlen MHA prefill, and the tolerance check of semantics.md."""

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


def check_close(
    actual: Any,
    ref: Any,
    *,
    abs_tol: float,
    rel_tol: float,
    cos_tol: float | None = None,
    name: str = "value",
) -> None:
    """Asserts ``actual`` matches ``ref`` under the tolerance rule of semantics.md.

    An element passes if |a - r| < abs_tol or |a - r| / (|r| + 1e-6) < rel_tol. NaN and
    +/-inf positions must coincide exactly (and infinities agree in sign). Over the finite
    positions the cosine difference 1 - 2 sum(a r) / sum(a^2 + r^2), in float64, must be
    <= cos_tol (skipped when cos_tol is None, as for lse, which has no cosine bound).

    Raises:
      AssertionError: on a shape mismatch, mismatched non-finite positions, failing elements
        (with their count and the worst one) or a too-large cosine difference.
    """
    a = np.asarray(actual).astype(np.float64)
    r = np.asarray(ref).astype(np.float64)
    if a.shape != r.shape:
        raise AssertionError(f"{name}: shape {a.shape} != reference shape {r.shape}")
    for what, fn in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        diff = fn(a) != fn(r)
        if diff.any():
            idx = tuple(int(i) for i in np.argwhere(diff)[0])
            raise AssertionError(
                f"{name}: {what} positions differ at {int(diff.sum())} elements, "
                f"first at {idx}: actual {a[idx]}, reference {r[idx]}"
            )
    finite = np.isfinite(a) & np.isfinite(r)
    af, rf = a[finite], r[finite]
    err = np.abs(af - rf)
    rel = err / (np.abs(rf) + 1e-6)
    bad = ~((err < abs_tol) | (rel < rel_tol))
    if bad.any():
        flat_idx = np.flatnonzero(finite)
        worst = int(np.argmax(np.where(bad, rel, -1.0)))
        idx = tuple(int(i) for i in np.unravel_index(flat_idx[worst], a.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {af.size} elements out of tolerance "
            f"(abs_tol {abs_tol}, rel_tol {rel_tol}); worst at {idx}: actual {a[idx]!r}, "
            f"reference {r[idx]!r}, abs err {err[worst]:.3e}, rel err {rel[worst]:.3e}"
        )
    if cos_tol is None:
        return
    denom = float(np.sum(af * af + rf * rf))
    cos_diff = 0.0 if denom == 0.0 else 1.0 - 2.0 * float(np.sum(af * rf)) / denom
    if cos_diff > cos_tol:
        raise AssertionError(f"{name}: cosine difference {cos_diff:.3e} > cos_tol {cos_tol:.3e}")


# Tolerances of semantics.md for MHA prefill (forward and backward).
MHA_OUT_TOL = {"abs_tol": 1e-3, "rel_tol": 8.01 / 128, "cos_tol": 7e-6}
MHA_LSE_TOL = {"abs_tol": 1e-6, "rel_tol": 2.01 / 65536}
