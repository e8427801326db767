"""The JAX backends of every op, registered in one :class:`~prefixkv.paged.registry.Registry`
per op.

- ``xla``: the XLA composite of :mod:`._xla`; every platform, lowest priority; the CPU backend
  (decode paged attention on CPU runs the compiled FFI kernel of ``kernels/cpu`` inside it
  when that builds).
- ``pallas_tpu``: Pallas Mosaic TPU kernels (scalar prefetch, DMAs); TPU only.
- ``pallas_gpu``: Pallas kernels lowered through Triton; CUDA only.
- ``pallas_interpret``: the Pallas kernels run by the Pallas interpreter on CPU (slow; for
  testing the kernels' logic anywhere; never chosen unless asked for).
- ``pallas_gpu_interpret``: the GPU (Triton-lowered) attention kernels in the Pallas
  interpreter on CPU, likewise.

An attention backend whose impl has ``reads_fp8(**context) -> bool`` answering True gets
float8_e4m3fn caches as they are, with ``k_scale``/``v_scale`` keywords (0-d float32 arrays or
None); the others get the blocks the tables name dequantized, in the exact e4m3 values (q's
dtype), with both scales when the impl ``takes_scales`` (the TPU kernel), else k_scale folded
into the logits' scale (``_ops._fp8_call``). One
whose impl lists "HND" in ``kv_layouts`` gets HND caches as they are, with a ``kv_layout``
keyword (every backend here); the others get the blocks the tables name transposed to NHD
(frontend).

Only kernels that are implemented and tested are registered.
"""

from __future__ import annotations

import functools

import jax

from ..paged.registry import Backend, Registry
from ..paged.spec import dtype_name
from . import _xla

OPS = ("paged_attention", "shared_prefix_attention", "merge_attention_states", "write_kv",
       "copy_blocks", "gather_blocks", "scatter_blocks")
REGISTRIES: dict[str, Registry] = {op: Registry(op) for op in OPS}
ALL_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def attention_context(dims, table_entries: int | None = None) -> dict:
    """What backends' ``supports`` see of an attention call: shapes and dtype, the caches'
    blocks, and the most block-table entries one kernel call reads (``table_entries``, default
    the batch's)."""
    entries = dims.num_seqs * dims.max_blocks_per_seq if table_entries is None else table_entries
    return dict(dtype=dims.dtype, head_dim=dims.head_dim, block_size=dims.block_size,
                num_q_heads=dims.num_q_heads, num_kv_heads=dims.num_kv_heads,
                num_blocks=dims.num_blocks, table_entries=int(entries),
                kv_layout=dims.kv_layout)


def cache_context(caches, kv_layout: str | None = None) -> dict:
    """What cache ops' ``supports`` see: dtype, block shapes and (write_kv) the layout."""
    context = dict(dtype=dtype_name(caches[0]),
                   block_shapes=tuple(tuple(int(d) for d in c.shape[1:]) for c in caches))
    if kv_layout is not None:
        context["kv_layout"] = kv_layout
    return context


def reads_layout(impl, kv_layout: str) -> bool:
    """Whether attention backend ``impl`` reads caches of ``kv_layout`` itself (its
    ``kv_layouts`` attribute; default NHD only). The frontend gives the others the blocks the
    tables name, transposed to NHD."""
    return kv_layout in getattr(impl, "kv_layouts", ("NHD",))


# ------------------------------------------------------------------ XLA composite backend

_ATTN_STATIC = ("scale", "causal", "sliding_window", "logits_soft_cap")


@functools.partial(jax.jit, static_argnames=(*_ATTN_STATIC, "kv_layout"))
def paged_attention_xla(q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens=None, *, scale,
                        causal=True, sliding_window=None, logits_soft_cap=None, k_scale=None,
                        v_scale=None, kv_layout="NHD"):
    scales = dict(k_scale=k_scale, v_scale=v_scale, kv_layout=kv_layout)

    def xla_path():
        return _xla.ragged_paged_attention(
            q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens, scale=scale, causal=causal,
            sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, **scales)

    if cu_q_lens is not None:  # on CPU its decodes through the compiled kernel
        return _xla.ragged_on_cpu_kernel(
            q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens, scale=scale, causal=causal,
            sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, **scales)
    # decode on CPU: the compiled kernel (PREFIXKV_DISABLE_CPU_FFI=1 keeps the XLA path); the
    # query sits at kv_len - 1, so causal masks nothing more and the window needs it
    return _xla.decode_on_cpu_kernel(
        xla_path, q, k_cache, v_cache, block_tables, kv_lens, scale=scale,
        sliding_window=sliding_window if causal else None, logits_soft_cap=logits_soft_cap,
        **scales)


# float8 caches: the loop converts the blocks each step gathers, the CPU decode kernel reads
# the bytes (no dequantized copy of the cache)
paged_attention_xla.reads_fp8 = lambda **context: True
# HND: the CPU decode kernel reads it in place, the loop transposes each step's gathered blocks
paged_attention_xla.kv_layouts = ("NHD", "HND")


@functools.partial(jax.jit, static_argnames=("scale", "logits_soft_cap", "kv_layout"))
def shared_prefix_attention_xla(q, k_cache, v_cache, prefix_block_tables, prefix_lens,
                                prefix_ids, block_tables, kv_lens, cu_q_lens=None, *, scale,
                                logits_soft_cap=None, k_scale=None, v_scale=None,
                                kv_layout="NHD"):
    return _xla.shared_prefix_attention(
        q, k_cache, v_cache, prefix_block_tables, prefix_lens, prefix_ids, block_tables,
        kv_lens, cu_q_lens, scale=scale, logits_soft_cap=logits_soft_cap, k_scale=k_scale,
        v_scale=v_scale, kv_layout=kv_layout)


# float8 caches: every part of the cascade converts the blocks it gathers (no dequantized copy)
shared_prefix_attention_xla.reads_fp8 = lambda **context: True
# HND: every part reads the blocks it gathers in place
shared_prefix_attention_xla.kv_layouts = ("NHD", "HND")


merge_attention_states_xla = jax.jit(_xla.merge_attention_states)
write_kv_xla = jax.jit(_xla.write_kv, static_argnames=("kv_layout",))
copy_blocks_xla = jax.jit(_xla.copy_blocks)
gather_blocks_xla = jax.jit(_xla.gather_blocks)
scatter_blocks_xla = jax.jit(_xla.scatter_blocks)

_XLA_DOC = "XLA composite (jnp), compiled by XLA for any platform"
for _op, _impl in {
    "paged_attention": paged_attention_xla,
    "shared_prefix_attention": shared_prefix_attention_xla,
    "merge_attention_states": merge_attention_states_xla,
    "write_kv": write_kv_xla,
    "copy_blocks": copy_blocks_xla,
    "gather_blocks": gather_blocks_xla,
    "scatter_blocks": scatter_blocks_xla,
}.items():
    REGISTRIES[_op].register(Backend("xla", ALL_PLATFORMS, _impl, priority=0, requires=("jax",),
                                     doc=_XLA_DOC))


# ------------------------------------------------------------------ Pallas kernels


def tpu_interpret_params():
    """TPU interpret mode settings of the ``pallas_interpret`` backend: out-of-bounds reads
    raise, uninitialized memory reads NaN, races detected (the interpreter prints "RACE
    DETECTED" and raises nothing: the tests fail on one through their pallas_races fixture)."""
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.InterpretParams(detect_races=True, out_of_bounds_reads="raise",
                                 uninitialized_memory="nan")


def _pallas_cache_op(name: str, interpret: bool):
    def impl(*args):
        from ..kernels.pallas import cache_ops

        fn = getattr(cache_ops, f"{name}_tpu")
        return fn(*args, interpret=tpu_interpret_params() if interpret else False)

    impl.__name__ = f"{name}_{'pallas_interpret' if interpret else 'pallas_tpu'}"
    return impl


def _nhd_rows_only(kv_layout: str = "NHD", **_):
    """write_kv's kernel DMAs a token's [heads, head_dim] row whole: NHD caches only (an HND
    token row is one sublane of each head's tiles)."""
    if kv_layout != "NHD":
        return False, ("kv_layout='HND': a token's row is one row of each head's (8 x 128) "
                       "tiles, not one DMA (XLA's scatter writes it)")
    return True, ""


_PALLAS_REQ = ("jax", "jax.experimental.pallas")
for _op in ("write_kv", "copy_blocks", "gather_blocks", "scatter_blocks"):
    _rule = _nhd_rows_only if _op == "write_kv" else None
    REGISTRIES[_op].register(Backend(
        "pallas_tpu", ("tpu",), _pallas_cache_op(_op, False), priority=10, requires=_PALLAS_REQ,
        supports=_rule,
        doc="Pallas Mosaic TPU kernel: scalar-prefetched ids, HBM-to-HBM DMAs, aliased caches"))
    REGISTRIES[_op].register(Backend(
        "pallas_interpret", ("cpu",), _pallas_cache_op(_op, True), priority=-10,
        requires=_PALLAS_REQ, supports=_rule,
        doc="the pallas_tpu kernel run by Pallas's TPU interpret mode (tests; slow)"))


def _pallas_attention(op: str, interpret: bool):
    def impl(*args, k_scale=None, v_scale=None, kv_layout="NHD", **config):
        from ..kernels.pallas import paged_attention as pa

        kernel = functools.partial(pa.paged_attention_tpu, k_scale=k_scale, v_scale=v_scale,
                                   interpret=tpu_interpret_params() if interpret else False,
                                   kv_layout=kv_layout)
        if op == "paged_attention":
            return kernel(*args, **config)
        return _xla.shared_prefix_attention(*args, **config, attention_fn=kernel,
                                            kv_layout=kv_layout)

    def reads_fp8(**context) -> bool:
        from ..kernels.pallas import paged_attention as pa

        return pa.tpu_reads_fp8(**context, xla_layout=not interpret)

    impl.__name__ = f"{op}_{'pallas_interpret' if interpret else 'pallas_tpu'}"
    impl.reads_fp8 = reads_fp8
    impl.takes_scales = True  # on dequantized e4m3 values too, in float32 (SMEM scales)
    impl.kv_layouts = ("NHD", "HND")
    return impl


def _tpu_attention_supports(**context):
    from ..kernels.pallas import paged_attention as pa

    return pa.tpu_supports(**context)


def _tpu_interpret_attention_supports(**context):
    """As on a TPU, less the rule about XLA's TPU tiling of the caches (no TPU layouts here)."""
    from ..kernels.pallas import paged_attention as pa

    return pa.tpu_supports(**context, xla_layout=False)


for _op in ("paged_attention", "shared_prefix_attention"):
    REGISTRIES[_op].register(Backend(
        "pallas_tpu", ("tpu",), _pallas_attention(_op, False), priority=10, requires=_PALLAS_REQ,
        supports=_tpu_attention_supports,
        doc="Pallas Mosaic TPU ragged paged attention: scalar-prefetched tables, KV read in "
            "multi-block chunks by double-buffered DMAs, online softmax in VMEM"))
    REGISTRIES[_op].register(Backend(
        "pallas_interpret", ("cpu",), _pallas_attention(_op, True), priority=-10,
        requires=_PALLAS_REQ, supports=_tpu_interpret_attention_supports,
        doc="the pallas_tpu kernel run by Pallas's TPU interpret mode (tests; slow)"))


def _pallas_gpu_attention(op: str, interpret: bool):
    def impl(*args, k_scale=None, v_scale=None, kv_layout="NHD", **config):
        from ..kernels.pallas import paged_attention_gpu as pg

        kernel = functools.partial(pg.paged_attention_gpu, interpret=interpret,
                                   k_scale=k_scale, v_scale=v_scale, kv_layout=kv_layout)
        if op == "paged_attention":
            return kernel(*args, **config)
        return _xla.shared_prefix_attention(*args, **config, attention_fn=kernel,
                                            kv_layout=kv_layout)

    impl.__name__ = f"{op}_{'pallas_gpu_interpret' if interpret else 'pallas_gpu'}"
    def reads_fp8(**context) -> bool:  # int8 loads, decoded in the kernel
        from ..kernels.pallas import paged_attention_gpu as pg

        return pg.gpu_reads_fp8(**context)

    impl.reads_fp8 = reads_fp8
    impl.kv_layouts = ("NHD", "HND")  # rows of keys addressed per layout
    return impl


def _gpu_attention_supports(**context):
    from ..kernels.pallas import paged_attention_gpu as pg

    return pg.gpu_supports(**context)


for _op in ("paged_attention", "shared_prefix_attention"):
    REGISTRIES[_op].register(Backend(
        "pallas_gpu", ("cuda",), _pallas_gpu_attention(_op, False), priority=10,
        requires=(*_PALLAS_REQ, "jax.experimental.pallas.triton"),
        supports=_gpu_attention_supports,
        doc="Pallas kernel lowered through Triton: tables read as inputs, per-(tile, kv head) "
            "programs looping over KV blocks"))
    REGISTRIES[_op].register(Backend(
        "pallas_gpu_interpret", ("cpu",), _pallas_gpu_attention(_op, True), priority=-20,
        requires=_PALLAS_REQ, supports=_gpu_attention_supports,
        doc="the pallas_gpu kernel run by Pallas's generic interpreter (tests; slow)"))
