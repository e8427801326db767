"""A NaN in the KV a query reads (a corrupt block) makes that query's out and lse NaN, in the
reference and in every backend tested here, never a finite answer that skips the key, nor out
NaN with lse -inf (an empty state to a merge, which would drop the NaN: a cascade's merge
served a clean-looking answer). Slots no query of the call reads hold NaN too (the shared ragged
builder's nan_fill) and must not leak. The NaN here sits in key 0, which every query of its
sequence reads: a NaN V slot that only some rows read may also make the sequence's other rows
NaN (0 * NaN in p.V), in the reference as in the kernels (which rows depends on the kernel's
key tiles), so that case is not pinned down here.
"""

from __future__ import annotations

import numpy as np
import pytest
from prefixkv.paged import reference as ref
from prefixkv.paged import testing

#: sequence 0 reads its first key: the NaN goes there (K column 3, or V column 3).
SEQS = [(3, 20), (1, 9), (2, 2)]


def _batch(head_dim=32, block_size=8, decode=False, where="k"):
    rng = np.random.default_rng(3)
    seqs = [(1, kv) for _, kv in SEQS] if decode else SEQS
    b = testing.make_ragged_batch(rng, seqs, num_q_heads=4, num_kv_heads=2, head_dim=head_dim,
                                  block_size=block_size, decode=decode)
    first = int(b.block_tables[0, 0])
    (b.k_cache if where == "k" else b.v_cache)[first, 0, 1, 3] = np.nan  # kv head 1
    return b


@pytest.mark.parametrize("where", ["k", "v"])
def test_reference(where):
    b = _batch(where=where)
    out, lse = ref.paged_attention_reference(*b.args(), return_lse=True)
    rows = np.arange(3)  # sequence 0's tokens read key 0; the others do not
    if where == "k":  # its kv head 1's q heads (2, 3): out and lse NaN
        assert np.isnan(out[rows][:, 2:]).all() and np.isnan(lse[rows][:, 2:]).all()
    else:  # a NaN value: its column of out only
        assert np.isnan(out[rows][:, 2:, 3]).all() and not np.isnan(lse).any()
    assert not np.isnan(out[3:]).any() and not np.isnan(out[rows][:, :2]).any()


JAX_CASES = [("xla", False, "k"), ("xla", False, "v"), ("xla", True, "k"),
             ("pallas_interpret", False, "k"), ("pallas_gpu_interpret", True, "k")]


@pytest.mark.parametrize("backend,decode,where", JAX_CASES)
def test_jax_paged_attention(backend, decode, where):
    jax = pytest.importorskip("jax")
    from prefixkv import jax_frontend as jf

    b = _batch(head_dim=128 if backend == "pallas_interpret" else 32,
               block_size=16 if backend == "pallas_gpu_interpret" else 8, decode=decode,
               where=where)
    want, want_lse = ref.paged_attention_reference(*b.args(), return_lse=True)
    out, lse = jax.jit(lambda *a: jf.paged_attention(*a, return_lse=True, backend=backend))(
        *b.args())
    testing.assert_nan_like_reference(out, lse, want, want_lse)


@pytest.mark.parametrize("decode", [True, False], ids=["decode", "mixed"])
def test_jax_shared_prefix_attention_merge_keeps_the_nan(decode):
    """The NaN in a prefix block: the cascade's prefix part is NaN, and its merge with the own
    part must keep it (the merge read a NaN lse as an empty state)."""
    pytest.importorskip("jax")
    from prefixkv import jax_frontend as jf

    rng = np.random.default_rng(5)
    b = testing.small_shared_prefix_batch(rng, decode)
    b.k_cache[int(b.prefix_block_tables[0, 0]), 0, 0, 3] = np.nan  # prefix 0, kv head 0
    want, want_lse = ref.shared_prefix_attention_reference(*b.args(), return_lse=True)
    out, lse = jf.shared_prefix_attention(*b.args(), return_lse=True, backend="xla")
    testing.assert_nan_like_reference(out, lse, want, want_lse)


TORCH_CASES = [(False, "k", {}), (False, "v", {}), (True, "k", {}),
               (False, "k", {"logits_soft_cap": 30.0})]
# (the soft cap over these short rows runs in the compiled kernel's token route, as the rest;
# a NaN read by the padded path: tests/test_torch_attention_contracts.py)


@pytest.mark.parametrize("decode,where,opts", TORCH_CASES)
def test_torch_paged_attention(decode, where, opts):
    torch = pytest.importorskip("torch")
    from prefixkv import torch_frontend as tf

    b = _batch(decode=decode, where=where)
    want, want_lse = ref.paged_attention_reference(*b.args(), return_lse=True, **opts)
    args = [None if a is None else torch.from_numpy(np.ascontiguousarray(a)) for a in b.args()]
    out, lse = tf.paged_attention(*args, return_lse=True, **opts)
    testing.assert_nan_like_reference(out.numpy(), lse.numpy(), want, want_lse)


@pytest.mark.parametrize("pos,where", [(0, "k"), (25, "k"), (25, "v"), (33, "k")])
def test_torch_long_prefill_flash_tiles(pos, where, monkeypatch):
    """The CPU long-prefill tiles of torch's fused kernel (tiles of 7 of 19 new tokens over
    21 cached): a NaN in a key in front of a tile (0), or in a tile's own keys (25: the rows
    from its position on; 33: the last tile's), makes the rows that read it NaN as in the
    reference, the others not; a NaN value (25, v): its column NaN in every row here, as in
    the reference (0 x NaN before it; with more tiles before it the earlier rows may stay
    finite, which the module docstring leaves open)."""
    torch = pytest.importorskip("torch")
    from prefixkv.torch_frontend import _native

    from prefixkv import torch_frontend as tf

    monkeypatch.setattr(_native, "PREFILL_Q_TILE", 8)
    monkeypatch.setattr(_native, "FLASH_PREFILL_TILE", 7)
    monkeypatch.setattr(_native, "FLASH_PREFILL_MIN", 8)
    monkeypatch.setattr(_native, "RAGGED_DECODE_MAX_Q", 0)  # the 19 tokens in tiles
    rng = np.random.default_rng(3)
    b = testing.make_ragged_batch(rng, [(19, 40), (2, 9)], num_q_heads=4, num_kv_heads=2,
                                  head_dim=16, block_size=4)
    blk = int(b.block_tables[0, pos // 4])
    (b.k_cache if where == "k" else b.v_cache)[blk, pos % 4, 1, 3] = np.nan
    want, want_lse = ref.paged_attention_reference(*b.args(), return_lse=True)
    args = [None if a is None else torch.from_numpy(np.ascontiguousarray(a)) for a in b.args()]
    out, lse = tf.paged_attention(*args, return_lse=True)
    testing.assert_nan_like_reference(out.numpy(), lse.numpy(), want, want_lse)


@pytest.mark.parametrize("decode", [True, False], ids=["decode", "mixed"])
def test_torch_shared_prefix_attention_merge_keeps_the_nan(decode):
    torch = pytest.importorskip("torch")
    from prefixkv import torch_frontend as tf

    rng = np.random.default_rng(5)
    b = testing.small_shared_prefix_batch(rng, decode)
    b.k_cache[int(b.prefix_block_tables[0, 0]), 0, 0, 3] = np.nan
    want, want_lse = ref.shared_prefix_attention_reference(*b.args(), return_lse=True)
    args = [None if a is None else torch.from_numpy(np.ascontiguousarray(a)) for a in b.args()]
    out, lse = tf.shared_prefix_attention(*args, return_lse=True)
    testing.assert_nan_like_reference(out.numpy(), lse.numpy(), want, want_lse)


def _merge_case():
    """State a: row 0 empty (lse -inf) with NaN in its out, row 1 empty by +inf
    (FlashAttention-2's) with NaN out, row 2 a NaN state; state b live everywhere."""
    oa = np.full((3, 2, 4), np.nan, np.float32)
    oa[2] = 1.0
    la = np.array([[-np.inf] * 2, [np.inf] * 2, [np.nan] * 2], np.float32)
    ob = np.full((3, 2, 4), 2.0, np.float32)
    lb = np.full((3, 2), 0.5, np.float32)
    return oa, la, ob, lb


def _assert_merge(out, lse):
    out, lse = np.asarray(out, np.float32), np.asarray(lse, np.float32)
    np.testing.assert_array_equal(out[:2], np.full((2, 2, 4), 2.0))  # the empty out unread
    np.testing.assert_array_equal(lse[:2], np.full((2, 2), 0.5))
    assert np.isnan(out[2]).all() and np.isnan(lse[2]).all()  # a NaN state stays NaN


def test_merges_do_not_read_an_empty_states_out():
    """An empty state's out is not read (the Triton merge never reads it: the cascade leaves
    those rows unwritten), in the reference and every frontend merge; both argument orders."""
    oa, la, ob, lb = _merge_case()
    for args in ((oa, la, ob, lb), (ob, lb, oa, la)):
        _assert_merge(*ref.merge_attention_states_reference(*args))
    torch = pytest.importorskip("torch")
    from prefixkv import torch_frontend as tf
    for args in ((oa, la, ob, lb), (ob, lb, oa, la)):
        _assert_merge(*(x.numpy() for x in tf.merge_attention_states(
            *(torch.from_numpy(a) for a in args))))
        _assert_merge(*(x.float().numpy() for x in tf.merge_attention_states(
            *(torch.from_numpy(a).to(torch.bfloat16) if a.ndim == 3 else torch.from_numpy(a)
              for a in args))))
    pytest.importorskip("jax")
    from prefixkv import jax_frontend as jf
    for args in ((oa, la, ob, lb), (ob, lb, oa, la)):
        _assert_merge(*jf.merge_attention_states(*args))
