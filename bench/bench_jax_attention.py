"""JAX paged attention on this CPU (XLA backend), Llama-3-8B-like shapes: 32 q heads, 8 kv heads,
head_dim 128, block_size 16. Each group runs prefixkv next to the baseline a user would write.

    .venv/bin/pytest bench/bench_jax_attention.py --benchmark-only

Every test first checks its op's output against the float64 numpy reference
(prefixkv.paged.reference, a few query rows: bench.conftest.reference_rows) with the test
suite's tolerance, so a wrong op fails here too (also under --benchmark-disable).

extra_info: bytes of KV read, GB/s, GFLOP/s and the roofline fraction (bench.conftest.record:
max(bytes / measured read bandwidth, flops / measured matmul rate) / time); ``baseline: true``
on the group's baseline.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from bench.conftest import (
    assert_attention_close,
    check_fp8_decode,
    datasheet_hbm_gbps,
    record,
    reference_rows,
    seconds,
)

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from prefixkv.jax_frontend import _xla  # noqa: E402

from prefixkv import jax_frontend as jf  # noqa: E402

HQ, HKV, D, BS = 32, 8, 128, 16


def _cache(rng, num_blocks, dtype):
    shape = (num_blocks, BS, HKV, D)
    return (jnp.asarray(rng.standard_normal(shape, dtype=np.float32)).astype(dtype),
            jnp.asarray(rng.standard_normal(shape, dtype=np.float32)).astype(dtype))


def _host(x) -> np.ndarray:
    """A JAX array on the host; floating ones as float32."""
    return np.asarray(x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x)


def _want(args, rows) -> np.ndarray:
    """The numpy reference of query ``rows`` of paged_attention(*args)."""
    return reference_rows(rows, *args, host=_host)


def _check(out, rows, want, dtype: str) -> None:
    """Query ``rows`` of an op's output [num_tokens, Hq, D] against the reference ``want``."""
    assert_attention_close(_host(out[np.asarray(rows)]), want, dtype)


def _run(benchmark, fn, args, rounds, check=None):
    """Compile (and ``check(output)``) in a warm-up call, then time ``rounds`` calls."""
    out = jax.block_until_ready(fn(*args))
    if check is not None:
        check(out)
    return benchmark.pedantic(lambda: jax.block_until_ready(fn(*args)), rounds=rounds,
                              iterations=1, warmup_rounds=1)


# ------------------------------------------------------------------ decode, batch 8 x 4096

NUM_SEQS, CONTEXT = 8, 4096


#: decode query rows checked against the reference (first and last sequence)
DECODE_ROWS = (0, -1)


@functools.cache
def _decode_inputs(dtype):
    """(q, k_cache, v_cache, block_tables, kv_lens), once per dtype (this module and
    bench_jax_cpu_decode share them)."""
    rng = np.random.default_rng(0)
    blocks = NUM_SEQS * CONTEXT // BS
    k, v = _cache(rng, blocks + 1, dtype)
    tables = jnp.asarray(rng.permutation(blocks + 1)[:blocks].reshape(NUM_SEQS, -1)
                         .astype(np.int32))
    kv_lens = jnp.full((NUM_SEQS,), CONTEXT, jnp.int32)
    q = jnp.asarray(rng.standard_normal((NUM_SEQS, HQ, D), dtype=np.float32)).astype(dtype)
    return q, k, v, tables, kv_lens


@functools.cache
def decode_want(dtype) -> np.ndarray:
    """The reference of DECODE_ROWS of the 8 x 4096 decode, once per dtype."""
    return _want(_decode_inputs(dtype), DECODE_ROWS)


def check_decode(out, dtype) -> None:
    _check(out, DECODE_ROWS, decode_want(dtype), dtype)


def _decode_cost(dtype, num_seqs=NUM_SEQS, context=CONTEXT):
    item = jnp.dtype(dtype).itemsize
    nbytes = 2 * num_seqs * context * HKV * D * item
    flops = 4 * num_seqs * HQ * context * D
    return nbytes, flops


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", ["prefixkv_xla", "jnp_gather_baseline"])
def test_decode_8x4096(benchmark, machine_limits, impl, dtype):
    benchmark.group = f"jax decode 8x4096 {dtype}"
    args = _decode_inputs(dtype)
    if impl == "prefixkv_xla":
        fn = jax.jit(lambda q, k, v, t, n: jf.paged_attention(q, k, v, t, n))
    else:
        fn = jax.jit(lambda q, k, v, t, n: _xla.dense_gather_paged_attention(
            q, k, v, t, n, scale=D ** -0.5))
    _run(benchmark, fn, args, rounds=5 if impl == "prefixkv_xla" else 3,
         check=lambda out: check_decode(out, dtype))
    nbytes, flops = _decode_cost(dtype)
    record(benchmark, machine_limits, bytes_read=nbytes, flops=flops, impl=impl,
           baseline=impl == "jnp_gather_baseline")


@functools.cache
def _hnd_decode_inputs():
    q, k, v, tables, kv_lens = _decode_inputs("bfloat16")
    return q, jnp.swapaxes(k, 1, 2).copy(), jnp.swapaxes(v, 1, 2).copy(), tables, kv_lens


@pytest.mark.parametrize("impl", ["prefixkv_hnd", "prefixkv_nhd"])
def test_decode_8x4096_hnd(benchmark, machine_limits, impl):
    """kv_layout="HND" caches: the CPU decode kernel reads them at their strides, against
    the same decode over NHD caches (the baseline). Before it did, the frontend's transposed
    copy of the named blocks cost 7.6x."""
    benchmark.group = "jax decode 8x4096 bfloat16 HND"
    if impl == "prefixkv_hnd":
        args = _hnd_decode_inputs()
        fn = jax.jit(lambda q, k, v, t, n: jf.paged_attention(q, k, v, t, n, kv_layout="HND"))
    else:
        args = _decode_inputs("bfloat16")
        fn = jax.jit(lambda q, k, v, t, n: jf.paged_attention(q, k, v, t, n))
    _run(benchmark, fn, args, rounds=5, check=lambda out: check_decode(out, "bfloat16"))
    nbytes, flops = _decode_cost("bfloat16")
    record(benchmark, machine_limits, bytes_read=nbytes, flops=flops, impl=impl,
           baseline=impl == "prefixkv_nhd")


#: fp8 decode: the bf16 caches quantized with this scale (a power of two: the dequantized
#: values the reference reads are exact in float32).
FP8_SCALE = 2.0 ** -5


@functools.cache
def _fp8_decode_inputs():
    """The bf16 decode batch with float8_e4m3fn caches quantized from its caches by prefixkv's
    write rule (x / scale, saturated to +-448, round to nearest even)."""
    q, k, v, tables, kv_lens = _decode_inputs("bfloat16")
    k8, v8 = (jnp.clip(c.astype(jnp.float32) / FP8_SCALE, -448, 448).astype(jnp.float8_e4m3fn)
              for c in (k, v))
    return q, k8, v8, tables, kv_lens


@pytest.mark.parametrize("impl", ["prefixkv_xla", "jnp_gather_baseline"])
def test_decode_8x4096_fp8(benchmark, machine_limits, impl):
    """Decode over float8_e4m3fn caches (vLLM's kv_cache_dtype="fp8") with bfloat16 queries,
    k_scale = v_scale = FP8_SCALE: prefixkv vs gathering the blocks, dequantizing them into
    bf16, then dense attention. Bytes: the fp8 KV read."""
    benchmark.group = "jax decode 8x4096 float8_e4m3fn"
    args = _fp8_decode_inputs()
    scale = jnp.float32(FP8_SCALE)
    if impl == "prefixkv_xla":
        fn = jax.jit(lambda q, k, v, t, n, s: jf.paged_attention(q, k, v, t, n, k_scale=s,
                                                                 v_scale=s))
    else:
        def baseline(q, k, v, t, n, s):
            k, v = ((c.astype(jnp.float32) * s).astype(q.dtype) for c in (k, v))
            return _xla.dense_gather_paged_attention(q, k, v, t, n, scale=D ** -0.5)
        fn = jax.jit(baseline)
    q, k8, v8, tables, kv_lens = args
    deq = tuple(c.astype(jnp.float32) * FP8_SCALE for c in (k8, v8))
    want = _want((q, *deq, tables, kv_lens), tuple(range(NUM_SEQS)))  # every sequence
    _run(benchmark, fn, (*args, scale), rounds=5 if impl == "prefixkv_xla" else 3,
         check=lambda out: check_fp8_decode(_host(out), want))
    nbytes = 2 * NUM_SEQS * CONTEXT * HKV * D  # one byte an element
    record(benchmark, machine_limits, bytes_read=nbytes, flops=4 * NUM_SEQS * HQ * CONTEXT * D,
           impl=impl, dtype="float8_e4m3fn", q_dtype="bfloat16",
           baseline=impl == "jnp_gather_baseline")


# ------------------------------------------- shared prefix: 32 x (2048 prefix + 128 own)

SP_SEQS, SP_PREFIX, SP_OWN = 32, 2048, 128


@functools.cache
def _shared_inputs(dtype="float32", num_prefixes=1):
    """SP_SEQS decode sequences split evenly over num_prefixes prefixes of SP_PREFIX tokens,
    SP_OWN own tokens each: the cascade inputs and the same batch as plain paged inputs."""
    rng = np.random.default_rng(1)
    pb, ob = SP_PREFIX // BS, SP_OWN // BS
    k, v = _cache(rng, num_prefixes * pb + SP_SEQS * ob, dtype)
    ids = rng.permutation(num_prefixes * pb + SP_SEQS * ob).astype(np.int32)
    q = jnp.asarray(rng.standard_normal((SP_SEQS, HQ, D), dtype=np.float32)).astype(dtype)
    return _cascade_args(q, k, v, jnp.asarray(ids), num_prefixes, SP_PREFIX, SP_OWN)


#: shared-prefix query rows checked against the reference (first and last sequence: with 4
#: prefixes, the first and the last prefix)
SHARED_ROWS = (0, -1)


@functools.cache
def _shared_want(num_prefixes: int) -> np.ndarray:
    return _want(_shared_inputs(num_prefixes=num_prefixes)[1], SHARED_ROWS)


def _cascade_args(q, k, v, ids, num_prefixes: int, prefix: int, own_len: int):
    """(shared_prefix_attention args, paged_attention args over the same batch): q's
    sequences split evenly over ``num_prefixes`` prefixes of ``prefix`` tokens, ``own_len``
    own tokens each; ``ids`` (a permutation of block ids) gives the prefixes' blocks first,
    then each sequence's own."""
    seqs, i32 = q.shape[0], jnp.int32
    pb, ob = prefix // BS, own_len // BS
    prefix_tables = ids[:num_prefixes * pb].reshape(num_prefixes, pb)
    own = ids[num_prefixes * pb:num_prefixes * pb + seqs * ob].reshape(seqs, ob)
    pid = jnp.repeat(jnp.arange(num_prefixes, dtype=i32), seqs // num_prefixes)
    shared = (q, k, v, prefix_tables, jnp.full((num_prefixes,), prefix, i32), pid, own,
              jnp.full((seqs,), own_len, i32))
    paged = (q, k, v, jnp.concatenate([prefix_tables[pid], own], axis=1),
             jnp.full((seqs,), prefix + own_len, i32))
    return shared, paged


def _shared_floor(benchmark, limits: dict, paged_bytes: float, impl: str,
                  num_prefixes: int = 1) -> None:
    """The physical floor of the cascade op on this machine, one core, in extra_info.

    Shared-prefix attention cannot beat its prefix dots (every query row against every prefix
    key, QK and PV) at the measured matmul rate plus reading the own KV once at the measured
    read bandwidth; paged attention cannot beat reading every sequence's whole KV. Their
    ratio is the best speedup this machine allows (the issue's 5x needs more than one core).
    Reading each prefix once is left out (``prefix_read_ms``, not in the floor): the floor is
    a lower bound, the tighter the fewer the prefixes.
    """
    prefix_flops = 4 * SP_SEQS * HQ * SP_PREFIX * D
    own_bytes = 2 * SP_SEQS * SP_OWN * HKV * D * 4
    dot_floor = prefix_flops / (limits["matmul_gflops"] * 1e9)
    own_floor = own_bytes / (limits["read_gbps"] * 1e9)
    paged_floor = paged_bytes / (limits["read_gbps"] * 1e9)
    info = benchmark.extra_info
    info["dot_floor_ms"] = round(dot_floor * 1e3, 3)
    info["own_floor_ms"] = round(own_floor * 1e3, 3)
    info["paged_floor_ms"] = round(paged_floor * 1e3, 3)
    info["prefix_read_ms"] = round(
        2 * num_prefixes * SP_PREFIX * HKV * D * 4 / (limits["read_gbps"] * 1e9) * 1e3, 3)
    info["best_ratio_on_this_machine"] = round(paged_floor / (dot_floor + own_floor), 3)
    floor = dot_floor + own_floor if impl == "shared_prefix_attention" else paged_floor
    info["floor_fraction"] = round(floor / seconds(benchmark), 4)
    info["floor_fraction_min"] = round(floor / seconds(benchmark, "min"), 4)


@pytest.mark.parametrize("impl", ["shared_prefix_attention", "paged_attention"])
def test_shared_prefix_32x2048(benchmark, machine_limits, impl):
    benchmark.group = "jax shared prefix 32 x (2048 + 128) decode f32"
    shared, paged = _shared_inputs()
    if impl == "shared_prefix_attention":
        fn, args = jax.jit(jf.shared_prefix_attention), shared
        nbytes = 2 * (SP_PREFIX + SP_SEQS * SP_OWN) * HKV * D * 4
    else:
        fn, args = jax.jit(jf.paged_attention), paged
        nbytes = 2 * SP_SEQS * (SP_PREFIX + SP_OWN) * HKV * D * 4
    # 10 rounds: the median of 5 swung by 30% with the other core busy
    _run(benchmark, fn, args, rounds=10,
         check=lambda out: _check(out, SHARED_ROWS, _shared_want(1), "float32"))
    flops = 4 * SP_SEQS * HQ * (SP_PREFIX + SP_OWN) * D
    record(benchmark, machine_limits, bytes_read=nbytes, flops=flops, impl=impl,
           baseline=impl == "paged_attention")
    # the shared path is bound by its dots: the fraction of the measured sgemm rate it reaches
    benchmark.extra_info["matmul_fraction"] = round(
        flops / seconds(benchmark) / 1e9 / machine_limits["matmul_gflops"], 4)
    _shared_floor(benchmark, machine_limits, 2 * SP_SEQS * (SP_PREFIX + SP_OWN) * HKV * D * 4,
                  impl)


@pytest.mark.parametrize("impl", ["prefixkv_fp8", "dequantize_baseline"])
def test_shared_prefix_32x2048_fp8(benchmark, machine_limits, impl):
    """The cascade over float8_e4m3fn caches (bf16 queries, k_scale = v_scale = FP8_SCALE):
    prefixkv reading the fp8 bytes against dequantizing the cache into bf16 first (what a
    caller without fp8 support writes), then the same cascade. Bytes: the fp8 KV read once."""
    benchmark.group = "jax shared prefix 32 x (2048 + 128) decode float8_e4m3fn"
    shared, paged = _shared_inputs("bfloat16")
    k8, v8 = (jnp.clip(c.astype(jnp.float32) / FP8_SCALE, -448, 448).astype(jnp.float8_e4m3fn)
              for c in shared[1:3])
    args = (shared[0], k8, v8, *shared[3:], jnp.float32(FP8_SCALE))
    if impl == "prefixkv_fp8":
        fn = jax.jit(lambda q, k, v, *rest: jf.shared_prefix_attention(
            q, k, v, *rest[:-1], k_scale=rest[-1], v_scale=rest[-1]))
    else:
        def baseline(q, k, v, *rest):
            k, v = ((c.astype(jnp.float32) * rest[-1]).astype(q.dtype) for c in (k, v))
            return jf.shared_prefix_attention(q, k, v, *rest[:-1])
        fn = jax.jit(baseline)
    deq = tuple(c.astype(jnp.float32) * FP8_SCALE for c in (k8, v8))
    want = _want((paged[0], *deq, *paged[3:]), SHARED_ROWS)
    _run(benchmark, fn, args, rounds=5, check=lambda out: _check(out, SHARED_ROWS, want,
                                                                 "bfloat16"))
    nbytes = 2 * (SP_PREFIX + SP_SEQS * SP_OWN) * HKV * D  # one byte an element
    record(benchmark, machine_limits, bytes_read=nbytes,
           flops=4 * SP_SEQS * HQ * (SP_PREFIX + SP_OWN) * D, impl=impl,
           dtype="float8_e4m3fn", q_dtype="bfloat16", baseline=impl == "dequantize_baseline")


@pytest.mark.parametrize("impl", ["shared_prefix_attention", "paged_attention"])
def test_shared_prefix_4x8x2048(benchmark, machine_limits, impl):
    benchmark.group = "jax shared prefix 4 prefixes x 8 x (2048 + 128) decode f32"
    shared, paged = _shared_inputs(num_prefixes=4)
    if impl == "shared_prefix_attention":
        fn, args = jax.jit(jf.shared_prefix_attention), shared
        nbytes = 2 * (4 * SP_PREFIX + SP_SEQS * SP_OWN) * HKV * D * 4
    else:
        fn, args = jax.jit(jf.paged_attention), paged
        nbytes = 2 * SP_SEQS * (SP_PREFIX + SP_OWN) * HKV * D * 4
    _run(benchmark, fn, args, rounds=10,
         check=lambda out: _check(out, SHARED_ROWS, _shared_want(4), "float32"))
    flops = 4 * SP_SEQS * HQ * (SP_PREFIX + SP_OWN) * D
    record(benchmark, machine_limits, bytes_read=nbytes, flops=flops, impl=impl,
           baseline=impl == "paged_attention")
    _shared_floor(benchmark, machine_limits, 2 * SP_SEQS * (SP_PREFIX + SP_OWN) * HKV * D * 4,
                  impl, num_prefixes=4)


@functools.cache
def _sizes_inputs(seqs: int, prefix: int):
    """_cascade_args of ``seqs`` sequences sharing one ``prefix``-token prefix, float32."""
    rng = np.random.default_rng(1)
    pb, ob = prefix // BS, SP_OWN // BS
    k, v = _cache(rng, pb + seqs * ob, "float32")
    ids = jnp.asarray(rng.permutation(pb + seqs * ob).astype(np.int32))
    q = jnp.asarray(rng.standard_normal((seqs, HQ, D), dtype=np.float32))
    return _cascade_args(q, k, v, ids, 1, prefix, SP_OWN)


@functools.cache
def _sizes_want(seqs: int, prefix: int) -> np.ndarray:
    return _want(_sizes_inputs(seqs, prefix)[1], SHARED_ROWS)


@pytest.mark.parametrize("shape", [(2, 256), (8, 1024), (16, 2048), (32, 4096)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", ["shared_prefix_attention", "paged_attention"])
def test_shared_prefix_sizes(benchmark, machine_limits, impl, shape):
    """The XLA cascade against paged attention over the same batch from 2 sequences sharing a
    256-token prefix to 32 sharing 4096 (decode, 128 own tokens each, float32): on a CPU the
    op runs as paged attention where no prefix group is big enough to gain from the cascade
    (_xla.CPU_CASCADE_MIN_SCORES), so it should stay near paged attention below and pull
    ahead above."""
    seqs, prefix = shape
    benchmark.group = f"jax shared prefix f32 {seqs} x ({prefix} + {SP_OWN})"
    shared, paged = _sizes_inputs(seqs, prefix)
    fn, args = ((jax.jit(jf.shared_prefix_attention), shared)
                if impl == "shared_prefix_attention" else (jax.jit(jf.paged_attention), paged))
    _run(benchmark, fn, args, rounds=10,
         check=lambda out: _check(out, SHARED_ROWS, _sizes_want(seqs, prefix), "float32"))
    record(benchmark, machine_limits, bytes_read=2 * (prefix + seqs * SP_OWN) * HKV * D * 4,
           flops=4 * seqs * HQ * (prefix + SP_OWN) * D, impl=impl,
           baseline=impl == "paged_attention",
           note="bytes = unique KV (prefix once + own tokens)")


# ----------------------------------- prefill: 512 new tokens over 4096 cached, vs recompute

PF_CACHED, PF_NEW = 4096, 512


def gather_prefill_attention(args, q_len: int, try_cudnn: bool | None = None):
    """(jitted baseline, the implementation that ran, why cuDNN did not or None): prefill
    over cached blocks as a user writes it in jnp without a paged kernel (bench_torch_attention's
    baseline_prefill): gather each sequence's blocks by its block table (jnp.take), then
    jax.nn.dot_product_attention over them with the causal mask aligned to the end (a
    sequence's ``q_len`` new tokens are its last). args: paged_attention's (q, k_cache,
    v_cache, block_tables, kv_lens, cu_q_lens), every sequence with ``q_len`` new tokens; the
    function takes them and returns q's shape, as the paged call. cuDNN as
    dense_causal_attention: on a GPU unless it refuses, else XLA."""
    def make(implementation):
        def fn(q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens):
            num_seqs, width = block_tables.shape
            _, bs, hkv, d = k_cache.shape
            k, v = (jnp.take(c, block_tables, axis=0).reshape(num_seqs, width * bs, hkv, d)
                    for c in (k_cache, v_cache))
            # each new token's own position: it sees the keys up to it
            own = kv_lens[:, None] - q_len + jnp.arange(q_len)[None, :]      # [S, q_len]
            mask = jnp.arange(width * bs)[None, None, :] <= own[:, :, None]  # [S, q_len, T]
            out = jax.nn.dot_product_attention(
                q.reshape(num_seqs, q_len, -1, d), k, v, mask=mask[:, None],
                implementation=implementation)
            return out.reshape(q.shape)
        return jax.jit(fn)

    return _cudnn_else_xla(make, args, try_cudnn)


@pytest.mark.parametrize("impl", ["prefill_512_over_cached_4096", "jnp_gather_baseline_512",
                                  "recompute_4608"])
def test_prefill_over_cached_prefix(benchmark, machine_limits, impl):
    """Prefill of 512 new tokens over 4096 cached against the jnp gather + masked attention
    baseline over the same cache (gather_prefill_attention) and against recomputing all 4608
    tokens; both baselines marked (bench/report.py takes the faster)."""
    benchmark.group = "jax prefill 512 over 4096 cached vs recompute 4608, f32"
    rng = np.random.default_rng(2)
    total = PF_CACHED + PF_NEW
    blocks = total // BS
    k, v = _cache(rng, blocks + 1, "float32")
    tables = jnp.asarray(rng.permutation(blocks + 1)[:blocks][None, :].astype(np.int32))
    kv_lens = jnp.asarray([total], jnp.int32)
    q_len = total if impl == "recompute_4608" else PF_NEW
    q = jnp.asarray(rng.standard_normal((q_len, HQ, D), dtype=np.float32))
    cu = jnp.asarray([0, q_len], jnp.int32)
    args = (q, k, v, tables, kv_lens, cu)
    if impl == "jnp_gather_baseline_512":
        fn, ran, _ = gather_prefill_attention(args, q_len, try_cudnn=False)
        benchmark.extra_info["implementation"] = ran
    else:
        fn = jax.jit(jf.paged_attention)
    rows = (0, q_len // 2, -1)  # the first, a middle and the last query token
    _run(benchmark, fn, args, rounds=2,
         check=lambda out: _check(out, rows, _want(args, rows), "float32"))
    # causal flops: each query row sees its position + 1 keys
    keys = np.arange(total - q_len, total, dtype=np.float64) + 1
    flops = 4 * HQ * D * float(keys.sum())
    record(benchmark, machine_limits, bytes_read=2 * total * HKV * D * 4, flops=flops,
           impl=impl, baseline=impl != "prefill_512_over_cached_4096", query_tokens=q_len)


# -------------------------- mixed: decodes and a prefill chunk in one call (chunked prefill)

MX_DECODES, MX_CONTEXT, MX_CACHED, MX_CHUNK, MX_POOL = 63, 2048, 2048, 256, 1024


@functools.cache
def _mixed_inputs():
    """A vLLM chunked-prefill step: MX_DECODES decodes at MX_CONTEXT tokens, then one
    MX_CHUNK-token chunk over MX_CACHED cached tokens, as (one call's args, the decodes' args
    with cu_q_lens None, the chunk's args); float32. The decodes' tables draw from a pool of
    MX_POOL blocks (shared reads, a small cache to draw); the chunk has blocks of its own."""
    rng = np.random.default_rng(7)
    per_seq, chunk_blocks = MX_CONTEXT // BS, (MX_CACHED + MX_CHUNK) // BS
    k, v = _cache(rng, MX_POOL + chunk_blocks, "float32")
    width = max(per_seq, chunk_blocks)
    tables = np.zeros((MX_DECODES + 1, width), np.int32)
    for s in range(MX_DECODES):
        tables[s, :per_seq] = rng.permutation(MX_POOL)[:per_seq]
    tables[-1, :chunk_blocks] = MX_POOL + np.arange(chunk_blocks)
    kv = np.array([MX_CONTEXT] * MX_DECODES + [MX_CACHED + MX_CHUNK], np.int32)
    cu = np.concatenate([np.arange(MX_DECODES + 1), [MX_DECODES + MX_CHUNK]]).astype(np.int32)
    q = jnp.asarray(rng.standard_normal((MX_DECODES + MX_CHUNK, HQ, D), dtype=np.float32))
    tables, kv, cu = jnp.asarray(tables), jnp.asarray(kv), jnp.asarray(cu)
    one = (q, k, v, tables, kv, cu)
    decodes = (q[:MX_DECODES], k, v, tables[:MX_DECODES], kv[:MX_DECODES])
    chunk = (q[MX_DECODES:], k, v, tables[-1:], kv[-1:],
             jnp.asarray([0, MX_CHUNK], jnp.int32))
    return one, decodes, chunk


@pytest.mark.parametrize("impl", ["prefixkv_one_call", "prefixkv_two_calls"])
def test_mixed_decode_prefill(benchmark, machine_limits, impl):
    """One jitted call over a mixed batch (what a chunked-prefill scheduler hands attention,
    its metadata traced) against the same work as two calls, decodes then the chunk (the
    baseline). On the CPU the one call runs its decodes through the compiled decode kernel
    and the chunk through the XLA loop, so it should cost what the two cost; before, the
    loop took the decodes too, each as a query tile of the chunk's tile length (31 decodes +
    a 256-token chunk, bf16: 873 ms against 37 + 129 ms)."""
    benchmark.group = (f"jax mixed {MX_DECODES}x{MX_CONTEXT} decodes + {MX_CHUNK}-token "
                       "chunk, f32")
    one, decodes, chunk = _mixed_inputs()
    f = jax.jit(jf.paged_attention)
    if impl == "prefixkv_one_call":
        args, fn = one, f
    else:
        args = (decodes, chunk)

        def fn(d, c):
            return jnp.concatenate([f(*d), f(*c)])
    rows = (0, MX_DECODES - 1, MX_DECODES, MX_DECODES + MX_CHUNK // 2, -1)
    _run(benchmark, fn, args, rounds=2,
         check=lambda out: _check(out, rows, _want(one, rows), "float32"))
    keys = MX_DECODES * MX_CONTEXT + MX_CACHED + MX_CHUNK
    flops = 4 * HQ * D * (MX_DECODES * MX_CONTEXT + float(
        sum(range(MX_CACHED + 1, MX_CACHED + MX_CHUNK + 1))))  # causal chunk
    record(benchmark, machine_limits, bytes_read=2 * keys * HKV * D * 4, flops=flops,
           impl=impl, baseline=impl == "prefixkv_two_calls")


@pytest.mark.parametrize("impl", ["prefixkv_hnd", "prefixkv_nhd"])
def test_mixed_decode_prefill_hnd(benchmark, machine_limits, impl):
    """The mixed batch above over kv_layout="HND" caches (the XLA loop transposes the blocks
    each step gathers; the CPU decode kernel reads HND at its strides) against NHD caches
    (the baseline)."""
    benchmark.group = (f"jax mixed {MX_DECODES}x{MX_CONTEXT} decodes + {MX_CHUNK}-token "
                       "chunk, f32, HND")
    one, _, _ = _mixed_inputs()
    if impl == "prefixkv_hnd":
        q, k, v, *rest = one
        args = (q, jnp.swapaxes(k, 1, 2).copy(), jnp.swapaxes(v, 1, 2).copy(), *rest)
        fn = jax.jit(functools.partial(jf.paged_attention, kv_layout="HND"))
    else:
        args, fn = one, jax.jit(jf.paged_attention)
    rows = (0, MX_DECODES - 1, MX_DECODES, MX_DECODES + MX_CHUNK // 2, -1)
    _run(benchmark, fn, args, rounds=2,
         check=lambda out: _check(out, rows, _want(one, rows), "float32"))
    keys = MX_DECODES * MX_CONTEXT + MX_CACHED + MX_CHUNK
    record(benchmark, machine_limits, bytes_read=2 * keys * HKV * D * 4, impl=impl,
           baseline=impl == "prefixkv_nhd")


# -------------------- a small deployment's step: decodes + a short chunk, one call, f32 / bf16

SM_DECODES, SM_CONTEXT, SM_CHUNK = 8, 512, 8


@functools.cache
def _small_mixed_inputs(dtype):
    """SM_DECODES decodes at SM_CONTEXT tokens, then one SM_CHUNK-token chunk ending at
    SM_CONTEXT, each sequence on blocks of its own: one call's paged_attention args."""
    rng = np.random.default_rng(11)
    num_seqs, per_seq = SM_DECODES + 1, SM_CONTEXT // BS
    k, v = _cache(rng, num_seqs * per_seq, dtype)
    tables = jnp.asarray(rng.permutation(num_seqs * per_seq).reshape(num_seqs, per_seq)
                         .astype(np.int32))
    kv = jnp.full((num_seqs,), SM_CONTEXT, jnp.int32)
    cu = jnp.asarray(list(range(num_seqs)) + [SM_DECODES + SM_CHUNK], jnp.int32)
    q = jnp.asarray(rng.standard_normal((SM_DECODES + SM_CHUNK, HQ, D), dtype=np.float32))
    return q.astype(dtype), k, v, tables, kv, cu


def jnp_gather_ragged_attention(q, k, v, tables, kv_lens, cu):
    """The obvious jnp baseline of a ragged batch: each token gathers its sequence's blocks
    (tables[seq]) and attends to its causal prefix (dense_gather_paged_attention with the
    token's own key count)."""
    t = jnp.arange(q.shape[0], dtype=jnp.int32)
    seq = jnp.searchsorted(cu[1:], t, side="right")
    visible = kv_lens[seq] - (cu[seq + 1] - 1 - t)
    return _xla.dense_gather_paged_attention(q, k, v, tables[seq], visible, scale=D ** -0.5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", ["prefixkv", "prefixkv_by_groups", "jnp_gather_baseline"])
def test_small_mixed_step(benchmark, machine_limits, monkeypatch, impl, dtype):
    """A small deployment's chunked-prefill step (8 decodes at 512 tokens + an 8-token chunk),
    jitted: prefixkv (on the CPU every token a decode of the compiled kernel,
    ragged_on_cpu_kernel's per_token) against the jnp gather baseline and against prefixkv
    by groups (the route before: the decodes by the kernel, the chunk by the XLA loop;
    CPU_RAGGED_DECODE_*MAX_Q 0). The thresholds are read when tracing: jit's caches are
    cleared around the by-groups run."""
    benchmark.group = f"jax small mixed {SM_DECODES}x{SM_CONTEXT} + {SM_CHUNK}-token chunk, {dtype}"
    args = _small_mixed_inputs(dtype)
    if impl == "jnp_gather_baseline":
        fn = jax.jit(jnp_gather_ragged_attention)
    else:
        if impl == "prefixkv_by_groups":
            monkeypatch.setattr(_xla, "CPU_RAGGED_DECODE_MAX_Q", 0)
            monkeypatch.setattr(_xla, "CPU_RAGGED_DECODE_16BIT_MAX_Q", 0)
        jax.clear_caches()
        fn = jax.jit(lambda *a: jf.paged_attention(*a))
    rows = (0, SM_DECODES - 1, SM_DECODES, -1)
    try:
        _run(benchmark, fn, args, rounds=20,
             check=lambda out: _check(out, rows, _want(args, rows), dtype))
    finally:
        jax.clear_caches()
    keys = SM_DECODES * SM_CONTEXT + sum(range(SM_CONTEXT - SM_CHUNK + 1, SM_CONTEXT + 1))
    record(benchmark, machine_limits,
           bytes_read=2 * (SM_DECODES + 1) * SM_CONTEXT * HKV * D * jnp.dtype(dtype).itemsize,
           flops=4 * HQ * D * float(keys), impl=impl, baseline=impl == "jnp_gather_baseline")


# ------------------------------------------------ on an accelerator (skipped on CPU machines)

#: jitted calls queued per timed round on the device, then one block_until_ready: a 4 x 16384
#: bf16 decode reads 268 MB (~65 us at 4 TB/s), so one host-timed call per round would count
#: 20-40 us of dispatch and sync. The read-bandwidth reference queues as many.
CALLS_PER_ROUND = 10

_DEVICE_READ: list[float] = []


def _device_read_gbps(nbytes: int = 1 << 30) -> float:
    """The accelerator's measured read bandwidth, once per run: a float32 sum over ``nbytes``
    (far above any on-chip cache), best of 3 x CALLS_PER_ROUND queued calls."""
    if not _DEVICE_READ:
        x = jnp.ones(nbytes // 4, jnp.float32)
        _DEVICE_READ.append(nbytes / best_call_seconds(jax.jit(jnp.sum), (x,)) / 1e9)
        del x
    return _DEVICE_READ[0]


def best_call_seconds(fn, args, rounds: int = 3) -> float:
    """Seconds per call of ``fn(*args)``: one call to compile, then the best of ``rounds``
    rounds of CALLS_PER_ROUND queued calls, each round blocking once on its last result."""
    import time

    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(CALLS_PER_ROUND):
            r = fn(*args)
        jax.block_until_ready(r)
        best = min(best, (time.perf_counter() - t0) / CALLS_PER_ROUND)
    return best


@functools.partial(jax.jit, static_argnums=(0, 1))
def _make_device_decode_inputs(num_seqs: int, context: int):
    kk, kv, kt, kq = jax.random.split(jax.random.key(0), 4)
    blocks = num_seqs * context // BS
    shape = (blocks + 1, BS, HKV, D)
    k = jax.random.normal(kk, shape, jnp.bfloat16)
    v = jax.random.normal(kv, shape, jnp.bfloat16)
    tables = jax.random.permutation(kt, blocks + 1)[:blocks].reshape(num_seqs, -1)
    kv_lens = jnp.full((num_seqs,), context, jnp.int32)
    q = jax.random.normal(kq, (num_seqs, HQ, D), jnp.bfloat16)
    return q, k, v, tables.astype(jnp.int32), kv_lens


@functools.cache
def _device_decode_inputs(num_seqs: int, context: int):
    """bf16 decode inputs (q, k_cache, v_cache, block_tables, kv_lens) over num_seqs x context
    tokens, drawn on the device (jax.random, fixed key, directly in bf16) once per shape and
    shared by every variant: host float32 draws took 7.8 s per 32 x 8192 cache."""
    return jax.block_until_ready(_make_device_decode_inputs(num_seqs, context))


@functools.cache
def _device_decode_want(num_seqs: int, context: int) -> np.ndarray:
    return _want(_device_decode_inputs(num_seqs, context), DECODE_ROWS)


def _run_queued(benchmark, fn, args, rounds, calls=CALLS_PER_ROUND, check=None):
    """Time rounds of ``calls`` queued calls of ``fn``, blocking once on the last result; the
    benchmark's stats are per round (divide by ``calls`` for one call). The compiling warm-up
    call's output goes to ``check`` first."""
    out = jax.block_until_ready(fn(*args))
    if check is not None:
        check(out)

    def queued():
        for _ in range(calls - 1):
            fn(*args)
        return jax.block_until_ready(fn(*args))

    return benchmark.pedantic(queued, rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.mark.skipif(jax.default_backend() == "cpu", reason="needs a GPU or TPU")
@pytest.mark.parametrize("shape", [(32, 8192), (4, 16384)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", ["prefixkv", "prefixkv_no_split", "prefixkv_by_block",
                                  "jnp_gather_baseline"])
def test_decode_device_bf16(benchmark, impl, shape):
    """Decode bf16 on the device: fraction of the measured read bandwidth and of the datasheet
    HBM peak. 4 x 16384 is the few-long-sequences case split-KV is for (32 programs).
    prefixkv_by_block: the Pallas GPU kernel loading each step's blocks one by one
    (kv_gather=False), the default before the gathered tiles measured faster (1.19x at
    32 x 8192 on an H200).

    Each round queues CALLS_PER_ROUND calls (pytest-benchmark's stats are per round);
    extra_info's seconds, GB/s and fractions are per call (round / calls_per_round)."""
    num_seqs, context = shape
    if impl in ("prefixkv_no_split", "prefixkv_by_block") and jax.default_backend() != "gpu":
        pytest.skip("a Pallas GPU kernel option")
    args = _device_decode_inputs(num_seqs, context)
    nbytes, _ = _decode_cost("bfloat16", num_seqs, context)
    benchmark.group = f"jax decode {num_seqs}x{context} bf16 on device"
    if impl == "prefixkv":
        fn = jax.jit(lambda q, k, v, t, n: jf.paged_attention(q, k, v, t, n))
    elif impl == "prefixkv_no_split":
        from prefixkv.kernels.pallas import paged_attention_gpu as pg

        fn = jax.jit(lambda q, k, v, t, n: pg.paged_attention_gpu(
            q, k, v, t, n, None, scale=D ** -0.5, num_splits=1)[0])
    elif impl == "prefixkv_by_block":
        from prefixkv.kernels.pallas import paged_attention_gpu as pg

        fn = jax.jit(lambda q, k, v, t, n: pg.paged_attention_gpu(
            q, k, v, t, n, None, scale=D ** -0.5, kv_gather=False)[0])
    else:
        fn = jax.jit(lambda q, k, v, t, n: _xla.dense_gather_paged_attention(
            q, k, v, t, n, scale=D ** -0.5))
    _run_queued(benchmark, fn, args, rounds=10,  # 8 variants within run_device.sh's 75 s
                check=lambda out: _check(out, DECODE_ROWS,
                                         _device_decode_want(num_seqs, context), "bfloat16"))
    per_call = seconds(benchmark) / CALLS_PER_ROUND
    best_call = seconds(benchmark, "min") / CALLS_PER_ROUND
    kind = jax.devices()[0].device_kind
    peak = datasheet_hbm_gbps(kind)
    gbps = nbytes / per_call / 1e9
    read = _device_read_gbps()
    if impl == "jnp_gather_baseline":
        benchmark.extra_info["baseline"] = True
    benchmark.extra_info.update(
        device=kind, bytes_read=nbytes, bytes_written=0, bytes=nbytes,
        calls_per_round=CALLS_PER_ROUND,
        seconds_per_call=per_call, gbps=round(gbps, 1), measured_read_gbps=round(read, 1),
        read_fraction=round(gbps / read, 4),
        # the reference is the best of its rounds: best round against it
        read_fraction_best=round(nbytes / best_call / 1e9 / read, 4))
    if peak:
        benchmark.extra_info["hbm_fraction"] = round(gbps / peak, 4)  # of the datasheet peak


# ------------------ device shared prefix: 64 decode queries over one 32768-token prefix

DSP_SEQS, DSP_PREFIX, DSP_OWN = 64, 32768, 256


@functools.cache
def _device_shared_inputs():
    """(shared_prefix_attention args, paged_attention args), drawn on the device once."""
    return jax.block_until_ready(_make_device_shared_inputs())


@functools.cache
def _device_shared_want() -> np.ndarray:
    return _want(_device_shared_inputs()[1], SHARED_ROWS)


@jax.jit
def _make_device_shared_inputs():
    kk, kv, kt, kq = jax.random.split(jax.random.key(5), 4)
    blocks = DSP_PREFIX // BS + DSP_SEQS * DSP_OWN // BS
    shape = (blocks + 1, BS, HKV, D)
    k = jax.random.normal(kk, shape, jnp.bfloat16)
    v = jax.random.normal(kv, shape, jnp.bfloat16)
    ids = jax.random.permutation(kt, blocks).astype(jnp.int32)
    q = jax.random.normal(kq, (DSP_SEQS, HQ, D), jnp.bfloat16)
    return _cascade_args(q, k, v, ids, 1, DSP_PREFIX, DSP_OWN)


@pytest.mark.skipif(jax.default_backend() == "cpu", reason="needs a GPU or TPU")
@pytest.mark.parametrize("impl", ["shared_prefix_attention", "paged_attention"])
def test_shared_prefix_device_bf16(benchmark, impl):
    """Cascade decode on the device: the 32768-token prefix (128 MiB of KV) read once for 64
    queries against paged attention reading it once per sequence; seconds per call and the
    unique KV bytes' (prefix once + own tokens) fraction of the measured read bandwidth."""
    benchmark.group = "jax shared prefix bf16 64x(32768+256) on device"
    sp, pa = _device_shared_inputs()
    if impl == "shared_prefix_attention":
        fn, args = jax.jit(lambda *a: jf.shared_prefix_attention(*a)), sp
    else:
        fn, args = jax.jit(lambda *a: jf.paged_attention(*a)), pa
        benchmark.extra_info["baseline"] = True
    _run_queued(benchmark, fn, args, rounds=5,
                check=lambda out: _check(out, SHARED_ROWS, _device_shared_want(), "bfloat16"))
    per_call = seconds(benchmark) / CALLS_PER_ROUND
    unique = 2 * (DSP_PREFIX + DSP_SEQS * DSP_OWN) * HKV * D * 2
    read = _device_read_gbps()
    benchmark.extra_info.update(
        device=jax.devices()[0].device_kind, seconds_per_call=per_call, unique_bytes=unique,
        bytes_read=unique, bytes_written=0, unique_gbps=round(unique / per_call / 1e9, 1),
        measured_read_gbps=round(read, 1),
        unique_read_fraction=round(unique / per_call / 1e9 / read, 4),
        note="bytes = unique KV (prefix once + own tokens)")


# ------- prefill on the device: 8 sequences x 512 new tokens over 4096 cached each, bf16

DPF_SEQS = 8
_DEVICE_MATMUL: list[float] = []


def _device_matmul_tflops(n: int = 8192) -> float:
    """The accelerator's measured bf16 matmul rate in TFLOP/s (n x n x n, float32
    accumulation), once per run: what compute-bound prefill attention is held to."""
    if not _DEVICE_MATMUL:
        a = jnp.ones((n, n), jnp.bfloat16)
        mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32)
                     .astype(jnp.bfloat16))
        _DEVICE_MATMUL.append(2 * n ** 3 / best_call_seconds(mm, (a, a)) / 1e12)
        del a
    return _DEVICE_MATMUL[0]


@functools.cache
def _device_prefill_inputs():
    """paged_attention args of the device prefill, drawn on the device once."""
    return jax.block_until_ready(_make_device_prefill_inputs())


#: device prefill query rows checked: the first and last new token of the first sequence, the
#: last of the last
DPF_ROWS = (0, PF_NEW - 1, -1)


@functools.cache
def _device_prefill_want() -> np.ndarray:
    return _want(_device_prefill_inputs(), DPF_ROWS)


@jax.jit
def _make_device_prefill_inputs():
    kk, kv, kt, kq = jax.random.split(jax.random.key(7), 4)
    total = PF_CACHED + PF_NEW
    blocks = DPF_SEQS * total // BS
    k = jax.random.normal(kk, (blocks + 1, BS, HKV, D), jnp.bfloat16)
    v = jax.random.normal(kv, (blocks + 1, BS, HKV, D), jnp.bfloat16)
    tables = jax.random.permutation(kt, blocks + 1)[:blocks].reshape(DPF_SEQS, -1)
    q = jax.random.normal(kq, (DPF_SEQS * PF_NEW, HQ, D), jnp.bfloat16)
    return (q, k, v, tables.astype(jnp.int32), jnp.full((DPF_SEQS,), total, jnp.int32),
            jnp.arange(DPF_SEQS + 1, dtype=jnp.int32) * PF_NEW)


def _cudnn_else_xla(make, args, try_cudnn: bool | None):
    """(``make("cudnn")``, "cudnn", None) when that call on ``args`` works, else
    (``make("xla")``, "xla", why cuDNN did not or None). ``make(implementation)``: a jitted
    function of ``args`` calling jax.nn.dot_product_attention with that implementation. cuDNN
    is tried on a GPU (or when ``try_cudnn``): the fused kernel a user gets there; the error
    of arguments it refuses is caught at the first call, which also compiles."""
    reason = None
    if try_cudnn is None:
        try_cudnn = jax.default_backend() == "gpu"
    if try_cudnn:
        fn = make("cudnn")
        try:
            jax.block_until_ready(fn(*args))
            return fn, "cudnn", None
        except Exception as e:  # any refusal (at trace, compile or run): the XLA path
            reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    return make("xla"), "xla", reason


def dense_causal_attention(args, try_cudnn: bool | None = None):
    """(jitted causal jax.nn.dot_product_attention, the implementation that ran, why cuDNN
    did not or None): on a GPU (or ``try_cudnn``) the cuDNN fused kernel, what a user gets
    there, with a fallback to the XLA path when cuDNN refuses these arguments; elsewhere the
    XLA path (_cudnn_else_xla)."""
    return _cudnn_else_xla(
        lambda implementation: jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation=implementation)), args, try_cudnn)


@pytest.mark.skipif(jax.default_backend() == "cpu", reason="needs a GPU or TPU")
@pytest.mark.parametrize("impl", ["prefixkv_512_over_cached_4096", "jnp_gather_baseline_512",
                                  "recompute_4608"])
def test_prefill_device_bf16(benchmark, impl):
    """Prefill with a cached prefix on the device: the frontend's kernel over the paged cache
    (Pallas on a GPU/TPU) against the jnp baseline over the same cache (gather the blocks,
    then jax.nn.dot_product_attention with the causal mask aligned to the end:
    gather_prefill_attention) and against recomputing all 4608 tokens of each sequence with
    jax.nn.dot_product_attention (causal, dense K/V: what a prefix cache saves); both
    baselines marked (bench/report.py takes the faster). Each baseline runs cuDNN on a GPU
    unless it refuses, then XLA: extra_info ``recompute_implementation`` or
    ``implementation``, and ``cudnn_refused`` with the reason. Records the attention's
    TFLOP/s (causal: each query sees its position + 1 keys) and its fraction of the measured
    bf16 matmul rate."""
    benchmark.group = "jax prefill 8x(512 over 4096) bf16 on device"
    args = _device_prefill_inputs()
    total = PF_CACHED + PF_NEW
    if impl != "recompute_4608":
        if impl.startswith("prefixkv"):
            fn = jax.jit(lambda *a: jf.paged_attention(*a))
        else:
            fn, ran, refused = gather_prefill_attention(args, PF_NEW)
            benchmark.extra_info["implementation"] = ran
            if refused:
                benchmark.extra_info["cudnn_refused"] = refused
            benchmark.extra_info["baseline"] = True
        q_len = PF_NEW

        def check(out):
            _check(out, DPF_ROWS, _device_prefill_want(), "bfloat16")
    else:
        q, k, v, tables = args[:4]
        dense = [c[tables].reshape(DPF_SEQS, total, HKV, D) for c in (k, v)]
        # the cached tokens' queries drawn, the new ones' those of the paged call: the last
        # PF_NEW rows of each sequence must match it
        earlier = jax.random.normal(jax.random.key(8), (DPF_SEQS, PF_CACHED, HQ, D),
                                    jnp.bfloat16)
        qf = jnp.concatenate([earlier, q.reshape(DPF_SEQS, PF_NEW, HQ, D)], axis=1)
        args = (qf, *dense)
        fn, ran, refused = dense_causal_attention(args)
        benchmark.extra_info["recompute_implementation"] = ran
        if refused:
            benchmark.extra_info["cudnn_refused"] = refused

        def check(out):  # the new tokens' rows, laid out as the paged call's
            _check(out[:, PF_CACHED:].reshape(-1, HQ, D), DPF_ROWS, _device_prefill_want(),
                   "bfloat16")
        q_len = total
        benchmark.extra_info["baseline"] = True
    _run_queued(benchmark, fn, args, rounds=5, check=check)
    per_call = seconds(benchmark) / CALLS_PER_ROUND
    flops = DPF_SEQS * 4 * HQ * D * float(sum(range(total - q_len + 1, total + 1)))
    peak = _device_matmul_tflops()
    benchmark.extra_info.update(
        device=jax.devices()[0].device_kind, seconds_per_call=per_call, flops=flops,
        tflops=round(flops / per_call / 1e12, 1), measured_matmul_tflops=round(peak, 1),
        matmul_fraction=round(flops / per_call / 1e12 / peak, 3))
