"""Forward-only ops: differentiating one raises an error that says where gradients are.

The decode and combine ops have no derivative rules (their kernels have no backward). Each
public op passes its arrays through `forward_only`, a `jax.custom_jvp` whose rule raises:
jax.grad, jax.jvp, jax.vjp and jax.linearize all reach that rule as soon as a differentiated
value flows into the op, on the kernel path and on the reference path alike. jit, vmap,
shard_map, pmap and the sharding rules see the wrapped function unchanged.

JAX never differentiates integer inputs, so get_mla_metadata (whose only array is int32) needs
no wrapper: jax.grad rejects an integer argument itself, and jax.jvp / jax.vjp give float0
tangents.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

#: The ops of this package that have gradients.
DIFFERENTIABLE_OPS = (
    "flash_mla_sparse_fwd",
    "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
)


def forward_only(
    op: str, fn: Callable[..., tuple[jax.Array, ...]]
) -> Callable[..., tuple[jax.Array, ...]]:
    """fn(*arrays) -> tuple of arrays, made to raise a TypeError naming `op` when differentiated."""

    @jax.custom_jvp
    def wrapped(*arrays):
        return tuple(fn(*arrays))

    @wrapped.defjvp
    def _no_derivative(primals, tangents):
        raise TypeError(
            f"{op} is forward-only: it cannot be differentiated (jax.grad, jax.jvp, jax.vjp). "
            f"The differentiable ops of jax_flashmla are {', '.join(DIFFERENTIABLE_OPS)}; "
            f"wrap {op}'s inputs in jax.lax.stop_gradient to use it as a constant."
        )

    return wrapped
