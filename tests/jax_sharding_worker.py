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


if __name__ == "__main__":
    if sys.argv[1:] == ["hnd"]:
        hnd()
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else None)
