"""Attention plans: a batch step's metadata checked once, for the attention call of every layer.

A model calls attention once per layer with the same block tables, lengths and options; the
wrappers of :mod:`._ops` check all of it on every call (on the CPU ~30 us of a small decode's
~60 us). FlashInfer splits the same work into ``wrapper.plan(...)`` once per step and
``wrapper.run(q, kv_cache)`` per layer; :func:`plan_paged_attention` and
:func:`plan_shared_prefix_attention` do that for these ops:

    plan = plan_paged_attention(block_tables, kv_lens, cu_q_lens, k_cache=k_caches[0],
                                num_q_heads=32)
    for layer in range(num_layers):
        out = plan.run(q[layer], k_caches[layer], v_caches[layer])

The plan runs the wrapper's static and value checks once, keeps its own copies of the
metadata on the caches' device (changing the caller's tensors afterwards changes nothing) and
picks the backend once. ``run`` checks only that q and the caches have the planned shapes,
dtypes and device (else the wrapper's error for them), then calls the same custom op the
wrapper calls, with the same arguments: the results are those of the wrapper, exactly. On
the CPU, a shared-prefix plan also settles once which prefix groups the torch backend reads
through each sequence's table (_native._cascade_groups): a batch whose groups all dissolve
runs as paged attention over the joined tables, as that backend would.

Plans are host-side objects, built once per step outside ``torch.compile`` and CUDA-graph
capture (building one may read cu_q_lens on the host); ``run`` itself works in both (with
``out=``, ``lse=`` and a ``workspace=``, it allocates nothing on the triton backend), and
``update`` plans a later step of the same shapes into the same tensors, so a captured graph
replays it. ``prefixkv.jax_frontend`` has plans of the same names and arguments.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..paged import validate
from ..paged.spec import dtype_name
from ._ops import (
    _at_most,
    _guard_buffers,
    _index_tensors,
    _layout_key,
    _no_neg_bits,
    _on,
    _op_scales,
    _prefix_then_own_tables,
    _run_attention,
    _scale_floats,
    _scale_tensors,
    _static_check,
    _tensors,
    _vouch,
    _vouched,
    _want_values,
)
from ._registry import platform_of, select

Tensor = torch.Tensor


def _cache_like(k_cache, num_q_heads, dtype) -> tuple[torch.dtype, tuple]:
    """(q's dtype, q's shape without its token count) of a plan from its arguments."""
    if not isinstance(k_cache, Tensor):
        raise TypeError(f"k_cache: expected a torch.Tensor (one layer's key cache), got "
                        f"{type(k_cache).__name__}")
    dtype = validate.check_plan_heads_and_dtype(k_cache, num_q_heads, dtype)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype, got {type(dtype).__name__}")
    head_dim = k_cache.shape[-1] if k_cache.dim() else 0
    return dtype, (int(num_q_heads), head_dim)


def _num_tokens(cu_q_lens, num_seqs: int, num_tokens) -> int:
    """q's token count: ``num_tokens`` when given (checked), else num_seqs for a decode, else
    cu_q_lens's last entry (read on the host; one sync when it lives on a device)."""
    if num_tokens is not None:
        return validate.check_plan_num_tokens(num_tokens, cu_q_lens is None, num_seqs)
    if cu_q_lens is None:
        return num_seqs
    if cu_q_lens.dim() != 1 or cu_q_lens.numel() == 0:
        return 0  # the static check names cu_q_lens's shape
    return int(cu_q_lens[-1])


def _owned(tensors, given):
    """``tensors`` (the metadata as the plan left them) as the plan's own: one still sharing
    memory with the caller's tensor (``given``; None: a tensor the plan made) is cloned, so
    that the caller's later writes to its buffers never reach a checked plan."""
    out = []
    for t, src in zip(tensors, given, strict=True):
        if (t is not None and src is not None and t.device == src.device
                and t.untyped_storage().data_ptr() == src.untyped_storage().data_ptr()):
            t = t.clone()
        out.append(t)
    return tuple(out)


def _as_int32(**named) -> tuple:
    """The metadata with int64 tensors (torch's default integer dtype, SGLang's seq_lens) cast
    to int32, prefixkv's index dtype: once per step here, where the wrappers refuse them rather
    than cast on every call. A value outside int32 is named first when values are checked (host
    tensors unless PREFIXKV_VALUE_CHECKS=0, device ones in checked mode); else it is cast as
    given, as unchecked metadata is taken. Other dtypes pass unchanged (the static checks name
    them)."""
    out = []
    for name, t in named.items():
        if t is not None and t.dtype == torch.int64:
            if t.numel() and _want_values(t):
                validate.check_fits_int32(name, t)
            t = t.to(torch.int32)
        out.append(t)
    return tuple(out)


def _shapes(metadata, n: int) -> tuple:
    """The shape of each of ``n`` metadata arguments (None for one not given, or None)."""
    padded = (*metadata, *(None,) * (n - len(metadata)))
    return tuple(None if t is None else tuple(t.shape) for t in padded)


#: The metadata parameters of each op a plan runs, in the op's order (for update's errors).
_META_NAMES = {
    "paged_attention": ("block_tables", "kv_lens", "cu_q_lens"),
    "shared_prefix_attention": ("prefix_block_tables", "prefix_lens", "prefix_ids",
                                "block_tables", "kv_lens", "cu_q_lens"),
}


class AttentionPlan:
    """One step's attention metadata, checked and on the caches' device; :meth:`run` per
    layer, :meth:`update` for the next step's metadata of the same shapes. Made by
    :func:`plan_paged_attention` or :func:`plan_shared_prefix_attention`."""

    def __init__(self, make, metadata: tuple, k_cache, names: tuple):
        # make(*metadata) -> (op, meta on the device, the caller's tensors, options, q shape,
        # q dtype, tokens_fixed): the checks and routing of plan_*; kept for update
        self._make = make
        op, meta, given, self._options, q_shape, self._dtype, fixed = make(*metadata)
        # the names and shapes of the metadata as the caller passed it, for update's errors
        self._names = names
        self._given = _shapes(metadata, len(names))
        self._op = op
        self._meta = _owned(meta, given)
        self._q_shape = torch.Size(q_shape)
        self._k_shape = k_cache.shape
        self._kv_dtype = k_cache.dtype
        self._device = k_cache.device
        # q's token count is the planned one (a decode, or a ragged batch whose cu_q_lens
        # were value-checked); else any, as the wrapper with value checks off takes
        self._tokens_fixed = fixed

    def update(self, *metadata) -> AttentionPlan:
        """Plan the next step's metadata (the plan function's positional arguments, its
        options kept) into this plan's own tensors, in place: a CUDA graph captured over
        :meth:`run` replays with it (FlashInfer's CUDA-graph buffers). The metadata is checked
        as when planning, and must plan to the same op and shapes (pad the batch, as for
        the capture); else a ValueError naming the argument, and the plan is unchanged.
        Copies run on the current stream, after the work already queued. Returns the plan."""
        op, meta, _, _, q_shape, _, fixed = self._make(*metadata)
        for name, old, new in zip(self._names, self._given, _shapes(metadata, len(self._names)),
                                  strict=True):
            if (old is None) != (new is None):
                raise ValueError(f"{name}: {'None' if new is None else 'given'}, where the "
                                 f"plan was made {'without' if old is None else 'with'} it; "
                                 f"make a new plan")
            if old != new:
                raise ValueError(f"{name}: shape {new}, where the plan was made with {old}; "
                                 f"update keeps a plan's shapes (pad the batch, or make a "
                                 f"new plan)")
        names = _META_NAMES[self._op]
        if op != self._op:  # only a shared-prefix plan's route can change
            raise ValueError(f"prefix_block_tables: this metadata plans {op}, where the plan runs "
                             f"{self._op} (the CPU reads small prefix groups through each "
                             f"sequence's table); make a new plan")
        if q_shape != self._q_shape:  # the same shapes: a ragged batch's cu_q_lens[-1]
            raise ValueError(f"cu_q_lens: plans {q_shape[0]} query tokens, where the plan has "
                             f"{self._q_shape[0]}; update keeps a plan's shapes (pad the "
                             f"batch, or make a new plan)")
        for name, old, new in zip(names, self._meta, meta, strict=True):
            # the caller's shapes are the planned ones: what still differs comes from values
            # (the prefix groups the CPU keeps)
            if old is not None and (old.shape != new.shape or old.dtype != new.dtype):
                raise ValueError(f"{name}: plans shape {tuple(new.shape)}, where the plan has "
                                 f"{tuple(old.shape)}; update keeps a plan's shapes (pad the "
                                 f"batch, or make a new plan)")
        for old, new in zip(self._meta, meta, strict=True):
            if old is not None:
                old.copy_(new)
        self._tokens_fixed = fixed
        return self

    @property
    def op(self) -> str:
        """The custom op each run calls: "paged_attention" or "shared_prefix_attention" (a
        shared-prefix plan with a sliding window, or whose prefix groups the CPU backend
        would all read through the sequences' tables, runs as paged attention)."""
        return self._op

    def __repr__(self) -> str:
        return (f"AttentionPlan(op={self._op!r}, q={tuple(self._q_shape)} "
                f"{dtype_name(self._dtype)}, caches={tuple(self._k_shape)} "
                f"{dtype_name(self._kv_dtype)} on {self._device})")

    def _check_inputs(self, q, k_cache, v_cache, compiling: bool = False) -> None:
        """The errors of a run whose q or caches are not the planned ones, by name (the
        planned device first: the meta device's error then names a tensor elsewhere);
        ``compiling``: q's token count not compared (run)."""
        for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        for name, t, shape, dtype in (("k_cache", k_cache, self._k_shape, self._kv_dtype),
                                      ("v_cache", v_cache, self._k_shape, self._kv_dtype),
                                      ("q", q, self._q_shape, self._dtype)):
            if t.device != self._device:
                raise ValueError(f"{name}: expected it on the planned device {self._device}, "
                                 f"got {t.device}")
            if t.dtype != dtype:
                raise TypeError(f"{name}: expected the planned {dtype_name(dtype)}, got "
                                f"{dtype_name(t.dtype)}")
            if name == "q" and compiling:
                same = t.shape[1:] == shape[1:]
            else:
                same = t.shape == shape or (name == "q" and t.shape[1:] == shape[1:]
                                            and not self._tokens_fixed)
            if not same:
                raise ValueError(f"{name}: expected the planned shape {tuple(shape)}, got "
                                 f"{tuple(t.shape)}")
        _tensors(q=q, k_cache=k_cache, v_cache=v_cache)

    def run(self, q, k_cache, v_cache, *, return_lse=False, sinks=None, k_scale=None,
            v_scale=None, out=None, lse=None, workspace=None):
        """The planned attention for one layer: the wrapper's result for (q, k_cache, v_cache)
        with the planned metadata and options.

        q: [num_tokens, num_q_heads, head_dim] of the planned dtype; k_cache, v_cache: the
        planned shape and dtype, on the planned device. return_lse, sinks, k_scale, v_scale,
        out, lse, workspace: as in :func:`~prefixkv.torch_frontend.paged_attention` (they may
        differ per layer)."""
        # While compiling, q's token count is left to the op's checks: compared with the
        # plan's int (a constant where the plan is a closure's, a global or an attribute, as
        # an engine keeps a step's metadata), it fixed q's size, and every new token count
        # compiled a graph (fullgraph: an error at torch's recompile limit)
        compiling = torch.compiler.is_compiling()
        if not (type(q) is Tensor and type(k_cache) is Tensor and type(v_cache) is Tensor
                and k_cache.shape == self._k_shape and v_cache.shape == self._k_shape
                and (q.shape[1:] == self._q_shape[1:] if compiling
                     else q.shape == self._q_shape) and q.dtype == self._dtype
                and k_cache.dtype == self._kv_dtype and v_cache.dtype == self._kv_dtype
                and q.device == self._device and k_cache.device == self._device
                and v_cache.device == self._device):
            self._check_inputs(q, k_cache, v_cache, compiling)
        # the rest reads only layouts (q's shape is the planned one now): once per layout in
        # plain eager mode, as the wrappers (_ops._layout_key)
        layout = _layout_key("plan.run", (q, k_cache, v_cache, sinks, out, lse, workspace,
                                          *_scale_tensors(k_scale, v_scale)),
                             (), (return_lse, *_scale_floats(k_scale, v_scale)))
        if _vouched(layout) is None:
            _no_neg_bits(q=q, k_cache=k_cache, v_cache=v_cache)  # as the wrapper
            if not isinstance(return_lse, (bool, np.bool_)):
                raise TypeError(f"return_lse: expected a bool, got "
                                f"{type(return_lse).__name__}")
            if sinks is not None:
                _tensors(q=q, sinks=sinks, raw=True)
                validate.check_sinks(sinks, self._q_shape[1])
            validate.check_kv_scale("k_scale", k_scale, k_cache)  # a scale of a float cache:
            validate.check_kv_scale("v_scale", v_scale, v_cache)  # refused by name
            _guard_buffers(q, out, lse, workspace, k_cache, v_cache, sinks, k_scale, v_scale)
            _vouch(layout, True)
        return _run_attention(self._op, (q, k_cache, v_cache, *self._meta, *self._options), q,
                              out, lse, workspace, return_lse, sinks,
                              _op_scales(k_scale, v_scale, k_cache, v_cache))

    __call__ = run


def plan_paged_attention(block_tables, kv_lens, cu_q_lens=None, *, k_cache, num_q_heads: int,
                         dtype=None, scale=None, causal=True, sliding_window=None,
                         logits_soft_cap=None, backend=None, num_tokens=None) -> AttentionPlan:
    """A plan of :func:`~prefixkv.torch_frontend.paged_attention` for one batch step:
    ``plan.run(q, k_cache, v_cache)`` per layer equals ``paged_attention(q, k_cache, v_cache,
    block_tables, kv_lens, cu_q_lens, ...)`` with these options.

    block_tables, kv_lens, cu_q_lens, scale, causal, sliding_window, logits_soft_cap, backend:
    as in paged_attention (checked here, once); the index tensors may also be int64 (cast to
    int32 here, once, after checking the values fit). k_cache: one layer's key cache (every layer's
    caches have its shape, dtype and device). num_q_heads: q's heads. dtype: q's dtype
    (default k_cache's; required with float8_e4m3fn caches). num_tokens: q's token count
    (a padded batch's bucket); default num_seqs for a decode, else cu_q_lens's last entry,
    read here (one sync when it lives on a device: give num_tokens to plan without one).
    ``plan.update(block_tables, kv_lens, cu_q_lens)`` plans a later step of the same shapes
    into the same tensors (CUDA graphs).
    """
    make = functools.partial(_paged, k_cache=k_cache, num_q_heads=num_q_heads, dtype=dtype,
                             scale=scale, causal=causal, sliding_window=sliding_window,
                             logits_soft_cap=logits_soft_cap, backend=backend,
                             num_tokens=num_tokens)
    return AttentionPlan(make, (block_tables, kv_lens, cu_q_lens), k_cache,
                         _META_NAMES["paged_attention"])


def _paged(block_tables, kv_lens, cu_q_lens=None, *, k_cache, num_q_heads, dtype, scale,
           causal, sliding_window, logits_soft_cap, backend, num_tokens) -> tuple:
    """plan_paged_attention's checks and metadata (AttentionPlan's ``make``)."""
    q_dtype, q_tail = _cache_like(k_cache, num_q_heads, dtype)
    _index_tensors(block_tables=block_tables, kv_lens=kv_lens, cu_q_lens=cu_q_lens)
    given = (block_tables, kv_lens, cu_q_lens)
    block_tables, kv_lens, cu_q_lens = _as_int32(block_tables=block_tables, kv_lens=kv_lens,
                                                 cu_q_lens=cu_q_lens)
    num_seqs = block_tables.shape[0] if block_tables.dim() else 0
    tokens = _num_tokens(cu_q_lens, num_seqs, num_tokens)
    q = torch.empty((max(tokens, 0), *q_tail), dtype=q_dtype, device="meta")
    dims = _static_check(
        validate.check_paged_attention, q, k_cache, k_cache, block_tables, kv_lens, cu_q_lens,
        scale=scale, causal=causal, sliding_window=sliding_window,
        logits_soft_cap=logits_soft_cap)
    checked = _want_values(block_tables, kv_lens, cu_q_lens)
    if checked:
        validate.check_paged_attention_values(dims, block_tables, kv_lens, cu_q_lens)
    else:
        kv_lens = _at_most(kv_lens, dims.max_blocks_per_seq * dims.block_size)
    meta = _on(k_cache.device, block_tables, kv_lens, cu_q_lens)
    select("paged_attention", platform_of(k_cache), backend)  # refused here, not per layer
    options = (dims.scale, bool(causal), None if sliding_window is None else int(sliding_window),
               None if logits_soft_cap is None else float(logits_soft_cap), backend)
    return ("paged_attention", meta, given, options, q.shape, q_dtype,
            checked or cu_q_lens is None or num_tokens is not None)


def plan_shared_prefix_attention(prefix_block_tables, prefix_lens, prefix_ids, block_tables,
                                 kv_lens, cu_q_lens=None, *, k_cache, num_q_heads: int,
                                 dtype=None, scale=None, logits_soft_cap=None,
                                 sliding_window=None, backend=None,
                                 num_tokens=None) -> AttentionPlan:
    """A plan of :func:`~prefixkv.torch_frontend.shared_prefix_attention` for one batch step:
    ``plan.run(q, k_cache, v_cache)`` per layer equals ``shared_prefix_attention(q, k_cache,
    v_cache, prefix_block_tables, prefix_lens, prefix_ids, block_tables, kv_lens, cu_q_lens,
    ...)`` with these options. Arguments as in :func:`plan_paged_attention`; the prefix ones
    as in shared_prefix_attention. ``plan.update(prefix_block_tables, ..., cu_q_lens)`` as
    in plan_paged_attention."""
    make = functools.partial(_shared, k_cache=k_cache, num_q_heads=num_q_heads, dtype=dtype,
                             scale=scale, logits_soft_cap=logits_soft_cap,
                             sliding_window=sliding_window, backend=backend,
                             num_tokens=num_tokens)
    return AttentionPlan(make, (prefix_block_tables, prefix_lens, prefix_ids, block_tables,
                                kv_lens, cu_q_lens), k_cache,
                         _META_NAMES["shared_prefix_attention"])


def _shared(prefix_block_tables, prefix_lens, prefix_ids, block_tables, kv_lens,
            cu_q_lens=None, *, k_cache, num_q_heads, dtype, scale, logits_soft_cap,
            sliding_window, backend, num_tokens) -> tuple:
    """plan_shared_prefix_attention's checks and metadata (AttentionPlan's ``make``)."""
    q_dtype, q_tail = _cache_like(k_cache, num_q_heads, dtype)
    _index_tensors(prefix_block_tables=prefix_block_tables, prefix_lens=prefix_lens,
                   prefix_ids=prefix_ids, block_tables=block_tables, kv_lens=kv_lens,
                   cu_q_lens=cu_q_lens)
    given = (prefix_block_tables, prefix_lens, prefix_ids, block_tables, kv_lens, cu_q_lens)
    (prefix_block_tables, prefix_lens, prefix_ids, block_tables, kv_lens,
     cu_q_lens) = _as_int32(prefix_block_tables=prefix_block_tables, prefix_lens=prefix_lens,
                            prefix_ids=prefix_ids, block_tables=block_tables, kv_lens=kv_lens,
                            cu_q_lens=cu_q_lens)
    num_seqs = block_tables.shape[0] if block_tables.dim() else 0
    tokens = _num_tokens(cu_q_lens, num_seqs, num_tokens)
    q = torch.empty((max(tokens, 0), *q_tail), dtype=q_dtype, device="meta")
    sdims = _static_check(
        validate.check_shared_prefix_attention, q, k_cache, k_cache, prefix_block_tables,
        prefix_lens, prefix_ids, block_tables, kv_lens, cu_q_lens, scale=scale,
        logits_soft_cap=logits_soft_cap, sliding_window=sliding_window)
    dims = sdims.attention
    sources = (prefix_block_tables, prefix_lens, prefix_ids, block_tables, kv_lens, cu_q_lens)
    checked = _want_values(*sources)
    fixed = checked or cu_q_lens is None or num_tokens is not None
    if checked:
        validate.check_shared_prefix_attention_values(sdims, *sources)
    else:
        prefix_lens = _at_most(prefix_lens, sdims.max_prefix_blocks * dims.block_size)
        kv_lens = _at_most(kv_lens, dims.max_blocks_per_seq * dims.block_size)
    meta = _on(k_cache.device, prefix_block_tables, prefix_lens, prefix_ids, block_tables,
               kv_lens, cu_q_lens)
    soft_cap = None if logits_soft_cap is None else float(logits_soft_cap)
    platform = platform_of(k_cache)
    if sliding_window is not None:  # as the wrapper: paged attention over the joined tables
        select("paged_attention", platform, backend)
        tables, lens = _prefix_then_own_tables(*meta[:5], dims.block_size)
        options = (dims.scale, True, int(sliding_window), soft_cap, backend)
        return ("paged_attention", (tables, lens, meta[5]), (None, None, given[5]), options,
                q.shape, q_dtype, fixed)
    fn = select("shared_prefix_attention", platform, backend)
    groups = getattr(fn, "plan_groups", None)
    if groups is not None and not validate.is_fp8(k_cache):
        meta = (*groups(num_q_heads, k_cache, soft_cap, *meta[:5], meta[5]), meta[5])
        if meta[0].shape[0] == 0:  # every group read through its sequences' tables
            select("paged_attention", platform, backend)
            options = (dims.scale, True, None, soft_cap, backend)
            return ("paged_attention", meta[3:], given[3:], options, q.shape, q_dtype, fixed)
    options = (dims.scale, soft_cap, backend)
    return ("shared_prefix_attention", meta, given, options, q.shape, q_dtype, fixed)


__all__ = ["AttentionPlan", "plan_paged_attention", "plan_shared_prefix_attention"]
