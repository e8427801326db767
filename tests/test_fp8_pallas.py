"""The Pallas attention kernels read float8_e4m3fn caches directly: the TPU kernel (TPU
interpret mode, backend "pallas_interpret") and the GPU kernel (Pallas's interpreter,
"pallas_gpu_interpret") get the fp8 bytes and the scales, never a dequantized copy (the
frontend's ``_dequantized_blocks`` raises in every test that goes through it), against the
numpy reference with k_scale/v_scale. The caches hold NaN bytes (0x7f) in every slot no query
may read (block padding, blocks no table names, slots before a window) and in blocks past the
tables: a NaN read would show. Both kernels are also exported for their hardware (Pallas ->
Mosaic, Pallas -> Triton lowering) with fp8 caches; none is compiled or run on a TPU or a GPU."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("jax.experimental.pallas.tpu")
import jax.numpy as jnp  # noqa: E402
from prefixkv.jax_frontend import _ops  # noqa: E402
from prefixkv.kernels.pallas import _fp8  # noqa: E402
from prefixkv.kernels.pallas import paged_attention as pa  # noqa: E402
from prefixkv.kernels.pallas import paged_attention_gpu as pg  # noqa: E402
from prefixkv.paged import reference as ref  # noqa: E402
from prefixkv.paged import testing  # noqa: E402

from prefixkv import jax_frontend as jf  # noqa: E402

pytestmark = pytest.mark.usefixtures("pallas_races")

F8 = ml_dtypes.float8_e4m3fn
LSE_TOLERANCE = {"float32": dict(atol=1e-4, rtol=1e-5), "bfloat16": dict(atol=3e-2, rtol=1e-2)}
#: head_dim per backend: the TPU kernel takes multiples of 128, the GPU one powers of two
HEAD_DIM = {"pallas_interpret": 128, "pallas_gpu_interpret": 32}
BACKENDS = list(HEAD_DIM)
K_SCALE, V_SCALE = 0.02, 0.05


@pytest.fixture
def no_dequantize(monkeypatch):
    """The frontend's dequantizing copy raises: an fp8 call must hand the kernel the bytes."""
    def refuse(*args, **kwargs):
        raise AssertionError("fp8 caches dequantized by the frontend (the kernel reads fp8)")

    monkeypatch.setattr(_ops, "_dequantized_blocks", refuse)


def _quantized(b, grow: int = 2):
    """fp8 caches of batch ``b`` (NaN where b has NaN: every unread slot) with ``grow`` times
    as many NaN blocks appended, named by no table."""
    kq = ref.quantize_fp8_reference(b.k_cache, K_SCALE)
    vq = ref.quantize_fp8_reference(b.v_cache, V_SCALE)
    nan = np.full((grow * kq.shape[0], *kq.shape[1:]), 0x7F, np.uint8).view(F8)
    return np.concatenate([kq, nan]), np.concatenate([vq, nan])


# ------------------------------------------------------------------------------ the decode


@pytest.mark.parametrize("decode", [_fp8.fp8_e4m3_to_f32, _fp8.fp8_e4m3_to_f32_via_f16],
                         ids=["f32_bits_tpu", "f16_bits_gpu"])
@pytest.mark.parametrize("signed", [True, False], ids=["int8", "uint8"])
def test_decode_every_byte_value_exactly(decode, signed):
    """All 256 bytes, bit for bit against ml_dtypes (-0 keeps its sign, subnormals m * 2^-9,
    0x7f and 0xff NaN), jitted and eager."""
    b = np.arange(256, dtype=np.uint8)
    want = b.view(F8).astype(np.float32)
    x = jnp.asarray(b.view(np.int8) if signed else b)
    for got in (np.asarray(decode(x)), np.asarray(jax.jit(decode)(x))):
        assert got.dtype == np.float32
        nan = np.isnan(want)
        np.testing.assert_array_equal(np.isnan(got), nan)
        np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_reads_every_byte_value_exactly(backend, no_dequantize):
    """One key of 2 kv heads x 128 lanes holds every byte value (K: the NaN bytes replaced by
    0, V: all 256); 16 decode queries, one per kv head's group of 8 q heads, probe one lane of K
    each (q one-hot, scale 1, k_scale 0.5): lse = float32(k8) * 0.5 exactly; out = float32(v8)
    * 0.25 exactly (NaN in the NaN bytes' lanes only). The key's 15 other slots and 3 other
    blocks are NaN bytes (never read)."""
    heads, group, d, bs = 2, 8, 128, 16
    k8 = np.full((4, bs, heads, d), 0x7F, np.uint8)
    v8 = k8.copy()
    row = np.arange(256, dtype=np.uint8).reshape(heads, d)
    v8[1, 0] = row
    k8[1, 0] = np.where((row & 0x7F) == 0x7F, 0, row)
    kc, vc = k8.view(F8), v8.view(F8)
    seqs = d // group                                  # 16 sequences cover a head's 128 lanes
    q = np.zeros((seqs, heads * group, d), np.float32)
    for s in range(seqs):
        for h in range(heads):
            for g in range(group):
                q[s, h * group + g, s * group + g] = 1.0
    tables = np.full((seqs, 1), 1, np.int32)
    kv_lens = np.ones(seqs, np.int32)
    step = jax.jit(lambda *a, ks, vs: jf.paged_attention(
        *a, scale=1.0, k_scale=ks, v_scale=vs, return_lse=True, backend=backend))
    out, lse = step(q, kc, vc, tables, kv_lens, ks=np.float32(0.5), vs=np.float32([0.25]))
    want_k = kc[1, 0].astype(np.float32) * np.float32(0.5)          # [heads, d]
    want_lse = np.stack([want_k[h].reshape(seqs, group) for h in range(heads)], 1)
    np.testing.assert_array_equal(np.asarray(lse).reshape(seqs, heads, group), want_lse)
    want_v = vc[1, 0].astype(np.float32) * np.float32(0.25)         # [heads, d]
    want_out = np.broadcast_to(want_v[None, :, None, :], (seqs, heads, group, d))
    np.testing.assert_array_equal(np.asarray(out).reshape(seqs, heads, group, d), want_out)


# -------------------------------------------------------------------------- paged attention


ATTENTION = [("decode", "float32", {}),
             ("decode", "bfloat16", {"sliding_window": 9}),
             ("mixed", "float32", {}),
             ("mixed", "bfloat16", {"logits_soft_cap": 3.0}),
             ("mixed", "float32", {"sliding_window": 7, "logits_soft_cap": 2.0}),
             ("prefill", "float32", {"causal": False})]
ATTENTION_IDS = [f"{g}-{d}-{'-'.join(o) or 'plain'}" for g, d, o in ATTENTION]


@pytest.mark.parametrize("grid,dtype,opts", ATTENTION, ids=ATTENTION_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_attention_reads_fp8_caches(backend, grid, dtype, opts, no_dequantize):
    """Jitted with traced scales (a 0-d and a 1-element array), and eagerly with Python
    floats, with sinks, against the reference; NaN bytes in every unread slot and block."""
    rng = np.random.default_rng(21)
    bs = 16
    b = testing.make_ragged_batch(rng, testing.seq_grid(grid, bs)[:4], num_q_heads=8,
                                  num_kv_heads=2, head_dim=HEAD_DIM[backend], block_size=bs,
                                  dtype=dtype, sliding_window=opts.get("sliding_window"))
    kq, vq = _quantized(b)
    rest = b.args()[3:]
    sinks = np.linspace(-2, 3, 8).astype(np.float32)
    want, want_lse = ref.paged_attention_reference(b.q, kq, vq, *rest, k_scale=K_SCALE,
                                                   v_scale=V_SCALE, return_lse=True,
                                                   sinks=sinks, **opts)

    @jax.jit
    def step(q, kc, vc, bt, kv, cu, ks, vs):
        return jf.paged_attention(q, kc, vc, bt, kv, cu, k_scale=ks, v_scale=vs, sinks=sinks,
                                  return_lse=True, backend=backend, **opts)

    out, lse = step(b.q, kq, vq, *rest, np.float32(K_SCALE), np.float32([V_SCALE]))
    assert out.dtype == b.q.dtype
    testing.assert_attention_close(out, want, dtype)
    np.testing.assert_allclose(np.asarray(lse), want_lse, **LSE_TOLERANCE[dtype])
    got = jf.paged_attention(b.q, kq, vq, *rest, k_scale=K_SCALE, v_scale=V_SCALE, sinks=sinks,
                             backend=backend, **opts)
    testing.assert_attention_close(got, want, dtype)


def _kernel_case(grid: str, head_dim: int, dtype: str = "bfloat16"):
    rng = np.random.default_rng(22)
    b = testing.make_ragged_batch(rng, testing.seq_grid(grid, 16)[:4], num_q_heads=4,
                                  num_kv_heads=2, head_dim=head_dim, block_size=16,
                                  dtype=dtype)
    kq, vq = _quantized(b, grow=1)
    want, want_lse = ref.paged_attention_reference(b.q, kq, vq, *b.args()[3:],
                                                   k_scale=K_SCALE, v_scale=V_SCALE,
                                                   return_lse=True)
    return b, kq, vq, want, want_lse


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("kv_gather", [True, False], ids=["gathered", "per_block"])
def test_gpu_kernel_split_and_block_loads_read_fp8(kv_gather, num_splits):
    """The GPU kernel's decode variants (split-KV merged by LSE; gathered tiles or block by
    block, two blocks a step), called directly with fp8 caches and traced scales."""
    b, kq, vq, want, want_lse = _kernel_case("decode", 32)
    run = jax.jit(lambda q, k, v, t, n, ks, vs: pg.paged_attention_gpu(
        q, k, v, t, n, scale=32 ** -0.5, num_splits=num_splits, blocks_per_step=2,
        kv_gather=kv_gather, interpret=True, k_scale=ks, v_scale=vs))
    out, lse = run(b.q, kq, vq, b.block_tables, b.kv_lens, jnp.float32(K_SCALE),
                   jnp.float32(V_SCALE))
    testing.assert_attention_close(out, want, "bfloat16")
    np.testing.assert_allclose(np.asarray(lse), want_lse, **LSE_TOLERANCE["bfloat16"])


@pytest.mark.parametrize("pages", [1, 2])
def test_tpu_kernel_chunks_read_fp8(pages):
    """The TPU kernel over chunks of 1 and 2 blocks (double-buffered DMAs of fp8 bytes, the
    last chunk partly past the tile's blocks), mixed batch, called directly."""
    b, kq, vq, want, want_lse = _kernel_case("mixed", 128)
    run = jax.jit(lambda q, k, v, t, n, cu, ks, vs: pa.paged_attention_tpu(
        q, k, v, t, n, cu, scale=128 ** -0.5, pages=pages, k_scale=ks, v_scale=vs,
        interpret=jf_interpret()))
    out, lse = run(b.q, kq, vq, b.block_tables, b.kv_lens, b.cu_q_lens, jnp.float32(K_SCALE),
                   jnp.float32(V_SCALE))
    testing.assert_attention_close(out, want, "bfloat16")
    np.testing.assert_allclose(np.asarray(lse), want_lse, **LSE_TOLERANCE["bfloat16"])


def jf_interpret():
    from prefixkv.jax_frontend import _backends

    return _backends.tpu_interpret_params()


# -------------------------------------------------------------------- shared-prefix (cascade)


SHARED = [(True, None), (False, None), (False, 13)]


@pytest.mark.parametrize("decode,window", SHARED,
                         ids=["decode", "ragged", "ragged-window"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_prefix_attention_reads_fp8_caches(backend, decode, window, no_dequantize):
    """The cascade (both passes run the kernel: prefix non-causal, own blocks causal), and with
    a window the paged path over prefix then own blocks; traced scales, against the
    reference; NaN bytes in the blocks no table names."""
    rng = np.random.default_rng(23)
    seqs = [(0, 1, 3), (1, 1, 20), (-1, 1, 2), (0, 1, 1)] if decode else \
        [(0, 2, 3), (1, 1, 20), (-1, 3, 4), (0, 5, 17)]
    sb = testing.make_shared_prefix_batch(rng, [2, 1], seqs, num_q_heads=4, num_kv_heads=2,
                                          head_dim=HEAD_DIM[backend], block_size=16)
    a = sb.args()
    kq, vq = _quantized(sb)
    want, want_lse = ref.shared_prefix_attention_reference(
        a[0], kq, vq, *a[3:], k_scale=K_SCALE, v_scale=V_SCALE, return_lse=True,
        sliding_window=window)
    out, lse = jax.jit(lambda q, k, v, *rest, ks, vs: jf.shared_prefix_attention(
        q, k, v, *rest, k_scale=ks, v_scale=vs, return_lse=True, sliding_window=window,
        backend=backend))(a[0], kq, vq, *a[3:], ks=np.float32(K_SCALE), vs=np.float32(V_SCALE))
    testing.assert_attention_close(out, want, "float32")
    np.testing.assert_allclose(np.asarray(lse), want_lse, **LSE_TOLERANCE["float32"])


# ------------------------------------------------------------------------------- routing


def test_tpu_kernel_takes_fp8_only_in_whole_byte_tiles(monkeypatch):
    """pallas_interpret with 8 x 2 rows a block (not a whole 32-row 8-bit tile) keeps the
    dequantizing path (and gives the reference's answer); on a TPU the kernel also needs
    num_kv_heads a multiple of 32 (XLA's 8-bit tiling), else the frontend dequantizes."""
    assert pa.tpu_reads_fp8(num_kv_heads=2, block_size=16, xla_layout=False)
    assert not pa.tpu_reads_fp8(num_kv_heads=2, block_size=8, xla_layout=False)
    assert not pa.tpu_reads_fp8(num_kv_heads=8, block_size=16, xla_layout=True)
    assert pa.tpu_reads_fp8(num_kv_heads=32, block_size=16, xla_layout=True)
    calls = []
    real = _ops._dequantized_blocks
    monkeypatch.setattr(_ops, "_dequantized_blocks",
                        lambda *a: calls.append(1) or real(*a))
    rng = np.random.default_rng(24)
    b = testing.make_ragged_batch(rng, testing.seq_grid("decode", 8)[:3], num_q_heads=4,
                                  num_kv_heads=2, head_dim=128, block_size=8)
    kq, vq = _quantized(b, grow=1)
    want = ref.paged_attention_reference(b.q, kq, vq, *b.args()[3:], k_scale=K_SCALE,
                                         v_scale=V_SCALE)
    got = jf.paged_attention(b.q, kq, vq, *b.args()[3:], k_scale=K_SCALE, v_scale=V_SCALE,
                             backend="pallas_interpret")
    testing.assert_attention_close(got, want, "float32")
    assert calls == [1]


def _fp8_consumers(jaxpr):
    """Primitives outside the Pallas kernels that take a float8_e4m3fn operand."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            continue
        if any(getattr(getattr(v, "aval", None), "dtype", None) == jnp.float8_e4m3fn
               for v in eqn.invars):
            yield eqn.primitive.name
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _fp8_consumers(sub)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jitted_call_hands_the_kernel_fp8_bytes(backend):
    """In the jitted program the caches go into the kernel through an int8 bitcast and nothing
    else: no float8 conversion (a dequantized copy) and no gather of fp8 blocks."""
    rng = np.random.default_rng(25)
    b = testing.make_ragged_batch(rng, testing.seq_grid("decode", 16)[:3], num_q_heads=4,
                                  num_kv_heads=2, head_dim=HEAD_DIM[backend], block_size=16)
    kq, vq = _quantized(b, grow=1)
    step = jax.jit(lambda *a, ks, vs: jf.paged_attention(*a, k_scale=ks, v_scale=vs,
                                                         backend=backend))
    jaxpr = jax.make_jaxpr(step)(b.q, kq, vq, *b.args()[3:], ks=np.float32(K_SCALE),
                                 vs=np.float32(V_SCALE)).jaxpr
    used = set(_fp8_consumers(jaxpr))
    assert "bitcast_convert_type" in used
    assert used <= {"bitcast_convert_type", "pjit", "jit", "closed_call"}, used


# ------------------------------------------------------------------------- lowering (no chip)


def _fp8_args(num_kv_heads: int, head_dim: int, block_size: int, decode: bool):
    S = jax.ShapeDtypeStruct
    num_seqs = 4
    cache = S((32, block_size, num_kv_heads, head_dim), jnp.float8_e4m3fn)
    return [S((num_seqs if decode else 24, 4 * num_kv_heads, head_dim), jnp.bfloat16), cache,
            cache, S((num_seqs, 8), jnp.int32), S((num_seqs,), jnp.int32),
            None if decode else S((num_seqs + 1,), jnp.int32), S((), jnp.float32),
            S((1,), jnp.float32)]


def _fp8_attention(q, k, v, t, n, cu, ks, vs):
    return jf.paged_attention(q, k, v, t, n, cu, k_scale=ks, v_scale=vs, sliding_window=64,
                              logits_soft_cap=30.0)


@pytest.mark.parametrize("decode", [True, False], ids=["decode", "mixed"])
def test_fp8_tpu_kernel_lowers_for_tpu(decode):
    """Exported for a TPU (Pallas -> Mosaic lowering; Mosaic's own compile needs a chip):
    32 kv heads run the kernel on the fp8 bytes (no float8 conversion in the module), 8
    dequantize first (XLA's 8-bit tiling would make the merged-heads view a copy)."""
    def module(hkv):
        fn = jax.jit(_fp8_attention)
        return jax.export.export(fn, platforms=["tpu"])(
            *_fp8_args(hkv, 128, 16, decode)).mlir_module()

    direct = module(32)
    assert "tpu_custom_call" in direct
    assert _f8_ops(direct) == {"stablehlo.bitcast_convert"}
    dequantized = module(8)
    assert "tpu_custom_call" in dequantized
    assert "stablehlo.convert" in _f8_ops(dequantized)


def _f8_ops(module: str) -> set[str]:
    """The StableHLO ops of an exported module that take or give a float8 tensor."""
    ops = set()
    for line in module.splitlines():
        if "f8E4M3FN" in line and "stablehlo." in line:
            ops.add("stablehlo." + line.split("stablehlo.", 1)[1].split()[0].strip('"('))
    return ops


@pytest.mark.parametrize("decode", [True, False], ids=["decode", "mixed"])
def test_fp8_gpu_kernel_lowers_for_cuda(decode):
    """Exported for an H100 (Pallas -> Triton lowering): the kernel takes the fp8 bytes."""
    from test_jax_pallas import _export_for_h100

    text = _export_for_h100(jax.jit(_fp8_attention), _fp8_args(8, 128, 16, decode))
    assert "xla.gpu.triton" in text
    assert _f8_ops(text) == {"stablehlo.bitcast_convert"}
