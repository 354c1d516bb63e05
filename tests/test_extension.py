"""The compiled extension agrees with the Python package on every shared fact."""

from __future__ import annotations

import pytest

from jax_flashmla._src import geometry, platform

_C = platform.extension()
pytestmark = pytest.mark.skipif(
    _C is None, reason=f"no CUDA extension: {platform.extension_unavailable_reason()}"
)


def test_constants_match_python_geometry():
    compiled = _C.constants()
    python = {
        name: getattr(geometry, name)
        for name in (
            "HEAD_DIM_LATENT",
            "HEAD_DIM_ROPE",
            "HEAD_DIM_QK",
            "HEAD_DIM_V",
            "DEFAULT_PAGE_SIZE",
            "SCHEDULER_BLOCK_TOKENS",
            "SCHEDULER_FIXED_OVERHEAD",
            "QUERY_TILE_ROWS",
            "METADATA_FIELDS",
        )
    }
    python.update({f"MetadataField.{f.name}": int(f) for f in geometry.MetadataField})
    assert compiled == python


def test_registered_targets_are_the_packages_targets():
    import jax_flashmla as fm

    assert sorted(_C.registrations()) == sorted(fm.FFI_TARGETS)
