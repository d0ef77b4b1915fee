#!/usr/bin/env bash
# One-call GPU validation of verimed on an H100/H200 (issue: GPU validation), at most ~8 min.
#
#   bash bench/gpu_wheels.sh                   # here, once: msgspec + Liger-Kernel wheels into .whl/
#   device run, carry [".whl"], timeout_s 600:  bash bench/gpu_check.sh
#   then here: cat <files_at>/tables.md >> bench/RESULTS.md   (run by hand, without $OUT, it appends itself)
#
# 1. versions and GPU; the carried wheels installed into /tmp/site.
# 2. correctness of the Triton kernels vs float64 / torch references (fp32 rel err <= 1e-5,
#    bf16, vocab 151936, split/chunk combine, advantages) — nothing is timed if this fails.
# 3. bench/gpu_learner.py: a ~1.5B Qwen2 learner step under FSDP2 (world size 1), packed 16k rows,
#    fused vs torch head (same loss), sdpa vs segment attention, the packing isolation check.
# 4. bench/kernels.py: fused log-prob + entropy vs naive torch, torch.compile, Liger FLCE and the
#    3-GEMM floor at the three paper shapes, the targets' verdicts, advantages at 1M samples.
# Tables go to $RESULTS_DIR/tables.md ($OUT on the device runner, which brings it back), the log
# to $RESULTS_DIR/gpu_check.log. Each step has its own time limit, so one that hangs leaves the
# others their time. Exit status: 0 when every step passed.
#
# GPU_CHECK_SMOKE=1 PYTHON=.venv/bin/python bash bench/gpu_check.sh   # the same steps on CPU at toy
# sizes, Triton interpreted (tests/test_gpu_learner.py): the script itself is tested before a GPU run.
set -uo pipefail
cd "$(dirname "$0")/.."
unset VERIMED_KERNELS
PY="${PYTHON:-python3}"
# One kernels.py call per shape, so a shape that runs out of time (torch.compile) keeps the others' rows.
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
  export TRITON_INTERPRET=1
  LEARNER_ARGS=(--tiny --steps 1 --configs triton:sdpa torch:sdpa)
  SHAPES=(48,32,300)
  KERNEL_ARGS=(--time-on-cpu --repeats 1 --dtype float16)
  ADVANTAGES=64
else
  unset TRITON_INTERPRET
  LEARNER_ARGS=(--steps 2)
  SHAPES=(8192,5120,152064 16384,4096,151936 32768,2048,151936)
  KERNEL_ARGS=(--repeats 10)
  ADVANTAGES=$((1 << 20))
fi
RESULTS_DIR="${OUT:-bench/gpu_results}"
mkdir -p "$RESULTS_DIR"
LOG="$RESULTS_DIR/gpu_check.log"
TABLES="$RESULTS_DIR/tables.md"
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME SECONDS CMD...: run with a time limit, log it, remember a failure
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} 2>&1 | tee -a "$LOG"
if [ "${GPU_CHECK_SMOKE:-0}" != 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tee -a "$LOG"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no .whl/ (bench/gpu_wheels.sh): the learner step needs msgspec, the Liger rows are left out" | tee -a "$LOG"
fi

if ! step correctness 90 "$PY" bench/kernels.py --check-only; then
  echo "CORRECTNESS FAILED (see above): nothing timed" | tee -a "$LOG"
  exit 1
fi
step learner 150 "$PY" bench/gpu_learner.py "${LEARNER_ARGS[@]}" --results "$TABLES" --json "$RESULTS_DIR/learner.json"
adv=$ADVANTAGES
for shape in "${SHAPES[@]}"; do
  step "kernels $shape" 75 "$PY" bench/kernels.py --skip-checks "${KERNEL_ARGS[@]}" --shapes "$shape" \
    --advantages "$adv" --results "$TABLES"
  adv=0  # the advantage kernel once, with the first shape
done
echo "== done: exit $status; tables in $TABLES" | tee -a "$LOG"
if [ -z "${OUT:-}" ] && [ "${GPU_CHECK_SMOKE:-0}" != 1 ] && [ -s "$TABLES" ]; then  # by hand on a GPU host: RESULTS.md too
  { echo; echo "<!-- bench/gpu_check.sh, $(date -u +%F) -->"; cat "$TABLES"; } >> bench/RESULTS.md
  echo "appended $TABLES to bench/RESULTS.md" | tee -a "$LOG"
fi
exit "$status"
