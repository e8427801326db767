"""JAX caches in the HND layout (``kv_layout="HND"``: [num_blocks, num_kv_heads, block_size,
head_dim]): every op that reads or writes tokens of a cache against the numpy reference given
the same values as NHD caches (its strided view), on every backend this machine runs.

The TPU kernel reads HND itself for any number of kv heads, 1 and 2 included (the
tensor-parallel head counts it refuses in NHD), as do the GPU kernel and the CPU decode
kernel; the XLA loops get the blocks the tables name transposed. The slots
no query may read hold NaN (the batches' padding), so a misread shows."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("jax.experimental.pallas.tpu")
import jax.numpy as jnp  # noqa: E402
from prefixkv.jax_frontend import _backends, _xla  # noqa: E402
from prefixkv.kernels.pallas import paged_attention as pa  # noqa: E402
from prefixkv.paged import reference as ref  # noqa: E402
from prefixkv.paged import testing  # noqa: E402

from prefixkv import jax_frontend as jf  # noqa: E402

pytestmark = pytest.mark.usefixtures("pallas_races")

F8 = ml_dtypes.float8_e4m3fn


def hnd(cache):
    """An NHD cache's values in the HND layout (a contiguous copy, as a JAX array)."""
    return jnp.asarray(np.ascontiguousarray(np.swapaxes(np.asarray(cache), 1, 2)))


def _hnd_args(args):
    q, k, v, *rest = args
    return [jnp.asarray(q), hnd(k), hnd(v), *[None if a is None else jnp.asarray(a)
                                              for a in rest]]


# ------------------------------------------------------------------------- paged attention

# (backend, grid, dtype, block_size, kv heads, head_dim, options)
ATTENTION = [
    ("xla", "mixed", "float32", 8, 1, 64, {}),
    ("xla", "decode", "bfloat16", 16, 2, 128, dict(sliding_window=5)),
    ("xla", "prefill_with_prefix", "float32", 8, 3, 80, dict(causal=False)),
    ("pallas_interpret", "mixed", "float32", 8, 1, 128, {}),
    ("pallas_interpret", "decode", "bfloat16", 16, 2, 128, dict(logits_soft_cap=3.0)),
    ("pallas_interpret", "prefill_with_prefix", "float32", 8, 3, 256,
     dict(sliding_window=11)),
    ("pallas_gpu_interpret", "mixed", "float32", 16, 2, 32, {}),
    ("pallas_gpu_interpret", "decode", "bfloat16", 32, 1, 64, dict(logits_soft_cap=3.0)),
]


@pytest.mark.parametrize("backend,grid,dtype,block_size,kv_heads,head_dim,kw", ATTENTION,
                         ids=[f"{b}-{g}-{d}-h{h}-d{hd}" for b, g, d, _, h, hd, _ in ATTENTION])
def test_paged_attention_hnd(backend, grid, dtype, block_size, kv_heads, head_dim, kw):
    rng = np.random.default_rng(11)
    b = testing.make_ragged_batch(rng, testing.seq_grid(grid, block_size),
                                  num_q_heads=2 * kv_heads, num_kv_heads=kv_heads,
                                  head_dim=head_dim, block_size=block_size, dtype=dtype,
                                  sliding_window=kw.get("sliding_window"))
    want, want_lse = ref.paged_attention_reference(*b.args(), return_lse=True, **kw)
    args = _hnd_args(b.args())
    out, lse = jf.paged_attention(*args, return_lse=True, kv_layout="HND", backend=backend,
                                  **kw)
    testing.assert_attention_close(out, want, dtype)
    testing.assert_lse_close(lse, want_lse)


def test_every_backend_reads_hnd_in_place(monkeypatch):
    """Every attention backend is handed the HND caches: the TPU and GPU kernels (interpret
    modes), the XLA backend's paged attention and cascade (its loops transpose the blocks
    each step gathers; its CPU decode kernel reads HND at its strides). A backend that reads
    NHD only (no ``kv_layouts``: the XLA one with its attribute removed, as an outside
    backend would be) gets the frontend's transposed copy of the named blocks."""
    rng = np.random.default_rng(12)
    b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 16), num_q_heads=2,
                                  num_kv_heads=1, head_dim=128, block_size=16)
    args = _hnd_args(b.args())
    sb = testing.small_shared_prefix_batch(rng, decode=False)
    copies = []
    real = _xla.nhd_blocks
    monkeypatch.setattr(_xla, "nhd_blocks", lambda *a: copies.append(1) or real(*a))
    want = ref.paged_attention_reference(*b.args())
    want_sp = ref.shared_prefix_attention_reference(*sb.args())

    def check():
        for backend in ("pallas_interpret", "pallas_gpu_interpret", "xla"):
            got = jf.paged_attention(*args, kv_layout="HND", backend=backend)
            testing.assert_attention_close(got, want, "float32")
        got = jf.shared_prefix_attention(*_hnd_args(sb.args()), kv_layout="HND",
                                         backend="xla")
        testing.assert_attention_close(got, want_sp, "float32")

    check()
    assert not copies
    monkeypatch.delattr(_backends.paged_attention_xla, "kv_layouts")
    monkeypatch.delattr(_backends.shared_prefix_attention_xla, "kv_layouts")
    check()
    assert len(copies) == 2  # the XLA backend's two calls


CASCADE_CASES = {  # (prefix blocks, seqs (prefix id, q_len, own kv_len), options)
    "one_prefix_decode": ([3], [(0, 1, 5), (0, 1, 1), (-1, 1, 9), (0, 1, 12)],
                          dict(logits_soft_cap=3.0)),
    "several_prefixes_decode": ([2, 1, 3], [(2, 1, 5), (0, 1, 3), (-1, 1, 7), (1, 1, 12)], {}),
    "long_own_kv_decode": ([2], [(0, 1, 4 * 130 + 3), (0, 1, 2), (-1, 1, 9)], {}),
    "prefill": ([2, 3], [(0, 5, 9), (1, 3, 4), (-1, 2, 2), (1, 7, 7)], {}),
}


@pytest.mark.parametrize("ffi", [True, False], ids=["cpu_kernels", "xla_only"])
@pytest.mark.parametrize("case", list(CASCADE_CASES))
def test_xla_cascade_hnd_paths(monkeypatch, case, ffi):
    """The XLA cascade over HND caches, forced to run as a cascade on the CPU: one prefix
    (single_prefix_attention), several (multi_prefix_attention), own KV read whole
    (short_decode_attention) or by the loop, prefill; with the CPU decode kernel and
    without. bf16, NaN in every slot no query may read."""
    from prefixkv.kernels.cpu import xla_ffi

    monkeypatch.setattr(_xla, "CPU_CASCADE_MIN_ROWS", 0)
    monkeypatch.setattr(_xla, "CPU_CASCADE_MIN_SCORES", 0)
    if not ffi:
        monkeypatch.setattr(xla_ffi, "use_for_attention", lambda *a: False)
    jax.clear_caches()  # the jitted op traces again under the patches
    prefix_blocks, seqs, kw = CASCADE_CASES[case]
    rng = np.random.default_rng(20)
    b = testing.make_shared_prefix_batch(rng, prefix_blocks, seqs, num_q_heads=8,
                                         num_kv_heads=2, head_dim=32, block_size=4,
                                         dtype="bfloat16")
    want, want_lse = ref.shared_prefix_attention_reference(*b.args(), return_lse=True, **kw)
    try:
        out, lse = jf.shared_prefix_attention(*_hnd_args(b.args()), return_lse=True,
                                              kv_layout="HND", backend="xla", **kw)
    finally:
        jax.clear_caches()
    testing.assert_attention_close(out, want, "bfloat16")
    testing.assert_lse_close(lse, want_lse)


@pytest.mark.parametrize("disable_ffi", [False, True], ids=["cpu_kernels", "xla_loop_only"])
@pytest.mark.parametrize("grid", ["mixed", "decode"])
def test_xla_backend_hnd_paths(monkeypatch, grid, disable_ffi):
    """The XLA backend over HND caches: the ragged loop alone (no CPU kernels) or with the
    CPU decode kernel taking a mixed batch's short sequences, bf16 with a window and a cap."""
    from prefixkv.kernels.cpu import xla_ffi

    if disable_ffi:  # traces made with the kernels must not serve this call, nor its others
        monkeypatch.setattr(xla_ffi, "available", lambda: False)
        jax.clear_caches()
    rng = np.random.default_rng(19)
    seqs = testing.seq_grid(grid, 16) + [(60, 90)]  # a chunk longer than the kernel's share
    b = testing.make_ragged_batch(rng, seqs, num_q_heads=8, num_kv_heads=2, head_dim=64,
                                  block_size=16, dtype="bfloat16", sliding_window=21,
                                  decode=False)
    kw = dict(sliding_window=21, logits_soft_cap=4.0)
    want, want_lse = ref.paged_attention_reference(*b.args(), return_lse=True, **kw)
    try:
        out, lse = jax.jit(lambda *a: jf.paged_attention(
            *a, return_lse=True, kv_layout="HND", backend="xla", **kw))(*_hnd_args(b.args()))
    finally:
        if disable_ffi:
            jax.clear_caches()
    testing.assert_attention_close(out, want, "bfloat16")
    testing.assert_lse_close(lse, want_lse)


# (grid, dtype, kv heads, options of the kernel): the GPU kernel's variants over HND rows
GPU_CASES = [
    ("decode", "bfloat16", 2, dict(num_splits=3)),           # split-KV, merged by LSE
    ("mixed", "float32", 3, dict(kv_gather=False)),          # block by block
    ("prefill_with_prefix", "float32", 2, dict(blocks_per_step=4)),  # gathered tiles
]


@pytest.mark.parametrize("grid,dtype,kv_heads,kw", GPU_CASES,
                         ids=[f"{g}-{d}-h{h}" for g, d, h, _ in GPU_CASES])
def test_gpu_kernel_hnd_variants(grid, dtype, kv_heads, kw):
    from prefixkv.kernels.pallas import paged_attention_gpu as pg

    rng = np.random.default_rng(17)
    b = testing.make_ragged_batch(rng, testing.seq_grid(grid, 16), num_q_heads=4 * kv_heads,
                                  num_kv_heads=kv_heads, head_dim=32, block_size=16,
                                  dtype=dtype, sliding_window=20)
    want, want_lse = ref.paged_attention_reference(*b.args(), scale=32 ** -0.5,
                                                   sliding_window=20, return_lse=True)
    out, lse = pg.paged_attention_gpu(*_hnd_args(b.args()), scale=32 ** -0.5,
                                      sliding_window=20, kv_layout="HND", interpret=True, **kw)
    testing.assert_attention_close(out, want, dtype)
    testing.assert_lse_close(lse, want_lse)


def test_gpu_kernel_lowers_hnd_for_cuda():
    """HND caches lower to the Triton kernel, read in place: no NHD-shaped copy of their
    blocks ([.., 16, 2, 128]) anywhere in the exported program."""
    from test_jax_pallas import _export_for_h100

    S = jax.ShapeDtypeStruct
    args = [S((4, 16, 128), "bfloat16"), S((64, 2, 16, 128), "bfloat16"),
            S((64, 2, 16, 128), "bfloat16"), S((4, 8), jnp.int32), S((4,), jnp.int32), None]
    fn = jax.jit(lambda *a: jf.paged_attention(*a, kv_layout="HND"))
    text = _export_for_h100(fn, args)
    assert "xla.gpu.triton" in text and "x16x2x128x" not in text


@pytest.mark.parametrize("grid,kv_heads,dtype,pages", [
    ("mixed", 1, "float32", 1), ("mixed", 2, "bfloat16", 3), ("decode", 1, "bfloat16", 2)])
def test_tpu_kernel_hnd_chunks(grid, kv_heads, dtype, pages):
    """Several chunks of ``pages`` blocks (the double buffer, a last chunk with blocks left
    out) read from HND caches."""
    rng = np.random.default_rng(13)
    bs = 16 if dtype == "bfloat16" else 8
    b = testing.make_ragged_batch(rng, testing.seq_grid(grid, bs), num_q_heads=4 * kv_heads,
                                  num_kv_heads=kv_heads, head_dim=128, block_size=bs,
                                  dtype=dtype)
    scale = 128 ** -0.5
    want, want_lse = ref.paged_attention_reference(*b.args(), scale=scale, return_lse=True)
    out, lse = pa.paged_attention_tpu(*_hnd_args(b.args()), scale=scale, pages=pages,
                                      kv_layout="HND",
                                      interpret=_backends.tpu_interpret_params())
    testing.assert_attention_close(out, want, dtype)
    testing.assert_lse_close(lse, want_lse)


@pytest.mark.parametrize("backend", ["xla", "pallas_interpret"])
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
def test_shared_prefix_attention_hnd(backend, decode):
    rng = np.random.default_rng(14)
    seqs = [(0, 1, 3), (-1, 1, 9), (0, 1, 8)] if decode else [(0, 5, 9), (1, 3, 4), (-1, 2, 2)]
    b = testing.make_shared_prefix_batch(rng, [2, 1], seqs, num_q_heads=4, num_kv_heads=1,
                                         head_dim=128, block_size=8)
    want = ref.shared_prefix_attention_reference(*b.args())
    got = jf.shared_prefix_attention(*_hnd_args(b.args()), kv_layout="HND", backend=backend)
    testing.assert_attention_close(got, want, "float32")
    # with a window: paged attention over prefix then own blocks, in HND too
    want = ref.shared_prefix_attention_reference(*b.args(), sliding_window=6)
    got = jf.shared_prefix_attention(*_hnd_args(b.args()), sliding_window=6, kv_layout="HND",
                                     backend=backend)
    testing.assert_attention_close(got, want, "float32")


@pytest.mark.parametrize("backend,block_size", [("pallas_interpret", 32),
                                                ("pallas_interpret", 16), ("xla", 16),
                                                ("pallas_gpu_interpret", 16)],
                         ids=["tpu-reads-fp8", "tpu-dequantized", "xla", "gpu"])
def test_fp8_hnd(backend, block_size):
    """fp8 HND caches: the TPU kernel reads the bytes when a head's block fills whole 8-bit
    tiles (block_size 32), else gets the named blocks dequantized; the XLA path reads the
    transposed bytes."""
    rng = np.random.default_rng(15)
    b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", block_size), num_q_heads=4,
                                  num_kv_heads=2, head_dim=128, block_size=block_size,
                                  dtype="bfloat16")
    kq = ref.quantize_fp8_reference(b.k_cache, 0.05)
    vq = ref.quantize_fp8_reference(b.v_cache, 0.02)
    args = (b.q, kq, vq, b.block_tables, b.kv_lens, b.cu_q_lens)
    want = ref.paged_attention_reference(*args, k_scale=0.05, v_scale=0.02)
    got = jf.paged_attention(*_hnd_args(args), k_scale=0.05, v_scale=0.02, kv_layout="HND",
                             backend=backend)
    testing.assert_attention_close(got, want, "bfloat16")
    reads = pa.tpu_reads_fp8(num_kv_heads=2, block_size=block_size, kv_layout="HND")
    assert reads == (block_size == 32)


def test_plans_take_hnd():
    rng = np.random.default_rng(16)
    b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 8), num_q_heads=4,
                                  num_kv_heads=1, head_dim=64, block_size=8)
    args = _hnd_args(b.args())
    plan = jf.plan_paged_attention(*args[3:], k_cache=args[1], num_q_heads=4,
                                   kv_layout="HND")
    np.testing.assert_array_equal(np.asarray(jax.jit(plan.run)(*args[:3])),
                                  np.asarray(jf.paged_attention(*args, kv_layout="HND")))
    testing.assert_attention_close(plan.run(*args[:3]), ref.paged_attention_reference(*b.args()),
                                   "float32")
    sb = testing.small_shared_prefix_batch(rng, decode=False)
    sargs = _hnd_args(sb.args())
    splan = jf.plan_shared_prefix_attention(*sargs[3:], k_cache=sargs[1], num_q_heads=4,
                                            kv_layout="HND")
    testing.assert_attention_close(splan.run(*sargs[:3]),
                                   ref.shared_prefix_attention_reference(*sb.args()), "float32")
    with pytest.raises(ValueError, match="num_q_heads: expected a multiple of k_cache's 2"):
        jf.plan_shared_prefix_attention(*sargs[3:], k_cache=sargs[1], num_q_heads=3,
                                        kv_layout="HND")


# ------------------------------------------------------------------------------- write_kv


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float8_e4m3fn"])
def test_write_kv_hnd_bit_exact(dtype):
    """Each row lands in its slot's token of every head; slots not written, negative slots and
    padding rows past the mapping leave the caches bit-identical (eager and donated under
    jit)."""
    rng = np.random.default_rng(17)
    num_blocks, heads, bs, d = 6, 2, 8, 32
    store = np.float32 if dtype == "float8_e4m3fn" else testing.numpy_dtype(dtype)
    kc = testing.random_values(rng, (num_blocks, bs, heads, d), "float32").astype(
        F8 if dtype == "float8_e4m3fn" else store)
    vc = testing.random_values(rng, kc.shape, "float32").astype(kc.dtype)
    key = testing.random_values(rng, (7, heads, d), "float32").astype(store)
    value = testing.random_values(rng, (7, heads, d), "float32").astype(store)
    slots = np.array([0, 13, -1, 47, 9, 30], np.int32)     # a skipped slot; row 6 is padding
    scales = dict(k_scale=0.5, v_scale=2.0) if dtype == "float8_e4m3fn" else {}
    want_k, want_v = ref.write_kv_reference(key, value, kc.copy(), vc.copy(), slots, **scales)
    got = jf.write_kv(jnp.asarray(key), jnp.asarray(value), hnd(kc), hnd(vc), slots,
                      kv_layout="HND", **scales)
    step = jax.jit(lambda *a: jf.write_kv(*a, kv_layout="HND", **scales), donate_argnums=(2, 3))
    jitted = step(jnp.asarray(key), jnp.asarray(value), hnd(kc), hnd(vc), jnp.asarray(slots))
    for k, v in (got, jitted):
        np.testing.assert_array_equal(np.asarray(k).view(np.uint8),
                                      np.asarray(hnd(want_k)).view(np.uint8))
        np.testing.assert_array_equal(np.asarray(v).view(np.uint8),
                                      np.asarray(hnd(want_v)).view(np.uint8))


def test_write_kv_hnd_on_cpu_in_place(monkeypatch):
    """On the CPU the HND write is the FFI handler's per-head row copies into the donated
    caches (no whole-cache copy: XLA:CPU's scatter converts a bf16 cache to float32 and
    back); without the handler, XLA's scatter writes the same bytes."""
    from prefixkv.kernels.cpu import xla_ffi

    if not xla_ffi.available():
        pytest.skip("CPU FFI not built")
    rng = np.random.default_rng(18)
    kc = rng.standard_normal((64, 16, 2, 128)).astype(np.float32).astype(jnp.bfloat16)
    key = rng.standard_normal((5, 2, 128)).astype(np.float32).astype(jnp.bfloat16)
    slots = np.array([3, -1, 700, 1023, 40], np.int32)
    want_k, _ = ref.write_kv_reference(key, key, kc.copy(), kc.copy(), slots)
    step = jax.jit(lambda *a: jf.write_kv(*a, kv_layout="HND"), donate_argnums=(2, 3))
    args = (jnp.asarray(key), jnp.asarray(key), hnd(kc), hnd(kc), jnp.asarray(slots))
    text = step.lower(*args).compile().as_text()
    assert "prefixkv_cpu_write_kv_hnd" in text and "bf16[64,2,16,128]{3,2,1,0} copy(" not in text
    got, _ = step(*args)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16),
                                  np.asarray(hnd(want_k)).view(np.uint16))
    monkeypatch.setattr(xla_ffi, "use_for", lambda *a: False)  # the XLA scatter
    args = (jnp.asarray(key), jnp.asarray(key), hnd(kc), hnd(kc), jnp.asarray(slots))
    got, _ = jax.jit(lambda *a: jf.write_kv(*a, kv_layout="HND"))(*args)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16),
                                  np.asarray(hnd(want_k)).view(np.uint16))


def test_write_kv_hnd_backends():
    """The TPU write_kv kernel (one DMA per token row) is NHD only: asked for HND it says why;
    unasked, the XLA scatter writes HND caches."""
    kc = jnp.zeros((2, 2, 8, 128), jnp.float32)
    key = jnp.ones((1, 2, 128), jnp.float32)
    slots = jnp.asarray([3], jnp.int32)
    with pytest.raises(jf.BackendError, match="kv_layout='HND'"):
        jf.write_kv(key, key, kc, kc, slots, kv_layout="HND", backend="pallas_interpret")
    why = jf.explain_backends("write_kv", "tpu", dtype="float32", block_shapes=((2, 8, 128),),
                              kv_layout="HND")
    assert "kv_layout='HND'" in why["pallas_tpu"] and why["xla"] == "ok"
    k, _ = jf.write_kv(key, key, kc, kc, slots, kv_layout="HND")
    assert np.asarray(k)[0, :, 3].min() == 1.0 and float(np.asarray(k).sum()) == 2 * 128


# ------------------------------------------------------------------ TPU lowering and choice


@pytest.mark.parametrize("kv_heads,dtype,decode", [(1, "bfloat16", True), (2, "bfloat16", False),
                                                   (1, "float8_e4m3fn", True)])
def test_hnd_lowers_to_the_tpu_kernel_for_few_kv_heads(kv_heads, dtype, decode):
    """1-2 kv heads per chip: HND caches lower to the Mosaic kernel (NHD ones take the XLA
    path: XLA pads their heads to 8 under its TPU tiling)."""
    S = jax.ShapeDtypeStruct
    bs = 32 if dtype == "float8_e4m3fn" else 16

    def module(layout):
        num_seqs, hq = 4, 4 * kv_heads
        cache = (32, kv_heads, bs, 128) if layout == "HND" else (32, bs, kv_heads, 128)
        args = [S((num_seqs if decode else 24, hq, 128), "bfloat16"), S(cache, dtype),
                S(cache, dtype), S((num_seqs, 8), jnp.int32), S((num_seqs,), jnp.int32),
                None if decode else S((num_seqs + 1,), jnp.int32)]
        fn = jax.jit(lambda *a: jf.paged_attention(*a, sliding_window=64, kv_layout=layout))
        return jax.export.export(fn, platforms=["tpu"])(*args).mlir_module()

    assert "tpu_custom_call" in module("HND")
    assert "tpu_custom_call" not in module("NHD")
    why = jf.explain_backends("paged_attention", "tpu", dtype="bfloat16", head_dim=128,
                              block_size=16, num_kv_heads=kv_heads, kv_layout="NHD")
    assert "kv_layout='HND'" in why["pallas_tpu"]


# ------------------------------------------------------------------------------ bad input


def test_kv_layout_checks():
    q = jnp.zeros((2, 4, 64), jnp.float32)
    kc = jnp.zeros((4, 2, 8, 64), jnp.float32)                   # HND: 2 heads of 8 tokens
    tables, lens = jnp.zeros((2, 1), jnp.int32), jnp.ones((2,), jnp.int32)
    with pytest.raises(ValueError, match="kv_layout: expected one of 'NHD', 'HND', got 'hnd'"):
        jf.paged_attention(q, kc, kc, tables, lens, kv_layout="hnd")
    with pytest.raises(ValueError, match=r"dim 1 of k_cache: kv_layout='HND'"):
        jf.paged_attention(q[:, :3], kc, kc, tables, lens, kv_layout="HND")
    with pytest.raises(ValueError, match=r"key: expected \[num_tokens, 2, 64\]"):
        jf.write_kv(jnp.zeros((1, 8, 64)), jnp.zeros((1, 8, 64)), kc, kc,
                    jnp.zeros((1,), jnp.int32), kv_layout="HND")
    with pytest.raises(ValueError, match=r"slot_mapping: expected slots < .* \(32\)"):
        jf.write_kv(jnp.zeros((1, 2, 64)), jnp.zeros((1, 2, 64)), kc, kc,
                    np.array([32], np.int32), kv_layout="HND")
    # the same arrays read as NHD: 8 kv heads, which 4 q heads do not divide
    with pytest.raises(ValueError, match="num_kv_heads=8"):
        jf.paged_attention(q, kc, kc, tables, lens)
