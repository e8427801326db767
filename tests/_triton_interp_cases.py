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
    # float32 groups past 32 q heads: slices of 17 + 16 heads (the last one short), 2 x 20
    # (with split-KV)
    ("mixed", 8, 66, 2, 16, "float32", {"logits_soft_cap": 2.0}, None),
    ("decode", 4, 40, 1, 16, "float32", {"sliding_window": 6}, 2),
    # large caps: the logits are s / cap near 0, where 1 - 2 / (exp(2x) + 1) cancels (a cap
    # of 1e4 had put out 6.5e-4 off the float32 tolerance)
    ("decode", 8, 4, 2, 16, "float32", {"logits_soft_cap": 1e4}, None),
    ("mixed", 8, 4, 2, 16, "float32", {"logits_soft_cap": 3e3}, 2),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-bs{c[1]}-{c[5]}-s{c[7]}")
def test_paged_attention_kernel(case, full_tiles):
    grid, bs, hq, hkv, d, dtype, opts, splits = case
    rng = np.random.default_rng(bs * hq + d)
    b = testing.make_ragged_batch(rng, testing.seq_grid(grid, bs), num_q_heads=hq,
                                  num_kv_heads=hkv, head_dim=d, block_size=bs, dtype=dtype,
                                  sliding_window=opts.get("sliding_window"))
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


FULL_TILE_SEQS = [(1, 70), (5, 90), (17, 40), (0, 0), (1, 1), (33, 33), (16, 48), (2, 16)]


@pytest.mark.parametrize("opts,splits", [
    ({}, None), ({}, 3), ({"causal": False}, None), ({"logits_soft_cap": 2.0}, 2),
    ({"sliding_window": 21}, None)], ids=["causal", "split", "noncausal", "cap", "window"])
@pytest.mark.parametrize("head_dim", [16, 20])
def test_full_tiles_over_long_contexts(opts, splits, head_dim, full_tiles):
    """Contexts of 0-90 keys in steps of 16 (with full_tiles: whole unmasked steps, then a
    masked rest that may be empty), queries from 1 to 33 a sequence (a tile of 4 tokens x 4
    q heads: causal limits that differ by row), head_dim 20 in 32 lanes (the unmasked loads
    keep the padded lanes masked), split-KV, a window (no unmasked step); NaN in the cache's
    unused slots."""
    rng = np.random.default_rng(head_dim + len(opts))
    dtype = "float32" if head_dim == 16 else "float16"
    decode = splits is not None  # split-KV: decode launches
    seqs = [(1, kv) for _, kv in FULL_TILE_SEQS if kv] if decode else FULL_TILE_SEQS
    b = testing.make_ragged_batch(rng, seqs, num_q_heads=8, num_kv_heads=2, head_dim=head_dim,
                                  block_size=8, dtype=dtype, decode=decode,
                                  sliding_window=opts.get("sliding_window"))
    want, want_lse = ref.paged_attention_reference(*b.args(), return_lse=True, **opts)
    q, k, v, bt, kv, cu = (T(a) for a in b.args())
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    lse = torch.full(q.shape[:2], float("nan"))
    tattn.paged_attention(out, lse, q, k, v, bt, kv, cu, scale=default_scale(head_dim),
                          causal=opts.get("causal", True),
                          sliding_window=opts.get("sliding_window"),
                          logits_soft_cap=opts.get("logits_soft_cap"), num_splits=splits)
    close(out, want, dtype)
    np.testing.assert_allclose(N(lse), want_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("splits", [None, 3])
def test_full_tiles_equal_the_masked_loop(splits, monkeypatch):
    """At the same steps of 16 keys, the key loop with FULL_TILES gives the shipped loop's
    out and lse bit for bit (the unmasked steps drop only masks that select every key):
    long causal contexts, GQA padding rows (3 q heads per kv head in 4 rows), sinks."""
    config = tattn.attention_config
    monkeypatch.setattr(tattn, "attention_config",
                        lambda *a, **k: dict(config(*a, **k), BLOCK_N=16))
    rng = np.random.default_rng(8)
    seqs = [(1, kv) for _, kv in FULL_TILE_SEQS if kv] if splits else FULL_TILE_SEQS
    b = testing.make_ragged_batch(rng, seqs, num_q_heads=6, num_kv_heads=2, head_dim=16,
                                  block_size=8, decode=bool(splits))
    q, k, v, bt, kv, cu = (T(a) for a in b.args())
    sinks = torch.tensor([0.5, -1.0, float("-inf"), 2.0, 0.0, -3.0])
    got = []
    for full in (False, True):
        monkeypatch.setattr(tattn, "FULL_TILES", full)
        out = torch.full(q.shape, float("nan"))
        lse = torch.full(q.shape[:2], float("nan"))
        tattn.paged_attention(out, lse, q, k, v, bt, kv, cu, scale=0.25, causal=True,
                              sliding_window=None, logits_soft_cap=None, num_splits=splits,
                              sinks=sinks)
        got.append((out, lse))
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])
    assert not torch.isnan(got[0][0]).any()


def test_shared_prefix_kernel(full_tiles):
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
    la[2, 0], lb[3] = np.inf, np.inf  # FlashAttention-2's empty rows: empty states too
    want, want_lse = ref.merge_attention_states_reference(oa, la, ob, lb)
    out, lse = torch.full((4, 3, 20), float("nan")), torch.full((4, 3), float("nan"))
    tattn.merge_attention_states(out, lse, T(oa), T(la), T(ob), T(lb))
    np.testing.assert_allclose(N(out), want, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(N(out)[3], oa[3], atol=1e-6)
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
    # heads split over programs (4 of 6 heads of 512 per program), a partial last chunk
    assert tcache.write_kv_heads_per_program(6, 512) == 4
    wide_k, wide_v = (testing.random_values(rng, (3, 2, 6, 512), dtype) for _ in range(2))
    wkey, wval = (testing.random_values(rng, (2, 6, 512), dtype) for _ in range(2))
    wslots = np.array([5, 0], np.int32)
    want_wk, want_wv = ref.write_kv_reference(wkey, wval, wide_k, wide_v, wslots)
    twk, twv = T(wide_k), T(wide_v)
    tcache.write_kv(T(wkey), T(wval), twk, twv, T(wslots))
    np.testing.assert_array_equal(N(twk), want_wk.astype(np.float64))
    np.testing.assert_array_equal(N(twv), want_wv.astype(np.float64))
    none = T(np.zeros(0, np.int32))  # empty id lists: nothing to do, no error
    tcache.gather_blocks(torch.empty((0, 2, 4, 3, 6), dtype=TD[dtype]), [tk, tv], none)
    tcache.scatter_blocks([tk, tv], torch.empty((0, 2, 4, 3, 6), dtype=TD[dtype]), none)
    tcache.copy_blocks([tk, tv], none, none)
    for g, w in zip(caches, want_s, strict=True):
        np.testing.assert_array_equal(N(g), w.astype(np.float64))


# ------------------------------------------------- workspace: a call that allocates nothing


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every aten op that makes a new tensor: neither in-place/out= (its schema
    mutates an argument) nor a view. Kernel launches are not recorded: compiled, they do not
    dispatch; the interpreter copies their arguments through torch ops of its own."""

    def __init__(self):
        super().__init__()
        self.fresh = []
        self.ops = set()  # every op called outside the kernels, e.g. "aten.index_select"
        self.in_kernel = 0

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction
        run = InterpretedFunction.run
        mode = self

        def quiet_run(fn, *args, **kwargs):
            mode.in_kernel += 1
            try:
                return run(fn, *args, **kwargs)
            finally:
                mode.in_kernel -= 1

        self._restore = (InterpretedFunction, run)
        InterpretedFunction.run = quiet_run
        return super().__enter__()

    def __exit__(self, *exc):
        cls, run = self._restore
        cls.run = run
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.in_kernel:
            self.ops.add(str(func.overloadpacket))
            if not func._schema.is_mutable and not func.is_view:
                self.fresh.append(str(func))
        return func(*args, **(kwargs or {}))


#: Torch ops the workspace paths may call: on an H200 (torch 2.11) each ran with out= or in
#: place into preallocated tensors with no allocation by the caching allocator.
CUDA_NO_SCRATCH_OPS = {"aten.slice", "aten.view", "aten.detach", "aten.select", "aten.zero_",
                       "aten.fill_", "aten.arange", "aten.index_select", "aten.index_copy_"}


def _workspace(nbytes):
    return torch.full((nbytes,), 0xAB, dtype=torch.uint8)  # garbage: nothing may rely on zeros


@pytest.mark.parametrize("with_lse", [True, False])
def test_paged_attention_workspace_allocates_nothing(with_lse):
    rng = np.random.default_rng(21)
    b = testing.make_ragged_batch(rng, testing.seq_grid("decode", 4), num_q_heads=8,
                                  num_kv_heads=2, head_dim=16, block_size=4, dtype="float32")
    want, want_lse = ref.paged_attention_reference(*b.args(), return_lse=True)
    q, k, v, bt, kv, cu = (T(a) for a in b.args())
    nbytes = tattn.paged_attention_workspace_bytes(q, k, bt, cu)
    out = torch.full(q.shape, float("nan"))
    lse = torch.full(q.shape[:2], float("nan")) if with_lse else None
    # 3 splits: partials in the workspace too (the default split count comes from sm_count)
    plan = tattn._split_plan(q, 3) + tattn._lse_plan(q, True)
    ws = _workspace(tattn._plan_bytes(plan))
    assert nbytes <= ws.numel()
    with _Allocations() as seen:
        tattn.paged_attention(out, lse, q, k, v, bt, kv, cu, scale=default_scale(16),
                              causal=True, sliding_window=None, logits_soft_cap=None,
                              num_splits=3, workspace=ws)
    assert seen.fresh == []
    close(out, want, "float32")
    if with_lse:
        np.testing.assert_allclose(N(lse), want_lse, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="workspace: paged_attention needs"):
        tattn.paged_attention(out, lse, q, k, v, bt, kv, cu, scale=1.0, causal=True,
                              sliding_window=None, logits_soft_cap=None, num_splits=3,
                              workspace=ws[:256])


@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_shared_prefix_workspace_allocates_nothing(decode, ids_dtype):
    rng = np.random.default_rng(22)
    seqs = [(0, 1, 5), (2, 1, 3), (-1, 1, 4), (0, 1, 9), (1, 1, 1)] if decode else \
        [(0, 1, 5), (2, 2, 3), (-1, 1, 4), (0, 3, 9), (1, 1, 1)]
    b = testing.make_shared_prefix_batch(rng, [2, 0, 1], seqs, num_q_heads=4, num_kv_heads=2,
                                         head_dim=16, block_size=4, decode=decode)
    want, want_lse = ref.shared_prefix_attention_reference(*b.args(), return_lse=True)
    args = [T(a) for a in b.args()]
    args[5] = args[5].to(ids_dtype)  # prefix_ids
    q, k, pbt, bt, cu = args[0], args[1], args[3], args[6], args[8]
    assert (cu is None) == decode
    ws = _workspace(tattn.shared_prefix_attention_workspace_bytes(q, k, pbt, bt, cu))
    out = torch.full(q.shape, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"))
    with _Allocations() as seen:
        tattn.shared_prefix_attention(out, lse, *args, scale=default_scale(16),
                                      logits_soft_cap=None, workspace=ws)
    assert seen.fresh == []
    # out= is not enough on CUDA: on an H200, torch.sort(out=) allocated scratch every call
    # (the cascade once sorted its tokens by prefix); these ops allocated nothing there
    assert seen.ops <= CUDA_NO_SCRATCH_OPS, seen.ops - CUDA_NO_SCRATCH_OPS
    close(out, want, "float32")
    np.testing.assert_allclose(N(lse), want_lse, atol=1e-4, rtol=1e-4)
    out2 = torch.full(q.shape, float("nan"))
    tattn.shared_prefix_attention(out2, None, *args, scale=default_scale(16),
                                  logits_soft_cap=None, workspace=ws)  # lse from the workspace
    assert torch.equal(out2, out)
    with pytest.raises(ValueError, match="workspace: shared_prefix_attention needs"):
        tattn.shared_prefix_attention(out, lse, *args, scale=1.0, logits_soft_cap=None,
                                      workspace=ws[:256])


@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize("with_workspace", [True, False])
def test_shared_prefix_split_prefix_pass(decode, with_workspace, full_tiles):
    """Few query tokens over a long prefix (3072 tokens) split the prefix launch's KV (as 64
    decode queries over a 32768-token prefix do on a GPU): its partials merged by LSE. Tokens
    with no prefix are in no tile of that launch: their partial rows stay unwritten (garbage
    workspace) and must come out as "nothing seen"; a 1-block prefix sits beside the long
    one."""
    rng = np.random.default_rng(23)
    seqs = [(0, 1, 5), (-1, 1, 4), (1, 1, 3), (0, 1, 17)] if decode else \
        [(0, 3, 5), (-1, 2, 4), (1, 1, 3), (0, 2, 17)]
    b = testing.make_shared_prefix_batch(rng, [192, 1], seqs, num_q_heads=4, num_kv_heads=2,
                                         head_dim=16, block_size=16, decode=decode)
    want, want_lse = ref.shared_prefix_attention_reference(*b.args(), logits_soft_cap=2.0,
                                                           return_lse=True)
    args = [T(a) for a in b.args()]
    q, k, pbt, bt, cu = args[0], args[1], args[3], args[6], args[8]
    splits = tattn._prefix_splits(q, k, pbt)
    assert splits == 3  # 3072 keys: 1024 keys a split at least
    ws = None
    if with_workspace:
        ws = _workspace(tattn.shared_prefix_attention_workspace_bytes(q, k, pbt, bt, cu))
        need = tattn._plan_bytes(tattn._shared_plan(q, k, pbt, bt, cu, with_lse=False))
        assert ws.numel() >= need and any(name == "pre_part_o" for name, _, _ in
                                          tattn._shared_plan(q, k, pbt, bt, cu, with_lse=False))
    out = torch.full(q.shape, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"))
    tattn.shared_prefix_attention(out, lse, *args, scale=default_scale(16), logits_soft_cap=2.0,
                                  workspace=ws)
    close(out, want, "float32")
    np.testing.assert_allclose(N(lse), want_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("decode", [True, False])
def test_cascade_order_kernel(decode):
    """The cascade's token grouping against numpy's stable argsort: 300 sequences (two steps of
    CASCADE_BLOCK_S), ragged and empty ones, ids -1 and out of range (7, -3: no prefix, last);
    then cu_q_lens past q's tokens or negative (unchecked on a device): every store inside
    the order, and every value stored a token of q (the order indexes q and the states)."""
    rng = np.random.default_rng(31)
    num_seqs, num_prefixes = 300, 5
    ids = rng.integers(-1, num_prefixes, num_seqs).astype(np.int32)
    ids[[3, 50]] = 7, -3
    lens = np.ones(num_seqs, np.int64) if decode else rng.integers(0, 4, num_seqs)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    num_tokens = int(cu[-1])
    key = np.where((ids >= 0) & (ids < num_prefixes), ids, num_prefixes)
    want = np.argsort(np.repeat(key, lens), kind="stable")
    want_cu_p = [int(lens[key < p].sum()) for p in range(num_prefixes + 1)]
    order = torch.full((num_tokens,), -1, dtype=torch.int64)
    cu_p = torch.full((num_prefixes + 1,), -1, dtype=torch.int32)
    ids_t, cu_t = torch.from_numpy(ids), torch.from_numpy(cu)
    tattn._cascade_order_kernel[(num_seqs + num_prefixes + 1,)](
        ids_t, ids_t if decode else cu_t, order, cu_p, num_seqs, num_prefixes, num_tokens,
        DECODE=decode, BLOCK_S=tattn.CASCADE_BLOCK_S, BLOCK_T=tattn.CASCADE_BLOCK_T)
    np.testing.assert_array_equal(N(order), want)
    assert N(cu_p).tolist() == want_cu_p
    if not decode:  # the sequences claim more tokens than q has: no store past the order,
        n = num_tokens // 2  # and cu_p capped at the tokens there are
        assert max(want_cu_p) > n
        short = torch.full((n,), -1, dtype=torch.int64)
        tattn._cascade_order_kernel[(num_seqs + num_prefixes + 1,)](
            ids_t, cu_t, short, cu_p, num_seqs, num_prefixes, n, DECODE=False,
            BLOCK_S=tattn.CASCADE_BLOCK_S, BLOCK_T=tattn.CASCADE_BLOCK_T)
        # tokens past q are not stored (the launcher's identity stays there)
        np.testing.assert_array_equal(N(short), np.where(want[:n] < n, want[:n], -1))
        assert N(cu_p).tolist() == [min(c, n) for c in want_cu_p]
        # negative, decreasing and huge offsets (int32 extremes: no wrap, no 2**31-token loop)
        bad = cu.copy()
        bad[[0, 7, 8, 100, -1]] = -5, 2**31 - 1, -2**31, 3, 2**31 - 1
        order = torch.full((num_tokens,), -1, dtype=torch.int64)
        tattn._cascade_order_kernel[(num_seqs + num_prefixes + 1,)](
            ids_t, torch.from_numpy(bad), order, cu_p, num_seqs, num_prefixes, num_tokens,
            DECODE=False, BLOCK_S=tattn.CASCADE_BLOCK_S, BLOCK_T=tattn.CASCADE_BLOCK_T)
        got = N(order)
        assert ((got == -1) | ((got >= 0) & (got < num_tokens))).all(), got.min()
        assert (N(cu_p) >= 0).all() and (N(cu_p) <= num_tokens).all()


@pytest.mark.parametrize("splits", [None, 3])
def test_kernels_stay_inside_their_buffers_whatever_the_metadata(splits, full_tiles):
    """On a device the frontends check index values only on request (a check is a host
    sync), so the kernels must keep every access inside its buffers whatever the metadata
    holds: block ids of 10**9 and negative, kv_lens past the table, cu_q_lens past the
    tokens, slots and block ids past the cache. Without the bounds the interpreter reads or
    writes far outside (the process dies). The results are unspecified; the rows, blocks and
    slots that were valid come out as the reference says."""
    rng = np.random.default_rng(21)
    b = testing.make_ragged_batch(rng, [(1, 9), (1, 5), (1, 12)], num_q_heads=4,
                                  num_kv_heads=2, head_dim=16, block_size=4, nan_fill=False)
    q, k, v, bt, kv, _ = (T(a) for a in b.args())
    want = ref.paged_attention_reference(*b.args()[:5])
    bt = bt.clone()
    bt[1, 0], bt[1, 1] = 10**9, -(10**9)        # sequence 1: ids outside the cache
    kv = kv.clone()
    kv[2] = 1000                                # sequence 2: keys past its 3-block table
    out = torch.zeros(q.shape)
    lse = torch.zeros(q.shape[:2])
    tattn.paged_attention(out, lse, q, k, v, bt, kv, None, scale=0.25, causal=True,
                          sliding_window=None, logits_soft_cap=None, num_splits=splits)
    close(out[:1], want[:1], "float32")         # sequence 0 untouched by the others
    cu = torch.tensor([0, 2, 10**6, 3], dtype=torch.int32)  # a token range past q
    out = torch.zeros(q.shape)
    tattn.paged_attention(out, lse, q, k, v, T(b.block_tables), T(b.kv_lens), cu, scale=0.25,
                          causal=True, sliding_window=None, logits_soft_cap=None)
    # offsets at the int32 limits (a common garbage value): out and lse are views at the
    # front of larger buffers, whose tails must come back unwritten (a start of -2**31 once
    # wrapped tile * BLOCK_Q negative and stored rows past out, and read past q)
    nt = q.shape[0]
    for bad in ([-2**31, 0, 2, nt], [-2**31 + 7, 0, 2, nt], [0, 2, 2**31 - 1, nt]):
        qbig = torch.zeros((nt + 64, *q.shape[1:]))
        qbig[:nt] = q
        obig = torch.full((nt + 64, *q.shape[1:]), 7.0)
        lbig = torch.full((nt + 64, q.shape[1]), 7.0)
        tattn.paged_attention(obig[:nt], lbig[:nt], qbig[:nt], k, v, T(b.block_tables),
                              T(b.kv_lens), torch.tensor(bad, dtype=torch.int32), scale=0.25,
                              causal=True, sliding_window=None, logits_soft_cap=None,
                              num_splits=splits)
        assert bool((obig[nt:] == 7.0).all()) and bool((lbig[nt:] == 7.0).all()), bad
    empty = torch.zeros((3, 0), dtype=torch.int32)  # no table column: no key anywhere
    out = torch.full(q.shape, float("nan"))
    tattn.paged_attention(out, lse, q, k, v, empty, kv, None, scale=0.25, causal=True,
                          sliding_window=None, logits_soft_cap=None, num_splits=splits)
    assert torch.equal(out, torch.zeros(q.shape)) and bool((lse == float("-inf")).all())
    kc, vc = T(b.k_cache).clone(), T(b.v_cache).clone()
    num_slots = kc.shape[0] * kc.shape[1]
    before = kc.clone()
    rows = torch.ones((3,) + tuple(kc.shape[2:]))
    tcache.write_kv(rows, rows, kc, vc, torch.tensor([num_slots, 10**9, 0], dtype=torch.int32))
    assert torch.equal(kc[1:], before[1:]) and torch.equal(kc[0, 1:], before[0, 1:])
    assert torch.equal(kc[0, 0], rows[2])       # the one valid slot
    buf = torch.zeros((2, 2) + tuple(kc.shape[1:]))
    ids = torch.tensor([10**9, -5], dtype=torch.int32)
    tcache.gather_blocks(buf, [kc, vc], ids)    # reads stay inside the cache
    tcache.scatter_blocks([kc, vc], buf, ids)   # stores outside it are skipped
    tcache.copy_blocks([kc, vc], ids, ids)
    assert torch.equal(kc[1:], before[1:])


# ---------------------------------------------------- layouts, tiles and bounds of the kernels


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_cache_kernels_blocks_past_one_chunk(ids_dtype):
    """Blocks of 5120 elements (a real block, 16 tokens x 8 heads x 128, has 16384): gather,
    scatter and copy_blocks run two chunks of a block (4096 + 1024 elements) per program.
    int64 ids (torch's default) as they come; with them a destination past 2**32, unchecked
    as on a device, is skipped, never narrowed onto block 4 / 2."""
    rng = np.random.default_rng(11)
    shape = (6, 4, 2, 640)
    kc, vc = (T(testing.random_values(rng, shape, "float32")) for _ in range(2))
    assert kc[0].numel() > 4096
    ids = T(np.array([5, 0, 3], np.int32)).to(ids_dtype)
    buf = torch.full((3, 2, *shape[1:]), float("nan"))
    tcache.gather_blocks(buf, [kc, vc], ids)
    np.testing.assert_array_equal(N(buf), ref.gather_blocks_reference([kc.numpy(), vc.numpy()],
                                                                ids.numpy()))
    wide = ids_dtype == torch.int64
    new = T(testing.random_values(rng, (2, 2, *shape[1:]), "float32"))
    sids = torch.tensor([1, 2**32 + 4 if wide else 4], dtype=ids_dtype)
    live = slice(0, 1) if wide else slice(0, 2)
    want = ref.scatter_blocks_reference([kc.numpy(), vc.numpy()], new.numpy()[live],
                                        sids.numpy()[live])
    tcache.scatter_blocks([kc, vc], new, sids)
    for g, w in zip((kc, vc), want, strict=True):
        np.testing.assert_array_equal(N(g), w)
    src = torch.tensor([1, 2], dtype=ids_dtype)
    dst = torch.tensor([2**32 + 2 if wide else 2, 5], dtype=ids_dtype)
    live = slice(1, 2) if wide else slice(0, 2)
    want = ref.copy_blocks_reference([kc.numpy(), vc.numpy()], src.numpy()[live],
                                     dst.numpy()[live])
    tcache.copy_blocks([kc, vc], src, dst)
    for g, w in zip((kc, vc), want, strict=True):
        np.testing.assert_array_equal(N(g), w)


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_copy_blocks_one_pass_and_staged_pairs(ids_dtype):
    """copy_blocks moves a pair whose dst no pair reads in one pass, and stages the others:
    here a swap (3 <-> 4), a chain (0 -> 1 -> 2, listed write-first), a pair from a block
    nobody writes (5 -> 6) and one into a block nobody reads (7 -> 8), in one call. The
    interpreter runs the programs in order, so a dst written before a later pair reads it
    shows. With int64 ids a src past the blocks (unchecked, as on a device) reads the last
    block, clamped; it counts as read, so a pair writing that block, listed first, waits."""
    rng = np.random.default_rng(3)
    kc, vc = (T(testing.random_values(rng, (10, 4, 2, 6), "float32")) for _ in range(2))
    before = [c.clone() for c in (kc, vc)]
    src = np.array([1, 3, 4, 0, 5, 7], np.int64)
    dst = np.array([2, 4, 3, 1, 6, 8], np.int64)
    want = ref.copy_blocks_reference([c.numpy() for c in before], src, dst)
    tcache.copy_blocks([kc, vc], torch.from_numpy(src).to(ids_dtype),
                       torch.from_numpy(dst).to(ids_dtype))
    for g, w in zip((kc, vc), want, strict=True):
        np.testing.assert_array_equal(N(g), w)
    if ids_dtype == torch.int64:
        for c, b in zip((kc, vc), before, strict=True):
            c.copy_(b)
        tcache.copy_blocks([kc, vc], torch.tensor([0, 2**32 + 1]), torch.tensor([9, 5]))
        for c, b in zip((kc, vc), before, strict=True):
            np.testing.assert_array_equal(N(c[5]), N(b[9]))  # the clamped read: old block 9
            np.testing.assert_array_equal(N(c[9]), N(b[0]))
            np.testing.assert_array_equal(N(c[:5]), N(b[:5]))
            np.testing.assert_array_equal(N(c[6:9]), N(b[6:9]))


def test_copy_blocks_refuses_caches_the_marks_cannot_describe():
    """The marks name blocks by id for every cache: caches of other block counts, or whose
    blocks overlap in memory (a block id apart is not memory apart), are refused."""
    ids = torch.tensor([1], dtype=torch.int32)
    base = torch.arange(40, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"caches\[1\]: expected 5 blocks"):
        tcache.copy_blocks([base[:20].view(5, 4), base[20:].view(5, 4)[:2]], ids, ids)
    with pytest.raises(ValueError, match=r"caches\[0\]: its blocks overlap"):
        tcache.copy_blocks([base.as_strided((5, 8), (4, 1))], ids, ids)


def test_write_kv_value_and_v_cache_strides_of_their_own():
    """write_kv with a K cache of its own and V a view of a stacked [blocks, 2, ...] cache
    (other strides), key rows contiguous and value a view of a fused [n, 2, H, D] tensor."""
    rng = np.random.default_rng(12)
    kc = T(testing.random_values(rng, (5, 4, 3, 6), "float32"))
    vc = T(testing.random_values(rng, (5, 2, 4, 3, 6), "float32"))[:, 0]
    key = T(testing.random_values(rng, (4, 3, 6), "float32"))
    value = T(testing.random_values(rng, (4, 2, 3, 6), "float32"))[:, 1]
    assert kc.stride() != vc.stride() and key.stride() != value.stride()
    slots = np.array([3, -1, 19, 8], np.int32)
    want_k, want_v = ref.write_kv_reference(key.numpy(), value.numpy(), kc.numpy(), vc.numpy(),
                                            slots)
    tcache.write_kv(key, value, kc, vc, T(slots))
    np.testing.assert_array_equal(N(kc), want_k)
    np.testing.assert_array_equal(N(vc), want_v)


@pytest.mark.parametrize("dtype, seqs, window", [
    ("float32", [(100, 100)], 3), ("float32", [(70, 90), (1, 5)], 2),
    ("float16", [(130, 130)], 4)], ids=["f32-one", "f32-two", "f16"])
def test_prefill_window_smaller_than_a_tile(dtype, seqs, window):
    """A long prefill (q_len over 2 x BLOCK_N) with a window of 2-4 keys: the rows of a query
    tile whose window starts past a key tile see nothing in it (running max still -inf); the
    online softmax must keep them finite."""
    rng = np.random.default_rng(len(seqs) + window)
    b = testing.make_ragged_batch(rng, seqs, num_q_heads=2, num_kv_heads=1, head_dim=16,
                                  block_size=16, dtype=dtype, sliding_window=window,
                                  decode=False)
    want, want_lse = ref.paged_attention_reference(*b.args(), sliding_window=window,
                                                   return_lse=True)
    q, k, v, bt, kv, cu = (T(a) for a in b.args())
    out = torch.full(q.shape, float("nan"), dtype=TD[dtype])
    lse = torch.full(q.shape[:2], float("nan"))
    tattn.paged_attention(out, lse, q, k, v, bt, kv, cu, scale=default_scale(16), causal=True,
                          sliding_window=window, logits_soft_cap=None)
    close(out, want, dtype)
    np.testing.assert_allclose(N(lse), want_lse, atol=1e-4, rtol=1e-4)


def _attend(q, k, v, bt, kv, cu, **kw):
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    lse = torch.full(q.shape[:2], float("nan"))
    tattn.paged_attention(out, lse, q, k, v, bt, kv, cu, scale=default_scale(q.shape[2]),
                          causal=True, sliding_window=None, logits_soft_cap=None, **kw)
    return out, lse


@pytest.mark.parametrize("layout", ["table-columns", "v-stacked", "v-hnd", "q-fused"])
def test_paged_attention_views(layout):
    """Each stride argument its own: a block table that is the first columns of a wider one
    (row stride != width), a V cache with other strides than K (a view of a stacked
    [blocks, 2, ...] cache; the [blocks, heads, block_size, dim] layout, other token and head
    strides), q a view of a fused qkv tensor (other strides than out)."""
    rng = np.random.default_rng(3)
    b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 4), num_q_heads=4,
                                  num_kv_heads=2, head_dim=16, block_size=4)
    want = ref.paged_attention_reference(*b.args())
    q, k, v, bt, kv, cu = (T(a) for a in b.args())
    if layout == "table-columns":
        wide = torch.full((bt.shape[0], bt.shape[1] + 5), 10**6, dtype=torch.int32)
        wide[:, :bt.shape[1]] = bt
        bt = wide[:, :bt.shape[1]]
    elif layout == "v-stacked":
        v = torch.stack([torch.full_like(v, float("nan")), v], dim=1)[:, 1]
    elif layout == "v-hnd":
        v = v.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
        assert v.stride()[1:3] != k.stride()[1:3]
    else:
        qkv = torch.full((q.shape[0], 3 * q.shape[1], q.shape[2]), float("nan"))
        qkv[:, :q.shape[1]] = q
        q = qkv[:, :q.shape[1]]
    out, _ = _attend(q, k, v, bt, kv, cu)
    close(out, want, "float32")


@pytest.mark.parametrize("num_seqs", [1, 2])
def test_workspace_serves_one_and_two_sequence_splits(num_seqs):
    """paged_attention_workspace_bytes serves this batch and every smaller one: decode batches
    of 1 and 2 sequences whose table (256 blocks of 16) is wide enough to split."""
    rng = np.random.default_rng(num_seqs)
    b = testing.make_ragged_batch(rng, [(1, 20)] * num_seqs, num_q_heads=4, num_kv_heads=2,
                                  head_dim=16, block_size=16, max_blocks_per_seq=256)
    want = ref.paged_attention_reference(*b.args())
    q, k, v, bt, kv = (T(a) for a in b.args()[:5])
    assert tattn._splits(q, k, bt, True) > 1
    ws = _workspace(tattn.paged_attention_workspace_bytes(q, k, bt, None))
    out, _ = _attend(q, k, v, bt, kv, None, workspace=ws)
    close(out, want, "float32")


@pytest.mark.parametrize("splits", [None, 3])
def test_table_reads_stop_at_the_row(splits, full_tiles):
    """kv_lens past a sequence's table row (unchecked on a device): the kernel reads no table
    entry past the row. The table ends where a PROT_NONE page starts, so a read past it kills
    the process (the interpreter's own bounds check misses small overreads into the heap)."""
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    mem = mmap.mmap(-1, 2 * page, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    assert ctypes.CDLL(None).mprotect(ctypes.c_void_p(addr + page), page, 0) == 0
    rng = np.random.default_rng(21)
    b = testing.make_ragged_batch(rng, [(1, 9), (1, 12)], num_q_heads=4, num_kv_heads=2,
                                  head_dim=16, block_size=4, nan_fill=False)
    want = ref.paged_attention_reference(*b.args())
    n, w = b.block_tables.shape
    table = np.frombuffer(mem, np.int32, count=n * w, offset=page - 4 * n * w).reshape(n, w)
    table[:] = b.block_tables
    q, k, v = (T(a) for a in (b.q, b.k_cache, b.v_cache))
    kv = T(b.kv_lens)
    kv[1] = 1000  # the last row: keys far past its 3 columns, the guard page right after
    out, _ = _attend(q, k, v, torch.from_numpy(table), kv, None, num_splits=splits)
    close(out[:1], want[:1], "float32")


@pytest.mark.parametrize("splits", [None, 3])
def test_kv_lens_past_the_table_count_its_keys(splits, full_tiles):
    """An unchecked kv_len past the table (1 or 1000 keys past a 3-block row, decode and a
    3-token sequence) is read as the table's 12 keys, what the frontends clip host lengths to
    (the kernel once looped over every key of such a length, re-reading the row's last block:
    ~2**31 keys for a garbage length near the int32 limit)."""
    rng = np.random.default_rng(23)
    for decode, seqs in ((True, [(1, 9), (1, 12)]), (False, [(2, 9), (3, 12)])):
        b = testing.make_ragged_batch(rng, seqs, num_q_heads=4, num_kv_heads=2, head_dim=16,
                                      block_size=4, nan_fill=False, decode=decode)
        assert b.block_tables.shape[1] * 4 == 12 and b.kv_lens[1] == 12
        want = ref.paged_attention_reference(*b.args())
        cu = None if decode else T(b.cu_q_lens)
        for past in (1, 1000):
            kv = T(b.kv_lens)
            kv[1] = 12 + past
            out, lse = _attend(*(T(a) for a in b.args()[:4]), kv, cu, num_splits=splits)
            close(out, want, "float32")


# ------------------------------------------ through the torch frontend: strided index tensors


@pytest.fixture(scope="module")
def interp_backend():
    """The Triton kernels registered for CPU tensors as backend "triton-interp" (lowest
    priority; the interpreter runs them there), so that the torch frontend's wrappers run in
    front of them as they do on a GPU: index tensors on the tensors' device pass through."""
    from prefixkv.paged.registry import Backend
    from prefixkv.torch_frontend import _registry

    for op, impl in _registry._TRITON_IMPL.items():
        reg = _registry.REGISTRIES[op]
        if "triton-interp" not in reg.names():
            reg.register(Backend("triton-interp", ("cpu",), impl, priority=-1))
    return "triton-interp"


def _strided(t):
    """t's values in a view without unit stride along its last axis: a column of a [n, 2]
    tensor (1-D; the other column garbage), column-major (2-D)."""
    if t is None:
        return None
    if t.dim() == 1:
        return torch.stack([t, torch.full_like(t, 7)], 1)[:, 0]
    return t.t().contiguous().t()


def test_strided_index_tensors_through_the_frontend(interp_backend):
    """Index tensors that are views (src/dst/slots/ids columns of an [n, 2] mapping, kv_lens,
    cu_q_lens, prefix ids and lens strided, column-major block tables) give the results of
    their contiguous copies: the kernels read index tensors as contiguous, the frontend hands
    them such (a strided copy_blocks mapping overwrote a block it never named)."""
    import prefixkv.torch_frontend as tf

    be = interp_backend
    rng = np.random.default_rng(41)
    base = T(testing.random_values(rng, (16, 4, 2, 16), "float32"))
    mapping = torch.tensor([[1, 9], [2, 10], [3, 11]], dtype=torch.int32)
    src, dst = mapping[:, 0], mapping[:, 1]
    assert src.stride() == (2,)
    caches = [base.clone()]
    tf.copy_blocks(caches, src, dst, backend=be)
    want = ref.copy_blocks_reference([base.numpy()], src.numpy(), dst.numpy())[0]
    np.testing.assert_array_equal(N(caches[0]), want)  # blocks not named: bit-identical
    buf = tf.gather_blocks([base], _strided(T(np.array([5, 0, 5], np.int32))), backend=be)
    np.testing.assert_array_equal(N(buf[:, 0]), N(base[[5, 0, 5]]))
    caches = [base.clone()]
    tf.scatter_blocks(caches, buf[:2], dst[:2], backend=be)
    np.testing.assert_array_equal(N(caches[0][[9, 10]]), N(base[[5, 0]]))
    np.testing.assert_array_equal(N(caches[0][11:]), N(base[11:]))
    key = T(testing.random_values(rng, (3, 2, 16), "float32"))
    kc, vc = torch.zeros_like(base), torch.zeros_like(base)
    slots = torch.tensor([[5, 0], [17, 1], [40, 2]], dtype=torch.int32)[:, 0]
    want_k, _ = ref.write_kv_reference(key.numpy(), key.numpy(), kc.numpy(), vc.numpy(),
                                       slots.numpy())
    tf.write_kv(key, key, kc, vc, slots, backend=be)
    np.testing.assert_array_equal(N(kc), want_k)

    for grid in ("decode", "mixed"):
        b = testing.make_ragged_batch(rng, testing.seq_grid(grid, 4), num_q_heads=4,
                                      num_kv_heads=2, head_dim=16, block_size=4)
        want = ref.paged_attention_reference(*b.args())
        q, k, v, bt, kv, cu = (T(a) for a in b.args())
        got = tf.paged_attention(q, k, v, _strided(bt), _strided(kv), _strided(cu), backend=be)
        close(got, want, "float32")
        wide = torch.full((bt.shape[0], bt.shape[1] + 3), 10**6, dtype=torch.int32)
        wide[:, :bt.shape[1]] = bt  # a column slice passes as it is: its row stride is read
        got = tf.paged_attention(q, k, v, wide[:, :bt.shape[1]], kv, cu, backend=be)
        close(got, want, "float32")

    b = testing.make_shared_prefix_batch(
        rng, [2, 0, 1], [(0, 1, 5), (2, 2, 3), (-1, 1, 4), (0, 3, 9), (1, 1, 1)],
        num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=4)
    want = ref.shared_prefix_attention_reference(*b.args())
    args = [T(a) for a in b.args()]
    got = tf.shared_prefix_attention(*args[:3], *(_strided(a) for a in args[3:]), backend=be)
    close(got, want, "float32")


def test_sinks_through_the_frontend(interp_backend):
    """Attention sinks on the Triton kernels' (out, lse), in the frontend: returned, written
    into out= with the lse the kernels keep in the workspace, and once per row of a cascade."""
    import prefixkv.torch_frontend as tf

    be = interp_backend
    rng = np.random.default_rng(43)
    sinks_np = np.linspace(-3.0, 5.0, 4).astype(np.float32)
    sinks = T(sinks_np)
    for grid in ("decode", "mixed"):
        b = testing.make_ragged_batch(rng, testing.seq_grid(grid, 4), num_q_heads=4,
                                      num_kv_heads=2, head_dim=16, block_size=4)
        want, want_lse = ref.paged_attention_reference(*b.args(), return_lse=True,
                                                       sinks=sinks_np)
        q, k, v, bt, kv, cu = (T(a) for a in b.args())
        got, lse = tf.paged_attention(q, k, v, bt, kv, cu, return_lse=True, sinks=sinks,
                                      backend=be)
        close(got, want, "float32")
        np.testing.assert_allclose(N(lse), want_lse, atol=1e-4, rtol=1e-5)
        ws = torch.empty(tf.attention_workspace_size(q, k, bt, cu, backend=be),
                         dtype=torch.uint8)
        out = torch.full(q.shape, float("nan"))
        tf.paged_attention(q, k, v, bt, kv, cu, sinks=sinks, out=out, workspace=ws, backend=be)
        close(out, want, "float32")
    b = testing.make_shared_prefix_batch(
        rng, [2, 1], [(0, 1, 5), (1, 2, 3), (-1, 1, 4), (0, 3, 9)],
        num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=4)
    want = ref.shared_prefix_attention_reference(*b.args(), sinks=sinks_np)
    got = tf.shared_prefix_attention(*(T(a) for a in b.args()), sinks=sinks, backend=be)
    close(got, want, "float32")
    want = ref.shared_prefix_attention_reference(*b.args(), sinks=sinks_np, sliding_window=6)
    got = tf.shared_prefix_attention(*(T(a) for a in b.args()), sinks=sinks, sliding_window=6,
                                     backend=be)
    close(got, want, "float32")


SINK_CASES = [  # grid, hq, hkv, dtype, options, num_splits
    ("decode", 4, 2, "float32", {}, None),
    ("decode", 8, 2, "bfloat16", {"sliding_window": 5, "logits_soft_cap": 2.0}, 3),
    ("mixed", 4, 1, "float16", {"logits_soft_cap": 1.5}, None),
    ("contexts", 4, 2, "float32", {"causal": False}, None),
    ("mixed", 66, 2, "float32", {}, None),  # the group in two slices (17 + 16 heads)
]


@pytest.mark.parametrize("case", SINK_CASES, ids=lambda c: f"{c[0]}-h{c[1]}-{c[3]}-s{c[5]}")
def test_sinks_in_the_kernel(case):
    """The kernel reads the sinks (SINKS): each row's softmax starts from its head's sink, in
    split 0 alone of a split launch; sinks in q's dtype, one of them -inf (no sink)."""
    grid, hq, hkv, dtype, opts, splits = case
    rng = np.random.default_rng(hq + len(grid))
    b = testing.make_ragged_batch(rng, testing.seq_grid(grid, 4), num_q_heads=hq,
                                  num_kv_heads=hkv, head_dim=16, block_size=4, dtype=dtype,
                                  sliding_window=opts.get("sliding_window"))
    sinks_np = np.linspace(-4.0, 6.0, hq).astype(np.float32)[rng.permutation(hq)]
    sinks_np[1] = -np.inf
    sinks = T(sinks_np).to(TD[dtype])
    want, want_lse = ref.paged_attention_reference(
        *b.args(), return_lse=True, sinks=N(sinks).astype(np.float32), **opts)
    q, k, v, bt, kv, cu = (T(a) for a in b.args())
    out = torch.full(q.shape, float("nan"), dtype=TD[dtype])
    lse = torch.full(q.shape[:2], float("nan"))
    tattn.paged_attention(out, lse, q, k, v, bt, kv, cu, scale=default_scale(16),
                          causal=opts.get("causal", True),
                          sliding_window=opts.get("sliding_window"),
                          logits_soft_cap=opts.get("logits_soft_cap"), num_splits=splits,
                          sinks=sinks)
    close(out, want, dtype)
    np.testing.assert_allclose(N(lse), want_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("decode", [True, False])
def test_sinks_in_the_cascade_kernels(decode, monkeypatch, full_tiles):
    """The cascade counts each row's sink once: in its own-token launch (split too), not in
    the prefix pass (split in 3 here); a token with no prefix gets it as well."""
    monkeypatch.setattr(tattn, "_prefix_splits", lambda *a: 3)
    rng = np.random.default_rng(53)
    seqs = [(0, 1, 5), (-1, 1, 4), (1, 1, 30), (0, 1, 17)] if decode else \
        [(0, 3, 5), (-1, 2, 4), (1, 1, 30), (0, 5, 17)]
    b = testing.make_shared_prefix_batch(rng, [6, 2], seqs, num_q_heads=4, num_kv_heads=2,
                                         head_dim=16, block_size=4, decode=decode)
    sinks_np = np.array([0.5, -np.inf, 3.0, -2.0], dtype=np.float32)
    want, want_lse = ref.shared_prefix_attention_reference(*b.args(), return_lse=True,
                                                           sinks=sinks_np)
    args = [None if a is None else T(a) for a in b.args()]
    out = torch.full(args[0].shape, float("nan"))
    lse = torch.full(args[0].shape[:2], float("nan"))
    tattn.shared_prefix_attention(out, lse, *args, scale=default_scale(16), logits_soft_cap=None,
                                  sinks=T(sinks_np))
    close(out, want, "float32")
    np.testing.assert_allclose(N(lse), want_lse, atol=1e-4, rtol=1e-4)


def test_frontend_hands_the_sinks_to_the_kernels(interp_backend, monkeypatch):
    """With the Triton kernels the frontend applies no sinks epilogue (the kernels read them),
    so out= with a workspace and no lse= allocates nothing for them."""
    import prefixkv.torch_frontend as tf
    from prefixkv.torch_frontend import _ops

    def no_epilogue(*a):
        raise AssertionError("the sinks epilogue ran")

    monkeypatch.setattr(_ops, "_apply_sinks", no_epilogue)
    rng = np.random.default_rng(59)
    b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 4), num_q_heads=4,
                                  num_kv_heads=2, head_dim=16, block_size=4)
    sinks_np = np.array([1.0, -1.0, 4.0, 0.0], dtype=np.float32)
    want = ref.paged_attention_reference(*b.args(), sinks=sinks_np)
    q, k, v, bt, kv, cu = (T(a) for a in b.args())
    ws = _workspace(tf.attention_workspace_size(q, k, bt, cu, backend=interp_backend))
    out = torch.full(q.shape, float("nan"))
    tf.paged_attention(q, k, v, bt, kv, cu, sinks=T(sinks_np), out=out, workspace=ws,
                       backend=interp_backend)
    close(out, want, "float32")
    with pytest.raises(AssertionError, match="epilogue"):  # the torch backend applies them
        tf.paged_attention(q, k, v, bt, kv, cu, sinks=T(sinks_np), backend="torch")


def test_shared_prefix_workspace_covers_the_windowed_calls(interp_backend):
    """attention_workspace_size with prefix_block_tables also covers a call with a sliding
    window, which runs paged attention over prefix-then-own tables (a decode token over an
    8192-token prefix, 32/8 heads: its split-KV partials need more than the cascade's plan)."""
    import prefixkv.torch_frontend as tf

    be = interp_backend
    rng = np.random.default_rng(47)
    b = testing.make_shared_prefix_batch(rng, [512], [(0, 1, 64)], num_q_heads=32,
                                         num_kv_heads=8, head_dim=128, block_size=16)
    host = list(b.args())
    host[6] = np.ascontiguousarray(host[6][:, :4])  # own tables: 4 blocks wide
    args = [None if a is None else T(a) for a in host]
    q, k, pbt, bt = args[0], args[1], args[3], args[6]
    size = tf.attention_workspace_size(q, k, bt, prefix_block_tables=pbt, backend=be)
    assert size > tattn.shared_prefix_attention_workspace_bytes(q, k, pbt, bt)
    ws = _workspace(size)
    want = ref.shared_prefix_attention_reference(*host, sliding_window=64)
    out = torch.full(q.shape, float("nan"))
    tf.shared_prefix_attention(*args, sliding_window=64, out=out, workspace=ws, backend=be)
    close(out, want, "float32")


@pytest.mark.parametrize("splits", [None, 2])
def test_nan_in_a_read_slot_gives_nan(splits, full_tiles):
    """A NaN in a K slot the queries of sequence 0 read: their out and lse NaN, as the
    reference (not out NaN with lse -inf, nor a split's partial dropped by the merge); the
    other sequences unaffected."""
    rng = np.random.default_rng(3)
    b = testing.make_ragged_batch(rng, [(3, 20), (1, 9), (2, 2)], num_q_heads=4,
                                  num_kv_heads=2, head_dim=16, block_size=4)
    b.k_cache[int(b.block_tables[0, 0]), 0, 1, 3] = np.nan
    want, want_lse = ref.paged_attention_reference(*b.args(), return_lse=True)
    q, k, v, bt, kv, cu = (T(a) for a in b.args())
    out, lse = _attend(q, k, v, bt, kv, cu, num_splits=splits)
    np.testing.assert_array_equal(np.isnan(N(lse)), np.isnan(want_lse))
    np.testing.assert_array_equal(np.isnan(N(out)), np.isnan(want))
    assert np.isnan(want_lse).any()
    ok = ~np.isnan(want)
    np.testing.assert_allclose(N(out)[ok], want[ok], atol=1e-5, rtol=1e-5)


def test_merge_strided_inputs_and_outputs():
    """The public merge's kernel reads each input where it is: slices of wider buffers (any
    strides) in, a transposed view out; NaN in an empty state's row stays out of the result."""
    rng = np.random.default_rng(8)
    wide = torch.from_numpy(rng.standard_normal((2, 5, 3, 40)).astype(np.float32))
    oa, ob = wide[0, :, :, 3:23], wide[1, :, :, 10:30]
    lw = torch.from_numpy(rng.standard_normal((3, 5, 2)).astype(np.float32))
    la, lb = lw[:, :, 0].t(), lw[:, :, 1].t()
    la[1, 2], lb[3, 0] = float("-inf"), float("inf")
    oa[1, 2], ob[3, 0] = float("nan"), float("nan")  # empty states' rows: never used
    want, want_lse = ref.merge_attention_states_reference(*(x.numpy() for x in (oa, la, ob, lb)))
    out = torch.full((3, 5, 20), float("nan")).transpose(0, 1)
    lse = torch.full((3, 5), float("nan")).t()
    tattn.merge_attention_states(out, lse, oa, la, ob, lb)
    np.testing.assert_allclose(N(out), want, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(N(lse), want_lse, atol=1e-6, rtol=1e-6)


def test_merge_keeps_a_nan_state():
    oa, ob = np.ones((2, 2, 1, 4), np.float32)
    la = np.array([[np.nan], [0.5]], np.float32)
    lb = np.array([[0.5], [-np.inf]], np.float32)
    want, want_lse = ref.merge_attention_states_reference(oa, la, ob, lb)
    out, lse = torch.full((2, 1, 4), 7.0), torch.full((2, 1), 7.0)
    tattn.merge_attention_states(out, lse, T(oa), T(la), T(ob), T(lb))
    assert np.isnan(want[0]).all() and np.isnan(want_lse[0]).all()
    np.testing.assert_array_equal(np.isnan(N(out)), np.isnan(want))
    np.testing.assert_array_equal(np.isnan(N(lse)), np.isnan(want_lse))


def test_launcher_refuses_a_misaligned_workspace():
    """The frontend checks the workspace's alignment only outside torch.compile (storage_offset
    is not traceable): the launcher checks it again where it carves the buffers."""
    rng = np.random.default_rng(4)
    b = testing.make_ragged_batch(rng, [(1, 9), (2, 6)], num_q_heads=4, num_kv_heads=2,
                                  head_dim=16, block_size=4)
    ws = torch.zeros(1 << 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="256-byte aligned"):
        _attend(*(T(a) for a in b.args()), workspace=ws[16:])
