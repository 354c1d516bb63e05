"""The dense decode kernel's lazy softmax rescale, on the GPU.

Per query row the kernel keeps a reference max of the scores; it raises it (and rescales the
row's running output and sum) only when a KV block's scores pass it by more than 8 in log2
units. These tests feed scores whose row maxima grow by far more than that from block to block
inside each split-KV piece of a request, and from piece to piece, always after the row has a
non-zero running output, and compare the kernel with the fp32 reference under the dense-decode
tolerances of docs/ops.md:

- a large softmax_scale (40x the default) over keys with a ramp along the sequence;
- keys scaled up along the sequence (k_t *= 1 + t / 16, t the token's position);
- large random scores (40x scale, unit-variance RoPE parts): raises of random size and place;
- one late spike key (aligned with every query and large) in the first, a middle or the last
  split-KV piece of a request: a raise by ~16 after the other blocks of its piece.

Each test first checks on the host that its data does what it claims: the request is split into
3 or more pieces (get_mla_metadata's num_splits), and the float64 scores do rise as described.

The large values live in the RoPE dims (the last 64 of d_qk): they count in the scores but not
in V (the first 512 dims), which keeps the standard N(0, 1) / 10 values. Large V values with a
few dominant keys would let the bf16 rounding of the probabilities exceed the absolute tolerance
where outputs cancel, for a correct kernel too. Every value stays finite in bf16 and fp16 (the
largest is ~800).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from oracle_decode import BF16, FP16
from test_gpu_decode_dense import (
    D_QK,
    D_V,
    PAGE,
    Inputs,
    check_against_reference,
    make_layout,
    run_kernel,
    seed_of,
)

import jax_flashmla as fm
from jax_flashmla._src.geometry import MetadataField

pytestmark = pytest.mark.gpu

#: Two long requests: the scheduler splits each into many pieces of a few blocks (request 0
#: into 32 pieces of 2-3 blocks on a 132-SM GPU, its last piece with 2 blocks).
LENGTHS = (6050, 3000)
#: (s_q, h_q, causal); both have 128 query rows per KV head, so one schedule shape.
CONFIGS = {"sq1": (1, 128, False), "sq2-causal": (2, 64, True)}
DTYPES = {"bf16": BF16, "fp16": FP16}
DEFAULT_SCALE = D_QK**-0.5
LARGE_SCALE = 40 * DEFAULT_SCALE
#: The kernel's raise threshold, in log2 units of the scores.
RAISE_SLACK = 8.0
#: Added to every RoPE dim of every query (but in the noisy profile), so that a key with
#: `a * ALIGN` added to its RoPE dims scores ~a * 64 * QUERY_ALIGN * ALIGN = 1.92 a more with
#: every query row (+-4%: the queries' own N(0, 1) / 10 values).
QUERY_ALIGN = 0.3
ALIGN = 0.1
ROPE = slice(D_V, D_QK)


def _noise(rng: np.random.Generator, shape) -> np.ndarray:
    """The standard test values: N(0, 1) / 10 clamped to [-1, 1], float32."""
    return np.clip(rng.standard_normal(shape) / 10.0, -1.0, 1.0).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class HostCase:
    """Device inputs plus the host copies (float32 of the dtype-rounded values) and schedule."""

    inputs: Inputs
    q: np.ndarray  # [b, s_q, h_q, D_QK]
    cache: np.ndarray  # [num_blocks, PAGE, 1, D_QK], NaN where no request may read
    block_table: np.ndarray
    pieces: list[list[tuple[int, int]]]  # per request, the block range of each piece


def request_pieces(metadata: np.ndarray, num_splits: np.ndarray, lengths) -> list:
    """Per request, the [begin, end) block ranges of its split-KV pieces, in order."""
    field = MetadataField
    pieces = []
    for request, length in enumerate(lengths):
        blocks = -(-int(length) // PAGE)
        ranges = []
        for row in metadata:
            if row[field.BEGIN_REQ] <= request <= row[field.END_REQ]:
                begin = int(row[field.BEGIN_BLOCK]) if request == row[field.BEGIN_REQ] else 0
                end = int(row[field.END_BLOCK]) if request == row[field.END_REQ] else blocks
                ranges.append((begin, end))
        count = int(num_splits[request + 1] - num_splits[request])
        assert len(ranges) == count, (request, ranges, count)
        # The pieces tile the request's blocks in order.
        assert [r[0] for r in ranges] == [0] + [r[1] for r in ranges[:-1]], ranges
        assert ranges[-1][1] == blocks, (ranges, blocks)
        pieces.append(ranges)
    return pieces


def spike_piece_blocks(pieces: list[tuple[int, int]], where: str) -> tuple[int, int]:
    """The piece ("first", "middle" or "last" of those with 2 blocks or more) for the spike."""
    roomy = [p for p in pieces if p[1] - p[0] >= 2]
    return roomy[{"first": 0, "middle": len(roomy) // 2, "last": -1}[where]]


def build_case(
    seed: int, *, profile: str, s_q: int, h_q: int, dtype, spike_piece: str | None = None
) -> HostCase:
    """Inputs of one rescale test; see the module docstring for the profiles."""
    rng = np.random.default_rng(seed)
    layout = make_layout(rng, b=len(LENGTHS), s_q=s_q, s_k=0, varlen=False, seqlens=LENGTHS)
    table = layout.block_table
    num_blocks = layout.readable.shape[0]
    # Position of the token each cache row holds (-1: nobody reads the row).
    position = np.full((num_blocks, PAGE), -1)
    for i, length in enumerate(LENGTHS):
        t = np.arange(length)
        position[table[i, t // PAGE], t % PAGE] = t
    t = np.maximum(position, 0)[:, :, None, None].astype(np.float32)

    q = _noise(rng, (len(LENGTHS), s_q, h_q, D_QK))
    cache = _noise(rng, (num_blocks, PAGE, 1, D_QK))
    if profile == "noisy":
        q[..., ROPE] = np.clip(rng.standard_normal(q[..., ROPE].shape), -4, 4)
        cache[..., ROPE] = np.clip(rng.standard_normal(cache[..., ROPE].shape), -4, 4)
    else:
        q[..., ROPE] += QUERY_ALIGN
    if profile == "scale_ramp":  # with LARGE_SCALE: ~8 log2 units more per block
        cache[..., ROPE] += 0.027 * t * ALIGN
    elif profile == "key_ramp":  # ~8 log2 units more per block at the default scale
        cache[..., ROPE] = (1.0 + t / 16.0) * (cache[..., ROPE] + 17 * ALIGN)

    schedule = fm.get_mla_metadata(jnp.asarray(layout.lengths), s_q * h_q, 1)
    metadata, num_splits = (np.asarray(x) for x in schedule)
    pieces = request_pieces(metadata, num_splits, LENGTHS)
    if profile == "spike":
        first, end = spike_piece_blocks(pieces[0], spike_piece)
        # In the piece's last block, after its other blocks: 20 tokens before the piece's end
        # (so that both causal queries see it).
        token = min(end * PAGE, LENGTHS[0]) - 21
        assert token >= (first + 1) * PAGE, (first, end, token)
        block, row = table[0, token // PAGE], token % PAGE
        cache[block, row, 0, ROPE] += 140 * ALIGN  # ~16 log2 units over the other keys

    cache[~layout.readable] = np.nan
    q = q.astype(dtype).astype(np.float32)
    cache = cache.astype(dtype).astype(np.float32)
    assert np.isfinite(q).all() and np.isfinite(cache[layout.readable]).all()  # in the dtype
    inputs = _device_inputs(q.astype(dtype), cache.astype(dtype), layout)
    return HostCase(inputs, q, cache, table, pieces)


def _device_inputs(q: np.ndarray, cache: np.ndarray, layout) -> Inputs:
    return Inputs(
        jnp.asarray(q),
        jnp.asarray(cache),
        jnp.asarray(layout.block_table),
        jnp.asarray(layout.lengths),
        layout.lengths,
    )


@dataclasses.dataclass(frozen=True)
class RowScores:
    """Float64 scores (log2 units) of every visible key, per query row of one request."""

    scores: np.ndarray  # [rows, length]; -inf where a causal row does not see the key
    pieces: list[tuple[int, int]]

    def piece_max(self) -> np.ndarray:
        """[rows, pieces]: the max score of each piece."""
        return np.stack(
            [self.scores[:, b * PAGE : e * PAGE].max(axis=1) for b, e in self.pieces], axis=1
        )

    def block_max(self, block: int) -> np.ndarray:
        """[rows]: the max score of one KV block."""
        return self.scores[:, block * PAGE : (block + 1) * PAGE].max(axis=1)

    def growth_in_piece(self) -> np.ndarray:
        """[rows]: the largest rise, inside one piece, of a block's max over the max of the
        piece's first block. Over 8, the kernel's lazy reference (set by the first block, which
        leaves a running output) must be raised at least once."""
        best = np.full(self.scores.shape[0], -np.inf)
        for begin, end in self.pieces:
            for block in range(begin + 1, end):
                best = np.maximum(best, self.block_max(block) - self.block_max(begin))
        return best


def row_scores(case: HostCase, request: int, *, scale: float, causal: bool) -> RowScores:
    """The scores of `request`'s query rows, (query token, head) ordered, in log2 units."""
    length = LENGTHS[request]
    t = np.arange(length)
    table = case.block_table[request]
    keys = case.cache[table[t // PAGE], t % PAGE, 0].astype(np.float64)  # [length, D_QK]
    s_q, h_q = case.q.shape[1], case.q.shape[2]
    queries = case.q[request].reshape(s_q * h_q, D_QK).astype(np.float64)
    scores = (queries @ keys.T) * scale * np.log2(np.e)
    if causal:
        query_token = np.repeat(np.arange(s_q), h_q)
        visible = t[None, :] <= length - s_q + query_token[:, None]
        scores = np.where(visible, scores, -np.inf)
    return RowScores(scores, case.pieces[request])


def run_and_check(case: HostCase, *, causal: bool, scale: float) -> None:
    pieces = [len(p) for p in case.pieces]
    assert min(pieces) >= 3, f"the requests must be split into >= 3 pieces: {pieces}"
    softmax_scale = None if scale == DEFAULT_SCALE else scale
    out, lse = run_kernel(
        case.inputs, causal=causal, with_metadata=True, softmax_scale=softmax_scale
    )
    assert np.isfinite(out.astype(np.float32)).all() and np.isfinite(lse).all()
    check_against_reference(case.inputs, out, lse, causal=causal, softmax_scale=softmax_scale)


PROFILES = {"scale_ramp": LARGE_SCALE, "key_ramp": DEFAULT_SCALE, "noisy": LARGE_SCALE}


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_quick_rescale_growing_scores(profile, config, dtype):
    s_q, h_q, causal = CONFIGS[config]
    scale = PROFILES[profile]
    case = build_case(
        seed_of("rescale", profile, config, dtype), profile=profile, s_q=s_q, h_q=h_q,
        dtype=DTYPES[dtype],
    )  # fmt: skip
    for request in range(len(LENGTHS)):
        scores = row_scores(case, request, scale=scale, causal=causal)
        growth = scores.growth_in_piece()
        piece_max = scores.piece_max()
        spread = piece_max.max(axis=1) - piece_max[:, 0]
        if profile == "noisy":  # random: most rows, by random amounts
            assert np.mean(growth > RAISE_SLACK) > 0.9, np.mean(growth > RAISE_SLACK)
            assert np.mean(spread > RAISE_SLACK) > 0.5, np.mean(spread > RAISE_SLACK)
        else:  # ramps: every row, inside pieces and from the first piece to the last
            assert growth.min() > RAISE_SLACK + 4, growth.min()
            assert spread.min() > 4 * RAISE_SLACK, spread.min()
    run_and_check(case, causal=causal, scale=scale)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_quick_rescale_late_spike(where, config, dtype):
    s_q, h_q, causal = CONFIGS[config]
    case = build_case(
        seed_of("spike", where, config, dtype), profile="spike", s_q=s_q, h_q=h_q,
        dtype=DTYPES[dtype], spike_piece=where,
    )  # fmt: skip
    scores = row_scores(case, 0, scale=DEFAULT_SCALE, causal=causal)
    piece = case.pieces[0].index(spike_piece_blocks(case.pieces[0], where))
    if where == "last":
        assert piece >= len(case.pieces[0]) - 2, (piece, case.pieces[0])
    piece_max = scores.piece_max()
    others = np.delete(piece_max, piece, axis=1).max(axis=1)
    # The spike's piece holds every row's max, ~16 log2 units over every other piece ...
    assert (piece_max[:, piece] - others).min() > RAISE_SLACK + 4
    # ... and the spike comes after the first block of its piece: a raise with a running output.
    assert scores.growth_in_piece().min() > RAISE_SLACK + 4
    run_and_check(case, causal=causal, scale=DEFAULT_SCALE)
