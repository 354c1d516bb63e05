"""Sparse FP8 MLA decode benchmark: jax_flashmla's kernel side by side with FlashMLA.

Times `flash_mla_with_kvcache` in sparse mode (DeepSeek Sparse Attention decode: each query
token attends the `topk` cache tokens an indexer selected) over an FP8 cache of page 64, bf16
q, s_q = 2, each request's indices drawn from its own context of s_k = 32768 tokens, in both
cache layouts ("V32": d_qk 576, 656 bytes per token; "MODEL1": d_qk 512, 584 bytes per token):
  production  h_q = 128, topk = 2048, b in {64, 128}
  peak        b = 148, topk = 16384, h_q in {64, 128}
  heads       b = 128, topk = 2048, h_q in {16, 32}
or the configurations given with --only LAYOUT,B,H_Q,TOPK (repeatable; s_q 2, s_k 32768).

Inputs: b * s_k / 64 cache blocks, a random permutation of them as the requests' block tables
(as bench_decode.py); values N(0, 1) / 10 quantised into the layout by quantize_k_cache. For
each request and query token, `topk` distinct positions of the request's context, in random
order (an indexer's order, not the cache's), mapped through its block table to
block * 64 + row. q ~ N(0, 1) / 10, one per call.

Counting (docs/ops.md), every slot selecting a token:
  FLOPs = b * s_q * h_q * topk * 2 * (d_qk + 512)
  bytes = b * s_q * topk * bytes_per_token + b * s_q * h_q * (d_qk + 512) * 2
(the selected tokens' cache bytes, 656 V32 / 584 MODEL1, once per query token; q read and out
written in bf16).

Timing: the whole user-visible call (main kernel + combine), exactly as bench_decode.py: the
schedule (get_mla_metadata with topk and num_heads_q) computed once outside and passed in; one
jitted function of n calls, each on its own q, all on the same cache and indices, returning
every output; the median over --runs timed runs for n = R and n = R / 4, and the time of one
call is their difference divided by the difference in n.

Peer (--peers; on by default where `flash_mla` can be imported, after `source
../shared/peers/setup_peers.sh` on the GPU machine): right after our op, FlashMLA's sparse
decode runs in this process on the very same arrays (torch.from_dlpack of q, the cache bytes
and the indices), timed the same way (the n calls captured in one CUDA graph after one eager
call, in which FlashMLA builds its schedule; replay + synchronize timed for n = R and R / 4).
ratio = FlashMLA's time / ours (> 1: we are faster). FlashMLA takes h_q 64 or 128 only: fewer
heads run with q zero-padded to 64 heads, as its users must (the padded q are made before
timing, so the padding copy is not in FlashMLA's time), and only the real heads are compared.
For MODEL1, FlashMLA wants each block padded to a multiple of 576 bytes: it gets a padded copy
of the same bytes, made before timing. FlashMLA's output for the first q is checked against
ours; a disagreement makes the script exit with status 1 (after writing the JSON).

Examples:
  source ../shared/peers/setup_peers.sh &&
    python3 -P benchmarks/bench_decode_sparse.py --json benchmarks/results/h200/decode_sparse.json
  python3 -P benchmarks/bench_decode_sparse.py --only V32,128,128,2048 --only MODEL1,148,64,16384
  python3 -P benchmarks/bench_decode_sparse.py --scale 64 --implementation xla   # CPU smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from jax_flashmla._src.geometry import DEFAULT_PAGE_SIZE, HEAD_DIM_V
from jax_flashmla.ops.decode import TOPK_MULTIPLE
from jax_flashmla.ops.quant import FP8_LAYOUTS

#: The dense benchmark: its timing method, peer result and output comparison are shared, and
#: what both sparse benchmarks do with FlashMLA.
sys.path.insert(0, str(Path(__file__).parent))  # `python -P` leaves this folder off
import bench_decode as dense

PeerResult = dense.PeerResult

BYTES_PER_VALUE = 2  # bf16 q and out
S_Q = 2
S_K = 32768
LAYOUTS = ("V32", "MODEL1")
#: FlashMLA wants each MODEL1 block's bytes padded to a multiple of this (docs/ops.md).
FLASHMLA_BLOCK_ALIGN = 576


@dataclasses.dataclass(frozen=True)
class Config:
    group: str  # "production", "peak", "heads" or "only"
    layout: str  # a key of FP8_LAYOUTS
    b: int
    h_q: int
    topk: int
    s_q: int = S_Q
    s_k: int = S_K  # context of each request, the indices' range

    @property
    def d_qk(self) -> int:
        return FP8_LAYOUTS[self.layout].d_qk

    @property
    def label(self) -> str:
        return f"{self.layout} b{self.b} s_q{self.s_q} h{self.h_q} topk{self.topk} s_k{self.s_k}"

    def scaled(self, scale: int) -> Config:
        """Smaller b, s_k and topk (for smoke tests off the GPU): topk stays a positive
        multiple of 64, s_k at least topk."""
        if scale == 1:
            return self
        topk = max(TOPK_MULTIPLE, self.topk // scale // TOPK_MULTIPLE * TOPK_MULTIPLE)
        return dataclasses.replace(
            self, b=max(1, self.b // scale), topk=topk, s_k=max(topk, self.s_k // scale)
        )


SHAPES = (
    [("production", b, 128, 2048) for b in (64, 128)]
    + [("peak", 148, h_q, 16384) for h_q in (64, 128)]
    + [("heads", 128, h_q, 2048) for h_q in (16, 32)]
)
CONFIGS = [Config(group, layout, *shape) for group, *shape in SHAPES for layout in LAYOUTS]
GROUPS = ("production", "peak", "heads")


@dataclasses.dataclass
class Inputs:
    """One configuration's arrays on the device."""

    qs: list  # `repeats` bfloat16 [b, s_q, h_q, d_qk], one per call
    cache: object  # float8_e4m3fn [num_blocks, 64, 1, bytes_per_token]
    indices: object  # int32 [b, s_q, topk], block * 64 + row


#: (config, inputs, our output for the first q) -> FlashMLA's result on the same inputs.
PeerMeasure = Callable[[Config, Inputs, object], PeerResult]


def flops(cfg: Config) -> float:
    return cfg.b * cfg.s_q * cfg.h_q * cfg.topk * 2 * (cfg.d_qk + HEAD_DIM_V)


def bytes_moved(cfg: Config) -> float:
    cache = cfg.b * cfg.s_q * cfg.topk * FP8_LAYOUTS[cfg.layout].bytes_per_token
    q_and_out = cfg.b * cfg.s_q * cfg.h_q * (cfg.d_qk + HEAD_DIM_V) * BYTES_PER_VALUE
    return cache + q_and_out


def draw_indices(cfg: Config, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices int32 [b, s_q, topk], block_table [b, blocks per request]): for each request
    and query token, `topk` distinct positions of [0, s_k) in random order, as cache indices
    block_table[i, t // 64] * 64 + t % 64."""
    page = DEFAULT_PAGE_SIZE
    blocks_per_request = -(-cfg.s_k // page)
    rng = np.random.default_rng(seed)
    block_table = rng.permutation(cfg.b * blocks_per_request).reshape(cfg.b, blocks_per_request)
    rows = cfg.b * cfg.s_q
    context = np.broadcast_to(np.arange(cfg.s_k, dtype=np.int64), (rows, cfg.s_k))
    positions = rng.permuted(context, axis=1)[:, : cfg.topk]
    requests = np.repeat(np.arange(cfg.b), cfg.s_q)[:, None]
    indices = block_table[requests, positions // page] * page + positions % page
    return indices.reshape(cfg.b, cfg.s_q, cfg.topk).astype(np.int32), block_table


def make_inputs(cfg: Config, seed: int, repeats: int) -> Inputs:
    import jax
    import jax.numpy as jnp

    import jax_flashmla as fm

    page = DEFAULT_PAGE_SIZE
    indices, block_table = draw_indices(cfg, seed)
    num_blocks = block_table.size
    key_q, key_k = jax.random.split(jax.random.key(seed))

    @jax.jit
    def cache_fn(key):
        # Block by block, so that a 3 GB cache needs no 11 GB of float32 intermediates.
        def one_block(index):
            shape = (1, page, 1, cfg.d_qk)
            values = jax.random.normal(jax.random.fold_in(key, index), shape) / 10
            return fm.quantize_k_cache(values.astype(jnp.bfloat16), layout=cfg.layout)[0]

        step = max(1, min(num_blocks, (1 << 24) // (page * cfg.d_qk)))
        return jax.lax.map(one_block, jnp.arange(num_blocks), batch_size=step)

    shape = (cfg.b, cfg.s_q, cfg.h_q, cfg.d_qk)
    q_fn = jax.jit(lambda key: (jax.random.normal(key, shape) / 10).astype(jnp.bfloat16))
    inputs = Inputs(
        qs=[q_fn(jax.random.fold_in(key_q, i)) for i in range(repeats)],
        cache=cache_fn(key_k),
        indices=jnp.asarray(indices),
    )
    jax.block_until_ready((inputs.qs, inputs.cache, inputs.indices))
    return inputs


def schedule(cfg: Config):
    """The sparse schedule of docs/ops.md, computed once per configuration."""
    import jax
    import jax.numpy as jnp

    import jax_flashmla as fm

    seqlens = jnp.full((cfg.b,), cfg.s_k, jnp.int32)  # ignored in sparse mode

    @jax.jit
    def metadata_fn(seqlens):
        return fm.get_mla_metadata(
            seqlens, cfg.s_q * cfg.h_q, 1, num_heads_q=cfg.h_q, is_fp8_kvcache=True, topk=cfg.topk
        )

    return jax.block_until_ready(metadata_fn(seqlens))


def op_call(implementation: str):
    """One sparse decode call of our op: (q, cache, indices, *metadata) -> (out, lse)."""
    import jax_flashmla as fm

    def call(q, cache, indices, *metadata):
        return fm.flash_mla_with_kvcache(
            q,
            cache,
            None,
            None,
            HEAD_DIM_V,
            *metadata,
            is_fp8_kvcache=True,
            indices=indices,
            implementation=implementation,
        )

    return call


def kernel_unavailable(cfg: Config, implementation: str) -> str:
    """Why the op cannot take this config with `implementation` ("" when it can)."""
    import jax
    import jax.numpy as jnp

    layout = FP8_LAYOUTS[cfg.layout]
    structs = (
        jax.ShapeDtypeStruct((cfg.b, cfg.s_q, cfg.h_q, cfg.d_qk), jnp.bfloat16),
        jax.ShapeDtypeStruct(
            (cfg.b, DEFAULT_PAGE_SIZE, 1, layout.bytes_per_token), jnp.float8_e4m3fn
        ),
        jax.ShapeDtypeStruct((cfg.b, cfg.s_q, cfg.topk), jnp.int32),
    )
    return dense.refusal(op_call(implementation), structs)


def jitted_calls(implementation: str):
    """The timed function: one jitted program making one op call per q of a list, all on the
    same cache, indices and metadata, returning every output."""
    import jax

    call = op_call(implementation)

    @jax.jit
    def many_calls(qs, cache, indices, tile_metadata, num_splits):
        return [call(q, cache, indices, tile_metadata, num_splits) for q in qs]

    return many_calls


def time_op(
    many_calls, inputs: Inputs, metadata, *, repeats: int, runs: int, warmup_ms: float
) -> float:
    """Median time of one call of our op in microseconds (bench_decode.py's method)."""
    return dense.jax_time_us(
        many_calls,
        lambda n: (inputs.qs[:n], inputs.cache, inputs.indices, *metadata),
        repeats=repeats,
        runs=runs,
        warmup_ms=warmup_ms,
    )


def padded_blocks(cache, align: int = FLASHMLA_BLOCK_ALIGN):
    """uint8 [num_blocks, stride]: each block's bytes, zero-padded to a multiple of `align`
    (FlashMLA's MODEL1 cache)."""
    import jax
    import jax.numpy as jnp

    raw = jax.lax.bitcast_convert_type(cache, jnp.uint8).reshape(cache.shape[0], -1)
    stride = -(-raw.shape[1] // align) * align
    return jnp.pad(raw, ((0, 0), (0, stride - raw.shape[1])))


class FlashMLAPeer(dense.FlashMLASparsePeer):
    """Times FlashMLA's sparse decode on our arrays: the q, the cache (MODEL1's blocks padded
    as FlashMLA wants them) and the indices. A config it fails on is reported and gives a
    PeerResult without a time."""

    def __init__(self, module, *, repeats: int, runs: int, warmup_ms: float):
        super().__init__(module, repeats=repeats, runs=runs, warmup_ms=warmup_ms)
        self.noted_copy = False

    def cache_bytes(self, cache):
        """torch uint8 view of the FP8 cache's bytes: the same buffer, or, where this torch
        cannot import float8 through DLPack, a uint8 copy of the same bytes."""
        import jax
        import jax.numpy as jnp
        import torch

        try:
            return torch.from_dlpack(cache).view(torch.uint8)
        except Exception as error:
            if not self.noted_copy:
                self.noted_copy = True
                print(f"# FlashMLA gets a uint8 copy of the cache: {error!r}", file=sys.stderr)
            return torch.from_dlpack(
                jax.block_until_ready(jax.lax.bitcast_convert_type(cache, jnp.uint8))
            )

    def flashmla_cache(self, cfg: Config, cache):
        """FlashMLA's float8_e4m3fn [num_blocks, 64, 1, bytes_per_token] view of our cache."""
        import jax
        import torch

        if cfg.layout != "MODEL1":
            return self.cache_bytes(cache).view(torch.float8_e4m3fn)
        num_blocks, page, _, token_bytes = cache.shape
        blocks = torch.from_dlpack(jax.block_until_ready(padded_blocks(cache)))
        # The first page * token_bytes bytes of each padded block; the stride stays padded.
        blocks = blocks[:, : page * token_bytes]
        return blocks.view(num_blocks, page, 1, token_bytes).view(torch.float8_e4m3fn)

    def measure(self, cfg: Config, inputs: Inputs, ours: np.ndarray) -> PeerResult:
        import torch

        if dense.flashmla_heads(cfg.h_q) is None:
            takes = dense.FLASHMLA_SPARSE_HEADS
            raise ValueError(f"FlashMLA's sparse decode takes h_q {takes}; got {cfg.h_q}")
        qs = self.padded(inputs.qs, cfg.h_q)
        cache = self.flashmla_cache(cfg, inputs.cache)
        indices = torch.from_dlpack(inputs.indices)
        # At 9241ae3 get_mla_metadata takes no arguments; the schedule is built on the first call.
        sched_meta, _ = self.flash_mla.get_mla_metadata()

        def call(q):
            out, _ = self.flash_mla.flash_mla_with_kvcache(
                q,
                cache,
                None,
                None,
                HEAD_DIM_V,
                sched_meta,
                None,
                is_fp8_kvcache=True,
                indices=indices,
            )
            return out

        return self.timed(qs, call, cfg.h_q, ours)


def record(kernel: str, cfg: Config, us: float, peer: PeerResult, card: str, date: str) -> dict:
    return {
        "kernel": kernel,
        "layout": cfg.layout,
        "b": cfg.b,
        "s_q": cfg.s_q,
        "h_q": cfg.h_q,
        "h_kv": 1,
        "s_k": cfg.s_k,
        "topk": cfg.topk,
        "d_qk": cfg.d_qk,
        "page": DEFAULT_PAGE_SIZE,
        "dtype": "bfloat16",
        **dense.flashmla_fields(us, flops(cfg), bytes_moved(cfg), peer, cfg.h_q),
        "card": card,
        "date": date,
    }


def select_configs(groups: str, layouts: str) -> list[Config]:
    configs = dense.in_groups(CONFIGS, groups, GROUPS)
    layout_names = {name.strip() for name in layouts.split(",") if name.strip()}
    unknown = layout_names - set(LAYOUTS)
    if unknown:
        raise SystemExit(f"unknown --layouts {sorted(unknown)}; use {', '.join(LAYOUTS)}")
    return [c for c in configs if c.layout in layout_names]


def parse_only(spec: str) -> Config:
    """--only LAYOUT,B,H_Q,TOPK (s_q 2, s_k 32768), e.g. V32,128,128,2048."""
    fields = spec.split(",")
    try:
        layout = fields[0].strip()
        b, h_q, topk = (int(field) for field in fields[1:])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--only wants LAYOUT,B,H_Q,TOPK (a layout and three integers), got {spec!r}"
        ) from None
    if layout not in LAYOUTS:
        raise argparse.ArgumentTypeError(
            f"--only wants a layout of {', '.join(LAYOUTS)} first, got {spec!r}"
        )
    if min(b, h_q) < 1 or topk < 1 or topk % TOPK_MULTIPLE or topk > S_K:
        raise argparse.ArgumentTypeError(
            f"--only wants B, H_Q >= 1 and TOPK a positive multiple of {TOPK_MULTIPLE} up to "
            f"{S_K}, got {spec!r}"
        )
    return Config("only", layout, b, h_q, topk)


def parse_args(argv=None) -> argparse.Namespace:
    parser = dense.parser_with_configs(__doc__, GROUPS)
    parser.add_argument(
        "--layouts", default=",".join(LAYOUTS), help="a comma list of " + ", ".join(LAYOUTS)
    )
    dense.only_argument(parser, parse_only, "LAYOUT,B,H_Q,TOPK", f"s_q {S_Q}, s_k {S_K}")
    return dense.sparse_args(parser, argv, "divide b, s_k and topk (smoke tests)")


def main(argv=None, measure_peer: PeerMeasure | None = None) -> int:
    """Run the benchmark; `measure_peer` replaces FlashMLA (tests)."""
    args = parse_args(argv)
    want_peer = dense.peers_wanted(args, measure_peer, ("flash_mla",))

    configs = args.only or select_configs(args.configs, args.layouts)
    configs = [c.scaled(args.scale) for c in configs]
    main_kernel = dense.kernel_name(args.implementation)
    if dense.cannot_run(
        args.implementation, configs, lambda cfg: kernel_unavailable(cfg, args.implementation)
    ):
        return 1

    device, card, date = dense.where_and_when()
    measure_peer, peer_note = dense.chosen_peers(
        args, want_peer, measure_peer, device, ("flash_mla",), lambda: FlashMLAPeer.imported(args)
    )
    inputs_note = f"bf16 q, FP8 cache page {DEFAULT_PAGE_SIZE}"
    print(dense.header_line(device, date, inputs_note, main_kernel, args))
    print(
        f"# FlashMLA side by side (same process, same arrays; ratio = FlashMLA us / our us; "
        f"q padded to 64 or 128 heads for it): {peer_note}; err = largest relative error of an "
        "output row against ours"
    )
    print(dense.SPARSE_HEADER)
    records = []
    disagreements = []
    many_calls = jitted_calls(args.implementation)
    for cfg in configs:
        inputs = make_inputs(cfg, args.seed + cfg.b, args.repeats)
        metadata = schedule(cfg)
        us = time_op(
            many_calls,
            inputs,
            metadata,
            repeats=args.repeats,
            runs=args.runs,
            warmup_ms=args.warmup_ms,
        )
        peer = dense.flashmla_beside(
            measure_peer,
            cfg,
            inputs,
            many_calls,
            (inputs.qs[:1], inputs.cache, inputs.indices, *metadata),
            disagreements,
        )
        rec = record(main_kernel, cfg, us, peer, card, date)
        records.append(rec)
        dense.print_sparse_row(cfg.label, rec)
        del inputs, metadata
        dense.save_records(records, args.json)  # after every config
    return dense.finish(records, args.json, disagreements)


if __name__ == "__main__":
    sys.exit(main())
