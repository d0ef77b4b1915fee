#!/usr/bin/env bash
# One-call GPU check of verimed's kernels (needs only torch + triton on the host).
#
#   bash bench/gpu_check.sh            # ~5-8 min on one H100/H200
#
# 1. versions and GPU; 2. correctness of the Triton kernels vs float64 / torch
# references (fp32 grads rel err <= 1e-5, bf16, vocab 151936, advantages);
# 3. the timing table of bench/kernels.py (fused vs naive vs torch.compile, matmul
# floor), appended to bench/RESULTS.md. If the full run (with torch.compile) does
# not finish in time, a shorter run without compile follows. The log and
# RESULTS.md are copied to $OUT when it is set (the device runner returns $OUT).
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
OUT_DIR="${OUT:-}"
LOG="$(mktemp)"
finish() {
  if [ -n "$OUT_DIR" ]; then cp "$LOG" "$OUT_DIR/gpu_check.log"; cp bench/RESULTS.md "$OUT_DIR/RESULTS.md" 2>/dev/null || true; fi
}
trap finish EXIT
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee -a "$LOG"

echo "== correctness" | tee -a "$LOG"
if ! timeout 240 python bench/kernels.py --check-only 2>&1 | tee -a "$LOG"; then
  echo "CORRECTNESS FAILED (see above); not timing" | tee -a "$LOG"
  exit 1
fi

echo "== timing (with torch.compile)" | tee -a "$LOG"
if ! timeout "${BENCH_TIMEOUT:-420}" python bench/kernels.py --skip-checks --repeats 10 2>&1 | tee -a "$LOG"; then
  echo "== full run failed or timed out; timing without torch.compile" | tee -a "$LOG"
  timeout 240 python bench/kernels.py --skip-checks --no-compile --repeats 5 2>&1 | tee -a "$LOG"
fi
