"""Contracts of the torch backend's attention code (torch_frontend/_native.py) that a mutation
review of it found unpinned by the other tests, each against the numpy reference:

- a NaN in a key that the padded online-softmax path reads (a soft cap takes that path) makes
  the row's lse NaN as well as its out, never lse -inf (which a merge would take for an empty
  state and drop);
- the padded path skips the mask only for key chunks that every live row sees whole: the
  bound is the least causal end of the live rows (not the greatest), in a padded batch and in
  the padded tiles of a long prefill, with key chunks ending right past it;
- a sequence of exactly the long-prefill minimum of query tokens is computed (by the tiles of
  torch's fused CPU kernel, and by the padded tiles under a soft cap), not left unwritten;
- a NaN state merged with an empty one stays NaN (merge_attention_states, and the cascade's
  merge for a sequence with no prefix whose own key is NaN);
- the cascade's prefix pass stays finite with logits in the hundreds (the dense chunks and
  the fused kernel subtract each row's max).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from prefixkv.paged import reference as ref  # noqa: E402
from prefixkv.paged import testing  # noqa: E402
from torch_convert import N, T, close  # noqa: E402

from prefixkv import torch_frontend as tf  # noqa: E402


def _run(b, **opts):
    """tf.paged_attention of batch b into out= and lse= pre-filled with NaN (an unwritten row
    fails), with the reference's (out, lse)."""
    want, want_lse = ref.paged_attention_reference(*b.args(), return_lse=True, **opts)
    out = torch.full(b.q.shape, float("nan"))
    lse = torch.full(b.q.shape[:2], float("nan"))
    tf.paged_attention(*(T(a) for a in b.args()), return_lse=True, out=out, lse=lse, **opts)
    return N(out), N(lse), want, want_lse


def _check(b, **opts):
    out, lse, want, want_lse = _run(b, **opts)
    close(torch.from_numpy(out), want, "float32")
    testing.assert_lse_close(lse, want_lse)


def _spy(monkeypatch, name):
    """Count the calls of _native.<name> (the route a test means to take)."""
    from prefixkv.torch_frontend import _native

    calls = []
    real = getattr(_native, name)
    monkeypatch.setattr(_native, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_nan_key_read_by_the_padded_path_makes_out_and_lse_nan(monkeypatch):
    """A NaN in key 0 of sequence 0 (kv head 1), read by every row of it, on the padded path
    (q_len 20 and 17 with a soft cap: no compiled kernel, no tiles): those rows' out and lse
    NaN as in the reference, the rest equal to it."""
    calls = _spy(monkeypatch, "_attend_padded")
    b = testing.make_ragged_batch(np.random.default_rng(3), [(20, 30), (17, 17)],
                                  num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=4)
    b.k_cache[int(b.block_tables[0, 0]), 0, 1, 3] = np.nan
    out, lse, want, want_lse = _run(b, logits_soft_cap=30.0)
    assert calls
    assert np.isnan(want_lse[:20, 2:]).all() and not np.isnan(want_lse[20:]).any()
    testing.assert_nan_like_reference(out, lse, want, want_lse)


@pytest.mark.parametrize("seqs,tile", [
    # one padded batch (q_len 20 and 19, one class): rows end at keys 81..100 and 12..30
    ([(20, 100), (19, 30)], None),
    # padded tiles of 8 tokens: tile 0's first row sees keys [0, 23), a chunk ends at 24
    ([(20, 42)], 8),
], ids=["padded_batch", "padded_tiles"])
def test_unmasked_key_chunks_are_those_every_live_row_sees(seqs, tile, monkeypatch):
    """Key chunks of 4 keys (one block): the padded path may skip the causal mask of a chunk
    only when every live row sees all its keys; a chunk ending one key past the least row end
    is masked (else a row sees a key past its position, or a NaN past kv_len)."""
    from prefixkv.torch_frontend import _native

    monkeypatch.setattr(_native, "CHUNK_BYTES", 1)
    monkeypatch.setattr(_native, "MIN_CHUNK_KEYS", 4)
    if tile is not None:
        monkeypatch.setattr(_native, "PREFILL_Q_TILE", tile)
    calls = _spy(monkeypatch, "_attend_padded")
    b = testing.make_ragged_batch(np.random.default_rng(7), seqs, head_dim=16, block_size=4)
    _check(b, logits_soft_cap=30.0)
    assert len(calls) == (1 if tile is None else 3)


@pytest.mark.parametrize("cap", [None, 30.0], ids=["flash_tiles", "padded_tiles"])
def test_sequence_of_exactly_the_long_prefill_minimum_is_computed(cap, monkeypatch):
    """With the long-prefill minimum at 9 query tokens (FLASH_PREFILL_MIN for torch's fused
    kernel; PREFILL_Q_TILE + 1 for the padded tiles under a soft cap), a sequence of exactly 9
    runs in tiles (of 4 or 8 tokens) and one of 3 with the short ones: both written, equal to
    the reference."""
    from prefixkv.torch_frontend import _native

    monkeypatch.setattr(_native, "RAGGED_DECODE_MAX_Q", 0)  # not the kernel's token route
    monkeypatch.setattr(_native, "FLASH_PREFILL_MIN", 9)
    monkeypatch.setattr(_native, "FLASH_PREFILL_TILE", 4)
    monkeypatch.setattr(_native, "PREFILL_Q_TILE", 8)
    calls = _spy(monkeypatch, "_tiled_prefill")
    b = testing.make_ragged_batch(np.random.default_rng(9), [(3, 10), (9, 14)], head_dim=16,
                                  block_size=4)
    _check(b, logits_soft_cap=cap)
    assert calls


def test_nan_state_merged_with_an_empty_state_stays_nan():
    """merge_attention_states: a NaN state (lse NaN) merged with an empty one (lse -inf, or
    FlashAttention-2's +inf) gives out and lse NaN in either order, as the reference (an empty
    state must not turn it into out 0, lse -inf); in a float32 and a bfloat16 out."""
    oa = np.ones((3, 2, 4), np.float32)
    ob = np.full((3, 2, 4), 2.0, np.float32)
    la = np.array([[np.nan] * 2, [np.nan] * 2, [np.nan, 0.5]], np.float32)
    lb = np.array([[-np.inf] * 2, [np.inf] * 2, [-np.inf, -np.inf]], np.float32)
    for args in ((oa, la, ob, lb), (ob, lb, oa, la)):
        want, want_lse = ref.merge_attention_states_reference(*args)
        for dtype in (torch.float32, torch.bfloat16):
            ts = [T(a) if a.ndim == 2 else T(a).to(dtype) for a in args]
            out, lse = tf.merge_attention_states(*ts)
            np.testing.assert_array_equal(np.isnan(N(out)), np.isnan(want))
            np.testing.assert_array_equal(np.isnan(N(lse)), np.isnan(want_lse))
            assert np.isnan(N(lse))[:, 0].all() and not np.isnan(N(lse)[2, 1])
            np.testing.assert_allclose(N(out)[2, 1], want[2, 1], rtol=1e-2)


def test_shared_prefix_nan_in_own_key_of_a_sequence_with_no_prefix_stays_nan(monkeypatch):
    """The CPU cascade with every group kept: a sequence of no prefix (its prefix state empty)
    whose own key 0 is NaN; the merge keeps its rows' out and lse NaN (kv head 0's q heads),
    as the reference."""
    from prefixkv.torch_frontend import _native

    monkeypatch.setattr(_native, "CASCADE_MIN_ROWS", 0)
    monkeypatch.setattr(_native, "CASCADE_MIN_SEQS", 1)
    monkeypatch.setattr(_native, "CASCADE_MIN_SCORES", 0)
    calls = _spy(monkeypatch, "_merge_states")
    rng = np.random.default_rng(5)
    b = testing.small_shared_prefix_batch(rng, False)  # sequence 2 has no prefix
    b.k_cache[int(b.block_tables[2, 0]), 0, 0, 3] = np.nan
    want, want_lse = ref.shared_prefix_attention_reference(*b.args(), return_lse=True)
    out, lse = tf.shared_prefix_attention(*(T(a) for a in b.args()), return_lse=True)
    assert np.isnan(want_lse).any()
    np.testing.assert_array_equal(np.isnan(N(lse)), np.isnan(want_lse))
    np.testing.assert_array_equal(np.isnan(N(out)), np.isnan(want))
    assert calls


@pytest.mark.parametrize("dense_min_rows", [1, 10**9], ids=["dense", "fused_kernel"])
def test_cascade_prefix_pass_with_logits_in_the_hundreds(dense_min_rows, monkeypatch):
    """The CPU cascade's prefix pass (every group kept) with logits up to a few hundred (q
    scaled by 40: past exp's float32 range unless the row max is taken out first), through the
    dense per-head path (exp2 of base-2 logits) and through torch's fused kernel: the
    reference's out and lse, no NaN or inf."""
    from prefixkv.torch_frontend import _native

    monkeypatch.setattr(_native, "CASCADE_MIN_ROWS", 0)
    monkeypatch.setattr(_native, "CASCADE_MIN_SEQS", 1)
    monkeypatch.setattr(_native, "CASCADE_MIN_SCORES", 0)
    monkeypatch.setattr(_native, "DENSE_MIN_ROWS", dense_min_rows)
    calls = _spy(monkeypatch, "_dense_chunk")
    rng = np.random.default_rng(17)
    b = testing.make_shared_prefix_batch(rng, [3, 2], [(0, 2, 5), (1, 1, 3), (0, 3, 9)],
                                         head_dim=64, block_size=8)
    b.q *= 40.0
    want, want_lse = ref.shared_prefix_attention_reference(*b.args(), return_lse=True)
    assert np.abs(want_lse).max() > 100  # e^100 and 2^(100 / ln 2) pass float32
    out, lse = tf.shared_prefix_attention(*(T(a) for a in b.args()), return_lse=True)
    close(out, want, "float32")
    testing.assert_lse_close(N(lse), want_lse)
    assert bool(calls) == (dense_min_rows == 1)
