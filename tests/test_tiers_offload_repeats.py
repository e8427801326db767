"""BlockOffloader.offload of a batch that names a block hash more than once (an eviction batch
can: two sequences' blocks of the same content). offload deduplicates once, before any copy
path runs, so every path (numpy copies into reserved host rows, a gather= in chunks, the
generic np.take buffer, the overflow put below the host tier) stores the same blocks, from the
same block ids, with the same stats and events:

- a repeat is stored once, from its first position's block id, and reports its first
  position's result;
- each tier counts the block once; a TieredStore counts every position, as its put of the whole
  batch would (a repeat of a block put here is one more put or rejection, like its first; a
  repeat of a block the host tier held already is a refresh, like its first: not counted).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from prefixkv.paged.tiers import (
    BlockKey,
    BlockOffloader,
    DiskTier,
    HostTier,
    Namespace,
    TieredStore,
    TierStats,
)
from prefixkv.paged.tiers.base import first_occurrences

NS = Namespace("m", dtype="float32")
BLOCK = (4, 2)                   # one layer of [4, 2] float32 blocks
ROW = int(np.prod(BLOCK)) * 4    # bytes of one offloaded row [1, 4, 2]
NUM_BLOCKS = 8


def _caches():
    """One layer of NUM_BLOCKS blocks; block b holds 8 * b + arange(8) (all distinct)."""
    return [np.arange(NUM_BLOCKS * 8, dtype=np.float32).reshape(NUM_BLOCKS, *BLOCK)]


def _block(b: int) -> bytes:
    return _caches()[0][b][None].tobytes()


def _h(c: str) -> bytes:
    return c.encode() * 8


def _gather_rows(caches, ids):
    return np.stack([np.stack([c[b] for c in caches]) for b in np.asarray(ids).tolist()])


class _HostArray:
    """An array numpy converts that is not an ndarray (a JAX array on the host, say): offload
    takes its generic path, np.take into one buffer, then one put of it."""

    def __init__(self, a: np.ndarray):
        self.a, self.shape, self.dtype, self.itemsize = a, a.shape, a.dtype, a.itemsize

    def __array__(self, dtype=None, copy=None):
        return self.a


#: every route offload copies blocks out by: (gather, overflow chunk in blocks, wrapped caches)
PATHS = {
    "numpy": (None, None, False),              # reserved host rows; overflow in one chunk
    "numpy-1-row": (None, 1, False),           # overflow below the host one block at a time
    "gather": (_gather_rows, None, False),     # _put_gathered, one chunk
    "gather-1-row": (_gather_rows, 1, False),  # a chunk per block
    "generic": (None, None, True),             # np.take into one buffer, one put
}


def _offload(path, *, host_rows, held, hashes, ids, below, tmp_path=None):
    """Offload blocks ``ids`` under ``hashes`` through ``path`` into a host tier of
    ``host_rows`` blocks holding ``held`` (hash letters put in order: the first is the least
    recently used), over ``below``: None (the host tier alone), "host" (a second, large host
    tier) or "disk". Returns everything a caller can observe afterwards."""
    gather, chunk, wrap = PATHS[path]
    host = HostTier(host_rows * ROW)
    if held:
        host.batch_put([BlockKey(_h(c), NS) for c in held],
                       [np.full((1, *BLOCK), -1, np.float32)] * len(held))
    host.stats = TierStats()
    events = []
    host.events.subscribe(events.append)
    lower = {None: None, "host": lambda: HostTier(1 << 20),
             "disk": lambda: DiskTier(tmp_path)}[below]
    lower = lower() if lower else None
    store = host if lower is None else TieredStore([host, lower])
    off = BlockOffloader(store, NS, gather=gather)
    if chunk is not None:
        off.overflow_chunk_bytes = chunk * ROW
    caches = _caches()
    if wrap:
        caches = [_HostArray(c) for c in caches]
    out = off.offload(caches, ids, [_h(c) for c in hashes])
    state = {
        "out": out,
        "host": [(e.key.block_hash, e.array.tobytes()) for e in host._entries.values()],
        "host_stats": dataclasses.asdict(host.stats),
        "events": {kind: [h for e in events if e.kind == kind for h in e.block_hashes]
                   for kind in ("stored", "evicted", "removed")},
    }
    if lower is not None:
        state["store_stats"] = (store.stats.puts, store.stats.rejected)
        state["below_stats"] = (lower.stats.puts, lower.stats.rejected, lower.stats.bytes_written)
        names = sorted({_h(c) for c in hashes + held})
        got = lower.batch_get([BlockKey(h, NS) for h in names])
        state["below"] = [(h, g.tobytes()) for h, g in zip(names, got, strict=True)
                          if g is not None]
    return state


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("below", [None, "disk"], ids=["host-alone", "host+disk"])
def test_offload_over_the_host_budget_stores_a_repeated_block_once(tmp_path, path, below):
    """A host tier of 2 blocks, batch A A B C B A over block ids 1 5 2 3 6 1 (A again at block
    5: a repeat is stored from its first position's block). Distinct: A B C, so the host
    keeps A (block 1) and B (block 2), refuses C; the disk takes A B C once each.
    Host alone: per position A A B C B A -> True True True False True True.
    TieredStore: 6 positions, each held by some tier -> puts 6, rejected 0.
    (The numpy path reserved host rows for all 6 positions: the host kept A only, rows for
    the repeat went unused, and B, C and the repeats went below.)"""
    s = _offload(path, host_rows=2, held=[], hashes=list("AABCBA"), ids=[1, 5, 2, 3, 6, 1],
                 below=below, tmp_path=tmp_path)
    A, B, C = _h("A"), _h("B"), _h("C")
    want = [True] * 6 if below else [True, True, True, False, True, True]
    assert s["out"] == want
    assert s["host"] == [(A, _block(1)), (B, _block(2))]
    assert s["host_stats"] == dataclasses.asdict(
        TierStats(puts=2, rejected=1, bytes_written=2 * ROW))
    assert s["events"] == {"stored": [A, B], "evicted": [], "removed": []}
    if below:
        assert s["below"] == [(A, _block(1)), (B, _block(2)), (C, _block(3))]
        assert s["below_stats"][:2] == (3, 0)
        assert s["store_stats"] == (6, 0)


@pytest.mark.parametrize("path", list(PATHS))
def test_offload_into_a_full_host_makes_room_for_distinct_blocks_only(path):
    """A host tier of 3 blocks holding X, Y (X least recent), batch A A B: 2 distinct blocks
    need 2 rows, one of them free, so X alone is evicted and Y stays (the numpy path made
    room for 3 rows: it evicted Y as well, and one reserved row went unused)."""
    s = _offload(path, host_rows=3, held=["X", "Y"], hashes=list("AAB"), ids=[1, 1, 2],
                 below="host")
    A, B, X, Y = _h("A"), _h("B"), _h("X"), _h("Y")
    assert s["out"] == [True] * 3
    assert [h for h, _ in s["host"]] == [Y, A, B]
    assert s["host_stats"] == dataclasses.asdict(
        TierStats(puts=2, evictions=1, bytes_written=2 * ROW))
    assert s["events"] == {"stored": [A, B], "evicted": [X], "removed": []}
    assert s["below"] == [(A, _block(1)), (B, _block(2))]
    assert s["store_stats"] == (3, 0) and s["below_stats"][:2] == (2, 0)


@pytest.mark.parametrize("path", list(PATHS))
def test_offload_repeats_of_a_refreshed_block_are_not_counted(path):
    """A host tier of 2 blocks holding A, batch B A B A: A is refreshed (no copy, no put, not
    counted, at either position), B is put once and counted at both of its positions."""
    s = _offload(path, host_rows=2, held=["A"], hashes=list("BABA"), ids=[2, 1, 2, 1],
                 below="host")
    A, B = _h("A"), _h("B")
    assert s["out"] == [True] * 4
    assert [h for h, _ in s["host"]] == [A, B]
    assert s["host_stats"] == dataclasses.asdict(TierStats(puts=1, bytes_written=ROW))
    assert s["store_stats"] == (2, 0) and s["below"] == [(B, _block(2))]


@pytest.mark.parametrize("path", list(PATHS))
def test_offload_refreshes_a_held_repeat_at_its_first_position(path):
    """A host tier holding A then B (A least recently used), batch A B A, all held: the
    repeat is refreshed once, at its first position, as HostTier.batch_put stores a repeat
    at its first, so B ends most recently used (refreshing at the last A would keep A)."""
    s = _offload(path, host_rows=3, held=["A", "B"], hashes=list("ABA"), ids=[1, 2, 1],
                 below=None)
    assert s["out"] == [True] * 3
    assert [h for h, _ in s["host"]] == [_h("A"), _h("B")]


# -- fuzz: every path, and the batch against its deduplicated self ---------------------------

def _dedup(hashes, ids):
    firsts, _ = first_occurrences([BlockKey(_h(c), NS) for c in hashes])
    return [hashes[i] for i in firsts], [ids[i] for i in firsts]


def _fuzz_case(rng):
    letters = "ABCDEF"
    n = int(rng.integers(0, 9))
    hashes = [letters[i] for i in rng.integers(0, len(letters), n)]
    ids = [int(i) for i in rng.integers(1, NUM_BLOCKS, n)]
    held = [letters[i] for i in rng.permutation(len(letters))[:int(rng.integers(0, 3))]]
    held += ["X", "Y"][:int(rng.integers(0, 3))]
    host_rows = int(rng.integers(max(1, len(held)), 6))
    below = [None, "host"][int(rng.integers(0, 2))]
    return {"host_rows": host_rows, "held": held, "hashes": hashes, "ids": ids, "below": below}


@pytest.mark.parametrize("seed", range(6))
def test_offload_fuzz_repeats_are_one_put_on_every_path(seed):
    """Random batches with repeats over random host budgets and contents: every path ends in
    the same state (results, host contents in LRU order, stats, events, the tier below), and
    that state is the one of the deduplicated batch but for the store counting repeats.
    The generic path is compared only where no block of the batch is held already (it cannot
    protect refreshed blocks from the room its put makes; offload then reports them again)."""
    rng = np.random.default_rng(seed)
    for _ in range(40):
        case = _fuzz_case(rng)
        hashes, ids = case["hashes"], case["ids"]
        ref = _offload("numpy", **case)
        firsts, repeats = first_occurrences([BlockKey(_h(c), NS) for c in hashes])
        for pos, first in repeats:
            assert ref["out"][pos] == ref["out"][first], case
        # each stored block holds the block of its hash's first position
        refreshed = set(case["held"]) & set(hashes)
        # each block stored holds the block id of its hash's first position
        first_block = {_h(hashes[i]): _block(ids[i]) for i in firsts
                       if hashes[i] not in refreshed}
        for h, data in ref["host"] + ref.get("below", []):
            if h in first_block:
                assert data == first_block[h], case
        for path in PATHS:
            if path == "generic" and refreshed:
                continue
            assert _offload(path, **case) == ref, (path, case)
        dh, di = _dedup(hashes, ids)
        once = _offload("numpy", **{**case, "hashes": dh, "ids": di})
        assert [ref["out"][i] for i in firsts] == once["out"], case
        if case["below"] is not None:
            # a repeat counts like its first position: put or refused, or refreshed: not at all
            extra = [ref["out"][pos] for pos, first in repeats if hashes[first] not in refreshed]
            puts, rejected = once["store_stats"]
            assert ref["store_stats"] == (puts + sum(extra),
                                          rejected + len(extra) - sum(extra)), case
        skip = ("out", "store_stats")
        assert ({k: v for k, v in ref.items() if k not in skip}
                == {k: v for k, v in once.items() if k not in skip}), case
