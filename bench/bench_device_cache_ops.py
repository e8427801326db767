"""Cache writes and block moves on the GPU, both frontends, next to what a user writes without
prefixkv, against the device's measured copy bandwidth (read + written bytes of a large
device-to-device copy in the same run). Skipped without a GPU; run by bench/run_device.sh.

Shapes per layer as the other benchmarks (block_size 16, 8 kv heads, head_dim 128, bf16: 32 KiB
a block): write_kv of a 32768-token prefill batch into a 65536-block cache; copy_blocks,
gather_blocks and scatter_blocks of 4096 blocks over 2 layers' K and V (4 caches of 16384
blocks: 512 MiB of blocks moved, read and written).

- torch (``test_gpu_cache_torch_*``): the Triton kernels (default on CUDA) against
  ``index_copy_`` / ``index_select`` per cache; kernel time by CUDA events.
- JAX (``test_device_cache_jax_*``, on the default device when it is a GPU or TPU): the XLA
  path with the caches donated (in place) against ``.at[].set`` / ``jnp.take`` + ``stack``;
  time per call of queued calls. The issue asks for XLA copies "where as fast": these say.

Each op's result is checked exactly after one call, before timing (every later call writes
the same): the written blocks, and a sample of the others (sources included) bit-identical to
a copy taken before the call (bench.conftest.untouched_blocks). extra_info, in
bench.conftest.record's convention: ``bytes_read``, ``bytes_written``, ``bytes`` (their sum),
``gbps`` = bytes / time and ``copy_fraction`` (of the measured copy, also read + written
bytes); ``baseline: true`` on the group's baseline.

    python -m pytest bench/bench_device_cache_ops.py --benchmark-only
"""

from __future__ import annotations

import time

import pytest

from bench.conftest import (
    cuda_benchmark,
    cuda_memory_limits,
    torch_write_kv_fn,
    untouched_blocks,
)

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None
try:
    import jax
    import jax.numpy as jnp
except ImportError:  # pragma: no cover
    jax = None

BS, HKV, D = 16, 8, 128
BLOCK_BYTES = BS * HKV * D * 2               # bf16
WRITE_TOKENS, WRITE_BLOCKS = 32768, 65536
MOVE, MOVE_BLOCKS, CACHES = 4096, 16384, 4   # 2 layers' K and V
WRITE_BYTES = 2 * 2 * WRITE_TOKENS * HKV * D * 2   # key/value read + their rows written
MOVE_BYTES = 2 * MOVE * CACHES * BLOCK_BYTES       # every moved block read and written
CALLS = 10

cuda = pytest.mark.skipif(torch is None or not torch.cuda.is_available(),
                          reason="needs a CUDA GPU")


def _need_accelerator() -> None:
    """Skip unless JAX's default device is a GPU or TPU: asked when a JAX test runs, not at
    collection (that would start JAX's GPU client, which takes 75% of the GPU's memory, in the
    torch benchmarks' process too)."""
    if jax is None or jax.default_backend() == "cpu":
        pytest.skip("needs a GPU or TPU for JAX")


def _ids(n: int, num_blocks: int, seed: int):
    """n distinct block ids in [0, num_blocks), and n more disjoint from them (numpy int32)."""
    import numpy as np

    perm = np.random.default_rng(seed).permutation(num_blocks).astype(np.int32)
    return perm[:n], perm[n:2 * n]


def _slots(seed: int = 0):
    """WRITE_TOKENS distinct slots: whole blocks in random order."""
    import numpy as np

    blocks, _ = _ids(WRITE_TOKENS // BS, WRITE_BLOCKS, seed)
    return (blocks[:, None] * BS + np.arange(BS, dtype=np.int32)).reshape(-1)


def _bits(x):
    """A bf16 array's raw bits on the host (a torch tensor or a JAX array)."""
    import numpy as np

    if torch is not None and isinstance(x, torch.Tensor):
        return x.cpu().view(torch.int16).numpy()
    return np.asarray(x).view(np.uint16)


def _assert_untouched(caches, other, before) -> None:
    """Blocks ``other`` of every cache still hold ``before`` (their bits before the call)."""
    import numpy as np

    for i, (c, b) in enumerate(zip(caches, before, strict=True)):
        assert np.array_equal(_bits(c[other]), b), f"cache {i}: a block not written changed"


def _finish(benchmark, seconds: float, bytes_read: int, bytes_written: int, copy_gbps: float,
            impl: str, **extra) -> None:
    """The figures of one op: bytes it reads and writes (their sum is ``bytes``), GB/s and the
    fraction of the measured copy."""
    nbytes = bytes_read + bytes_written
    gbps = nbytes / seconds / 1e9
    if "baseline" in impl:
        benchmark.extra_info["baseline"] = True
    benchmark.extra_info.update(extra, impl=impl, seconds_per_call=seconds,
                                bytes_read=bytes_read, bytes_written=bytes_written,
                                bytes=nbytes, gbps=round(gbps, 1),
                                measured_copy_gbps=round(copy_gbps, 1),
                                copy_fraction=round(gbps / copy_gbps, 3))


# ------------------------------------------------------------------------------- torch


def _torch_caches(n: int, num_blocks: int):
    g = torch.Generator(device="cuda").manual_seed(3)
    return [torch.randn(num_blocks, BS, HKV, D, generator=g, device="cuda")
            .to(torch.bfloat16) for _ in range(n)]


@cuda
@pytest.mark.parametrize("impl", ["triton", "index_copy_baseline"])
def test_gpu_cache_torch_write_kv(benchmark, impl):
    benchmark.group = f"gpu write_kv {WRITE_TOKENS} tokens into {WRITE_BLOCKS} blocks bf16"
    k, v = _torch_caches(2, WRITE_BLOCKS)
    g = torch.Generator(device="cuda").manual_seed(4)
    key, value = (torch.randn(WRITE_TOKENS, HKV, D, generator=g, device="cuda")
                  .to(torch.bfloat16) for _ in range(2))
    slots = torch.from_numpy(_slots()).cuda()
    other = torch.from_numpy(untouched_blocks(WRITE_BLOCKS, _slots() // BS)).cuda()
    before = [_bits(c[other]) for c in (k, v)]
    fn = torch_write_kv_fn(impl == "triton", key, value, k, v, slots, backend="triton")
    _assert_untouched((k, v), other, before)
    t = cuda_benchmark(benchmark, fn, iters=CALLS)
    _finish(benchmark, t, WRITE_BYTES // 2, WRITE_BYTES // 2, cuda_memory_limits()["copy_gbps"],
            impl=impl)


@cuda
@pytest.mark.parametrize("op", ["copy_blocks", "gather_blocks", "scatter_blocks"])
@pytest.mark.parametrize("impl", ["triton", "triton_out", "index_baseline"])
def test_gpu_cache_torch_moves(benchmark, impl, op):
    """copy_blocks: src -> dst in every cache; gather_blocks: into a new [n, caches, block]
    buffer (triton_out: into the caller's, out=); scatter_blocks: that buffer back to other
    blocks. Baselines: index_select / index_copy_ per cache (torch.stack for the gather)."""
    if impl == "triton_out" and op != "gather_blocks":
        pytest.skip("out= is gather_blocks'")
    from prefixkv import torch_frontend as tf

    benchmark.group = f"gpu {op} {MOVE} blocks x {CACHES} caches bf16"
    caches = _torch_caches(CACHES, MOVE_BLOCKS)
    src_np, dst_np = _ids(MOVE, MOVE_BLOCKS, 5)
    src, dst = torch.from_numpy(src_np).cuda(), torch.from_numpy(dst_np).cuda()
    src64, dst64 = src.long(), dst.long()
    buffer = torch.stack([c[src64] for c in caches], dim=1)
    other = torch.from_numpy(untouched_blocks(
        MOVE_BLOCKS, dst_np if op != "gather_blocks" else [], keep=src_np)).cuda()
    before = [_bits(c[other]) for c in caches]
    if op == "copy_blocks":
        want = [c[src64].clone() for c in caches]
        fn = ((lambda: tf.copy_blocks(caches, src, dst, backend="triton")) if impl == "triton"
              else (lambda: [c.index_copy_(0, dst64, c.index_select(0, src64))
                             for c in caches]))
    elif op == "gather_blocks":
        want = None
        out = torch.empty_like(buffer)
        fn = {"triton": lambda: tf.gather_blocks(caches, src, backend="triton"),
              "triton_out": lambda: tf.gather_blocks(caches, src, out=out, backend="triton"),
              }.get(impl, lambda: torch.stack([c.index_select(0, src64) for c in caches],
                                              dim=1))
        assert torch.equal(fn(), buffer)
    else:
        want = [buffer[:, i] for i in range(CACHES)]
        fn = ((lambda: tf.scatter_blocks(caches, buffer, dst, backend="triton"))
              if impl == "triton"
              else (lambda: [c.index_copy_(0, dst64, buffer[:, i])
                             for i, c in enumerate(caches)]))
    if want is not None:
        fn()
        for c, w in zip(caches, want, strict=True):
            assert torch.equal(c[dst64], w)
    _assert_untouched(caches, other, before)  # the gather too: it must not write the caches
    t = cuda_benchmark(benchmark, fn, iters=CALLS)
    _finish(benchmark, t, MOVE_BYTES // 2, MOVE_BYTES // 2, cuda_memory_limits()["copy_gbps"],
            impl=impl, op=op)


MERGE_TOKENS, MERGE_HEADS = 65536, 32  # two bf16 partial states of 512 MiB each


@cuda
@pytest.mark.parametrize("impl", ["triton_out", "triton", "formula_baseline"])
def test_gpu_merge_attention_states(benchmark, impl):
    """merge_attention_states of two bf16 states [65536, 32, 128] (f32 lse): the Triton kernel
    reading each input where it is, into the caller's out=/lse= and into new buffers, against
    the formula a user writes in torch. Bytes: both states read, out written (lse included)."""
    from prefixkv import torch_frontend as tf

    benchmark.group = f"gpu merge_attention_states [{MERGE_TOKENS}, {MERGE_HEADS}, {D}] bf16"
    g = torch.Generator(device="cuda").manual_seed(6)
    oa, ob = (torch.randn(MERGE_TOKENS, MERGE_HEADS, D, generator=g, device="cuda")
              .to(torch.bfloat16) for _ in range(2))
    la, lb = (torch.randn(MERGE_TOKENS, MERGE_HEADS, generator=g, device="cuda")
              for _ in range(2))
    out, lse = torch.empty_like(oa), torch.empty_like(la)

    def formula():
        m = torch.maximum(la, lb)
        wa, wb = torch.exp(la - m), torch.exp(lb - m)
        s = wa + wb
        o = (oa.float() * (wa / s)[..., None] + ob.float() * (wb / s)[..., None])
        return o.to(oa.dtype), m + torch.log(s)

    fn = {"triton_out": lambda: tf.merge_attention_states(oa, la, ob, lb, out=out, lse=lse,
                                                          backend="triton"),
          "triton": lambda: tf.merge_attention_states(oa, la, ob, lb, backend="triton"),
          "formula_baseline": formula}[impl]
    got_o, got_l = fn()
    want_o, want_l = formula()
    assert torch.allclose(got_o.float(), want_o.float(), atol=2e-2, rtol=2e-2)
    assert torch.allclose(got_l, want_l, atol=1e-5, rtol=1e-5)
    t = cuda_benchmark(benchmark, fn, iters=CALLS)
    state = MERGE_TOKENS * MERGE_HEADS * (D * 2 + 4)  # one bf16 state and its f32 lse
    _finish(benchmark, t, 2 * state, state, cuda_memory_limits()["copy_gbps"], impl=impl)


# --------------------------------------------------------------------------------- JAX

_JAX_COPY: list[float] = []


def _jax_copy_gbps(nbytes: int = 1 << 30) -> float:
    """Read + written GB/s of negating a bf16 array of ``nbytes`` (far above any on-chip
    cache): the device's copy bandwidth as XLA reaches it, once per run."""
    if not _JAX_COPY:
        from bench.bench_jax_attention import best_call_seconds

        x = jnp.ones(nbytes // 2, jnp.bfloat16)
        _JAX_COPY.append(2 * nbytes / best_call_seconds(jax.jit(jnp.negative), (x,)) / 1e9)
        del x
    return _JAX_COPY[0]


def _jax_caches(n: int, num_blocks: int):
    keys = jax.random.split(jax.random.key(3), n)
    return [jax.random.normal(k, (num_blocks, BS, HKV, D), jnp.bfloat16) for k in keys]


def _jax_time(benchmark, fn, state, *rest, check):
    """Seconds per call of ``state = fn(state, *rest)`` (the caches in ``state`` donated, or
    not), CALLS queued calls a round, best of 3 rounds, blocking on the last state, after one
    call that compiles and whose state goes to ``check``; returns (seconds, final state).
    Arrays go in as arguments: a jitted closure would bake them into the executable as
    constants."""
    state = fn(state, *rest)  # compile
    jax.block_until_ready(state)
    check(state)
    best = float("inf")

    def run():
        nonlocal state, best
        t0 = time.perf_counter()
        for _ in range(CALLS):
            state = fn(state, *rest)
        jax.block_until_ready(state)
        best = min(best, (time.perf_counter() - t0) / CALLS)

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    return best, state


@pytest.mark.parametrize("impl", ["prefixkv_xla", "jnp_at_set_baseline"])
def test_device_cache_jax_write_kv(benchmark, impl):
    _need_accelerator()
    from prefixkv import jax_frontend as jf

    benchmark.group = f"jax device write_kv {WRITE_TOKENS} tokens into {WRITE_BLOCKS} blocks bf16"
    k, v = _jax_caches(2, WRITE_BLOCKS)
    key, value = (x.reshape(-1, HKV, D) for x in _jax_caches(2, WRITE_TOKENS // BS))
    slots = jnp.asarray(_slots())
    other = untouched_blocks(WRITE_BLOCKS, _slots() // BS)
    before = [_bits(c[other]) for c in (k, v)]  # before the caches are donated
    if impl == "prefixkv_xla":
        fn = jax.jit(lambda kv, key, value, s: list(jf.write_kv(key, value, kv[0], kv[1], s)),
                     donate_argnums=0)
    else:
        fn = jax.jit(lambda kv, key, value, s: [
            c.reshape(-1, HKV, D).at[s].set(x).reshape(c.shape)
            for c, x in zip(kv, (key, value), strict=True)], donate_argnums=0)

    def check(kv):
        for c, x in zip(kv, (key, value), strict=True):
            assert bool(jnp.array_equal(c.reshape(-1, HKV, D)[slots], x))
        _assert_untouched(kv, other, before)

    t, _ = _jax_time(benchmark, fn, [k, v], key, value, slots, check=check)
    _finish(benchmark, t, WRITE_BYTES // 2, WRITE_BYTES // 2, _jax_copy_gbps(), impl=impl)


@pytest.mark.parametrize("op", ["copy_blocks", "gather_blocks", "scatter_blocks"])
@pytest.mark.parametrize("impl", ["prefixkv_xla", "jnp_baseline"])
def test_device_cache_jax_moves(benchmark, impl, op):
    """As the torch moves; the caches donated to the ops that update them. Baselines:
    ``c.at[dst].set(c[src])``, ``jnp.stack([c[ids] ...], 1)``, ``c.at[ids].set(buffer[:, i])``."""
    _need_accelerator()
    from prefixkv import jax_frontend as jf

    benchmark.group = f"jax device {op} {MOVE} blocks x {CACHES} caches bf16"
    caches = _jax_caches(CACHES, MOVE_BLOCKS)
    src_np, dst_np = _ids(MOVE, MOVE_BLOCKS, 5)
    src, dst = jnp.asarray(src_np), jnp.asarray(dst_np)
    buffer = jnp.stack([c[src] for c in caches], axis=1)
    other = untouched_blocks(MOVE_BLOCKS, dst_np, keep=src_np)
    before = [_bits(c[other]) for c in caches]  # before the caches are donated

    def check(cs):  # every cache's dst blocks now hold its src blocks (copy: buffer's rows)
        assert all(bool(jnp.array_equal(c[dst], buffer[:, i])) for i, c in enumerate(cs))
        _assert_untouched(cs, other, before)

    ours = impl == "prefixkv_xla"
    if op == "gather_blocks":  # state (caches, last buffer): the wait covers the gather
        gather = jax.jit((lambda cs, ids: jf.gather_blocks(cs, ids)) if ours
                         else (lambda cs, ids: jnp.stack([c[ids] for c in cs], axis=1)))

        def check_gather(st):
            assert bool(jnp.array_equal(st[1], buffer))

        t, _ = _jax_time(benchmark, lambda st, ids: (st[0], gather(st[0], ids)),
                         (caches, jnp.zeros_like(buffer)), src, check=check_gather)
    else:
        if op == "copy_blocks":
            fn = jax.jit((lambda cs, s, d: list(jf.copy_blocks(cs, s, d))) if ours
                         else (lambda cs, s, d: [c.at[d].set(c[s]) for c in cs]),
                         donate_argnums=0)
            t, _ = _jax_time(benchmark, fn, caches, src, dst, check=check)
        else:
            fn = jax.jit((lambda cs, b, d: list(jf.scatter_blocks(cs, b, d))) if ours
                         else (lambda cs, b, d: [c.at[d].set(b[:, i])
                                                 for i, c in enumerate(cs)]),
                         donate_argnums=0)
            t, _ = _jax_time(benchmark, fn, caches, buffer, dst, check=check)
    _finish(benchmark, t, MOVE_BYTES // 2, MOVE_BYTES // 2, _jax_copy_gbps(), impl=impl, op=op)
