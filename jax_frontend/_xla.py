"""The XLA composite (jnp) backend of every op: the CPU path, and the fallback everywhere.

Written for speed on a CPU, where XLA cannot fuse a gather into a dot: paged attention never
materializes a sequence's whole KV. The queries are cut into tiles (one sequence, up to
``q_tile`` consecutive query tokens, all q heads), and one ``lax.while_loop`` walks the KV of
every tile in chunks of ``chunk_blocks`` blocks at once: each step gathers one chunk per tile
(small enough to stay in cache; the gather, the dtype upcast, the masking of padding and the
(kv head, token) transpose fuse into one pass), runs two batched dots per kv head with all the
q heads of the group stacked as rows (GQA: each K/V block is read once per tile), and updates an
online softmax in float32. The loop runs as many steps as the longest tile needs, so there is
no host sync and every shape is static.

Cascade (shared-prefix) attention has fast paths, chosen from static shapes only: one prefix
(:func:`single_prefix_attention`: every token against the prefix, two big dots per kv head,
no sort), several prefixes (:func:`multi_prefix_attention`: the same per prefix, on windows
of its sorted tokens) and decode over short own KV (:func:`short_decode_attention`: each
sequence's whole own KV at once). On CPU, when the compiled FFI kernels build, the decode own
part (any length) runs the decode paged attention handler of ``kernels/cpu`` instead.
Anything else (prefill own parts, long own KV off CPU, a Pallas ``attention_fn``) takes the
generic ragged loop.

Functions here take validated arguments and static Python config; the public ops in
:mod:`prefixkv.jax_frontend` validate and dispatch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..kernels._vma import match_varying
from ..kernels.pallas._fp8 import fp8_e4m3_to_f32_via_f16
from ..paged.validate import cache_dims

#: Default number of KV tokens per loop step (rounded to whole blocks).
DECODE_CHUNK_TOKENS = 128
PREFILL_CHUNK_TOKENS = 256
#: Largest query tile (tokens of one sequence handled together).
MAX_Q_TILE = 128


#: Bytes of float32 K+V gathered per loop step across all tiles: the step's working set stays
#: in the last-level cache (measured: 4x slower per byte once it spills).
STEP_BYTES = 4 << 20


def choose_tiling(num_tokens: int, num_seqs: int, decode: bool, block_size: int,
                  kv_token_bytes: int = 0, q_tile: int | None = None,
                  chunk_tokens: int | None = None) -> tuple[int, int, int]:
    """Static (q_tile, num_tiles, chunk_blocks) for a call's shapes.

    The tile count is an upper bound that holds for every value of cu_q_lens:
    sum_s ceil(q_len_s / T) <= (num_tokens + n_nonempty * (T - 1)) / T.
    ``kv_token_bytes``: float32 K+V bytes of one token (2 * num_kv_heads * head_dim * 4).
    """
    if decode:
        q_tile = 1
    elif q_tile is None:
        avg = max(1, -(-num_tokens // max(num_seqs, 1)))
        q_tile = min(MAX_Q_TILE, 1 << (avg - 1).bit_length())
    nonempty = min(num_seqs, num_tokens)
    num_tiles = max(1, (num_tokens + nonempty * (q_tile - 1)) // q_tile)
    return q_tile, num_tiles, _chunk_blocks(q_tile, block_size, num_tiles * kv_token_bytes,
                                            chunk_tokens)


def _chunk_blocks(q_tile: int, block_size: int, step_token_bytes: int,
                  chunk_tokens: int | None) -> int:
    """KV blocks per loop step: ``chunk_tokens``, or the default for the tile size capped so
    a step's float32 K and V (``step_token_bytes`` per key: all tiles and heads of a step)
    stay within STEP_BYTES."""
    if chunk_tokens is None:
        chunk_tokens = DECODE_CHUNK_TOKENS if q_tile == 1 else PREFILL_CHUNK_TOKENS
        if step_token_bytes:
            chunk_tokens = min(chunk_tokens, STEP_BYTES // step_token_bytes)
    return max(1, chunk_tokens // block_size)


def _as_bits(x):
    """A 16-bit (8-bit) float array reinterpreted as uint16 (uint8), free; others unchanged."""
    if x.dtype.itemsize == 2:
        return lax.bitcast_convert_type(x, jnp.uint16)
    if x.dtype.itemsize == 1 and jnp.issubdtype(x.dtype, jnp.floating):
        return lax.bitcast_convert_type(x, jnp.uint8)
    return x


def _bits_set(cache, rows, index, bits: bool):
    """``cache.at[index].set(rows, mode="drop", unique_indices=True)``; with ``bits``, 16-bit
    (8-bit) floats as their unsigned bits when rows have the cache's dtype: XLA:CPU scatters
    bfloat16 through float32, which quiets NaN payloads in every block, written or not."""
    if bits and rows.dtype == cache.dtype and _as_bits(cache) is not cache:
        out = _as_bits(cache).at[index].set(_as_bits(rows), mode="drop", unique_indices=True)
        return lax.bitcast_convert_type(out, cache.dtype)
    return cache.at[index].set(rows, mode="drop", unique_indices=True)


def _cache_bits_in_step(k_cache, v_cache, dep):
    """The caches as gathered inside one loop step: 16-bit (float8) caches as uint16 (uint8)
    bits (XLA:CPU turns a bf16 gather into a whole-cache convert to f32 hoisted out of the
    loop, 2x the cache in memory traffic per call), tied to the step's value ``dep`` by an
    optimization barrier so XLA cannot hoist the bitcast out of the loop as a whole-cache
    copy. Returns (k, v, dep)."""
    if k_cache.dtype.itemsize not in (1, 2):
        return k_cache, v_cache, dep
    k_bits, v_bits, dep = lax.optimization_barrier((k_cache, v_cache, dep))
    return _as_bits(k_bits), _as_bits(v_bits), dep


def _bits_to_f32(x, dtype, scale=None):
    """float32 values of ``_as_bits`` output (bfloat16 upcast is a 16-bit shift), times
    ``scale`` when given (a float8 cache's k_scale / v_scale). float8_e4m3fn bytes decode as
    the Triton kernel's do (bits shifted into a float16, which F16C converts): XLA:CPU's own
    float8 convert is scalar code, ~5 of the ~18 ms of the one-prefix cascade over float8
    caches (32 x 2048 decode, bf16 queries, one thread)."""
    if x.dtype == jnp.uint16 and dtype == jnp.bfloat16:
        x = lax.bitcast_convert_type(x.astype(jnp.uint32) << 16, jnp.float32)
    elif x.dtype == jnp.uint8 and dtype == jnp.float8_e4m3fn:
        x = fp8_e4m3_to_f32_via_f16(x)
    elif x.dtype in (jnp.uint16, jnp.uint8):
        x = lax.bitcast_convert_type(x, dtype).astype(jnp.float32)
    else:
        x = x.astype(jnp.float32)
    return x if scale is None else x * scale


def dot_precision(dtype):
    """Precision of the float32 attention dots over a cache of ``dtype``. XLA:CPU computes
    them in f32 whatever it is told; the accelerators' DEFAULT is one TF32 pass (NVIDIA) or
    one bfloat16 pass (TPU), far outside float32's tolerance. float32 caches get HIGHEST;
    16-bit ones HIGH (TF32 holds float16 exactly; bf16x3 on TPU), which also keeps the scaled
    queries and the softmax weights from being rounded to bfloat16."""
    return lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.HIGH


def _cache_dot_precision(q, cache_dtype):
    """dot_precision of a cache; float8 caches as the dequantized copy in q's dtype the other
    backends read."""
    return dot_precision(q.dtype if cache_dtype == jnp.float8_e4m3fn else cache_dtype)


#: Most query x sorted elements a searchsorted compares all at once on an accelerator
#: (fused compare + sum); past it the scan's loop of log2 steps.
COMPARE_ALL_MAX = 1 << 24


def fused_search(num_queries: int, num_sorted: int) -> str:
    """jnp.searchsorted's method for the kernels' metadata on a GPU/TPU: "compare_all" (one
    fused compare of every query with every element, no loop: on a GPU each step of the
    "scan" method's loop is kernels of its own) up to COMPARE_ALL_MAX pairs, else "scan"."""
    return "compare_all" if num_queries * num_sorted <= COMPARE_ALL_MAX else "scan"


def soft_cap(s, logits_soft_cap: float | None):
    """Scores through the logits soft cap ``cap * tanh(s / cap)`` (unchanged with none)."""
    return s if logits_soft_cap is None else logits_soft_cap * jnp.tanh(s / logits_soft_cap)


def visible(mask, t, row_pos, *, causal: bool, sliding_window: int | None):
    """``mask`` and the keys at positions ``t`` that queries at ``row_pos`` see: all, or with
    ``causal`` those up to their own position and within the sliding window."""
    if causal:
        mask = mask & (t <= row_pos)
        if sliding_window is not None:
            mask = mask & (t > row_pos - sliding_window)
    return mask


def _build_tiles(kv_lens, cu_q_lens, num_tiles: int, q_tile: int, search: str = "scan"):
    """Per tile: sequence, first query token, number of query tokens (0 = inactive tile).
    ``search``: jnp.searchsorted's method for a tile's sequence ("scan": a loop of log2
    steps; "compare_all": one fused compare of every tile with every sequence)."""
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    per_seq = (q_lens + (q_tile - 1)) // q_tile
    ends = jnp.cumsum(per_seq)
    tile = jnp.arange(num_tiles, dtype=jnp.int32)
    seq = jnp.searchsorted(ends, tile, side="right", method=search).astype(jnp.int32)
    active = tile < ends[-1]
    seq = jnp.where(active, seq, 0)
    local = tile - (ends[seq] - per_seq[seq])
    q_start = cu_q_lens[seq] + local * q_tile
    q_len = jnp.where(active, jnp.clip(q_lens[seq] - local * q_tile, 0, q_tile), 0)
    # absolute position of the tile's first query token
    first_pos = kv_lens[seq] - q_lens[seq] + local * q_tile
    return seq, q_start, q_len, first_pos


def key_blocks(first_pos, hi, block_size: int, sliding_window: int | None):
    """(first KV block ``lo``, number of KV blocks ``nblk``) a tile reads: from the first key
    its first query (at ``first_pos``) sees through the window, up to key ``hi``."""
    if sliding_window is not None:
        lo = jnp.maximum(first_pos - sliding_window + 1, 0) // block_size
    else:
        lo = jnp.zeros_like(hi)
    return lo, jnp.maximum((hi + block_size - 1) // block_size - lo, 0)


def kernel_tile_plan(kv_lens, cu_q_lens, *, num_tokens: int, num_tiles: int, q_tile: int,
                     block_size: int, causal: bool, sliding_window: int | None,
                     search: str = "scan"):
    """What the Pallas attention kernels take per query tile, all int32: sequence, the tile's
    query tokens ``tok [num_tiles, q_tile]`` (``num_tokens`` for padding rows), first KV block
    ``lo``, number of KV blocks ``nblk``, keys seen ``hi`` (exclusive) and the first query's
    absolute position. ``search``: see _build_tiles."""
    kv_lens = kv_lens.astype(jnp.int32)
    seq, q_start, q_len, first_pos = _build_tiles(kv_lens, cu_q_lens.astype(jnp.int32),
                                                  num_tiles, q_tile, search)
    r = jnp.arange(q_tile, dtype=jnp.int32)
    tok = jnp.where(r[None, :] < q_len[:, None], q_start[:, None] + r[None, :], num_tokens)
    tile_kv = kv_lens[seq]
    last_pos = first_pos + jnp.maximum(q_len, 1) - 1
    hi = jnp.minimum(last_pos + 1, tile_kv) if causal else tile_kv
    hi = jnp.where(q_len > 0, hi, 0)
    lo, nblk = key_blocks(first_pos, hi, block_size, sliding_window)
    i32 = jnp.int32
    return (seq.astype(i32), tok.astype(i32), lo.astype(i32), nblk.astype(i32), hi.astype(i32),
            first_pos.astype(i32))


def token_tiles(q, tok, num_kv_heads: int):
    """The queries of every tile as the kernels' rows: q [num_tokens, Hq, D] and tok
    [num_tiles, q_tile] (from :func:`kernel_tile_plan`) -> [num_tiles, Hkv, q_tile * G, D],
    the G q heads of a kv head stacked per token (padding rows repeat the last token)."""
    num_tokens, num_q_heads, head_dim = q.shape
    nt, tq = tok.shape
    group = num_q_heads // num_kv_heads
    qt = jnp.take(q, jnp.minimum(tok, num_tokens - 1), axis=0)        # [nt, tq, Hq, D]
    qt = qt.reshape(nt, tq, num_kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    return qt.reshape(nt, num_kv_heads, tq * group, head_dim)


def tiles_to_tokens(out, lse, tok, num_tokens: int, in_order: bool = False):
    """Inverse of :func:`token_tiles` for the results: out [num_tiles, Hkv, q_tile * G, D],
    lse [num_tiles, Hkv, q_tile * G] -> out [num_tokens, Hq, D], lse [num_tokens, Hq]; tokens
    in no tile get out 0 and lse -inf. ``in_order``: tile i holds token i alone (decode), so
    no scatter is needed."""
    nt, num_kv_heads, rows, head_dim = out.shape
    tq = tok.shape[1]
    group = rows // tq
    num_q_heads = num_kv_heads * group
    out = out.reshape(nt, num_kv_heads, tq, group, head_dim).transpose(0, 2, 1, 3, 4)
    out = out.reshape(nt * tq, num_q_heads, head_dim)
    lse = lse.reshape(nt, num_kv_heads, tq, group).transpose(0, 2, 1, 3)
    lse = lse.reshape(nt * tq, num_q_heads)
    if in_order:
        return out[:num_tokens], lse[:num_tokens]
    flat = tok.reshape(-1)
    out_full = jnp.zeros((num_tokens, num_q_heads, head_dim), out.dtype)
    out_full = out_full.at[flat].set(out, mode="drop", unique_indices=True)
    lse_full = jnp.full((num_tokens, num_q_heads), -jnp.inf, jnp.float32)
    lse_full = lse_full.at[flat].set(lse, mode="drop", unique_indices=True)
    return out_full, lse_full


def ragged_paged_attention(q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens, *,
                           scale: float, causal: bool = True, sliding_window: int | None = None,
                           logits_soft_cap: float | None = None, q_tile: int | None = None,
                           chunk_tokens: int | None = None,
                           heads_in_sequence: bool | None = None, num_tiles: int | None = None,
                           k_scale=None, v_scale=None, kv_layout: str = "NHD", out_dtype=None):
    """Paged attention of a ragged batch; returns (out in q's dtype, or ``out_dtype``, lse
    f32).

    float8_e4m3fn caches are read as float32(cache) * k_scale (v_scale): each loop step
    converts the blocks it gathers (no dequantized copy of the cache); scales None (1.0) or
    float32 scalars, may be traced.

    ``q_tile`` (query tokens per tile) and ``num_tiles`` override choose_tiling's; the caller
    of a ``num_tiles`` guarantees sum over sequences of ceil(q_len / q_tile) <= num_tiles.

    q: [num_tokens, num_q_heads, head_dim]; caches [num_blocks, block_size, num_kv_heads,
    head_dim] (``kv_layout`` "HND": [num_blocks, num_kv_heads, block_size, head_dim], each
    step's gathered blocks transposed); block_tables i32[num_seqs, max_blocks_per_seq];
    kv_lens i32[num_seqs]; cu_q_lens i32[num_seqs + 1] or None (decode). Tokens past
    cu_q_lens[-1] (allowed here, not in the public op) belong to no sequence and get out 0,
    lse -inf.

    Query tiles of many rows (prefill) run one (kv head, tile) at a time on CPU
    (``heads_in_sequence`` None: chosen by platform; True / False force it): a step's score
    tile then stays in cache, and each tile loops over its own chunks only (a causal prefill's
    early tiles see few keys). Measured, one thread: 512 tokens over 4096 cached 1.6-1.9x (f32
    and bf16), 4608 from scratch 3.6x. Accelerators, and few-row tiles (decode, where it
    measured slower), run all tiles and kv heads in each step.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    hnd = kv_layout == "HND"
    num_blocks, block_size, num_kv_heads, _ = cache_dims(k_cache, kv_layout)
    num_seqs, max_blocks = block_tables.shape
    group = num_q_heads // num_kv_heads
    decode = cu_q_lens is None
    if decode:
        cu_q_lens = jnp.arange(num_seqs + 1, dtype=jnp.int32)
    out_dtype = q.dtype if out_dtype is None else out_dtype
    if num_tokens == 0 or num_seqs == 0:
        return (jnp.zeros(q.shape, out_dtype),
                jnp.full((num_tokens, num_q_heads), -jnp.inf, jnp.float32))
    tq, nt, _ = choose_tiling(num_tokens, num_seqs, decode, block_size, 0, q_tile)
    nt = nt if num_tiles is None else max(1, num_tiles)
    rows = tq * group
    t_major = rows < 32
    kv_lens = kv_lens.astype(jnp.int32)
    cu_q_lens = cu_q_lens.astype(jnp.int32)

    seq, tok, lo_blk, _, hi, first_pos = kernel_tile_plan(
        kv_lens, cu_q_lens, num_tokens=num_tokens, num_tiles=nt, q_tile=tq,
        block_size=block_size, causal=causal, sliding_window=sliding_window)
    pos = first_pos[:, None] + jnp.arange(tq, dtype=jnp.int32)[None, :]   # [nt, tq]

    qf = token_tiles(q, tok, num_kv_heads).astype(jnp.float32) * scale   # [nt, Hkv, rows, D]
    row_pos = jnp.repeat(pos, group, axis=1)                               # [nt, rows]
    tables = block_tables[seq]                                             # [nt, max_blocks]
    in_block = jnp.arange(block_size, dtype=jnp.int32)

    dtype = k_cache.dtype
    prec = _cache_dot_precision(q, dtype)

    def run(qh, head, tiles):
        """The chunk loop over the kv heads of qh [n, Hh, rows, D], all of them (head None) or
        the one numbered ``head`` (traced), for the n tiles whose (lo_blk, tables, hi,
        row_pos) are ``tiles`` (all tiles, or one)."""
        lo_blk, tables, hi, row_pos = tiles
        n, hh = qh.shape[:2]
        cb = _chunk_blocks(tq, block_size, n * 8 * hh * head_dim, chunk_tokens)
        ct = cb * block_size
        n_chunks = (jnp.maximum(hi - lo_blk * block_size, 0) + ct - 1) // ct
        steps = jnp.max(n_chunks)
        offs = jnp.arange(cb, dtype=jnp.int32)

        def body(state):
            j, m, l_sum, acc = state
            k_bits, v_bits, (j, h) = _cache_bits_in_step(k_cache, v_cache, (j, head))
            blk = lo_blk[:, None] + j * cb + offs[None, :]                     # [n, cb]
            ids = jnp.take_along_axis(tables, jnp.minimum(blk, max_blocks - 1), axis=1)
            # tiles already done re-read block 0 (cached) instead of streaming more blocks
            ids = jnp.where((j < n_chunks)[:, None], jnp.clip(ids, 0, num_blocks - 1), 0)
            t = (blk[:, :, None] * block_size + in_block).reshape(n, ct)       # key positions
            tv = t < hi[:, None]                                               # [n, ct]
            if causal and sliding_window is not None:  # before the tile's first window: may
                tv = tv & (t > row_pos[:, :1] - sliding_window)  # hold anything (NaN)

            def load(cache, scale):
                flat = ids.reshape(-1)                     # [n*cb, B, Hh, D]
                if hnd:  # a step's blocks, transposed as they are gathered
                    x = (jnp.take(cache, flat, axis=0).transpose(0, 2, 1, 3) if h is None
                         else cache[flat, h, :, :])
                else:
                    x = jnp.take(cache, flat, axis=0) if h is None else cache[flat, :, h, :]
                x = _bits_to_f32(x.reshape(n, ct, hh, head_dim), dtype, scale)
                x = jnp.where(tv[:, :, None, None], x, 0.0)    # padding slots may hold NaN
                return x.transpose(0, 2, 1, 3)                 # [n, Hh, ct, D]

            k, v = load(k_bits, k_scale), load(v_bits, v_scale)
            # XLA:CPU runs the QK dot 10-25x faster with the operand of many rows on the left;
            # keep the softmax axis ("t") next to where that dot puts it.
            if t_major:  # few query rows (decode): s [n, Hh, ct, rows]
                s = jnp.einsum("nhtd,nhrd->nhtr", k, qh,
                               preferred_element_type=jnp.float32, precision=prec)
                tt, rp, ax = t[:, None, :, None], row_pos[:, None, None, :], 2
                mask = tv[:, None, :, None]
            else:        # many query rows (prefill): s [n, Hh, rows, ct]
                s = jnp.einsum("nhrd,nhtd->nhrt", qh, k,
                               preferred_element_type=jnp.float32, precision=prec)
                tt, rp, ax = t[:, None, None, :], row_pos[:, None, :, None], 3
                mask = tv[:, None, None, :]
            s = soft_cap(s, logits_soft_cap)
            mask = visible(mask, tt, rp, causal=causal, sliding_window=sliding_window)
            s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=ax))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(s - jnp.expand_dims(m_safe, ax))
            alpha = jnp.exp(m - m_safe)
            l_sum = l_sum * alpha + jnp.sum(p, axis=ax)
            if t_major:
                # few rows: a fused multiply-reduce beats XLA:CPU's batched dot here, and the V
                # gather fuses into it (measured 1.5x on decode 8x4096)
                pv = jnp.sum(p[..., None] * v[:, :, :, None, :], axis=2)
            else:
                pv = jnp.einsum("nhrt,nhtd->nhrd", p, v,
                                preferred_element_type=jnp.float32, precision=prec)
            acc = acc * alpha[..., None] + pv
            return j + 1, m_new, l_sum, acc

        m0 = jnp.full((n, hh, rows), -jnp.inf, jnp.float32)
        l0 = jnp.zeros((n, hh, rows), jnp.float32)
        a0 = jnp.zeros((n, hh, rows, head_dim), jnp.float32)
        # the step counter too: a 16-bit or fp8 cache's step ties it to the caches
        # (_cache_bits_in_step), so inside shard_map it varies as they do
        state = match_varying((jnp.int32(0), m0, l0, a0), q, k_cache, v_cache, block_tables,
                              kv_lens, cu_q_lens, head)
        _, m, l_sum, acc = lax.while_loop(lambda st: st[0] < steps, body, state)
        return m, l_sum, acc

    all_tiles = (lo_blk, tables, hi, row_pos)

    def per_head():
        """One (kv head, tile) per step of two nested lax.maps: each tile loops over its own
        chunks only (a causal prefill's early tiles see few keys)."""
        def head_fn(h):
            def tile_fn(i):
                one = tuple(lax.dynamic_slice_in_dim(x, i, 1) for x in all_tiles)
                zero = jnp.int32(0)  # a Python 0 is int64 under x64: mixed index dtypes
                qh = lax.dynamic_slice(qf, (i, h, zero, zero), (1, 1, rows, head_dim))
                return tuple(x[0, 0] for x in run(qh, h, one))
            return lax.map(tile_fn, jnp.arange(nt, dtype=jnp.int32))
        parts = lax.map(head_fn, jnp.arange(num_kv_heads, dtype=jnp.int32))
        return tuple(jnp.moveaxis(x, 0, 1) for x in parts)   # [Hkv, nt, ...] -> [nt, Hkv, ...]

    if t_major or heads_in_sequence is False:
        m, l_sum, acc = run(qf, None, all_tiles)
    elif heads_in_sequence:
        m, l_sum, acc = per_head()
    else:
        m, l_sum, acc = lax.platform_dependent(cpu=per_head,
                                               default=lambda: run(qf, None, all_tiles))
    seen = ~(l_sum <= 0)  # a NaN sum (a NaN in the KV read) counts: out and lse NaN
    out = acc / jnp.where(seen, l_sum, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l_sum, 1.0)), -jnp.inf)
    out, lse = tiles_to_tokens(out, lse, tok, num_tokens, in_order=decode)
    return out.astype(out_dtype), lse


def merge_attention_states(out_a, lse_a, out_b, lse_b):
    """LSE merge of two partial attentions; two empty states (lse -inf, or +inf: FlashAttention-2's
    empty rows) give out 0, lse -inf; an empty state's out is not read (it may hold anything)."""
    lse_a, lse_b = (jnp.where(x == jnp.inf, -jnp.inf, x) for x in (lse_a, lse_b))
    m = jnp.maximum(lse_a, lse_b)
    seen = m != -jnp.inf  # NaN (a NaN state) counts: out and lse NaN
    m0 = jnp.where(seen, m, 0.0)
    wa, wb = jnp.exp(lse_a - m0), jnp.exp(lse_b - m0)
    denom = jnp.where(seen, wa + wb, 1.0)
    # per-row weights (one reciprocal a row, as the torch path), then per element two
    # products and a select per side: an empty side (and both, so out 0) adds 0 whatever its
    # out holds (0 * NaN would be NaN). ~5-8% less time than dividing every element.
    inv = 1.0 / denom
    ca, cb = (wa * inv)[..., None], (wb * inv)[..., None]
    out = (jnp.where((lse_a == -jnp.inf)[..., None], 0.0, ca * out_a.astype(jnp.float32))
           + jnp.where((lse_b == -jnp.inf)[..., None], 0.0, cb * out_b.astype(jnp.float32)))
    lse = jnp.where(seen, m0 + jnp.log(denom), -jnp.inf)
    return out.astype(out_a.dtype), lse.astype(jnp.float32)


def apply_sinks(out, lse, sinks):
    """The attention sinks' share of the softmax on a finished (out, lse): with
    lse' = log(e^lse + e^sink), out' = out e^(lse - lse') (in float32: one more rounding of a
    bf16/f16 out). A row with lse -inf (no key) stays 0 and gets lse' = sink."""
    sink = sinks.astype(jnp.float32)[None, :]
    new_lse = jnp.logaddexp(lse, sink)
    weight = jnp.where(lse == -jnp.inf, 0.0, jnp.exp(lse - new_lse))
    return (out.astype(jnp.float32) * weight[..., None]).astype(out.dtype), new_lse


#: Bytes of float32 scores of one step of the single-prefix path: [rows, chunk] of one kv head
#: (bigger chunks make bigger, faster dots; measured on 32 x 2048 decode: 1024 keys 13.0 ms,
#: 2048 keys 11.9 ms, 256 keys 18.6 ms). 1 MiB is twice the 512 KiB L2 of a core here: the
#: step's scores, K and V live in L3, which the dots' rate does not notice (512 and 1024 keys
#: per step measured no faster).
PREFIX_SCORE_BYTES = 1 << 20
#: Fewest keys per step of the single-prefix path; with more query rows than this allows in
#: PREFIX_SCORE_BYTES the generic ragged path (which tiles the queries) is used.
PREFIX_MIN_CHUNK_TOKENS = 256


def _single_prefix_chunk_blocks(rows: int, max_prefix_blocks: int, block_size: int) -> int:
    """Static KV blocks per step of :func:`single_prefix_attention` (0: path not suited)."""
    keys = PREFIX_SCORE_BYTES // (4 * max(rows, 1))
    if keys < PREFIX_MIN_CHUNK_TOKENS:
        return 0
    return max(1, min(max_prefix_blocks, keys // block_size))


def single_prefix_attention(q, k_cache, v_cache, block_table, prefix_len, has_prefix, *,
                            scale: float, logits_soft_cap: float | None = None,
                            chunk_blocks: int | None = None, k_scale=None, v_scale=None,
                            kv_layout: str = "NHD"):
    """Non-causal attention of every query token over one prefix; returns (out f32, lse f32).

    q: [num_tokens, num_q_heads, head_dim]; block_table i32[max_prefix_blocks]; prefix_len
    i32[] (keys of the prefix, whole blocks); has_prefix bool[num_tokens] (False: out 0,
    lse -inf). float8_e4m3fn caches: each step converts the chunk it gathers, times k_scale
    (v_scale), as :func:`ragged_paged_attention`.

    The fast path of cascade attention with one prefix: all the tokens sharing it are the rows
    of one dot per kv head (``num_tokens * group`` rows, every q head of the group stacked), so
    each step is two big dots ([rows, D] x [D, keys] and [rows, keys] x [keys, D]) over a chunk
    of the prefix gathered once for that head. Kv heads run one after another (``lax.map``)
    and the chunks in a ``while_loop`` with an online softmax (no loop when one chunk holds the
    table), so the working set of a step is one head's chunk (XLA:CPU's dots reach the sgemm
    rate at these sizes; the generic loop's all-heads steps spill the cache).

    The dots are ~85% of the time (32 x 2048 f32, one thread: ~14 of ~16.5 ms, 71 GFLOP/s for
    QK and 69 for PV). Tried and no faster there (interleaved A/B, min and median): p without
    the padding mask; exp2 with log2 e in the scale; 512 or 1024 keys per step; all heads of a
    chunk gathered at once (one pass over whole blocks) or 2 / 4 heads per gather; QK with the
    keys as rows (84 GFLOP/s alone, but PV then needs p as [rows, keys]: the transpose, in
    the exp pass or behind a barrier, costs what the dot saves; PV on p as [keys, rows] is
    not a YNN dot here, 58 GFLOP/s). ``kv_layout`` "HND": a head's chunk is read as its blocks'
    [block_size, head_dim] slabs.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = cache_dims(k_cache, kv_layout)
    hnd = kv_layout == "HND"
    group = num_q_heads // num_kv_heads
    rows = num_tokens * group
    max_blocks = block_table.shape[0]
    if chunk_blocks is None:
        chunk_blocks = _single_prefix_chunk_blocks(rows, max_blocks, block_size) or 1
    cb = chunk_blocks
    ct = cb * block_size
    n_pad = -(-max_blocks // cb) * cb
    table = jnp.clip(block_table.astype(jnp.int32), 0, num_blocks - 1)
    table = jnp.pad(table, (0, n_pad - max_blocks))
    prefix_len = jnp.minimum(prefix_len.astype(jnp.int32), max_blocks * block_size)
    prefix_blocks = prefix_len // block_size
    first_block = table[0]
    steps = (prefix_len + ct - 1) // ct
    # [N, Hkv, G, D] -> [Hkv, N * G, D]
    qf = q.astype(jnp.float32) * scale
    qf = qf.reshape(num_tokens, num_kv_heads, group, head_dim).transpose(1, 0, 2, 3)
    qf = qf.reshape(num_kv_heads, rows, head_dim)
    in_chunk = jnp.arange(ct, dtype=jnp.int32)
    blk_in_chunk = jnp.arange(cb, dtype=jnp.int32)
    dtype = k_cache.dtype
    prec = _cache_dot_precision(q, dtype)

    def head(args):
        qh, h = args

        def body(state):
            j, m, l_sum, acc = state
            # tied to the head too: with one chunk (no loop) j is a constant, and a 16-bit
            # cache would be copied whole outside the head map on every call
            k_bits, v_bits, (j, hh) = _cache_bits_in_step(k_cache, v_cache, (j, h))
            # Blocks past the prefix (it is whole blocks) are read as its first block, so their
            # logits repeat logits of real keys: the row max needs no mask (one pass fewer
            # over the scores) and V no zeroing; only p drops them.
            ids = lax.dynamic_slice(table, (j * cb,), (cb,))
            ids = jnp.where(j * cb + blk_in_chunk < prefix_blocks, ids, first_block)
            tv = j * ct + in_chunk < prefix_len
            k, v = ((bits[ids, hh] if hnd else bits[ids, :, hh]).reshape(ct, head_dim)
                    for bits in (k_bits, v_bits))
            k, v = _bits_to_f32(k, dtype, k_scale), _bits_to_f32(v, dtype, v_scale)
            s = jnp.einsum("rd,td->rt", qh, k, preferred_element_type=jnp.float32, precision=prec)
            s = soft_cap(s, logits_soft_cap)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            # empty prefix: the max may be NaN (a padding block), p is 0 and out is masked
            m_new = jnp.where(j * ct < prefix_len, m_new, m)
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.where(tv[None, :], jnp.exp(s - m_safe[:, None]), 0.0)
            alpha = jnp.exp(m - m_safe)
            l_sum = l_sum * alpha + jnp.sum(p, axis=1)
            pv = jnp.einsum("rt,td->rd", p, v, preferred_element_type=jnp.float32, precision=prec)
            return j + 1, m_new, l_sum, acc * alpha[:, None] + pv

        state = match_varying(  # the counter too, as in the paged loop
            (jnp.int32(0), jnp.full((rows,), -jnp.inf, jnp.float32),
             jnp.zeros((rows,), jnp.float32), jnp.zeros((rows, head_dim), jnp.float32)),
            qh, h, k_cache, v_cache, table, prefix_len, has_prefix)
        if n_pad == cb:  # the whole table in one step (static): no loop
            _, m, l_sum, acc = body(state)
        else:
            _, m, l_sum, acc = lax.while_loop(lambda st: st[0] < steps, body, state)
        return m, l_sum, acc

    m, l_sum, acc = lax.map(head, (qf, jnp.arange(num_kv_heads, dtype=jnp.int32)))
    seen = ~(l_sum <= 0) & jnp.repeat(has_prefix, group)[None, :]  # NaN sums count
    out = jnp.where(seen[..., None], acc / jnp.where(seen, l_sum, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l_sum, 1.0)), -jnp.inf)
    # [Hkv, N * G, ...] -> [N, Hq, ...]
    out = out.reshape(num_kv_heads, num_tokens, group, head_dim).transpose(1, 0, 2, 3)
    lse = lse.reshape(num_kv_heads, num_tokens, group).transpose(1, 0, 2)
    return (out.reshape(num_tokens, num_q_heads, head_dim),
            lse.reshape(num_tokens, num_q_heads))


def _multi_prefix_q_tile(num_tokens: int, num_prefixes: int, group: int,
                         max_prefix_blocks: int, block_size: int) -> int:
    """Static query tokens per step of :func:`multi_prefix_attention` (0: path not suited):
    the average tokens per prefix rounded up to a power of two, halved until a step's score
    tile fits as in :func:`single_prefix_attention`."""
    tile = min(1 << (max(-(-num_tokens // max(num_prefixes, 1)), 1) - 1).bit_length(),
               max(num_tokens, 1))
    while tile > 1 and not _single_prefix_chunk_blocks(tile * group, max_prefix_blocks,
                                                       block_size):
        tile //= 2
    return tile if _single_prefix_chunk_blocks(tile * group, max_prefix_blocks,
                                               block_size) else 0


def multi_prefix_attention(q, k_cache, v_cache, prefix_block_tables, prefix_lens, tok_pid, *,
                           scale: float, logits_soft_cap: float | None = None,
                           q_tile: int | None = None, k_scale=None, v_scale=None,
                           kv_layout: str = "NHD"):
    """Non-causal attention of each query token over its prefix; returns (out f32, lse f32).

    q: [num_tokens, num_q_heads, head_dim]; prefix_block_tables i32[num_prefixes,
    max_prefix_blocks]; prefix_lens i32[num_prefixes]; tok_pid i32[num_tokens], the prefix of
    each token (num_prefixes: none, out 0 and lse -inf).

    Cascade attention over several prefixes: the tokens are sorted by prefix, and each prefix
    (a ``fori_loop``) runs :func:`single_prefix_attention` on windows of ``q_tile`` of its
    sorted tokens (a ``while_loop``: as many windows as it has tokens, most prefixes one), so
    each prefix's KV is read once per window with all its tokens' q heads as the rows of two
    big dots per kv head. Rows of a window past the prefix's tokens are computed as "no
    prefix"; windows run in sorted order, so a later window rewrites them.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_prefixes, max_blocks = prefix_block_tables.shape
    _, block_size, num_kv_heads, _ = cache_dims(k_cache, kv_layout)
    group = num_q_heads // num_kv_heads
    if q_tile is None:
        q_tile = _multi_prefix_q_tile(num_tokens, num_prefixes, group, max_blocks,
                                      block_size) or 1
    tok_pid = tok_pid.astype(jnp.int32)
    order = jnp.argsort(tok_pid, stable=True).astype(jnp.int32)
    counts = jnp.zeros((num_prefixes + 1,), jnp.int32).at[tok_pid].add(1)[:num_prefixes]
    starts = jnp.cumsum(counts) - counts
    # q_tile rows of padding: a window starting at a prefix's last token stays in bounds
    qs = jnp.pad(jnp.take(q, order, axis=0), ((0, q_tile), (0, 0), (0, 0)))
    rows = jnp.arange(q_tile, dtype=jnp.int32)
    lens = prefix_lens.astype(jnp.int32)

    def prefix_body(p, carry):
        def window(state):
            c, out, lse = state
            lo = starts[p] + c * q_tile
            live = c * q_tile + rows < counts[p]
            o, lg = single_prefix_attention(
                lax.dynamic_slice_in_dim(qs, lo, q_tile, 0), k_cache, v_cache,
                prefix_block_tables[p], lens[p], live, scale=scale,
                logits_soft_cap=logits_soft_cap, k_scale=k_scale, v_scale=v_scale,
                kv_layout=kv_layout)
            # rows past this prefix's tokens get out 0, lse -inf: they belong to a later
            # window or prefix (written after this one) or to tokens of no prefix (whose
            # result that is), so the whole window is written
            return (c + 1, lax.dynamic_update_slice_in_dim(out, o, lo, 0),
                    lax.dynamic_update_slice_in_dim(lse, lg, lo, 0))

        _, out, lse = lax.while_loop(lambda st: st[0] * q_tile < counts[p], window,
                                     (jnp.int32(0), *carry))
        return out, lse

    out = jnp.zeros((num_tokens + q_tile, num_q_heads, head_dim), jnp.float32)
    lse = jnp.full((num_tokens + q_tile, num_q_heads), -jnp.inf, jnp.float32)
    out, lse = match_varying((out, lse), q, k_cache, v_cache, prefix_block_tables, prefix_lens,
                             tok_pid)
    out, lse = lax.fori_loop(0, num_prefixes, prefix_body, (out, lse))
    inv = jnp.zeros((num_tokens,), jnp.int32).at[order].set(
        jnp.arange(num_tokens, dtype=jnp.int32))
    return jnp.take(out, inv, axis=0), jnp.take(lse, inv, axis=0)


#: Longest own KV (max_blocks_per_seq * block_size) for which the own part of a decode batch
#: is read whole per sequence (:func:`short_decode_attention`); longer: the generic loop.
SHORT_DECODE_MAX_TOKENS = 512
#: float32 K+V bytes per step of short_decode_attention (a few sequences' whole KV).
SHORT_DECODE_STEP_BYTES = 2 << 20


def short_decode_attention(q, k_cache, v_cache, block_tables, kv_lens, *, scale: float,
                           logits_soft_cap: float | None = None, seqs_per_step: int | None = None,
                           k_scale=None, v_scale=None, kv_layout: str = "NHD", out_dtype=None):
    """Decode attention (one query per sequence, sees its kv_len keys) over short KV; returns
    (out in q's dtype, or ``out_dtype``, lse f32).

    q: [num_seqs, num_q_heads, head_dim]; caches [num_blocks, block_size, num_kv_heads,
    head_dim] (``kv_layout`` "HND": [num_blocks, num_kv_heads, block_size, head_dim]);
    block_tables i32[num_seqs, max_blocks_per_seq]; kv_lens i32[num_seqs].

    The own part of cascade attention: every sequence's whole KV (max_blocks_per_seq blocks,
    static and short) is gathered at once, ``seqs_per_step`` sequences per ``lax.map`` step,
    and one softmax needs no online rescaling; the dots are batched over (sequence, kv head)
    with the group's q heads as columns of QK and rows of PV (measured 32 x 128 f32, one
    thread: 4.5 ms min; the generic loop of one-block steps 6.3 ms).
    """
    num_seqs, num_q_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = cache_dims(k_cache, kv_layout)
    max_blocks = block_tables.shape[1]
    group = num_q_heads // num_kv_heads
    ct = max_blocks * block_size
    if seqs_per_step is None:
        seqs_per_step = SHORT_DECODE_STEP_BYTES // (8 * ct * num_kv_heads * head_dim)
    g = max(1, min(num_seqs, seqs_per_step))
    n_steps = -(-num_seqs // g)
    pad = n_steps * g - num_seqs
    tables = jnp.pad(jnp.clip(block_tables.astype(jnp.int32), 0, num_blocks - 1),
                     ((0, pad), (0, 0)))
    lens = jnp.pad(kv_lens.astype(jnp.int32), (0, pad))
    qf = jnp.pad(q.astype(jnp.float32) * scale, ((0, pad), (0, 0), (0, 0)))
    qf = qf.reshape(n_steps, g, num_kv_heads, group, head_dim)
    t = jnp.arange(ct, dtype=jnp.int32)
    dtype = k_cache.dtype
    prec = _cache_dot_precision(q, dtype)

    def step(args):
        qs, tb, n = args                                   # [g, Hkv, G, D], [g, MB], [g]
        k_bits, v_bits, tb = _cache_bits_in_step(k_cache, v_cache, tb)
        ok = t[None, :] < n[:, None]                       # [g, ct]

        def load(cache, mask, cache_scale):
            x = jnp.take(cache, tb.reshape(-1), axis=0)
            if kv_layout == "HND":  # [g * MB, Hkv, B, D] -> [g, ct, Hkv, D]
                x = x.reshape(g, max_blocks, num_kv_heads, block_size, head_dim)
                x = x.transpose(0, 1, 3, 2, 4)
            x = _bits_to_f32(x.reshape(g, ct, num_kv_heads, head_dim), dtype, cache_scale)
            if mask:  # padding slots may hold NaN (in K they only reach masked logits)
                x = jnp.where(ok[:, :, None, None], x, 0.0)
            return x.transpose(0, 2, 1, 3)                 # [g, Hkv, ct, D]

        k, v = load(k_bits, False, k_scale), load(v_bits, True, v_scale)
        # Each dot is fastest in its own orientation (XLA:CPU, G = 4 rows): QK with the keys
        # as rows (s [g, Hkv, ct, G]), PV with p as [G, ct] rows. The barrier keeps XLA from
        # folding the (small) transpose of s into the QK dot, which turns it into the slow
        # [G, ct] orientation (measured 32 x 128 f32: 4.5 ms, both dots key-major 5.4 ms).
        s = jnp.einsum("ghtd,ghrd->ghtr", k, qs, preferred_element_type=jnp.float32, precision=prec)
        s = lax.optimization_barrier(s).transpose(0, 1, 3, 2)   # [g, Hkv, G, ct]
        s = jnp.where(ok[:, None, None, :], soft_cap(s, logits_soft_cap), -jnp.inf)
        m = jnp.max(s, axis=3)                             # [g, Hkv, G]
        m_safe = jnp.where(m == -jnp.inf, 0.0, m)
        p = jnp.exp(s - m_safe[..., None])
        l_sum = jnp.sum(p, axis=3)
        o = jnp.einsum("ghrt,ghtd->ghrd", p, v, preferred_element_type=jnp.float32, precision=prec)
        seen = ~(l_sum <= 0)  # a NaN sum counts: out and lse NaN
        o = o / jnp.where(seen, l_sum, 1.0)[..., None]
        lse = jnp.where(seen, m_safe + jnp.log(jnp.where(seen, l_sum, 1.0)), -jnp.inf)
        return o, lse

    out, lse = lax.map(step, (qf, tables.reshape(n_steps, g, max_blocks),
                              lens.reshape(n_steps, g)))
    out = out.reshape(n_steps * g, num_q_heads, head_dim)[:num_seqs]
    lse = lse.reshape(n_steps * g, num_q_heads)[:num_seqs]
    return out.astype(q.dtype if out_dtype is None else out_dtype), lse




def named_blocks(k_cache, v_cache, *tables):
    """(k, v, *tables): the blocks the tables name, in table order, and the tables remapped to
    them (static shapes: jit-friendly); when the tables name at least as many entries as the
    cache has blocks, the caches and tables unchanged. Entries past a row's blocks (never
    read) are clamped into range before the gather."""
    num_blocks = int(k_cache.shape[0])
    total = sum(int(np.prod(t.shape)) for t in tables)
    if 0 < total < num_blocks:
        ids = jnp.concatenate([jnp.asarray(t).reshape(-1) for t in tables])
        k_cache, v_cache = (jnp.take(c, ids, axis=0, mode="clip") for c in (k_cache, v_cache))
        remapped, start = [], 0
        for t in tables:
            n = int(np.prod(t.shape))
            remapped.append((jnp.arange(n, dtype=jnp.int32) + start).reshape(t.shape))
            start += n
        tables = tuple(remapped)
    return (k_cache, v_cache, *tables)


def nhd_blocks(k_cache, v_cache, *tables):
    """HND caches [num_blocks, heads, block_size, head_dim] as NHD ones for a backend that
    reads NHD only (registered without HND in its ``kv_layouts``; none of this package's):
    (k, v, *tables), the blocks the tables name (:func:`named_blocks`) with their head and
    token dims swapped, a copy of what the call reads."""
    k_cache, v_cache, *tables = named_blocks(k_cache, v_cache, *tables)
    return (jnp.swapaxes(k_cache, 1, 2), jnp.swapaxes(v_cache, 1, 2), *tables)


def _cpu_kernel_takes(q, k_cache, v_cache) -> bool:
    """Whether the CPU decode kernel takes these inputs (caches of q's dtype, or float8)."""
    from ..kernels.cpu import xla_ffi

    if k_cache.dtype == jnp.float8_e4m3fn:
        return xla_ffi.use_for_attention_fp8(q, k_cache, v_cache)
    return xla_ffi.use_for_attention(q, k_cache, v_cache)


def decode_on_cpu_kernel(xla_fn, q, k_cache, v_cache, block_tables, kv_lens, *, scale: float,
                         sliding_window: int | None = None,
                         logits_soft_cap: float | None = None, k_scale=None, v_scale=None,
                         kv_layout: str = "NHD", out_dtype=None):
    """Decode attention (one query per sequence, at its kv_len - 1), (out in q's dtype, or
    ``out_dtype``: q's or float32, lse f32): ``xla_fn()``, except on CPU when the compiled
    FFI kernels build, where the decode handler of ``kernels/cpu`` reads each sequence's
    blocks once, all kv heads and the group's q heads per K/V row (measured one thread:
    decode 8 x 4096 f32 ~2x the ragged loop; the cascade's own part, 32 seqs x 128 tokens,
    f32 4.5 vs 5.0 ms for
    :func:`short_decode_attention`, bf16 2.8 vs 4.7 ms). float8_e4m3fn caches: the kernel
    reads their bytes, the scales (None or float32 scalars, may be traced) an operand.
    ``kv_layout`` "HND": the kernel reads HND caches in place (``xla_fn`` reads them as it
    does)."""
    from ..kernels.cpu import xla_ffi

    if q.shape[0] == 0 or not _cpu_kernel_takes(q, k_cache, v_cache):
        return xla_fn()

    def cpu_path():
        return xla_ffi.paged_attention_decode(q, k_cache, v_cache, block_tables, kv_lens,
                                              scale=scale, sliding_window=sliding_window,
                                              logits_soft_cap=logits_soft_cap,
                                              k_scale=k_scale, v_scale=v_scale,
                                              kv_layout=kv_layout, out_dtype=out_dtype)

    return lax.platform_dependent(cpu=cpu_path, default=xla_fn)


#: Query tile (tokens) of the prefill chunks of a mixed batch on CPU (ragged_on_cpu_kernel).
LONG_TILE = 64
#: Longest sequence (query tokens) of a ragged batch on CPU whose tokens run in the decode
#: kernel, each a sequence of its own (ragged_on_cpu_kernel's token_decodes), over float32
#: caches and over 16-bit or fp8 ones; longer sequences run in the ragged loop (with_loop).
#: Each token reads its keys, where the loop's tiles share them. Measured here, one thread, 32
#: q / 8 kv heads, head_dim 128, 8 decodes + a chunk of n tokens, all at context C (64, 512,
#: 2048), the chunk in the loop / in the kernel: float32 2.3-7.0x at n 2-28, 0.83-0.98x at n 32 and
#: 0.67-0.78x at n 64 (C 512-2048); bfloat16 3.1-10x at n 2-16, 1.1-1.4x at n 32-48,
#: 0.94-1.31x at n 64. (The loop's tiles follow the batch's mean tokens per sequence: a
#: float32 chunk of 16-28 tokens next to 8 decodes took 29-153 ms there.)
CPU_RAGGED_DECODE_MAX_Q = 32
CPU_RAGGED_DECODE_16BIT_MAX_Q = 48


def cpu_ragged_decode_max_q(cache_dtype) -> int:
    if jnp.dtype(cache_dtype) == jnp.float32:
        return CPU_RAGGED_DECODE_MAX_Q
    return CPU_RAGGED_DECODE_16BIT_MAX_Q


def ragged_on_cpu_kernel(q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens, *,
                         scale: float, causal: bool = True, sliding_window: int | None = None,
                         logits_soft_cap: float | None = None, k_scale=None, v_scale=None,
                         kv_layout: str = "NHD"):
    """:func:`ragged_paged_attention` of a ragged batch, except on CPU when the compiled FFI
    kernels build: there the tokens of the sequences of up to CPU_RAGGED_DECODE_*MAX_Q tokens
    (the decodes among them) run through the decode handler of ``kernels/cpu``, each token a
    sequence of its own, and the ragged loop gets the longer sequences' tokens only (moved to
    the front; it computes nothing for the rows past its last sequence). In one loop a mixed
    batch's decodes took query tiles as long as the prefill chunks' (the tile length is
    static: the batch's mean tokens per sequence), each computed for all its rows. Measured,
    one thread, 31 decodes at 2048 keys + a 256-token chunk over 2048 cached, 32/8 heads x
    128, bf16: 873 ms in one loop; decodes alone 37 ms, the chunk alone 129 ms. ``kv_layout``:
    as ragged_paged_attention (the decode handler reads HND in place)."""
    from ..kernels.cpu import xla_ffi

    def xla_path():
        return ragged_paged_attention(q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens,
                                      scale=scale, causal=causal, sliding_window=sliding_window,
                                      logits_soft_cap=logits_soft_cap, k_scale=k_scale,
                                      v_scale=v_scale, kv_layout=kv_layout)

    num_tokens = q.shape[0]
    num_seqs = block_tables.shape[0]
    if num_tokens == 0 or num_seqs == 0 or not _cpu_kernel_takes(q, k_cache, v_cache):
        return xla_path()

    thr = cpu_ragged_decode_max_q(k_cache.dtype)
    cu = cu_q_lens.astype(jnp.int32)
    q_lens = cu[1:] - cu[:-1]

    # Tokens token_decodes computes: those of sequences of at most thr tokens, so at most
    # num_seqs * thr of them. Sized by that bound, not by the batch, the per-token block tables
    # it gathers ([rows, max_blocks]) stay small next to a long chunk: sized by the batch they
    # were num_tokens x max_blocks int32, which XLA reserved in every prefill and mixed call
    # (a 32k-token chunk over 128k keys: 1.29 GB of temp) and a mixed batch wrote.
    rows = min(num_tokens, num_seqs * thr)

    def token_decodes(take):
        """The decode kernel over the tokens, each a sequence of its own: token t of sequence
        s sees the first kv_lens[s] - (cu[s + 1] - 1 - t) keys of s's blocks (kv_lens[s]
        without causal). Tokens outside ``take`` (a mask over the batch's sequences, of at most
        thr tokens each), and a token past cu[-1] (unchecked padding), read nothing (out 0,
        lse -inf). Returns (out, lse, the mask of the tokens it computed)."""
        t = jnp.arange(num_tokens, dtype=jnp.int32)
        seq = jnp.clip(jnp.searchsorted(cu[1:], t, side="right"), 0, num_seqs - 1)
        mine = (t >= cu[seq]) & (t < cu[seq + 1]) & take[seq]
        # the computed tokens' indices, padded with num_tokens (dropped by the scatters below)
        idx = (t if rows == num_tokens else
               jnp.nonzero(mine, size=rows, fill_value=num_tokens)[0].astype(jnp.int32))
        at = jnp.minimum(idx, num_tokens - 1)
        s, on = seq[at], mine[at] & (idx < num_tokens)
        # from kv_len >= 0: unchecked, a kv_len near -2**31 minus the token's offset wrapped
        # to a count near 2**31 keys (a call of minutes)
        kv = jnp.maximum(kv_lens.astype(jnp.int32)[s], 0)
        if causal:
            kv = kv - (cu[s + 1] - 1 - idx)
        kv = jnp.where(on, jnp.clip(kv, 0, None), 0)
        out, lse = xla_ffi.paged_attention_decode(
            q if rows == num_tokens else q[at], k_cache, v_cache, block_tables[s], kv,
            scale=scale, sliding_window=sliding_window if causal else None,
            logits_soft_cap=logits_soft_cap, k_scale=k_scale, v_scale=v_scale,
            kv_layout=kv_layout)
        if rows < num_tokens:
            out = jnp.zeros(q.shape, out.dtype).at[idx].set(out, mode="drop")
            lse = jnp.full(q.shape[:2], -jnp.inf, lse.dtype).at[idx].set(lse, mode="drop")
        return out, lse, mine

    def cpu_path():
        return lax.cond(jnp.max(q_lens) <= thr,
                        lambda: token_decodes(jnp.ones(num_seqs, bool))[:2], with_loop)

    def with_loop():
        """The sequences of at most ``thr`` tokens (the decodes among them) by token_decodes;
        the longer ones through the ragged loop, their tokens moved to the front (the loop
        computes nothing for rows past its last sequence)."""
        short = q_lens <= thr

        refs = (q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens)

        def some_short():  # both branches vary alike inside shard_map
            out, lse, mine = token_decodes(short)
            return (*match_varying((out, lse), *refs), match_varying(mine, cu_q_lens))

        def no_short():  # a prefill alone: no per-token tables [num_tokens, max_blocks]
            out = (jnp.zeros(q.shape, q.dtype), jnp.full(q.shape[:2], -jnp.inf, jnp.float32))
            return (*match_varying(out, *refs),
                    match_varying(jnp.zeros(num_tokens, bool), cu_q_lens))

        d_out, d_lse, mine = lax.cond(jnp.any(short & (q_lens > 0)), some_short, no_short)
        order = jnp.argsort(mine.astype(jnp.int32), stable=True)  # the loop's tokens first
        rest_lens = jnp.where(short, 0, q_lens)
        rest_cu = jnp.concatenate([jnp.zeros(1, jnp.int32),
                                   jnp.cumsum(rest_lens).astype(jnp.int32)])

        def rest(q_tile=None, num_tiles=None):
            return ragged_paged_attention(
                q[order], k_cache, v_cache, block_tables, kv_lens, rest_cu, scale=scale,
                causal=causal, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                q_tile=q_tile, num_tiles=num_tiles, k_scale=k_scale, v_scale=v_scale,
                kv_layout=kv_layout)

        # The loop's static tile length is the batch's mean tokens per sequence, the short
        # sequences included: a long chunk next to many decodes would run in short tiles, each
        # reading all its keys. When the loop's sequences average LONG_TILE tokens or more
        # (so there are at most num_tokens // LONG_TILE of them) it runs LONG_TILE-token tiles
        # instead. (Tiles of the largest power of two up to thr, which every loop sequence
        # passes, ran 1.2-1.3x slower for a 40-token chunk next to 8 decodes: a 32-token
        # tile computes all its rows.)
        mean = choose_tiling(num_tokens, num_seqs, False, cache_dims(k_cache, kv_layout)[1])[0]
        if mean < LONG_TILE <= num_tokens:
            long_tiles = -(-num_tokens // LONG_TILE) + num_tokens // LONG_TILE
            out, lse = lax.cond(
                jnp.sum(rest_lens) >= LONG_TILE * jnp.sum(rest_lens > 0),
                lambda: rest(LONG_TILE, long_tiles), rest)
        else:
            out, lse = rest()
        back = jnp.zeros(num_tokens, jnp.int32).at[order].set(
            jnp.arange(num_tokens, dtype=jnp.int32))
        return (jnp.where(mine[:, None, None], d_out, out[back]),
                jnp.where(mine[:, None], d_lse, lse[back]))

    return lax.platform_dependent(cpu=cpu_path, default=xla_path)


#: On a CPU the XLA cascade runs only when some prefix group reaches CPU_CASCADE_MIN_ROWS query
#: rows per kv head (its tokens x q heads of a kv head) and CPU_CASCADE_MIN_SCORES score
#: elements (rows x prefix keys) over a float32 cache, twice both over a 16-bit one and 4 times
#: over fp8; else the
#: batch runs as paged attention over each sequence's prefix then own blocks (the same result;
#: each prefix read once per sequence). Measured here (one thread, 32 q / 8 kv heads, head_dim
#: 128, decode, 128 own tokens; cascade over paged attention, min of 14 calls; the ~1 ms cases
#: swing by 30% between sweeps), after the decode kernel's prefetches moved to L2 (which made
#: paged attention 1.5-1.9x faster and the thresholds twice what they were): float32 4
#: sequences (16 rows) 0.72-1.16x at 512-2048 keys, 0.65-0.74x at 4096; 8 sequences
#: 0.97-1.22x at 1024, 0.92-1.69x at 2048, 1.17-1.25x at 4096; 16 sequences 1.19-1.83x at
#: 1024, 0.81-1.41x at 128-512; 32 sequences 1.24-1.31x at 128-256. bfloat16 4 sequences
#: 0.77-1.18x at 1024-4096; 8 sequences 0.77-1.04x there; 16 sequences 1.03-1.30x at 1024,
#: 1.17-1.70x at 2048-4096; 64 sequences 1.02-1.42x at 128-256.
CPU_CASCADE_MIN_ROWS = 32
CPU_CASCADE_MIN_SCORES = 1 << 16


def _cascade_pays(q, k_cache, prefix_lens, prefix_ids, cu, kv_layout: str = "NHD"):
    """Whether some prefix group reaches CPU_CASCADE_MIN_ROWS / CPU_CASCADE_MIN_SCORES (a bool
    array; cu i32[num_seqs + 1])."""
    num_prefixes = prefix_lens.shape[0]
    group = q.shape[1] // cache_dims(k_cache, kv_layout)[2]
    more = max(1, 4 // jnp.dtype(k_cache.dtype).itemsize)
    pid = prefix_ids.astype(jnp.int32)
    pid = jnp.where((pid >= 0) & (pid < num_prefixes), pid, num_prefixes)
    tokens = jnp.zeros((num_prefixes,), jnp.int32).at[pid].add(cu[1:] - cu[:-1], mode="drop")
    rows = tokens * group
    scores = rows.astype(jnp.float32) * prefix_lens.astype(jnp.float32)
    return jnp.any((rows >= CPU_CASCADE_MIN_ROWS * more)
                   & (scores >= float(CPU_CASCADE_MIN_SCORES * more)))


def prefix_then_own_tables(prefix_block_tables, prefix_lens, prefix_ids, block_tables, kv_lens,
                           block_size: int):
    """The cascade's batch as plain paged attention: each sequence's table is its prefix's
    blocks then its own (prefix lengths are whole blocks), its kv_len grown by the prefix.
    Returns (tables i32[num_seqs, max_prefix_blocks + max_blocks], kv_lens i32); entries past
    a row's blocks hold other entries of the given tables (never read)."""
    i32 = jnp.int32
    num_prefixes, width = prefix_block_tables.shape
    num_seqs, own_width = block_tables.shape
    pid = prefix_ids.astype(i32)
    has = (pid >= 0) & (pid < num_prefixes)
    p = jnp.clip(pid, 0, max(num_prefixes - 1, 0))
    plen = jnp.where(has, prefix_lens.astype(i32)[p], 0) if num_prefixes else jnp.zeros_like(pid)
    # within what the value checks allow (unchecked: a length near -2**31 plus a negative
    # prefix wrapped to ~2**31 keys, a call of minutes)
    plen = jnp.clip(plen, 0, width * block_size)
    pblocks = plen // block_size
    cols = jnp.arange(width + own_width, dtype=i32)
    own = (jnp.take_along_axis(block_tables.astype(i32),
                               jnp.clip(cols[None, :] - pblocks[:, None], 0, own_width - 1), 1)
           if own_width else jnp.zeros((num_seqs, cols.shape[0]), i32))
    pre = (prefix_block_tables.astype(i32)[p][:, jnp.minimum(cols, width - 1)]
           if num_prefixes and width else own)
    kv = jnp.maximum(kv_lens.astype(i32), 0)  # + plen saturating at int32's limit (unchecked)
    return (jnp.where(cols[None, :] < pblocks[:, None], pre, own),
            kv + jnp.minimum(plen, jnp.iinfo(i32).max - kv))


def prefix_q_tile(num_tokens: int, num_prefixes: int) -> int:
    """Query tokens a kernel's prefix pass takes per program: the tokens per prefix rounded up
    to a power of two, at most 2 * MAX_Q_TILE."""
    avg = -(-num_tokens // max(num_prefixes, 1))
    return min(MAX_Q_TILE * 2, 1 << (max(avg, 1) - 1).bit_length())


def one_prefix_chunks(num_tokens: int) -> int:
    """Chunks of consecutive tokens a kernel's pass over one prefix runs as "sequences", each
    with a copy of the prefix's table row: the table it hands the kernel has this many rows
    (what a TPU kernel's scalar memory must hold)."""
    return -(-num_tokens // prefix_q_tile(num_tokens, 1))


def shared_prefix_attention(q, k_cache, v_cache, prefix_block_tables, prefix_lens, prefix_ids,
                            block_tables, kv_lens, cu_q_lens, *, scale: float,
                            logits_soft_cap: float | None = None, attention_fn=None,
                            k_scale=None, v_scale=None, kv_layout: str = "NHD"):
    """Cascade attention (see :func:`_cascade_attention`); on a CPU, the XLA path runs it only
    when some prefix group is big enough to gain from it (CPU_CASCADE_MIN_SCORES), else paged
    attention over each sequence's prefix then own blocks, chosen per call by ``lax.cond``.
    Returns (out in q's dtype, lse f32). float8_e4m3fn caches: every part reads their bytes
    (scales None or float32 scalars, may be traced; with ``attention_fn`` that function reads
    them, and k_scale / v_scale must be None here). ``kv_layout``: the caches' (this module's
    parts read HND in place; an ``attention_fn`` is given its layout already)."""
    if attention_fn is not None and (k_scale is not None or v_scale is not None):
        raise ValueError("shared_prefix_attention: k_scale / v_scale go to attention_fn, "
                         "not here")
    kw = dict(scale=scale, logits_soft_cap=logits_soft_cap, attention_fn=attention_fn,
              k_scale=k_scale, v_scale=v_scale, kv_layout=kv_layout)
    block_size = cache_dims(k_cache, kv_layout)[1]

    def cascade():
        out, lse = _cascade_attention(q, k_cache, v_cache, prefix_block_tables, prefix_lens,
                                      prefix_ids, block_tables, kv_lens, cu_q_lens, **kw)
        return out.astype(q.dtype), lse.astype(jnp.float32)

    if (attention_fn is not None or q.shape[0] == 0 or prefix_block_tables.shape[0] == 0
            or prefix_block_tables.shape[1] == 0):
        return cascade()

    def flat():
        tables, kv = prefix_then_own_tables(prefix_block_tables, prefix_lens, prefix_ids,
                                            block_tables, kv_lens, block_size)
        out, lse = _cascade_attention(q, k_cache, v_cache, prefix_block_tables[:0],
                                      prefix_lens[:0], jnp.full_like(prefix_ids, -1), tables,
                                      kv, cu_q_lens, **kw)
        return out.astype(q.dtype), lse.astype(jnp.float32)

    cu = (jnp.arange(block_tables.shape[0] + 1, dtype=jnp.int32) if cu_q_lens is None
          else cu_q_lens.astype(jnp.int32))

    def on_cpu():
        return lax.cond(_cascade_pays(q, k_cache, prefix_lens, prefix_ids, cu, kv_layout),
                        cascade, flat)

    return lax.platform_dependent(cpu=on_cpu, default=cascade)


def _cascade_attention(q, k_cache, v_cache, prefix_block_tables, prefix_lens, prefix_ids,
                       block_tables, kv_lens, cu_q_lens, *, scale: float,
                       logits_soft_cap: float | None = None, attention_fn=None, k_scale=None,
                       v_scale=None, kv_layout: str = "NHD"):
    """Cascade attention: each prefix's KV is read once for all the tokens that share it.

    The tokens are sorted by prefix id so the tokens of one prefix form one ragged "sequence"
    of a non-causal paged attention over the prefix blocks (big dots: all tokens x prefix KV),
    then the per-sequence causal attention over the own blocks is merged in by LSE.
    ``attention_fn``: the ragged paged attention to use for both parts (default: this
    module's; the Pallas backends pass their kernel). k_scale, v_scale: of float8 caches
    (this module's parts only).
    """
    attn = ragged_paged_attention if attention_fn is None else attention_fn
    # this module's parts: the scales and the layout (an attention_fn has its own)
    scales = (dict(k_scale=k_scale, v_scale=v_scale, kv_layout=kv_layout)
              if attention_fn is None else {})
    # this module's own part in float32, merged before q's dtype (rounded to a 16-bit q's
    # first, large own and prefix parts that cancel passed the tolerance: 2x)
    own_kw = dict(scales, out_dtype=jnp.float32) if attention_fn is None else scales
    _, block_size, num_kv_heads, _ = cache_dims(k_cache, kv_layout)
    num_tokens = q.shape[0]
    num_seqs = block_tables.shape[0]
    num_prefixes = prefix_block_tables.shape[0]
    decode = cu_q_lens is None
    cu = jnp.arange(num_seqs + 1, dtype=jnp.int32) if decode else cu_q_lens.astype(jnp.int32)
    if (attention_fn is None and decode
            and block_tables.shape[1] * block_size <= SHORT_DECODE_MAX_TOKENS):
        def own_xla():
            return short_decode_attention(q, k_cache, v_cache, block_tables, kv_lens,
                                          scale=scale, logits_soft_cap=logits_soft_cap,
                                          **own_kw)
    else:
        def own_xla():
            return attn(q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens, scale=scale,
                        causal=True, logits_soft_cap=logits_soft_cap, **own_kw)
    if decode and attention_fn is None:  # each decode query sees every own key
        own_out, own_lse = decode_on_cpu_kernel(own_xla, q, k_cache, v_cache, block_tables,
                                                kv_lens, scale=scale,
                                                logits_soft_cap=logits_soft_cap, **own_kw)
    else:
        own_out, own_lse = own_xla()
    if num_tokens == 0 or num_prefixes == 0:
        return own_out, own_lse
    # prefix id of every query token (num_prefixes for "none")
    tok = jnp.arange(num_tokens, dtype=jnp.int32)
    # a kernel's cascade (GPU/TPU) finds each token's sequence by one fused compare
    search = "scan" if attention_fn is None else fused_search(num_tokens, num_seqs)
    tok_seq = tok if decode else jnp.searchsorted(cu[1:], tok, side="right", method=search)
    pid = prefix_ids.astype(jnp.int32)
    pid = jnp.where(pid < 0, num_prefixes, pid)
    tok_pid = jnp.where(tok_seq < num_seqs, pid[jnp.minimum(tok_seq, num_seqs - 1)],
                        num_prefixes)
    group = q.shape[1] // num_kv_heads
    if (attention_fn is None and num_prefixes == 1 and prefix_block_tables.shape[1] > 0
            and _single_prefix_chunk_blocks(num_tokens * group, prefix_block_tables.shape[1],
                                            block_size)):
        # one prefix (chosen statically): every token against it, no sort
        pre_out, pre_lse = single_prefix_attention(
            q, k_cache, v_cache, prefix_block_tables[0], prefix_lens[0], tok_pid == 0,
            scale=scale, logits_soft_cap=logits_soft_cap, **scales)
        return merge_attention_states(own_out, own_lse, pre_out, pre_lse)
    if (attention_fn is None and prefix_block_tables.shape[1] > 0
            and _multi_prefix_q_tile(num_tokens, num_prefixes, group,
                                     prefix_block_tables.shape[1], block_size)):
        # several prefixes (chosen statically): per prefix, windows of its sorted tokens
        pre_out, pre_lse = multi_prefix_attention(
            q, k_cache, v_cache, prefix_block_tables, prefix_lens, tok_pid, scale=scale,
            logits_soft_cap=logits_soft_cap, **scales)
        return merge_attention_states(own_out, own_lse, pre_out, pre_lse)
    qs_tile = prefix_q_tile(num_tokens, num_prefixes)
    if attention_fn is not None and num_prefixes == 1:
        # one prefix (chosen statically), a kernel's attention: the tokens in token order (no
        # sort, gather or scatter around the kernel), as non-causal "sequences" of qs_tile
        # consecutive tokens over the prefix; a chunk with no token of the prefix sees no key
        # (kv_len 0), so a prefill chunk of other requests beside a few decode tokens reads
        # nothing; the results of tokens of no prefix are dropped
        mine = tok_pid == 0
        chunks = one_prefix_chunks(num_tokens)
        any_mine = jnp.pad(mine, (0, chunks * qs_tile - num_tokens)).reshape(chunks, qs_tile)
        chunk_kv = jnp.where(any_mine.any(axis=1), prefix_lens[0], 0).astype(jnp.int32)
        chunk_cu = jnp.minimum(jnp.arange(chunks + 1, dtype=jnp.int32) * qs_tile, num_tokens)
        chunk_tables = jnp.broadcast_to(prefix_block_tables[:1],
                                        (chunks, prefix_block_tables.shape[1]))
        pre_out, pre_lse = attn(
            q, k_cache, v_cache, chunk_tables, chunk_kv, chunk_cu, scale=scale, causal=False,
            logits_soft_cap=logits_soft_cap, q_tile=qs_tile, **scales)
        pre_out = jnp.where(mine[:, None, None], pre_out, jnp.zeros((), pre_out.dtype))
        pre_lse = jnp.where(mine[:, None], pre_lse, -jnp.inf)
        return merge_attention_states(pre_out, pre_lse, own_out, own_lse)
    # tokens sorted by prefix id
    order = jnp.argsort(tok_pid, stable=True).astype(jnp.int32)
    counts = jnp.zeros((num_prefixes + 1,), jnp.int32).at[tok_pid].add(1)
    pre_cu = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts[:num_prefixes])])
    pre_cu = pre_cu.astype(jnp.int32)
    q_sorted = jnp.take(q, order, axis=0)
    # Non-causal attention of the prefix-sorted tokens over their prefix; the tokens of no
    # prefix sit past pre_cu[-1], in no tile, and get out 0, lse -inf.
    pre_out, pre_lse = attn(
        q_sorted, k_cache, v_cache, prefix_block_tables, prefix_lens.astype(jnp.int32), pre_cu,
        scale=scale, causal=False, logits_soft_cap=logits_soft_cap, q_tile=qs_tile, **scales)
    inv = jnp.zeros((num_tokens,), jnp.int32).at[order].set(
        jnp.arange(num_tokens, dtype=jnp.int32))
    pre_out = jnp.take(pre_out, inv, axis=0)
    pre_lse = jnp.take(pre_lse, inv, axis=0)
    return merge_attention_states(pre_out, pre_lse, own_out, own_lse)


# ------------------------------------------------------------------------------- cache ops


def write_kv(key, value, k_cache, v_cache, slot_mapping, kv_layout: str = "NHD"):
    """Scatter rows into the caches at slot_mapping (negative slots dropped). Donation-friendly:
    one scatter per cache into the caller's (donated) buffer. ``kv_layout`` "HND": caches
    [num_blocks, heads, block_size, head_dim]."""
    hnd = kv_layout == "HND"
    n = slot_mapping.shape[0]
    num_blocks, block_size = cache_dims(k_cache, kv_layout)[:2]
    num_slots = num_blocks * block_size
    slots = slot_mapping.astype(jnp.int32)
    slots = jnp.where(slots < 0, num_slots, slots)  # out of range: dropped
    blk, off = slots // block_size, slots % block_size

    def put(cache, rows, bits):
        # HND: [blk, :, off] takes [n, heads, head_dim] rows (the indexed dims first)
        index = (blk, slice(None), off) if hnd else (blk, off)
        return _bits_set(cache, rows[:n], index, bits)

    def xla_path(bits=False):
        return put(k_cache, key, bits), put(v_cache, value, bits)

    # XLA:CPU scatters bf16 through a whole-cache f32 round trip (an HND cache's too; as
    # uint16 bits, or through a reshape around the NHD handler, still a whole-cache copy): on
    # CPU, in-place byte copies by an FFI custom call instead (when it builds; see
    # kernels/cpu/xla_ffi.py), a row per token (NHD) or per token and head (HND).
    from ..kernels.cpu import xla_ffi

    def cpu_path():
        return (xla_ffi.write_kv(key, slot_mapping, k_cache, kv_layout=kv_layout),
                xla_ffi.write_kv(value, slot_mapping, v_cache, kv_layout=kv_layout))

    if not xla_ffi.use_for(key, value, k_cache, v_cache):
        cpu_path = functools.partial(xla_path, True)

    return lax.platform_dependent(cpu=cpu_path, default=xla_path)


def _outside_dropped(ids, num_blocks: int):
    """Destination block ids with every id outside [0, num_blocks) moved past the end, where
    mode="drop" skips it: jnp's .at[] wraps a negative id onto the cache's last blocks. Each
    to its own place there, so the scatter's unique_indices promise holds for them too."""
    past = num_blocks + jnp.arange(ids.shape[0], dtype=ids.dtype)
    return jnp.where((ids >= 0) & (ids < num_blocks), ids, past)


def copy_blocks(caches, src, dst):
    """cache[dst[i]] = cache[src[i]] for every cache; reads happen before writes."""
    def xla_path(bits=False):
        out = []
        for c in caches:
            b = _as_bits(c) if bits else c  # taken and set as its bits (see _bits_set)
            moved = b.at[_outside_dropped(dst, c.shape[0])].set(
                jnp.take(b, src, axis=0, mode="clip"), mode="drop", unique_indices=True)
            out.append(moved if b is c else lax.bitcast_convert_type(moved, c.dtype))
        return out

    from ..kernels.cpu import xla_ffi  # in-place on CPU, see write_kv

    def cpu_path():
        return [xla_ffi.copy_blocks(c, src, dst) for c in caches]

    if not xla_ffi.use_for(*caches):
        cpu_path = functools.partial(xla_path, True)

    return lax.platform_dependent(cpu=cpu_path, default=xla_path)


def gather_blocks(caches, block_ids):
    """buffer[i, c] = caches[c][block_ids[i]] (ids clamped into [0, num_blocks))."""
    def xla_path():
        return jnp.stack([jnp.take(c, block_ids, axis=0, mode="clip") for c in caches], axis=1)

    def xla_bits_path():
        # XLA:CPU gathers bfloat16 through float32, which quiets NaN payloads: move 16-bit
        # floats as uint16 so the fallback is a bit-exact copy too (same speed).
        out = jnp.stack([jnp.take(_as_bits(c), block_ids, axis=0, mode="clip")
                         for c in caches], axis=1)
        return lax.bitcast_convert_type(out, caches[0].dtype)

    # XLA:CPU's take + stack of 256 x 4 bf16 blocks (bench_cache_ops) takes ~27 ms, as uint16
    # too: ~20 ms of it is faulting the new 32 MiB output in 4 KiB pages, and the move itself
    # is ~5.5 ms. On CPU, one memcpy per block by an FFI custom call that asks for huge pages
    # first: ~7 ms on a fresh output, ~3.4 ms on one already mapped (kernels/cpu/xla_ffi.py).
    from ..kernels.cpu import xla_ffi

    cpu_path = xla_bits_path
    if xla_ffi.use_for(*caches):
        def cpu_path():
            return xla_ffi.gather_blocks(caches, block_ids)

    return lax.platform_dependent(cpu=cpu_path, default=xla_path)


def scatter_blocks(caches, buffer, block_ids):
    """caches[c][block_ids[i]] = buffer[i, c]."""
    def xla_path(bits=False):
        return [_bits_set(c, buffer[:, i], _outside_dropped(block_ids, c.shape[0]), bits)
                for i, c in enumerate(caches)]

    from ..kernels.cpu import xla_ffi  # in-place on CPU, see write_kv

    def cpu_path():
        return [xla_ffi.scatter_blocks(c, buffer, block_ids, i) for i, c in enumerate(caches)]

    if not xla_ffi.use_for(buffer, *caches):
        cpu_path = functools.partial(xla_path, True)

    return lax.platform_dependent(cpu=cpu_path, default=xla_path)


def dense_gather_paged_attention(q, k_cache, v_cache, block_tables, kv_lens, *, scale):
    """The obvious jnp decode baseline (benchmarks only): gather every sequence's blocks by
    block table with jnp.take, then dense attention. q [num_seqs, Hq, D]."""
    num_seqs, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    k = jnp.take(k_cache, block_tables, axis=0)  # [S, MB, B, Hkv, D]
    v = jnp.take(v_cache, block_tables, axis=0)
    k = k.reshape(num_seqs, -1, num_kv_heads, head_dim)
    v = v.reshape(num_seqs, -1, num_kv_heads, head_dim)
    qg = q.reshape(num_seqs, num_kv_heads, group, head_dim).astype(jnp.float32) * scale
    s = jnp.einsum("shgd,sthd->shgt", qg, k.astype(jnp.float32))
    t = jnp.arange(k.shape[1])
    s = jnp.where(t[None, None, None, :] < kv_lens[:, None, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("shgt,sthd->shgd", p, v.astype(jnp.float32))
    return out.reshape(num_seqs, num_q_heads, head_dim).astype(q.dtype)


__all__ = ["ragged_paged_attention", "merge_attention_states", "shared_prefix_attention",
           "write_kv", "copy_blocks", "gather_blocks", "scatter_blocks", "choose_tiling",
           "dense_gather_paged_attention"]

