"""Reference of the ``prefixkv-v1`` block hash: a plain Python BLAKE3 and the block chain on it.

Written from the BLAKE3 specification (O'Connor, Aumasson, Neves, Wilcox-O'Hearn, "BLAKE3: one
function, fast everywhere", 2020), for clarity, not speed (~5k compressions/s). Tested against
the ``blake3`` package and the official test vectors in ``tests/test_hashing_reference.py``.

The spec ``prefixkv-v1`` (docs/hashing.md)::

    key  = BLAKE3.derive_key(context="prefixkv v1 block hash", key_material=salt)
           (context "prefixkv v1 block hash with extra words" when the call passes extra)
    h_-1 = parent (32 zero bytes by default)
    h_i  = BLAKE3.keyed_hash(key, h_{i-1} || le_u32(tokens[i*B:(i+1)*B]) || extra_i)

Only full blocks are hashed; ragged batches (``cu_lens``) chain sequence by sequence.
"""

from __future__ import annotations

import functools
import struct

import numpy as np

from ..spec import salt_bytes

# ------------------------------------------------------------------------------ BLAKE3 core

MASK = 0xFFFFFFFF
#: BLAKE3's IV: the first 32 bits of the fractional parts of the square roots of the first
#: 8 primes (the SHA-256 IV).
IV = (0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A,
      0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19)
#: Message word permutation applied between rounds.
MSG_PERMUTATION = (2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8)

CHUNK_START = 1 << 0
CHUNK_END = 1 << 1
PARENT = 1 << 2
ROOT = 1 << 3
KEYED_HASH = 1 << 4
DERIVE_KEY_CONTEXT = 1 << 5
DERIVE_KEY_MATERIAL = 1 << 6

BLOCK_LEN = 64
CHUNK_LEN = 1024
OUT_LEN = 32

#: The context strings of prefixkv-v1 (derive_key context; never change them within v1): the
#: key of calls without extra words, and of calls with them. Two keys, so that a block with
#: extra words never shares a message with one without (B tokens + 4 extra words would
#: otherwise be the bytes of B + 4 tokens).
PREFIXKV_V1_CONTEXT = "prefixkv v1 block hash"
PREFIXKV_V1_EXTRA_CONTEXT = "prefixkv v1 block hash with extra words"


def _rotr(x: int, n: int) -> int:
    return ((x >> n) | (x << (32 - n))) & MASK


def _g(s: list[int], a: int, b: int, c: int, d: int, mx: int, my: int) -> None:
    """The quarter-round G on state words a, b, c, d with message words mx, my."""
    s[a] = (s[a] + s[b] + mx) & MASK
    s[d] = _rotr(s[d] ^ s[a], 16)
    s[c] = (s[c] + s[d]) & MASK
    s[b] = _rotr(s[b] ^ s[c], 12)
    s[a] = (s[a] + s[b] + my) & MASK
    s[d] = _rotr(s[d] ^ s[a], 8)
    s[c] = (s[c] + s[d]) & MASK
    s[b] = _rotr(s[b] ^ s[c], 7)


def compress(cv: tuple[int, ...], block_words: list[int], counter: int, block_len: int,
             flags: int) -> list[int]:
    """The compression function: 8-word chaining value + 16-word block -> 16-word state.

    The first 8 output words are the new chaining value (and the first 32 output bytes).
    """
    s = [*cv, *IV[:4], counter & MASK, (counter >> 32) & MASK, block_len, flags]
    m = list(block_words)
    for r in range(7):
        # columns, then diagonals
        _g(s, 0, 4, 8, 12, m[0], m[1])
        _g(s, 1, 5, 9, 13, m[2], m[3])
        _g(s, 2, 6, 10, 14, m[4], m[5])
        _g(s, 3, 7, 11, 15, m[6], m[7])
        _g(s, 0, 5, 10, 15, m[8], m[9])
        _g(s, 1, 6, 11, 12, m[10], m[11])
        _g(s, 2, 7, 8, 13, m[12], m[13])
        _g(s, 3, 4, 9, 14, m[14], m[15])
        if r < 6:
            m = [m[i] for i in MSG_PERMUTATION]
    for i in range(8):
        s[i] ^= s[i + 8]
        s[i + 8] ^= cv[i]
    return s


def _words(block: bytes) -> list[int]:
    """64 bytes (zero-padded here) -> 16 little-endian u32 words."""
    return list(struct.unpack("<16I", block.ljust(BLOCK_LEN, b"\0")))


def _chunk_output(key: tuple[int, ...], chunk: bytes, chunk_index: int, flags: int):
    """Compress all but the last block of a chunk; return the last block's compression inputs
    (cv, words, counter, block_len, flags) so the caller can add ROOT if it is the root."""
    cv = key
    blocks = [chunk[i:i + BLOCK_LEN] for i in range(0, len(chunk), BLOCK_LEN)] or [b""]
    for j, block in enumerate(blocks):
        f = flags
        if j == 0:
            f |= CHUNK_START
        if j == len(blocks) - 1:
            return cv, _words(block), chunk_index, len(block), f | CHUNK_END
        cv = tuple(compress(cv, _words(block), chunk_index, BLOCK_LEN, f)[:8])
    raise AssertionError("unreachable")


def _subtree_output(key: tuple[int, ...], data: bytes, first_chunk: int, flags: int):
    """Compression inputs of the root node of the subtree over ``data`` (whole chunks from
    ``first_chunk``): a chunk if it fits one, else a parent node whose left child covers the
    largest power-of-two number of chunks that leaves at least one byte to the right."""
    if len(data) <= CHUNK_LEN:
        return _chunk_output(key, data, first_chunk, flags)
    num_chunks = -(-len(data) // CHUNK_LEN)
    left_chunks = 1 << ((num_chunks - 1).bit_length() - 1)
    split = left_chunks * CHUNK_LEN
    left = _subtree_output(key, data[:split], first_chunk, flags)
    right = _subtree_output(key, data[split:], first_chunk + left_chunks, flags)
    left_cv = compress(*left)[:8]
    right_cv = compress(*right)[:8]
    return key, left_cv + right_cv, 0, BLOCK_LEN, flags | PARENT


def blake3_hash(data: bytes, *, key_words: tuple[int, ...] = IV, flags: int = 0,
                out_len: int = OUT_LEN) -> bytes:
    """BLAKE3 of ``data`` in the mode given by ``key_words``/``flags``; extendable output."""
    cv, words, counter, block_len, f = _subtree_output(key_words, bytes(data), 0, flags)
    out = bytearray()
    output_block = 0
    while len(out) < out_len:  # the root node is recompressed with counter 0, 1, ... (XOF)
        state = compress(cv, words, output_block, block_len, f | ROOT)
        out += struct.pack("<16I", *state)
        output_block += 1
    return bytes(out[:out_len])


def blake3(data: bytes, out_len: int = OUT_LEN) -> bytes:
    """The BLAKE3 ``hash`` mode."""
    return blake3_hash(data, out_len=out_len)


def key_to_words(key: bytes) -> tuple[int, ...]:
    if len(key) != 32:
        raise ValueError(f"key: expected 32 bytes, got {len(key)}")
    return struct.unpack("<8I", key)


def keyed_hash(key: bytes, data: bytes, out_len: int = OUT_LEN) -> bytes:
    """The BLAKE3 ``keyed_hash`` mode (32-byte key)."""
    return blake3_hash(data, key_words=key_to_words(key), flags=KEYED_HASH, out_len=out_len)


def derive_key(context: str, key_material: bytes, out_len: int = OUT_LEN) -> bytes:
    """The BLAKE3 ``derive_key`` mode: hash the context string, then the key material keyed by
    that context key."""
    context_key = blake3_hash(context.encode("utf-8"), flags=DERIVE_KEY_CONTEXT)
    return blake3_hash(key_material, key_words=key_to_words(context_key),
                       flags=DERIVE_KEY_MATERIAL, out_len=out_len)


# ---------------------------------------------------------------------------- prefixkv-v1


def v1_context(extra: bool) -> str:
    """The derive_key context of a prefixkv-v1 call with (``extra``) or without extra words."""
    return PREFIXKV_V1_EXTRA_CONTEXT if extra else PREFIXKV_V1_CONTEXT


@functools.lru_cache(maxsize=256)
def _block_key_cached(salt: bytes, extra: bool) -> bytes:
    return derive_key(v1_context(extra), salt)


def one_chunk_blocks(block_size: int, has_extra: bool,
                     kernel: str = "a one-chunk kernel") -> tuple[int, int]:
    """(64-byte BLAKE3 blocks, bytes of the last one) of one block's message (8 parent words,
    block_size tokens, 4 extra words) for the device kernels, which hash messages of one
    1024-byte chunk; ValueError naming block_size (and ``kernel``) for a longer message."""
    if block_size < 1:  # the kernels divide by it
        raise ValueError(f"block_size: expected >= 1, got {block_size}")
    words = 8 + block_size + (4 if has_extra else 0)
    if 4 * words > CHUNK_LEN:
        limit = CHUNK_LEN // 4 - 8 - (4 if has_extra else 0)
        raise ValueError(f"block_size: {block_size} gives a {4 * words}-byte message, over one "
                         f"BLAKE3 chunk (1024 bytes); {kernel} supports block_size <= {limit}"
                         f"{' with extra' if has_extra else ''}")
    per_block = BLOCK_LEN // 4
    nblk = -(-words // per_block)
    return nblk, 4 * (words - per_block * (nblk - 1))


def block_key(salt: str | bytes | None = None, extra: bool = False) -> bytes:
    """The 32-byte prefixkv-v1 key of a salt (namespace), for calls without extra words or
    (``extra``) with them."""
    return _block_key_cached(salt_bytes(salt), bool(extra))


def digests_to_words(digests) -> np.ndarray:
    """list of 32-byte digests -> u32[n, 8]; word k = bytes 4k..4k+3 little-endian."""
    digests = list(digests)
    for i, d in enumerate(digests):
        if not isinstance(d, (bytes, bytearray)) or len(d) != 32:
            raise ValueError(f"digests[{i}]: expected 32 bytes, got {d!r:.60}")
    buf = b"".join(bytes(d) for d in digests)
    return np.frombuffer(buf, dtype="<u4").astype(np.uint32).reshape(len(digests), 8)


def words_to_digests(words) -> list[bytes]:
    """u32[n, 8] -> list of n 32-byte digests (inverse of :func:`digests_to_words`)."""
    w = np.asarray(words)
    if w.dtype != np.uint32 or w.ndim != 2 or w.shape[1] != 8:
        raise ValueError(f"words: expected uint32[n, 8], got {w.dtype}{list(w.shape)}")
    raw = np.ascontiguousarray(w, dtype="<u4").tobytes()
    return [raw[32 * i:32 * (i + 1)] for i in range(w.shape[0])]


def parent_words(parent, num_seqs: int) -> np.ndarray:
    """The starting chain value of each sequence, u32[num_seqs, 8].

    parent: None (32 zero bytes for every sequence); 32 bytes or u32[8] (the same parent for
    every sequence); u32[num_seqs, 8] or a list/tuple of num_seqs entries, each 32 bytes or
    None (per sequence). Validated by ``paged.validate.check_hash_blocks``.
    """
    out = np.zeros((num_seqs, 8), dtype=np.uint32)
    if parent is None:
        return out
    if isinstance(parent, (bytes, bytearray, memoryview)):
        out[:] = digests_to_words([bytes(parent)])[0]
        return out
    if isinstance(parent, (list, tuple)):
        for s, p in enumerate(parent):
            if p is not None:
                out[s] = digests_to_words([bytes(p)])[0]
        return out
    p = np.asarray(parent, dtype=np.uint32)
    out[:] = p.reshape(-1, 8) if p.ndim == 2 else p
    return out


def hash_blocks_reference(tokens, block_size: int, *, cu_lens=None, salt=None, extra=None,
                          parent=None) -> np.ndarray:
    """prefixkv-v1 block hashes, the readable way.

    tokens: i32[num_tokens], values >= 0.
    block_size: int >= 1.
    cu_lens: i32[num_seqs + 1] (ragged batch; None = one sequence), 0 first, non-decreasing,
        num_tokens last.
    salt: str | bytes | None, the namespace.
    extra: u32[num_full_blocks, 4] or None; row j is appended to the message of output block j.
    parent: see :func:`parent_words`.
    Returns u32[num_full_blocks, 8]: full blocks sequence by sequence, word k = digest bytes
    4k..4k+3 little-endian. A partial tail block of a sequence is not hashed.
    """
    from ..validate import check_hash_blocks, check_hash_blocks_values

    dims = check_hash_blocks(tokens, block_size, cu_lens=cu_lens, salt=salt, extra=extra,
                             parent=parent)
    cu, _ = check_hash_blocks_values(dims, tokens, cu_lens=cu_lens, extra=extra)
    tok = np.asarray(tokens).astype("<u4")
    ext = None if extra is None else np.asarray(extra).astype("<u4")
    parents = words_to_digests(parent_words(parent, dims.num_seqs))
    key = block_key(salt, extra is not None)
    out: list[bytes] = []
    for s in range(dims.num_seqs):
        start, end = int(cu[s]), int(cu[s + 1])
        prev = parents[s]
        for b in range((end - start) // block_size):
            lo = start + b * block_size
            message = prev + tok[lo:lo + block_size].tobytes()
            if ext is not None:
                message += ext[len(out)].tobytes()
            prev = keyed_hash(key, message)
            out.append(prev)
    if not out:
        return np.zeros((0, 8), dtype=np.uint32)
    return digests_to_words(out)
