"""Documented contracts of the block pool, prefix cache, router, validation and hashing that the
other tests leave unchecked: namespace isolation (fixed cases, unsalted vs salted), copies
returned, all-or-nothing allocation with copy-on-write, pending copies dropped by truncate,
onboard / step / commit preconditions, hash-chain and hash-algo argument checks, swap_blocks
destination bounds, the value-check switch, split caps and block-id checks (bools refused)."""

import numpy as np
import pytest
from prefixkv.paged import validate
from prefixkv.paged.hashing import check_prefix_chain, hash_blocks
from prefixkv.paged.planner import MAX_KV_SPLITS, kv_splits, plan_batch, prefix_kv_splits
from prefixkv.paged.pool import BlockPool, NoFreeBlocksError
from prefixkv.paged.prefix_cache import PrefixCache
from prefixkv.paged.router import Router

BS = 4


def h(i: int) -> bytes:
    return i.to_bytes(32, "little")


def saltless_hash(tokens, block_size, *, salt=None, parent=None):
    """SGLang's page chain: no salt at all, so only the namespaced index keeps salts apart."""
    return list(hash_blocks(np.asarray(tokens, np.int32), block_size, parent=parent,
                            algo="sglang-sha256"))


def served(pc, rid, tokens, salt=None):
    """Run ``tokens`` through ``pc`` under ``salt`` (registering its full blocks), then free."""
    cached = pc.add_request(rid, tokens, salt=salt)
    pc.step([(rid, len(tokens) - cached)])
    pc.free(rid)


# ---------------------------------------------------------------- pool


def test_check_blocks_refuses_bools():
    """True is an int subclass, not a block id: refused like any non-int id (it was taken as
    block 1)."""
    pool = BlockPool(4, BS)
    with pytest.raises(TypeError, match=r"blocks\[0\]: expected an int block id, got True"):
        pool.check_blocks([True])
    with pytest.raises(TypeError, match=r"ids\[1\]: expected an int block id, got False"):
        pool.check_blocks([2, False], "ids")
    with pytest.raises(TypeError, match=r"blocks\[0\]: expected an int block id, got "):
        pool.check_blocks([np.True_])
    assert pool.check_blocks([np.int64(3), 1]) == [3, 1]  # numpy ints still taken


def test_get_is_per_namespace():
    pool = BlockPool(8, BS)
    (b,) = pool.allocate(1)
    pool.register([b], [h(1)], b"x")
    assert pool.get(h(1), b"x") == b
    assert pool.get(h(1)) is None and pool.get(h(1), b"y") is None


def test_cached_hashes_is_a_copy():
    pool = BlockPool(8, BS)
    a, b = pool.allocate(2)
    pool.register([a], [h(1)], b"x")
    pool.register([b], [h(2)])
    got = pool.cached_hashes()
    assert got == {b"x": {h(1): a}, b"": {h(2): b}}
    got[b"x"].clear()
    got[b""][h(3)] = 7
    del got[b""]
    assert pool.cached_hashes() == {b"x": {h(1): a}, b"": {h(2): b}}
    assert pool.lookup([h(1)], b"x") == [a] and pool.get(h(3)) is None
    pool.check_consistency()


def test_lookup_never_falls_back_to_the_unsalted_namespace():
    pool = BlockPool(8, BS)
    a, b = pool.allocate(2)
    pool.register([a, b], [h(1), h(2)])  # unsalted: namespace b""
    assert pool.lookup([h(1), h(2)]) == [a, b]
    assert pool.lookup([h(1), h(2)], b"x") == []


def test_usage_counts_usable_blocks():
    """5 blocks = the null block + 4 usable; 2 taken is half of them."""
    pool = BlockPool(5, BS)
    pool.allocate(2)
    assert pool.usage == 0.5


# ---------------------------------------------------------------- prefix cache


def test_unsalted_blocks_never_hit_a_salted_request():
    """A hash that ignores salts gives the same hashes under None and "x": only the namespace
    keeps them apart, for match, add_request and the pool's lookup alike."""
    pc = PrefixCache(32, BS, hash_fn=saltless_hash)
    toks = list(range(9))
    served(pc, "a", toks)  # 2 full blocks cached under salt=None
    assert pc.match(toks)[1] == 8
    hashes = pc.block_hashes(toks[:8], salt="x")
    assert hashes == pc.block_hashes(toks[:8])  # same hashes: the index must separate them
    assert pc.match(toks, salt="x") == ([], 0)
    assert pc.pool.lookup(hashes, b"x") == []
    assert pc.add_request("b", toks, salt="x") == 0
    assert pc.blocks("b") == [] and pc.num_computed("b") == 0


def test_onboard_refuses_a_request_with_blocks_past_its_computed_tokens():
    """allocate took 4 blocks for tokens not computed yet: onboarding now would register a
    never-written block under the first block's hash."""
    pc = PrefixCache(16, BS)
    pc.add_request("a", list(range(18)))
    pc.allocate("a", 16)
    blocks, free = pc.blocks("a"), pc.pool.num_free
    with pytest.raises(ValueError, match="request_id: onboard needs a request whose computed "
                                         "tokens end at a block boundary with no block "
                                         "allocated beyond them"):
        pc.onboard("a", 1)
    assert pc.blocks("a") == blocks and pc.num_computed("a") == 0
    assert pc.pool.num_free == free and pc.pool.num_cached == 0


def _forked(num_blocks):
    """"a" computed 10 tokens (blocks 1, 2, 3; block 3 partly filled), "b" its fork with 3 more
    tokens: writing them copies the shared block 3 and takes one new block."""
    pc = PrefixCache(num_blocks, BS)
    pc.add_request("a", list(range(10)))
    pc.step([("a", 10)])
    pc.fork("a", "b")
    pc.append_tokens("b", [21, 22, 23])
    return pc


def test_allocate_short_for_a_copy_changes_nothing():
    """1 block free, the write needs 2 (a copy of the shared block + a new one): refused up
    front, with no copy made, no ref count moved and no copy pending for the plan."""
    pc = _forked(5)  # 4 usable blocks, 3 taken
    pool = pc.pool
    assert pool.num_free == 1 and pc.blocks_needed("b", 3) == 2
    before = (pc.blocks("a"), pc.blocks("b"), list(pool.ref_counts), pool.num_free,
              pool.free_queue(), pool.cached_hashes())
    with pytest.raises(NoFreeBlocksError, match="num_new_tokens: 3 tokens need 2 blocks, 1 free"):
        pc.allocate("b", 3)
    assert (pc.blocks("a"), pc.blocks("b"), list(pool.ref_counts), pool.num_free,
            pool.free_queue(), pool.cached_hashes()) == before
    assert pc.plan([("b", 0)]).copy_src.size == 0
    pool.check_consistency()


def test_truncate_drops_a_pending_copy_into_a_freed_block():
    """allocate copied the shared block 3 into a fresh block; truncating back to 8 tokens frees
    that block before the plan: the plan must not copy into it (it may be someone else's)."""
    pc = _forked(16)
    pairs = pc.allocate("b", 3)
    assert len(pairs) == 1 and pairs[0][0] == 3
    dst = pairs[0][1]
    assert pc.plan([("b", 3)]).copy_dst.tolist() == [dst]
    pc.truncate("b", 8)
    assert dst not in pc.blocks("b") and pc.pool.ref_counts[dst] == 0
    plan = pc.plan([("b", 0)])
    assert plan.copy_src.size == 0 and plan.copy_dst.size == 0
    pc.pool.check_consistency()


def test_step_refuses_tokens_past_the_known_ones():
    pc = PrefixCache(16, BS)
    pc.add_request("a", list(range(10)))
    free = pc.pool.num_free
    with pytest.raises(ValueError, match=r"num_new_tokens: expected 0 <= num_new_tokens <= 10 "
                                         r"\(known tokens not computed yet\), got 11"):
        pc.step([("a", 11)])
    assert pc.blocks("a") == [] and pc.num_computed("a") == 0 and pc.pool.num_free == free


def test_commit_with_a_failing_hash_counts_nothing():
    """commit hashes the filled block before counting it: a hash_fn that raises leaves the
    request where it was, and a retry with a working hash registers the block."""
    fail = [False]

    def flaky(tokens, block_size, *, salt=None, parent=None):
        if fail[0]:
            raise RuntimeError("hash service down")
        return list(hash_blocks(np.asarray(tokens, np.int32), block_size, salt=salt,
                                parent=parent))

    pc = PrefixCache(16, BS, hash_fn=flaky)
    toks = list(range(10))
    pc.add_request("a", toks)
    pc.step([("a", 10)])
    pc.append_tokens("a", [7, 8])  # fill block 2: the commit hashes it
    assert pc.allocate("a", 2) == []
    fail[0] = True
    with pytest.raises(RuntimeError, match="hash service down"):
        pc.commit("a", 2)
    assert pc.num_computed("a") == 10 and pc.pool.num_cached == 2
    fail[0] = False
    pc.commit("a", 2)
    assert pc.num_computed("a") == 12 and pc.pool.num_cached == 3
    assert pc.match(toks + [7, 8, 0])[1] == 12
    pc.pool.check_consistency()


# ---------------------------------------------------------------- router


def test_router_keeps_unsalted_blocks_from_salted_requests():
    pc = PrefixCache(32, BS, hash_fn=saltless_hash)
    router = Router(BS, hash_fn=saltless_hash)
    router.add_worker("w", pc.events)
    toks = list(range(9))
    served(pc, "a", toks)  # unsalted
    assert router.overlaps(toks) == {"w": 2}
    assert router.overlaps(toks, salt="x") == {"w": 0}
    assert router.pick(toks, salt="x").overlaps == {"w": 0}


# ---------------------------------------------------------------- hashing and validation


def test_prefix_chain_needs_exactly_one_hash_per_full_block():
    """A chained hash that also returns a hash for the (empty) tail past the full blocks."""
    def extra_tail(tokens, block_size, *, salt=None, parent=None):
        return saltless_hash(tokens, block_size, parent=parent) + [bytes(32)]

    with pytest.raises(ValueError, match="hash_fn: expected one hash per full block, got 3 "
                                         "for 2 blocks"):
        check_prefix_chain(extra_tail, BS)
    with pytest.raises(ValueError, match="hash_fn: expected one hash per full block"):
        PrefixCache(16, BS, hash_fn=extra_tail)
    check_prefix_chain(saltless_hash, BS)  # the same hash without the extra one is fine


def test_dynamo_xxh3_refuses_a_salt():
    """dynamo-xxh3 takes a u64 seed only: a salt would be ignored (no isolation)."""
    toks = np.arange(8, dtype=np.int32)
    with pytest.raises(ValueError, match="salt: dynamo-xxh3 has no salt, got 'x'"):
        hash_blocks(toks, BS, algo="dynamo-xxh3", salt="x")
    with pytest.raises(ValueError, match="salt: dynamo-xxh3 has no salt"):
        validate.check_hash_algo("dynamo-xxh3", num_seqs=1, salt=b"x")
    validate.check_hash_algo("dynamo-xxh3", num_seqs=1, seed=7)


def test_swap_blocks_checks_dst_ids_against_the_destination():
    """Device cache and host twin differ in block count: dst_ids are bounded by dst_caches."""
    small = [np.zeros((4, 3), np.float32)]
    big = [np.zeros((9, 3), np.float32)]
    ids = np.array([0, 1], np.int32)
    # to the bigger host twin: dst id 7 is in range there (not in the 4-block source)
    s, d = validate.check_swap_blocks_values(small, big, ids, np.array([7, 8], np.int32))
    assert s.tolist() == [0, 1] and d.tolist() == [7, 8]
    # to the smaller cache: dst id 5 is past it (though within the 9-block source)
    with pytest.raises(ValueError, match=r"dst_ids: expected values in \[0, 4\), got 5 at "
                                         r"index 1"):
        validate.check_swap_blocks_values(big, small, ids, np.array([0, 5], np.int32))


@pytest.mark.parametrize("value", ["off", " OFF ", "0", "false", "no"])
def test_value_checks_env_off(monkeypatch, value):
    monkeypatch.setenv(validate.ENV_VALUE_CHECKS, value)
    assert not validate.value_checks_enabled(host_inputs=True)


# ---------------------------------------------------------------- planner


def test_kv_splits_capped():
    """One program over a million keys on 132 SMs would want 264 (or 1056) splits."""
    assert kv_splits(1, 1 << 20, sms=132) == MAX_KV_SPLITS
    assert prefix_kv_splits(1, 1 << 22, sms=132) == MAX_KV_SPLITS


def test_plan_batch_refuses_negative_q_lens():
    with pytest.raises(ValueError, match=r"q_lens: expected values >= 0, got -1"):
        plan_batch([[1, 2]], [8], [-1], BS)
