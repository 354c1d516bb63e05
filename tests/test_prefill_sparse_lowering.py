"""The sparse prefill kernel's path without a GPU: what flash_mla_sparse_fwd lowers to for a
Hopper GPU (traced under `assume_device`, lowered for CUDA), which implementation it picks, the
kernel's trace-time launch limits, and the kernel's primitive run on the CPU (where it lowers to
the reference).

implementation="cuda" lowers to one custom call @jax_flashmla_prefill_sparse_sm90 with operands
(q, kv, indices, attn_sink, topk_length), an absent optional operand as a zero-sized array
(float32[0], int32[0]), and results (out bf16 [s_q, h_q, 512], max_logits f32 [s_q, h_q], lse
f32 [s_q, h_q]); so does implementation=None; "xla" never does. Its gradient adds one custom
call @jax_flashmla_prefill_sparse_backward_sm90 (the backward kernel).
"""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import oracle_decode as od
import pytest

import jax_flashmla as fm
from jax_flashmla._src import platform

pytestmark = pytest.mark.skipif(
    platform.extension() is None, reason=platform.extension_unavailable_reason()
)

S = jax.ShapeDtypeStruct
TARGET = "jax_flashmla_prefill_sparse_sm90"
OP = "flash_mla_sparse_fwd"
#: CUDA's limit on a grid's x dimension.
GRID_X_MAX = 2**31 - 1


def structs(*, s_q=3, h_q=64, s_kv=300, topk=128, d_qk=576, sink=False, lengths=False) -> tuple:
    """q, kv, indices and the optional operands asked for (None otherwise), as shapes."""
    return (
        S((s_q, h_q, d_qk), jnp.bfloat16),
        S((s_kv, 1, d_qk), jnp.bfloat16),
        S((s_q, 1, topk), jnp.int32),
        S((h_q,), jnp.float32) if sink else None,
        S((s_q,), jnp.int32) if lengths else None,
    )


def prefill_call(implementation, sm_scale=0.25):
    def call(q, kv, indices, attn_sink, topk_length):
        return fm.flash_mla_sparse_fwd(
            q,
            kv,
            indices,
            sm_scale,
            512,
            attn_sink,
            topk_length,
            implementation=implementation,
        )

    return call


def cuda_hlo(implementation, args, sm_scale=0.25) -> str:
    """The StableHLO text of the op traced for an assumed Hopper GPU and lowered for CUDA."""
    with platform.assume_device():
        traced = jax.jit(prefill_call(implementation, sm_scale)).trace(*args)
        return traced.lower(lowering_platforms=("cuda",)).as_text()


def custom_calls(hlo: str) -> list[str]:
    return [line for line in hlo.splitlines() if "stablehlo.custom_call" in line]


def test_family_names_its_target():
    """The kernel family has its FFI target, so the extension must register a handler for it."""
    from jax_flashmla._src.kernels import prefill_sparse

    assert prefill_sparse.prefill_sparse.ffi_target == TARGET
    assert TARGET in fm.FFI_TARGETS


@pytest.mark.parametrize("lengths", [False, True], ids=["no-lengths", "lengths"])
@pytest.mark.parametrize("sink", [False, True], ids=["no-sink", "sink"])
@pytest.mark.parametrize("d_qk", [512, 576])
def test_cuda_lowers_to_the_kernel(d_qk, sink, lengths):
    """implementation="cuda": one custom call with every operand (absent ones zero-sized), the
    three results, and sm_scale as a float32 attribute."""
    s_q, h_q, s_kv, topk = 5, 128, 300, 256
    args = structs(s_q=s_q, h_q=h_q, s_kv=s_kv, topk=topk, d_qk=d_qk, sink=sink, lengths=lengths)
    (call,) = custom_calls(cuda_hlo("cuda", args))
    assert f"@{TARGET}" in call
    attn_sink = f"tensor<{h_q}xf32>" if sink else "tensor<0xf32>"
    topk_length = f"tensor<{s_q}xi32>" if lengths else "tensor<0xi32>"
    signature = (
        f"(tensor<{s_q}x{h_q}x{d_qk}xbf16>, tensor<{s_kv}x1x{d_qk}xbf16>, "
        f"tensor<{s_q}x1x{topk}xi32>, {attn_sink}, {topk_length}) -> "
        f"(tensor<{s_q}x{h_q}x512xbf16>, tensor<{s_q}x{h_q}xf32>, tensor<{s_q}x{h_q}xf32>)"
    )
    assert signature in call, call
    assert re.search(r"= 2\.500000e-01 : f32", call), call


#: (s_q, h_q, s_kv, topk) the kernel takes beyond the matrix: h_q that leave a partial 64-head
#: tile, topk multiples of 64 but not of 128, the largest topk, fewer rows than topk, and one
#: query token.
KERNEL_SHAPES = [
    (3, 1, 300, 128),
    (3, 48, 300, 64),
    (2, 96, 1000, 192),
    (1, 128, 20000, 16384),
    (7, 64, 50, 320),
]


@pytest.mark.parametrize(("s_q", "h_q", "s_kv", "topk"), KERNEL_SHAPES)
def test_cuda_takes_other_shapes(s_q, h_q, s_kv, topk):
    args = structs(s_q=s_q, h_q=h_q, s_kv=s_kv, topk=topk, sink=True, lengths=True)
    (call,) = custom_calls(cuda_hlo("cuda", args))
    assert f"@{TARGET}" in call and f"tensor<{s_q}x1x{topk}xi32>" in call


def test_kernel_is_the_default_on_hopper():
    """implementation=None and "cuda" both lower to the kernel on a Hopper GPU; "xla" does not."""
    args = structs(sink=True, lengths=True)
    texts = {impl: cuda_hlo(impl, args) for impl in (None, "cuda", "xla")}
    assert f"@{TARGET}" in texts[None]
    assert f"@{TARGET}" in texts["cuda"]
    assert TARGET not in texts["xla"]


@pytest.mark.parametrize("lengths", [False, True], ids=["no-lengths", "lengths"])
@pytest.mark.parametrize("sink", [False, True], ids=["no-sink", "sink"])
@pytest.mark.parametrize("d_qk", [512, 576])
def test_xla_never_lowers_to_the_kernel(d_qk, sink, lengths):
    hlo = cuda_hlo("xla", structs(d_qk=d_qk, sink=sink, lengths=lengths))
    assert TARGET not in hlo and not custom_calls(hlo)


#: (id, shapes, a pattern the ValueError's message must match after the op's prefix)
LIMIT_CASES = [
    ("topk-100", structs(topk=100), r"topk"),
    ("topk-32", structs(topk=32, s_kv=20), r"topk"),
    # One CTA per query token and head tile: 2**30 tokens of 3 tiles, and one token of 2**31
    # tiles, are past the grid's x limit (shapes only, no memory).
    ("grid-tokens", structs(s_q=2**30, h_q=3 * 64, d_qk=512), r"s_q \* ceil\(h_q"),
    ("grid-heads", structs(s_q=1, h_q=64 * (GRID_X_MAX + 1), d_qk=512), r"s_q \* ceil\(h_q"),
]


@pytest.mark.parametrize(
    ("args", "pattern"), [c[1:] for c in LIMIT_CASES], ids=[c[0] for c in LIMIT_CASES]
)
def test_kernel_limits_checked_at_trace_time(args, pattern):
    """implementation="cuda" raises a ValueError naming the limit at trace time; None still
    traces (to the reference) and never lowers to the kernel for these shapes."""
    with platform.assume_device(), pytest.raises(ValueError) as info:
        jax.jit(prefill_call("cuda")).trace(*args)
    message = str(info.value)
    assert message.startswith(f"{OP}: implementation='cuda' is unavailable: "), message
    assert re.search(pattern, message.split("unavailable: ", 1)[1]), message
    with warnings.catch_warnings():
        # A Hopper GPU with a kernel that cannot take the call warns once: not the point here.
        warnings.simplefilter("ignore", RuntimeWarning)
        hlo = cuda_hlo(None, args)
    assert TARGET not in hlo


@pytest.mark.parametrize("lengths", [False, True], ids=["no-lengths", "lengths"])
@pytest.mark.parametrize("sink", [False, True], ids=["no-sink", "sink"])
def test_kernel_primitive_runs_its_reference_on_cpu(rng, sink, lengths):
    """Traced for an assumed Hopper GPU (the kernel's primitive, absent operands as zero-sized
    arrays) but run on the CPU, where the primitive lowers to the reference: the results match
    the oracle and implementation="xla" (so the placeholders count as absent and the kernel's
    result shapes are the reference's)."""
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU lowering of the kernel's primitive")
    s_q, h_q, topk, d_qk = 6, 8, 128, 576
    inputs = od.make_sparse_prefill_inputs(
        rng, s_q=s_q, s_kv=200, h_q=h_q, topk=topk, d_qk=d_qk, with_topk_length=lengths
    )
    attn_sink = np.array([np.inf, -np.inf, 0.0, 3.0, -3.0, 5.0, 10.0, 1.0], np.float32)
    attn_sink = attn_sink if sink else None
    args = [jnp.asarray(inputs[k]) for k in ("q", "kv", "indices")]
    args += [None if x is None else jnp.asarray(x) for x in (attn_sink, inputs["topk_length"])]
    sm_scale = 0.07
    with platform.assume_device():
        lowered = jax.jit(prefill_call("cuda", sm_scale)).trace(*args).lower()
    assert TARGET not in lowered.as_text()
    results = [np.asarray(x) for x in lowered.compile()(*args)]
    expected = [np.asarray(x) for x in jax.jit(prefill_call("xla", sm_scale))(*args)]
    oracle = od.sparse_prefill_oracle(
        inputs["q"],
        inputs["kv"],
        inputs["indices"],
        sm_scale,
        512,
        attn_sink=attn_sink,
        topk_length=inputs["topk_length"],
    )
    tolerances = (od.SPARSE_PREFILL_OUT_TOL, od.SPARSE_PREFILL_LSE_TOL, od.SPARSE_PREFILL_LSE_TOL)
    names = ("out", "max_logits", "lse")
    for name, got, want, ref, tol in zip(names, results, expected, oracle, tolerances, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, got.dtype)
        od.assert_same_up_to_rounding(got, want, name=name)
        od.check_close(got, ref, name=name, **tol)


@pytest.mark.parametrize("deterministic", [False, True], ids=["float", "fixed"])
@pytest.mark.parametrize("sink", [False, True], ids=["no-sink", "sink"])
@pytest.mark.parametrize("lengths", [False, True], ids=["no-lengths", "lengths"])
@pytest.mark.parametrize("d_qk", [512, 576])
def test_gradient_lowers_to_the_backward_kernel(d_qk, sink, lengths, deterministic):
    """jax.grad under "cuda" lowers to the forward kernel and one backward custom call with
    operands (q, kv, indices, topk_length or int32[0], d_out bf16, lse, row_shift, fixed_scale)
    and results (dq bf16 [s_q, h_q, d_qk], dkv float32 [s_kv, 1, d_qk], the int64 workspace as
    uint32 [s_kv, 1, d_qk, 2]), fixed_scale float32[1] and the workspace only with
    `deterministic` (else float32[0] and uint32[0]), the softmax scale as attribute; under
    "xla" there is no custom call at all."""
    args = structs(d_qk=d_qk, sink=sink, lengths=lengths)

    def loss(implementation):
        def fn(q, kv, indices, attn_sink, topk_length):
            out, _, lse = fm.flash_mla_sparse_fwd(
                q,
                kv,
                indices,
                0.25,
                512,
                attn_sink,
                topk_length,
                implementation=implementation,
                deterministic=deterministic,
            )
            return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isinf(lse), 0, lse))

        argnums = (0, 1, 3) if sink else (0, 1)
        return jax.grad(fn, argnums=argnums)

    texts = {}
    for implementation in ("cuda", "xla"):
        with platform.assume_device():
            traced = jax.jit(loss(implementation)).trace(*args)
            texts[implementation] = traced.lower(lowering_platforms=("cuda",)).as_text()
    calls = custom_calls(texts["cuda"])
    (backward,) = [c for c in calls if "@jax_flashmla_prefill_sparse_backward_sm90" in c]
    assert sum(f"@{TARGET}" in c for c in calls) == 1
    operands = re.search(r"\(tensor<.*?\)\s*->", backward.split(":")[-1]).group(0)
    lengths_type = "tensor<3xi32>" if lengths else "tensor<0xi32>"
    scale_type = "tensor<1xf32>" if deterministic else "tensor<0xf32>"
    assert operands.startswith(
        f"(tensor<3x64x{d_qk}xbf16>, tensor<300x1x{d_qk}xbf16>, tensor<3x1x128xi32>, "
        f"{lengths_type}, tensor<3x64x512xbf16>, tensor<3x64xf32>, tensor<3x64xf32>, "
        f"{scale_type})"
    ), operands
    workspace = f"tensor<300x1x{d_qk}x2xui32>" if deterministic else "tensor<0xui32>"
    results = f"(tensor<3x64x{d_qk}xbf16>, tensor<300x1x{d_qk}xf32>, {workspace})"
    assert results in backward.split("->")[-1], backward
    assert "softmax_scale = 2.500000e-01 : f32" in backward
    assert custom_calls(texts["xla"]) == []
