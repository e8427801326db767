"""Cache ops and the LSE merge on this CPU, Llama-3-8B-like shapes per layer (block_size 16,
8 kv heads, head_dim 128), prefixkv next to the baseline a user would write, in one group.

JAX (backend "xla": on a CPU it runs the compiled in-place FFI kernels of
kernels/cpu/xla_cache_ops.cc inside the jitted call; caches donated where the op updates them,
timed to ``block_until_ready``): write_kv of a 512-token prefill chunk into a 4096-block cache
(bf16, f32), copy_blocks of 256 block pairs over 2 layers' K and V (2048-block caches, bf16),
gather_blocks / scatter_blocks of 256 blocks of those 4 caches, merge_attention_states of
[4096 tokens, 32 heads, 128]. Baselines: ``.at[slots].set`` on the flattened cache,
``.at[dst].set(c[src])``, ``jnp.take`` + ``stack``, the merge formula in jnp. The
"pallas_interpret" backend is a Python interpreter for tests, not a way to run on a CPU, and is
left out. Seen here: XLA CPU scatters into a bf16 cache by converting the whole cache to f32
and back (compiled HLO), so the ``.at[].set`` baselines' bf16 write_kv / copy_blocks /
scatter_blocks cost a full-cache round trip (~0.9 s for the 4096-block write); prefixkv's
in-place kernels do not (bf16 write_kv ~0.3-0.6 ms).

torch (backend "torch", in place): write_kv, copy_blocks, scatter_blocks (gather_blocks and
swap_blocks are in bench_torch_copy.py) and merge_attention_states, vs ``index_copy_`` /
``index_select`` per cache and the merge formula in torch.

Every op's result is checked before timing: writes and moves exactly (the written blocks, and
a sample of the others, sources included, bit-identical to a copy taken before the call:
bench.conftest.untouched_blocks), the merge's out and lse against the numpy reference
(prefixkv.paged.reference) with the test suite's attention tolerance.

extra_info (bench.conftest.record): ``bytes_read``, ``bytes_written``, ``bytes`` = their sum,
``gbps`` = bytes / time, ``copy_fraction`` = gbps / the measured one-thread copy bandwidth (also
read + written bytes), so 1.0 is memcpy speed; ``roofline_fraction`` is the same figure or,
where reading alone takes longer at the read bandwidth, that one; ``baseline: true`` on the
group's baseline.

    .venv/bin/pytest bench/bench_cache_ops.py --benchmark-only
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np
import pytest

from bench.conftest import record, seconds, torch_write_kv_fn, untouched_blocks

BS, HKV, D = 16, 8, 128          # block_size, kv heads, head_dim
NUM_BLOCKS = 4096                # write_kv: a per-layer cache of 64k tokens
MOVE_BLOCKS = 2048               # copy / gather / scatter: 4 caches of 32k tokens
WRITE_TOKENS = 512               # a prefill chunk
MOVE = 256                       # block pairs / blocks moved by copy, gather, scatter
COPY_LAYERS = 2                  # 2 layers' K and V: 4 caches
MERGE_TOKENS, MERGE_HEADS = 4096, 32
ROUNDS = 3                       # each callable also runs once untimed first (compile/warm)
TORCH_CACHE_ROUNDS = 20          # torch write/copy/scatter take ~1-15 ms: the first rounds after
#                                  the check swing by 50%, a median of 3 with them


def _item(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2}[dtype]


def _block_pool(num_blocks: int, seed: int, dtype: str) -> np.ndarray:
    """[num_blocks, BS, HKV, D] (ml_dtypes bfloat16 or f32): 257 random blocks repeated (cheap
    to build, and any two blocks within 257 ids of each other differ, so a wrong id shows)."""
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((257, BS, HKV, D), dtype=np.float32).astype(getattr(
        ml_dtypes, dtype) if dtype == "bfloat16" else dtype)
    return pool[np.arange(num_blocks) % 257]


def _write_slots(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    blocks = rng.permutation(NUM_BLOCKS)[:WRITE_TOKENS // BS]
    return (blocks[:, None] * BS + np.arange(BS)).reshape(-1).astype(np.int32)


def _move_ids(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """MOVE distinct sources and MOVE distinct destinations, disjoint."""
    perm = np.random.default_rng(seed).permutation(MOVE_BLOCKS).astype(np.int32)
    return perm[:MOVE], perm[MOVE:2 * MOVE]


def _finish(benchmark, limits, nbytes: tuple[int, int], impl: str, **extra):
    """record() with (bytes read, bytes written) and copy_fraction; the ``*_baseline`` impl is
    the group's baseline."""
    gbps = sum(nbytes) / seconds(benchmark) / 1e9
    record(benchmark, limits, bytes_read=nbytes[0], bytes_written=nbytes[1], impl=impl,
           baseline=impl.endswith("_baseline"),
           copy_fraction=round(gbps / limits["copy_gbps"], 3), **extra)


def _write_bytes(dtype):      # read key+value rows, write them into K and V
    n = 2 * WRITE_TOKENS * HKV * D * _item(dtype)
    return n, n


def _move_bytes(dtype):       # read and write MOVE blocks of each of the 4 caches
    n = MOVE * 2 * COPY_LAYERS * BS * HKV * D * _item(dtype)
    return n, n


def _merge_bytes(dtype):      # read 2 outs + 2 lse, write out + lse
    n = MERGE_TOKENS * MERGE_HEADS
    return 2 * n * D * _item(dtype) + 2 * n * 4, n * D * _item(dtype) + n * 4


def _bits(x) -> np.ndarray:
    """A host array's raw bits (exact comparison of bf16 and f32 alike)."""
    x = np.asarray(x)
    return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


def _assert_same(got, want) -> None:
    np.testing.assert_array_equal(_bits(got), _bits(want))


def _write_blocks() -> np.ndarray:
    """The blocks write_kv's _write_slots fall in."""
    return np.unique(_write_slots() // BS)


@functools.cache
def _merge_want(dtype):
    """The numpy reference's (out f32, lse) of _merge_inputs, once per dtype (JAX and torch)."""
    from prefixkv.paged.reference import merge_attention_states_reference

    out, lse = merge_attention_states_reference(*_merge_inputs(dtype, _numpy_input))
    return out.astype(np.float32), lse


def _numpy_input(x, dtype):
    return x.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)


def _check_merge(out, lse, dtype) -> None:
    """out, lse (float32 numpy) against the reference with the attention tolerances."""
    from prefixkv.paged.spec import ATTENTION_TOLERANCE

    want_out, want_lse = _merge_want(dtype)
    atol, rtol = ATTENTION_TOLERANCE[dtype]
    np.testing.assert_allclose(out, want_out, atol=atol, rtol=rtol)
    atol, rtol = ATTENTION_TOLERANCE["float32"]
    np.testing.assert_allclose(lse, want_lse, atol=atol, rtol=rtol)


# =========================================================================================== JAX

try:
    import jax
    import jax.numpy as jnp

    from prefixkv import jax_frontend as jf
except ImportError:  # pragma: no cover - the torch half still runs
    jax = None
needs_jax = pytest.mark.skipif(jax is None, reason="needs jax")


def _jax_caches(n: int, dtype: str, num_blocks: int = NUM_BLOCKS):
    return [jnp.asarray(_block_pool(num_blocks, 10 + i, dtype)) for i in range(n)]


def _bench_donating(benchmark, fn, state, *rest, check):
    """Time ``state = fn(*state, *rest)`` with the caches in ``state`` donated each call, after
    one call that compiles and whose result goes to ``check(state)`` (every later call writes
    the same)."""
    state = list(state)

    def step():
        state[:] = fn(state, *rest)
        jax.block_until_ready(state)

    step()  # compile
    check(state)
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=0)


@needs_jax
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("impl", ["prefixkv_xla", "jnp_at_set_baseline"])
def test_jax_write_kv(benchmark, machine_limits, impl, dtype):
    benchmark.group = f"jax write_kv {WRITE_TOKENS} tokens into {NUM_BLOCKS} blocks, {dtype}"
    k, v = _jax_caches(2, dtype)
    rng = np.random.default_rng(1)
    key, value = (jnp.asarray(rng.standard_normal((WRITE_TOKENS, HKV, D), dtype=np.float32))
                  .astype(dtype) for _ in range(2))
    slots = jnp.asarray(_write_slots())
    other = untouched_blocks(NUM_BLOCKS, _write_blocks())
    before = [np.asarray(c[other]) for c in (k, v)]  # before the caches are donated
    if impl == "prefixkv_xla":
        fn = jax.jit(lambda kv, key, value, s: jf.write_kv(key, value, kv[0], kv[1], s),
                     donate_argnums=0)
    else:
        def baseline(kv, key, value, s):
            return [c.reshape(-1, HKV, D).at[s].set(x).reshape(c.shape)
                    for c, x in zip(kv, (key, value), strict=True)]
        fn = jax.jit(baseline, donate_argnums=0)
    def check(kv):
        for c, x, b in zip(kv, (key, value), before, strict=True):
            _assert_same(c.reshape(-1, HKV, D)[slots], x)
            _assert_same(c[other], b)

    _bench_donating(benchmark, fn, (k, v), key, value, slots, check=check)
    _finish(benchmark, machine_limits, _write_bytes(dtype), impl=impl, dtype=dtype)


@needs_jax
@pytest.mark.parametrize("impl", ["prefixkv_hnd", "jnp_at_set_hnd_baseline"])
def test_jax_write_kv_hnd(benchmark, machine_limits, impl):
    """kv_layout="HND" caches ([num_blocks, heads, block_size, head_dim]), bfloat16: the CPU
    handler's per-head row copies against what a user writes, .at[blocks, :, offsets].set
    (XLA:CPU converts the whole bf16 cache to float32 and back)."""
    dtype = "bfloat16"
    benchmark.group = f"jax write_kv {WRITE_TOKENS} tokens into {NUM_BLOCKS} HND blocks, {dtype}"
    k, v = (c.transpose(0, 2, 1, 3) for c in _jax_caches(2, dtype))
    rng = np.random.default_rng(1)
    key, value = (jnp.asarray(rng.standard_normal((WRITE_TOKENS, HKV, D), dtype=np.float32))
                  .astype(dtype) for _ in range(2))
    slots = jnp.asarray(_write_slots())
    bs = k.shape[2]
    blk, off = slots // bs, slots % bs
    if impl == "prefixkv_hnd":
        fn = jax.jit(lambda kv, key, value, s: jf.write_kv(key, value, kv[0], kv[1], s,
                                                           kv_layout="HND"),
                     donate_argnums=0)
    else:
        def baseline(kv, key, value, s):
            return [c.at[s // bs, :, s % bs].set(x) for c, x in zip(kv, (key, value),
                                                                    strict=True)]
        fn = jax.jit(baseline, donate_argnums=0)

    def check(kv):
        for c, x in zip(kv, (key, value), strict=True):
            _assert_same(c[blk, :, off], x)

    _bench_donating(benchmark, fn, (k, v), key, value, slots, check=check)
    _finish(benchmark, machine_limits, _write_bytes(dtype), impl=impl, dtype=dtype)


@needs_jax
@pytest.mark.parametrize("impl", ["prefixkv_xla", "jnp_at_set_baseline"])
def test_jax_copy_blocks(benchmark, machine_limits, impl):
    benchmark.group = f"jax copy_blocks {MOVE} pairs x {COPY_LAYERS} layers K,V, bfloat16"
    caches = _jax_caches(2 * COPY_LAYERS, "bfloat16", MOVE_BLOCKS)
    src_np, dst_np = _move_ids(2)
    src, dst = jnp.asarray(src_np), jnp.asarray(dst_np)
    want = [np.asarray(c[src_np]) for c in caches]  # before the caches are donated
    other = untouched_blocks(MOVE_BLOCKS, dst_np, keep=src_np)
    before = [np.asarray(c[other]) for c in caches]
    if impl == "prefixkv_xla":
        fn = jax.jit(lambda cs, s, d: jf.copy_blocks(cs, s, d), donate_argnums=0)
    else:
        fn = jax.jit(lambda cs, s, d: [c.at[d].set(c[s]) for c in cs], donate_argnums=0)

    def check(cs):
        for c, w, b in zip(cs, want, before, strict=True):
            _assert_same(c[dst_np], w)
            _assert_same(c[other], b)

    _bench_donating(benchmark, fn, caches, src, dst, check=check)
    _finish(benchmark, machine_limits, _move_bytes("bfloat16"), impl=impl)


def _fresh_copy_gbps(nbytes: int) -> float:
    """Read + write GB/s of numpy copying nbytes into a newly allocated buffer (best of 5):
    what any op that returns a new buffer of that size can reach here (the kernel has to fault
    in and zero the new pages; copy_gbps copies into a buffer already mapped)."""
    import time

    src = np.ones(nbytes, dtype=np.uint8)
    best = float("inf")
    for _ in range(6):
        t0 = time.perf_counter()
        np.copyto(np.empty_like(src), src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


@needs_jax
@pytest.mark.parametrize("impl", ["prefixkv_xla", "jnp_take_stack_baseline"])
def test_jax_gather_blocks(benchmark, machine_limits, impl):
    """The gather returns a new 32 MiB buffer per call. extra_info adds ``minor_faults`` per
    call and ``fresh_copy_fraction`` = gbps / numpy's copy into a new buffer of that size."""
    import resource

    benchmark.group = f"jax gather_blocks {MOVE} blocks x {2 * COPY_LAYERS} caches, bfloat16"
    caches = _jax_caches(2 * COPY_LAYERS, "bfloat16", MOVE_BLOCKS)
    ids_np, _ = _move_ids(3)
    ids = jnp.asarray(ids_np)
    if impl == "prefixkv_xla":
        fn = jax.jit(jf.gather_blocks)
    else:
        fn = jax.jit(lambda cs, i: jnp.stack([jnp.take(c, i, axis=0) for c in cs], axis=1))
    buf = jax.block_until_ready(fn(caches, ids))
    _assert_same(buf, np.stack([np.asarray(c)[ids_np] for c in caches], axis=1))
    del buf
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(fn(caches, ids))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    # 10 rounds (~10 ms each): with 3, one round slowed by the other core's load moved the
    # mean by 40%
    benchmark.pedantic(lambda: jax.block_until_ready(fn(caches, ids)), rounds=10,
                       iterations=1, warmup_rounds=0)
    nbytes = _move_bytes("bfloat16")  # read MOVE blocks of 4 caches, write them: 2 x 32 MiB
    fresh = _fresh_copy_gbps(nbytes[1])
    gbps = sum(nbytes) / seconds(benchmark) / 1e9
    _finish(benchmark, machine_limits, nbytes, impl=impl, minor_faults=faults,
            fresh_copy_gbps=round(fresh, 3), fresh_copy_fraction=round(gbps / fresh, 3))


@needs_jax
@pytest.mark.parametrize("impl", ["prefixkv_xla", "jnp_at_set_baseline"])
def test_jax_scatter_blocks(benchmark, machine_limits, impl):
    benchmark.group = f"jax scatter_blocks {MOVE} blocks x {2 * COPY_LAYERS} caches, bfloat16"
    caches = _jax_caches(2 * COPY_LAYERS, "bfloat16", MOVE_BLOCKS)
    ids_np, _ = _move_ids(4)
    ids = jnp.asarray(ids_np)
    rng = np.random.default_rng(5)
    buffer = jnp.asarray(rng.standard_normal((MOVE, 2 * COPY_LAYERS, BS, HKV, D),
                                             dtype=np.float32)).astype(jnp.bfloat16)
    other = untouched_blocks(MOVE_BLOCKS, ids_np)
    before = [np.asarray(c[other]) for c in caches]  # before the caches are donated
    if impl == "prefixkv_xla":
        fn = jax.jit(lambda cs, b, i: jf.scatter_blocks(cs, b, i), donate_argnums=0)
    else:
        fn = jax.jit(lambda cs, b, i: [c.at[i].set(b[:, j]) for j, c in enumerate(cs)],
                     donate_argnums=0)
    def check(cs):
        for j, c in enumerate(cs):
            _assert_same(c[ids_np], buffer[:, j])
            _assert_same(c[other], before[j])

    _bench_donating(benchmark, fn, caches, buffer, ids, check=check)
    _finish(benchmark, machine_limits, _move_bytes("bfloat16"), impl=impl)


def _merge_inputs(dtype, xp_from_numpy):
    rng = np.random.default_rng(6)
    shape = (MERGE_TOKENS, MERGE_HEADS)
    out_a, out_b = (rng.standard_normal((*shape, D), dtype=np.float32) for _ in range(2))
    lse_a, lse_b = (rng.standard_normal(shape, dtype=np.float32) * 4 for _ in range(2))
    return xp_from_numpy(out_a, dtype), xp_from_numpy(lse_a, "float32"), \
        xp_from_numpy(out_b, dtype), xp_from_numpy(lse_b, "float32")


def _jnp_merge(out_a, lse_a, out_b, lse_b):
    """The formula as a user writes it (no empty-state guard)."""
    m = jnp.maximum(lse_a, lse_b)
    wa, wb = jnp.exp(lse_a - m), jnp.exp(lse_b - m)
    s = wa + wb
    out = (out_a.astype(jnp.float32) * (wa / s)[..., None]
           + out_b.astype(jnp.float32) * (wb / s)[..., None])
    return out.astype(out_a.dtype), m + jnp.log(s)


@needs_jax
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", ["prefixkv_xla", "jnp_formula_baseline"])
def test_jax_merge_attention_states(benchmark, machine_limits, impl, dtype):
    benchmark.group = f"jax merge_attention_states [{MERGE_TOKENS}, {MERGE_HEADS}, {D}] {dtype}"
    args = _merge_inputs(dtype, lambda x, dt: jnp.asarray(x).astype(dt))
    fn = jax.jit(jf.merge_attention_states if impl == "prefixkv_xla" else _jnp_merge)
    out, lse = jax.block_until_ready(fn(*args))
    _check_merge(np.asarray(out.astype(jnp.float32)), np.asarray(lse), dtype)
    del out, lse
    benchmark.pedantic(lambda: jax.block_until_ready(fn(*args)), rounds=ROUNDS, iterations=1,
                       warmup_rounds=0)
    _finish(benchmark, machine_limits, _merge_bytes(dtype), impl=impl, dtype=dtype)


# ========================================================================================= torch

try:
    import torch

    from prefixkv import torch_frontend as tf
    torch.set_num_threads(1)
except ImportError:  # pragma: no cover - the JAX half still runs
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch")


def _torch_caches(n: int, dtype: str, num_blocks: int = NUM_BLOCKS):
    out = []
    for i in range(n):
        pool = _block_pool(num_blocks, 10 + i, dtype)
        if dtype == "bfloat16":  # same bits, viewed as torch.bfloat16
            out.append(torch.from_numpy(pool.view(np.int16)).view(torch.bfloat16))
        else:
            out.append(torch.from_numpy(pool))
    return out


@needs_torch
@pytest.mark.parametrize("impl", ["prefixkv_torch", "index_copy_baseline"])
def test_torch_write_kv(benchmark, machine_limits, impl):
    dtype = "bfloat16"
    benchmark.group = f"torch write_kv {WRITE_TOKENS} tokens into {NUM_BLOCKS} blocks, {dtype}"
    k, v = _torch_caches(2, dtype)
    g = torch.Generator().manual_seed(1)
    key, value = (torch.randn(WRITE_TOKENS, HKV, D, generator=g).to(torch.bfloat16)
                  for _ in range(2))
    slots = torch.from_numpy(_write_slots())
    other = torch.from_numpy(untouched_blocks(NUM_BLOCKS, _write_blocks()))
    before = [c[other].clone() for c in (k, v)]
    fn = torch_write_kv_fn(impl == "prefixkv_torch", key, value, k, v, slots)
    assert all(torch.equal(c[other], b) for c, b in zip((k, v), before, strict=True))
    benchmark.pedantic(fn, rounds=TORCH_CACHE_ROUNDS, iterations=1, warmup_rounds=0)
    _finish(benchmark, machine_limits, _write_bytes(dtype), impl=impl, dtype=dtype)


@needs_torch
@pytest.mark.parametrize("impl", ["prefixkv_torch", "index_copy_baseline"])
def test_torch_write_kv_one_token(benchmark, machine_limits, impl):
    """A decode step's write (one token a layer): the per-call cost of the public op (static
    and value checks, aliasing check, backend choice, the in-place copy) against the bare
    index_copy_ a user writes (no checks)."""
    dtype = "bfloat16"
    benchmark.group = f"torch write_kv 1 token into {NUM_BLOCKS} blocks, {dtype}"
    k, v = _torch_caches(2, dtype)
    g = torch.Generator().manual_seed(2)
    key, value = (torch.randn(1, HKV, D, generator=g).to(torch.bfloat16) for _ in range(2))
    fn = torch_write_kv_fn(impl == "prefixkv_torch", key, value, k, v,
                           torch.tensor([NUM_BLOCKS * BS // 2 + 3]))
    benchmark.pedantic(fn, rounds=20, iterations=50, warmup_rounds=1)
    row = 2 * HKV * D * 2  # K and V of one token, bfloat16
    record(benchmark, machine_limits, bytes_read=row, bytes_written=row, impl=impl,
           dtype=dtype, baseline=impl == "index_copy_baseline")


@needs_torch
@pytest.mark.parametrize("impl", ["prefixkv_torch", "index_select_copy_baseline"])
def test_torch_copy_blocks(benchmark, machine_limits, impl):
    benchmark.group = f"torch copy_blocks {MOVE} pairs x {COPY_LAYERS} layers K,V, bfloat16"
    caches = _torch_caches(2 * COPY_LAYERS, "bfloat16", MOVE_BLOCKS)
    src_np, dst_np = _move_ids(2)
    src, dst = torch.from_numpy(src_np), torch.from_numpy(dst_np)
    src64, dst64 = src.long(), dst.long()
    want = [c[src64].clone() for c in caches]
    other = torch.from_numpy(untouched_blocks(MOVE_BLOCKS, dst_np, keep=src_np))
    before = [c[other].clone() for c in caches]
    if impl == "prefixkv_torch":
        def fn():
            tf.copy_blocks(caches, src, dst)
    else:
        def fn():
            for c in caches:
                c.index_copy_(0, dst64, c.index_select(0, src64))
    fn()
    assert all(torch.equal(c[dst64], w) for c, w in zip(caches, want, strict=True))
    assert all(torch.equal(c[other], b) for c, b in zip(caches, before, strict=True))
    benchmark.pedantic(fn, rounds=TORCH_CACHE_ROUNDS, iterations=1, warmup_rounds=0)
    _finish(benchmark, machine_limits, _move_bytes("bfloat16"), impl=impl)


@needs_torch
@pytest.mark.parametrize("impl", ["prefixkv_torch", "index_copy_baseline"])
def test_torch_scatter_blocks(benchmark, machine_limits, impl):
    benchmark.group = f"torch scatter_blocks {MOVE} blocks x {2 * COPY_LAYERS} caches, bfloat16"
    caches = _torch_caches(2 * COPY_LAYERS, "bfloat16", MOVE_BLOCKS)
    ids_np, _ = _move_ids(4)
    ids = torch.from_numpy(ids_np)
    ids64 = ids.long()
    g = torch.Generator().manual_seed(5)
    buffer = torch.randn(MOVE, 2 * COPY_LAYERS, BS, HKV, D, generator=g).to(torch.bfloat16)
    other = torch.from_numpy(untouched_blocks(MOVE_BLOCKS, ids_np))
    before = [c[other].clone() for c in caches]
    if impl == "prefixkv_torch":
        def fn():
            tf.scatter_blocks(caches, buffer, ids)
    else:
        def fn():
            for j, c in enumerate(caches):
                c.index_copy_(0, ids64, buffer[:, j])
    fn()
    assert all(torch.equal(c[ids64], buffer[:, j]) for j, c in enumerate(caches))
    assert all(torch.equal(c[other], b) for c, b in zip(caches, before, strict=True))
    benchmark.pedantic(fn, rounds=TORCH_CACHE_ROUNDS, iterations=1, warmup_rounds=0)
    _finish(benchmark, machine_limits, _move_bytes("bfloat16"), impl=impl)


def _torch_merge(out_a, lse_a, out_b, lse_b):
    """The formula as a user writes it (no empty-state guard)."""
    m = torch.maximum(lse_a, lse_b)
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
    s = wa + wb
    out = out_a.float() * (wa / s)[..., None] + out_b.float() * (wb / s)[..., None]
    return out.to(out_a.dtype), m + torch.log(s)


@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", ["prefixkv_torch", "torch_formula_baseline"])
def test_torch_merge_attention_states(benchmark, machine_limits, impl, dtype):
    benchmark.group = (f"torch merge_attention_states [{MERGE_TOKENS}, {MERGE_HEADS}, {D}] "
                       f"{dtype}")
    args = _merge_inputs(dtype, lambda x, dt: torch.from_numpy(x).to(getattr(torch, dt)))
    fn = tf.merge_attention_states if impl == "prefixkv_torch" else _torch_merge
    out, lse = fn(*args)
    _check_merge(out.float().numpy(), lse.numpy(), dtype)
    del out, lse
    benchmark.pedantic(lambda: fn(*args), rounds=ROUNDS, iterations=1, warmup_rounds=0)
    _finish(benchmark, machine_limits, _merge_bytes(dtype), impl=impl, dtype=dtype)
