"""Tier contracts from a review: a tier's ``checksum`` (and Redis ``max_batch``, NIXL
``staging_slots``, Mooncake ``max_batch``, DiskTier ``budget_bytes``) is checked when the tier
is made, naming the argument; the read and remove paths of every tier and of TieredStore raise
a TypeError naming ``keys[i]`` for a key that is not a BlockKey (TieredStore used to swallow
it as a tier fault); a DiskTier keeps a file indexed when a re-put or a read of it fails;
TieredStore reports a key stored by a tier that raised later in the same put; onboard_request
looks blocks up under the offload_on_evict ``namespace_for``; Namespace names model_id /
layout a str UTF-8 cannot encode. tmp_path and fakes only: no servers."""

from __future__ import annotations

import contextlib
import errno
import os
from collections import OrderedDict

import numpy as np
import pytest
from prefixkv.paged.prefix_cache import PrefixCache
from prefixkv.paged.tiers import (
    BlockOffloader,
    DiskTier,
    HostTier,
    Namespace,
    TieredStore,
    encode_record,
)
from prefixkv.paged.tiers import base as tier_base
from prefixkv.paged.tiers import disk as disk_module
from prefixkv.paged.tiers.base import Tier
from tier_helpers import ROW, keys, rows, same

# -- checksum= checked when a tier is made -------------------------------------------------


class _FakeRedis:
    """Answers what RedisTier asks, from a dict (no server)."""

    def __init__(self):
        self.data = {}

    def pipeline(self, **kw):
        client, ops = self, []

        class Pipe:
            def set(self, k, v, px=None):
                ops.append(lambda: client.data.__setitem__(k, bytes(v)) or True)

            def exists(self, k):
                ops.append(lambda: int(k in client.data))

            def delete(self, k):
                ops.append(lambda: int(client.data.pop(k, None) is not None))

            def execute(self, raise_on_error=True):
                return [op() for op in ops]

        return Pipe()

    def mget(self, ks):
        return [self.data.get(k) for k in ks]


def _redis(**kw):
    pytest.importorskip("redis")
    from prefixkv.paged.tiers import RedisTier

    return RedisTier(client=_FakeRedis(), **kw)


def _nixl_tier(**kw):
    from prefixkv.paged.tiers import NixlTier

    return NixlTier({}, **kw)  # the arguments are checked before the peer is read


def _mooncake_tier(**kw):
    from prefixkv.paged.tiers import MooncakeTier

    return MooncakeTier("127.0.0.1:1", **kw)  # checked before the client is imported


_MAKERS = {
    "disk": lambda tmp_path, **kw: DiskTier(tmp_path, **kw),
    "redis": lambda tmp_path, **kw: _redis(**kw),
    "nixl": lambda tmp_path, **kw: _nixl_tier(**kw),
    "mooncake": lambda tmp_path, **kw: _mooncake_tier(**kw),
}


@pytest.mark.parametrize("tier", list(_MAKERS))
@pytest.mark.parametrize(("bad", "exc"), [("md5", ValueError), ("CRC32", ValueError),
                                          (5, TypeError)])
def test_unknown_checksum_is_refused_when_the_tier_is_made(tmp_path, tier, bad, exc):
    """It was stored as given and every put then raised KeyError (a TieredStore counted a
    tier fault and the tier silently stored nothing)."""
    with pytest.raises(exc, match=r"checksum: expected None or one of crc32, xxh3_128"):
        _MAKERS[tier](tmp_path, checksum=bad)


def test_checksum_unavailable_here_is_refused_when_the_tier_is_made(tmp_path, monkeypatch):
    monkeypatch.setattr(tier_base, "_xxhash", lambda: None)  # a base install: no xxhash
    with pytest.raises(ValueError, match="checksum: 'xxh3_128' needs the xxhash package"):
        DiskTier(tmp_path, checksum="xxh3_128")
    d = DiskTier(tmp_path, checksum="crc32")  # the named fallback works
    (k,), (v,) = keys(1), rows(1)
    assert d.batch_put([k], [v]) == [True]


def test_tiered_store_with_a_bad_checksum_fails_at_construction_not_silently(tmp_path):
    with pytest.raises(ValueError, match="checksum"):
        TieredStore([HostTier(1 << 20), DiskTier(tmp_path, checksum="sha1")])


def test_encode_record_unknown_checksum_is_a_value_error():
    (k,), (v,) = keys(1), rows(1)
    with pytest.raises(ValueError, match="checksum_alg: expected None or one of crc32"):
        encode_record(k, v, checksum_alg="md5")
    header, payload = encode_record(k, v, checksum_alg="crc32")
    assert payload.nbytes == v.nbytes and len(header) > 0


# -- keys that are not BlockKeys on the read and remove paths ------------------------------


def _fake_nixl():
    from prefixkv.paged.tiers import NixlTier

    t = object.__new__(NixlTier)
    Tier.__init__(t)
    t.num_slots, t.slot_bytes, t.staging_slots, t.checksum = 4, 4096, 4, None
    t.staging = np.zeros((4, 4096), np.uint8)
    t._index, t._free = OrderedDict(), [3, 2, 1, 0]
    return t


def _tiers(tmp_path):
    out = {"host": HostTier(1 << 20), "disk": DiskTier(tmp_path / "d"),
           "tiered": TieredStore([HostTier(1 << 20), DiskTier(tmp_path / "t")]),
           "nixl": _fake_nixl()}
    with contextlib.suppress(pytest.skip.Exception):  # no redis client: the others
        out["redis"] = _redis()
    return out


@pytest.mark.parametrize("method", ["batch_exists", "batch_get", "batch_remove"])
def test_read_and_remove_paths_name_a_key_that_is_not_a_block_key(tmp_path, method):
    """An AttributeError ('bytes' has no storage_key) before; TieredStore took it for a tier
    fault: a miss, counted in stats.errors."""
    ks, vs = keys(2), rows(2)
    for name, t in _tiers(tmp_path).items():
        if name != "nixl":
            assert t.batch_put(ks, vs) == [True, True], name
        with pytest.raises(TypeError, match=r"keys\[0\]: expected BlockKey, got bytes"):
            getattr(t, method)([ks[0].block_hash])
        with pytest.raises(TypeError, match=r"keys\[1\]: expected BlockKey, got str"):
            getattr(t, method)([ks[0], "k1"])
        assert t.stats.errors == 0, name
        if isinstance(t, TieredStore):
            assert t.tier_errors == {"host": 0, "disk": 0}
        if name != "nixl":  # nothing was removed by the refused calls
            assert t.batch_exists(ks) == 2, name


def test_host_touch_names_a_key_that_is_not_a_block_key():
    with pytest.raises(TypeError, match=r"keys\[0\]: expected BlockKey, got bytes"):
        HostTier(1 << 20).touch([b"\x00\x00\x00\x01"])


# -- DiskTier keeps a file indexed when a re-put or a read of it fails ----------------------


def _enospc(*a, **kw):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_failed_reput_keeps_the_old_file_indexed(tmp_path, monkeypatch):
    """The old file was forgotten before the write: still on disk and served, but no longer in
    used_bytes, never evicted, not deleted by clear()."""
    disk = DiskTier(tmp_path)
    (k,), (v,) = keys(1), rows(1)
    assert disk.batch_put([k], [v]) == [True]
    size = os.path.getsize(disk.path(k))
    with monkeypatch.context() as m:
        m.setattr(os, "replace", _enospc)
        # the same value: the file left holds it (a key names its content)
        assert disk.batch_put([k], [v]) == [True]
        # another value: not stored (the old record stays, and is still served)
        assert disk.batch_put([k], rows(1, seed=7)) == [False]
    assert disk.used_bytes == size and disk.stats.rejected == 1 and disk.stats.errors == 2
    assert same(disk.batch_get([k], shape=ROW, dtype="float32")[0], v)
    disk.clear()
    assert not os.path.exists(disk.path(k)) and disk.used_bytes == 0
    assert DiskTier(tmp_path).batch_exists([k]) == 0


def test_disk_file_of_a_failed_reput_is_still_evicted_by_the_budget(tmp_path, monkeypatch):
    ks, vs = keys(3), rows(3)
    probe = DiskTier(tmp_path / "probe")
    probe.batch_put(ks[:1], vs[:1])
    size = probe.used_bytes
    disk = DiskTier(tmp_path / "d", budget_bytes=2 * size)
    assert disk.batch_put(ks[:2], vs[:2]) == [True, True]
    assert disk.batch_put(ks[:1], vs[:1]) == [True]  # a re-put that fits: nothing evicted
    assert disk.used_bytes == 2 * size and disk.stats.evictions == 0
    assert disk.batch_exists(ks[:2]) == 2
    with monkeypatch.context() as m:
        m.setattr(os, "replace", _enospc)
        assert disk.batch_put(ks[1:2], vs[1:2]) == [True]
    assert disk.used_bytes == 2 * size
    assert disk.batch_put(ks[2:], vs[2:]) == [True]  # room from the oldest: ks[0]
    assert disk.stats.evictions == 1 and not os.path.exists(disk.path(ks[0]))
    assert disk.used_bytes == 2 * size
    assert [os.path.exists(disk.path(k)) for k in ks] == [False, True, True]


def test_disk_reput_refused_by_the_budget_keeps_the_old_file_indexed(tmp_path):
    (k,), (v,) = keys(1), rows(1)
    probe = DiskTier(tmp_path / "probe")
    probe.batch_put([k], [v])
    size = probe.used_bytes
    disk = DiskTier(tmp_path / "d", budget_bytes=size + 10)
    assert disk.batch_put([k], [v]) == [True]
    big = np.zeros((2, *ROW), np.float32)  # a record larger than the whole budget
    assert disk.batch_put([k], [big]) == [False]
    assert disk.used_bytes == size and os.path.getsize(disk.path(k)) == size
    disk.clear()
    assert not os.path.exists(disk.path(k))


def test_disk_transient_read_error_keeps_the_file_indexed(tmp_path, monkeypatch):
    """EMFILE on a get was taken for a missing file: forgotten, though still on disk."""
    disk = DiskTier(tmp_path)
    (k,), (v,) = keys(1), rows(1)
    assert disk.batch_put([k], [v]) == [True]
    size = disk.used_bytes

    def emfile(*a, **kw):
        raise OSError(errno.EMFILE, "Too many open files")

    with monkeypatch.context() as m:
        m.setattr(disk_module, "open", emfile, raising=False)
        assert disk.batch_get([k]) == [None]
    assert disk.stats.errors == 1 and disk.stats.misses == 1 and disk.stats.corrupt == 0
    assert disk.used_bytes == size and os.path.exists(disk.path(k))
    assert same(disk.batch_get([k], shape=ROW, dtype="float32")[0], v)
    disk.clear()
    assert not os.path.exists(disk.path(k)) and disk.used_bytes == 0
    # a file that is really gone is still forgotten
    assert disk.batch_put([k], [v]) == [True]
    os.unlink(disk.path(k))
    assert disk.batch_get([k]) == [None] and disk.used_bytes == 0


# -- TieredStore.batch_put after a tier raised part-way -------------------------------------


def _flaky_allocator(fail_from: int):
    calls = []

    def alloc(shape, dtype):
        calls.append(1)
        if len(calls) >= fail_from:
            raise MemoryError("pinned allocation failed")
        return np.empty(shape, dtype)

    return alloc


def test_tiered_put_reports_the_blocks_a_raising_tier_stored(tmp_path):
    """The tier's whole answer became [False] * n although it held the leading blocks."""
    host = HostTier(1 << 20, allocator=_flaky_allocator(2))
    st = TieredStore([host])
    ks, vs = keys(3), rows(3)
    assert st.batch_put(ks, vs) == [True, False, False]
    assert [k in host for k in ks] == [True, False, False] and st.batch_exists(ks) == 1
    assert (st.stats.puts, st.stats.rejected, st.stats.errors) == (1, 2, 1)
    assert st.tier_errors == {"host": 1}
    # with a tier below that stores everything: every key held
    host2 = HostTier(1 << 20, allocator=_flaky_allocator(2))
    st2 = TieredStore([host2, DiskTier(tmp_path)])
    assert st2.batch_put(ks, vs) == [True, True, True]
    assert [k in host2 for k in ks] == [True, False, False]


# -- onboard_request under offload_on_evict's namespace_for ---------------------------------


def _serve(pc, off, caches, rid, tokens, salt):
    pc.add_request(rid, tokens, salt=salt)
    _, onboarded = off.onboard_request(pc, rid, caches)
    done = pc.num_computed(rid)
    plan = pc.step([(rid, len(tokens) - done)])
    kv = np.array(tokens[done:], np.float32)[:, None, None]
    for c in caches:
        c.reshape(-1, 1, 8)[plan.slot_mapping] = kv
    pc.free(rid)
    return onboarded


def _evicted_under_namespace_for(namespace_for):
    caches = [np.zeros((6, 4, 1, 8), np.float32) for _ in range(2)]
    pc = PrefixCache(num_blocks=6, block_size=4)
    host = HostTier(1 << 20)
    off = BlockOffloader(host, Namespace("m", layout="NHD-bs4"), null_block=0)
    off.offload_on_evict(pc.events, caches, namespace_for=namespace_for)
    a = list(range(100, 113))
    assert _serve(pc, off, caches, "a", a, "t1") == 0
    assert _serve(pc, off, caches, "b", list(range(200, 217)), "t1") == 0  # evicts a's
    return pc, off, caches, host, a


def test_onboard_request_finds_blocks_offloaded_under_namespace_for():
    """onboard_request looked them up under the offloader's namespace with the salt: never
    found."""
    def per_tenant(salt):
        return Namespace("m", layout="NHD-bs4/lora:" + salt.decode(), salt=salt)

    pc, off, caches, host, a = _evicted_under_namespace_for(per_tenant)
    assert len(host) == 3 and off.offload_errors == 0 and off.namespace_for is per_tenant
    assert _serve(pc, off, caches, "a2", a, "t1") == 3 and off.onboard_errors == 0
    assert caches[0][pc.match(a, salt="t1")[0][0], :, 0, 0].tolist() == [100, 101, 102, 103]
    # another tenant's namespace holds none of them
    assert _serve(pc, off, caches, "a3", a, "t2") == 0


def test_namespace_for_raising_at_onboard_is_a_counted_miss():
    state = {"fail": False}

    def flaky(salt):
        if state["fail"]:
            raise KeyError(salt)
        return Namespace("m", layout="NHD-bs4", salt=salt)

    pc, off, caches, host, a = _evicted_under_namespace_for(flaky)
    state["fail"] = True  # (the step's own evictions then fail to offload too)
    with pytest.warns(RuntimeWarning) as got:
        assert _serve(pc, off, caches, "a2", a, "t1") == 0
    assert any("onboard failed" in str(w.message) for w in got)
    assert off.onboard_errors == 1 and isinstance(off.last_error, KeyError)
    pc.pool.check_consistency()


def test_offload_on_evict_namespace_for_must_be_callable():
    off = BlockOffloader(HostTier(1 << 20), Namespace("m"))
    with pytest.raises(TypeError, match="namespace_for: expected None or a callable"):
        off.offload_on_evict(PrefixCache(num_blocks=4, block_size=4).events, [],
                             namespace_for=Namespace("m"))


# -- argument checks ----------------------------------------------------------------------


@pytest.mark.parametrize(("bad", "exc"), [("4096", TypeError), (1.9, TypeError),
                                          (True, TypeError), ([4096], TypeError),
                                          (0, ValueError), (-1, ValueError)])
def test_disk_budget_bytes_is_checked_like_the_host_tiers(tmp_path, bad, exc):
    with pytest.raises(exc, match="budget_bytes: expected an int"):
        DiskTier(tmp_path, budget_bytes=bad)
    assert DiskTier(tmp_path, budget_bytes=np.int64(4096)).budget_bytes == 4096


@pytest.mark.parametrize("field", ["model_id", "layout"])
def test_namespace_str_field_utf8_cannot_encode_is_a_named_value_error(field):
    kw = {"model_id": "m", field: "m\udc80"}
    with pytest.raises(ValueError, match=f"{field}: expected a str UTF-8 can encode"):
        Namespace(**kw)


@pytest.mark.parametrize(("tier", "arg"), [("redis", "max_batch"), ("nixl", "staging_slots"),
                                           ("mooncake", "max_batch")])
@pytest.mark.parametrize(("bad", "exc"), [(0, ValueError), (-1, ValueError),
                                          (1.5, TypeError), ("8", TypeError)])
def test_batch_size_arguments_are_checked_when_the_tier_is_made(tmp_path, tier, arg, bad, exc):
    """RedisTier(max_batch=0) failed every call with "range() arg 3 must not be zero";
    a negative one silently did nothing."""
    with pytest.raises(exc, match=f"{arg}: expected an int"):
        _MAKERS[tier](tmp_path, **{arg: bad})


def test_redis_max_batch_zero_is_refused_and_one_works():
    with pytest.raises(ValueError, match="max_batch: expected an int >= 1"):
        _redis(max_batch=0)
    t = _redis(max_batch=1)
    ks, vs = keys(3), rows(3)
    assert t.batch_put(ks, vs) == [True] * 3 and t.batch_exists(ks) == 3
    assert all(same(a, b) for a, b in zip(t.batch_get(ks), vs, strict=True))


# -- batch_get's shape= and dtype=, iterables of keys, the offloader's arguments ------------


def _fake_mooncake():
    from prefixkv.paged.tiers import MooncakeTier

    t = object.__new__(MooncakeTier)  # batch_get checks its arguments before the store
    Tier.__init__(t)
    return t


@pytest.mark.parametrize(("shape", "dtype", "exc", "msg"), [
    (5, None, TypeError, "shape: expected a sequence of ints or None, got 5"),
    ("4325", None, TypeError, "shape: expected a sequence of ints or None, got '4325'"),
    ((4.0, 3, 2, 5), None, TypeError, r"shape: expected a sequence of ints or None"),
    ((True, 3), None, TypeError, r"shape: expected a sequence of ints or None"),
    ((-4, 3, 2, 5), None, ValueError, r"shape: expected dims >= 0, got \(-4, 3, 2, 5\)"),
    (None, 5, TypeError, "dtype: expected None or a dtype, got int 5"),
    (None, [np.float32], TypeError, "dtype: expected None or a dtype, got list"),
])
def test_batch_get_names_a_bad_shape_or_dtype(tmp_path, shape, dtype, exc, msg):
    """shape=5 was "'int' object is not iterable" (a TieredStore counted it as a fault of each
    tier: a miss); dtype=5 a miss. Checked once per call, before any tier is asked."""
    ks, vs = keys(2), rows(2)
    tiers = {**_tiers(tmp_path), "mooncake": _fake_mooncake()}
    for name, t in tiers.items():
        if name not in ("nixl", "mooncake"):
            assert t.batch_put(ks, vs) == [True, True], name
        with pytest.raises(exc, match=msg):
            t.batch_get(ks, shape=shape, dtype=dtype)
        assert t.stats.errors == 0, name
        if isinstance(t, TieredStore):
            assert t.tier_errors == {"host": 0, "disk": 0}
        if name not in ("nixl", "mooncake"):  # good layouts of any spelling still hit
            for good in (list(ROW), np.array(ROW), tuple(np.int64(d) for d in ROW)):
                got = t.batch_get(ks, shape=good, dtype=np.dtype(np.float32))
                assert all(same(a, b) for a, b in zip(got, vs, strict=True)), name
            # a dtype name no namespace holds is a miss, as before (nothing stored matches)
            assert t.batch_get(ks, dtype="no-such-dtype") == [None, None], name


def test_batch_calls_take_any_iterable_of_keys_and_values(tmp_path):
    """HostTier.batch_put(iter(keys), values) was "object of type 'list_iterator' has no
    len()"; a generator of values the same."""
    ks, vs = keys(3), rows(3)
    for name, t in _tiers(tmp_path).items():
        if name == "nixl":
            continue
        assert t.batch_put(iter(ks), (v for v in vs)) == [True] * 3, name
        assert t.batch_exists(iter(ks)) == 3, name
        got = t.batch_get(iter(ks), shape=ROW, dtype="float32")
        assert all(same(a, b) for a, b in zip(got, vs, strict=True)), name
        assert t.batch_remove(k for k in ks[:2]) == 2, name
        assert t.batch_exists(ks[2:]) == 1 and t.batch_exists(ks) == 0, name
        with pytest.raises(ValueError, match="values: expected 2 values"):
            t.batch_put(iter(ks[:2]), iter(vs[:1]))
        with pytest.raises(TypeError, match="values: expected a sequence of arrays, got int"):
            t.batch_put(ks[:1], 5)
    t = HostTier(1 << 20)
    assert t.touch(iter(ks), shape=list(ROW)) == [False] * 3
    t.batch_put(ks, vs)
    assert t.touch(iter(ks), shape=np.array(ROW)) == [True] * 3
    with pytest.raises(TypeError, match="shape: expected a sequence of ints or None, got 5"):
        t.touch(ks, shape=5)


class _DuckStore:
    """No Tier subclass: the three methods the offloader calls, over a HostTier."""

    def __init__(self):
        self.inner = HostTier(1 << 20)

    def batch_exists(self, keys):
        return self.inner.batch_exists(keys)

    def batch_get(self, keys, *, shape=None, dtype=None):
        return self.inner.batch_get(keys, shape=shape, dtype=dtype)

    def batch_put(self, keys, values):
        return self.inner.batch_put(keys, values)


@pytest.mark.parametrize("store", [None, object(), "host", HostTier])
def test_block_offloader_store_must_be_a_tier(store):
    """BlockOffloader(None, ns) was accepted, then failed at the first offload with an
    AttributeError (an offload on eviction: a counted miss, forever)."""
    name = store.__name__ if isinstance(store, type) else type(store).__name__
    with pytest.raises(TypeError, match=f"store: expected a Tier, got (the class )?{name}"):
        BlockOffloader(store, Namespace("m"))


def test_block_offloader_takes_a_store_with_the_tier_methods():
    caches = [np.arange(4 * 4 * 8, dtype=np.float32).reshape(4, 4, 1, 8) + i for i in range(2)]
    off = BlockOffloader(_DuckStore(), Namespace("m"))
    assert off.offload(caches, [1, 2], [b"a", b"b"]) == [True, True]
    assert off.lookup([b"a", b"b", b"c"]) == 2
    dst = [np.zeros_like(c) for c in caches]
    _, n = off.onboard(dst, [0, 3], [b"a", b"b"])
    assert n == 2 and all(same(d[[0, 3]], c[[1, 2]]) for d, c in zip(dst, caches, strict=True))


def test_host_reserve_names_n_shape_and_dtype():
    """reserve(-1, ...) returned [] (as if the budget were full)."""
    h = HostTier(1 << 20)
    with pytest.raises(ValueError, match="n: expected an int >= 0, got -1"):
        h.reserve(-1, ROW, "float32")
    with pytest.raises(TypeError, match="n: expected an int, got 1.5"):
        h.reserve(1.5, ROW, "float32")
    with pytest.raises(TypeError, match="shape: expected a sequence of ints, got 5"):
        h.reserve(1, 5, "float32")
    with pytest.raises(TypeError, match="dtype: expected a dtype, got 'foo'"):
        h.reserve(1, ROW, "foo")
    with pytest.raises(TypeError, match="shape: expected a sequence of ints, got 5"):
        h.allocate(5, "float32")
    assert h.reserve(0, ROW, "float32") == []
    (buf,) = h.reserve(np.int64(1), list(ROW), np.float32)
    assert buf.shape == ROW and buf.dtype == np.float32


def _two_blocks():
    caches = [np.arange(4 * 4 * 8, dtype=np.float32).reshape(4, 4, 1, 8) + i for i in range(2)]
    return caches, BlockOffloader(HostTier(1 << 20), Namespace("m"))


def test_offload_and_onboard_take_any_iterable_of_hashes():
    """A generator of hashes was "object of type 'generator' has no len()"."""
    caches, off = _two_blocks()
    assert off.offload(caches, [1, 2], (h for h in [b"a", b"b"])) == [True, True]
    assert off.lookup(h for h in [b"a", b"b"]) == 2
    dst = [np.zeros_like(c) for c in caches]
    _, n = off.onboard(dst, [2, 3], iter([b"a", b"b"]))
    assert n == 2 and same(dst[1][[2, 3]], caches[1][[1, 2]])
    assert len(off.fetch(iter([b"a", b"b"]), (2, 4, 1, 8), np.float32)) == 2


@pytest.mark.parametrize("method", ["offload", "onboard", "lookup", "fetch"])
@pytest.mark.parametrize("bad", [b"ab", "ab", 5])
def test_block_hashes_that_are_one_hash_or_no_sequence_are_named(method, bad):
    """bytes were taken as a sequence of int hashes (one per byte)."""
    caches, off = _two_blocks()
    call = {"offload": lambda: off.offload(caches, [1, 2], bad),
            "onboard": lambda: off.onboard(caches, [1, 2], bad),
            "lookup": lambda: off.lookup(bad),
            "fetch": lambda: off.fetch(bad, (2, 4, 1, 8), np.float32)}[method]
    with pytest.raises(TypeError, match="block_hashes: expected a sequence of block hashes"):
        call()


def test_fetch_names_row_shape_and_dtype():
    """row_shape=5 was "'int' object is not iterable"."""
    caches, off = _two_blocks()
    off.offload(caches, [1], [b"a"])
    with pytest.raises(TypeError, match="row_shape: expected a sequence of ints, got 5"):
        off.fetch([b"a"], 5, np.float32)
    with pytest.raises(TypeError, match="row_shape: expected a sequence of ints"):
        off.fetch([b"a"], (2.0, 4, 1, 8), np.float32)
    with pytest.raises(TypeError, match="dtype: expected a dtype, got NoneType None"):
        off.fetch([b"a"], (2, 4, 1, 8), None)
    (row,) = off.fetch([b"a"], np.array([2, 4, 1, 8]), "float32")
    assert same(row, np.stack([c[1] for c in caches]))
