"""Shared test setup: GPU tests skip themselves unless a Hopper GPU and the extension exist.

JAX_FLASHMLA_REQUIRE_GPU=1 turns that skip into an error: when the selected tests include
GPU tests and no Hopper GPU or no compiled extension is there, pytest stops at collection
(exit status 4) with the reason, instead of reporting the GPU tests as skipped. The GPU
validation scripts (tests/gpu_validate.sh, gpu_memcheck.sh, gpu_full_matrix.sh) set it, so a
run on a machine that cannot run the kernels never passes for want of running them. Tests
that need more than one GPU still skip on a single-GPU machine.
"""

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

#: Environment switch: "1" makes GPU tests that cannot run an error instead of a skip.
REQUIRE_GPU_ENV = "JAX_FLASHMLA_REQUIRE_GPU"


def _gpu_skip_reason() -> str:
    return platform.device_unsupported_reason() or platform.extension_unavailable_reason()


# Last, so that the items deselected by -m / -k are gone already.
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from gpu_util import SELECTED_ITEMS

    config.stash[SELECTED_ITEMS] = list(items)
    reason = _gpu_skip_reason()
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if reason and gpu_items and os.environ.get(REQUIRE_GPU_ENV) == "1":
        raise pytest.UsageError(
            f"{REQUIRE_GPU_ENV}=1, but the {len(gpu_items)} selected GPU tests cannot run "
            f"here: {reason}"
        )
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
