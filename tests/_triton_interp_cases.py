"""Triton kernels under TRITON_INTERPRET=1 on torch CPU tensors vs the numpy reference.

Not collected directly (the name does not start with test_): tests/test_triton_interp.py runs
it in a subprocess with TRITON_INTERPRET=1 set before triton is imported, so an out-of-bounds
access that kills the interpreter is reported as a failure, not fatal to the run.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    pytest.skip("run through tests/test_triton_interp.py (needs TRITON_INTERPRET=1)",
                allow_module_level=True)

import torch  # noqa: E402
from prefixkv.kernels.triton import attention as tattn  # noqa: E402
from prefixkv.kernels.triton import cache as tcache  # noqa: E402
from prefixkv.paged import reference as ref  # noqa: E402
from prefixkv.paged import testing  # noqa: E402
from prefixkv.paged.spec import ATTENTION_TOLERANCE, default_scale  # noqa: E402
from torch_convert import TORCH_DTYPE as TD  # noqa: E402
from torch_convert import N, T  # noqa: E402


def close(got, want, dtype):
    atol, rtol = ATTENTION_TOLERANCE[dtype]
    np.testing.assert_allclose(N(got), np.asarray(want).astype(np.float64), atol=atol, rtol=rtol)


CASES = [  # grid, block_size, hq, hkv, head_dim, dtype, options, num_splits
    ("decode", 8, 4, 2, 16, "float32", {}, None),
    ("decode", 4, 8, 2, 16, "bfloat16", {"logits_soft_cap": 2.0}, 2),
    ("decode", 7, 6, 2, 20, "float16", {}, 3),  # group 3, head_dim 20: padded lanes
    ("mixed", 4, 4, 1, 16, "float32", {"sliding_window": 3}, None),
    ("prefill_with_prefix", 8, 2, 2, 16, "bfloat16", {}, None),
    ("contexts", 1, 4, 2, 16, "float32", {"causal": False}, None),
    ("mixed", 16, 4, 4, 32, "float16", {"scale": 0.2, "logits_soft_cap": 1.5}, None),
    ("mixed", 8, 4, 2, 128, "float32", {}, None),  # float32 prefill tiles: 32 rows
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-bs{c[1]}-{c[5]}-s{c[7]}")
def test_paged_attention_kernel(case):
    grid, bs, hq, hkv, d, dtype, opts, splits = case
    rng = np.random.default_rng(bs * hq + d)
    b = testing.make_ragged_batch(rng, testing.seq_grid(grid, bs), num_q_heads=hq,
                                  num_kv_heads=hkv, head_dim=d, block_size=bs, dtype=dtype)
    want, want_lse = ref.paged_attention_reference(*b.args(), return_lse=True, **opts)
    q, k, v, bt, kv, cu = (T(a) for a in b.args())
    out = torch.full(q.shape, float("nan"), dtype=TD[dtype])
    lse = torch.full(q.shape[:2], float("nan"))
    tattn.paged_attention(out, lse, q, k, v, bt, kv, cu,
                          scale=opts.get("scale", default_scale(d)),
                          causal=opts.get("causal", True),
                          sliding_window=opts.get("sliding_window"),
                          logits_soft_cap=opts.get("logits_soft_cap"), num_splits=splits)
    close(out, want, dtype)
    np.testing.assert_allclose(N(lse), want_lse, atol=1e-4, rtol=1e-4)


def test_shared_prefix_kernel():
    rng = np.random.default_rng(5)
    b = testing.make_shared_prefix_batch(
        rng, [2, 0, 1], [(0, 1, 5), (2, 2, 3), (-1, 1, 4), (0, 3, 9), (1, 1, 1)],
        num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=4)
    want, want_lse = ref.shared_prefix_attention_reference(*b.args(), logits_soft_cap=3.0,
                                                           return_lse=True)
    args = [T(a) for a in b.args()]
    out = torch.full(args[0].shape, float("nan"))
    lse = torch.full(args[0].shape[:2], float("nan"))
    tattn.shared_prefix_attention(out, lse, *args, scale=default_scale(16), logits_soft_cap=3.0)
    close(out, want, "float32")
    np.testing.assert_allclose(N(lse), want_lse, atol=1e-4, rtol=1e-4)


def test_merge_kernel():
    rng = np.random.default_rng(6)
    oa, ob = rng.standard_normal((2, 4, 3, 20)).astype(np.float32)
    la, lb = rng.standard_normal((2, 4, 3)).astype(np.float32)
    la[0], lb[0], la[1] = -np.inf, -np.inf, -np.inf
    want, want_lse = ref.merge_attention_states_reference(oa, la, ob, lb)
    out, lse = torch.full((4, 3, 20), float("nan")), torch.full((4, 3), float("nan"))
    tattn.merge_attention_states(out, lse, T(oa), T(la), T(ob), T(lb))
    np.testing.assert_allclose(N(out), want, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(N(lse), want_lse, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cache_kernels_exact(dtype):
    rng = np.random.default_rng(7)
    kc, vc = (testing.random_values(rng, (5, 4, 3, 6), dtype) for _ in range(2))
    key, val = (testing.random_values(rng, (4, 3, 6), dtype) for _ in range(2))
    slots = np.array([3, -1, 19, 8], np.int32)
    want_k, want_v = ref.write_kv_reference(key, val, kc, vc, slots)
    stacked = torch.stack([T(kc), T(vc)], dim=1)  # non-contiguous K/V views
    tk, tv = stacked[:, 0], stacked[:, 1]
    tcache.write_kv(T(key), T(val), tk, tv, T(slots))
    np.testing.assert_array_equal(N(tk), want_k.astype(np.float64))
    np.testing.assert_array_equal(N(tv), want_v.astype(np.float64))

    caches = [T(want_k), T(want_v)]
    ids = np.array([4, 0, 4], np.int32)
    buf = torch.full((3, 2, 4, 3, 6), float("nan"), dtype=TD[dtype])
    tcache.gather_blocks(buf, [tk, tv], T(ids))
    np.testing.assert_array_equal(N(buf), ref.gather_blocks_reference(
        [want_k, want_v], ids).astype(np.float64))
    src, dst = np.array([1, 2, 0], np.int32), np.array([2, 3, 1], np.int32)  # chain 1->2->3
    want_c = ref.copy_blocks_reference([want_k, want_v], src, dst)
    tcache.copy_blocks([tk, tv], T(src), T(dst))
    for g, w in zip((tk, tv), want_c, strict=True):
        np.testing.assert_array_equal(N(g), w.astype(np.float64))
    new = testing.random_values(rng, (2, 2, 4, 3, 6), dtype)
    sids = np.array([4, 0], np.int32)
    want_s = ref.scatter_blocks_reference(want_c, new, sids)
    tcache.scatter_blocks(caches := [tk, tv], T(new), T(sids))
    for g, w in zip(caches, want_s, strict=True):
        np.testing.assert_array_equal(N(g), w.astype(np.float64))
