"""The dense decode kernel (implementation="cuda") against the fp32 XLA reference, on the GPU.

Every test compares `flash_mla_with_kvcache(..., implementation="cuda")` (bf16/fp16, d_qk 576,
d_v 512, pages of 64 tokens unless a test says otherwise) with
`jax_flashmla.reference.decode.dense_decode` evaluated on fp32 copies of the same inputs, under
the dense-decode tolerances of docs/ops.md (`check_close`). Test data follow docs/ops.md: q and
k ~ N(0, 1) / 10 clamped to [-1, 1]; varlen lengths ~ max(N(s_k, s_k / 2), s_q) (else all s_k);
a randomly permuted block table whose entries past each request's blocks are 2147480000; NaN in
every cache element no request may read (rows past a request's length in its last page, every
block it does not use, spare blocks). The same layout as oracle_decode's builders, but q and the
cache are drawn on the device (jax.random): NumPy would take seconds per GB, and the largest
caches here hold 15 GB. Device memory is poisoned with NaN before each kernel call, so an output
the kernel forgets to write shows up.

The helpers here (layouts, builders, `run_kernel`, `check_against_reference`) also serve
test_gpu_decode_rescale.py, test_gpu_decode_inputs.py, test_gpu_command_buffers.py and
test_gpu_sharding.py.

Runs (on an H200, from the repository root):

    python -P -m pytest -q -m gpu tests/test_gpu_decode_dense.py       # quick: 96 tests
    JAX_FLASHMLA_FULL=1 python -P -m pytest -q -m gpu tests/test_gpu_decode_dense.py  # + 9206
    bash tests/gpu_memcheck.sh -k quick tests/test_gpu_decode_dense.py  # compute-sanitizer
    bash tests/gpu_full_matrix.sh small; bash tests/gpu_full_matrix.sh b64  # full, sharded

Every default (non-`full`) test is kept small enough for compute-sanitizer; add `-k quick` to
run only the `test_quick_*` ones (leaving out `test_long_context`, 70000-100000-token requests).
The full matrix is `test_quick_matrix` (a 40-case sample that covers every value of every axis)
plus `test_full_matrix` (the other 9176 cases: 2304 per page size of PAGES). Shard it with `-k`
on the case ids (`b{b}-sq{s_q}-sk{s_k}-h{h_q}x{h_kv}-{fixed|varlen}-{noncausal|causal}`, then
`-page{page}` but at page 64), e.g.
`-k "test_full_matrix and [b64-sq4"` (each shard precompiles only its own cases); setting
JAX_COMPILATION_CACHE_DIR=/tmp/jax-cache and JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 lets
shards and re-runs share compilations.

Compile time dominates on the GPU, so the matrix is laid out for jit-cache reuse: one
module-level jitted kernel call and one jitted reference, whose shapes depend only on (b, s_q,
s_k class, h_q, h_kv, page): every request gets a block table of a fixed width per mean-s_k class
(lengths are capped at 3 * s_k, i.e. mean + 4 sd), so the varlen and fixed-length variants of a
shape share executables, and `causal` (static) makes 2 compilations per shape. Whether the
precomputed metadata is passed is also chosen per shape. The test cases are ordered so that the
causal and non-causal variants of one input set run back to back and share its data.
"""

# Run time, estimated for one H200 (jax 0.11.2, 16 host cores):
# - per distinct (shape, causal): compiling the kernel call ~0.2 s, the reference (without
#   autotuning) ~0.5 s;
# - per case: inputs are built on the device (milliseconds); the kernel and reference calls take
#   milliseconds; the float64 comparison on the host (check_close) takes ~0.1 s per million
#   outputs, up to ~1.7 s for b=64 s_q=4 h_q=128 (17M outputs).
# Full matrix, per page size: 2304 cases over 576 shapes = 1152 kernel + 1152 reference
# compilations (~13 min of one core) plus ~7 min of building, running and comparing (two thirds
# of it in the b=64 cases); four page sizes make it four times that. tests/gpu_full_matrix.sh
# runs it as parallel pytest shards (measured on the H200, 16 cores, page 64 alone: b in
# {1, 2, 6} and the other full tests 113-131 s; b=64 132 s).
# Quick run (96 tests): the quick matrix and the page sizes took 82 s on an H100 (70 tests);
# under compute-sanitizer memcheck ~1.3 s per test with the reference on the host.

from __future__ import annotations

import dataclasses
import functools
import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gpu_util import (
    compile_in_parallel,
    poison_device_memory,
    reference_placement,
    selected_cases,
)
from oracle_decode import (
    BF16,
    DENSE_DECODE_LSE_TOL,
    DENSE_DECODE_OUT_TOL,
    FP16,
    GARBAGE_BLOCK,
    check_close,
    make_seqlens,
)

import jax_flashmla as fm
from jax_flashmla._src.geometry import DEFAULT_PAGE_SIZE, HEAD_DIM_QK, HEAD_DIM_V
from jax_flashmla.reference import decode as reference_decode

pytestmark = pytest.mark.gpu

#: The implementation under test. The comparison side is always the fp32 reference.
KERNEL = "cuda"

D_QK = HEAD_DIM_QK
D_V = HEAD_DIM_V
PAGE = DEFAULT_PAGE_SIZE
SPARE_BLOCKS = 2
#: Varlen lengths are capped at this multiple of the mean (mean + 4 sd), so that every case of a
#: mean-s_k class shares one block-table width (and so one compilation).
LENGTH_CAP = 3


# ----------------------------------------------------------------------------------------------
# Test data
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each request's tokens live: host arrays, small."""

    lengths: np.ndarray  # int32 [b]
    block_table: np.ndarray  # int32 [b, max_blocks]; GARBAGE_BLOCK past each request's blocks
    readable: np.ndarray  # bool [num_blocks, page]: rows some request may read


@dataclasses.dataclass(frozen=True)
class Inputs:
    """One decode call's arguments on the device, plus the lengths on the host."""

    q: jax.Array
    k_cache: jax.Array
    block_table: jax.Array
    cache_seqlens: jax.Array
    lengths: np.ndarray

    @property
    def heads(self) -> tuple[int, int]:
        return self.q.shape[2], self.k_cache.shape[2]

    def args(self) -> tuple[jax.Array, ...]:
        return self.q, self.k_cache, self.block_table, self.cache_seqlens


def class_max_blocks(s_k: int, page: int = PAGE) -> int:
    """Block-table width of the mean-s_k class: room for LENGTH_CAP * s_k tokens, plus one."""
    return -(-LENGTH_CAP * s_k // page) + 1


def make_layout(
    rng: np.random.Generator,
    *,
    b: int,
    s_q: int,
    s_k: int,
    varlen: bool,
    seqlens=None,
    zero_requests=(),
    max_blocks: int | None = None,
    page: int = PAGE,
) -> Layout:
    """Lengths, a randomly permuted block table and the readable-row mask.

    Lengths as oracle_decode.make_seqlens (capped at LENGTH_CAP * s_k) unless `seqlens` is
    given. Each request owns `max_blocks` entries (default: its class width, or just enough for
    explicit lengths plus one); the blocks are a random permutation of b * max_blocks +
    SPARE_BLOCKS physical blocks.
    """
    if seqlens is None:
        lengths = make_seqlens(rng, b, s_k, s_q=s_q, varlen=varlen, zero_requests=zero_requests)
        lengths = np.minimum(lengths, LENGTH_CAP * s_k).astype(np.int32)
        default_blocks = class_max_blocks(s_k, page)
    else:
        lengths = np.asarray(seqlens, np.int32)
        default_blocks = -(-int(lengths.max(initial=0)) // page) + 1
    max_blocks = default_blocks if max_blocks is None else max_blocks
    assert max_blocks * page >= lengths.max(initial=0), (max_blocks, lengths.max())
    num_blocks = b * max_blocks + SPARE_BLOCKS
    owned = rng.permutation(num_blocks)[: b * max_blocks].reshape(b, max_blocks)
    readable = np.zeros((num_blocks, page), bool)
    block_table = owned.astype(np.int32)
    for i, length in enumerate(lengths.tolist()):
        positions = np.arange(length)
        readable[owned[i, positions // page], positions % page] = True
        block_table[i, -(-length // page) :] = GARBAGE_BLOCK
    return Layout(lengths, block_table, readable)


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _random_values(key: jax.Array, *, shape: tuple[int, ...], dtype) -> jax.Array:
    """N(0, 1) / 10 clamped to [-1, 1], drawn on the device (GBs of cache in milliseconds)."""
    return jnp.clip(jax.random.normal(key, shape, jnp.float32) / 10.0, -1.0, 1.0).astype(dtype)


@functools.partial(jax.jit, static_argnames=("h_kv", "dtype"))
def _paged_cache(key: jax.Array, readable: jax.Array, *, h_kv: int, dtype) -> jax.Array:
    """A cache [num_blocks, page, h_kv, D_QK] of random values, NaN where nobody may read.

    Drawn block by block (a few MB of random bits at a time), so that building a 15 GB cache
    does not take several times that in intermediates.
    """
    num_blocks, page = readable.shape

    def one_block(block: tuple[jax.Array, jax.Array]) -> jax.Array:
        index, rows = block
        shape = (page, h_kv, D_QK)
        values = jax.random.normal(jax.random.fold_in(key, index), shape, jnp.float32)
        values = jnp.clip(values / 10.0, -1.0, 1.0)
        return jnp.where(rows[:, None, None], values, jnp.nan).astype(dtype)

    blocks_per_step = max(1, (1 << 24) // (page * h_kv * D_QK))
    return jax.lax.map(
        one_block, (jnp.arange(num_blocks), readable), batch_size=min(blocks_per_step, num_blocks)
    )


def make_values(seed: int, layout: Layout, *, s_q: int, h_q: int, h_kv: int, dtype=BF16) -> Inputs:
    """Random q and cache for `layout`, generated on the device from `seed`."""
    dtype = np.dtype(dtype)
    key_q, key_k = jax.random.split(jax.random.key(seed & 0x7FFFFFFF))
    b = layout.lengths.shape[0]
    q = _random_values(key_q, shape=(b, s_q, h_q, D_QK), dtype=dtype)
    k_cache = _paged_cache(key_k, jnp.asarray(layout.readable), h_kv=h_kv, dtype=dtype)
    return Inputs(
        q,
        k_cache,
        jnp.asarray(layout.block_table),
        jnp.asarray(layout.lengths),
        layout.lengths,
    )


def build_inputs(
    seed: int,
    *,
    b: int,
    s_q: int,
    s_k: int,
    h_q: int,
    h_kv: int,
    varlen: bool = True,
    dtype=BF16,
    seqlens=None,
    zero_requests=(),
    page: int = PAGE,
) -> Inputs:
    """Layout and values of one test, all drawn from `seed`."""
    rng = np.random.default_rng(seed)
    layout = make_layout(
        rng,
        b=b,
        s_q=s_q,
        s_k=s_k,
        varlen=varlen,
        seqlens=seqlens,
        zero_requests=zero_requests,
        page=page,
    )
    return make_values(seed, layout, s_q=s_q, h_q=h_q, h_kv=h_kv, dtype=dtype)


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


# ----------------------------------------------------------------------------------------------
# Kernel, reference and comparison
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("causal", "softmax_scale"))
def _kernel(
    q, k_cache, block_table, cache_seqlens, metadata, num_splits, *, causal, softmax_scale=None
):
    return fm.flash_mla_with_kvcache(
        q,
        k_cache,
        block_table,
        cache_seqlens,
        D_V,
        metadata,
        num_splits,
        softmax_scale=softmax_scale,
        causal=causal,
        implementation=KERNEL,
    )


# Compiled without autotuning: hundreds of reference shapes are compiled once each, and tuning
# each matrix product would cost more than running it.
@functools.partial(
    jax.jit,
    static_argnames=("causal", "softmax_scale"),
    compiler_options={"xla_gpu_autotune_level": 0},
)
def _reference(q, k_cache, block_table, cache_seqlens, *, causal, softmax_scale=None):
    """The fp32 oracle: the reference on fp32 copies of the inputs (so fp32 outputs)."""
    return reference_decode.dense_decode(
        q.astype(jnp.float32),
        k_cache.astype(jnp.float32),
        block_table,
        cache_seqlens,
        head_dim_v=D_V,
        softmax_scale=softmax_scale,
        causal=causal,
    )


_metadata = jax.jit(fm.get_mla_metadata, static_argnums=(1, 2))


def metadata_for(inputs: Inputs) -> tuple[jax.Array, jax.Array]:
    """The schedule of get_mla_metadata for these inputs, computed as FlashMLA's users do."""
    h_q, h_kv = inputs.heads
    s_q = inputs.q.shape[1]
    return _metadata(inputs.cache_seqlens, s_q * h_q // h_kv, h_kv)


def run_kernel(
    inputs: Inputs, *, causal: bool, with_metadata: bool, softmax_scale: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One kernel call on freshly NaN-poisoned device memory; host copies of (out, lse)."""
    metadata = metadata_for(inputs) if with_metadata else (None, None)
    b, s_q, h_q, _ = inputs.q.shape
    poison_device_memory(max(b * s_q * h_q * D_V * 4, 1 << 20))
    out, lse = _kernel(*inputs.args(), *metadata, causal=causal, softmax_scale=softmax_scale)
    return np.asarray(out), np.asarray(lse)


def check_against_reference(
    inputs: Inputs,
    out: np.ndarray,
    lse: np.ndarray,
    *,
    causal: bool,
    softmax_scale: float | None = None,
):
    b, s_q, h_q, _ = inputs.q.shape
    assert out.shape == (b, s_q, h_q, D_V) and out.dtype == np.dtype(inputs.q.dtype)
    assert lse.shape == (b, h_q, s_q) and lse.dtype == np.float32
    reference = _reference(
        *reference_placement(inputs.args()), causal=causal, softmax_scale=softmax_scale
    )
    ref_out, ref_lse = (np.asarray(x) for x in reference)
    check_close(out, ref_out, name="out", **DENSE_DECODE_OUT_TOL)
    check_close(lse, ref_lse, name="lse", **DENSE_DECODE_LSE_TOL)
    # Lonely queries (no visible key): out exactly 0, lse exactly +inf.
    lonely = np.isinf(ref_lse)
    assert np.all(out.astype(np.float32)[lonely.transpose(0, 2, 1)] == 0.0)


def bits(x: np.ndarray) -> np.ndarray:
    """The raw bits of an array, for bitwise comparisons that also hold for NaN."""
    return np.ascontiguousarray(x).view(f"u{x.dtype.itemsize}")


# ----------------------------------------------------------------------------------------------
# The shape matrix
# ----------------------------------------------------------------------------------------------

BATCHES = (1, 2, 6, 64)
S_QS = (1, 2, 4)
S_KS = (20, 140, 4096)
HEAD_PAIRS = tuple(
    (h_q, h_kv) for h_q in (1, 3, 9, 63, 64, 126, 128) for h_kv in (1, 2, 3, 8) if h_q % h_kv == 0
)
#: Page sizes of the matrix: FlashMLA's 64, vLLM's 1 and 16, and a large one. The loaders take
#: 64-token blocks by TMA where pages are a multiple of 64 (64, 256) or a block is whole pages
#: of 16 or 32 tokens (16), and gather them token by token otherwise (1);
#: test_quick_page_sizes covers the other sizes.
PAGES = (1, 16, 64, 256)


@dataclasses.dataclass(frozen=True)
class Case:
    b: int
    s_q: int
    s_k: int
    h_q: int
    h_kv: int
    varlen: bool
    causal: bool
    dtype: str = "bfloat16"
    page: int = PAGE

    @property
    def id(self) -> str:
        return (
            f"b{self.b}-sq{self.s_q}-sk{self.s_k}-h{self.h_q}x{self.h_kv}-"
            f"{'varlen' if self.varlen else 'fixed'}-{'causal' if self.causal else 'noncausal'}"
            + ("" if self.dtype == "bfloat16" else f"-{self.dtype}")
            + ("" if self.page == PAGE else f"-page{self.page:03d}")
        )

    @property
    def shape_key(self) -> tuple:
        """What decides the compiled shapes (varlen and causal do not)."""
        return (self.b, self.s_q, self.s_k, self.h_q, self.h_kv, self.dtype, self.page)

    @property
    def data_key(self) -> tuple:
        """What decides the input data (the causal variants share it)."""
        return (*self.shape_key, self.varlen)

    @property
    def with_metadata(self) -> bool:
        """Pass precomputed metadata for about half of the shapes (fixed per shape)."""
        return seed_of("metadata", *self.shape_key) % 2 == 0

    @property
    def cost(self) -> int:
        """Roughly the reference's work: tokens gathered times (cache row + query rows)."""
        tokens = self.b * class_max_blocks(self.s_k, self.page) * self.page
        return tokens * (self.h_kv * D_QK + self.s_q * self.h_q)


AXES = {
    "b": lambda c: c.b,
    "s_q": lambda c: c.s_q,
    "s_k": lambda c: c.s_k,
    "heads": lambda c: (c.h_q, c.h_kv),
    "varlen": lambda c: c.varlen,
    "causal": lambda c: c.causal,
    "page": lambda c: c.page,
}

ALL_CASES = [
    Case(b, s_q, s_k, h_q, h_kv, varlen, causal, page=page)
    for b, s_q, s_k, (h_q, h_kv), varlen, causal, page in itertools.product(
        BATCHES, S_QS, S_KS, HEAD_PAIRS, (False, True), (False, True), PAGES
    )
]

#: Quick cases stay below this cost (it excludes only b=64 at s_k=4096), for compute-sanitizer.
QUICK_MAX_COST = 6 * class_max_blocks(4096) * PAGE * (8 * D_QK + 4 * 128)


def sample_cases(
    cases: list[Case], count: int, seed: int, max_cost: int, axes=tuple(AXES)
) -> list[Case]:
    """A deterministic sample of cheap cases that covers every value of every axis in `axes`.

    Greedy: walk a seeded permutation, keep each case that brings a value not seen yet, then
    fill up to `count` with the next cases of the walk.
    """
    order = np.random.default_rng(seed).permutation(len(cases))
    walk = [cases[i] for i in order if cases[i].cost <= max_cost]
    missing = {axis: {AXES[axis](c) for c in cases} for axis in axes}
    chosen: list[Case] = []
    for case in walk:
        if any(AXES[axis](case) in missing[axis] for axis in axes):
            chosen.append(case)
            for axis in axes:
                missing[axis].discard(AXES[axis](case))
    assert not any(missing.values()), missing
    for case in walk:
        if len(chosen) >= count:
            break
        if case not in chosen:
            chosen.append(case)
    return sorted(chosen, key=lambda c: (*c.data_key, c.causal))


QUICK_CASES = sample_cases(ALL_CASES, 40, seed=2026, max_cost=QUICK_MAX_COST)
_quick = set(QUICK_CASES)
FULL_CASES = [c for c in ALL_CASES if c not in _quick]
FP16_CASES = [
    dataclasses.replace(c, dtype="float16")
    for c in sample_cases(
        ALL_CASES, 8, seed=16, max_cost=QUICK_MAX_COST, axes=("s_q", "s_k", "varlen", "causal")
    )
]

# Inputs of the last case, so that its causal twin (which runs next) reuses them.
_last_inputs: dict[tuple, Inputs] = {}


def inputs_for(case: Case) -> Inputs:
    if case.data_key not in _last_inputs:
        _last_inputs.clear()  # free the previous case's device buffers first
        _last_inputs[case.data_key] = build_inputs(
            seed_of(*case.data_key),
            b=case.b,
            s_q=case.s_q,
            s_k=case.s_k,
            h_q=case.h_q,
            h_kv=case.h_kv,
            varlen=case.varlen,
            dtype=np.dtype(case.dtype) if case.dtype != "bfloat16" else BF16,
            page=case.page,
        )
    return _last_inputs[case.data_key]


def run_case(case: Case) -> None:
    inputs = inputs_for(case)
    out, lse = run_kernel(inputs, causal=case.causal, with_metadata=case.with_metadata)
    check_against_reference(inputs, out, lse, causal=case.causal)


def _ids(cases: list[Case]) -> list[str]:
    return [c.id for c in cases]


@pytest.mark.parametrize("case", QUICK_CASES, ids=_ids(QUICK_CASES))
def test_quick_matrix(case: Case):
    run_case(case)


def abstract_args(case: Case, *, with_metadata: bool) -> tuple[jax.ShapeDtypeStruct, ...]:
    """The shapes and dtypes of a case's kernel arguments (as build_inputs makes them)."""
    dtype = np.dtype(case.dtype) if case.dtype != "bfloat16" else BF16
    max_blocks = class_max_blocks(case.s_k, case.page)
    num_blocks = case.b * max_blocks + SPARE_BLOCKS
    args = [
        jax.ShapeDtypeStruct((case.b, case.s_q, case.h_q, D_QK), dtype),
        jax.ShapeDtypeStruct((num_blocks, case.page, case.h_kv, D_QK), dtype),
        jax.ShapeDtypeStruct((case.b, max_blocks), jnp.int32),
        jax.ShapeDtypeStruct((case.b,), jnp.int32),
    ]
    if with_metadata:
        rows = case.s_q * case.h_q // case.h_kv
        args += jax.eval_shape(lambda lens: fm.get_mla_metadata(lens, rows, case.h_kv), args[3])
    return tuple(args)


def precompile(cases: list[Case], workers: int = 16) -> None:
    """Compile every (shape, causal) of `cases`, kernel and reference, on parallel threads.

    XLA compiles outside the GIL, so this spreads the full matrix's ~1150 compilations over the
    host's cores. The executables land in JAX's persistent compilation cache (conftest turns it
    on for JAX_FLASHMLA_FULL=1), from which the tests' own jit calls then load them.
    """
    jobs = {}
    for case in cases:
        meta = case.with_metadata
        jobs[("kernel", case.shape_key, case.causal, meta)] = lambda c=case, m=meta: _kernel.lower(
            *abstract_args(c, with_metadata=m),
            *(() if m else (None, None)),
            causal=c.causal,
            softmax_scale=None,
        ).compile()
        jobs[("reference", case.shape_key, case.causal)] = lambda c=case: _reference.lower(
            *abstract_args(c, with_metadata=False), causal=c.causal, softmax_scale=None
        ).compile()
    compile_in_parallel(jobs.values(), workers)


@pytest.fixture(scope="module")
def full_matrix_compiled(request: pytest.FixtureRequest):
    """Precompiles the full-matrix cases selected for this run (a `-k` shard compiles its own)."""
    if jax.config.jax_compilation_cache_dir:
        precompile(selected_cases(request, "test_full_matrix"))


@pytest.mark.full
@pytest.mark.parametrize("case", FULL_CASES, ids=_ids(FULL_CASES))
def test_full_matrix(case: Case, full_matrix_compiled):
    """The rest of the matrix (with test_quick_matrix, all of it)."""
    run_case(case)


@pytest.mark.parametrize("case", FP16_CASES, ids=_ids(FP16_CASES))
def test_quick_fp16(case: Case):
    assert np.dtype(case.dtype) == FP16
    run_case(case)


# ----------------------------------------------------------------------------------------------
# Requests of length 0 among long ones
# ----------------------------------------------------------------------------------------------

ZERO_LENGTH_QUICK = {((128, 1), True), ((9, 3), False)}
ZERO_LENGTH_CASES = [
    pytest.param(
        h_q,
        h_kv,
        causal,
        id=f"h{h_q}x{h_kv}-{'causal' if causal else 'noncausal'}",
        marks=() if ((h_q, h_kv), causal) in ZERO_LENGTH_QUICK else pytest.mark.full,
    )
    for (h_q, h_kv) in HEAD_PAIRS
    for causal in (False, True)
]


@pytest.mark.parametrize(("h_q", "h_kv", "causal"), ZERO_LENGTH_CASES)
def test_quick_zero_length_requests(h_q, h_kv, causal):
    """b = 128, s_q = 2, mean s_k 4096, about half the requests of length 0 (all lonely)."""
    b, s_q, s_k = 128, 2, 4096
    seed = seed_of("zero-length", h_q, h_kv)  # the causal twin shares the data
    zeros = np.random.default_rng(seed).permutation(b)[: b // 2]
    inputs = build_inputs(
        seed, b=b, s_q=s_q, s_k=s_k, h_q=h_q, h_kv=h_kv, varlen=True, zero_requests=zeros
    )
    assert (inputs.lengths == 0).sum() == b // 2
    out, lse = run_kernel(inputs, causal=causal, with_metadata=bool(h_q % 2))
    check_against_reference(inputs, out, lse, causal=causal)
    assert np.all(np.isinf(lse[zeros])) and np.all(out[zeros].astype(np.float32) == 0.0)


# ----------------------------------------------------------------------------------------------
# Multi-token causal decode, page boundaries, long contexts
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("h_q", "h_kv"), [(128, 1), (16, 1), (63, 3), (64, 8)])
def test_quick_causal_s_q8(h_q, h_kv):
    """s_q = 8 (speculative decode), causal; some requests shorter than s_q (lonely queries)."""
    lengths = [0, 1, 5, 7, 8, 9, 63, 64, 65, 200, 1000, 3000]
    inputs = build_inputs(
        seed_of("s_q8", h_q, h_kv), b=12, s_q=8, s_k=0, h_q=h_q, h_kv=h_kv, seqlens=lengths
    )
    out, lse = run_kernel(inputs, causal=True, with_metadata=h_kv == 1)
    check_against_reference(inputs, out, lse, causal=True)


PAGE_EDGE_LENGTHS = [0, 1, 2, 63, 64, 65, 127, 128, 129, 191, 192, 193, 639, 640, 641]
PAGE_EDGE_LENGTHS += [4095, 4096, 4097]


@pytest.mark.parametrize(
    ("s_q", "causal", "h_q", "h_kv"),
    [(1, False, 128, 1), (2, True, 64, 2), (2, False, 9, 3), (4, True, 16, 1)],
)
def test_quick_page_boundaries(s_q, causal, h_q, h_kv):
    """cache_seqlens at multiples of 64 and 64 +- 1 (the rows past each length are NaN)."""
    lengths = PAGE_EDGE_LENGTHS
    inputs = build_inputs(
        seed_of("page-edges", s_q, h_q, h_kv),
        b=len(lengths),
        s_q=s_q,
        s_k=0,
        h_q=h_q,
        h_kv=h_kv,
        seqlens=lengths,
    )
    for with_metadata in (False, True):
        out, lse = run_kernel(inputs, causal=causal, with_metadata=with_metadata)
        check_against_reference(inputs, out, lse, causal=causal)


#: Page sizes the loaders take by TMA (multiples of 64, and 16 and 32, several pages a block)
#: or gather token by token (the others: 1, 2, 8, odd sizes, one above 64).
PAGE_SIZES = (1, 2, 8, 16, 32, 53, 64, 69, 128, 256)


@pytest.mark.parametrize(
    ("s_q", "causal", "h_q", "h_kv"),
    [(1, False, 128, 1), (2, True, 64, 1), (2, False, 9, 3)],
    ids=["sq1-h128x1", "sq2-h64x1-causal", "sq2-h9x3"],
)
@pytest.mark.parametrize("page", PAGE_SIZES)
def test_quick_page_sizes(page, s_q, causal, h_q, h_kv):
    """Lengths at page and 64-token block edges; in two requests a page in the middle of the
    used range has a bad block id (-1, num_blocks): its tokens are masked, its NaN never read."""
    lengths = [0, 1, page - 1, page, page + 1, 63, 64, 65, 129, 1000, 3001]
    seed = seed_of("page-sizes", page, s_q, h_q, h_kv)
    layout = make_layout(
        np.random.default_rng(seed),
        b=len(lengths),
        s_q=s_q,
        s_k=0,
        varlen=False,
        seqlens=lengths,
        page=page,
    )
    table, readable = layout.block_table.copy(), layout.readable.copy()
    for request, bad_id in ((9, -1), (10, readable.shape[0])):
        j = -(-lengths[request] // page) // 2
        readable[table[request, j]] = False  # the block only this request owned: NaN
        table[request, j] = bad_id
    layout = dataclasses.replace(layout, block_table=table, readable=readable)
    inputs = make_values(seed, layout, s_q=s_q, h_q=h_q, h_kv=h_kv)
    out, lse = run_kernel(inputs, causal=causal, with_metadata=page % 2 == 0)
    check_against_reference(inputs, out, lse, causal=causal)


@pytest.mark.parametrize(
    ("s_q", "causal", "h_q", "h_kv", "lengths"),
    [
        (1, False, 128, 1, [70000, 70001]),
        (2, True, 16, 1, [70000, 33001]),
        (1, False, 64, 2, [100003, 0]),
    ],
    ids=["sq1-h128x1", "sq2-h16x1-causal", "sq1-h64x2-one-empty"],
)
def test_long_context(s_q, causal, h_q, h_kv, lengths):
    """s_k > 32768: each request is split across many SM parts and then combined."""
    inputs = build_inputs(
        seed_of("long", s_q, h_q, h_kv),
        b=len(lengths),
        s_q=s_q,
        s_k=0,
        h_q=h_q,
        h_kv=h_kv,
        seqlens=lengths,
    )
    num_splits = np.asarray(metadata_for(inputs)[1])
    assert np.diff(num_splits).max() > 4, num_splits  # really split into many parts
    out, lse = run_kernel(inputs, causal=causal, with_metadata=True)
    check_against_reference(inputs, out, lse, causal=causal)


# ----------------------------------------------------------------------------------------------
# Determinism, jit + scan over layers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("s_q", "h_q", "h_kv", "with_metadata"), [(2, 128, 1, True), (1, 64, 2, False)]
)
def test_quick_deterministic(s_q, h_q, h_kv, with_metadata):
    """Three runs on the same inputs give bitwise identical outputs (split requests included)."""
    inputs = build_inputs(
        seed_of("determinism", s_q, h_q, h_kv), b=6, s_q=s_q, s_k=4096, h_q=h_q, h_kv=h_kv
    )
    runs = [run_kernel(inputs, causal=True, with_metadata=with_metadata) for _ in range(3)]
    for out, lse in runs[1:]:
        np.testing.assert_array_equal(bits(out), bits(runs[0][0]))
        np.testing.assert_array_equal(bits(lse), bits(runs[0][1]))
    check_against_reference(inputs, *runs[0], causal=True)


SCAN_LAYERS = 3


@functools.partial(jax.jit, static_argnames=("causal",))
def decode_layers(q_layers, cache_layers, block_table, cache_seqlens, *, causal):
    """A decode step over stacked layers: one schedule, shared by every layer of a lax.scan."""
    _, s_q, h_q, _ = q_layers.shape[1:]
    h_kv = cache_layers.shape[3]
    metadata, num_splits = fm.get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)

    def layer(carry, layer_inputs):
        q, k_cache = layer_inputs
        out, lse = fm.flash_mla_with_kvcache(
            q,
            k_cache,
            block_table,
            cache_seqlens,
            D_V,
            metadata,
            num_splits,
            causal=causal,
            implementation=KERNEL,
        )
        return carry, (out, lse)

    _, (outs, lses) = jax.lax.scan(layer, None, (q_layers, cache_layers))
    return outs, lses


def layer_inputs(seed: int, *, b, s_q, s_k, h_q, h_kv, layers) -> list[Inputs]:
    """`layers` input sets sharing lengths and block table, with their own q and cache."""
    layout = make_layout(np.random.default_rng(seed), b=b, s_q=s_q, s_k=s_k, varlen=True)
    return [make_values(seed + 1 + i, layout, s_q=s_q, h_q=h_q, h_kv=h_kv) for i in range(layers)]


def plain_call(inputs: Inputs, *, causal: bool) -> tuple[np.ndarray, np.ndarray]:
    """The op called eagerly, outside jit, computing its own metadata."""
    poison_device_memory(1 << 24)
    out, lse = fm.flash_mla_with_kvcache(*inputs.args(), D_V, causal=causal, implementation=KERNEL)
    return np.asarray(out), np.asarray(lse)


@pytest.mark.parametrize(("causal", "h_q", "h_kv"), [(True, 128, 1), (False, 64, 8)])
def test_quick_scan_over_layers(causal, h_q, h_kv):
    """jit(scan over 3 layers) with shared metadata equals the plain call, layer by layer."""
    per_layer = layer_inputs(
        seed_of("scan", causal, h_q, h_kv),
        b=6,
        s_q=2,
        s_k=700,
        h_q=h_q,
        h_kv=h_kv,
        layers=SCAN_LAYERS,
    )
    first = per_layer[0]
    q_layers = jnp.stack([x.q for x in per_layer])
    cache_layers = jnp.stack([x.k_cache for x in per_layer])
    poison_device_memory(1 << 24)
    outs, lses = decode_layers(
        q_layers, cache_layers, first.block_table, first.cache_seqlens, causal=causal
    )
    outs, lses = np.asarray(outs), np.asarray(lses)
    for i, inputs in enumerate(per_layer):
        out, lse = plain_call(inputs, causal=causal)
        np.testing.assert_array_equal(bits(outs[i]), bits(out), err_msg=f"layer {i}")
        np.testing.assert_array_equal(bits(lses[i]), bits(lse), err_msg=f"layer {i}")
        check_against_reference(inputs, out, lse, causal=causal)


def test_matrix_layout():
    """The matrix has the advertised size and the quick sample covers every axis value."""
    assert len(ALL_CASES) == (
        len(BATCHES) * len(S_QS) * len(S_KS) * len(HEAD_PAIRS) * len(PAGES) * 4
    )
    assert len(QUICK_CASES) + len(FULL_CASES) == len(ALL_CASES)
    for axis, value_of in AXES.items():
        assert {value_of(c) for c in QUICK_CASES} == {value_of(c) for c in ALL_CASES}, axis
