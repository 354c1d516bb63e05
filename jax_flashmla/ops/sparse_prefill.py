"""flash_mla_sparse_fwd: sparse (top-k) MLA prefill attention over a BF16 KV array."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_flashmla._src import checks, platform, sharding
from jax_flashmla.reference import sparse_prefill as reference

OP = "flash_mla_sparse_fwd"

#: Head dims of q and kv the op accepts (512 + 64 RoPE for DeepSeek V3, 448 + 64 for MODEL1).
SUPPORTED_D_QK = (512, 576)


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

    Args:
      q: bfloat16 [s_q, h_q, d_qk], d_qk 512 or 576.
      kv: bfloat16 [s_kv, 1, d_qk]; V is kv[..., :d_v].
      indices: int32 [s_q, 1, topk]; an index < 0 or >= s_kv is invalid and ignored.
      sm_scale: static float, the softmax scale (FlashMLA has no default here either).
      d_v: static int, 512.
      attn_sink: float32 [h_q], optional: out *= 1 / (1 + exp(attn_sink - lse)).
      topk_length: int32 [s_q], optional: only the first topk_length[i] indices of token i count.
      implementation: None, "cuda" or "xla" (see `flash_mla_with_kvcache`).

    Returns:
      out: bfloat16 [s_q, h_q, d_v] (0 for a query with no valid index).
      max_logits: float32 [s_q, h_q], max of sm_scale * q.k over valid keys (-inf if none).
      lse: float32 [s_q, h_q], natural-log logsumexp (+inf if no valid key).

    Raises:
      TypeError: wrong dtypes, or sm_scale / d_v not Python numbers.
      ValueError: wrong ranks or shapes, d_qk not in (512, 576), kv with h_kv != 1,
        d_v > d_qk, or implementation "cuda" where no kernel can take these inputs.
    """
    checks.check_array(OP, "q", q, ndim=3, dtypes=(jnp.bfloat16,), shape_doc="[s_q, h_q, d_qk]")
    s_q, h_q, d_qk = q.shape
    if d_qk not in SUPPORTED_D_QK:
        raise ValueError(f"{OP}: q's d_qk must be 512 or 576; got shape {q.shape}")
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
    d_v = checks.check_int(OP, "d_v", d_v, minimum=1)
    if d_v > d_qk:
        raise ValueError(f"{OP}: d_v must be <= d_qk ({d_qk}); got {d_v}")
    if attn_sink is not None:
        checks.check_array(
            OP, "attn_sink", attn_sink, dtypes=checks.FLOAT32, shape=(h_q,), shape_doc="[h_q]"
        )
    if topk_length is not None:
        checks.check_array(
            OP, "topk_length", topk_length, dtypes=checks.INT32, shape=(s_q,), shape_doc="[s_q]"
        )
    platform.choose_implementation(OP, implementation, "the sparse prefill kernel is not built yet")
    optional = {"attn_sink": (attn_sink, "h"), "topk_length": (topk_length, "t")}
    present = [name for name, (value, _) in optional.items() if value is not None]

    def compute(q, kv, indices, *rest):
        return reference.sparse_prefill(
            q, kv, indices, scale, d_v=d_v, **dict(zip(present, rest, strict=True))
        )

    # Query tokens t and heads h may be sharded; kv is replicated.
    return sharding.partitioned_call(
        OP,
        compute,
        (q, kv, indices, *(optional[n][0] for n in present)),
        ("t h d", "n k d", "t k x", *(optional[n][1] for n in present)),
        ("t h v", "t h", "t h"),
        shardable=frozenset("th"),
    )
