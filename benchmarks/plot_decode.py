"""Plot bench_decode.py's JSON: the side-by-side ratios per configuration.

One pair of bars per configuration of our kernel (records whose "kernel" is --kernel, by
default "jax_flashmla", else the first kernel in the file): FlashMLA's time / ours ("ratio")
and FlashAttention-3 MLA's time / ours ("fa3_ratio"), both measured in the same process on the
same arrays; > 1 means we are faster. A run without peers has no ratio: the plot says so.

    python benchmarks/plot_decode.py benchmarks/results/h200/decode_dense.json
    # writes benchmarks/results/h200/decode_dense.png (or --out PATH)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

#: (record key, legend) of each bar of a configuration.
BARS = (("ratio", "FlashMLA time / ours"), ("fa3_ratio", "FA3 MLA time / ours"))


def config_label(record: dict) -> str:
    causal = " causal" if record["causal"] else ""
    return f"b{record['b']} s_q{record['s_q']} h{record['h_q']} s_k{record['s_k']}{causal}"


def plot(records: list[dict], out: Path, kernel: str | None = None, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels = list(dict.fromkeys(r["kernel"] for r in records))
    if not kernels:
        raise SystemExit("no records to plot")
    if kernel is None:
        kernel = "jax_flashmla" if "jax_flashmla" in kernels else kernels[0]
    rows = [r for r in records if r["kernel"] == kernel]
    if not rows:
        raise SystemExit(f"no records of kernel {kernel!r}; the file has {kernels}")

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
    cards = ", ".join(sorted({str(r.get("card")) for r in rows}))
    dates = ", ".join(sorted({str(r.get("date")) for r in rows}))
    dtype = ", ".join(sorted({r["dtype"] for r in rows}))
    ax.set_title(
        title or f"dense MLA decode side by side, {kernel} ({dtype}), {cards}, {dates}",
        fontsize=10,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="records written by bench_decode.py --json")
    parser.add_argument("--out", type=Path, help="PNG path (default: the JSON path, .png)")
    parser.add_argument("--kernel", help='records to plot (default "jax_flashmla")')
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    records = json.loads(args.json.read_text())
    out = plot(records, args.out or args.json.with_suffix(".png"), args.kernel, args.title)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
