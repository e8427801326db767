"""BlockPool under faults: event subscribers that raise, frees that fail midway, bad counts.

The pool finishes its own bookkeeping before publishing, publishes every event of a call even
when a subscriber raises on one, and re-raises the first exception; ``allocate`` then gives
back the blocks it took. ``free`` is all or nothing."""

import numpy as np
import pytest
from prefixkv.paged.events import EVICTED, STORED, EventLog
from prefixkv.paged.pool import BlockPool


def h(i: int) -> bytes:
    return i.to_bytes(32, "little")


class Boom(RuntimeError):
    pass


def _raise_on(kind):
    def sub(ev):
        if ev.kind == kind:
            raise Boom(f"subscriber failed on {kind}")
    return sub


def _cached_free_pool(n_cached=3, num_blocks=6, namespaces=(b"",)):
    """A pool whose blocks 1..n_cached are cached and free (the rest empty), one namespace per
    block in turn."""
    pool = BlockPool(num_blocks, 4)
    got = pool.allocate(n_cached)
    for i, b in enumerate(got):
        pool.register([b], [h(100 + i)], namespaces[i % len(namespaces)])
    pool.free(got)
    return pool


def _state(pool):
    return (pool.free_queue(), pool.cached_hashes(), list(pool.ref_counts), pool.num_free)


def test_evicted_subscriber_raising_leaves_the_pool_consistent_and_takes_nothing():
    pool = _cached_free_pool()
    log = EventLog()
    pool.events.subscribe(log)
    unsubscribe = pool.events.subscribe(_raise_on(EVICTED))
    free_before = pool.num_free
    with pytest.raises(Boom, match="evicted"):
        pool.allocate(4)  # 2 empty + 2 evicted
    pool.check_consistency()
    # nothing is held: every block the allocation took is free again, the evicted ones empty
    assert all(r == 0 for r in pool.ref_counts) and pool.num_free == free_before
    # the evicted hashes (the queue's tail-first order: 3, 2) stay evicted, as announced
    assert [(e.kind, e.block_ids, e.block_hashes) for e in log.events] == [
        (EVICTED, (3, 2), (h(102), h(101)))]
    assert pool.cached_hashes() == {b"": {h(100): 1}}
    # the pool still works: the next allocation (no failing subscriber) gets every block
    unsubscribe()
    assert sorted(pool.allocate(5)) == [1, 2, 3, 4, 5]
    pool.check_consistency()


def test_evicted_subscriber_sees_a_consistent_pool():
    pool = _cached_free_pool()
    seen = []

    def check(ev):
        if ev.kind == EVICTED:
            pool.check_consistency()  # blocks are held by the allocation, hashes gone
            seen.append([pool.ref_counts[b] for b in ev.block_ids])
            assert all(pool.block_hash(b) is None for b in ev.block_ids)

    pool.events.subscribe(check)
    got = pool.allocate(5)
    assert seen == [[1, 1, 1]] and len(got) == 5
    pool.check_consistency()


def test_every_namespace_event_is_published_when_a_subscriber_raises_on_one():
    pool = _cached_free_pool(n_cached=2, namespaces=(b"a", b"b"))
    log = EventLog()
    pool.events.subscribe(log)
    pool.events.subscribe(_raise_on(EVICTED))
    with pytest.raises(Boom):
        pool.allocate(5)
    assert [(e.kind, e.namespace) for e in log.events] == [(EVICTED, b"b"), (EVICTED, b"a")]
    assert log.replay() == pool.cached_hashes() == {}
    pool.check_consistency()


def test_register_publishes_every_run_when_a_subscriber_raises():
    pool = BlockPool(6, 4)
    a = pool.allocate(3)
    pool.register([a[1]], [h(2)])  # a[1]'s hash is cached: register(a) makes two runs
    log = EventLog()
    pool.events.subscribe(log)
    pool.events.subscribe(_raise_on(STORED))
    with pytest.raises(Boom):
        pool.register(a, [h(1), h(2), h(3)])
    assert [e.block_ids for e in log.events] == [(a[0],), (a[2],)]
    assert log.replay() == {b"": {h(1): a[0], h(3): a[2]}}  # log joined after h(2)
    assert pool.cached_hashes() == {b"": {h(1): a[0], h(2): a[1], h(3): a[2]}}
    pool.check_consistency()


@pytest.mark.parametrize("case", ["null block", "twice", "out of range", "negative"])
def test_free_is_all_or_nothing(case):
    pool = BlockPool(8, 4)
    a = pool.allocate(4)
    pool.register(a[:2], [h(1), h(2)])  # cached blocks are linked into the LRU queue on free
    c = pool.allocate(2)
    pool.register(c[:1], [h(9)])
    pool.free(c)  # the queue is not empty: one cached free block, one more empty block
    before = _state(pool)
    assert pool.free_queue() == [6, 7, 5]
    # the bad block is freed last (free walks the list tail first)
    blocks, err = {"null block": ([0, *a], ValueError),
                   "twice": ([a[0], *a], ValueError),
                   "out of range": ([99, *a], IndexError),
                   # a list indexes -1 from its end: it had dropped a ref of the last block
                   "negative": ([*a[:1], -1, *a[1:]], IndexError)}[case]
    with pytest.raises(err):
        pool.free(blocks)
    assert _state(pool) == before
    pool.check_consistency()
    pool.free(a)  # and the good free still works
    pool.check_consistency()


def test_free_error_names_the_block():
    pool = BlockPool(4, 4)
    a = pool.allocate(1)
    with pytest.raises(ValueError, match="blocks: block 0 freed more often than referenced"):
        pool.free([0, *a])
    assert pool.ref_counts[a[0]] == 1


@pytest.mark.parametrize("n", [1.5, 2.0, True, "2", None])
def test_allocate_requires_an_int(n):
    pool = BlockPool(4, 4)
    with pytest.raises(TypeError, match="n: expected an int"):
        pool.allocate(n)
    assert pool.num_free == 3
    pool.check_consistency()


def test_allocate_takes_numpy_integers():
    pool = BlockPool(4, 4)
    got = pool.allocate(np.int64(2))
    assert got == [1, 2] and all(type(b) is int for b in got)
    with pytest.raises(ValueError, match="n: expected >= 0"):
        pool.allocate(np.int32(-1))
    assert pool.allocate(np.uint8(1)) == [3]


def test_a_step_whose_eviction_subscriber_raises_changes_no_request():
    """Through PrefixCache.step: the subscriber's exception propagates, the step's blocks are
    all given back and the request can be stepped again once the subscriber is gone."""
    from prefixkv.paged.prefix_cache import PrefixCache

    pc = PrefixCache(num_blocks=5, block_size=2)
    pc.add_request("a", [1, 2, 3, 4, 5])
    pc.step([("a", 5)])
    pc.free("a")  # 2 cached + 1 empty free blocks, + 1 never used
    unsubscribe = pc.events.subscribe(_raise_on(EVICTED))
    pc.add_request("b", [9] * 7)  # 4 blocks: 2 empty + 2 evicted
    with pytest.raises(Boom):
        pc.step([("b", 7)])
    pc.pool.check_consistency()
    assert pc.blocks("b") == [] and pc.num_computed("b") == 0 and pc.pool.num_free == 4
    unsubscribe()
    pc.step([("b", 7)])
    assert sorted(pc.blocks("b")) == [1, 2, 3, 4] and pc.num_computed("b") == 7
    pc.pool.check_consistency()


def test_touch_refuses_a_negative_block_and_changes_nothing():
    pool = BlockPool(4, 4)
    a = pool.allocate(3)
    before = _state(pool)
    with pytest.raises(IndexError, match=r"blocks: expected block ids in \[0, 4\), got -1"):
        pool.touch([a[0], -1])
    assert _state(pool) == before
    pool.check_consistency()


@pytest.mark.parametrize("call", ["touch", "free", "unregister", "register"])
@pytest.mark.parametrize("bad", [-6, 8, 100])
def test_block_ids_out_of_range_change_nothing(call, bad):
    """A bad id after good ones: unregister had dropped the good block's hash and then raised
    IndexError naming nothing, before its "removed" event (an EventLog or Router kept a hash
    the pool had dropped); touch left a reference nobody held; -6 unregistered block 2 of 8
    (a list indexed from its end)."""
    pool = BlockPool(8, 4)
    log = EventLog()
    pool.events.subscribe(log)
    a = pool.allocate(3)
    pool.register(a[:2], [b"a" * 32, b"b" * 32])
    pool.free([a[1]])  # a[1] free and cached, a[0] in use and cached, a[2] in use
    before = _state(pool)
    args = {"register": ([a[2], bad], [b"c" * 32, b"d" * 32])}.get(call, ([a[0], bad],))
    with pytest.raises(IndexError, match=rf"blocks: expected block ids in \[0, 8\), got {bad}"):
        getattr(pool, call)(*args)
    assert _state(pool) == before and log.replay() == pool.cached_hashes()
    pool.check_consistency()


def test_block_hash_and_namespace_refuse_ids_out_of_range():
    pool = BlockPool(8, 4)
    a = pool.allocate(3)
    pool.register([a[1]], [b"h" * 32], b"ns")
    assert pool.block_hash(a[1]) == b"h" * 32 and pool.block_namespace(a[1]) == b"ns"
    for bad in (-8 + a[1], 8):  # -6 had answered for block 2
        with pytest.raises(IndexError, match=rf"block: expected a block id in \[0, 8\), "
                                             rf"got {bad}"):
            pool.block_hash(bad)
        with pytest.raises(IndexError, match="block: expected a block id"):
            pool.block_namespace(bad)


def test_touch_and_register_refuse_a_free_empty_block():
    """A free block holding nothing is in no queue: touch had unlinked it by stale links (the
    LRU count went to -1, allocate handed the referenced block out again: two owners), and
    register had cached it (allocate then handed it out while its hash still hit)."""
    pool = BlockPool(4, 4)
    a = pool.allocate(1)
    pool.register(a, [b"x" * 32])
    before = _state(pool)
    with pytest.raises(ValueError, match="blocks: block 2 is free and holds nothing cached"):
        pool.touch([a[0], 2])
    with pytest.raises(ValueError, match="blocks: block 3 is free; register caches blocks in "
                                         "use"):
        pool.register([3], [b"y" * 32])
    assert _state(pool) == before
    pool.check_consistency()
    pool.free(a)
    pool.touch(a)  # a free cached block: a hit takes it back
    assert pool.ref_counts[a[0]] == 1 and pool.num_free == 2
    pool.check_consistency()


def test_a_failed_touch_or_register_puts_everything_back():
    """The checks run as the calls go (no pass of their own: the hot path): a bad block
    after good ones takes the good ones back, free cached blocks to their places in the LRU
    queue, registrations of the call (not earlier ones) out of the index."""
    pool = BlockPool(10, 4)
    a = pool.allocate(6)
    pool.register(a[:5], [bytes([i]) * 32 for i in range(5)])
    pool.free(a[:4])  # 4 free cached blocks queued, a[4] in use cached, a[5] in use
    before = _state(pool)
    for bad, error in ((9, ValueError), (10, IndexError), (99, IndexError)):
        with pytest.raises(error, match="blocks: "):
            pool.touch([a[2], a[0], a[4], a[3], bad])  # 9: free and empty
        assert _state(pool) == before
        pool.check_consistency()
        with pytest.raises(error, match="blocks: "):  # a[4] registered before: it stays
            pool.register([a[4], a[5], bad], [bytes([4]) * 32, b"n" * 32, b"m" * 32])
        assert _state(pool) == before and pool.block_hash(a[4]) == bytes([4]) * 32
        pool.check_consistency()
    pool.touch([a[2], a[0]])
    assert pool.free_queue() == [b for b in before[0] if b not in (a[2], a[0])]


def test_a_step_whose_stored_subscriber_raises_changes_no_request():
    """The commit's "stored" subscriber raising (the second request's, after the first's
    blocks were registered): the step is taken back whole, its registrations undone (so no
    request hits blocks no forward pass wrote), and the same step runs again once the
    subscriber is gone."""
    from prefixkv.paged.prefix_cache import PrefixCache

    pc = PrefixCache(num_blocks=16, block_size=4)
    pc.add_request("a", list(range(100, 109)))
    pc.add_request("b", list(range(200, 209)))
    log = EventLog()
    pc.events.subscribe(log)
    seen = []

    def second_raises(ev):
        if ev.kind == STORED:
            seen.append(ev)
            if len(seen) == 2:
                raise Boom("stored")

    unsubscribe = pc.events.subscribe(second_raises)
    with pytest.raises(Boom):
        pc.step([("a", 9), ("b", 9)])
    pc.pool.check_consistency()
    assert [pc.num_computed(r) for r in "ab"] == [0, 0]
    assert pc.blocks("a") == [] and pc.blocks("b") == [] and pc.pool.num_free == 15
    assert pc.pool.cached_hashes() == {} and log.replay() == {}  # stored, then removed
    assert pc.match(list(range(100, 109)))[1] == 0
    unsubscribe()
    pc.step([("a", 9), ("b", 9)])
    assert [pc.num_computed(r) for r in "ab"] == [9, 9]
    assert log.replay() == pc.pool.cached_hashes() and len(pc.pool.cached_hashes()[b""]) == 4
    pc.pool.check_consistency()


def test_an_onboard_whose_stored_subscriber_raises_changes_nothing():
    """onboard's "stored" subscriber raising: as a step, the call is taken back (the blocks
    freed, their registration undone, the request's counts as before), so the caller, who
    then fills nothing, leaves no other request a hit on blocks never written; once the
    subscriber is gone the same onboard runs."""
    from prefixkv.paged.prefix_cache import PrefixCache

    pc = PrefixCache(num_blocks=16, block_size=4)
    prompt = list(range(100, 113))  # 3 full blocks before the last token
    log = EventLog()
    pc.events.subscribe(log)

    def raises(ev):
        if ev.kind == STORED:
            raise Boom("stored")

    unsubscribe = pc.events.subscribe(raises)
    pc.add_request("a", prompt)
    free = pc.pool.num_free
    with pytest.raises(Boom):
        pc.onboard("a", 3)
    pc.pool.check_consistency()
    assert pc.num_computed("a") == 0 and pc.blocks("a") == [] and pc.pool.num_free == free
    assert pc.pool.cached_hashes() == {} and log.replay() == {}  # stored, then removed
    assert pc.match(prompt)[1] == 0
    unsubscribe()
    new = pc.onboard("a", 3)
    assert len(new) == 3 and pc.blocks("a") == new and pc.num_computed("a") == 12
    assert log.replay() == pc.pool.cached_hashes() and len(pc.pool.cached_hashes()[b""]) == 3
    pc.pool.check_consistency()


def test_a_reset_whose_cleared_subscriber_raises_still_re_registers_the_requests():
    from prefixkv.paged.events import CLEARED
    from prefixkv.paged.prefix_cache import PrefixCache

    pc = PrefixCache(num_blocks=16, block_size=4)
    prompt = list(range(100, 110))
    pc.add_request("r", prompt)
    pc.step([("r", len(prompt))])
    unsubscribe = pc.events.subscribe(_raise_on(CLEARED))
    with pytest.raises(Boom):
        pc.reset_prefix_cache()
    unsubscribe()
    assert pc.pool.cached_hashes() == {}
    pc.append_tokens("r", [1, 2])
    pc.step([("r", 2)])  # registers the running request's blocks again
    pc.add_request("s", prompt)
    assert pc.num_computed("s") == 8
