"""Triton BLAKE3 chain kernel of ``hash_blocks`` (prefixkv-v1): one program per group of
``BLOCK_S`` sequences, one lane per sequence, the chain over the sequence's full blocks run in
a loop inside the kernel, uint32 arithmetic and rotations.

Each block's message (parent chain value, ``block_size`` tokens, optional 4 extra words) must
fit one BLAKE3 chunk (1024 bytes): block_size <= 248 tokens (244 with extra). The launcher
``hash_blocks_triton`` takes int32 tensors on one device (uint32 data bitcast to int32) and
returns int32[num_out, 8] (view it as uint32).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...paged.reference.hashing import one_chunk_blocks

# BLAKE3 domain flags and IV (the SHA-256 IV), from the BLAKE3 specification.
KEYED_HASH = tl.constexpr(16)
CHUNK_START = tl.constexpr(1)
CHUNK_END = tl.constexpr(2)
ROOT = tl.constexpr(8)


@triton.jit
def _rotr(x, N: tl.constexpr):
    return (x >> N) | (x << (32 - N))


@triton.jit
def _g(a, b, c, d, mx, my):
    a = a + b + mx
    d = _rotr(d ^ a, 16)
    c = c + d
    b = _rotr(b ^ c, 12)
    a = a + b + my
    d = _rotr(d ^ a, 8)
    c = c + d
    b = _rotr(b ^ c, 7)
    return a, b, c, d


@triton.jit
def _compress(v0, v1, v2, v3, v4, v5, v6, v7,
              m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15,
              block_len, flags):
    """BLAKE3 compression with counter 0: chaining value v0..v7 (uint32 lanes), message
    m0..m15, block_len and flags (uint32) -> the new chaining value (8 uint32 lanes).

    The 7 rounds are a loop (not unrolled: one copy of the round is what Triton compiles;
    unrolled chains took minutes to compile for 128-token blocks), permuting the message
    between rounds (after the last too, unused)."""
    zero = v0 * 0
    v8 = zero + 0x6A09E667
    v9 = zero + 0xBB67AE85
    v10 = zero + 0x3C6EF372
    v11 = zero + 0xA54FF53A
    v12 = zero
    v13 = zero
    v14 = zero + block_len
    v15 = zero + flags
    for _ in range(7):
        v0, v4, v8, v12 = _g(v0, v4, v8, v12, m0, m1)
        v1, v5, v9, v13 = _g(v1, v5, v9, v13, m2, m3)
        v2, v6, v10, v14 = _g(v2, v6, v10, v14, m4, m5)
        v3, v7, v11, v15 = _g(v3, v7, v11, v15, m6, m7)
        v0, v5, v10, v15 = _g(v0, v5, v10, v15, m8, m9)
        v1, v6, v11, v12 = _g(v1, v6, v11, v12, m10, m11)
        v2, v7, v8, v13 = _g(v2, v7, v8, v13, m12, m13)
        v3, v4, v9, v14 = _g(v3, v4, v9, v14, m14, m15)
        # the message permutation (2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8)
        m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15 = (
            m2, m6, m3, m10, m7, m0, m4, m13, m1, m11, m12, m5, m9, m14, m15, m8)
    return (v0 ^ v8, v1 ^ v9, v2 ^ v10, v3 ^ v11, v4 ^ v12, v5 ^ v13, v6 ^ v14, v7 ^ v15)


@triton.jit
def _word(tok_ptr, base, ext_ptr, row, active, w, BLOCK_SIZE: tl.constexpr,
          HAS_EXTRA: tl.constexpr):
    """Message word w (runtime, >= 0) of each lane's block past the parent chain value: a
    token (8 <= w < 8 + BLOCK_SIZE), an extra word (the next 4) or zero padding."""
    t = w - 8
    in_tok = active & (t >= 0) & (t < BLOCK_SIZE)
    r = tl.load(tok_ptr + base + t, mask=in_tok, other=0)
    if HAS_EXTRA:
        e = t - BLOCK_SIZE
        in_ext = active & (e >= 0) & (e < 4)
        r = tl.where(in_ext, tl.load(ext_ptr + row * 4 + e, mask=in_ext, other=0), r)
    return r.to(tl.uint32, bitcast=True)


@triton.jit
def _hash_blocks_kernel(tok_ptr, cu_ptr, boff_ptr, parent_ptr, ext_ptr, key_ptr, out_ptr,
                        num_seqs, num_steps, BLOCK_SIZE: tl.constexpr, HAS_EXTRA: tl.constexpr,
                        NBLK: tl.constexpr, LAST_LEN: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    s = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = s < num_seqs
    start = tl.load(cu_ptr + s, mask=smask, other=0)
    end = tl.load(cu_ptr + s + 1, mask=smask, other=0)
    nb = tl.where(smask, (end - start) // BLOCK_SIZE, 0)
    boff = tl.load(boff_ptr + s, mask=smask, other=0)
    h0 = tl.load(parent_ptr + s * 8 + 0, mask=smask, other=0).to(tl.uint32, bitcast=True)
    h1 = tl.load(parent_ptr + s * 8 + 1, mask=smask, other=0).to(tl.uint32, bitcast=True)
    h2 = tl.load(parent_ptr + s * 8 + 2, mask=smask, other=0).to(tl.uint32, bitcast=True)
    h3 = tl.load(parent_ptr + s * 8 + 3, mask=smask, other=0).to(tl.uint32, bitcast=True)
    h4 = tl.load(parent_ptr + s * 8 + 4, mask=smask, other=0).to(tl.uint32, bitcast=True)
    h5 = tl.load(parent_ptr + s * 8 + 5, mask=smask, other=0).to(tl.uint32, bitcast=True)
    h6 = tl.load(parent_ptr + s * 8 + 6, mask=smask, other=0).to(tl.uint32, bitcast=True)
    h7 = tl.load(parent_ptr + s * 8 + 7, mask=smask, other=0).to(tl.uint32, bitcast=True)
    zero = h0 * 0
    k0 = zero + tl.load(key_ptr + 0).to(tl.uint32, bitcast=True)
    k1 = zero + tl.load(key_ptr + 1).to(tl.uint32, bitcast=True)
    k2 = zero + tl.load(key_ptr + 2).to(tl.uint32, bitcast=True)
    k3 = zero + tl.load(key_ptr + 3).to(tl.uint32, bitcast=True)
    k4 = zero + tl.load(key_ptr + 4).to(tl.uint32, bitcast=True)
    k5 = zero + tl.load(key_ptr + 5).to(tl.uint32, bitcast=True)
    k6 = zero + tl.load(key_ptr + 6).to(tl.uint32, bitcast=True)
    k7 = zero + tl.load(key_ptr + 7).to(tl.uint32, bitcast=True)
    # a while loop, not range(num_steps): the Triton 3.6 interpreter cannot index a range
    # with a runtime bound under numpy >= 2.4
    i = num_steps * 0
    while i < num_steps:
        active = i < nb
        base = start + i * BLOCK_SIZE
        row = boff + i
        # the message's 64-byte blocks in a loop: block 0 opens with the parent chain value,
        # the last one is the chunk's end and the root
        c0, c1, c2, c3, c4, c5, c6, c7 = k0, k1, k2, k3, k4, k5, k6, k7
        lane = zero  # uint32 zeros, one per lane
        for j in range(NBLK):
            first = j == 0
            last = j == NBLK - 1
            w = 16 * j
            c0, c1, c2, c3, c4, c5, c6, c7 = _compress(
                c0, c1, c2, c3, c4, c5, c6, c7,
                tl.where(first, h0, _word(tok_ptr, base, ext_ptr, row, active, w + 0,
                                          BLOCK_SIZE, HAS_EXTRA)),
                tl.where(first, h1, _word(tok_ptr, base, ext_ptr, row, active, w + 1,
                                          BLOCK_SIZE, HAS_EXTRA)),
                tl.where(first, h2, _word(tok_ptr, base, ext_ptr, row, active, w + 2,
                                          BLOCK_SIZE, HAS_EXTRA)),
                tl.where(first, h3, _word(tok_ptr, base, ext_ptr, row, active, w + 3,
                                          BLOCK_SIZE, HAS_EXTRA)),
                tl.where(first, h4, _word(tok_ptr, base, ext_ptr, row, active, w + 4,
                                          BLOCK_SIZE, HAS_EXTRA)),
                tl.where(first, h5, _word(tok_ptr, base, ext_ptr, row, active, w + 5,
                                          BLOCK_SIZE, HAS_EXTRA)),
                tl.where(first, h6, _word(tok_ptr, base, ext_ptr, row, active, w + 6,
                                          BLOCK_SIZE, HAS_EXTRA)),
                tl.where(first, h7, _word(tok_ptr, base, ext_ptr, row, active, w + 7,
                                          BLOCK_SIZE, HAS_EXTRA)),
                _word(tok_ptr, base, ext_ptr, row, active, w + 8, BLOCK_SIZE, HAS_EXTRA),
                _word(tok_ptr, base, ext_ptr, row, active, w + 9, BLOCK_SIZE, HAS_EXTRA),
                _word(tok_ptr, base, ext_ptr, row, active, w + 10, BLOCK_SIZE, HAS_EXTRA),
                _word(tok_ptr, base, ext_ptr, row, active, w + 11, BLOCK_SIZE, HAS_EXTRA),
                _word(tok_ptr, base, ext_ptr, row, active, w + 12, BLOCK_SIZE, HAS_EXTRA),
                _word(tok_ptr, base, ext_ptr, row, active, w + 13, BLOCK_SIZE, HAS_EXTRA),
                _word(tok_ptr, base, ext_ptr, row, active, w + 14, BLOCK_SIZE, HAS_EXTRA),
                _word(tok_ptr, base, ext_ptr, row, active, w + 15, BLOCK_SIZE, HAS_EXTRA),
                tl.where(last, lane + LAST_LEN, lane + 64),
                lane + KEYED_HASH + tl.where(first, lane + CHUNK_START, lane)
                + tl.where(last, lane + (CHUNK_END + ROOT), lane))
        h0, h1, h2, h3, h4, h5, h6, h7 = c0, c1, c2, c3, c4, c5, c6, c7
        o = out_ptr + row * 8
        tl.store(o + 0, h0.to(tl.int32, bitcast=True), mask=active)
        tl.store(o + 1, h1.to(tl.int32, bitcast=True), mask=active)
        tl.store(o + 2, h2.to(tl.int32, bitcast=True), mask=active)
        tl.store(o + 3, h3.to(tl.int32, bitcast=True), mask=active)
        tl.store(o + 4, h4.to(tl.int32, bitcast=True), mask=active)
        tl.store(o + 5, h5.to(tl.int32, bitcast=True), mask=active)
        tl.store(o + 6, h6.to(tl.int32, bitcast=True), mask=active)
        tl.store(o + 7, h7.to(tl.int32, bitcast=True), mask=active)
        i += 1


def launch_geometry(block_size: int, has_extra: bool) -> tuple[int, int]:
    """(NBLK, LAST_LEN): 64-byte BLAKE3 blocks per message and the last one's length."""
    return one_chunk_blocks(block_size, has_extra, "the Triton kernel")


def hash_blocks_triton(tok, cu, boff, parents, extra, key, out, *, block_size: int,
                       num_steps: int, block_s: int = 32, num_warps: int = 1):
    """Run the chain kernel.

    tok: int32[num_tokens]; cu: int32[num_seqs + 1]; boff: int32[num_seqs] (first output row
    of each sequence); parents: int32[num_seqs, 8]; extra: int32[num_out, 4] or None;
    key: int32[8]; out: int32[num_out, 8], written in place (every row of a full block).
    num_steps: the most full blocks of any sequence (the loop's trip count).
    All contiguous, on one device (CPU tensors under TRITON_INTERPRET=1).
    """
    nblk, last_len = launch_geometry(block_size, extra is not None)
    num_seqs = int(cu.shape[0]) - 1
    if num_seqs <= 0 or out.shape[0] == 0 or num_steps <= 0:
        return out
    grid = (triton.cdiv(num_seqs, block_s),)
    _hash_blocks_kernel[grid](
        tok, cu, boff, parents, tok if extra is None else extra, key, out, num_seqs, num_steps,
        BLOCK_SIZE=block_size, HAS_EXTRA=extra is not None, NBLK=nblk, LAST_LEN=last_len,
        BLOCK_S=block_s, num_warps=num_warps)
    return out
