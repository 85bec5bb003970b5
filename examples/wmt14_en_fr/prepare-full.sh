#!/usr/bin/env bash
# WMT'14 English-French, full training data (~36M pairs before cleaning): fairseq's
# examples/translation/prepare-wmt14en2fr.sh with the Moses perl scripts replaced by
# examples/common/moses_compat.py (sacremoses). NEEDS INTERNET and tens of GB of disk; it was
# written for a big machine and has NOT been run here (the data is not available offline).
#
# Usage: examples/wmt14_en_fr/prepare-full.sh [--no-binarize] [PREP_DIR] [OUT_DIR]
#   PREP_DIR  text output like fairseq's wmt14_en_fr/ (BPE'd train/valid/test, code, tmp/,
#             orig/ = downloads) (default: <repo>/data-bin/wmt14_en_fr.tokenized)
#   OUT_DIR   fairseq binary data (default: <repo>/data-bin/wmt14_en_fr)
# Environment: BPE_TOKENS (default 40000, fairseq's value; the paper reports a 44k joint BPE
#   vocabulary, which may be the size of the joined dictionary that 40k merges give rather
#   than 44k merges; BPE_TOKENS=44000 learns 44k merges), JOBS (tokenizer processes, default
#   nproc; fairseq used -threads 8), WORKERS (fairseq-preprocess, default nproc), FORCE=1.
#
# Steps (as fairseq): download europarl-v7, commoncrawl, un, news-commentary-v9, giga-fren,
# test-full; normalize-punctuation + remove-non-printing-char + tokenizer -a on the training
# corpora; the test set from test-full/newstest2014-fren-{src.en,ref.fr}.sgm (no normalization);
# valid = every 1333rd training line; subword-nmt BPE learned on train.en + train.fr; BPE
# applied; clean-corpus-n 1-250 tokens ratio 1.5 on the BPE'd train and valid; then
# fairseq-preprocess --joined-dictionary (fairseq's README for this recipe uses
# --joined-dictionary too).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../common/lib.sh
source "$HERE/../common/lib.sh"

BINARIZE=1
FORCE="${FORCE:-0}"
NPROC="$(nproc 2>/dev/null || echo 2)"
JOBS="${JOBS:-$NPROC}"
WORKERS="${WORKERS:-$NPROC}"
BPE_TOKENS="${BPE_TOKENS:-40000}"
parse_args 2 --no-binarize=BINARIZE:0 --force=FORCE:1 -- "$@"
export FORCE

URLS=(
    "http://statmt.org/wmt13/training-parallel-europarl-v7.tgz"
    "http://statmt.org/wmt13/training-parallel-commoncrawl.tgz"
    "http://statmt.org/wmt13/training-parallel-un.tgz"
    "http://statmt.org/wmt14/training-parallel-nc-v9.tgz"
    "http://statmt.org/wmt10/training-giga-fren.tar"
    "http://statmt.org/wmt14/test-full.tgz"
)
FILES=(
    "training-parallel-europarl-v7.tgz"
    "training-parallel-commoncrawl.tgz"
    "training-parallel-un.tgz"
    "training-parallel-nc-v9.tgz"
    "training-giga-fren.tar"
    "test-full.tgz"
)
CORPORA=(
    "training/europarl-v7.fr-en"
    "commoncrawl.fr-en"
    "un/undoc.2000.fr-en"
    "training/news-commentary-v9.fr-en"
    "giga-fren.release2.fixed"
)

src=en
tgt=fr
lang=en-fr
prep="$(abspath "${POS[0]:-$REPO/data-bin/wmt14_en_fr.tokenized}")"
OUT="$(abspath "${POS[1]:-$REPO/data-bin/wmt14_en_fr}")"
tmp="$prep/tmp"
orig="$prep/orig"

if [[ "$BINARIZE" == 1 ]] && out_dir_done "$OUT"; then exit 0; fi
PY="$(python_tool)"
MOSES=("$PY" "$COMMON/moses_compat.py")
SUBWORD_NMT="$(tool subword-nmt)"
mkdir -p "$orig" "$tmp"

fetch() {  # fetch URL FILE: download into $orig unless present; fail clearly
    local url="$1" file="$2"
    if [[ -f "$orig/$file" ]]; then log "$file already exists, skipping download"; return 0; fi
    log "downloading $url"
    if command -v curl >/dev/null; then
        curl -fL --retry 2 --connect-timeout 20 -o "$orig/$file.part" "$url" || true
    elif command -v wget >/dev/null; then
        wget --tries=2 --timeout=20 -O "$orig/$file.part" "$url" || true
    else
        die "neither curl nor wget is installed"
    fi
    if [[ -s "$orig/$file.part" ]] && tar tf "$orig/$file.part" >/dev/null 2>&1; then
        mv "$orig/$file.part" "$orig/$file"
        log "    $url successfully downloaded."
    else
        rm -f "$orig/$file.part"
        die "$url not successfully downloaded (this recipe needs internet access; or put $file in $orig/ by hand and rerun)"
    fi
}

for ((i = 0; i < ${#URLS[@]}; ++i)); do
    file="${FILES[i]}"
    fetch "${URLS[i]}" "$file"
    log "extracting $file"
    tar xf "$orig/$file" -C "$orig"
done
for f in "$orig"/giga-fren.release2.fixed.*.gz; do
    if [[ -f "$f" ]]; then gunzip -f "$f"; fi
done

log "pre-processing train data..."
for l in $src $tgt; do
    rm -f "$tmp/train.tags.$lang.tok.$l"
    for f in "${CORPORA[@]}"; do
        need_file "$orig/$f.$l"
        "${MOSES[@]}" normalize -l "$l" -j "$JOBS" < "$orig/$f.$l" | \
            "${MOSES[@]}" remove-non-printing -j "$JOBS" | \
            "${MOSES[@]}" tokenize -a -l "$l" -j "$JOBS" >> "$tmp/train.tags.$lang.tok.$l"
        log "    $f.$l done"
    done
done

log "pre-processing test data..."
for l in $src $tgt; do
    if [[ "$l" == "$src" ]]; then t=src; else t=ref; fi
    need_file "$orig/test-full/newstest2014-fren-$t.$l.sgm"
    grep '<seg id' "$orig/test-full/newstest2014-fren-$t.$l.sgm" | \
        sed -e 's/<seg id="[0-9]*">\s*//g' | \
        sed -e 's/\s*<\/seg>\s*//g' | \
        sed -e "s/\’/\'/g" | \
        "${MOSES[@]}" tokenize -a -l "$l" -j "$JOBS" > "$tmp/test.$l"
done

log "splitting train and valid..."
for l in $src $tgt; do
    awk '{if (NR%1333 == 0)  print $0; }' "$tmp/train.tags.$lang.tok.$l" > "$tmp/valid.$l"
    awk '{if (NR%1333 != 0)  print $0; }' "$tmp/train.tags.$lang.tok.$l" > "$tmp/train.$l"
done

TRAIN="$tmp/train.fr-en"
BPE_CODE="$prep/code"
rm -f "$TRAIN"
for l in $src $tgt; do
    cat "$tmp/train.$l" >> "$TRAIN"
done

log "learn-bpe ($BPE_TOKENS merges) on $TRAIN..."
"$SUBWORD_NMT" learn-bpe -s "$BPE_TOKENS" < "$TRAIN" > "$BPE_CODE"

for L in $src $tgt; do
    for f in train.$L valid.$L test.$L; do
        log "apply-bpe to $f..."
        "$SUBWORD_NMT" apply-bpe --num-workers "$JOBS" -c "$BPE_CODE" < "$tmp/$f" > "$tmp/bpe.$f"
    done
done

"${MOSES[@]}" clean-corpus --ratio 1.5 "$tmp/bpe.train" $src $tgt "$prep/train" 1 250
"${MOSES[@]}" clean-corpus --ratio 1.5 "$tmp/bpe.valid" $src $tgt "$prep/valid" 1 250

for L in $src $tgt; do
    cp "$tmp/bpe.test.$L" "$prep/test.$L"
done

if [[ "$BINARIZE" == 1 ]]; then
    log "fairseq-preprocess --joined-dictionary -> $OUT"
    mkdir -p "$(dirname "$OUT")"
    STAGE="$(mktemp -d "$(dirname "$OUT")/.$(basename "$OUT").tmp.XXXXXX")"
    trap 'rm -rf "$STAGE"' EXIT
    "$(tool fairseq-preprocess)" --source-lang $src --target-lang $tgt \
        --trainpref "$prep/train" --validpref "$prep/valid" --testpref "$prep/test" \
        --destdir "$STAGE/bin" --joined-dictionary --workers "$WORKERS"
    replace_dir "$STAGE/bin" "$OUT" preprocess.log
    log "    $(grep -m1 -o 'Dictionary: [0-9]* types' "$OUT/preprocess.log") (fairseq's count incl. 4 specials)"
fi
log "done in ${SECONDS}s; test set: $prep/test.{en,fr} (3003 lines)"
