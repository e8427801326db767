"""Work done by the tiers grows with the blocks a call moves, not with the tier's size or the
square of the batch: puts over the budget, offloads of eviction batches larger than the host
tier, onboarding past the first miss, leading-hit counts across alternating tiers. Each test
counts work (entries scanned, tier calls, keys read, bytes allocated), never wall time."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from prefixkv.paged.prefix_cache import PrefixCache
from prefixkv.paged.tiers import (
    BlockKey,
    BlockOffloader,
    DiskTier,
    HostTier,
    Namespace,
    TieredStore,
)
from prefixkv.paged.tiers.base import record_bytes

ROW = (2, 1, 1, 8)  # tiny blocks: the cost under test is bookkeeping
C = 200             # blocks the budget holds


def _ns(salt=None):
    return Namespace("tiny-model", dtype="float32", salt=salt)


def _keys(n, start=0, ns=None):
    ns = ns or _ns()
    return [BlockKey(i.to_bytes(4, "big"), ns) for i in range(start, start + n)]


def _row(i=0, shape=ROW):
    return np.full(shape, i, np.float32)


class _CountingOrderedDict(OrderedDict):
    """An OrderedDict that counts the keys its iteration yields (the LRU scans)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.scanned = 0

    def __iter__(self):
        for k in super().__iter__():
            self.scanned += 1
            yield k


# -- host tier -------------------------------------------------------------------------------

def _counted_host(budget_rows: int) -> HostTier:
    h = HostTier(budget_rows * _row().nbytes)
    h._entries = _CountingOrderedDict()
    return h


def test_host_batch_over_budget_scans_linearly():
    """A batch of 2C blocks into a tier of C: the first C are kept, each later one is refused
    without scanning the C protected entries (the former scan made this C * C)."""
    for copy in (True, False):
        h = _counted_host(C)
        h.batch_put(_keys(C, start=10_000), [_row()] * C)  # older blocks, evicted by the batch
        vals = [_row(i) for i in range(2 * C)]
        assert h.batch_put(_keys(2 * C), vals, copy=copy) == [True] * C + [False] * C
        assert h.batch_exists(_keys(2 * C)) == C and len(h) == C
        assert h.stats.rejected == C and h.stats.evictions == C
        assert h._entries.scanned <= 4 * C, (copy, h._entries.scanned)


def test_host_reserve_protect_ignores_names_it_does_not_hold():
    """reserve(protect=...) with more names than entries, most of them not held: the held
    unprotected block is still evicted for room (only held names count as protected)."""
    h = HostTier(2 * _row().nbytes)
    ks = _keys(2)
    h.batch_put(ks, [_row(), _row()])
    protect = {ks[1].storage_key()} | {f"not-held/{i}" for i in range(5)}
    assert len(h.reserve(1, ROW, "float32", protect=protect)) == 1
    assert ks[0] not in h and ks[1] in h


# -- disk tier -------------------------------------------------------------------------------

def test_disk_put_over_budget_scans_linearly(tmp_path):
    """The disk tier's put of 2n blocks into a budget of n: the first n are written, each later
    one is refused without scanning the n files this put protects (formerly n * n)."""
    n = 100
    v = _row()
    size = len(record_bytes(_keys(1)[0], v))
    d = DiskTier(tmp_path, budget_bytes=n * size)
    d.batch_put(_keys(n, start=10_000), [v] * n)  # older files, evicted by the put
    d._sizes = _CountingOrderedDict(d._sizes)
    assert d.batch_put(_keys(2 * n), [v] * (2 * n)) == [True] * n + [False] * n
    assert d.batch_exists(_keys(2 * n)) == n and d.used_bytes == n * size
    assert d.stats.rejected == n and d.stats.evictions == n
    assert d._sizes.scanned <= 4 * n, d._sizes.scanned


# -- chain -----------------------------------------------------------------------------------

class _CountingHost(HostTier):
    """A host tier that counts the keys handed to its batch_exists (and batch_get)."""

    def __init__(self, *a, name="host", **kw):
        super().__init__(*a, **kw)
        self.name = name
        self.asked = 0
        self.read = 0

    def batch_exists(self, keys):
        self.asked += len(keys)
        return super().batch_exists(keys)

    def batch_get(self, keys, **kw):
        self.read += len(keys)
        return super().batch_get(keys, **kw)


def _alternating(n):
    ks = _keys(n)
    a, b = _CountingHost(1 << 30), _CountingHost(1 << 30, name="host2")
    a.batch_put(ks[0::2], [_row()] * len(ks[0::2]))
    b.batch_put(ks[1::2], [_row()] * len(ks[1::2]))
    return ks, a, b


def test_chain_exists_over_alternating_tiers_is_linear():
    """Leading keys alternating between two tiers: each round advances one key. The keys handed
    to the tiers grow linearly with n (the former code handed each tier keys[pos:] per round:
    n * n / 2 each)."""
    asked = {}
    for n in (512, 2048):
        ks, a, b = _alternating(n)
        assert TieredStore([a, b], promote=False).batch_exists(ks) == n
        asked[n] = a.asked + b.asked
    assert asked[2048] <= 5 * asked[512], asked  # quadratic: 16x
    assert asked[2048] <= 2 * (TieredStore.EXISTS_WINDOW + 2) * 2048, asked


def test_chain_exists_counts_leading_keys_some_tier_holds():
    """Against the definition, for placements with runs shorter and longer than the first
    window: the count of leading keys each held by some tier."""
    rng = np.random.default_rng(5)
    for _ in range(30):
        n = int(rng.integers(0, 300))
        ks = _keys(n)
        tiers = [_CountingHost(1 << 30, name=f"t{i}") for i in range(3)]
        runs = rng.integers(1, 100, 40)  # the first window is 32 keys
        pos, held = 0, [set() for _ in tiers]
        for r in runs:
            t = int(rng.integers(0, 4))  # 3: nobody holds this run
            for i in range(pos, min(n, pos + int(r))):
                if t < 3:
                    held[t].add(i)
            pos += int(r)
        for t, h in zip(tiers, held, strict=True):
            if h:
                t.batch_put([ks[i] for i in sorted(h)], [_row()] * len(h))
        want = next((i for i in range(n) if not any(i in h for h in held)), n)
        assert TieredStore(tiers, promote=False).batch_exists(ks) == want


# -- onboarding ------------------------------------------------------------------------------

class _CountingDisk(DiskTier):
    """A disk tier that counts the keys handed to its batch_get."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.read = 0

    def batch_get(self, keys, **kw):
        self.read += len(keys)
        return super().batch_get(keys, **kw)


def _chain(tmp_path, n):
    """A host + disk chain whose disk holds blocks 1..n-1 of ``hashes`` (block 0 missing)."""
    disk = _CountingDisk(tmp_path)
    store = TieredStore([HostTier(1 << 30), disk])
    off = BlockOffloader(store, _ns())
    hashes = [i.to_bytes(8, "big") for i in range(n)]
    disk.batch_put(off.keys(hashes[1:]), [_row(i) for i in range(1, n)])
    return store, disk, off, hashes


def test_onboard_reads_only_the_leading_hits(tmp_path):
    """Block 0 missing, the 199 after it on disk: nothing is read or promoted (they were all
    read, checksummed, promoted into the host tier and dropped). With block 0 back and block
    50 gone, exactly the leading 50 are read."""
    n = 200
    store, disk, off, hashes = _chain(tmp_path, n)
    caches = [np.zeros((n + 1, *ROW[1:]), np.float32) for _ in range(ROW[0])]
    ids = np.arange(1, n + 1, dtype=np.int32)
    _, got = off.onboard(caches, ids, hashes)
    assert got == 0 and disk.read == 0 and disk.stats.bytes_read == 0
    assert len(store.tiers[0]) == 0  # nothing promoted
    disk.batch_put(off.keys(hashes[:1]), [_row(0)])
    disk.batch_remove(off.keys(hashes[50:51]))
    caches, got = off.onboard(caches, ids, hashes)
    assert got == 50 and disk.read == 50 and len(store.tiers[0]) == 50
    assert all((caches[0][b] == i).all() for i, b in enumerate(ids[:50].tolist()))


def test_onboard_of_a_long_prompt_looks_up_keys_up_to_the_first_miss():
    """5000 blocks asked, the tier holds the leading 100: the keys looked up and read are
    O(100), not O(5000) (every key was read; then every key was looked up)."""
    n, hits = 5000, 100
    store = _CountingHost(1 << 30)
    off = BlockOffloader(store, _ns())
    hashes = [i.to_bytes(8, "big") for i in range(n)]
    store.batch_put(off.keys(hashes[:hits]), [_row(i) for i in range(hits)])
    rows = off.fetch(hashes, ROW, "float32")
    assert len(rows) == hits and all((r == i).all() for i, r in enumerate(rows))
    assert store.read == hits and store.asked <= 3 * (hits + 32), store.asked


def test_onboard_request_reads_nothing_past_a_miss_or_the_free_blocks(tmp_path):
    """onboard_request of a prompt whose first block is missing reads no block; one whose
    blocks are all stored reads only as many as the pool has free."""
    bs, n = 4, 100
    tokens = list(range(1000, 1000 + bs * n + 1))
    pc = PrefixCache(num_blocks=n + 10, block_size=bs)
    pc.add_request("a", tokens)
    hashes = pc.request_hashes("a")[:n]
    disk = _CountingDisk(tmp_path)
    store = TieredStore([HostTier(1 << 30), disk])
    off = BlockOffloader(store, _ns())
    row = (ROW[0], bs, *ROW[2:])
    disk.batch_put(off.keys(hashes[1:]), [np.ones(row, np.float32)] * (n - 1))
    caches = [np.zeros((n + 10, *row[1:]), np.float32) for _ in range(row[0])]
    assert off.onboard_request(pc, "a", caches)[1] == 0
    assert disk.read == 0 and len(store.tiers[0]) == 0
    disk.batch_put(off.keys(hashes[:1]), [np.ones(row, np.float32)])
    small = PrefixCache(num_blocks=11, block_size=bs)  # 10 usable blocks
    small.add_request("a", tokens)
    assert off.onboard_request(small, "a", caches)[1] == 10
    assert disk.read == 10 and len(store.tiers[0]) == 10


# -- offload of an eviction batch over the host budget ------------------------------------------

BIG = (2, 16, 8, 64)  # 64 KiB blocks: the memory under test dwarfs the bookkeeping


def _offload_peak(store, n, chunk_bytes=None, gather=None):
    """(results, peak bytes allocated) of offloading n numpy blocks (block i holds i)."""
    import tracemalloc

    caches = [np.stack([np.full(BIG[1:], i, np.float32) for i in range(n + 1)])
              for _ in range(BIG[0])]
    off = BlockOffloader(store, _ns(), gather=gather)
    if chunk_bytes is not None:
        off.overflow_chunk_bytes = chunk_bytes
    hashes = [i.to_bytes(8, "big") for i in range(n)]
    tracemalloc.start()
    try:
        res = off.offload(caches, np.arange(1, n + 1, dtype=np.int32), hashes)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return res, peak, off, hashes


def test_offload_over_a_lone_host_tier_allocates_within_its_budget():
    """256 blocks into a host tier of 8: the leading 8 are kept, the rest dropped, and the
    memory allocated stays within the budget (it gathered all 256 blocks first: 32x)."""
    row = int(np.prod(BIG)) * 4
    host = HostTier(8 * row)
    res, peak, off, hashes = _offload_peak(host, 256)
    assert res == [True] * 8 + [False] * 248
    assert host.batch_exists(off.keys(hashes)) == 8 and len(host) == 8
    assert host.stats.rejected == 248 and host.stats.puts == 8
    assert peak <= 8 * row + 2 * row, peak  # + keys, lists


def test_offload_over_the_host_tier_feeds_lower_tiers_in_chunks(tmp_path):
    """The same batch into host (8 blocks) + disk: the host keeps the leading 8, the disk gets
    all 256, copied out 4 blocks at a time (peak: budget + one chunk); every block comes back
    bit for bit; stats as one put of the batch."""
    row = int(np.prod(BIG)) * 4
    host, disk = HostTier(8 * row), DiskTier(tmp_path)
    store = TieredStore([host, disk])
    res, peak, off, hashes = _offload_peak(store, 256, chunk_bytes=4 * row)
    assert res == [True] * 256
    assert host.batch_exists(off.keys(hashes)) == 8 and len(host) == 8
    assert disk.batch_exists(off.keys(hashes)) == 256
    assert host.stats.rejected == 248 and store.stats.puts == 256 and store.stats.rejected == 0
    assert peak <= 8 * row + 4 * row + 3 * row, peak  # + keys, paths, lists
    got = store.batch_get(off.keys(hashes), shape=BIG, dtype="float32")
    assert all(g is not None and (g == i + 1).all() for i, g in enumerate(got))


def test_offload_over_budget_reports_only_blocks_some_tier_holds(tmp_path):
    """Host of 2 blocks over a disk of 4, the overflow put in chunks of 2: the third chunk's
    put evicts the first chunk's blocks from the disk. offload says so (it said True for
    them), and a block the host kept is not written below it again."""
    row = int(np.prod(BIG)) * 4
    host = HostTier(2 * row)
    rec = len(record_bytes(BlockKey(bytes(8), _ns()), np.zeros(BIG, np.float32)))
    disk = DiskTier(tmp_path, budget_bytes=4 * rec)
    store = TieredStore([host, disk])
    res, _, off, hashes = _offload_peak(store, 8, chunk_bytes=2 * row)
    keys = off.keys(hashes)
    holds = [k in host or disk.batch_exists([k]) == 1 for k in keys]
    assert res == holds == [True, True, False, False, True, True, True, True]
    assert (store.stats.puts, store.stats.rejected) == (6, 2)


@pytest.mark.parametrize("chunk_rows", [None, 1], ids=["numpy", "gather-1-row-chunks"])
def test_offload_over_budget_writes_a_repeated_block_below_once(tmp_path, chunk_rows):
    """A block repeated in an eviction batch, once in the part the host keeps and once past
    it: the disk gets it once (with the host's put), not again with the overflow; through a
    gather= in chunks of one block too (each chunk's put wrote it again)."""
    row = int(np.prod(BIG)) * 4
    host, disk = HostTier(2 * row), DiskTier(tmp_path)
    store = TieredStore([host, disk])
    off = BlockOffloader(store, _ns(), gather=None if chunk_rows is None else _gather_rows)
    if chunk_rows is not None:
        off.overflow_chunk_bytes = chunk_rows * row
    caches = [np.zeros((8, *BIG[1:]), np.float32) for _ in range(BIG[0])]
    hashes = [bytes([i + 1]) * 32 for i in range(4)]
    res = off.offload(caches, [1, 2, 3, 4, 1], hashes + hashes[:1])
    assert res == [True] * 5
    assert disk.stats.puts == 4 and store.stats.puts == 5 and store.stats.rejected == 0


def test_fetch_checks_every_hash_though_it_looks_up_only_to_the_first_miss():
    """Keys stop at the first miss, the checks do not: a bad hash anywhere is refused (it was
    taken when it came after a window of misses), and any iterable of hashes is taken."""
    import pytest

    off = BlockOffloader(HostTier(1 << 20), _ns())
    miss = [bytes([i + 1]) * 32 for i in range(40)]
    for bad, exc in ((None, TypeError), (b"", ValueError), (-5, ValueError)):
        with pytest.raises(exc, match="block_hash"):
            off.fetch(miss + [bad], ROW, np.float32)
    assert off.fetch(iter(miss), ROW, np.float32) == []


def _small_caches():
    return [np.arange(8 * 8, dtype=np.float32).reshape(8, 4, 2)]


def _gather_rows(caches, ids):
    return np.stack([np.stack([c[b] for c in caches]) for b in np.asarray(ids).tolist()])


@pytest.mark.parametrize("gather", [None, _gather_rows], ids=["numpy", "gather"])
def test_offload_keeps_or_reports_the_blocks_it_refreshed(gather):
    """A lone host tier of 1 block holding A, offload [A, B]: A is refreshed, and room for B
    must not come from A (it did: B evicted A, and offload said True for both), with the
    default copies and with a gather= alike."""
    row = 8 * 4
    host = HostTier(1 * row)
    off = BlockOffloader(host, Namespace("m", dtype="float32"), gather=gather)
    caches = _small_caches()
    a, b = bytes([1]) * 8, bytes([2]) * 8
    off.offload(caches, [1], [a])
    out = off.offload(caches, [1, 2], [a, b])
    assert out == [k in host for k in off.keys([a, b])] == [True, False]


def test_offload_over_budget_counts_every_position_once(tmp_path):
    """Store stats as one put of the batch: a repeat of a block the host kept counts once
    (it counted twice), and a block a later chunk evicted below counts as refused."""
    row = 8 * 4
    host, disk = HostTier(2 * row), DiskTier(tmp_path)
    store = TieredStore([host, disk])
    off = BlockOffloader(store, Namespace("m", dtype="float32"))
    hashes = [bytes([i]) * 8 for i in (1, 7, 7, 7, 6)]
    assert off.offload(_small_caches(), [1, 2, 2, 2, 3], hashes) == [True] * 5
    assert (store.stats.puts, store.stats.rejected) == (5, 0)



def _gather_copies(caches, ids):
    """A gather= as an engine passes one (torch: gather_blocks_to_host): new host rows."""
    return np.stack([np.stack([c[b] for c in caches]) for b in np.asarray(ids).tolist()])


def test_offload_with_a_gather_over_the_host_budget_gathers_a_chunk_at_a_time(tmp_path):
    """The test above through a gather= (the torch and JAX engines' path): the same result,
    tiers and contents, and the host memory taken is the host's budget and a chunk or two,
    not the batch (it gathered all 256 blocks first: 32x the budget)."""
    row = int(np.prod(BIG)) * 4
    host, disk = HostTier(8 * row), DiskTier(tmp_path)
    store = TieredStore([host, disk])
    res, peak, off, hashes = _offload_peak(store, 256, chunk_bytes=4 * row,
                                           gather=_gather_copies)
    assert res == [True] * 256
    assert host.batch_exists(off.keys(hashes)) == 8 and len(host) == 8
    assert disk.batch_exists(off.keys(hashes)) == 256
    assert host.stats.rejected == 248 and store.stats.puts == 256 and store.stats.rejected == 0
    assert peak <= 8 * row + 4 * (4 * row), peak  # + a chunk, the gather's temporaries
    got = store.batch_get(off.keys(hashes), shape=BIG, dtype="float32")
    assert all(g is not None and (g == i + 1).all() for i, g in enumerate(got))



class _FailingGather:
    """A gather= that fails on its ``fail_at``-th call: raising, or rows of another dtype."""

    def __init__(self, fail_at, how):
        self.calls, self.fail_at, self.how = 0, fail_at, how

    def __call__(self, caches, ids):
        self.calls += 1
        rows = _gather_rows(caches, ids)
        if self.calls == self.fail_at:
            if self.how == "raise":
                raise RuntimeError("device lost")
            return rows.astype(np.float64)
        return rows


@pytest.mark.parametrize("how,exc", [("raise", RuntimeError), ("dtype", TypeError)])
def test_offload_whose_gather_fails_part_way_keeps_what_it_had(how, exc):
    """A full host tier of 4 blocks, a batch of 6 gathered 2 at a time, the gather failing on
    its second call: the first chunk is stored (2 old blocks evicted for it), the other 2 old
    blocks stay (the whole batch's room was made first: the host lost all 4 and stored
    nothing), and rows of another dtype are a TypeError naming gather (they were cast)."""
    row = 8 * 4
    host = HostTier(4 * row)
    ns = Namespace("m", dtype="float32")
    caches = _small_caches()
    BlockOffloader(host, ns).offload(caches, [1, 2, 3, 4], [bytes([i]) * 8 for i in (1, 2, 3, 4)])
    off = BlockOffloader(host, ns, gather=_FailingGather(2, how))
    off.overflow_chunk_bytes = 2 * row
    new = [bytes([i]) * 8 for i in range(10, 16)]
    with pytest.raises(exc, match="device lost" if how == "raise" else "gather: expected rows"):
        off.offload(caches, [1, 2, 3, 4, 5, 6], new)
    held = [k in host for k in off.keys([bytes([i]) * 8 for i in (1, 2, 3, 4)] + new)]
    assert held == [False, False, True, True, True, True, False, False, False, False]


def test_offload_through_a_gather_puts_a_repeated_block_once(tmp_path):
    """A block twice in the part of a batch the host keeps, gathered one block at a time:
    gathered and handed to the tiers once (each chunk's put handed it to the disk again)."""
    row = 8 * 4
    host, disk = HostTier(4 * row), DiskTier(tmp_path)
    store = TieredStore([host, disk])
    gathered, handed = [], []
    real_put = disk.batch_put

    def gather(caches, ids):
        gathered.extend(np.asarray(ids).tolist())
        return _gather_rows(caches, ids)

    def put(keys, values):
        handed.extend(k.block_hash for k in keys)
        return real_put(keys, values)

    disk.batch_put = put
    off = BlockOffloader(store, Namespace("m", dtype="float32"), gather=gather)
    off.overflow_chunk_bytes = row
    a, b = bytes([1]) * 8, bytes([2]) * 8
    assert off.offload(_small_caches(), [1, 1, 2], [a, a, b]) == [True] * 3
    assert sorted(gathered) == [1, 2] and sorted(handed) == [a, b]
    assert (store.stats.puts, store.stats.rejected) == (3, 0)
