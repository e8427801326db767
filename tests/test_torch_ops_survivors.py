"""Contracts of the PyTorch wrappers (torch_frontend/_ops.py) that the mutants left over from
its mutation review showed unpinned by the whole torch test set: the sliding-window cascade's
prefix-then-own tables (prefix ids past the prefixes or below -1 read no prefix, kv_lens
saturating at the int32 limit, a prefix table of no columns, sequences of no own blocks),
swap_blocks with one (src, dst) pair listed twice, write_kv refusing two rows for one slot,
and the block-contiguity each block op reports to the backend registry (what lets the Triton
kernels run on a view of a stacked cache; zero-block caches included). The numpy reference is
the oracle."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from prefixkv.paged import reference as ref  # noqa: E402
from prefixkv.paged import testing  # noqa: E402
from prefixkv.paged.validate import value_checks  # noqa: E402
from prefixkv.torch_frontend import _ops  # noqa: E402
from torch_convert import N, T, close  # noqa: E402

from prefixkv import torch_frontend as tf  # noqa: E402

I32 = dict(dtype=torch.int32)


def _i32(values):
    return torch.tensor(values, **I32)


# --------------------------------------------------- the windowed cascade's joined tables


def _joined(pids, kv_lens, own=None):
    """_ops._prefix_then_own_tables over two prefixes of 3 and 1 blocks (block_size 4)."""
    ptab = _i32([[7, 8, 9], [4, 0, 0]])
    plens = _i32([12, 4])
    own = _i32([[1, 2]] * len(pids)) if own is None else own
    return _ops._prefix_then_own_tables(ptab, plens, _i32(pids), own, _i32(kv_lens), 4)


def test_joined_tables_prefix_ids_outside_the_prefixes_read_no_prefix():
    """Unchecked prefix ids (a device's, or value checks off) past the prefixes or below -1
    join no prefix, as -1 does (the device route's rule): the sequence keeps its own table
    and kv_len, never the last prefix's blocks, and no index error."""
    tables, kv = _joined([2, 10**9, -7, -2**31, -1, 1], [5, 6, 7, 8, 3, 2])
    assert kv.tolist() == [5, 6, 7, 8, 3, 2 + 4]
    assert tables.dtype == torch.int32 and kv.dtype == torch.int32
    for s in range(5):
        assert tables[s, :2].tolist() == [1, 2], s
    assert tables[5, :3].tolist() == [4, 1, 2]


def test_windowed_cascade_reads_no_prefix_for_unchecked_ids_outside_the_prefixes():
    """The same through the wrapper (value checks off, a sliding window): a prefix id past
    the prefixes or below -1 gives the result of -1."""
    rng = np.random.default_rng(61)
    b = testing.small_shared_prefix_batch(rng, decode=True)
    args = [T(a) for a in b.args()]
    pids = args[5]
    none = pids.clone()
    none[0] = none[3] = -1
    with value_checks(False):
        want = tf.shared_prefix_attention(*args[:5], none, *args[6:], sliding_window=64)
        for bad in (2, 10**6, -5):
            odd = pids.clone()
            odd[0] = odd[3] = bad
            got = tf.shared_prefix_attention(*args[:5], odd, *args[6:], sliding_window=64)
            torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_joined_kv_lens_saturate_at_the_int32_limit():
    """Unchecked kv_lens near 2**31 plus a prefix stay 2**31 - 1 keys (the int32 limit), never
    wrap to a negative count."""
    _, kv = _joined([0, 1, 0, -1], [2**31 - 1, 2**31 - 3, 2**31 - 12, 2**31 - 1])
    assert kv.tolist() == [2**31 - 1, 2**31 - 1, 2**31 - 1, 2**31 - 1]


def test_joined_tables_of_sequences_with_no_own_blocks():
    """block_tables of no columns (sequences of no own tokens): each row is its prefix's
    blocks, its kv_len the prefix's."""
    tables, kv = _joined([0, 1, -1], [0, 0, 0], own=torch.zeros((3, 0), **I32))
    assert tables.shape == (3, 3)
    assert tables[0].tolist() == [7, 8, 9] and tables[1, :1].tolist() == [4]
    assert kv.tolist() == [12, 4, 0]


@pytest.mark.parametrize("decode", [True, False])
def test_windowed_cascade_over_a_prefix_table_of_no_columns(decode):
    """prefix_block_tables of shape [num_prefixes, 0] (every prefix empty) with a sliding
    window: plain paged attention over the own tables (the reference's result)."""
    rng = np.random.default_rng(62)
    b = testing.small_shared_prefix_batch(rng, decode=decode)
    b.prefix_block_tables = b.prefix_block_tables[:, :0].copy()
    b.prefix_lens = np.zeros_like(b.prefix_lens)
    want = ref.shared_prefix_attention_reference(*b.args(), sliding_window=5)
    close(tf.shared_prefix_attention(*(T(a) for a in b.args()), sliding_window=5), want,
          "float32")


# ------------------------------------------------------------------------------- cache ops


def test_swap_blocks_one_pair_listed_twice_copies_once():
    """The same (src, dst) pair listed twice (layers sharing one KV cache) is no two writers
    of one destination: it copies, as the pair listed once."""
    rng = np.random.default_rng(63)
    src = T(testing.random_values(rng, (5, 4, 2, 8), "float32"))
    dst = T(testing.random_values(rng, (5, 4, 2, 8), "float32"))
    src_ids, dst_ids = _i32([1, 4]), _i32([0, 3])
    expected = N(dst).copy()
    expected[[0, 3]] = N(src)[[1, 4]]
    tf.swap_blocks([src, src], [dst, dst], src_ids, dst_ids)
    np.testing.assert_array_equal(N(dst), expected)
    k2 = src.clone()
    tf.swap_blocks([src, k2, src], [dst, dst.clone(), dst], src_ids, dst_ids)
    np.testing.assert_array_equal(N(dst), expected)


def test_swap_blocks_one_source_into_two_overlapping_destinations_refused():
    """One src cache listed twice is no excuse for two destinations that overlap: views of
    one buffer one block apart (block d of the second is block d + 1 of the first) would be
    written by both copies. Only the same pair listed twice passes."""
    rng = np.random.default_rng(67)
    src = T(testing.random_values(rng, (5, 4, 2, 8), "float32"))
    buf = T(testing.random_values(rng, (6, 4, 2, 8), "float32"))
    before = buf.clone()
    with pytest.raises(ValueError, match=r"^dst_caches\[1\]: shares memory with dst_caches\[0\]"):
        tf.swap_blocks([src, src], [buf[:5], buf[1:]], _i32([1, 4]), _i32([0, 3]))
    assert torch.equal(buf, before)


def test_write_kv_refuses_two_rows_for_one_slot():
    """Host slot mappings are value-checked: two live rows for one slot (which would win?) is
    a ValueError naming slot_mapping, before any write."""
    rng = np.random.default_rng(64)
    k = T(testing.random_values(rng, (3, 4, 2, 8), "float32"))
    v = T(testing.random_values(rng, (3, 4, 2, 8), "float32"))
    before = k.clone(), v.clone()
    rows = T(testing.random_values(rng, (3, 2, 8), "float32"))
    with value_checks(True), pytest.raises(ValueError, match=r"^slot_mapping: .*distinct"):
        tf.write_kv(rows, rows, k, v, _i32([5, -1, 5]))
    assert torch.equal(k, before[0]) and torch.equal(v, before[1])


def _spy_block_contiguous(monkeypatch) -> dict:
    """The block_contiguous context each block op hands the registry's select, by op."""
    seen: dict = {}
    real = _ops.select

    def select(op, platform, backend=None, **context):
        if "block_contiguous" in context:
            seen.setdefault(op, []).append(context["block_contiguous"])
        return real(op, platform, backend, **context)

    monkeypatch.setattr(_ops, "select", select)
    return seen


def test_block_ops_report_block_contiguity_not_whole_cache_contiguity(monkeypatch):
    """What the block ops tell the registry (on CUDA the Triton kernels need it): each
    block of every cache one contiguous run. A layer of a block-major stacked buffer (not
    contiguous as a whole, each block contiguous) qualifies; a K half of a [blocks, tokens, 2,
    ...] buffer (each block strided) does not, and neither does a list holding one such cache;
    swap_blocks asks of its src and its dst caches."""
    seen = _spy_block_contiguous(monkeypatch)
    rng = np.random.default_rng(65)
    stacked = T(testing.random_values(rng, (6, 2, 4, 2, 8), "float32"))  # [blocks, layers, ...]
    layers = [stacked[:, 0], stacked[:, 1]]
    assert not layers[0].is_contiguous() and layers[0][0].is_contiguous()
    halves = T(testing.random_values(rng, (6, 4, 2, 2, 8), "float32"))  # [blocks, tok, K/V..]
    k_half = halves[:, :, 0]
    assert not k_half[0].is_contiguous()
    ids, dst = _i32([0, 2]), _i32([5, 3])

    def run(caches, host):
        seen.clear()
        tf.copy_blocks(caches, ids, dst)
        buf = tf.gather_blocks(caches, ids)
        tf.scatter_blocks(caches, buf, dst)
        tf.swap_blocks(caches, host, ids, dst)
        tf.swap_blocks(host, caches, ids, dst)
        return seen

    plain = [torch.zeros(6, 4, 2, 8), torch.zeros(6, 4, 2, 8)]
    got = run(layers, plain)
    assert got == {op: [True] for op in ("copy_blocks", "gather_blocks", "scatter_blocks")} | {
        "swap_blocks": [True, True]}
    got = run([k_half], [torch.zeros(6, 4, 2, 8)])
    assert got == {op: [False] for op in ("copy_blocks", "gather_blocks", "scatter_blocks")} | {
        "swap_blocks": [False, False]}
    got = run([layers[0], k_half], plain)
    assert got == {op: [False] for op in ("copy_blocks", "gather_blocks", "scatter_blocks")} | {
        "swap_blocks": [False, False]}
    # a strided cache on one side of the swap only: still no
    for src_side, dst_side in (([k_half], plain[:1]), (plain[:1], [k_half])):
        seen.clear()
        tf.swap_blocks(src_side, dst_side, ids, dst)
        assert seen == {"swap_blocks": [False]}
    # the results are the reference's whatever the layout (the torch path reads any strides)
    want = ref.gather_blocks_reference([N(c) for c in layers], ids.numpy())
    np.testing.assert_array_equal(N(tf.gather_blocks(layers, ids)), want)


def test_block_ops_over_caches_of_no_blocks():
    """Caches with no blocks (an empty pool) and no ids: every block op is a no-op (an empty
    buffer from gather_blocks), no index error looking at a block that is not there."""
    none = torch.zeros(0, **I32)
    caches = [torch.zeros(0, 4, 2, 8), torch.zeros(0, 4, 2, 8)]
    assert tf.gather_blocks(caches, none).shape == (0, 2, 4, 2, 8)
    tf.copy_blocks(caches, none, none)
    tf.scatter_blocks(caches, torch.zeros(0, 2, 4, 2, 8), none)
    tf.swap_blocks(caches, [c.clone() for c in caches], none, none)


# ------------------------------------------- unchecked prefix ids past the prefixes (a fix)


@pytest.mark.parametrize("route", ["small", "counted"])
def test_unchecked_prefix_id_past_the_prefixes_without_a_window(monkeypatch, route):
    """With value checks off, a CPU cascade without a window whose prefix id is past the
    prefixes reads no prefix, as the windowed and device routes do: the small batch's joined
    tables (reference.shared_prefix_block_tables) and the counted groups indexed prefix_lens
    with it (a bare IndexError, or another prefix's row)."""
    from prefixkv.torch_frontend import _native

    if route == "counted":
        monkeypatch.setattr(_native, "CASCADE_MIN_ROWS", 0)
        monkeypatch.setattr(_native, "CASCADE_MIN_SEQS", 1)
        monkeypatch.setattr(_native, "CASCADE_MIN_SCORES", 0)
    rng = np.random.default_rng(66)
    b = testing.small_shared_prefix_batch(rng, decode=True)
    args = [T(a) for a in b.args()]
    none = args[5].clone()
    none[0] = -1
    for past in (2, 7, 2**31 - 1):  # two prefixes
        odd = args[5].clone()
        odd[0] = past
        with value_checks(False):
            want = tf.shared_prefix_attention(*args[:5], none, *args[6:])
            got = tf.shared_prefix_attention(*args[:5], odd, *args[6:])
        torch.testing.assert_close(got, want, atol=0, rtol=0)
