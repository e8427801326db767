"""Every CUDA C source of the transfer path compiled for sm_80 and sm_90 with nvcc (no GPU
needed); skipped with a reason when nvcc is absent."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SOURCES = [Path(__file__).parent.parent / "kernels" / "cuda" / "swap_blocks.cu"]
NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists()
                                else None)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles(source, arch, tmp_path):
    out = tmp_path / f"{source.stem}_{arch}.cubin"
    res = subprocess.run([NVCC, "-cubin", f"-arch={arch}", "-std=c++17", "-Werror",
                          "all-warnings", "-Xptxas", "-v", "-o", str(out), str(source)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert out.stat().st_size > 0
    used = [ln.strip() for ln in res.stderr.splitlines() if "Used" in ln]
    print(f"\n{source.name} {arch}: {used}")
