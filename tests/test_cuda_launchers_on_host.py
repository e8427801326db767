"""The CUDA C launchers (kernels/cuda/swap.py ``swap_blocks``, kernels/cuda/hashing.py
``hash_blocks_cuda``) run without a GPU: tests/_cuda_launcher_cases.py, in a subprocess, with
tests/fake_cupy.py in place of CuPy (its kernels are kernels/cuda/*.cu compiled as host C++ by
test_cuda_on_host.py's ``lib`` fixture) and torch's CUDA calls stubbed. The fake and the stubs
patch torch for the whole process, so they never enter this one; a kernel's out-of-bounds
access kills the subprocess and is reported here as a failure. ~20 s (55 cases, ~8 s).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from subprocess_cases import run_cases  # noqa: E402
from test_cuda_on_host import lib  # noqa: E402, F401  (the fixture: kernels as a host library)


def test_cuda_launchers_on_host(lib):  # noqa: F811
    pytest.importorskip("torch")
    out = run_cases("_cuda_launcher_cases.py", {"PREFIXKV_CUDA_HOST_SHIM": lib._name},
                    "a kernel's out-of-bounds access?", timeout=600,
                    plugins_off=("cacheprovider", "randomly", "xdist"))
    assert "skipped" not in out, out[-3000:]
