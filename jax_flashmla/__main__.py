"""`python -m jax_flashmla`: report the environment, check every op, time kernel vs reference.

On a Hopper GPU each op whose kernel is built runs both backends on small random inputs; the
outputs are compared and timed. Elsewhere the references run alone, and the report says which
GPU each kernel needs.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jax_flashmla", description=__doc__)
    parser.add_argument("--runs", type=int, default=20, help="timed runs per op (median)")
    args = parser.parse_args(argv)

    device = platform.target_device()
    print(
        f"jax_flashmla {fm.__version__}: jax {jax.__version__}, "
        f"Python {host_platform.python_version()}"
    )
    gpu = f", compute capability {device.compute_capability}, {device.num_sms} SMs"
    print(f"device: {device.kind} ({device.platform}{gpu if device.platform == 'gpu' else ''})")
    ext = platform.extension()
    if ext is None:
        print(f"CUDA extension: not available: {platform.extension_unavailable_reason()}")
    else:
        print(
            f"CUDA extension: built for {', '.join(ext.compiled_architectures())}, "
            f"CUDA runtime {ext.cuda_runtime_version()}"
        )
    device_reason = platform.device_unsupported_reason(device)

    print(
        f"\n{'op':<32} {'kernel':<10} {'max |cuda - xla|':>16} {'cuda us':>10} "
        f"{'xla us':>10} {'speed-up':>9}"
    )
    failures = 0
    rng = np.random.default_rng(0)
    for case in _cases():
        inputs = case.make(rng)
        cuda = jax.jit(lambda *a, case=case: case.run(*a, implementation="cuda"))
        try:
            cuda.trace(*inputs)  # raises a ValueError saying why when there is no kernel
            reason = ""
        except ValueError as error:
            reason = str(error).split("unavailable: ", 1)[-1]
        xla = jax.jit(lambda *a, case=case: case.run(*a, implementation="xla"))
        xla_out = xla(*inputs)
        xla_us = _time_us(lambda xla=xla, inputs=inputs: xla(*inputs), args.runs)
        if reason:
            finite = all(np.isfinite(np.asarray(o, np.float64)).any() for o in xla_out)
            failures += not finite
            print(
                f"{case.name:<32} {'-':<10} {'(reference)':>16} {'-':>10} {xla_us:>10.1f} {'-':>9}"
            )
            print(f"    kernel unavailable: {reason}")
            continue
        difference = _max_difference(cuda(*inputs), xla_out)
        ok = difference <= 2e-2
        failures += not ok
        cuda_us = _time_us(lambda cuda=cuda, inputs=inputs: cuda(*inputs), args.runs)
        print(
            f"{case.name:<32} {'ok' if ok else 'MISMATCH':<10} {difference:>16.3g} "
            f"{cuda_us:>10.1f} {xla_us:>10.1f} {xla_us / cuda_us:>8.1f}x"
        )
    if device_reason:
        print(
            f"\nKernels need an NVIDIA Hopper GPU (H100/H200/H800, sm_90); here: {device_reason}."
        )
    print("\nall checks passed" if not failures else f"\n{failures} check(s) FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
