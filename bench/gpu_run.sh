#!/usr/bin/env bash
# One call on a lent GPU: install muon from this working tree, run the GPU tests and every GPU
# benchmark, and leave everything under OUTDIR — in under 9 minutes on an H100.
#
#   bash bench/gpu_run.sh OUTDIR
#
# OUTDIR ends with at most 6 files, no folders (what a device machine hands back is limited):
#   run.log         stage commands, exit codes, seconds
#   env.txt         date, commit, nvidia-smi, versions of torch/triton/peers (MISSING when absent)
#   kernels.csv     `python -m bench kernels`: the format muon/backends/dispatch.py reads its table from
#                   (python -m muon.backends.dispatch OUTDIR/kernels.csv prints the new table)
#   summary.md      the benchmark summary (device, versions, commit, stages)
#   junit_gpu.xml   the GPU tests (compiled Triton kernels on CUDA, graph replay, CUDA extension)
#   results.tar.gz  everything else: every stage's log, the bench CSV/JSON/PNG, sm_90 resource report
#
# The GPU machine may have no network: the install uses --no-deps --no-build-isolation, so the
# machine's own torch (a CUDA build) is kept and nothing is downloaded. Each stage has a time limit
# (and the whole run a budget, BUDGET_S, default 520 s); every stage runs even if an earlier one
# fails; the exit status is that of the first failure. The muP telescope and data-efficiency
# experiments train on the CPU and are not part of this GPU run (python -m bench all runs them).
# `python -m bench efficiency --preset gpu` (the data-efficiency sweep at 3.2M parameters, ~80 runs of
# 2^26 tokens) takes hours, far beyond this run's budget: it is a separate run (docs/efficiency.md).
set -uo pipefail

OUT=${1:?usage: bash bench/gpu_run.sh OUTDIR}
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK="$OUT/work"
mkdir -p "$WORK"
cd "$REPO"
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-520}
START=$SECONDS
status=0
note() { echo "== $*" | tee -a "$OUT/run.log"; }
stage() {  # stage NAME LIMIT_S CMD...: run CMD (at most LIMIT_S, less if the budget is short), log to WORK/NAME.log
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET_S - (SECONDS - START) - 20))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -le 5 ]; then note "$name: skipped, budget spent"; return; fi
  note "$name (limit ${limit} s): $*"
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  note "$name: exit $rc after $((SECONDS - t0)) s$([ $rc -eq 124 ] && echo ' (time limit)')"
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
             "dion", "emerging_optimizers", "gram_newton_schulz", "quack"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "installed"))
    except Exception as exc:
        print(name, "MISSING", type(exc).__name__)
PY
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# Editable install: the CUDA extension (when csrc/ has one) is built in place, so the checkout that
# the tests and `python -m bench` import is the one that has it.
stage install 240 "$PY" -m pip install --no-deps --no-build-isolation -e .

# NS kernels first (the measurement the dispatch table needs): every muon path and installed peer on
# the H100 table's shapes (bench/kernel/newton_schulz.py); its CSV is rewritten after every shape.
stage bench_kernels 240 "$PY" -m bench kernels --out "$WORK/bench"
# GPU tests: everything marked gpu, and the kernel tests (marked interpret), which on a CUDA machine
# run the compiled kernels against float64 (tests/conftest.py only picks the interpreter without one).
stage test_gpu 180 "$PY" -m pytest -q -m "gpu or interpret" -p no:cacheprovider --junitxml="$OUT/junit_gpu.xml"
# The rest of the GPU benchmarks: FLOP model, optimizer steps, profile (python -m bench all's GPU stages).
stage bench_rest 120 "$PY" -m bench all --only flops,step,profile --out "$WORK/bench"
stage flops_symmetric 30 "$PY" -m bench flops --symmetric --out "$WORK/bench/flops_symmetric"
# Register / spill / wgmma / TMA report of every kernel for sm_90a, as compiled on this machine.
stage resource_usage 60 env -u TRITON_INTERPRET "$PY" -W ignore -m muon.kernels.resource_usage
stage microbench 40 "$PY" -m pytest -q bench/test_bench_cpu.py -o addopts="" --benchmark-only \
  --benchmark-json="$WORK/microbench.json" -p no:cacheprovider

# Hand-back: the few files named above; everything else in one archive.
[ -f "$WORK/bench/kernels.csv" ] && cp "$WORK/bench/kernels.csv" "$OUT/kernels.csv"
[ -f "$WORK/bench/summary.md" ] && cp "$WORK/bench/summary.md" "$OUT/summary.md"
note "done after $((SECONDS - START)) s: results under $OUT (exit $status)"
tar -czf "$OUT/results.tar.gz" -C "$OUT" work && rm -rf "$WORK"
exit $status
