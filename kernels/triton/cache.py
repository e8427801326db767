"""Triton kernels of the cache ops: write_kv (one program per token, negative slots skipped;
into float8_e4m3fn caches it quantizes, see _e4m3_bits) and block gather/scatter (one program
per block x chunk); copy_blocks moves each block once, src straight to dst, except a dst block
that some pair also reads, which goes through a staging buffer and a second launch, so every
read of it happens before it is written, whatever the src/dst overlap (see copy_blocks).

Copies move raw bits: float caches are viewed as same-width integers (exact, and the
interpreter's bf16 handling never matters). Caches may be views with any strides, as long as
each block's ``[block_size, ...]`` data is contiguous for gather/scatter. Index tensors
(slot_mapping, block ids) are read as contiguous: the torch frontend copies other views.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._interp import patch_interpreter

patch_interpreter()

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS[t.element_size()])


@triton.jit
def _load_f32(ptr, mask, IN_BF16: tl.constexpr):
    """(float32 of a float32/float16 element, or of a bfloat16 one given as its int16 bits (a
    16-bit shift: exact, and the interpreter's bf16 handling never matters); its sign bit as
    0x80 or 0, from its own bits: a GPU's division gives every NaN one sign)."""
    raw = tl.load(ptr, mask=mask)
    if IN_BF16:
        bits = raw.to(tl.int32) << 16
        return bits.to(tl.float32, bitcast=True), (bits >> 24) & 0x80
    if raw.dtype.primitive_bitwidth == 16:
        sign = (raw.to(tl.int16, bitcast=True).to(tl.int32) >> 8) & 0x80
    else:
        sign = (raw.to(tl.int32, bitcast=True) >> 24) & 0x80
    return raw.to(tl.float32), sign


@triton.jit
def _e4m3_bits(x, scale, sign):
    """float8_e4m3fn bits (int8) of sat(x / scale), x and scale float32: IEEE division
    (div_rn, never the approximate division of ``/``), then the rounding done on the float32
    bits with integer ops, ties to even (bit-exact with quantize_fp8_reference on any GPU and
    in the interpreter, whose own float8 conversion does not round to nearest even): normals
    keep 3 of 23 mantissa bits, subnormals (|y| < 2^-6) round |y| * 2^9 to an integer,
    |y| >= 448 and +-inf saturate to 0x7e, NaN gives 0x7f; ``sign`` (x's sign bit as 0x80 or
    0: the quotient's, scale > 0, but for a NaN, whose sign a GPU's division drops) is set."""
    u = tl.math.div_rn(x, scale).to(tl.int32, bitcast=True)
    a_bits = u & 0x7FFFFFFF
    a = a_bits.to(tl.float32, bitcast=True)
    keep = (a_bits >> 20) & 0x7
    rem = a_bits & 0xFFFFF
    up = (rem > 0x80000) | ((rem == 0x80000) & ((keep & 1) == 1))
    normal = ((((a_bits >> 23) - 120) << 3) | keep) + up.to(tl.int32)
    t = tl.where(a < 0.015625, a, 0.0) * 512.0  # exact (a power of two); no inf/NaN cast
    whole = t.to(tl.int32)  # t >= 0: truncation is the floor
    frac = t - whole.to(tl.float32)
    sub = whole + ((frac > 0.5) | ((frac == 0.5) & ((whole & 1) == 1))).to(tl.int32)
    mag = tl.where(a < 0.015625, sub, normal)
    mag = tl.where(a >= 448.0, 0x7E, mag)
    mag = tl.where(a_bits > 0x7F800000, 0x7F, mag)
    return (mag | sign).to(tl.int8)


@triton.jit
def _write_kv_kernel(key_ptr, value_ptr, k_ptr, v_ptr, slots_ptr, ks_ptr, vs_ptr, num_slots,
                     stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
                     stride_cb, stride_ct, stride_ch, stride_cd,
                     stride_db, stride_dt, stride_dh, stride_dd,
                     NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, FP8: tl.constexpr,
                     IN_BF16: tl.constexpr):
    """Row ``tok`` of key/value to slot slots[tok] of the caches, BLOCK_H heads a program: the
    bits as they are, or with FP8 into float8_e4m3fn caches (given as int8), each row
    quantized by its cache's scale (ks_ptr, vs_ptr: one float32 each; unread without FP8)
    with _e4m3_bits (IN_BF16: bfloat16 rows given as their int16 bits)."""
    tok = tl.program_id(0).to(tl.int64)  # tok * stride_kt passes 2**31 in big batches
    slot = tl.load(slots_ptr + tok).to(tl.int64)
    # a slot past the cache is skipped like a negative one: on a device the frontends check
    # values only on request (a check is a host sync), and a store must never leave the cache
    if (slot >= 0) & (slot < num_slots):
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        # int64: in a head-outermost cache view ([heads, blocks, ...] storage) h * stride_ch
        # passes 2**31 elements
        h = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        mask = (h[:, None] < NUM_HEADS) & (d[None, :] < HEAD_DIM)
        k_src = key_ptr + tok * stride_kt + h[:, None] * stride_kh + d[None, :] * stride_kd
        v_src = value_ptr + tok * stride_vt + h[:, None] * stride_vh + d[None, :] * stride_vd
        if FP8:
            kf, k_sign = _load_f32(k_src, mask, IN_BF16)
            vf, v_sign = _load_f32(v_src, mask, IN_BF16)
            kx = _e4m3_bits(kf, tl.load(ks_ptr), k_sign)
            vx = _e4m3_bits(vf, tl.load(vs_ptr), v_sign)
        else:
            kx = tl.load(k_src, mask=mask)
            vx = tl.load(v_src, mask=mask)
        tl.store(k_ptr + blk * stride_cb + off * stride_ct + h[:, None] * stride_ch
                 + d[None, :] * stride_cd, kx, mask=mask)
        tl.store(v_ptr + blk * stride_db + off * stride_dt + h[:, None] * stride_dh
                 + d[None, :] * stride_dd, vx, mask=mask)


@triton.jit
def _clamped_block(id_, num_rows):
    """A block id (any integer type) as int64, clamped into the ``num_rows`` blocks: the block
    a gather or copy reads for it."""
    return tl.minimum(tl.maximum(id_.to(tl.int64), 0), num_rows - 1)


@triton.jit
def _gather_blocks_kernel(src_ptr, ids_ptr, dst_ptr, stride_src, stride_dst, num_rows,
                          BLOCK_NUMEL: tl.constexpr, BLOCK: tl.constexpr):
    """dst[i] = src[ids[i]] (flat block data); program (i, chunk). An id outside the
    ``num_rows`` blocks of src (unchecked on a device) reads the nearest one, never outside."""
    i = tl.program_id(0)
    chunk = tl.program_id(1)
    b = _clamped_block(tl.load(ids_ptr + i), num_rows)
    e = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = e < BLOCK_NUMEL
    x = tl.load(src_ptr + b * stride_src + e, mask=mask)
    tl.store(dst_ptr + i.to(tl.int64) * stride_dst + e, x, mask=mask)


@triton.jit
def _scatter_blocks_kernel(src_ptr, ids_ptr, dst_ptr, stride_src, stride_dst, num_rows,
                           BLOCK_NUMEL: tl.constexpr, BLOCK: tl.constexpr):
    """dst[ids[i]] = src[i] (flat block data); program (i, chunk). An id outside the
    ``num_rows`` blocks of dst (unchecked on a device) is skipped: no store leaves dst."""
    i = tl.program_id(0)
    chunk = tl.program_id(1)
    b = tl.load(ids_ptr + i).to(tl.int64)
    e = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = (e < BLOCK_NUMEL) & (b >= 0) & (b < num_rows)
    x = tl.load(src_ptr + i.to(tl.int64) * stride_src + e, mask=mask)
    tl.store(dst_ptr + b * stride_dst + e, x, mask=mask)


@triton.jit
def _mark_read_blocks_kernel(src_ptr, marks_ptr, n, num_rows, BLOCK: tl.constexpr):
    """marks[b] = 1 for every block b that copy_blocks reads: src ids clamped to the
    ``num_rows`` blocks, as _copy_blocks_kernel reads them."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    b = _clamped_block(tl.load(src_ptr + i, mask=m, other=0), num_rows)
    tl.store(marks_ptr + b, tl.full([BLOCK], 1, tl.int8), mask=m)


@triton.jit
def _copy_blocks_kernel(cache_ptr, src_ptr, dst_ptr, marks_ptr, tmp_ptr, stride, num_rows,
                        BLOCK_NUMEL: tl.constexpr, BLOCK: tl.constexpr, STAGED: tl.constexpr):
    """One pair i (program (i, chunk)) of copy_blocks, in one cache of flat block data.

    STAGED False (first launch): reads src[i] (clamped, as the gather); a dst block no pair
    reads (marks 0) is written at once, one that some pair reads goes to tmp[i] instead.
    STAGED True (second launch, after every read): tmp[i] to those dst blocks. A dst outside
    the ``num_rows`` blocks (unchecked on a device) is skipped."""
    i = tl.program_id(0)
    chunk = tl.program_id(1)
    d = tl.load(dst_ptr + i).to(tl.int64)
    live = (d >= 0) & (d < num_rows)
    mark = tl.load(marks_ptr + _clamped_block(d, num_rows))
    read = mark != 0
    e = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = e < BLOCK_NUMEL
    tmp = tmp_ptr + i.to(tl.int64) * BLOCK_NUMEL + e
    out = cache_ptr + d * stride + e
    if STAGED:
        x = tl.load(tmp, mask=mask & live & read)
        tl.store(out, x, mask=mask & live & read)
    else:
        s = _clamped_block(tl.load(src_ptr + i), num_rows)
        x = tl.load(cache_ptr + s * stride + e, mask=mask)
        tl.store(tmp, x, mask=mask & read)
        tl.store(out, x, mask=mask & live & (mark == 0))


def _p2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def block_contiguous(t: torch.Tensor) -> bool:
    """Each block t[i] is one contiguous run of memory."""
    return t[0].is_contiguous() if t.shape[0] else True


def write_kv(key, value, k_cache, v_cache, slot_mapping, *, k_scale=None, v_scale=None) -> None:
    """key/value rows to their slots, bit for bit; into float8_e4m3fn caches quantized by
    k_scale / v_scale (0-d float32 tensors on the caches' device, or None for 1.0)."""
    n = slot_mapping.shape[0]
    if n == 0:
        return
    _, block_size, num_heads, head_dim = k_cache.shape
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    key, value = key[:n], value[:n]
    ks = vs = slot_mapping  # read only with fp8
    if fp8:
        one = None
        if k_scale is None or v_scale is None:
            one = torch.ones((), dtype=torch.float32, device=k_cache.device)
        ks = one if k_scale is None else k_scale
        vs = one if v_scale is None else v_scale
    bf16 = fp8 and key.dtype == torch.bfloat16
    if fp8 and not bf16:  # float32 / float16 rows are read as they are
        kc, vc = k_cache.view(torch.int8), v_cache.view(torch.int8)
    else:
        key, value, kc, vc = _raw(key), _raw(value), _raw(k_cache), _raw(v_cache)
    block_h = write_kv_heads_per_program(num_heads, head_dim)
    _write_kv_kernel[(n, triton.cdiv(num_heads, block_h))](
        key, value, kc, vc, slot_mapping, ks, vs, k_cache.shape[0] * block_size, *key.stride(),
        *value.stride(), *kc.stride(), *vc.stride(), NUM_HEADS=num_heads, HEAD_DIM=head_dim,
        BLOCK_H=block_h, BLOCK_D=_p2(head_dim), BLOCK_SIZE=block_size, FP8=fp8, IN_BF16=bf16)


def write_kv_heads_per_program(num_heads: int, head_dim: int) -> int:
    """Heads of one token a write_kv program moves: at most 2048 elements (4 warps, 16 a
    thread with their int64 addresses); the whole [32, 128] row spilled on sm_80 and sm_90."""
    return max(1, min(_p2(num_heads), 2048 // _p2(head_dim)))


def _block_launch(kernel, src, ids, dst, numel, stride_src, stride_dst, num_rows):
    """``num_rows``: blocks of the tensor ``ids`` index (src of a gather, dst of a scatter)."""
    n = ids.shape[0]
    if n == 0 or numel == 0 or num_rows == 0:
        return
    block = min(4096, _p2(numel))
    kernel[(n, triton.cdiv(numel, block))](src, ids, dst, stride_src, stride_dst, num_rows,
                                           BLOCK_NUMEL=numel, BLOCK=block)


def gather_blocks(buffer, caches, block_ids) -> None:
    numel = buffer[0, 0].numel() if buffer.shape[0] else 0
    raw = _raw(buffer)
    for i, c in enumerate(caches):
        if not block_contiguous(c):
            raise ValueError(f"caches[{i}]: the triton backend needs each block contiguous")
        # buffer[:, i] rows: stride buffer.stride(0)
        _block_launch(_gather_blocks_kernel, _raw(c), block_ids, raw[:, i], numel,
                      c.stride(0), buffer.stride(0), c.shape[0])


def scatter_blocks(caches, buffer, block_ids) -> None:
    numel = buffer[0, 0].numel() if buffer.shape[0] else 0
    raw = _raw(buffer.contiguous())
    for i, c in enumerate(caches):
        if not block_contiguous(c):
            raise ValueError(f"caches[{i}]: the triton backend needs each block contiguous")
        _block_launch(_scatter_blocks_kernel, raw[:, i], block_ids, _raw(c), numel,
                      raw.stride(0), c.stride(0), c.shape[0])


def copy_blocks(caches, src, dst) -> None:
    """In place, all reads before any write. A first launch marks the blocks read (src); then
    per cache one launch copies every pair whose dst no pair reads straight across (one read and
    one write of the block, as vLLM's copy kernel, which assumes no overlap) and stages the
    others in a buffer, which a second launch writes to their dst. With src and dst disjoint
    (copy-on-write: fresh dst blocks) every block moves once; the former gather-then-scatter
    moved each twice. No host sync: the ids may stay on the device."""
    n = src.shape[0]
    if n == 0 or not caches:
        return
    num_rows = caches[0].shape[0]
    for i, c in enumerate(caches):
        if not block_contiguous(c):
            raise ValueError(f"caches[{i}]: the triton backend needs each block contiguous")
        if c.shape[0] != num_rows:  # the marks index every cache's blocks alike
            raise ValueError(f"caches[{i}]: expected {num_rows} blocks (from caches[0]), got "
                             f"{c.shape[0]}")
        if num_rows > 1 and c.stride(0) < c[0].numel():  # ids apart, memory shared
            raise ValueError(f"caches[{i}]: its blocks overlap in memory (stride "
                             f"{c.stride(0)} < {c[0].numel()} elements a block)")
    if num_rows == 0:
        return
    device = caches[0].device
    marks = torch.zeros(num_rows, dtype=torch.int8, device=device)
    _mark_read_blocks_kernel[(triton.cdiv(n, 1024),)](src, marks, n, num_rows, BLOCK=1024)
    nbytes = max(c[0].numel() * c.element_size() for c in caches)
    staging = torch.empty(n * nbytes, dtype=torch.int8, device=device)
    for c in caches:
        numel = c[0].numel()
        if numel == 0:
            continue
        tmp = staging[:n * numel * c.element_size()].view(_BITS[c.element_size()])
        block = min(4096, _p2(numel))
        for staged in (False, True):
            _copy_blocks_kernel[(n, triton.cdiv(numel, block))](
                _raw(c), src, dst, marks, tmp, c.stride(0), num_rows, BLOCK_NUMEL=numel,
                BLOCK=block, STAGED=staged)


def supports_blocks(**ctx) -> tuple[bool, str]:
    if not ctx.get("block_contiguous", True):
        return False, "needs each cache block contiguous (caches[i][b].is_contiguous())"
    return True, ""
