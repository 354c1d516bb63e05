"""CPU smoke tests of examples/deepseek_decode_loop.py, run in-process with tiny dims.

On CPU both backends of the example are the XLA reference, so these check the decode loop
itself (cache writes, scheduling once per step, scan over layers, donation, sharding), not the
kernel. The mesh test needs the 8 virtual CPU devices that conftest.py asks XLA for.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import jax
import numpy as np
import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "deepseek_decode_loop.py"

#: Tiny but complete: 2 layers, 16 heads, 576-wide latent rows, varlen requests over a few
#: pages (so the schedule splits requests), 1 warm-up + 3 timed steps.
SMALL = ["--small", "--layers", "2", "--batch", "4", "--context", "96", "--steps", "3"]


def _load_example():
    name = "deepseek_decode_loop"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return _load_example()


@pytest.fixture(scope="module")
def unsharded(example):
    """The scan version on one device, both runs: the baseline of the mesh test."""
    return example.run(example.parse_args([*SMALL, "--impl", "xla"]))


def test_main_returns_zero(example, capsys):
    assert example.main([*SMALL, "--layer-loop", "unroll"]) == 0
    out = capsys.readouterr().out
    assert "agree: same greedy tokens for all 4 steps" in out
    assert "tokens/s" in out


def test_backends_agree_exactly_on_cpu(unsharded):
    assert unsharded.exit_code == 0
    kernel, reference = unsharded.kernel, unsharded.reference
    assert kernel.tokens.shape == (4, 4)
    np.testing.assert_array_equal(kernel.tokens, reference.tokens)
    np.testing.assert_array_equal(kernel.logits, reference.logits)
    assert np.isfinite(kernel.logits).all()
    # The greedy loop must actually move: not every request repeats its first token.
    assert len(np.unique(kernel.tokens)) > 1


def test_mesh_matches_unsharded(example, unsharded, capsys):
    assert len(jax.devices()) >= 8, (
        "needs 8 devices: tests/conftest.py sets --xla_force_host_platform_device_count=8"
    )
    report = example.run(
        example.parse_args([*SMALL, "--impl", "xla", "--mesh", "data=2,model=4", "--check-hlo"])
    )
    assert report.exit_code == 0
    out = capsys.readouterr().out
    assert "mesh: data=2, model=4" in out
    assert "cache not gathered" in out
    assert "POSSIBLY GATHERED" not in out
    for sharded, single in (
        (report.kernel, unsharded.kernel),
        (report.reference, unsharded.kernel),
    ):
        np.testing.assert_array_equal(sharded.tokens, single.tokens)
        # Sharding over heads splits the output projection's sums (bf16 partial results), so
        # values move by bf16 rounding; logits are of unit scale.
        np.testing.assert_allclose(sharded.logits, single.logits, atol=3e-2)
        error = np.linalg.norm(sharded.hidden - single.hidden) / np.linalg.norm(single.hidden)
        assert error < 1e-2


def _result(example, tokens, logits):
    tokens = np.asarray(tokens, np.int32)
    logits = np.asarray(logits, np.float32)
    hidden = np.ones((*tokens.shape, 8), np.float32)
    return example.RunResult("x", tokens, logits, hidden, 0.0, 1.0, 1.0, [])


def test_compare_accepts_near_tie_and_rejects_real_flip(example):
    # One request, vocab 3, three steps; the runs pick different tokens at step 1.
    ref = _result(example, [[0], [0], [2]], [[[1, 0, 0]], [[0.50, 0.49, 0]], [[0, 0, 1]]])
    near = _result(example, [[0], [1], [0]], [[[1, 0, 0]], [[0.49, 0.50, 0]], [[1, 0, 0]]])
    far = _result(example, [[0], [1], [0]], [[[1, 0, 0]], [[0.30, 0.60, 0]], [[1, 0, 0]]])
    ok = example.compare(near, ref, logits_atol=0.1, hidden_rtol=0.01)
    assert ok.ok and ok.first_divergence == 1 and ok.steps_compared == 2
    assert "near ties" in ok.message and "step 1" in ok.message
    bad = example.compare(far, ref, logits_atol=0.1, hidden_rtol=0.01)
    assert not bad.ok and "DISAGREE" in bad.message and "step 1" in bad.message
    # Teacher-forced reference: every step is compared; step 2 agrees, so the run agrees.
    forced = _result(example, [[0], [0], [0]], [[[1, 0, 0]], [[0.50, 0.49, 0]], [[1, 0, 0]]])
    ok = example.compare(near, ref, logits_atol=0.1, hidden_rtol=0.01, forced=forced)
    assert ok.ok and ok.steps_compared == 3 and "1 of 3" in ok.message
    off = _result(example, [[0], [0], [0]], [[[1, 0, 0]], [[0.50, 0.49, 0]], [[0, 0, 1]]])
    bad = example.compare(near, ref, logits_atol=0.1, hidden_rtol=0.01, forced=off)
    assert not bad.ok and "(step 2)" in bad.message
    same = example.compare(ref, ref, logits_atol=0.0, hidden_rtol=0.0)
    assert same.ok and same.first_divergence is None and same.steps_compared == 3
