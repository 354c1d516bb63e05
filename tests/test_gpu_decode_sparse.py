"""The sparse FP8 decode kernel (implementation="cuda") against a float64 oracle, on the GPU.

Every test calls `flash_mla_with_kvcache(q, k_cache, None, None, 512, ..., is_fp8_kvcache=True,
indices=..., implementation="cuda")` and compares (out, lse) with
`oracle_decode.sparse_decode_fp8_oracle`: float64 NumPy on the dequantised caches (its own
reader of the FP8 byte layouts, sharing no code with the package, and checked here against
`oracle_decode.sparse_decode_oracle`), under the sparse-decode tolerances of docs/ops.md
(`check_close`). The oracle reads the same FP8 bytes as the kernel, so quantisation error is not
part of the tolerance. Lonely queries (nothing selected) must give out exactly 0 and lse +inf.

Data rules (docs/ops.md, test data):
- q bfloat16 and the cache values ~ N(0, 1) / 10 clamped to [-1, 1], drawn on the device; the
  cache is bfloat16, quantised by `quantize_k_cache` ("V32" for d_qk 576, "MODEL1" for 512).
- Indices from `oracle_decode.make_sparse_selection` (vectorised): each request has a context
  of ~max(N(s_k, s_k / 2), 1) tokens (capped at 2 s_k) in randomly permuted blocks; each query
  token selects distinct context positions in random slots, -1 where the context is short, 5%
  more -1 and 2% other invalid values (-2, -2**31, num_tokens, num_tokens + 7, 2**31 - 1).
- Every byte of every cache token that no counted valid slot selects is 0xFF (NaN as e4m3,
  as a float32 or e8m0 scale and as bfloat16); for MODEL1 both its 576 token bytes and its 8
  scale bytes. Slots past topk_length may hold valid indices of such poisoned tokens.
- attn_sink on by default: a third of the heads +inf, a third -inf, the rest ~ N(log(topk), 1)
  (comparable to the lse, so that the factor matters).
- Device memory is poisoned with NaN before each kernel call, and the kernel runs before the
  oracle, so an output the kernel forgets to write shows up.

The matrix is FlashMLA's own sparse-decode matrix: d_qk 576 (V32) without extra cache and 512
(MODEL1) with every combination of extra cache, extra_topk_length and topk_length;
(s_k, topk, page) for the main cache and (when present) for the extra cache from CONFIGS; b in
{4, 74, 321}; s_q in {1, 3}; h_q in {64, 128}; varlen contexts (and fixed ones for b = 74
without lengths, as FlashMLA). `test_quick_sparse_matrix` is a 36-case sample that covers every
value of every axis; `test_full_sparse_matrix` (marked `full`) is the other 3740 cases. The
schedule is passed explicitly (get_mla_metadata) for about half of the shapes.

Beyond the matrix (all quick): every index invalid (-1, -2**31, num_tokens, 2**31 - 1, ...),
with and without sink; topk_length 0, negative and past topk (clamped), also for the extra
cache; sink on and off on the same inputs; duplicated indices; h_q 1, 8, 16, 32, 48 and 96;
s_q 4; topk 16384; pages 1 and 53; softmax_scale 40x, 0 and negative; peaked scores that make
each query row's running max rise late, inside split pieces and across them (ramps along the
slot order, and spikes in the first, a middle or the last piece), with host checks that the data
does so; bitwise determinism with and without the schedule passed; the schedule passed or not
on the same inputs; and the oracle itself (its FP8 reader against dequantize_k_cache, the
poisoned bytes exactly where nothing counted reads, the vectorised oracle against
sparse_decode_oracle).

Runs (on an H100/H200, from the repository root):

    python -P -m pytest -q -m gpu tests/test_gpu_decode_sparse.py        # quick: 85 tests
    JAX_FLASHMLA_FULL=1 python -P -m pytest -q -m gpu tests/test_gpu_decode_sparse.py  # + 3740
    bash tests/gpu_memcheck.sh -k quick tests/test_gpu_decode_sparse.py   # compute-sanitizer

Shard the full matrix with -k on the case ids
(`{V32|MODEL1}-b{b}-sq{s_q}-h{h_q}-k{s_k}.{topk}.p{page}[-x{extra}][-L][-E][-fixed]`), e.g.
`-k "test_full_sparse_matrix and [MODEL1-b321"`; each shard precompiles its own cases.
"""

# Run time, estimated for one H100 host with 16 cores (not yet measured on one; the oracle's
# figures scale from a 2-core run at ~40 GFLOPS of float64 BLAS):
# - per case: compiling the kernel call ~0.2 s; building the inputs under a second (indices
#   vectorised on the host, values drawn and quantised on the device); the kernel milliseconds;
#   the float64 oracle on the host 4 * d_qk flops per (query row, counted key), up to ~1 TFLOP
#   for b 321, s_q 3, h_q 128 with 2048 + 2048 keys: a few seconds with the host's BLAS.
# - quick run (85 tests): ~2 TFLOP of oracle, ~2 min with the compilations and JAX's start-up.
# - full matrix: ~250 TFLOP of oracle (counted keys only), ~15-30 min. The oracle uses every
#   host core, so run shards one after another: "[V32-" 3% of it, "[MODEL1-b4-" 1%,
#   "[MODEL1-b74-" 21%, "[MODEL1-b321-sq1-" 19%, "[MODEL1-b321-sq3-h64-" 19%,
#   "[MODEL1-b321-sq3-h128-" 37%.

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
from oracle_decode import BF16, SPARSE_DECODE_LSE_TOL, SPARSE_DECODE_OUT_TOL, check_close
from test_gpu_decode_dense import bits, seed_of
from test_gpu_decode_rescale import RAISE_SLACK, RowScores, request_pieces

import jax_flashmla as fm
from jax_flashmla._src.geometry import (
    HEAD_DIM_QK,
    HEAD_DIM_QK_MODEL1,
    HEAD_DIM_ROPE,
    HEAD_DIM_V,
    METADATA_FIELDS,
    SCHEDULER_BLOCK_TOKENS,
)
from jax_flashmla._src.platform import target_device

pytestmark = pytest.mark.gpu

#: The implementation under test. The comparison side is always the float64 oracle.
KERNEL = "cuda"

D_V = HEAD_DIM_V
#: q's d_qk per FP8 layout.
LAYOUT_D_QK = {"V32": HEAD_DIM_QK, "MODEL1": HEAD_DIM_QK_MODEL1}


# ----------------------------------------------------------------------------------------------
# Test data
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """A paged FP8 cache: mean context s_k, selected slots topk, tokens per block page."""

    s_k: int
    topk: int
    page: int

    @property
    def tag(self) -> str:
        return f"{self.s_k}.{self.topk}.p{self.page}"


@dataclasses.dataclass(frozen=True)
class Selection:
    """One cache of a test on the host: its size and the top-k indices into it."""

    num_blocks: int
    page: int
    indices: np.ndarray  # int32 [b, s_q, topk]
    lengths: np.ndarray | None  # int32 [b], topk_length (None: every slot counts)
    contexts: np.ndarray  # int32 [b], tokens of each request's context

    @property
    def topk(self) -> int:
        return self.indices.shape[2]

    def counted_keys(self) -> np.ndarray:
        """int [b, s_q]: the slots of each query token that count and hold a valid index."""
        num_tokens = self.num_blocks * self.page
        return od.counted_valid_slots(self.indices, self.lengths, num_tokens).sum(axis=2)

    def used(self) -> np.ndarray:
        """bool [num_blocks, page]: the tokens some counted valid slot selects."""
        tokens = od.counted_tokens(self.indices, self.lengths, self.num_blocks * self.page)
        return tokens.reshape(self.num_blocks, self.page)


def select(
    rng: np.random.Generator,
    config: CacheConfig,
    *,
    b: int,
    s_q: int,
    varlen: bool = True,
    with_lengths: bool = False,
    duplicates: bool = False,
) -> Selection:
    """Indices into a cache of `config` (oracle_decode.make_sparse_selection); with
    `with_lengths`, topk_length uniform in [0, topk]."""
    indices, num_blocks, contexts = od.make_sparse_selection(
        rng,
        b=b,
        s_q=s_q,
        topk=config.topk,
        page=config.page,
        s_k=config.s_k,
        varlen=varlen,
        duplicates=duplicates,
    )
    lengths = None
    if with_lengths:
        lengths = rng.integers(0, config.topk + 1, size=b).astype(np.int32)
    return Selection(num_blocks, config.page, indices, lengths, contexts)


@functools.partial(jax.jit, static_argnames=("shape",))
def _random_bf16(key: jax.Array, *, shape: tuple[int, ...]) -> jax.Array:
    """N(0, 1) / 10 clamped to [-1, 1], bfloat16, drawn on the device."""
    return jnp.clip(jax.random.normal(key, shape, jnp.float32) / 10.0, -1.0, 1.0).astype(BF16)


def token_bytes(raw, layout: str):
    """uint8 [num_blocks, page, bytes per token] -> the same bytes grouped by token (NumPy or
    JAX). V32 rows are tokens already; a MODEL1 block holds page * 576 token bytes and then
    page * 8 scale bytes, so token t gets bytes [t * 576, (t + 1) * 576) and then
    [page * 576 + t * 8, page * 576 + (t + 1) * 8) of its block."""
    if layout == "V32":
        return raw
    xp = jnp if isinstance(raw, jax.Array) else np
    num_blocks, page, width = raw.shape
    flat = raw.reshape(num_blocks, page * width)
    split = page * od.MODEL1_TOKEN_BYTES
    return xp.concatenate(
        [
            flat[:, :split].reshape(num_blocks, page, od.MODEL1_TOKEN_BYTES),
            flat[:, split:].reshape(num_blocks, page, od.MODEL1_SCALE_BYTES),
        ],
        axis=-1,
    )


def block_bytes(tokens, layout: str):
    """The inverse of token_bytes: bytes grouped by token -> the cache's byte layout."""
    if layout == "V32":
        return tokens
    xp = jnp if isinstance(tokens, jax.Array) else np
    num_blocks, page, width = tokens.shape
    split = od.MODEL1_TOKEN_BYTES
    flat = xp.concatenate(
        [
            tokens[:, :, :split].reshape(num_blocks, -1),
            tokens[:, :, split:].reshape(num_blocks, -1),
        ],
        axis=1,
    )
    return flat.reshape(num_blocks, page, width)


@functools.partial(jax.jit, static_argnames=("layout",))
def _poisoned_fp8(values: jax.Array, used: jax.Array, *, layout: str) -> jax.Array:
    """values [num_blocks, page, 1, d_qk] quantised into `layout`, then 0xFF in every byte of
    the tokens that `used` [num_blocks, page] leaves out."""
    cache = fm.quantize_k_cache(values, layout=layout)
    raw = jax.lax.bitcast_convert_type(cache, jnp.uint8)[:, :, 0, :]
    tokens = jnp.where(used[:, :, None], token_bytes(raw, layout), 0xFF)
    raw = block_bytes(tokens, layout)
    return jax.lax.bitcast_convert_type(raw[:, :, None, :], jnp.float8_e4m3fn)


def random_fp8_cache(key: jax.Array, selection: Selection, layout: str) -> jax.Array:
    """A random FP8 cache for `selection`, poisoned where no counted valid slot reads."""
    shape = (selection.num_blocks, selection.page, 1, LAYOUT_D_QK[layout])
    values = _random_bf16(key, shape=shape)
    return _poisoned_fp8(values, jnp.asarray(selection.used()), layout=layout)


def mixed_sink(rng: np.random.Generator, h_q: int, keys: int) -> np.ndarray:
    """float32 [h_q]: a third of the heads +inf, a third -inf, the rest ~ N(log(keys), 1)."""
    sink = (rng.standard_normal(h_q) + np.log(keys)).astype(np.float32)
    heads = rng.permutation(h_q)
    sink[heads[: h_q // 3]] = np.inf
    sink[heads[h_q // 3 : 2 * (h_q // 3)]] = -np.inf
    return sink


@dataclasses.dataclass
class Inputs:
    """One sparse decode call: device arrays for the kernel, host arrays for the oracle."""

    layout: str
    q: jax.Array
    main: Selection
    k_cache: jax.Array
    extra: Selection | None
    extra_k_cache: jax.Array | None
    attn_sink: np.ndarray | None
    #: Oracle results by softmax_scale (the oracle is the slow part; tests reuse it).
    oracles: dict = dataclasses.field(default_factory=dict)

    @property
    def topk_total(self) -> int:
        return self.main.topk + (0 if self.extra is None else self.extra.topk)

    def kernel_args(self) -> tuple:
        """q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra indices,
        extra_topk_length (None where absent)."""

        def device(x):
            return None if x is None else jnp.asarray(x)

        extra = self.extra
        return (
            self.q,
            self.k_cache,
            device(self.main.indices),
            device(self.main.lengths),
            device(self.attn_sink),
            self.extra_k_cache,
            None if extra is None else device(extra.indices),
            None if extra is None else device(extra.lengths),
        )

    def oracle(self, softmax_scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        if softmax_scale not in self.oracles:
            extra = self.extra
            self.oracles[softmax_scale] = od.sparse_decode_fp8_oracle(
                np.asarray(self.q),
                np.asarray(self.k_cache),
                self.main.indices,
                topk_length=self.main.lengths,
                attn_sink=self.attn_sink,
                extra_k_cache=None if extra is None else np.asarray(self.extra_k_cache),
                extra_indices=None if extra is None else extra.indices,
                extra_topk_length=None if extra is None else extra.lengths,
                softmax_scale=softmax_scale,
                head_dim_v=D_V,
            )
        return self.oracles[softmax_scale]


def make_inputs(
    seed: int,
    *,
    layout: str,
    h_q: int,
    main: Selection,
    extra: Selection | None = None,
    sink: bool = True,
) -> Inputs:
    """Random q and caches for the selections, drawn on the device from `seed`."""
    b, s_q = main.indices.shape[:2]
    key_q, key_main, key_extra = jax.random.split(jax.random.key(seed & 0x7FFFFFFF), 3)
    q = _random_bf16(key_q, shape=(b, s_q, h_q, LAYOUT_D_QK[layout]))
    keys = main.topk + (0 if extra is None else extra.topk)
    attn_sink = mixed_sink(np.random.default_rng(seed), h_q, keys) if sink else None
    return Inputs(
        layout,
        q,
        main,
        random_fp8_cache(key_main, main, layout),
        extra,
        None if extra is None else random_fp8_cache(key_extra, extra, layout),
        attn_sink,
    )


def build_inputs(
    seed: int,
    *,
    layout: str,
    b: int,
    s_q: int,
    h_q: int,
    main: CacheConfig,
    extra: CacheConfig | None = None,
    topk_length: bool = False,
    extra_topk_length: bool = False,
    varlen: bool = True,
    sink: bool = True,
    duplicates: bool = False,
) -> Inputs:
    """Selections and values of one test, all drawn from `seed`."""
    rng = np.random.default_rng(seed)
    common = {"b": b, "s_q": s_q, "varlen": varlen, "duplicates": duplicates}
    main_selection = select(rng, main, with_lengths=topk_length, **common)
    extra_selection = None
    if extra is not None:
        extra_selection = select(rng, extra, with_lengths=extra_topk_length, **common)
    return make_inputs(
        seed, layout=layout, h_q=h_q, main=main_selection, extra=extra_selection, sink=sink
    )


# ----------------------------------------------------------------------------------------------
# Kernel, schedule and comparison
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("softmax_scale",))
def _kernel(
    q,
    k_cache,
    indices,
    topk_length,
    attn_sink,
    extra_k_cache,
    extra_indices,
    extra_topk_length,
    metadata,
    num_splits,
    *,
    softmax_scale=None,
):
    return fm.flash_mla_with_kvcache(
        q,
        k_cache,
        None,
        None,
        D_V,
        metadata,
        num_splits,
        softmax_scale=softmax_scale,
        is_fp8_kvcache=True,
        indices=indices,
        attn_sink=attn_sink,
        topk_length=topk_length,
        extra_k_cache=extra_k_cache,
        extra_indices_in_kvcache=extra_indices,
        extra_topk_length=extra_topk_length,
        implementation=KERNEL,
    )


_metadata = jax.jit(
    fm.get_mla_metadata,
    static_argnums=(1, 2),
    static_argnames=("num_heads_q", "is_fp8_kvcache", "topk"),
)


def metadata_for(inputs: Inputs) -> tuple[jax.Array, jax.Array]:
    """The sparse schedule: every request has topk + extra_topk keys per query token."""
    _, s_q, h_q, _ = inputs.q.shape
    return _metadata(
        jnp.asarray(inputs.main.contexts),
        s_q * h_q,
        1,
        num_heads_q=h_q,
        is_fp8_kvcache=True,
        topk=inputs.topk_total,
    )


def run_kernel(
    inputs: Inputs, *, with_metadata: bool, softmax_scale: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One kernel call on freshly NaN-poisoned device memory; host copies of (out, lse)."""
    metadata = metadata_for(inputs) if with_metadata else (None, None)
    b, s_q, h_q, _ = inputs.q.shape
    # As much as the outputs and the split workspace (up to b + num_sm_parts float32 rows).
    rows = (b + target_device().num_sms) * s_q * h_q
    poison_device_memory(max(rows * D_V * 4, 1 << 20))
    out, lse = _kernel(*inputs.kernel_args(), *metadata, softmax_scale=softmax_scale)
    return np.asarray(out), np.asarray(lse)


def check_against_oracle(
    inputs: Inputs, out: np.ndarray, lse: np.ndarray, *, softmax_scale: float | None = None
) -> None:
    b, s_q, h_q, _ = inputs.q.shape
    assert out.shape == (b, s_q, h_q, D_V) and out.dtype == BF16, (out.shape, out.dtype)
    assert lse.shape == (b, h_q, s_q) and lse.dtype == np.float32, (lse.shape, lse.dtype)
    ref_out, ref_lse = inputs.oracle(softmax_scale)
    check_close(out, ref_out, name="out", **SPARSE_DECODE_OUT_TOL)
    check_close(lse, ref_lse, name="lse", **SPARSE_DECODE_LSE_TOL)
    # Lonely queries (nothing selected): out exactly 0, lse exactly +inf.
    lonely = np.isinf(ref_lse)
    assert np.all(lse[lonely] == np.inf), "lonely queries must have lse +inf"
    lonely_out = out.astype(np.float32)[lonely.transpose(0, 2, 1)]
    assert np.all(lonely_out == 0.0), "lonely queries must have out exactly 0"


def run_and_check(
    inputs: Inputs, *, with_metadata: bool, softmax_scale: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    out, lse = run_kernel(inputs, with_metadata=with_metadata, softmax_scale=softmax_scale)
    check_against_oracle(inputs, out, lse, softmax_scale=softmax_scale)
    return out, lse


# ----------------------------------------------------------------------------------------------
# The shape matrix
# ----------------------------------------------------------------------------------------------

CONFIGS = tuple(
    CacheConfig(*c)
    for c in (
        (512, 64, 2),
        (512, 64, 64),
        (512, 64, 69),
        (1024, 576, 2),
        (1024, 576, 61),
        (2046, 2048, 2),
        (2046, 2048, 64),
        (2046, 2048, 576),
    )
)
BATCHES = (4, 74, 321)
S_QS = (1, 3)
HEADS = (64, 128)
#: (layout, extra cache, topk_length, extra_topk_length): V32 without extra cache; MODEL1 with
#: every combination (extra_topk_length only with an extra cache).
FEATURES = (
    *(("V32", False, lengths, False) for lengths in (False, True)),
    *(("MODEL1", False, lengths, False) for lengths in (False, True)),
    *(
        ("MODEL1", True, lengths, extra_lengths)
        for lengths, extra_lengths in itertools.product((False, True), repeat=2)
    ),
)


@dataclasses.dataclass(frozen=True)
class Case:
    layout: str
    main: CacheConfig
    extra: CacheConfig | None
    topk_length: bool
    extra_topk_length: bool
    b: int
    s_q: int
    h_q: int
    varlen: bool = True

    @property
    def id(self) -> str:
        return (
            f"{self.layout}-b{self.b}-sq{self.s_q}-h{self.h_q}-k{self.main.tag}"
            + ("" if self.extra is None else f"-x{self.extra.tag}")
            + ("-L" if self.topk_length else "")
            + ("-E" if self.extra_topk_length else "")
            + ("" if self.varlen else "-fixed")
        )

    @property
    def features(self) -> tuple:
        return (self.layout, self.extra is not None, self.topk_length, self.extra_topk_length)

    @property
    def shape_key(self) -> tuple:
        """What decides the compiled shapes (varlen does not: the caches have the class size)."""
        return dataclasses.astuple(self)[:-1]

    @property
    def with_metadata(self) -> bool:
        """Pass the schedule explicitly for about half of the shapes (fixed per shape)."""
        return seed_of("metadata", *self.shape_key) % 2 == 0

    @property
    def cost(self) -> int:
        """Roughly the oracle's work: query rows times selected keys."""
        keys = self.main.topk + (0 if self.extra is None else self.extra.topk)
        return self.b * self.s_q * self.h_q * keys


AXES = {
    "features": lambda c: c.features,
    "main": lambda c: c.main,
    "extra": lambda c: c.extra,
    "b": lambda c: c.b,
    "s_q": lambda c: c.s_q,
    "h_q": lambda c: c.h_q,
    "varlen": lambda c: c.varlen,
}


def _all_cases() -> list[Case]:
    cases = []
    for (layout, has_extra, lengths, extra_lengths), h_q, main in itertools.product(
        FEATURES, HEADS, CONFIGS
    ):
        for extra, b, s_q in itertools.product(CONFIGS if has_extra else (None,), BATCHES, S_QS):
            # As FlashMLA: fixed-length contexts too for b = 74 when no length is given.
            fixed_too = b == 74 and not lengths and not extra_lengths
            for varlen in (True, False) if fixed_too else (True,):
                cases.append(Case(layout, main, extra, lengths, extra_lengths, b, s_q, h_q, varlen))
    return cases


ALL_CASES = _all_cases()
#: Quick cases stay at or below b 74, s_q 3, h_q 128 with 4096 keys (the oracle's share).
QUICK_MAX_COST = 74 * 3 * 128 * 4096


def sample_cases(cases: list[Case], count: int, seed: int, max_cost: int) -> list[Case]:
    """A deterministic sample of cheap cases that covers every value of every axis.

    Greedy: walk a seeded permutation, keep each case that brings a value not seen yet, then
    fill up to `count` with the next cases of the walk, taking the feature sets in turn (most
    cases of the product have an extra cache; the sample should not).
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
    rest = {features: [c for c in walk if c.features == features] for features in FEATURES}
    while len(chosen) < count:
        for group in rest.values():
            while group and group[0] in chosen:
                group.pop(0)
            if group and len(chosen) < count:
                chosen.append(group.pop(0))
    return sorted(chosen, key=lambda c: c.id)


QUICK_CASES = sample_cases(ALL_CASES, 36, seed=2027, max_cost=QUICK_MAX_COST)
_quick = set(QUICK_CASES)
FULL_CASES = [c for c in ALL_CASES if c not in _quick]


def inputs_for(case: Case) -> Inputs:
    return build_inputs(
        seed_of("matrix", case.id),
        layout=case.layout,
        b=case.b,
        s_q=case.s_q,
        h_q=case.h_q,
        main=case.main,
        extra=case.extra,
        topk_length=case.topk_length,
        extra_topk_length=case.extra_topk_length,
        varlen=case.varlen,
    )


def run_case(case: Case) -> None:
    run_and_check(inputs_for(case), with_metadata=case.with_metadata)


def _ids(cases: list[Case]) -> list[str]:
    return [c.id for c in cases]


@pytest.mark.parametrize("case", QUICK_CASES, ids=_ids(QUICK_CASES))
def test_quick_sparse_matrix(case: Case):
    run_case(case)


def abstract_args(case: Case) -> tuple:
    """The kernel call's arguments for `case` (as inputs_for makes them), as shapes."""

    def cache_args(config: CacheConfig, lengths: bool) -> tuple:
        num_blocks = od.sparse_cache_blocks(case.b, config.s_k, config.page)
        width = od.FP8_LAYOUT_SIZES[case.layout][3]
        return (
            jax.ShapeDtypeStruct((num_blocks, config.page, 1, width), jnp.float8_e4m3fn),
            jax.ShapeDtypeStruct((case.b, case.s_q, config.topk), jnp.int32),
            jax.ShapeDtypeStruct((case.b,), jnp.int32) if lengths else None,
        )

    d_qk = LAYOUT_D_QK[case.layout]
    cache, indices, lengths = cache_args(case.main, case.topk_length)
    extra = (None, None, None)
    if case.extra is not None:
        extra = cache_args(case.extra, case.extra_topk_length)
    metadata = (None, None)
    if case.with_metadata:
        keys = case.main.topk + (0 if case.extra is None else case.extra.topk)
        metadata = jax.eval_shape(
            lambda lens: fm.get_mla_metadata(
                lens,
                case.s_q * case.h_q,
                1,
                num_heads_q=case.h_q,
                is_fp8_kvcache=True,
                topk=keys,
            ),
            jax.ShapeDtypeStruct((case.b,), jnp.int32),
        )
    return (
        jax.ShapeDtypeStruct((case.b, case.s_q, case.h_q, d_qk), BF16),
        cache,
        indices,
        lengths,
        jax.ShapeDtypeStruct((case.h_q,), jnp.float32),
        *extra,
        *metadata,
    )


def precompile(cases: list[Case], workers: int = 16) -> None:
    """Compile every case's kernel call on parallel threads, into JAX's persistent compilation
    cache (conftest turns it on for JAX_FLASHMLA_FULL=1), from which the tests load them."""
    jobs = {case.shape_key: case for case in cases}

    def compile_one(case: Case) -> None:
        _kernel.lower(*abstract_args(case), softmax_scale=None).compile()

    compile_in_parallel([functools.partial(compile_one, case) for case in jobs.values()], workers)


@pytest.fixture(scope="module")
def full_matrix_compiled(request: pytest.FixtureRequest):
    """Precompiles the full-matrix cases selected for this run (a -k shard compiles its own)."""
    if jax.config.jax_compilation_cache_dir:
        precompile(selected_cases(request, "test_full_sparse_matrix"))


@pytest.mark.full
@pytest.mark.parametrize("case", FULL_CASES, ids=_ids(FULL_CASES))
def test_full_sparse_matrix(case: Case, full_matrix_compiled):
    """The rest of the matrix (with test_quick_sparse_matrix, all of it)."""
    run_case(case)


def test_matrix_layout():
    """The matrix has FlashMLA's size and the quick sample covers every axis value."""
    no_lengths = [f for f in FEATURES if not f[2] and not f[3]]
    per_features = len(HEADS) * len(CONFIGS) * len(S_QS)
    expected = sum(
        per_features
        * (len(CONFIGS) if has_extra else 1)
        * (len(BATCHES) + (1 if (layout, has_extra, lengths, extra) in no_lengths else 0))
        for layout, has_extra, lengths, extra in FEATURES
    )
    assert len(ALL_CASES) == expected == 3776
    assert len(set(ALL_CASES)) == len(ALL_CASES) == len({c.id for c in ALL_CASES})
    assert len(QUICK_CASES) + len(FULL_CASES) == len(ALL_CASES)
    for axis, value_of in AXES.items():
        assert {value_of(c) for c in QUICK_CASES} == {value_of(c) for c in ALL_CASES}, axis


# ----------------------------------------------------------------------------------------------
# The oracle itself (cheap; here so that it is checked wherever these tests run)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(LAYOUT_D_QK))
def test_quick_oracle_self_check(layout):
    """The oracle's FP8 reader equals dequantize_k_cache (NaN for poisoned tokens included),
    and the vectorised oracle equals sparse_decode_oracle on the dequantised caches."""
    inputs = build_inputs(
        seed_of("oracle", layout),
        layout=layout,
        b=3,
        s_q=2,
        h_q=8,
        main=CacheConfig(100, 128, 53),
        extra=CacheConfig(60, 64, 2) if layout == "MODEL1" else None,
        topk_length=True,
        extra_topk_length=True,
        duplicates=True,
    )
    pairs = _caches(inputs)
    dequantised = [od.dequantize_fp8_cache(np.asarray(cache)) for cache, _ in pairs]
    for (cache, selection), mine in zip(pairs, dequantised, strict=True):
        package = np.asarray(fm.dequantize_k_cache(cache, dtype=jnp.float32))
        np.testing.assert_array_equal(mine, package.astype(np.float64))
        # Every byte of the tokens no counted valid slot reads is 0xFF, and only there.
        used = selection.used()
        assert used.any() and not used.all()
        per_token = token_bytes(np.asarray(cache).view(np.uint8)[:, :, 0, :], layout)
        np.testing.assert_array_equal(np.all(per_token == 0xFF, axis=-1), ~used)
        np.testing.assert_array_equal(np.isnan(mine[:, :, 0]).any(axis=-1), ~used)
    main, extra = inputs.main, inputs.extra
    for scale in (None, -0.7):
        fast = inputs.oracle(scale)
        slow = od.sparse_decode_oracle(
            np.asarray(inputs.q),
            dequantised[0],
            main.indices,
            topk_length=main.lengths,
            attn_sink=inputs.attn_sink,
            extra_k_cache=None if extra is None else dequantised[1],
            extra_indices=None if extra is None else extra.indices,
            extra_topk_length=None if extra is None else extra.lengths,
            softmax_scale=scale,
            head_dim_v=D_V,
        )
        for name, a, r in zip(("out", "lse"), fast, slow, strict=True):
            check_close(a, r, abs_tol=1e-12, rel_tol=1e-12, name=name)
            assert np.isfinite(r).any()


# ----------------------------------------------------------------------------------------------
# Corner cases
# ----------------------------------------------------------------------------------------------


def invalid_values(rng: np.random.Generator, shape, num_tokens: int) -> np.ndarray:
    """int32 values outside [0, num_tokens), every one of the sharp ones present."""
    choices = np.array([-1, -2, -(2**31), num_tokens, num_tokens + 1, 2**31 - 1], np.int64)
    values = rng.choice(choices, size=shape)
    values.reshape(-1)[: len(choices)] = choices
    return values.astype(np.int32)


def with_indices(selection: Selection, indices=None, lengths="keep") -> Selection:
    """`selection` with other indices and/or topk_length."""
    return dataclasses.replace(
        selection,
        indices=selection.indices if indices is None else np.asarray(indices, np.int32),
        lengths=selection.lengths if isinstance(lengths, str) else lengths,
    )


#: (layout, main cache, extra cache or None) of the corner cases.
CORNER_LAYOUTS = {
    "V32": ("V32", CacheConfig(700, 576, 61), None),
    "MODEL1-extra": ("MODEL1", CacheConfig(700, 576, 61), CacheConfig(300, 128, 53)),
}


@pytest.mark.parametrize("sink", [True, False], ids=["sink", "nosink"])
@pytest.mark.parametrize("config", sorted(CORNER_LAYOUTS))
def test_quick_all_indices_invalid(config, sink):
    """Every slot invalid (-1, negative, num_tokens, 2**31 - 1, ...): every cache byte is 0xFF
    and every query is lonely: out 0, lse +inf, whatever the sink."""
    layout, main_config, extra_config = CORNER_LAYOUTS[config]
    seed = seed_of("all-invalid", config)
    rng = np.random.default_rng(seed)
    b, s_q = 5, 3

    def invalid(config: CacheConfig) -> Selection:
        selection = select(rng, config, b=b, s_q=s_q, with_lengths=True)
        num_tokens = selection.num_blocks * selection.page
        values = invalid_values(rng, selection.indices.shape, num_tokens)
        return with_indices(selection, values, lengths=np.full(b, config.topk, np.int32))

    main = invalid(main_config)
    extra = None if extra_config is None else invalid(extra_config)
    assert not main.used().any()
    inputs = make_inputs(seed, layout=layout, h_q=64, main=main, extra=extra, sink=sink)
    for cache, _ in _caches(inputs):
        assert np.all(np.asarray(cache).view(np.uint8) == 0xFF)
    for with_metadata in (True, False):
        out, lse = run_and_check(inputs, with_metadata=with_metadata)
        assert np.all(out.astype(np.float32) == 0.0) and np.all(lse == np.inf)


@pytest.mark.parametrize("config", sorted(CORNER_LAYOUTS))
def test_quick_topk_length_zero_and_clamped(config):
    """topk_length 0 (and negative, counting as 0) for some requests, past topk (clamped) for
    others; the extra cache's lengths differ, so some requests read one cache only and some
    none (lonely). The slots past each length hold valid indices of poisoned tokens."""
    layout, main_config, extra_config = CORNER_LAYOUTS[config]
    seed = seed_of("topk-length", config)
    rng = np.random.default_rng(seed)
    b, s_q = 8, 2
    topk = main_config.topk
    lengths = np.array([0, topk + 1, 2**31 - 1, -1, 17, topk, 0, -(2**31)], np.int32)
    main = with_indices(select(rng, main_config, b=b, s_q=s_q), lengths=lengths)
    extra = None
    if extra_config is not None:
        extra_topk = extra_config.topk
        extra_lengths = np.array([0, 5, 0, extra_topk + 9, 2**31 - 1, -3, 64, 0], np.int32)
        extra = with_indices(select(rng, extra_config, b=b, s_q=s_q), lengths=extra_lengths)
    inputs = make_inputs(seed, layout=layout, h_q=128, main=main, extra=extra)
    keys = main.counted_keys() + (0 if extra is None else extra.counted_keys())
    # Nothing counts in requests 0 and 7 (and, without the extra cache, 3 and 6); the query
    # tokens with some counted valid slot are not lonely.
    lonely = [0, 7] if extra is not None else [0, 3, 6, 7]
    assert np.all(keys[lonely] == 0) and (np.delete(keys, lonely, axis=0) > 0).all()
    for with_metadata in (False, True):
        _, lse = run_and_check(inputs, with_metadata=with_metadata)
        np.testing.assert_array_equal(np.isinf(lse), (keys == 0)[:, None, :].repeat(128, 1))


@pytest.mark.parametrize("config", sorted(CORNER_LAYOUTS))
def test_quick_sink_on_and_off(config):
    """The same inputs with the mixed sink and without: each matches the oracle; the sink
    leaves lse alone and zeroes the +inf heads."""
    layout, main_config, extra_config = CORNER_LAYOUTS[config]
    with_sink = build_inputs(
        seed_of("sink", config),
        layout=layout,
        b=6,
        s_q=3,
        h_q=64,
        main=main_config,
        extra=extra_config,
        topk_length=True,
    )
    without = dataclasses.replace(with_sink, attn_sink=None, oracles={})
    out_sink, lse_sink = run_and_check(with_sink, with_metadata=True)
    out_plain, lse_plain = run_and_check(without, with_metadata=True)
    od.assert_same_up_to_rounding(lse_sink, lse_plain, name="lse")
    zeroed = with_sink.attn_sink == np.inf
    assert zeroed.any() and np.all(out_sink[:, :, zeroed].astype(np.float32) == 0.0)
    kept = with_sink.attn_sink == -np.inf
    assert kept.any()
    od.assert_same_up_to_rounding(out_sink[:, :, kept], out_plain[:, :, kept], name="out")


@pytest.mark.parametrize("config", sorted(CORNER_LAYOUTS))
def test_quick_duplicated_indices(config):
    """Indices drawn with replacement, plus runs of one index over many slots: each slot is a
    key of its own (a token selected k times weighs k times)."""
    layout, main_config, extra_config = CORNER_LAYOUTS[config]
    seed = seed_of("duplicates", config)
    inputs = build_inputs(
        seed,
        layout=layout,
        b=4,
        s_q=2,
        h_q=128,
        main=CacheConfig(300, main_config.topk, main_config.page),
        extra=extra_config,
        duplicates=True,
    )
    indices = inputs.main.indices.copy()
    num_tokens = inputs.main.num_blocks * inputs.main.page
    valid = (indices >= 0) & (indices < num_tokens)
    first_valid = np.take_along_axis(indices, valid.argmax(axis=2)[:, :, None], axis=2)
    indices[:, :, :40] = first_valid  # one token in 40 slots of every query token
    indices[0, 0, :] = first_valid[0, 0]  # a whole row on one token
    main = with_indices(inputs.main, indices)
    inputs = make_inputs(seed, layout=layout, h_q=128, main=main, extra=inputs.extra)
    assert valid.any(axis=2).all()
    run_and_check(inputs, with_metadata=True)


#: h_q beyond FlashMLA's 64 and 128 (the kernel pads the last 64-head tile).
OTHER_HEADS = (1, 8, 16, 32, 48, 96)


@pytest.mark.parametrize("h_q", OTHER_HEADS)
def test_quick_other_head_counts(h_q):
    layout = "V32" if h_q in (1, 16, 48) else "MODEL1"
    extra = CacheConfig(1024, 576, 2) if layout == "MODEL1" else None
    inputs = build_inputs(
        seed_of("heads", h_q),
        layout=layout,
        b=9,
        s_q=3,
        h_q=h_q,
        main=CacheConfig(2046, 2048, 64),
        extra=extra,
        topk_length=h_q % 2 == 0,
        extra_topk_length=True,
    )
    run_and_check(inputs, with_metadata=h_q >= 16)


@pytest.mark.parametrize("config", sorted(CORNER_LAYOUTS))
def test_quick_s_q4(config):
    layout, main_config, extra_config = CORNER_LAYOUTS[config]
    inputs = build_inputs(
        seed_of("s_q4", config),
        layout=layout,
        b=7,
        s_q=4,
        h_q=128,
        main=main_config,
        extra=extra_config,
        topk_length=True,
    )
    run_and_check(inputs, with_metadata=layout == "V32")


def test_quick_topk_16384():
    """The largest topk FlashMLA benchmarks: 256 blocks of 64 keys per query token."""
    inputs = build_inputs(
        seed_of("topk16384"),
        layout="V32",
        b=2,
        s_q=2,
        h_q=128,
        main=CacheConfig(20000, 16384, 64),
        varlen=False,
    )
    assert (inputs.main.indices >= 0).sum(axis=2).min() > 8192
    run_and_check(inputs, with_metadata=True)


#: Page sizes the matrix lacks (1 and 53; it has 2, 61, 64, 69 and 576), in both caches, as
#: (layout, page, extra page, h_q). At h_q <= 32 MODEL1 takes the narrow kernel only where
#: every cache's page is even (its scale records are then 16-byte aligned in pairs).
PAGE_CASES = {
    "V32-p1": ("V32", 1, None, 64),
    "V32-p53": ("V32", 53, None, 64),
    "V32-p53-h32": ("V32", 53, None, 32),
    "MODEL1-p1-x53": ("MODEL1", 1, 53, 64),
    "MODEL1-p53-x1": ("MODEL1", 53, 1, 64),
    "MODEL1-p2-x576-h16": ("MODEL1", 2, 576, 16),
    "MODEL1-p64-x53-h16": ("MODEL1", 64, 53, 16),
}


@pytest.mark.parametrize("name", sorted(PAGE_CASES))
def test_quick_page_sizes(name):
    layout, page, extra_page, h_q = PAGE_CASES[name]
    inputs = build_inputs(
        seed_of("pages", name),
        layout=layout,
        b=5,
        s_q=3,
        h_q=h_q,
        main=CacheConfig(650, 576, page),
        extra=None if extra_page is None else CacheConfig(512, 128, extra_page),
        topk_length=True,
    )
    run_and_check(inputs, with_metadata=True)


SCALES = {
    "big": 40 * HEAD_DIM_QK**-0.5,
    "zero": 0.0,
    "minus-default": -(HEAD_DIM_QK**-0.5),
    "minus-40x": -40 * HEAD_DIM_QK**-0.5,
}


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_quick_softmax_scale(scale):
    layout, main_config, extra_config = CORNER_LAYOUTS[
        "V32" if scale in ("big", "zero") else "MODEL1-extra"
    ]
    inputs = build_inputs(
        seed_of("scale", scale),
        layout=layout,
        b=6,
        s_q=3,
        h_q=128,
        main=main_config,
        extra=extra_config,
        topk_length=True,
    )
    run_and_check(inputs, with_metadata=True, softmax_scale=SCALES[scale])


# ----------------------------------------------------------------------------------------------
# Peaked scores: the running max of a query row rises late, inside and across split pieces
# ----------------------------------------------------------------------------------------------

#: Two requests, s_q 2, h_q 128: 4 query tiles per request, so (on 132 SMs) 33 parts; each
#: request's 32 blocks of 64 slots go to 11 pieces of 2-3 blocks.
PEAK_B, PEAK_S_Q, PEAK_H_Q = 2, 2, 128
#: (layout, main topk, extra topk): the MODEL1 pieces run from the main cache into the extra.
PEAK_LAYOUTS = {"V32": ("V32", 2048, 0), "MODEL1-extra": ("MODEL1", 1024, 1024)}
PEAK_PAGES = (64, 61)  # main cache, extra cache
#: Added to every RoPE dim of every query, so that a key whose RoPE dims grow by r scores about
#: r * ROPE_GAIN * softmax_scale more with every query row.
QUERY_ALIGN = 1.0
ROPE_GAIN = HEAD_DIM_ROPE * QUERY_ALIGN
#: Score rise per 64-slot block along the ramps, in log2 units: each block's keys pass the
#: running max by far more than the dense kernel's lazy threshold, noise included.
RAMP_LOG2_PER_BLOCK = 20.0
#: The spike keys' scores over the others, in log2 units (the largest; two more follow).
SPIKE_LOG2 = 17.0
ROPE = slice(-HEAD_DIM_ROPE, None)


@dataclasses.dataclass(frozen=True)
class PeakCase:
    inputs: Inputs
    keys: np.ndarray  # float64 [b, s_q, slots, d_qk]: each slot's dequantised key, slot order
    pieces: list  # per request, the [begin, end) slot-block ranges of its split pieces
    scale: float

    def row_scores(self, request: int) -> RowScores:
        """Scores in log2 units of the request's query rows ((token, head) ordered)."""
        q = np.asarray(self.inputs.q)[request].astype(np.float64)  # [s_q, h_q, d_qk]
        scores = np.einsum("shd,snd->shn", q, self.keys[request]) * self.scale * np.log2(np.e)
        return RowScores(scores.reshape(-1, scores.shape[-1]), self.pieces[request])


def build_peak_case(
    seed: int, *, config: str, profile: str, spike_piece: str | None = None
) -> PeakCase:
    """Every slot of every (request, query token) selects a token of its own, whose RoPE dims
    follow the profile along the slot order (main slots, then extra slots):

    - "scale_ramp": + RAMP * slot, with 40x the default softmax_scale;
    - "key_ramp": the RoPE dims (noise + offset) scaled by 1 + slot / 16, default scale;
    - "spike": three keys (late in the last block of the first, a middle or the last split
      piece with two blocks or more) SPIKE_LOG2 above the others, default scale.

    Large values stay in the RoPE dims: out of V for V32, and for MODEL1 (whose V holds them)
    they are positive and alike across the dominant keys, so that no output cancels.
    """
    layout, topk, extra_topk = PEAK_LAYOUTS[config]
    d_qk = LAYOUT_D_QK[layout]
    default_scale = d_qk**-0.5
    scale = 40 * default_scale if profile == "scale_ramp" else default_scale
    rng = np.random.default_rng(seed)
    slot = np.arange(topk + extra_topk)
    noise = np.clip(rng.standard_normal((PEAK_B, PEAK_S_Q, len(slot), d_qk)) / 10, -1, 1)
    rope = noise[..., ROPE]  # a view: edits land in noise
    # A RoPE offset r adds about r * ROPE_GAIN * scale to every row's score.
    rise = RAMP_LOG2_PER_BLOCK * np.log(2) / (ROPE_GAIN * scale)  # per block, in r units
    if profile == "scale_ramp":
        rope += rise / SCHEDULER_BLOCK_TOKENS * slot[:, None]
    elif profile == "key_ramp":  # the factor grows by SCHEDULER_BLOCK_TOKENS / 16 per block
        offset = rise / (SCHEDULER_BLOCK_TOKENS / 16)
        # Less noise: scaled up 129-fold by the last slot, it would blur the ramp.
        rope[...] = (1.0 + slot[:, None] / 16.0) * (rope / 10 + offset)

    q = np.clip(rng.standard_normal((PEAK_B, PEAK_S_Q, PEAK_H_Q, d_qk)) / 10, -1, 1)
    q[..., ROPE] += QUERY_ALIGN
    inputs = _peak_inputs(seed, layout, topk, extra_topk, q, noise)
    schedule = (np.asarray(x) for x in metadata_for(inputs))
    pieces = request_pieces(*schedule, [topk + extra_topk] * PEAK_B)
    if profile == "spike":
        for request in range(PEAK_B):
            first, end = spike_piece_blocks(pieces[request], spike_piece)
            last_block = (end - 1) * SCHEDULER_BLOCK_TOKENS
            assert end - first >= 2
            for k, position in enumerate((29, 43, 57)):  # late in the piece's last block
                spike = (SPIKE_LOG2 - 0.3 * k) * np.log(2) / (ROPE_GAIN * scale)
                noise[request, :, last_block + position, ROPE] += spike
        inputs = _peak_inputs(seed, layout, topk, extra_topk, q, noise)
    keys = np.concatenate(
        [
            od.dequantize_fp8_tokens(np.asarray(cache), selection.indices.reshape(-1)).reshape(
                PEAK_B, PEAK_S_Q, selection.topk, d_qk
            )
            for cache, selection in _caches(inputs)
        ],
        axis=2,
    )
    assert np.isfinite(keys).all()
    return PeakCase(inputs, keys, pieces, scale)


def _caches(inputs: Inputs) -> list:
    pairs = [(inputs.k_cache, inputs.main)]
    if inputs.extra is not None:
        pairs.append((inputs.extra_k_cache, inputs.extra))
    return pairs


def _peak_inputs(seed, layout, topk, extra_topk, q, values) -> Inputs:
    """Inputs whose slot j (main, then extra) selects a token holding values[..., j, :]."""
    rng = np.random.default_rng(seed + 1)
    selections, caches = [], []
    for first, count, page in ((0, topk, PEAK_PAGES[0]), (topk, extra_topk, PEAK_PAGES[1])):
        if count == 0:
            continue
        tokens = PEAK_B * PEAK_S_Q * count
        num_blocks = -(-tokens // page) + 1  # a spare block: poisoned
        indices = rng.permutation(num_blocks * page)[:tokens].reshape(PEAK_B, PEAK_S_Q, count)
        cache = np.zeros((num_blocks * page, values.shape[-1]), np.float32)
        cache[indices.reshape(-1)] = values[:, :, first : first + count].reshape(tokens, -1)
        selection = Selection(
            num_blocks, page, indices.astype(np.int32), None, np.full(PEAK_B, count, np.int32)
        )
        cache = cache.reshape(num_blocks, page, 1, -1).astype(BF16)
        used = jnp.asarray(selection.used())
        caches.append(_poisoned_fp8(jnp.asarray(cache), used, layout=layout))
        selections.append(selection)
    return Inputs(
        layout,
        jnp.asarray(q.astype(np.float32).astype(BF16)),
        selections[0],
        caches[0],
        selections[1] if len(selections) > 1 else None,
        caches[1] if len(caches) > 1 else None,
        None,
    )


def spike_piece_blocks(pieces: list[tuple[int, int]], where: str) -> tuple[int, int]:
    """The piece ("first", "middle" or "last" of those with 2 blocks or more) for the spike."""
    roomy = [p for p in pieces if p[1] - p[0] >= 2]
    return roomy[{"first": 0, "middle": len(roomy) // 2, "last": -1}[where]]


def run_peak_case(case: PeakCase) -> None:
    pieces = [len(p) for p in case.pieces]
    assert min(pieces) >= 3, f"the requests must be split into >= 3 pieces: {pieces}"
    default = LAYOUT_D_QK[case.inputs.layout] ** -0.5
    softmax_scale = None if case.scale == default else case.scale
    out, lse = run_and_check(case.inputs, with_metadata=True, softmax_scale=softmax_scale)
    assert np.isfinite(out.astype(np.float32)).all() and np.isfinite(lse).all()


@pytest.mark.parametrize("config", sorted(PEAK_LAYOUTS))
@pytest.mark.parametrize("profile", ["key_ramp", "scale_ramp"])
def test_quick_rescale_growing_scores(profile, config):
    case = build_peak_case(seed_of("ramp", profile, config), config=config, profile=profile)
    for request in range(PEAK_B):
        scores = case.row_scores(request)
        piece_max = scores.piece_max()
        # Every row's max rises inside the pieces (after their first block) and across them.
        assert scores.growth_in_piece().min() > RAISE_SLACK + 4
        assert (piece_max.max(axis=1) - piece_max[:, 0]).min() > 4 * RAISE_SLACK
    run_peak_case(case)


@pytest.mark.parametrize("config", sorted(PEAK_LAYOUTS))
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_quick_rescale_late_spike(where, config):
    case = build_peak_case(
        seed_of("spike", where, config), config=config, profile="spike", spike_piece=where
    )
    for request in range(PEAK_B):
        scores = case.row_scores(request)
        pieces = case.pieces[request]
        piece = pieces.index(spike_piece_blocks(pieces, where))
        if where == "last":
            assert piece >= len(pieces) - 2, (piece, pieces)
        piece_max = scores.piece_max()
        others = np.delete(piece_max, piece, axis=1).max(axis=1)
        # The spike's piece holds every row's max, far above every other piece ...
        assert (piece_max[:, piece] - others).min() > RAISE_SLACK + 4
        # ... and the spike comes after the first block of its piece.
        assert scores.growth_in_piece().min() > RAISE_SLACK + 4
    run_peak_case(case)


# ----------------------------------------------------------------------------------------------
# Determinism and the schedule
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_metadata", [True, False], ids=["schedule", "no-schedule"])
@pytest.mark.parametrize("config", sorted(CORNER_LAYOUTS))
def test_quick_deterministic(config, with_metadata):
    """Three runs on the same inputs give bitwise identical outputs (split requests included)."""
    layout, _, extra_config = CORNER_LAYOUTS[config]
    inputs = build_inputs(
        seed_of("determinism", config),
        layout=layout,
        b=6,
        s_q=3,
        h_q=128,
        main=CacheConfig(2046, 2048, 64),
        extra=extra_config,
        topk_length=True,
        extra_topk_length=True,
    )
    splits = np.diff(np.asarray(metadata_for(inputs)[1]))
    assert splits.max() >= 2, splits  # some request is split
    runs = [run_kernel(inputs, with_metadata=with_metadata) for _ in range(3)]
    for out, lse in runs[1:]:
        np.testing.assert_array_equal(bits(out), bits(runs[0][0]))
        np.testing.assert_array_equal(bits(lse), bits(runs[0][1]))
    check_against_oracle(inputs, *runs[0])


@pytest.mark.parametrize("config", sorted(CORNER_LAYOUTS))
def test_quick_schedule_passed_or_not(config):
    """The schedule passed explicitly (get_mla_metadata with topk = topk + extra_topk) and
    computed by the op itself: both match the oracle on the same inputs."""
    layout, main_config, extra_config = CORNER_LAYOUTS[config]
    inputs = build_inputs(
        seed_of("schedule", config),
        layout=layout,
        b=21,
        s_q=1,
        h_q=64,
        main=main_config,
        extra=extra_config,
        topk_length=True,
    )
    metadata, num_splits = (np.asarray(x) for x in metadata_for(inputs))
    assert num_splits.shape == (21 + 1,) and metadata.shape[1] == METADATA_FIELDS
    for with_metadata in (True, False):
        run_and_check(inputs, with_metadata=with_metadata)
