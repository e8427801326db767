"""PrefixCache: hits (full blocks, never the last token, salt-aware), incremental hashing,
allocation, registration, copy-on-write, truncation, onboarding, freeing, and the KV an
engine would read through the plans being the right KV (a simulated engine writes KV that
depends on the whole prefix, through the reference write_kv / copy_blocks)."""

import numpy as np
import pytest
from prefixkv.paged import spec
from prefixkv.paged.events import EventLog
from prefixkv.paged.hashing import hash_blocks
from prefixkv.paged.pool import BlockPool, NoFreeBlocksError
from prefixkv.paged.prefix_cache import PrefixCache
from prefixkv.paged.reference import copy_blocks_reference, write_kv_reference


def sglang_hash(tokens, block_size, *, salt=None, parent=None):
    """A compatibility hash that has no salt at all (SGLang's page chain): the pool and the
    router must keep namespaces apart by themselves."""
    return hash_blocks(np.asarray(tokens, np.int32), block_size, parent=parent,
                       algo="sglang-sha256")


def hash_fn():
    """The hash the tests run with: PrefixCache's default, prefixkv-v1 ``hash_blocks``."""
    return None


def kv_values(tokens) -> np.ndarray:
    """The 'KV' of each position: a function of the whole prefix tokens[:p+1], exact in f32."""
    out = np.empty(len(tokens), dtype=np.float32)
    v = 0
    for p, t in enumerate(tokens):
        v = (v * 31 + int(t) + 1) % 1_000_003
        out[p] = v
    return out


class SimEngine:
    """Drives a PrefixCache like an engine, writing prefix-dependent KV into a numpy cache."""

    def __init__(self, pc: PrefixCache):
        self.pc = pc
        shape = (pc.pool.num_blocks, pc.block_size, 1, 1)
        self.k = np.full(shape, np.nan, dtype=np.float32)
        self.v = np.full(shape, np.nan, dtype=np.float32)

    def run(self, batch):
        """One step; returns the plan. Checks every scheduled request reads its own KV."""
        plan = self.pc.step(batch)
        if plan.copy_src.size:
            self.k, self.v = copy_blocks_reference([self.k, self.v], plan.copy_src,
                                                   plan.copy_dst)
        vals = []
        for rid, n in batch:
            toks = self.pc.tokens(rid)
            end = self.pc.num_computed(rid)
            vals.append(kv_values(toks[:end])[end - n:end])
        new = np.concatenate(vals).reshape(-1, 1, 1) if vals else np.zeros((0, 1, 1), np.float32)
        self.k, self.v = write_kv_reference(new, -new, self.k, self.v, plan.slot_mapping)
        self.check(plan)
        return plan

    def read(self, block_table, kv_len) -> np.ndarray:
        pos = np.arange(kv_len)
        slots = spec.slots_for_positions(np.asarray(block_table), pos, self.pc.block_size)
        bs = self.pc.block_size
        return self.k[slots // bs, slots % bs, 0, 0]

    def check(self, plan):
        for s, rid in enumerate(plan.request_ids):
            kv_len = int(plan.kv_lens[s])
            want = kv_values(self.pc.tokens(rid)[:kv_len])
            np.testing.assert_array_equal(self.read(plan.block_tables[s], kv_len), want)


def make(num_blocks=64, block_size=4, **kw) -> PrefixCache:
    return PrefixCache(num_blocks, block_size, hash_fn=hash_fn(), **kw)


def test_hit_is_full_blocks_and_never_the_last_token():
    pc = make()
    eng = SimEngine(pc)
    toks = list(range(100, 112))                 # 12 tokens = 3 full blocks of 4
    assert pc.add_request("a", toks) == 0
    eng.run([("a", 12)])
    pc.free("a")
    assert pc.match(toks) == (pc.match(toks)[0], 8)   # capped at (12 - 1) // 4 = 2 blocks
    assert pc.match(toks[:11])[1] == 8 and pc.match(toks[:9])[1] == 8
    assert pc.match(toks[:8])[1] == 4 and pc.match(toks[:5])[1] == 4
    assert pc.match(toks[:4]) == ([], 0) and pc.match([]) == ([], 0)
    assert pc.match(toks[:6] + [1, 2, 3, 4, 5, 6])[1] == 4  # diverges inside block 1
    assert pc.add_request("b", toks + [7]) == 12
    eng.run([("b", 1)])


def test_match_takes_no_refs_add_request_does():
    pc = make()
    eng = SimEngine(pc)
    toks = list(range(20))
    pc.add_request("a", toks)
    eng.run([("a", 20)])
    pc.free("a")
    blocks, n = pc.match(toks)
    assert n == 16 and all(pc.pool.ref_counts[b] == 0 for b in blocks)
    assert pc.add_request("b", toks) == 16
    assert pc.blocks("b") == blocks and all(pc.pool.ref_counts[b] == 1 for b in blocks)
    pc.add_request("c", toks[:13])
    assert pc.blocks("c") == blocks[:3] and pc.pool.ref_counts[blocks[0]] == 2
    eng.run([("b", 4), ("c", 1)])
    pc.pool.check_consistency()


def test_salts_never_share_hits():
    pc = make()
    eng = SimEngine(pc)
    toks = list(range(40))
    pc.add_request("a", toks, salt="tenant-a")
    eng.run([("a", 40)])
    assert pc.match(toks, salt="tenant-a")[1] == 36
    assert pc.match(toks)[1] == 0 and pc.match(toks, salt="tenant-b")[1] == 0
    assert pc.match(toks, salt=b"tenant-a")[1] == 36  # str and its UTF-8 bytes: one namespace
    assert pc.add_request("b", toks, salt="tenant-b") == 0
    eng.run([("b", 40)])
    assert set(pc.pool.cached_hashes()) == {b"tenant-a", b"tenant-b"}
    assert not set(pc.blocks("a")) & set(pc.blocks("b"))


def test_salt_isolated_even_when_the_hash_ignores_it():
    pc = PrefixCache(32, 4, hash_fn=sglang_hash)
    pc.add_request("a", list(range(9)), salt="x")
    pc.step([("a", 9)])
    assert pc.match(list(range(9)), salt="x")[1] == 8
    assert pc.match(list(range(9)), salt="y")[1] == 0 and pc.match(list(range(9)))[1] == 0


def test_incremental_hashing_hashes_each_block_once():
    calls = []

    def counting(tokens, block_size, *, salt=None, parent=None):
        calls.append(len(tokens))
        return list(hash_blocks(tokens, block_size, salt=salt, parent=parent))

    pc = PrefixCache(64, 4, hash_fn=counting)
    calls.clear()  # the constructor's check_prefix_chain probe
    eng = SimEngine(pc)
    pc.add_request("a", list(range(10)))
    eng.run([("a", 10)])
    for t in range(30):  # decode 30 tokens one at a time
        pc.append_tokens("a", [t])
        eng.run([("a", 1)])
    assert sum(calls) == 40  # 10 full blocks, each hashed exactly once
    assert pc.request_hashes("a") == hash_blocks(np.asarray(pc.tokens("a"), np.int32), 4)


def test_registration_and_kv_through_chunked_prefill():
    pc = make(block_size=4)
    eng = SimEngine(pc)
    log = EventLog()
    pc.events.subscribe(log)
    toks = list(range(50, 73))                        # 23 tokens
    pc.add_request("a", toks)
    for chunk in (5, 7, 11):                          # chunked prefill
        eng.run([("a", chunk)])
    stored = [h for e in log.events if e.kind == "stored" for h in e.block_hashes]
    assert stored == pc.request_hashes("a") and len(stored) == 5
    assert log.events[0].parent_hash is None
    assert all(e.parent_hash == stored[sum(len(x.block_hashes) for x in log.events[:i]) - 1]
               for i, e in enumerate(log.events) if i)
    assert log.replay() == pc.pool.cached_hashes()


def test_batch_plan_metadata():
    pc = make(block_size=4)
    eng = SimEngine(pc)
    pc.add_request("a", list(range(10)))
    pc.add_request("b", list(range(200, 203)))
    plan = eng.run([("a", 6), ("b", 3)])
    assert plan.block_tables.dtype == plan.kv_lens.dtype == np.int32
    assert plan.cu_q_lens.tolist() == [0, 6, 9] and plan.kv_lens.tolist() == [6, 3]
    assert plan.positions.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    want = np.concatenate([spec.slots_for_positions(plan.block_tables[0], np.arange(6), 4),
                           spec.slots_for_positions(plan.block_tables[1], np.arange(3), 4)])
    np.testing.assert_array_equal(plan.slot_mapping, want)
    plan = eng.run([("a", 4)])
    assert plan.positions.tolist() == [6, 7, 8, 9] and plan.kv_lens.tolist() == [10]


def test_fork_copy_on_write():
    pc = make(block_size=4)
    eng = SimEngine(pc)
    pc.add_request("p", list(range(10)))
    eng.run([("p", 10)])                      # blocks: 2 full (registered) + 1 partial (2 tok)
    pc.fork("p", "c")
    assert pc.blocks("c") == pc.blocks("p")
    assert all(pc.pool.ref_counts[b] == 2 for b in pc.blocks("p"))
    partial = pc.blocks("p")[2]
    pc.append_tokens("p", [7])
    pc.append_tokens("c", [8])
    plan = eng.run([("p", 1), ("c", 1)])      # both write into the shared partial block
    assert plan.copy_src.tolist() == [partial] and len(plan.copy_dst) == 1
    assert pc.blocks("p")[2] == int(plan.copy_dst[0]) and pc.blocks("c")[2] == partial
    assert pc.blocks("p")[:2] == pc.blocks("c")[:2]          # full blocks stay shared
    for _ in range(3):
        pc.append_tokens("p", [1])
        pc.append_tokens("c", [2])
        eng.run([("p", 1), ("c", 1)])
    assert pc.match(pc.tokens("p") + [0])[1] == 12 and pc.match(pc.tokens("c") + [0])[1] == 12
    pc.free("p")
    pc.free("c")
    pc.pool.check_consistency()


def test_allocate_plan_commit_carries_the_copy_on_write_pairs():
    """step taken apart (allocate, plan, then commit after the forward pass): plan() has the
    copies allocate made, as step's plan does (it had none: an engine following the
    fail-safe path skipped the copy and read a block nobody copied into); commit clears
    them, and a failed pass freed leaves nothing registered."""
    plans = []
    for apart in (False, True):
        pc = make(block_size=4)
        pc.add_request("p", list(range(10)))
        pc.step([("p", 10)])
        pc.fork("p", "c")
        pc.append_tokens("p", [7])
        pc.append_tokens("c", [8])
        batch = [("p", 1), ("c", 1)]
        if apart:
            pairs = [x for rid, n in batch for x in pc.allocate(rid, n)]
            plan = pc.plan(batch)
            assert list(zip(plan.copy_src.tolist(), plan.copy_dst.tolist(), strict=True)) == pairs
            assert pc.plan(batch).copy_src.tolist() == plan.copy_src.tolist()  # until commit
            for rid, n in batch:
                pc.commit(rid, n)
            assert pc.plan([("p", 0), ("c", 0)]).copy_src.size == 0
        else:
            plan = pc.step(batch)
        plans.append((plan.copy_src.tolist(), plan.copy_dst.tolist()))
        pc.pool.check_consistency()
    assert plans[0] == plans[1] and len(plans[0][0]) == 1
    pc = make(block_size=4)  # a failed pass: free, nothing registered, nothing copied later
    pc.add_request("a", list(range(9)))
    pc.allocate("a", 9)
    pc.free("a")
    assert pc.add_request("b", list(range(9))) == 0
    pc.pool.check_consistency()


def test_allocate_taken_back_when_an_evicted_subscriber_raises():
    """allocate() that evicts to grow, with an "evicted" subscriber raising, changes nothing:
    the copy-on-write swap it made first is undone and no pair stays queued (the caller never
    got it, and a retry returned none, so the fresh block was read uncopied), while a pair of
    an earlier call this step stays queued; a retry returns the pair again."""
    for earlier in (False, True):
        pc = make(num_blocks=6, block_size=4)         # 5 blocks: a's growth must evict
        pc.add_request("old", list(range(100, 109)))  # 2 full blocks cached, then freed
        pc.step([("old", 9)])
        pc.free("old")
        pc.add_request("a", [1, 2, 3, 4, 5, 6])
        pc.step([("a", 6)])
        pc.fork("a", "b")                             # a's partial block shared
        pc.append_tokens("a", [7, 8, 9])
        queued = pc.allocate("a", 1) if earlier else []  # the CoW pair, not planned yet
        assert len(queued) == int(earlier)
        before = (pc.blocks("a"), pc.blocks("b"), list(pc.pool.ref_counts),
                  pc.plan([("a", 1)]).copy_src.tolist())

        def boom(ev):
            if ev.kind == "evicted":
                raise RuntimeError("offload failed")

        unsubscribe = pc.events.subscribe(boom)
        with pytest.raises(RuntimeError, match="offload failed"):
            pc.allocate("a", 3)
        assert (pc.blocks("a"), pc.blocks("b"), list(pc.pool.ref_counts),
                pc.plan([("a", 1)]).copy_src.tolist()) == before
        pc.pool.check_consistency()
        unsubscribe()
        pairs = pc.allocate("a", 3)
        assert len(queued + pairs) == 1
        assert pc.plan([("a", 3)]).copy_src.tolist() == [src for src, _ in queued + pairs]
        pc.pool.check_consistency()


def test_forked_writers_of_one_block_need_one_copy():
    """Two forked requests writing their shared partial block take one copy (the second
    writes in place): step fits a pool with exactly one free block, where it used to count
    a copy per writer and raise NoFreeBlocksError; three writers of a block held three times
    take two."""
    for children in (1, 2):
        pc = make(num_blocks=4 + children, block_size=4)  # null + 3 + one spare per child
        pc.add_request("p", list(range(10)))              # 3 blocks (the last partial)
        pc.step([("p", 10)])
        batch = [("p", 1)]
        for c in range(children):
            pc.fork("p", f"c{c}")
            batch.append((f"c{c}", 1))
        for rid, _ in batch:
            pc.append_tokens(rid, [7])
        free = pc.pool.num_free
        assert pc.batch_blocks_needed(batch) == children == free
        plan = pc.step(batch)
        assert len(plan.copy_src) == children and pc.pool.num_free == 0
        pc.pool.check_consistency()


def test_step_that_fails_to_plan_undoes_its_copy_on_write(monkeypatch):
    """A step whose planning raises after allocate() took copies and new blocks puts them
    back: the retried step plans the copy again (it was lost, and the forked request then
    read a block nobody copied into) and the pool stays consistent."""
    from prefixkv.paged import prefix_cache as pcm

    pc = make(num_blocks=16, block_size=4)
    pc.add_request("p", list(range(6)))
    pc.step([("p", 6)])                      # block 2 holds 2 tokens
    pc.fork("p", "c")
    pc.append_tokens("c", [9, 9, 9, 9])      # writes into the shared block, then a new one
    before, refs, free = pc.blocks("c"), pc.pool.ref_counts.copy(), pc.pool.num_free

    def fail(*a, **k):
        raise RecursionError("planning failed")

    monkeypatch.setattr(pcm, "plan_checked_rows", fail)
    with pytest.raises(RecursionError, match="planning failed"):
        pc.step([("c", 4)])
    assert pc.blocks("c") == before and pc.num_computed("c") == 6
    np.testing.assert_array_equal(pc.pool.ref_counts, refs)
    assert pc.pool.num_free == free
    pc.pool.check_consistency()
    monkeypatch.undo()
    plan = pc.step([("c", 4)])
    assert plan.copy_src.tolist() == [before[1]] and plan.copy_dst.tolist() == [pc.blocks("c")[1]]
    pc.free("p")
    pc.free("c")
    pc.pool.check_consistency()


def test_truncate_then_rewrite_never_changes_a_cached_block():
    pc = make(block_size=4)
    eng = SimEngine(pc)
    log = EventLog()
    pc.events.subscribe(log)
    toks = list(range(12))
    pc.add_request("a", toks)
    eng.run([("a", 12)])                              # 3 full blocks registered
    third = pc.blocks("a")[2]
    pc.truncate("a", 10)                              # reject 2 speculative tokens
    assert pc.num_computed("a") == 10 and len(pc.blocks("a")) == 3
    pc.append_tokens("a", [90, 91])
    eng.run([("a", 2)])                               # rewrites positions 10, 11 of block 2
    assert log.events[-2].kind == "removed" and log.events[-2].block_ids == (third,)
    assert pc.match(toks + [0])[1] == 8               # the old third block is gone
    assert pc.match(pc.tokens("a") + [0])[1] == 12    # the new one is cached
    pc.add_request("b", toks + [0])
    eng.run([("b", 5)])


def test_truncate_shared_block_copies():
    pc = make(block_size=4)
    eng = SimEngine(pc)
    toks = list(range(12))
    pc.add_request("a", toks)
    eng.run([("a", 12)])
    pc.add_request("b", toks + [5])                   # hits all 3 blocks
    assert pc.num_computed("b") == 12
    pc.truncate("b", 10)
    pc.append_tokens("b", [70, 71, 72])
    plan = eng.run([("b", 3)])
    assert plan.copy_src.tolist() == [pc.blocks("a")[2]]
    assert pc.match(toks + [0])[1] == 12              # a's cached block is untouched
    eng.check(pc.plan([("a", 0)]))


def test_free_returns_blocks_and_cached_blocks_are_hit_later():
    pc = make(num_blocks=16, block_size=4)
    eng = SimEngine(pc)
    pc.add_request("a", list(range(30)))
    eng.run([("a", 30)])
    pc.free("a")
    assert pc.pool.num_free == 15 and "a" not in pc
    assert pc.add_request("b", list(range(30))) == 28
    eng.run([("b", 2)])


def test_eviction_under_pressure_keeps_kv_right():
    pc = make(num_blocks=12, block_size=4)
    eng = SimEngine(pc)
    rng = np.random.default_rng(0)
    prefixes = [rng.integers(0, 50, 12).tolist() for _ in range(3)]
    for i in range(40):
        toks = prefixes[i % 3] + rng.integers(0, 50, int(rng.integers(1, 20))).tolist()
        cached = pc.add_request(i, toks)
        eng.run([(i, len(toks) - cached)])
        pc.free(i)
        pc.pool.check_consistency()


def test_onboard_registers_and_counts_computed():
    pc = make(block_size=4)
    eng = SimEngine(pc)
    toks = list(range(18))
    pc.add_request("a", toks)
    new = pc.onboard("a", 3)
    assert pc.num_computed("a") == 12 and pc.blocks("a") == new
    assert pc.pool.lookup(pc.request_hashes("a", 3)) == new
    # fill them as a tier would (scatter), then continue
    for i, b in enumerate(new):
        eng.k[b, :, 0, 0] = kv_values(toks)[4 * i:4 * i + 4]
    eng.run([("a", 6)])
    with pytest.raises(ValueError, match="request_id: onboard needs a request whose computed"):
        pc.onboard("a", 1)
    pc.add_request("b", list(range(500, 509)))
    with pytest.raises(ValueError, match="num_blocks: expected 0 <= num_blocks <= 2"):
        pc.onboard("b", 3)


def test_reset_prefix_cache_then_reregister():
    pc = make(block_size=4)
    eng = SimEngine(pc)
    pc.add_request("a", list(range(9)))
    eng.run([("a", 9)])
    pc.reset_prefix_cache()
    assert pc.match(list(range(9)))[1] == 0
    pc.append_tokens("a", [1, 2, 3])
    eng.run([("a", 3)])
    assert pc.match(pc.tokens("a") + [0])[1] == 12  # re-registered on the next commit


def test_step_all_or_nothing_when_short():
    pc = make(num_blocks=6, block_size=4)   # 5 usable blocks
    pc.add_request("a", list(range(12)))
    pc.add_request("b", list(range(100, 112)))
    before = pc.pool.free_queue()
    with pytest.raises(NoFreeBlocksError, match="batch: needs 6 blocks, 5 free"):
        pc.step([("a", 12), ("b", 12)])
    assert pc.pool.free_queue() == before and pc.blocks("a") == []
    with pytest.raises(NoFreeBlocksError, match="num_new_tokens: 24 tokens need 6 blocks"):
        pc.append_tokens("a", list(range(12))) or pc.allocate("a", 24)


def test_disabled_caching():
    pc = make(enable_caching=False)
    pc.add_request("a", list(range(9)))
    pc.step([("a", 9)])
    assert pc.pool.cached_hashes() == {} and pc.match(list(range(9))) == ([], 0)


def test_shared_prefix_groups_in_plan():
    pc = make(block_size=4)
    eng = SimEngine(pc)
    system = list(range(16))
    pc.add_request("w", system + [99])
    eng.run([("w", 17)])
    for i in range(3):
        assert pc.add_request(i, system + [i, i + 1]) == 16
    plan = eng.run([(0, 2), (1, 2), (2, 2)])
    s = plan.shared
    assert s is not None and s.prefix_lens.tolist() == [16] and s.prefix_ids.tolist() == [0] * 3
    assert s.prefix_block_tables[0].tolist() == pc.blocks("w")[:4]
    assert s.kv_lens.tolist() == [2, 2, 2] and s.saved_block_reads == 8


def test_default_hash_is_prefixkv_v1():
    pc = PrefixCache(32, 4)
    toks = list(range(13))
    pc.add_request("a", toks, salt="t")
    pc.step([("a", 13)])
    want = list(hash_blocks(np.asarray(toks, np.int32), 4, salt="t"))
    assert pc.request_hashes("a") == want
    assert pc.pool.lookup(want, b"t") == pc.blocks("a")[:3]


@pytest.mark.parametrize("call, match", [
    (lambda pc: pc.add_request("a", [1]), r"request_id: 'a' is already running"),
    (lambda pc: pc.allocate("zz", 1), r"request_id: no request 'zz'"),
    (lambda pc: pc.allocate("a", 6), r"num_new_tokens: expected 0 <= num_new_tokens <= 5"),
    (lambda pc: pc.allocate("a", -1), r"num_new_tokens: expected 0 <= num_new_tokens <= 5"),
    (lambda pc: pc.commit("a", 1), r"num_new_tokens: expected 0 <= num_new_tokens <= 0"),
    (lambda pc: pc.add_request("b", [1, -2]), r"tokens: expected token ids in \[0, 2\*\*31\)"),
    (lambda pc: pc.add_request("b", [1, 2.0]), r"tokens\[1\]: expected an int token id"),
    (lambda pc: pc.add_request("b", np.zeros((2, 2), np.int32)),
     r"tokens: expected a 1-D integer array"),
    (lambda pc: pc.add_request("b", [1], salt=5), r"salt: expected str, bytes or None"),
    (lambda pc: pc.step([("a", 1), ("a", 1)]), r"batch: expected each request_id at most once"),
    (lambda pc: pc.truncate("a", 9), r"num_tokens: expected 0 <= num_tokens <= 5"),
    (lambda pc: pc.fork("a", "a"), r"child_id: 'a' is already running"),
    (lambda pc: pc.free("zz"), r"request_id: no request 'zz'"),
    (lambda pc: pc.request_hashes("a", 2), r"num_blocks: expected 0 <= num_blocks <= 1"),
    (lambda pc: pc.request_hashes("a", -1), r"num_blocks: expected 0 <= num_blocks <= 1"),
    (lambda pc: pc.request_hashes("a", 1.0), r"num_blocks: expected an int, got 1.0"),
    (lambda pc: pc.allocate("a", True), r"num_new_tokens: expected an int, got True"),
    (lambda pc: pc.step([("a", 1.0)]), r"num_new_tokens: expected an int, got 1.0"),
    (lambda pc: pc.step({"a": 1}), r"batch: expected \(request_id, num_new_tokens\) pairs, got "
     r"a dict; pass list\(batch.items\(\)\)"),
    (lambda pc: pc.step(("a", 1)), r"batch\[0\]: expected a \(request_id, num_new_tokens\) "
     r"pair, got 'a'"),
    (lambda pc: pc.batch_blocks_needed([("a", 1), 3]),
     r"batch\[1\]: expected a \(request_id, num_new_tokens\) pair, got 3"),
    (lambda pc: pc.plan([["a", 1, 2]]),
     r"batch\[0\]: expected a \(request_id, num_new_tokens\) pair, got \['a', 1, 2\]"),
    (lambda pc: pc.add_request("b", None),
     r"tokens: expected a sequence of int token ids or a 1-D integer array, got NoneType"),
    (lambda pc: pc.append_tokens("a", 5),
     r"token_ids: expected a sequence of int token ids or a 1-D integer array, got int"),
    (lambda pc: pc.add_request("b", [1], salt="\udc80"),
     r"salt: expected a str UTF-8 can encode \(surrogates not allowed at index 0\); pass bytes"),
    (lambda pc: (pc.allocate("a", 4), pc.commit("a", 2.5)),
     r"num_new_tokens: expected an int, got 2.5"),
    (lambda pc: pc.truncate("a", 2.5), r"num_tokens: expected an int, got 2.5"),
    (lambda pc: pc.onboard("a", 1.0), r"num_blocks: expected an int, got 1.0"),
], ids=["dup-request", "unknown", "too-many", "negative", "commit-unallocated",
        "negative-token", "float-token", "2d-tokens", "salt-type", "dup-in-batch", "truncate",
        "fork-dup", "free-unknown", "hashes-too-many", "hashes-negative", "hashes-float",
        "allocate-bool", "step-float", "step-dict", "step-pair-not-list", "needed-not-pair",
        "plan-triple", "tokens-none", "append-int", "salt-surrogate", "commit-float",
        "truncate-float", "onboard-float"])
def test_input_checks(call, match):
    pc = make()
    pc.add_request("a", [1, 2, 3, 4, 5])
    with pytest.raises((ValueError, TypeError, KeyError), match=match):
        call(pc)


def test_constructor_needs_sizes_or_pool():
    with pytest.raises(ValueError, match="num_blocks/block_size: expected both, or pool="):
        PrefixCache(16)
    pool = BlockPool(16, 8)
    assert PrefixCache(pool=pool).block_size == 8


def test_constructor_takes_numpy_sizes_and_checks_group_options():
    """Sizes from memory arithmetic arrive as np.int64; the planner options are checked when
    given, not at the first step."""
    pc = PrefixCache(np.int64(16), np.int64(4), min_group_size=np.int64(3))
    assert (pc.pool.num_blocks, pc.block_size, pc.min_group_size) == (16, 4, 3)
    with pytest.raises(TypeError, match="min_group_size: expected an int, got 'x'"):
        PrefixCache(16, 4, min_group_size="x")
    # the planner's bounds: 0 and 1 had been taken here, then every step refused them
    for kw, match in ((dict(min_prefix_blocks=-1), "min_prefix_blocks: expected an int >= 1"),
                      (dict(min_prefix_blocks=0), "min_prefix_blocks: expected an int >= 1"),
                      (dict(min_group_size=1), "min_group_size: expected an int >= 2"),
                      (dict(min_group_size=0), "min_group_size: expected an int >= 2")):
        with pytest.raises(ValueError, match=match):
            PrefixCache(16, 4, **kw)


def test_onboard_never_takes_the_last_token():
    """A block-aligned prompt (8 tokens, blocks of 4): onboard takes at most 1 block, so the
    last token is still computed and gives logits."""
    pc = make(block_size=4)
    pc.add_request("r", list(range(8)))
    with pytest.raises(ValueError, match="num_blocks"):
        pc.onboard("r", 2)
    assert pc.num_computed("r") == 0
    pc.onboard("r", 1)
    assert pc.num_computed("r") == 4


def _algo(algo, **drop):
    """A compatibility mode as a hash_fn (salt and parent passed on unless dropped)."""
    def fn(tokens, block_size, *, salt=None, parent=None):
        kw = {"salt": salt, "parent": parent}
        for k in drop:
            kw.pop(k)
        return list(hash_blocks(np.asarray(tokens, np.int32), block_size, algo=algo, **kw))
    return fn


def test_hash_fn_must_be_a_prefix_chain():
    """A hash that names a block on its own (Dynamo's local block hash, dynamo-xxh3) would
    serve KV computed after another prefix: A+B then C+D cached, C+B hit 2 blocks where only
    C is right. PrefixCache refuses such a hash_fn, and one that ignores parent= (it hashes
    incrementally), naming hash_fn; chained modes are taken."""
    pytest.importorskip("xxhash")
    with pytest.raises(ValueError, match="hash_fn: not a prefix chain"):
        PrefixCache(16, 4, hash_fn=_algo("dynamo-xxh3", salt=None, parent=None))
    with pytest.raises(ValueError, match="hash_fn: hashing a block with parent="):
        PrefixCache(16, 4, hash_fn=_algo("prefixkv-v1", parent=None))
    with pytest.raises(ValueError, match="hash_fn: calling it as"):
        PrefixCache(16, 4, hash_fn=lambda tokens, block_size: [])
    for fn in (_algo("prefixkv-v1"), _algo("vllm-sha256-cbor"), sglang_hash):
        pc = PrefixCache(16, 4, hash_fn=fn)
        a, b, c, d = ([k] * 4 for k in (1, 2, 3, 4))
        for rid, toks in (("ab", a + b + [9]), ("cd", c + d + [9])):
            pc.add_request(rid, toks)
            pc.step([(rid, 9)])
            pc.free(rid)
        assert pc.add_request("cb", c + b + [9]) == 4  # C only


def _kvbm(tokens, block_size, *, salt=None, parent=None):
    return list(hash_blocks(np.asarray(tokens, np.int32), block_size, algo="dynamo-kvbm",
                            salt=salt, parent=None if parent is None
                            else int.from_bytes(parent, "little")))


def test_an_ambiguous_chain_is_refused():
    """dynamo-kvbm at block_size 4 hashes a block's (parent, own) digests, 16 bytes, as it
    hashes a first block's 4 tokens: a one-block prompt whose token ids are those words (a
    search finds ids < 2**31) had the hash of another prompt's second block, and the cache
    served the crafted prompt's KV as that block. Refused at block_size 4, taken at others."""
    pytest.importorskip("xxhash")
    with pytest.raises(ValueError, match="^hash_fn: ambiguous at block_size=4"):
        PrefixCache(16, 4, hash_fn=_kvbm)
    for bs in (2, 8, 16):
        pc = PrefixCache(16, bs, hash_fn=_kvbm)
        a, b = list(range(1, bs + 1)), list(range(100, 100 + bs))
        pc.add_request("ab", a + b + [9])
        pc.step([("ab", 2 * bs + 1)])
        pc.free("ab")
        assert pc.add_request("ab2", a + b + [7]) == 2 * bs


def test_a_hash_fn_raising_in_step_changes_nothing():
    """hash_fn failing while step hashes the blocks it fills: step raises, the request is
    where it was (it used to count the tokens computed with no plan returned, so the next
    step read KV nobody wrote), and a retry succeeds."""
    fail = [False]

    def flaky(tokens, block_size, *, salt=None, parent=None):
        if fail[0]:
            raise RuntimeError("hash service down")
        return list(hash_blocks(np.asarray(tokens, np.int32), block_size, salt=salt,
                                parent=parent))

    pc = PrefixCache(16, 4, hash_fn=flaky)
    pc.add_request("a", list(range(10)))  # hashes the prompt's full blocks
    pc.step([("a", 10)])
    pc.append_tokens("a", [7, 8])  # decode tokens that fill block 2: hashed by the step
    blocks, free = pc.blocks("a"), pc.pool.num_free
    fail[0] = True
    with pytest.raises(RuntimeError, match="hash service down"):
        pc.step([("a", 2)])
    assert pc.num_computed("a") == 10 and pc.blocks("a") == blocks
    assert pc.pool.num_free == free
    fail[0] = False
    plan = pc.step([("a", 2)])
    assert plan.num_tokens == 2 and pc.num_computed("a") == 12
    assert pc.match(list(range(10)) + [7, 8, 0])[1] == 12
    pc.pool.check_consistency()


class _CountingList(list):
    """A request's block list that counts the entries copied out of it (iteration, slices)."""

    copied = 0

    def __iter__(self):
        _CountingList.copied += len(self)
        return super().__iter__()

    def __getitem__(self, i):
        out = super().__getitem__(i)
        if isinstance(i, slice):
            _CountingList.copied += len(out)
        return out


class _CountingArray(np.ndarray):
    """A request's token array that counts its conversions to a list."""

    tolists = 0

    def tolist(self):
        _CountingArray.tolists += 1
        return super().tolist()


def test_decode_step_copies_no_whole_block_list():
    """A 1-token decode step of a 64-block request copies O(1) of its block list (the undo
    snapshot was every request's whole list, every step), and a failed step still restores
    the blocks it changed."""
    pc = make(num_blocks=300, block_size=4)
    pc.add_request("a", list(range(255)))
    pc.step([("a", 255)])                   # 64 blocks, the last one holds 3 tokens
    req = pc._requests["a"]
    req.blocks = _CountingList(req.blocks)  # its int32 row stays cached: no block changes
    for tok in (1, 2, 3):                   # fills block 64, then 2 tokens into a new one
        pc.append_tokens("a", [tok])
        _CountingList.copied = 0
        pc.step([("a", 1)])
        assert _CountingList.copied <= 2
    assert len(pc.blocks("a")) == 65 and pc.num_computed("a") == 258
    blocks, free = pc.blocks("a"), pc.pool.num_free
    pc.fork("a", "b")                       # a shares block 65: the next write copies it
    pc.append_tokens("a", [4, 5, 6])        # 2 more into block 65, 1 into a new block 66

    def fail(*a, **k):
        raise RuntimeError("planning failed")

    pc.hash_fn, good = fail, pc.hash_fn
    with pytest.raises(RuntimeError, match="planning failed"):
        pc.step([("a", 3)])
    pc.hash_fn = good
    assert pc.blocks("a") == blocks and pc.num_computed("a") == 258
    assert pc.pool.num_free == free - 0 and pc.blocks("b") == blocks
    pc.pool.check_consistency()
    plan = pc.step([("a", 3)])              # the retry plans the copy again
    assert plan.copy_src.tolist() == [blocks[-1]] and len(pc.blocks("a")) == 66
    pc.free("a")
    pc.free("b")
    pc.pool.check_consistency()


def test_fork_and_truncate_do_no_whole_request_work():
    """fork converts the prompt to a list once (it did twice, one thrown away) and truncate
    freeing one block does not scan the request's blocks (it built set(blocks) to filter the
    pending copies, almost always none)."""
    pc = make(num_blocks=300, block_size=4)
    pc.add_request("a", list(range(200)))
    pc.step([("a", 200)])
    req = pc._requests["a"]
    req.array = req.array.view(_CountingArray)
    _CountingArray.tolists = 0
    pc.fork("a", "b")
    assert _CountingArray.tolists == 0 and pc.tokens("b") == pc.tokens("a")
    pc.append_tokens("a", [1, 2, 3, 4, 5])
    pc.step([("a", 5)])                     # 2 new blocks
    req.blocks = _CountingList(req.blocks)
    _CountingList.copied = 0
    pc.truncate("a", 202)                   # frees the last block
    assert _CountingList.copied <= 1 and len(pc.blocks("a")) == 51
    pc.free("a")
    pc.free("b")
    pc.pool.check_consistency()


def test_append_tokens_of_python_ints_builds_no_array(monkeypatch):
    """A sampled token (a short list of Python ints) is checked in Python, with no numpy array
    built (14 us a call); other input goes through the array checks with the same errors."""
    from prefixkv.paged import prefix_cache as pcm

    calls = []
    real = pcm._token_array
    monkeypatch.setattr(pcm, "_token_array", lambda *a, **k: calls.append(1) or real(*a, **k))
    pc = make()
    pc.add_request("a", [1, 2, 3])
    del calls[:]
    pc.append_tokens("a", [7])
    pc.append_tokens("a", (8, 2**31 - 1))
    assert calls == [] and pc.tokens("a") == [1, 2, 3, 7, 8, 2**31 - 1]
    pc.append_tokens("a", [np.int64(9)])
    pc.append_tokens("a", np.array([10], np.int64))
    assert len(calls) == 2 and pc.tokens("a")[-2:] == [9, 10]
    assert all(type(t) is int for t in pc.tokens("a"))


@pytest.mark.parametrize("tokens, exc, match", [
    ([True], TypeError, r"token_ids\[0\]: expected an int token id, got True"),
    ([1, 2.0], TypeError, r"token_ids\[1\]: expected an int token id, got 2.0"),
    ([-1], ValueError, r"token_ids: expected token ids in \[0, 2\*\*31\), got min -1 max -1"),
    ([5, 2**31], ValueError, r"token_ids: expected token ids in \[0, 2\*\*31\), got min 5 "
                             r"max 2147483648"),
    (np.zeros((1, 1), np.int32), ValueError, r"token_ids: expected a 1-D integer array"),
], ids=["bool", "float", "negative", "too-large", "2d"])
def test_append_tokens_checks(tokens, exc, match):
    pc = make()
    pc.add_request("a", [1, 2, 3])
    with pytest.raises(exc, match=match):
        pc.append_tokens("a", tokens)
    assert pc.tokens("a") == [1, 2, 3]


def test_block_row_follows_every_change_and_never_rewrites_a_view():
    """The int32 row plans read is extended in place as blocks are appended (not rebuilt):
    it always equals the blocks, and no row handed out earlier changes afterwards (through
    appends, copy-on-write, truncate and a failed step's undo)."""
    pc = make(num_blocks=400, block_size=4)
    pc.add_request("a", list(range(7)))
    pc.step([("a", 7)])
    req = pc._requests["a"]
    seen = []

    def check():
        r = req.row()
        assert r.dtype == np.int32 and r.tolist() == pc.blocks("a")
        seen.append((r, r.tolist()))
        assert all(v.tolist() == want for v, want in seen)

    for i in range(150):                    # ~37 appended blocks: the spare room regrows
        pc.append_tokens("a", [i])
        pc.step([("a", 1)])
        check()
        if i % 50 == 25:                    # copy-on-write of the partial block, then truncate
            pc.fork("a", f"c{i}")
            pc.append_tokens("a", [1, 2])
            pc.step([("a", 2)])
            check()
            pc.truncate("a", pc.num_computed("a") - 6)
            check()
    pc.append_tokens("a", list(range(9)))
    pc.hash_fn, good = None, pc.hash_fn     # not callable: the step fails and is undone
    with pytest.raises(TypeError):
        pc.step([("a", 9)])
    pc.hash_fn = good
    check()
    pc.step([("a", 9)])
    check()


def test_decode_step_hashes_the_filled_blocks_in_one_call_per_salt(monkeypatch):
    """Requests of one salt filling a block in the same step are hashed in one hash_blocks
    call (a ragged batch, each continuing its own chain), not one call each (~0.1 ms per
    call); a salt's one request in one unchecked call of the chain; the hashes are each
    request's own chain. Salts group by their bytes: str and bytes of the same text are one
    namespace, and bytearray / memoryview salts (no dict keys) too."""
    from prefixkv.paged import hashing
    from prefixkv.paged import prefix_cache as pcm

    pc = make(num_blocks=200, block_size=4)
    salts = {"a": None, "b": None, "c": "x", "d": "x", "e": "x", "f": b"x", "g": "y"}
    salts["h"] = "x"                        # a first block: its chain starts here
    salts["i"], salts["j"] = bytearray(b"z"), memoryview(bytearray(b"z"))
    for i, (rid, salt) in enumerate(salts.items()):
        pc.add_request(rid, list(range(10 * i, 10 * i + (3 if rid == "h" else 7))), salt=salt)
    pc.step([(rid, len(pc.tokens(rid))) for rid in salts])
    calls = []
    real = hashing.hash_blocks
    monkeypatch.setattr(hashing, "hash_blocks",
                        lambda *a, **k: calls.append(k.get("salt")) or real(*a, **k))
    one = pcm.v1_hashes_trusted
    monkeypatch.setattr(pcm, "v1_hashes_trusted",
                        lambda toks, bs, salt, parent: calls.append(salt) or one(toks, bs, salt,
                                                                                  parent))
    for rid in salts:
        pc.append_tokens(rid, [ord(rid)])   # fills each request's block 1 (h's block 0)
    pc.step([(rid, 1) for rid in salts])
    assert sorted(map(repr, calls)) == sorted(map(repr, [b"", b"x", b"y", b"z"]))
    for rid, salt in salts.items():
        toks = np.asarray(pc.tokens(rid), np.int32)
        assert pc.request_hashes(rid) == list(real(toks, 4, salt=salt))
        assert pc.pool.lookup(pc.request_hashes(rid), pc.namespace(rid)) == pc.blocks(rid)
    pc.pool.check_consistency()


def test_a_callers_int32_prompt_array_is_copied_not_hashed_later():
    """A prompt of exactly block_size tokens is hashed at commit: from a copy, not from the
    caller's array, which the caller may have refilled by then (its block was registered
    under the new contents' hash and served to another prompt)."""
    pc = PrefixCache(num_blocks=16, block_size=4)
    buf = np.arange(10, 14, dtype=np.int32)
    pc.add_request("r", buf)
    buf[:] = [20, 21, 22, 23]  # the caller reuses its buffer
    pc.step([("r", 4)])
    assert set(pc.pool.cached_hashes()[b""]) == {pc.block_hashes([10, 11, 12, 13])[0]}
    assert pc.match([20, 21, 22, 23, 5])[1] == 0
    assert pc.match([10, 11, 12, 13, 5])[1] == 4


@pytest.mark.parametrize("bad", [2**63, 2**70, -2**70])
def test_token_ids_past_64_bits_are_named(bad):
    """The error names the bad id and its index (it had named max(tokens): for [-2**70, 5],
    "got 5", a valid id)."""
    pc = PrefixCache(num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match=rf"^tokens\[1\]: expected a token id in \[0, 2\*\*31\), "
                                         rf"got {bad}$"):
        pc.add_request("r", [5, bad, 1])
    pc.add_request("r", [1, 2])
    with pytest.raises(ValueError, match=rf"^token_ids\[0\]: expected a token id in "
                                         rf"\[0, 2\*\*31\), got {bad}$"):
        pc.append_tokens("r", [bad])


def test_onboard_of_no_blocks_is_a_no_op():
    pc = PrefixCache(num_blocks=8, block_size=4)
    pc.add_request("r", list(range(8)))
    pc.step([("r", 8)])  # every token computed
    assert pc.onboard("r", 0) == [] and pc.num_computed("r") == 8

