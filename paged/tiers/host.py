"""Host-memory tier ("G2"): blocks as numpy arrays, LRU with a byte budget.

Values are copied into memory from ``allocator(shape, dtype) -> np.ndarray`` (default
``np.empty``). A frontend running on a GPU passes an allocator that returns pinned memory
(``prefixkv.torch_frontend.pinned_host_allocator``) so host <-> device copies can run
asynchronously. :meth:`HostTier.reserve` hands the arrays of the blocks it evicts (when shape
and dtype match and no caller can still see their memory) to the new blocks, so a full tier
allocates (and page-faults) nothing in steady state. Arrays over a torch tensor's memory
(``torch.empty(s, dtype=..., pin_memory=True).numpy()``) work too but are never reused: a
stored block is read-only, and numpy cannot make such an array writable again.

When an evicted array may be reused: numpy hangs every view of an array on the array's memory
owner (it collapses view chains), so a row that :meth:`HostTier.batch_get` returned references
the owner, not necessarily the stored array. An evicted array is reused only when its owner is
referenced by nothing but the array (or is the array itself, referenced by nothing else). That
holds for ``np.empty`` arrays and for allocators that give each block a private buffer (such as
``prefixkv.torch_frontend.pinned_host_allocator``). An allocator that hands out rows of one
shared slab gets no reuse (the slab is referenced by every row, so a caller's view of an
evicted row cannot be told apart): evicted rows are dropped and the allocator is called again.

No checksum here: the tier holds the arrays themselves (no serialisation), and each entry keeps
its full key, shape and dtype, re-checked on every get.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np

from ..spec import numpy_dtype
from ..validate import check_int
from .base import (
    BlockKey,
    Tier,
    check_dtype,
    check_get_layout,
    check_keys,
    check_put_values,
    check_shape,
    dtype_str,
    first_occurrences,
)

Allocator = Callable[[tuple, np.dtype], np.ndarray]


def _default_allocator(shape: tuple, dtype: np.dtype) -> np.ndarray:
    return np.empty(shape, dtype=dtype)


def _refcount(x) -> int:
    return sys.getrefcount(x)


def _refs_of_one_local() -> int:
    x = np.empty(0)
    return _refcount(x)


#: What :func:`_refcount` answers for an object one local name holds (measured: interpreters
#: differ in the references a call adds).
_ONE_LOCAL = _refs_of_one_local()


def _memory_owner(arr: np.ndarray):
    """The object numpy makes the base of every new view of ``arr`` (numpy walks the base
    chain past arrays of the same type that do not own their data)."""
    obj = arr
    while not obj.flags.owndata:
        base = obj.base
        if base is None or type(base) is not type(arr):
            break
        obj = base
    return obj


def _writable_again(arr: np.ndarray) -> bool:
    """Make ``arr`` (a stored block's array, read-only while stored) writable for its next
    block; False when numpy refuses: an array over memory it did not allocate and cannot
    write through, such as a torch tensor's (``torch.empty(..., pin_memory=True).numpy()``),
    once it was made read-only. Such an evicted array is dropped, not reused."""
    if arr.flags.writeable:
        return True
    try:
        arr.flags.writeable = True
    except ValueError:
        return False
    return True


def _described(arr) -> str:
    if isinstance(arr, np.ndarray):
        return f"{arr.dtype} {arr.shape}" + ("" if arr.flags.c_contiguous else
                                            " (not C-contiguous)")
    return type(arr).__name__


class _Entry:
    __slots__ = ("key", "array", "nbytes")

    def __init__(self, key: BlockKey, array: np.ndarray):
        self.key = key
        self.array = array
        self.nbytes = int(array.nbytes)


class HostTier(Tier):
    """In-process LRU block store bounded by ``budget_bytes``.

    budget_bytes: total bytes of stored blocks; a put evicts least-recently-used blocks until
    the new one fits; a block larger than the whole budget is refused (``False``).
    allocator: ``(shape, numpy dtype) -> C-contiguous np.ndarray`` for new block storage.

    Arrays returned by :meth:`batch_get` are read-only views of the stored blocks; an evicted
    block's memory is only reused when nothing outside the tier still references it.
    """

    name = "host"

    def __init__(self, budget_bytes: int, *, allocator: Allocator | None = None):
        super().__init__()
        self.budget_bytes = check_int("budget_bytes", budget_bytes, 1, " (a byte count)")
        if allocator is not None and not callable(allocator):
            raise TypeError(f"allocator: expected None or a callable (shape, numpy dtype) -> "
                            f"np.ndarray, got {type(allocator).__name__}")
        self.allocator = allocator or _default_allocator
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.used_bytes = 0
        self._evicted: list[BlockKey] = []

    def _flush_evicted(self) -> None:
        if self._evicted:
            evicted, self._evicted = self._evicted, []
            self._publish("evicted", evicted)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: BlockKey) -> bool:
        e = self._entries.get(key.storage_key())
        return e is not None and e.key == key

    def _lookup(self, key: BlockKey) -> _Entry | None:
        e = self._entries.get(key.storage_key())
        if e is None or e.key != key:  # key equality covers hash + full namespace
            return None
        return e

    def touch(self, keys: Sequence[BlockKey], shape=None) -> list[bool]:
        """Per key whether this tier holds it (of ``shape`` when given); the held ones become
        the most recently used. A block offloaded again (onboarded, then evicted from the
        device once more) needs no copy and evicts nothing."""
        shape = check_shape("shape", shape, optional=True)
        out = []
        for k in check_keys(keys):
            e = self._lookup(k)
            held = e is not None and (shape is None or e.array.shape == shape)
            if held:
                self._entries.move_to_end(k.storage_key())
            out.append(held)
        return out

    def batch_exists(self, keys: Sequence[BlockKey]) -> int:
        keys = check_keys(keys)
        n = 0
        for k in keys:
            if self._lookup(k) is None:
                break
            n += 1
        return n

    def batch_get(self, keys, *, shape=None, dtype=None):
        want_shape, want_dtype = check_get_layout(shape, dtype)
        out: list[np.ndarray | None] = []
        for k in check_keys(keys):
            e = self._lookup(k)
            if e is None:
                self.stats.misses += 1
                out.append(None)
                continue
            arr = e.array
            if ((want_shape is not None and arr.shape != want_shape)
                    or (want_dtype is not None and dtype_str(arr) != want_dtype)
                    or dtype_str(arr) != k.namespace.dtype):
                self.stats.corrupt += 1  # and a miss, as the other tiers count it
                self.stats.misses += 1
                out.append(None)
                continue
            self._entries.move_to_end(k.storage_key())
            self.stats.hits += 1
            self.stats.bytes_read += e.nbytes
            view = arr.view()
            view.flags.writeable = False
            out.append(view)
        return out

    # -- memory ------------------------------------------------------------------------------
    def _pop_lru(self, protect: frozenset | set) -> np.ndarray | None:
        """Evict the least recently used entry not in ``protect``; its array (dropped unless
        the caller keeps it), or None when every entry is protected.

        ``protect`` names only entries the tier holds (a batch_put's own blocks; reserve drops
        the others from its argument), so as many protected names as entries means every entry
        is protected: answered without a scan. A batch over the budget then refuses each
        further block in O(1) instead of scanning the whole tier for it."""
        if len(protect) >= len(self._entries):
            return None
        sk = next(k for k in self._entries if k not in protect)
        e = self._entries.pop(sk)
        self.used_bytes -= e.nbytes
        self.stats.evictions += 1
        self._evicted.append(e.key)
        arr, e.array = e.array, None
        return arr

    def _make_room(self, nbytes: int, protect: set[str]) -> bool:
        """Evict LRU entries (not in ``protect``) until ``nbytes`` more fit the budget."""
        while self.used_bytes + nbytes > self.budget_bytes:
            if self._pop_lru(protect) is None:
                return False
        return True

    def reserve(self, n: int, shape, dtype, *, protect: frozenset | set = frozenset()
                ) -> list[np.ndarray]:
        """Writable C-contiguous storage for up to ``n`` blocks of ``shape``/``dtype``, room made
        for them in the budget (evicting LRU blocks, whose unreferenced arrays are reused: no
        allocation or page faults when the tier is full). Fewer than ``n`` when the budget
        holds fewer. Fill them and hand them over with ``batch_put(..., copy=False)`` before
        any other call on this tier.

        TypeError / ValueError naming ``n``, ``shape`` or ``dtype`` for a bad one (a negative
        ``n`` was an empty list)."""
        n = check_int("n", n, 0)
        shape = check_shape("shape", shape)
        dt = check_dtype("dtype", dtype)
        try:
            numpy_dtype(dt)
        except TypeError:
            raise TypeError(f"dtype: expected a dtype, got {dtype!r}") from None
        if protect:  # only the names of held entries protect anything (see _pop_lru)
            protect = {sk for sk in protect if sk in self._entries}
        return self._reserve(n, shape, dtype, protect)

    def _reserve(self, n: int, shape, dtype, protect: frozenset | set) -> list[np.ndarray]:
        """:meth:`reserve` with ``protect`` naming held entries only (batch_put's own set)."""
        shape = tuple(int(s) for s in shape)
        dt = numpy_dtype(dtype_str(dtype))
        nb = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        n = min(int(n), self.budget_bytes // max(nb, 1))
        out: list[np.ndarray] = []
        need = n * nb  # reused and new arrays alike: the budget must hold all n once put
        while self.used_bytes + need > self.budget_bytes:
            arr = self._pop_lru(protect)
            if arr is None:
                break
            # Reuse only memory no caller can see: `arr` is held by this local alone and its
            # memory owner (what views of it reference) is `arr` or held by `arr` alone. (Its
            # count is taken before `owner` names it: with `owner is arr` that second name
            # made every array numpy owns look shared, so none was ever reused.)
            if (len(out) < n and arr.shape == shape and arr.dtype == dt
                    and _refcount(arr) <= _ONE_LOCAL):
                owner = _memory_owner(arr)
                if ((owner is arr or (arr.base is owner and _refcount(owner) <= _ONE_LOCAL + 1))
                        and _writable_again(arr)):
                    out.append(arr)
                del owner
            del arr
        room = (self.budget_bytes - self.used_bytes) // max(nb, 1)
        n = max(0, min(n, room))
        del out[n:]
        while len(out) < n:
            arr = self.allocator(shape, dt)
            if (not isinstance(arr, np.ndarray) or arr.shape != shape or arr.dtype != dt
                    or not arr.flags.c_contiguous):
                raise ValueError(f"allocator: expected a C-contiguous {dt} array of shape "
                                 f"{shape}, got {_described(arr)}")
            if not _writable_again(arr):
                raise ValueError("allocator: returned a read-only array (numpy cannot make "
                                 "it writable)")
            out.append(arr)
        self._flush_evicted()
        return out

    def allocate(self, shape, dtype) -> np.ndarray:
        """Storage for one block (see :meth:`reserve`)."""
        got = self.reserve(1, shape, dtype)
        if not got:
            raise ValueError(f"shape: a block of {shape} {dtype_str(dtype)} exceeds "
                             f"budget_bytes={self.budget_bytes}")
        return got[0]

    def batch_put(self, keys, values, *, copy: bool = True):
        """copy=False: adopt ``values`` as the stored arrays (C-contiguous arrays owning their
        memory, e.g. from :meth:`reserve`: the budget counts ``value.nbytes``, so a row view of
        a bigger buffer would keep the whole buffer alive uncounted); the caller must not
        write them afterwards.

        Every value's dtype is checked against its key's namespace before anything is stored
        (a bad batch stores nothing). A key repeated in the batch is stored once; each of its
        positions reports that result. Events ("evicted", "stored") go out even when the
        allocator raises part-way."""
        keys, values = check_put_values(keys, values)
        results = [False] * len(values)
        stored: list[BlockKey] = []
        protect: set[str] = set()
        firsts, repeats = first_occurrences(keys)
        try:
            for i in firsts:
                k = keys[i]
                results[i] = self._put_one(k, k.storage_key(), values[i], copy, protect, stored)
        finally:
            for i, j in repeats:
                results[i] = results[j]
            self._flush_evicted()
            self._publish("stored", stored)
        return results

    def _put_one(self, k: BlockKey, sk: str, v: np.ndarray, copy: bool, protect: set[str],
                 stored: list[BlockKey]) -> bool:
        if self.touch([k], v.shape)[0]:
            # Already stored: same key means same content (content-addressed); LRU refreshed.
            protect.add(sk)
            return True
        if sk in self._entries:  # stale entry under the same name: replace
            e = self._entries.pop(sk)
            self.used_bytes -= e.nbytes
            self._publish("removed", [e.key])
        nbytes = int(v.nbytes)
        if copy or not v.flags.c_contiguous:
            # room made by reserve, which reuses an evicted array of this shape
            got = self._reserve(1, v.shape, v.dtype, protect)
            if not got:
                self.stats.rejected += 1
                return False
            dst = got[0]
            np.copyto(dst, v, casting="no")
        else:
            if nbytes > self.budget_bytes or not self._make_room(nbytes, protect):
                self.stats.rejected += 1
                return False
            dst = v
        dst.flags.writeable = False
        self._entries[sk] = _Entry(k, dst)
        self.used_bytes += nbytes
        protect.add(sk)
        self.stats.puts += 1
        self.stats.bytes_written += nbytes
        stored.append(k)
        return True

    def batch_remove(self, keys):
        removed = []
        for k in check_keys(keys):
            if self._lookup(k) is not None:
                e = self._entries.pop(k.storage_key())
                self.used_bytes -= e.nbytes
                removed.append(k)
        self._publish("removed", removed)
        return len(removed)

    def clear(self):
        self._publish_cleared()
        self._entries.clear()
        self.used_bytes = 0
