"""Every op, every array argument, every way of getting it wrong: one argument of a valid call
replaced (other dtype, a dimension dropped, added or resized, empty, a scalar, a list, None,
negative or huge ids) and the op called through the numpy reference, the PyTorch frontend and
the JAX frontend. Each call either works or raises TypeError/ValueError naming an argument or a
dimension; anything else (IndexError, RuntimeError, AttributeError, a crash) fails.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from prefixkv.paged import reference as ref
from prefixkv.paged import testing

NAMES = ("num_q_heads", "num_kv_heads", "head_dim", "block_size", "num_blocks", "num_seqs",
         "num_tokens", "max_blocks_per_seq", "num_prefixes", "caches", "slot")


def _batches():
    rng = np.random.default_rng(5)
    rb = testing.make_ragged_batch(rng, [(1, 9), (3, 7)], num_q_heads=4, num_kv_heads=2,
                                   head_dim=16, block_size=4, nan_fill=False)
    sp = testing.make_shared_prefix_batch(rng, [2], [(0, 2, 3), (0, 1, 5)], num_q_heads=4,
                                          num_kv_heads=2, head_dim=16, block_size=4)
    out = rng.standard_normal((3, 4, 16)).astype(np.float32)
    lse = rng.standard_normal((3, 4)).astype(np.float32)
    i32 = np.int32
    caches = [rb.k_cache, rb.v_cache]
    nb = rb.k_cache.shape[0]
    return {
        "paged_attention": dict(zip(("q", "k_cache", "v_cache", "block_tables", "kv_lens",
                                     "cu_q_lens"), rb.args(), strict=True)),
        "shared_prefix_attention": dict(zip(
            ("q", "k_cache", "v_cache", "prefix_block_tables", "prefix_lens", "prefix_ids",
             "block_tables", "kv_lens", "cu_q_lens"), sp.args(), strict=True)),
        "merge_attention_states": dict(out_a=out, lse_a=lse, out_b=out[::-1].copy(),
                                       lse_b=lse[::-1].copy()),
        "write_kv": dict(key=out[:2, :2], value=out[1:, 2:], k_cache=rb.k_cache,
                         v_cache=rb.v_cache, slot_mapping=np.array([5, -1], i32)),
        "copy_blocks": dict(caches=caches, src=np.array([0, 2], i32),
                            dst=np.array([nb - 1, 1], i32)),
        "gather_blocks": dict(caches=caches, block_ids=np.array([1, 1, 0], i32)),
        "scatter_blocks": dict(caches=caches, buffer=np.stack([rb.k_cache[:2],
                                                              rb.v_cache[:2]], axis=1),
                               block_ids=np.array([3, 0], i32)),
    }


@np.errstate(invalid="ignore")  # NaN padding cast to integers
def _mutations(x: np.ndarray) -> dict:
    m = {"none": None, "list": x.tolist(), "empty0": x[:0], "add_dim": x[..., None],
         "float64": x.astype(np.float64), "int64": x.astype(np.int64), "bool": x.astype(bool)}
    if x.ndim:
        m["drop_dim"] = x[..., 0]
        m["scalar"] = x.reshape(-1)[0] if x.size else np.float32(0)
        m["grow0"] = np.concatenate([x, x[:1]]) if len(x) else x
        if x.shape[-1] > 1:
            m["shrink_last"] = x[..., :-1]
    if x.dtype.kind == "f":
        m["float16"] = x.astype(np.float16)
        m["int32"] = x.astype(np.int32)
    else:
        m["negative"] = -1 - x
        m["huge"] = x + 10**9
        m["float32"] = x.astype(np.float32)
    return m


def _cases():
    for op, args in _batches().items():
        for name, value in args.items():
            if value is None:
                continue
            if isinstance(value, list):  # caches: each way of getting caches[1] wrong
                for how in _mutations(value[1]):
                    yield op, f"{name}[1]", how
                yield op, name, "empty_list"
                continue
            for how in _mutations(value):
                yield op, name, how


CASES = list(_cases())


def _mutated(op: str, arg: str, how: str) -> dict:
    args = _batches()[op]
    if arg.endswith("[1]"):
        base = arg[:-3]
        caches = list(args[base])
        caches[1] = _mutations(caches[1])[how]
        args[base] = caches
    elif how == "empty_list":
        args[arg] = []
    else:
        args[arg] = _mutations(args[arg])[how]
    return args


def _check(fn, args: dict, op: str) -> None:
    names = set(inspect.signature(fn).parameters) | set(NAMES)
    try:
        fn(**args)
    except (TypeError, ValueError) as e:
        msg = str(e)
        assert any(n in msg for n in names), f"{op}: {type(e).__name__} names no argument: {msg}"
    # anything else propagates and fails the test


def _convert(args: dict, to) -> dict:
    def one(v):
        if isinstance(v, np.ndarray):
            return to(v)
        if isinstance(v, list) and v and isinstance(v[0], np.ndarray):
            return [one(c) for c in v]
        return v
    return {k: one(v) for k, v in args.items()}


@pytest.mark.parametrize("op,arg,how", CASES, ids=["-".join(c) for c in CASES])
def test_reference(op, arg, how):
    _check(getattr(ref, f"{op}_reference"), _mutated(op, arg, how), op)


@pytest.mark.parametrize("op,arg,how", CASES, ids=["-".join(c) for c in CASES])
def test_torch(op, arg, how):
    torch = pytest.importorskip("torch")
    from prefixkv import torch_frontend as tf

    def to(x):
        return torch.from_numpy(np.ascontiguousarray(x)) if x.ndim else torch.tensor(x.item())
    _check(getattr(tf, op), _convert(_mutated(op, arg, how), to), op)


@pytest.mark.parametrize("op,arg,how", CASES, ids=["-".join(c) for c in CASES])
def test_jax(op, arg, how):
    jnp = pytest.importorskip("jax.numpy")
    from prefixkv import jax_frontend as jf

    _check(getattr(jf, op), _convert(_mutated(op, arg, how), jnp.asarray), op)


def _torch_args(op: str) -> dict:
    torch = pytest.importorskip("torch")
    return _convert(_batches()[op], lambda x: torch.from_numpy(np.ascontiguousarray(x)))


def _snapshot(args: dict, skip: str) -> dict:
    """Copies of the tensors of ``args`` (lists: each item) but ``skip``, by name."""
    return {(n, i): t.numpy().copy() for n, v in args.items() if n != skip
            for i, t in enumerate(v if isinstance(v, list) else [v]) if hasattr(t, "numpy")}


@pytest.mark.parametrize("op,arg", [(op, name) for op, a in _batches().items() for name in a
                                    if a[name] is not None])
def test_torch_numpy_argument_named_and_nothing_written(op, arg):
    """A numpy array (or list of them) where the torch frontend takes tensors: a TypeError
    naming the argument before anything runs. A numpy value reached torch deep inside (an
    AttributeError naming nothing) or after the K cache was written (write_kv)."""
    from prefixkv import torch_frontend as tf

    args = _torch_args(op)
    before = _snapshot(args, arg)
    raw = _batches()[op][arg]
    args[arg] = [raw[0], raw[1]] if isinstance(raw, list) else raw
    with pytest.raises(TypeError, match=rf"^{arg}(\[0\])?: expected a torch.Tensor"):
        getattr(tf, op)(**args)
    for key, value in _snapshot(args, arg).items():  # every other tensor unchanged
        np.testing.assert_array_equal(value, before[key])


@pytest.mark.parametrize("op,arg", [("write_kv", "v_cache"), ("write_kv", "value"),
                                    ("paged_attention", "v_cache"), ("copy_blocks", "caches"),
                                    ("merge_attention_states", "lse_b")])
def test_torch_data_on_another_device_named(op, arg):
    """Data tensors of one call on two devices (here a meta tensor beside CPU ones): a
    ValueError naming the argument before anything is written (write_kv wrote K, then failed
    on a meta V cache)."""
    from prefixkv import torch_frontend as tf

    args = _torch_args(op)
    k0 = args.get("k_cache")
    k_before = None if k0 is None else k0.clone()
    if arg == "caches":
        args["caches"] = [args["caches"][0], args["caches"][1].to("meta")]
        arg = r"caches\[1\]"
    else:
        args[arg] = args[arg].to("meta")
    with pytest.raises(ValueError, match=rf"^{arg}: expected it on .* device cpu, got meta"):
        getattr(tf, op)(**args)
    if k_before is not None:
        assert k0.equal(k_before)


def test_torch_out_on_another_device_named():
    from prefixkv import torch_frontend as tf

    args = _torch_args("paged_attention")
    out = args["q"].new_empty(args["q"].shape, device="meta")
    with pytest.raises(ValueError, match=r"^out: expected it on q's device cpu, got meta"):
        tf.paged_attention(**args, out=out)


def test_torch_write_kv_rows_sharing_a_cache_refused():
    """key/value that are views of a cache would change under the write (K written, then V
    read from the changed memory): refused, nothing written."""
    from prefixkv import torch_frontend as tf

    args = _torch_args("write_kv")
    k, v = args["k_cache"], args["v_cache"]
    k_before, v_before = k.clone(), v.clone()
    args["value"] = v[0, :2]
    with pytest.raises(ValueError, match="^value: shares memory with v_cache"):
        tf.write_kv(**args)
    assert k.equal(k_before) and v.equal(v_before)


def test_torch_copy_blocks_same_cache_twice_is_one_cache():
    """A cache listed twice (layers sharing one KV cache) is copied once: a chained copy
    0 -> 1 -> 2 read block 1 after the first pass had overwritten it."""
    torch = pytest.importorskip("torch")
    from prefixkv import torch_frontend as tf

    k = torch.arange(6 * 8, dtype=torch.float32).reshape(6, 8)
    src, dst = np.array([0, 1], np.int32), np.array([1, 2], np.int32)
    want = ref.copy_blocks_reference([k.numpy().copy()], src, dst)[0]
    tf.copy_blocks([k, k], torch.from_numpy(src), torch.from_numpy(dst))
    np.testing.assert_array_equal(k.numpy(), want)


def test_an_array_type_in_place_of_an_array_is_named():
    """``np.float32`` (the class) in a cache list: its ``shape`` is a descriptor, and the
    check raised "'getset_descriptor' object is not iterable" (a tier fuzzer's find, through
    BlockOffloader.offload)."""
    from prefixkv.paged import validate

    with pytest.raises(TypeError, match=r"^caches\[1\]: expected an array, got the type "
                                        r"float32$"):
        validate.check_caches([np.zeros((2, 3), np.float32), np.float32])
    with pytest.raises(TypeError, match=r"^key: expected an array, got the type ndarray$"):
        validate.check_write_kv(np.ndarray, np.zeros((1, 2, 8), np.float32),
                                *([np.zeros((4, 4, 2, 8), np.float32)] * 2),
                                np.zeros(1, np.int32))


def test_torch_host_block_helpers_name_their_arguments():
    """gather_blocks_to_host / scatter_blocks_from_host (the offloader's torch hooks): string
    or None ids and a None buffer raised torch's "can't convert np.ndarray of type
    numpy.object_" naming nothing, and scatter into no caches an IndexError; nothing is
    written."""
    torch = pytest.importorskip("torch")
    from prefixkv import torch_frontend as tf

    caches = [torch.arange(6 * 4, dtype=torch.float32).reshape(6, 4) for _ in range(2)]
    before = [c.clone() for c in caches]
    buf = np.ones((2, 2, 4), np.float32)
    cases = [(lambda: tf.gather_blocks_to_host(caches, ["a"]), TypeError,
              "^block_ids: expected integer block ids"),
             (lambda: tf.gather_blocks_to_host(caches, None), TypeError,
              "^block_ids: expected integer block ids"),
             (lambda: tf.scatter_blocks_from_host(caches, buf, ["a", "b"]), TypeError,
              "^block_ids: expected integer block ids"),
             (lambda: tf.scatter_blocks_from_host([], buf, [0, 1]), ValueError,
              "^caches: expected at least one cache"),
             (lambda: tf.scatter_blocks_from_host(caches, None, [0, 1]), TypeError,
              "^buffer: expected a tensor or numpy array"),
             (lambda: tf.scatter_blocks_from_host(caches, "ab", [0, 1]), TypeError,
              "^buffer: expected a tensor or numpy array")]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
    assert all(c.equal(b) for c, b in zip(caches, before, strict=True))
    tf.scatter_blocks_from_host(caches, buf, [0, 5])  # the valid call writes
    assert caches[1][5].tolist() == [1.0] * 4
    assert tf.gather_blocks_to_host(caches, [5]).tolist() == [[[1.0] * 4] * 2]
