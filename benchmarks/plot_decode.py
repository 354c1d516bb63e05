"""Plot bench_decode.py's JSON: TFLOPS and GB/s against s_k, FlashMLA's H200 figures dashed.

One solid line per (s_q, causal, h_q) series of our kernel (records whose "kernel" is
--kernel, by default "jax_flashmla", else the first kernel in the file), and for each series
FlashMLA's published figure at the same (s_q, causal, h_q) as a dashed line of the same colour.

    python benchmarks/plot_decode.py benchmarks/results/h200/decode_dense.json
    # writes benchmarks/results/h200/decode_dense.png (or --out PATH)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_decode  # FlashMLA's figures and how they are counted


def series_label(s_q: int, causal: bool, h_q: int) -> str:
    return f"s_q={s_q} h_q={h_q}" + (" causal" if causal else "")


def group_records(records: list[dict], kernel: str) -> dict[tuple, list[dict]]:
    series: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if r["kernel"] == kernel:
            series[(r["s_q"], r["causal"], r["h_q"])].append(r)
    return {k: sorted(v, key=lambda r: r["s_k"]) for k, v in sorted(series.items())}


def flashmla_series() -> dict[tuple, list[tuple[int, float, float]]]:
    """(s_q, causal, h_q) -> [(s_k, TFLOPS, GB/s)] of FlashMLA's H200 figures."""
    series: dict[tuple, list[tuple[int, float, float]]] = defaultdict(list)
    for key in bench_decode.FLASHMLA_H200:
        _, s_q, h_q, _, s_k, causal = key
        _, tflops, gbps = bench_decode.flashmla_throughput(key)
        series[(s_q, causal, h_q)].append((s_k, tflops, gbps))
    return {k: sorted(v) for k, v in series.items()}


def plot(records: list[dict], out: Path, kernel: str | None = None, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels = list(dict.fromkeys(r["kernel"] for r in records))
    if not kernels:
        raise SystemExit("no records to plot")
    if kernel is None:
        kernel = "jax_flashmla" if "jax_flashmla" in kernels else kernels[0]
    ours = group_records(records, kernel)
    if not ours:
        raise SystemExit(f"no records of kernel {kernel!r}; the file has {kernels}")
    theirs = flashmla_series()

    fig, (ax_flops, ax_bytes) = plt.subplots(1, 2, figsize=(13, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ticks: set[int] = set()
    for index, (key, rows) in enumerate(ours.items()):
        colour = colours[index % len(colours)]
        s_k = [r["s_k"] for r in rows]
        ticks.update(s_k)
        label = series_label(*key)
        ax_flops.plot(s_k, [r["tflops"] for r in rows], "o-", color=colour, label=label)
        ax_bytes.plot(s_k, [r["gbps"] for r in rows], "o-", color=colour, label=label)
        if key in theirs:
            ref_s_k, ref_tflops, ref_gbps = zip(*theirs[key], strict=True)
            ticks.update(ref_s_k)
            style = {"color": colour, "linestyle": "--", "marker": "x", "alpha": 0.8}
            ax_flops.plot(ref_s_k, ref_tflops, label=f"FlashMLA {label}", **style)
            ax_bytes.plot(ref_s_k, ref_gbps, label=f"FlashMLA {label}", **style)

    dtype = ", ".join(sorted({r["dtype"] for r in records}))
    for ax, ylabel in ((ax_flops, "TFLOPS"), (ax_bytes, "GB/s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ticks))
        ax.set_xticklabels([str(t) for t in sorted(ticks)], rotation=45)
        ax.minorticks_off()
        ax.set_xlabel("mean s_k (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    ax_flops.set_title("compute (FLOPs as semantics.md)")
    ax_bytes.set_title("memory traffic (bytes as semantics.md)")
    ax_bytes.legend(fontsize=7, loc="best")
    fig.suptitle(
        title or f"dense MLA decode, {kernel} ({dtype}); dashed: FlashMLA on the H200 (targets.md)"
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
