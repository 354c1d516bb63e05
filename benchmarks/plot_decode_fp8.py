"""Plot bench_decode_fp8.py's JSON: per configuration and FP8 layout, our time on the bf16 cache
/ our time on the FP8 cache ("bf16_ratio") and FlashMLA's time on the bf16 cache / our time on
the FP8 cache ("ratio"), both measured in the same process on the same values; > 1 means the
FP8 call is faster.

    python benchmarks/plot_decode_fp8.py benchmarks/results/h200/decode_dense_fp8.json
    # writes benchmarks/results/h200/decode_dense_fp8.png (or --out PATH)
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # `python -P` leaves this folder off
import plot_decode
import plot_side_by_side as side_by_side

#: (record key, legend) of each bar of a configuration.
BARS = (("bf16_ratio", "our bf16 time / our FP8 time"), ("ratio", "FlashMLA bf16 time / our FP8"))


def plot(records: list[dict], out: Path, kernel: str | None = None, title: str = "") -> Path:
    plt = side_by_side.pyplot()
    kernel, rows = side_by_side.kernel_rows(records, kernel)
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(rows) + 3), 6))
    width = 0.8 / len(BARS)
    for index, (key, legend) in enumerate(BARS):
        values = [r.get(key) for r in rows]
        if all(v is None for v in values):
            continue
        xs = [i + (index - (len(BARS) - 1) / 2) * width for i in range(len(rows))]
        bars = ax.bar(xs, [math.nan if v is None else v for v in values], width, label=legend)
        ax.bar_label(bars, labels=["" if v is None else f"{v:.2f}" for v in values], fontsize=6)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)))
    labels = [f"{plot_decode.config_label(r)} {r['cache']}" for r in rows]
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("bf16 time / our FP8 time (> 1: FP8 faster)")
    ax.set_ylim(bottom=0)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    title = title or side_by_side.default_title(
        "dense MLA decode over FP8 caches", kernel, rows, lambda r: r["cache"]
    )
    return side_by_side.save(plt, fig, ax, title, out)


def main(argv=None) -> int:
    return side_by_side.main(argv, __doc__, "bench_decode_fp8.py", plot)


if __name__ == "__main__":
    sys.exit(main())
