"""Regression tests of the tiers' integrity rules: reused host memory never under a caller's
view, all-or-nothing puts, keys repeated in one batch, disk budgets that keep a batch's own
blocks, records whose checksum covers the header, namespace validation."""

from __future__ import annotations

import os
import struct
from collections import OrderedDict

import numpy as np
import pytest
from prefixkv.paged.events import EventLog
from prefixkv.paged.tiers import (
    FORMAT_VERSION,
    BlockKey,
    DiskTier,
    HostTier,
    Namespace,
    RecordError,
    decode_record,
)
from prefixkv.paged.tiers.base import (
    _DIGEST_LEN,
    _FIXED,
    Tier,
    UnexpectedLayout,
    _warn_unreadable,
    checksum,
    record_bytes,
)
from prefixkv.paged.tiers.nixl import NixlTier

ROW = (2, 3, 1, 4)
NBYTES = int(np.prod(ROW)) * 4


def _ns(dtype="float32", **kw):
    return Namespace("tiny-model", dtype=dtype, **kw)


def _keys(n, ns=None, start=0):
    ns = ns or _ns()
    return [BlockKey((start + i).to_bytes(4, "big"), ns) for i in range(n)]


def _full(x, dtype=np.float32):
    return np.full(ROW, x, dtype)


# -- host tier: reuse of evicted memory ----------------------------------------------------

def _slab_allocator(rows):
    slab = np.zeros((rows, *ROW), np.float32)
    nxt = iter(range(rows))
    return slab, lambda shape, dtype: slab[next(nxt)]


def _private_allocator(shape, dtype):
    """Each block a view of its own buffer (the pinned_host_allocator pattern)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    return raw[64:].view(dtype).reshape(shape)


def test_host_slab_rows_are_never_reused_under_a_held_view():
    _slab, alloc = _slab_allocator(8)
    h = HostTier(NBYTES, allocator=alloc)  # room for one block
    a, b = _keys(2)
    assert h.batch_put([a], [_full(111)]) == [True]
    held = h.batch_get([a])[0]  # a caller holds block a (e.g. rows waiting to be scattered)
    assert held.base is not None and held.base is not h._entries[a.storage_key()].array
    assert h.batch_put([b], [_full(999)]) == [True]  # evicts a; its row must not be reused
    assert (held == 111).all()
    assert (h.batch_get([b])[0] == 999).all()


def test_host_slab_rows_are_not_reused_even_unheld():
    slab, alloc = _slab_allocator(8)
    h = HostTier(NBYTES, allocator=alloc)
    a, b = _keys(2)
    h.batch_put([a], [_full(1)])
    h.batch_put([b], [_full(2)])  # the slab is referenced by every row: no reuse
    assert (slab[0] == 1).all() and (slab[1] == 2).all()


@pytest.mark.parametrize("allocator", [None, _private_allocator], ids=["np.empty", "private"])
def test_host_reuses_unreferenced_evicted_memory(allocator, monkeypatch):
    """Counted by the allocator's calls (malloc hands a freed block's address straight back,
    so an address proves no reuse): the default np.empty arrays own their memory, the private
    buffers are views of theirs."""
    from prefixkv.paged.tiers import host as host_module

    calls = []
    make = allocator or host_module._default_allocator

    def counting(shape, dtype):
        calls.append(shape)
        return make(shape, dtype)

    if allocator is None:  # the default itself, as a tier built without one gets it
        monkeypatch.setattr(host_module, "_default_allocator", counting)
    h = HostTier(NBYTES, allocator=None if allocator is None else counting)
    a, b, c = _keys(3)
    h.batch_put([a], [_full(1)])
    first = h._entries[a.storage_key()].array
    assert first.flags.owndata == (allocator is None)
    del first
    h.batch_put([b], [_full(2)])  # evicts a, nobody holds it: its memory is reused
    assert len(calls) == 1 and (h.batch_get([b])[0] == 2).all()
    held = h.batch_get([b])[0]
    h.batch_put([c], [_full(3)])  # evicts b, a caller holds it: fresh memory
    assert len(calls) == 2
    assert (held == 2).all() and (h.batch_get([c])[0] == 3).all()


def test_host_private_buffer_under_a_held_view_is_not_reused():
    h = HostTier(NBYTES, allocator=_private_allocator)
    a, b = _keys(2)
    h.batch_put([a], [_full(5)])
    held = h.batch_get([a])[0][1:]  # a view of a view: references the private buffer
    h.batch_put([b], [_full(6)])
    assert (held == 5).all()


# -- host tier: all-or-nothing puts, events, repeated keys -----------------------------------

def test_host_bad_value_stores_nothing():
    h = HostTier(1 << 20)
    log = EventLog()
    h.events.subscribe(log)
    ks = _keys(3)
    with pytest.raises(ValueError, match="dtype float16 does not match the key's namespace"):
        h.batch_put(ks, [_full(1), _full(1), _full(1, np.float16)])
    assert len(h) == 0 and h.used_bytes == 0 and log.events == []


def test_host_allocator_failure_still_publishes_what_was_stored():
    calls = []

    def alloc(shape, dtype):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("pinned allocation failed")
        return np.empty(shape, dtype)

    h = HostTier(1 << 20, allocator=alloc)  # no evictions: every new block allocates
    log = EventLog()
    h.events.subscribe(log)
    ks = _keys(4)
    h.batch_put(ks[:1], [_full(0)])
    with pytest.raises(MemoryError):
        h.batch_put(ks[1:], [_full(1), _full(2), _full(3)])  # the 3rd allocation fails
    kinds = [(e.kind, e.block_hashes) for e in log.events]
    assert kinds == [("stored", (ks[0].block_hash,)), ("stored", (ks[1].block_hash,))]
    assert ks[1] in h and ks[0] in h
    # flushed even when the failing put evicted first
    h2 = HostTier(NBYTES, allocator=lambda s, d: (_ for _ in ()).throw(MemoryError("oom")))
    h2.batch_put(ks[:1], [np.ascontiguousarray(_full(0))], copy=False)
    log2 = EventLog()
    h2.events.subscribe(log2)
    held = h2.batch_get(ks[:1])[0]  # pins the evicted array: reserve must allocate
    with pytest.raises(MemoryError):
        h2.batch_put(ks[1:2], [_full(1)])
    assert [e.kind for e in log2.events] == ["evicted"] and (held == 0).all()


def test_host_repeated_key_in_one_batch_is_stored_once():
    h = HostTier(2 * NBYTES)
    log = EventLog()
    h.events.subscribe(log)
    a, b = _keys(2)
    assert h.batch_put([a, a, b], [_full(1), _full(1), _full(2)]) == [True, True, True]
    assert len(h) == 2 and h.used_bytes == 2 * NBYTES and h.stats.puts == 2
    assert [e.block_hashes for e in log.events] == [(a.block_hash, b.block_hash)]


# -- NIXL tier (fake transport): repeated keys -----------------------------------------------

def _fake_nixl(num_slots=4, slot_bytes=4096, staging=8):
    t = object.__new__(NixlTier)
    Tier.__init__(t)
    t.num_slots, t.slot_bytes, t.staging_slots, t.checksum = num_slots, slot_bytes, staging, None
    t.staging = np.zeros((staging, slot_bytes), np.uint8)
    t._index, t._free = OrderedDict(), list(range(num_slots - 1, -1, -1))
    remote = np.zeros((num_slots, slot_bytes), np.uint8)

    def transfer(op, slots):  # a perfect transport
        for j, s in enumerate(slots):
            if op == "WRITE":
                remote[s] = t.staging[j]
            else:
                t.staging[j] = remote[s]
        return True

    t._transfer = transfer
    return t


def test_nixl_repeated_key_in_one_batch_takes_one_slot():
    t = _fake_nixl()
    a = _keys(1)[0]
    assert t.batch_put([a, a], [_full(1), _full(1)]) == [True, True]
    assert len(t._index) + len(t._free) == t.num_slots  # no slot leaked
    others = _keys(4, start=10)
    assert t.batch_put(others, [_full(i) for i in range(4)]) == [True] * 4
    got = t.batch_get(others)
    assert all((g == i).all() for i, g in enumerate(got))


def test_nixl_bad_value_stores_nothing():
    t = _fake_nixl()
    with pytest.raises(ValueError, match=r"values\[1\]: dtype float16"):
        t.batch_put(_keys(2), [_full(1), _full(1, np.float16)])
    assert len(t._index) == 0 and len(t._free) == t.num_slots


# -- disk tier -----------------------------------------------------------------------------

def test_disk_budget_keeps_the_batch_own_blocks(tmp_path):
    ks = _keys(3)
    size = len(record_bytes(ks[0], _full(0)))
    d = DiskTier(tmp_path, budget_bytes=2 * size)
    log = EventLog()
    d.events.subscribe(log)
    res = d.batch_put(ks, [_full(i) for i in range(3)])
    got = [d.batch_get([k], shape=ROW)[0] for k in ks]
    assert res == [g is not None for g in got] == [True, True, False]
    assert all((got[i] == i).all() for i in range(2))
    assert [e.kind for e in log.events] == ["stored"] and d.stats.rejected == 1
    # a later batch may evict the earlier batch's blocks (LRU)
    assert d.batch_put(_keys(1, start=7), [_full(7)]) == [True]
    assert d.batch_exists(ks[:1]) == 0


def test_disk_rejects_dtype_not_matching_namespace(tmp_path):
    d = DiskTier(tmp_path)
    ks = _keys(2)
    with pytest.raises(ValueError, match=r"values\[1\]: dtype float16 does not match the "
                                         r"key's namespace dtype float32"):
        d.batch_put(ks, [_full(1), _full(1, np.float16)])
    assert d.batch_exists(ks[:1]) == 0 and d.used_bytes == 0


def test_disk_repeated_key_in_one_batch_is_written_once(tmp_path):
    d = DiskTier(tmp_path)
    log = EventLog()
    d.events.subscribe(log)
    a = _keys(1)[0]
    assert d.batch_put([a, a], [_full(3), _full(3)]) == [True, True]
    assert d.stats.puts == 1 and len(d._sizes) == 1
    assert [e.block_hashes for e in log.events] == [(a.block_hash,)]


# -- records: the checksum covers the header and is checked first --------------------------

def _fields_len(data):
    _, _, _, ndim, klen, dlen, _ = _FIXED.unpack_from(data, 0)
    return _FIXED.size + 8 * ndim + klen + dlen


@pytest.mark.parametrize("alg", ["crc32", "xxh3_128"])
def test_record_digest_covers_header_fields_and_payload(alg):
    k = _keys(1)[0]
    v = np.arange(np.prod(ROW), dtype=np.float32).reshape(ROW)
    data = record_bytes(k, v, checksum_alg=alg)
    n = _fields_len(data)
    assert FORMAT_VERSION == 2 and int.from_bytes(data[4:6], "little") == 2
    want = checksum(data[:n] + v.tobytes(), alg)
    assert data[n:n + _DIGEST_LEN] == want


@pytest.mark.parametrize("field", ["shape", "dtype"])
def test_corrupt_header_field_is_a_checksum_error_not_another_layout(field):
    k = _keys(1)[0]
    data = bytearray(record_bytes(k, _full(1)))
    if field == "shape":  # dim 0: 2 -> 3 (same length record)
        struct.pack_into("<Q", data, _FIXED.size, 3)
    else:  # "float32" -> "float16"
        i = data.index(b"float32")
        data[i:i + 7] = b"float16"
    with pytest.raises(RecordError, match="checksum") as e:
        decode_record(k, bytes(data), shape=ROW, dtype="float32")
    assert not isinstance(e.value, UnexpectedLayout)


def test_disk_drops_a_record_with_a_corrupt_shape_field_and_takes_a_new_put(tmp_path):
    d = DiskTier(tmp_path)
    k = _keys(1)[0]
    d.batch_put([k], [_full(4)])
    p = d.path(k)
    with open(p, "rb") as f:
        data = bytearray(f.read())
    struct.pack_into("<Q", data, _FIXED.size, 1 << 63 | 2)
    with open(p, "wb") as f:
        f.write(data)
    log = EventLog()
    d.events.subscribe(log)
    assert d.batch_get([k], shape=ROW) == [None] and d.stats.corrupt == 1
    assert [e.kind for e in log.events] == ["removed"]
    assert not os.path.exists(p)
    assert d.batch_put([k], [_full(4)]) == [True] and (d.batch_get([k], shape=ROW)[0] == 4).all()


def test_old_format_record_reads_as_a_miss(tmp_path):
    """A record of another format version (a worker of an older or newer release sharing the
    directory) is a miss here, and stays for the workers that read it; a put replaces it."""
    k = _keys(1)[0]
    d = DiskTier(tmp_path)
    d.batch_put([k], [_full(2)])
    p = d.path(k)
    with open(p, "rb") as f:
        data = bytearray(f.read())
    struct.pack_into("<H", data, 4, 1)  # a version-1 file left from an older release
    with open(p, "wb") as f:
        f.write(data)
    with pytest.raises(RecordError, match="format version 1"):
        decode_record(k, bytes(data))
    fresh = DiskTier(tmp_path)
    log = EventLog()
    fresh.events.subscribe(log)
    assert fresh.batch_exists([k]) == 0  # not a hit that every batch_get then misses
    _warn_unreadable.cache_clear()
    with pytest.warns(RuntimeWarning, match="format version 1.*another prefixkv release"):
        assert fresh.batch_get([k]) == [None]
    assert fresh.stats.unreadable == 1 and fresh.stats.corrupt == 0  # not corruption
    assert os.path.exists(p) and log.events == []  # kept, nothing "removed"
    assert fresh.batch_put([k], [_full(2)]) == [True]
    assert fresh.batch_exists([k]) == 1
    assert (fresh.batch_get([k])[0] == 2).all()


@pytest.mark.parametrize("where", ["version", "magic", "checksum_alg", "short"])
def test_disk_batch_exists_counts_only_records_readable_here(tmp_path, where):
    """batch_exists stops at the first file whose header this process cannot read (a flipped
    version byte, another magic, an unknown checksum id, a truncated header), so a lookup
    never reports a prefix that batch_get then misses block by block."""
    ks = _keys(3)
    d = DiskTier(tmp_path)
    assert d.batch_put(ks, [_full(i) for i in range(3)]) == [True] * 3
    assert d.batch_exists(ks) == 3
    p = d.path(ks[1])
    with open(p, "rb") as f:
        data = bytearray(f.read())
    if where == "version":
        data[4] ^= 0x01
    elif where == "magic":
        data[0] ^= 0x20
    elif where == "checksum_alg":
        data[6] = 7
    else:
        data = data[:10]
    with open(p, "wb") as f:
        f.write(data)
    assert d.batch_exists(ks) == 1 and d.batch_exists(ks[:1]) == 1
    assert d.batch_exists(ks[2:]) == 1


def test_disk_batch_exists_without_the_writers_checksum(tmp_path, monkeypatch):
    """A worker without xxhash cannot verify another worker's xxh3_128 records: not hits."""
    pytest.importorskip("xxhash")
    from prefixkv.paged.tiers import base

    ks = _keys(2)
    a = DiskTier(tmp_path, checksum="xxh3_128")
    assert a.batch_put(ks, [_full(0), _full(1)]) == [True, True]
    monkeypatch.setattr(base, "_xxhash", lambda: None)
    assert DiskTier(tmp_path).batch_exists(ks) == 0
    monkeypatch.undo()
    assert a.batch_exists(ks) == 2


def test_a_reader_without_the_writers_checksum_keeps_the_record(tmp_path, monkeypatch):
    """Worker A writes xxh3_128 records (xxhash installed); worker B has the base install
    (crc32 only): B misses but leaves A's files, which A still reads (B used to delete them,
    and A lost its blocks)."""
    pytest.importorskip("xxhash")
    from prefixkv.paged.tiers import base

    ks = _keys(3)
    a = DiskTier(tmp_path, checksum="xxh3_128")
    assert a.batch_put(ks, [_full(i) for i in range(3)]) == [True] * 3
    monkeypatch.setattr(base, "_xxhash", lambda: None)  # B: no xxhash
    b = DiskTier(tmp_path)
    log = EventLog()
    b.events.subscribe(log)
    _warn_unreadable.cache_clear()
    with pytest.warns(RuntimeWarning, match=r"checksum algorithm .*prefixkv\[hash\]"):
        assert b.batch_get(ks) == [None] * 3 and log.events == []
    # counted apart, not as corruption (the misses had looked like a failing disk), and
    # warned about once
    assert b.stats.unreadable == 3 and b.stats.corrupt == 0
    assert all(os.path.exists(a.path(k)) for k in ks)
    monkeypatch.undo()
    assert [int(x.flat[0]) for x in a.batch_get(ks)] == [0, 1, 2]


# -- namespace validation ------------------------------------------------------------------

@pytest.mark.parametrize(("kw", "exc", "match"), [
    ({"tp_rank": 1.5, "tp_size": 2}, TypeError, "tp_rank: expected int"),
    ({"tp_rank": 0, "tp_size": 2.0}, TypeError, "tp_size: expected int"),
    ({"tp_rank": True, "tp_size": 2}, TypeError, "tp_rank: expected int"),
    ({"tp_rank": "0"}, TypeError, "tp_rank: expected int"),
    ({"tp_size": 0}, ValueError, "tp_size: expected a positive int"),
    ({"tp_rank": -1, "tp_size": 2}, ValueError, "tp_rank: expected 0 <= tp_rank < tp_size"),
    ({"dtype": "int7"}, ValueError, "dtype: expected one of float32, float16, bfloat16"),
    ({"dtype": "int32"}, ValueError, "dtype: expected one of"),
])
def test_namespace_rejects_bad_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        Namespace("m", **kw)


def test_namespace_accepts_numpy_ints_and_dtypes():
    ns = Namespace("m", dtype=np.float16, tp_rank=np.int64(1), tp_size=np.int32(2))
    assert (ns.dtype, ns.tp_rank, ns.tp_size) == ("float16", 1, 2)
    assert type(ns.tp_rank) is int and ns == Namespace("m", dtype="float16", tp_rank=1, tp_size=2)


def test_record_whose_payload_dtype_is_not_its_namespaces_is_refused():
    """A record another writer made with a float16 payload under a float32 namespace: the
    decode refuses it (RecordError), never hands back float16 rows."""
    key = BlockKey(b"\x01" * 32, Namespace("m", dtype="float32"))
    rec = record_bytes(key, np.zeros((2, 4), np.float16))
    with pytest.raises(RecordError, match="dtype"):
        decode_record(key, rec)


def test_start_up_scan_survives_files_deleted_meanwhile_and_sweeps_dead_writes(tmp_path,
                                                                               monkeypatch):
    """Another process evicting a file while a new DiskTier scans: that file is skipped, the
    others are all indexed (the scan used to stop at the first vanished file, leaving the
    budget undercounted). Temporary files of a writer killed mid-write are deleted once
    stale; a fresh one (a live writer's) is left alone."""
    from prefixkv.paged.tiers import disk

    ks = _keys(6)
    d = DiskTier(tmp_path)
    assert d.batch_put(ks, [_full(i) for i in range(6)]) == [True] * 6
    ns_dir = os.path.dirname(d.path(ks[0]))
    dead, live = os.path.join(ns_dir, ".tmp-dead.part"), os.path.join(ns_dir, ".tmp-live.part")
    for f in (dead, live):
        with open(f, "wb") as fh:
            fh.write(b"x" * 100)
    old = os.path.getmtime(dead) - disk.STALE_PART_SECONDS - 10
    os.utime(dead, (old, old))
    real = DiskTier._entries

    def entries_then_evict(self, path):
        es = real(self, path)
        if path == ns_dir:  # another process deletes one block file after the listing
            os.unlink(d.path(ks[0]))
        return es

    monkeypatch.setattr(DiskTier, "_entries", entries_then_evict)
    fresh = DiskTier(tmp_path)
    assert fresh.stats.errors == 0 and len(fresh._sizes) == 5
    assert fresh.used_bytes == sum(os.path.getsize(d.path(k)) for k in ks[1:])
    assert not os.path.exists(dead) and os.path.exists(live)
