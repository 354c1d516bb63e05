"""The split-KV scheduler: cache_seqlens [b] -> (tile_scheduler_metadata, num_splits)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_flashmla._src.geometry import (
    METADATA_FIELDS,
    SCHEDULER_BLOCK_TOKENS,
    SCHEDULER_FIXED_OVERHEAD,
)
from jax_flashmla._src.primitive import KernelPrimitive
from jax_flashmla.reference import schedule


class MlaMetadataKernel(KernelPrimitive):
    """cache_seqlens int32 [b] -> (tile_scheduler_metadata int32 [num_parts, METADATA_FIELDS],
    num_splits int32 [b + 1]); fixed_length >= 0 replaces every length (sparse decode)."""

    name = "jax_flashmla_mla_metadata"
    ffi_target = "jax_flashmla_mla_metadata"

    def abstract(self, cache_seqlens, *, num_parts, fixed_length):
        (b,) = cache_seqlens.shape
        return (
            jax.core.ShapedArray((num_parts, METADATA_FIELDS), jnp.int32),
            jax.core.ShapedArray((b + 1,), jnp.int32),
        )

    def reference(self, cache_seqlens, *, num_parts, fixed_length):
        return schedule.mla_metadata(
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


mla_metadata = MlaMetadataKernel()
