"""flash_mla_sparse_fwd: sparse (top-k) MLA prefill attention over a BF16 KV array."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_flashmla._src import checks, platform, sharding
from jax_flashmla._src.forward_only import forward_only
from jax_flashmla._src.geometry import HEAD_DIM_V, SPARSE_HEAD_DIMS_QK
from jax_flashmla._src.kernels import prefill_sparse as family

OP = "flash_mla_sparse_fwd"


def flash_mla_sparse_fwd(
    q: jax.Array,
    kv: jax.Array,
    indices: jax.Array,
    sm_scale: float,
    d_v: int = 512,
    attn_sink: jax.Array | None = None,
    topk_length: jax.Array | None = None,
    *,
    implementation: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sparse MLA prefill: query token i attends the keys kv[indices[i, 0, :topk_length[i]]].

    There is no batch axis: batch by concatenating tokens and offsetting indices.
    Forward-only: differentiating the op raises a TypeError.

    Args:
      q: bfloat16 [s_q, h_q, d_qk], d_qk 512 or 576.
      kv: bfloat16 [s_kv, 1, d_qk]; V is kv[..., :512].
      indices: int32 [s_q, 1, topk]; an index < 0 or >= s_kv is invalid and ignored.
      sm_scale: static float finite in float32 (zero and negative allowed), the softmax
        scale (FlashMLA has no default here either).
      d_v: static int, 512.
      attn_sink: float32 [h_q], optional: out *= 1 / (1 + exp(attn_sink - lse)).
      topk_length: int32 [s_q], optional: only the first topk_length[i] indices of token i count.
      implementation: None, "cuda" or "xla" (see `flash_mla_with_kvcache`).

    Returns:
      out: bfloat16 [s_q, h_q, d_v] (0 for a query with no valid index).
      max_logits: float32 [s_q, h_q], max of sm_scale * q.k over valid keys (-inf if none).
      lse: float32 [s_q, h_q], natural-log logsumexp (+inf if no valid key).

    Raises:
      TypeError: an array argument is not an array (or None where None is allowed) or has a
        wrong dtype; sm_scale / d_v are not Python numbers.
      ValueError: wrong ranks or shapes, d_qk not 512 or 576, d_v not 512, kv with
        h_kv != 1, or implementation "cuda" where no kernel can take these inputs.
    """
    checks.check_array(OP, "q", q, ndim=3, dtypes=(jnp.bfloat16,), shape_doc="[s_q, h_q, d_qk]")
    for name, value in (("kv", kv), ("indices", indices)):
        checks.check_array(OP, name, value)
    for name, value in (("attn_sink", attn_sink), ("topk_length", topk_length)):
        if value is not None:
            checks.check_array(OP, name, value)
    s_q, h_q, d_qk = q.shape
    d_v = checks.check_int(OP, "d_v", d_v, minimum=1)
    if d_qk not in SPARSE_HEAD_DIMS_QK or d_v != HEAD_DIM_V:
        want = " or ".join(str(d) for d in SPARSE_HEAD_DIMS_QK)
        raise ValueError(
            f"{OP}: d_qk must be {want} (q's last dim) and d_v must be {HEAD_DIM_V}; got "
            f"d_qk {d_qk} and d_v {d_v}"
        )
    checks.check_array(
        OP,
        "kv",
        kv,
        ndim=3,
        dtypes=(jnp.bfloat16,),
        shape=(None, 1, d_qk),
        shape_doc=f"[s_kv, 1, {d_qk}]",
    )
    checks.check_array(
        OP,
        "indices",
        indices,
        ndim=3,
        dtypes=checks.INT32,
        shape=(s_q, 1, None),
        shape_doc="[s_q, 1, topk]",
    )
    scale = checks.check_scale(OP, "sm_scale", sm_scale, d_qk**-0.5)
    if attn_sink is not None:
        checks.check_array(
            OP, "attn_sink", attn_sink, dtypes=checks.FLOAT32, shape=(h_q,), shape_doc="[h_q]"
        )
    if topk_length is not None:
        checks.check_array(
            OP, "topk_length", topk_length, dtypes=checks.INT32, shape=(s_q,), shape_doc="[s_q]"
        )
    reason = family.launch_limit_error(s_q=s_q, h_q=h_q, topk=indices.shape[2])
    use_kernel = platform.choose_implementation(OP, implementation, reason) == "cuda"
    optional = {"attn_sink": (attn_sink, "h"), "topk_length": (topk_length, "t")}
    present = [name for name, (value, _) in optional.items() if value is not None]

    def compute(q, kv, indices, *rest):
        given = dict(zip(present, rest, strict=True))
        operands = family.with_placeholders(
            q, kv, indices, given.get("attn_sink"), given.get("topk_length")
        )
        return family.prefill_sparse(*operands, use_kernel=use_kernel, sm_scale=scale)

    def partitioned(*arrays):
        # Query tokens t and heads h may be sharded; kv is replicated.
        return sharding.partitioned_call(
            OP,
            compute,
            arrays,
            ("t h d", "n k d", "t k x", *(optional[n][1] for n in present)),
            ("t h v", "t h", "t h"),
            shardable=frozenset("th"),
        )

    return forward_only(OP, partitioned)(q, kv, indices, *(optional[n][0] for n in present))
