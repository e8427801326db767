"""The torch CPU path on mixed batches (decodes plus prefill chunks in one call, what vLLM's
chunked-prefill scheduler gives), against the numpy reference with every option of the op
contract, by both routes: every token a decode of the compiled kernel (_native._c_ragged, up
to RAGGED_DECODE_MAX_Q tokens a sequence), and groups of sequences (_native._q_len_groups)
that each pad only to their own longest q_len, the decodes through the decode path."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from prefixkv.paged import reference as ref  # noqa: E402
from prefixkv.paged import testing  # noqa: E402
from prefixkv.torch_frontend import _native  # noqa: E402
from torch_convert import N, T, check_paged_attention, close  # noqa: E402

from prefixkv import torch_frontend as tf  # noqa: E402

# (q_len, kv_len) per sequence
MIXED = {
    # vLLM's order: the decodes, then one chunk of a prefill over its cached prefix
    "decodes_then_chunk": [(1, 40)] * 5 + [(1, 9), (1, 1), (13, 30)],
    # interleaved, padding sequences (q_len 0, with and without keys), several chunk sizes
    "interleaved": [(1, 9), (7, 20), (0, 0), (1, 33), (3, 3), (0, 5), (1, 1), (16, 40),
                    (2, 17), (1, 24)],
    # one class plus padding sequences: the padding ones are dropped
    "decodes_and_padding": [(1, 12), (0, 0), (1, 30), (0, 7), (1, 1)],
    "one_chunk_and_padding": [(5, 12), (0, 0), (6, 6)],
}
OPTIONS = [
    {},
    {"sliding_window": 5},
    {"logits_soft_cap": 3.0},
    {"causal": False},
    {"scale": 0.3, "sliding_window": 1, "logits_soft_cap": 2.0},
]


def _opts_id(o):
    return ",".join(f"{k}={v}" for k, v in o.items()) or "default"


def _batch(seqs, dtype, opts, seed=0, block_size=8):
    rng = np.random.default_rng(seed)
    return testing.make_ragged_batch(rng, seqs, num_q_heads=8, num_kv_heads=2, head_dim=32,
                                     block_size=block_size, dtype=dtype,
                                     sliding_window=opts.get("sliding_window"))


@pytest.fixture(params=["kernel", "groups"])
def route(request, monkeypatch):
    """The route of a short ragged batch: the compiled kernel's decodes, or the groups."""
    if request.param == "groups":
        monkeypatch.setattr(_native, "RAGGED_DECODE_MAX_Q", 0)
        monkeypatch.setattr(_native, "RAGGED_DECODE_16BIT_MAX_Q", 0)
    return request.param


@pytest.mark.parametrize("opts", OPTIONS, ids=_opts_id)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("grid", list(MIXED))
def test_mixed_batches_match_reference(grid, dtype, opts, route):
    """out= and lse= pre-filled with NaN (an unwritten row fails), NaN in every slot no query
    sees (past kv_len, unused blocks, before a window)."""
    b = _batch(MIXED[grid], dtype, opts, seed=len(grid))
    want = check_paged_attention(b, dtype, **opts)
    no_lse = tf.paged_attention(*(T(a) for a in b.args()), **opts)  # lse=None in every group
    close(no_lse, want, dtype)


@pytest.mark.parametrize("layout", ["noncontiguous_q", "k_v_strides_differ", "no_c_decode"])
def test_mixed_batch_layouts_the_kernel_does_not_take(layout, route, monkeypatch):
    """Inputs the compiled decode kernel refuses (a strided q; K a view of a stacked cache, V
    not: two block strides), or no kernel at all: the decode group falls back to the padded
    path, same results."""
    opts = {"sliding_window": 6, "logits_soft_cap": 4.0}
    b = _batch(MIXED["interleaved"], "float32", opts, seed=3)
    want, want_lse = ref.paged_attention_reference(*b.args(), return_lse=True, **opts)
    q, k, v, tables, kv_lens, cu = (T(a) for a in b.args())
    if layout == "noncontiguous_q":
        q = torch.cat([q, torch.full_like(q, float("nan"))], dim=-1)[..., :q.shape[-1]]
        assert not q.is_contiguous()
    elif layout == "k_v_strides_differ":
        k = torch.stack([k, v], dim=1)[:, 0]
        assert _native._cache_strides(k, v) is None
    else:
        monkeypatch.setattr(_native, "_c_decode", lambda *a, **kw: False)
    got, got_lse = tf.paged_attention(q, k, v, tables, kv_lens, cu, return_lse=True, **opts)
    close(got, want, "float32")
    np.testing.assert_allclose(N(got_lse), want_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("metadata", ["device-no-sync", "device-synced"])
def test_mixed_batch_with_metadata_on_a_device(metadata, monkeypatch):
    """The path for metadata on a GPU, forced on CPU tensors: with no sync one padded batch
    (no grouping: the lengths are not read), past PAD_SYNC_BYTES the lengths read back and
    the batch grouped like the host's."""
    monkeypatch.setattr(_native, "_on_host", lambda *t: False)
    monkeypatch.setattr(_native, "_c_decode", lambda *a, **kw: False)
    if metadata == "device-synced":
        monkeypatch.setattr(_native, "PAD_SYNC_BYTES", 0)
    opts = {"sliding_window": 7}
    b = _batch(MIXED["interleaved"], "bfloat16", opts, seed=4)
    want, want_lse = ref.paged_attention_reference(*b.args(), return_lse=True, **opts)
    padded = []
    real = _native._attend_padded
    monkeypatch.setattr(_native, "_attend_padded", lambda q, *a, **k: padded.append(
        tuple(q.shape[:2])) or real(q, *a, **k))
    got, got_lse = tf.paged_attention(*(T(a) for a in b.args()), return_lse=True, **opts)
    close(got, want, "bfloat16")
    np.testing.assert_allclose(N(got_lse), want_lse, atol=1e-4, rtol=1e-4)
    num_seqs, num_tokens = len(MIXED["interleaved"]), b.q.shape[0]
    if metadata == "device-no-sync":
        assert padded == [(num_seqs, num_tokens)]
    else:  # decodes, then the classes (2], (2, 4], (4, 8], (8, 16]
        assert padded == [(4, 1), (1, 2), (1, 3), (1, 7), (1, 16)]


def test_long_prefill_tiles_with_a_mixed_short_group(monkeypatch):
    """A causal batch with a sequence past PREFILL_Q_TILE goes to _tiled_prefill; its short
    sequences (decodes and chunks) are grouped by q_len in turn."""
    monkeypatch.setattr(_native, "PREFILL_Q_TILE", 8)
    monkeypatch.setattr(_native, "RAGGED_DECODE_16BIT_MAX_Q", 0)  # the groups, not _c_ragged
    opts = {"sliding_window": 9, "logits_soft_cap": 5.0}
    seqs = [(1, 20), (19, 40), (0, 0), (1, 3), (5, 9), (1, 17), (8, 8), (1, 6), (1, 11),
            (1, 30), (1, 2)]
    b = _batch(seqs, "float16", opts, seed=5, block_size=4)
    want, want_lse = ref.paged_attention_reference(*b.args(), return_lse=True, **opts)
    padded = []
    real = _native._attend_padded
    monkeypatch.setattr(_native, "_attend_padded", lambda q, *a, **k: padded.append(
        q.shape[0] * q.shape[1]) or real(q, *a, **k))
    got, got_lse = tf.paged_attention(*(T(a) for a in b.args()), return_lse=True, **opts)
    close(got, want, "float16")
    np.testing.assert_allclose(N(got_lse), want_lse, atol=2e-3, rtol=1e-4)
    # tiles of 8, 8, 3 rows, the chunks of 5 and 8 padded to 8, the decodes 1 each (or by
    # the kernel); all short sequences padded to 8 took 8 x 8 + 19 = 83 rows for 38 tokens
    assert sum(padded) <= 19 + 16 + 6 < 1.5 * b.q.shape[0]


def test_mixed_batch_pads_each_group_to_its_own_longest(monkeypatch):
    """The routing of the groups (results were the same when every sequence padded to the
    longest q_len, at 25-44x the time): 24 decodes + chunks of 13 and 3 tokens allocate
    padded query rows for at most twice the batch's tokens (one padded call: 26 x 13 = 338
    rows for 40 tokens), and with the compiled kernel built the decodes run through it, in
    one call."""
    from prefixkv.kernels.cpu import decode

    monkeypatch.setattr(_native, "RAGGED_DECODE_MAX_Q", 12)  # the chunk of 13: groups
    seqs = [(1, 40)] * 12 + [(13, 30)] + [(1, 25)] * 12 + [(3, 11)]
    b = _batch(seqs, "float32", {}, seed=6)
    num_tokens = b.q.shape[0]
    padded = []
    real = _native._attend_padded
    monkeypatch.setattr(_native, "_attend_padded", lambda q, *a, **k: padded.append(
        q.shape[0] * q.shape[1]) or real(q, *a, **k))
    kernel_seqs = []
    real_kernel = decode.decode_attention
    monkeypatch.setattr(decode, "decode_attention", lambda dtype, dims, *a, **k: (
        kernel_seqs.append(dims[0]), real_kernel(dtype, dims, *a, **k)))
    got, got_lse = tf.paged_attention(*(T(a) for a in b.args()), return_lse=True)
    want, want_lse = ref.paged_attention_reference(*b.args(), return_lse=True)
    close(got, want, "float32")
    np.testing.assert_allclose(N(got_lse), want_lse, atol=1e-4, rtol=1e-4)
    assert sum(padded) <= 2 * num_tokens, padded
    if decode.available():  # the decodes in one call, then the chunk of 3 (_c_ragged)
        assert kernel_seqs == [24, 3]
        assert sum(padded) == 13
    else:
        assert kernel_seqs == [] and sum(padded) == 24 + 13 + 3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_short_ragged_batch_is_one_kernel_call(dtype, monkeypatch):
    """Up to the dtype's RAGGED_DECODE_*MAX_Q tokens a sequence, the whole batch (decodes,
    chunks, padding sequences) is one call of the compiled kernel with a sequence per token,
    nothing padded; one token more and the chunk goes to the groups."""
    from prefixkv.kernels.cpu import decode

    if not decode.available():
        pytest.skip(f"the compiled decode kernel: {decode.status()}")
    longest = (_native.RAGGED_DECODE_MAX_Q if dtype == "float32"
               else _native.RAGGED_DECODE_16BIT_MAX_Q)
    opts = {"sliding_window": 11, "logits_soft_cap": 6.0}
    kernel_seqs, padded = [], []
    real_kernel, real_padded = decode.decode_attention, _native._attend_padded
    monkeypatch.setattr(decode, "decode_attention", lambda dt, dims, *a, **k: (
        kernel_seqs.append(dims[0]), real_kernel(dt, dims, *a, **k)))
    monkeypatch.setattr(_native, "_attend_padded", lambda q, *a, **k: padded.append(
        q.shape[0] * q.shape[1]) or real_padded(q, *a, **k))
    for q_len in (longest, longest + 1):
        seqs = [(1, 40), (3, 9), (0, 4), (q_len, 60), (1, 1), (4, 4), (1, 23)]
        b = _batch(seqs, dtype, opts, seed=q_len)
        kernel_seqs.clear()
        padded.clear()
        want, want_lse = ref.paged_attention_reference(*b.args(), return_lse=True, **opts)
        got, got_lse = tf.paged_attention(*(T(a) for a in b.args()), return_lse=True, **opts)
        close(got, want, dtype)
        np.testing.assert_allclose(N(got_lse), want_lse, atol=1e-4, rtol=1e-4)
        num_tokens = b.q.shape[0]
        if q_len <= longest:
            assert kernel_seqs == [num_tokens] and padded == [], (kernel_seqs, padded)
        else:  # every other token still by the kernel (the decodes; the chunks of 3 and 4)
            assert sum(kernel_seqs) == num_tokens - q_len, kernel_seqs


def test_unchecked_lengths_take_no_host_route(monkeypatch):
    """Value checks off and host cu_q_lens that are no ragged batch (past the tokens, not
    from 0, decreasing, not ending at the token count): the padded path the device takes for
    any metadata runs it, bounded by the token count; no host route sized by the lengths
    (a 10**6-token sequence once sent an empty tile to torch's flash kernel, which died of
    SIGFPE)."""
    from prefixkv.paged import validate

    def refuse(*a, **k):
        raise AssertionError("a host route ran for lengths that are no ragged batch")

    for route in ("_tiled_prefill", "_grouped_attention", "_c_ragged"):
        monkeypatch.setattr(_native, route, refuse)
    b = _batch([(1, 5), (1, 7), (1, 9)], "float32", {}, seed=10)
    q, k, v, tables, kv_lens, _ = (T(a) for a in b.args())
    for cu in ([0, 1, 10**6, 3], [1, 1, 2, 3], [0, 2, 1, 3], [0, 1, 2, 2], [0, 1, 2, -3]):
        with validate.value_checks(False):
            got = tf.paged_attention(q, k, v, tables, kv_lens,
                                     torch.tensor(cu, dtype=torch.int32))
        assert got.shape == q.shape


def test_unchecked_ragged_lengths_fall_back_from_the_kernel():
    """Value checks off and cu_q_lens not a ragged batch (decreasing, or not ending at the
    token count): _c_ragged declines (no negative repeat count reaches numpy) and the other
    paths run it (unspecified results), no error."""
    from prefixkv.paged import validate

    b = _batch([(2, 5), (3, 7)], "float32", {}, seed=9)
    q, k, v, tables, kv_lens, _ = (T(a) for a in b.args())
    for cu in ([0, 3, 2], [0, 4, 6], [0, 2, 4]):
        cu = torch.tensor(cu, dtype=torch.int32)
        assert not _native._c_ragged(torch.empty_like(q), None, q, k, v, tables, kv_lens, cu,
                                     0.5, True, None, None)
        with validate.value_checks(False):
            got = tf.paged_attention(q, k, v, tables, kv_lens, cu)
        assert got.shape == q.shape
