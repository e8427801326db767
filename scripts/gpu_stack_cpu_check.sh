#!/usr/bin/env bash
# The CPU test suite under the software of the lent GPU machines (Python 3.12, jax 0.11.2,
# torch 2.11 CUDA build, triton 3.6), on a machine with no GPU: catches API drift between the
# pinned CPU stack of scripts/setup.sh and the versions the device run will meet.
#   bash scripts/gpu_stack_cpu_check.sh [pytest args]     (~7 min on 2 cores, ~5 GB of wheels)
# Builds ./.venv-gpu-stack (ignored by git) once; the GPU-only tests skip, the rest must pass.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-gpu-stack
PY312=${PY312:-python3.12}
if ! "$PY312" -c "" 2>/dev/null && command -v pyenv >/dev/null; then  # a pyenv 3.12 not selected
  # grep reads every line (grep -m1 would exit early: SIGPIPE under pipefail, exit 141)
  v312="$(pyenv versions --bare | grep '^3\.12')"
  PY312="$(pyenv root)/versions/${v312%%$'\n'*}/bin/python3.12"
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY312" -m venv "$VENV"
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
  # The GPU image's versions; the rest at the project's pins where they exist.
  "$VENV/bin/python" -m pip install -q "jax==0.11.2" "jaxlib==0.11.2" "torch==2.11.0" \
    "triton==3.6.0" numpy ml_dtypes blake3 xxhash cbor2 redis hiredis msgpack msgspec pyzmq \
    matplotlib hypothesis \
    pytest pytest-xdist pytest-benchmark scipy
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
fi
"$VENV/bin/python" -c "import sys, jax, torch; print(sys.version.split()[0], 'jax', jax.__version__, 'torch', torch.__version__)"
exec ./scripts/isolated.sh "$VENV/bin/python" -m pytest -n 2 -q -p no:cacheprovider "${@:-tests}"
