#!/usr/bin/env bash
# The paper's WMT14 en-fr experiments (Figure 5): Transformer big, all embeddings and exit classifiers tied.
#   bash examples/wmt14_en_fr/reproduce.sh train STAGE          GPUs; data from prepare-full.sh (internet)
#   bash examples/wmt14_en_fr/reproduce.sh eval STAGE [SUBSET]  averages the last 10 checkpoints first (paper)
# Paper (§4.1): 35.5M pairs, 44k joint BPE, 50k updates on 128 GPUs with ~460k tokens per update
# (--max-tokens 3584 x 128 GPUs; on G GPUs: UPDATE_FREQ=$((128 / G))), beam 4, tokenized BLEU on newstest2014.
set -euo pipefail
ACTION=${1:?usage: reproduce.sh train|eval STAGE [SUBSET]}; STAGE=${2:?usage: reproduce.sh train|eval STAGE [SUBSET]}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
DATA_BIN=${DATA:-${DATA_BIN:-$REPO/data-bin/wmt14_en_fr}}; RUN_DIR=${RUNS:-${RUN_DIR:-$REPO/../runs/wmt14}}
[ -f "$DATA_BIN/dict.fr.txt" ] || { echo "error: $DATA_BIN/dict.fr.txt not found: run examples/wmt14_en_fr/prepare-full.sh" >&2; exit 1; }
MODEL=(--arch adaptive_transformer_wmt_en_fr_big)
OPTIM=(--optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 3.0 --lr 7e-4 --lr-scheduler inverse_sqrt
       --warmup-updates 4000 --label-smoothing 0.1 --max-tokens 3584 --update-freq "${UPDATE_FREQ:-16}")
LENGTH=(--max-update "${MAX_UPDATE:-50000}" --save-interval-updates 1000 --keep-interval-updates 10)
STAGE2_LENGTH=(--max-update "${STAGE2_UPDATES:-10000}")  # a cap: stage 2 stops on valid exit_loss (stages.sh)
DEVICE=(--fp16); GEN_DEVICE=(); GEN=(--lenpen 0.6); BEAM=4; NUM_EXITS=6
THRESHOLDS=${THRESHOLDS:-"0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9"}
CONF_THRESHOLDS=${CONF_THRESHOLDS:-"0.5 0.7 0.8 0.9 0.95"}
source "$REPO/examples/common/stages.sh"
case "$ACTION" in
  train) train_stage "$STAGE" ;;
  eval)
    python -m fairseq_dat.cli.average_checkpoints "$RUN_DIR/$STAGE" --last 10 --output "$RUN_DIR/$STAGE/checkpoint_avg10.pt"
    CHECKPOINT=checkpoint_avg10.pt eval_stage "$STAGE" "${3:-test}" ;;
  *) echo "error: unknown action '$ACTION' (train or eval)" >&2; exit 1 ;;
esac
