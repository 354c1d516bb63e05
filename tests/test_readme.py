"""Every ```python block of README.md runs as written.

Each block runs on its own in a fresh interpreter (`-P`, from an empty directory, so it imports
the installed package as a reader would) on the CPU with 8 virtual devices, the setup the README
names for its sharding examples. A `print(...)  # text` line in a block promises that output:
the text must appear in what the block prints.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CI_SCRIPT = ROOT / ".ci" / "run"
BLOCKS = re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.S | re.M)
PROMISE = re.compile(r"^print\(.*\)  # (.+)$", re.M)


def run_python(code: str, cwd: Path) -> str:
    """Runs `code` in a fresh CPU-only interpreter with 8 devices; returns its stdout."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run(
        [sys.executable, "-P", "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"exit status {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def block_with(text: str) -> str:
    found = [b for b in BLOCKS if text in b]
    assert len(found) == 1, f"{len(found)} README blocks contain {text!r}"
    return found[0]


def test_readme_has_its_examples():
    # The decode loop, the auto-sharded call, shard_map and the export.
    assert len(BLOCKS) >= 4
    for text in ("jax.lax.scan", "AxisType.Auto", "jax.shard_map", "fm.assume_device()"):
        block_with(text)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path):
    block = BLOCKS[index]
    out = run_python(block, tmp_path)
    for promise in PROMISE.findall(block):
        assert promise in out, f"block {index} promised {promise!r}; printed:\n{out}"


def test_readme_export_calls_the_kernels(tmp_path):
    """The export snippet, on a machine without a GPU, holds the kernels' custom calls (or the
    reference where the package has no extension) and survives a serialisation round trip."""
    check = """
import importlib.util
restored = jax.export.deserialize(blob)
assert restored.platforms == ("cuda",), restored.platforms
text = exported.mlir_module()
targets = sorted(t for t in fm.FFI_TARGETS if f"@{t}" in text)
print("extension:", importlib.util.find_spec("jax_flashmla._C") is not None)
print("targets:", ",".join(targets))
"""
    out = run_python(block_with("fm.assume_device()") + check, tmp_path)
    lines = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    targets = set(filter(None, lines["targets"].split(",")))
    if lines["extension"] == "True":
        assert targets == {"jax_flashmla_mla_metadata", "jax_flashmla_decode_dense_sm90"}, out
    else:
        assert targets == set(), out


def test_ci_runs_the_readme_commands():
    """.ci/run marks the README's install and test commands; they must be the README's."""
    script = CI_SCRIPT.read_text()
    readme_lines = {line.strip() for line in README.read_text().splitlines()}
    for part in ("install", "test"):
        marked = re.search(rf"^# --- README: {part} ---\n(.*?)^# -+$", script, flags=re.S | re.M)
        assert marked, f".ci/run has no README {part} section"
        commands = [c for c in marked.group(1).splitlines() if c.strip()]
        assert commands, f".ci/run's README {part} section is empty"
        for command in commands:
            assert command.strip() in readme_lines, f"{command!r} is not in README.md"
