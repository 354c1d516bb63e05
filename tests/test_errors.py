"""Every documented bad input raises a TypeError or ValueError at trace time that names the
argument, the rule and the value. Inputs are ShapeDtypeStructs traced under jax.jit, so
nothing runs: the error must come from the checks, not from XLA."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

import jax_flashmla as fm
from jax_flashmla._src import platform

S = jax.ShapeDtypeStruct
BF16, F16, I32, F32 = jnp.bfloat16, jnp.float16, jnp.int32, jnp.float32
FP8 = jnp.float8_e4m3fn


def trace(fn, *args, **kwargs):
    """Trace fn under jit: ShapeDtypeStruct arguments become traced arrays, the rest static."""
    arrays = {i: a for i, a in enumerate(args) if isinstance(a, S)}
    kw_arrays = {k: v for k, v in kwargs.items() if isinstance(v, S)}

    def call(traced, kw_traced):
        full = [traced.get(i, a) for i, a in enumerate(args)]
        return fn(*full, **{**kwargs, **kw_traced})

    return jax.jit(call).trace(arrays, kw_arrays)


def dense_args(b=2, s_q=1, h_q=16, h_kv=1, d=576, page=64, blocks=8, dtype=BF16):
    return [
        S((b, s_q, h_q, d), dtype),
        S((blocks * b, page, h_kv, d), dtype),
        S((b, blocks), I32),
        S((b,), I32),
        512,
    ]


def e4m3_args(b=2, h_kv=1):
    """Dense decode over a plain float8_e4m3fn cache (k_scale beside it)."""
    return replace(dense_args(b=b, h_kv=h_kv), 1, S((8 * b, 64, h_kv, 576), FP8))


def sparse_kwargs(b=2, s_q=1, topk=128):
    return {"indices": S((b, s_q, topk), I32)}


def sparse_args(b=2, s_q=1, h_q=64, bytes_per_token=656, d=576, page=64):
    return [S((b, s_q, h_q, d), BF16), S((10, page, 1, bytes_per_token), FP8), None, None, 512]


DENSE = fm.flash_mla_with_kvcache


def replace(args, index, value):
    args = list(args)
    args[index] = value
    return args


DECODE_CASES = [
    # (description, args, kwargs, error type, message fragments)
    (
        "q dtype",
        replace(dense_args(), 0, S((2, 1, 16, 576), F32)),
        {},
        TypeError,
        ["q", "bfloat16 or float16", "float32"],
    ),
    (
        "q rank",
        replace(dense_args(), 0, S((2, 16, 576), BF16)),
        {},
        ValueError,
        ["q", "rank 4", "(2, 16, 576)"],
    ),
    (
        "cache dtype",
        replace(dense_args(), 1, S((16, 64, 1, 576), F16)),
        {},
        TypeError,
        ["k_cache", "bfloat16", "float16"],
    ),
    (
        "cache d_qk",
        replace(dense_args(), 1, S((16, 64, 1, 512), BF16)),
        {},
        ValueError,
        ["k_cache", "d_qk = 576"],
    ),
    ("head dims", dense_args(h_q=16, h_kv=3), {}, ValueError, ["multiple of h_kv", "h_kv=3"]),
    ("head_dim_v", replace(dense_args(), 4, 600), {}, ValueError, ["head_dim_v", "600"]),
    ("head_dim_v type", replace(dense_args(), 4, 512.0), {}, TypeError, ["head_dim_v"]),
    (
        "block_table dtype",
        replace(dense_args(), 2, S((2, 8), F32)),
        {},
        TypeError,
        ["block_table", "int32", "float32"],
    ),
    (
        "block_table batch",
        replace(dense_args(), 2, S((3, 8), I32)),
        {},
        ValueError,
        ["batch size", "3"],
    ),
    (
        "seqlens batch",
        replace(dense_args(), 3, S((5,), I32)),
        {},
        ValueError,
        ["cache_seqlens", "5"],
    ),
    (
        "seqlens rank",
        replace(dense_args(), 3, S((2, 1), I32)),
        {},
        ValueError,
        ["cache_seqlens", "rank 1"],
    ),
    (
        "missing block_table",
        replace(dense_args(), 2, None),
        {},
        ValueError,
        ["block_table and cache_seqlens"],
    ),
    (
        "softmax_scale",
        dense_args(),
        {"softmax_scale": float("inf")},
        ValueError,
        ["softmax_scale", "finite in float32"],
    ),
    ("causal type", dense_args(), {"causal": 1}, TypeError, ["causal", "bool"]),
    (
        "sparse arg in dense mode",
        dense_args(),
        {"attn_sink": S((16,), F32)},
        ValueError,
        ["attn_sink", "sparse mode"],
    ),
    (
        "metadata for other shapes",
        dense_args(),
        {"tile_scheduler_metadata": S((66, 8), I32), "num_splits": S((3,), I32)},
        ValueError,
        ["tile_scheduler_metadata", "(66, 8)", "(132, 8)", "get_mla_metadata"],
    ),
    (
        "num_splits for other batch",
        dense_args(),
        {"tile_scheduler_metadata": S((132, 8), I32), "num_splits": S((9,), I32)},
        ValueError,
        ["num_splits", "(9,)", "(3,)"],
    ),
    ("only one metadata array", dense_args(), {"num_splits": S((3,), I32)}, ValueError, ["both"]),
    (
        "implementation name",
        dense_args(),
        {"implementation": "triton"},
        ValueError,
        ["implementation", "'triton'"],
    ),
    # sparse mode
    (
        "sparse without fp8",
        replace(sparse_args(), 1, S((10, 64, 1, 576), BF16)),
        sparse_kwargs(),
        ValueError,
        ["is_fp8_kvcache=True"],
    ),
    (
        "topk multiple",
        sparse_args(),
        {"is_fp8_kvcache": True, **sparse_kwargs(topk=100)},
        ValueError,
        ["topk", "multiple of 64", "100"],
    ),
    (
        "indices dtype",
        sparse_args(),
        {"is_fp8_kvcache": True, "indices": S((2, 1, 128), F32)},
        TypeError,
        ["indices", "int32"],
    ),
    (
        "indices shape",
        sparse_args(),
        {"is_fp8_kvcache": True, "indices": S((2, 3, 128), I32)},
        ValueError,
        ["indices", "[2, 1, *]"],
    ),
    (
        "fp8 bytes per token",
        replace(sparse_args(), 1, S((10, 64, 1, 600), FP8)),
        {"is_fp8_kvcache": True, **sparse_kwargs()},
        ValueError,
        ["bytes per token", "600"],
    ),
    (
        "fp8 layout vs d_qk",
        replace(sparse_args(), 1, S((10, 64, 1, 584), FP8)),
        {"is_fp8_kvcache": True, **sparse_kwargs()},
        ValueError,
        ["MODEL1", "512", "576"],
    ),
    (
        "sparse causal",
        sparse_args(),
        {"is_fp8_kvcache": True, "causal": True, **sparse_kwargs()},
        ValueError,
        ["causal"],
    ),
    (
        "sparse with block_table",
        replace(sparse_args(), 2, S((2, 4), I32)),
        {"is_fp8_kvcache": True, **sparse_kwargs()},
        ValueError,
        ["block_table", "None"],
    ),
    (
        "sink shape",
        sparse_args(),
        {"is_fp8_kvcache": True, "attn_sink": S((8,), F32), **sparse_kwargs()},
        ValueError,
        ["attn_sink", "[64]"],
    ),
    (
        "topk_length batch",
        sparse_args(),
        {"is_fp8_kvcache": True, "topk_length": S((3,), I32), **sparse_kwargs()},
        ValueError,
        ["topk_length", "[2]"],
    ),
    (
        "extra cache alone",
        sparse_args(),
        {"is_fp8_kvcache": True, "extra_k_cache": S((4, 2, 1, 656), FP8), **sparse_kwargs()},
        ValueError,
        ["extra_k_cache and extra_indices_in_kvcache"],
    ),
    (
        "extra topk multiple",
        sparse_args(),
        {
            "is_fp8_kvcache": True,
            "extra_k_cache": S((4, 2, 1, 656), FP8),
            "extra_indices_in_kvcache": S((2, 1, 10), I32),
            **sparse_kwargs(),
        },
        ValueError,
        ["extra_topk", "10"],
    ),
    (
        "sparse h_kv",
        [S((2, 1, 64, 576), BF16), S((10, 64, 2, 656), FP8), None, None, 512],
        {"is_fp8_kvcache": True, **sparse_kwargs()},
        ValueError,
        ["h_kv == 1"],
    ),
    # the plain scaled e4m3 cache (dense mode)
    (
        "e4m3 without k_scale",
        e4m3_args(),
        {"is_fp8_kvcache": True},
        ValueError,
        ["E4M3", "needs k_scale"],
    ),
    (
        "k_scale shape",
        e4m3_args(h_kv=2),
        {"is_fp8_kvcache": True, "k_scale": S((4,), F32)},
        ValueError,
        ["k_scale", "[h_kv] = [2]", "(4,)"],
    ),
    (
        "k_scale dtype",
        e4m3_args(),
        {"is_fp8_kvcache": True, "k_scale": S((), BF16)},
        TypeError,
        ["k_scale", "float32", "bfloat16"],
    ),
    (
        "k_scale not an array",
        e4m3_args(),
        {"is_fp8_kvcache": True, "k_scale": 0.5},
        TypeError,
        ["k_scale", "JAX array", "float"],
    ),
    (
        "k_scale with bf16 cache",
        dense_args(),
        {"k_scale": S((), F32)},
        ValueError,
        ["k_scale", "E4M3", "no FP8 cache"],
    ),
    (
        "k_scale with V32 cache",
        replace(dense_args(), 1, S((16, 64, 1, 656), FP8)),
        {"is_fp8_kvcache": True, "k_scale": S((), F32)},
        ValueError,
        ["k_scale", "V32 layout"],
    ),
    (
        "fp8_layout without fp8",
        dense_args(),
        {"fp8_layout": "E4M3"},
        ValueError,
        ["fp8_layout", "is_fp8_kvcache=True"],
    ),
    (
        "fp8_layout name",
        e4m3_args(),
        {"is_fp8_kvcache": True, "fp8_layout": "e5m2", "k_scale": S((), F32)},
        ValueError,
        ["fp8_layout", "'V32', 'MODEL1', 'E4M3'", "'e5m2'"],
    ),
    (
        "fp8_layout vs last dim",
        e4m3_args(),
        {"is_fp8_kvcache": True, "fp8_layout": "V32", "k_scale": S((), F32)},
        ValueError,
        ["V32 layout", "656", "576"],
    ),
    (
        "e4m3 in sparse mode",
        replace(sparse_args(), 1, S((10, 64, 1, 576), FP8)),
        {"is_fp8_kvcache": True, "k_scale": S((), F32), **sparse_kwargs()},
        ValueError,
        ["sparse mode", "E4M3", "dense mode"],
    ),
]


@pytest.mark.parametrize(
    "args,kwargs,error,fragments",
    [case[1:] for case in DECODE_CASES],
    ids=[case[0] for case in DECODE_CASES],
)
def test_decode_rejects(args, kwargs, error, fragments):
    with pytest.raises(error) as info:
        trace(DENSE, *args, **kwargs)
    message = str(info.value)
    assert message.startswith("flash_mla_with_kvcache:"), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_cuda_on_cpu_says_why():
    if not platform.device_unsupported_reason():
        pytest.skip("this machine has a supported GPU")
    with pytest.raises(ValueError, match=r"implementation='cuda' is unavailable: .*Hopper"):
        trace(
            fm.get_mla_metadata,
            S((4,), I32),
            num_q_tokens_per_head_k=64,
            num_heads_k=1,
            implementation="cuda",
        )


def test_cuda_on_unsupported_gpu_says_why():
    with (
        platform.assume_device(compute_capability="8.0", kind="NVIDIA A100"),
        pytest.raises(ValueError, match=r"compute capability 9\.0.*A100.*8\.0"),
    ):
        trace(
            fm.get_mla_metadata,
            S((4,), I32),
            num_q_tokens_per_head_k=64,
            num_heads_k=1,
            implementation="cuda",
        )


@pytest.mark.parametrize(
    "args,kwargs,error,fragment",
    [
        ([S((4,), F32), 64, 1], {}, TypeError, "cache_seqlens must have dtype int32"),
        ([S((4, 1), I32), 64, 1], {}, ValueError, "cache_seqlens must have rank 1"),
        ([S((4,), I32), 0, 1], {}, ValueError, "num_q_tokens_per_head_k must be >= 1"),
        ([S((4,), I32), 64, 2.0], {}, TypeError, "num_heads_k must be a Python int"),
        ([S((4,), I32), 64, 2], {"num_heads_q": 3}, ValueError, "multiple of num_heads_k"),
        ([S((4,), I32), 64, 1], {"topk": 100}, ValueError, "topk must be a multiple of 64"),
    ],
)
def test_metadata_rejects(args, kwargs, error, fragment):
    with pytest.raises(error, match="get_mla_metadata: .*" + fragment):
        trace(fm.get_mla_metadata, *args, **kwargs)


SPARSE_PREFILL_CASES = [
    (
        [S((8, 64, 576), F16), S((32, 1, 576), BF16), S((8, 1, 128), I32)],
        {},
        TypeError,
        "q must have dtype bfloat16",
    ),
    (
        [S((8, 64, 256), BF16), S((32, 1, 256), BF16), S((8, 1, 128), I32)],
        {},
        ValueError,
        "d_qk must be 512 or 576",
    ),
    (
        [S((8, 64, 576), BF16), S((32, 2, 576), BF16), S((8, 1, 128), I32)],
        {},
        ValueError,
        "kv must have shape",
    ),
    (
        [S((8, 64, 576), BF16), S((32, 1, 576), BF16), S((7, 1, 128), I32)],
        {},
        ValueError,
        "indices must have shape",
    ),
    (
        [S((8, 64, 576), BF16), S((32, 1, 576), BF16), S((8, 1, 128), I32)],
        {"topk_length": S((9,), I32)},
        ValueError,
        "topk_length must have shape",
    ),
    (
        [S((8, 64, 576), BF16), S((32, 1, 576), BF16), S((8, 1, 128), I32)],
        {"attn_sink": S((64,), BF16)},
        TypeError,
        "attn_sink must have dtype float32",
    ),
]


@pytest.mark.parametrize("arrays,kwargs,error,fragment", SPARSE_PREFILL_CASES)
def test_sparse_prefill_rejects(arrays, kwargs, error, fragment):
    with pytest.raises(error, match="flash_mla_sparse_fwd: .*" + fragment):
        trace(fm.flash_mla_sparse_fwd, *arrays, 0.1, **kwargs)


# ---------------------------------------------------------------------------------------------
# MHA prefill: flash_attn_varlen_func and its packed forms. Each case: (id, op, args, kwargs,
# error, message fragments). A packed form's messages name its own arguments, never those of
# the unpacked op its inputs are split into.

MHA = fm.flash_attn_varlen_func
QKV = fm.flash_attn_varlen_qkvpacked_func
KV = fm.flash_attn_varlen_kvpacked_func
CU = S((3,), I32)


def mha_args(d_qk=192, d_v=128, h=4, h_k=2, total_q=16, total_k=12):
    return [
        S((total_q, h, d_qk), BF16),
        S((total_k, h_k, d_qk), BF16),
        S((total_k, h_k, d_v), BF16),
        CU,
        CU,
        8,
        8,
    ]


def qkv_args(width=512, h=4, d=192):
    return [S((16, h, width), BF16), CU, 8, d]


def kv_args(d_q=192, width=320, h=4, h_k=2, d=192):
    return [S((16, h, d_q), BF16), S((12, h_k, width), BF16), CU, CU, 8, 8, d]


HEAD_DIMS = "(d_qk, d_v) must be one of (192, 128), (128, 128)"

MHA_CASES = [
    ("q dtype", MHA, replace(mha_args(), 0, S((16, 4, 192), F32)), {}, TypeError,
     ["q must have dtype bfloat16", "float32"]),
    ("q None", MHA, replace(mha_args(), 0, None), {}, TypeError, ["q must be a JAX array"]),
    ("k list", MHA, replace(mha_args(), 1, [[0.0]]), {}, TypeError,
     ["k must be a JAX array", "list"]),
    ("q rank", MHA, replace(mha_args(), 0, S((16, 192), BF16)), {}, ValueError,
     ["q must have rank 3", "(16, 192)"]),
    ("k d_qk", MHA, replace(mha_args(), 1, S((12, 2, 128), BF16)), {}, ValueError,
     ["k must have shape [*, *, 192]", "(12, 2, 128)"]),
    ("v tokens", MHA, replace(mha_args(), 2, S((11, 2, 128), BF16)), {}, ValueError,
     ["v must have shape [12, 2, *]", "(11, 2, 128)"]),
    ("d_v 64", MHA, mha_args(d_v=64), {}, ValueError, [HEAD_DIMS, "(192, 64)"]),
    ("d_qk 64", MHA, mha_args(d_qk=64, d_v=64), {}, ValueError, [HEAD_DIMS, "(64, 64)"]),
    ("MLA dims", MHA, mha_args(d_qk=576, d_v=512), {}, ValueError, [HEAD_DIMS, "(576, 512)"]),
    ("d_v 192", MHA, mha_args(d_v=192), {}, ValueError, [HEAD_DIMS, "(192, 192)"]),
    ("heads", MHA, mha_args(h=4, h_k=3), {}, ValueError,
     ["q's heads must be a positive multiple of k's heads", "4 and 3"]),
    ("cu_seqlens_q dtype", MHA, replace(mha_args(), 3, S((3,), F32)), {}, TypeError,
     ["cu_seqlens_q must have dtype int32", "float32"]),
    ("cu_seqlens_q None", MHA, replace(mha_args(), 3, None), {}, TypeError,
     ["cu_seqlens_q must be a JAX array"]),
    ("cu_seqlens_q rank", MHA, replace(mha_args(), 3, S((3, 1), I32)), {}, ValueError,
     ["cu_seqlens_q must have rank 1", "[batch + 1]"]),
    ("cu_seqlens_q empty", MHA, replace(replace(mha_args(), 3, S((0,), I32)), 4, S((0,), I32)),
     {}, ValueError, ["cu_seqlens_q must have at least one entry"]),
    ("cu_seqlens_k length", MHA, replace(mha_args(), 4, S((4,), I32)), {}, ValueError,
     ["cu_seqlens_k must have the shape of cu_seqlens_q, (3,); got (4,)"]),
    ("max_seqlen_q negative", MHA, replace(mha_args(), 5, -1), {}, ValueError,
     ["max_seqlen_q must be >= 0", "-1"]),
    ("max_seqlen_k float", MHA, replace(mha_args(), 6, 8.0), {}, TypeError,
     ["max_seqlen_k must be a Python int", "8.0"]),
    ("scale inf", MHA, mha_args(), {"softmax_scale": float("inf")}, ValueError,
     ["softmax_scale must be finite in float32", "inf"]),
    ("scale nan", MHA, mha_args(), {"softmax_scale": float("nan")}, ValueError,
     ["softmax_scale must be finite in float32"]),
    ("scale past float32", MHA, mha_args(), {"softmax_scale": 1e39}, ValueError,
     ["softmax_scale must be finite in float32", "1e+39"]),
    ("scale string", MHA, mha_args(), {"softmax_scale": "0.1"}, TypeError,
     ["softmax_scale must be a Python float or None"]),
    ("scale array", MHA, mha_args(), {"softmax_scale": S((), F32)}, TypeError,
     ["softmax_scale must be a Python float or None"]),
    ("causal int", MHA, mha_args(), {"causal": 1}, TypeError, ["causal must be a Python bool"]),
    ("implementation", MHA, mha_args(), {"implementation": "triton"}, ValueError,
     ["implementation must be None, 'cuda' or 'xla'", "'triton'"]),
    # qkv packed
    ("qkv dtype", QKV, replace(qkv_args(), 0, S((16, 4, 512), F16)), {}, TypeError,
     ["qkv must have dtype bfloat16", "float16"]),
    ("qkv None", QKV, replace(qkv_args(), 0, None), {}, TypeError, ["qkv must be a JAX array"]),
    ("qkv rank", QKV, replace(qkv_args(), 0, S((16, 512), BF16)), {}, ValueError,
     ["qkv must have rank 3", "2 * head_dim_qk + d_v"]),
    ("qkv head_dim_qk", QKV, qkv_args(d=128), {}, ValueError,
     [HEAD_DIMS, "head_dim_qk 128 and qkv's last dim 512"]),
    ("qkv width", QKV, qkv_args(width=448), {}, ValueError,
     [HEAD_DIMS, "head_dim_qk 192 and qkv's last dim 448"]),
    ("qkv head_dim_qk zero", QKV, qkv_args(d=0), {}, ValueError, ["head_dim_qk must be >= 1"]),
    ("qkv head_dim_qk float", QKV, qkv_args(d=192.0), {}, TypeError,
     ["head_dim_qk must be a Python int"]),
    ("qkv no heads", QKV, qkv_args(h=0), {}, ValueError, ["qkv must have at least one head"]),
    ("cu_seqlens dtype", QKV, replace(qkv_args(), 1, S((3,), F32)), {}, TypeError,
     ["cu_seqlens must have dtype int32"]),
    ("cu_seqlens list", QKV, replace(qkv_args(), 1, [0, 4, 16]), {}, TypeError,
     ["cu_seqlens must be a JAX array", "list"]),
    ("cu_seqlens empty", QKV, replace(qkv_args(), 1, S((0,), I32)), {}, ValueError,
     ["cu_seqlens must have at least one entry"]),
    ("max_seqlen", QKV, replace(qkv_args(), 2, -3), {}, ValueError,
     ["max_seqlen must be >= 0", "-3"]),
    ("qkv scale", QKV, qkv_args(), {"softmax_scale": float("inf")}, ValueError,
     ["softmax_scale must be finite in float32"]),
    ("qkv causal", QKV, qkv_args(), {"causal": None}, TypeError, ["causal must be a Python bool"]),
    ("qkv implementation", QKV, qkv_args(), {"implementation": "pallas"}, ValueError,
     ["implementation must be None, 'cuda' or 'xla'"]),
    # kv packed
    ("kv q dtype", KV, replace(kv_args(), 0, S((16, 4, 192), F32)), {}, TypeError,
     ["q must have dtype bfloat16"]),
    ("kv None", KV, replace(kv_args(), 1, None), {}, TypeError, ["kv must be a JAX array"]),
    ("kv dtype", KV, replace(kv_args(), 1, S((12, 2, 320), F16)), {}, TypeError,
     ["kv must have dtype bfloat16", "float16"]),
    ("kv rank", KV, replace(kv_args(), 1, S((12, 320), BF16)), {}, ValueError,
     ["kv must have rank 3", "head_dim_qk + d_v"]),
    ("kv q width", KV, kv_args(d_q=128), {}, ValueError,
     ["q's last dim must be head_dim_qk (192)", "(16, 4, 128)"]),
    ("kv width", KV, kv_args(width=384), {}, ValueError,
     [HEAD_DIMS, "head_dim_qk 192 and kv's last dim 384"]),
    ("kv head_dim_qk", KV, kv_args(d_q=576, width=1088, d=576), {}, ValueError,
     [HEAD_DIMS, "head_dim_qk 576"]),
    ("kv head_dim_qk type", KV, kv_args(d="192"), {}, TypeError,
     ["head_dim_qk must be a Python int"]),
    ("kv heads", KV, kv_args(h=4, h_k=3), {}, ValueError,
     ["q's heads must be a positive multiple of kv's heads", "4 and 3"]),
    ("kv cu_seqlens_k", KV, replace(kv_args(), 3, S((5,), I32)), {}, ValueError,
     ["cu_seqlens_k must have the shape of cu_seqlens_q"]),
    ("kv max_seqlen_k", KV, replace(kv_args(), 5, None), {}, TypeError,
     ["max_seqlen_k must be a Python int"]),
]  # fmt: skip

# Names that a packed form's messages must not use: its inputs are not called that.
UNPACKED_ONLY = {
    QKV: r"\b(q|k|v|cu_seqlens_q|cu_seqlens_k|max_seqlen_q|max_seqlen_k)\b",
    KV: r"\b(k|v)\b",
}


@pytest.mark.parametrize(
    "op,args,kwargs,error,fragments",
    [case[1:] for case in MHA_CASES],
    ids=[case[0] for case in MHA_CASES],
)
def test_mha_rejects(op, args, kwargs, error, fragments):
    with pytest.raises(error) as info:
        trace(op, *args, **kwargs)
    message = str(info.value)
    assert message.startswith(f"{op.__name__}: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    if op in UNPACKED_ONLY:
        assert not re.search(UNPACKED_ONLY[op], message), message


@pytest.mark.parametrize("implementation", [None, "xla", "cuda"])
@pytest.mark.parametrize(
    "op,args",
    [(MHA, mha_args(d_v=64)), (QKV, qkv_args(width=448)), (KV, kv_args(width=256))],
    ids=["unpacked", "qkv", "kv"],
)
def test_mha_head_dims_in_every_implementation(op, args, implementation):
    """Unsupported head dims are an error whatever the backend, the reference included."""
    with pytest.raises(ValueError, match=re.escape(HEAD_DIMS)):
        trace(op, *args, implementation=implementation)


@pytest.mark.parametrize(
    "op,args",
    [(MHA, mha_args()), (QKV, qkv_args()), (KV, kv_args())],
    ids=["unpacked", "qkv", "kv"],
)
def test_mha_accepts_zero_and_negative_scales(op, args):
    for scale in (0.0, -0.25, 3):
        trace(op, *args, softmax_scale=scale)


@pytest.mark.parametrize(
    "op,args",
    [(MHA, mha_args()), (QKV, qkv_args()), (KV, kv_args())],
    ids=["unpacked", "qkv", "kv"],
)
def test_mha_cuda_says_why_under_its_own_name(op, args):
    """No MHA prefill kernel in this build: implementation="cuda" says so, naming the op that
    was called (on a Hopper GPU with the extension: the missing kernel)."""
    with pytest.raises(ValueError, match=rf"^{op.__name__}: implementation='cuda' is unavailable"):
        trace(op, *args, implementation="cuda")
    if not platform.extension_unavailable_reason():
        with (
            platform.assume_device(),
            pytest.raises(ValueError, match="MHA prefill kernel is not built yet"),
        ):
            trace(op, *args, implementation="cuda")


def test_combine_rejects():
    with pytest.raises(ValueError, match="combine_splits: partial_lse must have shape"):
        trace(fm.combine_splits, S((6, 1, 4, 16), F32), S((6, 4, 1), F32), S((3,), I32))
    with pytest.raises(ValueError, match="num_splits must have 1 to rows"):
        trace(fm.combine_splits, S((2, 1, 4, 16), F32), S((2, 1, 4), F32), S((4,), I32))
    with pytest.raises(TypeError, match="out_dtype must be bfloat16 or float16"):
        trace(
            fm.combine_splits,
            S((2, 1, 4, 16), F32),
            S((2, 1, 4), F32),
            S((2,), I32),
            out_dtype=jnp.float32,
        )
