"""pytest-benchmark set-up shared by every benchmark: one thread, the machine's measured
limits (copy and read bandwidth, matmul rate) for the roofline fractions in extra_info
(``record``: the byte convention and the baseline mark), and the attention reference the
benchmarks check their ops against before timing (``reference_rows``)."""

import os

# One thread for every framework, set before any of them is imported: on the 2-core CI
# machines figures swing by 100x otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
# XLA:CPU runs its dots and fusions on the PjRt client's thread pool, which the flags above do
# not size: a jitted einsum kept 1.8 of the 2 cores busy. NPROC sizes that pool.
os.environ.setdefault("NPROC", "1")

# NIXL's bundled UCX would load its InfiniBand module, which pulls in the system libibverbs
# (installed for the Mooncake store) and with it a second libnl-route: the two clash in their
# exit-time destructors (SIGSEGV in rtnl_tc_unregister after the run). No test uses RDMA.
os.environ.setdefault("UCX_MODULES", "^ib")

import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def _best(fn, repeat: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _readers(src: np.ndarray) -> dict:
    """Reductions that read all of ``src`` (float32) with little arithmetic, by name: numpy's
    max and sum, and torch's sum over the same memory when torch is installed. Each is held
    back by its own arithmetic (np.sum's pairwise sum read 5.1 GB/s where torch.sum read 7.2
    and np.max 6.0 on the CI machine), so the read bandwidth is the best of them."""
    import importlib.util

    out = {"np.max": lambda: src.max(), "np.sum": lambda: src.sum()}
    if importlib.util.find_spec("torch") is not None:
        import torch

        t = torch.from_numpy(src)
        out["torch.sum"] = lambda: torch.sum(t)
    return out


def measure_machine_limits(nbytes: int = 128 << 20) -> dict:
    """Copy GB/s (read + write bytes), read GB/s (the fastest of _readers, so roofline
    fractions are not overstated by a slow reducer) and float32 matmul GFLOP/s, one thread."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    copy_s = _best(lambda: np.copyto(dst, src))
    read_s = min(_best(fn) for fn in _readers(src).values())
    n = 1024
    a = np.ones((n, n), dtype=np.float32)
    mm_s = _best(lambda: a @ a, repeat=3)
    return {
        "copy_gbps": 2 * nbytes / copy_s / 1e9,  # bytes read + bytes written
        "memcpy_gbps": nbytes / copy_s / 1e9,    # bytes copied
        "read_gbps": nbytes / read_s / 1e9,
        "matmul_gflops": 2 * n**3 / mm_s / 1e9,
    }


#: Environment variable naming a file each benchmark's figures are appended to as one JSON
#: line when it finishes (bench/run_device.sh sets it): pytest-benchmark writes its JSON only
#: when the session ends, so a run stopped by a time limit would otherwise leave nothing.
BENCH_JSONL_ENV = "PREFIXKV_BENCH_JSONL"


#: extra_info key set on a benchmark whose test failed (pytest_runtest_makereport below)
FAILED_KEY = "failed"
_OUTCOME = pytest.StashKey[str]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Mark a benchmark whose test failed: many check their result after timing, so a wrong
    op still has times, and pytest-benchmark's JSON and the stream keep them. The mark goes
    in extra_info (``failed: true``, which bench/report.py flags and never takes as a
    baseline) and the test's outcome in the streamed row."""
    report = yield
    if report.when == "call" or report.failed:
        item.stash[_OUTCOME] = report.outcome
    if report.failed:
        bench = getattr(item, "funcargs", {}).get("benchmark")
        if bench is not None:
            bench.extra_info[FAILED_KEY] = True
    return report


@pytest.fixture(autouse=True)
def _stream_figures(request):
    path = os.environ.get(BENCH_JSONL_ENV)
    if not path or "benchmark" not in request.fixturenames:
        yield
        return
    bench = request.getfixturevalue("benchmark")  # set up first: torn down after this one
    yield
    # the call's report is made before fixtures are torn down: its outcome is known here
    row = {"test": request.node.nodeid, "group": bench.group,
           "outcome": request.node.stash.get(_OUTCOME, "unknown"),
           "extra_info": dict(bench.extra_info)}
    stats = getattr(bench, "stats", None)
    if stats is not None:
        row.update(mean_s=stats.stats.mean, min_s=stats.stats.min, rounds=stats.stats.rounds)
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


@pytest.fixture(scope="session")
def machine_limits():
    """Measured once per run, so every fraction compares against the same machine state."""
    return measure_machine_limits()


#: GPU cycles of torch.cuda._sleep queued ahead of a timed run (~25 ms at 2 GHz): the host
#: enqueues all the calls while the stream sleeps, so the events time the kernels back to
#: back, not the host's launch rate (a ~30 us decode kernel costs ~120 us of Python a call).
QUEUE_AHEAD_CYCLES = 50_000_000


def cuda_seconds(fn, iters: int = 10, repeat: int = 3) -> float:
    """Seconds per call of ``fn`` on the current CUDA stream: CUDA events around ``iters``
    calls queued behind a sleep, best of ``repeat`` runs, after a warm-up call; for device
    timings pytest-benchmark's host clock cannot see. (A call that syncs with the host
    inside still counts its host time.)"""
    import torch

    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(QUEUE_AHEAD_CYCLES)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / iters / 1e3)
    return best


def cuda_benchmark(benchmark, fn, *, rounds: int = 5, warmup_rounds: int = 1,
                   iters: int = 10, repeat: int = 3) -> float:
    """pytest-benchmark's rounds of ``fn`` (each synced, host time) after one untimed call,
    then the GPU seconds per call by CUDA events (cuda_seconds), which it returns."""
    import torch

    fn()
    torch.cuda.synchronize()
    benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=rounds,
                       warmup_rounds=warmup_rounds)
    return cuda_seconds(fn, iters=iters, repeat=repeat)


#: Datasheet HBM GB/s by device-name substring (torch's device name or JAX's device_kind),
#: searched in order, so every entry comes before the shorter names it contains: "GH200"
#: before "H200", "H100 NVL" before "H100". One name covers parts with different memory
#: (A100 40GB: 1555, 80GB: 1935 PCIe / 2039 SXM; GH200 with HBM3 or HBM3e): the variants
#: are listed and the bare name gives 0, unknown, rather than another part's peak.
#: "TPU v5 lite" is v5e, "TPU v5" v5p, "TPU v6 lite" v6e; H100 PCIe has HBM2e.
HBM_GBPS = (("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0),
            ("GH200 480GB", 4000.0), ("GH200", 0.0), ("H200", 4800.0),
            ("A100-SXM4-40GB", 1555.0), ("A100-PCIE-40GB", 1555.0),
            ("A100-SXM4-80GB", 2039.0), ("A100 80GB PCIe", 1935.0), ("A100", 0.0),
            ("TPU v5 lite", 819.0), ("TPU v5", 2765.0), ("TPU v6 lite", 1638.0))


def datasheet_hbm_gbps(device_name: str) -> float:
    """The published HBM bandwidth of a device (its torch name or JAX device_kind); 0 when
    unknown or when the name does not say which variant it is."""
    for name, gbps in HBM_GBPS:
        if name.lower() in device_name.lower():
            return gbps
    return 0.0


_CUDA_LIMITS: dict = {}


def cuda_memory_limits(nbytes: int = 1 << 30) -> dict:
    """The current CUDA device's measured memory bandwidth, once per run: ``read_gbps`` (a
    float32 sum over ``nbytes``, what a decode kernel's KV reads are bounded by) and
    ``copy_gbps`` (read + written bytes of a device-to-device copy). ``nbytes`` is far above
    the L2 cache (50 MB on H100), so both are HBM figures."""
    import torch

    dev = torch.cuda.current_device()
    if dev not in _CUDA_LIMITS:
        src = torch.ones(nbytes // 4, dtype=torch.float32, device="cuda")
        dst = torch.empty_like(src)
        acc = torch.empty((), dtype=torch.float32, device="cuda")
        read_s = cuda_seconds(lambda: torch.sum(src, dim=0, out=acc), iters=10)
        copy_s = cuda_seconds(lambda: dst.copy_(src), iters=10)
        _CUDA_LIMITS[dev] = {"read_gbps": round(nbytes / read_s / 1e9, 1),
                             "copy_gbps": round(2 * nbytes / copy_s / 1e9, 1)}
        del src, dst
        torch.cuda.empty_cache()
    return _CUDA_LIMITS[dev]


_CUDA_MATMUL: dict = {}


def cuda_matmul_tflops(n: int = 8192) -> float:
    """The current CUDA device's measured bfloat16 matmul rate in TFLOP/s (an n x n x n
    torch.matmul with float32 accumulation, as attention's tensor-core dots), once per run:
    what a compute-bound kernel such as prefill attention is held to."""
    import torch

    dev = torch.cuda.current_device()
    if dev not in _CUDA_MATMUL:
        a = torch.randn(n, n, device="cuda").to(torch.bfloat16)
        b = torch.randn(n, n, device="cuda").to(torch.bfloat16)
        c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
        t = cuda_seconds(lambda: torch.matmul(a, b, out=c), iters=10)
        _CUDA_MATMUL[dev] = round(2 * n ** 3 / t / 1e12, 1)
        del a, b, c
        torch.cuda.empty_cache()
    return _CUDA_MATMUL[dev]


def seconds(benchmark, stat: str = "mean") -> float:
    """The benchmark's measured ``stat`` (mean, min, median) in seconds; NaN when it was not
    timed (``--benchmark-disable``: each benchmark runs once, as a smoke test)."""
    stats = getattr(benchmark, "stats", None)
    return getattr(stats.stats, stat) if stats is not None else float("nan")


def record(benchmark, limits: dict, *, bytes_read: float = 0.0, bytes_written: float = 0.0,
           flops: float = 0.0, baseline: bool = False, **extra):
    """Put bytes, GB/s, GFLOP/s and the roofline fraction of the benchmark's mean in extra_info.

    Call after ``benchmark(...)`` ran. The byte convention of every benchmark: ``bytes_read``
    (bytes the op reads from memory) and ``bytes_written`` (bytes it writes), both recorded;
    ``bytes`` = bytes_read + bytes_written and ``gbps`` = bytes / time, so a copy of N bytes
    counts 2N, as ``copy_gbps`` (measure_machine_limits, read + written bytes of np.copyto)
    does. The roofline time is the largest of: bytes_read / read bandwidth (``read_gbps``),
    (bytes_read + bytes_written) / copy bandwidth (``copy_gbps``; only when the op writes), and
    flops / matmul rate; ``roofline_fraction`` = roofline time / measured time, so 1.0 is an
    attention read at the measured read bandwidth or a copy at memcpy speed.

    ``baseline=True`` marks the benchmark as its group's baseline (what a user would write
    without prefixkv): bench/report.py's "vs baseline" column divides by its time (by the
    fastest one's where several are marked, never a failed one's), and shows n/a in a group
    with none marked. Empty ``limits`` (a device figure): no fraction.
    """
    t = seconds(benchmark)
    info = benchmark.extra_info
    info.update(extra)
    if baseline:
        info["baseline"] = True
    info.update({k: round(v, 3) for k, v in limits.items()})
    nbytes = bytes_read + bytes_written
    if nbytes:
        info.update(bytes_read=bytes_read, bytes_written=bytes_written, bytes=nbytes,
                    gbps=round(nbytes / t / 1e9, 3))
    if flops:
        info["gflops"] = round(flops / t / 1e9, 3)
    if not limits:  # a device figure: the CPU limits do not apply
        return
    roof = max(bytes_read / (limits["read_gbps"] * 1e9),
               nbytes / (limits["copy_gbps"] * 1e9) if bytes_written else 0.0,
               flops / (limits["matmul_gflops"] * 1e9))
    if roof:
        info["roofline_fraction"] = round(roof / t, 4)


# ------------------------------------------------------------------- correctness checks

#: blocks of each kind in untouched_blocks' sample
UNTOUCHED_SAMPLE = 64


def torch_write_kv_fn(prefixkv: bool, key, value, k_cache, v_cache, slots, backend=None):
    """A write of key/value rows into the torch caches at ``slots``: prefixkv's write_kv (on
    ``backend``), or the index_copy_ pair a user writes (the baseline); run once and checked
    (every token's K and V row where its slot says), then returned for timing."""
    from prefixkv import torch_frontend as tf

    slots64 = slots.long()
    rows = tuple(key.shape[1:])
    if prefixkv:
        def fn():
            tf.write_kv(key, value, k_cache, v_cache, slots, backend=backend)
    else:
        def fn():
            k_cache.view(-1, *rows).index_copy_(0, slots64, key)
            v_cache.view(-1, *rows).index_copy_(0, slots64, value)
    fn()
    assert k_cache.view(-1, *rows)[slots64].equal(key)
    assert v_cache.view(-1, *rows)[slots64].equal(value)
    return fn


def untouched_blocks(num_blocks: int, touched, keep=(), n: int = UNTOUCHED_SAMPLE,
                     seed: int = 7) -> np.ndarray:
    """int64 ids of blocks a cache op must leave bit-identical, to compare with a copy taken
    before the call: the first and the last block, up to ``n`` neighbours (id +- 1) of the
    ``touched`` blocks (those the op writes), up to ``n`` of ``keep`` (blocks it only reads,
    e.g. a copy's sources) and ``n`` random blocks; never a touched one. A sample, so a check
    stays cheap on a 64k-block cache."""
    rng = np.random.default_rng(seed)
    touched = np.unique(np.asarray(touched, dtype=np.int64))

    def some(ids):
        ids = np.setdiff1d(np.asarray(ids, dtype=np.int64), touched)
        ids = ids[(ids >= 0) & (ids < num_blocks)]
        return ids if ids.size <= n else rng.choice(ids, n, replace=False)

    return np.unique(np.concatenate([
        some([0, num_blocks - 1]), some(np.concatenate([touched - 1, touched + 1])),
        some(keep), some(rng.choice(num_blocks, min(n, num_blocks), replace=False))]))


def check_fp8_decode(got, want) -> None:
    """Every row of an fp8 decode against the reference, relative to the output's scale: the
    outputs are small (|out| ~ 0.1 over 4096 keys), so bf16's absolute tolerance (1.5e-2)
    would pass a 15% error in v_scale; the bf16 output's own rounding is 2^-8 relative."""
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * float(np.abs(want).max()))


def reference_rows(rows, q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens=None, *,
                   host, take=lambda x, idx: x[idx], sinks=None) -> np.ndarray:
    """The numpy reference (prefixkv.paged.reference, float64) of query rows ``rows`` of a
    paged attention call only, so a benchmark can check its op before timing it in well
    under a second.

    q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens: the call's arguments (any
    framework; cu_q_lens None = decode). rows: indices into q's tokens (negative from the
    end). host(x) -> numpy array (float32 for floating inputs); take(x, idx) -> x[idx] for an
    int64 numpy ``idx`` (the caller's framework indexing). Each row becomes a one-token
    sequence over its visible keys (causal: key positions <= its own); only those blocks
    reach the host. sinks: the call's attention sinks or None. Returns
    f32[len(rows), num_q_heads, head_dim].
    """
    from prefixkv.paged.reference import paged_attention_reference

    tables = np.asarray(host(block_tables)).astype(np.int64)
    kv = np.asarray(host(kv_lens)).astype(np.int64)
    num_tokens, bs = q.shape[0], k_cache.shape[1]
    cu = (np.arange(kv.size + 1) if cu_q_lens is None
          else np.asarray(host(cu_q_lens)).astype(np.int64))
    rows = np.asarray([r % num_tokens for r in rows], dtype=np.int64)
    seq = np.searchsorted(cu, rows, side="right") - 1
    lens = kv[seq] - (cu[seq + 1] - cu[seq]) + (rows - cu[seq]) + 1  # keys each row sees
    width = -(-lens // bs)
    ids = np.concatenate([tables[s, :w] for s, w in zip(seq, width, strict=True)])
    starts = np.concatenate([[0], np.cumsum(width)[:-1]])
    own = np.zeros((rows.size, int(width.max())), dtype=np.int32)
    for i, (s0, w) in enumerate(zip(starts, width, strict=True)):
        own[i, :w] = np.arange(s0, s0 + w)
    k, v = (np.asarray(host(take(c, ids)), dtype=np.float32) for c in (k_cache, v_cache))
    qr = np.asarray(host(take(q, rows)), dtype=np.float32)
    sk = None if sinks is None else np.asarray(host(sinks), dtype=np.float32)
    return paged_attention_reference(qr, k, v, own, lens.astype(np.int32), sinks=sk)


def assert_attention_close(got, want, dtype: str) -> None:
    """got (float32 numpy) against the reference with the test suite's tolerance for dtype
    (prefixkv.paged.spec.ATTENTION_TOLERANCE)."""
    from prefixkv.paged.spec import ATTENTION_TOLERANCE

    atol, rtol = ATTENTION_TOLERANCE[dtype]
    np.testing.assert_allclose(np.asarray(got, dtype=np.float32), want, atol=atol, rtol=rtol)
