"""Installs with fewer extras than ``all``: a missing framework, matplotlib or pyzmq is named
with the extra that brings it, and the demo decides what it can run before any work.

Each case runs in a fresh interpreter where the package is made missing by
``sys.modules[name] = None`` (importing it then raises ImportError, as when it is not
installed): the test process keeps its modules."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
OTHER = {"jax": "torch", "torch": "jax"}
# the smallest demo run (numpy or torch: ~1 s of work; jax compiles for ~12 s, so its runs are
# left to tests/test_models.py)
TINY = ["--layers", "1", "--hidden", "32", "--intermediate", "32", "--q-heads", "2",
        "--kv-heads", "1", "--head-dim", "16", "--vocab", "64", "--system-prompt-len", "32",
        "--chats", "1", "--turns", "2", "--unique", "1", "--max-new-tokens", "2",
        "--block-size", "8", "--num-blocks", "64", "--max-batched-tokens", "32",
        "--min-token-bucket", "32", "--threads", "0", "--compile-cache", "",
        "--max-model-len", "256", "--requests", "2"]
DEMO = "from prefixkv import demo; demo.main(sys.argv[1:])"


def _python(missing: tuple[str, ...], code: str, *args: str) -> subprocess.CompletedProcess:
    """``python -c code args`` with the packages ``missing`` made not importable."""
    boot = f"import sys; sys.modules.update(dict.fromkeys({list(missing)!r}))\n"
    return subprocess.run([sys.executable, "-c", boot + code, *args], cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=120)


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@pytest.mark.parametrize(("fw", "name"), [("jax", "JAX"), ("torch", "PyTorch")])
def test_frontend_import_names_the_extra(fw, name):
    proc = _python((fw,), f"import prefixkv.{fw}_frontend")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ImportError: prefixkv.{fw}_frontend needs {name}: pip install "
                           f"'prefixkv[{fw}]'"), proc.stderr
    # raised from the original error, which the traceback still shows
    assert "direct cause of the following exception" in proc.stderr, proc.stderr


@pytest.mark.parametrize(("fw", "name"), [("jax", "JAX"), ("torch", "PyTorch")])
def test_demo_explicit_frontend_missing_stops_at_once(fw, name):
    proc = _python((fw,), DEMO, "--frontend", fw, *TINY)
    assert proc.returncode == 2, proc.stderr
    assert (f"error: --frontend {fw} needs {name}: pip install 'prefixkv[{fw}]' "
            f"(or --frontend numpy)") in proc.stderr, proc.stderr
    assert proc.stdout == ""  # not even the header: no work done


def test_demo_both_with_neither_installed_stops_at_once():
    proc = _python(("jax", "torch"), DEMO, *TINY)
    assert proc.returncode == 2, proc.stderr
    assert ("error: --frontend both needs JAX or PyTorch: pip install 'prefixkv[jax]' or "
            "'prefixkv[torch]' (or --frontend numpy)") in proc.stderr, proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("fw", ["jax", "torch"])
def test_demo_both_picks_the_installed_framework(fw):
    """The decision alone (a jax-only run compiles for ~12 s; the torch-only run is below)."""
    if not _installed(OTHER[fw]):
        pytest.skip(f"{OTHER[fw]} is not installed")
    proc = _python((fw,), "from prefixkv import demo; a = demo.parse_args([])\n"
                          "print(a.frameworks, a.skipped)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{[OTHER[fw]]} {[fw]}"


def test_demo_both_without_jax_runs_torch_and_says_so():
    if not _installed("torch"):
        pytest.skip("torch is not installed")
    proc = _python(("jax",), DEMO, *TINY)
    assert proc.returncode == 0, proc.stderr
    assert ("JAX is not installed, so --frontend both runs torch only (pip install "
            "'prefixkv[jax]' to run it too)") in proc.stdout, proc.stdout
    assert "== torch (cpu) ==" in proc.stdout and "== jax" not in proc.stdout
    assert "generations identical with caching on and off: yes" in proc.stdout


def test_demo_plot_without_matplotlib_stops_at_once(tmp_path):
    plot = tmp_path / "ttft.png"
    proc = _python(("matplotlib",), DEMO, "--frontend", "numpy", "--plot", str(plot), *TINY)
    assert proc.returncode == 2, proc.stderr
    assert "error: --plot needs matplotlib: pip install matplotlib" in proc.stderr, proc.stderr
    assert "prefixkv[bench]" in proc.stderr
    assert proc.stdout == "" and not plot.exists()


def test_zmq_transport_without_pyzmq_names_the_events_extra():
    proc = _python(("zmq",), "from prefixkv.paged.vllm_zmq import VllmEventPublisher\n"
                             "VllmEventPublisher(16, 'inproc://missing-extras')")
    assert proc.returncode != 0
    assert ("ImportError: the ZMQ event transport needs the pyzmq package (pip install "
            "'prefixkv[events]')") in proc.stderr, proc.stderr
