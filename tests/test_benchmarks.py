"""The benchmark and plot scripts run end to end (on the reference, tiny sizes) and write the
JSON records the results directory holds."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
KEYS = {
    "kernel",
    "b",
    "s_q",
    "h_q",
    "h_kv",
    "s_k",
    "causal",
    "varlen",
    "dtype",
    "us",
    "tflops",
    "gbps",
}


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_decode_smoke_and_plot(tmp_path):
    out = tmp_path / "decode.json"
    argv = [
        "--scale",
        "64",
        "--implementation",
        "xla",
        "--configs",
        "bandwidth",
        "--runs",
        "2",
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--xla-runs",
        "1",
        "--json",
        str(out),
    ]
    assert load("bench_decode").main(argv) == 0
    records = json.loads(out.read_text())
    assert len(records) == 2  # the two bandwidth configs, timed on the reference
    for record in records:
        assert record["kernel"] == "xla_reference"
        assert set(record) >= KEYS, record
        assert record["us"] > 0 and record["gbps"] > 0
    png = tmp_path / "decode.png"
    assert load("plot_decode").main([str(out), "--out", str(png), "--kernel", "xla_reference"]) == 0
    assert png.stat().st_size > 1000


def test_committed_h200_results_have_every_key():
    records = json.loads((BENCHMARKS / "results" / "h200" / "decode_dense.json").read_text())
    assert records and all(set(r) >= KEYS for r in records)
