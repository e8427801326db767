"""FlashInfer's CSR page tables <-> prefixkv's padded block tables (numpy, on the host).

FlashInfer describes a batch's pages as CSR: ``kv_indptr`` (i32[num_seqs + 1]), ``kv_indices``
(the page ids of every sequence, concatenated) and ``kv_last_page_len`` (i32[num_seqs], the
tokens in each sequence's last page, 1..page_size; a sequence with no page has 0). Its
sequence length is ``(num_pages - 1) * page_size + last_page_len``. prefixkv takes a padded
``block_tables`` (i32[num_seqs, max_blocks_per_seq]) and ``kv_lens``; its ``cu_q_lens`` is
FlashInfer's ``qo_indptr`` as it is. Both directions are vectorized (no loop per sequence)
and check their input, naming the argument.
"""

from __future__ import annotations

import numpy as np

from .validate import check_int, check_int32, to_host


def _int_array(name: str, x, ndim: int = 1) -> np.ndarray:
    a = to_host(x)
    if a.ndim != ndim or (a.dtype.kind not in "iu" and a.size):  # [] reads as float64
        raise TypeError(f"{name}: expected a {ndim}-D integer array, got {a.dtype} of shape "
                        f"{a.shape}")
    return a.astype(np.int64)


def _check_block_size(block_size) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) \
            or block_size < 1:
        raise ValueError(f"block_size: expected an int >= 1, got {block_size!r}")
    check_int32("block_size", block_size, "int32 lengths")


def block_tables_from_csr(kv_indptr, kv_indices, kv_last_page_len, block_size: int, *,
                          max_blocks_per_seq: int | None = None,
                          pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(block_tables i32[num_seqs, max_blocks_per_seq], kv_lens i32[num_seqs]) of a FlashInfer
    CSR page table (``kv_indices`` may be longer than ``kv_indptr[-1]``, as FlashInfer's
    CUDA-graph buffers are: the rest is not read). ``block_size``: the page size.
    ``max_blocks_per_seq``: the table's width
    (default the most pages of a sequence; fixed, e.g. for CUDA graphs or jit buckets).
    Entries past a sequence's pages hold ``pad_id`` (never read as keys)."""
    _check_block_size(block_size)
    if max_blocks_per_seq is not None:
        max_blocks_per_seq = check_int("max_blocks_per_seq", max_blocks_per_seq, 0)
    pad_id = check_int("pad_id", pad_id, -(2**31))
    if pad_id >= 2**31:
        raise ValueError(f"pad_id: expected a block id that fits int32, got {pad_id}")
    indices = _int_array("kv_indices", kv_indices)
    indptr = _int_array("kv_indptr", kv_indptr)
    if indptr.shape[0] == 0 or indptr[0] != 0 or (np.diff(indptr) < 0).any():
        raise ValueError(f"kv_indptr: expected num_seqs + 1 non-decreasing offsets from 0, got "
                         f"{indptr.tolist()[:8]}{'...' if indptr.shape[0] > 8 else ''}")
    if indptr[-1] > indices.shape[0]:
        raise ValueError(f"kv_indptr: expected its last entry <= len(kv_indices) "
                         f"({indices.shape[0]}), got {int(indptr[-1])}")
    indices = indices[:indptr[-1]]  # a CUDA-graph buffer has room past the batch's pages
    last = _int_array("kv_last_page_len", kv_last_page_len)
    num_seqs = indptr.shape[0] - 1
    if last.shape[0] != num_seqs:
        raise ValueError(f"kv_last_page_len: expected shape ({num_seqs},) (one per sequence "
                         f"of kv_indptr), got {last.shape}")
    pages = np.diff(indptr)
    bad = np.where(pages > 0, (last < 1) | (last > block_size), last != 0)
    if bad.any():
        s = int(np.argmax(bad))
        want = f"1..{block_size}" if pages[s] else "0 (no pages)"
        raise ValueError(f"kv_last_page_len: expected {want} for sequence {s}, got "
                         f"{int(last[s])}")
    width = int(pages.max(initial=0)) if max_blocks_per_seq is None else max_blocks_per_seq
    if width < int(pages.max(initial=0)):
        raise ValueError(f"max_blocks_per_seq: {width} is less than the {int(pages.max())} "
                         f"pages of sequence {int(np.argmax(pages))}")
    if indices.size and (indices.min() < 0 or indices.max() >= 2**31):
        raise ValueError(f"kv_indices: expected page ids in [0, 2**31), got "
                         f"{int(indices.min() if indices.min() < 0 else indices.max())}")
    tables = np.full((num_seqs, width), pad_id, np.int32)
    rows = np.repeat(np.arange(num_seqs), pages)
    cols = np.arange(indices.shape[0]) - np.repeat(indptr[:-1], pages)
    tables[rows, cols] = indices
    kv_lens = np.maximum(pages - 1, 0) * block_size + last
    if kv_lens.size and kv_lens.max() >= 2**31:
        raise ValueError("kv_indptr: a sequence's length does not fit int32")
    return tables, kv_lens.astype(np.int32)


def csr_from_block_tables(block_tables, kv_lens,
                          block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kv_indptr, kv_indices, kv_last_page_len), int32, of a padded block table: sequence s
    holds its first ceil(kv_lens[s] / block_size) entries."""
    _check_block_size(block_size)
    tables = _int_array("block_tables", block_tables, ndim=2)
    lens = _int_array("kv_lens", kv_lens)
    if lens.shape[0] != tables.shape[0]:
        raise ValueError(f"kv_lens: expected shape ({tables.shape[0]},) (num_seqs from "
                         f"block_tables), got {lens.shape}")
    pages = -(-lens // block_size)
    if (lens < 0).any() or (pages > tables.shape[1]).any():
        s = int(np.argmax((lens < 0) | (pages > tables.shape[1])))
        raise ValueError(f"kv_lens: expected 0..{tables.shape[1] * block_size} (the table's "
                         f"blocks), got {int(lens[s])} for sequence {s}")
    indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
    used = np.arange(tables.shape[1])[None, :] < pages[:, None]
    last = np.where(pages > 0, lens - (pages - 1) * block_size, 0)
    ids = tables[used]
    if ids.size and (ids.min() < 0 or ids.max() >= 2**31):
        bad = ids.min() if ids.min() < 0 else ids.max()
        raise ValueError(f"block_tables: expected block ids in [0, 2**31) in the blocks in use, "
                         f"got {int(bad)}")
    return indptr, ids.astype(np.int32), last.astype(np.int32)


__all__ = ["block_tables_from_csr", "csr_from_block_tables"]
