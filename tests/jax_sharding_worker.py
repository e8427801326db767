"""Run by tests/test_jax_sharding.py in a subprocess with 4 host devices (XLA_FLAGS must be set
before jax is imported). Prints OK lines; any failure raises."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from prefixkv.paged import reference as ref  # noqa: E402
from prefixkv.paged import testing  # noqa: E402

from prefixkv import jax_frontend as jf  # noqa: E402


def main(backend: str | None) -> None:
    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("tp",))
    spec = jf.kv_head_specs("tp")
    rng = np.random.default_rng(0)
    hd = 128 if backend == "pallas_interpret" else 32
    seqs = testing.seq_grid("mixed", 8)[:4] if backend else testing.seq_grid("mixed", 8)
    b = testing.make_ragged_batch(rng, seqs, num_q_heads=16, num_kv_heads=4,
                                  head_dim=hd, block_size=8, sliding_window=11)
    put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))  # noqa: E731
    q, kc, vc = put(b.q, spec["q"]), put(b.k_cache, spec["cache"]), put(b.v_cache, spec["cache"])
    kw = dict(sliding_window=11, return_lse=True)
    if backend:
        kw["backend"] = backend
    attn = jax.jit(jf.tensor_parallel_paged_attention(mesh, "tp", **kw))
    out, lse = attn(q, kc, vc, b.block_tables, b.kv_lens, b.cu_q_lens)
    assert out.sharding.spec == spec["q"], out.sharding
    want, want_lse = ref.paged_attention_reference(*b.args(), sliding_window=11, return_lse=True)
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=2e-5)
    fin = np.isfinite(want_lse)
    np.testing.assert_allclose(np.asarray(lse)[fin], want_lse[fin], atol=1e-4, rtol=1e-5)
    print("OK attention", backend)
    if backend:
        return
    # attention sinks: one logit per q head, sharded with the q heads
    sinks = (3 * rng.standard_normal(16)).astype(np.float32)
    attn = jax.jit(jf.tensor_parallel_paged_attention(mesh, "tp", sinks=sinks, **kw))
    out, lse = attn(q, kc, vc, b.block_tables, b.kv_lens, b.cu_q_lens)
    want, want_lse = ref.paged_attention_reference(*b.args(), sliding_window=11,
                                                   return_lse=True, sinks=sinks)
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(lse), want_lse, atol=1e-4, rtol=1e-5)
    print("OK attention sinks")
    key = testing.random_values(rng, (3, 4, hd), "float32")
    slots = np.array([9, -1, 30], np.int32)
    want_k, want_v = ref.write_kv_reference(key, key, b.k_cache, b.v_cache, slots)
    write = jax.jit(jf.tensor_parallel_write_kv(mesh, "tp"), donate_argnums=(2, 3))
    ptrs = [s.data.unsafe_buffer_pointer() for s in kc.addressable_shards]
    nk, nv = write(put(key, spec["q"]), put(key, spec["q"]), kc, vc, slots)
    assert kc.is_deleted()
    assert [s.data.unsafe_buffer_pointer() for s in nk.addressable_shards] == ptrs
    np.testing.assert_array_equal(np.asarray(nk), want_k)
    np.testing.assert_array_equal(np.asarray(nv), want_v)
    print("OK write_kv")
    user_shard_map_default_check_vma(mesh, spec, put, rng)
    unsharded_inputs(b, key, slots, want_k, want_v)
    try:
        jf.tensor_parallel_paged_attention(jax.make_mesh((4,), ("tp",)), "tp")(
            b.q[:, :12], b.k_cache[:, :, :3], b.v_cache[:, :, :3], b.block_tables, b.kv_lens,
            b.cu_q_lens)
    except ValueError as e:
        assert "num_kv_heads=3 must be divisible by the size of mesh axis 'tp' (4)" in str(e)
        print("OK error")


def unsharded_inputs(b, key, slots, want_k, want_v) -> None:
    """Inputs not laid out yet (plain arrays), over jax.make_mesh's default mesh (Explicit
    axes from jax 0.7 on, whose shard_map refused them) and over an Auto one: the helpers
    lay them out."""
    kinds = {"default": None}
    if hasattr(jax.sharding, "AxisType"):
        kinds["auto"] = (jax.sharding.AxisType.Auto,)
    want = ref.paged_attention_reference(*b.args(), sliding_window=11)
    for name, axis_types in kinds.items():
        mesh = jax.make_mesh((4,), ("tp",), axis_types=axis_types)
        attn = jax.jit(jf.tensor_parallel_paged_attention(mesh, "tp", sliding_window=11))
        out = attn(*map(jax.numpy.asarray, b.args()))
        np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=2e-5)
        write = jax.jit(jf.tensor_parallel_write_kv(mesh, "tp"))
        nk, nv = write(key, key, b.k_cache, b.v_cache, slots)
        np.testing.assert_array_equal(np.asarray(nk), want_k)
        np.testing.assert_array_equal(np.asarray(nv), want_v)
        print("OK unsharded", name)


def user_shard_map_default_check_vma(mesh, spec, put, rng) -> None:
    """The ops inside a user's own jax.shard_map with its default check_vma=True: the loop
    carries, FFI results and Pallas outputs (TPU/GPU branches are traced too) must declare the
    mesh axes they vary over."""
    from jax.sharding import PartitionSpec as P

    rep = spec["replicated"]
    sp = testing.make_shared_prefix_batch(rng, [3, 2], [(0, 1, 5), (1, 1, 9), (-1, 1, 4),
                                                        (0, 1, 1)],
                                          num_q_heads=16, num_kv_heads=4, head_dim=32,
                                          block_size=8, decode=True)
    a = sp.args()
    shared = jax.jit(jax.shard_map(
        lambda q, k, v, *rest: jf.shared_prefix_attention(q, k, v, *rest), mesh=mesh,
        in_specs=(spec["q"], spec["cache"], spec["cache"], rep, rep, rep, rep, rep),
        out_specs=spec["q"]))
    got = shared(put(a[0], spec["q"]), put(a[1], spec["cache"]), put(a[2], spec["cache"]),
                 *(put(x, rep) for x in a[3:8]))
    np.testing.assert_allclose(np.asarray(got), ref.shared_prefix_attention_reference(*a),
                               atol=2e-5, rtol=2e-5)
    decode = jax.jit(jax.shard_map(
        lambda q, k, v, bt, kl: jf.paged_attention(q, k, v, bt, kl), mesh=mesh,
        in_specs=(spec["q"], spec["cache"], spec["cache"], rep, rep), out_specs=spec["q"]))
    db = testing.make_ragged_batch(rng, [(1, 20), (1, 3), (1, 1)], num_q_heads=16,
                                   num_kv_heads=4, head_dim=32, block_size=8, decode=True)
    dq, dk, dv, dbt, dkl = db.args()[:5]
    got = decode(put(dq, spec["q"]), put(dk, spec["cache"]), put(dv, spec["cache"]),
                 put(dbt, rep), put(dkl, rep))
    np.testing.assert_allclose(np.asarray(got), ref.paged_attention_reference(*db.args()),
                               atol=2e-5, rtol=2e-5)
    caches = [put(c, spec["cache"]) for c in (db.k_cache, db.v_cache)]
    ids, dst = np.array([2, 0], np.int32), np.array([5, 6], np.int32)
    buf_spec = P(None, None, None, "tp")
    ops = jax.jit(jax.shard_map(
        lambda cs, i, d: (jf.gather_blocks(cs, i), jf.copy_blocks(cs, i, d),
                          jf.scatter_blocks(cs, jf.gather_blocks(cs, d), i)),
        mesh=mesh, in_specs=([spec["cache"]] * 2, rep, rep),
        out_specs=(buf_spec, [spec["cache"]] * 2, [spec["cache"]] * 2)))
    buf, copied, scattered = ops(caches, put(ids, rep), put(dst, rep))
    host = [db.k_cache, db.v_cache]
    np.testing.assert_array_equal(np.asarray(buf), ref.gather_blocks_reference(host, ids))
    for g, w in zip(copied, ref.copy_blocks_reference(host, ids, dst), strict=True):
        np.testing.assert_array_equal(np.asarray(g), w)
    moved = ref.scatter_blocks_reference(host, ref.gather_blocks_reference(host, dst), ids)
    for g, w in zip(scattered, moved, strict=True):
        np.testing.assert_array_equal(np.asarray(g), w)
    print("OK check_vma")


def hnd() -> None:
    """HND caches sharded on their dim 1: one kv head per device (TPU tensor parallelism), the
    TPU kernel (interpret mode) and the XLA path; write_kv donated, in place."""
    mesh = jax.make_mesh((4,), ("tp",))
    spec = jf.kv_head_specs("tp", "HND")
    assert spec["cache"] == jax.sharding.PartitionSpec(None, "tp", None, None)
    rng = np.random.default_rng(1)
    b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 8)[:4], num_q_heads=8,
                                  num_kv_heads=4, head_dim=128, block_size=8)
    put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))  # noqa: E731
    swap = lambda c: np.ascontiguousarray(np.swapaxes(c, 1, 2))  # noqa: E731
    kc, vc = put(swap(b.k_cache), spec["cache"]), put(swap(b.v_cache), spec["cache"])
    q = put(b.q, spec["q"])
    want = ref.paged_attention_reference(*b.args())
    for backend in ("pallas_interpret", "xla"):
        attn = jax.jit(jf.tensor_parallel_paged_attention(mesh, "tp", kv_layout="HND",
                                                          backend=backend))
        out = attn(q, kc, vc, b.block_tables, b.kv_lens, b.cu_q_lens)
        np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=2e-5)
        print("OK hnd attention", backend)
    key = testing.random_values(rng, (3, 4, 128), "float32")
    slots = np.array([9, -1, 30], np.int32)
    want_k, want_v = ref.write_kv_reference(key, key, b.k_cache, b.v_cache, slots)
    write = jax.jit(jf.tensor_parallel_write_kv(mesh, "tp", kv_layout="HND"),
                    donate_argnums=(2, 3))
    ptrs = [s.data.unsafe_buffer_pointer() for s in kc.addressable_shards]
    nk, nv = write(put(key, spec["q"]), put(key, spec["q"]), kc, vc, slots)
    assert [s.data.unsafe_buffer_pointer() for s in nk.addressable_shards] == ptrs
    np.testing.assert_array_equal(np.asarray(nk), swap(want_k))
    np.testing.assert_array_equal(np.asarray(nv), swap(want_v))
    print("OK hnd write_kv")


def plain_jit() -> None:
    """The ops under plain jax.jit (no shard_map) with caches sharded over their kv heads, on
    meshes of Auto axes (custom_partitioning) and Explicit ones (shard_map from the types):
    results right, sharded like q, and no all-gather in the compiled program (the caches are
    never gathered onto one device); write_kv donated updates every device's shard in place."""
    from jax.sharding import PartitionSpec as P

    rng = np.random.default_rng(2)
    b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 8), num_q_heads=16,
                                  num_kv_heads=4, head_dim=32, block_size=8, sliding_window=11)
    sinks = (3 * rng.standard_normal(16)).astype(np.float32)
    want, want_lse = ref.paged_attention_reference(*b.args(), sliding_window=11,
                                                   return_lse=True, sinks=sinks)
    sp = testing.make_shared_prefix_batch(rng, [3, 2], [(0, 1, 5), (1, 3, 9), (-1, 2, 4),
                                                        (0, 1, 1)],
                                          num_q_heads=16, num_kv_heads=4, head_dim=32,
                                          block_size=8)
    want_sp = ref.shared_prefix_attention_reference(*sp.args())
    key = testing.random_values(rng, (3, 4, 32), "float32")
    slots = np.array([9, -1, 30], np.int32)
    want_k, want_v = ref.write_kv_reference(key, key, b.k_cache, b.v_cache, slots)
    kinds = {"auto": jax.sharding.AxisType.Auto, "explicit": jax.sharding.AxisType.Explicit}
    for name, axis_type in kinds.items():
        mesh = jax.make_mesh((4,), ("tp",), axis_types=(axis_type,))
        for layout in ("NHD", "HND"):
            spec = jf.kv_head_specs("tp", layout)
            put = lambda x, s, mesh=mesh: jax.device_put(x, NamedSharding(mesh, s))  # noqa: E731
            lay = (lambda c: np.ascontiguousarray(np.swapaxes(c, 1, 2))) if layout == "HND" \
                else (lambda c: c)
            q, kc, vc = put(b.q, spec["q"]), put(lay(b.k_cache), spec["cache"]), put(
                lay(b.v_cache), spec["cache"])
            rep = [put(x, P()) for x in (b.block_tables, b.kv_lens, b.cu_q_lens)]
            attn = jax.jit(lambda *a, layout=layout: jf.paged_attention(
                *a, sliding_window=11, return_lse=True, sinks=sinks, kv_layout=layout))
            with jax.set_mesh(mesh):
                out, lse = attn(q, kc, vc, *rep)
                hlo = attn.lower(q, kc, vc, *rep).compile().as_text()
            assert "all-gather" not in hlo, (name, layout)
            assert out.sharding.spec[1] == "tp", out.sharding
            np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=2e-5)
            np.testing.assert_allclose(np.asarray(lse), want_lse, atol=1e-4, rtol=1e-5)
            a = sp.args()
            shared = jax.jit(lambda *a, layout=layout: jf.shared_prefix_attention(
                *a, kv_layout=layout))
            sargs = (put(a[0], spec["q"]), put(lay(a[1]), spec["cache"]),
                     put(lay(a[2]), spec["cache"]), *(put(x, P()) for x in a[3:]))
            with jax.set_mesh(mesh):
                got = shared(*sargs)
                hlo = shared.lower(*sargs).compile().as_text()
            assert "all-gather" not in hlo, (name, layout)
            np.testing.assert_allclose(np.asarray(got), want_sp, atol=2e-5, rtol=2e-5)
            write = jax.jit(lambda *a, layout=layout: jf.write_kv(*a, kv_layout=layout),
                            donate_argnums=(2, 3))
            kc2, vc2 = put(lay(b.k_cache), spec["cache"]), put(lay(b.v_cache), spec["cache"])
            ptrs = [s.data.unsafe_buffer_pointer() for s in kc2.addressable_shards]
            with jax.set_mesh(mesh):
                nk, nv = write(put(key, spec["q"]), put(key, spec["q"]), kc2, vc2,
                               put(slots, P()))
            assert nk.sharding.is_equivalent_to(NamedSharding(mesh, spec["cache"]), 4), (
                nk.sharding)
            assert [s.data.unsafe_buffer_pointer() for s in nk.addressable_shards] == ptrs
            np.testing.assert_array_equal(np.asarray(nk), lay(want_k))
            np.testing.assert_array_equal(np.asarray(nv), lay(want_v))
            # block copies: a block's elements copy independently, so each device copies
            # its heads' part of the blocks
            ids, dst = np.array([2, 0], np.int32), np.array([5, 6], np.int32)
            ops = jax.jit(lambda cs, i, d: (jf.gather_blocks(cs, i), jf.copy_blocks(cs, i, d),
                                            jf.scatter_blocks(cs, jf.gather_blocks(cs, d), i)))
            caches = [put(lay(b.k_cache), spec["cache"]), put(lay(b.v_cache), spec["cache"])]
            bargs = (caches, put(ids, P()), put(dst, P()))
            with jax.set_mesh(mesh):
                buf, copied, scattered = ops(*bargs)
                hlo = ops.lower(*bargs).compile().as_text()
            assert "all-gather" not in hlo, (name, layout)
            assert buf.sharding.spec[3 if layout == "NHD" else 2] == "tp", buf.sharding
            host = [lay(b.k_cache), lay(b.v_cache)]
            np.testing.assert_array_equal(np.asarray(buf), ref.gather_blocks_reference(host, ids))
            for g, w in zip(copied, ref.copy_blocks_reference(host, ids, dst), strict=True):
                np.testing.assert_array_equal(np.asarray(g), w)
            moved = ref.scatter_blocks_reference(host, ref.gather_blocks_reference(host, dst),
                                                 ids)
            for g, w in zip(scattered, moved, strict=True):
                np.testing.assert_array_equal(np.asarray(g), w)
            print("OK plain jit", name, layout)
    # a 2 x 2 mesh, the heads over "tp" only, q given unsharded: each device runs its 2 kv
    # heads, q is sliced (not gathered), the output comes back sharded over "tp"
    mesh = jax.make_mesh((2, 2), ("dp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    cache_spec = NamedSharding(mesh, P(None, None, "tp", None))
    attn = jax.jit(lambda *a: jf.paged_attention(*a, sliding_window=11))
    args = (b.q, jax.device_put(b.k_cache, cache_spec), jax.device_put(b.v_cache, cache_spec),
            *b.args()[3:])
    out = attn(*args)  # no mesh set: the arrays' shardings alone
    hlo = attn.lower(*args).compile().as_text()
    assert "all-gather" not in hlo and out.sharding.spec[1] == "tp", out.sharding
    np.testing.assert_allclose(np.asarray(out), ref.paged_attention_reference(
        *b.args(), sliding_window=11), atol=2e-5, rtol=2e-5)
    print("OK plain jit 2d mesh")
    # a plan run under plain jit: the same partitioned path
    plan = jf.plan_paged_attention(b.block_tables, b.kv_lens, b.cu_q_lens, k_cache=b.k_cache,
                                   num_q_heads=16, sliding_window=11)
    run = jax.jit(lambda p, q, k, v: p.run(q, k, v))
    args = (plan, b.q, jax.device_put(b.k_cache, cache_spec),
            jax.device_put(b.v_cache, cache_spec))
    with jax.set_mesh(mesh):
        got = run(*args)
        hlo = run.lower(*args).compile().as_text()
    assert "all-gather" not in hlo
    np.testing.assert_array_equal(np.asarray(got), np.asarray(out))
    print("OK plain jit plan")
    # jax.export cannot serialize a custom_partitioning; PREFIXKV_JAX_PARTITION=0 exports
    shaped = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for x in args[2:]]
    tables = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in b.args()[3:]]
    export = jax.export.export(jax.jit(jf.paged_attention), platforms=["tpu"])
    os.environ["PREFIXKV_JAX_PARTITION"] = "0"
    try:
        assert export(jax.ShapeDtypeStruct(b.q.shape, b.q.dtype), *shaped, *tables).out_avals
    finally:
        del os.environ["PREFIXKV_JAX_PARTITION"]
    print("OK plain jit export")
    # vmap under jit on several devices: custom_partitioning has no batching rule, so a
    # batched call runs as it is (it did before)
    stacked = [np.stack([x] * 2) for x in b.args()[:6]]
    got = jax.jit(jax.vmap(lambda *x: jf.paged_attention(*x, sliding_window=11)))(*stacked)
    np.testing.assert_allclose(np.asarray(got[1]), ref.paged_attention_reference(
        *b.args(), sliding_window=11), atol=2e-5, rtol=2e-5)
    print("OK plain jit vmap")
    # layers under lax.scan (stacked caches, metadata as numpy constants): partitioned too
    layers = NamedSharding(mesh, P(None, None, None, "tp", None))
    kcs = jax.device_put(np.stack([b.k_cache] * 2), layers)
    vcs = jax.device_put(np.stack([b.v_cache] * 2), layers)

    def layer(q, kv):
        return q, jf.paged_attention(q, *kv, *b.args()[3:6], sliding_window=11)

    scan = jax.jit(lambda q, k, v: jax.lax.scan(layer, q, (k, v))[1])
    got = scan(b.q, kcs, vcs)
    assert "all-gather" not in scan.lower(b.q, kcs, vcs).compile().as_text()
    np.testing.assert_allclose(np.asarray(got[1]), ref.paged_attention_reference(
        *b.args(), sliding_window=11), atol=2e-5, rtol=2e-5)
    print("OK plain jit scan")
    # caches of differing block shapes: not split (whole on every device), still right; over
    # Explicit axes inside a shard_map all the same (the TPU branch's kernels need Manual axes)
    other = testing.random_values(rng, (b.k_cache.shape[0], 4, 4, 8), "float32")
    ids, dst = np.array([1, 2], np.int32), np.array([5, 6], np.int32)
    want = ref.copy_blocks_reference([b.k_cache, other], ids, dst)
    for axis_type in (jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit):
        mesh = jax.make_mesh((4,), ("tp",), axis_types=(axis_type,))
        heads = NamedSharding(mesh, P(None, None, "tp", None))
        with jax.set_mesh(mesh):
            got = jax.jit(lambda a, c: jf.copy_blocks([a, c], ids, dst))(
                jax.device_put(b.k_cache, heads), jax.device_put(other, heads))
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(g), w)
    print("OK plain jit mixed block shapes")
    plain_jit_edges()


def plain_jit_edges() -> None:
    """What the split had failed on: MQA over Auto axes (a size-1 kv-head factor inside the
    q heads' (k g) Shardy rejected), vmap reaching a jitted op (custom_partitioning has no
    batching rule), and over Explicit axes the paths that ran the op unsplit on sharded
    operands (PREFIXKV_JAX_PARTITION=0, vmap under jit: a ShardingTypeError) and export."""
    from jax.sharding import PartitionSpec as P

    rng = np.random.default_rng(3)
    mqa = testing.make_ragged_batch(rng, [(3, 7), (1, 5)], num_q_heads=8, num_kv_heads=1,
                                    head_dim=8, block_size=4)
    mesh = jax.make_mesh((4,), ("tp",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
        got = jax.jit(jf.paged_attention)(
            jax.device_put(mqa.q, NamedSharding(mesh, P(None, "tp", None))), *mqa.args()[1:])
    np.testing.assert_allclose(np.asarray(got), ref.paged_attention_reference(*mqa.args()),
                               atol=2e-5, rtol=2e-5)
    print("OK plain jit mqa")
    b = testing.make_ragged_batch(rng, [(3, 7), (1, 5)], num_q_heads=8, num_kv_heads=4,
                                  head_dim=8, block_size=4)
    want = ref.paged_attention_reference(*b.args())
    specs = [P(None, "tp", None), P(None, None, "tp", None), P(None, None, "tp", None)]
    stacked = [np.stack([x, x]) for x in b.args()]
    with jax.set_mesh(mesh):
        heads = [jax.device_put(x, NamedSharding(mesh, P(None, *s)))
                 for x, s in zip(stacked, specs, strict=False)]
        got = jax.vmap(jax.jit(jf.paged_attention))(*heads, *stacked[3:])
    np.testing.assert_allclose(np.asarray(got[1]), want, atol=2e-5, rtol=2e-5)
    print("OK plain jit vmap of jit")
    mesh = jax.make_mesh((4,), ("tp",), axis_types=(jax.sharding.AxisType.Explicit,))
    args = [jax.device_put(x, NamedSharding(mesh, s))
            for x, s in zip(b.args(), specs + [P()] * 3, strict=True)]
    avals = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for x in args]
    with jax.set_mesh(mesh):
        got = jax.jit(lambda *a: jax.vmap(jf.paged_attention)(
            *[jax.numpy.stack([x, x]) for x in a])[1])(*args)
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)
        assert jax.export.export(jax.jit(jf.paged_attention), platforms=["tpu"])(*avals)
        os.environ["PREFIXKV_JAX_PARTITION"] = "0"
        try:
            got = jax.jit(lambda *a: jf.paged_attention(*a))(*args)
        finally:
            del os.environ["PREFIXKV_JAX_PARTITION"]
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)
    print("OK plain jit explicit vmap export")


def dtypes() -> None:
    """tensor_parallel_paged_attention and shared_prefix_attention in a user's shard_map
    (check_vma) over 16-bit and fp8 caches, prefill and decode: the XLA loops tie their step
    counter to such caches, and its initial value had declared no varying mesh axes (a trace
    error: "carry input and carry output must have equal types"; float32 ran)."""
    mesh = jax.make_mesh((4,), ("tp",))
    spec = jf.kv_head_specs("tp")
    rep = spec["replicated"]
    put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))  # noqa: E731
    rng = np.random.default_rng(1)
    for dtype, cache_dtype in (("bfloat16", "bfloat16"), ("float16", "float16"),
                               ("float32", "float8_e4m3fn")):
        for seqs in ([(40, 40), (3, 9)], [(1, 20), (1, 7)]):
            b = testing.make_ragged_batch(rng, seqs, num_q_heads=8, num_kv_heads=4, head_dim=32,
                                          block_size=8, dtype=dtype,
                                          decode=seqs[0][0] == 1)
            kc, vc, scales = b.k_cache, b.v_cache, {}
            if cache_dtype != dtype:  # fp8 caches with per-tensor scales, read dequantized
                scales = dict(k_scale=0.5, v_scale=0.25)
                kc = ref.quantize_fp8_reference(kc, 0.5)
                vc = ref.quantize_fp8_reference(vc, 0.25)
            attn = jax.jit(jf.tensor_parallel_paged_attention(mesh, "tp", **scales))
            extra = () if b.cu_q_lens is None else (b.cu_q_lens,)
            got = attn(put(b.q, spec["q"]), put(kc, spec["cache"]), put(vc, spec["cache"]),
                       b.block_tables, b.kv_lens, *extra)
            want = ref.paged_attention_reference(b.q, kc, vc, b.block_tables, b.kv_lens,
                                                 b.cu_q_lens, **scales)
            testing.assert_attention_close(np.asarray(got), want, dtype)
        sp = testing.make_shared_prefix_batch(rng, [3, 2], [(0, 2, 5), (1, 3, 9), (-1, 1, 4)],
                                              num_q_heads=8, num_kv_heads=4, head_dim=32,
                                              block_size=8, dtype=dtype)
        a = list(sp.args())
        scales = {}
        if cache_dtype != dtype:
            scales = dict(k_scale=0.5, v_scale=0.25)
            a[1], a[2] = ref.quantize_fp8_reference(a[1], 0.5), ref.quantize_fp8_reference(
                a[2], 0.25)
        shared = jax.jit(jax.shard_map(
            lambda q, k, v, *rest, s=scales: jf.shared_prefix_attention(q, k, v, *rest, **s),
            mesh=mesh, in_specs=(spec["q"], spec["cache"], spec["cache"], *[rep] * 6),
            out_specs=spec["q"]))
        got = shared(put(a[0], spec["q"]), put(a[1], spec["cache"]), put(a[2], spec["cache"]),
                     *(put(x, rep) for x in a[3:9]))
        testing.assert_attention_close(
            np.asarray(got), ref.shared_prefix_attention_reference(*a, **scales), dtype)
        print("OK dtypes", cache_dtype)


if __name__ == "__main__":
    if sys.argv[1:] == ["dtypes"]:
        dtypes()
    elif sys.argv[1:] == ["hnd"]:
        hnd()
    elif sys.argv[1:] == ["plain_jit"]:
        plain_jit()
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else None)
