"""Kernel primitives: one class per CUDA kernel, each with the same small set of methods.

A `KernelPrimitive` owns a JAX primitive that
- computes its output shapes (`abstract`),
- lowers to its XLA FFI custom call on CUDA (`ffi_attributes` says what the handler gets),
- lowers to its plain-JAX `reference` on every other platform, so that the primitive is a
  complete description of the computation wherever it is traced,
- batches under vmap by running the kernel once per element of the mapped axis (the ops'
  own batch axes already fill the GPU).

Workspaces and scheduler metadata are explicit outputs sized by `abstract`: FFI handlers never
allocate. The public ops in `jax_flashmla.ops` validate inputs and then call `bind`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from jax_flashmla._src import platform

try:  # jax >= 0.4.36 keeps the eager dispatcher here; no public equivalent exists.
    from jax._src.dispatch import apply_primitive as _apply_primitive
except ImportError:  # pragma: no cover
    _apply_primitive = None


class KernelPrimitive:
    """Base class: subclasses set `name` and `ffi_target` and implement the three methods."""

    name: ClassVar[str]
    ffi_target: ClassVar[str]

    def __init__(self) -> None:
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
            self.primitive, mlir.lower_fun(self._reference_tuple, multiple_results=True)
        )
        batching.primitive_batchers[self.primitive] = self._batch

    # ---- what a kernel defines -------------------------------------------------------------
    def abstract(self, *avals: jax.core.ShapedArray, **params: Any) -> tuple:
        """Output ShapedArrays (fresh ones: never `aval.update`, which keeps shardings)."""
        raise NotImplementedError

    def reference(self, *args: jax.Array, **params: Any) -> Sequence[jax.Array]:
        """The same outputs computed with plain JAX."""
        raise NotImplementedError

    def ffi_attributes(self, **params: Any) -> dict[str, Any]:
        """Attributes passed to the FFI handler (numpy scalars), a subset of `params`."""
        return {}

    # ---- shared machinery ------------------------------------------------------------------
    def bind(self, *args: jax.Array, **params: Any) -> list[jax.Array]:
        platform.extension()  # registers the FFI targets before anything is compiled
        return self.primitive.bind(*args, **params)

    def _reference_tuple(self, *args: jax.Array, **params: Any) -> tuple[jax.Array, ...]:
        return tuple(self.reference(*args, **params))

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


# ---- the split-KV scheduler -------------------------------------------------------------------
#: Tokens per scheduling unit (one KV tile of the decode kernels).
SCHEDULER_BLOCK_TOKENS = 64
#: Fixed cost of a request, in blocks: loading its queries, writing and combining its output.
SCHEDULER_FIXED_OVERHEAD = 5
#: int32 fields per part in tile_scheduler_metadata.
METADATA_FIELDS = 8


class MlaMetadataPrimitive(KernelPrimitive):
    """cache_seqlens [b] -> (tile_scheduler_metadata [num_parts, 8], num_splits [b+1])."""

    name = "jax_flashmla_mla_metadata"
    ffi_target = "jax_flashmla_mla_metadata"

    def abstract(self, cache_seqlens, *, num_parts, fixed_length):
        (b,) = cache_seqlens.shape
        return (
            jax.core.ShapedArray((num_parts, METADATA_FIELDS), jnp.int32),
            jax.core.ShapedArray((b + 1,), jnp.int32),
        )

    def reference(self, cache_seqlens, *, num_parts, fixed_length):
        from jax_flashmla.reference.schedule import mla_metadata

        return mla_metadata(
            cache_seqlens,
            num_parts=num_parts,
            block_tokens=SCHEDULER_BLOCK_TOKENS,
            fixed_overhead=SCHEDULER_FIXED_OVERHEAD,
            fixed_length=fixed_length,
        )

    def ffi_attributes(self, *, num_parts, fixed_length):
        return {
            "block_tokens": np.int64(SCHEDULER_BLOCK_TOKENS),
            "fixed_overhead": np.int64(SCHEDULER_FIXED_OVERHEAD),
            "fixed_length": np.int64(fixed_length),
        }


class CombinePrimitive(KernelPrimitive):
    """Merges split-KV partials: (partial_o, partial_lse, num_splits, attn_sink) -> (out, lse).

    partial_o f32 [R, s_q, h_q, d_v], partial_lse f32 [R, s_q, h_q], num_splits int32 [b+1],
    attn_sink f32 [h_q] or [0] (no sink); out [b, s_q, h_q, d_v] in `out_dtype`,
    lse f32 [b, h_q, s_q].
    """

    name = "jax_flashmla_combine"
    ffi_target = "jax_flashmla_combine"

    def abstract(self, partial_o, partial_lse, num_splits, attn_sink, *, out_dtype):
        _, s_q, h_q, d_v = partial_o.shape
        b = num_splits.shape[0] - 1
        return (
            jax.core.ShapedArray((b, s_q, h_q, d_v), out_dtype),
            jax.core.ShapedArray((b, h_q, s_q), jnp.float32),
        )

    def reference(self, partial_o, partial_lse, num_splits, attn_sink, *, out_dtype):
        from jax_flashmla.reference.schedule import combine_splits

        sink = attn_sink if attn_sink.shape[0] else None
        return combine_splits(partial_o, partial_lse, num_splits, sink, out_dtype=out_dtype)


mla_metadata_p = MlaMetadataPrimitive()
combine_p = CombinePrimitive()


#: Geometry of the dense decode kernel: d_qk 576 (512 latent + 64 RoPE), d_v 512, page 64.
DECODE_HEAD_DIM_QK = 576
DECODE_HEAD_DIM_V = 512
DECODE_PAGE_SIZE = 64


class DenseDecodePrimitive(KernelPrimitive):
    """Hopper dense decode: (q, k_cache, block_table, cache_seqlens, metadata, num_splits)
    -> (out, lse, partial_o, partial_lse); the last two are the split-KV workspace."""

    name = "jax_flashmla_decode_dense"
    ffi_target = "jax_flashmla_decode_dense_sm90"

    def abstract(
        self, q, k_cache, block_table, cache_seqlens, metadata, num_splits, *, softmax_scale, causal
    ):
        b, s_q, h_q, _ = q.shape
        rows = b + metadata.shape[0]
        return (
            jax.core.ShapedArray((b, s_q, h_q, DECODE_HEAD_DIM_V), q.dtype),
            jax.core.ShapedArray((b, h_q, s_q), jnp.float32),
            jax.core.ShapedArray((rows, s_q, h_q, DECODE_HEAD_DIM_V), jnp.float32),
            jax.core.ShapedArray((rows, s_q, h_q), jnp.float32),
        )

    def reference(
        self, q, k_cache, block_table, cache_seqlens, metadata, num_splits, *, softmax_scale, causal
    ):
        from jax_flashmla.reference.decode import dense_decode

        out, lse = dense_decode(
            q,
            k_cache,
            block_table,
            cache_seqlens,
            head_dim_v=DECODE_HEAD_DIM_V,
            softmax_scale=softmax_scale,
            causal=causal,
        )
        _, _, partial_o, partial_lse = self.abstract(
            q,
            k_cache,
            block_table,
            cache_seqlens,
            metadata,
            num_splits,
            softmax_scale=softmax_scale,
            causal=causal,
        )
        return (
            out,
            lse,
            jnp.zeros(partial_o.shape, partial_o.dtype),
            jnp.zeros(partial_lse.shape, partial_lse.dtype),
        )

    def ffi_attributes(self, *, softmax_scale, causal):
        return {"softmax_scale": np.float32(softmax_scale), "causal": bool(causal)}


dense_decode_p = DenseDecodePrimitive()

#: Every XLA FFI custom-call target the ops may emit, e.g. to allow them in `jax.export`:
#: ``disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(t) for t in FFI_TARGETS]``.
FFI_TARGETS = tuple(p.ffi_target for p in (mla_metadata_p, combine_p, dense_decode_p))
