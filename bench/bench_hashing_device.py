"""Block hashing through the frameworks, one thread: prefixkv-v1 via the JAX paths (XLA;
the host C chain through pure_callback) and the torch CPU paths (vectorized torch ops; the
host C chain behind the torch op) for 64 sequences x 8192 tokens, block 16, against vLLM's
way today (sha256 of pickle((parent, tuple(tokens), None)) per block, chained) in the same
group; on a CUDA GPU 1024 x 4096 tokens with the Triton and CUDA kernels (skipped
without CUDA; target >= 1 G tokens/s); on a TPU the same tokens through the JAX frontend, the
Pallas kernel against the XLA path (skipped elsewhere; ``-k tpu_hash``).

Run: OMP_NUM_THREADS=1 .venv/bin/pytest bench/bench_hashing_device.py --benchmark-only
"""

import hashlib

import numpy as np
import pytest

from bench.bench_hashing_host import vllm_sha256_pickle
from bench.conftest import record, seconds

BLOCK_SIZE = 16
CPU_GROUP = "hash-device-64x8192"
CPU_SHAPE = (64, 8192)
GPU_GROUP = "hash-device-gpu-1024x4096"
GPU_SHAPE = (1024, 4096)
_baseline_s: dict[str, float] = {}  # group -> baseline mean seconds (same run)


def _tokens(num_seqs: int, seq_len: int):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 150_000, num_seqs * seq_len).astype(np.int32)
    cu = (np.arange(num_seqs + 1) * seq_len).astype(np.int32)
    return tokens, cu


def _finish(benchmark, machine_limits, group: str, num_tokens: int, path: str):
    t = seconds(benchmark)
    if t != t:  # not timed (--benchmark-disable)
        return
    extra = {"path": path, "tokens": num_tokens, "block_size": BLOCK_SIZE,
             "tokens_per_s": round(num_tokens / t), "mtokens_per_s": round(num_tokens / t / 1e6, 2)}
    if path == "vllm-sha256-pickle":
        _baseline_s[group] = t
    elif group in _baseline_s:
        extra["speedup_vs_vllm_sha256"] = round(_baseline_s[group] / t, 2)
    record(benchmark, machine_limits, nbytes=4 * num_tokens, **extra)


def _vllm_baseline(benchmark, limits: dict, group: str, shape, rounds: int):
    benchmark.group = group
    tokens, _ = _tokens(*shape)
    seqs = [s.tolist() for s in tokens.reshape(shape)]  # vLLM holds lists
    parent0 = hashlib.sha256(b"vllm-none-hash").digest()
    out = benchmark.pedantic(vllm_sha256_pickle, args=(seqs, parent0), rounds=rounds,
                             iterations=1, warmup_rounds=1 if rounds > 1 else 0)
    assert len(out) == tokens.size // BLOCK_SIZE
    _finish(benchmark, limits, group, tokens.size, "vllm-sha256-pickle")


def test_vllm_sha256_pickle_baseline(benchmark, machine_limits):
    _vllm_baseline(benchmark, machine_limits, CPU_GROUP, CPU_SHAPE, rounds=3)


def _bench_jax(benchmark, limits: dict, group: str, shape, backend: str, rounds: int):
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

    out = benchmark.pedantic(lambda: run(tok, cu_j).block_until_ready(), rounds=rounds,
                             iterations=1, warmup_rounds=1 if rounds < 10 else 2)
    assert out.shape == (tokens.size // BLOCK_SIZE, 8)
    _finish(benchmark, limits, group, tokens.size, f"jax-{backend}")
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
    out = benchmark.pedantic(lambda: hash_blocks(tok, BLOCK_SIZE, cu_lens=cu_t, backend=backend),
                             rounds=3 if backend == "torch" else 10, iterations=1,
                             warmup_rounds=1)
    assert out.shape == (tokens.size // BLOCK_SIZE, 8)
    _finish(benchmark, machine_limits, CPU_GROUP, tokens.size, f"torch-{backend}")


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

    out = benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=2)
    assert out.shape == (tokens.size // BLOCK_SIZE, 8)
    t = seconds(benchmark)
    # end to end: the call's host work (lengths read back, launch) included; no CPU limits
    _finish(benchmark, {}, GPU_GROUP, tokens.size, f"torch-{backend}")
    benchmark.extra_info.update(gtokens_per_s=round(tokens.size / t / 1e9, 3),
                                target_gtokens_per_s=1.0, timing="end to end")


@pytest.mark.parametrize("backend", ["pallas_tpu", "xla"])
def test_jax_tpu_hash(benchmark, backend):
    """1024 x 4096 tokens on a TPU, compiled and on the device (the tokens put there first):
    the Pallas kernel (1024 sequences: (4, 128) tiles, two grid rows) and the XLA loop."""
    jax = pytest.importorskip("jax")
    if jax.default_backend() != "tpu":
        pytest.skip("needs a TPU")
    n = _bench_jax(benchmark, {}, "hash-device-tpu-1024x4096", GPU_SHAPE, backend, rounds=10)
    benchmark.extra_info.update(gtokens_per_s=round(n / seconds(benchmark) / 1e9, 3),
                                target_gtokens_per_s=1.0)
