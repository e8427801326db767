"""Documented contracts of the remote tiers that the round-trip tests do not reach: NIXL's
per-transfer deadline, slot accounting and events; Redis' prefix-scoped clear() and its
marked-down fast path; Mooncake after close() and its anchored clear(); disk tier events.
Real servers on 127.0.0.1 (run under scripts/isolated.sh); a test whose service is missing
skips. Transport faults are injected by wrapping the tier's own NIXL agent / Redis client."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from prefixkv.paged.events import EventLog
from prefixkv.paged.tiers import DiskTier
from tier_helpers import ROW, redis_server_or_skip
from tier_helpers import keys as _keys
from tier_helpers import ns as _ns
from tier_helpers import rows as _rows
from tier_helpers import same as _same

ROOT = Path(__file__).resolve().parents[1]
NUM_SLOTS = 16
MOONCAKE_SKIP = ("mooncake not installed (pip install mooncake-transfer-engine-non-cuda; "
                 "apt libibverbs1)")


def _kinds(log):
    return [(e.kind, e.block_hashes) for e in log.events]


# -- NIXL ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nixl_peer():
    pytest.importorskip("nixl", reason="nixl not installed (pip install --no-deps nixl nixl-cu12)")
    from prefixkv.paged.tiers import NixlPeer

    peer = NixlPeer(num_slots=NUM_SLOTS, slot_bytes=4096)
    yield peer
    peer.close()


@pytest.fixture()
def nixl_tier(nixl_peer):
    from prefixkv.paged.tiers import NixlTier

    t = NixlTier(nixl_peer, staging_slots=4, timeout_s=0.3)
    real = t.agent
    yield t
    t.agent = real  # a test may have swapped in a faulty agent
    t.close()


class _FaultyAgent:
    """Stands in for a NixlTier's agent: every transfer stays "PROC" (stuck) until
    ``give_up_after`` seconds, then ends ``final`` (so that a tier ignoring its deadline makes a
    slow test fail, not a hung one); ``final="ERR"`` with ``give_up_after=0`` is a transfer
    that fails at once. Everything else goes to the real agent."""

    def __init__(self, real, *, final="DONE", give_up_after=3.0):
        self._real, self.final, self.give_up_after = real, final, give_up_after
        self.transfers = 0

    def make_prepped_xfer(self, *args, **kw):
        return ("fake-handle", time.monotonic())

    def transfer(self, handle):
        self.transfers += 1
        return self.check_xfer_state(handle)

    def check_xfer_state(self, handle):
        return "PROC" if time.monotonic() - handle[1] < self.give_up_after else self.final

    def release_xfer_handle(self, handle):
        pass

    def __getattr__(self, name):
        return getattr(self._real, name)


def test_nixl_stuck_transfer_is_a_miss_within_timeout(nixl_tier):
    ks, vals = _keys(2), _rows(2)
    assert nixl_tier.batch_put(ks, vals) == [True, True]
    fake = nixl_tier.agent = _FaultyAgent(nixl_tier.agent)  # DONE only after 3 s
    t0 = time.monotonic()
    assert nixl_tier.batch_get(ks) == [None, None]
    assert nixl_tier.batch_put(_keys(1, start=10), vals[:1]) == [False]
    elapsed = time.monotonic() - t0
    # two transfers, each given up at timeout_s=0.3 (waited out to the 3 s "DONE": >= 6 s,
    # whatever the machine's load; the bound leaves a loaded CI room)
    assert fake.transfers == 2 and elapsed < 5.0, elapsed
    assert nixl_tier.stats.errors == 2


def test_nixl_get_returns_read_only_blocks(nixl_tier):
    ks, vals = _keys(2), _rows(2)
    assert nixl_tier.batch_put(ks, vals) == [True, True]
    got = nixl_tier.batch_get(ks, shape=ROW, dtype="float32")
    assert all(_same(g, v) for g, v in zip(got, vals, strict=True))
    assert not any(g.flags.writeable for g in got)


def test_nixl_failed_write_stores_nothing_and_gives_its_slots_back(nixl_tier):
    log = EventLog()
    nixl_tier.events.subscribe(log)
    real = nixl_tier.agent
    nixl_tier.agent = _FaultyAgent(real, final="ERR", give_up_after=0.0)
    ks = _keys(NUM_SLOTS)
    assert nixl_tier.batch_put(ks, _rows(NUM_SLOTS)) == [False] * NUM_SLOTS
    assert log.events == []  # no "stored" for a WRITE that failed
    assert nixl_tier.batch_exists(ks) == 0
    nixl_tier.agent = real
    # every slot free again: a full peer's worth stores, nothing evicted
    vals = _rows(NUM_SLOTS, seed=1)
    assert nixl_tier.batch_put(ks, vals) == [True] * NUM_SLOTS
    assert nixl_tier.stats.evictions == 0
    assert all(_same(g, v) for g, v in zip(nixl_tier.batch_get(ks), vals, strict=True))


def test_nixl_remove_and_clear_give_slots_back(nixl_tier):
    ks, vals = _keys(NUM_SLOTS), _rows(NUM_SLOTS)
    assert nixl_tier.batch_put(ks, vals) == [True] * NUM_SLOTS
    assert nixl_tier.batch_remove(ks) == NUM_SLOTS
    ks2 = _keys(NUM_SLOTS, start=100)
    assert nixl_tier.batch_put(ks2, vals) == [True] * NUM_SLOTS  # into the removed slots
    assert nixl_tier.stats.evictions == 0
    nixl_tier.clear()
    ks3 = _keys(NUM_SLOTS, start=200)
    assert nixl_tier.batch_put(ks3, vals) == [True] * NUM_SLOTS  # into the cleared slots
    assert nixl_tier.stats.evictions == 0
    assert nixl_tier.batch_exists(ks3) == NUM_SLOTS and nixl_tier.batch_exists(ks2[:1]) == 0


def test_nixl_put_never_evicts_a_key_it_found_stored(nixl_tier):
    """A stored first, so it is the least recently used entry; the put of [A, C...] then
    needs more room than the other entries give: A (reported True) must survive it."""
    a = _keys(1, start=500)[0]
    va = _rows(1, seed=9)[0]
    assert nixl_tier.batch_put([a], [va]) == [True]
    assert nixl_tier.batch_put(_keys(NUM_SLOTS - 1), _rows(NUM_SLOTS - 1)) == [True] * 15
    new = _keys(NUM_SLOTS, start=600)
    res = nixl_tier.batch_put([a, *new], [va, *_rows(NUM_SLOTS, seed=2)])
    # A stays; the 15 older entries make room for 15 new keys; the 16th finds none
    assert res == [True] + [True] * 15 + [False]
    assert nixl_tier.batch_exists([a]) == 1
    assert _same(nixl_tier.batch_get([a])[0], va)


def test_nixl_eviction_publishes_evicted(nixl_tier):
    ks = _keys(NUM_SLOTS + 1)
    assert nixl_tier.batch_put(ks[:NUM_SLOTS], _rows(NUM_SLOTS)) == [True] * NUM_SLOTS
    log = EventLog()
    nixl_tier.events.subscribe(log)
    assert nixl_tier.batch_put(ks[NUM_SLOTS:], _rows(1)) == [True]
    assert _kinds(log) == [("evicted", (ks[0].block_hash,)),
                           ("stored", (ks[NUM_SLOTS].block_hash,))]


# -- Redis -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def redis_server():
    pytest.importorskip("redis")
    srv = redis_server_or_skip()
    yield srv
    srv.stop()


def test_redis_clear_deletes_only_its_prefix(redis_server):
    from prefixkv.paged.tiers import RedisTier

    t = RedisTier(port=redis_server.port, prefix="mine:")
    other = RedisTier(port=redis_server.port, prefix="other:")
    try:
        log = EventLog()
        t.events.subscribe(log)
        ks, vals = _keys(3), _rows(3)
        assert t.batch_put(ks, vals) == [True] * 3
        assert other.batch_put(ks, vals) == [True] * 3
        t.client.set("unrelated-key", b"keep me")
        t.client.set("x-mine:inside", b"keep me too")  # holds the prefix, not under it
        t.clear()
        assert t.batch_exists(ks) == 0
        assert other.batch_exists(ks) == 3
        assert t.client.get("unrelated-key") == b"keep me"
        assert t.client.get("x-mine:inside") == b"keep me too"
        assert _kinds(log)[-1] == ("cleared", ())
    finally:
        other.clear()
        t.client.delete("unrelated-key", "x-mine:inside")
        t.close()
        other.close()


def test_redis_clear_with_glob_characters_in_the_prefix(redis_server):
    """clear() matches its prefix literally: as a glob, "p[x]:" matched another tier's "px:"
    keys and missed its own (the redis_tier fixture's prefixes hold test names, brackets
    included)."""
    from prefixkv.paged.tiers import RedisTier

    t = RedisTier(port=redis_server.port, prefix="p[x]:")  # as a glob: matches "px:..."
    other = RedisTier(port=redis_server.port, prefix="px:")
    try:
        ks, vals = _keys(2), _rows(2)
        assert t.batch_put(ks, vals) == [True, True]
        assert other.batch_put(ks, vals) == [True, True]
        t.clear()
        assert (t.batch_exists(ks), other.batch_exists(ks)) == (0, 2)
    finally:
        for k in t.client.keys("p*"):
            t.client.delete(k)
        t.close()
        other.close()


class _CountingDeadClient:
    """A redis client whose every command fails with a connection error; counts the calls
    that would touch the network."""

    def __init__(self):
        import redis

        self._error = redis.exceptions.ConnectionError
        self.calls = 0

        class _Pool:
            def disconnect(self):
                pass

        self.connection_pool = _Pool()

    def _fail(self, *args, **kw):
        self.calls += 1
        raise self._error("injected: server gone")

    pipeline = mget = ping = scan_iter = delete = _fail

    def close(self):
        pass


def test_redis_marked_down_answers_without_touching_the_network():
    pytest.importorskip("redis")
    from prefixkv.paged.tiers import RedisTier

    client = _CountingDeadClient()
    t = RedisTier(port=1, prefix="down:", retry_interval=60.0, client=client)
    ks, vals = _keys(3), _rows(3)
    assert t.batch_get(ks) == [None] * 3  # the fault: marks the server down
    assert client.calls == 1 and t.stats.errors == 1 and not t.available
    for _ in range(3):
        assert t.batch_put(ks, vals) == [False] * 3
        assert t.batch_get(ks) == [None] * 3
        assert t.batch_exists(ks) == 0
    assert client.calls == 1 and t.stats.errors == 1
    assert t.stats.rejected == 9 and t.stats.misses == 12
    t.close()


# -- disk events -----------------------------------------------------------------------------

def test_disk_remove_and_clear_publish_events(tmp_path):
    t = DiskTier(tmp_path)
    log = EventLog()
    t.events.subscribe(log)
    ks = _keys(3, _ns(salt="s"))
    assert t.batch_put(ks, _rows(3)) == [True] * 3
    assert t.batch_remove(ks[:1]) == 1
    t.clear()
    assert [(e.kind, e.tier, e.namespace, e.block_hashes) for e in log.events] == [
        ("stored", "disk", b"s", tuple(k.block_hash for k in ks)),
        ("removed", "disk", b"s", (ks[0].block_hash,)),
        ("cleared", "disk", b"", ())]
    assert t.batch_exists(ks[1:]) == 0


# -- Mooncake --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mc_store():
    pytest.importorskip("mooncake.store", reason=MOONCAKE_SKIP)
    from prefixkv.paged.tiers.mooncake import LocalMooncakeStore

    try:
        st = LocalMooncakeStore().start()
    except FileNotFoundError as e:
        pytest.skip(f"mooncake binaries absent: {e}")
    yield st
    st.stop()


def test_mooncake_closed_tier_is_a_miss_and_does_not_reconnect(mc_store):
    from prefixkv.paged.tiers import MooncakeTier

    t = MooncakeTier(mc_store.master, mc_store.metadata_server, staging_bytes=1 << 20,
                     prefix="closed/")
    ks, vals = _keys(2), _rows(2)
    assert t.batch_put(ks, vals) == [True, True]
    t.close()
    # the store is up and holds the blocks: a closed tier still answers misses only
    assert t.batch_exists(ks) == 0 and t.batch_get(ks, shape=ROW) == [None, None]
    assert t.batch_put(_keys(1, start=10), vals[:1]) == [False]
    assert t.store is None


def test_mooncake_clear_is_anchored_to_its_prefix(mc_store):
    from prefixkv.paged.tiers import MooncakeTier

    t = MooncakeTier(mc_store.master, mc_store.metadata_server, staging_bytes=1 << 20)
    try:
        ks, vals = _keys(2), _rows(2)
        t.prefix = "zz-anchor/"  # holds "anchor/" inside, not at the start
        assert t.batch_put(ks, vals) == [True, True]
        t.prefix = "anchor/"
        assert t.batch_put(ks, vals) == [True, True]
        t.clear()
        assert t.batch_exists(ks) == 0
        t.prefix = "zz-anchor/"
        assert t.batch_exists(ks) == 2
        t.clear()
    finally:
        t.close()
