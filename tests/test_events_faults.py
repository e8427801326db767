"""EventBus under faults: a subscriber that raises does not stop the later ones.

Every subscriber gets the event, in subscription order; then the first exception reaches the
publisher. An EventLog or Router subscribed after a failing subscriber stays in step with the
tier."""

import pytest
from prefixkv.paged.events import EVICTED, STORED, EventBus, EventLog, KVEvent
from prefixkv.paged.pool import BlockPool


def h(i: int) -> bytes:
    return i.to_bytes(32, "little")


class Boom(RuntimeError):
    pass


def _event(kind=STORED, n=1):
    return KVEvent(kind, tuple(h(i) for i in range(n)), None, "device", b"", 4 * n,
                   tuple(range(1, n + 1)))


def test_later_subscribers_get_the_event_when_the_first_raises():
    bus = EventBus()
    seen = []

    def first(ev):
        seen.append(("first", ev))
        raise Boom("first subscriber failed")

    bus.subscribe(first)
    bus.subscribe(lambda ev: seen.append(("second", ev)))
    ev = _event()
    with pytest.raises(Boom, match="first subscriber failed"):
        bus.publish(ev)
    assert seen == [("first", ev), ("second", ev)]


def test_the_first_exception_is_raised_when_several_subscribers_raise():
    bus = EventBus()
    seen = []

    def failing(name, exc):
        def sub(ev):
            seen.append(name)
            raise exc(name)
        return sub

    bus.subscribe(failing("a", Boom))
    bus.subscribe(failing("b", ValueError))
    bus.subscribe(lambda ev: seen.append("c"))
    with pytest.raises(Boom, match="^a$"):
        bus.publish(_event())
    assert seen == ["a", "b", "c"]


def test_no_exception_when_no_subscriber_raises():
    bus = EventBus()
    log1, log2 = EventLog(), EventLog()
    bus.subscribe(log1)
    bus.subscribe(log2)
    ev = _event(n=2)
    bus.publish(ev)
    assert log1.events == [ev] and log2.events == [ev]


def test_pool_event_log_after_a_failing_subscriber_replays_the_pool():
    """A raising subscriber ahead of an EventLog: the log still sees every stored/evicted
    event, so its replay equals the pool's index after each (failed) call."""
    pool = BlockPool(5, 4)
    pool.events.subscribe(_boom_on(STORED, EVICTED))
    log = EventLog()
    pool.events.subscribe(log)
    got = pool.allocate(4)
    with pytest.raises(Boom):
        pool.register(got, [h(10 + i) for i in range(4)], b"")
    assert log.replay() == pool.cached_hashes() == {b"": {h(10 + i): b for i, b in
                                                        enumerate(got)}}
    pool.free(got)
    with pytest.raises(Boom):
        pool.allocate(2)  # evicts two cached blocks
    pool.check_consistency()
    assert [e.kind for e in log.events] == [STORED, EVICTED]
    assert log.replay() == pool.cached_hashes()
    assert len(pool.cached_hashes()[b""]) == 2


def _boom_on(*kinds):
    def sub(ev):
        if ev.kind in kinds:
            raise Boom(f"subscriber failed on {ev.kind}")
    return sub


def test_a_subscriber_unsubscribing_itself_does_not_hide_the_event_from_the_next():
    bus = EventBus()
    got = []

    def once(ev):
        unsubscribe()

    unsubscribe = bus.subscribe(once)
    bus.subscribe(got.append)
    bus.publish(KVEvent(STORED, (b"\x01" * 32,), None, "device", b"", 4))
    assert len(got) == 1


def test_events_are_checked_where_they_are_made_and_published():
    """A str namespace, an unknown kind or a negative token count failed far from the
    publisher (the vLLM encoder's AttributeError "'str' object has no attribute 'decode'"), and
    EventBus.publish / Router.apply took any object (Router.apply(w, 5): AttributeError)."""
    from prefixkv.paged import EventBus, KVEvent, Router

    h = (b"h" * 32,)
    for args, error, match in [
            (("moved", h, None, "device", b"", 4), ValueError, "^kind: expected one of"),
            (("stored", h, None, "device", "ns", 4), TypeError, "^namespace: expected bytes"),
            (("stored", h, None, 7, b"", 4), TypeError, "^tier: expected a str"),
            (("stored", h, None, "device", b"", -4), ValueError, "^num_tokens: expected an int"),
            (("stored", h, None, "device", b"", 4.0), ValueError, "^num_tokens: expected an"),
            (("stored", h, None, "device", b"", True), ValueError, "^num_tokens: expected")]:
        with pytest.raises(error, match=match):
            KVEvent(*args)
    bus, seen = EventBus(), []
    bus.subscribe(seen.append)
    with pytest.raises(TypeError, match="^event: expected a KVEvent, got int"):
        bus.publish(5)
    router = Router(4)
    router.add_worker("w")
    with pytest.raises(TypeError, match="^event: expected a KVEvent, got dict"):
        router.apply("w", {"kind": "stored"})
    bus.publish(KVEvent("stored", h, None, "device", b"", 4))
    assert len(seen) == 1
