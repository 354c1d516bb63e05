"""`python -m jax_flashmla`: report the environment, check every op, time kernel vs reference.

Each op runs its reference on small random inputs. Where its kernel can run (a Hopper GPU and
the CUDA extension), the kernel runs too and its outputs are compared with the reference's
and timed. Every other op is reported as what it is here: a kernel this device cannot run, or
reference only (no kernel for it in this build). The exit status is 1 when a comparison or a
reference failed, else 0.
"""

from __future__ import annotations

import argparse
import platform as host_platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

import jax_flashmla as fm
from jax_flashmla._src import platform


@dataclass
class Case:
    name: str  # op and shape, as printed
    op: str  # the op name `choose_implementation` knows
    make: Callable[[np.random.Generator], tuple]  # random inputs
    run: Callable[..., tuple]  # (*inputs, implementation) -> outputs


def _normal(rng, shape, dtype=jnp.bfloat16):
    return jnp.asarray(np.clip(rng.normal(size=shape) / 10, -1, 1), dtype)


def _decode_inputs(rng, b=4, s_q=1, h_q=16, page=64, max_len=300):
    lens = rng.integers(1, max_len, b).astype(np.int32)
    blocks = -(-max_len // page)
    table = rng.permutation(b * blocks).reshape(b, blocks).astype(np.int32)
    q = _normal(rng, (b, s_q, h_q, 576))
    cache = _normal(rng, (b * blocks, page, 1, 576))
    return q, cache, jnp.asarray(table), jnp.asarray(lens)


def _cases() -> list[Case]:
    def decode(q, cache, table, lens, implementation):
        return fm.flash_mla_with_kvcache(
            q, cache, table, lens, 512, causal=True, implementation=implementation
        )

    def sparse_inputs(rng):
        q, cache, _, _ = _decode_inputs(rng, h_q=64)
        fp8 = fm.quantize_k_cache(cache)
        indices = rng.integers(-1, cache.shape[0] * cache.shape[1], (4, 1, 128))
        return q, fp8, jnp.asarray(indices, jnp.int32)

    def sparse(q, fp8, indices, implementation):
        return fm.flash_mla_with_kvcache(
            q,
            fp8,
            None,
            None,
            512,
            is_fp8_kvcache=True,
            indices=indices,
            implementation=implementation,
        )

    def prefill_inputs(rng):
        q, kv = _normal(rng, (64, 64, 576)), _normal(rng, (256, 1, 576))
        return q, kv, jnp.asarray(rng.integers(-1, 256, (64, 1, 128)), jnp.int32)

    def prefill(q, kv, indices, implementation):
        return fm.flash_mla_sparse_fwd(q, kv, indices, 576**-0.5, implementation=implementation)

    def mha_inputs(rng):
        cu = jnp.array([0, 100, 100, 256], jnp.int32)
        return (
            _normal(rng, (256, 8, 192)),
            _normal(rng, (256, 8, 192)),
            _normal(rng, (256, 8, 128)),
            cu,
        )

    def mha(q, k, v, cu, implementation):
        return fm.flash_attn_varlen_func(
            q, k, v, cu, cu, 156, 156, causal=True, implementation=implementation
        )

    def metadata_inputs(rng):
        return (jnp.asarray(rng.integers(0, 20000, 128), jnp.int32),)

    def metadata(lens, implementation):
        return fm.get_mla_metadata(lens, 128, 1, implementation=implementation)

    def combine_inputs(rng):
        splits = np.concatenate([[0], np.cumsum(rng.integers(1, 4, 64))]).astype(np.int32)
        rows = int(splits[-1])
        return (
            jnp.asarray(rng.normal(size=(rows, 1, 128, 512)), jnp.float32),
            jnp.asarray(rng.normal(size=(rows, 1, 128)), jnp.float32),
            jnp.asarray(splits),
        )

    def combine(po, pl, splits, implementation):
        return fm.combine_splits(po, pl, splits, implementation=implementation)

    return [
        Case("get_mla_metadata b=128", "get_mla_metadata", metadata_inputs, metadata),
        Case("combine_splits b=64 h=128", "combine_splits", combine_inputs, combine),
        Case("decode dense b=4 h=16 causal", "flash_mla_with_kvcache", _decode_inputs, decode),
        Case("decode sparse fp8 b=4 h=64", "flash_mla_with_kvcache", sparse_inputs, sparse),
        Case("sparse prefill s_q=64 h=64", "flash_mla_sparse_fwd", prefill_inputs, prefill),
        Case("mha prefill varlen causal", "flash_attn_varlen_func", mha_inputs, mha),
    ]


def _time_us(fn: Callable[[], object], runs: int) -> float:
    jax.block_until_ready(fn())
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def _max_difference(a: tuple, b: tuple) -> float:
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if not np.array_equal(np.isinf(x), np.isinf(y)) or np.isnan(x).any() != np.isnan(y).any():
            return float("inf")
        finite = np.isfinite(x) & np.isfinite(y)
        if finite.any():
            worst = max(worst, float(np.max(np.abs(x[finite] - y[finite]))))
    return worst


def _reference_problem(outputs: tuple) -> str:
    """What is wrong with a reference's outputs ("" when nothing): NaN anywhere, or an output
    with no finite value (lonely rows are inf, but the inputs here have attendable keys)."""
    for i, x in enumerate(outputs):
        x = np.asarray(x, np.float64)
        if np.isnan(x).any():
            return f"output {i} holds NaN"
        if x.size and not np.isfinite(x).any():
            return f"output {i} has no finite value"
    return ""


def _cuda_unavailable(case: Case, inputs: tuple) -> str:
    """Why the op's kernel cannot take these inputs on the current target ("" when it can):
    the op's own implementation="cuda" error, read at trace time."""
    try:
        jax.jit(lambda *a: case.run(*a, implementation="cuda")).trace(*inputs)
    except ValueError as error:
        return str(error).split(" is unavailable: ", 1)[-1]
    return ""


def cuda_runtime_version(version: int) -> str:
    """CUDART_VERSION as written in CUDA's releases: 13000 -> "13.0", 12080 -> "12.8"."""
    return f"{version // 1000}.{version % 1000 // 10}"


def _environment(device: platform.TargetDevice) -> list[str]:
    lines = [
        f"jax_flashmla {fm.__version__}; jax {jax.__version__}, jaxlib {jaxlib.__version__}; "
        f"Python {host_platform.python_version()}"
    ]
    if device.platform == "gpu":
        lines.append(
            f"device: {device.kind} (compute capability {device.compute_capability}, "
            f"{device.num_sms} SMs)"
        )
    else:
        lines.append(f"device: {device.kind}, no GPU")
    ext = platform.extension()
    if ext is None:
        lines.append(f"CUDA extension: not available: {platform.extension_unavailable_reason()}")
    else:
        lines.append(
            f"CUDA extension: kernels for {', '.join(ext.compiled_architectures())}, compiled "
            f"by nvcc {ext.cuda_compiler_version}, CUDA runtime "
            f"{cuda_runtime_version(ext.cuda_runtime_version())} (linked statically)"
        )
    return lines


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jax_flashmla",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--runs", type=_positive_int, default=20, help="timed runs per op, >= 1 (median)"
    )
    args = parser.parse_args(argv)

    device = platform.target_device()
    print("\n".join(_environment(device)))
    here = platform.device_unsupported_reason(device) or platform.extension_unavailable_reason()

    print(
        f"\n{'op':<30} {'kernel':<31} {'max |cuda - xla|':>16} {'cuda us':>9} {'xla us':>10} "
        f"{'speed-up':>8}"
    )
    failures = compared = 0
    rng = np.random.default_rng(0)
    for case in _cases():
        inputs = case.make(rng)
        xla = jax.jit(lambda *a, case=case: case.run(*a, implementation="xla"))
        xla_out = xla(*inputs)
        xla_us = _time_us(lambda xla=xla, inputs=inputs: xla(*inputs), args.runs)
        problem = _reference_problem(xla_out)
        failures += bool(problem)
        if _cuda_unavailable(case, inputs):
            # Would a Hopper GPU run it? Ask the op again as if on one.
            with fm.assume_device():
                missing = _cuda_unavailable(case, inputs)
            if not missing:
                status, note = "needs a Hopper GPU", ""
            elif platform.extension() is None:
                status, note = "reference only", ""
            else:
                status, note = "reference only (no kernel yet)", missing
            print(f"{case.name:<30} {status:<31} {'-':>16} {'-':>9} {xla_us:>10.1f} {'-':>8}")
        else:
            cuda = jax.jit(lambda *a, case=case: case.run(*a, implementation="cuda"))
            difference = _max_difference(cuda(*inputs), xla_out)
            ok = difference <= 2e-2
            failures += not ok
            compared += 1
            cuda_us = _time_us(lambda cuda=cuda, inputs=inputs: cuda(*inputs), args.runs)
            status, note = ("ok" if ok else "MISMATCH"), ""
            print(
                f"{case.name:<30} {status:<31} {difference:>16.3g} {cuda_us:>9.1f} "
                f"{xla_us:>10.1f} {xla_us / cuda_us:>7.1f}x"
            )
        for line in (note, f"FAILED: the reference's {problem}" if problem else ""):
            if line:
                print(f"    {line}")

    print()
    if failures:
        print(f"{failures} check(s) FAILED")
    elif compared:
        print(f"all checks passed: {compared} kernel(s) matched their reference")
    else:
        print(f"references ran; no kernel could be compared here: {here or 'none is built'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
