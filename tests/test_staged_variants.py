"""Every kernel variant staged in benchmarks/probes/variants applies to csrc/ as it is.

A staged variant is a patch that `benchmarks/probes/measure_variant.sh` applies on a Hopper
GPU; one that no longer applies (the tree moved under it) would only show there. Checked
strictly (`git apply --check`: no fuzz), after the patches a variant's first line names
(`Applies on top of: a.patch b.patch`), which go in first.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ROOT / "benchmarks" / "probes" / "variants"
PREFIX = "Applies on top of:"


def prerequisites(patch: Path) -> list[Path]:
    first = patch.read_text().splitlines()[0]
    if not first.startswith(PREFIX):
        return []
    return [VARIANTS / name for name in first[len(PREFIX) :].split()]


def git_apply(patch: Path, tree: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["git", "apply", "-p1", *flags, str(patch)],
        cwd=tree,
        capture_output=True,
        text=True,
        check=False,
    )


PATCHES = sorted(VARIANTS.glob("*.patch"))


@pytest.mark.parametrize("patch", PATCHES, ids=[p.name for p in PATCHES])
def test_variant_applies(patch: Path, tmp_path: Path):
    tree = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", tree)
    for before in prerequisites(patch):
        assert before.exists(), f"{patch.name} names a missing prerequisite {before.name}"
        done = git_apply(before, tree)
        assert done.returncode == 0, f"{before.name} (before {patch.name}): {done.stderr}"
    checked = git_apply(patch, tree, "--check")
    assert checked.returncode == 0, f"{patch.name} does not apply to csrc/: {checked.stderr}"
