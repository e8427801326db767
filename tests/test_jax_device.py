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


def _close(got, want, dtype):
    atol, rtol = ATTENTION_TOLERANCE[dtype]
    got = np.asarray(jnp.asarray(got, jnp.float32))
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, np.asarray(want, np.float32), atol=atol, rtol=rtol)


@pytest.mark.parametrize("grid", testing.GRID_NAMES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_paged_attention_on_device(grid, dtype):
    rng = np.random.default_rng(0)
    batch = testing.make_ragged_batch(rng, testing.seq_grid(grid, 16), num_q_heads=16,
                                      num_kv_heads=4, head_dim=128, block_size=16, dtype=dtype)
    args = [None if a is None else jnp.asarray(a) for a in batch.args()]
    got = jax.jit(lambda *a: jf.paged_attention(*a, logits_soft_cap=30.0))(*args)
    _close(got, ref.paged_attention_reference(*batch.args(), logits_soft_cap=30.0), dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_paged_attention_few_long_sequences_on_device(dtype):
    """Decode over few long contexts: the GPU kernel's split-KV path (default split count)."""
    rng = np.random.default_rng(3)
    batch = testing.make_ragged_batch(rng, [(1, 3000), (1, 4100), (1, 77)], num_q_heads=16,
                                      num_kv_heads=4, head_dim=128, block_size=16,
                                      dtype=dtype, decode=True)
    args = [jnp.asarray(a) for a in batch.args()[:5]]
    got = jax.jit(lambda *a: jf.paged_attention(*a, sliding_window=2500))(*args)
    _close(got, ref.paged_attention_reference(*batch.args(), sliding_window=2500), dtype)


def test_shared_prefix_on_device():
    rng = np.random.default_rng(1)
    batch = testing.make_shared_prefix_batch(rng, [3, 1], [(0, 1, 5), (1, 1, 17), (-1, 1, 3)],
                                             num_q_heads=16, num_kv_heads=4, head_dim=128)
    got = jax.jit(jf.shared_prefix_attention)(*[None if a is None else jnp.asarray(a)
                                                for a in batch.args()])
    _close(got, ref.shared_prefix_attention_reference(*batch.args()), "float32")


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
