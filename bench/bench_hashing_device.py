"""Block hashing through the frameworks, one thread: prefixkv-v1 via the JAX paths (XLA;
the host C chain through pure_callback) and the torch CPU paths (vectorized torch ops; the
host C chain behind the torch op) for 64 sequences x 8192 tokens, block 16, against vLLM's
way today (sha256 of pickle((parent, tuple(tokens), None)) per block, chained) in the same
group; on a CUDA GPU 1024 x 4096 tokens with the Triton and CUDA kernels (skipped
without CUDA; target >= 1 G tokens/s); on a TPU the same tokens through the JAX frontend, the
Pallas kernel against the XLA path (skipped elsewhere; ``-k tpu_hash``).

Every test checks its digests before timing against the host implementation's on the same
tokens (bench_hashing_host.check_words, itself checked against the pure-Python reference on a
slice); the vLLM baseline (``baseline: true``) against its formula on a few blocks.
``speedup_vs_vllm_sha256`` divides bench_hashing_host.vllm_sha256_seconds (the baseline timed
once per shape) by the benchmark's mean. On a TPU the XLA path is the baseline of the Pallas
kernel.

Run: OMP_NUM_THREADS=1 .venv/bin/pytest bench/bench_hashing_device.py --benchmark-only
"""

import hashlib

import numpy as np
import pytest

from bench.bench_hashing_host import (
    _tokens,
    check_vllm,
    check_words,
    vllm_sha256_pickle,
    vllm_sha256_seconds,
)
from bench.conftest import record, seconds

BLOCK_SIZE = 16
CPU_GROUP = "hash-device-64x8192"
CPU_SHAPE = (64, 8192)
GPU_GROUP = "hash-device-gpu-1024x4096"
GPU_SHAPE = (1024, 4096)


def _finish(benchmark, machine_limits, shape, path: str, baseline: bool = False):
    num_tokens = shape[0] * shape[1]
    if baseline:
        benchmark.extra_info["baseline"] = True
    t = seconds(benchmark)
    if t != t:  # not timed (--benchmark-disable)
        return
    extra = {"path": path, "tokens": num_tokens, "block_size": BLOCK_SIZE,
             "tokens_per_s": round(num_tokens / t), "mtokens_per_s": round(num_tokens / t / 1e6, 2)}
    if path != "vllm-sha256-pickle":
        extra["speedup_vs_vllm_sha256"] = round(
            vllm_sha256_seconds(*shape, rounds=1 if shape == GPU_SHAPE else 3) / t, 2)
    # tokens read (4 bytes each), a 32-byte digest written per block
    record(benchmark, machine_limits, bytes_read=4 * num_tokens,
           bytes_written=32 * (num_tokens // BLOCK_SIZE), baseline=baseline, **extra)


def _vllm_baseline(benchmark, limits: dict, group: str, shape, rounds: int):
    benchmark.group = group
    tokens, _ = _tokens(*shape)
    seqs = [s.tolist() for s in tokens.reshape(shape)]  # vLLM holds lists
    parent0 = hashlib.sha256(b"vllm-none-hash").digest()
    if rounds > 1:  # the GPU group's single round is checked instead (~1 s a call)
        check_vllm(vllm_sha256_pickle(seqs, parent0), tokens, shape[0], parent0)
    out = benchmark.pedantic(vllm_sha256_pickle, args=(seqs, parent0), rounds=rounds,
                             iterations=1, warmup_rounds=1 if rounds > 1 else 0)
    check_vllm(out, tokens, shape[0], parent0)
    _finish(benchmark, limits, shape, "vllm-sha256-pickle", baseline=True)


def test_vllm_sha256_pickle_baseline(benchmark, machine_limits):
    _vllm_baseline(benchmark, machine_limits, CPU_GROUP, CPU_SHAPE, rounds=3)


def _bench_jax(benchmark, limits: dict, group: str, shape, backend: str, rounds: int,
               baseline: bool = False):
    """hash_blocks through the JAX frontend under jit, the tokens put on the default device
    first; timed to block_until_ready."""
    import jax
    import jax.numpy as jnp
    from prefixkv.jax_frontend._hashing import hash_blocks

    benchmark.group = group
    tokens, cu = _tokens(*shape)
    tok, cu_j = jax.device_put(jnp.asarray(tokens)), jax.device_put(jnp.asarray(cu))

    @jax.jit
    def run(tok, cu):
        return hash_blocks(tok, BLOCK_SIZE, cu_lens=cu, extra=None, backend=backend)

    check_words(np.asarray(run(tok, cu_j)), *shape)  # compiles
    benchmark.pedantic(lambda: run(tok, cu_j).block_until_ready(), rounds=rounds,
                       iterations=1, warmup_rounds=1 if rounds < 10 else 2)
    _finish(benchmark, limits, shape, f"jax-{backend}", baseline=baseline)
    return tokens.size


@pytest.mark.parametrize("backend", ["xla", "host"])
def test_jax(benchmark, machine_limits, backend):
    pytest.importorskip("jax")
    from prefixkv.jax_frontend._hashing import HASH_BLOCKS_BACKENDS

    why = HASH_BLOCKS_BACKENDS.explain("cpu")[backend]
    if why != "ok":
        pytest.skip(why)
    _bench_jax(benchmark, machine_limits, CPU_GROUP, CPU_SHAPE, backend, rounds=5)


@pytest.mark.parametrize("backend", ["host", "torch"])
def test_torch_cpu(benchmark, machine_limits, backend):
    torch = pytest.importorskip("torch")
    from prefixkv.torch_frontend._hashing import HASH_BLOCKS_BACKENDS, hash_blocks

    why = HASH_BLOCKS_BACKENDS.explain("cpu")[backend]
    if why != "ok":
        pytest.skip(why)
    benchmark.group = CPU_GROUP
    tokens, cu = _tokens(*CPU_SHAPE)
    tok, cu_t = torch.from_numpy(tokens), torch.from_numpy(cu)
    check_words(_torch_words(hash_blocks(tok, BLOCK_SIZE, cu_lens=cu_t, backend=backend)),
                *CPU_SHAPE)
    benchmark.pedantic(lambda: hash_blocks(tok, BLOCK_SIZE, cu_lens=cu_t, backend=backend),
                       rounds=3 if backend == "torch" else 10, iterations=1, warmup_rounds=1)
    _finish(benchmark, machine_limits, CPU_SHAPE, f"torch-{backend}")


def _torch_words(out) -> np.ndarray:
    """A torch u32/i32[n, 8] digest tensor on the host as numpy uint32."""
    import torch

    return out.cpu().view(torch.int32).numpy().view(np.uint32)


def test_vllm_sha256_pickle_baseline_gpu_group(benchmark):
    """vLLM's way on the GPU group's 1024 x 4096 tokens (on the host: it has no device
    path), so the GPU kernels' speedup is measured in the same run."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (the group it is the baseline of)")
    _vllm_baseline(benchmark, {}, GPU_GROUP, GPU_SHAPE, rounds=1)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_torch_gpu(benchmark, backend):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if backend == "cuda":
        pytest.importorskip("cupy")
    from prefixkv.torch_frontend._hashing import hash_blocks

    benchmark.group = GPU_GROUP
    tokens, cu = _tokens(*GPU_SHAPE)
    tok, cu_t = torch.from_numpy(tokens).cuda(), torch.from_numpy(cu).cuda()

    def run():
        out = hash_blocks(tok, BLOCK_SIZE, cu_lens=cu_t, backend=backend)
        torch.cuda.synchronize()
        return out

    check_words(_torch_words(run()), *GPU_SHAPE)
    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=2)
    t = seconds(benchmark)
    # end to end: the call's host work (lengths read back, launch) included; no CPU limits
    _finish(benchmark, {}, GPU_SHAPE, f"torch-{backend}")
    benchmark.extra_info.update(gtokens_per_s=round(tokens.size / t / 1e9, 3),
                                target_gtokens_per_s=1.0, timing="end to end")


@pytest.mark.parametrize("backend", ["pallas_tpu", "xla"])
def test_jax_tpu_hash(benchmark, backend):
    """1024 x 4096 tokens on a TPU, compiled and on the device (the tokens put there first):
    the Pallas kernel (1024 sequences: (4, 128) tiles, two grid rows) and the XLA loop."""
    jax = pytest.importorskip("jax")
    if jax.default_backend() != "tpu":
        pytest.skip("needs a TPU")
    n = _bench_jax(benchmark, {}, "hash-device-tpu-1024x4096", GPU_SHAPE, backend, rounds=10,
                   baseline=backend == "xla")
    benchmark.extra_info.update(gtokens_per_s=round(n / seconds(benchmark) / 1e9, 3),
                                target_gtokens_per_s=1.0)
