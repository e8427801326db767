"""Block copies through prefixkv.torch_frontend vs what a user writes without them.

CPU (one thread): gather_blocks (into a new buffer, and into the caller's with out=) /
swap_blocks of every layer's K and V of a model-shaped
cache (16 layers x K,V, blocks [16, 8, 128] bf16; copy_blocks is in bench_cache_ops.py) vs a
Python loop of per-block copies (the baseline), against the measured copy bandwidth. GPU
(skipped without CUDA): device <-> pinned host swap of all layers' blocks, the CUDA C kernel
(one launch) and the torch path, vs the vectorised form a user writes (the baseline: per
cache, ``index_select`` on the device into a staging buffer and one pinned copy, or one pinned
copy into the staging buffer and ``index_copy_``), a per-block ``copy_`` loop (an extra row,
8192 launches a call) and one contiguous copy of the same bytes (the measured PCIe bandwidth).
Their ``kernel_s`` is CUDA-event time per call (bench/report.py compares those).

Each op's result is checked exactly before timing. Bytes follow bench.conftest.record: every
moved block counts as read and as written (``bytes`` = 2 x the blocks' bytes, as the
machine's ``copy_gbps`` counts np.copyto), so ``roofline_fraction`` is the fraction of memcpy
speed; the GPU swaps report ``link_gbps`` and ``pcie_gbps`` (bytes across PCIe, each once) and
``pcie_fraction``, the fraction of a contiguous copy's speed.

Run: OMP_NUM_THREADS=1 .venv/bin/pytest bench/bench_torch_copy.py --benchmark-only
"""

from __future__ import annotations

import functools
import math

import pytest

torch = pytest.importorskip("torch")

from bench.conftest import cuda_benchmark, cuda_seconds, record  # noqa: E402
from prefixkv import torch_frontend as tf  # noqa: E402

torch.set_num_threads(1)

LAYERS, NUM_BLOCKS, BLOCK_SHAPE, MOVE = 16, 256, (16, 8, 128), 64


def _caches(device="cpu", num_blocks=NUM_BLOCKS):
    """Every layer's K and V, bf16 blocks of BLOCK_SHAPE, drawn on ``device``."""
    g = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(num_blocks, *BLOCK_SHAPE, generator=g, device=device).to(torch.bfloat16)
            for _ in range(2 * LAYERS)]


def _ids(n=MOVE, num_blocks=NUM_BLOCKS, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num_blocks, generator=g)[:n].to(torch.int32).to(device)


def _moved_bytes(caches, n=MOVE):
    """Bytes of the n blocks moved from every cache, each counted once (read once, written
    once)."""
    return n * sum(c[0].numel() * c.element_size() for c in caches)


def _cpu_gather(benchmark, machine_limits, impl: str, reuse: bool) -> None:
    """gather_blocks of MOVE blocks of every layer's K and V, or the loop of per-block copies a
    user would write, checked then timed: into a new buffer each call, or (``reuse``) into
    one staging buffer reused call after call (gather_blocks(out=)), where neither pays the
    page faults of a new output."""
    caches, ids = _caches(), _ids()
    id_list = ids.tolist()
    shape = (len(id_list), len(caches), *BLOCK_SHAPE)
    staging = torch.zeros(shape, dtype=torch.bfloat16) if reuse else None

    def loop():
        buf = staging if reuse else torch.empty(shape, dtype=torch.bfloat16)
        for i, b in enumerate(id_list):
            for c, cache in enumerate(caches):
                buf[i, c].copy_(cache[b])
        return buf

    fn = loop if impl == "loop_baseline" else (lambda: tf.gather_blocks(caches, ids,
                                                                        out=staging))
    want = torch.stack([torch.stack([c[b] for c in caches]) for b in id_list])
    assert torch.equal(fn(), want)
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
    nbytes = _moved_bytes(caches)
    record(benchmark, machine_limits, bytes_read=nbytes, bytes_written=nbytes, impl=impl,
           baseline=impl == "loop_baseline")


@pytest.mark.parametrize("impl", ["prefixkv", "loop_baseline"])
def test_cpu_gather_blocks(benchmark, machine_limits, impl):
    benchmark.group = "cpu-gather-blocks"
    _cpu_gather(benchmark, machine_limits, impl, reuse=False)


@pytest.mark.parametrize("impl", ["prefixkv_out", "loop_baseline"])
def test_cpu_gather_blocks_into_buffer(benchmark, machine_limits, impl):
    """Into the caller's staging buffer, reused call after call (gather_blocks(out=))."""
    benchmark.group = "cpu-gather-blocks-into-buffer"
    _cpu_gather(benchmark, machine_limits, impl, reuse=True)


def _cpu_swap(benchmark, machine_limits, impl: str, dst) -> None:
    """swap_blocks of MOVE blocks of every layer's K and V into ``dst`` (MOVE * 2 zeroed blocks
    each), or the loop a user would write, checked then timed."""
    src = _caches()
    src_ids, dst_ids = _ids(), _ids(num_blocks=MOVE * 2, seed=2)
    pairs = list(zip(src_ids.tolist(), dst_ids.tolist(), strict=True))

    def loop():
        for a, b in zip(src, dst, strict=True):
            for s, d in pairs:
                b[d].copy_(a[s])

    fn = (lambda: tf.swap_blocks(src, dst, src_ids, dst_ids)) if impl == "prefixkv" else loop
    fn()
    s64, d64 = src_ids.long(), dst_ids.long()
    untouched = torch.ones(MOVE * 2, dtype=torch.bool)
    untouched[d64] = False
    for a, b in zip(src, dst, strict=True):  # the named blocks copied, the others still 0
        assert torch.equal(b[d64], a[s64]) and not b[untouched].any()
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
    nbytes = _moved_bytes(src)
    record(benchmark, machine_limits, bytes_read=nbytes, bytes_written=nbytes, impl=impl,
           baseline=impl == "loop_baseline")


@pytest.mark.parametrize("impl", ["prefixkv", "loop_baseline"])
def test_cpu_swap_blocks(benchmark, machine_limits, impl):
    benchmark.group = "cpu-swap-blocks"
    _cpu_swap(benchmark, machine_limits, impl,
              [torch.zeros(MOVE * 2, *BLOCK_SHAPE, dtype=torch.bfloat16)
               for _ in range(2 * LAYERS)])


@pytest.mark.parametrize("impl", ["prefixkv", "loop_baseline"])
def test_cpu_swap_blocks_into_one_buffer(benchmark, machine_limits, impl):
    """Into every layer's K and V as views of one block-major host buffer [blocks, layers * 2,
    *block] (a block's data for all layers together, the offload staging layout): every view
    spans the whole buffer, so the overlap checks must tell apart views that interleave."""
    benchmark.group = "cpu-swap-blocks-one-buffer"
    buf = torch.zeros(MOVE * 2, 2 * LAYERS, *BLOCK_SHAPE, dtype=torch.bfloat16)
    _cpu_swap(benchmark, machine_limits, impl, [buf[:, i] for i in range(2 * LAYERS)])


# ----------------------------------------------------------------------------------- GPU


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


GPU_BLOCKS, GPU_MOVE = 1024, 256


@functools.cache
def _gpu_swap_caches():
    """The caches on the GPU (drawn there) and pinned host twins for the moved blocks
    (contents set by each test before its check), shared by every GPU swap test: host draws
    took ~5 s a test."""
    host = [torch.empty(GPU_MOVE, *BLOCK_SHAPE, dtype=torch.bfloat16, pin_memory=True)
            for _ in range(2 * LAYERS)]
    return _caches("cuda", GPU_BLOCKS), host


@cuda
@pytest.mark.parametrize("direction", ["offload", "onload"])
@pytest.mark.parametrize("impl", ["cuda-c", "torch", "index_select_baseline",
                                  "per_block_loop", "contiguous_copy"])
def test_gpu_swap_blocks(benchmark, impl, direction):
    if impl == "cuda-c":
        pytest.importorskip("cupy")
    benchmark.group = f"gpu-swap-{direction}"
    move = GPU_MOVE
    nbytes = 2 * LAYERS * move * math.prod(BLOCK_SHAPE) * 2  # what _moved_bytes counts
    flat_dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    flat_host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    if impl != "contiguous_copy":
        dev, host = _gpu_swap_caches()
        dev_ids = _ids(move, GPU_BLOCKS, device="cuda")
        host_ids = torch.arange(move, dtype=torch.int32)
        pairs = list(zip(dev_ids.tolist(), host_ids.tolist(), strict=True))
    if impl == "index_select_baseline":  # what a user writes: vectorised, per cache
        # the host twins hold the blocks in host_ids order (0..move-1), so one pinned copy a
        # cache is the whole host side; one device staging buffer, reused in stream order
        assert host_ids.tolist() == list(range(move))
        ids64 = dev_ids.long()
        stage = torch.empty(move, *BLOCK_SHAPE, dtype=torch.bfloat16, device="cuda")
        if direction == "offload":
            def fn():
                for d, h in zip(dev, host, strict=True):
                    torch.index_select(d, 0, ids64, out=stage)
                    h.copy_(stage, non_blocking=True)
        else:
            def fn():
                for d, h in zip(dev, host, strict=True):
                    stage.copy_(h, non_blocking=True)
                    d.index_copy_(0, ids64, stage)
    elif impl == "per_block_loop":  # one async copy per block (an extra row)
        src_c, dst_c = (dev, host) if direction == "offload" else (host, dev)

        def fn():
            for a, b in zip(src_c, dst_c, strict=True):
                for d, h in pairs:
                    if direction == "offload":
                        b[h].copy_(a[d], non_blocking=True)
                    else:
                        b[d].copy_(a[h], non_blocking=True)
    elif impl == "contiguous_copy":  # the measured PCIe bandwidth: one big cudaMemcpy
        if direction == "offload":
            def fn():
                flat_host.copy_(flat_dev, non_blocking=True)
        else:
            def fn():
                flat_dev.copy_(flat_host, non_blocking=True)
    elif direction == "offload":
        def fn():
            tf.swap_blocks(dev, host, dev_ids, host_ids, backend=impl)
    else:
        def fn():
            tf.swap_blocks(host, dev, host_ids, dev_ids, backend=impl)
    if impl != "contiguous_copy":
        _check_gpu_swap(fn, dev, host, dev_ids, direction)
    slow = impl == "per_block_loop"  # 8192 launches a call
    t = cuda_benchmark(benchmark, fn, rounds=2 if slow else 5, iters=2 if slow else 10,
                       repeat=1 if slow else 3)
    pcie = cuda_seconds((lambda: flat_host.copy_(flat_dev, non_blocking=True))
                         if direction == "offload"
                         else (lambda: flat_dev.copy_(flat_host, non_blocking=True)))
    if impl == "index_select_baseline":
        benchmark.extra_info["baseline"] = True
    # bytes read + written as bench.conftest.record counts copies; the rates are of the bytes
    # that cross PCIe (each once), the usual figure for a link (~55 GB/s for Gen5 x16)
    benchmark.extra_info.update(
        impl=impl, direction=direction, bytes_read=nbytes, bytes_written=nbytes,
        bytes=2 * nbytes, kernel_s=t, link_gbps=round(nbytes / t / 1e9, 2),
        pcie_gbps=round(nbytes / pcie / 1e9, 2), pcie_fraction=round(pcie / t, 3))


#: GPU swap blocks whose contents are checked (of every cache): the first, one inside, the last
CHECK_BLOCKS = (0, 97, GPU_MOVE - 1)


def _check_gpu_swap(fn, dev, host, dev_ids, direction) -> None:
    """One call of ``fn`` moves the blocks: host twin j <-> device block dev_ids[j]. The side
    written is first given other contents (the device blocks of a shifted id list, and for
    the onload the host twins of a neighbouring cache), so a call that writes nothing or the
    wrong blocks fails."""
    n = len(dev)
    ids = dev_ids.long()
    if direction == "offload":
        for h in host:
            h.zero_()
    else:
        for c, h in enumerate(host):
            h.copy_(dev[(c + 1) % n][ids.roll(1)].cpu())
    torch.cuda.synchronize()
    fn()
    torch.cuda.synchronize()
    j = torch.tensor(CHECK_BLOCKS)
    for c in (0, n // 2, n - 1):
        assert torch.equal(host[c][j], dev[c][ids[j.cuda()]].cpu()), (direction, c)
