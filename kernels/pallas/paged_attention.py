"""Ragged paged attention as a Pallas Mosaic TPU kernel (decode, prefill, chunked prefill over
a cached prefix and mixed batches in one call).

Work is cut as in the XLA path (prefixkv.jax_frontend._xla): query tiles of one sequence and up
to ``q_tile`` tokens, the G q heads of a kv head stacked as rows (GQA). One grid step per tile
(parallel: the two TensorCores of a megacore chip split them) serves every kv head. The caches
stay in HBM (``memory_space=ANY``), read as ``[num_blocks, block_size * num_kv_heads,
head_dim]``: the contract's 4-D cache with its block and head dims merged, which keeps XLA's TPU
tiling of the two minor dims. That view is a bitcast when num_kv_heads is a multiple of XLA's
tile rows (8 up to v6e, for float32 and bfloat16; 16 for bfloat16 from TPU7x on); otherwise XLA
pads the heads of the 4-D cache, the view would cost a copy, and tpu_supports refuses the call
(XLA path). A view that merged heads into head_dim instead would be a relayout copy of both
caches on every call, whatever the head count. A step walks its tile's KV blocks in chunks of
``pages`` blocks: while it computes on chunk c in one half of a VMEM double buffer, the DMAs of
chunk c+1 (one contiguous block per DMA and cache) fill the other half. Head h's keys and values
are the rows h, h + H, ... of the chunk, read by strided loads; Mosaic does those on 32-bit rows
of exactly 128 lanes, so a bfloat16 chunk, or one with head_dim over 128, is first copied as
float32 into 128-lane pieces and the dots are summed (QK) or written (PV) per piece. The block
tables and the per-tile metadata are scalar-prefetched into SMEM. Online softmax in float32 VMEM
scratch; out and lse written at the end of the step.

Why chunks of many blocks rather than one grid step per block (a BlockSpec pipeline over the
block table): every grid step has a fixed cost, and one 16-token bf16 block of 8 heads of 128
is 32 KiB, so a step per block leaves decode far below HBM bandwidth; a chunk moves 100s of
KiB per DMA wait.

float8_e4m3fn caches (:func:`tpu_reads_fp8` shapes) are copied to VMEM as their bytes (an int8
view) and decoded exactly into the float32 pieces (``_fp8``), the scales an SMEM f32[2].

``kv_layout="HND"`` caches ``[num_blocks, num_kv_heads, block_size, head_dim]`` (the layout for
the 1-2 kv heads per chip of tensor-parallel serving): the two minor dims (block_size, head_dim)
fill whole tiles whatever the head count, so XLA pads nothing and the kernel takes any
num_kv_heads. A block is one contiguous DMA into a chunk buffer [pages, heads, block_size,
head_dim]; head h's keys are ``buf[:, h]``, whole tiles (no strided loads, no float32 copy:
bfloat16 goes to the MXU as it is), and the dots run over the whole head_dim.

``interpret``: False for the TPU, or ``pltpu.InterpretParams(...)`` for TPU interpret mode.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ...jax_frontend import _xla
from .._vma import out_struct
from ._fp8 import as_bytes, fp8_e4m3_to_f32, scale_pair
from ._mosaic import ref_index

# Operands left where they are (HBM on a TPU); spelled pl.ANY in jax 0.10
_ANY = getattr(pl, "ANY", None) or getattr(pltpu, "ANY", None) or pltpu.HBM

#: Lanes of a vector register, and the width of the rows Mosaic's strided loads read
#: (apply_vector_layout's strided rule wants a base memref whose last dim is exactly this).
LANES = 128

#: At most this many query rows (tokens x G) x kv heads per prefill step: the score tiles
#: [rows, chunk tokens] and the float32 accumulators grow with them.
MAX_HEAD_ROWS = 512
#: Target bytes of K (and of V) per chunk, and the most blocks a chunk holds (each block is
#: one DMA per cache, unrolled in the kernel).
CHUNK_BYTES = 256 * 1024
MAX_PAGES = 32
#: Most bytes of one block (all its kv heads) the kernel takes: a chunk holds at least one.
MAX_BLOCK_BYTES = 512 * 1024
#: Float32 elements of one head's score tile [rows, chunk tokens] (512 KiB).
MAX_SCORE_ELEMS = 128 * 1024
#: VMEM the plan may take, kept under the 16 MiB scoped default of v5e (32 MiB from v6e on).
VMEM_BUDGET = 12 << 20


class TpuPlan(NamedTuple):
    """Static split of one call: KV blocks per chunk."""

    pages: int


def sublane_rows(itemsize: int) -> int:
    """Rows of one (sublane x 128) VMEM tile for an element size: 16-bit values pack two rows
    per 32-bit sublane."""
    return 8 * max(1, 4 // itemsize)


def tpu_plan(*, num_kv_heads: int, head_dim: int, block_size: int, itemsize: int, rows: int,
             max_blocks: int, pages: int | None = None) -> TpuPlan:
    """Blocks per chunk: CHUNK_BYTES of K, capped so one head's score tile stays within
    MAX_SCORE_ELEMS, at most MAX_PAGES and the table's width. ``pages`` overrides (tests)."""
    if pages is None:
        tokens = min(CHUNK_BYTES // (num_kv_heads * head_dim * itemsize),
                     MAX_SCORE_ELEMS // rows)
        pages = min(max(1, tokens // block_size), MAX_PAGES)
    return TpuPlan(max(1, min(pages, max_blocks)))


def widened(itemsize: int, head_dim: int, kv_layout: str = "NHD") -> bool:
    """Whether a chunk is first copied as float32 into 128-lane pieces: Mosaic's strided loads
    (NHD) read 32-bit rows of exactly LANES lanes; HND needs no strided load."""
    return kv_layout == "NHD" and (itemsize < 4 or head_dim != LANES)


def vmem_bytes(plan: TpuPlan, *, num_kv_heads: int, head_dim: int, block_size: int,
               itemsize: int, rows: int, kv_layout: str = "NHD") -> int:
    """VMEM one step takes: the K/V double buffers and (16-bit, or head_dim over 128) their
    float32 copies, the
    pipelined q/out/lse blocks (two of each), the float32 scratch (m and l pad to 128 lanes)
    and one head's float32 temporaries (scores, probabilities, their masked copy, its K and
    V)."""
    tokens, heads = plan.pages * block_size, num_kv_heads
    kv = 2 * 2 * tokens * heads * head_dim * itemsize
    if widened(itemsize, head_dim, kv_layout):
        kv += 2 * tokens * heads * head_dim * 4
    blocks = 2 * (2 * heads * rows * head_dim * itemsize + heads * rows * 128 * 4)
    scratch = heads * rows * (head_dim + 2 * 128) * 4
    temps = 3 * rows * tokens * 4 + 2 * tokens * head_dim * 4
    return kv + blocks + scratch + temps


def _paged_attention_kernel(seq_ref, lo_ref, nblk_ref, hi_ref, pos_ref, tables_ref,
                            q_ref, k_hbm, v_hbm, *refs, scale: float, block_size: int,
                            group: int, causal: bool, sliding_window: int | None,
                            logits_soft_cap: float | None, pages: int, max_blocks: int,
                            fp8: bool = False, scaled: bool = False, hnd: bool = False):
    """``fp8``: the caches are float8_e4m3fn bytes (int8), copied to VMEM as bytes and decoded
    exactly into the float32 pieces. ``scaled``: ``scales_ref`` (SMEM f32[2]: k_scale,
    v_scale) follows v_hbm, k_scale folded into the logits' scale, v_scale applied to the
    float32 output before its rounding (fp8 caches, or their exact e4m3 values dequantized
    into q's dtype by the frontend). ``hnd``: the caches are [num_blocks, heads, block_size,
    head_dim] and the buffers [2, pages, heads, block_size, head_dim] (one piece: the whole
    head_dim)."""
    if scaled:
        scales_ref, *refs = refs
    o_ref, lse_ref, k_buf, v_buf, sem, m_sc, l_sc, acc_sc, *wide = refs
    i = pl.program_id(0)
    heads, rows, head_dim = q_ref.shape
    width = head_dim if hnd else LANES                    # lanes of one dot's piece
    pieces = head_dim // width
    tokens = pages * block_size
    block_rows = block_size * heads                       # buffer rows of one block
    n, lo, hi = nblk_ref[i], lo_ref[i], hi_ref[i]
    row0 = seq_ref[i] * max_blocks
    num_chunks = lax.div(n + (pages - 1), jnp.asarray(pages, n.dtype))  # n >= 0: truncating

    def chunk_dmas(c, slot, action: str) -> None:
        """Start (or wait for) the DMAs of chunk c's blocks into buffer half ``slot``; blocks
        past the tile's last are not copied (their keys are masked)."""
        def block(p: int) -> None:
            col = jnp.minimum(lo + c * pages + p, max_blocks - 1)
            blk = tables_ref[row0 + col]
            for src, buf, k in ((k_hbm, k_buf, 0), (v_hbm, v_buf, 1)):
                dst = (buf.at[slot, ref_index(p)] if hnd
                       else buf.at[slot, pl.ds(p * block_rows, block_rows)])
                cp = pltpu.make_async_copy(src.at[blk], dst, sem.at[ref_index(k), slot])
                getattr(cp, action)()

        for p in range(pages):
            pl.when(c * pages + p < n)(functools.partial(block, p))

    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(n > 0)
    def _first():
        chunk_dmas(0, ref_index(0), "start")

    # bfloat16 runs on the MXU natively (float32 accumulation); float32 asks for HIGHEST
    # (Mosaic's fp32 contraction); float16 is refused by tpu_supports
    native = q_ref.dtype == jnp.bfloat16
    prec = None if native else lax.Precision.HIGHEST
    logit_scale = scale * scales_ref[0] if scaled else scale
    widen = fp8_e4m3_to_f32 if fp8 else (lambda x: x.astype(jnp.float32))

    def chunk(c, carry):
        slot = lax.rem(c, jnp.asarray(2, c.dtype))

        @pl.when(c + 1 < num_chunks)
        def _prefetch():
            chunk_dmas(c + 1, 1 - slot, "start")

        chunk_dmas(c, slot, "wait")
        # NHD: head h's rows h, h + H, ... by strided loads, which Mosaic does on 32-bit rows
        # of exactly 128 lanes: a float32 cache of head_dim 128 is read in place; otherwise the
        # chunk is first copied, as float32, into 128-lane pieces [D // 128, rows, 128].
        # HND: head h's [pages, block_size, D] tiles, its blocks' tokens in order
        if hnd:
            def head_rows(h):
                def rows_of(buf):
                    x = buf[slot, :, h].reshape(tokens, head_dim)
                    return [widen(x) if fp8 else x]

                return rows_of(k_buf), rows_of(v_buf)
        elif wide:
            k_wide, v_wide = wide
            for j in range(pieces):
                lanes = pl.ds(j * LANES, LANES)
                k_wide[j] = widen(k_buf[slot, :, lanes])
                v_wide[j] = widen(v_buf[slot, :, lanes])

            def head_rows(h):
                rows_h = pl.ds(h, tokens, stride=heads)
                return ([k_wide[j, rows_h, :] for j in range(pieces)],
                        [v_wide[j, rows_h, :] for j in range(pieces)])
        else:
            def head_rows(h):
                rows_h = pl.ds(h, tokens, stride=heads)
                return [k_buf[slot, rows_h, :]], [v_buf[slot, rows_h, :]]

        t0 = (lo + c * pages) * block_size
        t = t0 + lax.broadcasted_iota(jnp.int32, (rows, tokens), 1)
        row_pos = pos_ref[i] + lax.div(lax.broadcasted_iota(jnp.int32, (rows, tokens), 0),
                                       jnp.int32(group))
        mask = _xla.visible(t < hi, t, row_pos, causal=causal, sliding_window=sliding_window)
        # slots past the keys (a block's padding, blocks not copied) and, with a window,
        # before the window of the tile's first query (a freed or null block) may hold NaN
        t_col = t0 + lax.broadcasted_iota(jnp.int32, (tokens, 1), 0)
        key_ok = t_col < hi
        if causal and sliding_window is not None:
            key_ok = key_ok & (t_col > pos_ref[i] - sliding_window)
        for h in range(heads):
            ks, vs = head_rows(h)                                     # pieces of [tokens, 128]
            s = None
            for j in range(pieces):
                q, k = q_ref[h, :, pl.ds(j * width, width)], ks[j]
                if native:
                    k = k.astype(jnp.bfloat16)
                else:
                    q = q.astype(jnp.float32)
                part = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=prec,
                                       preferred_element_type=jnp.float32)
                s = part if s is None else s + part
            s = s * logit_scale                                       # [rows, tokens]
            s = jnp.where(mask, _xla.soft_cap(s, logits_soft_cap), -jnp.inf)
            m_prev = m_sc[h]                                          # [rows, 1]
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(s - m_safe)
            alpha = jnp.exp(m_prev - m_safe)
            l_sc[h] = l_sc[h] * alpha + jnp.sum(p, axis=1, keepdims=True)
            if native:
                p = p.astype(jnp.bfloat16)
            for j in range(pieces):
                v = jnp.where(key_ok, vs[j].astype(jnp.float32), 0.0)
                if native:
                    v = v.astype(jnp.bfloat16)
                lanes = pl.ds(j * width, width)
                acc_sc[h, :, lanes] = acc_sc[h, :, lanes] * alpha + lax.dot_general(
                    p, v, (((1,), (0,)), ((), ())), precision=prec,
                    preferred_element_type=jnp.float32)
            m_sc[h] = m_new
        return carry

    lax.fori_loop(0, num_chunks, chunk, 0)

    for h in range(heads):
        l_sum = l_sc[h]
        seen = ~(l_sum <= 0)  # a NaN sum (a NaN in the KV read) counts: out and lse NaN
        out = acc_sc[h] / jnp.where(seen, l_sum, 1.0)
        o_ref[h] = (out * scales_ref[1] if scaled else out).astype(o_ref.dtype)
        lse_ref[h] = jnp.where(seen, m_sc[h] + jnp.log(jnp.where(seen, l_sum, 1.0)), -jnp.inf)


#: Bytes of block table the kernel may scalar-prefetch into SMEM: half of the 1 MiB a TPU core
#: has up to v6e, the rest left to the tile metadata (vLLM's TPU backend keeps the same margin,
#: vllm #16871; a bigger prefetched table fails to compile with RESOURCE_EXHAUSTED).
MAX_SMEM_TABLE_BYTES = 512 * 1024


def xla_tile_rows(itemsize: int) -> int:
    """XLA's default TPU tile rows for the cache's (heads, head_dim) dims: 8, but 16 for 16-bit
    values from TPU7x on (JAX's ``TpuInfo.get_sublane_tiling`` states the same defaults). The
    generation is the default device's; 8 when that is no TPU (an export from a CPU). 8-bit
    values (fp8 caches): 32 on every generation (``get_sublane_tiling``)."""
    if itemsize == 1:
        return 32
    if itemsize == 2:
        try:
            if pltpu.get_tpu_info().generation >= 7:
                return 16
        except (ValueError, AttributeError, NotImplementedError):
            pass
    return 8


def tpu_supports(*, head_dim: int, block_size: int, table_entries: int = 0,
                 dtype: str = "float32", num_kv_heads: int = 1, xla_layout: bool = True,
                 kv_layout: str = "NHD", **_) -> tuple[bool, str]:
    """Shapes the Mosaic kernel lowers for: bfloat16 or float32; each block lands in a VMEM
    buffer at a row offset of a multiple of block_size, so block_size must fill whole
    (sublane x 128) tiles (8 rows of 32-bit values, 16 of 16-bit), and head_dim whole 128-lane
    columns; a block within MAX_BLOCK_BYTES; the block table, prefetched into SMEM, within
    MAX_SMEM_TABLE_BYTES. ``xla_layout`` (a real TPU, not interpret mode), NHD caches:
    num_kv_heads a multiple of xla_tile_rows(), so the caches' merged-heads view is free;
    otherwise it would copy both whole caches every call, and the XLA path, which reads only
    the blocks it needs, is the better choice. HND caches take any num_kv_heads."""
    if head_dim % 128:
        return False, f"head_dim {head_dim} is not a multiple of 128 (Mosaic tiling)"
    if jnp.dtype(dtype) == jnp.float16:
        return False, ("float16: TPUs have no float16 vector or matrix unit, and Mosaic's "
                       "float16 loads are not known to compile (bfloat16 or float32 instead)")
    itemsize = np.dtype(jnp.dtype(dtype)).itemsize
    rows = sublane_rows(itemsize)
    if block_size % rows:
        return False, (f"block_size {block_size} is not a multiple of {rows} (Mosaic tiling of "
                       f"{8 * itemsize}-bit values)")
    tile = xla_tile_rows(itemsize) if xla_layout and kv_layout == "NHD" else 1
    if num_kv_heads % tile:
        return False, (f"num_kv_heads {num_kv_heads} is not a multiple of {tile}: "
                       f"XLA pads the cache's heads to its TPU tiles, so the kernel's "
                       f"[blocks, block_size * heads, head_dim] view would copy both caches "
                       f"on every call (kv_layout='HND' caches take any head count)")
    block_bytes = block_size * num_kv_heads * head_dim * itemsize
    if block_bytes > MAX_BLOCK_BYTES:
        return False, (f"a block of {num_kv_heads} kv heads is {block_bytes // 1024} KiB, over "
                       f"the {MAX_BLOCK_BYTES // 1024} KiB a chunk of VMEM takes (smaller "
                       f"blocks, or fewer kv heads per device)")
    if 4 * table_entries > MAX_SMEM_TABLE_BYTES:
        return False, (f"a block table of {table_entries} entries ({4 * table_entries // 1024} "
                       f"KiB) is over the {MAX_SMEM_TABLE_BYTES // 1024} KiB of SMEM it may "
                       f"take (fewer sequences per call, or larger blocks)")
    return True, ""


def tpu_reads_fp8(*, num_kv_heads: int, block_size: int, xla_layout: bool = True,
                  kv_layout: str = "NHD", **_) -> bool:
    """Whether the kernel reads a float8_e4m3fn cache as bytes (else the frontend dequantizes
    the blocks the tables name): a block's rows (block_size * num_kv_heads) fill whole 8-bit
    (32 x 128) VMEM tiles, and (``xla_layout``, a real TPU) num_kv_heads is a multiple of
    xla_tile_rows(1) = 32, so the merged-heads view of the 8-bit cache is free. HND: each
    head's block_size rows fill whole 8-bit tiles."""
    if kv_layout == "HND":
        return block_size % sublane_rows(1) == 0
    if (block_size * num_kv_heads) % sublane_rows(1):
        return False
    return not xla_layout or num_kv_heads % xla_tile_rows(1) == 0


def paged_attention_tpu(q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens=None, *, scale,
                        causal=True, sliding_window=None, logits_soft_cap=None,
                        q_tile=None, interpret=False, pages=None, k_scale=None, v_scale=None,
                        kv_layout="NHD"):
    """Same contract as prefixkv.jax_frontend.paged_attention (validated inputs, static
    config, ``kv_layout`` "NHD" or "HND"); returns (out [num_tokens, num_q_heads, head_dim] in
    q's dtype, lse f32).
    ``pages``: override the plan's blocks per chunk (tests). float8_e4m3fn caches (shapes
    :func:`tpu_reads_fp8` accepts) are read as their bytes and decoded in the kernel; k_scale,
    v_scale: None (1.0) or 0-d float32 arrays, may be traced: fp8 caches, or caches in q's
    dtype holding an fp8 cache's exact e4m3 values (the frontend's dequantized blocks, whose
    scales the kernel applies in float32 as it does for fp8 bytes)."""
    scales = None
    if k_cache.dtype == jnp.float8_e4m3fn or k_scale is not None or v_scale is not None:
        scales = scale_pair(k_scale, v_scale)
    return _paged_attention_tpu(q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens, scales,
                                scale=scale, causal=causal, sliding_window=sliding_window,
                                logits_soft_cap=logits_soft_cap, q_tile=q_tile,
                                interpret=interpret, pages=pages, kv_layout=kv_layout)


def _q_tile(num_tokens: int, num_seqs: int, decode: bool, block_size: int, group: int,
            num_kv_heads: int, q_tile: int | None) -> tuple[int, int]:
    """(q_tile, num_tiles): the XLA path's tiling, with q_tile lowered to a power of two that
    keeps q_tile x G x num_kv_heads within MAX_HEAD_ROWS (decode tiles stay one token)."""
    tq, nt, _ = _xla.choose_tiling(num_tokens, num_seqs, decode, block_size, q_tile=q_tile)
    most = MAX_HEAD_ROWS // num_kv_heads
    if not decode and tq > 1 and tq * group > most:
        cap = 1 << max(0, (most // group).bit_length() - 1)
        tq, nt, _ = _xla.choose_tiling(num_tokens, num_seqs, decode, block_size, q_tile=cap)
    return tq, nt


@functools.partial(jax.jit, static_argnames=("scale", "causal", "sliding_window",
                                             "logits_soft_cap", "q_tile", "interpret",
                                             "pages", "kv_layout"))
def _paged_attention_tpu(q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens, scales, *,
                         scale, causal, sliding_window, logits_soft_cap, q_tile, interpret,
                         pages, kv_layout):
    operands = (q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens)
    num_tokens, num_q_heads, head_dim = q.shape
    hnd = kv_layout == "HND"
    num_blocks, block_size, num_kv_heads, _ = _xla.cache_dims(k_cache, kv_layout)
    num_seqs, max_blocks = block_tables.shape
    group = num_q_heads // num_kv_heads
    decode = cu_q_lens is None
    if num_tokens == 0 or num_seqs == 0 or max_blocks == 0:
        return (jnp.zeros(q.shape, q.dtype),
                jnp.full((num_tokens, num_q_heads), -jnp.inf, jnp.float32))
    if decode:
        cu_q_lens = jnp.arange(num_seqs + 1, dtype=jnp.int32)
    tq, nt = _q_tile(num_tokens, num_seqs, decode, block_size, group, num_kv_heads, q_tile)
    rows = tq * group
    # rows padded to whole sublane tiles (a decode tile of G = 4 bf16 rows becomes 16): every
    # vector and dot of the kernel then has tile-aligned shapes; the padding rows are dropped
    tile_rows = sublane_rows(q.dtype.itemsize)
    rows_p = -(-rows // tile_rows) * tile_rows
    scaled = scales is not None
    fp8 = k_cache.dtype == jnp.float8_e4m3fn
    if fp8:  # the bytes, decoded in the kernel
        k_cache, v_cache = as_bytes(k_cache), as_bytes(v_cache)
    itemsize = k_cache.dtype.itemsize
    plan = tpu_plan(num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
                    itemsize=itemsize, rows=rows_p, max_blocks=max_blocks, pages=pages)
    vmem = vmem_bytes(plan, num_kv_heads=num_kv_heads, head_dim=head_dim,
                      block_size=block_size, itemsize=itemsize, rows=rows_p,
                      kv_layout=kv_layout)
    seq, tok, lo, nblk, hi, first_pos = _xla.kernel_tile_plan(
        kv_lens, cu_q_lens, num_tokens=num_tokens, num_tiles=nt, q_tile=tq,
        block_size=block_size, causal=causal, sliding_window=sliding_window)
    tables = jnp.clip(block_tables.astype(jnp.int32), 0, num_blocks - 1).reshape(-1)

    qt = _xla.token_tiles(q, tok, num_kv_heads)                      # [nt, Hkv, rows, D]
    if rows_p != rows:
        qt = jnp.pad(qt, ((0, 0), (0, 0), (0, rows_p - rows), (0, 0)))

    def q_map(i, *_):
        return i, 0, 0, 0

    kernel = functools.partial(
        _paged_attention_kernel, scale=scale, block_size=block_size, group=group, causal=causal,
        sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, pages=plan.pages,
        max_blocks=max_blocks, fp8=fp8, scaled=scaled, hnd=hnd)
    any_spec = pl.BlockSpec(memory_space=_ANY)
    chunk_rows = plan.pages * block_size * num_kv_heads
    if hnd:  # the caches as they are; a block lands whole in buf[slot, page]
        k_rows, v_rows = k_cache, v_cache
        buf = pltpu.VMEM((2, plan.pages, num_kv_heads, block_size, head_dim), k_cache.dtype)
    else:
        # block and head dims merged: XLA's tiling of the two minor dims (heads, head_dim) is
        # kept (see the module docstring); one block is `block_size * num_kv_heads` rows
        k_rows = k_cache.reshape(num_blocks, block_size * num_kv_heads, head_dim)
        v_rows = v_cache.reshape(num_blocks, block_size * num_kv_heads, head_dim)
        buf = pltpu.VMEM((2, chunk_rows, head_dim), k_cache.dtype)
    wide = ([pltpu.VMEM((head_dim // LANES, chunk_rows, LANES), jnp.float32)] * 2
            if widened(itemsize, head_dim, kv_layout) else [])
    q_spec = pl.BlockSpec((None, num_kv_heads, rows_p, head_dim), q_map)
    out, lse = pl.pallas_call(
        kernel,
        out_shape=[out_struct((nt, num_kv_heads, rows_p, head_dim), q.dtype, *operands),
                   out_struct((nt, num_kv_heads, rows_p, 1), jnp.float32, *operands)],
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6, grid=(nt,),
            in_specs=[q_spec, any_spec, any_spec,
                      *([pl.BlockSpec(memory_space=pltpu.SMEM)] if scaled else [])],
            out_specs=[q_spec, pl.BlockSpec((None, num_kv_heads, rows_p, 1), q_map)],
            scratch_shapes=[buf, buf, pltpu.SemaphoreType.DMA((2, 2)),
                            pltpu.VMEM((num_kv_heads, rows_p, 1), jnp.float32),
                            pltpu.VMEM((num_kv_heads, rows_p, 1), jnp.float32),
                            pltpu.VMEM((num_kv_heads, rows_p, head_dim), jnp.float32),
                            *wide]),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel",),
            # default plans stay within VMEM_BUDGET (test); an override past it asks for room
            vmem_limit_bytes=None if vmem <= VMEM_BUDGET else vmem + VMEM_BUDGET),
        interpret=interpret,
    )(seq, lo, nblk, hi, first_pos, tables, qt, k_rows, v_rows,
      *([scales] if scaled else []))
    return _xla.tiles_to_tokens(out[:, :, :rows], lse[:, :, :rows, 0], tok, num_tokens)
