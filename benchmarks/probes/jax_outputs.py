"""Whether the JAX benchmark's per-call figure carries the cost of its output buffers.

bench_decode.py times one jitted program of R op calls that returns every call's outputs (2R
arrays), against R / 4 calls, and takes the difference per call. Work that PJRT does per
returned array before the program's first kernel runs (allocation, bookkeeping) grows with R,
so it is not differenced away, while FlashMLA's side replays a CUDA graph whose outputs are
allocated once. This probe times, in one process and on the same inputs, the bench's program
and the same R calls returning one array (the calls' LSEs stacked: a few KB, one small kernel
per run), and prints both per-call figures and their difference. If the difference is most of
the gap between the bench's figure and the GPU's busy time (`jax_timeline.py`), the bench
measures PJRT's outputs as much as our kernels.

  python benchmarks/probes/jax_outputs.py 128 1 128 4096 0      # b s_q h_q s_k causal
  python benchmarks/probes/jax_outputs.py 1 1 128 1024 0 --calls 20 --runs 30
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bench_decode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("b", "s_q", "h_q", "s_k", "causal"):
        parser.add_argument(name, type=int)
    parser.add_argument("--h-kv", type=int, default=1)
    parser.add_argument("--calls", type=int, default=20, help="op calls per jitted run (R)")
    parser.add_argument("--runs", type=int, default=30, help="timed runs (median)")
    parser.add_argument("--rounds", type=int, default=3, help="both figures, this many times")
    parser.add_argument("--warmup-ms", type=float, default=200.0)
    parser.add_argument(
        "--implementation",
        choices=("cuda", "xla"),
        default="cuda",
        help="xla: a smoke run only (XLA drops the unused outputs' work there)",
    )
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import jax_flashmla as fm

    cfg = bench_decode.Config(
        "probe", args.b, args.s_q, args.h_q, args.h_kv, args.s_k, bool(args.causal)
    )
    qs, k_cache, block_table, seqlens, lengths = bench_decode.make_inputs(
        cfg, jnp.bfloat16, cfg.b, args.calls
    )
    metadata = jax.jit(fm.get_mla_metadata, static_argnums=(1, 2))(
        seqlens, cfg.s_q * cfg.h_q // cfg.h_kv, cfg.h_kv
    )
    every_output = bench_decode.jitted_calls(cfg, args.implementation)

    @jax.jit
    def one_output(*call_args):
        return jnp.stack([lse for _, lse in every_output(*call_args)])

    def args_of(n: int) -> tuple:
        return (qs[:n], k_cache, block_table, seqlens, *metadata)

    print(
        f"# b {cfg.b} s_q {cfg.s_q} h_q {cfg.h_q} h_kv {cfg.h_kv} s_k {cfg.s_k} "
        f"causal {int(cfg.causal)} (mean {lengths.mean():.0f}), R = {args.calls}, "
        f"{jax.devices()[0].device_kind}"
    )
    print(f"{'round':>5} {'2R outputs us':>14} {'1 output us':>12} {'difference':>11}")
    for round_ in range(args.rounds):
        figures = [
            bench_decode.jax_time_us(
                calls, args_of, repeats=args.calls, runs=args.runs, warmup_ms=args.warmup_ms
            )
            for calls in (every_output, one_output)
        ]
        print(
            f"{round_:>5} {figures[0]:>14.1f} {figures[1]:>12.1f} {figures[0] - figures[1]:>11.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
