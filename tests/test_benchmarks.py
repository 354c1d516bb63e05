"""The benchmark and plot scripts run end to end (on the reference, tiny sizes) and write the
JSON records the results directory holds; the side-by-side fields follow from the peers'
timings (a fake peer here: torch and the peers exist only on the GPU machine)."""

from __future__ import annotations

import csv
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
    "page",
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
    "--warmup-ms",
    "0",
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
        assert record["us"] > 0
        # GB/s follows from us and the bytes (rounded to 0.1: a slow CPU run may read 0.0).
        moved = bench.bytes_moved(
            record["b"], record["s_q"], record["h_q"], record["h_kv"], record["mean_s_k"]
        )
        assert record["gbps"] == pytest.approx(moved / (record["us"] * 1e3), rel=1e-2, abs=0.06)
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
    argv += ["--only", "128,1,16,1024,0,53"]  # page 53: no peer
    status = bench.main([*argv, "--json", str(out)], measure_peers=fake_peers(50.0, 1.001, calls))
    assert status == 0
    assert [(c.b, c.s_q, c.h_q, c.s_k, c.causal) for c in calls] == [
        (2, 1, 128, 64, False),
        (2, 2, 16, 16, True),
    ]
    records = json.loads(out.read_text())
    assert len(records) == 3
    paged = records.pop()
    assert set(paged) == SIDE_BY_SIDE_KEYS and paged["page"] == 53, paged
    assert paged["side_by_side"] is False and paged["ratio"] is None
    for record in records:
        assert record["page"] == 64
        assert set(record) == SIDE_BY_SIDE_KEYS, record
        assert record["side_by_side"] is True
        assert record["flashmla_us"] == 50.0
        # The ratio comes from us before it was rounded to 0.01 (then itself to 0.001).
        rounding = 0.006 / record["us"]
        assert record["ratio"] == pytest.approx(50.0 / record["us"], rel=rounding, abs=1e-3)
        assert record["fa3_us"] is None and record["fa3_ratio"] is None
        assert 0 < record["peer_rel_err"] == pytest.approx(1e-3, rel=1e-2)
        assert record["peer_max_abs_diff"] > 0
    png = tmp_path / "decode.png"
    plot = load("plot_decode")
    assert plot.main([str(out), "--out", str(png), "--kernel", "xla_reference"]) == 0
    assert png.stat().st_size > 1000


FP8_KEYS = SIDE_BY_SIDE_KEYS | {"cache", "bf16_us", "bf16_ratio"}


def test_bench_decode_fp8_records(tmp_path):
    """Our call on each FP8 cache beside our bf16 call and FlashMLA's (on the bf16 cache): the
    ratios follow from the times, and the bytes are each FP8 cache's."""
    out = tmp_path / "fp8.json"
    bench = load("bench_decode_fp8")
    calls = []
    argv = [*SMOKE_ARGS[:-2], "--only", "128,1,16,4096,0", "--only", "128,2,128,1024,1"]
    status = bench.main([*argv, "--json", str(out)], measure_peers=fake_peers(50.0, 1.0, calls))
    assert status == 0 and len(calls) == 2
    records = json.loads(out.read_text())
    expected = [(s_q, h_q, c) for s_q, h_q in [(1, 16), (2, 128)] for c in ("fp8_v32", "fp8_e4m3")]
    assert [(r["s_q"], r["h_q"], r["cache"]) for r in records] == expected
    for record in records:
        assert set(record) == FP8_KEYS, record
        rounding = 0.006 / record["us"]
        assert record["bf16_ratio"] == pytest.approx(
            record["bf16_us"] / record["us"], rel=rounding, abs=1e-3
        )
        assert record["ratio"] == pytest.approx(50.0 / record["us"], rel=rounding, abs=1e-3)
        cfg = bench.dense.Config(
            "only",
            record["b"],
            record["s_q"],
            record["h_q"],
            record["h_kv"],
            record["s_k"],
            record["causal"],
        )
        layout = {"fp8_v32": "V32", "fp8_e4m3": "E4M3"}[record["cache"]]
        moved = bench.bytes_moved(cfg, record["mean_s_k"], layout)
        assert record["gbps"] == pytest.approx(moved / (record["us"] * 1e3), rel=1e-2, abs=0.06)
        assert record["side_by_side"] is True
    cfg = bench.dense.Config("only", 2, 1, 16, 1, 0, False)
    assert bench.bytes_moved(cfg, 10.0, "V32") == 2 * (16 * (576 + 512) * 2 + 10 * 656)
    assert bench.bytes_moved(cfg, 10.0, "E4M3") == 2 * (16 * (576 + 512) * 2 + 10 * 576)
    png = tmp_path / "fp8.png"
    assert load("plot_decode_fp8").main([str(out), "--out", str(png)]) == 0
    assert png.stat().st_size > 1000


def test_bench_decode_fails_when_a_peer_disagrees(tmp_path, capsys):
    out = tmp_path / "decode.json"
    bench = load("bench_decode")
    argv = [*SMOKE_ARGS, "--only", "128,1,16,1024,0", "--json", str(out)]
    assert bench.main(argv, measure_peers=fake_peers(50.0, 1.5, [])) == 1
    assert "DISAGREES" in capsys.readouterr().err
    record = json.loads(out.read_text())[0]  # written all the same (the forward's record)
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
    assert cfg.page == 64 and bench.parse_only("128,2,16,4096,1,16").page == 16
    bad_specs = ("128,2,16,4096", "128,2,16,4096,2", "0,1,128,4096,0", "a,1,1,1,0")
    for bad in (*bad_specs, "1,1,1,1,0,0", "1,1,1,1,0,1,1"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--only", bad])


def test_dense_config_groups():
    """The dense tables of docs/performance.md and the small batches of latency-bound serving."""
    bench = load("bench_decode")
    by_group = {g: [c for c in bench.CONFIGS if c.group == g] for g in bench.GROUPS}
    assert [len(by_group[g]) for g in ("compute", "short", "bandwidth", "small")] == [16, 3, 3, 24]
    pages = by_group["pages"]
    assert sorted({c.page for c in pages}) == [1, 2, 16, 32, 53, 64, 128, 256]
    assert sorted({c.h_q for c in pages}) == [16, 128] and len(pages) == 16
    small = by_group["small"]
    assert sorted({c.b for c in small}) == [1, 2, 4, 8, 16, 32]
    assert sorted({c.s_k for c in small}) == [1024, 4096, 16384, 65536]
    assert all(c.h_q == 128 and c.s_q == 1 and not c.causal for c in small)


def test_committed_h200_results_have_every_key():
    records = json.loads((BENCHMARKS / "results" / "h200" / "decode_dense.json").read_text())
    assert records and all(set(r) >= KEYS for r in records)


# The sparse benchmarks (bench_decode_sparse.py, bench_prefill_sparse.py) and their plots:
# FlashMLA is their only peer, timed and recorded the same way in both.

#: The fields of every sparse record: the shape, our time, FlashMLA's beside it, where and when.
SPARSE_COMMON_KEYS = {
    "kernel",
    "s_q",
    "h_q",
    "h_kv",
    "topk",
    "d_qk",
    "dtype",
    "us",
    "tflops",
    "gbps",
    "flashmla_us",
    "flashmla_tflops",
    "flashmla_h_q",
    "ratio",
    "peer_max_abs_diff",
    "peer_rel_err",
    "side_by_side",
    "card",
    "date",
}
SPARSE_KEYS = SPARSE_COMMON_KEYS | {"layout", "b", "s_k", "page"}
PREFILL_SPARSE_KEYS = SPARSE_COMMON_KEYS | {"s_kv", "d_v", "direction", "deterministic"}
SPARSE_SMOKE_ARGS = [
    "--scale",
    "64",
    "--implementation",
    "xla",
    "--runs",
    "2",
    "--repeats",
    "2",
    "--warmup-ms",
    "0",
]


def sparse_counts(record: dict) -> tuple[int, int]:
    """(FLOPs, bytes) of a sparse decode record, as docs/ops.md counts them."""
    d_qk = {"V32": 576, "MODEL1": 512}[record["layout"]]
    token_bytes = {"V32": 656, "MODEL1": 584}[record["layout"]]
    assert record["d_qk"] == d_qk
    b, s_q, h_q, topk = record["b"], record["s_q"], record["h_q"], record["topk"]
    work = b * s_q * h_q * topk * 2 * (d_qk + 512)
    moved = b * s_q * topk * token_bytes + b * s_q * h_q * (d_qk + 512) * 2
    return work, moved


def prefill_sparse_counts(record: dict) -> tuple[int, int]:
    """(FLOPs, bytes) of a sparse prefill record: every query token reads its topk bf16 kv
    rows (and the backward adds to their float32 dkv); the forward reads q and writes out, the
    backward reads q, out and d_out and writes dq, in bf16."""
    s_q, h_q, topk, d_qk = record["s_q"], record["h_q"], record["topk"], record["d_qk"]
    if record["direction"] == "bwd":
        work = s_q * h_q * topk * (6 * d_qk + 4 * 512)
        moved = s_q * topk * d_qk * 6 + s_q * h_q * (2 * d_qk + 2 * 512) * 2
        return work, moved
    assert record["direction"] == "fwd"
    work = s_q * h_q * topk * 2 * (d_qk + 512)
    moved = s_q * topk * d_qk * 2 + s_q * h_q * (d_qk + 512) * 2
    return work, moved


#: Each sparse benchmark's record keys and counts.
SPARSE_RECORDS = {
    "bench_decode_sparse": (SPARSE_KEYS, sparse_counts),
    "bench_prefill_sparse": (PREFILL_SPARSE_KEYS, prefill_sparse_counts),
}


def check_record(script: str, record: dict, flashmla_us: float | None) -> None:
    """What every record of a smoke run of `script` holds: its keys, tflops and gbps that
    follow from us and the counts, and FlashMLA's fields: none where it did not run, else its
    `flashmla_us` and the error of an output 1.001 times ours."""
    keys, counts = SPARSE_RECORDS[script]
    assert set(record) == keys, record
    assert record["kernel"] == "xla_reference"
    assert record["us"] > 0
    assert record["card"] and record["date"]
    work, moved = counts(record)
    # us is rounded to 0.01 in the record, TFLOPS and GB/s are computed before rounding.
    rounding = 0.006 / record["us"] + 1e-3
    assert record["tflops"] == pytest.approx(work / (record["us"] * 1e6), rel=rounding, abs=0.006)
    assert record["gbps"] == pytest.approx(moved / (record["us"] * 1e3), rel=rounding, abs=0.06)
    if flashmla_us is None:
        assert record["side_by_side"] is False
        assert record["flashmla_us"] is None and record["ratio"] is None
        assert record["flashmla_tflops"] is None and record["flashmla_h_q"] is None
        assert record["peer_rel_err"] is None
        return
    assert record["side_by_side"] is True
    assert record["flashmla_us"] == flashmla_us
    assert record["ratio"] == pytest.approx(flashmla_us / record["us"], rel=rounding, abs=1e-3)
    assert record["flashmla_tflops"] == pytest.approx(work / (flashmla_us * 1e6), abs=0.006)
    assert 0 < record["peer_rel_err"] == pytest.approx(1e-3, rel=1e-2)
    assert record["peer_max_abs_diff"] > 0


def check_decode_sparse_inputs(cfg, inputs, ours: np.ndarray) -> None:
    assert ours.shape == (cfg.b, cfg.s_q, cfg.h_q, 512)
    token_bytes = {"V32": 656, "MODEL1": 584}[cfg.layout]
    assert inputs.cache.shape[1:] == (64, 1, token_bytes)
    assert str(inputs.cache.dtype) == "float8_e4m3fn"
    assert inputs.indices.shape == (cfg.b, cfg.s_q, cfg.topk)
    assert [q.shape for q in inputs.qs] == [(cfg.b, cfg.s_q, cfg.h_q, cfg.d_qk)] * 2


def check_prefill_sparse_inputs(cfg, inputs, ours: np.ndarray) -> None:
    assert ours.shape == (cfg.s_q, cfg.h_q, 512)
    assert inputs.kv.shape == (cfg.s_kv, 1, cfg.d_qk) and str(inputs.kv.dtype) == "bfloat16"
    assert inputs.indices.shape == (cfg.s_q, 1, cfg.topk)
    assert str(inputs.indices.dtype) == "int32"
    assert [q.shape for q in inputs.qs] == [(cfg.s_q, cfg.h_q, cfg.d_qk)] * 2


def fake_flashmla(script: str, flashmla_us: float, scale_theirs: float, seen: list):
    """A FlashMLA measurement for `script` that reports `flashmla_us` and compares
    `scale_theirs` times our output with ours; it checks the arrays it is handed."""
    check_inputs = {
        "bench_decode_sparse": check_decode_sparse_inputs,
        "bench_prefill_sparse": check_prefill_sparse_inputs,
    }[script]

    def measure(cfg, inputs, our_out):
        bench = sys.modules[script]
        ours = np.asarray(our_out, np.float32)
        check_inputs(cfg, inputs, ours)
        seen.append(cfg)
        diff, rel = bench.dense.agreement(ours * scale_theirs, ours)
        return bench.PeerResult(flashmla_us, diff, rel)

    return measure


def check_plot(tmp_path, name: str, records_path: Path, *argv: str):
    """Runs plot script `name` on the records; it writes a PNG. Returns the script."""
    png = tmp_path / f"{name}.png"
    plot = load(name)
    assert plot.main([str(records_path), "--out", str(png), *argv]) == 0
    assert png.stat().st_size > 1000
    return plot


def run_without_peers(tmp_path, script: str, *extra: str) -> tuple[Path, list[dict]]:
    """(the JSON, its records) of `script` on its heads group with --no-peers (and `extra`
    arguments), each record checked; torch is left alone."""
    out = tmp_path / "sparse.json"
    bench = load(script)
    argv = [*SPARSE_SMOKE_ARGS, *extra, "--no-peers", "--configs", "heads", "--json", str(out)]
    assert bench.main(argv) == 0
    records = json.loads(out.read_text())
    for record in records:
        check_record(script, record, None)
    assert "torch" not in sys.modules
    return out, records


def run_side_by_side(
    tmp_path, script: str, only: list[str], *extra: str
) -> tuple[Path, list, list[dict]]:
    """(the JSON, the configs FlashMLA was handed, the records) of `script` on the --only
    configs (and `extra` arguments), beside a fake FlashMLA of 50 us whose output is 1.001
    times ours; each record checked."""
    out = tmp_path / "sparse.json"
    bench = load(script)
    seen = []
    argv = [*SPARSE_SMOKE_ARGS, *extra, *(arg for spec in only for arg in ("--only", spec))]
    measure = fake_flashmla(script, 50.0, 1.001, seen)
    assert bench.main([*argv, "--json", str(out)], measure_peer=measure) == 0
    records = json.loads(out.read_text())
    assert len(records) == len(only)
    for record in records:
        check_record(script, record, 50.0)
    return out, seen, records


def test_bench_decode_sparse_smoke_without_peers(tmp_path):
    out, records = run_without_peers(tmp_path, "bench_decode_sparse")
    # The heads group, both layouts, scaled by 64: b 2, s_k 512, topk 2048 / 64 -> 64.
    assert [(r["layout"], r["h_q"]) for r in records] == [
        ("V32", 16),
        ("MODEL1", 16),
        ("V32", 32),
        ("MODEL1", 32),
    ]
    for record in records:
        assert (record["b"], record["s_q"], record["s_k"], record["topk"]) == (2, 2, 512, 64)
        assert (record["h_kv"], record["page"], record["dtype"]) == (1, 64, "bfloat16")
    check_plot(tmp_path, "plot_decode_sparse", out)


def test_bench_prefill_sparse_smoke_without_peers(tmp_path):
    out, records = run_without_peers(tmp_path, "bench_prefill_sparse")
    # The heads group scaled by 64: s_q 64, topk 2048 / 64 -> 64, s_kv 32768 / 64; forward and
    # backward of each.
    assert [(r["h_q"], r["direction"]) for r in records] == [
        (16, "fwd"),
        (16, "bwd"),
        (32, "fwd"),
        (32, "bwd"),
    ]
    for record in records:
        assert (record["s_q"], record["s_kv"], record["topk"], record["d_qk"]) == (64, 512, 64, 576)
        assert (record["h_kv"], record["d_v"], record["dtype"]) == (1, 512, "bfloat16")
    check_plot(tmp_path, "plot_prefill_sparse", out)


def test_bench_decode_sparse_side_by_side_records_and_plot(tmp_path):
    only = ["V32,128,16,2048", "MODEL1,148,128,16384"]
    out, seen, records = run_side_by_side(tmp_path, "bench_decode_sparse", only)
    assert [(c.layout, c.b, c.s_q, c.h_q, c.topk, c.s_k) for c in seen] == [
        ("V32", 2, 2, 16, 64, 512),
        ("MODEL1", 2, 2, 128, 256, 512),
    ]
    # FlashMLA takes 64 or 128 heads: 16 heads run padded to 64.
    assert [r["flashmla_h_q"] for r in records] == [64, 128]
    plot = check_plot(tmp_path, "plot_decode_sparse", out, "--kernel", "xla_reference")
    assert plot.config_label(records[0]) == "V32 b2 h16 topk64 (FlashMLA h64)"


def test_bench_prefill_sparse_side_by_side_records_and_plot(tmp_path):
    only = ["576,16,2048,32768", "512,64,512,131072"]
    out, seen, records = run_side_by_side(
        tmp_path, "bench_prefill_sparse", only, "--directions", "fwd"
    )
    assert [(c.d_qk, c.h_q, c.topk, c.s_q, c.s_kv) for c in seen] == [
        (576, 16, 64, 64, 512),
        (512, 64, 64, 64, 2048),
    ]
    # FlashMLA takes 64 or 128 heads: 16 heads run padded to 64.
    assert [r["flashmla_h_q"] for r in records] == [64, 64]
    plot = check_plot(tmp_path, "plot_prefill_sparse", out, "--kernel", "xla_reference")
    assert plot.config_label(records[0]) == "d576 h16 topk64 s_kv512 fwd (FlashMLA h64)"
    assert plot.config_label(records[1]) == "d512 h64 topk64 s_kv2048 fwd"


def test_bench_prefill_sparse_backward_has_no_peer(tmp_path):
    """FlashMLA has no backward: beside it, only the forward record has its columns."""
    out = tmp_path / "sparse.json"
    bench = load("bench_prefill_sparse")
    seen = []
    measure = fake_flashmla("bench_prefill_sparse", 50.0, 1.001, seen)
    argv = [*SPARSE_SMOKE_ARGS, "--only", "512,64,512,8192", "--directions", "bwd,fwd"]
    argv.append("--deterministic")
    assert bench.main([*argv, "--json", str(out)], measure_peer=measure) == 0
    records = json.loads(out.read_text())
    assert [r["direction"] for r in records] == ["fwd", "bwd"]  # the forward first, always
    assert [r["deterministic"] for r in records] == [False, True]
    assert len(seen) == 1
    check_record("bench_prefill_sparse", records[0], 50.0)
    check_record("bench_prefill_sparse", records[1], None)
    plot = check_plot(tmp_path, "plot_prefill_sparse", out, "--kernel", "xla_reference")
    assert plot.config_label(records[1]) == "d512 h64 topk64 s_kv128 bwd deterministic"


@pytest.mark.parametrize(
    "script, only",
    [("bench_decode_sparse", "MODEL1,128,32,2048"), ("bench_prefill_sparse", "512,32,1024,8192")],
)
def test_bench_sparse_fails_when_flashmla_disagrees(script, only, tmp_path, capsys):
    out = tmp_path / "sparse.json"
    bench = load(script)
    argv = [*SPARSE_SMOKE_ARGS, "--only", only, "--json", str(out)]
    assert bench.main(argv, measure_peer=fake_flashmla(script, 50.0, 1.5, [])) == 1
    assert "DISAGREES" in capsys.readouterr().err
    record = json.loads(out.read_text())[0]  # written all the same (the forward's record)
    assert record["peer_rel_err"] == pytest.approx(0.5, rel=1e-2)


def test_flashmla_sparse_heads_and_padding():
    """FlashMLA's sparse kernels take 64 or 128 heads: fewer run with q zero-padded to 64,
    decode's q [b, s_q, h, d] and prefill's [s_q, h, d] alike."""
    import jax
    import jax.numpy as jnp

    dense = load("bench_decode")
    assert [dense.flashmla_heads(h) for h in (1, 16, 64, 65, 128, 129)] == [
        64,
        64,
        64,
        128,
        128,
        None,
    ]
    for shape in ((2, 2, 16, 512), (4, 16, 576)):
        q = jax.random.normal(jax.random.key(0), shape).astype(jnp.bfloat16)
        padded = np.asarray(dense.padded_heads(q, 64), np.float32)
        assert padded.shape == (*shape[:-2], 64, shape[-1])
        np.testing.assert_array_equal(padded[..., :16, :], np.asarray(q, np.float32))
        assert not padded[..., 16:, :].any()


def test_sparse_plot_marks_a_config_flashmla_did_not_run(tmp_path, monkeypatch):
    """Both sparse plots draw our bar alone, marked, where FlashMLA ran other configs but not
    this one."""
    side_by_side = load("plot_side_by_side")
    figures = []
    monkeypatch.setattr(side_by_side.pyplot(), "close", figures.append)  # keeps the figure
    records = [
        {"kernel": "jax_flashmla", "tflops": 100.0, "flashmla_tflops": None, "ratio": None},
        {"kernel": "jax_flashmla", "tflops": 100.0, "flashmla_tflops": 90.0, "ratio": 0.9},
    ]
    out = side_by_side.flashmla_tflops(
        records,
        tmp_path / "marked.png",
        label=lambda r: str(r["ratio"]),
        what="sparse",
        detail=lambda r: "",
        script="bench.py",
    )
    assert out.stat().st_size > 1000
    (figure,) = figures
    # After the bars' value labels, what stands above each config: the mark, then the ratio.
    texts = [text.get_text() for text in figure.axes[0].texts]
    assert texts[-2:] == ["no FlashMLA", "0.90"] and texts.count("no FlashMLA") == 1


# The sparse decode benchmark alone.


def test_bench_decode_sparse_configs():
    bench = load("bench_decode_sparse")
    shapes = {(c.layout, c.b, c.s_q, c.h_q, c.topk, c.s_k) for c in bench.CONFIGS}
    assert len(shapes) == len(bench.CONFIGS) == 12
    for layout in ("V32", "MODEL1"):
        assert {(b, h_q, topk) for lay, b, _, h_q, topk, _ in shapes if lay == layout} == {
            (64, 128, 2048),
            (128, 128, 2048),
            (148, 64, 16384),
            (148, 128, 16384),
            (128, 16, 2048),
            (128, 32, 2048),
        }
    assert {(c.s_q, c.s_k) for c in bench.CONFIGS} == {(2, 32768)}
    assert [c.h_q for c in bench.select_configs("heads", "MODEL1")] == [16, 32]
    cfg = bench.parse_only("MODEL1,148,64,16384")
    assert (cfg.layout, cfg.b, cfg.h_q, cfg.topk, cfg.s_q, cfg.s_k, cfg.d_qk) == (
        "MODEL1",
        148,
        64,
        16384,
        2,
        32768,
        512,
    )
    for bad in ("V32,128,128", "V64,128,128,2048", "V32,128,128,100", "V32,0,128,2048"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--only", bad])
    # Scaled down, topk stays a positive multiple of 64 within the context.
    small = bench.parse_only("V32,148,128,16384").scaled(1024)
    assert (small.b, small.topk, small.s_k) == (1, 64, 64)


def test_bench_decode_sparse_counting():
    bench = load("bench_decode_sparse")
    v32 = bench.parse_only("V32,128,128,2048")
    assert bench.flops(v32) == 128 * 2 * 128 * 2048 * 2 * (576 + 512)
    assert bench.bytes_moved(v32) == 128 * 2 * 2048 * 656 + 128 * 2 * 128 * (576 + 512) * 2
    model1 = bench.parse_only("MODEL1,148,64,16384")
    assert bench.flops(model1) == 148 * 2 * 64 * 16384 * 2 * (512 + 512)
    assert bench.bytes_moved(model1) == 148 * 2 * 16384 * 584 + 148 * 2 * 64 * 1024 * 2


def test_bench_decode_sparse_indices_select_each_request_own_tokens():
    bench = load("bench_decode_sparse")
    cfg = bench.Config("only", "V32", b=3, h_q=16, topk=128, s_k=200)
    indices, block_table = bench.draw_indices(cfg, seed=5)
    assert indices.shape == (3, 2, 128) and indices.dtype == np.int32
    assert block_table.shape == (3, 4)  # ceil(200 / 64) blocks each, a permutation of 12
    assert sorted(block_table.ravel()) == list(range(12))
    for i in range(3):
        for j in range(2):
            row = indices[i, j]
            blocks, offsets = row // 64, row % 64
            # Block k of request i holds its tokens 64 k ..., so the position is recoverable.
            slots = np.array([list(block_table[i]).index(blk) for blk in blocks])
            positions = slots * 64 + offsets
            assert len(set(positions)) == 128  # distinct tokens
            assert positions.min() >= 0 and positions.max() < 200  # within the context
            assert not np.array_equal(np.sort(positions), positions)  # an indexer's order
    # The two query tokens of a request select different sets.
    assert set(indices[0, 0]) != set(indices[0, 1])


def test_bench_decode_sparse_flashmla_cache():
    """What FlashMLA is handed for MODEL1: blocks padded to a multiple of 576 bytes whose first
    page * 584 bytes are the block's bytes."""
    import jax
    import jax.numpy as jnp

    import jax_flashmla as fm

    bench = load("bench_decode_sparse")
    values = jax.random.normal(jax.random.key(1), (3, 64, 1, 512)) / 10
    cache = fm.quantize_k_cache(values.astype(jnp.bfloat16), layout="MODEL1")
    blocks = np.asarray(bench.padded_blocks(cache))
    block_bytes = 64 * 584
    assert blocks.dtype == np.uint8 and blocks.shape == (3, 65 * 576)  # 37376 -> 37440
    raw = np.asarray(jax.lax.bitcast_convert_type(cache, jnp.uint8)).reshape(3, block_bytes)
    np.testing.assert_array_equal(blocks[:, :block_bytes], raw)
    assert not blocks[:, block_bytes:].any()
    # FlashMLA's view: [num_blocks, page, 1, 584] rows at the padded block stride; reading it
    # back as our cache gives the same dequantised values.
    view = np.lib.stride_tricks.as_strided(
        blocks, shape=(3, 64, 1, 584), strides=(blocks.strides[0], 584, 584, 1)
    )
    again = jax.lax.bitcast_convert_type(jnp.asarray(view), jnp.float8_e4m3fn)
    np.testing.assert_array_equal(
        np.asarray(fm.dequantize_k_cache(again), np.float32),
        np.asarray(fm.dequantize_k_cache(cache), np.float32),
    )


# The sparse prefill benchmark alone.


def test_bench_prefill_sparse_exits_when_the_kernel_cannot_run(tmp_path, capsys, monkeypatch):
    from jax_flashmla._src import platform

    bench = load("bench_prefill_sparse")
    cfg = bench.parse_only("576,128,2048,8192").scaled(64)
    assert bench.kernel_unavailable(cfg, "xla") == ""
    if platform.device_unsupported_reason() or platform.extension_unavailable_reason():
        assert "implementation='cuda' is unavailable" in bench.kernel_unavailable(cfg, "cuda")
    # The default is the kernel, asked for explicitly; without it the script says why.
    monkeypatch.setattr(bench, "kernel_unavailable", lambda cfg, implementation: implementation)
    out = tmp_path / "prefill_sparse.json"
    argv = ["--scale", "64", "--only", "576,128,2048,8192", "--json", str(out)]
    assert bench.main(argv) == 1
    assert "cannot benchmark implementation='cuda': cuda" in capsys.readouterr().err
    assert not out.exists()


def test_bench_prefill_sparse_configs():
    bench = load("bench_prefill_sparse")
    by_group = {g: [c for c in bench.CONFIGS if c.group == g] for g in bench.GROUPS}
    shapes = {g: [(c.d_qk, c.h_q, c.topk, c.s_kv) for c in cs] for g, cs in by_group.items()}
    assert shapes == {
        "v32": [(576, 128, 2048, s_kv) for s_kv in (8192, 16384, 32768, 65536, 131072)],
        "model1_h64": [(512, 64, 512, s_kv) for s_kv in (8192, 32768, 131072)],
        "model1_h128": [(512, 128, 1024, s_kv) for s_kv in (8192, 16384, 32768, 65536)],
        "heads": [(576, 16, 2048, 32768), (576, 32, 2048, 32768)],
    }
    assert len(bench.CONFIGS) == 14 and {c.s_q for c in bench.CONFIGS} == {4096}
    assert [c.h_q for c in bench.select_configs("heads")] == [16, 32]
    assert len(bench.select_configs("v32,model1_h64")) == 8
    with pytest.raises(SystemExit):
        bench.select_configs("v32,peak")
    cfg = bench.parse_only("512,64,512,131072")
    assert cfg == bench.Config("only", d_qk=512, h_q=64, topk=512, s_kv=131072, s_q=4096)
    for bad in ("576,128,2048", "640,128,2048,8192", "576,128,100,8192", "576,0,2048,8192"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--only", bad])
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "576,128,2048,1024"])  # fewer tokens than topk
    with pytest.raises(SystemExit):
        bench.parse_args(["--scale", "0"])
    # Scaled down, topk stays a positive multiple of 64 within s_kv.
    small = bench.parse_only("576,128,2048,8192").scaled(1024)
    assert (small.s_q, small.topk, small.s_kv) == (4, 64, 64)
    assert bench.parse_only("576,128,2048,131072").scaled(16) == bench.Config(
        "only", 576, 128, 128, 8192, s_q=256
    )


def test_bench_prefill_sparse_counting():
    bench = load("bench_prefill_sparse")
    v32 = bench.parse_only("576,128,2048,131072")
    assert bench.flops(v32) == 4096 * 128 * 2048 * 2 * (576 + 512)
    assert bench.bytes_moved(v32) == 4096 * 2048 * 576 * 2 + 4096 * 128 * (576 + 512) * 2
    assert bench.flops(v32, "bwd") == 4096 * 128 * 2048 * (6 * 576 + 4 * 512)
    assert bench.bytes_moved(v32, "bwd") == (
        4096 * 2048 * 576 * 6 + 4096 * 128 * (2 * 576 + 2 * 512) * 2
    )
    assert bench.parse_args([]).directions == ("fwd", "bwd")
    assert bench.parse_args(["--directions", "bwd"]).directions == ("bwd",)
    for bad in ("", "fwd,back", "up"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--directions", bad])
    model1 = bench.parse_only("512,64,512,8192")
    assert bench.flops(model1) == 4096 * 64 * 512 * 2 * 1024
    assert bench.bytes_moved(model1) == 4096 * 512 * 512 * 2 + 4096 * 64 * 1024 * 2
    assert bench.softmax_scale(576) == 576**-0.5


def test_bench_prefill_sparse_flashmla_constraints():
    """FlashMLA's sparse prefill takes 64 or 128 heads (test_flashmla_sparse_heads_and_padding)
    and, on Hopper, topk a multiple of 128: the others are reported, not run."""
    bench = load("bench_prefill_sparse")
    assert all(bench.flashmla_refusal(c) == "" for c in bench.CONFIGS)
    assert "h_q" in bench.flashmla_refusal(bench.parse_only("576,256,2048,8192"))
    refused = bench.parse_only("576,128,2048,8192").scaled(64)  # topk 64
    assert "topk" in bench.flashmla_refusal(refused)
    peer = bench.FlashMLAPeer(None, repeats=2, runs=1, warmup_ms=0)
    result = peer(refused, None, None)  # refused before torch or FlashMLA is touched
    assert result.us is None and result.rel_err is None
    assert "torch" not in sys.modules


@pytest.mark.parametrize("s_kv", [128, 1000, 131072])
def test_bench_prefill_sparse_indices_are_distinct_per_token(s_kv):
    bench = load("bench_prefill_sparse")
    cfg = bench.Config("only", 576, 16, 128, s_kv, s_q=32)
    indices = bench.draw_indices(cfg, seed=3)
    assert indices.shape == (32, 1, 128) and indices.dtype == np.int32
    rows = indices[:, 0]
    assert rows.min() >= 0 and rows.max() < s_kv
    assert all(len(set(row)) == 128 for row in rows)  # distinct tokens
    assert all(not np.array_equal(np.sort(row), row) for row in rows)  # an indexer's order
    assert len({tuple(np.sort(row)) for row in rows}) == (1 if s_kv == 128 else 32)
    np.testing.assert_array_equal(bench.draw_indices(cfg, seed=3), indices)  # seeded


def test_ncu_stalls_summarises_each_launch(tmp_path, capsys):
    """The ncu source-page summary: per launch, samples by reason and opcode, the top lines."""
    spec = importlib.util.spec_from_file_location(
        "ncu_stalls", BENCHMARKS / "probes" / "ncu_stalls.py"
    )
    ncu_stalls = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ncu_stalls)
    header = [
        "Address",
        "Source",
        ncu_stalls.SAMPLES,
        ncu_stalls.EXECUTED,
        "stall_long_sb",
        "stall_long_sb (Not Issued)",
        "stall_membar",
    ]
    lines = [
        ["Kernel Name", "kernel_a"],
        header,
        ["0x10", "LDG.E.128 R4, desc[UR4][R2.64]", "10", "1,000", "0", "0", "0"],
        ["0x20", "@!P0  ERRBAR", "60", "100", "0", "0", "60"],
        ["0x30", "IMAD.MOV.U32 R8, RZ, RZ, R4", "30", "1,000", "30", "28", "0"],
        ["Kernel Name", "kernel_b"],
        header,
        ["0x10", "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24", "5", "64", "5", "5", "0"],
    ]
    path = tmp_path / "source.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(lines)
    assert ncu_stalls.main([str(path), "--top", "2", "--kernel", "kernel_a"]) == 0
    out = capsys.readouterr().out
    assert "kernel_b" not in out
    assert "samples 100, SASS lines 3" in out
    assert "by reason: membar 60.0%, long_sb 30.0%" in out
    assert "ERRBAR" in out.split("by opcode")[1].split("\n")[1]
    top = out.split("top 2 instructions:")[1].strip().splitlines()
    assert len(top) == 2 and "ERRBAR" in top[0] and "IMAD.MOV" in top[1]
    assert ncu_stalls.main([str(path), "--kernel", "missing"]) == 1


def test_jax_outputs_probe_prints_both_figures(capsys):
    """The output-buffer probe runs end to end (on the reference) and prints, per round, the
    figure of the bench's program, that of the one-output program and their difference."""
    spec = importlib.util.spec_from_file_location(
        "jax_outputs", BENCHMARKS / "probes" / "jax_outputs.py"
    )
    jax_outputs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(jax_outputs)
    argv = ["2", "1", "16", "128", "0", "--calls", "4", "--runs", "2", "--rounds", "2"]
    assert jax_outputs.main([*argv, "--warmup-ms", "0", "--implementation", "xla"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    rows = [row for row in rows if row and row[0].isdigit()]
    assert [row[0] for row in rows] == ["0", "1"]
    for row in rows:
        every, one, difference = map(float, row[1:])
        assert every > 0 and one > 0
        assert difference == pytest.approx(every - one, abs=0.11)
