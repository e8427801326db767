#!/usr/bin/env bash
# The accelerator checks of prefixkv, for a lent GPU/TPU machine (well under 8 minutes):
# the compiled kernels against the numpy reference, then the device benchmarks.
#   bash bench/run_device.sh            (from the repository root, in the project's env)
# Step limits sum to 470 s. Logs go to $OUT (when set) as torch_*.log / hash_gpu.log / jax_*.log and benchmark JSON. Each section runs
# even when an earlier one failed; the exit status says whether all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${OUT:-/tmp/prefixkv_device}
mkdir -p "$LOG"
status=0
step() {  # step NAME TIMEOUT_S CMD...: run, tee its log, remember a failure
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$LOG/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc"
  [ "$rc" -eq 0 ] || status=1
}

# prefixkv importable: an editable install with the image's setuptools (no network, no deps)
if ! $PY -c "import prefixkv.torch_frontend" 2>/dev/null; then
  $PY -m pip install -q --no-deps --no-build-isolation --no-cache-dir -e . 2>&1 | tail -3
fi
export PYTHONUNBUFFERED=1

# ---- PyTorch: Triton + CUDA C kernels vs the reference, CUDA graphs, compile (~2 min)
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
step torch_gpu_tests 130 $PY -m pytest -q -rfE -p no:cacheprovider tests/test_torch_gpu.py
# ---- PyTorch GPU benchmarks: decode at % of HBM, swap vs measured PCIe (~1.5 min)
step torch_gpu_bench 110 $PY -m pytest -q -p no:cacheprovider bench/bench_torch_attention.py \
  bench/bench_torch_copy.py --benchmark-only -k gpu --benchmark-columns=mean,min,rounds \
  --benchmark-json="$LOG/torch_gpu_bench.json"

# ---- Block hashing on the GPU: Triton + CUDA C vs the blake3 oracle, 1024 x 4096 tokens (~40 s)
step hash_gpu 60 $PY -m pytest -q -p no:cacheprovider tests/test_hashing_torch.py \
  bench/bench_hashing_device.py -k gpu --benchmark-columns=mean,min,rounds \
  --benchmark-json="$LOG/hash_gpu_bench.json"

# ---- JAX: every op compiled for the device (Pallas kernels on TPU, XLA/Pallas on GPU)
if $PY -c "import jax" 2>/dev/null; then
  $PY -c "import jax; print('jax', jax.__version__, jax.devices())"
  step jax_device_tests 100 $PY -m pytest -q -rfE -p no:cacheprovider tests/test_jax_device.py
  step jax_device_bench 70 $PY -m pytest -q -p no:cacheprovider bench/bench_jax_attention.py \
    --benchmark-only -k device --benchmark-columns=mean,min,rounds
fi
exit $status
