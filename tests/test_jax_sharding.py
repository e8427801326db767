"""Tensor parallelism (kv heads sharded over a 4-device mesh) on CPU: the worker script sets
XLA_FLAGS=--xla_force_host_platform_device_count=4 before importing jax, so it runs in a
subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")

WORKER = Path(__file__).with_name("jax_sharding_worker.py")


def _run(*args: str) -> str:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.slow(seconds=25)
def test_tensor_parallel_xla():
    out = _run()
    assert "OK attention None" in out and "OK write_kv" in out and "OK error" in out
    assert "OK attention sinks" in out
    assert "OK check_vma" in out
    assert "OK unsharded default" in out and "OK unsharded auto" in out


@pytest.mark.slow(seconds=25)
def test_tensor_parallel_16bit_and_fp8_caches():
    out = _run("dtypes")
    for dtype in ("bfloat16", "float16", "float8_e4m3fn"):
        assert f"OK dtypes {dtype}" in out, out


def test_tensor_parallel_pallas_kernel_interpret():
    assert "OK attention pallas_interpret" in _run("pallas_interpret")


def test_tensor_parallel_hnd_one_kv_head_per_device():
    out = _run("hnd")
    assert "OK hnd attention pallas_interpret" in out and "OK hnd attention xla" in out
    assert "OK hnd write_kv" in out


@pytest.mark.slow(seconds=60)
def test_plain_jit_partitions_over_the_heads():
    """No shard_map: the ops on head-sharded arrays under plain jit, Auto and Explicit mesh
    axes, both cache layouts; no all-gather in the compiled programs."""
    out = _run("plain_jit")
    for kind in ("auto", "explicit"):
        for layout in ("NHD", "HND"):
            assert f"OK plain jit {kind} {layout}" in out
    assert "OK plain jit 2d mesh" in out and "OK plain jit plan" in out
    assert "OK plain jit export" in out and "OK plain jit vmap" in out
    assert "OK plain jit scan" in out and "OK plain jit mixed block shapes" in out
    assert "OK plain jit mqa" in out and "OK plain jit vmap of jit" in out
    assert "OK plain jit explicit vmap export" in out
