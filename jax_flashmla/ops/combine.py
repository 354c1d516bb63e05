"""combine_splits: merge split-KV partial attention results (the decode kernels' last step).

The dense and sparse decode kernels call the same CUDA combine from inside their own custom
call; this standalone op exposes it for tests and for callers that split KV ranges themselves
(e.g. attention over several caches).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_flashmla._src import checks, platform
from jax_flashmla._src.forward_only import forward_only
from jax_flashmla._src.kernels.combine import combine

OP = "combine_splits"


def combine_splits(
    partial_o: jax.Array,
    partial_lse: jax.Array,
    num_splits: jax.Array,
    attn_sink: jax.Array | None = None,
    *,
    out_dtype: jnp.dtype = jnp.bfloat16,
    implementation: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Merge the pieces of each request: (out [b, s_q, h_q, d_v], lse float32 [b, h_q, s_q]).

    Args:
      partial_o: float32 [R, s_q, h_q, d_v], d_v a multiple of 8; row num_splits[i] + s holds
        piece s of request i, normalised by its own softmax.
      partial_lse: float32 [R, s_q, h_q], each piece's natural-log LSE (-inf: the piece saw no
        attendable key, and its partial_o row is 0).
      num_splits: int32 [b + 1], non-decreasing from 0 with num_splits[b] <= R. Rows past
        num_splits[b] are ignored (they may hold garbage).
      attn_sink: float32 [h_q], optional: out *= 1 / (1 + exp(attn_sink - lse)).
      out_dtype: static, bfloat16 or float16 (a dtype, a scalar type or its name).
      implementation: None, "cuda" or "xla".

    A row whose pieces all have lse -inf gets out 0 and lse +inf. Forward-only: differentiating
    it raises a TypeError.

    Raises:
      TypeError: an array argument is not an array or has a wrong dtype; out_dtype is not
        bfloat16 or float16.
      ValueError: wrong ranks or shapes, or "cuda" unavailable.
    """
    checks.check_array(
        OP, "partial_o", partial_o, ndim=4, dtypes=checks.FLOAT32, shape_doc="[rows, s_q, h_q, d_v]"
    )
    rows, s_q, h_q, d_v = partial_o.shape
    checks.check_array(
        OP,
        "partial_lse",
        partial_lse,
        dtypes=checks.FLOAT32,
        shape=(rows, s_q, h_q),
        shape_doc="[rows, s_q, h_q]",
    )
    checks.check_array(
        OP, "num_splits", num_splits, ndim=1, dtypes=checks.INT32, shape_doc="[batch + 1]"
    )
    b = num_splits.shape[0] - 1
    if b < 0 or b > rows:
        raise ValueError(
            f"{OP}: num_splits must have 1 to rows + 1 = {rows + 1} entries; got {b + 1}"
        )
    if attn_sink is not None:
        checks.check_array(
            OP, "attn_sink", attn_sink, dtypes=checks.FLOAT32, shape=(h_q,), shape_doc="[h_q]"
        )
    out_dtype = checks.check_dtype(OP, "out_dtype", out_dtype, checks.FLOAT16_TYPES)
    reason = "" if d_v % 8 == 0 else f"the kernel needs d_v % 8 == 0; got {d_v}"
    use_kernel = platform.choose_implementation(OP, implementation, reason) == "cuda"
    # The kernel's operand for "no sink" is an empty array.
    sink = attn_sink if attn_sink is not None else jnp.zeros((0,), jnp.float32)

    def compute(partial_o, partial_lse, num_splits, sink):
        return combine(
            partial_o, partial_lse, num_splits, sink, use_kernel=use_kernel, out_dtype=out_dtype
        )

    return forward_only(OP, compute)(partial_o, partial_lse, num_splits, sink)
