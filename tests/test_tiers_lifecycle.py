"""What a tier leaves behind over a long run (a soak audit's finds): DiskTier removes a
namespace directory once its last file goes (eviction, batch_remove, clear) and the empty ones
its start-up scan finds, and a writer whose directory is removed meanwhile makes it again; with
per-tenant salts they were left behind, one per salt ever seen. RedisTier.clear() while the
server is marked down is tried (it had returned without doing anything, not even an event)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest
from prefixkv.paged.events import EventLog
from prefixkv.paged.tiers import DiskTier
from tier_helpers import keys, ns, redis_server_or_skip, rows, same


def _dirs(root) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=False))


def _salted(n, start=0):
    """One key (and row) under each of ``n`` tenant salts."""
    ks = [k for i in range(start, start + n) for k in keys(1, ns(salt=f"user-{i}"), start=i)]
    return ks, rows(n, seed=start)


def _record_size(tmp_path) -> int:
    t = DiskTier(tmp_path / "size")
    t.batch_put(keys(1), rows(1))
    return t.used_bytes


# -- disk --------------------------------------------------------------------------------------

def test_disk_eviction_removes_the_emptied_namespace_dirs(tmp_path):
    size = _record_size(tmp_path)
    t = DiskTier(tmp_path / "root", budget_bytes=3 * size)
    ks, vals = _salted(40)
    for k, v in zip(ks, vals, strict=True):
        assert t.batch_put([k], [v]) == [True]
    held = len(t._sizes)  # records differ in size by their salt's length: 2 or 3 fit
    assert held in (2, 3) and t.stats.evictions == 40 - held
    # one directory per namespace still holding a file: the newest, not all 40
    assert _dirs(t.root) == sorted(k.namespace.digest() for k in ks[-held:])
    assert all(same(g, v) for g, v in zip(t.batch_get(ks[-held:]), vals[-held:], strict=True))


def test_disk_batch_remove_removes_a_namespace_dir_once_empty(tmp_path):
    t = DiskTier(tmp_path)
    a, b = ns(salt="a"), ns(salt="b")
    ka, kb = keys(2, a), keys(2, b)
    assert t.batch_put(ka + kb, rows(4)) == [True] * 4
    assert _dirs(tmp_path) == sorted([a.digest(), b.digest()])
    assert t.batch_remove(ka[:1] + kb) == 3
    assert _dirs(tmp_path) == [a.digest()]  # b's last file went; a still holds one
    assert t.batch_remove(ka) == 1
    assert _dirs(tmp_path) == []
    assert t.batch_put(ka, rows(2)) == [True, True]  # made again on the next put
    assert _dirs(tmp_path) == [a.digest()]


def test_disk_clear_removes_the_namespace_dirs_and_nothing_else(tmp_path):
    ks, vals = _salted(6)
    t = DiskTier(tmp_path)
    assert t.batch_put(ks, vals) == [True] * 6
    other = tmp_path / "not-a-namespace"  # block files found there are indexed, and cleared,
    other.mkdir()                         # but the directory is not this tier's to remove
    os.replace(t.path(ks[0]), other / "x.kvb")
    log = EventLog()
    t2 = DiskTier(tmp_path)
    t2.events.subscribe(log)
    assert len(t2._sizes) == 6
    t2.clear()
    assert t2.used_bytes == 0 and [e.kind for e in log.events] == ["cleared"]
    assert _dirs(tmp_path) == ["not-a-namespace"] and not os.listdir(other)


def test_disk_scan_removes_empty_namespace_dirs_only(tmp_path):
    kept_block = keys(1, ns(salt="kept"))
    DiskTier(tmp_path).batch_put(kept_block, rows(1))
    empties = [f"{i:032x}" for i in range(50)]
    for name in empties:
        (tmp_path / name).mkdir()
    stale = tmp_path / ("e" * 32)  # only a temporary file of a writer killed long ago
    stale.mkdir()
    part = stale / ".tmp-dead.part"
    part.write_bytes(b"x")
    old = time.time() - 2 * 3600
    os.utime(part, (old, old))
    fresh = tmp_path / ("f" * 32)  # a live writer's temporary file: the directory stays
    fresh.mkdir()
    (fresh / ".tmp-live.part").write_bytes(b"x")
    for name in ("not-a-namespace", "A" * 32, "0" * 31, "g" * 32):  # not this layout's names
        (tmp_path / name).mkdir()
    outside = tmp_path.parent / f"{tmp_path.name}-outside"  # an empty directory elsewhere,
    outside.mkdir()                                        # linked under a namespace's name
    (tmp_path / ("c" * 32)).symlink_to(outside, target_is_directory=True)
    t = DiskTier(tmp_path)
    assert len(t._sizes) == 1 and t.stats.errors == 0
    assert _dirs(tmp_path) == sorted([kept_block[0].namespace.digest(), "f" * 32,
                                      "not-a-namespace", "A" * 32, "0" * 31, "g" * 32])
    assert os.path.islink(tmp_path / ("c" * 32)) and outside.is_dir()
    assert same(t.batch_get(kept_block)[0], rows(1)[0])


def test_disk_write_makes_its_dir_again_when_removed_meanwhile(tmp_path, monkeypatch):
    # another process (or thread) evicted the last file of this namespace and removed its
    # directory between this writer's makedirs and mkstemp: the put had failed (an error)
    t = DiskTier(tmp_path)
    ks, vals = keys(2, ns(salt="race")), rows(2)
    d = os.path.dirname(t.path(ks[0]))
    real = tempfile.mkstemp
    raced = []

    def mkstemp(*args, dir=None, **kw):
        if dir == d and not raced:
            raced.append(dir)
            os.rmdir(dir)  # empty: the other process's _prune
        return real(*args, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    assert t.batch_put(ks, vals) == [True, True]
    assert raced == [d] and t.stats.errors == 0 and t.stats.puts == 2
    assert all(same(g, v) for g, v in zip(t.batch_get(ks), vals, strict=True))
    assert [n for n in os.listdir(d) if n.endswith(".part")] == []


# -- redis -------------------------------------------------------------------------------------

def test_redis_clear_while_marked_down_clears():
    pytest.importorskip("redis")
    from prefixkv.paged.tiers import RedisTier

    srv = redis_server_or_skip()  # private: stopped and started again below
    try:
        t = RedisTier(port=srv.port, prefix="lifecycle-down:", retry_interval=60.0,
                      connect_timeout=0.3, socket_timeout=0.3)
        log = EventLog()
        t.events.subscribe(log)
        ks, vals = keys(3, start=300), rows(3)
        srv.stop()
        assert t.batch_exists(ks) == 0 and not t.available and t.stats.errors == 1
        srv.start()  # back on the same port, within the tier's back-off
        other = RedisTier(port=srv.port, prefix="lifecycle-down:")
        assert other.batch_put(ks, vals) == [True] * 3
        t.clear()  # an operator's request: not dropped for the back-off
        assert other.batch_exists(ks) == 0
        assert [e.kind for e in log.events] == ["cleared"] and t.stats.errors == 1
        other.close()
        t.close()
    finally:
        srv.stop()


def test_redis_clear_with_the_server_gone_counts_an_error():
    from prefixkv.paged.tiers import LocalRedisServer, RedisTier

    pytest.importorskip("redis")
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    srv = LocalRedisServer()  # a free port, never started: connection refused
    t = RedisTier(port=srv.port, prefix="lifecycle-gone:", retry_interval=60.0)
    assert t.batch_get(keys(1)) == [None] and not t.available and t.stats.errors == 1
    t.clear()  # no exception: a fault is counted, as every other call's
    assert t.stats.errors == 2 and not t.available
    t.close()
    t.clear()  # closed: nothing tried, nothing counted
    assert t.stats.errors == 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))
