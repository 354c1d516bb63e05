"""Helpers for the GPU tests."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp


def poison_device_memory(nbytes: int) -> None:
    """Fill and free NaN buffers of about `nbytes` so that the next outputs XLA allocates land
    on NaN rather than on zeros: an element a kernel forgets to write then shows up."""
    chunks = [jnp.full((max(nbytes // 4, 1),), jnp.nan, jnp.float32) for _ in range(4)]
    jax.block_until_ready(chunks)
    del chunks


def run_with_command_buffers(script: str) -> str:
    """Run `script` in a fresh Python with XLA command buffers (CUDA graphs) for custom calls."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=CUSTOM_CALL"
    ).strip()
    result = subprocess.run(
        [sys.executable, "-P", "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout
