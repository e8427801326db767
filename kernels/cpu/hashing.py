"""Loader and thin wrappers of the C prefixkv-v1 chain kernel (``_blake3``, blake3_chain.c).

The extension is optional at install time (setup.py builds it where a C compiler exists);
:func:`load_extension` returns None when it is missing, and ``prefixkv.paged.hashing`` then
falls back to the ``blake3`` package (the ``hash`` extra), else to pure Python (which warns).
"""

from __future__ import annotations

import functools
import struct

import numpy as np

# BLAKE3 flags (mode selection) and IV, for key derivation through the C hash entry point.
_DERIVE_KEY_CONTEXT = 1 << 5
_DERIVE_KEY_MATERIAL = 1 << 6
_IV_BYTES = struct.pack("<8I", 0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A,
                        0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19)


@functools.lru_cache(maxsize=1)
def load_extension():
    """The compiled ``prefixkv.kernels.cpu._blake3`` module, or None if it was not built."""
    try:
        from . import _blake3
    except ImportError:
        return None
    return _blake3


def simd() -> str:
    """Which path the C kernel runs here: "avx2 x 8 lanes", "vector x 8 lanes", "scalar", or
    "missing" when the extension is not built."""
    ext = load_extension()
    return "missing" if ext is None else ext.simd


def derive_key(context: str, key_material: bytes) -> bytes:
    """BLAKE3 derive_key(context, key_material) -> 32 bytes, in C (extension required)."""
    ext = load_extension()
    if ext is None:
        raise ImportError("prefixkv.kernels.cpu._blake3 is not built (reinstall prefixkv with a "
                          "C compiler available)")
    context_key = ext.hash(context.encode("utf-8"), _IV_BYTES, _DERIVE_KEY_CONTEXT)
    return ext.hash(bytes(key_material), context_key, _DERIVE_KEY_MATERIAL)


def chain_digests(tokens: np.ndarray, block_size: int, cu_lens: np.ndarray, key: bytes,
                  extra: np.ndarray | None, parents: np.ndarray, num_full_blocks: int, *,
                  use_lanes: bool = True) -> np.ndarray:
    """prefixkv-v1 chain in C; inputs already validated.

    tokens: i32[num_tokens]; cu_lens: int[num_seqs + 1]; key: 32 bytes; extra: u32[n, 4] or
    None; parents: u32[num_seqs, 8]. Returns u8[num_full_blocks, 32], the digests in order.
    use_lanes=False runs every sequence on the scalar path (tests).
    """
    ext = load_extension()
    if ext is None:
        raise ImportError("prefixkv.kernels.cpu._blake3 is not built")
    out = np.empty((num_full_blocks, 32), dtype=np.uint8)
    if num_full_blocks == 0:  # the C chain sizes its buffers by block_size: none needed
        return out
    ext.chain(np.ascontiguousarray(tokens, dtype=np.int32), int(block_size),
              np.ascontiguousarray(cu_lens, dtype=np.int64), bytes(key),
              None if extra is None else np.ascontiguousarray(extra, dtype=np.uint32),
              np.ascontiguousarray(parents, dtype=np.uint32), out, bool(use_lanes))
    return out


def split_digests(digests: np.ndarray) -> list[bytes]:
    """u8[n, 32] -> list of n 32-byte bytes objects (in C when the extension is there)."""
    ext = load_extension()
    if ext is not None:
        return ext.split32(np.ascontiguousarray(digests))
    raw = np.ascontiguousarray(digests).tobytes()
    return [raw[i:i + 32] for i in range(0, len(raw), 32)]
