"""numpy reference of the attention ops: the meaning every backend is tested against.

Written for clarity, accumulating in float64; outputs in q's dtype, lse in float32.
"""

from __future__ import annotations

import numpy as np

from .. import validate
from ..spec import numpy_dtype
from .cache import dequantize_fp8_reference


def _as_f64(x) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, *, scale: float,
            causal: bool, sliding_window: int | None, logits_soft_cap: float | None,
            sinks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Attention of one sequence's queries over its keys 0..L-1 (float64).

    q: [q_len, num_q_heads, head_dim]; k, v: [L, num_kv_heads, head_dim]; q_pos: [q_len];
    sinks: float64[num_q_heads] or None, each q head's sink logit (a key no query masks, with
    value 0: it takes its share of the softmax and adds nothing to out).
    Returns out [q_len, num_q_heads, head_dim] and lse [q_len, num_q_heads] (natural log).
    """
    q_len, num_q_heads, head_dim = q.shape
    kv_len, num_kv_heads, _ = k.shape
    group = num_q_heads // num_kv_heads
    qg = q.reshape(q_len, num_kv_heads, group, head_dim)
    logits = np.einsum("qhgd,khd->qhgk", qg, k) * scale  # [q_len, Hkv, G, L]
    if logits_soft_cap is not None:
        logits = logits_soft_cap * np.tanh(logits / logits_soft_cap)
    k_pos = np.arange(kv_len)
    visible = np.ones((q_len, kv_len), dtype=bool)
    if causal:
        visible &= k_pos[None, :] <= q_pos[:, None]
        if sliding_window is not None:
            visible &= k_pos[None, :] > q_pos[:, None] - sliding_window
    logits = np.where(visible[:, None, None, :], logits, -np.inf)
    m = logits.max(axis=-1, keepdims=True) if kv_len else np.full((*logits.shape[:-1], 1), -np.inf)
    sink = None
    if sinks is not None:
        sink = np.broadcast_to(sinks.reshape(1, num_kv_heads, group, 1), m.shape)
        m = np.maximum(m, sink)
    # m is -inf where no key is visible (no sink): out 0, lse -inf. A NaN or +inf logit among
    # the visible keys (a NaN in the KV read, an overflow) gives NaN, never an answer that
    # skips that key.
    seen = ~np.isneginf(m)
    p = np.where(seen, np.exp(logits - np.where(seen, m, 0.0)), 0.0)
    denom = p.sum(axis=-1, keepdims=True)
    if sink is not None:
        denom = denom + np.where(seen, np.exp(sink - np.where(seen, m, 0.0)), 0.0)
    # keys no query sees (before every window) may hold anything, NaN included: 0 * NaN
    v = np.where(visible.any(axis=0)[:, None, None], v, 0.0)
    out = np.einsum("qhgk,khd->qhgd", p, v) / np.where(seen, denom, 1.0)
    lse = np.where(seen, m + np.log(np.where(seen, denom, 1.0)), -np.inf)[..., 0]
    return out.reshape(q_len, num_q_heads, head_dim), lse.reshape(q_len, num_q_heads)


def paged_attention_reference(q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens=None, *,
                              scale=None, causal=True, sliding_window=None, logits_soft_cap=None,
                              return_lse=False, sinks=None, k_scale=None, v_scale=None):
    """Ragged paged attention over cached prefixes (decode, prefill and mixed batches).

    q: [num_tokens, num_q_heads, head_dim] float32|float16|bfloat16.
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], q's dtype, or
    float8_e4m3fn read as float64(cache) * k_scale (v_scale): k_scale, v_scale None (1.0), a
    positive finite float or a float32 array of one element (fp8 caches only).
    block_tables: i32[num_seqs, max_blocks_per_seq]; entries in [0, num_blocks) for used blocks.
    kv_lens: i32[num_seqs], cached prefix + this step's tokens.
    cu_q_lens: i32[num_seqs + 1] or None (decode: one query token per sequence).

    Query token j of sequence s sits at p = kv_lens[s] - q_len + j and sees keys t <= p
    (all t < kv_len when causal=False), and t > p - sliding_window with a window. Logits are
    scale * q.k, soft-capped as cap * tanh(x / cap). q head h reads kv head
    h // (num_q_heads // num_kv_heads). sinks: float[num_q_heads] or None, attention sinks
    (gpt-oss): head h's softmax gets one more term exp(sinks[h]) in its denominator (the raw
    logit: neither scaled nor soft-capped) and out nothing for it, so
    out = sum_t e^{x_t} v_t / (sum_t e^{x_t} + e^{sinks[h]}).

    Returns out [num_tokens, num_q_heads, head_dim] in q's dtype, and with return_lse also
    lse f32[num_tokens, num_q_heads], the log of that denominator. A row that sees no key gives
    out 0 and lse -inf (with sinks: lse = sinks[h]).
    """
    dims = validate.check_paged_attention(
        q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens, scale=scale, causal=causal,
        sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, return_lse=return_lse,
        sinks=sinks, k_scale=k_scale, v_scale=v_scale)
    validate.check_kv_scale_values(k_scale, v_scale)
    kv, cu = validate.check_paged_attention_values(dims, block_tables, kv_lens, cu_q_lens)
    q64, kc, vc = _as_f64(q), np.asarray(k_cache), np.asarray(v_cache)
    if validate.is_fp8(kc):
        kc, vc = dequantize_fp8_reference(kc, k_scale), dequantize_fp8_reference(vc, v_scale)
    tables = np.asarray(block_tables).astype(np.int64)
    bs = dims.block_size
    sinks64 = None if sinks is None else _as_f64(sinks)
    out = np.zeros((dims.num_tokens, dims.num_q_heads, dims.head_dim), dtype=np.float64)
    lse = np.full((dims.num_tokens, dims.num_q_heads), -np.inf, dtype=np.float64)
    for s in range(dims.num_seqs):
        start, stop = int(cu[s]), int(cu[s + 1])
        q_len, kv_len = stop - start, int(kv[s])
        if q_len == 0:
            continue
        t = np.arange(kv_len)
        blocks, offsets = tables[s, t // bs], t % bs
        k = kc[blocks, offsets].astype(np.float64)  # [kv_len, num_kv_heads, head_dim]
        v = vc[blocks, offsets].astype(np.float64)
        q_pos = kv_len - q_len + np.arange(q_len)
        out[start:stop], lse[start:stop] = _attend(
            q64[start:stop], k, v, q_pos, scale=dims.scale, causal=causal,
            sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, sinks=sinks64)
    out = out.astype(numpy_dtype(dims.dtype))
    return (out, lse.astype(np.float32)) if return_lse else out


def merge_attention_states_reference(out_a, lse_a, out_b, lse_b):
    """Log-sum-exp merge of two partial attentions over disjoint key sets.

    out_a, out_b: [num_tokens, num_heads, head_dim] float; lse_a, lse_b: f32[num_tokens, num_heads]
    (natural log). out = (out_a e^lse_a + out_b e^lse_b) / (e^lse_a + e^lse_b),
    lse = log(e^lse_a + e^lse_b). Two empty states (lse -inf) merge to out 0, lse -inf. An lse
    of +inf is an empty state too (FlashAttention-2's rows with no key; vLLM's merge reads it
    so); an empty state's out is not read (a cascade leaves those rows unwritten). A NaN lse
    gives NaN. Returns (out in out_a's dtype, lse float32).
    """
    validate.check_merge_attention_states(out_a, lse_a, out_b, lse_b)
    la, lb = (np.where(x == np.inf, -np.inf, x) for x in (_as_f64(lse_a), _as_f64(lse_b)))
    m = np.maximum(la, lb)
    seen = m != -np.inf  # a NaN state (a NaN in the KV read) is kept: out and lse NaN
    m0 = np.where(seen, m, 0.0)
    wa, wb = np.exp(la - m0), np.exp(lb - m0)  # exp(-inf) = 0 for an empty side
    denom = np.where(seen, wa + wb, 1.0)
    # an empty state's out is not read (it may hold anything: 0 * NaN is NaN)
    oa, ob = (np.where((x == -np.inf)[..., None], 0.0, _as_f64(o))
              for x, o in ((la, out_a), (lb, out_b)))
    out = (wa[..., None] * oa + wb[..., None] * ob) / denom[..., None]
    out = np.where(seen[..., None], out, 0.0)
    lse = np.where(seen, m0 + np.log(denom), -np.inf)
    return out.astype(np.asarray(out_a).dtype), lse.astype(np.float32)


def shared_prefix_block_tables(prefix_block_tables, prefix_lens, prefix_ids, block_tables,
                               kv_lens, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated (block_tables, kv_lens) meaning "shared prefix, then own tokens".

    Sequence s with prefix_ids[s] = p >= 0 reads the first prefix_lens[p] // block_size blocks
    of prefix_block_tables[p], then its own blocks; its kv_len grows by prefix_lens[p]. Entries
    past a row's blocks are 0. (Vectorized: the torch CPU cascade builds its dissolved groups'
    tables with it on every call.)
    """
    ptab = np.asarray(prefix_block_tables)
    plens = np.asarray(prefix_lens).astype(np.int64)
    pids = np.asarray(prefix_ids).astype(np.int64)
    own = np.asarray(block_tables)
    kv = np.asarray(kv_lens).astype(np.int64)
    num_seqs, own_width = own.shape
    pre_width = ptab.shape[1]
    has = pids >= 0
    p = np.where(has, pids, 0)
    n = np.where(has, plens[p] // block_size, 0) if plens.size else np.zeros(num_seqs, np.int64)
    cols = np.arange(pre_width + own_width)
    own_col = cols - n[:, None]
    tables = np.zeros((num_seqs, cols.size), dtype=np.int32)
    if own_width:
        tables = np.where((own_col >= 0) & (own_col < own_width),
                          own[np.arange(num_seqs)[:, None],
                              np.minimum(np.maximum(own_col, 0), own_width - 1)], tables)
    if pre_width and ptab.shape[0]:
        tables = np.where(cols < n[:, None], ptab[p][:, np.minimum(cols, pre_width - 1)],
                          tables)
    return tables.astype(np.int32), (kv + n * block_size).astype(np.int32)


def shared_prefix_attention_reference(q, k_cache, v_cache, prefix_block_tables, prefix_lens,
                                      prefix_ids, block_tables, kv_lens, cu_q_lens=None, *,
                                      scale=None, logits_soft_cap=None, return_lse=False,
                                      sinks=None, sliding_window=None, k_scale=None,
                                      v_scale=None):
    """Causal attention of sequences that share cached prefixes ("cascade" attention).

    prefix_block_tables: i32[num_prefixes, max_prefix_blocks]; prefix_lens: i32[num_prefixes],
    multiples of block_size; prefix_ids: i32[num_seqs], a row of prefix_block_tables or -1 for
    none. block_tables/kv_lens/cu_q_lens describe each sequence's own tokens after its prefix.
    k_scale, v_scale: as in :func:`paged_attention_reference` (float8_e4m3fn caches).

    Defined as paged_attention over the concatenation (prefix blocks, then own blocks), sinks
    and sliding window included (each row's sink counted once; a window is counted over the
    concatenation, so the frontends run it as that paged attention); fast
    backends read each prefix's KV once for all the sequences that share it.
    """
    sdims = validate.check_shared_prefix_attention(
        q, k_cache, v_cache, prefix_block_tables, prefix_lens, prefix_ids, block_tables,
        kv_lens, cu_q_lens, scale=scale, logits_soft_cap=logits_soft_cap, return_lse=return_lse,
        sinks=sinks, sliding_window=sliding_window, k_scale=k_scale, v_scale=v_scale)
    validate.check_shared_prefix_attention_values(sdims, prefix_block_tables, prefix_lens,
                                                  prefix_ids, block_tables, kv_lens, cu_q_lens)
    tables, lens = shared_prefix_block_tables(prefix_block_tables, prefix_lens, prefix_ids,
                                              block_tables, kv_lens, sdims.attention.block_size)
    return paged_attention_reference(q, k_cache, v_cache, tables, lens, cu_q_lens, scale=scale,
                                     causal=True, sliding_window=sliding_window,
                                     logits_soft_cap=logits_soft_cap, return_lse=return_lse,
                                     sinks=sinks, k_scale=k_scale, v_scale=v_scale)
