"""The CUDA C launchers (kernels/cuda/swap.py ``swap_blocks``, kernels/cuda/hashing.py
``hash_blocks_cuda``) run without a GPU: tests/_cuda_launcher_cases.py, in a subprocess, with
tests/fake_cupy.py in place of CuPy (its kernels are kernels/cuda/*.cu compiled as host C++ by
test_cuda_on_host.py's ``lib`` fixture) and torch's CUDA calls stubbed. The fake and the stubs
patch torch for the whole process, so they never enter this one; a kernel's out-of-bounds
access kills the subprocess and is reported here as a failure. ~20 s (49 cases, ~8 s).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_cuda_on_host import lib  # noqa: E402, F401  (the fixture: kernels as a host library)

HERE = Path(__file__).parent


def test_cuda_launchers_on_host(lib):  # noqa: F811
    pytest.importorskip("torch")
    env = dict(os.environ, PREFIXKV_CUDA_HOST_SHIM=lib._name, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         "-p", "no:xdist", str(HERE / "_cuda_launcher_cases.py")],
        cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    if proc.returncode < 0:
        pytest.fail(f"launcher process killed by signal {-proc.returncode} (a kernel's "
                    f"out-of-bounds access?):\n{tail}")
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, tail
