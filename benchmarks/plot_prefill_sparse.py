"""Plot bench_prefill_sparse.py's JSON: our TFLOPS and FlashMLA's per configuration and
direction (FlashMLA has no backward).

The bars, the ratios above them and what marks a config or a run without FlashMLA are those
of plot_side_by_side.flashmla_tflops, which plot_decode_sparse.py draws too.

    python benchmarks/plot_prefill_sparse.py benchmarks/results/h200/prefill_sparse.json
    # writes benchmarks/results/h200/prefill_sparse.png (or --out PATH)
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

#: The plot, its title and file and the command line, shared with the other plots.
sys.path.insert(0, str(Path(__file__).parent))  # `python -P` leaves this folder off
import plot_side_by_side as side_by_side


def config_label(record: dict) -> str:
    label = f"d{record['d_qk']} h{record['h_q']} topk{record['topk']} s_kv{record['s_kv']}"
    direction = record["direction"] + (" deterministic" if record["deterministic"] else "")
    return f"{label} {direction}" + side_by_side.padded_note(record)


#: plot(records, out, kernel=None, title=""): the shared TFLOPS bars, for this benchmark.
plot = functools.partial(
    side_by_side.flashmla_tflops,
    label=config_label,
    what="sparse MLA prefill",
    detail=lambda r: f"s_q {r['s_q']}",
    script="bench_prefill_sparse.py",
)


def main(argv=None) -> int:
    return side_by_side.main(argv, __doc__, "bench_prefill_sparse.py", plot)


if __name__ == "__main__":
    sys.exit(main())
