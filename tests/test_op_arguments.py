"""Every array argument of the decode, metadata, combine and sparse prefill ops: a Python list,
or None where None is not a documented choice, gets the op's own TypeError naming the
argument, before anything is traced; static dtype arguments go through the same rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jax_flashmla as fm

BF16, I32, F32, FP8 = jnp.bfloat16, jnp.int32, jnp.float32, jnp.float8_e4m3fn


def zeros(shape, dtype):
    return jnp.zeros(shape, dtype)


def dense_call():
    args = {
        "q": zeros((2, 1, 16, 576), BF16),
        "k_cache": zeros((4, 64, 1, 576), BF16),
        "block_table": zeros((2, 2), I32),
        "cache_seqlens": zeros((2,), I32),
        "tile_scheduler_metadata": zeros((132, 8), I32),
        "num_splits": zeros((3,), I32),
    }
    return fm.flash_mla_with_kvcache, args, {"head_dim_v": 512}


def sparse_call():
    args = {
        "q": zeros((2, 1, 64, 576), BF16),
        "k_cache": zeros((4, 64, 1, 656), FP8),
        "indices": zeros((2, 1, 64), I32),
        "attn_sink": zeros((64,), F32),
        "topk_length": zeros((2,), I32),
        "extra_k_cache": zeros((2, 16, 1, 656), FP8),
        "extra_indices_in_kvcache": zeros((2, 1, 64), I32),
        "extra_topk_length": zeros((2,), I32),
    }
    statics = {"block_table": None, "cache_seqlens": None, "head_dim_v": 512}
    return fm.flash_mla_with_kvcache, args, {**statics, "is_fp8_kvcache": True}


def metadata_call():
    args = {"cache_seqlens": zeros((4,), I32)}
    return fm.get_mla_metadata, args, {"num_q_tokens_per_head_k": 16, "num_heads_k": 1}


def combine_call():
    args = {
        "partial_o": zeros((5, 1, 4, 16), F32),
        "partial_lse": zeros((5, 1, 4), F32),
        "num_splits": jnp.array([0, 2, 3], I32),
        "attn_sink": zeros((4,), F32),
    }
    return fm.combine_splits, args, {}


def prefill_call():
    args = {
        "q": zeros((4, 16, 576), BF16),
        "kv": zeros((8, 1, 576), BF16),
        "indices": zeros((4, 1, 64), I32),
        "attn_sink": zeros((16,), F32),
        "topk_length": zeros((4,), I32),
    }
    return fm.flash_mla_sparse_fwd, args, {"sm_scale": 0.1}


CALLS = {
    "dense decode": dense_call,
    "sparse decode": sparse_call,
    "metadata": metadata_call,
    "combine": combine_call,
    "sparse prefill": prefill_call,
}
# Arguments for which None is a documented choice (absent, or the other decode mode).
NONE_ALLOWED = {
    "block_table",
    "cache_seqlens",
    "tile_scheduler_metadata",
    "num_splits",
    "indices",
    "attn_sink",
    "topk_length",
    "extra_k_cache",
    "extra_indices_in_kvcache",
    "extra_topk_length",
}
OP_NAMES = {
    fm.flash_mla_with_kvcache: "flash_mla_with_kvcache",
    fm.get_mla_metadata: "get_mla_metadata",
    fm.combine_splits: "combine_splits",
    fm.flash_mla_sparse_fwd: "flash_mla_sparse_fwd",
}

BAD_VALUES = [
    (call, name, bad)
    for call in sorted(CALLS)
    for name in CALLS[call]()[1]
    for bad in (["list"] if name in NONE_ALLOWED else ["list", "None"])
]


@pytest.mark.parametrize(("call", "name", "bad"), BAD_VALUES)
def test_non_array_argument_is_a_type_error(call, name, bad):
    op, args, statics = CALLS[call]()
    value = args[name]
    args[name] = value.tolist() if bad == "list" else None
    with pytest.raises(TypeError) as info:
        op(**args, **statics)
    message = str(info.value)
    assert message.startswith(f"{OP_NAMES[op]}: {name} must be a JAX array; got "), message
    assert ("list" if bad == "list" else "NoneType") in message


@pytest.mark.parametrize("call", sorted(CALLS))
def test_the_valid_calls_run(call):
    """The calls above are valid as they stand (so the errors come from the one bad value)."""
    op, args, statics = CALLS[call]()
    jax.eval_shape(lambda args: op(**args, **statics), args)


def test_dense_mode_without_its_arrays_is_a_value_error():
    """None for block_table / cache_seqlens selects sparse mode; without indices that is a
    mode error (ValueError), not a type error."""
    op, args, statics = dense_call()
    for name in ("block_table", "cache_seqlens"):
        with pytest.raises(ValueError, match=r"flash_mla_with_kvcache: dense mode .* needs"):
            op(**{**args, name: None}, **statics)


@pytest.mark.parametrize("out_dtype", ["bfloat16", "float16", jnp.float16, jnp.dtype("bfloat16")])
def test_combine_out_dtype_accepts_names_and_types(out_dtype):
    _, args, _ = combine_call()
    out, _ = fm.combine_splits(**args, out_dtype=out_dtype)
    assert out.dtype == jnp.dtype(out_dtype)


@pytest.mark.parametrize("out_dtype", ["float32", "no_such_dtype", None, 3, jnp.int8])
def test_combine_out_dtype_rejects_others(out_dtype):
    _, args, _ = combine_call()
    with pytest.raises(TypeError, match="combine_splits: out_dtype must be bfloat16 or float16"):
        fm.combine_splits(**args, out_dtype=out_dtype)
