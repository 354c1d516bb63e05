"""Sharding rules: every op runs per shard under automatic sharding, never gathered.

An op describes each operand and result with an einsum-like dims string ("b s (k g) d", one
letter a factor, parentheses for a dim made of several factors, major first). Factors named in
`shardable` may be split over mesh axes (batch, query tokens, heads); every other factor is
replicated. From that one description `partitioned_call` builds
- the Shardy sharding rule that lets XLA propagate shardings through the op, and
- the partition callback: it reads the mesh axes Shardy gave each shardable factor, keeps the
  ones that divide the factor evenly, asks for exactly those shardings on operands and results
  (XLA reshards any other input sharding to them, e.g. a cache sharded along its blocks is
  replicated), and runs the op's own computation on the local shards.
Under shard_map, pmap or a single device the op runs as it is. A vmap rule (sequential over
the mapped axis) is attached because custom_partitioning has none. Meshes with Explicit axes
(jax.make_mesh's default) raise a ValueError that says to use Auto axes or shard_map:
custom_partitioning fails under them in jax 0.11.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import jax
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

_DIM = re.compile(r"\([a-z ]+\)|[a-z]")


def parse_dims(dims: str) -> list[tuple[str, ...]]:
    """'b s (k g) d' -> [('b',), ('s',), ('k', 'g'), ('d',)]."""
    return [tuple(t.strip("()").split()) for t in _DIM.findall(dims)]


def factor_sizes(
    arrays: Sequence[jax.Array], operand_dims: Sequence[str], given: dict[str, int]
) -> dict[str, int]:
    """Size of every factor: read off single-factor dims, `given` for the others."""
    sizes = dict(given)
    for x, dims in zip(arrays, operand_dims, strict=True):
        parsed = parse_dims(dims)
        if len(parsed) != x.ndim:
            raise AssertionError(f"dims {dims!r} do not match shape {x.shape}")
        for factors, size in zip(parsed, x.shape, strict=True):
            if len(factors) == 1:
                sizes.setdefault(factors[0], size)
    return sizes


def head_factor(num_kv_heads: int) -> str:
    """The factor of a query-head dim "(k g)" that may be sharded: the KV heads k when there are
    several (each device keeps whole groups and its slice of the KV heads), else the query heads
    g of the one KV head. Offering both lets Shardy split a mesh axis into sub-axes, which
    custom_partitioning cannot hand to the partition callback."""
    return "k" if num_kv_heads > 1 else "g"


def _drop_unit_factors(dims: str, sizes: dict[str, int]) -> str:
    out = []
    for factors in parse_dims(dims):
        kept = [f for f in factors if sizes.get(f) != 1] if len(factors) > 1 else list(factors)
        kept = kept or [factors[0]]
        out.append(kept[0] if len(kept) == 1 else "(" + " ".join(kept) + ")")
    return " ".join(out)


def _mesh_size(mesh, axes: tuple[str, ...]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _spec_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def choose_factor_axes(
    mesh, arg_shapes, operand_dims: Sequence[str], shardable: frozenset[str], sizes: dict[str, int]
) -> dict[str, tuple[str, ...]]:
    """Mesh axes of each shardable factor, read from the shardings Shardy propagated.

    A factor's axes come from the first operand dim holding it alone; a factor that only
    appears inside a compound dim gets what is left of that dim's axes once its other factors
    are placed. Axes that do not divide the factor evenly, or that an earlier factor already
    uses, are dropped (that factor is then replicated).
    """
    parsed = [parse_dims(d) for d in operand_dims]
    specs = []
    for shape in arg_shapes:
        sharding = getattr(shape, "sharding", None)
        spec = sharding.spec if isinstance(sharding, NamedSharding) else PartitionSpec()
        specs.append(tuple(spec) + (None,) * (len(shape.shape) - len(spec)))
    proposed: dict[str, tuple[str, ...]] = {}
    for dims, spec in zip(parsed, specs, strict=True):
        for factors, entry in zip(dims, spec, strict=True):
            if len(factors) == 1 and factors[0] in shardable:
                proposed.setdefault(factors[0], _spec_axes(entry))
    for dims, spec in zip(parsed, specs, strict=True):
        for factors, entry in zip(dims, spec, strict=True):
            if len(factors) == 1:
                continue
            axes = list(_spec_axes(entry))
            for f in factors:
                if f in proposed:
                    axes = [a for a in axes if a not in proposed[f]]
            for f in factors:
                if f in shardable and f not in proposed:
                    proposed[f] = tuple(axes)
                    axes = []
    chosen: dict[str, tuple[str, ...]] = {}
    used: set[str] = set()
    for f in sorted(proposed):
        axes = tuple(a for a in proposed[f] if a not in used)
        if axes and sizes[f] % _mesh_size(mesh, axes) == 0:
            chosen[f] = axes
            used.update(axes)
    return chosen


def spec_for(dims: str, axes: dict[str, tuple[str, ...]]) -> PartitionSpec:
    entries = []
    for factors in parse_dims(dims):
        dim_axes = tuple(a for f in factors for a in axes.get(f, ()))
        entries.append(None if not dim_axes else dim_axes[0] if len(dim_axes) == 1 else dim_axes)
    return PartitionSpec(*entries)


def _explicit_axes(arrays: Sequence[jax.Array]) -> tuple[str, ...]:
    """Mesh axes of Explicit type in the current mesh or in the inputs' shardings."""
    meshes = [jax.sharding.get_abstract_mesh()]
    meshes += [getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None) for x in arrays]
    return tuple(
        sorted({a for m in meshes if m is not None and not m.empty for a in m.explicit_axes})
    )


def partitioned_call(
    op_name: str,
    fn: Callable[..., tuple[jax.Array, ...]],
    arrays: Sequence[jax.Array],
    operand_dims: Sequence[str],
    result_dims: Sequence[str],
    *,
    shardable: frozenset[str],
    given_sizes: dict[str, int] | None = None,
    local_fn: Callable[[dict[str, tuple[str, ...]]], Callable[..., tuple[jax.Array, ...]]]
    | None = None,
) -> tuple[jax.Array, ...]:
    """Run fn(*arrays) (a tuple of arrays out) partitioned by the dims description.

    Raises ValueError under a mesh with Explicit axes, which custom_partitioning cannot
    partition (jax >= 0.11 fails at run time), saying what to do instead.

    local_fn(factor_axes) may return another per-shard computation when some factors are
    sharded (factor_axes maps each sharded factor to its mesh axes): e.g. decode drops global
    scheduler metadata and schedules its shard, and a gradient sums over sharded heads.
    """
    explicit = _explicit_axes(arrays)
    if explicit:
        raise ValueError(
            f"{op_name}: mesh axes {explicit} are Explicit, which the ops' sharding rules "
            "(custom_partitioning) cannot handle; make the mesh with Auto axes, e.g. "
            "jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape)), "
            "or call the op inside jax.shard_map"
        )
    sizes = factor_sizes(arrays, operand_dims, given_sizes or {})
    # Shardy rejects size-1 factors inside compound dims ("(k g)" with one KV head).
    operand_dims = [_drop_unit_factors(d, sizes) for d in operand_dims]
    result_dims = [_drop_unit_factors(d, sizes) for d in result_dims]
    all_dims = [fs for d in (*operand_dims, *result_dims) for fs in parse_dims(d)]
    whole = {fs[0] for fs in all_dims if len(fs) == 1}
    only_compound = sorted({f for fs in all_dims for f in fs} - whole)
    # Special factors must be listed in the order they first appear in the rule.
    in_order = list(dict.fromkeys(f for fs in all_dims for f in fs))
    replicated = tuple(f for f in in_order if f not in shardable)
    rule = ", ".join(operand_dims) + " -> " + ", ".join(result_dims)

    @custom_partitioning
    def op(*xs):
        return tuple(fn(*xs))

    def shardings(mesh, arg_shapes):
        axes = choose_factor_axes(mesh, arg_shapes, operand_dims, shardable, sizes)
        args = tuple(NamedSharding(mesh, spec_for(d, axes)) for d in operand_dims)
        results = tuple(NamedSharding(mesh, spec_for(d, axes)) for d in result_dims)
        return axes, args, results

    def partition(mesh, arg_shapes, result_shape):
        axes, args, results = shardings(mesh, arg_shapes)
        local = fn if local_fn is None or not axes else local_fn(axes)
        return mesh, lambda *xs: tuple(local(*xs)), results, args

    def infer(mesh, arg_shapes, result_shape):
        return shardings(mesh, arg_shapes)[2]

    op.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer,
        sharding_rule=rule,
        need_replication_factors=replicated,
        **{f: sizes[f] for f in only_compound},
    )

    @custom_vmap
    def batched_op(*xs):
        return op(*xs)

    @batched_op.def_vmap
    def _vmap_rule(axis_size, in_batched, *xs):
        # One call per element of the mapped axis: correct for every op, and the kernels'
        # own batch axis already fills the GPU.
        mapped = [x for x, b in zip(xs, in_batched, strict=True) if b]

        def one(slices):
            it = iter(slices)
            return op(*[next(it) if b else x for x, b in zip(xs, in_batched, strict=True)])

        outs = jax.lax.map(one, mapped)
        return outs, tuple(True for _ in outs)

    return batched_op(*arrays)
