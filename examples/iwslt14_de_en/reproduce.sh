#!/usr/bin/env bash
# The paper's IWSLT14 de-en experiments (Table 1, Appendix Tables 2-3, Figure 3).
#   bash examples/iwslt14_de_en/reproduce.sh train STAGE        full scale: GPU(s), data from prepare-full.sh
#   bash examples/iwslt14_de_en/reproduce.sh eval STAGE [SUBSET] (valid for Table 1, test for Figure 3)
#   SMOKE=1 bash examples/iwslt14_de_en/reproduce.sh train aligned   a minutes-long CPU run of the same
#                      recipe on the staged 8.8k-pair train sample (data-bin/iwslt14_de_en_sample): a test of
#                      the recipe, not a result; its eval decodes the first EVAL_SENTENCES=200 pairs of SUBSET
# Stages: aligned, baseline-1..6, mixed-1|3|6, geometric-C, geometric-LL, token-multinomial-C|LL, sequence-C|LL
#   (stage 2 from aligned/checkpoint_best.pt). Settings from the paper (§4.1): adaptive_transformer_iwslt_de_en
# (6+6, d_enc 512, d_dec 256, FFN 1024, 4 heads, dropout 0.3, untied, 6 classifiers), Adam, grad-norm clip 3,
# 8k tokens per update (--max-tokens 4096 on 2 GPUs; one GPU: UPDATE_FREQ=2), 50k updates, beam 5,
# tokenized BLEU. Not in the paper, fairseq's IWSLT recipe fills in: lr 5e-4, inverse_sqrt, 4k warm-up,
# label smoothing 0.1, weight decay 1e-4.
set -euo pipefail
ACTION=${1:?usage: reproduce.sh train|eval STAGE [SUBSET]}; STAGE=${2:?usage: reproduce.sh train|eval STAGE [SUBSET]}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
if [ "${SMOKE:-0}" = 1 ]; then
  DATA_BIN=${DATA_BIN:-$REPO/data-bin/iwslt14_de_en_sample}; RUN_DIR=${RUN_DIR:-$REPO/../runs/iwslt14_smoke}
  MODEL=(--arch adaptive_transformer_iwslt_de_en --encoder-layers 2 --decoder-layers 3 --encoder-embed-dim 64
         --decoder-embed-dim 64 --encoder-ffn-embed-dim 128 --decoder-ffn-embed-dim 128)
  LENGTH=(--max-update "${MAX_UPDATE:-20}"); STAGE2_LENGTH=(--max-update "${MAX_UPDATE:-10}")
  DEVICE=(--cpu); GEN_DEVICE=(--cpu); GEN=(--max-len-b 20); NUM_EXITS=3; EVAL_SENTENCES=${EVAL_SENTENCES-200}
else
  DATA_BIN=${DATA_BIN:-$REPO/data-bin/iwslt14_de_en}; RUN_DIR=${RUN_DIR:-$REPO/../runs/iwslt14}
  MODEL=(--arch adaptive_transformer_iwslt_de_en)
  LENGTH=(--max-update "${MAX_UPDATE:-50000}"); STAGE2_LENGTH=(--max-update "${STAGE2_UPDATES:-20000}")  # a cap: stage 2 stops on valid exit_loss (stages.sh)
  DEVICE=(--fp16); GEN_DEVICE=(); GEN=(); NUM_EXITS=6
fi
DATA_BIN=${DATA:-$DATA_BIN}; RUN_DIR=${RUNS:-$RUN_DIR}  # any data / run directory
[ -f "$DATA_BIN/dict.${TGT_LANG:-en}.txt" ] || { echo "error: $DATA_BIN/dict.${TGT_LANG:-en}.txt not found: run examples/iwslt14_de_en/prepare-full.sh (or prepare.sh for SMOKE=1)" >&2; exit 1; }
OPTIM=(--optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 3.0 --lr 5e-4 --lr-scheduler inverse_sqrt
       --warmup-updates 4000 --weight-decay 0.0001 --label-smoothing 0.1 --max-tokens 4096 --update-freq "${UPDATE_FREQ:-1}")
BEAM=5
THRESHOLDS=${THRESHOLDS:-"0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9"}
CONF_THRESHOLDS=${CONF_THRESHOLDS:-"0.5 0.7 0.8 0.9 0.95"}
source "$REPO/examples/common/stages.sh"
case "$ACTION" in
  train) train_stage "$STAGE" ;;
  eval) eval_stage "$STAGE" "${3:-valid}" ;;
  *) echo "error: unknown action '$ACTION' (train or eval)" >&2; exit 1 ;;
esac
