"""jax.vmap over the JAX cache ops (stacked layer caches, one step's slots for every layer),
with every mix of batched and unbatched arguments, bit-exact against the numpy reference per
batch element; the Pallas TPU kernels (run in TPU interpret mode here, lowered for the TPU by
jax.export) fold the batch into the kernel's own axes: one launch, caches aliased in place."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from prefixkv.paged import reference as ref  # noqa: E402
from prefixkv.paged import testing  # noqa: E402

from prefixkv import jax_frontend as jf  # noqa: E402

pytest.importorskip("jax.experimental.pallas.tpu")

pytestmark = pytest.mark.usefixtures("pallas_races")

BACKENDS = ["pallas_interpret", "xla"]
# batch (layers), blocks, block_size, kv heads, head_dim; two ids per element: TPU interpret
# mode compiles ~0.5 s a kernel, more for each row it unrolls. A 5-block cache of 4-row blocks
# puts element 1's slot 0 at folded slot 20.
B, NB, BS, H, D = 2, 5, 4, 2, 8
# element 0's row is the unbatched one: a slot just past the cache (skipped, not element 1's
# slot 0); element 1: a skipped slot and the cache's last one
SLOTS = np.array([[NB * BS, 3], [-1, NB * BS - 1]], np.int32)
# scatter: an id past the cache (skipped, not element 1's block 0), distinct per element
SCATTER_IDS = np.array([[NB, 1], [4, 0]], np.int32)
# gather: an id past the cache (clamped to the last block, as reads clamp: not element 1's)
GATHER_IDS = np.array([[NB, 4], [0, 3]], np.int32)
COPY_SRC = np.array([[0, 4], [3, 3]], np.int32)
COPY_DST = np.array([[4, 2], [1, 0]], np.int32)


def _mixes(n: int):
    """Every in_axes of n arguments with at least one batched (vmap needs one)."""
    return [m for m in itertools.product((0, None), repeat=n) if any(a == 0 for a in m)]


def _name(axes) -> str:
    return "".join("b" if a == 0 else "-" for a in axes)


def _element(args, axes, b):
    return [a[b] if ax == 0 else a[0] for a, ax in zip(args, axes, strict=True)]


def _given(args, axes):
    """What vmap gets: a batched argument whole, an unbatched one as element 0's."""
    return [a if ax == 0 else a[0] for a, ax in zip(args, axes, strict=True)]


def _same_bits(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, what
    # the whole cache: every block not named must come back bit-identical too
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=what)


def _cache(rng):
    return testing.random_values(rng, (B, NB, BS, H, D), "float32")


def _run_all(fn, mixes, args):
    """fn vmapped with every in_axes in ``mixes``, all in one jit (one compile of them all);
    a trace error names its in_axes."""
    def every(*args):
        outs = []
        for axes in mixes:
            try:
                outs.append(jax.vmap(fn, in_axes=axes)(*_given(args, axes)))
            except Exception as err:
                raise AssertionError(f"in_axes {_name(axes)}: {err}") from err
        return outs

    return jax.jit(every)(*args)


def _live_slots(slots):
    return np.where((slots >= 0) & (slots < NB * BS), slots, -1).astype(np.int32)


# ------------------------------------------------------------------- every mix, every op


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_kv_every_in_axes_mix(backend):
    rng = np.random.default_rng(0)
    # 3 tokens for 2 slots: row 2 is padding
    args = [testing.random_values(rng, (B, 3, H, D), "float32") for _ in range(2)]
    args += [_cache(rng), _cache(rng), SLOTS]
    mixes = _mixes(5)
    outs = _run_all(lambda k, v, kc, vc, s: jf.write_kv(k, v, kc, vc, s, backend=backend),
                    mixes, args)
    for axes, (nk, nv) in zip(mixes, outs, strict=True):
        for b in range(B):
            k, v, kc, vc, s = _element(args, axes, b)
            want = ref.write_kv_reference(k, v, kc, vc, _live_slots(s))
            for got, w, c in zip((nk, nv), want, "kv", strict=True):
                _same_bits(got[b], w, f"in_axes {_name(axes)} element {b} {c}_cache")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_blocks_every_in_axes_mix(backend):
    rng = np.random.default_rng(1)
    args = [_cache(rng), _cache(rng), GATHER_IDS]
    mixes = _mixes(3)
    outs = _run_all(lambda c0, c1, i: jf.gather_blocks([c0, c1], i, backend=backend),
                    mixes, args)
    for axes, buf in zip(mixes, outs, strict=True):
        for b in range(B):
            c0, c1, ids = _element(args, axes, b)
            _same_bits(buf[b], ref.gather_blocks_reference([c0, c1], np.minimum(ids, NB - 1)),
                       f"in_axes {_name(axes)} element {b}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_scatter_blocks_every_in_axes_mix(backend):
    rng = np.random.default_rng(2)
    buffer = testing.random_values(rng, (B, 2, 2, BS, H, D), "float32")
    args = [_cache(rng), _cache(rng), buffer, SCATTER_IDS]
    mixes = _mixes(4)
    outs = _run_all(lambda c0, c1, buf, i: jf.scatter_blocks([c0, c1], buf, i, backend=backend),
                    mixes, args)
    for axes, got in zip(mixes, outs, strict=True):
        for b in range(B):
            c0, c1, buf, ids = _element(args, axes, b)
            live = ids < NB  # the id past the cache is skipped
            want = ref.scatter_blocks_reference([c0, c1], buf[live], ids[live])
            for c in range(2):
                _same_bits(got[c][b], want[c], f"in_axes {_name(axes)} element {b} cache {c}")


# copy_blocks runs each cache on its own (a gather then a scatter, each folding the batch):
# every mix of one cache, src and dst, then two caches, one batched and one shared
COPY_MIXES = [(c, None, s, d) for c, s, d in _mixes(3)] + [(0, None, 0, None)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_copy_blocks_every_in_axes_mix(backend):
    rng = np.random.default_rng(3)
    args = [_cache(rng), _cache(rng), COPY_SRC, COPY_DST]
    pair = len(COPY_MIXES) - 1

    def copy(c0, c1, src, dst):
        return jf.copy_blocks([c0] if c1 is None else [c0, c1], src, dst, backend=backend)

    def every(*args):
        outs = []
        for i, axes in enumerate(COPY_MIXES):
            if i == pair:
                outs.append(jax.vmap(copy, in_axes=axes)(*_given(args, axes)))
            else:
                one = (axes[0], *axes[2:])
                outs.append(jax.vmap(lambda c, s, d: copy(c, None, s, d), in_axes=one)(
                    *_given([args[0], *args[2:]], one)))
        return outs

    outs = jax.jit(every)(*args)
    for i, (axes, got) in enumerate(zip(COPY_MIXES, outs, strict=True)):
        for b in range(B):
            c0, c1, src, dst = _element(args, axes, b)
            want = ref.copy_blocks_reference([c0, c1] if i == pair else [c0], src, dst)
            for c, w in enumerate(want):
                _same_bits(got[c][b], w, f"in_axes {_name(axes)} element {b} cache {c}")


# ------------------------------------------------------- nested vmap, vmap in jit in scan


def test_nested_vmap_and_vmap_in_jit_in_scan():
    """vmap over models of vmap over layers (slots per model, shared by its layers), and a
    scan over steps whose body is a jitted vmap over layers: each an exact sequence of writes."""
    rng = np.random.default_rng(4)
    M = 2  # models: caches [M, B, ...]
    kc = testing.random_values(rng, (M, B, NB, BS, H, D), "float32")
    key = testing.random_values(rng, (M, B, 2, H, D), "float32")

    def layers(key, kc, vc, slots):
        return jax.vmap(lambda k, kc, vc: jf.write_kv(k, k, kc, vc, slots,
                                                      backend="pallas_interpret"))(key, kc, vc)

    nk, nv = jax.jit(jax.vmap(layers))(key, kc, kc + 1, SLOTS)
    for m, layer in itertools.product(range(M), range(B)):
        want = ref.write_kv_reference(key[m, layer], key[m, layer], kc[m, layer],
                                      kc[m, layer] + 1, _live_slots(SLOTS[m]))
        _same_bits(nk[m, layer], want[0], f"model {m} layer {layer} k_cache")
        _same_bits(nv[m, layer], want[1], f"model {m} layer {layer} v_cache")

    step = jax.jit(layers)

    def body(caches, xs):
        key, slots = xs
        return step(key, *caches, slots), None

    (sk, sv), _ = jax.lax.scan(body, (kc[0], kc[0] + 1), (key, SLOTS))
    for layer in range(B):
        wk, wv = kc[0, layer], kc[0, layer] + 1
        for t in range(M):  # the steps in order: step 1 overwrites what step 0 wrote
            wk, wv = ref.write_kv_reference(key[t, layer], key[t, layer], wk, wv,
                                            _live_slots(SLOTS[t]))
        _same_bits(sk[layer], wk, f"scan layer {layer} k_cache")
        _same_bits(sv[layer], wv, f"scan layer {layer} v_cache")


# ------------------------------------------------- one launch, in place, lowered for TPU


def _spec(x):
    return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)


# per op: the vmapped call over stacked layer caches with one step's ids for every layer,
# its donated arguments and the input_output_aliases of each kernel launch it takes (one for
# every layer; copy_blocks: a gather, then a scatter, per cache). Operands: ids, then rows or
# a buffer, then the caches.
def _layer_calls(backend):
    rng = np.random.default_rng(5)
    kc, vc = _cache(rng), _cache(rng)
    key = testing.random_values(rng, (B, 2, H, D), "float32")
    buf = testing.random_values(rng, (2, 2, BS, H, D), "float32")
    ids, src = np.array([1, 3], np.int32), np.array([0, 2], np.int32)
    return {
        "write_kv": (jax.vmap(lambda k, kc, vc, s: jf.write_kv(k, k, kc, vc, s, backend=backend),
                              in_axes=(0, 0, 0, None)), (key, kc, vc, ids), (1, 2),
                     [((3, 0), (4, 1))]),
        "copy_blocks": (jax.vmap(lambda kc, vc, s, d: jf.copy_blocks([kc, vc], s, d,
                                                                     backend=backend),
                                 in_axes=(0, 0, None, None)), (kc, vc, src, ids), (0, 1),
                        [(), ((2, 0),)] * 2),
        "gather_blocks": (jax.vmap(lambda kc, vc, i: jf.gather_blocks([kc, vc], i,
                                                                      backend=backend),
                                   in_axes=(0, 0, None)), (kc, vc, ids), (), [()]),
        "scatter_blocks": (jax.vmap(lambda kc, vc, b, i: jf.scatter_blocks([kc, vc], b, i,
                                                                           backend=backend),
                                    in_axes=(0, 0, None, None)), (kc, vc, buf, ids), (0, 1),
                           [((2, 0), (3, 1))]),
    }


OPS = ["write_kv", "copy_blocks", "gather_blocks", "scatter_blocks"]


@pytest.mark.parametrize("op", OPS)
def test_vmap_over_layers_exports_for_tpu_in_place(op):
    """The default backend lowered for a TPU under vmap: the Pallas kernel, each donated
    cache aliased to its result, through the kernel for the ops that write."""
    fn, args, donate, _ = _layer_calls(None)[op]
    exp = jax.export.export(jax.jit(fn, donate_argnums=donate), platforms=["tpu"])(
        *map(_spec, args))
    text = exp.mlir_module()
    assert "tpu_custom_call" in text
    assert len(re.findall(r"tf\.aliasing_output = \d+", text)) == len(donate)
    assert ("output_operand_aliases" in text) == bool(donate)


def _pallas_calls(jaxpr):
    """Every pallas_call equation of a (nested) jaxpr, in order."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield eqn
        for v in eqn.params.values():
            for inner in v if isinstance(v, tuple) else (v,):
                inner = getattr(inner, "jaxpr", None)
                if inner is not None:
                    yield from _pallas_calls(getattr(inner, "jaxpr", inner))


@pytest.mark.parametrize("op", OPS)
def test_vmap_over_layers_is_one_launch_and_donation_updates_in_place(op):
    """pallas_interpret: one kernel launch for every layer (copy_blocks: a gather and a
    scatter per cache), its aliases intact; donated stacked caches are consumed and come back
    in the same buffers (the fold is a reshape: no copy)."""
    fn, args, donate, aliases = _layer_calls("pallas_interpret")[op]
    calls = list(_pallas_calls(jax.make_jaxpr(fn)(*args).jaxpr))
    assert [tuple(eqn.params["input_output_aliases"]) for eqn in calls] == aliases
    # every cache operand is the layers' caches folded into one: [B * num_blocks, ...]
    assert {eqn.invars[-1].aval.shape for eqn in calls} == {(B * NB, BS, H, D)}
    if not donate:
        return
    args = [jnp.asarray(a) for a in args]
    want = jax.jit(_layer_calls("xla")[op][0])(*args)  # not donated (XLA: a quick compile)
    ptrs = [args[i].unsafe_buffer_pointer() for i in donate]
    step = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
    assert "input_output_alias" in step.as_text()
    got = step(*args)
    assert all(args[i].is_deleted() for i in donate)
    assert [g.unsafe_buffer_pointer() for g in got] == ptrs
    for g, w in zip(got, want, strict=True):
        _same_bits(g, w, op)


def test_vmap_inside_shard_map_with_check_vma():
    """A vmap over layers inside shard_map (check_vma): the fold's offsets (varying over no
    axis) meet slots and caches that vary over the mesh axis."""
    from jax.sharding import NamedSharding

    rng = np.random.default_rng(6)
    kc, vc = _cache(rng), _cache(rng)
    key = testing.random_values(rng, (B, 2, H, D), "float32")
    mesh = jax.make_mesh((1,), ("x",))
    heads, rows = P(None, None, None, "x"), P(None, None, "x")

    def body(key, kc, vc, slots):
        return jax.vmap(lambda k, kc, vc: jf.write_kv(k, k, kc, vc, slots,
                                                      backend="pallas_interpret"))(key, kc, vc)

    run = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(rows, heads, heads, P()),
                                out_specs=(heads, heads), check_vma=True))
    put = [NamedSharding(mesh, p) for p in (rows, heads, heads, P())]
    nk, nv = run(*(jax.device_put(a, s) for a, s in
                   zip((key, kc, vc, SLOTS[0]), put, strict=True)))
    for layer in range(B):
        want = ref.write_kv_reference(key[layer], key[layer], kc[layer], vc[layer],
                                      _live_slots(SLOTS[0]))
        _same_bits(nk[layer], want[0], f"layer {layer} k_cache")
        _same_bits(nv[layer], want[1], f"layer {layer} v_cache")


def test_vmap_past_the_kernels_int32_indices_is_an_error_naming_the_op():
    """Folded slots past int32 (caches this large fit no TPU today) are refused by name, not
    wrapped into another element's cache. Traced only: nothing is allocated."""
    kc = jax.ShapeDtypeStruct((3, 2**20, 1024, 1, 8), jnp.float32)  # 2**30 slots each
    key = jax.ShapeDtypeStruct((3, 1, 1, 8), jnp.float32)
    slots = jax.ShapeDtypeStruct((1,), jnp.int32)
    fn = jax.vmap(lambda k, kc, vc, s: jf.write_kv(k, k, kc, vc, s, backend="pallas_interpret"),
                  in_axes=(0, 0, 0, None))
    with pytest.raises(ValueError, match=r"write_kv under jax\.vmap: 3 batch elements"):
        jax.eval_shape(fn, key, kc, kc, slots)
