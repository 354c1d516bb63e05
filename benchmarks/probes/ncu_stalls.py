"""Where a kernel's warps wait, by SASS instruction: a summary of ncu's source page.

Reads the CSV that `ncu --import REPORT --page source --print-source sass --csv` writes (one
table per profiled launch, each headed by its kernel's name and a row starting "Address") and
prints, per launch: the warp-stall samples in total and by reason, by opcode (with the
instructions executed), and the instructions with the most samples with their main reasons.
Answers "which instructions does the time sit on, and why?" without the ncu GUI: a fence, a
barrier wait, a load's consumer.

  ncu --clock-control none -k regex:sparse_decode --launch-count 1 --section SourceCounters \
      -o prof python3 -P benchmarks/bench_decode_sparse.py --only V32,128,128,2048 --runs 1
  ncu --import prof.ncu-rep --page source --print-source sass --csv > prof.csv
  python3 benchmarks/probes/ncu_stalls.py prof.csv --top 40
"""

import argparse
import collections
import csv
import sys

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def launches(rows):
    """(kernel name, header, body rows) per table of the export."""
    starts = [i for i, row in enumerate(rows) if row and row[0] == "Address"]
    for n, start in enumerate(starts):
        name = rows[start - 1][1] if start > 0 and len(rows[start - 1]) > 1 else "?"
        end = starts[n + 1] - 1 if n + 1 < len(starts) else len(rows)
        header = rows[start]
        body = [row for row in rows[start + 1 : end] if len(row) == len(header)]
        yield name, header, body


def opcode(sass: str) -> str:
    words = [w for w in sass.split() if not w.startswith("@")]
    return words[0].split(".")[0] if words else "?"


def summarise(name, header, body, top: int, out):
    column = {h: i for i, h in enumerate(header)}
    samples, source = column[SAMPLES], column["Source"]
    executed = column.get(EXECUTED)
    # Stall reasons: the stall_* columns that count all samples (not the "(Not Issued)" ones).
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    total = sum(number(row[samples]) for row in body) or 1.0
    print(f"== {name[:160]}", file=out)
    print(f"samples {total:.0f}, SASS lines {len(body)}", file=out)
    by_reason = collections.Counter()
    for row in body:
        for reason in reasons:
            by_reason[reason] += number(row[column[reason]])
    print(
        "by reason: "
        + ", ".join(f"{r[6:]} {100 * v / total:.1f}%" for r, v in by_reason.most_common() if v > 0),
        file=out,
    )
    by_op, runs = collections.Counter(), collections.Counter()
    for row in body:
        op = opcode(row[source])
        by_op[op] += number(row[samples])
        if executed is not None:
            runs[op] += number(row[executed])
    print("by opcode (samples %, instructions executed):", file=out)
    for op, v in by_op.most_common(20):
        print(f"  {op:14s} {100 * v / total:5.1f}%  {runs[op]:14.0f}", file=out)
    print(f"top {top} instructions:", file=out)
    for row in sorted(body, key=lambda r: -number(r[samples]))[:top]:
        v = number(row[samples])
        if v == 0:
            break
        main = sorted(((number(row[column[r]]), r[6:]) for r in reasons), reverse=True)[:2]
        why = ", ".join(f"{r} {c:.0f}" for c, r in main if c > 0)
        print(
            f"  {100 * v / total:5.1f}%  {row[column['Address']]:>8s}  "
            f"{row[source].strip()[:70]:70s}  {why}",
            file=out,
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv", help="ncu --page source --print-source sass --csv output")
    parser.add_argument("--top", type=int, default=30, help="instructions to list per launch")
    parser.add_argument("--kernel", default="", help="only launches whose name contains this")
    args = parser.parse_args(argv)
    with open(args.csv, newline="", errors="replace") as f:
        rows = list(csv.reader(f))
    found = False
    for name, header, body in launches(rows):
        if args.kernel in name and SAMPLES in header:
            summarise(name, header, body, args.top, sys.stdout)
            found = True
    if not found:
        print(
            f"no launch with stall samples{' matching ' + args.kernel if args.kernel else ''} "
            f"in {args.csv}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
