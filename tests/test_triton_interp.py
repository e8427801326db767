"""Runs tests/_triton_interp_cases.py (every Triton kernel vs the numpy reference) under
TRITON_INTERPRET=1 in a subprocess: the variable must be set before triton is imported, and an
out-of-bounds access in the interpreter kills its process; here it is reported as a failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from subprocess_cases import run_cases

pytest.importorskip("triton")
pytest.importorskip("torch")

HERE = Path(__file__).parent


@pytest.mark.slow(seconds=130)
def test_triton_kernels_under_interpreter():
    run_cases("_triton_interp_cases.py", {"TRITON_INTERPRET": "1"},
              "an out-of-bounds access?", timeout=900)


def test_triton_offsets_past_2_31_under_interpreter():
    """tests/_triton_big_offsets.py: caches of more than 2**31 elements (lazily committed, ~300
    MB touched), block-major at their last blocks and head-outermost views; a 32-bit offset
    wraps and the interpreter process dies. ~7 s."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(HERE / "_triton_big_offsets.py")], cwd=HERE.parent,
                          env=env, capture_output=True, text=True, timeout=300)
    tail = (proc.stdout + proc.stderr)[-6000:]
    if proc.returncode == 3:
        pytest.skip(f"no address space for the big caches: {tail[-300:]}")
    if proc.returncode < 0:
        pytest.fail(f"interpreter process killed by signal {-proc.returncode} (a 32-bit offset "
                    f"wrapped?):\n{tail}")
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("PASS"), tail
