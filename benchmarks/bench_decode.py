"""Dense MLA decode benchmark: jax_flashmla's kernel against FlashMLA's H200 figures and XLA.

Runs the dense-decode configurations of shared/docs/targets.md (b = 128, h_kv = 1, page 64,
varlen lengths ~ max(N(s_k, s_k / 2), s_q), random block table, bf16 by default):
  compute   h_q = 128, s_q in {1, 2}, causal or not, mean s_k in {4096, 8192, 16384, 32768}
  short     h_q = 128, s_q = 1, s_k in {512, 1024, 2048}
  bandwidth h_q = 16, s_q = 1, s_k in {4096, 16384}

Counting (semantics.md), with mean_s_k the actual mean of the drawn lengths:
  FLOPs = b * s_q * h_q * mean_s_k * 2 * (d_qk + d_v)
  bytes = b * (s_q * h_q * d_qk * 2 + mean_s_k * h_kv * d_qk * 2 + s_q * h_q * d_v * 2)

Timing: the whole user-visible call (main kernel + combine). The metadata is computed once,
outside, and passed in, as FlashMLA's users do. A jitted function makes n independent calls of
the op (each on its own q, all on the same cache, so XLA cannot merge them as common
subexpressions) and returns every output, so nothing is eliminated. After warm-up, the median
over --runs timed runs (time.perf_counter around the call and block_until_ready) is taken for
n = R and n = R / 4; the time of one call is their difference divided by the difference in n,
which removes the Python dispatch, the launch of the first kernel and the final
synchronisation (they are the same in both). Should noise make the difference non-positive
(tiny smoke-test sizes), the time of R calls divided by R is reported instead.

"ratio" compares with FlashMLA's figure at equal work: FlashMLA's lengths were drawn from the
same distribution but not identical to ours (their mean s_k was ~3% above the nominal one), so
ratio = our throughput / FlashMLA's (TFLOPS; GB/s for the bandwidth group), i.e. FlashMLA's
time scaled to our work divided by our time: > 1 means we are faster.

Examples:
  python benchmarks/bench_decode.py --json benchmarks/results/h200/decode_dense.json
  python benchmarks/bench_decode.py --configs bandwidth --skip-xla
  python benchmarks/bench_decode.py --scale 64 --implementation xla   # CPU smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import numpy as np

D_QK = 576
D_V = 512
PAGE = 64
BYTES_PER_VALUE = 2  # bf16 and fp16

#: FlashMLA's own kernels on the H200 (targets.md), keyed by (b, s_q, h_q, h_kv, s_k, causal):
#: (time in us, TFLOPS or None, TB/s or None) as published.
FLASHMLA_H200 = {
    (128, 1, 128, 1, 4096, False): (259, 582, None),
    (128, 1, 128, 1, 8192, False): (533, 565, None),
    (128, 1, 128, 1, 16384, False): (1037, 581, None),
    (128, 1, 128, 1, 32768, False): (2044, 589, None),
    (128, 2, 128, 1, 4096, False): (519, 580, None),
    (128, 2, 128, 1, 8192, False): (973, 619, None),
    (128, 2, 128, 1, 16384, False): (1947, 618, None),
    (128, 2, 128, 1, 32768, False): (4022, 599, None),
    (128, 1, 128, 1, 4096, True): (282, 534, None),
    (128, 1, 128, 1, 8192, True): (540, 558, None),
    (128, 1, 128, 1, 16384, True): (1066, 565, None),
    (128, 1, 128, 1, 32768, True): (2142, 562, None),
    (128, 2, 128, 1, 4096, True): (499, 604, None),
    (128, 2, 128, 1, 8192, True): (985, 611, None),
    (128, 2, 128, 1, 16384, True): (1976, 609, None),
    (128, 2, 128, 1, 32768, True): (4007, 601, None),
    (128, 1, 128, 1, 512, False): (63, 297, None),
    (128, 1, 128, 1, 1024, False): (95, 398, None),
    (128, 1, 128, 1, 2048, False): (156, 483, None),
    (128, 1, 16, 1, 4096, False): (181, None, 3.47),
    (128, 1, 16, 1, 16384, False): (636, None, 3.92),
}


@dataclasses.dataclass(frozen=True)
class Config:
    group: str  # "compute", "short" or "bandwidth"
    b: int
    s_q: int
    h_q: int
    h_kv: int
    s_k: int  # nominal mean length
    causal: bool

    @property
    def key(self) -> tuple:
        return (self.b, self.s_q, self.h_q, self.h_kv, self.s_k, self.causal)

    @property
    def label(self) -> str:
        causal = " causal" if self.causal else ""
        return f"b{self.b} s_q{self.s_q} h{self.h_q}/{self.h_kv} s_k{self.s_k}{causal}"

    def scaled(self, scale: int) -> Config:
        """Smaller b and s_k (for smoke tests off the GPU)."""
        if scale == 1:
            return self
        return dataclasses.replace(self, b=max(1, self.b // scale), s_k=max(1, self.s_k // scale))


CONFIGS = (
    [
        Config("compute", 128, s_q, 128, 1, s_k, causal)
        for s_q in (1, 2)
        for causal in (False, True)
        for s_k in (4096, 8192, 16384, 32768)
    ]
    + [Config("short", 128, 1, 128, 1, s_k, False) for s_k in (512, 1024, 2048)]
    + [Config("bandwidth", 128, 1, 16, 1, s_k, False) for s_k in (4096, 16384)]
)
GROUPS = ("compute", "short", "bandwidth")


def flops(b: int, s_q: int, h_q: int, mean_s_k: float) -> float:
    return b * s_q * h_q * mean_s_k * 2 * (D_QK + D_V)


def bytes_moved(b: int, s_q: int, h_q: int, h_kv: int, mean_s_k: float) -> float:
    per_request = s_q * h_q * D_QK + mean_s_k * h_kv * D_QK + s_q * h_q * D_V
    return b * per_request * BYTES_PER_VALUE


def flashmla_throughput(key: tuple) -> tuple[float, float, float] | None:
    """FlashMLA's (us, TFLOPS, GB/s) for a config key, the missing figure derived from the
    published one through the mean length it implies; None if FlashMLA has no figure."""
    if key not in FLASHMLA_H200:
        return None
    b, s_q, h_q, h_kv, _, _ = key
    us, tflops, tbps = FLASHMLA_H200[key]
    if tflops is not None:
        mean_s_k = tflops * 1e12 * us * 1e-6 / flops(b, s_q, h_q, 1.0)
        gbps = bytes_moved(b, s_q, h_q, h_kv, mean_s_k) / (us * 1e3)
    else:
        gbps = tbps * 1e3
        fixed = bytes_moved(b, s_q, h_q, h_kv, 0.0)
        mean_s_k = (gbps * us * 1e3 - fixed) / (bytes_moved(b, s_q, h_q, h_kv, 1.0) - fixed)
        tflops = flops(b, s_q, h_q, mean_s_k) / (us * 1e6)
    return us, tflops, gbps


def draw_lengths(cfg: Config, seed: int) -> np.ndarray:
    """int32 [b]: max(N(s_k, s_k / 2), s_q). The same standard normals for every config of one
    batch size, so the s_q / causal variants of a length see identical requests."""
    z = np.random.default_rng(seed).standard_normal(cfg.b)
    return np.maximum(cfg.s_k + cfg.s_k / 2 * z, cfg.s_q).astype(np.int32)


def make_inputs(cfg: Config, dtype, seed: int, repeats: int):
    """(list of `repeats` q, k_cache, block_table, cache_seqlens, lengths) on the device.

    As FlashMLA's benchmark: each request owns ceil(max_len / 64) blocks of a randomly permuted
    pool of b * that many blocks; values ~ N(0, 1) / 10.
    """
    import jax
    import jax.numpy as jnp

    lengths = draw_lengths(cfg, seed)
    max_blocks = max(1, -(-int(lengths.max()) // PAGE))
    rng = np.random.default_rng(seed + 1)
    block_table = rng.permutation(cfg.b * max_blocks).reshape(cfg.b, max_blocks)
    key_q, key_k = jax.random.split(jax.random.key(seed))

    @jax.jit
    def cache_fn(key):
        # Block by block, so that a 10 GB cache needs no 40 GB of random-bit intermediates.
        def one_block(index):
            shape = (PAGE, cfg.h_kv, D_QK)
            return (jax.random.normal(jax.random.fold_in(key, index), shape) / 10).astype(dtype)

        num_blocks = cfg.b * max_blocks
        step = max(1, min(num_blocks, (1 << 24) // (PAGE * cfg.h_kv * D_QK)))
        return jax.lax.map(one_block, jnp.arange(num_blocks), batch_size=step)

    shape = (cfg.b, cfg.s_q, cfg.h_q, D_QK)
    q_fn = jax.jit(lambda key: (jax.random.normal(key, shape) / 10).astype(dtype))
    qs = [q_fn(jax.random.fold_in(key_q, i)) for i in range(repeats)]
    k_cache = cache_fn(key_k)
    args = (k_cache, jnp.asarray(block_table, jnp.int32), jnp.asarray(lengths, jnp.int32))
    jax.block_until_ready((qs, args))
    return qs, *args, lengths


def kernel_unavailable(cfg: Config, dtype, implementation: str) -> str:
    """Why the op cannot take this config with `implementation` ("" when it can)."""
    import jax

    import jax_flashmla as fm

    structs = (
        jax.ShapeDtypeStruct((cfg.b, cfg.s_q, cfg.h_q, D_QK), dtype),
        jax.ShapeDtypeStruct((cfg.b, PAGE, cfg.h_kv, D_QK), dtype),
        jax.ShapeDtypeStruct((cfg.b, 1), np.int32),
        jax.ShapeDtypeStruct((cfg.b,), np.int32),
    )

    def call(q, k_cache, block_table, seqlens):
        return fm.flash_mla_with_kvcache(
            q, k_cache, block_table, seqlens, D_V, causal=cfg.causal, implementation=implementation
        )

    try:
        jax.eval_shape(call, *structs)
    except ValueError as error:
        return str(error)
    return ""


def jitted_calls(cfg: Config, implementation: str):
    """The timed function: one jitted program making one op call per q of a list, all on the
    same cache and metadata, returning every output."""
    import jax

    import jax_flashmla as fm

    @jax.jit
    def many_calls(qs, k_cache, block_table, seqlens, tile_metadata, num_splits):
        return [
            fm.flash_mla_with_kvcache(
                q,
                k_cache,
                block_table,
                seqlens,
                D_V,
                tile_metadata,
                num_splits,
                causal=cfg.causal,
                implementation=implementation,
            )
            for q in qs
        ]

    return many_calls


def time_op(
    cfg: Config,
    implementation: str,
    inputs,
    metadata,
    *,
    repeats: int,
    runs: int,
    warmup: int,
) -> float:
    """Median time of one call in microseconds (see the module docstring)."""
    import jax

    qs, k_cache, block_table, seqlens, _ = inputs
    many_calls = jitted_calls(cfg, implementation)

    def median_time(n: int) -> float:
        args = (qs[:n], k_cache, block_table, seqlens, *metadata)
        for _ in range(warmup):
            jax.block_until_ready(many_calls(*args))
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            outs = many_calls(*args)
            jax.block_until_ready(outs)
            times.append(time.perf_counter() - start)
            del outs
        return statistics.median(times)

    many = median_time(repeats)
    few = max(1, repeats // 4)
    if few == repeats:
        return many / repeats * 1e6
    per_call = (many - median_time(few)) / (repeats - few)
    # Noise larger than the calls themselves (tiny smoke-test sizes) can make the difference
    # non-positive: fall back to the plain mean, which overstates the time a little.
    return (per_call if per_call > 0 else many / repeats) * 1e6


def record(kernel: str, cfg: Config, dtype_name: str, us: float, mean_s_k: float, scale: int):
    tflops = flops(cfg.b, cfg.s_q, cfg.h_q, mean_s_k) / (us * 1e6)
    gbps = bytes_moved(cfg.b, cfg.s_q, cfg.h_q, cfg.h_kv, mean_s_k) / (us * 1e3)
    reference = flashmla_throughput(cfg.key) if scale == 1 else None
    ratio = None
    if reference is not None:
        _, ref_tflops, ref_gbps = reference
        ratio = gbps / ref_gbps if cfg.group == "bandwidth" else tflops / ref_tflops
    return {
        "kernel": kernel,
        "b": cfg.b,
        "s_q": cfg.s_q,
        "h_q": cfg.h_q,
        "h_kv": cfg.h_kv,
        "s_k": cfg.s_k,
        "causal": cfg.causal,
        "varlen": True,
        "dtype": dtype_name,
        "us": round(us, 2),
        "tflops": round(tflops, 2),
        "gbps": round(gbps, 1),
        "flashmla_us": None if reference is None else reference[0],
        "ratio": None if ratio is None else round(ratio, 3),
    }


def fmt(value, spec: str) -> str:
    """`value` formatted with `spec` (e.g. ">9.1f"), or a dash of the same width."""
    width = int("".join(ch for ch in spec.split(".")[0] if ch.isdigit()) or 0)
    return "-".rjust(width) if value is None else format(value, spec)


def print_row(cfg_label: str, main: dict, xla: dict | None) -> None:
    speedup = None if xla is None else xla["us"] / main["us"]
    print(
        f"{cfg_label:<42} {main['us']:>9.1f} {main['tflops']:>7.1f} {main['gbps']:>8.1f} "
        f"{fmt(main['flashmla_us'], '>11.0f')} {fmt(main['ratio'], '>6.3f')} "
        f"{fmt(None if xla is None else xla['us'], '>10.1f')} {fmt(speedup, '>7.2f')}",
        flush=True,
    )


def select_configs(spec: str) -> list[Config]:
    names = {name.strip() for name in spec.split(",") if name.strip()}
    unknown = names - {"all", *GROUPS}
    if unknown:
        raise SystemExit(f"unknown --configs {sorted(unknown)}; use all or {', '.join(GROUPS)}")
    return [c for c in CONFIGS if "all" in names or c.group in names]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs", default="all", help="all, or a comma list of " + ", ".join(GROUPS)
    )
    parser.add_argument("--implementation", choices=("cuda", "xla"), default="cuda")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=20, help="op calls per jitted function (R)")
    parser.add_argument("--runs", type=int, default=30, help="timed runs (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--skip-xla", action="store_true", help="do not time the XLA reference")
    parser.add_argument("--xla-repeats", type=int, default=1)
    parser.add_argument("--xla-runs", type=int, default=5)
    parser.add_argument("--scale", type=int, default=1, help="divide b and s_k (smoke tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.runs < 1 or args.xla_repeats < 1 or args.xla_runs < 1:
        parser.error("--repeats, --runs, --xla-repeats and --xla-runs must be >= 1")
    if args.scale < 1:
        parser.error("--scale must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp

    import jax_flashmla as fm

    dtype = jnp.dtype(args.dtype)
    configs = [c.scaled(args.scale) for c in select_configs(args.configs)]
    main_kernel = "jax_flashmla" if args.implementation == "cuda" else "xla_reference"
    time_xla = args.implementation == "cuda" and not args.skip_xla

    reason = kernel_unavailable(configs[0], dtype, args.implementation) if configs else ""
    if reason:
        print(f"cannot benchmark implementation={args.implementation!r}: {reason}", file=sys.stderr)
        return 1

    device = jax.devices()[0]
    print(
        f"# jax {jax.__version__}, {device.device_kind} ({device.platform}), {args.dtype}, "
        f"main = {main_kernel}, R = {args.repeats} (time of R calls - time of R/4, per call), "
        f"median of {args.runs} runs"
        + ("" if args.scale == 1 else f", scale 1/{args.scale} (FlashMLA figures not comparable)")
    )
    print(
        f"{'config':<42} {'us':>9} {'TFLOPS':>7} {'GB/s':>8} {'FlashMLA us':>11} {'ratio':>6} "
        f"{'XLA us':>10} {'vs XLA':>7}"
    )
    records = []
    metadata_fn = jax.jit(fm.get_mla_metadata, static_argnums=(1, 2))
    for cfg in configs:
        repeats = max(args.repeats, args.xla_repeats if time_xla else 0)
        inputs = make_inputs(cfg, dtype, args.seed + cfg.b, repeats)
        lengths = inputs[-1]
        mean_s_k = float(lengths.mean())
        metadata = metadata_fn(inputs[3], cfg.s_q * cfg.h_q // cfg.h_kv, cfg.h_kv)
        jax.block_until_ready(metadata)
        us = time_op(
            cfg,
            args.implementation,
            inputs,
            metadata,
            repeats=args.repeats,
            runs=args.runs,
            warmup=args.warmup,
        )
        main_record = record(main_kernel, cfg, args.dtype, us, mean_s_k, args.scale)
        records.append(main_record)
        xla_record = None
        if time_xla:
            xla_us = time_op(
                cfg,
                "xla",
                inputs,
                metadata,
                repeats=args.xla_repeats,
                runs=args.xla_runs,
                warmup=1,
            )
            xla_record = record("xla_reference", cfg, args.dtype, xla_us, mean_s_k, args.scale)
            records.append(xla_record)
        shown_xla = xla_record if time_xla else None
        print_row(f"{cfg.label} (mean {mean_s_k:.0f})", main_record, shown_xla)
        del inputs, metadata

    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
            f.write("\n")
        print(f"# wrote {len(records)} records to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
