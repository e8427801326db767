"""The XLA:CPU FFI cache ops (kernels/cpu/xla_cache_ops.cc) behind the JAX frontend's
write_kv / copy_blocks / gather_blocks / scatter_blocks, bit-exact against the numpy reference.

Caches are filled with random bit patterns (NaN payloads included), so any conversion or
touched byte outside the named rows / blocks shows up as a bit difference.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
from prefixkv.jax_frontend import _xla  # noqa: E402
from prefixkv.kernels.cpu import xla_ffi  # noqa: E402
from prefixkv.paged import reference as ref  # noqa: E402

from prefixkv import jax_frontend as jf  # noqa: E402

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
          "int8": np.int8, "float8_e4m3fn": ml_dtypes.float8_e4m3fn}
FLOAT_DTYPES = ["float32", "float16", "bfloat16"]
NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM = 12, 4, 2, 8

pytestmark = pytest.mark.skipif(not xla_ffi.available(),
                                reason=f"CPU FFI not built: {xla_ffi.cpu_cache_ops_path()}")
# the ops run (and lower) on the default backend: on a GPU machine they take the XLA path
on_cpu = pytest.mark.skipif(jax.default_backend() != "cpu",
                            reason="default backend is not the CPU")


def _bits(shape, dtype, seed):
    dtype = np.dtype(DTYPES[dtype])
    uint = np.dtype(f"u{dtype.itemsize}")
    raw = np.random.default_rng(seed).integers(0, np.iinfo(uint).max, size=shape, dtype=uint,
                                               endpoint=True)
    return raw.view(dtype)


def _same_bits(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    uint = np.dtype(f"u{got.dtype.itemsize}")
    np.testing.assert_array_equal(got.view(uint), want.view(uint))


def _cache(dtype, seed):
    return _bits((NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM), dtype, seed)


def _fresh_jit(fn):
    """jit of a new function object: no trace cached by an earlier test (jit caches traces
    per function)."""
    return jax.jit(lambda *args: fn(*args))


def _uses_ffi(fn, *args) -> bool:
    return "prefixkv_cpu_" in _fresh_jit(fn).lower(*args).as_text()


@on_cpu
def test_path_reports_ffi():
    assert xla_ffi.cpu_cache_ops_path() == "ffi"


@on_cpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_write_kv_bit_exact_negative_slots_and_padding(dtype):
    k, v = _cache(dtype, 1), _cache(dtype, 2)
    key, value = _bits((9, HEADS, HEAD_DIM), dtype, 3), _bits((9, HEADS, HEAD_DIM), dtype, 4)
    # 7 slots for 9 rows (2 padding rows), two skipped, the first and last slot of the cache
    slots = np.array([5, -1, 0, NUM_BLOCKS * BLOCK_SIZE - 1, 17, -7, 30], np.int32)
    want_k, want_v = ref.write_kv_reference(key, value, k, v, slots)
    args = [jnp.asarray(a) for a in (key, value, k, v, slots)]
    assert _uses_ffi(_xla.write_kv, *args)
    got_k, got_v = jf.write_kv(*args)
    _same_bits(got_k, want_k)
    _same_bits(got_v, want_v)


@on_cpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_copy_blocks_reads_before_writes(dtype):
    caches = [_cache(dtype, 5), _bits((NUM_BLOCKS, 3, 5), dtype, 6)]
    # a chain (1->2->3->4), a swap (7<->8), a self copy, a block read twice
    src = np.array([1, 2, 3, 7, 8, 10, 1], np.int32)
    dst = np.array([2, 3, 4, 8, 7, 10, 11], np.int32)
    want = ref.copy_blocks_reference(caches, src, dst)
    args = ([jnp.asarray(c) for c in caches], jnp.asarray(src), jnp.asarray(dst))
    assert _uses_ffi(_xla.copy_blocks, *args)
    got = jf.copy_blocks(*args)
    for g, w in zip(got, want, strict=True):
        _same_bits(g, w)


@on_cpu
def test_copy_blocks_disjoint_and_empty():
    caches = [_cache("bfloat16", 7)]
    src, dst = np.array([0, 1], np.int32), np.array([5, 6], np.int32)
    got = jf.copy_blocks([jnp.asarray(caches[0])], jnp.asarray(src), jnp.asarray(dst))
    _same_bits(got[0], ref.copy_blocks_reference(caches, src, dst)[0])
    empty = np.zeros((0,), np.int32)
    got = jf.copy_blocks([jnp.asarray(caches[0])], jnp.asarray(empty), jnp.asarray(empty))
    _same_bits(got[0], caches[0])


@on_cpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_scatter_blocks_bit_exact(dtype):
    caches = [_cache(dtype, 8), _cache(dtype, 9), _cache(dtype, 10)]
    ids = np.array([11, 0, 6, 3], np.int32)
    buffer = _bits((4, 3, BLOCK_SIZE, HEADS, HEAD_DIM), dtype, 11)
    want = ref.scatter_blocks_reference(caches, buffer, ids)
    args = ([jnp.asarray(c) for c in caches], jnp.asarray(buffer), jnp.asarray(ids))
    assert _uses_ffi(_xla.scatter_blocks, *args)
    got = jf.scatter_blocks(*args)
    for g, w in zip(got, want, strict=True):
        _same_bits(g, w)


# (block shape, block ids): repeated ids, first and last block, odd block shapes (block_size
# 1 and 7, a 1-byte-wide trailing dim), one id, no id
GATHER_CASES = {
    "repeats": ((BLOCK_SIZE, HEADS, HEAD_DIM), [3, 0, 3, NUM_BLOCKS - 1, 3, 5]),
    "block_size_1": ((1, HEADS, HEAD_DIM), [11, 2, 2]),
    "block_size_7_odd": ((7, 3, 5), [4, 9, 0, 4]),
    "flat_block": ((13,), [6]),
    "empty": ((BLOCK_SIZE, HEADS, HEAD_DIM), []),
}


@on_cpu
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(GATHER_CASES))
def test_gather_blocks_bit_exact(dtype, case):
    block_shape, ids = GATHER_CASES[case]
    caches = [_bits((NUM_BLOCKS, *block_shape), dtype, 30 + i) for i in range(3)]
    ids = np.array(ids, np.int32)
    want = ref.gather_blocks_reference(caches, ids)
    args = ([jnp.asarray(c) for c in caches], jnp.asarray(ids))
    assert _uses_ffi(_xla.gather_blocks, *args)
    got = jf.gather_blocks(*args)
    _same_bits(got, want)
    _same_bits(_fresh_jit(jf.gather_blocks)(*args), want)
    for c, orig in zip(args[0], caches, strict=True):  # inputs untouched
        _same_bits(c, orig)


@on_cpu
def test_gather_blocks_large_output_and_one_cache():
    """An output over the kernel's huge-page threshold (4 MiB), and a single cache."""
    caches = [_bits((40, 64, 8, 128), "bfloat16", 40 + i) for i in range(2)]  # 128 KiB blocks
    ids = np.random.default_rng(41).integers(0, 40, size=20).astype(np.int32)
    args = ([jnp.asarray(c) for c in caches], jnp.asarray(ids))
    got = jax.jit(_xla.gather_blocks)(*args)
    assert got.nbytes == 20 * 2 * 64 * 8 * 128 * 2  # 5 MiB
    _same_bits(got, ref.gather_blocks_reference(caches, ids))
    got = jf.gather_blocks(args[0][:1], args[1])
    _same_bits(got, ref.gather_blocks_reference(caches[:1], ids))


@on_cpu
def test_large_moves_stream_bit_exact():
    """Calls that move 2 MiB or more (kStreamMinBytes) write with streaming stores: odd block
    and row sizes (210-byte blocks, 30-byte rows), so most destinations start off any 16- or
    32-byte boundary and every copy has a tail; write_kv, copy_blocks (one pass and staged),
    scatter_blocks and gather_blocks, bit-exact."""
    rng = np.random.default_rng(43)
    num_blocks, block = 24000, (7, 3, 5)  # float16: 210-byte blocks, 30-byte token rows
    cache = _bits((num_blocks, *block), "float16", 44)
    n = 11000  # 2.2 MiB of blocks a call
    perm = rng.permutation(num_blocks).astype(np.int32)
    src = perm[:n]
    half = rng.permutation(perm[n // 2:n // 2 + n])  # half of them sources too
    for s, d in ((src, perm[n:2 * n]), (src, half)):  # one pass / staged
        got = jf.copy_blocks([jnp.asarray(cache)], jnp.asarray(s), jnp.asarray(d))
        _same_bits(got[0], ref.copy_blocks_reference([cache], s, d)[0])
    buffer = _bits((n, 1, *block), "float16", 45)
    got = jf.scatter_blocks([jnp.asarray(cache)], jnp.asarray(buffer), jnp.asarray(src))
    _same_bits(got[0], ref.scatter_blocks_reference([cache], buffer, src)[0])
    _same_bits(jf.gather_blocks([jnp.asarray(cache)], jnp.asarray(src)),
               ref.gather_blocks_reference([cache], src))
    tokens = 80000  # 2.3 MiB of 30-byte rows
    rows = _bits((tokens, 3, 5), "float16", 46)
    slots = rng.permutation(num_blocks * 7)[:tokens].astype(np.int32)
    got = jf.write_kv(*(jnp.asarray(a) for a in (rows, rows, cache, cache, slots)))
    want = ref.write_kv_reference(rows, rows, cache, cache, slots)
    _same_bits(got[0], want[0])
    _same_bits(got[1], want[1])


@on_cpu
def test_gather_blocks_inside_a_jitted_function():
    """The custom call composes with other ops under jit (ids computed in the graph)."""
    rng = np.random.default_rng(42)
    caches = [rng.standard_normal((NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM)).astype(np.float16)
              for _ in range(2)]
    ids = np.array([1, 4, 7], np.int32)

    @jax.jit
    def fn(cs, i):
        buf = jf.gather_blocks(cs, i[::-1] + 1)
        return buf, buf.astype(jnp.float32).sum()

    buf, total = fn([jnp.asarray(c) for c in caches], jnp.asarray(ids))
    want = ref.gather_blocks_reference(caches, ids[::-1] + 1)
    _same_bits(buf, want)
    np.testing.assert_array_equal(np.asarray(total), want.astype(np.float32).sum())


@on_cpu
def test_out_of_range_ids_never_written():
    """The frontend rejects these; the handlers still skip them (the raw _xla functions)."""
    k = _cache("bfloat16", 12)
    rows = _bits((3, HEADS, HEAD_DIM), "bfloat16", 13)
    slots = np.array([NUM_BLOCKS * BLOCK_SIZE, 2**31 - 1, 4], np.int32)
    got, _ = jax.jit(_xla.write_kv)(*(jnp.asarray(a) for a in (rows, rows, k, k, slots)))
    want = k.copy()
    want[1, 0] = rows[2]
    _same_bits(got, want)
    buffer = _bits((2, 1, BLOCK_SIZE, HEADS, HEAD_DIM), "bfloat16", 14)
    got = jax.jit(_xla.scatter_blocks)([jnp.asarray(k)], jnp.asarray(buffer),
                                       jnp.asarray(np.array([NUM_BLOCKS, -1], np.int32)))
    _same_bits(got[0], k)
    got = jax.jit(_xla.copy_blocks)([jnp.asarray(k)], jnp.asarray(np.array([0], np.int32)),
                                    jnp.asarray(np.array([NUM_BLOCKS], np.int32)))
    _same_bits(got[0], k)


@on_cpu
def test_gather_out_of_range_ids_clamped():
    """The frontend rejects these; the handler clamps them into the cache (never reads past
    it), as the XLA path's take(mode="clip") does."""
    k, v = _cache("bfloat16", 44), _cache("bfloat16", 45)
    ids = np.array([NUM_BLOCKS, -1, 2**31 - 1, -2**31, 3], np.int32)
    clamped = np.clip(ids, 0, NUM_BLOCKS - 1)
    args = ([jnp.asarray(k), jnp.asarray(v)], jnp.asarray(ids))
    assert _uses_ffi(_xla.gather_blocks, *args)
    got = _fresh_jit(_xla.gather_blocks)(*args)
    _same_bits(got, ref.gather_blocks_reference([k, v], clamped))
    with pytest.raises(ValueError, match="block_ids"):
        jf.gather_blocks(*args)


@on_cpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_donated_caches_updated_in_place(dtype):
    k, v = _cache(dtype, 15), _cache(dtype, 16)
    key = _bits((6, HEADS, HEAD_DIM), dtype, 17)
    slots = np.array([3, 9, -1, 40, 2, 21], np.int32)
    want_k, want_v = ref.write_kv_reference(key, key, k, v, slots)
    kc, vc = jnp.asarray(k), jnp.asarray(v)
    ptrs = [kc.unsafe_buffer_pointer(), vc.unsafe_buffer_pointer()]
    write = jax.jit(lambda kc, vc, x, s: jf.write_kv(x, x, kc, vc, s), donate_argnums=(0, 1))
    nk, nv = write(kc, vc, jnp.asarray(key), jnp.asarray(slots))
    assert kc.is_deleted() and vc.is_deleted()
    assert [nk.unsafe_buffer_pointer(), nv.unsafe_buffer_pointer()] == ptrs
    # Compare copies: a numpy view of nk (np.asarray is zero-copy on CPU) would pin its buffer
    # and make jax copy instead of donating it below.
    _same_bits(jnp.copy(nk), want_k)
    _same_bits(jnp.copy(nv), want_v)

    src, dst = np.array([3, 5], np.int32), np.array([5, 0], np.int32)
    want = ref.copy_blocks_reference([want_k, want_v], src, dst)
    copy = jax.jit(lambda cs, s, d: jf.copy_blocks(cs, s, d), donate_argnums=(0,))
    out = copy([nk, nv], jnp.asarray(src), jnp.asarray(dst))
    assert [c.unsafe_buffer_pointer() for c in out] == ptrs
    for g, w in zip(out, want, strict=True):
        _same_bits(jnp.copy(g), w)

    ids = np.array([7, 1], np.int32)
    buffer = _bits((2, 2, BLOCK_SIZE, HEADS, HEAD_DIM), dtype, 18)
    want = ref.scatter_blocks_reference(want, buffer, ids)
    scat = jax.jit(lambda cs, b, i: jf.scatter_blocks(cs, b, i), donate_argnums=(0,))
    out2 = scat(out, jnp.asarray(buffer), jnp.asarray(ids))
    assert all(c.is_deleted() for c in out)
    assert [c.unsafe_buffer_pointer() for c in out2] == ptrs
    for g, w in zip(out2, want, strict=True):
        _same_bits(g, w)


@on_cpu
def test_not_donated_input_unchanged():
    k = _cache("bfloat16", 19)
    kc = jnp.asarray(k)
    rows = jnp.asarray(_bits((2, HEADS, HEAD_DIM), "bfloat16", 20))
    out, _ = jf.write_kv(rows, rows, kc, kc, jnp.asarray(np.array([0, 1], np.int32)))
    _same_bits(kc, k)
    assert out.unsafe_buffer_pointer() != kc.unsafe_buffer_pointer()


def test_other_platforms_lower_without_the_custom_call():
    args = (jnp.zeros((3, HEADS, HEAD_DIM), jnp.bfloat16),) * 2 + (
        jnp.zeros((NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM), jnp.bfloat16),) * 2 + (
        jnp.zeros((3,), jnp.int32),)
    for platform in ("cuda", "tpu"):
        text = jax.jit(_xla.write_kv).trace(*args).lower(
            lowering_platforms=(platform,)).as_text()
        assert "prefixkv_cpu_" not in text and "stablehlo.scatter" in text
        text = jax.jit(_xla.gather_blocks).trace([args[2], args[3]], args[4]).lower(
            lowering_platforms=(platform,)).as_text()
        assert "prefixkv_cpu_" not in text and "stablehlo.gather" in text


@on_cpu
def test_fallback_when_disabled(monkeypatch):
    """PREFIXKV_DISABLE_CPU_FFI=1: the XLA scatter path runs, with the same results, bit for
    bit: 16-bit and 8-bit floats move as their bits (XLA:CPU scatters bfloat16 through
    float32, which had quieted NaN payloads in blocks the op never named)."""
    monkeypatch.setenv(xla_ffi.DISABLE_ENV, "1")
    xla_ffi._reset_for_tests()
    try:
        assert xla_ffi.cpu_cache_ops_path() == f"xla (disabled by {xla_ffi.DISABLE_ENV})"
        slots = np.array([1, -1, 44, 8], np.int32)
        src, dst = np.array([2, 5], np.int32), np.array([3, 2], np.int32)
        ids = np.array([7, 0], np.int32)
        for dtype in DTYPES:
            k, v = _cache(dtype, 11), _cache(dtype, 12)
            key, value = (_bits((4, HEADS, HEAD_DIM), dtype, s) for s in (13, 14))
            if dtype in FLOAT_DTYPES:  # write_kv takes float keys (fp8: quantized, elsewhere)
                args = [jnp.asarray(a) for a in (key, value, k, v, slots)]
                assert not _uses_ffi(_xla.write_kv, *args)
                for got, want in zip(_fresh_jit(_xla.write_kv)(*args),
                                     ref.write_kv_reference(key, value, k, v, slots),
                                     strict=True):
                    _same_bits(got, want)
            cargs = ([jnp.asarray(k), jnp.asarray(v)], jnp.asarray(src), jnp.asarray(dst))
            assert not _uses_ffi(_xla.copy_blocks, *cargs)
            for got, want in zip(_fresh_jit(_xla.copy_blocks)(*cargs),
                                 ref.copy_blocks_reference([k, v], src, dst), strict=True):
                _same_bits(got, want)
            buf = _bits((2, 2, BLOCK_SIZE, HEADS, HEAD_DIM), dtype, 15)
            sargs = ([jnp.asarray(k), jnp.asarray(v)], jnp.asarray(buf), jnp.asarray(ids))
            assert not _uses_ffi(_xla.scatter_blocks, *sargs)
            for got, want in zip(_fresh_jit(_xla.scatter_blocks)(*sargs),
                                 ref.scatter_blocks_reference([k, v], buf, ids), strict=True):
                _same_bits(got, want)
        # gather_blocks: the XLA take + stack on uint16 bits, bit-exact (NaN payloads kept),
        # repeats and empty
        # (the raw _xla function: jf.gather_blocks's jit may hold a trace of the FFI path)
        for dtype in DTYPES:
            caches = [_cache(dtype, 46), _cache(dtype, 47)]
            for ids in (np.array([5, 0, 5, NUM_BLOCKS - 1], np.int32), np.zeros((0,), np.int32)):
                gargs = ([jnp.asarray(c) for c in caches], jnp.asarray(ids))
                assert not _uses_ffi(_xla.gather_blocks, *gargs)
                _same_bits(_fresh_jit(_xla.gather_blocks)(*gargs),
                           ref.gather_blocks_reference(caches, ids))
    finally:
        monkeypatch.delenv(xla_ffi.DISABLE_ENV)
        xla_ffi._reset_for_tests()
    assert xla_ffi.cpu_cache_ops_path() == "ffi"


@pytest.mark.slow(seconds=30)
def test_build_from_scratch_and_failure(tmp_path, monkeypatch):
    monkeypatch.setenv(xla_ffi.CACHE_ENV, str(tmp_path))
    lib = xla_ffi.build()
    assert lib.parent == tmp_path / "xla_ffi" and lib.exists()
    assert xla_ffi.build() == lib  # cached: same source, jaxlib and command
    monkeypatch.setenv("CXX", "false")
    monkeypatch.setenv(xla_ffi.CACHE_ENV, str(tmp_path / "other"))
    with pytest.raises(RuntimeError, match="building xla_cache_ops.cc failed"):
        xla_ffi.build()
    assert not list((tmp_path / "other" / "xla_ffi").glob("*.so"))
