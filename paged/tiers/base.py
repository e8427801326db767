"""Keys, stored-block records and the tier interface shared by every KV-cache tier.

A tier stores one block's KV for every layer: one row of the ``gather_blocks`` buffer,
``value: [len(caches), *block_shape]`` (e.g. ``[2 * num_layers, block_size, num_kv_heads,
head_dim]``), under a :class:`BlockKey` = block hash + :class:`Namespace` (model id, layout,
dtype, tensor-parallel rank, salt; for float8_e4m3fn caches also the scales the bytes were
quantized with: a tier stores and returns fp8 blocks as their bytes). The interface follows
SGLang's HiCacheStorage shape:

    batch_exists(keys) -> int                    number of leading keys present
    batch_get(keys, shape=, dtype=) -> list      per key: the block (np.ndarray) or None
    batch_put(keys, values) -> list[bool]        per key: stored or not

Safety contract, every tier: a tier never raises to the caller for a storage fault (server
down, timeout, corrupt or truncated data, full budget) - it answers a miss / ``False``; and it
never returns a block stored under another key, namespace, shape or dtype. Byte-serialising
tiers (disk, Redis, NIXL) store a :func:`encode_record` record whose header carries the format
version, the full key encoding, dtype, shape and a checksum of the header fields and the
payload; :func:`decode_record` verifies the checksum first (a corrupt header is never taken for
a valid record of another shape), then re-checks the key, dtype and shape.
"""

from __future__ import annotations

import functools
import hashlib
import math
import numbers
import operator
import struct
import threading
import zlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .._locking import locked
from ..spec import CACHE_DTYPES, FP8_DTYPES, dtype_name, numpy_dtype, salt_bytes

#: Version of the record layout written by :func:`encode_record`. Records of another version
#: decode as :class:`RecordError` (a miss): version 1 checksummed the payload only; version 2
#: checksums the header fields (everything before the digest) and the payload.
FORMAT_VERSION = 2
RECORD_MAGIC = b"PKVB"

_NS_TAG = b"prefixkv-ns-v1"


_DTYPE_NAMES: dict = {}


def dtype_str(x) -> str:
    """``spec.dtype_name`` memoised for numpy arrays and dtypes (it sits on per-block paths)."""
    if isinstance(x, np.ndarray):
        dt = x.dtype
    elif isinstance(x, np.dtype):
        dt = x
    elif isinstance(x, type) and issubclass(x, np.generic):  # np.float16 and friends
        dt = np.dtype(x)
    else:
        return dtype_name(x)
    name = _DTYPE_NAMES.get(dt)
    if name is None:
        name = _DTYPE_NAMES[dt] = dtype_name(dt)
    return name


def _field(b: bytes) -> bytes:
    return struct.pack("<I", len(b)) + b


def _utf8(name: str, s: str) -> bytes:
    """A namespace's str field as UTF-8, else a ValueError naming the field (a lone surrogate:
    a bad decode upstream), as a str salt gets."""
    try:
        return s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name}: expected a str UTF-8 can encode ({e.reason} at index "
                         f"{e.start})") from None


def _kv_scales(scales, dtype: str) -> tuple[float, ...] | None:
    """A namespace's checked ``kv_scales`` for its ``dtype``: None for a float dtype, a
    non-empty tuple of finite positive floats for float8_e4m3fn (ValueError naming kv_scales
    otherwise)."""
    if dtype not in FP8_DTYPES:
        if scales is not None:
            raise ValueError(f"kv_scales: only {', '.join(FP8_DTYPES)} namespaces carry scales "
                             f"(a {dtype} cache holds its values), got {scales!r}")
        return None
    if scales is None:
        raise ValueError(f"kv_scales: a {dtype} namespace needs the scales its bytes were "
                         f"quantized with (k_scale, v_scale, or per layer): bytes quantized "
                         f"with other scales would decode to wrong values")
    bad = ValueError(f"kv_scales: expected a non-empty tuple of finite positive floats, got "
                     f"{scales!r}")
    if isinstance(scales, (str, bytes, bytearray)) or not hasattr(scales, "__len__"):
        raise bad
    try:
        items = list(scales)
    except TypeError:
        raise bad from None
    if not items or any(not isinstance(v, numbers.Real) or isinstance(v, (bool, np.bool_))
                        for v in items):
        raise bad
    out = tuple(float(v) for v in items)
    if not all(math.isfinite(v) and v > 0 for v in out):
        raise bad
    return out


@dataclass(frozen=True)
class Namespace:
    """Everything besides the block hash that decides whether stored KV may be reused.

    model_id: model (and revision) name; layout: cache layout name ("NHD", or a frontend's own
    tag covering block_size and head layout); dtype: canonical KV cache dtype name (a float
    dtype, or float8_e4m3fn); tp_rank / tp_size: tensor-parallel shard; salt: the request's
    cache salt (None, str or bytes; kept as bytes); kv_scales: float8_e4m3fn only, and required
    there: the scales its bytes were quantized with (``(k_scale, v_scale)``, or per layer
    ``(k0, v0, k1, v1, ...)``; finite positive numbers, kept as a tuple of floats), since the
    same bytes under other scales decode to other values. Two namespaces that differ in any
    field never share a storage key.
    """

    model_id: str
    layout: str = "NHD"
    dtype: str = "float32"
    tp_rank: int = 0
    tp_size: int = 1
    salt: bytes = b""
    kv_scales: tuple[float, ...] | None = None
    _encoded: bytes = field(init=False, repr=False, compare=False)
    _digest: str = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.model_id, str):
            raise TypeError(f"model_id: expected str, got {type(self.model_id).__name__}")
        if not isinstance(self.layout, str):
            raise TypeError(f"layout: expected str, got {type(self.layout).__name__}")
        model_id, layout = _utf8("model_id", self.model_id), _utf8("layout", self.layout)
        dt = dtype_name(self.dtype)
        if dt not in CACHE_DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(CACHE_DTYPES)}, got {dt!r}")
        object.__setattr__(self, "dtype", dt)
        object.__setattr__(self, "kv_scales", _kv_scales(self.kv_scales, dt))
        object.__setattr__(self, "salt", salt_bytes(self.salt))
        for name in ("tp_rank", "tp_size"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)):
                raise TypeError(f"{name}: expected int, got {type(v).__name__} {v!r}")
            object.__setattr__(self, name, int(v))
        if self.tp_size < 1:
            raise ValueError(f"tp_size: expected a positive int, got {self.tp_size}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank: expected 0 <= tp_rank < tp_size, got "
                             f"tp_rank={self.tp_rank}, tp_size={self.tp_size}")
        enc = b"".join([_NS_TAG, _field(model_id), _field(layout),
                        _field(self.dtype.encode()), struct.pack("<qq", self.tp_rank, self.tp_size),
                        _field(self.salt)])
        if self.kv_scales is not None:  # only then: float namespaces keep their keys
            n = len(self.kv_scales)
            enc += struct.pack(f"<I{n}d", n, *self.kv_scales)
        object.__setattr__(self, "_encoded", enc)
        object.__setattr__(self, "_digest", hashlib.blake2b(enc, digest_size=16).hexdigest())

    def encode(self) -> bytes:
        """Stable byte encoding (length-prefixed fields; salt included; kv_scales, where set,
        as a count and their float64 bits)."""
        return self._encoded

    def digest(self) -> str:
        """32 hex chars naming the namespace in storage paths and key prefixes."""
        return self._digest

    def with_salt(self, salt) -> Namespace:
        """This namespace with another salt (a tenant's); every other field, scales included,
        kept."""
        return Namespace(self.model_id, self.layout, self.dtype, self.tp_rank, self.tp_size, salt,
                         self.kv_scales)


def hash_bytes(block_hash) -> bytes:
    """A block hash as bytes: bytes-like as is; a non-negative int as 8 big-endian bytes
    (64-bit hashes such as xxh3_64) or the fewest multiple of 8 bytes that holds it."""
    if isinstance(block_hash, (bytes, bytearray, memoryview)):
        b = bytes(block_hash)
    elif isinstance(block_hash, (int, np.integer)) and not isinstance(block_hash, bool):
        v = int(block_hash)
        if v < 0:
            raise ValueError(f"block_hash: expected a non-negative int, got {v}")
        nbytes = max(8, -(-v.bit_length() // 64) * 8)
        b = v.to_bytes(nbytes, "big")
    else:
        raise TypeError(f"block_hash: expected bytes or int, got {type(block_hash).__name__}")
    if not b:
        raise ValueError("block_hash: expected a non-empty hash")
    return b


@dataclass(frozen=True)
class BlockKey:
    """One stored block: its hash (bytes) under a namespace."""

    block_hash: bytes
    namespace: Namespace

    def __post_init__(self):
        object.__setattr__(self, "block_hash", hash_bytes(self.block_hash))
        if not isinstance(self.namespace, Namespace):
            raise TypeError(f"namespace: expected Namespace, got {type(self.namespace).__name__}")

    def encode(self) -> bytes:
        """Stable byte encoding: namespace encoding + length-prefixed hash."""
        return self.namespace.encode() + _field(self.block_hash)

    def storage_key(self) -> str:
        """``<namespace digest>/<hash hex>``: the name every tier files the block under."""
        return f"{self.namespace.digest()}/{self.block_hash.hex()}"


def make_keys(block_hashes: Sequence, namespace: Namespace) -> list[BlockKey]:
    return [BlockKey(h, namespace) for h in block_hashes]


# --------------------------------------------------------------------------------------------
# Records: header + payload, the byte form of one stored block.

CHECKSUM_CRC32 = 1
CHECKSUM_XXH3_128 = 2
_CHECKSUM_NAMES = {"crc32": CHECKSUM_CRC32, "xxh3_128": CHECKSUM_XXH3_128}

# magic, version, checksum algorithm, ndim, key length, dtype-name length, payload length
_FIXED = struct.Struct("<4sHBBIHQ")
_DIGEST_LEN = 16


def _xxhash():
    try:
        import xxhash
    except ImportError:
        return None
    return xxhash


def check_checksum(value) -> str | None:
    """A tier's ``checksum`` argument, checked when the tier is made: None (the default,
    :func:`default_checksum`) or the name of an algorithm available here ("crc32";
    "xxh3_128" needs the xxhash package). TypeError / ValueError naming ``checksum``
    otherwise: an unknown name used to fail every put later, which a :class:`TieredStore`
    counts as a tier fault (the tier silently stored nothing)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"checksum: expected None or one of {', '.join(_CHECKSUM_NAMES)}, got "
                        f"{type(value).__name__} {value!r}")
    if value not in _CHECKSUM_NAMES:
        raise ValueError(f"checksum: expected None or one of {', '.join(_CHECKSUM_NAMES)}, got "
                         f"{value!r}")
    if _CHECKSUM_NAMES[value] == CHECKSUM_XXH3_128 and _xxhash() is None:
        raise ValueError("checksum: 'xxh3_128' needs the xxhash package (pip install xxhash); "
                         "pass 'crc32' or None (the default picks what is available)")
    return value


#: The longest duration a tier takes (seconds; ~31 years): Redis keeps expiries as int64
#: milliseconds, and a larger ``ttl_s`` made every SET an error (every put ``False``).
MAX_SECONDS = 1e9


def check_seconds(name: str, value, *, zero_ok: bool = False, optional: bool = False
                  ) -> float | None:
    """A tier's duration argument (a timeout, a back-off, a TTL), checked when the tier is
    made: a real number of seconds, finite, > 0 (>= 0 with ``zero_ok``) and at most
    MAX_SECONDS; None when ``optional``. TypeError / ValueError naming ``name`` otherwise: a
    string or bool passed through float() or int(), and a zero, negative or NaN TTL silently
    became a 1 ms expiry."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected {'None or ' if optional else ''}a number of "
                        f"seconds, got {type(value).__name__} {value!r}")
    bound = ">= 0" if zero_ok else "> 0"
    above = value >= 0 if zero_ok else value > 0
    if not (above and value <= MAX_SECONDS):  # NaN fails both
        raise ValueError(f"{name}: expected seconds {bound} and at most {MAX_SECONDS:.0e}, "
                         f"got {value!r}")
    return float(value)


def default_checksum() -> str:
    """"xxh3_128" where the xxhash package is installed (many GB/s), else "crc32" (zlib)."""
    return "xxh3_128" if _xxhash() is not None else "crc32"


def checksum(payload, algorithm: str | int) -> bytes | None:
    """16-byte checksum of ``payload`` (bytes-like); None when the algorithm is unavailable."""
    alg = _CHECKSUM_NAMES.get(algorithm, algorithm)
    if alg == CHECKSUM_CRC32:
        return struct.pack("<I", zlib.crc32(payload)).ljust(_DIGEST_LEN, b"\0")
    if alg == CHECKSUM_XXH3_128:
        xx = _xxhash()
        return None if xx is None else xx.xxh3_128_digest(payload)
    return None


def _record_digest(algorithm: str | int, fields, payload) -> bytes | None:
    """16-byte checksum of a record's header fields (every header byte before the digest)
    followed by its payload, without joining them; None when the algorithm is unavailable."""
    alg = _CHECKSUM_NAMES.get(algorithm, algorithm)
    if alg == CHECKSUM_CRC32:
        return struct.pack("<I", zlib.crc32(payload, zlib.crc32(fields))).ljust(_DIGEST_LEN, b"\0")
    if alg == CHECKSUM_XXH3_128:
        xx = _xxhash()
        if xx is None:
            return None
        h = xx.xxh3_128(fields)
        h.update(payload)
        return h.digest()
    return None


def _payload_view(value: np.ndarray) -> memoryview:
    arr = np.ascontiguousarray(value)
    return memoryview(arr.reshape(-1).view(np.uint8))


def encode_record(key: BlockKey, value: np.ndarray, *, checksum_alg: str | None = None
                  ) -> tuple[bytes, memoryview]:
    """(header, payload) of one stored block; the record is ``header + payload``.

    value: [len(caches), *block_shape] of any dtype (bfloat16 through ml_dtypes). The payload
    is a zero-copy view of ``value`` when it is C-contiguous.
    """
    value = np.asarray(value)
    payload = _payload_view(value)
    alg_name = checksum_alg or default_checksum()
    alg = _CHECKSUM_NAMES.get(alg_name) if isinstance(alg_name, str) else None
    if alg is None:
        raise ValueError(f"checksum_alg: expected None or one of {', '.join(_CHECKSUM_NAMES)}, "
                         f"got {alg_name!r}")
    kb = key.encode()
    db = dtype_str(value).encode()
    fields = b"".join([
        _FIXED.pack(RECORD_MAGIC, FORMAT_VERSION, alg, value.ndim, len(kb), len(db),
                    payload.nbytes),
        struct.pack(f"<{value.ndim}Q", *value.shape), kb, db])
    digest = _record_digest(alg, fields, payload)
    if digest is None:
        raise RuntimeError(f"checksum {alg_name!r} unavailable")
    return fields + digest, payload


def record_bytes(key: BlockKey, value: np.ndarray, *, checksum_alg: str | None = None) -> bytes:
    header, payload = encode_record(key, value, checksum_alg=checksum_alg)
    return header + payload


def header_size(key: BlockKey, ndim: int, dtype: str) -> int:
    return (_FIXED.size + 8 * ndim + len(key.encode()) + len(dtype_name(dtype).encode())
            + _DIGEST_LEN)


class RecordError(ValueError):
    """A stored record that must not be served (the tiers turn it into a miss)."""


class UnexpectedLayout(RecordError):
    """A valid record of the key whose shape/dtype differs from what the caller expects."""


class UnreadableHere(UnexpectedLayout):
    """A record this process cannot verify: another format version, or a checksum algorithm
    it lacks (xxh3_128 without ``xxhash``). A miss here, but the tiers keep it: a worker of
    another version, or with the package, reads it (a shared disk or store)."""


_CRC32_LEAD = RECORD_MAGIC + struct.pack("<HB", FORMAT_VERSION, CHECKSUM_CRC32)
_XXH3_LEAD = RECORD_MAGIC + struct.pack("<HB", FORMAT_VERSION, CHECKSUM_XXH3_128)


def record_head_size() -> int:
    """Bytes of a record's fixed header: what :func:`readable_here` needs."""
    return _FIXED.size


def readable_here(head) -> bool:
    """Whether a record starting with ``head`` (its first :func:`record_head_size` bytes or
    more) is one this process can verify: prefixkv's magic, this format version and a checksum
    algorithm available here. A cheap check for ``batch_exists``: a record of another version
    is kept for the workers that read it, but is not a hit here."""
    if len(head) < _FIXED.size:
        return False
    lead = bytes(head[:7])  # magic, version, checksum algorithm
    if lead == _CRC32_LEAD:
        return True
    return lead == _XXH3_LEAD and _xxhash() is not None


def decode_record(key: BlockKey, data, *, shape: Sequence[int] | None = None,
                  dtype: str | None = None) -> np.ndarray:
    """The block stored in ``data`` (bytes-like), verified against ``key`` and, when given,
    the expected ``shape`` / ``dtype``. Raises :class:`RecordError` naming the mismatch.

    The returned array is a read-only view into ``data`` (no copy).
    """
    mv = memoryview(data).cast("B")
    if len(mv) < _FIXED.size:
        raise RecordError(f"truncated header: {len(mv)} bytes")
    magic, version, alg, ndim, klen, dlen, plen = _FIXED.unpack_from(mv, 0)
    if magic != RECORD_MAGIC:
        raise RecordError("bad magic")
    if version != FORMAT_VERSION:
        raise UnreadableHere(f"format version {version}, expected {FORMAT_VERSION}")
    off = _FIXED.size
    fields_len = off + 8 * ndim + klen + dlen
    need = fields_len + _DIGEST_LEN + plen
    if len(mv) != need:
        raise RecordError(f"record length {len(mv)}, header says {need}")
    # Integrity first: the digest covers every header field and the payload, so a corrupt
    # shape, dtype or key field is a checksum mismatch (dropped), never a valid-looking record
    # of another layout (kept).
    payload = mv[fields_len + _DIGEST_LEN:]
    got = _record_digest(alg, mv[:fields_len], payload)
    if got is None:
        raise UnreadableHere(f"checksum algorithm {alg} unavailable here")
    if got != bytes(mv[fields_len:fields_len + _DIGEST_LEN]):
        raise RecordError("checksum mismatch")
    stored_shape = struct.unpack_from(f"<{ndim}Q", mv, off)
    off += 8 * ndim
    if bytes(mv[off:off + klen]) != key.encode():
        raise RecordError("key/namespace mismatch")
    off += klen
    stored_dtype = bytes(mv[off:off + dlen]).decode("utf-8", "replace")
    if dtype is not None and stored_dtype != dtype_str(dtype):
        raise UnexpectedLayout(f"dtype {stored_dtype}, expected {dtype_str(dtype)}")
    if stored_dtype != key.namespace.dtype:
        raise RecordError(f"dtype {stored_dtype}, namespace says {key.namespace.dtype}")
    if shape is not None and tuple(stored_shape) != tuple(int(s) for s in shape):
        raise UnexpectedLayout(f"shape {tuple(stored_shape)}, expected {tuple(shape)}")
    try:
        np_dtype = numpy_dtype(stored_dtype)
    except TypeError as e:
        raise RecordError(f"unknown dtype {stored_dtype!r}") from e
    if math.prod(stored_shape) * np_dtype.itemsize != plen:
        raise RecordError("payload length does not match shape and dtype")
    arr = np.frombuffer(payload, dtype=np_dtype).reshape(stored_shape)
    if arr.flags.writeable:
        arr.flags.writeable = False
    return arr


# --------------------------------------------------------------------------------------------
# The interface.

@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    puts: int = 0
    rejected: int = 0      # puts refused (too big, budget, server down)
    corrupt: int = 0       # records that failed verification (served as misses)
    unreadable: int = 0    # records this process cannot verify (kept; served as misses)
    errors: int = 0        # storage faults caught (I/O, connection, timeout)
    evictions: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


def check_keys(keys) -> Sequence[BlockKey]:
    """``keys`` (a list or tuple as is, another iterable as a list) once every one is a
    :class:`BlockKey`, else a TypeError naming ``keys[i]``. Every tier's read, put and remove
    runs it first: a raw hash or a str was an AttributeError deep in a tier, which a
    :class:`TieredStore` took for a storage fault (a miss) instead of the caller's error.
    ``keys`` that cannot be iterated (one key, an int) is a TypeError naming ``keys``, not
    "'int' object is not iterable"."""
    if not isinstance(keys, (list, tuple)):
        try:
            keys = list(keys)
        except TypeError:
            raise TypeError(f"keys: expected a sequence of BlockKey, got "
                            f"{type(keys).__name__} {keys!r}") from None
    for i, k in enumerate(keys):
        if not isinstance(k, BlockKey):
            raise TypeError(f"keys[{i}]: expected BlockKey, got {type(k).__name__}")
    return keys


def check_values(keys, values) -> tuple[Sequence[BlockKey], Sequence]:
    """``(keys, values)`` checked: the keys by :func:`check_keys` (any iterable, as a list), the
    values as they are when they have a length (a list, a tuple, a stacked array) and as a
    list otherwise (a generator), one per key (ValueError naming ``values`` otherwise). Values
    with neither a length nor items (a 0-d array, a scalar) are a TypeError naming ``values``:
    a 0-d array has ``__len__`` yet ``len()`` raises."""
    keys = check_keys(keys)
    try:
        len(values)
    except TypeError:
        try:
            values = list(values)
        except TypeError:
            shape = getattr(values, "shape", None)
            what = type(values).__name__ + ("" if shape is None else f" of shape {shape}")
            raise TypeError(f"values: expected a sequence of arrays, got {what}") from None
    if len(values) != len(keys):
        raise ValueError(f"values: expected {len(keys)} values (one per key), got {len(values)}")
    return keys, values


def check_put_values(keys, values) -> tuple[Sequence[BlockKey], list[np.ndarray]]:
    """:func:`check_values`, then every value as an array whose dtype is its key's namespace
    dtype (ValueError naming ``values[i]``): ``(keys, arrays)``. A put runs this before
    storing anything, so a batch with one bad value stores none of it."""
    keys, values = check_values(keys, values)
    out = []
    for i, (k, v) in enumerate(zip(keys, values, strict=True)):
        v = np.asarray(v)
        if dtype_str(v) != k.namespace.dtype:
            raise ValueError(f"values[{i}]: dtype {dtype_str(v)} does not match the key's "
                             f"namespace dtype {k.namespace.dtype}")
        out.append(v)
    return keys, out


def check_shape(name: str, shape, *, optional: bool = False) -> tuple[int, ...] | None:
    """``shape`` (a tuple, list or 1-d integer array of ints >= 0) as a tuple of Python ints;
    None as is when ``optional``. A TypeError naming ``name`` otherwise (an int, a str, floats,
    bools: ``shape=5`` was "'int' object is not iterable" deep in a tier, which a
    :class:`TieredStore` took for a storage fault), a ValueError for a negative dim."""
    if shape is None and optional:
        return None
    if type(shape) is tuple and all(type(s) is int and s >= 0 for s in shape):
        return shape  # the usual case (an array's .shape): no copy
    what = "a sequence of ints or None" if optional else "a sequence of ints"
    try:
        if isinstance(shape, (str, bytes, bytearray, memoryview)):
            raise TypeError
        dims = []
        for s in shape:
            if isinstance(s, (bool, np.bool_)):
                raise TypeError
            dims.append(operator.index(s))
    except TypeError:
        raise TypeError(f"{name}: expected {what}, got {shape!r}") from None
    if any(d < 0 for d in dims):
        raise ValueError(f"{name}: expected dims >= 0, got {tuple(dims)}")
    return tuple(dims)


def check_dtype(name: str, dtype, *, optional: bool = False) -> str | None:
    """``dtype`` (a dtype name, numpy dtype or scalar type, torch dtype, array) as its canonical
    name; None as is when ``optional``. A TypeError naming ``name`` for an object that names no
    dtype (``dtype=5``). A str is a name whatever it names: a tier holds blocks of namespace
    dtypes only, so a get asking for another dtype is a miss."""
    if dtype is None and optional:
        return None
    dt = dtype_str(dtype)
    if dt in CACHE_DTYPES or isinstance(dtype, str):
        return dt
    try:
        numpy_dtype(dt)
    except Exception:  # noqa: BLE001 - re-raised naming the argument
        raise TypeError(f"{name}: expected {'None or ' if optional else ''}a dtype, got "
                        f"{type(dtype).__name__} {dtype!r}") from None
    return dt


def check_get_layout(shape, dtype) -> tuple[tuple[int, ...] | None, str | None]:
    """A ``batch_get``'s ``shape=`` and ``dtype=``, checked once per call by every tier:
    ``(shape as a tuple of ints or None, dtype's canonical name or None)``
    (:func:`check_shape`, :func:`check_dtype`)."""
    return (check_shape("shape", shape, optional=True),
            check_dtype("dtype", dtype, optional=True))


def first_occurrences(keys: Sequence[BlockKey]) -> tuple[list[int], list[tuple[int, int]]]:
    """(positions of each key's first occurrence in ``keys``, ``(position, first position)``
    for every repeat): a put stores a key repeated in its batch once and reports that result
    at each of its positions."""
    todo: list[int] = []
    repeats: list[tuple[int, int]] = []
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        sk = k.storage_key()
        j = first.get(sk)
        if j is not None and keys[j] == k:
            repeats.append((i, j))
            continue
        first[sk] = i
        todo.append(i)
    return todo, repeats


@functools.cache
def _warn_unreadable(tier: str, reason: str) -> None:
    """Tier._layout_miss's warning, once per (tier kind, reason)."""
    import warnings

    fix = ("install xxhash (pip install 'prefixkv[hash]') to read them, or give every worker "
           "the same checksum=" if "checksum" in reason else
           "they were written by another prefixkv release")
    warnings.warn(f"prefixkv {tier} tier: records this process cannot verify ({reason}) are "
                  f"misses here, kept for the workers that can: {fix}", RuntimeWarning,
                  stacklevel=4)


class Tier(ABC):
    """A KV block store. Never raises on storage faults: a fault is a miss / ``False``.

    ``events``: the tier's :class:`~prefixkv.paged.events.EventBus`; it publishes KVEvents with
    ``tier=self.name`` and the key's salt as namespace: "stored" (new blocks of a put),
    "evicted" (dropped for room), "removed" (removed, or dropped as corrupt), "cleared".
    ``block_size`` (tokens per block, 0 = unknown) only feeds ``KVEvent.num_tokens``.

    Threads: each call of a method in ``_LOCKED`` holds the tier's lock (reentrant, one per
    tier object, events published inside it), in every subclass (``__init_subclass__`` wraps
    the ones it defines). An engine's scheduler thread onboarding and offloading while a
    prefetch or write-back thread uses the same store (SGLang HiCache's, LMCache's layout)
    is then safe: unlocked, two NIXL readers verified a record in the shared staging
    buffer, then copied out another thread's (another tenant's block served), and racing
    puts left a host tier "full" of nothing. A sequence of calls is not atomic: a block
    found by ``batch_exists`` may be evicted before the ``batch_get``, which then misses.
    """

    name: str = "tier"
    #: The methods that run under the tier's lock (those a subclass defines are wrapped).
    _LOCKED = ("batch_exists", "batch_get", "batch_put", "batch_remove", "clear", "close",
               "touch", "reserve", "allocate")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in cls._LOCKED:
            fn = cls.__dict__.get(name)
            if callable(fn) and not getattr(fn, "locked", False):
                setattr(cls, name, locked(fn))

    def __init__(self):
        from ..events import EventBus

        self._lock = threading.RLock()
        self.stats = TierStats()
        self.events = EventBus()
        self.block_size = 0

    def _publish(self, kind: str, keys: Sequence[BlockKey]) -> None:
        """One event per salt namespace, hashes in call order (no-op with no subscriber)."""
        if not keys or not self.events:
            return
        from ..events import KVEvent

        groups: dict[bytes, list[bytes]] = {}
        for k in keys:
            groups.setdefault(k.namespace.salt, []).append(k.block_hash)
        for salt, hashes in groups.items():
            self.events.publish(KVEvent(kind, tuple(hashes), None, self.name, salt,
                                        len(hashes) * int(self.block_size)))

    def _end_put(self, results: list, repeats, todo, stored: list) -> None:
        """The end of a batch_put that tried the positions ``todo`` (first occurrences) and
        stored the keys ``stored``: each repeated key's positions report its first one's
        result, the rest of ``todo`` counts rejected, one "stored" event."""
        for i, j in repeats:
            results[i] = results[j]
        self.stats.rejected += len(todo) - len(stored)
        self._publish("stored", stored)

    def _layout_miss(self, e: UnexpectedLayout) -> None:
        """Count a good record that a get cannot serve: one of another shape or dtype in
        ``corrupt``; one this process cannot verify (another format version, xxh3_128 without
        xxhash: a worker with other extras shares the store) in ``unreadable``, with a
        RuntimeWarning once per process and reason (every hit on another worker's records was
        lost as if they were corrupt, silently)."""
        if isinstance(e, UnreadableHere):
            self.stats.unreadable += 1
            _warn_unreadable(self.name, str(e))
        else:
            self.stats.corrupt += 1

    def _publish_cleared(self) -> None:
        if self.events:
            from ..events import KVEvent

            self.events.publish(KVEvent("cleared", (), None, self.name, b"", 0))

    @abstractmethod
    def batch_exists(self, keys: Sequence[BlockKey]) -> int:
        """Number of leading ``keys`` present (stops at the first absent one)."""

    @abstractmethod
    def batch_get(self, keys: Sequence[BlockKey], *, shape: Sequence[int] | None = None,
                  dtype: str | None = None) -> list[np.ndarray | None]:
        """Per key: the stored block ([len(caches), *block_shape], read-only) or None.

        None also for a record that fails verification (wrong key, shape, dtype, checksum).
        """

    @abstractmethod
    def batch_put(self, keys: Sequence[BlockKey], values: Sequence[np.ndarray]) -> list[bool]:
        """Store ``values[i]`` under ``keys[i]``; per key whether it is now stored."""

    def batch_remove(self, keys: Sequence[BlockKey]) -> int:
        """Remove keys where present; returns how many were removed."""
        return 0

    def clear(self) -> None:  # noqa: B027 - optional hook
        """Drop everything this tier object stores."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections / handles."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r})"
