"""The GPU validation scripts, checked without a GPU: they parse, every helper a part calls is
defined, every part is listed in the usage line, and the C++ runner passes arguments through
(with stand-ins for the programs and compute-sanitizer)."""

from __future__ import annotations

import os
import pathlib
import re
import stat
import subprocess

import pytest

TESTS = pathlib.Path(__file__).parent
SCRIPTS = ("gpu_validate.sh", "gpu_memcheck.sh", "gpu_full_matrix.sh")


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses(script):
    subprocess.run(["bash", "-n", str(TESTS / script)], check=True)


def validate_text() -> str:
    return (TESTS / "gpu_validate.sh").read_text()


def test_parts_call_defined_helpers_and_are_listed():
    text = validate_text()
    defined = set(re.findall(r"^([a-z_]+)\(\) \{", text, re.M))
    cases = text[text.index('case "${1:-}" in') :]
    parts = re.findall(r"^  ([a-z0-9-]+)\)$", cases, re.M)
    assert {"kernel", "sparse", "bench", "bench-sparse", "memcheck-sparse"} <= set(parts)
    usage = re.search(r"usage: \$0 ([a-z0-9|-]+)", text).group(1).split("|")
    assert sorted(usage) == sorted(parts)
    # Helpers run by `step "name" helper ...`, and those called directly in a part.
    called = set(re.findall(r'step "[^"]*" ([a-z_]+)', cases))
    called |= set(re.findall(r"^    ([a-z_]+)\b", cases, re.M)) - {"step", "cpp_build"}
    assert called <= defined | {"env"}, called - defined
    for helper in ("build", "build_cpp_tests", "quick_tests", "cpp_tests", "bench", "memcheck"):
        assert helper in defined


def test_cpp_runner_passes_arguments(tmp_path):
    """cpp_tests runs PROGRAM and PROGRAM:ARGUMENT plainly and under memcheck."""
    text = validate_text()
    body = re.search(r"^cpp_tests\(\) \{.*?^\}", text, re.M | re.S).group(0)
    bin_dir, logs, build = tmp_path / "bin", tmp_path / "logs", tmp_path / "build" / "cpp"
    for d in (bin_dir, logs, build):
        d.mkdir(parents=True)

    def executable(path, script):
        path.write_text(script)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)

    executable(bin_dir / "compute-sanitizer", '#!/bin/sh\nshift 6\n"$@" | sed "s/^/checked /"\n')
    for program in ("first", "second"):
        executable(build / program, f'#!/bin/sh\necho "{program} args: $*"\n')
    script = f"{body}\nlogs={logs}\n(exit 0) &\ncpp_tests $! first second:sparse\n"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    out = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "first: first args: \n" in out
    assert "second:sparse: second args: sparse\n" in out
    assert "second:sparse under memcheck: checked second args: sparse\n" in out
    assert (logs / "second_sparse_memcheck.txt").exists()
