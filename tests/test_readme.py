"""The Python examples of the README and of docs/host.md run as written (so the 30-second
examples and the engine-loop rules stay true)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = {"readme": ROOT / "README.md", "host": ROOT / "docs" / "host.md"}
BLOCKS = [(f"{name}-block{i}", code, path) for name, path in DOCS.items()
          for i, code in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(),
                                              flags=re.S))]


@pytest.mark.parametrize("code,path", [b[1:] for b in BLOCKS], ids=[b[0] for b in BLOCKS])
def test_readme_example_runs(code, path):
    if "jax_frontend" in code:
        pytest.importorskip("jax")
    if "torch_frontend" in code:
        pytest.importorskip("torch")
    if "vllm_events" in code or "Vllm" in code:  # prefixkv[events]
        pytest.importorskip("msgpack")
    exec(compile(code, str(path), "exec"), {"__name__": "readme_example"})
