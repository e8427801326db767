"""Pallas kernels on CPU: run in Pallas's TPU interpret mode (DMAs, semaphores, scalar
prefetch simulated; out-of-bounds reads raise, and a detected race fails the test through the
pallas_races fixture) against the numpy reference, bit-exact for copies and writes, and
lowered for the real hardware with jax.export."""

from __future__ import annotations

import types

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from prefixkv.jax_frontend import _backends  # noqa: E402
from prefixkv.paged import reference as ref  # noqa: E402
from prefixkv.paged import testing, validate  # noqa: E402

from prefixkv import jax_frontend as jf  # noqa: E402

pytest.importorskip("jax.experimental.pallas.tpu")
from prefixkv.kernels.pallas import cache_ops  # noqa: E402

BACKEND = "pallas_interpret"

pytestmark = pytest.mark.usefixtures("pallas_races")


def test_a_race_in_interpret_mode_is_recorded(monkeypatch):
    """The pallas_races fixture's recorder sees a real race: a kernel that reads a VMEM
    buffer while the DMA into it is still in flight (the interpreter only prints it)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu
    from pallas_races import record

    def kernel(x_hbm, o_ref, buf, sem):
        cp = pltpu.make_async_copy(x_hbm, buf, sem.at[0])
        cp.start()
        o_ref[...] = buf[...] * 2.0  # read before the wait: races with the DMA's write
        cp.wait()

    found = record(monkeypatch)  # shadows the fixture's recorder: the race is checked here
    call = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
        scratch_shapes=[pltpu.VMEM((8, 128), jnp.float32), pltpu.SemaphoreType.DMA((1,))],
        interpret=_backends.tpu_interpret_params())
    jax.block_until_ready(call(jnp.ones((8, 128), jnp.float32)))
    assert found, "the interpreter reported no race for a read racing a DMA"
    found.clear()


def _bits(x):
    x = np.asarray(x)
    return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


def _caches(rng, dtype, n=2, shape=(10, 4, 2, 8)):
    return [testing.random_values(rng, shape, dtype) for _ in range(n)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_write_kv_pallas(dtype):
    rng = np.random.default_rng(0)
    kc, vc = _caches(rng, dtype)
    key, value = (testing.random_values(rng, (6, 2, 8), dtype) for _ in range(2))
    slots = np.array([5, -1, 39, 0, 17], np.int32)  # row 5 is padding
    want = ref.write_kv_reference(key, value, kc, vc, slots)
    got = jf.write_kv(key, value, kc, vc, slots, backend=BACKEND)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(_bits(g), _bits(w))


def test_copy_blocks_pallas_chain_and_other_shapes():
    rng = np.random.default_rng(1)
    caches = _caches(rng, "float16") + [testing.random_values(rng, (10, 3, 5), "float16")]
    src, dst = np.array([1, 2, 7], np.int32), np.array([2, 9, 1], np.int32)
    want = ref.copy_blocks_reference(caches, src, dst)
    got = jf.copy_blocks(caches, src, dst, backend=BACKEND)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(_bits(g), _bits(w))


def test_gather_scatter_pallas():
    rng = np.random.default_rng(2)
    caches = _caches(rng, "float32", n=3)
    ids = np.array([3, 0, 9, 3], np.int32)
    buf = jf.gather_blocks(caches, ids, backend=BACKEND)
    np.testing.assert_array_equal(_bits(buf), _bits(ref.gather_blocks_reference(caches, ids)))
    dst = np.array([5, 6, 1, 8], np.int32)
    got = jf.scatter_blocks(caches, np.asarray(buf), dst, backend=BACKEND)
    for g, w in zip(got, ref.scatter_blocks_reference(caches, np.asarray(buf), dst), strict=True):
        np.testing.assert_array_equal(_bits(g), _bits(w))


def test_pallas_cache_kernels_skip_out_of_range_ids_under_jit(pallas_races):
    """Under jit nothing checks index values: a scatter id -1 or a write_kv slot past the
    cache is skipped, never clamped onto block 0 / the last slot."""
    cache = jnp.arange(4 * 2 * 1 * 4, dtype=jnp.float32).reshape(4, 2, 1, 4)
    buf = -jnp.ones((2, 1, 2, 1, 4), jnp.float32)
    (got,) = jax.jit(lambda c, b, i: jf.scatter_blocks([c], b, i, backend=BACKEND))(
        cache, buf, jnp.array([-1, 2], jnp.int32))
    want = np.array(cache)
    want[2] = -1
    np.testing.assert_array_equal(np.asarray(got), want)
    key = -jnp.ones((3, 1, 4), jnp.float32)
    k2, _ = jax.jit(lambda k, v, kc, vc, s: jf.write_kv(k, v, kc, vc, s, backend=BACKEND))(
        key, key, cache, cache, jnp.array([0, 100, -1], jnp.int32))
    want = np.array(cache).reshape(8, 1, 4)
    want[0] = -1
    np.testing.assert_array_equal(np.asarray(k2).reshape(8, 1, 4), want)


@pytest.mark.parametrize("per_step", [1, 2, 3])
def test_pallas_cache_kernels_several_items_per_grid_step(per_step):
    """Each grid step starts the DMAs of ``per_step`` rows or blocks, then waits: a last step
    with fewer items, padding and out-of-range destinations skipped, everything else
    bit-exact and untouched where not named."""
    rng = np.random.default_rng(9)
    params = _backends.tpu_interpret_params()
    kc, vc = _caches(rng, "bfloat16")
    key, value = (testing.random_values(rng, (6, 2, 8), "bfloat16") for _ in range(2))
    slots = np.array([5, -1, 39, 0, 17, 40], np.int32)  # 40: past the 40 slots, skipped
    want = ref.write_kv_reference(key, value, kc, vc, np.where(slots < 40, slots, -1))
    got = cache_ops.write_kv_tpu(jnp.asarray(key), jnp.asarray(value), jnp.asarray(kc),
                                 jnp.asarray(vc), jnp.asarray(slots), interpret=params,
                                 per_step=per_step)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(_bits(g), _bits(w))
    caches = _caches(rng, "float32", n=2)
    ids = np.array([3, 0, 9, 3, 7], np.int32)
    buf = cache_ops.gather_blocks_tpu([jnp.asarray(c) for c in caches], jnp.asarray(ids),
                                      interpret=params, per_step=per_step)
    np.testing.assert_array_equal(_bits(buf), _bits(ref.gather_blocks_reference(caches, ids)))
    dst = np.array([5, 6, 1, 8, 10], np.int32)  # 10: past the 10 blocks, skipped
    got = cache_ops.scatter_blocks_tpu([jnp.asarray(c) for c in caches], buf, jnp.asarray(dst),
                                       interpret=params, per_step=per_step)
    want = ref.scatter_blocks_reference(caches, np.asarray(buf)[:4], dst[:4])
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(_bits(g), _bits(w))


def _spec(x):
    return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)


def test_cache_kernels_lower_for_tpu():
    rng = np.random.default_rng(3)
    caches = _caches(rng, "bfloat16")
    ids = np.array([1, 2], np.int32)
    key = testing.random_values(rng, (3, 2, 8), "bfloat16")
    buf = np.zeros((2, 2, 4, 2, 8), caches[0].dtype)
    cases = [
        (cache_ops.gather_blocks_tpu, (caches, ids)),
        (cache_ops.scatter_blocks_tpu, (caches, buf, ids)),
        (cache_ops.copy_blocks_tpu, (caches, ids, ids[::-1].copy())),
        (cache_ops.write_kv_tpu, (key, key, caches[0], caches[1], ids)),
    ]
    for fn, args in cases:
        exp = jax.export.export(jax.jit(fn), platforms=["tpu"])(
            *jax.tree_util.tree_map(_spec, args))
        text = exp.mlir_module()
        assert "tpu_custom_call" in text, fn.__name__
    # the frontend picks the Pallas kernel when tracing for TPU, and aliases the caches
    exp = jax.export.export(jax.jit(jf.write_kv, donate_argnums=(2, 3)), platforms=["tpu"])(
        *jax.tree_util.tree_map(_spec, (key, key, caches[0], caches[1], ids)))
    assert "tpu_custom_call" in exp.mlir_module()


def _pallas_calls(jaxpr):
    """Every pallas_call equation of a (nested) jaxpr, in order."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield eqn
        for v in eqn.params.values():
            inner = getattr(v, "jaxpr", None)
            if inner is not None:
                yield from _pallas_calls(getattr(inner, "jaxpr", inner))


def _pallas_aliases(jaxpr):
    """input_output_aliases of every pallas_call in a (nested) jaxpr."""
    return [tuple(eqn.params["input_output_aliases"]) for eqn in _pallas_calls(jaxpr)]


def _pallas_grids(fn, *args):
    """The grid of every pallas_call ``fn`` traces to on ``args``."""
    return [eqn.params["grid_mapping"].grid
            for eqn in _pallas_calls(jax.make_jaxpr(fn)(*args).jaxpr)]


def test_pallas_cache_kernels_alias_the_caches():
    """input_output_aliases: each cache operand is its output (in place when donated)."""
    rng = np.random.default_rng(4)
    kc, vc = _caches(rng, "float32")
    key = testing.random_values(rng, (2, 2, 8), "float32")
    slots = np.array([3, 30], np.int32)
    jaxpr = jax.make_jaxpr(lambda *a: cache_ops.write_kv_tpu(*a))(key, key, kc, vc, slots)
    assert _pallas_aliases(jaxpr.jaxpr) == [((3, 0), (4, 1))]  # ids, key, value, k, v
    buf = np.zeros((2, 2, 4, 2, 8), np.float32)
    jaxpr = jax.make_jaxpr(lambda *a: cache_ops.scatter_blocks_tpu(*a))([kc, vc], buf, slots)
    assert _pallas_aliases(jaxpr.jaxpr) == [((2, 0), (3, 1))]  # ids, buffer, caches


# ------------------------------------------------------------------ ragged paged attention

from prefixkv.kernels.pallas import paged_attention as pa  # noqa: E402
from prefixkv.paged.spec import ATTENTION_TOLERANCE  # noqa: E402


def _close(got, want, dtype):
    atol, rtol = ATTENTION_TOLERANCE[dtype]
    got = np.asarray(jnp.asarray(got, jnp.float32))
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, np.asarray(want, np.float32), atol=atol, rtol=rtol)


# (grid, dtype, block_size, options): small shapes, TPU interpret mode costs seconds per call
ATTENTION_CASES = [
    ("mixed", "float32", 8, {}),
    ("decode", "bfloat16", 16, dict(sliding_window=5, logits_soft_cap=3.0)),
    ("prefill_with_prefix", "float32", 8, dict(causal=False)),
]


def _check_lse(lse, want_lse):
    fin = np.isfinite(want_lse)
    assert (np.isneginf(np.asarray(lse)) == ~fin).all()
    np.testing.assert_allclose(np.asarray(lse)[fin], want_lse[fin], atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("grid,dtype,block_size,kw", ATTENTION_CASES,
                         ids=[f"{g}-{d}-{'-'.join(k) or 'plain'}"
                              for g, d, _, k in ATTENTION_CASES])
def test_paged_attention_pallas_tpu_interpret(grid, dtype, block_size, kw):
    rng = np.random.default_rng(5)
    batch = testing.make_ragged_batch(rng, testing.seq_grid(grid, block_size), num_q_heads=4,
                                      num_kv_heads=2, head_dim=128, block_size=block_size,
                                      dtype=dtype, sliding_window=kw.get("sliding_window"))
    want, want_lse = ref.paged_attention_reference(*batch.args(), return_lse=True, **kw)
    out, lse = jf.paged_attention(*batch.args(), return_lse=True, backend=BACKEND, **kw)
    _close(out, want, dtype)
    _check_lse(lse, want_lse)


# (prefix blocks, (prefix id, q_len, own kv_len) per sequence, kv heads): decode, and prefill
# where the prefix call's 270 sorted tokens ask for 256-token tiles, capped at 128 (G = 4)
SHARED_PREFIX_CASES = [
    ([2], [(0, 1, 3), (-1, 1, 9), (0, 1, 8)], 2),
    ([2], [(0, 140, 150), (0, 130, 135)], 1),
]


@pytest.mark.parametrize("prefix_blocks,seqs,kv_heads", SHARED_PREFIX_CASES,
                         ids=["decode", "prefill-capped-tiles"])
def test_shared_prefix_attention_pallas_tpu_interpret(prefix_blocks, seqs, kv_heads):
    rng = np.random.default_rng(6)
    batch = testing.make_shared_prefix_batch(rng, prefix_blocks, seqs,
                                             num_q_heads=4 * kv_heads, num_kv_heads=kv_heads,
                                             head_dim=128, block_size=8)
    _close(jf.shared_prefix_attention(*batch.args(), backend=BACKEND),
           ref.shared_prefix_attention_reference(*batch.args()), "float32")


# (grid, kv heads, dtype, head_dim, blocks per chunk, options): the chunk loop and its double
# buffer (several chunks, a last chunk with blocks left out, a sliding window starting past
# block 0), the per-head strided reads of 1-8 heads, in place (float32, head_dim 128) or from
# the float32 copy in 128-lane pieces (bfloat16; head_dim 256)
CHUNK_CASES = [
    ("mixed", 1, "float32", 128, 1, {}),
    ("mixed", 2, "bfloat16", 128, 3, dict(sliding_window=11)),
    ("prefill_with_prefix", 4, "float32", 128, 2, dict(logits_soft_cap=4.0)),
    ("mixed", 2, "float32", 256, 2, {}),
    ("decode", 2, "bfloat16", 256, 1, dict(logits_soft_cap=4.0)),
    ("mixed", 8, "bfloat16", 128, 2, {}),  # the head count a real TPU takes (tpu_supports)
]


@pytest.mark.parametrize("grid,kv_heads,dtype,head_dim,pages,kw", CHUNK_CASES,
                         ids=[f"{g}-h{h}-{d}-d{hd}-p{p}" for g, h, d, hd, p, _ in CHUNK_CASES])
def test_tpu_kernel_chunks_and_heads(grid, kv_heads, dtype, head_dim, pages, kw):
    rng = np.random.default_rng(8)
    block_size = 16 if dtype == "bfloat16" else 8
    batch = testing.make_ragged_batch(rng, testing.seq_grid(grid, block_size),
                                      num_q_heads=2 * kv_heads, num_kv_heads=kv_heads,
                                      head_dim=head_dim, block_size=block_size, dtype=dtype,
                                      sliding_window=kw.get("sliding_window"))
    args = [None if a is None else jnp.asarray(a) for a in batch.args()]
    scale = 1.0 / np.sqrt(head_dim)
    want, want_lse = ref.paged_attention_reference(*batch.args(), scale=scale, return_lse=True,
                                                   **kw)
    out, lse = pa.paged_attention_tpu(*args, scale=scale, pages=pages,
                                      interpret=_backends.tpu_interpret_params(), **kw)
    _close(out, want, dtype)
    _check_lse(lse, want_lse)


def test_tpu_plan_fills_chunks_and_fits_vmem():
    """The default plan: CHUNK_BYTES of K per chunk (so 16-token bf16 blocks of 8 heads of 128
    give 8 blocks, not 1), and the VMEM it takes within the budget over the shapes the kernel
    accepts."""
    assert pa.tpu_plan(num_kv_heads=8, head_dim=128, block_size=16, itemsize=2, rows=16,
                       max_blocks=256) == pa.TpuPlan(pages=8)
    assert pa.tpu_plan(num_kv_heads=4, head_dim=256, block_size=16, itemsize=4, rows=8,
                       max_blocks=256) == pa.TpuPlan(pages=4)
    assert pa.tpu_plan(num_kv_heads=8, head_dim=128, block_size=16, itemsize=2, rows=16,
                       max_blocks=3).pages == 3
    worst = 0
    for head_dim in (128, 256):
        for dtype in ("bfloat16", "float32"):
            itemsize = 2 if dtype == "bfloat16" else 4
            for block_size in (16, 32, 64, 128, 256, 512):
                for kv_heads in (1, 2, 4, 8, 16, 32):
                    if not pa.tpu_supports(head_dim=head_dim, block_size=block_size,
                                           dtype=dtype, num_kv_heads=kv_heads)[0]:
                        continue
                    for group in (1, 4, 8, 16):
                        for tq in (1, 8, 128, 256):
                            tq = pa._q_tile(4096, 4, tq == 1, block_size, group, kv_heads,
                                            None if tq == 1 else tq)[0]
                            rows = -(-tq * group // 16) * 16
                            plan = pa.tpu_plan(num_kv_heads=kv_heads, head_dim=head_dim,
                                               block_size=block_size, itemsize=itemsize,
                                               rows=rows, max_blocks=4096)
                            worst = max(worst, pa.vmem_bytes(
                                plan, num_kv_heads=kv_heads, head_dim=head_dim,
                                block_size=block_size, itemsize=itemsize, rows=rows))
    assert 0 < worst <= pa.VMEM_BUDGET, worst


def test_tpu_kernel_caps_query_rows():
    """Cascade prefix calls ask for 256-token tiles; with G = 8 the kernel takes 64 tokens
    (512 rows) per tile instead, and with 8 kv heads 8 (64 rows per head, 512 in all)."""
    assert pa._q_tile(4096, 2, False, 16, 8, 1, 256) == (64, 65)
    assert pa._q_tile(4096, 2, False, 16, 8, 8, 256)[0] == 8
    assert pa._q_tile(4096, 2, False, 16, 1, 1, 256)[0] == 256
    assert pa._q_tile(8, 8, True, 16, 8, 8, None) == (1, 8)


@pytest.mark.parametrize("dtype,head_dim,block_size,decode", [
    ("bfloat16", 128, 16, True), ("float32", 256, 64, False), ("bfloat16", 128, 32, False)])
def test_paged_attention_kernel_lowers_for_tpu(dtype, head_dim, block_size, decode):
    """8 kv heads lower to the Mosaic kernel; 4 take the XLA path (their merged-heads view
    would be a copy of the caches under XLA's TPU tiling)."""
    S = jax.ShapeDtypeStruct

    def module(hkv):
        num_seqs, hq = 4, 4 * hkv
        args = [S((num_seqs if decode else 24, hq, head_dim), dtype),
                S((32, block_size, hkv, head_dim), dtype),
                S((32, block_size, hkv, head_dim), dtype),
                S((num_seqs, 8), jnp.int32), S((num_seqs,), jnp.int32),
                None if decode else S((num_seqs + 1,), jnp.int32)]
        fn = jax.jit(lambda *a: jf.paged_attention(*a, sliding_window=64, logits_soft_cap=30.0))
        return jax.export.export(fn, platforms=["tpu"])(*args).mlir_module()

    assert "tpu_custom_call" in module(8)
    assert "tpu_custom_call" not in module(4)


def test_tpu_backend_refuses_untileable_shapes():
    why = jf.explain_backends("paged_attention", "tpu", dtype="float32", head_dim=80,
                              block_size=16, num_q_heads=8, num_kv_heads=2)
    assert why["pallas_tpu"] == "head_dim 80 is not a multiple of 128 (Mosaic tiling)"
    assert why["xla"] == "ok"
    rng = np.random.default_rng(7)
    batch = testing.make_ragged_batch(rng, [(1, 4)], head_dim=64, block_size=4)
    with pytest.raises(jf.BackendError, match="pallas_interpret: head_dim 64 is not a multiple"):
        jf.paged_attention(*batch.args(), backend=BACKEND)
    assert pa.tpu_supports(head_dim=128, block_size=12) == (
        False, "block_size 12 is not a multiple of 8 (Mosaic tiling of 32-bit values)")
    assert pa.tpu_supports(head_dim=128, block_size=8, dtype="bfloat16") == (
        False, "block_size 8 is not a multiple of 16 (Mosaic tiling of 16-bit values)")
    assert pa.tpu_supports(head_dim=256, block_size=16, dtype="float32", num_kv_heads=8) == (
        True, "")
    assert pa.tpu_supports(head_dim=128, block_size=16, num_kv_heads=4) == (
        False, "num_kv_heads 4 is not a multiple of 8: XLA pads the cache's heads to its TPU "
               "tiles, so the kernel's [blocks, block_size * heads, head_dim] view would copy "
               "both caches on every call (kv_layout='HND' caches take any head count)")
    assert pa.tpu_supports(head_dim=128, block_size=16, num_kv_heads=4, xla_layout=False) == (
        True, "")
    for heads in (1, 2, 3):  # HND: no head-count rule (its minor dims are (block_size, D))
        assert pa.tpu_supports(head_dim=128, block_size=16, num_kv_heads=heads,
                               kv_layout="HND") == (True, "")
    assert pa.tpu_supports(head_dim=256, block_size=256, dtype="float32", num_kv_heads=8) == (
        False, "a block of 8 kv heads is 2048 KiB, over the 512 KiB a chunk of VMEM takes "
               "(smaller blocks, or fewer kv heads per device)")
    assert pa.tpu_supports(head_dim=128, block_size=16, dtype="float16")[1].startswith(
        "float16: TPUs have no float16")


def test_tpu_float16_attention_exports_through_xla():
    """float16 on a TPU takes the XLA path (no Mosaic call), the cache ops stay DMA kernels."""
    S = jax.ShapeDtypeStruct
    args = [S((4, 32, 128), jnp.float16), S((16, 16, 8, 128), jnp.float16),
            S((16, 16, 8, 128), jnp.float16), S((4, 4), jnp.int32), S((4,), jnp.int32)]
    exp = jax.export.export(jax.jit(jf.paged_attention), platforms=["tpu"])(*args)
    assert "tpu_custom_call" not in exp.mlir_module()
    exp = jax.export.export(jax.jit(jf.write_kv), platforms=["tpu"])(
        S((4, 8, 128), jnp.float16), S((4, 8, 128), jnp.float16), args[1], args[2], args[4])
    assert "tpu_custom_call" in exp.mlir_module()


def test_tpu_kv_head_rule_follows_xla_tiling_by_generation(monkeypatch):
    """bfloat16 caches need 16 kv heads from TPU7x on (XLA tiles 16-bit values by 16 rows
    there), float32 and older TPUs 8; off a TPU the rule assumes 8."""
    assert pa.xla_tile_rows(2) == 8
    monkeypatch.setattr(pa.pltpu, "get_tpu_info", lambda: types.SimpleNamespace(generation=7))
    assert pa.xla_tile_rows(2) == 16 and pa.xla_tile_rows(4) == 8
    assert pa.tpu_supports(head_dim=128, block_size=16, dtype="bfloat16", num_kv_heads=8)[1] \
        .startswith("num_kv_heads 8 is not a multiple of 16")
    assert pa.tpu_supports(head_dim=128, block_size=16, dtype="float32", num_kv_heads=8) == (
        True, "")
    monkeypatch.setattr(pa.pltpu, "get_tpu_info", lambda: types.SimpleNamespace(generation=6))
    assert pa.tpu_supports(head_dim=128, block_size=16, dtype="bfloat16", num_kv_heads=8) == (
        True, "")


def test_tpu_backend_refuses_block_tables_over_its_smem_share():
    """The TPU kernel prefetches the block table into SMEM (1 MiB a core): 64 sequences of 64k
    tokens in 16-token blocks need 1 MiB of table, so the XLA path runs instead; the same
    batch in 64-token blocks fits. Shared-prefix calls count the larger of their two tables."""
    S = jax.ShapeDtypeStruct

    def why(num_seqs, max_blocks, block_size, op="paged_attention", **more):
        return jf.explain_backends(op, "tpu", **_backends.attention_context(
            validate.check_paged_attention(
                S((num_seqs, 32, 128), jnp.bfloat16), S((64, block_size, 8, 128), jnp.bfloat16),
                S((64, block_size, 8, 128), jnp.bfloat16), S((num_seqs, max_blocks), jnp.int32),
                S((num_seqs,), jnp.int32)), **more))

    assert why(64, 4096, 16)["pallas_tpu"] == (
        "a block table of 262144 entries (1024 KiB) is over the 512 KiB of SMEM it may take "
        "(fewer sequences per call, or larger blocks)")
    assert why(64, 1024, 64)["pallas_tpu"] == "ok"
    assert why(4, 8, 16, "shared_prefix_attention",
               table_entries=200_000)["pallas_tpu"].startswith("a block table of 200000")


# ------------------------------------------------------- GPU (Triton-lowered) paged attention

from prefixkv.kernels.pallas import paged_attention_gpu as pg  # noqa: E402

GPU_CASES = [
    ("mixed", "float32", 64, 16, {}),
    ("decode", "bfloat16", 128, 16, dict(sliding_window=9, logits_soft_cap=3.0)),
    ("prefill_with_prefix", "float16", 64, 32, dict(causal=False)),
]


@pytest.mark.parametrize("grid,dtype,head_dim,block_size,kw", GPU_CASES,
                         ids=[f"{c[0]}-{c[1]}-d{c[2]}-b{c[3]}" for c in GPU_CASES])
def test_paged_attention_pallas_gpu_interpret(grid, dtype, head_dim, block_size, kw):
    rng = np.random.default_rng(8)
    batch = testing.make_ragged_batch(rng, testing.seq_grid(grid, block_size), num_q_heads=8,
                                      num_kv_heads=2, head_dim=head_dim, block_size=block_size,
                                      dtype=dtype, sliding_window=kw.get("sliding_window"))
    want, want_lse = ref.paged_attention_reference(*batch.args(), return_lse=True, **kw)
    out, lse = jf.paged_attention(*batch.args(), return_lse=True,
                                  backend="pallas_gpu_interpret", **kw)
    _close(out, want, dtype)
    fin = np.isfinite(want_lse)
    assert (np.isneginf(np.asarray(lse)) == ~fin).all()
    np.testing.assert_allclose(np.asarray(lse)[fin], want_lse[fin], atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("dtype,head_dim,num_q_heads,grid,slices,heads", [
    ("float32", 128, 64, "mixed", 2, 16), ("float32", 128, 48, "decode", 2, 12),
    ("float32", 128, 74, "prefill_with_prefix", 3, 13),
    ("bfloat16", 256, 96, "prefill_with_prefix", 2, 24)])
def test_pallas_gpu_splits_groups_too_big_for_registers(dtype, head_dim, num_q_heads, grid,
                                                        slices, heads):
    """2 kv heads with 32, 24, 37 and 48 q heads each: a token's group overflows one program's
    registers, so each kv head's q heads run as several programs (the fewest slices that fit;
    37 = 13 + 13 + 11, padded), rows and outputs back in q head order."""
    group = num_q_heads // 2
    assert pg.gpu_head_slices(head_dim, group, dtype) == (slices, heads)
    rng = np.random.default_rng(13)
    batch = testing.make_ragged_batch(rng, testing.seq_grid(grid, 16), num_q_heads=num_q_heads,
                                      num_kv_heads=2, head_dim=head_dim, block_size=16,
                                      dtype=dtype, decode=grid == "decode")
    args = batch.args()[:5] if grid == "decode" else batch.args()
    kw = dict(logits_soft_cap=4.0) if grid == "mixed" else {}
    want, want_lse = ref.paged_attention_reference(*args, return_lse=True, **kw)
    out, lse = jf.paged_attention(*args, return_lse=True, backend="pallas_gpu_interpret", **kw)
    _close(out, want, dtype)
    fin = np.isfinite(want_lse)
    assert (np.isneginf(np.asarray(lse)) == ~fin).all()
    np.testing.assert_allclose(np.asarray(lse)[fin], want_lse[fin], atol=2e-3, rtol=1e-4)
    S = jax.ShapeDtypeStruct
    assert _pallas_grids(
        lambda *a: pg.paged_attention_gpu(*a, None, scale=0.1, num_splits=1),
        S((4, num_q_heads, head_dim), dtype), S((50, 16, 2, head_dim), dtype),
        S((50, 16, 2, head_dim), dtype), S((4, 8), jnp.int32),
        S((4,), jnp.int32)) == [(4, 2 * slices)]


@pytest.mark.parametrize("dtype,num_splits,blocks_per_step,kv_gather,kw", [
    ("float32", 3, 3, False, {}),
    ("bfloat16", 4, None, False, dict(sliding_window=40, logits_soft_cap=5.0)),
    ("float16", 16, 1, False, {}), ("float16", 2, 8, False, {}),
    ("bfloat16", 4, None, True, dict(sliding_window=40, logits_soft_cap=5.0)),
    ("float32", 3, 2, True, {}), ("float16", 16, 8, True, {})])
def test_pallas_gpu_split_kv_decode(dtype, num_splits, blocks_per_step, kv_gather, kw):
    """Split-KV decode: more splits than some sequences have blocks (empty splits), ragged
    lengths, a window that empties the leading splits; merged by LSE. Loop steps of 1, 2, 3, 8
    and the default blocks, loaded block by block or gathered as one tile: a split's blocks are
    rarely a multiple, so the last step's extra blocks, inside the sequence but past the
    split, must count nothing."""
    from prefixkv.kernels.pallas import paged_attention_gpu as pg

    rng = np.random.default_rng(12)
    batch = testing.make_ragged_batch(rng, [(1, 1), (1, 17), (1, 150), (1, 333)],
                                      num_q_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
                                      dtype=dtype, decode=True,
                                      sliding_window=kw.get("sliding_window"))
    args = [jnp.asarray(a) for a in batch.args()[:5]]
    want, want_lse = ref.paged_attention_reference(*batch.args(), return_lse=True, **kw)
    out, lse = pg.paged_attention_gpu(*args, None, scale=64 ** -0.5, num_splits=num_splits,
                                      blocks_per_step=blocks_per_step, kv_gather=kv_gather,
                                      interpret=True, **kw)
    _close(out, want, dtype)
    np.testing.assert_allclose(np.asarray(lse), want_lse, atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("grid,dtype,kw", [
    ("mixed", "float16", dict(sliding_window=23, logits_soft_cap=3.0)),
    ("prefill_with_prefix", "float32", dict(causal=False))])
@pytest.mark.parametrize("kv_gather", [True, False], ids=["gathered", "by_block"])
def test_pallas_gpu_kv_tiles(grid, dtype, kw, kv_gather):
    """A step's blocks as one tile of keys addressed through the block table (kv_gather, the
    default) or block by block, on ragged prefill and mixed batches (causal rows inside a
    tile, a window, no causality)."""
    rng = np.random.default_rng(14)
    batch = testing.make_ragged_batch(rng, testing.seq_grid(grid, 16), num_q_heads=8,
                                      num_kv_heads=2, head_dim=64, block_size=16, dtype=dtype)
    args = [jnp.asarray(a) for a in batch.args()]
    want, want_lse = ref.paged_attention_reference(*batch.args(), return_lse=True, **kw)
    out, lse = pg.paged_attention_gpu(*args, scale=64 ** -0.5, blocks_per_step=4,
                                      kv_gather=kv_gather, interpret=True, **kw)
    _close(out, want, dtype)
    fin = np.isfinite(want_lse)
    assert (np.isneginf(np.asarray(lse)) == ~fin).all()
    np.testing.assert_allclose(np.asarray(lse)[fin], want_lse[fin], atol=2e-3, rtol=1e-4)


def test_pallas_gpu_split_kv_by_default_for_few_long_sequences():
    from prefixkv.kernels.pallas import paged_attention_gpu as pg

    S = jax.ShapeDtypeStruct
    args = (S((2, 8, 64), "bfloat16"), S((600, 16, 2, 64), "bfloat16"),
            S((600, 16, 2, 64), "bfloat16"), S((2, 256), jnp.int32), S((2,), jnp.int32))
    # 2 seqs x 2 kv heads = 4 programs on 132 SMs, 4096 keys: 8 splits of 512 keys
    assert _pallas_grids(lambda *a: pg.paged_attention_gpu(*a, None, scale=0.1),
                         *args) == [(2 * 8, 2)]
    assert "xla.gpu.triton" in _export_for_h100(
        jax.jit(lambda *a: pg.paged_attention_gpu(*a, None, scale=0.1)), args)


@pytest.mark.parametrize("prefixes,seqs", [
    ([2, 1], [(0, 3, 5), (-1, 2, 9), (1, 1, 16)]),
    # one prefix: every token against it in token order, no sort; those of no prefix dropped
    ([3], [(0, 3, 5), (-1, 2, 9), (0, 1, 16), (-1, 1, 2)]),
    ([3], [(0, 1, 5), (-1, 1, 9), (0, 1, 16)])])
def test_shared_prefix_attention_pallas_gpu_interpret(prefixes, seqs):
    rng = np.random.default_rng(9)
    batch = testing.make_shared_prefix_batch(rng, prefixes, seqs, num_q_heads=8,
                                             num_kv_heads=2, head_dim=64, block_size=16)
    out, lse = jf.shared_prefix_attention(*batch.args(), return_lse=True,
                                          backend="pallas_gpu_interpret")
    want, want_lse = ref.shared_prefix_attention_reference(*batch.args(), return_lse=True)
    _close(out, want, "float32")
    np.testing.assert_allclose(np.asarray(lse), want_lse, atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("backend", ["pallas_interpret", "pallas_gpu_interpret"])
def test_shared_prefix_attention_with_an_empty_prefix_table(backend):
    """A prefix table of width 0 (prefix_lens 0): the GPU kernel had indexed the empty table
    while tracing (the TPU wrapper returned early for no columns, the GPU one did not)."""
    rng = np.random.default_rng(0)
    b = testing.make_shared_prefix_batch(rng, [0], [(0, 1, 5), (-1, 1, 9)], num_q_heads=4,
                                         num_kv_heads=2, head_dim=128, block_size=16)
    args = list(b.args())
    args[3] = args[3][:, :0]
    out, lse = jf.shared_prefix_attention(*args, return_lse=True, backend=backend)
    want, want_lse = ref.shared_prefix_attention_reference(*args, return_lse=True)
    _close(out, want, "float32")
    np.testing.assert_allclose(np.asarray(lse), want_lse, atol=2e-3, rtol=1e-4)


def test_one_prefix_kernel_cascade_skips_chunks_with_no_prefix_token():
    """The kernels' one-prefix cascade (tokens in order, no sort) reads the prefix only for
    chunks of tokens with one of its tokens: 256 prefill tokens of no prefix beside 8 decode
    tokens of the prefix read it for one chunk, not for all (the 256 tokens' tiles walked all
    of it, found by review). The kernel here is the XLA ragged path, at the same tiling."""
    from prefixkv.jax_frontend import _xla

    seen = []

    def attention(*args, **kw):  # records each call's per-"sequence" kv lens
        seen.append(np.asarray(args[4]))
        return _xla.ragged_paged_attention(*args, **kw)

    rng = np.random.default_rng(10)
    seqs = [(-1, 256, 300)] + [(0, 1, 3 + s) for s in range(8)]
    batch = testing.make_shared_prefix_batch(rng, [4], seqs, num_q_heads=4, num_kv_heads=2,
                                             head_dim=16, block_size=8)
    args = [jnp.asarray(a) if a is not None else None for a in batch.args()]
    out, lse = _xla.shared_prefix_attention(*args, scale=0.25, attention_fn=attention)
    want, want_lse = ref.shared_prefix_attention_reference(*batch.args(), scale=0.25,
                                                           return_lse=True)
    _close(out, want, "float32")
    np.testing.assert_allclose(np.asarray(lse), want_lse, atol=1e-4, rtol=1e-4)
    prefix_call = seen[-1]  # own part first (causal), then the prefix pass
    assert prefix_call.tolist() == [0, 4 * 8]  # chunks of 256 tokens: only the second reads


@pytest.mark.parametrize("decode", [True, False])
def test_shared_prefix_pallas_gpu_splits_the_prefix_pass(decode):
    """Few queries over a long prefix: the non-causal prefix launch splits its KV (3 splits of
    512 keys of a 1536-token prefix, 3 tiles x 2 kv heads for the 132 SMs assumed without a
    GPU), merged by LSE; a token with no prefix and a 1-block prefix beside it."""
    from prefixkv.kernels.pallas import paged_attention_gpu as pg

    rng = np.random.default_rng(19)
    seqs = [(0, 1, 5), (-1, 1, 4), (1, 1, 3), (0, 1, 17)] if decode else \
        [(0, 3, 5), (-1, 2, 4), (1, 1, 3), (0, 2, 17)]
    batch = testing.make_shared_prefix_batch(rng, [96, 1], seqs, num_q_heads=4,
                                             num_kv_heads=2, head_dim=16, block_size=16,
                                             decode=decode)
    args = batch.args()
    grids = _pallas_grids(lambda *a: jf.shared_prefix_attention(
        *a, backend="pallas_gpu_interpret"), *args)
    assert grids[-1] == (3 * 3, 2), grids  # the prefix launch: (3 tiles x 3 splits, kv heads)
    out, lse = jf.shared_prefix_attention(*args, return_lse=True, logits_soft_cap=2.0,
                                          backend="pallas_gpu_interpret")
    want, want_lse = ref.shared_prefix_attention_reference(*args, logits_soft_cap=2.0,
                                                           return_lse=True)
    _close(out, want, "float32")
    np.testing.assert_allclose(np.asarray(lse), want_lse, atol=2e-3, rtol=1e-4)
    assert pg.kv_splits(3 * 2, 1536) == 3


@pytest.mark.parametrize("causal,kw", [(False, {}), (True, dict(sliding_window=40)),
                                       (True, dict(logits_soft_cap=3.0))])
def test_pallas_gpu_split_kv_prefill(causal, kw):
    """Split-KV of a prefill/mixed launch (default for non-causal ones with few programs,
    forced here): a tile's key range cut in 3, causal rows and a window inside the splits."""
    from prefixkv.kernels.pallas import paged_attention_gpu as pg

    rng = np.random.default_rng(20)
    batch = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 16), num_q_heads=8,
                                      num_kv_heads=2, head_dim=64, block_size=16)
    want, want_lse = ref.paged_attention_reference(*batch.args(), causal=causal,
                                                   return_lse=True, **kw)
    out, lse = pg.paged_attention_gpu(*(jnp.asarray(a) for a in batch.args()),
                                      scale=64 ** -0.5, causal=causal, num_splits=3,
                                      interpret=True, **kw)
    _close(out, want, "float32")
    fin = np.isfinite(want_lse)
    assert (np.isneginf(np.asarray(lse)) == ~fin).all()
    np.testing.assert_allclose(np.asarray(lse)[fin], want_lse[fin], atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("dtype,head_dim,block_size,decode,pallas", [
    ("bfloat16", 128, 16, True, True), ("float16", 64, 32, False, True),
    ("float32", 256, 16, False, True),
    ("float32", 256, 64, False, False)])  # a 64 KiB tile: the XLA path instead
def test_paged_attention_gpu_kernel_lowers_for_cuda(dtype, head_dim, block_size, decode,
                                                    pallas):
    S = jax.ShapeDtypeStruct
    num_seqs = 4
    args = [S((num_seqs if decode else 24, 16, head_dim), dtype),
            S((32, block_size, 4, head_dim), dtype), S((32, block_size, 4, head_dim), dtype),
            S((num_seqs, 8), jnp.int32), S((num_seqs,), jnp.int32),
            None if decode else S((num_seqs + 1,), jnp.int32)]
    fn = jax.jit(lambda *a: jf.paged_attention(*a, sliding_window=40, logits_soft_cap=30.0))
    assert ("xla.gpu.triton" in _export_for_h100(fn, args)) == pallas  # the frontend's choice


def test_xla_backend_exports_for_several_platforms_at_once():
    """docs/ops.md: with backend="xla" one export serves CUDA and TPU (the Pallas kernels
    inside platform_dependent would be lowered for every platform listed; CPU in the list needs
    PREFIXKV_DISABLE_CPU_FFI=1, see there)."""
    S = jax.ShapeDtypeStruct
    args = (S((4, 16, 128), jnp.bfloat16), S((64, 16, 4, 128), jnp.bfloat16),
            S((64, 16, 4, 128), jnp.bfloat16), S((4, 8), jnp.int32), S((4,), jnp.int32))
    fn = jax.jit(lambda *a: jf.paged_attention(*a, backend="xla"))
    exp = jax.export.export(fn, platforms=["cuda", "tpu"])(*args)
    assert exp.platforms == ("cuda", "tpu")
    assert "xla.gpu.triton" not in exp.mlir_module()


def _export_for_h100(fn, args) -> str:
    """StableHLO of ``fn`` exported for CUDA. Pallas' Triton lowering asks the device for its
    compute capability; with no GPU here (jax >= 0.11 refuses to guess) an abstract H100
    names the target."""
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                       platform="gpu")
    with jax.sharding.use_abstract_mesh(
            jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
        return jax.export.export(fn, platforms=["cuda"], disabled_checks=[
            jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
                *args).mlir_module()


def _dots_in(jaxpr):
    """Every dot_general equation of ``jaxpr`` and of the jaxprs nested in its equations."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for param in eqn.params.values():
            for sub in (param if isinstance(param, (list, tuple)) else [param]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _dots_in(inner)


def test_gpu_prefill_lowering_has_no_loop():
    """Prefill, mixed batches and the cascade find each query tile's sequence by one fused
    compare, not jnp.searchsorted's loop (a while whose every step is kernels of its own on a
    GPU)."""
    S = jax.ShapeDtypeStruct
    seqs, nb = 8, 600
    q, kc = S((1000, 32, 128), jnp.bfloat16), S((nb, 16, 8, 128), jnp.bfloat16)
    paged = (q, kc, kc, S((seqs, 64), jnp.int32), S((seqs,), jnp.int32),
             S((seqs + 1,), jnp.int32))
    cascade = (q, kc, kc, S((2, 128), jnp.int32), S((2,), jnp.int32), S((seqs,), jnp.int32),
               S((seqs, 16), jnp.int32), S((seqs,), jnp.int32), S((seqs + 1,), jnp.int32))
    for fn, args in ((jf.paged_attention, paged), (jf.shared_prefix_attention, cascade)):
        text = _export_for_h100(jax.jit(lambda *a, f=fn: f(*a)), args)
        assert "xla.gpu.triton" in text
        # jax >= 0.11 lowers cumsum to a chlo.scan composite whose reference decomposition is
        # a while loop (XLA may run the composite as such): those functions do not count
        funcs = text.split("func.func ")[1:]
        loops = [f.split("(")[0] for f in funcs
                 if "stablehlo.while" in f and not f.startswith("private @chlo.")]
        assert not loops, loops
    from prefixkv.jax_frontend import _xla

    # past COMPARE_ALL_MAX query x sequence pairs the scan again (no giant compare)
    assert _xla.fused_search(1000, 8) == "compare_all"
    assert _xla.fused_search(1 << 18, 1 << 10) == "scan"


def test_gpu_single_prefix_cascade_lowering_has_no_sort():
    """One prefix: the Pallas cascade attends every token to it in token order, with no sort
    of the tokens by prefix (nor its gathers and inverse scatter)."""
    S = jax.ShapeDtypeStruct
    seqs, nb = 8, 600
    args = (S((seqs, 32, 128), jnp.bfloat16), S((nb, 16, 8, 128), jnp.bfloat16),
            S((nb, 16, 8, 128), jnp.bfloat16), S((1, 128), jnp.int32), S((1,), jnp.int32),
            S((seqs,), jnp.int32), S((seqs, 16), jnp.int32), S((seqs,), jnp.int32))
    text = _export_for_h100(jax.jit(lambda *a: jf.shared_prefix_attention(*a)), args)
    assert text.count("xla.gpu.triton") >= 2 and "stablehlo.sort" not in text
    two = (*args[:3], S((2, 128), jnp.int32), S((2,), jnp.int32), *args[5:])
    assert "stablehlo.sort" in _export_for_h100(
        jax.jit(lambda *a: jf.shared_prefix_attention(*a)), two)


def _triton_cache_loads(text: str) -> set[str]:
    """(element type, offset type) of every tensor pointer the Triton kernels in exported
    StableHLO ``text`` form from a cache-sized load: their IR, MLIR bytecode in each
    custom call's backend config, parsed back."""
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton import lowering

    ctx = mlir.make_ir_context()
    lowering.tt_dialect.register_dialect(ctx)
    ctx.load_all_available_dialects()
    found = set()
    with ctx:
        def walk(op):
            for region in op.regions:
                for block in region.blocks:
                    for child in block.operations:
                        name = str(child.attributes["call_target_name"]) \
                            if "call_target_name" in child.attributes else ""
                        if "xla.gpu.triton" in name:
                            config = child.attributes["mhlo.backend_config"]
                            kernel = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes)
                            for line in str(kernel).splitlines():
                                if "tt.addptr" in line and "tensor<" in line:
                                    ptr, off = line.rsplit(":", 1)[1].split(", ")
                                    found.add((ptr.split("!tt.ptr<")[1].split(">")[0],
                                               off.rsplit("x", 1)[1].rstrip(">").strip()))
                        walk(child.operation)
        walk(ir.Module.parse(text).operation)
    return found


@pytest.mark.parametrize("op", ["paged_attention", "shared_prefix_attention"])
def test_gpu_fp8_caches_of_2_to_4_gib_are_dequantized(op):
    """Pallas' Triton lowering addresses a ref with 32-bit offsets unless it is over 2**32
    bytes: an fp8 cache of more than 2**31 bytes, up to 2**32, read as its bytes, would have
    its later blocks' offsets wrap negative. Such caches reach the kernel as the blocks the
    tables name, dequantized (no int8 load with 32-bit offsets); smaller ones as bytes, larger
    ones as bytes with 64-bit offsets. Exported only (abstract shapes; nothing allocated)."""
    S = jax.ShapeDtypeStruct
    block = 16 * 8 * 128  # bytes of one block of fp8 K

    def loads(num_blocks):
        kc = S((num_blocks, 16, 8, 128), jnp.float8_e4m3fn)
        tables = (S((4, 64), jnp.int32), S((4,), jnp.int32))
        if op == "paged_attention":
            args = (S((4, 32, 128), jnp.bfloat16), kc, kc, *tables)
        else:
            args = (S((4, 32, 128), jnp.bfloat16), kc, kc, S((1, 8), jnp.int32),
                    S((1,), jnp.int32), S((4,), jnp.int32), *tables)
        return _triton_cache_loads(_export_for_h100(
            jax.jit(lambda *a: getattr(jf, op)(*a)), args))

    assert ("i8", "i32") in loads(2**31 // block)          # 2 GiB: bytes, offsets < 2**31
    for num_blocks in (2**31 // block + 1, 2**32 // block):
        found = loads(num_blocks)
        assert not any(t == "i8" for t, _ in found), (num_blocks, found)
        assert ("bf16", "i32") in found
    found = loads(2**32 // block + 1)                       # past 4 GiB: 64-bit offsets
    assert ("i8", "i64") in found and ("i8", "i32") not in found
    assert pg.gpu_reads_fp8(num_blocks=2**31 // block, block_size=16, num_kv_heads=8,
                            head_dim=128)
    assert not pg.gpu_reads_fp8(num_blocks=2**31 // block + 1, block_size=16, num_kv_heads=8,
                                head_dim=128)


@pytest.mark.parametrize("num_seqs,context,window", [(8, 4096, None), (32, 8192, None),
                                                   (4, 16384, 1000)])
def test_gpu_decode_lowering_has_no_gather_scatter_or_loop(num_seqs, context, window):
    """Decode around the Pallas GPU kernel is elementwise metadata and reshapes: the general
    tile plan's search (a while loop, a cumsum) and the token gather and scatter ran as ~30
    small kernels a call on an H200 (CUPTI: ~100 us a call beside the 253 us kernel at
    32 x 8192); the decode lowering for CUDA has none of them (it had 9 gathers, a scatter, a
    while and a reduce_window)."""
    S = jax.ShapeDtypeStruct
    blocks = num_seqs * context // 16 + 1
    args = (S((num_seqs, 32, 128), jnp.bfloat16), S((blocks, 16, 8, 128), jnp.bfloat16),
            S((blocks, 16, 8, 128), jnp.bfloat16), S((num_seqs, context // 16), jnp.int32),
            S((num_seqs,), jnp.int32))
    text = _export_for_h100(jax.jit(lambda q, k, v, t, n: jf.paged_attention(
        q, k, v, t, n, sliding_window=window)), args)
    assert "xla.gpu.triton" in text
    for op in ("stablehlo.gather", "stablehlo.scatter", "stablehlo.while",
               "stablehlo.reduce_window", "stablehlo.sort"):
        assert op not in text, op


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_gpu_kernel_dot_precision(dtype):
    """Triton lowers an f32 dot with the default precision to TF32 (10-bit mantissa, ~1e-3
    error): the float32 kernel must ask for HIGHEST; 16-bit inputs must reach the dots
    unconverted (tensor-core MMA), with f32 accumulation."""
    from prefixkv.kernels.pallas import paged_attention_gpu as pg

    S = jax.ShapeDtypeStruct
    args = (S((4, 16, 64), dtype), S((32, 16, 4, 64), dtype), S((32, 16, 4, 64), dtype),
            S((4, 8), jnp.int32), S((4,), jnp.int32))
    per_step = pg.gpu_blocks_per_step(64, dtype, 16, rows=16)
    assert per_step == (1 if dtype == "float32" else 8)  # 16-bit: 128 keys of 16-token blocks
    dots = []
    for gather in (True, False):
        jaxpr = jax.make_jaxpr(lambda *a, g=gather: pg.paged_attention_gpu(
            *a, None, scale=0.1, kv_gather=g))(*args)
        found = list(_dots_in(jaxpr.jaxpr))
        # QK and PV of a step's gathered tile (the default), or of each block of the step
        assert len(found) == (2 if gather else 2 * per_step)
        dots += found
    for eqn in dots:
        assert [str(v.aval.dtype) for v in eqn.invars] == [dtype, dtype]
        assert eqn.params["preferred_element_type"] == jnp.float32
        precision = eqn.params["precision"]
        if dtype == "float32":
            assert precision is not None and all(p == jax.lax.Precision.HIGHEST
                                                 for p in precision)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_xla_path_dot_precision(dtype):
    """The XLA path's f32 dots (what GPUs and TPUs run when no Pallas kernel fits) name their
    precision: the accelerators' DEFAULT is one TF32 or bfloat16 pass."""
    rng = np.random.default_rng(3)
    rb = testing.make_ragged_batch(rng, [(1, 40), (5, 21)], num_q_heads=8, num_kv_heads=2,
                                   head_dim=64, block_size=16, dtype=dtype)
    dec = testing.make_ragged_batch(rng, [(1, 40), (1, 21)], num_q_heads=8, num_kv_heads=2,
                                    head_dim=64, block_size=16, dtype=dtype)
    sp = testing.make_shared_prefix_batch(rng, [2], [(0, 1, 5), (0, 1, 3)], num_q_heads=8,
                                          num_kv_heads=2, head_dim=64, block_size=16,
                                          dtype=dtype)
    want = jax.lax.Precision.HIGHEST if dtype == "float32" else jax.lax.Precision.HIGH
    calls = [lambda: jf.paged_attention(*rb.args(), backend="xla"),
             lambda: jf.paged_attention(*dec.args()[:5], backend="xla"),
             lambda: jf.shared_prefix_attention(*sp.args(), backend="xla")]
    for call in calls:
        dots = list(_dots_in(jax.make_jaxpr(call)().jaxpr))
        assert dots
        for eqn in dots:
            assert eqn.params["precision"] == (want, want), eqn


def test_tpu_kernel_f32_dots_ask_for_highest():
    rb = testing.make_ragged_batch(np.random.default_rng(4), [(3, 40)], num_q_heads=8,
                                   num_kv_heads=2, head_dim=128, block_size=16)
    jaxpr = jax.make_jaxpr(lambda: jf.paged_attention(*rb.args(), backend=BACKEND))()
    dots = list(_dots_in(jaxpr.jaxpr))
    assert len(dots) == 4  # QK and PV for each of the step's 2 kv heads
    for eqn in dots:
        assert eqn.params["precision"] == (jax.lax.Precision.HIGHEST,) * 2


def _triton_module_texts(fn, args) -> list[str]:
    """The Triton IR (no debug locations) of every Pallas kernel ``fn`` lowers to for an H100,
    caught at jax's lowering entry point (private API: skipped when it moves)."""
    try:
        from jax._src.pallas.triton import pallas_call_registration as reg
    except ImportError:
        pytest.skip("jax's Pallas Triton lowering is not importable")
    lower = getattr(reg.lowering, "lower_jaxpr_to_triton_module", None)
    if lower is None:
        pytest.skip("jax's Pallas Triton lowering entry point moved")
    texts = []

    def spy(*a, **k):
        result = lower(*a, **k)
        texts.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    reg.lowering.lower_jaxpr_to_triton_module = spy
    try:
        _export_for_h100(fn, args)
    finally:
        reg.lowering.lower_jaxpr_to_triton_module = lower
    return texts


def _gpu_attention_case(op: str, dtype: str, head_dim: int, num_tokens: int,
                        block_size: int = 16, group: int = 4):
    """(jitted frontend call, argument shapes): 8 kv heads, ``group`` q heads each; num_tokens
    0 is decode of 4 sequences; shared_prefix: 2 prefixes, the tokens split over 4
    sequences."""
    S = jax.ShapeDtypeStruct
    decode = num_tokens == 0
    seqs = 4 if (decode or op == "shared_prefix") else 1
    n = seqs if decode else num_tokens
    common = (S((n, 8 * group, head_dim), dtype), S((600, block_size, 8, head_dim), dtype),
              S((600, block_size, 8, head_dim), dtype))
    cu = None if decode else S((seqs + 1,), jnp.int32)
    if op == "paged":
        args = (*common, S((seqs, 64), jnp.int32), S((seqs,), jnp.int32), cu)
        return jax.jit(lambda *a: jf.paged_attention(*a)), args
    args = (*common, S((2, 32), jnp.int32), S((2,), jnp.int32), S((seqs,), jnp.int32),
            S((seqs, 16), jnp.int32), S((seqs,), jnp.int32), cu)
    return jax.jit(lambda *a: jf.shared_prefix_attention(*a)), args


def _assert_fits_sm90(texts, tmp_path) -> None:
    """Each Triton module compiled for sm_90 (4 warps, 2 stages): at most a few stack bytes
    (register spills) and shared memory within the H100's 227 KiB."""
    triton = pytest.importorskip("triton")
    from cubin_resources import resources
    from triton.backends.compiler import GPUTarget

    assert texts, "no Pallas GPU kernel in the lowering"
    for i, text in enumerate(texts):
        path = tmp_path / f"kernel{i}.ttir"
        path.write_text(text)
        kernel = triton.compile(str(path), target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": 4, "num_stages": 2})
        res = resources(kernel.asm["cubin"])
        if not res:
            pytest.skip("cuobjdump is not available")
        assert res["STACK"] <= 64, f"kernel {i}: register spills: {res}"
        assert kernel.metadata.shared <= 227 * 1024


@pytest.mark.parametrize("op,dtype,head_dim,num_tokens,block_size,group", [
    ("paged", "bfloat16", 128, 512, 16, 4), ("paged", "float32", 128, 512, 16, 4),
    ("paged", "bfloat16", 256, 512, 16, 4), ("paged", "float16", 64, 512, 16, 4),
    ("paged", "bfloat16", 128, 0, 16, 4), ("shared_prefix", "bfloat16", 128, 1024, 16, 4),
    ("paged", "bfloat16", 64, 0, 16, 8), ("paged", "bfloat16", 256, 0, 16, 4),
    # the largest tiles gpu_supports accepts: 32 KiB of 16-bit K, 16 KiB of float32, 512 keys
    ("paged", "bfloat16", 128, 512, 128, 4), ("paged", "bfloat16", 32, 512, 512, 4),
    ("paged", "bfloat16", 256, 0, 64, 4), ("paged", "float32", 128, 512, 32, 4),
    ("paged", "float32", 256, 0, 16, 4), ("paged", "float32", 32, 512, 128, 4),
    # groups one program cannot hold: float32 head_dim 128 with 64 q heads per kv head spilled
    # 8 KB per thread, bf16 head_dim 256 with 128 spilled 832 B
    ("paged", "float32", 128, 0, 16, 64), ("paged", "bfloat16", 256, 512, 16, 128),
    ("paged", "float32", 64, 512, 16, 128)],
    ids=lambda x: str(x))
def test_gpu_kernel_compiles_for_sm90_without_spills(op, dtype, head_dim, num_tokens,
                                                     block_size, group, tmp_path):
    """The Pallas GPU kernels a frontend call lowers to for CUDA (prefill of 512 tokens, decode,
    cascade prefill whose prefix tiles ask for 256 tokens), compiled by Triton for sm_90: no
    register spills beyond a few stack bytes (float32 128 x 32 tiles spill 16-24; a 128-token
    tile of 4 q heads per kv head spilled 2.5 KB per thread, float32 64 x 128 tiles 1.5 KB),
    shared memory within the H100's 227 KiB."""
    assert pg.gpu_supports(head_dim=head_dim, block_size=block_size, dtype=dtype)[0]
    texts = _triton_module_texts(*_gpu_attention_case(op, dtype, head_dim, num_tokens,
                                                      block_size, group))
    _assert_fits_sm90(texts, tmp_path)


@pytest.mark.parametrize("dtype,head_dim,num_tokens", [
    ("bfloat16", 128, 0), ("bfloat16", 64, 0), ("bfloat16", 256, 0), ("bfloat16", 128, 512),
    ("float32", 128, 0)])
def test_gpu_block_by_block_kernel_compiles_for_sm90_without_spills(dtype, head_dim,
                                                                    num_tokens, tmp_path):
    """The block-by-block variant (kv_gather=False: 8 blocks of 16 keys per step in 16-bit
    decode at head_dim 128; the default gathered tiles are compiled above) for sm_90: no
    spills, shared memory within 227 KiB."""
    S = jax.ShapeDtypeStruct
    decode = num_tokens == 0
    n = 4 if decode else num_tokens
    args = (S((n, 32, head_dim), dtype), S((600, 16, 8, head_dim), dtype),
            S((600, 16, 8, head_dim), dtype), S((4, 64), jnp.int32), S((4,), jnp.int32),
            None if decode else S((5,), jnp.int32))
    fn = jax.jit(lambda *a: pg.paged_attention_gpu(*a, scale=0.1, kv_gather=False))
    _assert_fits_sm90(_triton_module_texts(fn, args), tmp_path)


def test_gpu_backend_refuses_untileable_shapes():
    assert pg.gpu_supports(head_dim=80, block_size=16) == (
        False, "head_dim 80 is not a power of two in [16, 256] (Triton tiles)")
    assert pg.gpu_supports(head_dim=128, block_size=8) == (
        False, "block_size 8 is not a power of two >= 16 (Triton dots)")
    assert pg.gpu_supports(head_dim=256, block_size=256, dtype="bfloat16") == (
        False, "a block_size 256 x head_dim 256 bfloat16 KV tile is 128 KiB, over the 32 KiB "
               "that fit shared memory and registers (Triton)")
    assert not pg.gpu_supports(head_dim=128, block_size=128, dtype="float32")[0]
    assert pg.gpu_supports(head_dim=16, block_size=1024, dtype="bfloat16") == (
        False, "block_size 1024 is over 512 for bfloat16: 16 rows of scores would spill "
               "registers (Triton)")
    why = jf.explain_backends("paged_attention", "cuda", dtype="bfloat16", head_dim=96,
                              block_size=16, num_q_heads=8, num_kv_heads=2)
    assert why["pallas_gpu"].startswith("head_dim 96") and why["xla"] == "ok"


# ---------------------------------------------------- gaps found by mutation testing


def test_shared_prefix_empty_prefix_pallas_tpu_interpret():
    """An empty prefix (prefix_len 0) with tokens on it, through the TPU kernel's cascade:
    the prefix pass's rows see no key and must give out 0 / lse -inf, not 0/0 = NaN that the
    LSE merge turns into NaN output (mutant t_out_unseen: o_ref divides by l_sum unguarded)."""
    pytest.importorskip("jax.experimental.pallas.tpu")
    rng = np.random.default_rng(6)
    batch = testing.make_shared_prefix_batch(rng, [0], [(0, 1, 3), (-1, 1, 9), (0, 1, 8)],
                                             num_q_heads=4, num_kv_heads=1, head_dim=128,
                                             block_size=8)
    out, lse = jf.shared_prefix_attention(*batch.args(), return_lse=True,
                                          backend="pallas_interpret")
    want, want_lse = ref.shared_prefix_attention_reference(*batch.args(), return_lse=True)
    testing.assert_attention_close(out, want, "float32")
    np.testing.assert_allclose(np.asarray(lse), want_lse, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("window,pages", [(3, 1), (5, 2)])
def test_tpu_kernel_window_rows_with_a_fully_masked_first_chunk(window, pages):
    """A prefill tile of 16 queries with a window shorter than the tile: the chunk loop
    starts at the first query's window, so for the tile's later rows the first chunk(s) hold
    no visible key (running max still -inf). The online softmax must treat such a chunk as
    empty, not as exp(-inf - -inf) = NaN. The test grids' windows (5, 11 over 16-48-key
    chunks) always leave each row a key in the first chunk (mutant t_msafe: m_safe = m_new)."""
    pytest.importorskip("jax.experimental.pallas.tpu")
    from prefixkv.kernels.pallas import paged_attention as pa

    rng = np.random.default_rng(42)
    batch = testing.make_ragged_batch(rng, [(16, 16), (9, 30)], num_q_heads=2,
                                      num_kv_heads=1, head_dim=128, block_size=8,
                                      sliding_window=window)
    want, want_lse = ref.paged_attention_reference(*batch.args(), scale=0.1,
                                                   sliding_window=window, return_lse=True)
    out, lse = pa.paged_attention_tpu(*(jnp.asarray(a) for a in batch.args()), scale=0.1,
                                      sliding_window=window, q_tile=16, pages=pages,
                                      interpret=_backends.tpu_interpret_params())
    testing.assert_attention_close(out, want, "float32")
    np.testing.assert_allclose(np.asarray(lse), want_lse, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("kv_gather", [True, False], ids=["gathered", "by_block"])
def test_gpu_kernel_window_rows_with_a_fully_masked_first_step(kv_gather):
    """The GPU kernel's twin of the TPU case above: 16-query prefill tiles, window 3, one
    8-key block per loop step, so the first step(s) show the tile's later rows no key; the
    rescale factor must be exp(m - m_safe), not exp(-inf - -inf) = NaN (mutant g_alpha)."""
    pytest.importorskip("jax.experimental.pallas")
    from prefixkv.kernels.pallas import paged_attention_gpu as pg

    rng = np.random.default_rng(43)
    batch = testing.make_ragged_batch(rng, [(16, 16), (9, 30)], num_q_heads=2,
                                      num_kv_heads=1, head_dim=64, block_size=8,
                                      sliding_window=3)
    want, want_lse = ref.paged_attention_reference(*batch.args(), scale=0.1, sliding_window=3,
                                                   return_lse=True)
    out, lse = pg.paged_attention_gpu(*(jnp.asarray(a) for a in batch.args()), scale=0.1,
                                      sliding_window=3, q_tile=16, blocks_per_step=1,
                                      kv_gather=kv_gather, num_splits=1, interpret=True)
    testing.assert_attention_close(out, want, "float32")
    np.testing.assert_allclose(np.asarray(lse), want_lse, atol=2e-3, rtol=1e-4)


def test_shared_prefix_backend_sees_the_prefix_table_size():
    """The TPU kernel prefetches the prefix table too, so shared_prefix_attention's
    table_entries must count num_prefixes x max_prefix_blocks, not only the sequences'
    tables: a prefix table past the SMEM share is refused (mutant o_ctx_prefix: the context
    counts the own tables alone; the existing test passes table_entries by hand)."""
    pytest.importorskip("jax.experimental.pallas.tpu")
    from prefixkv.kernels.pallas import paged_attention as pa
    from prefixkv.paged.registry import BackendError

    rng = np.random.default_rng(44)
    batch = testing.make_shared_prefix_batch(rng, [1], [(0, 1, 3)], num_q_heads=2,
                                             num_kv_heads=1, head_dim=128, block_size=8)
    width = pa.MAX_SMEM_TABLE_BYTES // 4 + 1
    ptab = np.zeros((1, width), np.int32)
    ptab[0, 0] = batch.prefix_block_tables[0, 0]
    args = list(batch.args())
    args[3] = ptab
    with pytest.raises(BackendError, match="SMEM"):
        jf.shared_prefix_attention(*args, backend="pallas_interpret")


def test_one_prefix_cascade_counts_its_prefix_row_per_token_chunk():
    """With one prefix the kernel's prefix pass runs each chunk of tokens as a sequence with
    its own copy of the prefix's table row, so the table it prefetches is chunks x width: a
    128k-token prefix under 8192 prefill tokens made a 1 MiB table (over the 512 KiB SMEM
    share) while the context counted the width once and took it. Now refused, by name; the
    same prefix under 256 tokens (one chunk) still runs on the kernel."""
    from prefixkv.jax_frontend import _xla
    from prefixkv.paged.registry import BackendError

    S = jax.ShapeDtypeStruct
    width = 8192  # x 16-token blocks: a 128k-token prefix

    def args(num_tokens):
        cache = S((20000, 16, 8, 128), jnp.bfloat16)
        return (S((num_tokens, 32, 128), jnp.bfloat16), cache, cache, S((1, width), jnp.int32),
                S((1,), jnp.int32), S((4,), jnp.int32), S((4, 64), jnp.int32),
                S((4,), jnp.int32), S((5,), jnp.int32))

    fn = jax.jit(lambda *a: jf.shared_prefix_attention(*a, backend="pallas_tpu"))
    with pytest.raises(BackendError, match="a block table of 262144 entries"):
        jax.export.export(fn, platforms=["tpu"])(*args(8192))
    text = jax.export.export(fn, platforms=["tpu"])(*args(256)).mlir_module()
    assert "tpu_custom_call" in text
    assert (_xla.one_prefix_chunks(8192), _xla.one_prefix_chunks(256)) == (32, 1)


def test_tpu_q_tile_cap_applies_just_past_the_row_budget():
    """_q_tile lowers the tile as soon as tile x G passes MAX_HEAD_ROWS / num_kv_heads: 128
    tokens x G 8 = 1024 rows over 512 (mutant t_caprows: the cap only past twice the budget;
    test_tpu_kernel_caps_query_rows asks for 256 tokens, 4x over, where both cap)."""
    pytest.importorskip("jax.experimental.pallas.tpu")
    from prefixkv.kernels.pallas import paged_attention as pa

    assert pa._q_tile(4096, 32, False, 16, 8, 1, 128)[0] == 64
    assert pa._q_tile(4096, 32, False, 16, 4, 2, 128)[0] == 64


def test_pallas_gather_blocks_clamps_out_of_range_ids_under_jit():
    """Under jit nothing checks index values: the Pallas gather clamps ids into
    [0, num_blocks) like the XLA path (take mode="clip") and the CPU FFI kernel
    (test_gather_out_of_range_ids_clamped), instead of DMAing from outside the cache
    (mutant c_gather_clip: the clamp dropped; TPU interpret mode then raises on the
    out-of-bounds read; the Pallas tests gather valid ids only)."""
    pytest.importorskip("jax.experimental.pallas.tpu")
    rng = np.random.default_rng(45)
    caches = [testing.random_values(rng, (10, 4, 2, 8), "float32") for _ in range(2)]
    ids = np.array([-3, 2, 99, 9], np.int32)
    got = jax.jit(lambda cs, i: jf.gather_blocks(cs, i, backend="pallas_interpret"))(
        [jnp.asarray(c) for c in caches], jnp.asarray(ids))
    want = ref.gather_blocks_reference(caches, np.clip(ids, 0, 9))
    np.testing.assert_array_equal(np.asarray(got), want)
    xla = jax.jit(lambda cs, i: jf.gather_blocks(cs, i, backend="xla"))(
        [jnp.asarray(c) for c in caches], jnp.asarray(ids))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(xla))


def test_explicit_backend_of_another_platform_exports_for_it(monkeypatch):
    """backend="pallas_tpu" (or its environment variable) traced on this CPU host: staged for
    the TPU, so a TPU export holds the Mosaic kernel; lowering for the CPU (a jitted call
    here, or an export listing "cpu") raises the registry's error naming every backend. It
    had raised at trace time, so no explicit backend could export for another platform."""
    S = jax.ShapeDtypeStruct
    kc = S((64, 16, 8, 128), jnp.bfloat16)
    args = (S((4, 16, 128), jnp.bfloat16), kc, kc, S((4, 8), jnp.int32), S((4,), jnp.int32))
    fn = jax.jit(lambda *a: jf.paged_attention(*a, backend="pallas_tpu"))
    text = jax.export.export(fn, platforms=["tpu"])(*args).mlir_module()
    assert "tpu_custom_call" in text
    assert "xla.gpu.triton" in _export_for_h100(
        jax.jit(lambda *a: jf.paged_attention(*a, backend="pallas_gpu")), args)
    refused = r"platform 'cpu': backend 'pallas_tpu' cannot run: runs on tpu, not cpu"
    with pytest.raises(jf.BackendError, match=refused) as err:
        jax.export.export(fn, platforms=["cpu", "tpu"])(*args)
    assert "  - xla: could run" in str(err.value)
    concrete = [jnp.ones(a.shape, a.dtype) for a in args]
    with pytest.raises(jf.BackendError, match=refused):
        fn(*concrete)
    with pytest.raises(jf.BackendError, match=refused):  # eager: at the call, as before
        jf.paged_attention(*concrete, backend="pallas_tpu")
    # the environment variable, and a cache op (its DMA kernel)
    monkeypatch.setenv("PREFIXKV_WRITE_KV_BACKEND", "pallas_tpu")
    rows = S((4, 8, 128), jnp.bfloat16)
    text = jax.export.export(jax.jit(jf.write_kv), platforms=["tpu"])(
        rows, rows, kc, kc, S((4,), jnp.int32)).mlir_module()
    assert "tpu_custom_call" in text
    # a backend refused on every platform still raises at trace time
    with pytest.raises(jf.BackendError, match="num_kv_heads 4 is not a multiple of 8"):
        jax.export.export(fn, platforms=["tpu"])(
            args[0], S((64, 16, 4, 128), jnp.bfloat16), S((64, 16, 4, 128), jnp.bfloat16),
            *args[3:])
