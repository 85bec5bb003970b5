#!/usr/bin/env bash
# The reduced-scale reproduction (reproduce_cpu.sh's model and recipe, unchanged) on one GPU, as one
# short job: every stage-1 run in parallel on the one GPU under a wall-clock cap, the estimator stages
# from the aligned model, then every stage evaluated on the test set, in parallel. This is what ran on
# the lent H200 (see examples/RESULTS.md); with a GPU of your own, prefer reproduce_cpu.sh with
# DEVICE_FLAGS="" GEN_DEVICE_FLAGS="" and no time cap.
#   OUT=/tmp/out bash examples/multi30k_de_en/gpu_session.sh
# Knobs: STAGES1, STAGES2, EVAL_STAGES (default: both), STAGE1_HOURS, STAGE2_HOURS, EVAL_SUBSET, INSTALL_WHEELS=1 (install .whl/*.whl
# first: a machine without fairseq), RUN_TESTS=1 (tests/test_numerics.py, the CUDA tests),
# EXPORT=STAGE (write STAGE's best checkpoint as fp16 chunks OUT/STAGE.fp16.pt.partNN).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd); cd "$REPO"
OUT=${OUT:-/tmp/gpu_session}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export RUN_DIR=${RUN_DIR:-/tmp/runs/multi30k_gpu} FAIRSEQ_DAT_SHARED=${FAIRSEQ_DAT_SHARED:-$REPO/.shared}
export DEVICE_FLAGS=${DEVICE_FLAGS-} GEN_DEVICE_FLAGS=${GEN_DEVICE_FLAGS-} OMP_NUM_THREADS=2
STAGES1=${STAGES1:-"aligned baseline-1 baseline-2 baseline-6 mixed-1 mixed-3 mixed-6"}
STAGES2=${STAGES2-"geometric-C geometric-LL token-multinomial-C sequence-C"}
STAGE1_HOURS=${STAGE1_HOURS:-0.055}; STAGE2_HOURS=${STAGE2_HOURS:-0.012}
EVAL_SUBSET=${EVAL_SUBSET:-test}; EXPORT=${EXPORT:-geometric-C}
R=examples/multi30k_de_en/reproduce_cpu.sh
log() { echo "[$(date +%T) +${SECONDS}s] $*"; }

if [ "${INSTALL_WHEELS:-0}" = 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl || exit 1
fi
python3 -c "import torch, fairseq, fairseq_dat; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '', 'fairseq', fairseq.__version__)" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null

if [ "${RUN_TESTS:-0}" = 1 ]; then
  (timeout 420 python3 -m pytest -q -p no:cacheprovider tests/test_numerics.py > "$OUT/gpu_tests.log" 2>&1
   echo "exit status $?" >> "$OUT/gpu_tests.log") &
fi

mkdir -p "$RUN_DIR"
log "stage 1: $STAGES1 (cap $STAGE1_HOURS h each, in parallel)"
for s in $STAGES1; do STOP_TIME_HOURS=$STAGE1_HOURS bash $R train "$s" > "$RUN_DIR/train-$s.txt" 2>&1 & done
wait_jobs() { for j in $(jobs -p); do [ "$j" = "${TESTS_PID:-}" ] || wait "$j"; done; }
TESTS_PID=$(jobs -p | head -1); [ "${RUN_TESTS:-0}" = 1 ] || TESTS_PID=
wait_jobs
log "stage 2: $STAGES2 (cap +$STAGE2_HOURS h each, in parallel)"
# fairseq carries stage 1's training time into stage 2 (--finetune-from-model keeps extra_state)
[ -n "$STAGES2" ] && S2_HOURS=$(python3 -c "import torch; s = torch.load('$RUN_DIR/aligned/checkpoint_best.pt', map_location='cpu', weights_only=False); print(s['extra_state']['previous_training_time'] / 3600 + $STAGE2_HOURS)")
for s in $STAGES2; do STOP_TIME_HOURS=$S2_HOURS bash $R train "$s" > "$RUN_DIR/train-$s.txt" 2>&1 & done
wait_jobs

if [ -n "$EXPORT" ] && [ -f "$RUN_DIR/$EXPORT/checkpoint_best.pt" ]; then
  log "export $EXPORT (fp16, without optimizer state, in 15 MB parts)"
  python3 - "$RUN_DIR/$EXPORT/checkpoint_best.pt" "$OUT/$EXPORT.fp16.pt" <<'EOF'
import sys, torch
state = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
state["model"] = {k: (v.half() if v.is_floating_point() else v) for k, v in state["model"].items()}
state["last_optimizer_state"] = None
torch.save(state, sys.argv[2])
EOF
  split -b 15M -d "$OUT/$EXPORT.fp16.pt" "$OUT/$EXPORT.fp16.pt.part" && rm "$OUT/$EXPORT.fp16.pt"
fi

log "evaluation on $EVAL_SUBSET"
for s in ${EVAL_STAGES-$STAGES1 $STAGES2}; do
  conf=""; [ "$s" = aligned ] && conf=${CONF_THRESHOLDS:-"0.5 0.7 0.8 0.9 0.95"}
  EVAL_JOBS=${EVAL_JOBS:-3} CONF_THRESHOLDS=$conf timeout "${EVAL_TIMEOUT:-600}" bash $R eval "$s" "$EVAL_SUBSET" > "$RUN_DIR/$s/eval-$EVAL_SUBSET.txt" 2>&1 &
done
wait_jobs
log "done"
cat "$RUN_DIR"/*/eval-"$EVAL_SUBSET".txt
tar czf "$OUT/logs.tgz" -C "$RUN_DIR" --exclude='*.pt' --exclude=tb .
wait
[ "${RUN_TESTS:-0}" = 1 ] && tail -5 "$OUT/gpu_tests.log"
ls -la "$OUT"
