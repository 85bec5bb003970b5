#!/usr/bin/env bash
# Reduced-scale reproduction of the paper on Multi30k de-en, for 2 CPU cores.
#   bash examples/multi30k_de_en/reproduce_cpu.sh train STAGE     (aligned, baseline-N, mixed-M, geometric-C, ...)
#   bash examples/multi30k_de_en/reproduce_cpu.sh eval STAGE [SUBSET]
# Scale: the paper's IWSLT shape (6+6 blocks, decoder width 256, FFN 1024, 4 heads, dropout 0.3,
# untied embeddings, 6 separate exit classifiers) with the encoder narrowed from 512 to 256, on the
# main Multi30k data (8,000 BPE merges, 7,872-type joined dictionary). RUN_DIR defaults to ../runs/multi30k_cpu.
# SCALE=demo: the demo's model instead (3+6 blocks, width 128, FFN 512, all 6 exit classifiers untied,
# 3,080-type dictionary, lr 2e-3, 2,048 tokens per update), the scale whose stages fit a CPU session;
# RUN_DIR then defaults to ../runs/multi30k_demo_scale.
# Every scale: stage 1 validates once per epoch and stops after 5 epochs without a better valid loss
# (--patience 5; EPOCHS caps it); stage 2 as in examples/common/stages.sh (STAGE2_MODE=joint|frozen).
# Any data and run directory: DATA=<fairseq-preprocess --destdir> RUNS=<where the stages go> (also
# SRC_LANG/TGT_LANG for the EVAL_SENTENCES subsets), e.g. for another language pair.
set -euo pipefail
ACTION=${1:?usage: reproduce_cpu.sh train|eval STAGE [SUBSET]}; STAGE=${2:?usage: reproduce_cpu.sh train|eval STAGE [SUBSET]}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
DATA_BIN=${DATA_BIN:-$REPO/data-bin/multi30k_de_en}
RUN_DIR=${RUN_DIR:-$REPO/../runs/multi30k_cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
MODEL=(--arch adaptive_transformer_iwslt_de_en --encoder-embed-dim 256 --encoder-ffn-embed-dim 1024)
OPTIM=(--optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 3.0 --lr 7e-4 --lr-scheduler inverse_sqrt
       --warmup-updates 1000 --weight-decay 0.0001 --label-smoothing 0.1 --max-tokens 4096)
LENGTH=(--max-epoch "${EPOCHS:-100}" --patience 5)
STAGE2_LENGTH=(--max-update "${STAGE2_UPDATES:-20000}")  # a cap: stage 2 stops on valid exit_loss first
if [ "${SCALE:-}" = demo ]; then
  DATA_BIN=${DATA_BIN_DEMO:-$REPO/data-bin/multi30k_de_en_bpe3000}; RUN_DIR=${RUN_DIR_DEMO:-$REPO/../runs/multi30k_demo_scale}
  MODEL=(--arch adaptive_transformer --encoder-layers 3 --decoder-layers 6 --encoder-embed-dim 128
         --decoder-embed-dim 128 --encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512
         --encoder-attention-heads 4 --decoder-attention-heads 4 --dropout 0.1)
  OPTIM=(--optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 3.0 --lr 2e-3 --lr-scheduler inverse_sqrt
         --warmup-updates 200 --weight-decay 0.0001 --label-smoothing 0.1 --max-tokens 2048)
  LENGTH=(--max-epoch "${EPOCHS:-60}" --patience 5); STAGE2_LENGTH=(--max-update "${STAGE2_UPDATES:-6000}")
fi
DATA_BIN=${DATA:-$DATA_BIN}; RUN_DIR=${RUNS:-$RUN_DIR}
# STOP_TIME_HOURS caps a stage by wall clock (fairseq's --stop-time-hours; stage 2 inherits stage 1's
# training time, so give it the sum). DEVICE_FLAGS / GEN_DEVICE_FLAGS replace --cpu (e.g. "" on a GPU).
if [ -n "${STOP_TIME_HOURS:-}" ]; then
  LENGTH+=(--stop-time-hours "$STOP_TIME_HOURS"); STAGE2_LENGTH+=(--stop-time-hours "$STOP_TIME_HOURS")
fi
read -r -a DEVICE <<< "${DEVICE_FLAGS---cpu}"; read -r -a GEN_DEVICE <<< "${GEN_DEVICE_FLAGS---cpu}"
GEN=(); BEAM=5; NUM_EXITS=6
[ "${SCALE:-}" = demo ] && GEN=(--max-len-a 1.2 --max-len-b 10)  # as demo.sh
[ -f "$DATA_BIN/dict.${TGT_LANG:-en}.txt" ] || { echo "error: $DATA_BIN/dict.${TGT_LANG:-en}.txt not found: run examples/multi30k_de_en/prepare.sh (or set DATA)" >&2; exit 1; }
THRESHOLDS=${THRESHOLDS-"0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9"}
CONF_THRESHOLDS=${CONF_THRESHOLDS-"0.5 0.7 0.8 0.9 0.95"}
source "$REPO/examples/common/stages.sh"
case "$ACTION" in
  train) train_stage "$STAGE" ;;
  eval) eval_stage "$STAGE" "${3:-valid}" ;;
  *) echo "error: unknown action '$ACTION' (train or eval)" >&2; exit 1 ;;
esac
