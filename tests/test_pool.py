"""BlockPool: allocation order, ref counts, LRU eviction (tail first), namespaced hash index,
events and their replay, input checks."""

import numpy as np
import pytest
from prefixkv.paged.events import EventBus, EventLog, KVEvent, replay
from prefixkv.paged.pool import NULL_BLOCK, BlockPool, NoFreeBlocksError, namespace_of


def h(i: int) -> bytes:
    return i.to_bytes(32, "little")


def test_null_block_never_allocated():
    pool = BlockPool(5, 4)
    got = pool.allocate(4)
    assert got == [1, 2, 3, 4]  # lowest ids first, never 0
    assert NULL_BLOCK not in got and pool.num_free == 0 and pool.usage == 1.0
    with pytest.raises(NoFreeBlocksError, match="asked for 1 blocks, only 0 free"):
        pool.allocate(1)
    pool.check_consistency()


def test_allocate_short_changes_nothing():
    pool = BlockPool(6, 4)
    a = pool.allocate(2)
    pool.register(a, [h(1), h(2)])
    pool.free(a)
    before = (pool.free_queue(), pool.cached_hashes(), list(pool.ref_counts))
    with pytest.raises(NoFreeBlocksError, match="asked for 6 blocks, only 5 free"):
        pool.allocate(6)
    assert (pool.free_queue(), pool.cached_hashes(), list(pool.ref_counts)) == before


def test_allocate_negative():
    with pytest.raises(ValueError, match="n: expected >= 0"):
        BlockPool(4, 4).allocate(-1)


def test_ref_counts_touch_free():
    pool = BlockPool(8, 4)
    blocks = pool.allocate(3)
    pool.register(blocks, [h(1), h(2), h(3)])
    pool.touch(blocks[:2])
    assert [pool.ref_counts[b] for b in blocks] == [2, 2, 1]
    pool.free(blocks)
    assert [pool.ref_counts[b] for b in blocks] == [1, 1, 0]
    assert pool.free_queue()[-1] == blocks[2]
    pool.touch([blocks[2]])  # a hit on a free cached block takes it out of the queue
    assert blocks[2] not in pool.free_queue() and pool.ref_counts[blocks[2]] == 1
    pool.check_consistency()


def test_free_more_than_referenced():
    pool = BlockPool(4, 4)
    b = pool.allocate(1)
    pool.free(b)
    with pytest.raises(ValueError, match="freed more often than referenced"):
        pool.free(b)


def test_free_takes_any_iterable_of_ids():
    """free() of a numpy array, a tuple or a generator frees as a list does (the class takes
    any iterable of ids; an array raised numpy's ambiguous-truth error, a generator was used
    up by min() and then refused by reversed()); a bad id still raises with nothing freed.
    Emptied blocks come back most recently emptied first."""
    for kind in (np.array, tuple, iter):
        pool = BlockPool(8, 4)
        a = pool.allocate(3)
        pool.free(kind(a))
        assert pool.num_free == 7 and pool.ref_counts[1:4] == [0, 0, 0]
        pool.check_consistency()
        b = pool.allocate(2)
        with pytest.raises(ValueError, match="freed more often"):
            pool.free(kind([b[0], 5]))
        assert pool.ref_counts[b[0]] == 1
        pool.check_consistency()
    pool = BlockPool(8, 4)
    a = pool.allocate(3)
    pool.free([a[0]])
    pool.free([a[2]])
    assert pool.allocate(1) == [a[2]]


def test_tail_evicted_first_and_empty_before_cached():
    pool = BlockPool(9, 4)
    seq = pool.allocate(4)          # [1, 2, 3, 4]
    pool.register(seq, [h(10), h(11), h(12), h(13)])
    other = pool.allocate(2)        # [5, 6], never cached
    pool.free(seq)
    pool.free(other)
    # empty blocks (5, 6, then 7, 8) before any cached one; cached ones tail first
    assert pool.free_queue()[-4:] == [4, 3, 2, 1]
    got = pool.allocate(5)
    assert sorted(got[:4]) == [5, 6, 7, 8] and got[4] == 4
    assert pool.lookup([h(10), h(11), h(12), h(13)]) == [1, 2, 3]
    pool.check_consistency()


def test_lru_order_across_sequences():
    pool = BlockPool(7, 4)
    a = pool.allocate(3)
    pool.register(a, [h(1), h(2), h(3)])
    b = pool.allocate(3)
    pool.register(b, [h(4), h(5), h(6)])
    pool.free(b)        # b freed first: least recently used
    pool.free(a)
    assert pool.allocate(3) == [b[2], b[1], b[0]]
    assert pool.lookup([h(1), h(2), h(3)]) == a


def test_lookup_leading_hits_only():
    pool = BlockPool(8, 4)
    a = pool.allocate(3)
    pool.register([a[0], a[2]], [h(1), h(3)])
    assert pool.lookup([h(1), h(2), h(3)]) == [a[0]]
    assert pool.lookup([h(2), h(3)]) == []
    assert pool.lookup([]) == []
    assert pool.get(h(3)) == a[2] and pool.get(h(2)) is None


def test_namespace_isolation_same_hash():
    pool = BlockPool(8, 4)
    a, b = pool.allocate(2)
    pool.register([a], [h(7)], namespace_of("tenant-a"))
    pool.register([b], [h(7)], namespace_of("tenant-b"))
    assert pool.lookup([h(7)], b"tenant-a") == [a]
    assert pool.lookup([h(7)], b"tenant-b") == [b]
    assert pool.lookup([h(7)]) == [] and pool.lookup([h(7)], b"tenant-c") == []
    assert pool.cached_hashes() == {b"tenant-a": {h(7): a}, b"tenant-b": {h(7): b}}


def test_namespace_of():
    assert namespace_of(None) == b"" and namespace_of("é") == "é".encode()
    assert namespace_of(b"x") == b"x"
    with pytest.raises(TypeError, match="salt: expected str, bytes or None, got int"):
        namespace_of(3)


def test_namespaces_without_cached_blocks_are_dropped():
    """Per-user salts: the index holds only namespaces with a cached block, however many salts
    came and went (it kept an empty dict for every salt ever seen, so its memory and
    num_cached grew with them)."""
    pool = BlockPool(5, 4)  # 4 usable blocks: each salt's 2 blocks evict an older salt's
    for i in range(100):
        b = pool.allocate(2)
        assert pool.register(b, [h(1), h(2)], namespace_of(f"user-{i}")) == 2
        pool.free(b)
        pool.check_consistency()
    assert sorted(pool._index) == [b"user-98", b"user-99"] and pool.num_cached == 4
    held = pool.lookup([h(1), h(2)], b"user-99")
    pool.touch(held)
    assert pool.unregister(held) == 2  # unregistering the last block drops the namespace
    assert list(pool._index) == [b"user-98"]
    # a register that registers nothing (the block already has a hash) adds no namespace
    old = pool.lookup([h(1)], b"user-98")
    assert pool.register(old, [h(7)], b"nobody") == 0 and b"nobody" not in pool._index
    pool.free(held)
    pool.check_consistency()


def test_register_duplicate_hash_leaves_block_uncached():
    pool = BlockPool(8, 4)
    a, b = pool.allocate(2)
    assert pool.register([a], [h(1)]) == 1
    assert pool.register([b], [h(1)]) == 0
    assert pool.block_hash(b) is None and pool.lookup([h(1)]) == [a]
    assert pool.register([a], [h(2)]) == 0  # a block keeps its first hash
    pool.free([a, b])
    assert pool.free_queue()[-1] == a and b not in pool.free_queue()[-1:]
    pool.check_consistency()


def test_unregister_and_reset():
    pool = BlockPool(8, 4)
    a = pool.allocate(3)
    pool.register(a, [h(1), h(2), h(3)])
    pool.free([a[2]])
    assert pool.unregister([a[1], a[2]]) == 2
    assert pool.lookup([h(1), h(2)]) == [a[0]] and pool.ref_counts[a[1]] == 1
    assert a[2] in pool.free_queue() and pool.block_hash(a[2]) is None
    pool.check_consistency()
    pool.reset_prefix_cache()
    assert pool.cached_hashes() == {} and pool.num_cached == 0
    pool.check_consistency()


def test_events_stored_evicted_removed_cleared_replay():
    bus = EventBus()
    pool = BlockPool(6, 4, events=bus, tier="device")
    log = EventLog()
    unsubscribe = bus.subscribe(log)
    a = pool.allocate(4)
    pool.register(a[:2], [h(1), h(2)], b"s", parent_hash=None)
    pool.register([a[2], a[3]], [h(1), h(4)], b"s", parent_hash=h(2))  # h(1) dup -> skipped
    assert log.events[0] == KVEvent("stored", (h(1), h(2)), None, "device", b"s", 8,
                                    (a[0], a[1]))
    assert log.events[1] == KVEvent("stored", (h(4),), h(1), "device", b"s", 4, (a[3],))
    pool.free(a)
    pool.allocate(5)  # 2 empty (block 5 and the uncached a[2]), then 3 evicted, tail first
    ev = log.events[2]
    assert ev.kind == "evicted" and ev.namespace == b"s" and ev.num_tokens == 12
    assert ev.block_ids == (a[3], a[1], a[0]) and ev.block_hashes == (h(4), h(2), h(1))
    assert log.replay() == pool.cached_hashes() == {}
    pool.free(a)
    b = pool.allocate(1)
    pool.register(b, [h(9)], b"")
    pool.unregister(b)
    assert log.events[-1].kind == "removed" and log.events[-1].block_hashes == (h(9),)
    pool.register(b, [h(9)], b"")
    pool.reset_prefix_cache()
    assert log.events[-1].kind == "cleared" and log.replay() == {}
    unsubscribe()
    pool.register(b, [h(8)])
    assert log.events[-1].kind == "cleared" and not bus
    assert replay(log.events, tier="host") == {}


def test_event_bus_rejects_non_callable():
    with pytest.raises(TypeError, match="fn: expected a callable"):
        EventBus().subscribe(3)


def test_replay_of_several_tiers_needs_a_tier():
    """A TieredStore's bus carries every tier's events: one index cannot hold them (the host's
    "cleared" would wipe the disk's block), so replay asks for a tier."""
    events = [KVEvent("stored", (h(1),), None, "disk", b"", 4),
              KVEvent("stored", (h(1),), None, "host", b"", 4),
              KVEvent("cleared", (), None, "host", b"", 4)]
    with pytest.raises(ValueError, match=r"tier: the events come from more than one tier "
                                         r"\('disk' and 'host'\); replay one at a time"):
        replay(events)
    assert replay(events, tier="disk") == {b"": {h(1): -1}}
    assert replay(events, tier="host") == {}
    assert replay(events[:1]) == {b"": {h(1): -1}}


def test_replay_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind: expected one of"):  # refused when made
        replay([KVEvent("moved", (h(1),), None, "device", b"", 4)])


@pytest.mark.parametrize("num_blocks, block_size, error, match", [
    (1, 4, ValueError, "num_blocks: expected an int >= 2"),
    (4.0, 4, TypeError, "num_blocks: expected an int, got 4.0"),
    (True, 4, TypeError, "num_blocks: expected an int, got True"),
    (4, 0, ValueError, "block_size: expected an int >= 1"),
    (4, "4", TypeError, "block_size: expected an int, got '4'"),
], ids=["one-block", "float", "bool", "block-size-0", "str"])
def test_constructor_checks(num_blocks, block_size, error, match):
    with pytest.raises(error, match=match):
        BlockPool(num_blocks, block_size)


def test_constructor_takes_numpy_ints():
    """Pool sizes computed from memory arithmetic arrive as np.int64."""
    pool = BlockPool(np.int64(8), np.int32(4))
    assert (pool.num_blocks, pool.block_size) == (8, 4)
    assert type(pool.num_blocks) is int and type(pool.block_size) is int


def test_check_blocks():
    pool = BlockPool(4, 4)
    assert pool.check_blocks([1, 3]) == [1, 3]
    with pytest.raises(ValueError, match=r"ids\[0\]: expected a block id in \[1, 4\)"):
        pool.check_blocks([0], "ids")
    with pytest.raises(ValueError, match=r"blocks\[1\]: expected a block id in \[1, 4\)"):
        pool.check_blocks([1, 4])
    with pytest.raises(TypeError, match=r"blocks\[0\]: expected an int block id"):
        pool.check_blocks(["1"])
    with pytest.raises(ValueError, match="blocks: expected distinct block ids"):
        pool.check_blocks([2, 2])


def test_reset_returns_free_cached_blocks_to_the_free_pool():
    """reset_prefix_cache with freed cached blocks in the LRU queue: they become plain free
    blocks (none leaks), and the whole pool can be allocated."""
    pool = BlockPool(8, 4)
    b = pool.allocate(3)
    pool.register(b, [bytes([i]) * 32 for i in range(3)])
    pool.free(b)
    pool.reset_prefix_cache()
    assert pool.num_free == 7 and pool.num_cached == 0
    pool.check_consistency()
    assert len(pool.allocate(7)) == 7


def test_snapshot_events_catch_up_a_late_subscriber():
    """A router (or an EventLog) added after blocks were cached learns them from the pool's
    snapshot, then follows the events: its index equals the pool's, salts kept apart."""
    from prefixkv.paged import PrefixCache, Router

    pc = PrefixCache(num_blocks=16, block_size=4)
    for rid, salt in (("a", None), ("b", "tenant")):
        pc.add_request(rid, list(range(13)), salt=salt)
        pc.step([(rid, 13)])
        pc.free(rid)
    snap = pc.pool.snapshot_events()
    assert [(e.kind, e.namespace, len(e.block_hashes), e.parent_hash) for e in snap] == [
        ("stored", b"", 3, None), ("stored", b"tenant", 3, None)]
    assert replay(snap) == pc.pool.cached_hashes()
    router = Router(4)
    apply = router.add_worker("w", pc.events)
    router.add_worker("empty")
    assert router.pick(list(range(13))).overlaps == {"w": 0, "empty": 0}
    for ev in snap:
        apply(ev)
    assert router.pick(list(range(13))).overlaps == {"w": 3, "empty": 0}
    assert router.pick(list(range(13)), salt="tenant").overlaps == {"w": 3, "empty": 0}
    assert router.pick(list(range(13)), salt="other").overlaps == {"w": 0, "empty": 0}
    pc.pool.reset_prefix_cache()  # later changes arrive as events
    assert router.pick(list(range(13))).overlaps == {"w": 0, "empty": 0}
    assert pc.pool.snapshot_events() == []


def test_stored_events_carry_the_blocks_tokens():
    """register's token_ids reach each "stored" event, split with its run of new blocks (a
    block already cached breaks the run), as vLLM's BlockStored.token_ids."""
    pool = BlockPool(8, 2)
    log = EventLog()
    pool.events.subscribe(log)
    a, b, c = pool.allocate(3)
    pool.register([a], [h(2)], token_ids=[3, 4])
    pool.register([b, a, c], [h(1), h(2), h(3)], token_ids=np.arange(1, 7))
    got = [(e.block_hashes, e.parent_hash, e.token_ids, e.num_tokens) for e in log.events]
    assert got == [((h(2),), None, (3, 4), 2), ((h(1),), None, (1, 2), 2),
                   ((h(3),), h(2), (5, 6), 2)]
    assert all(type(t) is int for e in log.events for t in e.token_ids)
    with pytest.raises(ValueError, match=r"token_ids: expected 4 tokens \(block_size per "
                                         r"block\), got 3"):
        pool.register([b, c], [h(7), h(8)], token_ids=[1, 2, 3])


def test_prefix_cache_events_carry_the_tokens_of_each_stored_block():
    """A PrefixCache's "stored" events hold the tokens of their blocks (prefill, then the
    blocks decode fills), so an indexer hashing tokens rebuilds the same blocks."""
    from prefixkv.paged import PrefixCache

    pc = PrefixCache(num_blocks=16, block_size=4)
    log = EventLog()
    pc.events.subscribe(log)
    pc.add_request("a", list(range(100, 110)))
    pc.step([("a", 10)])
    pc.append_tokens("a", [7, 8])
    pc.step([("a", 2)])
    stored = [e for e in log.events if e.kind == "stored"]
    assert [e.token_ids for e in stored] == [tuple(range(100, 108)),
                                             (108, 109, 7, 8)]
    assert all(len(e.token_ids) == e.num_tokens for e in stored)
    assert stored[1].parent_hash == stored[0].block_hashes[-1]
