"""The cache-op reference: exact writes and block copies, untouched blocks bit-identical."""

import numpy as np
import pytest
from prefixkv.paged.reference import (
    copy_blocks_reference,
    gather_blocks_reference,
    scatter_blocks_reference,
    write_kv_reference,
)

DTYPES = ["float32", "float16", "bfloat16"]


def caches(rng, num_blocks=6, block_size=4, heads=2, head_dim=8, dtype="float32", n=2):
    from prefixkv.paged.testing import random_values

    return [random_values(rng, (num_blocks, block_size, heads, head_dim), dtype) for _ in range(n)]


def test_write_kv_hand_worked():
    # block_size 2: slot 3 = block 1 offset 1, slot 0 = block 0 offset 0, slot -1 skipped.
    k = np.zeros((2, 2, 1, 1), np.float32)
    v = np.zeros((2, 2, 1, 1), np.float32)
    key = np.array([[[1.0]], [[2.0]], [[3.0]]], np.float32)
    k2, v2 = write_kv_reference(key, -key, k, v, np.array([3, 0, -1], np.int32))
    assert k2[1, 1, 0, 0] == 1.0 and k2[0, 0, 0, 0] == 2.0
    assert v2[1, 1, 0, 0] == -1.0 and v2[0, 0, 0, 0] == -2.0
    assert np.count_nonzero(k2) == 2  # token 2 (slot -1) written nowhere
    assert not k.any()  # functional: inputs untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_exact_and_others_untouched(dtype):
    rng = np.random.default_rng(0)
    kc, vc = caches(rng, dtype=dtype)
    n = 7
    slots = rng.permutation(kc.shape[0] * kc.shape[1])[:n].astype(np.int32)
    slots[2] = -1
    key = caches(rng, num_blocks=n, block_size=1, dtype=dtype, n=1)[0][:, 0]
    value = caches(rng, num_blocks=n, block_size=1, dtype=dtype, n=1)[0][:, 0]
    k2, v2 = write_kv_reference(key, value, kc, vc, slots)
    flat_k = k2.reshape(-1, *k2.shape[2:])
    flat_v = v2.reshape(-1, *v2.shape[2:])
    live = slots >= 0
    np.testing.assert_array_equal(flat_k[slots[live]], key[live])
    np.testing.assert_array_equal(flat_v[slots[live]], value[live])
    untouched = np.setdiff1d(np.arange(flat_k.shape[0]), slots[live])
    np.testing.assert_array_equal(flat_k[untouched], kc.reshape(flat_k.shape)[untouched])


def test_write_kv_ignores_padding_rows():
    rng = np.random.default_rng(1)
    kc, vc = caches(rng)
    key = caches(rng, num_blocks=5, block_size=1, n=1)[0][:, 0]
    k2, _ = write_kv_reference(key, key, kc, vc, np.array([0, 5], np.int32))
    np.testing.assert_array_equal(k2.reshape(-1, *k2.shape[2:])[[0, 5]], key[:2])


def test_copy_blocks_reads_before_writes():
    # swap blocks 0 and 1, and copy 0 -> 2: every read sees the original block 0
    c = np.arange(4, dtype=np.float32).reshape(4, 1) * np.ones((4, 3), np.float32)
    (out,) = copy_blocks_reference([c], np.array([1, 0, 0], np.int32),
                                   np.array([0, 1, 2], np.int32))
    np.testing.assert_array_equal(out[:, 0], [1, 0, 0, 3])
    np.testing.assert_array_equal(c[:, 0], [0, 1, 2, 3])


@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_blocks_all_caches(dtype):
    rng = np.random.default_rng(2)
    cs = caches(rng, dtype=dtype, n=4)
    src, dst = np.array([5, 2], np.int32), np.array([0, 3], np.int32)
    out = copy_blocks_reference(cs, src, dst)
    for before, after in zip(cs, out, strict=True):
        np.testing.assert_array_equal(after[dst], before[src])
        keep = [1, 2, 4, 5]
        np.testing.assert_array_equal(after[keep], before[keep])


def test_copy_blocks_mixed_shapes():
    # caches may differ in block shape (e.g. K and V of different widths) but share num_blocks
    rng = np.random.default_rng(3)
    a = rng.standard_normal((3, 2, 4)).astype(np.float32)
    b = rng.standard_normal((3, 5)).astype(np.float16)
    out = copy_blocks_reference((a, b), np.array([0], np.int32), np.array([2], np.int32))
    np.testing.assert_array_equal(out[0][2], a[0])
    np.testing.assert_array_equal(out[1][2], b[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_scatter_roundtrip(dtype):
    rng = np.random.default_rng(4)
    cs = caches(rng, dtype=dtype, n=3)
    ids = np.array([4, 1, 4], np.int32)  # gathering a block twice is fine
    buf = gather_blocks_reference(cs, ids)
    assert buf.shape == (3, 3, *cs[0].shape[1:]) and buf.flags.c_contiguous
    for i, b in enumerate(ids):
        for c in range(3):
            np.testing.assert_array_equal(buf[i, c], cs[c][b])
    fresh = [np.zeros_like(c) for c in cs]
    out = scatter_blocks_reference(fresh, buf[:2], np.array([0, 5], np.int32))
    for c in range(3):
        np.testing.assert_array_equal(out[c][0], cs[c][4])
        np.testing.assert_array_equal(out[c][5], cs[c][1])
        np.testing.assert_array_equal(out[c][1:5], 0)
    assert not fresh[0].any()


def test_gather_empty():
    rng = np.random.default_rng(5)
    cs = caches(rng, n=2)
    assert gather_blocks_reference(cs, np.zeros(0, np.int32)).shape == (0, 2, 4, 2, 8)
