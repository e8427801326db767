"""The compiled kernels on a real accelerator (TPU or GPU), against the numpy reference.
Skipped on machines without one (the CPU suite covers the same kernels in interpret mode)."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from prefixkv.paged import reference as ref  # noqa: E402
from prefixkv.paged import testing  # noqa: E402
from prefixkv.paged.spec import ATTENTION_TOLERANCE  # noqa: E402

from prefixkv import jax_frontend as jf  # noqa: E402

PLATFORM = jax.default_backend()
pytestmark = pytest.mark.skipif(PLATFORM not in ("tpu", "gpu", "cuda", "rocm"),
                                reason=f"no accelerator (default backend {PLATFORM})")


def _kernel_call() -> str | None:
    """The custom call a compiled Pallas attention kernel lowers to: Mosaic on TPU, Triton on
    CUDA (jax/_src/pallas/triton/pallas_call_registration.py); None on ROCm, where no Pallas
    backend is registered and the XLA composite runs."""
    if PLATFORM == "tpu":
        return "tpu_custom_call"
    version = str(getattr(jax.devices()[0].client, "platform_version", "")).lower()
    return None if "rocm" in version or "hip" in version else "__gpu$xla.gpu.triton"


def _run_kernel(fn, *args, kernel: bool = True):
    """fn compiled and run on args, after checking that its lowering calls the Pallas kernel
    (``kernel``) or not: a silent fallback to the XLA composite would pass every comparison."""
    lowered = jax.jit(fn).lower(*args)
    call = _kernel_call()
    if call is not None:
        assert (call in lowered.as_text()) == kernel, (
            f"{call} {'missing from' if kernel else 'in'} the lowering")
    return lowered.compile()(*args)


def _close(got, want, dtype):
    atol, rtol = ATTENTION_TOLERANCE[dtype]
    got = np.asarray(jnp.asarray(got, jnp.float32))
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, np.asarray(want, np.float32), atol=atol, rtol=rtol)


def _check_paged_attention(batch, dtype, **kw):
    """The kernel's out and lse against the reference on one batch (float16 on a TPU: the XLA
    path, which the kernel refuses)."""
    args = [None if a is None else jnp.asarray(a) for a in batch.args()]
    kernel = not (PLATFORM == "tpu" and dtype == "float16")
    got, lse = _run_kernel(lambda *a: jf.paged_attention(*a, return_lse=True, **kw), *args,
                           kernel=kernel)
    want, want_lse = ref.paged_attention_reference(*batch.args(), return_lse=True, **kw)
    _close(got, want, dtype)
    testing.assert_lse_close(np.asarray(lse), want_lse)


@pytest.mark.parametrize("grid", testing.GRID_NAMES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_paged_attention_on_device(grid, dtype):
    rng = np.random.default_rng(0)
    batch = testing.make_ragged_batch(rng, testing.seq_grid(grid, 16), num_q_heads=32,
                                      num_kv_heads=8, head_dim=128, block_size=16, dtype=dtype)
    _check_paged_attention(batch, dtype, logits_soft_cap=30.0)


#: (dtype, block_size) beyond the grid above: float16, and bfloat16 in 64-token blocks
DTYPE_BLOCK_CASES = [("float16", 16), ("bfloat16", 64)]


@pytest.mark.parametrize("grid", ["decode", "mixed"])
@pytest.mark.parametrize("dtype,block_size", DTYPE_BLOCK_CASES,
                         ids=[f"{d}-b{b}" for d, b in DTYPE_BLOCK_CASES])
def test_paged_attention_dtypes_and_block_sizes_on_device(dtype, block_size, grid):
    rng = np.random.default_rng(4)
    batch = testing.make_ragged_batch(rng, testing.seq_grid(grid, block_size), num_q_heads=32,
                                      num_kv_heads=8, head_dim=128, block_size=block_size,
                                      dtype=dtype, sliding_window=2 * block_size + 3)
    _check_paged_attention(batch, dtype, sliding_window=2 * block_size + 3)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_paged_attention_few_long_sequences_on_device(dtype):
    """Decode over few long contexts: the GPU kernel's split-KV path (default split count)."""
    rng = np.random.default_rng(3)
    batch = testing.make_ragged_batch(rng, [(1, 3000), (1, 4100), (1, 77)], num_q_heads=32,
                                      num_kv_heads=8, head_dim=128, block_size=16,
                                      dtype=dtype, decode=True, sliding_window=2500)
    _check_paged_attention(batch, dtype, sliding_window=2500)


def test_shared_prefix_on_device():
    rng = np.random.default_rng(1)
    batch = testing.make_shared_prefix_batch(rng, [3, 1], [(0, 1, 5), (1, 1, 17), (-1, 1, 3)],
                                             num_q_heads=32, num_kv_heads=8, head_dim=128)
    got = _run_kernel(jf.shared_prefix_attention,
                      *[None if a is None else jnp.asarray(a) for a in batch.args()])
    _close(got, ref.shared_prefix_attention_reference(*batch.args()), "float32")


@pytest.mark.parametrize("decode", [True, False])
def test_shared_prefix_long_prefix_on_device(decode):
    """Few queries over a 4096-token prefix: on a GPU the prefix launch splits its KV."""
    rng = np.random.default_rng(2)
    seqs = [(0, 1, 5), (-1, 1, 4), (1, 1, 30), (0, 1, 17)] if decode else \
        [(0, 3, 5), (-1, 2, 4), (1, 1, 30), (0, 5, 17)]
    batch = testing.make_shared_prefix_batch(rng, [256, 2], seqs, num_q_heads=32,
                                             num_kv_heads=8, head_dim=128, block_size=16,
                                             dtype="bfloat16", decode=decode)
    got = _run_kernel(jf.shared_prefix_attention,
                      *[None if a is None else jnp.asarray(a) for a in batch.args()])
    _close(got, ref.shared_prefix_attention_reference(*batch.args()), "bfloat16")


@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("grid", ["decode", "mixed"])
def test_hnd_caches_on_device(grid, kv_heads):
    """kv_layout="HND" with the 1-2 kv heads of a tensor-parallel chip: the Mosaic kernel reads
    them on a TPU (whose tiling pads NHD heads); a GPU gets the named blocks transposed for its
    kernel. write_kv into HND caches exact."""
    rng = np.random.default_rng(6)
    b = testing.make_ragged_batch(rng, testing.seq_grid(grid, 16), num_q_heads=8 * kv_heads,
                                  num_kv_heads=kv_heads, head_dim=128, block_size=16,
                                  dtype="bfloat16")
    swap = lambda c: jnp.asarray(np.ascontiguousarray(np.swapaxes(c, 1, 2)))  # noqa: E731
    q, kc, vc = jnp.asarray(b.q), swap(b.k_cache), swap(b.v_cache)
    rest = [None if a is None else jnp.asarray(a) for a in b.args()[3:]]
    got, lse = _run_kernel(lambda *a: jf.paged_attention(*a, return_lse=True, kv_layout="HND"),
                           q, kc, vc, *rest)
    want, want_lse = ref.paged_attention_reference(*b.args(), return_lse=True)
    _close(got, want, "bfloat16")
    testing.assert_lse_close(np.asarray(lse), want_lse)
    key = testing.random_values(rng, (3, kv_heads, 128), "bfloat16")
    slots = np.array([5, -1, 40], np.int32)
    nk, _ = jax.jit(lambda *a: jf.write_kv(*a, kv_layout="HND"))(
        jnp.asarray(key), jnp.asarray(key), kc, vc, jnp.asarray(slots))
    want_k, _ = ref.write_kv_reference(key, key, b.k_cache, b.v_cache, slots)
    np.testing.assert_array_equal(np.asarray(nk).view(np.uint16),
                                  np.asarray(swap(want_k)).view(np.uint16))


def test_cache_ops_on_device_exact_and_in_place():
    rng = np.random.default_rng(2)
    kc, vc = (testing.random_values(rng, (32, 16, 4, 128), "bfloat16") for _ in range(2))
    key = testing.random_values(rng, (5, 4, 128), "bfloat16")
    slots = np.array([3, -1, 100, 511, 17], np.int32)
    want_k, want_v = ref.write_kv_reference(key, key, kc, vc, slots)
    dk, dv = jnp.asarray(kc), jnp.asarray(vc)
    ptr = dk.unsafe_buffer_pointer()
    step = jax.jit(lambda k, v, x, s: jf.write_kv(x, x, k, v, s), donate_argnums=(0, 1))
    nk, nv = step(dk, dv, jnp.asarray(key), jnp.asarray(slots))
    assert nk.unsafe_buffer_pointer() == ptr
    np.testing.assert_array_equal(np.asarray(nk).view(np.uint16), want_k.view(np.uint16))
    np.testing.assert_array_equal(np.asarray(nv).view(np.uint16), want_v.view(np.uint16))
    src, dst = np.array([1, 2, 7], np.int32), np.array([2, 9, 1], np.int32)
    got = jax.jit(jf.copy_blocks)([nk, nv], src, dst)
    for g, w in zip(got, ref.copy_blocks_reference([want_k, want_v], src, dst),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(g).view(np.uint16), w.view(np.uint16))
    ids = np.array([4, 0, 4], np.int32)
    buf = jax.jit(jf.gather_blocks)(got, ids)
    want_buf = ref.gather_blocks_reference([np.asarray(g) for g in got], ids)
    np.testing.assert_array_equal(np.asarray(buf).view(np.uint16), want_buf.view(np.uint16))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_chunked_prefill_over_long_contexts_on_device(dtype):
    """Prefill and decode over contexts of thousands of tokens in one call: on a TPU the
    kernel's chunk loop runs several double-buffered chunks per tile (16-token tiles here:
    tokens x G x kv heads within 512 rows)."""
    rng = np.random.default_rng(5)
    batch = testing.make_ragged_batch(rng, [(40, 2100), (1, 1500), (130, 130), (300, 1900)],
                                      num_q_heads=32, num_kv_heads=8, head_dim=128,
                                      block_size=16, dtype=dtype)
    _check_paged_attention(batch, dtype)


def test_many_rows_written_and_blocks_moved_on_device():
    """write_kv of a prefill's 100 rows and gathers/scatters of 21 blocks (on a TPU: several
    grid steps of several DMAs each), bit-exact."""
    rng = np.random.default_rng(6)
    kc, vc = (testing.random_values(rng, (64, 16, 4, 128), "bfloat16") for _ in range(2))
    key, value = (testing.random_values(rng, (100, 4, 128), "bfloat16") for _ in range(2))
    slots = rng.permutation(64 * 16)[:100].astype(np.int32)
    slots[7] = -1
    want = ref.write_kv_reference(key, value, kc, vc, slots)
    got = jax.jit(jf.write_kv)(key, value, kc, vc, slots)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g).view(np.uint16), w.view(np.uint16))
    ids = rng.permutation(64)[:21].astype(np.int32)
    buf = jax.jit(jf.gather_blocks)(list(want), ids)
    want_buf = ref.gather_blocks_reference(list(want), ids)
    np.testing.assert_array_equal(np.asarray(buf).view(np.uint16), want_buf.view(np.uint16))
    dst = rng.permutation(64)[:21].astype(np.int32)
    got = jax.jit(jf.scatter_blocks)([kc, vc], buf, dst)
    for g, w in zip(got, ref.scatter_blocks_reference([kc, vc], want_buf, dst), strict=True):
        np.testing.assert_array_equal(np.asarray(g).view(np.uint16), w.view(np.uint16))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_paged_attention_large_group_on_device(dtype):
    """32 q heads per kv head: on a GPU, float32 runs each group as two programs of 16 heads
    (Pallas GPU register budget); on a TPU, prefill tiles shrink to 2 tokens (64 rows)."""
    rng = np.random.default_rng(5)
    batch = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 16), num_q_heads=256,
                                      num_kv_heads=8, head_dim=128, block_size=16, dtype=dtype)
    _check_paged_attention(batch, dtype, logits_soft_cap=30.0)


def _fp8(x, scale):
    return ref.quantize_fp8_reference(x, scale)


@pytest.mark.parametrize("grid", ["decode", "mixed"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_fp8_caches_on_device(grid, dtype):
    """float8_e4m3fn caches on the device: write_kv bit-exact with traced scales, and
    paged_attention reading the fp8 bytes (on a GPU the Pallas kernel, with the scales as
    operands: its lowering calls the kernel) against the reference."""
    rng = np.random.default_rng(11)
    batch = testing.make_ragged_batch(rng, testing.seq_grid(grid, 16), num_q_heads=32,
                                      num_kv_heads=8, head_dim=128, block_size=16, dtype=dtype)
    kq, vq = _fp8(batch.k_cache, 0.02), _fp8(batch.v_cache, 0.05)
    key, value = (testing.random_values(rng, (7, 8, 128), dtype, 3.0) for _ in range(2))
    slots = rng.permutation(kq.shape[0] * 16)[:7].astype(np.int32)
    slots[2] = -1
    want_k, want_v = ref.write_kv_reference(key, value, kq, vq, slots, k_scale=0.02,
                                            v_scale=0.05)
    got_k, got_v = jax.jit(lambda x, y, k, v, s, ks, vs: jf.write_kv(x, y, k, v, s, k_scale=ks,
                                                                      v_scale=vs))(
        jnp.asarray(key), jnp.asarray(value), jnp.asarray(kq), jnp.asarray(vq),
        jnp.asarray(slots), np.float32(0.02), np.float32([0.05]))
    np.testing.assert_array_equal(np.asarray(got_k).view(np.uint8), want_k.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(got_v).view(np.uint8), want_v.view(np.uint8))
    rest = [None if a is None else jnp.asarray(a) for a in batch.args()[3:]]
    want, want_lse = ref.paged_attention_reference(batch.q, kq, vq, *batch.args()[3:],
                                                   k_scale=0.02, v_scale=0.05,
                                                   return_lse=True)

    def step(q, k, v, *tables):
        return jf.paged_attention(q, k, v, *tables, k_scale=jnp.float32(0.02),
                                  v_scale=jnp.float32(0.05), return_lse=True)

    args = (jnp.asarray(batch.q), jnp.asarray(kq), jnp.asarray(vq), *rest)
    if PLATFORM == "tpu":  # which TPU shapes run the kernel is the CPU suite's concern
        got, lse = jax.jit(step)(*args)
    else:
        got, lse = _run_kernel(step, *args)
    _close(got, want, dtype)
    testing.assert_lse_close(np.asarray(lse), want_lse)
