"""Triton kernels of the attention ops: ragged paged attention (decode, prefill and mixed
batches in one kernel; GQA/MQA, causal, sliding window, soft cap, lse), its split-KV path for
long contexts with few sequences (partials merged by log-sum-exp), the two-state merge, and
shared-prefix ("cascade") attention built from them.

Layout: q [num_tokens, num_q_heads, head_dim]; k/v cache [num_blocks, block_size, num_kv_heads,
head_dim] with any strides (views of a stacked cache work); int32 block tables, kv_lens,
cu_q_lens. Program (seq, q tile, kv head[, split]) holds BLOCK_M rows = query tokens x the q
heads of one kv head, so each K/V tile is loaded once for the whole group; keys come in tiles of
BLOCK_N tokens, each token's block looked up in the table (any block_size).

Under ``TRITON_INTERPRET=1`` bf16/f16 tiles are upcast to float32 (UPCAST constexpr): the
interpreter computes low-precision dots wrongly.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ._interp import patch_interpreter

patch_interpreter()

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: SMs assumed where no CUDA device can be asked (the interpreter): an H100's.
_SMS = 132


@functools.cache
def sm_count(device_index: int | None) -> int:
    """Multiprocessors of a CUDA device (a host-side property query: no sync, graph-safe)."""
    if device_index is None or not torch.cuda.is_available():
        return _SMS
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@triton.jit
def _tanh(x):
    # overflow-safe: exp(2x) -> inf gives 1, -> 0 gives -1
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _paged_attention_kernel(
        q_ptr, k_ptr, v_ptr, tables_ptr, kv_lens_ptr, cu_ptr, out_ptr, lse_ptr,
        stride_qt, stride_qh, stride_qd,
        stride_kb, stride_kt, stride_kh, stride_kd,
        stride_vb, stride_vt, stride_vh, stride_vd,
        stride_tab, stride_ot, stride_oh, stride_od, stride_lt, stride_lh,
        stride_split_o, stride_split_l,
        scale, soft_cap, window,
        GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, DECODE: tl.constexpr, CAUSAL: tl.constexpr,
        WINDOW: tl.constexpr, SOFT_CAP: tl.constexpr, NUM_SPLITS: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    kvh = tl.program_id(2)
    split = tl.program_id(2) * 0
    if NUM_SPLITS > 1:
        split = tile % NUM_SPLITS
        tile = tile // NUM_SPLITS
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP_P2
    if DECODE:
        q_start = seq
        q_len = 1
    else:
        q_start = tl.load(cu_ptr + seq)
        q_len = tl.load(cu_ptr + seq + 1) - q_start
    kv_len = tl.load(kv_lens_ptr + seq)
    if tile * BLOCK_Q < q_len:
        rows = tl.arange(0, BLOCK_M)
        j = tile * BLOCK_Q + rows // GROUP_P2
        g = rows % GROUP_P2
        row_ok = (j < q_len) & (g < GROUP)
        head = kvh * GROUP + g
        tok = q_start + j
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh
                    + d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        q_pos = kv_len - q_len + j
        # key range of this tile: [lo, hi)
        hi = kv_len
        if CAUSAL:
            hi = tl.minimum(kv_len, kv_len - q_len + tl.minimum(q_len, (tile + 1) * BLOCK_Q))
        lo = hi * 0
        if WINDOW:
            lo = tl.maximum(kv_len - q_len + tile * BLOCK_Q - window + 1, 0)
            lo = (lo // BLOCK_N) * BLOCK_N
        if NUM_SPLITS > 1:
            span = tl.cdiv(tl.cdiv(hi - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
            lo = lo + split * span
            hi = tl.minimum(hi, lo + span)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        n = tl.arange(0, BLOCK_N)
        for start in range(lo, hi, BLOCK_N):
            t = start + n
            t_ok = t < hi
            blk = tl.load(tables_ptr + seq * stride_tab + t // BLOCK_SIZE, mask=t_ok, other=0)
            off = t % BLOCK_SIZE
            kv_mask = t_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + blk.to(tl.int64)[:, None] * stride_kb + off[:, None] * stride_kt
                        + kvh * stride_kh + d[None, :] * stride_kd, mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + blk.to(tl.int64)[:, None] * stride_vb + off[:, None] * stride_vt
                        + kvh * stride_vh + d[None, :] * stride_vd, mask=kv_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale
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
        seen = l_i > 0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
        o_ptrs = (out_ptr + split * stride_split_o + tok[:, None] * stride_ot
                  + head[:, None] * stride_oh + d[None, :] * stride_od)
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(lse_ptr + split * stride_split_l + tok * stride_lt + head * stride_lh, lse,
                 mask=row_ok)


@triton.jit
def _merge_states_kernel(out_ptr, lse_ptr, o_ptr, l_ptr, num_heads, stride_ot, stride_oh,
                         stride_od, stride_lt, stride_lh, stride_so, stride_st, stride_sh,
                         stride_sd, stride_sl, stride_slt, stride_slh,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         NUM_STATES: tl.constexpr, STATES_P2: tl.constexpr):
    """Log-sum-exp merge of NUM_STATES partial states o[state, t, h, :], l[state, t, h]."""
    row = tl.program_id(0)
    t = row // num_heads
    h = row % num_heads
    sidx = tl.arange(0, STATES_P2)
    s_ok = sidx < NUM_STATES
    lse = tl.load(l_ptr + sidx * stride_sl + t * stride_slt + h * stride_slh, mask=s_ok,
                  other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe)
    den = tl.sum(w, 0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    o = tl.load(o_ptr + sidx[:, None] * stride_so + t * stride_st + h * stride_sh
                + d[None, :] * stride_sd, mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    o = o.to(tl.float32)
    w = tl.where(s_ok & (lse > float("-inf")), w, 0.0)
    acc = tl.sum(o * w[:, None], 0)
    seen = den > 0
    res = tl.where(seen, acc / tl.where(seen, den, 1.0), 0.0)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + d * stride_od,
             res.to(out_ptr.dtype.element_ty), mask=d_ok)
    tl.store(lse_ptr + t * stride_lt + h * stride_lh,
             tl.where(seen, m_safe + tl.log(tl.where(seen, den, 1.0)), float("-inf")))


# ------------------------------------------------------------------------------- launchers


def _p2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def attention_config(num_q_heads: int, num_kv_heads: int, head_dim: int, decode: bool,
                     itemsize: int = 2) -> dict:
    """Tile sizes of one paged-attention launch (also used by the compile tests).

    itemsize: bytes per element of q and the caches. float32 prefill tiles of 64 rows spilled
    on sm_90 at head_dim 80-128 (600 B to 8 KB of stack per thread, for 32 or 64 keys);
    32 rows x 64 keys compile to 114 registers and no stack on sm_80 and sm_90.
    """
    group = num_q_heads // num_kv_heads
    gp2 = _p2(group)
    block_d = max(16, _p2(head_dim))
    block_m = max(16, gp2) if decode else max(32 if itemsize >= 4 else 64, gp2)
    block_n = 32 if block_d >= 256 else 64
    return {"GROUP": group, "GROUP_P2": gp2, "HEAD_DIM": head_dim, "BLOCK_D": block_d,
            "BLOCK_M": block_m, "BLOCK_N": block_n}


def attention_warps(head_dim: int, decode: bool) -> int:
    """Warps per program: 8 for wide heads (the per-token K/V pointer tiles need registers)."""
    return 8 if head_dim > 64 else 4


def num_kv_splits(num_seqs: int, num_kv_heads: int, max_kv: int, decode: bool,
                  sms: int = _SMS) -> int:
    """Split-KV factor from static sizes only (no host sync): long contexts, few programs
    (seqs x kv heads leave most of the ``sms`` multiprocessors idle)."""
    if not decode or max_kv < 1024:
        return 1
    programs = num_seqs * num_kv_heads
    if programs >= sms:
        return 1
    return int(max(1, min(16, sms * 2 // max(programs, 1), max_kv // 512)))


def _launch(out, lse, q, k_cache, v_cache, tables, kv_lens, cu, *, scale, causal, window,
            soft_cap, num_splits=None, max_q=None):
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs, width = tables.shape
    decode = cu is None
    cfg = attention_config(num_q_heads, num_kv_heads, head_dim, decode,
                           itemsize=max(q.element_size(), k_cache.element_size()))
    block_q = cfg["BLOCK_M"] // cfg["GROUP_P2"]
    if max_q is None:
        max_q = 1 if decode else num_tokens
    tiles = triton.cdiv(max(max_q, 1), block_q)
    if num_splits is None:
        num_splits = num_kv_splits(num_seqs, num_kv_heads, width * block_size, decode,
                                   sm_count(q.device.index if q.is_cuda else None))
    upcast = INTERPRET or q.dtype == torch.float32
    if num_splits > 1:
        part_o = torch.empty((num_splits, num_tokens, num_q_heads, head_dim),
                             dtype=torch.float32, device=q.device)
        part_l = torch.empty((num_splits, num_tokens, num_q_heads), dtype=torch.float32,
                             device=q.device)
        tgt_o, tgt_l = part_o, part_l
        so, sl = part_o.stride(0), part_l.stride(0)
    else:
        tgt_o, tgt_l, so, sl = out, lse, 0, 0
    if num_tokens == 0 or num_seqs == 0:
        return
    grid = (num_seqs, tiles * num_splits, num_kv_heads)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, tables, kv_lens, cu if cu is not None else kv_lens, tgt_o, tgt_l,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), tables.stride(0),
        *tgt_o.stride()[-3:], *tgt_l.stride()[-2:], so, sl,
        float(scale), float(soft_cap or 1.0), int(window or 0),
        BLOCK_SIZE=block_size, DECODE=decode, CAUSAL=bool(causal), WINDOW=window is not None,
        SOFT_CAP=soft_cap is not None, NUM_SPLITS=num_splits, UPCAST=upcast,
        DOT_PREC="ieee" if upcast else "tf32", num_warps=attention_warps(head_dim, decode),
        **cfg)
    if num_splits > 1:
        _merge(out, lse, part_o, part_l)


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
                    causal, sliding_window, logits_soft_cap, num_splits=None) -> None:
    """Backend entry (see prefixkv.torch_frontend): writes out and lse (lse may be None)."""
    if lse is None:
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    _launch(out, lse, q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens, scale=scale,
            causal=causal, window=sliding_window, soft_cap=logits_soft_cap,
            num_splits=num_splits)


def merge_attention_states(out, lse, out_a, lse_a, out_b, lse_b) -> None:
    _merge(out, lse, torch.stack([out_a, out_b]), torch.stack([lse_a, lse_b]))


def shared_prefix_attention(out, lse, q, k_cache, v_cache, prefix_block_tables, prefix_lens,
                            prefix_ids, block_tables, kv_lens, cu_q_lens, *, scale,
                            logits_soft_cap) -> None:
    """Cascade: all queries of a prefix against its KV once (tokens sorted by prefix form one
    ragged non-causal batch over the prefix table), own tokens by paged attention, then the
    log-sum-exp merge. Device-side bookkeeping only: no host sync."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_seqs = block_tables.shape[0]
    num_prefixes = prefix_block_tables.shape[0]
    dev = q.device
    states_o = torch.zeros((2, num_tokens, num_q_heads, head_dim), dtype=torch.float32,
                           device=dev)
    states_l = torch.full((2, num_tokens, num_q_heads), float("-inf"), dtype=torch.float32,
                          device=dev)
    _launch(states_o[1], states_l[1], q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens,
            scale=scale, causal=True, window=None, soft_cap=logits_soft_cap)
    if cu_q_lens is None:
        tok_seq = torch.arange(num_seqs, device=dev)
    else:
        ql = (cu_q_lens[1:] - cu_q_lens[:-1]).to(torch.int64)
        tok_seq = torch.repeat_interleave(torch.arange(num_seqs, device=dev), ql,
                                          output_size=num_tokens)
    pid = prefix_ids.to(torch.int64)[tok_seq]
    key = torch.where(pid >= 0, pid, num_prefixes)
    order = torch.sort(key, stable=True).indices
    counts = torch.zeros(num_prefixes + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, key, torch.ones_like(key))
    cu_p = torch.zeros(num_prefixes + 1, dtype=torch.int32, device=dev)
    cu_p[1:] = torch.cumsum(counts[:num_prefixes], 0).to(torch.int32)
    q_sorted = q.index_select(0, order)
    part_o = torch.zeros_like(states_o[0])
    part_l = torch.full_like(states_l[0], float("-inf"))
    if num_prefixes:
        _launch(part_o, part_l, q_sorted, k_cache, v_cache, prefix_block_tables, prefix_lens,
                cu_p, scale=scale, causal=False, window=None, soft_cap=logits_soft_cap,
                num_splits=1, max_q=num_tokens)
    states_o[0].index_copy_(0, order, part_o)
    states_l[0].index_copy_(0, order, part_l)
    if lse is None:
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=dev)
    _merge(out, lse, states_o, states_l)
