"""FlashInfer's CSR page tables <-> padded block tables (paged.csr), both ways, exact; bad
input named."""

from __future__ import annotations

import hypothesis
import numpy as np
import pytest
from hypothesis import strategies as st
from prefixkv.paged import block_tables_from_csr, csr_from_block_tables, reference, testing


def test_flashinfer_example():
    """FlashInfer's convention: length = (pages - 1) * page_size + last_page_len."""
    tables, lens = block_tables_from_csr([0, 2, 5, 5, 6], [7, 3, 9, 1, 4, 8], [10, 8, 0, 3], 16)
    assert tables.dtype == np.int32 and lens.dtype == np.int32
    np.testing.assert_array_equal(tables, [[7, 3, 0], [9, 1, 4], [0, 0, 0], [8, 0, 0]])
    np.testing.assert_array_equal(lens, [26, 40, 0, 3])
    back = csr_from_block_tables(tables, lens, 16)
    for got, want in zip(back, ([0, 2, 5, 5, 6], [7, 3, 9, 1, 4, 8], [10, 8, 0, 3]),
                         strict=True):
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, want)
    wide, _ = block_tables_from_csr([0, 1], [5], [1], 4, max_blocks_per_seq=3, pad_id=-1)
    np.testing.assert_array_equal(wide, [[5, -1, -1]])


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(st.lists(st.integers(0, 70), max_size=6), st.integers(1, 17),
                  st.integers(0, 2**31 - 1))
def test_round_trip_and_same_attention(lens, block_size, seed):
    """A table -> CSR -> table round trip is exact on the blocks in use, and attention over
    the converted table equals attention over the original."""
    rng = np.random.default_rng(seed)
    pages = [-(-n // block_size) for n in lens]
    width = max([1, *pages]) + 1
    tables = rng.integers(0, 100, (len(lens), width)).astype(np.int32)
    kv = np.array(lens, np.int32)
    indptr, indices, last = csr_from_block_tables(tables, kv, block_size)
    assert indptr[-1] == sum(pages) == indices.shape[0]
    t2, kv2 = block_tables_from_csr(indptr, indices, last, block_size,
                                    max_blocks_per_seq=width)
    np.testing.assert_array_equal(kv2, kv)
    used = np.arange(width)[None, :] < np.array(pages, np.int64)[:, None]
    np.testing.assert_array_equal(t2[used], tables[used])
    if lens and max(lens) > 0:
        b = testing.make_ragged_batch(rng, [(min(n, 1), n) for n in lens], block_size=block_size,
                                      num_q_heads=2, num_kv_heads=1, head_dim=8,
                                      max_blocks_per_seq=width, decode=False)
        ip, ix, lp = csr_from_block_tables(b.block_tables, b.kv_lens, block_size)
        t3, kv3 = block_tables_from_csr(ip, ix, lp, block_size)
        want = reference.paged_attention_reference(*b.args())
        got = reference.paged_attention_reference(b.q, b.k_cache, b.v_cache, t3, kv3,
                                                  b.cu_q_lens)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("args,match", [
    (([0, 2], [1, 2], [0], 4), r"kv_last_page_len: expected 1\.\.4 for sequence 0, got 0"),
    (([0, 2], [1, 2], [5], 4), r"kv_last_page_len: expected 1\.\.4 for sequence 0, got 5"),
    (([0, 0], [], [2], 4), r"kv_last_page_len: expected 0 \(no pages\) for sequence 0"),
    (([0, 2], [1, 2], [1, 1], 4), r"kv_last_page_len: expected shape \(1,\)"),
    (([0, 3], [1, 2], [1], 4), r"kv_indptr: expected its last entry <= len\(kv_indices\) \(2\)"),
    (([1, 2], [1, 2], [1], 4), r"kv_indptr: expected num_seqs \+ 1 non-decreasing offsets"),
    (([0, 2, 1], [1, 2], [1, 1], 4), r"kv_indptr: expected num_seqs \+ 1 non-decreasing"),
    (([], [], [], 4), r"kv_indptr: expected num_seqs \+ 1"),
    (([0, 1], [1], [1], 0), r"block_size: expected an int >= 1"),
    (([0, 1], [2**31], [1], 4), r"kv_indices: expected page ids in \[0, 2\*\*31\), got 2147483648"),
    (([0, 1], [-5], [1], 4), r"kv_indices: expected page ids in \[0, 2\*\*31\), got -5"),
])
def test_block_tables_from_csr_names_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        block_tables_from_csr(*args)


def test_kv_indices_buffer_longer_than_the_batch():
    """FlashInfer's CUDA-graph paged_kv_indices buffer has room past kv_indptr[-1]: the rest
    is not read (here it would be an id out of int32 range)."""
    tables, lens = block_tables_from_csr([0, 2, 3], [5, 6, 7, 2**40, -1], [3, 1], 4)
    np.testing.assert_array_equal(tables, [[5, 6], [7, 0]])
    np.testing.assert_array_equal(lens, [7, 1])


def test_bad_input_named():
    with pytest.raises(ValueError, match="max_blocks_per_seq: 1 is less than the 2 pages"):
        block_tables_from_csr([0, 2], [1, 2], [1], 4, max_blocks_per_seq=1)
    with pytest.raises(TypeError, match="kv_indices: expected a 1-D integer array"):
        block_tables_from_csr([0, 1], [1.5], [1], 4)
    with pytest.raises(ValueError, match=r"kv_lens: expected 0\.\.8 .* got 9 for sequence 0"):
        csr_from_block_tables(np.zeros((1, 2), np.int32), [9], 4)
    with pytest.raises(ValueError, match=r"kv_lens: expected shape \(1,\)"):
        csr_from_block_tables(np.zeros((1, 2), np.int32), [1, 1], 4)
    with pytest.raises(TypeError, match="block_tables: expected a 2-D integer array"):
        csr_from_block_tables(np.zeros(2, np.int32), [1], 4)
    # int64 tables: the ids in use had been cast to int32 unchecked (wrapped negative)
    with pytest.raises(ValueError, match=r"block_tables: expected block ids in \[0, 2\*\*31\) "
                                         r"in the blocks in use, got 2147483653"):
        csr_from_block_tables(np.array([[2**31 + 5, 7]]), [5], 4)
    tables = np.array([[3, -1], [4, 2**40]])  # padding past the blocks in use: not read
    indptr, indices, last = csr_from_block_tables(tables, [4, 3], 4)
    assert indices.tolist() == [3, 4] and last.tolist() == [4, 3]
    with pytest.raises(ValueError, match="pad_id: expected a block id that fits int32"):
        block_tables_from_csr([0, 1], [1], [1], 4, pad_id=2**40)
    with pytest.raises(TypeError, match="max_blocks_per_seq: expected an int, got 2.7"):
        block_tables_from_csr([0, 1], [1], [1], 4, max_blocks_per_seq=2.7)
