"""Summarises an event trace written by decode_cycles.cu built with -DJFM_KERNEL_TRACE.

Per warpgroup (thread 0 of each records; warpgroup 0 of the shipped kernel is the producer),
the cycles between consecutive events: for each (event, next event) pair, how often it
occurs, the median gap and its share of the traced span. Event numbers are the JFM_TRACE()
arguments in the kernel source.

    python3 benchmarks/probes/trace_summary.py trace.txt
"""

import collections
import itertools
import statistics
import sys


def main(path: str) -> None:
    records = collections.defaultdict(list)
    with open(path) as f:
        for line in f:
            warpgroup, cycles, event = map(int, line.split())
            records[warpgroup].append((cycles, event))
    for warpgroup, recs in sorted(records.items()):
        gaps = collections.defaultdict(list)
        for (t0, e0), (t1, e1) in itertools.pairwise(recs):
            gaps[(e0, e1)].append(t1 - t0)
        span = recs[-1][0] - recs[0][0]
        print(f"warpgroup {warpgroup}: {len(recs)} events over {span} cycles")
        for (e0, e1), g in sorted(gaps.items(), key=lambda kv: -sum(kv[1])):
            if sum(g) >= 0.005 * span:  # leave out the rare pairs
                print(
                    f"  {e0:3d} -> {e1:3d}: n {len(g):5d}  median {statistics.median(g):7.0f}"
                    f"  share {sum(g) / max(span, 1):6.1%}"
                )


if __name__ == "__main__":
    main(sys.argv[1])
