"""Sparse MLA prefill benchmark: jax_flashmla's kernels side by side with FlashMLA.

Times `flash_mla_sparse_fwd` (DeepSeek Sparse Attention prefill: each query token attends the
`topk` tokens of a bf16 KV array an indexer selected), forward and backward (--directions), at
s_q = 4096, h_kv 1, d_v 512, with the
models of FlashMLA's sparse-prefill performance cases (d_qk, h_q, topk) and two of ours:
  v32          d_qk 576, h_q 128, topk 2048, s_kv in {8192, 16384, 32768, 65536, 131072}
  model1_h64   d_qk 512, h_q 64, topk 512, s_kv in {8192, 32768, 131072}
  model1_h128  d_qk 512, h_q 128, topk 1024, s_kv in {8192, 16384, 32768, 65536}
  heads        d_qk 576, topk 2048, s_kv 32768, h_q in {16, 32}
or the configurations given with --only D_QK,H_Q,TOPK,S_KV (repeatable; s_q 4096).

Inputs: kv ~ N(0, 1) / 10 in bf16, [s_kv, 1, d_qk]; q ~ N(0, 1) / 10 in bf16, [s_q, h_q, d_qk],
one per call; for each query token, `topk` distinct positions of [0, s_kv) in random order (an
indexer's order, not the array's), int32 [s_q, 1, topk]. sm_scale = d_qk ** -0.5. Every slot
selects a token (no -1, no topk_length, no attention sink).

Counting (docs/ops.md; the forward's bytes as FlashMLA's test script counts them, every index
valid):
  forward   FLOPs = s_q * h_q * topk * 2 * (d_qk + 512)
            bytes = s_q * topk * d_qk * 2 + s_q * h_q * (d_qk + 512) * 2
            (the selected kv rows in bf16, once per query token; q read and out written)
  backward  FLOPs = s_q * h_q * topk * (6 * d_qk + 4 * 512)
            bytes = s_q * topk * d_qk * (2 + 4) + s_q * h_q * (2 * d_qk + 2 * 512) * 2
            (the selected kv rows read in bf16 and added to dkv in float32, once per query
            token; q, out and d_out read and dq written in bf16)

Timing: the whole user-visible call, exactly as bench_decode.py: one jitted function of n
calls, each on its own q, all on the same kv and indices, returning every output; the median
over --runs timed runs for n = R and n = R / 4, and the time of one call is their difference
divided by the difference in n. The backward is timed the same way on the pullbacks of n
forward calls (jax.vjp, made before timing), each given its own cotangents of out and lse: the
whole backward call (XLA's folding of the sink and lse terms, the kernel, dkv rounded to bf16);
--deterministic times the bitwise repeatable gradient (dkv summed in 64-bit fixed point).
--implementation cuda (the default) or xla.

Peer (--peers; on by default where `flash_mla` can be imported, after `source
../shared/peers/setup_peers.sh` on the GPU machine): right after our op, FlashMLA's sparse
prefill runs in this process on the very same arrays (torch.from_dlpack of q, kv and the
indices), timed the same way (the n calls captured in one CUDA graph after one eager call;
replay + synchronize timed for n = R and R / 4). ratio = FlashMLA's time / ours (> 1: we are
faster). FlashMLA takes h_q 64 or 128 only: fewer heads run with q zero-padded to 64 heads, as
its users must (the padded q are made before timing, so the padding copy is not in FlashMLA's
time), and only the real heads are compared. Its Hopper kernel takes topk a multiple of 128: a
config it cannot take is reported and left without FlashMLA columns. FlashMLA's output for the
first q is checked against ours; a disagreement makes the script exit with status 1 (after
writing the JSON). FlashMLA has no backward: backward records have no FlashMLA columns.

Examples:
  source ../shared/peers/setup_peers.sh &&
    python3 -P benchmarks/bench_prefill_sparse.py --json benchmarks/results/h200/prefill_sparse.json
  python3 -P benchmarks/bench_prefill_sparse.py --only 576,128,2048,65536 --only 512,64,512,8192
  python3 -P benchmarks/bench_prefill_sparse.py --scale 64 --implementation xla   # CPU smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from jax_flashmla._src.geometry import HEAD_DIM_V, SPARSE_HEAD_DIMS_QK

#: The dense benchmark: its timing method, peer result and output comparison are shared, and
#: what both sparse benchmarks do with FlashMLA.
sys.path.insert(0, str(Path(__file__).parent))  # `python -P` leaves this folder off
import bench_decode as dense

PeerResult = dense.PeerResult

BYTES_PER_VALUE = 2  # bf16 q, kv and out
S_Q = 4096
#: Our kernel's topk granularity (docs/ops.md, kernel limits): blocks of 64 slots.
TOPK_MULTIPLE = 64
#: FlashMLA's Hopper sparse prefill takes topk a multiple of this (two blocks of 64 slots).
FLASHMLA_TOPK_MULTIPLE = 128
DIRECTIONS = ("fwd", "bwd")


@dataclasses.dataclass(frozen=True)
class Config:
    group: str  # "v32", "model1_h64", "model1_h128", "heads" or "only"
    d_qk: int
    h_q: int
    topk: int
    s_kv: int  # tokens of kv, the indices' range
    s_q: int = S_Q

    @property
    def label(self) -> str:
        return f"d{self.d_qk} h{self.h_q} topk{self.topk} s_q{self.s_q} s_kv{self.s_kv}"

    def scaled(self, scale: int) -> Config:
        """Smaller s_q, s_kv and topk (for smoke tests off the GPU): topk stays a positive
        multiple of 64, s_kv at least topk."""
        if scale == 1:
            return self
        topk = max(TOPK_MULTIPLE, self.topk // scale // TOPK_MULTIPLE * TOPK_MULTIPLE)
        return dataclasses.replace(
            self, s_q=max(1, self.s_q // scale), topk=topk, s_kv=max(topk, self.s_kv // scale)
        )


SHAPES = (
    [("v32", 576, 128, 2048, s_kv) for s_kv in (8192, 16384, 32768, 65536, 131072)]
    + [("model1_h64", 512, 64, 512, s_kv) for s_kv in (8192, 32768, 131072)]
    + [("model1_h128", 512, 128, 1024, s_kv) for s_kv in (8192, 16384, 32768, 65536)]
    + [("heads", 576, h_q, 2048, 32768) for h_q in (16, 32)]
)
CONFIGS = [Config(*shape) for shape in SHAPES]
GROUPS = ("v32", "model1_h64", "model1_h128", "heads")


@dataclasses.dataclass
class Inputs:
    """One configuration's arrays on the device."""

    qs: list  # `repeats` bfloat16 [s_q, h_q, d_qk], one per call
    kv: object  # bfloat16 [s_kv, 1, d_qk]
    indices: object  # int32 [s_q, 1, topk]


#: (config, inputs, our output for the first q) -> FlashMLA's result on the same inputs.
PeerMeasure = Callable[[Config, Inputs, object], PeerResult]


def flops(cfg: Config, direction: str = "fwd") -> float:
    if direction == "bwd":
        return cfg.s_q * cfg.h_q * cfg.topk * (6 * cfg.d_qk + 4 * HEAD_DIM_V)
    return cfg.s_q * cfg.h_q * cfg.topk * 2 * (cfg.d_qk + HEAD_DIM_V)


def bytes_moved(cfg: Config, direction: str = "fwd") -> float:
    if direction == "bwd":
        kv_rows = cfg.s_q * cfg.topk * cfg.d_qk * (BYTES_PER_VALUE + 4)  # read; dkv float32
        rows = cfg.s_q * cfg.h_q * (2 * cfg.d_qk + 2 * HEAD_DIM_V) * BYTES_PER_VALUE
        return kv_rows + rows
    kv_rows = cfg.s_q * cfg.topk * cfg.d_qk * BYTES_PER_VALUE
    q_and_out = cfg.s_q * cfg.h_q * (cfg.d_qk + HEAD_DIM_V) * BYTES_PER_VALUE
    return kv_rows + q_and_out


def softmax_scale(d_qk: int) -> float:
    """sm_scale of both sides: the usual 1 / sqrt(d_qk)."""
    return d_qk**-0.5


def flashmla_refusal(cfg: Config) -> str:
    """Why FlashMLA's sparse prefill cannot take this config ("" when it can, with q padded to
    dense.flashmla_heads(h_q) heads)."""
    if dense.flashmla_heads(cfg.h_q) is None:
        takes = dense.FLASHMLA_SPARSE_HEADS
        return f"it takes h_q {takes} (fewer heads padded); got {cfg.h_q}"
    if cfg.topk % FLASHMLA_TOPK_MULTIPLE:
        return (
            f"its Hopper kernel takes topk a positive multiple of {FLASHMLA_TOPK_MULTIPLE}; got "
            f"{cfg.topk}"
        )
    return ""


def draw_indices(cfg: Config, seed: int) -> np.ndarray:
    """int32 [s_q, 1, topk]: for each query token, `topk` distinct positions of [0, s_kv) in
    random order. One rng.choice per token: it draws from a set (Floyd's algorithm) or shuffles
    a tail, whichever is cheaper, so a token costs about topk, not s_kv, where s_kv is large
    (4096 tokens of topk 2048 from s_kv 131072 in a fraction of a second)."""
    rng = np.random.default_rng(seed)
    rows = [rng.choice(cfg.s_kv, cfg.topk, replace=False) for _ in range(cfg.s_q)]
    return np.stack(rows).astype(np.int32).reshape(cfg.s_q, 1, cfg.topk)


def make_inputs(cfg: Config, seed: int, repeats: int) -> Inputs:
    import jax
    import jax.numpy as jnp

    key_q, key_kv = jax.random.split(jax.random.key(seed))

    def normal_fn(shape):
        return jax.jit(lambda key: (jax.random.normal(key, shape) / 10).astype(jnp.bfloat16))

    q_fn = normal_fn((cfg.s_q, cfg.h_q, cfg.d_qk))
    inputs = Inputs(
        qs=[q_fn(jax.random.fold_in(key_q, i)) for i in range(repeats)],
        kv=normal_fn((cfg.s_kv, 1, cfg.d_qk))(key_kv),
        indices=jnp.asarray(draw_indices(cfg, seed)),
    )
    jax.block_until_ready((inputs.qs, inputs.kv, inputs.indices))
    return inputs


def op_call(implementation: str, deterministic: bool = False):
    """One call of our op: (q, kv, indices) -> (out, max_logits, lse)."""
    import jax_flashmla as fm

    def call(q, kv, indices):
        return fm.flash_mla_sparse_fwd(
            q,
            kv,
            indices,
            softmax_scale(q.shape[-1]),
            HEAD_DIM_V,
            implementation=implementation,
            deterministic=deterministic,
        )

    return call


def kernel_unavailable(cfg: Config, implementation: str) -> str:
    """Why the op cannot take this config with `implementation` ("" when it can)."""
    import jax
    import jax.numpy as jnp

    structs = (
        jax.ShapeDtypeStruct((cfg.s_q, cfg.h_q, cfg.d_qk), jnp.bfloat16),
        jax.ShapeDtypeStruct((cfg.s_kv, 1, cfg.d_qk), jnp.bfloat16),
        jax.ShapeDtypeStruct((cfg.s_q, 1, cfg.topk), jnp.int32),
    )
    return dense.refusal(op_call(implementation), structs)


def jitted_calls(implementation: str):
    """The timed function: one jitted program making one op call per q of a list, all on the
    same kv and indices, returning every output."""
    import jax

    call = op_call(implementation)

    @jax.jit
    def many_calls(qs, kv, indices):
        return [call(q, kv, indices) for q in qs]

    return many_calls


def backward_calls():
    """The timed backward: one jitted program applying n pullbacks of the op (each holding its
    forward's residuals) to their cotangents, returning every gradient."""
    import jax

    @jax.jit
    def many_backwards(pullbacks, cotangents):
        return [pullback(ct) for pullback, ct in zip(pullbacks, cotangents, strict=True)]

    return many_backwards


def time_backward(
    implementation: str,
    deterministic: bool,
    inputs: Inputs,
    *,
    repeats: int,
    runs: int,
    warmup_ms: float,
):
    """Median time of one backward call in microseconds: pullbacks of `repeats` forward calls,
    cotangents of out and lse ~ N(0, 1) (bf16, float32), bench_decode.py's method."""
    import jax
    import jax.numpy as jnp

    call = op_call(implementation, deterministic)
    pullbacks, cotangents = [], []
    key = jax.random.key(1)
    for i, q in enumerate(inputs.qs):
        (out, lse), pullback = jax.vjp(
            lambda q, kv: call(q, kv, inputs.indices)[0::2], q, inputs.kv
        )
        k_out, k_lse = jax.random.split(jax.random.fold_in(key, i))
        d_out = jax.random.normal(k_out, out.shape).astype(jnp.bfloat16)
        pullbacks.append(pullback)
        cotangents.append((d_out, jax.random.normal(k_lse, lse.shape)))
    return dense.jax_time_us(
        backward_calls(),
        lambda n: (pullbacks[:n], cotangents[:n]),
        repeats=repeats,
        runs=runs,
        warmup_ms=warmup_ms,
    )


def time_op(many_calls, inputs: Inputs, *, repeats: int, runs: int, warmup_ms: float) -> float:
    """Median time of one call of our op in microseconds (bench_decode.py's method)."""
    return dense.jax_time_us(
        many_calls,
        lambda n: (inputs.qs[:n], inputs.kv, inputs.indices),
        repeats=repeats,
        runs=runs,
        warmup_ms=warmup_ms,
    )


class FlashMLAPeer(dense.FlashMLASparsePeer):
    """Times FlashMLA's sparse prefill on our arrays: the q, kv and the indices. A config it
    cannot take is reported and gives a PeerResult without a time; so does one it fails on."""

    def refusal(self, cfg: Config) -> str:
        return flashmla_refusal(cfg)

    def measure(self, cfg: Config, inputs: Inputs, ours: np.ndarray) -> PeerResult:
        import torch

        qs = self.padded(inputs.qs, cfg.h_q)
        kv = torch.from_dlpack(inputs.kv)
        indices = torch.from_dlpack(inputs.indices)
        sm_scale = softmax_scale(cfg.d_qk)

        def call(q):
            out, _, _ = self.flash_mla.flash_mla_sparse_fwd(q, kv, indices, sm_scale, HEAD_DIM_V)
            return out

        return self.timed(qs, call, cfg.h_q, ours)


def record(
    kernel: str,
    cfg: Config,
    direction: str,
    deterministic: bool,
    us: float,
    peer: PeerResult,
    card: str,
    date: str,
) -> dict:
    return {
        "kernel": kernel,
        "direction": direction,
        "deterministic": deterministic,
        "s_q": cfg.s_q,
        "s_kv": cfg.s_kv,
        "h_q": cfg.h_q,
        "h_kv": 1,
        "topk": cfg.topk,
        "d_qk": cfg.d_qk,
        "d_v": HEAD_DIM_V,
        "dtype": "bfloat16",
        **dense.flashmla_fields(
            us, flops(cfg, direction), bytes_moved(cfg, direction), peer, cfg.h_q
        ),
        "card": card,
        "date": date,
    }


def select_configs(groups: str) -> list[Config]:
    return dense.in_groups(CONFIGS, groups, GROUPS)


def parse_only(spec: str) -> Config:
    """--only D_QK,H_Q,TOPK,S_KV (s_q 4096), e.g. 576,128,2048,65536."""
    try:
        d_qk, h_q, topk, s_kv = (int(field) for field in spec.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--only wants D_QK,H_Q,TOPK,S_KV as four integers, got {spec!r}"
        ) from None
    if d_qk not in SPARSE_HEAD_DIMS_QK:
        want = " or ".join(str(d) for d in SPARSE_HEAD_DIMS_QK)
        raise argparse.ArgumentTypeError(f"--only wants D_QK {want}, got {spec!r}")
    if h_q < 1 or topk < 1 or topk % TOPK_MULTIPLE or s_kv < topk:
        raise argparse.ArgumentTypeError(
            f"--only wants H_Q >= 1, TOPK a positive multiple of {TOPK_MULTIPLE} and S_KV >= "
            f"TOPK, got {spec!r}"
        )
    return Config("only", d_qk, h_q, topk, s_kv)


def parse_directions(spec: str) -> tuple[str, ...]:
    """--directions fwd,bwd (either or both)."""
    chosen = tuple(dict.fromkeys(d.strip() for d in spec.split(",")))
    if not chosen or any(d not in DIRECTIONS for d in chosen):
        raise argparse.ArgumentTypeError(
            f"--directions wants a comma-separated subset of {','.join(DIRECTIONS)}, got {spec!r}"
        )
    return chosen


def parse_args(argv=None) -> argparse.Namespace:
    parser = dense.parser_with_configs(__doc__, GROUPS)
    dense.only_argument(parser, parse_only, "D_QK,H_Q,TOPK,S_KV", f"s_q {S_Q}")
    parser.add_argument(
        "--directions",
        type=parse_directions,
        default=DIRECTIONS,
        metavar="fwd,bwd",
        help="the forward, the backward or both (default)",
    )
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="time the bitwise repeatable gradient (dkv in 64-bit fixed point)",
    )
    return dense.sparse_args(parser, argv, "divide s_q, s_kv and topk (smoke tests)")


def main(argv=None, measure_peer: PeerMeasure | None = None) -> int:
    """Run the benchmark; `measure_peer` replaces FlashMLA (tests)."""
    args = parse_args(argv)
    want_peer = dense.peers_wanted(args, measure_peer, ("flash_mla",))

    configs = args.only or select_configs(args.configs)
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
    inputs_note = f"bf16 q and kv, h_kv 1, d_v {HEAD_DIM_V}"
    print(dense.header_line(device, date, inputs_note, main_kernel, args))
    print(
        f"# FlashMLA side by side (same process, same arrays; ratio = FlashMLA us / our us; "
        f"q padded to 64 heads for it, topk a multiple of {FLASHMLA_TOPK_MULTIPLE}): "
        f"{peer_note}; err = largest relative error of an output row against ours; "
        f"directions {','.join(args.directions)}"
    )
    print(dense.SPARSE_HEADER)
    records = []
    disagreements = []
    many_calls = jitted_calls(args.implementation)
    timing = {"repeats": args.repeats, "runs": args.runs, "warmup_ms": args.warmup_ms}
    for cfg in configs:
        inputs = make_inputs(cfg, args.seed, args.repeats)
        if "fwd" in args.directions:
            us = time_op(many_calls, inputs, **timing)
            peer = dense.flashmla_beside(
                measure_peer,
                cfg,
                inputs,
                many_calls,
                (inputs.qs[:1], inputs.kv, inputs.indices),
                disagreements,
            )
            records.append(record(main_kernel, cfg, "fwd", False, us, peer, card, date))
            dense.print_sparse_row(f"{cfg.label} fwd", records[-1])
        if "bwd" in args.directions:
            us = time_backward(args.implementation, args.deterministic, inputs, **timing)
            bwd = record(main_kernel, cfg, "bwd", args.deterministic, us, PeerResult(), card, date)
            records.append(bwd)
            dense.print_sparse_row(f"{cfg.label} bwd", records[-1])
        del inputs
        dense.save_records(records, args.json)  # after every config
    return dense.finish(records, args.json, disagreements)


if __name__ == "__main__":
    sys.exit(main())
