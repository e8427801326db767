"""The ops on sharded arrays under plain ``jax.jit`` (outside ``shard_map``).

Attention and KV writes are independent per kv head, so a device holding some kv heads (and
the q heads of their GQA groups) runs the op on them alone; a block copy moves each element of
a block on its own, so a device copies its part of every block. Inside ``shard_map`` the ops
see their local parts already. Outside it, XLA's partitioner cannot split a custom call (a
Pallas kernel, an FFI kernel) and would gather every operand onto every device, the whole KV
cache included. So, when a traced call runs with more than one device:

- over a mesh of Explicit axes (sharding in types), the op reads its operands' shardings at
  trace time and runs in a ``shard_map`` (the operands laid out as it needs: heads, or block
  dims, sharded as the cache's; tables, lengths and ids replicated);
- otherwise (Auto axes: shardings chosen by the partitioner after tracing) the op is a
  ``custom_partitioning`` with the same layout, as a callback and as a Shardy rule, so each
  device runs the op on its own part with no communication.

Either way a returned cache has its input cache's sharding (a loop carries it, a donated one
is updated in place): a cache sharded otherwise than the op splits (over its blocks, its
head_dim, heads the axes do not divide) is gathered for the op and its result sliced back, and
write_kv's keys follow the cache (a replicated cache stays replicated, its keys gathered).

Heads whose count the mesh axes do not divide run replicated (gathered), as XLA would, and so
does a single kv head (MQA: nothing to split). Over Auto axes a call traced under ``vmap`` or
``jvp`` runs as it is (custom_partitioning has no rules for them), and a split call that a
``vmap`` reaches later (``vmap(jit(op))``) runs unsplit under it (a custom_vmap rule); over
Explicit axes the ``shard_map`` takes both. Set ``PREFIXKV_JAX_PARTITION=0`` to turn the Auto
path off: ``jax.export`` of a function whose inputs are sharded over several devices on Auto
axes needs it (it cannot serialize a custom_partitioning). It is read when a function is
traced: set it before the first trace (``jax.clear_caches()`` drops traces made before).
Inside a ``shard_map`` the operands are taken as local: one manual over only some mesh axes
gathers operands still sharded over the others (run the op under a shard_map over all of them).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from itertools import count

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# operand roles
Q = "q"  # [tokens, q heads, head_dim] (q, the attention output)
LSE = "lse"  # [tokens, q heads]
KV = "kv"  # [tokens, kv heads, head_dim] (write_kv's key and value)
CACHE = "cache"  # [blocks, block_size, kv heads, head_dim], or HND [blocks, kv heads, ...]
BLOCKS = "blocks"  # [num_blocks, *block_shape]: a cache of the block copies
BUFFER = "buffer"  # [n, len(caches), *block_shape]: gather_blocks' buffer
REP = None  # replicated (tables, lengths, slots, ids, scales)

_state = threading.local()


@contextlib.contextmanager
def _local():
    """While an op is traced on its local part: no partitioning of the calls it makes."""
    prev = getattr(_state, "local", False)
    _state.local = True
    try:
        yield
    finally:
        _state.local = prev


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, jax.core.Tracer, np.ndarray))


def _jax_array(x):
    """numpy operands as JAX arrays: a custom_partitioning takes no closed-over constants."""
    return jax.numpy.asarray(x) if isinstance(x, np.ndarray) else x


def _mode(operands) -> str | None:
    """"explicit", "auto" or None (run the op as it is) for a call with ``operands``."""
    if getattr(_state, "local", False):
        return None
    tracers = [x for x in operands if isinstance(x, jax.core.Tracer)]
    if not tracers:
        return None  # eager: each array's own placement
    if jax.device_count() == 1:
        return None
    if tuple(getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ())):
        return None  # inside shard_map: the operands are local already
    # Explicit axes first: their sharded operands cannot run as they are (a reshape of a
    # sharded cache is a ShardingTypeError), and a shard_map takes vmap, jvp and export
    explicit = getattr(jax.sharding.AxisType, "Explicit", None)
    for x in operands:
        if _is_array(x):
            mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
            if explicit is not None and explicit in tuple(getattr(mesh, "axis_types", ())):
                return "explicit"
    if os.environ.get("PREFIXKV_JAX_PARTITION", "1") == "0":
        return None
    if any(type(x).__name__ != "DynamicJaxprTracer" for x in tracers):
        return None  # under vmap or jvp: custom_partitioning has no batching or jvp rule
    return "auto"


def _entry(axes: tuple):
    """A PartitionSpec entry for mesh ``axes``."""
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _axes(entry) -> tuple:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


class _Heads:
    """Split over the kv heads: ``plan`` is the mesh axes of the heads."""

    rank = {Q: 3, LSE: 2, KV: 3, CACHE: 4}

    def __init__(self, layout: str, num_kv_heads: int, group: int) -> None:
        self.layout, self.num_kv_heads, self.group = layout, num_kv_heads, group

    def head_dim(self, role) -> int | None:
        if role == CACHE:
            return 1 if self.layout == "HND" else 2
        return None if role is REP else 1

    def plan(self, specs, roles, mesh_shape) -> tuple:
        """The first cache's head-dim axes (else q's: attention slices a replicated cache for
        free) when their sizes divide the kv heads; () otherwise (replicated). Never a key's:
        write_kv returns the caches, which keep their layout (a head-sharded result of a
        replicated cache would have to be gathered back)."""
        for want in (CACHE, Q):
            for spec, role in zip(specs, roles, strict=True):
                if role != want or spec is None:
                    continue
                d = self.head_dim(role)
                axes = _axes(spec[d] if d < len(spec) else None)
                if axes and self.num_kv_heads % math.prod(mesh_shape[a] for a in axes) == 0:
                    return axes
        return ()

    def spec(self, role, ndim: int | None, axes: tuple) -> P:
        entries = [None] * (self.rank[role] if ndim is None else ndim)
        d = self.head_dim(role)
        if d is not None:
            entries[d] = _entry(axes)
        return P(*entries)

    def rule(self, roles, ranks, out_roles) -> tuple[str, dict]:
        """The Shardy rule: the kv heads one factor ``k`` (q heads ``(k g)``), every other dim
        a factor of its own; outputs share their inputs' factors (lse: q's first two). An op
        returning caches (write_kv) shares no factor between operands: each cache result
        has its own cache's factors, so it keeps that cache's sharding, not the keys'."""
        qh = "(k g)" if self.group > 1 else "k"
        heads = {} if CACHE in out_roles else {Q: qh, LSE: qh, KV: "k", CACHE: "k"}
        names = (f"x{i}" for i in count())
        ins, seen = [], {}
        for role, rank in zip(roles, ranks, strict=True):
            d = self.head_dim(role)
            dims = [heads[role] if j == d and role in heads else next(names)
                    for j in range(rank)]
            seen.setdefault(role, []).append(dims)
            ins.append(" ".join(dims))
        outs = [" ".join(seen[Q][0][:2] if r == LSE else seen[Q][0] if r == Q else given)
                for r, given in zip(out_roles, _results(seen, out_roles), strict=True)]
        return ", ".join(ins) + " -> " + ", ".join(outs), (
            {"g": self.group} if heads and self.group > 1 else {})


class _Blocks:
    """Split over the block dims (all but the block axis): ``plan`` is their spec entries."""

    lead = {BLOCKS: 1, BUFFER: 2}  # leading dims that stay whole

    def __init__(self, block_rank: int) -> None:
        self.block_rank = block_rank

    def plan(self, specs, roles, mesh_shape) -> tuple:
        """The first cache's block-dim entries (else the buffer's)."""
        for want in (BLOCKS, BUFFER):
            for spec, role in zip(specs, roles, strict=True):
                if role == want and spec is not None:
                    e = tuple(spec)[self.lead[role]:]
                    return e + (None,) * (self.block_rank - len(e))
        return (None,) * self.block_rank

    def spec(self, role, ndim: int | None, block: tuple) -> P:
        if role is REP:
            return P(*([None] * ndim))
        return P(*([None] * self.lead[role]), *block)

    def rule(self, roles, ranks, out_roles) -> tuple[str, dict]:
        """The Shardy rule: gather_blocks' block dims shared by every cache and its buffer
        (whose leading dims are its own). An op returning caches shares no factor between
        operands: each cache result has its own cache's factors, so keeps its sharding."""
        dims = [f"e{j}" for j in range(self.block_rank)]
        names = (f"x{i}" for i in count())
        shared = BLOCKS not in out_roles
        ins, seen = [], {}
        for role, rank in zip(roles, ranks, strict=True):
            if role is REP:
                ins.append(" ".join(next(names) for _ in range(rank)))
                continue
            lead = [next(names) for _ in range(self.lead[role])]
            block = dims if shared else [next(names) for _ in dims]
            seen.setdefault(role, []).append(lead + block)
            ins.append(" ".join(lead + block))
        outs = [" ".join(given or [next(names) for _ in range(self.lead[role])] + dims)
                for role, given in zip(out_roles, _results(seen, out_roles), strict=True)]
        return ", ".join(ins) + " -> " + ", ".join(outs), {}


class _Whole:
    """No split: every operand and output whole on every device. Over Explicit axes the op
    still runs in a shard_map (the kernels need Manual axes); over Auto ones it runs as is,
    except an op returning only caches: a custom_partitioning, so each cache keeps its
    sharding (run as is, a kernel's result would come back replicated)."""

    def plan(self, specs, roles, mesh_shape) -> None:
        return None

    def spec(self, role, ndim: int | None, plan) -> P:
        return P()

    def rule(self, roles, ranks, out_roles) -> tuple[str, dict] | None:
        """The Shardy rule: no factor shared, a cache result its own cache's; None (run as
        is) unless every result is a cache."""
        if not all(r in (CACHE, BLOCKS) for r in out_roles):
            return None
        names = (f"x{i}" for i in count())
        ins, seen = [], {}
        for role, rank in zip(roles, ranks, strict=True):
            dims = [next(names) for _ in range(rank)]
            seen.setdefault(role, []).append(dims)
            ins.append(" ".join(dims))
        outs = [" ".join(given) for given in _results(seen, out_roles)]
        return ", ".join(ins) + " -> " + ", ".join(outs), {}


def _results(seen: dict, out_roles) -> list:
    """Per output: the j-th cache result (role CACHE or BLOCKS) gets the j-th operand of its
    role (``seen``: per role, its operands in order), any other output None."""
    taken: dict = {}
    out = []
    for r in out_roles:
        j = taken[r] = taken.get(r, -1) + 1
        given = seen.get(r, []) if r in (CACHE, BLOCKS) else []
        out.append(given[j] if j < len(given) else None)
    return out


def _padded(spec, ndim: int) -> tuple:
    """A PartitionSpec's entries to rank ``ndim`` (P("a") and P("a", None) compare unequal)."""
    return tuple(spec) + (None,) * (ndim - len(tuple(spec)))


def by_heads(fn, operands, roles, out_roles, *, layout: str, num_kv_heads: int,
             num_q_heads: int | None = None):
    """``fn(*operands)`` split over the kv heads when traced on several devices (module doc).
    roles: Q, KV, CACHE or REP per operand (arrays only are split; other operands pass as they
    are); out_roles: per output of ``fn`` (a tuple)."""
    group = 1 if num_q_heads is None else num_q_heads // num_kv_heads
    if num_kv_heads == 1:  # MQA: nothing to split (and Shardy takes no size-1 factor in (k g))
        return _split(fn, operands, roles, out_roles, _Whole())
    return _split(fn, operands, roles, out_roles, _Heads(layout, num_kv_heads, group))


def by_blocks(fn, operands, roles, out_roles):
    """``fn(*operands)`` for a block copy, split over the block dims as the first cache is.
    roles: BLOCKS, BUFFER or REP per operand; out_roles: per output of ``fn`` (a tuple).
    Caches of differing block shapes are not split (whole on every device)."""
    shapes = {tuple(x.shape[_Blocks.lead[r]:]) for x, r in zip(operands, roles, strict=True)
              if r is not REP and _is_array(x)}
    if len(shapes) != 1:
        return _split(fn, operands, roles, out_roles, _Whole())
    return _split(fn, operands, roles, out_roles, _Blocks(len(next(iter(shapes)))))


def _split(fn, operands, roles, out_roles, how):
    """Run ``fn(*operands)`` split as ``how`` (a _Heads or _Blocks) lays it out."""
    mode = _mode(operands)
    if mode is None:
        return fn(*operands)
    idx = [i for i, x in enumerate(operands) if _is_array(x)]
    arrays = [_jax_array(operands[i]) for i in idx]
    aroles = [roles[i] for i in idx]

    def local(*parts):
        ops = list(operands)
        for i, a in zip(idx, parts, strict=True):
            ops[i] = a
        with _local():
            return fn(*ops)

    def specs(mesh_shape, arg_specs, ndims):
        plan = how.plan(arg_specs, aroles, mesh_shape)
        return (tuple(how.spec(r, n, plan) for r, n in zip(aroles, ndims, strict=True)),
                tuple(how.spec(r, None, plan) for r in out_roles))

    # per output: the array index of the cache it returns (its sharding kept), else None
    sources = _results({r: [i for i, x in enumerate(aroles) if x == r] for r in (CACHE, BLOCKS)},
                       out_roles)

    if mode == "explicit":
        types = [jax.typeof(a) for a in arrays]
        mesh = next(t.sharding.mesh for t in types if not t.sharding.mesh.empty)
        in_specs, out_specs = specs(mesh.shape, [t.sharding.spec for t in types],
                                    [a.ndim for a in arrays])
        laid = [a if s == t.sharding.spec else jax.sharding.reshard(a, NamedSharding(mesh, s))
                for a, s, t in zip(arrays, in_specs, types, strict=True)]
        outs = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)(*laid)
        back = []
        for o, i in zip(outs, sources, strict=True):
            want = None if i is None else types[i].sharding.spec
            if want is not None and _padded(want, o.ndim) != _padded(
                    jax.typeof(o).sharding.spec, o.ndim):
                o = jax.sharding.reshard(o, NamedSharding(mesh, want))
            back.append(o)
        return tuple(back)

    rule = how.rule(aroles, [a.ndim for a in arrays], out_roles)
    if rule is None:
        return fn(*operands)
    from jax.experimental.custom_partitioning import custom_partitioning

    def shardings(mesh, arg_shapes):
        arg_specs = [getattr(getattr(a, "sharding", None), "spec", None) for a in arg_shapes]
        ins, outs = specs(mesh.shape, arg_specs, [len(a.shape) for a in arg_shapes])
        return (tuple(NamedSharding(mesh, s) for s in ins),
                tuple(NamedSharding(mesh, s) for s in outs))

    def partition(mesh, arg_shapes, result_shape):
        args, outs = shardings(mesh, arg_shapes)
        return mesh, local, outs, args  # a cache result laid out otherwise is resharded back

    def infer(mesh, arg_shapes, result_shape):
        """(GSPMD) the results' shardings: a cache result its input cache's."""
        outs = shardings(mesh, arg_shapes)[1]
        return tuple(o if i is None or getattr(arg_shapes[i], "sharding", None) is None
                     else arg_shapes[i].sharding for o, i in zip(outs, sources, strict=True))

    op = custom_partitioning(local)
    op.def_partition(partition=partition, infer_sharding_from_operands=infer,
                     sharding_rule=rule[0], **rule[1])

    # custom_partitioning has no batching rule: a vmap reaching the traced call later
    # (vmap(jit(op))) runs the op unsplit, batched as the op itself is
    @jax.custom_batching.custom_vmap
    def call(*parts):
        return op(*parts)

    @call.def_vmap
    def _batched(axis_size, in_batched, *parts):
        del axis_size
        out = jax.vmap(local, in_axes=tuple(0 if b else None for b in in_batched))(*parts)
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return call(*arrays)
