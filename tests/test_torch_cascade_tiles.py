"""The torch CPU cascade's prefix part with host metadata (_native._host_prefix_pass): each
prefix's tokens, and only those, in tiles of at most PREFIX_TILE_BYTES of float32 queries,
each tile merged into its rows of out; and the rule that a prefix of one sequence gets no
pass of its own (_native.CASCADE_MIN_SEQS)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from prefixkv.paged import reference as ref  # noqa: E402
from prefixkv.paged import testing  # noqa: E402
from prefixkv.torch_frontend import _native  # noqa: E402
from torch_convert import T  # noqa: E402

from prefixkv import torch_frontend as tf  # noqa: E402

HQ, HKV, D, BS = 4, 2, 32, 4
GROUP = HQ // HKV
#: prefix lengths in blocks: 7, 5 and 6 (28, 20 and 24 keys), lengths no own part uses, so the
#: spy below tells the prefix tiles from the own part's calls
PREFIX_BLOCKS = [7, 5, 6]


def _skewed(rng, scattered: bool, dtype: str = "float32"):
    """A prefill chunk of 37 tokens on prefix 0 beside decodes: three on prefix 1, two on
    prefix 2, two on none; prefix 0 shared by a second, one-token sequence. ``scattered``:
    the sequences interleaved, so no prefix's tokens are one range of rows."""
    seqs = [(0, 37, 41), (1, 1, 3), (1, 1, 2), (1, 1, 9), (2, 1, 5), (2, 1, 6), (-1, 1, 4),
            (-1, 1, 7), (0, 1, 2)]
    if scattered:
        seqs = [seqs[i] for i in (1, 4, 6, 0, 2, 5, 7, 3, 8)]
    return testing.make_shared_prefix_batch(rng, PREFIX_BLOCKS, seqs, num_q_heads=HQ,
                                            num_kv_heads=HKV, head_dim=D, block_size=BS,
                                            dtype=dtype, decode=False)


def _force_cascade(monkeypatch):
    monkeypatch.setattr(_native, "CASCADE_MIN_ROWS", 0)
    monkeypatch.setattr(_native, "CASCADE_MIN_SCORES", 0)
    monkeypatch.setattr(_native, "CASCADE_MIN_SEQS", 1)


def _torch(b):
    return [None if a is None else T(a) for a in b.args()]


@pytest.mark.parametrize("scattered", [False, True], ids=["ranges", "scattered"])
@pytest.mark.parametrize("tile_tokens", [1, 5, 1000])
def test_prefix_tiles_hold_each_prefix_tokens_only(monkeypatch, scattered, tile_tokens):
    """Every prefix tile hands _attend_host only tokens of its prefix, at most tile_tokens
    of them, all of them once; a prefill chunk beside decodes padded every prefix to the
    chunk's 37 tokens before (3 prefixes x 38 tokens of rows for 43 tokens with a prefix)."""
    _force_cascade(monkeypatch)
    monkeypatch.setattr(_native, "PREFIX_TILE_BYTES", tile_tokens * HQ * D * 4)
    b = _skewed(np.random.default_rng(1), scattered)
    plens = {int(n) for n in b.prefix_lens}
    tiles = []
    real = _native._attend_host

    def spy(out, lse, q, k_cache, v_cache, tables, lens, scale, *rest, **kw):
        if list(lens)[0] in plens and tables.shape[0] == 1:
            tiles.append((int(lens[0]), q.shape[0] * q.shape[2] // GROUP))
        return real(out, lse, q, k_cache, v_cache, tables, lens, scale, *rest, **kw)

    monkeypatch.setattr(_native, "_attend_host", spy)
    want, want_lse = ref.shared_prefix_attention_reference(*b.args(), return_lse=True)
    out, lse = tf.shared_prefix_attention(*_torch(b), return_lse=True)
    np.testing.assert_allclose(out.numpy(), want, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(lse.numpy(), want_lse, atol=2e-5, rtol=2e-5)
    tokens = {}
    for plen, n in tiles:
        assert n <= tile_tokens
        tokens[plen] = tokens.get(plen, 0) + n
    assert tokens == {28: 38, 20: 3, 24: 2}


#: (DENSE_MIN_ROWS, FLASH_MIN_ROWS) sending a tile's 6 rows per kv head through each route of
#: _attend_host: torch's fused kernel over small key chunks, the per-head matmuls, the fused
#: kernel over FLASH_PREFILL_CHUNK_BYTES chunks
ROUTES = {"fused": (10**9, 10**9), "dense": (1, 10**9), "fused_long": (1, 1)}


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("soft_cap", [None, 7.5])
@pytest.mark.parametrize("scattered", [False, True], ids=["ranges", "scattered"])
def test_prefix_tiles_match_the_reference(monkeypatch, dtype, soft_cap, scattered, route):
    """Tiles of 3 tokens (several per prefix, the last one shorter), through each route of
    _attend_host and, with a soft cap, _attend_padded; tokens of no prefix; out given or
    made, lse kept or not: the reference's result, and rows of out no token owns are not
    written."""
    _force_cascade(monkeypatch)
    monkeypatch.setattr(_native, "PREFIX_TILE_BYTES", 3 * HQ * D * 4)
    monkeypatch.setattr(_native, "DENSE_MIN_ROWS", ROUTES[route][0])
    monkeypatch.setattr(_native, "FLASH_MIN_ROWS", ROUTES[route][1])
    b = _skewed(np.random.default_rng(2), scattered, dtype)
    want, want_lse = ref.shared_prefix_attention_reference(*b.args(), logits_soft_cap=soft_cap,
                                                           return_lse=True)
    tol = 2e-5 if dtype == "float32" else 2e-2
    args = _torch(b)
    out, lse = tf.shared_prefix_attention(*args, logits_soft_cap=soft_cap, return_lse=True)
    np.testing.assert_allclose(out.float().numpy(), want, atol=tol, rtol=tol)
    np.testing.assert_allclose(lse.numpy(), want_lse, atol=1e-4, rtol=1e-4)
    wide = torch.full((b.q.shape[0] + 2, *b.q.shape[1:]), float("nan"), dtype=out.dtype)
    got = tf.shared_prefix_attention(*args, logits_soft_cap=soft_cap, out=wide[1:-1])
    assert got.data_ptr() == wide[1:-1].data_ptr()
    assert torch.equal(wide[1:-1], out)
    assert wide[0].isnan().all() and wide[-1].isnan().all()


def test_a_prefix_of_one_sequence_gets_no_pass():
    """The shipped rule: a prefix that one sequence of the batch uses is read through that
    sequence's table (a 64-token chunk over 512 keys: 128 rows, 2**16 scores, both past the
    thresholds), one that two decodes share keeps its pass (here with the thresholds met by
    their 1024 prefix keys: only the sequence count differs)."""
    group, bs = 2, 16
    plens = [512, 1024, 1024]
    width = max(plens) // bs
    ptab = torch.arange(3 * width, dtype=torch.int32).view(3, width)
    # prefix 0: one 64-token chunk; prefix 1: 64 one-token decodes; prefix 2: one sequence
    # of 64 tokens as well
    q_lens = [64] + [1] * 64 + [64]
    pids = torch.tensor([0] + [1] * 64 + [2], dtype=torch.int32)
    n = len(q_lens)
    own = torch.arange(n * 4, dtype=torch.int32).view(n, 4) + 3 * width
    kv = torch.tensor(q_lens, dtype=torch.int32)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(q_lens)]), dtype=torch.int32)
    _, got_lens, got_ids, tables, got_kv = _native._cascade_groups(
        group, bs, 4, ptab, torch.tensor(plens, dtype=torch.int32), pids, own, kv, cu)
    assert got_lens.tolist() == [1024]
    assert got_ids.tolist() == [-1] + [0] * 64 + [-1]
    assert got_kv.tolist() == [64 + 512] + [1] * 64 + [64 + 1024]
    np.testing.assert_array_equal(tables[0, :32].numpy(), ptab[0, :32].numpy())
    np.testing.assert_array_equal(tables[0, 32:36].numpy(), own[0].numpy())


@pytest.mark.parametrize("pad_sync_bytes", [0, 1 << 40], ids=["synced", "padded"])
@pytest.mark.parametrize("soft_cap", [None, 7.5])
def test_device_metadata_route_on_the_cpu(monkeypatch, pad_sync_bytes, soft_cap):
    """The route for metadata on a device (every prefix padded to the batch's token count, or
    to its longest group after a sync past PAD_SYNC_BYTES), run here by taking every tensor
    for a device one: the reference's result, the prefill chunk beside decodes and tokens of
    no prefix included."""
    _force_cascade(monkeypatch)
    monkeypatch.setattr(_native, "_on_host", lambda *t: False)
    monkeypatch.setattr(_native, "PAD_SYNC_BYTES", pad_sync_bytes)
    b = _skewed(np.random.default_rng(4), scattered=True)
    want, want_lse = ref.shared_prefix_attention_reference(*b.args(), logits_soft_cap=soft_cap,
                                                           return_lse=True)
    out, lse = tf.shared_prefix_attention(*_torch(b), logits_soft_cap=soft_cap,
                                          return_lse=True)
    np.testing.assert_allclose(out.numpy(), want, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(lse.numpy(), want_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("rows", [8, 64, 255, 256, 1024])
def test_attend_host_route_by_rows(monkeypatch, rows):
    """_attend_host's own choice: per-head matmuls (_dense_chunk) from DENSE_MIN_ROWS rows per
    kv head up to FLASH_MIN_ROWS, torch's fused kernel below and from there on (over
    FLASH_PREFILL_CHUNK_BYTES key chunks: 1.1-1.3x faster for a long prefix tile); the
    result is the reference's either way."""
    used = []
    real = _native._dense_chunk
    monkeypatch.setattr(_native, "_dense_chunk", lambda *a: (used.append(1), real(*a))[1])
    rng = np.random.default_rng(rows)
    keys, nb = 40, 12
    k = torch.from_numpy(rng.standard_normal((nb, BS, HKV, D), dtype=np.float32))
    v = torch.from_numpy(rng.standard_normal((nb, BS, HKV, D), dtype=np.float32))
    table = torch.tensor([[3, 7, 1, 0, 9, 4, 11, 2, 5, 6]], dtype=torch.int32)
    q = torch.from_numpy(rng.standard_normal((1, HKV, rows, D), dtype=np.float32))
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3])
    _native._attend_host(out, lse, q, k, v, table, [keys], 0.125)
    assert bool(used) == (_native.DENSE_MIN_ROWS <= rows < _native.FLASH_MIN_ROWS)
    kv = torch.cat([k[table[0].long()].reshape(-1, HKV, D)[:keys],
                    v[table[0].long()].reshape(-1, HKV, D)[:keys]], dim=2)
    kk, vv = kv[..., :D].permute(1, 0, 2), kv[..., D:].permute(1, 0, 2)  # [Hkv, keys, D]
    s = torch.einsum("hrd,hkd->hrk", q[0].double(), kk.double()) * 0.125
    want = torch.einsum("hrk,hkd->hrd", torch.softmax(s, -1), vv.double())
    torch.testing.assert_close(out[0].double(), want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse[0].double(), torch.logsumexp(s, -1), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_own_part_in_float32_by_the_kernel(monkeypatch, dtype):
    """A 16-bit mixed batch's own part goes to paged_attention with a float32 out (unrounded
    for the merge: tests/test_cascade_accuracy.py), and its decodes still run in the compiled
    kernel, which writes float32 for it: before it did, a float32 out sent them to the padded
    path (2x paged attention's time over the joined tables), so the part was in q's dtype."""
    _force_cascade(monkeypatch)
    seen, kernel = [], []
    real, real_c = _native.paged_attention, _native._c_decode

    def spy(out, *a, **kw):
        seen.append(out.dtype)
        return real(out, *a, **kw)

    def spy_c(out, lse, q, *a, **kw):
        ran = real_c(out, lse, q, *a, **kw)
        kernel.append((out.dtype, ran))
        return ran

    monkeypatch.setattr(_native, "paged_attention", spy)
    monkeypatch.setattr(_native, "_c_decode", spy_c)
    b = _skewed(np.random.default_rng(5), scattered=True, dtype=dtype)
    want = ref.shared_prefix_attention_reference(*b.args())
    got = tf.shared_prefix_attention(*_torch(b))
    assert seen and all(d == torch.float32 for d in seen), seen
    if _native._DECODE.get("module") is not None and _native._DECODE["module"].available():
        assert (torch.float32, True) in kernel, kernel
    np.testing.assert_allclose(got.float().numpy(), want, atol=2e-2, rtol=2e-2)
