"""Local tiers: keys and records, host (LRU byte budget), disk (atomic files, restart), the
write-through TieredStore chain and the BlockOffloader glue (gather/scatter, exact copies)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from prefixkv.paged.events import EventLog
from prefixkv.paged.reference import gather_blocks_reference, scatter_blocks_reference
from prefixkv.paged.spec import numpy_dtype
from prefixkv.paged.tiers import (
    FORMAT_VERSION,
    BlockKey,
    BlockOffloader,
    DiskTier,
    HostTier,
    Namespace,
    RecordError,
    TieredStore,
    decode_record,
    encode_record,
)
from prefixkv.paged.tiers.base import record_bytes

DTYPES = ["float32", "float16", "bfloat16"]
ROW = (4, 3, 2, 5)  # [len(caches), block_size, num_kv_heads, head_dim]


def _row(rng, dtype="float32", shape=ROW):
    return rng.standard_normal(shape).astype(numpy_dtype(dtype))


def _ns(dtype="float32", salt=None, **kw):
    return Namespace("tiny-model", dtype=dtype, salt=salt, **kw)


def _same(a, b):
    """Bit-exact equality (NaN-safe, bfloat16-safe)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


# -- keys and records ------------------------------------------------------------------------

def test_namespace_encoding_is_stable_and_covers_every_field():
    base = _ns(salt="s")
    assert base.encode() == _ns(salt=b"s").encode()  # str salt == its UTF-8 bytes
    assert base == _ns(salt="s") and hash(base) == hash(_ns(salt="s"))
    variants = [Namespace("other", dtype="float32", salt="s"),
                Namespace("tiny-model", layout="HND", dtype="float32", salt="s"),
                _ns(dtype="float16", salt="s"), _ns(salt="s", tp_rank=1, tp_size=2),
                _ns(salt="s", tp_size=2), _ns(salt="t"), _ns(salt=None)]
    digests = {v.digest() for v in variants} | {base.digest()}
    assert len(digests) == len(variants) + 1
    # Known vector: guards the on-disk / on-wire naming against accidental change.
    assert Namespace("m").encode() == (
        b"prefixkv-ns-v1" + b"\x01\0\0\0m" + b"\x03\0\0\0NHD" + b"\x07\0\0\0float32"
        + (0).to_bytes(8, "little") + (1).to_bytes(8, "little") + b"\0\0\0\0")


def test_namespace_rejects_bad_rank():
    with pytest.raises(ValueError, match="tp_rank"):
        _ns(tp_rank=2, tp_size=2)


def test_namespace_rejects_bad_salt():
    with pytest.raises(TypeError, match="salt"):
        _ns(salt=3)


def test_block_key_hash_forms():
    ns = _ns()
    assert BlockKey(0x1234, ns).block_hash == (0x1234).to_bytes(8, "big")
    assert BlockKey(2**64, ns).block_hash == (2**64).to_bytes(16, "big")
    assert BlockKey(bytearray(b"ab"), ns).block_hash == b"ab"
    with pytest.raises(TypeError, match="block_hash"):
        BlockKey(1.5, ns)


def test_block_key_rejects_negative_hash():
    with pytest.raises(ValueError, match="block_hash"):
        BlockKey(-1, _ns())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alg", ["crc32", "xxh3_128"])
def test_record_round_trip_and_every_mismatch_is_refused(dtype, alg):
    rng = np.random.default_rng(0)
    v = _row(rng, dtype)
    k = BlockKey(b"\x07" * 32, _ns(dtype))
    data = record_bytes(k, v, checksum_alg=alg)
    assert data[:4] == b"PKVB" and int.from_bytes(data[4:6], "little") == FORMAT_VERSION
    got = decode_record(k, data, shape=v.shape, dtype=dtype)
    assert _same(got, v) and not got.flags.writeable
    with pytest.raises(RecordError, match="key/namespace"):
        decode_record(BlockKey(b"\x08" * 32, _ns(dtype)), data)
    with pytest.raises(RecordError, match="key/namespace"):
        decode_record(BlockKey(b"\x07" * 32, _ns(dtype, salt="x")), data)
    with pytest.raises(RecordError, match="shape"):
        decode_record(k, data, shape=(1, *v.shape[1:]))
    with pytest.raises(RecordError, match="dtype"):
        decode_record(k, data, dtype="float64")
    with pytest.raises(RecordError, match="record length"):
        decode_record(k, data[:-1])
    with pytest.raises(RecordError, match="truncated"):
        decode_record(k, data[:5])
    flipped = bytearray(data)
    flipped[-3] ^= 0x10
    with pytest.raises(RecordError, match="checksum"):
        decode_record(k, bytes(flipped))
    bad_version = bytearray(data)
    bad_version[4] += 1
    with pytest.raises(RecordError, match="version"):
        decode_record(k, bytes(bad_version))


def test_record_payload_is_zero_copy_and_handles_non_contiguous():
    v = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    k = BlockKey(1, _ns())
    _, payload = encode_record(k, v)
    assert np.shares_memory(np.frombuffer(payload, np.uint8), v)
    t = v[:, ::2]  # non-contiguous input is serialised contiguously
    assert _same(decode_record(k, record_bytes(k, t)), np.ascontiguousarray(t))


# -- host tier -------------------------------------------------------------------------------

def _keys(n, ns=None, start=0):
    ns = ns or _ns()
    return [BlockKey(i.to_bytes(4, "big"), ns) for i in range(start, start + n)]


def test_host_round_trip_exists_and_lru_eviction():
    rng = np.random.default_rng(1)
    vals = [_row(rng) for _ in range(5)]
    nb = vals[0].nbytes
    h = HostTier(3 * nb)
    ks = _keys(5)
    assert h.batch_put(ks[:3], vals[:3]) == [True] * 3
    assert h.batch_exists(ks) == 3 and h.batch_exists(ks[1:]) == 2
    h.batch_get([ks[0]])  # touch 0: LRU order now 1, 2, 0
    assert h.batch_put(ks[3:5], vals[3:5]) == [True, True]  # evicts 1 then 2
    assert h.used_bytes == 3 * nb and h.stats.evictions == 2
    got = h.batch_get(ks)
    assert [g is not None for g in got] == [True, False, False, True, True]
    for i in (0, 3, 4):
        assert _same(got[i], vals[i]) and not got[i].flags.writeable
    vals[0][...] = 0  # the tier holds its own copy
    assert not _same(h.batch_get([ks[0]])[0], vals[0])


def test_host_put_larger_than_budget_is_refused():
    v = np.zeros(ROW, np.float32)
    h = HostTier(v.nbytes - 1)
    assert h.batch_put(_keys(1), [v]) == [False]
    assert h.stats.rejected == 1 and len(h) == 0 and h.batch_exists(_keys(1)) == 0


def test_host_batch_over_budget_keeps_leading_blocks():
    v = np.ones(ROW, np.float32)
    h = HostTier(2 * v.nbytes)
    assert h.batch_put(_keys(4), [v] * 4) == [True, True, False, False]
    assert h.batch_exists(_keys(4)) == 2


def test_host_reuses_evicted_memory_and_never_under_a_live_view():
    v = np.ones(ROW, np.float32)
    h = HostTier(2 * v.nbytes)
    h.batch_put(_keys(2), [v, v])
    held = h.batch_get(_keys(1))[0]  # a caller still holds block 0
    h.batch_put(_keys(1, start=10), [2 * v])  # evicts block 0: its memory must not be reused
    assert _same(held, v)
    got = h.reserve(2, ROW, "float32")
    assert len(got) == 2 and all(g.flags.writeable for g in got)


def test_host_allocator_hook_and_adopt():
    calls = []

    def alloc(shape, dtype):
        calls.append((shape, dtype))
        return np.full(shape, np.nan, dtype)

    v = np.arange(np.prod(ROW), dtype=np.float32).reshape(ROW)
    h = HostTier(4 * v.nbytes, allocator=alloc)
    h.batch_put(_keys(1), [v])
    assert calls == [(ROW, np.dtype("float32"))]
    buf = h.reserve(1, ROW, "float32")[0]
    buf[...] = v
    assert h.batch_put(_keys(1, start=5), [buf], copy=False) == [True]
    assert h.batch_get(_keys(1, start=5))[0].base is buf or np.shares_memory(
        h.batch_get(_keys(1, start=5))[0], buf)


def test_host_rejects_bad_budget_and_allocator():
    with pytest.raises(ValueError, match=r"budget_bytes: expected an int >= 1 \(a byte count\)"):
        HostTier(0)
    with pytest.raises(TypeError, match="budget_bytes: expected an int, got '1MB'"):
        HostTier("1MB")
    h = HostTier(1 << 20, allocator=lambda shape, dtype: np.empty(shape, dtype)[..., ::2])
    with pytest.raises(ValueError, match="allocator: expected a C-contiguous float32 array"):
        h.reserve(1, ROW, "float32")
    h = HostTier(1 << 20)
    k = _keys(1)[0]
    assert k not in h and h.batch_put([k], [np.ones(ROW, np.float32)]) == [True] and k in h


def test_host_reserve_evicts_nothing_protected():
    v = np.ones(ROW, np.float32)
    h = HostTier(2 * v.nbytes)
    ks = _keys(2)
    h.batch_put(ks, [v, v])
    assert h.reserve(1, ROW, "float32", protect={k.storage_key() for k in ks}) == []
    assert h.batch_exists(ks) == 2
    assert len(h.reserve(1, ROW, "float32", protect={ks[1].storage_key()})) == 1
    assert h.batch_exists(ks) == 0 and ks[1] in h  # the LRU block went, the protected stayed


def test_host_rejects_dtype_not_matching_namespace():
    h = HostTier(1 << 20)
    with pytest.raises(ValueError, match="namespace dtype"):
        h.batch_put(_keys(1), [np.zeros(ROW, np.float16)])


def test_values_length_must_match_keys():
    with pytest.raises(ValueError, match="values: expected 2"):
        HostTier(1 << 20).batch_put(_keys(2), [np.zeros(ROW, np.float32)])


def test_host_get_checks_shape_and_dtype():
    h = HostTier(1 << 20)
    h.batch_put(_keys(1), [np.zeros(ROW, np.float32)])
    assert h.batch_get(_keys(1), shape=(1, 2)) == [None]
    assert h.batch_get(_keys(1), dtype="float16") == [None]
    assert h.batch_get(_keys(1), shape=ROW, dtype="float32")[0] is not None


# -- disk tier -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fsync", [False, True])
def test_disk_round_trip_and_restart(tmp_path, dtype, fsync):
    rng = np.random.default_rng(2)
    ns = _ns(dtype)
    vals = [_row(rng, dtype) for _ in range(4)]
    ks = _keys(4, ns)
    d = DiskTier(tmp_path, fsync=fsync)
    assert d.batch_put(ks, vals) == [True] * 4
    files = sorted(os.listdir(tmp_path / ns.digest()))
    assert files == sorted(k.block_hash.hex() + ".kvb" for k in ks)  # no temp files left
    d2 = DiskTier(tmp_path)  # a new process / model reload
    assert d2.used_bytes == d.used_bytes > 0
    assert d2.batch_exists(ks) == 4 and d2.batch_exists(_keys(4, _ns(dtype, salt="x"))) == 0
    got = d2.batch_get(ks, shape=ROW, dtype=dtype)
    assert all(_same(g, v) for g, v in zip(got, vals, strict=False))


def test_disk_budget_evicts_lru_by_use(tmp_path):
    v = np.ones(ROW, np.float32)
    size = len(record_bytes(_keys(1)[0], v))
    d = DiskTier(tmp_path, budget_bytes=3 * size)
    ks = _keys(5)
    assert d.batch_put(ks[:3], [v] * 3) == [True] * 3
    d.batch_get([ks[0]])  # touch
    assert d.batch_put(ks[3:], [v] * 2) == [True, True]
    assert [d.batch_exists([k]) for k in ks] == [1, 0, 0, 1, 1]
    assert d.used_bytes == 3 * size
    assert DiskTier(tmp_path, budget_bytes=size - 1).batch_put(_keys(1, start=9), [v]) == [False]


def test_disk_unexpected_shape_is_a_miss_but_kept(tmp_path):
    d = DiskTier(tmp_path)
    d.batch_put(_keys(1), [np.zeros(ROW, np.float32)])
    assert d.batch_get(_keys(1), shape=(1,)) == [None]
    assert d.batch_exists(_keys(1)) == 1


# -- chain -----------------------------------------------------------------------------------

def test_tiered_store_write_through_promotion_and_leading_exists(tmp_path):
    rng = np.random.default_rng(3)
    vals = [_row(rng) for _ in range(6)]
    ks = _keys(6)
    host = HostTier(2 * vals[0].nbytes)
    disk = DiskTier(tmp_path)
    store = TieredStore([host, disk])
    # one batch over the host budget: the host keeps the leading 2, the disk all 6
    assert store.batch_put(ks, vals) == [True] * 6
    assert host.batch_exists(ks) == 2 and disk.batch_exists(ks) == 6
    assert store.batch_exists(ks) == 6
    got = store.batch_get(ks[4:])
    assert all(_same(g, v) for g, v in zip(got, vals[4:], strict=False))
    assert host.batch_exists(ks[4:]) == 2 and host.batch_exists(ks) == 0  # promoted, LRU out
    disk.batch_remove([ks[3]])
    host.batch_remove([ks[3]])
    assert store.batch_exists(ks) == 3


def test_tiered_store_leading_hits_across_tiers(tmp_path):
    v = np.ones(ROW, np.float32)
    ks = _keys(4)
    host, disk = HostTier(1 << 20), DiskTier(tmp_path)
    host.batch_put([ks[0], ks[2]], [v, v])
    disk.batch_put([ks[1]], [v])
    assert TieredStore([host, disk]).batch_exists(ks) == 3


class _Broken(HostTier):
    name = "broken"

    def batch_exists(self, keys):
        raise ConnectionError("down")

    def batch_get(self, keys, **kw):
        raise ConnectionError("down")

    def batch_put(self, keys, values, **kw):
        raise ConnectionError("down")


def test_tiered_store_degrades_past_a_failing_tier(tmp_path):
    v = np.ones(ROW, np.float32)
    ks = _keys(2)
    disk = DiskTier(tmp_path)
    store = TieredStore([_Broken(1 << 20), disk])
    assert store.batch_put(ks, [v, v]) == [True, True]
    assert store.batch_exists(ks) == 2
    assert all(_same(g, v) for g in store.batch_get(ks))
    assert store.tier_errors["broken"] == 4  # put, exists, get, promotion put


def test_tiered_store_rejects_empty():
    with pytest.raises(ValueError, match="tiers"):
        TieredStore([])


# -- offloader -------------------------------------------------------------------------------

def _caches(rng, dtype, num_blocks=12, n=4, block_shape=(3, 2, 5)):
    return [_row(rng, dtype, (num_blocks, *block_shape)) for _ in range(n)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ops", ["numpy", "reference"])
def test_offload_onboard_exact(tmp_path, dtype, ops):
    rng = np.random.default_rng(4)
    caches = _caches(rng, dtype)
    ns = _ns(dtype)
    hashes = [bytes([i]) * 32 for i in range(5)]
    src = np.array([7, 2, 9, 0, 4], np.int32)
    kw = {} if ops == "numpy" else {"gather": gather_blocks_reference,
                                    "scatter": scatter_blocks_reference}
    store = TieredStore([HostTier(1 << 20), DiskTier(tmp_path)])
    off = BlockOffloader(store, ns, **kw)
    assert off.offload(caches, src, hashes) == [True] * 5
    assert off.lookup(hashes) == 5
    fresh = [np.full_like(c, np.nan) for c in caches]
    dst = np.array([1, 3, 5, 6, 8], np.int32)
    fresh, n = off.onboard(fresh, dst, hashes)
    assert n == 5
    want = gather_blocks_reference(caches, src)
    assert _same(gather_blocks_reference(fresh, dst), want)
    untouched = [b for b in range(12) if b not in dst]
    assert all(np.isnan(c[untouched].astype(np.float32)).all() for c in fresh)


def test_onboard_stops_at_first_miss_and_checks_namespace():
    rng = np.random.default_rng(5)
    caches = _caches(rng, "float32")
    hashes = [bytes([i]) * 32 for i in range(4)]
    off = BlockOffloader(HostTier(1 << 20), _ns())
    off.offload(caches, [0, 1, 3], [hashes[0], hashes[1], hashes[3]])
    fresh = [np.zeros_like(c) for c in caches]
    fresh, n = off.onboard(fresh, [4, 5, 6, 7], hashes)
    assert n == 2 and not fresh[0][6].any() and not fresh[0][7].any()
    other = BlockOffloader(off.store, _ns(salt="other"))
    assert other.onboard(fresh, [8, 9], hashes[:2])[1] == 0
    assert other.lookup(hashes) == 0


def test_offloader_input_checks():
    rng = np.random.default_rng(6)
    caches = _caches(rng, "float32")
    off = BlockOffloader(HostTier(1 << 20), _ns())
    with pytest.raises(ValueError, match="block_hashes"):
        off.offload(caches, [0, 1], [b"a"])
    with pytest.raises(ValueError, match="namespace dtype"):
        BlockOffloader(HostTier(1 << 20), _ns("float16")).offload(caches, [0], [b"a"])
    with pytest.raises(ValueError, match="block_ids"):
        off.offload(caches, [99], [b"a"])
    with pytest.raises(ValueError, match="block_ids"):
        off.onboard(caches, [1, 1], [b"a", b"b"])
    with pytest.raises(TypeError, match="namespace"):
        BlockOffloader(HostTier(1 << 20), "ns")


# -- events ----------------------------------------------------------------------------------

def _log(tier):
    from prefixkv.paged.events import EventLog

    log = EventLog()
    tier.events.subscribe(log)
    tier.block_size = 16
    return log


def test_host_events_carry_tier_salt_and_kind():
    v = np.ones(ROW, np.float32)
    h = HostTier(2 * v.nbytes)
    log = _log(h)
    a = [BlockKey(b"a", _ns(salt="s1")), BlockKey(b"b", _ns(salt="s2"))]
    h.batch_put(a, [v, v])
    h.batch_put(a, [v, v])  # already there: no new event
    h.batch_put(_keys(1), [v])  # evicts a[0]
    h.batch_remove([a[1]])
    h.clear()
    got = [(e.kind, e.tier, e.namespace, e.block_hashes, e.num_tokens) for e in log.events]
    assert got == [
        ("stored", "host", b"s1", (b"a",), 16), ("stored", "host", b"s2", (b"b",), 16),
        ("evicted", "host", b"s1", (b"a",), 16),
        ("stored", "host", b"", (_keys(1)[0].block_hash,), 16),
        ("removed", "host", b"s2", (b"b",), 16), ("cleared", "host", b"", (), 0)]


def test_disk_events_stored_evicted_and_corrupt_removed(tmp_path):
    v = np.ones(ROW, np.float32)
    size = len(record_bytes(_keys(1)[0], v))
    d = DiskTier(tmp_path, budget_bytes=2 * size)
    log = _log(d)
    ks = _keys(3)
    d.batch_put(ks[:2], [v, v])
    d.batch_put(ks[2:], [v])  # evicts the first (a put never evicts its own blocks)
    with open(d.path(ks[1]), "r+b") as f:
        f.truncate(10)
    d.batch_get([ks[1]])
    got = [(e.kind, e.block_hashes) for e in log.events]
    assert got == [("stored", (ks[0].block_hash, ks[1].block_hash)),
                   ("evicted", (ks[0].block_hash,)), ("stored", (ks[2].block_hash,)),
                   ("removed", (ks[1].block_hash,))]
    from prefixkv.paged.events import replay

    assert replay(log.events) == {b"": {ks[2].block_hash: -1}}
    assert all(e.tier == "disk" for e in log.events)


def test_tiered_store_events_carry_every_tiers_events(tmp_path):
    """One subscription to a TieredStore follows the chain: each tier's events, in order,
    with its own tier name (the store's bus used to publish nothing); block_size set on the
    store reaches every tier (KVEvent.num_tokens)."""
    v = np.ones(ROW, np.float32)
    host, disk = HostTier(2 * v.nbytes), DiskTier(tmp_path)
    store = TieredStore([host, disk])
    store.block_size = 16
    log, per_tier = EventLog(), {t.name: _log(t) for t in (host, disk)}
    store.events.subscribe(log)
    ks = _keys(3)
    store.batch_put(ks[:2], [v, v])
    store.batch_put(ks[2:], [v])         # the host evicts the first, the disk keeps all 3
    assert store.batch_get(ks[:1])[0] is not None  # a disk hit, promoted into the host
    assert {e.tier for e in log.events} == {"host", "disk"}
    for name, tier_log in per_tier.items():
        assert [e for e in log.events if e.tier == name] == tier_log.events
    assert all(e.num_tokens == 16 * len(e.block_hashes) for e in log.events)
    assert [e.kind for e in per_tier["host"].events].count("evicted") >= 1


def test_host_events_replay_to_its_contents_under_a_random_stream():
    from prefixkv.paged.events import replay

    rng = np.random.default_rng(9)
    v = np.ones(ROW, np.float32)
    h = HostTier(6 * v.nbytes)
    log = _log(h)
    salts = [None, "x", "y"]
    for _ in range(200):
        ks = [BlockKey(int(rng.integers(0, 12)), _ns(salt=salts[int(rng.integers(0, 3))]))
              for _ in range(int(rng.integers(1, 5)))]
        ks = list(dict.fromkeys(ks))
        if rng.random() < 0.2:
            h.batch_remove(ks)
        elif rng.random() < 0.3:
            for r in h.reserve(len(ks), ROW, "float32"):
                r[...] = 1
            h.batch_put(ks, [v] * len(ks))
        else:
            h.batch_put(ks, [v] * len(ks))
        want: dict[bytes, dict[bytes, int]] = {}
        for e in h._entries.values():
            want.setdefault(e.key.namespace.salt, {})[e.key.block_hash] = -1
        assert replay(log.events) == want


def test_tiers_import_is_numpy_only():
    import subprocess
    import sys

    code = ("import sys, prefixkv.paged.tiers as t; t.HostTier; t.DiskTier; t.TieredStore; "
            "bad = [m for m in ('redis', 'nixl', 'torch', 'jax') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_nixl_import_error_names_the_install(monkeypatch):
    import builtins

    from prefixkv.paged.tiers import nixl as nixl_mod

    real = builtins.__import__

    def fake(name, *a, **kw):
        if name == "nixl" or name.startswith("nixl."):
            raise ImportError("no nixl")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match="pip install --no-deps nixl"):
        nixl_mod.NixlPeer(1, 64)
