#!/usr/bin/env bash
# The accelerator checks of prefixkv, for a lent GPU/TPU machine (well under 8 minutes):
# the compiled kernels against the numpy reference, then the device benchmarks.
#   bash bench/run_device.sh            (from the repository root, in the project's env)
# Every command runs under `timeout -k 10`; the limits sum to 475 s (versions 20, set-up 60
# (bench/device_setup.sh), fp8 on CUDA 15, torch tests 90, torch bench 75, hashing 25, jax
# versions 15, JAX tests 75, JAX bench 100; on an H200 (2026-11-30) the torch tests took
# 60 s, fp8 7, the torch bench 55, hashing 20, the JAX tests 55, the JAX bench 83: 400 s in
# all with three tune_device.py sweeps after it).
# Files in $OUT (when set, else /tmp/prefixkv_device; at most 8 come back from a lent
# machine): run.log (every step's output), bench_figures.jsonl (each benchmark's figures as
# soon as it finishes, so a step cut off by its limit still leaves those it measured),
# torch_gpu_bench.json, hash_gpu_bench.json, jax_device_bench.json (pytest-benchmark's JSON,
# written when a step ends normally); any of them, the JSON lines included, goes to
# `python bench/report.py FILE` for the tables. Each run starts them afresh: the log and the
# figures are appended to as the steps go, so an earlier run's would read as this one's.
# Each section runs even when an earlier one failed; the exit status says whether all passed.
# A run that measures nothing does not pass: the torch probe fails without CUDA, the JAX
# probe when JAX runs on the CPU, a pytest step when no test passed (all skipped or
# deselected), and a benchmark step when its JSON is missing or holds no benchmark.
# Sweeps that are not part of it: bench/tune_device.py (e.g. `fulltiles 60`: the Triton
# kernel's unmasked whole key steps, kernels/triton/attention.py FULL_TILES, A/B).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${OUT:-/tmp/prefixkv_device}
mkdir -p "$LOG"
# only the files this script writes: $OUT may hold others
rm -f "$LOG/run.log" "$LOG/bench_figures.jsonl" "$LOG/torch_gpu_bench.json" \
  "$LOG/hash_gpu_bench.json" "$LOG/jax_device_bench.json"
STEP_OUT=$(mktemp)  # one step's output, to look for passed tests (outside $OUT)
trap 'rm -f "$STEP_OUT"' EXIT
status=0
step() {  # step NAME TIMEOUT_S CMD...: run, tee its log, remember a failure; pytest exits 0
  # when every test skipped (no accelerator), so a run in which none passed fails too
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s)" | tee -a "$LOG/run.log"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG/run.log" | tee "$STEP_OUT"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc" | tee -a "$LOG/run.log"
  [ "$rc" -eq 0 ] || status=1
  if [ "$rc" -eq 0 ] && ! grep -Eq '[0-9]+ passed' "$STEP_OUT"; then
    echo "=== $name: FAILED, no test passed (all skipped or deselected)" | tee -a "$LOG/run.log"
    status=1
  fi
}
bench_json() {  # bench_json NAME FILE: a benchmark step fails unless FILE holds a benchmark
  local n
  n=$($PY -c "import json, sys; print(len(json.load(open(sys.argv[1]))['benchmarks']))" \
    "$2" 2>/dev/null) || n=0
  if [ "$n" -gt 0 ] 2>/dev/null; then
    echo "=== $1: $n benchmarks in $(basename "$2")" | tee -a "$LOG/run.log"
  else
    echo "=== $1: FAILED, no benchmark in $(basename "$2") (missing or empty)" \
      | tee -a "$LOG/run.log"
    status=1
  fi
}
note() {  # note NAME TIMEOUT_S CMD...: as step, output to stdout only (no log file in $OUT)
  local name=$1 limit=$2
  shift 2
  timeout -k 10 "$limit" "$@" 2>&1
  local rc=$?
  [ "$rc" -eq 0 ] || { echo "=== $name: exit $rc"; status=1; }
  return "$rc"
}

export PYTHONUNBUFFERED=1
export PREFIXKV_BENCH_JSONL="$LOG/bench_figures.jsonl"  # see bench/conftest.py
# the XLA:CPU FFI library of kernels/cpu is otherwise compiled while tracing (~16 s), though
# its CPU branch is pruned on a GPU/TPU; the CPU suite covers it
export PREFIXKV_DISABLE_CPU_FFI=1

# fails without CUDA: every torch step would skip and measure nothing
note torch_versions 20 $PY -c "import sys, torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda'); torch.cuda.is_available() or sys.exit('torch sees no CUDA device')"
# prefixkv importable (an editable install, else the folders linked: bench/device_setup.sh)
PYTHON=$PY timeout -k 10 60 bash bench/device_setup.sh || { echo "=== setup: exit $?"; status=1; }

# ---- PyTorch: Triton + CUDA C kernels vs the reference, CUDA graphs, compile
step torch_gpu_tests 90 $PY -m pytest -q -rfE -p no:cacheprovider tests/test_torch_gpu.py
# ---- fp8 (float8_e4m3fn) KV caches on CUDA: quantizing writes bit-exact, attention vs reference
step fp8_gpu 15 $PY -m pytest -q -rfE -p no:cacheprovider tests/test_fp8.py -k cuda
# ---- PyTorch GPU benchmarks: decode at % of HBM, swap vs measured PCIe
step torch_gpu_bench 75 $PY -m pytest -q -p no:cacheprovider bench/bench_torch_attention.py \
  bench/bench_torch_copy.py bench/bench_device_cache_ops.py --benchmark-only -k gpu \
  --benchmark-columns=mean,min,rounds \
  --benchmark-json="$LOG/torch_gpu_bench.json"
bench_json torch_gpu_bench "$LOG/torch_gpu_bench.json"

# ---- Block hashing on the GPU: Triton + CUDA C vs the blake3 oracle, 1024 x 4096 tokens (18 s on an H200)
step hash_gpu 25 $PY -m pytest -q -p no:cacheprovider tests/test_hashing_torch.py \
  bench/bench_hashing_device.py -k gpu --benchmark-columns=mean,min,rounds \
  --benchmark-json="$LOG/hash_gpu_bench.json"
bench_json hash_gpu "$LOG/hash_gpu_bench.json"

# ---- JAX: every op compiled for the device (Pallas kernels on TPU, XLA/Pallas on GPU)
# versions and devices; exit 3: no jax installed, the section is skipped (not a failure);
# JAX on the CPU (no GPU/TPU plugin, or one that failed to start) fails: nothing would run
timeout -k 10 15 $PY -c "import importlib.util as u, sys; u.find_spec('jax') or sys.exit(3)
import jax; print('jax', jax.__version__, jax.devices())
jax.default_backend() != 'cpu' or sys.exit('JAX runs on the CPU: no GPU or TPU')" 2>&1
rc=$?
if [ "$rc" -eq 3 ]; then
  echo "=== jax not installed: JAX steps skipped"
else
  [ "$rc" -eq 0 ] || { echo "=== jax_versions: exit $rc"; status=1; }
  step jax_device_tests 75 $PY -m pytest -q -rfE -p no:cacheprovider tests/test_jax_device.py
  # decode, cascade decode and prefill on the device, cache writes and block moves (XLA); on
  # a TPU also block hashing (Pallas vs XLA; skipped on a GPU)
  step jax_device_bench 100 $PY -m pytest -q -p no:cacheprovider bench/bench_jax_attention.py \
    bench/bench_hashing_device.py bench/bench_device_cache_ops.py --benchmark-only \
    -k "decode_device or shared_prefix_device or prefill_device or tpu_hash or device_cache_jax" \
    --benchmark-columns=mean,min,rounds --benchmark-json="$LOG/jax_device_bench.json"
  bench_json jax_device_bench "$LOG/jax_device_bench.json"
fi
exit $status
