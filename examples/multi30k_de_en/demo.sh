#!/usr/bin/env bash
# README command 1 (`make demo`): a small, real end-to-end run on 2 CPU cores (~25 min).
#   1. prepare Multi30k de-en (joint BPE, fairseq-preprocess)             ~0.5 min
#      with DEMO_BPE_MERGES (default 3000) merges: a ~3k vocabulary instead of the main recipe's ~7.9k,
#      because on 2 cores the six exits' vocabulary projections dominate the training step
#   2. stage 1 (§2.2): aligned multi-exit training of a small adaptive_transformer (6 decoder blocks,
#      one untied exit classifier per block, the paper's IWSLT setup), validated every 250 updates,
#      stopped after 5 validations without a better valid loss or at DEMO_STAGE1_HOURS (default 0.25 h)
#   3. stage 2 (§3): the token-geometric depth estimator against the correctness oracle (λ 0.1, σ 0),
#      on the frozen stage-1 model (--train-estimator-only; DEMO_STAGE2_MODE=joint trains everything, as
#      the paper), fixed lr with the estimator at 10x (--estimator-lr-multiplier), validated every 100
#      updates and stopped when valid exit_loss has not improved for 5 validations or at
#      DEMO_STAGE2_HOURS (default 0.1 h); then `estimator_check`: did the estimator learn (valid exit_acc
#      against exit_majority, exit_loss against the oracle's entropy, parameters against their init; the
#      gains recomputed on valid with 95% bootstrap intervals over sentences decide)?
#   4. the per-block thresholds τ_1..τ_5, calibrated on valid as the paper tunes them (§3: random search,
#      here DEMO_SAMPLES = 30 draws instead of 10,000): the cheapest draw (lowest average exit) whose valid
#      BLEU is within DEMO_MAX_DROP (default 0.5) of full depth (fairseq_dat.cli.threshold_search
#      --calibrate), the fixed exits beside it; then fairseq-generate on the test set at full depth and at
#      those thresholds, printing BLEU, AE, tokens/s and the speed-up, and detokenized sacreBLEU for each
# Rerunning continues from the checkpoints in DEMO_DIR (default ../runs/demo).
# DEMO_STAGE1_UPDATES / DEMO_STAGE2_UPDATES, when set, bound the stages by updates instead of time
# (the same model whatever else the machine is doing).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
SHARED=${FAIRSEQ_DAT_SHARED:-$REPO/../shared}
MERGES=${DEMO_BPE_MERGES:-3000}
DATA_BIN=$REPO/data-bin/multi30k_de_en_bpe${MERGES}
DEMO_DIR=${DEMO_DIR:-$REPO/../runs/demo}
STAGE1_HOURS=${DEMO_STAGE1_HOURS:-0.25}
STAGE2_HOURS=${DEMO_STAGE2_HOURS:-0.1}
MAX_DROP=${DEMO_MAX_DROP:-0.5}
SAMPLES=${DEMO_SAMPLES:-30}
STAGE1_LIMIT=(--stop-time-hours "$STAGE1_HOURS"); STAGE1_DESC="at most $STAGE1_HOURS h"
if [ -n "${DEMO_STAGE1_UPDATES:-}" ]; then
  STAGE1_LIMIT=(--max-update "$DEMO_STAGE1_UPDATES"); STAGE1_DESC="at most $DEMO_STAGE1_UPDATES updates"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$DEMO_DIR"

BPE_MERGES=$MERGES bash "$REPO/examples/multi30k_de_en/prepare.sh" "$SHARED/data" "$DATA_BIN"

MODEL=(--arch adaptive_transformer --encoder-layers 3 --decoder-layers 6 --encoder-embed-dim 128
       --decoder-embed-dim 128 --encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512
       --encoder-attention-heads 4 --decoder-attention-heads 4 --dropout 0.1)
TRAIN=(--user-dir "$REPO/fairseq_dat" --task adaptive_translation --cpu --seed 1 --log-format simple
       --log-interval 20 --optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 3.0
       --weight-decay 0.0001 --label-smoothing 0.1 --max-tokens 2048 --criterion adaptive_label_smoothed_cross_entropy
       --no-epoch-checkpoints --keep-interval-updates 1)
show() { grep --line-buffered -E "train_inner|valid on|done training|early stop" | awk '{ print substr($0, 1, 230); fflush() }'; }

echo "== stage 1: aligned multi-exit training ($STAGE1_DESC, or until valid loss stops improving) -> $DEMO_DIR/stage1"
fairseq-train "$DATA_BIN" "${TRAIN[@]}" "${MODEL[@]}" --lr-scheduler inverse_sqrt --lr 2e-3 --warmup-updates 200 \
  --validate-interval-updates 250 --save-interval-updates 250 --patience 5 \
  --save-dir "$DEMO_DIR/stage1" "${STAGE1_LIMIT[@]}" 2>&1 | tee "$DEMO_DIR/stage1.log" | show

# fairseq carries the training time over from the stage-1 checkpoint: stage 2 stops at the sum
STAGE2_LIMIT=(--stop-time-hours "$(python3 -c "print($STAGE1_HOURS + $STAGE2_HOURS)")")
STAGE2_DESC="at most $STAGE2_HOURS h"
if [ -n "${DEMO_STAGE2_UPDATES:-}" ]; then  # counted from 0 again
  STAGE2_LIMIT=(--max-update "$DEMO_STAGE2_UPDATES"); STAGE2_DESC="at most $DEMO_STAGE2_UPDATES updates"
fi
STAGE2_MODE=()
case "${DEMO_STAGE2_MODE:-frozen}" in
  frozen) STAGE2_MODE=(--train-estimator-only) ;;
  joint) ;;
  *) echo "demo.sh: error: DEMO_STAGE2_MODE must be frozen or joint, got '$DEMO_STAGE2_MODE'" >&2; exit 1 ;;
esac
echo "== stage 2: token-geometric depth estimator, correctness oracle (${DEMO_STAGE2_MODE:-frozen}, $STAGE2_DESC, or until valid exit_loss stops improving) -> $DEMO_DIR/stage2"
STAGE2_RESUME=()
[ -f "$DEMO_DIR/stage2/checkpoint_last.pt" ] || STAGE2_RESUME=(--finetune-from-model "$DEMO_DIR/stage1/checkpoint_best.pt")
fairseq-train "$DATA_BIN" "${TRAIN[@]}" "${MODEL[@]}" --lr-scheduler fixed --lr 3e-4 --estimator-lr-multiplier 10 \
  "${STAGE2_MODE[@]}" --depth-estimator token-geometric --depth-oracle correctness --oracle-lambda 0.1 --oracle-sigma 0 \
  --exit-loss-alpha 1.0 --best-checkpoint-metric exit_loss --patience 5 \
  --validate-interval-updates 100 --save-interval-updates 100 \
  "${STAGE2_RESUME[@]}" --save-dir "$DEMO_DIR/stage2" "${STAGE2_LIMIT[@]}" 2>&1 | tee "$DEMO_DIR/stage2.log" | show
echo "== did the estimator learn?"
python -m fairseq_dat.cli.estimator_check "$DEMO_DIR/stage2/checkpoint_best.pt" --train-log "$DEMO_DIR/stage2.log" \
  --data "$DATA_BIN" 2> "$DEMO_DIR/estimator_check.log" | tee "$DEMO_DIR/estimator_check.txt" \
  | grep -E "ESTIMATOR|SIGNIFICANCE|halting" \
  || { tail -3 "$DEMO_DIR/estimator_check.log" >&2; exit 1; }

GEN_FLAGS=(--beam 5 --batch-size 64 --max-len-a 1.2 --max-len-b 10)
echo "== calibrating --exit-threshold on valid: $SAMPLES per-block thresholds drawn at random (the paper's search), the cheapest within $MAX_DROP BLEU of full depth"
python -m fairseq_dat.cli.threshold_search "$DATA_BIN" --path "$DEMO_DIR/stage2/checkpoint_best.pt" \
  --mode random --samples "$SAMPLES" --with-fixed-exits --calibrate --max-bleu-drop "$MAX_DROP" \
  --valid-subset valid --test-subset test \
  "${GEN_FLAGS[@]}" --out "$DEMO_DIR/calibration.json" --plot "$DEMO_DIR/calibration.png" > "$DEMO_DIR/calibration.log" 2>&1 \
  || { tail -5 "$DEMO_DIR/calibration.log" >&2; exit 1; }
THRESHOLD=$(python3 -c "import json,sys; c=json.load(open(sys.argv[1]))['calibration']; print(c['threshold'])" "$DEMO_DIR/calibration.json")
grep -E "^CALIBRATION" "$DEMO_DIR/calibration.log" || true
python3 - "$DEMO_DIR/calibration.json" <<'PY'
import json, sys
points = json.load(open(sys.argv[1]))["points"]
fixed = sorted((p["fixed_exit"], p["bleu"]) for p in points if p["role"] == "fixed")
full = next(p for p in points if p["role"] == "reference")
print("   valid BLEU at fixed exits (the line an exit rule must beat, §4.2): "
      + ", ".join(f"exit {k} {b:.2f}" for k, b in fixed) + f", full depth {full['bleu']:.2f}")
PY

REF=$SHARED/data/multi30k-de-en/raw/test_2016_flickr.en.gz
generate() {  # generate NAME EXTRA_FLAGS...
  local name=$1; shift
  fairseq-generate "$DATA_BIN" --user-dir "$REPO/fairseq_dat" --task adaptive_translation \
    --path "$DEMO_DIR/stage2/checkpoint_best.pt" --gen-subset test "${GEN_FLAGS[@]}" --remove-bpe \
    --cpu "$@" > "$DEMO_DIR/generate-$name.log" 2>&1
  echo "-- $name: $(grep -h -E '^Generate test' "$DEMO_DIR/generate-$name.log" | sed 's/^Generate test with //')"
  echo "   $(grep -h -o 'AE=.*' "$DEMO_DIR/generate-$name.log")"
  echo "   $(grep -h -o 'Translated.*' "$DEMO_DIR/generate-$name.log")"
  echo "   $(bash "$REPO/examples/common/sacrebleu_from_generate.sh" "$DEMO_DIR/generate-$name.log" "$REF" en | head -1)"
}
echo "== test set (Multi30k test2016, 1,000 sentences), beam 5 x batch 64, $OMP_NUM_THREADS threads"
generate full-depth
if [ "$THRESHOLD" = full ]; then
  echo "no --exit-threshold kept valid BLEU within $MAX_DROP of full depth: the calibrated setting is full depth"
  exit 0
fi
generate "threshold-$THRESHOLD" --exit-threshold "$THRESHOLD"
python3 - "$DEMO_DIR/generate-full-depth.log" "$DEMO_DIR/generate-threshold-$THRESHOLD.log" "$THRESHOLD" <<'PY'
import re, sys
def read(path):
    text = open(path, encoding="utf-8").read()
    bleu = float(re.search(r"BLEU4 = ([0-9.]+)", text).group(1))
    ae = re.search(r"AE=([0-9.]+)", text)
    speed = float(re.search(r"([0-9.]+) tokens/s\)", text).group(1))
    return bleu, float(ae.group(1)) if ae else 6.0, speed
full, ours = read(sys.argv[1]), read(sys.argv[2])
label = "--exit-threshold " + sys.argv[3]
width = max(len(label), 10)
print(f"{'setting':<{width}} {'BLEU':>6} {'AE':>6} {'tokens/s':>9} {'speed-up':>8}")
print(f"{'full depth':<{width}} {full[0]:>6.2f} {full[1]:>6.2f} {full[2]:>9.1f} {1.0:>8.2f}")
print(f"{label:<{width}} {ours[0]:>6.2f} {ours[1]:>6.2f} {ours[2]:>9.1f} {ours[2] / full[2]:>8.2f}")
print(f"RESULT bleu_delta={ours[0] - full[0]:+.2f} ae={ours[1]:.2f} speedup={ours[2] / full[2]:.2f} (test, calibrated on valid)")
PY
