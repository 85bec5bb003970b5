#!/usr/bin/env bash
# Training and evaluation stages shared by the reproduction recipes (sourced, not run).
# The recipe sets: REPO, DATA_BIN, RUN_DIR, MODEL=(arch flags), OPTIM=(optimizer flags),
# LENGTH=(--max-epoch/--max-update ... with --patience: stage 1 stops when valid loss stops improving),
# STAGE2_LENGTH=(the estimator stage's cap), DEVICE=(--cpu or --fp16 ...), GEN_DEVICE=(--cpu or nothing),
# BEAM, NUM_EXITS, GEN=(extra generate flags), THRESHOLDS="...", CONF_THRESHOLDS="...".
#
# The estimator stage (stage 2, §3) from the aligned model, to convergence on valid exit_loss:
#   STAGE2_MODE=joint (default; the paper: L_dec + α L_exit back-propagated into the whole model) or
#   frozen (--train-estimator-only: only the estimator trains, the stage-1 model and so the oracle stay
#   fixed); --lr-scheduler fixed at STAGE2_LR (default 3e-4), the estimator at --estimator-lr-multiplier
#   (default 10) times that; validation every STAGE2_VALIDATE updates (default 200), stop after
#   STAGE2_PATIENCE (default 5) validations without a lower valid exit_loss, the best one kept.
#   STAGE2_TRAIN_SUBSET=SPLIT trains the estimator stage on another binarized split of DATA_BIN (e.g.
#   test1: sentences the stage-1 model never saw, so their oracle depths are those of unseen input;
#   fairseq's --train-subset), validating only every STAGE2_VALIDATE updates (not at each short epoch).
#
# Stages (each resumable: rerunning continues from RUN_DIR/<stage>/checkpoint_last.pt):
#   aligned | baseline-N (N decoder blocks, one exit) | mixed-M | <estimator>-<LL|C>
#   (estimator: sequence, token-multinomial, geometric = token-geometric, ...; stage 2 from aligned;
#   suffixes +l<λ> +s<σ> +frozen +separate, e.g. geometric-LL+l0.2+s1, for the λ/σ sweeps, the frozen
#   variant and per-block halting units)
# Evaluation: eval STAGE SUBSET writes RUN_DIR/STAGE/generate-SUBSET-SETTING.log for
#   SETTING = full, exit1..exitN (aligned/mixed), thr<T> (estimators), conf<T> (aligned: confidence).
#   EVAL_SENTENCES=N decodes only the first N pairs of SUBSET (binarized once with the model's
#   dictionaries into RUN_DIR/eval-data/SUBSETN from DATA_BIN.bpe/SUBSET.{SRC_LANG,TGT_LANG}); the logs
#   are then named generate-SUBSETN-SETTING.log (e.g. generate-valid200-full.log).

# The fairseq tools: from PATH, else from the repo's own environment (`make install` makes .venv), so a
# recipe runs without an activated venv; neither → one line before anything runs.
if ! command -v fairseq-generate > /dev/null && [ -x "$REPO/.venv/bin/fairseq-generate" ]; then
  PATH="$REPO/.venv/bin:$PATH"
fi
command -v fairseq-generate > /dev/null || {
  echo "error: fairseq-train/fairseq-generate not found on PATH nor in $REPO/.venv/bin: run make install, or activate an environment with fairseq" >&2
  return 1; }

COMMON=(--user-dir "$REPO/fairseq_dat" --task adaptive_translation --seed 1 --log-format simple
        --log-interval 50 --keep-last-epochs 10 --save-interval-updates 0)

# stage_two_flags: the estimator stage's optimizer and stopping rule (see the header), into STAGE2_FLAGS
stage_two_flags() {
  local validate=${STAGE2_VALIDATE:-200}
  STAGE2_FLAGS=(--lr-scheduler fixed --lr "${STAGE2_LR:-3e-4}" --warmup-updates 0
                --estimator-lr-multiplier "${STAGE2_LR_MULTIPLIER:-10}"
                --best-checkpoint-metric exit_loss --patience "${STAGE2_PATIENCE:-5}"
                --validate-interval-updates "$validate" --save-interval-updates "$validate" --keep-interval-updates 1
                --no-epoch-checkpoints)
  if [ -n "${STAGE2_TRAIN_SUBSET:-}" ]; then
    local src=${SRC_LANG:-de} tgt=${TGT_LANG:-en}
    [ -f "$DATA_BIN/$STAGE2_TRAIN_SUBSET.$src-$tgt.$src.idx" ] || {
      echo "error: STAGE2_TRAIN_SUBSET=$STAGE2_TRAIN_SUBSET: $DATA_BIN/$STAGE2_TRAIN_SUBSET.$src-$tgt.$src.idx not found" >&2
      return 1; }
    # --upsample-primary 1: a split in parts (SPLIT, SPLIT1, SPLIT2, ...) is concatenated by fairseq, whose
    # default -1 then fails ("negative dimensions are not allowed" in ConcatDataset.sizes)
    STAGE2_FLAGS+=(--train-subset "$STAGE2_TRAIN_SUBSET" --upsample-primary 1 --validate-interval 1000000 --save-interval 1000000)
  fi
  case "${STAGE2_MODE:-joint}" in
    joint) ;;
    frozen) STAGE2_FLAGS+=(--train-estimator-only) ;;
    *) echo "error: STAGE2_MODE must be joint or frozen, got '${STAGE2_MODE}'" >&2; return 1 ;;
  esac
}
stage_two_flags || exit 1

train_stage() {  # train_stage STAGE
  local stage=$1 dir="$RUN_DIR/$1" extra=()
  case "$stage" in
    aligned) extra=(--criterion adaptive_label_smoothed_cross_entropy --exit-training aligned "${LENGTH[@]}") ;;
    baseline-[1-9]) extra=(--decoder-layers "${stage#baseline-}" --criterion label_smoothed_cross_entropy "${LENGTH[@]}") ;;
    mixed-[0-9]*) extra=(--criterion adaptive_label_smoothed_cross_entropy --exit-training mixed
                         --mixed-samples "${stage#mixed-}" "${LENGTH[@]}") ;;
    *-LL|*-C|*-LL+*|*-C+*)
      # <estimator>-<LL|C>[+l<λ>][+s<σ>][+frozen][+separate]: the oracle's λ and σ (sweeps, §4.3), the frozen
      # variant, one halting unit per block (token-geometric --separate-halting)
      local base=${stage%%+*} opts="" lambda=${LAMBDA:-0.1} sigma=${SIGMA:-0} mode=()
      [ "$base" = "$stage" ] || opts=${stage#*+}
      local opt
      for opt in ${opts//+/ }; do
        case "$opt" in
          frozen) mode+=(--train-estimator-only) ;;
          separate) mode+=(--separate-halting) ;;
          l[0-9.]*) lambda=${opt#l} ;;
          s[0-9.]*) sigma=${opt#s} ;;
          *) echo "error: stage $stage: unknown option '+$opt' (+l<lambda>, +s<sigma>, +frozen, +separate)" >&2; return 1 ;;
        esac
      done
      local est=${base%-*} oracle=correctness
      [ "${base##*-}" = LL ] && oracle=likelihood
      [ "$est" = geometric ] && est=token-geometric
      local init=()
      if [ ! -f "$dir/checkpoint_last.pt" ]; then
        [ -f "$RUN_DIR/aligned/checkpoint_best.pt" ] || { echo "error: stage $stage needs $RUN_DIR/aligned/checkpoint_best.pt (train the aligned stage first)" >&2; return 1; }
        init=(--finetune-from-model "$RUN_DIR/aligned/checkpoint_best.pt")
      fi
      extra=(--depth-estimator "$est" --criterion adaptive_label_smoothed_cross_entropy --depth-oracle "$oracle"
             --oracle-lambda "$lambda" --oracle-sigma "$sigma" --exit-loss-alpha "${ALPHA:-1.0}" "${mode[@]}"
             "${init[@]}" "${STAGE2_LENGTH[@]}" "${STAGE2_FLAGS[@]}") ;;
    *) echo "error: unknown stage '$stage' (aligned, baseline-N, mixed-M, <estimator>-LL|C)" >&2; return 1 ;;
  esac
  mkdir -p "$dir"
  echo "[$(date +%T)] train $stage -> $dir (log: $dir/train.log)"
  fairseq-train "$DATA_BIN" "${COMMON[@]}" "${DEVICE[@]}" "${MODEL[@]}" "${OPTIM[@]}" "${extra[@]}" \
    --save-dir "$dir" --tensorboard-logdir "$dir/tb" >> "$dir/train.log" 2>&1
  grep -E "valid on|done training" "$dir/train.log" | tail -2
}

eval_data_dir() {  # eval_data_dir SUBSET N: where the first N pairs of SUBSET are binarized
  echo "$RUN_DIR/eval-data/$1$2"
}

first_pairs_data_bin() {  # first_pairs_data_bin SUBSET N: binarize the first N pairs of SUBSET (once)
  local subset=$1 n=$2 src=${SRC_LANG:-de} tgt=${TGT_LANG:-en} bpe="${DATA_BIN%/}.bpe"
  local out tmp
  out=$(eval_data_dir "$subset" "$n")
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "error: EVAL_SENTENCES must be a positive integer, got '$n'" >&2; return 1; }
  if [ ! -f "$out/dict.$tgt.txt" ]; then
    for l in "$src" "$tgt"; do
      [ -f "$bpe/$subset.$l" ] || { echo "error: EVAL_SENTENCES needs the BPE text $bpe/$subset.$l (made by the recipe's prepare.sh)" >&2; return 1; }
    done
    tmp=$(mktemp -d)
    head -n "$n" "$bpe/$subset.$src" > "$tmp/$subset.$src"; head -n "$n" "$bpe/$subset.$tgt" > "$tmp/$subset.$tgt"
    local split=--validpref; [ "$subset" = test ] && split=--testpref
    fairseq-preprocess --source-lang "$src" --target-lang "$tgt" --srcdict "$DATA_BIN/dict.$src.txt" \
      --tgtdict "$DATA_BIN/dict.$tgt.txt" "$split" "$tmp/$subset" --destdir "$tmp/bin" --workers 1 > "$tmp/log" 2>&1 \
      || { cat "$tmp/log" >&2; echo "error: fairseq-preprocess failed on the first $n pairs of $subset" >&2; rm -rf "$tmp"; return 1; }
    [ "$subset" = valid ] || [ "$subset" = test ] || { for f in "$tmp/bin"/valid.*; do mv "$f" "${f/valid./$subset.}"; done; }
    mkdir -p "$(dirname "$out")"; rm -rf "$out"; mv "$tmp/bin" "$out"; rm -rf "$tmp"
  fi
}

generate_setting() {  # generate_setting STAGE SUBSET SETTING FLAGS...
  local stage=$1 subset=$2 setting=$3; shift 3
  local log="$RUN_DIR/$stage/generate-$subset${EVAL_SENTENCES:-}-$setting.log" data=$DATA_BIN
  if [ -n "${EVAL_SENTENCES:-}" ]; then data=$(eval_data_dir "$subset" "$EVAL_SENTENCES"); fi
  fairseq-generate "$data" --user-dir "$REPO/fairseq_dat" --task adaptive_translation \
    --path "$RUN_DIR/$stage/${CHECKPOINT:-checkpoint_best.pt}" --gen-subset "$subset" --beam "$BEAM" \
    --batch-size 64 --remove-bpe "${GEN_DEVICE[@]}" "${GEN[@]}" "$@" > "$log" 2>&1 \
    || { echo "error: generation failed, see $log" >&2; echo "$setting" >> "$RUN_DIR/$stage/eval-failed.txt"; return 1; }
  printf '%-14s %-8s %-10s %s | %s\n' "$stage" "$subset${EVAL_SENTENCES:-}" "$setting" \
    "$(grep -h -o 'BLEU4 = [0-9.]*' "$log")" "$(grep -h -o 'AE=[0-9.]*' "$log" | head -1)"
}

eval_stage() {  # eval_stage STAGE SUBSET   (EVAL_JOBS=k runs k settings at a time; default 1)
  local stage=$1 subset=$2
  [ -f "$RUN_DIR/$stage/${CHECKPOINT:-checkpoint_best.pt}" ] || { echo "error: $RUN_DIR/$stage/${CHECKPOINT:-checkpoint_best.pt} not found (train $stage first)" >&2; return 1; }
  [ -z "${EVAL_SENTENCES:-}" ] || first_pairs_data_bin "$subset" "$EVAL_SENTENCES" || return 1
  local settings=("full|")
  case "$stage" in
    aligned|mixed-*)
      settings+=("uniform|--exit-strategy uniform")
      for n in $(seq 1 "$NUM_EXITS"); do settings+=("exit$n|--fixed-exit $n"); done
      for t in $CONF_THRESHOLDS; do settings+=("conf$t|--exit-strategy confidence --exit-threshold $t"); done ;;
    *-LL|*-C|*-LL+*|*-C+*)
      for t in $THRESHOLDS; do settings+=("thr$t|--exit-threshold $t"); done ;;
  esac
  local item flags
  rm -f "$RUN_DIR/$stage/eval-failed.txt"  # settings run as background jobs: their failures are collected here
  for item in "${settings[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "${EVAL_JOBS:-1}" ]; do wait -n || true; done
    read -r -a flags <<< "${item#*|}"
    generate_setting "$stage" "$subset" "${item%%|*}" "${flags[@]}" &
  done
  wait
  if [ -s "$RUN_DIR/$stage/eval-failed.txt" ]; then
    echo "error: $(wc -l < "$RUN_DIR/$stage/eval-failed.txt") of ${#settings[@]} settings of $stage failed: $(tr '\n' ' ' < "$RUN_DIR/$stage/eval-failed.txt")(logs in $RUN_DIR/$stage)" >&2
    return 1
  fi
}
