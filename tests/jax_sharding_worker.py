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
                                  head_dim=hd, block_size=8)
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
    try:
        jf.tensor_parallel_paged_attention(jax.make_mesh((4,), ("tp",)), "tp")(
            b.q[:, :12], b.k_cache[:, :, :3], b.v_cache[:, :, :3], b.block_tables, b.kv_lens,
            b.cu_q_lens)
    except ValueError as e:
        assert "num_kv_heads=3 must be divisible by the size of mesh axis 'tp' (4)" in str(e)
        print("OK error")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
