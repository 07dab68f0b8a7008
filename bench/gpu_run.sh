#!/usr/bin/env bash
# One call on a lent GPU: install muon from this working tree, run the GPU tests and every benchmark,
# and write everything under OUTDIR (logs, JUnit XML, CSV/JSON/PNG, traces, environment).
#
#   bash bench/gpu_run.sh OUTDIR
#
# The GPU machine may have no network: the install uses --no-deps --no-build-isolation, so the
# machine's own torch (a CUDA build) is kept and nothing is downloaded; missing test/bench extras
# (pytest, pytest-benchmark, matplotlib, tqdm, triton) are reported in OUTDIR/env.txt.
# Every stage runs even if an earlier one fails; the exit status is that of the first failure.
set -uo pipefail

OUT=${1:?usage: bash bench/gpu_run.sh OUTDIR}
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$REPO"
PY=${PYTHON:-python3}
status=0
note() { echo "== $*" | tee -a "$OUT/run.log"; }
stage() {  # stage NAME CMD...: run CMD, log to OUT/NAME.log, remember the first failure
  local name=$1; shift
  note "$name: $*"
  local start=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  note "$name: exit $rc after $((SECONDS - start)) s"
  if [ $rc -ne 0 ] && [ $status -eq 0 ]; then status=$rc; fi
}

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  nvidia-smi 2>&1 || echo "nvidia-smi: not found"
  nvcc --version 2>&1 | tail -1 || true
  "$PY" - <<'PY'
import importlib
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0))
for name in ("triton", "pytest", "pytest_benchmark", "matplotlib", "tqdm",
             "dion", "emerging_optimizers", "gram_newton_schulz"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "installed"))
    except ImportError:
        print(name, "MISSING")
PY
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# Editable install: the CUDA extension (when csrc/ has one) is built in place, so the checkout that
# the tests and `python -m bench` import is the one that has it.
stage install "$PY" -m pip install --no-deps --no-build-isolation -e .

# GPU tests and the Triton-interpreter tests; then the whole suite (CPU paths too) for the record.
stage test_gpu "$PY" -m pytest -q -m "gpu or interpret" --junitxml="$OUT/junit_gpu.xml"
stage test_all "$PY" -m pytest -q --junitxml="$OUT/junit_all.xml"

# All benchmarks for this device (FLOP model, kernels, optimizer steps, profile) into OUT/bench.
stage bench "$PY" -m bench all --out "$OUT/bench"
# Symmetric-kernel FLOP accounting beside the plain one, for reading effective rates.
stage flops_symmetric "$PY" -m bench flops --symmetric --out "$OUT/bench/flops_symmetric"
# pytest-benchmark microbenchmarks (CPU paths), with their JSON.
stage microbench "$PY" -m pytest -q bench/test_bench_cpu.py -o addopts="" --benchmark-only \
  --benchmark-json="$OUT/microbench.json" -p no:cacheprovider

note "done: results under $OUT (exit $status)"
exit $status
