"""flash_mla_sparse_fwd: sparse (top-k) MLA prefill attention over a BF16 KV array, with its
gradient."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jax_flashmla._src import checks, platform, sharding
from jax_flashmla._src.geometry import HEAD_DIM_V, SPARSE_HEAD_DIMS_QK
from jax_flashmla._src.kernels import prefill_sparse as family
from jax_flashmla._src.kernels import prefill_sparse_backward
from jax_flashmla.reference import sparse_prefill as reference

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
    deterministic: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sparse MLA prefill: query token i attends the keys kv[indices[i, 0, :topk_length[i]]].

    There is no batch axis: batch by concatenating tokens and offsetting indices.
    Differentiable with respect to q, kv and attn_sink through out and lse (jax.grad,
    jax.vjp); max_logits carries no gradient (see Raises). A query with nothing selected gets
    zero gradients. On a Hopper GPU the gradient runs on its own kernel, whose dkv is summed
    with atomic additions: in float32 (its last bits may differ between runs), or with
    `deterministic` in 64-bit fixed point (bitwise repeatable, slower). Elsewhere it is JAX's
    derivative of the reference.

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
      deterministic: static bool, whether the kernel's gradient is bitwise repeatable (dkv
        summed in 64-bit fixed point, scaled by a power of two from a bound of its addends;
        docs/ops.md). The reference's gradient follows XLA's own settings
        (--xla_gpu_deterministic_ops on a GPU).

    Returns:
      out: bfloat16 [s_q, h_q, d_v] (0 for a query with no valid index).
      max_logits: float32 [s_q, h_q], max of sm_scale * q.k over valid keys (-inf if none).
      lse: float32 [s_q, h_q], natural-log logsumexp (+inf if no valid key).

    Raises:
      TypeError: an array argument is not an array (or None where None is allowed) or has a
        wrong dtype; sm_scale / d_v are not Python numbers; a gradient is asked through
        max_logits (wrap it in jax.lax.stop_gradient).
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
    config = _Config(scale, use_kernel, checks.check_bool(OP, "deterministic", deterministic))
    return _sparse_prefill(config, q, kv, indices, attn_sink, topk_length)


class _Config(NamedTuple):
    scale: float
    use_kernel: bool
    deterministic: bool


# The dims of every array the forward and the backward take: query tokens t and heads h may be
# sharded; kv is replicated.
_DIMS = {
    "q": "t h d",
    "kv": "n k d",
    "indices": "t k x",
    "attn_sink": "h",
    "topk_length": "t",
    "out": "t h v",
    "lse": "t h",
    "d_out": "t h v",
    "d_lse": "t h",
}
_SHARDABLE = frozenset("th")


def _partitioned(fn, named, out_dims, local_fn=None):
    """sharding.partitioned_call over the named arrays that are present (not None)."""
    present = [name for name, value in named.items() if value is not None]

    def call(*arrays):
        return fn(**dict(zip(present, arrays, strict=True)))

    def local(axes):
        sharded = local_fn(axes)
        return lambda *arrays: sharded(**dict(zip(present, arrays, strict=True)))

    return sharding.partitioned_call(
        OP,
        call,
        tuple(named[name] for name in present),
        tuple(_DIMS[name] for name in present),
        out_dims,
        shardable=_SHARDABLE,
        local_fn=None if local_fn is None else local,
    )


def _forward(config, q, kv, indices, attn_sink, topk_length):
    def compute(q, kv, indices, attn_sink=None, topk_length=None):
        return family.prefill_sparse(
            q,
            kv,
            indices,
            family.sink_placeholder(attn_sink),
            family.lengths_placeholder(topk_length),
            use_kernel=config.use_kernel,
            sm_scale=config.scale,
        )

    named = {
        "q": q,
        "kv": kv,
        "indices": indices,
        "attn_sink": attn_sink,
        "topk_length": topk_length,
    }
    return _partitioned(compute, named, ("t h v", "t h", "t h"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sparse_prefill(config, q, kv, indices, attn_sink, topk_length):
    return _forward(config, q, kv, indices, attn_sink, topk_length)


def _sparse_prefill_fwd(config, q, kv, indices, attn_sink, topk_length):
    # symbolic_zeros: every array argument comes wrapped (CustomVJPPrimal).
    arrays = [None if x is None else x.value for x in (q, kv, indices, attn_sink, topk_length)]
    out, max_logits, lse = _forward(config, *arrays)
    return (out, max_logits, lse), (*arrays, out, lse)


def _gradients(config, q, kv, indices, out, lse, d_out, d_lse, attn_sink=None, topk_length=None):
    """dq, dkv (float32) and d_sink (float32, or None without a sink) of one shard."""
    if not config.use_kernel:
        # JAX's derivative of the reference, in float32 (the reference computes in it).
        def forward(q, kv, sink):
            return reference.sparse_prefill(
                q, kv, indices, config.scale, attn_sink=sink, topk_length=topk_length
            )

        f32 = (q.astype(jnp.float32), kv.astype(jnp.float32), attn_sink)
        (_, max_logits, _), pullback = jax.vjp(forward, *f32)
        cotangents = (d_out.astype(jnp.float32), jnp.zeros_like(max_logits), d_lse)
        return pullback(cotangents)
    # The kernel takes the sink and lse's cotangent folded in (prefill_sparse_backward.cuh):
    # with f = 1 / (1 + exp(sink - lse)) and D = sum(d_out * out), it gets f * d_out and
    # d_lse - f * D; d_sink = -sum over tokens of (1 - f) D.
    lonely = lse == jnp.inf
    d_rows = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    factor = jnp.ones_like(lse)
    if attn_sink is not None:
        factor = jnp.where(lonely, 1.0, jax.nn.sigmoid(jnp.where(lonely, 0.0, lse - attn_sink)))
    row_shift = jnp.where(lonely, 0.0, d_lse - factor * d_rows)
    d_out = (factor[..., None] * d_out.astype(jnp.float32)).astype(jnp.bfloat16)
    fixed_scale = jnp.zeros((0,), jnp.float32)  # float32 sums
    if config.deterministic:
        fixed_scale = prefill_sparse_backward.fixed_point_scale(
            q, kv, indices, topk_length, d_out, row_shift, config.scale
        )
    dq, dkv = prefill_sparse_backward.prefill_sparse_backward(
        q,
        kv,
        indices,
        family.lengths_placeholder(topk_length),
        d_out,
        lse,
        row_shift,
        fixed_scale,
        use_kernel=True,
        sm_scale=config.scale,
    )
    d_sink = None if attn_sink is None else -jnp.sum((1.0 - factor) * d_rows, axis=0)
    return dq, dkv, d_sink


def _sparse_prefill_bwd(config, residuals, cotangents):
    q, kv, indices, attn_sink, topk_length, out, lse = residuals
    d_out, d_max_logits, d_lse = cotangents
    if not isinstance(d_max_logits, SymbolicZero):
        raise TypeError(
            f"{OP}: max_logits has no gradient; wrap it in jax.lax.stop_gradient where it "
            "enters what is differentiated (out and lse are differentiable)"
        )
    if isinstance(d_out, SymbolicZero):
        d_out = jnp.zeros(out.shape, out.dtype)
    if isinstance(d_lse, SymbolicZero):
        d_lse = jnp.zeros(lse.shape, lse.dtype)

    def finish(sum_axes):
        # kv is replicated: each shard holds part of dkv, and of d_sink where tokens are
        # split; both are summed in float32 and rounded once.
        def grads(**arrays):
            dq, dkv, d_sink = _gradients(config, **arrays)
            if sum_axes:
                dkv = jax.lax.psum(dkv, sum_axes["kv"])
                if d_sink is not None and sum_axes["sink"]:
                    d_sink = jax.lax.psum(d_sink, sum_axes["sink"])
            results = (dq.astype(q.dtype), dkv.astype(kv.dtype))
            return results if d_sink is None else (*results, d_sink)

        return grads

    def local(axes):
        tokens = axes.get("t", ())
        return finish({"kv": tokens + axes.get("h", ()), "sink": tokens})

    named = {
        "q": q,
        "kv": kv,
        "indices": indices,
        "out": out,
        "lse": lse,
        "d_out": d_out,
        "d_lse": d_lse,
        "attn_sink": attn_sink,
        "topk_length": topk_length,
    }
    out_dims = ("t h d", "n k d") + (() if attn_sink is None else ("h",))
    grads = _partitioned(finish(None), named, out_dims, local_fn=local)
    d_sink = None if attn_sink is None else grads[2]
    return grads[0], grads[1], None, d_sink, None


_sparse_prefill.defvjp(_sparse_prefill_fwd, _sparse_prefill_bwd, symbolic_zeros=True)
