"""Every documented bad input raises a TypeError or ValueError at trace time that names the
argument, the rule and the value. Inputs are ShapeDtypeStructs traced under jax.jit, so
nothing runs: the error must come from the checks, not from XLA."""

from __future__ import annotations

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
    ("softmax_scale", dense_args(), {"softmax_scale": -1.0}, ValueError, ["softmax_scale"]),
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


MHA_CASES = [
    (
        [S((16, 4, 192), F32), S((16, 4, 192), BF16), S((16, 4, 128), BF16)],
        TypeError,
        "q must have dtype bfloat16",
    ),
    (
        [S((16, 4, 192), BF16), S((16, 4, 192), BF16), S((16, 4, 64), BF16)],
        ValueError,
        r"\(d_qk, d_v\) must be one of",
    ),
    (
        [S((16, 4, 128), BF16), S((16, 3, 128), BF16), S((16, 3, 128), BF16)],
        ValueError,
        "multiple of k's heads",
    ),
    (
        [S((16, 4, 128), BF16), S((16, 2, 128), BF16), S((15, 2, 128), BF16)],
        ValueError,
        "v must have shape",
    ),
]


@pytest.mark.parametrize("arrays,error,fragment", MHA_CASES)
def test_mha_rejects(arrays, error, fragment):
    cu = S((3,), I32)
    with pytest.raises(error, match="flash_attn_varlen_func: .*" + fragment):
        trace(fm.flash_attn_varlen_func, *arrays, cu, cu, 8, 8)


def test_mha_rejects_mismatched_cu_seqlens():
    q = S((16, 4, 128), BF16)
    with pytest.raises(ValueError, match="cu_seqlens_k must have shape"):
        trace(fm.flash_attn_varlen_func, q, q, q, S((3,), I32), S((4,), I32), 8, 8)


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
