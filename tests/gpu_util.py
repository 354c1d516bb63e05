"""Helpers for the GPU tests."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import pytest

#: The test items selected for this run (after -m / -k), stored by conftest.py.
SELECTED_ITEMS = pytest.StashKey[list]()


def selected_cases(request: pytest.FixtureRequest, test_name: str) -> list:
    """The `case` parameters of the items of test `test_name` that this run selected (after -m
    and -k): what a full-matrix shard has to compile."""
    return [
        item.callspec.params["case"]
        for item in request.config.stash[SELECTED_ITEMS]
        if getattr(item, "originalname", None) == test_name
    ]


def compile_in_parallel(jobs: Iterable[Callable[[], object]], workers: int = 16) -> None:
    """Runs compile jobs on parallel threads (XLA compiles concurrently), into JAX's persistent
    compilation cache, from which the tests then load them; the first failure is raised."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()


#: XLA flags that put every command-buffer-compatible custom call into a command buffer (CUDA
#: graph). Without the minimum graph size of 1, XLA forms no graph for fewer than its default
#: number of commands (a decode step has two custom calls: the scheduler and the decode).
COMMAND_BUFFER_FLAGS = (
    "--xla_gpu_enable_command_buffer=CUSTOM_CALL",
    "--xla_gpu_graph_min_graph_size=1",
)
#: XLA flags that turn command buffers off altogether (an empty list of command types).
NO_COMMAND_BUFFER_FLAGS = ("--xla_gpu_enable_command_buffer=",)


def reference_placement(args):
    """`args` placed where the tests' reference computes: on the host under tests/gpu_memcheck.sh
    (JAX_FLASHMLA_HOST_REFERENCE=1), which keeps the reference's GPU programs (XLA's, cuBLAS's)
    out of the sanitized process so that only the kernel under test is instrumented; as they
    are otherwise."""
    if os.environ.get("JAX_FLASHMLA_HOST_REFERENCE") == "1":
        return jax.device_put(args, jax.devices("cpu")[0])
    return args


def poison_device_memory(nbytes: int) -> None:
    """Fill and free NaN buffers of about `nbytes` so that the next outputs XLA allocates land
    on NaN rather than on zeros: an element a kernel forgets to write then shows up."""
    chunks = [jnp.full((max(nbytes // 4, 1),), jnp.nan, jnp.float32) for _ in range(4)]
    jax.block_until_ready(chunks)
    del chunks


def start_python(script: str, xla_flags: tuple[str, ...] = ()) -> subprocess.Popen:
    """Start `script` in a fresh Python with `xla_flags` appended to XLA_FLAGS.

    The child allocates GPU memory on demand: the test process already holds most of it, and
    several children may share the GPU.
    """
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join((env.get("XLA_FLAGS", ""), *xla_flags)).strip()
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return subprocess.Popen(
        [sys.executable, "-P", "-c", script],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_python(process: subprocess.Popen, timeout: float = 600) -> str:
    """Wait for a `start_python` child; its stdout, or an AssertionError with its stderr."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        raise AssertionError(
            f"child Python timed out after {timeout} s: {stderr[-4000:]}"
        ) from None
    assert process.returncode == 0, f"child Python exit {process.returncode}: {stderr[-4000:]}"
    return stdout


def run_with_command_buffers(script: str) -> str:
    """Run `script` in a fresh Python with XLA command buffers (CUDA graphs) for custom calls."""
    return finish_python(start_python(script, COMMAND_BUFFER_FLAGS))
