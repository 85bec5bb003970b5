#!/usr/bin/env bash
# Hold out training pairs for stage 2: a data directory whose train split lacks the last N training pairs,
# which join the held-out splits that the depth estimator's oracles are computed on (STAGE2_TRAIN_SUBSET=heldout).
# Oracle depths of sentences the stage-1 model trained on are deeper than on new text (examples/RESULTS.md
# "Stop 19"), and Multi30k's extra test sets give only 2,532 new pairs; N held-out training pairs add to them.
#
# Usage: examples/multi30k_de_en/hold_out.sh [--pairs N] [--seed S] [--text DIR] [--force] DATA_BIN OUT_DIR
#   DATA_BIN  a prepare.sh output directory (dictionary, binarized splits)
#   OUT_DIR   the new data directory, binarized with DATA_BIN's dictionary (checkpoints work on both)
# --seed S holds out N pairs drawn at random (Python's random.Random(S)), both splits keeping the corpus order;
#   without it, the last N pairs (Multi30k's are not a random sample: its last 5,000 English sides average
#   17.2 BPE tokens against 15.4 for the first 24,000; examples/RESULTS.md "Stop 33").
# Environment (same as the flags): PAIRS=N (default 5000), SEED=S (default: none, the last N), TEXT=DIR (the BPE text of DATA_BIN's train split,
#   train.{de,en}; default DATA_BIN.bpe, where prepare.sh writes it), FORCE=1 (rebuild), WORKERS=N (default 2).
# OUT_DIR holds: train = DATA_BIN's train without the N held-out pairs; valid, test, test1..3 linked from DATA_BIN;
#   the held-out splits heldout, heldout1, ... = DATA_BIN's test1, test2, test3 (those present), then the N
#   held-out training pairs (in corpus order); fairseq concatenates SPLIT, SPLIT1, ... as one split (the recipes pass
#   --upsample-primary 1), so STAGE2_TRAIN_SUBSET=heldout trains the estimator on all of them.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../common/lib.sh
source "$HERE/../common/lib.sh"

PAIRS="${PAIRS:-5000}"
FORCE="${FORCE:-0}"
WORKERS="${WORKERS:-2}"
TEXT="${TEXT:-}"
SEED="${SEED:-}"
parse_args 2 --pairs=PAIRS --seed=SEED --text=TEXT --force=FORCE:1 -- "$@"
[[ ${#POS[@]} -eq 2 ]] || die "give DATA_BIN and OUT_DIR (see --help)"
need_count PAIRS 1
[[ -z "$SEED" ]] || [[ "$SEED" =~ ^[0-9]+$ ]] || die "--seed must be a non-negative integer, got '$SEED'"
DATA_BIN="$(abspath "${POS[0]}")"; DATA_BIN="${DATA_BIN%/}"
OUT="$(abspath "${POS[1]}")"; OUT="${OUT%/}"
TEXT="$(abspath "${TEXT:-$DATA_BIN.bpe}")"
need_file "$DATA_BIN/dict.de.txt" "$DATA_BIN/dict.en.txt" "$TEXT/train.de" "$TEXT/train.en"
same_lines "$TEXT/train.de" "$TEXT/train.en"
[[ "$OUT" != "$DATA_BIN" ]] || die "OUT_DIR must differ from DATA_BIN"
export FORCE
if out_dir_done "$OUT"; then exit 0; fi

TOTAL=$(nlines "$TEXT/train.de")
[[ "$PAIRS" -lt "$TOTAL" ]] || die "--pairs $PAIRS must be smaller than the $TOTAL training pairs of $TEXT"
PREPROCESS="$(tool fairseq-preprocess)"
mkdir -p "$(dirname "$OUT")"
STAGE="$(mktemp -d "$(dirname "$OUT")/.$(basename "$OUT").tmp.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/text" "$STAGE/bin"
# held_lines: the 1-based line numbers of the held-out pairs, one per line, ascending
held_lines() {
    if [[ -z "$SEED" ]]; then seq "$((TOTAL - PAIRS + 1))" "$TOTAL"; return; fi
    "$(python_tool)" -c 'import random, sys
total, pairs, seed = map(int, sys.argv[1:])
print("\n".join(str(i + 1) for i in sorted(random.Random(seed).sample(range(total), pairs))))' "$TOTAL" "$PAIRS" "$SEED"
}
held_lines > "$STAGE/held.lines"
for l in de en; do  # awk: line numbers of held.lines go to held, the others to train
    awk -v held="$STAGE/text/held.$l" -v train="$STAGE/text/train.$l" \
        'NR == FNR { h[$1] = 1; next } { if (FNR in h) print > held; else print > train }' \
        "$STAGE/held.lines" "$TEXT/train.$l"
done
if [[ -z "$SEED" ]]; then WHICH="the last $PAIRS"; else WHICH="$PAIRS drawn with --seed $SEED"; fi
log "train: $((TOTAL - PAIRS)) pairs; held out: $WHICH of $TEXT/train.{de,en}"
"$PREPROCESS" --source-lang de --target-lang en --trainpref "$STAGE/text/train" --testpref "$STAGE/text/held" \
    --srcdict "$DATA_BIN/dict.de.txt" --joined-dictionary --destdir "$STAGE/bin" --workers "$WORKERS" \
    > "$STAGE/preprocess.stdout" 2>&1 || { cat "$STAGE/preprocess.stdout" >&2; die "fairseq-preprocess failed (output above)"; }
mkdir "$STAGE/held"
mv "$STAGE"/bin/test.de-en.* "$STAGE/held/"  # its name goes to DATA_BIN's test split below

link_split() {  # link_split FROM TO: DATA_BIN's binarized split FROM as OUT's split TO
    local l ext
    for l in de en; do
        for ext in bin idx; do
            ln -s "$DATA_BIN/$1.de-en.$l.$ext" "$STAGE/bin/$2.de-en.$l.$ext"
        done
    done
}
has_split() { [[ -f "$DATA_BIN/$1.de-en.de.bin" && -f "$DATA_BIN/$1.de-en.en.bin" ]]; }
for s in valid test test1 test2 test3; do
    if has_split "$s"; then link_split "$s" "$s"; fi
done
held_name() { if [[ $1 -eq 0 ]]; then echo heldout; else echo "heldout$1"; fi; }  # fairseq's SPLIT, SPLIT1, ...
i=0
for s in test1 test2 test3; do
    if has_split "$s"; then link_split "$s" "$(held_name $i)"; log "$(held_name $i): $s of $DATA_BIN"; i=$((i + 1)); fi
done
LAST="$(held_name $i)"
for l in de en; do
    for ext in bin idx; do
        mv "$STAGE/held/test.de-en.$l.$ext" "$STAGE/bin/$LAST.de-en.$l.$ext"
    done
done
log "$LAST: the $PAIRS held-out training pairs"
{
    echo "examples/multi30k_de_en/hold_out.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ): $DATA_BIN -> $OUT"
    echo "train: $((TOTAL - PAIRS)) of the $TOTAL pairs of $TEXT/train.{de,en}; $LAST: $WHICH (line numbers in $LAST.lines)"
    cat "$STAGE/bin/preprocess.log"
} > "$STAGE/bin/preprocess.log.new" && mv "$STAGE/bin/preprocess.log.new" "$STAGE/bin/preprocess.log"
sed -i -e "s#$STAGE/bin#$OUT#g" "$STAGE/bin/preprocess.log"
cp "$STAGE/held.lines" "$STAGE/bin/$LAST.lines"
replace_dir "$STAGE/bin" "$OUT" preprocess.log
log "done: STAGE2_TRAIN_SUBSET=heldout reads heldout..$LAST of $OUT"
