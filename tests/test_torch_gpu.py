"""prefixkv.torch_frontend on a CUDA GPU (skipped without one): the Triton kernels and the
CUDA C swap kernel against the numpy reference, backend selection by device, CUDA-graph
capture with out= buffers, torch.compile(fullgraph=True)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from prefixkv.paged import reference as ref  # noqa: E402
from prefixkv.paged import testing  # noqa: E402
from prefixkv.paged.spec import ATTENTION_TOLERANCE  # noqa: E402

from prefixkv import torch_frontend as tf  # noqa: E402

DEV = "cuda"
from torch_convert import TORCH_DTYPE as TD  # noqa: E402
from torch_convert import N  # noqa: E402
from torch_convert import T as _T  # noqa: E402


def T(x, device=DEV):
    return _T(x, device)






def close(got, want, dtype):
    atol, rtol = ATTENTION_TOLERANCE[dtype]
    np.testing.assert_allclose(N(got), np.asarray(want).astype(np.float64), atol=atol, rtol=rtol)


CASES = [  # grid, block_size, hq, hkv, head_dim, dtype, options
    ("decode", 16, 32, 8, 128, "bfloat16", {}),
    ("decode", 16, 8, 1, 64, "float16", {"logits_soft_cap": 5.0}),
    ("decode", 8, 6, 2, 80, "float32", {"sliding_window": 7}),
    ("prefill", 16, 8, 8, 128, "bfloat16", {}),
    ("prefill_with_prefix", 32, 16, 2, 96, "float16", {"sliding_window": 20}),
    ("mixed", 16, 8, 2, 256, "bfloat16", {"logits_soft_cap": 3.0}),
    ("mixed", 7, 4, 4, 64, "float32", {"causal": False}),
    ("contexts", 1, 4, 1, 64, "float16", {}),
    ("contexts", 64, 8, 2, 128, "float32", {}),
    # groups the Triton kernel splits over several programs: float32 past 32 q heads per kv
    # head (2 x 24 here), 16-bit past 128
    ("mixed", 16, 48, 1, 128, "float32", {"logits_soft_cap": 4.0}),
    ("decode", 16, 192, 1, 64, "bfloat16", {}),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-bs{c[1]}-d{c[4]}-{c[5]}")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_paged_attention_gpu(case, backend):
    grid, bs, hq, hkv, d, dtype, opts = case
    rng = np.random.default_rng(bs + d)
    b = testing.make_ragged_batch(rng, testing.seq_grid(grid, bs), num_q_heads=hq,
                                  num_kv_heads=hkv, head_dim=d, block_size=bs, dtype=dtype,
                                  sliding_window=opts.get("sliding_window"))
    want, want_lse = ref.paged_attention_reference(*b.args(), return_lse=True, **opts)
    out = torch.full(b.q.shape, float("nan"), dtype=TD[dtype], device=DEV)
    got, lse = tf.paged_attention(*(T(a) for a in b.args()), return_lse=True, out=out,
                                  backend=backend, **opts)
    close(got, want, dtype)
    np.testing.assert_allclose(N(lse), want_lse, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("seqs", [[(1, 9), (1, 16)], [(5, 12), (3, 3)], [(1, 7)]],
                         ids=["decode", "prefill", "one-sequence"])
def test_tables_one_block_wide_gpu(seqs):
    """Every sequence within one block: the JIT passes the table width 1 as a constant, which
    failed to compile (tests/test_triton_jit_launches.py compiles it without a GPU)."""
    rng = np.random.default_rng(5)
    b = testing.make_ragged_batch(rng, seqs, num_q_heads=8, num_kv_heads=2, head_dim=64,
                                  block_size=16, dtype="bfloat16")
    assert b.block_tables.shape[1] == 1
    want = ref.paged_attention_reference(*b.args())
    close(tf.paged_attention(*(T(a) for a in b.args()), backend="triton"), want, "bfloat16")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_attention_with_metadata_on_the_host(backend):
    """q and the caches on the GPU, block tables and lengths on the CPU (checked on the host,
    then copied): both attention ops, both backends."""
    rng = np.random.default_rng(8)
    b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 16), num_q_heads=8,
                                  num_kv_heads=2, head_dim=128, block_size=16, dtype="bfloat16")
    q, k, v, *meta = b.args()
    got = tf.paged_attention(T(q), T(k), T(v), *(T(m, "cpu") for m in meta), backend=backend)
    close(got, ref.paged_attention_reference(*b.args()), "bfloat16")
    sp = testing.make_shared_prefix_batch(rng, [3], [(0, 1, 5), (0, 2, 9), (-1, 1, 4)],
                                          num_q_heads=8, num_kv_heads=2, head_dim=128,
                                          block_size=16, dtype="bfloat16")
    q, k, v, *meta = sp.args()
    got = tf.shared_prefix_attention(T(q), T(k), T(v), *(T(m, "cpu") for m in meta),
                                     backend=backend)
    close(got, ref.shared_prefix_attention_reference(*sp.args()), "bfloat16")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_split_kv_long_context(dtype):
    """Few sequences, long contexts: the split-KV path (partials merged by LSE)."""
    from prefixkv.kernels.triton import attention as tattn

    rng = np.random.default_rng(3)
    b = testing.make_ragged_batch(rng, [(1, 5000), (1, 3001), (1, 17)], num_q_heads=16,
                                  num_kv_heads=2, head_dim=128, block_size=16, dtype=dtype)
    assert tattn.num_kv_splits(3, 2, b.block_tables.shape[1] * 16, True) > 1
    want = ref.paged_attention_reference(*b.args(), logits_soft_cap=10.0)
    close(tf.paged_attention(*(T(a) for a in b.args()), logits_soft_cap=10.0), want, dtype)


@pytest.mark.parametrize("seqs", [[(1, 5000), (1, 3001), (1, 17)],
                                  [(512, 4608), (37, 1000), (1, 70), (0, 0), (129, 129)]],
                         ids=["split-decode", "prefill"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_full_tiles_gpu(seqs, dtype, full_tiles):
    """The Triton kernel's key loop both ways on the GPU (full_tiles: unmasked whole steps of
    16 keys first, tattn.FULL_TILES), before a sweep may make it the default: split-KV decode
    and causal prefill over long contexts, against the reference."""
    rng = np.random.default_rng(9)
    b = testing.make_ragged_batch(rng, seqs, num_q_heads=16, num_kv_heads=2, head_dim=128,
                                  block_size=16, dtype=dtype)
    want = ref.paged_attention_reference(*b.args())
    close(tf.paged_attention(*(T(a) for a in b.args()), backend="triton"), want, dtype)


def test_default_backend_is_triton_on_cuda():
    assert tf.REGISTRIES["paged_attention"].select("cuda").name == "triton"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_shared_prefix_attention_gpu(dtype):
    rng = np.random.default_rng(4)
    b = testing.make_shared_prefix_batch(
        rng, [4, 2, 0], [(0, 1, 5), (1, 3, 20), (-1, 1, 9), (0, 1, 33), (2, 2, 2), (0, 4, 4)],
        num_q_heads=16, num_kv_heads=4, head_dim=128, block_size=16, dtype=dtype)
    want, want_lse = ref.shared_prefix_attention_reference(*b.args(), return_lse=True)
    got, lse = tf.shared_prefix_attention(*(T(a) for a in b.args()), return_lse=True)
    close(got, want, dtype)
    np.testing.assert_allclose(N(lse), want_lse, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("decode", [True, False])
def test_shared_prefix_long_prefix_split_gpu(decode):
    """Few queries over a 4096-token prefix: the prefix launch splits its KV (the GPU
    benchmark's case, 64 queries over 32768 tokens, in small), a token with no prefix beside."""
    from prefixkv.kernels.triton import attention as tattn

    rng = np.random.default_rng(9)
    seqs = [(0, 1, 5), (-1, 1, 4), (1, 1, 30), (0, 1, 17)] if decode else \
        [(0, 3, 5), (-1, 2, 4), (1, 1, 30), (0, 5, 17)]
    b = testing.make_shared_prefix_batch(rng, [256, 2], seqs, num_q_heads=32, num_kv_heads=8,
                                         head_dim=128, block_size=16, dtype="bfloat16",
                                         decode=decode)
    args = [T(a) for a in b.args()]
    assert tattn._prefix_splits(args[0], args[1], args[3]) > 1
    want, want_lse = ref.shared_prefix_attention_reference(*b.args(), return_lse=True)
    got, lse = tf.shared_prefix_attention(*args, return_lse=True)
    close(got, want, "bfloat16")
    np.testing.assert_allclose(N(lse), want_lse, atol=1e-3, rtol=1e-3)


# index tensors left on the host are copied; "cuda-int64": slots and block ids as torch makes
# them (the Triton kernels specialize *i64)
@pytest.mark.parametrize("ids_on", ["cuda", "cpu", "cuda-int64"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cache_ops_gpu_exact(dtype, backend, ids_on):
    def ids(x):
        t = T(x, ids_on.split("-")[0])
        return t.long() if ids_on.endswith("int64") else t

    rng = np.random.default_rng(5)
    kc, vc = (testing.random_values(rng, (12, 16, 4, 64), dtype) for _ in range(2))
    key, val = (testing.random_values(rng, (6, 4, 64), dtype) for _ in range(2))
    slots = np.array([3, -1, 190, 17, 64, -2], np.int32)
    want_k, want_v = ref.write_kv_reference(key, val, kc, vc, slots)
    stacked = torch.stack([T(kc), T(vc)], dim=1)
    tk, tv = stacked[:, 0], stacked[:, 1]
    tf.write_kv(T(key), T(val), tk, tv, ids(slots), backend=backend)
    assert np.array_equal(N(tk), want_k.astype(np.float64))
    assert np.array_equal(N(tv), want_v.astype(np.float64))
    src, dst = np.array([1, 2, 5], np.int32), np.array([2, 7, 1], np.int32)
    want = ref.copy_blocks_reference([want_k, want_v], src, dst)
    tf.copy_blocks([tk, tv], ids(src), ids(dst), backend=backend)
    for g, w in zip((tk, tv), want, strict=True):
        assert np.array_equal(N(g), w.astype(np.float64))
    gids = np.array([11, 0, 11], np.int32)
    buf = tf.gather_blocks([tk, tv], ids(gids), backend=backend)
    assert np.array_equal(N(buf), ref.gather_blocks_reference(want, gids).astype(np.float64))
    new = testing.random_values(rng, (2, 2, 16, 4, 64), dtype)
    sids = np.array([4, 9], np.int32)
    want2 = ref.scatter_blocks_reference(want, new, sids)
    tf.scatter_blocks([tk, tv], T(new), ids(sids), backend=backend)
    for g, w in zip((tk, tv), want2, strict=True):
        assert np.array_equal(N(g), w.astype(np.float64))


@pytest.mark.parametrize("backend", ["triton", "torch", "cuda-c"])
def test_int64_device_ids_past_int32_are_skipped(backend):
    """int64 block ids on the device are unchecked (a check is a host sync): a destination
    past 2**32 is skipped, never narrowed onto block 1 / 2; the others land."""
    pytest.importorskip("cupy") if backend == "cuda-c" else None
    cache = torch.arange(8 * 4, dtype=torch.float32, device=DEV).reshape(8, 4)
    far = torch.tensor([2**32 + 1, 5], dtype=torch.int64, device=DEV)
    src = torch.tensor([3, 6], dtype=torch.int64, device=DEV)
    want = cache.clone()
    want[5] = cache[6]
    if backend == "cuda-c":
        host = cache.cpu().pin_memory()
        tf.swap_blocks([cache], [host], src, far, backend=backend)
        torch.cuda.synchronize()
        assert torch.equal(host, want.cpu())
        return
    tf.copy_blocks([cache], src, far, backend=backend)
    assert torch.equal(cache, want)
    buf = torch.full((2, 1, 4), -1.0, device=DEV)
    tf.scatter_blocks([cache], buf, torch.tensor([2**32 + 2, 0], device=DEV), backend=backend)
    want[0] = -1.0
    assert torch.equal(cache, want)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_pinned_host_index_tensors_are_read_at_the_call(backend):
    """Index tensors in pinned host memory (an engine's reused staging buffers) count with the
    values they had at the call, even when the caller refills them before the stream reaches
    the upload (the stream is kept busy; a pinned tensor was copied from asynchronously)."""
    cache = torch.arange(8 * 4, dtype=torch.float32, device=DEV).reshape(8, 4)
    want = cache.clone()
    want[5] = cache[1]
    src = torch.tensor([1], dtype=torch.int32).pin_memory()
    dst = torch.tensor([5], dtype=torch.int32).pin_memory()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time queued before the call's copies
    tf.copy_blocks([cache], src, dst, backend=backend)
    src[0], dst[0] = 2, 6
    torch.cuda.synchronize()
    assert torch.equal(cache, want)


def test_sinks_gpu():
    rng = np.random.default_rng(13)
    b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 16), num_q_heads=8,
                                  num_kv_heads=2, head_dim=64, block_size=16, dtype="bfloat16")
    sinks = np.linspace(-2.0, 4.0, 8).astype(np.float32)
    want, want_lse = ref.paged_attention_reference(*b.args(), return_lse=True, sinks=sinks)
    out, lse = tf.paged_attention(*(T(a) for a in b.args()), return_lse=True, sinks=T(sinks))
    close(out, want, "bfloat16")
    np.testing.assert_allclose(N(lse), want_lse, atol=1e-3, rtol=1e-4)


def test_sinks_split_and_cascade_allocate_nothing_and_capture():
    """gpt-oss-like sinks (bf16, 64 q / 8 kv heads, head_dim 64) read by the kernels: a split
    decode and a cascade with out= and workspace= (no lse=) allocate nothing, eager and under
    CUDA-graph replay, and match the reference."""
    rng = np.random.default_rng(14)
    b = testing.make_ragged_batch(rng, [(1, 5000), (1, 2100)], num_q_heads=64, num_kv_heads=8,
                                  head_dim=64, dtype="bfloat16", nan_fill=False, decode=True)
    sp = testing.make_shared_prefix_batch(rng, [128], [(0, 1, 40), (-1, 1, 9), (0, 1, 3)],
                                          num_q_heads=64, num_kv_heads=8, head_dim=64,
                                          dtype="bfloat16", decode=True)
    sinks_np = np.linspace(-3.0, 5.0, 64).astype(np.float32)
    sinks = T(sinks_np).to(torch.bfloat16)
    sinks_f = N(sinks).astype(np.float32)
    pa, sa = [T(a) for a in b.args()][:5], [T(a) for a in sp.args()]
    size = max(tf.attention_workspace_size(pa[0], pa[1], pa[3]),
               tf.attention_workspace_size(sa[0], sa[1], sa[6], prefix_block_tables=sa[3]))
    ws = torch.empty(size, dtype=torch.uint8, device=DEV)
    out_p, out_s = torch.empty_like(pa[0]), torch.empty_like(sa[0])

    def step():
        tf.paged_attention(*pa, sinks=sinks, out=out_p, workspace=ws)
        tf.shared_prefix_attention(*sa, sinks=sinks, out=out_s, workspace=ws)

    _allocates_nothing_and_replays(step, out_p, out_s)
    close(out_p.float(), ref.paged_attention_reference(*b.args(), sinks=sinks_f), "bfloat16")
    close(out_s.float(), ref.shared_prefix_attention_reference(*sp.args(), sinks=sinks_f),
          "bfloat16")


@pytest.mark.parametrize("backend", ["cuda-c", "torch"])
def test_swap_blocks_device_host_roundtrip(backend):
    pytest.importorskip("cupy") if backend == "cuda-c" else None
    gen = torch.Generator().manual_seed(0)
    layers = [torch.randn(20, 16, 4, 64, generator=gen).to(torch.bfloat16) for _ in range(6)]
    dev = [x.to(DEV) for x in layers]
    host = [torch.zeros(9, 16, 4, 64, dtype=torch.bfloat16).pin_memory() for _ in range(6)]
    src_ids = torch.tensor([19, 0, 7], dtype=torch.int32)
    dst_ids = torch.tensor([8, 2, 0], dtype=torch.int32)
    stream = torch.cuda.Stream()
    # ids on the device beforehand: a copy from pageable host memory inside the block would
    # wait for the stream and so hide what the queued work below is there to expose
    src_dev, dst_dev = src_ids.to(DEV), dst_ids.to(DEV)
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        # work queued ahead on the stream: a device -> host copy that the host side reads
        # before the stream reaches it (a non_blocking copy into a temporary) reads garbage
        torch.cuda._sleep(20_000_000)
        for d in dev:  # queued on the same stream: the swap must see it (a launch on another
            d.neg_()   # stream would copy the blocks before the negation)
        tf.swap_blocks(dev, host, src_dev, dst_dev, backend=backend)  # offload
    stream.synchronize()
    for x, h in zip(layers, host, strict=True):
        assert torch.equal(h[dst_ids.long()], -x[src_ids.long()])
        assert torch.count_nonzero(h[[1, 3, 4, 5, 6, 7]].float()) == 0  # untouched blocks
    back = [torch.zeros_like(d) for d in dev]
    tf.swap_blocks(host, back, dst_ids, src_ids, backend=backend)  # onload
    torch.cuda.synchronize()
    for x, b in zip(layers, back, strict=True):
        assert torch.equal(b.cpu()[src_ids.long()], -x[src_ids.long()])


def test_pinned_host_allocator_memory_is_pinned_and_swaps():
    pytest.importorskip("cupy")
    from prefixkv.torch_frontend import pinned_host_allocator

    for _ in range(50):  # freed arrays unregister their pages: registering reused memory works
        pinned_host_allocator((4, 16, 4, 80), np.dtype(np.float16))
    host = torch.from_numpy(pinned_host_allocator((4, 16, 4, 80), np.dtype(np.float16)))
    assert host.is_pinned()  # registered pages count as pinned for torch and the swap kernel
    host.zero_()
    dev = torch.randn(8, 16, 4, 80, device=DEV, dtype=torch.float16)
    tf.swap_blocks([dev], [host], torch.tensor([5, 1], dtype=torch.int32, device=DEV),
                   torch.tensor([0, 3], dtype=torch.int32), backend="cuda-c")
    torch.cuda.synchronize()
    assert torch.equal(host[[0, 3]], dev[[5, 1]].cpu()) and not host[[1, 2]].any()


def test_cuda_graph_capture_with_out():
    rng = np.random.default_rng(6)
    b = testing.make_ragged_batch(rng, testing.seq_grid("decode", 16), num_q_heads=8,
                                  num_kv_heads=2, head_dim=128, dtype="bfloat16", nan_fill=False)
    q, k, v, bt, kv, _ = (T(a) for a in b.args())
    key = torch.randn(len(b.seqs), 2, 128, device=DEV, dtype=torch.bfloat16)
    slots = (bt[:, 0] * 16).to(torch.int32)  # rewrite slot 0 of each sequence's first block
    out = torch.full_like(q, float("nan"))
    lse = torch.empty(q.shape[:2], device=DEV)

    def step():
        tf.write_kv(key, key, k, v, slots)
        tf.paged_attention(q, k, v, bt, kv, out=out, lse=lse)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up: compile kernels outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    q.copy_(torch.randn_like(q))
    key.copy_(torch.randn_like(key))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    k_np, v_np = N(k).astype(np.float32), N(v).astype(np.float32)
    want = ref.paged_attention_reference(N(q).astype(np.float32), k_np, v_np, b.block_tables,
                                         b.kv_lens)
    close(out.float(), want, "bfloat16")


def _allocations() -> int:
    return torch.cuda.memory_stats()["allocation.all.allocated"]


def _allocates_nothing_and_replays(step, *outs) -> None:
    """step() (its kernels compiled by a first call) allocates nothing through the caching
    allocator; then captured in a CUDA graph and replayed into ``outs`` filled with NaN."""
    step()
    torch.cuda.synchronize()
    before = _allocations()
    step()
    torch.cuda.synchronize()
    assert _allocations() == before
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for o in outs:
        o.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()


def test_workspace_calls_allocate_nothing_and_capture():
    """Split-KV decode (few sequences, long context) and cascade attention with out=, lse= and
    workspace=: no allocation by the caching allocator, and the same under CUDA-graph replay."""
    rng = np.random.default_rng(8)
    b = testing.make_ragged_batch(rng, [(1, 4000), (1, 3000)], num_q_heads=8, num_kv_heads=2,
                                  head_dim=128, dtype="bfloat16", nan_fill=False, decode=True)
    pa = [T(a) for a in b.args()][:5]
    # a 2048-token prefix: its launch splits in 2 (partials carved from the workspace too)
    sp = testing.make_shared_prefix_batch(rng, [128], [(0, 1, 40), (0, 1, 17), (-1, 1, 9)],
                                          num_q_heads=8, num_kv_heads=2, head_dim=128,
                                          dtype="bfloat16", decode=True)
    sa = [T(a) for a in sp.args()]
    size = max(tf.attention_workspace_size(pa[0], pa[1], pa[3]),
               tf.attention_workspace_size(sa[0], sa[1], sa[6], prefix_block_tables=sa[3]))
    assert size > 0
    ws = torch.empty(size, dtype=torch.uint8, device=DEV)
    out_p, lse_p = torch.empty_like(pa[0]), torch.empty(pa[0].shape[:2], device=DEV)
    out_s, lse_s = torch.empty_like(sa[0]), torch.empty(sa[0].shape[:2], device=DEV)

    def step():
        tf.paged_attention(*pa, out=out_p, lse=lse_p, workspace=ws)
        tf.shared_prefix_attention(*sa, out=out_s, lse=lse_s, workspace=ws)

    _allocates_nothing_and_replays(step, out_p, out_s)
    close(out_p.float(), ref.paged_attention_reference(*b.args()), "bfloat16")
    close(out_s.float(), ref.shared_prefix_attention_reference(*sp.args()), "bfloat16")


def test_torch_compile_fullgraph_gpu():
    rng = np.random.default_rng(7)
    b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 16), num_q_heads=8,
                                  num_kv_heads=2, head_dim=64, dtype="float16", nan_fill=False)
    args = [T(a) for a in b.args()]

    def f(q, k, v, bt, kv, cu):
        return tf.paged_attention(q * 1.0, k, v, bt, kv, cu, logits_soft_cap=4.0) + 1.0

    got = torch.compile(f, fullgraph=True)(*args)
    torch.testing.assert_close(got, f(*args))


def test_attention_plans_gpu():
    """Plans made from host metadata (copied to the GPU once) equal the wrappers on the
    Triton backend (a mixed batch, a ragged cascade), and decode plans run with out=, lse=
    and workspace= allocate nothing and capture."""
    rng = np.random.default_rng(9)
    b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 16), num_q_heads=8,
                                  num_kv_heads=2, head_dim=128, dtype="bfloat16", nan_fill=False)
    q, k, v = T(b.q), T(b.k_cache), T(b.v_cache)
    host = [_T(a) for a in b.args()[3:]]
    plan = tf.plan_paged_attention(*host, k_cache=k, num_q_heads=8)
    torch.testing.assert_close(plan.run(q, k, v), tf.paged_attention(q, k, v, *host), rtol=0,
                               atol=0)
    sp = testing.make_shared_prefix_batch(rng, [128], [(0, 1, 40), (0, 3, 17), (-1, 1, 9)],
                                          num_q_heads=8, num_kv_heads=2, head_dim=128,
                                          dtype="bfloat16")
    sa = [T(a) for a in sp.args()[:3]]
    sp_host = [_T(a) for a in sp.args()[3:]]
    splan = tf.plan_shared_prefix_attention(*sp_host, k_cache=sa[1], num_q_heads=8)
    assert splan.op == "shared_prefix_attention"
    torch.testing.assert_close(splan.run(*sa), tf.shared_prefix_attention(*sa, *sp_host),
                               rtol=0, atol=0)
    close(splan.run(*sa).float(), ref.shared_prefix_attention_reference(*sp.args()), "bfloat16")
    # decode plans (the shapes test_workspace_calls_allocate_nothing_and_capture captures)
    d = testing.make_ragged_batch(rng, [(1, 4000), (1, 3000)], num_q_heads=8, num_kv_heads=2,
                                  head_dim=128, dtype="bfloat16", nan_fill=False, decode=True)
    dq, dk, dv = T(d.q), T(d.k_cache), T(d.v_cache)
    dplan = tf.plan_paged_attention(_T(d.block_tables), _T(d.kv_lens), k_cache=dk,
                                    num_q_heads=8)
    ds = testing.make_shared_prefix_batch(rng, [128], [(0, 1, 40), (0, 1, 17), (-1, 1, 9)],
                                          num_q_heads=8, num_kv_heads=2, head_dim=128,
                                          dtype="bfloat16", decode=True)
    dsa = [T(a) for a in ds.args()[:3]]
    dsplan = tf.plan_shared_prefix_attention(*(_T(a) for a in ds.args()[3:]), k_cache=dsa[1],
                                             num_q_heads=8)
    ws = torch.empty(max(tf.attention_workspace_size(dq, dk, T(d.block_tables)),
                         tf.attention_workspace_size(dsa[0], dsa[1], T(ds.block_tables),
                                                     prefix_block_tables=T(
                                                         ds.prefix_block_tables))),
                     dtype=torch.uint8, device=DEV)
    out_p, lse_p = torch.empty_like(dq), torch.empty(dq.shape[:2], device=DEV)
    out_s, lse_s = torch.empty_like(dsa[0]), torch.empty(dsa[0].shape[:2], device=DEV)

    def step():
        dplan.run(dq, dk, dv, out=out_p, lse=lse_p, workspace=ws)
        dsplan.run(*dsa, out=out_s, lse=lse_s, workspace=ws)

    _allocates_nothing_and_replays(step, out_p, out_s)
    close(out_p.float(), ref.paged_attention_reference(*d.args()), "bfloat16")
    close(out_s.float(), ref.shared_prefix_attention_reference(*ds.args()), "bfloat16")


def test_plan_update_replays_a_captured_graph():
    """A CUDA graph captured over plan.run replays the next step's metadata after
    plan.update (FlashInfer's CUDA-graph buffers): the plan's tensors keep their addresses."""
    rng = np.random.default_rng(10)
    b = testing.make_ragged_batch(rng, [(1, 4000), (1, 3000), (1, 77)], num_q_heads=8,
                                  num_kv_heads=2, head_dim=128, dtype="bfloat16",
                                  nan_fill=False, decode=True)
    q, k, v = T(b.q), T(b.k_cache), T(b.v_cache)
    plan = tf.plan_paged_attention(_T(b.block_tables), _T(b.kv_lens), k_cache=k,
                                   num_q_heads=8)
    ws = torch.empty(tf.attention_workspace_size(q, k, T(b.block_tables)), dtype=torch.uint8,
                     device=DEV)
    out, lse = torch.empty_like(q), torch.empty(q.shape[:2], device=DEV)
    plan.run(q, k, v, out=out, lse=lse, workspace=ws)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan.run(q, k, v, out=out, lse=lse, workspace=ws)
    # the next step: rows moved, lengths changed, new queries (same shapes)
    tables2 = np.ascontiguousarray(b.block_tables[[2, 0, 1]])
    kv2 = (b.kv_lens[[2, 0, 1]] - np.array([0, 1, 1500])).astype(np.int32)
    q2 = testing.random_values(rng, b.q.shape, "bfloat16")
    q.copy_(T(q2))
    plan.update(_T(tables2), _T(kv2))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    want = ref.paged_attention_reference(q2, b.k_cache, b.v_cache, tables2, kv2)
    close(out.float(), want, "bfloat16")
