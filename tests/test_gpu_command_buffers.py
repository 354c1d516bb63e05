"""Decode steps under XLA command buffers (CUDA graphs), on the GPU.

A step is one jitted function: get_mla_metadata and flash_mla_with_kvcache (the decode kernel
and its split-KV combine), both implementation="cuda"; one step decodes densely over a BF16
cache (causal), one sparsely over FP8 caches (MODEL1 with an extra cache, topk_length,
extra_topk_length and an attention sink: every optional operand). For each, two child Pythons
run it, one
with command buffers for custom calls (gpu_util.COMMAND_BUFFER_FLAGS, plus
--xla_enable_command_buffers_during_profiling=true: XLA otherwise runs a graph's thunks one by
one while a profiler is on) and one without (gpu_util.NO_COMMAND_BUFFER_FLAGS). Each dumps
XLA's compilation (--xla_dump_to), runs the step three times on two input sets in turn (so a
recorded graph is replayed and updated with other buffers and data), saves the outputs, then
runs it TRACED_STEPS more times under jax.profiler. The tests check, each against the run
without command buffers as a control that must show none of it:

- the graph forms: XLA's thunk dump after its thunk passes (thunk_sequence_after_thunk_passes,
  XLA forms command buffers on thunks) has the step's custom-call thunks inside a
  kCommandBuffer thunk and none outside; with an XLA that forms them on HLO instead, the
  optimized HLO has them inside a `command_buffer` computation;
- the graph is replayed: the profile holds a `command_buffer::execute` host event per traced
  step and GPU events launched from a graph (with a `cuda_graph_id` or `cuda_graph_exec_id`
  stat), and every event of our kernels (names with "jfm") has such a stat;
- the outputs are bitwise those of the run without command buffers, the same at every step,
  and within the op's tolerances of its float64 oracle.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_gpu_decode_sparse as sparse
from gpu_util import (
    COMMAND_BUFFER_FLAGS,
    NO_COMMAND_BUFFER_FLAGS,
    finish_python,
    start_python,
)
from test_gpu_decode_dense import D_V, bits, build_inputs, check_against_reference

import jax_flashmla as fm

pytestmark = pytest.mark.gpu

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
STEPS = 3
TRACED_STEPS = 4
PROFILE_FLAG = "--xla_enable_command_buffers_during_profiling=true"


@jax.jit
def dense_graph_step(q, k_cache, block_table, cache_seqlens):
    """One dense decode step: the schedule, then the decode with its combine (causal)."""
    s_q, h_q, h_kv = q.shape[1], q.shape[2], k_cache.shape[2]
    metadata = fm.get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv, implementation="cuda")
    return fm.flash_mla_with_kvcache(
        q, k_cache, block_table, cache_seqlens, D_V, *metadata, causal=True, implementation="cuda"
    )


@jax.jit
def sparse_graph_step(
    contexts,
    q,
    k_cache,
    indices,
    topk_length,
    attn_sink,
    extra_k_cache,
    extra_indices,
    extra_topk_length,
):
    """One sparse decode step: the schedule for topk + extra_topk keys, then the decode with
    its combine."""
    s_q, h_q = q.shape[1], q.shape[2]
    metadata = fm.get_mla_metadata(
        contexts,
        s_q * h_q,
        1,
        num_heads_q=h_q,
        is_fp8_kvcache=True,
        topk=indices.shape[2] + extra_indices.shape[2],
        implementation="cuda",
    )
    return fm.flash_mla_with_kvcache(
        q,
        k_cache,
        None,
        None,
        D_V,
        *metadata,
        is_fp8_kvcache=True,
        indices=indices,
        attn_sink=attn_sink,
        topk_length=topk_length,
        extra_k_cache=extra_k_cache,
        extra_indices_in_kvcache=extra_indices,
        extra_topk_length=extra_topk_length,
        implementation="cuda",
    )


def sparse_inputs(seed: int) -> sparse.Inputs:
    return sparse.build_inputs(
        seed,
        layout="MODEL1",
        b=6,
        s_q=2,
        h_q=64,
        main=sparse.CacheConfig(1024, 576, 61),
        extra=sparse.CacheConfig(512, 128, 2),
        topk_length=True,
        extra_topk_length=True,
    )


@dataclasses.dataclass(frozen=True)
class GraphStep:
    """A step and how to feed and check it. Two input sets of the same shapes: one executable,
    one graph, replayed with either."""

    step: object  # the jitted function; its name names the module in XLA's dumps
    seeds: tuple[int, int]
    build: object  # seed -> inputs
    args: object  # inputs -> the step's arguments
    check: object  # (inputs, out, lse) -> None, raises where out or lse is wrong

    @property
    def module(self) -> str:
        return self.step.__name__


GRAPH_STEPS = {
    "dense": GraphStep(
        dense_graph_step,
        (11, 12),
        lambda seed: build_inputs(seed=seed, b=6, s_q=2, s_k=900, h_q=128, h_kv=1),
        lambda inputs: inputs.args(),
        lambda inputs, out, lse: check_against_reference(inputs, out, lse, causal=True),
    ),
    "sparse": GraphStep(
        sparse_graph_step,
        (21, 22),
        sparse_inputs,
        lambda inputs: (jnp.asarray(inputs.main.contexts), *inputs.kernel_args()),
        sparse.check_against_oracle,
    ),
}


def child_main(kind: str, out_dir: str) -> None:
    """The child Python's work: outputs of STEPS steps on both sets, then a profile."""
    graph = GRAPH_STEPS[kind]
    sets = [graph.args(graph.build(seed)) for seed in graph.seeds]
    outputs = {}
    for step in range(STEPS):
        for index, args in enumerate(sets):
            out, lse = graph.step(*args)
            outputs[f"out{index}-step{step}"] = bits(np.asarray(out))
            outputs[f"lse{index}-step{step}"] = bits(np.asarray(lse))
    np.savez(os.path.join(out_dir, "outputs.npz"), **outputs)
    with jax.profiler.trace(os.path.join(out_dir, "trace")):
        for _ in range(TRACED_STEPS):
            jax.block_until_ready(graph.step(*sets[0]))


CHILD_SCRIPT = """
import sys
sys.path.insert(0, {tests_dir!r})
import test_gpu_command_buffers
test_gpu_command_buffers.child_main({kind!r}, {out_dir!r})
"""


@dataclasses.dataclass(frozen=True)
class ChildRun:
    graph: GraphStep
    out_dir: str
    error: str  # "" when the child exited cleanly

    @property
    def dump_dir(self) -> str:
        return os.path.join(self.out_dir, "dump")

    def outputs(self) -> dict[str, np.ndarray]:
        path = os.path.join(self.out_dir, "outputs.npz")
        assert os.path.exists(path), f"no outputs saved: {self.error}"
        with np.load(path) as saved:
            return dict(saved)


@pytest.fixture(scope="module", params=sorted(GRAPH_STEPS))
def graph_runs(request, tmp_path_factory) -> dict[str, ChildRun]:
    """Both children of one step, run at once: {"on": with command buffers, "off": without}."""
    kind = request.param
    flags = {"on": (*COMMAND_BUFFER_FLAGS, PROFILE_FLAG), "off": NO_COMMAND_BUFFER_FLAGS}
    started = {}
    for name, run_flags in flags.items():
        out_dir = str(tmp_path_factory.mktemp(f"command-buffers-{kind}-{name}"))
        script = CHILD_SCRIPT.format(tests_dir=TESTS_DIR, kind=kind, out_dir=out_dir)
        dump = f"--xla_dump_to={os.path.join(out_dir, 'dump')}"
        started[name] = (out_dir, start_python(script, (*run_flags, dump)))
    runs = {}
    for name, (out_dir, process) in started.items():
        try:
            finish_python(process, timeout=300)
            error = ""
        except AssertionError as failure:
            error = str(failure)
        runs[name] = ChildRun(GRAPH_STEPS[kind], out_dir, error)
    return runs


# ----------------------------------------------------------------------------------------------
# The graph forms: XLA's dumps
# ----------------------------------------------------------------------------------------------


def dumped(run: ChildRun, suffix: str) -> list[str]:
    return sorted(glob.glob(os.path.join(run.dump_dir, f"*{run.graph.module}*{suffix}")))


def hlo_computations(text: str) -> dict[str, str]:
    """The computations of an HLO module's text, by name."""
    computations, name, body = {}, None, []
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if name is None and header:
            name, body = header.group(1), []
        elif name is not None and line.startswith("}"):
            computations[name] = "\n".join(body)
            name = None
        elif name is not None:
            body.append(line)
    return computations


def our_custom_calls(text: str) -> int:
    return sum(text.count(f'custom_call_target="{target}"') for target in fm.FFI_TARGETS)


@dataclasses.dataclass(frozen=True)
class GraphEvidence:
    custom_calls: int  # of our targets, in the optimized HLO
    thunks_inside: int  # custom-call thunks nested in a kCommandBuffer thunk
    thunks_outside: int
    hlo_inside: int  # our custom calls in `command_buffer` HLO computations

    @property
    def formed(self) -> bool:
        thunks = self.thunks_inside >= self.custom_calls and self.thunks_outside == 0
        return self.custom_calls >= 2 and (thunks or self.hlo_inside == self.custom_calls)

    @property
    def none(self) -> bool:
        return self.thunks_inside == 0 and self.hlo_inside == 0


def graph_evidence(run: ChildRun) -> GraphEvidence:
    hlo_files = dumped(run, "after_optimizations.txt")
    listing = sorted(os.listdir(run.dump_dir)) if os.path.isdir(run.dump_dir) else []
    assert hlo_files, f"no optimized HLO of {run.graph.module} dumped: {listing[:40]} {run.error}"
    hlo = pathlib.Path(hlo_files[-1]).read_text()
    hlo_inside = sum(
        our_custom_calls(body)
        for name, body in hlo_computations(hlo).items()
        if name.startswith("command_buffer")
    )
    inside = outside = 0
    for path in dumped(run, "thunk_sequence_after_thunk_passes.txt"):
        in_buffer = False
        for line in pathlib.Path(path).read_text().splitlines():
            if not line.strip():
                continue
            top_level = not line[0].isspace()
            if top_level:
                in_buffer = "kCommandBuffer" in line
            if "kCustomCall" in line:
                if in_buffer and not top_level:
                    inside += 1
                else:
                    outside += 1
    return GraphEvidence(our_custom_calls(hlo), inside, outside, hlo_inside)


def test_quick_command_buffers_form(graph_runs):
    on, off = graph_evidence(graph_runs["on"]), graph_evidence(graph_runs["off"])
    assert on.formed, (on, dumped(graph_runs["on"], ".txt"))
    assert off.none and off.custom_calls == on.custom_calls, off


# ----------------------------------------------------------------------------------------------
# The graph is replayed: the profile
# ----------------------------------------------------------------------------------------------

GRAPH_STATS = ("cuda_graph_id", "cuda_graph_exec_id")


@dataclasses.dataclass(frozen=True)
class Profile:
    host: collections.Counter  # host event names (TraceMe metadata after '#' dropped)
    gpu: list[tuple[str, dict]]  # (name, stats) of every event on a GPU plane

    def executes(self) -> int:
        return sum(n for name, n in self.host.items() if name.startswith("command_buffer::execute"))

    def from_graphs(self) -> list[str]:
        return [name for name, stats in self.gpu if any(s in stats for s in GRAPH_STATS)]

    def ours(self) -> list[tuple[str, dict]]:
        return [(name, stats) for name, stats in self.gpu if "jfm" in name]

    def summary(self) -> str:
        gpu = collections.Counter(
            (name[:60], tuple(sorted(k for k in stats if "graph" in k))) for name, stats in self.gpu
        )
        return f"host: {self.host.most_common(25)}; gpu: {gpu.most_common(15)}"


def read_profile(run: ChildRun) -> Profile:
    from jax.profiler import ProfileData

    paths = glob.glob(os.path.join(run.out_dir, "trace", "**", "*.xplane.pb"), recursive=True)
    assert paths, f"no profile written: {run.error}"
    data = ProfileData.from_file(paths[0])
    host, gpu = collections.Counter(), []
    for plane in data.planes:
        on_gpu = plane.name.startswith("/device:GPU")
        for line in plane.lines:
            for event in line.events:
                if on_gpu:
                    gpu.append((event.name, dict(event.stats)))
                else:
                    host[event.name.split("#")[0]] += 1
    return Profile(host, gpu)


def test_quick_command_buffers_replay_in_the_profile(graph_runs):
    assert not graph_runs["on"].error, graph_runs["on"].error
    on, off = read_profile(graph_runs["on"]), read_profile(graph_runs["off"])
    assert on.executes() >= TRACED_STEPS, on.summary()
    assert not [name for name in on.host if "CommandBuffer disabled" in name], on.summary()
    assert len(on.from_graphs()) >= TRACED_STEPS, on.summary()
    # Our kernels, where the profile lists a graph's kernels one by one, ran from the graph.
    assert all(any(s in stats for s in GRAPH_STATS) for _, stats in on.ours()), on.summary()
    # The control: the same kernels, seen by the profiler, launched one by one.
    assert off.executes() == 0 and off.from_graphs() == [], off.summary()
    assert len(off.ours()) >= TRACED_STEPS, off.summary()


# ----------------------------------------------------------------------------------------------
# The same outputs, and the right ones
# ----------------------------------------------------------------------------------------------


def test_quick_command_buffers_same_bits_and_correct(graph_runs):
    on, off = graph_runs["on"].outputs(), graph_runs["off"].outputs()
    assert sorted(on) == sorted(off)
    for key in on:
        np.testing.assert_array_equal(on[key], off[key], err_msg=key)
        first = re.sub(r"step\d+", "step0", key)
        np.testing.assert_array_equal(on[key], on[first], err_msg=f"{key} vs the first step")
    graph = graph_runs["on"].graph
    for index, seed in enumerate(graph.seeds):
        inputs = graph.build(seed)
        out = on[f"out{index}-step0"].view(np.dtype(inputs.q.dtype))
        lse = on[f"lse{index}-step0"].view(np.float32)
        graph.check(inputs, out, lse)
