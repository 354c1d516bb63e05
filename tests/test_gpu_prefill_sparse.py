"""The sparse prefill kernel (implementation="cuda") against a float64 oracle, on the GPU.

Every test calls `flash_mla_sparse_fwd(q, kv, indices, sm_scale, 512, attn_sink, topk_length,
implementation="cuda")` and compares (out, max_logits, lse) with
`oracle_decode.sparse_prefill_oracle` (float64 NumPy, sharing no code with the package) under
the sparse-prefill tolerances of docs/ops.md (`check_close`). Lonely queries (nothing selected)
must give out exactly 0, max_logits -inf and lse +inf, whatever the sink.

Data rules (docs/ops.md, test data), from `oracle_decode.make_sparse_prefill_inputs`:
- q and kv bfloat16 ~ N(0, 1) / 10 clamped to [-1, 1].
- Each query token selects distinct rows of kv in random slots (-1 pads where s_kv < topk);
  then 10% of the slots become -1 and 5% other invalid values (-2, -2**31, s_kv, s_kv + 3,
  2**31 - 1). topk_length (when on) is uniform in [0, topk], token 0 at 0 and token 1 at topk
  (a lone token draws from [1, topk] instead, so that it is not always lonely).
- NaN in every kv row that no counted valid slot selects (`poison_unread`, re-applied whenever a
  test edits the indices or lengths): slots past topk_length may hold indices of NaN rows.
- attn_sink (when on): a third of the heads +inf, a third -inf, the rest ~ N(log(topk), 1)
  (comparable to the lse, so that the factor matters).
- Device memory is poisoned with NaN before each kernel call and the kernel runs before the
  oracle, so an output the kernel forgets to write shows up.

The matrix is FlashMLA's own sparse-prefill matrix: d_qk {512, 576} x h_q {64, 128} x
(s_kv, topk) in KV_TOPK (the last three with s_kv < topk) x s_q {1, 62} x topk_length off / on x
attn_sink off / on, sm_scale d_qk ** -0.5: 320 cases. `test_quick_sparse_prefill_matrix` is a
30-case sample that covers every value of every axis; `test_full_sparse_prefill_matrix` (marked
`full`) is the other 290.

Beyond the matrix (all quick): h_q 1, 8, 16, 32, 48 and 96; topk 16384 over s_kv 20000; topk
64, 192 and 320 (not multiples of 128), also over fewer rows than topk; 700 query tokens;
sm_scale 40x, 0, negative and -40x; sink values +-inf, +-float32 max, 0 and finite, with the
same inputs run without sink; every index invalid (every query lonely) with and without sink
and lengths; duplicated indices (runs of one row over many slots, a whole token on one row);
topk_length 0, negative, past topk (clamped: same bits as the clamped lengths) and int32's
extremes; kv rows whose element offsets pass 2**31 (a kv of ~4.5 GB); bitwise determinism; jax.jit
against an eager call (same bits); and the test data itself.

Runs (on an H100/H200, from the repository root):

    python -P -m pytest -q -m gpu tests/test_gpu_prefill_sparse.py        # quick: 65 tests
    JAX_FLASHMLA_FULL=1 python -P -m pytest -q -m gpu tests/test_gpu_prefill_sparse.py  # + 290
    bash tests/gpu_memcheck.sh -k quick tests/test_gpu_prefill_sparse.py   # compute-sanitizer

Shard the full matrix with -k on the case ids (`d{d_qk}-h{h_q}-kv{s_kv}-k{topk}-sq{s_q}[-L][-S]`),
e.g. `-k "test_full_sparse_prefill_matrix and [d576-h128"`; each shard precompiles its own
cases.
"""

# Run time, estimated for one H100 host (not yet measured on one). Measured on a 2-core CPU
# machine with the XLA reference standing in for the kernel (implementation="xla"): the quick
# tests 58 s, the full matrix 93 s plus 102 s of precompiling the reference there.
# - per case: compiling the kernel call ~0.2-0.5 s; building the inputs under 0.3 s (NumPy);
#   the kernel milliseconds; the oracle (a Python loop over (token, head) rows) 0.05 s for
#   s_q 1, 0.1-0.9 s for s_q 62 (0.84 s for h_q 128, topk 512), 4 s for topk 16384 with s_q 2,
#   h_q 128.
# - quick run (65 tests): ~40 s of oracle and input building plus ~65 compilations, about
#   1-1.5 min with JAX's start-up (the ~4.5 GB kv of the offset test takes a few seconds).
# - full matrix (290 cases): ~80 s of oracle plus 290 compilations (precompiled on 16 threads
#   into the persistent cache with JAX_FLASHMLA_FULL=1): ~3-4 min.

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import oracle_decode as od
import pytest
from gpu_util import compile_in_parallel, poison_device_memory, selected_cases
from oracle_decode import BF16, SPARSE_PREFILL_LSE_TOL, SPARSE_PREFILL_OUT_TOL, check_close
from test_gpu_decode_dense import bits, seed_of

import jax_flashmla as fm
from jax_flashmla._src.geometry import HEAD_DIM_V

pytestmark = pytest.mark.gpu

#: The implementation under test. The comparison side is always the float64 oracle.
KERNEL = "cuda"

D_V = HEAD_DIM_V
#: Bytes of results per (token, head) row: out in bfloat16, max_logits and lse in float32.
RESULT_BYTES_PER_ROW = D_V * 2 + 2 * 4
#: Invalid index values; each one is planted where a test asks for all of them.
INVALID_VALUES = (-1, -2, -(2**31), 2**31 - 1)


# ----------------------------------------------------------------------------------------------
# Test data
# ----------------------------------------------------------------------------------------------


def counted_slots(indices: np.ndarray, topk_length, s_kv: int) -> np.ndarray:
    """bool [s_q, topk]: slot j of token t counts (j < topk_length[t] clamped to [0, topk]) and
    holds a row of kv."""
    return od.counted_valid_slots(indices, topk_length, s_kv)[:, 0, :]


def poison_unread(kv: np.ndarray, indices: np.ndarray, topk_length) -> np.ndarray:
    """A copy of kv with NaN in every row that no counted valid slot selects."""
    used = od.counted_tokens(indices, topk_length, kv.shape[0])
    kv = kv.copy()
    kv[~used] = np.nan
    return kv


def mixed_sink(rng: np.random.Generator, h_q: int, keys: int) -> np.ndarray:
    """float32 [h_q]: a third of the heads +inf, a third -inf, the rest ~ N(log(keys), 1)."""
    sink = (rng.standard_normal(h_q) + np.log(keys)).astype(np.float32)
    heads = rng.permutation(h_q)
    sink[heads[: h_q // 3]] = np.inf
    sink[heads[h_q // 3 : 2 * (h_q // 3)]] = -np.inf
    return sink


@dataclasses.dataclass
class Inputs:
    """One sparse prefill call on the host: the kernel gets device copies, the oracle these."""

    q: np.ndarray  # bfloat16 [s_q, h_q, d_qk]
    values: np.ndarray  # bfloat16 [s_kv, 1, d_qk], finite: kv before the poison
    indices: np.ndarray  # int32 [s_q, 1, topk]
    topk_length: np.ndarray | None  # int32 [s_q]
    attn_sink: np.ndarray | None  # float32 [h_q]
    #: values with NaN in every row that no counted valid slot selects (what both sides read).
    kv: np.ndarray = dataclasses.field(init=False)
    #: Oracle results by sm_scale (the oracle is the slow part; tests reuse it).
    oracles: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.kv = poison_unread(self.values, self.indices, self.topk_length)

    @property
    def s_kv(self) -> int:
        return self.kv.shape[0]

    @property
    def default_scale(self) -> float:
        return self.q.shape[2] ** -0.5

    def counted_keys(self) -> np.ndarray:
        """int [s_q]: the keys each query token attends (counted slots with a valid index)."""
        return counted_slots(self.indices, self.topk_length, self.s_kv).sum(axis=1)

    def replace(self, **changes) -> Inputs:
        """These inputs with some arrays replaced; kv poisoned anew, no oracle results."""
        return dataclasses.replace(self, oracles={}, **changes)

    def kernel_args(self) -> tuple:
        """q, kv, indices, attn_sink, topk_length on the device (None where absent)."""

        def device(x):
            return None if x is None else jnp.asarray(x)

        return (
            jnp.asarray(self.q),
            jnp.asarray(self.kv),
            jnp.asarray(self.indices),
            device(self.attn_sink),
            device(self.topk_length),
        )

    def oracle(self, sm_scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if sm_scale not in self.oracles:
            self.oracles[sm_scale] = od.sparse_prefill_oracle(
                self.q,
                self.kv,
                self.indices,
                sm_scale,
                D_V,
                attn_sink=self.attn_sink,
                topk_length=self.topk_length,
            )
        return self.oracles[sm_scale]


def make_inputs(
    seed: int,
    *,
    s_q: int,
    s_kv: int,
    h_q: int,
    topk: int,
    d_qk: int,
    topk_length: bool = False,
    sink: bool = True,
) -> Inputs:
    """Inputs drawn from `seed` by make_sparse_prefill_inputs (kv poisoned by Inputs)."""
    rng = np.random.default_rng(seed)
    data = od.make_sparse_prefill_inputs(
        rng,
        s_q=s_q,
        s_kv=s_kv,
        h_q=h_q,
        topk=topk,
        d_qk=d_qk,
        with_topk_length=topk_length,
        nan_unselected=False,
    )
    lengths = data["topk_length"]
    if lengths is not None and s_q == 1:
        # The maker gives token 0 length 0: a lone token would always be lonely.
        lengths = rng.integers(1, topk + 1, size=1).astype(np.int32)
    attn_sink = mixed_sink(rng, h_q, topk) if sink else None
    return Inputs(data["q"], data["kv"], data["indices"], lengths, attn_sink)


def invalid_values(rng: np.random.Generator, shape, s_kv: int) -> np.ndarray:
    """int32 values outside [0, s_kv), every one of the sharp ones present."""
    choices = np.array([*INVALID_VALUES, s_kv, s_kv + 1], np.int64)
    values = rng.choice(choices, size=shape)
    values.reshape(-1)[: len(choices)] = choices
    return values.astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Kernel and comparison
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def _kernel(q, kv, indices, attn_sink, topk_length, *, sm_scale):
    return fm.flash_mla_sparse_fwd(
        q, kv, indices, sm_scale, D_V, attn_sink, topk_length, implementation=KERNEL
    )


def run_kernel_on(args: tuple, sm_scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One kernel call on device arguments, on freshly NaN-poisoned device memory; host copies
    of (out, max_logits, lse)."""
    s_q, h_q, _ = args[0].shape
    # The arguments are on the device already, so the results land on the poisoned memory.
    poison_device_memory(max(2 * s_q * h_q * RESULT_BYTES_PER_ROW, 1 << 20))
    return tuple(np.asarray(x) for x in _kernel(*args, sm_scale=sm_scale))


def run_kernel(inputs: Inputs, sm_scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return run_kernel_on(inputs.kernel_args(), sm_scale)


def check_against_oracle(
    inputs: Inputs, out: np.ndarray, max_logits: np.ndarray, lse: np.ndarray, sm_scale: float
) -> None:
    s_q, h_q, _ = inputs.q.shape
    assert out.shape == (s_q, h_q, D_V) and out.dtype == BF16, (out.shape, out.dtype)
    for name, x in (("max_logits", max_logits), ("lse", lse)):
        assert x.shape == (s_q, h_q) and x.dtype == np.float32, (name, x.shape, x.dtype)
    ref_out, ref_max, ref_lse = inputs.oracle(sm_scale)
    # The oracle's out is finite everywhere, so NaN from a poisoned row or an unwritten
    # element fails here.
    check_close(out, ref_out, name="out", **SPARSE_PREFILL_OUT_TOL)
    check_close(max_logits, ref_max, name="max_logits", **SPARSE_PREFILL_LSE_TOL)
    check_close(lse, ref_lse, name="lse", **SPARSE_PREFILL_LSE_TOL)
    # Lonely queries (nothing selected): out exactly 0, lse +inf, max_logits -inf.
    lonely = np.isinf(ref_lse)
    np.testing.assert_array_equal(lonely, (inputs.counted_keys() == 0)[:, None].repeat(h_q, 1))
    assert np.all(lse[lonely] == np.inf), "lonely queries must have lse +inf"
    assert np.all(max_logits[lonely] == -np.inf), "lonely queries must have max_logits -inf"
    assert np.all(out.astype(np.float32)[lonely] == 0.0), "lonely queries must have out 0"


def assert_same_bits(results: tuple, expected: tuple) -> None:
    """(out, max_logits, lse) of two runs are bitwise equal."""
    for name, a, b in zip(("out", "max_logits", "lse"), results, expected, strict=True):
        np.testing.assert_array_equal(bits(a), bits(b), err_msg=name)


def run_and_check(
    inputs: Inputs, sm_scale: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kernel (first, on poisoned memory), then the oracle; sm_scale None: d_qk ** -0.5."""
    scale = inputs.default_scale if sm_scale is None else sm_scale
    results = run_kernel(inputs, scale)
    check_against_oracle(inputs, *results, scale)
    return results


# ----------------------------------------------------------------------------------------------
# The shape matrix (FlashMLA's sparse-prefill matrix)
# ----------------------------------------------------------------------------------------------

D_QKS = (512, 576)
HEADS = (64, 128)
#: (s_kv, topk); the last three have fewer rows than topk (-1 pads).
KV_TOPK = (
    (128, 128),
    (256, 256),
    (512, 512),
    (592, 128),
    (1840, 256),
    (1592, 384),
    (1521, 512),
    (95, 128),
    (153, 256),
    (114, 384),
)
S_QS = (1, 62)
#: (topk_length, attn_sink)
FEATURES = tuple(itertools.product((False, True), repeat=2))


@dataclasses.dataclass(frozen=True)
class Case:
    d_qk: int
    h_q: int
    s_kv: int
    topk: int
    s_q: int
    topk_length: bool
    sink: bool

    @property
    def id(self) -> str:
        return (
            f"d{self.d_qk}-h{self.h_q}-kv{self.s_kv}-k{self.topk}-sq{self.s_q}"
            + ("-L" if self.topk_length else "")
            + ("-S" if self.sink else "")
        )

    @property
    def sm_scale(self) -> float:
        return self.d_qk**-0.5

    @property
    def cost(self) -> int:
        """Roughly the oracle's work: query rows times selected keys."""
        return self.s_q * self.h_q * self.topk

    def inputs(self) -> Inputs:
        return make_inputs(
            seed_of("matrix", self.id),
            s_q=self.s_q,
            s_kv=self.s_kv,
            h_q=self.h_q,
            topk=self.topk,
            d_qk=self.d_qk,
            topk_length=self.topk_length,
            sink=self.sink,
        )

    def abstract_args(self) -> tuple:
        """The kernel call's arguments (as inputs() makes them), as shapes."""
        return (
            jax.ShapeDtypeStruct((self.s_q, self.h_q, self.d_qk), BF16),
            jax.ShapeDtypeStruct((self.s_kv, 1, self.d_qk), BF16),
            jax.ShapeDtypeStruct((self.s_q, 1, self.topk), jnp.int32),
            jax.ShapeDtypeStruct((self.h_q,), jnp.float32) if self.sink else None,
            jax.ShapeDtypeStruct((self.s_q,), jnp.int32) if self.topk_length else None,
        )


AXES = {
    "d_qk": lambda c: c.d_qk,
    "h_q": lambda c: c.h_q,
    "kv_topk": lambda c: (c.s_kv, c.topk),
    "s_q": lambda c: c.s_q,
    "features": lambda c: (c.topk_length, c.sink),
}

ALL_CASES = [
    Case(d_qk, h_q, s_kv, topk, s_q, lengths, sink)
    for d_qk, h_q, (s_kv, topk), s_q, (lengths, sink) in itertools.product(
        D_QKS, HEADS, KV_TOPK, S_QS, FEATURES
    )
]
#: Quick cases keep the oracle's share at or below s_q 62, h_q 128, topk 256 (~0.4 s each).
QUICK_MAX_COST = 62 * 128 * 256
QUICK_COUNT = 30


def sample_cases(cases: list[Case], count: int, seed: int, max_cost: int) -> list[Case]:
    """A deterministic sample of cheap cases that covers every value of every axis.

    Greedy: walk a seeded permutation and keep each case that brings a value not seen yet,
    then fill up to `count` with the next cases of the walk, taking the feature sets in turn.
    """
    order = np.random.default_rng(seed).permutation(len(cases))
    walk = [cases[i] for i in order if cases[i].cost <= max_cost]
    missing = {axis: {value_of(c) for c in cases} for axis, value_of in AXES.items()}
    chosen: list[Case] = []
    for case in walk:
        if any(value_of(case) in missing[axis] for axis, value_of in AXES.items()):
            chosen.append(case)
            for axis, value_of in AXES.items():
                missing[axis].discard(value_of(case))
    assert not any(missing.values()), missing
    rest = {f: [c for c in walk if (c.topk_length, c.sink) == f] for f in FEATURES}
    while len(chosen) < count:
        for group in rest.values():
            while group and group[0] in chosen:
                group.pop(0)
            if group and len(chosen) < count:
                chosen.append(group.pop(0))
    return sorted(chosen, key=lambda c: c.id)


QUICK_CASES = sample_cases(ALL_CASES, QUICK_COUNT, seed=2028, max_cost=QUICK_MAX_COST)
_quick = set(QUICK_CASES)
FULL_CASES = [c for c in ALL_CASES if c not in _quick]


def _ids(cases: list[Case]) -> list[str]:
    return [c.id for c in cases]


def run_case(case: Case) -> None:
    run_and_check(case.inputs(), case.sm_scale)


@pytest.mark.parametrize("case", QUICK_CASES, ids=_ids(QUICK_CASES))
def test_quick_sparse_prefill_matrix(case: Case):
    run_case(case)


def precompile(cases: list[Case], workers: int = 16) -> None:
    """Compile every case's kernel call on parallel threads, into JAX's persistent compilation
    cache (conftest turns it on for JAX_FLASHMLA_FULL=1), from which the tests load them."""

    def compile_one(case: Case) -> None:
        _kernel.lower(*case.abstract_args(), sm_scale=case.sm_scale).compile()

    compile_in_parallel([functools.partial(compile_one, case) for case in cases], workers)


@pytest.fixture(scope="module")
def full_matrix_compiled(request: pytest.FixtureRequest):
    """Precompiles the full-matrix cases selected for this run (a -k shard compiles its own)."""
    if jax.config.jax_compilation_cache_dir:
        precompile(selected_cases(request, "test_full_sparse_prefill_matrix"))


@pytest.mark.full
@pytest.mark.parametrize("case", FULL_CASES, ids=_ids(FULL_CASES))
def test_full_sparse_prefill_matrix(case: Case, full_matrix_compiled):
    """The rest of the matrix (with test_quick_sparse_prefill_matrix, all of it)."""
    run_case(case)


def test_matrix_layout():
    """The matrix is FlashMLA's product and the quick sample covers every axis value."""
    assert len(ALL_CASES) == len(D_QKS) * len(HEADS) * len(KV_TOPK) * len(S_QS) * 4 == 320
    assert len({c.id for c in ALL_CASES}) == len(ALL_CASES)
    assert len(QUICK_CASES) == QUICK_COUNT
    assert len(QUICK_CASES) + len(FULL_CASES) == len(ALL_CASES)
    for axis, value_of in AXES.items():
        assert {value_of(c) for c in QUICK_CASES} == {value_of(c) for c in ALL_CASES}, axis


# ----------------------------------------------------------------------------------------------
# Shapes beyond the matrix
# ----------------------------------------------------------------------------------------------

#: h_q beyond FlashMLA's 64 and 128 (the kernel pads the last 64-head tile).
OTHER_HEADS = (1, 8, 16, 32, 48, 96)


@pytest.mark.parametrize("h_q", OTHER_HEADS)
def test_quick_other_head_counts(h_q):
    """h_q below one 64-head tile, and 96 (one full tile and one half tile)."""
    inputs = make_inputs(
        seed_of("heads", h_q),
        s_q=5,
        s_kv=700,
        h_q=h_q,
        topk=384,
        d_qk=576 if h_q in (1, 16, 48) else 512,
        topk_length=h_q % 2 == 0,
    )
    run_and_check(inputs)


@pytest.mark.parametrize(
    ("d_qk", "h_q", "s_q", "lengths"), [(576, 128, 2, False), (512, 64, 3, True)]
)
def test_quick_topk_16384(d_qk, h_q, s_q, lengths):
    """The largest topk FlashMLA benchmarks: 256 blocks of 64 keys per query token."""
    inputs = make_inputs(
        seed_of("topk16384", d_qk),
        s_q=s_q,
        s_kv=20000,
        h_q=h_q,
        topk=16384,
        d_qk=d_qk,
        topk_length=lengths,
    )
    assert inputs.counted_keys().max() > 8192
    run_and_check(inputs)


#: (topk, s_kv, d_qk): topk a multiple of 64 but not of 128, over more and fewer rows than topk.
ODD_TOPK = ((64, 1000, 576), (64, 40, 512), (192, 700, 512), (192, 150, 576), (320, 2000, 576))


@pytest.mark.parametrize(
    ("topk", "s_kv", "d_qk"), ODD_TOPK, ids=[f"k{k}-kv{s}-d{d}" for k, s, d in ODD_TOPK]
)
def test_quick_topk_not_a_multiple_of_128(topk, s_kv, d_qk):
    """topk an odd number of 64-slot blocks (1, 3, 5), also over fewer rows than topk."""
    inputs = make_inputs(
        seed_of("odd-topk", topk, s_kv, d_qk),
        s_q=7,
        s_kv=s_kv,
        h_q=128,
        topk=topk,
        d_qk=d_qk,
        topk_length=True,
    )
    run_and_check(inputs)


@pytest.mark.parametrize("d_qk", D_QKS)
def test_quick_many_query_tokens(d_qk):
    """700 query tokens: a grid with many tokens (and the lengths of all of them)."""
    inputs = make_inputs(
        seed_of("tokens", d_qk), s_q=700, s_kv=3000, h_q=16, topk=128, d_qk=d_qk, topk_length=True
    )
    run_and_check(inputs)


@functools.partial(jax.jit, static_argnames=("s_kv",))
def _scatter_rows(rows: jax.Array, values: jax.Array, *, s_kv: int) -> jax.Array:
    """kv [s_kv, 1, d] on the device: NaN everywhere but `values` at `rows`."""
    kv = jnp.full((s_kv, 1, values.shape[-1]), jnp.nan, values.dtype)
    return kv.at[rows].set(values)


#: Rows of kv per d_qk such that the last rows' element offsets (row * d_qk) pass 2**31.
LARGE_S_KV = {576: 3_900_000, 512: 4_400_000}


@pytest.mark.parametrize("d_qk", D_QKS)
def test_quick_kv_offsets_past_int32(d_qk):
    """A kv of ~4.5 GB: half of the selected rows lie where row * d_qk (elements) and so the
    byte offsets pass 2**31. The oracle reads the same rows from a compacted kv."""
    s_kv = LARGE_S_KV[d_qk]
    assert (s_kv - 100_000) * d_qk > 2**31
    rng = np.random.default_rng(seed_of("large-kv", d_qk))
    s_q, h_q, topk = 4, 64, 256
    far = rng.integers(s_kv - 100_000, s_kv, size=(s_q, 1, topk // 2))
    near = rng.integers(0, s_kv, size=(s_q, 1, topk - topk // 2))
    indices = rng.permuted(np.concatenate([far, near], axis=2), axis=2)
    indices[:, :, ::17] = -1
    indices[:, :, 5] = s_kv  # just past the end
    indices = indices.astype(np.int32)
    valid = (indices >= 0) & (indices < s_kv)
    rows, slot_rows = np.unique(indices[valid], return_inverse=True)
    assert int(rows[-1]) * d_qk > 2**31
    values = od.random_values(rng, (len(rows), 1, d_qk), BF16)
    # The oracle's inputs: the selected rows only, indices renumbered into them.
    compact = np.full(indices.shape, -1, np.int32)
    compact[valid] = slot_rows
    q = od.random_values(rng, (s_q, h_q, d_qk), BF16)
    inputs = Inputs(q, values, compact, None, mixed_sink(rng, h_q, topk))
    kv = _scatter_rows(jnp.asarray(rows), jnp.asarray(values), s_kv=s_kv)
    args = (jnp.asarray(inputs.q), kv, jnp.asarray(indices), jnp.asarray(inputs.attn_sink), None)
    scale = inputs.default_scale
    check_against_oracle(inputs, *run_kernel_on(args, scale), scale)


# ----------------------------------------------------------------------------------------------
# Scale and sink
# ----------------------------------------------------------------------------------------------

SCALES = {
    "big": lambda d_qk: 40 * d_qk**-0.5,
    "zero": lambda d_qk: 0.0,
    "minus-default": lambda d_qk: -(d_qk**-0.5),
    "minus-40x": lambda d_qk: -40 * d_qk**-0.5,
}


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_quick_sm_scale(scale):
    """Any finite sm_scale: 40x the default (peaked softmax), 0 (uniform weights, max_logits 0)
    and negative."""
    d_qk = 576 if scale in ("big", "minus-default") else 512
    inputs = make_inputs(
        seed_of("scale", scale), s_q=9, s_kv=1000, h_q=128, topk=256, d_qk=d_qk, topk_length=True
    )
    sm_scale = SCALES[scale](d_qk)
    _, max_logits, _ = run_and_check(inputs, sm_scale)
    if sm_scale == 0.0:
        finite = np.isfinite(max_logits)
        assert finite.any() and np.all(max_logits[finite] == 0.0)


#: Sink values beyond the mixed ones: float32's extremes (exp overflows either way), 0 and
#: values near and far from the lse.
SPECIAL_SINKS = (
    np.inf,
    -np.inf,
    float(np.finfo(np.float32).max),
    -float(np.finfo(np.float32).max),
    0.0,
    5.5,
    -30.0,
    30.0,
)


def test_quick_attn_sink_values():
    """The same inputs with sinks of every kind and without: each matches the oracle; the sink
    leaves lse and max_logits alone, zeroes the +inf (and float32 max) heads and keeps the
    -inf (and -float32 max) heads as without sink. Lonely tokens stay 0 / +inf."""
    h_q = 64
    inputs = make_inputs(
        seed_of("sink-values"), s_q=8, s_kv=1000, h_q=h_q, topk=256, d_qk=576, topk_length=True
    )
    assert inputs.counted_keys()[0] == 0  # token 0 is lonely (length 0)
    sink = np.resize(np.array(SPECIAL_SINKS, np.float32), h_q)
    sink[len(SPECIAL_SINKS) :: 3] = np.log(256.0)  # about the lse: factors near 1/2
    with_sink = inputs.replace(attn_sink=sink)
    without = inputs.replace(attn_sink=None)
    out_sink, max_sink, lse_sink = run_and_check(with_sink)
    out_plain, max_plain, lse_plain = run_and_check(without)
    od.assert_same_up_to_rounding(lse_sink, lse_plain, name="lse")
    od.assert_same_up_to_rounding(max_sink, max_plain, name="max_logits")
    zeroed = sink >= np.finfo(np.float32).max
    assert zeroed.sum() >= 2 and np.all(out_sink[:, zeroed].astype(np.float32) == 0.0)
    kept = sink <= -np.finfo(np.float32).max
    assert kept.sum() >= 2
    od.assert_same_up_to_rounding(out_sink[:, kept], out_plain[:, kept], name="out")


# ----------------------------------------------------------------------------------------------
# Indices and lengths
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lengths", [False, True], ids=["all-slots", "lengths"])
@pytest.mark.parametrize("sink", [True, False], ids=["sink", "nosink"])
def test_quick_all_indices_invalid(sink, lengths):
    """Every slot invalid (-1, -2, -2**31, s_kv, s_kv + 1, 2**31 - 1): every kv row is NaN and
    every query is lonely: out 0, max_logits -inf, lse +inf, whatever the sink."""
    seed = seed_of("all-invalid", sink, lengths)
    rng = np.random.default_rng(seed)
    s_q, s_kv, topk = 6, 300, 256
    inputs = make_inputs(
        seed, s_q=s_q, s_kv=s_kv, h_q=128, topk=topk, d_qk=576, topk_length=lengths, sink=sink
    )
    indices = invalid_values(rng, inputs.indices.shape, s_kv)
    topk_length = None
    if lengths:
        topk_length = np.array([topk, 0, 17, topk + 5, 2**31 - 1, -1], np.int32)
    inputs = inputs.replace(indices=indices, topk_length=topk_length)
    assert np.isnan(inputs.kv.astype(np.float32)).all()
    out, max_logits, lse = run_and_check(inputs)
    assert np.all(out.astype(np.float32) == 0.0)
    assert np.all(lse == np.inf) and np.all(max_logits == -np.inf)


@pytest.mark.parametrize("d_qk", D_QKS)
def test_quick_duplicated_indices(d_qk):
    """Indices drawn with replacement, runs of one row over the first 40 slots of every token
    and a token whose every slot selects one row: each slot is a key of its own (a row selected
    k times weighs k times)."""
    seed = seed_of("duplicates", d_qk)
    rng = np.random.default_rng(seed)
    s_q, s_kv, topk = 6, 500, 256
    inputs = make_inputs(seed, s_q=s_q, s_kv=s_kv, h_q=64, topk=topk, d_qk=d_qk, topk_length=True)
    indices = rng.integers(0, s_kv, size=(s_q, 1, topk))
    indices[rng.random(indices.shape) < 0.1] = -1
    indices[:, :, :40] = indices[:, :, 40:41]  # slot 40 holds a valid row or -1
    indices[2, 0, :] = 123  # a whole token on one row
    indices[3, 0, :40] = 7  # a run that topk_length cuts short (token 3 below)
    lengths = np.array([topk, 0, topk, 20, 100, topk], np.int32)
    inputs = inputs.replace(indices=indices.astype(np.int32), topk_length=lengths)
    assert inputs.counted_keys()[2] == topk and inputs.counted_keys()[3] == 20
    out, _, _ = run_and_check(inputs)
    # Token 2 attends one row topk times: every weight is 1 / topk, so the heads the sink
    # leaves alone (-inf) give that row's V, up to the output's rounding.
    row = inputs.kv[123, 0, :D_V].astype(np.float32)
    kept = inputs.attn_sink == -np.inf
    assert kept.any()
    got = out[2, kept].astype(np.float32)
    np.testing.assert_allclose(got, np.broadcast_to(row, got.shape), rtol=2**-7, atol=0)


@pytest.mark.parametrize("d_qk", D_QKS)
def test_quick_topk_length_zero_negative_and_clamped(d_qk):
    """topk_length 0 and negative (lonely: nothing counts), 1 and 17, topk, past topk and
    int32's extremes (clamped to [0, topk]): the results equal the clamped lengths' bit for
    bit. The slots past each length hold valid indices of NaN rows."""
    seed = seed_of("topk-length", d_qk)
    s_q, topk = 8, 256
    inputs = make_inputs(seed, s_q=s_q, s_kv=1000, h_q=128, topk=topk, d_qk=d_qk)
    lengths = np.array([0, -1, -(2**31), 1, 17, topk, topk + 1, 2**31 - 1], np.int32)
    indices = inputs.indices.copy()
    indices[3, 0, 0] = 999  # length 1 counts one valid slot
    inputs = inputs.replace(indices=indices, topk_length=lengths)
    keys = inputs.counted_keys()
    np.testing.assert_array_equal(keys == 0, lengths <= 0)
    assert keys[3] == 1
    # Uncounted slots that name a row of kv: some of them name NaN rows.
    valid = (inputs.indices[:, 0] >= 0) & (inputs.indices[:, 0] < inputs.s_kv)
    uncounted = valid & ~counted_slots(inputs.indices, lengths, inputs.s_kv)
    nan_rows = np.isnan(inputs.kv[:, 0, 0].astype(np.float32))
    assert nan_rows[inputs.indices[:, 0][uncounted]].any()
    results = run_and_check(inputs)
    clamped = inputs.replace(topk_length=np.clip(lengths, 0, topk).astype(np.int32))
    assert_same_bits(run_kernel(clamped, inputs.default_scale), results)


# ----------------------------------------------------------------------------------------------
# Determinism, jit and the test data
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d_qk", D_QKS)
def test_quick_deterministic(d_qk):
    """Three runs on the same inputs give bitwise identical results."""
    inputs = make_inputs(
        seed_of("determinism", d_qk),
        s_q=62,
        s_kv=1521,
        h_q=128,
        topk=512,
        d_qk=d_qk,
        topk_length=True,
    )
    scale = inputs.default_scale
    runs = [run_kernel(inputs, scale) for _ in range(3)]
    for run in runs[1:]:
        assert_same_bits(run, runs[0])
    check_against_oracle(inputs, *runs[0], scale)


def test_quick_jit_matches_eager():
    """The op under jax.jit (one executable with the custom call) and called eagerly give the
    same bits, with and without the optional operands."""
    inputs = make_inputs(
        seed_of("jit-eager"), s_q=11, s_kv=900, h_q=64, topk=256, d_qk=576, topk_length=True
    )
    scale = inputs.default_scale
    for case in (inputs, inputs.replace(attn_sink=None, topk_length=None)):
        q, kv, indices, attn_sink, topk_length = case.kernel_args()
        eager = fm.flash_mla_sparse_fwd(
            q,
            kv,
            indices,
            scale,
            D_V,
            attn_sink=attn_sink,
            topk_length=topk_length,
            implementation=KERNEL,
        )
        jitted = run_kernel(case, scale)
        assert_same_bits(jitted, tuple(np.asarray(x) for x in eager))
        check_against_oracle(case, *jitted, scale)


def test_quick_test_data():
    """The data plant what they say: Inputs NaN exactly the rows that the maker's own rule
    does, every row a counted valid slot selects is finite, and the maker's lengths are as
    documented (0 for token 0, topk for token 1)."""
    for lengths in (False, True):
        rng = np.random.default_rng(seed_of("data", lengths))
        made = od.make_sparse_prefill_inputs(
            rng, s_q=9, s_kv=2000, h_q=4, topk=256, with_topk_length=lengths
        )
        made_nan = np.isnan(made["kv"].astype(np.float32))
        values = np.where(made_nan, 0.5, made["kv"].astype(np.float32)).astype(BF16)
        inputs = Inputs(made["q"], values, made["indices"], made["topk_length"], None)
        np.testing.assert_array_equal(np.isnan(inputs.kv.astype(np.float32)), made_nan)
        counted = counted_slots(inputs.indices, inputs.topk_length, inputs.s_kv)
        assert np.isfinite(inputs.kv[inputs.indices[:, 0][counted]].astype(np.float32)).all()
        assert made_nan.any()
        if lengths:
            assert list(inputs.counted_keys()[:1]) == [0] and made["topk_length"][1] == 256
