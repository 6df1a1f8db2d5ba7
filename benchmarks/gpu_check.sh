#!/usr/bin/env bash
# GPU verification in one call on a lent machine (one H100; python3 with torch 2.11 + CUDA 13, nvcc, cmake,
# ninja, pybind11 and triton installed; no internet). Budget: under 8 minutes.
#   1. build with the CUDA kernels (sm_90)
#   2. the whole test suite, CUDA tests included
#   3. the CUDA tests again under compute-sanitizer memcheck, at small sizes
#   4. the benchmarks at GPU sizes, with the device's measured ceilings, into benchmarks/results/gpu-h100.md
#      (sections: loss, loss_bf16, sampling, moe and moe_bf16 (the MoE layer's reference / kernels /
#      kernels+recompute with their GEMM floor and share, the routing ops with their bandwidth floor and share),
#      train_step; generate: decode tokens/s, first-token
#      latency and images/s of the paper preset; train_paper: its training step at 16k tokens with tokens/s, peak
#      memory and MFU; train_loss: 20 steps of the faster step against the plain one)
# Liger-Kernel and cut-cross-entropy (pure Python + Triton) are used as baselines when their wheels travel in
# .whl/ (see benchmarks/README.md); without them those rows are marked as not run.
# Usage (from the repository root, on the GPU machine):  bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=benchmarks/results
LOG=${OUT:-$RESULTS}
mkdir -p "$RESULTS" "$LOG"
t0=$(date +%s)
stage() { echo; echo "=== [$(( $(date +%s) - t0 ))s] $*"; }
status=0

if compgen -G ".whl/*.whl" >/dev/null; then
  stage "installing carried wheels"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

stage "device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

stage "build (UNIF2ACE_CUDA=1, sm_90)"
UNIF2ACE_CUDA=1 UNIF2ACE_CUDA_ARCHS=90 python3 -m pip install -q --no-build-isolation --no-deps -e . \
  || { echo "BUILD FAILED"; exit 1; }
python3 -c "import unif2ace; assert unif2ace.WITH_CUDA; print('WITH_CUDA', unif2ace.WITH_CUDA)"

stage "test suite (CUDA tests included)"
python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$LOG/gpu-tests.log" | tail -25
[ "${PIPESTATUS[0]:-0}" = 0 ] || status=1

stage "CUDA tests under compute-sanitizer memcheck"
if command -v compute-sanitizer >/dev/null; then
  UNIF2ACE_SMALL=1 compute-sanitizer --tool memcheck --error-exitcode 9 --target-processes all \
    python3 -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | tee "$LOG/gpu-memcheck.log" | tail -15
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
else
  echo "compute-sanitizer not found"
fi

stage "benchmarks at GPU sizes"
python3 -m benchmarks --gpu --results "$RESULTS" 2>&1 | tee "$LOG/gpu-bench.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
[ "$LOG" != "$RESULTS" ] && cp "$RESULTS"/gpu-h100.* "$LOG"/ 2>/dev/null

stage "done (status $status)"
exit $status
