"""DeepSeek-V3-shaped MLA decoding, one jitted step per token: kernel backend vs XLA reference.

A stack of `--layers` MLA attention layers with DeepSeek-V3's attention dims (128 query heads,
kv_lora_rank 512, qk_nope_head_dim 128, qk_rope_head_dim 64, v_head_dim 128, hidden 7168) and
random bf16 weights decodes `--steps` tokens greedily from a paged latent cache that starts
pre-filled with random rows (varlen lengths around `--context`). Norms are parameter-free RMS
norms, there are no MLPs; every layer adds its attention output to the residual stream.

Per layer and token (the "weight absorption" of MLA inference):
  q = h Wq -> [h_q, 128 nope | 64 rope];  kv = h Wkv -> [512 latent c_kv | 64 rope k_pe]
  RoPE on q_rope and k_pe at the token's position; the row [c_kv | k_pe] (576) is written into
  the layer's paged cache at position cache_seqlens[i].
  q_latent = q_nope W_UK (W_UK [h_q, 128, 512]); the attention query [q_latent | q_rope] (576)
  attends over the cache rows with softmax_scale = 1 / sqrt(128 + 64) (the un-absorbed head
  dim); its output (512 latent dims) times W_UV [h_q, 512, 128] gives 128 dims per head, then
  the output projection.
The step computes the split-KV schedule once (`get_mla_metadata`) and hands it to every layer's
`flash_mla_with_kvcache`; the layers run under `lax.scan` over stacked weights and caches (or
unrolled with `--layer-loop unroll`); the caches are donated, so they are updated in place.

The tokens are decoded twice: with `--impl` (auto: the kernel where it can run) and with the
XLA reference. Both must pick the same greedy tokens and agree on logits and final hidden
states within a loose tolerance; if bf16 rounding flips a pick at a near tie, the reference
runs again fed the kernel run's tokens and the values are compared at every step. The exit
status is 1 when they disagree. Throughput is batch * steps / wall time of the timed steps
(after one warm-up step; compilation excluded).

Examples:
  python examples/deepseek_decode_loop.py --small                      # CPU smoke test
  python examples/deepseek_decode_loop.py --layers 61 --command-buffers on   # H200
  python examples/deepseek_decode_loop.py --mesh data=2,model=4 --check-hlo  # 8 GPUs
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_flashmla as fm

COMMAND_BUFFER_FLAG = "--xla_gpu_enable_command_buffer"
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
MESH_AXES = ("data", "model")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    layers: int
    hidden: int
    heads: int
    vocab: int
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    page: int = 64
    rope_theta: float = 10000.0

    @property
    def d_qk(self) -> int:
        """Width of a latent cache row and of the absorbed query: 512 + 64."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1 / sqrt of the un-absorbed query-key head dim (128 + 64), not of 576."""
        return (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5


@dataclasses.dataclass(frozen=True)
class Workload:
    """Host-side request state: initial lengths, the block table and the first tokens."""

    lengths: np.ndarray  # int32 [b]
    block_table: np.ndarray  # int32 [b, max_blocks]
    num_blocks: int
    first_tokens: np.ndarray  # int32 [b]


@dataclasses.dataclass
class RunResult:
    impl: str
    tokens: np.ndarray  # int32 [steps + 1, b]: the token each step picked (warm-up first)
    logits: np.ndarray  # float32 [steps + 1, b, vocab]
    hidden: np.ndarray  # float32 [steps + 1, b, hidden]: final residual stream
    compile_s: float
    step_s: float  # mean wall time of a timed step
    tokens_per_s: float
    kernels: list[str]  # jax_flashmla custom calls in the compiled step
    hlo: str | None = None


@dataclasses.dataclass
class Agreement:
    ok: bool
    steps_compared: int
    first_divergence: int | None  # step whose greedy tokens differ, None if none
    max_logit_diff: float
    max_hidden_rel_diff: float
    message: str


@dataclasses.dataclass
class Report:
    exit_code: int
    kernel: RunResult | None = None
    reference: RunResult | None = None
    agreement: Agreement | None = None


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def _normal(key, shape, fan_in: float) -> jax.Array:
    return (jax.random.normal(key, shape, jnp.float32) / math.sqrt(fan_in)).astype(jnp.bfloat16)


def init_layer(cfg: ModelConfig, key: jax.Array) -> dict[str, jax.Array]:
    """One layer's weights, N(0, 1 / fan_in), bf16."""
    k_q, k_kv, k_uk, k_uv, k_o = jax.random.split(key, 5)
    d, h = cfg.hidden, cfg.heads
    return {
        "wq": _normal(k_q, (d, h, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim), d),
        "wkv": _normal(k_kv, (d, cfg.d_qk), d),
        "w_uk": _normal(k_uk, (h, cfg.qk_nope_head_dim, cfg.kv_lora_rank), cfg.qk_nope_head_dim),
        "w_uv": _normal(k_uv, (h, cfg.kv_lora_rank, cfg.v_head_dim), cfg.kv_lora_rank),
        "wo": _normal(k_o, (h, cfg.v_head_dim, d), h * cfg.v_head_dim),
    }


def init_cache(cfg: ModelConfig, num_blocks: int, key: jax.Array) -> jax.Array:
    """A layer's paged latent cache [num_blocks, page, 1, 576] of random N(0, 1) rows."""
    return jax.random.normal(key, (num_blocks, cfg.page, 1, cfg.d_qk), jnp.bfloat16)


def rms_norm(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding (rotate-half form) of x [..., d] at positions broadcastable to x[..., 0]."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x = x.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """A bf16 matmul (fp32 accumulation on GPU), returned as fp32."""
    return jnp.einsum(spec, a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)).astype(jnp.float32)


def make_step(cfg: ModelConfig, impl: str | None, mesh, layer_loop: str):
    """The decode step: (params, caches, block_table, cache_seqlens, tokens) ->
    (caches, cache_seqlens + 1, next_tokens, logits, hidden)."""
    data_axis, model_axis = _mesh_axes(mesh)

    def attention_layer(x, w, cache, block_table, positions, seqlens, schedule):
        b = x.shape[0]
        h = rms_norm(x)
        q = _dot("bd,dhk->bhk", h, w["wq"])  # [b, h_q, 192]
        q_nope, q_rope = q[..., : cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim :]
        kv = _dot("bd,dk->bk", h, w["wkv"])  # [b, 576]
        c_kv = rms_norm(kv[:, : cfg.kv_lora_rank])
        k_rope = rope(kv[:, cfg.kv_lora_rank :], positions, cfg.rope_theta)
        q_rope = rope(q_rope, positions[:, None], cfg.rope_theta)

        # Write the new token's latent row at position cache_seqlens[i] of request i.
        row = jnp.concatenate([c_kv, k_rope], axis=-1).astype(cache.dtype)
        block = block_table[jnp.arange(b), positions // cfg.page]
        cache = cache.at[block, positions % cfg.page, 0].set(row, unique_indices=True)

        # Absorb W_UK into the query: attention runs in the 512-dim latent space (+ 64 rope).
        q_latent = _dot("bhn,hnl->bhl", q_nope, w["w_uk"])
        q_attn = jnp.concatenate([q_latent, q_rope], axis=-1).astype(jnp.bfloat16)[:, None]
        if mesh is not None:
            q_attn = jax.lax.with_sharding_constraint(
                q_attn, NamedSharding(mesh, P(data_axis, None, model_axis, None))
            )
        out, _ = fm.flash_mla_with_kvcache(
            q_attn,
            cache,
            block_table,
            seqlens,
            cfg.kv_lora_rank,
            *schedule,
            softmax_scale=cfg.softmax_scale,
            implementation=impl,
        )
        o = _dot("bhl,hlv->bhv", out[:, 0], w["w_uv"])  # absorb W_UV: [b, h_q, 128]
        return x + _dot("bhv,hvd->bd", o, w["wo"]), cache

    def step(params, caches, block_table, cache_seqlens, tokens):
        positions = cache_seqlens  # where this step's token goes
        seqlens = cache_seqlens + 1  # the token attends to itself too
        # One split-KV schedule per step, shared by every layer: s_q * h_q // h_kv query rows
        # per KV head (s_q = 1, h_kv = 1).
        schedule = fm.get_mla_metadata(seqlens, 1 * cfg.heads // 1, 1, implementation=impl)
        layer = functools.partial(
            attention_layer,
            block_table=block_table,
            positions=positions,
            seqlens=seqlens,
            schedule=schedule,
        )
        x = params["embed"][tokens].astype(jnp.float32)
        if layer_loop == "scan":
            # The stacked caches [layers, blocks, ...] viewed as one pool of layers * blocks
            # blocks (a free reshape): layer l's blocks are its block ids + l * blocks. The pool
            # is carried through the scan, so the decode kernel reads it where it lies and the
            # new rows are written in place: no per-layer slice or write-back of a cache.
            layers, blocks = caches.shape[:2]
            pool = caches.reshape(layers * blocks, *caches.shape[2:])

            def pooled_layer(carry, xs):
                x, pool = carry
                w, index = xs
                x, pool = attention_layer(
                    x, w, pool, block_table + index * blocks, positions, seqlens, schedule
                )
                return (x, pool), None

            (x, pool), _ = jax.lax.scan(
                pooled_layer, (x, pool), (params["layers"], jnp.arange(layers, dtype=jnp.int32))
            )
            caches = pool.reshape(caches.shape)
        else:
            updated = []
            for w, cache in zip(params["layers"], caches, strict=True):
                x, cache = layer(x, w, cache)
                updated.append(cache)
            caches = updated
        # fp32 logits (exact products of the bf16 weights), so argmax ties are rare.
        logits = jnp.einsum(
            "bd,dv->bv",
            rms_norm(x),
            params["w_vocab"].astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        )
        next_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return caches, seqlens, next_tokens, logits, x

    shardings = _shardings(cfg, mesh, layer_loop)
    if shardings is None:
        return jax.jit(step, donate_argnums=(1,))
    in_shardings, out_shardings = shardings
    return jax.jit(
        step, donate_argnums=(1,), in_shardings=in_shardings, out_shardings=out_shardings
    )


# --------------------------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------------------------


def parse_mesh(spec: str | None):
    """'data=2,model=4' -> a Mesh with Auto axes over the first 2 * 4 devices (None: None)."""
    if not spec:
        return None
    sizes: dict[str, int] = {}
    for part in spec.split(","):
        name, _, size = (s.strip() for s in part.partition("="))
        if name not in MESH_AXES or not size.isdigit() or int(size) < 1 or name in sizes:
            raise ValueError(
                f"--mesh: expected comma-separated AXIS=SIZE with AXIS in {MESH_AXES}, e.g. "
                f"'data=2,model=4'; got {spec!r}"
            )
        sizes[name] = int(size)
    count = math.prod(sizes.values())
    devices = jax.devices()
    if count > len(devices):
        raise ValueError(f"--mesh {spec} needs {count} devices; there are {len(devices)}")
    return jax.make_mesh(
        tuple(sizes.values()),
        tuple(sizes),
        axis_types=(jax.sharding.AxisType.Auto,) * len(sizes),
        devices=devices[:count],
    )


def _mesh_axes(mesh) -> tuple[str | None, str | None]:
    if mesh is None:
        return None, None
    names = mesh.axis_names
    return ("data" if "data" in names else None), ("model" if "model" in names else None)


def _shardings(cfg: ModelConfig, mesh, layer_loop: str):
    """(in_shardings, out_shardings) of the step; heads over "model", requests over "data".

    Weights with a head dim are split over "model"; the caches, the embedding and the vocab
    projection are replicated; block tables, lengths, tokens, logits and hidden states are
    split over "data".
    """
    if mesh is None:
        return None
    data, model = _mesh_axes(mesh)

    def named(*spec):
        return NamedSharding(mesh, P(*spec))

    layer_specs = {
        "wq": (None, model),  # [hidden, heads, 192]
        "wkv": (),  # [hidden, 576]
        "w_uk": (model,),  # [heads, 128, 512]
        "w_uv": (model,),  # [heads, 512, 128]
        "wo": (model,),  # [heads, 128, hidden]
    }
    if layer_loop == "scan":
        layers = {k: named(None, *s) for k, s in layer_specs.items()}
        caches = named()
    else:
        layers = [{k: named(*s) for k, s in layer_specs.items()} for _ in range(cfg.layers)]
        caches = [named() for _ in range(cfg.layers)]
    params = {"embed": named(), "w_vocab": named(), "layers": layers}
    per_request = named(data)
    per_request_rows = named(data, None)
    in_shardings = (params, caches, per_request_rows, per_request, per_request)
    out_shardings = (caches, per_request, per_request, per_request_rows, per_request_rows)
    return in_shardings, out_shardings


# --------------------------------------------------------------------------------------------
# Set-up: weights, caches, requests
# --------------------------------------------------------------------------------------------


def init_params(cfg: ModelConfig, seed: int, mesh, layer_loop: str):
    """Random weights, stacked over layers for the scan (a list of layers when unrolled)."""
    shardings = _shardings(cfg, mesh, layer_loop)
    param_shardings = shardings[0][0] if shardings else None
    k_embed, k_vocab, k_layers = jax.random.split(jax.random.key(seed), 3)
    layer_keys = jax.random.split(k_layers, cfg.layers)
    one_layer = functools.partial(init_layer, cfg)
    if layer_loop == "scan":
        layers = jax.jit(
            lambda keys: jax.lax.map(one_layer, keys),
            out_shardings=param_shardings["layers"] if param_shardings else None,
        )(layer_keys)
    else:
        make = jax.jit(
            one_layer, out_shardings=param_shardings["layers"][0] if param_shardings else None
        )
        layers = [make(k) for k in layer_keys]
    replicated = param_shardings["embed"] if param_shardings else None
    embed = jax.jit(
        lambda k: jax.random.normal(k, (cfg.vocab, cfg.hidden), jnp.bfloat16),
        out_shardings=replicated,
    )(k_embed)
    w_vocab = jax.jit(
        lambda k: _normal(k, (cfg.hidden, cfg.vocab), cfg.hidden), out_shardings=replicated
    )(k_vocab)
    return {"embed": embed, "w_vocab": w_vocab, "layers": layers}


def init_caches(cfg: ModelConfig, num_blocks: int, seed: int, mesh, layer_loop: str):
    """Every layer's cache, made on the device(s) from the seed (the same for each run)."""
    shardings = _shardings(cfg, mesh, layer_loop)
    cache_shardings = shardings[0][1] if shardings else None
    keys = jax.random.split(jax.random.key(seed + 1), cfg.layers)
    one_cache = functools.partial(init_cache, cfg, num_blocks)
    if layer_loop == "scan":
        return jax.jit(lambda ks: jax.lax.map(one_cache, ks), out_shardings=cache_shardings)(keys)
    make = jax.jit(one_cache, out_shardings=cache_shardings[0] if cache_shardings else None)
    return [make(k) for k in keys]


def make_workload(
    batch: int, context: int, decode_tokens: int, page: int, vocab: int, seed: int
) -> Workload:
    """Varlen requests: lengths ~ N(context, context / 2) clipped to [1, 2 * context].

    Each request gets the blocks it needs for its context plus every token decoded, at random
    physical positions (a shuffled pool); unused block-table entries point at block 0.
    """
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.normal(context, context / 2, batch)), 1, 2 * context)
    lengths = lengths.astype(np.int32)
    blocks = -(-(lengths + decode_tokens) // page)
    pool = rng.permutation(int(blocks.sum())).astype(np.int32)
    table = np.zeros((batch, int(blocks.max())), np.int32)
    start = 0
    for i, n in enumerate(blocks):
        table[i, :n] = pool[start : start + n]
        start += n
    tokens = rng.integers(0, vocab, batch, dtype=np.int32)
    return Workload(lengths, table, int(blocks.sum()), tokens)


# --------------------------------------------------------------------------------------------
# Decoding and checks
# --------------------------------------------------------------------------------------------


def decode(
    cfg: ModelConfig,
    workload: Workload,
    params,
    *,
    impl: str | None,
    steps: int,
    seed: int,
    mesh,
    layer_loop: str,
    keep_hlo: bool = False,
    forced_tokens: np.ndarray | None = None,
) -> RunResult:
    """Decode 1 warm-up + `steps` tokens with one backend; time the `steps`.

    forced_tokens: int32 [steps + 1, b]: feed forced_tokens[t] to step t + 1 instead of the
    token step t picked (teacher forcing, to compare two backends step by step).
    """
    step = make_step(cfg, impl, mesh, layer_loop)
    caches = init_caches(cfg, workload.num_blocks, seed, mesh, layer_loop)
    shardings = _shardings(cfg, mesh, layer_loop)
    placements = shardings[0][2:] if shardings else (None, None, None)
    block_table, seqlens, tokens = (
        jax.device_put(x, s)
        for x, s in zip(
            (workload.block_table, workload.lengths, workload.first_tokens),
            placements,
            strict=True,
        )
    )
    start = time.perf_counter()
    compiled = step.lower(params, caches, block_table, seqlens, tokens).compile()
    compile_s = time.perf_counter() - start
    hlo = compiled.as_text()
    kernels = sorted(set(re.findall(r'custom_call_target="(jax_flashmla[\w.]*)"', hlo)))

    picked, logits_seen, hidden_seen = [], [], []

    def run_step(caches, seqlens, tokens):
        caches, seqlens, tokens, logits, hidden = compiled(
            params, caches, block_table, seqlens, tokens
        )
        picked.append(tokens)
        logits_seen.append(logits)
        hidden_seen.append(hidden)
        return caches, seqlens, tokens

    inputs = None
    if forced_tokens is not None:
        inputs = [jax.device_put(t, placements[2]) for t in forced_tokens[:steps]]
    state = jax.block_until_ready(run_step(caches, seqlens, tokens))  # warm-up
    start = time.perf_counter()
    for t in range(steps):
        state = run_step(*state[:2], state[2] if inputs is None else inputs[t])
    jax.block_until_ready((state, logits_seen[-1], hidden_seen[-1]))
    elapsed = time.perf_counter() - start
    final_lengths = np.asarray(state[1])
    if not np.array_equal(final_lengths, workload.lengths + steps + 1):
        raise AssertionError("cache_seqlens did not advance by one per step")
    del state
    return RunResult(
        impl="auto" if impl is None else impl,
        tokens=np.stack([np.asarray(t) for t in picked]),
        logits=np.stack([np.asarray(x, np.float32) for x in logits_seen]),
        hidden=np.stack([np.asarray(x, np.float32) for x in hidden_seen]),
        compile_s=compile_s,
        step_s=elapsed / max(steps, 1),
        tokens_per_s=workload.lengths.shape[0] * steps / elapsed if steps else float("nan"),
        kernels=kernels,
        hlo=hlo if keep_hlo else None,
    )


def compare(
    kernel: RunResult,
    reference: RunResult,
    *,
    logits_atol: float,
    hidden_rtol: float,
    forced: RunResult | None = None,
) -> Agreement:
    """Greedy tokens equal at every step, or a flip at a near tie; values within tolerance.

    Once a pick differs the two free-running decodes continue from different tokens. Values
    are then compared against `forced` (the reference fed the kernel run's tokens) at every
    step when given, else up to and including the first step whose picks differ (its inputs
    were still the same). Logits within logits_atol bound the reference's preference for its
    own pick over the kernel's by 2 * logits_atol: a near tie that bf16 rounding can flip.
    """
    total = kernel.tokens.shape[0]
    differs = np.nonzero((kernel.tokens != reference.tokens).any(axis=1))[0]
    first = int(differs[0]) if differs.size else None
    base = reference if forced is None else forced
    upto = total if first is None or forced is not None else first + 1
    logit_diff = np.abs(kernel.logits[:upto] - base.logits[:upto]).max(axis=(1, 2))
    hidden_diff = np.linalg.norm(kernel.hidden[:upto] - base.hidden[:upto], axis=(1, 2))
    hidden_norm = np.linalg.norm(base.hidden[:upto], axis=(1, 2))
    hidden_rel = hidden_diff / np.maximum(hidden_norm, 1e-30)
    max_logit, max_hidden = float(logit_diff.max()), float(hidden_rel.max())
    problems = []
    if not max_logit <= logits_atol:
        worst = int(np.argmax(logit_diff))
        problems.append(f"logits differ by {max_logit:.3g} > {logits_atol} (step {worst})")
    if not max_hidden <= hidden_rtol:
        worst = int(np.argmax(hidden_rel))
        problems.append(f"hidden states differ by {max_hidden:.3g} > {hidden_rtol} (step {worst})")
    notes = []
    if first is not None:
        rows = np.nonzero(kernel.tokens[first] != reference.tokens[first])[0]
        ref_logits = reference.logits[first, rows]
        picks = np.arange(rows.size)
        margin = (
            ref_logits[picks, reference.tokens[first, rows]]
            - ref_logits[picks, kernel.tokens[first, rows]]
        )
        notes.append(
            f"greedy tokens first differ at step {first} (requests {rows.tolist()}; the "
            f"reference prefers its pick by {float(margin.max()):.3g})"
        )
        if forced is None:
            notes.append("later steps not compared")
        else:
            flips = int((kernel.tokens != forced.tokens).sum())
            notes.append(
                f"fed the kernel run's tokens, the reference picks otherwise in {flips} of "
                f"{kernel.tokens.size} (step, request) pairs"
            )
    summary = f"max |logit diff| {max_logit:.3g}, max hidden rel diff {max_hidden:.3g}"
    if problems:
        message = "DISAGREE: " + "; ".join(problems + notes)
    elif first is None:
        message = f"agree: same greedy tokens for all {total} steps; {summary}"
    else:
        message = f"agree up to near ties: {'; '.join(notes)}; {summary}"
    return Agreement(not problems, upto, first, max_logit, max_hidden, message)


def hlo_summary(hlo: str, cache_bytes: int, cache_shapes: tuple[str, ...]) -> list[str]:
    """Collectives of a compiled step (count, largest array moved) and cache-sized buffers.

    cache_shapes: HLO shapes of one layer's cache and of the stacked caches, e.g.
    "bf16[300,64,1,576]", whose instructions outside fusions are counted.
    """
    lines = []
    found: dict[str, list[int]] = {}
    pattern = re.compile(
        r"=\s+(?P<shape>.+?)\s+(?P<op>" + "|".join(COLLECTIVES) + r")(?:-start)?\("
    )
    for line in hlo.splitlines():
        match = pattern.search(line)
        if match:
            found.setdefault(match["op"], []).append(_largest_array_bytes(match["shape"]))
    for op in COLLECTIVES:
        sizes = found.get(op, [])
        detail = f", largest {_fmt_bytes(max(sizes))}" if sizes else ""
        lines.append(f"  {op:20s} {len(sizes):3d}{detail}")
    largest = max((s for sizes in found.values() for s in sizes), default=0)
    verdict = "not gathered" if largest < cache_bytes else "POSSIBLY GATHERED"
    lines.append(
        f"  largest collective {_fmt_bytes(largest)} vs one layer's cache "
        f"{_fmt_bytes(cache_bytes)}: cache {verdict}"
    )
    # Instructions outside fused computations whose result is a whole cache: the in-place
    # scatter, plus any copy XLA had to make (e.g. to slice one layer's cache out of a stack).
    shapes = "|".join(re.escape(s) for s in cache_shapes)
    instruction = re.compile(r"=\s+(" + shapes + r")\{[^}]*\}\s+([\w\-]+)\(")
    counts: dict[tuple[str, str], int] = {}
    computation = ""
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if header:
            computation = header.group(1)
            continue
        if computation.startswith(("fused", "wrapped")):
            continue
        match = instruction.search(line)
        if match and match.group(2) not in ("parameter", "get-tuple-element", "tuple", "bitcast"):
            key = (match.group(2), match.group(1))
            counts[key] = counts.get(key, 0) + 1
    listed = ", ".join(f"{op} {shape} x{n}" for (op, shape), n in sorted(counts.items()))
    lines.append(f"  cache-sized instructions outside fusions: {listed or 'none'}")
    header = hlo.split("\n", 1)[0]
    aliased = len(re.findall(r"\{\d*\}: \(\d+, \{\d*\}, (?:may|must)-alias\)", header))
    lines.append(f"  outputs aliased to donated inputs (the caches, updated in place): {aliased}")
    lines.append(f"  command-buffer mentions in the HLO: {hlo.count('command_buffer')}")
    return lines


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_DTYPE_BYTES.update({"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8})


def _largest_array_bytes(shape: str) -> int:
    largest = 0
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape):
        count = math.prod(int(d) for d in dims.split(",") if d)
        largest = max(largest, count * _DTYPE_BYTES.get(dtype, 1 if "f8" in dtype else 4))
    return largest


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def configure_command_buffers(mode: str | None) -> str:
    """Put the command-buffer flag into XLA_FLAGS. XLA reads it when JAX starts its backend,
    so this only counts when called before any device is used (as `main` does when run as a
    script); returns a note for the report."""
    if mode is None:
        return "XLA default"
    value = "CUSTOM_CALL" if mode == "on" else ""
    wanted = f"{COMMAND_BUFFER_FLAG}={value}"
    flags = os.environ.get("XLA_FLAGS", "").split()
    if wanted in flags and not any(
        f.startswith(COMMAND_BUFFER_FLAG + "=") and f != wanted for f in flags
    ):
        return f"{mode} ({wanted})"
    if _backend_started():
        return f"{mode} requested, but JAX had already started: NOT applied"
    flags = [f for f in flags if not f.startswith(COMMAND_BUFFER_FLAG + "=")] + [wanted]
    os.environ["XLA_FLAGS"] = " ".join(flags)
    return f"{mode} ({wanted})"


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--small", action="store_true", help="tiny dims and workload for CPU")
    parser.add_argument("--batch", type=int, help="requests (default 64; 4 with --small)")
    parser.add_argument(
        "--context", type=int, help="mean initial KV length (default 4096; 256 with --small)"
    )
    parser.add_argument("--steps", type=int, help="timed tokens (default 32; 4 with --small)")
    parser.add_argument("--layers", type=int, default=4, help="attention layers (default 4)")
    parser.add_argument("--hidden", type=int, help="hidden size (default 7168; 256 with --small)")
    parser.add_argument("--heads", type=int, help="query heads (default 128; 16 with --small)")
    parser.add_argument("--vocab", type=int, default=1024, help="vocab size (default 1024)")
    parser.add_argument(
        "--impl",
        choices=("auto", "cuda", "xla"),
        default="auto",
        help="backend of the first run (auto: the kernel where it can run)",
    )
    parser.add_argument(
        "--command-buffers",
        choices=("on", "off"),
        help=f"on: {COMMAND_BUFFER_FLAG}=CUSTOM_CALL, off: {COMMAND_BUFFER_FLAG}= "
        "(default: leave XLA_FLAGS alone)",
    )
    parser.add_argument(
        "--mesh", help="shard over devices, e.g. data=2,model=4 (heads over model, batch over data)"
    )
    parser.add_argument(
        "--layer-loop",
        choices=("scan", "unroll"),
        default="scan",
        help="lax.scan over stacked layers (default) or a Python loop over per-layer arrays",
    )
    parser.add_argument(
        "--check-hlo", action="store_true", help="print the collectives of each compiled step"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logits-atol", type=float, default=0.1)
    parser.add_argument("--hidden-rtol", type=float, default=0.02)
    args = parser.parse_args(argv)
    small = args.small
    for name, full, tiny in (
        ("batch", 64, 4),
        ("context", 4096, 256),
        ("steps", 32, 4),
        ("hidden", 7168, 256),
        ("heads", 128, 16),
    ):
        if getattr(args, name) is None:
            setattr(args, name, tiny if small else full)
    for name in ("batch", "context", "layers", "hidden", "heads", "vocab"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.steps < 0:
        parser.error("--steps must be >= 0")
    return args


def run(args: argparse.Namespace) -> Report:
    """Decode with the chosen backend and with the reference; compare; print a report."""
    cb_note = configure_command_buffers(args.command_buffers)
    impl = None if args.impl == "auto" else args.impl
    cfg = ModelConfig(layers=args.layers, hidden=args.hidden, heads=args.heads, vocab=args.vocab)
    mesh = parse_mesh(args.mesh)
    data_axis, model_axis = _mesh_axes(mesh)
    if data_axis and args.batch % mesh.shape[data_axis]:
        raise ValueError(f"--batch {args.batch} must divide by the data axis ({mesh.shape})")
    if model_axis and args.heads % mesh.shape[model_axis]:
        raise ValueError(f"--heads {args.heads} must divide by the model axis ({mesh.shape})")
    workload = make_workload(
        args.batch, args.context, args.steps + 1, cfg.page, cfg.vocab, args.seed
    )
    cache_shape = (workload.num_blocks, cfg.page, 1, cfg.d_qk)
    cache_bytes = math.prod(cache_shape) * 2
    weight_count = cfg.hidden * cfg.heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    weight_count += cfg.hidden * cfg.d_qk + 2 * cfg.heads * cfg.kv_lora_rank * cfg.v_head_dim
    weight_count += cfg.heads * cfg.v_head_dim * cfg.hidden
    device = jax.devices()[0]
    lengths = workload.lengths
    print(
        f"device: {device.device_kind} ({device.platform}, {len(jax.devices())} device(s)), "
        f"jax {jax.__version__}"
    )
    print(
        f"model: {cfg.layers} layers, hidden {cfg.hidden}, {cfg.heads} query heads, latent "
        f"{cfg.kv_lora_rank} + rope {cfg.qk_rope_head_dim} (q nope {cfg.qk_nope_head_dim}, "
        f"v {cfg.v_head_dim}), vocab {cfg.vocab}, softmax_scale {cfg.softmax_scale:.5f}"
    )
    print(
        f"requests: batch {args.batch}, context mean {lengths.mean():.0f} "
        f"(min {lengths.min()}, max {lengths.max()}), 1 warm-up + {args.steps} timed steps"
    )
    print(
        f"memory: cache {_fmt_bytes(cache_bytes)}/layer ({workload.num_blocks} blocks of "
        f"{cfg.page}), weights {_fmt_bytes(2 * weight_count)}/layer; "
        f"{cfg.layers} layers: {_fmt_bytes(cfg.layers * (cache_bytes + 2 * weight_count))}"
    )
    mesh_note = "none" if mesh is None else ", ".join(f"{k}={v}" for k, v in mesh.shape.items())
    print(
        f"impl: {args.impl} vs xla; mesh: {mesh_note}; layer loop: {args.layer_loop}; "
        f"command buffers: {cb_note}"
    )
    print(f"XLA_FLAGS: {os.environ.get('XLA_FLAGS', '') or '(unset)'}")

    params = init_params(cfg, args.seed, mesh, args.layer_loop)
    results = []
    for run_impl in (impl, "xla"):
        result = decode(
            cfg,
            workload,
            params,
            impl=run_impl,
            steps=args.steps,
            seed=args.seed,
            mesh=mesh,
            layer_loop=args.layer_loop,
            keep_hlo=args.check_hlo,
        )
        results.append(result)
        kernels = ", ".join(result.kernels) or "none (XLA reference)"
        print(
            f"[{result.impl:4s}] compile {result.compile_s:6.2f} s, step {1e3 * result.step_s:9.3f}"
            f" ms, {result.tokens_per_s:10.1f} tokens/s; jax_flashmla custom calls: {kernels}"
        )
        if args.check_hlo:
            layer_shape = "bf16[" + ",".join(map(str, cache_shape)) + "]"
            stacked_shape = f"bf16[{cfg.layers}," + layer_shape[5:]
            for line in hlo_summary(result.hlo or "", cache_bytes, (layer_shape, stacked_shape)):
                print(line)
    kernel, reference = results
    if kernel.step_s > 0 and reference.step_s > 0:
        print(f"speed-up {args.impl} over xla: {reference.step_s / kernel.step_s:.2f}x")
    forced = None
    if not np.array_equal(kernel.tokens, reference.tokens):
        print("greedy tokens differ: decoding again with the reference fed the kernel's tokens")
        forced = decode(
            cfg,
            workload,
            params,
            impl="xla",
            steps=args.steps,
            seed=args.seed,
            mesh=mesh,
            layer_loop=args.layer_loop,
            forced_tokens=kernel.tokens,
        )
    agreement = compare(
        kernel,
        reference,
        logits_atol=args.logits_atol,
        hidden_rtol=args.hidden_rtol,
        forced=forced,
    )
    print(agreement.message)
    return Report(0 if agreement.ok else 1, kernel, reference, agreement)


def main(argv: list[str] | None = None) -> int:
    """Run the example; 0 when the backends agree, 1 when not, 2 on a bad configuration."""
    args = parse_args(argv)
    try:
        return run(args).exit_code
    except ValueError as error:  # bad --mesh, --impl cuda where no kernel runs, ...
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
