"""The wheel holds the whole package: every module of the five import roots and every source
the kernels compile at runtime (the C++ of the CPU decode and cache-op kernels, the CUDA C of
the swap and hash kernels, the C of the host hash). The tests run from an editable install,
which reads the checkout, so only a built wheel shows what an installed package lacks.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: checkout folder -> the import package it installs as (setup.py's ROOTS)
PACKAGES = {"prefixkv": "prefixkv", "paged": "prefixkv/paged", "kernels": "prefixkv/kernels",
            "jax_frontend": "prefixkv/jax_frontend", "torch_frontend": "prefixkv/torch_frontend"}


def _tracked() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout (the tracked files define the package)")
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True,
                         check=True).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


def _installed_name(path: str) -> str | None:
    folder, _, rest = path.partition("/")
    return f"{PACKAGES[folder]}/{rest}" if folder in PACKAGES and rest else None


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    pytest.importorskip("setuptools", minversion="77")
    tracked = _tracked()
    src = tmp_path_factory.mktemp("src")
    for f in tracked:  # build from the tracked files only: no build/ or egg-info of the checkout
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    dist = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                        "--no-build-isolation", "--no-cache-dir", "-q", "-w", str(dist)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = dist.glob("prefixkv-*.whl")
    with zipfile.ZipFile(wheel) as z:
        return set(z.namelist())


def test_wheel_holds_every_module_and_kernel_source(wheel_names):
    shipped = (".py", ".cu", ".cc", ".c", ".h", "py.typed")
    missing = [f for f in _tracked()
               if _installed_name(f) is not None and f.endswith(shipped)
               and _installed_name(f) not in wheel_names]
    assert not missing, f"files the installed package lacks: {missing}"


def test_wheel_holds_the_sources_the_kernels_open(wheel_names):
    """The paths the kernel modules read at runtime, named by the modules themselves."""
    from prefixkv.kernels.cpu import block_copy, decode, xla_ffi
    from prefixkv.kernels.cuda import hashing, swap

    paths = [*xla_ffi.SOURCES, *xla_ffi.HEADERS, decode.SOURCE, block_copy.SOURCE,
             hashing.SOURCE, swap.SOURCE]
    for p in paths:
        rel = Path(p).resolve().relative_to(ROOT).as_posix()
        assert _installed_name(rel) in wheel_names, rel
