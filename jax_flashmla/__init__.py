"""jax_flashmla: FlashMLA-style Multi-head Latent Attention kernels for JAX.

Every op is a pure, jittable JAX function with FlashMLA's name and argument order. Each takes
`implementation=None | "cuda" | "xla"`: None runs the CUDA kernel where it supports the inputs
and the device (an sm_90 Hopper GPU), else the plain-JAX reference in `jax_flashmla.reference`.
Set JAX_FLASHMLA_FORCE_XLA=all (or a comma-separated list of op names) to send ops to their
reference for A/B debugging.
"""

from jax_flashmla._src import primitive as _primitive
from jax_flashmla._src.platform import assume_device
from jax_flashmla.ops.combine import combine_splits
from jax_flashmla.ops.decode import flash_mla_with_kvcache
from jax_flashmla.ops.dense_prefill import (
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from jax_flashmla.ops.metadata import get_mla_metadata
from jax_flashmla.ops.quant import (
    dequantize_k_cache,
    dequantize_k_cache_e4m3,
    quantize_k_cache,
    quantize_k_cache_e4m3,
)
from jax_flashmla.ops.sparse_prefill import flash_mla_sparse_fwd

#: Every XLA FFI custom-call target the ops may emit, e.g. to allow them in `jax.export`:
#: ``disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(t) for t in FFI_TARGETS]``.
#: Read from the kernel families that the ops imported above registered.
FFI_TARGETS = _primitive.ffi_targets()

__version__ = "0.1.0"

__all__ = [
    "FFI_TARGETS",
    "assume_device",
    "combine_splits",
    "dequantize_k_cache",
    "dequantize_k_cache_e4m3",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_mla_sparse_fwd",
    "flash_mla_with_kvcache",
    "get_mla_metadata",
    "quantize_k_cache",
    "quantize_k_cache_e4m3",
]
