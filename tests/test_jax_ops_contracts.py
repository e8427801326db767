"""Contracts of the JAX ops (prefixkv.jax_frontend, CPU) that a mutation review of
jax_frontend/_ops.py and jax_frontend/_xla.py found unpinned by the other tests: value checks
of host-resident jax arrays and of copy/scatter destinations, int64 ids far below zero never
wrapped into the cache, the clipping of unchecked prefix lengths by the prefix table's own
capacity, and corner cases of the XLA paths that docs/ops.md promises (an empty state's out
never read by a merge, an empty prefix over a NaN block on the one-prefix fast path, run).

Each test names the behaviour it pins; the numpy reference (prefixkv.paged.reference) is the
oracle where there is one.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from prefixkv.paged import reference as ref  # noqa: E402
from prefixkv.paged import testing  # noqa: E402

from prefixkv import jax_frontend as jf  # noqa: E402

_close = testing.assert_attention_close
_close_lse = testing.assert_lse_close


def _x64():
    """jax's x64 mode as a context (jax.enable_x64 in newer jax, jax.experimental before)."""
    on = getattr(jax, "enable_x64", None)
    if on is None:
        from jax.experimental import enable_x64 as on
    return on(True)


def _caches(rng, num_blocks=12, bs=4, dtype="bfloat16"):
    return [testing.random_values(rng, (num_blocks, bs, 2, 8), dtype) for _ in range(2)]


def _same_bits(got, want):
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g).view(np.uint16), w.view(np.uint16))


# ------------------------------------------------------------------------------ value checks


def test_jax_arrays_on_the_cpu_are_value_checked_by_default():
    """Concrete jax arrays on a CPU device are host-resident: their values are checked with no
    checked mode, as numpy's are (a kv_len below the sequence's query tokens, an id past the
    cache)."""
    b = testing.make_ragged_batch(np.random.default_rng(1), [(1, 5), (2, 9)], block_size=4)
    bad = jnp.asarray(np.array([b.kv_lens[0], 1], np.int32))
    with pytest.raises(ValueError, match=r"kv_lens: expected kv_lens\[s\] >= q_len"):
        jf.paged_attention(b.q, b.k_cache, b.v_cache, jnp.asarray(b.block_tables), bad,
                           jnp.asarray(b.cu_q_lens))
    caches = _caches(np.random.default_rng(2))
    with pytest.raises(ValueError, match=r"block_ids: expected values in \[0, 12\)"):
        jf.gather_blocks(caches, jnp.asarray(np.array([3, 12], np.int32)))


def test_copy_and_scatter_destinations_are_value_checked():
    """copy_blocks' dst and scatter_blocks' block_ids are checked on the host: in range and
    distinct (two writes to one block would leave it holding either), each error naming the
    argument; gather_blocks' ids may repeat."""
    rng = np.random.default_rng(3)
    caches = _caches(rng)
    i32 = functools.partial(np.array, dtype=np.int32)
    with pytest.raises(ValueError, match="dst: expected distinct destinations"):
        jf.copy_blocks(caches, i32([0, 1]), i32([2, 2]))
    with pytest.raises(ValueError, match=r"dst: expected values in \[0, 12\)"):
        jf.copy_blocks(caches, i32([0, 1]), i32([2, 12]))
    with pytest.raises(ValueError, match=r"src: expected values in \[0, 12\)"):
        jf.copy_blocks(caches, i32([0, -1]), i32([2, 3]))
    buf = testing.random_values(rng, (2, 2, 4, 2, 8), "bfloat16")
    with pytest.raises(ValueError, match="block_ids: expected distinct destinations"):
        jf.scatter_blocks(caches, buf, i32([3, 3]))
    with pytest.raises(ValueError, match=r"block_ids: expected values in \[0, 12\)"):
        jf.scatter_blocks(caches, buf, i32([3, -1]))
    got = jf.gather_blocks(caches, i32([3, 3]))
    _same_bits([got], [ref.gather_blocks_reference(caches, i32([3, 3]))])


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_ids_over_caches_of_no_block_are_refused_statically(jit):
    """Ids over caches of no block are out of range whatever their values: refused by name
    while tracing too (a jitted gather or copy had raised jnp.take's IndexError from an empty
    axis, naming nothing); empty ids over such caches are fine."""
    i32 = functools.partial(np.array, dtype=np.int32)
    empty = [np.zeros((0, 4), np.float32)]
    wrap = jax.jit if jit else (lambda f: f)
    for fn, args, name in (
            (jf.gather_blocks, (empty, i32([0, 1])), "block_ids"),
            (jf.copy_blocks, (empty, i32([0]), i32([1])), "src"),
            (jf.scatter_blocks, (empty, np.zeros((1, 1, 4), np.float32), i32([0])),
             "block_ids")):
        with pytest.raises(ValueError, match=rf"^{name}: expected values in \[0, 0\) "):
            wrap(fn)(*args)
    assert wrap(jf.gather_blocks)(empty, i32([])).shape == (0, 1, 4)


# ------------------------------------------------------------------------- int64 narrowing


def test_int64_ids_far_below_zero_never_wrap_into_the_cache():
    """Traced int64 slots and block ids below -2**31 (which int32 narrowing would wrap onto
    slot 5 and blocks 2 and 5) are outside the cache: skipped by write_kv, copy_blocks and
    scatter_blocks, as every negative id is."""
    rng = np.random.default_rng(4)
    kc, vc = _caches(rng)
    key, value = (testing.random_values(rng, (3, 2, 8), "bfloat16") for _ in range(2))
    caches = [kc, vc]
    buf = testing.random_values(rng, (2, 2, 4, 2, 8), "bfloat16")
    with _x64():
        slots = jnp.asarray(np.array([7, -(1 << 32) + 5, 30], np.int64))
        assert slots.dtype == jnp.int64
        got_w = jax.jit(jf.write_kv)(key, value, kc, vc, slots)
        dst = jnp.asarray(np.array([-(1 << 32) + 2, 4], np.int64))
        got_c = jax.jit(jf.copy_blocks)(caches, jnp.asarray(np.array([0, 1], np.int64)), dst)
        got_s = jax.jit(jf.scatter_blocks)(caches, buf,
                                           jnp.asarray(np.array([-(1 << 32) + 5, 9], np.int64)))
    i32 = functools.partial(np.array, dtype=np.int32)
    _same_bits(got_w, ref.write_kv_reference(key, value, kc, vc, i32([7, -1, 30])))
    _same_bits(got_c, ref.copy_blocks_reference(caches, i32([1]), i32([4])))
    _same_bits(got_s, ref.scatter_blocks_reference(caches, buf[1:], i32([9])))


# ------------------------------------------------------------------ unchecked length clipping


def test_jitted_prefix_lengths_are_clipped_by_the_prefix_table_not_the_own_one():
    """Under jit (no value checks) prefix_lens are clipped to the prefix table's keys
    (max_prefix_blocks * block_size) and kv_lens to the own table's: a valid prefix longer than
    every sequence's own table is read whole."""
    rng = np.random.default_rng(5)
    b = testing.make_shared_prefix_batch(rng, [4], [(0, 1, 3), (-1, 1, 2), (0, 1, 4)],
                                         num_q_heads=4, num_kv_heads=2, head_dim=16,
                                         block_size=4, decode=True)
    b.block_tables = np.ascontiguousarray(b.block_tables[:, :1])  # own kv_lens <= 4: 1 block
    a = b.args()
    assert a[3].shape[1] == 4 and a[6].shape[1] == 1
    want = ref.shared_prefix_attention_reference(*a)
    got = jax.jit(jf.shared_prefix_attention)(*a)
    _close(got, want, "float32")


# ------------------------------------------------------------------------------------ merge


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merge_never_reads_an_empty_states_out_beside_a_full_one(dtype):
    """An empty state (lse -inf, or +inf: FlashAttention-2's rows with no key) merged with a
    full one gives the full one's out and lse, whatever the empty out holds (NaN, inf: it is
    never read, not even multiplied by a zero weight)."""
    rng = np.random.default_rng(6)
    full = rng.standard_normal((4, 3, 8)).astype(dtype)
    full_lse = rng.standard_normal((4, 3)).astype(np.float32)
    junk = np.full((4, 3, 8), np.nan, np.float32)
    junk[1::2] = np.inf
    junk = junk.astype(dtype)
    empty_lse = np.full((4, 3), -np.inf, np.float32)
    empty_lse[2:] = np.inf
    for a, la, b, lb in ((junk, empty_lse, full, full_lse), (full, full_lse, junk, empty_lse)):
        out, lse = jf.merge_attention_states(a, la, b, lb)
        np.testing.assert_array_equal(np.asarray(out, np.float32), full.astype(np.float32))
        np.testing.assert_allclose(np.asarray(lse), full_lse, rtol=1e-6)


# ------------------------------------------------------------------ cascade fast paths, run


@pytest.fixture
def cascade_always(monkeypatch):
    """The XLA cascade's fast paths run on CPU for any batch: the CPU rule's thresholds at 0
    (else a small batch runs as paged attention over prefix then own blocks, and the fast
    paths are only traced, never run)."""
    from prefixkv.jax_frontend import _xla

    monkeypatch.setattr(_xla, "CPU_CASCADE_MIN_ROWS", 0)
    monkeypatch.setattr(_xla, "CPU_CASCADE_MIN_SCORES", 0)
    jax.clear_caches()
    yield
    jax.clear_caches()


def test_run_single_prefix_path_empty_prefix_over_a_nan_block(cascade_always):
    """The one-prefix fast path, run: an empty prefix whose table names a NaN block (a null
    block: never read as a key) adds nothing; its tokens get their own attention."""
    rng = np.random.default_rng(7)
    b = testing.make_shared_prefix_batch(rng, [0], [(0, 1, 3), (-1, 1, 2), (0, 1, 9)],
                                         num_q_heads=4, num_kv_heads=2, head_dim=16,
                                         block_size=4, decode=True)
    k = np.asarray(b.k_cache, np.float32)
    nan_block = int(np.flatnonzero(np.isnan(k).all(axis=(1, 2, 3)))[0])
    b.prefix_block_tables = np.full((1, 2), nan_block, np.int32)
    want, want_lse = ref.shared_prefix_attention_reference(*b.args(), return_lse=True)
    out, lse = jf.shared_prefix_attention(*b.args(), return_lse=True)
    _close(out, want, "float32")
    _close_lse(lse, want_lse)
