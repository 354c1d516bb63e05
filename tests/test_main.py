"""`python -m jax_flashmla` on a machine without a Hopper GPU: what it reports, its argument
checks and its exit status (kernel comparisons are simulated with stand-in cases)."""

from __future__ import annotations

import platform as host_platform
import re

import jax
import jax.numpy as jnp
import jaxlib
import pytest

from jax_flashmla import __main__ as cli
from jax_flashmla._src import platform

pytestmark = pytest.mark.skipif(
    not platform.device_unsupported_reason(), reason="checks the report of a machine without GPU"
)


def run(capsys, *argv):
    status = cli.main(list(argv))
    return status, capsys.readouterr().out


def rows(out: str) -> dict[str, str]:
    """Table row of each case, by case name."""
    names = [case.name for case in cli._cases()]
    return {line[:30].strip(): line for line in out.splitlines() if line[:30].strip() in names}


def test_report_without_gpu(capsys):
    status, out = run(capsys, "--runs", "1")
    assert status == 0, out
    assert f"jax {jax.__version__}, jaxlib {jaxlib.__version__}" in out
    assert f"Python {host_platform.python_version()}" in out
    # Nothing was compared, so nothing claims that the checks passed.
    assert "all checks passed" not in out
    reason = platform.device_unsupported_reason()
    assert out.rstrip().endswith(f"references ran; no kernel could be compared here: {reason}")
    table = rows(out)
    assert len(table) == len(cli._cases()) == 6
    for line in table.values():  # every reference ran and was timed
        assert re.search(r" \d+\.\d +-$", line), line
    if platform.extension() is None:
        assert "CUDA extension: not available" in out
        return
    # CUDA runtime as a release number, never CUDART_VERSION's integer.
    assert re.search(r"CUDA runtime \d+\.\d+ ", out), out
    assert not re.search(r"\b\d{5}\b", out.splitlines()[2]), out
    assert "compiled by nvcc " in out
    for name in (
        "get_mla_metadata b=128",
        "combine_splits b=64 h=128",
        "decode dense",
        "decode sparse fp8",
        "sparse prefill",
    ):
        row = next(line for key, line in table.items() if key.startswith(name))
        assert "needs a Hopper GPU" in row, row
    row = next(line for key, line in table.items() if key.startswith("mha prefill"))
    assert "reference only (no kernel yet)" in row, row
    assert "the MHA prefill kernel is not built yet" in out


@pytest.mark.parametrize(
    "version,text", [(13000, "13.0"), (12080, "12.8"), (12050, "12.5"), (11080, "11.8")]
)
def test_cuda_runtime_version(version, text):
    assert cli.cuda_runtime_version(version) == text


@pytest.mark.parametrize("runs", ["0", "-3", "two", "1.5"])
def test_runs_must_be_a_positive_int(capsys, runs):
    with pytest.raises(SystemExit) as info:
        cli.main(["--runs", runs])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--runs" in err and "must be an integer >= 1" in err, err


def fake_case(run):
    """A stand-in op whose "kernel" runs here: run(x, implementation) gives its outputs."""
    return cli.Case("stand-in op", "stand_in", lambda rng: (jnp.ones((4,), jnp.float32),), run)


def test_compared_kernel_passes(capsys, monkeypatch):
    monkeypatch.setattr(cli, "_cases", lambda: [fake_case(lambda x, implementation: (x * 2,))])
    status, out = run(capsys, "--runs", "1")
    assert status == 0, out
    assert re.search(r"stand-in op +ok ", out), out
    assert out.rstrip().endswith("all checks passed: 1 kernel(s) matched their reference")


def test_mismatch_fails(capsys, monkeypatch):
    def run_case(x, implementation):
        return (x * (3 if implementation == "cuda" else 2),)

    monkeypatch.setattr(cli, "_cases", lambda: [fake_case(run_case)])
    status, out = run(capsys, "--runs", "1")
    assert status == 1, out
    assert "MISMATCH" in out and out.rstrip().endswith("1 check(s) FAILED")
    assert "all checks passed" not in out


def test_reference_with_nan_fails(capsys, monkeypatch):
    def run_case(x, implementation):
        if implementation == "cuda":
            raise ValueError("stand_in: implementation='cuda' is unavailable: no kernel here")
        return (x * jnp.nan,)

    monkeypatch.setattr(cli, "_cases", lambda: [fake_case(run_case)])
    status, out = run(capsys, "--runs", "1")
    assert status == 1, out
    assert "FAILED: the reference's output 0 holds NaN" in out
    assert out.rstrip().endswith("1 check(s) FAILED")
