"""Shared test setup: GPU tests skip themselves unless a Hopper GPU and the extension exist."""

from __future__ import annotations

import os

# 8 virtual CPU devices for the sharding tests; set before JAX starts its backends. (GPU tests
# still run on the GPU: this only splits the host platform.)
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

# The full GPU matrix compiles ~1150 executables: it precompiles them on parallel threads into
# JAX's persistent cache, and the tests load them from there (the machine keeps no cache).
if os.environ.get("JAX_FLASHMLA_FULL") == "1":
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/jax_flashmla_compile_cache")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest

from jax_flashmla._src import platform


def _gpu_skip_reason() -> str:
    return platform.device_unsupported_reason() or platform.extension_unavailable_reason()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _gpu_skip_reason()
    full = os.environ.get("JAX_FLASHMLA_FULL") == "1" or "full" in (config.option.markexpr or "")
    for item in items:
        if "gpu" in item.keywords and reason:
            item.add_marker(pytest.mark.skip(reason=f"GPU test: {reason}"))
        if "full" in item.keywords and not full:
            item.add_marker(pytest.mark.skip(reason="full matrix: set JAX_FLASHMLA_FULL=1"))


@pytest.fixture
def rng(request: pytest.FixtureRequest):
    """A NumPy generator seeded from the test's name: fresh data per test, reproducible."""
    import zlib

    import numpy as np

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
