"""JAX_FLASHMLA_REQUIRE_GPU=1 (conftest.py) turns skipped GPU tests into an error.

A CPU test: it runs pytest in a child process on one small GPU test, with JAX held to the CPU
so that the kernels cannot run there even on a GPU machine.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
#: A small GPU-marked test to select.
GPU_TEST = os.path.join(TESTS_DIR, "test_gpu_schedule.py") + "::test_metadata_uses_device_sm_count"


def run_pytest(*args: str, require: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("JAX_FLASHMLA_REQUIRE_GPU", None)
    if require is not None:
        env["JAX_FLASHMLA_REQUIRE_GPU"] = require
    return subprocess.run(
        [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        env=env,
        cwd=os.path.dirname(TESTS_DIR),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_require_gpu_fails_a_gpu_test_that_would_skip():
    result = run_pytest(GPU_TEST, require="1")
    output = result.stdout + result.stderr
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, output
    assert "JAX_FLASHMLA_REQUIRE_GPU=1, but the 1 selected GPU tests cannot run here" in output
    assert "the kernels need an NVIDIA Hopper GPU" in output  # the reason


def test_without_the_switch_the_gpu_test_skips():
    result = run_pytest("-rs", GPU_TEST, require=None)
    output = result.stdout + result.stderr
    assert result.returncode == pytest.ExitCode.OK, output
    assert "1 skipped" in output and "GPU test: the kernels need an NVIDIA Hopper GPU" in output


def test_require_gpu_leaves_deselected_gpu_tests_alone():
    """-m "not gpu" deselects the GPU tests before the switch looks at them."""
    result = run_pytest("-m", "not gpu", GPU_TEST, require="1")
    output = result.stdout + result.stderr
    assert result.returncode == pytest.ExitCode.NO_TESTS_COLLECTED, output
    assert "1 deselected" in output
