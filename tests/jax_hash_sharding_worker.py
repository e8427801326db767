"""Run by tests/test_jax_hash_integration.py in a subprocess with 4 host devices (XLA_FLAGS must
be set before jax is imported): ``hash_blocks`` inside a user's ``jax.shard_map`` with its
default ``check_vma=True``, each data-parallel shard hashing its own ragged batch. Prints one
``OK <section>`` line per section that passes, ``FAIL <section>`` and the traceback for one
that does not (every section runs), and exits non-zero if any failed."""

import os
import sys
import traceback

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from prefixkv.jax_frontend._hashing import hash_blocks  # noqa: E402
from prefixkv.kernels._vma import varying_axes  # noqa: E402
from prefixkv.paged.reference.hashing import hash_blocks_reference  # noqa: E402

SHARDS = 4
BLOCK = 7
# four sequences a shard, 40 tokens, 4 full blocks of 7 each (so extra has 4 rows a shard):
# empty sequences, partial tails, a sequence of exactly one block
SHARD_LENS = [[7, 13, 0, 20], [14, 6, 6, 14], [0, 0, 13, 27], [34, 6, 0, 0]]
TOKENS = 40
FULL = 4


def _case():
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, 2**31 - 1, (SHARDS, TOKENS), dtype=np.int32)
    cu = np.array([np.concatenate([[0], np.cumsum(lens)]) for lens in SHARD_LENS], np.int32)
    assert (cu[:, -1] == TOKENS).all()
    assert [sum(n // BLOCK for n in lens) for lens in SHARD_LENS] == [FULL] * SHARDS
    extra = rng.integers(0, 2**32, (SHARDS, FULL, 4), dtype=np.uint64).astype(np.uint32)
    parents = rng.integers(0, 2**32, (SHARDS, 4, 8), dtype=np.uint64).astype(np.uint32)
    return tokens, cu, extra, parents


def _want(tokens, cu, extra, parents, with_extra: bool):
    return np.concatenate([
        hash_blocks_reference(tokens[s], BLOCK, cu_lens=cu[s], salt="dp",
                              extra=extra[s] if with_extra else None, parent=parents[s])
        for s in range(SHARDS)])


def frontend(mesh, backend):
    """The frontend under shard_map, with and without extra; traced per-shard cu_lens,
    parents and extra. Exact against the reference and against the same jitted call outside
    shard_map, shard by shard."""
    tokens, cu, extra, parents = _case()
    put = lambda x: jax.device_put(x.reshape(-1, *x.shape[2:]),  # noqa: E731
                                   NamedSharding(mesh, P("dp")))

    def local(t, c, e, p, with_extra):
        out = hash_blocks(t, BLOCK, cu_lens=c, salt="dp", extra=e if with_extra else None,
                          parent=p, backend=backend)
        # each shard's hashes are its own: the result varies over the axis its inputs do
        assert varying_axes(out) == varying_axes(t), (varying_axes(out), varying_axes(t))
        return out

    for with_extra in (False, True):
        f = jax.jit(jax.shard_map(lambda t, c, e, p, w=with_extra: local(t, c, e, p, w),
                                  mesh=mesh, in_specs=P("dp"), out_specs=P("dp")))
        got = np.asarray(f(put(tokens), put(cu), put(extra), put(parents)))
        # traced cu_lens without extra: num_tokens // block_size rows a shard, zero past the
        # real blocks
        rows = FULL if with_extra else TOKENS // BLOCK
        got = got.reshape(SHARDS, rows, 8)
        outside = jax.jit(lambda t, c, e, p, w=with_extra: local(t, c, e, p, w))
        want = _want(tokens, cu, extra, parents, with_extra).reshape(SHARDS, FULL, 8)
        for s in range(SHARDS):
            alone = np.asarray(outside(tokens[s], cu[s], extra[s], parents[s]))
            np.testing.assert_array_equal(got[s], alone)
            np.testing.assert_array_equal(got[s, :FULL], want[s])
            assert not got[s, FULL:].any()
    # one sequence a shard, concrete lengths, no parent
    g = jax.jit(jax.shard_map(lambda t: hash_blocks(t, BLOCK, salt="dp", backend=backend),
                              mesh=mesh, in_specs=P("dp"), out_specs=P("dp")))
    got = np.asarray(g(put(tokens))).reshape(SHARDS, TOKENS // BLOCK, 8)
    for s in range(SHARDS):
        np.testing.assert_array_equal(got[s], hash_blocks_reference(tokens[s], BLOCK, salt="dp"))


def pallas_interpret(mesh):
    """The Pallas kernel in TPU interpret mode (hash_blocks registers no interpret backend)
    under shard_map: its out_shape must declare the mesh axes the inputs vary over. (JAX
    0.10.2's generic interpret=True fails here inside JAX's HLO interpreter, a dynamic_slice
    of a varying block at constant indices, for any kernel that indexes a ref.)"""
    from jax.experimental.pallas import tpu as pltpu
    from prefixkv.jax_frontend._hashing import block_key
    from prefixkv.kernels.pallas.hashing import hash_blocks_pallas

    interpret = pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan")

    tokens, cu, extra, parents = _case()
    key = np.frombuffer(block_key("dp", True), "<u4").astype(np.uint32)
    put = lambda x: jax.device_put(x.reshape(-1, *x.shape[2:]),  # noqa: E731
                                   NamedSharding(mesh, P("dp")))

    def local(t, c, e, p):
        return hash_blocks_pallas(jax.lax.bitcast_convert_type(t, jnp.uint32), c,
                                  jnp.asarray(key), p, e, block_size=BLOCK, num_out=FULL,
                                  num_steps=TOKENS // BLOCK, interpret=interpret)

    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("dp"), out_specs=P("dp")))
    got = np.asarray(f(put(tokens), put(cu), put(extra), put(parents)))
    np.testing.assert_array_equal(got, _want(tokens, cu, extra, parents, True))


def _shapes(mesh):
    sharded = NamedSharding(mesh, P("dp"))
    return (jax.ShapeDtypeStruct((SHARDS * TOKENS,), jnp.int32, sharding=sharded),
            jax.ShapeDtypeStruct((SHARDS * 5,), jnp.int32, sharding=sharded))


def export_tpu(mesh, backend):
    """A TPU export of the frontend under shard_map: the default backend (the Pallas kernel
    in the TPU branch) or backend="pallas_tpu" (traced on this CPU host: staged for TPU)."""
    f = jax.jit(jax.shard_map(
        lambda t, c: hash_blocks(t, BLOCK, cu_lens=c, salt="dp", backend=backend),
        mesh=mesh, in_specs=P("dp"), out_specs=P("dp")))
    text = jax.export.export(f, platforms=["tpu"])(*_shapes(mesh)).mlir_module()
    assert "tpu_custom_call" in text and "callback" not in text


def export_cpu_xla(mesh):
    """backend="xla" exports for the CPU under shard_map (the host backend's pure_callback
    cannot be serialized: docs/ops.md)."""
    tokens, cu, _, _ = _case()
    f = jax.jit(jax.shard_map(
        lambda t, c: hash_blocks(t, BLOCK, cu_lens=c, salt="dp", backend="xla"),
        mesh=mesh, in_specs=P("dp"), out_specs=P("dp")))
    exported = jax.export.export(f, platforms=["cpu"])(*_shapes(mesh))
    put = lambda x: jax.device_put(x.reshape(-1), NamedSharding(mesh, P("dp")))  # noqa: E731
    got = np.asarray(exported.call(put(tokens), put(cu)))
    np.testing.assert_array_equal(got, np.asarray(f(put(tokens), put(cu))))


def main() -> int:
    assert jax.device_count() == SHARDS, jax.devices()
    mesh = jax.make_mesh((SHARDS,), ("dp",))
    sections = {
        "xla": lambda: frontend(mesh, "xla"),
        "host": lambda: frontend(mesh, "host"),
        "default": lambda: frontend(mesh, None),
        "pallas_interpret": lambda: pallas_interpret(mesh),
        "export_tpu": lambda: export_tpu(mesh, None),
        "export_tpu_requested": lambda: export_tpu(mesh, "pallas_tpu"),
        "export_cpu_xla": lambda: export_cpu_xla(mesh),
    }
    failed = 0
    for name in sys.argv[1:] or sections:
        try:
            sections[name]()
        except Exception:  # noqa: BLE001 - report every section, fail at the end
            failed += 1
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
        else:
            print(f"OK {name}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
