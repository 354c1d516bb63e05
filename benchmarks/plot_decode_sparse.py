"""Plot bench_decode_sparse.py's JSON: our TFLOPS and FlashMLA's per configuration.

One pair of bars per configuration of our kernel (records whose "kernel" is --kernel, by
default "jax_flashmla", else the first kernel in the file): our TFLOPS and FlashMLA's on the
same arrays in the same process, with the ratio (FlashMLA's time / ours, > 1: we are faster)
written above each pair. A run without FlashMLA has our bars only: the plot says so.

    python benchmarks/plot_decode_sparse.py benchmarks/results/h200/decode_sparse.json
    # writes benchmarks/results/h200/decode_sparse.png (or --out PATH)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def config_label(record: dict) -> str:
    label = f"{record['layout']} b{record['b']} h{record['h_q']} topk{record['topk']}"
    padded = record.get("flashmla_h_q")
    if padded is not None and padded != record["h_q"]:
        label += f" (FlashMLA h{padded})"
    return label


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

    fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(rows) + 3), 6))
    width = 0.4
    xs = range(len(rows))
    ours = ax.bar([x - width / 2 for x in xs], [r["tflops"] for r in rows], width, label=kernel)
    ax.bar_label(ours, fmt="%.0f", fontsize=6)
    theirs = [r.get("flashmla_tflops") for r in rows]
    measured = any(v is not None for v in theirs)
    if measured:
        heights = [math.nan if v is None else v for v in theirs]
        bars = ax.bar([x + width / 2 for x in xs], heights, width, label="FlashMLA")
        ax.bar_label(bars, labels=["" if v is None else f"{v:.0f}" for v in theirs], fontsize=6)
        top = max(max(r["tflops"] for r in rows), max(v for v in theirs if v is not None))
        for x, r in zip(xs, rows, strict=True):
            if r.get("ratio") is not None:
                ax.text(x, 1.06 * top, f"{r['ratio']:.2f}", ha="center", fontsize=7, weight="bold")
        ax.set_ylim(0, 1.3 * top)
    else:
        ax.text(
            0.5,
            0.5,
            "FlashMLA did not run beside this kernel (bench_decode_sparse.py without flash_mla)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    ax.set_xticks(list(xs))
    ax.set_xticklabels([config_label(r) for r in rows], rotation=60, ha="right", fontsize=7)
    ratio_note = " (bold: FlashMLA time / ours, > 1: ours faster)" if measured else ""
    ax.set_ylabel("TFLOPS" + ratio_note)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    cards = ", ".join(sorted({str(r.get("card")) for r in rows}))
    dates = ", ".join(sorted({str(r.get("date")) for r in rows}))
    shapes = ", ".join(sorted({f"s_q {r['s_q']}, s_k {r['s_k']}" for r in rows}))
    ax.set_title(
        title or f"sparse FP8 MLA decode side by side, {kernel} ({shapes}), {cards}, {dates}",
        fontsize=10,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="records written by bench_decode_sparse.py --json")
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
