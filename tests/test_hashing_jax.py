"""prefixkv.jax_frontend.hash_blocks (xla backend) against the BLAKE3 package and the numpy
reference: exact words on ragged batches (empty and short sequences, partial tails, extra,
parent, salts), under jax.jit, salt isolation, and one pytest.raises per input check."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hashing_cases import CASES, make_case, oracle
from prefixkv.jax_frontend._hashing import HASH_BLOCKS_BACKENDS, hash_blocks
from prefixkv.paged.reference.hashing import hash_blocks_reference
from prefixkv.paged.registry import BackendError
from prefixkv.paged.validate import value_checks

BACKENDS = [b for b, why in HASH_BLOCKS_BACKENDS.explain("cpu").items() if why == "ok"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_blake3(name, backend):
    block_size, lens, salt, with_extra, parent = CASES[name]
    case = make_case(np.random.default_rng(zlib.crc32(name.encode())), block_size, lens, salt=salt,
                     with_extra=with_extra, parent=parent)
    extra = None if case["extra"] is None else jnp.asarray(case["extra"])
    got = hash_blocks(jnp.asarray(case["tokens"]), block_size,
                      cu_lens=jnp.asarray(case["cu_lens"]), salt=salt, extra=extra,
                      parent=case["parent"], backend=backend)
    assert got.dtype == jnp.uint32
    np.testing.assert_array_equal(np.asarray(got), oracle(**case))


def test_single_sequence_matches_reference():
    # 2 full blocks of 16 and a tail of 5 that is not hashed: the pure-Python reference
    tokens = np.arange(37, dtype=np.int32)
    got = hash_blocks(tokens, 16, salt="ns")
    assert got.shape == (2, 8)
    np.testing.assert_array_equal(np.asarray(got), hash_blocks_reference(tokens, 16, salt="ns"))


def test_parent_continues_the_chain():
    tokens = np.random.default_rng(1).integers(0, 1000, 64, dtype=np.int32)
    whole = np.asarray(hash_blocks(tokens, 16))
    tail = np.asarray(hash_blocks(tokens[32:], 16, parent=jnp.asarray(whole[1])))
    np.testing.assert_array_equal(tail, whole[2:])


def test_salts_isolate():
    tokens = np.arange(64, dtype=np.int32)
    rows = {s: {r.tobytes() for r in np.asarray(hash_blocks(tokens, 16, salt=s))}
            for s in (None, "a", "b")}
    assert not rows[None] & rows["a"] and not rows["a"] & rows["b"] and not rows[None] & rows["b"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_under_jit_traced_cu_lens(backend):
    case = make_case(np.random.default_rng(2), 16, [40, 0, 33, 16], salt="j")
    f = jax.jit(lambda t, cu: hash_blocks(t, 16, cu_lens=cu, salt="j", backend=backend))
    got = np.asarray(f(jnp.asarray(case["tokens"]), jnp.asarray(case["cu_lens"])))
    exp = oracle(**case)
    # traced cu_lens: num_tokens // block_size rows, the real ones first, then zeros
    assert got.shape == (89 // 16, 8)
    np.testing.assert_array_equal(got[:len(exp)], exp)
    assert not got[len(exp):].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_under_vmap_each_row_hashes_alone(backend):
    """vmap over sequences (the host backend's callback had no vmap rule: the default CPU
    backend raised NotImplementedError)."""
    toks = np.arange(48, dtype=np.int32).reshape(3, 16)
    want = np.stack([hash_blocks_reference(toks[i], 4, salt="v") for i in range(3)])
    got = jax.vmap(lambda t: hash_blocks(t, 4, salt="v", backend=backend))(jnp.asarray(toks))
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.skipif("host" not in BACKENDS, reason="C extension not built")
def test_host_callback_checks_traced_cu_lens():
    f = jax.jit(lambda t, cu: hash_blocks(t, 16, cu_lens=cu, backend="host"))
    with pytest.raises(Exception, match="cu_lens: expected 0, non-decreasing"):
        f(jnp.arange(32, dtype=jnp.int32), jnp.array([0, 40], jnp.int32)).block_until_ready()


def test_concrete_lengths_checked_whatever_tokens_is(monkeypatch):
    """cu_lens known at trace time (a numpy array) is checked even when only tokens is traced,
    and on a device without checked mode: extra's row count with it (they cost no sync)."""
    tok = jnp.arange(16, dtype=jnp.int32)
    bad_cu = np.array([0, 8, 24], np.int32)
    f = jax.jit(lambda t: hash_blocks(t, 4, cu_lens=bad_cu, backend="xla"))
    with pytest.raises(ValueError, match=r"cu_lens: expected cu_lens\[-1\] == num_tokens"):
        f(tok)
    ex3 = jnp.asarray(np.arange(12, dtype=np.uint32).reshape(3, 4))
    g = jax.jit(lambda t, e: hash_blocks(t, 4, cu_lens=np.array([0, 8, 16], np.int32), extra=e,
                                         backend="xla"))
    with pytest.raises(ValueError, match="extra: expected 4 rows"):
        g(tok, ex3)
    with pytest.raises(ValueError, match="extra: expected 4 rows"):
        jax.jit(lambda t, e: hash_blocks(t, 4, extra=e, backend="xla"))(tok, ex3)
    import prefixkv.jax_frontend._hashing as H

    monkeypatch.setattr(H, "_on_host", lambda *xs: False)  # on a device: no checks by default
    with pytest.raises(ValueError, match=r"cu_lens: expected cu_lens\[-1\]"):
        hash_blocks(tok, 4, cu_lens=bad_cu, backend="xla")


def test_under_jit_with_extra_is_exact():
    case = make_case(np.random.default_rng(3), 8, [17, 9], with_extra=True)
    f = jax.jit(lambda t, cu, e: hash_blocks(t, 8, cu_lens=cu, extra=e))
    got = f(jnp.asarray(case["tokens"]), jnp.asarray(case["cu_lens"]), jnp.asarray(case["extra"]))
    np.testing.assert_array_equal(np.asarray(got), oracle(**case))


# ---------------------------------------------------------------------------- bad input

GOOD = dict(tokens=np.arange(32, dtype=np.int32), block_size=16)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(tokens=np.arange(32, dtype=np.int64)), TypeError, "tokens: expected int32"),
    (dict(tokens=np.zeros((2, 16), np.int32)), ValueError, "tokens: expected 1 dimensions"),
    (dict(block_size=0), ValueError, "block_size: expected >= 1"),
    (dict(block_size=16.0), TypeError, "block_size: expected an int"),
    (dict(cu_lens=np.array([0, 32], np.int64)), TypeError, "cu_lens: expected int32"),
    (dict(cu_lens=np.zeros(0, np.int32)), ValueError, "cu_lens: expected shape"),
    (dict(salt=3), TypeError, "salt: expected str, bytes or None"),
    (dict(extra=np.zeros((2, 3), np.uint32)), ValueError, r"extra: expected shape"),
    (dict(extra=np.zeros((3, 4), np.uint32)), ValueError, "extra: expected 2 rows"),
    (dict(extra=np.zeros((2, 4), np.int32)), TypeError, "extra: expected uint32"),
    (dict(parent=b"short"), ValueError, "parent"),
    (dict(parent=np.zeros((3, 8), np.uint32)), ValueError, "parent: expected 32 bytes"),
    (dict(tokens=np.array([1, -2] + [0] * 30, np.int32)), ValueError,
     "tokens: expected token ids >= 0"),
    (dict(cu_lens=np.array([0, 20, 10, 32], np.int32)), ValueError,
     "cu_lens: expected non-decreasing"),
    (dict(cu_lens=np.array([1, 32], np.int32)), ValueError, r"cu_lens: expected cu_lens\[0\]"),
    (dict(cu_lens=np.array([0, 30], np.int32)), ValueError, r"cu_lens: expected cu_lens\[-1\]"),
    (dict(cu_lens=np.array([0, 16, 32], np.int32), extra=np.zeros((1, 4), np.uint32)),
     ValueError, "extra: expected 2 rows"),
])
def test_bad_input(kwargs, exc, match):
    args = {**GOOD, **kwargs}
    with value_checks(), pytest.raises(exc, match=match):
        hash_blocks(args.pop("tokens"), args.pop("block_size"), **args)


def test_unknown_and_impossible_backend():
    with pytest.raises(BackendError, match="unknown backend 'nope'"):
        hash_blocks(GOOD["tokens"], 16, backend="nope")
    with pytest.raises(BackendError, match="pallas_tpu.*runs on tpu"):
        hash_blocks(GOOD["tokens"], 16, backend="pallas_tpu")


def test_jitted_hash_picks_its_backend_when_lowering():
    """Under jax.jit the backend is chosen per platform when lowering (platform_dependent), as
    for the other ops: a TPU export from this CPU host holds the Pallas kernel and not the CPU
    pure_callback (chosen at trace time by jax.default_backend(), it failed to lower), and
    the same jitted function still runs here with the CPU's backend."""
    f = jax.jit(lambda t, c: hash_blocks(t, 16, cu_lens=c, salt="t"))
    shapes = (jax.ShapeDtypeStruct((64,), jnp.int32), jax.ShapeDtypeStruct((3,), jnp.int32))
    text = jax.export.export(f, platforms=["tpu"])(*shapes).mlir_module()
    assert "tpu_custom_call" in text and "callback" not in text
    tokens = np.arange(64, dtype=np.int32)
    cu = np.array([0, 32, 64], np.int32)
    want = hash_blocks_reference(tokens, 16, cu_lens=cu, salt="t")
    np.testing.assert_array_equal(np.asarray(f(tokens, cu)), want)
