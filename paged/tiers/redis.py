"""Remote tier ("G4") on a Redis server: one value per block, pipelined.

Needs the ``redis`` client (extra ``prefixkv[remote]``; ``hiredis`` makes replies faster),
imported when a ``RedisTier`` is made. Keys are ``<prefix><namespace digest>/<hash hex>``;
values are :func:`encode_record` records (format version, full key, dtype, shape, checksum),
verified on every get.

Faults: every call has connect and read timeouts and no client-side retries. A connection
error or timeout turns the whole batch into misses / ``False`` and marks the server down for
``retry_interval`` seconds, during which calls answer at once without touching the network;
the next call after that reconnects (redis-py reconnects its pool lazily). A command the
server refuses (a SET at ``maxmemory`` with ``noeviction``) is ``False`` for that key only; the
rest of its pipeline stands and the server is not marked down. The caller never sees an
exception from the server and never gets a block that fails verification; a record that is
corrupt or stored under another key is deleted (another shape or dtype is kept).

Events: "stored" / "removed" / "cleared" for this client's own calls; the server's own
evictions (maxmemory policy) and TTL expiries are not observed (they show up as misses).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

import numpy as np

from ..validate import check_int
from .base import (
    BlockKey,
    RecordError,
    Tier,
    UnexpectedLayout,
    check_checksum,
    check_get_layout,
    check_keys,
    check_put_values,
    check_seconds,
    decode_record,
    encode_record,
    first_occurrences,
)


def _import_redis():
    try:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError as e:  # pragma: no cover - the test env has redis
        raise ImportError("RedisTier needs the 'redis' package: pip install 'prefixkv[remote]' "
                          "(redis, hiredis)") from e
    return redis, Retry, NoBackoff


class RedisTier(Tier):
    """Blocks in Redis at ``host:port`` (db ``db``).

    socket_timeout / connect_timeout: seconds per command / connect. retry_interval: seconds a
    failed server is left alone. ttl_s: optional expiry of stored blocks. max_batch: keys per
    pipeline round trip (an int >= 1). checksum: "crc32" or "xxh3_128" (default: xxh3_128 when
    available). Both are checked here (a ValueError naming them), not at the first call.

    There is no byte budget: every block stays until ``ttl_s`` expires it or the server evicts
    it, and a :class:`TieredStore` writes through to this tier, so a long-running deployment
    sets ``ttl_s`` or runs the server with ``maxmemory`` and ``maxmemory-policy allkeys-lru``.
    """

    name = "redis"

    def __init__(self, host: str = "127.0.0.1", port: int = 6379, *, db: int = 0,
                 prefix: str = "prefixkv:", socket_timeout: float = 1.0,
                 connect_timeout: float = 0.5, retry_interval: float = 1.0,
                 ttl_s: float | None = None, max_batch: int = 64, checksum: str | None = None,
                 client=None):
        super().__init__()
        self.max_batch = check_int("max_batch", max_batch, 1, " (keys per round trip)")
        self.checksum = check_checksum(checksum)
        socket_timeout = check_seconds("socket_timeout", socket_timeout)
        connect_timeout = check_seconds("connect_timeout", connect_timeout)
        retry_interval = check_seconds("retry_interval", retry_interval, zero_ok=True)
        ttl_s = check_seconds("ttl_s", ttl_s, optional=True)
        if not isinstance(prefix, str):
            raise TypeError(f"prefix: expected a str, got {type(prefix).__name__}")
        redis, Retry, NoBackoff = _import_redis()
        self._errors = (redis.exceptions.RedisError, OSError)
        self._refused = redis.exceptions.ResponseError  # the server's answer to one command
        self.host, self.port, self.prefix = host, int(port), prefix
        self.retry_interval = retry_interval
        self.ttl_ms = None if ttl_s is None else max(1, int(ttl_s * 1000))
        self._down_until = 0.0
        self._closed = False
        self.client = client if client is not None else redis.Redis(
            host=host, port=self.port, db=db, socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout, retry=Retry(NoBackoff(), 0),
            health_check_interval=0)

    # -- fault handling ------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        """False while the server is marked down after a failure."""
        return time.monotonic() >= self._down_until

    def _fail(self) -> None:
        self.stats.errors += 1
        self._down_until = time.monotonic() + self.retry_interval
        with contextlib.suppress(Exception):  # best effort cleanup
            self.client.connection_pool.disconnect()

    def _answer(self, got, n: int) -> list | None:
        """A pipeline's or MGET's answer ``got`` for ``n`` commands / keys as a list, or None
        (counted in ``errors``) when it is not one entry per command: a nonstandard client or
        proxy answering short (or long) would put each entry at another key's position, and a
        key would be answered with another key's block. The caller makes those keys misses /
        ``False``; the server is not marked down (it answered)."""
        if isinstance(got, (list, tuple)) and len(got) == n:
            return list(got)
        self.stats.errors += 1
        return None

    def _rkey(self, key: BlockKey) -> str:
        return self.prefix + key.storage_key()

    def _chunks(self, seq: Sequence):
        for i in range(0, len(seq), self.max_batch):
            yield seq[i:i + self.max_batch]

    # -- interface -----------------------------------------------------------------------------
    def ping(self) -> bool:
        if not self.available:
            return False
        try:
            return bool(self.client.ping())
        except self._errors:
            self._fail()
            return False

    def batch_exists(self, keys):
        keys = check_keys(keys)
        if not keys or not self.available:
            return 0
        n = 0
        try:
            for chunk in self._chunks(list(keys)):
                pipe = self.client.pipeline(transaction=False)
                for k in chunk:
                    pipe.exists(self._rkey(k))
                got = self._answer(pipe.execute(), len(chunk))
                if got is None:  # not one answer per key: none can be trusted
                    return n
                for r in got:
                    if not r:
                        return n
                    n += 1
        except self._errors:
            self._fail()
        return n

    def batch_get(self, keys, *, shape=None, dtype=None):
        keys = check_keys(keys)
        shape, dtype = check_get_layout(shape, dtype)
        out: list[np.ndarray | None] = [None] * len(keys)
        if not keys:
            return out
        if not self.available:
            self.stats.misses += len(keys)
            return out
        pos = 0
        bad: dict[str, tuple[BlockKey, bytes]] = {}  # records failing verification
        try:
            for chunk in self._chunks(keys):
                raw = self._answer(self.client.mget([self._rkey(k) for k in chunk]),
                                   len(chunk))
                if raw is None:  # not one value per key: this chunk's keys are misses
                    pos += len(chunk)
                    continue
                for k, data in zip(chunk, raw, strict=True):
                    if data is not None:
                        try:
                            out[pos] = decode_record(k, data, shape=shape, dtype=dtype)
                            self.stats.bytes_read += len(data)
                        except UnexpectedLayout as e:  # a good record of another layout: kept
                            self._layout_miss(e)
                        except RecordError:
                            self.stats.corrupt += 1
                            bad[self._rkey(k)] = (k, data)
                    pos += 1
        except self._errors:
            self._fail()
        if bad and self.available:  # not after a failure: the back-off sends nothing
            self._drop_bad(bad)
        hits = sum(a is not None for a in out)
        self.stats.hits += hits
        self.stats.misses += len(keys) - hits
        return out

    def _drop_bad(self, bad: dict[str, tuple[BlockKey, bytes]]) -> None:
        """Delete records that failed verification (so ``batch_exists`` stops counting them and
        the next put replaces them), each only while it still holds the bytes read: a put
        racing in between keeps its value."""
        script = ("if redis.call('GET', KEYS[1]) == ARGV[1] then "
                  "return redis.call('DEL', KEYS[1]) else return 0 end")
        try:
            pipe = self.client.pipeline(transaction=False)
            for rkey, (_k, data) in bad.items():
                pipe.eval(script, 1, rkey, data)
            done = self._answer(pipe.execute(raise_on_error=False), len(bad))
        except self._errors:
            self._fail()
            return
        if done is None:  # not one answer per record: which went is unknown, none reported
            return
        self._publish("removed", [k for (k, _d), n in zip(bad.values(), done, strict=True)
                                  if n == 1])

    def batch_put(self, keys, values):
        """Every value's dtype is checked against its key's namespace before anything is sent
        (ValueError, nothing stored). A key repeated in the batch is sent once (the first
        value; stats and the "stored" event count it once); each of its positions reports that
        result. "stored" goes out after the bookkeeping, even when the server fails midway."""
        keys, values = check_put_values(keys, values)
        results = [False] * len(keys)
        todo, repeats = first_occurrences(keys)
        if not todo:
            return results
        if not self.available:
            self.stats.rejected += len(todo)
            return results
        stored: list[BlockKey] = []
        try:
            for chunk in self._chunks(todo):
                pipe = self.client.pipeline(transaction=False)
                sizes = []
                for i in chunk:
                    header, payload = encode_record(keys[i], values[i],
                                                    checksum_alg=self.checksum)
                    data = header + payload
                    sizes.append(len(data))
                    pipe.set(self._rkey(keys[i]), data, px=self.ttl_ms)
                # a SET the server refuses (OOM at maxmemory with noeviction) is that key's
                # False: the others in the pipeline are stored, and the server is up
                done = self._answer(pipe.execute(raise_on_error=False), len(chunk))
                if done is None:  # not one answer per SET: this chunk's keys report False
                    continue
                for i, ok, size in zip(chunk, done, sizes, strict=True):
                    if isinstance(ok, self._refused):
                        continue  # False, counted rejected by _end_put
                    if isinstance(ok, BaseException):
                        raise ok
                    elif ok:
                        results[i] = True
                        stored.append(keys[i])
                        self.stats.puts += 1
                        self.stats.bytes_written += size
        except self._errors:
            self._fail()
        finally:
            self._end_put(results, repeats, todo, stored)
        return results

    def batch_remove(self, keys):
        keys = check_keys(keys)
        if not keys or not self.available:
            return 0
        try:
            pipe = self.client.pipeline(transaction=False)
            for k in keys:
                pipe.delete(self._rkey(k))
            done = self._answer(pipe.execute(), len(keys))
            # not one answer per DEL: which keys went is unknown, so none is reported removed
            gone = [] if done is None else [k for k, n in zip(keys, done, strict=True) if n]
        except self._errors:
            self._fail()
            return 0
        self._publish("removed", gone)
        return len(gone)

    def clear(self):
        """Delete every key under this tier's prefix, then publish "cleared". Tried even while
        the server is marked down (an operator's explicit request: skipped during the
        back-off, it was silently lost); a server still unreachable, or failing part-way, is
        counted in ``errors`` and publishes nothing (keys may remain, so "cleared" would be
        untrue). A closed tier does nothing (no reconnect)."""
        if self._closed:
            return
        try:
            batch = []
            # the prefix matched literally: its glob characters (a test name's "[float32]")
            # matched other tiers' keys and missed its own
            match = "".join("\\" + c if c in "\\*?[]" else c for c in self.prefix) + "*"
            for k in self.client.scan_iter(match=match, count=1000):
                batch.append(k)
                if len(batch) >= 1000:
                    self.client.delete(*batch)
                    batch = []
            if batch:
                self.client.delete(*batch)
        except self._errors:
            self._fail()  # some keys may stay: no "cleared" that would be untrue
            return
        self._publish_cleared()

    def close(self):
        """Release the connections. Every later call is a miss / ``False`` / 0 (redis-py had
        reconnected on the next call, so a closed tier went on storing and serving); the
        server keeps the records for other clients, so no "cleared" goes out."""
        self._down_until = float("inf")
        self._closed = True
        with contextlib.suppress(Exception):  # best effort cleanup
            self.client.close()


class LocalRedisServer:
    """A private ``redis-server`` on 127.0.0.1 (free port, no persistence) for tests and
    benchmarks: ``with LocalRedisServer() as srv: RedisTier(port=srv.port)``.

    ``stop()`` kills it (SIGKILL: a crash, as the fault tests want); ``start()`` again brings
    it back on the same port. Raises FileNotFoundError when ``redis-server`` is not on PATH
    (``bash scripts/services.sh install`` installs it).
    """

    def __init__(self, port: int | None = None, *, executable: str = "redis-server"):
        import shutil
        import socket

        exe = shutil.which(executable)
        if exe is None:
            raise FileNotFoundError(f"{executable} not found on PATH "
                                    "(install: bash scripts/services.sh install)")
        self.executable = exe
        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port = int(port)
        self.proc = None

    def start(self, timeout: float = 10.0) -> LocalRedisServer:
        import socket
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            return self
        self.proc = subprocess.Popen(
            [self.executable, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--protected-mode", "yes", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode} "
                                   f"(port {self.port} taken?)")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on 127.0.0.1:{self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
