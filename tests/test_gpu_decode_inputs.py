"""The dense decode kernel on unusual inputs, on the GPU (docs/ops.md, dense decode):

- lengths past what the block table covers, and negative lengths: request i attends the
  tokens t < L_i = clamp(cache_seqlens[i], 0, max_blocks_per_seq * 64) (causal masking too);
- block ids outside [0, num_blocks) inside a request's used range: -1, num_blocks, 2**31 - 1,
  -2**31 and 2**31 - 64 (whose token offsets id * 64 wrap in int32 to 0 and to -4096), and ids
  that land on a real block when id * stride wraps around 2**32, for the token stride (64),
  the element stride (64 * h_kv * 576) and the byte stride (twice that): their tokens are
  masked, never read; a query left with no token is lonely (out 0, lse +inf);
- softmax_scale zero and negative.

Every cache row no request may read holds NaN: the rows of blocks that only bad ids point at,
block 0 (where -2**31 * 64 wraps) and the blocks the wrapping ids alias (but for the "live"
aliases, which land on another request's block: a wrong read there gives wrong finite values).
The kernel is compared with the fp32 reference under the dense-decode tolerances; the reference
gets the clamped lengths (the length rule spelt out here, not taken from the reference).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from oracle_decode import GARBAGE_BLOCK
from test_gpu_decode_dense import (
    D_QK,
    PAGE,
    SPARE_BLOCKS,
    Inputs,
    Layout,
    build_inputs,
    check_against_reference,
    make_values,
    metadata_for,
    run_kernel,
    seed_of,
)

pytestmark = pytest.mark.gpu

#: (s_q, h_q, h_kv, causal): MQA decode, causal MTP decode, causal GQA decode.
CONFIGS = {
    "sq1-h128": (1, 128, 1, False),
    "sq2-h64-causal": (2, 64, 1, True),
    "sq2-h32x2-causal": (2, 32, 2, True),
}


def effective_lengths(lengths, max_blocks: int) -> np.ndarray:
    """The length rule: L_i = clamp(cache_seqlens[i], 0, max_blocks * PAGE)."""
    return np.clip(np.asarray(lengths, np.int64), 0, max_blocks * PAGE).astype(np.int32)


def wrap_period(stride: int) -> int:
    """Block ids this far apart alias when id * stride wraps around 2**32."""
    return 2**32 // (stride & -stride)  # over the largest power of 2 dividing the stride


def rule_layout(
    rng: np.random.Generator, lengths, *, max_blocks: int, h_kv: int, bad: dict
) -> Layout:
    """A layout whose block-table entries `bad[(request, j)]` are replaced by bad ids.

    A bad id is an int, or "<stride>+<target>" / "<stride>-<target>": the id one wrap period
    of that stride ("tokens", "elements" or "bytes" of a bf16/fp16 cache with h_kv heads) above
    or below a target block, "nan" (one nobody reads) or "live" (a block another request
    reads). Block 0 is always spare (NaN). Rows are readable where a token t < L_i has a valid
    block id.
    """
    strides = {"tokens": PAGE, "elements": PAGE * h_kv * D_QK, "bytes": PAGE * h_kv * D_QK * 2}
    lengths = np.asarray(lengths, np.int64)
    b = len(lengths)
    num_blocks = b * max_blocks + SPARE_BLOCKS
    owned = 1 + rng.permutation(num_blocks - 1)[: b * max_blocks].reshape(b, max_blocks)
    effective = effective_lengths(lengths, max_blocks)
    table = owned.astype(np.int64)
    for i, length in enumerate(effective.tolist()):
        table[i, -(-length // PAGE) :] = GARBAGE_BLOCK
    for (i, j), value in bad.items():
        assert j < -(-int(effective[i]) // PAGE), (i, j, "inside the used range")
        table[i, j] = value if isinstance(value, int) else -1  # wrapping ids: set below

    def readable_rows() -> np.ndarray:
        readable = np.zeros((num_blocks, PAGE), bool)
        for i, length in enumerate(effective.tolist()):
            t = np.arange(length)
            blocks = table[i, t // PAGE]
            ok = (blocks >= 0) & (blocks < num_blocks)
            readable[blocks[ok], t[ok] % PAGE] = True
        return readable

    readable = readable_rows()
    unread = [int(k) for k in np.flatnonzero(~readable.any(axis=1)) if k != 0]
    read = [int(k) for k in np.flatnonzero(readable.all(axis=1))]
    nan_targets = []
    for (i, j), value in bad.items():
        if isinstance(value, str):
            sign = "-" if "-" in value else "+"
            stride, target = value.split(sign)
            if target == "nan":
                block = unread[len(nan_targets) % len(unread)]
                nan_targets.append(block)
            else:  # a block another request reads
                block = next(k for k in read if k not in table[i])
            period = wrap_period(strides[stride])
            table[i, j] = block + period if sign == "+" else block - period
            assert (int(table[i, j]) * strides[stride]) % 2**32 == block * strides[stride]
    assert (readable_rows() == readable).all()  # the wrapping ids are masked like the others
    assert not readable[0].any() and not readable[nan_targets].any()
    assert np.all((table >= -(2**31)) & (table < 2**31))
    return Layout(lengths.astype(np.int32), table.astype(np.int32), readable)


def with_lengths(inputs: Inputs, lengths: np.ndarray) -> Inputs:
    return dataclasses.replace(inputs, cache_seqlens=jnp.asarray(lengths), lengths=lengths)


def pieces_per_request(inputs: Inputs) -> np.ndarray:
    return np.diff(np.asarray(metadata_for(inputs)[1]))


def run_and_check(
    inputs: Inputs,
    *,
    causal: bool,
    with_metadata: bool,
    max_blocks: int,
    lonely_requests=(),
    softmax_scale=None,
):
    out, lse = run_kernel(
        inputs, causal=causal, with_metadata=with_metadata, softmax_scale=softmax_scale
    )
    reference_inputs = with_lengths(inputs, effective_lengths(inputs.lengths, max_blocks))
    check_against_reference(reference_inputs, out, lse, causal=causal, softmax_scale=softmax_scale)
    lonely = list(lonely_requests)
    assert np.all(np.isposinf(lse[lonely])) and np.all(out[lonely].astype(np.float32) == 0.0)
    others = [i for i in range(len(inputs.lengths)) if i not in lonely]
    assert np.isfinite(lse[others]).all() and np.isfinite(out[others].astype(np.float32)).all()


# ----------------------------------------------------------------------------------------------
# Block ids outside [0, num_blocks)
# ----------------------------------------------------------------------------------------------

#: With 132 SMs: requests 0, 1 and 5 are split (27, 3 and 28 pieces), request 2 has only bad
#: ids (lonely, its 2 pieces both empty), request 3 is unsplit with a bad block, request 5 is
#: longer than its block table (cut from 191 to 189 blocks).
BAD_ID_LENGTHS = [12000, 700, 150, 130, 40, 12200]
BAD_ID_MAX_BLOCKS = 189
BAD_IDS = {
    (0, 3): -1,
    (0, 17): "num_blocks",
    (0, 40): 2**31 - 1,
    (0, 60): "elements+nan",
    (0, 100): "bytes+nan",
    (0, 187): "tokens+nan",  # the last, partial block
    (1, 0): -(2**31),
    (1, 2): "tokens-nan",
    (1, 4): "bytes-nan",
    (1, 6): "tokens+live",
    (1, 8): "bytes+live",
    (1, 10): 2**31 - 64,  # the last, partial block
    (2, 0): -1,
    (2, 1): 2**31 - 1,
    (2, 2): "num_blocks",
    (3, 1): -1,
    (5, 0): "elements+live",
    (5, 188): -1,  # the last block the table covers
}


@pytest.mark.parametrize("with_metadata", [True, False], ids=["metadata", "no-metadata"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_quick_bad_block_ids_are_masked(config, with_metadata):
    s_q, h_q, h_kv, causal = CONFIGS[config]
    seed = seed_of("bad-ids", config)
    num_blocks = len(BAD_ID_LENGTHS) * BAD_ID_MAX_BLOCKS + SPARE_BLOCKS
    bad = {k: num_blocks if v == "num_blocks" else v for k, v in BAD_IDS.items()}
    layout = rule_layout(
        np.random.default_rng(seed),
        BAD_ID_LENGTHS,
        max_blocks=BAD_ID_MAX_BLOCKS,
        h_kv=h_kv,
        bad=bad,
    )
    inputs = make_values(seed, layout, s_q=s_q, h_q=h_q, h_kv=h_kv)
    pieces = pieces_per_request(inputs)
    # Split and unsplit requests with bad ids.
    assert pieces[0] >= 3 and pieces[1] >= 2 and pieces[2] >= 2 and pieces[3] == 1, pieces
    run_and_check(
        inputs,
        causal=causal,
        with_metadata=with_metadata,
        max_blocks=BAD_ID_MAX_BLOCKS,
        lonely_requests=[2],
    )


# ----------------------------------------------------------------------------------------------
# softmax_scale zero and negative
# ----------------------------------------------------------------------------------------------

SCALES = {"zero": 0.0, "minus-default": -(D_QK**-0.5), "minus-40x": -40 * D_QK**-0.5}


@pytest.mark.parametrize("scale", sorted(SCALES))
@pytest.mark.parametrize("config", ["sq1-h128", "sq2-h64-causal"])
def test_quick_zero_and_negative_softmax_scale(config, scale):
    s_q, h_q, h_kv, causal = CONFIGS[config]
    inputs = build_inputs(
        seed_of("scale", config), b=4, s_q=s_q, s_k=900, h_q=h_q, h_kv=h_kv, varlen=True
    )
    assert pieces_per_request(inputs).max() >= 2  # some request is split
    max_blocks = inputs.block_table.shape[1]
    run_and_check(
        inputs,
        causal=causal,
        with_metadata=True,
        max_blocks=max_blocks,
        softmax_scale=SCALES[scale],
    )


# ----------------------------------------------------------------------------------------------
# Lengths past the block table, and negative lengths (last: the largest schedules)
# ----------------------------------------------------------------------------------------------

#: With 10 blocks (640 tokens) per request: L = 640, 640, 0, 0, 640, 640, 63, 0.
LONG_LENGTHS = [700, 2**31 - 1, -1, -(2**31), 640, 10**6, 63, 0]
LONG_MAX_BLOCKS = 10


@pytest.mark.parametrize("with_metadata", [True, False], ids=["metadata", "no-metadata"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_quick_lengths_are_clamped_to_the_block_table(config, with_metadata):
    s_q, h_q, h_kv, causal = CONFIGS[config]
    seed = seed_of("long-lengths", config)
    layout = rule_layout(
        np.random.default_rng(seed), LONG_LENGTHS, max_blocks=LONG_MAX_BLOCKS, h_kv=h_kv, bad={}
    )
    assert (layout.block_table[[0, 1, 4, 5]] < layout.readable.shape[0]).all()  # all used
    inputs = make_values(seed, layout, s_q=s_q, h_q=h_q, h_kv=h_kv)
    run_and_check(
        inputs,
        causal=causal,
        with_metadata=with_metadata,
        max_blocks=LONG_MAX_BLOCKS,
        lonely_requests=[2, 3, 7],
    )
