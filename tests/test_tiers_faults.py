"""Faults: Redis killed / hung mid-run, disk files corrupted, truncated, swapped or unwritable,
host budget full. Nothing raises to the caller, nothing wrong is served, service resumes."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from prefixkv.paged.spec import numpy_dtype
from prefixkv.paged.tiers import (
    BlockKey,
    BlockOffloader,
    DiskTier,
    HostTier,
    Namespace,
    RecordError,
    Tier,
    TieredStore,
)
from tier_helpers import redis_server_or_skip

ROW = (4, 3, 2, 5)


def _same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _ns(salt=None):
    return Namespace("tiny-model", dtype="float32", salt=salt)


def _keys(n, start=0):
    return [BlockKey(i.to_bytes(4, "big"), _ns()) for i in range(start, start + n)]


def _rows(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(ROW).astype(numpy_dtype("float32")) for _ in range(n)]


@pytest.fixture()
def redis_server():
    srv = redis_server_or_skip()  # private per test: these tests kill it
    yield srv
    srv.stop()


def _redis(srv, **kw):
    from prefixkv.paged.tiers import RedisTier

    kw.setdefault("socket_timeout", 0.3)
    kw.setdefault("connect_timeout", 0.3)
    kw.setdefault("retry_interval", 0.2)
    return RedisTier(port=srv.port, **kw)


# -- Redis -----------------------------------------------------------------------------------

def test_redis_killed_mid_run_degrades_then_reconnects(redis_server, tmp_path):
    redis = _redis(redis_server)
    disk = DiskTier(tmp_path)
    store = TieredStore([HostTier(2 * np.zeros(ROW, np.float32).nbytes), disk, redis])
    ks, vals = _keys(6), _rows(6)
    assert store.batch_put(ks[:3], vals[:3]) == [True] * 3
    assert redis.batch_exists(ks[:3]) == 3

    redis_server.stop()  # SIGKILL mid-run
    t0 = time.monotonic()
    assert redis.batch_exists(ks) == 0
    assert redis.batch_get(ks[:3]) == [None] * 3
    assert redis.batch_put(ks[3:], vals[3:]) == [False] * 3
    assert not redis.available and redis.stats.errors >= 1
    # the chain still serves from disk and still stores (write-through to the live tiers)
    assert store.batch_put(ks[3:], vals[3:]) == [True] * 3
    got = store.batch_get(ks)
    assert all(_same(g, v) for g, v in zip(got, vals, strict=True))
    assert time.monotonic() - t0 < 5  # down server costs timeouts, not hangs

    redis_server.start()  # back (empty: no persistence)
    time.sleep(0.25)  # retry_interval
    assert redis.batch_exists(ks) == 0  # old blocks lost: a miss, never stale data
    assert redis.batch_put(ks[:2], vals[:2]) == [True, True]  # reconnected
    assert all(_same(g, v) for g, v in zip(redis.batch_get(ks[:2]), vals[:2], strict=True))


def test_redis_hung_server_times_out_to_a_miss(redis_server):
    redis = _redis(redis_server, socket_timeout=0.2)
    ks, vals = _keys(2), _rows(2)
    assert redis.batch_put(ks, vals) == [True, True]
    os.kill(redis_server.proc.pid, signal.SIGSTOP)  # hung / very slow server
    try:
        t0 = time.monotonic()
        assert redis.batch_get(ks) == [None, None]
        assert time.monotonic() - t0 < 2
        assert redis.batch_put(_keys(1, start=9), vals[:1]) == [False]  # marked down: at once
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    time.sleep(0.25)
    got = redis.batch_get(ks)
    assert all(_same(g, v) for g, v in zip(got, vals, strict=True))


def test_redis_never_up_is_a_miss():
    from prefixkv.paged.tiers import RedisTier

    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = RedisTier(port=port, connect_timeout=0.2, socket_timeout=0.2)
    assert t.batch_put(_keys(1), _rows(1)) == [False]
    assert t.batch_exists(_keys(1)) == 0 and t.batch_get(_keys(1)) == [None]
    assert not t.ping()


# -- disk ------------------------------------------------------------------------------------

def _file(d: DiskTier, k: BlockKey) -> str:
    return d.path(k)


@pytest.mark.parametrize("fault", ["flip-payload", "flip-header", "truncate", "empty",
                                   "garbage", "swapped"])
def test_disk_damaged_file_is_a_miss_and_removed(tmp_path, fault):
    d = DiskTier(tmp_path)
    ks, vals = _keys(2), _rows(2)
    d.batch_put(ks, vals)
    p = _file(d, ks[0])
    data = bytearray(Path(p).read_bytes())
    if fault == "flip-payload":
        data[-5] ^= 0x40
    elif fault == "flip-header":
        data[40] ^= 0x01
    elif fault == "truncate":
        data = data[: len(data) // 2]
    elif fault == "empty":
        data = bytearray()
    elif fault == "garbage":
        data = bytearray(os.urandom(len(data)))
    else:  # block 1's valid record under block 0's name
        data = bytearray(Path(_file(d, ks[1])).read_bytes())
    with open(p, "wb") as f:
        f.write(data)
    got = d.batch_get(ks)
    assert got[0] is None and _same(got[1], vals[1])
    assert d.stats.corrupt == 1 and not os.path.exists(p)
    assert d.batch_exists(ks) == 0  # the bad file is gone: a clean miss from now on
    assert d.batch_put(ks[:1], vals[:1]) == [True]  # and it can be stored again
    assert _same(d.batch_get(ks[:1])[0], vals[0])


def test_chain_serves_the_next_tier_when_disk_is_corrupt(tmp_path, redis_server):
    disk, redis = DiskTier(tmp_path), _redis(redis_server)
    store = TieredStore([disk, redis])
    ks, vals = _keys(3), _rows(3)
    store.batch_put(ks, vals)
    with open(disk.path(ks[1]), "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\xff" if f.read(1) != b"\xff" else b"\x00")
    got = store.batch_get(ks)
    assert all(_same(g, v) for g, v in zip(got, vals, strict=True))
    assert disk.stats.corrupt == 1 and disk.batch_exists(ks) == 3  # promoted back to disk


def test_disk_leftover_temp_files_are_ignored(tmp_path):
    d = DiskTier(tmp_path)
    d.batch_put(_keys(1), _rows(1))
    nsdir = os.path.dirname(d.path(_keys(1)[0]))
    with open(os.path.join(nsdir, ".tmp-crashed.part"), "wb") as f:
        f.write(b"half a record")
    d2 = DiskTier(tmp_path)
    assert len(d2._sizes) == 1 and d2.batch_exists(_keys(1)) == 1


def test_disk_unwritable_is_put_false(tmp_path):
    d = DiskTier(tmp_path)
    k = _keys(1)[0]
    with open(os.path.join(tmp_path, k.namespace.digest()), "wb") as f:
        f.write(b"a file where the namespace directory should be")
    assert d.batch_put([k], _rows(1)) == [False]
    assert d.stats.errors == 1 and d.batch_get([k]) == [None]


# -- host ------------------------------------------------------------------------------------

def test_host_budget_full_under_a_long_stream():
    rng = np.random.default_rng(7)
    row_bytes = np.zeros(ROW, np.float32).nbytes
    h = HostTier(5 * row_bytes + row_bytes // 2)
    stored = {}
    for step in range(60):
        n = int(rng.integers(1, 9))
        ks = _keys(n, start=int(rng.integers(0, 40)))
        vals = [np.full(ROW, int.from_bytes(k.block_hash, "big"), np.float32) for k in ks]
        res = h.batch_put(ks, vals)
        assert res[:5] == [True] * min(n, 5) and not any(res[5:])
        stored.update({k: v for k, v, ok in zip(ks, vals, res, strict=True) if ok})
        assert h.used_bytes <= h.budget_bytes and len(h) <= 5
        probe = list(stored)[-8:]
        for k, g in zip(probe, h.batch_get(probe), strict=True):
            assert g is None or _same(g, stored[k])  # a miss or the right block
        if step % 10 == 0:
            held = h.batch_get(probe[-1:])  # views held across later evictions
            keep = (held[0], stored[probe[-1]].copy()) if held[0] is not None else None
        if keep is not None:
            assert _same(*keep)
    assert h.stats.evictions > 0


def test_host_adopted_and_reused_memory_under_a_long_stream():
    """copy=False adoption, reserve()d buffers and copies of two block shapes under one budget:
    stored bytes are counted exactly, every block put in a batch is served back with its own
    value, no storage handed out aliases a stored block or a view a caller holds."""
    rng = np.random.default_rng(11)
    shapes = [ROW, (2, 3, 2, 5)]  # the same key under another shape replaces the stale entry
    row_bytes = np.zeros(ROW, np.float32).nbytes
    h = HostTier(4 * row_bytes + row_bytes // 3)
    held: list[tuple[np.ndarray, np.ndarray]] = []  # (view from batch_get, its bytes then)
    for step in range(300):
        which = int(rng.integers(0, 2))
        shape = shapes[which]
        ids = list(dict.fromkeys(int(i) for i in rng.integers(0, 12, int(rng.integers(1, 6)))))
        ks = [_keys(1, start=i)[0] for i in ids]
        # content-addressed: a key's value is a function of the key (and the block's shape)
        vals = [np.full(shape, 2 * i + which, np.float32) for i in ids]
        mode = rng.integers(0, 4)
        if mode == 0:
            res = h.batch_put(ks, vals)
        elif mode == 1:  # adopt arrays that own their memory
            res = h.batch_put(ks, vals, copy=False)
        elif mode == 2:  # adopt reserved storage (evicted blocks' arrays reused)
            bufs = h.reserve(len(ks), shape, "float32")
            for b in bufs:
                assert b.flags.writeable and b.shape == shape
                for e in h._entries.values():
                    assert not np.shares_memory(b, e.array)
                for view, _ in held:
                    assert not np.shares_memory(b, view)
            for b, v in zip(bufs, vals, strict=False):
                b[...] = v
            res = h.batch_put(ks[:len(bufs)], bufs, copy=False)
            vals, ks = bufs, ks[:len(bufs)]
        else:
            h.batch_remove(ks)
            res = [False] * len(ks)
        assert len(res) == len(ks)
        got = h.batch_get(ks, shape=shape)
        for k, v, ok, g in zip(ks, vals, res, got, strict=True):
            if ok:  # a block of this batch is never evicted by a later one of the same batch
                assert g is not None and _same(g, v), (step, k)
        assert h.used_bytes == sum(e.nbytes for e in h._entries.values())
        assert h.used_bytes <= h.budget_bytes
        if step % 7 == 0 and got and got[0] is not None:
            held = (held + [(got[0], got[0].copy())])[-3:]
        for view, then in held:
            assert _same(view, then)  # memory under a held view is never reused
    assert h.stats.evictions > 0 and h.stats.rejected >= 0


def test_offload_with_a_full_host_tier_keeps_lower_tiers(tmp_path):
    rng = np.random.default_rng(8)
    caches = [rng.standard_normal((16, 3, 2, 5)).astype(np.float32) for _ in range(4)]
    host = HostTier(2 * np.zeros(ROW, np.float32).nbytes)
    store = TieredStore([host, DiskTier(tmp_path)])
    off = BlockOffloader(store, _ns())
    hashes = [bytes([i]) * 32 for i in range(6)]
    assert off.offload(caches, np.arange(6, dtype=np.int32), hashes) == [True] * 6
    fresh = [np.zeros_like(c) for c in caches]
    fresh, n = off.onboard(fresh, np.arange(10, 16, dtype=np.int32), hashes)
    assert n == 6
    for c, f in zip(caches, fresh, strict=True):
        assert _same(f[10:16], c[0:6])


class _Misbehaving(Tier):
    """A tier that answers batch_get wrongly in one of several ways."""

    name = "misbehaving"

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def batch_exists(self, keys):
        return 0

    def batch_put(self, keys, values):
        return [True] * len(keys)

    def batch_get(self, keys, *, shape=None, dtype=None):
        n = len(keys)
        answers = {"short": lambda: [np.zeros(ROW, np.float32)] * (n - 1),
                   "tuple": lambda: tuple([np.zeros(ROW, np.float32)] * n),
                   "shape": lambda: [np.zeros((2, 3), np.float32)] * n,
                   "dtype": lambda: [np.zeros(ROW, np.float16)] * n,
                   "bytes": lambda: [np.zeros(ROW, np.float32).tobytes()] * n}
        if self.mode == "record":
            raise RecordError("checksum mismatch")  # a verification failure it let escape
        if self.mode == "oserror":
            raise OSError("device gone")
        return answers[self.mode]()


@pytest.mark.parametrize("mode", ["short", "tuple", "shape", "dtype", "bytes", "record",
                                  "oserror"])
def test_chain_never_serves_a_misbehaving_tiers_answer(mode):
    host = HostTier(1 << 20)
    store = TieredStore([_Misbehaving(mode), host], promote=False)
    ks = _keys(3)
    rows = _rows(3)
    assert host.batch_put(ks[:2], rows[:2]) == [True, True]
    got = store.batch_get(ks, shape=ROW, dtype="float32")
    assert _same(got[0], rows[0]) and _same(got[1], rows[1]) and got[2] is None
    assert store.stats.hits == 2 and store.stats.misses == 1
    if mode == "dtype":  # asked without dtype=: still only the key's namespace dtype
        got = TieredStore([_Misbehaving(mode)], promote=False).batch_get(ks, shape=ROW)
        assert got == [None] * 3


class _BadCount(HostTier):
    """A host tier whose batch_exists answers ``answer`` (or raises it) instead of a count,
    and whose batch_get may raise too."""

    name = "bad-count"

    def __init__(self, answer, get_raises=False):
        super().__init__(1 << 20)
        self.answer, self.get_raises = answer, get_raises

    def batch_exists(self, keys):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer if self.answer != "real" else super().batch_exists(keys)

    def batch_get(self, keys, *, shape=None, dtype=None):
        if self.get_raises:
            raise ConnectionError("down")
        return super().batch_get(keys, shape=shape, dtype=dtype)


@pytest.mark.parametrize("answer", [None, 1.5, True, -3, "3"])
def test_a_misbehaving_count_from_a_tier_is_a_miss(answer):
    """A tier's batch_exists answering something other than a count (None, a float, a bool,
    a negative number, a str): the chain takes it as holding nothing (it had raised TypeError
    out of batch_exists and BlockOffloader.onboard_request), and the next tier still
    answers."""
    host = HostTier(1 << 20)
    ks, rows = _keys(3), _rows(3)
    assert host.batch_put(ks, rows) == [True] * 3
    assert TieredStore([_BadCount(answer)]).batch_exists(ks) == 0
    assert TieredStore([_BadCount(answer), host]).batch_exists(ks) == 3
    off = BlockOffloader(TieredStore([_BadCount(answer)]), _ns())
    caches = [np.zeros((6, *ROW[1:]), np.float32) for _ in range(ROW[0])]
    assert off.fetch([k.block_hash for k in ks], ROW, "float32") == []
    assert off.onboard(caches, np.arange(3, dtype=np.int32),
                       [k.block_hash for k in ks])[1] == 0


@pytest.mark.parametrize("fault", ["exists raises", "get raises"])
def test_a_lone_tier_that_raises_is_an_onboard_miss(fault):
    """An offloader over one tier (no TieredStore to guard it) whose calls raise, breaking the
    Tier contract: onboard_request is a miss, counted in onboard_errors, the request as it
    was; it had raised the tier's ConnectionError into the engine's step."""
    from prefixkv.paged import PrefixCache

    tier = _BadCount(ConnectionError("down") if fault == "exists raises" else "real",
                     get_raises=fault == "get raises")
    off = BlockOffloader(tier, _ns())
    caches = [np.zeros((8, *ROW[1:]), np.float32) for _ in range(ROW[0])]
    pc = PrefixCache(8, ROW[1])
    tokens = list(range(3 * ROW[1] + 1))
    pc.add_request("r", tokens)
    hashes = pc.request_hashes("r")[:3]
    assert HostTier.batch_put(tier, off.keys(hashes, _ns()), _rows(3)) == [True] * 3
    with pytest.warns(RuntimeWarning, match="onboard failed"):
        got, n = off.onboard_request(pc, "r", caches)
    assert n == 0 and got is caches and off.onboard_errors == 1
    assert isinstance(off.last_error, ConnectionError)
    assert pc.num_computed("r") == 0 and pc.blocks("r") == []
    pc.pool.check_consistency()


def test_chain_raises_a_callers_bad_input_instead_of_counting_a_tier_fault():
    """A put whose value has another dtype than its key's namespace is the caller's bug: it
    raises ValueError, it is not a tier fault swallowed into [False]."""
    store = TieredStore([HostTier(1 << 20)])
    with pytest.raises(ValueError, match="dtype"):
        store.batch_put(_keys(1), [np.zeros(ROW, np.float16)])
    assert store.stats.errors == 0


def test_random_faults_never_serve_a_wrong_block(tmp_path, redis_server):
    """A random stream of puts/gets/removes over host -> disk -> Redis while disk files are
    corrupted, truncated or swapped and Redis is killed and restarted: every get is either
    a miss or exactly the block of that key."""
    rng = np.random.default_rng(11)
    row_bytes = np.zeros(ROW, np.float32).nbytes
    host, disk = HostTier(4 * row_bytes), DiskTier(tmp_path, budget_bytes=20 * row_bytes)
    redis = _redis(redis_server, retry_interval=0.05)
    store = TieredStore([host, disk, redis])
    salts = [None, "x"]

    def key(i, s):
        return BlockKey(i.to_bytes(2, "big"), _ns(salt=salts[s]))

    def value(k):  # the one right content of each key
        seed = int.from_bytes(k.block_hash, "big") * 7 + len(k.namespace.salt)
        return np.random.default_rng(seed).standard_normal(ROW).astype(np.float32)

    served = 0
    for step in range(150):
        ks = list(dict.fromkeys(key(int(rng.integers(0, 30)), int(rng.integers(0, 2)))
                                for _ in range(int(rng.integers(1, 6)))))
        op = rng.random()
        if op < 0.4:
            store.batch_put(ks, [value(k) for k in ks])
        elif op < 0.8:
            got = store.batch_get(ks, shape=ROW, dtype="float32")
            for k, g in zip(ks, got, strict=True):
                if g is not None:
                    assert _same(g, value(k)), (step, k)
                    served += 1
            n = store.batch_exists(ks)
            assert 0 <= n <= len(ks)
        elif op < 0.85:
            store.batch_remove(ks)
        else:
            files = [p for p in disk._sizes if os.path.exists(p)]
            if files:
                p = files[int(rng.integers(0, len(files)))]
                fault = int(rng.integers(0, 3))
                if fault == 0:
                    with open(p, "r+b") as f:
                        f.truncate(max(1, os.path.getsize(p) // 3))
                elif fault == 1:
                    with open(p, "r+b") as f:
                        f.seek(int(rng.integers(0, os.path.getsize(p))))
                        f.write(os.urandom(3))
                else:
                    other = files[int(rng.integers(0, len(files)))]
                    Path(p).write_bytes(Path(other).read_bytes())
            host.clear()  # force lookups down to disk / Redis
        if step == 60:
            redis_server.stop()
        if step == 100:
            redis_server.start()
    assert served > 20
