"""Plot bench_decode.py's JSON: the side-by-side ratios per configuration.

One pair of bars per configuration of our kernel (records whose "kernel" is --kernel, by
default "jax_flashmla", else the first kernel in the file): FlashMLA's time / ours ("ratio")
and FlashAttention-3 MLA's time / ours ("fa3_ratio"), both measured in the same process on the
same arrays; > 1 means we are faster. A run without peers has no ratio: the plot says so.

    python benchmarks/plot_decode.py benchmarks/results/h200/decode_dense.json
    # writes benchmarks/results/h200/decode_dense.png (or --out PATH)
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

#: The records of one kernel, the title and file and the command line, shared with the other
#: plots.
sys.path.insert(0, str(Path(__file__).parent))  # `python -P` leaves this folder off
import plot_side_by_side as side_by_side

#: (record key, legend) of each bar of a configuration.
BARS = (("ratio", "FlashMLA time / ours"), ("fa3_ratio", "FA3 MLA time / ours"))


def config_label(record: dict) -> str:
    causal = " causal" if record["causal"] else ""
    page = record.get("page", 64)  # records before other pages were benchmarked: 64
    paged = "" if page == 64 else f" page{page}"
    return f"b{record['b']} s_q{record['s_q']} h{record['h_q']} s_k{record['s_k']}{causal}{paged}"


def plot(records: list[dict], out: Path, kernel: str | None = None, title: str = "") -> Path:
    plt = side_by_side.pyplot()
    kernel, rows = side_by_side.kernel_rows(records, kernel)
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(rows) + 3), 6))
    width = 0.8 / len(BARS)
    measured = False
    for index, (key, legend) in enumerate(BARS):
        values = [r.get(key) for r in rows]
        if all(v is None for v in values):
            continue
        measured = True
        xs = [i + (index - (len(BARS) - 1) / 2) * width for i in range(len(rows))]
        heights = [math.nan if v is None else v for v in values]
        bars = ax.bar(xs, heights, width, label=legend)
        ax.bar_label(bars, labels=["" if v is None else f"{v:.2f}" for v in values], fontsize=6)
    if not measured:
        ax.text(
            0.5,
            0.5,
            "no peer ran beside this kernel (bench_decode.py without flash_mla / fa3_mla)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([config_label(r) for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("peer time / our time (> 1: ours faster)")
    ax.set_ylim(bottom=0)
    ax.grid(True, axis="y", alpha=0.3)
    if measured:
        ax.legend(fontsize=8, loc="best")
    title = title or side_by_side.default_title(
        "dense MLA decode", kernel, rows, lambda r: r["dtype"]
    )
    return side_by_side.save(plt, fig, ax, title, out)


def main(argv=None) -> int:
    return side_by_side.main(argv, __doc__, "bench_decode.py", plot)


if __name__ == "__main__":
    sys.exit(main())
