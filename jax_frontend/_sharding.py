"""Tensor parallelism: the ops inside ``jax.shard_map`` with the KV heads sharded over a mesh axis.

Attention and KV writes are independent per kv head (the q heads of a GQA group sit on the
device holding their kv head), so each device runs the op on its local heads with no
communication; block tables, lengths and slot mappings are replicated.

Example (4 devices, 8 kv heads: 2 per device)::

    mesh = jax.make_mesh((4,), ("tp",))
    attn = tensor_parallel_paged_attention(mesh, "tp", sliding_window=4096)
    out = jax.jit(attn)(q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens)
    # q: P(None, "tp", None); k_cache, v_cache: P(None, None, "tp", None); the rest replicated

Under plain ``jax.jit`` the ops on head-sharded arrays split themselves the same way
(``_partition.py``): these helpers are for laying out inputs not yet sharded, and for code that
wants the shard_map explicit.

With ``kv_layout="HND"`` in the config the caches are [num_blocks, num_kv_heads, block_size,
head_dim], sharded P(None, "tp", None, None): 1 or 2 kv heads per TPU chip read by the Pallas
kernel with no tile padding.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from . import _ops


def kv_head_specs(axis: str, kv_layout: str = "NHD") -> dict[str, P]:
    """PartitionSpecs of the tensor-parallel layout: heads sharded over ``axis`` (the caches'
    dim 2, or dim 1 for ``kv_layout="HND"``)."""
    from ..paged import validate

    if not isinstance(axis, str):
        raise TypeError(f"axis: expected a mesh axis name (str), got {type(axis).__name__}")
    kv_layout = validate.check_kv_layout(kv_layout)
    cache = P(None, axis, None, None) if kv_layout == "HND" else P(None, None, axis, None)
    return {"q": P(None, axis, None), "cache": cache, "lse": P(None, axis), "replicated": P()}


def _layout(config) -> str:
    """A config's ``kv_layout`` (checked)."""
    from ..paged import validate

    return validate.check_kv_layout(config.get("kv_layout", "NHD"))


def _num_kv_heads(k_cache, layout: str) -> int:
    from ..paged import validate

    return validate.cache_dims(k_cache, layout)[2]


def _laid_out(mesh, pairs):
    """Each (array, spec) of ``pairs`` as an array sharded by ``spec`` where the mesh has
    Explicit axes (``jax.make_mesh``'s default from jax 0.7 on), whose shard_map takes only
    inputs already sharded as its in_specs say; as it is otherwise (shard_map lays it out). A
    None array stays None."""
    explicit = getattr(jax.sharding.AxisType, "Explicit", None)
    if explicit is None or explicit not in tuple(getattr(mesh, "axis_types", ())):
        return [x for x, _ in pairs]
    return [None if x is None else jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, s))
            for x, s in pairs]


def _check_mesh(mesh, axis) -> None:
    """A TypeError naming ``mesh`` unless it is a jax Mesh (an error when the returned
    function first ran, naming nothing), a ValueError naming ``axis`` unless it is one of its
    axes."""
    if not isinstance(mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis not in mesh.shape:
        raise ValueError(f"axis: expected one of the mesh axes {tuple(mesh.shape)}, got {axis!r}")


def _check_config(op, config: dict) -> None:
    """``config`` checked when the helper is made, not at its first call (inside a jitted
    step, far from where it was given): keywords ``op`` takes (a TypeError naming the first
    other one), and the attention options' values (validate's errors, by name)."""
    import inspect

    from ..paged import validate

    keywords = {p.name for p in inspect.signature(op).parameters.values()
                if p.kind == p.KEYWORD_ONLY}
    for key in config:
        if key not in keywords:
            raise TypeError(f"{key}: not a keyword argument of {op.__name__}; it takes "
                            f"{', '.join(sorted(keywords))}")
    options = ("scale", "causal", "sliding_window", "logits_soft_cap")
    validate.check_attention_options(**{k: config[k] for k in options if k in config})


def _check_heads(mesh, axis: str, num_kv_heads: int) -> None:
    n = mesh.shape[axis]
    if num_kv_heads % n:
        raise ValueError(f"num_kv_heads={num_kv_heads} must be divisible by the size of mesh "
                         f"axis {axis!r} ({n}); replicate the kv heads first")


def tensor_parallel_paged_attention(mesh, axis: str = "tp", **config):
    """``paged_attention`` with q heads and kv heads sharded over mesh axis ``axis``.

    Returns ``f(q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens=None)`` with the
    shapes of :func:`prefixkv.jax_frontend.paged_attention`; ``config`` holds its keyword
    arguments (scale, causal, sliding_window, logits_soft_cap, return_lse, sinks, kv_layout,
    backend);
    ``sinks`` (all q heads, float[num_q_heads]) is sharded with the q heads.
    num_kv_heads must be divisible by the axis size. Outputs are sharded like q (lse
    P(None, axis)). Works under jax.jit, over meshes of Auto or Explicit axes (inputs not yet
    sharded so are laid out first); pass inputs already sharded to avoid re-layouts.
    """
    layout = _layout(config)
    spec = kv_head_specs(axis, layout)
    _check_mesh(mesh, axis)
    _check_config(_ops.paged_attention, config)
    return_lse = bool(config.get("return_lse", False))
    config = dict(config)
    sinks = config.pop("sinks", None)
    if "scale" not in config or config["scale"] is None:
        config["_default_scale"] = True

    def run(q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens=None):
        _check_heads(mesh, axis, _num_kv_heads(k_cache, layout))
        kw = {k: v for k, v in config.items() if k != "_default_scale"}
        if config.get("_default_scale"):
            kw["scale"] = float(q.shape[-1]) ** -0.5

        def local(q, k, v, bt, kl, cu, sk):
            return _ops.paged_attention(q, k, v, bt, kl, cu, sinks=sk, **kw)

        out_specs = (spec["q"], spec["lse"]) if return_lse else spec["q"]
        cu_spec = None if cu_q_lens is None else spec["replicated"]
        sinks_spec, sk = None, None
        if sinks is not None:  # a model parameter, given unsharded: laid out with the q heads
            sinks_spec = P(axis)
            sk = jax.device_put(sinks, jax.sharding.NamedSharding(mesh, sinks_spec))
        in_specs = (spec["q"], spec["cache"], spec["cache"], spec["replicated"],
                    spec["replicated"], cu_spec, sinks_spec)
        args = _laid_out(mesh, zip((q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens, sk),
                                   in_specs, strict=True))
        return jax.shard_map(local, mesh=mesh, out_specs=out_specs, in_specs=in_specs)(*args)

    return run


def tensor_parallel_write_kv(mesh, axis: str = "tp", **config):
    """``write_kv`` with the kv heads of key/value and the caches sharded over ``axis``;
    returns ``f(key, value, k_cache, v_cache, slot_mapping) -> (k_cache, v_cache)``.
    Donate the caches to the jitted caller for in-place updates on every device. ``config``:
    write_kv's keyword arguments (k_scale, v_scale, kv_layout, backend)."""
    layout = _layout(config)
    spec = kv_head_specs(axis, layout)
    _check_mesh(mesh, axis)
    _check_config(_ops.write_kv, config)

    def run(key, value, k_cache, v_cache, slot_mapping):
        _check_heads(mesh, axis, _num_kv_heads(k_cache, layout))

        def local(key, value, k, v, slots):
            return _ops.write_kv(key, value, k, v, slots, **config)

        in_specs = (spec["q"], spec["q"], spec["cache"], spec["cache"], spec["replicated"])
        args = _laid_out(mesh, zip((key, value, k_cache, v_cache, slot_mapping), in_specs,
                                   strict=True))
        return jax.shard_map(local, mesh=mesh, out_specs=(spec["cache"], spec["cache"]),
                             in_specs=in_specs)(*args)

    return run
