"""Dense MLA decode benchmark: jax_flashmla's kernel side by side with FlashMLA and FA3's MLA mode.

Runs the dense-decode configurations of docs/performance.md (h_kv = 1, page 64 but in the pages
group, varlen lengths ~ max(N(s_k, s_k / 2), s_q), random block table, bf16 by default):
  compute   b = 128, h_q = 128, s_q in {1, 2}, causal or not, mean s_k in {4096, 8192, 16384,
            32768}
  short     b = 128, h_q = 128, s_q = 1, s_k in {512, 1024, 2048}
  bandwidth b = 128, h_q = 16, s_q = 1, s_k in {1024, 4096, 16384}
  small     b in {1, 2, 4, 8, 16, 32}, h_q = 128, s_q = 1, s_k in {1024, 4096, 16384, 65536}
  pages     b = 128, s_q = 1, s_k = 16384, h_q = 128 (compute-bound) and 16 (bandwidth-bound)
            at pages 1, 2, 16, 32, 53, 64, 128 and 256 (the peers run at page 64 only, the only
            page FlashMLA takes: compare the other pages with our page 64)
or the configurations given with --only b,s_q,h_q,s_k,causal[,page] (repeatable).

Counting (docs/ops.md), with mean_s_k the actual mean of the drawn lengths:
  FLOPs = b * s_q * h_q * mean_s_k * 2 * (d_qk + d_v)
  bytes = b * (s_q * h_q * d_qk * 2 + mean_s_k * h_kv * d_qk * 2 + s_q * h_q * d_v * 2)

Timing: the whole user-visible call (main kernel + combine). The metadata is computed once,
outside, and passed in, as FlashMLA's users do. A jitted function makes n independent calls of
the op (each on its own q, all on the same cache, so XLA cannot merge them as common
subexpressions) and returns every output, so nothing is eliminated. After warm-up, the median
over --runs timed runs (time.perf_counter around the call and block_until_ready) is taken for
n = R and n = R / 4; the time of one call is their difference divided by the difference in n,
which removes the Python dispatch, the launch of the first kernel and the final
synchronisation (they are the same in both). Should noise make the difference non-positive
(tiny smoke-test sizes), the time of R calls divided by R is reported instead.

Peers (--peers; on by default where `flash_mla` or `fa3_mla` can be imported, i.e. after
`source ../shared/peers/setup_peers.sh` on the GPU machine): right after our op, FlashMLA's
dense decode and FlashAttention-3's MLA mode run in this process on the very same arrays
(shared with torch through DLPack, no copy), timed the same way: the n calls, each on its own
q, captured in one CUDA graph after one eager call (FlashMLA builds its schedule on its first
call), graph replay + synchronize timed for n = R and n = R / 4. ratio = FlashMLA's time / ours
and fa3_ratio = FA3's time / ours (> 1: we are faster); these side-by-side ratios are the only
comparison the benchmark makes. Each peer's output for the first q is checked against ours;
a peer that disagrees makes the script exit with status 1 (after writing the JSON).

Examples:
  source ../shared/peers/setup_peers.sh &&
    python3 -P benchmarks/bench_decode.py --json benchmarks/results/h200/decode_dense.json
  python3 -P benchmarks/bench_decode.py --only 128,1,128,4096,0 --only 128,2,128,8192,1 --skip-xla
  python3 -P benchmarks/bench_decode.py --scale 64 --implementation xla   # CPU smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable

import numpy as np

from jax_flashmla._src.geometry import DEFAULT_PAGE_SIZE, HEAD_DIM_QK, HEAD_DIM_V

BYTES_PER_VALUE = 2  # bf16 and fp16

#: The peers: record prefix -> the module setup_peers.sh makes importable.
PEER_MODULES = {"flashmla": "flash_mla", "fa3": "fa3_mla"}
#: Largest relative error of a peer's output row accepted (||theirs - ours|| / ||ours|| over the
#: 512 dims of one (request, query, head)). Rounding either bf16 output costs ~0.4% of a row; a
#: wrong comparison (other inputs, other masking, garbage) is off by a whole row.
AGREEMENT = 2e-2


@dataclasses.dataclass(frozen=True)
class Config:
    group: str  # "compute", "short", "bandwidth", "small" or "only"
    b: int
    s_q: int
    h_q: int
    h_kv: int
    s_k: int  # nominal mean length
    causal: bool
    page: int = DEFAULT_PAGE_SIZE

    @property
    def label(self) -> str:
        causal = " causal" if self.causal else ""
        page = "" if self.page == DEFAULT_PAGE_SIZE else f" page{self.page}"
        return f"b{self.b} s_q{self.s_q} h{self.h_q}/{self.h_kv} s_k{self.s_k}{causal}{page}"

    def scaled(self, scale: int) -> Config:
        """Smaller b and s_k (for smoke tests off the GPU)."""
        if scale == 1:
            return self
        return dataclasses.replace(self, b=max(1, self.b // scale), s_k=max(1, self.s_k // scale))


CONFIGS = (
    [
        Config("compute", 128, s_q, 128, 1, s_k, causal)
        for s_q in (1, 2)
        for causal in (False, True)
        for s_k in (4096, 8192, 16384, 32768)
    ]
    + [Config("short", 128, 1, 128, 1, s_k, False) for s_k in (512, 1024, 2048)]
    + [Config("bandwidth", 128, 1, 16, 1, s_k, False) for s_k in (1024, 4096, 16384)]
    # Latency-bound serving: a few requests at a time, often with long contexts; the schedule
    # must spread them over every SM.
    + [
        Config("small", b, 1, 128, 1, s_k, False)
        for b in (1, 2, 4, 8, 16, 32)
        for s_k in (1024, 4096, 16384, 65536)
    ]
    + [
        Config("pages", 128, 1, h_q, 1, 16384, False, page=page)
        for h_q in (128, 16)
        for page in (1, 2, 16, 32, 53, 64, 128, 256)
    ]
)
GROUPS = ("compute", "short", "bandwidth", "small", "pages")


@dataclasses.dataclass
class PeerResult:
    """One peer on one config: its time per call and how far its output is from ours."""

    us: float | None = None  # None: the peer did not run
    max_abs_diff: float | None = None
    rel_err: float | None = None

    @property
    def disagrees(self) -> bool:
        # NaN compares false, so a NaN error disagrees too.
        return self.rel_err is not None and not self.rel_err <= AGREEMENT


#: (config, inputs as make_inputs returns them, our output for the first q) -> peer -> result.
PeerMeasure = Callable[[Config, tuple, object], dict[str, PeerResult]]


def flops(b: int, s_q: int, h_q: int, mean_s_k: float) -> float:
    return b * s_q * h_q * mean_s_k * 2 * (HEAD_DIM_QK + HEAD_DIM_V)


def bytes_moved(b: int, s_q: int, h_q: int, h_kv: int, mean_s_k: float) -> float:
    per_request = s_q * h_q * HEAD_DIM_QK + mean_s_k * h_kv * HEAD_DIM_QK + s_q * h_q * HEAD_DIM_V
    return b * per_request * BYTES_PER_VALUE


def draw_lengths(cfg: Config, seed: int) -> np.ndarray:
    """int32 [b]: max(N(s_k, s_k / 2), s_q). The same standard normals for every config of one
    batch size, so the s_q / causal variants of a length see identical requests."""
    z = np.random.default_rng(seed).standard_normal(cfg.b)
    return np.maximum(cfg.s_k + cfg.s_k / 2 * z, cfg.s_q).astype(np.int32)


def make_inputs(cfg: Config, dtype, seed: int, repeats: int):
    """(list of `repeats` q, k_cache, block_table, cache_seqlens, lengths) on the device.

    As FlashMLA's benchmark: each request owns ceil(max_len / page) blocks of a randomly permuted
    pool of b * that many blocks; values ~ N(0, 1) / 10.
    """
    import jax
    import jax.numpy as jnp

    page = cfg.page
    lengths = draw_lengths(cfg, seed)
    max_blocks = max(1, -(-int(lengths.max()) // page))
    rng = np.random.default_rng(seed + 1)
    block_table = rng.permutation(cfg.b * max_blocks).reshape(cfg.b, max_blocks)
    key_q, key_k = jax.random.split(jax.random.key(seed))

    @jax.jit
    def cache_fn(key):
        # Block by block, so that a 10 GB cache needs no 40 GB of random-bit intermediates.
        def one_block(index):
            shape = (page, cfg.h_kv, HEAD_DIM_QK)
            return (jax.random.normal(jax.random.fold_in(key, index), shape) / 10).astype(dtype)

        num_blocks = cfg.b * max_blocks
        step = max(1, min(num_blocks, (1 << 24) // (page * cfg.h_kv * HEAD_DIM_QK)))
        return jax.lax.map(one_block, jnp.arange(num_blocks), batch_size=step)

    shape = (cfg.b, cfg.s_q, cfg.h_q, HEAD_DIM_QK)
    q_fn = jax.jit(lambda key: (jax.random.normal(key, shape) / 10).astype(dtype))
    qs = [q_fn(jax.random.fold_in(key_q, i)) for i in range(repeats)]
    k_cache = cache_fn(key_k)
    args = (k_cache, jnp.asarray(block_table, jnp.int32), jnp.asarray(lengths, jnp.int32))
    jax.block_until_ready((qs, args))
    return qs, *args, lengths


def kernel_unavailable(cfg: Config, dtype, implementation: str) -> str:
    """Why the op cannot take this config with `implementation` ("" when it can)."""
    import jax

    import jax_flashmla as fm

    structs = (
        jax.ShapeDtypeStruct((cfg.b, cfg.s_q, cfg.h_q, HEAD_DIM_QK), dtype),
        jax.ShapeDtypeStruct((cfg.b, cfg.page, cfg.h_kv, HEAD_DIM_QK), dtype),
        jax.ShapeDtypeStruct((cfg.b, 1), np.int32),
        jax.ShapeDtypeStruct((cfg.b,), np.int32),
    )

    def call(q, k_cache, block_table, seqlens):
        return fm.flash_mla_with_kvcache(
            q,
            k_cache,
            block_table,
            seqlens,
            HEAD_DIM_V,
            causal=cfg.causal,
            implementation=implementation,
        )

    return refusal(call, structs)


def refusal(call: Callable, structs: tuple) -> str:
    """Why the op in `call` refuses arguments of these shapes and dtypes ("" when it takes
    them): its own ValueError, found by tracing, before any input is made."""
    import jax

    try:
        jax.eval_shape(call, *structs)
    except ValueError as error:
        return str(error)
    return ""


def jitted_calls(cfg: Config, implementation: str):
    """The timed function: one jitted program making one op call per q of a list, all on the
    same cache and metadata, returning every output."""
    import jax

    import jax_flashmla as fm

    @jax.jit
    def many_calls(qs, k_cache, block_table, seqlens, tile_metadata, num_splits):
        return [
            fm.flash_mla_with_kvcache(
                q,
                k_cache,
                block_table,
                seqlens,
                HEAD_DIM_V,
                tile_metadata,
                num_splits,
                causal=cfg.causal,
                implementation=implementation,
            )
            for q in qs
        ]

    return many_calls


def differential_us(median_time: Callable[[int], float], repeats: int) -> float:
    """Time of one call in microseconds from `median_time(n)`, the median seconds of n
    back-to-back calls: (time of R calls - time of R / 4) / (R - R / 4)."""
    many = median_time(repeats)
    few = max(1, repeats // 4)
    if few == repeats:
        return many / repeats * 1e6
    per_call = (many - median_time(few)) / (repeats - few)
    # Noise larger than the calls themselves (tiny smoke-test sizes) can make the difference
    # non-positive: fall back to the plain mean, which overstates the time a little.
    return (per_call if per_call > 0 else many / repeats) * 1e6


def warm_up(run_once: Callable[[], object], warmup_ms: float) -> None:
    """Untimed runs for at least `warmup_ms` (at least one): a GPU coming out of idle, or out
    of another library's work, takes milliseconds to reach its steady clocks."""
    end = time.perf_counter() + warmup_ms / 1e3
    run_once()
    while time.perf_counter() < end:
        run_once()


def jax_time_us(
    many_calls: Callable,
    args_of: Callable[[int], tuple],
    *,
    repeats: int,
    runs: int,
    warmup_ms: float,
) -> float:
    """Time of one call of a jitted function of n back-to-back calls, `many_calls(*args_of(n))`,
    in microseconds: the median over `runs` for n = R and n = R / 4, differenced."""
    import jax

    def median_time(n: int) -> float:
        args = args_of(n)
        warm_up(lambda: jax.block_until_ready(many_calls(*args)), warmup_ms)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            outs = many_calls(*args)
            jax.block_until_ready(outs)
            times.append(time.perf_counter() - start)
            del outs
        return statistics.median(times)

    return differential_us(median_time, repeats)


def graph_time_us(calls: list, *, repeats: int, runs: int, warmup_ms: float) -> float:
    """The same for a torch peer: calls[:n] captured in one CUDA graph, replay + synchronize
    timed."""
    import torch

    def median_time(n: int) -> float:
        graph = torch.cuda.CUDAGraph()
        # thread_local: JAX's own threads may touch CUDA while this thread captures.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outs = [call() for call in calls[:n]]

        def replay() -> None:
            graph.replay()
            torch.cuda.synchronize()

        warm_up(replay, warmup_ms)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            replay()
            times.append(time.perf_counter() - start)
        del outs
        return statistics.median(times)

    return differential_us(median_time, repeats)


def time_op(
    cfg: Config,
    implementation: str,
    inputs,
    metadata,
    *,
    repeats: int,
    runs: int,
    warmup_ms: float,
) -> float:
    """Median time of one call of our op in microseconds (see the module docstring)."""
    qs, k_cache, block_table, seqlens, _ = inputs
    return jax_time_us(
        jitted_calls(cfg, implementation),
        lambda n: (qs[:n], k_cache, block_table, seqlens, *metadata),
        repeats=repeats,
        runs=runs,
        warmup_ms=warmup_ms,
    )


def note_disagreement(disagreements: list[str], name: str, label: str, result) -> None:
    """Records and reports a peer whose output is not ours (their ratio compares other work)."""
    if not result.disagrees:
        return
    disagreements.append(f"{label}: {name} rel_err {result.rel_err:.3g}")
    print(
        f"# peer {name} DISAGREES with ours on {label}: largest row error "
        f"{result.rel_err:.3g} (limit {AGREEMENT}), max abs diff {result.max_abs_diff:.3g}",
        file=sys.stderr,
    )


def save_records(records: list[dict], path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(records, f, indent=1)
            f.write("\n")


def finish(records: list[dict], path: str | None, disagreements: list[str]) -> int:
    """The run's last words and exit status: 1 when a peer disagreed with us."""
    if path:
        print(f"# wrote {len(records)} records to {path}")
    if disagreements:
        print(
            f"# {len(disagreements)} peer outputs disagree with ours; their ratios compare "
            "different work: " + "; ".join(disagreements),
            file=sys.stderr,
        )
        return 1
    return 0


def agreement(theirs: np.ndarray, ours: np.ndarray) -> tuple[float, float]:
    """(max |theirs - ours|, largest relative error of an output row): rows are the last axis
    (the 512 output dims of one request, query and head), compared in float32."""
    theirs = np.asarray(theirs, np.float32)
    ours = np.asarray(ours, np.float32)
    if theirs.shape != ours.shape:
        raise ValueError(f"peer output shape {theirs.shape} differs from ours {ours.shape}")
    diff = theirs - ours
    row_err = np.linalg.norm(diff, axis=-1) / np.maximum(np.linalg.norm(ours, axis=-1), 1e-30)
    return float(np.abs(diff).max()), float(row_err.max())


def report_failure(name: str, label: str, error: Exception, reported: set[str]) -> None:
    """A peer's failure on one config: one line each time, the whole story once per peer (the
    names in `reported`)."""
    first_line = (str(error).strip().splitlines() or [""])[0]
    print(
        f"# peer {name} failed on {label}: {type(error).__name__}: {first_line}",
        file=sys.stderr,
    )
    if name not in reported:
        reported.add(name)
        traceback.print_exception(error, file=sys.stderr)


def flashmla_calls(flash_mla, cfg: Config, qs, k_cache, block_table, seqlens) -> list:
    """One FlashMLA dense decode call per q, sharing one schedule (built on the first call)."""
    # At 9241ae3 get_mla_metadata ignores its arguments and returns (empty schedule, None);
    # older FlashMLA computes (metadata, num_splits) from them. Both pass on positionally.
    schedule, num_splits = flash_mla.get_mla_metadata(
        seqlens, cfg.s_q * cfg.h_q // cfg.h_kv, cfg.h_kv
    )

    def call_on(q):
        def call():
            out, _ = flash_mla.flash_mla_with_kvcache(
                q,
                k_cache,
                block_table,
                seqlens,
                HEAD_DIM_V,
                schedule,
                num_splits,
                causal=cfg.causal,
            )
            return out

        return call

    return [call_on(q) for q in qs]


def fa3_calls(fa3_mla, cfg: Config, qs, k_cache, block_table, seqlens) -> list:
    """One FA3 MLA-mode call per q (each prepared once: its scheduler metadata and output)."""
    return [fa3_mla.dense_decode(q, k_cache, block_table, seqlens, causal=cfg.causal) for q in qs]


PEER_CALLS = {"flashmla": flashmla_calls, "fa3": fa3_calls}


class TorchPeers:
    """Times the peers on our own arrays, shared with torch through DLPack, the way time_op
    times our op. A peer that cannot be imported is reported once and skipped; a peer that fails
    on one config is reported and gives None there."""

    def __init__(self, *, repeats: int, runs: int, warmup_ms: float, dtype_name: str):
        self.repeats, self.runs, self.warmup_ms = repeats, runs, warmup_ms
        self.modules: dict[str, object] = {}
        self.reported: set[str] = set()
        for name, module_name in PEER_MODULES.items():
            if name == "fa3" and dtype_name != "bfloat16":
                print(f"# peer {name}: skipped, its build here is bfloat16 only", file=sys.stderr)
                continue
            try:
                self.modules[name] = importlib.import_module(module_name)
            except Exception as error:  # a missing build, torch or CUDA library
                print(f"# peer {name}: cannot import {module_name}: {error!r}", file=sys.stderr)

    @property
    def names(self) -> list[str]:
        return list(self.modules)

    def __call__(self, cfg: Config, inputs, our_out) -> dict[str, PeerResult]:
        results = {name: PeerResult() for name in PEER_MODULES}
        if not self.modules:
            return results
        import torch

        qs, k_cache, block_table, seqlens, _ = inputs
        try:
            shared = (
                [torch.from_dlpack(q) for q in qs[: self.repeats]],
                torch.from_dlpack(k_cache),
                torch.from_dlpack(block_table),
                torch.from_dlpack(seqlens),
            )
            ours = np.asarray(our_out, np.float32)
        except Exception as error:
            report_failure("all peers", cfg.label, error, self.reported)
            return results
        for name, module in self.modules.items():
            try:
                with torch.inference_mode():
                    results[name] = self.measure(name, module, cfg, shared, ours)
            except Exception as error:
                report_failure(name, cfg.label, error, self.reported)
            torch.cuda.empty_cache()
        return results

    def measure(self, name: str, module, cfg: Config, shared, ours: np.ndarray) -> PeerResult:
        import torch

        calls = PEER_CALLS[name](module, cfg, *shared)
        first = calls[0]()  # eager: FlashMLA builds its schedule on its first call
        torch.cuda.synchronize()
        max_abs_diff, rel_err = agreement(first.float().cpu().numpy(), ours)
        del first

        return PeerResult(
            graph_time_us(calls, repeats=self.repeats, runs=self.runs, warmup_ms=self.warmup_ms),
            max_abs_diff,
            rel_err,
        )


def significant(value: float | None) -> float | None:
    """`value` to three significant digits: the records' errors."""
    return None if value is None else float(f"{value:.3g}")


def peer_fields(us: float, peers: dict[str, PeerResult]) -> dict:
    """The record's side-by-side fields for a kernel that took `us` per call."""
    flashmla = peers.get("flashmla") or PeerResult()
    fa3 = peers.get("fa3") or PeerResult()

    def ratio(result: PeerResult) -> float | None:
        return None if result.us is None else round(result.us / us, 3)

    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 2)

    return {
        "flashmla_us": rounded(flashmla.us),
        "ratio": ratio(flashmla),
        "peer_max_abs_diff": significant(flashmla.max_abs_diff),
        "peer_rel_err": significant(flashmla.rel_err),
        "fa3_us": rounded(fa3.us),
        "fa3_ratio": ratio(fa3),
        "fa3_max_abs_diff": significant(fa3.max_abs_diff),
        "fa3_rel_err": significant(fa3.rel_err),
        "side_by_side": flashmla.us is not None or fa3.us is not None,
    }


def record(
    kernel: str,
    cfg: Config,
    dtype_name: str,
    us: float,
    mean_s_k: float,
    peers: dict[str, PeerResult],
    card: str,
    date: str,
) -> dict:
    tflops = flops(cfg.b, cfg.s_q, cfg.h_q, mean_s_k) / (us * 1e6)
    gbps = bytes_moved(cfg.b, cfg.s_q, cfg.h_q, cfg.h_kv, mean_s_k) / (us * 1e3)
    return {
        "kernel": kernel,
        "b": cfg.b,
        "s_q": cfg.s_q,
        "h_q": cfg.h_q,
        "h_kv": cfg.h_kv,
        "s_k": cfg.s_k,
        "page": cfg.page,
        "mean_s_k": round(mean_s_k, 1),
        "causal": cfg.causal,
        "varlen": True,
        "dtype": dtype_name,
        "us": round(us, 2),
        "tflops": round(tflops, 2),
        "gbps": round(gbps, 1),
        **peer_fields(us, peers),
        "card": card,
        "date": date,
    }


def fmt(value, spec: str) -> str:
    """`value` formatted with `spec` (e.g. ">9.1f"), or a dash of the same width."""
    width = int("".join(ch for ch in spec.split(".")[0] if ch.isdigit()) or 0)
    return "-".rjust(width) if value is None else format(value, spec)


HEADER = (
    f"{'config':<46} {'us':>9} {'TFLOPS':>7} {'GB/s':>8} {'FlashMLA':>9} {'ratio':>6} "
    f"{'FA3 us':>9} {'ratio':>6} {'FM err':>8} {'FA3 err':>8}"
)


def print_row(cfg_label: str, main: dict, xla: dict | None) -> None:
    xla_columns = ""
    if xla is not None:
        xla_columns = f" {xla['us']:>10.1f} {xla['us'] / main['us']:>7.2f}"
    print(
        f"{cfg_label:<46} {main['us']:>9.1f} {main['tflops']:>7.1f} {main['gbps']:>8.1f} "
        f"{fmt(main['flashmla_us'], '>9.1f')} {fmt(main['ratio'], '>6.3f')} "
        f"{fmt(main['fa3_us'], '>9.1f')} {fmt(main['fa3_ratio'], '>6.3f')} "
        f"{fmt(main['peer_rel_err'], '>8.1e')} {fmt(main['fa3_rel_err'], '>8.1e')}{xla_columns}",
        flush=True,
    )


def in_groups(configs: list, spec: str, groups: tuple[str, ...]) -> list:
    """The configs of the --configs groups named in `spec`, a comma list ("all": every group);
    an unknown name ends the run."""
    names = {name.strip() for name in spec.split(",") if name.strip()}
    unknown = names - {"all", *groups}
    if unknown:
        raise SystemExit(f"unknown --configs {sorted(unknown)}; use all or {', '.join(groups)}")
    return [c for c in configs if "all" in names or c.group in names]


def select_configs(spec: str) -> list[Config]:
    return in_groups(CONFIGS, spec, GROUPS)


def parse_only(spec: str) -> Config:
    """--only b,s_q,h_q,s_k,causal[,page] (h_kv 1, page 64 by default), e.g. 128,1,128,4096,0."""
    try:
        fields = [int(field) for field in spec.split(",")]
        if len(fields) not in (5, 6):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--only wants b,s_q,h_q,s_k,causal[,page] as five or six integers, got {spec!r}"
        ) from None
    b, s_q, h_q, s_k, causal, page = [*fields, DEFAULT_PAGE_SIZE][:6]
    if min(b, s_q, h_q, s_k, page) < 1 or causal not in (0, 1):
        raise argparse.ArgumentTypeError(
            f"--only wants b, s_q, h_q, s_k, page >= 1 and causal 0 or 1, got {spec!r}"
        )
    return Config("only", b, s_q, h_q, 1, s_k, bool(causal), page=page)


def timing_arguments(parser: argparse.ArgumentParser, peers: str) -> None:
    """The options of the timing and of the `peers` beside ours, the same in every benchmark."""
    parser.add_argument("--repeats", type=int, default=20, help="op calls per jitted function (R)")
    parser.add_argument("--runs", type=int, default=30, help="timed runs (median)")
    parser.add_argument(
        "--warmup-ms",
        type=float,
        default=200.0,
        help="untimed calls for at least this long before each timed series (at least one)",
    )
    parser.add_argument(
        "--peers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"time {peers} side by side (default: when importable)",
    )


def parser_with_configs(doc: str, groups: tuple[str, ...]) -> argparse.ArgumentParser:
    """A benchmark's parser, described by the first paragraph of its `doc`, with --configs."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument(
        "--configs", default="all", help="all, or a comma list of " + ", ".join(groups)
    )
    return parser


def only_argument(parser, parse_only: Callable, metavar: str, fixed: str) -> None:
    """--only, a configuration (`fixed` saying what it leaves out) run instead of --configs."""
    parser.add_argument(
        "--only",
        type=parse_only,
        action="append",
        metavar=metavar,
        help=f"run this configuration ({fixed}) instead of --configs; repeatable",
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = parser_with_configs(__doc__, GROUPS)
    only_argument(parser, parse_only, "B,S_Q,H_Q,S_K,CAUSAL[,PAGE]", "h_kv 1")
    parser.add_argument("--implementation", choices=("cuda", "xla"), default="cuda")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    timing_arguments(parser, "FlashMLA and FA3's MLA mode")
    parser.add_argument("--skip-xla", action="store_true", help="do not time the XLA reference")
    parser.add_argument("--xla-repeats", type=int, default=1)
    parser.add_argument("--xla-runs", type=int, default=5)
    parser.add_argument("--scale", type=int, default=1, help="divide b and s_k (smoke tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.runs < 1 or args.xla_repeats < 1 or args.xla_runs < 1:
        parser.error("--repeats, --runs, --xla-repeats and --xla-runs must be >= 1")
    if args.scale < 1:
        parser.error("--scale must be >= 1")
    return args


def peers_wanted(args: argparse.Namespace, measure: Callable | None, modules: tuple) -> bool:
    """Whether peers run: always with a given `measure` (tests), else as --peers / --no-peers
    say, by default when one of `modules` can be imported. Call it before JAX makes its GPU
    client, which reads the setting made here for real peers."""
    if measure is not None:
        return True
    importable = any(importlib.util.find_spec(module) is not None for module in modules)
    want = args.peers if args.peers is not None else importable
    if want:
        # Read when JAX creates its GPU client: leave the memory JAX does not use to torch.
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return want


def chosen_peers(
    args: argparse.Namespace,
    want: bool,
    measure: Callable | None,
    device,
    modules: tuple,
    build: Callable[[], tuple[Callable | None, str]],
) -> tuple[Callable | None, str]:
    """(what measures the peers, None when none runs; the header's note on them). A given
    `measure` runs as it is; real peers, on a GPU only, come from `build()`, which returns the
    same pair."""
    if measure is not None:
        return measure, "on"
    if not want:
        if args.peers is False:
            return None, "off (--no-peers)"
        missing = " / ".join(modules)
        return None, f"off ({missing} not importable: source ../shared/peers/setup_peers.sh)"
    if device.platform != "gpu":
        return None, f"off (JAX runs on {device.platform}, not a GPU)"
    return build()


def kernel_name(implementation: str) -> str:
    """The records' "kernel" of what --implementation times."""
    return "jax_flashmla" if implementation == "cuda" else "xla_reference"


def cannot_run(implementation: str, configs: list, unavailable: Callable[[object], str]) -> bool:
    """Whether the op cannot take the first config with `implementation` (`unavailable(cfg)`
    says why, "" when it can); the reason goes to stderr and the run ends before timing."""
    reason = unavailable(configs[0]) if configs else ""
    if reason:
        print(f"cannot benchmark implementation={implementation!r}: {reason}", file=sys.stderr)
    return bool(reason)


def where_and_when() -> tuple:
    """(JAX's first device, its card name, today's date): whence the records' card and date."""
    import jax

    device = jax.devices()[0]
    return device, device.device_kind, datetime.date.today().isoformat()


def header_line(device, date: str, inputs: str, main_kernel: str, args) -> str:
    """The first line of a benchmark's output: versions, card, date, `inputs`, what is timed
    and how."""
    import jax

    return (
        f"# jax {jax.__version__}, {device.device_kind} ({device.platform}), {date}, {inputs}, "
        f"main = {main_kernel}, R = {args.repeats} (time of R calls - time of R/4, per call), "
        f"median of {args.runs} runs" + ("" if args.scale == 1 else f", scale 1/{args.scale}")
    )


def torch_peers(args: argparse.Namespace) -> tuple[TorchPeers, str]:
    """The torch peers and the header's note on which of them were imported."""
    peers = TorchPeers(
        repeats=args.repeats, runs=args.runs, warmup_ms=args.warmup_ms, dtype_name=args.dtype
    )
    return peers, ", ".join(peers.names) or "none importable"


# The sparse benchmarks (bench_decode_sparse.py, bench_prefill_sparse.py): FlashMLA is their
# only peer, timed and recorded the same way in both.

#: Query head counts FlashMLA's sparse kernels take; fewer heads run zero-padded to the next.
FLASHMLA_SPARSE_HEADS = (64, 128)


def flashmla_heads(h_q: int) -> int | None:
    """The head count FlashMLA's sparse kernels run `h_q` heads with (None: they cannot)."""
    return next((heads for heads in FLASHMLA_SPARSE_HEADS if h_q <= heads), None)


def padded_heads(q, heads: int):
    """q [..., h_q, d] with zero heads appended up to `heads` (FlashMLA's head counts)."""
    import jax.numpy as jnp

    widths = [(0, 0)] * q.ndim
    widths[-2] = (0, heads - q.shape[-2])
    return jnp.pad(q, widths)


class FlashMLASparsePeer:
    """Times one of FlashMLA's sparse kernels (commit 9241ae3) on our arrays, shared with torch
    through DLPack, the way our op is timed; a subclass's measure(cfg, inputs, ours) makes the
    calls. A config it cannot take (refusal) or fails on is reported and gives a PeerResult
    without a time."""

    def __init__(self, module, *, repeats: int, runs: int, warmup_ms: float):
        self.flash_mla = module
        self.repeats, self.runs, self.warmup_ms = repeats, runs, warmup_ms
        self.reported: set[str] = set()

    @classmethod
    def imported(cls, args: argparse.Namespace) -> tuple[FlashMLASparsePeer | None, str]:
        """(this peer on flash_mla, the header's note), or (None, why it cannot be imported)."""
        try:
            module = importlib.import_module("flash_mla")
        except Exception as error:  # a missing build, torch or CUDA library
            return None, f"off (cannot import flash_mla: {error!r})"
        return cls(module, repeats=args.repeats, runs=args.runs, warmup_ms=args.warmup_ms), "on"

    def refusal(self, cfg) -> str:
        """Why FlashMLA cannot take `cfg` ("" when it can), known before torch is imported."""
        return ""

    def __call__(self, cfg, inputs, our_out) -> PeerResult:
        refusal = self.refusal(cfg)
        if refusal:
            print(f"# peer flashmla cannot take {cfg.label}: {refusal}", file=sys.stderr)
            return PeerResult()
        import torch

        try:
            with torch.inference_mode():
                return self.measure(cfg, inputs, np.asarray(our_out, np.float32))
        except Exception as error:
            report_failure("flashmla", cfg.label, error, self.reported)
            return PeerResult()
        finally:
            torch.cuda.empty_cache()

    def measure(self, cfg, inputs, ours: np.ndarray) -> PeerResult:
        raise NotImplementedError

    def padded(self, qs: list, h_q: int) -> list:
        """The q to time FlashMLA on, zero-padded to the head count it runs `h_q` heads with;
        made here, before timing, so the copy is not in FlashMLA's time."""
        import jax

        heads = flashmla_heads(h_q)
        qs = qs[: self.repeats]
        if heads != h_q:
            qs = jax.block_until_ready([padded_heads(q, heads) for q in qs])
        return qs

    def timed(self, qs: list, call: Callable, h_q: int, ours: np.ndarray) -> PeerResult:
        """FlashMLA's result from `call(q)` (its output) on each of `qs`, shared with torch: the
        first call made eagerly (FlashMLA builds its schedule there) and its first `h_q` heads
        compared with ours, then all of them timed by graph_time_us."""
        import torch

        calls = [functools.partial(call, torch.from_dlpack(q)) for q in qs]
        first = calls[0]()
        torch.cuda.synchronize()
        theirs = first[..., :h_q, :].float().cpu().numpy()
        max_abs_diff, rel_err = agreement(theirs, ours)
        del first, theirs

        us = graph_time_us(calls, repeats=self.repeats, runs=self.runs, warmup_ms=self.warmup_ms)
        return PeerResult(us, max_abs_diff, rel_err)


def flashmla_beside(
    measure: Callable | None,
    cfg,
    inputs,
    many_calls: Callable,
    first_args: tuple,
    disagreements: list[str],
) -> PeerResult:
    """FlashMLA's result on `cfg` (one without a time when no peer runs), checked against our
    output for the first q, `many_calls(*first_args)`'s first; a disagreement is noted."""
    if measure is None:
        return PeerResult()
    import jax

    our_out = jax.block_until_ready(many_calls(*first_args)[0][0])
    peer = measure(cfg, inputs, our_out)
    del our_out
    note_disagreement(disagreements, "flashmla", cfg.label, peer)
    return peer


def flashmla_fields(us: float, work: float, moved: float, peer: PeerResult, h_q: int) -> dict:
    """A sparse record's fields from "us" to "side_by_side": our time of a call of `work`
    FLOPs and `moved` bytes, FlashMLA's beside it (run with flashmla_heads(h_q) heads)."""
    ran = peer.us is not None
    return {
        "us": round(us, 2),
        "tflops": round(work / (us * 1e6), 2),
        "gbps": round(moved / (us * 1e3), 1),
        "flashmla_us": round(peer.us, 2) if ran else None,
        "flashmla_tflops": round(work / (peer.us * 1e6), 2) if ran else None,
        "flashmla_h_q": flashmla_heads(h_q) if ran else None,
        "ratio": round(peer.us / us, 3) if ran else None,
        "peer_max_abs_diff": significant(peer.max_abs_diff),
        "peer_rel_err": significant(peer.rel_err),
        "side_by_side": ran,
    }


SPARSE_HEADER = (
    f"{'config':<44} {'us':>9} {'TFLOPS':>7} {'GB/s':>8} {'FlashMLA':>9} {'TFLOPS':>7} "
    f"{'ratio':>6} {'FM err':>8}"
)


def print_sparse_row(label: str, rec: dict) -> None:
    """One line of SPARSE_HEADER's table."""
    print(
        f"{label:<44} {rec['us']:>9.1f} {rec['tflops']:>7.1f} {rec['gbps']:>8.1f} "
        f"{fmt(rec['flashmla_us'], '>9.1f')} {fmt(rec['flashmla_tflops'], '>7.1f')} "
        f"{fmt(rec['ratio'], '>6.3f')} {fmt(rec['peer_rel_err'], '>8.1e')}",
        flush=True,
    )


def sparse_args(parser: argparse.ArgumentParser, argv, scale_help: str) -> argparse.Namespace:
    """The sparse benchmarks' options after their own (--configs, --only, ...), parsed and
    checked."""
    parser.add_argument("--implementation", choices=("cuda", "xla"), default="cuda")
    timing_arguments(parser, "FlashMLA")
    parser.add_argument("--scale", type=int, default=1, help=scale_help)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.runs < 1 or args.warmup_ms < 0:
        parser.error("--repeats and --runs must be >= 1, --warmup-ms >= 0")
    if args.scale < 1:
        parser.error("--scale must be >= 1")
    return args


def main(argv=None, measure_peers: PeerMeasure | None = None) -> int:
    """Run the benchmark; `measure_peers` replaces the torch peers (tests)."""
    args = parse_args(argv)
    want_peers = peers_wanted(args, measure_peers, tuple(PEER_MODULES.values()))
    import jax
    import jax.numpy as jnp

    import jax_flashmla as fm

    dtype = jnp.dtype(args.dtype)
    configs = args.only or select_configs(args.configs)
    configs = [c.scaled(args.scale) for c in configs]
    main_kernel = kernel_name(args.implementation)
    time_xla = args.implementation == "cuda" and not args.skip_xla
    if cannot_run(
        args.implementation,
        configs,
        lambda cfg: kernel_unavailable(cfg, dtype, args.implementation),
    ):
        return 1

    device, card, date = where_and_when()
    measure_peers, peers_note = chosen_peers(
        args,
        want_peers,
        measure_peers,
        device,
        tuple(PEER_MODULES.values()),
        lambda: torch_peers(args),
    )
    print(header_line(device, date, args.dtype, main_kernel, args))
    print(
        f"# peers side by side (same process, same arrays; ratio = peer us / our us): "
        f"{peers_note}; err = largest relative error of an output row against ours"
    )
    print(HEADER + (f" {'XLA us':>10} {'vs XLA':>7}" if time_xla else ""))
    records = []
    disagreements = []
    metadata_fn = jax.jit(fm.get_mla_metadata, static_argnums=(1, 2))
    for cfg in configs:
        repeats = max(args.repeats, args.xla_repeats if time_xla else 0)
        inputs = make_inputs(cfg, dtype, args.seed + cfg.b, repeats)
        qs, k_cache, block_table, seqlens, lengths = inputs
        mean_s_k = float(lengths.mean())
        metadata = metadata_fn(seqlens, cfg.s_q * cfg.h_q // cfg.h_kv, cfg.h_kv)
        jax.block_until_ready(metadata)
        us = time_op(
            cfg,
            args.implementation,
            inputs,
            metadata,
            repeats=args.repeats,
            runs=args.runs,
            warmup_ms=args.warmup_ms,
        )
        peers: dict[str, PeerResult] = {}
        # The peers run at page 64 only: FlashMLA takes no other.
        if measure_peers is not None and cfg.page == DEFAULT_PAGE_SIZE:
            call_once = jitted_calls(cfg, args.implementation)
            our_out = call_once(qs[:1], k_cache, block_table, seqlens, *metadata)[0][0]
            peers = measure_peers(cfg, inputs, jax.block_until_ready(our_out))
            del our_out
            for name, result in peers.items():
                note_disagreement(disagreements, name, cfg.label, result)
        main_record = record(main_kernel, cfg, args.dtype, us, mean_s_k, peers, card, date)
        records.append(main_record)
        xla_record = None
        if time_xla:
            xla_us = time_op(
                cfg,
                "xla",
                inputs,
                metadata,
                repeats=args.xla_repeats,
                runs=args.xla_runs,
                warmup_ms=0,
            )
            xla_record = record(
                "xla_reference", cfg, args.dtype, xla_us, mean_s_k, peers, card, date
            )
            records.append(xla_record)
        print_row(f"{cfg.label} (mean {mean_s_k:.0f})", main_record, xla_record)
        del inputs, qs, k_cache, block_table, seqlens, metadata
        save_records(records, args.json)  # after every config: a crash keeps what was measured
    return finish(records, args.json, disagreements)


if __name__ == "__main__":
    sys.exit(main())
