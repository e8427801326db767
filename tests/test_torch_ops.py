"""prefixkv.torch_frontend on CPU (the vectorized torch backend) against the numpy reference on
the shared ragged grids, plus the custom-op contract: opcheck, torch.compile(fullgraph=True),
non-contiguous caches, out= buffers, backend selection errors and input checks."""

from __future__ import annotations

import re

import hypothesis
import numpy as np
import pytest
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from prefixkv.paged import reference as ref  # noqa: E402
from prefixkv.paged import spec, testing  # noqa: E402
from prefixkv.paged.registry import BackendError  # noqa: E402
from prefixkv.paged.spec import numpy_dtype  # noqa: E402
from torch_convert import TORCH_DTYPE, N, T, check_paged_attention, close  # noqa: E402

from prefixkv import torch_frontend as tf  # noqa: E402

DTYPES = ("float32", "float16", "bfloat16")






# (grid, block_size, num_q_heads, num_kv_heads, head_dim, dtype): a sampled grid
ATTN_CASES = [
    ("decode", 16, 8, 2, 64, "float32"),
    ("decode", 8, 8, 8, 128, "bfloat16"),
    ("prefill", 16, 4, 1, 80, "float16"),
    ("prefill_with_prefix", 16, 8, 1, 64, "float32"),
    ("mixed", 8, 8, 2, 64, "float32"),
    ("mixed", 16, 4, 4, 96, "bfloat16"),
    ("contexts", 1, 4, 2, 64, "float32"),
    ("contexts", 7, 4, 1, 64, "float16"),
    ("mixed", 32, 16, 2, 256, "float32"),
]
OPTIONS = [
    {},
    {"sliding_window": 5},
    {"logits_soft_cap": 3.0},
    {"causal": False},
    {"scale": 0.3, "sliding_window": 1},
]


def _case_id(c):
    return "-".join(str(v) for v in c)


@pytest.mark.parametrize("case", ATTN_CASES, ids=_case_id)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
                         or "default")
def test_paged_attention_matches_reference(case, opts):
    grid, bs, hq, hkv, d, dtype = case
    rng = np.random.default_rng(hash(_case_id(case)) % 2**32)
    b = testing.make_ragged_batch(rng, testing.seq_grid(grid, bs), num_q_heads=hq,
                                  num_kv_heads=hkv, head_dim=d, block_size=bs, dtype=dtype,
                                  sliding_window=opts.get("sliding_window"))
    check_paged_attention(b, dtype, **opts)


@pytest.mark.parametrize("pad_sync", ["no-sync", "sync"])
@pytest.mark.parametrize("case", ATTN_CASES, ids=_case_id)
def test_device_code_path_runs_on_cpu(case, pad_sync, monkeypatch):
    """The torch backend's path for metadata on a GPU (no host sync: padded to the batch's
    token count, masks instead of host-side bounds), forced on CPU tensors; both attention ops
    and the sync-free write_kv. ``sync``: every batch past PAD_SYNC_BYTES, so the lengths are
    read back and the padding is to the longest sequence / prefix group."""
    from prefixkv.torch_frontend import _native

    monkeypatch.setattr(_native, "_on_host", lambda *t: False)
    if pad_sync == "sync":
        monkeypatch.setattr(_native, "PAD_SYNC_BYTES", 0)
    monkeypatch.setattr(_native, "_c_decode", lambda *a, **k: False)
    grid, bs, hq, hkv, d, dtype = case
    rng = np.random.default_rng(hash(_case_id(case)) % 2**32 + 1)
    opts = {"sliding_window": 5, "logits_soft_cap": 3.0}
    b = testing.make_ragged_batch(rng, testing.seq_grid(grid, bs), num_q_heads=hq,
                                  num_kv_heads=hkv, head_dim=d, block_size=bs, dtype=dtype,
                                  sliding_window=5)
    want, want_lse = ref.paged_attention_reference(*b.args(), return_lse=True, **opts)
    got, got_lse = tf.paged_attention(*(T(a) for a in b.args()), return_lse=True, **opts)
    close(got, want, dtype)
    np.testing.assert_allclose(N(got_lse), want_lse, atol=1e-4, rtol=1e-4)
    sp = testing.make_shared_prefix_batch(rng, [2, 1], [(0, 1, 5), (1, 3, 9), (-1, 2, 4),
                                                        (0, 1, 1)], num_q_heads=hq,
                                          num_kv_heads=hkv, head_dim=d, block_size=bs,
                                          dtype=dtype)
    want, want_lse = ref.shared_prefix_attention_reference(*sp.args(), return_lse=True)
    padded_rows = []  # q_max of each padded attention: 7 tokens, prefix groups of 2 and 3
    real = _native._attend_padded
    monkeypatch.setattr(_native, "_attend_padded", lambda q, *a, **k: padded_rows.append(
        q.shape[1]) or real(q, *a, **k))
    got, got_lse = tf.shared_prefix_attention(*(T(a) for a in sp.args()), return_lse=True)
    close(got, want, dtype)
    np.testing.assert_allclose(N(got_lse), want_lse, atol=1e-4, rtol=1e-4)
    assert max(padded_rows) == (3 if pad_sync == "sync" else 7)
    key = testing.random_values(rng, (4, hkv, d), dtype)
    slots = np.array([-1, 3, -2, bs + 1], np.int32)
    wk, wv = ref.write_kv_reference(key, key, b.k_cache, b.v_cache, slots)
    kc, vc = T(b.k_cache), T(b.v_cache)
    _native._write_kv_no_sync(T(key), T(key), kc, vc, T(slots))
    assert N(kc).tobytes() == N(T(wk)).tobytes() and N(vc).tobytes() == N(T(wv)).tobytes()
    _native._write_kv_no_sync(T(key), T(key), kc, vc, T(np.full(4, -1, np.int32)))  # no live
    assert N(kc).tobytes() == N(T(wk)).tobytes()


@pytest.mark.parametrize("hkv,max_kv", [(8, 8192), (1, 32768), (4, 1024)])
def test_gpu_workspace_sized_for_the_largest_batch_serves_every_smaller_one(hkv, max_kv):
    """attention_workspace_size on meta tensors (no GPU) for 256 decode sequences covers what
    the Triton backend carves for every batch of 1..256 sequences: smaller batches split long
    contexts more (2 sequences x 16 splits of partials against 256 x 1)."""
    pytest.importorskip("triton")
    from prefixkv.kernels.triton import attention as tattn

    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(shape, dtype=dtype, device="meta")

    k = meta(4096, 16, hkv, 128)
    sized = tf.attention_workspace_size(meta(256, 32, 128), k, meta(256, max_kv // 16,
                                                                    dtype=torch.int32))
    need = []
    for n in range(1, 257):
        q, tables = meta(n, 32, 128), meta(n, max_kv // 16, dtype=torch.int32)
        plan = tattn._split_plan(q, tattn._splits(q, k, tables, True)) + tattn._lse_plan(q, True)
        need.append(tattn._plan_bytes(plan))
    assert max(need) <= sized
    if max_kv >= 8192:
        assert max(need) > need[-1]  # the largest batch alone would have been too small
    pbt = meta(3, 64, dtype=torch.int32)  # the cascade's own part splits the same way
    sized = tf.attention_workspace_size(meta(256, 32, 128), k, meta(256, max_kv // 16,
                                        dtype=torch.int32), prefix_block_tables=pbt)
    for n in (1, 2, 16, 256):
        q, tables = meta(n, 32, 128), meta(n, max_kv // 16, dtype=torch.int32)
        assert tattn._plan_bytes(tattn._shared_plan(q, k, pbt, tables, None,
                                                    with_lse=True)) <= sized


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_workspace_size_checks_the_call_it_sizes(device):
    """attention_workspace_size refuses, naming the argument, the shapes the attention call
    refuses: it had answered a size (or 0 on the CPU) for a call that cannot run, and raised
    ZeroDivisionError / IndexError / AttributeError naming nothing on others."""
    def t(*shape, dtype=torch.float32):
        return torch.empty(shape, dtype=dtype, device=device)

    q, k, bt, i32 = t(4, 8, 64), t(100, 16, 2, 64), t(4, 10, dtype=torch.int32), torch.int32
    assert tf.attention_workspace_size(q, k, bt) >= 0
    bad = [((t(4, 64), k, bt), {}, ValueError, "q: expected 3 dimensions"),
           ((t(4, 8, 64, dtype=torch.float64), k, bt), {}, TypeError, "q: expected float32"),
           ((t(4, 3, 64), k, bt), {}, ValueError, "num_q_heads=3 must be divisible"),
           ((t(4, 0, 64), k, bt), {}, ValueError, "num_q_heads=0 must be divisible"),
           ((t(4, 8, 32), k, bt), {}, ValueError, "q: expected head_dim 64"),
           ((q, t(100, 16, 64), bt), {}, ValueError, "k_cache: expected 4 dimensions"),
           ((q, k, t(4, 10, dtype=torch.int64)), {}, TypeError, "block_tables: expected int32"),
           ((q, k, t(4, dtype=i32)), {}, ValueError, "block_tables: expected 2 dimensions"),
           ((q, k, bt, t(4, dtype=i32)), {}, ValueError, "cu_q_lens: expected shape (5,)"),
           ((None, k, bt), {}, TypeError, "q: expected a torch.Tensor, got NoneType"),
           ((np.zeros((4, 8, 64), np.float32), k, bt), {}, TypeError, "q: expected a torch"),
           ((q, k, bt), {"prefix_block_tables": t(3, dtype=i32)}, ValueError,
            "prefix_block_tables: expected 2 dimensions"),
           ((q, k, bt), {"prefix_block_tables": [[0]]}, TypeError,
            "prefix_block_tables: expected a torch.Tensor")]
    for args, kwargs, error, match in bad:
        with pytest.raises(error, match=re.escape(match)):
            tf.attention_workspace_size(*args, **kwargs)


@pytest.mark.parametrize("shared", [False, True])
def test_workspace_accepted_on_the_cpu_path(shared):
    """The CPU path needs no workspace (size 0) but takes one, with or without out=/lse=; the
    triton backend's allocation-free use of it is tested in tests/_triton_interp_cases.py."""
    rng = np.random.default_rng(31)
    if shared:
        b = testing.make_shared_prefix_batch(rng, [2, 1], [(0, 2, 5), (-1, 1, 4), (1, 3, 3)],
                                             num_q_heads=4, num_kv_heads=2, head_dim=16,
                                             block_size=4)
        fn, want = tf.shared_prefix_attention, ref.shared_prefix_attention_reference(*b.args())
        args = [T(a) for a in b.args()]
        size = tf.attention_workspace_size(args[0], args[1], args[6], args[8],
                                           prefix_block_tables=args[3])
    else:
        b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 4), num_q_heads=4,
                                      num_kv_heads=2, head_dim=16, block_size=4)
        fn, want = tf.paged_attention, ref.paged_attention_reference(*b.args())
        args = [T(a) for a in b.args()]
        size = tf.attention_workspace_size(args[0], args[1], args[3], args[5])
    assert size == 0
    ws = torch.empty(1024, dtype=torch.uint8)
    close(fn(*args, workspace=ws), want, "float32")
    out = torch.full(args[0].shape, float("nan"))
    assert fn(*args, out=out, workspace=ws) is out  # lse neither given nor returned
    close(out, want, "float32")
    got, got_lse = fn(*args, out=out, workspace=ws, return_lse=True)
    assert got_lse.shape == args[0].shape[:2]


def _no_ragged_decodes(monkeypatch):
    """Short sequences of a ragged batch in tiles and groups, not as decodes of the compiled
    kernel (_native._c_ragged): the tests that shrink the tiles reach those paths."""
    from prefixkv.torch_frontend import _native

    monkeypatch.setattr(_native, "RAGGED_DECODE_MAX_Q", 0)
    monkeypatch.setattr(_native, "RAGGED_DECODE_16BIT_MAX_Q", 0)


@pytest.mark.parametrize("metadata", ["host", "device-synced"])
@pytest.mark.parametrize("dtype,kw", [("float32", {}), ("bfloat16", dict(sliding_window=11)),
                                      ("float16", dict(logits_soft_cap=4.0))])
def test_long_prefill_tiles_on_host(dtype, kw, metadata, monkeypatch):
    """The tiled prefill (_tiled_prefill): sequences longer than the tile in several tiles (a
    partial last one), the short ones batched, a padding sequence, cached context before the
    new tokens, NaN in unused slots; out and lse against the reference. ``device-synced``: the
    path for metadata on a GPU (forced on CPU tensors) with a batch whose padding to its token
    count passes PAD_SYNC_BYTES: it reads the lengths back and tiles the same way, where it
    used to pad every sequence to the whole batch."""
    from prefixkv.torch_frontend import _native

    if metadata == "device-synced":
        monkeypatch.setattr(_native, "_on_host", lambda *t: False)
        monkeypatch.setattr(_native, "PAD_SYNC_BYTES", 0)
    monkeypatch.setattr(_native, "PREFILL_Q_TILE", 8)
    # float32 with no window: torch's fused kernel's tiles from 9 tokens (the others padded)
    monkeypatch.setattr(_native, "FLASH_PREFILL_MIN", 9)
    _no_ragged_decodes(monkeypatch)
    calls = []
    real = _native._tiled_prefill
    monkeypatch.setattr(_native, "_tiled_prefill", lambda *a, **k: calls.append(1) or
                        real(*a, **k))
    rng = np.random.default_rng(21)
    b = testing.make_ragged_batch(rng, [(19, 40), (3, 9), (0, 0), (8, 8), (30, 30)],
                                  num_q_heads=4, num_kv_heads=2, head_dim=32, block_size=4,
                                  dtype=dtype, sliding_window=kw.get("sliding_window"))
    want, want_lse = ref.paged_attention_reference(*b.args(), return_lse=True, **kw)
    out, lse = tf.paged_attention(*(T(a) for a in b.args()), return_lse=True, **kw)
    assert calls == [1]
    close(out, want, dtype)
    fin = np.isfinite(want_lse)
    np.testing.assert_allclose(N(lse)[fin], want_lse[fin], atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("dtype,block_size", [("float32", 4), ("bfloat16", 5), ("float16", 16),
                                              ("float8_e4m3fn", 4)])
def test_long_prefill_flash_tiles(dtype, block_size, monkeypatch):
    """The long sequences of a causal prefill with no window or soft cap run by torch's fused
    CPU kernel (_flash_prefill_tile): the keys in front of each tile unmasked, the tile's own
    keys with is_causal, merged by LSE. Tiles of 7 tokens here (a partial last one; a tile
    starting mid-block), cached context before the new tokens, a sequence with none, GQA 4,
    NaN in every unused slot; out and lse against the reference."""
    from prefixkv.torch_frontend import _native

    monkeypatch.setattr(_native, "PREFILL_Q_TILE", 8)
    monkeypatch.setattr(_native, "FLASH_PREFILL_TILE", 7)
    monkeypatch.setattr(_native, "FLASH_PREFILL_MIN", 8)
    _no_ragged_decodes(monkeypatch)
    tiles = []
    real = _native._flash_prefill_tile
    monkeypatch.setattr(_native, "_flash_prefill_tile", lambda out, *a: tiles.append(
        out.shape[0]) or real(out, *a))
    rng = np.random.default_rng(22)
    seqs = [(19, 40), (3, 9), (0, 0), (30, 30), (9, 23)]
    fp8 = dtype == "float8_e4m3fn"
    b = testing.make_ragged_batch(rng, seqs, num_q_heads=8, num_kv_heads=2, head_dim=32,
                                  block_size=block_size, dtype="bfloat16" if fp8 else dtype)
    args = [T(a) for a in b.args()]
    kw, want_args = {}, b.args()
    if fp8:  # fp8 caches (dequantized per sequence) with scales
        kw = dict(k_scale=0.5, v_scale=2.0)
        k8 = (args[1].float() / 0.5).to(torch.float8_e4m3fn)
        v8 = (args[2].float() / 2.0).to(torch.float8_e4m3fn)
        args[1], args[2] = k8, v8
        want_args = (b.q.astype(np.float32), (k8.float() * 0.5).numpy(),
                     (v8.float() * 2.0).numpy(), *b.args()[3:])
    want, want_lse = ref.paged_attention_reference(*want_args, return_lse=True)
    out, lse = tf.paged_attention(*args, return_lse=True, **kw)
    assert tiles == [7, 7, 5, 7, 7, 7, 7, 2, 7, 2]  # 19, 30 and 9 tokens in tiles of 7
    close(out, want, "bfloat16" if fp8 else dtype)
    np.testing.assert_allclose(N(lse), want_lse, atol=2e-3, rtol=1e-4)
    # with no lse asked for: the same out
    out2 = tf.paged_attention(*args, **kw)
    np.testing.assert_array_equal(N(out2), N(out))


def test_paged_attention_functional_decode_no_lse():
    rng = np.random.default_rng(1)
    b = testing.make_ragged_batch(rng, testing.seq_grid("decode", 16), num_q_heads=8,
                                  num_kv_heads=2)
    got = tf.paged_attention(*(T(a) for a in b.args()))
    close(got, ref.paged_attention_reference(*b.args()), "float32")


def test_long_context_many_chunks():
    """Contexts spanning many online-softmax chunks, GQA 8, with a window and soft cap."""
    rng = np.random.default_rng(2)
    for opts in ({}, {"sliding_window": 600, "logits_soft_cap": 5.0}):
        b = testing.make_ragged_batch(rng, [(1, 1500), (3, 777), (1, 16)], num_q_heads=16,
                                      num_kv_heads=2, block_size=16, head_dim=64,
                                      sliding_window=opts.get("sliding_window"))
        want = ref.paged_attention_reference(*b.args(), **opts)
        close(tf.paged_attention(*(T(a) for a in b.args()), **opts), want, "float32")


def test_noncontiguous_stacked_cache_and_garbage_table_entries():
    rng = np.random.default_rng(3)
    b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 8), block_size=8,
                                  num_q_heads=4, num_kv_heads=2, dtype="float32")
    stacked = torch.stack([T(b.k_cache), T(b.v_cache)], dim=1)  # [num_blocks, 2, ...]
    k, v = stacked[:, 0], stacked[:, 1]
    assert not k.is_contiguous()
    tables = b.block_tables.copy()
    need = -(-b.kv_lens // 8)
    for s in range(tables.shape[0]):  # unused entries may hold anything, even out of range
        tables[s, need[s]:] = 10**6
    got = tf.paged_attention(T(b.q), k, v, T(tables), T(b.kv_lens), T(b.cu_q_lens))
    close(got, ref.paged_attention_reference(*b.args()), "float32")


@pytest.mark.parametrize("layout", ["blocks_2", "blocks_layers_2", "hnd_view", "hnd_stacked",
                                    "k_only_view", "expanded_heads"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_cpu_decode_kernel_takes_stacked_caches(monkeypatch, dtype, layout):
    """A decode over K and V views of a stacked cache ([num_blocks, 2, ...], FlashInfer's
    layout, or [num_blocks, layers, 2, ...]) or of HND caches ([num_blocks, heads,
    block_size, head_dim] as their NHD views, alone or stacked) runs in the compiled kernel
    with the views' strides (no copy); K and V of different strides, or a zero stride, take
    the other path. Both match the reference."""
    from prefixkv.kernels.cpu import decode
    from prefixkv.torch_frontend import _native

    if not decode.available():
        pytest.skip(f"no CPU decode kernel: {decode.status()}")
    strides = []
    real = decode.decode_attention

    def spy(dt, dims, *args, **kw):
        strides.append(tuple(dims)[7:])  # block, token, head
        return real(dt, dims, *args, **kw)

    monkeypatch.setattr(decode, "decode_attention", spy)
    rng = np.random.default_rng(21)
    b = testing.make_ragged_batch(rng, testing.seq_grid("decode", 8), block_size=8,
                                  num_q_heads=8, num_kv_heads=2, head_dim=32, dtype=dtype)
    k, v = T(b.k_cache), T(b.v_cache)
    if layout == "blocks_2":
        stacked = torch.stack([k, v], dim=1)
        k, v = stacked[:, 0], stacked[:, 1]
    elif layout == "blocks_layers_2":
        stacked = torch.stack([torch.stack([torch.zeros_like(k), torch.zeros_like(v)], 1),
                               torch.stack([k, v], 1)], dim=1)  # [blocks, 2 layers, 2, ...]
        k, v = stacked[:, 1, 0], stacked[:, 1, 1]
    elif layout == "hnd_view":
        k, v = (c.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3) for c in (k, v))
    elif layout == "hnd_stacked":  # [blocks, 2, heads, block_size, head_dim]
        stacked = torch.stack([k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)], dim=1)
        k, v = stacked[:, 0].permute(0, 2, 1, 3), stacked[:, 1].permute(0, 2, 1, 3)
    elif layout == "expanded_heads":  # one kv head's values broadcast to both: stride 0
        b.k_cache[:, :, 1] = b.k_cache[:, :, 0]
        b.v_cache[:, :, 1] = b.v_cache[:, :, 0]
        k, v = (T(c[:, :, :1]).expand(-1, -1, 2, -1) for c in (b.k_cache, b.v_cache))
    else:
        k = torch.stack([k, v], dim=1)[:, 0]  # v stays contiguous
    assert not k.is_contiguous()
    got = tf.paged_attention(T(b.q), k, v, *(T(a) for a in b.args()[3:5]))
    close(got, ref.paged_attention_reference(*b.args()), dtype)
    block = 8 * 2 * 32
    want = {"blocks_2": [(2 * block, 64, 32)], "blocks_layers_2": [(4 * block, 64, 32)],
            "hnd_view": [(block, 32, 8 * 32)], "hnd_stacked": [(2 * block, 32, 8 * 32)],
            "k_only_view": [], "expanded_heads": []}
    assert strides == want[layout]
    assert _native._cache_strides(T(b.k_cache), T(b.v_cache)) == (block, 64, 32)


SP_CASES = [
    # (prefix_blocks, seqs (prefix_id, q_len, own_kv_len), block_size, hq, hkv, dtype)
    ([2, 3], [(0, 1, 5), (1, 1, 1), (0, 1, 17), (-1, 1, 9), (1, 1, 16)], 8, 8, 2, "float32"),
    ([1, 0, 4], [(2, 3, 10), (0, 1, 3), (1, 2, 2), (-1, 4, 4), (2, 0, 0)], 16, 4, 1, "bfloat16"),
    ([3], [(0, 1, 1), (0, 1, 2), (0, 1, 3)], 16, 4, 4, "float16"),
]


@pytest.fixture(params=["kept", "dissolved"])
def cascade_groups(request, monkeypatch):
    """The CPU cascade with every prefix group given its own pass (thresholds 0), or with
    every group dissolved into its sequences' own tables (_native._cascade_groups)."""
    from prefixkv.torch_frontend import _native

    monkeypatch.setattr(_native, "CASCADE_MIN_ROWS", 0)
    monkeypatch.setattr(_native, "CASCADE_MIN_SEQS", 1)
    monkeypatch.setattr(_native, "CASCADE_MIN_SCORES", 0 if request.param == "kept" else 10**12)
    return request.param


@pytest.mark.parametrize("case", SP_CASES, ids=lambda c: f"bs{c[2]}-{c[5]}")
@pytest.mark.parametrize("cap", [None, 4.0])
def test_shared_prefix_attention_matches_reference(case, cap, cascade_groups):
    pblocks, seqs, bs, hq, hkv, dtype = case
    rng = np.random.default_rng(len(seqs) * bs)
    b = testing.make_shared_prefix_batch(rng, pblocks, seqs, num_q_heads=hq, num_kv_heads=hkv,
                                         block_size=bs, dtype=dtype)
    _check_shared(b, cap, dtype)


def _check_shared(b, cap, dtype):
    """shared_prefix_attention of batch b (out and lse) against the reference."""
    want, want_lse = ref.shared_prefix_attention_reference(*b.args(), logits_soft_cap=cap,
                                                           return_lse=True)
    got, got_lse = tf.shared_prefix_attention(*(T(a) for a in b.args()), logits_soft_cap=cap,
                                              return_lse=True)
    close(got, want, dtype)
    np.testing.assert_allclose(N(got_lse), want_lse, atol=1e-4, rtol=1e-4)


FUSED_SP_CASES = [
    # (prefix_blocks, seqs (prefix_id, q_len, own_kv_len), block_size, hq, hkv, head_dim, dtype)
    ([5, 0, 2, 1], [(0, 1, 9), (2, 1, 1), (-1, 1, 16), (0, 1, 33), (1, 1, 4), (0, 1, 17)],
     8, 8, 2, 64, "float32"),
    ([3, 4], [(1, 1, 5), (0, 1, 12), (1, 1, 31)], 16, 4, 4, 80, "bfloat16"),
    ([2, 3], [(0, 3, 10), (1, 1, 3), (0, 2, 2), (-1, 4, 4), (1, 0, 0)], 8, 8, 2, 64, "float32"),
]


@pytest.mark.parametrize("case", FUSED_SP_CASES, ids=lambda c: f"bs{c[2]}-{c[6]}-{len(c[1])}")
@pytest.mark.parametrize("decode", [None, False], ids=["cu_none", "cu_given"])
@pytest.mark.parametrize("dense_min_rows", [1, 10**9], ids=["dense", "fused_kernel"])
def test_shared_prefix_cpu_chunked_paths(monkeypatch, case, decode, dense_min_rows):
    """The CPU path with host metadata (_native._attend_host): decode own tokens in several
    row chunks and prefixes (a tile each) in several key chunks, merged by LSE, through
    torch's fused kernel and through the dense per-head path; NaN in padding slots, unused
    and empty prefixes, no prefix (-1), non-contiguous caches."""
    from prefixkv.torch_frontend import _native

    pblocks, seqs, bs, hq, hkv, d, dtype = case
    block_bytes = 2 * bs * hkv * d * 4
    monkeypatch.setattr(_native, "FLASH_CHUNK_BYTES", 3 * block_bytes)  # 3 blocks a gather
    monkeypatch.setattr(_native, "DENSE_CHUNK_BYTES", 2 * block_bytes)
    monkeypatch.setattr(_native, "DENSE_MIN_ROWS", dense_min_rows)
    monkeypatch.setattr(_native, "DENSE_SCORES", 20)  # a few rows per dense tile
    monkeypatch.setattr(_native, "CASCADE_MIN_ROWS", 0)  # every group its own pass
    monkeypatch.setattr(_native, "CASCADE_MIN_SEQS", 1)
    monkeypatch.setattr(_native, "CASCADE_MIN_SCORES", 0)
    # the own tokens through _attend_host here, not the compiled decode kernel (tested below)
    monkeypatch.setattr(_native, "_c_decode", lambda *a, **k: False)
    calls = []
    real = _native._attend_host
    monkeypatch.setattr(_native, "_attend_host", lambda *a: (calls.append(a[2].shape), real(*a)))
    rng = np.random.default_rng(len(seqs) * bs + d)
    b = testing.make_shared_prefix_batch(rng, pblocks, seqs, num_q_heads=hq, num_kv_heads=hkv,
                                         head_dim=d, block_size=bs, dtype=dtype, decode=decode)
    want, want_lse = ref.shared_prefix_attention_reference(*b.args(), return_lse=True)
    out = torch.full(b.q.shape, float("nan"), dtype=TORCH_DTYPE[dtype])
    lse = torch.full(b.q.shape[:2], float("nan"))
    args = [T(a) for a in b.args()]
    if decode is None:  # caches as views of a stacked [num_blocks, 2, ...] cache
        stacked = torch.stack([args[1], args[2]], dim=1)
        args[1], args[2] = stacked[:, 0], stacked[:, 1]
    tf.shared_prefix_attention(*args, return_lse=True, out=out, lse=lse)
    close(out, want, dtype)
    np.testing.assert_allclose(N(lse), want_lse, atol=1e-4, rtol=1e-4)
    decoding = all(q == 1 for _, q, _ in seqs)
    # own tokens (decode only), then one tile per prefix some token reads (an empty one: none)
    used = {p for p, q, _ in seqs if p >= 0 and q > 0 and pblocks[p] > 0}
    assert len(calls) == (1 if decoding else 0) + len(used)


@pytest.mark.parametrize("itemsize", [4, 2])
def test_cascade_groups_rule(itemsize):
    """The shipped thresholds (CASCADE_MIN_ROWS query rows and CASCADE_MIN_SCORES score
    elements, CASCADE_16BIT_FACTOR times both for 16-bit caches), decode, 4 q heads per kv
    head: 8 sequences over 8192 keys (32 rows, 2**18 scores) go for want of rows; 16 over
    2048 (64 rows, 2**17) keep their pass over a float32 cache only; 32 over 512 (2**16) go
    for want of scores; 128 over 2048 (512 rows, 2**20) keep it over either cache."""
    from prefixkv.torch_frontend import _native

    bs, plens, counts = 16, [8192, 2048, 512, 2048], [8, 16, 32, 128]
    width = max(plens) // bs
    ptab = torch.arange(4 * width, dtype=torch.int32).view(4, width)
    pids = torch.from_numpy(np.repeat(np.arange(4), counts).astype(np.int32))
    n = int(pids.shape[0])
    own = torch.arange(n, dtype=torch.int32).view(n, 1) + 4 * width
    kv = torch.ones(n, dtype=torch.int32)
    _, got_lens, got_ids, _, got_kv = _native._cascade_groups(
        4, bs, itemsize, ptab, torch.tensor(plens, dtype=torch.int32), pids, own, kv, None)
    kept = [1, 3] if itemsize == 4 else [3]
    assert got_lens.tolist() == [plens[p] for p in kept]
    renumber = {p: i for i, p in enumerate(kept)}
    want_ids = np.array([renumber.get(p, -1) for p in pids.numpy()])
    np.testing.assert_array_equal(got_ids.numpy(), want_ids)
    grown = np.array(plens)[pids.numpy()] * (want_ids < 0)
    np.testing.assert_array_equal(got_kv.numpy(), 1 + grown)


@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
def test_shared_prefix_cpu_dissolves_small_groups(monkeypatch, decode):
    """The CPU cascade gives a prefix group its own pass only from CASCADE_MIN_SCORES score
    elements (query rows per kv head x prefix keys; twice that for 16-bit caches); the
    others' sequences read the prefix through their own tables, with the same result. Here
    (threshold 100, 2 q heads per kv head) prefix 0 (3 tokens x 2 x 24 keys = 144) keeps its
    pass; prefix 1 (1 x 2 x 32 = 64), prefix 2 (2 x 2 x 16 = 64) and the unused prefix 3 go."""
    from prefixkv.torch_frontend import _native

    monkeypatch.setattr(_native, "CASCADE_MIN_ROWS", 0)
    monkeypatch.setattr(_native, "CASCADE_MIN_SEQS", 1)
    monkeypatch.setattr(_native, "CASCADE_MIN_SCORES", 100)
    rng = np.random.default_rng(11)
    seqs = [(0, 1, 9), (1, 1, 5), (2, 1, 12), (0, 1, 1), (-1, 1, 7), (2, 1, 3), (0, 1, 16)]
    if not decode:  # several tokens for the sequences of no prefix and of prefix 0
        seqs = [(p, q + 2 * (p in (-1, 0) and s > 0), kv + 2)
                for s, (p, q, kv) in enumerate(seqs)]
    b = testing.make_shared_prefix_batch(rng, [3, 4, 2, 5], seqs, num_q_heads=4,
                                         num_kv_heads=2, head_dim=64, block_size=8,
                                         decode=False if not decode else None)
    grouped = []
    real = _native._cascade_groups
    monkeypatch.setattr(_native, "_cascade_groups",
                        lambda *a: grouped.append(real(*a)) or grouped[-1])
    want, want_lse = ref.shared_prefix_attention_reference(*b.args(), return_lse=True)
    got, got_lse = tf.shared_prefix_attention(*(T(a) for a in b.args()), return_lse=True)
    close(got, want, "float32")
    np.testing.assert_allclose(N(got_lse), want_lse, atol=1e-4, rtol=1e-4)
    ptab, plens, pids, tables, kv = (N(t) for t in grouped[0])
    np.testing.assert_array_equal(plens, [24])  # prefix 0 alone, renumbered 0
    np.testing.assert_array_equal(ptab, b.prefix_block_tables[:1])
    np.testing.assert_array_equal(pids, [0, -1, -1, 0, -1, -1, 0])
    np.testing.assert_array_equal(kv, b.kv_lens + np.array([0, 32, 16, 0, 0, 16, 0]))
    for s, (p, _, own_kv) in enumerate(seqs):
        own_blocks = -(-own_kv // 8)
        if p in (1, 2):  # the prefix's blocks, then the sequence's own
            front = b.prefix_block_tables[p, :b.prefix_lens[p] // 8]
        else:
            front = b.prefix_block_tables[:0, 0]
        np.testing.assert_array_equal(
            tables[s, :front.size + own_blocks],
            np.concatenate([front, b.block_tables[s, :own_blocks]]))


def test_shared_prefix_cpu_all_groups_dissolved_is_paged_attention(monkeypatch):
    """No group worth a pass (the defaults, a small batch): one paged_attention pass over the
    prefix + own tables, no cascade step at all."""
    from prefixkv.torch_frontend import _native

    calls = []
    real = _native.paged_attention
    monkeypatch.setattr(_native, "paged_attention",
                        lambda *a, **k: (calls.append(a[5].shape), real(*a, **k)))
    monkeypatch.setattr(_native, "_attend_host", None)  # the cascade's passes: must not run
    rng = np.random.default_rng(12)
    b = testing.make_shared_prefix_batch(rng, [2, 1], [(0, 1, 5), (1, 2, 9), (0, 1, 3)],
                                         block_size=8)
    want = ref.shared_prefix_attention_reference(*b.args())
    close(tf.shared_prefix_attention(*(T(a) for a in b.args())), want, "float32")
    # three sequences, prefix blocks + own blocks wide, one call (q_lens 1, 2, 1: the compiled
    # kernel runs the batch's tokens as decodes, _native._c_ragged)
    assert calls == [(3, 2 + 2)]


@pytest.mark.parametrize("list_entries", [0, 10**6], ids=["numpy", "lists"])
def test_joined_tables_match_the_reference(monkeypatch, list_entries):
    """The dissolved cascade's tables (_native._joined_tables) from Python lists and from the
    vectorized reference alike: prefixes of 0 to all their blocks, sequences of no prefix,
    padding entries of either table holding other values, an own table of no column; and
    prefix lengths the value checks refuse (not whole blocks, negative, past the table: with
    checks off), which get the reference's tables; kv_lens at the int32 limits, whose sums
    with the prefix wrap as the reference's."""
    from prefixkv.paged.reference.attention import shared_prefix_block_tables
    from prefixkv.torch_frontend import _native

    monkeypatch.setattr(_native, "JOIN_LIST_ENTRIES", list_entries)
    rng = np.random.default_rng(21)
    for _ in range(120):
        bs = int(rng.choice([1, 4, 16]))
        num_prefixes, width = int(rng.integers(1, 4)), int(rng.integers(0, 5))
        num_seqs, own_width = int(rng.integers(1, 7)), int(rng.integers(0, 4))
        pre = rng.integers(-5, 100, (num_prefixes, width)).astype(np.int32)
        plens = (rng.integers(0, width + 1, num_prefixes) * bs).astype(np.int32)
        if rng.random() < 0.3:  # unchecked garbage
            plens[rng.integers(num_prefixes)] = rng.choice([-bs, bs + 1, (width + 1) * bs, 3])
        pid = rng.integers(-1, num_prefixes, num_seqs).astype(np.int32)
        own = rng.integers(-5, 100, (num_seqs, own_width)).astype(np.int32)
        kv = rng.integers(0, own_width * bs + 1, num_seqs).astype(np.int32)
        if rng.random() < 0.2:  # unchecked kv_lens at the int32 limits: wrap as the reference
            kv[rng.integers(num_seqs)] = rng.choice([2**31 - 1, -2**31, 2**31 - bs])
        tables, lens = _native._joined_tables(pre, plens.astype(np.int64),
                                              pid.astype(np.int64), own, kv, bs)
        want_tables, want_lens = shared_prefix_block_tables(pre, plens, pid, own, kv, bs)
        assert tables.dtype == np.int32 and lens.dtype == np.int32
        np.testing.assert_array_equal(tables, want_tables)
        np.testing.assert_array_equal(lens, want_lens)


def test_joined_tables_of_unchecked_lengths_stay_key_counts():
    """_ops._prefix_then_own_tables (a windowed cascade, on any device): a kv_len of -2**31
    with a negative prefix length once narrowed to ~2**31 keys; lengths start from 0 and a
    prefix counts at most its table's keys."""
    from prefixkv.torch_frontend import _ops

    i32 = dict(dtype=torch.int32)
    _, kv = _ops._prefix_then_own_tables(
        torch.zeros((2, 3), **i32), torch.tensor([-10**6, 2**31 - 1], **i32),
        torch.tensor([0, 1, -1], **i32), torch.zeros((3, 2), **i32),
        torch.tensor([-2**31, 5, -7], **i32), 4)
    assert kv.tolist() == [0, 5 + 12, 0]


def test_merge_attention_states_matches_reference_and_empty_states():
    rng = np.random.default_rng(4)
    oa, ob = rng.standard_normal((2, 5, 3, 8)).astype(np.float32)
    la, lb = rng.standard_normal((2, 5, 3)).astype(np.float32)
    la[0], lb[0] = -np.inf, -np.inf  # both empty -> out 0, lse -inf
    la[1] = -np.inf  # one side empty -> the other
    la[2], lb[3, 0] = np.inf, np.inf  # FlashAttention-2's empty rows: empty states too
    lb[4] = np.inf
    want, want_lse = ref.merge_attention_states_reference(oa, la, ob, lb)
    got, got_lse = tf.merge_attention_states(T(oa), T(la), T(ob), T(lb))
    np.testing.assert_allclose(N(got), want, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(N(got)[2], ob[2], atol=1e-6)
    np.testing.assert_array_equal(N(got_lse)[0], -np.inf)
    np.testing.assert_allclose(N(got_lse), want_lse, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------- cache ops


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_exact(dtype):
    rng = np.random.default_rng(5)
    kc = testing.random_values(rng, (6, 8, 2, 16), dtype)
    vc = testing.random_values(rng, (6, 8, 2, 16), dtype)
    key = testing.random_values(rng, (7, 2, 16), dtype)
    val = testing.random_values(rng, (7, 2, 16), dtype)
    slots = np.array([3, -1, 47, 0, 20, -5], dtype=np.int32)  # 6 of 7 rows (CUDA-graph pad)
    want_k, want_v = ref.write_kv_reference(key, val, kc, vc, slots)
    stacked = torch.stack([T(kc), T(vc)], dim=1)
    tk, tv = stacked[:, 0], stacked[:, 1]
    tf.write_kv(T(key), T(val), tk, tv, T(slots))
    np.testing.assert_array_equal(N(tk), want_k.astype(np.float64))
    np.testing.assert_array_equal(N(tv), want_v.astype(np.float64))


@pytest.mark.parametrize("backend", [None, "torch"])
def test_write_kv_takes_int64_slots(backend):
    """slot_mapping as vLLM's reshape_and_cache takes it (int64): the same bits as int32
    slots, negative ones skipped."""
    rng = np.random.default_rng(15)
    kc, vc = (testing.random_values(rng, (6, 8, 2, 16), "bfloat16") for _ in range(2))
    key, val = (testing.random_values(rng, (5, 2, 16), "bfloat16") for _ in range(2))
    slots = np.array([3, -1, 47, 0, 20], dtype=np.int64)
    want_k, want_v = ref.write_kv_reference(key, val, kc, vc, slots.astype(np.int32))
    tk, tv = T(kc), T(vc)
    tf.write_kv(T(key), T(val), tk, tv, torch.from_numpy(slots), backend=backend)
    assert torch.from_numpy(slots).dtype == torch.int64
    np.testing.assert_array_equal(N(tk), want_k.astype(np.float64))
    np.testing.assert_array_equal(N(tv), want_v.astype(np.float64))


def _caches(rng, dtype="float32", n=3, num_blocks=9):
    return [testing.random_values(rng, (num_blocks, 4, 2, 8), dtype) for _ in range(n)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_gather_scatter_exact(dtype):
    rng = np.random.default_rng(6)
    caches = _caches(rng, dtype)
    src, dst = np.array([1, 2, 5, 2], np.int32), np.array([2, 7, 1, 0], np.int32)  # chain 1->2->7
    want = ref.copy_blocks_reference(caches, src, dst)
    tc = [T(c) for c in caches]
    tf.copy_blocks(tc, T(src), T(dst))
    for g, w in zip(tc, want, strict=True):
        np.testing.assert_array_equal(N(g), w.astype(np.float64))
    ids = np.array([4, 0, 4, 8], np.int32)
    buf = tf.gather_blocks(tc, T(ids))
    assert buf.is_contiguous() and tuple(buf.shape) == (4, 3, 4, 2, 8)
    np.testing.assert_array_equal(N(buf), ref.gather_blocks_reference(want, ids).astype(np.float64))
    new = testing.random_values(rng, (2, 3, 4, 2, 8), dtype)
    sids = np.array([6, 3], np.int32)
    want2 = ref.scatter_blocks_reference(want, new, sids)
    tf.scatter_blocks(tc, T(new), T(sids))
    for g, w in zip(tc, want2, strict=True):
        np.testing.assert_array_equal(N(g), w.astype(np.float64))


@pytest.mark.parametrize("small_bytes", [None, 0], ids=["default", "wide_views"])
def test_swap_blocks_cpu_exact(small_bytes, monkeypatch):
    from prefixkv.torch_frontend import _native

    if small_bytes is not None:
        monkeypatch.setattr(_native, "SMALL_WRITE_BYTES", small_bytes)
    rng = np.random.default_rng(7)
    src = [T(c) for c in _caches(rng, num_blocks=5)]
    dst = [T(c) for c in _caches(rng, num_blocks=11)]
    before = [d.clone() for d in dst]
    si, di = np.array([4, 0, 2], np.int32), np.array([10, 3, 0], np.int32)
    tf.swap_blocks(src, dst, T(si), T(di))
    for s, d, b in zip(src, dst, before, strict=True):
        want = b.clone()
        want[torch.from_numpy(di).long()] = s[torch.from_numpy(si).long()]
        assert torch.equal(d, want)


@pytest.mark.parametrize("backend", [None, "torch"])
def test_block_ops_take_int64_ids(backend):
    """Block ids as torch makes them (torch.tensor([...]) is int64) and as vLLM hands them
    (the columns of an int64 [n, 2] block_mapping, strided views): copy, gather, scatter and
    swap give the bits int32 ids give."""
    rng = np.random.default_rng(16)
    caches = _caches(rng, "bfloat16")
    mapping = torch.tensor([[1, 2], [2, 7], [5, 1], [2, 0]])  # chain 1 -> 2 -> 7
    assert mapping.dtype == torch.int64 and mapping[:, 0].stride() == (2,)
    want = ref.copy_blocks_reference(caches, *(N(mapping[:, i]).astype(np.int32) for i in (0, 1)))
    tc = [T(c) for c in caches]
    tf.copy_blocks(tc, mapping[:, 0], mapping[:, 1], backend=backend)
    for g, w in zip(tc, want, strict=True):
        assert N(g).tobytes() == N(T(w)).tobytes()
    ids = torch.tensor([4, 0, 4, 8])
    buf = tf.gather_blocks(tc, ids, backend=backend)
    assert N(buf).tobytes() == N(T(ref.gather_blocks_reference(want, N(ids).astype(np.int32)))
                                 ).tobytes()
    new = testing.random_values(rng, (2, 3, 4, 2, 8), "bfloat16")
    want2 = ref.scatter_blocks_reference(want, new, np.array([6, 3], np.int32))
    tf.scatter_blocks(tc, T(new), torch.tensor([6, 3]), backend=backend)
    for g, w in zip(tc, want2, strict=True):
        assert N(g).tobytes() == N(T(w)).tobytes()
    dst = [T(c) for c in _caches(rng, "bfloat16", num_blocks=11)]
    before = [d.clone() for d in dst]
    swap = torch.tensor([[4, 10], [0, 3], [2, 0]])
    tf.swap_blocks(tc, dst, swap[:, 0], swap[:, 1], backend=backend)
    for s, d, b in zip(tc, dst, before, strict=True):
        b[swap[:, 1]] = s[swap[:, 0]]
        assert torch.equal(d.view(torch.int16), b.view(torch.int16))
    with pytest.raises(ValueError, match=r"dst: expected values in \[0, 9\), got 4294967297"):
        tf.copy_blocks(tc, torch.tensor([0]), torch.tensor([2**32 + 1]), backend=backend)
    with pytest.raises(TypeError, match="block_ids: expected int32 or int64, got int16"):
        tf.gather_blocks(tc, ids.to(torch.int16), backend=backend)


# ------------------------------------------------------------------------- checks and errors


def test_input_checks_name_the_argument():
    rng = np.random.default_rng(8)
    b = testing.make_ragged_batch(rng, [(1, 5), (1, 9)], block_size=8)
    args = [T(a) for a in b.args()]
    with pytest.raises(TypeError, match="block_tables: expected int32"):
        tf.paged_attention(args[0], args[1], args[2], args[3].long(), args[4])
    with pytest.raises(ValueError, match="kv_lens: expected values <= max_blocks_per_seq"):
        tf.paged_attention(args[0], args[1], args[2], args[3], args[4] * 100)
    with pytest.raises(ValueError, match="out: expected shape"):
        tf.paged_attention(*args, out=torch.empty(3, 3, 3))
    with pytest.raises(TypeError, match="lse: expected float32"):
        tf.paged_attention(*args, lse=torch.empty(2, 4, dtype=torch.float16))
    with pytest.raises(TypeError, match="workspace: expected a torch.Tensor"):
        tf.paged_attention(*args, workspace=np.zeros(64, np.uint8))
    with pytest.raises(ValueError, match="workspace: expected a contiguous 1-D uint8"):
        tf.paged_attention(*args, workspace=torch.zeros(64, dtype=torch.float32))
    with pytest.raises(ValueError, match="workspace: expected it on q's device"):
        tf.paged_attention(*args, workspace=torch.zeros(512, dtype=torch.uint8, device="meta"))
    with pytest.raises(ValueError, match="workspace: must start 256-byte aligned"):
        tf.paged_attention(*args, workspace=torch.zeros(512, dtype=torch.uint8)[8:])
    caches = [T(c) for c in _caches(rng)]
    with pytest.raises(ValueError, match="dst: expected distinct destinations"):
        tf.copy_blocks(caches, T(np.array([0, 1], np.int32)), T(np.array([2, 2], np.int32)))
    with pytest.raises(ValueError, match="slot_mapping: expected slots < num_blocks"):
        tf.write_kv(torch.zeros(1, 2, 8), torch.zeros(1, 2, 8), caches[0], caches[1],
                    torch.tensor([10**4], dtype=torch.int32))
    with pytest.raises(ValueError, match="dst_caches: expected 3 caches"):
        tf.swap_blocks(caches, caches[:2], torch.zeros(1, dtype=torch.int32),
                       torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="dst_ids: expected distinct"):
        tf.swap_blocks(caches, caches, torch.zeros(2, dtype=torch.int32),
                       torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="src_ids: expected values in"):
        tf.swap_blocks(caches, caches, torch.tensor([99], dtype=torch.int32),
                       torch.zeros(1, dtype=torch.int32))
    ids = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([1, 2], dtype=torch.int32)
    before = [c.clone() for c in caches]
    with pytest.raises(ValueError, match=r"dst_caches\[1\]: shares memory with src_caches\[1\]"):
        tf.swap_blocks(caches, [before[0], caches[1], before[2]], *ids)  # a chain 0->1->2
    with pytest.raises(ValueError, match=r"dst_caches\[1\]: shares memory with src_caches\[1\]"):
        tf.swap_blocks(caches, [before[0], caches[1][:], before[2]], *ids)  # a view of it
    with pytest.raises(ValueError, match=r"dst_caches\[0\]: its blocks share memory \(a "
                                         r"stride-0 view"):
        tf.swap_blocks(caches[:1], [caches[0][:1].expand_as(caches[0])], *ids)
    assert all(torch.equal(c, b) for c, b in zip(caches, before, strict=True))
    with pytest.raises(ValueError, match=r"dst_caches\[1\]: shares memory with dst_caches\[0\]"):
        tf.swap_blocks(caches[:2], [before[0], before[0]], *ids)  # one cache, two sources
    with pytest.raises(ValueError, match=r"dst_caches\[1\]: shares memory with dst_caches\[0\]"):
        tf.swap_blocks(caches[:2], [before[0], before[0][:]], *ids)  # and a view of it
    # disjoint views of one buffer are fine: two pools interleaved along the block axis, the
    # K and V halves of two stacked caches, layers of a [blocks, layers, ...] buffer
    src_ids, dst_ids = torch.tensor([0, 2], dtype=torch.int32), torch.tensor([1, 3],
                                                                            dtype=torch.int32)
    stacked = torch.randn(4, 2, 2, 4, 3)  # [blocks, cache, k/v, ...]
    layers = torch.randn(4, 3, 4, 3)      # [blocks, layer, ...]
    for src, dst in (([stacked[:, 0, 0], stacked[:, 0, 1]], [stacked[:, 1, 0], stacked[:, 1, 1]]),
                     ([layers[:, 0]], [layers[:, 2]])):
        want = [d.clone() for d in dst]
        for w, c in zip(want, src, strict=True):
            w[dst_ids.long()] = c[src_ids.long()]
        tf.swap_blocks(src, dst, src_ids, dst_ids)
        assert all(torch.equal(d, w) for d, w in zip(dst, want, strict=True))


def test_backend_errors_list_every_backend(monkeypatch):
    rng = np.random.default_rng(9)
    b = testing.make_ragged_batch(rng, [(1, 5)], block_size=8)
    args = [T(a) for a in b.args()]
    with pytest.raises(BackendError, match=r"unknown backend 'nope'(.|\n)*- torch: could run"):
        tf.paged_attention(*args, backend="nope")
    names = tf.REGISTRIES["paged_attention"].names()
    if "triton" in names:
        with pytest.raises(BackendError, match=r"backend 'triton' cannot run(.|\n)*- triton: "
                                               r"runs on cuda, not cpu"):
            tf.paged_attention(*args, backend="triton")
    monkeypatch.setenv("PREFIXKV_PAGED_ATTENTION_BACKEND", "nope")
    with pytest.raises(BackendError, match="unknown backend 'nope'"):
        tf.paged_attention(*args)
    monkeypatch.setenv("PREFIXKV_PAGED_ATTENTION_BACKEND", "torch")
    close(tf.paged_attention(*args), ref.paged_attention_reference(*b.args()), "float32")


def test_cuda_backends_refused_for_layouts_they_cannot_take():
    """Selection for CUDA tensors, checked without a GPU: the Triton block copies need each
    block contiguous and the CUDA C swap pinned host memory; refused, the torch path runs."""
    blocks = tf.REGISTRIES["copy_blocks"]
    why = blocks.explain("cuda", block_contiguous=False)
    assert "contiguous" in why["triton"] and why["torch"] == "ok"
    assert blocks.select("cuda", block_contiguous=False).name == "torch"
    with pytest.raises(BackendError, match=r"backend 'triton' cannot run(.|\n)*contiguous"):
        blocks.select("cuda", "triton", block_contiguous=False)
    swap = tf.REGISTRIES["swap_blocks"]
    cuda_c = next(b for b in swap if b.name == "cuda-c")
    assert cuda_c.supports(pinned_host=False) == (
        False, "needs the host side in pinned memory (tensor.pin_memory())")
    assert cuda_c.supports(pinned_host=True)[0]
    assert cuda_c.supports(block_contiguous=False) == (
        False, "needs each cache block contiguous (cache[b].is_contiguous())")
    assert swap.select("cuda", pinned_host=False).name == "torch"


# ----------------------------------------------------------------- custom-op contract checks


def _opcheck_inputs():
    rng = np.random.default_rng(10)
    b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 4), block_size=4,
                                  num_q_heads=4, num_kv_heads=2, head_dim=8, nan_fill=False)
    return b


def test_opcheck_every_op():
    b = _opcheck_inputs()
    q, k, v, bt, kv, cu = (T(a) for a in b.args())
    ops = torch.ops.prefixkv
    cases = [
        (ops.paged_attention, (q, k, v, bt, kv, cu, 0.3, True, 3, 2.0, None)),
        (ops.paged_attention_out, (q, k, v, bt, kv, cu, 0.3, True, None, None, None,
                                   torch.empty_like(q), torch.empty(q.shape[:2]), None)),
        (ops.paged_attention_out, (q, k, v, bt, kv, cu, 0.3, True, None, None, None,
                                   torch.empty_like(q), None, torch.empty(256, dtype=torch.uint8))),
        (ops.merge_attention_states, (q, torch.randn(q.shape[:2]), q * 2,
                                      torch.randn(q.shape[:2]), None)),
        (ops.merge_attention_states_out, (q, torch.randn(q.shape[:2]), q * 2,
                                          torch.randn(q.shape[:2]), torch.empty_like(q),
                                          torch.empty(q.shape[:2]), None)),
        (ops.write_kv, (torch.randn(3, 2, 8), torch.randn(3, 2, 8), k.clone(), v.clone(),
                        torch.tensor([0, -1, 5], dtype=torch.int32), None)),
        (ops.copy_blocks, ([k.clone(), v.clone()], torch.tensor([0, 1], dtype=torch.int32),
                           torch.tensor([2, 3], dtype=torch.int32), None)),
        (ops.gather_blocks, ([k, v], torch.tensor([3, 0], dtype=torch.int32), None)),
        (ops.gather_blocks_into, (torch.empty(2, 2, *k.shape[1:]), [k, v],
                                  torch.tensor([3, 0], dtype=torch.int32), None)),
        (ops.scatter_blocks, ([k.clone(), v.clone()], torch.randn(2, 2, *k.shape[1:]),
                              torch.tensor([3, 0], dtype=torch.int32), None)),
        (ops.swap_blocks, ([k, v], [k.clone(), v.clone()], torch.tensor([1], dtype=torch.int32),
                           torch.tensor([0], dtype=torch.int32), None)),
    ]
    rng = np.random.default_rng(11)
    sp = testing.make_shared_prefix_batch(rng, [2], [(0, 1, 3), (-1, 2, 2)], block_size=4,
                                          num_q_heads=4, num_kv_heads=2, head_dim=8)
    spa = tuple(T(a) for a in sp.args())
    cases.append((ops.shared_prefix_attention, (*spa, 0.5, None, None)))
    # attention sinks: the ops' trailing argument after (k_scale, v_scale), applied by the
    # backends that do not read them (here) to an lse the op makes when the caller keeps none
    sinks = torch.tensor([0.5, -1.0, 2.0, float("-inf")])
    cases += [
        (ops.paged_attention, (q, k, v, bt, kv, cu, 0.3, True, None, None, None, None, None,
                               sinks)),
        (ops.paged_attention_out, (q, k, v, bt, kv, cu, 0.3, True, None, None, None,
                                   torch.empty_like(q), None, None, None, None, sinks)),
        (ops.shared_prefix_attention, (*spa, 0.5, None, None, None, None, sinks)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_model_step():
    """A model-like step: write this step's KV, attend, copy a block, gather for offload."""
    rng = np.random.default_rng(12)
    b = testing.make_ragged_batch(rng, [(1, 9), (1, 4)], block_size=4, num_q_heads=4,
                                  num_kv_heads=2, head_dim=8, nan_fill=False, decode=True)
    q, k, v, bt, kv, _ = (T(a) for a in b.args())
    key, val = torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    slots = torch.tensor([int(b.block_tables[0, 2]) * 4, int(b.block_tables[1, 0]) * 4 + 3],
                         dtype=torch.int32)

    def step(q, k, v, key, val):
        tf.write_kv(key, val, k, v, slots)
        o = tf.paged_attention(q * 1.0, k, v, bt, kv, logits_soft_cap=5.0)
        tf.copy_blocks([k, v], bt[:1, 0], bt[:1, 0] * 0 + int(b.block_tables[0, 1]))
        return o.sum(-1), tf.gather_blocks([k, v], bt[:, 0])

    k1, v1, k2, v2 = k.clone(), v.clone(), k.clone(), v.clone()
    want = step(q, k1, v1, key, val)
    # numpy dtypes named before (ml_dtypes bfloat16 among them): torch 2.11's dynamo cannot
    # hash those, so validation must not look torch dtypes up where they are kept (the GPU
    # run of 2026-11-28 broke on it)
    spec.dtype_name(np.zeros(1, numpy_dtype("bfloat16")))
    spec.dtype_name(np.zeros(1, np.float16))
    with torch._dynamo.config.patch(error_on_recompile=False):
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k2, v2, key, val)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1]) and torch.equal(k1, k2) and torch.equal(v1, v2)


def test_torch_compile_fullgraph_with_out_lse_and_workspace():
    """out=, lse= and workspace= under torch.compile(fullgraph=True): the workspace's
    alignment check (storage_offset, not traceable) broke the graph; the compiled call gives
    the eager result (the alignment itself is checked where the workspace is carved)."""
    rng = np.random.default_rng(9)
    b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 4), num_q_heads=4,
                                  num_kv_heads=2, head_dim=16, block_size=4)
    ta = [None if x is None else T(x) for x in b.args()]

    def step(q, k, v, out, lse, ws):
        tf.paged_attention(q, k, v, *ta[3:], out=out, lse=lse, workspace=ws)
        return out, lse

    want = ref.paged_attention_reference(*b.args(), return_lse=True)
    out, lse = torch.full(ta[0].shape, float("nan")), torch.full(ta[0].shape[:2], float("nan"))
    ws = torch.zeros(1 << 16, dtype=torch.uint8)
    with torch._dynamo.config.patch(error_on_recompile=False):
        torch.compile(step, fullgraph=True, backend="aot_eager")(ta[0], ta[1], ta[2], out, lse,
                                                                 ws)
    close(out, want[0], "float32")
    np.testing.assert_allclose(N(lse), want[1], atol=1e-4, rtol=1e-4)


def test_no_prefixes_and_empty_batch():
    rng = np.random.default_rng(13)
    b = testing.make_ragged_batch(rng, [(1, 5), (2, 9), (0, 0)], block_size=4)
    ptab = np.zeros((0, 3), np.int32)
    plens = np.zeros(0, np.int32)
    pids = np.full(3, -1, np.int32)
    want = ref.shared_prefix_attention_reference(b.q, b.k_cache, b.v_cache, ptab, plens, pids,
                                                 b.block_tables, b.kv_lens, b.cu_q_lens)
    got = tf.shared_prefix_attention(T(b.q), T(b.k_cache), T(b.v_cache), T(ptab), T(plens),
                                     T(pids), T(b.block_tables), T(b.kv_lens), T(b.cu_q_lens))
    close(got, want, "float32")
    empty = tf.paged_attention(torch.zeros((0, 4, 64)), T(b.k_cache), T(b.v_cache),
                               torch.zeros((0, 2), dtype=torch.int32),
                               torch.zeros(0, dtype=torch.int32))
    assert tuple(empty.shape) == (0, 4, 64)


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(
    seqs=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 40)), min_size=1, max_size=5),
    block_size=st.sampled_from([1, 3, 8, 16]), group=st.sampled_from([1, 2, 4]),
    window=st.sampled_from([None, 1, 9]), seed=st.integers(0, 2**16))
def test_random_ragged_batches(seqs, block_size, group, window, seed):
    seqs = [(min(q, kv), kv) for q, kv in seqs]  # q_len <= kv_len
    rng = np.random.default_rng(seed)
    b = testing.make_ragged_batch(rng, seqs, num_q_heads=2 * group, num_kv_heads=2,
                                  head_dim=16, block_size=block_size, decode=False,
                                  sliding_window=window)
    want = ref.paged_attention_reference(*b.args(), sliding_window=window)
    got = tf.paged_attention(*(T(a) for a in b.args()), sliding_window=window)
    close(got, want, "float32")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pinned_host_allocator_backs_the_host_tier(dtype):
    from prefixkv.paged import BlockKey, HostTier, Namespace
    from prefixkv.torch_frontend import pinned_host_allocator

    arr = pinned_host_allocator((3, 2, 4), numpy_dtype(dtype))
    assert arr.shape == (3, 2, 4) and str(arr.dtype) == dtype and arr.flags.c_contiguous
    tier = HostTier(1 << 20, allocator=pinned_host_allocator)
    block = np.arange(24, dtype=np.float32).reshape(3, 2, 4).astype(numpy_dtype(dtype))
    key = BlockKey(b"\x01" * 32, Namespace(model_id="m", dtype=dtype))
    assert tier.batch_put([key], [block]) == [True]
    (got,) = tier.batch_get([key], shape=block.shape, dtype=block.dtype)
    np.testing.assert_array_equal(got, block)


class _FakeCudart:
    """torch.cuda.cudart() stand-in recording page-lock calls (no GPU here)."""

    def __init__(self, fail: int = 0):
        self.registered: dict[int, int] = {}
        self.unregistered: list[int] = []
        self.fail = fail

    def cudaHostRegister(self, ptr, size, flags):  # noqa: N802 - CUDA's name
        assert flags == 3  # cudaHostRegisterPortable | cudaHostRegisterMapped
        if not self.fail:
            self.registered[ptr] = size
        return self.fail

    def cudaHostUnregister(self, ptr):  # noqa: N802
        self.unregistered.append(ptr)
        return 0


def test_pinned_host_allocator_registers_exactly_its_own_pages(monkeypatch):
    import gc
    import mmap

    from prefixkv.torch_frontend import pinned_host_allocator

    fake = _FakeCudart()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    page = mmap.PAGESIZE
    shapes = [((3, 5, 7), np.float16), ((2, 80, 16, 8, 128), np.float32), ((1,), np.uint8)]
    arrays = [pinned_host_allocator(s, np.dtype(d)) for s, d in shapes]
    spans = []
    for (shape, dt), a in zip(shapes, arrays, strict=True):
        assert a.shape == shape and a.dtype == dt and a.flags.c_contiguous and a.flags.writeable
        size = fake.registered[a.ctypes.data]
        assert a.ctypes.data % page == 0 and size == -(-a.nbytes // page) * page
        spans.append((a.ctypes.data, a.ctypes.data + size))
        a[...] = 1  # the memory is the array's own
    spans.sort()  # no page shared by two arrays
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:], strict=False))
    ptrs = [a.ctypes.data for a in arrays]
    del a, arrays
    gc.collect()
    assert sorted(fake.unregistered) == sorted(ptrs)  # unregistered once freed
    assert pinned_host_allocator((0, 4), np.dtype(np.float32)).shape == (0, 4)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: _FakeCudart(fail=2))
    from prefixkv.torch_frontend import _memory

    cleared = []
    monkeypatch.setattr(_memory, "_clear_cuda_error", lambda: cleared.append(1))
    with pytest.raises(RuntimeError, match=f"cudaHostRegister of {page} bytes failed with "
                                           "cudaError 2"):
        pinned_host_allocator((4,), np.dtype(np.float32))
    assert cleared == [1]  # the runtime's last error reset, not left for the next launch


# ------------------------------------------- cache ops: fast CPU paths, layouts, bit patterns

_BITS = {"float32": (np.uint32, torch.int32), "float16": (np.uint16, torch.int16),
         "bfloat16": (np.uint16, torch.int16)}


def _random_bits(rng, shape, dtype, nan_every=0):
    """Arbitrary bit patterns of ``dtype`` (NaN payloads, infinities, subnormals included);
    with ``nan_every``, every nan_every-th element a NaN (a cache pre-filled with garbage)."""
    u, _ = _BITS[dtype]
    bits = rng.integers(0, np.iinfo(u).max, size=shape, dtype=u, endpoint=True)
    x = bits.view(numpy_dtype(dtype))
    if nan_every:
        x.reshape(-1)[::nan_every] = np.nan
    return x


def _same_bits(got, want):
    """Bit-identical (NaN payloads too): torch tensor vs numpy array."""
    _, ti = _BITS[{torch.float32: "float32", torch.float16: "float16",
                   torch.bfloat16: "bfloat16"}[got.dtype]]
    assert torch.equal(got.contiguous().view(ti), T(want).view(ti))


def _layout(x, layout):
    """The cache ``x`` (numpy [num_blocks, ...]) as a torch tensor in ``layout``, plus a
    function giving the full parent storage (to see that nothing outside it changed)."""
    t = T(x)
    if layout == "contiguous":
        return t, lambda: t
    if layout == "stacked_blocks":  # a K half of [num_blocks, 2, ...]: blocks not adjacent
        parent = torch.stack([t, torch.full_like(t, float("nan"))], dim=1)
        return parent[:, 0], lambda: parent
    if layout == "stacked_layers":  # [2, num_blocks, ...][1]: contiguous, storage offset
        parent = torch.stack([torch.full_like(t, float("nan")), t])
        return parent[1], lambda: parent
    if layout == "odd_offset":  # storage offset of one element: no wider view is aligned
        flat = torch.full((t.numel() + 1,), float("nan"), dtype=t.dtype)
        view = flat[1:].view(t.shape)
        view.copy_(t)
        return view, lambda: flat
    if layout == "heads_strided":  # [num_blocks, block_size, H, D] with D-major heads
        parent = t.transpose(2, 3).contiguous().transpose(2, 3)
        return parent, lambda: parent
    raise AssertionError(layout)


LAYOUTS = ("contiguous", "stacked_blocks", "stacked_layers", "odd_offset", "heads_strided")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("no_sync", [False, True], ids=["host", "no_sync"])
@pytest.mark.parametrize("small_rows", [None, 0], ids=["small_fast_path", "general_path"])
def test_write_kv_bits_layouts_negative_slots(dtype, layout, no_sync, small_rows, monkeypatch):
    """Bit-exact vs the reference for every layout, slots with negatives (skipped, never
    written), padding rows; both the host path and the device path (run here on the CPU),
    few-token writes with and without the wide views (SMALL_WRITE_ROWS) alike."""
    from prefixkv.torch_frontend import _native

    if small_rows is not None:
        monkeypatch.setattr(_native, "SMALL_WRITE_ROWS", small_rows)

    rng = np.random.default_rng(20)
    shape = (7, 4, 2, 8)  # block_size 4
    kc, vc = (_random_bits(rng, shape, dtype, nan_every=3) for _ in range(2))
    key, val = (_random_bits(rng, (9, 2, 8), dtype) for _ in range(2))
    cases = [np.array([5, -1, 27, 0, 13, -7, 4, 26], np.int32),  # 8 of 9 rows
             np.array([-1, -2], np.int32),  # nothing to write
             np.array([-3, 11, 2], np.int32),  # first entry negative
             np.arange(28, dtype=np.int32)[::-1].copy()[:9],  # all live, reversed
             np.zeros(0, np.int32)]
    for slots in cases:
        want_k, want_v = ref.write_kv_reference(key, val, kc, vc, slots)
        tk, k_parent = _layout(kc, layout)
        tv, v_parent = _layout(vc, layout)
        k_before, v_before = k_parent().clone(), v_parent().clone()
        if no_sync:
            _native._write_kv_no_sync(T(key), T(val), tk, tv, T(slots))
        else:
            tf.write_kv(T(key), T(val), tk, tv, T(slots))
        _same_bits(tk, want_k)
        _same_bits(tv, want_v)
        for parent, before, cache in ((k_parent(), k_before, tk), (v_parent(), v_before, tv)):
            if parent is not cache:  # bytes outside the cache view untouched
                mask = torch.zeros(parent.numel(), dtype=torch.bool)
                mask[_storage_indices(cache, parent)] = True
                _, ti = _BITS[dtype]
                assert torch.equal(parent.reshape(-1).view(ti)[~mask],
                                   before.reshape(-1).view(ti)[~mask])


def _storage_indices(view, parent):
    """Flat element positions of ``view`` inside the contiguous (flat) ``parent``."""
    off = view.storage_offset() - parent.storage_offset()
    pos = torch.full(view.shape, off, dtype=torch.int64)
    for dim, (size, stride) in enumerate(zip(view.shape, view.stride(), strict=True)):
        shape = [1] * view.dim()
        shape[dim] = size
        pos = pos + (torch.arange(size) * stride).view(shape)
    return pos.reshape(-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("small_bytes", [None, 0], ids=["default", "wide_views"])
def test_copy_scatter_bits_layouts_overlap(dtype, layout, small_bytes, monkeypatch):
    """copy_blocks with src and dst overlapping (a chain and a swap: every read before any
    write), scatter_blocks from a strided buffer, gather_blocks; bit-exact, NaN-filled
    caches; the blocks' index_copy_ with and without the wide views (SMALL_WRITE_BYTES)."""
    from prefixkv.torch_frontend import _native

    if small_bytes is not None:
        monkeypatch.setattr(_native, "SMALL_WRITE_BYTES", small_bytes)
    rng = np.random.default_rng(21)
    caches = [_random_bits(rng, (9, 4, 2, 8), dtype, nan_every=5) for _ in range(3)]
    src = np.array([1, 2, 5, 2, 3, 8], np.int32)
    dst = np.array([2, 7, 1, 0, 8, 3], np.int32)  # chain 1->2->7, 5->1, swap 3<->8
    want = ref.copy_blocks_reference(caches, src, dst)
    tc = [_layout(c, layout)[0] for c in caches]
    tf.copy_blocks(tc, T(src), T(dst))
    for g, w in zip(tc, want, strict=True):
        _same_bits(g, w)
    new = _random_bits(rng, (3, 4, 3, 4, 2, 8), dtype)  # buffer[:, 1] below: strided
    sids = np.array([6, 0, 4], np.int32)
    want2 = ref.scatter_blocks_reference(want, new[:, 1], sids)
    tf.scatter_blocks(tc, T(new)[:, 1], T(sids))
    for g, w in zip(tc, want2, strict=True):
        _same_bits(g, w)
    gids = np.array([0, 6, 6, 2, 8], np.int32)  # repeats allowed
    _same_bits(tf.gather_blocks(tc, T(gids)), ref.gather_blocks_reference(want2, gids))


def test_few_big_blocks_move_through_wide_views(monkeypatch):
    """Without the compiled block copy, swap_blocks and scatter_blocks of 5 blocks of 32 KiB
    (fewer rows than SMALL_WRITE_ROWS, more bytes than SMALL_WRITE_BYTES) index_copy_ them as
    complex128 rows (torch's CPU index_copy_ moves element by element: ~7x slower as
    bfloat16); exact."""
    from prefixkv.kernels.cpu import block_copy
    from prefixkv.torch_frontend import _native

    monkeypatch.setenv("PREFIXKV_DISABLE_CPU_FFI", "1")
    monkeypatch.setattr(block_copy, "_state", {})
    seen = []
    wide = _native._wide

    def spy(*rows):
        got = wide(*rows)
        seen.append(got[0].dtype)
        return got
    monkeypatch.setattr(_native, "_wide", spy)
    g = torch.Generator().manual_seed(3)
    src = [torch.randn(6, 16, 8, 128, generator=g).to(torch.bfloat16) for _ in range(2)]
    dst = [torch.zeros(9, 16, 8, 128, dtype=torch.bfloat16) for _ in range(2)]
    si, di = torch.tensor([5, 0, 3, 1, 2], dtype=torch.int32), torch.tensor([8, 2, 0, 4, 6])
    tf.swap_blocks(src, dst, si, di)
    assert seen == [torch.complex128] * 2
    for a, b in zip(src, dst, strict=True):
        assert torch.equal(b[di], a[si.long()]) and not b[[1, 3, 5, 7]].any()
    seen.clear()
    tf.scatter_blocks(dst, torch.stack(src, 1)[:5], torch.tensor([6, 7, 1, 3, 5]))
    assert seen == [torch.complex128] * 2
    for a, b in zip(src, dst, strict=True):
        assert torch.equal(b[[6, 7, 1, 3, 5]], a[:5])


def test_wide_views_only_where_aligned():
    from prefixkv.torch_frontend import _native

    x = torch.zeros(4, 16, dtype=torch.bfloat16)
    assert _native._wide(x, x)[0].dtype == torch.complex128  # 32 bytes a row
    assert _native._wide(x[:, 4:12], x[:, 4:12])[0].dtype == torch.int64  # 8-byte address
    assert _native._wide(x[:, 1:9], x[:, :8])[0].dtype == torch.bfloat16  # 2-byte address
    assert _native._wide(x[:, :6], x[:, :6])[0].dtype == torch.int32  # 12 bytes a row
    assert _native._wide(x.float(), x.float())[0].dtype == torch.complex128


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_attention_states_chunks_dtypes_noncontiguous(monkeypatch, dtype):
    """Several token chunks (a ragged last one), non-contiguous inputs, empty states: the
    reference within the dtype's tolerance, and bit-identical to one chunk."""
    from prefixkv.torch_frontend import _native

    rng = np.random.default_rng(22)
    oa, ob = (testing.random_values(rng, (11, 3, 16), dtype) for _ in range(2))
    la, lb = (rng.standard_normal((11, 3)).astype(np.float32) * 3 for _ in range(2))
    la[0], lb[0] = -np.inf, -np.inf  # both empty -> out 0, lse -inf
    la[4, 1] = -np.inf  # one side empty -> the other
    lb[7] = -np.inf
    want, want_lse = ref.merge_attention_states_reference(oa, la, ob, lb)
    ta = T(np.ascontiguousarray(np.stack([oa, oa], axis=2)))[:, :, 1]  # strided rows
    args = (ta, T(la), T(ob), T(lb))
    monkeypatch.setattr(_native, "MERGE_CHUNK_BYTES", 4 * 3 * 16 * 4)  # 4 tokens a chunk
    got, got_lse = tf.merge_attention_states(*args)
    assert got.dtype == TORCH_DTYPE[dtype]
    close(got, want, dtype)
    np.testing.assert_allclose(N(got_lse), want_lse, atol=1e-6, rtol=1e-6)
    assert torch.all(got[0] == 0) and torch.all(torch.isneginf(got_lse[0]))
    monkeypatch.setattr(_native, "MERGE_CHUNK_BYTES", 1 << 30)
    one, one_lse = tf.merge_attention_states(*args)
    assert torch.equal(got, one) and torch.equal(got_lse, one_lse)


def test_reused_buffers_survive_inference_mode():
    """CPU scratch buffers made under torch.inference_mode are not reused outside it (an
    inference tensor cannot be written there)."""
    x = torch.randn(5, 2, 8).to(torch.bfloat16)
    lse = torch.randn(5, 2)
    with torch.inference_mode():
        tf.merge_attention_states(x, lse, x, lse)
    got, _ = tf.merge_attention_states(x, lse, x, lse)
    torch.testing.assert_close(got, x)


@pytest.mark.parametrize("out_dtype", ["bfloat16", "float16"])
def test_merge_float32_states_into_half_output(monkeypatch, out_dtype):
    """The merge shared_prefix_attention runs: float32 parts, an output in q's dtype; several
    chunks. Equals the float32 merge rounded once."""
    from prefixkv.torch_frontend import _native

    monkeypatch.setattr(_native, "MERGE_CHUNK_BYTES", 3 * 2 * 8 * 4)  # 3 tokens a chunk
    g = torch.Generator().manual_seed(23)
    oa, ob = torch.randn(2, 10, 2, 8, generator=g)
    la, lb = torch.randn(2, 10, 2, generator=g)
    la[2] = lb[2] = float("-inf")
    want, want_lse = torch.empty_like(oa), torch.empty_like(la)
    _native.merge_attention_states(want, want_lse, oa, la, ob, lb)
    got = torch.full(oa.shape, float("nan"), dtype=TORCH_DTYPE[out_dtype])
    got_lse = torch.full_like(la, float("nan"))
    _native.merge_attention_states(got, got_lse, oa, la, ob, lb)
    assert torch.equal(got, want.to(got.dtype)) and torch.equal(got_lse, want_lse)
    assert torch.all(got[2] == 0)


def test_write_kv_device_path_reads_no_values_on_the_host():
    """The device path (no nonzero, no .item()) on meta tensors: any read of a value on the
    host (a sync on a GPU, a graph break in a capture) raises there. Layouts: contiguous, a
    K half of a stacked cache, heads not contiguous (the 2-D index_put_ path)."""
    from prefixkv.torch_frontend import _native

    meta = {"device": "meta"}
    caches = [torch.empty(5, 4, 2, 8, **meta), torch.empty(5, 2, 4, 2, 8, **meta)[:, 0],
              torch.empty(5, 4, 8, 2, **meta).transpose(2, 3)]
    assert _native._slot_rows(caches[1], torch.empty(0, dtype=torch.int64))[0] is not None
    assert _native._slot_rows(caches[2], torch.empty(0, dtype=torch.int64))[0] is None
    key = torch.empty(6, 2, 8, **meta)
    slots = torch.empty(5, dtype=torch.int32, **meta)
    for cache in caches:
        _native._write_kv_no_sync(key, key, cache, cache, slots)
        _native.write_kv(key, key, cache, cache, slots)  # slots not on the host: the same


@pytest.mark.parametrize("layout", ["contiguous", "stacked_blocks", "heads_strided"])
def test_write_kv_scatter_sources_with_strided_rows(layout):
    """key/value and the scatter buffer with rows that are not contiguous (head_dim-major)."""
    rng = np.random.default_rng(24)
    kc = _random_bits(rng, (5, 4, 2, 8), "bfloat16", nan_every=3)
    key = _random_bits(rng, (6, 2, 8), "bfloat16")
    slots = np.array([3, -1, 17, 0, 9], np.int32)
    want, _ = ref.write_kv_reference(key, key, kc, kc, slots)
    tkey = T(np.ascontiguousarray(key.transpose(0, 2, 1))).transpose(1, 2)
    assert not tkey.is_contiguous()
    tk, tv = _layout(kc, layout)[0], _layout(kc, layout)[0]
    tf.write_kv(tkey, tkey, tk, tv, T(slots))
    _same_bits(tk, want)
    _same_bits(tv, want)
    buf = _random_bits(rng, (2, 1, 4, 2, 8), "bfloat16")
    tbuf = T(np.ascontiguousarray(buf.transpose(0, 1, 2, 4, 3))).transpose(3, 4)
    want2 = ref.scatter_blocks_reference([want], buf, np.array([4, 1], np.int32))
    tf.scatter_blocks([tk], tbuf, T(np.array([4, 1], np.int32)))
    _same_bits(tk, want2[0])


# -------------------------------------------- eager calls skip the dispatcher round trip


class _Seen(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _write_kv_inputs():
    rng = np.random.default_rng(40)
    kc, vc, _ = _caches(rng)
    key = rng.standard_normal((2, *kc.shape[2:])).astype(np.float32)
    slots = np.array([1, 6], np.int32)
    want = ref.write_kv_reference(key, key, kc, vc, slots)
    return T(key), T(kc), T(vc), T(slots), want


def test_eager_wrapper_calls_the_implementation_directly(monkeypatch):
    from prefixkv.torch_frontend import _ops
    calls = []
    monkeypatch.setitem(_ops._IMPL, "write_kv", lambda *a: calls.append(a))  # writes nothing
    key, k, v, slots, _ = _write_kv_inputs()
    before = (k._version, v._version)
    tf.write_kv(key, key, k, v, slots)
    assert len(calls) == 1
    # the version bump the dispatcher's ADInplaceOrView kernel would have made
    assert k._version > before[0] and v._version > before[1]


@pytest.mark.parametrize("context", ["dispatch_mode", "requires_grad", "profiler"])
def test_non_plain_calls_go_through_the_custom_op(monkeypatch, context):
    from prefixkv.torch_frontend import _ops
    calls = []
    monkeypatch.setitem(_ops._IMPL, "write_kv", lambda *a: calls.append(a))
    key, k, v, slots, want = _write_kv_inputs()
    if context == "dispatch_mode":
        with _Seen() as seen:
            tf.write_kv(key, key, k, v, slots)
        assert "prefixkv.write_kv.default" in seen.ops
    elif context == "requires_grad":  # under no_grad: in grad mode the wrapper refuses it
        with torch.no_grad():
            tf.write_kv(key.requires_grad_(), key, k, v, slots)
    else:
        with torch.profiler.profile() as prof:
            tf.write_kv(key, key, k, v, slots)
        assert any(e.name == "prefixkv::write_kv" for e in prof.events())
    assert calls == []  # the registered implementation ran, not the spy
    np.testing.assert_array_equal(N(k), want[0].astype(np.float64))


# ------------------------------------------------------- CPU decode through the C kernel


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_cpu_decode_runs_the_compiled_kernel(monkeypatch, dtype):
    """Contiguous CPU decode runs kernels/cpu/decode.py (when it builds), so does a decode over
    views of a stacked cache (with its block stride); PREFIXKV_DISABLE_CPU_FFI takes the torch
    path; all three match the reference."""
    from prefixkv.kernels.cpu import decode

    if not decode.available():
        pytest.skip(f"CPU decode kernel: {decode.status()}")
    rng = np.random.default_rng(50)
    opts = dict(sliding_window=13, logits_soft_cap=4.0)
    b = testing.make_ragged_batch(rng, testing.seq_grid("decode", 8), num_q_heads=8,
                                  num_kv_heads=2, head_dim=64, block_size=8, dtype=dtype,
                                  sliding_window=13)
    want, want_lse = ref.paged_attention_reference(*b.args(), return_lse=True, **opts)
    args = [T(a) for a in b.args()]
    calls = []
    real = decode.decode_attention
    monkeypatch.setattr(decode, "decode_attention", lambda *a, **k: (calls.append(a),
                                                                      real(*a, **k)))
    got, got_lse = tf.paged_attention(*args, return_lse=True, **opts)
    assert len(calls) == 1
    close(got, want, dtype)
    np.testing.assert_allclose(N(got_lse), want_lse, atol=1e-4, rtol=1e-4)
    stacked = torch.stack([args[1], args[2]], dim=1)  # non-contiguous K/V views
    got_view = tf.paged_attention(args[0], stacked[:, 0], stacked[:, 1], *args[3:], **opts)
    assert len(calls) == 2 and calls[1][1][7] == stacked.stride(0)
    close(got_view, want, dtype)
    monkeypatch.setenv("PREFIXKV_DISABLE_CPU_FFI", "1")
    monkeypatch.setattr(decode, "_state", {})
    assert not decode.available() and "disabled" in decode.status()
    close(tf.paged_attention(*args, **opts), want, dtype)
    assert len(calls) == 2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_cascade_decode_own_part_by_the_compiled_kernel(monkeypatch, dtype):
    from prefixkv.kernels.cpu import decode

    if not decode.available():
        pytest.skip(f"CPU decode kernel: {decode.status()}")
    calls = []
    real = decode.decode_attention
    monkeypatch.setattr(decode, "decode_attention", lambda *a, **k: (calls.append(a),
                                                                      real(*a, **k)))
    rng = np.random.default_rng(51)
    b = testing.make_shared_prefix_batch(rng, [5, 0, 2], [(0, 1, 9), (2, 1, 1), (-1, 1, 16),
                                                          (0, 1, 33), (1, 1, 4)],
                                         num_q_heads=8, num_kv_heads=2, head_dim=64,
                                         block_size=8, dtype=dtype)
    for cap in (None, 3.0):
        _check_shared(b, cap, dtype)
    assert len(calls) == 2  # the own part of each call


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_decode_kernel_threads_give_the_same_bits(dtype):
    """The compiled CPU decode kernel splits sequences over threads (ranges of equal keys): any
    thread count gives bit-identical results, and through the op they match the reference."""
    from prefixkv.kernels.cpu import decode

    if not decode.available():
        pytest.skip(f"CPU decode kernel: {decode.status()}")
    rng = np.random.default_rng(52)
    seqs = [(1, n) for n in (1, 300, 7, 64, 129, 2, 500, 33, 16)]
    b = testing.make_ragged_batch(rng, seqs, num_q_heads=8, num_kv_heads=2, head_dim=64,
                                  block_size=16, dtype=dtype, decode=True)
    q, k, v, bt, kv = (T(a) for a in b.args()[:5])
    dims = (len(seqs), 8, 64, k.shape[0], 16, 2, bt.shape[1])
    outs = []
    for threads in (1, 2, 3, 4, 16):
        out, lse = torch.full_like(q, float("nan")), torch.full(q.shape[:2], float("nan"))
        decode.decode_attention(dtype, dims, q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                bt.data_ptr(), kv.data_ptr(), out.data_ptr(), lse.data_ptr(),
                                scale=0.125, threads=threads)
        outs.append((out, lse))
    for out, lse in outs[1:]:
        assert torch.equal(out, outs[0][0]) and torch.equal(lse, outs[0][1])
    want, want_lse = ref.paged_attention_reference(*b.args(), scale=0.125, return_lse=True)
    close(outs[0][0], want, dtype)
    np.testing.assert_allclose(N(outs[0][1]), want_lse, atol=1e-4, rtol=1e-4)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        close(tf.paged_attention(q, k, v, bt, kv, scale=0.125), want, dtype)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("bounds", ["cpu", "device"])
def test_torch_path_chunks_by_device(bounds, monkeypatch):
    """The fallback's online softmax walks the keys in chunks sized for CPU caches on the CPU
    and ~64x larger elsewhere (on an H200 the CPU sizes cost ~2000 kernel launches a decode).
    Here the GPU's bounds are forced on the CPU: 4 sequences x 2048 tokens take one chunk
    (one gather of K and one of V) instead of 16, with the same result."""
    from prefixkv.torch_frontend import _native
    from torch.utils._python_dispatch import TorchDispatchMode

    if bounds == "device":
        monkeypatch.setattr(_native, "_chunk_bound", lambda cpu, device_bound, dev: device_bound)
    rng = np.random.default_rng(41)
    b = testing.make_ragged_batch(rng, [(1, 2048)] * 4, num_q_heads=16, num_kv_heads=8,
                                  head_dim=128, block_size=16, dtype="float32", decode=True)
    q, k, v, tables, kv_lens = (T(a) for a in b.args()[:5])
    want = ref.paged_attention_reference(*b.args()[:5])

    class Gathers(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Gathers.count += func.overloadpacket is torch.ops.aten.index_select
            return func(*args, **(kwargs or {}))

    with Gathers():
        out, _ = _native._attend_padded(
            q.view(4, 1, 16, 128), k, v, tables, kv_lens, torch.ones(4, dtype=torch.int64),
            scale=128 ** -0.5, causal=True, sliding_window=None, logits_soft_cap=None,
            max_kv=None, min_end=None)
    assert Gathers.count == (2 if bounds == "device" else 32)
    close(out.view(4, 16, 128), want, "float32")


# ----------------------------------------------------------- unchecked values (bounded damage)


def _unchecked_caches(rng, n=2, num_blocks=4):
    return [T(testing.random_values(rng, (num_blocks, 8, 2, 16), "float32")) for _ in range(n)]


@pytest.mark.parametrize("mode", ["env_off", "compiled"])
def test_torch_cpu_unchecked_bad_ids_named_before_any_write(monkeypatch, mode):
    """With nobody checking values (PREFIXKV_VALUE_CHECKS=0, or torch.compile, which never
    value-checks), an id out of range on the host still raises a ValueError naming the
    argument from the torch path's own guard, before any cache is written: no half-written
    K/V pair or cache list."""
    rng = np.random.default_rng(91)
    caches = _unchecked_caches(rng)
    before = [c.clone() for c in caches]
    i32 = dict(dtype=torch.int32)
    key = T(testing.random_values(rng, (2, 2, 16), "float32"))
    calls = {
        "slot_mapping": lambda: tf.write_kv(key, key, caches[0], caches[1],
                                            torch.tensor([3, 10**6], **i32)),
        "dst": lambda: tf.copy_blocks(caches, torch.tensor([0, 1], **i32),
                                      torch.tensor([2, 99], **i32)),
        "block_ids": lambda: tf.scatter_blocks(caches, torch.zeros(2, 2, 8, 2, 16),
                                               torch.tensor([1, -3], **i32)),
        "src_ids": lambda: tf.swap_blocks(caches, [c.clone() for c in caches],
                                          torch.tensor([7], **i32), torch.tensor([0], **i32)),
        "dst_ids": lambda: tf.swap_blocks([c.clone() for c in caches], caches,
                                          torch.tensor([0, 1], **i32),
                                          torch.tensor([1, 4], **i32)),
    }
    monkeypatch.setenv("PREFIXKV_VALUE_CHECKS", "0")
    for name, call in calls.items():
        fn = torch.compile(call, fullgraph=True, backend="eager") if mode == "compiled" else call
        with pytest.raises(ValueError, match=rf"^{name}: expected values in \[0, "):
            fn()
        for c, b in zip(caches, before, strict=True):
            assert torch.equal(c, b), name
    with pytest.raises(ValueError, match=r"^block_ids: expected values in \[0, 4\), got 5"):
        tf.gather_blocks(caches, torch.tensor([0, 5], **i32))


def test_gather_blocks_into_out():
    """out=: the caller's buffer written and returned (the same object, call after call),
    bit-equal to a new buffer's gather; compiled with fullgraph too."""
    g = torch.Generator().manual_seed(20)
    caches = [torch.randn(6, 4, 2, 8, generator=g) for _ in range(3)]
    ids = torch.tensor([5, 0, 5, 2], dtype=torch.int32)
    out = torch.full((4, 3, 4, 2, 8), float("nan"))
    assert tf.gather_blocks(caches, ids, out=out) is out
    assert torch.equal(out, tf.gather_blocks(caches, ids))
    assert torch.equal(tf.gather_blocks(caches, ids[:2], out=out[:2]), out[:2])
    buf = torch.zeros(2, 3, 4, 2, 8)

    def step(cs, i, o):
        return tf.gather_blocks(cs, i, out=o).sum()

    total = torch.compile(step, fullgraph=True, backend="aot_eager")(caches, ids[1:3], buf)
    assert torch.equal(buf, tf.gather_blocks(caches, ids[1:3]))
    assert torch.equal(total, buf.sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_attention_states_into_out(dtype):
    """out=, lse= (vLLM's merge_attn_states(output, ..., output_lse)): written in place,
    returned, bit-equal to the allocating call; a strided out (a slice of a wider buffer) and
    out alone (lse made) too; compiled with fullgraph."""
    g = torch.Generator().manual_seed(21)
    oa, ob = (torch.randn(5, 4, 8, generator=g).to(dtype) for _ in range(2))
    la, lb = (torch.randn(5, 4, generator=g) for _ in range(2))
    la[0, 0], lb[1, 1] = float("-inf"), float("-inf")
    want_o, want_l = tf.merge_attention_states(oa, la, ob, lb)
    out = torch.full((5, 4, 8), float("nan"), dtype=dtype)
    lse = torch.full((5, 4), float("nan"))
    got = tf.merge_attention_states(oa, la, ob, lb, out=out, lse=lse)
    assert got[0] is out and got[1] is lse
    assert torch.equal(out, want_o) and torch.equal(lse, want_l)
    wide = torch.zeros(5, 4, 16, dtype=dtype)
    o2, l2 = tf.merge_attention_states(oa, la, ob, lb, out=wide[..., 4:12])
    assert torch.equal(o2, want_o) and torch.equal(l2, want_l)
    assert not wide[..., :4].any() and not wide[..., 12:].any()
    o3, l3 = torch.empty_like(out), torch.empty_like(lse)

    def step(a, b, o, s):
        return tf.merge_attention_states(a, la, b, lb, out=o, lse=s)[0].float().sum()

    total = torch.compile(step, fullgraph=True, backend="aot_eager")(oa, ob, o3, l3)
    assert torch.equal(o3, want_o) and torch.equal(l3, want_l)
    assert torch.equal(total, want_o.float().sum())


def test_merge_attention_states_out_refused_by_name():
    oa, ob = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    la, lb = torch.randn(3, 2), torch.randn(3, 2)
    for kwargs, err, match in [
            (dict(out=torch.empty(3, 2, 4)), ValueError, r"^out: expected shape \(3, 2, 8\)"),
            (dict(out=torch.empty(3, 2, 8, dtype=torch.float16)), TypeError,
             r"^out: expected float32, got float16"),
            (dict(lse=torch.empty(3, 2, dtype=torch.float64)), TypeError,
             r"^lse: expected float32, got float64"),
            (dict(out=torch.empty(3, 2, 8, device="meta")), ValueError,
             r"^out: expected it on out_a's device cpu, got meta"),
            (dict(out=torch.empty(1, 2, 8).expand(3, 2, 8)), ValueError,
             r"^out: its elements share memory .* pass a buffer"),
            (dict(out=oa), ValueError, r"^out: shares memory with out_a"),
            (dict(lse=lb), ValueError, r"^lse: shares memory with lse_b"),
    ]:
        with pytest.raises(err, match=match):
            tf.merge_attention_states(oa, la, ob, lb, **kwargs)


def test_gather_blocks_out_refused_by_name():
    caches = [torch.randn(6, 4, 2, 8) for _ in range(2)]
    ids = torch.tensor([1, 3])
    shape = (2, 2, 4, 2, 8)
    for out, err, match in [
            (np.zeros(shape, np.float32), TypeError, r"^out: expected a torch.Tensor, got"),
            (torch.empty(3, 2, 4, 2, 8), ValueError, r"^out: expected shape \(2, 2, 4, 2, 8\)"),
            (torch.empty(shape, dtype=torch.float16), TypeError,
             r"^out: expected float32 \(the caches' dtype\), got float16"),
            (torch.empty(2, 2, 4, 8, 2).transpose(3, 4), ValueError,
             r"^out: expected a contiguous tensor"),
            (torch.empty(2, 1, 4, 2, 8).expand(shape), ValueError, r"^out: expected a contiguous"),
    ]:
        with pytest.raises(err, match=match):
            tf.gather_blocks(caches, ids, out=out)
    whole = torch.zeros(3, 2, 4, 2, 8)  # a cache of 6 blocks whose first 4 are out
    with pytest.raises(ValueError, match=r"^out: shares memory with caches\[1\]"):
        tf.gather_blocks([caches[0], whole.view(6, 4, 2, 8)], ids, out=whole[:2])
    with torch.inference_mode():
        frozen = torch.empty(shape)
    with pytest.raises(RuntimeError, match=r"^out: an inference tensor"):
        tf.gather_blocks(caches, ids, out=frozen)


@pytest.mark.parametrize("backend,specialize",
                         [("eager", False), ("inductor", False), ("eager", True)],
                         ids=["symfloat-eager", "symfloat-inductor", "specialize_float-eager"])
def test_compiled_float_options(backend, specialize):
    """Float options that change between calls under torch.compile(fullgraph=True): dynamo
    makes them SymFloats (automatic dynamic, or dynamic=True) unless specialize_float is set,
    and the option checks had failed the graph on them (math.isfinite of a SymFloat: "torch.*
    op returned non-Tensor"). scale, logits_soft_cap and float k_scale / v_scale of
    paged_attention, shared_prefix_attention and write_kv; results equal eager's, and a bad
    value is still refused by name. (The custom ops take a float: each value traces once, as
    with specialize_float.)"""
    rng = np.random.default_rng(22)
    b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 4), block_size=4,
                                  num_q_heads=4, num_kv_heads=2, head_dim=16, nan_fill=False)
    q, k, v, bt, kv, cu = (T(a) for a in b.args())
    k8, v8 = (c.to(torch.float8_e4m3fn) for c in (k, v))
    slots = torch.tensor([5, 2], dtype=torch.int32)
    rows = torch.randn(2, 2, 16)
    no_prefix = torch.zeros((0, 1), dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
    pids = torch.full((kv.shape[0],), -1, dtype=torch.int32)

    def fn(scale):
        kc, vc = k8.clone(), v8.clone()
        tf.write_kv(rows, rows, kc, vc, slots, k_scale=scale * 2, v_scale=scale)
        return (tf.paged_attention(q, k, v, bt, kv, cu, scale=scale, logits_soft_cap=scale * 8),
                tf.paged_attention(q, kc, vc, bt, kv, cu, k_scale=scale * 2, v_scale=scale),
                tf.shared_prefix_attention(q, k, v, *no_prefix, pids, bt, kv, cu, scale=scale,
                                           logits_soft_cap=scale * 4))

    with torch._dynamo.config.patch(specialize_float=specialize, error_on_recompile=False):
        for dynamic in (None, True):
            torch._dynamo.reset()
            compiled = torch.compile(fn, fullgraph=True, backend=backend, dynamic=dynamic)
            for scale in (0.25, 0.3, 0.35):
                for got, want in zip(compiled(scale), fn(scale), strict=True):
                    torch.testing.assert_close(got, want)
            for bad in (-0.5, float("nan")):  # raised while tracing: dynamo wraps it
                with pytest.raises((ValueError, torch._dynamo.exc.Unsupported),
                                   match=r"k_scale: expected a finite value > 0"):
                    compiled(bad)


def test_compiled_memory_checks_run_in_the_ops():
    """The checks that need memory (a destination sharing it with a source, rows that are a
    view of the cache written, an inference tensor written outside inference mode) run in the
    ops, so a compiled step (dynamo's eager backend: the op bodies run as written) names the
    argument as eager does, before any write; the wrapper had skipped them while compiling
    (fake tensors have no memory). (aot_eager functionalizes: the ops then run on copies, and
    read every source before any write.)"""
    ids = torch.tensor([0, 1]), torch.tensor([2, 3])

    def swap_onto_itself(k):
        tf.swap_blocks([k], [k], *ids)

    def write_own_rows(k, v):
        tf.write_kv(k.view(-1, 2, 8)[:2], k.view(-1, 2, 8)[:2], k, v, torch.tensor([1, 2]))

    k, v = torch.randn(6, 4, 2, 8), torch.randn(6, 4, 2, 8)
    before = k.clone()
    for fn, args, match in (
            (swap_onto_itself, (k,), r"^dst_caches\[0\]: shares memory with src_caches\[0\]"),
            (write_own_rows, (k, v), r"^key: shares memory with k_cache")):
        for run in (fn, torch.compile(fn, fullgraph=True, backend="eager")):
            with pytest.raises(ValueError, match=match):
                run(*args)
            assert torch.equal(k, before)
    with torch.inference_mode():
        frozen = torch.zeros(6, 4, 2, 8)

    def write(key, kc, vc):
        tf.write_kv(key, key, kc, vc, torch.tensor([5]))

    for run in (write, torch.compile(write, fullgraph=True, backend="eager")):
        with pytest.raises(RuntimeError, match=r"^k_cache: an inference tensor"):
            run(torch.ones(1, 2, 8), frozen, v)
        assert not frozen.any()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_block_ops_on_caches_made_inside(backend):
    """copy_blocks (one cache listed twice) and swap_blocks on caches created inside the
    compiled function: torch 2.11's dynamo refuses id() of such tensors, which the overlap
    and duplicate checks had called (a fullgraph error there, none on older torch)."""
    x = torch.randn(4, 8, 2, 16)

    def step(x):
        a, b = x.clone(), x.clone() * 2
        tf.copy_blocks([a, b, a], torch.tensor([0]), torch.tensor([3]))
        dst = torch.zeros_like(x)
        tf.swap_blocks([b], [dst], torch.tensor([3, 1]), torch.tensor([0, 2]))
        return a, dst

    a, dst = torch.compile(step, fullgraph=True, backend=backend)(x)
    want_a = x.clone()
    want_a[3] = x[0]
    assert torch.equal(a, want_a)
    want = torch.zeros_like(x)
    want[0], want[2] = x[0] * 2, x[1] * 2
    assert torch.equal(dst, want)


def test_torch_cpu_unchecked_attention_reads_stay_in_the_cache(monkeypatch):
    """Unchecked block-table ids out of range are clamped into the cache on every CPU route
    (compiled decode kernel, padded and fused host paths): a result, no IndexError."""
    monkeypatch.setenv("PREFIXKV_VALUE_CHECKS", "0")
    rng = np.random.default_rng(92)
    k, v = _unchecked_caches(rng)
    q = T(testing.random_values(rng, (3, 4, 16), "float32"))
    tables = torch.tensor([[0, 99], [-5, 1], [2, 3]], dtype=torch.int32)
    lens = torch.tensor([12, 16, 9], dtype=torch.int32)
    clamped = tables.clamp(0, 3)
    want = tf.paged_attention(q, k, v, clamped, lens)  # decode
    torch.testing.assert_close(tf.paged_attention(q, k, v, tables, lens), want)
    cu = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    torch.testing.assert_close(tf.paged_attention(q, k, v, tables, lens, cu), want)
    got = tf.paged_attention(q, k, v, tables, lens, cu, logits_soft_cap=50.0)
    torch.testing.assert_close(got, tf.paged_attention(q, k, v, clamped, lens, cu,
                                                       logits_soft_cap=50.0))


def test_torch_cpu_unchecked_negative_lengths_are_clipped(monkeypatch):
    """Unchecked lengths on the host are clipped to [0, the table's keys] (docs/ops.md,
    Errors): negative kv_lens had reached torch.arange (RuntimeError), a prefix length of
    -2**31 wrapped to 2**31 - 1 in the cascade's joined tables (a 2-sequence call looped over
    2**31 keys, as did a plan), and a prefill over a table of no column indexed it
    (IndexError). Each call now returns, as fast as a valid one; the plan runs too."""
    import time

    monkeypatch.setenv("PREFIXKV_VALUE_CHECKS", "0")
    rng = np.random.default_rng(95)
    k, v = _unchecked_caches(rng)  # 4 blocks of 4 tokens, 1 kv head
    i32 = dict(dtype=torch.int32)
    start = time.monotonic()
    q = T(testing.random_values(rng, (21, 2, 16), "float32"))
    tables = torch.tensor([[0], [1]], **i32)
    for lens in ([-1, -5], [-(2**31), 3]):
        tf.paged_attention(q, k, v, tables, torch.tensor(lens, **i32),
                           torch.tensor([0, 1, 21], **i32))
    q40 = T(testing.random_values(rng, (40, 2, 16), "float32"))
    tf.paged_attention(q40, k, v, torch.zeros((1, 0), **i32), torch.tensor([40], **i32),
                       torch.tensor([0, 40], **i32))
    q1 = T(testing.random_values(rng, (1, 2, 16), "float32"))
    sp_args = (q1, k, v, torch.tensor([[0, 1, 2]], **i32), torch.tensor([-(2**31)], **i32),
               torch.tensor([0], **i32), torch.zeros((1, 1), **i32), torch.tensor([0], **i32))
    tf.shared_prefix_attention(*sp_args)
    plan = tf.plan_shared_prefix_attention(*sp_args[3:], k_cache=k, num_q_heads=2)
    plan.run(q1, k, v)
    assert time.monotonic() - start < 30  # each call milliseconds; 2**31 keys took minutes


def test_torch_cpu_sliced_table_runs_the_compiled_decode_kernel(monkeypatch):
    """A column slice of a wider block table (unit last stride, accepted as it is): the
    compiled decode kernel runs it (the table copied), so the wrapper's result is a plan's
    bit for bit; it had fallen back to the torch path (another rounding)."""
    from prefixkv.torch_frontend import _native

    rng = np.random.default_rng(96)
    b = testing.make_ragged_batch(rng, testing.seq_grid("decode", 4), num_q_heads=4,
                                  num_kv_heads=2, head_dim=16, block_size=4, decode=True)
    q, k, v, bt, kv, _ = (T(a) for a in b.args())
    wide = torch.cat([bt, torch.zeros_like(bt)], dim=1)[:, :bt.shape[1]]
    assert not wide.is_contiguous()
    ran = []
    real = _native._c_decode
    monkeypatch.setattr(_native, "_c_decode", lambda *a, **kw: ran.append(real(*a, **kw))
                        or ran[-1])
    got = tf.paged_attention(q, k, v, wide, kv)
    plan = tf.plan_paged_attention(wide, kv, k_cache=k, num_q_heads=4)
    assert ran == [True] and torch.equal(got, plan.run(q, k, v))
    assert torch.equal(got, tf.paged_attention(q, k, v, bt, kv))


def test_swap_ids_over_caches_of_no_block_are_refused_statically():
    """swap_blocks' ids over a side whose caches hold no block: refused by name from the
    shapes alone (validate's static check, as the JAX block ops under jit)."""
    empty, full = [torch.zeros(0, 4)], [torch.zeros(3, 4)]
    ids = torch.tensor([0], dtype=torch.int32), torch.tensor([1], dtype=torch.int32)
    for src, dst, name, side in ((empty, full, "src_ids", "src_caches"),
                                 (full, empty, "dst_ids", "dst_caches")):
        with pytest.raises(ValueError, match=rf"^{name}: expected values in \[0, 0\) "
                                             rf"\({side} hold no block\)"):
            tf.swap_blocks(src, dst, *ids)


def test_attention_stride0_out_and_lse_are_refused_by_name():
    """An out= or lse= that reaches one element from two indices (expand()):
    a ValueError naming it before any write, as the merge gives; it had been torch's
    RuntimeError naming nothing."""
    q, k, v = torch.randn(2, 2, 8), torch.randn(4, 4, 1, 8), torch.randn(4, 4, 1, 8)
    tables = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    kv_lens = torch.tensor([5, 7], dtype=torch.int32)
    for name, kw in (("out", dict(out=torch.zeros(1, 1, 8).expand(2, 2, 8))),
                     ("lse", dict(lse=torch.zeros(1, 1).expand(2, 2), return_lse=True))):
        with pytest.raises(ValueError, match=rf"^{name}: its elements share memory \(a "
                                             r"stride-0 view, e\.g\. from expand\(\)\); pass "
                                             r"a buffer"):
            tf.paged_attention(q, k, v, tables, kv_lens, **kw)
    with pytest.raises(ValueError, match=r"^out: its elements share memory .* pass a buffer"):
        tf.merge_attention_states(q, torch.zeros(2, 2), q, torch.zeros(2, 2),
                                  out=torch.zeros(1, 1, 8).expand(2, 2, 8))


def test_torch_device_route_unchecked_metadata_never_faults(monkeypatch):
    """The torch path's route for attention metadata on a device (CUDA's fallback, or
    backend="torch"), forced on CPU tensors: valid batches, empty sequences included, match
    the reference; unchecked cu_q_lens that disagree with q (past it, decreasing, not from 0)
    and prefix ids past the prefixes give results, never an index error (on CUDA: a device
    assert, the context lost). They raised here before: repeat_interleave's output_size,
    index_copy_ with negative rows, index_add_ of an unmapped prefix id."""
    from prefixkv.torch_frontend import _native

    monkeypatch.setenv("PREFIXKV_VALUE_CHECKS", "0")
    monkeypatch.setattr(_native, "_on_host", lambda *t: False)
    rng = np.random.default_rng(94)
    rb = testing.make_ragged_batch(rng, [(3, 5), (0, 4), (2, 9)], num_q_heads=4,
                                   num_kv_heads=2, head_dim=16, block_size=4, dtype="float32")
    q, k, v, bt, kv, cu = (T(a) for a in rb.args())
    close(tf.paged_attention(q, k, v, bt, kv, cu, backend="torch"),
          ref.paged_attention_reference(*rb.args()), "float32")
    for bad in ([0, 3, 3, 100], [0, 3, 3, 4], [0, -3, 1, 5], [2, 4, 4, 7], [-2, 0, 0, 3]):
        tf.paged_attention(q, k, v, bt, kv, torch.tensor(bad, dtype=torch.int32),
                           backend="torch")
    sb = testing.make_shared_prefix_batch(rng, [2, 1], [(0, 1, 5), (1, 2, 3), (-1, 0, 4),
                                                        (0, 3, 4)],
                                          num_q_heads=4, num_kv_heads=2, head_dim=16,
                                          block_size=4)
    args = [T(a) for a in sb.args()]
    close(tf.shared_prefix_attention(*args, backend="torch"),
          ref.shared_prefix_attention_reference(*sb.args()), "float32")
    pids = args[5].clone()
    pids[0] = 5  # no such prefix
    tf.shared_prefix_attention(*args[:5], pids, *args[6:], backend="torch")
    for bad in ([0, 1, 3, 3, 100], [0, 1, 3, 3, 5], [0, 3, 1, 1, 6]):
        tf.shared_prefix_attention(*args[:8], torch.tensor(bad, dtype=torch.int32),
                                   backend="torch")
    # tokens but no sequence (cu_q_lens [0] beside a 3-token q): no padded row to land in
    none = torch.tensor([0], dtype=torch.int32)
    out = tf.paged_attention(q[:3], k, v, bt[:0], kv[:0], none, backend="torch")
    assert torch.equal(out, torch.zeros_like(q[:3]))
    tf.shared_prefix_attention(*args[:5], args[5][:0], args[6][:0], args[7][:0], none,
                               backend="torch")


def test_torch_device_route_drops_out_of_range_writes_without_sync():
    """The no-sync helpers the torch path uses for ids on a device (unchecked there: a check
    is a host sync), run here on CPU tensors: a write to an id or slot outside the cache is
    dropped, every other lands, and nothing else changes (the same bytes as the reference
    write of the live entries alone)."""
    from prefixkv.torch_frontend import _native

    rng = np.random.default_rng(93)
    cache = T(testing.random_values(rng, (5, 8, 2, 16), "float32"))
    rows = T(testing.random_values(rng, (4, 8, 2, 16), "float32"))
    for ids in ([2, 7, -1, 0], [9, 9, -4, 5], []):
        idx = torch.tensor(ids, dtype=torch.int64)
        want = cache.clone()
        for i, x in zip(ids, rows, strict=False):
            if 0 <= i < 5:
                want[i] = x
        got = cache.clone()
        _native._index_copy(got, *_native._drop_out_of_range(got, idx, rows[:len(ids)]))
        assert N(got).tobytes() == N(want).tobytes(), ids
    knp, vnp = (testing.random_values(rng, (2, 4, 2, 16), "bfloat16") for _ in range(2))
    key = testing.random_values(rng, (3, 2, 16), "bfloat16")
    wk, wv = ref.write_kv_reference(key, key, knp, vnp, np.array([5, -1, -1], np.int32))
    kc, vc = T(knp), T(vnp)
    _native._write_kv_no_sync(T(key), T(key), kc, vc, torch.tensor([5, 8, 10**6],
                                                                   dtype=torch.int32))
    assert N(kc).tobytes() == N(T(wk)).tobytes() and N(vc).tobytes() == N(T(wv)).tobytes()


# ---------------------------------------- cases the frontend mutation review found untested


def _paged_vs_reference(seqs, **kw):
    batch_kw = {k: kw.pop(k) for k in ("num_q_heads", "num_kv_heads", "head_dim", "block_size")
                if k in kw}
    b = testing.make_ragged_batch(np.random.default_rng(0), seqs,
                                  sliding_window=kw.get("sliding_window"), **batch_kw)
    want, want_lse = ref.paged_attention_reference(*b.args(), return_lse=True, **kw)
    got, got_lse = tf.paged_attention(*(T(a) for a in b.args()), return_lse=True, **kw)
    close(got, want, "float32")
    fin = np.isfinite(want_lse)
    assert (np.isneginf(N(got_lse)) == ~fin).all()
    np.testing.assert_allclose(N(got_lse)[fin], want_lse[fin], atol=1e-4, rtol=1e-4)


def test_cpu_noncausal_long_prefill_is_not_tiled_as_causal():
    """A non-causal batch with more query tokens than PREFILL_Q_TILE must not take the
    causal tiled prefill."""
    _paged_vs_reference([(300, 310), (3, 10)], block_size=16, head_dim=8, num_q_heads=2,
                        num_kv_heads=1, causal=False)


def test_cpu_window_over_many_key_chunks_masks_every_chunk():
    """A window over a context of several key chunks: chunks entirely below every row's
    causal end still need the window mask (their keys may be NaN: freed blocks)."""
    _paged_vs_reference([(300, 4500)], block_size=16, head_dim=8, num_q_heads=8,
                        num_kv_heads=8, sliding_window=64)


def test_cpu_cascade_tokens_as_many_as_sequences_but_not_decode():
    """As many query tokens as sequences, with uneven query lengths (0, 2, 1, ...), through a
    prefix group big enough to run as a cascade: not a decode batch."""
    b = testing.make_shared_prefix_batch(np.random.default_rng(0), [64],
                                         [(0, 0, 3), (0, 2, 5)] + [(0, 1, 4)] * 62,
                                         head_dim=8, decode=False)
    want = ref.shared_prefix_attention_reference(*b.args())
    close(tf.shared_prefix_attention(*(T(a) for a in b.args())), want, "float32")


def test_copy_blocks_caches_at_one_address_with_other_strides_are_two_caches():
    base = torch.arange(8 * 4, dtype=torch.float32).view(8, 4).clone()
    c1, c2 = base[:4], base[::2]  # same address and shape, other memory: rows 0, 2, 4, 6
    want = base.clone()
    want[3] = want[1]  # c1[3] = c1[1]
    want[6] = want[2]  # c2[3] = c2[1]
    tf.copy_blocks([c1, c2], torch.tensor([1], dtype=torch.int32),
                   torch.tensor([3], dtype=torch.int32))
    assert torch.equal(base, want)


def test_scatter_blocks_refuses_repeated_destinations():
    caches = [torch.zeros(4, 2, 1, 4), torch.zeros(4, 2, 1, 4)]
    buf = torch.randn(2, 2, 2, 1, 4)
    with pytest.raises(ValueError, match="block_ids"):
        tf.scatter_blocks(caches, buf, torch.tensor([1, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="block_ids"):
        tf.scatter_blocks_from_host(caches, buf.numpy(), [2, 2])
    assert not any(c.any() for c in caches)


@pytest.mark.parametrize("layout", ["key_before_cache", "cache_before_key"])
def test_write_kv_rows_adjacent_to_the_cache_in_one_buffer_are_not_overlap(layout):
    """Key rows right before or after the cache in one storage (an arena) share no memory
    with it: accepted, written exactly."""
    nb, bs, h, d = 4, 2, 1, 4
    cache_n, key_n = nb * bs * h * d, 2 * h * d
    buf = torch.zeros(cache_n + key_n + cache_n)
    if layout == "key_before_cache":
        key, kc = buf[:key_n].view(2, h, d), buf[key_n:key_n + cache_n].view(nb, bs, h, d)
    else:
        kc, key = buf[:cache_n].view(nb, bs, h, d), buf[cache_n:cache_n + key_n].view(2, h, d)
    key.copy_(torch.arange(key_n, dtype=torch.float32).view(2, h, d) + 1)
    vc = torch.zeros(nb, bs, h, d)
    tf.write_kv(key, torch.ones(2, h, d), kc, vc, torch.tensor([0, 3], dtype=torch.int32))
    assert torch.equal(kc.view(-1, h, d)[[0, 3]], key)


@pytest.mark.parametrize("sign", [1, -1], ids=["one-past-max", "all-past-min"])
def test_decode_logits_past_float32_give_nan_not_a_finite_answer(sign):
    """q.k past float32's range: the compiled decode kernel gave a finite output that skipped
    a +inf key, with lse +inf (which a merge reads as an empty state), or whatever its vector
    exp made of -inf - -inf; now NaN, as the other paths give NaN."""
    out, lse = tf.paged_attention(*(T(a) for a in testing.logit_overflow_decode(sign)),
                                  return_lse=True)
    assert np.isnan(N(out)).all() and not (N(lse) == np.inf).any()


def test_strided_float32_q_through_the_cpu_flash_paths():
    """torch's fused CPU kernel misreads a q strided along head_dim; a float32 q passes .to
    as it is, so the long prefill tiles and the cascade's decode host pass copy it first:
    q = every other element of a wider buffer gives the reference's result."""
    rng = np.random.default_rng(31)
    b = testing.make_ragged_batch(rng, [(40, 48), (1, 9)], num_q_heads=4, num_kv_heads=2,
                                  head_dim=16, block_size=4)
    buf = torch.zeros((*b.q.shape[:2], 2 * b.q.shape[2]))
    buf[..., ::2] = T(b.q)
    args = [T(a) for a in b.args()]
    got = tf.paged_attention(buf[..., ::2], *args[1:])
    close(got, ref.paged_attention_reference(*b.args()), "float32")
    sp = testing.make_shared_prefix_batch(rng, [4], [(0, 1, 5)] * 6, num_q_heads=4,
                                          num_kv_heads=2, head_dim=16, block_size=4,
                                          decode=True)
    buf = torch.zeros((*sp.q.shape[:2], 2 * sp.q.shape[2]))
    buf[..., ::2] = T(sp.q)
    sargs = [None if a is None else T(a) for a in sp.args()]
    from prefixkv.torch_frontend import _native
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_native, "CASCADE_MIN_ROWS", 0)  # the prefix group gets its own pass
        mp.setattr(_native, "CASCADE_MIN_SEQS", 1)
        mp.setattr(_native, "CASCADE_MIN_SCORES", 0)
        got = tf.shared_prefix_attention(buf[..., ::2], *sargs[1:])
    close(got, ref.shared_prefix_attention_reference(*sp.args()), "float32")


def test_static_checks_kept_per_signature_still_refuse():
    """The wrappers keep the static checks that passed by the signature of their arguments
    (_ops._static_check: shapes, dtypes, option types and values): a later call that differs
    in any of them is checked again and refused, every time it is made; the same call reuses
    the kept result."""
    from prefixkv.paged import validate
    from prefixkv.torch_frontend import _ops

    rng = np.random.default_rng(31)
    b = testing.make_ragged_batch(rng, [(1, 9), (1, 20)], num_q_heads=4, num_kv_heads=2,
                                  head_dim=16, block_size=4, decode=True)
    q, k, v, tables, kv_lens = (T(a) for a in b.args()[:5])
    want = ref.paged_attention_reference(*b.args()[:5], sliding_window=5)
    ran = []
    real = validate.check_paged_attention
    _ops._PASSED.clear()
    _ops._VOUCHED.clear()  # the layout checks of an earlier test's call at these addresses
    try:
        validate.check_paged_attention = lambda *a, **kw: ran.append(1) or real(*a, **kw)
        for _ in range(3):
            close(tf.paged_attention(q, k, v, tables, kv_lens, sliding_window=5), want,
                  "float32")
        assert len(ran) == 1
        bad = [({"sliding_window": 0}, ValueError, "sliding_window"),
               ({"sliding_window": 5.0}, TypeError, "sliding_window"),
               ({"causal": 1}, TypeError, "causal"),
               ({"k_scale": 0.5}, ValueError, "k_scale"),
               ({"scale": -1.0}, ValueError, "scale")]
        for _ in range(2):
            for kw, err, name in bad:
                with pytest.raises(err, match=name):
                    tf.paged_attention(q, k, v, tables, kv_lens, **kw)
        with pytest.raises(TypeError, match="q: expected"):
            tf.paged_attention(q.to(torch.int32), k, v, tables, kv_lens)
        with pytest.raises(ValueError, match="q: "):
            tf.paged_attention(q[:, :3], k, v, tables, kv_lens)
        with pytest.raises(TypeError, match="block_tables: expected int32"):
            tf.paged_attention(q, k, v, tables.long(), kv_lens)
        n = len(ran)
        key, value = (torch.ones(2, 2, 16) for _ in range(2))
        slots = torch.tensor([3, 7])
        tf.write_kv(key, value, k, v, slots)
        tf.write_kv(key, value, k, v, slots)
        with pytest.raises(TypeError, match="key: expected the dtype of k_cache"):
            tf.write_kv(key.half(), value.half(), k, v, slots)
        with pytest.raises(ValueError, match="slot_mapping: expected at most"):
            tf.write_kv(key, value, k, v, torch.tensor([1, 2, 3]))
        assert len(ran) == n
    finally:
        validate.check_paged_attention = real
        _ops._PASSED.clear()
        _ops._VOUCHED.clear()


def test_unchecked_host_lengths_count_at_most_the_tables_keys(monkeypatch):
    """With value checks off, host kv_lens and prefix_lens past the table count its keys: the
    ops hand the implementations lengths clipped to max_blocks * block_size (a garbage length
    near 2**31 hung a 2-sequence CPU call), so the results are those of the table's keys. A
    spy on the op calls fails fast where a length passes unclipped. Device lengths: the triton
    kernel clips them (tests/_triton_interp_cases.py)."""
    from prefixkv.paged import validate
    from prefixkv.torch_frontend import _ops

    rng = np.random.default_rng(31)
    b = testing.make_shared_prefix_batch(rng, [2], [(0, 1, 7), (-1, 1, 12)], num_q_heads=4,
                                         num_kv_heads=2, head_dim=16, block_size=4, decode=True)
    a = list(b.args())  # q, k, v, prefix tables, prefix lens, prefix ids, tables, kv, cu
    own_cap, pre_cap = a[6].shape[1] * 4, a[3].shape[1] * 4
    assert a[7][1] == own_cap and a[4][0] == pre_cap
    want = ref.shared_prefix_attention_reference(*a)
    want_paged = ref.paged_attention_reference(*a[:3], a[6], a[7])
    handed = []
    real = _ops._invoke

    def spy(name, args, direct=False):
        lens = (args[4], args[7]) if name.startswith("shared_prefix") else (args[4],)
        handed.append([int(x.max()) for x in lens])
        assert handed[-1][-1] <= own_cap and handed[-1][0] <= max(own_cap, pre_cap), handed
        return real(name, args, direct)

    monkeypatch.setattr(_ops, "_invoke", spy)
    for past in (1, 2**31 - 1 - own_cap):
        kv, plens = a[7].copy(), a[4].copy()
        kv[1] += past
        plens[0] += min(past, 2**31 - 1 - pre_cap)
        with validate.value_checks(False):
            got = tf.paged_attention(*(T(x) for x in a[:3]), T(a[6]), T(kv))
            close(got, want_paged, "float32")
            got = tf.shared_prefix_attention(*(T(x) for x in a[:4]), T(plens), T(a[5]),
                                             T(a[6]), T(kv))
            close(got, want, "float32")
    assert len(handed) == 4


def test_lengths_read_back_from_a_device_count_at_most_the_tables_keys(monkeypatch):
    """The torch path with its metadata on a device reads a big batch's lengths back to the
    host (PAD_SYNC_BYTES); unchecked kv_lens past the table are clipped to its keys there
    before any host route loops over them (run here on CPU tensors taken for device ones)."""
    from prefixkv.torch_frontend import _native

    monkeypatch.setattr(_native, "_on_host", lambda *t: False)
    monkeypatch.setattr(_native, "PAD_SYNC_BYTES", 0)
    rng = np.random.default_rng(32)
    b = testing.make_ragged_batch(rng, [(2, 9), (3, 12)], num_q_heads=4, num_kv_heads=2,
                                  head_dim=16, block_size=4, nan_fill=False)
    assert b.block_tables.shape[1] * 4 == 12 and b.kv_lens[1] == 12
    want = ref.paged_attention_reference(*b.args())
    q, k, v, bt, kv, cu = (T(x) for x in b.args())
    for past in (1, 1000, 2**31 - 13):
        kv_bad = kv.clone()
        kv_bad[1] += past
        out = torch.empty_like(q)
        _native.paged_attention(out, None, q, k, v, bt, kv_bad, cu, scale=0.25, causal=True,
                                sliding_window=None, logits_soft_cap=None)
        close(out, want, "float32")


def test_memory_shared_across_two_storages_is_refused():
    """Tensors of two storages over one memory (``torch.from_numpy`` of two views of one
    array; the storages start at different addresses): the overlap checks compare addresses,
    not storages. Each had passed: swap_blocks copied a chain in no order, scatter_blocks
    read blocks it had written, write_kv wrote K rows that V's read."""
    base = np.random.default_rng(0).standard_normal((2, 6, 4, 2, 8)).astype(np.float32)
    before = base.copy()
    ids = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([1, 2], dtype=torch.int32)
    src, dst = torch.from_numpy(base[0, :5]), torch.from_numpy(base[0, 1:])  # blocks 0-4, 1-5
    assert src.untyped_storage().data_ptr() != dst.untyped_storage().data_ptr()
    with pytest.raises(ValueError, match=r"dst_caches\[0\]: shares memory with src_caches\[0\]"):
        tf.swap_blocks([src], [dst], *ids)
    with pytest.raises(ValueError, match=r"dst_caches\[1\]: shares memory with dst_caches\[0\]"):
        tf.swap_blocks([src.clone(), src.clone()], [src, dst], *ids)
    buffer = torch.from_numpy(base[0, 1:3, None])  # [2, 1, ...]: blocks 1 and 2 of the cache
    with pytest.raises(ValueError, match=r"buffer: shares memory with caches\[0\]"):
        tf.scatter_blocks([torch.from_numpy(base[0])], buffer, ids[1])
    rows = torch.from_numpy(base[0, 1])  # [4 tokens, 2 heads, 8]: block 1 of k_cache
    with pytest.raises(ValueError, match=r"key: shares memory with k_cache"):
        tf.write_kv(rows, rows.clone(), torch.from_numpy(base[0]), torch.from_numpy(base[1]),
                    torch.tensor([16, 17, 18, 19], dtype=torch.int32))
    np.testing.assert_array_equal(base, before)
    # disjoint memory of one array in two storages is fine
    tf.swap_blocks([torch.from_numpy(base[0])], [torch.from_numpy(base[1])], *ids)
    np.testing.assert_array_equal(base[1, 1:3], before[0, 0:2])


@pytest.mark.parametrize("path", ["host", "device"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_shared_prefix_attention_without_prefixes_is_paged_attention(dtype, path, monkeypatch):
    """No prefix (prefix_block_tables [0, w], every prefix id -1): paged attention over each
    sequence's own keys, bit for bit, as its plan runs it. With a soft cap the cascade's merge
    had rounded differently from the plan (lse 4.8e-7 off, 16-bit out up to 4.9e-4), and with
    the metadata on a device its prefix pass had failed in index_select (found by a fuzzer)."""
    from prefixkv.torch_frontend import _native

    if path == "device":
        monkeypatch.setattr(_native, "_on_host", lambda *t: False)
    rng = np.random.default_rng(1)
    dt = TORCH_DTYPE[dtype]
    k, v = (torch.from_numpy(rng.standard_normal((8, 8, 2, 32)).astype(np.float32)).to(dt)
            for _ in range(2))
    q = torch.from_numpy(rng.standard_normal((12, 4, 32)).astype(np.float32)).to(dt)
    meta = (torch.zeros((0, 1), dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
            torch.tensor([-1, -1], dtype=torch.int32))
    tables = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    kv, cu = torch.tensor([20, 7], dtype=torch.int32), torch.tensor([0, 5, 12], dtype=torch.int32)
    opts = dict(logits_soft_cap=5.0, return_lse=True)
    out, lse = tf.shared_prefix_attention(q, k, v, *meta, tables, kv, cu, **opts)
    want, want_lse = tf.paged_attention(q, k, v, tables, kv, cu, **opts)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    plan = tf.plan_shared_prefix_attention(*meta, tables, kv, cu, k_cache=k, num_q_heads=4,
                                           logits_soft_cap=5.0)
    p_out, p_lse = plan.run(q, k, v, return_lse=True)
    assert torch.equal(out, p_out) and torch.equal(lse, p_lse)
    ref_out = ref.shared_prefix_attention_reference(
        *(t.float().numpy() for t in (q, k, v)), *(t.numpy() for t in (*meta, tables, kv, cu)),
        logits_soft_cap=5.0)
    close(out, ref_out, dtype)
