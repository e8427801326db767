"""Block hashing on the host, one thread: vLLM's way today (sha256 of pickle per 16-token
block, chained, as vllm/utils/hashing.py `sha256` + kv_cache_utils `hash_block_tokens`) against
prefixkv-v1 (compiled C chain; and the `blake3` package called once per block, for scale).

Run: .venv/bin/pytest bench/bench_hashing_host.py --benchmark-only
"""

import hashlib
import pickle

import numpy as np
import pytest
from prefixkv.kernels.cpu.hashing import simd
from prefixkv.paged.hashing import hash_blocks, hash_blocks_words

from bench.conftest import record, seconds

BLOCK_SIZE = 16
SHAPES = {"hash-1x131072": (1, 131072), "hash-64x8192": (64, 8192)}
_baseline_s: dict[str, float] = {}  # group -> baseline mean seconds (same run)


def _tokens(num_seqs: int, seq_len: int):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 150_000, num_seqs * seq_len).astype(np.int32)
    cu = (np.arange(num_seqs + 1) * seq_len).astype(np.int32)
    return tokens, cu


def vllm_sha256_pickle(seqs: list[list[int]], parent0: bytes) -> list[bytes]:
    """What vLLM does per request with hash algo "sha256": h_i = sha256(pickle((h_{i-1},
    tuple(block tokens), extra_keys))), extra_keys None, only full blocks."""
    out = []
    for seq in seqs:
        parent = parent0
        for i in range(0, len(seq) - BLOCK_SIZE + 1, BLOCK_SIZE):
            data = pickle.dumps((parent, tuple(seq[i:i + BLOCK_SIZE]), None),
                                protocol=pickle.HIGHEST_PROTOCOL)
            parent = hashlib.sha256(data).digest()
            out.append(parent)
    return out


def _finish(benchmark, machine_limits, group: str, num_tokens: int, path: str):
    t = seconds(benchmark)
    extra = {"path": path, "tokens": num_tokens, "block_size": BLOCK_SIZE,
             "mtokens_per_s": round(num_tokens / t / 1e6, 2)}
    if path == "vllm-sha256-pickle":
        _baseline_s[group] = t
    elif group in _baseline_s:
        extra["speedup_vs_vllm_sha256"] = round(_baseline_s[group] / t, 2)
    record(benchmark, machine_limits, nbytes=4 * num_tokens, **extra)


@pytest.mark.parametrize("group", list(SHAPES))
def test_vllm_sha256_pickle_baseline(benchmark, machine_limits, group):
    benchmark.group = group
    num_seqs, seq_len = SHAPES[group]
    tokens, _ = _tokens(num_seqs, seq_len)
    seqs = [s.tolist() for s in tokens.reshape(num_seqs, seq_len)]  # vLLM holds lists
    none_hash = hashlib.sha256(b"seed").digest()
    out = benchmark.pedantic(vllm_sha256_pickle, args=(seqs, none_hash), rounds=3,
                             warmup_rounds=1)
    assert len(out) == num_seqs * seq_len // BLOCK_SIZE
    _finish(benchmark, machine_limits, group, tokens.size, "vllm-sha256-pickle")


@pytest.mark.parametrize("group", list(SHAPES))
def test_prefixkv_v1_blake3_package(benchmark, machine_limits, group):
    """The `blake3` package once per block (the fallback when the C kernel is not built)."""
    benchmark.group = group
    tokens, cu = _tokens(*SHAPES[group])
    out = benchmark.pedantic(hash_blocks_words, args=(tokens, BLOCK_SIZE),
                             kwargs={"cu_lens": cu, "backend": "blake3"}, rounds=3,
                             warmup_rounds=1)
    assert out.shape == (tokens.size // BLOCK_SIZE, 8)
    _finish(benchmark, machine_limits, group, tokens.size, "prefixkv-v1 blake3 package")


@pytest.mark.parametrize("group", list(SHAPES))
def test_prefixkv_v1_c(benchmark, machine_limits, group):
    """prefixkv.paged.hash_blocks as users call it: list of 32-byte digests, C kernel."""
    benchmark.group = group
    tokens, cu = _tokens(*SHAPES[group])
    out = benchmark.pedantic(hash_blocks, args=(tokens, BLOCK_SIZE), kwargs={"cu_lens": cu},
                             rounds=20, warmup_rounds=2)
    assert len(out) == tokens.size // BLOCK_SIZE
    _finish(benchmark, machine_limits, group, tokens.size, f"prefixkv-v1 C ({simd()})")
