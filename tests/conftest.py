"""Shared test setup: GPU tests skip themselves unless a Hopper GPU and the extension exist."""

from __future__ import annotations

import os

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
