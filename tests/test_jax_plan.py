"""Attention plans of the JAX frontend (jax_frontend._plan): ``plan.run`` gives the wrapper's
result exactly, eagerly and with the plan passed into ``jax.jit`` as a pytree; the metadata is
checked once, on the host; every refused argument is named."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from prefixkv.paged import reference as ref  # noqa: E402
from prefixkv.paged import testing, validate  # noqa: E402
from prefixkv.paged.spec import ATTENTION_TOLERANCE  # noqa: E402

from prefixkv import jax_frontend as jf  # noqa: E402


def _same(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert bool(jnp.array_equal(got, want, equal_nan=True))


def _close(got, want, dtype):
    atol, rtol = ATTENTION_TOLERANCE[dtype]
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                               atol=atol, rtol=rtol)


@pytest.mark.parametrize("grid,dtype,opts", [
    ("mixed", "float32", {}),
    ("decode", "bfloat16", {"sliding_window": 7, "logits_soft_cap": 5.0}),
    ("prefill", "float16", {"causal": False, "scale": 0.2}),
])
def test_plan_runs_equal_the_wrapper_eager_and_jitted(grid, dtype, opts):
    rng = np.random.default_rng(len(grid))
    b = testing.make_ragged_batch(rng, testing.seq_grid(grid, 16), dtype=dtype,
                                  sliding_window=opts.get("sliding_window"))
    q, k, v = (jnp.asarray(x) for x in (b.q, b.k_cache, b.v_cache))
    plan = jf.plan_paged_attention(b.block_tables, b.kv_lens, b.cu_q_lens, k_cache=k,
                                   num_q_heads=b.q.shape[1], **opts)
    assert plan.op == "paged_attention"
    want, want_lse = jf.paged_attention(*b.args(), return_lse=True, **opts)
    got, got_lse = plan.run(q, k, v, return_lse=True)
    _same(got, want)
    _same(got_lse, want_lse)
    jitted = jax.jit(lambda p, q, k, v: p(q, k, v))(plan, q, k, v)
    _close(jitted, want, dtype)
    _close(got, ref.paged_attention_reference(*b.args(), **opts), dtype)


def test_plan_is_a_pytree_that_jit_reuses():
    """Two steps' plans of the same shapes: one trace; their metadata are the leaves."""
    rng = np.random.default_rng(1)
    grid = testing.seq_grid("mixed", 16)
    b1, b2 = (testing.make_ragged_batch(rng, grid, max_blocks_per_seq=12, nan_fill=False)
              for _ in range(2))
    traces = []

    @jax.jit
    def step(plan, q, k, v):
        traces.append(1)
        return plan.run(q, k, v)

    for b in (b1, b2):
        q, k, v = (jnp.asarray(x) for x in (b.q, b.k_cache, b.v_cache))
        plan = jf.plan_paged_attention(b.block_tables, b.kv_lens, b.cu_q_lens, k_cache=k,
                                       num_q_heads=b.q.shape[1])
        assert len(jax.tree_util.tree_leaves(plan)) == 3
        _close(step(plan, q, k, v), ref.paged_attention_reference(*b.args()), "float32")
    assert len(traces) == 1


def test_plan_run_does_not_check_values_again(monkeypatch):
    rng = np.random.default_rng(2)
    b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 8), block_size=8)
    q, k, v = (jnp.asarray(x) for x in (b.q, b.k_cache, b.v_cache))
    plan = jf.plan_paged_attention(b.block_tables, b.kv_lens, b.cu_q_lens, k_cache=k,
                                   num_q_heads=b.q.shape[1])
    want = plan.run(q, k, v)

    def refuse(*a, **kw):
        raise AssertionError("checked again")

    for name in ("check_ragged_values", "check_paged_attention_values",
                 "check_cumulative_lens"):
        monkeypatch.setattr(validate, name, refuse)
    _same(plan.run(q, k, v), want)


def test_plan_refuses_bad_metadata_and_names_run_mismatches():
    rng = np.random.default_rng(3)
    b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 16))
    q, k, v = (jnp.asarray(x) for x in (b.q, b.k_cache, b.v_cache))
    hq = b.q.shape[1]
    tables = b.block_tables.copy()
    tables[0, 0] = b.k_cache.shape[0]
    with pytest.raises(ValueError, match="block_tables"):
        jf.plan_paged_attention(tables, b.kv_lens, b.cu_q_lens, k_cache=k, num_q_heads=hq)
    with pytest.raises(ValueError, match="cu_q_lens"):
        jf.plan_paged_attention(b.block_tables, b.kv_lens, b.cu_q_lens[::-1].copy(),
                                k_cache=k, num_q_heads=hq)
    with pytest.raises(TypeError, match="num_q_heads"):
        jf.plan_paged_attention(b.block_tables, b.kv_lens, b.cu_q_lens, k_cache=k,
                                num_q_heads=4.0)
    with pytest.raises(ValueError, match="num_q_heads: expected an int >= 1, got -2"):
        jf.plan_paged_attention(b.block_tables, b.kv_lens, b.cu_q_lens, k_cache=k,
                                num_q_heads=-2)
    for bad in (np.int32, "nope"):
        with pytest.raises(TypeError, match="dtype: expected q's dtype, one of float32"):
            jf.plan_paged_attention(b.block_tables, b.kv_lens, b.cu_q_lens, k_cache=k,
                                    num_q_heads=hq, dtype=bad)
    with pytest.raises(TypeError, match="k_cache"):
        jf.plan_paged_attention(b.block_tables, b.kv_lens, b.cu_q_lens, k_cache=[1],
                                num_q_heads=hq)
    with pytest.raises(ValueError, match="dtype: required"):
        jf.plan_paged_attention(b.block_tables, b.kv_lens, b.cu_q_lens,
                                k_cache=k.astype(jnp.float8_e4m3fn), num_q_heads=hq)
    with pytest.raises(TypeError, match="sliding_window"):
        jax.jit(lambda w: jf.plan_paged_attention(b.block_tables, b.kv_lens, b.cu_q_lens,
                                                  k_cache=k, num_q_heads=hq,
                                                  sliding_window=w))(3)
    with pytest.raises(TypeError, match="cu_q_lens: a plan is made outside jax.jit"):
        jax.jit(lambda cu: jf.plan_paged_attention(b.block_tables, b.kv_lens, cu, k_cache=k,
                                                   num_q_heads=hq))(b.cu_q_lens)
    plan = jf.plan_paged_attention(b.block_tables, b.kv_lens, b.cu_q_lens, k_cache=k,
                                   num_q_heads=hq)
    with pytest.raises(ValueError, match="q: expected the planned shape"):
        plan.run(q[1:], k, v)
    with pytest.raises(TypeError, match="q: expected the planned float32"):
        plan.run(q.astype(jnp.bfloat16), k, v)
    with pytest.raises(ValueError, match="k_cache: expected the planned shape"):
        plan.run(q, k[:-1], v)
    with pytest.raises(TypeError, match="v_cache: expected the planned float32"):
        plan.run(q, k, v.astype(jnp.float16))
    with pytest.raises(ValueError, match="sinks"):
        plan.run(q, k, v, sinks=jnp.zeros(hq + 1))
    with pytest.raises(ValueError, match="k_scale"):
        plan.run(q, k, v, k_scale=2.0)
    with pytest.raises(TypeError, match="return_lse"):
        jax.jit(lambda r: plan.run(q, k, v, return_lse=r))(True)


def test_plans_take_int64_metadata():
    rng = np.random.default_rng(4)
    b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 16))
    q, k, v = (jnp.asarray(x) for x in (b.q, b.k_cache, b.v_cache))
    meta64 = [x.astype(np.int64) for x in b.args()[3:]]
    with pytest.raises(TypeError, match="int32"):
        jf.paged_attention(q, k, v, *meta64)
    plan = jf.plan_paged_attention(*meta64, k_cache=k, num_q_heads=b.q.shape[1])
    _same(plan.run(q, k, v), jf.paged_attention(*b.args()))
    wide = meta64[0].copy()
    wide[1, 0] += 2**32
    with pytest.raises(ValueError, match=r"block_tables: expected values that fit int32 .*, "
                                         r"got \d+ at index \(1, 0\)"):
        jf.plan_paged_attention(wide, *meta64[1:], k_cache=k, num_q_heads=b.q.shape[1])
    # a list cu_q_lens is named, as by the op (it had been an AttributeError)
    for plan_cu in (list(b.cu_q_lens), tuple(b.cu_q_lens)):
        with pytest.raises(TypeError, match="cu_q_lens: expected an array, got"):
            jf.plan_paged_attention(*b.args()[3:5], plan_cu, k_cache=k,
                                    num_q_heads=b.q.shape[1])


def test_plan_with_unchecked_lengths_clips_them():
    """Value checks off: like the wrapper, the plan clips kv_lens to the table's keys and does
    not hold q to cu_q_lens's last entry."""
    rng = np.random.default_rng(5)
    b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 16))
    q, k, v = (jnp.asarray(x) for x in (b.q, b.k_cache, b.v_cache))
    with validate.value_checks(False):
        plan = jf.plan_paged_attention(b.block_tables, b.kv_lens, b.cu_q_lens, k_cache=k,
                                       num_q_heads=b.q.shape[1])
        _same(plan.run(q, k, v), jf.paged_attention(*b.args()))
        huge = b.kv_lens.copy()
        huge[0] = 2**31 - 1
        clipped = jf.plan_paged_attention(b.block_tables, huge, b.cu_q_lens, k_cache=k,
                                          num_q_heads=b.q.shape[1])
        assert int(clipped._meta[1][0]) == b.block_tables.shape[1] * b.k_cache.shape[1]
        plan.run(jnp.concatenate([q, q[:1]]), k, v)  # bounded: garbage in, no crash


@pytest.mark.parametrize("opts", [{}, {"sliding_window": 6}, {"logits_soft_cap": 2.0}],
                         ids=lambda o: ",".join(o) or "default")
def test_shared_prefix_plan_equals_the_wrapper(opts):
    rng = np.random.default_rng(6)
    sp = testing.small_shared_prefix_batch(rng, False)
    q, k, v = (jnp.asarray(x) for x in sp.args()[:3])
    plan = jf.plan_shared_prefix_attention(*sp.args()[3:], k_cache=k,
                                           num_q_heads=sp.q.shape[1], **opts)
    assert plan.op == ("paged_attention" if "sliding_window" in opts
                       else "shared_prefix_attention")
    want, want_lse = jf.shared_prefix_attention(*sp.args(), return_lse=True, **opts)
    got, got_lse = plan.run(q, k, v, return_lse=True)
    _same(got, want)
    _same(got_lse, want_lse)
    _close(jax.jit(lambda p, q, k, v: p(q, k, v))(plan, q, k, v), want, "float32")
    _close(got, ref.shared_prefix_attention_reference(*sp.args(), **opts), "float32")
    bad = [np.array(x, copy=True) for x in sp.args()[3:]]
    bad[1][0] += 1
    with pytest.raises(ValueError, match="prefix_lens"):
        jf.plan_shared_prefix_attention(*bad, k_cache=k, num_q_heads=sp.q.shape[1], **opts)


def test_plan_per_layer_fp8_scales_and_sinks():
    rng = np.random.default_rng(7)
    b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 16), nan_fill=False)
    q = jnp.asarray(b.q).astype(jnp.bfloat16)
    k8 = jnp.asarray(b.k_cache).astype(jnp.float8_e4m3fn)
    v8 = jnp.asarray(b.v_cache).astype(jnp.float8_e4m3fn)
    plan = jf.plan_paged_attention(*b.args()[3:], k_cache=k8, num_q_heads=b.q.shape[1],
                                   dtype=jnp.bfloat16)
    for ks, vs, sinks in [(None, None, None), (0.5, 2.0, jnp.linspace(-1, 1, b.q.shape[1]))]:
        want = jf.paged_attention(q, k8, v8, *b.args()[3:], k_scale=ks, v_scale=vs,
                                  sinks=sinks)
        _same(plan.run(q, k8, v8, k_scale=ks, v_scale=vs, sinks=sinks), want)


@pytest.mark.parametrize("backend", ["nope", ""])
def test_plans_refuse_an_unknown_backend_when_made(backend):
    """A plan took any backend name and failed at its first run (in a jitted step, far from
    where the name was given); "" was taken as no request."""
    from prefixkv.paged.registry import BackendError

    k = jnp.zeros((8, 4, 2, 16), jnp.float32)
    tables, lens = np.array([[0, 1], [2, 3]], np.int32), np.array([5, 6], np.int32)
    with pytest.raises(BackendError, match=rf"^paged_attention on platform 'cpu': unknown "
                                           rf"backend '{backend}'"):
        jf.plan_paged_attention(tables, lens, None, k_cache=k, num_q_heads=4, backend=backend)
    with pytest.raises(BackendError, match=r"^shared_prefix_attention .*unknown backend"):
        jf.plan_shared_prefix_attention(
            np.array([[0]], np.int32), np.array([4], np.int32), np.array([0, 0], np.int32),
            tables, lens, None, k_cache=k, num_q_heads=4, backend=backend)


def test_tensor_parallel_helpers_check_their_mesh_and_layout():
    """A None mesh failed when the returned function first ran (AttributeError, naming
    nothing); kv_head_specs took any layout and axis."""
    from jax.sharding import Mesh

    with pytest.raises(TypeError, match=r"^mesh: expected a jax.sharding.Mesh, got NoneType"):
        jf.tensor_parallel_paged_attention(None)
    with pytest.raises(TypeError, match=r"^mesh: expected a jax.sharding.Mesh"):
        jf.tensor_parallel_write_kv("tp")
    mesh = Mesh(np.array(jax.devices()[:1]), ("tp",))
    with pytest.raises(ValueError, match=r"^axis: expected one of the mesh axes \('tp',\)"):
        jf.tensor_parallel_write_kv(mesh, axis="x")
    with pytest.raises(ValueError, match=r"^kv_layout: expected one of 'NHD', 'HND', got 'XYZ'"):
        jf.kv_head_specs("tp", kv_layout="XYZ")
    with pytest.raises(TypeError, match=r"^axis: expected a mesh axis name \(str\), got int"):
        jf.kv_head_specs(3)
    assert jf.kv_head_specs("tp", kv_layout="HND")["cache"] == jax.sharding.PartitionSpec(
        None, "tp", None, None)


def test_tensor_parallel_helpers_check_their_config_when_made():
    """A misspelt keyword or a NaN scale failed only at the helper's first call."""
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:1]), ("tp",))
    with pytest.raises(TypeError, match=r"^scalee: not a keyword argument of paged_attention"):
        jf.tensor_parallel_paged_attention(mesh, scalee=0.5)
    with pytest.raises(ValueError, match=r"^scale: expected a finite value > 0, got nan"):
        jf.tensor_parallel_paged_attention(mesh, scale=float("nan"))
    with pytest.raises(TypeError, match=r"^causal: expected a bool, got NoneType"):
        jf.tensor_parallel_paged_attention(mesh, causal=None)
    with pytest.raises(TypeError, match=r"^scale: not a keyword argument of write_kv"):
        jf.tensor_parallel_write_kv(mesh, scale=0.5)


def test_explain_backends_names_an_unknown_platform_or_keyword():
    """Both were ignored: "runs on tpu, not bogus" for every backend, or an answer as if the
    keyword were not given."""
    with pytest.raises(ValueError, match=r"^platform: expected one of cpu, cuda, rocm, tpu"):
        jf.explain_backends("paged_attention", platform="bogus")
    with pytest.raises(ValueError, match=r"^headdim: not a keyword explain_backends takes"):
        jf.explain_backends("paged_attention", "tpu", headdim=128)
    assert jf.explain_backends("hash_blocks", "tpu", block_size=16)["pallas_tpu"] == "ok"


def test_unknown_backend_names_the_registry_platform_of_a_gpu():
    """A plan's unknown-backend error reasons about the registry's platform: a GPU device's
    platform is "gpu" to JAX and "cuda" / "rocm" to the registry, so every backend was
    refused as "not gpu" (xla too), and an abstract cache took jax's default backend, not its
    default device."""
    kc = jax.ShapeDtypeStruct((8, 16, 2, 64), np.float32)
    with jax.default_device("gpu"), pytest.raises(jf.BackendError) as err:
        jf.plan_paged_attention(np.zeros((1, 1), np.int32), np.ones(1, np.int32), k_cache=kc,
                                num_q_heads=4, backend="bogus")
    assert "on platform 'cuda'" in str(err.value) and "not gpu" not in str(err.value)
