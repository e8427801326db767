"""The README's Python examples run as written (so the 30-second examples stay true)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code):
    if "jax_frontend" in code:
        pytest.importorskip("jax")
    if "torch_frontend" in code:
        pytest.importorskip("torch")
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
