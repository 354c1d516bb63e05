"""Plot bench_decode_sparse.py's JSON: our TFLOPS and FlashMLA's per configuration.

The bars, the ratios above them and what marks a config or a run without FlashMLA are those
of plot_side_by_side.flashmla_tflops, which plot_prefill_sparse.py draws too.

    python benchmarks/plot_decode_sparse.py benchmarks/results/h200/decode_sparse.json
    # writes benchmarks/results/h200/decode_sparse.png (or --out PATH)
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path


def _sibling(name: str):
    """The module `name`.py of this folder (which `python -P` leaves off sys.path)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


#: The plot, its title and file and the command line, shared with the other plots.
side_by_side = _sibling("plot_side_by_side")


def config_label(record: dict) -> str:
    label = f"{record['layout']} b{record['b']} h{record['h_q']} topk{record['topk']}"
    return label + side_by_side.padded_note(record)


#: plot(records, out, kernel=None, title=""): the shared TFLOPS bars, for this benchmark.
plot = functools.partial(
    side_by_side.flashmla_tflops,
    label=config_label,
    what="sparse FP8 MLA decode",
    detail=lambda r: f"s_q {r['s_q']}, s_k {r['s_k']}",
    script="bench_decode_sparse.py",
)


def main(argv=None) -> int:
    return side_by_side.main(argv, __doc__, "bench_decode_sparse.py", plot)


if __name__ == "__main__":
    sys.exit(main())
