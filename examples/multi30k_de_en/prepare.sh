#!/usr/bin/env bash
# Multi30k task 1, German-English: joint BPE + fairseq binarization.
#
# Usage: examples/multi30k_de_en/prepare.sh [--limit N] [--merges N] [--force] [SHARED_DATA_DIR] [OUT_DIR]
#   SHARED_DATA_DIR  staged corpora (default: <repo>/../shared/data); reads multi30k-de-en/
#   OUT_DIR          fairseq binary data (default: <repo>/data-bin/multi30k_de_en)
# Environment (same as the flags): LIMIT=N (use the first N train pairs; 0 = all),
#   BPE_MERGES=N (default 8000), FORCE=1 (rebuild even if OUT_DIR/dict.en.txt exists),
#   WORKERS=N (fairseq-preprocess workers, default 2).
#
# Input: the staged Multi30k files are already lowercased, normalized and Moses-tokenized
# by the upstream scripts/task1-tokenize.sh (see shared/data/README.md), so this script only
#   1. learns subword-nmt BPE with BPE_MERGES merges on train.de + train.en concatenated
#      (one joint code file, as fairseq's prepare-iwslt14.sh does),
#   2. applies it to train, valid (val), test (test_2016_flickr) and the extra test sets
#      test1 (test_2017_flickr), test2 (test_2017_mscoco), test3 (test_2018_flickr),
#   3. runs fairseq-preprocess --joined-dictionary into OUT_DIR.
# Outputs:
#   OUT_DIR/                  dict.{de,en}.txt (identical, joined), {train,valid,test,test1..3}.de-en.*
#   OUT_DIR/../<name>.bpe/    code, BPE text {split}.{de,en}, tok/{split}.{de,en} (tokenized,
#                             no BPE, runs of spaces collapsed: the references for tokenized
#                             BLEU; BPE text minus '@@ ' == tok/), MANIFEST.txt (sources,
#                             cased raw references for sacrebleu, settings)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../common/lib.sh
source "$HERE/../common/lib.sh"

LIMIT="${LIMIT:-0}"
BPE_MERGES="${BPE_MERGES:-8000}"
FORCE="${FORCE:-0}"
WORKERS="${WORKERS:-2}"
parse_args 2 --limit=LIMIT --merges=BPE_MERGES --force=FORCE:1 -- "$@"
need_count LIMIT 0
need_count BPE_MERGES 1
export FORCE

data_dirs multi30k-de-en multi30k_de_en

if out_dir_done "$OUT"; then exit 0; fi

# split name in fairseq  ->  staged file stem under $SRC
SPLITS=(train valid test test1 test2 test3)
declare -A STEM=(
    [train]=train [valid]=valid [test]=test
    [test1]=extra/test_2017_flickr [test2]=extra/test_2017_mscoco [test3]=extra/test_2018_flickr
)
declare -A RAW=(
    [train]=raw/train [valid]=raw/val [test]=raw/test_2016_flickr
    [test1]=raw/test_2017_flickr [test2]=raw/test_2017_mscoco [test3]=raw/test_2018_flickr
)
[[ -d "$SRC" ]] || die "missing input directory: $SRC (pass SHARED_DATA_DIR, the folder holding multi30k-de-en/)"
for s in "${SPLITS[@]}"; do
    need_file "$SRC/${STEM[$s]}.de.xz" "$SRC/${STEM[$s]}.en.xz"
done

PY="$(python_tool)"
SUBWORD_NMT="$(tool subword-nmt)"
PREPROCESS="$(tool fairseq-preprocess)"
command -v xz >/dev/null || die "'xz' not found on PATH (needed to read the staged .xz files)"

log "Multi30k de-en: $SRC -> $OUT (BPE text: $BPE_DIR)"
log "settings: BPE_MERGES=$BPE_MERGES LIMIT=$LIMIT WORKERS=$WORKERS"
mkdir -p "$(dirname "$OUT")"
STAGE="$(mktemp -d "$(dirname "$OUT")/.$(basename "$OUT").tmp.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/bpe/tok" "$STAGE/bin"
TOK="$STAGE/bpe/tok"
BPE="$STAGE/bpe"

log "1/4 decompressing the tokenized text"
for s in "${SPLITS[@]}"; do
    for l in de en; do
        # apply-bpe splits on single spaces and drops empty tokens, so runs of spaces are
        # collapsed and leading/trailing spaces removed first (upstream has one train.en line
        # with a double space and one test_2018_flickr.en line with a trailing space); with
        # that, BPE text minus '@@ ' == tok/ exactly.
        xz -dc "$SRC/${STEM[$s]}.$l.xz" | LC_ALL=C sed -e 's/  */ /g; s/^ //; s/ $//' > "$TOK/$s.$l"
    done
    if [[ "$s" == train && "$LIMIT" -gt 0 ]]; then
        for l in de en; do
            head -n "$LIMIT" "$TOK/train.$l" > "$TOK/train.$l.head" && mv "$TOK/train.$l.head" "$TOK/train.$l"
        done
    fi
    same_lines "$TOK/$s.de" "$TOK/$s.en"
    log "    $s: $(nlines "$TOK/$s.de") pairs (${STEM[$s]})"
done

log "2/4 learning joint BPE ($BPE_MERGES merges) on train.de + train.en"
cat "$TOK/train.de" "$TOK/train.en" | "$SUBWORD_NMT" learn-bpe -s "$BPE_MERGES" > "$BPE/code" 2> "$STAGE/learn-bpe.log" \
    || { cat "$STAGE/learn-bpe.log" >&2; die "subword-nmt learn-bpe failed (output above)"; }
log "    $(($(nlines "$BPE/code") - 1)) merges learned$(grep -q 'Stopping' "$STAGE/learn-bpe.log" && echo ' (stopped early: no pair left with frequency >= 2)')"

log "3/4 applying BPE"
for s in "${SPLITS[@]}"; do
    pids=()
    for l in de en; do
        "$SUBWORD_NMT" apply-bpe -c "$BPE/code" < "$TOK/$s.$l" > "$BPE/$s.$l" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do
        wait "$pid" || die "subword-nmt apply-bpe failed on $s"
    done
    for l in de en; do check_roundtrip "$BPE/$s.$l" "$TOK/$s.$l"; done
done
log "    BPE text round-trips to the tokenized text for every file"

log "4/4 fairseq-preprocess --joined-dictionary"
"$PREPROCESS" --source-lang de --target-lang en \
    --trainpref "$BPE/train" --validpref "$BPE/valid" \
    --testpref "$BPE/test,$BPE/test1,$BPE/test2,$BPE/test3" \
    --destdir "$STAGE/bin" --joined-dictionary --workers "$WORKERS" > "$STAGE/preprocess.stdout" 2>&1 \
    || { cat "$STAGE/preprocess.stdout" >&2; die "fairseq-preprocess failed (output above)"; }

{
    echo "Multi30k task 1 de-en, prepared by examples/multi30k_de_en/prepare.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "source: $SRC (tokenized + lowercased upstream, see shared/data/README.md)"
    echo "BPE: subword-nmt $("$PY" -c 'import importlib.metadata as m; print(m.version("subword-nmt"))'), learn-bpe -s $BPE_MERGES on train.de+train.en; LIMIT=$LIMIT"
    echo "binary data: $OUT (fairseq-preprocess --joined-dictionary)"
    echo
    echo "split  pairs  tokenized (stem)                   cased raw reference (for sacrebleu)"
    for s in "${SPLITS[@]}"; do
        printf '%-6s %5s  %-34s %s\n' "$s" "$(nlines "$TOK/$s.de")" "${STEM[$s]}.{de,en}.xz" "$SRC/${RAW[$s]}.{de,en}.gz"
    done
} > "$BPE/MANIFEST.txt"

# preprocess.log names the staging paths; point it at the final ones
sed -i -e "s#$BPE/#$BPE_DIR/#g; s#$STAGE/bin#$OUT#g" "$STAGE/bin/preprocess.log"
replace_dir "$BPE" "$BPE_DIR" MANIFEST.txt
replace_dir "$STAGE/bin" "$OUT" preprocess.log

log "done in ${SECONDS}s"
log "    joined dictionary: $(grep -m1 -o 'Dictionary: [0-9]* types' "$OUT/preprocess.log" | grep -o '[0-9]*') types" \
    "(fairseq's count incl. 4 specials; dict.en.txt = dict.de.txt, $(nlines "$OUT/dict.en.txt") lines)"
for s in "${SPLITS[@]}"; do
    log "    $s: $(nlines "$BPE_DIR/$s.de") pairs, $(wc -w < "$BPE_DIR/$s.de" | tr -d ' ') de / $(wc -w < "$BPE_DIR/$s.en" | tr -d ' ') en BPE tokens"
done
