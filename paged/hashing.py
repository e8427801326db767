"""Block hashing on the host: ``prefixkv-v1`` (BLAKE3 chain, docs/hashing.md) and bit-exact
compatibility modes for vLLM, SGLang and Dynamo.

A prefix cache names each full block of tokens by a hash of the whole prefix up to and including
that block. :func:`hash_blocks` computes those names for one sequence or a ragged batch.

Only numpy is imported here; the compiled kernel (``prefixkv.kernels.cpu._blake3``), ``blake3``,
``cbor2`` and ``xxhash`` are imported inside the functions that need them.
"""

from __future__ import annotations

import functools
import weakref

import numpy as np

from .reference.hashing import (
    block_key,
    digests_to_words,
    hash_blocks_reference,
    keyed_hash,
    one_chunk_blocks,
    parent_words,
    v1_context,
    words_to_digests,
)
from .validate import (
    HASH_ALGOS,
    VLLM_ALGOS,
    check_hash_algo,
    check_hash_blocks,
    check_hash_blocks_values,
    check_int,
)

__all__ = ["HASH_ALGOS", "VLLM_DEFAULT_SEED", "DYNAMO_ROUTER_SEED", "MM_EXTRA_CONTEXT",
           "hash_blocks", "hash_blocks_words", "digests_to_words", "words_to_digests",
           "block_key", "vllm_none_hash", "host_backend", "check_prefix_chain",
           "check_mm_items", "mm_extra_words", "check_mm_hash_fn", "request_mm_items"]

#: vLLM's NONE_HASH seed for the SHA-256 hash functions when PYTHONHASHSEED is unset.
VLLM_DEFAULT_SEED = "vllm-none-hash"
#: Dynamo KV router's xxh3 seed for local block hashes.
DYNAMO_ROUTER_SEED = 1337

#: BLAKE3 derive_key context of a block's multimodal extra words (docs/hashing.md).
MM_EXTRA_CONTEXT = "prefixkv v1 multimodal block extra"

_EXTRA_HINT = "pip install prefixkv[hash]"


def _require(module: str, algo: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"hash_blocks(algo={algo!r}) needs the '{module}' package: "
                          f"{_EXTRA_HINT}") from e


def _as_index_array(name: str, x):
    """Python sequences of ints become int32 arrays (values checked to fit); arrays pass."""
    if x is None or hasattr(x, "dtype"):
        return x
    if isinstance(x, (list, tuple, range)):
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in x):
            bad = next(v for v in x if not isinstance(v, (int, np.integer))
                       or isinstance(v, bool))
            raise TypeError(f"{name}: expected a sequence of ints, got an item of type "
                            f"{type(bad).__name__} ({bad!r:.40})")
        try:
            a = np.asarray(x, dtype=np.int64).reshape(-1)
        except OverflowError:  # past 64 bits: the range check's error
            a = np.array([min(map(int, x)), max(map(int, x))], dtype=object)
        if a.size and (a.min() < -2**31 or a.max() >= 2**31):
            raise ValueError(f"{name}: expected values that fit int32, got "
                             f"{int(a.min())}..{int(a.max())}")
        return a.astype(np.int32)
    raise TypeError(f"{name}: expected an int32 array or a sequence of ints, "
                    f"got {type(x).__name__}")


# ------------------------------------------------------------------------------ prefixkv-v1


def host_backend() -> str:
    """Which prefixkv-v1 host path :func:`hash_blocks` takes here: "c" (the compiled kernel,
    ``prefixkv.kernels.cpu._blake3``), "blake3" (the ``blake3`` package, one call per block) or
    "reference" (pure Python)."""
    from prefixkv.kernels.cpu.hashing import load_extension

    if load_extension() is not None:
        return "c"
    try:
        import blake3  # noqa: F401
    except ImportError:
        _warn_pure_python()
        return "reference"
    return "blake3"


@functools.cache
def _warn_pure_python() -> None:
    """Once per process: hashing runs in pure Python, ~40x slower than the blake3 package and
    ~150x slower than the compiled kernel (an install with no C compiler and no ``hash``
    extra; it had been silent)."""
    import warnings

    warnings.warn("prefixkv: block hashing runs in pure Python (the C extension "
                  "prefixkv.kernels.cpu._blake3 is not built and the blake3 package is not "
                  "installed), ~40x slower: pip install 'prefixkv[hash]'", RuntimeWarning,
                  stacklevel=3)


def kernel_supports(block_size: int, has_extra: bool = False, **_) -> tuple[bool, str]:
    """Backend-registry check of the one-chunk device kernels (see
    :func:`~prefixkv.paged.reference.hashing.one_chunk_blocks`)."""
    try:
        one_chunk_blocks(block_size, has_extra)
    except ValueError as e:
        return False, str(e)
    return True, ""


def host_supports(**_) -> tuple[bool, str]:
    """Backend-registry check of the compiled host chain."""
    from prefixkv.kernels.cpu.hashing import load_extension

    if load_extension() is None:
        return False, "the C extension prefixkv.kernels.cpu._blake3 is not built"
    return True, ""


@functools.lru_cache(maxsize=256)
def _v1_key(salt: bytes, extra: bool) -> bytes:
    from prefixkv.kernels.cpu.hashing import derive_key, load_extension

    if load_extension() is not None:
        return derive_key(v1_context(extra), salt)
    return block_key(salt, extra)


_NO_PARENT = np.zeros((1, 8), dtype=np.uint32)  # prefixkv-v1's parent of a first block


def v1_hashes_trusted(tokens: np.ndarray, block_size: int, salt: bytes,
                      parent: bytes | None) -> list[bytes]:
    """``hash_blocks(tokens, block_size, salt=salt, parent=parent)`` (prefixkv-v1, one
    sequence, no extra words) for a caller that checked its inputs: ``tokens`` an int32
    array of ids >= 0, ``salt`` the namespace bytes, ``parent`` None or a 32-byte digest.
    The prefix cache's own calls: the public checks took twice the C kernel's time on a
    2k-token prompt. Without the C extension, :func:`hash_blocks`."""
    from prefixkv.kernels.cpu.hashing import chain_digests, load_extension, split_digests

    if load_extension() is None:
        return list(hash_blocks(tokens, block_size, salt=salt, parent=parent))
    parents = (_NO_PARENT if parent is None
               else np.frombuffer(parent, dtype="<u4").astype(np.uint32).reshape(1, 8))
    return split_digests(chain_digests(tokens, block_size, np.array([0, len(tokens)]),
                                       _v1_key(salt, False), None, parents,
                                       len(tokens) // block_size))


def _v1_digests(tokens, block_size: int, cu: np.ndarray, salt: bytes, extra, parents,
                num_full_blocks: int, backend: str) -> np.ndarray:
    """u8[num_full_blocks, 32] prefixkv-v1 digests by the chosen host backend."""
    if num_full_blocks == 0:
        return np.zeros((0, 32), dtype=np.uint8)
    if backend == "reference":  # the spec's own function
        words = hash_blocks_reference(tokens, block_size, cu_lens=cu.astype(np.int32),
                                      salt=salt, extra=extra, parent=parents)
        return np.ascontiguousarray(words.astype("<u4")).view(np.uint8).reshape(-1, 32)
    return keyed_chain_digests(tokens, block_size, cu, _v1_key(salt, extra is not None), extra,
                               parents, num_full_blocks, backend)


def keyed_chain_digests(tokens, block_size: int, cu: np.ndarray, key: bytes, extra, parents,
                        num_full_blocks: int, backend: str | None = None) -> np.ndarray:
    """u8[num_full_blocks, 32]: the prefixkv-v1 chains of the sequences ``cu`` delimits, under
    the derived ``key`` (32 bytes), by host path ``backend`` ("c", "blake3", or "reference":
    keyed BLAKE3 in pure Python; default :func:`host_backend`). parents: u32[num_seqs, 8]
    words; extra: u32 words, 4 per full block, or None. The frontends' CPU host backends,
    which hold the key, not the salt, call this: it takes every path the host has (the
    compiled kernel alone, before, left the torch frontend on its vectorized ops, ~2000x
    slower than this without the kernel)."""
    if num_full_blocks == 0:
        return np.zeros((0, 32), dtype=np.uint8)
    backend = backend or host_backend()
    if backend == "c":
        from prefixkv.kernels.cpu.hashing import chain_digests

        return chain_digests(tokens, block_size, cu, key, extra, parents, num_full_blocks)
    if backend == "blake3":
        try:
            import blake3
        except ImportError as e:  # asked for by name (backend="blake3")
            raise ImportError("backend: 'blake3' needs the blake3 package (pip install "
                              "'prefixkv[hash]')") from e

        def keyed(msg: bytes) -> bytes:
            return blake3.blake3(msg, key=key).digest()
    else:
        def keyed(msg: bytes) -> bytes:
            return keyed_hash(key, msg)
    tok = np.asarray(tokens).astype("<u4").tobytes()
    ext = None if extra is None else np.asarray(extra).astype("<u4").tobytes()
    starts = words_to_digests(parents)
    out, row, b = bytearray(32 * num_full_blocks), 0, 4 * block_size
    for s in range(len(cu) - 1):
        prev = starts[s]
        for lo in range(int(cu[s]), int(cu[s + 1]) - block_size + 1, block_size):
            msg = prev + tok[4 * lo:4 * lo + b]
            if ext is not None:
                msg += ext[16 * row:16 * row + 16]
            prev = keyed(msg)
            out[32 * row:32 * row + 32] = prev
            row += 1
    return np.frombuffer(bytes(out), dtype=np.uint8).reshape(-1, 32)


def _prepare_v1(tokens, block_size, cu_lens, salt, extra, parent):
    dims = check_hash_blocks(tokens, block_size, cu_lens=cu_lens, salt=salt, extra=extra,
                             parent=parent)
    cu, nfb = check_hash_blocks_values(dims, tokens, cu_lens=cu_lens, extra=extra)
    return dims, cu, nfb, parent_words(parent, dims.num_seqs)


def hash_blocks_words(tokens, block_size: int, *, cu_lens=None, salt=None, extra=None,
                      parent=None, backend: str | None = None) -> np.ndarray:
    """prefixkv-v1 digests as ``u32[num_full_blocks, 8]`` (word k = digest bytes 4k..4k+3
    little-endian), the form the JAX/torch frontends return. Arguments as :func:`hash_blocks`;
    ``backend`` ("c", "blake3", "reference") forces a host path (tests, benchmarks)."""
    if backend not in (None, "c", "blake3", "reference"):
        raise ValueError(f"backend: expected 'c', 'blake3', 'reference' or None, got "
                         f"{backend!r}")
    tokens = _as_index_array("tokens", tokens)
    cu_lens = _as_index_array("cu_lens", cu_lens)
    dims, cu, nfb, parents = _prepare_v1(tokens, block_size, cu_lens, salt, extra, parent)
    digests = _v1_digests(tokens, dims.block_size, cu, dims.salt, extra, parents, nfb,
                          backend or host_backend())
    return digests.view("<u4").astype(np.uint32).reshape(nfb, 8)


# ------------------------------------------------------------------------- compatibility modes


#: The pickle protocol of vLLM's sha256 (``pickle.HIGHEST_PROTOCOL`` of its Python: 5 on every
#: CPython vLLM runs on).
VLLM_PICKLE_PROTOCOL = 5


def _vllm_serializer(algo: str):
    """The bytes vLLM's hash function ``algo`` takes the SHA-256 of, for an object."""
    if algo == "vllm-sha256":
        import pickle

        return lambda obj: pickle.dumps(obj, protocol=VLLM_PICKLE_PROTOCOL)
    cbor2 = _require("cbor2", algo)
    return lambda obj: cbor2.dumps(obj, canonical=True)


def vllm_none_hash(seed: str = VLLM_DEFAULT_SEED, algo: str = "vllm-sha256-cbor") -> bytes:
    """vLLM's NONE_HASH: SHA-256 of the seed (the value of PYTHONHASHSEED there, a str, else
    "vllm-none-hash") as canonical CBOR (sha256_cbor, the default) or as pickle
    (``algo="vllm-sha256"``, vLLM's sha256)."""
    import hashlib

    if not isinstance(seed, str):
        raise TypeError(f"seed: expected a str (vLLM's seed is the string value of "
                        f"PYTHONHASHSEED, e.g. '0'), got {type(seed).__name__}")
    if algo not in ("vllm-sha256-cbor", "vllm-sha256"):
        raise ValueError(f"algo: expected 'vllm-sha256-cbor' or 'vllm-sha256', got {algo!r}")
    return hashlib.sha256(_vllm_serializer(algo)(seed)).digest()


def _sequences(tokens: np.ndarray, cu: np.ndarray, block_size: int):
    """(sequence index, [token list of each full block]) for every sequence."""
    tok = np.asarray(tokens).tolist()
    for s in range(len(cu) - 1):
        lo, hi = int(cu[s]), int(cu[s + 1])
        yield s, [tok[i:i + block_size] for i in range(lo, hi - block_size + 1, block_size)]


def _per_seq(parent, num_seqs: int) -> list:
    if isinstance(parent, (list, tuple)):
        return list(parent)
    return [parent] * num_seqs


def _vllm_sha256(algo, tokens, cu, block_size, salt, parent, seed, lora,
                 mm: tuple = ()) -> list[bytes]:
    import hashlib

    dumps = _vllm_serializer(algo)
    none_hash = vllm_none_hash(VLLM_DEFAULT_SEED if seed is None else seed, algo)
    lora_key = None if lora is None else ("lora", lora[0], lora[1])
    parents = _per_seq(parent, len(cu) - 1)
    # one sequence when mm is given: {block: [(identifier, offset from the block start)]}
    mm_keys = {i: [(ident, off - i * block_size) for off, _, ident in its]
               for i, its in _mm_by_block(mm, 0, (int(cu[-1]) - int(cu[0])) // block_size,
                                          block_size).items()} if mm else {}
    out: list[bytes] = []
    for s, blocks in _sequences(tokens, cu, block_size):
        prev = none_hash if parents[s] is None else bytes(parents[s])
        first = parents[s] is None  # the request's block 0: where vLLM puts cache_salt
        for j, block in enumerate(blocks):
            keys = [] if lora_key is None else [lora_key]
            if mm_keys and j in mm_keys:
                keys += mm_keys[j]
            if first and salt:
                keys.append(("cache_salt", salt))
            extra_keys = tuple(keys) if keys else None
            prev = hashlib.sha256(dumps((prev, tuple(block), extra_keys))).digest()
            out.append(prev)
            first = False
    return out


def _sglang_sha256(tokens, cu, block_size, parent) -> list[bytes]:
    import hashlib

    parents = _per_seq(parent, len(cu) - 1)
    tok = np.asarray(tokens).astype("<u4")
    out: list[bytes] = []
    for s in range(len(cu) - 1):
        prev = None if parents[s] is None else bytes(parents[s])
        for lo in range(int(cu[s]), int(cu[s + 1]) - block_size + 1, block_size):
            h = hashlib.sha256()
            if prev is not None:
                h.update(prev)
            h.update(tok[lo:lo + block_size].tobytes())
            prev = h.digest()
            out.append(prev)
    return out


def _dynamo_xxh3(tokens, cu, block_size, seed) -> list[bytes]:
    xxhash = _require("xxhash", "dynamo-xxh3")
    seed = DYNAMO_ROUTER_SEED if seed is None else int(seed)
    tok = np.asarray(tokens).astype("<u4")
    out: list[bytes] = []
    for s in range(len(cu) - 1):
        for lo in range(int(cu[s]), int(cu[s + 1]) - block_size + 1, block_size):
            h = xxhash.xxh3_64_intdigest(tok[lo:lo + block_size].tobytes(), seed=seed)
            out.append(h.to_bytes(8, "little"))
    return out


def dynamo_salt_hash(salt: str | bytes | None = None) -> int:
    """Dynamo's SaltHash of a salt: xxh3_64(salt bytes, seed=0); 0 for no salt (the default
    of its TokenBlockSequence)."""
    if salt is None:
        return 0
    xxhash = _require("xxhash", "dynamo-kvbm")
    data = salt.encode("utf-8") if isinstance(salt, str) else bytes(salt)
    return xxhash.xxh3_64_intdigest(data, seed=0)


def _dynamo_kvbm(tokens, cu, block_size, salt, parent, seed) -> list[bytes]:
    xxhash = _require("xxhash", "dynamo-kvbm")
    salt_hash = int(seed) if seed is not None else dynamo_salt_hash(salt)
    parents = _per_seq(parent, len(cu) - 1)
    tok = np.asarray(tokens).astype("<u4")
    out: list[bytes] = []
    for s in range(len(cu) - 1):
        prev = parents[s]
        for lo in range(int(cu[s]), int(cu[s + 1]) - block_size + 1, block_size):
            block_hash = xxhash.xxh3_64_intdigest(tok[lo:lo + block_size].tobytes(),
                                                  seed=salt_hash)
            if prev is None:  # first block of a sequence: its sequence hash is its block hash
                prev = block_hash
            else:
                pair = np.array([prev, block_hash], dtype="<u8").tobytes()
                prev = xxhash.xxh3_64_intdigest(pair, seed=salt_hash)
            out.append(int(prev).to_bytes(8, "little"))
    return out


# ------------------------------------------------------------------------ multimodal items


def check_mm_items(mm_items, num_tokens: int | None = None, name: str = "mm_items") -> tuple:
    """``mm_items`` (a sequence of ``(offset, length, identifier)``: an item's placeholder
    tokens ``[offset, offset + length)`` and its content hash, bytes or str) as a tuple of
    ``(int, int, bytes | str)`` sorted by offset; ``()`` for None or no items.

    length >= 1, identifier non-empty, ranges disjoint. With ``num_tokens`` (a prompt's
    length) each range must lie in ``[0, num_tokens)``; without it (``hash_blocks``: offsets
    relative to the call's first token) offsets may be negative or run past the tokens.
    Errors name ``name`` and the item."""
    if mm_items is None:
        return ()
    if isinstance(mm_items, (str, bytes, bytearray, dict)) or not hasattr(mm_items, "__iter__"):
        raise TypeError(f"{name}: expected a sequence of (offset, length, identifier) "
                        f"triples, got {type(mm_items).__name__}")
    items = []
    for k, item in enumerate(mm_items):
        if not isinstance(item, (tuple, list)) or len(item) != 3:
            raise TypeError(f"{name}[{k}]: expected an (offset, length, identifier) triple, "
                            f"got {item!r:.80}")
        off, length, ident = item
        off = check_int(f"{name}[{k}]: offset", off)
        length = check_int(f"{name}[{k}]: length", length)
        if length < 1:
            raise ValueError(f"{name}[{k}]: length: expected >= 1 (the item's placeholder "
                             f"tokens), got {length}")
        if not -2**63 <= off < 2**63 or length >= 2**64:  # hashed as 64-bit words
            raise ValueError(f"{name}[{k}]: offset and length: expected 64-bit values, got "
                             f"{off} and {length}")
        if num_tokens is not None and (off < 0 or off + length > num_tokens):
            raise ValueError(f"{name}[{k}]: placeholder range [{off}, {off + length}) is not "
                             f"inside the prompt's {num_tokens} tokens")
        if isinstance(ident, (bytearray, memoryview)):
            ident = bytes(ident)
        if not isinstance(ident, (bytes, str)):
            raise TypeError(f"{name}[{k}]: identifier: expected bytes or str (the item's "
                            f"content hash), got {type(ident).__name__}")
        if not ident:
            raise ValueError(f"{name}[{k}]: identifier: expected a non-empty content hash")
        if isinstance(ident, str):
            try:
                ident.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{name}[{k}]: identifier: expected a str UTF-8 can encode, "
                                 f"got {ident!r:.40}") from None
        items.append((off, length, ident, k))
    items.sort(key=lambda it: it[0])
    for a, b in zip(items, items[1:], strict=False):
        if b[0] < a[0] + a[1]:
            first, second = sorted((a, b), key=lambda it: it[3])
            raise ValueError(f"{name}[{second[3]}]: placeholder range [{second[0]}, "
                             f"{second[0] + second[1]}) overlaps {name}[{first[3]}]'s "
                             f"[{first[0]}, {first[0] + first[1]})")
    return tuple(it[:3] for it in items)


def _mm_by_block(items: tuple, first_block: int, num_blocks: int,
                 block_size: int) -> dict[int, list]:
    """{block index in [first_block, num_blocks): the items overlapping it, in offset order}."""
    out: dict[int, list] = {}
    for item in items:
        off, length = item[0], item[1]
        for i in range(max(off // block_size, first_block),
                       min(-(-(off + length) // block_size), num_blocks)):
            out.setdefault(i, []).append(item)
    return out


@functools.lru_cache(maxsize=1)
def _mm_derive():
    """BLAKE3 derive_key(MM_EXTRA_CONTEXT, material) by the fastest host path here."""
    from prefixkv.kernels.cpu.hashing import derive_key, load_extension

    if load_extension() is not None:
        return lambda material: derive_key(MM_EXTRA_CONTEXT, material)
    try:
        import blake3
    except ImportError:
        from .reference.hashing import derive_key as ref_derive

        return lambda material: ref_derive(MM_EXTRA_CONTEXT, material)
    return lambda material: blake3.blake3(material,
                                          derive_key_context=MM_EXTRA_CONTEXT).digest()


def mm_extra_words(items: tuple, first_block: int, num_blocks: int,
                   block_size: int) -> np.ndarray:
    """prefixkv-v1 extra words ``u32[num_blocks - first_block, 4]`` of blocks
    ``first_block .. num_blocks - 1`` for checked ``items`` (:func:`check_mm_items`; offsets
    in the same frame as the block indices). A block no item overlaps gets 4 zero words;
    block i with items gets the first 16 bytes of ``BLAKE3.derive_key(MM_EXTRA_CONTEXT,
    concat over its items in offset order of le_i64(offset - i * block_size) ||
    le_u64(length) || le_u64(len(id)) || id)`` (id: str as UTF-8) as 4 little-endian words."""
    import struct

    out = np.zeros((max(num_blocks - first_block, 0), 4), dtype=np.uint32)
    by_block = _mm_by_block(items, first_block, num_blocks, block_size)
    if not by_block:
        return out
    derive = _mm_derive()
    for i, its in by_block.items():
        start = i * block_size
        parts = []
        for off, length, ident in its:
            data = ident.encode("utf-8") if isinstance(ident, str) else ident
            parts.append(struct.pack("<qQQ", off - start, length, len(data)) + data)
        out[i - first_block] = np.frombuffer(derive(b"".join(parts))[:16], dtype="<u4")
    return out


def _v1_mm_digests(tokens: np.ndarray, block_size: int, salt: bytes, parents: np.ndarray,
                   items: tuple, num_full_blocks: int, backend: str) -> np.ndarray:
    """prefixkv-v1 digests of one sequence with multimodal items: blocks before the first one
    an item overlaps without extra words, the rest (chained on) with :func:`mm_extra_words`."""
    m = min(max(items[0][0] // block_size, 0), num_full_blocks)
    cut = m * block_size
    head = _v1_digests(tokens[:cut], block_size, np.array([0, cut]), salt, None, parents, m,
                       backend)
    if m == num_full_blocks:
        return head
    if m:
        parents = head[-1:].view("<u4").astype(np.uint32).reshape(1, 8)
    rest = tokens[cut:]
    extra = mm_extra_words(items, m, num_full_blocks, block_size)
    tail = _v1_digests(rest, block_size, np.array([0, len(rest)]), salt, extra, parents,
                       num_full_blocks - m, backend)
    return np.concatenate([head, tail])


#: {hash_fn: block sizes check_mm_hash_fn passed}: each probed once (request_mm_items)
_MM_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def request_mm_items(mm_items, num_tokens: int, hash_fn, block_size: int) -> tuple:
    """A prompt's items (:func:`check_mm_items` against its ``num_tokens``; ``()`` for none)
    for blocks ``hash_fn`` hashes: a ValueError naming mm_items when it cannot take them
    (:func:`check_mm_hash_fn`, probed once per hash_fn and block size), so items are never
    dropped silently. PrefixCache's and Router's entry for a request's items."""
    mm = check_mm_items(mm_items, num_tokens)
    if not mm:
        return mm
    try:
        checked = block_size in _MM_CHECKED.get(hash_fn, ())
    except TypeError:  # a hash_fn no weak reference can key: probed every time
        check_mm_hash_fn(hash_fn, block_size)
        return mm
    if not checked:
        check_mm_hash_fn(hash_fn, block_size)
        _MM_CHECKED.setdefault(hash_fn, set()).add(block_size)
    return mm


def check_mm_hash_fn(hash_fn, block_size: int, name: str = "hash_fn") -> None:
    """Check that ``hash_fn(tokens_i32, block_size, salt=None, parent=...,
    mm_items=...)`` keys blocks by their multimodal items: other items give other hashes, no
    items another hash again, and a chain continued with ``parent=`` (items shifted to the
    call's first token, so earlier ones have negative offsets) gives the one-call hashes.
    Raises a ValueError naming ``mm_items`` otherwise: a hash that drops the items would let
    prompts with the same placeholder tokens but other images share KV."""
    bs = int(block_size)
    x, y = np.arange(bs, dtype=np.int32), np.arange(bs, 2 * bs, dtype=np.int32)
    a, b = ((0, bs, "prefixkv-probe-a"),), ((0, bs, "prefixkv-probe-b"),)
    try:
        none = list(hash_fn(x, bs, salt=None, parent=None))
        ha = list(hash_fn(x, bs, salt=None, parent=None, mm_items=a))
        hb = list(hash_fn(x, bs, salt=None, parent=None, mm_items=b))
        xy = list(hash_fn(np.concatenate([x, y]), bs, salt=None, parent=None, mm_items=a))
        y_after = list(hash_fn(y, bs, salt=None, parent=ha[0] if ha else None,
                               mm_items=((-bs, bs, a[0][2]),)))
    except Exception as e:  # noqa: BLE001 - re-raised with the argument named
        raise ValueError(f"mm_items: {name} cannot take multimodal items (calling "
                         f"{name}(tokens_i32, block_size, salt=None, parent=None, "
                         f"mm_items=[(offset, length, identifier)]) raised "
                         f"{type(e).__name__}: {e}); without them prompts with the same "
                         f"placeholder tokens but other images would share KV. Use the "
                         f"default prefixkv-v1 hash or hash_blocks(algo='vllm-sha256-cbor'), "
                         f"or give {name} an mm_items keyword (docs/host.md)") from e
    if len(ha) != 1 or len(hb) != 1 or len(none) != 1 or ha in (hb, none):
        raise ValueError(f"mm_items: {name} ignores mm_items (the same hash for other "
                         f"items), so prompts with the same placeholder tokens but other "
                         f"images would share KV; use the default prefixkv-v1 hash or "
                         f"hash_blocks(algo='vllm-sha256-cbor')")
    if len(xy) != 2 or y_after != xy[1:]:
        raise ValueError(f"mm_items: {name} with parent=<the previous block's hash> and the "
                         f"items shifted to the call's first token does not give the hash "
                         f"the whole prefix gets, and a PrefixCache hashes blocks as they "
                         f"fill")


# ------------------------------------------------------------------------------------ the API


def hash_blocks(tokens, block_size: int, *, cu_lens=None, salt=None, extra=None, parent=None,
                algo: str = "prefixkv-v1", seed=None, lora=None, mm_items=None) -> list[bytes]:
    """Hash every full block of one sequence or of a ragged batch, sequence by sequence.

    tokens: i32[num_tokens] (or a sequence of ints), token ids >= 0.
    block_size: int >= 1. A partial tail block of a sequence is not hashed.
    cu_lens: i32[num_seqs + 1] (or a sequence of ints): sequence s is
        tokens[cu_lens[s]:cu_lens[s+1]]; None = one sequence.
    algo: one of :data:`HASH_ALGOS`:

    * ``"prefixkv-v1"`` (default; docs/hashing.md): 32-byte BLAKE3 keyed chain. salt: str |
      bytes | None, the namespace (key = derive_key("prefixkv v1 block hash", salt); with
      extra, of context "prefixkv v1 block hash with extra words"); extra:
      u32[num_full_blocks, 4] appended to each block's message; parent: None (32 zero bytes),
      32 bytes or u32[8] (every sequence), u32[num_seqs, 8] or a list of num_seqs (32 bytes or
      None): the digest of the block before each sequence's first token (chain continuation).
      Runs the compiled C kernel (8 sequences per SIMD loop); falls back to the ``blake3``
      package (one call per block, 4-20x slower) when the extension is not built, and to the
      pure-Python reference when neither is there.
    * ``"vllm-sha256-cbor"``: vLLM's sha256_cbor block hash, 32-byte digests. seed: NONE_HASH
      seed (default "vllm-none-hash", vLLM's value without PYTHONHASHSEED); salt: its
      cache_salt (block 0 of a sequence that starts at NONE_HASH); lora: (name, path).
    * ``"vllm-sha256"``: vLLM's sha256 (its default ``--prefix-caching-hash-algo``): the same
      chain and keys with pickle (protocol 5) in place of CBOR.
    * ``"sglang-sha256"``: SGLang HiCache page hash chain, 32-byte digests; parent = prior
      page digest.

    mm_items (prefixkv-v1, vllm-sha256-cbor and vllm-sha256, one sequence): ``[(offset, length,
    identifier)]``, a multimodal item's placeholder tokens ``tokens[offset:offset + length]``
    (offsets from this call's first token: negative for an item before it, when continuing a
    chain with ``parent``) and its content hash (bytes or str; :func:`check_mm_items`).
    prefixkv-v1: blocks before the first block an item overlaps hash as without items, later
    ones with the extra words of :func:`mm_extra_words` (docs/hashing.md, "Multimodal
    prompts"); vllm-sha256-cbor and vllm-sha256: vLLM's ``(identifier, offset - block
    start)`` extra keys on each block an item overlaps.
    * ``"dynamo-xxh3"``: Dynamo router local block hash, xxh3_64 with seed (default 1337),
      each block alone; 8-byte little-endian digests (``int.from_bytes(d, "little")`` is
      Dynamo's u64).
    * ``"dynamo-kvbm"``: Dynamo KVBM sequence hash chain; seed = its salt_hash (u64) or salt
      (salt_hash = xxh3_64(salt, seed=0)), default salt_hash 0; parent: u64 sequence hash or a
      list of num_seqs (u64 or None); 8-byte little-endian digests.

    Returns a list of num_full_blocks digests (bytes).
    """
    tokens = _as_index_array("tokens", tokens)
    cu_lens = _as_index_array("cu_lens", cu_lens)
    # shapes/dtypes/values of tokens, block_size, cu_lens first, then the algorithm's own args
    v1 = algo == "prefixkv-v1"
    dims = check_hash_blocks(tokens, block_size, cu_lens=cu_lens,
                             salt=salt if v1 or isinstance(salt, (str, bytes)) else None,
                             extra=extra if v1 else None, parent=parent if v1 else None)
    check_hash_algo(algo, num_seqs=dims.num_seqs, salt=salt, extra=extra, parent=parent,
                    seed=seed, lora=lora)
    mm = check_mm_items(mm_items)
    if mm:
        if not v1 and algo not in VLLM_ALGOS:
            hint = (" (SGLang writes each item's hash-derived pad value into the placeholder "
                    "token ids instead: hash those tokens)" if algo == "sglang-sha256" else "")
            raise ValueError(f"mm_items: {algo} has no multimodal keys{hint}; use "
                             f"prefixkv-v1, vllm-sha256-cbor or vllm-sha256")
        if cu_lens is not None:
            raise ValueError("mm_items: expected one sequence (cu_lens=None): the items' "
                             "offsets are positions in it")
        if extra is not None:
            raise ValueError("mm_items: pass extra (words per block) or mm_items, not both")
    cu, nfb = check_hash_blocks_values(dims, tokens, cu_lens=cu_lens,
                                       extra=extra if v1 else None)
    if v1:
        from prefixkv.kernels.cpu.hashing import split_digests

        parents = parent_words(parent, dims.num_seqs)
        if mm:
            digests = _v1_mm_digests(tokens, dims.block_size, dims.salt, parents, mm, nfb,
                                     host_backend())
        else:
            digests = _v1_digests(tokens, dims.block_size, cu, dims.salt, extra, parents, nfb,
                                  host_backend())
        return split_digests(digests)
    bs = dims.block_size
    if algo in VLLM_ALGOS:
        return _vllm_sha256(algo, tokens, cu, bs, salt, parent, seed, lora, mm)
    if algo == "sglang-sha256":
        return _sglang_sha256(tokens, cu, bs, parent)
    if algo == "dynamo-xxh3":
        return _dynamo_xxh3(tokens, cu, bs, seed)
    return _dynamo_kvbm(tokens, cu, bs, salt, parent, seed)


def check_prefix_chain(hash_fn, block_size: int, name: str = "hash_fn") -> None:
    """Check that ``hash_fn(tokens_i32, block_size, salt=None, parent=...) -> list[bytes]``
    can key a prefix cache: each block's hash depends on every block before it (two prefixes
    ending in the same block differ), and hashing the next block with ``parent=`` the previous
    hash gives the whole prefix's hash (a PrefixCache hashes blocks as they fill). Raises a
    ValueError naming ``name`` otherwise: a cache keyed by, say, Dynamo's local block hashes
    (``dynamo-xxh3``, one block on its own) would serve KV computed after another prefix.
    Probes with three blocks of token ids 0 .. 3 * block_size - 1."""
    bs = int(block_size)
    x, y, z = (np.arange(i * bs, (i + 1) * bs, dtype=np.int32) for i in range(3))
    try:
        xy = list(hash_fn(np.concatenate([x, y]), bs, salt=None, parent=None))
        zy = list(hash_fn(np.concatenate([z, y]), bs, salt=None, parent=None))
        hx = list(hash_fn(x, bs, salt=None, parent=None))
        y_after_x = list(hash_fn(y, bs, salt=None, parent=hx[0] if hx else None))
    except Exception as e:  # noqa: BLE001 - re-raised with the argument named
        raise ValueError(f"{name}: calling it as {name}(tokens_i32, block_size, salt=None, "
                         f"parent=<a previous block's hash>) failed ({type(e).__name__}: "
                         f"{e}); wrap a compatibility mode to that signature") from e
    if len(xy) != 2 or len(zy) != 2 or len(hx) != 1 or len(y_after_x) != 1:
        raise ValueError(f"{name}: expected one hash per full block, got {len(xy)} for 2 "
                         f"blocks")
    if xy[1] == zy[1]:
        raise ValueError(f"{name}: not a prefix chain: a block's hash does not depend on the "
                         f"blocks before it (as Dynamo's local block hashes, dynamo-xxh3), so "
                         f"a prefix cache keyed by it would serve KV computed after another "
                         f"prefix; use a chained hash (prefixkv-v1, vllm-sha256-cbor, "
                         f"sglang-sha256, dynamo-kvbm)")
    if y_after_x[0] != xy[1]:
        raise ValueError(f"{name}: hashing a block with parent=<the previous block's hash> "
                         f"does not give the hash the whole prefix gets, and a PrefixCache "
                         f"hashes blocks as they fill: pass parent on to the chain")
    # A chain that hashes (previous hash, block hash) as it hashes a block's tokens, with the
    # same function and key, is ambiguous where the two inputs are as long: dynamo-kvbm at
    # block_size 4 (xxh3 of 16 bytes either way). A one-block prompt whose token ids are the
    # words of a prefix's two hashes then has that prefix's second block's hash, and a cache
    # keyed by it would serve the prompt's KV for the prefix's (or the other way round).
    # Probed with two blocks whose digests read as token ids < 2**31 (about 1 pair in 16).
    for k in range(1, 129):
        x2, y2 = x + np.int32(k * 3 * bs), y + np.int32(k * 3 * bs)
        digests = (*hash_fn(x2, bs, salt=None, parent=None),
                   *hash_fn(y2, bs, salt=None, parent=None))
        if not all(isinstance(h, bytes) for h in digests) or len(b"".join(digests)) != 4 * bs:
            break  # digests of another length: no block's tokens read as two of them
        words = np.frombuffer(b"".join(digests), dtype="<u4")
        if words.max() >= 2**31:
            continue
        chained = list(hash_fn(np.concatenate([x2, y2]), bs, salt=None, parent=None))
        if list(hash_fn(words.astype(np.int32), bs, salt=None, parent=None)) == chained[1:]:
            raise ValueError(f"{name}: ambiguous at block_size={bs}: a block's hash is the hash "
                             f"of its parent's and its own digests, {4 * bs} bytes, as a first "
                             f"block's is of its {bs} tokens (dynamo-kvbm at block_size 4), so "
                             f"a crafted one-block prompt has another prompt's second block's "
                             f"hash and a cache keyed by it would serve that block's KV for it; "
                             f"use another block size or hash")
        break
