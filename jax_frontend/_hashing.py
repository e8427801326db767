"""JAX ``hash_blocks``: prefixkv-v1 block hashes (BLAKE3 keyed chain) on the device.

Spec (docs/hashing.md, reference ``prefixkv.paged.reference.hashing``)::

    key  = BLAKE3.derive_key("prefixkv v1 block hash", salt)      # on the host, 8 u32 words
           (context "prefixkv v1 block hash with extra words" for calls with extra)
    h_-1 = parent (32 zero bytes by default)
    h_i  = BLAKE3.keyed_hash(key, h_{i-1} || le_u32(tokens[i*B:(i+1)*B]) || extra_i)

Backends (registry ``HASH_BLOCKS_BACKENDS``):

* ``xla`` (cpu, cuda, rocm, tpu; lowest priority): jnp uint32 ops. The chains of all sequences
  run side by side as one vector lane each, in a ``lax.fori_loop`` over the block index within
  a sequence. Any block size (messages over 1024 bytes use BLAKE3's chunk tree, whose shape is
  static for a given block size).
* ``host`` (cpu, when the C extension is built): the compiled C chain of
  ``prefixkv.kernels.cpu`` (the host fast path) through ``jax.pure_callback``.
* ``pallas_tpu`` (tpu): the Pallas kernel of ``prefixkv.kernels.pallas.hashing``; messages of
  one BLAKE3 chunk (block_size <= 248 tokens, 244 with ``extra``).

Works under ``jax.jit`` with ``block_size`` (and ``salt``, ``parent`` given as bytes) static;
no x64 needed.
"""

from __future__ import annotations

import functools
import struct

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..kernels._vma import match_varying
from ..paged.hashing import host_supports, kernel_supports
from ..paged.reference.hashing import (
    BLOCK_LEN,
    CHUNK_END,
    CHUNK_LEN,
    CHUNK_START,
    IV,
    KEYED_HASH,
    MSG_PERMUTATION,
    PARENT,
    ROOT,
    block_key,
    parent_words,
)
from ..paged.registry import Backend, Registry
from ..paged.validate import check_hash_blocks, check_hash_blocks_values, value_checks_enabled
from ._ops import _dispatch, _on_host, check_static

# ------------------------------------------------------------- lane-parallel BLAKE3 in jnp
#
# The state is kept as four rows of four words (a = v0..3, b = v4..7, c = v8..11, d = v12..15),
# each u32[4, lanes], so the four column G's of a round are one vector G, and the diagonal step
# is the same G after rotating rows b, c, d by 1, 2, 3 words. This keeps the traced program
# small (XLA compile time grows fast with unrolled scalar G's).

_PERM = np.array(MSG_PERMUTATION, dtype=np.int32)


def _u32(c: int):
    return jnp.asarray(c, dtype=jnp.uint32)


def _rotr(x, n: int):
    return (x >> _u32(n)) | (x << _u32(32 - n))


def _g4(a, b, c, d, mx, my):
    a = a + b + mx
    d = _rotr(d ^ a, 16)
    c = c + d
    b = _rotr(b ^ c, 12)
    a = a + b + my
    d = _rotr(d ^ a, 8)
    c = c + d
    b = _rotr(b ^ c, 7)
    return a, b, c, d


def _round(a, b, c, d, m):
    a, b, c, d = _g4(a, b, c, d, m[0:8:2], m[1:8:2])
    b, c, d = jnp.roll(b, -1, axis=0), jnp.roll(c, -2, axis=0), jnp.roll(d, -3, axis=0)
    a, b, c, d = _g4(a, b, c, d, m[8:16:2], m[9:16:2])
    b, c, d = jnp.roll(b, 1, axis=0), jnp.roll(c, 2, axis=0), jnp.roll(d, 3, axis=0)
    return a, b, c, d


def compress_rows(cv, m, counter: int, block_len, flags):
    """BLAKE3 compression, lane by lane: cv u32[8, lanes], m u32[16, lanes]; block_len and
    flags ints or u32 scalars -> the new chaining value u32[8, lanes]."""
    lanes = cv.shape[1]
    a, b = cv[0:4], cv[4:8]
    c = jnp.broadcast_to(jnp.asarray(np.array(IV[:4], np.uint32))[:, None], (4, lanes))
    d = jnp.stack([_u32(counter & 0xFFFFFFFF), _u32(counter >> 32),
                   jnp.asarray(block_len, jnp.uint32), jnp.asarray(flags, jnp.uint32)])
    d = jnp.broadcast_to(d[:, None], (4, lanes))

    def body(_, carry):
        a, b, c, d, m = carry
        a, b, c, d = _round(a, b, c, d, m)
        return a, b, c, d, m[_PERM]

    # inside shard_map the carry must vary over the mesh axes its updates do (those of the
    # message words, the chain value and the traced block_len / flags)
    init = match_varying((a, b, c, d, m), cv, m, block_len, flags)
    a, b, c, d, _ = lax.fori_loop(0, 7, body, init)
    return jnp.concatenate([a ^ c, b ^ d])


def _chunk_last(key, words, chunk_index: int, flags: int):
    """Compress all blocks of one chunk (words u32[n, lanes], n <= 256) but the last; return
    the last one's compression inputs."""
    n, lanes = words.shape
    nblocks = max(1, -(-n // 16))
    last_len = 4 * (n - 16 * (nblocks - 1))
    words = jnp.concatenate([words, jnp.zeros((16 * nblocks - n, lanes), jnp.uint32)])
    blocks = words.reshape(nblocks, 16, lanes)
    cv = jnp.broadcast_to(key[:, None], (8, lanes))
    if nblocks == 1:
        return cv, blocks[0], chunk_index, last_len, flags | CHUNK_START | CHUNK_END
    cv = compress_rows(cv, blocks[0], chunk_index, BLOCK_LEN, flags | CHUNK_START)
    if nblocks > 2:
        cv = lax.fori_loop(1, nblocks - 1, lambda j, cv: compress_rows(
            cv, blocks[j], chunk_index, BLOCK_LEN, flags), cv)
    return cv, blocks[nblocks - 1], chunk_index, last_len, flags | CHUNK_END


def _subtree_last(key, words, first_chunk: int, flags: int):
    chunk_words = CHUNK_LEN // 4
    n, lanes = words.shape
    if n <= chunk_words:
        return _chunk_last(key, words, first_chunk, flags)
    num_chunks = -(-n // chunk_words)
    left_chunks = 1 << ((num_chunks - 1).bit_length() - 1)
    split = left_chunks * chunk_words
    left = compress_rows(*_subtree_last(key, words[:split], first_chunk, flags))
    right = compress_rows(*_subtree_last(key, words[split:], first_chunk + left_chunks, flags))
    cv = jnp.broadcast_to(key[:, None], (8, lanes))
    return cv, jnp.concatenate([left, right]), 0, BLOCK_LEN, flags | PARENT


def keyed_hash_rows(key, words):
    """BLAKE3 keyed_hash (32-byte output), lane by lane: key u32[8], words u32[n, lanes]
    (the message as n little-endian words) -> u32[8, lanes]. Any n (chunk tree)."""
    cv, blk, counter, blen, f = _subtree_last(key, words, 0, KEYED_HASH)
    return compress_rows(cv, blk, counter, blen, f | ROOT)


# ------------------------------------------------------------------------- XLA chain


def _chain_geometry(cu, block_size: int):
    start = cu[:-1]
    nb = (cu[1:] - start) // block_size
    boff = jnp.cumsum(nb) - nb
    return start, nb, boff


@functools.partial(jax.jit, static_argnames=("block_size", "num_out"))
def hash_chain_xla(tok, cu, key, parents, extra, *, block_size: int, num_out: int):
    """tok u32[num_tokens], cu i32[num_seqs+1], key u32[8], parents u32[num_seqs, 8],
    extra u32[num_out, 4] | None -> u32[num_out, 8] (rows without a block stay 0)."""
    num_seqs = cu.shape[0] - 1
    out = jnp.zeros((num_out, 8), jnp.uint32)
    if num_out == 0 or num_seqs == 0:
        return out
    start, nb, boff = _chain_geometry(cu, block_size)
    offs = jnp.arange(block_size, dtype=jnp.int32)

    def body(i, carry):
        h, out = carry
        active = i < nb
        idx = jnp.where(active[None, :], start[None, :] + i * block_size + offs[:, None], 0)
        words = tok[idx]  # [block_size, num_seqs]
        row = jnp.where(active, boff + i, num_out)
        parts = [h, words]
        if extra is not None:
            parts.append(extra[jnp.minimum(row, num_out - 1)].T)  # [4, num_seqs]
        new = keyed_hash_rows(key, jnp.concatenate(parts))  # [8, num_seqs]
        h = jnp.where(active[None, :], new, h)
        out = out.at[row].set(new.T, mode="drop")
        return h, out

    init = match_varying((parents.T, out), tok, cu, key, parents, extra)  # inside shard_map
    _, out = lax.fori_loop(0, jnp.max(nb), body, init)
    return out


# --------------------------------------------------------------------------- frontend

HASH_BLOCKS_BACKENDS = Registry("hash_blocks")
HASH_BLOCKS_BACKENDS.register(Backend(
    name="xla", platforms=("cpu", "cuda", "rocm", "tpu"), priority=0,
    impl="prefixkv.jax_frontend._hashing:_run_xla",
    doc="jnp uint32 ops, all sequences' chains as vector lanes; any block size"))
HASH_BLOCKS_BACKENDS.register(Backend(
    name="host", platforms=("cpu",), priority=5, supports=host_supports,
    impl="prefixkv.jax_frontend._hashing:_run_host",
    doc="the compiled C chain of prefixkv.kernels.cpu through jax.pure_callback (CPU only)"))
HASH_BLOCKS_BACKENDS.register(Backend(
    name="pallas_tpu", platforms=("tpu",), priority=10, supports=kernel_supports,
    impl="prefixkv.jax_frontend._hashing:_run_pallas",
    doc="Pallas TPU kernel, one BLAKE3 chunk per message (block_size <= 248)"))


def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _run_xla(tok, cu, key, parents, extra, *, block_size, num_out, num_steps):
    del num_steps
    return hash_chain_xla(tok, cu, key, parents, extra, block_size=block_size, num_out=num_out)


def _host_chain(tok, cu, key, parents, *extra, block_size: int, num_out: int) -> np.ndarray:
    """The host callback: validates cu (it may have been traced) and runs the C chain."""
    from ..kernels.cpu.hashing import chain_digests

    cu = np.asarray(cu).astype(np.int64)
    tok = np.asarray(tok).view(np.int32)
    if cu[0] != 0 or (np.diff(cu) < 0).any() or cu[-1] != tok.size:
        raise ValueError(f"cu_lens: expected 0, non-decreasing values, num_tokens "
                         f"({tok.size}) last, got {cu.tolist()[:16]}")
    n = int((np.diff(cu) // block_size).sum())
    ext = np.asarray(extra[0]) if extra else None
    if ext is not None and ext.shape[0] != n:
        raise ValueError(f"extra: expected {n} rows (the full blocks of all sequences), "
                         f"got {ext.shape[0]}")
    out = np.zeros((num_out, 8), dtype=np.uint32)
    if n:
        digests = chain_digests(tok, block_size, cu, np.asarray(key).astype("<u4").tobytes(),
                                ext, np.asarray(parents), n)
        out[:n] = digests.view("<u4").reshape(n, 8)
    return out


@functools.lru_cache(maxsize=256)
def _host_callback(block_size: int, num_out: int):
    """One callable per static config: eager pure_callback dispatch caches its compiled call by
    the callback's identity, so a fresh partial per call compiled every call. Only the static
    shape parameters are bound; tokens, lengths, key, parents and extra are operands."""
    return functools.partial(_host_chain, block_size=block_size, num_out=num_out)


def _run_host(tok, cu, key, parents, extra, *, block_size, num_out, num_steps):
    del num_steps
    args = (tok, cu, key, parents) + (() if extra is None else (extra,))
    out = jax.pure_callback(_host_callback(block_size, num_out),
                            jax.ShapeDtypeStruct((num_out, 8), jnp.uint32), *args,
                            vmap_method="sequential")
    return match_varying(out, *args)  # inside shard_map: vary like the inputs


def _run_pallas(tok, cu, key, parents, extra, *, block_size, num_out, num_steps):
    from ..kernels.pallas.hashing import hash_blocks_pallas

    return hash_blocks_pallas(tok, cu, key, parents, extra, block_size=block_size,
                              num_out=num_out, num_steps=num_steps)


def hash_blocks(tokens, block_size: int, *, cu_lens=None, salt=None, extra=None, parent=None,
                backend: str | None = None):
    """prefixkv-v1 hashes of the full blocks of each sequence.

    tokens: i32[num_tokens], ids >= 0.
    block_size: int >= 1 (static under jit).
    cu_lens: i32[num_seqs + 1] or None (one sequence): 0, non-decreasing, num_tokens.
    salt: str | bytes | None, the namespace (static).
    extra: u32[num_full_blocks, 4] or None; row j joins the message of output block j.
    parent: None (32 zero bytes) | 32 bytes | u32[8] | u32[num_seqs, 8] | list of num_seqs
        entries (32 bytes or None): the chain value before each sequence's first block.
    backend: "xla" | "host" | "pallas_tpu" | None (env ``PREFIXKV_HASH_BLOCKS_BACKEND``,
        then priority).

    Returns u32[num_full_blocks, 8], sequence by sequence; word k = digest bytes 4k..4k+3
    little-endian (``prefixkv.paged.reference.hashing.words_to_digests`` gives bytes).
    When ``cu_lens`` is traced (under jit) and ``extra`` is None the number of full blocks is
    not static: the result then has ``num_tokens // block_size`` rows (an upper bound) and the
    rows past the real count are zero.
    """
    check_static(block_size=block_size, salt=salt)
    dims = check_hash_blocks(tokens, block_size, cu_lens=cu_lens, salt=salt, extra=extra,
                             parent=parent)
    block_size = dims.block_size
    concrete = not any(_is_tracer(x) for x in (tokens, cu_lens, extra))
    cu_host = None
    if cu_lens is not None and not _is_tracer(cu_lens):
        cu_host = np.asarray(cu_lens).astype(np.int64)
    # by where the inputs are, as the other ops decide (numpy tokens are on the host, also on
    # a TPU or GPU machine: jax's default backend had skipped their checks there)
    if concrete and value_checks_enabled(host_inputs=_on_host(tokens, cu_lens, extra)):
        check_hash_blocks_values(dims, tokens, cu_lens=cu_host, extra=extra)
    elif cu_lens is None or cu_host is not None:
        # the lengths (and so extra's row count) are known here whatever tokens is (traced,
        # or on a device): checked at no cost, so no call hashes past its tokens; token ids
        # only with the full checks
        check_hash_blocks_values(dims, np.zeros(0, np.int32), cu_lens=cu_host, extra=extra)

    if cu_lens is None:
        cu_host = np.array([0, dims.num_tokens], dtype=np.int64)
    if extra is not None:
        num_out = int(extra.shape[0])
    elif cu_host is not None:
        num_out = int((np.diff(cu_host) // block_size).sum())
    else:
        num_out = dims.num_tokens // block_size
    if cu_host is not None:
        nb = np.diff(cu_host) // block_size
        num_steps = int(nb.max()) if nb.size else 0
    else:
        num_steps = dims.num_tokens // block_size

    key_bytes = block_key(dims.salt, extra is not None)
    key = jnp.asarray(np.array(struct.unpack("<8I", key_bytes), dtype=np.uint32))
    if parent is None or isinstance(parent, (bytes, bytearray, memoryview, list, tuple)):
        parents = jnp.asarray(parent_words(parent, dims.num_seqs))
    else:
        parents = jnp.asarray(parent, dtype=jnp.uint32)
        parents = jnp.broadcast_to(parents.reshape(-1, 8), (dims.num_seqs, 8))
    tok = lax.bitcast_convert_type(jnp.asarray(tokens), jnp.uint32)
    cu = (jnp.asarray(cu_host, dtype=jnp.int32) if cu_lens is None
          else jnp.asarray(cu_lens, dtype=jnp.int32))
    ext = None if extra is None else jnp.asarray(extra, dtype=jnp.uint32)
    # under tracing the backend is chosen per platform when lowering, as for the other ops
    # (the CPU's pure_callback never lands in a TPU export)
    return _dispatch("hash_blocks", backend, dict(block_size=block_size,
                                                  has_extra=extra is not None),
                     lambda impl: impl(tok, cu, key, parents, ext, block_size=block_size,
                                       num_out=num_out, num_steps=num_steps),
                     operands=(tokens, cu_lens, extra, parent),  # a traced parent stages
                     registry=HASH_BLOCKS_BACKENDS)
