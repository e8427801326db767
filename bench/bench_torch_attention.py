"""Paged attention through prefixkv.torch_frontend vs the torch baseline a user would write.

CPU (one thread): decode over 8 sequences x 4096 cached tokens (32 q heads, 8 kv heads,
head_dim 128, block 16), float32 and bfloat16: prefixkv's compiled C++ decode kernel
(kernels/cpu/decode.py, what tf.paged_attention runs for a CPU decode) vs the obvious
baseline (index_select the blocks, then scaled_dot_product_attention); prefixkv with
gpt-oss-like attention sinks (the frontend's epilogue on the kernel's out, lse) in its own
group, against the same decode without sinks (the epilogue's cost; SDPA computes no sinks, so
it is no baseline for them); float8_e4m3fn caches (vLLM's fp8 KV cache) with bfloat16 queries
against gather + dequantize + SDPA. Shared prefix: 32
sequences sharing a 2048-token prefix plus 128 own tokens each: shared_prefix_attention vs
paged_attention over the same batch. GPU (skipped without CUDA): decode at a fraction of HBM
bandwidth, cascade decode, and prefill of 512 new tokens over 4096 cached at a fraction of the
measured bf16 matmul rate, Triton vs the torch baselines. Mixed step (CPU, f32): 63 decodes
at 2048 tokens plus one prefill chunk of 256 or 512 tokens over 2048 cached, in one
paged_attention call vs two (decodes, then the chunk).

Every test first checks its op's output against the float64 numpy reference
(prefixkv.paged.reference, a few query rows: bench.conftest.reference_rows) with the test
suite's tolerance, so a wrong op fails here too (also under --benchmark-disable). The group's
baseline sets ``baseline: true`` in extra_info.

Run: OMP_NUM_THREADS=1 .venv/bin/pytest bench/bench_torch_attention.py --benchmark-only
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from bench.conftest import (  # noqa: E402
    assert_attention_close,
    check_fp8_decode,
    cuda_benchmark,
    cuda_matmul_tflops,
    cuda_memory_limits,
    datasheet_hbm_gbps,
    record,
    reference_rows,
)
from prefixkv import torch_frontend as tf  # noqa: E402

torch.set_num_threads(1)

NUM_SEQS, CONTEXT, HQ, HKV, HEAD_DIM, BLOCK = 8, 4096, 32, 8, 128, 16
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: decode query rows checked against the reference (first and last sequence)
DECODE_ROWS = (0, -1)


def _host(x):
    """A tensor as a numpy array on the host; floating ones as float32."""
    return (x.float() if x.is_floating_point() else x).cpu().numpy()


def _take(x, idx):
    return x[torch.from_numpy(idx).to(x.device)]


_WANTS: dict = {}


def _want(key, args, rows, sinks=None):
    """The numpy reference of query ``rows`` of paged_attention(*args), once per ``key`` (each
    key names inputs every test draws alike, so later tests reuse the first one's)."""
    if key not in _WANTS:
        _WANTS[key] = reference_rows(rows, *args, host=_host, take=_take, sinks=sinks)
    return _WANTS[key]


def _check(out, rows, want, dtype: str) -> None:
    """Query ``rows`` of an op's output [num_tokens, Hq, D] against the reference."""
    assert_attention_close(_host(_take(out, _row_ids(rows, out.shape[0]))), want, dtype)


def _row_ids(rows, n):
    return np.asarray([r % n for r in rows], dtype=np.int64)


def decode_batch(device="cpu", dtype=torch.float32, num_seqs=NUM_SEQS, context=CONTEXT,
                 seed=0):
    """(q, k_cache, v_cache, block_tables, kv_lens) of a decode batch, drawn on ``device``;
    on a GPU once per shape and dtype, shared by every implementation (host draws of a
    64 x 4096 cache took ~6 s a test, one thread: too slow for the device run)."""
    if device == "cpu":
        return list(_draw_decode_batch(device, dtype, num_seqs, context, seed))
    return list(_device_decode_batch(device, dtype, num_seqs, context, seed))


def _draw_decode_batch(device, dtype, num_seqs, context, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    per_seq = context // BLOCK
    num_blocks = num_seqs * per_seq + 1
    k, v = (torch.randn(num_blocks, BLOCK, HKV, HEAD_DIM, generator=g, device=device).to(dtype)
            for _ in range(2))
    tables = torch.randperm(num_blocks - 1, generator=g, device=device)[:num_seqs * per_seq]
    tables = tables.view(num_seqs, per_seq).to(torch.int32)
    kv_lens = torch.full((num_seqs,), context, dtype=torch.int32, device=device)
    q = torch.randn(num_seqs, HQ, HEAD_DIM, generator=g, device=device).to(dtype)
    return q, k, v, tables, kv_lens


_device_decode_batch = functools.cache(_draw_decode_batch)


def _gathered(k_cache, v_cache, block_tables):
    """Every sequence's blocks gathered by index_select: K, V [S, Hkv, width * B, D]."""
    num_seqs, width = block_tables.shape
    _, bs, hkv, d = k_cache.shape
    flat = block_tables.reshape(-1).long()
    return tuple(c.index_select(0, flat).view(num_seqs, width * bs, hkv, d).transpose(1, 2)
                 for c in (k_cache, v_cache))


def _repeat_kv(k, v, num_q_heads: int):
    """Gathered K, V [S, Hkv, T, D] with each kv head repeated for the q heads of its group,
    [S, Hq, T, D] (q head h reads kv head h // group, as enable_gqa): HF transformers'
    repeat_kv. torch's SDPA runs enable_gqa only on its flash and math backends and flash
    takes no mask, so a masked GQA call runs the math path; over repeated K/V the fused
    memory-efficient kernel can take the mask. K first, then V: one gathered copy at a time
    lives next to the repeated ones."""
    group = num_q_heads // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    return k, v.repeat_interleave(group, dim=1)


def baseline_paged_attention(q, k_cache, v_cache, block_tables, kv_lens, *,
                             repeat_kv: bool = False):
    """What a user writes without a paged kernel: gather the blocks, then SDPA (decode) with
    enable_gqa, or (``repeat_kv``) over K/V repeated for every q head (_repeat_kv)."""
    k, v = _gathered(k_cache, v_cache, block_tables)
    if repeat_kv:
        k, v = _repeat_kv(k, v, q.shape[1])
    pos = torch.arange(k.shape[2], device=q.device)
    mask = (pos[None, :] < kv_lens[:, None].long())[:, None, None, :]
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask,
                                         enable_gqa=not repeat_kv)
    return out[:, :, 0]


def _kv_bytes(k_cache, num_seqs, context):
    _, _, hkv, d = k_cache.shape
    return 2 * num_seqs * context * hkv * d * k_cache.element_size()


#: gpt-oss-like attention sinks of the decode benchmark (prefixkv_sinks), one per q head
SINKS = torch.linspace(-2.0, 4.0, HQ)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("impl", ["prefixkv", "baseline_sdpa"])
def test_cpu_decode(benchmark, machine_limits, impl, dtype):
    benchmark.group = f"cpu-decode-{dtype}"
    _cpu_decode(benchmark, machine_limits, impl, dtype, sinks=None,
                baseline=impl == "baseline_sdpa")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("impl", ["prefixkv_sinks", "prefixkv_no_sinks"])
def test_cpu_decode_sinks(benchmark, machine_limits, impl, dtype):
    """The decode with attention sinks against the same decode without (the baseline): what
    the sinks epilogue costs."""
    benchmark.group = f"cpu-decode-sinks-{dtype}"
    _cpu_decode(benchmark, machine_limits, impl, dtype,
                sinks=SINKS if impl == "prefixkv_sinks" else None,
                baseline=impl == "prefixkv_no_sinks")


def _cpu_decode(benchmark, machine_limits, impl, dtype, *, sinks, baseline):
    q, k, v, tables, kv_lens = decode_batch(dtype=DTYPES[dtype])
    if impl == "baseline_sdpa":
        def fn():
            return baseline_paged_attention(q, k, v, tables, kv_lens)
    else:
        def fn():
            return tf.paged_attention(q, k, v, tables, kv_lens, sinks=sinks)
    _check(fn(), DECODE_ROWS,
           _want(("decode", dtype, sinks is not None), (q, k, v, tables, kv_lens),
                 DECODE_ROWS, sinks=sinks), dtype)
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    flops = 4 * NUM_SEQS * HQ * CONTEXT * HEAD_DIM
    record(benchmark, machine_limits, bytes_read=_kv_bytes(k, NUM_SEQS, CONTEXT), flops=flops,
           impl=impl, dtype=dtype, sinks=sinks is not None, baseline=baseline)


@pytest.mark.parametrize("impl", ["prefixkv_hnd_view", "prefixkv_nhd"])
def test_cpu_decode_hnd_view(benchmark, machine_limits, impl):
    """HND caches ([num_blocks, heads, block_size, head_dim], FlashInfer's other layout) given
    as their NHD views: the compiled decode kernel reads them at their strides, against the
    same decode over NHD caches (the baseline). bfloat16."""
    benchmark.group = "cpu-decode-bfloat16-hnd-view"
    q, k, v, tables, kv_lens = decode_batch(dtype=torch.bfloat16)
    if impl == "prefixkv_hnd_view":
        k, v = (c.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3) for c in (k, v))

    def fn():
        return tf.paged_attention(q, k, v, tables, kv_lens)

    _check(fn(), DECODE_ROWS, _want(("decode", "bfloat16", False), (q, k, v, tables, kv_lens),
                                    DECODE_ROWS), "bfloat16")
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    record(benchmark, machine_limits, bytes_read=_kv_bytes(k, NUM_SEQS, CONTEXT),
           flops=4 * NUM_SEQS * HQ * CONTEXT * HEAD_DIM, impl=impl, dtype="bfloat16",
           baseline=impl == "prefixkv_nhd")


@pytest.mark.parametrize("impl", ["prefixkv_hnd_view", "prefixkv_nhd"])
def test_cpu_write_kv_prefill_hnd_view(benchmark, machine_limits, impl):
    """A 512-token prefill's write_kv into bfloat16 caches (8 heads x 128, 16-token blocks):
    HND caches as their NHD views (rows of one head, one index_copy_) against NHD caches
    (the baseline: token rows)."""
    benchmark.group = "cpu-write_kv-512-bfloat16-hnd-view"
    g = torch.Generator().manual_seed(5)
    num_blocks, n = 2048, 512
    k, v = (torch.zeros(num_blocks, BLOCK, HKV, HEAD_DIM, dtype=torch.bfloat16)
            for _ in range(2))
    if impl == "prefixkv_hnd_view":
        k, v = (c.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3) for c in (k, v))
    key = torch.randn(n, HKV, HEAD_DIM, generator=g).to(torch.bfloat16)
    slots = torch.randperm(num_blocks * BLOCK, generator=g)[:n]

    def fn():
        tf.write_kv(key, key, k, v, slots)

    fn()
    for i in (0, n - 1):
        row = int(slots[i])
        assert torch.equal(k[row // BLOCK, row % BLOCK], key[i])
        assert torch.equal(v[row // BLOCK, row % BLOCK], key[i])
    benchmark.pedantic(fn, rounds=20, iterations=5, warmup_rounds=1)
    nbytes = 2 * key.numel() * key.element_size()  # key and value, read then written
    record(benchmark, machine_limits, bytes_read=nbytes, bytes_written=nbytes, impl=impl,
           dtype="bfloat16", baseline=impl == "prefixkv_nhd")


#: fp8 decode: the caches hold the bf16 draws quantized with this scale (a power of two, so
#: the dequantized values the reference reads are exact in float32); values up to ~5 / 2^-5.
FP8_SCALE = 2.0 ** -5


def fp8_decode_batch():
    """The bf16 decode batch with float8_e4m3fn caches (vLLM's kv_cache_dtype="fp8") quantized
    from its bf16 caches by prefixkv's write rule, and the scale."""
    q, k, v, tables, kv_lens = decode_batch(dtype=torch.bfloat16)
    k8, v8 = ((c.float() / FP8_SCALE).clamp(-448, 448).to(torch.float8_e4m3fn) for c in (k, v))
    return q, k8, v8, tables, kv_lens


def baseline_fp8_paged_attention(q, k8, v8, block_tables, kv_lens, scale):
    """What a user writes without an fp8 paged kernel: gather the blocks, dequantize them into
    q's dtype, then SDPA."""
    k, v = _gathered(k8, v8, block_tables)
    # fp8 converts to bf16 exactly and FP8_SCALE is a power of two: the exact dequantized
    # values, in one pass (through float32 took two)
    k, v = (c.to(q.dtype) * scale for c in (k, v))
    pos = torch.arange(k.shape[2], device=q.device)
    mask = (pos[None, :] < kv_lens[:, None].long())[:, None, None, :]
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, enable_gqa=True)
    return out[:, :, 0]


@pytest.mark.parametrize("impl", ["prefixkv", "baseline_sdpa"])
def test_cpu_decode_fp8(benchmark, machine_limits, impl):
    """Decode over float8_e4m3fn caches with bfloat16 queries (k_scale = v_scale =
    FP8_SCALE): prefixkv vs gather + dequantize + SDPA. Bytes: the fp8 KV read."""
    benchmark.group = "cpu-decode-fp8"
    q, k8, v8, tables, kv_lens = fp8_decode_batch()
    if impl == "baseline_sdpa":
        def fn():
            return baseline_fp8_paged_attention(q, k8, v8, tables, kv_lens, FP8_SCALE)
    else:
        def fn():
            return tf.paged_attention(q, k8, v8, tables, kv_lens, k_scale=FP8_SCALE,
                                      v_scale=FP8_SCALE)
    deq = tuple((c.float() * FP8_SCALE) for c in (k8, v8))
    rows = tuple(range(NUM_SEQS))  # every sequence (the kernel splits them over threads)
    check_fp8_decode(_host(fn()), _want(("decode-fp8",), (q, *deq, tables, kv_lens), rows))
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    flops = 4 * NUM_SEQS * HQ * CONTEXT * HEAD_DIM
    record(benchmark, machine_limits, bytes_read=_kv_bytes(k8, NUM_SEQS, CONTEXT), flops=flops,
           impl=impl, dtype="float8_e4m3fn", q_dtype="bfloat16",
           baseline=impl == "baseline_sdpa")


@pytest.mark.parametrize("impl", ["prefixkv", "baseline_sdpa"])
def test_cpu_decode_all_cores(benchmark, machine_limits, impl):
    """The same f32 decode with torch's intra-op threads set to every core, both sides: the
    compiled decode kernel splits the sequences over them (limits measured on one thread)."""
    threads = os.cpu_count() or 1
    benchmark.group = f"cpu-decode-float32-{threads}-threads"
    q, k, v, tables, kv_lens = decode_batch(dtype=torch.float32)
    fn = {"prefixkv": lambda: tf.paged_attention(q, k, v, tables, kv_lens),
          "baseline_sdpa": lambda: baseline_paged_attention(q, k, v, tables, kv_lens)}[impl]
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check(fn(), DECODE_ROWS,
               _want(("decode", "float32", False), (q, k, v, tables, kv_lens), DECODE_ROWS),
               "float32")
        benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    finally:
        torch.set_num_threads(saved)
    record(benchmark, machine_limits, bytes_read=_kv_bytes(k, NUM_SEQS, CONTEXT), impl=impl,
           threads=threads, baseline=impl == "baseline_sdpa",
           note="limits measured on one thread")


SP_SEQS, SP_PREFIX, SP_OWN = 32, 2048, 128
#: shared-prefix query rows checked against the reference (first and last sequence)
SHARED_ROWS = (0, -1)


def shared_prefix_batch(device="cpu", dtype=torch.float32, seed=1, seqs=SP_SEQS,
                        prefix=SP_PREFIX, own_len=SP_OWN):
    """(shared_prefix_attention args, paged_attention args over the same batch): ``seqs``
    decode sequences sharing one ``prefix``-token prefix, ``own_len`` own tokens each, drawn
    on ``device``."""
    g = torch.Generator(device=device).manual_seed(seed)
    pb, ob = prefix // BLOCK, own_len // BLOCK
    num_blocks = pb + seqs * ob + 1
    k, v = (torch.randn(num_blocks, BLOCK, HKV, HEAD_DIM, generator=g, device=device).to(dtype)
            for _ in range(2))
    ids = torch.randperm(num_blocks - 1, generator=g, device=device).to(torch.int32)
    prefix_tables = ids[:pb].view(1, pb).contiguous()
    own = ids[pb:pb + seqs * ob].view(seqs, ob).contiguous()
    q = torch.randn(seqs, HQ, HEAD_DIM, generator=g, device=device).to(dtype)
    i32 = dict(dtype=torch.int32, device=device)
    sp_args = (q, k, v, prefix_tables, torch.tensor([prefix], **i32),
               torch.zeros(seqs, **i32), own, torch.full((seqs,), own_len, **i32))
    full_tables = torch.cat([prefix_tables.expand(seqs, pb), own], dim=1).contiguous()
    pa_args = (q, k, v, full_tables, torch.full((seqs,), prefix + own_len, **i32))
    return sp_args, pa_args


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("impl", ["shared_prefix_attention", "paged_attention",
                                  "baseline_sdpa"])
def test_cpu_shared_prefix(benchmark, machine_limits, impl, dtype):
    benchmark.group = f"cpu-shared-prefix-{dtype}"
    sp_args, pa_args = shared_prefix_batch(dtype=DTYPES[dtype])
    fns = {"shared_prefix_attention": lambda: tf.shared_prefix_attention(*sp_args),
           "paged_attention": lambda: tf.paged_attention(*pa_args),
           "baseline_sdpa": lambda: baseline_paged_attention(*pa_args)}
    _check(fns[impl](), SHARED_ROWS, _want(("shared", dtype), pa_args, SHARED_ROWS), dtype)
    # 10 rounds: with the other core busy the median of 5 swung by 30%; the SDPA baseline
    # (over a second a call) keeps 5
    benchmark.pedantic(fns[impl], rounds=5 if impl == "baseline_sdpa" else 10, warmup_rounds=1)
    unique = (SP_PREFIX + SP_SEQS * SP_OWN) * HKV * HEAD_DIM * 2 * sp_args[1].element_size()
    flops = 4 * SP_SEQS * HQ * (SP_PREFIX + SP_OWN) * HEAD_DIM  # QK + PV, every query
    record(benchmark, machine_limits, bytes_read=unique, flops=flops, impl=impl, dtype=dtype,
           baseline=impl == "baseline_sdpa", note="bytes = unique KV (prefix once + own tokens)")


@pytest.mark.parametrize("shape", [(2, 256), (8, 1024), (16, 2048), (32, 4096)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", ["shared_prefix_attention", "paged_attention"])
def test_cpu_shared_prefix_sizes(benchmark, machine_limits, impl, shape):
    """The cascade op against paged attention over the same batch from 2 sequences sharing a
    256-token prefix to 32 sharing 4096 (decode, 128 own tokens, float32): where a prefix
    group is too small for a pass of its own the op reads the prefix through each
    sequence's table (_native.CASCADE_MIN_SCORES), so it should stay near paged attention
    below and pull ahead above."""
    seqs, prefix = shape
    benchmark.group = f"cpu-shared-prefix-f32-{seqs}x{prefix}"
    sp_args, pa_args = shared_prefix_batch(seqs=seqs, prefix=prefix)
    fns = {"shared_prefix_attention": lambda: tf.shared_prefix_attention(*sp_args),
           "paged_attention": lambda: tf.paged_attention(*pa_args)}
    _check(fns[impl](), SHARED_ROWS, _want(("sizes", shape), pa_args, SHARED_ROWS), "float32")
    benchmark.pedantic(fns[impl], rounds=15, warmup_rounds=2)
    unique = (prefix + seqs * SP_OWN) * HKV * HEAD_DIM * 2 * 4
    record(benchmark, machine_limits, bytes_read=unique,
           flops=4 * seqs * HQ * (prefix + SP_OWN) * HEAD_DIM, impl=impl, dtype="float32",
           baseline=impl == "paged_attention",
           note="bytes = unique KV (prefix once + own tokens)")


#: test_cpu_shared_prefix_mixed_step: SPM_PREFIXES system prompts of SP_PREFIX tokens, each
#: shared by SPM_DECODES decodes (SP_OWN own tokens), and one SPM_CHUNK-token prefill chunk of
#: a new request on prompt 0.
SPM_PREFIXES, SPM_DECODES, SPM_CHUNK = 4, 16, 512


def shared_prefix_mixed_batch():
    """(shared_prefix_attention args, paged_attention args over the same batch) of
    test_cpu_shared_prefix_mixed_step, float32 on the CPU: the decodes first, then the chunk
    (its own keys are its tokens: nothing cached past the prompt)."""
    g = torch.Generator().manual_seed(5)
    pb, ob, cb = SP_PREFIX // BLOCK, SP_OWN // BLOCK, SPM_CHUNK // BLOCK
    decodes = SPM_PREFIXES * SPM_DECODES
    num_blocks = SPM_PREFIXES * pb + decodes * ob + cb + 1
    k, v = (torch.randn(num_blocks, BLOCK, HKV, HEAD_DIM, generator=g) for _ in range(2))
    ids = torch.randperm(num_blocks - 1, generator=g).to(torch.int32)
    prefix_tables = ids[:SPM_PREFIXES * pb].view(SPM_PREFIXES, pb).contiguous()
    own_ids = ids[SPM_PREFIXES * pb:]
    own = torch.zeros(decodes + 1, cb, dtype=torch.int32)
    own[:decodes, :ob] = own_ids[:decodes * ob].view(decodes, ob)
    own[decodes] = own_ids[decodes * ob:decodes * ob + cb]
    i32 = dict(dtype=torch.int32)
    pids = torch.tensor([p for p in range(SPM_PREFIXES) for _ in range(SPM_DECODES)] + [0],
                        **i32)
    kv = torch.tensor([SP_OWN] * decodes + [SPM_CHUNK], **i32)
    cu = torch.tensor(list(range(decodes + 1)) + [decodes + SPM_CHUNK], **i32)
    q = torch.randn(decodes + SPM_CHUNK, HQ, HEAD_DIM, generator=g)
    sp_args = (q, k, v, prefix_tables, torch.full((SPM_PREFIXES,), SP_PREFIX, **i32), pids,
               own, kv, cu)
    full_tables = torch.cat([prefix_tables[pids.long()], own], dim=1).contiguous()
    return sp_args, (q, k, v, full_tables, kv + SP_PREFIX, cu)


@pytest.mark.parametrize("impl", ["shared_prefix_attention", "paged_attention"])
def test_cpu_shared_prefix_mixed_step(benchmark, machine_limits, impl):
    """A chunked-prefill step over shared prompts: SPM_PREFIXES x SPM_DECODES decodes, each
    group on its prompt, and a SPM_CHUNK-token chunk on prompt 0, the cascade against paged
    attention over the joined tables (the baseline). Each prefix's tokens run in tiles of
    their own (_native._host_prefix_pass): padded to the chunk, every prompt's pass did the
    chunk's work (4 x 528 query tokens for 576)."""
    benchmark.group = (f"cpu-shared-prefix-mixed-{SPM_PREFIXES}x{SPM_DECODES}-decodes+"
                       f"{SPM_CHUNK}-chunk-f32")
    sp_args, pa_args = shared_prefix_mixed_batch()
    fns = {"shared_prefix_attention": lambda: tf.shared_prefix_attention(*sp_args),
           "paged_attention": lambda: tf.paged_attention(*pa_args)}
    decodes = SPM_PREFIXES * SPM_DECODES
    rows = (0, decodes - 1, decodes, decodes + SPM_CHUNK // 2, -1)
    _check(fns[impl](), rows, _want("shared_mixed", pa_args, rows), "float32")
    benchmark.pedantic(fns[impl], rounds=5, warmup_rounds=1)
    unique = (SPM_PREFIXES * SP_PREFIX + decodes * SP_OWN + SPM_CHUNK) * HKV * HEAD_DIM * 2 * 4
    flops = 4 * HQ * HEAD_DIM * (decodes * (SP_PREFIX + SP_OWN) + float(
        sum(range(SP_PREFIX + 1, SP_PREFIX + SPM_CHUNK + 1))))  # causal chunk
    record(benchmark, machine_limits, bytes_read=unique, flops=flops, impl=impl,
           dtype="float32", baseline=impl == "paged_attention",
           note="bytes = unique KV (each prompt once + own tokens)")


#: Layers of a model step in test_cpu_plan_step (each with caches of its own).
STEP_LAYERS = 16


@pytest.mark.parametrize("shape", [(1, 128), (4, 512)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", ["plan_then_run", "paged_attention", "baseline_sdpa"])
def test_cpu_plan_step(benchmark, machine_limits, impl, shape):
    """One decode step of STEP_LAYERS layers for a small batch (float32): a plan made once
    per step (timed) and run per layer, against the wrapper per layer and the gather + SDPA
    baseline per layer. At these sizes the per-call checks weigh as much as the kernel."""
    seqs, context = shape
    benchmark.group = f"cpu-plan-step-f32-{seqs}x{context}"
    layers = [decode_batch(num_seqs=seqs, context=context, seed=i) for i in range(STEP_LAYERS)]
    tables, kv_lens = layers[0][3], layers[0][4]  # the step's metadata, for every layer

    def plan_then_run():
        plan = tf.plan_paged_attention(tables, kv_lens, k_cache=layers[0][1], num_q_heads=HQ)
        return [plan.run(q, k, v) for q, k, v, _, _ in layers]

    fns = {"plan_then_run": plan_then_run,
           "paged_attention": lambda: [tf.paged_attention(q, k, v, tables, kv_lens)
                                       for q, k, v, _, _ in layers],
           "baseline_sdpa": lambda: [baseline_paged_attention(q, k, v, tables, kv_lens)
                                     for q, k, v, _, _ in layers]}
    outs = fns[impl]()
    for i in (0, STEP_LAYERS - 1):
        _check(outs[i], DECODE_ROWS, _want(("plan-step", shape, i),
                                           (*layers[i][:3], tables, kv_lens), DECODE_ROWS),
               "float32")
    benchmark.pedantic(fns[impl], rounds=30 if impl == "baseline_sdpa" else 100,
                       warmup_rounds=5)
    record(benchmark, machine_limits, bytes_read=STEP_LAYERS * _kv_bytes(layers[0][1], seqs,
                                                                         context),
           flops=STEP_LAYERS * 4 * seqs * HQ * context * HEAD_DIM, impl=impl, dtype="float32",
           layers=STEP_LAYERS, baseline=impl == "baseline_sdpa")


@pytest.mark.parametrize("impl", ["plan_then_run", "shared_prefix_attention",
                                  "paged_attention"])
def test_cpu_plan_step_shared_prefix(benchmark, machine_limits, impl):
    """The same for 2 sequences sharing a 256-token prefix (128 own tokens each, float32,
    STEP_LAYERS layers over one cache): a cascade plan against the cascade wrapper and paged
    attention over the joined tables per layer. Groups this small are read through each
    sequence's table on the CPU: the plan settles that once per step."""
    benchmark.group = "cpu-plan-step-shared-prefix-f32-2x256"
    sp_args, pa_args = shared_prefix_batch(seqs=2, prefix=256)
    q, k, v = sp_args[:3]

    def plan_then_run():
        plan = tf.plan_shared_prefix_attention(*sp_args[3:], k_cache=k, num_q_heads=HQ)
        return [plan.run(q, k, v) for _ in range(STEP_LAYERS)]

    fns = {"plan_then_run": plan_then_run,
           "shared_prefix_attention": lambda: [tf.shared_prefix_attention(*sp_args)
                                               for _ in range(STEP_LAYERS)],
           "paged_attention": lambda: [tf.paged_attention(*pa_args) for _ in range(STEP_LAYERS)]}
    _check(fns[impl]()[-1], SHARED_ROWS, _want(("sizes", (2, 256)), pa_args, SHARED_ROWS),
           "float32")
    benchmark.pedantic(fns[impl], rounds=100, warmup_rounds=5)
    record(benchmark, machine_limits,
           bytes_read=STEP_LAYERS * (256 + 2 * SP_OWN) * HKV * HEAD_DIM * 2 * 4,
           flops=STEP_LAYERS * 4 * 2 * HQ * (256 + SP_OWN) * HEAD_DIM, impl=impl,
           dtype="float32", layers=STEP_LAYERS, baseline=impl == "paged_attention",
           note="bytes = unique KV (prefix once + own tokens)")


# ------------------------------------------- prefill: 512 new tokens over 4096 cached, f32

PF_CACHED, PF_NEW = 4096, 512


def _prefill_inputs(q_len: int):
    g = torch.Generator().manual_seed(4)
    total = PF_CACHED + PF_NEW
    blocks = total // BLOCK
    k = torch.randn(blocks + 1, BLOCK, HKV, HEAD_DIM, generator=g)
    v = torch.randn(blocks + 1, BLOCK, HKV, HEAD_DIM, generator=g)
    tables = torch.randperm(blocks + 1, generator=g)[:blocks].to(torch.int32)[None]
    q = torch.randn(q_len, HQ, HEAD_DIM, generator=g)
    return (q, k, v, tables, torch.tensor([total], dtype=torch.int32),
            torch.tensor([0, q_len], dtype=torch.int32))


def baseline_prefill(q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens):
    """What a user writes for one sequence's prefill over its cached blocks: gather the
    blocks, then SDPA with the causal mask aligned to the end (the queries are the last
    tokens)."""
    k, v = _gathered(k_cache, v_cache, block_tables)
    q_len, kv = q.shape[0], int(kv_lens[0])
    pos = torch.arange(k.shape[2])
    mask = pos[None, :] <= (kv - q_len + torch.arange(q_len))[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k, v, attn_mask=mask,
                                         enable_gqa=True)
    return out[0].transpose(0, 1)


@pytest.mark.parametrize("impl", ["prefixkv_512_over_cached_4096", "baseline_sdpa_512",
                                  "prefixkv_recompute_4608"])
def test_cpu_prefill(benchmark, machine_limits, impl):
    """Prefill of 512 new tokens over 4096 cached (the TTFT a prefix cache buys) against the
    gather + SDPA baseline and against recomputing all 4608 tokens."""
    benchmark.group = "cpu-prefill-512-over-4096-float32"
    q_len = PF_CACHED + PF_NEW if impl.endswith("4608") else PF_NEW
    args = _prefill_inputs(q_len)
    fn = ((lambda: baseline_prefill(*args)) if impl.startswith("baseline")
          else (lambda: tf.paged_attention(*args)))
    rows = (0, q_len // 2, -1)  # the first, a middle and the last query token
    _check(fn(), rows, _want(("prefill", q_len), args, rows), "float32")
    benchmark.pedantic(fn, rounds=2, warmup_rounds=1)
    total = PF_CACHED + PF_NEW
    flops = 4 * HQ * HEAD_DIM * float(sum(range(total - q_len + 1, total + 1)))  # causal
    record(benchmark, machine_limits, bytes_read=2 * total * HKV * HEAD_DIM * 4, flops=flops,
           impl=impl, query_tokens=q_len, baseline=impl == "baseline_sdpa_512")


@pytest.mark.parametrize("impl", ["prefixkv_fp8", "dequantize_baseline", "prefixkv_bf16"])
def test_cpu_prefill_fp8(benchmark, machine_limits, impl):
    """The same prefill over float8_e4m3fn caches, bfloat16 queries (k_scale = v_scale =
    FP8_SCALE): prefixkv reading the fp8 caches against dequantizing the cache into bfloat16
    first (torch's conversion, what a caller without fp8 support writes) then the bf16 call;
    and the bf16 call alone over those dequantized caches (the fp8 path's floor)."""
    benchmark.group = "cpu-prefill-512-over-4096-fp8"
    q, k, v, tables, kv_lens, cu = _prefill_inputs(PF_NEW)
    q = q.to(torch.bfloat16)
    k8, v8 = ((c / FP8_SCALE).clamp(-448, 448).to(torch.float8_e4m3fn) for c in (k, v))
    deq = tuple((c.to(torch.float32) * FP8_SCALE).to(torch.bfloat16) for c in (k8, v8))
    if impl == "prefixkv_fp8":
        def fn():
            return tf.paged_attention(q, k8, v8, tables, kv_lens, cu, k_scale=FP8_SCALE,
                                      v_scale=FP8_SCALE)
    elif impl == "dequantize_baseline":
        def fn():
            kd, vd = ((c.to(torch.float32) * FP8_SCALE).to(torch.bfloat16) for c in (k8, v8))
            return tf.paged_attention(q, kd, vd, tables, kv_lens, cu)
    else:
        def fn():
            return tf.paged_attention(q, *deq, tables, kv_lens, cu)
    rows = (0, PF_NEW // 2, -1)
    want = _want(("prefill-fp8",), (q, *(c.float() for c in deq), tables, kv_lens, cu), rows)
    _check(fn(), rows, want, "bfloat16")
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    total = PF_CACHED + PF_NEW
    flops = 4 * HQ * HEAD_DIM * float(sum(range(total - PF_NEW + 1, total + 1)))
    # the caches each variant is given: fp8 (the baseline's bf16 copy it makes is not
    # counted), or the bf16 ones prefixkv_bf16 reads, twice the bytes
    cache = deq[0] if impl == "prefixkv_bf16" else k8
    record(benchmark, machine_limits,
           bytes_read=2 * total * HKV * HEAD_DIM * cache.element_size(), flops=flops,
           impl=impl, dtype=str(cache.dtype).removeprefix("torch."), q_dtype="bfloat16",
           baseline=impl == "dequantize_baseline")


# ------------------------------ mixed step: decodes + one prefill chunk, one call vs two, f32

MX_DECODES, MX_CONTEXT, MX_CACHED, MX_POOL = 63, 2048, 2048, 1024


@functools.cache
def mixed_batch(chunk: int):
    """A vLLM chunked-prefill step: MX_DECODES decodes at MX_CONTEXT tokens, then one
    ``chunk``-token prefill chunk over MX_CACHED cached tokens, as (one call's paged_attention
    args, the decodes' args with cu_q_lens None, the chunk's args). The decodes' tables draw
    from a pool of MX_POOL blocks (sequences share blocks: the same reads, a 150 MB cache to
    draw instead of 1 GB, the CI smoke stays cheap); the chunk has blocks of its own."""
    g = torch.Generator().manual_seed(7)
    per_seq, chunk_blocks = MX_CONTEXT // BLOCK, (MX_CACHED + chunk) // BLOCK
    num_blocks = MX_POOL + chunk_blocks
    k, v = (torch.randn(num_blocks, BLOCK, HKV, HEAD_DIM, generator=g) for _ in range(2))
    dec = torch.stack([torch.randperm(MX_POOL, generator=g)[:per_seq]
                       for _ in range(MX_DECODES)])
    width = max(per_seq, chunk_blocks)
    tables = torch.zeros(MX_DECODES + 1, width, dtype=torch.int32)
    tables[:MX_DECODES, :per_seq] = dec.to(torch.int32)
    tables[MX_DECODES, :chunk_blocks] = torch.arange(MX_POOL, num_blocks, dtype=torch.int32)
    i32 = dict(dtype=torch.int32)
    kv_lens = torch.tensor([MX_CONTEXT] * MX_DECODES + [MX_CACHED + chunk], **i32)
    cu = torch.tensor(list(range(MX_DECODES + 1)) + [MX_DECODES + chunk], **i32)
    q = torch.randn(MX_DECODES + chunk, HQ, HEAD_DIM, generator=g)
    one = (q, k, v, tables, kv_lens, cu)
    decodes = (q[:MX_DECODES], k, v, tables[:MX_DECODES].contiguous(), kv_lens[:MX_DECODES])
    prefill = (q[MX_DECODES:], k, v, tables[MX_DECODES:].contiguous(), kv_lens[MX_DECODES:],
               torch.tensor([0, chunk], **i32))
    return one, decodes, prefill


@pytest.mark.parametrize("chunk", [256, 512])
@pytest.mark.parametrize("impl", ["prefixkv_one_call", "prefixkv_two_calls"])
def test_cpu_mixed_decode_prefill(benchmark, machine_limits, impl, chunk):
    """One call over a mixed batch (what vLLM's chunked-prefill scheduler hands the attention
    backend) against the same work split into two calls, decodes then the chunk (the
    baseline). The one call groups its sequences by q_len (_native._q_len_groups), so it
    should cost what the two cost. Padded to the chunk's length (before the grouping) the
    256-token step took 48.7 s against 1.2 s, one thread; the 512-token one (a tiled
    prefill, its decodes padded to 1 but not through the decode kernel) 3.3 s vs 2.0 s."""
    benchmark.group = f"cpu-mixed-{MX_DECODES}x{MX_CONTEXT}-decodes+{chunk}-chunk-float32"
    one, decodes, prefill = mixed_batch(chunk)
    if impl == "prefixkv_one_call":
        def fn():
            return tf.paged_attention(*one)
    else:
        def fn():
            return torch.cat([tf.paged_attention(*decodes), tf.paged_attention(*prefill)])
    rows = (0, MX_DECODES - 1, MX_DECODES, MX_DECODES + chunk // 2, -1)
    _check(fn(), rows, _want(("mixed", chunk), one, rows), "float32")
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    keys = MX_DECODES * MX_CONTEXT + MX_CACHED + chunk
    flops = 4 * HQ * HEAD_DIM * (MX_DECODES * MX_CONTEXT + float(
        sum(range(MX_CACHED + 1, MX_CACHED + chunk + 1))))  # causal chunk
    record(benchmark, machine_limits, bytes_read=2 * keys * HKV * HEAD_DIM * 4, flops=flops,
           impl=impl, chunk=chunk, baseline=impl == "prefixkv_two_calls")


# ------------------- a small deployment's step: decodes + a short chunk, one call, f32 / bf16

SM_DECODES, SM_CONTEXT, SM_CHUNK = 8, 512, 8


@functools.cache
def small_mixed_batch(dtype: str):
    """SM_DECODES decodes at SM_CONTEXT tokens, then one SM_CHUNK-token prefill chunk ending at
    SM_CONTEXT, each sequence on blocks of its own: (one call's paged_attention args, the
    decodes' args with cu_q_lens None, the chunk's args)."""
    g = torch.Generator().manual_seed(11)
    num_seqs, per_seq = SM_DECODES + 1, SM_CONTEXT // BLOCK
    k, v = (torch.randn(num_seqs * per_seq, BLOCK, HKV, HEAD_DIM, generator=g)
            .to(DTYPES[dtype]) for _ in range(2))
    tables = torch.randperm(num_seqs * per_seq, generator=g).view(num_seqs, per_seq)
    tables = tables.to(torch.int32)
    kv_lens = torch.full((num_seqs,), SM_CONTEXT, dtype=torch.int32)
    cu = torch.tensor(list(range(num_seqs)) + [SM_DECODES + SM_CHUNK], dtype=torch.int32)
    q = torch.randn(SM_DECODES + SM_CHUNK, HQ, HEAD_DIM, generator=g).to(DTYPES[dtype])
    decodes = (q[:SM_DECODES], k, v, tables[:SM_DECODES].contiguous(), kv_lens[:SM_DECODES])
    chunk = (q[SM_DECODES:], k, v, tables[SM_DECODES:].contiguous(), kv_lens[SM_DECODES:],
             torch.tensor([0, SM_CHUNK], dtype=torch.int32))
    return (q, k, v, tables, kv_lens, cu), decodes, chunk


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("impl", ["prefixkv", "prefixkv_by_groups", "baseline_sdpa"])
def test_cpu_small_mixed_step(benchmark, machine_limits, monkeypatch, impl, dtype):
    """A small deployment's chunked-prefill step (8 decodes at 512 tokens + an 8-token chunk):
    prefixkv in one call (every token a decode of the compiled kernel, _native._c_ragged)
    against the gather + SDPA baseline (the decodes in one call, the chunk in another, the
    code a user writes) and against prefixkv by groups (the route before _c_ragged: the
    decodes by the kernel, the chunk padded by torch ops; RAGGED_DECODE_*MAX_Q 0)."""
    from prefixkv.torch_frontend import _native

    benchmark.group = f"cpu-small-mixed-{SM_DECODES}x{SM_CONTEXT}+{SM_CHUNK}-chunk-{dtype}"
    one, decodes, chunk = small_mixed_batch(dtype)
    if impl == "baseline_sdpa":
        def fn():
            return torch.cat([baseline_paged_attention(*decodes), baseline_prefill(*chunk)])
    else:
        if impl == "prefixkv_by_groups":
            monkeypatch.setattr(_native, "RAGGED_DECODE_MAX_Q", 0)
            monkeypatch.setattr(_native, "RAGGED_DECODE_16BIT_MAX_Q", 0)

        def fn():
            return tf.paged_attention(*one)
    rows = (0, SM_DECODES - 1, SM_DECODES, -1)
    _check(fn(), rows, _want(("small-mixed", dtype), one, rows), dtype)
    benchmark.pedantic(fn, rounds=20, iterations=5, warmup_rounds=1)
    keys = SM_DECODES * SM_CONTEXT + sum(range(SM_CONTEXT - SM_CHUNK + 1, SM_CONTEXT + 1))
    record(benchmark, machine_limits,
           bytes_read=2 * (SM_DECODES + 1) * SM_CONTEXT * HKV * HEAD_DIM * one[1].element_size(),
           flops=4 * HQ * HEAD_DIM * float(keys), impl=impl, baseline=impl == "baseline_sdpa")


# ------------------------------------------------------------------- per-call overhead


def _one_token_write(device):
    g = torch.Generator().manual_seed(3)
    k = torch.randn(64, BLOCK, HKV, HEAD_DIM, generator=g).to(device)
    v = torch.randn(64, BLOCK, HKV, HEAD_DIM, generator=g).to(device)
    key = torch.randn(1, HKV, HEAD_DIM, generator=g).to(device)
    return (key, key, k, v, torch.tensor([37], dtype=torch.int32, device=device), None)


def _no_memo(monkeypatch, impl):
    """The wrappers with every layout check run on every call (no layout kept: the
    ``wrapper_no_memo`` rows, what the wrapper cost before its layout checks were kept)."""
    if impl == "wrapper_no_memo":
        from prefixkv.torch_frontend import _ops
        monkeypatch.setattr(_ops, "_layout_key", lambda *a, **k: None)


def _call_overhead(benchmark, device, impl):
    """One decode token's write_kv: the wrapper as a model calls it (tf.write_kv: its checks,
    the layout ones kept per layout, then the direct eager call), the wrapper checking its
    layout every call, the direct call alone, the same implementation through the dispatcher
    (torch.ops.prefixkv.write_kv, the baseline), and the two raw index_copy_ a user would
    write unchecked."""
    from prefixkv.torch_frontend import _ops
    args = _one_token_write(device)
    key, _, k, v, slots, _ = args
    rows = slots.long()
    fn = {"wrapper": lambda: tf.write_kv(*args[:5]),
          "wrapper_no_memo": lambda: tf.write_kv(*args[:5]),
          "eager_direct": lambda: _ops._invoke("write_kv", args),
          "custom_op_dispatch": lambda: torch.ops.prefixkv.write_kv(*args),
          "raw_index_copy": lambda: (k.view(-1, HKV, HEAD_DIM).index_copy_(0, rows, key),
                                     v.view(-1, HKV, HEAD_DIM).index_copy_(0, rows, key))}[impl]
    fn()
    row = int(slots[0])
    assert torch.equal(k[row // BLOCK, row % BLOCK], key[0])
    assert torch.equal(v[row // BLOCK, row % BLOCK], key[0])
    benchmark.pedantic(fn, rounds=20, iterations=50, warmup_rounds=1)
    benchmark.extra_info.update(impl=impl, device=device)
    if impl == "custom_op_dispatch":
        benchmark.extra_info["baseline"] = True


@pytest.mark.parametrize("impl", ["wrapper", "wrapper_no_memo", "eager_direct",
                                  "custom_op_dispatch", "raw_index_copy"])
def test_cpu_call_overhead_write_kv(benchmark, impl, monkeypatch):
    benchmark.group = "cpu-call-overhead-write_kv-1-token"
    _no_memo(monkeypatch, impl)
    _call_overhead(benchmark, "cpu", impl)


def _decode_overhead(benchmark, device, impl):
    """One decode token over 64 cached keys (4 blocks), with out= and lse= buffers: the
    wrapper (its checks, the layout ones kept per layout), the wrapper checking its layout
    every call, and the backend's function called unchecked (the baseline: what the wrapper
    adds is the difference)."""
    from prefixkv.torch_frontend import _ops
    g = torch.Generator().manual_seed(4)
    k = torch.randn(64, BLOCK, HKV, HEAD_DIM, generator=g).to(device)
    v = torch.randn(64, BLOCK, HKV, HEAD_DIM, generator=g).to(device)
    q = torch.randn(1, HQ, HEAD_DIM, generator=g).to(device)
    tables = torch.arange(4, dtype=torch.int32, device=device).view(1, 4)
    kv_lens = torch.tensor([64], dtype=torch.int32, device=device)
    out, lse = torch.empty_like(q), torch.empty(1, HQ, device=device)
    scale = HEAD_DIM ** -0.5
    kernel = _ops.select("paged_attention", device, None)

    def wrapped():
        return tf.paged_attention(q, k, v, tables, kv_lens, out=out, lse=lse)

    fn = {"wrapper": wrapped, "wrapper_no_memo": wrapped,
          "backend_unchecked": lambda: kernel(
              out, lse, q, k, v, tables, kv_lens, None, scale=scale, causal=True,
              sliding_window=None, logits_soft_cap=None, workspace=None)}[impl]
    fn()
    want = baseline_paged_attention(q, k, v, tables, kv_lens)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    benchmark.pedantic(fn, rounds=20, iterations=20, warmup_rounds=1)
    benchmark.extra_info.update(impl=impl, device=device)
    if impl == "backend_unchecked":
        benchmark.extra_info["baseline"] = True


@pytest.mark.parametrize("impl", ["wrapper", "wrapper_no_memo", "backend_unchecked"])
def test_cpu_call_overhead_decode(benchmark, impl, monkeypatch):
    benchmark.group = "cpu-call-overhead-paged_attention-1-token-64-keys"
    _no_memo(monkeypatch, impl)
    with torch.inference_mode():
        _decode_overhead(benchmark, "cpu", impl)


# ----------------------------------------------------------------------------------- GPU


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("impl", ["wrapper", "wrapper_no_memo", "eager_direct",
                                  "custom_op_dispatch", "raw_index_copy"])
def test_gpu_call_overhead_write_kv(benchmark, impl, monkeypatch):
    """Host time per call (kernel launches are asynchronous): what an eager decode step pays
    per layer and op before the GPU work."""
    benchmark.group = "gpu-call-overhead-write_kv-1-token"
    _no_memo(monkeypatch, impl)
    _call_overhead(benchmark, "cuda", impl)


@cuda
@pytest.mark.parametrize("shape", [(8, 4096), (64, 4096), (1, 32768)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("impl", ["triton", "torch", "baseline_sdpa", "baseline_sdpa_repeat_kv"])
def test_gpu_decode(benchmark, impl, dtype, shape):
    """Decode at a fraction of the measured read bandwidth and of the datasheet HBM peak.
    Two baselines, both marked (bench/report.py takes the faster): SDPA with enable_gqa and
    the mask, and SDPA over K/V repeated for every q head (_repeat_kv), which the fused
    memory-efficient kernel can run."""
    num_seqs, context = shape
    benchmark.group = f"gpu-decode-{dtype}-{num_seqs}x{context}"
    q, k, v, tables, kv_lens = decode_batch("cuda", DTYPES[dtype], num_seqs, context)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], device="cuda")
    if impl.startswith("baseline"):
        def fn():
            return baseline_paged_attention(q, k, v, tables, kv_lens,
                                            repeat_kv=impl == "baseline_sdpa_repeat_kv")
    else:
        ws = torch.empty(tf.attention_workspace_size(q, k, tables, backend=impl),
                         dtype=torch.uint8, device="cuda")

        def fn():  # caller buffers: no allocation in the timed calls
            return tf.paged_attention(q, k, v, tables, kv_lens, out=out, lse=lse, workspace=ws,
                                      backend=impl)
    rows = DECODE_ROWS if num_seqs > 1 else (0,)
    _check(fn(), rows, _want(("gpu-decode", dtype, shape), (q, k, v, tables, kv_lens), rows),
           dtype)
    t = cuda_benchmark(benchmark, fn, rounds=10, warmup_rounds=2, iters=20)
    gpu = torch.cuda.get_device_name()
    peak = datasheet_hbm_gbps(gpu)
    nbytes = _kv_bytes(k, num_seqs, context)
    measured = cuda_memory_limits()
    gbps = nbytes / t / 1e9
    if impl.startswith("baseline"):
        benchmark.extra_info["baseline"] = True
    benchmark.extra_info.update(
        impl=impl, dtype=dtype, gpu=gpu, kernel_s=t, bytes_read=nbytes, bytes_written=0,
        bytes=nbytes, gbps=round(gbps, 1),
        measured_read_gbps=measured["read_gbps"], measured_copy_gbps=measured["copy_gbps"],
        read_fraction=round(gbps / measured["read_gbps"], 3))
    if peak:
        benchmark.extra_info["hbm_fraction"] = round(gbps / peak, 3)  # of the datasheet peak


# --------------------------- GPU model step: 32 layers' decode attention, plan vs wrapper

@cuda
@pytest.mark.parametrize("impl", ["plan_then_run", "paged_attention"])
def test_gpu_plan_step(benchmark, impl):
    """The attention calls of one decode step of a 32-layer model (8 sequences x 1024 cached,
    bf16, one cache for every layer), host metadata as an engine builds it: a plan made once
    per step (timed: the metadata copied to the GPU once) and run per layer, against the
    wrapper per layer (the metadata checked and copied per call). Wall time of the step,
    synced once at its end: where the host's per-call work outruns small kernels."""
    benchmark.group = "gpu-plan-step-bf16-32x(8x1024)"
    q, k, v, tables, kv_lens = decode_batch("cuda", torch.bfloat16, num_seqs=8, context=1024)
    tables, kv_lens = tables.cpu(), kv_lens.cpu()
    out = torch.empty_like(q)
    ws = torch.empty(tf.attention_workspace_size(q, k, tables), dtype=torch.uint8,
                     device="cuda")
    if impl == "plan_then_run":
        def fn():
            plan = tf.plan_paged_attention(tables, kv_lens, k_cache=k, num_q_heads=HQ)
            for _ in range(32):
                plan.run(q, k, v, out=out, workspace=ws)
            return out
    else:
        def fn():
            for _ in range(32):
                tf.paged_attention(q, k, v, tables, kv_lens, out=out, workspace=ws)
            return out
        benchmark.extra_info["baseline"] = True
    _check(fn(), DECODE_ROWS, _want(("gpu-plan-step",), (q, k, v, tables, kv_lens),
                                    DECODE_ROWS), "bfloat16")
    t = cuda_benchmark(benchmark, fn, rounds=20, warmup_rounds=3)
    benchmark.extra_info.update(impl=impl, gpu_s=t, layers=32)


# ----------------------- GPU shared prefix: 64 decode queries over one 32768-token prefix

GSP_SEQS, GSP_PREFIX, GSP_OWN = 64, 32768, 256


@functools.cache
def _gpu_shared_prefix_batch(dtype):
    """shared_prefix_batch on the GPU: a 32768-token prefix (128 MiB of K and V, over the L2
    cache) shared by 64 sequences with 256 own tokens each."""
    return shared_prefix_batch("cuda", dtype, seed=5, seqs=GSP_SEQS, prefix=GSP_PREFIX,
                               own_len=GSP_OWN)


@cuda
@pytest.mark.parametrize("impl", ["shared_prefix_attention", "paged_attention",
                                  "baseline_sdpa", "baseline_sdpa_repeat_kv"])
def test_gpu_shared_prefix(benchmark, impl):
    """Cascade decode on the GPU (Triton): the prefix read once for all 64 queries against
    paged attention reading it once per sequence, and the gather + SDPA baselines (with
    enable_gqa, and over repeated K/V as test_gpu_decode's: 35 GB of repeated K/V a call,
    freed after it). Records the kernel time, the unique KV bytes (prefix once + own tokens)
    and their fraction of the measured read bandwidth; the ratio to paged_attention is the
    cascade's speedup."""
    benchmark.group = "gpu-shared-prefix-bf16-64x(32768+256)"
    sp_args, pa_args = _gpu_shared_prefix_batch(torch.bfloat16)
    q = sp_args[0]
    out, lse = torch.empty_like(q), torch.empty(q.shape[:2], device="cuda")
    if impl == "shared_prefix_attention":
        ws = torch.empty(tf.attention_workspace_size(q, sp_args[1], sp_args[6],
                                                     prefix_block_tables=sp_args[3]),
                         dtype=torch.uint8, device="cuda")

        def fn():
            return tf.shared_prefix_attention(*sp_args, out=out, lse=lse, workspace=ws)
    elif impl == "paged_attention":
        ws = torch.empty(tf.attention_workspace_size(q, pa_args[1], pa_args[3]),
                         dtype=torch.uint8, device="cuda")

        def fn():
            return tf.paged_attention(*pa_args, out=out, lse=lse, workspace=ws)
    else:
        def fn():
            return baseline_paged_attention(*pa_args,
                                            repeat_kv=impl == "baseline_sdpa_repeat_kv")
        benchmark.extra_info["baseline"] = True
    _check(fn(), SHARED_ROWS, _want(("gpu-shared",), pa_args, SHARED_ROWS), "bfloat16")
    t = cuda_benchmark(benchmark, fn, rounds=10, warmup_rounds=2)
    unique = 2 * (GSP_PREFIX + GSP_SEQS * GSP_OWN) * HKV * HEAD_DIM * 2
    read = cuda_memory_limits()["read_gbps"]
    benchmark.extra_info.update(
        impl=impl, kernel_s=t, unique_bytes=unique, bytes_read=unique, bytes_written=0,
        unique_gbps=round(unique / t / 1e9, 1),
        measured_read_gbps=read, unique_read_fraction=round(unique / t / 1e9 / read, 3),
        note="bytes = unique KV (prefix once + own tokens)")


# ------------- GPU prefill: 8 sequences x 512 new tokens over 4096 cached each, bf16

GPF_SEQS = 8


@functools.cache
def _gpu_prefill_batch():
    """(q [8 * 512, Hq, D], k, v caches, tables, kv_lens, cu_q_lens) on the GPU, bf16: 8
    sequences of 4096 cached + 512 new tokens (the new ones' KV already written), blocks in
    random order."""
    g = torch.Generator(device="cuda").manual_seed(6)
    total = PF_CACHED + PF_NEW
    blocks = GPF_SEQS * total // BLOCK
    k, v = (torch.randn(blocks + 1, BLOCK, HKV, HEAD_DIM, generator=g, device="cuda")
            .to(torch.bfloat16) for _ in range(2))
    tables = torch.randperm(blocks + 1, generator=g, device="cuda")[:blocks].to(torch.int32)
    q = torch.randn(GPF_SEQS * PF_NEW, HQ, HEAD_DIM, generator=g, device="cuda")
    i32 = dict(dtype=torch.int32, device="cuda")
    return (q.to(torch.bfloat16), k, v, tables.view(GPF_SEQS, -1).contiguous(),
            torch.full((GPF_SEQS,), total, **i32),
            torch.arange(GPF_SEQS + 1, **i32) * PF_NEW)


@cuda
@pytest.mark.parametrize("impl", ["triton_512_over_cached_4096", "baseline_sdpa_512",
                                  "baseline_sdpa_repeat_kv_512", "recompute_sdpa_4608"])
def test_gpu_prefill(benchmark, impl):
    """Prefill with a cached prefix on the GPU: the Triton kernel over the paged cache
    against gather + SDPA with the causal mask aligned to the end (with enable_gqa, and over
    K/V repeated for every q head, _repeat_kv: both marked baselines, bench/report.py takes
    the faster), and against recomputing all 4608 tokens of each sequence with causal SDPA
    over dense K/V (flash attention: what a prefix cache saves). Records TFLOP/s of the
    attention each does (causal: each query sees its position + 1 keys) and its fraction of
    the measured bf16 matmul rate."""
    benchmark.group = "gpu-prefill-8x(512-over-4096)-bf16"
    q, k, v, tables, kv_lens, cu = _gpu_prefill_batch()
    total = PF_CACHED + PF_NEW
    rows = (0, PF_NEW - 1, -1)  # the first and last new token of sequence 0, the last of 7
    want = _want(("gpu-prefill",), (q, k, v, tables, kv_lens, cu), rows)
    if impl.startswith("triton"):
        out = torch.empty_like(q)
        ws = torch.empty(tf.attention_workspace_size(q, k, tables, cu), dtype=torch.uint8,
                         device="cuda")

        def fn():
            return tf.paged_attention(q, k, v, tables, kv_lens, cu, out=out, workspace=ws)
        _check(fn(), rows, want, "bfloat16")
        q_len = PF_NEW
    elif impl.startswith("baseline"):
        kd, vd = _gathered(k, v, tables)                       # [S, Hkv, 4608, D]
        qd = q.view(GPF_SEQS, PF_NEW, HQ, HEAD_DIM).transpose(1, 2)
        pos = torch.arange(total, device="cuda")
        mask = pos[None, :] <= (PF_CACHED + torch.arange(PF_NEW, device="cuda"))[:, None]
        repeat = impl == "baseline_sdpa_repeat_kv_512"

        def fn():
            k2, v2 = _gathered(k, v, tables)
            if repeat:
                k2, v2 = _repeat_kv(k2, v2, HQ)
            return F.scaled_dot_product_attention(qd, k2, v2, attn_mask=mask,
                                                  enable_gqa=not repeat)
        # [S, Hq, 512, D] -> the paged call's rows [S * 512, Hq, D]
        _check(fn().transpose(1, 2).reshape(-1, HQ, HEAD_DIM), rows, want, "bfloat16")
        benchmark.extra_info["baseline"] = True
        q_len = PF_NEW
    else:
        kd, vd = _gathered(k, v, tables)
        qf = torch.randn(GPF_SEQS, HQ, total, HEAD_DIM, device="cuda").to(torch.bfloat16)

        def fn():
            return F.scaled_dot_product_attention(qf, kd, vd, is_causal=True, enable_gqa=True)
        # as a paged call: each sequence's 4608 queries over its own 4608 cached tokens
        i32 = dict(dtype=torch.int32, device="cuda")
        recompute = (qf.transpose(1, 2).reshape(-1, HQ, HEAD_DIM), k, v, tables, kv_lens,
                     torch.arange(GPF_SEQS + 1, **i32) * total)
        rows = (0, total // 2, -1)
        _check(fn().transpose(1, 2).reshape(-1, HQ, HEAD_DIM), rows,
               _want(("gpu-recompute",), recompute, rows), "bfloat16")
        q_len = total
    t = cuda_benchmark(benchmark, fn)
    flops = GPF_SEQS * 4 * HQ * HEAD_DIM * float(sum(range(total - q_len + 1, total + 1)))
    peak = cuda_matmul_tflops()
    benchmark.extra_info.update(
        impl=impl, kernel_s=t, query_tokens=GPF_SEQS * q_len, flops=flops,
        tflops=round(flops / t / 1e12, 1), measured_matmul_tflops=peak,
        matmul_fraction=round(flops / t / 1e12 / peak, 3))
