"""Documented tier contracts no other test pins: fetch stops at the first unusable block, the
chain's remove / clear / promotion / block_size reach every tier, host and disk byte budgets
(clear, re-puts, blocks larger than the budget), LRU order (host touch, disk mtime across a
re-open), replay by tier, and offload's answer after an allocator failure evicted a refreshed
block. Host memory and tmp_path only: no servers."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from prefixkv.paged.events import EventLog
from prefixkv.paged.tiers import (
    BlockKey,
    BlockOffloader,
    DiskTier,
    HostTier,
    Namespace,
    TieredStore,
)
from prefixkv.paged.tiers.base import record_bytes

ROW = (2, 3, 1, 4)  # [len(caches), block_size, num_kv_heads, head_dim]
NBYTES = int(np.prod(ROW)) * 4  # one float32 block


def _ns(salt=None):
    return Namespace("tiny-model", dtype="float32", salt=salt)


def _hashes(n, start=0):
    return [(start + i).to_bytes(4, "big") for i in range(n)]


def _keys(n, start=0):
    return [BlockKey(h, _ns()) for h in _hashes(n, start)]


def _full(x, shape=ROW):
    return np.full(shape, x, np.float32)


def _same(a, b):
    """Bit-exact equality (NaN-safe)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _caches(num_blocks, fill=None):
    """ROW[0] numpy caches [num_blocks, *ROW[1:]]; block b holds the value b + 1 (or
    ``fill`` everywhere: NaN so that an unwritten block shows)."""
    out = []
    for layer in range(ROW[0]):
        c = np.empty((num_blocks, *ROW[1:]), np.float32)
        for b in range(num_blocks):
            c[b] = np.nan if fill is not None else (b + 1) + 100 * layer
        out.append(c)
    return out


def _record_size(key):
    return len(record_bytes(key, _full(0.0)))


def _set_mtime(path, age_s):
    t = time.time() - age_s
    os.utime(path, (t, t))


# -- BlockOffloader.fetch / onboard --------------------------------------------------------

def test_onboard_stops_at_a_corrupt_middle_block(tmp_path):
    """fetch "stops at the first miss": blocks 0..2 are on disk and batch_exists counts all
    three, but block 1's file is corrupt (a miss on read). onboard loads block 0 only (n == 1);
    block 2's KV must not land in destination block 1, and blocks 1 and 2 stay untouched."""
    disk = DiskTier(tmp_path)
    off = BlockOffloader(disk, _ns())
    src = _caches(3)
    hashes = _hashes(3)
    assert off.offload(src, [0, 1, 2], hashes) == [True, True, True]
    p = disk.path(BlockKey(hashes[1], _ns()))
    data = bytearray(Path(p).read_bytes())
    data[-1] ^= 0xFF  # a payload byte: the checksum no longer matches
    Path(p).write_bytes(bytes(data))
    assert off.lookup(hashes) == 3  # the corrupt file still exists until it is read

    dst = _caches(3, fill=np.nan)
    dst, n = off.onboard(dst, [0, 1, 2], hashes)
    assert n == 1
    for s, d in zip(src, dst, strict=True):
        assert _same(d[0], s[0])
        assert np.isnan(d[1:]).all()


# -- TieredStore: remove, clear, promotion, block_size -------------------------------------

def test_tiered_batch_remove_reaches_every_tier(tmp_path):
    """batch_remove "removes keys where present" in every tier of the chain (write-through put
    stored them in both): afterwards neither tier holds them and a get misses (a copy left in
    the disk tier would be served and promoted back)."""
    host, disk = HostTier(8 * NBYTES), DiskTier(tmp_path)
    store = TieredStore([host, disk])
    keys = _keys(2)
    assert store.batch_put(keys, [_full(1.0), _full(2.0)]) == [True, True]
    assert store.batch_remove(keys) == 2
    assert host.batch_exists(keys) == 0
    assert disk.batch_exists(keys) == 0
    assert store.batch_get(keys) == [None, None]


class _ClearFails(HostTier):
    name = "broken"

    def clear(self):
        raise ConnectionError("store unreachable")


def test_tiered_clear_survives_a_failing_tier(tmp_path):
    """A tier whose clear() raises a storage fault degrades the chain, never breaks it: clear
    returns, counts the error against that tier, and the tiers after it are still cleared."""
    first, broken, last = HostTier(8 * NBYTES), _ClearFails(8 * NBYTES), DiskTier(tmp_path)
    store = TieredStore([first, broken, last])
    keys = _keys(2)
    assert store.batch_put(keys, [_full(1.0), _full(2.0)]) == [True, True]
    store.clear()
    assert len(first) == 0
    assert last.batch_exists(keys) == 0 and last.used_bytes == 0
    assert store.stats.errors == 1
    assert store.tier_errors["broken"] == 1


def _three_hosts():
    tiers = [HostTier(8 * NBYTES) for _ in range(3)]
    for i, t in enumerate(tiers):
        t.name = f"host{i}"
    return tiers


def test_hit_in_slowest_tier_is_promoted_into_every_faster_tier():
    """A block found in tiers[2] only is promoted into tiers[0] AND tiers[1] (every faster
    tier that missed it), bit-exact."""
    tiers = _three_hosts()
    store = TieredStore(tiers)
    k = _keys(1)
    assert tiers[2].batch_put(k, [_full(7.0)]) == [True]
    got = store.batch_get(k)
    assert _same(got[0], _full(7.0))
    for t in tiers[:2]:
        assert t.batch_exists(k) == 1
        assert _same(t.batch_get(k)[0], _full(7.0))


def test_promote_false_never_promotes():
    """TieredStore(promote=False): a hit in a slower tier is served but written nowhere."""
    tiers = _three_hosts()
    store = TieredStore(tiers, promote=False)
    k = _keys(1)
    assert tiers[2].batch_put(k, [_full(7.0)]) == [True]
    assert _same(store.batch_get(k)[0], _full(7.0))
    assert tiers[0].batch_exists(k) == 0
    assert tiers[1].batch_exists(k) == 0


def test_block_size_set_on_store_reaches_every_tier(tmp_path):
    """Setting block_size on the chain sets it on every tier, so every tier's events carry
    num_tokens = len(block_hashes) * block_size (3 blocks * 16 tokens = 48)."""
    host, disk = HostTier(8 * NBYTES), DiskTier(tmp_path)
    store = TieredStore([host, disk])
    log = EventLog()
    store.events.subscribe(log)
    store.block_size = 16
    assert host.block_size == 16 and disk.block_size == 16
    assert store.batch_put(_keys(3), [_full(float(i)) for i in range(3)]) == [True] * 3
    stored = [(e.tier, e.num_tokens) for e in log.events if e.kind == "stored"]
    assert sorted(stored) == [("disk", 48), ("host", 48)]


# -- events ----------------------------------------------------------------------------------

def test_replay_by_tier_applies_only_that_tiers_events(tmp_path):
    """replay(tier=...) rebuilds one tier's index from the chain's mixed log: k0 went to both
    tiers, k1 to the host only, then k0 was removed from the host only."""
    host, disk = HostTier(8 * NBYTES), DiskTier(tmp_path)
    store = TieredStore([host, disk])
    log = EventLog()
    store.events.subscribe(log)
    k0, k1 = _keys(2)
    assert store.batch_put([k0], [_full(1.0)]) == [True]
    assert host.batch_put([k1], [_full(2.0)]) == [True]
    assert host.batch_remove([k0]) == 1
    assert log.replay(tier="host") == {b"": {k1.block_hash: -1}}
    assert log.replay(tier="disk") == {b"": {k0.block_hash: -1}}


# -- host tier: budget and LRU ---------------------------------------------------------------

def test_host_clear_resets_used_bytes():
    """After clear() the whole budget is free again: a tier that was full takes as many new
    blocks as before, without refusing any."""
    host = HostTier(2 * NBYTES)
    assert host.batch_put(_keys(2), [_full(1.0), _full(2.0)]) == [True, True]
    host.clear()
    assert len(host) == 0 and host.used_bytes == 0
    assert host.batch_put(_keys(2, start=10), [_full(3.0), _full(4.0)]) == [True, True]
    assert host.used_bytes == 2 * NBYTES
    assert host.stats.rejected == 0


def test_host_block_larger_than_budget_is_refused_without_evicting():
    """A block larger than the whole budget is refused (False) and evicts nothing already
    stored (it could never fit, so making room for it would only lose blocks)."""
    host = HostTier(2 * NBYTES)
    keys = _keys(2)
    assert host.batch_put(keys, [_full(1.0), _full(2.0)]) == [True, True]
    big = np.zeros((3 * ROW[0], *ROW[1:]), np.float32)  # 3 * NBYTES
    assert host.batch_put(_keys(1, start=10), [big]) == [False]
    assert host.batch_exists(keys) == 2
    assert host.stats.evictions == 0
    assert host.used_bytes == 2 * NBYTES


def test_host_touch_makes_held_blocks_most_recently_used():
    """touch() marks the held keys most recently used: after touching k0 (the oldest) the
    next put that needs room evicts k1, not k0."""
    host = HostTier(3 * NBYTES)
    k0, k1, k2, k3 = _keys(4)
    assert host.batch_put([k0, k1, k2], [_full(0.0), _full(1.0), _full(2.0)]) == [True] * 3
    assert host.touch([k0]) == [True]
    assert host.batch_put([k3], [_full(3.0)]) == [True]
    assert k0 in host
    assert k1 not in host
    assert k2 in host and k3 in host


# -- disk tier: budget and LRU by mtime ------------------------------------------------------

def test_disk_reput_of_a_stored_key_does_not_grow_used_bytes(tmp_path):
    """Putting a key the tier already holds replaces its file: used_bytes stays the bytes of
    the files on disk, and with a budget of two blocks the re-put evicts nothing."""
    keys = _keys(2)
    rec = _record_size(keys[0])
    disk = DiskTier(tmp_path, budget_bytes=2 * rec)
    assert disk.batch_put(keys, [_full(1.0), _full(2.0)]) == [True, True]
    for _ in range(3):
        assert disk.batch_put([keys[1]], [_full(2.0)]) == [True]
    assert disk.used_bytes == 2 * rec
    assert disk.used_bytes == sum(os.path.getsize(disk.path(k)) for k in keys)
    assert disk.batch_exists(keys) == 2
    assert disk.stats.evictions == 0


def test_disk_block_larger_than_budget_is_refused_without_evicting(tmp_path):
    """A record larger than the whole budget is refused (False) and evicts no stored file."""
    keys = _keys(2)
    rec = _record_size(keys[0])
    disk = DiskTier(tmp_path, budget_bytes=2 * rec)
    assert disk.batch_put(keys, [_full(1.0), _full(2.0)]) == [True, True]
    big = np.zeros((10 * ROW[0], *ROW[1:]), np.float32)
    big_key = _keys(1, start=10)
    assert len(record_bytes(big_key[0], big)) > 2 * rec
    assert disk.batch_put(big_key, [big]) == [False]
    assert disk.batch_exists(keys) == 2
    assert disk.stats.evictions == 0
    assert disk.used_bytes == 2 * rec


def test_disk_reopen_evicts_oldest_mtime_first(tmp_path):
    """A DiskTier re-opened on a directory orders the files it finds by mtime, oldest first
    (not by name or write order): k1, written last but given the older mtime, is evicted for
    the first put over the budget; k0 stays."""
    k0, k1, k2 = _keys(3)
    rec = _record_size(k0)
    first = DiskTier(tmp_path)
    assert first.batch_put([k0, k1], [_full(0.0), _full(1.0)]) == [True, True]
    _set_mtime(first.path(k0), 100)
    _set_mtime(first.path(k1), 200)
    disk = DiskTier(tmp_path, budget_bytes=2 * rec)
    assert disk.used_bytes == 2 * rec
    assert disk.batch_put([k2], [_full(2.0)]) == [True]
    assert os.path.exists(disk.path(k0))
    assert not os.path.exists(disk.path(k1))
    assert disk.batch_exists([k0, k2]) == 2


def test_disk_hit_refreshes_mtime(tmp_path):
    """Every hit refreshes the file's mtime (the LRU order a later process sees): k0, the
    older file, is read, so a re-opened tier over budget evicts k1 instead."""
    k0, k1, k2 = _keys(3)
    rec = _record_size(k0)
    first = DiskTier(tmp_path)
    assert first.batch_put([k0, k1], [_full(0.0), _full(1.0)]) == [True, True]
    _set_mtime(first.path(k0), 200)
    _set_mtime(first.path(k1), 100)
    before = time.time()
    assert _same(first.batch_get([k0])[0], _full(0.0))
    assert os.path.getmtime(first.path(k0)) >= before - 2  # refreshed (coarse clocks: 2 s)
    disk = DiskTier(tmp_path, budget_bytes=2 * rec)
    assert disk.batch_put([k2], [_full(2.0)]) == [True]
    assert os.path.exists(disk.path(k0))
    assert not os.path.exists(disk.path(k1))


# -- BlockOffloader.offload after an allocator failure --------------------------------------

def test_offload_reports_false_for_a_refreshed_block_the_fallback_evicted():
    """offload returns per block whether some tier holds it. Here the host tier (the chain's
    only tier, room for 2 blocks) holds b0 and b1; offloading [b0, b2, b3] refreshes b0 and
    reserves room for b2, b3, evicting b1, but the allocator fails once (a pinned-memory
    fault). The plain put that follows cannot protect the refreshed b0 and evicts it for b3,
    so b0 must report False (no tier holds it), not the True its refresh gave."""
    calls = []

    def allocator(shape, dtype):
        calls.append(shape)
        if len(calls) == 3:
            raise RuntimeError("pinned allocation failed")
        return np.empty(shape, dtype)

    host = HostTier(2 * NBYTES, allocator=allocator)
    store = TieredStore([host])
    off = BlockOffloader(store, _ns())
    caches = _caches(4)
    h = _hashes(4)
    keys = off.keys(h)
    assert off.offload(caches, [0, 1], h[:2]) == [True, True]
    views = store.batch_get(keys[:2])  # callers' views: evicted memory is never reused
    assert all(v is not None for v in views)

    out = off.offload(caches, [0, 2, 3], [h[0], h[2], h[3]])
    assert len(calls) >= 3 and store.stats.errors == 1  # the failure path was taken
    held = [store.batch_exists([k]) == 1 for k in (keys[0], keys[2], keys[3])]
    assert held == [False, True, True]
    assert out == held
