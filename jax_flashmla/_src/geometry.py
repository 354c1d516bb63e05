"""The shapes the kernels are built around: MLA head dims, page and tile sizes, and the row
layout of the split-KV scheduler's metadata. The one Python definition of each; the C++ twin is
csrc/kernels/common/mla_geometry.cuh, and a test checks that the compiled module agrees.
"""

from __future__ import annotations

import enum

#: Latent ("NoPE") dims of a cache row; V is these dims of each row.
HEAD_DIM_LATENT = 512
#: Rotary ("RoPE") dims appended to the latent ones.
HEAD_DIM_ROPE = 64
#: d_qk of DeepSeek-V3-style MLA: latent + RoPE.
HEAD_DIM_QK = HEAD_DIM_LATENT + HEAD_DIM_ROPE
#: d_v of MLA decode and sparse prefill.
HEAD_DIM_V = HEAD_DIM_LATENT
#: d_qk of the "MODEL1" models: 448 latent + RoPE (their V is all 512 dims, RoPE included).
HEAD_DIM_QK_MODEL1 = 448 + HEAD_DIM_ROPE
#: d_qk that sparse decode and sparse prefill accept.
SPARSE_HEAD_DIMS_QK = (HEAD_DIM_QK_MODEL1, HEAD_DIM_QK)
#: Tokens per page of FlashMLA's caches (the only page it takes): the tests' default.
DEFAULT_PAGE_SIZE = 64
#: Tokens per scheduling unit: one KV block of the decode kernels.
SCHEDULER_BLOCK_TOKENS = 64
#: Fixed cost of a request in the schedule, in blocks: loading its queries, writing and
#: combining its output.
SCHEDULER_FIXED_OVERHEAD = 5
#: Query rows (s_q x heads sharing a KV head) that one decode CTA handles.
QUERY_TILE_ROWS = 64
#: Largest int32: the kernels' token coordinates, workspace rows and split counts are int32.
INT32_MAX = 2**31 - 1


#: (d_qk, d_v) pairs of dense MHA prefill (DeepSeek's 128 + 64 RoPE / 128, and plain
#: 128 / 128); any other width is an error, in the op and its reference.
MHA_HEAD_DIMS = ((192, 128), (128, 128))


class MetadataField(enum.IntEnum):
    """Columns of one row (one SM part) of `tile_scheduler_metadata`."""

    BEGIN_REQ = 0  # first request of the part (b for an empty part)
    END_REQ = 1  # last request, inclusive (-1 for an empty part)
    BEGIN_BLOCK = 2  # first KV block of BEGIN_REQ handled by the part
    END_BLOCK = 3  # one past the last KV block of END_REQ handled by the part
    BEGIN_SPLIT_IDX = 4  # index of the part's piece among BEGIN_REQ's pieces
    IS_FIRST_REQ_SPLIT = 5  # 1 when BEGIN_REQ has several pieces
    IS_LAST_REQ_SPLIT = 6  # 1 when END_REQ has several pieces
    PAD = 7  # always 0


#: int32 fields per row of `tile_scheduler_metadata`.
METADATA_FIELDS = len(MetadataField)
