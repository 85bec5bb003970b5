#!/usr/bin/env bash
# Reduced-scale reproduction of the paper on Multi30k de-en, for 2 CPU cores.
#   bash examples/multi30k_de_en/reproduce_cpu.sh STAGE [RUN_DIR] [DATA_BIN]
# Stages (each resumable: rerunning continues from RUN_DIR/<stage>/checkpoint_last.pt):
#   aligned            aligned multi-exit model (stage 1 of the paper, alpha = 0)
#   baseline-N         a plain N-block decoder (N = 1..6), single exit
#   mixed-M            mixed training with M sampled exit sequences (M = 1, 3, 6)
#   geometric-C        stage 2 from the aligned model: token-geometric estimator, correctness oracle,
#                      lambda 0.1, sigma 0 (the paper's headline setting)
#   <estimator>-<LL|C> stage 2 for any estimator (sequence, token-multinomial, token-geometric, ...)
# Scale: the paper's IWSLT shape (6+6 blocks, decoder width 256, FFN 1024, 4 heads, dropout 0.3,
# untied, 6 separate exit classifiers) with the encoder narrowed from 512 to 256 to fit the CPU budget.
set -euo pipefail
STAGE=${1:?usage: reproduce_cpu.sh STAGE [RUN_DIR] [DATA_BIN]}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
RUN_DIR=${2:-$REPO/../runs/multi30k_cpu}
DATA_BIN=${3:-$REPO/data-bin/multi30k_de_en}
EPOCHS=${EPOCHS:-35}
STAGE2_EPOCHS=${STAGE2_EPOCHS:-8}
[ -f "$DATA_BIN/dict.en.txt" ] || { echo "error: $DATA_BIN/dict.en.txt not found: run examples/multi30k_de_en/prepare.sh first" >&2; exit 1; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

MODEL=(--arch adaptive_transformer_iwslt_de_en --encoder-embed-dim 256 --encoder-ffn-embed-dim 1024)
OPTIM=(--optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 3.0 --lr 7e-4 --lr-scheduler inverse_sqrt
       --warmup-updates 1000 --weight-decay 0.0001 --label-smoothing 0.1 --max-tokens 4096)
COMMON=(--user-dir "$REPO/fairseq_dat" --task adaptive_translation --cpu --seed 1 --log-format simple
        --log-interval 25 --keep-last-epochs 2 --no-epoch-checkpoints --patience 8)

train() {  # train NAME EXTRA_ARGS...
  local name=$1; shift
  mkdir -p "$RUN_DIR/$name"
  echo "[$(date +%T)] training $name -> $RUN_DIR/$name (log: $RUN_DIR/$name/train.log)"
  fairseq-train "$DATA_BIN" "${COMMON[@]}" "${OPTIM[@]}" --save-dir "$RUN_DIR/$name" \
    --tensorboard-logdir "$RUN_DIR/$name/tb" "$@" 2>&1 | tee -a "$RUN_DIR/$name/train.log" | grep -E "valid|epoch [0-9]+ \||done" || true
}

case "$STAGE" in
  aligned)
    train aligned "${MODEL[@]}" --criterion adaptive_label_smoothed_cross_entropy --exit-training aligned \
      --max-epoch "$EPOCHS" ;;
  baseline-[1-6])
    n=${STAGE#baseline-}
    train "$STAGE" "${MODEL[@]}" --decoder-layers "$n" --criterion label_smoothed_cross_entropy --max-epoch "$EPOCHS" ;;
  mixed-[0-9]*)
    m=${STAGE#mixed-}
    train "$STAGE" "${MODEL[@]}" --criterion adaptive_label_smoothed_cross_entropy --exit-training mixed \
      --mixed-samples "$m" --max-epoch "$EPOCHS" ;;
  *-LL|*-C)
    est=${STAGE%-*}; oracle=$([ "${STAGE##*-}" = LL ] && echo likelihood || echo correctness)
    [ "$est" = geometric ] && est=token-geometric
    [ -f "$RUN_DIR/aligned/checkpoint_best.pt" ] || { echo "error: stage 2 needs $RUN_DIR/aligned/checkpoint_best.pt (run the aligned stage first)" >&2; exit 1; }
    train "$STAGE" "${MODEL[@]}" --depth-estimator "$est" --criterion adaptive_label_smoothed_cross_entropy \
      --depth-oracle "$oracle" --oracle-lambda "${LAMBDA:-0.1}" --oracle-sigma "${SIGMA:-0}" --exit-loss-alpha "${ALPHA:-1.0}" \
      --finetune-from-model "$RUN_DIR/aligned/checkpoint_best.pt" --max-epoch "$STAGE2_EPOCHS" --warmup-updates 1 --lr 2e-4 ;;
  *) echo "error: unknown stage '$STAGE' (see the header of $0)" >&2; exit 1 ;;
esac
