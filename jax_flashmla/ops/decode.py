"""flash_mla_with_kvcache: MLA decoding over a paged KV cache (dense BF16/FP16 or sparse FP8)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_flashmla._src import checks, platform, sharding
from jax_flashmla._src.forward_only import forward_only
from jax_flashmla._src.geometry import (
    HEAD_DIM_QK,
    HEAD_DIM_V,
    INT32_MAX,
    METADATA_FIELDS,
    SPARSE_HEAD_DIMS_QK,
)
from jax_flashmla._src.kernels import decode_dense, decode_sparse, mla_metadata
from jax_flashmla.ops import metadata as metadata_op
from jax_flashmla.ops import quant

OP = "flash_mla_with_kvcache"

FP8_CACHE_DTYPES = (jnp.float8_e4m3fn, jnp.uint8)

#: Multiple that topk (and extra_topk) must be, as for FlashMLA's sparse kernels.
TOPK_MULTIPLE = 64


def flash_mla_with_kvcache(
    q: jax.Array,
    k_cache: jax.Array,
    block_table: jax.Array | None,
    cache_seqlens: jax.Array | None,
    head_dim_v: int,
    tile_scheduler_metadata: jax.Array | None = None,
    num_splits: jax.Array | None = None,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    fp8_layout: str | None = None,
    k_scale: jax.Array | None = None,
    indices: jax.Array | None = None,
    attn_sink: jax.Array | None = None,
    topk_length: jax.Array | None = None,
    extra_k_cache: jax.Array | None = None,
    extra_indices_in_kvcache: jax.Array | None = None,
    extra_topk_length: jax.Array | None = None,
    implementation: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """MLA decode attention over a paged KV cache. Returns (out, lse).

    Dense mode (indices None). Request i has the effective length
    L_i = clamp(cache_seqlens[i], 0, max_blocks_per_seq * page): a negative length counts as 0
    and a length past what the block table covers is cut to its capacity. Its token t < L_i
    lives in row t % page of physical block block_table[i, t // page]. Query j of s_q sees the
    keys t < L_i (and, if causal, t <= L_i - s_q + j: bottom-right aligned) whose block id
    lies in [0, num_blocks); a token whose block id lies outside is masked (never read, never
    attended) as a token past the end would be. Block-table entries past ceil(L_i / page) are
    never read.

    Sparse mode (indices given, FP8 cache): query token j of request i attends the keys
    indices[i, j, :L_i] with L_i = clamp(topk_length[i], 0, topk) (all topk slots without
    topk_length), value = physical_block * page + offset; a value outside
    [0, num_blocks * page) (FlashMLA uses -1) selects nothing and is never read; duplicated
    values count twice. The same holds for extra_indices_in_kvcache into extra_k_cache (with
    extra_topk_length), whose keys join the same softmax. The cache is dequantised on chip.

    FP8 caches (is_fp8_kvcache=True): the byte layouts "V32" (656 bytes per token, d_qk 576;
    dense and sparse mode) and "MODEL1" (584, d_qk 512; sparse mode) with their scales inside,
    made by `jax_flashmla.quantize_k_cache`; or "E4M3" (dense mode), a plain float8_e4m3fn
    [num_blocks, page, h_kv, 576] cache with float32 `k_scale` beside it, made by
    `jax_flashmla.quantize_k_cache_e4m3`. Either way the op attends the dequantised cache.

    A query with no key to attend gets out 0 and lse +inf. Forward-only: differentiating the
    op raises a TypeError (flash_attn_varlen_func has gradients).

    Args:
      q: [b, s_q, h_q, d_qk], bfloat16 or float16 (bfloat16 with an FP8 cache). d_qk is 576
        (dense mode, or sparse mode with the "V32" cache) or 512 (sparse mode, "MODEL1").
      k_cache: dense: [num_blocks, page, h_kv, d_qk], q's dtype, h_q % h_kv == 0. With
        is_fp8_kvcache: float8_e4m3fn (or uint8) [num_blocks, page, 1, 656] ("V32" layout,
        d_qk 576) or [num_blocks, page, 1, 584] ("MODEL1", d_qk 512); see
        `jax_flashmla.quantize_k_cache`; or, dense mode, float8_e4m3fn (or uint8)
        [num_blocks, page, h_kv, 576] ("E4M3", with k_scale).
      block_table: int32 [b, max_blocks_per_seq] (dense); must be None in sparse mode.
      cache_seqlens: int32 [b] (dense); must be None in sparse mode.
      head_dim_v: d_v, 512 (V is the first 512 dims of each cache row).
      tile_scheduler_metadata, num_splits: from `get_mla_metadata` for these shapes, or both
        None to compute them here (sparse mode: get_mla_metadata(any int32 [b], s_q * h_q, 1,
        num_heads_q=h_q, topk=topk + extra_topk); without them the schedule is made from
        topk_length and extra_topk_length, so shorter requests take less time). Reuse one
        pair for every layer of a decode step. When the call is sharded over batch or heads,
        each shard schedules its own part instead (a schedule cannot be sliced); inside
        shard_map, compute them per device.
      softmax_scale: static float finite in float32 (zero and negative allowed), default
        d_qk ** -0.5.
      causal: static bool, bottom-right causal mask over the s_q queries (dense mode only).
      is_fp8_kvcache: static bool, the cache is FP8 (required in sparse mode; in dense mode
        the sparse kernel reads a V32 or E4M3 cache over each query's positions, once per KV
        head of an E4M3 cache; the kernel path makes its own schedule, so a given one is
        checked but not used).
      fp8_layout: static str or None, with is_fp8_kvcache: "V32", "MODEL1" or "E4M3"; None
        takes it from the cache's last dim (656: V32, 584: MODEL1, 576: E4M3).
      k_scale: float32 [], [1] or [h_kv]: the scale of an "E4M3" cache (one for the cache or
        one per KV head), required with it and refused otherwise.
      indices: int32 [b, s_q, topk], topk a multiple of 64 (sparse mode).
      attn_sink: float32 [h_q]: out *= 1 / (1 + exp(attn_sink - lse)); lse is unchanged.
      topk_length: int32 [b], keys of `indices` that count per request (sparse mode).
      extra_k_cache: second FP8 cache with its own page size, same layout (sparse mode).
      extra_indices_in_kvcache: int32 [b, s_q, extra_topk] into extra_k_cache.
      extra_topk_length: int32 [b].
      implementation: None (the kernel when it supports the inputs and device, else the XLA
        reference), "cuda" (the kernel or a ValueError saying why not) or "xla".

    Returns:
      out: [b, s_q, h_q, 512] in q's dtype; 0 for a query with no key to attend.
      lse: float32 [b, h_q, s_q], natural-log logsumexp of softmax_scale * q.k; +inf for a
        query with no key.

    Raises:
      TypeError: an array argument is not an array (or None where None is allowed) or has
        the wrong dtype; a static argument is not a Python value of its type.
      ValueError: a rank or shape is wrong, the head dims are not those of the mode,
        h_q % h_kv != 0, the batch sizes differ, the metadata was built for other shapes,
        topk is not a multiple of 64, a sparse-only argument is given in dense mode (or the
        reverse), or implementation is "cuda" where no kernel can take these inputs (e.g. a
        size past one of the kernel's limits: h_kv or query tiles per KV head > 65535,
        b * s_q, num_blocks * page or b + num_sm_parts > 2**31 - 1; sparse mode: s_q or
        ceil(h_q / 64) > 65535, b * s_q or b + num_sm_parts > 2**31 - 1).
    """
    optional_arrays = {
        "block_table": block_table,
        "cache_seqlens": cache_seqlens,
        "tile_scheduler_metadata": tile_scheduler_metadata,
        "num_splits": num_splits,
        "indices": indices,
        "attn_sink": attn_sink,
        "topk_length": topk_length,
        "extra_k_cache": extra_k_cache,
        "extra_indices_in_kvcache": extra_indices_in_kvcache,
        "extra_topk_length": extra_topk_length,
        "k_scale": k_scale,
    }
    checks.check_array(
        OP, "q", q, ndim=4, dtypes=checks.FLOAT16_TYPES, shape_doc="[batch, s_q, h_q, d_qk]"
    )
    checks.check_array(
        OP,
        "k_cache",
        k_cache,
        ndim=4,
        shape_doc="[num_blocks, page_block_size, h_kv, d_qk or bytes per token]",
    )
    for name, value in optional_arrays.items():
        if value is not None:
            checks.check_array(OP, name, value)
    d_v = checks.check_int(OP, "head_dim_v", head_dim_v, minimum=1)
    causal = checks.check_bool(OP, "causal", causal)
    is_fp8 = checks.check_bool(OP, "is_fp8_kvcache", is_fp8_kvcache)
    _, s_q, h_q, d_qk = q.shape
    if s_q < 1 or h_q < 1:
        raise ValueError(f"{OP}: q must have s_q >= 1 and h_q >= 1; got shape {q.shape}")
    scale = checks.check_scale(OP, "softmax_scale", softmax_scale, d_qk**-0.5)
    _check_head_dims(d_qk, d_v, sparse=indices is not None)
    layout = None
    if fp8_layout is not None and not is_fp8:
        raise ValueError(f"{OP}: fp8_layout needs is_fp8_kvcache=True; got {fp8_layout!r}")
    if is_fp8:
        checks.check_array(OP, "q", q, dtypes=(jnp.bfloat16,))
        checks.check_array(OP, "k_cache", k_cache, dtypes=FP8_CACHE_DTYPES)
        layout = _fp8_layout("k_cache", k_cache, d_qk, fp8_layout)
    else:
        checks.check_array(OP, "k_cache", k_cache, dtypes=(q.dtype,))
        if k_cache.shape[-1] != d_qk:
            raise ValueError(
                f"{OP}: k_cache must have d_qk = {d_qk} (q's last dim); got shape {k_cache.shape}"
            )
    h_kv = k_cache.shape[2]
    if h_kv < 1 or h_q % h_kv:
        raise ValueError(f"{OP}: h_q must be a multiple of h_kv; got h_q={h_q}, h_kv={h_kv}")
    if k_cache.shape[1] < 1:
        raise ValueError(f"{OP}: k_cache page_block_size must be >= 1; got {k_cache.shape}")
    sparse_args = {name: optional_arrays[name] for name in _SPARSE_DIMS}

    if indices is None:
        for name, value in sparse_args.items():
            if value is not None:
                raise ValueError(f"{OP}: {name} is only accepted in sparse mode (with indices)")
        _check_dense_inputs(q, block_table, cache_seqlens)
    else:
        if not is_fp8:
            raise ValueError(f"{OP}: sparse mode (indices given) needs is_fp8_kvcache=True")
        if causal:
            raise ValueError(f"{OP}: causal must be False in sparse mode (indices given)")
        if layout == quant.SCALED_LAYOUT:
            raise ValueError(
                f"{OP}: sparse mode (indices given) reads the V32 or MODEL1 FP8 layouts; the "
                f"{quant.SCALED_LAYOUT} cache is for dense mode"
            )
        if block_table is not None or cache_seqlens is not None:
            raise ValueError(
                f"{OP}: block_table and cache_seqlens must be None in sparse mode: indices "
                "already hold physical_block * page + offset"
            )
        _check_sparse_inputs(q, k_cache, indices, sparse_args)
        if extra_k_cache is not None:
            _fp8_layout("extra_k_cache", extra_k_cache, d_qk, layout)

    _check_k_scale(layout, k_scale, h_kv)
    _check_metadata(q, h_kv, tile_scheduler_metadata, num_splits, sparse=indices is not None)
    metadata = () if tile_scheduler_metadata is None else (tile_scheduler_metadata, num_splits)

    if indices is None:
        reason = _dense_kernel_unsupported_reason(q, k_cache, layout)
        use_kernel = platform.choose_implementation(OP, implementation, reason) == "cuda"
        if use_kernel and layout is not None:
            compute = functools.partial(
                _dense_fp8_decode, softmax_scale=scale, causal=causal, layout=layout
            )
            scales = () if k_scale is None else (jnp.broadcast_to(jnp.ravel(k_scale), (h_kv,)),)
            return forward_only(OP, compute)(q, k_cache, block_table, cache_seqlens, *scales)
        cache = k_cache
        if layout == quant.SCALED_LAYOUT:
            cache = quant.dequantize_k_cache_e4m3(k_cache, k_scale, dtype=jnp.bfloat16)
        elif is_fp8:
            cache = quant.dequantize_k_cache(k_cache, layout=layout, dtype=jnp.bfloat16)
        compute = functools.partial(
            _dense_decode, softmax_scale=scale, causal=causal, use_kernel=use_kernel
        )
        return forward_only(OP, compute)(q, cache, block_table, cache_seqlens, *metadata)
    b, s_q, h_q, _ = q.shape
    reason = decode_sparse.launch_limit_error(
        batch=b, s_q=s_q, h_q=h_q, num_parts=metadata_op.sparse_num_sm_parts(s_q, h_q)
    )
    use_kernel = platform.choose_implementation(OP, implementation, reason) == "cuda"
    present = [name for name, value in sparse_args.items() if value is not None]
    compute = functools.partial(
        _sparse_decode,
        present=tuple(present),
        softmax_scale=scale,
        layout=layout,
        use_kernel=use_kernel,
    )
    optional = (sparse_args[name] for name in present)
    return forward_only(OP, compute)(q, k_cache, indices, *optional, *metadata)


# Dims of the decode operands for the sharding rules (jax_flashmla._src.sharding): batch b,
# query heads (k g) = KV heads x heads per KV head. Batch and heads may be sharded; the cache
# is replicated, or split along its KV heads together with the query heads.
_DECODE_RESULT_DIMS = ("b s (k g) v", "b (k g) s")


def _dense_decode(
    q, cache, block_table, cache_seqlens, *metadata, softmax_scale, causal, use_kernel
):
    """Dense decode on the kernel or the reference, partitioned over batch and heads."""
    h_q, h_kv = q.shape[2], cache.shape[2]

    def compute(q, cache, block_table, cache_seqlens, *metadata):
        if use_kernel and not metadata:
            local_h_q, local_h_kv = q.shape[2], cache.shape[2]
            metadata = metadata_op.get_mla_metadata(
                cache_seqlens,
                q.shape[1] * local_h_q // local_h_kv,
                local_h_kv,
                implementation="cuda",
            )
        return decode_dense.decode_dense(
            q,
            cache,
            block_table,
            cache_seqlens,
            *(metadata or (None, None)),
            use_kernel=use_kernel,
            softmax_scale=softmax_scale,
            causal=causal,
        )

    def per_shard(factor_axes):
        # A schedule covers the whole batch at the global head count: each shard makes its own.
        return lambda q, cache, block_table, cache_seqlens, *metadata: compute(
            q, cache, block_table, cache_seqlens
        )

    return sharding.partitioned_call(
        OP,
        compute,
        (q, cache, block_table, cache_seqlens, *metadata),
        ("b s (k g) d", "n p k d", "b m", "b", *(("o f", "c") if metadata else ())),
        _DECODE_RESULT_DIMS,
        shardable=frozenset({"b", sharding.head_factor(h_kv)}),
        given_sizes={"g": h_q // h_kv},
        local_fn=per_shard if metadata else None,
    )


def _dense_fp8_decode(
    q, cache, block_table, cache_seqlens, *k_scale, softmax_scale, causal, layout
):
    """Dense decode of an FP8 cache (V32, or E4M3 with its k_scale [h_kv]) on the sparse decode
    kernel, which dequantises on chip: each query token's visible positions, mapped through the
    block table, are its indices. Each KV head of an E4M3 cache is one kernel call with its
    query heads and its scale, over the cache read as one KV head (_kv_head_tokens).
    Partitioned over batch and heads; the schedule is made from the lengths (a schedule from
    get_mla_metadata for the dense kernel does not fit the sparse kernel's grid)."""
    h_q, h_kv = q.shape[2], cache.shape[2]

    def compute(q, cache, block_table, cache_seqlens, *k_scale):
        num_blocks, page, kv_heads, _ = cache.shape
        group = q.shape[2] // kv_heads
        positions, lengths = _positions_as_indices(
            block_table,
            cache_seqlens,
            s_q=q.shape[1],
            page=page,
            num_blocks=num_blocks,
            causal=causal,
        )
        given = {"topk_length": lengths}
        schedule = _sparse_schedule(q[:, :, :group], positions, given)
        results = []
        for head in range(kv_heads):
            tokens, indices = _kv_head_tokens(cache, positions, head)
            operands = decode_sparse.with_placeholders(
                q[:, :, head * group : (head + 1) * group],
                tokens,
                indices,
                lengths,
                None,
                None,
                None,
                None,
                *(scale[head : head + 1] for scale in k_scale),
            )
            results.append(
                decode_sparse.decode_sparse(
                    *operands,
                    *schedule,
                    use_kernel=True,
                    softmax_scale=softmax_scale,
                    layout=layout,
                )
            )
        outs, lses = zip(*results, strict=True)
        return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=1)

    return sharding.partitioned_call(
        OP,
        compute,
        (q, cache, block_table, cache_seqlens, *k_scale),
        ("b s (k g) d", "n p k d", "b m", "b", *("k" for _ in k_scale)),
        _DECODE_RESULT_DIMS,
        shardable=frozenset({"b", sharding.head_factor(h_kv)}),
        given_sizes={"g": h_q // h_kv},
    )


def _kv_head_tokens(cache, positions, head: int) -> tuple[jax.Array, jax.Array]:
    """KV head `head` of a [num_blocks, page, h_kv, d] cache as the sparse kernel reads it: the
    cache viewed as one KV head of page * h_kv tokens per block (no copy: token t of KV head k
    is its token t * h_kv + k), and `positions` (tokens of the cache, -1 for none) as indices
    into that view. No overflow: num_blocks * page * h_kv <= 2**31 - 1
    (_dense_kernel_unsupported_reason)."""
    num_blocks, page, h_kv, d = cache.shape
    if h_kv == 1:
        return cache, positions
    tokens = jnp.reshape(cache, (num_blocks, page * h_kv, 1, d))
    return tokens, jnp.where(positions >= 0, positions * h_kv + head, -1)


def _positions_as_indices(
    block_table, cache_seqlens, *, s_q: int, page: int, num_blocks: int, causal: bool
) -> tuple[jax.Array, jax.Array]:
    """Dense mode's keys as sparse indices: int32 [b, s_q, topk] (topk = the table's capacity
    rounded up to a multiple of TOPK_MULTIPLE) holding block_table[i, t // page] * page +
    t % page for each position t that query j of request i sees, -1 elsewhere (past its length,
    causal, or behind a block id outside [0, num_blocks)); and the lengths, clamped to
    [0, capacity], as topk_length."""
    b, max_blocks = block_table.shape
    capacity = max_blocks * page
    topk = max(-(-capacity // TOPK_MULTIPLE), 1) * TOPK_MULTIPLE  # the kernel takes topk >= 64
    lengths = jnp.clip(cache_seqlens, 0, capacity)
    pos = jnp.arange(topk, dtype=jnp.int32)
    if max_blocks == 0:
        return jnp.full((b, s_q, topk), -1, jnp.int32), lengths
    block = block_table[:, jnp.minimum(pos // page, max_blocks - 1)]  # [b, topk]
    known = (block >= 0) & (block < num_blocks)
    # No overflow where known: num_blocks * page <= 2**31 - 1 (_dense_kernel_unsupported_reason).
    token = jnp.where(known, block * page + pos % page, -1)
    # Query j sees positions t < L_i - (s_q - 1 - j) when causal, else t < L_i.
    shift = (jnp.arange(s_q, dtype=jnp.int32) - (s_q - 1)) if causal else jnp.zeros(s_q, jnp.int32)
    visible = pos[None, None, :] < (lengths[:, None] + shift[None, :])[:, :, None]
    return jnp.where(visible, token[:, None, :], -1), lengths


def _sparse_decode(
    q, cache, indices, *optional_and_metadata, present, softmax_scale, layout, use_kernel
):
    """Sparse decode of the FP8 caches on the kernel or the reference, partitioned over batch
    and heads. `optional_and_metadata` holds the sparse arguments named in `present`, in the
    order of _SPARSE_DIMS, then the schedule when the caller gave one."""
    dims = [_SPARSE_DIMS[name] for name in present]
    given_metadata = len(optional_and_metadata) > len(present)

    def compute(q, cache, indices, *rest):
        given = dict(zip(present, rest[: len(present)], strict=True))
        metadata = tuple(rest[len(present) :])
        operands = decode_sparse.with_placeholders(
            q,
            cache,
            indices,
            given.get("topk_length"),
            given.get("attn_sink"),
            given.get("extra_k_cache"),
            given.get("extra_indices_in_kvcache"),
            given.get("extra_topk_length"),
        )
        if use_kernel and not metadata:
            metadata = _sparse_schedule(q, indices, given)
        return decode_sparse.decode_sparse(
            *operands,
            *(metadata or (None, None)),
            use_kernel=use_kernel,
            softmax_scale=softmax_scale,
            layout=layout,
        )

    def per_shard(factor_axes):
        # A schedule covers the whole batch at the global head count: each shard makes its own.
        return lambda q, cache, indices, *rest: compute(q, cache, indices, *rest[: len(present)])

    return sharding.partitioned_call(
        OP,
        compute,
        (q, cache, indices, *optional_and_metadata),
        (
            "b s (k g) d",
            "n p k d",
            "b s t",
            *dims,
            *(("o f", "c") if given_metadata else ()),
        ),
        _DECODE_RESULT_DIMS,
        shardable=frozenset({"b", "g"}),
        given_sizes={"g": q.shape[2]},
        local_fn=per_shard if given_metadata else None,
    )


def _sparse_schedule(q, indices, given) -> tuple[jax.Array, jax.Array]:
    """The sparse kernel's schedule for these (per-shard) inputs: each request weighs its
    counted slots, rounded up to whole blocks of 64, main and extra."""
    b, s_q, h_q, _ = q.shape
    num_parts = metadata_op.sparse_num_sm_parts(s_q, h_q)
    extra_indices = given.get("extra_indices_in_kvcache")
    topk = indices.shape[2]
    extra_topk = 0 if extra_indices is None else extra_indices.shape[2]
    topk_length = given.get("topk_length")
    extra_topk_length = given.get("extra_topk_length")
    if topk_length is None and extra_topk_length is None:
        return mla_metadata.mla_metadata(
            jnp.zeros((b,), jnp.int32),
            use_kernel=True,
            num_parts=num_parts,
            fixed_length=topk + extra_topk,
        )

    def whole_blocks(length, limit):
        if length is None:
            return jnp.full((b,), limit, jnp.int32)
        counted = jnp.clip(length, 0, limit)
        return (counted + TOPK_MULTIPLE - 1) // TOPK_MULTIPLE * TOPK_MULTIPLE

    lengths = whole_blocks(topk_length, topk)
    if extra_indices is not None:
        lengths = lengths + whole_blocks(extra_topk_length, extra_topk)
    return mla_metadata.mla_metadata(lengths, use_kernel=True, num_parts=num_parts, fixed_length=-1)


#: Sharding dims of the optional sparse-mode operands (the FP8 caches are replicated).
_SPARSE_DIMS = {
    "attn_sink": "(k g)",
    "topk_length": "b",
    "extra_k_cache": "e r k d",
    "extra_indices_in_kvcache": "b s u",
    "extra_topk_length": "b",
}


def _check_head_dims(d_qk: int, d_v: int, *, sparse: bool) -> None:
    """Decode's head dims, in every implementation: MLA's latent + RoPE and the latent V."""
    allowed = SPARSE_HEAD_DIMS_QK if sparse else (HEAD_DIM_QK,)
    if d_qk not in allowed or d_v != HEAD_DIM_V:
        mode = "sparse" if sparse else "dense"
        want = " or ".join(str(d) for d in allowed)
        raise ValueError(
            f"{OP}: {mode} decode needs d_qk (q's last dim) {want} and head_dim_v "
            f"{HEAD_DIM_V}; got d_qk {d_qk} and head_dim_v {d_v}"
        )


def _dense_kernel_unsupported_reason(q, k_cache, layout: str | None) -> str:
    """Why no Hopper kernel can take these dense-mode inputs ("" when one can): the dense
    decode kernel for a 16-bit cache, the sparse one for an FP8 cache (_dense_fp8_decode)."""
    num_blocks, page, h_kv, _ = k_cache.shape
    if num_blocks == 0:
        return "the kernel needs a cache of at least one block"
    b, s_q, h_q, _ = q.shape
    if layout is not None:
        capacity = num_blocks * page * h_kv
        if capacity > INT32_MAX:
            return (
                f"an FP8 cache is addressed by int32 token indices: num_blocks * page * h_kv "
                f"must be <= 2**31 - 1; got {num_blocks} * {page} * {h_kv} = {capacity}"
            )
        group = h_q // h_kv  # the query heads of one kernel call
        return decode_sparse.launch_limit_error(
            batch=b, s_q=s_q, h_q=group, num_parts=metadata_op.sparse_num_sm_parts(s_q, group)
        )
    return decode_dense.launch_limit_error(
        batch=b,
        s_q=s_q,
        h_q=h_q,
        h_kv=h_kv,
        num_blocks=num_blocks,
        page=page,
        num_parts=metadata_op.num_sm_parts(s_q * h_q // h_kv, h_kv),
    )


def _fp8_layout(name: str, cache: jax.Array, d_qk: int, requested: str | None) -> str:
    """The FP8 layout of `cache`: `requested` checked against its last dim, or the layout that
    last dim names; the layout must hold q's d_qk."""
    # name -> (last dim of the cache, d_qk it holds)
    layouts = {lay.name: (lay.bytes_per_token, lay.d_qk) for lay in quant.FP8_LAYOUTS.values()}
    layouts[quant.SCALED_LAYOUT] = (HEAD_DIM_QK, HEAD_DIM_QK)
    if requested is None:
        matching = [lay for lay, (size, _) in layouts.items() if size == cache.shape[-1]]
        if not matching:
            known = ", ".join(f"{size} ({lay})" for lay, (size, _) in layouts.items())
            raise ValueError(
                f"{OP}: an FP8 {name} must have a last dim of bytes per token of a layout "
                f"({known}); got shape {cache.shape}"
            )
        layout = matching[0]
    else:
        layout = checks.check_choice(OP, "fp8_layout", requested, tuple(layouts))
        if cache.shape[-1] != layouts[layout][0]:
            raise ValueError(
                f"{OP}: an FP8 {name} in the {layout} layout must have a last dim of "
                f"{layouts[layout][0]}; got shape {cache.shape}"
            )
    layout_d_qk = layouts[layout][1]
    if layout_d_qk != d_qk:
        raise ValueError(
            f"{OP}: the {layout} FP8 layout of {name} holds d_qk = {layout_d_qk}, "
            f"but q has d_qk = {d_qk}"
        )
    if layout != quant.SCALED_LAYOUT and cache.shape[2] != 1:
        raise ValueError(f"{OP}: an FP8 {name} must have h_kv == 1; got {cache.shape}")
    return layout


def _check_k_scale(layout: str | None, k_scale, h_kv: int) -> None:
    """k_scale goes with the "E4M3" cache, and only with it."""
    if layout != quant.SCALED_LAYOUT:
        if k_scale is not None:
            raise ValueError(
                f"{OP}: k_scale is the scale of an {quant.SCALED_LAYOUT} FP8 cache; this call "
                f"has {'the ' + layout + ' layout' if layout else 'no FP8 cache'}"
            )
        return
    if k_scale is None:
        raise ValueError(
            f"{OP}: an {quant.SCALED_LAYOUT} FP8 cache needs k_scale (float32 [], [1] or "
            "[h_kv]; see jax_flashmla.quantize_k_cache_e4m3)"
        )
    quant.check_k_scale(OP, k_scale, h_kv)


def _check_dense_inputs(q: jax.Array, block_table, cache_seqlens) -> None:
    b = q.shape[0]
    if block_table is None or cache_seqlens is None:
        raise ValueError(f"{OP}: dense mode (indices None) needs block_table and cache_seqlens")
    checks.check_array(
        OP,
        "block_table",
        block_table,
        ndim=2,
        dtypes=checks.INT32,
        shape_doc="[batch, max_blocks_per_seq]",
    )
    checks.check_array(
        OP, "cache_seqlens", cache_seqlens, ndim=1, dtypes=checks.INT32, shape_doc="[batch]"
    )
    if block_table.shape[0] != b or cache_seqlens.shape[0] != b:
        raise ValueError(
            f"{OP}: q, block_table and cache_seqlens must share the batch size; got "
            f"{b}, {block_table.shape[0]} and {cache_seqlens.shape[0]}"
        )


def _check_sparse_inputs(q, k_cache, indices, sparse_args) -> None:
    b, s_q, h_q, _ = q.shape
    checks.check_array(
        OP,
        "indices",
        indices,
        ndim=3,
        dtypes=checks.INT32,
        shape=(b, s_q, None),
        shape_doc="[batch, s_q, topk]",
    )
    topk = indices.shape[2]
    if topk < TOPK_MULTIPLE or topk % TOPK_MULTIPLE:
        raise ValueError(
            f"{OP}: topk (indices.shape[2]) must be a positive multiple of 64; got {topk}"
        )
    if sparse_args["attn_sink"] is not None:
        checks.check_array(
            OP,
            "attn_sink",
            sparse_args["attn_sink"],
            dtypes=checks.FLOAT32,
            shape=(h_q,),
            shape_doc="[h_q]",
        )
    for name in ("topk_length", "extra_topk_length"):
        if sparse_args[name] is not None:
            checks.check_array(
                OP, name, sparse_args[name], dtypes=checks.INT32, shape=(b,), shape_doc="[batch]"
            )
    extra_cache = sparse_args["extra_k_cache"]
    extra_indices = sparse_args["extra_indices_in_kvcache"]
    if (extra_cache is None) != (extra_indices is None):
        raise ValueError(f"{OP}: extra_k_cache and extra_indices_in_kvcache go together")
    if sparse_args["extra_topk_length"] is not None and extra_cache is None:
        raise ValueError(f"{OP}: extra_topk_length needs extra_k_cache")
    if extra_cache is not None:
        checks.check_array(OP, "extra_k_cache", extra_cache, ndim=4, dtypes=FP8_CACHE_DTYPES)
        if extra_cache.shape[-1] != k_cache.shape[-1]:
            raise ValueError(
                f"{OP}: extra_k_cache must have k_cache's layout (last dim "
                f"{k_cache.shape[-1]}); got shape {extra_cache.shape}"
            )
        checks.check_array(
            OP,
            "extra_indices_in_kvcache",
            extra_indices,
            dtypes=checks.INT32,
            shape=(b, s_q, None),
            shape_doc="[batch, s_q, extra_topk]",
        )
        extra_topk = extra_indices.shape[2]
        if extra_topk < TOPK_MULTIPLE or extra_topk % TOPK_MULTIPLE:
            raise ValueError(
                f"{OP}: extra_topk (extra_indices_in_kvcache.shape[2]) must be a "
                f"positive multiple of 64; got {extra_topk}"
            )


def _check_metadata(q, h_kv, tile_scheduler_metadata, num_splits, *, sparse: bool) -> None:
    """The metadata must be absent or built by get_mla_metadata for these shapes."""
    if (tile_scheduler_metadata is None) != (num_splits is None):
        raise ValueError(f"{OP}: pass both tile_scheduler_metadata and num_splits, or neither")
    if tile_scheduler_metadata is None:
        return
    b, s_q, h_q, _ = q.shape
    if sparse:
        parts = metadata_op.sparse_num_sm_parts(s_q, h_q)
    else:
        parts = metadata_op.num_sm_parts(s_q * h_q // h_kv, h_kv)
    for name, value, shape in (
        ("tile_scheduler_metadata", tile_scheduler_metadata, (parts, METADATA_FIELDS)),
        ("num_splits", num_splits, (b + 1,)),
    ):
        checks.check_array(OP, name, value, dtypes=checks.INT32)
        if tuple(value.shape) != shape:
            raise ValueError(
                f"{OP}: {name} has shape {tuple(value.shape)} but these inputs need {shape}: "
                f"build it with get_mla_metadata(cache_seqlens, {s_q * h_q // h_kv}, {h_kv}"
                f"{f', num_heads_q={h_q}, topk=...' if sparse else ''}) for q of shape {q.shape}"
            )
