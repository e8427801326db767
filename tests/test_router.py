"""Router: a global index built from several workers' KV events (pools in one process),
per-worker leading hits, the hit-vs-load pick, salt isolation, tiers, worker removal."""

import numpy as np
import pytest
from prefixkv.paged.events import EventBus, KVEvent
from prefixkv.paged.hashing import hash_blocks
from prefixkv.paged.prefix_cache import PrefixCache
from prefixkv.paged.router import Router
from test_prefix_cache import hash_fn, sglang_hash

BS = 4


def cluster(n=3, num_blocks=64, **kw):
    hf = hash_fn()
    workers = {f"w{i}": PrefixCache(num_blocks, BS, hash_fn=hf) for i in range(n)}
    router = Router(BS, hash_fn=hf or None, **kw)
    for wid, pc in workers.items():
        router.add_worker(wid, pc.events)
    return workers, router


def serve(pc, rid, tokens, salt=None, free=True):
    cached = pc.add_request(rid, tokens, salt=salt)
    pc.step([(rid, len(tokens) - cached)])
    if free:
        pc.free(rid)


def test_overlaps_per_worker():
    workers, router = cluster()
    base = list(range(100, 140))                       # 10 blocks
    serve(workers["w0"], "a", base)                    # w0 holds 10 blocks (9 hittable + 1)
    serve(workers["w1"], "b", base[:17])               # w1 holds the first 4 blocks
    ov = router.overlaps(base + [1, 2, 3])
    assert ov == {"w0": 10, "w1": 4, "w2": 0}
    assert router.overlaps(base) == {"w0": 9, "w1": 4, "w2": 0}  # never the last token
    # what the router says equals what the worker would hit
    for wid, pc in workers.items():
        assert pc.match(base + [1, 2, 3])[1] == ov[wid] * BS


def test_pick_balances_hits_and_load():
    workers, router = cluster(overlap_weight=1.0)
    router2 = Router(BS, hash_fn=hash_fn(), overlap_weight=3.0)
    for wid, pc in workers.items():
        router2.add_worker(wid, pc.events)
    base = list(range(200, 240))
    serve(workers["w1"], "a", base)
    req = base + [5]                                   # 11 blocks, 10 cached on w1
    d = router.pick(req)
    assert d.worker == "w1" and d.num_blocks == 11
    assert d.costs == {"w0": 11.0, "w1": 1.0, "w2": 11.0}
    router.set_load("w1", 10.5)                        # busy: 1 + 10.5 > 11
    assert router.pick(req).worker == "w0"
    router.add_load("w0", 1)                           # w0 11+1, w2 11: w2
    assert router.pick(req).worker == "w2"
    router2.set_load("w1", 10.5)                       # 3*1 + 10.5 < 3*11: hits win
    assert router2.pick(req).worker == "w1"


def test_pick_ties_prefer_overlap_then_load_then_order():
    workers, router = cluster()
    assert router.pick(list(range(10))).worker == "w0"
    router.set_load("w0", 1)
    router.set_load("w1", 0)
    router.set_load("w2", 0)
    assert router.pick(list(range(10))).worker == "w1"


def test_salts_isolated_in_router():
    workers, router = cluster()
    base = list(range(300, 340))
    serve(workers["w0"], "a", base, salt="tenant-a")
    serve(workers["w1"], "b", base, salt="tenant-b")
    assert router.overlaps(base + [0], salt="tenant-a") == {"w0": 10, "w1": 0, "w2": 0}
    assert router.overlaps(base + [0], salt="tenant-b") == {"w0": 0, "w1": 10, "w2": 0}
    assert router.overlaps(base + [0]) == {"w0": 0, "w1": 0, "w2": 0}


def test_salts_isolated_even_with_a_saltless_hash():
    pc = PrefixCache(32, BS, hash_fn=sglang_hash)
    router = Router(BS, hash_fn=sglang_hash)
    router.add_worker("w", pc.events)
    serve(pc, "a", list(range(9)), salt="x")
    assert router.overlaps(list(range(9)), salt="x") == {"w": 2}
    assert router.overlaps(list(range(9)), salt="y") == {"w": 0}


def test_eviction_events_reach_router():
    workers, router = cluster(n=1, num_blocks=12)     # 11 usable blocks
    pc = workers["w0"]
    a = list(range(40))
    serve(pc, "a", a)                                   # 10 blocks, all cached then freed
    assert router.overlaps(a + [0]) == {"w0": 10}
    serve(pc, "b", list(range(1000, 1024)))             # 6 blocks: evicts a's tail first
    ov = router.overlaps(a + [0])["w0"]
    assert ov == pc.match(a + [0])[1] // BS == 5
    pc.pool.reset_prefix_cache()
    assert router.overlaps(a + [0]) == {"w0": 0}


def test_tiers_union_of_leading_blocks():
    bus = EventBus()
    router = Router(BS, tiers=("device", "host"))
    router.add_worker("w", bus)
    router.add_worker("v")
    toks = list(range(17))
    hs = hash_blocks(np.asarray(toks[:16], np.int32), BS)
    bus.publish(KVEvent("stored", (hs[0], hs[2]), None, "device", b"", 8))
    bus.publish(KVEvent("stored", (hs[1],), hs[0], "host", b"", 4))
    bus.publish(KVEvent("stored", (hs[3],), hs[2], "disk", b"", 4))   # not a counted tier
    assert router.overlaps(toks) == {"w": 3, "v": 0}
    bus.publish(KVEvent("evicted", (hs[1],), None, "host", b"", 4))
    assert router.overlaps(toks) == {"w": 1, "v": 0}
    assert router.cached_hashes("w", "device") == {b"": {hs[0], hs[2]}}


def test_remove_worker_forgets_its_blocks():
    workers, router = cluster(n=2)
    base = list(range(50))
    serve(workers["w0"], "a", base)
    serve(workers["w1"], "a", base)
    router.remove_worker("w0")
    assert router.workers == ["w1"] and router.overlaps(base) == {"w1": 12}
    serve(workers["w0"], "b", list(range(500, 520)))   # unsubscribed: no error, ignored
    router.add_worker("w9")
    assert router.overlaps(base) == {"w1": 12, "w9": 0}


def test_router_matches_workers_under_random_traffic():
    workers, router = cluster(n=3, num_blocks=24)
    rng = np.random.default_rng(1)
    prefixes = [rng.integers(0, 1000, int(rng.integers(8, 40))).tolist() for _ in range(4)]
    for i in range(60):
        toks = prefixes[i % 4] + rng.integers(0, 1000, int(rng.integers(1, 20))).tolist()
        salt = ["a", "b"][i % 2]
        d = router.pick(toks, salt=salt)
        for wid, pc in workers.items():
            assert pc.match(toks, salt=salt)[1] == d.overlaps[wid] * BS
        serve(workers[d.worker], i, toks, salt=salt)


@pytest.mark.parametrize("call, exc, match", [
    (lambda r: r.add_worker("w0"), ValueError, "worker_id: 'w0' is already added"),
    (lambda r: r.set_load("zz", 1), KeyError, "worker_id: unknown worker 'zz'"),
    (lambda r: r.apply("zz", KVEvent("stored", (), None, "device", b"", 0)), KeyError,
     "worker_id: unknown worker 'zz'"),
    (lambda r: r.apply("w0", KVEvent("moved", (), None, "device", b"", 0)), ValueError,
     "kind: expected one of"),  # refused when the event is made
    (lambda r: r.pick([1.7] * 9), TypeError, r"tokens\[0\]: expected an int token id"),
    (lambda r: r.request_hashes([5] * 8 + [-1]), ValueError,
     r"tokens: expected token ids in \[0, 2\*\*31\)"),
    (lambda r: r.set_load("w0", float("nan")), ValueError, "load: expected a finite number"),
    (lambda r: r.set_load("w0", "abc"), TypeError, "load: expected a number, got str"),
    (lambda r: r.add_load("w0", None), TypeError, "delta: expected a number, got NoneType"),
    (lambda r: r.add_load("w0", float("inf")), ValueError, "delta: expected a finite"),
    (lambda r: r.cached_hashes("w0", tier="host"), KeyError,
     r"tier: 'host' is not one of the router's tiers \('device',\)"),
], ids=["dup", "unknown-load", "unknown-apply", "bad-kind", "float-tokens", "negative-token",
        "nan-load", "str-load", "none-delta", "inf-delta", "unknown-tier"])
def test_router_checks(call, exc, match):
    _, router = cluster(n=1)
    with pytest.raises(exc, match=match):
        call(router)


@pytest.mark.parametrize("kw, match", [
    ({"block_size": 0}, "block_size: expected an int >= 1, got 0"),
    ({"block_size": 4, "overlap_weight": -1}, "overlap_weight: expected >= 0"),
    ({"block_size": 4, "tiers": ()}, "tiers: expected at least one tier name"),
    ({"block_size": 2.5}, "block_size: expected an int, got 2.5"),
    ({"block_size": 4, "overlap_weight": "x"}, "overlap_weight: expected a number, got str"),
    ({"block_size": 4, "overlap_weight": float("nan")}, "overlap_weight: expected >= 0, got nan"),
    ({"block_size": 4, "tiers": "device"},
     r"tiers: expected a sequence of tier names, got the string 'device'; pass \('device',\)"),
], ids=["block-size", "weight", "tiers", "float-block-size", "str-weight", "nan-weight",
        "str-tiers"])
def test_router_constructor_checks(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Router(**kw)


def test_add_worker_with_a_bad_bus_adds_nothing():
    router = Router(BS)
    with pytest.raises(TypeError, match="events: expected an EventBus"):
        router.add_worker("w0", "not a bus")

    class Failing:
        def subscribe(self, fn):
            raise RuntimeError("bus closed")

    with pytest.raises(RuntimeError, match="bus closed"):
        router.add_worker("w0", Failing())
    assert router.workers == []
    router.add_worker("w0")  # not "already added"
    router.set_load("w0", 3)
    assert router.pick([1, 2, 3]).worker == "w0" and router.load("w0") == 3.0


def test_remove_unknown_worker_names_it():
    _, router = cluster(n=1)
    with pytest.raises(KeyError, match=r"worker_id: unknown worker 'zz'; known: \['w0'\]"):
        router.remove_worker("zz")


def test_pick_without_workers():
    with pytest.raises(ValueError, match="Router: no workers added"):
        Router(BS).pick([1, 2, 3])


_H = [bytes([i]) * 32 for i in range(4)]


def _router(**kw):
    return Router(4, hash_fn=lambda t, bs, salt=None, parent=None: _H[:len(t) // bs], **kw)


def _ev(kind, hs, tier="device"):
    return KVEvent(kind, tuple(hs), None, tier, b"", 4 * len(hs))


def test_one_workers_eviction_leaves_the_others_blocks():
    r = _router()
    a, b = r.add_worker("A"), r.add_worker("B")
    a(_ev("stored", _H[:2]))
    b(_ev("stored", _H[:2]))
    b(_ev("evicted", _H[:2]))
    assert r.overlaps_for_hashes(_H[:2]) == {"A": 2, "B": 0}


def test_a_tier_cleared_keeps_the_workers_other_tiers():
    r = _router(tiers=("device", "host"))
    a = r.add_worker("A")
    a(_ev("stored", _H[:2], "host"))
    a(_ev("stored", _H[2:3], "device"))
    a(KVEvent("cleared", (), None, "device", b"", 0))
    assert r.cached_hashes("A", "host") == {b"": set(_H[:2])}
    assert r.cached_hashes("A", "device") == {}


def test_equal_costs_go_to_the_larger_overlap():
    r = _router()
    r.add_worker("A")
    b = r.add_worker("B")
    b(_ev("stored", _H[:2]))
    r.set_load("B", 2.0)  # cost A = 3 blocks to compute + 0 load = 3; B = 1 + 2 = 3
    d = r.pick(list(range(13)))
    assert d.costs["A"] == d.costs["B"] and d.worker == "B"


class _CountingDict(dict):
    """A namespace of the router's index that counts the entries a call reads."""

    reads = 0

    def items(self):
        _CountingDict.reads += len(self)
        return super().items()

    def __iter__(self):
        _CountingDict.reads += len(self)
        return super().__iter__()

    def __getitem__(self, key):
        _CountingDict.reads += 1
        return super().__getitem__(key)


def _hashes(prefix: int, n: int) -> tuple:
    return tuple(prefix.to_bytes(2, "little") + i.to_bytes(4, "little") for i in range(n))


def _check_index(router: Router) -> None:
    """Every bit set in the index is a hash the router lists for that worker's tier."""
    want: dict = {}
    for ns, d in router._index.items():
        assert d, "an empty namespace kept"
        for h, m in d.items():
            assert m
            for w in router.workers:
                for tier in router.tiers:
                    pos = router._workers[w] * len(router.tiers) + router.tiers.index(tier)
                    if m >> pos & 1:
                        want.setdefault((w, tier), {}).setdefault(ns, set()).add(h)
    for w in router.workers:
        for tier in router.tiers:
            assert router.cached_hashes(w, tier) == want.get((w, tier), {})


def test_clearing_a_worker_reads_only_its_own_blocks():
    """A worker's "cleared" event and remove_worker read that worker's entries of the index,
    not every worker's (they scanned the whole index: 3.2M entries, 0.3 s per clear)."""
    router = Router(BS, tiers=("device", "host"))
    apply = {w: router.add_worker(w) for w in ("big", "small", "empty")}
    apply["big"](KVEvent("stored", _hashes(1, 1000), None, "device", b"", 0))
    apply["small"](KVEvent("stored", _hashes(2, 3), None, "device", b"", 0))
    apply["small"](KVEvent("stored", _hashes(1, 2), None, "host", b"", 0))  # shared with big
    apply["small"](KVEvent("stored", _hashes(3, 2), None, "device", b"t", 0))
    router._index[b""] = _CountingDict(router._index[b""])
    _CountingDict.reads = 0
    apply["small"](KVEvent("cleared", (), None, "device", b"", 0))
    assert _CountingDict.reads <= 3
    assert router.cached_hashes("small", "device") == {}
    assert router.cached_hashes("small", "host") == {b"": set(_hashes(1, 2))}
    _CountingDict.reads = 0
    router.remove_worker("empty")
    router.remove_worker("small")
    assert _CountingDict.reads <= 2
    assert router.overlaps_for_hashes(_hashes(1, 5)) == {"big": 5}
    assert b"t" not in router._index and len(router._index[b""]) == 1000
    _check_index(router)


def test_overlaps_of_many_workers_with_different_prefixes():
    """Workers (two tiers, slots reused after a removal) holding leading prefixes of every
    length: each gets its own leading count."""
    router = Router(BS, tiers=("device", "host"))
    hs = _hashes(7, 40)
    apply = {w: router.add_worker(w) for w in range(40)}
    router.remove_worker(3)
    apply[3] = router.add_worker(3)  # takes slot 3 again
    for w in range(40):
        apply[w](KVEvent("stored", hs[:w], None, ("device", "host")[w % 2], b"", 0))
        apply[w](KVEvent("stored", hs[w + 3:w + 6], None, "device", b"", 0))  # not leading
    apply[10](KVEvent("evicted", hs[4:10], None, "device", b"", 0))  # w10 keeps 4 leading
    apply[10](KVEvent("removed", hs[:2], None, "host", b"", 0))      # not its tier: no change
    want = {w: w for w in range(40)}
    want[10] = 4
    assert router.overlaps_for_hashes(hs) == want
    assert router.pick(np.arange(40 * BS + 1, dtype=np.int32)).num_blocks == 41
    _check_index(router)


def test_a_hash_fn_that_cannot_run_fails_when_given(monkeypatch):
    # a compatibility mode whose package is missing built a Router that failed at its first
    # pick, mid-serving; now the Router calls hash_fn once when it is made
    import sys

    from prefixkv.paged.vllm_events import vllm_hash_fn

    monkeypatch.setitem(sys.modules, "cbor2", None)
    with pytest.raises(ValueError, match=r"hash_fn: calling it as .*cbor2"):
        Router(4, hash_fn=vllm_hash_fn(algo="vllm-sha256-cbor", seed="0"))
    with pytest.raises(ValueError, match="hash_fn: calling it"):
        Router(4, hash_fn=lambda tokens, block_size: [])  # another signature
