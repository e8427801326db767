"""HND caches ([num_blocks, num_kv_heads, block_size, head_dim], FlashInfer's other layout) in
the torch frontend: passed as their NHD views ``cache.permute(0, 2, 1, 3)`` (no copy), every op
that reads or writes tokens gives the reference's answer on the NHD values, and writes land in
the HND storage. (The CPU decode kernel reads such views at their strides:
tests/test_torch_ops.py::test_cpu_decode_kernel_takes_stacked_caches.)"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from prefixkv.paged import reference as ref  # noqa: E402
from prefixkv.paged import testing  # noqa: E402

from prefixkv import torch_frontend as tf  # noqa: E402


def T(x):
    return torch.from_numpy(np.ascontiguousarray(x))


def hnd_view(cache):
    """An NHD cache's values stored HND, given as the NHD view."""
    return T(np.swapaxes(cache, 1, 2)).permute(0, 2, 1, 3)


@pytest.mark.parametrize("grid", ["decode", "mixed", "prefill_with_prefix"])
@pytest.mark.parametrize("fp8", [False, True], ids=["f32", "fp8"])
def test_paged_attention_over_hnd_views(grid, fp8):
    rng = np.random.default_rng(41)
    b = testing.make_ragged_batch(rng, testing.seq_grid(grid, 16), num_q_heads=8,
                                  num_kv_heads=2, head_dim=64, block_size=16)
    kc, vc, scales = b.k_cache, b.v_cache, {}
    if fp8:
        kc, vc = ref.quantize_fp8_reference(kc, 0.05), ref.quantize_fp8_reference(vc, 0.02)
        scales = dict(k_scale=0.05, v_scale=0.02)
    args = (b.q, kc, vc, b.block_tables, b.kv_lens, b.cu_q_lens)
    want = ref.paged_attention_reference(*args, sliding_window=9, **scales)
    tk = (lambda c: hnd_view(c.view(np.uint8)).view(torch.float8_e4m3fn)) if fp8 else hnd_view
    k, v = tk(kc), tk(vc)
    assert not k.is_contiguous()
    got = tf.paged_attention(T(b.q), k, v, T(b.block_tables), T(b.kv_lens),
                             None if b.cu_q_lens is None else T(b.cu_q_lens), sliding_window=9,
                             **scales)
    testing.assert_attention_close(got.numpy(), want, "float32")


def test_shared_prefix_attention_over_hnd_views():
    rng = np.random.default_rng(42)
    b = testing.small_shared_prefix_batch(rng, decode=False)
    rest = [None if x is None else T(x) for x in b.args()[3:]]
    got = tf.shared_prefix_attention(T(b.q), hnd_view(b.k_cache), hnd_view(b.v_cache), *rest)
    testing.assert_attention_close(got.numpy(), ref.shared_prefix_attention_reference(*b.args()),
                                   "float32")


def test_write_kv_into_hnd_views_bit_exact():
    rng = np.random.default_rng(43)
    kc = rng.standard_normal((6, 8, 2, 32)).astype(np.float32)
    vc = rng.standard_normal(kc.shape).astype(np.float32)
    key = rng.standard_normal((4, 2, 32)).astype(np.float32)
    slots = np.array([3, -1, 40, 17], np.int64)
    want_k, want_v = ref.write_kv_reference(key, 2 * key, kc.copy(), vc.copy(), slots)
    k_hnd, v_hnd = T(np.swapaxes(kc, 1, 2)), T(np.swapaxes(vc, 1, 2))
    tf.write_kv(T(key), T(2 * key), k_hnd.permute(0, 2, 1, 3), v_hnd.permute(0, 2, 1, 3),
                T(slots))
    np.testing.assert_array_equal(np.swapaxes(k_hnd.numpy(), 1, 2), want_k)
    np.testing.assert_array_equal(np.swapaxes(v_hnd.numpy(), 1, 2), want_v)


@pytest.mark.parametrize("stacked", [False, True], ids=["hnd", "hnd_stacked"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_write_kv_many_rows_into_hnd_views(stacked, dtype, monkeypatch):
    """A prefill's rows (more than SMALL_WRITE_ROWS) into HND views, alone or the halves of a
    stacked [num_blocks, 2, heads, block_size, head_dim] cache: one index_copy_ over rows of
    one head's head_dim elements (_head_rows), bit-exact; the other half untouched."""
    from prefixkv.torch_frontend import _native

    used = []
    real = _native._head_rows
    monkeypatch.setattr(_native, "_head_rows", lambda *a: used.append(1) or real(*a))
    rng = np.random.default_rng(44)
    nb, bs, heads, d = 12, 8, 3, 16
    store = testing.numpy_dtype(dtype)
    kc = rng.standard_normal((nb, bs, heads, d)).astype(store)
    vc = rng.standard_normal(kc.shape).astype(store)
    n = 90
    key = rng.standard_normal((n, heads, d)).astype(store)
    slots = rng.permutation(nb * bs)[:n].astype(np.int64)
    slots[::7] = -1  # skipped
    want_k, want_v = ref.write_kv_reference(key, key, kc.copy(), vc.copy(), slots)

    def tt(a):
        return T(a.view(np.uint16)).view(torch.bfloat16) if dtype == "bfloat16" else T(a)

    k_hnd, v_hnd = (tt(c).permute(0, 2, 1, 3).contiguous() for c in (kc, vc))  # HND storage
    if stacked:
        both = torch.stack([k_hnd, v_hnd], dim=1)
        k_hnd, v_hnd = both[:, 0], both[:, 1]
    tf.write_kv(tt(key), tt(key), k_hnd.permute(0, 2, 1, 3), v_hnd.permute(0, 2, 1, 3),
                T(slots))
    assert used
    for got, want in ((k_hnd, want_k), (v_hnd, want_v)):
        nhd = got.permute(0, 2, 1, 3).contiguous()
        np.testing.assert_array_equal(nhd.view(torch.uint8).numpy(), want.view(np.uint8))
