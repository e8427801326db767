"""Contracts of the torch backend's own code (torch_frontend/_native.py) that a mutation review
of that module found unpinned by the other tests: the host bounds guard's exact upper bound for
every id argument when nobody else checks values (an id one past the end is refused with a
ValueError naming the argument, before anything is written), and block moves between pools of
different sizes (each id bounded by its own pool). The numpy reference is the oracle."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from prefixkv.paged import reference as ref  # noqa: E402
from prefixkv.paged import testing  # noqa: E402
from torch_convert import N, T, close  # noqa: E402

from prefixkv import torch_frontend as tf  # noqa: E402

I32 = dict(dtype=torch.int32)


def _caches(rng, n=2, num_blocks=4, dtype="float32"):
    return [T(testing.random_values(rng, (num_blocks, 8, 2, 16), dtype)) for _ in range(n)]


def test_unchecked_ids_one_past_the_end_are_named_before_any_write(monkeypatch):
    """With value checks off (PREFIXKV_VALUE_CHECKS=0), an id equal to the pool's size (the
    first one out of range: a slot num_blocks * block_size, a block num_blocks) is refused by
    the torch path's own guard with a ValueError naming the argument and the bound, and no
    cache changes; the last valid id is accepted."""
    rng = np.random.default_rng(101)
    caches = _caches(rng)
    other = _caches(rng, num_blocks=6)
    before = [c.clone() for c in caches + other]
    key = T(testing.random_values(rng, (2, 2, 16), "float32"))
    calls = {
        "slot_mapping": (32, lambda: tf.write_kv(key, key, caches[0], caches[1],
                                                 torch.tensor([3, 32], **I32))),
        "src": (4, lambda: tf.copy_blocks(caches, torch.tensor([0, 4], **I32),
                                          torch.tensor([1, 2], **I32))),
        "dst": (4, lambda: tf.copy_blocks(caches, torch.tensor([0, 1], **I32),
                                          torch.tensor([2, 4], **I32))),
        "block_ids": (4, lambda: tf.scatter_blocks(caches, torch.zeros(2, 2, 8, 2, 16),
                                                   torch.tensor([1, 4], **I32))),
        "src_ids": (6, lambda: tf.swap_blocks(other, caches, torch.tensor([6], **I32),
                                              torch.tensor([0], **I32))),
        "dst_ids": (4, lambda: tf.swap_blocks(other, caches, torch.tensor([5, 1], **I32),
                                              torch.tensor([0, 4], **I32))),
    }
    monkeypatch.setenv("PREFIXKV_VALUE_CHECKS", "0")
    for name, (upper, call) in calls.items():
        with pytest.raises(ValueError,
                           match=rf"^{name}: expected values in \[0, {upper}\).*, got {upper} at"):
            call()
        for c, b in zip(caches + other, before, strict=True):
            assert torch.equal(c, b), name
    with pytest.raises(ValueError, match=r"^block_ids: expected values in \[0, 4\), got 4"):
        tf.gather_blocks(caches, torch.tensor([3, 4], **I32))
    # the last valid id of each argument is taken
    tf.write_kv(key, key, caches[0], caches[1], torch.tensor([31, -1], **I32))
    want = ref.write_kv_reference(N(key).astype(np.float32), N(key).astype(np.float32),
                                  N(before[0]).astype(np.float32),
                                  N(before[1]).astype(np.float32), np.array([31, -1], np.int32))
    for c, w in zip(caches, want, strict=True):
        np.testing.assert_array_equal(N(c), w)


@pytest.mark.parametrize("direction", ["offload", "onload"])
def test_swap_blocks_between_pools_of_different_sizes(direction):
    """swap_blocks bounds src_ids by the source pool and dst_ids by the destination pool:
    blocks past the smaller pool's size are valid on the larger side (an onload from a host
    pool larger than the device pool, and back)."""
    rng = np.random.default_rng(102)
    small, big = _caches(rng, num_blocks=3), _caches(rng, num_blocks=8)
    if direction == "onload":  # big host pool -> small device pool
        src, dst, si, di = big, small, [7, 5, 0], [2, 0, 1]
    else:
        src, dst, si, di = small, big, [2, 0, 1], [7, 5, 3]
    want = [ref.scatter_blocks_reference([N(d).astype(np.float32)],
                                         ref.gather_blocks_reference(
                                             [N(s).astype(np.float32)], np.array(si)),
                                         np.array(di))[0] for s, d in zip(src, dst, strict=True)]
    tf.swap_blocks(src, dst, torch.tensor(si, **I32), torch.tensor(di, **I32))
    for d, w in zip(dst, want, strict=True):
        np.testing.assert_array_equal(N(d), w)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_decode_of_caches_with_non_dense_blocks(dtype):
    """A decode over K and V views whose blocks are not dense (head_dim and kv heads swapped
    in memory: a transposed view) gives the reference's answer: such caches must not reach
    the compiled decode kernel, which reads each head's head_dim elements dense (any block,
    token and head strides)."""
    rng = np.random.default_rng(103)
    b = testing.make_ragged_batch(rng, [(1, 21), (1, 9), (1, 33)], num_q_heads=4,
                                  num_kv_heads=2, head_dim=16, block_size=8, dtype=dtype,
                                  decode=True)
    k, v = (T(c).transpose(2, 3).contiguous().transpose(2, 3) for c in (b.k_cache, b.v_cache))
    assert not k.is_contiguous() and k.stride()[2:] == (1, 2)
    want, want_lse = ref.paged_attention_reference(*b.args(), return_lse=True)
    got, got_lse = tf.paged_attention(T(b.q), k, v, T(b.block_tables), T(b.kv_lens),
                                      return_lse=True)
    close(got, want, dtype)
    np.testing.assert_allclose(N(got_lse), want_lse, atol=1e-4, rtol=1e-4)
