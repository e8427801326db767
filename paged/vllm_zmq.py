"""vLLM's KV event transport over ZMQ, both ends (needs ``pyzmq``; the payloads are
:mod:`prefixkv.paged.vllm_events`').

vLLM's engine (``ZmqEventPublisher``) sends each step's batch on a PUB socket as the frames
``(topic, sequence number as 8 bytes big-endian, payload)`` and keeps the last batches for a
ROUTER replay endpoint: a client sends ``(b"", start_seq as 8 bytes big-endian)`` and gets every
buffered ``(b"", seq, payload)`` from ``start_seq`` on, then ``(b"", -1 as 8 signed bytes, b"")``.

- :class:`VllmEventPublisher`: an engine built on prefixkv publishing its event bus that way,
  so llm-d's indexer, Dynamo's router or vLLM's subscriber example read it as a vLLM engine's.
- :class:`VllmEventSubscriber`: a consumer of several engines' streams (vLLM's or the
  publisher's) feeding their events to a :class:`~prefixkv.paged.router.Router`. PUB drops
  messages (a subscriber joining late, a full queue), so it follows each engine's sequence
  numbers: a gap is filled from the engine's replay endpoint, and when it cannot be (no
  endpoint, the batches no longer buffered, a timeout) the engine's blocks are forgotten
  (a ``"cleared"`` event), so the router misses where it would otherwise route on blocks
  the engine may no longer hold. A sequence number below the next one expected is a restarted
  engine (vLLM numbers batches from 0 at start, and its cache starts empty): its blocks are
  forgotten and its new stream followed from there. A restarted engine may also go on past
  the number expected (its first batches lost while the subscriber reconnected): after a
  gap, or after the connection dropped (a ZMQ socket monitor sees it), the subscriber asks the
  replay endpoint for the last batch it applied and compares the bytes. The same batch: the
  stream goes on, the gap filled. Another one, or none: the engine's blocks are forgotten and
  rebuilt from its batches since 0 when its replay buffer still holds them all. The batch
  itself is checked against that replay too: one the engine answering lacks or holds with
  other bytes is an engine's gone, still queued in the socket, and is dropped.

Sockets bind or connect to the endpoints as given; use ``tcp://127.0.0.1:<port>`` on one host.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from .events import CLEARED, KVEvent, unsubscribe_all
from .vllm_events import VllmEventDecoder, VllmEventEncoder, decode_frames, encode_frames

END_SEQ = (-1).to_bytes(8, "big", signed=True)


def _zmq():
    try:
        import zmq
    except ImportError:
        # the extra, not pyzmq alone: the payloads need msgpack too (vllm_events)
        raise ImportError("the ZMQ event transport needs the pyzmq package "
                          "(pip install 'prefixkv[events]')") from None
    return zmq


def _serve_replay(replay, lock: threading.Lock, buffer: deque, timeout_ms: int,
                  stop: threading.Event | None = None) -> int:
    """Answer the replay requests that arrive on ``replay`` within ``timeout_ms``; returns how
    many. A function of the sockets and buffer only, not of the publisher: the replay thread
    runs it, and a thread holding the publisher would keep a dropped one (its thread, sockets
    and bound ports) alive for good. ``stop`` set: no further request is served (clients
    asking without pause held ``close()`` for as long as they asked)."""
    zmq = _zmq()
    served = 0
    while (stop is None or not stop.is_set()) and replay.poll(timeout_ms):
        timeout_ms = 0
        frames = replay.recv_multipart()
        if len(frames) != 3 or len(frames[2]) != 8:
            continue  # not a replay request
        client, start = frames[0], int.from_bytes(frames[2], "big")
        with lock:
            batches = [(seq, p) for seq, p in buffer if seq >= start]
        for seq, payload in batches:
            replay.send_multipart((client, b"", seq.to_bytes(8, "big"), payload),
                                  flags=zmq.NOBLOCK)
        replay.send_multipart((client, b"", END_SEQ, b""), flags=zmq.NOBLOCK)
        served += 1
    return served


def _serve_replay_forever(replay, lock: threading.Lock, buffer: deque,
                          stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            _serve_replay(replay, lock, buffer, 50, stop)
        except Exception:  # noqa: BLE001 - closed under it, or a client gone: go on
            if stop.is_set():
                return


def _shut_down(stop: threading.Event, thread: threading.Thread | None, sockets: tuple,
               unsubscribe: list) -> None:
    """Stop the replay thread, close the sockets (their ports unbound) and leave the bus:
    ``close()``, or the publisher's finalizer when it is collected without one."""
    stop.set()
    if thread is not None and thread.is_alive() and thread is not threading.current_thread():
        thread.join()
    for s in sockets:
        if s is not None:
            s.close(linger=0)
    unsubscribe_all(unsubscribe)


def _topic_bytes(topic) -> bytes:
    """A topic's frame: its UTF-8 bytes, or an error naming ``topic`` (a str UTF-8 cannot
    encode made every publish raise, the batch kept unsent for good)."""
    if not isinstance(topic, str):
        raise TypeError(f"topic: expected a str, got {type(topic).__name__} {topic!r}")
    try:
        return topic.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"topic: expected a str UTF-8 encodes, got {topic!r} ({e.reason})"
                         ) from None


def _forward_to(ref: weakref.ref) -> Callable[[KVEvent], None]:
    """A bus subscriber passing events on to the publisher ``ref`` names while it lives: the
    bus does not keep a dropped publisher alive (its finalizer then unsubscribes)."""
    def forward(event: KVEvent) -> None:
        pub = ref()
        if pub is not None:
            pub(event)

    return forward


class VllmEventPublisher:
    """Publishes KV events as a vLLM engine does (module doc).

    ``pub = VllmEventPublisher(16, "tcp://127.0.0.1:5557", replay_endpoint=
    "tcp://127.0.0.1:5558"); cache.events.subscribe(pub)``; after each engine step
    ``pub.publish()`` sends the step's batch (if any); ``pub.close()`` at the end (or ``with
    VllmEventPublisher(...) as pub:``). One dropped without ``close()`` is closed when it is
    garbage-collected: its replay thread stopped, its sockets closed and its ports unbound.

    block_size: the pool's. endpoint: the PUB socket's address (bound). replay_endpoint: the
    ROUTER socket's (bound), or None. topic: the frames' topic. buffer_steps: batches kept for
    replay. replay_thread: answer replay requests from a thread of its own (as vLLM's publisher
    does), so an idle engine answers too; False: ``publish()`` and ``serve_replay()`` answer
    the requests waiting. events: an event bus to subscribe to (``cache.events``), left by
    ``close()``; None: subscribe it yourself (a closed publisher then drops what the bus
    sends). encoder_kwargs: :class:`~prefixkv.paged.vllm_events.VllmEventEncoder`'s (wire,
    int_hashes, media, data_parallel_rank).
    """

    def __init__(self, block_size: int, endpoint: str, *, replay_endpoint: str | None = None,
                 topic: str = "", buffer_steps: int = 10_000, replay_thread: bool = True,
                 events=None, **encoder_kwargs) -> None:
        zmq = _zmq()
        if isinstance(buffer_steps, bool) or not isinstance(buffer_steps, int) or (
                buffer_steps < 1):
            raise ValueError(f"buffer_steps: expected an int >= 1, got {buffer_steps!r}")
        _topic_bytes(topic)
        if events is not None and not callable(getattr(events, "subscribe", None)):
            raise TypeError(f"events: expected an EventBus (with subscribe) or None, got "
                            f"{type(events).__name__}")
        self.encoder = VllmEventEncoder(block_size, **encoder_kwargs)
        self.topic = topic
        self.endpoint = endpoint
        self._closed = False
        self._finalizer = None
        self._stop = threading.Event()
        self._thread = None
        self._ctx = zmq.Context.instance()
        self._pub = self._ctx.socket(zmq.PUB)
        self._replay = None
        try:
            self._pub.bind(endpoint)
            if replay_endpoint is not None:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.bind(replay_endpoint)
        except Exception:
            self.close()
            raise
        self._buffer: deque = deque(maxlen=buffer_steps)  # (seq, payload)
        self._lock = threading.Lock()  # the buffer, between publish and the replay thread
        self._seq = 0
        self._unsent: bytes | None = None  # a batch whose send failed: sent first next time
        if self._replay is not None and replay_thread:
            self._thread = threading.Thread(
                target=_serve_replay_forever, daemon=True, name="prefixkv-kv-events-replay",
                args=(self._replay, self._lock, self._buffer, self._stop))
        # holds what the shutdown needs, never the publisher: collected, it runs (once)
        self._unsubscribe: list = []
        self._finalizer = weakref.finalize(self, _shut_down, self._stop, self._thread,
                                           (self._pub, self._replay), self._unsubscribe)
        try:
            if self._thread is not None:
                self._thread.start()
            if events is not None:
                self._unsubscribe.append(events.subscribe(_forward_to(weakref.ref(self))))
        except BaseException:
            self.close()
            raise

    @property
    def next_seq(self) -> int:
        """The sequence number of the next batch."""
        return self._seq

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __call__(self, event: KVEvent) -> None:
        if self._closed:
            return  # nothing will send it: kept, it would pile up for as long as the bus runs
        self.encoder(event)

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"{what}: this VllmEventPublisher ({self.endpoint}) is closed")

    def publish(self, ts: float | None = None) -> int | None:
        """Send the events received since the last call as one batch; returns its sequence
        number (None when there were none). Serves pending replay requests too.

        A batch is numbered once sent: when the send raises, the batch and its number stay
        (kept for replay already), and the next call sends it first (a lost batch would be a
        gap that subscribers answer by forgetting the engine's blocks)."""
        self._check_open("publish")
        seq = None
        if self._unsent is not None:
            seq = self._send(self._unsent)
        payload = self.encoder.take(ts)
        if payload is not None:
            self._unsent = payload
            seq = self._send(payload)
        if self._thread is None:
            self.serve_replay()
        return seq

    def _send(self, payload: bytes) -> int:
        """Send ``payload`` (``self._unsent``) as batch ``next_seq``; returns its number. Kept
        for replay before it goes out: a subscriber that asks for it as soon as it arrives
        (the replay thread answering at once) found it missing about half the time. A send
        that raises leaves it kept under its number, which the next call sends again."""
        seq = self._seq
        with self._lock:
            if not self._buffer or self._buffer[-1][0] != seq:
                self._buffer.append((seq, payload))
        self._pub.send_multipart(encode_frames(seq, payload, self.topic))
        self._seq, self._unsent = seq + 1, None
        return seq

    def serve_replay(self, timeout_ms: int = 0) -> int:
        """Answer the replay requests that arrive within ``timeout_ms``; returns how many.
        (With the replay thread, it does this and this returns 0.)"""
        self._check_open("serve_replay")
        if self._replay is None or self._thread is not None:
            return 0
        return _serve_replay(self._replay, self._lock, self._buffer, timeout_ms)

    def close(self) -> None:
        """Stop the replay thread, close the sockets and leave the bus given as ``events``
        (again: nothing). Events received later are dropped; ``publish()`` raises."""
        self._closed = True
        if self._finalizer is not None:
            self._finalizer()  # the thread stopped, the first sockets closed, the bus left
        for s in (self._pub, self._replay):  # those in place now, maybe not the first ones
            if s is not None:
                s.close(linger=0)

    def __enter__(self) -> VllmEventPublisher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class _Engine:
    worker: Hashable
    sub: object
    replay_endpoint: str | None
    decoder: VllmEventDecoder
    monitor: object = None  # the PAIR socket of the SUB's monitor (disconnections)
    topic: bytes = b""  # the frames' topic (ZMQ's filter passes any topic that begins with it)
    dropped: bool = False  # the connection dropped since the last batch
    expected: int | None = None  # the next sequence number to apply; None before the first
    last: tuple[int, bytes] | None = None  # (seq, payload) of the last batch applied
    stats: dict = field(default_factory=lambda: {"batches": 0, "replayed": 0, "restarts": 0,
                                                 "gaps": 0, "cleared": 0, "disconnects": 0,
                                                 "stale": 0})


class VllmEventSubscriber:
    """KV events of vLLM engines' ZMQ streams, decoded in order per engine (module doc).

    ``sub = VllmEventSubscriber(router.apply)``; ``sub.add_engine("w0", "tcp://host:5557",
    replay_endpoint="tcp://host:5558")`` (after ``router.add_worker("w0")``); then
    ``sub.poll(timeout_ms)`` in the router's loop applies what arrived.

    apply: called as ``apply(worker_id, event)`` for each decoded event (``Router.apply``).
    replay_timeout: seconds to wait for a replay before forgetting the engine's blocks.
    decoder_kwargs: :class:`~prefixkv.paged.vllm_events.VllmEventDecoder`'s (tiers,
    group_idx), for every engine.
    """

    def __init__(self, apply: Callable[[Hashable, KVEvent], None], *,
                 replay_timeout: float = 2.0, **decoder_kwargs) -> None:
        if not callable(apply):
            raise TypeError(f"apply: expected a callable(worker_id, event), got "
                            f"{type(apply).__name__}")
        if (isinstance(replay_timeout, bool) or not isinstance(replay_timeout, (int, float))
                or not 0 <= replay_timeout < float("inf")):
            raise ValueError(f"replay_timeout: expected a finite number of seconds >= 0, got "
                             f"{replay_timeout!r}")
        VllmEventDecoder(**decoder_kwargs)  # its arguments refused here, by name
        zmq = _zmq()
        self.apply = apply
        self.replay_timeout = float(replay_timeout)
        self._decoder_kwargs = decoder_kwargs
        self._ctx = zmq.Context.instance()
        self._poller = zmq.Poller()
        self._engines: dict[Hashable, _Engine] = {}
        self._by_socket: dict = {}

    def add_engine(self, worker_id: Hashable, endpoint: str, *,
                   replay_endpoint: str | None = None, topic: str = "") -> None:
        """Subscribe to an engine's PUB ``endpoint`` (connected) under ``topic`` (its batches
        alone: not those of another topic that begins with it, which ZMQ's filter passes)."""
        if worker_id in self._engines:
            raise ValueError(f"worker_id: {worker_id!r} is already added")
        name = _topic_bytes(topic)
        zmq = _zmq()
        sub = self._ctx.socket(zmq.SUB)
        try:
            sub.connect(endpoint)
            sub.setsockopt(zmq.SUBSCRIBE, name)
            monitor = sub.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        except BaseException:  # a bad endpoint: no socket left open
            sub.close(linger=0)
            raise
        eng = _Engine(worker_id, sub, replay_endpoint,
                      VllmEventDecoder(**self._decoder_kwargs), monitor=monitor, topic=name)
        self._engines[worker_id] = eng
        self._by_socket[sub] = eng
        self._poller.register(sub, zmq.POLLIN)

    def remove_engine(self, worker_id: Hashable) -> None:
        """Stop following an engine (before ``router.remove_worker``): its socket closed, its
        batches no longer applied."""
        eng = self._engines.pop(worker_id, None)
        if eng is None:
            raise KeyError(f"worker_id: unknown engine {worker_id!r}; known: "
                           f"{list(self._engines)}")
        self._close(eng)

    def _close(self, eng: _Engine) -> None:
        self._poller.unregister(eng.sub)
        del self._by_socket[eng.sub]
        eng.sub.disable_monitor()
        eng.monitor.close(linger=0)
        eng.sub.close(linger=0)

    def stats(self, worker_id: Hashable) -> dict:
        """Counts for one engine: batches applied, replayed, restarts, gaps and disconnections
        seen, stale batches dropped, and times its blocks were forgotten."""
        return dict(self._engines[worker_id].stats)

    def poll(self, timeout_ms: int = 0) -> int:
        """Apply every batch that arrives within ``timeout_ms`` (0: those already there);
        returns the number applied."""
        zmq = _zmq()
        applied = 0
        for sock, _ in self._poller.poll(timeout_ms):
            eng = self._by_socket[sock]
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                # after the batch: a disconnection that came before it is queued by then
                self._disconnected(eng)
                applied += self._receive(eng, frames)
        return applied

    # ------------------------------------------------------------------------------ internals
    def _disconnected(self, eng: _Engine) -> bool:
        """Drain the monitor's events: whether the engine's connection dropped since the last
        batch (``eng.dropped``, cleared by the next batch)."""
        from zmq.utils.monitor import recv_monitor_message

        zmq = _zmq()
        while eng.monitor.poll(0):
            if recv_monitor_message(eng.monitor)["event"] == zmq.EVENT_DISCONNECTED:
                eng.stats["disconnects"] += 1
                eng.dropped = True
        return eng.dropped

    def _receive(self, eng: _Engine, frames) -> int:
        try:
            seq, payload = decode_frames(frames)
        except ValueError:
            return 0  # not one of the engine's messages
        if bytes(frames[0]) != eng.topic:
            return 0  # another topic that begins with this one: another stream
        check = eng.dropped or (eng.expected is not None and seq != eng.expected)
        have = None
        if check and eng.replay_endpoint is not None:
            # after a dropped connection, or off the number expected: the engine's replay,
            # asked for after this batch arrived, from the last batch applied on
            got = self._replay(eng, seq if eng.last is None else min(seq, eng.last[0]))
            if got is not None:
                have = dict(got)
                if have.get(seq) != payload:
                    # the engine answering has no such batch, or another one: this one is
                    # an engine's gone (queued in the socket before it restarted): dropped
                    eng.stats["stale"] += 1
                    return 0
        eng.dropped = False
        if eng.expected is not None and check:
            if seq > eng.expected:
                eng.stats["gaps"] += 1
            if have is None:  # no replay endpoint, or no answer: cannot tell
                self._forget(eng)  # what was missed (or the engine restarted) is unknown
                if seq >= eng.expected:
                    return self._apply(eng, seq, payload)
                # a lower number: the engine started again, its cache empty (vLLM numbers
                # batches from 0 at start)
                eng.stats["restarts"] += 1
                eng.expected = None
            else:
                last_seq, last_payload = eng.last
                if have.get(last_seq) == last_payload:  # the engine followed: fill the gap
                    if seq < eng.expected:
                        return 0  # applied already (a rebuild went past it)
                    if any(s not in have for s in range(eng.expected, seq)):
                        # a replay with a hole (its frames are sent without blocking, and
                        # dropped at the high-water mark): what the hole held is unknown
                        self._forget(eng)
                        return self._apply(eng, seq, payload)
                    return self._apply_replayed(eng, have, eng.expected, seq) + self._apply(
                        eng, seq, payload)
                # another batch where ours was: a restarted engine (or ours past its buffer)
                eng.stats["restarts"] += 1
                self._forget(eng)
                eng.expected = None
                return self._rebuild(eng, have, seq, payload)
        if eng.expected is None and seq > 0:
            # batches 0..seq-1 precede our subscription: from the replay endpoint, or unknown
            # (their blocks stay unknown: misses)
            eng.stats["gaps"] += 1
            return self._rebuild(eng, have, seq, payload)
        return self._apply(eng, seq, payload)

    def _rebuild(self, eng: _Engine, have: dict | None, seq: int, payload: bytes) -> int:
        """Follow an engine from its start (its cache empty then) up to batch ``seq``: its
        batches from 0 on from the replay endpoint (``have`` when it starts at 0), as far as
        they run without a gap, then the batch itself unless they held it. When they do not
        reach it, what the missing batches removed is unknown: the blocks are forgotten and
        the batch applied alone."""
        if (have is None or 0 not in have) and eng.replay_endpoint is not None:
            have = dict(self._replay(eng, 0) or ())
        applied, stop = 0, 0
        if have and 0 in have:
            while stop in have:
                stop += 1
            applied = self._apply_replayed(eng, have, 0, stop)
            if seq < stop:
                return applied
            if seq > stop:
                self._forget(eng)
        return applied + self._apply(eng, seq, payload)

    def _apply_replayed(self, eng: _Engine, have: dict, start: int, stop: int) -> int:
        for s in range(start, stop):
            self._apply(eng, s, have[s])
            eng.stats["replayed"] += 1
        return stop - start

    def _apply(self, eng: _Engine, seq: int, payload: bytes) -> int:
        eng.expected = seq + 1
        eng.last = (seq, bytes(payload))
        try:
            batch = eng.decoder.decode(payload)
        except Exception:  # noqa: BLE001 - whatever a malformed batch raises: skip it
            self._forget(eng)  # a batch we cannot read: its blocks are unknown
            return 0
        for ev in batch.events:
            self.apply(eng.worker, ev)
        eng.stats["batches"] += 1
        return 1

    def _forget(self, eng: _Engine) -> None:
        for tier in dict.fromkeys((eng.decoder.gpu_tier, *eng.decoder.seen_tiers)):
            self.apply(eng.worker, KVEvent(CLEARED, (), None, tier, b"", 0))
        eng.decoder = VllmEventDecoder(**self._decoder_kwargs)
        eng.stats["cleared"] += 1

    def _replay(self, eng: _Engine, start: int):
        """[(seq, payload)] the engine's replay endpoint sends from ``start``, or None."""
        zmq = _zmq()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        out = []
        try:
            sock.connect(eng.replay_endpoint)
            sock.send_multipart((b"", start.to_bytes(8, "big")))
            deadline = time.monotonic() + self.replay_timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sock.poll(int(left * 1000) + 1):
                    return None
                frames = sock.recv_multipart()
                if len(frames) != 3:
                    continue
                if frames[1] == END_SEQ:
                    return out
                out.append((int.from_bytes(frames[1], "big"), bytes(frames[2])))
        finally:
            sock.close(linger=0)

    def close(self) -> None:
        """Close every engine's socket (``poll`` then applies nothing)."""
        for eng in self._engines.values():
            self._close(eng)
        self._engines.clear()
