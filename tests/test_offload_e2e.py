"""End to end: a request's KV written into a PrefixCache-managed cache, offloaded through
host -> disk -> Redis (and NIXL), dropped from the device, onboarded into a fresh pool from each
tier alone, and paged_attention over the onboarded cache equals the original bit for bit."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from prefixkv.paged.prefix_cache import PrefixCache
from prefixkv.paged.reference import (
    gather_blocks_reference,
    paged_attention_reference,
    scatter_blocks_reference,
    write_kv_reference,
)
from prefixkv.paged.tiers import (
    BlockKey,
    BlockOffloader,
    DiskTier,
    HostTier,
    Namespace,
    TieredStore,
)
from tier_helpers import redis_server_or_skip

BS, HKV, HQ, D = 4, 2, 4, 8
NUM_BLOCKS = 24


@pytest.fixture(scope="module")
def redis_server():
    srv = redis_server_or_skip()
    yield srv
    srv.stop()


def _kv(rng, n, dtype):
    return (rng.standard_normal((n, HKV, D)).astype(dtype),
            rng.standard_normal((n, HKV, D)).astype(dtype))


class Engine:
    """The smallest engine: one PrefixCache + functional K/V caches (reference ops)."""

    def __init__(self, dtype, num_blocks=NUM_BLOCKS):
        self.pc = PrefixCache(num_blocks, BS)
        self.k = np.full((num_blocks, BS, HKV, D), np.nan, dtype)
        self.v = np.full((num_blocks, BS, HKV, D), np.nan, dtype)

    @property
    def caches(self):
        return [self.k, self.v]

    def prefill(self, rid, tokens, keys, values, salt=None, offloader=None):
        """Add the request, onboard what the tiers hold, compute (write) the rest; returns the
        number of blocks onboarded."""
        pc = self.pc
        cached = pc.add_request(rid, tokens, salt=salt)
        n_onboard = 0
        if offloader is not None:
            caches, n_onboard = offloader.onboard_request(pc, rid, self.caches)
            self.k, self.v = caches
            assert pc.num_computed(rid) == cached + n_onboard * BS
        done = pc.num_computed(rid)
        plan = pc.step([(rid, len(tokens) - done)])
        self.k, self.v = write_kv_reference(keys[done:], values[done:], self.k, self.v,
                                            plan.slot_mapping)
        return n_onboard

    def decode_attention(self, rid, q):
        blocks = self.pc.blocks(rid)
        table = np.zeros((1, len(blocks)), np.int32)
        table[0] = blocks
        kv_len = np.array([self.pc.num_computed(rid)], np.int32)
        return paged_attention_reference(q, self.k, self.v, table, kv_len, None)


def _same(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_offload_through_every_tier_then_onboard_bit_exact(tmp_path, redis_server, dtype):
    from prefixkv.paged.spec import numpy_dtype
    from prefixkv.paged.tiers import RedisTier

    dt = numpy_dtype(dtype)
    rng = np.random.default_rng(0)
    tokens = list(range(100, 122))  # 22 tokens: 5 full blocks (the 6th holds the last token)
    keys, values = _kv(rng, len(tokens), dt)
    q = rng.standard_normal((1, HQ, D)).astype(dt)
    salt = "tenant-a"

    src = Engine(dt)
    src.prefill("r", tokens, keys, values, salt=salt)
    want = src.decode_attention("r", q)

    ns = Namespace("e2e-model", dtype=dtype)
    host = HostTier(1 << 20)
    disk_dir = tmp_path / "g3"
    redis = RedisTier(port=redis_server.port, prefix=f"e2e-{dtype}:")
    redis.clear()
    store = TieredStore([host, DiskTier(disk_dir), redis])
    off = BlockOffloader(store, ns, gather=gather_blocks_reference,
                         scatter=scatter_blocks_reference)
    full = len(tokens) // BS
    hashes = src.pc.request_hashes("r")[:full]
    blocks = np.asarray(src.pc.blocks("r")[:full], np.int32)
    rns = ns.with_salt(src.pc.namespace("r"))
    assert off.offload(src.caches, blocks, hashes, namespace=rns) == [True] * full
    src.pc.free("r")
    del src  # the device copy is gone

    # Onboard from each tier alone (a fresh engine each time); disk via a new DiskTier object
    # on the same directory, i.e. after a process restart.
    sources = {"host": host, "disk": DiskTier(disk_dir), "redis": redis}
    for name, tier in sources.items():
        dst = Engine(dt)
        dst.pc.add_request("warm", list(range(7)))  # shift block ids vs the source engine
        dst.pc.step([("warm", 7)])
        only = BlockOffloader(TieredStore([tier]), ns, scatter=scatter_blocks_reference)
        n = dst.prefill("r", tokens, keys, values, salt=salt, offloader=only)
        assert n == (len(tokens) - 1) // BS, name
        got = dst.decode_attention("r", q)
        assert _same(got, want), name
        # the onboarded blocks hold exactly the source K/V
        ids = np.asarray(dst.pc.blocks("r")[:n], np.int32)
        flat_k = gather_blocks_reference([dst.k], ids).reshape(-1, HKV, D)
        assert _same(flat_k, keys[:n * BS]), name

    # Another salt sees nothing, anywhere.
    other = Engine(dt)
    assert other.prefill("r", tokens, keys, values, salt="tenant-b", offloader=off) == 0
    assert _same(other.decode_attention("r", q), want)  # recomputed, same result
    redis.clear()
    redis.close()


@pytest.mark.parametrize("salt", [None, "tenant-a"])
def test_offload_on_pool_eviction_then_onboard(tmp_path, salt):
    """Blocks the device pool evicts are offloaded from the eviction event (KV still intact),
    under the evicted request's salt, then a fresh engine onboards them for that salt only
    and attention matches bit for bit."""
    dt = np.dtype("float32")
    rng = np.random.default_rng(1)
    tokens = list(range(1, 18))  # 4 full blocks
    keys, values = _kv(rng, len(tokens), dt)
    q = rng.standard_normal((1, HQ, D)).astype(dt)
    ns = Namespace("e2e-model", dtype="float32")

    eng = Engine(dt, num_blocks=8)  # block 0 null + 7 usable
    store = TieredStore([HostTier(1 << 20), DiskTier(tmp_path)])
    off = BlockOffloader(store, ns)
    unsubscribe = off.offload_on_evict(eng.pc.events, lambda: eng.caches)
    eng.prefill("r", tokens, keys, values, salt=salt)
    want = eng.decode_attention("r", q)
    hashes = eng.pc.request_hashes("r")[:4]
    eng.pc.free("r")
    mine = ns.with_salt(salt)  # the tenant's namespace
    assert off.lookup(hashes, namespace=mine) == 0  # not yet: still cached on device
    other = list(range(500, 527))  # needs 7 blocks: evicts every cached block of "r"
    ok, ov = _kv(rng, len(other), dt)
    eng.prefill("o", other, ok, ov)
    unsubscribe()
    assert off.lookup(hashes, namespace=mine) == 4
    if salt is not None:  # stored under the tenant's salt only
        assert off.lookup(hashes) == 0 and off.lookup(hashes, namespace=ns.with_salt("b")) == 0
        assert Engine(dt).prefill("r", tokens, keys, values, offloader=off) == 0
    assert eng.pc.match(tokens, salt=salt)[1] == 0  # gone from the device

    fresh = Engine(dt)
    assert fresh.prefill("r", tokens, keys, values, salt=salt, offloader=off) == 4
    assert _same(fresh.decode_attention("r", q), want)


@pytest.mark.parametrize("case", ["after a device hit", "block-aligned prompt"])
def test_onboard_request_loads_the_blocks_after_the_device_hit(case):
    """The device already holds the first 2 blocks: the tier's blocks 2 and 3 are loaded
    into the request's next blocks (not blocks 0 and 1 again), bit for bit. A prompt that is
    whole blocks, all of them held by a tier, loads all but its last block (never the last
    token), without an error."""
    dt = np.dtype("float32")
    rng = np.random.default_rng(3)
    n_tok = 17 if case == "after a device hit" else 16
    tokens = list(range(1, n_tok + 1))
    keys, values = _kv(rng, n_tok, dt)
    q = rng.standard_normal((1, HQ, D)).astype(dt)
    src = Engine(dt)
    src.prefill("r", tokens, keys, values)
    want = src.decode_attention("r", q)
    off = BlockOffloader(TieredStore([HostTier(1 << 20)]), Namespace("m", dtype="float32"))
    assert all(off.offload(src.caches, src.pc.blocks("r")[:4], src.pc.request_hashes("r")[:4]))
    eng = Engine(dt)
    if case == "after a device hit":
        eng.prefill("warm", tokens[:9], keys[:9], values[:9])  # device: blocks 0 and 1
        eng.pc.free("warm")
        assert eng.prefill("r", tokens, keys, values, offloader=off) == 2
    else:
        assert eng.prefill("r", tokens, keys, values, offloader=off) == 3
    assert _same(eng.decode_attention("r", q), want)


def test_offload_through_nixl_bit_exact():
    pytest.importorskip("nixl", reason="nixl not installed (pip install --no-deps nixl nixl-cu12)")
    from prefixkv.paged.tiers import NixlPeer, NixlTier

    dt = np.dtype("float16")
    rng = np.random.default_rng(2)
    tokens = list(range(40, 61))
    keys, values = _kv(rng, len(tokens), dt)
    q = rng.standard_normal((1, HQ, D)).astype(dt)
    ns = Namespace("e2e-model", dtype="float16")
    src = Engine(dt)
    src.prefill("r", tokens, keys, values)
    want = src.decode_attention("r", q)
    peer = NixlPeer(num_slots=8, slot_bytes=4096)
    tier = NixlTier(peer, staging_slots=4)
    try:
        off = BlockOffloader(tier, ns)
        full = len(tokens) // BS
        assert all(off.offload(src.caches, np.asarray(src.pc.blocks("r")[:full], np.int32),
                               src.pc.request_hashes("r")[:full]))
        dst = Engine(dt)
        assert dst.prefill("r", tokens, keys, values, offloader=off) == (len(tokens) - 1) // BS
        assert _same(dst.decode_attention("r", q), want)
    finally:
        tier.close()
        peer.close()


class _Vanishing(HostTier):
    """batch_exists says every block is there; batch_get loses all but the first two (a block
    evicted / corrupted / its server gone between the lookup and the read)."""

    def batch_exists(self, keys):
        return len(keys)

    def batch_get(self, keys, **kw):
        got = super().batch_get(keys, **kw)
        return got[:2] + [None] * (len(got) - 2)


def test_a_block_vanishing_midway_is_never_registered_without_its_kv(tmp_path):
    dt = np.dtype("float32")
    rng = np.random.default_rng(3)
    tokens = list(range(7, 30))  # 5 full blocks
    keys, values = _kv(rng, len(tokens), dt)
    q = rng.standard_normal((1, HQ, D)).astype(dt)
    src = Engine(dt)
    src.prefill("r", tokens, keys, values)
    want = src.decode_attention("r", q)
    store = _Vanishing(1 << 20)
    off = BlockOffloader(store, Namespace("e2e-model", dtype="float32"))
    full = len(tokens) // BS
    off.offload(src.caches, np.asarray(src.pc.blocks("r")[:full], np.int32),
                src.pc.request_hashes("r")[:full])
    dst = Engine(dt)
    assert dst.prefill("r", tokens, keys, values, offloader=off) == 2
    assert _same(dst.decode_attention("r", q), want)
    # every block the pool registered (2 onboarded + the recomputed rest) holds the right KV
    hit_blocks, hit_tokens = dst.pc.match(tokens)
    assert hit_tokens == ((len(tokens) - 1) // BS) * BS
    ids = np.asarray(hit_blocks, np.int32)
    flat = gather_blocks_reference([dst.k], ids).reshape(-1, HKV, D)
    assert _same(flat, keys[:hit_tokens])


def test_onboard_request_loads_what_the_pool_can_take():
    """Tiers hold 4 blocks, the pool has 2 free: the leading 2 are loaded (bit for bit) and
    the request computes the rest (it used to be a miss, n = 0); a pool with none free is a
    miss."""
    dt = np.dtype("float32")
    rng = np.random.default_rng(4)
    tokens = list(range(3, 20))  # 4 full blocks
    keys, values = _kv(rng, len(tokens), dt)
    src = Engine(dt)
    src.prefill("r", tokens, keys, values)
    off = BlockOffloader(HostTier(1 << 20), Namespace("e2e-model", dtype="float32"))
    full = len(tokens) // BS
    off.offload(src.caches, np.asarray(src.pc.blocks("r")[:full], np.int32),
                src.pc.request_hashes("r")[:full])
    small = Engine(dt, num_blocks=3)  # 2 usable blocks: 2 of the 4 onboard blocks fit
    small.pc.add_request("r", tokens)
    caches, n = off.onboard_request(small.pc, "r", small.caches)
    assert n == 2 and small.pc.num_computed("r") == 2 * BS
    got = gather_blocks_reference(caches, np.asarray(small.pc.blocks("r"), np.int32))
    want = gather_blocks_reference(src.caches, np.asarray(src.pc.blocks("r")[:2], np.int32))
    assert _same(got, want)
    small.pc.pool.check_consistency()
    full_pool = Engine(dt, num_blocks=3)
    full_pool.pc.add_request("x", list(range(500, 508)))
    full_pool.pc.step([("x", 8)])  # holds both blocks
    full_pool.pc.add_request("r", tokens)
    caches, n = off.onboard_request(full_pool.pc, "r", full_pool.caches)
    assert n == 0 and full_pool.pc.num_computed("r") == 0


# -- faults in the pool-facing glue ------------------------------------------------------------

def _bad_alloc(shape, dtype):
    raise MemoryError("pinned allocation failed")


def _bad_gather(caches, ids):
    raise RuntimeError("device gather failed")


@pytest.mark.parametrize("fault", ["host allocator", "chained host allocator", "gather",
                                   "caches callable"])
def test_a_failed_offload_on_eviction_is_a_miss_and_the_step_goes_on(fault):
    """The offload subscriber failing (pinned allocation, gather, the caches callable) must
    neither raise through the pool's allocation nor lose the blocks it was evicting."""
    dt = np.dtype("float32")
    rng = np.random.default_rng(5)
    ns = Namespace("e2e-model", dtype="float32")
    eng = Engine(dt, num_blocks=8)  # 7 usable blocks
    host = HostTier(1 << 20, allocator=_bad_alloc if "allocator" in fault else None)
    store = TieredStore([host]) if fault == "chained host allocator" else host
    off = BlockOffloader(store, ns, gather=_bad_gather if fault == "gather" else None)

    def caches():
        if fault == "caches callable":
            raise RuntimeError("caches are gone")
        return eng.caches

    off.offload_on_evict(eng.pc.events, caches)
    tokens = list(range(1, 18))  # 4 full blocks + 1 token: 5 blocks, 4 cached when freed
    keys, values = _kv(rng, len(tokens), dt)
    eng.prefill("r", tokens, keys, values)
    hashes = eng.pc.request_hashes("r")[:4]
    eng.pc.free("r")
    other = list(range(500, 527))  # 7 blocks: evicts every cached block of "r"
    ok, ov = _kv(rng, len(other), dt)
    # the offloader's own failures warn (once); the chain's guard counts a tier fault
    chained = fault == "chained host allocator"
    with (contextlib.nullcontext() if chained
          else pytest.warns(RuntimeWarning, match="offload failed")) as got:
        eng.prefill("o", other, ok, ov)  # raised (and corrupted the pool) before
    assert chained or len(got) == 1  # however many evictions failed: one warning
    eng.pc.pool.check_consistency()
    assert eng.pc.num_computed("o") == len(other) and len(eng.pc.blocks("o")) == 7
    flat = gather_blocks_reference([eng.k], np.asarray(eng.pc.blocks("o"), np.int32))
    assert _same(flat.reshape(-1, HKV, D)[:len(other)], ok)
    assert off.lookup(hashes) == 0  # nothing offloaded: a later miss, nothing wrong served
    if fault == "chained host allocator":  # the chain's guard counts the tier fault
        assert off.offload_errors == 0 and store.stats.errors >= 1
    else:
        assert off.offload_errors == 1 and off.last_error is not None


def _offloaded(tokens, keys, values, store):
    dt = keys.dtype
    src = Engine(dt)
    src.prefill("r", tokens, keys, values)
    off = BlockOffloader(store, Namespace("e2e-model", dtype=dt.name))
    full = len(tokens) // BS
    assert all(off.offload(src.caches, np.asarray(src.pc.blocks("r")[:full], np.int32),
                           src.pc.request_hashes("r")[:full]))
    return src, off


@pytest.mark.parametrize("fault", ["functional scatter", "in-place scatter midway",
                                   "stored subscriber"])
def test_a_failed_onboard_is_rolled_back_to_a_miss(fault):
    """A scatter (or a "stored" subscriber) failing after PrefixCache.onboard registered the
    new blocks: they are unregistered and freed, the request is back where it was, and no
    later request is served those blocks (they held NaN: the review's reproducer)."""
    from prefixkv.paged.events import EventLog

    dt = np.dtype("float32")
    rng = np.random.default_rng(6)
    tokens = list(range(7, 30))  # 5 full blocks + 3 tokens: onboard_request loads 5
    keys, values = _kv(rng, len(tokens), dt)
    q = rng.standard_normal((1, HQ, D)).astype(dt)
    src, off = _offloaded(tokens, keys, values, HostTier(1 << 20))
    want = src.decode_attention("r", q)

    dst = Engine(dt)
    log = EventLog()
    dst.pc.events.subscribe(log)
    if fault == "functional scatter":
        def scatter(caches, rows, ids):
            raise RuntimeError("device copy failed")
        off.scatter = scatter
    elif fault == "in-place scatter midway":
        def scatter(caches, rows, ids):
            for layer, c in enumerate(caches):
                c[ids[0]] = rows[0, layer]  # one block written, then the copy fails
            raise RuntimeError("device copy failed midway")
        off.scatter = scatter
    else:
        def on_stored(ev):
            if ev.kind == "stored":
                raise RuntimeError("subscriber failed")
        unsubscribe = dst.pc.events.subscribe(on_stored)

    dst.pc.add_request("r", tokens)
    with pytest.warns(RuntimeWarning, match="onboard failed"):
        caches, n = off.onboard_request(dst.pc, "r", dst.caches)
    assert n == 0 and caches[0] is dst.k  # the caches as they were given
    assert off.onboard_errors == 1 and isinstance(off.last_error, RuntimeError)
    # the request is back where it was; the pool holds nothing but it (no cache entry)
    assert dst.pc.num_computed("r") == 0 and dst.pc.blocks("r") == []
    assert dst.pc.tokens("r") == tokens
    assert dst.pc.request_hashes("r") == src.pc.request_hashes("r")
    assert dst.pc.pool.cached_hashes() == {} and log.replay() == {}
    assert dst.pc.pool.num_free == NUM_BLOCKS - 1
    dst.pc.pool.check_consistency()
    # a second request of the same prompt hits nothing (it hit the NaN blocks before)
    dst.pc.add_request("b", tokens)
    assert dst.pc.num_computed("b") == 0
    dst.pc.free("b")
    # the request goes on: computed on the device, attention as the source's, bit for bit
    if fault == "stored subscriber":
        unsubscribe()
    off.scatter = None
    done = dst.pc.num_computed("r")
    plan = dst.pc.step([("r", len(tokens) - done)])
    dst.k, dst.v = write_kv_reference(keys, values, dst.k, dst.v, plan.slot_mapping)
    assert _same(dst.decode_attention("r", q), want)
    # and the onboard works again once the fault is gone
    again = Engine(dt)
    assert again.prefill("r", tokens, keys, values, offloader=off) == 5
    assert _same(again.decode_attention("r", q), want)


def test_null_block_is_refused_when_declared():
    dt = np.dtype("float32")
    caches = [np.zeros((4, BS, HKV, D), dt)]
    ns = Namespace("e2e-model", dtype="float32")
    plain = BlockOffloader(HostTier(1 << 20), ns)  # caches without a null block: 0 is data
    assert plain.offload(caches, [0], [b"\x01" * 32]) == [True]
    off = BlockOffloader(plain.store, ns, null_block=0)
    with pytest.raises(ValueError, match="block_ids: block 0 is the null block"):
        off.offload(caches, [1, 0], [b"\x01" * 32, b"\x02" * 32])
    with pytest.raises(ValueError, match="block_ids: block 0 is the null block"):
        off.onboard(caches, np.array([0], np.int32), [b"\x01" * 32])
    assert not caches[0].any()
    with pytest.raises(ValueError, match="null_block"):
        BlockOffloader(plain.store, ns, null_block=-1)
    with pytest.raises(ValueError, match="null_block"):
        BlockOffloader(plain.store, ns, null_block=True)


def test_onboard_request_bad_request_state_still_raises():
    """Only a failure after blocks were registered degrades to a miss; a request whose
    computed tokens do not end at a block boundary is the caller's error, nothing changed."""
    dt = np.dtype("float32")
    rng = np.random.default_rng(7)
    tokens = list(range(7, 30))
    keys, values = _kv(rng, len(tokens), dt)
    _, off = _offloaded(tokens, keys, values, HostTier(1 << 20))
    dst = Engine(dt)
    dst.pc.add_request("s", tokens)
    dst.pc.step([("s", 3)])  # 3 of 4 tokens of the first block: not at a block boundary
    with pytest.raises(ValueError, match="block boundary"):
        off.onboard_request(dst.pc, "s", dst.caches)
    assert off.onboard_errors == 0 and dst.pc.num_computed("s") == 3
    assert len(dst.pc.blocks("s")) == 1 and dst.pc.tokens("s") == tokens
    dst.pc.pool.check_consistency()


# -- caches that are not numpy ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_torch_caches_offload_and_onboard_through_the_host_helpers(dtype):
    """torch caches (bfloat16 included, which numpy cannot take) through
    torch_frontend.gather_blocks_to_host / scatter_blocks_from_host: the blocks come back bit
    for bit, driven by the pool's evictions. Without them, the default copies raise a
    TypeError naming caches, and a gather returning something numpy cannot take names
    gather; on eviction such failures are a miss with one RuntimeWarning (they used to be
    silent: a torch bfloat16 engine never onboarded a block)."""
    torch = pytest.importorskip("torch")
    from prefixkv.paged.spec import numpy_dtype

    from prefixkv import torch_frontend as tf

    tdt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(7)
    src = [torch.randn(NUM_BLOCKS, BS, HKV, D, generator=g).to(tdt) for _ in range(2)]
    ns = Namespace("e2e-model", dtype=dtype)
    off = BlockOffloader(HostTier(1 << 20), ns, gather=tf.gather_blocks_to_host,
                         scatter=tf.scatter_blocks_from_host)
    ids, hashes = np.array([5, 2, 9], np.int32), [b"a" * 32, b"b" * 32, b"c" * 32]
    assert off.offload(src, ids, hashes) == [True] * 3
    rows = off.fetch(hashes, (2, BS, HKV, D), numpy_dtype(dtype))
    assert len(rows) == 3 and rows[0].dtype == numpy_dtype(dtype)
    dst = [torch.zeros_like(c) for c in src]
    _, n = off.onboard(dst, [1, 3, 4], hashes)
    assert n == 3
    for s_, d_ in zip(src, dst, strict=True):
        assert torch.equal(d_[[1, 3, 4]].view(torch.int16), s_[ids].view(torch.int16))
        assert not d_[[0, 2]].any()  # blocks not named untouched

    plain = BlockOffloader(HostTier(1 << 20), ns)  # the default numpy copies
    with pytest.raises(TypeError, match="caches: the default scatter writes numpy"):
        plain.scatter_rows(dst, [1], rows[:1])
    if dtype == "bfloat16":  # float32 / float16 CPU tensors convert to numpy for reading
        with pytest.raises(TypeError, match="caches: expected arrays numpy converts"):
            plain.offload(src, [1], [b"d" * 32])
    bad = BlockOffloader(HostTier(1 << 20), ns, gather=lambda caches, i: object())
    with pytest.raises(TypeError, match="gather: expected a host array of 1 rows"):
        bad.offload(src, [1], [b"e" * 32])

    # on eviction: each failure a miss, counted; one warning for all of them
    pc = PrefixCache(4, BS)  # 3 usable blocks
    bad.offload_on_evict(pc.events, src)
    with pytest.warns(RuntimeWarning, match="offload failed") as got:
        for r in range(3):  # 2 full blocks each, cached when freed, evicted by the next
            pc.add_request(r, list(range(100 * r, 100 * r + 2 * BS + 1)))
            pc.step([(r, 2 * BS + 1)])
            pc.free(r)
    assert bad.offload_errors == 2 and len(got) == 1


def test_offloading_a_block_the_host_holds_copies_and_evicts_nothing(tmp_path):
    """A block onboarded from the host tier and evicted from the device again is offloaded
    again: the host tier already holds it, so nothing is copied, no other host block is
    evicted, and the slower tiers are not rewritten (the offload used to reserve room first,
    evicting an unrelated block)."""
    caches = [np.arange(4 * 16, dtype=np.float32).reshape(4, 4, 1, 4) + 100 * i
              for i in range(2)]
    row = caches[0][0].nbytes * 2
    host, disk = HostTier(2 * row), DiskTier(tmp_path)
    ns = Namespace("m")
    off = BlockOffloader(TieredStore([host, disk]), ns, null_block=0)
    h = [bytes([i]) * 32 for i in range(4)]
    assert off.offload(caches, [1], [h[1]]) == [True]
    assert off.offload(caches, [2], [h[2]]) == [True]
    written = disk.stats.bytes_written
    assert off.offload(caches, [2, 3], [h[2], h[3]]) == [True, True]  # 2 again, 3 new
    assert host.stats.evictions == 1  # block 3 evicted block 1 (LRU), not block 2
    assert [host.touch([BlockKey(x, ns)])[0] for x in h[1:]] == [False, True, True]
    assert disk.stats.bytes_written - written == disk.stats.bytes_written // 3  # only 3
