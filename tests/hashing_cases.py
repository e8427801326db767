"""The prefixkv-v1 oracle (the ``blake3`` package, message by message) and the ragged cases
shared by the device hashing tests (JAX, torch, kernels); framework-free.

Where the ``blake3`` package is missing (the lent GPU machines have no package index), the
oracle is prefixkv's pure-Python BLAKE3, which CI tests against the package."""

from __future__ import annotations

import numpy as np
from prefixkv.paged.reference.hashing import block_key, keyed_hash

try:
    import blake3
except ImportError:  # pragma: no cover - exercised on machines without the package
    blake3 = None


def _keyed(key: bytes, msg: bytes) -> bytes:
    if blake3 is None:
        return keyed_hash(key, msg)
    return blake3.blake3(msg, key=key).digest()


def oracle(tokens, block_size, cu_lens=None, salt=None, extra=None, parent=None):
    """prefixkv-v1 with the ``blake3`` package (C/Rust), message by message."""
    key = block_key(salt, extra is not None)
    tokens = np.asarray(tokens)
    cu = [0, len(tokens)] if cu_lens is None else [int(c) for c in cu_lens]
    out = []
    for s in range(len(cu) - 1):
        if parent is None:
            prev = bytes(32)
        elif isinstance(parent, bytes):
            prev = parent
        else:
            prev = np.asarray(parent, dtype="<u4").reshape(-1, 8)[s].tobytes()
        for b in range((cu[s + 1] - cu[s]) // block_size):
            lo = cu[s] + b * block_size
            msg = prev + tokens[lo:lo + block_size].astype("<u4").tobytes()
            if extra is not None:
                msg += np.asarray(extra[len(out)], dtype="<u4").tobytes()
            prev = _keyed(key, msg)
            out.append(prev)
    if not out:
        return np.zeros((0, 8), np.uint32)
    return np.frombuffer(b"".join(out), dtype="<u4").astype(np.uint32).reshape(-1, 8)


def make_case(rng, block_size, lens, *, salt=None, with_extra=False, parent="none"):
    lens = np.asarray(lens, dtype=np.int64)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    tokens = rng.integers(0, 2**31 - 1, size=int(cu[-1]), dtype=np.int32)
    nfb = int((lens // block_size).sum())
    extra = (rng.integers(0, 2**32, size=(nfb, 4), dtype=np.uint64).astype(np.uint32)
             if with_extra else None)
    if parent == "per_seq":
        par = rng.integers(0, 2**32, size=(len(lens), 8), dtype=np.uint64).astype(np.uint32)
    elif parent == "shared":
        par = rng.bytes(32)
    else:
        par = None
    return dict(tokens=tokens, block_size=block_size, cu_lens=cu, salt=salt, extra=extra,
                parent=par)


# (block_size, sequence lengths, salt, extra, parent): empty sequences, shorter than a block,
# exact multiples, partial tails; block sizes 1, 7, 16, 244 with extra and 248 (messages of
# exactly one 1024-byte chunk), 248 with extra (1040 bytes) and 300 (chunk trees).
CASES = {
    "b16_ragged": (16, [0, 15, 16, 17, 100, 0, 48], None, False, "none"),
    "b7_extra_parent": (7, [7, 13, 0, 30, 6], "tenant-a", True, "per_seq"),
    "b1_salt_bytes": (1, [3, 0, 5], b"\x00\xffsalt", False, "shared"),
    "b244_extra_one_chunk": (244, [244, 500, 10], "s", True, "none"),
    "b248_one_chunk": (248, [248, 500, 10], "s", False, "shared"),
    "b248_extra_two_chunks": (248, [248, 500, 10], "s", True, "none"),
    "b300_tree": (300, [301, 900], None, False, "per_seq"),
    "empty": (16, [0, 0], None, False, "none"),
    "tails_only": (16, [3, 15, 1], "x", False, "none"),
}
