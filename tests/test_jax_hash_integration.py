"""prefixkv.jax_frontend.hash_blocks where a serving loop runs it: repeated eager calls on the
CPU (the host backend's pure_callback is compiled once per static config, not once per call),
and inside a user's jax.shard_map with its default check_vma=True (every backend, the Pallas
kernel in TPU interpret mode, TPU and CPU exports), the latter in a subprocess with 4 host
devices (tests/jax_hash_sharding_worker.py: XLA_FLAGS must be set before jax is imported)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax._src import dispatch
from prefixkv.jax_frontend import _hashing
from prefixkv.jax_frontend._hashing import HASH_BLOCKS_BACKENDS, hash_blocks
from prefixkv.paged.reference.hashing import hash_blocks_reference

WORKER = Path(__file__).with_name("jax_hash_sharding_worker.py")

# block 16, 64 tokens in three sequences, 3 full blocks each way (one static config, so one
# compiled callback): empty sequences and partial tails
CU_LENS = {"1+1+1": [0, 17, 34, 64], "3+0+0": [0, 48, 50, 64], "0+1+2": [0, 0, 20, 64]}
SALTS = [None, "tenant-a", b"tenant-b"]


def _variants(rng):
    """(kwargs, reference) pairs sharing shapes: the salt, the lengths, the parents and the
    extra words vary, all of them operands of the one cached callback."""
    tokens = rng.integers(0, 2**31 - 1, 64, dtype=np.int32)
    out = []
    for (name, cu), salt in zip(CU_LENS.items(), SALTS, strict=True):
        cu = np.array(cu, np.int32)
        parent = rng.integers(0, 2**32, (3, 8), dtype=np.uint64).astype(np.uint32)
        extra = rng.integers(0, 2**32, (3, 4), dtype=np.uint64).astype(np.uint32)
        for kw in (dict(cu_lens=cu, salt=salt), dict(cu_lens=cu, salt=salt, parent=parent),
                   dict(cu_lens=cu, salt=salt, extra=extra)):
            out.append((name, kw, hash_blocks_reference(tokens, 16, **kw)))
    return tokens, out


@pytest.mark.skipif(HASH_BLOCKS_BACKENDS.explain("cpu")["host"] != "ok",
                    reason="the host backend needs the compiled C extension")
def test_eager_host_calls_compile_once():
    """A second pass over the same calls compiles nothing (a fresh functools.partial per call
    made every eager call an XLA compile: 25 ms instead of 0.5), and the cached callback binds
    only static shapes: every salt, lengths, parents and extra gives its own exact result."""
    tokens, variants = _variants(np.random.default_rng(3))
    compiles = []

    def listener(event, duration, **kwargs):
        if event == dispatch.BACKEND_COMPILE_EVENT:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for rnd in range(2):
            before = len(compiles)
            for name, kw, want in variants:
                got = hash_blocks(tokens, 16, backend="host", **kw)
                np.testing.assert_array_equal(np.asarray(got), want, err_msg=name)
            if rnd:
                assert len(compiles) == before, f"{len(compiles) - before} compiles"
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    callback = _hashing._host_callback
    assert callback(16, 3) is callback(16, 3)
    assert callback.cache_info().maxsize is not None  # bounded


@pytest.fixture(scope="module")
def shard_map_run() -> str:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True,
                          timeout=600, env=env)
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("section", [
    "xla", "host", "default",  # the frontend, exact against the reference and unsharded calls
    "pallas_interpret",  # the kernel's out_shape declares the varying mesh axes
    "export_tpu",  # the default backend's TPU branch (the Pallas kernel) lowers
    "export_cpu_xla",  # backend="xla" exports for the CPU and runs
])
def test_in_shard_map_with_check_vma(shard_map_run, section):
    assert f"OK {section}\n" in shard_map_run, shard_map_run


def test_in_shard_map_requested_pallas_tpu_exports_for_tpu(shard_map_run):
    assert "OK export_tpu_requested\n" in shard_map_run, shard_map_run


def test_numpy_tokens_are_value_checked_on_an_accelerator_host(monkeypatch):
    """Host inputs are value-checked by default wherever jax's default backend is: numpy
    tokens on a TPU or GPU machine had skipped the check (the decision read the default
    backend, not where the tokens are), so a negative id was hashed."""
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    tokens = np.array([-5, 1, 2, 3, 4, 5, 6, 7], np.int32)
    with pytest.raises(ValueError, match=r"^tokens"):
        hash_blocks(tokens, 4)


def test_a_traced_parent_alone_stages_the_requested_backend():
    """A parent traced while the tokens are concrete: the call is traced, so a backend of
    another platform is staged for it (exported for the TPU here), not refused on the CPU."""
    tokens = np.arange(8, dtype=np.int32)
    parent = jax.numpy.zeros(8, jax.numpy.uint32)
    exported = jax.export.export(
        jax.jit(lambda p: hash_blocks(tokens, 4, parent=p, backend="pallas_tpu")),
        platforms=["tpu"])(parent)
    assert "tpu_custom_call" in exported.mlir_module()
