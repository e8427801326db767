"""Pallas (TPU, Mosaic) BLAKE3 chain kernel of ``hash_blocks`` (prefixkv-v1).

One vector lane per sequence. A grid row holds ``sub x 128`` sequences as one (sub, 128) int32
tile per state word, so with ``sub = 8`` every vector op fills a whole vreg (8 sublanes x 128
lanes); ``sub`` shrinks for small batches and is chosen so that batches of more than 256
sequences make at least two grid rows for the two TensorCores of a megacore chip. The grid's
second axis walks the block index within a sequence ("arbitrary", sequential), carrying each
lane's chain value in a VMEM scratch. The wrapper gathers each step's message words into
``msg[T, words, rows, sub, 128]`` with XLA (tokens, then the 4 extra words, zero-padded to
whole 64-byte BLAKE3 blocks), and gathers the per-step outputs back into block order. All
arithmetic is int32 (wrapping add, xor, logical shifts), the uint32 words bitcast outside the
kernel.

Messages must fit one BLAKE3 chunk (1024 bytes): block_size <= 248 (244 with extra).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ...paged.reference.hashing import (
    CHUNK_END,
    CHUNK_START,
    IV,
    KEYED_HASH,
    MSG_PERMUTATION,
    ROOT,
    one_chunk_blocks,
)
from .._vma import out_struct

LANES = 128


def _i32(c: int) -> int:
    """A uint32 constant as the int32 with the same bits."""
    return int(np.array(c, dtype=np.uint32).view(np.int32))


def _rotr(x, n: int):
    return lax.shift_right_logical(x, jnp.full_like(x, n)) | lax.shift_left(
        x, jnp.full_like(x, 32 - n))


def _g(v, a, b, c, d, mx, my):
    v[a] = v[a] + v[b] + mx
    v[d] = _rotr(v[d] ^ v[a], 16)
    v[c] = v[c] + v[d]
    v[b] = _rotr(v[b] ^ v[c], 12)
    v[a] = v[a] + v[b] + my
    v[d] = _rotr(v[d] ^ v[a], 8)
    v[c] = v[c] + v[d]
    v[b] = _rotr(v[b] ^ v[c], 7)


def _compress(cv, m, block_len: int, flags: int):
    """cv: 8 int32[1, LANES] rows, m: 16 rows -> the new chaining value (8 rows); counter 0.

    The 7 rounds run as a loop whose carry holds the message rows; the message permutation is
    a static reordering of the carried rows, so the traced body is one round."""
    like = cv[0]
    v = tuple(cv) + tuple(jnp.full_like(like, _i32(c)) for c in IV[:4]) + (
        jnp.zeros_like(like), jnp.zeros_like(like), jnp.full_like(like, block_len),
        jnp.full_like(like, flags))

    def one_round(_, carry):
        v, m = list(carry[0]), carry[1]
        _g(v, 0, 4, 8, 12, m[0], m[1])
        _g(v, 1, 5, 9, 13, m[2], m[3])
        _g(v, 2, 6, 10, 14, m[4], m[5])
        _g(v, 3, 7, 11, 15, m[6], m[7])
        _g(v, 0, 5, 10, 15, m[8], m[9])
        _g(v, 1, 6, 11, 12, m[10], m[11])
        _g(v, 2, 7, 8, 13, m[12], m[13])
        _g(v, 3, 4, 9, 14, m[14], m[15])
        return tuple(v), tuple(m[i] for i in MSG_PERMUTATION)

    v, _ = lax.fori_loop(0, 7, one_round, (v, tuple(m)))
    return [v[i] ^ v[i + 8] for i in range(8)]


def _chain_kernel(nb_ref, key_ref, parent_ref, msg_ref, out_ref, h_ref, *, nblk: int,
                  last_len: int):
    """One grid step: every lane's message of block t. Refs hold (sub, 128) tiles: nb
    (1, sub, 128), key/parent (1, 8, sub, 128), msg (1, words, 1, sub, 128), out
    (1, 8, 1, sub, 128), h (8, sub, 128)."""
    t = pl.program_id(1)

    @pl.when(t == 0)
    def _init():
        h_ref[...] = parent_ref[0]

    h = [h_ref[k] for k in range(8)]
    cv = [key_ref[0, k] for k in range(8)]
    for j in range(nblk):
        last = j == nblk - 1
        flags = KEYED_HASH | (CHUNK_START if j == 0 else 0) | ((CHUNK_END | ROOT) if last else 0)
        # message words 16j..16j+15: the 8 chain words lead block 0, the data follows
        words = [h[w] if w < 8 else msg_ref[0, w - 8, 0] for w in range(16 * j, 16 * j + 16)]
        cv = _compress(cv, words, last_len if last else 64, flags)
    active = t < nb_ref[0]  # (sub, 128)
    for k in range(8):
        h_ref[k] = jnp.where(active, cv[k], h[k])
        out_ref[0, k, 0] = cv[k]


def check_block_size(block_size: int, has_extra: bool) -> tuple[int, int]:
    """(nblk, last_len) of a message; raises for messages over one chunk."""
    return one_chunk_blocks(block_size, has_extra, "the Pallas kernel")


def sublanes(num_seqs: int) -> int:
    """Sublanes of a grid row's tiles: ceil(num_seqs / 256), at most 8 (whole vregs, from 1793
    sequences on), so that more than 256 sequences make at least two grid rows (megacore)."""
    return max(1, min(8, -(-num_seqs // (2 * LANES))))


def chain_call(nb, key, parents, msg, *, nblk: int, last_len: int, interpret=False):
    """The pallas_call: nb i32[rows, sub, 128], key/parents i32[rows, 8, sub, 128],
    msg i32[T, 16*nblk-8, rows, sub, 128] -> i32[T, 8, rows, sub, 128], the chain value after
    each step."""
    num_steps, width, rows, sub, lanes = msg.shape
    kernel = functools.partial(_chain_kernel, nblk=nblk, last_len=last_len)
    return pl.pallas_call(
        kernel,
        grid=(rows, num_steps),
        in_specs=[
            pl.BlockSpec((1, sub, lanes), lambda r, t: (r, 0, 0)),
            pl.BlockSpec((1, 8, sub, lanes), lambda r, t: (r, 0, 0, 0)),
            pl.BlockSpec((1, 8, sub, lanes), lambda r, t: (r, 0, 0, 0)),
            pl.BlockSpec((1, width, 1, sub, lanes), lambda r, t: (t, 0, r, 0, 0)),
        ],
        out_specs=pl.BlockSpec((1, 8, 1, sub, lanes), lambda r, t: (t, 0, r, 0, 0)),
        out_shape=out_struct((num_steps, 8, rows, sub, lanes), jnp.int32, nb, key, parents, msg),
        scratch_shapes=[pltpu.VMEM((8, sub, lanes), jnp.int32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
    )(nb, key, parents, msg)


def hash_blocks_pallas(tok, cu, key, parents, extra, *, block_size: int, num_out: int,
                       num_steps: int, interpret=False):
    """tok u32[num_tokens], cu i32[num_seqs+1], key u32[8], parents u32[num_seqs, 8],
    extra u32[num_out, 4] | None -> u32[num_out, 8]. num_steps (static): at least the most
    full blocks of any sequence; rows past the real number of full blocks come back zero."""
    nblk, last_len = check_block_size(block_size, extra is not None)
    num_seqs = cu.shape[0] - 1
    if num_out == 0 or num_seqs == 0 or num_steps == 0:
        return jnp.zeros((num_out, 8), jnp.uint32)
    sub = sublanes(num_seqs)
    grid_rows = -(-num_seqs // (sub * LANES))
    s_pad = grid_rows * sub * LANES
    start = cu[:-1]
    nb = (cu[1:] - start) // block_size
    boff = jnp.cumsum(nb) - nb
    t = jnp.arange(num_steps, dtype=jnp.int32)
    active = t[:, None] < nb[None, :]  # [T, S]
    idx = start[None, None, :] + t[:, None, None] * block_size + jnp.arange(
        block_size, dtype=jnp.int32)[None, :, None]  # [T, B, S]
    data = jnp.where(active[:, None, :], tok[jnp.where(active[:, None, :], idx, 0)], 0)
    parts = [data]
    if extra is not None:
        rows = jnp.clip(boff[None, :] + t[:, None], 0, num_out - 1)  # [T, S]
        parts.append(jnp.where(active[:, None, :], extra[rows].transpose(0, 2, 1), 0))
    msg = jnp.concatenate(parts, axis=1)
    width = 16 * nblk - 8
    msg = jnp.pad(msg, ((0, 0), (0, width - msg.shape[1]), (0, s_pad - num_seqs)))

    def i32(x):
        return lax.bitcast_convert_type(x, jnp.int32)

    def tiles(x):  # [..., s_pad] -> [..., grid_rows, sub, 128]
        return x.reshape(*x.shape[:-1], grid_rows, sub, LANES)

    nb_p = tiles(jnp.pad(nb, (0, s_pad - num_seqs)).astype(jnp.int32))
    key_p = jnp.broadcast_to(i32(key)[None, :, None, None], (grid_rows, 8, sub, LANES))
    par_p = tiles(jnp.pad(i32(parents).T, ((0, 0), (0, s_pad - num_seqs))))
    par_p = par_p.transpose(1, 0, 2, 3)  # [grid_rows, 8, sub, 128]
    steps = chain_call(nb_p, key_p, par_p, tiles(i32(msg)), nblk=nblk, last_len=last_len,
                       interpret=interpret).reshape(num_steps, 8, s_pad)
    # output row j: sequence s_j (the one whose block range holds j), step j - boff[s_j]
    j = jnp.arange(num_out, dtype=jnp.int32)
    ends = jnp.cumsum(nb)
    seq = jnp.clip(jnp.searchsorted(ends, j, side="right"), 0, num_seqs - 1).astype(jnp.int32)
    step = jnp.clip(j - boff[seq], 0, num_steps - 1)
    out = lax.bitcast_convert_type(steps[step, :, seq], jnp.uint32)
    return jnp.where((j < ends[-1])[:, None], out, jnp.uint32(0))
