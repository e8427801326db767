"""prefixkv.jax_frontend on the XLA backend (the CPU path) against the numpy reference.

Shapes are kept small and shared so the compiled functions are reused across cases.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from prefixkv.paged import reference as ref  # noqa: E402
from prefixkv.paged import testing, validate  # noqa: E402

from prefixkv import jax_frontend as jf  # noqa: E402

_close = testing.assert_attention_close
_close_lse = testing.assert_lse_close


def _check_attention(batch, backend="xla", **kw):
    dtype = str(batch.q.dtype)
    want, want_lse = ref.paged_attention_reference(*batch.args(), return_lse=True, **kw)
    out, lse = jf.paged_attention(*batch.args(), return_lse=True, backend=backend, **kw)
    assert out.dtype == batch.q.dtype and out.shape == batch.q.shape
    assert lse.dtype == jnp.float32
    _close(out, want, dtype)
    _close_lse(lse, want_lse)


# --------------------------------------------------------------------------- paged attention


@pytest.mark.parametrize("grid", testing.GRID_NAMES)
def test_paged_attention_grids(grid):
    rng = np.random.default_rng(1)
    batch = testing.make_ragged_batch(rng, testing.seq_grid(grid, 16), num_q_heads=8,
                                      num_kv_heads=2, head_dim=64, block_size=16)
    _check_attention(batch)


@pytest.mark.parametrize("kw", [dict(sliding_window=7), dict(logits_soft_cap=2.5),
                                dict(causal=False), dict(scale=0.3, sliding_window=20)],
                         ids=["window", "softcap", "noncausal", "scale_window"])
def test_paged_attention_options(kw):
    rng = np.random.default_rng(2)
    batch = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 16), num_q_heads=8,
                                      num_kv_heads=2, head_dim=64, block_size=16, q_scale=3.0,
                                      sliding_window=kw.get("sliding_window"))
    _check_attention(batch, **kw)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_paged_attention_dtypes(dtype):
    rng = np.random.default_rng(3)
    batch = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 16), num_q_heads=8,
                                      num_kv_heads=2, head_dim=64, block_size=16, dtype=dtype)
    _check_attention(batch)


@pytest.mark.parametrize("head_dim,block_size,dtype", [
    (80, 8, "float32"), (96, 32, "bfloat16"), (128, 64, "float16"), (256, 8, "float32"),
    (64, 7, "float32"), (64, 1, "float32")])
def test_paged_attention_sizes(head_dim, block_size, dtype):
    rng = np.random.default_rng(4)
    batch = testing.make_ragged_batch(rng, testing.seq_grid("prefill_with_prefix", block_size),
                                      num_q_heads=4, num_kv_heads=2, head_dim=head_dim,
                                      block_size=block_size, dtype=dtype)
    _check_attention(batch)


@pytest.mark.parametrize("heads", [(4, 4), (8, 1), (16, 2)], ids=["mha", "mqa", "gqa8"])
def test_paged_attention_head_ratios(heads):
    rng = np.random.default_rng(5)
    batch = testing.make_ragged_batch(rng, testing.seq_grid("decode", 16), num_q_heads=heads[0],
                                      num_kv_heads=heads[1], head_dim=64, block_size=16)
    _check_attention(batch)


def test_paged_attention_under_jit_and_platform_dispatch():
    rng = np.random.default_rng(6)
    batch = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 16), num_q_heads=8,
                                      num_kv_heads=2, sliding_window=9)
    f = jax.jit(lambda *a: jf.paged_attention(*a, sliding_window=9))
    got = f(*[None if a is None else jnp.asarray(a) for a in batch.args()])
    _close(got, ref.paged_attention_reference(*batch.args(), sliding_window=9), "float32")


def test_eager_calls_run_where_their_arrays_are(monkeypatch):
    """On a GPU host, eager calls on arrays committed to the CPU take the CPU backends (the
    default backend's kernel would not lower there); numpy inputs follow the default device."""
    from types import SimpleNamespace

    from prefixkv.jax_frontend import _ops

    gpu = SimpleNamespace(platform="gpu", client=SimpleNamespace(platform_version="cuda 13.0"))
    monkeypatch.setattr(jax, "devices", lambda *a: [gpu])
    assert _ops._current_platform((np.ones(2), jnp.ones(2))) == "cpu"
    assert _ops._current_platform((np.ones(2),)) == "cuda"
    gpu.client.platform_version = "rocm 6.4"
    assert _ops._current_platform(()) == "rocm"


def test_paged_attention_non_contiguous_block_table():
    rng = np.random.default_rng(7)
    batch = testing.make_ragged_batch(rng, testing.seq_grid("prefill_with_prefix", 16))
    wide = np.full((batch.block_tables.shape[0], 2 * batch.block_tables.shape[1]), -5, np.int32)
    wide[:, ::2] = batch.block_tables
    batch.block_tables = wide[:, ::2]  # a strided numpy view
    assert not batch.block_tables.flags.c_contiguous
    _check_attention(batch)


def test_paged_attention_large_block_ids():
    """Block ids past 2**15 (index arithmetic in int32 must not overflow)."""
    rng = np.random.default_rng(8)
    num_blocks, bs, hkv, d = 40000, 2, 1, 8
    k = rng.standard_normal((num_blocks, bs, hkv, d)).astype(np.float32)
    v = rng.standard_normal((num_blocks, bs, hkv, d)).astype(np.float32)
    tables = np.array([[39999, 0, 33333], [20000, 39998, 1]], np.int32)
    kv_lens = np.array([5, 6], np.int32)
    q = rng.standard_normal((2, 2, d)).astype(np.float32)
    want = ref.paged_attention_reference(q, k, v, tables, kv_lens)
    _close(jf.paged_attention(q, k, v, tables, kv_lens), want, "float32")


# --------------------------------------------------------------------- shared prefix, merge


@pytest.mark.parametrize("decode", [True, False], ids=["decode", "ragged"])
def test_shared_prefix_attention(decode):
    rng = np.random.default_rng(9)
    if decode:
        seqs = [(0, 1, 5), (1, 1, 17), (-1, 1, 3), (0, 1, 1), (1, 1, 16)]
    else:
        seqs = [(0, 3, 5), (1, 0, 0), (-1, 2, 3), (0, 9, 9), (1, 4, 20), (0, 1, 16)]
    batch = testing.make_shared_prefix_batch(rng, [2, 3], seqs, num_q_heads=8, num_kv_heads=2,
                                             block_size=8)
    want, want_lse = ref.shared_prefix_attention_reference(*batch.args(), return_lse=True,
                                                           logits_soft_cap=4.0)
    out, lse = jf.shared_prefix_attention(*batch.args(), return_lse=True, logits_soft_cap=4.0)
    _close(out, want, "float32")
    _close_lse(lse, want_lse)


def test_shared_prefix_empty_prefix_bf16():
    rng = np.random.default_rng(10)
    batch = testing.make_shared_prefix_batch(rng, [0, 1], [(0, 1, 3), (1, 1, 2), (0, 1, 9)],
                                             dtype="bfloat16", block_size=8)
    _close(jf.shared_prefix_attention(*batch.args()),
           ref.shared_prefix_attention_reference(*batch.args()), "bfloat16")


def _nan_block(batch) -> int:
    """A pool block holding no token (all NaN)."""
    k = np.asarray(batch.k_cache, np.float32)
    return int(np.flatnonzero(np.isnan(k).all(axis=(1, 2, 3)))[0])


# one prefix: the single-prefix fast path (every token against the prefix, no sort)
SINGLE_PREFIX_CASES = {
    "decode": ([5], [(0, 1, 5), (-1, 1, 3), (0, 1, 16), (0, 1, 1)], {}),
    "ragged_softcap": ([3], [(0, 3, 5), (0, 0, 0), (-1, 2, 3), (0, 9, 9)],
                       dict(logits_soft_cap=4.0)),
    "empty_prefix": ([0], [(0, 1, 3), (-1, 1, 2)], {}),
    "no_token_has_it": ([2], [(-1, 2, 4), (-1, 1, 1)], {}),
}


@pytest.mark.parametrize("chunk_blocks", [1, 2, 3])
def test_single_prefix_attention_chunks(chunk_blocks):
    """Several online-softmax steps, the last one partial, each against the reference."""
    from prefixkv.jax_frontend import _xla

    rng = np.random.default_rng(12)
    seqs = [(0, 2, 3), (-1, 1, 2), (0, 4, 7)]
    batch = testing.make_shared_prefix_batch(rng, [5], seqs, num_q_heads=6, num_kv_heads=3,
                                             block_size=4)
    batch.prefix_block_tables = np.pad(batch.prefix_block_tables, ((0, 0), (0, 1)),
                                       constant_values=_nan_block(batch))
    has = np.repeat(batch.prefix_ids >= 0, np.diff(batch.cu_q_lens))
    out, lse = jax.jit(lambda q, k, v, t, n, h: _xla.single_prefix_attention(
        q, k, v, t, n, h, scale=0.7, logits_soft_cap=3.0, chunk_blocks=chunk_blocks))(
        batch.q, batch.k_cache, batch.v_cache, batch.prefix_block_tables[0],
        batch.prefix_lens[0], has)
    # the prefix part alone: non-causal paged attention of every sequence over the prefix
    want, want_lse = ref.paged_attention_reference(
        batch.q, batch.k_cache, batch.v_cache,
        np.repeat(batch.prefix_block_tables, len(seqs), axis=0),
        np.repeat(batch.prefix_lens, len(seqs)), batch.cu_q_lens, scale=0.7, causal=False,
        logits_soft_cap=3.0, return_lse=True)
    want = np.where(has[:, None, None], want, 0.0)
    want_lse = np.where(has[:, None], want_lse, -np.inf)
    _close(out, want, "float32")
    _close_lse(lse, want_lse)


# several prefixes: the multi-prefix fast path (windows of each prefix's sorted tokens)
MULTI_PREFIX_CASES = {
    # prefix 2 has no token, prefix 1 holds most tokens, one token has no prefix
    "decode": ([2, 3, 1], [(1, 1, 5), (0, 1, 3), (1, 1, 16), (-1, 1, 2), (1, 1, 1),
                           (1, 1, 9)], {}),
    "ragged_softcap": ([3, 1], [(1, 3, 5), (0, 0, 0), (-1, 2, 3), (0, 9, 9), (1, 1, 4)],
                       dict(logits_soft_cap=4.0)),
    "empty_prefix": ([0, 2], [(0, 1, 3), (1, 1, 2), (0, 1, 5)], {}),
}


FAST_PATH_CASES = {**{f"single_{n}": ("single_prefix_attention", c)
                      for n, c in SINGLE_PREFIX_CASES.items()},
                   **{f"multi_{n}": ("multi_prefix_attention", c)
                      for n, c in MULTI_PREFIX_CASES.items()}}


@pytest.mark.parametrize("case", list(FAST_PATH_CASES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shared_prefix_attention_fast_paths(case, dtype, monkeypatch, request):
    """Each cascade fast path, traced and run: the CPU rule's thresholds at 0 (else these
    small batches run as paged attention over prefix then own blocks, the fast path only
    traced in the other branch of the rule's cond)."""
    from prefixkv.jax_frontend import _xla

    path, (prefix_blocks, seqs, kw) = FAST_PATH_CASES[case]
    calls = []
    real = getattr(_xla, path)
    monkeypatch.setattr(_xla, path, lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(_xla, "CPU_CASCADE_MIN_ROWS", 0)
    monkeypatch.setattr(_xla, "CPU_CASCADE_MIN_SCORES", 0)
    jax.clear_caches()  # no trace of another test's rule here, none of this one's after it
    request.addfinalizer(jax.clear_caches)
    rng = np.random.default_rng(11)
    batch = testing.make_shared_prefix_batch(rng, prefix_blocks, seqs, num_q_heads=8,
                                             num_kv_heads=2, block_size=8, dtype=dtype)
    # tables wider than the prefixes, padded with a NaN block: never read as a key
    batch.prefix_block_tables = np.pad(batch.prefix_block_tables, ((0, 0), (0, 2)),
                                       constant_values=_nan_block(batch))
    want, want_lse = ref.shared_prefix_attention_reference(*batch.args(), return_lse=True, **kw)
    out, lse = jf.shared_prefix_attention(*batch.args(), return_lse=True, **kw)
    assert calls, f"{path} was not taken"
    _close(out, want, dtype)
    _close_lse(lse, want_lse)


@pytest.mark.parametrize("q_tile", [1, 2, 3])
def test_multi_prefix_attention_windows(q_tile):
    """Windows smaller than a prefix's tokens (several per prefix, the last one crossing into
    the next prefix's tokens, which it must not write), each against the reference."""
    from prefixkv.jax_frontend import _xla

    rng = np.random.default_rng(15)
    seqs = [(1, 2, 3), (0, 1, 2), (-1, 1, 2), (1, 4, 7), (2, 1, 1), (0, 3, 4)]
    batch = testing.make_shared_prefix_batch(rng, [3, 2, 1], seqs, num_q_heads=6,
                                             num_kv_heads=3, block_size=4)
    q_lens = np.diff(batch.cu_q_lens)
    tok_pid = np.repeat(np.where(batch.prefix_ids < 0, 3, batch.prefix_ids), q_lens)
    out, lse = jax.jit(lambda q, k, v, t, n, p: _xla.multi_prefix_attention(
        q, k, v, t, n, p, scale=0.7, logits_soft_cap=3.0, q_tile=q_tile))(
        batch.q, batch.k_cache, batch.v_cache, batch.prefix_block_tables, batch.prefix_lens,
        tok_pid.astype(np.int32))
    has = tok_pid < 3
    pid = np.where(has, tok_pid, 0)
    # the prefix part alone: each token's non-causal attention over its prefix
    want, want_lse = ref.paged_attention_reference(
        batch.q, batch.k_cache, batch.v_cache, batch.prefix_block_tables[pid],
        batch.prefix_lens[pid], np.arange(len(pid) + 1, dtype=np.int32), scale=0.7,
        causal=False, logits_soft_cap=3.0, return_lse=True)
    want = np.where(has[:, None, None], want, 0.0)
    want_lse = np.where(has[:, None], want_lse, -np.inf)
    _close(out, want, "float32")
    _close_lse(lse, want_lse)


@pytest.mark.parametrize("seqs_per_step", [1, 3, None])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_short_decode_attention(seqs_per_step, dtype):
    """The own part of decode cascade attention: whole short KV per sequence, the last step
    padded with empty sequences."""
    from prefixkv.jax_frontend import _xla

    rng = np.random.default_rng(13)
    batch = testing.make_ragged_batch(rng, [(1, 5), (1, 1), (1, 16), (1, 9), (1, 12)],
                                      num_q_heads=6, num_kv_heads=2, block_size=4,
                                      dtype=dtype, max_blocks_per_seq=5)
    want, want_lse = ref.paged_attention_reference(*batch.args(), scale=0.4,
                                                   logits_soft_cap=2.0, return_lse=True)
    out, lse = jax.jit(lambda q, k, v, t, n: _xla.short_decode_attention(
        q, k, v, t, n, scale=0.4, logits_soft_cap=2.0, seqs_per_step=seqs_per_step))(
        batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.kv_lens)
    assert out.dtype == batch.q.dtype
    _close(out, want, dtype)
    _close_lse(lse, want_lse)


def test_merge_attention_states():
    rng = np.random.default_rng(11)
    oa, ob = (rng.standard_normal((5, 3, 16)).astype(np.float32) for _ in range(2))
    la, lb = (rng.standard_normal((5, 3)).astype(np.float32) for _ in range(2))
    la[0, :] = -np.inf
    lb[0, :2] = -np.inf  # row 0 heads 0, 1: both empty -> out 0, lse -inf
    lb[1] = -np.inf
    la[2], lb[3, 0] = np.inf, np.inf  # FlashAttention-2's empty rows: empty states too
    want_o, want_l = ref.merge_attention_states_reference(oa, la, ob, lb)
    got_o, got_l = jf.merge_attention_states(oa, la, ob, lb)
    np.testing.assert_allclose(np.asarray(got_o), want_o, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got_o)[2], ob[2], atol=1e-6)
    _close_lse(got_l, want_l)
    assert (np.asarray(got_o)[0, :2] == 0).all()


# ------------------------------------------------------------------------------ cache ops


def _caches(rng, num_blocks=12, bs=4, h=2, d=8, dtype="float32", n=2):
    return [testing.random_values(rng, (num_blocks, bs, h, d), dtype) for _ in range(n)]


@pytest.mark.parametrize("ffi", ["cpu_ffi", "xla_scatter"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_write_kv_exact(dtype, ffi, monkeypatch):
    """Negative slots skipped, rows past slot_mapping padding; both CPU routes: the FFI
    kernel and the XLA scatter that GPUs and TPUs without Pallas take (slot -1 must not wrap
    around to the cache's last slot)."""
    if ffi == "xla_scatter":
        from prefixkv.kernels.cpu import xla_ffi

        monkeypatch.setattr(xla_ffi, "use_for", lambda *a, **k: False)
    jax.clear_caches()  # the route is chosen at trace time: no trace of the other route
    rng = np.random.default_rng(12)
    kc, vc = _caches(rng, dtype=dtype)
    key = testing.random_values(rng, (7, 2, 8), dtype)
    value = testing.random_values(rng, (7, 2, 8), dtype)
    # 6 of 7 rows (the last is padding); -1 would wrap to the last slot, 47, left unwritten
    slots = np.array([5, -1, 46, 0, 13, -3], np.int32)
    wk, wv = ref.write_kv_reference(key, value, kc, vc, slots)
    gk, gv = jf.write_kv(key, value, kc, vc, slots)
    np.testing.assert_array_equal(np.asarray(gk).view(np.uint8), wk.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(gv).view(np.uint8), wv.view(np.uint8))


def _x64():
    """jax's x64 mode as a context (jax.enable_x64 in newer jax, jax.experimental before)."""
    on = getattr(jax, "enable_x64", None)
    if on is None:
        from jax.experimental import enable_x64 as on
    return on(True)


@pytest.mark.parametrize("backend", ["xla", "pallas_interpret", None])
def test_write_kv_takes_int64_slots(backend, pallas_races):
    """slot_mapping as vLLM and SGLang hand it (int64): numpy int64 eagerly and under jit,
    and, with x64, int64 arrays traced: a slot past the cache (2**32 + 5, which int32 would
    wrap to 5) is skipped, never written."""
    rng = np.random.default_rng(16)
    kc, vc = _caches(rng, dtype="bfloat16")
    key, value = (testing.random_values(rng, (5, 2, 8), "bfloat16") for _ in range(2))
    slots = np.array([5, -1, 46, 0, 13], np.int64)
    wk, wv = ref.write_kv_reference(key, value, kc, vc, slots)
    for got in (jf.write_kv(key, value, kc, vc, slots, backend=backend),
                jax.jit(functools.partial(jf.write_kv, backend=backend))(key, value, kc, vc,
                                                                         slots)):
        np.testing.assert_array_equal(np.asarray(got[0]).view(np.uint8), wk.view(np.uint8))
        np.testing.assert_array_equal(np.asarray(got[1]).view(np.uint8), wv.view(np.uint8))
    with _x64():
        far = jnp.asarray(np.array([5, -1, 46, (1 << 32) + 5, 13], np.int64))
        assert far.dtype == jnp.int64
        got = jax.jit(functools.partial(jf.write_kv, backend=backend))(key, value, kc, vc, far)
    wk, wv = ref.write_kv_reference(key, value, kc, vc, np.array([5, -1, 46, -1, 13]))
    np.testing.assert_array_equal(np.asarray(got[0]).view(np.uint8), wk.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(got[1]).view(np.uint8), wv.view(np.uint8))


@pytest.mark.parametrize("backend", ["xla", "pallas_interpret", None])
def test_block_ops_take_int64_ids(backend, pallas_races):
    """Block ids in int64 (numpy's default integer, vLLM's block_mapping): numpy eagerly and
    under jit give the bits int32 ids give; with x64, traced int64 ids past 2**32 (which int32
    would wrap onto blocks 2 and 5) are skipped as destinations, never written."""
    rng = np.random.default_rng(18)
    caches = _caches(rng, dtype="bfloat16")  # 12 blocks

    def same(got, want):
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(g).view(np.uint16), w.view(np.uint16))

    src, dst = np.array([1, 2, 7]), np.array([2, 9, 1])
    assert src.dtype == np.int64
    want = ref.copy_blocks_reference(caches, src.astype(np.int32), dst.astype(np.int32))
    copy = functools.partial(jf.copy_blocks, backend=backend)
    same(copy(caches, src, dst), want)
    same(jax.jit(copy)(caches, src, dst), want)
    ids = np.array([3, 0, 11, 3])
    gather = functools.partial(jf.gather_blocks, backend=backend)
    want_g = ref.gather_blocks_reference(caches, ids.astype(np.int32))
    same([gather(caches, ids)], [want_g])
    same([jax.jit(gather)(caches, ids)], [want_g])
    sids = np.array([5, 6, 1, 10])
    scatter = functools.partial(jf.scatter_blocks, backend=backend)
    want_s = ref.scatter_blocks_reference(caches, want_g, sids.astype(np.int32))
    same(scatter(caches, want_g, sids), want_s)
    same(jax.jit(scatter)(caches, want_g, sids), want_s)
    with _x64():
        far = jnp.asarray(np.array([2, (1 << 32) + 2, 4, (1 << 32) + 5], np.int64))
        assert far.dtype == jnp.int64
        got_c = jax.jit(copy)(caches, jnp.asarray(np.array([0, 1, 3, 6])), far)
        got_s = jax.jit(scatter)(caches, want_g, far)
    live = np.array([True, False, True, False])
    same(got_c, ref.copy_blocks_reference(caches, np.array([0, 3], np.int32),
                                          np.array([2, 4], np.int32)))
    same(got_s, ref.scatter_blocks_reference(caches, want_g[live], np.array([2, 4], np.int32)))


def test_copy_blocks_exact_reads_before_writes():
    rng = np.random.default_rng(13)
    caches = _caches(rng, n=3)
    src, dst = np.array([1, 2, 7], np.int32), np.array([2, 9, 1], np.int32)  # a chain
    want = ref.copy_blocks_reference(caches, src, dst)
    got = jf.copy_blocks(caches, src, dst)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), w)


def test_gather_scatter_roundtrip_exact():
    rng = np.random.default_rng(14)
    caches = _caches(rng, dtype="bfloat16")
    ids = np.array([3, 0, 11, 3], np.int32)
    buf = jf.gather_blocks(caches, ids)
    want = ref.gather_blocks_reference(caches, ids)
    np.testing.assert_array_equal(np.asarray(buf).view(np.uint16), want.view(np.uint16))
    dst = np.array([5, 6, 1, 10], np.int32)
    got = jf.scatter_blocks(caches, buf, dst)
    want_s = ref.scatter_blocks_reference(caches, want, dst)
    for g, w in zip(got, want_s, strict=True):
        np.testing.assert_array_equal(np.asarray(g).view(np.uint16), w.view(np.uint16))


@pytest.mark.parametrize("ffi", ["cpu_ffi", "xla_scatter"])
def test_block_writes_skip_out_of_range_ids_under_jit(ffi, monkeypatch):
    """Under jit nothing checks ids: a copy_blocks dst or scatter_blocks id outside
    [0, num_blocks), negative included, is skipped on both CPU routes (the FFI kernel, and the
    XLA scatter that GPUs take), never wrapped onto the cache's last block (jnp's .at[] wraps
    -1 to it, mode="drop" or not)."""
    if ffi == "xla_scatter":
        from prefixkv.kernels.cpu import xla_ffi

        monkeypatch.setattr(xla_ffi, "use_for", lambda *a, **k: False)
    jax.clear_caches()
    rng = np.random.default_rng(17)
    caches = _caches(rng, dtype="bfloat16")  # 12 blocks
    dst = np.array([-1, 4, 12, -12], np.int32)  # -12 would wrap to block 0
    live = np.array([False, True, False, False])
    src = np.array([3, 0, 5, 6], np.int32)
    got = jax.jit(jf.copy_blocks)(caches, src, dst)
    want = ref.copy_blocks_reference(caches, src[live], dst[live])
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g).view(np.uint16), w.view(np.uint16))
    buf = testing.random_values(rng, (4, 2, 4, 2, 8), "bfloat16")
    got = jax.jit(jf.scatter_blocks)(caches, buf, dst)
    want = ref.scatter_blocks_reference(caches, buf[live], dst[live])
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g).view(np.uint16), w.view(np.uint16))


def test_cache_ops_under_jit_with_donation_reuse_buffers():
    """Donated caches are updated in place: same buffer out, the input is consumed."""
    rng = np.random.default_rng(15)
    kc, vc = (jnp.asarray(c) for c in _caches(rng, num_blocks=64, bs=16, h=4, d=32))
    key = jnp.asarray(testing.random_values(rng, (3, 4, 32), "float32"))
    slots = jnp.asarray(np.array([17, -1, 100], np.int32))
    want_k, want_v = ref.write_kv_reference(np.asarray(key), np.asarray(key), np.asarray(kc),
                                            np.asarray(vc), np.asarray(slots))
    ptr_k, ptr_v = kc.unsafe_buffer_pointer(), vc.unsafe_buffer_pointer()
    step = jax.jit(lambda kc, vc, key, slots: jf.write_kv(key, key, kc, vc, slots),
                   donate_argnums=(0, 1))
    nk, nv = step(kc, vc, key, slots)
    assert kc.is_deleted() and vc.is_deleted()
    assert nk.unsafe_buffer_pointer() == ptr_k and nv.unsafe_buffer_pointer() == ptr_v
    np.testing.assert_array_equal(np.asarray(nk), want_k)
    np.testing.assert_array_equal(np.asarray(nv), want_v)
    # copy and scatter too; compiled memory: no temporary as large as a cache
    caches = [nk, nv]
    ptrs = [c.unsafe_buffer_pointer() for c in caches]
    copy = jax.jit(lambda cs, s, d: jf.copy_blocks(cs, s, d), donate_argnums=(0,))
    src, dst = jnp.asarray(np.array([1, 3], np.int32)), jnp.asarray(np.array([2, 60], np.int32))
    mem = copy.lower(caches, src, dst).compile().memory_analysis()
    if mem is not None:
        assert mem.temp_size_in_bytes < nk.nbytes
    out = copy(caches, src, dst)
    assert [c.unsafe_buffer_pointer() for c in out] == ptrs
    buf = jnp.zeros((2, 2, 16, 4, 32), jnp.float32)
    scat = jax.jit(lambda cs, b, i: jf.scatter_blocks(cs, b, i), donate_argnums=(0,))
    out2 = scat(out, buf, dst)
    assert [c.unsafe_buffer_pointer() for c in out2] == ptrs
    assert (np.asarray(out2[0])[[2, 60]] == 0).all()


# ------------------------------------------------------------------------- errors, dispatch


def _small_batch():
    return testing.make_ragged_batch(np.random.default_rng(16), [(1, 5), (2, 9)], block_size=4)


def test_error_static_check_inside_jit():
    b = _small_batch()
    with pytest.raises(TypeError, match="block_tables: expected int32, got float32"):
        jax.jit(jf.paged_attention)(b.q, b.k_cache, b.v_cache, b.block_tables.astype(np.float32),
                                    b.kv_lens, b.cu_q_lens)


@pytest.mark.parametrize("name,value", [("return_lse", True), ("sliding_window", 8),
                                        ("scale", 0.1), ("logits_soft_cap", 5.0),
                                        ("causal", False)])
def test_traced_static_argument_is_named_with_the_fix(name, value):
    """jax.jit(op) traces keyword arguments too: the error names the argument and says to
    make it static (it used to read "return_lse: expected a bool, got DynamicJaxprTracer")."""
    b = _small_batch()
    with pytest.raises(TypeError, match=rf"{name}: a static argument .*static_argnames"):
        jax.jit(jf.paged_attention)(*b.args(), **{name: value})
    if name != "causal":
        sp = testing.make_shared_prefix_batch(np.random.default_rng(3), [1], [(0, 1, 3)],
                                              block_size=4)
        sp_name = "scale" if name == "sliding_window" else name  # it has no window
        with pytest.raises(TypeError, match=rf"{sp_name}: a static argument"):
            jax.jit(jf.shared_prefix_attention)(*sp.args(), **{sp_name: 0.3 if sp_name ==
                                                               "scale" else value})
    with pytest.raises(TypeError, match=r"block_size: a static argument"):
        jax.jit(jf.hash_blocks)(np.arange(8, dtype=np.int32), 4)
    # static, it runs
    jax.jit(jf.paged_attention, static_argnames=(name,))(*b.args(), **{name: value})


def test_error_value_check_on_host_inputs():
    b = _small_batch()
    bad = b.kv_lens.copy()
    bad[1] = 1  # fewer cached tokens than this step's query tokens
    with pytest.raises(ValueError, match=r"kv_lens: expected kv_lens\[s\] >= q_len"):
        jf.paged_attention(b.q, b.k_cache, b.v_cache, b.block_tables, bad, b.cu_q_lens)


def test_error_value_check_in_checked_mode_only_outside_jit():
    b = _small_batch()
    tables = b.block_tables.copy()
    tables[0, 0] = 10_000
    with validate.value_checks(), pytest.raises(ValueError, match="block_tables: expected block"):
        jf.paged_attention(b.q, b.k_cache, b.v_cache, jnp.asarray(tables), b.kv_lens,
                           b.cu_q_lens)
    with validate.value_checks():  # traced: no host sync, no check
        jax.jit(jf.paged_attention)(b.q, b.k_cache, b.v_cache, tables, b.kv_lens, b.cu_q_lens)


def test_error_write_kv_duplicate_slots():
    rng = np.random.default_rng(17)
    kc, vc = _caches(rng)
    key = testing.random_values(rng, (2, 2, 8), "float32")
    with pytest.raises(ValueError, match="slot_mapping: expected distinct destinations"):
        jf.write_kv(key, key, kc, vc, np.array([3, 3], np.int32))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_error_unknown_backend_lists_backends(jit):
    """Eagerly and under jax.jit: an explicit backend is never dropped for the platform's
    default."""
    b = _small_batch()
    f = lambda *a: jf.paged_attention(*a, backend="cuda_magic")  # noqa: E731
    with pytest.raises(jf.BackendError,
                       match=r"unknown backend 'cuda_magic'(.|\n)*- xla: could run"):
        (jax.jit(f) if jit else f)(*b.args())


def test_error_backend_for_other_platform(monkeypatch):
    rng = np.random.default_rng(18)
    caches = _caches(rng)
    src, dst = np.array([1], np.int32), np.array([2], np.int32)
    with pytest.raises(jf.BackendError, match=r"backend 'pallas_tpu' cannot run(.|\n)*"
                                              r"pallas_tpu: runs on tpu, not cpu"):
        jf.copy_blocks(caches, src, dst, backend="pallas_tpu")
    monkeypatch.setenv("PREFIXKV_COPY_BLOCKS_BACKEND", "pallas_tpu")
    with pytest.raises(jf.BackendError, match="backend 'pallas_tpu' cannot run"):
        jf.copy_blocks(caches, src, dst)


def test_explain_backends_every_op():
    """explain_backends answers for every op, hash_blocks included, with or without the call's
    shapes (a shape rule then says what it needs), and names the ops on an unknown one."""
    ops = ("paged_attention", "shared_prefix_attention", "merge_attention_states", "write_kv",
           "copy_blocks", "gather_blocks", "scatter_blocks", "hash_blocks")
    for op in ops:
        why = jf.explain_backends(op)
        assert why["xla"] == "ok", (op, why)
        assert all(isinstance(v, str) and v for v in why.values()), (op, why)
    why = jf.explain_backends("paged_attention")
    assert why["pallas_interpret"].startswith("depends on the call"), why
    assert "head_dim" in why["pallas_interpret"], why
    why = jf.explain_backends("paged_attention", "tpu", dtype="float32", head_dim=128,
                              block_size=16, num_q_heads=8, num_kv_heads=8, table_entries=8)
    assert why["pallas_tpu"] == "ok", why
    assert jf.explain_backends("hash_blocks", "tpu", block_size=16)["pallas_tpu"] == "ok"
    assert jf.explain_backends("hash_blocks", "cpu")["pallas_tpu"] == "runs on tpu, not cpu"
    with pytest.raises(ValueError, match="op: unknown op 'attention'; the ops are copy_blocks"):
        jf.explain_backends("attention")


def test_env_var_selects_backend(monkeypatch):
    b = _small_batch()
    monkeypatch.setenv("PREFIXKV_BACKEND", "xla")
    _close(jf.paged_attention(*b.args()), ref.paged_attention_reference(*b.args()), "float32")


@pytest.mark.parametrize("sign", [1, -1], ids=["one-past-max", "all-past-min"])
def test_decode_logits_past_float32_give_nan_not_a_finite_answer(sign):
    """The CPU decode kernel (FFI) with q.k past float32's range: NaN, not a finite output."""
    out, lse = jf.paged_attention(*testing.logit_overflow_decode(sign), return_lse=True)
    assert np.isnan(np.asarray(out)).all() and not (np.asarray(lse) == np.inf).any()


def test_unchecked_lengths_count_at_most_the_tables_keys(monkeypatch):
    """Unchecked lengths (jitted, or value checks off) past the table count its keys: the ops
    hand every backend kv_lens and prefix_lens clipped to max_blocks * block_size (a garbage
    length near 2**31 made a jitted 2-sequence call loop for minutes), so the results are those
    of the table's keys. A spy on the dispatch fails fast where a length passes unclipped."""
    from prefixkv.jax_frontend import _ops

    rng = np.random.default_rng(31)
    b = testing.make_shared_prefix_batch(rng, [2], [(0, 1, 7), (-1, 1, 12)], num_q_heads=4,
                                         num_kv_heads=2, head_dim=16, block_size=4, decode=True)
    a = list(b.args())  # q, k, v, prefix tables, prefix lens, prefix ids, tables, kv, cu
    own_cap, pre_cap = a[6].shape[1] * 4, a[3].shape[1] * 4
    assert a[7][1] == own_cap and a[4][0] == pre_cap
    want = ref.shared_prefix_attention_reference(*a)
    want_paged = ref.paged_attention_reference(*a[:3], a[6], a[7])
    handed = []
    real = _ops._dispatch

    def spy(op, backend, context, call, operands=()):
        lens = (operands[4], operands[7]) if op == "shared_prefix_attention" else (operands[4],)
        if isinstance(lens[0], jax.core.Tracer):  # the jitted call: checked by its result
            return real(op, backend, context, call, operands)
        handed.append([int(np.max(np.asarray(x))) for x in lens])
        assert handed[-1][-1] <= own_cap and handed[-1][0] <= max(own_cap, pre_cap), handed
        return real(op, backend, context, call, operands)

    monkeypatch.setattr(_ops, "_dispatch", spy)
    for past in (1, 2**31 - 1 - own_cap):
        kv, plens = a[7].copy(), a[4].copy()
        kv[1] += past
        plens[0] += min(past, 2**31 - 1 - pre_cap)
        with validate.value_checks(False):
            got = jf.paged_attention(*a[:3], a[6], kv)
            np.testing.assert_allclose(np.asarray(got), want_paged, atol=2e-5, rtol=2e-5)
            got = jf.shared_prefix_attention(*a[:4], plens, a[5], a[6], kv)
            np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)
        if past == 1:  # jitted (never checked): the same clipping inside the trace
            got = jax.jit(jf.paged_attention)(*a[:3], a[6], kv)
            np.testing.assert_allclose(np.asarray(got), want_paged, atol=2e-5, rtol=2e-5)
    assert len(handed) == 4
