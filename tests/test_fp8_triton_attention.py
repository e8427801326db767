"""Runs tests/test_fp8_triton_attention_cases.py (the Triton attention kernel reading
float8_e4m3fn caches, against the reference) under TRITON_INTERPRET=1 in a subprocess: the
variable must be set before triton is imported, and an out-of-bounds access in the interpreter
kills its process; here it is reported as a failure."""

from __future__ import annotations

import pytest
from subprocess_cases import run_cases

pytest.importorskip("triton")
pytest.importorskip("torch")


@pytest.mark.slow(seconds=100)
def test_triton_attention_reads_fp8_under_interpreter():
    run_cases("test_fp8_triton_attention_cases.py", {"TRITON_INTERPRET": "1"},
              "an out-of-bounds access?", timeout=900)
