"""Triton kernels of the attention ops: ragged paged attention (decode, prefill and mixed
batches in one kernel; GQA/MQA, causal, sliding window, soft cap, lse), its split-KV path for
long contexts with few sequences (partials merged by log-sum-exp), the two-state merge, and
shared-prefix ("cascade") attention built from them.

Layout: q [num_tokens, num_q_heads, head_dim]; k/v cache [num_blocks, block_size, num_kv_heads,
head_dim] with any strides (views of a stacked cache work); int32 block tables (any row
stride, unit column stride), kv_lens, cu_q_lens (contiguous: the torch frontend copies other
views of index tensors). Program (seq, q tile, kv head[, split]) holds BLOCK_M rows = query
tokens x the q heads of one kv head, so each K/V tile is loaded once for the whole group; keys
come in tiles of BLOCK_N tokens, each token's block looked up in the table (any block_size).

Under ``TRITON_INTERPRET=1`` bf16/f16 tiles are upcast to float32 (UPCAST constexpr): the
interpreter computes low-precision dots wrongly.

float8_e4m3fn caches (FP8 constexpr) are read as bytes (a uint8 view) and decoded exactly
with no float8 conversion (_fp8_e4m3_to_f32: integer ops into float16 bits; the interpreter's
own float8 conversion gets NaN and some values wrong), then taken in q's dtype (every e4m3
value is exact in float16 and bfloat16); k_scale is folded into the logits' scale, v_scale
applied to the output, both read from float32 scalars in device memory (K_SCALED / V_SCALED;
without one it is 1.0), so a captured CUDA graph reads the scale of each replay.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from ...paged.planner import (
    DEFAULT_SMS,
    head_slices,
    max_prefix_split_rows,
    num_kv_splits,
    prefix_kv_splits,
)
from ...paged.spec import WORKSPACE_ALIGN
from ._interp import patch_interpreter

patch_interpreter()

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def sm_count(device_index: int | None) -> int:
    """Multiprocessors of a CUDA device (a host-side property query: no sync, graph-safe);
    an H100's where none can be asked (the interpreter)."""
    if device_index is None or not torch.cuda.is_available():
        return DEFAULT_SMS
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@triton.jit
def _tanh(x):
    # 1 - 2 / (exp(2x) + 1) is overflow-safe (exp(2x) -> inf gives 1, -> 0 gives -1) but
    # cancels near 0, a relative error ~2^-24 / |x| (a soft cap of 1e4 put logits 1e-3 off):
    # below |x| = 1/4 the odd Taylor polynomial to x^9 (its truncation < 1e-8 relative there)
    x2 = x * x
    near0 = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0
                                                                    + x2 * (62.0 / 2835.0)))))
    return tl.where(tl.abs(x) < 0.25, near0, 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))


@triton.jit
def _fp8_e4m3_to_f32(b):
    """float8_e4m3fn bytes (uint8 or int8) -> float32, exactly: sign | 4 exponent bits (bias
    7) | 3 mantissa bits, subnormals m * 2^-9, 0x7f/0xff NaN (no inf). Integer ops move the
    byte into float16 bits (sign << 8, the other 7 bits << 7: exponent bias 15, so the float16
    is the value * 2^-8, e4m3 subnormals landing on float16 subnormals with the same
    mantissa), then an exact float16 -> float32 conversion (no flush: .ftz applies to float32
    operands only) and * 256; NaN bytes selected. No float8 conversion is used (the
    interpreter's is wrong for NaN and some values; sm_80 has none). As the CPU decode kernel
    does; bit patterns built directly as float32 took 186-202 registers against 128 here
    (decode, bf16, head_dim 128)."""
    x = b.to(tl.int32) & 0xFF
    h = (((x & 0x80) << 8) | ((x & 0x7F) << 7)).to(tl.int16).to(tl.float16, bitcast=True)
    f = h.to(tl.float32) * 256.0
    return tl.where((x & 0x7F) == 0x7F, float("nan"), f)


@triton.jit
def _attend_seen_keys(acc, m_i, l_i, q, t, d, d_ok, k_ptr, v_ptr, table_row, k_head, v_head,
                      stride_kb, stride_kt, stride_kd, stride_vb, stride_vt, stride_vd,
                      max_blocks, num_blocks, qk_scale, soft_cap, HEAD_DIM: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, SOFT_CAP: tl.constexpr,
                      UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, FP8: tl.constexpr):
    """One step of keys t (BLOCK_N positions) that every query row of the tile sees, of the
    FULL_TILES loop: the online softmax's (acc, m_i, l_i) updated with no key, causal or row
    mask (the tile's padding rows, tokens past q_len and heads past the group's slice, hold
    q = 0 and are never stored); only head_dim's padded lanes are masked. Table columns and
    block ids clamped into their buffers, as the masked loop does."""
    col = tl.minimum(t // BLOCK_SIZE, max_blocks - 1)  # within the table
    blk = tl.minimum(tl.maximum(tl.load(table_row + col), 0), num_blocks - 1)
    off = t % BLOCK_SIZE
    k_ptrs = (k_ptr + blk.to(tl.int64)[:, None] * stride_kb + off[:, None] * stride_kt
              + k_head + d[None, :] * stride_kd)
    v_ptrs = (v_ptr + blk.to(tl.int64)[:, None] * stride_vb + off[:, None] * stride_vt
              + v_head + d[None, :] * stride_vd)
    if BLOCK_D != HEAD_DIM:  # padded lanes load 0 (fp8: never a NaN byte)
        k = tl.load(k_ptrs, mask=d_ok[None, :], other=0)
        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if FP8:
        k = _fp8_e4m3_to_f32(k)
        v = _fp8_e4m3_to_f32(v)
        if not UPCAST:  # exact in float16 / bfloat16
            k = k.to(q.dtype)
            v = v.to(q.dtype)
    elif UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if SOFT_CAP:
        s = soft_cap * _tanh(s / soft_cap)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a sink of -inf, nothing seen yet
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _paged_attention_kernel(
        q_ptr, k_ptr, v_ptr, tables_ptr, kv_lens_ptr, cu_ptr, out_ptr, lse_ptr,
        k_scale_ptr, v_scale_ptr, sinks_ptr,
        stride_qt, stride_qh, stride_qd,
        stride_kb, stride_kt, stride_kh, stride_kd,
        stride_vb, stride_vt, stride_vh, stride_vd,
        stride_tab, stride_ot, stride_oh, stride_od, stride_lt, stride_lh,
        stride_split_o, stride_split_l, num_seqs, num_tokens, max_blocks, num_blocks,
        scale, soft_cap, window,
        GROUP: tl.constexpr, GROUP_P2: tl.constexpr, KV_GROUP: tl.constexpr,
        HEAD_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, DECODE: tl.constexpr, CAUSAL: tl.constexpr,
        WINDOW: tl.constexpr, SOFT_CAP: tl.constexpr, NUM_SPLITS: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, FP8: tl.constexpr,
        K_SCALED: tl.constexpr, V_SCALED: tl.constexpr, SINKS: tl.constexpr,
        FULL_TILES: tl.constexpr):
    # Grid axis 0 (limit 2**31 - 1; axes 1 and 2 stop at 65535) holds (query tile, split).
    # Decode: one tile per sequence. Otherwise the query tiles of all sequences in a row,
    # sequence s's starting at cu[s] // BLOCK_Q + s (the gaps cover each one's tiles), at most
    # cdiv(num_tokens, BLOCK_Q) + num_seqs programs: sized by the batch, not by num_seqs x the
    # longest sequence. A program finds its sequence by binary search over those starts.
    # Grid axis 1: HEAD_SPLITS slices of GROUP q heads per kv head, which has KV_GROUP (the
    # last slice may be short).
    pid = tl.program_id(0)
    slice_h = tl.program_id(1)
    kvh = slice_h // HEAD_SPLITS
    head0 = (slice_h % HEAD_SPLITS) * GROUP  # the slice's first q head in its kv head's group
    split = pid * 0
    if NUM_SPLITS > 1:
        split = pid % NUM_SPLITS
        pid = pid // NUM_SPLITS
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP_P2
    if DECODE:
        seq = pid
        tile = pid * 0
        q_start = seq
        q_len = 1
    else:
        lo_s = pid * 0
        hi_s = lo_s + num_seqs
        while lo_s + 1 < hi_s:  # the last sequence whose first tile is <= pid
            mid = (lo_s + hi_s) // 2
            first = tl.load(cu_ptr + mid) // BLOCK_Q + mid
            lo_s = tl.where(first <= pid, mid, lo_s)
            hi_s = tl.where(first <= pid, hi_s, mid)
        seq = lo_s
        # Bounds whatever the metadata holds (on a device the frontends check values only on
        # request: a check is a host sync): a tile's tokens inside q here, and in the loop
        # table columns inside the table and block ids inside the cache. No access leaves
        # a buffer; the results of such metadata are unspecified (kv_len counts at most the
        # table's keys, below). In int64, then narrowed once bounded: offsets near the int32
        # limits must not wrap (a start of -2**31 made tile * BLOCK_Q wrap negative and the
        # rows land past out).
        q_start = tl.load(cu_ptr + seq).to(tl.int64)
        q_len = tl.load(cu_ptr + seq + 1).to(tl.int64) - q_start
        tile = pid - (q_start // BLOCK_Q + seq)
        q_len = tl.where(q_start >= 0, tl.minimum(q_len, num_tokens - q_start), 0)
        q_len = tl.maximum(q_len, 0).to(tl.int32)
        # -1: none; past the tokens' tiles: none either (tile * BLOCK_Q stays in int32)
        tile = tl.minimum(tl.maximum(tile, -1), num_tokens // BLOCK_Q + 1).to(tl.int32)
    # at most the table's keys, as the frontends clip unchecked host lengths (a garbage
    # kv_len near 2**31 looped over ~2**31 keys); valid lengths pass unchanged. tl.cast, not
    # .to: the JIT passes an int argument equal to 1 as the constant 1 (a table one block
    # wide), and a Python int has no .to (every such launch failed to compile on a GPU)
    kv_len = tl.minimum(tl.load(kv_lens_ptr + seq).to(tl.int64),
                        tl.cast(max_blocks, tl.int64) * BLOCK_SIZE).to(tl.int32)
    if (tile >= 0) & (tile * BLOCK_Q < q_len):
        rows = tl.arange(0, BLOCK_M)
        j = tile * BLOCK_Q + rows // GROUP_P2
        g = rows % GROUP_P2
        row_ok = (j < q_len) & (g < GROUP)
        if HEAD_SPLITS * GROUP != KV_GROUP:  # the last slice is short
            row_ok = row_ok & (head0 + g < KV_GROUP)
        # int64 offsets: a head-outermost view ([heads, ...] storage) of q, out or the cache
        # puts a head's rows past 2**31 elements, as big batches do to tok * stride_qt
        head = (kvh * KV_GROUP + head0 + g).to(tl.int64)
        tok = (q_start + j).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh
                    + d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        qk_scale = scale
        if FP8 and K_SCALED:  # logits q.(k8 * k_scale) = (q.k8) * k_scale
            qk_scale = scale * tl.load(k_scale_ptr)
        q_pos = kv_len - q_len + j
        # key range of this tile: [lo, hi)
        hi = kv_len
        if CAUSAL:
            hi = tl.minimum(kv_len, kv_len - q_len + tl.minimum(q_len, (tile + 1) * BLOCK_Q))
        lo = hi * 0
        if WINDOW:  # keys before the window of the tile's first query: never read (they
            # may hold anything, NaN included: a block left the window, a null block)
            w_lo = tl.maximum(kv_len - q_len + tile * BLOCK_Q - window + 1, 0)
            lo = (w_lo // BLOCK_N) * BLOCK_N
        if NUM_SPLITS > 1:
            span = tl.cdiv(tl.cdiv(hi - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
            lo = lo + split * span
            hi = tl.minimum(hi, lo + span)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        if SINKS:  # the row's head's sink as a key of logit sink and value 0, seen first (by
            # split 0 alone: the merge counts it once); a row that sees no key then gets out 0
            # and lse = sink, and a sink of -inf is none
            sink = tl.load(sinks_ptr + head, mask=row_ok, other=float("-inf")).to(tl.float32)
            m_i = tl.where(split == 0, sink, m_i)
            l_i = tl.where(split == 0, 1.0, l_i)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        n = tl.arange(0, BLOCK_N)
        k_head = kvh.to(tl.int64) * stride_kh
        v_head = kvh.to(tl.int64) * stride_vh
        table_row = tables_ptr + seq.to(tl.int64) * stride_tab
        full_hi = lo
        if FULL_TILES:  # first the whole steps of keys every query row sees, unmasked (with
            # a window, none: its lower edge moves with the row)
            if not WINDOW:
                seen_hi = hi
                if CAUSAL:  # the tile's first query row sees the fewest keys
                    seen_hi = tl.minimum(hi, kv_len - q_len + tile * BLOCK_Q + 1)
                full_hi = lo + tl.maximum(seen_hi - lo, 0) // BLOCK_N * BLOCK_N
            for start in range(lo, full_hi, BLOCK_N):
                acc, m_i, l_i = _attend_seen_keys(
                    acc, m_i, l_i, q, start + n, d, d_ok, k_ptr, v_ptr, table_row, k_head,
                    v_head, stride_kb, stride_kt, stride_kd, stride_vb, stride_vt, stride_vd,
                    max_blocks, num_blocks, qk_scale, soft_cap, HEAD_DIM, BLOCK_D, BLOCK_SIZE,
                    SOFT_CAP, UPCAST, DOT_PREC, FP8)
        # the rest, masked; inline, not a helper as above: with FULL_TILES off this is the
        # kernel measured on the H200, PTX for PTX (a helper's inlined scope adds labels, and
        # ptxas then allocated 128 -> 152 registers for the bf16 decode on sm_90)
        for start in range(full_hi, hi, BLOCK_N):
            t = start + n
            t_ok = t < hi
            if WINDOW:
                t_ok = t_ok & (t >= w_lo)
            col = tl.minimum(t // BLOCK_SIZE, max_blocks - 1)  # within the table
            blk = tl.load(table_row + col, mask=t_ok, other=0)
            blk = tl.minimum(tl.maximum(blk, 0), num_blocks - 1)
            off = t % BLOCK_SIZE
            kv_mask = t_ok[:, None] & d_ok[None, :]
            if FP8:  # bytes never read (masked) decode as 0, never as a NaN byte
                k = _fp8_e4m3_to_f32(tl.load(
                    k_ptr + blk.to(tl.int64)[:, None] * stride_kb + off[:, None] * stride_kt
                    + k_head + d[None, :] * stride_kd, mask=kv_mask, other=0))
                v = _fp8_e4m3_to_f32(tl.load(
                    v_ptr + blk.to(tl.int64)[:, None] * stride_vb + off[:, None] * stride_vt
                    + v_head + d[None, :] * stride_vd, mask=kv_mask, other=0))
                if not UPCAST:  # exact in float16 / bfloat16
                    k = k.to(q_ptr.dtype.element_ty)
                    v = v.to(q_ptr.dtype.element_ty)
            else:
                k = tl.load(k_ptr + blk.to(tl.int64)[:, None] * stride_kb
                            + off[:, None] * stride_kt + k_head + d[None, :] * stride_kd,
                            mask=kv_mask, other=0.0)
                v = tl.load(v_ptr + blk.to(tl.int64)[:, None] * stride_vb
                            + off[:, None] * stride_vt + v_head + d[None, :] * stride_vd,
                            mask=kv_mask, other=0.0)
                if UPCAST:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            if SOFT_CAP:
                s = soft_cap * _tanh(s / soft_cap)
            vis = t_ok[None, :] & row_ok[:, None]
            if CAUSAL:
                vis = vis & (t[None, :] <= q_pos[:, None])
            if WINDOW:
                vis = vis & (t[None, :] > q_pos[:, None] - window)
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new
        seen = (l_i > 0) | (l_i != l_i)  # a NaN sum (a NaN in the KV read): out, lse NaN
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        if FP8 and V_SCALED:
            out = out * tl.load(v_scale_ptr)
        lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
        o_ptrs = (out_ptr + split.to(tl.int64) * stride_split_o + tok[:, None] * stride_ot
                  + head[:, None] * stride_oh + d[None, :] * stride_od)
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(lse_ptr + split.to(tl.int64) * stride_split_l + tok * stride_lt
                 + head * stride_lh, lse,
                 mask=row_ok)


@triton.jit
def _store_merged(out_ptrs, lse_ptr, acc, den, m_safe, d_ok):
    """The merge kernels' epilogue: out = acc / den (0 where no state saw a key), lse =
    m_safe + log(den) (-inf there); a NaN den (a NaN state) stays NaN."""
    seen = (den > 0) | (den != den)
    res = tl.where(seen, acc / tl.where(seen, den, 1.0), 0.0)
    tl.store(out_ptrs, res.to(out_ptrs.dtype.element_ty), mask=d_ok)
    tl.store(lse_ptr, tl.where(seen, m_safe + tl.log(tl.where(seen, den, 1.0)), float("-inf")))


@triton.jit
def _merge_states_kernel(out_ptr, lse_ptr, o_ptr, l_ptr, num_heads, stride_ot, stride_oh,
                         stride_od, stride_lt, stride_lh, stride_so, stride_st, stride_sh,
                         stride_sd, stride_sl, stride_slt, stride_slh,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         NUM_STATES: tl.constexpr, STATES_P2: tl.constexpr):
    """Log-sum-exp merge of NUM_STATES partial states o[state, t, h, :], l[state, t, h]."""
    row = tl.program_id(0)
    t = (row // num_heads).to(tl.int64)
    h = (row % num_heads).to(tl.int64)
    sidx = tl.arange(0, STATES_P2).to(tl.int64)  # sidx * stride_so: states x tokens x heads
    s_ok = sidx < NUM_STATES
    lse = tl.load(l_ptr + sidx * stride_sl + t * stride_slt + h * stride_slh, mask=s_ok,
                  other=float("-inf"))
    lse = tl.where(lse == float("inf"), float("-inf"), lse)  # FlashAttention-2's empty rows
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe)
    den = tl.sum(w, 0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    # a state that saw nothing (lse -inf) weighs 0 and its out is not read: the cascade's
    # prefix partials leave the rows of tokens with no prefix unwritten but for lse
    live = s_ok & ((lse > float("-inf")) | (lse != lse))  # a NaN state is kept: NaN
    o = tl.load(o_ptr + sidx[:, None] * stride_so + t * stride_st + h * stride_sh
                + d[None, :] * stride_sd, mask=live[:, None] & d_ok[None, :], other=0.0)
    o = o.to(tl.float32)
    w = tl.where(live, w, 0.0)
    acc = tl.sum(o * w[:, None], 0)
    _store_merged(out_ptr + t * stride_ot + h * stride_oh + d * stride_od,
                  lse_ptr + t * stride_lt + h * stride_lh, acc, den, m_safe, d_ok)


@triton.jit
def _merge_two_kernel(out_ptr, lse_ptr, oa_ptr, la_ptr, ob_ptr, lb_ptr, num_heads, stride_ot,
                      stride_oh, stride_od, stride_lt, stride_lh, stride_at, stride_ah,
                      stride_ad, stride_lat, stride_lah, stride_bt, stride_bh, stride_bd,
                      stride_lbt, stride_lbh, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """_merge_states_kernel for two states given as two tensors (the public
    merge_attention_states): each input read once where it is, nothing stacked. The same
    arithmetic: +inf lse (FlashAttention-2's empty rows) is empty, an empty state weighs 0
    and its out is not used, a NaN state gives NaN."""
    row = tl.program_id(0)
    t = (row // num_heads).to(tl.int64)
    h = (row % num_heads).to(tl.int64)
    la = tl.load(la_ptr + t * stride_lat + h * stride_lah)
    lb = tl.load(lb_ptr + t * stride_lbt + h * stride_lbh)
    la = tl.where(la == float("inf"), float("-inf"), la)
    lb = tl.where(lb == float("inf"), float("-inf"), lb)
    # the larger lse; a NaN on either side makes every weight NaN below (as tl.max over the
    # stacked states would)
    m = tl.where(la > lb, la, lb)
    m = tl.where((la != la) | (lb != lb), la + lb, m)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    wa = tl.exp(la - m_safe)
    wb = tl.exp(lb - m_safe)
    den = wa + wb
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    live_a = (la > float("-inf")) | (la != la)
    live_b = (lb > float("-inf")) | (lb != lb)
    # an empty state's row is read (it is inside its tensor) but never used: where, not a
    # product with weight 0 (0 * NaN is NaN)
    oa = tl.load(oa_ptr + t * stride_at + h * stride_ah + d * stride_ad, mask=d_ok,
                 other=0.0).to(tl.float32)
    ob = tl.load(ob_ptr + t * stride_bt + h * stride_bh + d * stride_bd, mask=d_ok,
                 other=0.0).to(tl.float32)
    acc = tl.where(live_a, oa * wa, 0.0) + tl.where(live_b, ob * wb, 0.0)
    _store_merged(out_ptr + t * stride_ot + h * stride_oh + d * stride_od,
                  lse_ptr + t * stride_lt + h * stride_lh, acc, den, m_safe, d_ok)


@triton.jit
def _prefix_key(pid, num_prefixes):
    """A sequence's sort key: its prefix row, or num_prefixes (last) for -1 or any id that
    names no row (never a position outside the order)."""
    return tl.where((pid >= 0) & (pid < num_prefixes), pid, num_prefixes).to(tl.int32)


@triton.jit
def _cascade_order_kernel(pid_ptr, cu_ptr, order_ptr, cu_p_ptr, num_seqs, num_prefixes,
                          num_tokens, DECODE: tl.constexpr, BLOCK_S: tl.constexpr,
                          BLOCK_T: tl.constexpr):
    """The cascade's grouping of query tokens by prefix, stably, with no sort and no
    allocation (torch.sort on a CUDA tensor allocates scratch, even with out=).

    Programs [0, num_seqs): sequence i's tokens go to positions dest + [0, n) of the order,
    dest the tokens of the sequences before it (lower key, or equal key and lower index):
    order[dest + j] = its token cu[i] + j. Programs num_seqs + p, p in [0, num_prefixes]:
    cu_p[p] = tokens of the sequences with key below p. Decode (DECODE): one token per
    sequence, cu unused. Whatever cu holds (unchecked on a device), stores stay inside
    order[0, num_tokens) and cu_p within [0, num_tokens], non-decreasing."""
    i = tl.program_id(0)
    mine = i < num_seqs
    key = _prefix_key(tl.load(pid_ptr + i, mask=mine, other=0), num_prefixes)
    # program num_seqs + p counts the tokens of keys below p: as a sequence of key p, index 0
    key = tl.where(mine, key, i - num_seqs)
    me = tl.where(mine, i, 0)
    dest = tl.zeros([], dtype=tl.int64)  # int64 (as the counts): cu's extremes never wrap
    for s0 in range(0, num_seqs, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        ok = s < num_seqs
        k = _prefix_key(tl.load(pid_ptr + s, mask=ok, other=0), num_prefixes)
        if DECODE:
            n_s = ok.to(tl.int64)
        else:
            n_s = tl.minimum(tl.maximum(tl.load(cu_ptr + s + 1, mask=ok, other=0).to(tl.int64)
                                        - tl.load(cu_ptr + s, mask=ok, other=0).to(tl.int64),
                                        0), num_tokens)
        before = ok & ((k < key) | ((k == key) & (s < me) & mine))
        dest += tl.sum(tl.where(before, n_s, 0), 0)
    if mine:
        if DECODE:
            start = i
            n = 1
        else:  # the sequence's tokens inside q, whatever cu holds (int64: no wrap)
            start = tl.minimum(tl.maximum(tl.load(cu_ptr + i).to(tl.int64), 0), num_tokens)
            end = tl.load(cu_ptr + i + 1).to(tl.int64)
            n = tl.minimum(tl.maximum(end, start), num_tokens) - start
        for t0 in range(0, n, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            pos = dest + t
            tl.store(order_ptr + pos, (start + t).to(tl.int64),
                     mask=(t < n) & (pos >= 0) & (pos < num_tokens))
    else:  # within [0, num_tokens] and non-decreasing, whatever cu holds
        tl.store(cu_p_ptr + (i - num_seqs), tl.minimum(dest, num_tokens).to(tl.int32))


# ------------------------------------------------------------------------------- launchers


def _p2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


#: Most q-head rows of one token a program holds, by element size: a kv head's group past
#: this runs as several programs (HEAD_SPLITS), each over a slice of the group's q heads.
MAX_GROUP_ROWS = {4: 32, 2: 128, 1: 128}

#: tl.dot input precision of float32 decode tiles of up to 16 rows at head_dim <= 128 on a
#: GPU: "tf32x3" (three TF32 tensor-core passes, hi x hi + hi x lo + lo x hi, ~float32
#: accuracy) or "ieee" (FMA dots). On an H200 (32 q / 8 kv heads, head_dim 128, 2026-11-28)
#: tf32x3 decoded 64 x 4096 float32 tokens at 72% of the measured read bandwidth against 30%
#: for ieee (8 x 4096, split: 64% against 28%), differing from the ieee output by at most
#: 3.2e-7 (the float32 tolerance is 2e-5). Other float32 tiles stay ieee: tf32x3 needs more
#: registers (255 at 16 rows x 64 keys x head_dim 128) and spilled 16-1472 B for prefill's 32
#: rows and 280 B at head_dim 256 on sm_80/sm_90. 16-bit tiles need neither (their products
#: are exact in the float32 accumulation); the interpreter runs ieee.
F32_DOT_PREC = "tf32x3"


def dot_precision(itemsize: int, head_dim: int, rows: int, decode: bool) -> str:
    """DOT_PREC of a compiled launch (see F32_DOT_PREC)."""
    if itemsize < 4:
        return "tf32"  # unused: 16-bit dots take their inputs as they are
    return F32_DOT_PREC if decode and rows <= 16 and head_dim <= 128 else "ieee"


#: The key loop of _paged_attention_kernel in two parts: first the whole steps of BLOCK_N keys
#: that every query row of the tile sees (below the first row's causal limit, no window)
#: without masks (no key bound, causal or row test, no -inf select; the loads keep only
#: head_dim's padded lanes masked), then the rest masked as before; False: every step masked.
#: As FlashAttention and Triton's fused-attention tutorial split their causal loops. Off until
#: measured on a GPU (bench/tune_device.py fulltiles, A/B on the decode and prefill shapes);
#: the interpreter tests run it both ways.
FULL_TILES = False

#: Sequences per step and tokens per store of _cascade_order_kernel.
CASCADE_BLOCK_S, CASCADE_BLOCK_T = 256, 256


def _head_slices(group: int, itemsize: int) -> tuple[int, int]:
    """(slices, q heads per slice) of a kv head's group within MAX_GROUP_ROWS."""
    return head_slices(group, MAX_GROUP_ROWS[min(itemsize, 4)])


def attention_config(num_q_heads: int, num_kv_heads: int, head_dim: int, decode: bool,
                     itemsize: int = 2, split: bool = False, fp8: bool = False) -> dict:
    """Tile sizes of one paged-attention launch (also used by the compile tests).

    itemsize: bytes per element of q and the caches. split: a split-KV decode launch.
    fp8: float8_e4m3fn caches, decoded in registers: half the keys a step (at least 16); with
    the keys of the 16-bit tiles the decode spilled (sm_80/sm_90: 840 B at 128 keys for a
    split bf16 decode, 3.9 KB for a float32 prefill at head_dim 80).
    16-bit decode steps over 64 keys, split ones (each program walks a share of a sequence)
    in 5 pipeline stages (:func:`attention_stages`; fp8: 64 keys in 3): on an H200
    (bf16, 32 q / 8 kv heads, head_dim 128, 4 warps) 64 keys read 64 x 4096 tokens at 99% of
    the measured read bandwidth (128: 93%); the split batches 8 x 4096 and 1 x 32768 read at
    71% and 52% with 128 keys against 58% and 39% with 64 (3 stages; with MAX_KV_SPLITS 32,
    2026-11-28: 71% and 69%), and on 2026-11-29 at 71-73% with 64 keys in 5 stages against
    67-69% with 128 in 3 (64 in 4 stages: 57%; 6: 71%; bench/tune_device.py splitdecode,
    two runs); these split tiles run 2 warps (:func:`attention_warps`). Compiled for sm_80 and
    sm_90 the 5-stage tile takes 72 KB of shared memory.

    A program's rows (BLOCK_M) are query tokens x the q heads of its slice of a kv head's
    group (KV_GROUP q heads in HEAD_SPLITS slices of at most GROUP): the whole group up to 32
    q heads for float32 and 128 for 16-bit, so no program holds more rows than compile
    without spills. Compiled for sm_80 and sm_90
    (head_dim 64-256, groups 1-128, window / soft cap / split variants): float32 runs
    three-pass TF32 dots in decode tiles of 16 rows up to head_dim 128 (see F32_DOT_PREC),
    elsewhere ieee FMA dots that keep each thread's q rows in registers; 32 rows x 64 keys at
    8 warps take 64-115 registers and no stack, 256-wide heads take 16 keys (32 spilled 5.7 KB
    on sm_90). As one program, float32 groups of 64-128 spilled up to 17 KB at 4-8 warps, and
    128 rows at head_dim 256 asked 169-214 KB of shared memory (sm_80 has 163). 16-bit tiles
    spill nowhere there but at head_dim 256 x 128 rows with a window or soft cap (16-40 B on
    sm_80 with 32 keys): those take 16 keys.
    """
    group = num_q_heads // num_kv_heads
    splits, sub = _head_slices(group, itemsize)
    gp2 = _p2(sub)
    block_d = max(16, _p2(head_dim))
    f32 = itemsize >= 4
    block_m = max(16, gp2) if decode else max(32 if f32 else 64, gp2)
    if block_d >= 256 and block_m >= (32 if f32 else 128):
        block_n = 16
    elif block_d >= 256:
        block_n = 32
    else:
        block_n = 128 if fp8 and _split_16bit(decode, split, itemsize, block_m) else 64
    if fp8:
        block_n = max(16, block_n // 2)
    return {"GROUP": sub, "GROUP_P2": gp2, "KV_GROUP": group, "HEAD_SPLITS": splits,
            "HEAD_DIM": head_dim, "BLOCK_D": block_d, "BLOCK_M": block_m, "BLOCK_N": block_n}


def _split_16bit(decode: bool, split: bool, itemsize: int, rows: int) -> bool:
    """A split-KV decode launch of 16-bit (or fp8) tiles of up to 16 rows."""
    return decode and split and itemsize < 4 and rows <= 16


def _split_pipeline_tile(decode: bool, split: bool, itemsize: int, rows: int, head_dim: int,
                         fp8: bool, cc: int) -> bool:
    """The 16-bit split-KV decode tile (not fp8) up to head_dim 128 on NVIDIA GPUs from sm_80
    (``cc``: compute capability x 10), whose 64 keys a step run in 5 pipeline stages on 2
    warps (:func:`attention_stages`, :func:`attention_warps`)."""
    return cc >= 80 and not fp8 and head_dim <= 128 and _split_16bit(decode, split, itemsize,
                                                                     rows)


def attention_stages(cfg: dict, decode: bool, *, itemsize: int = 2, split: bool = False,
                     fp8: bool = False, cc: int = 90) -> int | None:
    """Software pipeline stages of a launch of config ``cfg`` (None: Triton's default, 3):
    5 for 16-bit split-KV decode tiles of 64 keys up to head_dim 128 on NVIDIA GPUs from sm_80
    (``cc``: compute capability x 10; see :func:`attention_config`)."""
    if cfg["BLOCK_N"] == 64 and _split_pipeline_tile(decode, split, itemsize, cfg["BLOCK_M"],
                                                     cfg["BLOCK_D"], fp8, cc):
        return 5
    return None


def attention_warps(head_dim: int, decode: bool, *, itemsize: int = 2, rows: int = 16,
                    cc: int = 90, split: bool = False, fp8: bool = False) -> int:
    """Warps per program: 2 for the 16-bit split-KV decode tiles of 64 keys in 5 stages
    (:func:`attention_stages`; ``split``, ``fp8`` as there; NVIDIA from sm_80, head_dim up to
    128, measured at 128): on an H200 (bf16, 32 q / 8 kv heads, 2026-11-30) 8 x 4096 and
    1 x 32768 read at 76% of the measured read bandwidth against 72-73% with 4 warps (1 warp:
    36%; 2 warps in 3-4 stages: 55%, in 6: 76%; bench/tune_device.py splitdecode, two runs).
    Else 4 for decode tiles of 16 rows (``rows``: BLOCK_M) and, from sm_90
    (``cc``: compute capability x 10), for 16-bit prefill tiles of up to 64 rows, up to
    head_dim 128 (sm_80 spilled 32-56 B there at 4 warps, so it keeps 8); otherwise 8 for
    wide heads (the per-token K/V pointer tiles need registers) and for float32 tiles of 32
    rows (4 warps spilled 128-712 B at head_dim 64), else 4. On an H200 (32 q / 8 kv heads,
    head_dim 128): decode 64 x 4096 tokens bf16 read at 99% of the measured read bandwidth
    with 4 warps against 79% with 8, float32 (ieee dots) at 30% against 18%; prefill of
    8 x 512 tokens over 4096 cached (bf16, 64 rows x 64 keys) took 1.49 ms with 4 warps
    against 2.87 ms with 8 (197 against 102 TFLOP/s; 128 rows x 128 keys at 8 warps: 1.41 ms,
    but that tile spills 64 B on sm_80 and takes 160 KB of shared memory on sm_90;
    bench/tune_device.py prefill). fp8 caches with 16-bit q take the 16-bit rule (not
    measured there)."""
    if _split_pipeline_tile(decode, split, itemsize, rows, head_dim, fp8, cc):
        return 2
    if head_dim <= 128 and (rows <= 16 if decode else
                            itemsize < 4 and rows <= 64 and cc >= 90):
        return 4
    return 8 if head_dim > 64 or (itemsize >= 4 and rows >= 32) else 4


def program_heads(num_q_heads: int, num_kv_heads: int, itemsize: int) -> int:
    """Programs per query tile (and split): the kv heads x the slices of each one's group."""
    return num_kv_heads * _head_slices(num_q_heads // num_kv_heads, itemsize)[0]


@functools.cache
def compute_capability(device_index: int | None) -> int:
    """A CUDA device's compute capability as major x 10 + minor (a host-side property query:
    no sync, graph-safe); an H100's (90) where none can be asked (the interpreter); 0 on ROCm,
    whose gfx numbers are no CUDA capability (the rules measured on NVIDIA GPUs stay off)."""
    if getattr(torch.version, "hip", None):
        return 0
    if device_index is None or not torch.cuda.is_available():
        return 90
    major, minor = torch.cuda.get_device_capability(device_index)
    return 10 * major + minor


def _sms(q) -> int:
    """SMs of q's device; for meta tensors (workspace sizing) the current CUDA device's."""
    if q.is_cuda:
        return sm_count(q.device.index)
    if q.device.type == "meta" and torch.cuda.is_available():
        return sm_count(torch.cuda.current_device())
    return sm_count(None)


def _itemsize(q, k_cache) -> int:
    return max(q.element_size(), k_cache.element_size())


def _heads(q, k_cache) -> int:
    """Programs per query tile of q's batch (see program_heads)."""
    return program_heads(q.shape[1], k_cache.shape[2], _itemsize(q, k_cache))


def _splits(q, k_cache, tables, decode: bool) -> int:
    return num_kv_splits(tables.shape[0], _heads(q, k_cache),
                         tables.shape[1] * k_cache.shape[1], decode, _sms(q))


def _prefix_tile_tokens(q, k_cache) -> int:
    """Query tokens per tile of the cascade's (non-causal, prefill-tiled) prefix launch."""
    cfg = attention_config(q.shape[1], k_cache.shape[2], q.shape[2], False,
                           itemsize=_itemsize(q, k_cache))
    return cfg["BLOCK_M"] // cfg["GROUP_P2"]


def _prefix_splits(q, k_cache, prefix_tables) -> int:
    """Split-KV factor of the cascade's prefix launch (planner.prefix_kv_splits): its programs
    are (query tiles + prefixes) x heads, few when many queries share few long prefixes (64
    decode queries over one prefix: 40 programs for 132 SMs at 32 q / 8 kv heads), each
    walking a whole prefix."""
    num_prefixes, width = prefix_tables.shape
    if num_prefixes == 0:
        return 1
    tiles = triton.cdiv(q.shape[0], _prefix_tile_tokens(q, k_cache)) + num_prefixes
    return prefix_kv_splits(tiles * _heads(q, k_cache), width * k_cache.shape[1], _sms(q))


def _max_prefix_split_rows(q, k_cache, prefix_tables) -> int:
    """Most (split, token) rows of prefix-launch partials of this batch or a smaller one."""
    if prefix_tables.shape[0] == 0:
        return 0
    return max_prefix_split_rows(q.shape[0], _heads(q, k_cache), _prefix_tile_tokens(q, k_cache),
                                 prefix_tables.shape[1] * k_cache.shape[1], _sms(q))


def _max_split_rows(q, k_cache, tables, decode: bool) -> int:
    """Most (split, token) rows of split-KV partials any decode batch of up to this one's
    sequences takes (same heads and table width): fewer sequences split more, so a smaller
    batch can need more than this one (2 sequences x 16 splits against 256 x 1)."""
    n_max = tables.shape[0]
    if not decode or n_max == 0:
        return 0
    max_kv, heads, sms = tables.shape[1] * k_cache.shape[1], _heads(q, k_cache), _sms(q)
    best = 0
    for n in range(1, min(n_max, sms) + 1):  # sms sequences or more never split
        splits = num_kv_splits(n, heads, max_kv, True, sms)
        if splits > 1:
            best = max(best, n * splits)
    return best


# ----------------------------------------------------------------------------- workspaces
#
# The temporaries of an attention call (split-KV partials, the cascade's sorted queries and
# states, lse when the caller wants none) are planned from static shapes as a list of
# (name, shape, dtype) and carved out of the caller's uint8 ``workspace`` when one is given,
# so a call with out=, lse= and workspace= allocates nothing (CUDA-graph capture, a fixed
# memory budget); without one each buffer is a fresh torch.empty. The *_workspace_bytes
# functions size the workspace from the same plans.

def _align(n: int) -> int:
    return -(-n // WORKSPACE_ALIGN) * WORKSPACE_ALIGN


def _plan_bytes(plan) -> int:
    end = 0
    for _, shape, dtype in plan:
        end = _align(end) + math.prod(shape) * dtype.itemsize
    return end


def _carve(plan, workspace, device, op: str) -> dict:
    """The buffers of ``plan``: views of ``workspace`` (uint8, 1-D), or fresh when it is None."""
    if workspace is None:
        return {name: torch.empty(shape, dtype=dtype, device=device)
                for name, shape, dtype in plan}
    if workspace.storage_offset() % WORKSPACE_ALIGN:  # checked here for compiled callers too
        raise ValueError(f"workspace: must start {WORKSPACE_ALIGN}-byte aligned (a fresh "
                         f"tensor, or a slice at a multiple of {WORKSPACE_ALIGN})")
    need = _plan_bytes(plan)
    if workspace.numel() < need:
        raise ValueError(f"workspace: {op} needs {need} bytes here (see "
                         f"attention_workspace_size), got {workspace.numel()}")
    bufs, off = {}, 0
    for name, shape, dtype in plan:
        off = _align(off)
        n = math.prod(shape) * dtype.itemsize
        bufs[name] = workspace[off:off + n].view(dtype).view(shape)
        off += n
    return bufs


def _partials_plan(q, lead: tuple, prefix: str = "") -> list:
    """Split-KV partials (out and lse, float32) with leading dims ``lead``."""
    _, num_q_heads, head_dim = q.shape
    return [(prefix + "part_o", (*lead, num_q_heads, head_dim), torch.float32),
            (prefix + "part_l", (*lead, num_q_heads), torch.float32)]


def _split_plan(q, num_splits: int, prefix: str = "") -> list:
    """The partials of one call: [num_splits, num_tokens, ...] (none without a split)."""
    return _partials_plan(q, (num_splits, q.shape[0]), prefix) if num_splits > 1 else []


def _split_rows_plan(q, rows: int, prefix: str = "") -> list:
    """Room for ``rows`` (split, token) rows of partials (workspace sizing)."""
    return _partials_plan(q, (rows,), prefix) if rows else []


def _lse_plan(q, with_lse: bool) -> list:
    return [("lse", tuple(q.shape[:2]), torch.float32)] if with_lse else []


def _shared_plan(q, k_cache, prefix_block_tables, block_tables, cu_q_lens, *, with_lse: bool,
                 sizing: bool = False) -> list:
    num_tokens, num_q_heads, head_dim = q.shape
    num_prefixes = prefix_block_tables.shape[0]
    f32 = torch.float32
    plan = [("states_o", (2, num_tokens, num_q_heads, head_dim), f32),
            ("states_l", (2, num_tokens, num_q_heads), f32),
            ("part_o", (num_tokens, num_q_heads, head_dim), f32),
            ("part_l", (num_tokens, num_q_heads), f32),
            ("q_sorted", tuple(q.shape), q.dtype),
            ("order", (num_tokens,), torch.int64),
            ("cu_p", (num_prefixes + 1,), torch.int32)]
    decode = cu_q_lens is None
    if sizing:
        own = _split_rows_plan(q, _max_split_rows(q, k_cache, block_tables, decode), "own_")
        pre = _split_rows_plan(q, _max_prefix_split_rows(q, k_cache, prefix_block_tables),
                               "pre_")
    else:
        own = _split_plan(q, _splits(q, k_cache, block_tables, decode), "own_")
        pre = _split_plan(q, _prefix_splits(q, k_cache, prefix_block_tables), "pre_")
    return plan + own + pre + _lse_plan(q, with_lse)


def paged_attention_workspace_bytes(q, k_cache, block_tables, cu_q_lens=None) -> int:
    """Bytes of the ``workspace`` with which paged_attention allocates nothing, for this
    batch and every smaller one with the same heads and table width (from shapes and the
    device's SM count only; lse included for calls that pass none)."""
    decode = cu_q_lens is None
    return _plan_bytes(_split_rows_plan(q, _max_split_rows(q, k_cache, block_tables, decode))
                       + _lse_plan(q, True))


def shared_prefix_attention_workspace_bytes(q, k_cache, prefix_block_tables, block_tables,
                                            cu_q_lens=None) -> int:
    """Bytes of the ``workspace`` with which shared_prefix_attention allocates nothing, for
    this batch and every smaller one."""
    return _plan_bytes(_shared_plan(q, k_cache, prefix_block_tables, block_tables, cu_q_lens,
                                    with_lse=True, sizing=True))


def _launch(out, lse, q, k_cache, v_cache, tables, kv_lens, cu, *, scale, causal, window,
            soft_cap, num_splits=None, parts=None, k_scale=None, v_scale=None, sinks=None):
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs, width = tables.shape
    decode = cu is None
    itemsize = _itemsize(q, k_cache)
    if num_splits is None:
        num_splits = _splits(q, k_cache, tables, decode)
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    cc = compute_capability(q.device.index if q.is_cuda else None)
    cfg = attention_config(num_q_heads, num_kv_heads, head_dim, decode, itemsize=itemsize,
                           split=num_splits > 1, fp8=fp8)
    stages = attention_stages(cfg, decode, itemsize=itemsize, split=num_splits > 1, fp8=fp8,
                              cc=cc)
    block_q = cfg["BLOCK_M"] // cfg["GROUP_P2"]
    # query tiles of the whole batch (see the kernel): one per sequence in decode
    tiles = num_seqs if decode else triton.cdiv(num_tokens, block_q) + num_seqs
    upcast = INTERPRET or q.dtype == torch.float32
    if num_splits > 1:
        if parts is None:
            parts = _carve(_split_plan(q, num_splits), None, q.device, "paged_attention")
        part_o, part_l = parts["part_o"], parts["part_l"]
        tgt_o, tgt_l = part_o, part_l
        so, sl = part_o.stride(0), part_l.stride(0)
    else:
        tgt_o, tgt_l, so, sl = out, lse, 0, 0
    if num_tokens == 0 or num_seqs == 0:
        return
    if width == 0 or k_cache.shape[0] == 0:  # no key anywhere: what the kernel would write
        out.zero_()
        _fill_unseen(lse, sinks)
        return
    programs = tiles * num_splits
    if programs >= 2**31:
        raise ValueError(f"q: {tiles} query tiles x {num_splits} splits is over the 2**31 - 1 "
                         f"programs of one launch; split the batch")
    grid = (programs, num_kv_heads * cfg["HEAD_SPLITS"])
    if fp8:  # the bytes, decoded in the kernel (same strides: one byte an element)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, tables, kv_lens, cu if cu is not None else kv_lens, tgt_o, tgt_l,
        # no scale or sinks: any float32 pointer, never read (K_SCALED / V_SCALED / SINKS False)
        k_scale if k_scale is not None else tgt_l, v_scale if v_scale is not None else tgt_l,
        sinks.contiguous() if sinks is not None else tgt_l,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), tables.stride(0),
        *tgt_o.stride()[-3:], *tgt_l.stride()[-2:], so, sl, num_seqs, num_tokens, width,
        k_cache.shape[0], float(scale), float(soft_cap or 1.0), int(window or 0),
        BLOCK_SIZE=block_size, DECODE=decode, CAUSAL=bool(causal), WINDOW=window is not None,
        SOFT_CAP=soft_cap is not None, NUM_SPLITS=num_splits, UPCAST=upcast, FP8=fp8,
        K_SCALED=fp8 and k_scale is not None, V_SCALED=fp8 and v_scale is not None,
        SINKS=sinks is not None, FULL_TILES=FULL_TILES,
        DOT_PREC="ieee" if INTERPRET else dot_precision(itemsize, head_dim, cfg["BLOCK_M"],
                                                        decode),
        num_warps=attention_warps(head_dim, decode, itemsize=itemsize, rows=cfg["BLOCK_M"],
                                  cc=cc, split=num_splits > 1, fp8=fp8),
        **({"num_stages": stages} | cfg if stages else cfg))
    if num_splits > 1:
        _merge(out, lse, part_o, part_l)


def _fill_unseen(lse, sinks) -> None:
    """lse of rows that see no key: -inf, or with sinks each head's sink (out is 0 there)."""
    if sinks is None:
        lse.fill_(float("-inf"))
    else:
        lse.copy_(sinks.expand(lse.shape))  # copy_ converts: no float32 temporary


def _merge(out, lse, states_o, states_l):
    """out/lse <- log-sum-exp merge over axis 0 of states_o [S, T, H, D], states_l [S, T, H]."""
    num_states, num_tokens, num_heads, head_dim = states_o.shape
    if num_tokens * num_heads == 0:
        return
    _merge_states_kernel[(num_tokens * num_heads,)](
        out, lse, states_o, states_l, num_heads, *out.stride(), *lse.stride(),
        *states_o.stride(), *states_l.stride(), HEAD_DIM=head_dim,
        BLOCK_D=max(16, _p2(head_dim)), NUM_STATES=num_states, STATES_P2=max(2, _p2(num_states)))


def paged_attention(out, lse, q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens, *, scale,
                    causal, sliding_window, logits_soft_cap, num_splits=None,
                    workspace=None, k_scale=None, v_scale=None, sinks=None) -> None:
    """Backend entry (see prefixkv.torch_frontend): writes out and lse (lse may be None).
    With a ``workspace`` (uint8, paged_attention_workspace_bytes) it allocates nothing.
    float8_e4m3fn caches are read as they are (no dequantized copy): keys float32(k) *
    k_scale, values float32(v) * v_scale; k_scale, v_scale None (1.0) or a float32 tensor of
    one element on q's device (read by the kernel: no sync). sinks: None or float[num_q_heads]
    on q's device, read by the kernel: each row's softmax starts from its head's sink (no
    epilogue pass, nothing allocated past the workspace unless the sinks are a strided view,
    which is copied)."""
    if num_splits is None:
        num_splits = _splits(q, k_cache, block_tables, cu_q_lens is None)
    bufs = _carve(_split_plan(q, num_splits) + _lse_plan(q, lse is None), workspace, q.device,
                  "paged_attention")
    _launch(out, bufs["lse"] if lse is None else lse, q, k_cache, v_cache, block_tables,
            kv_lens, cu_q_lens, scale=scale, causal=causal, window=sliding_window,
            soft_cap=logits_soft_cap, num_splits=num_splits, parts=bufs, k_scale=k_scale,
            v_scale=v_scale, sinks=sinks)


#: The backend entries read float8_e4m3fn caches themselves (the torch frontend passes them
#: the fp8 caches and the scales instead of dequantized copies).
paged_attention.reads_fp8 = True
#: ... and attention sinks (the torch frontend passes them instead of applying an epilogue).
paged_attention.reads_sinks = True


def merge_attention_states(out, lse, out_a, lse_a, out_b, lse_b) -> None:
    """Backend entry: out/lse <- the merge of (out_a, lse_a) and (out_b, lse_b), any strides,
    each input read where it is (no stacked copy, nothing allocated)."""
    num_tokens, num_heads, head_dim = out.shape
    if num_tokens * num_heads == 0:
        return
    _merge_two_kernel[(num_tokens * num_heads,)](
        out, lse, out_a, lse_a, out_b, lse_b, num_heads, *out.stride(), *lse.stride(),
        *out_a.stride(), *lse_a.stride(), *out_b.stride(), *lse_b.stride(), HEAD_DIM=head_dim,
        BLOCK_D=max(16, _p2(head_dim)))


def shared_prefix_attention(out, lse, q, k_cache, v_cache, prefix_block_tables, prefix_lens,
                            prefix_ids, block_tables, kv_lens, cu_q_lens, *, scale,
                            logits_soft_cap, workspace=None, k_scale=None,
                            v_scale=None, sinks=None) -> None:
    """Cascade: all queries of a prefix against its KV once (tokens sorted by prefix form one
    ragged non-causal batch over the prefix table), own tokens by paged attention, then the
    log-sum-exp merge. Device-side bookkeeping only (no host sync), every step an in-place or
    out= op into the planned buffers: with a ``workspace`` it allocates nothing. fp8 caches,
    k_scale, v_scale: as in paged_attention (both launches read the fp8 bytes). sinks: as in
    paged_attention, read by the own-token launch alone (each row's sink counted once)."""
    num_tokens = q.shape[0]
    num_seqs = block_tables.shape[0]
    num_prefixes = prefix_block_tables.shape[0]
    b = _carve(_shared_plan(q, k_cache, prefix_block_tables, block_tables, cu_q_lens,
                            with_lse=lse is None),
               workspace, q.device, "shared_prefix_attention")
    lse = b["lse"] if lse is None else lse
    if num_tokens == 0:
        return
    # state 0 (prefix part) is written whole by the index_copy_ below: only state 1 is reset
    states_o, states_l = b["states_o"], b["states_l"]
    states_o[1].zero_()
    _fill_unseen(states_l[1], sinks)
    own = ({"part_o": b["own_part_o"], "part_l": b["own_part_l"]} if "own_part_o" in b
           else None)
    _launch(states_o[1], states_l[1], q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens,
            scale=scale, causal=True, window=None, soft_cap=logits_soft_cap, parts=own,
            k_scale=k_scale, v_scale=v_scale, sinks=sinks)
    # the tokens grouped by prefix (no prefix last), each group in token order, and cu_p[p]:
    # where prefix p's group starts, the ragged "sequences" of the prefix launch
    # (the identity first: with cu_q_lens inconsistent with q, unchecked on a device, every
    # index stays in range)
    order = b["order"]
    torch.arange(num_tokens, out=order)
    _cascade_order_kernel[(num_seqs + num_prefixes + 1,)](
        prefix_ids, cu_q_lens if cu_q_lens is not None else prefix_ids, order, b["cu_p"],
        num_seqs, num_prefixes, num_tokens, DECODE=cu_q_lens is None, BLOCK_S=CASCADE_BLOCK_S,
        BLOCK_T=CASCADE_BLOCK_T)
    q_sorted, part_o, part_l = b["q_sorted"], b["part_o"], b["part_l"]
    torch.index_select(q, 0, order, out=q_sorted)
    # The tokens of no prefix (past cu_p[num_prefixes]) are in no tile of the prefix launch:
    # their rows must read "nothing seen" (out 0, lse -inf). Unsplit, the launch writes the
    # other rows of part_o/part_l; split, its merge writes every row from the partials, whose
    # unwritten rows then must have lse -inf (the merge ignores their out).
    pre = None
    splits = 1  # the plan carved prefix partials when the prefix launch splits
    if "pre_part_o" in b:
        pre = {"part_o": b["pre_part_o"], "part_l": b["pre_part_l"]}
        splits = pre["part_o"].shape[0]
        pre["part_l"].fill_(float("-inf"))
    else:
        part_o.zero_()
        part_l.fill_(float("-inf"))
    if num_prefixes:
        _launch(part_o, part_l, q_sorted, k_cache, v_cache, prefix_block_tables, prefix_lens,
                b["cu_p"], scale=scale, causal=False, window=None, soft_cap=logits_soft_cap,
                num_splits=splits, parts=pre, k_scale=k_scale, v_scale=v_scale)
    states_o[0].index_copy_(0, order, part_o)
    states_l[0].index_copy_(0, order, part_l)
    _merge(out, lse, states_o, states_l)


shared_prefix_attention.reads_fp8 = True
shared_prefix_attention.reads_sinks = True
