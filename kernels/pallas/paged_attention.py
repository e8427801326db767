"""Ragged paged attention as a Pallas Mosaic TPU kernel (decode, prefill, chunked prefill over
a cached prefix and mixed batches in one call).

Work is cut as in the XLA path (prefixkv.jax_frontend._xla): query tiles of one sequence and up
to ``q_tile`` tokens, all q heads of a kv head stacked as rows (GQA). Grid
``(tile, kv_head, kv_block)``: the per-tile metadata and the block tables are scalar-prefetched
into SMEM, and the K/V BlockSpecs' index maps read them, so Pallas's pipeline DMAs block
``block_tables[seq, lo + j]`` of the kv head from HBM while the previous one is used. Steps
past a tile's last block keep the same block index (no new DMA) and skip the compute. Online
softmax in float32 VMEM scratch; out and lse written at the tile's last step.

``interpret``: False for the TPU, or ``pltpu.InterpretParams(...)`` for TPU interpret mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ...jax_frontend import _xla
from .._vma import out_struct


def _paged_attention_kernel(seq_ref, lo_ref, nblk_ref, hi_ref, pos_ref, tables_ref,
                            q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *,
                            scale: float, block_size: int, group: int, causal: bool,
                            sliding_window: int | None, logits_soft_cap: float | None):
    del seq_ref, tables_ref  # used by the index maps only
    i, j = pl.program_id(0), pl.program_id(2)
    rows = q_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j < nblk_ref[i])
    def _step():
        # float32 caches ask for HIGHEST (Mosaic's fp32 contraction) rather than leave an f32
        # dot's passes to the compiler's default
        prec = lax.Precision.HIGHEST if q_ref.dtype == jnp.float32 else None
        q = q_ref[...].astype(jnp.float32) * scale               # [rows, D]
        k = k_ref[...].astype(jnp.float32)                       # [B, D]
        v = v_ref[...].astype(jnp.float32)
        t0 = (lo_ref[i] + j) * block_size
        t = t0 + lax.broadcasted_iota(jnp.int32, (rows, block_size), 1)
        row_pos = pos_ref[i] + lax.div(lax.broadcasted_iota(jnp.int32, (rows, block_size), 0),
                                       jnp.int32(group))
        mask = t < hi_ref[i]
        if causal:
            mask = mask & (t <= row_pos)
            if sliding_window is not None:
                mask = mask & (t > row_pos - sliding_window)
        key_ok = (t0 + lax.broadcasted_iota(jnp.int32, (block_size, 1), 0)) < hi_ref[i]
        v = jnp.where(key_ok, v, 0.0)                            # padding slots may be NaN
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=prec,
                            preferred_element_type=jnp.float32)  # [rows, B]
        if logits_soft_cap is not None:
            s = logits_soft_cap * jnp.tanh(s / logits_soft_cap)
        s = jnp.where(mask, s, -jnp.inf)
        m_prev = m_sc[...]                                       # [rows, 1]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe)
        alpha = jnp.exp(m_prev - m_safe)
        l_sc[...] = l_sc[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
        acc_sc[...] = acc_sc[...] * alpha + lax.dot_general(
            p, v, (((1,), (0,)), ((), ())), precision=prec,
            preferred_element_type=jnp.float32)
        m_sc[...] = m_new

    @pl.when(j == pl.num_programs(2) - 1)
    def _finish():
        l_sum = l_sc[...]
        seen = l_sum > 0
        o_ref[...] = (acc_sc[...] / jnp.where(seen, l_sum, 1.0)).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(jnp.where(seen, l_sum, 1.0)),
                                 -jnp.inf)


#: Bytes of block table the kernel may scalar-prefetch into SMEM: half of the 1 MiB a TPU core
#: has up to v6e, the rest left to the tile metadata (vLLM's TPU backend keeps the same margin,
#: vllm #16871; a bigger prefetched table fails to compile with RESOURCE_EXHAUSTED).
MAX_SMEM_TABLE_BYTES = 512 * 1024


def tpu_supports(*, head_dim: int, block_size: int, table_entries: int = 0,
                 **_) -> tuple[bool, str]:
    """Shapes the Mosaic kernel lowers for: one kv head of a block is a (block_size, head_dim)
    tile, which Mosaic wants as multiples of (8, 128); the block table, prefetched into SMEM,
    within MAX_SMEM_TABLE_BYTES."""
    if head_dim % 128:
        return False, f"head_dim {head_dim} is not a multiple of 128 (Mosaic tiling)"
    if block_size % 8:
        return False, f"block_size {block_size} is not a multiple of 8 (Mosaic tiling)"
    if 4 * table_entries > MAX_SMEM_TABLE_BYTES:
        return False, (f"a block table of {table_entries} entries ({4 * table_entries // 1024} "
                       f"KiB) is over the {MAX_SMEM_TABLE_BYTES // 1024} KiB of SMEM it may "
                       f"take (fewer sequences per call, or larger blocks)")
    return True, ""


def paged_attention_tpu(q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens=None, *, scale,
                        causal=True, sliding_window=None, logits_soft_cap=None,
                        q_tile=None, interpret=False):
    """Same contract as prefixkv.jax_frontend.paged_attention (validated inputs, static
    config); returns (out [num_tokens, num_q_heads, head_dim] in q's dtype, lse f32)."""
    return _paged_attention_tpu(q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens,
                                scale=scale, causal=causal, sliding_window=sliding_window,
                                logits_soft_cap=logits_soft_cap, q_tile=q_tile,
                                interpret=interpret)


@functools.partial(jax.jit, static_argnames=("scale", "causal", "sliding_window",
                                             "logits_soft_cap", "q_tile", "interpret"))
def _paged_attention_tpu(q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens, *, scale,
                         causal, sliding_window, logits_soft_cap, q_tile, interpret):
    operands = (q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens)
    num_tokens, num_q_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs, max_blocks = block_tables.shape
    group = num_q_heads // num_kv_heads
    decode = cu_q_lens is None
    if num_tokens == 0 or num_seqs == 0:
        return (jnp.zeros(q.shape, q.dtype),
                jnp.full((num_tokens, num_q_heads), -jnp.inf, jnp.float32))
    if decode:
        cu_q_lens = jnp.arange(num_seqs + 1, dtype=jnp.int32)
    tq, nt, _ = _xla.choose_tiling(num_tokens, num_seqs, decode, block_size, q_tile=q_tile)
    rows = tq * group
    seq, tok, lo, nblk, hi, first_pos = _xla.kernel_tile_plan(
        kv_lens, cu_q_lens, num_tokens=num_tokens, num_tiles=nt, q_tile=tq,
        block_size=block_size, causal=causal, sliding_window=sliding_window)
    tables = jnp.clip(block_tables.astype(jnp.int32), 0, num_blocks - 1).reshape(-1)

    qt = _xla.token_tiles(q, tok, num_kv_heads)                      # [nt, Hkv, rows, D]

    def kv_map(i, h, j, seq_ref, lo_ref, nblk_ref, hi_ref, pos_ref, tables_ref):
        del hi_ref, pos_ref
        jj = jnp.minimum(j, jnp.maximum(nblk_ref[i] - 1, 0))  # past the end: same block
        col = jnp.minimum(lo_ref[i] + jj, max_blocks - 1)
        return tables_ref[seq_ref[i] * max_blocks + col], 0, h

    def q_map(i, h, j, *_):
        return i, h, 0, 0

    kernel = functools.partial(
        _paged_attention_kernel, scale=scale, block_size=block_size, group=group, causal=causal,
        sliding_window=sliding_window, logits_soft_cap=logits_soft_cap)
    # caches viewed as [num_blocks, block_size, num_kv_heads * head_dim] (a free reshape): one
    # kv head of one block is a (block_size, head_dim) tile, as Mosaic's (8, 128) tiling wants
    kv_spec = pl.BlockSpec((None, block_size, head_dim), kv_map)
    k_flat = k_cache.reshape(num_blocks, block_size, num_kv_heads * head_dim)
    v_flat = v_cache.reshape(num_blocks, block_size, num_kv_heads * head_dim)
    out, lse = pl.pallas_call(
        kernel,
        out_shape=[out_struct((nt, num_kv_heads, rows, head_dim), q.dtype, *operands),
                   out_struct((nt, num_kv_heads, rows, 1), jnp.float32, *operands)],
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6, grid=(nt, num_kv_heads, max_blocks),
            in_specs=[pl.BlockSpec((None, None, rows, head_dim), q_map), kv_spec, kv_spec],
            out_specs=[pl.BlockSpec((None, None, rows, head_dim), q_map),
                       pl.BlockSpec((None, None, rows, 1), q_map)],
            scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32),
                            pltpu.VMEM((rows, 1), jnp.float32),
                            pltpu.VMEM((rows, head_dim), jnp.float32)]),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(seq, lo, nblk, hi, first_pos,
      tables, qt, k_flat, v_flat)
    return _xla.tiles_to_tokens(out, lse[..., 0], tok, num_tokens)
