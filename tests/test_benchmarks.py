"""The benchmark and plot scripts run end to end (on the reference, tiny sizes) and write the
JSON records the results directory holds; the side-by-side fields follow from the peers'
timings (a fake peer here: torch and the peers exist only on the GPU machine)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

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
SIDE_BY_SIDE_KEYS = KEYS | {
    "mean_s_k",
    "flashmla_us",
    "ratio",
    "peer_max_abs_diff",
    "peer_rel_err",
    "fa3_us",
    "fa3_ratio",
    "fa3_max_abs_diff",
    "fa3_rel_err",
    "side_by_side",
    "card",
    "date",
}
SMOKE_ARGS = [
    "--scale",
    "64",
    "--implementation",
    "xla",
    "--runs",
    "2",
    "--repeats",
    "2",
    "--warmup",
    "1",
    "--xla-runs",
    "1",
]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_decode_smoke_without_peers(tmp_path):
    out = tmp_path / "decode.json"
    bench = load("bench_decode")
    assert bench.main([*SMOKE_ARGS, "--configs", "bandwidth", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert len(records) == 3  # the three bandwidth configs, timed on the reference
    for record in records:
        assert record["kernel"] == "xla_reference"
        assert set(record) == SIDE_BY_SIDE_KEYS, record
        assert record["us"] > 0 and record["gbps"] > 0
        # No peer on the CPU: nothing side by side, and no ratio from anywhere else.
        assert record["side_by_side"] is False
        assert record["flashmla_us"] is None and record["ratio"] is None
        assert record["fa3_us"] is None and record["fa3_ratio"] is None
        assert record["card"] and record["date"]
    assert "torch" not in sys.modules


def fake_peers(flashmla_us: float, scale_theirs: float, calls: list):
    """A peer measurement that reports FlashMLA at `flashmla_us`, compares `scale_theirs`
    times our output with ours, and leaves FA3 out (as when it fails)."""

    def measure(cfg, inputs, our_out):
        bench = sys.modules["bench_decode"]
        ours = np.asarray(our_out, np.float32)
        assert ours.shape == (cfg.b, cfg.s_q, cfg.h_q, 512)
        calls.append(cfg)
        diff, rel = bench.agreement(ours * scale_theirs, ours)
        return {"flashmla": bench.PeerResult(flashmla_us, diff, rel), "fa3": bench.PeerResult()}

    return measure


def test_bench_decode_side_by_side_records_and_plot(tmp_path):
    out = tmp_path / "decode.json"
    bench = load("bench_decode")
    calls = []
    argv = [*SMOKE_ARGS, "--only", "128,1,128,4096,0", "--only", "128,2,16,1024,1"]
    status = bench.main([*argv, "--json", str(out)], measure_peers=fake_peers(50.0, 1.001, calls))
    assert status == 0
    assert [(c.b, c.s_q, c.h_q, c.s_k, c.causal) for c in calls] == [
        (2, 1, 128, 64, False),
        (2, 2, 16, 16, True),
    ]
    records = json.loads(out.read_text())
    assert len(records) == 2
    for record in records:
        assert set(record) == SIDE_BY_SIDE_KEYS, record
        assert record["side_by_side"] is True
        assert record["flashmla_us"] == 50.0
        assert record["ratio"] == pytest.approx(50.0 / record["us"], abs=1e-3)
        assert record["fa3_us"] is None and record["fa3_ratio"] is None
        assert 0 < record["peer_rel_err"] == pytest.approx(1e-3, rel=1e-2)
        assert record["peer_max_abs_diff"] > 0
    png = tmp_path / "decode.png"
    plot = load("plot_decode")
    assert plot.main([str(out), "--out", str(png), "--kernel", "xla_reference"]) == 0
    assert png.stat().st_size > 1000


def test_bench_decode_fails_when_a_peer_disagrees(tmp_path, capsys):
    out = tmp_path / "decode.json"
    bench = load("bench_decode")
    argv = [*SMOKE_ARGS, "--only", "128,1,16,1024,0", "--json", str(out)]
    assert bench.main(argv, measure_peers=fake_peers(50.0, 1.5, [])) == 1
    assert "DISAGREES" in capsys.readouterr().err
    (record,) = json.loads(out.read_text())  # written all the same
    assert record["peer_rel_err"] == pytest.approx(0.5, rel=1e-2)


def test_differential_timing_removes_fixed_cost():
    bench = load("bench_decode")
    asked = []

    def median_time(n):  # 30 us of fixed cost, 120 us per call
        asked.append(n)
        return 30e-6 + n * 120e-6

    assert bench.differential_us(median_time, 20) == pytest.approx(120.0)
    assert asked == [20, 5]
    # Noise that makes the difference non-positive falls back to the plain mean.
    assert bench.differential_us(lambda n: 1e-3, 8) == pytest.approx(125.0)
    assert bench.differential_us(lambda n: 1e-3, 1) == pytest.approx(1000.0)


def test_peer_fields():
    bench = load("bench_decode")
    peers = {
        "flashmla": bench.PeerResult(87.0, 1e-3, 4e-3),
        "fa3": bench.PeerResult(140.0, 2e-3, 5e-3),
    }
    fields = bench.peer_fields(100.0, peers)
    assert fields["ratio"] == 0.87 and fields["fa3_ratio"] == 1.4
    assert fields["flashmla_us"] == 87.0 and fields["fa3_us"] == 140.0
    assert fields["peer_rel_err"] == 4e-3 and fields["fa3_max_abs_diff"] == 2e-3
    assert fields["side_by_side"] is True
    fields = bench.peer_fields(100.0, {"flashmla": bench.PeerResult(), "fa3": bench.PeerResult()})
    assert fields["side_by_side"] is False and fields["ratio"] is None
    assert bench.peer_fields(100.0, {})["side_by_side"] is False


def test_agreement_is_per_row_relative():
    bench = load("bench_decode")
    rng = np.random.default_rng(0)
    # Rows of very different size, as short and long requests give.
    ours = rng.standard_normal((4, 512)) * np.array([[1.0], [1e-3], [1e-3], [1e-3]])
    theirs = ours.copy()
    theirs[1] = 0.0  # a small row entirely wrong: tiny in absolute terms
    max_abs, rel = bench.agreement(theirs, ours)
    assert max_abs < 5e-3 and rel == pytest.approx(1.0)
    assert bench.PeerResult(1.0, max_abs, rel).disagrees
    assert not bench.PeerResult(1.0, 0.0, 1e-3).disagrees
    assert bench.PeerResult(1.0, 0.0, float("nan")).disagrees
    with pytest.raises(ValueError, match="shape"):
        bench.agreement(ours[:2], ours)


def test_only_parses_configs():
    bench = load("bench_decode")
    cfg = bench.parse_only("128,2,16,4096,1")
    assert (cfg.b, cfg.s_q, cfg.h_q, cfg.h_kv, cfg.s_k, cfg.causal) == (128, 2, 16, 1, 4096, True)
    for bad in ("128,2,16,4096", "128,2,16,4096,2", "0,1,128,4096,0", "a,1,1,1,0"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--only", bad])


def test_committed_h200_results_have_every_key():
    records = json.loads((BENCHMARKS / "results" / "h200" / "decode_dense.json").read_text())
    assert records and all(set(r) >= KEYS for r in records)
