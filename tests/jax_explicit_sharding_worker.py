"""Run by tests/test_jax_explicit_sharding.py in a subprocess with 4 host devices (XLA_FLAGS
must be set before jax is imported). The cache-updating ops under plain jax.jit on a mesh of
Explicit or Auto axes, caches replicated or sharded over their blocks, kv heads or head_dim:
each returned cache has its input cache's sharding (a loop carries it, a donated one is
updated in place) and the results are bit-exact. Prints "OK <group> <case>" or "FAIL <group>
<case>: why" per case (a failing case does not stop the others), then "DONE <group> <number
of cases>"."""

import os
import sys
import traceback
import warnings

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from prefixkv.paged import reference as ref  # noqa: E402
from prefixkv.paged import testing  # noqa: E402

from prefixkv import jax_frontend as jf  # noqa: E402

# NHD caches [num_blocks=8, block_size=4, num_kv_heads=4, head_dim=8] on a mesh axis of 4
CACHES = {"replicated": P(), "heads": P(None, None, "a", None), "blocks": P("a"),
          "head_dim": P(None, None, None, "a")}
KEYS = {"keys_heads": P(None, "a", None), "keys_replicated": P()}
MODES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}


def check_kept(got, given, what: str) -> None:
    """``got`` (a concrete array) sharded as ``given`` was, and of the same type."""
    assert got.sharding.is_equivalent_to(given.sharding, given.ndim), (
        f"{what}: {got.sharding.spec} from a cache {given.sharding.spec}")
    assert str(jax.typeof(got)) == str(jax.typeof(given)), (what, jax.typeof(got))


def donated(fn, caches, *args):
    """fn(*caches, *args) jitted with the caches donated: its results, after checking every
    donated buffer was used in place (a result sharded otherwise cannot take the buffer)."""
    ptrs = [[s.data.unsafe_buffer_pointer() for s in c.addressable_shards] for c in caches]
    n = len(caches)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Some donated buffers were not usable"
        f = jax.jit(fn, donate_argnums=tuple(range(n)))
        hlo = f.lower(*caches, *args).compile().as_text().splitlines()[0]
        out = f(*caches, *args)
    assert all(c.is_deleted() for c in caches), "a donated cache was not used"
    got = [[s.data.unsafe_buffer_pointer() for s in c.addressable_shards] for c in out[:n]]
    assert got == ptrs, ("a donated cache was copied", hlo[:400])
    return out


def write_kv_case(mesh, put, rng, k_spec, v_spec, key_spec, layout="NHD", kv_heads=4):
    shape = (8, 4, kv_heads, 8) if layout == "NHD" else (8, kv_heads, 4, 8)
    k_host = testing.random_values(rng, shape, "float32")
    v_host = testing.random_values(rng, shape, "float32")
    key = testing.random_values(rng, (3, kv_heads, 8), "float32")
    value = testing.random_values(rng, (3, kv_heads, 8), "float32")
    slots = np.array([0, 9, 30], np.int32)
    nhd = (lambda c: np.swapaxes(c, 1, 2)) if layout == "HND" else (lambda c: c)
    want = [nhd(w) for w in ref.write_kv_reference(key, value, nhd(k_host), nhd(v_host), slots)]
    twice = [nhd(w) for w in ref.write_kv_reference(2 * key, 2 * value, nhd(k_host),
                                                    nhd(v_host), slots)]
    args = (put(key, key_spec), put(value, key_spec), put(slots, P()))
    write = lambda k, v, key, value, s: jf.write_kv(  # noqa: E731
        key, value, k, v, s, kv_layout=layout)
    with jax.set_mesh(mesh):
        caches = [put(k_host, k_spec), put(v_host, v_spec)]
        kept = [put(k_host, k_spec), put(v_host, v_spec)]  # not donated: to compare with
        out = donated(write, caches, *args)
        for g, c, w, name in zip(out, kept, want, "kv", strict=True):
            check_kept(g, c, f"write_kv {name}_cache")
            np.testing.assert_array_equal(np.asarray(g), w)
        # a loop carrying the caches: their types must not change (Explicit axes)
        loop = jax.jit(lambda k, v, key, value, s: jax.lax.fori_loop(
            0, 2, lambda i, c: tuple(write(*c, (i + 1.0) * key, (i + 1.0) * value, s)),
            (k, v)))
        out = loop(*kept, *args)
        for g, c, w in zip(out, kept, twice, strict=True):
            check_kept(g, c, "fori_loop write_kv")
            np.testing.assert_array_equal(np.asarray(g), w)


def block_ops_case(mesh, put, rng, k_spec, v_spec, buffer_spec=None):
    host = [testing.random_values(rng, (8, 4, 4, 8), "float32") for _ in range(2)]
    src, dst, ids = (np.array(x, np.int32) for x in ([1, 6], [2, 5], [7, 3]))
    buf_host = testing.random_values(rng, (2, 2, 4, 4, 8), "float32")
    want_copy = ref.copy_blocks_reference(host, src, dst)
    want_scatter = ref.scatter_blocks_reference(host, buf_host, ids)
    want_gather = ref.gather_blocks_reference(host, ids)
    want_loop = host
    for _ in range(2):
        want_loop = ref.copy_blocks_reference(want_loop, src, dst)
        want_loop = ref.scatter_blocks_reference(want_loop, buf_host, ids)
    rep = [put(x, P()) for x in (src, dst, ids)]
    buf = put(buf_host, P() if buffer_spec is None else buffer_spec)
    with jax.set_mesh(mesh):
        fresh = lambda: [put(host[0], k_spec), put(host[1], v_spec)]  # noqa: E731
        kept = fresh()
        out = donated(lambda k, v, s, d: tuple(jf.copy_blocks([k, v], s, d)), fresh(), *rep[:2])
        for g, c, w in zip(out, kept, want_copy, strict=True):
            check_kept(g, c, "copy_blocks")
            np.testing.assert_array_equal(np.asarray(g), w)
        out = donated(lambda k, v, b, i: tuple(jf.scatter_blocks([k, v], b, i)), fresh(), buf,
                      rep[2])
        for g, c, w in zip(out, kept, want_scatter, strict=True):
            check_kept(g, c, "scatter_blocks")
            np.testing.assert_array_equal(np.asarray(g), w)
        got = jax.jit(lambda k, v, i: jf.gather_blocks([k, v], i))(*kept, rep[2])
        np.testing.assert_array_equal(np.asarray(got), want_gather)

        def loop(k, v, b, s, d, i):
            def body(_, c):
                return tuple(jf.scatter_blocks(jf.copy_blocks(list(c), s, d), b, i))

            return jax.lax.fori_loop(0, 2, body, (k, v))

        out = jax.jit(loop)(*kept, buf, *rep)
        for g, c, w in zip(out, kept, want_loop, strict=True):
            check_kept(g, c, "fori_loop copy_blocks + scatter_blocks")
            np.testing.assert_array_equal(np.asarray(g), w)


def mixed_shapes_case(mesh, put, rng, k_spec, v_spec):
    """copy_blocks on caches of differing block shapes (not split: whole on every device)."""
    host = [testing.random_values(rng, (8, 4, 4, 8), "float32"),
            testing.random_values(rng, (8, 2, 4, 4), "float32")]
    src, dst = np.array([1, 6], np.int32), np.array([2, 5], np.int32)
    want = ref.copy_blocks_reference(host, src, dst)
    want_loop = ref.copy_blocks_reference(want, dst, src)
    ids = [put(x, P()) for x in (src, dst)]
    with jax.set_mesh(mesh):
        fresh = lambda: [put(host[0], k_spec), put(host[1], v_spec)]  # noqa: E731
        kept = fresh()
        copy = lambda k, v, s, d: tuple(jf.copy_blocks([k, v], s, d))  # noqa: E731
        for g, c, w in zip(donated(copy, fresh(), *ids), kept, want, strict=True):
            check_kept(g, c, "copy_blocks")
            np.testing.assert_array_equal(np.asarray(g), w)
        out = jax.jit(lambda k, v, s, d: jax.lax.fori_loop(
            0, 2, lambda i, c: copy(*c, *jax.lax.cond(i == 0, lambda: (s, d), lambda: (d, s))),
            (k, v)))(*kept, *ids)
        for g, c, w in zip(out, kept, want_loop, strict=True):
            check_kept(g, c, "fori_loop copy_blocks")
            np.testing.assert_array_equal(np.asarray(g), w)


def cases(mode: str):
    """(group, case name, function of (mesh, put, rng)) for the mesh axis type ``mode``."""
    for c_name, c_spec in CACHES.items():
        for k_name, k_spec in KEYS.items():
            yield (f"write_kv_{mode}", f"{c_name}_{k_name}",
                   lambda m, p, r, c=c_spec, k=k_spec: write_kv_case(m, p, r, c, c, k))
    yield (f"write_kv_{mode}", "k_heads_v_blocks", lambda m, p, r: write_kv_case(
        m, p, r, CACHES["heads"], CACHES["blocks"], KEYS["keys_heads"]))
    yield (f"write_kv_{mode}", "hnd_replicated_keys_heads", lambda m, p, r: write_kv_case(
        m, p, r, P(), P(), KEYS["keys_heads"], layout="HND"))
    yield (f"write_kv_{mode}", "hnd_blocks", lambda m, p, r: write_kv_case(
        m, p, r, P("a"), P("a"), P(), layout="HND"))
    yield (f"write_kv_{mode}", "mqa_blocks", lambda m, p, r: write_kv_case(
        m, p, r, P("a"), P("a"), P(), kv_heads=1))
    yield (f"write_kv_{mode}", "mqa_head_dim", lambda m, p, r: write_kv_case(
        m, p, r, CACHES["head_dim"], CACHES["head_dim"], P(), kv_heads=1))
    for c_name, c_spec in CACHES.items():
        yield (f"block_ops_{mode}", c_name,
               lambda m, p, r, c=c_spec: block_ops_case(m, p, r, c, c))
    yield (f"block_ops_{mode}", "replicated_buffer_head_dim", lambda m, p, r: block_ops_case(
        m, p, r, P(), P(), P(None, None, None, None, "a")))
    yield (f"block_ops_{mode}", "k_heads_v_replicated", lambda m, p, r: block_ops_case(
        m, p, r, CACHES["heads"], P()))
    yield (f"block_ops_{mode}", "mixed_shapes_heads_blocks", lambda m, p, r: mixed_shapes_case(
        m, p, r, CACHES["heads"], P("a")))


def main(modes) -> None:
    assert jax.device_count() == 4, jax.devices()
    for mode in modes:
        mesh = jax.make_mesh((4,), ("a",), axis_types=(MODES[mode],))

        def put(x, spec, mesh=mesh):
            """x laid out by a jitted copy: a host array device_put may be borrowed
            (zero-copy on CPU), and a donated borrowed buffer is copied, not updated. Specs
            padded to the rank: over Explicit axes jit compares them as written, and a result
            (always full) would not take the donation of a P()."""
            spec = NamedSharding(mesh, P(*spec, *[None] * (x.ndim - len(spec))))
            return jax.jit(lambda v: v.copy(), out_shardings=spec)(x)

        groups: dict[str, int] = {}
        for group, name, fn in cases(mode):
            groups[group] = groups.get(group, 0) + 1
            try:
                fn(mesh, put, np.random.default_rng(0))
                print("OK", group, name, flush=True)
            except Exception as e:  # reported; the other cases still run
                why = " ".join(str(e).split())[:300] or traceback.format_exc(limit=1)
                print("FAIL", group, name + ":", type(e).__name__, why, flush=True)
        for group, n in groups.items():
            print("DONE", group, n, flush=True)  # n cases


if __name__ == "__main__":
    main(sys.argv[1:] or list(MODES))
