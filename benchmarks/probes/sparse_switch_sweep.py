"""Times the sparse FP8 decode under several settings of the runtime switches that
variants/sparse_switches.patch adds to the kernel (JFM_SWITCHES bits, read at every launch: 1
loads kept in L1 with a 256-byte L2 prefetch, 2 one empty-barrier arrival per math warp, 4
barrier waits that suspend, 8 no global loads, 16 no math; the 64-row kernel only, so h_q > 32
for V32 and E4M3), in one process, configuration by configuration, the settings interleaved so that
clock drift hits all alike. Timing as bench_decode_sparse.py (R = 20 calls in one jitted
function, R and R / 4 differenced, median of --runs), with XLA's command buffers off so that
each launch reads the variable.

On a Hopper GPU, with the package built from the patched tree:

    patch -d csrc -p1 < benchmarks/probes/variants/sparse_switches.patch
    pip install --no-build-isolation --no-deps .
    python3 -P benchmarks/probes/sparse_switch_sweep.py 0,1,2,4,7,8,16,0 \
        V32,128,128,2048 V32,64,64,2048 MODEL1,128,32,2048

Prints one row per configuration (bench_decode_sparse.py's --only syntax) with our time in
microseconds per setting. Bits 8 and 16 give wrong outputs on purpose (they time one side of
the kernel alone).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/
import bench_decode_sparse as bench


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("settings", help="comma list of JFM_SWITCHES values, e.g. 0,1,2,4,0")
    parser.add_argument("configs", nargs="+", type=bench.parse_only, help="LAYOUT,B,H_Q,TOPK")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args(argv)
    settings = [int(value) for value in args.settings.split(",")]
    calls = bench.jitted_calls("cuda")
    print("config".ljust(40) + "".join(f"{value:>10}" for value in settings))
    for cfg in args.configs:
        inputs = bench.make_inputs(cfg, 1 + cfg.b, 20)
        metadata = bench.schedule(cfg)
        times = []
        for value in settings:
            os.environ["JFM_SWITCHES"] = str(value)
            us = bench.time_op(calls, inputs, metadata, repeats=20, runs=args.runs, warmup=2)
            times.append(us)
        print(cfg.label.ljust(40) + "".join(f"{us:10.1f}" for us in times), flush=True)
        del inputs, metadata
    return 0


if __name__ == "__main__":
    sys.exit(main())
