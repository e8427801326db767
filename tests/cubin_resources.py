"""Registers and stack bytes (spills) per thread of a compiled CUDA kernel, read by cuobjdump
(Triton's bundled copy, else one on PATH): shared by the tests that compile kernels for
sm_80/sm_90 with no GPU present."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path


def cuobjdump() -> str | None:
    try:
        import triton
    except ImportError:
        return shutil.which("cuobjdump")
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")


def resources(cubin: bytes) -> dict[str, int]:
    """{"REG": registers, "STACK": stack bytes} per thread (empty where cuobjdump is missing)."""
    tool = cuobjdump()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True)
    out = {}
    for tok in res.stdout.replace(",", " ").split():
        key, _, val = tok.partition(":")
        if key in ("REG", "STACK") and val.isdigit():
            out[key] = int(val)
    return out
