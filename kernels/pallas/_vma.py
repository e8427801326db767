"""Output types of Pallas calls inside ``jax.shard_map``.

Under ``check_vma`` (shard_map's default) every value records the mesh axes it varies over,
and ``pallas_call`` wants each output's declared on its ``out_shape``. :func:`out_struct`
declares it as the union of what the kernel's inputs vary over (what an XLA computation of
the same inputs would give). JAX has spelled that field ``vma`` (a frozenset of axis names)
and, since, ``manual_axis_type``; both are handled.
"""

from __future__ import annotations

import inspect

import jax


def varying_axes(x) -> frozenset:
    """The shard_map mesh axes ``x`` varies over (empty outside shard_map)."""
    aval = jax.typeof(x)
    if hasattr(aval, "vma"):
        return frozenset(aval.vma)
    mat = getattr(aval, "mat", None) or getattr(aval, "manual_axis_type", None)
    return frozenset(getattr(mat, "varying", ()))


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
    axes = frozenset().union(*(varying_axes(r) for r in leaves))
    params = inspect.signature(jax.ShapeDtypeStruct).parameters
    if "manual_axis_type" in params:
        mat = _mat_like(leaves, axes)
        if mat is not None:
            return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)
    if "vma" in params:
        return jax.ShapeDtypeStruct(shape, dtype, vma=axes)
    return jax.ShapeDtypeStruct(shape, dtype)
