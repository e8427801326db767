"""Mooncake store remote tier against a real store on 127.0.0.1: mooncake_master (built-in HTTP
metadata server) + one mooncake_client storage node started here; the tier is a third process's
worth of client (no memory of its own), so every block crosses the TCP transport."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import pytest
from prefixkv.paged.reference import (
    gather_blocks_reference,
    paged_attention_reference,
    scatter_blocks_reference,
    write_kv_reference,
)
from prefixkv.paged.spec import numpy_dtype
from prefixkv.paged.tiers import BlockKey, BlockOffloader, Namespace
from prefixkv.paged.tiers.base import record_bytes
from tier_helpers import ROW
from tier_helpers import rows as _rows

DTYPES = ["float32", "float16", "bfloat16"]
SKIP = "mooncake not installed (pip install mooncake-transfer-engine-non-cuda; apt libibverbs1)"


def _same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _ns(dtype="float32", salt=None, model="tiny-model"):
    return Namespace(model, dtype=dtype, salt=salt)


def _keys(n, ns=None, start=0):
    ns = ns or _ns()
    return [BlockKey(i.to_bytes(4, "big"), ns) for i in range(start, start + n)]


def _local_store(**kw):
    pytest.importorskip("mooncake.store", reason=SKIP)
    from prefixkv.paged.tiers.mooncake import LocalMooncakeStore

    try:
        return LocalMooncakeStore(**kw).start()
    except FileNotFoundError as e:
        pytest.skip(f"mooncake binaries absent: {e}")


@pytest.fixture(scope="module")
def mc_store():
    st = _local_store()
    yield st
    st.stop()


@pytest.fixture(scope="module")
def shared_tier(mc_store):
    from prefixkv.paged.tiers import MooncakeTier

    t = MooncakeTier(mc_store.master, mc_store.metadata_server, staging_bytes=1 << 20,
                     max_batch=3)
    yield t
    t.close()  # ~1 s (the client unmounts and deregisters): one tier for the module


@pytest.fixture()
def tier(shared_tier, request):
    from prefixkv.paged.events import EventBus
    from prefixkv.paged.tiers import TierStats

    t = shared_tier
    t.prefix = f"t-{request.node.name}/"
    t.stats, t.events = TierStats(), EventBus()
    t.clear()
    yield t
    t.clear()


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_batched(tier, dtype):
    ns = _ns(dtype)
    ks, vals = _keys(7, ns), _rows(7, dtype)  # 7 keys over max_batch=3: three batches
    assert tier.batch_exists(ks) == 0
    assert tier.batch_get(ks, shape=ROW, dtype=dtype) == [None] * 7
    assert tier.batch_put(ks, vals) == [True] * 7
    assert tier.batch_exists(ks) == 7
    assert tier.batch_exists([ks[0], _keys(1, ns, 99)[0], ks[1]]) == 1
    got = tier.batch_get(ks, shape=ROW, dtype=dtype)
    assert all(_same(g, v) for g, v in zip(got, vals, strict=True))
    assert not got[0].flags.writeable
    unsized = tier.batch_get(ks[:2])  # no expected shape: the client-buffer path
    assert all(_same(g, v) for g, v in zip(unsized, vals, strict=False))
    assert tier.batch_put(ks[:1], vals[:1]) == [True]  # already there: stored
    assert tier.batch_remove(ks[:2]) == 2 and tier.batch_exists(ks) == 0
    assert tier.batch_exists(ks[2:]) == 5
    assert tier.stats.errors == 0 and tier.stats.corrupt == 0


def test_mixed_hits_and_staging_batches(tier):
    # ~1 MiB staging: 40 rows of 24 KiB split into several transfers; every other key absent.
    shape = (4, 16, 8, 12)
    ks, vals = _keys(40, start=1000), _rows(40, seed=7, shape=shape)
    assert tier.batch_put(ks[::2], vals[::2]) == [True] * 20
    got = tier.batch_get(ks, shape=shape, dtype="float32")
    for i, g in enumerate(got):
        assert (g is None) if i % 2 else _same(g, vals[i])
    assert tier.stats.hits == 20 and tier.stats.misses >= 20


def test_wrong_shape_dtype_key_or_checksum_is_a_miss(tier):
    ks, vals = _keys(3, start=50), _rows(3, seed=1)
    assert tier.batch_put(ks, vals) == [True] * 3
    assert tier.batch_get(ks[:1], shape=(1,)) == [None]  # other shape
    assert tier.batch_get(ks[:1], shape=ROW, dtype="float16") == [None]  # other dtype
    assert tier.batch_get(ks[:1], shape=ROW, dtype="no-such-dtype") == [None]
    assert tier.batch_get(ks[:1], shape=ROW[::-1]) == [None]  # same bytes, other shape
    assert _same(tier.batch_get(ks[:1])[0], vals[0])  # no expected shape: served as stored
    assert _same(tier.batch_get(ks[:1], shape=ROW)[0], vals[0])  # still there, still good
    # A record written under another key's name (a foreign/stale object), and a flipped bit.
    store, name = tier.store, tier._name
    corrupt = tier.stats.corrupt
    assert store.remove(name(ks[1]), True) == 0 and store.remove(name(ks[2]), True) == 0
    foreign = record_bytes(ks[0], vals[1])
    assert store.put(name(ks[1]), foreign) == 0
    bad = bytearray(record_bytes(ks[2], vals[2]))
    bad[-1] ^= 1
    assert store.put(name(ks[2]), bytes(bad)) == 0
    assert tier.batch_get(ks, shape=ROW, dtype="float32")[1:] == [None, None]
    assert tier.stats.corrupt == corrupt + 2
    # bad records are dropped, so a put stores the right block again
    assert tier.batch_exists(ks[1:]) == 0
    assert tier.batch_put(ks[1:], vals[1:]) == [True, True]
    got = tier.batch_get(ks, shape=ROW)
    assert all(_same(g, v) for g, v in zip(got, vals, strict=True))


def test_overwrite_last_write_wins_or_keeps(tier):
    ks = _keys(1, start=70)
    small, big = _rows(1, seed=8)[0], _rows(1, seed=9, shape=(8, 3, 2, 5))[0]
    assert tier.batch_put(ks, [small]) == [True]
    assert tier.batch_put(ks, [big]) == [True]  # another shape under the same key: replaced
    assert tier.batch_get(ks, shape=ROW) == [None]
    assert _same(tier.batch_get(ks, shape=big.shape)[0], big)
    tier.overwrite = False
    try:
        assert tier.batch_put(ks, [small]) == [True]  # kept: the stored record is `big`
        assert _same(tier.batch_get(ks, shape=big.shape)[0], big)
        assert tier.batch_get(ks, shape=ROW) == [None]  # never the wrong block
    finally:
        tier.overwrite = True


def test_oversize_record_is_refused(tier):
    big = np.zeros((512, 1024), np.float32)  # 2 MiB > 1 MiB staging
    ks = _keys(2, start=60)
    assert tier.batch_put(ks, [big, _rows(1)[0]]) == [False, True]
    assert tier.batch_get(ks[:1], shape=big.shape) == [None]


def test_equal_hashes_under_different_salts_never_collide(tier):
    salts = [None, "a", "b", b"a\0", "tenant-1"]
    hashes = [bytes([i]) * 32 for i in range(3)]
    for j, salt in enumerate(salts):
        ks = [BlockKey(h, _ns(salt=salt)) for h in hashes]
        assert all(tier.batch_put(ks, [np.full(ROW, 10 * j + i, np.float32)
                                       for i in range(3)]))
    names = {tier._name(BlockKey(hashes[0], _ns(salt=s))) for s in salts}
    assert len(names) == len(salts)  # the salt is in every object name
    for j, salt in enumerate(salts):
        got = tier.batch_get([BlockKey(h, _ns(salt=salt)) for h in hashes], shape=ROW)
        assert all(_same(g, np.full(ROW, 10 * j + i, np.float32)) for i, g in enumerate(got))
    other = [BlockKey(h, _ns(salt="never-stored")) for h in hashes]
    assert tier.batch_exists(other) == 0 and tier.batch_get(other) == [None] * 3
    assert tier.batch_exists([BlockKey(hashes[0], _ns(model="other"))]) == 0


def test_events(tier):
    from prefixkv.paged.events import EventLog

    log = EventLog()
    tier.events.subscribe(log)
    ks = [BlockKey(b"h1", _ns(salt="s")), BlockKey(b"h2", _ns(salt="s"))]
    tier.batch_put(ks, _rows(2))
    tier.batch_remove(ks[:1])
    tier.clear()
    assert [(e.kind, e.tier, e.namespace, e.block_hashes) for e in log.events] == [
        ("stored", "mooncake", b"s", (b"h1", b"h2")),
        ("removed", "mooncake", b"s", (b"h1",)),
        ("cleared", "mooncake", b"", ())]
    assert tier.batch_exists(ks[1:]) == 0


def test_bad_dtype_stores_nothing(tier, mc_store):
    from prefixkv.paged.events import EventLog

    log = EventLog()
    tier.events.subscribe(log)
    ks = _keys(3, start=80)
    keys_before = mc_store.key_count()
    with pytest.raises(ValueError, match=r"values\[1\]: dtype bfloat16 does not match the key's "
                                         "namespace dtype float32"):
        tier.batch_put(ks, _rows(1) + _rows(1, "bfloat16") + _rows(1))
    assert tier.batch_exists(ks) == 0 and mc_store.key_count() == keys_before
    assert log.events == [] and tier.stats.puts == 0


@pytest.mark.parametrize("overwrite", [True, False])
def test_repeated_key_in_one_batch_is_stored_once(tier, mc_store, overwrite):
    """Posted twice in one batch, the store allocated two copies of the object and a remove
    freed one: the other stayed allocated for good."""
    from prefixkv.paged.events import EventLog

    log = EventLog()
    tier.events.subscribe(log)
    a, b, c = _keys(3, start=90)
    va, vb, vc, va2 = _rows(4, seed=11)
    allocated, keys_before = mc_store.allocated_bytes(), mc_store.key_count()
    tier.overwrite = overwrite
    try:
        # max_batch=3: both occurrences of `a` would go in the first batch
        assert tier.batch_put([a, b, a, c], [va, vb, va2, vc]) == [True] * 4
    finally:
        tier.overwrite = True
    assert tier.stats.puts == 3 and tier.stats.rejected == 0
    assert tier.stats.bytes_written == sum(
        len(record_bytes(k, v, checksum_alg=tier.checksum))
        for k, v in ((a, va), (b, vb), (c, vc)))
    assert [h for e in log.events for h in e.block_hashes] == [
        a.block_hash, b.block_hash, c.block_hash]
    assert mc_store.key_count() == keys_before + 3
    got = tier.batch_get([a, b, c], shape=ROW)
    assert all(_same(g, v) for g, v in zip(got, [va, vb, vc], strict=True))  # the first value
    tier.clear()
    assert mc_store.key_count() == keys_before
    assert mc_store.allocated_bytes() == allocated  # nothing left allocated


class _FailingPuts:
    """A Mooncake store whose puts raise (an RPC fault) after the first ``n`` batches."""

    def __init__(self, store, n):
        self._store, self._n = store, n

    def _put(self, name, *args):
        if self._n == 0:
            raise RuntimeError("injected: master RPC failed")
        self._n -= 1
        return getattr(self._store, name)(*args)

    def batch_upsert_from(self, *args):
        return self._put("batch_upsert_from", *args)

    def batch_put_from(self, *args):
        return self._put("batch_put_from", *args)

    def __getattr__(self, name):
        return getattr(self._store, name)


def test_store_fault_midway_repeats_report_the_stored_result(tier):
    from prefixkv.paged.events import EventLog

    log = EventLog()
    tier.events.subscribe(log)
    a, b, c, d = _keys(4, start=100)
    real = tier.store
    tier.store = _FailingPuts(real, 1)
    try:
        # max_batch=3: [a, b, c] goes through, the next batch fails: False, never an exception
        assert tier.batch_put([a, b, c, a, d], _rows(5)) == [True, True, True, True, False]
        assert tier.stats.errors == 1 and tier.stats.puts == 3 and tier.stats.rejected == 1
        assert [e.block_hashes for e in log.events] == [(a.block_hash, b.block_hash,
                                                          c.block_hash)]
        assert not tier.available
        assert tier.batch_put([d, d], _rows(2)) == [False, False]  # marked down: at once
        assert tier.stats.rejected == 2
    finally:
        tier.store = real
        tier._down_until, tier._suspect = 0.0, False
    assert tier.batch_exists([a, b, c, d]) == 3


class _Stalled:
    """A Mooncake store whose master stalls: every RPC answers ``code`` (-901, RPC_TIMEOUT,
    after the client's 30 s wait; here at once), counting the calls."""

    def __init__(self, store, code=-901):
        self._store, self.code, self.calls = store, code, 0

    def _answer(self, names, *args):
        self.calls += 1
        return [self.code] * len(names)

    batch_get_into = batch_upsert_from = batch_put_from = _answer

    def batch_remove(self, names, force):
        return self._answer(names)

    def remove_by_regex(self, regex, force):
        self.calls += 1
        return self.code

    def __getattr__(self, name):
        return getattr(self._store, name)


@pytest.mark.parametrize("code", [-901, -950])
def test_every_rpc_error_marks_the_store_down(tier, code):
    """-900 alone marked the store down: a stalled master's -901 (RPC_TIMEOUT) cost every
    call the client's 30 s wait, and "cleared" went out though nothing was removed. An
    explicit clear() is tried even while marked down (it had been dropped silently), and
    counted again when it fails again."""
    from prefixkv.paged.events import EventLog

    log = EventLog()
    tier.events.subscribe(log)
    ks = _keys(2, start=700)
    real = tier.store
    stalled = tier.store = _Stalled(real, code)
    try:
        clear = tier.clear
        for call in (lambda: tier.batch_get(ks, shape=ROW, dtype="float32"),
                     lambda: tier.batch_put(ks, _rows(2)),
                     lambda: tier.batch_remove(ks),
                     clear):
            tier._down_until, tier._suspect = 0.0, False
            errors, calls = tier.stats.errors, stalled.calls
            call()
            assert tier.stats.errors == errors + 1 and not tier.available
            call()  # marked down: answered at once, the store not asked (clear: tried)
            if call is clear:
                assert stalled.calls == calls + 2 and tier.stats.errors == errors + 2
            else:
                assert stalled.calls == calls + 1
        assert log.events == []
    finally:
        tier.store = real
        tier._down_until, tier._suspect = 0.0, False


def test_clear_that_the_store_refuses_publishes_nothing(tier):
    from prefixkv.paged.events import EventLog

    ks = _keys(2, start=720)
    assert tier.batch_put(ks, _rows(2)) == [True, True]
    log = EventLog()
    tier.events.subscribe(log)
    real = tier.store
    tier.store = _Stalled(real, -1)  # an error that is no RPC fault: counted, not down
    try:
        errors = tier.stats.errors
        tier.clear()
        assert log.events == [] and tier.stats.errors == errors + 1 and tier.available
    finally:
        tier.store = real
    assert tier.batch_exists(ks) == 2
    tier.clear()
    assert [e.kind for e in log.events] == ["cleared"] and tier.batch_exists(ks) == 0


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"global_segment_bytes": -1}, ValueError, "global_segment_bytes: expected an int >= 0"),
    ({"local_buffer_bytes": -5}, ValueError, "local_buffer_bytes: expected an int >= 0"),
    ({"staging_bytes": 2.5}, TypeError, "staging_bytes: expected an int"),
    ({"staging_bytes": True}, TypeError, "staging_bytes: expected an int"),
    ({"staging_bytes": 0}, ValueError, "staging_bytes: expected an int >= 1"),
    ({"protocol": "bogus"}, ValueError, "protocol: expected one of tcp, rdma"),
    ({"prefix": 5}, TypeError, "prefix: expected a str"),
    ({"retry_interval": -1}, ValueError, "retry_interval: expected seconds >= 0"),
    ({"connect_timeout": "1"}, TypeError, "connect_timeout: expected a number")], ids=str)
def test_bad_arguments_are_named_at_construction(kwargs, error, match):
    from prefixkv.paged.tiers import MooncakeTier

    with pytest.raises(error, match=match):
        MooncakeTier("127.0.0.1:1", **kwargs)


def test_import_error_names_the_package(monkeypatch):
    import builtins

    from prefixkv.paged.tiers import mooncake as mc

    real = builtins.__import__

    def fake(name, *a, **kw):
        if name == "mooncake" or name.startswith("mooncake."):
            raise ImportError("no mooncake")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match="mooncake-transfer-engine-non-cuda"):
        mc.MooncakeTier("127.0.0.1:1")


def test_bad_master_address_is_named():
    pytest.importorskip("mooncake.store", reason=SKIP)
    from prefixkv.paged.tiers import MooncakeTier

    with pytest.raises(ValueError, match="master"):
        MooncakeTier("no-port-here")


# -- faults: servers killed mid-run (a private store per test) --------------------------------

@contextlib.contextmanager
def _private_store(seed: int, **tier_kwargs):
    """(store, tier, keys, rows): a store of its own (the test kills its servers) whose tier
    holds 4 blocks; the tier closed and the store stopped afterwards."""
    from prefixkv.paged.tiers import MooncakeTier

    st = _local_store()
    t = MooncakeTier(st.master, st.metadata_server, staging_bytes=1 << 20, **tier_kwargs)
    try:
        ks, vals = _keys(4), _rows(4, seed=seed)
        assert t.batch_put(ks, vals) == [True] * 4
        yield st, t, ks, vals
    finally:
        t.close()
        st.stop()


def test_storage_node_killed_is_a_miss():
    with _private_store(2) as (st, t, ks, vals):
        st.kill_storage()  # the memory holding every block is gone
        t0 = time.monotonic()
        assert t.batch_get(ks, shape=ROW) == [None] * 4
        assert t.batch_put(_keys(2, start=10), vals[:2]) == [False, False]
        assert time.monotonic() - t0 < 5
        assert t.stats.errors >= 1


def test_full_store_refuses_puts_and_serves_nothing_wrong():
    from prefixkv.paged.tiers import MooncakeTier

    st = _local_store(segment_bytes=16 << 20)
    t = MooncakeTier(st.master, st.metadata_server, staging_bytes=4 << 20)
    try:
        shape = (256, 1024)  # 1 MiB rows: 24 of them into 16 MiB of store
        ks = _keys(24, start=500)
        vals = [np.full(shape, i, np.float32) for i in range(24)]
        ok = []
        for i in range(0, 24, 4):
            ok += t.batch_put(ks[i:i + 4], vals[i:i + 4])
        assert any(ok) and not all(ok)
        got = t.batch_get(ks, shape=shape, dtype="float32")
        assert any(g is not None for g in got)
        assert all(g is None or _same(g, v) for g, v in zip(got, vals, strict=True))
        assert t.stats.rejected == ok.count(False)
    finally:
        t.close()
        st.stop()


def test_master_killed_then_back():
    with _private_store(3, retry_interval=0.3) as (st, t, ks, vals):
        st.kill_master()
        t0 = time.monotonic()
        for _ in range(3):  # the first call fails fast, then the tier answers at once
            assert t.batch_exists(ks) == 0
            assert t.batch_get(ks, shape=ROW) == [None] * 4
            assert t.batch_put(_keys(1, start=20), vals[:1]) == [False]
            assert t.batch_remove(ks) == 0
            t.clear()
        assert not t.available and t.stats.errors >= 1
        time.sleep(0.4)  # retry due: a TCP probe finds the master still down
        assert t.batch_get(ks, shape=ROW) == [None] * 4
        assert time.monotonic() - t0 < 3
        st.start()  # the master comes back on its port; the storage node mounts again
        time.sleep(0.4)
        got = t.batch_get(ks, shape=ROW)  # the old master's objects are gone: misses
        assert all(g is None or _same(g, v) for g, v in zip(got, vals, strict=True))
        assert t.batch_put(ks, vals) == [True] * 4
        got = t.batch_get(ks, shape=ROW)
        assert all(_same(g, v) for g, v in zip(got, vals, strict=True))
    assert t.batch_get(ks) == [None] * 4 and t.batch_put(ks, vals) == [False] * 4  # closed


def test_master_killed_unsized_get_marks_the_store_down():
    # get_batch answers b"" per key for a dead master (after the client's ~4 s timeout, no
    # error): batch_get without shape= never marked the store down and every call waited again
    with _private_store(5, retry_interval=60) as (st, t, ks, vals):
        got = t.batch_get(ks)  # unsized, master up: the objects held are fetched
        assert all(_same(g, v) for g, v in zip(got, vals, strict=True))
        assert t.batch_get(_keys(2, start=50)) == [None, None] and t.stats.errors == 0
        st.kill_master()
        assert t.batch_get(ks) == [None] * 4
        assert t.stats.errors == 1 and not t.available
        t0 = time.monotonic()
        assert t.batch_get(ks) == [None] * 4 and t.batch_get(ks, shape=ROW) == [None] * 4
        assert time.monotonic() - t0 < 0.5 and t.stats.errors == 1


def test_shape_overflowing_int64_is_a_miss_not_a_fault(tier):
    # np.prod wrapped (2**62 * 3): a negative size the client refused with a TypeError,
    # taken for a store fault that marked the store down
    ks, vals = _keys(2), _rows(2, seed=6)
    assert tier.batch_put(ks, vals) == [True, True]
    for shape in ((2**62, 3), (2**40, 2**40), (1 << 20, 1 << 20)):
        assert tier.batch_get(ks, shape=shape) == [None, None]
    assert tier.available and tier.stats.errors == 0
    got = tier.batch_get(ks, shape=ROW)
    assert all(_same(g, v) for g, v in zip(got, vals, strict=True))
    assert tier.batch_put(_keys(1, start=5), vals[:1]) == [True]


def test_master_down_at_start_is_a_miss():
    from prefixkv.paged.tiers import MooncakeTier

    pytest.importorskip("mooncake.store", reason=SKIP)
    from prefixkv.paged.tiers.mooncake import _free_port

    port = _free_port()  # nothing listens here
    t0 = time.monotonic()
    t = MooncakeTier(f"127.0.0.1:{port}", f"http://127.0.0.1:{_free_port()}/metadata",
                     retry_interval=0.1)
    try:
        assert t.store is None and not t.available
        assert t.batch_put(_keys(1), _rows(1)) == [False]
        time.sleep(0.15)
        assert t.batch_exists(_keys(1)) == 0 and t.batch_get(_keys(1)) == [None]
    finally:
        t.close()
    assert time.monotonic() - t0 < 10


# -- end to end: PrefixCache engine -> BlockOffloader -> Mooncake -> fresh engine ----------

BS, HKV, HQ, D = 4, 2, 4, 8


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_offload_drop_onboard_bit_exact(tier, dtype):
    from prefixkv.paged.prefix_cache import PrefixCache

    dt = numpy_dtype(dtype)
    rng = np.random.default_rng(5)
    tokens = list(range(300, 323))  # 23 tokens: 5 full blocks
    keys = rng.standard_normal((len(tokens), HKV, D)).astype(dt)
    vals = rng.standard_normal((len(tokens), HKV, D)).astype(dt)
    q = rng.standard_normal((1, HQ, D)).astype(dt)

    def engine():
        pc = PrefixCache(16, BS)
        return pc, [np.full((16, BS, HKV, D), np.nan, dt), np.full((16, BS, HKV, D), np.nan, dt)]

    def attend(pc, caches):
        blocks = pc.blocks("r")
        table = np.asarray([blocks], np.int32)
        kv_len = np.array([pc.num_computed("r")], np.int32)
        return paged_attention_reference(q, caches[0], caches[1], table, kv_len, None)

    pc, caches = engine()
    pc.add_request("r", tokens, salt="tenant-a")
    plan = pc.step([("r", len(tokens))])
    caches = list(write_kv_reference(keys, vals, *caches, plan.slot_mapping))
    want = attend(pc, caches)

    ns = Namespace("e2e-model", dtype=dtype)  # tier: the module's store, this test's prefix
    off = BlockOffloader(tier, ns, gather=gather_blocks_reference,
                         scatter=scatter_blocks_reference)
    full = len(tokens) // BS
    hashes = pc.request_hashes("r")[:full]
    blocks = np.asarray(pc.blocks("r")[:full], np.int32)
    rns = ns.with_salt(pc.namespace("r"))
    assert off.offload(caches, blocks, hashes, namespace=rns) == [True] * full
    pc.free("r")
    del pc, caches  # the device copy is gone

    pc2, caches2 = engine()
    pc2.add_request("warm", list(range(5)))  # shift block ids vs the source
    pc2.step([("warm", 5)])
    pc2.add_request("r", tokens, salt="tenant-a")
    caches2, n = off.onboard_request(pc2, "r", caches2)
    assert n == full
    done = pc2.num_computed("r")
    assert done == n * BS
    plan = pc2.step([("r", len(tokens) - done)])
    caches2 = list(write_kv_reference(keys[done:], vals[done:], *caches2,
                                      plan.slot_mapping))
    assert _same(attend(pc2, caches2), want)
    ids = np.asarray(pc2.blocks("r")[:n], np.int32)
    assert _same(gather_blocks_reference([caches2[0]], ids).reshape(-1, HKV, D),
                 keys[:n * BS])

    pc3, caches3 = engine()  # another salt: nothing onboarded
    pc3.add_request("r", tokens, salt="tenant-b")
    assert off.onboard_request(pc3, "r", caches3)[1] == 0


def test_clear_while_marked_down_is_tried(tier):
    """clear() during the back-off after a fault, the store back: it removed nothing and
    published nothing, silently (RedisTier.clear tries); now it clears."""
    import time

    from prefixkv.paged.events import EventLog

    ks = _keys(2, start=740)
    assert tier.batch_put(ks, _rows(2)) == [True, True]
    log = EventLog()
    tier.events.subscribe(log)
    tier._down_until, tier._suspect = time.monotonic() + 60, True  # as after a fault
    try:
        tier.clear()
        assert [e.kind for e in log.events] == ["cleared"] and tier.available
        assert tier.batch_exists(ks) == 0
    finally:
        tier._down_until, tier._suspect = 0.0, False
