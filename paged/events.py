"""KV cache events: what every cache tier publishes when a block hash enters or leaves it.

A tier (the device :class:`~prefixkv.paged.pool.BlockPool`, a host/disk/remote tier) owns an
:class:`EventBus`; subscribers (a :class:`~prefixkv.paged.router.Router`, an
:class:`EventLog`, a tier that offloads evicted blocks) get every :class:`KVEvent`
synchronously, in order, before the call that caused it returns. A subscriber that raises
does not stop the others: every subscriber gets the event, then the first exception propagates.

Kinds:

- ``"stored"``: ``block_hashes`` (a chain, ``parent_hash`` being the hash of the block before
  the first one, ``None`` at the start of a sequence) are now cached in the tier.
- ``"removed"``: the hashes were dropped on purpose (a registered block about to be
  overwritten in place, an explicit removal).
- ``"evicted"``: the hashes were dropped to make room. Published before the blocks are handed
  to their new owner, so a subscriber may still read their KV (``block_ids``) to offload it.
- ``"cleared"``: every hash of the tier is gone (all namespaces); ``block_hashes`` is empty.

Events are batched (one event per call and namespace, like vLLM's ``BlockStored`` /
``BlockRemoved``); ``num_tokens = len(block_hashes) * block_size``. The salt namespace travels
with every event, so a consumer can never mix two tenants' hashes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

STORED = "stored"
REMOVED = "removed"
EVICTED = "evicted"
CLEARED = "cleared"
KINDS = (STORED, REMOVED, EVICTED, CLEARED)


@dataclass(frozen=True, slots=True)
class KVEvent:
    """One change of a tier's hash index.

    kind: one of ``KINDS``.
    block_hashes: tuple of block hashes (32-byte digests for prefixkv-v1).
    parent_hash: for ``"stored"``, the hash of the block before ``block_hashes[0]`` (None at the
        start of a sequence); None for the other kinds.
    tier: the tier's name ("device" for the GPU/TPU pool, "host", "disk", ...).
    namespace: the salt namespace bytes (b"" = the shared namespace).
    num_tokens: tokens covered, ``len(block_hashes) * block_size``.
    block_ids: the tier-local block ids, parallel to ``block_hashes`` (debugging, offload).
    token_ids: for ``"stored"`` events of a :class:`~prefixkv.paged.PrefixCache`'s pool, the
        blocks' tokens (``num_tokens`` of them), as vLLM's ``BlockStored.token_ids``: a
        consumer keeping its own hashes (Dynamo's and llm-d's indexers hash tokens) computes
        them from these, within ``namespace``; () where the publisher does not know them.
    """

    kind: str
    block_hashes: tuple
    parent_hash: bytes | None
    tier: str
    namespace: bytes
    num_tokens: int
    block_ids: tuple = ()
    token_ids: tuple = ()

    def __post_init__(self) -> None:
        # what every consumer keys on, checked where the event is made: a str namespace or an
        # unknown kind had failed far from its publisher (an encoder's AttributeError, a
        # router that dropped it silently)
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.namespace, bytes):
            raise TypeError(f"namespace: expected bytes (prefixkv.paged.namespace_of(salt)), "
                            f"got {type(self.namespace).__name__}")
        if not isinstance(self.tier, str):
            raise TypeError(f"tier: expected a str, got {type(self.tier).__name__}")
        if isinstance(self.num_tokens, bool) or not isinstance(self.num_tokens, int) \
                or self.num_tokens < 0:
            raise ValueError(f"num_tokens: expected an int >= 0, got {self.num_tokens!r}")


Subscriber = Callable[[KVEvent], None]


def call_each(fn, items) -> None:
    """``fn(item)`` for every item even when one call raises; then re-raise the first
    exception (publishing: a failing subscriber never makes the others miss an event)."""
    error = None
    for item in items:
        try:
            fn(item)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            if error is None:
                error = e
    if error is not None:
        raise error


def unsubscribe_all(handles: list) -> None:
    """Call and forget each of ``handles`` (what :meth:`EventBus.subscribe` returned): a
    second call does nothing."""
    while handles:
        handles.pop()()


class EventBus:
    """Synchronous publish/subscribe of :class:`KVEvent`.

    ``bus.subscribe(fn)`` returns a function that unsubscribes. ``bool(bus)`` is False while
    nobody listens, so publishers skip building events (the fast path of the pool).
    """

    __slots__ = ("_subscribers",)

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        if not callable(fn):
            raise TypeError(f"fn: expected a callable taking a KVEvent, got {type(fn).__name__}")
        self._subscribers.append(fn)

        def unsubscribe() -> None:
            if fn in self._subscribers:
                self._subscribers.remove(fn)

        return unsubscribe

    def publish(self, event: KVEvent) -> None:
        """Call every subscriber with ``event``, in subscription order, even when one raises;
        then re-raise the first exception. A subscriber that fails never makes later ones (an
        :class:`EventLog`, a Router) miss the event and drift from the tier's state."""
        if not isinstance(event, KVEvent):
            raise TypeError(f"event: expected a KVEvent, got {type(event).__name__}")
        call_each(lambda fn: fn(event), tuple(self._subscribers))

    def __bool__(self) -> bool:
        return bool(self._subscribers)

    def __len__(self) -> int:
        return len(self._subscribers)


class EventLog:
    """A subscriber that keeps every event; :meth:`replay` rebuilds the tier's index from it.

    ``log = EventLog(); pool.events.subscribe(log)``; then ``log.replay()`` equals
    ``pool.cached_hashes()`` at any time (tested by the state-machine tests).
    """

    def __init__(self) -> None:
        self.events: list[KVEvent] = []

    def __call__(self, event: KVEvent) -> None:
        self.events.append(event)

    def __len__(self) -> int:
        return len(self.events)

    def clear(self) -> None:
        self.events.clear()

    def replay(self, tier: str | None = None) -> dict[bytes, dict[bytes, int]]:
        """``{namespace: {block_hash: block_id}}`` after applying every event (of ``tier``;
        see :func:`replay`)."""
        return replay(self.events, tier=tier)


def replay(events: Iterable[KVEvent], tier: str | None = None) -> dict[bytes, dict[bytes, int]]:
    """Apply events in order to an empty index: ``{namespace: {block_hash: block_id}}``.

    Namespaces left empty are dropped, so the result compares equal to
    :meth:`BlockPool.cached_hashes`. ``tier``: replay that tier's events only; needed when
    the events come from several tiers (a TieredStore's bus): one index cannot hold two tiers
    (a tier's "cleared" would wipe the others' blocks), so those raise a ValueError without it.
    """
    index: dict[bytes, dict[bytes, int]] = {}
    seen = None
    for ev in events:
        if tier is not None and ev.tier != tier:
            continue
        if tier is None and ev.tier != seen:
            if seen is not None:
                raise ValueError(f"tier: the events come from more than one tier ({seen!r} and "
                                 f"{ev.tier!r}); replay one at a time, replay(tier=...)")
            seen = ev.tier
        if ev.kind == CLEARED:
            index.clear()
            continue
        d = index.setdefault(ev.namespace, {})
        if ev.kind == STORED:
            ids = ev.block_ids or (-1,) * len(ev.block_hashes)
            for h, b in zip(ev.block_hashes, ids, strict=True):
                d[h] = b
        elif ev.kind in (REMOVED, EVICTED):
            for h in ev.block_hashes:
                d.pop(h, None)
        else:
            raise ValueError(f"event.kind: expected one of {KINDS}, got {ev.kind!r}")
        if not d:
            del index[ev.namespace]
    return index
