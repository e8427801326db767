"""The torch-native backend of every op: vectorized torch, any device (the CPU path).

No Python loop per token or per block: attention runs over the batch padded to
``[num_kv_heads, num_seqs, group * max_q_len, head_dim]`` with an online softmax over chunks of
blocks (a few hundred keys per chunk), so each chunk of K/V is gathered once into a small
float32 buffer that stays in cache and every q head of a kv head reads it with one batched
matmul. Nothing of size ``num_seqs * max_kv_len`` is materialized. With the metadata on the
host, the sequences run in groups by q_len (_q_len_groups: the decodes through the decode
path, the others by power-of-two class of q_len), each padded to its own longest q_len, and a
long causal prefill runs in query tiles (_tiled_prefill). With it on a device (the fallback
on CUDA) there is no host sync: every sequence pads to the batch's token count, unless that
passes PAD_SYNC_BYTES, when the lengths are read back (a sync) and the host's rules apply.

With the ragged metadata on the host (the CPU path) shared_prefix_attention reads a decode
batch's own tokens with the compiled decode kernel (_c_decode) when it builds, else, as each
prefix, through _attend_host: whole blocks gathered a few MB at a time, then torch's fused CPU
attention kernel (decode: few rows per kv head) or one large matmul per kv head (a prefix
read by many queries), key chunks merged by LSE.

Every function writes into the output buffers it is given (the custom ops allocate them).
"""

from __future__ import annotations

import itertools
import math
import threading

import numpy as np
import torch

from ..paged.reference.attention import shared_prefix_block_tables
from ..paged.spec import FP8_MAX
from ..paged.validate import cumulative_ok

#: Bytes of float32 K per chunk of the online softmax (rounded to whole blocks).
CHUNK_BYTES = 2 << 20
#: Fewest keys per chunk (many short sequences: fewer, larger steps).
MIN_CHUNK_KEYS = 64
#: Bound on score elements per chunk ([Hkv, S, rows, keys]) so long prefills stay in memory.
CHUNK_SCORES = 1 << 22
#: CHUNK_BYTES, CHUNK_SCORES and MERGE_CHUNK_BYTES are sized for CPU caches. Off the CPU (this
#: path is the fallback where Triton is missing) a chunk costs kernel launches, not cache
#: misses: these bounds apply there instead. With the CPU sizes a bf16 decode of 64 x 4096
#: tokens took 64 chunks of ~30 launches, 40 ms on an H200 (the index_select + SDPA baseline:
#: 0.84 ms). A chunk's temporaries (float32 K and V, their gathered copies, the scores) stay
#: near 0.5 GB.
DEVICE_CHUNK_BYTES = 128 << 20
DEVICE_CHUNK_SCORES = 1 << 25
DEVICE_MERGE_CHUNK_BYTES = 128 << 20


def _chunk_bound(cpu: int, device_bound: int, device: torch.device) -> int:
    return cpu if device.type == "cpu" else device_bound


_LOCAL = threading.local()


def _workspace(name: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-thread scratch buffer reused across calls on the CPU (a fresh multi-MB
    allocation per call costs page faults comparable to the work); plain allocation elsewhere
    (the CUDA caching allocator already reuses memory). Contents are undefined."""
    shape = tuple(int(d) for d in shape)
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    cache = getattr(_LOCAL, "buffers", None)
    if cache is None:
        cache = _LOCAL.buffers = {}
    numel = math.prod(shape)
    # a buffer made under torch.inference_mode is an inference tensor: never written outside it
    key = (name, dtype, torch.is_inference_mode_enabled())
    buf = cache.get(key)
    if buf is None or buf.numel() < numel or buf.numel() > 4 * max(numel, 1 << 16):
        buf = torch.empty(max(numel, 1), dtype=dtype)
        cache[key] = buf
    return buf[:numel].view(shape)


def _on_host(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" for t in tensors)


def traced(*tensors) -> bool:
    """Whether a call is traced rather than run, so its tensors have no memory or values to
    check: torch.compile tracing, a dispatch mode on (fake tensors, ``make_fx``, export), or
    functionalization's wrapped tensors (``torch.func.functionalize``; None and non-tensors
    skipped). The ops' guards check the real tensors when they run. (Checked only for
    torch.compile, the wrappers read fake tensors' values and compared wrapped tensors'
    addresses: they raised under FakeTensorMode where the ops themselves run.)"""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return True
    return any(isinstance(t, torch.Tensor) and torch._is_functional_tensor(t) for t in tensors)


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b reach intersecting byte ranges of one device's memory (not while
    traced: fake tensors have no memory). By address, not by storage: two storages may
    hold one memory (``torch.from_numpy`` of two views of one array, DLPack imports)."""
    if traced(a, b) or not a.numel() or not b.numel():
        return False
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1 and a.device == b.device


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first, end) byte addresses a tensor reaches."""
    es = t.element_size()
    lo = hi = t.data_ptr()
    if t.is_contiguous():
        return lo, lo + t.numel() * es
    for n, st in zip(t.shape, t.stride(), strict=True):
        if st < 0:
            lo += (n - 1) * st * es
        else:
            hi += (n - 1) * st * es
    return lo, hi + es


def _attend_padded(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   tables: torch.Tensor, kv_lens: torch.Tensor, q_lens: torch.Tensor, *,
                   scale: float, causal: bool, sliding_window: int | None,
                   logits_soft_cap: float | None,
                   max_kv: int | None, min_end: int | None,
                   out_scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a padded batch. q: [S, Qm, Hq, D] (row j of sequence s valid for j < q_lens[s]).

    Returns out f32 [S, Qm, Hq, D] and lse f32 [S, Qm, Hq]. ``max_kv`` bounds the keys read
    (None: the table width); ``min_end``: every live row sees all keys below it (masking
    is skipped for chunks that end there; None: always mask). ``scale`` a float or a 0-d
    float32 tensor; ``out_scale`` (None, a float or a 0-d float32 tensor): out times it (the
    v_scale of fp8 blocks read unscaled, _fp8_scales), folded into the softmax denominator.
    """
    num_seqs, q_max, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    rows = group * q_max
    dev = q.device
    # [Hkv, S, G * Qm, D]: row r = g * Qm + j
    qh = (q.reshape(num_seqs, q_max, num_kv_heads, group, head_dim).permute(2, 0, 3, 1, 4)
          .reshape(num_kv_heads, num_seqs, rows, head_dim).to(torch.float32) * scale).contiguous()
    kv64 = kv_lens.to(torch.int64)
    j = torch.arange(q_max, device=dev)
    first_pos = kv64 - q_lens.to(torch.int64)  # [S]: the first query's position
    q_pos = first_pos[:, None] + j[None, :]  # [S, Qm]
    q_pos = q_pos.repeat(1, group)[:, :, None]  # [S, rows, 1]
    width = tables.shape[1]
    nblk = width if max_kv is None else min(width, -(-max_kv // block_size))
    m = torch.full((num_kv_heads, num_seqs, rows, 1), float("-inf"), device=dev)
    den = torch.zeros((num_kv_heads, num_seqs, rows, 1), device=dev)
    acc = torch.zeros((num_kv_heads, num_seqs, rows, head_dim), device=dev)
    if nblk == 0:
        out = acc
    else:
        used = (torch.arange(nblk, device=dev)[None, :] * block_size) < kv64[:, None]
        # unused entries may hold any value; used ones are clamped into the cache (checked
        # when the caller asked: unchecked, an id out of range reads some block, never past)
        tab = torch.where(used, tables[:, :nblk].to(torch.int64).clamp(0, k_cache.shape[0] - 1),
                          0)
        # keys per chunk: the chunk's float32 K (num_seqs * keys rows) near CHUNK_BYTES
        chunk_bytes = _chunk_bound(CHUNK_BYTES, DEVICE_CHUNK_BYTES, dev)
        chunk_scores = _chunk_bound(CHUNK_SCORES, DEVICE_CHUNK_SCORES, dev)
        keys = chunk_bytes // max(1, num_seqs * num_kv_heads * head_dim * 4)
        keys = min(keys, chunk_scores // max(1, num_kv_heads * num_seqs * rows))
        keys = max(keys, MIN_CHUNK_KEYS)
        cblk = max(1, min(nblk, keys // block_size))
        n_keys = cblk * block_size
        pad = -nblk % cblk  # pad the table to whole chunks with block 0 (masked as t >= kv_len)
        if pad:
            tab = torch.cat([tab, tab.new_zeros((num_seqs, pad))], dim=1)
        # buffers reused by every chunk: no large allocation (page faults) per chunk. Whole
        # blocks are gathered (contiguous block_size * Hkv * D runs) in the cache's layout
        # [S, keys, Hkv, D]; each kv head's matmuls read their head as a strided view.
        kb = _workspace("k", (num_seqs * cblk, block_size, num_kv_heads, head_dim),
                        torch.float32, dev)
        vb = _workspace("v", kb.shape, torch.float32, dev)
        same = k_cache.dtype == torch.float32 and v_cache.dtype == torch.float32
        gk = kb if same else _workspace("gk", kb.shape, k_cache.dtype, dev)
        gv = vb if same else _workspace("gv", kb.shape, v_cache.dtype, dev)
        k = kb.view(num_seqs, n_keys, num_kv_heads, head_dim)
        v = vb.view(num_seqs, n_keys, num_kv_heads, head_dim)
        s_buf = _workspace("s", (num_kv_heads, num_seqs, rows, n_keys), torch.float32, dev)
        for c0 in range(0, nblk, cblk):
            c = cblk
            s = s_buf
            flat = tab[:, c0:c0 + cblk].reshape(-1)
            torch.index_select(k_cache, 0, flat, out=gk)
            torch.index_select(v_cache, 0, flat, out=gv)
            if not same:
                kb.copy_(gk)
                vb.copy_(gv)
            for h in range(num_kv_heads):  # [S, rows, keys] per head, no copy of K
                torch.bmm(qh[h], k[:, :, h].transpose(1, 2), out=s_buf[h])
            if logits_soft_cap is not None:
                s = torch.tanh(s / logits_soft_cap) * logits_soft_cap
            end = (c0 + c) * block_size
            if min_end is None or end > min_end or sliding_window is not None:
                t = c0 * block_size + torch.arange(n_keys, device=dev)
                # keys some query sees: below kv_len and, with a window, past the window of
                # the first query; the rest (padding, a freed or null block) may hold NaN
                live = t[None, :] < kv64[:, None]  # [S, keys]
                if causal and sliding_window is not None:
                    live = live & (t[None, :] > first_pos[:, None] - sliding_window)
                vis = live[:, None, :]
                if causal:
                    vis = vis & (t[None, None, :] <= q_pos)
                    if sliding_window is not None:
                        vis = vis & (t[None, None, :] > q_pos - sliding_window)
                s = s.masked_fill(~vis[None], float("-inf"))
                v.masked_fill_(~live[:, :, None, None], 0.0)
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            m_safe = torch.where(m_new == float("-inf"), 0.0, m_new)
            p = s.sub_(m_safe).exp_()  # s is this chunk's own buffer
            alpha = torch.exp(m - m_safe)
            den = den * alpha + p.sum(-1, keepdim=True)
            acc.mul_(alpha)
            for h in range(num_kv_heads):
                acc[h].baddbmm_(p[h], v[:, :, h])
            m = m_new
        seen = ~(den <= 0)  # a NaN sum (a NaN in the KV read) counts: out and lse NaN
        div = torch.where(seen, den, 1.0)
        out = acc / (div if out_scale is None else div / out_scale)
        m = torch.where(seen, m + torch.log(torch.where(seen, den, 1.0)), float("-inf"))
    lse = m[..., 0]
    out = (out.view(num_kv_heads, num_seqs, group, q_max, head_dim).permute(1, 3, 0, 2, 4)
           .reshape(num_seqs, q_max, num_q_heads, head_dim))
    lse = (lse.view(num_kv_heads, num_seqs, group, q_max).permute(1, 3, 0, 2)
           .reshape(num_seqs, q_max, num_q_heads))
    return out, lse


def _q_lens(cu: torch.Tensor) -> torch.Tensor:
    return cu[1:].to(torch.int64) - cu[:-1].to(torch.int64)


def _token_seqs(cu: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Per token t, its sequence s (cu[s] <= t < cu[s + 1]), in [0, num_seqs) whatever cu
    holds: on a device cu is checked only on request (a check is a host sync), and
    repeat_interleave(output_size=) asserts on the device when the lengths disagree with it."""
    t = torch.arange(num_tokens, device=cu.device)
    seq = torch.searchsorted(cu[1:].to(torch.int64).contiguous(), t, right=True)
    return seq.clamp_(max=max(cu.shape[0] - 2, 0))


def _ragged_rows(cu: torch.Tensor, num_tokens: int, q_max: int):
    """Per token: padded row index seq * q_max + j (q_max >= every sequence's q_len), and
    q_lens, on cu's device. With at least one sequence the rows stay inside the
    num_seqs * q_max padded ones whatever cu holds (the results of such cu are unspecified)."""
    q_lens = _q_lens(cu)
    seq = _token_seqs(cu, num_tokens)
    j = torch.arange(num_tokens, device=cu.device) - cu.to(torch.int64)[seq]
    return seq * q_max + j.clamp_(0, q_max - 1), q_lens


def _bounds(kv_lens: torch.Tensor | None, q_lens: torch.Tensor | None, causal: bool):
    """(most keys, the least key end of a live row) from host copies of the lengths, or
    (None, None) when they are not on the host."""
    if kv_lens is None or kv_lens.numel() == 0:
        return None, None
    kv = kv_lens.to(torch.int64)
    max_kv = int(kv.max())
    live = q_lens > 0
    if not bool(live.any()):
        return max_kv, None
    end = (kv - q_lens + 1) if causal else kv
    return max_kv, int(end[live].min())


# ------------------------------------------------- CPU attention with host metadata

#: Bytes of float32 K plus V gathered per call of torch's fused CPU kernel (whole blocks of a
#: few row blocks; a longer sequence is split into key chunks merged by LSE).
FLASH_CHUNK_BYTES = 4 << 20
#: The same for the dense path (one row block's keys per gather, its matmuls want many keys).
DENSE_CHUNK_BYTES = 16 << 20
#: Fewest rows per kv head (queries x group) for the dense path (_dense_chunk: large
#: matmuls per head) instead of torch's fused kernel (small matmuls per row block and head).
DENSE_MIN_ROWS = 64
#: Score elements of one dense tile (rows x keys of one head), kept in cache.
DENSE_SCORES = 1 << 18
#: Fewest rows per kv head for torch's fused kernel again, over key chunks of
#: FLASH_PREFILL_CHUNK_BYTES (a cascade's prefix tile of many tokens): interleaved, one thread,
#: 8 kv heads x 128, float32, 2048 keys, dense / fused: 128 rows (4096 keys) 31 / 35 ms, 256
#: rows 30 / 25, 512 rows 49 / 44, 1024 rows 95 / 72, 2048 rows 189 / 142 (medians of 7).
FLASH_MIN_ROWS = 256
_LN2 = math.log(2.0)


def _flash_cpu():
    """torch's fused CPU attention kernel (blocked QK^T, softmax and PV in one pass, with the
    log-sum-exp), or None where this torch lacks it."""
    try:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    except (AttributeError, RuntimeError):
        return None


def _host_path(q: torch.Tensor, logits_soft_cap: float | None) -> bool:
    """Whether _attend_host serves this call (the caller also checks its metadata is on the
    host): CPU tensors, no soft cap, torch's fused CPU kernel present."""
    return q.device.type == "cpu" and logits_soft_cap is None and _flash_cpu() is not None


def _dense_chunk(out: torch.Tensor, lse: torch.Tensor, qs: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, seen: list[int]) -> None:
    """Attention of many rows per kv head: per head one matmul for the scores of a tile that
    stays in cache, an exact softmax in base 2 (exp2 is cheaper than exp), one matmul with V.

    qs: f32[m, Hkv, R, D], already scaled by scale / ln 2; k, v: f32[m, keys, Hkv, D]; row
    block i sees keys [0, seen[i]). Writes out f32[m, Hkv, R, D] and lse f32[m, Hkv, R]
    (natural log; out 0 and lse -inf where seen[i] == 0).
    """
    m, num_kv_heads, rows, _ = qs.shape
    for i in range(m):
        n = seen[i]
        if n == 0:
            out[i].zero_()
            lse[i].fill_(float("-inf"))
            continue
        rc = max(1, min(rows, DENSE_SCORES // n))
        for r0 in range(0, rows, rc):
            r1 = min(rows, r0 + rc)
            s = _workspace("ds", (r1 - r0, n), torch.float32, qs.device)
            for h in range(num_kv_heads):
                torch.mm(qs[i, h, r0:r1], k[i, :n, h].T, out=s)
                mx = s.amax(-1, keepdim=True)
                den = s.sub_(mx).exp2_().sum(-1, keepdim=True)
                o = out[i, h, r0:r1]
                torch.mm(s, v[i, :n, h], out=o)
                o.div_(den)
                torch.mul(mx.add_(den.log2_()), _LN2, out=lse[i, h, r0:r1, None])


def _attend_host(out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, tables: torch.Tensor, lens: list[int],
                 scale: float, dense: bool | None = None,
                 chunk_bytes: int | None = None) -> None:
    """Non-causal attention of row block i to the first lens[i] keys of tables[i]'s blocks,
    on the CPU with host metadata (lens a list).

    q: f32[n, Hkv, R, D] (R rows per kv head, all seeing the same keys). Writes out
    f32[n, Hkv, R, D] and lse f32[n, Hkv, R] (out 0 and lse -inf for rows with no key).
    The blocks of a few row blocks at a time are gathered whole into a float32 buffer that
    stays in cache; each kv head is a strided view of it, read by torch's fused CPU kernel
    (few rows per head: decode), by _dense_chunk (DENSE_MIN_ROWS rows: a shared prefix's
    decodes) or by the fused kernel over FLASH_PREFILL_CHUNK_BYTES key chunks (FLASH_MIN_ROWS
    rows: a prefix tile of long chunks). Key chunks of a long sequence are merged by LSE.
    ``dense``, ``chunk_bytes``: the path and the bytes of K plus V per chunk, when the caller
    knows better (None: by rows per head; the path's default).
    """
    n, num_kv_heads, rows_per_head, head_dim = q.shape
    if q.stride(-1) != 1:  # torch's fused CPU kernel misreads a q strided along head_dim
        q = q.contiguous()
    block_size = k_cache.shape[1]
    blocks = [-(-kv // block_size) for kv in lens]
    nblk = max(blocks, default=0)
    if nblk == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return
    if dense is None:
        dense = DENSE_MIN_ROWS <= rows_per_head < FLASH_MIN_ROWS
        if rows_per_head >= max(FLASH_MIN_ROWS, DENSE_MIN_ROWS) and chunk_bytes is None:
            chunk_bytes = FLASH_PREFILL_CHUNK_BYTES
    # own buffers per path and chunk size: no reallocation between them (a mixed batch
    # alternates the decodes' small chunks and the prefill tiles' large ones)
    tag = ("dense_" if dense else "flash_") + ("" if chunk_bytes is None else f"{chunk_bytes}_")
    if chunk_bytes is None:
        chunk_bytes = DENSE_CHUNK_BYTES if dense else FLASH_CHUNK_BYTES
    block_bytes = 2 * block_size * num_kv_heads * head_dim * 4
    budget = max(1, chunk_bytes // block_bytes)
    cblk = min(nblk, budget)  # key blocks per chunk
    row_blocks = 1 if dense else max(1, budget // cblk)  # row blocks per chunk
    tab = tables[:, :nblk].to(torch.int64)
    used = torch.arange(nblk)[None, :] < torch.tensor(blocks)[:, None]
    # entries past the used blocks may hold anything; used ones clamped into the cache
    tab = torch.where(used, tab.clamp(0, k_cache.shape[0] - 1), 0)
    same = k_cache.dtype == torch.float32 and v_cache.dtype == torch.float32
    qs = q * (scale / _LN2) if dense else q  # base-2 logits
    flash = _flash_cpu()
    for s0 in range(0, n, row_blocks):
        s1 = min(n, s0 + row_blocks)
        m = s1 - s0
        for b0 in range(0, nblk, cblk):
            c = min(cblk, nblk - b0)
            keys = c * block_size
            shape = (m * c, block_size, num_kv_heads, head_dim)
            kb = _workspace(tag + "k", shape, torch.float32, q.device)
            vb = _workspace(tag + "v", shape, torch.float32, q.device)
            gk = kb if same else _workspace(tag + "gk", shape, k_cache.dtype, q.device)
            gv = vb if same else _workspace(tag + "gv", shape, v_cache.dtype, q.device)
            flat = tab[s0:s1, b0:b0 + c].reshape(-1)
            torch.index_select(k_cache, 0, flat, out=gk)
            torch.index_select(v_cache, 0, flat, out=gv)
            if not same:
                kb.copy_(gk)
                vb.copy_(gv)
            k = kb.view(m, keys, num_kv_heads, head_dim)
            v = vb.view(m, keys, num_kv_heads, head_dim)
            seen = [min(max(kv - b0 * block_size, 0), keys) for kv in lens[s0:s1]]
            first = b0 == 0  # the first key chunk writes the outputs, later ones merge
            o, lg = (out[s0:s1], lse[s0:s1]) if first else (torch.empty_like(out[s0:s1]),
                                                            torch.empty_like(lse[s0:s1]))
            if dense:  # reads keys [0, seen) only: no mask, padding never read
                _dense_chunk(o, lg, qs[s0:s1], k, v, seen)
            else:
                mask = None
                if min(seen) < keys:  # padding slots may hold NaN: zero them, mask them out
                    live = torch.arange(keys)[None, :] < torch.tensor(seen)[:, None]
                    k.masked_fill_(~live[:, :, None, None], 0.0)
                    v.masked_fill_(~live[:, :, None, None], 0.0)
                    mask = torch.zeros((m, 1, 1, keys), dtype=torch.float32)
                    mask.masked_fill_(~live[:, None, None, :], float("-inf"))
                fo, fl = flash(q[s0:s1], k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                               scale=scale)
                if min(seen) == 0:  # rows with no key here: the kernel gives lse 0, not -inf
                    fl.masked_fill_((torch.tensor(seen) == 0)[:, None, None], float("-inf"))
                o.copy_(fo)
                lg.copy_(fl)
            if not first:
                merge_attention_states(out[s0:s1], lse[s0:s1], out[s0:s1], lse[s0:s1], o, lg)


#: Bytes of int32 indices per step of the CPU fp8 table lookup (_dequantize): stays in L2.
DEQUANTIZE_CHUNK_BYTES = 1 << 20


def _dequantize(cache: torch.Tensor, scale: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
    """float32(cache) * scale in ``dtype``; with ``scale`` None the e4m3 values themselves,
    exact in every float dtype (what the attention paths read: _fp8_scales). With a scale,
    the value is rounded to ``dtype`` (q's) after the multiply: what the custom ops still hand
    a backend that reads no fp8 (torch_frontend._ops), not exact for 16-bit dtypes.

    On the CPU by a table of that value for each of the 256 bytes (the same arithmetic, once
    per byte value), looked up with index_select in chunks: torch's CPU float8 conversion is
    scalar code, ~3 ns an element here against ~0.8 for the lookup (one thread; the three
    passes convert, scale, round took ~34 ms of a 512-token fp8 prefill over 4096 cached)."""
    if cache.device.type != "cpu":
        if scale is None:
            return cache.to(dtype)  # exact: every e4m3 value is one of dtype's
        return (cache.to(torch.float32) * scale).to(dtype)
    table = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
    if scale is not None:
        table = table * scale
    table = table.to(dtype)
    src = cache.view(torch.uint8).reshape(-1)  # a copy only for a view of strided blocks
    out = torch.empty(src.shape, dtype=dtype)
    step = DEQUANTIZE_CHUNK_BYTES // 4
    idx = torch.empty(min(step, src.numel()), dtype=torch.int32)
    for i in range(0, src.numel(), step):
        n = min(step, src.numel() - i)
        idx[:n].copy_(src[i:i + n])
        torch.index_select(table, 0, idx[:n], out=out[i:i + n])
    return out.view(cache.shape)


def _dequantized_blocks(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        k_scale, v_scale, *tables: torch.Tensor):
    """fp8 caches as caches in q's dtype for the attention backends: (k, v, tables) where k, v
    hold the dequantized blocks the tables name (_dequantize; this module's attention paths
    pass k_scale, v_scale None, the exact e4m3 values, and apply the scales by _fp8_scales),
    in table order, and each table is remapped to them (no host sync: fixed shapes,
    graph-safe); when the tables name at least as many entries as the cache has blocks, the
    whole cache dequantized and the tables unchanged. Entries past a row's blocks (never read)
    are clamped into range before the gather."""
    num_blocks = k_cache.shape[0]
    total = sum(t.numel() for t in tables)
    if 0 < total < num_blocks:
        ids = torch.cat([t.reshape(-1) for t in tables]).to(torch.int64).clamp(0, num_blocks - 1)
        k_cache, v_cache = (c.view(torch.uint8).index_select(0, ids).view(c.dtype)
                            for c in (k_cache, v_cache))
        remapped, start = [], 0
        for t in tables:
            remapped.append((torch.arange(t.numel(), dtype=torch.int32, device=t.device)
                             + start).view(t.shape))
            start += t.numel()
        tables = tuple(remapped)
    return (_dequantize(k_cache, k_scale, q.dtype), _dequantize(v_cache, v_scale, q.dtype),
            *tables)


def _fp8_scales(scale: float, k_scale, v_scale):
    """(logits' scale, output scale) of attention over fp8 blocks dequantized without their
    scales (_dequantized_blocks with None: the e4m3 values, exact in q's dtype), as the
    Triton kernel reads them: q.(k * k_scale) * scale = (q.k) * (scale * k_scale) (soft cap
    and window see the same logits), and sum p (v * v_scale) = v_scale * sum p v, applied to
    the float32 output before its one rounding to q's dtype (lse unchanged). Dequantizing
    into q's dtype with the scales rounded every scaled key: a bfloat16 q fell outside
    ATTENTION_TOLERANCE (logits ~30 moved by ~0.06). k_scale, v_scale: None (1.0), floats or
    0-d float32 tensors; CPU tensors become floats (no sync there), device ones stay 0-d
    tensors (no host sync: CUDA graphs) and so does the logits' scale then."""
    if isinstance(k_scale, torch.Tensor) and k_scale.device.type != "cpu":
        scale = k_scale * scale  # a 0-d float32 tensor on the device
    elif k_scale is not None:
        scale = scale * float(k_scale)
    if isinstance(v_scale, torch.Tensor) and v_scale.device.type == "cpu":
        v_scale = float(v_scale)
    return scale, v_scale


def _host_scales(k_scale, v_scale) -> tuple[float, float] | None:
    """k_scale, v_scale (None or 0-d float32 tensors) as host floats for the compiled decode
    kernel; None when one is on a device (its value would need a sync)."""
    got = []
    for scale in (k_scale, v_scale):
        if scale is None:
            got.append(1.0)
        elif scale.device.type != "cpu":
            return None
        else:
            got.append(float(scale))
    return got[0], got[1]


_C_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _cache_strides(k_cache: torch.Tensor,
                   v_cache: torch.Tensor) -> tuple[int, int, int] | None:
    """The strides in elements (block, token of a block, kv head of a token) that both caches
    share when each head's head_dim elements are dense: a contiguous cache, a view such as
    ``kv[:, 0]`` of a stacked [num_blocks, 2, ...] cache (FlashInfer's layout) or an HND cache's
    NHD view ``cache.permute(0, 2, 1, 3)``, read in place; None otherwise (a zero stride of an
    expanded dim included). A dim of size 1 takes its dense stride."""
    stride = k_cache.stride()
    if k_cache.shape != v_cache.shape or stride != v_cache.stride():
        return None
    num_blocks, block_size, heads, head_dim = k_cache.shape
    sb, st, sh, sd = stride
    if head_dim > 1 and sd != 1:
        return None
    if heads <= 1:
        sh = head_dim
    if block_size <= 1:
        st = heads * head_dim
    if num_blocks <= 1:
        sb = block_size * heads * head_dim
    return (sb, st, sh) if sb >= 1 and st >= 1 and sh >= 1 else None


_DECODE: dict = {}  # the kernels.cpu.decode module, imported on the first decode


def _c_decode(out, lse, q, k_cache, v_cache, block_tables, kv_lens, scale, window,
              soft_cap, *, k_scale: float = 1.0, v_scale: float = 1.0) -> bool:
    """Decode attention by the compiled CPU kernel (kernels/cpu/decode.py) when every tensor is
    a CPU tensor it takes (contiguous; the caches with dense heads, see _cache_strides); False
    (nothing written) otherwise. The caches hold q's
    dtype, or float8_e4m3fn read as value * k_scale / v_scale (host floats). The sequences
    are split over torch.get_num_threads() threads. Measured decode 8 x 4096, 32/8 heads,
    head_dim 128, one thread: see bench/bench_torch_attention.py."""
    dtype = _C_DTYPES.get(q.dtype)
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    # out: q's dtype, or float32 (a 16-bit q's cascade own part, unrounded for its merge)
    if (dtype is None or k_cache.dtype not in (q.dtype, torch.float8_e4m3fn)
            or v_cache.dtype != k_cache.dtype or out.dtype not in (q.dtype, torch.float32)
            or block_tables.dtype != torch.int32 or kv_lens.dtype != torch.int32
            or (lse is not None and lse.dtype != torch.float32)):
        return False
    others = (q, block_tables, kv_lens, out) + (() if lse is None else (lse,))
    if not (k_cache.is_cpu and v_cache.is_cpu and all(t.is_cpu for t in others)):
        return False
    strides = _cache_strides(k_cache, v_cache)
    if strides is None or not all(t.is_contiguous() for t in (q, out, lse) if t is not None):
        return False
    # a column slice of a wider table (or a strided kv_lens) copied, as a plan owns its
    # metadata: the kernel, not the torch path, runs it, bit for bit the plan's result
    block_tables, kv_lens = block_tables.contiguous(), kv_lens.contiguous()
    decode = _DECODE.get("module")
    if decode is None:
        from ..kernels.cpu import decode
        _DECODE["module"] = decode
    if not decode.available():
        return False
    if lse is None:
        lse = _workspace("c_decode_lse", q.shape[:2], torch.float32, q.device)
    num_seqs, num_q_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    dims = (num_seqs, num_q_heads, head_dim, num_blocks, block_size, num_kv_heads,
            block_tables.shape[1], *strides)
    decode.decode_attention(dtype, dims, q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                            block_tables.data_ptr(), kv_lens.data_ptr(), out.data_ptr(),
                            lse.data_ptr(), scale=scale, sliding_window=window,
                            logits_soft_cap=soft_cap, threads=torch.get_num_threads(),
                            kv_dtype="float8_e4m3fn" if fp8 else dtype,
                            out_f32=out.dtype != q.dtype,
                            k_scale=float(k_scale), v_scale=float(v_scale))
    return True


def _c_ragged(out, lse, q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens, scale, causal,
              window, soft_cap, *, k_scale: float = 1.0, v_scale: float = 1.0) -> bool:
    """A ragged batch (host lengths) by the compiled decode kernel, each query token a
    sequence of its own: token j of sequence s (q_len n) attends to the first kv_lens[s] - n +
    j + 1 keys of s's blocks (all kv_lens[s] when not causal), the causal mask and the window
    as the kernel applies them to a decode. q, out and lse stay in token order; only the
    tables are copied per token. Each token reads its keys once, so this is for short
    prefills (RAGGED_DECODE_MAX_Q). False (nothing written) when the kernel cannot run or the
    lengths are not a valid ragged batch (unchecked: the padded path handles them)."""
    if not _on_host(q, block_tables):  # the lengths alone read back from a device
        return False
    cu = cu_q_lens.to(torch.int64).numpy()
    num_tokens, num_seqs = q.shape[0], block_tables.shape[0]
    if not cumulative_ok(cu.tolist(), num_tokens):
        return False
    seq = np.repeat(np.arange(num_seqs), np.diff(cu))
    kv = kv_lens.to(torch.int64).numpy()[seq]
    if causal:
        kv = kv - (cu[seq + 1] - 1 - np.arange(num_tokens))
    tables = block_tables.index_select(0, torch.from_numpy(seq))
    kv_t = torch.from_numpy(np.clip(kv, 0, None).astype(np.int32))
    return _c_decode(out, lse, q, k_cache, v_cache, tables, kv_t, scale,
                     window if causal else None, soft_cap, k_scale=k_scale, v_scale=v_scale)


#: Longest q_len of a ragged batch (host lengths) that runs as decodes of the compiled kernel
#: (_c_ragged) rather than as groups (_grouped_attention: the decodes by the kernel, each
#: group of prefills padded, or in tiles from FLASH_PREFILL_MIN): float32 q and caches, and
#: 16-bit or fp8 caches. Measured here, one thread, 32 q / 8 kv heads, head_dim 128, 8
#: decodes + one chunk of n tokens, all at context C, groups / kernel: float32 C 64 2.8x (n
#: 2) to 2.1x (n 16); C 512 1.8x to 1.2x; C 2048 1.4x to 1.0x (n 16), 0.86x at n 31.
#: bfloat16 C 64 3.3x to 2.5x (n 31); C 512 2.2x to 1.3x (n 32); C 2048 1.7x (n 2) to 1.2x
#: (n 32), 1.0x at n 64.
RAGGED_DECODE_MAX_Q = 16
RAGGED_DECODE_16BIT_MAX_Q = 32


def _ragged_decode_max_q(k_cache: torch.Tensor) -> int:
    return RAGGED_DECODE_MAX_Q if k_cache.dtype == torch.float32 else RAGGED_DECODE_16BIT_MAX_Q


#: Query tokens per tile, and bytes of float32 K plus V per key chunk, of a long causal prefill
#: run by torch's fused CPU kernel (_flash_prefill_tile).
FLASH_PREFILL_TILE = 512
FLASH_PREFILL_CHUNK_BYTES = 32 << 20
#: Fewest query tokens of a sequence whose causal prefill runs _flash_prefill_tile (fewer: the
#: padded batch, one call for many short sequences). Measured here, one thread, 32 q / 8 kv
#: heads, head_dim 128, one sequence over 2048 cached: padded / flash 17.9 / 13.4 ms at 8
#: tokens, 36.0 / 28.0 at 32, 170.9 / 92.6 at 128 (float32; bfloat16 1.33-1.49x).
FLASH_PREFILL_MIN = 32


def _flash_prefill(q: torch.Tensor, sliding_window: int | None,
                   logits_soft_cap: float | None) -> bool:
    """Whether _tiled_prefill runs its tiles by torch's fused CPU kernel (_flash_prefill_tile):
    the host path with no window (its mask is causal only)."""
    return sliding_window is None and _host_path(q, logits_soft_cap)


def _long_prefill_min(q: torch.Tensor, sliding_window: int | None,
                      logits_soft_cap: float | None) -> int:
    """Fewest query tokens of a sequence that _tiled_prefill runs in tiles of its own: those of
    torch's fused CPU kernel (_flash_prefill) from FLASH_PREFILL_MIN, else the padded tiles
    past PREFILL_Q_TILE."""
    if _flash_prefill(q, sliding_window, logits_soft_cap):
        return FLASH_PREFILL_MIN
    return PREFILL_Q_TILE + 1


def _flash_prefill_tile(out: torch.Tensor, lse: torch.Tensor | None, q: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                        before: int, scale: float, out_scale=None) -> None:
    """Causal attention of n consecutive query tokens of one sequence whose first sees keys
    [0, before] (host ints, CPU tensors): every row sees the ``before`` keys in front of the
    tile, and row j the tile's own keys before + 0 .. before + j. Two passes of torch's fused
    CPU kernel, merged by LSE: the keys in front with no mask (the kv head's q heads x tokens
    as one row block each: K and V read once per kv head; _attend_host), and the tile's own
    square with ``is_causal`` (its kernel skips the blocks above the diagonal; K and V of n
    tokens expanded to the q heads). out: q's shape and dtype; lse float32 or None;
    ``out_scale``: as _merge_states' (fp8 blocks read unscaled).

    In place of the masked online softmax of _attend_padded for such tiles. Measured here (one
    thread, float32, 32 q / 8 kv heads, head_dim 128; bench_torch_attention.py): 512 tokens
    over 4096 cached 1.28 s -> 0.77-0.82 s (0.87x -> 1.49x the gather + SDPA baseline, 42% ->
    68% of the measured matmul rate), all 4608 from scratch 6.05 -> 3.9 s, a mixed step of 63
    decodes and a 256-token chunk 539 -> 367 ms. Tiles of 256 and 1024 tokens measured within
    noise of 512 (one run each)."""
    n, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    # contiguous: torch's fused CPU kernel misreads a q strided along head_dim (a float32 q
    # passes .to as it is)
    qf = q.to(torch.float32).contiguous()
    # keys in front: [1, Hkv, G * n, D], row g * n + j (unchecked lengths kept in the table)
    qa = qf.reshape(n, num_kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(
        1, num_kv_heads, group * n, head_dim)
    oa = torch.empty_like(qa)
    la = torch.empty(qa.shape[:3], dtype=torch.float32)
    front = min(max(before, 0), table.shape[1] * block_size)
    _attend_host(oa, la, qa, k_cache, v_cache, table, [front], scale, dense=False,
                 chunk_bytes=FLASH_PREFILL_CHUNK_BYTES)
    # the tile's own keys (columns and block ids kept inside the table and the cache; a
    # table of no column, unchecked metadata, reads block 0)
    if table.shape[1] == 0:
        table = table.new_zeros((1, 1))
    pos = torch.arange(before, before + n)
    col = torch.div(pos, block_size, rounding_mode="floor").clamp(0, table.shape[1] - 1)
    blk = table[0, col].to(torch.int64).clamp(0, k_cache.shape[0] - 1)
    off = pos % block_size

    def own(cache):  # [1, Hq, n, D] float32: each kv head's keys for its group's q heads
        x = cache[blk, off].to(torch.float32).permute(1, 0, 2)  # [Hkv, n, D]
        return x[:, None].expand(num_kv_heads, group, n, head_dim).reshape(
            1, num_q_heads, n, head_dim)

    ob, lb = _flash_cpu()(qf.permute(1, 0, 2)[None], own(k_cache), own(v_cache),
                          is_causal=True, scale=scale)[:2]
    lse_buf = lse if lse is not None else torch.empty((n, num_q_heads), dtype=torch.float32)
    _merge_states(
        out, lse_buf,
        oa.view(num_kv_heads, group, n, head_dim).permute(2, 0, 1, 3).reshape(
            n, num_q_heads, head_dim),
        la.view(num_kv_heads, group, n).permute(2, 0, 1).reshape(n, num_q_heads),
        ob[0].permute(1, 0, 2), lb[0].permute(1, 0), out_scale=out_scale)


#: Query tokens per tile of a long causal prefill on the host path (see _tiled_prefill).
PREFILL_Q_TILE = 256
#: Bytes of float32 queries padded to [num_seqs, num_tokens, Hq, D] above which the path with
#: its metadata on a device reads the lengths back to the host (a sync, so not inside a CUDA
#: graph) instead: 256 sequences of a 2048-token batch at 32 x 128 heads would pad to 8 GiB.
PAD_SYNC_BYTES = 256 << 20


def _padding_needs_sync(groups: int, q: torch.Tensor) -> bool:
    """Whether ``groups`` groups of queries each padded to q's token count pass
    PAD_SYNC_BYTES (as float32)."""
    num_tokens, num_q_heads, head_dim = q.shape
    return groups * num_tokens * num_q_heads * head_dim * 4 > PAD_SYNC_BYTES


def _tiled_prefill(out: torch.Tensor, lse: torch.Tensor | None, q, k_cache, v_cache,
                   block_tables, kv_lens, cu_q_lens, *, scale: float,
                   sliding_window: int | None, logits_soft_cap: float | None, k_scale=None,
                   v_scale=None) -> None:
    """Causal prefill with host metadata and a long sequence (_long_prefill_min query tokens
    or more): the short sequences as one padded batch, each long one in tiles, by torch's
    fused CPU kernel (_flash_prefill_tile, tiles of FLASH_PREFILL_TILE tokens) where it
    serves, else padded tiles of PREFILL_Q_TILE tokens, a tile attending only to the keys its
    last row sees. The padded path gives every
    row all of its sequence's keys (masked), so a prefill from scratch did twice the work, with
    score tiles of all the sequence's rows. Measured, one thread, 32 q / 8 kv heads: 4608
    tokens from scratch 12.4 s -> 3.6 s (f32), 14.1 s -> 4.0 s (bf16); tiles of 128 and 512
    tokens were 5-10% slower, 64 and 32 slower still."""
    cu = cu_q_lens.tolist()  # host copies (the caller's, when the metadata is on a device)
    kv = kv_lens.tolist()
    meta = block_tables.device
    q_lens = [b - a for a, b in zip(cu[:-1], cu[1:], strict=True)]
    long_min = _long_prefill_min(q, sliding_window, logits_soft_cap)
    short = [s for s, n in enumerate(q_lens) if 0 < n < long_min]
    if short:
        tok = torch.cat([torch.arange(cu[s], cu[s + 1]) for s in short]).to(q.device)
        sub_cu = torch.tensor([0, *itertools.accumulate(q_lens[s] for s in short)],
                              dtype=torch.int32, device=meta)
        idx = torch.tensor(short, device=meta)
        o = torch.empty((tok.numel(), *q.shape[1:]), dtype=out.dtype, device=out.device)
        lg = torch.empty(o.shape[:2], dtype=torch.float32, device=out.device)
        paged_attention(o, lg, q.index_select(0, tok), k_cache, v_cache,
                        block_tables.index_select(0, idx),
                        torch.tensor([kv[s] for s in short], dtype=torch.int32, device=meta),
                        sub_cu, scale=scale, causal=True, sliding_window=sliding_window,
                        logits_soft_cap=logits_soft_cap, k_scale=k_scale, v_scale=v_scale)
        out.index_copy_(0, tok, o)
        if lse is not None:
            lse.index_copy_(0, tok, lg)
    flash = _flash_prefill(q, sliding_window, logits_soft_cap)
    tile = FLASH_PREFILL_TILE if flash else PREFILL_Q_TILE
    for s, n_seq in enumerate(q_lens):
        if n_seq < long_min:
            continue
        kc, vc, table = k_cache, v_cache, block_tables[s:s + 1]
        tile_scale, out_scale = scale, None
        if kc.dtype == torch.float8_e4m3fn:  # this sequence's blocks, dequantized once
            kc, vc, table = _dequantized_blocks(q, kc, vc, None, None, table)
            tile_scale, out_scale = _fp8_scales(scale, k_scale, v_scale)
        for j0 in range(0, n_seq, tile):
            j1 = min(n_seq, j0 + tile)
            n = j1 - j0
            seen = kv[s] - n_seq + j1  # keys the tile's last row sees
            rows = slice(cu[s] + j0, cu[s] + j1)
            if flash:
                _flash_prefill_tile(out[rows], None if lse is None else lse[rows], q[rows],
                                    kc, vc, table, seen - n, tile_scale, out_scale)
                continue
            o, lg = _attend_padded(
                q[rows].unsqueeze(0), kc, vc, table,
                torch.tensor([seen], device=meta), torch.tensor([n], device=meta),
                scale=tile_scale, causal=True,
                sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                max_kv=seen, min_end=seen - n + 1, out_scale=out_scale)
            out[rows].copy_(o[0])
            if lse is not None:
                lse[rows].copy_(lg[0])


def _q_len_class(n: int) -> int:
    """0 for a decode (q_len 1), else c with 2**(c-1) < q_len <= 2**c."""
    return (n - 1).bit_length()


def _q_len_groups(q_lens: list[int]) -> list[list[int]] | None:
    """The sequences of a ragged batch (host q_lens) in groups that each pad to their own
    longest q_len: the decodes (q_len 1) alone, the others by power-of-two class of q_len (a
    group pads at most 2x), sequences with q_len 0 (padding: no query row) in none. None
    when the batch is one such group of prefills already (one class past 1, no padding
    sequence); an all-decode batch given with cu_q_lens is one group, run as a decode
    (cu_q_lens None: the compiled kernel)."""
    classes: dict[int, list[int]] = {}
    for s, n in enumerate(q_lens):
        if n > 0:
            classes.setdefault(_q_len_class(n), []).append(s)
    if len(classes) == 1 and 0 not in classes and sum(map(len, classes.values())) == len(q_lens):
        return None
    return [classes[c] for c in sorted(classes)]


def _grouped_attention(out: torch.Tensor, lse: torch.Tensor | None, q, k_cache, v_cache,
                       block_tables, kv_lens, cu_host: torch.Tensor, groups: list[list[int]],
                       *, scale: float, causal: bool, sliding_window: int | None,
                       logits_soft_cap: float | None, k_scale=None, v_scale=None) -> None:
    """paged_attention of a ragged batch as one call per group of sequences (_q_len_groups),
    each written into its rows of ``out`` and ``lse``: the decodes go through the decode path
    (the compiled kernel, cu_q_lens None), every other group pads to its own longest q_len.

    One padded call made every sequence of a mixed batch (many decodes and a prefill chunk,
    what vLLM's chunked-prefill scheduler gives) as long as the chunk. Measured here, one
    thread, f32, 8 q / 2 kv heads, head_dim 64: 63 decodes at context 512 + one 200-token
    chunk took 1983 ms and +201 MB of peak RSS padded, 48 ms and +17 MB grouped; 255 such
    decodes + a 256-token chunk 10.9 s and +1118 MB, now 100 ms and +19 MB. At 32 q / 8 kv
    heads, head_dim 128 (bench_torch_attention.py::test_cpu_mixed_decode_prefill), 63 decodes
    at 2048 + a 256-token chunk over 2048 cached: 48.7 s padded, 1.19 s grouped, 1.18 s as two
    calls. A group whose tokens are one contiguous range reads q and writes out and lse
    through views of them (a vLLM batch: the decodes first, then the prefills); others are
    gathered and scattered by token index.
    """
    cu = cu_host.to(torch.int64).numpy()
    q_lens = np.diff(cu)
    meta = block_tables.device
    for seqs in groups:
        idx = np.asarray(seqs, dtype=np.int64)
        lens = q_lens[idx]
        n = int(lens.sum())
        # the group's tokens, in order: sequence s's are cu[s] .. cu[s + 1] - 1
        tok = np.repeat(cu[idx] - (np.cumsum(lens) - lens), lens) + np.arange(n)
        decode = bool((lens == 1).all())
        sub_cu = None if decode else torch.from_numpy(
            np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)).to(meta)
        idx_t = torch.from_numpy(idx).to(meta)
        tables = block_tables.index_select(0, idx_t)
        kv = kv_lens.index_select(0, idx_t)
        if tok[-1] - tok[0] + 1 == n:  # one contiguous range of tokens: views
            rows = slice(int(tok[0]), int(tok[0]) + n)
            paged_attention(out[rows], None if lse is None else lse[rows], q[rows], k_cache,
                            v_cache, tables, kv, sub_cu, scale=scale, causal=causal,
                            sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                            k_scale=k_scale, v_scale=v_scale)
            continue
        tok_t = torch.from_numpy(tok).to(q.device)
        o = torch.empty((n, *out.shape[1:]), dtype=out.dtype, device=out.device)
        lg = None if lse is None else torch.empty((n, lse.shape[1]), dtype=lse.dtype,
                                                  device=lse.device)
        paged_attention(o, lg, q.index_select(0, tok_t), k_cache, v_cache, tables, kv, sub_cu,
                        scale=scale, causal=causal, sliding_window=sliding_window,
                        logits_soft_cap=logits_soft_cap, k_scale=k_scale, v_scale=v_scale)
        out.index_copy_(0, tok_t, o)
        if lse is not None:
            lse.index_copy_(0, tok_t, lg)


def paged_attention(out: torch.Tensor, lse: torch.Tensor | None, q, k_cache, v_cache,
                    block_tables, kv_lens, cu_q_lens, *, scale: float, causal: bool,
                    sliding_window: int | None, logits_soft_cap: float | None,
                    workspace=None, k_scale=None, v_scale=None) -> None:
    """The CPU path (and the fallback on CUDA); ``workspace`` is not used: the temporaries
    are its own. Decode on the CPU with contiguous inputs runs the compiled kernel of
    ``kernels/cpu`` (one pass over each sequence's blocks) when it builds; with the lengths on
    the host, so does a ragged batch of short sequences, a token at a time (_c_ragged), and
    the decodes and short groups of a longer one (_grouped_attention).

    float8_e4m3fn caches (k_scale, v_scale: None or 0-d float32 tensors on the caches' device):
    the compiled decode kernel reads their bytes (the decodes of a ragged batch too); every
    other path dequantizes the blocks its own sequences name first (_dequantized_blocks),
    into their exact e4m3 values, with k_scale folded into the logits' scale and the float32
    output times v_scale (_fp8_scales), as the Triton kernel reads them."""
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if (cu_q_lens is not None and q.shape[0] == block_tables.shape[0]
            and cu_q_lens.device.type == "cpu"
            and cu_q_lens.tolist() == list(range(q.shape[0] + 1))):
        cu_q_lens = None  # a decode step given with cu_q_lens (vLLM's query_start_loc)
    host_scales = _host_scales(k_scale, v_scale) if fp8 else (1.0, 1.0)
    if cu_q_lens is None and host_scales is not None and _c_decode(
            out, lse, q, k_cache, v_cache, block_tables, kv_lens, scale,
            sliding_window if causal else None, logits_soft_cap, k_scale=host_scales[0],
            v_scale=host_scales[1]):
        return
    num_tokens, num_q_heads, head_dim = q.shape
    num_seqs = block_tables.shape[0]
    if num_seqs == 0:  # tokens of no sequence (unchecked cu_q_lens): no keys, no rows to pad
        out.zero_()
        if lse is not None:
            lse.fill_(float("-inf"))
        return
    host = _on_host(kv_lens, block_tables) and (cu_q_lens is None or _on_host(cu_q_lens))
    kv_host = kv_lens if host else None  # the lengths on the host, when known there
    if cu_q_lens is None:
        q_lens = torch.ones(num_seqs, dtype=torch.int64, device=q.device)
        q_lens_host = q_lens if host else None
        qp, rows = q.view(num_seqs, 1, num_q_heads, head_dim), None
    else:
        cu_host = cu_q_lens if host else None
        if not host and _padding_needs_sync(num_seqs, q):
            # padding every sequence to the batch's token count would not fit: read the
            # lengths back (one small copy, a sync) and pad to the longest sequence instead
            # (unchecked lengths clipped to the table's keys: the host routes loop over them)
            kv_lens = kv_lens.clamp(max=block_tables.shape[1] * k_cache.shape[1])
            cu_host, kv_host = cu_q_lens.cpu(), kv_lens.cpu()
        if cu_host is not None and not cumulative_ok(cu_host.tolist(), num_tokens):
            # unchecked cu_q_lens that are no ragged batch (value checks off): the path the
            # device takes for any metadata (results unspecified, accesses bounded), never a
            # host route sized by such lengths
            cu_host = kv_host = None
        if cu_host is None:  # on a device, no sync: the bound every batch satisfies
            q_max, q_lens_host = max(num_tokens, 1), None
        else:
            q_lens_host = _q_lens(cu_host)
            host_lens = q_lens_host.tolist()
            q_max = max(max(host_lens, default=0), 1)
            if (q_max <= _ragged_decode_max_q(k_cache) and kv_host is not None
                    and host_scales is not None and _c_ragged(
                        out, lse, q, k_cache, v_cache, block_tables, kv_host, cu_host, scale,
                        causal, sliding_window, logits_soft_cap, k_scale=host_scales[0],
                        v_scale=host_scales[1])):
                return
            if causal and q_max >= _long_prefill_min(q, sliding_window, logits_soft_cap):
                _tiled_prefill(out, lse, q, k_cache, v_cache, block_tables, kv_host, cu_host,
                               scale=scale, sliding_window=sliding_window,
                               logits_soft_cap=logits_soft_cap, k_scale=k_scale,
                               v_scale=v_scale)
                return
            groups = _q_len_groups(host_lens)
            if groups is not None:
                _grouped_attention(out, lse, q, k_cache, v_cache, block_tables, kv_lens,
                                   cu_host, groups, scale=scale, causal=causal,
                                   sliding_window=sliding_window,
                                   logits_soft_cap=logits_soft_cap, k_scale=k_scale,
                                   v_scale=v_scale)
                return
        rows, q_lens = _ragged_rows(cu_q_lens, num_tokens, q_max)
        qp = q.new_zeros((num_seqs * q_max, num_q_heads, head_dim))
        qp.index_copy_(0, rows, q)
        qp = qp.view(num_seqs, q_max, num_q_heads, head_dim)
    out_scale = None
    if fp8:  # a leaf: the blocks this call's sequences name, dequantized (exact, unscaled)
        k_cache, v_cache, block_tables = _dequantized_blocks(q, k_cache, v_cache, None, None,
                                                             block_tables)
        scale, out_scale = _fp8_scales(scale, k_scale, v_scale)
    max_kv, min_end = _bounds(kv_host, q_lens_host, causal)
    o, l_ = _attend_padded(qp, k_cache, v_cache, block_tables, kv_lens, q_lens, scale=scale,
                           causal=causal, sliding_window=sliding_window,
                           logits_soft_cap=logits_soft_cap, max_kv=max_kv, min_end=min_end,
                           out_scale=out_scale)
    o = o.reshape(-1, num_q_heads, head_dim)
    l_ = l_.reshape(-1, num_q_heads)
    if rows is not None:
        o, l_ = o.index_select(0, rows), l_.index_select(0, rows)
    out.copy_(o)
    if lse is not None:
        lse.copy_(l_)


paged_attention.reads_fp8 = True


#: Bytes of float32 rows per chunk of merge_attention_states (its temporaries stay in cache).
MERGE_CHUNK_BYTES = 2 << 20


def merge_attention_states(out: torch.Tensor, lse: torch.Tensor, out_a, lse_a, out_b,
                           lse_b) -> None:
    """out = c_a out_a + c_b out_b with c = e^(lse - m) / sum (_merge_states)."""
    _merge_states(out, lse, out_a, lse_a, out_b, lse_b)


def _merge_states(out: torch.Tensor, lse: torch.Tensor, out_a, lse_a, out_b, lse_b,
                  out_scale=None) -> None:
    """out = c_a out_a + c_b out_b with c = e^(lse - m) / sum; rows empty on both sides
    (lse -inf, or +inf: FlashAttention-2's empty rows) get c = 0, so out 0 and lse -inf. An
    empty state's out is not read (its rows may hold anything: 0 * NaN would be NaN).

    Chunks of tokens at a time (about MERGE_CHUNK_BYTES of float32 rows): a multiply and a
    multiply-add on the same chunk while it is in cache, into a float32 output itself, else
    into a reused float32 buffer then converted; inputs that are not float32 are converted
    into reused float32 buffers first (torch's conversion copies are fast; mixed-dtype
    arithmetic and fresh full-size temporaries are not). ``out_scale`` (None, a float or a
    0-d float32 tensor): out times it, folded into c_a and c_b (the v_scale of fp8 blocks
    read unscaled, _fp8_scales; lse unchanged).
    """
    inf = float("inf")
    lse_a, lse_b = (torch.where(x == inf, -inf, x) for x in (lse_a, lse_b))  # +inf: FA2's empty
    m = torch.maximum(lse_a, lse_b)
    seen = m != float("-inf")  # NaN (a NaN state) counts: out and lse NaN
    m0 = torch.where(seen, m, 0.0)
    wa, wb = torch.exp(lse_a - m0), torch.exp(lse_b - m0)  # e^-inf = 0 for an empty side
    den = wa + wb
    inv = torch.where(seen, den.reciprocal(), 0.0)
    if out_scale is not None:
        inv = inv * out_scale
    ca, cb = (wa * inv).unsqueeze(-1), (wb * inv).unsqueeze(-1)
    empty_a, empty_b = ((x == -inf).unsqueeze(-1) for x in (lse_a, lse_b))
    num_tokens = out.shape[0]
    step = max(1, _chunk_bound(MERGE_CHUNK_BYTES, DEVICE_MERGE_CHUNK_BYTES, out.device)
               // max(1, math.prod(out.shape[1:]) * 4))
    f32 = torch.float32
    rows = (min(step, num_tokens), *out.shape[1:])
    fa = None if out.dtype == f32 else _workspace("merge_a", rows, f32, out.device)
    fb = _workspace("merge_b", rows, f32, out.device)
    for t0 in range(0, num_tokens, step):
        t1 = min(num_tokens, t0 + step)
        o = out[t0:t1]
        acc = o if fa is None else fa[:t1 - t0]  # float32: written in place
        if out_a.dtype == f32:
            torch.mul(out_a[t0:t1], ca[t0:t1], out=acc)
        else:
            acc.copy_(out_a[t0:t1]).mul_(ca[t0:t1])
        acc.masked_fill_(empty_a[t0:t1], 0.0)
        tb = fb[:t1 - t0]
        if out_b.dtype == f32:
            torch.mul(out_b[t0:t1], cb[t0:t1], out=tb)
        else:
            tb.copy_(out_b[t0:t1]).mul_(cb[t0:t1])
        acc.add_(tb.masked_fill_(empty_b[t0:t1], 0.0))
        if fa is not None:
            o.copy_(acc)
    lse.copy_(m0 + torch.log(den))
    lse.masked_fill_(~seen, float("-inf"))


#: The CPU cascade gives a prefix group a pass of its own only from CASCADE_MIN_ROWS query rows per
#: kv head (its tokens x q heads of a kv head) and CASCADE_MIN_SCORES score elements (those rows
#: times its prefix keys) over a float32 cache, CASCADE_16BIT_FACTOR times both over a 16-bit or
#: fp8 one (whose paged decode is cheaper: half the bytes or less, and on CPUs with AVX512-BF16
#: bfloat16 dot products). Smaller groups read their prefix as part of their sequences' own tables
#: (_cascade_groups): the prefix's gather and small matmuls cost more than reading it once per
#: sequence. Measured here (one thread, 32 q / 8 kv heads, head_dim 128, decode, 128 own tokens
#: each; cascade over paged attention, same batch, min of 14 calls, two sweeps), after the decode
#: kernel's prefetches moved to L2 made paged attention 1.5-1.9x faster: float32 sequences x prefix
#: keys 8 x 1024-4096: 0.79-1.03x, 16 x 1024: 0.94-0.99x, 16 x 2048: 1.11-1.14x, 16 x 4096:
#: 1.18-1.20x, 32 x 1024: 1.14-1.19x, 64 x 1024: 1.27x and up; bfloat16, after AVX512-BF16 q.k made
#: paged decode another 10% faster: 32 x 1024-4096: 0.80-0.92x, 64 x 1024-4096: 0.94-1.01x, 128 x
#: 1024: 1.00x, 128 x 4096: 1.02x.
CASCADE_MIN_ROWS = 64
CASCADE_MIN_SCORES = 1 << 17
CASCADE_16BIT_FACTOR = 8
#: The CPU cascade also gives a pass of its own only to a prefix that CASCADE_MIN_SEQS sequences
#: of the batch share: one sequence reads it once either way (one 4096-token chunk over a
#: 2048-token prefix, 8 q / 2 kv heads, head_dim 128, one thread: 873 ms as a cascade, 663 ms as
#: paged attention).
CASCADE_MIN_SEQS = 2


def _cascade_groups(group: int, block_size: int, itemsize: int, prefix_block_tables,
                    prefix_lens, prefix_ids, block_tables, kv_lens, cu_q_lens):
    """The cascade's host metadata with the prefix groups below CASCADE_MIN_ROWS, CASCADE_MIN_SCORES
    (over a cache of ``itemsize``-byte elements) or CASCADE_MIN_SEQS sequences dissolved: their
    sequences' tables become the prefix's blocks then their own (prefix lengths are whole blocks),
    their kv_lens grow by the prefix, their prefix id is -1; the kept prefixes are renumbered in
    order. The same attention, exactly: an own token's causal view of its prefix is the whole prefix
    either way. Returns (prefix tables, prefix lens, prefix ids, tables, kv lens), the inputs
    themselves when every group stays, else int32 CPU tensors (new ones; empty views of the prefix
    inputs when none stays). A batch whose rows bound every group below the thresholds dissolves
    them all without counting (a small call's ~50 us). (numpy: a few us an op here, where torch's
    small ops cost ~10 us each.)"""
    plens = prefix_lens.numpy().astype(np.int64)
    pid = prefix_ids.numpy().astype(np.int64)
    num_prefixes, num_seqs = plens.shape[0], pid.shape[0]
    # an unchecked id past the prefixes reads no prefix, as the cascade's own path and the
    # device route take it (the reference's joined tables would index past prefix_lens)
    pid = np.where(pid < num_prefixes, pid, -1)
    more = 1 if itemsize >= 4 else CASCADE_16BIT_FACTOR
    # A batch too small for any group to pass (its rows, and its rows times the widest prefix
    # table's keys, bound every group's): every group dissolves, without counting them. Only
    # a choice of route: dissolving gives the same attention (valid metadata; unchecked
    # metadata gets the reference's joined tables, as the counted route).
    if cu_q_lens is None:
        num_tokens = num_seqs
    else:
        cu = cu_q_lens.numpy()
        num_tokens = int(cu[-1]) - int(cu[0])
    batch_rows = num_tokens * group
    if batch_rows < CASCADE_MIN_ROWS * more or (
            batch_rows * prefix_block_tables.shape[1] * block_size < CASCADE_MIN_SCORES * more):
        if max(pid.tolist(), default=-1) < 0:
            return prefix_block_tables, prefix_lens, prefix_ids, block_tables, kv_lens
        tables, kv = _joined_tables(prefix_block_tables.numpy(), plens, pid,
                                    block_tables.numpy(), kv_lens.numpy(), block_size)
        return (prefix_block_tables[:0], prefix_lens[:0], torch.full_like(prefix_ids, -1),
                torch.from_numpy(tables), torch.from_numpy(kv))
    has = pid >= 0
    if not has.any():
        return prefix_block_tables, prefix_lens, prefix_ids, block_tables, kv_lens
    q_lens = np.ones(num_seqs, np.int64) if cu_q_lens is None else np.diff(
        cu_q_lens.numpy().astype(np.int64))
    p = np.maximum(pid, 0)
    tokens = np.bincount(p[has], weights=q_lens[has], minlength=num_prefixes)
    rows = tokens * group
    scores = rows * plens
    # a prefix of one sequence is read once either way: its pass and merge would only add
    seqs = np.bincount(p[has], minlength=num_prefixes)
    keep = ((scores > 0) & (seqs >= CASCADE_MIN_SEQS) & (rows >= CASCADE_MIN_ROWS * more)
            & (scores >= CASCADE_MIN_SCORES * more))
    dissolve = has & ~keep[p]
    if not dissolve.any():
        return prefix_block_tables, prefix_lens, prefix_ids, block_tables, kv_lens
    pre = prefix_block_tables.numpy()
    tables, kv = shared_prefix_block_tables(pre, plens, np.where(dissolve, pid, -1),
                                            block_tables.numpy(), kv_lens.numpy(), block_size)
    kept = np.flatnonzero(keep)
    renumber = np.full(num_prefixes, -1, np.int64)
    renumber[kept] = np.arange(kept.size)
    ids = np.where(dissolve, -1, np.where(has, renumber[p], -1))
    i32 = np.int32
    return (torch.from_numpy(np.ascontiguousarray(pre[kept], dtype=i32)),
            torch.from_numpy(plens[kept].astype(i32)), torch.from_numpy(ids.astype(i32)),
            torch.from_numpy(tables), torch.from_numpy(kv))


#: Most entries of a dissolved cascade's joined tables built from Python lists: numpy costs
#: ~30 us whatever the size, the lists ~0.05 us an entry, measured alone; between kernel calls
#: (the interpreter's and numpy's code cold) 8 sequences x (64 + 8) entries took 106 us by
#: lists, 163 us by numpy.
JOIN_LIST_ENTRIES = 1024


def _joined_tables(pre: np.ndarray, plens: np.ndarray, pid: np.ndarray, own: np.ndarray,
                   kv: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """shared_prefix_block_tables (every sequence with a prefix reads it through its table):
    from Python lists for a small batch of valid prefixes, else (a large batch, or unchecked
    prefix ids or lengths the value checks refuse) the vectorized reference itself."""
    width = pre.shape[1] + own.shape[1]
    pad, pl, ids = pre.shape[1], plens.tolist(), pid.tolist()
    if own.shape[0] * width > JOIN_LIST_ENTRIES or not all(
            p < len(pl) and 0 <= pl[p] <= pad * block_size and not pl[p] % block_size
            for p in ids if p >= 0):
        return shared_prefix_block_tables(pre, plens, pid, own, kv, block_size)
    pre_rows = pre.tolist()
    rows, lens = [], []
    for p, row, n in zip(ids, own.tolist(), kv.tolist(), strict=True):
        if p >= 0:
            nb = pl[p] // block_size
            rows.append(pre_rows[p][:nb] + row + [0] * (pad - nb))
            lens.append(n + pl[p])
        else:
            rows.append(row + [0] * pad)
            lens.append(n)
    # int32 as the reference's (an unchecked kv_len near 2**31 plus the prefix wraps there;
    # np.array(lens, np.int32) raised OverflowError, naming no argument)
    return (np.array(rows, np.int32).reshape(len(rows), width),
            np.array(lens, np.int64).astype(np.int32))


def shared_prefix_attention(out: torch.Tensor, lse: torch.Tensor | None, q, k_cache, v_cache,
                            prefix_block_tables, prefix_lens, prefix_ids, block_tables, kv_lens,
                            cu_q_lens, *, scale: float, logits_soft_cap: float | None,
                            workspace=None, k_scale=None, v_scale=None) -> None:
    """Each prefix's KV read once for all its queries, the own tokens by paged attention, then
    the log-sum-exp merge (``workspace`` is not used).

    float8_e4m3fn caches (k_scale, v_scale as paged_attention's): a call that runs as one
    paged pass hands them to paged_attention; otherwise the blocks both passes' tables name
    are dequantized into their exact e4m3 values, k_scale folded into the logits' scale and
    v_scale into the final merge (_fp8_scales), as the Triton kernel reads them.

    With the metadata on the host and no soft cap (the CPU path): a decode batch's own tokens
    through the compiled decode kernel (_c_decode) when it builds, else _attend_host's fused
    CPU kernel (the q heads of a kv head are its rows); each prefix's tokens in tiles through
    _attend_host's large per-head matmuls (_host_prefix_pass). With a soft cap, the own part
    by paged_attention and the prefix tiles by the padded online-softmax path
    (_attend_padded); with the metadata on a device, that path over all prefixes at once.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_seqs = block_tables.shape[0]
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if num_seqs == 0:  # tokens of no sequence (unchecked cu_q_lens): paged_attention's case
        paged_attention(out, lse, q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens,
                        scale=scale, causal=True, sliding_window=None,
                        logits_soft_cap=logits_soft_cap, k_scale=k_scale, v_scale=v_scale)
        return
    num_prefixes = prefix_block_tables.shape[0]
    if num_prefixes == 0:  # no prefix: every sequence its own keys, as a plan runs it (bit
        # for bit), where the cascade's merge rounded differently and, metadata on a device,
        # the prefix pass indexed an empty row set
        paged_attention(out, lse, q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens,
                        scale=scale, causal=True, sliding_window=None,
                        logits_soft_cap=logits_soft_cap, k_scale=k_scale, v_scale=v_scale)
        return
    dev = q.device
    host = _on_host(kv_lens, block_tables, prefix_ids, prefix_lens, prefix_block_tables) and (
        cu_q_lens is None or _on_host(cu_q_lens))
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    fused = host and _host_path(q, logits_soft_cap)
    if fused:
        # fp8: the element size of the dequantized blocks the passes read (q's dtype)
        (prefix_block_tables, prefix_lens, prefix_ids, block_tables,
         kv_lens) = _cascade_groups(group, k_cache.shape[1],
                                    (q if fp8 else k_cache).element_size(),
                                    prefix_block_tables, prefix_lens, prefix_ids, block_tables,
                                    kv_lens, cu_q_lens)
        num_prefixes = prefix_block_tables.shape[0]
        if num_prefixes == 0:  # every group dissolved: one paged pass
            paged_attention(out, lse, q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens,
                            scale=scale, causal=True, sliding_window=None,
                            logits_soft_cap=None, k_scale=k_scale, v_scale=v_scale)
            return
    out_scale = None
    if fp8:  # the blocks both passes name, dequantized (exact, unscaled)
        k_cache, v_cache, prefix_block_tables, block_tables = _dequantized_blocks(
            q, k_cache, v_cache, None, None, prefix_block_tables, block_tables)
        scale, out_scale = _fp8_scales(scale, k_scale, v_scale)
    # suffix: the sequences' own tokens (causal; positions shift uniformly by the prefix), in
    # float32 whatever q's dtype: rounded to a 16-bit q's dtype before the merge, large own
    # and prefix parts that cancel passed the tolerance (2x; the compiled decode kernel writes
    # float32 for it). Into out itself when it is float32, contiguous and apart from q (the
    # host path's prefix tiles merge into it in place: one q-sized float32 buffer fewer).
    f32 = torch.float32
    if host and q.dtype != f32:
        own = _workspace("own_c", q.shape, f32, dev)
    elif host and out.dtype == f32 and out.is_contiguous() and not _overlaps(out, q):
        own = out
    else:
        own = torch.empty((num_tokens, num_q_heads, head_dim), dtype=f32, device=dev)
    own_lse = torch.empty((num_tokens, num_q_heads), dtype=f32, device=dev)
    decode = num_tokens == num_seqs and (cu_q_lens is None or (host and torch.equal(
        cu_q_lens.to(torch.int64), torch.arange(num_seqs + 1))))
    # a decode batch by the compiled decode kernel when it runs
    if not (decode and host and _c_decode(own, own_lse, q, k_cache, v_cache, block_tables,
                                          kv_lens, scale, None, logits_soft_cap)):
        if fused and decode:  # one query per sequence: its q heads are the rows of its kv heads
            _attend_host(own.view(num_seqs, num_kv_heads, group, head_dim),
                         own_lse.view(num_seqs, num_kv_heads, group),
                         q.reshape(num_seqs, num_kv_heads, group, head_dim).to(f32),
                         k_cache, v_cache, block_tables, kv_lens.tolist(), scale)
        else:
            paged_attention(own, own_lse, q, k_cache, v_cache, block_tables, kv_lens,
                            cu_q_lens, scale=scale, causal=True, sliding_window=None,
                            logits_soft_cap=logits_soft_cap)
    if host:
        _host_prefix_pass(out, lse, q, own, own_lse, k_cache, v_cache, prefix_block_tables,
                          prefix_lens, prefix_ids, cu_q_lens, scale=scale,
                          logits_soft_cap=logits_soft_cap, fused=fused, out_scale=out_scale)
        return
    # metadata on a device: prefixes as "sequences" whose queries are all tokens of their
    # sequences, each padded to the batch's token count (no sync), unless that passes
    # PAD_SYNC_BYTES: then its longest token count is read back (a sync)
    tok_seq = (torch.arange(num_seqs, device=dev) if cu_q_lens is None
               else _token_seqs(cu_q_lens, num_tokens))
    pid = prefix_ids.to(torch.int64)[tok_seq]  # [T], -1 = none
    has = (pid >= 0) & (pid < num_prefixes)  # unchecked: past the prefixes = none
    key = torch.where(has, pid, num_prefixes)  # tokens without a prefix sort last
    order = torch.sort(key, stable=True).indices
    # index_add_, not bincount: bincount on CUDA reads its input's min and max on the host
    counts = torch.zeros(num_prefixes + 1, dtype=torch.int64, device=dev).index_add_(
        0, key, torch.ones_like(key))[:num_prefixes]
    starts = torch.cumsum(counts, 0) - counts
    sorted_key = key[order]
    rank = torch.arange(num_tokens, device=dev) - torch.cat(
        [starts, starts.new_zeros(1)])[sorted_key]
    q_max = int(counts.max()) if _padding_needs_sync(num_prefixes, q) else num_tokens
    q_max = max(q_max, 1)
    live = sorted_key < num_prefixes
    rows_sorted = sorted_key.clamp(max=max(num_prefixes - 1, 0)) * q_max + rank
    # tokens without a prefix land in a spare padding row per prefix (never read)
    row_idx = torch.where(live, rows_sorted, num_prefixes * q_max)
    qp = q.new_zeros((num_prefixes * q_max + 1, num_q_heads, head_dim))
    qp.index_copy_(0, row_idx, q.index_select(0, order))
    qp = qp[:num_prefixes * q_max].view(num_prefixes, q_max, num_q_heads, head_dim)
    p_out, p_lse = _attend_padded(
        qp, k_cache, v_cache, prefix_block_tables, prefix_lens.to(torch.int64), counts,
        scale=scale, causal=False, sliding_window=None, logits_soft_cap=logits_soft_cap,
        max_kv=None, min_end=None)
    del qp
    src = torch.where(live, rows_sorted, 0)
    got_out = p_out.reshape(-1, num_q_heads, head_dim).index_select(0, src)
    got_lse = p_lse.reshape(-1, num_q_heads).index_select(0, src)
    del p_out, p_lse
    got_out = torch.where(live[:, None, None], got_out, 0.0)
    got_lse = torch.where(live[:, None], got_lse, float("-inf"))
    pre_out = torch.zeros((num_tokens, num_q_heads, head_dim), dtype=torch.float32, device=dev)
    pre_lse = torch.full((num_tokens, num_q_heads), float("-inf"), dtype=torch.float32,
                         device=dev)
    pre_out.index_copy_(0, order, got_out)
    pre_lse.index_copy_(0, order, got_lse)
    del got_out, got_lse
    merged_lse = torch.empty_like(own_lse)
    _merge_states(out, merged_lse, pre_out, pre_lse, own, own_lse, out_scale=out_scale)
    if lse is not None:
        lse.copy_(merged_lse)


#: Float32 bytes of the queries of one tile of the CPU cascade's prefix part at most
#: (_host_prefix_pass): a longer group of a prefix's tokens runs in several tiles, each
#: gathering the prefix's KV again (8 MiB: 512 tokens of 32 q heads x 128; their dots over a
#: 2k-token prefix take ~100x its gather).
PREFIX_TILE_BYTES = 8 << 20


def _host_prefix_pass(out: torch.Tensor, lse: torch.Tensor | None, q, own, own_lse, k_cache,
                      v_cache, prefix_block_tables, prefix_lens, prefix_ids, cu_q_lens, *,
                      scale, logits_soft_cap: float | None, fused: bool, out_scale) -> None:
    """The cascade's prefix part with host metadata, merged with the own part (own, own_lse:
    every token's; own may be out itself) into out and lse.

    Each prefix's tokens (in token order) run in near-equal tiles of at most
    PREFIX_TILE_BYTES of float32 queries: exactly its tokens, as the rows of its kv heads
    (_attend_host; _attend_padded with a soft cap); each tile's result merged with its own rows
    and written to its rows of out. Before, every prefix was padded to the longest group's
    token count and the whole batch's prefix results were kept: one 4096-token prefill chunk
    beside 8 groups of 64 decodes (8 q / 2 kv heads, head_dim 128, one thread) took 5.0 s and
    +483 MiB, where paged attention over the joined tables takes 1.1 s and +52 MiB. Tokens
    of no prefix get their own part (merged with an empty state, as a prefix tile's). A token
    is read (its q row) and written (its out row) by one tile only, q before out (the
    wrappers refuse an out sharing q's memory; called directly with out=q, this comes out
    right)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    num_prefixes = prefix_block_tables.shape[0]
    num_seqs = prefix_ids.shape[0]
    dev, f32 = q.device, torch.float32
    pid = prefix_ids.numpy().astype(np.int64)
    if cu_q_lens is None:
        tok_seq = np.arange(num_tokens)
    else:  # as _token_seqs: whatever an unchecked cu holds, a sequence of the batch
        tok_seq = np.minimum(np.searchsorted(cu_q_lens.numpy().astype(np.int64)[1:],
                                             np.arange(num_tokens), side="right"),
                             max(num_seqs - 1, 0))
    tok_pid = pid[tok_seq]
    key = np.where((tok_pid >= 0) & (tok_pid < num_prefixes), tok_pid, num_prefixes)
    order = np.argsort(key, kind="stable")
    counts = np.bincount(key, minlength=num_prefixes + 1)
    ends = np.cumsum(counts)
    plens = prefix_lens.tolist()
    tile = max(1, PREFIX_TILE_BYTES // (num_q_heads * head_dim * 4))
    for p in range(num_prefixes + 1):
        c = int(counts[p])
        if not c:
            continue
        for part in np.array_split(order[ends[p] - c:ends[p]], -(-c // tile)):
            n = part.size
            rows = None  # the tile's tokens as one range of rows: views, not copies
            if int(part[-1]) - int(part[0]) + 1 == n:
                rows = slice(int(part[0]), int(part[0]) + n)
            idx = None if rows is not None else torch.from_numpy(part).to(dev)
            if p == num_prefixes:  # no prefix: the own part alone
                p_out = torch.zeros((n, num_q_heads, head_dim), dtype=f32, device=dev)
                p_lse = torch.full((n, num_q_heads), float("-inf"), dtype=f32, device=dev)
            else:
                qt = q[rows] if rows is not None else q.index_select(0, idx)
                if fused:
                    rg = n * group
                    q4 = (qt.view(1, n, num_kv_heads, group, head_dim).transpose(1, 2)
                          .reshape(1, num_kv_heads, rg, head_dim).to(f32))
                    po = torch.empty((1, num_kv_heads, rg, head_dim), dtype=f32, device=dev)
                    pl = torch.empty((1, num_kv_heads, rg), dtype=f32, device=dev)
                    _attend_host(po, pl, q4, k_cache, v_cache, prefix_block_tables[p:p + 1],
                                 [plens[p]], scale)
                    del q4
                    p_out = (po.view(num_kv_heads, n, group, head_dim).transpose(0, 1)
                             .reshape(n, num_q_heads, head_dim))
                    p_lse = pl.view(num_kv_heads, n, group).transpose(0, 1).reshape(
                        n, num_q_heads)
                    del po, pl
                else:
                    po, pl = _attend_padded(
                        qt.unsqueeze(0), k_cache, v_cache, prefix_block_tables[p:p + 1],
                        prefix_lens[p:p + 1].to(torch.int64), torch.tensor([n]), scale=scale,
                        causal=False, sliding_window=None, logits_soft_cap=logits_soft_cap,
                        max_kv=max(plens[p], 0), min_end=plens[p])
                    p_out, p_lse = po[0], pl[0]
                del qt
            if rows is not None:
                o = out[rows]
                lg = lse[rows] if lse is not None else torch.empty(
                    (n, num_q_heads), dtype=f32, device=dev)
                # own first: own may be out itself, merged in place (_merge_states scales
                # its first state where it stands)
                _merge_states(o, lg, own[rows], own_lse[rows], p_out, p_lse,
                              out_scale=out_scale)
                continue
            o = torch.empty((n, num_q_heads, head_dim), dtype=out.dtype, device=dev)
            lg = torch.empty((n, num_q_heads), dtype=f32, device=dev)
            _merge_states(o, lg, own.index_select(0, idx), own_lse.index_select(0, idx),
                          p_out, p_lse, out_scale=out_scale)
            out.index_copy_(0, idx, o)
            if lse is not None:
                lse.index_copy_(0, idx, lg)


def _plan_groups(num_q_heads: int, k_cache: torch.Tensor, logits_soft_cap: float | None,
                 prefix_block_tables, prefix_lens, prefix_ids, block_tables, kv_lens, cu_q_lens):
    """For an attention plan (torch_frontend._plan): the metadata shared_prefix_attention runs
    with, (prefix tables, prefix lens, prefix ids, tables, kv lens), settled once per step
    rather than per layer: on the CPU path (_host_path, metadata on the host) the groups
    _cascade_groups dissolves are joined into their sequences' tables (no prefix left: the
    plan runs paged_attention over the tables, as this backend would); elsewhere unchanged.
    A kept group's metadata passes _cascade_groups again unchanged."""
    meta = (prefix_block_tables, prefix_lens, prefix_ids, block_tables, kv_lens)
    if not _host_path(k_cache, logits_soft_cap) or not _on_host(
            *meta, *(() if cu_q_lens is None else (cu_q_lens,))):
        return meta
    return _cascade_groups(num_q_heads // k_cache.shape[2], k_cache.shape[1],
                           k_cache.element_size(), *meta, cu_q_lens)


shared_prefix_attention.plan_groups = _plan_groups
shared_prefix_attention.reads_fp8 = True


# ------------------------------------------------------------------------------- cache ops
#
# On the CPU, torch's index_select has a memcpy path per row, but index_copy_ / index_put_
# copy element by element: a row of 2-byte elements costs about 4x the same bytes viewed as
# 16-byte elements. So rows are copied through a wider view of the same bytes (_wide): bit-exact
# (plain loads and stores, no arithmetic), and measured here (one thread, 256 blocks of 32 KiB,
# bf16): index_copy_ 1.6 ms as float32, 0.42 ms as complex128, index_select 0.40 ms.

#: Element types for the wide views, widest first: (bytes, dtype).
_WIDE = ((16, torch.complex128), (8, torch.int64), (4, torch.int32), (2, torch.int16))


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """t as a [t.shape[0], rest] view with contiguous rows, or None where no such view exists."""
    row = math.prod(t.shape[1:])
    try:
        return t.view(t.shape[0], row)
    except RuntimeError:
        return None


def _wide(*rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Views of 2-D CPU tensors (rows contiguous, same dtype) with the widest element type that
    every row's bytes, stride and address allow; the tensors themselves where none is wider."""
    item = rows[0].element_size()
    if any(r.device.type != "cpu" or r.dtype != rows[0].dtype for r in rows):
        return rows
    nbytes = rows[0].shape[1] * item
    for size, dtype in _WIDE:
        if size <= item:
            break
        if nbytes % size or any(r.data_ptr() % size for r in rows):
            continue
        try:
            return tuple(r.view(dtype) for r in rows)
        except RuntimeError:  # a row stride or offset not a multiple of size
            continue
    return rows


#: Copies of at most this many rows skip the wide views (_wide): each torch op costs a few
#: us on a CPU, and wide views pay off only for big copies. With them and the layout probing
#: of _slot_rows, one decode token's write_kv took ~20 ops, ~190 us here, against 12 us for
#: the index_copy_ itself.
SMALL_WRITE_ROWS = 64
#: ... and of at most this many bytes: torch's CPU index_copy_ moves element by element, so a
#: copy of whole blocks (32 KiB rows) takes the wide views however few its rows (64 bf16 blocks
#: of 16 x 8 x 128: ~400 us a cache as int16, ~60 us as complex128).
SMALL_WRITE_BYTES = 128 << 10


def _index_copy(dst: torch.Tensor, ids: torch.Tensor, src: torch.Tensor) -> None:
    """dst[ids[i]] = src[i] along dim 0 (ids distinct), bit-exact."""
    d2 = dst if dst.dim() == 2 else _rows(dst)
    if d2 is None or d2.dtype != src.dtype:
        dst.index_copy_(0, ids, src)
        return
    s2 = src if src.dim() == 2 else _rows(src)
    if s2 is None:  # rows of src not contiguous: a contiguous copy of them
        s2 = src.reshape(src.shape[0], d2.shape[1])
    if src.shape[0] > SMALL_WRITE_ROWS or s2.numel() * s2.element_size() > SMALL_WRITE_BYTES:
        d2, s2 = _wide(d2, s2)
    d2.index_copy_(0, ids, s2)


def _slot_rows(cache: torch.Tensor, slots: torch.Tensor):
    """The cache as token rows: (rows [R, num_kv_heads * head_dim] view, row index per slot),
    or (None, None) where its layout has none.

    A block's tokens must be contiguous rows (cache[0] contiguous) and the block stride a
    whole number of rows at least block_size; the blocks need not be adjacent: a K or V half
    of a stacked [num_blocks, 2, ...] cache is rows of its parent's storage, with the other
    half's rows in between (never indexed).
    """
    num_blocks, block_size = cache.shape[:2]
    row = math.prod(cache.shape[2:])
    if num_blocks and row and cache.is_contiguous():  # the common case, in one view
        return cache.view(-1, row), slots
    if num_blocks == 0 or row == 0 or not cache[0].is_contiguous():
        return None, None
    step = cache.stride(0) if num_blocks > 1 else block_size * row
    if step % row or step // row < block_size:
        return None, None
    step //= row
    rows = cache.as_strided(((num_blocks - 1) * step + block_size, row), (row, 1),
                            cache.storage_offset())
    idx = slots if step == block_size else (slots // block_size) * step + slots % block_size
    return rows, idx


def _head_rows(cache: torch.Tensor, slots: torch.Tensor):
    """The cache as rows of one head's head_dim elements, for caches whose token rows are not
    contiguous (HND storage as its NHD view, alone or a half of a stacked cache): (rows [R,
    head_dim] view, row index per (slot, head), slot-major), or (None, None) where the
    strides are not whole rows. Rows between the indexed ones (other heads' tokens, the other
    half of a stacked cache) are never indexed."""
    num_blocks, block_size, heads, head_dim = cache.shape
    sb, st, sh, sd = cache.stride()
    if not (num_blocks and block_size and heads and head_dim) or (head_dim > 1 and sd != 1):
        return None, None
    if any(stride % head_dim or stride < 0 for stride in (sb, st, sh)):
        return None, None
    sb, st, sh = sb // head_dim, st // head_dim, sh // head_dim
    # distinct rows for distinct (block, token, head): by increasing stride, each dim's stride
    # passes the rows the smaller ones span (an expanded or overlapping view takes index_put_)
    span = 0
    for size, stride in sorted(((num_blocks, sb), (block_size, st), (heads, sh)),
                               key=lambda d: d[1]):
        if size > 1:
            if stride <= span:
                return None, None
            span += (size - 1) * stride
    count = (num_blocks - 1) * sb + (block_size - 1) * st + (heads - 1) * sh + 1
    rows = cache.as_strided((count, head_dim), (head_dim, 1), cache.storage_offset())
    token = (slots // block_size) * sb + (slots % block_size) * st
    idx = (token[:, None] + torch.arange(heads, dtype=slots.dtype) * sh).reshape(-1)
    return rows, idx


def _write(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """cache[slot // block_size, slot % block_size] = x[i] for every slot (all >= 0)."""
    if (slots.shape[0] <= SMALL_WRITE_ROWS and cache.is_contiguous() and x.is_contiguous()
            and x.dtype == cache.dtype and cache.shape[0]):
        # a decode step's few tokens: one view and the copy (the layout probing costs more)
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, x)
        return
    rows, idx = _slot_rows(cache, slots)
    if rows is not None:
        _index_copy(rows, idx, x)
        return
    # HND: each token's heads, one row each; a few tokens (a decode step) by index_put_,
    # which costs less than the row indices (measured: 8 tokens 11 us against 28 us, 512
    # tokens 329 us against 151 us, bf16, 8 heads of 128)
    many = slots.shape[0] > SMALL_WRITE_ROWS and x.dtype == cache.dtype
    rows, idx = _head_rows(cache, slots) if many else (None, None)
    if rows is not None:
        _index_copy(rows, idx, x.reshape(-1, cache.shape[3]))
    else:
        block_size = cache.shape[1]
        cache.index_put_((slots // block_size, slots % block_size), x)


def _host_bounds(name: str, ids: torch.Tensor, upper: int, *,
                 negative_skips: bool = False) -> tuple[int, int]:
    """(least, greatest) of host ``ids`` ((0, 0) when empty), after a ValueError naming
    ``name`` unless every id lies in [0, upper) (or is negative, with ``negative_skips``).

    The torch path's own bounds guard, run on every call with host ids (a few integer ops;
    it is what stands when nobody checked the values: under torch.compile, or with
    PREFIXKV_VALUE_CHECKS=0): run before anything is written, so a
    bad id never leaves a cache half-written; a few ids are read as a Python list, not by
    reduction ops (a decode step's write_kv is one token)."""
    n = ids.shape[0]
    if n == 0:
        return 0, 0
    if n <= SMALL_WRITE_ROWS:
        vals = ids.tolist()
        lo, hi = min(vals), max(vals)
    else:
        lo, hi = (int(x) for x in torch.aminmax(ids))
    if hi >= upper or (lo < 0 and not negative_skips):
        bad = [i for i, x in enumerate(ids.tolist())
               if x >= upper or (x < 0 and not negative_skips)][0]
        rule = f"[0, {upper})" + (" or negative (skip)" if negative_skips else "")
        raise ValueError(f"{name}: expected values in {rule}, got {int(ids[bad])} at index {bad}")
    return lo, hi


def _redirect(ids: torch.Tensor, upper: int):
    """The no-sync skip of entries outside [0, upper) (ids on a device, unchecked, or a
    negative write_kv slot): (ids with each such entry replaced by the first entry inside,
    or by 0 when none is inside; the plan _filled needs). A redirected entry is then given
    the first live entry's row (the same bytes land there twice, so the order of duplicate
    writes cannot matter), or with no live entry, row 0's own bytes (read before the write)."""
    live = (ids >= 0) & (ids < upper)
    first = torch.argmax(live.to(torch.int32)).view(1)  # the first live entry, 0 if none
    any_live = live.index_select(0, first)  # [1]
    tgt = torch.where(any_live, ids.index_select(0, first), 0)  # [1]
    return torch.where(live, ids, tgt), (live, first, any_live, tgt)


def _filled(rows: torch.Tensor, current: torch.Tensor, plan) -> torch.Tensor:
    """rows (as same-width integers) with each redirected entry's row replaced per _redirect's
    plan; ``current``: the destination's row at the plan's target ([1, ...])."""
    live, first, any_live, _ = plan
    shape = (-1,) + (1,) * (rows.dim() - 1)
    rb = _same_bits(rows)
    fill = torch.where(any_live.view(shape), rb.index_select(0, first), current)
    return torch.where(live.view(shape), rb, fill)


def _drop_out_of_range(cache: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor):
    """(ids, rows) for an in-place row write into ``cache`` (rows along its axis 0) with every
    id outside [0, cache.shape[0]) dropped, with no host sync (_redirect, _filled)."""
    if ids.shape[0] == 0:
        return ids, rows
    ids, plan = _redirect(ids, cache.shape[0])
    rows = _filled(rows, _same_bits(cache).index_select(0, plan[3]), plan)
    return ids, (rows if rows.dtype == cache.dtype else rows.view(cache.dtype))


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """float8_e4m3fn(sat(x / scale)): float32(x) divided by the 0-d float32 ``scale`` tensor
    (a tensor on x's device: a true division, never a multiply by the reciprocal), clamped to
    +-448, rounded to nearest even by the conversion. A NaN stays NaN with x's sign (0xff
    for a negative one, as the reference): from x's bits, as torch's CPU float16 -> float32
    conversion and a GPU's division give every NaN one sign."""
    y = x.to(torch.float32)
    if scale is not None:
        y = y / scale
    q = y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    negative = x.view(torch.int16 if x.element_size() == 2 else torch.int32) < 0
    nan = torch.where(negative, 0xFF, 0x7F).to(torch.uint8)
    return torch.where(torch.isnan(y), nan, q).view(torch.float8_e4m3fn)


def write_kv(key, value, k_cache, v_cache, slot_mapping, *, k_scale=None, v_scale=None) -> None:
    """Negative slots are skipped. Slots on the host: the live rows picked out when there is
    a negative one. On a device: no host sync (see _write_kv_no_sync). float8_e4m3fn caches:
    key/value quantized (quantize_fp8), then every path moves bytes (uint8 views)."""
    n = slot_mapping.shape[0]
    if k_cache.dtype == torch.float8_e4m3fn:
        key = quantize_fp8(key[:n], k_scale).view(torch.uint8)
        value = quantize_fp8(value[:n], v_scale).view(torch.uint8)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    if slot_mapping.device.type != "cpu":
        _write_kv_no_sync(key, value, k_cache, v_cache, slot_mapping)
        return
    slots = slot_mapping if slot_mapping.dtype == torch.int64 else slot_mapping.to(torch.int64)
    if key.shape[0] != n:
        key, value = key[:n], value[:n]
    lo, _ = _host_bounds("slot_mapping", slots, k_cache.shape[0] * k_cache.shape[1],
                         negative_skips=True)
    if lo < 0:
        live = slots >= 0
        slots, key, value = slots[live], key[live], value[live]
    dev = k_cache.device
    if slots.device != dev:
        slots = slots.to(dev)
    _write(k_cache, slots, key)
    _write(v_cache, slots, value)


def _same_bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a float tensor as integers of the same width (torch.where copies them)."""
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    try:
        return t.view(ints[t.element_size()])
    except (KeyError, RuntimeError):
        return t


def _write_kv_no_sync(key, value, k_cache, v_cache, slot_mapping) -> None:
    """write_kv without nonzero or any value read on the host (graph-safe on a device).

    A negative slot, or one past the cache (unchecked values), is skipped by _redirect.
    """
    n = slot_mapping.shape[0]
    if n == 0:
        return
    block_size = k_cache.shape[1]
    s, plan = _redirect(slot_mapping.to(torch.int64), k_cache.shape[0] * block_size)
    tgt = plan[3]
    for x, cache in ((key[:n], k_cache), (value[:n], v_cache)):
        c = _same_bits(cache)
        cur = c[tgt // block_size, tgt % block_size]  # [1, H, D], tensor indices: no sync
        _write(c, s, _filled(x, cur, plan))


def _bytes(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """float8_e4m3fn tensors as uint8 views (the block ops move bytes; torch has no
    index_copy_ for float8 on the CPU), others as they are."""
    return [t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t for t in tensors]


#: The compiled one-pass block copy (kernels/cpu/block_copy.py): imported on first use.
_BLOCK_COPY: dict = {}
#: Host block copies of at least this many bytes write with non-temporal stores (the
#: destination, a host tier or a staging buffer, is not read back soon; a copy that fits the
#: core's caches keeps them; kStreamMinBytes of kernels/cpu/host_memory.h, as the JAX CPU ops)
STREAM_MIN_BYTES = 2 << 20
#: ... and run on up to torch.get_num_threads() threads, each with this many bytes at least.
THREAD_MIN_BYTES = 4 << 20


def _block_layout(t: torch.Tensor, written: bool = False) -> tuple[int, int, int] | None:
    """(address of block 0, bytes from one block to the next, bytes of a block) of a CPU
    tensor whose bytes are its values (strided, not quantized, no lazy conjugate or negation
    bit) and whose blocks are each contiguous and apart (a block stride under a block's size
    overlaps them), else None: the torch path copies those (or refuses them, as it refuses to
    write an inference tensor outside inference mode, ``written``)."""
    if (t.device.type != "cpu" or t.layout != torch.strided or t.is_quantized or t.is_conj()
            or t.is_neg()):
        return None
    if written and t.is_inference() and not torch.is_inference_mode_enabled():
        return None
    size = t.element_size()
    want = 1
    for n, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:]), strict=True):
        if n != 1 and stride != want:
            return None
        want *= n
    if t.shape[0] > 1 and t.stride(0) < want:
        return None
    return t.data_ptr(), t.stride(0) * size, want * size


def _part_layouts(buffer: torch.Tensor, written: bool = False
                  ) -> list[tuple[int, int, int]] | None:
    """_block_layout of each buffer[:, i] of a [n, parts, *block] CPU buffer, from the first
    part's (no view per part)."""
    if buffer.device.type != "cpu" or buffer.dim() < 2 or not buffer.shape[1]:
        return None
    part = _block_layout(buffer.select(1, 0), written)
    if part is None:
        return None
    step = buffer.stride(1) * buffer.element_size()
    return [(part[0] + i * step, part[1], part[2]) for i in range(buffer.shape[1])]


def _c_copy(src, dst, src_ids: torch.Tensor | None, dst_ids: torch.Tensor | None, n: int,
            src_blocks: int, dst_blocks: int, new: torch.Tensor | None = None) -> bool:
    """Block dst_ids[i] of every dst = block src_ids[i] of its src, one pass, by the compiled
    copy: src, dst lists of _block_layout triples (None: some tensor has no such layout);
    ids host int64 tensors in range (None: 0..n-1). False (nothing copied) when the copy
    cannot run here; the caller then takes the torch path. No dst block may share bytes with
    a src block or another dst block (the ops' overlap checks). ``new``: the destination, a
    new tensor never written, gets huge pages when large (faulting a new 64 MiB gather output
    in 4 KiB pages cost ~6x the copy: bench/bench_torch_copy.py)."""
    if (src is None or dst is None or any(x is None for x in (*src, *dst))
            or any(a[2] != b[2] for a, b in zip(src, dst, strict=True))):
        return False
    mod = _BLOCK_COPY.get("module")
    if mod is None:
        from ..kernels.cpu import block_copy as mod
        _BLOCK_COPY["module"] = mod
    if not mod.available():
        return False
    # private copies: an id tensor may be a view of a cache being written
    ids = [None if x is None else x.clone(memory_format=torch.contiguous_format)
           for x in (src_ids, dst_ids)]
    total = n * sum(b for _, _, b in src)
    threads = max(1, min(torch.get_num_threads(), total // THREAD_MIN_BYTES))
    if new is not None:
        mod.advise_new_output(new.data_ptr(), new.numel() * new.element_size())
    mod.copy_blocks([a for a, _, _ in src], [a for a, _, _ in dst], [s for _, s, _ in src],
                    [s for _, s, _ in dst], [b for _, _, b in src], n,
                    *(None if x is None else x.data_ptr() for x in ids), src_blocks,
                    dst_blocks, streaming=total >= STREAM_MIN_BYTES, threads=threads)
    return True


def _layouts(tensors, written: bool = False) -> list | None:
    out = []
    for t in tensors:
        layout = _block_layout(t, written)
        if layout is None:
            return None
        out.append(layout)
    return out


def _sources_written(s: torch.Tensor, d: torch.Tensor) -> bool:
    """Whether a block is read by one pair and written by another (host int64 ids): then a
    one-pass copy could read a block already overwritten."""
    s_np, d_np = s.numpy(), d.numpy()
    return bool(np.isin(d_np[s_np != d_np], s_np).any())


def _host_ids(name: str, ids: torch.Tensor, upper: int) -> bool:
    """Whether ``ids`` are on the host, after _host_bounds' guard there (a device's are bounded
    by the op itself: reads clamped, writes out of range dropped, no sync)."""
    if ids.device.type != "cpu":
        return False
    _host_bounds(name, ids, upper)
    return True


def copy_blocks(caches, src, dst) -> None:
    """Per cache, the source blocks gathered into a staging buffer, then written (every read
    before any write: src and dst may overlap)."""
    s, d = src.to(torch.int64), dst.to(torch.int64)
    caches = _bytes(*caches)
    num_blocks = caches[0].shape[0]
    host = _host_ids("src", s, num_blocks) & _host_ids("dst", d, num_blocks)
    if not host:
        s = s.clamp(0, num_blocks - 1)
    elif not _sources_written(s, d):  # one pass: no block read after it was written
        layouts = _layouts(caches, written=True)
        if _c_copy(layouts, layouts, s, d, s.shape[0], num_blocks, num_blocks):
            return
    stage = _staging(caches, s.shape[0])
    for c in caches:
        tmp = stage(c)
        cw, tw = (c, tmp) if _rows(c) is None else _wide(_rows(c), _rows(tmp))
        torch.index_select(cw, 0, s.to(c.device), out=tw)  # every read before any write
        if host:
            _index_copy(cw, d, tw)
        else:
            _index_copy(c, *_drop_out_of_range(c, d.to(c.device), tmp))


def _staging(caches, n: int):
    """One reusable [n, *block_shape] buffer per (dtype, device, block shape): the gathered
    blocks of one cache at a time."""
    bufs = {}

    def get(c: torch.Tensor) -> torch.Tensor:
        key = (c.dtype, c.device, tuple(c.shape[1:]))
        if key not in bufs:
            bufs[key] = c.new_empty((n, *c.shape[1:]))
        return bufs[key]
    return get


def gather_blocks(buffer: torch.Tensor, caches, block_ids) -> None:
    ids = block_ids.to(torch.int64)
    buffer, *caches = _bytes(buffer, *caches)
    if not _host_ids("block_ids", ids, caches[0].shape[0]):
        ids = ids.clamp(0, caches[0].shape[0] - 1)
    elif _c_copy(_layouts(caches), _part_layouts(buffer, written=True), ids, None,
                 ids.shape[0], caches[0].shape[0], buffer.shape[0],
                 new=buffer):  # the op's new output, or out= (advised if not yet faulted)
        return
    if buffer.is_contiguous() and len(caches) == 1:
        torch.index_select(caches[0], 0, ids.to(caches[0].device), out=buffer[:, 0])
        return
    if buffer.device.type == "cpu" and all(c.device.type == "cpu" for c in caches):
        for i, c in enumerate(caches):  # straight into the strided buffer[:, i]
            torch.index_select(c, 0, ids, out=buffer[:, i])
        return
    stage = _staging(caches, ids.shape[0])
    for i, c in enumerate(caches):
        tmp = stage(c)
        torch.index_select(c, 0, ids.to(c.device), out=tmp)
        buffer[:, i].copy_(tmp)


def scatter_blocks(caches, buffer, block_ids) -> None:
    ids = block_ids.to(torch.int64)
    buffer, *caches = _bytes(buffer, *caches)
    host = _host_ids("block_ids", ids, caches[0].shape[0])
    if host and _c_copy(_part_layouts(buffer), _layouts(caches, written=True), None, ids,
                        ids.shape[0], buffer.shape[0], caches[0].shape[0]):
        return
    for i, c in enumerate(caches):
        rows = buffer[:, i].to(c.device)
        if host:
            _index_copy(c, ids.to(c.device), rows)
        else:
            _index_copy(c, *_drop_out_of_range(c, ids.to(c.device), rows))


def swap_blocks(src_caches, dst_caches, src_ids, dst_ids) -> None:
    s, d = src_ids.to(torch.int64), dst_ids.to(torch.int64)
    src_caches, dst_caches = _bytes(*src_caches), _bytes(*dst_caches)
    s_host = _host_ids("src_ids", s, src_caches[0].shape[0])
    if not s_host:
        s = s.clamp(0, src_caches[0].shape[0] - 1)
    d_host = _host_ids("dst_ids", d, dst_caches[0].shape[0])
    if s_host and d_host and _c_copy(_layouts(src_caches), _layouts(dst_caches, written=True),
                                     s, d, s.shape[0], src_caches[0].shape[0],
                                     dst_caches[0].shape[0]):
        return  # host to host, one pass
    moved: dict = {}

    def on(ids, device):  # each id tensor moved to each device once, not once per cache
        key = (id(ids), device)
        if key not in moved:
            moved[key] = ids.to(device)
        return moved[key]

    stage = _staging(src_caches, s.shape[0])
    for a, b in zip(src_caches, dst_caches, strict=True):
        if a.device == b.device:
            tmp = stage(a)
            torch.index_select(a, 0, on(s, a.device), out=tmp)
            if d_host:
                _index_copy(b, on(d, b.device), tmp)
            else:
                _index_copy(b, *_drop_out_of_range(b, on(d, b.device), tmp))
        else:  # device <-> host: one transfer of the gathered blocks per cache
            blocks = a.index_select(0, on(s, a.device))
            # host -> device is ordered on the stream; device -> host must land before the
            # host-side index_copy_ reads it (a non_blocking copy there would race)
            blocks = blocks.to(b.device, non_blocking=b.device.type != "cpu")
            if d_host:
                b.index_copy_(0, on(d, b.device), blocks)
            else:
                b.index_copy_(0, *_drop_out_of_range(b, on(d, b.device), blocks))
