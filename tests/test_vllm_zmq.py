"""vLLM's KV event transport over ZMQ on 127.0.0.1 (prefixkv.paged.vllm_zmq): an engine on
prefixkv publishing as vLLM does, a Router fed by the subscriber; late joins and lost batches
filled from the replay endpoint, or the engine's blocks forgotten when they cannot be."""

import threading
import time

import pytest
from prefixkv.paged import PrefixCache, Router
from prefixkv.paged.vllm_events import VllmEventEncoder, encode_frames, vllm_hash_fn

zmq = pytest.importorskip("zmq")
pytest.importorskip("msgpack")

from prefixkv.paged.events import KVEvent  # noqa: E402
from prefixkv.paged.vllm_zmq import VllmEventPublisher, VllmEventSubscriber  # noqa: E402

BS = 4


def _endpoint() -> str:
    """A port of the system's choosing when bound (the sockets' LAST_ENDPOINT tells which)."""
    return "tcp://127.0.0.1:*"


def _engine():
    pc = PrefixCache(num_blocks=64, block_size=BS, hash_fn=vllm_hash_fn(int_hashes=False))
    direct = Router(BS, hash_fn=vllm_hash_fn(int_hashes=False))
    direct.add_worker("w", pc.events)
    return pc, direct


def _run(pc, rid, tokens, salt=None):
    done = pc.add_request(rid, tokens, salt=salt)
    pc.step([(rid, len(tokens) - done)])


def _want(direct):
    return {ns: {h[-8:] for h in hs} for ns, hs in direct.cached_hashes("w").items()}


def test_late_subscriber_catches_up_by_replay_then_follows():
    pc, direct = _engine()
    pub = VllmEventPublisher(BS, _endpoint(), replay_endpoint=_endpoint(), topic="kv")
    pub_ep = pub._pub.getsockopt(zmq.LAST_ENDPOINT).decode()
    rep_ep = pub._replay.getsockopt(zmq.LAST_ENDPOINT).decode()
    pc.events.subscribe(pub)
    router = Router(BS, hash_fn=vllm_hash_fn())
    router.add_worker("w")
    sub = VllmEventSubscriber(router.apply, replay_timeout=5.0)
    try:
        # three steps before anyone subscribes: only the replay buffer has them
        for i in range(3):
            _run(pc, f"r{i}", list(range(i * 100, i * 100 + 13)), salt="t" if i else None)
            assert pub.publish() == i
        sub.add_engine("w", pub_ep, replay_endpoint=rep_ep, topic="kv")
        # the SUB connects asynchronously: publish until a live batch arrives; every batch it
        # missed comes from the replay endpoint (the publisher's replay thread answers while
        # this thread waits in the subscriber)
        i, deadline = 3, time.monotonic() + 20
        while sub.stats("w")["batches"] == 0:
            _run(pc, f"r{i}", list(range(i * 100, i * 100 + 9)))
            pc.free(f"r{i}")  # its blocks stay cached, evictable: the pool never runs out
            pub.publish()
            sub.poll(20)
            i += 1
            assert time.monotonic() < deadline, "the subscriber never got a batch"
        pc.free("r0")
        _run(pc, "big", list(range(5000, 5000 + 40 * BS + 1)))  # evicts r0's blocks
        pub.publish()
        _until(sub, lambda: router.cached_hashes("w") == _want(direct))
        st = sub.stats("w")
        assert st["replayed"] >= 3 and st["cleared"] == 0
        assert router.pick(list(range(100, 113)), salt="t").overlaps["w"] == 3
        assert router.pick(list(range(100, 113))).overlaps["w"] == 0  # another namespace
    finally:
        sub.close()
        pub.close()


def _raw_pub():
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    return pub, f"tcp://127.0.0.1:{port}"


def _connected(pub, sub, enc):
    """Send seq 0 until the subscriber has it (PUB drops messages before the SUB connects)."""
    for _ in range(1000):
        pub.send_multipart(encode_frames(0, enc.encode([_stored(b"\1" * 32)], ts=0.0)))
        if sub.poll(20):
            return
    raise AssertionError("the subscriber never connected")


def _until(sub, done, seconds=20.0):
    """Poll until ``done()`` (a loaded CI machine delivers late, never out of order)."""
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, "timed out"
        sub.poll(50)


def _stored(h, parent=None):
    return KVEvent("stored", (h,), parent, "device", b"", BS, token_ids=(1, 2, 3, 4))


def _following(**subscriber_kwargs):
    """(pub, router, sub, enc): a raw PUB socket whose engine "w" the subscriber follows (seq 0
    received), feeding a Router."""
    pub, ep = _raw_pub()
    router = Router(BS)
    router.add_worker("w")
    sub = VllmEventSubscriber(router.apply, **subscriber_kwargs)
    enc = VllmEventEncoder(BS, int_hashes=False)
    try:
        sub.add_engine("w", ep)
        _connected(pub, sub, enc)
    except BaseException:
        sub.close()
        pub.close(0)
        raise
    return pub, router, sub, enc


def test_gap_without_replay_forgets_the_engines_blocks_and_a_restart_starts_over():
    pub, router, sub, enc = _following()
    try:
        assert router.cached_hashes("w") == {b"": {b"\1" * 32}}
        # seq 1 follows the seq-0 copies _connected sent (each copy after the first a restart)
        pub.send_multipart(encode_frames(1, enc.encode([_stored(b"\2" * 32)], ts=1.0)))
        _until(sub, lambda: b"\2" * 32 in router.cached_hashes("w").get(b"", ()))
        assert router.cached_hashes("w") == {b"": {b"\1" * 32, b"\2" * 32}}
        # the engine starts again: seq 0, its cache empty; what it held is forgotten
        restarts = sub.stats("w")["restarts"]
        pub.send_multipart(encode_frames(0, enc.encode([_stored(b"\3" * 32)], ts=0.0)))
        _until(sub, lambda: sub.stats("w")["restarts"] == restarts + 1)
        assert router.cached_hashes("w") == {b"": {b"\3" * 32}}
        # seq 1 lost: batch 2 arrives, nothing can replay 1 (it may have removed blocks)
        cleared = sub.stats("w")["cleared"]
        pub.send_multipart(encode_frames(2, enc.encode([_stored(b"\4" * 32)], ts=2.0)))
        _until(sub, lambda: sub.stats("w")["gaps"] == 1)
        st = sub.stats("w")
        assert st["gaps"] == 1 and st["cleared"] == cleared + 1
        assert router.cached_hashes("w") == {b"": {b"\4" * 32}}  # forgotten, then batch 2
    finally:
        sub.close()
        pub.close(0)


def test_replay_timeout_forgets_the_engines_blocks():
    pub, ep = _raw_pub()
    mute = zmq.Context.instance().socket(zmq.ROUTER)  # a replay endpoint that never answers
    mport = mute.bind_to_random_port("tcp://127.0.0.1")
    router = Router(BS)
    router.add_worker("w")
    sub = VllmEventSubscriber(router.apply, replay_timeout=0.2)
    enc = VllmEventEncoder(BS, int_hashes=False)
    try:
        sub.add_engine("w", ep, replay_endpoint=f"tcp://127.0.0.1:{mport}")
        _connected(pub, sub, enc)
        pub.send_multipart(encode_frames(5, enc.encode([_stored(b"\5" * 32)], ts=5.0)))
        _until(sub, lambda: sub.stats("w")["gaps"] == 1)
        assert sub.stats("w")["cleared"] == 1
        assert router.cached_hashes("w") == {b"": {b"\5" * 32}}
    finally:
        sub.close()
        pub.close(0)
        mute.close(0)


@pytest.mark.parametrize("replay_thread", [True, False])
def test_replay_answers_vllms_request_frames(replay_thread):
    """A client speaking vLLM's replay protocol (DEALER: b"", start seq) gets every buffered
    batch from there and the end marker, from the replay thread or from serve_replay."""
    pub = VllmEventPublisher(BS, _endpoint(), replay_endpoint=_endpoint(), buffer_steps=2,
                             replay_thread=replay_thread)
    rep_ep = pub._replay.getsockopt(zmq.LAST_ENDPOINT).decode()
    client = zmq.Context.instance().socket(zmq.DEALER)
    try:
        for i in range(3):
            pub(_stored(bytes([i]) * 32))
            pub.publish(ts=float(i))
        client.connect(rep_ep)
        client.send_multipart((b"", (0).to_bytes(8, "big")))
        got = []
        for _ in range(1000):
            pub.serve_replay()
            if client.poll(20):
                frames = client.recv_multipart()
                got.append(frames)
                if frames[1] == (-1).to_bytes(8, "big", signed=True):
                    break
        seqs = [int.from_bytes(f[1], "big", signed=True) for f in got]
        assert seqs == [1, 2, -1]  # batch 0 left the 2-batch buffer
        assert all(f[0] == b"" for f in got) and got[-1][2] == b""
    finally:
        client.close(0)
        pub.close()


def test_bad_arguments():
    with pytest.raises(ValueError, match="buffer_steps"):
        VllmEventPublisher(BS, _endpoint(), buffer_steps=0)
    with pytest.raises(TypeError, match="apply"):
        VllmEventSubscriber(None)
    with pytest.raises(TypeError, match="topic: expected a str"):
        VllmEventPublisher(BS, _endpoint(), topic=b"kv")
    for bad in (float("nan"), -1.0, float("inf"), "2"):
        with pytest.raises(ValueError, match="replay_timeout"):
            VllmEventSubscriber(lambda w, e: None, replay_timeout=bad)
    with pytest.raises(TypeError, match="group_ix"):  # the decoder's, refused up front
        VllmEventSubscriber(lambda w, e: None, group_ix=0)
    sub = VllmEventSubscriber(lambda w, e: None)
    sub.add_engine("w", "tcp://127.0.0.1:9")  # connecting is asynchronous: nothing listens
    with pytest.raises(ValueError, match="already added"):
        sub.add_engine("w", "tcp://127.0.0.1:9")
    with pytest.raises(KeyError, match="worker_id: unknown engine 'v'"):
        sub.remove_engine("v")
    sub.close()
    assert sub.poll(0) == 0  # closed: nothing left to poll


def test_bad_topics_are_refused_by_name_and_leave_no_socket():
    sub = VllmEventSubscriber(lambda w, e: None)
    try:
        with pytest.raises(TypeError, match="topic: expected a str, got bytes"):
            sub.add_engine("w", "tcp://127.0.0.1:9", topic=b"kv")
        with pytest.raises(ValueError, match="topic: expected a str UTF-8 encodes"):
            sub.add_engine("w", "tcp://127.0.0.1:9", topic="kv\ud800")
        with pytest.raises(zmq.ZMQError):
            sub.add_engine("w", "not-an-endpoint")
        assert sub._engines == {} and sub._by_socket == {}
        sub.add_engine("w", "tcp://127.0.0.1:9")  # the name is free: nothing half-added
    finally:
        sub.close()
    with pytest.raises(ValueError, match="topic: expected a str UTF-8 encodes"):
        VllmEventPublisher(BS, _endpoint(), topic="kv\ud800")


def test_a_sequence_number_with_its_top_bit_set_is_dropped():
    """Garbage numbered 0xff..ff is no batch: it raised OverflowError out of poll() with a
    replay endpoint (a replay asked from a negative number), and without one it counted as a
    restart that forgot the engine's blocks."""
    pub, router, sub, enc = _following()
    try:
        before, stats = router.cached_hashes("w"), sub.stats("w")
        pub.send_multipart((b"", b"\xff" * 8, enc.encode([_stored(b"\7" * 32)], ts=1.0)))
        pub.send_multipart(encode_frames(1, enc.encode([_stored(b"\2" * 32)], ts=1.0)))
        _until(sub, lambda: sub.stats("w")["batches"] == stats["batches"] + 1)
        assert router.cached_hashes("w") == {b"": before[b""] | {b"\2" * 32}}
        assert {k: v for k, v in sub.stats("w").items() if k != "batches"} == {
            k: v for k, v in stats.items() if k != "batches"}
    finally:
        sub.close()
        pub.close(0)


def test_only_the_engines_own_topic_is_applied():
    """ZMQ's SUBSCRIBE filter passes every topic that begins with the one asked: batches of
    "kv-2" on the same socket were taken for the engine's (its blocks forgotten as a restart,
    the other stream's credited to it)."""
    pub, ep = _raw_pub()
    router = Router(BS)
    router.add_worker("w")
    sub = VllmEventSubscriber(router.apply)
    enc = VllmEventEncoder(BS, int_hashes=False)
    try:
        sub.add_engine("w", ep, topic="kv")
        for _ in range(1000):  # connected once a "kv" batch arrives
            pub.send_multipart(encode_frames(0, enc.encode([_stored(b"\1" * 32)], ts=0.0),
                                             "kv"))
            if sub.poll(20):
                break
        pub.send_multipart(encode_frames(0, enc.encode([_stored(b"\2" * 32)], ts=0.0), "kv-2"))
        pub.send_multipart(encode_frames(1, enc.encode([_stored(b"\3" * 32)], ts=1.0), "kv"))
        _until(sub, lambda: b"\3" * 32 in router.cached_hashes("w").get(b"", ()))
        assert router.cached_hashes("w") == {b"": {b"\1" * 32, b"\3" * 32}}
        assert sub.stats("w")["restarts"] == 0 and sub.stats("w")["cleared"] == 0
    finally:
        sub.close()
        pub.close(0)


class _ReplayWithHoles(threading.Thread):
    """A replay endpoint answering from ``batches`` ({seq: payload}) without ``holes`` (a
    ROUTER drops the frames it cannot send at its high-water mark: they go NOBLOCK)."""

    def __init__(self, batches: dict, holes=()):
        super().__init__(daemon=True)
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.endpoint = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self.batches, self.holes, self.stop = batches, set(holes), threading.Event()

    def run(self):
        from prefixkv.paged.vllm_zmq import END_SEQ

        try:
            while not self.stop.is_set():
                if not self.sock.poll(20):
                    continue
                client, _, start = self.sock.recv_multipart()
                for s in sorted(self.batches):
                    if s >= int.from_bytes(start, "big") and s not in self.holes:
                        self.sock.send_multipart((client, b"", s.to_bytes(8, "big"),
                                                  self.batches[s]))
                self.sock.send_multipart((client, b"", END_SEQ, b""))
        finally:
            self.sock.close(linger=0)


def test_a_replay_with_a_hole_forgets_and_applies_the_batch():
    """A gap filled from a replay that lacks a batch inside it raised KeyError out of poll()
    (the batch that asked for it lost); now the engine's blocks are forgotten (what the hole
    held is unknown) and the batch applied, as without a replay."""
    pub, ep = _raw_pub()
    enc = VllmEventEncoder(BS, int_hashes=False)
    batches = {i: enc.encode([_stored(bytes([i + 1]) * 32)], ts=float(i)) for i in range(6)}
    replay = _ReplayWithHoles(batches, holes={2})
    replay.start()
    router = Router(BS)
    router.add_worker("w")
    sub = VllmEventSubscriber(router.apply, replay_timeout=5.0)
    try:
        sub.add_engine("w", ep, replay_endpoint=replay.endpoint)
        for _ in range(1000):
            pub.send_multipart(encode_frames(0, batches[0]))
            if sub.poll(20):
                break
        pub.send_multipart(encode_frames(5, batches[5]))  # 1..4 lost: a gap
        _until(sub, lambda: sub.stats("w")["gaps"] == 1)
        st = sub.stats("w")
        assert st["cleared"] == 1 and st["replayed"] == 0
        assert router.cached_hashes("w") == {b"": {b"\6" * 32}}
        replay.holes.clear()  # the same gap with a whole replay: filled
        for i in (6, 7, 8, 9):
            batches[i] = enc.encode([_stored(bytes([i + 1]) * 32)], ts=float(i))
        pub.send_multipart(encode_frames(9, batches[9]))
        _until(sub, lambda: sub.stats("w")["gaps"] == 2)
        assert sub.stats("w")["replayed"] == 3 and sub.stats("w")["cleared"] == 1
        assert router.cached_hashes("w") == {b"": {bytes([i]) * 32 for i in range(6, 11)}}
    finally:
        sub.close()
        pub.close(0)
        replay.stop.set()
        replay.join(5)


def test_a_batch_the_decoder_cannot_read_forgets_and_the_stream_goes_on(monkeypatch):
    """Whatever a malformed batch raises, the engine's blocks are forgotten and the following
    batches apply (it had stopped the stream for good: every batch a gap, refilled with the
    bad one); a removed engine's batches no longer reach the router."""
    pub, router, sub, enc = _following()
    try:
        from prefixkv.paged import vllm_events

        real = vllm_events.VllmEventDecoder.decode

        def decode(self, payload):
            if payload == b"boom":
                raise RuntimeError("not a ValueError")
            return real(self, payload)

        monkeypatch.setattr(vllm_events.VllmEventDecoder, "decode", decode)
        cleared = sub.stats("w")["cleared"]
        pub.send_multipart(encode_frames(1, b"boom"))
        _until(sub, lambda: sub.stats("w")["cleared"] == cleared + 1)
        assert router.cached_hashes("w") == {}
        pub.send_multipart(encode_frames(2, enc.encode([_stored(b"\2" * 32)], ts=2.0)))
        _until(sub, lambda: router.cached_hashes("w") == {b"": {b"\2" * 32}})
        assert sub.stats("w")["gaps"] == 0
        sub.remove_engine("w")
        router.remove_worker("w")
        pub.send_multipart(encode_frames(3, enc.encode([_stored(b"\3" * 32)], ts=3.0)))
        assert sub.poll(100) == 0  # no KeyError from the router
    finally:
        sub.close()
        pub.close(0)


def _publishing_engine(pub_ep, rep_ep):
    """(cache, direct router, publisher): an engine on prefixkv publishing on the endpoints."""
    pc, direct = _engine()
    pub = VllmEventPublisher(BS, pub_ep, replay_endpoint=rep_ep, topic="kv")
    pc.events.subscribe(pub)
    return pc, direct, pub


def _serve(pc, pub, rid, start):
    """A 9-token request from token ``start`` run, freed (its blocks cached, evictable: the
    pool never runs out) and the step's batch published."""
    _run(pc, rid, list(range(start, start + 9)))
    pc.free(rid)
    pub.publish()


def _serve_until_same(sub, pc, pub, router, direct, tag, base, i, what):
    """Serve requests ``tag{i}``, ``tag{i+1}``... until the router holds what the engine's
    direct router does."""
    deadline = time.monotonic() + 20
    while router.cached_hashes("w") != _want(direct):
        _serve(pc, pub, f"{tag}{i}", base + i * 100)
        sub.poll(50)
        i += 1
        assert time.monotonic() < deadline, what


def _restarted_engine(eps):
    """The engine again on the endpoints ``eps``, its cache empty: (cache, direct router,
    publisher), binding retried while the old sockets close (asynchronously)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            return _publishing_engine(*eps)
        except zmq.ZMQError:
            assert time.monotonic() < deadline, "the endpoints were never free again"
            time.sleep(0.05)


def _followed_engine(sub, router):
    """An engine "w" the subscriber follows live (a batch received, not replayed)."""
    pc, direct, pub = _publishing_engine(_endpoint(), _endpoint())
    eps = [s.getsockopt(zmq.LAST_ENDPOINT).decode() for s in (pub._pub, pub._replay)]
    sub.add_engine("w", eps[0], replay_endpoint=eps[1], topic="kv")
    i, deadline = 0, time.monotonic() + 20
    while sub.stats("w")["batches"] == sub.stats("w")["replayed"]:
        _serve(pc, pub, f"a{i}", i * 100)
        sub.poll(20)
        i += 1
        assert time.monotonic() < deadline, "the subscriber never got a batch"
    _until(sub, lambda: router.cached_hashes("w") == _want(direct))
    return pc, direct, pub, eps


def test_restarted_engine_numbering_past_the_expected_batch_is_detected():
    """An engine restarted on the same endpoints whose first batches the subscriber misses
    while it reconnects goes on at or past the number expected, where only a lower number had
    told a restart. The subscriber saw the connection drop and the engine's replay of the last
    batch applied differs: the old engine's blocks are forgotten and the new one's rebuilt
    from its replay since batch 0."""
    router = Router(BS, hash_fn=vllm_hash_fn())
    router.add_worker("w")
    sub = VllmEventSubscriber(router.apply, replay_timeout=5.0)
    pubs = []
    try:
        _, _, pub, eps = _followed_engine(sub, router)
        pubs.append(pub)
        # reconnect after a second: the new engine's first batches are surely lost
        sub._engines["w"].sub.setsockopt(zmq.RECONNECT_IVL, 1000)
        expected = pub.next_seq
        pub.close()
        pc, direct, pub = _restarted_engine(eps)
        pubs.append(pub)
        for i in range(expected + 1):
            _serve(pc, pub, f"b{i}", 50_000 + i * 100)
        _serve_until_same(sub, pc, pub, router, direct, "b", 50_000, expected + 1,
                          "the old engine's blocks were kept")
        st = sub.stats("w")
        assert st["disconnects"] >= 1 and st["restarts"] == 1
        assert router.pick(list(range(9))).overlaps["w"] == 0  # the old engine's prompt
        assert router.pick(list(range(50_000, 50_009))).overlaps["w"] == 2
    finally:
        sub.close()
        for p in pubs:
            p.close()


def test_dropped_connection_to_the_same_engine_fills_the_gap():
    """The connection drops while the engine goes on (its PUB socket closed and another
    bound later, the numbering and the replay buffer kept; batches sent meanwhile are lost):
    the engine's replay of the last batch applied is the same, so the gap is filled from it
    and nothing is forgotten."""
    router = Router(BS, hash_fn=vllm_hash_fn())
    router.add_worker("w")
    sub = VllmEventSubscriber(router.apply, replay_timeout=5.0)
    pub = None
    try:
        pc, direct, pub, eps = _followed_engine(sub, router)
        pub._pub.close(linger=0)
        _until(sub, lambda: sub._disconnected(sub._engines["w"]))
        pub._pub = zmq.Context.instance().socket(zmq.PUB)
        for i in range(3):  # lost: the socket is not bound
            _serve(pc, pub, f"c{i}", 70_000 + i * 100)
        pub._pub.bind(eps[0])
        _serve_until_same(sub, pc, pub, router, direct, "c", 70_000, 3, "the gap was not filled")
        st = sub.stats("w")
        assert st["disconnects"] == 1 and st["cleared"] == 0 and st["restarts"] == 0
        assert st["replayed"] >= 3
        assert router.pick(list(range(70_000, 70_009))).overlaps["w"] == 2
    finally:
        sub.close()
        if pub is not None:
            pub.close()


def test_dropped_connection_without_replay_forgets_the_engines_blocks():
    """With no replay endpoint nothing tells a restarted engine numbering on from ours: after
    the connection drops, the next batch (even the number expected) forgets the blocks."""
    pub, router, sub, enc = _following()
    try:
        ep = pub.getsockopt(zmq.LAST_ENDPOINT).decode()
        pub.close(0)
        _until(sub, lambda: sub._disconnected(sub._engines["w"]))
        deadline = time.monotonic() + 20
        while True:
            try:
                pub = zmq.Context.instance().socket(zmq.PUB)
                pub.bind(ep)
                break
            except zmq.ZMQError:
                pub.close(0)
                assert time.monotonic() < deadline, "the endpoint was never free again"
                time.sleep(0.05)
        cleared = sub.stats("w")["cleared"]
        for _ in range(1000):  # seq 1 follows the last batch applied; resent until received
            pub.send_multipart(encode_frames(1, enc.encode([_stored(b"\2" * 32)], ts=1.0)))
            if sub.poll(20):
                break
        assert sub.stats("w")["cleared"] == cleared + 1
        assert router.cached_hashes("w") == {b"": {b"\2" * 32}}
    finally:
        sub.close()
        pub.close(0)


@pytest.mark.parametrize("following", [False, True], ids=["joining", "following"])
def test_batches_of_an_engine_gone_still_queued_are_dropped(following):
    """Batches the old engine sent before it restarted may still sit in the subscriber's
    socket when the new engine's arrive (a busy router loop). After the dropped connection,
    each batch is checked against the engine's replay, asked for after it arrived: the old
    engine's are dropped ("stale"), never applied to the new engine's blocks (they had been,
    and the new engine's first live batch, at the number expected, kept them for good); a
    rebuild that went past queued live batches does not count a second restart. The
    subscriber's receive is driven directly with the batches' frames, in the order a socket
    would deliver them."""
    router = Router(BS, hash_fn=vllm_hash_fn())
    router.add_worker("w")
    sub = VllmEventSubscriber(router.apply, replay_timeout=5.0)
    pubs = []
    try:
        pc, _, pub = _publishing_engine(_endpoint(), _endpoint())
        pubs.append(pub)
        eps = [s_.getsockopt(zmq.LAST_ENDPOINT).decode() for s_ in (pub._pub, pub._replay)]
        sub.add_engine("w", eps[0], replay_endpoint=eps[1], topic="kv")
        eng = sub._engines["w"]
        for i in range(3):
            _serve(pc, pub, f"a{i}", 100 * i)
        old = [encode_frames(s_, p_, "kv") for s_, p_ in pub._buffer]
        applied_before = 2 if following else 0
        for frames in old[:applied_before]:  # followed live
            assert sub._receive(eng, frames) == 1
        pub.close()
        pc, direct, pub = _restarted_engine(eps)
        pubs.append(pub)
        for i in range(4):  # batches 0..3, the first three missed while reconnecting
            _serve(pc, pub, f"b{i}", 50_000 + 100 * i)
        new = [encode_frames(s_, p_, "kv") for s_, p_ in pub._buffer]
        eng.dropped = True  # what the socket monitor reports
        for frames in old[applied_before:] + new[3:]:
            sub._receive(eng, frames)
        assert router.cached_hashes("w") == _want(direct)
        st = sub.stats("w")
        assert st["stale"] == 3 - applied_before
        assert st["restarts"] == (1 if following else 0)
        assert router.pick(list(range(9))).overlaps["w"] == 0  # the old engine's prompt
    finally:
        sub.close()
        for p_ in pubs:
            p_.close()
