"""GPU timeline of the benchmark's jitted loop, from JAX's own profiler (CUPTI; no nsys needed).

Times one config as bench_decode.py does (untraced), then runs its timed function (R op calls
in one jitted program, bench inputs and metadata) under jax.profiler.trace and prints, for the
last traced run, every kernel on the GPU with its duration and the idle gap before it; per
kernel name the count and median duration; the host's events of the run by total time; and
per op call the GPU's busy and idle time beside the host's wall time and the bench's figure.
Answers "is the per-call time in the bench our kernels, other work, or gaps between them?".

  python benchmarks/probes/jax_timeline.py 128 1 128 512 0          # b s_q h_q s_k causal
  python benchmarks/probes/jax_timeline.py 128 1 128 512 0 --calls 8 --show 24
"""

import argparse
import glob
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bench_decode


def read_trace(trace_dir: str):
    """(GPU events, host events): (start_ns, end_ns, name) of every event on the GPU's stream
    lines, sorted by start, and of every event on the host's lines but Python's own."""
    from jax.profiler import ProfileData

    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise SystemExit(f"no .xplane.pb under {trace_dir}")
    data = ProfileData.from_file(paths[0])
    gpu, host = [], []
    for plane in data.planes:
        for line in plane.lines:
            events = [(e.start_ns, e.end_ns, e.name) for e in line.events]
            if plane.name.startswith("/device:GPU") and line.name.startswith("Stream"):
                gpu += events
            elif plane.name.startswith("/host") and "python" not in line.name.lower():
                host += events
    if not gpu:
        raise SystemExit("the trace has no GPU stream events (no GPU, or CUPTI unavailable)")
    return sorted(gpu), host


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("b", "s_q", "h_q", "s_k", "causal"):
        parser.add_argument(name, type=int)
    parser.add_argument("--h-kv", type=int, default=1)
    parser.add_argument("--calls", type=int, default=16, help="op calls per jitted run (R)")
    parser.add_argument("--runs", type=int, default=3, help="traced runs (the last is shown)")
    parser.add_argument("--show", type=int, default=12, help="kernels of the last run to list")
    parser.add_argument("--implementation", choices=("cuda", "xla"), default="cuda")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import jax_flashmla as fm

    cfg = bench_decode.Config(
        "probe", args.b, args.s_q, args.h_q, args.h_kv, args.s_k, bool(args.causal)
    )
    inputs = bench_decode.make_inputs(cfg, jnp.bfloat16, cfg.b, args.calls)
    qs, k_cache, block_table, seqlens, lengths = inputs
    metadata = jax.jit(fm.get_mla_metadata, static_argnums=(1, 2))(
        seqlens, cfg.s_q * cfg.h_q // cfg.h_kv, cfg.h_kv
    )
    # First the bench's own figure for this config and R, untraced, to set beside the trace.
    bench_us = bench_decode.time_op(
        cfg, args.implementation, inputs, metadata, repeats=args.calls, runs=30, warmup_ms=200
    )
    many_calls = bench_decode.jitted_calls(cfg, args.implementation)
    call_args = (qs, k_cache, block_table, seqlens, *metadata)
    for _ in range(5):
        jax.block_until_ready(many_calls(*call_args))

    walls = []
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(args.runs):
                start = time.perf_counter()
                jax.block_until_ready(many_calls(*call_args))
                walls.append(time.perf_counter() - start)
        events, host_events = read_trace(trace_dir)

    # The last run: the events after the last idle gap of over 100 us (the host's wait between
    # runs; within a run the GPU is never idle that long).
    first = max(
        [i for i in range(1, len(events)) if events[i][0] - events[i - 1][1] > 100_000],
        default=0,
    )
    last_run = events[first:]
    print(
        f"# b {cfg.b} s_q {cfg.s_q} h_q {cfg.h_q} h_kv {cfg.h_kv} s_k {cfg.s_k} "
        f"causal {int(cfg.causal)} (mean {lengths.mean():.0f}), {args.calls} calls per run, "
        f"{jax.devices()[0].device_kind}"
    )
    print(f"last run: {len(last_run)} GPU events; the first {args.show}:")
    print(f"{'start us':>10} {'dur us':>8} {'gap us':>8}  name")
    origin = last_run[0][0]
    for i, (start, end, name) in enumerate(last_run[: args.show]):
        gap = (start - last_run[i - 1][1]) / 1e3 if i else 0.0
        offset, duration = (start - origin) / 1e3, (end - start) / 1e3
        print(f"{offset:>10.2f} {duration:>8.2f} {gap:>8.2f}  {name[:80]}")
    by_name: dict[str, list[float]] = {}
    for start, end, name in last_run:
        by_name.setdefault(name, []).append((end - start) / 1e3)
    print(f"{'count':>6} {'median us':>10}  name")
    for name, durations in sorted(by_name.items(), key=lambda item: -sum(item[1])):
        print(f"{len(durations):>6} {statistics.median(durations):>10.2f}  {name[:80]}")
    span = (last_run[-1][1] - origin) / 1e3
    # Kernels may overlap (programmatic dependent launch): busy time is the union of intervals.
    busy, covered_to = 0, origin
    for start, end, _ in last_run:
        busy += max(0, end - max(start, covered_to))
        covered_to = max(covered_to, end)
    # The host's work from the previous run's last kernel to this run's last one, by total time.
    window_start = events[first - 1][1] if first else origin - 2_000_000
    window_end = last_run[-1][1]
    host_time: dict[str, list[float]] = {}
    for start, end, name in host_events:
        if window_start <= start <= window_end:
            host_time.setdefault(name, []).append((end - start) / 1e3)
    print("host events from 2 ms before the run to its end, by total time:")
    print(f"{'count':>6} {'total us':>10}  name")
    for name, durations in sorted(host_time.items(), key=lambda item: -sum(item[1]))[:16]:
        print(f"{len(durations):>6} {sum(durations):>10.1f}  {name[:80]}")
    wall = statistics.median(walls) * 1e6
    n = args.calls
    print(
        f"per op call: GPU span {span / n:.1f} us, busy {busy / 1e3 / n:.1f} us, "
        f"idle {(span - busy / 1e3) / n:.1f} us; host wall per traced run {wall:.0f} us "
        f"({wall / n:.1f} us per call); bench_decode's figure (R = {n} minus R = {max(1, n // 4)},"
        f" untraced): {bench_us:.1f} us per call"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
