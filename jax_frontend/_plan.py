"""Attention plans for JAX: a batch step's metadata checked once, for every layer's call.

The JAX counterpart of ``prefixkv.torch_frontend``'s plans, with the same names and arguments:

    plan = plan_paged_attention(block_tables, kv_lens, cu_q_lens, k_cache=k_caches[0],
                                num_q_heads=32)            # on the host, once per step
    out = plan.run(q, k_cache, v_cache)                     # per layer, eager or under jit

Making a plan runs the op's static checks and, for host metadata, its value checks (ids in
range, lengths consistent), and puts the metadata on the caches' device once. A plan is a
pytree (its arrays are leaves, its shapes and options static), so a jitted model step takes
it as an argument: its metadata is then checked on the host every step, where traced
metadata handed to the ops inside ``jax.jit`` is never value-checked. ``run`` checks that q
and the caches have the planned shapes and dtypes (the wrapper's error otherwise) and runs
the same backend path as the wrapper: the results are the wrapper's, exactly.

A shared-prefix plan with a sliding window is paged attention over prefix-then-own tables, as
the wrapper runs it. int64 metadata (JAX with x64) is cast to int32 once, after its values
are checked to fit.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from ..paged import validate
from ..paged.spec import dtype_name
from . import _backends, _xla
from ._ops import (
    _at_most,
    _current_platform,
    _is_traced,
    _run_paged_attention,
    _run_shared_prefix_attention,
    _run_value_checks,
    check_static,
)


def _device_of(k_cache):
    """The device of a concrete single-device k_cache, else None (jax's default)."""
    if isinstance(k_cache, jax.Array) and not isinstance(k_cache, jax.core.Tracer):
        devices = k_cache.devices()
        if len(devices) == 1:
            return next(iter(devices))
    return None


def _check_backend(op: str, backend, k_cache) -> None:
    """The wrapper's error for a backend name the op lacks, when the plan is made (not at its
    first run): the platform of k_cache's device (jax's default device for an abstract one),
    as the registry names it (a GPU's device platform "gpu" is "cuda" or "rocm" there)."""
    _backends.REGISTRIES[op].check_known(_current_platform((k_cache,)), backend)


def _as_int32(**named) -> tuple:
    """int64 metadata (x64) as int32 after a host check that the values fit, when values are
    checked (host arrays unless PREFIXKV_VALUE_CHECKS=0; device ones in checked mode): with
    checks off they are cast as given, as unchecked metadata is taken (a table's unused
    entries may hold anything); other dtypes unchanged (the static checks name them)."""
    out = []
    for name, x in named.items():
        if x is not None and hasattr(x, "dtype") and dtype_name(x) == "int64":
            if int(np.prod(x.shape)) and _run_value_checks(x):
                validate.check_fits_int32(name, x)
            x = x.astype(np.int32)
        out.append(x)
    return tuple(out)


def _meta_q(k_cache, num_q_heads, dtype, cu_q_lens, num_seqs: int, num_tokens=None,
            kv_layout="NHD"):
    """A shape-and-dtype stand-in for q, with the checks of k_cache, num_q_heads, dtype and
    num_tokens (q's token count when given; else read from cu_q_lens)."""
    if not hasattr(k_cache, "shape") or not hasattr(k_cache, "dtype"):
        raise TypeError(f"k_cache: expected an array (one layer's key cache), got "
                        f"{type(k_cache).__name__}")
    given = validate.check_plan_heads_and_dtype(k_cache, num_q_heads, dtype, kv_layout)
    try:
        dtype = np.dtype(given)
    except TypeError:
        raise TypeError(f"dtype: expected a dtype, got {given!r}") from None
    if num_tokens is not None:
        num_tokens = validate.check_plan_num_tokens(num_tokens, cu_q_lens is None, num_seqs)
    elif cu_q_lens is None:
        num_tokens = num_seqs
    elif _is_traced(cu_q_lens):
        raise TypeError("cu_q_lens: a plan is made outside jax.jit (its value checks read the "
                        "metadata on the host), got a traced value; with num_tokens= (q's "
                        "token count) it reads none, unchecked as the ops' traced metadata")
    elif not hasattr(cu_q_lens, "shape") or len(cu_q_lens.shape) != 1 or (
            cu_q_lens.shape[0] == 0):
        num_tokens = 0  # the static check names cu_q_lens's type or shape
    else:
        num_tokens = max(int(np.asarray(cu_q_lens[-1])), 0)
    head_dim = int(k_cache.shape[-1]) if len(k_cache.shape) else 0
    return jax.ShapeDtypeStruct((num_tokens, int(num_q_heads), head_dim), dtype)


@jax.tree_util.register_pytree_node_class
class AttentionPlan:
    """One step's attention metadata, checked and on the caches' device; :meth:`run` per
    layer. A pytree: pass it into a jitted function as an argument. Made by
    :func:`plan_paged_attention` or :func:`plan_shared_prefix_attention`."""

    def __init__(self, meta: tuple, static: tuple):
        self._meta = tuple(meta)
        # (op, options, q shape, q dtype name, cache shape, cache dtype name, tokens_fixed)
        self._static = static

    def tree_flatten(self):
        return self._meta, self._static

    @classmethod
    def tree_unflatten(cls, static, meta):
        return cls(tuple(meta), static)

    @property
    def op(self) -> str:
        """The op each run runs: "paged_attention" or "shared_prefix_attention" (a
        shared-prefix plan with a sliding window runs paged attention)."""
        return self._static[0]

    def __repr__(self) -> str:
        op, _, q_shape, q_dtype, k_shape, k_dtype, _ = self._static
        return (f"AttentionPlan(op={op!r}, q={q_shape} {q_dtype}, caches={k_shape} "
                f"{k_dtype})")

    def _check_inputs(self, q, k_cache, v_cache) -> None:
        _, _, q_shape, q_dtype, k_shape, k_dtype, fixed = self._static
        for name, x, shape, dtype in (("k_cache", k_cache, k_shape, k_dtype),
                                      ("v_cache", v_cache, k_shape, k_dtype),
                                      ("q", q, q_shape, q_dtype)):
            if not hasattr(x, "shape") or not hasattr(x, "dtype"):
                raise TypeError(f"{name}: expected an array, got {type(x).__name__}")
            if dtype_name(x) != dtype:
                raise TypeError(f"{name}: expected the planned {dtype}, got {dtype_name(x)}")
            got = tuple(int(d) for d in x.shape)
            if got != shape and (name != "q" or got[1:] != shape[1:] or fixed):
                raise ValueError(f"{name}: expected the planned shape {shape}, got {got}")

    def run(self, q, k_cache, v_cache, *, return_lse=False, sinks=None, k_scale=None,
            v_scale=None):
        """The planned attention for one layer: the wrapper's result for (q, k_cache, v_cache)
        with the planned metadata and options. return_lse, sinks, k_scale, v_scale: as in
        :func:`~prefixkv.jax_frontend.paged_attention` (they may differ per layer)."""
        op, options = self._static[:2]
        check_static(return_lse=return_lse)
        self._check_inputs(q, k_cache, v_cache)
        if op == "paged_attention":
            scale, causal, window, soft_cap, backend, layout = options
            dims = validate.check_paged_attention(
                q, k_cache, v_cache, *self._meta, scale=scale, causal=causal,
                sliding_window=window, logits_soft_cap=soft_cap, return_lse=return_lse,
                sinks=sinks, k_scale=k_scale, v_scale=v_scale, kv_layout=layout)
            out, lse = _run_paged_attention(
                dims, q, k_cache, v_cache, *self._meta, causal=causal, sliding_window=window,
                logits_soft_cap=soft_cap, sinks=sinks, backend=backend, k_scale=k_scale,
                v_scale=v_scale)
        else:
            scale, soft_cap, backend, layout = options
            sdims = validate.check_shared_prefix_attention(
                q, k_cache, v_cache, *self._meta, scale=scale, logits_soft_cap=soft_cap,
                return_lse=return_lse, sinks=sinks, k_scale=k_scale, v_scale=v_scale,
                kv_layout=layout)
            out, lse = _run_shared_prefix_attention(
                sdims, q, k_cache, v_cache, *self._meta, logits_soft_cap=soft_cap, sinks=sinks,
                sliding_window=None, backend=backend, k_scale=k_scale, v_scale=v_scale)
        return (out, lse) if return_lse else out

    __call__ = run


def _static(op, options, q, k_cache, fixed) -> tuple:
    return (op, options, tuple(q.shape), dtype_name(q.dtype),
            tuple(int(d) for d in k_cache.shape), dtype_name(k_cache), bool(fixed))


def plan_paged_attention(block_tables, kv_lens, cu_q_lens=None, *, k_cache, num_q_heads: int,
                         dtype=None, scale=None, causal=True, sliding_window=None,
                         logits_soft_cap=None, kv_layout="NHD", backend=None,
                         num_tokens=None) -> AttentionPlan:
    """A plan of :func:`~prefixkv.jax_frontend.paged_attention` for one batch step, made on
    the host (outside jax.jit): ``plan.run(q, k_cache, v_cache)`` per layer equals
    ``paged_attention(q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens, ...)`` with these
    options.

    block_tables, kv_lens, cu_q_lens, scale, causal, sliding_window, logits_soft_cap,
    kv_layout, backend: as in paged_attention (checked here, once; int64 metadata is cast to
    int32 after a check that the values fit). k_cache: one layer's key cache, or a
    jax.ShapeDtypeStruct of it (every layer's caches have its shape and dtype; the metadata
    goes to its device).
    num_q_heads: q's heads. dtype: q's dtype (default k_cache's; required with
    float8_e4m3fn caches). num_tokens: q's token count (a padded batch's bucket: a static
    shape of the plan, so give it and a new cu_q_lens[-1] never retraces a jitted step);
    default num_seqs for a decode, else cu_q_lens's last entry, read here.
    """
    check_static(scale=scale, causal=causal, sliding_window=sliding_window,
                 logits_soft_cap=logits_soft_cap)
    _check_backend("paged_attention", backend, k_cache)
    block_tables, kv_lens, cu_q_lens = _as_int32(block_tables=block_tables, kv_lens=kv_lens,
                                                 cu_q_lens=cu_q_lens)
    num_seqs = int(block_tables.shape[0]) if len(getattr(block_tables, "shape", ())) else 0
    q = _meta_q(k_cache, num_q_heads, dtype, cu_q_lens, num_seqs, num_tokens, kv_layout)
    dims = validate.check_paged_attention(
        q, k_cache, k_cache, block_tables, kv_lens, cu_q_lens, scale=scale, causal=causal,
        sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, kv_layout=kv_layout)
    checked = _run_value_checks(block_tables, kv_lens, cu_q_lens)
    if checked:
        validate.check_paged_attention_values(dims, block_tables, kv_lens, cu_q_lens)
    device = _device_of(k_cache)
    meta = jax.device_put((block_tables, kv_lens, cu_q_lens), device)
    if not checked:
        meta = (meta[0], _at_most(meta[1], dims.max_blocks_per_seq * dims.block_size), meta[2])
    options = (dims.scale, bool(causal), None if sliding_window is None else int(sliding_window),
               None if logits_soft_cap is None else float(logits_soft_cap), backend, kv_layout)
    return AttentionPlan(meta, _static("paged_attention", options, q, k_cache,
                                       checked or cu_q_lens is None or num_tokens is not None))


def plan_shared_prefix_attention(prefix_block_tables, prefix_lens, prefix_ids, block_tables,
                                 kv_lens, cu_q_lens=None, *, k_cache, num_q_heads: int,
                                 dtype=None, scale=None, logits_soft_cap=None,
                                 sliding_window=None, kv_layout="NHD", backend=None,
                                 num_tokens=None) -> AttentionPlan:
    """A plan of :func:`~prefixkv.jax_frontend.shared_prefix_attention` for one batch step:
    ``plan.run(q, k_cache, v_cache)`` per layer equals ``shared_prefix_attention(q, k_cache,
    v_cache, prefix_block_tables, prefix_lens, prefix_ids, block_tables, kv_lens, cu_q_lens,
    ...)`` with these options. Arguments as in :func:`plan_paged_attention`; the prefix ones
    as in shared_prefix_attention."""
    check_static(scale=scale, logits_soft_cap=logits_soft_cap, sliding_window=sliding_window)
    _check_backend("shared_prefix_attention" if sliding_window is None else "paged_attention",
                   backend, k_cache)
    meta = _as_int32(prefix_block_tables=prefix_block_tables, prefix_lens=prefix_lens,
                     prefix_ids=prefix_ids, block_tables=block_tables, kv_lens=kv_lens,
                     cu_q_lens=cu_q_lens)
    num_seqs = int(meta[3].shape[0]) if len(getattr(meta[3], "shape", ())) else 0
    q = _meta_q(k_cache, num_q_heads, dtype, meta[5], num_seqs, num_tokens, kv_layout)
    sdims = validate.check_shared_prefix_attention(
        q, k_cache, k_cache, *meta, scale=scale, logits_soft_cap=logits_soft_cap,
        sliding_window=sliding_window, kv_layout=kv_layout)
    dims = sdims.attention
    checked = _run_value_checks(*meta)
    if checked:
        validate.check_shared_prefix_attention_values(sdims, *meta)
    meta = jax.device_put(meta, _device_of(k_cache))
    if not checked:
        bs = dims.block_size
        meta = (meta[0], _at_most(meta[1], sdims.max_prefix_blocks * bs), meta[2], meta[3],
                _at_most(meta[4], dims.max_blocks_per_seq * bs), meta[5])
    fixed = checked or meta[5] is None or num_tokens is not None
    soft_cap = None if logits_soft_cap is None else float(logits_soft_cap)
    if sliding_window is not None:  # as the wrapper: paged attention over the joined tables
        tables, lens = _xla.prefix_then_own_tables(*meta[:5], dims.block_size)
        dims = dataclasses.replace(dims, max_blocks_per_seq=int(tables.shape[1]))
        options = (dims.scale, True, int(sliding_window), soft_cap, backend, kv_layout)
        return AttentionPlan((tables, lens, meta[5]),
                             _static("paged_attention", options, q, k_cache, fixed))
    options = (dims.scale, soft_cap, backend, kv_layout)
    return AttentionPlan(meta, _static("shared_prefix_attention", options, q, k_cache, fixed))


__all__ = ["AttentionPlan", "plan_paged_attention", "plan_shared_prefix_attention"]
