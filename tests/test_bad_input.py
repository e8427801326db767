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
