#!/usr/bin/env bash
# Makes prefixkv importable on a lent GPU/TPU machine, from the repository root, with the
# image's Python and no network: an editable install (setuptools already there, no deps);
# where the tree's own prefixkv/ folder then shadows it (python run from the root puts the
# root first on sys.path), the top-level folders are linked into that folder instead (this
# copy of the tree only). bench/run_device.sh runs it first; for a single command:
#   bash bench/device_setup.sh && python3 -m pytest -q tests/test_torch_gpu.py
# Exit status 0 when `import prefixkv.torch_frontend` works afterwards.
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
importable() { timeout -k 10 30 $PY -c "import prefixkv.torch_frontend" 2>/dev/null; }
importable && exit 0
timeout -k 10 30 $PY -m pip install -q --no-deps --no-build-isolation --no-cache-dir -e . \
  2>&1 | grep -v "Running pip as the 'root' user" | tail -3
importable && exit 0
for f in paged kernels jax_frontend torch_frontend; do ln -sfn "../$f" "prefixkv/$f"; done
timeout -k 10 30 $PY -c "import prefixkv.torch_frontend"
