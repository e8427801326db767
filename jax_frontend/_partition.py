"""The ops on arrays sharded over their heads under plain ``jax.jit`` (outside ``shard_map``).

Attention and KV writes are independent per kv head, so a device holding some kv heads (and
the q heads of their GQA groups) runs the op on them alone. Inside ``shard_map`` the ops see
their local heads already. Outside it, XLA's partitioner cannot split a custom call (a Pallas
kernel, an FFI kernel) and would gather every operand onto every device, the whole KV cache
included. So, when a traced call runs with more than one device:

- over a mesh of Explicit axes (sharding in types), the op reads its operands' shardings at
  trace time and runs in a ``shard_map`` over the cache's head axes (the other operands laid
  out as it needs: heads sharded with the cache, tables and lengths replicated);
- otherwise (Auto axes: shardings chosen by the partitioner after tracing) the op is a
  ``custom_partitioning`` whose rule shards the heads like the cache's head dim and keeps
  every other dim whole, so each device runs the op on its own heads with no communication.

Heads whose count the mesh axes do not divide run replicated (gathered), as XLA would. Set
``PREFIXKV_JAX_PARTITION=0`` to turn this off: ``jax.export`` of a function whose inputs are
sharded over several devices needs it (it cannot serialize a custom_partitioning).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import threading

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# operand roles: where an operand's head dim is, and which head factor it has
Q = "q"  # [tokens, q heads, head_dim] (q, the attention output)
LSE = "lse"  # [tokens, q heads]
KV = "kv"  # [tokens, kv heads, head_dim] (write_kv's key and value)
CACHE = "cache"  # [blocks, block_size, kv heads, head_dim], or HND [blocks, kv heads, ...]
REP = None  # replicated (tables, lengths, slots, scales)

_state = threading.local()


@contextlib.contextmanager
def _local():
    """While an op is traced on its local heads: no partitioning of the calls it makes."""
    prev = getattr(_state, "local", False)
    _state.local = True
    try:
        yield
    finally:
        _state.local = prev


def _head_dim(role, layout: str) -> int | None:
    if role in (Q, LSE, KV):
        return 1
    if role == CACHE:
        return 1 if layout == "HND" else 2
    return None


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, jax.core.Tracer, np.ndarray))


def _jax_array(x):
    """numpy operands as JAX arrays: a custom_partitioning takes no closed-over constants."""
    return jax.numpy.asarray(x) if isinstance(x, np.ndarray) else x


def _mode(operands) -> str | None:
    """"explicit", "auto" or None (run the op as it is) for a call with ``operands``."""
    if getattr(_state, "local", False) or os.environ.get("PREFIXKV_JAX_PARTITION", "1") == "0":
        return None
    tracers = [x for x in operands if isinstance(x, jax.core.Tracer)]
    if not tracers:
        return None  # eager: each array's own placement
    if any(type(x).__name__ != "DynamicJaxprTracer" for x in tracers):
        return None  # under vmap or jvp: custom_partitioning has no batching or jvp rule
    if jax.device_count() == 1:
        return None
    mesh = jax.sharding.get_abstract_mesh()
    if tuple(getattr(mesh, "manual_axes", ())):
        return None  # inside shard_map: the operands are local already
    explicit = getattr(jax.sharding.AxisType, "Explicit", None)
    for x in operands:
        if _is_array(x):
            sharding = getattr(jax.typeof(x), "sharding", None)
            types = tuple(getattr(getattr(sharding, "mesh", None), "axis_types", ()) or ())
            if explicit is not None and explicit in types:
                return "explicit"
    return "auto"


def _axes_tuple(entry) -> tuple:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _head_axes(specs, roles, layout, mesh_shape, num_kv_heads) -> tuple:
    """The mesh axes the kv heads are split over: the first cache's head-dim axes (else a
    key's or q's), when their sizes divide num_kv_heads; () otherwise (replicated)."""
    for want in (CACHE, KV, Q):
        for spec, role in zip(specs, roles, strict=True):
            if role != want or spec is None:
                continue
            d = _head_dim(role, layout)
            axes = _axes_tuple(spec[d] if d < len(spec) else None)
            if axes and num_kv_heads % math.prod(mesh_shape[a] for a in axes) == 0:
                return axes
    return ()


def _spec(role, rank: int, layout: str, axes: tuple) -> P:
    entries = [None] * rank
    d = _head_dim(role, layout)
    if d is not None and axes:
        entries[d] = axes[0] if len(axes) == 1 else axes
    return P(*entries)


@dataclasses.dataclass(frozen=True)
class _Call:
    """One op call to partition: ``fn(*operands)`` with the arrays among operands split."""

    fn: object
    operands: tuple
    roles: tuple
    out_roles: tuple
    layout: str
    num_kv_heads: int
    group: int

    @property
    def arrays(self) -> list[int]:
        return [i for i, x in enumerate(self.operands) if _is_array(x)]

    def run_local(self, *arrays):
        ops = list(self.operands)
        for i, a in zip(self.arrays, arrays, strict=True):
            ops[i] = a
        with _local():
            return self.fn(*ops)


def by_heads(fn, operands, roles, out_roles, *, layout: str, num_kv_heads: int,
             num_q_heads: int | None = None):
    """``fn(*operands)``, split over the kv heads when the call is traced on several devices
    (module doc). roles: one per operand (Q, KV, CACHE or REP; only arrays are split, other
    operands pass as they are); out_roles: one per output of ``fn`` (a tuple of outputs)."""
    mode = _mode(operands)
    if mode is None:
        return fn(*operands)
    group = 1 if num_q_heads is None else num_q_heads // num_kv_heads
    call = _Call(fn, tuple(operands), tuple(roles), tuple(out_roles), layout, num_kv_heads,
                 group)
    if mode == "explicit":
        return _explicit(call)
    return _custom_partitioned(call)


def _explicit(call: _Call):
    idx = call.arrays
    arrays = [_jax_array(call.operands[i]) for i in idx]
    roles = [call.roles[i] for i in idx]
    types = [jax.typeof(a) for a in arrays]
    mesh = next(t.sharding.mesh for t in types if getattr(t.sharding, "mesh", None) is not None
                and not t.sharding.mesh.empty)
    specs = [t.sharding.spec for t in types]
    axes = _head_axes(specs, roles, call.layout, mesh.shape, call.num_kv_heads)
    in_specs = tuple(_spec(r, a.ndim, call.layout, axes) for r, a in zip(roles, arrays,
                                                                         strict=True))
    laid = [a if s == t.sharding.spec else jax.sharding.reshard(a, NamedSharding(mesh, s))
            for a, s, t in zip(arrays, in_specs, types, strict=True)]
    out_ranks = {Q: 3, LSE: 2, KV: 3, CACHE: 4}
    out_specs = tuple(_spec(r, out_ranks[r], call.layout, axes) for r in call.out_roles)
    return jax.shard_map(call.run_local, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)(*laid)


def _rule(call: _Call, ranks) -> str:
    """The Shardy sharding rule: the kv heads one factor ``k`` (q heads ``(k g)``), every other
    dim a factor of its own (outputs share their inputs' factors)."""
    heads = {Q: "(k g)" if call.group > 1 else "k", LSE: "(k g)" if call.group > 1 else "k",
             KV: "k", CACHE: "k"}
    names = iter(f"x{i}" for i in range(10_000))
    ins, first = [], {}
    roles = [call.roles[i] for i in call.arrays]
    for role, rank in zip(roles, ranks, strict=True):
        d = _head_dim(role, call.layout)
        dims = [heads[role] if j == d else next(names) for j in range(rank)]
        first.setdefault(role, dims)
        ins.append(" ".join(dims))
    outs = []
    for role in call.out_roles:
        if role == LSE:
            outs.append(" ".join(first[Q][:2]))
        else:
            outs.append(" ".join(first[role]))
    return ", ".join(ins) + " -> " + ", ".join(outs)


def _custom_partitioned(call: _Call):
    from jax.experimental.custom_partitioning import custom_partitioning

    idx = call.arrays
    arrays = [_jax_array(call.operands[i]) for i in idx]
    roles = [call.roles[i] for i in idx]
    out_ranks = {Q: 3, LSE: 2, KV: 3, CACHE: 4}

    def shardings(mesh, arg_shapes):
        specs = [getattr(getattr(a, "sharding", None), "spec", None) for a in arg_shapes]
        axes = _head_axes(specs, roles, call.layout, mesh.shape, call.num_kv_heads)
        args = tuple(NamedSharding(mesh, _spec(r, len(a.shape), call.layout, axes))
                     for r, a in zip(roles, arg_shapes, strict=True))
        outs = tuple(NamedSharding(mesh, _spec(r, out_ranks[r], call.layout, axes))
                     for r in call.out_roles)
        return args, outs

    def infer(mesh, arg_shapes, result_shape):
        return shardings(mesh, arg_shapes)[1]

    def partition(mesh, arg_shapes, result_shape):
        args, outs = shardings(mesh, arg_shapes)
        return mesh, call.run_local, outs, args

    op = custom_partitioning(call.run_local)
    sizes = {"g": call.group} if call.group > 1 else {}
    op.def_partition(partition=partition, infer_sharding_from_operands=infer,
                     sharding_rule=_rule(call, [a.ndim for a in arrays]), **sizes)
    return op(*arrays)


# ------------------------------------------------------------------ block copies: any dims but 0
BLOCKS = "blocks"  # [num_blocks, *block_shape]: a cache
BUFFER = "buffer"  # [n, len(caches), *block_shape]: gather_blocks' buffer
_LEAD = {BLOCKS: 1, BUFFER: 2}  # leading dims that stay whole


def by_blocks(fn, operands, roles, out_roles):
    """``fn(*operands)`` for the block copies (copy/gather/scatter): a block's elements are
    copied independently, so every dim of a block (all but the block axis) may stay sharded as
    the first cache is; ids and the block axis stay whole. roles: BLOCKS, BUFFER or REP per
    operand; out_roles: per output of ``fn`` (a tuple). Caches of differing block shapes run
    as they are."""
    mode = _mode(operands)
    shapes = {tuple(x.shape[_LEAD[r]:]) for x, r in zip(operands, roles, strict=True)
              if r is not None and _is_array(x)}
    if mode is None or len(shapes) != 1:
        return fn(*operands)
    call = _Call(fn, tuple(operands), tuple(roles), tuple(out_roles), "", 0, 1)
    idx = call.arrays
    arrays = [_jax_array(operands[i]) for i in idx]
    aroles = [roles[i] for i in idx]
    rank = len(next(iter(shapes)))

    def entries(specs):
        """The block dims' spec entries: the first cache's (else the buffer's)."""
        for want in (BLOCKS, BUFFER):
            for spec, role in zip(specs, aroles, strict=True):
                if role == want and spec is not None:
                    e = tuple(spec)[_LEAD[role]:]
                    return e + (None,) * (rank - len(e))
        return (None,) * rank

    def spec(role, ndim, block):
        return P(*([None] * ndim)) if role is None else P(*([None] * _LEAD[role]), *block)

    if mode == "explicit":
        types = [jax.typeof(a) for a in arrays]
        mesh = next(t.sharding.mesh for t in types if not t.sharding.mesh.empty)
        block = entries([t.sharding.spec for t in types])
        in_specs = tuple(spec(r, a.ndim, block) for r, a in zip(aroles, arrays, strict=True))
        laid = [a if s == t.sharding.spec else jax.sharding.reshard(a, NamedSharding(mesh, s))
                for a, s, t in zip(arrays, in_specs, types, strict=True)]
        out_specs = tuple(spec(r, None, block) for r in out_roles)
        return jax.shard_map(call.run_local, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)(*laid)

    from jax.experimental.custom_partitioning import custom_partitioning

    def shardings(mesh, arg_shapes):
        block = entries([getattr(getattr(a, "sharding", None), "spec", None)
                         for a in arg_shapes])
        args = tuple(NamedSharding(mesh, spec(r, len(a.shape), block))
                     for r, a in zip(aroles, arg_shapes, strict=True))
        return args, tuple(NamedSharding(mesh, spec(r, None, block)) for r in out_roles)

    def partition(mesh, arg_shapes, result_shape):
        args, outs = shardings(mesh, arg_shapes)
        return mesh, call.run_local, outs, args

    dims = " ".join(f"e{j}" for j in range(rank))  # the block dims, shared by every operand
    names = iter(f"x{i}" for i in range(10_000))
    ins, lead = [], {}
    for k, (r, a) in enumerate(zip(aroles, arrays, strict=True)):
        if r is None:
            ins.append(" ".join(next(names) for _ in range(a.ndim)))
        else:
            lead[k] = [next(names) for _ in range(_LEAD[r])]
            ins.append(" ".join(lead[k] + [dims]))
    cache_ins = [k for k, r in enumerate(aroles) if r == BLOCKS]
    outs = []
    for j, r in enumerate(out_roles):
        # a cache output keeps its input cache's block axis; a buffer's leading dims are new
        k = cache_ins[j] if r == BLOCKS and j < len(cache_ins) else None
        head = lead[k] if k is not None else [next(names) for _ in range(_LEAD[r])]
        outs.append(" ".join(head + [dims]))
    op = custom_partitioning(call.run_local)
    op.def_partition(partition=partition,
                     infer_sharding_from_operands=lambda m, a, r: shardings(m, a)[1],
                     sharding_rule=", ".join(ins) + " -> " + ", ".join(outs))
    return op(*arrays)
