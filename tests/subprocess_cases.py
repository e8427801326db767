"""Runs a cases module (tests/_*_cases.py) with pytest in a subprocess: for cases that need
the environment set before an import (TRITON_INTERPRET=1, a fake cupy) or whose failure may
kill their process (an out-of-bounds access), which is then reported, not fatal to the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def run_cases(module: str, env: dict[str, str], killed: str, *, timeout: int,
              plugins_off: tuple[str, ...] = ("cacheprovider", "randomly")) -> str:
    """pytest -q on tests/``module`` with ``env`` added; fails the calling test when the
    process dies by a signal (``killed`` says what that likely means) or a case fails.
    Returns the run's stdout."""
    args = [sys.executable, "-m", "pytest", "-q"]
    for plugin in plugins_off:
        args += ["-p", f"no:{plugin}"]
    proc = subprocess.run([*args, str(HERE / module)], cwd=HERE.parent,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **env),
                          capture_output=True, text=True, timeout=timeout)
    tail = (proc.stdout + proc.stderr)[-6000:]
    if proc.returncode < 0:
        pytest.fail(f"{module}: process killed by signal {-proc.returncode} ({killed}):\n{tail}")
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout, tail
    return proc.stdout
