"""Contracts of torch AttentionPlan.update and of the JAX plans (jax_frontend._plan) that the
other plan tests leave open: update copies every metadata tensor, names the refused argument
and changes nothing when it refuses; a JAX plan checks int64 metadata at int32's exact bounds,
clips unchecked lengths to each table's capacity, keeps its metadata on the cache's device,
holds q and the caches to the planned shapes with value checks off, and runs the backend it
was given."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from prefixkv.paged import testing, validate  # noqa: E402
from prefixkv.paged.registry import BackendError  # noqa: E402
from torch_convert import T  # noqa: E402

from prefixkv import jax_frontend as jf  # noqa: E402
from prefixkv import torch_frontend as tf  # noqa: E402


def _same_torch(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want)


def _same_jax(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert bool(jnp.array_equal(got, want, equal_nan=True))


# ------------------------------------------------------------------- torch AttentionPlan.update


def _two_steps(seed=30):
    """Two ragged steps of the same shapes (3 sequences, 8 query tokens, 4 blocks of 16,
    tables 3 wide) whose cu_q_lens differ: the second splits the tokens otherwise."""
    rng = np.random.default_rng(seed)
    b1 = testing.make_ragged_batch(rng, [(3, 10), (1, 5), (4, 20)], max_blocks_per_seq=3,
                                   nan_fill=False)
    b2 = testing.make_ragged_batch(rng, [(1, 10), (4, 12), (3, 20)], max_blocks_per_seq=3,
                                   nan_fill=False)
    assert b1.k_cache.shape == b2.k_cache.shape
    assert not np.array_equal(b1.cu_q_lens, b2.cu_q_lens)
    return b1, b2


def test_update_copies_every_metadata_tensor():
    """cu_q_lens (the last tensor) is copied as well as the tables and lengths: the plan then
    holds exactly the next step's metadata and runs as the wrapper over it."""
    b1, b2 = _two_steps()
    meta2 = [T(a) for a in b2.args()[3:]]
    plan = tf.plan_paged_attention(*(T(a) for a in b1.args()[3:]), k_cache=T(b1.k_cache),
                                   num_q_heads=b1.q.shape[1])
    plan.update(*meta2)
    for got, want in zip(plan._meta, meta2, strict=True):
        _same_torch(got, want)
    q, k, v = T(b2.q), T(b2.k_cache), T(b2.v_cache)
    _same_torch(plan.run(q, k, v), tf.paged_attention(q, k, v, *meta2))


def test_refused_update_of_a_later_argument_changes_nothing():
    """A decode plan given cu_q_lens (the same token count, so the refusal is cu_q_lens's,
    after the tables and lengths passed): none of the new tables or lengths is copied."""
    rng = np.random.default_rng(31)
    e = testing.make_ragged_batch(rng, testing.seq_grid("decode", 16), nan_fill=False)
    meta = [T(a) for a in e.args()[3:5]]
    plan = tf.plan_paged_attention(*meta, k_cache=T(e.k_cache), num_q_heads=e.q.shape[1])
    before = [t.clone() for t in plan._meta if t is not None]
    tables = meta[0].flip(0).contiguous()
    lens = meta[1].flip(0).contiguous()
    cu = T(np.arange(meta[0].shape[0] + 1, dtype=np.int32))
    with pytest.raises(ValueError, match="cu_q_lens: given, where the plan was made without"):
        plan.update(tables, lens, cu)
    for got, want in zip([t for t in plan._meta if t is not None], before, strict=True):
        _same_torch(got, want)


def test_update_names_a_missing_cu_q_lens():
    """A plan made with cu_q_lens (one token a sequence, so the token count matches) refuses
    an update without it, naming it, and is unchanged."""
    rng = np.random.default_rng(32)
    e = testing.make_ragged_batch(rng, testing.seq_grid("decode", 16), nan_fill=False)
    tables, lens = (T(a) for a in e.args()[3:5])
    cu = T(np.arange(tables.shape[0] + 1, dtype=np.int32))
    plan = tf.plan_paged_attention(tables, lens, cu, k_cache=T(e.k_cache),
                                   num_q_heads=e.q.shape[1])
    with pytest.raises(ValueError, match="cu_q_lens: None, where the plan was made with it"):
        plan.update(tables, lens)
    _same_torch(plan._meta[2], cu)


def test_decode_plan_update_names_block_tables_for_another_batch_size():
    """A decode plan's token count is its batch size: another batch size is block_tables's
    error, with the caller's shapes (there is no cu_q_lens to name)."""
    rng = np.random.default_rng(33)
    e = testing.make_ragged_batch(rng, testing.seq_grid("decode", 16), nan_fill=False)
    tables, lens = (T(a) for a in e.args()[3:5])
    plan = tf.plan_paged_attention(tables, lens, k_cache=T(e.k_cache), num_q_heads=e.q.shape[1])
    with pytest.raises(ValueError, match=r"block_tables: shape \(\d+, \d+\), where the plan "
                                         r"was made with"):
        plan.update(tables[1:], lens[1:])


def test_update_sets_the_token_count_rule_by_its_own_checks():
    """tokens_fixed follows the last planning: a plan made with value checks off takes any
    token count until an update with checks on holds q to the checked cu_q_lens; an update
    with checks off frees it again (as the wrapper with checks off)."""
    b1, b2 = _two_steps(34)
    meta1 = [T(a) for a in b1.args()[3:]]
    meta2 = [T(a) for a in b2.args()[3:]]
    q, k, v = T(b2.q), T(b2.k_cache), T(b2.v_cache)
    longer = torch.cat([q, q[:1]])
    with validate.value_checks(False):
        plan = tf.plan_paged_attention(*meta1, k_cache=k, num_q_heads=q.shape[1])
        plan.run(longer, k, v)  # free
    plan.update(*meta2)
    with pytest.raises(ValueError, match="q: expected the planned shape"):
        plan.run(longer, k, v)
    with validate.value_checks(False):
        plan.update(*meta2)
        _same_torch(plan.run(longer, k, v), tf.paged_attention(longer, k, v, *meta2))


def test_windowed_shared_prefix_update_names_prefix_block_tables():
    """A shared-prefix plan running as paged attention over joined tables names the
    argument the caller changed, with the caller's shapes (a fix: it named the joined
    tables' block_tables, with shapes never passed)."""
    rng = np.random.default_rng(35)
    sp = testing.small_shared_prefix_batch(rng, False)
    meta = [T(a) for a in sp.args()[3:]]
    plan = tf.plan_shared_prefix_attention(*meta, k_cache=T(sp.k_cache),
                                           num_q_heads=sp.q.shape[1], sliding_window=6)
    assert plan.op == "paged_attention"
    wide = torch.cat([meta[0], meta[0][:, :1]], dim=1)  # an unused column: still valid
    with pytest.raises(ValueError, match=r"^prefix_block_tables: shape \(2, 4\), where the "
                                         r"plan was made with \(2, 3\)"):
        plan.update(wide, *meta[1:])


# ------------------------------------------------------------------------------ JAX plans


def _jax_batch(seed, grid="mixed", **kw):
    rng = np.random.default_rng(seed)
    b = testing.make_ragged_batch(rng, testing.seq_grid(grid, 16), **kw)
    return b, tuple(jnp.asarray(x) for x in (b.q, b.k_cache, b.v_cache))


def test_jax_int64_metadata_at_int32s_exact_bounds():
    """-2**31 and 2**31 - 1 fit int32 (in unused table entries the plan takes them); one past
    either bound is named with its value and index."""
    b, (q, k, v) = _jax_batch(40, max_blocks_per_seq=12)
    hq = b.q.shape[1]
    tables = b.block_tables.astype(np.int64)
    lens = b.kv_lens.astype(np.int64)
    cu = b.cu_q_lens.astype(np.int64)
    used = -(-b.kv_lens // b.k_cache.shape[1])
    row = int(np.argmin(used))
    assert used[row] + 2 <= tables.shape[1]
    edge = tables.copy()
    edge[row, -1], edge[row, -2] = 2**31 - 1, -(2**31)
    plan = jf.plan_paged_attention(edge, lens, cu, k_cache=k, num_q_heads=hq)
    np.testing.assert_array_equal(np.asarray(plan._meta[0]), edge.astype(np.int32))
    for value in (2**31, -(2**31) - 1):
        bad = tables.copy()
        bad[row, -1] = value
        with pytest.raises(ValueError, match=rf"block_tables: expected values that fit int32 "
                                             rf".*, got {value} at index \({row}, "
                                             rf"{tables.shape[1] - 1}\)"):
            jf.plan_paged_attention(bad, lens, cu, k_cache=k, num_q_heads=hq)


def test_jax_unchecked_int64_metadata_is_cast_as_given():
    """Value checks off: int64 values outside int32 are cast as they are (unchecked metadata
    is taken as given), as the torch plans do."""
    b, (q, k, v) = _jax_batch(41, max_blocks_per_seq=12)
    tables = b.block_tables.astype(np.int64)
    tables[0, -1] = 2**32 + 5
    with validate.value_checks(False):
        plan = jf.plan_paged_attention(tables, b.kv_lens.astype(np.int64),
                                       b.cu_q_lens.astype(np.int64), k_cache=k,
                                       num_q_heads=b.q.shape[1])
    assert plan._meta[0].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(plan._meta[0]), tables.astype(np.int32))


def test_jax_plan_names_num_q_heads_zero_and_bool():
    b, (q, k, v) = _jax_batch(42)
    with pytest.raises(ValueError, match="num_q_heads: expected an int >= 1, got 0"):
        jf.plan_paged_attention(*b.args()[3:], k_cache=k, num_q_heads=0)
    with pytest.raises(TypeError, match="num_q_heads: expected an int, got bool"):
        jf.plan_paged_attention(*b.args()[3:], k_cache=k, num_q_heads=True)


def test_jax_plan_names_a_malformed_cu_q_lens_as_the_wrapper():
    """cu_q_lens of another rank, or empty: the wrapper's static error, not an indexing error
    from reading its last entry."""
    b, (q, k, v) = _jax_batch(43)
    tables, lens, cu = b.args()[3:]
    for bad in (cu[None], cu[:0], cu[:, None]):
        with pytest.raises(ValueError, match="cu_q_lens: expected") as want:
            jf.paged_attention(q, k, v, tables, lens, bad)
        with pytest.raises(ValueError, match="cu_q_lens: expected") as got:
            jf.plan_paged_attention(tables, lens, bad, k_cache=k, num_q_heads=b.q.shape[1])
        assert str(got.value) == str(want.value)


def test_jax_unchecked_plan_builds_from_a_negative_token_count():
    b, (q, k, v) = _jax_batch(44)
    cu = b.cu_q_lens.copy()
    cu[-1] = -3
    with validate.value_checks(False):
        plan = jf.plan_paged_attention(b.block_tables, b.kv_lens, cu, k_cache=k,
                                       num_q_heads=b.q.shape[1])
    assert plan.op == "paged_attention"


def test_jax_unchecked_plans_hold_the_rest_of_the_shapes():
    """Value checks off: a decode plan (paged or shared-prefix) holds q to num_seqs; a ragged
    one frees only q's token count, never its heads nor the caches' block count."""
    b, (q, k, v) = _jax_batch(45, grid="decode")
    assert b.cu_q_lens is None
    rng = np.random.default_rng(45)
    sp = testing.small_shared_prefix_batch(rng, True)
    assert sp.cu_q_lens is None
    sq, sk = jnp.asarray(sp.q), jnp.asarray(sp.k_cache)
    with validate.value_checks(False):
        plan = jf.plan_paged_attention(*b.args()[3:], k_cache=k, num_q_heads=b.q.shape[1])
        splan = jf.plan_shared_prefix_attention(*sp.args()[3:], k_cache=sk,
                                                num_q_heads=sp.q.shape[1])
    with pytest.raises(ValueError, match="q: expected the planned shape"):
        plan.run(q[1:], k, v)
    assert repr(splan).startswith(f"AttentionPlan(op='shared_prefix_attention', "
                                  f"q={tuple(sp.q.shape)} float32")
    with pytest.raises(ValueError, match="q: expected the planned shape"):
        splan.run(sq[1:], sk, sk)
    b, (q, k, v) = _jax_batch(46)
    with validate.value_checks(False):
        plan = jf.plan_paged_attention(*b.args()[3:], k_cache=k, num_q_heads=b.q.shape[1])
    with pytest.raises(ValueError, match="q: expected the planned shape"):
        plan.run(jnp.concatenate([q, q], axis=1), k, v)
    with pytest.raises(ValueError, match="k_cache: expected the planned shape"):
        plan.run(q, k[:-1], v[:-1])


def test_jax_plan_run_names_a_non_array_q():
    b, (q, k, v) = _jax_batch(47)
    plan = jf.plan_paged_attention(*b.args()[3:], k_cache=k, num_q_heads=b.q.shape[1])
    with pytest.raises(TypeError, match="q: expected an array, got list"):
        plan.run([1.0], k, v)


def test_jax_unchecked_shared_prefix_plan_clips_each_length_to_its_table():
    """Value checks off: prefix_lens are clipped to the prefix table's keys and kv_lens to the
    own table's (tables of different widths here), as the wrapper clips them."""
    rng = np.random.default_rng(48)
    sp = testing.make_shared_prefix_batch(rng, [1], [(0, 1, 40), (-1, 1, 3)], block_size=8,
                                          num_q_heads=2, num_kv_heads=1, head_dim=16)
    bs = sp.k_cache.shape[1]
    assert sp.prefix_block_tables.shape[1] != sp.block_tables.shape[1]
    meta = [None if x is None else np.array(x, copy=True) for x in sp.args()[3:]]
    meta[1][0] = 2**31 - 1
    meta[4][:] = 2**31 - 1
    with validate.value_checks(False):
        plan = jf.plan_shared_prefix_attention(*meta, k_cache=jnp.asarray(sp.k_cache),
                                               num_q_heads=sp.q.shape[1])
    assert int(plan._meta[1][0]) == sp.prefix_block_tables.shape[1] * bs
    assert [int(x) for x in plan._meta[4]] == [sp.block_tables.shape[1] * bs] * 2


def test_jax_plan_metadata_is_on_the_device_as_arrays():
    b, (q, k, v) = _jax_batch(49)
    plan = jf.plan_paged_attention(*b.args()[3:], k_cache=k, num_q_heads=b.q.shape[1])
    for x in jax.tree_util.tree_leaves(plan):
        assert isinstance(x, jax.Array)
        assert x.devices() == k.devices()


def test_jax_plan_puts_the_metadata_on_the_caches_device():
    """With two host devices, a cache on the second: the plan's metadata goes there (checked
    and unchecked), not to jax's default device. A subprocess: the device count is fixed
    before jax is imported."""
    script = textwrap.dedent("""
        import numpy as np, jax, jax.numpy as jnp
        from prefixkv import jax_frontend as jf
        from prefixkv.paged import testing, validate
        dev = jax.devices()[1]
        b = testing.make_ragged_batch(np.random.default_rng(0), testing.seq_grid("mixed", 16))
        k = jax.device_put(jnp.asarray(b.k_cache), dev)
        for checks in (True, False):
            with validate.value_checks(checks):
                plan = jf.plan_paged_attention(*b.args()[3:], k_cache=k, num_q_heads=4)
            got = [x.devices() for x in jax.tree_util.tree_leaves(plan)]
            assert got == [{dev}] * 3, (checks, got)
        print("OK")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(p or "." for p in sys.path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120, cwd=os.getcwd())
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_jax_plan_made_inside_jit_with_a_traced_cache():
    """Host metadata with a traced k_cache (a plan made inside a jitted step): no device to
    read from a tracer, the metadata goes to jax's default device."""
    b, (q, k, v) = _jax_batch(50)
    got = jax.jit(lambda k: jf.plan_paged_attention(
        *b.args()[3:], k_cache=k, num_q_heads=b.q.shape[1])._meta[1])(k)
    np.testing.assert_array_equal(np.asarray(got), b.kv_lens)


@pytest.mark.parametrize("route", ["paged", "shared", "shared_window"])
def test_jax_plan_runs_the_backend_it_was_given(route):
    """The backend option reaches the op on every route: one that cannot run on this platform
    is refused by run; an unknown name already when the plan is made."""
    rng = np.random.default_rng(51)
    if route == "paged":
        b, (q, k, v) = _jax_batch(51)

        def make(backend):
            return jf.plan_paged_attention(*b.args()[3:], k_cache=k,
                                           num_q_heads=b.q.shape[1], backend=backend)
    else:
        sp = testing.small_shared_prefix_batch(rng, False)
        q, k, v = (jnp.asarray(x) for x in sp.args()[:3])

        def make(backend):
            return jf.plan_shared_prefix_attention(
                *sp.args()[3:], k_cache=k, num_q_heads=sp.q.shape[1], backend=backend,
                sliding_window=6 if route == "shared_window" else None)
    with pytest.raises(BackendError, match="unknown backend 'nope'"):
        make("nope")
    plan = make("pallas_tpu")
    with pytest.raises(BackendError, match="backend 'pallas_tpu' cannot run: runs on tpu"):
        plan.run(q, k, v)


def test_jax_shared_prefix_plan_with_a_window_keeps_the_soft_cap():
    rng = np.random.default_rng(52)
    sp = testing.small_shared_prefix_batch(rng, False)
    q, k, v = (jnp.asarray(x) for x in sp.args()[:3])
    opts = {"sliding_window": 4, "logits_soft_cap": 0.5}
    plan = jf.plan_shared_prefix_attention(*sp.args()[3:], k_cache=k,
                                           num_q_heads=sp.q.shape[1], **opts)
    assert plan.op == "paged_attention"
    _same_jax(plan.run(q, k, v), jf.shared_prefix_attention(*sp.args(), **opts))


def test_jax_plan_names_traced_static_arguments_as_the_wrapper():
    """A traced option (plan made inside jax.jit) or return_lse (run) is the wrapper's
    static-argument error, which tells how to fix it, not a dtype complaint."""
    b, (q, k, v) = _jax_batch(53)
    hq = b.q.shape[1]
    with pytest.raises(TypeError, match="sliding_window: a static argument"):
        jax.jit(lambda w: jf.plan_paged_attention(*b.args()[3:], k_cache=k, num_q_heads=hq,
                                                  sliding_window=w))(3)
    plan = jf.plan_paged_attention(*b.args()[3:], k_cache=k, num_q_heads=hq)
    with pytest.raises(TypeError, match="return_lse: a static argument"):
        jax.jit(lambda r: plan.run(q, k, v, return_lse=r))(True)
