"""get_mla_metadata: the split-KV schedule of the decode kernels, as a jittable op."""

from __future__ import annotations

import jax

from jax_flashmla._src import checks, platform
from jax_flashmla._src.geometry import (
    INT32_MAX,
    METADATA_FIELDS,
    QUERY_TILE_ROWS,
    SCHEDULER_BLOCK_TOKENS,
)
from jax_flashmla._src.kernels.mla_metadata import mla_metadata

OP = "get_mla_metadata"


def num_sm_parts(num_q_tokens_per_head_k: int, num_heads_k: int) -> int:
    """How many parts the dense decode's KV work is split into: about one CTA per SM.

    max(num_SMs // h_kv // ceil(s_q*h_q/h_kv / 64), 1), with the SM count of the target device
    (132 on an H200; 132 is also assumed where there is no GPU).
    """
    tiles = -(-num_q_tokens_per_head_k // QUERY_TILE_ROWS)
    return max(platform.target_device().num_sms // num_heads_k // tiles, 1)


def sparse_num_sm_parts(s_q: int, h_q: int) -> int:
    """How many parts the sparse decode's work is split into: about one CTA per SM, where each
    query token and each tile of 64 heads has CTAs of its own (the tokens select different
    keys): max(num_SMs // (s_q * ceil(h_q / 64)), 1)."""
    tiles = s_q * -(-h_q // QUERY_TILE_ROWS)
    return max(platform.target_device().num_sms // tiles, 1)


def get_mla_metadata(
    cache_seqlens: jax.Array,
    num_q_tokens_per_head_k: int,
    num_heads_k: int,
    *,
    num_heads_q: int | None = None,
    is_fp8_kvcache: bool = False,
    topk: int | None = None,
    implementation: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Split-KV schedule for `flash_mla_with_kvcache`: compute once per step, reuse per layer.

    Args:
      cache_seqlens: int32 [b], KV length of each request (0 allowed). Ignored when `topk` is
        given (every request then attends `topk` keys per query).
      num_q_tokens_per_head_k: s_q * h_q // h_kv, the query rows that share one KV head.
      num_heads_k: h_kv, KV heads of the cache (1 for MLA).
      num_heads_q: h_q; checked to be a multiple of `num_heads_k` when given; required with
        `topk`.
      is_fp8_kvcache: the cache is FP8 (accepted for FlashMLA compatibility; the schedule is
        the same).
      topk: sparse decode: slots per query token (a positive multiple of 64): topk + extra_topk
        when an extra cache is attended too. Every request is scheduled for that many; a request
        whose topk_length makes it shorter finishes early (flash_mla_with_kvcache, when not given
        a schedule, makes one from the lengths instead).
      implementation: None (the CUDA scheduler on a Hopper GPU, else the reference), "cuda" or
        "xla". Both compute the identical schedule.

    Returns:
      tile_scheduler_metadata: int32 [num_sm_parts, 8]; num_sm_parts =
        max(num_SMs // h_kv // ceil(num_q_tokens_per_head_k / 64), 1), or with `topk`
        max(num_SMs // (s_q * ceil(h_q / 64)), 1), s_q = num_q_tokens_per_head_k // h_q. Row p is
        [begin_req, end_req (inclusive), begin_block, end_block (exclusive), begin_split_idx,
        begin_req is split, end_req is split, 0] (columns named by
        `jax_flashmla._src.geometry.MetadataField`), blocks being 64-token KV tiles; an empty
        part is [b, -1, 0, 0, 0, 0, 0, 0]. See `jax_flashmla.reference.schedule` for the scheme,
        which is exact for every int32 length and batch size (64-bit cost positions).
      num_splits: int32 [b + 1], exclusive prefix sum of the pieces each request is split into
        (at most b + num_sm_parts - 1 in all).

    Not differentiable; its only array is an integer one, which JAX does not differentiate.

    Raises:
      TypeError: cache_seqlens is not an int32 array; a count is not a Python int.
      ValueError: cache_seqlens is not rank 1; a count is < 1;
        num_heads_q is not a multiple of num_heads_k; topk is not a positive multiple of 64,
        comes without num_heads_q, or num_q_tokens_per_head_k is not a multiple of it;
        b + num_sm_parts > 2**31 - 1 (num_splits would not fit int32);
        implementation is unknown, or "cuda" where the kernel cannot run.
    """
    checks.check_array(
        OP, "cache_seqlens", cache_seqlens, ndim=1, dtypes=checks.INT32, shape_doc="[batch]"
    )
    rows = checks.check_int(OP, "num_q_tokens_per_head_k", num_q_tokens_per_head_k, minimum=1)
    h_kv = checks.check_int(OP, "num_heads_k", num_heads_k, minimum=1)
    h_q = None
    if num_heads_q is not None:
        h_q = checks.check_int(OP, "num_heads_q", num_heads_q, minimum=1)
        if h_q % h_kv:
            raise ValueError(
                f"{OP}: num_heads_q must be a multiple of num_heads_k; got {h_q} and {h_kv}"
            )
    checks.check_bool(OP, "is_fp8_kvcache", is_fp8_kvcache)
    fixed_length = -1
    num_parts = num_sm_parts(rows, h_kv)
    if topk is not None:
        fixed_length = checks.check_int(OP, "topk", topk, minimum=1)
        if fixed_length % SCHEDULER_BLOCK_TOKENS or fixed_length > INT32_MAX:
            raise ValueError(
                f"{OP}: topk must be a multiple of 64 and <= 2**31 - 1; got {fixed_length}"
            )
        if h_q is None or rows % h_q:
            raise ValueError(
                f"{OP}: with topk (sparse decode), num_heads_q must be given and divide "
                f"num_q_tokens_per_head_k = s_q * h_q; got num_heads_q={num_heads_q} and "
                f"num_q_tokens_per_head_k={rows}"
            )
        num_parts = sparse_num_sm_parts(rows // h_q, h_q)
    b = cache_seqlens.shape[0]
    if b + num_parts > INT32_MAX:
        raise ValueError(
            f"{OP}: batch + num_sm_parts must be <= 2**31 - 1 (num_splits is int32); got "
            f"{b} + {num_parts}"
        )
    use_kernel = platform.choose_implementation(OP, implementation) == "cuda"
    metadata, num_splits = mla_metadata(
        cache_seqlens, use_kernel=use_kernel, num_parts=num_parts, fixed_length=fixed_length
    )
    assert metadata.shape == (num_parts, METADATA_FIELDS)
    return metadata, num_splits
