"""What the benchmarks' plots share: the records of one kernel, the title, the PNG, the command
line, and the bars of our TFLOPS beside FlashMLA's that both sparse benchmarks draw.

Not a script: plot_decode.py, plot_decode_sparse.py and plot_prefill_sparse.py load it (as
their folder to sys.path, which `python -P` leaves off).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path


def pyplot():
    """matplotlib.pyplot drawing into files only (Agg): the GPU machines have no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def kernel_rows(records: list[dict], kernel: str | None) -> tuple[str, list[dict]]:
    """(the kernel to plot, its records): `kernel`, by default "jax_flashmla" where the file
    has it, else the file's first kernel."""
    kernels = list(dict.fromkeys(r["kernel"] for r in records))
    if not kernels:
        raise SystemExit("no records to plot")
    if kernel is None:
        kernel = "jax_flashmla" if "jax_flashmla" in kernels else kernels[0]
    rows = [r for r in records if r["kernel"] == kernel]
    if not rows:
        raise SystemExit(f"no records of kernel {kernel!r}; the file has {kernels}")
    return kernel, rows


def default_title(what: str, kernel: str, rows: list[dict], detail: Callable[[dict], str]) -> str:
    """ "WHAT side by side, KERNEL (DETAILS), CARDS, DATES", each the sorted distinct values of
    the plotted records."""

    def values(of: Callable[[dict], str]) -> str:
        return ", ".join(sorted({of(r) for r in rows}))

    cards = values(lambda r: str(r.get("card")))
    dates = values(lambda r: str(r.get("date")))
    return f"{what} side by side, {kernel} ({values(detail)}), {cards}, {dates}"


def save(plt, fig, ax, title: str, out: Path) -> Path:
    """Titles the plot and writes it to `out` (its folder made if need be)."""
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def padded_note(record: dict) -> str:
    """ " (FlashMLA hN)" where FlashMLA ran the config with q padded to N heads, else ""."""
    padded = record.get("flashmla_h_q")
    return "" if padded is None or padded == record["h_q"] else f" (FlashMLA h{padded})"


def flashmla_tflops(
    records: list[dict],
    out: Path,
    kernel: str | None = None,
    title: str = "",
    *,
    label: Callable[[dict], str],
    what: str,
    detail: Callable[[dict], str],
    script: str,
) -> Path:
    """A sparse benchmark's plot: one pair of bars per config of `kernel` (kernel_rows), our
    TFLOPS and FlashMLA's on the same arrays in the same process, with the ratio (FlashMLA's
    time / ours, > 1: we are faster) written above each pair; a config FlashMLA did not run
    while it ran others has our bar only, marked "no FlashMLA"; a run without FlashMLA has our
    bars only and a note saying so (`script` without flash_mla). Configs are named by `label`;
    the default title is default_title's with `what` and `detail`."""
    plt = pyplot()
    kernel, rows = kernel_rows(records, kernel)
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
            else:
                ax.text(x, 1.06 * top, "no FlashMLA", ha="center", fontsize=6)
        ax.set_ylim(0, 1.3 * top)
    else:
        ax.text(
            0.5,
            0.5,
            f"FlashMLA did not run beside this kernel ({script} without flash_mla)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    ax.set_xticks(list(xs))
    ax.set_xticklabels([label(r) for r in rows], rotation=60, ha="right", fontsize=7)
    ratio_note = " (bold: FlashMLA time / ours, > 1: ours faster)" if measured else ""
    ax.set_ylabel("TFLOPS" + ratio_note)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return save(plt, fig, ax, title or default_title(what, kernel, rows, detail), out)


def main(argv, doc: str, script: str, plot: Callable[..., Path]) -> int:
    """A plot script's command line: JSON [--out PNG] [--kernel NAME] [--title TEXT], where
    JSON holds the records `script` wrote and `plot(records, out, kernel, title)` draws."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("json", type=Path, help=f"records written by {script} --json")
    parser.add_argument("--out", type=Path, help="PNG path (default: the JSON path, .png)")
    parser.add_argument("--kernel", help='records to plot (default "jax_flashmla")')
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    records = json.loads(args.json.read_text())
    out = plot(records, args.out or args.json.with_suffix(".png"), args.kernel, args.title)
    print(f"wrote {out}")
    return 0
