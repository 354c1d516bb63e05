"""Dense MLA decode over an FP8 cache: jax_flashmla with the V32 and the E4M3 caches beside
itself with the bf16 cache and beside FlashMLA (bf16 cache), on the same values.

Configurations: the dense benchmark's compute, short and bandwidth groups (bench_decode.py: b
128, h_q 128 or 16, page 64, varlen lengths ~ max(N(s_k, s_k / 2), s_q), random block table),
or the configurations given with --only b,s_q,h_q,s_k,causal[,page] (repeatable).

Inputs: bench_decode.make_inputs (bf16 q and cache), and that cache quantised by
quantize_k_cache(layout="V32") (656 bytes per token: 512 e4m3 values, 4 float32 scales, 64 bf16
RoPE values) and by quantize_k_cache_e4m3 (576 e4m3 values per token, one float32 scale), so
all of our calls attend the same keys up to the quantisation (--layouts picks the FP8 ones).

Counting, with mean_s_k the actual mean of the drawn lengths:
  FLOPs = b * s_q * h_q * mean_s_k * 2 * (d_qk + d_v)                (as the dense benchmark)
  bytes = b * (s_q * h_q * (d_qk + d_v) * 2 + mean_s_k * token_bytes) (656 V32, 576 E4M3)

Timing: bench_decode.py's method (R calls in one jitted function, R and R / 4 differenced,
median of --runs) for our op on each FP8 cache and then on the bf16 cache; FlashMLA's dense
decode on the bf16 cache side by side (its dense decode takes no FP8 cache), checked against our
bf16 output. bf16_ratio = our bf16 time / our FP8 time and ratio = FlashMLA's time / our FP8
time (> 1: the FP8 cache is faster).

Examples:
  source ../shared/peers/setup_peers.sh &&
    python3 -P benchmarks/bench_decode_fp8.py --json benchmarks/results/h200/decode_dense_fp8.json
  python3 -P benchmarks/bench_decode_fp8.py --only 128,1,16,16384,0
  python3 -P benchmarks/bench_decode_fp8.py --scale 64 --implementation xla   # CPU smoke test
"""

from __future__ import annotations

import sys
from pathlib import Path

from jax_flashmla._src.geometry import HEAD_DIM_QK, HEAD_DIM_V

sys.path.insert(0, str(Path(__file__).parent))  # `python -P` leaves this folder off
import bench_decode as dense

#: FP8 layout -> bytes per token.
LAYOUTS = {"V32": 656, "E4M3": 576}
GROUPS = ("compute", "short", "bandwidth")
CONFIGS = [c for c in dense.CONFIGS if c.group in GROUPS]


def bytes_moved(cfg: dense.Config, mean_s_k: float, layout: str) -> float:
    per_request = cfg.s_q * cfg.h_q * (HEAD_DIM_QK + HEAD_DIM_V) * 2 + mean_s_k * LAYOUTS[layout]
    return cfg.b * per_request


def quantized(cache, layout: str) -> tuple:
    """(the FP8 cache, its k_scale or None)."""
    import jax

    import jax_flashmla as fm

    if layout == "V32":
        return jax.block_until_ready(fm.quantize_k_cache(cache, layout="V32")), None
    return jax.block_until_ready(fm.quantize_k_cache_e4m3(cache))


def jitted_fp8_calls(cfg: dense.Config, implementation: str):
    """The timed function on the FP8 cache, as bench_decode.jitted_calls on the bf16 one."""
    import jax

    import jax_flashmla as fm

    @jax.jit
    def many_calls(qs, k_cache, k_scale, block_table, seqlens, tile_metadata, num_splits):
        return [
            fm.flash_mla_with_kvcache(
                q,
                k_cache,
                block_table,
                seqlens,
                HEAD_DIM_V,
                tile_metadata,
                num_splits,
                causal=cfg.causal,
                is_fp8_kvcache=True,
                k_scale=k_scale,
                implementation=implementation,
            )
            for q in qs
        ]

    return many_calls


def time_fp8(cfg, implementation: str, inputs, fp8, metadata, **timing) -> float:
    """Median time of one call of our op on the FP8 cache `fp8` (cache, k_scale), in
    microseconds."""
    qs, _, block_table, seqlens, _ = inputs
    return dense.jax_time_us(
        jitted_fp8_calls(cfg, implementation),
        lambda n: (qs[:n], *fp8, block_table, seqlens, *metadata),
        **timing,
    )


def record(
    cfg, layout: str, us: float, bf16_us: float, mean_s_k: float, peers, card: str, date: str
) -> dict:
    """bench_decode's record of the FP8 call, with the FP8 cache's bytes and our bf16 time."""
    rec = dense.record("jax_flashmla", cfg, "bfloat16", us, mean_s_k, peers, card, date)
    rec["cache"] = f"fp8_{layout.lower()}"
    rec["gbps"] = round(bytes_moved(cfg, mean_s_k, layout) / (us * 1e3), 1)
    rec["bf16_us"] = round(bf16_us, 2)
    rec["bf16_ratio"] = round(bf16_us / us, 3)
    return rec


HEADER = (
    f"{'config':<52} {'fp8 us':>9} {'GB/s':>8} {'bf16 us':>9} {'vs bf16':>7} "
    f"{'FlashMLA':>9} {'ratio':>6} {'FM err':>8}"
)


def print_row(label: str, rec: dict) -> None:
    print(
        f"{label:<52} {rec['us']:>9.1f} {rec['gbps']:>8.1f} {rec['bf16_us']:>9.1f} "
        f"{rec['bf16_ratio']:>7.3f} {dense.fmt(rec['flashmla_us'], '>9.1f')} "
        f"{dense.fmt(rec['ratio'], '>6.3f')} {dense.fmt(rec['peer_rel_err'], '>8.1e')}",
        flush=True,
    )


def flashmla_only(args) -> tuple:
    """bench_decode's torch peers without FA3 (whose MLA mode reads no FP8 cache either)."""
    peers, _ = dense.torch_peers(args)
    peers.modules.pop("fa3", None)
    return peers, ", ".join(peers.names) or "none importable"


def parse_args(argv=None):
    parser = dense.parser_with_configs(__doc__, GROUPS)
    dense.only_argument(parser, dense.parse_only, "B,S_Q,H_Q,S_K,CAUSAL[,PAGE]", "h_kv 1")
    parser.add_argument(
        "--layouts", default=",".join(LAYOUTS), help="a comma list of " + ", ".join(LAYOUTS)
    )
    args = dense.sparse_args(parser, argv, "divide b and s_k (smoke tests)")
    args.layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    unknown = set(args.layouts) - set(LAYOUTS)
    if unknown or not args.layouts:
        parser.error(f"--layouts takes {', '.join(LAYOUTS)}; got {sorted(unknown) or 'none'}")
    return args


def main(argv=None, measure_peers: dense.PeerMeasure | None = None) -> int:
    """Run the benchmark; `measure_peers` replaces FlashMLA (tests)."""
    args = parse_args(argv)
    args.dtype = "bfloat16"
    want_peers = dense.peers_wanted(args, measure_peers, ("flash_mla",))
    import jax
    import jax.numpy as jnp

    import jax_flashmla as fm

    configs = args.only or dense.in_groups(CONFIGS, args.configs, GROUPS)
    configs = [c.scaled(args.scale) for c in configs]
    device, card, date = dense.where_and_when()
    measure_peers, peers_note = dense.chosen_peers(
        args,
        want_peers,
        measure_peers,
        device,
        ("flash_mla",),
        lambda: flashmla_only(args),
    )
    kernel = dense.kernel_name(args.implementation)
    caches = " and ".join(args.layouts)
    print(dense.header_line(device, date, f"bf16 q, {caches} FP8 caches", kernel, args))
    print(
        f"# beside our bf16 cache and FlashMLA's bf16 dense decode (same process, same values; "
        f"vs bf16 = our bf16 us / our fp8 us, ratio = FlashMLA us / our fp8 us): {peers_note}"
    )
    print(HEADER)
    records, disagreements = [], []
    metadata_fn = jax.jit(fm.get_mla_metadata, static_argnums=(1, 2))
    timing = {"repeats": args.repeats, "runs": args.runs, "warmup_ms": args.warmup_ms}
    for cfg in configs:
        inputs = dense.make_inputs(cfg, jnp.bfloat16, args.seed + cfg.b, args.repeats)
        qs, k_cache, block_table, seqlens, lengths = inputs
        mean_s_k = float(lengths.mean())
        metadata = jax.block_until_ready(
            metadata_fn(seqlens, cfg.s_q * cfg.h_q // cfg.h_kv, cfg.h_kv)
        )
        fp8_us = {}
        for layout in args.layouts:
            fp8 = quantized(k_cache, layout)
            fp8_us[layout] = time_fp8(cfg, args.implementation, inputs, fp8, metadata, **timing)
            del fp8
        bf16_us = dense.time_op(cfg, args.implementation, inputs, metadata, **timing)
        peers = {}
        if measure_peers is not None and cfg.page == 64:
            bf16_calls = dense.jitted_calls(cfg, args.implementation)
            ours = bf16_calls(qs[:1], k_cache, block_table, seqlens, *metadata)[0][0]
            peers = measure_peers(cfg, inputs, jax.block_until_ready(ours))
            for name, result in peers.items():
                dense.note_disagreement(disagreements, name, cfg.label, result)
        for layout, us in fp8_us.items():
            rec = record(cfg, layout, us, bf16_us, mean_s_k, peers, card, date)
            rec["kernel"] = kernel
            records.append(rec)
            print_row(f"{cfg.label} (mean {mean_s_k:.0f}) {layout}", rec)
        del inputs, qs, k_cache, block_table, seqlens, metadata
        dense.save_records(records, args.json)
    return dense.finish(records, args.json, disagreements)


if __name__ == "__main__":
    sys.exit(main())
