"""Kernel results inside ``jax.shard_map``.

Under ``check_vma`` (shard_map's default) every value records the mesh axes it varies over.
A value XLA computes from some inputs varies over the union of theirs; a kernel's results
(an FFI call's, a Pallas call's) and a loop carry that starts as a constant carry none, and
a while_loop's carry or the branches of ``platform_dependent`` must agree. Both helpers give
such values the union of what their inputs vary over: :func:`match_varying` casts arrays,
:func:`out_struct` declares a Pallas ``out_shape`` (JAX has spelled that field ``vma``, a
frozenset of axis names, and, since, ``manual_axis_type``; both are handled).
"""

from __future__ import annotations

import inspect

import jax
from jax import lax


def varying_axes(x) -> frozenset:
    """The shard_map mesh axes ``x`` varies over (empty outside shard_map)."""
    aval = jax.typeof(x)
    if hasattr(aval, "vma"):
        return frozenset(aval.vma)
    mat = getattr(aval, "mat", None) or getattr(aval, "manual_axis_type", None)
    return frozenset(getattr(mat, "varying", ()))


def _union(refs) -> frozenset:
    """The mesh axes any of ``refs`` (pytrees are flattened) varies over."""
    return frozenset().union(*(varying_axes(r) for r in jax.tree.leaves(refs)))


def match_varying(outs, *refs):
    """``outs`` (a pytree of arrays) cast to vary over every mesh axis one of ``refs`` varies
    over; unchanged outside shard_map."""
    axes = _union(refs)
    if not axes:
        return outs

    def cast(x):
        missing = axes - varying_axes(x)
        return lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x

    return jax.tree.map(cast, outs)


def _mat_like(refs, axes: frozenset):
    for r in refs:
        aval = jax.typeof(r)
        mat = getattr(aval, "mat", None) or getattr(aval, "manual_axis_type", None)
        if mat is not None and hasattr(mat, "update"):
            return mat.update(varying=axes)
    return None


def out_struct(shape, dtype, *refs) -> jax.ShapeDtypeStruct:
    """``jax.ShapeDtypeStruct(shape, dtype)`` varying over every mesh axis one of ``refs``
    (the kernel's inputs; pytrees are flattened) varies over."""
    leaves = jax.tree.leaves(refs)
    axes = _union(leaves)
    params = inspect.signature(jax.ShapeDtypeStruct).parameters
    if "manual_axis_type" in params:
        mat = _mat_like(leaves, axes)
        if mat is not None:
            return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)
    if "vma" in params:
        return jax.ShapeDtypeStruct(shape, dtype, vma=axes)
    return jax.ShapeDtypeStruct(shape, dtype)
