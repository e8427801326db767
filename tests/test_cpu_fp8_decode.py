"""The compiled CPU decode kernel (kernels/cpu/xla_attention.cc) over float8_e4m3fn caches:
through its ctypes entry (kernels/cpu/decode.py, the PyTorch CPU path's) and its XLA FFI
handler (kernels/cpu/xla_ffi.py), against the numpy reference.

Every one of the 256 byte values is decoded exactly (both inner-loop implementations); the
ragged decode grids run with NaN in every slot no query may read, so a key read past kv_len,
outside the window or outside the table fails the comparison.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from prefixkv.kernels.cpu import decode
from prefixkv.paged import testing
from prefixkv.paged.reference import paged_attention_reference
from prefixkv.paged.reference.cache import quantize_fp8_reference
from prefixkv.paged.spec import ATTENTION_TOLERANCE, numpy_dtype

pytestmark = pytest.mark.skipif(not decode.available(),
                                reason=f"CPU decode kernel: {decode.status()}")

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
Q_DTYPES = ["float32", "bfloat16", "float16"]


def _run(q, k_cache, v_cache, tables, kv_lens, *, scale, k_scale=1.0, v_scale=1.0,
         window=None, cap=None, portable=False, threads=1):
    """decode.decode_attention on numpy arrays; (out, lse)."""
    q, k_cache, v_cache = (np.ascontiguousarray(a) for a in (q, k_cache, v_cache))
    tables = np.ascontiguousarray(tables, np.int32)
    kv_lens = np.ascontiguousarray(kv_lens, np.int32)
    out = np.full_like(q, np.nan)
    lse = np.full(q.shape[:2], np.nan, np.float32)
    dims = (q.shape[0], q.shape[1], q.shape[2], k_cache.shape[0], k_cache.shape[1],
            k_cache.shape[2], tables.shape[1])
    decode.decode_attention(
        q.dtype.name, dims, q.ctypes.data, k_cache.ctypes.data, v_cache.ctypes.data,
        tables.ctypes.data, kv_lens.ctypes.data, out.ctypes.data, lse.ctypes.data,
        scale=scale, sliding_window=window, logits_soft_cap=cap, portable=portable,
        threads=threads, kv_dtype=k_cache.dtype.name, k_scale=k_scale, v_scale=v_scale)
    return out, lse


def _exact_f32(byte_values: np.ndarray) -> np.ndarray:
    return byte_values.view(FP8).astype(np.float32)


@pytest.mark.parametrize("portable", [False, True], ids=["avx2", "portable"])
def test_every_byte_decodes_exactly(portable):
    """Sequence s reads one key, block s, whose row holds byte s in all 8 columns (every lane
    of a vector load). K: q = 1/8 in each column and scale 1 give lse = k(s) * k_scale exactly
    (the V cache zero). V: with a zero K cache, out = v(s) * v_scale exactly. The NaN bytes
    (0x7f, 0xff) give NaN."""
    d, n = 8, 256
    byte_rows = np.repeat(np.arange(n, dtype=np.uint8)[:, None], d, axis=1)
    cache = byte_rows.view(FP8).reshape(n, 1, 1, d)
    zero = np.zeros_like(cache)
    q = np.full((n, 1, d), 0.125, np.float32)
    tables = np.arange(n, dtype=np.int32)[:, None]
    kv_lens = np.ones(n, np.int32)
    exact = _exact_f32(np.arange(n, dtype=np.uint8))
    assert np.isnan(exact).sum() == 2
    _, lse = _run(q, cache, zero, tables, kv_lens, scale=1.0, k_scale=2.0, portable=portable)
    np.testing.assert_array_equal(lse[:, 0], exact * np.float32(2.0))  # NaN where NaN
    out, lse = _run(q, zero, cache, tables, kv_lens, scale=1.0, v_scale=0.5, portable=portable)
    np.testing.assert_array_equal(out[:, 0], np.repeat((exact * np.float32(0.5))[:, None], d, 1))
    np.testing.assert_array_equal(lse, np.zeros_like(lse))


@pytest.mark.parametrize("d", [16, 32])
def test_every_byte_decodes_exactly_in_every_lane(d):
    """The 16-wide loads (4 q heads per kv head, head_dim a multiple of 16): sequence s reads
    one key whose row holds byte (s + lane) % 256 in lane ``lane``, so every byte passes every
    lane of a load. V (zero K): out = v * v_scale exactly. K (zero V): q one-hot at lane j
    gives lse = k(lane j) * k_scale exactly, for every j (the NaN bytes of the other lanes
    made 0: 0 * NaN is NaN). NaN bytes give NaN."""
    n, group = 256, 4
    lanes = (np.arange(n)[:, None] + np.arange(d)[None, :]) % n
    byte_rows = lanes.astype(np.uint8)
    cache = byte_rows.view(FP8).reshape(n, 1, 1, d)
    zero = np.zeros_like(cache)
    tables = np.arange(n, dtype=np.int32)[:, None]
    kv_lens = np.ones(n, np.int32)
    exact = _exact_f32(byte_rows)                                   # [n, d]
    q = np.ones((n, group, d), np.float32)
    out, _ = _run(q, zero, cache, tables, kv_lens, scale=1.0, v_scale=0.5)
    for g in range(group):
        np.testing.assert_array_equal(out[:, g], exact * np.float32(0.5))
    nan_byte = (byte_rows & 0x7F) == 0x7F
    for j in range(d):
        rows = np.where(nan_byte & (np.arange(d) != j), 0, byte_rows).astype(np.uint8)
        q = np.zeros((n, group, d), np.float32)
        q[:, :, j] = 1.0
        _, lse = _run(q, rows.view(FP8).reshape(cache.shape), zero, tables, kv_lens,
                      scale=1.0, k_scale=2.0)
        np.testing.assert_array_equal(lse, np.repeat(exact[:, j:j + 1] * np.float32(2.0),
                                                     group, axis=1))


def _fp8_batch(seed, q_dtype, *, grid="decode", block_size=16, num_q_heads=8,
               num_kv_heads=2, head_dim=64, window=None, extra=()):
    rng = np.random.default_rng(seed)
    seqs = testing.seq_grid(grid, block_size) + list(extra)
    b = testing.make_ragged_batch(rng, seqs, block_size=block_size, decode=True,
                                  num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                                  head_dim=head_dim, sliding_window=window)
    k_scale, v_scale = np.float32(0.01), np.float32(0.02)
    # values spread over the fp8 range (subnormals to saturation); NaN slots stay NaN
    k8 = quantize_fp8_reference(b.k_cache * 3.0, k_scale)
    v8 = quantize_fp8_reference(b.v_cache * 3.0, v_scale)
    q = b.q.astype(numpy_dtype(q_dtype))
    return q, k8, v8, b.block_tables, b.kv_lens, k_scale, v_scale


@pytest.mark.parametrize("portable", [False, True], ids=["avx2", "portable"])
@pytest.mark.parametrize("q_dtype", Q_DTYPES)
@pytest.mark.parametrize("case", ["plain", "window", "cap", "gqa4_d128_bs7", "mha_d80",
                                  "gqa4_d24", "gqa8_d48"])
def test_decode_matches_reference(q_dtype, portable, case):
    kw = {"gqa4_d128_bs7": dict(num_q_heads=8, num_kv_heads=2, head_dim=128, block_size=7),
          "mha_d80": dict(num_q_heads=4, num_kv_heads=4, head_dim=80),
          "gqa4_d24": dict(num_q_heads=8, num_kv_heads=2, head_dim=24),
          "gqa8_d48": dict(num_q_heads=16, num_kv_heads=2, head_dim=48)}.get(case, {})
    window = 5 if case == "window" else None
    cap = 7.5 if case == "cap" else None
    q, k8, v8, tables, kv_lens, ks, vs = _fp8_batch(
        hash(case) % 1000, q_dtype, window=window, extra=[(1, 300)], **kw)
    scale = q.shape[-1] ** -0.5
    out, lse = _run(q, k8, v8, tables, kv_lens, scale=scale, k_scale=ks, v_scale=vs,
                    window=window, cap=cap, portable=portable)
    want, want_lse = paged_attention_reference(
        q, k8, v8, tables, kv_lens, scale=scale, sliding_window=window, logits_soft_cap=cap,
        return_lse=True, k_scale=ks, v_scale=vs)
    atol, rtol = ATTENTION_TOLERANCE[q_dtype]
    assert out.dtype == q.dtype
    np.testing.assert_allclose(out.astype(np.float32), want.astype(np.float32), atol=atol,
                               rtol=rtol)
    np.testing.assert_allclose(lse, want_lse, atol=1e-4, rtol=1e-5)


def test_threads_give_the_same_bits():
    q, k8, v8, tables, kv_lens, ks, vs = _fp8_batch(3, "bfloat16", extra=[(1, 200), (1, 90)])
    one = _run(q, k8, v8, tables, kv_lens, scale=0.125, k_scale=ks, v_scale=vs, threads=1)
    three = _run(q, k8, v8, tables, kv_lens, scale=0.125, k_scale=ks, v_scale=vs, threads=3)
    assert one[0].tobytes() == three[0].tobytes() and one[1].tobytes() == three[1].tobytes()


def test_bad_dtypes_are_refused():
    q, k8, v8, tables, kv_lens, _, _ = _fp8_batch(4, "float32")
    dims = (q.shape[0], q.shape[1], q.shape[2], k8.shape[0], k8.shape[1], k8.shape[2],
            tables.shape[1])
    args = (dims, 0, 0, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="float8_e4m3fn"):  # q can not be fp8
        decode.decode_attention("float8_e4m3fn", *args, scale=1.0)
    with pytest.raises(ValueError, match="bfloat16"):  # caches: q's dtype or fp8
        decode.decode_attention("float32", *args, scale=1.0, kv_dtype="bfloat16")
    with pytest.raises(ValueError, match="int8"):
        decode.decode_attention("float32", *args, scale=1.0, kv_dtype="int8")
    with pytest.raises(ValueError, match="k_scale"):  # scales of float caches: refused
        decode.decode_attention("float32", *args, scale=1.0, k_scale=0.5)


# ------------------------------------------------------------------ the XLA FFI handler

def _jax_ffi():
    jax = pytest.importorskip("jax")
    from prefixkv.kernels.cpu import xla_ffi
    if not xla_ffi.available():
        pytest.skip(f"CPU FFI not built: {xla_ffi.cpu_cache_ops_path()}")
    if jax.default_backend() != "cpu":
        pytest.skip("default backend is not the CPU")
    return jax, xla_ffi


@pytest.mark.parametrize("q_dtype", Q_DTYPES)
def test_ffi_handler_matches_reference_with_traced_scales(q_dtype):
    jax, xla_ffi = _jax_ffi()
    import jax.numpy as jnp

    q, k8, v8, tables, kv_lens, ks, vs = _fp8_batch(5, q_dtype, window=None,
                                                    extra=[(1, 250)])
    assert xla_ffi.use_for_attention_fp8(q, k8, v8)
    assert not xla_ffi.use_for_attention(q, k8, v8)
    scale = q.shape[-1] ** -0.5

    @jax.jit
    def f(q, k, v, t, kv, k_scale, v_scale):
        return xla_ffi.paged_attention_decode(q, k, v, t, kv, scale=scale, k_scale=k_scale,
                                              v_scale=v_scale)

    out, lse = f(*(jnp.asarray(a) for a in (q, k8, v8, tables, kv_lens)), jnp.float32(ks),
                 jnp.float32(vs))
    want, want_lse = paged_attention_reference(q, k8, v8, tables, kv_lens, scale=scale,
                                               return_lse=True, k_scale=ks, v_scale=vs)
    atol, rtol = ATTENTION_TOLERANCE[q_dtype]
    assert out.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(out).astype(np.float32), want.astype(np.float32),
                               atol=atol, rtol=rtol)
    np.testing.assert_allclose(np.asarray(lse), want_lse, atol=1e-4, rtol=1e-5)
    # the same bits as the ctypes entry (one kernel)
    raw, raw_lse = _run(q, k8, v8, tables, kv_lens, scale=scale, k_scale=ks, v_scale=vs)
    assert np.asarray(out).tobytes() == raw.tobytes()
    assert np.asarray(lse).tobytes() == raw_lse.tobytes()


def test_ffi_handler_refuses_float_caches_on_the_fp8_target():
    jax, xla_ffi = _jax_ffi()
    import jax.numpy as jnp

    q, k8, v8, tables, kv_lens, _, _ = _fp8_batch(6, "float32")
    with pytest.raises(ValueError, match="k_scale"):  # scales of float caches: refused
        xla_ffi.paged_attention_decode(q, q[:1, None], q[:1, None], tables, kv_lens, scale=1.0,
                                       v_scale=0.5)
    call = jax.ffi.ffi_call(
        "prefixkv_cpu_paged_attention_decode_fp8",
        (jax.ShapeDtypeStruct(q.shape, q.dtype),
         jax.ShapeDtypeStruct(q.shape[:2], jnp.float32)))
    kf = jnp.asarray(k8.astype(np.float32))
    with pytest.raises(Exception, match="float8_e4m3fn"):
        jax.block_until_ready(call(
            jnp.asarray(q), kf, kf, jnp.asarray(tables), jnp.asarray(kv_lens),
            jnp.ones(2, jnp.float32), scale=np.float32(1), sliding_window=np.int64(0),
            logits_soft_cap=np.float32(0), portable=np.int64(0), hnd=np.int64(0)))


@pytest.mark.parametrize("portable", [False, True], ids=["avx2", "portable"])
@pytest.mark.parametrize("cache", ["float8_e4m3fn", "float32"])
@pytest.mark.parametrize("where", ["k_first", "k_middle", "v_middle"])
def test_nan_in_a_read_slot_gives_nan(portable, cache, where):
    """A NaN in the KV a query reads (an fp8 NaN byte, a float32 NaN) makes that query's out
    and lse NaN, as in the reference: never a finite answer that skips the key (the vector
    exp once clamped NaN logits to exp(-87)), nor out NaN with lse -inf."""
    rng = np.random.default_rng(7)
    d, kv_len = 16, 20
    k = rng.standard_normal((2, 16, 1, d)).astype(np.float32)
    v = rng.standard_normal((2, 16, 1, d)).astype(np.float32)
    key = {"k_first": 0, "k_middle": 3, "v_middle": 17}[where]
    (k if where.startswith("k") else v)[key // 16, key % 16, 0, 5] = np.nan
    scales = {}
    if cache == "float8_e4m3fn":
        k, v = quantize_fp8_reference(k, 0.5), quantize_fp8_reference(v, 0.5)
        scales = dict(k_scale=0.5, v_scale=0.5)
    q = rng.standard_normal((2, 2, d)).astype(np.float32)
    tables = np.array([[0, 1], [0, 1]], np.int32)
    kv_lens = np.array([kv_len, 2], np.int32)  # the second sequence never reads the NaN
    out, lse = _run(q, k, v, tables, kv_lens, scale=0.25, portable=portable, **scales)
    want, want_lse = paged_attention_reference(q, k, v, tables, kv_lens, scale=0.25,
                                               return_lse=True, **scales)
    if where.startswith("k"):
        assert np.isnan(want[0]).all() and np.isnan(out[0]).all()
        assert np.isnan(want_lse[0]).all() and np.isnan(lse[0]).all()
    else:  # a NaN value poisons its column of out only
        np.testing.assert_array_equal(np.isnan(out[0]), np.isnan(want[0]))
        assert np.isnan(out[0]).any() and not np.isnan(lse[0]).any()
        np.testing.assert_allclose(lse[0], want_lse[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out[1], want[1], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(lse[1], want_lse[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("portable", [False, True], ids=["avx2", "portable"])
def test_large_v_scale_does_not_overflow(portable):
    """v_scale near float32's top: the 2^8 read unit of the AVX2 loop goes on the accumulator,
    not on v_scale (2e36 * 256 is inf)."""
    q, k8, _, tables, kv_lens, _, _ = _fp8_batch(8, "float32")
    rng = np.random.default_rng(8)  # values within +-8: outputs stay below 1.6e37
    v8 = np.clip(rng.standard_normal(k8.shape), -8, 8).astype(np.float32).astype(FP8)
    out, _ = _run(q, k8, v8, tables, kv_lens, scale=0.125, k_scale=0.01, v_scale=2e36,
                  portable=portable)
    want = paged_attention_reference(q, k8, v8, tables, kv_lens, scale=0.125, k_scale=0.01,
                                     v_scale=2e36)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out / 2e36, want / 2e36, rtol=1e-3, atol=1e-3)
