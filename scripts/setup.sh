#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs prefixkv with every extra, at the pinned versions of
# scripts/constraints.txt, plus the services the tests use (redis-server and libibverbs1 from Debian).
# CPU-only machines: torch comes as the CPU build (see README); nothing is probed at import time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
# torch first, pinned: on these CPU machines `torch==2.13.0` resolves to a local CPU wheel;
# elsewhere set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu for the CPU build.
.venv/bin/python -m pip install -q -c scripts/constraints.txt torch
.venv/bin/python -m pip install -q -c scripts/constraints.txt -e ".[all]"
# NIXL (UCX agent-to-agent transfers, works DRAM-to-DRAM on a CPU machine) for the NIXL tier:
# --no-deps, since its meta package would pull a CUDA build of torch.
.venv/bin/python -m pip install -q --no-deps -c scripts/constraints.txt nixl nixl-cu12
# Mooncake store (the non-CUDA build; its TCP transport) for the Mooncake tier.
.venv/bin/python -m pip install -q -c scripts/constraints.txt mooncake-transfer-engine-non-cuda
if [ -f scripts/services.sh ]; then
  bash scripts/services.sh install
fi
echo "prefixkv installed in .venv"
