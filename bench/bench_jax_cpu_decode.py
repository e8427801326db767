"""JAX decode paged attention on this CPU, one thread: the compiled FFI kernel
(kernels/cpu/xla_attention.cc, what ``jf.paged_attention`` runs for decode on CPU) next to the
XLA composite it replaced and the obvious jnp baseline (gather by block table, then dense
attention). Llama-3-8B-like shapes: 32 q heads, 8 kv heads, head_dim 128, block_size 16,
8 sequences x 4096 keys.

    OMP_NUM_THREADS=1 .venv/bin/pytest bench/bench_jax_cpu_decode.py --benchmark-only

Each variant's output is checked against the numpy reference before timing
(bench_jax_attention.check_decode). extra_info: bytes of KV read, GB/s, GFLOP/s, the roofline
fraction of the mean (bench.conftest.record: max(bytes / measured read bandwidth, flops /
measured matmul rate) / time) and of the fastest round (``roofline_fraction_min``);
``baseline: true`` on the jnp baseline.

Measured here (2 cores, the other one idle; runs swing by 30%), 2026-11-30, after the kernel's
prefetches moved to L2: read 27.8 GB/s, matmul 95.5 GFLOP/s; float32 ffi mean 22.4 / median
21.8 ms (roofline 0.43 of the mean, 0.45 of the min), XLA composite 42.3 / 42.3 (0.23), jnp
baseline 423 / 415 (0.023); bfloat16 ffi 11.6 / 11.4 (0.48, 0.53), XLA 35.6 / 35.4 (0.16),
baseline 271 / 278 (0.021). The same day with L1 prefetches: float32 ffi 29.5 ms (0.30),
bfloat16 17.1 (0.31); later with the AVX512-BF16 q.k, two runs (read 31-34 GB/s): float32
14.8 / 15.0 ms (0.53, 0.58 of the min), bfloat16 9.1 / 9.5 (0.57, 0.55), XLA composite
41 / 35 ms.
"""

from __future__ import annotations

import pytest

from bench.conftest import record, seconds

jax = pytest.importorskip("jax")
from prefixkv.jax_frontend import _xla  # noqa: E402
from prefixkv.kernels.cpu import xla_ffi  # noqa: E402

from bench.bench_jax_attention import D, _decode_cost, check_decode  # noqa: E402
from bench.bench_jax_attention import _decode_inputs as _inputs  # noqa: E402
from prefixkv import jax_frontend as jf  # noqa: E402

TARGET = "prefixkv_cpu_paged_attention_decode"


def _impl(name):
    scale = D ** -0.5
    if name == "ffi_kernel":
        return jax.jit(lambda q, k, v, t, n: jf.paged_attention(q, k, v, t, n))
    if name == "xla_composite":
        return jax.jit(lambda q, k, v, t, n: _xla.ragged_paged_attention(
            q, k, v, t, n, None, scale=scale)[0])
    return jax.jit(lambda q, k, v, t, n: _xla.dense_gather_paged_attention(
        q, k, v, t, n, scale=scale))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", ["ffi_kernel", "xla_composite", "jnp_gather_baseline"])
def test_cpu_decode_8x4096(benchmark, machine_limits, impl, dtype):
    if impl == "ffi_kernel" and not (jax.default_backend() == "cpu" and xla_ffi.available()):
        pytest.skip(f"CPU FFI kernel not in use: {xla_ffi.cpu_cache_ops_path()}")
    benchmark.group = f"jax cpu decode 8x4096 {dtype}"
    args = _inputs(dtype)
    fn = _impl(impl)
    hlo = fn.lower(*args).as_text()
    assert (TARGET in hlo) == (impl == "ffi_kernel"), impl
    # compile in warm-up, and check the output against the reference (a few rows)
    check_decode(jax.block_until_ready(fn(*args)), dtype)
    rounds = {"ffi_kernel": 10, "xla_composite": 5, "jnp_gather_baseline": 3}[impl]
    benchmark.pedantic(lambda: jax.block_until_ready(fn(*args)), rounds=rounds, iterations=1,
                       warmup_rounds=1)
    nbytes, flops = _decode_cost(dtype)
    record(benchmark, machine_limits, bytes_read=nbytes, flops=flops, impl=impl,
           baseline=impl == "jnp_gather_baseline")
    roof = max(nbytes / (machine_limits["read_gbps"] * 1e9),
               flops / (machine_limits["matmul_gflops"] * 1e9))
    benchmark.extra_info["roofline_fraction_min"] = round(roof / seconds(benchmark, "min"), 4)
