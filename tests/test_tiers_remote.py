"""Remote tiers against real servers on 127.0.0.1: Redis (a private redis-server started here)
and NIXL (two UCX agents in this process, DRAM to DRAM); salt isolation in every tier."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from prefixkv.paged.tiers import BlockKey, DiskTier, HostTier, Namespace, TieredStore
from tier_helpers import ROW, redis_server_or_skip
from tier_helpers import keys as _keys
from tier_helpers import ns as _ns
from tier_helpers import rows as _rows
from tier_helpers import same as _same

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ["float32", "float16", "bfloat16"]


@pytest.fixture(scope="module")
def redis_server():
    srv = redis_server_or_skip()
    yield srv
    srv.stop()


@pytest.fixture()
def redis_tier(redis_server, request):
    from prefixkv.paged.tiers import RedisTier

    t = RedisTier(port=redis_server.port, prefix=f"t-{request.node.name}:", max_batch=3)
    t.clear()
    yield t
    t.clear()
    t.close()


@pytest.fixture(scope="module")
def nixl_peer():
    pytest.importorskip("nixl", reason="nixl not installed (pip install --no-deps nixl nixl-cu12)")
    from prefixkv.paged.tiers import NixlPeer

    peer = NixlPeer(num_slots=16, slot_bytes=4096)
    yield peer
    peer.close()


@pytest.fixture()
def nixl_tier(nixl_peer):
    from prefixkv.paged.tiers import NixlTier

    t = NixlTier(nixl_peer, staging_slots=4)
    yield t
    t.close()


# -- Redis -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_redis_round_trip_pipelined(redis_tier, dtype):
    ns = _ns(dtype)
    ks, vals = _keys(7, ns), _rows(7, dtype)  # 7 keys over max_batch=3: three round trips
    assert redis_tier.batch_exists(ks) == 0
    assert redis_tier.batch_put(ks, vals) == [True] * 7
    assert redis_tier.batch_exists(ks) == 7
    assert redis_tier.batch_exists([ks[0], _keys(1, ns, 99)[0], ks[1]]) == 1
    got = redis_tier.batch_get(ks, shape=ROW, dtype=dtype)
    assert all(_same(g, v) for g, v in zip(got, vals, strict=True))
    assert redis_tier.batch_get(ks[:1], shape=(1,)) == [None]
    assert redis_tier.batch_remove(ks[:2]) == 2 and redis_tier.batch_exists(ks) == 0


def test_redis_rejects_a_foreign_or_tampered_value(redis_tier):
    ks, vals = _keys(2), _rows(2)
    redis_tier.batch_put(ks, vals)
    c = redis_tier.client
    # A value copied under another key name is refused: the record names its key.
    c.set(redis_tier._rkey(ks[1]), c.get(redis_tier._rkey(ks[0])))
    raw = bytearray(c.get(redis_tier._rkey(ks[0])))
    raw[-1] ^= 1
    c.set(redis_tier._rkey(ks[0]), bytes(raw))
    assert redis_tier.batch_get(ks) == [None, None]
    assert redis_tier.stats.corrupt == 2


def test_redis_ttl(redis_server):
    from prefixkv.paged.tiers import RedisTier

    t = RedisTier(port=redis_server.port, prefix="ttl:", ttl_s=30)
    t.batch_put(_keys(1), _rows(1))
    assert 0 < t.client.pttl(t._rkey(_keys(1)[0])) <= 30_000
    t.clear()


def test_redis_bad_dtype_stores_nothing(redis_tier):
    from prefixkv.paged.events import EventLog

    log = EventLog()
    redis_tier.events.subscribe(log)
    ks = _keys(3)
    vals = _rows(2) + _rows(1, "float16")
    with pytest.raises(ValueError, match=r"values\[2\]: dtype float16 does not match the key's "
                                         "namespace dtype float32"):
        redis_tier.batch_put(ks, vals)
    assert redis_tier.batch_exists(ks) == 0 and log.events == []
    assert redis_tier.stats.puts == 0 and redis_tier.stats.bytes_written == 0


def test_redis_repeated_key_in_one_batch_is_stored_once(redis_tier):
    from prefixkv.paged.events import EventLog
    from prefixkv.paged.tiers.base import record_bytes

    log = EventLog()
    redis_tier.events.subscribe(log)
    a, b, c = _keys(3)
    va, vb, vc, va2 = _rows(4)
    # max_batch=3: the repeat of `a` would land in the second pipeline
    assert redis_tier.batch_put([a, b, c, a], [va, vb, vc, va2]) == [True] * 4
    assert redis_tier.stats.puts == 3 and redis_tier.stats.rejected == 0
    assert redis_tier.stats.bytes_written == sum(
        len(record_bytes(k, v, checksum_alg=redis_tier.checksum))
        for k, v in ((a, va), (b, vb), (c, vc)))
    hashes = [h for e in log.events if e.kind == "stored" for h in e.block_hashes]
    assert hashes == [a.block_hash, b.block_hash, c.block_hash]
    got = redis_tier.batch_get([a, b, c], shape=ROW)
    assert all(_same(g, v) for g, v in zip(got, [va, vb, vc], strict=True))  # the first value


class _FailingPipelines:
    """A redis client whose pipelines fail (connection error) after the first ``n``."""

    def __init__(self, client, n):
        self._client, self._n = client, n

    def pipeline(self, **kw):
        import redis

        if self._n == 0:
            raise redis.exceptions.ConnectionError("injected: server gone")
        self._n -= 1
        return self._client.pipeline(**kw)

    def __getattr__(self, name):
        return getattr(self._client, name)


def test_redis_server_fault_midway_repeats_report_the_stored_result(redis_server):
    from prefixkv.paged.events import EventLog
    from prefixkv.paged.tiers import RedisTier

    t = RedisTier(port=redis_server.port, prefix="t-fault-midway:", max_batch=2)
    t.clear()
    real = t.client
    t.client = _FailingPipelines(real, 1)
    log = EventLog()
    t.events.subscribe(log)
    a, b, c, d = _keys(4)
    try:
        # [a, b] goes through, the next pipeline fails: a miss, never an exception
        assert t.batch_put([a, b, a, c, d], _rows(5)) == [True, True, True, False, False]
        assert t.stats.errors == 1 and t.stats.puts == 2 and t.stats.rejected == 2
        assert [e.block_hashes for e in log.events] == [(a.block_hash, b.block_hash)]
        # marked down: the next put answers False at once, repeats included
        assert t.batch_put([d, d], _rows(2)) == [False, False] and t.stats.rejected == 3
        t.client = real
        assert t.batch_exists([a, b]) == 0  # still marked down: a miss
    finally:
        t.client = real
        t._down_until = 0.0
        t.clear()
        t.close()


def test_redis_server_down_repeated_keys_are_misses_and_bad_dtype_still_raises():
    from prefixkv.paged.tiers import LocalRedisServer, RedisTier

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    srv = LocalRedisServer()  # a free port, never started: connection refused
    t = RedisTier(port=srv.port, prefix="down:")
    a, b = _keys(2)
    assert t.batch_put([a, b, a], _rows(3)) == [False] * 3
    assert t.stats.errors == 1 and t.stats.rejected == 2 and t.stats.puts == 0
    with pytest.raises(ValueError, match=r"values\[1\]: dtype float16"):
        t.batch_put([a, b], _rows(1) + _rows(1, "float16"))  # a caller error, not a fault
    t.close()


def test_redis_refused_set_is_false_for_that_key_only(redis_server):
    # one SET refused at maxmemory (OOM, noeviction) made pipe.execute() raise: the whole
    # chunk reported False though earlier SETs were stored, and a healthy server was marked
    # down
    from prefixkv.paged.events import EventLog
    from prefixkv.paged.tiers import RedisTier

    t = RedisTier(port=redis_server.port, prefix="oom:", max_batch=64, retry_interval=60.0)
    c = t.client
    log = EventLog()
    t.events.subscribe(log)
    ks, vals = _keys(8), _rows(8, shape=(64, 64, 16))  # 256 KiB rows
    try:
        c.config_set("maxmemory-policy", "noeviction")
        c.config_set("maxmemory", str(c.info("memory")["used_memory"] + 900 * 1024))
        res = t.batch_put(ks, vals)
        assert res == [bool(c.exists(t._rkey(k))) for k in ks]
        assert 0 < sum(res) < len(ks) and res == sorted(res, reverse=True)
        assert t.available and t.stats.errors == 0
        assert t.stats.puts == sum(res) and t.stats.rejected == len(ks) - sum(res)
        assert [e.block_hashes for e in log.events if e.kind == "stored"] == [
            tuple(k.block_hash for k, r in zip(ks, res, strict=True) if r)]
        got = t.batch_get(ks[:1])
        assert _same(got[0], vals[0])
    finally:
        c.config_set("maxmemory", "0")
        t.clear()
        t.close()


def test_redis_record_failing_verification_is_deleted(redis_tier):
    # such records were kept: batch_exists counted them for good
    from prefixkv.paged.events import EventLog
    from prefixkv.paged.tiers.base import record_bytes

    log = EventLog()
    redis_tier.events.subscribe(log)
    ks, vals = _keys(3), _rows(3)
    c = redis_tier.client
    c.set(redis_tier._rkey(ks[0]), b"x" * 100)  # garbage
    c.set(redis_tier._rkey(ks[1]), record_bytes(_keys(1, _ns(salt="x"))[0], vals[1]))  # other key
    c.set(redis_tier._rkey(ks[2]), record_bytes(ks[2], vals[2].reshape(2, 2, 3, 2, 5)))
    assert redis_tier.batch_get(ks, shape=ROW) == [None] * 3
    assert redis_tier.stats.corrupt == 3
    assert [c.exists(redis_tier._rkey(k)) for k in ks] == [0, 0, 1]  # another layout: kept
    assert [(e.kind, e.block_hashes) for e in log.events] == [
        ("removed", (ks[0].block_hash, ks[1].block_hash))]
    assert redis_tier.batch_exists(ks[2:]) == 1 and redis_tier.batch_exists(ks) == 0
    assert redis_tier.batch_put(ks[:2], vals[:2]) == [True, True]
    got = redis_tier.batch_get(ks[:2], shape=ROW)
    assert all(_same(g, v) for g, v in zip(got, vals[:2], strict=True))


def test_redis_import_error_names_the_extra(monkeypatch):
    import builtins

    from prefixkv.paged.tiers import redis as redis_tier_mod

    real = builtins.__import__

    def fake(name, *a, **kw):
        if name == "redis" or name.startswith("redis."):
            raise ImportError("no redis")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match=r"prefixkv\[remote\]"):
        redis_tier_mod.RedisTier(port=1)


# -- NIXL ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_nixl_round_trip(nixl_tier, dtype):
    ns = _ns(dtype)
    ks, vals = _keys(6, ns), _rows(6, dtype, seed=1)  # 6 over 4 staging slots: 2 transfers
    assert nixl_tier.batch_put(ks, vals) == [True] * 6
    assert nixl_tier.batch_exists(ks) == 6
    got = nixl_tier.batch_get(ks, shape=ROW, dtype=dtype)
    assert all(_same(g, v) for g, v in zip(got, vals, strict=True))
    assert nixl_tier.stats.bytes_read > 0 and nixl_tier.stats.errors == 0


def test_nixl_slot_lru_and_oversize(nixl_tier):
    vals = _rows(20, seed=2)
    ks = _keys(20)
    assert nixl_tier.batch_put(ks[:16], vals[:16]) == [True] * 16
    nixl_tier.batch_get([ks[0]])  # touch
    assert nixl_tier.batch_put(ks[16:18], vals[16:18]) == [True, True]  # evicts 1, 2
    assert [nixl_tier.batch_exists([k]) for k in ks[:3]] == [1, 0, 0]
    got = nixl_tier.batch_get([ks[0], ks[17]])
    assert _same(got[0], vals[0]) and _same(got[1], vals[17])
    big = np.zeros((64, 64), np.float32)  # 16 KiB > 4 KiB slot
    assert nixl_tier.batch_put(_keys(1, start=50), [big]) == [False]


def test_nixl_put_over_the_slots_refuses_in_constant_time(nixl_tier):
    """64 blocks into the peer's 16 slots in one put: the first 16 stored (a put never evicts
    its own blocks), each further block refused without a scan of the index (it read every
    entry per block: 16 x 48 here, n*n for a big peer)."""
    from collections import OrderedDict

    class Counting(OrderedDict):
        read = 0

        def __iter__(self):
            for k in super().__iter__():
                Counting.read += 1
                yield k

        def items(self):
            for k, v in super().items():
                Counting.read += 1
                yield k, v

    nixl_tier._index = Counting(nixl_tier._index)
    assert nixl_tier.batch_put(_keys(64), _rows(64, seed=3)) == [True] * 16 + [False] * 48
    assert Counting.read <= 64, Counting.read
    assert nixl_tier.stats.rejected == 48 and nixl_tier.stats.evictions == 0


def test_nixl_corrupt_remote_slot_is_a_miss(nixl_peer, nixl_tier):
    ks, vals = _keys(2, start=200), _rows(2, seed=3)
    assert nixl_tier.batch_put(ks, vals) == [True, True]
    slot = nixl_tier._index[ks[0].storage_key()][1]
    nixl_peer.slot(slot)[200] ^= 0xFF  # bit rot / overwrite on the peer
    got = nixl_tier.batch_get(ks)
    assert got[0] is None and _same(got[1], vals[1])
    assert nixl_tier.stats.corrupt == 1


def test_nixl_peer_gone_is_a_miss(nixl_peer):
    from prefixkv.paged.tiers import NixlTier

    t = NixlTier(nixl_peer, staging_slots=2, timeout_s=1.0)
    ks, vals = _keys(1, start=300), _rows(1, seed=4)
    assert t.batch_put(ks, vals) == [True]
    t.agent.remove_remote_agent(t._remote)  # connection to the peer dropped
    assert t.batch_get(ks) == [None]
    assert t.batch_put(_keys(1, start=301), vals) == [False]
    assert t.stats.errors >= 2



def test_nixl_corrupt_slot_is_dropped_and_a_reput_rewrites_it(nixl_peer, nixl_tier):
    # a record failing verification stayed indexed: batch_exists counted it and a re-put
    # answered True without writing, so the block stayed a miss for good
    from prefixkv.paged.events import EventLog

    log = EventLog()
    nixl_tier.events.subscribe(log)
    ks, vals = _keys(2, start=220), _rows(2, seed=5)
    assert nixl_tier.batch_put(ks, vals) == [True, True]
    free_before = len(nixl_tier._free)
    assert nixl_tier.batch_get(ks[1:], shape=(2, *ROW)) == [None]  # another layout: kept
    assert nixl_tier.batch_exists(ks[1:]) == 1
    slot = nixl_tier._index[ks[0].storage_key()][1]
    nixl_peer.slot(slot)[200] ^= 0xFF
    assert nixl_tier.batch_get([ks[0], ks[0]]) == [None, None]  # repeated: dropped once
    assert nixl_tier.batch_exists(ks) == 0 and len(nixl_tier._free) == free_before + 1
    assert [(e.kind, e.block_hashes) for e in log.events][-1] == ("removed", (ks[0].block_hash,))
    assert nixl_tier.batch_put(ks, vals) == [True, True]
    got = nixl_tier.batch_get(ks)
    assert all(_same(g, v) for g, v in zip(got, vals, strict=True))


@pytest.mark.parametrize("byte", [4, 6], ids=["version", "checksum-algorithm"])
def test_nixl_slot_with_a_flipped_version_or_algorithm_is_dropped(nixl_peer, nixl_tier, byte):
    """A flipped byte in a slot's format version or checksum algorithm read as a record of
    another release, kept: the key stayed indexed, a re-put answered True without writing,
    and it missed for good. A slot is this tier's own: such a record is corrupt."""
    ks, vals = _keys(1, start=260 + byte), _rows(1, seed=7)
    assert nixl_tier.batch_put(ks, vals) == [True]
    slot = nixl_tier._index[ks[0].storage_key()][1]
    nixl_peer.slot(slot)[byte] ^= 0xFF
    corrupt = nixl_tier.stats.corrupt
    assert nixl_tier.batch_get(ks) == [None]
    assert nixl_tier.stats.corrupt == corrupt + 1 and nixl_tier.batch_exists(ks) == 0
    assert nixl_tier.batch_put(ks, vals) == [True]
    assert _same(nixl_tier.batch_get(ks)[0], vals[0])


def test_nixl_bad_peer_arguments_are_named(nixl_peer):
    from prefixkv.paged.tiers import NixlPeer, NixlTier

    for bad, error, match in [(2.9, TypeError, "num_slots: expected an int"),
                              (True, TypeError, "num_slots: expected an int"),
                              ("x", TypeError, "num_slots: expected an int"),
                              (0, ValueError, "num_slots: expected an int >= 1")]:
        with pytest.raises(error, match=match):
            NixlPeer(bad, 4096)
    with pytest.raises(TypeError, match="slot_bytes: expected an int"):
        NixlPeer(4, 4096.0)
    desc = nixl_peer.descriptor()
    with pytest.raises(TypeError, match="peer: expected a NixlPeer or its descriptor"):
        NixlTier(5)
    with pytest.raises(ValueError, match="peer: a descriptor.* missing name, metadata"):
        NixlTier({})
    with pytest.raises(ValueError, match=r"peer\['num_slots'\]: expected an int >= 1"):
        NixlTier({**desc, "num_slots": 0})


def test_nixl_closed_tier_answers_miss_false_and_zero(nixl_peer):
    # close() kept the index: batch_exists counted the keys and batch_put reported True
    # without a transfer, while batch_get missed
    from prefixkv.paged.tiers import NixlTier

    t = NixlTier(nixl_peer, staging_slots=4)
    ks, vals = _keys(3, start=240), _rows(3, seed=6)
    assert t.batch_put(ks, vals) == [True] * 3
    t.close()
    assert t.batch_exists(ks) == 0
    assert t.batch_get(ks) == [None] * 3
    assert t.batch_put(ks, vals) == [False] * 3
    assert t.batch_put(_keys(1, start=250), vals[:1]) == [False]
    assert t.batch_remove(ks) == 0
    t.clear()
    t.close()  # twice is fine
    assert t.stats.puts == 3 and t.stats.rejected == 4


def _os_threads() -> int:
    return len(list(Path("/proc/self/task").iterdir()))


def test_nixl_close_releases_the_agent_while_the_tier_is_referenced():
    # close() kept the agent: a closed tier still referenced (by a closed TieredStore, an
    # offloader) kept its UCX progress thread and sockets for the life of the process
    pytest.importorskip("nixl", reason="nixl not installed (pip install --no-deps nixl nixl-cu12)")
    from prefixkv.paged.tiers import NixlPeer, NixlTier

    peer = NixlPeer(num_slots=4, slot_bytes=4096)
    before = _os_threads()
    tiers = [NixlTier(peer, staging_slots=2) for _ in range(3)]
    store = TieredStore([HostTier(1 << 16), *tiers])
    grown = _os_threads()
    assert grown > before  # each agent runs a progress thread
    store.close()
    assert all(t.agent is None for t in tiers)
    deadline = time.monotonic() + 5
    while _os_threads() >= grown and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _os_threads() < grown, "closed tiers (still referenced) kept their agents' threads"
    assert tiers[0].batch_get(_keys(1)) == [None]  # a closed tier: a miss, not an error
    peer.close()
    peer.close()  # twice is fine
    with pytest.raises(RuntimeError, match="NixlPeer: closed"):
        peer.descriptor()

# -- isolation across salts, every tier ------------------------------------------------------

@pytest.fixture(params=["host", "disk", "redis", "nixl", "chain"])
def any_tier(request, tmp_path):
    kind = request.param
    if kind == "host":
        return HostTier(1 << 20)
    if kind == "disk":
        return DiskTier(tmp_path)
    if kind == "redis":
        return request.getfixturevalue("redis_tier")
    if kind == "nixl":
        return request.getfixturevalue("nixl_tier")
    return TieredStore([HostTier(1 << 20), DiskTier(tmp_path)])


def test_equal_hashes_under_different_salts_never_collide(any_tier):
    salts = [None, "a", "b", b"a\0", "tenant-1"]
    hashes = [bytes([i]) * 32 for i in range(3)]
    for j, salt in enumerate(salts):
        ks = [BlockKey(h, _ns(salt=salt)) for h in hashes]
        vals = [np.full(ROW, 10 * j + i, np.float32) for i in range(3)]
        assert all(any_tier.batch_put(ks, vals))
    for j, salt in enumerate(salts):
        ks = [BlockKey(h, _ns(salt=salt)) for h in hashes]
        got = any_tier.batch_get(ks)
        assert all(_same(g, np.full(ROW, 10 * j + i, np.float32)) for i, g in enumerate(got))
    other = [BlockKey(h, _ns(salt="never-stored")) for h in hashes]
    assert any_tier.batch_exists(other) == 0 and any_tier.batch_get(other) == [None] * 3
    # same hash and salt, other model / rank: no hit either
    assert any_tier.batch_exists([BlockKey(hashes[0], Namespace("other", dtype="float32"))]) == 0


def test_remote_tiers_publish_events(redis_tier, nixl_peer):
    from prefixkv.paged.events import EventLog
    from prefixkv.paged.tiers import NixlTier

    nixl = NixlTier(nixl_peer, staging_slots=4)
    try:
        for tier in (redis_tier, nixl):
            log = EventLog()
            tier.events.subscribe(log)
            ks = [BlockKey(b"h1", _ns(salt="s")), BlockKey(b"h2", _ns(salt="s"))]
            tier.batch_put(ks, _rows(2))
            tier.batch_remove(ks[:1])
            assert [(e.kind, e.tier, e.namespace, e.block_hashes) for e in log.events] == [
                ("stored", tier.name, b"s", (b"h1", b"h2")),
                ("removed", tier.name, b"s", (b"h1",))]
    finally:
        nixl.close()


_PEER_PROCESS = r"""
import pickle, sys
from prefixkv.paged.tiers import NixlPeer
peer = NixlPeer(num_slots=8, slot_bytes=4096)
sys.stdout.write("DESC:" + pickle.dumps(peer.descriptor()).hex() + "\n")
sys.stdout.flush()
sys.stdin.read()  # serve (passively: one-sided transfers) until stdin closes
peer.close()
"""


def test_nixl_peer_in_another_process_then_killed():
    pytest.importorskip("nixl", reason="nixl not installed (pip install --no-deps nixl nixl-cu12)")
    import pickle
    import sys

    from prefixkv.paged.tiers import NixlTier

    proc = subprocess.Popen([sys.executable, "-c", _PEER_PROCESS], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        desc = None
        for line in proc.stdout:  # NIXL logs on stdout too: find our line
            if line.startswith("DESC:"):
                desc = pickle.loads(bytes.fromhex(line[5:].strip()))
                break
        assert desc is not None, "peer process did not start"
        tier = NixlTier(desc, staging_slots=4, timeout_s=5)
        ks, vals = _keys(3, start=400), _rows(3, seed=5)
        assert tier.batch_put(ks, vals) == [True] * 3
        got = tier.batch_get(ks)
        assert all(_same(g, v) for g, v in zip(got, vals, strict=True))
        proc.kill()
        proc.wait(timeout=10)
        t0 = time.monotonic()
        assert tier.batch_get(ks) == [None] * 3  # peer gone: a miss, no exception
        assert time.monotonic() - t0 < 5
        assert tier.batch_put(_keys(1, start=410), vals[:1]) == [False]
        tier.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_redis_closed_tier_answers_miss_false_and_zero(redis_server):
    # redis-py reconnects on the next call: a closed tier had gone on storing and serving
    from prefixkv.paged.events import EventLog
    from prefixkv.paged.tiers import RedisTier

    t = RedisTier(port=redis_server.port, prefix="t-closed:")
    other = RedisTier(port=redis_server.port, prefix="t-closed:")
    log = EventLog()
    t.events.subscribe(log)
    ks, vals = _keys(3, start=260), _rows(3, seed=7)
    try:
        assert t.batch_put(ks[:2], vals[:2]) == [True, True]
        t.close()
        assert not t.available and not t.ping()
        assert t.batch_exists(ks) == 0 and t.batch_get(ks) == [None] * 3
        assert t.batch_put(ks[2:], vals[2:]) == [False]
        assert t.batch_remove(ks) == 0
        t.clear()
        t.close()  # twice is fine
        assert [e.kind for e in log.events] == ["stored"]  # the records stay on the server
        assert other.batch_exists(ks) == 2  # for other clients, and nothing more came
    finally:
        other.clear()
        other.close()


def test_nixl_close_publishes_cleared_once_when_it_held_blocks(nixl_peer):
    # the index goes with close(): subscribers tracking where blocks live had kept them
    from prefixkv.paged.events import EventLog
    from prefixkv.paged.tiers import NixlTier

    for held in (True, False):
        t = NixlTier(nixl_peer, staging_slots=4)
        log = EventLog()
        t.events.subscribe(log)
        if held:
            assert t.batch_put(_keys(2, start=270), _rows(2, seed=8)) == [True, True]
        t.close()
        t.close()
        kinds = [e.kind for e in log.events]
        assert kinds == (["stored", "cleared"] if held else []), kinds
