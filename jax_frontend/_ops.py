"""The public JAX ops: validate, pick a backend per platform, call.

Every op works eagerly and inside ``jax.jit`` (shapes, dtypes and the static config are checked
at trace time; index values are checked on the host when the inputs are concrete host arrays,
or in checked mode, never with a host sync inside a traced function).

Backend choice: ``backend=`` argument, then ``PREFIXKV_<OP>_BACKEND`` / ``PREFIXKV_BACKEND``,
then, with neither, a per-platform choice made inside the traced function with
``jax.lax.platform_dependent`` (TPU: Pallas Mosaic kernels, CUDA: Pallas GPU kernels where
registered, everything else: the XLA composite), so one jitted model runs anywhere.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from ..kernels._vma import match_varying
from ..paged import validate
from ..paged.registry import BackendError
from ..paged.spec import FP8_MAX
from . import _backends, _partition, _xla

__all__ = ["paged_attention", "shared_prefix_attention", "merge_attention_states", "write_kv",
           "copy_blocks", "gather_blocks", "scatter_blocks", "BackendError"]

_ACCELERATORS = ("tpu", "cuda")


def _is_traced(*xs) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(xs))


def check_static(**named) -> None:
    """A TypeError naming the first static argument given a traced value: ``jax.jit(op)``
    traces keyword arguments too unless they are in ``static_argnames``."""
    for name, value in named.items():
        if _is_traced(value):
            raise TypeError(
                f"{name}: a static argument (a Python value fixed at trace time), got a traced "
                f"value; under jax.jit pass it in static_argnames=({name!r}, ...) or bind it "
                f"outside the jitted function (functools.partial)")


def _on_host(*xs) -> bool:
    """All index inputs concrete and host-resident (numpy, or JAX arrays on CPU devices)."""
    for x in jax.tree_util.tree_leaves(xs):
        if isinstance(x, jax.core.Tracer):
            return False
        if isinstance(x, jax.Array):
            try:
                if any(d.platform != "cpu" for d in x.devices()):
                    return False
            except Exception:  # pragma: no cover - deleted or odd arrays
                return False
    return True


def _run_value_checks(*index_arrays) -> bool:
    """Whether to run the host value checks now (never on tracers: that would need a sync)."""
    if _is_traced(*index_arrays):
        return False
    return validate.value_checks_enabled(host_inputs=_on_host(*index_arrays))


def _at_most(lens, capacity: int):
    """Unchecked lengths (traced, or on a device with value checks off) clipped to
    ``capacity`` keys, the most the value checks allow (valid lengths pass unchanged): every
    backend loops over a sequence's kv_len keys, so one garbage length near 2**31 made a
    jitted call of a 2-sequence batch run for minutes."""
    if capacity >= 2**31 - 1:
        return lens
    return jax.numpy.minimum(lens, np.asarray(capacity, np.dtype(lens.dtype)))


def _current_platform(operands=()) -> str:
    """Where an eager call runs, as the registry names platforms ("cpu", "cuda", "rocm",
    "tpu"): the device of its first JAX array operand, else jax's default device."""
    device = None
    for x in jax.tree_util.tree_leaves(operands):
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            try:
                device = next(iter(x.devices()))
                break
            except Exception:  # noqa: BLE001 - a deleted array: decide by the default
                continue
    if device is None:
        default = jax.config.jax_default_device
        if isinstance(default, str):
            return "cuda" if default == "gpu" else default
        device = default if default is not None else jax.devices()[0]
    if device.platform == "gpu":
        version = str(getattr(device.client, "platform_version", "")).lower()
        return "rocm" if "rocm" in version or "hip" in version else "cuda"
    return device.platform


def _dispatch(op: str, backend: str | None, context: dict, call, operands=(), registry=None):
    """Run ``call(impl)`` with the backend chosen for ``op`` (from ``registry``, default the
    op's in _backends.REGISTRIES).

    ``call(impl)`` runs the op with one implementation. Eagerly (no tracer among
    ``operands``: the platform is that of the first concrete JAX array among them, else the
    default device's) the registry picks one backend. Under tracing, TPU and CUDA get their
    best registered backend through ``platform_dependent`` (a branch only where it differs
    from the CPU's), so the traced function runs anywhere; others get the CPU's. An
    explicit request (argument or environment variable) runs that backend where it can run
    here; one for other platforms only (``backend="pallas_tpu"`` traced on a CPU host, to
    export for a TPU) is staged for those platforms, and lowering for any other fails with
    the registry's error.
    """
    reg = _backends.REGISTRIES[op] if registry is None else registry
    traced = _is_traced(*operands)
    if reg.requested(backend) is not None and traced:
        return _requested_elsewhere(reg, backend, context, call, operands)
    if not traced:
        chosen = reg.select(_current_platform(operands), backend, **context)
        return call(chosen.load())
    default = reg.select("cpu", **context).load()
    branches = {}
    for plat in _ACCELERATORS:
        try:
            impl = reg.select(plat, **context).load()
        except BackendError:
            continue
        if impl is not default:
            branches[plat] = impl
    if not branches:
        return call(default)
    # platform_dependent needs one function per platform taking the same operands; the ops
    # close over their operands, so the branches take none.
    per_platform = {plat: (lambda impl=impl: call(impl)) for plat, impl in branches.items()}
    return jax.lax.platform_dependent(default=lambda: call(default), **per_platform)


def _requested_elsewhere(reg, backend, context: dict, call, operands):
    """A traced call with a backend requested: run here when it can, else staged with
    ``platform_dependent`` for the platforms it runs on, the others a branch whose lowering
    raises the registry's BackendError for the platform lowered for."""
    here = _current_platform(operands)
    try:
        return call(reg.select(here, backend, **context).load())
    except BackendError as err:
        refusal = err
    impls, refusals = {}, {}
    for plat in _backends.ALL_PLATFORMS:
        try:
            impls[plat] = reg.select(plat, backend, **context).load()
        except BackendError as err:
            refusals[plat] = str(err)
    if not impls:  # refused everywhere: the reason on its own platform says most
        own = [b.platforms for b in reg if b.name == reg.requested(backend)]
        for plat in own[0] if own else ():
            if plat in refusals:
                raise BackendError(refusals[plat])
        raise refusal
    outs: list = []

    def run(impl):
        out = call(impl)
        outs.append(out)
        return out

    def refused():  # outputs of the staged branches' types, from a primitive that cannot lower
        out = outs[0] if outs else jax.eval_shape(lambda: call(next(iter(impls.values()))))
        leaves, tree = jax.tree_util.tree_flatten(out)
        avals = tuple(jax.core.ShapedArray(x.shape, x.dtype) for x in leaves)
        made = _refused_p().bind(avals=avals, refusals=tuple(sorted(refusals.items())))
        # inside shard_map the branches' types include the mesh axes they vary over, and
        # the primitive's outputs vary over none: each as its staged twin (or the operands)
        made = [match_varying(m, leaf if outs else operands) for m, leaf in
                zip(made, leaves, strict=True)]
        return jax.tree_util.tree_unflatten(tree, made)

    per_platform = {plat: functools.partial(run, impl) for plat, impl in impls.items()}
    return jax.lax.platform_dependent(default=refused, **per_platform)


@functools.cache
def _refused_p():
    """A primitive of no inputs standing for a backend requested on a platform it cannot run
    on: abstract evaluation gives the outputs' types, lowering raises the BackendError."""
    from jax.extend.core import Primitive
    from jax.interpreters import mlir

    p = Primitive("prefixkv_backend_refused")
    p.multiple_results = True
    p.def_abstract_eval(lambda *, avals, refusals: list(avals))

    def lower(ctx, *, avals, refusals):
        messages = dict(refusals)
        for plat in ctx.module_context.platforms:
            if plat in messages:
                raise BackendError(messages[plat])
        raise BackendError(next(iter(messages.values())))

    mlir.register_lowering(p, lower)
    return p


# ----------------------------------------------------------------------------- fp8 caches


def _kv_scales(k_scale, v_scale):
    """Checked k_scale / v_scale as 0-d float32 arrays (traced or concrete) or None, after the
    host value check of concrete host arrays (or any concrete ones in checked mode)."""
    arrays = [s for s in (k_scale, v_scale) if s is not None and hasattr(s, "shape")
              and not isinstance(s, (np.floating, np.integer))]
    if arrays and _run_value_checks(*arrays):
        validate.check_kv_scale_values(k_scale, v_scale)
    return tuple(None if s is None else _scale_array(s) for s in (k_scale, v_scale))


def _scale_array(scale):
    import jax.numpy as jnp

    return jnp.asarray(scale, dtype=jnp.float32).reshape(())


def _quantize_fp8(x, scale):
    """float8_e4m3fn(sat(float32(x) / scale)): the XLA form of quantize_fp8_reference."""
    import jax.numpy as jnp

    y = x.astype(jnp.float32)
    if scale is not None:
        # XLA rewrites x / broadcast(s) as x * broadcast(1 / s), which rounds differently
        # (about 1 in 8 random values): divide by a full-shape operand behind a barrier
        y = y / jax.lax.optimization_barrier(jnp.broadcast_to(scale, y.shape))
    q = jax.lax.bitcast_convert_type(jnp.clip(y, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn),
                                     jnp.uint8)
    # a NaN keeps x's sign, from x's bits: XLA:CPU's fused clip and conversion, and a GPU's
    # division, give every NaN one sign
    bits = jax.lax.bitcast_convert_type(x, jnp.int16 if x.dtype.itemsize == 2 else jnp.int32)
    nan = jnp.where(bits < 0, jnp.uint8(0xFF), jnp.uint8(0x7F))
    return jax.lax.bitcast_convert_type(jnp.where(jnp.isnan(y), nan, q), jnp.float8_e4m3fn)


def _dequantize(cache, scale, dtype):
    """float32(cache) * scale rounded to ``dtype``; with ``scale`` None the e4m3 values
    themselves, exact in every float dtype."""
    import jax.numpy as jnp

    if scale is None:
        return cache.astype(dtype)  # exact: every e4m3 value is one of dtype's
    return (cache.astype(jnp.float32) * scale).astype(dtype)


def _dequantized_blocks(q, k_cache, v_cache, k_scale, v_scale, *tables):
    """fp8 caches as caches in q's dtype for every attention backend: the dequantized blocks
    the tables name (:func:`_xla.named_blocks`). A scale None: that cache's exact e4m3 values
    (_fp8_call then folds k_scale into the logits' scale)."""
    k_scale, v_scale = _kv_scales(k_scale, v_scale)
    k_cache, v_cache, *tables = _xla.named_blocks(k_cache, v_cache, *tables)
    return (_dequantize(k_cache, k_scale, q.dtype), _dequantize(v_cache, v_scale, q.dtype),
            *tables)


def _layout_call(impl, context, k_cache, v_cache, tables):
    """(context, k_cache, v_cache, tables, kwargs) for attention backend ``impl``: caches of
    the call's layout as they are when the backend reads that layout (kwargs then pass
    ``kv_layout``), else HND caches given as NHD ones (:func:`_xla.nhd_blocks`: a copy of
    the blocks the call reads)."""
    layout = context["kv_layout"]
    if layout == "NHD":
        return context, k_cache, v_cache, tables, {}
    if _backends.reads_layout(impl, layout):
        return context, k_cache, v_cache, tables, {"kv_layout": layout}
    k_cache, v_cache, *tables = _xla.nhd_blocks(k_cache, v_cache, *tables)
    return {**context, "kv_layout": "NHD"}, k_cache, v_cache, tuple(tables), {}


# ------------------------------------------------------------------------------- attention


def paged_attention(q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens=None, *, scale=None,
                    causal=True, sliding_window=None, logits_soft_cap=None, return_lse=False,
                    sinks=None, k_scale=None, v_scale=None, kv_layout="NHD", backend=None):
    """Ragged paged attention over cached prefixes: decode, prefill, chunked prefill, mixed.

    q: [num_tokens, num_q_heads, head_dim] float32|float16|bfloat16.
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], q's dtype, or
    float8_e4m3fn read as float32(cache) * k_scale (v_scale): k_scale, v_scale None (1.0), a
    positive float or a float32 array of one element, may be traced (fp8 caches only; every
    backend of paged_attention reads the fp8 bytes itself, but for the TPU kernel's shapes
    and the GPU kernel's cache sizes that docs/ops.md lists, where the blocks the tables name
    are dequantized into q's dtype).
    block_tables: i32[num_seqs, max_blocks_per_seq]; entries in [0, num_blocks) for the blocks
    holding tokens (others are never read as keys).
    kv_lens: i32[num_seqs], cached prefix + this step's tokens.
    cu_q_lens: i32[num_seqs + 1], or None for decode (one query token per sequence).
    scale: logits scale, default head_dim ** -0.5. causal: mask keys after the query position.
    sliding_window: int or None, keys t > p - sliding_window only. logits_soft_cap: float or
    None, logits become cap * tanh(x / cap). num_q_heads must be a multiple of num_kv_heads
    (MHA, GQA, MQA). Static config is Python values (trace-time constants under jit).
    sinks: None or float[num_q_heads] (an array, may be traced), attention sinks (gpt-oss):
    one logit per q head added to the softmax denominator (applied after the kernel, see
    docs/ops.md).
    kv_layout: "NHD" (the caches as above, vLLM's) or "HND": caches [num_blocks, num_kv_heads,
    block_size, head_dim], whose minor dims a TPU tiles with no padding whatever the head
    count (the TPU kernel reads them for any num_kv_heads; every backend reads them in
    place, docs/ops.md).
    backend: None (per platform), "xla", "pallas_tpu", "pallas_gpu", "pallas_interpret" or
    "pallas_gpu_interpret" (the TPU / GPU kernel run by the Pallas interpreter on CPU).

    Query token j of sequence s sits at p = kv_lens[s] - q_len + j. Returns out
    [num_tokens, num_q_heads, head_dim] in q's dtype and, with return_lse, lse
    f32[num_tokens, num_q_heads] (natural log); a row that sees no key gives 0 and -inf.
    """
    check_static(scale=scale, causal=causal, sliding_window=sliding_window,
                 logits_soft_cap=logits_soft_cap, return_lse=return_lse)
    dims = validate.check_paged_attention(
        q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens, scale=scale, causal=causal,
        sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, return_lse=return_lse,
        sinks=sinks, k_scale=k_scale, v_scale=v_scale, kv_layout=kv_layout)
    if _run_value_checks(block_tables, kv_lens, cu_q_lens):
        validate.check_paged_attention_values(dims, block_tables, kv_lens, cu_q_lens)
    else:
        kv_lens = _at_most(kv_lens, dims.max_blocks_per_seq * dims.block_size)
    out, lse = _run_paged_attention(dims, q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens,
                                    causal=causal, sliding_window=sliding_window,
                                    logits_soft_cap=logits_soft_cap, sinks=sinks,
                                    backend=backend, k_scale=k_scale, v_scale=v_scale)
    return (out, lse) if return_lse else out


def _local_dims(dims, q, k_cache):
    """``dims`` for the heads of ``q`` and ``k_cache`` (fewer on a device of a sharded call)."""
    hq, hk = int(q.shape[1]), validate.cache_dims(k_cache, dims.kv_layout)[2]
    if (hq, hk) == (dims.num_q_heads, dims.num_kv_heads):
        return dims
    return dataclasses.replace(dims, num_q_heads=hq, num_kv_heads=hk)


def _reads_fp8(impl, context) -> bool:
    """Whether backend ``impl`` reads float8_e4m3fn caches itself for a call of ``context``."""
    reads = getattr(impl, "reads_fp8", None)
    return bool(reads is not None and reads(**context))


def _concrete_scale(scale) -> float | None:
    """A k_scale given on the host as a Python float (None: 1.0); None for a JAX array, traced
    (no value yet) or on a device (its value would be a host read each call, and each value
    another compile of the kernel it becomes a static argument of)."""
    if scale is None:
        return 1.0
    if isinstance(scale, jax.Array):
        return None
    return float(np.asarray(scale, dtype=np.float32).reshape(()))


def _fp8_call(impl, context, q, k_cache, v_cache, k_scale, v_scale, tables, run, scale):
    """``run(k_cache, v_cache, *tables, **kwargs)`` for fp8 caches: the raw caches and the
    scales (0-d float32 arrays or None) when ``impl`` reads fp8 (the Pallas kernels), else the
    blocks the tables name dequantized into q's dtype (tables remapped).

    Dequantized there, the keys are their exact e4m3 values, as the kernels that read fp8
    decode them: keys rounded to a 16-bit q's dtype after the scale put a bfloat16 q outside
    ATTENTION_TOLERANCE (logits ~30 moved by ~0.06). A backend that applies scales to caches
    in q's dtype (``impl.takes_scales``: the TPU kernel, SMEM scales) gets both scales, traced
    or not, as for fp8 bytes: k_scale on the logits, v_scale on the float32 output before its
    rounding. Otherwise k_scale is folded into the logits' scale (``scale=scale * k_scale``, a
    static float: k_scale given on the host); a k_scale that is a JAX array (traced, or on a
    device) keeps the keys scaled, rounded to q's dtype. The values stay float32(cache) *
    v_scale rounded to q's dtype: the kernel rounds its output to q's dtype already, and a
    v_scale applied after it would round twice."""
    if _reads_fp8(impl, context):
        ks, vs = _kv_scales(k_scale, v_scale)
        return run(k_cache, v_cache, *tables, k_scale=ks, v_scale=vs)
    if getattr(impl, "takes_scales", False):
        ks, vs = _kv_scales(k_scale, v_scale)
        return run(*_dequantized_blocks(q, k_cache, v_cache, None, None, *tables),
                   k_scale=ks, v_scale=vs)
    ks = _concrete_scale(k_scale)
    if ks is None:
        return run(*_dequantized_blocks(q, k_cache, v_cache, k_scale, v_scale, *tables))
    _kv_scales(k_scale, None)  # its value checks (_dequantized_blocks checks v_scale's)
    return run(*_dequantized_blocks(q, k_cache, v_cache, None, v_scale, *tables),
               scale=scale * ks)


def _run_paged_attention(dims, q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens, *, causal,
                         sliding_window, logits_soft_cap, sinks, backend, k_scale=None,
                         v_scale=None):
    """(out, lse) of a checked paged_attention call (``dims``: its AttentionDims); fp8 caches
    as :func:`_fp8_call` routes them."""
    config = dict(scale=dims.scale, causal=bool(causal),
                  sliding_window=None if sliding_window is None else int(sliding_window),
                  logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap))

    def heads(q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens, k_scale, v_scale):
        context = _backends.attention_context(_local_dims(dims, q, k_cache))

        def call(impl):
            ctx, kc, vc, tables, layout = _layout_call(impl, context, k_cache, v_cache,
                                                       (block_tables,))

            def run(k_cache, v_cache, block_tables, **kwargs):  # scales, or a folded scale
                return impl(q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens,
                            **{**config, **layout, **kwargs})

            if validate.is_fp8(kc):
                return _fp8_call(impl, ctx, q, kc, vc, k_scale, v_scale, tables, run,
                                 config["scale"])
            return run(kc, vc, *tables)

        return tuple(_dispatch("paged_attention", backend, context, call,
                               (q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens)))

    R = _partition.REP
    out, lse = _partition.by_heads(
        heads, (q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens, k_scale, v_scale),
        (_partition.Q, _partition.CACHE, _partition.CACHE, R, R, R, R, R),
        (_partition.Q, _partition.LSE), layout=dims.kv_layout,
        num_kv_heads=dims.num_kv_heads, num_q_heads=dims.num_q_heads)
    if sinks is not None:
        out, lse = _xla.apply_sinks(out, lse, sinks)
    return out, lse


def shared_prefix_attention(q, k_cache, v_cache, prefix_block_tables, prefix_lens, prefix_ids,
                            block_tables, kv_lens, cu_q_lens=None, *, scale=None,
                            logits_soft_cap=None, return_lse=False, sinks=None,
                            sliding_window=None, k_scale=None, v_scale=None, kv_layout="NHD",
                            backend=None):
    """Causal attention of sequences that share cached prefixes (cascade attention).

    q, k_cache, v_cache, cu_q_lens: as :func:`paged_attention`.
    prefix_block_tables: i32[num_prefixes, max_prefix_blocks]; prefix_lens: i32[num_prefixes],
    multiples of block_size; prefix_ids: i32[num_seqs], the prefix row of each sequence or -1.
    block_tables, kv_lens: each sequence's own blocks and tokens after its prefix.

    Equals paged_attention over "prefix blocks then own blocks", but each prefix's KV is read
    once for all the sequences sharing it (one big attention per prefix, merged with the
    per-sequence suffix attention by log-sum-exp; on a CPU only when some prefix group is large
    enough to pay for it, else paged attention over prefix then own blocks, see docs/ops.md).
    sinks: as paged_attention (each row's sink counted once). sliding_window: as
    paged_attention, counted over prefix then own tokens; with a window the call runs as
    paged_attention over each sequence's prefix then own blocks (a window gives each query its
    own part of the prefix: nothing to share). k_scale, v_scale, kv_layout: as paged_attention.
    Returns out (and lse) as paged_attention.
    """
    check_static(scale=scale, logits_soft_cap=logits_soft_cap, return_lse=return_lse,
                 sliding_window=sliding_window)
    sdims = validate.check_shared_prefix_attention(
        q, k_cache, v_cache, prefix_block_tables, prefix_lens, prefix_ids, block_tables,
        kv_lens, cu_q_lens, scale=scale, logits_soft_cap=logits_soft_cap, return_lse=return_lse,
        sinks=sinks, sliding_window=sliding_window, k_scale=k_scale, v_scale=v_scale,
        kv_layout=kv_layout)
    if _run_value_checks(prefix_block_tables, prefix_lens, prefix_ids, block_tables, kv_lens,
                         cu_q_lens):
        validate.check_shared_prefix_attention_values(
            sdims, prefix_block_tables, prefix_lens, prefix_ids, block_tables, kv_lens,
            cu_q_lens)
    else:
        bs = sdims.attention.block_size
        prefix_lens = _at_most(prefix_lens, sdims.max_prefix_blocks * bs)
        kv_lens = _at_most(kv_lens, sdims.attention.max_blocks_per_seq * bs)
    out, lse = _run_shared_prefix_attention(
        sdims, q, k_cache, v_cache, prefix_block_tables, prefix_lens, prefix_ids, block_tables,
        kv_lens, cu_q_lens, logits_soft_cap=logits_soft_cap, sinks=sinks,
        sliding_window=sliding_window, backend=backend, k_scale=k_scale, v_scale=v_scale)
    return (out, lse) if return_lse else out


def _run_shared_prefix_attention(sdims, q, k_cache, v_cache, prefix_block_tables, prefix_lens,
                                 prefix_ids, block_tables, kv_lens, cu_q_lens, *,
                                 logits_soft_cap, sinks, sliding_window, backend, k_scale=None,
                                 v_scale=None):
    """(out, lse) of a checked shared_prefix_attention call (``sdims``: its
    SharedPrefixDims)."""
    dims = sdims.attention
    if sliding_window is not None:  # checked above: paged attention over the joined tables
        tables, lens = _xla.prefix_then_own_tables(prefix_block_tables, prefix_lens, prefix_ids,
                                                   block_tables, kv_lens, dims.block_size)
        out, lse = _run_paged_attention(
            dataclasses.replace(dims, max_blocks_per_seq=int(tables.shape[1])), q, k_cache,
            v_cache, tables, lens, cu_q_lens, causal=True, sliding_window=sliding_window,
            logits_soft_cap=logits_soft_cap, sinks=sinks, backend=backend, k_scale=k_scale,
            v_scale=v_scale)
        return out, lse
    config = dict(scale=dims.scale,
                  logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap))
    # the tables a kernel gets: the own, the prefixes', and with one prefix that one's row
    # once per chunk of tokens (_xla.shared_prefix_attention); all in a TPU kernel's SMEM
    prefix_rows = (_xla.one_prefix_chunks(dims.num_tokens) if sdims.num_prefixes == 1
                   else sdims.num_prefixes)
    entries = max(dims.num_seqs * dims.max_blocks_per_seq,
                  prefix_rows * sdims.max_prefix_blocks)

    def heads(q, k_cache, v_cache, prefix_block_tables, prefix_lens, prefix_ids, block_tables,
              kv_lens, cu_q_lens, k_scale, v_scale):
        context = _backends.attention_context(_local_dims(dims, q, k_cache), entries)

        def call(impl):
            ctx, kc, vc, tables, layout = _layout_call(impl, context, k_cache, v_cache,
                                                       (prefix_block_tables, block_tables))

            def run(k_cache, v_cache, prefix_block_tables, block_tables, **kwargs):
                return impl(q, k_cache, v_cache, prefix_block_tables, prefix_lens, prefix_ids,
                            block_tables, kv_lens, cu_q_lens,
                            **{**config, **layout, **kwargs})

            if validate.is_fp8(kc):
                return _fp8_call(impl, ctx, q, kc, vc, k_scale, v_scale, tables, run,
                                 config["scale"])
            return run(kc, vc, *tables)

        return tuple(_dispatch("shared_prefix_attention", backend, context, call,
                               (q, k_cache, v_cache, prefix_block_tables, prefix_lens,
                                prefix_ids, block_tables, kv_lens, cu_q_lens)))

    R = _partition.REP
    out, lse = _partition.by_heads(
        heads, (q, k_cache, v_cache, prefix_block_tables, prefix_lens, prefix_ids, block_tables,
                kv_lens, cu_q_lens, k_scale, v_scale),
        (_partition.Q, _partition.CACHE, _partition.CACHE) + (R,) * 8,
        (_partition.Q, _partition.LSE), layout=dims.kv_layout,
        num_kv_heads=dims.num_kv_heads, num_q_heads=dims.num_q_heads)
    if sinks is not None:
        out, lse = _xla.apply_sinks(out, lse, sinks)
    return out, lse


def merge_attention_states(out_a, lse_a, out_b, lse_b, *, backend=None):
    """Log-sum-exp merge of two partial attentions over disjoint key sets.

    out_a, out_b: [num_tokens, num_heads, head_dim] float32|float16|bfloat16, same dtype;
    lse_a, lse_b: f32[num_tokens, num_heads] (natural log).
    Returns (out in out_a's dtype, lse f32): out = (out_a e^lse_a + out_b e^lse_b) /
    (e^lse_a + e^lse_b); two empty states (lse -inf) give out 0 and lse -inf, never NaN.
    """
    validate.check_merge_attention_states(out_a, lse_a, out_b, lse_b)
    return _dispatch("merge_attention_states", backend, {},
                     lambda impl: impl(out_a, lse_a, out_b, lse_b),
                     (out_a, lse_a, out_b, lse_b))


# ------------------------------------------------------------------------------- cache ops


def write_kv(key, value, k_cache, v_cache, slot_mapping, *, k_scale=None, v_scale=None,
             kv_layout="NHD", backend=None):
    """Write this step's keys and values into the paged caches; returns (k_cache, v_cache).

    key, value: [num_tokens, num_kv_heads, head_dim], the caches' dtype, or any float dtype
    (both the same) for float8_e4m3fn caches, which store fp8(sat(float32(x) / scale)) with
    k_scale, v_scale: None (1.0), a positive float or a float32 array of one element, may be
    traced (fp8 caches only; docs/ops.md). The rows are quantized by XLA ops, then the chosen
    backend moves their bytes.
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]; kv_layout "HND":
    [num_blocks, num_kv_heads, block_size, head_dim] (as paged_attention).
    slot_mapping: i32[n] or i64[n] (vLLM's and SGLang's dtype; with x64), n <= num_tokens;
    slot = block * block_size + offset; negative slots are skipped, as are slots past the
    cache (an int64 slot never wraps into the cache as int32); rows of key/value past n are
    ignored (padding). Slots must be distinct.
    Returns new caches; donate the caches (``jax.jit(..., donate_argnums=...)``) to update in
    place with no copy.
    """
    validate.check_write_kv(key, value, k_cache, v_cache, slot_mapping, k_scale=k_scale,
                            v_scale=v_scale, kv_layout=kv_layout)
    if _run_value_checks(slot_mapping):
        validate.check_write_kv_values(k_cache, slot_mapping, kv_layout)
    num_blocks, block_size = validate.cache_dims(k_cache, kv_layout)[:2]
    slot_mapping = _int32_ids(slot_mapping, num_blocks * block_size)
    if validate.is_fp8(k_cache):
        ks, vs = _kv_scales(k_scale, v_scale)
        n = int(slot_mapping.shape[0])  # rows past the mapping: never quantized
        key, value = _quantize_fp8(key[:n], ks), _quantize_fp8(value[:n], vs)
    # the NHD-only kernels refuse HND (and take no kv_layout)
    layout = {"kv_layout": kv_layout} if kv_layout == "HND" else {}

    def heads(key, value, k_cache, v_cache, slot_mapping):
        return tuple(_dispatch("write_kv", backend, _backends.cache_context([k_cache], kv_layout),
                               lambda impl: tuple(impl(key, value, k_cache, v_cache,
                                                       slot_mapping, **layout)),
                               (key, value, k_cache, v_cache, slot_mapping)))

    kv, cache = _partition.KV, _partition.CACHE
    return _partition.by_heads(heads, (key, value, k_cache, v_cache, slot_mapping),
                               (kv, kv, cache, cache, _partition.REP), (cache, cache),
                               layout=kv_layout,
                               num_kv_heads=validate.cache_dims(k_cache, kv_layout)[2])


def _int32_ids(ids, upper: int):
    """int32 slots or block ids for the backends: int64 ones outside [0, upper) become -1
    (skipped by writes, clamped by reads) before the narrowing, which would otherwise wrap
    them into the cache. numpy stays numpy (host value checks, no transfer)."""
    import jax.numpy as jnp

    if str(ids.dtype) != "int64":
        return ids
    xp = np if isinstance(ids, np.ndarray) else jnp
    return xp.where((ids >= 0) & (ids < upper), ids, -1).astype(xp.int32)


def copy_blocks(caches, src, dst, *, backend=None):
    """Copy block src[i] to dst[i] in every cache (all reads before any write).

    caches: list/tuple of arrays with the block axis first (e.g. every layer's K and V),
    same num_blocks. src, dst: i32[n] or i64[n] block ids in [0, num_blocks); dst distinct.
    Returns a list of new caches (donate the inputs for an in-place update).
    """
    num_blocks = validate.check_copy_blocks(caches, src, dst)
    if _run_value_checks(src, dst):
        validate.check_copy_blocks_values(num_blocks, src, dst)
    src, dst = _int32_ids(src, num_blocks), _int32_ids(dst, num_blocks)
    return list(_block_op("copy_blocks", backend, caches, (src, dst), (None, None),
                          (_partition.BLOCKS,) * len(caches)))


def gather_blocks(caches, block_ids, *, backend=None):
    """Gather blocks into one contiguous buffer.

    caches: list/tuple of arrays [num_blocks, *block_shape], same block shape and dtype.
    block_ids: i32[n] or i64[n] in [0, num_blocks). Returns buffer [n, len(caches),
    *block_shape] with buffer[i, c] = caches[c][block_ids[i]].
    """
    validate.check_gather_blocks(caches, block_ids)
    if _run_value_checks(block_ids):
        validate.check_block_ids_values(int(caches[0].shape[0]), block_ids, distinct=False)
    block_ids = _int32_ids(block_ids, int(caches[0].shape[0]))
    return _block_op("gather_blocks", backend, caches, (block_ids,), (None,),
                     (_partition.BUFFER,))[0]


def scatter_blocks(caches, buffer, block_ids, *, backend=None):
    """Inverse of gather_blocks: caches[c][block_ids[i]] = buffer[i, c].

    buffer: [n, len(caches), *block_shape], the caches' dtype; block_ids: i32[n] or i64[n],
    distinct. Returns a list of new caches; blocks not named are unchanged (donate to update
    in place).
    """
    validate.check_scatter_blocks(caches, buffer, block_ids)
    if _run_value_checks(block_ids):
        validate.check_block_ids_values(int(caches[0].shape[0]), block_ids, distinct=True)
    block_ids = _int32_ids(block_ids, int(caches[0].shape[0]))
    return list(_block_op("scatter_blocks", backend, caches, (buffer, block_ids),
                          (_partition.BUFFER, None), (_partition.BLOCKS,) * len(caches)))


def _block_op(op, backend, caches, rest, rest_roles, out_roles) -> tuple:
    """``impl(caches, *rest)`` of block copy ``op`` with its backend, split over the block
    dims as the first cache is (``_partition.by_blocks``); its outputs as a tuple."""
    n = len(caches)

    def blocks(*ops):
        caches, rest = list(ops[:n]), ops[n:]
        out = _dispatch(op, backend, _backends.cache_context(caches),
                        lambda impl: impl(caches, *rest), (caches, *rest))
        return tuple(out) if isinstance(out, (list, tuple)) else (out,)

    return _partition.by_blocks(blocks, (*caches, *rest), (_partition.BLOCKS,) * n + rest_roles,
                                out_roles)


#: The platforms JAX backends run on (explain_backends' ``platform``).
_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
#: What backends' ``supports`` rules read of a call (_backends.attention_context,
#: _backends.cache_context, hashing's block_size and has_extra).
_CONTEXT_KEYS = frozenset({"dtype", "head_dim", "block_size", "num_q_heads", "num_kv_heads",
                           "num_blocks", "table_entries", "kv_layout", "block_shapes",
                           "has_extra"})


def explain_backends(op: str, platform: str | None = None, **context) -> dict[str, str]:
    """name -> "ok" or why each backend of ``op`` (any op of this module, ``hash_blocks``
    included) is refused on ``platform`` (default: the default device's), highest priority
    first. Shape rules need the call's shapes as keywords, e.g. for attention ``dtype``,
    ``head_dim``, ``block_size``, ``num_q_heads``, ``num_kv_heads``, ``table_entries``,
    ``kv_layout`` (``_backends.attention_context`` builds them); a backend whose answer
    depends on a shape not given says so. An unknown platform or keyword is a ValueError
    naming it (either was ignored: every backend then read "runs on ..., not bogus", or
    answered as if the keyword were not given)."""
    if platform is not None and platform not in _PLATFORMS:
        raise ValueError(f"platform: expected one of {', '.join(_PLATFORMS)} or None, got "
                         f"{platform!r}")
    unknown = sorted(set(context) - _CONTEXT_KEYS)
    if unknown:
        raise ValueError(f"{unknown[0]}: not a keyword explain_backends takes; they are "
                         f"{', '.join(sorted(_CONTEXT_KEYS))}")
    if op == "hash_blocks":
        from ._hashing import HASH_BLOCKS_BACKENDS as registry
    elif op in _backends.REGISTRIES:
        registry = _backends.REGISTRIES[op]
    else:
        ops = sorted([*_backends.REGISTRIES, "hash_blocks"])
        raise ValueError(f"op: unknown op {op!r}; the ops are {', '.join(ops)}")
    return registry.explain(platform or _current_platform(), **context)


