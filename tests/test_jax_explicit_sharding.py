"""The cache-updating ops (write_kv, copy_blocks, scatter_blocks) under plain jax.jit return
each cache with its input cache's sharding, on meshes of Explicit and Auto axes, caches
replicated or sharded over blocks, kv heads or head_dim, keys sharded or not: a loop carries
the caches (Explicit axes had failed "carry input and carry output must have equal types"),
a donated cache is updated in place, the results are bit-exact. One worker subprocess
(XLA_FLAGS=--xla_force_host_platform_device_count=4 before jax is imported) runs every case."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")

WORKER = Path(__file__).with_name("jax_explicit_sharding_worker.py")
GROUPS = ["write_kv_explicit", "write_kv_auto", "block_ops_explicit", "block_ops_auto"]


@pytest.fixture(scope="module")
def worker_lines() -> list[str]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.splitlines()


@pytest.mark.parametrize("group", GROUPS)
def test_caches_keep_their_sharding(worker_lines, group):
    failed = [line for line in worker_lines if line.startswith(f"FAIL {group} ")]
    assert not failed, "\n".join(failed)
    done = [line.split()[2] for line in worker_lines if line.startswith(f"DONE {group} ")]
    ok = [line for line in worker_lines if line.startswith(f"OK {group} ")]
    assert done == [str(len(ok))], worker_lines
