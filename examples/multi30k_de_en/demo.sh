#!/usr/bin/env bash
# README command 1 (`make demo`): a small, real end-to-end run on 2 CPU cores.
#   1. prepare Multi30k de-en (joint BPE, fairseq-preprocess)             ~0.5 min
#      with DEMO_BPE_MERGES (default 3000) merges: a ~3k vocabulary instead of the main recipe's ~7.9k,
#      because on 2 cores the six exits' vocabulary projections dominate the training step
#   2. stage 1: aligned multi-exit training of a small adaptive_transformer (6 decoder blocks,
#      one exit classifier per block), bounded by DEMO_STAGE1_HOURS (default 0.2 h)
#   3. stage 2: the token-geometric depth estimator trained against the correctness oracle
#      (lambda 0.1, sigma 0, alpha 1) from the stage-1 checkpoint, DEMO_STAGE2_HOURS (0.05 h)
#   4. fairseq-generate on the test set at full depth and with --exit-threshold, printing BLEU,
#      the average exit AE and detokenized sacreBLEU for each
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
STAGE2_HOURS=${DEMO_STAGE2_HOURS:-0.06}
THRESHOLDS=${DEMO_THRESHOLDS:-"0.5 0.8"}
STAGE1_LIMIT=(--stop-time-hours "$STAGE1_HOURS"); STAGE1_DESC="$STAGE1_HOURS h"
if [ -n "${DEMO_STAGE1_UPDATES:-}" ]; then
  STAGE1_LIMIT=(--max-update "$DEMO_STAGE1_UPDATES"); STAGE1_DESC="$DEMO_STAGE1_UPDATES updates"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$DEMO_DIR"

BPE_MERGES=$MERGES bash "$REPO/examples/multi30k_de_en/prepare.sh" "$SHARED/data" "$DATA_BIN"

MODEL=(--arch adaptive_transformer --encoder-layers 3 --decoder-layers 6 --encoder-embed-dim 128
       --decoder-embed-dim 128 --encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512
       --encoder-attention-heads 4 --decoder-attention-heads 4 --dropout 0.1 --share-decoder-input-output-embed)
TRAIN=(--user-dir "$REPO/fairseq_dat" --task adaptive_translation --cpu --seed 1 --log-format simple
       --log-interval 20 --optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 3.0 --lr-scheduler inverse_sqrt
       --weight-decay 0.0001 --label-smoothing 0.1 --max-tokens 2048 --criterion adaptive_label_smoothed_cross_entropy
       --no-epoch-checkpoints --validate-interval-updates 250 --save-interval-updates 250 --keep-interval-updates 1)

echo "== stage 1: aligned multi-exit training ($STAGE1_DESC) -> $DEMO_DIR/stage1"
fairseq-train "$DATA_BIN" "${TRAIN[@]}" "${MODEL[@]}" --lr 2e-3 --warmup-updates 200 \
  --save-dir "$DEMO_DIR/stage1" "${STAGE1_LIMIT[@]}" 2>&1 | tee "$DEMO_DIR/stage1.log" \
  | grep --line-buffered -E "train_inner|valid on|done training" | awk '{ print substr($0, 1, 220); fflush() }'

# fairseq carries the training time over from the stage-1 checkpoint: stage 2 stops at the sum
STAGE2_LIMIT=(--stop-time-hours "$(python3 -c "print($STAGE1_HOURS + $STAGE2_HOURS)")")
STAGE2_DESC="$STAGE2_HOURS h"
if [ -n "${DEMO_STAGE2_UPDATES:-}" ]; then  # counted from 0 again
  STAGE2_LIMIT=(--max-update "$DEMO_STAGE2_UPDATES"); STAGE2_DESC="$DEMO_STAGE2_UPDATES updates"
fi
echo "== stage 2: token-geometric depth estimator, correctness oracle ($STAGE2_DESC) -> $DEMO_DIR/stage2"
STAGE2_RESUME=()
[ -f "$DEMO_DIR/stage2/checkpoint_last.pt" ] || STAGE2_RESUME=(--finetune-from-model "$DEMO_DIR/stage1/checkpoint_best.pt")
fairseq-train "$DATA_BIN" "${TRAIN[@]}" "${MODEL[@]}" --lr 5e-4 --warmup-updates 1 \
  --depth-estimator token-geometric --depth-oracle correctness --oracle-lambda 0.1 --oracle-sigma 0 \
  --exit-loss-alpha 1.0 "${STAGE2_RESUME[@]}" --save-dir "$DEMO_DIR/stage2" "${STAGE2_LIMIT[@]}" \
  2>&1 | tee "$DEMO_DIR/stage2.log" | grep --line-buffered -E "train_inner|valid on|done training" | awk '{ print substr($0, 1, 220); fflush() }'

REF=$SHARED/data/multi30k-de-en/raw/test_2016_flickr.en.gz
generate() {  # generate NAME EXTRA_FLAGS...
  local name=$1; shift
  fairseq-generate "$DATA_BIN" --user-dir "$REPO/fairseq_dat" --task adaptive_translation \
    --path "$DEMO_DIR/stage2/checkpoint_best.pt" --gen-subset test --beam 5 --batch-size 64 --remove-bpe \
    --max-len-a 1.2 --max-len-b 10 \
    --cpu "$@" > "$DEMO_DIR/generate-$name.log" 2>&1
  echo "-- $name: $(grep -h -E '^Generate test' "$DEMO_DIR/generate-$name.log" | sed 's/^Generate test with //')"
  echo "   $(grep -h -o 'AE=.*' "$DEMO_DIR/generate-$name.log")"
  echo "   $(grep -h -o 'Translated.*' "$DEMO_DIR/generate-$name.log")"
  echo "   $(bash "$REPO/examples/common/sacrebleu_from_generate.sh" "$DEMO_DIR/generate-$name.log" "$REF" en | head -1)"
}
echo "== test set (Multi30k test2016, 1,000 sentences), beam 5"
generate full-depth
for t in $THRESHOLDS; do generate "threshold-$t" --exit-threshold "$t"; done
