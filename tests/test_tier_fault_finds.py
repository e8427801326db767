"""Finds of a fault-injection run over the storage tiers, each pinned by the tests below.

1. ``BlockOffloader.fetch`` took a store's ``batch_get`` answer of another length than the
   keys asked: an extra row was onboarded and registered under a hash no tier holds (or
   ``onboard_request`` raised ValueError). An answer of the wrong length is now a miss for the
   whole answer, counted in ``onboard_errors``.
2. ``RedisTier`` zipped an MGET answer with the chunk's keys unchecked: a short answer (a
   nonstandard client or proxy) served a key another key's block. A wrong-length answer now
   makes that chunk's keys misses (``errors`` + 1); the EXISTS / SET / DEL / drop pipelines
   likewise (they counted past the keys asked, or raised ValueError out of the tier).
3. ``BlockOffloader._held_below`` took any truthy ``batch_exists`` answer (True, -3, "2") as
   held, so an offload reported blocks no tier holds; it now reads it as the chain does.
4. A FIFO at a block's path hung ``DiskTier.batch_exists`` / ``batch_get`` in ``open``; a
   non-regular file is now a miss (opened O_NONBLOCK, then fstat).
5. ``BlockOffloader.offload`` / ``onboard`` truncated a list of float block ids (``[1.9]`` was
   block 1, ``True`` block 1); non-int items are a TypeError naming ``block_ids[i]``, ids past
   int32 a ValueError naming it (not an OverflowError).
6. Tier calls given keys that cannot be iterated, values that are a 0-d array, or block ids
   that are a str / None raised errors naming no argument ("'int' object is not iterable").
7. ``DiskTier`` in a directory where unlink fails (read-only): ``batch_remove`` reported and
   published removals that did not happen, a corrupt record that could not be deleted kept
   being counted by ``batch_exists``, ``clear()`` zeroed ``used_bytes`` while the files stayed
   (and published "cleared"), and a budget eviction reported "evicted" for a file still there.
8. ``HostTier`` with an allocator of torch-backed arrays (``torch.empty(...).numpy()``, as its
   docstring suggested for pinned memory) failed every put: it set the writeable flag numpy
   refuses on such arrays. They are now used, and dropped (not reused) once evicted. An
   allocator that is not callable is refused when the tier is made; a get of a block held in
   another layout counts a miss as well as a corrupt read (as the disk tier does).
9. ``RedisTier.clear()`` published "cleared" before deleting, also when the deletion then
   failed (every key still there); ``batch_get`` sent the deletes of corrupt records after a
   failure had marked the server down; ``ttl_s``, the timeouts and ``retry_interval`` were
   unchecked (``ttl_s=0`` or ``-5`` became a 1 ms expiry, ``"1"`` a 1000-digit one that made
   every SET fail).
10. ``BlockOffloader.scatter_rows`` (public: ``fetch`` then it is ``onboard`` split in two)
    cast its ids unchecked (``[1.9]`` wrote block 1, ``[-1]`` the last block, ``[0]`` the null
    block) and broadcast a row of another shape into the block.

tmp_path and fakes only: no servers. The read-only directory is simulated by an ``os.unlink``
that fails with EACCES (the tests may run as root, whom a 0555 directory does not stop).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal

import numpy as np
import pytest
from prefixkv.paged import PrefixCache
from prefixkv.paged.tiers import (
    BlockOffloader,
    DiskTier,
    HostTier,
    Namespace,
    RedisTier,
    TieredStore,
    encode_record,
)
from tier_helpers import ROW, keys, rows, same

# -- 1. BlockOffloader.fetch: a store answering another number of rows than keys asked -------

BS, NB = 2, 10
OFF_ROW = (2, BS, 1, 4)


class _WrongLength(HostTier):
    """A store whose batch_get answers ``extra`` more arrays than keys asked (fewer when
    negative)."""

    name = "wrong-length"

    def __init__(self, extra: int):
        super().__init__(1 << 20)
        self.extra = extra

    def batch_get(self, keys, *, shape=None, dtype=None):
        out = super().batch_get(keys, shape=shape, dtype=dtype)
        if self.extra < 0:
            return out[:self.extra]
        return out + [np.full(shape, 666.0, np.float32)] * self.extra


def _one_block_stored(extra: int):
    ns = Namespace("m", layout="bs2")
    store = _WrongLength(extra)
    off = BlockOffloader(store, ns, null_block=0)
    pc = PrefixCache(num_blocks=NB, block_size=BS)
    toks = list(range(100, 109))  # 4 full blocks can hit (never the last token)
    h = pc.block_hashes(toks)
    assert store.batch_put(off.keys(h[:2]), [np.ones(OFF_ROW, np.float32)] * 2) == [True] * 2
    return off, pc, toks, h


@pytest.mark.parametrize("extra", [1, 4, -1], ids=["one-extra", "four-extra", "one-short"])
def test_onboard_request_takes_a_wrong_length_answer_as_a_counted_miss(extra):
    off, pc, toks, _ = _one_block_stored(extra)
    pc.add_request("a", toks)
    caches = [np.zeros((NB, BS, 1, 4), np.float32) for _ in range(2)]
    with pytest.warns(RuntimeWarning, match="batch_get of 2 keys answered"):
        _, n = off.onboard_request(pc, "a", caches)
    assert n == 0 and off.onboard_errors == 1
    assert pc.num_computed("a") == 0 and not any(c.any() for c in caches)


def test_onboard_takes_an_extra_row_as_a_counted_miss():
    off, _, _, h = _one_block_stored(1)
    caches = [np.zeros((NB, BS, 1, 4), np.float32) for _ in range(2)]
    with pytest.warns(RuntimeWarning):
        _, n = off.onboard(caches, [1, 2, 3], h[:3])
    assert n == 0 and off.onboard_errors == 1 and not any(c.any() for c in caches)
    off.store.extra = 0  # the same store answering one entry per key: both leading blocks
    _, n = off.onboard(caches, [1, 2, 3], h[:3])
    assert n == 2 and off.onboard_errors == 1


# -- 2. RedisTier: a client answering another number of values than keys ---------------------


class _SkewedRedis:
    """A dict-backed client (no server) whose answers to the commands in ``skew`` drop their
    last entry ("short") or carry one more ("long")."""

    def __init__(self, skew: dict[str, str] | None = None):
        self.d: dict[str, bytes] = {}
        self.skew = skew or {}

    def _skewed(self, op: str, out: list) -> list:
        how = self.skew.get(op)
        if how == "short":
            return out[:-1]
        if how == "long":
            return out + [1]
        return out

    def pipeline(self, transaction=False):
        return _SkewedPipe(self)

    def mget(self, ks):
        return self._skewed("mget", [self.d.get(k) for k in ks])


class _SkewedPipe:
    def __init__(self, c: _SkewedRedis):
        self.c, self.ops = c, []

    def set(self, k, v, px=None):
        self.ops.append(("set", k, bytes(v)))

    def exists(self, k):
        self.ops.append(("exists", k, None))

    def delete(self, k):
        self.ops.append(("delete", k, None))

    def eval(self, script, numkeys, k, data):
        self.ops.append(("eval", k, bytes(data)))

    def execute(self, raise_on_error=True):
        d, out = self.c.d, []
        for op, k, v in self.ops:
            if op == "set":
                d[k] = v
                out.append(True)
            elif op == "exists":
                out.append(int(k in d))
            elif op == "delete":
                out.append(int(d.pop(k, None) is not None))
            else:  # the drop script: DEL while it holds the bytes read
                hit = d.get(k) == v
                if hit:
                    del d[k]
                out.append(int(hit))
        return self.c._skewed(self.ops[0][0], out) if self.ops else out


def _redis(skew=None, max_batch=2):
    client = _SkewedRedis(skew)
    return RedisTier(client=client, max_batch=max_batch), client


def test_redis_short_mget_is_a_miss_never_another_keys_block():
    t, client = _redis()
    ks, vs = keys(4), rows(4)
    assert t.batch_put(ks, vs) == [True] * 4
    client.skew = {"mget": "short"}
    got = t.batch_get(ks, shape=ROW, dtype="float32")
    assert got == [None] * 4  # each chunk of 2 answered 1 value: none can be placed
    assert t.stats.errors == 2 and t.stats.misses == 4 and t.stats.hits == 0
    assert t.available  # the server answered: not marked down
    client.skew = {}
    got = t.batch_get(ks, shape=ROW, dtype="float32")
    assert all(same(a, v) for a, v in zip(got, vs, strict=True))


def test_redis_long_mget_is_a_miss():
    t, client = _redis({"mget": "long"})
    ks, vs = keys(2), rows(2)
    assert t.batch_put(ks, vs) == [True] * 2
    assert t.batch_get(ks, shape=ROW, dtype="float32") == [None, None]


@pytest.mark.parametrize("how", ["short", "long"])
def test_redis_wrong_length_exists_counts_no_key_of_that_chunk(how):
    t, client = _redis(max_batch=4)
    ks = keys(2)
    assert t.batch_put(ks, rows(2)) == [True] * 2
    client.skew = {"exists": how}
    assert t.batch_exists(ks) == 0  # a long answer counted 3 of 2 keys
    assert t.stats.errors == 1


@pytest.mark.parametrize("how", ["short", "long"])
def test_redis_wrong_length_set_answer_reports_false_and_does_not_raise(how):
    t, _ = _redis({"set": how})
    ks = keys(3)
    assert t.batch_put(ks, rows(3)) == [False] * 3  # it raised ValueError (zip strict)
    assert t.stats.errors == 2 and t.stats.rejected == 3 and t.stats.puts == 0


@pytest.mark.parametrize("how", ["short", "long"])
def test_redis_wrong_length_del_answer_reports_nothing_removed(how):
    t, client = _redis()
    ks = keys(2)
    assert t.batch_put(ks, rows(2)) == [True] * 2
    client.skew = {"delete": how}
    seen = []
    t.events.subscribe(seen.append)
    assert t.batch_remove(ks) == 0 and seen == [] and t.stats.errors == 1


def test_redis_wrong_length_drop_answer_does_not_raise_out_of_batch_get():
    t, client = _redis({"eval": "short"})
    (k,) = keys(1)
    header, payload = encode_record(k, rows(1)[0])
    rec = bytearray(header + payload)
    rec[-1] ^= 0xFF  # a corrupt record
    client.d[t._rkey(k)] = bytes(rec)
    seen = []
    t.events.subscribe(seen.append)
    assert t.batch_get([k], shape=ROW, dtype="float32") == [None]
    assert t.stats.corrupt == 1 and t.stats.errors == 1 and seen == []


# -- 3. BlockOffloader._held_below: a tier's count read as the chain reads it ----------------


class _TruthyCount(HostTier):
    """A tier below the host whose batch_exists answers ``answer`` when it holds nothing."""

    name = "truthy-count"

    def __init__(self, budget: int, answer):
        super().__init__(budget)
        self.answer = answer

    def batch_exists(self, keys):
        n = super().batch_exists(keys)
        return self.answer if n == 0 else n


@pytest.mark.parametrize("answer", [True, -3, "2", 1.0], ids=repr)
def test_offload_reports_held_only_what_a_tier_holds(answer):
    row = (2, 2, 1, 4)
    rb = int(np.prod(row)) * 4
    host, below = HostTier(rb), _TruthyCount(2 * rb, answer)  # 1 block; 2 blocks
    off = BlockOffloader(TieredStore([host, below]), Namespace("m"))
    off.overflow_chunk_bytes = rb  # one block per chunk below the host
    caches = [np.arange(6 * 8, dtype=np.float32).reshape(6, 2, 1, 4) + 100 * i
              for i in range(2)]
    hashes = [bytes([i]) * 8 for i in range(5)]
    got = off.offload(caches, list(range(5)), hashes)
    held = [k in host or k in below for k in off.keys(hashes)]
    assert held == [True, False, False, True, True]
    assert got == held


# -- 4. DiskTier: a FIFO (a non-regular file) at a block's path -------------------------------


class _Hung(Exception):
    """Raised by the alarm: not an OSError, so no tier takes it for a storage fault."""


@contextlib.contextmanager
def _deadline(seconds: int):
    def on_alarm(signum, frame):
        raise _Hung(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_disk_fifo_at_a_block_path_is_a_miss_not_a_hang(tmp_path):
    t = DiskTier(tmp_path)
    k, k2 = keys(2)
    assert t.batch_put([k2], rows(1)) == [True]
    os.makedirs(os.path.dirname(t.path(k)), exist_ok=True)
    os.mkfifo(t.path(k))
    with _deadline(5):
        assert t.batch_exists([k, k2]) == 0
        assert t.batch_get([k, k2], shape=ROW, dtype="float32")[0] is None
    assert t.stats.errors == 2 and t.stats.misses == 1 and t.stats.hits == 1
    assert os.path.exists(t.path(k))  # not a block file of this tier: left where it is


def test_disk_directory_at_a_block_path_is_a_miss(tmp_path):
    t = DiskTier(tmp_path)
    (k,) = keys(1)
    os.makedirs(t.path(k))
    assert t.batch_exists([k]) == 0
    assert t.batch_get([k]) == [None]
    assert t.used_bytes == 0


# -- 5. block ids: a list of floats or bools is not truncated --------------------------------


def _offloader():
    caches = [np.arange(4 * 8, dtype=np.float32).reshape(4, 2, 1, 4) + 100 * i
              for i in range(2)]
    return BlockOffloader(HostTier(1 << 16), Namespace("b")), caches


@pytest.mark.parametrize("ids", [[1.9], [True], [np.float64(1.0)], [np.bool_(True)], (2.0,)],
                         ids=repr)
def test_offload_refuses_non_int_block_ids_by_name(ids):
    off, caches = _offloader()
    with pytest.raises(TypeError, match=r"block_ids\[0\]: expected an int block id, got"):
        off.offload(caches, ids, [b"\x07" * 8])
    assert off.store.batch_exists(off.keys([b"\x07" * 8])) == 0


def test_onboard_refuses_float_block_ids_by_name():
    off, caches = _offloader()
    assert off.offload(caches, [1], [b"\x07" * 8]) == [True]
    dst = [np.zeros_like(c) for c in caches]
    with pytest.raises(TypeError, match=r"block_ids\[0\]: expected an int block id, got float"):
        off.onboard(dst, [2.5], [b"\x07" * 8])
    assert not any(c.any() for c in dst)
    _, n = off.onboard(dst, [np.int64(2)], [b"\x07" * 8])  # numpy ints in a list: taken
    assert n == 1 and same(dst[0][2], caches[0][1])


@pytest.mark.parametrize("bad", [2 ** 40, -2 ** 31 - 1, 2 ** 70], ids=str)
def test_block_ids_past_int32_are_a_value_error_naming_block_ids(bad):
    off, caches = _offloader()
    with pytest.raises(ValueError, match=r"block_ids\[1\]: expected a block id that fits int32"):
        off.offload(caches, [1, bad], [b"\x07" * 8, b"\x08" * 8])
    with pytest.raises(ValueError, match=r"block_ids\[0\]: expected a block id that fits int32"):
        off.onboard(caches, [bad], [b"\x07" * 8])


# -- 6. bad input names the argument ---------------------------------------------------------


def _tiers(tmp_path):
    return {"host": HostTier(1 << 16), "disk": DiskTier(tmp_path),
            "redis": _redis()[0], "tiered": TieredStore([HostTier(1 << 16)])}


@pytest.mark.parametrize("tier", ["host", "disk", "redis", "tiered"])
@pytest.mark.parametrize("bad", [5, object(), 1.5, True, np.float64(1)],
                         ids=["int", "object", "float", "bool", "float64"])
def test_keys_that_cannot_be_iterated_name_keys(tmp_path, tier, bad):
    t = _tiers(tmp_path)[tier]
    match = r"keys: expected a sequence of BlockKey, got "
    with pytest.raises(TypeError, match=match):
        t.batch_exists(bad)
    with pytest.raises(TypeError, match=match):
        t.batch_get(bad)
    with pytest.raises(TypeError, match=match):
        t.batch_put(bad, rows(1))
    with pytest.raises(TypeError, match=match):
        t.batch_remove(bad)


def test_host_touch_names_keys():
    with pytest.raises(TypeError, match=r"keys: expected a sequence of BlockKey, got float64"):
        HostTier(1 << 16).touch(np.float64(1))


@pytest.mark.parametrize("tier", ["host", "disk", "redis", "tiered"])
@pytest.mark.parametrize("bad", [np.array(3.0, np.float32), 3.0], ids=repr)
def test_values_without_items_name_values(tmp_path, tier, bad):
    t = _tiers(tmp_path)[tier]
    with pytest.raises(TypeError, match=r"values: expected a sequence of arrays, got "):
        t.batch_put(keys(1), bad)


@pytest.mark.parametrize("ids", [["s"], [None], [[1]], [b"\x01"]], ids=repr)
def test_block_ids_of_other_types_name_block_ids(ids):
    off, caches = _offloader()
    with pytest.raises(TypeError, match=r"block_ids\[0\]: expected an int block id, got"):
        off.offload(caches, ids, [b"\x01" * 8])
    with pytest.raises(TypeError, match=r"block_ids\[0\]: expected an int block id, got"):
        off.onboard(caches, ids, [b"\x01" * 8])


# -- 7. DiskTier where files cannot be deleted (a read-only directory) -----------------------


@pytest.fixture
def no_unlink(monkeypatch, tmp_path):
    """os.unlink of anything under tmp_path fails with EACCES while ``state["on"]``."""
    real = os.unlink
    state = {"on": False}

    def unlink(path, *a, **kw):
        if state["on"] and os.fspath(path).startswith(os.fspath(tmp_path)):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(os, "unlink", unlink)
    return state


def _events(t):
    seen = []
    t.events.subscribe(lambda e: seen.append((e.kind, e.block_hashes)))
    return seen


def test_disk_remove_that_fails_is_not_reported(tmp_path, no_unlink):
    t = DiskTier(tmp_path)
    ks, vs = keys(2), rows(2)
    assert t.batch_put(ks, vs) == [True, True]
    used = t.used_bytes
    seen = _events(t)
    no_unlink["on"] = True
    assert t.batch_remove(ks[:1]) == 0 and seen == [] and t.stats.errors == 1
    assert os.path.exists(t.path(ks[0])) and t.used_bytes == used
    assert t.batch_exists(ks) == 2
    assert same(t.batch_get(ks[:1], shape=ROW, dtype="float32")[0], vs[0])
    no_unlink["on"] = False
    assert t.batch_remove(ks[:1]) == 1 and seen == [("removed", (ks[0].block_hash,))]
    assert not os.path.exists(t.path(ks[0])) and t.used_bytes == used // 2


def _corrupt(path):
    with open(path, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))


def test_disk_corrupt_record_that_cannot_be_deleted_is_not_counted(tmp_path, no_unlink):
    t = DiskTier(tmp_path)
    ks, vs = keys(2), rows(2)
    assert t.batch_put(ks, vs) == [True, True]
    _corrupt(t.path(ks[0]))
    seen = _events(t)
    no_unlink["on"] = True
    assert t.batch_get(ks[:1], shape=ROW, dtype="float32") == [None]
    assert seen == [] and t.stats.corrupt == 1 and os.path.exists(t.path(ks[0]))
    assert t.batch_exists(ks) == 0  # it counted the corrupt record as a hit
    assert t.batch_exists(ks[1:]) == 1
    # a good record renamed over it (a put of another process, here of this tier) counts again
    assert t.batch_put(ks[:1], vs[:1]) == [True]
    assert t.batch_exists(ks) == 2
    assert same(t.batch_get(ks[:1], shape=ROW, dtype="float32")[0], vs[0])
    # and once it can be deleted, a corrupt record is, as before
    no_unlink["on"] = False
    _corrupt(t.path(ks[0]))
    assert t.batch_get(ks[:1], shape=ROW, dtype="float32") == [None]
    h = (ks[0].block_hash,)
    assert seen == [("stored", h), ("removed", h)] and not os.path.exists(t.path(ks[0]))


def test_disk_clear_that_cannot_delete_keeps_the_files_counted(tmp_path, no_unlink):
    t = DiskTier(tmp_path)
    ks = keys(2)
    assert t.batch_put(ks, rows(2)) == [True, True]
    used = t.used_bytes
    seen = _events(t)
    no_unlink["on"] = True
    t.clear()
    assert t.used_bytes == used and t.batch_exists(ks) == 2
    assert ("cleared", ()) not in seen and t.stats.errors == 2
    no_unlink["on"] = False
    t.clear()
    assert t.used_bytes == 0 and t.batch_exists(ks) == 0 and seen == [("cleared", ())]


def test_disk_eviction_that_cannot_delete_makes_no_room(tmp_path, no_unlink):
    ks, vs = keys(2), rows(2)
    t = DiskTier(tmp_path / "probe")
    assert t.batch_put(ks[:1], vs[:1]) == [True]
    one = t.used_bytes
    t = DiskTier(tmp_path / "t", budget_bytes=one)
    assert t.batch_put(ks[:1], vs[:1]) == [True]
    seen = _events(t)
    no_unlink["on"] = True
    assert t.batch_put(ks[1:], vs[1:]) == [False]  # it evicted (in name) a file still there
    assert seen == [] and t.stats.evictions == 0 and t.used_bytes == one
    assert same(t.batch_get(ks[:1], shape=ROW, dtype="float32")[0], vs[0])
    no_unlink["on"] = False
    assert t.batch_put(ks[1:], vs[1:]) == [True]
    assert [e[0] for e in seen] == ["evicted", "stored"] and t.used_bytes == one


# -- 8. HostTier: torch-backed allocator arrays, the allocator checked, layout misses -------


def test_host_tier_takes_an_allocator_of_torch_backed_arrays():
    torch = pytest.importorskip("torch")

    made = []

    def alloc(shape, dtype):
        made.append(torch.empty(shape, dtype=torch.float32).numpy())
        return made[-1]

    t = HostTier(2 * rows(1)[0].nbytes, allocator=alloc)
    ks, vs = keys(4), rows(4)
    for k, v in zip(ks, vs, strict=True):  # the third and fourth puts evict
        assert t.batch_put([k], [v]) == [True]
    assert len(made) == 4  # an evicted array numpy cannot make writable is not reused
    got = t.batch_get(ks, shape=ROW, dtype="float32")
    assert got[:2] == [None, None] and all(same(a, v) for a, v in zip(got[2:], vs[2:],
                                                                       strict=True))
    store = TieredStore([HostTier(1 << 16, allocator=alloc), HostTier(1 << 16)])
    assert store.batch_put(ks[:1], vs[:1]) == [True]
    assert [tier.batch_exists(ks[:1]) for tier in store.tiers] == [1, 1]


def test_host_tier_still_reuses_numpy_arrays():
    made = []

    def alloc(shape, dtype):
        made.append(1)
        return np.empty(shape, dtype)

    t = HostTier(2 * rows(1)[0].nbytes, allocator=alloc)
    for k, v in zip(keys(4), rows(4), strict=True):
        assert t.batch_put([k], [v]) == [True]
    assert len(made) == 2


@pytest.mark.parametrize("bad", [5, "np.empty", object()], ids=["int", "str", "object"])
def test_host_tier_refuses_an_allocator_that_is_not_callable(bad):
    with pytest.raises(TypeError, match="allocator: expected None or a callable"):
        HostTier(1 << 16, allocator=bad)


def test_host_tier_allocator_returning_a_non_array_names_it():
    t = HostTier(1 << 16, allocator=lambda shape, dtype: [0.0] * int(np.prod(shape)))
    with pytest.raises(ValueError, match="allocator: expected a C-contiguous float32 array of "
                                         "shape .* got list"):
        t.reserve(1, ROW, "float32")


def test_host_tier_layout_mismatch_counts_a_miss():
    t = HostTier(1 << 16)
    ks = keys(1)
    assert t.batch_put(ks, rows(1)) == [True]
    assert t.batch_get(ks, shape=(1, *ROW), dtype="float32") == [None]
    assert (t.stats.hits, t.stats.misses, t.stats.corrupt) == (0, 1, 1)


# -- 9. RedisTier: clear, deletes after a failure, durations -------------------------------


class _ScanRedis(_SkewedRedis):
    """A dict-backed client with SCAN and a multi-key DEL; ``fail_scan``: SCAN times out."""

    fail_scan = False

    def scan_iter(self, match=None, count=None):
        import redis

        if self.fail_scan:
            raise redis.exceptions.TimeoutError("Timeout reading from socket")
        prefix = match[:-1].replace("\\", "")
        return [k for k in list(self.d) if k.startswith(prefix)]

    def delete(self, *ks):
        return sum(self.d.pop(k, None) is not None for k in ks)


def test_redis_clear_that_fails_publishes_nothing():
    client = _ScanRedis()
    t = RedisTier(client=client)
    ks = keys(3)
    assert t.batch_put(ks, rows(3)) == [True] * 3
    seen = _events(t)
    client.fail_scan = True
    t.clear()
    assert seen == [] and t.stats.errors == 1 and len(client.d) == 3
    client.fail_scan = False
    t._down_until = 0.0  # the back-off over
    t.clear()
    assert seen == [("cleared", ())] and client.d == {}


class _MgetFailsSecond(_SkewedRedis):
    """MGET fails on its second call (the connection drops between chunks); counts the
    pipelines asked for after that."""

    def __init__(self):
        super().__init__()
        self.mgets = self.pipes_after = 0

    def mget(self, ks):
        import redis

        self.mgets += 1
        if self.mgets == 2:
            raise redis.exceptions.ConnectionError("connection reset")
        return super().mget(ks)

    def pipeline(self, transaction=False):
        if self.mgets >= 2:
            self.pipes_after += 1
        return super().pipeline(transaction)


def test_redis_get_sends_nothing_after_marking_the_server_down():
    client = _MgetFailsSecond()
    t = RedisTier(client=client, max_batch=1, retry_interval=60.0)
    ks = keys(2)
    assert t.batch_put(ks, rows(2)) == [True, True]
    rk = t._rkey(ks[0])
    client.d[rk] = client.d[rk][:-1] + bytes([client.d[rk][-1] ^ 0xFF])  # corrupt
    assert t.batch_get(ks, shape=ROW, dtype="float32") == [None, None]
    assert t.stats.errors == 1 and t.stats.corrupt == 1 and not t.available
    assert client.pipes_after == 0 and rk in client.d  # dropped by a later get, not now


@pytest.mark.parametrize(("arg", "bad", "error"), [
    ("ttl_s", 0, ValueError), ("ttl_s", -5, ValueError), ("ttl_s", float("nan"), ValueError),
    ("ttl_s", float("inf"), ValueError), ("ttl_s", 1e12, ValueError), ("ttl_s", "1", TypeError),
    ("ttl_s", True, TypeError), ("socket_timeout", 0, ValueError),
    ("socket_timeout", None, TypeError), ("connect_timeout", -1.0, ValueError),
    ("retry_interval", -1, ValueError), ("retry_interval", "1", TypeError),
    ("prefix", 5, TypeError)], ids=str)
def test_redis_durations_are_checked_by_name(arg, bad, error):
    with pytest.raises(error, match=f"{arg}: expected"):
        RedisTier(client=_SkewedRedis(), **{arg: bad})


def test_redis_durations_that_pass():
    t = RedisTier(client=_SkewedRedis(), ttl_s=0.5, retry_interval=0, socket_timeout=2)
    assert t.ttl_ms == 500 and t.retry_interval == 0.0
    assert RedisTier(client=_SkewedRedis(), ttl_s=np.float32(2)).ttl_ms == 2000


# -- 10. BlockOffloader.scatter_rows: onboard's checks -----------------------------------


@pytest.mark.parametrize(("ids", "error", "match"), [
    ([1.9], TypeError, r"block_ids\[0\]: expected an int block id"),
    ([True], TypeError, r"block_ids\[0\]: expected an int block id"),
    ([-1], ValueError, r"block_ids: expected values in \[0, 4\)"),
    ([4], ValueError, r"block_ids: expected values in \[0, 4\)"),
    ([0], ValueError, "block_ids: block 0 is the null block"),
    ([2, 2], ValueError, "block_ids: expected distinct")], ids=str)
def test_scatter_rows_checks_block_ids(ids, error, match):
    off, caches = _offloader()
    off.null_block = 0
    before = [c.copy() for c in caches]
    row = np.ones((2, 2, 1, 4), np.float32)
    with pytest.raises(error, match=match):
        off.scatter_rows(caches, ids, [row] * len(ids))
    assert all(np.array_equal(c, b) for c, b in zip(caches, before, strict=True))


@pytest.mark.parametrize(("row", "match"), [
    (np.ones((2, 1, 1, 1), np.float32), r"rows\[0\]: expected float32 of shape \(2, 2, 1, 4\)"),
    (np.ones((2, 2, 1, 4), np.float64), r"rows\[0\]: expected float32 .* got float64"),
    ([[0.0]], r"rows\[0\]: expected a numpy array")], ids=["shape", "dtype", "list"])
def test_scatter_rows_checks_rows(row, match):
    off, caches = _offloader()
    before = [c.copy() for c in caches]
    with pytest.raises((TypeError, ValueError), match=match):
        off.scatter_rows(caches, [2], [row])
    with pytest.raises(ValueError, match="rows: expected at most 1 rows"):
        off.scatter_rows(caches, [2], [before[0][0:2].copy()] * 2)
    assert all(np.array_equal(c, b) for c, b in zip(caches, before, strict=True))


def test_scatter_rows_writes_the_leading_ids():
    off, caches = _offloader()
    row = np.stack([c[3] for c in caches]) + 1000
    assert off.scatter_rows(caches, (np.int64(1), 2), [row]) is caches
    assert all(np.array_equal(c[1], r) for c, r in zip(caches, row, strict=True))
    assert not any((c[2] >= 1000).any() for c in caches)
