"""Tile sweeps of the GPU decode kernels on a lent GPU: which configuration reads the KV
fastest, as GB/s and the fraction of the read bandwidth measured in the same run.

    python bench/tune_device.py triton [SECONDS]    # torch frontend, Triton kernel
    python bench/tune_device.py pallas [SECONDS]    # JAX frontend, Pallas GPU kernel
    python bench/tune_device.py splits [SECONDS]    # both: split-KV counts, few long sequences
    python bench/tune_device.py f32 [SECONDS]       # Triton float32: ieee against tf32x3 dots
    python bench/tune_device.py cascade [SECONDS]   # cascade prefix-pass splits, both frontends
    python bench/tune_device.py jaxprof [SECONDS]   # the CUDA kernels of a JAX decode call
    python bench/tune_device.py torchprof [SECONDS] # the same for the Triton decode (split-KV)
    python bench/tune_device.py prefill [SECONDS]   # Triton prefill tiles (512 over 4096 cached)
    python bench/tune_device.py splitdecode [SECONDS]  # Triton split-KV decode, deeper pipelines
    python bench/tune_device.py pallasprefill [SECONDS]  # Pallas GPU prefill tiles
    python bench/tune_device.py fulltiles [SECONDS]  # Triton: unmasked whole key steps, A/B

Decode over 32 q / 8 kv heads, head_dim 128, 16-token blocks (the benchmarks' shapes):
Triton at 64 x 4096, 8 x 4096 and 1 x 32768 tokens (bf16 and float32) over keys per step x
warps x pipeline stages; Pallas at 32 x 8192 and 4 x 16384 (bf16) over blocks per step x
block-by-block or gathered tiles x warps x stages; splits: the split-KV count of both kernels
(default from prefixkv.paged.planner.num_kv_splits, 4-64) on the few-sequence shapes, bf16.
Each configuration prints one line as it
finishes; the sweep stops at SECONDS (default 80). The defaults in kernels/ came from these
sweeps on an H200 (2026-11-28); not part of the test run (no ``test_``/``bench_`` name).
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

# JAX would otherwise take 75% of the GPU's memory when it starts (splits runs torch and JAX)
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

KV_HEADS, HEAD_DIM = 8, 128


def _line(label: str, results: list[str]) -> None:
    print(f"{label}: " + " | ".join(results), flush=True)


def _measure(results: list[str], label: str, measure, nbytes: int, read: float) -> None:
    """Append "label time fraction-of-read[ extra]" to ``results``: ``measure()`` gives the
    seconds of one call, or (seconds, extra text); a configuration that does not compile or
    fit appends its exception's name."""
    try:
        got = measure()
    except Exception as e:  # noqa: BLE001 - any failure of a swept configuration
        results.append(f"{label} {type(e).__name__}")
        return
    t, extra = got if isinstance(got, tuple) else (got, "")
    results.append(f"{label} {t * 1e6:.0f} us {nbytes / t / 1e9 / read:.3f}{extra}")


def _triton_seconds(dtype, num_seqs: int, context: int, workspace: bool = True) -> float:
    """Seconds per decode call of the torch frontend's Triton kernel (out=, and workspace=
    unless forced split counts may need more than it is sized for)."""
    import torch

    from bench.bench_torch_attention import decode_batch
    from bench.conftest import cuda_seconds
    from prefixkv import torch_frontend as tf

    q, k, v, tables, kv_lens = decode_batch("cuda", dtype, num_seqs, context)
    out, lse = torch.empty_like(q), torch.empty(q.shape[:2], device="cuda")
    ws = torch.empty(tf.attention_workspace_size(q, k, tables, backend="triton"),
                     dtype=torch.uint8, device="cuda") if workspace else None
    return cuda_seconds(lambda: tf.paged_attention(q, k, v, tables, kv_lens, out=out, lse=lse,
                                                   workspace=ws, backend="triton"), iters=20)


def sweep_triton(deadline: float, split_only: bool = False) -> None:
    """keys per step x warps x stages of the Triton decode; split_only: the split-KV shapes
    alone (8 x 4096, 1 x 32768; bf16) over deeper pipelines."""
    import torch
    from prefixkv.kernels.triton import attention as attn

    from bench.conftest import cuda_memory_limits

    read = cuda_memory_limits()["read_gbps"]
    print(f"measured read bandwidth {read:.0f} GB/s", flush=True)
    config, warps = attn.attention_config, attn.attention_warps
    shapes = [(64, 4096), (8, 4096), (1, 32768)]
    plans = {torch.bfloat16: [(None, None, None), (64, 4, None), (128, 4, None), (64, 4, 3),
                              (128, 4, 3), (256, 4, None), (64, 8, None), (128, 8, None)],
             torch.float32: [(None, None, None), (32, 4, None), (64, 4, 3), (128, 4, None),
                             (64, 8, None)]}
    if split_only:
        shapes = shapes[1:]
        plans = {torch.bfloat16: [(None, None, None), (64, 4, 5), (64, 2, 4), (64, 2, 6),
                                  (64, 2, 3), (128, 2, 3), (32, 2, 5), (64, 1, 5),
                                  (None, None, None)]}
    try:
        for dtype, plan in plans.items():
            for keys, nwarps, stages in plan:
                if time.time() > deadline:
                    print("deadline reached", flush=True)
                    return

                def patched(*a, keys=keys, stages=stages, **k):
                    cfg = config(*a, **k)
                    if keys:  # a swept tile in the stages named (None: Triton's default, 3),
                        cfg["BLOCK_N"] = keys  # not those attention_stages gives the default
                        cfg["num_stages"] = stages or 3
                    elif stages:
                        cfg["num_stages"] = stages
                    return cfg

                attn.attention_config = patched
                attn.attention_warps = (lambda *a, w=nwarps, **k: w) if nwarps else warps
                results = []
                for num_seqs, context in shapes:
                    _measure(results, f"{num_seqs}x{context}",
                             lambda n=num_seqs, c=context, d=dtype: _triton_seconds(d, n, c),
                             2 * num_seqs * context * KV_HEADS * HEAD_DIM * dtype.itemsize,
                             read)
                _line(f"{str(dtype)[6:]} keys={keys or 'default'} warps={nwarps or 'default'} "
                      f"stages={stages or (3 if keys else 'default')}", results)
    finally:
        attn.attention_config, attn.attention_warps = config, warps


def sweep_f32(deadline: float) -> None:
    """float32 decode: ieee FMA dots against three-pass tf32 (tf32x3) tensor-core dots, over
    keys per step x warps, with each one's largest difference from the ieee output."""
    import torch
    from prefixkv.kernels.triton import attention as attn

    from bench.bench_torch_attention import decode_batch
    from bench.conftest import cuda_memory_limits
    from prefixkv import torch_frontend as tf

    read = cuda_memory_limits()["read_gbps"]
    print(f"measured read bandwidth {read:.0f} GB/s", flush=True)
    config, warps, prec = attn.attention_config, attn.attention_warps, attn.F32_DOT_PREC
    shapes = [(64, 4096), (8, 4096), (1, 32768)]
    want = {}  # the ieee (FMA) output each configuration's error is measured from
    attn.F32_DOT_PREC = "ieee"
    try:
        for num_seqs, context in shapes:
            q, k, v, tables, kv_lens = decode_batch("cuda", torch.float32, num_seqs, context)
            want[num_seqs] = tf.paged_attention(q, k, v, tables, kv_lens, backend="triton")
    finally:
        attn.F32_DOT_PREC = prec
    plan = [("ieee", None, None), ("tf32x3", None, None), ("tf32x3", 32, None),
            ("tf32x3", 128, None), ("tf32x3", 64, 8), ("tf32x3", 32, 8), ("ieee", 32, 4)]
    try:
        for dot, keys, nwarps in plan:
            if time.time() > deadline:
                print("deadline reached", flush=True)
                return

            def patched(*a, keys=keys, **k):
                cfg = config(*a, **k)
                if keys:
                    cfg["BLOCK_N"] = keys
                return cfg

            attn.attention_config, attn.F32_DOT_PREC = patched, dot
            attn.attention_warps = (lambda *a, w=nwarps, **k: w) if nwarps else warps
            results = []
            for num_seqs, context in shapes:
                def timed_and_error(n=num_seqs, c=context):
                    t = _triton_seconds(torch.float32, n, c)
                    q, k, v, tables, kv_lens = decode_batch("cuda", torch.float32, n, c)
                    got = tf.paged_attention(q, k, v, tables, kv_lens, backend="triton")
                    return t, f" err {(got - want[n]).abs().max().item():.1e}"

                _measure(results, f"{num_seqs}x{context}", timed_and_error,
                         2 * num_seqs * context * KV_HEADS * HEAD_DIM * 4, read)
            _line(f"f32 {dot} keys={keys or 'default'} warps={nwarps or 'default'}", results)
    finally:
        attn.attention_config, attn.attention_warps, attn.F32_DOT_PREC = config, warps, prec


def sweep_prefill(deadline: float) -> None:
    """Triton prefill tiles: 8 sequences of 512 new tokens over 4096 cached, bf16 (the
    benchmark's shape), over rows per program (BLOCK_M: query tokens x the group's 4 q heads)
    x keys per step x warps x pipeline stages; TFLOP/s of the causal attention, the fraction
    of the measured bf16 matmul rate and each one's largest difference from the default's
    output."""
    import torch
    from prefixkv.kernels.triton import attention as attn

    from bench.bench_torch_attention import GPF_SEQS, HQ, PF_CACHED, PF_NEW, _gpu_prefill_batch
    from bench.conftest import cuda_matmul_tflops, cuda_seconds
    from prefixkv import torch_frontend as tf

    peak = cuda_matmul_tflops()
    total = PF_CACHED + PF_NEW
    flops = GPF_SEQS * 4 * HQ * HEAD_DIM * float(sum(range(total - PF_NEW + 1, total + 1)))
    print(f"measured bf16 matmul {peak:.0f} TFLOP/s", flush=True)
    q, k, v, tables, kv_lens, cu = _gpu_prefill_batch()
    want = tf.paged_attention(q, k, v, tables, kv_lens, cu, backend="triton")
    config, warps = attn.attention_config, attn.attention_warps
    plan = [(None, None, None, None), (64, 64, 4, None), (64, 128, 8, None), (64, 64, 8, 3),
            (128, 64, 8, None), (128, 64, 8, 3), (128, 128, 8, None), (128, 32, 8, None),
            (128, 64, 4, None), (128, 64, 8, 2), (128, 64, 8, 4), (128, 128, 8, 2),
            (32, 64, 4, None)]
    try:
        for rows, keys, nwarps, stages in plan:
            if time.time() > deadline:
                print("deadline reached", flush=True)
                return

            def patched(*a, rows=rows, keys=keys, stages=stages, **kw):
                cfg = config(*a, **kw)
                if not (a[3] if len(a) > 3 else kw["decode"]):
                    cfg.update({n: x for n, x in (("BLOCK_M", rows), ("BLOCK_N", keys),
                                                  ("num_stages", stages)) if x})
                return cfg

            def patched_warps(head_dim, decode, w=nwarps, **kw):
                return w if w and not decode else warps(head_dim, decode, **kw)

            attn.attention_config, attn.attention_warps = patched, patched_warps

            def timed(label=None):
                out = torch.empty_like(q)
                ws = torch.empty(tf.attention_workspace_size(q, k, tables, cu),
                                 dtype=torch.uint8, device=q.device)
                t = cuda_seconds(lambda: tf.paged_attention(q, k, v, tables, kv_lens, cu,
                                                            out=out, workspace=ws,
                                                            backend="triton"))
                err = (out.float() - want.float()).abs().max().item()
                return t, f" err {err:.1e}"

            results = []
            try:
                t, extra = timed()
                results.append(f"{t * 1e6:.0f} us {flops / t / 1e12:.0f} TFLOP/s "
                               f"{flops / t / 1e12 / peak:.3f}{extra}")
            except Exception as e:  # noqa: BLE001 - any failure of a swept configuration
                results.append(type(e).__name__)
            _line(f"prefill rows={rows or 'default'} keys={keys or 'default'} "
                  f"warps={nwarps or 'default'} stages={stages or 'default'}", results)
    finally:
        attn.attention_config, attn.attention_warps = config, warps


def sweep_full_tiles(deadline: float) -> None:
    """The Triton kernel's key loop as shipped (every step masked) against FULL_TILES (whole
    steps of keys every query row sees unmasked, then the masked rest), A/B in one process:
    decode bf16 at 64 x 4096 (one program a sequence), 8 x 4096 and 1 x 32768 (split-KV) and
    float32 at 64 x 4096, as fractions of the measured read bandwidth; the prefill of 8 x 512
    tokens over 4096 cached (bf16), as TFLOP/s and the fraction of the measured matmul rate;
    each with its largest difference from the shipped loop's output."""
    import torch
    from prefixkv.kernels.triton import attention as attn

    from bench.bench_torch_attention import GPF_SEQS, HQ, PF_CACHED, PF_NEW, _gpu_prefill_batch
    from bench.conftest import cuda_matmul_tflops, cuda_memory_limits, cuda_seconds
    from prefixkv import torch_frontend as tf

    read = cuda_memory_limits()["read_gbps"]
    peak = cuda_matmul_tflops()
    print(f"measured read bandwidth {read:.0f} GB/s, bf16 matmul {peak:.0f} TFLOP/s", flush=True)
    total = PF_CACHED + PF_NEW
    flops = GPF_SEQS * 4 * HQ * HEAD_DIM * float(sum(range(total - PF_NEW + 1, total + 1)))
    q, k, v, tables, kv_lens, cu = _gpu_prefill_batch()
    out = torch.empty_like(q)
    ws = torch.empty(tf.attention_workspace_size(q, k, tables, cu), dtype=torch.uint8,
                     device=q.device)

    def prefill():
        tf.paged_attention(q, k, v, tables, kv_lens, cu, out=out, workspace=ws,
                           backend="triton")

    want = tf.paged_attention(q, k, v, tables, kv_lens, cu, backend="triton")  # shipped loop
    shipped = attn.FULL_TILES
    try:
        for rnd in range(2):  # A, B, A, B: a drift shows as a change between rounds
            for full in (shipped, not shipped):
                if time.time() > deadline:
                    print("deadline reached", flush=True)
                    return
                attn.FULL_TILES = full
                results = []
                for dtype, num_seqs, context in ((torch.bfloat16, 64, 4096),
                                                 (torch.bfloat16, 8, 4096),
                                                 (torch.bfloat16, 1, 32768),
                                                 (torch.float32, 64, 4096)):
                    _measure(results, f"{str(dtype)[6:]} {num_seqs}x{context}",
                             lambda n=num_seqs, c=context, d=dtype: _triton_seconds(d, n, c),
                             2 * num_seqs * context * KV_HEADS * HEAD_DIM * dtype.itemsize,
                             read)
                t = cuda_seconds(prefill)
                err = (out.float() - want.float()).abs().max().item()
                results.append(f"prefill {t * 1e6:.0f} us {flops / t / 1e12:.0f} TFLOP/s "
                               f"{flops / t / 1e12 / peak:.3f} err {err:.1e}")
                _line(f"round {rnd} FULL_TILES={full}", results)
    finally:
        attn.FULL_TILES = shipped


def _set_pallas_params(nwarps: int, stages: int) -> None:
    """The Pallas GPU kernels compile with ``nwarps`` warps and ``stages`` pipeline stages
    from the next trace on (jit caches cleared)."""
    import jax
    from jax.experimental.pallas import triton as pltriton
    from prefixkv.kernels.pallas import paged_attention_gpu as pg

    pg._triton_params = lambda: pltriton.CompilerParams(num_warps=nwarps, num_stages=stages)
    jax.clear_caches()


def sweep_pallas(deadline: float) -> None:
    import jax
    from prefixkv.kernels.pallas import paged_attention_gpu as pg

    from bench import bench_jax_attention as bja

    read = bja._device_read_gbps()
    print(f"measured read bandwidth {read:.0f} GB/s", flush=True)
    shapes = [(32, 8192), (4, 16384)]
    params = pg._triton_params
    plan = [(8, False, 4, 2), (8, True, 4, 2), (4, True, 4, 2), (8, True, 8, 2), (8, True, 4, 3),
            (4, False, 4, 2), (16, True, 4, 2), (8, True, 4, 4), (2, True, 4, 2)]
    try:
        for per_step, gather, nwarps, stages in plan:
            if time.time() > deadline:
                print("deadline reached", flush=True)
                return
            _set_pallas_params(nwarps, stages)
            results = []
            for num_seqs, context in shapes:
                args = bja._device_decode_inputs(num_seqs, context)
                fn = jax.jit(lambda q, k, v, t, n, b=per_step, g=gather: pg.paged_attention_gpu(
                    q, k, v, t, n, None, scale=HEAD_DIM ** -0.5, blocks_per_step=b,
                    kv_gather=g)[0])
                _measure(results, f"{num_seqs}x{context}",
                         lambda f=fn, a=args: bja.best_call_seconds(f, a, rounds=5),
                         2 * num_seqs * context * KV_HEADS * HEAD_DIM * 2, read)
            _line(f"blocks={per_step} {'gathered' if gather else 'by block'} warps={nwarps} "
                  f"stages={stages}", results)
    finally:
        pg._triton_params = params
        jax.clear_caches()


def sweep_pallas_prefill(deadline: float) -> None:
    """Pallas GPU prefill tiles: the device benchmark's 8 sequences of 512 new tokens over 4096
    cached (bf16), over query tokens per program (x the group's 4 q heads: rows; the
    register cap lifted) x blocks per step x warps x stages; TFLOP/s of the causal
    attention, the fraction of the measured bf16 matmul rate and the largest difference from
    the default's output."""
    import jax
    import jax.numpy as jnp
    from prefixkv.kernels.pallas import paged_attention_gpu as pg

    from bench import bench_jax_attention as bja

    peak = bja._device_matmul_tflops()
    total = bja.PF_CACHED + bja.PF_NEW
    flops = bja.DPF_SEQS * 4 * bja.HQ * HEAD_DIM * float(
        sum(range(total - bja.PF_NEW + 1, total + 1)))
    print(f"measured bf16 matmul {peak:.0f} TFLOP/s", flush=True)
    args = bja._device_prefill_inputs()

    def call(q_tile=None, per_step=None):
        return jax.jit(lambda *a: pg.paged_attention_gpu(
            *a, scale=HEAD_DIM ** -0.5, q_tile=q_tile, blocks_per_step=per_step)[0])

    want = call()(*args)
    params, q_cap = pg._triton_params, pg.gpu_q_tile
    plan = [(None, None, 4, 2), (16, 4, 4, 2), (16, 4, 8, 2), (16, 8, 8, 2), (16, 2, 4, 3),
            (16, 4, 4, 3), (32, 2, 8, 2), (32, 4, 8, 2), (8, 4, 4, 2), (8, 8, 4, 2),
            (32, 8, 8, 2)]
    try:
        pg.gpu_q_tile = lambda *a, **kw: 64
        for q_tile, per_step, nwarps, stages in plan:
            if time.time() > deadline:
                print("deadline reached", flush=True)
                return
            _set_pallas_params(nwarps, stages)
            try:
                fn = call(q_tile or 16, per_step)
                t = bja.best_call_seconds(fn, args, rounds=5)
                err = float(jnp.max(jnp.abs(fn(*args).astype(jnp.float32)
                                            - want.astype(jnp.float32))))
                result = (f"{t * 1e6:.0f} us {flops / t / 1e12:.0f} TFLOP/s "
                          f"{flops / t / 1e12 / peak:.3f} err {err:.1e}")
            except Exception as e:  # noqa: BLE001 - any failure of a swept configuration
                result = type(e).__name__
            _line(f"pallas prefill q_tile={q_tile or 'default'} blocks={per_step or 'default'} "
                  f"warps={nwarps} stages={stages}", [result])
    finally:
        pg._triton_params, pg.gpu_q_tile = params, q_cap
        jax.clear_caches()


def sweep_splits(deadline: float) -> None:
    import jax
    import torch
    from prefixkv.kernels.pallas import paged_attention_gpu as pg
    from prefixkv.kernels.triton import attention as attn

    from bench import bench_jax_attention as bja
    from bench.conftest import cuda_memory_limits

    read = cuda_memory_limits()["read_gbps"]
    print(f"measured read bandwidth {read:.0f} GB/s", flush=True)
    splits_of = attn._splits
    try:
        for num_seqs, context in [(8, 4096), (1, 32768), (4, 16384)]:
            for splits in (None, 4, 6, 8, 12, 16, 32):
                if time.time() > deadline:
                    print("deadline reached", flush=True)
                    return
                attn._splits = (lambda *a, n=splits: n) if splits else splits_of
                nbytes = 2 * num_seqs * context * KV_HEADS * HEAD_DIM * 2
                results = []
                try:
                    t = _triton_seconds(torch.bfloat16, num_seqs, context, workspace=False)
                    results.append(f"triton {t * 1e6:.0f} us {nbytes / t / 1e9 / read:.3f}")
                except Exception as e:  # a configuration that does not compile or fit
                    results.append(f"triton {type(e).__name__}")
                args = bja._device_decode_inputs(num_seqs, context)
                fn = jax.jit(lambda q, k, v, t, n, ns=splits: pg.paged_attention_gpu(
                    q, k, v, t, n, None, scale=HEAD_DIM ** -0.5, num_splits=ns)[0])
                best = bja.best_call_seconds(fn, args, rounds=5)
                results.append(f"pallas {best * 1e6:.0f} us {nbytes / best / 1e9 / read:.3f}")
                _line(f"{num_seqs}x{context} splits={splits or 'default'}", results)
    finally:
        attn._splits = splits_of


def sweep_cascade(deadline: float) -> None:
    """The GPU cascade benchmark's batch (64 decode queries over one 32768-token prefix, 256
    own tokens each, bf16): Triton with the prefix launch's split count forced (default from
    prefixkv.paged.planner.kv_splits) against paged attention over the same batch; then
    the JAX frontend's cascade and paged attention (Pallas)."""
    import jax
    import torch
    from prefixkv.kernels.triton import attention as attn

    from bench import bench_jax_attention as bja
    from bench.bench_torch_attention import _gpu_shared_prefix_batch
    from bench.conftest import cuda_seconds
    from prefixkv import jax_frontend as jf
    from prefixkv import torch_frontend as tf

    sp_args, pa_args = _gpu_shared_prefix_batch(torch.bfloat16)
    q = sp_args[0]
    out, lse = torch.empty_like(q), torch.empty(q.shape[:2], device="cuda")
    t = cuda_seconds(lambda: tf.paged_attention(*pa_args, out=out, lse=lse), iters=10)
    _line("triton paged_attention", [f"{t * 1e6:.0f} us"])
    splits_of = attn._prefix_splits
    print(f"default prefix splits {splits_of(q, sp_args[1], sp_args[3])}", flush=True)
    try:
        for splits in (None, 1, 4, 12, 24, 32, 64):
            if time.time() > deadline:
                print("deadline reached", flush=True)
                return
            attn._prefix_splits = (lambda *a, n=splits: n) if splits else splits_of
            t = cuda_seconds(lambda: tf.shared_prefix_attention(*sp_args, out=out, lse=lse),
                             iters=10)
            _line(f"triton cascade prefix splits={splits or 'default'}", [f"{t * 1e6:.0f} us"])
    finally:
        attn._prefix_splits = splits_of
    sp, pa = jax.block_until_ready(bja._make_device_shared_inputs())
    for name, fn, args in (("jax cascade", jf.shared_prefix_attention, sp),
                           ("jax paged_attention", jf.paged_attention, pa)):
        best = bja.best_call_seconds(jax.jit(lambda *a, f=fn: f(*a)), args, rounds=5)
        _line(name, [f"{best * 1e6:.0f} us"])


def _kernel_table(title: str, call, sync) -> None:
    """Print the CUDA kernels of 10 calls of ``call`` (then ``sync``) with their GPU times,
    recorded by torch.profiler (CUPTI sees every kernel of the process, JAX's too)."""
    from torch.profiler import ProfilerActivity, profile

    sync(call())
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            r = call()
        sync(r)
    print(f"--- {title}: 10 calls", flush=True)
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=14,
                                    max_name_column_width=60), flush=True)


def profile_jax(deadline: float) -> None:
    """The CUDA kernels of a JAX decode call (Pallas, 8 x 4096 and 32 x 8192 tokens, bf16)
    and their GPU times: where the time beside the attention kernel goes."""
    import jax

    from bench import bench_jax_attention as bja
    from prefixkv import jax_frontend as jf

    for num_seqs, context in [(8, 4096), (32, 8192)]:
        if time.time() > deadline:
            print("deadline reached", flush=True)
            return
        args = bja._device_decode_inputs(num_seqs, context)
        fn = jax.jit(lambda q, k, v, t, n: jf.paged_attention(q, k, v, t, n))
        _kernel_table(f"jax decode {num_seqs}x{context}", functools.partial(fn, *args),
                      jax.block_until_ready)


def profile_torch(deadline: float) -> None:
    """The CUDA kernels of a torch Triton decode call (bf16; 8 x 4096 and 1 x 32768 split the
    KV, 64 x 4096 does not) and their GPU times, beside the call's time by CUDA events: the
    split launches read at ~70% against 99% unsplit, ~12 us more a call than their bytes need;
    this says whether that is the split kernel, the merge kernel or the gap between them."""
    import torch

    from bench.bench_torch_attention import decode_batch
    from bench.conftest import cuda_memory_limits, cuda_seconds
    from prefixkv import torch_frontend as tf

    read = cuda_memory_limits()["read_gbps"]
    for num_seqs, context in [(8, 4096), (1, 32768), (64, 4096)]:
        if time.time() > deadline:
            print("deadline reached", flush=True)
            return
        q, k, v, tables, kv_lens = decode_batch("cuda", torch.bfloat16, num_seqs, context)
        out, lse = torch.empty_like(q), torch.empty(q.shape[:2], device="cuda")
        ws = torch.empty(tf.attention_workspace_size(q, k, tables, backend="triton"),
                         dtype=torch.uint8, device="cuda")
        call = functools.partial(tf.paged_attention, q, k, v, tables, kv_lens, out=out, lse=lse,
                                 workspace=ws, backend="triton")
        t = cuda_seconds(call, iters=20)
        nbytes = 2 * num_seqs * context * KV_HEADS * HEAD_DIM * 2
        print(f"torch decode {num_seqs}x{context}: {t * 1e6:.1f} us a call by events, "
              f"{nbytes / t / 1e9 / read:.3f} of the read bandwidth "
              f"(bytes alone: {nbytes / read / 1e3:.1f} us)", flush=True)
        _kernel_table(f"torch decode {num_seqs}x{context}", call,
                      lambda _: torch.cuda.synchronize())


def main(argv: list[str]) -> int:
    modes = {"triton": sweep_triton, "pallas": sweep_pallas, "splits": sweep_splits,
             "f32": sweep_f32, "cascade": sweep_cascade, "jaxprof": profile_jax,
             "torchprof": profile_torch, "prefill": sweep_prefill,
             "splitdecode": functools.partial(sweep_triton, split_only=True),
             "pallasprefill": sweep_pallas_prefill, "fulltiles": sweep_full_tiles}
    if not argv or argv[0] not in modes:
        print(__doc__)
        return 2
    if argv[0] in ("triton", "splits", "f32", "cascade", "jaxprof", "torchprof", "prefill",
                   "splitdecode", "fulltiles"):
        import torch

        if not torch.cuda.is_available():
            print("needs a CUDA GPU")
            return 1
    if argv[0] in ("pallas", "splits", "cascade", "jaxprof", "pallasprefill"):
        import jax

        if jax.default_backend() != "gpu":
            print("needs a GPU for JAX")
            return 1
    deadline = time.time() + float(argv[1] if len(argv) > 1 else 80)
    modes[argv[0]](deadline)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
