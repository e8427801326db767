"""fp8 (float8_e4m3fn) KV caches, vLLM's ``kv_cache_dtype="fp8"`` with per-tensor
``k_scale``/``v_scale``: write_kv stores fp8(sat(x / scale)) and attention reads
float32(cache) * scale. The reference's quantization against hand-computed bit patterns
(saturation, NaN, ties to even, subnormals, true division), its attention against float caches
holding the dequantized values, and every frontend and backend that accepts fp8 against the
reference (write_kv bit-exact, attention within ATTENTION_TOLERANCE[q's dtype]); every refusal
and bad scale names the argument."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from prefixkv.paged import reference as ref
from prefixkv.paged import testing, validate
from prefixkv.paged.spec import numpy_dtype

F8 = np.dtype(ml_dtypes.float8_e4m3fn)
#: lse tolerances per q dtype: logits from 16-bit q and K carry their rounding
LSE_TOLERANCE = {"float32": dict(atol=1e-4, rtol=1e-5), "float16": dict(atol=5e-3, rtol=2e-3),
                 "bfloat16": dict(atol=3e-2, rtol=1e-2)}


def _f32(bits: int) -> np.float32:
    return np.array([bits], np.uint32).view(np.float32)[0]


# (x as float32, scale, stored float8_e4m3fn bits, why). e4m3fn: sign | 4 exponent bits (bias
# 7) | 3 mantissa bits; no inf; 0x7f is NaN; normals 2^-6 .. 448 (0x7e = 2^8 * 1.75);
# subnormals m * 2^-9, m = 1..7.
QUANT_CASES = [
    (0.0, None, 0x00, "zero"),
    (-0.0, None, 0x80, "negative zero keeps its sign"),
    (1.0, None, 0x38, "1 = 2^(7-7) * 1.0: exponent 7, mantissa 0"),
    (448.0, None, 0x7E, "the largest finite"),
    (449.0, None, 0x7E, "saturates (RNE would give 448 too)"),
    (464.0, None, 0x7E, "saturates: RNE of 464 (halfway to 480) would overflow to NaN"),
    (1e9, None, 0x7E, "far out of range saturates"),
    (np.inf, None, 0x7E, "+inf saturates to +448 (__NV_SATFINITE)"),
    (-np.inf, None, 0xFE, "-inf saturates to -448"),
    (np.nan, None, 0x7F, "NaN stays NaN"),
    (-np.nan, None, 0xFF, "a negative NaN keeps its sign (torch's CPU float16 -> float32 "
                          "conversion had dropped it)"),
    (1.0625, None, 0x38, "1 + 1/16, halfway between 1 and 1.125: ties to even (mantissa 0)"),
    (1.1875, None, 0x3A, "halfway between 1.125 and 1.25: ties to even (1.25, mantissa 2)"),
    (1.0625 + 2.0**-12, None, 0x39, "just above the tie: 1.125 (a float16 step would round "
                                    "it onto the tie first, then down to 1)"),
    (2.0**-6, None, 0x08, "smallest normal"),
    (1.5 * 2.0**-7, None, 0x06, "subnormal 6 * 2^-9"),
    (2.0**-9, None, 0x01, "smallest subnormal"),
    (2.0**-10, None, 0x00, "halfway between 0 and 2^-9: ties to even (0)"),
    (3 * 2.0**-10, None, 0x02, "halfway between 2^-9 and 2^-8: ties to even (2 * 2^-9)"),
    (-3 * 2.0**-10, None, 0x82, "the same, negative"),
    (2.0**-11, None, 0x00, "below half the smallest subnormal: 0"),
    (3.0, 2.0, 0x3C, "3 / 2 = 1.5: exponent 7, mantissa 4"),
    (100.0, 0.1, 0x7E, "100 / 0.1 = 1000 saturates"),
    # x / scale is IEEE float32 division: x * float32(1 / scale) rounds the other way here
    (_f32(0x3EF00001), 0.3, 0x3C, "0.46875003 / 0.3 = 1.5625 exactly in float32, a tie: 1.5 "
                                  "(times 1 / 0.3: 1.5625001, then 1.625)"),
    (_f32(0x3E466666), 0.1, 0x3F, "0.19375 / 0.1 = 1.9374999 in float32: 1.875 (times 1 / 0.1: "
                                  "1.9375, a tie, then 2)"),
]
QUANT_IDS = [f"{i}-{x!r}-{s}" for i, (x, s, _, _) in enumerate(QUANT_CASES)]


def _bits(x) -> np.ndarray:
    return np.asarray(x).view(np.uint8)


def test_quantization_matches_hand_computed_bits():
    x = np.array([c[0] for c in QUANT_CASES], np.float32)
    for (value, scale, bits, why), got in zip(QUANT_CASES, x, strict=True):
        stored = ref.quantize_fp8_reference(np.array([got]), scale)
        assert stored.dtype == F8
        assert int(_bits(stored)[0]) == bits, (value, scale, why)


def test_quantization_from_bfloat16_and_float16_is_exact_conversion_then_division():
    # 1.0625 + 2^-12 is a float32 value bf16 cannot hold: from bf16 it is 1.0625 (a tie, so 1)
    x32 = np.array([1.0625, 1.1875, 3 * 2.0**-10, 300.0], np.float32)
    for dtype in ("bfloat16", "float16"):
        x = x32.astype(numpy_dtype(dtype))
        np.testing.assert_array_equal(_bits(ref.quantize_fp8_reference(x, 0.5)),
                                      _bits(ref.quantize_fp8_reference(x32, 0.5)))
    # 1.0625 / 0.5 = 2.125, a tie between 2 and 2.25: 2; 1.1875 / 0.5 = 2.375: 2.5 (even);
    # 3 * 2^-10 / 0.5 = 3 * 2^-9, subnormal 3; 300 / 0.5 = 600 saturates
    np.testing.assert_array_equal(_bits(ref.quantize_fp8_reference(x32, 0.5)),
                                  [0x40, 0x42, 0x03, 0x7E])


def _small_batch(rng, *, dtype="float32", grid="mixed", num_q_heads=4, num_kv_heads=2,
                 head_dim=16, block_size=4):
    return testing.make_ragged_batch(rng, testing.seq_grid(grid, block_size),
                                     num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                                     head_dim=head_dim, block_size=block_size, dtype=dtype)


def test_write_kv_reference_quantizes_only_the_written_slots():
    rng = np.random.default_rng(0)
    key = (rng.standard_normal((5, 2, 4)) * 100).astype(np.float32)
    value = rng.standard_normal((5, 2, 4)).astype(np.float32)
    key[0, 0, 0], key[1, 1, 1], value[2, 0, 3] = np.inf, np.nan, -1e6
    k_cache = np.full((3, 2, 2, 4), 7.0, np.float32).astype(F8)
    v_cache = np.full((3, 2, 2, 4), -7.0, np.float32).astype(F8)
    slots = np.array([5, 0, -1, 2], np.int32)  # token 2 skipped, token 4 past the mapping
    k, v = ref.write_kv_reference(key, value, k_cache, v_cache, slots, k_scale=0.25,
                                  v_scale=np.float32(2.0))
    assert k.dtype == v.dtype == F8
    want_k, want_v = k_cache.copy(), v_cache.copy()
    for i, s in enumerate(slots):
        if s >= 0:
            want_k[s // 2, s % 2] = ref.quantize_fp8_reference(key[i], 0.25)
            want_v[s // 2, s % 2] = ref.quantize_fp8_reference(value[i], 2.0)
    np.testing.assert_array_equal(_bits(k), _bits(want_k))
    np.testing.assert_array_equal(_bits(v), _bits(want_v))
    assert _bits(k)[2, 1, 0, 0] == 0x7E and np.isnan(k[0, 0, 1, 1].astype(np.float32))
    # untouched slots (block 1 offset 1, block 0 offset 1): still 7 (0x4e) and -7 (0xce)
    assert (_bits(k)[1, 1] == 0x4E).all() and (_bits(v)[0, 1] == 0xCE).all()


def test_reference_attention_reads_the_dequantized_cache():
    """fp8 caches with scale 2^-3 give exactly the attention over float32 caches holding
    float32(fp8) * 2^-3 (exact); with scale 0.3 what a float64 softmax over float64(fp8) * 0.3
    gives (through a float64 cache: the reference's float64 accumulation)."""
    rng = np.random.default_rng(1)
    b = _small_batch(rng)
    kq = ref.quantize_fp8_reference(b.k_cache, 0.125)
    vq = ref.quantize_fp8_reference(b.v_cache, 0.125)
    deq = testing.RaggedBatch(b.q, kq.astype(np.float32) * np.float32(0.125),
                              vq.astype(np.float32) * np.float32(0.125), b.block_tables,
                              b.kv_lens, b.cu_q_lens, seqs=b.seqs)
    for opts in ({}, {"sliding_window": 3}, {"logits_soft_cap": 2.0}, {"causal": False}):
        out, lse = ref.paged_attention_reference(b.q, kq, vq, *b.args()[3:], k_scale=0.125,
                                                 v_scale=np.float32(0.125), return_lse=True,
                                                 **opts)
        want, want_lse = ref.paged_attention_reference(*deq.args(), return_lse=True, **opts)
        np.testing.assert_array_equal(out, want)
        np.testing.assert_array_equal(lse, want_lse)
    # a scale that is no power of two: compare with the float64 values it means
    kq3, vq3 = (ref.quantize_fp8_reference(c, 0.3) for c in (b.k_cache, b.v_cache))
    out = ref.paged_attention_reference(b.q, kq3, vq3, *b.args()[3:], k_scale=0.3, v_scale=0.3)
    k64 = kq3.astype(np.float64) * np.float64(np.float32(0.3))
    v64 = vq3.astype(np.float64) * np.float64(np.float32(0.3))
    want = ref.paged_attention_reference(b.q.astype(np.float64).astype(np.float32), *[
        x.astype(np.float32) for x in (k64, v64)], *b.args()[3:])
    np.testing.assert_allclose(out, want, atol=1e-6, rtol=1e-6)  # float32 rounding of k64
    assert np.abs(out - ref.paged_attention_reference(b.q, kq3, vq3, *b.args()[3:])).max() > 1e-2


def test_reference_shared_prefix_attention_reads_the_dequantized_cache():
    rng = np.random.default_rng(2)
    b = testing.make_shared_prefix_batch(rng, [2, 1], [(0, 1, 3), (1, 2, 5), (-1, 1, 2)],
                                         num_q_heads=4, num_kv_heads=2, head_dim=8, block_size=4)
    kq, vq = (ref.quantize_fp8_reference(c, 0.5) for c in (b.k_cache, b.v_cache))
    a = b.args()
    got = ref.shared_prefix_attention_reference(a[0], kq, vq, *a[3:], k_scale=0.5, v_scale=0.5)
    want = ref.shared_prefix_attention_reference(a[0], kq.astype(np.float32) * 0.5,
                                                 vq.astype(np.float32) * 0.5, *a[3:])
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------ input checks


def _fp8_args(dtype="float32"):
    b = _small_batch(np.random.default_rng(0), dtype=dtype, grid="decode")
    return b, ref.quantize_fp8_reference(b.k_cache), ref.quantize_fp8_reference(b.v_cache)


BAD_SCALES = [
    (0.0, ValueError, "k_scale: expected a finite value > 0, got 0.0"),
    (-1.0, ValueError, "k_scale: expected a finite value > 0, got -1.0"),
    (float("nan"), ValueError, "k_scale: expected a finite value > 0, got nan"),
    (float("inf"), ValueError, "k_scale: expected a finite value > 0, got inf"),
    (np.array(0.0, np.float32), ValueError, "k_scale: expected a finite value > 0, got 0.0"),
    (np.array([np.inf], np.float32), ValueError, "k_scale: expected a finite value > 0, got inf"),
    (np.array(1.0, np.float64), TypeError, "k_scale: expected float32, got float64"),
    (np.ones(2, np.float32), ValueError, r"k_scale: expected one element \(shape \(\) or "
                                         r"\(1,\)\), got shape \(2,\)"),
    (True, TypeError, "k_scale: expected a float or a float32 array of one element, got bool"),
    ("1.0", TypeError, "k_scale: expected a float or a float32 array of one element, got str"),
]


@pytest.mark.parametrize("scale,exc,match", BAD_SCALES, ids=[m[:40] for *_, m in BAD_SCALES])
def test_reference_bad_scale_names_the_argument(scale, exc, match):
    b, kq, vq = _fp8_args()
    with pytest.raises(exc, match=match):
        ref.paged_attention_reference(b.q, kq, vq, *b.args()[3:], k_scale=scale)
    key = np.ones((1, 2, 16), np.float32)
    with pytest.raises(exc, match=match):
        ref.write_kv_reference(key, key, kq, vq, np.array([0], np.int32), k_scale=scale)
    with pytest.raises(exc, match=match.replace("k_scale", "v_scale")):
        ref.write_kv_reference(key, key, kq, vq, np.array([0], np.int32), v_scale=scale)


def test_validate_fp8_dtype_rules():
    b, kq, vq = _fp8_args("bfloat16")
    # fp8 caches read with any float q; a float cache still needs q's dtype
    validate.check_paged_attention(b.q, kq, vq, *b.args()[3:])
    with pytest.raises(TypeError, match=r"k_cache: expected the dtype of q \(bfloat16\), got "
                                        "float32"):
        validate.check_paged_attention(b.q, b.k_cache.astype(np.float32), b.v_cache.astype(
            np.float32), *b.args()[3:])
    with pytest.raises(TypeError, match="q: expected float32 or float16 or bfloat16, got "
                                        "float8_e4m3fn"):
        validate.check_paged_attention(b.q.astype(F8), kq, vq, *b.args()[3:])
    with pytest.raises(TypeError, match=r"v_cache: expected the dtype of k_cache "
                                        r"\(float8_e4m3fn\), got bfloat16"):
        validate.check_paged_attention(b.q, kq, b.v_cache, *b.args()[3:])
    with pytest.raises(ValueError, match="k_scale: only for a float8_e4m3fn cache"):
        validate.check_paged_attention(*b.args(), k_scale=1.0)
    with pytest.raises(ValueError, match="v_scale: only for a float8_e4m3fn cache"):
        validate.check_paged_attention(*b.args(), v_scale=np.float32(1.0))
    key = np.ones((1, 2, 16), np.float32)
    slots = np.array([0], np.int32)
    validate.check_write_kv(key, key, kq, vq, slots, k_scale=2.0)
    validate.check_write_kv(key.astype(np.float16), key.astype(np.float16), kq, vq, slots)
    with pytest.raises(TypeError, match="key: expected float32 or float16 or bfloat16, got "
                                        "float8_e4m3fn"):
        validate.check_write_kv(key.astype(F8), key.astype(F8), kq, vq, slots)
    with pytest.raises(TypeError, match=r"value: expected the dtype of key \(float32\), got "
                                        "float16"):
        validate.check_write_kv(key, key.astype(np.float16), kq, vq, slots)
    with pytest.raises(ValueError, match="k_scale: only for a float8_e4m3fn cache"):
        validate.check_write_kv(key, key, np.zeros((2, 4, 2, 16), np.float32),
                                np.zeros((2, 4, 2, 16), np.float32), slots, k_scale=1.0)
    with pytest.raises(TypeError, match="k_cache: expected float32 or float16 or bfloat16 or "
                                        "float8_e4m3fn, got int8"):
        validate.check_write_kv(key, key, kq.view(np.int8), vq.view(np.int8), slots)


def test_reference_write_then_block_ops_move_fp8_bytes():
    """A step's write into fp8 caches, then the block copy/gather/scatter of offloading: the
    block ops move the quantized bytes (NaN included) untouched."""
    _, kq, vq = _fp8_args()
    key = np.full((2, 2, 16), np.nan, np.float32)
    key[1] = 1000.0
    kq, vq = ref.write_kv_reference(key, key, kq, vq, np.array([0, 9], np.int32), k_scale=2.0)
    assert (_bits(kq)[0, 0] == 0x7F).all() and (_bits(vq)[2, 1] == 0x7E).all()
    src, dst = np.array([0, 2], np.int32), np.array([3, 1], np.int32)
    got = ref.copy_blocks_reference([kq, vq], src, dst)
    want = kq.copy()
    want[dst] = kq[src]
    np.testing.assert_array_equal(_bits(got[0]), _bits(want))
    buf = ref.gather_blocks_reference([kq, vq], src)
    assert buf.dtype == F8
    back = ref.scatter_blocks_reference([kq, vq], buf, dst)
    np.testing.assert_array_equal(_bits(back[1]), _bits(ref.copy_blocks_reference([vq], src,
                                                                                   dst)[0]))


def _fp8_layout(b, k_scale: float, v_scale: float, compact: bool):
    """The fp8 caches of batch ``b`` and its block tables, for the frontends' two dequantizing
    layouts. compact: three times as many blocks, the extra ones NaN (0x7f) and named by no
    table, so the tables name fewer entries than the cache has blocks and the frontends gather
    just those (a NaN read would show); else the cache as it is (dequantized whole). Either
    way the table entries past each sequence's blocks point far outside the cache (never
    read: clamped before the gather)."""
    kq = ref.quantize_fp8_reference(b.k_cache, k_scale)
    vq = ref.quantize_fp8_reference(b.v_cache, v_scale)
    if compact:
        nan = np.full((2 * kq.shape[0], *kq.shape[1:]), 0x7F, np.uint8).view(F8)
        kq, vq = np.concatenate([kq, nan]), np.concatenate([vq, nan])
    tables = b.block_tables.copy()
    used = -(-np.asarray(b.kv_lens) // b.block_size)
    tables[np.arange(tables.shape[1])[None, :] >= used[:, None]] = 1 << 30
    assert (tables.size < kq.shape[0]) == compact
    return kq, vq, tables


# ------------------------------------------------------------------------------------- torch


def _t8(x):
    """numpy float8_e4m3fn -> torch.float8_e4m3fn (through the bytes; a copy)."""
    torch = pytest.importorskip("torch")
    return torch.from_numpy(np.asarray(x).view(np.uint8).copy()).view(torch.float8_e4m3fn)


def _tbits(t) -> np.ndarray:
    import torch

    return t.view(torch.uint8).cpu().numpy()


def _torch_scale(kind: str, value: float):
    import torch

    return {"float": value, "0d": torch.tensor(value), "1elem": torch.tensor([value])}[kind]


def _write_batch(rng, values, dtype: str, *, val_row: int):
    """(key, value, k_cache, v_cache, slot_mapping) of a write of 5 rows (2 heads x 16) into
    fp8 caches of 3 blocks of 4 tokens: ``values`` in key row 1 and at the end of value row
    ``val_row``, the rest random (x30), the caches' old contents random, one slot -1."""
    key = (rng.standard_normal((5, 2, 16)) * 30).astype(np.float32)
    val = (rng.standard_normal((5, 2, 16)) * 30).astype(np.float32)
    key[1].flat[:len(values)] = values
    val[val_row].flat[-len(values):] = values
    with np.errstate(over="ignore"):  # 1e9 is inf in float16: saturates all the same
        key, val = key.astype(numpy_dtype(dtype)), val.astype(numpy_dtype(dtype))
    kc = ref.quantize_fp8_reference(rng.standard_normal((3, 4, 2, 16)))
    vc = ref.quantize_fp8_reference(rng.standard_normal((3, 4, 2, 16)))
    return key, val, kc, vc, np.array([6, 9, -1, 0], np.int32)


def _write_cases(scale_kind: str):
    """(scale, values) groups of QUANT_CASES: one write_kv call each (scale None: the cases
    without one, with kind "none"; else those with one, the others at 1.0)."""
    groups: dict = {}
    for value, scale, _, _ in QUANT_CASES:
        if scale_kind == "none" and scale is not None:
            continue
        groups.setdefault(None if scale_kind == "none" else (scale or 1.0), []).append(value)
    return groups.items()


@pytest.mark.parametrize("scale_kind", ["none", "float", "0d", "1elem"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_torch_write_kv_is_bit_exact_with_the_reference(dtype, scale_kind):
    """The hand-computed cases of QUANT_CASES written as key and value elements (their scale
    as k_scale/v_scale), random values as the rest; negative slots skipped, rows past the
    mapping ignored, slots not named bit-identical."""
    torch = pytest.importorskip("torch")
    from torch_convert import T

    from prefixkv import torch_frontend as tf

    rng = np.random.default_rng(3)
    for scale, values in _write_cases(scale_kind):
        s = None if scale is None else _torch_scale(scale_kind, scale)
        key, val, kc, vc, slots = _write_batch(rng, values, dtype, val_row=0)
        want_k, want_v = ref.write_kv_reference(key, val, kc, vc, slots, k_scale=scale,
                                                v_scale=scale)
        k, v = _t8(kc), _t8(vc)
        tf.write_kv(T(key), T(val), k, v, T(slots), k_scale=s, v_scale=s)
        assert k.dtype == torch.float8_e4m3fn
        np.testing.assert_array_equal(_tbits(k), _bits(want_k), err_msg=f"{dtype} {scale}")
        np.testing.assert_array_equal(_tbits(v), _bits(want_v), err_msg=f"{dtype} {scale}")


def test_torch_write_kv_device_path_moves_quantized_bytes_without_a_sync():
    """The path write_kv takes with the slots on a device (no host sync: negative slots
    redirected, rows filled by torch.where on same-width integers), run on the CPU with the
    fp8 caches and quantized rows as the uint8 views write_kv gives it."""
    torch = pytest.importorskip("torch")
    from prefixkv.torch_frontend import _native

    rng = np.random.default_rng(12)
    kc = ref.quantize_fp8_reference(rng.standard_normal((3, 4, 2, 8)))
    key = (rng.standard_normal((5, 2, 8)) * 100).astype(np.float32)
    key[0, 0, :3] = [np.nan, np.inf, _f32(0x3EF00001)]
    slots = np.array([6, -1, 11, 0], np.int32)
    want, _ = ref.write_kv_reference(key, key, kc, kc, slots, k_scale=0.3, v_scale=0.3)
    k, v = _t8(kc), _t8(kc)
    rows = _native.quantize_fp8(torch.from_numpy(key)[:4], torch.tensor(0.3)).view(torch.uint8)
    _native._write_kv_no_sync(rows, rows, k.view(torch.uint8), v.view(torch.uint8),
                              torch.from_numpy(slots))
    np.testing.assert_array_equal(_tbits(k), _bits(want))
    np.testing.assert_array_equal(_tbits(v), _bits(want))


TORCH_ATTENTION = [("decode", "float32", {}), ("decode", "bfloat16", {"sliding_window": 5}),
                   ("mixed", "float32", {"logits_soft_cap": 3.0}), ("mixed", "float16", {}),
                   ("mixed", "bfloat16", {"causal": False}), ("prefill", "float32", {})]


@pytest.mark.parametrize("grid,dtype,opts", TORCH_ATTENTION,
                         ids=[f"{g}-{d}-{'-'.join(o) or 'plain'}" for g, d, o in TORCH_ATTENTION])
def test_torch_paged_attention_reads_fp8_caches(grid, dtype, opts):
    """Decode batches go through the compiled CPU decode kernel (with the dequantized blocks in
    q's dtype), the others through the torch path; out=/lse= pre-filled with NaN."""
    torch = pytest.importorskip("torch")
    from torch_convert import TORCH_DTYPE, N, T

    from prefixkv import torch_frontend as tf

    rng = np.random.default_rng(4)
    b = testing.make_ragged_batch(rng, testing.seq_grid(grid, 8), num_q_heads=8,
                                  num_kv_heads=2, head_dim=32, block_size=8, dtype=dtype,
                                  sliding_window=opts.get("sliding_window"))
    kq, vq, tables = _fp8_layout(b, 0.02, 0.05, compact=grid != "decode")
    sinks = np.linspace(-2, 3, 8).astype(np.float32)
    want, want_lse = ref.paged_attention_reference(b.q, kq, vq, tables, *b.args()[4:],
                                                   k_scale=0.02, v_scale=0.05, return_lse=True,
                                                   sinks=sinks, **opts)
    args = [None if a is None else T(a) for a in (*b.args()[:3], tables, *b.args()[4:])]
    out, lse = tf.paged_attention(args[0], _t8(kq), _t8(vq), *args[3:], k_scale=0.02,
                                  v_scale=torch.tensor([0.05]), return_lse=True, sinks=T(sinks),
                                  **opts)
    assert out.dtype == TORCH_DTYPE[dtype]
    testing.assert_attention_close(N(out), want, dtype)
    np.testing.assert_allclose(N(lse), want_lse, **LSE_TOLERANCE[dtype])
    o = torch.full(args[0].shape, float("nan"), dtype=TORCH_DTYPE[dtype])
    lbuf = torch.full(args[0].shape[:2], float("nan"))
    tf.paged_attention(args[0], _t8(kq), _t8(vq), *args[3:], k_scale=torch.tensor(0.02),
                       v_scale=0.05, sinks=T(sinks), out=o, lse=lbuf, **opts)
    testing.assert_attention_close(N(o), want, dtype)


def test_torch_cpu_decode_reads_fp8_bytes_in_the_compiled_kernel(monkeypatch):
    """A CPU decode over fp8 caches goes to the compiled decode kernel with the fp8 caches
    themselves and the scales as float32 values (no dequantized copy), out=/lse=/sinks
    included, eagerly and under torch.compile; in a mixed batch the decodes do too, and the
    prefill rows dequantize only the blocks their own sequences name."""
    torch = pytest.importorskip("torch")
    from prefixkv.kernels.cpu import decode
    from prefixkv.torch_frontend import _native
    from torch_convert import N, T

    from prefixkv import torch_frontend as tf

    if not decode.available():
        pytest.skip(f"no CPU decode kernel: {decode.status()}")
    calls, dequantized = [], []
    real, real_deq = _native._c_decode, _native._dequantized_blocks

    def spy(out, lse, q, k, v, block_tables, *args, **kw):
        calls.append((k.dtype, block_tables.shape[0], kw.get("k_scale"), kw.get("v_scale")))
        return real(out, lse, q, k, v, block_tables, *args, **kw)

    def spy_deq(q, k, v, k_scale, v_scale, *tables):
        dequantized.append(tuple(t.shape[0] for t in tables))
        return real_deq(q, k, v, k_scale, v_scale, *tables)

    monkeypatch.setattr(_native, "_c_decode", spy)
    monkeypatch.setattr(_native, "_dequantized_blocks", spy_deq)
    f32 = (float(np.float32(0.3)), float(np.float32(0.7)))
    rng = np.random.default_rng(14)
    b = testing.make_ragged_batch(rng, testing.seq_grid("decode", 8), num_q_heads=8,
                                  num_kv_heads=2, head_dim=32, block_size=8, dtype="bfloat16",
                                  decode=True)
    kq, vq, tables = _fp8_layout(b, 0.3, 0.7, compact=True)
    sinks = np.linspace(-2, 3, 8).astype(np.float32)
    want, want_lse = ref.paged_attention_reference(b.q, kq, vq, tables, b.kv_lens, k_scale=0.3,
                                                   v_scale=0.7, return_lse=True, sinks=sinks,
                                                   sliding_window=9)
    q, bt, kv = T(b.q), T(tables), T(b.kv_lens)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    lse = torch.full(q.shape[:2], float("nan"))
    got = tf.paged_attention(q, _t8(kq), _t8(vq), bt, kv, k_scale=0.3,
                             v_scale=torch.tensor(0.7), sinks=T(sinks), sliding_window=9,
                             out=out, lse=lse)
    assert got is out
    assert calls == [(torch.float8_e4m3fn, len(b.kv_lens), *f32)] and not dequantized
    testing.assert_attention_close(N(out), want, "bfloat16")
    np.testing.assert_allclose(N(lse), want_lse, **LSE_TOLERANCE["bfloat16"])
    calls.clear()
    compiled = torch.compile(lambda q, k, v: tf.paged_attention(q, k, v, bt, kv, k_scale=0.3,
                                                                v_scale=0.7, sliding_window=9),
                             fullgraph=True, backend="aot_eager")
    got = compiled(q, _t8(kq), _t8(vq))
    assert calls == [(torch.float8_e4m3fn, len(b.kv_lens), *f32)] and not dequantized
    want = ref.paged_attention_reference(b.q, kq, vq, tables, b.kv_lens, k_scale=0.3,
                                         v_scale=0.7, sliding_window=9)
    testing.assert_attention_close(N(got), want, "bfloat16")
    calls.clear()  # K and V views of a stacked [num_blocks, 2, ...] cache: no copy either
    stacked = torch.stack([_t8(kq), _t8(vq)], dim=1)
    got = tf.paged_attention(q, stacked[:, 0], stacked[:, 1], bt, kv, k_scale=0.3, v_scale=0.7,
                             sliding_window=9)
    assert calls == [(torch.float8_e4m3fn, len(b.kv_lens), *f32)] and not dequantized
    testing.assert_attention_close(N(got), want, "bfloat16")

    def mixed(seqs, compact):
        """A ragged batch through tf.paged_attention against the reference."""
        calls.clear()
        dequantized.clear()
        m = testing.make_ragged_batch(rng, seqs, num_q_heads=8, num_kv_heads=2, head_dim=32,
                                      block_size=8, dtype="bfloat16")
        kq, vq, tables = _fp8_layout(m, 0.3, 0.7, compact=compact)
        a = m.args()
        want = ref.paged_attention_reference(m.q, kq, vq, tables, *a[4:], k_scale=0.3,
                                             v_scale=0.7)
        got = tf.paged_attention(T(m.q), _t8(kq), _t8(vq), T(tables),
                                 *(T(x) for x in a[4:]), k_scale=0.3, v_scale=0.7)
        testing.assert_attention_close(N(got), want, "bfloat16")

    # 6 decodes, then two prefill chunks (5 and 12 tokens over cached prefixes): short, so
    # every token is a decode of the kernel (_native._c_ragged), which reads the fp8 bytes
    mixed([(1, 30)] * 6 + [(5, 21), (12, 40)], compact=True)
    assert calls == [(torch.float8_e4m3fn, 6 + 5 + 12, *f32)] and not dequantized
    # the same by groups (the route past RAGGED_DECODE_16BIT_MAX_Q tokens)
    monkeypatch.setattr(_native, "RAGGED_DECODE_16BIT_MAX_Q", 4)
    mixed([(1, 30)] * 6 + [(5, 21), (12, 40)], compact=True)
    assert calls == [(torch.float8_e4m3fn, 6, *f32)]  # the decodes, as one group
    assert sorted(dequantized) == [(1,), (1,)]  # each prefill group: its own sequence's blocks
    # a chunk past _native.PREFILL_Q_TILE (the tiled prefill) next to decodes
    mixed([(1, 30), (300, 310), (1, 9), (1, 17)], compact=False)
    assert calls == [(torch.float8_e4m3fn, 3, *f32)] and dequantized == [(1,)]


def _fp8_shared_prefix_case(decode: bool, window):
    """(cascade args, fp8 k and v caches, reference out and lse) with k_scale = v_scale = 0.25;
    ragged: the caches grow NaN blocks no table names (the tables then name fewer entries
    than the cache has blocks: the dequantizing paths gather them)."""
    rng = np.random.default_rng(5)
    b = testing.small_shared_prefix_batch(rng, decode)
    kq, vq = (ref.quantize_fp8_reference(c, 0.25) for c in (b.k_cache, b.v_cache))
    if not decode:
        nan = np.full((3 * kq.shape[0], *kq.shape[1:]), 0x7F, np.uint8).view(F8)
        kq, vq = np.concatenate([kq, nan]), np.concatenate([vq, nan])
    a = b.args()
    want, want_lse = ref.shared_prefix_attention_reference(
        a[0], kq, vq, *a[3:], k_scale=0.25, v_scale=0.25, return_lse=True,
        sliding_window=window)
    return a, kq, vq, want, want_lse


@pytest.mark.parametrize("window", [None, 11], ids=["no_window", "window"])
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "ragged"])
def test_torch_shared_prefix_attention_reads_fp8_caches(decode, window):
    pytest.importorskip("torch")
    from torch_convert import N, T

    from prefixkv import torch_frontend as tf

    a, kq, vq, want, want_lse = _fp8_shared_prefix_case(decode, window)
    args = [None if x is None else T(x) for x in a]
    out, lse = tf.shared_prefix_attention(args[0], _t8(kq), _t8(vq), *args[3:], k_scale=0.25,
                                          v_scale=0.25, return_lse=True, sliding_window=window)
    testing.assert_attention_close(N(out), want, "float32")
    np.testing.assert_allclose(N(lse), want_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_torch_cpu_dequantize_gives_every_byte_exactly(dtype):
    """The torch CPU paths' fp8 dequantization (a table of the 256 bytes' values, looked up
    in chunks) equals float32(byte) * scale rounded to q's dtype bit for bit (the NaN bytes
    NaN), for a strided view of a stacked cache, past one chunk, with and without a scale."""
    torch = pytest.importorskip("torch")
    from prefixkv.torch_frontend import _native

    g = torch.Generator().manual_seed(5)
    n = _native.DEQUANTIZE_CHUNK_BYTES // 4 // (8 * 2 * 16) + 3  # blocks: past one chunk
    stacked = torch.randint(0, 256, (n, 2, 8, 2, 16), generator=g, dtype=torch.uint8)
    stacked[0, 1].view(-1)[:256] = torch.arange(256, dtype=torch.uint8)  # every byte once
    cache = stacked.view(torch.float8_e4m3fn)[:, 1]
    assert not cache.is_contiguous()
    for scale in (None, torch.tensor(0.37), torch.tensor(3e38)):
        want = cache.to(torch.float32)
        want = (want if scale is None else want * scale).to(getattr(torch, dtype))
        got = _native._dequantize(cache, scale, getattr(torch, dtype))
        assert got.shape == cache.shape and got.dtype == want.dtype
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan) and int(nan.sum()) > 0
        assert torch.equal(got[~nan], want[~nan])
    assert _native._dequantize(cache[:0], None, torch.bfloat16).shape == (0, 8, 2, 16)


def test_torch_block_ops_move_fp8_bytes():
    torch = pytest.importorskip("torch")
    from prefixkv import torch_frontend as tf

    rng = np.random.default_rng(6)
    kq = ref.quantize_fp8_reference(rng.standard_normal((6, 4, 2, 8)) * 100)
    vq = ref.quantize_fp8_reference(rng.standard_normal((6, 4, 2, 8)))
    kq[0, 0, 0, :2] = np.array([np.nan, -np.nan], np.float32).astype(F8)
    src, dst = np.array([0, 2], np.int32), np.array([3, 1], np.int32)
    i32 = lambda a: torch.from_numpy(a)  # noqa: E731
    k, v = _t8(kq), _t8(vq)
    tf.copy_blocks([k, v], i32(src), i32(dst))
    want = ref.copy_blocks_reference([kq, vq], src, dst)
    np.testing.assert_array_equal(_tbits(k), _bits(want[0]))
    np.testing.assert_array_equal(_tbits(v), _bits(want[1]))
    buf = tf.gather_blocks([_t8(kq), _t8(vq)], i32(src))
    assert buf.dtype == torch.float8_e4m3fn
    np.testing.assert_array_equal(_tbits(buf), _bits(ref.gather_blocks_reference([kq, vq], src)))
    k, v = _t8(kq), _t8(vq)
    tf.scatter_blocks([k, v], buf, i32(np.array([5, 4], np.int32)))
    want = ref.scatter_blocks_reference([kq, vq], ref.gather_blocks_reference([kq, vq], src),
                                        np.array([5, 4], np.int32))
    np.testing.assert_array_equal(_tbits(k), _bits(want[0]))
    host = [_t8(np.zeros_like(kq)), _t8(np.zeros_like(vq))]
    tf.swap_blocks([_t8(kq), _t8(vq)], host, i32(src), i32(dst))
    want = ref.scatter_blocks_reference([np.zeros_like(kq), np.zeros_like(vq)],
                                        ref.gather_blocks_reference([kq, vq], src), dst)
    np.testing.assert_array_equal(_tbits(host[0]), _bits(want[0]))
    np.testing.assert_array_equal(_tbits(host[1]), _bits(want[1]))


def test_torch_fp8_under_torch_compile():
    """write_kv then paged_attention with the scales as tensors, fullgraph."""
    torch = pytest.importorskip("torch")
    from torch_convert import N, T

    from prefixkv import torch_frontend as tf

    rng = np.random.default_rng(7)
    b = testing.make_ragged_batch(rng, [(1, 9), (1, 4)], block_size=4, num_q_heads=4,
                                  num_kv_heads=2, head_dim=8, nan_fill=False, decode=True)
    kq, vq = (ref.quantize_fp8_reference(c, 0.5) for c in (b.k_cache, b.v_cache))
    key = rng.standard_normal((2, 2, 8)).astype(np.float32)
    slots = np.array([int(b.block_tables[0, 2]) * 4, int(b.block_tables[1, 0]) * 4 + 3],
                     np.int32)
    wk, wv = ref.write_kv_reference(key, key * 2, kq, vq, slots, k_scale=0.5, v_scale=0.25)
    want = ref.paged_attention_reference(b.q, wk, wv, *b.args()[3:], k_scale=0.5, v_scale=0.25)
    q, _, _, bt, kv, _ = (T(a) for a in b.args())
    sl = T(slots)

    def step(q, k, v, key, ks, vs):
        tf.write_kv(key, key * 2, k, v, sl, k_scale=ks, v_scale=vs)
        return tf.paged_attention(q, k, v, bt, kv, k_scale=ks, v_scale=vs)

    k, v = _t8(kq), _t8(vq)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(
        q, k, v, T(key), torch.tensor(0.5), torch.tensor(0.25))
    np.testing.assert_array_equal(_tbits(k), _bits(wk))
    np.testing.assert_array_equal(_tbits(v), _bits(wv))
    testing.assert_attention_close(N(got), want, "float32")
    # (torch.library.opcheck cannot take fp8 caches: its schema test multiplies them)


def test_torch_fp8_bad_input_names_the_argument():
    torch = pytest.importorskip("torch")
    from torch_convert import T

    from prefixkv import torch_frontend as tf

    b, kq, vq = _fp8_args()
    args = [T(a) for a in b.args()]
    k, v = _t8(kq), _t8(vq)
    with pytest.raises(ValueError, match="k_scale: only for a float8_e4m3fn cache"):
        tf.paged_attention(*args, k_scale=1.0)
    with pytest.raises(ValueError, match="v_scale: only for a float8_e4m3fn cache"):
        tf.write_kv(args[0][:, :2], args[0][:, :2], args[1], args[2],
                    torch.tensor([0], dtype=torch.int32), v_scale=torch.tensor(1.0))
    with pytest.raises(TypeError, match="k_scale: expected a float or a torch.Tensor, got "
                                        "ndarray"):
        tf.paged_attention(args[0], k, v, *args[3:], k_scale=np.float32([1.0]))
    with pytest.raises(ValueError, match="v_scale: expected a finite value > 0, got -2.0"):
        tf.paged_attention(args[0], k, v, *args[3:], v_scale=torch.tensor(-2.0))
    with pytest.raises(ValueError, match="k_scale: expected a finite value > 0, got nan"):
        tf.write_kv(args[0][:, :2], args[0][:, :2], k, v, torch.tensor([0], dtype=torch.int32),
                    k_scale=torch.tensor([float("nan")]))
    with pytest.raises(TypeError, match="k_scale: expected float32, got float64"):
        tf.paged_attention(args[0], k, v, *args[3:], k_scale=torch.tensor(1.0,
                                                                          dtype=torch.float64))
    with pytest.raises(TypeError, match="key: expected float32 or float16 or bfloat16, got "
                                        "float8_e4m3fn"):
        tf.write_kv(k[0], v[0], k, v, torch.tensor([0], dtype=torch.int32))


@pytest.mark.parametrize("slots_on", ["cuda", "cpu"])
def test_cuda_fp8_write_kv_and_attention(slots_on):
    """On a CUDA GPU (skipped without one): write_kv bit-exact on the triton and torch
    backends (slots on the device: the no-sync path), attention on both against the
    reference, scales as CUDA tensors."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from torch_convert import N, T

    from prefixkv import torch_frontend as tf

    dev = "cuda"
    rng = np.random.default_rng(13)
    for scale, values in _write_cases("float"):
        key = (rng.standard_normal((5, 2, 16)) * 30).astype(np.float32)
        key[1].flat[:len(values)] = values
        kc = ref.quantize_fp8_reference(rng.standard_normal((3, 4, 2, 16)))
        slots = np.array([6, 9, -1, 0], np.int32)
        want, _ = ref.write_kv_reference(key, key, kc, kc, slots, k_scale=scale, v_scale=scale)
        for backend in (None, "triton", "torch"):
            k, v = _t8(kc).to(dev), _t8(kc).to(dev)
            s = torch.tensor(scale, device=dev)
            tf.write_kv(T(key, dev), T(key, dev), k, v, T(slots, slots_on), k_scale=s,
                        v_scale=s, backend=backend)
            np.testing.assert_array_equal(_tbits(k), _bits(want), err_msg=f"{backend} {scale}")
            np.testing.assert_array_equal(_tbits(v), _bits(want), err_msg=f"{backend} {scale}")
    b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 16), num_q_heads=8,
                                  num_kv_heads=2, head_dim=64, block_size=16, dtype="bfloat16")
    kq, vq = (ref.quantize_fp8_reference(c, 0.05) for c in (b.k_cache, b.v_cache))
    want = ref.paged_attention_reference(b.q, kq, vq, *b.args()[3:], k_scale=0.05,
                                         v_scale=0.05)
    args = [None if a is None else T(a, dev) for a in b.args()]
    ks = torch.tensor([0.05], device=dev)
    for backend in (None, "torch"):
        out = tf.paged_attention(args[0], _t8(kq).to(dev), _t8(vq).to(dev), *args[3:],
                                 k_scale=ks, v_scale=ks, backend=backend)
        testing.assert_attention_close(N(out), want, "bfloat16")


# ------------------------------------------------------------------------------------ Triton


def test_triton_fp8_write_kv_under_interpreter():
    """tests/test_fp8_triton_cases.py under TRITON_INTERPRET=1 (set before triton's import, so
    in a subprocess): the Triton fp8 write_kv kernel bit-exact with the reference."""
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    from subprocess_cases import run_cases

    run_cases("test_fp8_triton_cases.py", {"TRITON_INTERPRET": "1"}, "an out-of-bounds access?",
              timeout=600)


@pytest.mark.parametrize("key_ptr", ["*fp32", "*fp16", "*i16"], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("cc", [80, 90])
def test_triton_fp8_write_kv_compiles_with_ieee_division(cc, key_ptr):
    """The fp8 write kernel compiled for sm_80 and sm_90 with no GPU present: it builds, and
    divides with div.rn.f32 (Triton's ``/`` is the approximate div.full.f32)."""
    pytest.importorskip("torch")
    triton = pytest.importorskip("triton")
    from prefixkv.kernels.triton import cache as tcache
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = tcache._write_kv_kernel
    cx = {"NUM_HEADS": 8, "HEAD_DIM": 128, "BLOCK_H": 8, "BLOCK_D": 128, "BLOCK_SIZE": 16,
          "FP8": True, "IN_BF16": key_ptr == "*i16"}
    ptrs = {"key_ptr": key_ptr, "value_ptr": key_ptr, "k_ptr": "*i8", "v_ptr": "*i8",
            "slots_ptr": "*i32", "ks_ptr": "*fp32", "vs_ptr": "*fp32"}
    sig = {n: "constexpr" if n in cx else ptrs.get(n, "i32") for n in fn.arg_names}
    kernel = triton.compile(ASTSource(fn, sig, cx), target=GPUTarget("cuda", cc, 32))
    ptx = kernel.asm["ptx"]
    assert kernel.asm["cubin"] and "div.rn.f32" in ptx
    assert "div.full.f32" not in ptx and "div.approx" not in ptx


# --------------------------------------------------------------------------------------- JAX


JAX_WRITE = [("xla", "eager"), ("xla", "jit_const"), ("xla", "jit_traced"),
             ("pallas_interpret", "jit_traced")]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("backend,mode", JAX_WRITE, ids=["-".join(c) for c in JAX_WRITE])
def test_jax_write_kv_is_bit_exact_with_the_reference(backend, mode, dtype, pallas_races):
    """The QUANT_CASES values (each with its scale) bit-exact: XLA turns x / broadcast(s) into
    x * (1 / s), which rounds the 0.3 and 0.1 cases the other way, unless prevented. Scales as
    Python floats (constants under jit) or traced float32 arrays; the rows are quantized by XLA
    ops, then the backend (XLA scatter or CPU FFI copy, or the Pallas kernel) moves bytes."""
    jax = pytest.importorskip("jax")
    from prefixkv import jax_frontend as jf

    rng = np.random.default_rng(8)
    for scale, values in _write_cases("float"):
        key, val, kc, vc, slots = _write_batch(rng, values, dtype, val_row=3)
        want_k, want_v = ref.write_kv_reference(key, val, kc, vc, slots, k_scale=scale,
                                                v_scale=scale)
        if mode == "eager":
            k, v = jf.write_kv(key, val, kc, vc, slots, k_scale=scale, v_scale=np.float32(scale),
                               backend=backend)
        elif mode == "jit_const":
            k, v = jax.jit(lambda *a, s=scale: jf.write_kv(*a, k_scale=s, v_scale=s,
                                                           backend=backend))(
                key, val, kc, vc, slots)
        else:
            k, v = jax.jit(lambda *a, ks, vs: jf.write_kv(*a, k_scale=ks, v_scale=vs,
                                                          backend=backend))(
                key, val, kc, vc, slots, ks=np.float32(scale), vs=np.float32([scale]))
        assert k.dtype == F8
        np.testing.assert_array_equal(_bits(np.asarray(k)), _bits(want_k), err_msg=str(scale))
        np.testing.assert_array_equal(_bits(np.asarray(v)), _bits(want_v), err_msg=str(scale))


@pytest.fixture
def jax_reads_fp8(monkeypatch):
    """The JAX frontend's dequantizing fallback refused: the backend must read the fp8 caches."""
    pytest.importorskip("jax")
    from prefixkv.jax_frontend import _ops

    def refuse(*args, **kwargs):
        raise AssertionError("the fp8 caches were dequantized, not read by the backend")

    monkeypatch.setattr(_ops, "_dequantized_blocks", refuse)


JAX_ATTENTION = [("xla", "decode", "float32", {}), ("xla", "mixed", "bfloat16", {}),
                 ("xla", "mixed", "float32", {"sliding_window": 5, "logits_soft_cap": 3.0}),
                 ("xla", "decode", "float16", {"sliding_window": 5}),
                 ("xla", "prefill", "float32", {"causal": False}),
                 ("pallas_interpret", "mixed", "float32", {}),
                 ("pallas_gpu_interpret", "decode", "float32", {})]


@pytest.mark.parametrize("backend,grid,dtype,opts", JAX_ATTENTION,
                         ids=[f"{b}-{g}-{d}-{'-'.join(o) or 'plain'}"
                              for b, g, d, o in JAX_ATTENTION])
def test_jax_paged_attention_reads_fp8_caches(backend, grid, dtype, opts, pallas_races,
                                             request):
    """Under jax.jit with the scales traced, and eagerly with Python-float scales, against the
    reference. The XLA backend reads the fp8 caches itself (no dequantized copy): its loop
    converts the blocks of each step (also checked without the CPU kernel), the CPU decode
    kernel reads the bytes."""
    jax = pytest.importorskip("jax")
    from prefixkv.jax_frontend import _xla

    from prefixkv import jax_frontend as jf

    if backend == "xla":
        request.getfixturevalue("jax_reads_fp8")

    # the interpreters run on the CPU, also on a machine with a GPU (the default device)
    cpu = jax.devices("cpu")[0] if backend != "xla" else None
    with jax.default_device(cpu):
        rng = np.random.default_rng(9)
        d = 128 if backend == "pallas_interpret" else 32
        bs = 16 if backend == "pallas_gpu_interpret" else 8
        seqs = testing.seq_grid(grid, bs) if backend == "xla" else testing.seq_grid(grid, bs)[:4]
        b = testing.make_ragged_batch(rng, seqs, num_q_heads=8, num_kv_heads=2, head_dim=d,
                                      block_size=bs, dtype=dtype,
                                      sliding_window=opts.get("sliding_window"))
        kq, vq, tables = _fp8_layout(b, 0.02, 0.05, compact=grid != "decode")
        rest = (tables, *b.args()[4:])
        sinks = np.linspace(-2, 3, 8).astype(np.float32)
        want, want_lse = ref.paged_attention_reference(b.q, kq, vq, *rest, k_scale=0.02,
                                                       v_scale=0.05, return_lse=True, sinks=sinks,
                                                       **opts)

        @jax.jit
        def step(q, kc, vc, bt, kv, cu, ks, vs):
            return jf.paged_attention(q, kc, vc, bt, kv, cu, k_scale=ks, v_scale=vs, sinks=sinks,
                                      return_lse=True, backend=backend, **opts)

        out, lse = step(b.q, kq, vq, *rest, np.float32(0.02), np.float32([0.05]))
        assert out.dtype == b.q.dtype
        testing.assert_attention_close(out, want, dtype)
        np.testing.assert_allclose(np.asarray(lse), want_lse, **LSE_TOLERANCE[dtype])
        if backend == "xla":
            got = jf.paged_attention(b.q, kq, vq, *rest, k_scale=0.02, v_scale=0.05,
                                     sinks=sinks, **opts)
            testing.assert_attention_close(got, want, dtype)
            # the loop alone (what runs off the CPU, or without the kernel), decodes included
            want = ref.paged_attention_reference(b.q, kq, vq, *rest, k_scale=0.02, v_scale=0.05,
                                                 **opts)
            scale = opts.get("scale", b.q.shape[-1] ** -0.5)
            loop = jax.jit(lambda q, kc, vc, bt, kv, cu, ks, vs: _xla.ragged_paged_attention(
                q, kc, vc, bt, kv, cu, scale=scale, k_scale=ks, v_scale=vs, **opts))
            got, _ = loop(b.q, kq, vq, *rest, np.float32(0.02), np.float32(0.05))
            testing.assert_attention_close(got, want, dtype)


def test_jax_cpu_decode_reads_fp8_bytes_in_the_ffi_kernel():
    """A jitted CPU decode over fp8 caches with traced scales lowers to the fp8 FFI decode
    target (the kernel reads the fp8 bytes, the scales an f32[2] operand: no dequantized
    copy), with sinks and a window, against the reference."""
    jax = pytest.importorskip("jax")
    from prefixkv.kernels.cpu import xla_ffi

    from prefixkv import jax_frontend as jf

    rng = np.random.default_rng(15)
    b = testing.make_ragged_batch(rng, testing.seq_grid("decode", 8), num_q_heads=8,
                                  num_kv_heads=2, head_dim=32, block_size=8, dtype="bfloat16",
                                  decode=True)
    kq, vq, tables = _fp8_layout(b, 0.3, 0.7, compact=True)
    if not xla_ffi.use_for_attention_fp8(b.q, kq, vq):
        pytest.skip("no CPU FFI kernels")
    sinks = np.linspace(-2, 3, 8).astype(np.float32)
    want, want_lse = ref.paged_attention_reference(b.q, kq, vq, tables, b.kv_lens, k_scale=0.3,
                                                   v_scale=0.7, return_lse=True, sinks=sinks,
                                                   sliding_window=9)
    step = jax.jit(lambda q, k, v, t, n, ks, vs: jf.paged_attention(
        q, k, v, t, n, k_scale=ks, v_scale=vs, sinks=sinks, sliding_window=9, return_lse=True))
    args = (b.q, kq, vq, tables, b.kv_lens, np.float32(0.3), np.float32([0.7]))
    assert "prefixkv_cpu_paged_attention_decode_fp8" in step.lower(*args).as_text()
    out, lse = step(*args)
    testing.assert_attention_close(out, want, "bfloat16")
    np.testing.assert_allclose(np.asarray(lse), want_lse, **LSE_TOLERANCE["bfloat16"])


@pytest.mark.parametrize("window", [None, 11], ids=["no_window", "window"])
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "ragged"])
def test_jax_shared_prefix_attention_reads_fp8_caches(decode, window, jax_reads_fp8):
    jax = pytest.importorskip("jax")
    from prefixkv import jax_frontend as jf

    a, kq, vq, want, want_lse = _fp8_shared_prefix_case(decode, window)
    out, lse = jax.jit(lambda q, k, v, *rest, s: jf.shared_prefix_attention(
        q, k, v, *rest, k_scale=s, v_scale=s, return_lse=True, sliding_window=window))(
        a[0], kq, vq, *a[3:], s=np.float32(0.25))
    testing.assert_attention_close(out, want, "float32")
    np.testing.assert_allclose(np.asarray(lse), want_lse, atol=1e-4, rtol=1e-5)


#: (prefix blocks, (prefix id, q_len, own kv_len) per sequence, decode): the XLA cascade's
#: one-prefix and several-prefix passes, own parts by the decode kernel and the ragged loop
JAX_CASCADE_FP8 = {"one_prefix_decode": ([4], [(0, 1, 5), (0, 1, 9), (-1, 1, 3)], True),
                   "two_prefixes_decode": ([3, 2], [(0, 1, 5), (1, 1, 9), (0, 1, 2),
                                                    (-1, 1, 3)], True),
                   "two_prefixes_ragged": ([3, 2], [(0, 3, 5), (1, 2, 9), (-1, 1, 4)], False)}


@pytest.mark.parametrize("case", list(JAX_CASCADE_FP8))
def test_jax_cascade_reads_fp8_caches(case, jax_reads_fp8):
    """The XLA cascade over fp8 caches, its prefix pass forced (as when a prefix group is big
    enough on a CPU) and through the frontend, scales traced, against the reference; the
    caches are never dequantized whole (NaN bytes sit in every slot no token holds)."""
    jax = pytest.importorskip("jax")
    from prefixkv.jax_frontend import _xla

    from prefixkv import jax_frontend as jf

    blocks, seqs, decode = JAX_CASCADE_FP8[case]
    b = testing.make_shared_prefix_batch(np.random.default_rng(21), blocks, seqs,
                                         num_q_heads=8, num_kv_heads=2, head_dim=32,
                                         block_size=8, dtype="bfloat16", decode=decode)
    kq, vq = ref.quantize_fp8_reference(b.k_cache, 0.03), ref.quantize_fp8_reference(
        b.v_cache, 0.06)
    a = b.args()
    want, want_lse = ref.shared_prefix_attention_reference(
        a[0], kq, vq, *a[3:], k_scale=0.03, v_scale=0.06, return_lse=True)
    cascade = jax.jit(lambda q, k, v, *rest, ks, vs: _xla._cascade_attention(
        q, k, v, *rest, scale=32 ** -0.5, k_scale=ks, v_scale=vs))
    out, lse = cascade(a[0], kq, vq, *a[3:], ks=np.float32(0.03), vs=np.float32([0.06]))
    testing.assert_attention_close(np.asarray(out, np.float32), want, "bfloat16")
    np.testing.assert_allclose(np.asarray(lse), want_lse, **LSE_TOLERANCE["bfloat16"])
    out = jax.jit(lambda q, k, v, *rest, s: jf.shared_prefix_attention(
        q, k, v, *rest, k_scale=s, v_scale=0.06))(a[0], kq, vq, *a[3:], s=np.float32(0.03))
    testing.assert_attention_close(out, want, "bfloat16")


def test_jax_short_decode_reads_fp8_caches():
    """The cascade's own part off the CPU kernel (short KV read whole per sequence) over fp8
    caches, scales traced, against the reference."""
    jax = pytest.importorskip("jax")
    from prefixkv.jax_frontend import _xla

    b = testing.make_ragged_batch(np.random.default_rng(22), [(1, 5), (1, 17), (1, 1)],
                                  num_q_heads=8, num_kv_heads=2, head_dim=32, block_size=8,
                                  dtype="bfloat16", decode=True)
    kq, vq = ref.quantize_fp8_reference(b.k_cache, 0.5), ref.quantize_fp8_reference(
        b.v_cache, 0.25)
    want, want_lse = ref.paged_attention_reference(b.q, kq, vq, *b.args()[3:], k_scale=0.5,
                                                   v_scale=0.25, return_lse=True)
    out, lse = jax.jit(lambda q, k, v, t, n, ks, vs: _xla.short_decode_attention(
        q, k, v, t, n, scale=32 ** -0.5, k_scale=ks, v_scale=vs))(
        b.q, kq, vq, b.block_tables, b.kv_lens, np.float32(0.5), np.float32(0.25))
    testing.assert_attention_close(out, want, "bfloat16")
    np.testing.assert_allclose(np.asarray(lse), want_lse, **LSE_TOLERANCE["bfloat16"])


def test_jax_xla_converts_every_fp8_byte_exactly():
    """The XLA loops' float8_e4m3fn upcast (bits shifted into a float16, not XLA's convert)
    gives every one of the 256 bytes' float32 bit for bit (signed zeros, subnormals, the NaNs),
    alone and times a scale (past float32's range for the largest bytes), jitted. XLA:CPU
    flushes subnormal results, either way: no subnormal scale."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    from prefixkv.jax_frontend import _xla

    byte = np.arange(256, dtype=np.uint8)
    want = byte.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    nan = np.isnan(want)
    assert nan.sum() == 2
    for scale in (None, np.float32(0.37), np.float32(2e36)):
        got = np.asarray(jax.jit(lambda b, s: _xla._bits_to_f32(b, jnp.float8_e4m3fn, s))(
            byte, scale))
        with np.errstate(over="ignore"):
            w = want if scale is None else want * scale
        np.testing.assert_array_equal(np.isnan(got), nan)
        np.testing.assert_array_equal(got[~nan].view(np.uint32), w[~nan].view(np.uint32))


@pytest.mark.parametrize("backend", ["xla", "pallas_interpret"])
def test_jax_write_then_block_ops_move_fp8_bytes(backend, pallas_races):
    """A step's write into fp8 caches (NaN and saturated values among them), then the block
    ops of offloading move the quantized bytes untouched."""
    pytest.importorskip("jax")
    from prefixkv import jax_frontend as jf

    rng = np.random.default_rng(6)
    kq = ref.quantize_fp8_reference(rng.standard_normal((6, 4, 2, 8)) * 100)
    vq = ref.quantize_fp8_reference(rng.standard_normal((6, 4, 2, 8)))
    key = np.full((2, 2, 8), np.nan, np.float32)
    key[1] = -1e4
    kq, vq = (np.asarray(c) for c in jf.write_kv(key, key, kq, vq, np.array([0, 9], np.int32),
                                                 k_scale=0.5, backend=backend))
    assert (_bits(kq)[0, 0] == 0x7F).all() and (_bits(vq)[2, 1] == 0xFE).all()
    src, dst = np.array([0, 2], np.int32), np.array([3, 1], np.int32)
    got = jf.copy_blocks([kq, vq], src, dst, backend=backend)
    for g, w in zip(got, ref.copy_blocks_reference([kq, vq], src, dst), strict=True):
        np.testing.assert_array_equal(_bits(np.asarray(g)), _bits(w))
    buf = jf.gather_blocks([kq, vq], src, backend=backend)
    assert buf.dtype == F8
    np.testing.assert_array_equal(_bits(np.asarray(buf)),
                                  _bits(ref.gather_blocks_reference([kq, vq], src)))
    got = jf.scatter_blocks([kq, vq], np.asarray(buf), dst, backend=backend)
    want = ref.scatter_blocks_reference([kq, vq], np.asarray(buf), dst)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(_bits(np.asarray(g)), _bits(w))


def test_jax_fp8_bad_input_names_the_argument():
    jax = pytest.importorskip("jax")
    from prefixkv import jax_frontend as jf

    b, kq, vq = _fp8_args()
    key = np.ones((1, 2, 16), np.float32)
    slots = np.array([0], np.int32)
    with pytest.raises(ValueError, match="k_scale: only for a float8_e4m3fn cache"):
        jf.paged_attention(*b.args(), k_scale=1.0)
    with pytest.raises(ValueError, match="v_scale: only for a float8_e4m3fn cache"):
        jf.write_kv(key, key, b.k_cache[:, :, :, :16], b.v_cache, slots, v_scale=2.0)
    with pytest.raises(ValueError, match="k_scale: expected a finite value > 0, got -1.0"):
        jf.write_kv(key, key, kq, vq, slots, k_scale=jax.numpy.float32(-1.0))
    with pytest.raises(ValueError, match="v_scale: expected a finite value > 0, got inf"):
        jf.paged_attention(b.q, kq, vq, *b.args()[3:], v_scale=np.float32([np.inf]))
    with pytest.raises(TypeError, match="k_scale: expected float32, got bfloat16"):
        jax.jit(lambda s: jf.paged_attention(b.q, kq, vq, *b.args()[3:], k_scale=s))(
            jax.numpy.ones((), jax.numpy.bfloat16))
    with pytest.raises(ValueError, match=r"k_scale: expected one element \(shape \(\) or "
                                         r"\(1,\)\), got shape \(2, 1\)"):
        jf.write_kv(key, key, kq, vq, slots, k_scale=np.ones((2, 1), np.float32))
    with pytest.raises(TypeError, match="value: expected the dtype of key"):
        jf.write_kv(key, key.astype(np.float16), kq, vq, slots)
