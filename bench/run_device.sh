#!/usr/bin/env bash
# The accelerator checks of prefixkv, for a lent GPU/TPU machine (well under 8 minutes):
# the compiled kernels against the numpy reference, then the device benchmarks.
#   bash bench/run_device.sh            (from the repository root, in the project's env)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"
# JAX: every op compiled for the device (Pallas kernels on TPU, XLA/Pallas on GPU)
timeout 240 $PY -m pytest -q -x tests/test_jax_device.py
timeout 180 $PY -m pytest -q bench/bench_jax_attention.py --benchmark-only -k device \
  --benchmark-columns=mean,min,rounds
