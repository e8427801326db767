"""Batch metadata for one engine step, in the form the kernels take (op contract, docs/ops.md).

:func:`plan_batch` turns each scheduled sequence's block list, cached context length and this
step's query length into ``block_tables``, ``kv_lens``, ``cu_q_lens``, ``slot_mapping`` (int32
numpy), and finds groups of sequences whose leading *cached* blocks are the same physical
blocks, giving the arguments of ``shared_prefix_attention``::

    prefix_block_tables i32[num_prefixes, max_prefix_blocks], prefix_lens i32[num_prefixes],
    prefix_ids i32[num_seqs] (-1 = no prefix), block_tables i32[num_seqs, max_blocks_per_seq],
    kv_lens i32[num_seqs]  (own tokens after the prefix; cu_q_lens unchanged)

Choosing the groups: a prefix of ``d`` blocks shared by ``m`` sequences saves ``(m - 1) * d``
block reads. Sequences are sorted by their cached block ids; the longest-common-prefix
intervals of that order form a tree (a trie of block ids), and a small dynamic program picks,
per node, either one group at that depth (children whose own best saving is lower join it) or
the children's own groups. Each sequence gets at most one prefix (one cascade level). A prefix
only covers blocks before the first query token of every member (``prefix_len <= context``),
so ``kv_lens >= q_len`` holds for the remainder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from .validate import check_int, check_int32

I32 = np.int32
_I32_DTYPE = np.dtype(I32)

#: Multiprocessors assumed where no GPU can be asked (an H100 SXM's 132).
DEFAULT_SMS = 132


#: Most split-KV programs per (sequence, kv head). On an H200 (132 SMs, bf16, 8 kv heads,
#: Triton) 8 x 4096 tokens in 4 splits, 256 programs of 1024 keys, read at 72% of the measured
#: bandwidth, while 1 x 32768 at the former cap of 16, 128 programs of 2048 keys (one per
#: SM), read at 52%; 32 gives that case the same 256 programs of 1024 keys. Measured there
#: with 32 (2026-11-28, forced counts 4-64 side by side): 1 x 32768 at 69% (16: 51%, 64: 61%),
#: 8 x 4096 at 71% (its 4 splits; 8-32: 63-67%), 4 x 16384 (8 splits) at 82%.
MAX_KV_SPLITS = 32


def num_kv_splits(num_seqs: int, num_kv_heads: int, max_kv: int, decode: bool,
                  sms: int = DEFAULT_SMS) -> int:
    """Split-KV factor of a GPU decode launch, from static sizes only (no host sync): split
    long contexts when the (sequence, kv head) programs leave most of the ``sms``
    multiprocessors idle, aiming at ~2 programs per SM, at most MAX_KV_SPLITS splits and at
    least 512 keys per split. Both GPU backends (Triton for torch, Pallas for JAX) use it."""
    return kv_splits(num_seqs * num_kv_heads, max_kv, sms) if decode else 1


def kv_splits(programs: int, max_kv: int, sms: int = DEFAULT_SMS) -> int:
    """Split-KV factor of a launch of ``programs`` programs (query tiles x kv heads) that each
    walk up to ``max_kv`` keys: 1 when they fill the ``sms`` multiprocessors or the keys are
    few (under 1024), else ~2 programs per SM, at most MAX_KV_SPLITS splits of at least 512
    keys. Decode launches (num_kv_splits) use it, and the JAX frontend's non-causal launches:
    the cascade's prefix pass, few query tiles over one long prefix (on the H200 batch of
    PREFIX_PROGRAMS_PER_SM's note, 6 splits: the JAX cascade took 349 us against 1543 us for
    paged attention)."""
    return _split_factor(programs, max_kv, sms, per_sm=2, min_keys=512)


def _split_factor(programs: int, max_kv: int, sms: int, *, per_sm: int, min_keys: int,
                  round_up: bool = False) -> int:
    """1 when ``programs`` fill the ``sms`` or ``max_kv`` is under two splits of ``min_keys``;
    else about ``per_sm`` programs per SM (rounded down, or up), at most MAX_KV_SPLITS splits
    of at least ``min_keys`` keys."""
    if max_kv < 2 * min_keys or programs >= sms:
        return 1
    want, programs = sms * per_sm, max(programs, 1)
    per = -(-want // programs) if round_up else want // programs
    return int(max(1, min(MAX_KV_SPLITS, per, max_kv // min_keys)))


#: Programs per SM the cascade's prefix launch (torch frontend, Triton) aims at: its programs
#: hold 64 rows (16 query tokens x 4 q heads) against each key, more work per byte than
#: decode's, and gain from more splits than decode's ~2 per SM. On an H200 (64 decode queries
#: over one 32768-token prefix, bf16, 32 q / 8 kv heads: 40 programs unsplit) the cascade took
#: 1360 us unsplit, 337 us in 6 splits (2 per SM), 321 in 12, 277 in 24, 276 in 32 and 295 in
#: 64, against 1464 us for paged attention over the same batch.
PREFIX_PROGRAMS_PER_SM = 8


def prefix_kv_splits(programs: int, max_kv: int, sms: int = DEFAULT_SMS) -> int:
    """Split-KV factor of the cascade's prefix launch of ``programs`` programs (query tiles x
    kv heads) over prefixes of up to ``max_kv`` keys: 1 when they fill the ``sms``
    multiprocessors or the keys are under 2048, else ~PREFIX_PROGRAMS_PER_SM programs per
    SM, at most MAX_KV_SPLITS splits of at least 1024 keys (27 for the 40 programs above)."""
    return _split_factor(programs, max_kv, sms, per_sm=PREFIX_PROGRAMS_PER_SM, min_keys=1024,
                         round_up=True)


def max_prefix_split_rows(num_tokens: int, heads: int, tile_tokens: int, max_kv: int,
                          sms: int = DEFAULT_SMS) -> int:
    """Most (split, token) rows of partials the cascade's prefix pass takes in any batch of up
    to ``num_tokens`` query tokens (and any number of prefixes): its programs are (query
    tiles of ``tile_tokens`` + prefixes) x ``heads``, fewest with one prefix, and fewer
    programs split more, so a smaller batch can need more rows than this one. 0 when none
    splits."""
    best, tiles = 0, 1
    while num_tokens > 0:
        rows = min(num_tokens, tiles * tile_tokens)
        splits = prefix_kv_splits((tiles + 1) * heads, max_kv, sms)
        if splits == 1:  # more tiles only split less
            break
        best = max(best, splits * rows)
        if rows == num_tokens:
            break
        tiles += 1
    return best


def head_slices(group: int, max_heads: int) -> tuple[int, int]:
    """(slices, q heads per slice) of a kv head's ``group`` q heads when one GPU program holds
    at most ``max_heads`` of them: the fewest slices, of equal size but the last (71 at 32 ->
    3 x 24, the last 23). Both GPU backends split big groups by it."""
    slices = -(-group // max(max_heads, 1))
    return slices, -(-group // slices)


@dataclass
class SharedPrefixPlan:
    """Arguments of ``shared_prefix_attention`` (with the batch's ``cu_q_lens``)."""

    prefix_block_tables: np.ndarray
    prefix_lens: np.ndarray
    prefix_ids: np.ndarray
    block_tables: np.ndarray
    kv_lens: np.ndarray
    saved_block_reads: int

    @property
    def num_prefixes(self) -> int:
        return int(self.prefix_lens.shape[0])


@dataclass
class BatchPlan:
    """Metadata of one step (every array int32 numpy).

    block_tables: i32[num_seqs, max_blocks_per_seq], padded with the null block 0.
    kv_lens: i32[num_seqs], cached context + this step's tokens.
    cu_q_lens: i32[num_seqs + 1].
    slot_mapping: i32[num_tokens], where this step's KV is written (write_kv).
    positions: i32[num_tokens], absolute position of each query token (rotary embeddings).
    shared: the shared_prefix_attention arguments, or None when no group was found.
    copy_src / copy_dst: i32[n], copy-on-write pairs: run ``copy_blocks(caches, copy_src,
        copy_dst)`` before this step's writes (filled by the PrefixCache; empty here).
    request_ids: the requests in batch order (filled by the PrefixCache).
    """

    block_tables: np.ndarray
    kv_lens: np.ndarray
    cu_q_lens: np.ndarray
    slot_mapping: np.ndarray
    positions: np.ndarray
    shared: SharedPrefixPlan | None = None
    copy_src: np.ndarray = field(default_factory=lambda: np.zeros(0, I32))
    copy_dst: np.ndarray = field(default_factory=lambda: np.zeros(0, I32))
    request_ids: list = field(default_factory=list)

    @property
    def num_seqs(self) -> int:
        return int(self.kv_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.cu_q_lens[-1])


def _table(rows: Sequence[Sequence[int]], width: int | None = None, *,
           checked_rows: bool = False) -> np.ndarray:
    """The rows as a zero-padded int32 table; ids outside [0, 2**31) refused (ValueError
    naming block_lists). ``checked_rows``: int32 array rows known to hold valid ids
    (PrefixCache's), whose negatives are not looked for (a pass over the table)."""
    lens = list(map(len, rows))
    w = max(max(lens, default=0), 1) if width is None else width
    out = np.zeros((len(rows), w), dtype=I32)
    total = sum(lens)
    try:
        if total and isinstance(rows[0], np.ndarray):  # PrefixCache's rows
            for i, r in enumerate(rows):
                if getattr(r, "dtype", None) is not _I32_DTYPE and len(r):  # a list row too
                    # other integer dtypes are range checked before the cast to int32: an
                    # int64 id of 2**32 + 5 had wrapped to block 5
                    a = np.asarray(r)
                    if a.dtype.kind not in "iu":
                        raise TypeError(f"block_lists[{i}]: expected integer block ids, got "
                                        f"{a.dtype}")
                    if a.min() < 0 or a.max() >= 2**31:
                        raise OverflowError
                out[i, :len(r)] = r
            if not checked_rows and out.size and out.min() < 0:  # int32 rows' negatives
                raise OverflowError
        elif total:
            flat = np.array(list(chain.from_iterable(rows)))
            if flat.dtype.kind not in "iu":
                raise TypeError(f"block_lists: expected integer block ids, got {flat.dtype} "
                                f"values")
            if flat.min() < 0 or flat.max() >= 2**31:
                raise OverflowError
            out[np.arange(w)[None, :] < np.asarray(lens)[:, None]] = flat
    except OverflowError:
        raise ValueError("block_lists: expected block ids in [0, 2**31)") from None
    return out


#: Rows a step of :func:`_gather_rows` copies (times a row of a 2048-block table: 1 MiB).
GATHER_ROWS = 128


def _gather_rows(out: np.ndarray, table: np.ndarray, rows: np.ndarray, width: int,
                 out_rows: np.ndarray | None = None) -> None:
    """out[:, :width] = table[rows, :width] (out[out_rows, :width] with ``out_rows``), through
    temporaries of at most GATHER_ROWS rows. Multi-MiB temporaries, freed at the end of every
    step, went back to the kernel, and the next step paid a page fault per 4 KiB for them
    again: a plan of 512 x 2048 blocks took ~1,500 faults and 3.7 ms of system time (perf
    stat), and this copy alone 6.8 ms in one piece against 0.3 ms this way."""
    for i in range(0, rows.size, GATHER_ROWS):
        part = table[rows[i:i + GATHER_ROWS], :width]
        if out_rows is None:
            out[i:i + GATHER_ROWS, :width] = part
        else:
            out[out_rows[i:i + GATHER_ROWS], :width] = part


def _lens(name: str, lens, n: int) -> np.ndarray:
    """int64[n] of a sequence of lengths: integers >= 0, else an error naming ``name``."""
    a = np.asarray(lens)
    if a.size and a.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integer lengths, got {a.dtype} values")
    a = a.astype(np.int64).reshape(n)
    if (a < 0).any():
        raise ValueError(f"{name}: expected values >= 0, got {int(a.min())}")
    return a


def _query_positions(ctx: np.ndarray, ql: np.ndarray, cu: np.ndarray):
    """:func:`~prefixkv.paged.spec.query_positions` from the batch's context lengths (int64,
    kv_lens < 2**31 checked): i32 (sequence index, absolute position) per query token, the
    one-sequence and decode batches without the general path's gathers."""
    n, total = len(ql), int(cu[-1])
    if n == 1:
        return (np.zeros(total, dtype=I32),
                np.arange(int(ctx[0]), int(ctx[0]) + total, dtype=I32))
    if total == n and (ql == 1).all():  # decode: one token each, at its context length
        return np.arange(n, dtype=I32), ctx.astype(I32)
    seq = np.repeat(np.arange(n, dtype=I32), ql)
    # token j of sequence s is at ctx[s] + (j - cu[s]): one repeat of ctx - cu
    pos = np.arange(total, dtype=I32)
    pos += np.repeat((ctx - cu[:-1]).astype(I32), ql)
    return seq, pos


def plan_batch(block_lists: Sequence[Sequence[int]], context_lens: Sequence[int],
               q_lens: Sequence[int], block_size: int, *, shared_prefix: bool = True,
               min_prefix_blocks: int = 1, min_group_size: int = 2) -> BatchPlan:
    """Metadata of a step.

    block_lists: per sequence, its block ids in order (at least ceil(kv_len / block_size)).
    context_lens: per sequence, tokens already in the cache before this step.
    q_lens: per sequence, tokens computed (and written) this step.
    shared_prefix: look for shared-prefix groups (``BatchPlan.shared``).
    min_prefix_blocks / min_group_size: the smallest prefix (blocks) and group worth a group.
    """
    min_prefix_blocks = check_int("min_prefix_blocks", min_prefix_blocks, 1)
    min_group_size = check_int("min_group_size", min_group_size, 2)
    n = len(block_lists)
    if len(context_lens) != n or len(q_lens) != n:
        raise ValueError(f"context_lens/q_lens: expected {n} entries (one per sequence), got "
                         f"{len(context_lens)} and {len(q_lens)}")
    block_size = check_int("block_size", block_size, 1)
    check_int32("block_size", block_size, "int32 slots")
    ctx = _lens("context_lens", context_lens, n)
    ql = _lens("q_lens", q_lens, n)
    kv = ctx + ql
    nblk = np.fromiter((len(b) for b in block_lists), dtype=np.int64, count=n)
    need = (kv + block_size - 1) // block_size
    if (nblk < need).any():
        s = int(np.argmax(nblk < need))
        raise ValueError(f"block_lists: sequence {s} has {int(nblk[s])} blocks, needs "
                         f"{int(need[s])} for kv_len {int(kv[s])}")
    tables = _table(block_lists)
    return _build_plan(block_lists, tables, ctx, ql, block_size, shared_prefix,
                       min_prefix_blocks, min_group_size)


def plan_checked_rows(rows: Sequence[np.ndarray], context_lens: list[int], q_lens: list[int],
                      block_size: int, *, shared_prefix: bool, min_prefix_blocks: int,
                      min_group_size: int) -> BatchPlan:
    """:func:`plan_batch` for a caller whose batch is valid by construction (PrefixCache):
    int32 rows of valid ids covering each sequence's kv_len, lengths >= 0, options checked.
    The checks cost more than the plan for a step of one request."""
    ctx = np.array(context_lens, dtype=np.int64)
    ql = np.array(q_lens, dtype=np.int64)
    return _build_plan(rows, _table(rows, checked_rows=True), ctx, ql, block_size,
                       shared_prefix, min_prefix_blocks, min_group_size)


def _build_plan(block_lists, tables: np.ndarray, ctx: np.ndarray, ql: np.ndarray,
                block_size: int, shared_prefix: bool, min_prefix_blocks: int,
                min_group_size: int) -> BatchPlan:
    """plan_batch's plan of a checked batch: ``tables`` the rows as _table gives them, ctx and
    ql int64 lengths >= 0."""
    n = len(ctx)
    kv = ctx + ql
    if kv.size and kv.max() >= 2**31:
        raise ValueError(f"context_lens/q_lens: a sequence of {int(kv.max())} tokens does not "
                         f"fit int32")
    cu = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(ql, out=cu[1:])
    seq, pos = _query_positions(ctx, ql, cu)
    # int32 arithmetic where no slot can pass int32 (the largest id's last slot fits), which
    # is every real cache; int64 with the check otherwise
    if tables.size and int(tables.max()) * block_size + block_size - 1 < 2**31:
        blk, off = np.divmod(pos, np.int32(block_size))
        slots = tables[seq, blk]
        slots *= np.int32(block_size)
        slots += off
    else:
        slots = tables[seq, pos // block_size].astype(np.int64) * block_size + pos % block_size
        if slots.size and slots.max() >= 2**31:
            raise ValueError(f"block_lists: slot {int(slots.max())} (block id * block_size + "
                             f"offset) does not fit int32")
        slots = slots.astype(I32)
    plan = BatchPlan(block_tables=tables, kv_lens=kv.astype(I32), cu_q_lens=cu.astype(I32),
                     slot_mapping=slots, positions=pos)
    if shared_prefix and n >= min_group_size:
        plan.shared = _shared_prefixes(block_lists, ctx, kv, block_size,
                                       min_prefix_blocks=min_prefix_blocks,
                                       min_group_size=min_group_size, table=tables,
                                       zero_padded=True)
    return plan


def _adjacent_lcp(table: np.ndarray, order: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """Blocks each row of ``order`` (row ids of ``table``) shares with the row before it (the
    first gets none), at most either row's ``eligible`` blocks (by row id). Rows are compared
    in chunks that double while they stay equal, so the work follows the prefixes actually
    shared, not the table's width; and GATHER_ROWS pairs at a time, so that no temporary grows
    to several MiB (see _gather_rows)."""
    a, b = order[:-1], order[1:]
    bound = np.minimum(eligible[a], eligible[b])
    lcp = np.zeros(order.size, dtype=np.int64)
    for lo in range(0, bound.size, GATHER_ROWS):
        active = lo + np.flatnonzero(bound[lo:lo + GATHER_ROWS] > 0)
        c0, step = 0, 16
        hi = min(lo + GATHER_ROWS, bound.size)
        while active.size:
            c1 = min(c0 + step, int(bound[active].max()))
            if 2 * active.size > hi - lo:  # most pairs still equal: read each row once
                part = table[order[lo:hi + 1], c0:c1]
                neq = (part[1:] != part[:-1])[active - lo]
            else:
                neq = table[a[active], c0:c1] != table[b[active], c0:c1]
            hit = neq.any(axis=1)
            lcp[active + 1] = np.where(hit, c0 + neq.argmax(axis=1), c1)
            active = active[~hit & (c1 < bound[active])]
            c0, step = c1, step * 2
    lcp[1:] = np.minimum(lcp[1:], bound)
    return lcp


def _past_cached(table: np.ndarray, order: np.ndarray, eligible: np.ndarray,
                 lcp: np.ndarray) -> bool:
    """Whether two neighbours of ``order`` still match where the first of them runs out of
    cached blocks (lcp at the bound, and the next block the same): only then can the order of
    whole rows split a group (find_shared_prefixes)."""
    a, b = order[:-1], order[1:]
    bound = np.minimum(eligible[a], eligible[b])
    at = np.flatnonzero((lcp[1:] == bound) & (bound < table.shape[1]))
    return bool(np.any(table[a[at], bound[at]] == table[b[at], bound[at]]))


def _sentinel_order(table: np.ndarray, cand: np.ndarray, elig: np.ndarray) -> np.ndarray:
    """The rows ``cand`` sorted by their cached blocks (``elig`` each), each ended by a value
    of its own (-1 - its position, never a block id)."""
    m, width = cand.size, int(elig.max())
    keys = np.empty((m, width + 1), dtype=I32)  # what follows a row's end is never read
    _gather_rows(keys, table, cand, width)
    keys[np.arange(m), elig] = -1 - np.arange(m, dtype=I32)
    return cand[np.argsort(keys.view(np.dtype((np.void, 4 * (width + 1)))).reshape(m),
                           kind="stable")]


def _choose(order: list[int], lcp: list[int], min_blocks: int, min_group: int
            ) -> tuple[int, list[tuple[int, list[int]]]]:
    """Best saving and groups [(depth, members)] of the rows ``order`` (sorted by their block
    ids; ``lcp[k]`` blocks shared by rows k-1 and k).

    The longest-common-prefix intervals of the order form a tree: a node's depth ``d`` is the
    least lcp inside it, its children its maximal subranges of deeper lcp. A node's best is
    its children's bests, or one group at depth ``d`` joining the children worth joining (the
    others keep their own groups). One pass over ``lcp`` with a stack builds the tree and
    solves each node when it closes, children first (a batch of n sequences each sharing one
    more block nests n deep: no recursion, and no work per level beyond the node's own
    children); the groups are read off the solved tree from the root.
    """
    n = len(order)
    # node: [depth, lo, hi, children, best saving, joins (None: no group; else the children
    # left out of it)]
    def close(node: list, hi: int) -> list:
        d, lo, _, kids = node[:4]
        node[2] = hi
        own_total = sum(k[4] for k in kids)
        node[4], node[5] = own_total, None
        if d >= min_blocks:
            out = [k for k in kids if (k[2] - k[1]) * d < k[4]]
            m = hi - lo - sum(k[2] - k[1] for k in out)
            rest_total = sum(k[4] for k in out)
            if m >= min_group and (m - 1) * d + rest_total > own_total:
                node[4], node[5] = (m - 1) * d + rest_total, out
        return node

    stack = [[0, 0, n, [], 0, None]]
    for k in range(1, n + 1):
        cur = lcp[k] if k < n else 0
        lo, last = k - 1, None
        while cur < stack[-1][0]:
            last = close(stack.pop(), k)
            lo = last[1]
            if cur <= stack[-1][0]:
                stack[-1][3].append(last)
                last = None
        if cur > stack[-1][0]:
            stack.append([cur, lo, n, [last] if last is not None else [], 0, None])
    root = close(stack[0], n)
    groups: list[tuple[int, list[int]]] = []
    todo = [root]
    while todo:
        node = todo.pop()
        d, lo, hi, kids, _, out = node
        if out is None:
            todo.extend(kids)
            continue
        members, pos = [], lo
        for k in sorted(out, key=lambda k: k[1]):
            members += order[pos:k[1]]
            pos = k[2]
        members += order[pos:hi]
        groups.append((d, members))
        todo.extend(out)
    return root[4], groups


def find_shared_prefixes(block_lists: Sequence[Sequence[int]], context_lens, kv_lens,
                         block_size: int, *, min_prefix_blocks: int = 1,
                         min_group_size: int = 2, table: np.ndarray | None = None
                         ) -> SharedPrefixPlan | None:
    """Shared-prefix groups of a batch (see the module docstring); None when there are none.

    table: the batch's block_tables (``_table(block_lists)``) when the caller has it; what
    lies past a row's blocks is not read into the plan.
    Checked as :func:`plan_batch` checks its lengths: ``0 <= context_lens[s] <= kv_lens[s] <=
    len(block_lists[s]) * block_size``, else an error naming the argument.
    """
    min_prefix_blocks = check_int("min_prefix_blocks", min_prefix_blocks, 1)
    min_group_size = check_int("min_group_size", min_group_size, 2)
    block_size = check_int("block_size", block_size, 1)
    n = len(block_lists)
    for name, lens in (("context_lens", context_lens), ("kv_lens", kv_lens)):
        if np.shape(lens) != (n,):
            raise ValueError(f"{name}: expected {n} entries (one per sequence), got shape "
                             f"{np.shape(lens)}")
    ctx, kv = _lens("context_lens", context_lens, n), _lens("kv_lens", kv_lens, n)
    if (kv < ctx).any():
        s = int(np.argmax(kv < ctx))
        raise ValueError(f"kv_lens: sequence {s} has kv_len {int(kv[s])} < its context_len "
                         f"{int(ctx[s])} (kv_lens count the cached tokens and this step's)")
    nblk = np.fromiter(map(len, block_lists), np.int64, count=n)
    if (kv > nblk * block_size).any():
        s = int(np.argmax(kv > nblk * block_size))
        raise ValueError(f"block_lists: sequence {s} has {int(nblk[s])} blocks, too few for "
                         f"kv_len {int(kv[s])}")
    if table is not None:
        width = int(nblk.max(initial=0))
        if (not isinstance(table, np.ndarray) or table.ndim != 2 or table.shape[0] < n
                or table.shape[1] < width or table.dtype.kind not in "iu"):
            raise ValueError(f"table: expected an integer array of at least {n} rows and "
                             f"{width} columns (the batch's block_tables), got "
                             f"{getattr(table, 'dtype', type(table).__name__)} of shape "
                             f"{np.shape(table)}")
        if n and width and table[:n, :width].min() < 0:
            raise ValueError(f"table: expected block ids >= 0, got "
                             f"{int(table[:n, :width].min())}")
    return _shared_prefixes(block_lists, ctx, kv, block_size,
                            min_prefix_blocks=min_prefix_blocks, min_group_size=min_group_size,
                            table=table, zero_padded=False)


def _shared_prefixes(block_lists, context_lens, kv_lens, block_size: int, *,
                     min_prefix_blocks: int, min_group_size: int, table: np.ndarray | None,
                     zero_padded: bool) -> SharedPrefixPlan | None:
    """find_shared_prefixes; ``zero_padded``: ``table`` holds 0 past each row's blocks (as
    _table builds it), so the plan's tables need no masking."""
    n = len(block_lists)
    ctx = np.asarray(context_lens, dtype=np.int64).reshape(n)
    kv = np.asarray(kv_lens, dtype=np.int64).reshape(n)
    nblk = np.fromiter(map(len, block_lists), np.int64, count=n)
    eligible = np.minimum(ctx // block_size, nblk)
    min_blocks = max(min_prefix_blocks, 1)
    min_group = max(min_group_size, 2)
    cand = np.flatnonzero(eligible >= min_blocks)
    if cand.size < min_group:
        return None
    if table is None:
        table, zero_padded = _table(block_lists), True
    # a group's members share their first block: rows whose first block fewer than min_group
    # candidates have are in none (a batch with no sharing stops here, reading one column)
    _, inv, counts = np.unique(table[cand, 0], return_inverse=True, return_counts=True)
    cand = cand[counts[inv.reshape(-1)] >= min_group]
    if cand.size < min_group:
        return None
    # Sorted by their bytes (memcmp, stopping at the first difference), the rows that share
    # their first k blocks sit together: their first 4k bytes are the same. The table's own rows
    # are sorted first, as they are (no copy); that order is exact unless a row's blocks past
    # its cached ones (this step's) match a neighbour's cached ones, which could put it between
    # two rows sharing more than it may; then each row is ended by a value of its own after
    # its cached blocks (_sentinel_order), so a row whose cached blocks end sooner never sits
    # between two that share more.
    tab = np.ascontiguousarray(table, dtype=I32)
    full = np.argsort(tab.view(np.dtype((np.void, 4 * tab.shape[1]))).reshape(len(tab)),
                      kind="stable")
    pick = np.zeros(len(tab), dtype=bool)
    pick[cand] = True
    order = full[pick[full]]
    lcp = _adjacent_lcp(tab, order, eligible)
    if _past_cached(tab, order, eligible, lcp):
        order = _sentinel_order(tab, cand, eligible[cand])
        lcp = _adjacent_lcp(tab, order, eligible)
    saved, groups = _choose(order.tolist(), lcp.tolist(), min_blocks, min_group)
    if not groups:
        return None
    groups.sort(key=lambda g: min(g[1]))
    prefix_ids = np.full(n, -1, dtype=I32)
    depth = np.zeros(n, dtype=np.int64)
    for gi, (d, members) in enumerate(groups):
        prefix_ids[members] = gi
        depth[members] = d
    ptab = np.zeros((len(groups), max(d for d, _ in groups)), dtype=I32)
    for gi, (d, members) in enumerate(groups):
        ptab[gi, :d] = table[members[0], :d]
    # own blocks after the prefix: each row shifted left by its depth, padded with block 0
    own = nblk - depth
    w = max(int(own.max()), 1)
    rest = np.zeros((n, w), dtype=I32)
    for d in np.unique(depth).tolist():  # one slice per prefix length
        k = min(w, table.shape[1] - d)
        rows = np.flatnonzero(depth == d)
        if rows.size == n:
            rest[:, :k] = table[:, d:d + k]
        else:
            _gather_rows(rest, table[:, d:d + k], rows, k, out_rows=rows)
    if not zero_padded:  # else the table's own zeros came along
        rest[np.arange(w)[None, :] >= own[:, None]] = 0
    return SharedPrefixPlan(
        prefix_block_tables=ptab,
        prefix_lens=np.asarray([d * block_size for d, _ in groups], dtype=I32),
        prefix_ids=prefix_ids,
        block_tables=rest,
        kv_lens=(kv - depth * block_size).astype(I32),
        saved_block_reads=int(saved))
