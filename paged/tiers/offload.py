"""Tier chain and the device <-> tier glue.

:class:`TieredStore` chains tiers fastest first (host -> disk -> remote):

- put is **write-through**: a block goes to every tier at once (so a crash, an eviction from
  a faster tier or a process restart loses nothing the slower tiers hold); per key the result
  is True when at least one tier stored it.
- get looks tiers up in order; a block found in a slower tier is **promoted** (written) into
  the faster tiers that missed it.
- ``batch_exists`` counts leading keys present in *some* tier.
- A tier that raises is counted (``errors``) and treated as a miss / False: a failing tier
  degrades the chain, never breaks it. A put that raises part-way (a host tier's allocator
  failing on a later block) then asks the tier which of the keys it holds, so the answer
  stays per key whether some tier holds it. TypeError / ValueError from bad input (keys that
  are not :class:`BlockKey`, checked before any tier is asked) still raise.

:class:`BlockOffloader` moves whole blocks between KV caches (``caches``: the list of
per-layer arrays ``[num_blocks, *block_shape]`` that ``gather_blocks`` takes) and a store:
``offload`` gathers blocks into rows ``[len(caches), *block_shape]`` and puts them under
``BlockKey(hash, namespace)``; ``onboard`` gets the leading hits, checks each against the
expected shape and dtype (the tiers check hash, namespace and checksum) and scatters them
into the destination blocks. The gather/scatter functions move blocks between the caches and
host numpy rows: for torch caches (any device, bfloat16 and float8_e4m3fn included)
``prefixkv.torch_frontend.gather_blocks_to_host`` / ``scatter_blocks_from_host``; for JAX
caches ``gather_blocks`` (its result converts to numpy) and a functional ``scatter_blocks``.
By default numpy caches are copied in place; other caches without them raise a TypeError
naming ``caches``.

float8_e4m3fn caches move as their bytes (rows of ml_dtypes float8_e4m3fn, NaN patterns
included) under a namespace that carries the scales they were quantized with
(``Namespace(..., dtype="float8_e4m3fn", kv_scales=...)``): blocks written under other scales
are misses.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable, Sequence

import numpy as np

from .. import validate
from ..events import unsubscribe_all
from .base import (
    BlockKey,
    Namespace,
    RecordError,
    Tier,
    TierStats,
    check_dtype,
    check_get_layout,
    check_keys,
    check_shape,
    check_values,
    dtype_str,
    first_occurrences,
    hash_bytes,
)
from .host import HostTier


def _held(n, limit: int) -> int:
    """A tier's ``batch_exists`` answer for ``limit`` keys as a count: a misbehaving tier's
    answer that is not an int (None, a float, a bool) is 0, a miss; it is capped at
    ``limit``."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        return 0
    return max(0, min(int(n), limit))


def _fits(a, key: BlockKey, shape: tuple[int, ...] | None, dtype: str | None) -> bool:
    """Whether a tier's answer may be served: an array of the key's dtype and of the asked
    shape and dtype (checked by :func:`check_get_layout`; a misbehaving tier's other answers
    are misses, never served)."""
    if not isinstance(a, np.ndarray) or dtype_str(a) != key.namespace.dtype:
        return False
    if shape is not None and a.shape != shape:
        return False
    return dtype is None or dtype_str(a) == dtype


#: The methods :class:`BlockOffloader` calls on its store.
_STORE_METHODS = ("batch_exists", "batch_get", "batch_put")


def _check_store(store) -> None:
    """A :class:`Tier`, or an object with the tier methods the offloader calls; else a
    TypeError naming ``store`` (None was taken, then failed at the first offload)."""
    if isinstance(store, Tier):
        return
    if isinstance(store, type):  # a class (HostTier): its methods are unbound
        raise TypeError(f"store: expected a Tier, got the class {store.__name__} (an instance "
                        f"of it is one)")
    missing = [m for m in _STORE_METHODS if not callable(getattr(store, m, None))]
    if missing:
        raise TypeError(f"store: expected a Tier, got {type(store).__name__} (an object "
                        f"without {', '.join(missing)})")


_INT32 = np.iinfo(np.int32)


def _id_list(block_ids: list | tuple) -> np.ndarray:
    """A list or tuple of block ids as int32, every item checked first: an int or numpy
    integer (not a bool, a float, a str, None: a TypeError naming ``block_ids[i]``; the list
    was cast with ``np.asarray(dtype=np.int32)``, which truncated ``[1.9]`` to block 1 and took
    ``True`` for block 1, where a float array is refused) that fits int32 (a ValueError naming
    ``block_ids[i]``, not an OverflowError from the cast)."""
    for i, b in enumerate(block_ids):
        if type(b) is int and _INT32.min <= b <= _INT32.max:
            continue  # the usual case
        if isinstance(b, (bool, np.bool_)) or not isinstance(b, (int, np.integer)):
            raise TypeError(f"block_ids[{i}]: expected an int block id, got "
                            f"{type(b).__name__} {b!r}")
        if not _INT32.min <= int(b) <= _INT32.max:
            raise ValueError(f"block_ids[{i}]: expected a block id that fits int32, got {b}")
    return np.asarray(block_ids, dtype=np.int32)


def _hash_list(block_hashes) -> list | tuple:
    """``block_hashes`` as a list or tuple (any other iterable listed: a generator had no
    len()); a TypeError naming ``block_hashes`` for one hash (bytes, a str) or a
    non-iterable."""
    if isinstance(block_hashes, (list, tuple)):
        return block_hashes
    bad = isinstance(block_hashes, (str, bytes, bytearray, memoryview))
    if not bad:
        try:
            return list(block_hashes)
        except TypeError:
            pass
    raise TypeError(f"block_hashes: expected a sequence of block hashes, got "
                    f"{type(block_hashes).__name__}")


class TieredStore(Tier):
    """Tiers in lookup order (fastest first); write-through puts, promoting gets.

    ``events`` carries every tier's own events (each with its tier's name), so one
    subscription follows the whole chain; setting ``block_size`` sets it on every tier (it
    feeds ``KVEvent.num_tokens``)."""

    name = "tiered"

    def __init__(self, tiers: Sequence[Tier], *, promote: bool = True):
        super().__init__()
        tiers = list(tiers)
        if not tiers:
            raise ValueError("tiers: expected at least one tier, got an empty sequence")
        for i, t in enumerate(tiers):
            if not isinstance(t, Tier):
                raise TypeError(f"tiers[{i}]: expected a Tier, got {type(t).__name__}")
        self.tiers = tiers
        # a tier may outlive the store (one tier shared by the stores of successive runs):
        # close() unsubscribes, and so does a store dropped unclosed, else each old store's
        # bus (and every Router or EventLog subscribed to it) stayed alive and was fed the
        # shared tier's events (the callbacks hold the bus, never the store)
        self._unsubscribe = [t.events.subscribe(self.events.publish) for t in tiers]
        weakref.finalize(self, unsubscribe_all, self._unsubscribe)
        self.promote = bool(promote)
        self.tier_errors = {t.name: 0 for t in tiers}

    @property
    def block_size(self) -> int:
        return self._block_size

    @block_size.setter
    def block_size(self, value: int) -> None:
        self._block_size = int(value)
        for t in getattr(self, "tiers", ()):
            t.block_size = self._block_size

    def _guard(self, tier: Tier, fn, default):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - a broken tier is a miss
            if isinstance(e, (TypeError, ValueError)) and not isinstance(e, RecordError):
                raise  # bad input from the caller, not a storage fault
            self.stats.errors += 1
            self.tier_errors[tier.name] = self.tier_errors.get(tier.name, 0) + 1
            return default

    def _put_guarded(self, tier: Tier, call, keys: list, known: list[bool]) -> list:
        """``call()`` (a put of ``keys`` into ``tier``) under :meth:`_guard`. When it raises
        (counted), the tier may have stored some keys before the fault (a host tier whose
        allocator fails on a later block): those not already ``known`` held are asked of the
        tier, one key at a time, until an answer fails, so a key the tier holds reports True."""
        failed = []
        res = self._guard(tier, call, failed)
        if res is not failed:
            return res
        out = [False] * len(keys)
        for i, k in enumerate(keys):
            if known[i]:
                continue
            try:
                out[i] = _held(tier.batch_exists([k]), 1) == 1
            except Exception as e:  # noqa: BLE001 - the tier is failing: the rest are misses
                if isinstance(e, (TypeError, ValueError)) and not isinstance(e, RecordError):
                    raise
                break
        return out

    #: Keys in the first window :meth:`batch_exists` asks a tier about; the window doubles
    #: while the tier holds all of it.
    EXISTS_WINDOW = 32

    def _run(self, t: Tier, keys: list, pos: int) -> int:
        """The leading keys of ``keys[pos:]`` that ``t`` holds, asked in doubling windows: the
        keys handed to ``t`` are at most twice the answer plus one window, however many
        keys follow (a tier may copy the whole list it is given)."""
        run, w = 0, self.EXISTS_WINDOW
        while pos + run < len(keys):
            window = keys[pos + run:pos + run + w]
            got = _held(self._guard(t, lambda t=t, window=window: t.batch_exists(window), 0),
                        len(window))
            run += got
            if got < len(window):
                break
            w *= 2
        return run

    def batch_exists(self, keys):
        keys = list(check_keys(keys))
        pos = 0
        while pos < len(keys):
            best = 0
            for t in self.tiers:
                best = max(best, self._run(t, keys, pos))
                if pos + best >= len(keys):
                    break
            if best == 0:
                break
            pos += best
        return pos

    def batch_get(self, keys, *, shape=None, dtype=None):
        keys = list(check_keys(keys))
        shape, dtype = check_get_layout(shape, dtype)
        out: list[np.ndarray | None] = [None] * len(keys)
        missing = list(range(len(keys)))
        for level, t in enumerate(self.tiers):
            if not missing:
                break
            want = [keys[i] for i in missing]
            got = self._guard(t, lambda t=t, want=want: t.batch_get(want, shape=shape,
                                                                       dtype=dtype),
                              [None] * len(want))
            if not isinstance(got, list) or len(got) != len(want):
                got = [None] * len(want)  # a misbehaving tier: ignore its answer
            got = [a if _fits(a, k, shape, dtype) else None for a, k in zip(got, want, strict=True)]
            found = [(i, a) for i, a in zip(missing, got, strict=False) if a is not None]
            for i, a in found:
                out[i] = a
            if found and level > 0 and self.promote:
                fk, fv = [keys[i] for i, _ in found], [a for _, a in found]
                for up in self.tiers[:level]:
                    self._guard(up, lambda up=up, fk=fk, fv=fv: up.batch_put(fk, fv), None)
            missing = [i for i, a in zip(missing, got, strict=False) if a is None]
        hits = len(keys) - len(missing)
        self.stats.hits += hits
        self.stats.misses += len(missing)
        return out

    def batch_put(self, keys, values, *, copy: bool = True):
        """copy=False: values are fresh C-contiguous arrays the first tier may adopt when it is
        a :class:`HostTier` (see :meth:`HostTier.batch_put`)."""
        keys, values = check_values(keys, values)
        return self._put_from(0, list(keys), list(values), copy=copy)

    def _put_from(self, start: int, keys: list, values: list, *, copy: bool = True,
                  stored: list[bool] | None = None) -> list[bool]:
        """Write-through to ``tiers[start:]`` only (the tiers above refused these blocks, or
        hold the ones ``stored`` marks); per key whether some tier holds it. Counted in
        ``stats`` as a put of ``keys``."""
        stored = [False] * len(keys) if stored is None else list(stored)
        for level, t in enumerate(self.tiers[start:], start):
            if level == 0 and isinstance(t, HostTier):
                def call(t=t):
                    return (t.batch_put(keys, values, copy=copy))
            else:
                def call(t=t):
                    return (t.batch_put(keys, values))
            res = self._put_guarded(t, call, keys, stored)
            stored = [a or bool(b) for a, b in zip(stored, res, strict=False)]
        self.stats.puts += sum(stored)
        self.stats.rejected += len(keys) - sum(stored)
        return stored

    def batch_remove(self, keys):
        keys = list(check_keys(keys))
        return max([self._guard(t, lambda t=t: t.batch_remove(keys), 0) for t in self.tiers])

    def clear(self):
        for t in self.tiers:
            self._guard(t, t.clear, None)

    def close(self):
        for t in self.tiers:
            self._guard(t, t.close, None)
        unsubscribe_all(self._unsubscribe)  # after the tiers' own close events

    def tier_stats(self) -> dict[str, TierStats]:
        return {t.name: t.stats for t in self.tiers}


Gather = Callable[[list, np.ndarray], np.ndarray]
Scatter = Callable[[list, np.ndarray, np.ndarray], object]


_PASS_OPS = ("pass gather= and scatter= (torch: prefixkv.torch_frontend.gather_blocks_to_host "
             "/ scatter_blocks_from_host; JAX: gather_blocks / scatter_blocks)")


def _as_host(x, name: str, want: str) -> np.ndarray:
    """x as a numeric numpy array (as is, or converted: a JAX array on the host), else a
    TypeError naming ``name`` (a torch bfloat16 or GPU tensor, an object)."""
    try:
        a = x if isinstance(x, np.ndarray) else np.asarray(x)
    except Exception as e:  # noqa: BLE001 - re-raised with the argument named
        raise TypeError(f"{name}: expected {want}, got {type(x).__module__}."
                        f"{type(x).__name__} ({e}); {_PASS_OPS}") from e
    if a.dtype == object:
        raise TypeError(f"{name}: expected {want}, got {type(x).__name__} as an object array; "
                        f"{_PASS_OPS}")
    return a


def _host_rows(buf, n: int) -> np.ndarray:
    """gather's result as a numpy array of n rows, or a TypeError naming gather."""
    rows = _as_host(buf, "gather", f"a host array of {n} rows")
    if rows.ndim < 1 or rows.shape[0] != n:
        raise TypeError(f"gather: expected a host array of {n} rows, got shape {rows.shape}")
    return rows


def _numpy_caches(caches) -> None:
    """The default scatter writes numpy caches in place: anything else is a TypeError naming
    caches (torch tensors do not take ml_dtypes rows, JAX arrays are immutable)."""
    for c in caches:
        if not isinstance(c, np.ndarray):
            raise TypeError(f"caches: the default scatter writes numpy caches in place, got "
                            f"{type(c).__module__}.{type(c).__name__}; {_PASS_OPS}")


def _copy_rows(caches: list[np.ndarray], ids: np.ndarray) -> np.ndarray:
    """Blocks ``ids`` of numpy ``caches`` as rows [len(ids), len(caches), *block_shape], one
    copy per block (np.take into the strided ``rows[:, layer]`` would stage another)."""
    rows = np.empty((len(ids), len(caches), *caches[0].shape[1:]), dtype=caches[0].dtype)
    for dst, b in zip(rows, ids.tolist(), strict=True):
        for layer, c in enumerate(caches):
            dst[layer] = c[b]
    return rows


def _first_host(store: Tier) -> HostTier | None:
    if isinstance(store, HostTier):
        return store
    if isinstance(store, TieredStore) and isinstance(store.tiers[0], HostTier):
        return store.tiers[0]
    return None


class BlockOffloader:
    """Offload device blocks to a store and onboard them back, checked.

    namespace: the :class:`Namespace` every key of this model/rank/salt carries (its dtype
    must be the caches' dtype; float8_e4m3fn: its kv_scales the caches' scales).
    gather(caches, block_ids) -> buffer [n, len(caches), *block_shape]; scatter(caches,
    buffer, block_ids) -> the updated caches (a functional op such as
    ``scatter_blocks_reference``) or None (an in-place op). Both default to in-place
    numpy copies for numpy caches (offload then copies each block once, straight into the
    host tier's memory).
    null_block: the caches' padding block (0 for a :class:`~prefixkv.paged.pool.BlockPool`'s
    caches), which offload and onboard then reject as a block id; None (the default): caches
    without one, every block id is data.

    The pool-facing glue degrades instead of raising: a failed offload on eviction
    (:meth:`offload_on_evict`) and a failed scatter in :meth:`onboard_request` are misses,
    counted in ``offload_errors`` / ``onboard_errors`` (the last exception in
    ``last_error``), and the first of each kind is also a RuntimeWarning (a gather or
    scatter that cannot work at all would otherwise only show as a cache that never hits).
    """

    def __init__(self, store: Tier, namespace: Namespace, *, gather: Gather | None = None,
                 scatter: Scatter | None = None, null_block: int | None = None):
        _check_store(store)
        if not isinstance(namespace, Namespace):
            raise TypeError(f"namespace: expected Namespace, got {type(namespace).__name__}")
        if null_block is not None and (isinstance(null_block, bool)
                                       or not isinstance(null_block, (int, np.integer))
                                       or null_block < 0):
            raise ValueError(f"null_block: expected None or a block id >= 0, got {null_block!r}")
        self.store = store
        self.namespace = namespace
        self.gather = gather
        self.scatter = scatter
        self.null_block = None if null_block is None else int(null_block)
        #: Bytes of blocks copied out at a time for the tiers below the host tier when an
        #: offload batch exceeds the host tier's budget (bounds the memory of that copy).
        self.overflow_chunk_bytes = 64 << 20
        #: offloads on eviction that failed (the blocks were not offloaded: a later miss).
        self.offload_errors = 0
        #: loads that failed and were a miss: onboard_request calls rolled back, and a store's
        #: batch_get answer :meth:`fetch` could not use (not a list of one entry per key).
        self.onboard_errors = 0
        #: the exception of the last failure counted above (None: none yet).
        self.last_error: BaseException | None = None
        #: ``(salt bytes) -> Namespace``: where the pool glue files a request's blocks, for
        #: :meth:`offload_on_evict` and :meth:`onboard_request` alike; None: ``namespace``
        #: with the salt. ``offload_on_evict(namespace_for=)`` sets it.
        self.namespace_for: Callable[[bytes], Namespace] | None = None
        self._warned: set[str] = set()

    def _failed(self, kind: str, e: BaseException) -> None:
        """Count a swallowed failure of ``kind`` ("offload" or "onboard"); warn on the first."""
        setattr(self, f"{kind}_errors", getattr(self, f"{kind}_errors") + 1)
        self.last_error = e
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(f"BlockOffloader: {kind} failed and was counted as a miss "
                          f"({type(e).__name__}: {e}); later failures are only counted in "
                          f"{kind}_errors", RuntimeWarning, stacklevel=3)

    def _salted(self, salt: bytes) -> Namespace:
        """The Namespace of a pool's salt namespace: ``namespace_for(salt)``, or this
        offloader's namespace with that salt (TypeError naming namespace_for for an answer
        that is not a Namespace)."""
        if self.namespace_for is None:
            return self.namespace.with_salt(salt)
        ns = self.namespace_for(salt)
        if not isinstance(ns, Namespace):
            raise TypeError(f"namespace_for: expected a Namespace for salt {salt!r}, got "
                            f"{type(ns).__name__}")
        return ns

    def keys(self, block_hashes: Sequence, namespace: Namespace | None = None) -> list[BlockKey]:
        ns = namespace or self.namespace
        return [BlockKey(h, ns) for h in block_hashes]

    def _check_ids(self, caches, block_ids, *, distinct: bool = False) -> np.ndarray:
        """The caches and ``block_ids`` checked (ints in range, not the null block; distinct
        when asked): the ids as int64."""
        if isinstance(block_ids, (list, tuple)):  # host-side convenience: plain int lists
            block_ids = _id_list(block_ids)
        validate.check_gather_blocks(caches, block_ids)
        ids = validate.check_block_ids_values(int(caches[0].shape[0]), block_ids,
                                              distinct=distinct)
        if self.null_block is not None and (ids == self.null_block).any():
            raise ValueError(f"block_ids: block {self.null_block} is the null block (padding), "
                             f"never offloaded or onboarded; got {ids.tolist()}")
        return ids

    def _check(self, caches, block_ids, block_hashes, ns: Namespace):
        ids = self._check_ids(caches, block_ids)
        if len(block_hashes) != len(ids):
            raise ValueError(f"block_hashes: expected {len(ids)} hashes (one per block id), "
                             f"got {len(block_hashes)}")
        if dtype_str(caches[0]) != ns.dtype:
            raise ValueError(f"caches: dtype {dtype_str(caches[0])} does not match the "
                             f"namespace dtype {ns.dtype}")
        return ids

    def offload(self, caches, block_ids, block_hashes, *, namespace: Namespace | None = None
                ) -> list[bool]:
        """Store blocks ``block_ids`` of ``caches`` under ``block_hashes``; per block whether
        some tier holds it now.

        A hash repeated in the batch is offloaded once, from its first position's block (the
        key names the content), and every position of it reports that result (a repeat the
        host tier holds is refreshed once, at its first position, as its batch_put stores a
        repeat at its first): the paths
        below (:meth:`_put`) see distinct keys only, so the host tier keeps the same leading
        blocks whichever path copies them. Stats: each tier counts the block once; a
        :class:`TieredStore` counts every position, as its put of the whole batch would
        (a repeat of a block put here is one more put, or rejection, like its first; a
        repeat of a block the host tier held already is a refresh, like its first: not
        counted)."""
        ns = namespace or self.namespace
        block_hashes = _hash_list(block_hashes)
        ids = np.asarray(self._check(caches, block_ids, block_hashes, ns), dtype=np.int32)
        keys = self.keys(block_hashes, ns)
        firsts, repeats = first_occurrences(keys)
        if not repeats:
            return self._offload_distinct(caches, ids, keys)[0]
        once, put = self._offload_distinct(caches, ids[firsts], [keys[i] for i in firsts])
        out = [False] * len(keys)
        for i, r in zip(firsts, once, strict=True):
            out[i] = r
        for pos, first in repeats:
            out[pos] = out[first]
        if isinstance(self.store, TieredStore):
            was_put = {firsts[j] for j in put}
            counted = [out[pos] for pos, first in repeats if first in was_put]
            self.store.stats.puts += sum(counted)
            self.store.stats.rejected += len(counted) - sum(counted)
        return out

    def _offload_distinct(self, caches, ids: np.ndarray, keys: list[BlockKey]
                          ) -> tuple[list[bool], list[int]]:
        """:meth:`offload` of distinct ``keys`` (``ids`` validated): (per block whether some
        tier holds it now, the positions put: the rest the host tier held and refreshed)."""
        host = _first_host(self.store)
        out = [True] * len(keys)
        todo = list(range(len(keys)))
        touched: list[int] = []
        if host is not None and todo:  # blocks the host tier holds already: refreshed, not
            held = host.touch(keys, (len(caches), *caches[0].shape[1:]))  # copied again
            todo = [i for i, h in enumerate(held) if not h]
            touched = [i for i, h in enumerate(held) if h]
        if todo:
            evictions = host.stats.evictions if host is not None else 0
            protect = frozenset(keys[i].storage_key() for i in touched)
            stored = self._put(caches, ids[todo], [keys[i] for i in todo], host, protect)
            for i, r in zip(todo, stored, strict=True):
                out[i] = r
            if touched and host.stats.evictions != evictions:
                # the put made room in the host tier (the paths that cannot protect the
                # refreshed blocks: a gather=, an allocator failure): are they still held?
                for i in touched:
                    if keys[i] not in host:
                        out[i] = self._held_below(keys[i])
        return out, todo

    def _held_below(self, key: BlockKey) -> bool:
        """Whether a tier below the host tier holds ``key`` (its ``batch_exists`` answer read
        as a count, as :meth:`TieredStore.batch_exists` reads it)."""
        store = self.store
        if not isinstance(store, TieredStore):
            return False
        # normalised as the chain's own batch_exists does (_held): a tier answering True,
        # -3 or "2" for a key it does not hold must not make offload report the block held
        return any(_held(store._guard(t, lambda t=t: t.batch_exists([key]), 0), 1) == 1
                   for t in store.tiers[1:])

    def _put(self, caches, ids: np.ndarray, keys: list[BlockKey], host: HostTier | None,
             protect: frozenset = frozenset()) -> list[bool]:
        """Copy blocks ``ids`` (validated, int32) of ``caches`` out and put them under
        ``keys`` (distinct: :meth:`offload` put each repeat's block once); per block whether
        some tier holds it now. ``protect``: storage names of host blocks the room for these
        must not come from (the batch's refreshed ones)."""
        if self.gather is None and host is not None and all(isinstance(c, np.ndarray)
                                                           for c in caches):
            # One copy per block, straight into host-tier memory (no staging buffer); the
            # memory of evicted blocks is reused, so nothing is allocated in steady state.
            row_shape = (len(caches), *caches[0].shape[1:])
            def reserve():
                return host.reserve(len(ids), row_shape, caches[0].dtype, protect=protect)
            # a failing allocator (pinned memory) is a tier fault: counted, then the generic
            # path below (whose put the chain guards too)
            rows = (self.store._guard(host, reserve, None)
                    if isinstance(self.store, TieredStore) else reserve())
            if rows is not None:  # None: the allocator failed, the generic path tries again
                r = len(rows)
                for dst, b in zip(rows, ids[:r].tolist(), strict=True):
                    for layer, c in enumerate(caches):
                        dst[layer] = c[b]
                if r == len(ids):
                    return self.store.batch_put(keys, rows, copy=False)
                # The batch exceeds the host budget: the host keeps the leading r blocks (as
                # its put of the whole batch would) and only the rest is copied again, in
                # bounded chunks, for the tiers below it.
                out = self.store.batch_put(keys[:r], rows, copy=False) if r else []
                del rows
                return out + self._put_below(caches, ids[r:], keys[r:], host)
        if self.gather is not None and host is not None:
            return self._put_gathered(caches, ids, keys, host, protect, self._chunk_rows(caches))
        if self.gather is None:
            host_caches = [_as_host(c, "caches", "arrays numpy converts (the default gather)")
                           for c in caches]
            row_shape = (len(ids), len(caches), *caches[0].shape[1:])
            buf = np.empty(row_shape, dtype=host_caches[0].dtype)
            for layer, c in enumerate(host_caches):
                np.take(c, ids, axis=0, out=buf[:, layer], mode="clip")
        else:
            buf = _host_rows(self.gather(caches, ids), len(ids))
        return self.store.batch_put(keys, list(buf))

    def _chunk_rows(self, caches) -> int:
        """Blocks of ``caches`` in ``overflow_chunk_bytes`` (at least 1)."""
        c = caches[0]
        itemsize = int(getattr(c, "itemsize", 0) or c.element_size())
        row_bytes = len(caches) * int(np.prod(c.shape[1:])) * itemsize
        return max(1, self.overflow_chunk_bytes // max(row_bytes, 1))

    def _put_gathered(self, caches, ids: np.ndarray, keys: list[BlockKey], host: HostTier,
                      protect: frozenset, step: int) -> list[bool]:
        """The numpy path's put for a ``gather=``: the host keeps the leading blocks it has
        room for (never making it from the blocks of this call, refreshed or stored), the rest
        go to the tiers below it. Gathered ``step`` blocks at a time, each chunk into rows
        the host reserves for it and put before the next is gathered: the host memory this
        takes is one chunk beyond the host's budget (an eviction batch of a long prefill over
        a small host tier was gathered whole first), and a gather failing part-way leaves
        the chunks before it stored, having evicted only what they needed. ``keys`` are
        distinct (:meth:`offload` put each repeat's block once)."""
        def rows_of(ix):
            return _host_rows(self.gather(caches, ix), len(ix))

        store = self.store
        guarded = isinstance(store, TieredStore)
        keep = set(protect)
        out: list[bool] = []
        like = None  # the first chunk's rows: every later one must match them
        pos = 0
        while pos < len(ids):
            part = ids[pos:pos + step]
            chunk = rows_of(part)
            if like is None:
                like = (chunk.shape[1:], chunk.dtype)
            elif (chunk.shape[1:], chunk.dtype) != like:
                raise TypeError(f"gather: expected rows of {like[0]} {like[1]} as its first "
                                f"call gave, got {chunk.shape[1:]} {chunk.dtype}")
            reserve = functools.partial(host.reserve, len(part), like[0], like[1], protect=keep)
            rows = store._guard(host, reserve, None) if guarded else reserve()
            if rows is None:  # the allocator failed: this chunk as a plain put, then on
                out += store.batch_put(keys[pos:pos + len(part)], list(chunk))
                pos += len(part)
                continue
            r = len(rows)
            for j in range(r):
                rows[j][...] = chunk[j]
            if r:
                out += store.batch_put(keys[pos:pos + r], rows, copy=False)
                keep.update(k.storage_key() for k in keys[pos:pos + r])
            del rows
            if r < len(part):  # the host is full: the rest of the batch goes below it
                del chunk
                return out + self._put_below(caches, ids[pos + r:], keys[pos + r:], host,
                                             rows_of)
            pos += r
        return out

    def _put_below(self, caches, ids: np.ndarray, keys: list[BlockKey], host: HostTier,
                   rows_of=None) -> list[bool]:
        """Blocks ``ids`` (numpy caches) past what the host tier ``host`` has room for: put
        into the tiers below it (a :class:`TieredStore`'s), copied out at most
        ``overflow_chunk_bytes`` at a time, so the memory this takes is bounded however
        large the batch; where no tier is below (a lone host tier) they are dropped. The host
        counts them refused, as its put of the whole batch did. ``rows_of(ids)``: the blocks
        as host rows (default: copies of numpy caches). ``keys`` are distinct and none is
        in the host tier (:meth:`offload` put each repeat's block once and left the held
        ones out), so each block is copied and put once. Per block whether some tier holds
        it when this returns: a chunk's put may evict blocks an earlier chunk wrote to a
        small tier below, so those are asked again."""
        host.stats.rejected += len(keys)
        store = self.store
        if not isinstance(store, TieredStore):
            return [False] * len(keys)
        if len(store.tiers) == 1:
            return store._put_from(1, keys, [])
        out = [False] * len(keys)
        step = self._chunk_rows(caches)
        for c in range(0, len(keys), step):
            part = ids[c:c + step]
            rows = list(_copy_rows(caches, part) if rows_of is None else rows_of(part))
            out[c:c + len(part)] = store._put_from(1, keys[c:c + len(part)], rows)
            del rows  # before the next chunk is copied
        flipped = 0
        for i in range((len(keys) - 1) // step * step):  # chunks before the last one
            if out[i] and not self._held_below(keys[i]):
                out[i] = False
                flipped += 1
        store.stats.puts -= flipped
        store.stats.rejected += flipped
        return out

    def lookup(self, block_hashes: Sequence, *, namespace: Namespace | None = None) -> int:
        """Number of leading blocks some tier holds."""
        return self.store.batch_exists(self.keys(_hash_list(block_hashes), namespace))

    def fetch(self, block_hashes: Sequence, row_shape, dtype, *,
              namespace: Namespace | None = None) -> list[np.ndarray]:
        """The leading stored blocks of ``block_hashes``, verified (key, namespace, checksum by
        the tiers; shape ``row_shape`` = [len(caches), *block_shape] and ``dtype`` here),
        read-only. Stops at the first miss: only the leading blocks some tier holds
        (``batch_exists``) are read, so a missing block is never followed by reads (nor
        promotions) of blocks that could not be used."""
        ns = namespace or self.namespace
        row_shape = check_shape("row_shape", row_shape)
        want = check_dtype("dtype", dtype)
        block_hashes = _hash_list(block_hashes)
        for h in block_hashes:  # every hash checked (bytes: no call), though keys stop early
            if type(h) is not bytes or not h:
                hash_bytes(h)
        # keys made and looked up in doubling windows: a miss early in a long prompt costs
        # the keys before it (and one window), not a key per block
        keys: list[BlockKey] = []
        n, w = 0, 32
        while n == len(keys) < len(block_hashes):
            more = self.keys(block_hashes[n:n + w], ns)
            keys += more
            n += _held(self.store.batch_exists(more), len(more))
            w *= 2
        if n <= 0:
            return []
        got = self.store.batch_get(keys[:n], shape=row_shape, dtype=want)
        if not isinstance(got, list) or len(got) != n:
            # A misbehaving store (a tier of the user's): its answer is not one entry per key
            # asked, so no entry can be matched to a key (an extra row would be onboarded
            # under a hash no tier holds). The whole answer is a miss, counted as TieredStore
            # drops such an answer from one of its tiers.
            what = (f"{len(got)} entries" if isinstance(got, list)
                    else f"a {type(got).__name__}")
            self._failed("onboard", RuntimeError(
                f"store: batch_get of {n} keys answered {what}, not a list of {n}"))
            return []
        rows = []
        for a in got:
            # Belt and braces: the tiers verified key, namespace and checksum; re-check layout.
            if not isinstance(a, np.ndarray) or a.shape != row_shape or dtype_str(a) != want:
                break
            rows.append(a)
        return rows

    def scatter_rows(self, caches, block_ids, rows: Sequence[np.ndarray]):
        """Write ``rows[i]`` into block ``block_ids[i]`` of every cache; returns the caches
        (the scatter's result for a functional scatter). :meth:`fetch` then this is
        :meth:`onboard` split in two, with its checks: ``block_ids`` distinct ids in range,
        not the null block, at least one per row (the rest unused); each row a numpy array of
        shape ``(len(caches), *block shape)`` in the caches' dtype. A TypeError / ValueError
        naming the argument otherwise, nothing written (an unchecked float id was truncated,
        a negative one wrote the last block, a smaller row was broadcast into the block)."""
        if not isinstance(rows, (list, tuple)):
            rows = list(rows)
        ids = self._check_ids(caches, block_ids, distinct=True)
        if len(rows) > len(ids):
            raise ValueError(f"rows: expected at most {len(ids)} rows (one per block id), "
                             f"got {len(rows)}")
        shape, want = (len(caches), *caches[0].shape[1:]), dtype_str(caches[0])
        for i, row in enumerate(rows):
            if not isinstance(row, np.ndarray):
                raise TypeError(f"rows[{i}]: expected a numpy array, got {type(row).__name__}")
            if row.shape != shape or dtype_str(row) != want:
                raise ValueError(f"rows[{i}]: expected {want} of shape {shape} (one block of "
                                 f"each cache), got {dtype_str(row)} of shape {row.shape}")
        return self._scatter_rows(caches, ids.astype(np.int32), rows)

    def _scatter_rows(self, caches, ids: np.ndarray, rows: Sequence[np.ndarray]):
        """:meth:`scatter_rows` of checked int32 ``ids`` and rows."""
        if not rows:
            return caches
        ids = ids[:len(rows)]
        if self.scatter is None:
            _numpy_caches(caches)
            for b, row in zip(ids.tolist(), rows, strict=True):
                for layer, c in enumerate(caches):
                    c[b] = row[layer]
            return caches
        res = self.scatter(caches, np.stack(rows), ids)
        return caches if res is None else res

    def onboard(self, caches, block_ids, block_hashes, *, namespace: Namespace | None = None):
        """Load the leading stored blocks of ``block_hashes`` into ``block_ids`` (distinct).

        Returns ``(caches, n)``: n = number of leading blocks loaded (blocks ``block_ids[:n]``
        now hold them; the rest are untouched); caches = the scatter's result (the same list,
        written in place, by default).
        """
        ns = namespace or self.namespace
        block_hashes = _hash_list(block_hashes)
        ids = self._check(caches, block_ids, block_hashes, ns)
        validate.check_block_ids_values(int(caches[0].shape[0]), ids, distinct=True)
        if len(ids) == 0:
            return caches, 0
        rows = self.fetch(block_hashes, (len(caches), *caches[0].shape[1:]), caches[0].dtype,
                          namespace=ns)
        return self._scatter_rows(caches, ids.astype(np.int32), rows), len(rows)

    def onboard_request(self, prefix_cache, request_id, caches):
        """Engine glue, after ``prefix_cache.add_request`` and before the request's first step:
        load the request's next full blocks (past the device hit, never the last token) that
        the tiers hold. Returns ``(caches, n)``.

        Order matters: the blocks are fetched and verified first, then allocated and
        registered in the pool (``PrefixCache.onboard``) and scattered. A tier failing midway
        therefore shortens the hit, and so does a pool with fewer free blocks than the tiers
        hold (the leading ones that fit are loaded; none free: n = 0). A scatter
        (or an event subscriber) failing after the blocks were registered is rolled back
        before this returns: the new blocks are unregistered and freed and the request's
        computed tokens restored, then it is a miss (n = 0, ``onboard_errors`` + 1). So a
        registered block never lacks its KV. (KeyboardInterrupt and other BaseExceptions are
        rolled back the same way, then re-raised; so is an error raised before any block was
        allocated, such as a request whose computed tokens do not end at a block boundary.)

        The blocks are looked up where :meth:`offload_on_evict` files them: under
        ``namespace_for(salt)`` when it was given one (:attr:`namespace_for`), else this
        offloader's namespace with the request's salt. A ``namespace_for`` that raises is a
        miss, counted in ``onboard_errors`` (on eviction it is an offload error).
        """
        from ..pool import NoFreeBlocksError

        pc = prefix_cache
        bs = pc.block_size
        first = pc.num_computed(request_id) // bs
        cap = (len(pc.tokens(request_id)) - 1) // bs
        if cap <= first:
            return caches, 0
        try:
            ns = self._salted(pc.namespace(request_id))
        except Exception as e:  # noqa: BLE001 - the user's mapping: a miss, as on eviction
            self._failed("onboard", e)
            return caches, 0
        # what the pool can take (evicting cached blocks): no block past it is read
        hashes = pc.request_hashes(request_id)[first:min(cap, first + pc.pool.num_free)]
        if not hashes:
            return caches, 0
        try:
            rows = self.fetch(hashes, (len(caches), *caches[0].shape[1:]), caches[0].dtype,
                              namespace=ns)
        except Exception as e:  # noqa: BLE001 - a store that raises (a lone tier, not a
            # TieredStore, breaking the Tier contract): a miss; bad input is still raised
            if isinstance(e, (TypeError, ValueError)) and not isinstance(e, RecordError):
                raise
            self._failed("onboard", e)
            return caches, 0
        if not rows:
            return caches, 0
        held = len(pc.blocks(request_id))
        checked = pc._check_onboard(request_id, len(rows))  # a request onboard refuses: raised
        try:
            # onboard takes itself back when it raises (a hash_fn or "stored" subscriber)
            new = pc._onboard(*checked)
            out = self._scatter_rows(caches, np.asarray(new, dtype=np.int32), rows)
        except BaseException as e:
            self._undo_onboard(pc, request_id, held, first)
            if isinstance(e, NoFreeBlocksError):
                return caches, 0
            if not isinstance(e, Exception):
                raise
            self._failed("onboard", e)
            return caches, 0
        return out, len(rows)

    def _undo_onboard(self, pc, request_id, held: int, first: int) -> None:
        """Roll back a :meth:`PrefixCache.onboard` whose blocks were not filled: the request
        held ``held`` blocks before it, ``first`` full ones computed (then ``held == first``,
        which onboard checks). The blocks past them lose their hashes (``"removed"`` events)
        and go back to the pool, through PrefixCache's public calls (truncate, then the tokens
        appended again); nothing when it allocated nothing (it takes itself back)."""
        new = pc.blocks(request_id)[held:]
        if not new:
            return  # nothing was allocated (a full pool, bad input, an undone allocation)
        bs = pc.block_size
        tail = pc.tokens(request_id)[first * bs:]
        try:
            pc.pool.unregister(new)
        except Exception as e:  # noqa: BLE001 - a subscriber's; the pool has unregistered them
            self.last_error = e
        finally:
            pc.truncate(request_id, first * bs)
            pc.append_tokens(request_id, tail)

    # -- wiring to the device pool (paged/pool.py events) --------------------------------------
    def offload_on_evict(self, events, caches: Callable[[], list] | list,
                         namespace_for: Callable[[bytes], Namespace] | None = None):
        """Subscribe to a pool's EventBus: blocks the pool evicts are offloaded before their
        memory is reused (the pool publishes "evicted" with the KV still intact).

        caches: the cache list, or a callable returning the current one (functional caches).
        namespace_for: maps an event's salt namespace (bytes) to a tier Namespace; it becomes
        this offloader's :attr:`namespace_for`, so :meth:`onboard_request` looks the blocks
        up under the same namespaces (None: keep the current one, by default this
        offloader's namespace with that salt). Returns the unsubscribe function.

        A failing offload (a tier, the pinned allocator, ``gather``, ``caches()`` or
        ``namespace_for`` raising) is a miss: counted in ``offload_errors`` (and
        ``last_error``), never raised through the pool's allocation.
        """
        if namespace_for is not None:
            if not callable(namespace_for):
                raise TypeError(f"namespace_for: expected None or a callable (salt bytes) -> "
                                f"Namespace, got {type(namespace_for).__name__}")
            self.namespace_for = namespace_for

        def on_event(ev):
            if ev.kind != "evicted" or not ev.block_ids:
                return
            try:
                ns = self._salted(ev.namespace)
                cs = caches() if callable(caches) else caches
                self.offload(cs, np.asarray(ev.block_ids, dtype=np.int32),
                             list(ev.block_hashes), namespace=ns)
            except Exception as e:  # noqa: BLE001 - an offload is best effort
                self._failed("offload", e)

        return events.subscribe(on_event)
