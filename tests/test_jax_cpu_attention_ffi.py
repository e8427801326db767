"""The XLA:CPU FFI decode attention kernel (kernels/cpu/xla_attention.cc) behind the JAX
frontend's paged_attention on CPU, against the numpy reference.

Batches come from the shared ragged builders with NaN in every slot that holds no token and
NaN blocks as table padding, so a key read past kv_len, outside the window or outside the
table fails the comparison. Both inner-loop implementations run: the AVX2 one (chosen on this
machine when head_dim % 8 == 0) and the portable one (``portable=True``).
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from prefixkv.jax_frontend import _backends, _xla  # noqa: E402
from prefixkv.kernels.cpu import xla_ffi  # noqa: E402
from prefixkv.paged import testing  # noqa: E402
from prefixkv.paged.reference import paged_attention_reference  # noqa: E402
from prefixkv.paged.spec import ATTENTION_TOLERANCE  # noqa: E402

from prefixkv import jax_frontend as jf  # noqa: E402

TARGET = "prefixkv_cpu_paged_attention_decode"

pytestmark = [
    pytest.mark.skipif(not xla_ffi.available(),
                       reason=f"CPU FFI not built: {xla_ffi.cpu_cache_ops_path()}"),
    pytest.mark.skipif(jax.default_backend() != "cpu", reason="default backend is not the CPU"),
]

DTYPES = ["float32", "bfloat16", "float16"]
HEAD_DIMS = [64, 80, 96, 128, 256]
BLOCK_SIZES = [8, 16, 32, 64, 7, 1]
#: (num_q_heads, num_kv_heads): MHA, GQA 4, GQA 3 (odd group), GQA 8, MQA, Llama-3-8B.
HEADS = {"mha": (4, 4), "gqa4": (8, 2), "gqa3": (6, 2), "gqa8": (16, 2), "mqa": (8, 1),
         "llama3": (32, 8)}


def _decode_batch(seed, *, block_size=16, grid="decode", extra=(), **kw):
    rng = np.random.default_rng(seed)
    seqs = testing.seq_grid(grid, block_size) + list(extra)
    return testing.make_ragged_batch(rng, seqs, block_size=block_size, decode=True, **kw)


def _jnp(batch):
    return [jnp.asarray(a) for a in batch.args()[:5]]


def _close(got, want, dtype):
    atol, rtol = ATTENTION_TOLERANCE[dtype]
    got = np.asarray(got)
    assert got.dtype == np.asarray(want).dtype
    np.testing.assert_allclose(got.astype(np.float32), np.asarray(want).astype(np.float32),
                               atol=atol, rtol=rtol)


def _close_lse(got, want, dtype):
    atol, rtol = ATTENTION_TOLERANCE[dtype]
    got = np.asarray(got)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    np.testing.assert_allclose(got, want, atol=atol, rtol=rtol)


def _check_kernel(batch, dtype, portable=False, **kw):
    """The kernel called directly against the reference (out and lse)."""
    scale = kw.pop("scale", batch.q.shape[-1] ** -0.5)
    want, want_lse = paged_attention_reference(*batch.args(), scale=scale, return_lse=True, **kw)
    out, lse = jax.jit(lambda *a: xla_ffi.paged_attention_decode(
        *a, scale=scale, portable=portable, **kw))(*_jnp(batch))
    _close(out, want, dtype)
    _close_lse(lse, want_lse, dtype)


def _check_frontend(batch, dtype, **kw):
    """jf.paged_attention (eager: the registry's xla backend, FFI inside) vs the reference."""
    want, want_lse = paged_attention_reference(*batch.args(), return_lse=True, **kw)
    out, lse = jf.paged_attention(*_jnp(batch), return_lse=True, **kw)
    _close(out, want, dtype)
    _close_lse(lse, want_lse, dtype)


def _hlo(fn, *args) -> str:
    return jax.jit(lambda *a: fn(*a)).lower(*args).as_text()


# ------------------------------------------------------------------------------ grids


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_and_head_dims(dtype, head_dim):
    batch = _decode_batch(1, num_q_heads=8, num_kv_heads=2, head_dim=head_dim, dtype=dtype)
    _check_frontend(batch, dtype)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_block_sizes(dtype, block_size):
    # 3 * 64 + 5 keys cross the 64-key softmax chunk inside one block
    batch = _decode_batch(2, block_size=block_size, num_q_heads=8, num_kv_heads=2,
                          head_dim=64, dtype=dtype, extra=[(1, 3 * 64 + 5)])
    _check_frontend(batch, dtype)


@pytest.mark.parametrize("heads", list(HEADS.values()), ids=list(HEADS))
def test_head_ratios(heads):
    batch = _decode_batch(3, num_q_heads=heads[0], num_kv_heads=heads[1], head_dim=64)
    _check_frontend(batch, "float32")


@pytest.mark.parametrize("kw", [
    dict(logits_soft_cap=2.5), dict(sliding_window=1), dict(sliding_window=7),
    dict(sliding_window=40), dict(sliding_window=9, logits_soft_cap=1.5),
    dict(scale=0.3), dict(causal=False)],
    ids=["softcap", "window1", "window7", "window40", "window_softcap", "scale", "noncausal"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_options(dtype, kw):
    # q_scale 3: logits large enough for the soft cap to matter
    batch = _decode_batch(4, num_q_heads=8, num_kv_heads=2, head_dim=64, dtype=dtype,
                          q_scale=3.0, extra=[(1, 70), (1, 2)],
                          sliding_window=kw.get("sliding_window"))
    _check_frontend(batch, dtype, **kw)


@pytest.mark.parametrize("dtype,block_size", [("float32", 64), ("bfloat16", 16),
                                              ("float16", 5)])
def test_llama_shapes_chunks_inside_and_across_blocks(dtype, block_size):
    """32 q heads, 8 kv heads, head_dim 128: float32 chunks of 8 keys inside 64-key blocks,
    16-bit chunks of 64 keys across blocks of 16 or 5; windows start mid-chunk."""
    batch = _decode_batch(13, block_size=block_size, num_q_heads=32, num_kv_heads=8,
                          head_dim=128, dtype=dtype, extra=[(1, 203), (1, 64)])
    _check_frontend(batch, dtype)
    batch = _decode_batch(13, block_size=block_size, num_q_heads=32, num_kv_heads=8,
                          head_dim=128, dtype=dtype, extra=[(1, 203), (1, 64)],
                          sliding_window=37)
    _check_frontend(batch, dtype, sliding_window=37)


def test_softmax_chunks_and_large_logits():
    """Logits growing along the sequence (the running max rises in every chunk, rescaling the
    accumulator) and large enough that exp without the max shift would overflow."""
    rng = np.random.default_rng(5)
    batch = _decode_batch(5, block_size=16, num_q_heads=4, num_kv_heads=1, head_dim=64,
                          extra=[(1, 300)])
    kc = batch.k_cache
    ramp = np.linspace(0.0, 40.0, kc.shape[0] * kc.shape[1]).reshape(kc.shape[:2])
    batch.k_cache = (kc + ramp[:, :, None, None]).astype(np.float32)
    batch.q = np.abs(batch.q) + rng.uniform(0, 1, batch.q.shape).astype(np.float32)
    _check_frontend(batch, "float32")


# ------------------------------------------------------------ the kernel's two inner loops


@pytest.mark.parametrize("head_dim", [64, 80, 12, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("portable", [False, True], ids=["avx2_or_auto", "portable"])
def test_kernel_paths(dtype, head_dim, portable):
    """head_dim 12 and 3 (not multiples of 8) take the portable loops either way."""
    batch = _decode_batch(6, block_size=7, num_q_heads=6, num_kv_heads=2, head_dim=head_dim,
                          dtype=dtype, extra=[(1, 40)], sliding_window=30)
    _check_kernel(batch, dtype, portable=portable, sliding_window=30, logits_soft_cap=4.0)


@pytest.mark.parametrize("head_dim", [16, 24, 40])
@pytest.mark.parametrize("heads", [(8, 2), (16, 2), (4, 2)], ids=["gqa4", "gqa8", "gqa2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_tiles(dtype, heads, head_dim):
    """The AVX2 loops' tilings: groups of a multiple of 4 heads walk head_dim 16 at a time
    when it is a multiple of 16 (bfloat16 with q and the accumulators in even/odd order), 8 at
    a time otherwise; groups of 2 use 2 x 4 tiles."""
    batch = _decode_batch(13, block_size=5, num_q_heads=heads[0], num_kv_heads=heads[1],
                          head_dim=head_dim, dtype=dtype, extra=[(1, 37)])
    _check_kernel(batch, dtype)


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return set()


@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 256, 80])
@pytest.mark.parametrize("heads", [(8, 2), (6, 2), (4, 4), (8, 1)],
                         ids=["gqa4", "gqa3", "mha", "mqa8"])
def test_kernel_avx512_bf16_dot_products(monkeypatch, heads, head_dim):
    """bfloat16 q and caches with head_dim % 32 == 0 on a CPU with AVX512-BF16: q.k by
    vdpbf16ps (2 x 4 tiles for even groups, 1 x 8 for odd ones), sliding window and soft cap
    included; PREFIXKV_CPU_AVX512=0 runs the AVX2 loops. Both match the reference, and where
    the CPU has the instructions (this one: Zen 4) and head_dim allows them the two lse differ
    (another summation order), which shows the dot products ran."""
    batch = _decode_batch(21, block_size=16, num_q_heads=heads[0], num_kv_heads=heads[1],
                          head_dim=head_dim, dtype="bfloat16", extra=[(1, 70)],
                          sliding_window=50)
    # a scale not a power of two: the AVX2 loops scale q, the dot products the sums
    kw = dict(sliding_window=50, logits_soft_cap=6.0, scale=0.1)
    outs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("PREFIXKV_CPU_AVX512", flag)
        _check_kernel(batch, "bfloat16", **dict(kw))
        outs.append(np.asarray(jax.jit(lambda *a: xla_ffi.paged_attention_decode(
            *a, **kw))(*_jnp(batch))[1]))  # lse: float32
    dp = "avx512_bf16" in _cpu_flags() and "avx512bw" in _cpu_flags() and head_dim % 32 == 0
    assert (not np.array_equal(outs[0], outs[1])) == dp


@pytest.mark.parametrize("q_shape, cache_shape", [((1, 8, 0), (2, 16, 2, 0)),
                                                   ((1, 8, 16), (2, 0, 2, 16))],
                         ids=["head_dim-0", "block_size-0"])
def test_kernel_refuses_head_dim_or_block_size_0(q_shape, cache_shape):
    """head_dim 0 or block_size 0 called on the FFI kernel directly (the frontends refuse them
    before): an error, not a division by zero that kills the process (run in a child
    process; block_size 0 had died of SIGFPE)."""
    import subprocess
    import sys

    code = (
        "import jax, jax.numpy as jnp\n"
        "from prefixkv.kernels.cpu import xla_ffi\n"
        f"q = jnp.zeros({q_shape}, jnp.bfloat16); c = jnp.zeros({cache_shape}, jnp.bfloat16)\n"
        "t = jnp.zeros((1, 1), jnp.int32); n = jnp.ones((1,), jnp.int32)\n"
        "try:\n"
        "    jax.block_until_ready(xla_ffi.paged_attention_decode(q, c, c, t, n, scale=1.0))\n"
        "except Exception as e:\n"
        "    print('raised', 'shapes do not match' in str(e))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "raised True" in proc.stdout, (proc.returncode,
                                                                   proc.stderr[-2000:])


@pytest.mark.parametrize("portable", [False, True], ids=["avx2_or_auto", "portable"])
def test_kernel_empty_sequences(portable):
    """kv_len 0 (not a valid decode input of the public op, which needs kv_len >= 1): out 0
    and lse -inf, written over whatever the output buffer held."""
    batch = _decode_batch(7, num_q_heads=8, num_kv_heads=2, head_dim=64)
    kv_lens = batch.kv_lens.copy()
    kv_lens[[0, 3]] = 0
    q, k, v, t, _ = _jnp(batch)
    out, lse = jax.jit(lambda *a: xla_ffi.paged_attention_decode(
        *a, scale=0.125, portable=portable))(q, k, v, t, jnp.asarray(kv_lens))
    out, lse = np.asarray(out), np.asarray(lse)
    assert (out[[0, 3]] == 0).all() and np.isneginf(lse[[0, 3]]).all()
    batch.kv_lens = kv_lens
    keep = [1, 2, 4]
    want, want_lse = paged_attention_reference(
        batch.q[keep], batch.k_cache, batch.v_cache, batch.block_tables[keep], kv_lens[keep],
        scale=0.125, return_lse=True)
    _close(out[keep], want, "float32")
    _close_lse(lse[keep], want_lse, "float32")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kernel_out_of_range_ids_clamped_like_xla(dtype):
    """Invalid tables (negative ids, ids past num_blocks) and kv_lens past the table do not
    crash; the kernel reads what the XLA path reads (table index and ids clamped)."""
    batch = _decode_batch(8, num_q_heads=8, num_kv_heads=2, head_dim=64, dtype=dtype,
                          nan_fill=False)
    tables = batch.block_tables.copy()
    num_blocks = batch.k_cache.shape[0]
    tables[0, 0] = -5
    tables[1, 0] = num_blocks + 100
    tables[4, -1] = 2**31 - 1
    kv_lens = batch.kv_lens.copy()
    kv_lens[2] = tables.shape[1] * batch.block_size + 9   # past the table
    kv_lens[3] = -4                                       # treated as 0
    args = [jnp.asarray(a) for a in (batch.q, batch.k_cache, batch.v_cache, tables, kv_lens)]
    out, lse = xla_ffi.paged_attention_decode(*args, scale=0.125)
    want, want_lse = _xla.ragged_paged_attention(*args, None, scale=0.125)
    _close(out, np.asarray(want), dtype)
    _close_lse(lse, np.asarray(want_lse), dtype)


# ------------------------------------------------------------------- dispatch and jit


def test_jit_runs_the_ffi_kernel():
    batch = _decode_batch(9, num_q_heads=8, num_kv_heads=2, head_dim=128, dtype="bfloat16",
                          sliding_window=5)
    args = _jnp(batch)
    assert TARGET in _hlo(jf.paged_attention, *args)
    assert TARGET in _hlo(lambda *a: _backends.paged_attention_xla(*a, scale=0.1), *args)
    f = jax.jit(lambda *a: jf.paged_attention(*a, sliding_window=5, return_lse=True))
    out, lse = f(*args)
    want, want_lse = paged_attention_reference(*batch.args(), sliding_window=5,
                                               return_lse=True)
    _close(out, want, "bfloat16")
    _close_lse(lse, want_lse, "bfloat16")


#: A mixed batch: decodes (q_len 1) between prefill chunks, a sequence with no query token
#: (padding) and a decode at kv_len 1.
MIXED = [(1, 37), (5, 21), (1, 64), (0, 9), (12, 40), (1, 1), (3, 3), (1, 50)]
#: The prefill rows in _xla.LONG_TILE-token tiles (the other sequences average that many
#: tokens), and a batch of 65 tokens whose short prefills keep the mean-length tiles.
MIXED_GRIDS = {"mixed": MIXED, "long_chunk": [(1, 37)] * 5 + [(70, 90), (0, 4), (66, 66)],
               "short_chunks": [(3, 20)] * 20 + [(1, 30)] * 5}


@pytest.fixture(params=["defaults", "short_4", "loop"])
def cpu_route(request, monkeypatch):
    """The routes of a ragged batch on the CPU (_xla.ragged_on_cpu_kernel): with the dtype's
    CPU_RAGGED_DECODE_*MAX_Q ("defaults": the grids' short batches all in the decode kernel, a
    token a sequence), with both 4 (the sequences of up to 4 tokens in the kernel, the others
    in the XLA loop), or 0 (the whole batch in the loop). The thresholds are read when
    tracing: jit's caches are cleared around the test."""
    limit = {"defaults": None, "short_4": 4, "loop": 0}[request.param]
    if limit is not None:
        monkeypatch.setattr(_xla, "CPU_RAGGED_DECODE_MAX_Q", limit)
        monkeypatch.setattr(_xla, "CPU_RAGGED_DECODE_16BIT_MAX_Q", limit)
    jax.clear_caches()
    yield request.param
    jax.clear_caches()


#: (dtype, options): every option in float32; a 16-bit batch changes the rounding, not the
#: rows or keys each route takes, so bfloat16 runs plain and with window and soft cap together
MIXED_OPTIONS = [
    pytest.param("float32", {}, id="float32-plain"),
    pytest.param("float32", {"sliding_window": 7}, id="float32-window"),
    pytest.param("float32", {"logits_soft_cap": 3.0}, id="float32-cap"),
    pytest.param("float32", {"causal": False}, id="float32-non_causal"),
    pytest.param("bfloat16", {}, id="bfloat16-plain"),
    pytest.param("bfloat16", {"sliding_window": 7, "logits_soft_cap": 3.0},
                 id="bfloat16-window_cap")]


@pytest.mark.parametrize("dtype,opts", MIXED_OPTIONS)
@pytest.mark.parametrize("grid", list(MIXED_GRIDS))
def test_mixed_batch_decodes_run_in_the_kernel(grid, dtype, opts, cpu_route):
    """A ragged batch on the CPU by each route (cpu_route), every row against the reference
    (lse too)."""
    rng = np.random.default_rng(10)
    batch = testing.make_ragged_batch(rng, MIXED_GRIDS[grid], num_q_heads=8, num_kv_heads=2,
                                      head_dim=32, block_size=8, dtype=dtype,
                                      sliding_window=opts.get("sliding_window"))
    args = [jnp.asarray(a) for a in batch.args()]
    lowered = jax.jit(lambda *a: jf.paged_attention(*a, return_lse=True, **opts)).lower(*args)
    if cpu_route != "loop":  # threshold 0: no token for the kernel, its call of 0 rows elided
        assert TARGET in lowered.as_text()
    want, want_lse = paged_attention_reference(*batch.args(), return_lse=True, **opts)
    out, lse = lowered.compile()(*args)
    _close(out, want, dtype)
    _close_lse(lse, want_lse, dtype)


KW = dict(scale=0.25, sliding_window=9, logits_soft_cap=4.0)


def test_ragged_on_cpu_kernel_rows_of_no_sequence(cpu_route):
    """Tokens past cu_q_lens[-1] (the internal loop allows them) get out 0 and lse -inf, and
    a batch with no decode or only decodes gives the XLA loop's answer, by each route."""
    rng = np.random.default_rng(12)
    for seqs in ([(1, 30), (4, 19), (1, 8)], [(3, 12), (6, 20)], [(1, 5), (1, 17)]):
        b = testing.make_ragged_batch(rng, seqs, num_q_heads=4, num_kv_heads=2, head_dim=16,
                                      block_size=4, decode=False)
        q = np.concatenate([b.q, np.full((3, *b.q.shape[1:]), 5.0, b.q.dtype)])
        args = (jnp.asarray(q), *(jnp.asarray(a) for a in b.args()[1:]))
        got = jax.jit(lambda *a: _xla.ragged_on_cpu_kernel(*a, **KW))(*args)
        want = jax.jit(lambda *a: _xla.ragged_paged_attention(*a, **KW))(*args)
        n = b.q.shape[0]
        np.testing.assert_array_equal(np.asarray(got[0])[n:], 0.0)
        assert np.isneginf(np.asarray(got[1])[n:]).all()
        np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), atol=2e-5,
                                   rtol=2e-5)
        np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), atol=2e-5,
                                   rtol=2e-5)


def test_unchecked_kv_lens_near_int32_limits_stay_key_counts(monkeypatch):
    """Unchecked metadata (inside jit nothing is checked): a kv_len of -2**31 minus a token's
    causal offset once wrapped to nearly 2**31 keys for the decode kernel (a call of
    minutes). The kernel is handed counts from kv_len >= 0: none past the batch's largest."""
    rng = np.random.default_rng(13)
    b = testing.make_ragged_batch(rng, [(1, 5), (3, 9), (2, 6)], num_q_heads=4,
                                  num_kv_heads=2, head_dim=16, block_size=4, decode=False)
    kv_lens = b.kv_lens.copy()
    kv_lens[1] = -2**31
    seen = []
    real = xla_ffi.paged_attention_decode

    def spy(q, kc, vc, tables, kv, **kw):
        seen.append(np.asarray(kv))
        return real(q, kc, vc, tables, kv, **kw)

    monkeypatch.setattr(xla_ffi, "paged_attention_decode", spy)
    args = (*(jnp.asarray(a) for a in b.args()[:4]), jnp.asarray(kv_lens),
            jnp.asarray(b.cu_q_lens))
    with jax.disable_jit():  # the traced branches run eagerly: the counts are values here
        out, _ = _xla.ragged_on_cpu_kernel(*args, scale=0.25)
    assert seen and all(int(kv.max()) <= 9 for kv in seen), seen
    want = paged_attention_reference(*b.args())
    np.testing.assert_allclose(np.asarray(out)[[0, 4, 5]], want[[0, 4, 5]], atol=2e-5,
                               rtol=2e-5)  # the valid sequences' tokens


def test_joined_tables_of_unchecked_lengths_stay_key_counts():
    """prefix_then_own_tables (a windowed cascade, small prefix groups): a kv_len of -2**31
    with a negative prefix length once wrapped to ~2**31 keys; lengths start from 0 and a
    prefix counts at most its table's keys."""
    tables, kv = _xla.prefix_then_own_tables(
        jnp.zeros((2, 3), jnp.int32), jnp.asarray([-10**6, 2**31 - 1], jnp.int32),
        jnp.asarray([0, 1, -1], jnp.int32), jnp.zeros((3, 2), jnp.int32),
        jnp.asarray([-2**31, 5, -7], jnp.int32), 4)
    np.testing.assert_array_equal(np.asarray(kv), [0, 5 + 12, 0])
    # a length near int32's limit plus a prefix saturates there, never wraps negative
    _, kv = _xla.prefix_then_own_tables(
        jnp.zeros((1, 3), jnp.int32), jnp.asarray([12], jnp.int32), jnp.asarray([0], jnp.int32),
        jnp.zeros((1, 2), jnp.int32), jnp.asarray([2**31 - 5], jnp.int32), 4)
    np.testing.assert_array_equal(np.asarray(kv), [2**31 - 1])


def test_disabled_ffi_falls_back_to_xla(monkeypatch):
    batch = _decode_batch(11, num_q_heads=8, num_kv_heads=2, head_dim=64, dtype="bfloat16")
    args = _jnp(batch)
    monkeypatch.setenv(xla_ffi.DISABLE_ENV, "1")
    xla_ffi._reset_for_tests()
    try:
        assert not xla_ffi.available()
        # a fresh function: jit caches the trace of paged_attention_xla per argument shapes
        assert TARGET not in _hlo(lambda *a: _backends.paged_attention_xla.__wrapped__(
            *a, scale=0.125), *args)
        out = jax.jit(lambda *a: _backends.paged_attention_xla.__wrapped__(
            *a, scale=0.125))(*args)[0]
        _close(out, paged_attention_reference(*batch.args(), scale=0.125), "bfloat16")
    finally:
        monkeypatch.delenv(xla_ffi.DISABLE_ENV)
        xla_ffi._reset_for_tests()
    assert xla_ffi.available()


def test_vmap_over_layers():
    """vmap of the jitted op (sequential: one kernel call per layer)."""
    batch = _decode_batch(12, num_q_heads=8, num_kv_heads=2, head_dim=64)
    q, k, v, t, n = _jnp(batch)
    layers = 3
    ks = jnp.stack([k * (i + 1) for i in range(layers)])
    vs = jnp.stack([v + i for i in range(layers)])
    out = jax.vmap(lambda kk, vv: jf.paged_attention(q, kk, vv, t, n))(ks, vs)
    for i in range(layers):
        want = paged_attention_reference(batch.q, np.asarray(ks[i]), np.asarray(vs[i]),
                                         batch.block_tables, batch.kv_lens)
        _close(out[i], want, "float32")


_SHARD_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4")
import jax, numpy as np
from jax.sharding import NamedSharding
from prefixkv import jax_frontend as jf
from prefixkv.paged import testing
from prefixkv.paged.reference import paged_attention_reference
assert jax.device_count() == 4
mesh = jax.make_mesh((4,), ("tp",))
spec = jf.kv_head_specs("tp")
rng = np.random.default_rng(0)
b = testing.make_ragged_batch(rng, testing.seq_grid("decode", 8), num_q_heads=16,
                              num_kv_heads=4, head_dim=64, block_size=8, decode=True,
                              sliding_window=11)
put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))
q, kc, vc = put(b.q, spec["q"]), put(b.k_cache, spec["cache"]), put(b.v_cache, spec["cache"])
attn = jax.jit(jf.tensor_parallel_paged_attention(mesh, "tp", sliding_window=11,
                                                  return_lse=True))
assert "prefixkv_cpu_paged_attention_decode" in attn.lower(
    q, kc, vc, b.block_tables, b.kv_lens).as_text()
out, lse = attn(q, kc, vc, b.block_tables, b.kv_lens)
assert out.sharding.spec == spec["q"], out.sharding
want, want_lse = paged_attention_reference(*b.args(), sliding_window=11, return_lse=True)
np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=2e-5)
np.testing.assert_allclose(np.asarray(lse), want_lse, atol=2e-5, rtol=2e-5)
print("OK")
"""


def test_shard_map_kv_heads_per_shard():
    """Decode with the kv heads sharded over 4 host devices: each shard runs the kernel on its
    own heads (a subprocess: the device count is fixed when jax starts)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _SHARD_SCRIPT], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


_POOL_SCRIPT = """
import sys
import numpy as np
import jax.numpy as jnp
from prefixkv import jax_frontend as jf
from prefixkv.paged import testing
rng = np.random.default_rng(3)
b = testing.make_ragged_batch(rng, [(1, n) for n in (1, 300, 7, 64, 129, 2, 500, 33, 16)],
                              num_q_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
                              decode=True)
out, lse = jf.paged_attention(*(jnp.asarray(a) for a in b.args()[:5]), return_lse=True)
np.save(sys.argv[1], np.concatenate([np.asarray(out).ravel(), np.asarray(lse).ravel()]))
"""


def test_kernel_over_the_xla_pool_is_thread_count_independent(tmp_path):
    """The handler splits the sequences over XLA:CPU's intra-op pool (sized by NPROC): one,
    two and three threads give bit-identical results (subprocesses: the pool is sized when
    jax starts)."""
    import os
    import subprocess
    import sys

    got = []
    for nproc in (1, 2, 3):
        path = tmp_path / f"out{nproc}.npy"
        env = dict(os.environ, NPROC=str(nproc))
        proc = subprocess.run([sys.executable, "-c", _POOL_SCRIPT, str(path)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got.append(np.load(path))
    np.testing.assert_array_equal(got[1], got[0])
    np.testing.assert_array_equal(got[2], got[0])


# ---------------------------------------------------- gaps found by mutation testing


@pytest.mark.parametrize("portable", [False, True], ids=["avx2_or_auto", "portable"])
def test_ffi_decode_bf16_output_rounds_half_to_even(portable):
    """Uniform weights over two bfloat16 values 1 + 2^-7 and 1 + 2^-6 give exactly
    1 + 3 * 2^-8, a tie for bfloat16 between an odd and an even mantissa: round-to-nearest-even
    (XLA's convert, ml_dtypes) gives 1 + 2^-6. The grids' tolerance (a bf16 ulp is 2^-7 here)
    cannot see the rounding mode (mutant f_bf16_round: F32ToBf16 rounds ties down)."""
    import ml_dtypes

    bf16 = ml_dtypes.bfloat16
    k = np.zeros((2, 2, 1, 16), bf16)
    v = np.zeros((2, 2, 1, 16), bf16)
    v[0, 0] = 1.0 + 2.0 ** -7
    v[0, 1] = 1.0 + 2.0 ** -6
    q = np.zeros((1, 2, 16), bf16)              # logits 0: both keys weigh 1/2
    tables = np.array([[0, 1]], np.int32)
    kv_lens = np.array([2], np.int32)
    want = (np.asarray(paged_attention_reference(q, k, v, tables, kv_lens, scale=1.0),
                       np.float64)).astype(bf16)
    assert (want.astype(np.float32) == 1.0 + 2.0 ** -6).all()
    out, _ = jax.jit(lambda *a: xla_ffi.paged_attention_decode(*a, scale=1.0,
                                                               portable=portable))(
        *(jnp.asarray(a) for a in (q, k, v, tables, kv_lens)))
    np.testing.assert_array_equal(np.asarray(out).astype(np.float32),
                                  want.astype(np.float32))
    # the public op on CPU (the same kernel) agrees with the XLA path bit for bit here
    xla_out, _ = _xla.ragged_paged_attention(*(jnp.asarray(a) for a in (q, k, v, tables,
                                                                         kv_lens)), None,
                                             scale=1.0)
    np.testing.assert_array_equal(np.asarray(xla_out).astype(np.float32),
                                  want.astype(np.float32))


@pytest.mark.parametrize("portable", [False, True], ids=["avx2_or_auto", "portable"])
def test_ffi_decode_float16_subnormal_values(portable):
    """float16 inputs below 2^-14 (subnormal) are values, not zeros: every V row 2^-20 and
    every key equal gives out exactly 2^-20 (representable in float16). The grids draw
    N(0, 1) values, whose rare subnormals change the output far below the float16 atol
    (mutant f_f16_subnormal: F16ToF32 flushes subnormals to 0; the AVX2 path converts with
    F16C, so only the portable loops, head_dim % 8 != 0 or portable=True, see it)."""
    tiny = np.float16(2.0 ** -20)
    for head_dim in (12, 16):
        k = np.full((3, 4, 2, head_dim), tiny, np.float16)
        v = np.full((3, 4, 2, head_dim), tiny, np.float16)
        q = np.full((2, 4, head_dim), tiny, np.float16)
        tables = np.array([[0, 1], [2, 0]], np.int32)
        kv_lens = np.array([6, 3], np.int32)
        want = paged_attention_reference(q, k, v, tables, kv_lens, scale=1.0)
        assert (np.asarray(want, np.float64) == 2.0 ** -20).all()
        out, _ = jax.jit(lambda *a: xla_ffi.paged_attention_decode(
            *a, scale=1.0, portable=portable))(
            *(jnp.asarray(a) for a in (q, k, v, tables, kv_lens)))
        np.testing.assert_array_equal(np.asarray(out, np.float64), 2.0 ** -20)


_HEAVY_LAST_SCRIPT = """
import sys
import numpy as np
import jax.numpy as jnp
from prefixkv import jax_frontend as jf
from prefixkv.paged import reference as ref, testing
rng = np.random.default_rng(4)
b = testing.make_ragged_batch(rng, [(1, 1), (1, 1), (1, 1000)], num_q_heads=4,
                              num_kv_heads=2, head_dim=64, block_size=16, decode=True)
out, lse = jf.paged_attention(*(jnp.asarray(a) for a in b.args()[:5]), return_lse=True)
want, want_lse = ref.paged_attention_reference(*b.args(), return_lse=True)
testing.assert_attention_close(out, want, "float32")
np.testing.assert_allclose(np.asarray(lse), want_lse, atol=1e-4, rtol=1e-4)
print("OK")
"""


def test_ffi_decode_pool_split_with_one_heavy_last_sequence():
    """Three pool threads over [1, 1, 1000] keys: every range boundary lands at the last
    sequence, so a boundary off by one (mutant f_parallel_bound: bound = i + 1) runs past
    num_seqs (reads q/kv_lens/tables and writes out beyond their ends). The pool test's
    lengths are balanced enough that the boundaries stay inside."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, NPROC="3")
    proc = subprocess.run([sys.executable, "-c", _HEAVY_LAST_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


# ------------------------------------------------------------------------------- HND caches


def _hnd(cache):
    return jnp.asarray(np.ascontiguousarray(np.swapaxes(np.asarray(cache), 1, 2)))


@pytest.mark.parametrize("path", ["avx2", "avx512_or_avx2", "portable"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,head_dim", [((8, 2), 128), ((6, 2), 80), ((8, 1), 64),
                                            ((4, 4), 32)], ids=["gqa4", "gqa3", "mqa", "mha"])
def test_kernel_reads_hnd_caches(monkeypatch, path, dtype, heads, head_dim):
    """kv_layout="HND" ([num_blocks, heads, block_size, head_dim]): the kernel reads each
    head's rows at its head stride (block_size * head_dim), every inner loop (AVX512-BF16 dot
    products where the CPU has them, AVX2, portable), window and soft cap included."""
    monkeypatch.setenv("PREFIXKV_CPU_AVX512", "0" if path == "avx2" else "1")
    batch = _decode_batch(31, block_size=16, num_q_heads=heads[0], num_kv_heads=heads[1],
                          head_dim=head_dim, dtype=dtype, extra=[(1, 70)], sliding_window=50)
    scale = head_dim ** -0.5
    want, want_lse = paged_attention_reference(*batch.args(), scale=scale, return_lse=True,
                                               sliding_window=50, logits_soft_cap=5.0)
    q, k, v, tables, kv_lens = _jnp(batch)
    out, lse = jax.jit(lambda *a: xla_ffi.paged_attention_decode(
        *a, scale=scale, sliding_window=50, logits_soft_cap=5.0, portable=path == "portable",
        kv_layout="HND"))(q, _hnd(k), _hnd(v), tables, kv_lens)
    _close(out, want, dtype)
    _close_lse(lse, want_lse, dtype)


def test_frontend_decodes_hnd_in_place():
    """The xla backend's decode on CPU hands HND caches to the kernel as they are: no
    transpose and no gather of the blocks in the compiled program."""
    batch = _decode_batch(32, block_size=16, num_q_heads=8, num_kv_heads=2, head_dim=64,
                          dtype="bfloat16")
    q, k, v, tables, kv_lens = _jnp(batch)
    fn = jax.jit(lambda *a: jf.paged_attention(*a, kv_layout="HND", backend="xla"))
    args = (q, _hnd(k), _hnd(v), tables, kv_lens)
    text = fn.lower(*args).as_text()
    assert TARGET in text and "transpose" not in text and "gather" not in text
    _close(fn(*args), paged_attention_reference(*batch.args()), "bfloat16")
    nhd = jax.jit(lambda *a: jf.paged_attention(*a, backend="xla")).lower(*_jnp(batch))
    assert TARGET in nhd.as_text()


@pytest.mark.parametrize("decodes", [0, 7])
def test_prefill_temp_memory_does_not_grow_with_the_tables(decodes):
    """The decode kernel's per-token block tables are sized by the tokens it can compute (at
    most num_seqs x the threshold), not by the batch: sized by the batch, a 1024-token chunk
    reserved num_tokens x max_blocks int32 of temp in every prefill and mixed call, 16 MiB
    more per 4096 more table columns (a 32k chunk over 128k keys: 1.29 GB)."""
    def temp(max_blocks):
        n = 1024 + decodes
        q = jax.ShapeDtypeStruct((n, 8, 128), jnp.float32)
        cache = jax.ShapeDtypeStruct((max_blocks + 1, 16, 2, 128), jnp.float32)
        seqs = decodes + 1
        tables = jax.ShapeDtypeStruct((seqs, max_blocks), jnp.int32)
        lens = jax.ShapeDtypeStruct((seqs,), jnp.int32)
        cu = jax.ShapeDtypeStruct((seqs + 1,), jnp.int32)
        fn = jax.jit(lambda *a: jf.paged_attention(*a))
        compiled = fn.lower(q, cache, cache, tables, lens, cu).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    grown = temp(8192) - temp(4096)
    assert grown < 2**20, f"{grown / 2**20:.1f} MiB more temp for 4096 more table columns"
