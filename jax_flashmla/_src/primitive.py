"""Kernel families: the one mechanism by which every op reaches its kernel or its reference.

Each kernel family (one CUDA kernel and its plain-JAX equal) is one module of
`jax_flashmla._src.kernels` holding an instance of a `KernelPrimitive` subclass, which defines
- `reference`: the family's computation in plain JAX; the family's only link to
  `jax_flashmla.reference`,
- `abstract`: the kernel's result shapes, hidden workspace results last (fresh ShapedArrays,
  never `aval.update`, which keeps shardings),
- `ffi_attributes`: the static parameters the FFI handler receives.

A public op validates its inputs, asks `platform.choose_implementation` once, and then calls
the family itself, `family(*operands, use_kernel=..., **params)`:
- use_kernel=True binds the family's JAX primitive. It lowers to the XLA FFI custom call
  `ffi_target` on CUDA and to `reference` on every other platform (so a trace made under
  `assume_device` still runs on a CPU), and batches under vmap by running the kernel once per
  element of the mapped axis (the ops' own batch axes already fill the GPU).
- use_kernel=False traces `reference` inline: no primitive, so XLA fuses it with its
  neighbours and vmap batches it natively.
Either way the op sees the same results; workspace results (`workspace_results`, sized by
`abstract` so that FFI handlers never allocate) are dropped. The call usually sits inside the
op's `sharding.partitioned_call` (per-shard computation) and `forward_only` wrapper.

A family whose kernel is not built yet sets `ffi_target = None`: it has no JAX primitive and
its op always passes use_kernel=False; its optional operands may be None (an FFI handler needs
arrays: the kernel's family passes an empty array instead, as combine does for attn_sink).
Building the kernel means setting `ffi_target`, writing `abstract` and `ffi_attributes`, and
passing the op's `choose_implementation` answer as use_kernel. Every family registers itself
on construction; `ffi_targets()` lists the custom-call targets of those with a kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from jax_flashmla._src import platform

try:  # jax >= 0.4.36 keeps the eager dispatcher here; no public equivalent exists.
    from jax._src.dispatch import apply_primitive as _apply_primitive
except ImportError:  # pragma: no cover
    _apply_primitive = None

_REGISTRY: list[KernelPrimitive] = []


def registered() -> tuple[KernelPrimitive, ...]:
    """Every kernel family constructed so far (each module of _src.kernels makes one)."""
    return tuple(_REGISTRY)


def ffi_targets() -> tuple[str, ...]:
    """The XLA FFI custom-call targets of the registered families that have a kernel."""
    return tuple(k.ffi_target for k in _REGISTRY if k.ffi_target is not None)


class KernelPrimitive:
    """Base class of a kernel family; subclasses set `name` and `ffi_target` (None while the
    kernel is not built) and implement `reference`, and with a kernel `abstract` and
    `ffi_attributes`."""

    name: ClassVar[str]
    ffi_target: ClassVar[str | None]
    #: Trailing results of the kernel that are workspace: hidden from the ops.
    workspace_results: ClassVar[int] = 0

    def __init__(self) -> None:
        _REGISTRY.append(self)
        self.primitive: Primitive | None = None
        if self.ffi_target is None:
            return
        self.primitive = Primitive(self.name)
        self.primitive.multiple_results = True
        self.primitive.def_abstract_eval(self.abstract)
        if _apply_primitive is not None:
            self.primitive.def_impl(
                lambda *args, **params: _apply_primitive(self.primitive, *args, **params)
            )
        else:  # pragma: no cover
            self.primitive.def_impl(
                lambda *args, **params: jax.jit(lambda *a: self.primitive.bind(*a, **params))(*args)
            )
        mlir.register_lowering(self.primitive, self._lower_cuda, platform="cuda")
        mlir.register_lowering(
            self.primitive, mlir.lower_fun(self._reference_with_workspace, multiple_results=True)
        )
        batching.primitive_batchers[self.primitive] = self._batch

    # ---- what a family defines -------------------------------------------------------------
    def reference(self, *operands: Any, **params: Any) -> Sequence[jax.Array]:
        """The op's results (workspace excluded) computed with plain JAX."""
        raise NotImplementedError

    def abstract(self, *avals: jax.core.ShapedArray, **params: Any) -> tuple:
        """The kernel's result ShapedArrays, workspace last."""
        raise NotImplementedError

    def ffi_attributes(self, **params: Any) -> dict[str, Any]:
        """Attributes passed to the FFI handler (numpy scalars), a subset of `params`."""
        return {}

    # ---- shared machinery ------------------------------------------------------------------
    def __call__(self, *operands: Any, use_kernel: bool, **params: Any) -> tuple[jax.Array, ...]:
        """The op's results from the kernel (use_kernel) or from the inline reference."""
        if not use_kernel:
            return tuple(self.reference(*operands, **params))
        if self.primitive is None:
            raise AssertionError(f"{self.name}: the kernel is not built")
        platform.extension()  # registers the FFI targets before anything is compiled
        results = self.primitive.bind(*operands, **params)
        return tuple(results[: len(results) - self.workspace_results])

    def _reference_with_workspace(self, *args: jax.Array, **params: Any) -> tuple[jax.Array, ...]:
        # The lowering off CUDA: the reference, and zeros for the workspace nobody reads.
        results = tuple(self.reference(*args, **params))
        workspace = self.abstract(*args, **params)[len(results) :]
        return results + tuple(jnp.zeros(a.shape, a.dtype) for a in workspace)

    def _lower_cuda(self, ctx: mlir.LoweringRuleContext, *args: Any, **params: Any) -> Any:
        attributes = self.ffi_attributes(**params)
        return jax.ffi.ffi_lowering(self.ffi_target)(ctx, *args, **attributes)

    def _batch(
        self, args: Sequence[jax.Array], dims: Sequence[int | None], **params: Any
    ) -> tuple[Sequence[jax.Array], Sequence[int]]:
        size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
        mapped = [jnp.moveaxis(a, d, 0) for a, d in zip(args, dims, strict=True) if d is not None]

        def one(mapped_slices: list[jax.Array]) -> list[jax.Array]:
            slices = iter(mapped_slices)
            full = [next(slices) if d is not None else a for a, d in zip(args, dims, strict=True)]
            return self.primitive.bind(*full, **params)

        outs = jax.lax.map(one, mapped)
        assert all(o.shape[0] == size for o in outs)
        return outs, [0] * len(outs)
