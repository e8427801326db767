"""Cache-aware routing across workers (llm-d / Dynamo KV-router style).

The :class:`Router` keeps a global index ``{namespace: {block_hash: bitmask of (worker, tier)}}``
built only from the KV events the workers publish (:mod:`prefixkv.paged.events`); it never
looks inside a pool. For a request it hashes the tokens the way the workers do (same
``hash_fn``, ``block_size`` and salt), walks the chain and returns, per worker, the number of
leading blocks cached there (in any of the counted tiers), then picks a worker.

Scoring (Dynamo KV router's cost, documented here so it can be tuned):

    num_blocks  = ceil(len(tokens) / block_size)          # blocks the request will occupy
    overlap_w   = leading blocks cached on worker w       # capped at (len(tokens)-1)//bs
    prefill_w   = num_blocks - overlap_w                  # blocks worker w has to compute
    cost_w      = overlap_weight * prefill_w + load_w     # load_w: worker's active blocks
    pick        = argmin cost_w; ties: larger overlap, then lower load, then first added

``overlap_weight`` > 1 favours cache hits (prefill-heavy traffic), < 1 favours balance
(decode-heavy). ``load_w`` is whatever the engine reports through :meth:`set_load` /
:meth:`add_load` (active KV blocks, like Dynamo; queued tokens also work, in the same unit
as blocks x overlap_weight).

Isolation: the namespace (salt) is part of every index key and of every event, so a request
under one salt never counts blocks stored under another, even with a hash that ignores salts.
A multimodal request passes its items (``mm_items=``, as ``PrefixCache.add_request``), so its
hashes are the ones its worker registers: without them, a prompt whose image differs from a
cached one's would count that image's blocks as overlap.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from . import validate
from ._locking import locked
from .events import CLEARED, EVICTED, REMOVED, STORED, EventBus, KVEvent
from .pool import namespace_of


def _finite(name: str, value) -> float:
    """A load (or its change) as a float: a finite real number, else an error naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return value


@dataclass(frozen=True)
class RouteDecision:
    """worker: the pick; overlaps: {worker: leading cached blocks}; costs: {worker: cost};
    num_blocks: blocks the request occupies."""

    worker: Hashable
    overlaps: dict
    costs: dict
    num_blocks: int


def _probe_hash_fn(hash_fn, block_size: int) -> None:
    """Call ``hash_fn`` once, as :meth:`Router.pick` will, on two blocks of token ids: one
    that cannot run (a compatibility mode whose package is missing, cbor2 or xxhash; another
    signature) fails here, naming hash_fn, not at the first request mid-serving."""
    toks = np.arange(2 * block_size, dtype=np.int32)
    try:
        list(hash_fn(toks, block_size, salt=None, parent=None))
    except Exception as e:  # noqa: BLE001 - re-raised with the argument named
        raise ValueError(f"hash_fn: calling it as hash_fn(tokens_i32, block_size, salt=None, "
                         f"parent=None) failed ({type(e).__name__}: {e})") from e


class Router:
    """Global prefix index over several workers' KV events and a hit-vs-load scorer.

    block_size: the workers' block size.
    hash_fn: the workers' hash function (prefixkv-v1 ``hash_blocks`` by default), called as
        ``hash_fn(tokens_i32, block_size, salt=salt, parent=None) -> list[bytes]``, plus
        ``mm_items=`` for a request with multimodal items (refused, naming mm_items, when it
        cannot take them). It must be a prefix chain (each block's hash depends on the blocks
        before it, as the workers' PrefixCache checks), or leading overlaps count blocks of
        other prefixes.
    overlap_weight: weight of the blocks to prefill against the load (see module docstring).
    tiers: tier names whose events count ("device" only by default; add "host" etc. when a
        worker can onboard from them cheaply).

    Threads: each call holds the router's lock (reentrant), so events applied from a
    subscriber's thread and picks from request threads may run at once (two threads applying
    events raised KeyError from inside the index); ``pick`` hashes the prompt outside it.
    """

    def __init__(self, block_size: int, *, hash_fn: Callable | None = None,
                 overlap_weight: float = 1.0, tiers: Sequence[str] = ("device",)) -> None:
        block_size = validate.check_int("block_size", block_size, 1)
        if (isinstance(overlap_weight, bool)
                or not isinstance(overlap_weight, (int, float, np.integer, np.floating))):
            raise TypeError(f"overlap_weight: expected a number, got "
                            f"{type(overlap_weight).__name__}")
        if not overlap_weight >= 0:  # NaN too
            raise ValueError(f"overlap_weight: expected >= 0, got {overlap_weight}")
        if isinstance(tiers, (str, bytes)):  # not its characters
            raise TypeError(f"tiers: expected a sequence of tier names, got the string "
                            f"{tiers!r}; pass ({tiers!r},)")
        tiers = tuple(tiers)
        if not tiers:
            raise ValueError("tiers: expected at least one tier name")
        if hash_fn is None:
            from .prefix_cache import default_hash_fn as hash_fn
        else:
            _probe_hash_fn(hash_fn, block_size)
        self.block_size = block_size
        self.hash_fn = hash_fn
        self.overlap_weight = float(overlap_weight)
        self.tiers = tiers
        self._tier_slot = {t: i for i, t in enumerate(self.tiers)}
        self._index: dict[bytes, dict[bytes, int]] = {}
        # {bit: {namespace: hashes}}: what each (worker, tier) bit is set on in the index, so
        # clearing a worker's tier walks its own blocks, not the whole index
        self._held: dict[int, dict[bytes, set[bytes]]] = {}
        self._workers: dict[Hashable, int] = {}  # worker -> slot
        self._slot_worker: dict[int, Hashable] = {}
        self._unsubscribe: dict[Hashable, Callable[[], None]] = {}
        self._registrations: dict[Hashable, object] = {}  # worker -> its add_worker's token
        self._loads: dict[Hashable, float] = {}
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ workers
    @property
    @locked
    def workers(self) -> list:
        return list(self._workers)

    @locked
    def add_worker(self, worker_id: Hashable, events: EventBus | None = None
                   ) -> Callable[[KVEvent], None]:
        """Register a worker; subscribe to its ``events`` bus when given. Returns the callable
        that applies one of its events (to feed events that arrive by other means); once the
        worker is removed it drops them (an event still in flight on the bus's thread)."""
        if worker_id in self._workers:
            raise ValueError(f"worker_id: {worker_id!r} is already added")
        if events is not None and not callable(getattr(events, "subscribe", None)):
            raise TypeError(f"events: expected an EventBus (with subscribe) or None, got "
                            f"{type(events).__name__}")
        slot = self._free_slots.pop() if self._free_slots else self._next_slot
        if slot == self._next_slot:
            self._next_slot += 1
        self._workers[worker_id] = slot
        self._slot_worker[slot] = worker_id
        self._loads[worker_id] = 0.0
        token = self._registrations[worker_id] = object()

        def apply(event: KVEvent) -> None:
            with self._lock:
                # this registration's events only: the bus may still deliver one after
                # remove_worker (it publishes to a copy of its subscribers, on another
                # thread), which raised KeyError into the tier's call, or, the id added
                # again, reached the new registration
                if self._registrations.get(worker_id) is token:
                    self.apply(worker_id, event)

        if events is not None:
            try:
                self._unsubscribe[worker_id] = events.subscribe(apply)
            except BaseException:
                self.remove_worker(worker_id)  # not half added
                raise
        return apply

    @locked
    def remove_worker(self, worker_id: Hashable) -> None:
        """Forget a worker and every block it reported."""
        if worker_id not in self._workers:
            raise KeyError(f"worker_id: unknown worker {worker_id!r}; known: {self.workers}")
        slot = self._workers.pop(worker_id)
        del self._registrations[worker_id]
        del self._slot_worker[slot]
        self._loads.pop(worker_id, None)
        unsub = self._unsubscribe.pop(worker_id, None)
        if unsub is not None:
            unsub()
        t = len(self.tiers)
        for pos in range(slot * t, slot * t + t):
            self._clear_bit(pos)
        self._free_slots.append(slot)

    @locked
    def set_load(self, worker_id: Hashable, load: float) -> None:
        self._check_worker(worker_id)
        self._loads[worker_id] = _finite("load", load)

    @locked
    def add_load(self, worker_id: Hashable, delta: float) -> None:
        self._check_worker(worker_id)
        total = self._loads[worker_id] + _finite("delta", delta)
        if not math.isfinite(total):
            raise ValueError(f"delta: {delta} takes {worker_id!r}'s load past a finite value")
        self._loads[worker_id] = total

    @locked
    def load(self, worker_id: Hashable) -> float:
        self._check_worker(worker_id)
        return self._loads[worker_id]

    def _check_worker(self, worker_id) -> None:
        if worker_id not in self._workers:
            raise KeyError(f"worker_id: unknown worker {worker_id!r}; known: {self.workers}")

    def _clear_bit(self, pos: int) -> None:
        """Clear bit ``pos`` (one worker's tier) on every hash it is set on: O(those hashes)."""
        held = self._held.pop(pos, None)
        if not held:
            return
        keep = ~(1 << pos)
        index = self._index
        for ns, hashes in held.items():
            d = index[ns]
            for h in hashes:
                m = d[h] & keep
                if m:
                    d[h] = m
                else:
                    del d[h]
            if not d:
                del index[ns]

    # ------------------------------------------------------------------ events
    def apply(self, worker_id: Hashable, event: KVEvent) -> None:
        """Apply one KV event of ``worker_id`` to the global index."""
        if not isinstance(event, KVEvent):
            raise TypeError(f"event: expected a KVEvent, got {type(event).__name__}")
        with self._lock:  # inline, not @locked: the hot path of an event stream
            slot = self._workers.get(worker_id)
            if slot is None:
                raise KeyError(f"worker_id: unknown worker {worker_id!r}; known: {self.workers}")
            t = self._tier_slot.get(event.tier)
            if t is None:
                return
            pos = slot * len(self.tiers) + t
            bit = 1 << pos
            kind = event.kind
            ns = event.namespace
            if kind == STORED:
                if not event.block_hashes:
                    return
                d = self._index.get(ns)
                if d is None:
                    d = self._index[ns] = {}
                get = d.get
                for h in event.block_hashes:
                    d[h] = get(h, 0) | bit
                held = self._held.get(pos)
                if held is None:
                    held = self._held[pos] = {}
                hs = held.get(ns)
                if hs is None:
                    held[ns] = set(event.block_hashes)
                else:
                    hs.update(event.block_hashes)
            elif kind in (REMOVED, EVICTED):
                held = self._held.get(pos)
                hs = None if held is None else held.get(ns)
                if not hs:
                    return  # none of its hashes is set for this worker's tier
                d = self._index[ns]
                keep = ~bit
                for h in event.block_hashes:
                    if h in hs:
                        hs.remove(h)
                        m = d[h] & keep
                        if m:
                            d[h] = m
                        else:
                            del d[h]
                if not hs:
                    del held[ns]
                    if not held:
                        del self._held[pos]
                if not d:
                    del self._index[ns]
            elif kind == CLEARED:
                self._clear_bit(pos)
            else:
                raise ValueError(f"event.kind: expected stored/removed/evicted/cleared, got "
                                 f"{kind!r}")

    # ------------------------------------------------------------------ queries
    def request_hashes(self, tokens, salt=None, *, mm_items=None) -> list[bytes]:
        """Hashes of the blocks a worker could hit: full blocks, never the last token.
        mm_items: the prompt's multimodal items, as ``PrefixCache.add_request``."""
        from .prefix_cache import _token_array

        # ints in [0, 2**31), never silently truncated floats
        return self._request_hashes(_token_array(tokens), salt, mm_items)

    def _request_hashes(self, toks: np.ndarray, salt, mm_items=None) -> list[bytes]:
        mm = None
        if mm_items is not None:  # checked against the whole prompt, even with cap == 0
            from .hashing import request_mm_items

            mm = request_mm_items(mm_items, len(toks), self.hash_fn, self.block_size)
        cap = max(len(toks) - 1, 0) // self.block_size
        if cap == 0:
            return []
        if not mm:
            return list(self.hash_fn(toks[:cap * self.block_size], self.block_size, salt=salt,
                                     parent=None))
        return list(self.hash_fn(toks[:cap * self.block_size], self.block_size, salt=salt,
                                 parent=None, mm_items=mm))

    @locked
    def overlaps_for_hashes(self, block_hashes: Sequence[bytes], namespace: bytes = b""
                            ) -> dict:
        """{worker: number of leading ``block_hashes`` cached on it} in ``namespace``."""
        out = dict.fromkeys(self._workers, 0)
        d = self._index.get(namespace)
        if not d or not block_hashes:
            return out
        t = len(self.tiers)
        rep = 0
        for slot in self._workers.values():
            rep |= 1 << (slot * t)
        alive = rep
        stop = {}
        for i, h in enumerate(block_hashes):
            m = d.get(h, 0)
            if t > 1:
                pres = 0
                for k in range(t):
                    pres |= (m >> k) & rep
                m = pres
            lost = alive & ~m
            if lost:
                stop[lost] = i
                alive &= m
                if not alive:
                    break
        if alive:
            stop[alive] = len(block_hashes)
        # every worker's bit is in exactly one mask: read each mask's bits, O(workers)
        slot_worker = self._slot_worker
        for mask, n in stop.items():
            while mask:
                low = mask & -mask
                out[slot_worker[(low.bit_length() - 1) // t]] = n
                mask ^= low
        return out

    def overlaps(self, tokens, salt=None, *, mm_items=None) -> dict:
        """{worker: leading blocks of ``tokens`` (with ``mm_items``) cached on it under
        ``salt``}."""
        return self.overlaps_for_hashes(self.request_hashes(tokens, salt, mm_items=mm_items),
                                        namespace_of(salt))

    def pick(self, tokens, salt=None, *, mm_items=None) -> RouteDecision:
        """Choose a worker for a request (see the module docstring for the cost); pass the
        prompt's ``mm_items`` as to the worker's ``PrefixCache.add_request``."""
        if not self._workers:
            raise ValueError("Router: no workers added")
        from .prefix_cache import _token_array

        toks = _token_array(tokens)  # converted once (a list was converted twice)
        num_blocks = -(-len(toks) // self.block_size)
        hashes = self._request_hashes(toks, salt, mm_items)  # outside the lock
        with self._lock:
            if not self._workers:
                raise ValueError("Router: no workers added")
            overlaps = self.overlaps_for_hashes(hashes, namespace_of(salt))
            loads = dict(self._loads)
            order = {w: i for i, w in enumerate(self._workers)}
        costs = {w: self.overlap_weight * (num_blocks - o) + loads[w]
                 for w, o in overlaps.items()}
        best = min(costs, key=lambda w: (costs[w], -overlaps[w], loads[w], order[w]))
        return RouteDecision(best, overlaps, costs, num_blocks)

    @locked
    def cached_hashes(self, worker_id: Hashable, tier: str = "device") -> dict:
        """{namespace: set of hashes} the router believes ``worker_id`` holds in ``tier``."""
        self._check_worker(worker_id)
        if tier not in self._tier_slot:
            raise KeyError(f"tier: {tier!r} is not one of the router's tiers {self.tiers}")
        pos = self._workers[worker_id] * len(self.tiers) + self._tier_slot[tier]
        return {ns: set(hs) for ns, hs in self._held.get(pos, {}).items() if hs}
