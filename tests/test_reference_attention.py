"""The attention reference: tiny hand-worked cases, then a brute-force per-token loop over the
shared random ragged grids."""

import math

import numpy as np
import pytest
from prefixkv.paged import testing
from prefixkv.paged.reference import (
    merge_attention_states_reference,
    paged_attention_reference,
    shared_prefix_attention_reference,
)

E = math.e


def tiny_cache(keys, values, block_size=2):
    """One kv head; keys/values [L, head_dim] laid out in blocks 1, 0, 2 (shuffled order)."""
    keys, values = np.asarray(keys, np.float32), np.asarray(values, np.float32)
    n, d = keys.shape
    order = [1, 0, 2]
    k = np.full((3, block_size, 1, d), np.nan, np.float32)
    v = np.full((3, block_size, 1, d), np.nan, np.float32)
    for t in range(n):
        k[order[t // block_size], t % block_size, 0] = keys[t]
        v[order[t // block_size], t % block_size, 0] = values[t]
    return k, v, np.array([order], np.int32)


def test_decode_two_keys_hand_worked():
    # q=[1,0], k0=[1,0], k1=[0,0], scale 1: logits [1, 0], p = [e, 1] / (e + 1)
    # v0=[1,0], v1=[0,1]: out = [e/(e+1), 1/(e+1)] = [0.7310586, 0.2689414], lse = log(e + 1)
    k, v, bt = tiny_cache([[1, 0], [0, 0]], [[1, 0], [0, 1]])
    q = np.array([[[1, 0]]], np.float32)
    out, lse = paged_attention_reference(q, k, v, bt, np.array([2], np.int32), scale=1.0,
                                         return_lse=True)
    np.testing.assert_allclose(out[0, 0], [E / (E + 1), 1 / (E + 1)], rtol=1e-6)
    np.testing.assert_allclose(lse[0, 0], math.log(E + 1), rtol=1e-6)


def test_default_scale_is_head_dim_rsqrt():
    # head_dim 4, q=k=[1,1,1,1]: q.k = 4, scale 4**-0.5 = 0.5 -> logit 2 for the one key, lse 2
    k, v, bt = tiny_cache([[1, 1, 1, 1]], [[3, 3, 3, 3]])
    q = np.ones((1, 1, 4), np.float32)
    out, lse = paged_attention_reference(q, k, v, bt, np.array([1], np.int32), return_lse=True)
    np.testing.assert_allclose(lse, [[2.0]], rtol=1e-6)
    np.testing.assert_allclose(out, 3.0)


def test_causal_prefill_hand_worked():
    # Prefill of 3 tokens, keys [1],[2],[3] (head_dim 1), q = [1] each, scale 1, values = keys.
    # token 0 (pos 0) sees key 0 only: out 1, lse 1.
    # token 1 sees logits [1, 2]: out = (1 e + 2 e^2) / (e + e^2), lse = log(e + e^2).
    # token 2 sees logits [1, 2, 3]: out = (e + 2e^2 + 3e^3)/(e + e^2 + e^3).
    k, v, bt = tiny_cache([[1], [2], [3]], [[1], [2], [3]])
    q = np.ones((3, 1, 1), np.float32)
    cu = np.array([0, 3], np.int32)
    out, lse = paged_attention_reference(q, k, v, bt, np.array([3], np.int32), cu, scale=1.0,
                                         return_lse=True)
    want = [1.0, (E + 2 * E**2) / (E + E**2), (E + 2 * E**2 + 3 * E**3) / (E + E**2 + E**3)]
    np.testing.assert_allclose(out[:, 0, 0], want, rtol=1e-6)
    np.testing.assert_allclose(lse[:, 0], [1.0, math.log(E + E**2), math.log(E + E**2 + E**3)],
                               rtol=1e-6)
    # causal=False: every token sees all three keys -> all rows equal the last one.
    out_nc = paged_attention_reference(q, k, v, bt, np.array([3], np.int32), cu, scale=1.0,
                                       causal=False)
    np.testing.assert_allclose(out_nc[:, 0, 0], [want[2]] * 3, rtol=1e-6)


def test_prefill_over_cached_prefix_positions():
    # kv_len 3, q_len 1 at position 2 (two cached tokens before it): sees all three keys,
    # same as row 2 of the full prefill above.
    k, v, bt = tiny_cache([[1], [2], [3]], [[1], [2], [3]])
    out = paged_attention_reference(np.ones((1, 1, 1), np.float32), k, v, bt,
                                    np.array([3], np.int32), np.array([0, 1], np.int32),
                                    scale=1.0)
    np.testing.assert_allclose(out[0, 0, 0], (E + 2 * E**2 + 3 * E**3) / (E + E**2 + E**3),
                               rtol=1e-6)


def test_sliding_window_hand_worked():
    # window 2 at position 2 sees keys t in (0, 2]: logits [2, 3] -> (2 e^2 + 3 e^3)/(e^2 + e^3)
    k, v, bt = tiny_cache([[1], [2], [3]], [[1], [2], [3]])
    out = paged_attention_reference(np.ones((1, 1, 1), np.float32), k, v, bt,
                                    np.array([3], np.int32), scale=1.0, sliding_window=2)
    np.testing.assert_allclose(out[0, 0, 0], (2 * E**2 + 3 * E**3) / (E**2 + E**3), rtol=1e-6)
    # window 1 sees only itself: out = v2 = 3
    out1 = paged_attention_reference(np.ones((1, 1, 1), np.float32), k, v, bt,
                                     np.array([3], np.int32), scale=1.0, sliding_window=1)
    np.testing.assert_allclose(out1[0, 0, 0], 3.0)


def test_soft_cap_hand_worked():
    # one key, logit 10, cap 5: 5 tanh(2) = 4.8201379 is the lse (a single key: out = v)
    k, v, bt = tiny_cache([[10]], [[7]])
    out, lse = paged_attention_reference(np.ones((1, 1, 1), np.float32), k, v, bt,
                                         np.array([1], np.int32), scale=1.0, logits_soft_cap=5.0,
                                         return_lse=True)
    np.testing.assert_allclose(lse[0, 0], 5 * math.tanh(2.0), rtol=1e-6)
    np.testing.assert_allclose(out[0, 0, 0], 7.0)


def test_soft_cap_keeps_huge_logits_finite():
    k, v, bt = tiny_cache([[1e30], [-1e30]], [[1], [2]])
    out = paged_attention_reference(np.ones((1, 1, 1), np.float32), k, v, bt,
                                    np.array([2], np.int32), scale=1.0, logits_soft_cap=30.0)
    assert np.isfinite(out).all()


def test_gqa_head_mapping():
    # 4 q heads over 2 kv heads: q heads 0,1 read kv head 0 (values 1), heads 2,3 read kv head 1
    k = np.zeros((1, 2, 2, 1), np.float32)
    v = np.zeros((1, 2, 2, 1), np.float32)
    v[0, :, 0], v[0, :, 1] = 1.0, 2.0
    out = paged_attention_reference(np.ones((1, 4, 1), np.float32), k, v,
                                    np.array([[0]], np.int32), np.array([2], np.int32))
    np.testing.assert_allclose(out[0, :, 0], [1, 1, 2, 2])


def test_padding_sequences_and_empty_batch():
    rng = np.random.default_rng(0)
    rb = testing.make_ragged_batch(rng, [(0, 0), (2, 5), (0, 3)], block_size=4)
    out = paged_attention_reference(*rb.args())
    assert out.shape == (2, 4, 64) and np.isfinite(out).all()
    rb0 = testing.make_ragged_batch(rng, [(0, 0)], block_size=4)
    assert paged_attention_reference(*rb0.args()).shape == (0, 4, 64)


def test_merge_hand_worked():
    # a: out 1, lse 0 (weight e^0 = 1); b: out 3, lse log 3 (weight 3):
    # out = (1*1 + 3*3) / 4 = 2.5, lse = log 4
    out, lse = merge_attention_states_reference(
        np.array([[[1.0]]], np.float32), np.array([[0.0]], np.float32),
        np.array([[[3.0]]], np.float32), np.array([[math.log(3)]], np.float32))
    np.testing.assert_allclose(out, [[[2.5]]], rtol=1e-6)
    np.testing.assert_allclose(lse, [[math.log(4)]], rtol=1e-6)


def test_merge_positive_infinite_lse_is_an_empty_state():
    """FlashAttention-2 gives lse +inf for a row with no key; vLLM's merge reads it as empty."""
    a = np.full((3, 1, 2), 5.0, np.float32)
    b = np.full((3, 1, 2), 7.0, np.float32)
    la = np.array([[np.inf], [np.inf], [0.5]], np.float32)
    lb = np.array([[np.inf], [1.5], [np.inf]], np.float32)
    out, lse = merge_attention_states_reference(a, la, b, lb)
    np.testing.assert_array_equal(out, [[[0.0, 0.0]], [[7.0, 7.0]], [[5.0, 5.0]]])
    np.testing.assert_array_equal(lse, [[-np.inf], [1.5], [0.5]])


def test_merge_empty_states():
    inf = np.float32(-np.inf)
    a = np.full((2, 1, 3), 5.0, np.float32)
    b = np.full((2, 1, 3), 7.0, np.float32)
    # row 0: both empty -> out 0, lse -inf (no NaN); row 1: a empty -> b's state
    out, lse = merge_attention_states_reference(a, np.array([[inf], [inf]]), b,
                                                np.array([[inf], [1.5]], np.float32))
    np.testing.assert_array_equal(out[0], 0.0)
    assert lse[0, 0] == -np.inf
    np.testing.assert_allclose(out[1], 7.0)
    np.testing.assert_allclose(lse[1], 1.5)


# ------------------------------------------------------------------ brute force over the grids


def brute_force(rb: testing.RaggedBatch, *, scale=None, causal=True, sliding_window=None,
                logits_soft_cap=None):
    """One query token, one head, one key at a time, in Python floats."""
    q, kc, vc = rb.q.astype(np.float64), rb.k_cache, rb.v_cache
    num_tokens, hq, d = q.shape
    hkv, bs = kc.shape[2], kc.shape[1]
    scale = d**-0.5 if scale is None else scale
    cu = rb.cu_q_lens if rb.cu_q_lens is not None else np.arange(len(rb.kv_lens) + 1)
    out = np.zeros((num_tokens, hq, d))
    lse = np.full((num_tokens, hq), -np.inf)
    for s in range(len(rb.kv_lens)):
        q_len, kv_len = cu[s + 1] - cu[s], int(rb.kv_lens[s])
        for j in range(q_len):
            tok, p = cu[s] + j, kv_len - q_len + j
            for h in range(hq):
                kvh = h // (hq // hkv)
                logits, vals = [], []
                for t in range(kv_len):
                    if causal and t > p:
                        continue
                    if sliding_window is not None and t <= p - sliding_window:
                        continue
                    blk = rb.block_tables[s, t // bs]
                    x = scale * float(q[tok, h] @ kc[blk, t % bs, kvh].astype(np.float64))
                    if logits_soft_cap is not None:
                        x = logits_soft_cap * math.tanh(x / logits_soft_cap)
                    logits.append(x)
                    vals.append(vc[blk, t % bs, kvh].astype(np.float64))
                if logits:
                    m = max(logits)
                    w = [math.exp(x - m) for x in logits]
                    out[tok, h] = sum(wi * vi for wi, vi in zip(w, vals, strict=True)) / sum(w)
                    lse[tok, h] = m + math.log(sum(w))
    return out, lse


GQA = [(4, 4), (8, 2), (8, 1)]  # (num_q_heads, num_kv_heads): ratios 1, 4, 8
HEAD_DIMS = [64, 80, 128]


@pytest.mark.parametrize("grid", testing.GRID_NAMES)
@pytest.mark.parametrize("heads", GQA, ids=lambda h: f"hq{h[0]}-hkv{h[1]}")
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_against_brute_force(grid, heads, head_dim):
    rng = np.random.default_rng(hash((grid, heads, head_dim)) % 2**32)
    block_size = 8
    rb = testing.make_ragged_batch(rng, testing.seq_grid(grid, block_size),
                                   num_q_heads=heads[0], num_kv_heads=heads[1],
                                   head_dim=head_dim, block_size=block_size)
    out, lse = paged_attention_reference(*rb.args(), return_lse=True)
    want_out, want_lse = brute_force(rb)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [
    {"causal": False}, {"sliding_window": 5}, {"logits_soft_cap": 2.0}, {"scale": 0.3},
    {"sliding_window": 1, "logits_soft_cap": 10.0},
], ids=str)
@pytest.mark.parametrize("block_size", [1, 7, 16])
def test_options_against_brute_force(options, block_size):
    rng = np.random.default_rng(block_size)
    rb = testing.make_ragged_batch(rng, testing.seq_grid("mixed", block_size), num_q_heads=4,
                                   num_kv_heads=2, head_dim=16, block_size=block_size,
                                   q_scale=3.0, sliding_window=options.get("sliding_window"))
    out, lse = paged_attention_reference(*rb.args(), return_lse=True, **options)
    want_out, want_lse = brute_force(rb, **options)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_outputs_in_q_dtype(dtype):
    rng = np.random.default_rng(3)
    rb = testing.make_ragged_batch(rng, testing.seq_grid("prefill_with_prefix", 8),
                                   block_size=8, dtype=dtype, num_q_heads=4, num_kv_heads=1)
    out, lse = paged_attention_reference(*rb.args(), return_lse=True)
    assert str(out.dtype) == dtype and lse.dtype == np.float32
    want, _ = brute_force(rb)
    np.testing.assert_allclose(out.astype(np.float64), want, atol=2e-2, rtol=2e-2)


def test_split_keys_merge_equals_whole():
    """Attention over keys [0, n) merged with keys [n, L) (non-causal halves) equals the whole."""
    rng = np.random.default_rng(7)
    bs = 4
    rb = testing.make_ragged_batch(rng, [(1, 12), (1, 8)], block_size=bs, num_q_heads=4,
                                   num_kv_heads=2, head_dim=8)
    whole, whole_lse = paged_attention_reference(*rb.args(), causal=False, return_lse=True)
    first = np.array([4, 4], np.int32)  # first block of each sequence
    a, la = paged_attention_reference(rb.q, rb.k_cache, rb.v_cache, rb.block_tables[:, :1],
                                      first, causal=False, return_lse=True)
    rest_tables = np.ascontiguousarray(rb.block_tables[:, 1:])
    b, lb = paged_attention_reference(rb.q, rb.k_cache, rb.v_cache, rest_tables,
                                      rb.kv_lens - first, causal=False, return_lse=True)
    out, lse = merge_attention_states_reference(a, la, b, lb)
    np.testing.assert_allclose(out, whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, whole_lse, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("decode", [True, False])
def test_shared_prefix_equals_concatenation(decode):
    rng = np.random.default_rng(11)
    bs = 4
    if decode:
        seqs = [(0, 1, 3), (1, 1, 1), (0, 1, 9), (-1, 1, 6)]
    else:
        seqs = [(0, 3, 5), (1, 1, 1), (0, 2, 9), (-1, 4, 6), (1, 0, 0)]
    sb = testing.make_shared_prefix_batch(rng, [3, 2], seqs, num_q_heads=8, num_kv_heads=2,
                                          head_dim=16, block_size=bs, decode=decode)
    out, lse = shared_prefix_attention_reference(*sb.args(), return_lse=True)
    # Independent check: build each sequence's full table by hand and brute-force it.
    tables, lens = [], []
    for s, (p, _, kv) in enumerate(seqs):
        pre = list(sb.prefix_block_tables[p, :sb.prefix_lens[p] // bs]) if p >= 0 else []
        own = list(sb.block_tables[s, :-(-kv // bs)])
        tables.append(pre + own)
        lens.append(len(pre) * bs + kv)
    width = max(len(t) for t in tables)
    full = np.array([t + [0] * (width - len(t)) for t in tables], np.int32)
    rb = testing.RaggedBatch(sb.q, sb.k_cache, sb.v_cache, full, np.array(lens, np.int32),
                             sb.cu_q_lens, [])
    want_out, want_lse = brute_force(rb)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-6)
