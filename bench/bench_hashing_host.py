"""Block hashing on the host, one thread: vLLM's way today (sha256 of pickle per 16-token
block, chained, as vllm/utils/hashing.py `sha256` + kv_cache_utils `hash_block_tokens`) against
prefixkv-v1 (compiled C chain; and the `blake3` package called once per block, for scale).

Every test checks its digests before timing: prefixkv-v1 against the digests of the same
tokens by the `blake3` package (prefixkv.paged.hashing.hash_blocks_words, backend "blake3":
not the C kernel under test), themselves checked against the pure-Python reference
(prefixkv.paged.reference) on the first blocks of the first and last sequence; the vLLM
baseline against its formula on a few blocks. The vLLM baseline sets ``baseline: true``;
``speedup_vs_vllm_sha256`` divides vllm_sha256_seconds (the baseline timed once per shape,
whichever test asks first) by the benchmark's mean.

Run: .venv/bin/pytest bench/bench_hashing_host.py --benchmark-only
"""

import functools
import hashlib
import importlib.util
import pickle
import time

import numpy as np
import pytest
from prefixkv.kernels.cpu.hashing import simd
from prefixkv.paged.hashing import hash_blocks, hash_blocks_words
from prefixkv.paged.reference import hash_blocks_reference

from bench.conftest import record, seconds

BLOCK_SIZE = 16
SHAPES = {"hash-1x131072": (1, 131072), "hash-64x8192": (64, 8192)}
#: blocks at the start of the first and the last sequence checked against the reference
REFERENCE_BLOCKS = 4


@functools.cache
def _tokens(num_seqs: int, seq_len: int):
    """(tokens i32[num_seqs * seq_len], cu_lens), fixed seed; the callers do not modify them."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 150_000, num_seqs * seq_len).astype(np.int32)
    cu = (np.arange(num_seqs + 1) * seq_len).astype(np.int32)
    return tokens, cu


@functools.cache
def want_words(num_seqs: int, seq_len: int) -> np.ndarray:
    """u32[num_blocks, 8]: the prefixkv-v1 digests of _tokens(num_seqs, seq_len) by the
    `blake3` package (backend "blake3", independent of the C kernel the benchmarks time; the
    C kernel where it is not installed, as on the lent GPU machines' image, which the CPU
    suite checks against it; the C kernel's own benchmark then rests on the reference slices
    alone), after checking its first REFERENCE_BLOCKS blocks of the first and of the last
    sequence against the pure-Python reference (~5k compressions/s: a slice only)."""
    tokens, cu = _tokens(num_seqs, seq_len)
    oracle = "blake3" if importlib.util.find_spec("blake3") else "c"
    words = hash_blocks_words(tokens, BLOCK_SIZE, cu_lens=cu, backend=oracle)
    per_seq, n = seq_len // BLOCK_SIZE, REFERENCE_BLOCKS * BLOCK_SIZE
    for s in (0, num_seqs - 1):
        ref = hash_blocks_reference(tokens[cu[s]:cu[s] + n], BLOCK_SIZE)
        np.testing.assert_array_equal(words[s * per_seq:s * per_seq + REFERENCE_BLOCKS], ref)
    return words


def check_words(got, num_seqs: int, seq_len: int) -> None:
    """Digests as u32[num_blocks, 8] (any int32/uint32 numpy array), exactly."""
    got = np.asarray(got)
    want = want_words(num_seqs, seq_len)
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_array_equal(got.view(np.uint32), want)


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


def check_vllm(out: list[bytes], tokens: np.ndarray, num_seqs: int, parent0: bytes) -> None:
    """The baseline's digests: one per full block, the first two blocks of the first sequence
    and the first of the last recomputed here (the last one starts its chain at parent0)."""
    per_seq = tokens.size // num_seqs // BLOCK_SIZE
    assert len(out) == num_seqs * per_seq

    def digest(parent, lo):
        blk = tuple(int(t) for t in tokens[lo:lo + BLOCK_SIZE])
        return hashlib.sha256(pickle.dumps((parent, blk, None),
                                           protocol=pickle.HIGHEST_PROTOCOL)).digest()

    assert out[0] == digest(parent0, 0)
    assert out[1] == digest(out[0], BLOCK_SIZE)
    last = (num_seqs - 1) * per_seq
    assert out[last] == digest(parent0, last * BLOCK_SIZE)


@functools.cache
def vllm_sha256_seconds(num_seqs: int, seq_len: int, rounds: int = 3) -> float:
    """Mean seconds of the vLLM baseline over _tokens(num_seqs, seq_len) (``rounds`` calls
    after one warm-up), measured once per shape: the speedups' denominator, whichever test
    runs first."""
    tokens, _ = _tokens(num_seqs, seq_len)
    seqs = [s.tolist() for s in tokens.reshape(num_seqs, seq_len)]
    parent0 = hashlib.sha256(b"seed").digest()
    vllm_sha256_pickle(seqs, parent0)
    t0 = time.perf_counter()
    for _ in range(rounds):
        vllm_sha256_pickle(seqs, parent0)
    return (time.perf_counter() - t0) / rounds


def _finish(benchmark, machine_limits, group: str, num_tokens: int, path: str):
    t = seconds(benchmark)
    baseline = path == "vllm-sha256-pickle"
    extra = {"path": path, "tokens": num_tokens, "block_size": BLOCK_SIZE,
             "mtokens_per_s": round(num_tokens / t / 1e6, 2)}
    if not baseline and t == t:  # timed (not --benchmark-disable)
        extra["speedup_vs_vllm_sha256"] = round(vllm_sha256_seconds(*SHAPES[group]) / t, 2)
    # tokens read (4 bytes each), a 32-byte digest written per block
    record(benchmark, machine_limits, bytes_read=4 * num_tokens,
           bytes_written=32 * (num_tokens // BLOCK_SIZE), baseline=baseline, **extra)


@pytest.mark.parametrize("group", list(SHAPES))
def test_vllm_sha256_pickle_baseline(benchmark, machine_limits, group):
    benchmark.group = group
    num_seqs, seq_len = SHAPES[group]
    tokens, _ = _tokens(num_seqs, seq_len)
    seqs = [s.tolist() for s in tokens.reshape(num_seqs, seq_len)]  # vLLM holds lists
    none_hash = hashlib.sha256(b"seed").digest()
    check_vllm(vllm_sha256_pickle(seqs, none_hash), tokens, num_seqs, none_hash)
    benchmark.pedantic(vllm_sha256_pickle, args=(seqs, none_hash), rounds=3, warmup_rounds=1)
    _finish(benchmark, machine_limits, group, tokens.size, "vllm-sha256-pickle")


@pytest.mark.parametrize("group", list(SHAPES))
def test_prefixkv_v1_blake3_package(benchmark, machine_limits, group):
    """The `blake3` package once per block (the fallback when the C kernel is not built)."""
    benchmark.group = group
    tokens, cu = _tokens(*SHAPES[group])
    kwargs = {"cu_lens": cu, "backend": "blake3"}
    check_words(hash_blocks_words(tokens, BLOCK_SIZE, **kwargs), *SHAPES[group])
    benchmark.pedantic(hash_blocks_words, args=(tokens, BLOCK_SIZE), kwargs=kwargs, rounds=3,
                       warmup_rounds=1)
    _finish(benchmark, machine_limits, group, tokens.size, "prefixkv-v1 blake3 package")


@pytest.mark.parametrize("group", list(SHAPES))
def test_prefixkv_v1_c(benchmark, machine_limits, group):
    """prefixkv.paged.hash_blocks as users call it: list of 32-byte digests, C kernel."""
    benchmark.group = group
    tokens, cu = _tokens(*SHAPES[group])
    out = hash_blocks(tokens, BLOCK_SIZE, cu_lens=cu)
    check_words(np.frombuffer(b"".join(out), dtype="<u4").reshape(len(out), 8),
                *SHAPES[group])
    benchmark.pedantic(hash_blocks, args=(tokens, BLOCK_SIZE), kwargs={"cu_lens": cu},
                       rounds=20, warmup_rounds=2)
    _finish(benchmark, machine_limits, group, tokens.size, f"prefixkv-v1 C ({simd()})")
