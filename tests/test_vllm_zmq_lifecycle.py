"""VllmEventPublisher's lifecycle (prefixkv.paged.vllm_zmq): one dropped without close() is
collected, its replay thread stopped and its ports unbound; ``with`` closes it; closed, it
buffers nothing and refuses to publish; a send that fails keeps the batch and its number."""

import gc
import threading
import time
import weakref

import pytest
from prefixkv.paged import EventBus, PrefixCache, Router

zmq = pytest.importorskip("zmq")
pytest.importorskip("msgpack")

from prefixkv.paged.events import KVEvent  # noqa: E402
from prefixkv.paged.vllm_zmq import VllmEventPublisher, VllmEventSubscriber  # noqa: E402

BS = 4
ANY = "tcp://127.0.0.1:*"  # a port of the system's choosing (LAST_ENDPOINT tells which)


def _eps(pub) -> list[str]:
    return [s.getsockopt(zmq.LAST_ENDPOINT).decode()
            for s in (pub._pub, pub._replay) if s is not None]


def _stored(h):
    return KVEvent("stored", (h,), None, "device", b"", BS, token_ids=(1, 2, 3, 4))


def _bindable(endpoints, seconds=5.0) -> None:
    """Bind every endpoint again (closed sockets unbind asynchronously: retried a while)."""
    deadline = time.monotonic() + seconds
    for ep in endpoints:
        while True:
            s = zmq.Context.instance().socket(zmq.PUB)
            try:
                s.bind(ep)
                break
            except zmq.ZMQError:
                assert time.monotonic() < deadline, f"{ep} is still bound"
                time.sleep(0.02)
            finally:
                s.close(linger=0)


def _no_leak(ref, thread, endpoints) -> None:
    gc.collect()
    assert ref() is None, "the publisher outlived its last reference"
    thread.join(2.0)
    assert not thread.is_alive(), "its replay thread still runs"
    _bindable(endpoints)


def test_a_dropped_publisher_stops_its_thread_and_unbinds_its_ports():
    threads = threading.active_count()
    pub = VllmEventPublisher(BS, ANY, replay_endpoint=ANY)
    eps, thread, ref = _eps(pub), pub._thread, weakref.ref(pub)
    assert thread.is_alive() and threading.active_count() == threads + 1
    pub(_stored(b"\1" * 32))
    pub.publish()
    del pub
    _no_leak(ref, thread, eps)
    assert threading.active_count() == threads


def test_a_dropped_publisher_subscribed_through_events_leaves_the_bus():
    bus = EventBus()
    pub = VllmEventPublisher(BS, ANY, replay_endpoint=ANY, events=bus, int_hashes=False)
    bus.publish(_stored(b"\1" * 32))
    assert len(pub.encoder._pending) == 1 and len(bus) == 1
    eps, thread, ref = _eps(pub), pub._thread, weakref.ref(pub)
    del pub
    _no_leak(ref, thread, eps)
    assert len(bus) == 0


def test_with_closes_and_close_is_idempotent():
    with VllmEventPublisher(BS, ANY, replay_endpoint=ANY) as pub:
        assert not pub._stop.is_set()
        eps, thread = _eps(pub), pub._thread
    assert pub.closed and not thread.is_alive()
    _bindable(eps)
    pub.close()
    assert pub.closed
    pubs = []
    # closed on the way out of an error too
    with pytest.raises(KeyError), VllmEventPublisher(BS, ANY, replay_thread=False) as pub:
        pubs.append(pub)
        raise KeyError("an engine step failed")
    assert pubs[0].closed


def test_events_after_close_are_dropped():
    pc = PrefixCache(num_blocks=64, block_size=BS)
    pub = VllmEventPublisher(BS, ANY)
    pc.events.subscribe(pub)  # subscribed by hand: the bus keeps calling it
    pub.close()
    for i in range(50):
        pc.add_request(i, list(range(i, i + 9)))
        pc.step([(i, 9)])
        pc.free(i)
    assert pub.encoder._pending == []


def test_close_leaves_the_bus_given_as_events():
    pc = PrefixCache(num_blocks=64, block_size=BS)
    with VllmEventPublisher(BS, ANY, events=pc.events) as pub:
        assert len(pc.events) == 1
        pc.add_request("a", list(range(9)))
        pc.step([("a", 9)])
        assert pub.publish() == 0
    assert len(pc.events) == 0
    pc.free("a")  # an event nobody listens to
    assert pub.encoder._pending == []
    with pytest.raises(TypeError, match="events: expected an EventBus"):
        VllmEventPublisher(BS, ANY, events=object())


@pytest.mark.parametrize("replay_thread", [True, False])
def test_publish_after_close_raises_and_takes_nothing(replay_thread):
    pub = VllmEventPublisher(BS, ANY, replay_endpoint=ANY, replay_thread=replay_thread)
    pub(_stored(b"\1" * 32))
    assert pub.publish() == 0
    pub(_stored(b"\2" * 32))
    pub.close()
    with pytest.raises(RuntimeError, match=r"publish: this VllmEventPublisher .* is closed"):
        pub.publish()
    assert len(pub.encoder._pending) == 1 and pub.next_seq == 1  # nothing taken, no seq burned
    with pytest.raises(RuntimeError, match="serve_replay: .* is closed"):
        pub.serve_replay()


def test_a_failed_send_keeps_the_batch_and_its_number(monkeypatch):
    """The send raises once: the batch stays, numbered as before, and the next publish() sends
    it; the subscriber sees no gap (it would forget the engine's blocks)."""
    pub = VllmEventPublisher(BS, ANY, replay_endpoint=ANY, int_hashes=False)
    router = Router(BS)
    router.add_worker("w")
    sub = VllmEventSubscriber(router.apply, replay_timeout=5.0)
    try:
        pub_ep, rep_ep = _eps(pub)
        sub.add_engine("w", pub_ep, replay_endpoint=rep_ep)
        deadline = time.monotonic() + 10
        while sub.stats("w")["batches"] == 0:  # the SUB connects asynchronously
            pub(_stored(b"\1" * 32))
            pub.publish()
            sub.poll(20)
            assert time.monotonic() < deadline, "the subscriber never got a batch"
        while sub._engines["w"].expected != pub.next_seq:  # the batches in flight
            sub.poll(20)
            assert time.monotonic() < deadline, "the subscriber never caught up"
        seq, before = pub.next_seq, sub.stats("w")  # joining late counts a gap: not ours
        real, calls = pub._pub.send_multipart, []

        def fail_once(*args, **kwargs):
            calls.append(args)
            if len(calls) == 1:
                raise zmq.ZMQError(zmq.EAGAIN)
            return real(*args, **kwargs)

        monkeypatch.setattr(pub._pub, "send_multipart", fail_once)
        pub(_stored(b"\2" * 32))
        with pytest.raises(zmq.ZMQError):
            pub.publish()
        # kept for replay under its number (once), not yet counted as sent
        assert pub.next_seq == seq and [s for s, _ in pub._buffer if s >= seq] == [seq]
        assert pub.publish() == seq and pub.next_seq == seq + 1
        assert [s for s, _ in pub._buffer if s >= seq] == [seq]
        assert calls[0] == calls[1]  # the same frames: the same number and payload
        while b"\2" * 32 not in router.cached_hashes("w").get(b"", ()):
            sub.poll(20)
            assert time.monotonic() < deadline, "the batch never arrived"
        st = sub.stats("w")
        assert (st["gaps"], st["cleared"]) == (before["gaps"], before["cleared"]), st
        assert sub._engines["w"].expected == seq + 1
        assert pub.publish() is None  # nothing left over
    finally:
        sub.close()
        pub.close()


def test_a_batch_is_replayable_as_soon_as_it_arrives():
    # the batch went out before it was kept for replay: a subscriber asking for it as soon
    # as it arrived (the replay thread answering at once) found it missing about half the
    # time, and prefixkv's subscriber would have dropped the engine's blocks
    import sys

    from prefixkv.paged.vllm_zmq import END_SEQ

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    stop, seen = threading.Event(), {"asked": 0, "missing": []}
    with VllmEventPublisher(BS, ANY, replay_endpoint=ANY) as pub:
        pub_ep, replay_ep = _eps(pub)
        ctx = zmq.Context.instance()

        def client():  # a batch received on PUB: asked for at once
            sub, dealer = ctx.socket(zmq.SUB), ctx.socket(zmq.DEALER)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(pub_ep)
            dealer.connect(replay_ep)
            try:
                while not stop.is_set():
                    if not sub.poll(50):
                        continue
                    seq = int.from_bytes(sub.recv_multipart()[1], "big")
                    dealer.send_multipart((b"", seq.to_bytes(8, "big")))
                    got = []
                    while dealer.poll(2000):
                        frames = dealer.recv_multipart()
                        if frames[1] == END_SEQ:
                            break
                        got.append(int.from_bytes(frames[1], "big"))
                    seen["asked"] += 1
                    if seq not in got:
                        seen["missing"].append(seq)
                    while sub.poll(0):  # the next fresh one
                        sub.recv_multipart()
            finally:
                sub.close(linger=0)
                dealer.close(linger=0)

        thread = threading.Thread(target=client)
        thread.start()
        try:
            deadline, i = time.monotonic() + 1.5, 0
            while time.monotonic() < deadline:
                pub(_stored(i.to_bytes(32, "big")))
                pub.publish()
                i += 1
                time.sleep(0.0005)
        finally:
            stop.set()
            thread.join()
            sys.setswitchinterval(old)
    assert seen["asked"] >= 20
    assert not seen["missing"], (f"{len(seen['missing'])} of {seen['asked']} batches not yet "
                                 f"replayable when they arrived")


def test_close_returns_while_clients_keep_asking_for_replays():
    """The replay thread served requests for as long as they kept coming, never looking at
    the stop event: a client asking without pause held close() (20 s in a 7 s flood)."""
    pub = VllmEventPublisher(BS, ANY, replay_endpoint=ANY)
    replay_ep = _eps(pub)[1]
    for i in range(500):
        pub(_stored(i.to_bytes(32, "big")))
        pub.publish(ts=0.0)
    done = threading.Event()
    until = time.monotonic() + 6.0  # bounded: held by it, close() returned when it ended

    def flood():
        c = zmq.Context.instance().socket(zmq.DEALER)
        c.setsockopt(zmq.LINGER, 0)
        c.connect(replay_ep)
        try:
            while not done.is_set() and time.monotonic() < until:
                c.send_multipart((b"", (0).to_bytes(8, "big")))
                time.sleep(0.001)
        finally:
            c.close(0)

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    try:
        time.sleep(0.5)
        t0 = time.monotonic()
        pub.close()
        assert time.monotonic() - t0 < 2.0
        assert not pub._thread.is_alive()
    finally:
        done.set()
        thread.join(5)
