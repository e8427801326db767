"""Batch planner: block_tables / kv_lens / cu_q_lens / slot_mapping, and shared-prefix groups
that give shared_prefix_attention arguments equal (through the reference) to paged_attention
over the full tables."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prefixkv.paged import spec, validate
from prefixkv.paged.csr import block_tables_from_csr, csr_from_block_tables
from prefixkv.paged.hashing import hash_blocks
from prefixkv.paged.planner import (
    find_shared_prefixes,
    kv_splits,
    max_prefix_split_rows,
    plan_batch,
    prefix_kv_splits,
)
from prefixkv.paged.reference import paged_attention_reference, shared_prefix_attention_reference
from prefixkv.paged.reference.attention import shared_prefix_block_tables


def test_metadata_hand_worked():
    # seq 0: blocks [5, 2], 3 cached tokens, 2 new -> positions 3, 4
    #   slots 5*4+3 = 23, 2*4+0 = 8
    # seq 1: blocks [7], decode at position 0 -> slot 28
    plan = plan_batch([[5, 2], [7]], [3, 0], [2, 1], 4)
    assert plan.block_tables.tolist() == [[5, 2], [7, 0]]   # padded with the null block
    assert plan.kv_lens.tolist() == [5, 1] and plan.cu_q_lens.tolist() == [0, 2, 3]
    assert plan.slot_mapping.tolist() == [23, 8, 28] and plan.positions.tolist() == [3, 4, 0]
    for a in (plan.block_tables, plan.kv_lens, plan.cu_q_lens, plan.slot_mapping, plan.positions):
        assert a.dtype == np.int32
    assert plan.shared is None and plan.num_seqs == 2 and plan.num_tokens == 3


def test_spec_query_positions_hand_worked():
    # kv_lens [5, 1, 4], q_lens [2, 1, 0]: seq 0's tokens sit at 5-2+0 = 3 and 4, seq 1's at 0
    seq, pos = spec.query_positions(np.array([5, 1, 4]), np.array([0, 2, 3, 3]))
    assert seq.tolist() == [0, 0, 1] and pos.tolist() == [3, 4, 0]
    assert seq.dtype == pos.dtype == np.int32
    assert spec.decode_cu_q_lens(3).tolist() == [0, 1, 2, 3]


def test_empty_batch_and_zero_q():
    plan = plan_batch([], [], [], 4)
    assert plan.block_tables.shape == (0, 1) and plan.cu_q_lens.tolist() == [0]
    plan = plan_batch([[3]], [2], [0], 4)
    assert plan.slot_mapping.size == 0 and plan.kv_lens.tolist() == [2]


@pytest.mark.parametrize("args, match", [
    (([[1]], [0, 1], [1], 4), "context_lens/q_lens: expected 1 entries"),
    (([[1]], [-1], [1], 4), "context_lens: expected values >= 0, got -1"),
    (([[1]], [3], [2], 4), "block_lists: sequence 0 has 1 blocks, needs 2 for kv_len 5"),
    # int32 metadata: values past it had wrapped (a negative slot: the write dropped)
    (([[2**28]], [3], [1], 8), r"block_lists: slot 2147483651 \(block id \* block_size"),
    (([[2**31 + 5]], [1], [1], 4), r"block_lists: expected block ids in \[0, 2\*\*31\)"),
    (([[-1]], [1], [1], 4), r"block_lists: expected block ids in \[0, 2\*\*31\)"),
    (([list(range(1025))], [2**31], [1], 2**21),
     "context_lens/q_lens: a sequence of 2147483649 tokens does not fit int32"),
], ids=["count", "negative", "short", "slot-past-int32", "id-past-int32", "negative-id",
        "kv-past-int32"])
def test_plan_checks(args, match):
    with pytest.raises(ValueError, match=match):
        plan_batch(*args)


@pytest.mark.parametrize("args, exc, match", [
    (([[1]], [1], [1], 4.0), TypeError, "block_size: expected an int, got 4.0"),
    (([[1]], [1], [1], None), TypeError, "block_size: expected an int, got None"),
    (([[1]], [1], [1], True), TypeError, "block_size: expected an int, got True"),
    (([[1]], [4.9], [1], 8), TypeError, "context_lens: expected integer lengths, got float64"),
    (([[1]], [1], [1.9], 8), TypeError, "q_lens: expected integer lengths, got float64"),
    (([[1.7, 2.9]], [9], [1], 8), TypeError, "block_lists: expected integer block ids"),
    (([np.array([1.5])], [1], [1], 8), TypeError,
     r"block_lists\[0\]: expected integer block ids, got float64"),
], ids=["float-bs", "none-bs", "bool-bs", "float-ctx", "float-q", "float-ids", "float-array"])
def test_plan_argument_types(args, exc, match):
    """Floats had been truncated silently (block ids 1.7 -> 1, lengths 4.9 -> 4)."""
    with pytest.raises(exc, match=match):
        plan_batch(*args)


_ROWS = [[3, 4, 5], [3, 4, 6]]


@pytest.mark.parametrize("args, kwargs, exc, match", [
    ((_ROWS, [8, 8], [9], 4), {}, ValueError, r"kv_lens: expected 2 entries .*shape \(1,\)"),
    ((_ROWS, [8], [9, 9], 4), {}, ValueError, "context_lens: expected 2 entries"),
    ((_ROWS, [8, 8], [9, 9], 0), {}, ValueError, "block_size: expected an int >= 1, got 0"),
    ((_ROWS, [8, 8], [9, 9], -4), {}, ValueError, "block_size: expected an int >= 1, got -4"),
    ((_ROWS, [8, 8], [9, 9], 4.0), {}, TypeError, "block_size: expected an int, got 4.0"),
    ((_ROWS, [8, 8], [1, 9], 4), {}, ValueError, "kv_lens: sequence 0 has kv_len 1 < its "
                                                 "context_len 8"),
    ((_ROWS, [-8, 8], [9, 9], 4), {}, ValueError, "context_lens: expected values >= 0"),
    ((_ROWS, [8, 8], [9, 400], 4), {}, ValueError, "block_lists: sequence 1 has 3 blocks, too "
                                                   "few for kv_len 400"),
    ((_ROWS, [8, 8], [9, 9], 4), {"table": np.array([[3, 4, 5]], np.int32)}, ValueError,
     "table: expected an integer array of at least 2 rows"),
    ((_ROWS, [8, 8], [9, 9], 4), {"table": np.array([[-1, 4, 5], [3, 4, 6]], np.int32)},
     ValueError, "table: expected block ids >= 0, got -1"),
], ids=["kv-count", "ctx-count", "bs-0", "bs-negative", "bs-float", "kv-under-ctx",
        "ctx-negative", "kv-past-blocks", "table-rows", "table-negative"])
def test_find_shared_prefixes_checks_its_arguments(args, kwargs, exc, match):
    """The public find_shared_prefixes checks its batch as plan_batch does: it had raised a
    numpy reshape error naming nothing, warned of a division by zero (block_size=0), returned
    None for block_size=-4, and returned plans with negative own lengths (kv_lens under the
    context) or own lengths past the rows' blocks."""
    assert find_shared_prefixes(_ROWS, [8, 8], [9, 9], 4) is not None  # the valid batch
    with pytest.raises(exc, match=match):
        find_shared_prefixes(*args, **kwargs)


def test_one_group():
    blocks = [[1, 2, 3, 10 + i] for i in range(4)]
    s = find_shared_prefixes(blocks, [12, 13, 14, 15], [13, 14, 15, 16], 4)
    assert s.prefix_block_tables.tolist() == [[1, 2, 3]] and s.prefix_lens.tolist() == [12]
    assert s.prefix_ids.tolist() == [0, 0, 0, 0] and s.saved_block_reads == 9
    assert s.block_tables.tolist() == [[10], [11], [12], [13]]
    assert s.kv_lens.tolist() == [1, 2, 3, 4]


def test_nested_prefixes_pick_the_larger_saving():
    # 8 sequences share blocks [1, 2]; seqs 0-3 also share [3..10] (10 blocks in all).
    # one group of 8 at depth 2 saves 7*2 = 14; groups {0-3} at 10 and {4-7} at 2 save
    # 3*10 + 3*2 = 36: the planner takes the latter.
    long_ = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    blocks = [long_ + [20 + i] for i in range(4)] + [[1, 2, 30 + i] for i in range(4)]
    ctx = [40] * 4 + [8] * 4
    s = find_shared_prefixes(blocks, ctx, [c + 1 for c in ctx], 4)
    assert s.saved_block_reads == 36
    assert sorted(s.prefix_lens.tolist()) == [8, 40]
    assert len(set(s.prefix_ids[:4].tolist())) == 1 and len(set(s.prefix_ids[4:].tolist())) == 1
    assert s.prefix_ids[0] != s.prefix_ids[4]


def test_nested_prefixes_small_inner_group_joins_outer():
    # 6 share [1..5]; 2 of them share one more block: 5*5 = 25 > 1*6 + 3*5 = 21.
    blocks = [[1, 2, 3, 4, 5, 6, 40 + i] for i in range(2)] + [[1, 2, 3, 4, 5, 50 + i]
                                                                for i in range(4)]
    ctx = [24] * 2 + [20] * 4
    s = find_shared_prefixes(blocks, ctx, [c + 1 for c in ctx], 4)
    assert s.saved_block_reads == 25 and s.prefix_ids.tolist() == [0] * 6
    assert s.prefix_lens.tolist() == [20]


def test_deeply_nested_prefixes_do_not_recurse():
    """Sequence k shares the first k blocks of one chain: the prefix tree nests as deep as
    the batch (it raised RecursionError from ~400 sequences when it recursed)."""
    n = 1500
    blocks = [list(range(1, k + 1)) + [n + k] for k in range(1, n + 1)]
    ctx = [4 * k for k in range(1, n + 1)]
    s = find_shared_prefixes(blocks, ctx, [c + 1 for c in ctx], 4)
    # every sequence shares block 1 at least; the best plan saves at least a group at depth 1
    assert s is not None and s.saved_block_reads >= n - 1
    members = s.prefix_ids >= 0
    for p, length in enumerate(s.prefix_lens.tolist()):  # a group's prefix is its members'
        for i in np.flatnonzero(s.prefix_ids == p):
            assert blocks[i][:length // 4] == s.prefix_block_tables[p, :length // 4].tolist()
    assert members.sum() >= 2


@pytest.mark.parametrize("perm", [(0, 1, 2), (2, 0, 1), (1, 2, 0), (2, 1, 0)])
def test_a_row_with_fewer_cached_blocks_never_splits_a_deeper_group(perm):
    """Row 2 holds the same first blocks as rows 0 and 1 but has cached only its first one;
    by block ids alone it sorts between them. The two others still share 4 blocks."""
    rows = [[1, 2, 3, 4, 20], [1, 2, 3, 4, 30], [1, 2, 3, 4, 25]]
    ctx = [16, 16, 4]
    blocks, c = [rows[i] for i in perm], [ctx[i] for i in perm]
    s = find_shared_prefixes(blocks, c, [x + 1 for x in c], 4)
    assert s is not None and s.saved_block_reads == 4 and s.prefix_lens.tolist() == [16]
    assert sorted(np.flatnonzero(s.prefix_ids == 0).tolist()) == sorted(
        perm.index(i) for i in (0, 1))



def test_a_row_with_fewer_cached_blocks_never_splits_rows_cached_to_their_end():
    """Rows 0 and 2-4 have cached all their blocks (no query this step), row 1 the same blocks
    but one fewer: the four share 3 blocks (9 reads saved), more than all five share 2 (8)."""
    s = find_shared_prefixes([[0, 1, 2]] * 5, [12, 8, 12, 12, 12], [12, 9, 12, 12, 12], 4)
    assert s.prefix_lens.tolist() == [12] and s.prefix_ids.tolist() == [0, -1, 0, 0, 0]
    assert s.saved_block_reads == 9

def test_prefix_only_over_cached_blocks():
    # same physical blocks, but seq 1 computes its tokens this step: it has no cached block
    assert find_shared_prefixes([[1, 2, 3], [1, 2, 4]], [8, 0], [9, 8], 4) is None
    # a prefix is cut at the shortest member's cached blocks
    s = find_shared_prefixes([[1, 2, 3, 7], [1, 2, 3]], [12, 5], [13, 9], 4)
    assert s.prefix_lens.tolist() == [4] and s.kv_lens.tolist() == [9, 5]


def test_same_tokens_other_blocks_no_group_and_thresholds():
    assert find_shared_prefixes([[1, 2, 5], [3, 4, 6]], [8, 8], [9, 9], 4) is None
    assert find_shared_prefixes([[1, 2, 5], [1, 4, 6]], [8, 8], [9, 9], 4,
                                min_prefix_blocks=2) is None
    assert find_shared_prefixes([[1, 2, 5], [1, 4, 6]], [8, 8], [9, 9], 4,
                                min_group_size=3) is None


@st.composite
def batches(draw):
    block_size = draw(st.sampled_from([1, 4, 16]))
    num_prefix_blocks = draw(st.integers(0, 6))
    pool = list(range(1, 200))
    prefix = pool[:num_prefix_blocks]
    nxt = num_prefix_blocks + 1
    n = draw(st.integers(1, 6))
    lists, ctx, q = [], [], []
    for _ in range(n):
        share = draw(st.integers(0, num_prefix_blocks))
        own = draw(st.integers(1, 4))
        blocks = prefix[:share] + list(range(nxt, nxt + own))
        nxt += own
        cap = len(blocks) * block_size
        qlen = draw(st.integers(1, cap))
        c = draw(st.integers(0, cap - qlen))
        lists.append(blocks)
        ctx.append(c)
        q.append(qlen)
    return lists, ctx, q, block_size


@given(batches(), st.integers(0, 2**31 - 1))
def test_shared_prefix_plan_matches_paged_attention(batch, seed):
    lists, ctx, q, bs = batch
    plan = plan_batch(lists, ctx, q, bs)
    rng = np.random.default_rng(seed)
    nb, hq, hk, d = 200, 2, 1, 8
    k = rng.standard_normal((nb, bs, hk, d)).astype(np.float32)
    v = rng.standard_normal((nb, bs, hk, d)).astype(np.float32)
    qt = rng.standard_normal((plan.num_tokens, hq, d)).astype(np.float32)
    # the metadata itself: slots of positions ctx .. ctx + q - 1
    for s in range(len(lists)):
        lo, hi = plan.cu_q_lens[s], plan.cu_q_lens[s + 1]
        want = spec.slots_for_positions(plan.block_tables[s], np.arange(ctx[s], ctx[s] + q[s]),
                                        bs)
        np.testing.assert_array_equal(plan.slot_mapping[lo:hi], want)
    want = paged_attention_reference(qt, k, v, plan.block_tables, plan.kv_lens, plan.cu_q_lens)
    if plan.shared is None:
        return
    sh = plan.shared
    sdims = validate.check_shared_prefix_attention(
        qt, k, v, sh.prefix_block_tables, sh.prefix_lens, sh.prefix_ids, sh.block_tables,
        sh.kv_lens, plan.cu_q_lens)
    validate.check_shared_prefix_attention_values(sdims, sh.prefix_block_tables, sh.prefix_lens,
                                                  sh.prefix_ids, sh.block_tables, sh.kv_lens,
                                                  plan.cu_q_lens)
    tables, lens = shared_prefix_block_tables(sh.prefix_block_tables, sh.prefix_lens,
                                              sh.prefix_ids, sh.block_tables, sh.kv_lens, bs)
    np.testing.assert_array_equal(lens, plan.kv_lens)
    for s, kv in enumerate(plan.kv_lens):
        used = -(-int(kv) // bs)
        np.testing.assert_array_equal(tables[s, :used], plan.block_tables[s, :used])
    groups = {}
    for s, p in enumerate(sh.prefix_ids.tolist()):
        if p >= 0:
            groups.setdefault(p, []).append(s)
    assert all(len(m) >= 2 for m in groups.values())
    assert sh.saved_block_reads == sum((len(m) - 1) * int(sh.prefix_lens[p]) // bs
                                       for p, m in groups.items())
    got = shared_prefix_attention_reference(qt, k, v, sh.prefix_block_tables, sh.prefix_lens,
                                            sh.prefix_ids, sh.block_tables, sh.kv_lens,
                                            plan.cu_q_lens)
    atol, rtol = spec.ATTENTION_TOLERANCE["float32"]
    np.testing.assert_allclose(got, want, atol=atol, rtol=rtol)



@st.composite
def tangled_batches(draw):
    """Batches of rows drawn from a small trie of block ids, each row cached up to a point of
    its own: the blocks a row has not cached yet may be ones its neighbours have cached, which
    the planner's sort of whole rows cannot order (it then sorts by cached blocks only)."""
    block_size = draw(st.sampled_from([1, 4]))
    n = draw(st.integers(2, 9))
    lists, ctx, q = [], [], []
    for _ in range(n):
        length = draw(st.integers(1, 7))
        blocks = [draw(st.integers(0, 2)) * 10 + i for i in range(length)]  # 3 branches a level
        cached = draw(st.integers(0, length))  # all of them: a row with no query (q 0)
        lists.append(blocks)
        ctx.append(cached * block_size + (draw(st.integers(0, block_size - 1))
                                          if cached < length else 0))
        q.append(draw(st.integers(0 if cached == length else 1, 3)))
        lists[-1] = blocks + [100 + len(lists)] * (-(-(ctx[-1] + q[-1]) // block_size)
                                                   - length)
    return lists, ctx, q, block_size


def _same_plan(a, b):
    assert (a is None) == (b is None)
    if a is not None:
        for name in ("prefix_block_tables", "prefix_lens", "prefix_ids", "block_tables",
                     "kv_lens"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        assert a.saved_block_reads == b.saved_block_reads


@given(tangled_batches(), st.integers(1, 3), st.integers(2, 3))
def test_sorting_whole_rows_gives_the_plan_of_sorting_cached_blocks(batch, min_blocks,
                                                                    min_group):
    """The planner sorts the table's rows as they are when that order is exact, else by each
    row's cached blocks alone: both give the same plan (the second forced here), from
    plan_batch's zero-padded table and from a caller's table with other ids past each row."""
    from prefixkv.paged import planner

    lists, ctx, q, bs = batch
    kv = [c + x for c, x in zip(ctx, q, strict=True)]
    kw = dict(min_prefix_blocks=min_blocks, min_group_size=min_group)
    got = plan_batch(lists, ctx, q, bs, **kw).shared
    table = planner._table(lists)
    padded = table.copy()  # with other block ids past each row's blocks
    for i, row in enumerate(lists):
        padded[i, len(row):] = 7
    from_caller = find_shared_prefixes(lists, ctx, kv, bs, table=padded, **kw)
    real = planner._past_cached
    try:
        planner._past_cached = lambda *args: True
        want = find_shared_prefixes(lists, ctx, kv, bs, **kw)
    finally:
        planner._past_cached = real
    _same_plan(got, want)
    _same_plan(from_caller, want)


def test_whole_rows_are_sorted_as_they_are_when_no_row_runs_past_its_cached_blocks(
        monkeypatch):
    """A decode batch's rows differ after their cached blocks (each writes its own block):
    no sorted copy of the table is made."""
    from prefixkv.paged import planner

    def refuse(*args):
        raise AssertionError("sorted a copy")

    monkeypatch.setattr(planner, "_sentinel_order", refuse)
    rows = [[1, 2, 3, 10 + i] for i in range(6)] + [[1, 2, 20 + i] for i in range(3)]
    plan = plan_batch(rows, [12] * 6 + [8] * 3, [1] * 9, 4)
    assert plan.shared.prefix_lens.tolist() == [12, 8] and plan.shared.saved_block_reads == 19

def test_kv_splits_of_the_cascade_prefix_pass():
    """The prefix launch of 64 decode queries over one 32768-token prefix (32 q / 8 kv heads,
    16 tokens a tile: 5 tiles x 8 heads = 40 programs for 132 SMs) splits in 27 on the torch
    frontend (~8 programs per SM), 6 on the JAX one (~2); the workspace rows cover every
    smaller batch with any number of prefixes (fewer tiles split more)."""
    assert prefix_kv_splits(40, 32768, 132) == 27 and kv_splits(40, 32768, 132) == 6
    assert prefix_kv_splits(40, 4096, 132) == 4  # 1024 keys a split at least
    assert prefix_kv_splits(132, 32768, 132) == 1 and prefix_kv_splits(8, 2000, 132) == 1
    assert kv_splits(132, 32768, 132) == 1 and kv_splits(8, 1000, 132) == 1
    for tokens, heads, tile, max_kv in [(64, 8, 16, 32768), (7, 2, 16, 3072), (300, 1, 8, 4096),
                                        (1, 8, 16, 65536), (50, 40, 16, 8192)]:
        rows = max_prefix_split_rows(tokens, heads, tile, max_kv, 132)
        need = 0
        for n in range(1, tokens + 1):
            for prefixes in range(1, 5):
                s = prefix_kv_splits((-(-n // tile) + prefixes) * heads, max_kv, 132)
                need = max(need, s * n if s > 1 else 0)
        assert rows == need, (tokens, heads, tile, max_kv)


def test_a_callers_table_with_rows_past_the_batch():
    """A caller's table may be a persistent buffer with more rows than the batch: only the
    batch's rows are grouped."""
    rows = [[1, 2, 3], [1, 2, 4], [5, 6, 7]]
    table = np.array(rows + [[1, 2, 3], [1, 2, 3]], np.int32)
    s = find_shared_prefixes(rows, [8] * 3, [9] * 3, 4, table=table)
    assert s.prefix_lens.tolist() == [8] and s.prefix_ids.tolist() == [0, 0, -1]
    assert s.block_tables.tolist() == [[3, 0, 0], [4, 0, 0], [5, 6, 7]]
    assert s.kv_lens.tolist() == [1, 1, 9]


def test_array_rows_are_range_checked_as_lists_are():
    """Array rows (numpy, any integer dtype) are refused by name outside [0, 2**31), as list
    rows are. They had been cast to int32 as they were: -5 gave negative slots (write_kv skips
    them: KV silently lost), 2**31 wrapped to a slot of block 0, and 2**32 + 5 and 5 formed a
    shared-prefix group over two different blocks (found by a fuzzer)."""
    bad = [[np.array([-5, 1])], [np.array([2**31, 1], np.int64)],
           [np.array([2**32 + 5, 7], np.int64), np.array([5, 8], np.int64)],
           [np.array([1, 2], np.int32), np.array([-1, 3], np.int32)],
           [np.array([3, 2**31], np.uint32)]]
    for rows in bad:
        with pytest.raises(ValueError, match=r"block_lists: expected block ids in \[0, 2\*\*31\)"):
            plan_batch(rows, [0] * len(rows), [2] * len(rows), 2)
    plan = plan_batch([np.array([2**31 - 1], np.int64), np.array([4], np.uint8)], [0, 0],
                      [1, 1], 1)
    assert plan.block_tables[:, 0].tolist() == [2**31 - 1, 4]


def test_plan_arguments_are_checked_by_name():
    """min_prefix_blocks / min_group_size had been passed through max() (a str raised a bare
    TypeError, -5 and 1.5 passed); a block_size past int32 raised an OverflowError naming
    nothing (found by a fuzzer)."""
    args = ([[1, 2], [1, 3]], [2, 2], [1, 1], 1)
    cases = (({"min_prefix_blocks": "2"}, TypeError, "min_prefix_blocks: expected an int"),
             ({"min_prefix_blocks": 0}, ValueError, "min_prefix_blocks: expected an int >= 1"),
             ({"min_group_size": None}, TypeError, "min_group_size: expected an int"),
             ({"min_group_size": 1}, ValueError, "min_group_size: expected an int >= 2"),
             ({"min_group_size": 2.5}, TypeError, "min_group_size: expected an int"))
    for kw, exc, match in cases:
        with pytest.raises(exc, match=match):
            plan_batch(*args, **kw)
        with pytest.raises(exc, match=match):
            find_shared_prefixes(args[0], [2, 2], [3, 3], 1, **kw)
    for huge in (2**31, 2**63):
        with pytest.raises(ValueError, match=r"block_size: expected at most 2\*\*31 - 1"):
            plan_batch([[1]], [0], [1], huge)
        with pytest.raises(ValueError, match=r"block_size: expected at most 2\*\*31 - 1"):
            csr_from_block_tables(np.zeros((1, 1), np.int32), np.array([1], np.int32), huge)
        with pytest.raises(ValueError, match=r"block_size: expected at most 2\*\*31 - 1"):
            block_tables_from_csr([0, 1], [3], [1], huge)
        with pytest.raises(ValueError, match=r"block_size: expected at most 2\*\*31 - 1"):
            hash_blocks(np.arange(4, dtype=np.int32), huge)


def test_the_prefix_caches_unchecked_plan_is_plan_batch():
    """plan_checked_rows (PrefixCache's batches, valid by construction) gives plan_batch's
    plan: decode, one-sequence and ragged batches, shared-prefix groups included."""
    from prefixkv.paged.planner import plan_checked_rows

    rng = np.random.default_rng(12)
    for _ in range(400):
        n, bs = int(rng.integers(0, 7)), int(rng.choice([1, 4, 16]))
        ctx = rng.integers(0, 50, n)
        ql = np.ones(n, np.int64) if rng.random() < 0.3 else rng.integers(0, 20, n)
        common = rng.integers(1, 500, 2).tolist()
        rows = [np.asarray(common + rng.integers(1, 500, -(-int(c + q) // bs)).tolist(),
                           np.int32) for c, q in zip(ctx, ql, strict=True)]
        kw = {"shared_prefix": True, "min_prefix_blocks": 1, "min_group_size": 2}
        want = plan_batch(rows, ctx.tolist(), ql.tolist(), bs, **kw)
        got = plan_checked_rows(rows, ctx.tolist(), ql.tolist(), bs, **kw)
        for f in ("block_tables", "kv_lens", "cu_q_lens", "slot_mapping", "positions"):
            a, b = getattr(want, f), getattr(got, f)
            assert a.dtype == b.dtype and a.shape == b.shape and (a == b).all(), f
        assert (want.shared is None) == (got.shared is None)
        if want.shared is not None:
            for f in ("prefix_block_tables", "prefix_lens", "prefix_ids", "block_tables",
                      "kv_lens"):
                assert (getattr(want.shared, f) == getattr(got.shared, f)).all(), f
