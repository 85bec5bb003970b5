#!/usr/bin/env bash
# IWSLT'14 German-English, FULL data (160,239 train pairs): download and build it exactly as
# fairseq's examples/translation/prepare-iwslt14.sh does, then binarize. NEEDS INTERNET
# (or a local de-en.tgz). Offline, use prepare.sh (staged valid/test + train sample).
#
# Usage: examples/iwslt14_de_en/prepare-full.sh [--test-only] [--no-binarize] [--force] [PREP_DIR] [OUT_DIR]
#   PREP_DIR   text output, laid out like fairseq's iwslt14.tokenized.de-en/ (BPE'd
#              {train,valid,test}.{de,en}, code, tmp/ = tokenized text without BPE, orig/ =
#              download) (default: <repo>/data-bin/iwslt14.tokenized.de-en)
#   OUT_DIR    fairseq binary data (default: <repo>/data-bin/iwslt14_de_en)
#   --test-only    only build PREP_DIR/tmp/test.{de,en} from the IWSLT14.TED*.xml files already in
#                  PREP_DIR/orig/de-en/ (no download); used to check the pipeline on the staged XML
#   --no-binarize  stop after BPE (skip fairseq-preprocess)
# Environment: IWSLT14_TGZ=/path/de-en.tgz (use a local copy instead of downloading),
#   JOBS=N (tokenizer processes; fairseq used -threads 8; default: nproc), WORKERS=N
#   (fairseq-preprocess, default: nproc), JOINED_DICT=0 (separate dictionaries, as fairseq's
#   README binarizes IWSLT14; default 1 = --joined-dictionary), FORCE=1 (rebuild if
#   OUT_DIR/dict.en.txt exists), SHARED_DATA_DIR (default <repo>/../shared/data: when found, the
#   result is compared with the staged copy of fairseq's output).
#
# Same steps and settings as fairseq's script (same URL, same filters, clean-corpus-n 1-175
# tokens with ratio 1.5, lowercasing, valid = every 23rd line of the cleaned train data,
# test = dev2010 + tedx.dev2012 + tst2010 + tst2011 + tst2012, subword-nmt BPE with 10,000
# merges learned on train.de + train.en). The Moses perl scripts are replaced by
# examples/common/moses_compat.py (sacremoses; tokenizer.perl default flags, i.e. XML
# escaping on and no -a): on the five staged IWSLT14 test XML files it reproduces fairseq's
# tokenized + lowercased test.{de,en} byte for byte (6,750/6,750 lines each).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../common/lib.sh
source "$HERE/../common/lib.sh"

TEST_ONLY=0
BINARIZE=1
FORCE="${FORCE:-0}"
NPROC="$(nproc 2>/dev/null || echo 2)"
JOBS="${JOBS:-$NPROC}"
WORKERS="${WORKERS:-$NPROC}"
JOINED_DICT="${JOINED_DICT:-1}"
parse_args 2 --test-only=TEST_ONLY:1 --no-binarize=BINARIZE:0 --force=FORCE:1 -- "$@"
export FORCE

# fairseq's current script downloads from dl.fbaipublicfiles.com; the original (2019) one from
# WIT3, which is offline nowadays. Same archive.
URLS=(
    "http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz"
    "https://wit3.fbk.eu/archive/2014-01/texts/de/en/de-en.tgz"
)
GZ=de-en.tgz
BPE_TOKENS=10000
src=de
tgt=en
lang=de-en
prep="$(abspath "${POS[0]:-$REPO/data-bin/iwslt14.tokenized.de-en}")"
OUT="$(abspath "${POS[1]:-$REPO/data-bin/iwslt14_de_en}")"
SHARED="$(abspath "${SHARED_DATA_DIR:-$REPO/../shared/data}")/iwslt14-de-en"
tmp="$prep/tmp"
orig="$prep/orig"

if [[ "$TEST_ONLY" == 0 && "$BINARIZE" == 1 ]] && out_dir_done "$OUT"; then exit 0; fi

PY="$(python_tool)"
MOSES=("$PY" "$COMMON/moses_compat.py")
"$PY" -c 'import sacremoses' 2>/dev/null || die "python package 'sacremoses' not importable by $PY"
mkdir -p "$orig" "$tmp"

tokenize() { "${MOSES[@]}" tokenize -l "$1" -j "$JOBS"; }
lowercase() { "${MOSES[@]}" lowercase; }

download() {
    local url part="$orig/$GZ.part"
    for url in "${URLS[@]}"; do
        log "downloading $url"
        rm -f "$part"
        if command -v curl >/dev/null; then
            curl -fL --retry 2 --connect-timeout 20 -o "$part" "$url" || continue
        elif command -v wget >/dev/null; then
            wget -q --tries=2 --timeout=20 -O "$part" "$url" || continue
        else
            die "neither curl nor wget is installed; download $url to $orig/$GZ by hand"
        fi
        if tar tzf "$part" >/dev/null 2>&1; then
            mv "$part" "$orig/$GZ"
            log "    data successfully downloaded ($(du -h "$orig/$GZ" | cut -f1))"
            return 0
        fi
        log "    $url did not give a valid .tgz"
    done
    rm -f "$part"
    die "could not download $GZ (tried: ${URLS[*]}). This recipe needs internet access; or copy the archive to $orig/$GZ (or set IWSLT14_TGZ=/path/to/$GZ) and rerun. Offline, examples/iwslt14_de_en/prepare.sh builds the staged sample."
}

# ---------------------------------------------------------------------------- download
if [[ "$TEST_ONLY" == 1 ]]; then
    ls "$orig/$lang"/IWSLT14.TED*.xml >/dev/null 2>&1 \
        || die "--test-only needs the IWSLT14.TED*.xml files in $orig/$lang/ (missing)"
elif [[ ! -f "$orig/$lang/train.tags.$lang.$src" || ! -f "$orig/$lang/train.tags.$lang.$tgt" ]]; then
    if [[ -n "${IWSLT14_TGZ:-}" ]]; then
        need_file "$IWSLT14_TGZ"
        cp "$IWSLT14_TGZ" "$orig/$GZ"
    elif [[ ! -f "$orig/$GZ" ]]; then
        download
    fi
    log "extracting $orig/$GZ"
    tar zxf "$orig/$GZ" -C "$orig" || die "could not extract $orig/$GZ (corrupt download? delete it and rerun)"
fi

# ---------------------------------------------------------------------------- train
if [[ "$TEST_ONLY" == 0 ]]; then
    log "pre-processing train data..."
    for l in $src $tgt; do
        f="train.tags.$lang.$l"
        tok="train.tags.$lang.tok.$l"
        need_file "$orig/$lang/$f"
        grep -v '<url>' "$orig/$lang/$f" | \
            grep -v '<talkid>' | \
            grep -v '<keywords>' | \
            sed -e 's/<title>//g' | \
            sed -e 's/<\/title>//g' | \
            sed -e 's/<description>//g' | \
            sed -e 's/<\/description>//g' | \
            tokenize "$l" > "$tmp/$tok"
        log "    tokenized $f: $(nlines "$tmp/$tok") lines"
    done
    "${MOSES[@]}" clean-corpus --ratio 1.5 "$tmp/train.tags.$lang.tok" $src $tgt "$tmp/train.tags.$lang.clean" 1 175
    for l in $src $tgt; do
        lowercase < "$tmp/train.tags.$lang.clean.$l" > "$tmp/train.tags.$lang.$l"
    done
fi

# ---------------------------------------------------------------------------- valid/test
log "pre-processing valid/test data..."
for l in $src $tgt; do
    found=0
    for o in "$orig/$lang"/IWSLT14.TED*."$l".xml; do
        [[ -f "$o" ]] || continue
        found=1
        fname="${o##*/}"
        f="$tmp/${fname%.*}"
        log "    $o -> $f"
        grep '<seg id' "$o" | \
            sed -e 's/<seg id="[0-9]*">\s*//g' | \
            sed -e 's/\s*<\/seg>\s*//g' | \
            sed -e "s/\’/\'/g" | \
            tokenize "$l" | lowercase > "$f"
    done
    [[ "$found" == 1 ]] || die "missing input files: $orig/$lang/IWSLT14.TED*.$l.xml"
done

log "creating train, valid, test..."
for l in $src $tgt; do
    if [[ "$TEST_ONLY" == 0 ]]; then
        awk '{if (NR%23 == 0)  print $0; }' "$tmp/train.tags.de-en.$l" > "$tmp/valid.$l"
        awk '{if (NR%23 != 0)  print $0; }' "$tmp/train.tags.de-en.$l" > "$tmp/train.$l"
    fi
    parts=()
    for t in TED.dev2010 TEDX.dev2012 TED.tst2010 TED.tst2011 TED.tst2012; do
        parts+=("$tmp/IWSLT14.$t.de-en.$l")
    done
    need_file "${parts[@]}"
    cat "${parts[@]}" > "$tmp/test.$l"
done
for s in train valid test; do
    [[ -f "$tmp/$s.$src" ]] || continue
    same_lines "$tmp/$s.$src" "$tmp/$s.$tgt"
    log "    $s: $(nlines "$tmp/$s.$src") pairs"
done

# compare_staged NAME OURS STAGED_XZ: report whether we reproduced the staged fairseq file.
compare_staged() {
    if [[ ! -f "$3" ]]; then return 0; fi
    if cmp -s "$2" <(xz -dc "$3"); then
        log "    $1: identical to the staged fairseq output ($3)"
    else
        log "    WARNING $1: differs from the staged fairseq output $3" \
            "($(diff "$2" <(xz -dc "$3") | grep -c '^<' || true) lines)"
    fi
}

if [[ "$TEST_ONLY" == 1 ]]; then
    if [[ -d "$SHARED" ]]; then
        for l in $src $tgt; do compare_staged "tmp/test.$l" "$tmp/test.$l" "$SHARED/test.$l.xz"; done
    fi
    log "done (--test-only) in ${SECONDS}s: $tmp/test.{$src,$tgt}"
    exit 0
fi

# ---------------------------------------------------------------------------- BPE
SUBWORD_NMT="$(tool subword-nmt)"
TRAIN="$tmp/train.en-de"
BPE_CODE="$prep/code"
rm -f "$TRAIN"
for l in $src $tgt; do
    cat "$tmp/train.$l" >> "$TRAIN"
done

log "learn-bpe ($BPE_TOKENS merges) on $TRAIN..."
"$SUBWORD_NMT" learn-bpe -s "$BPE_TOKENS" < "$TRAIN" > "$BPE_CODE" 2> "$tmp/learn-bpe.log" \
    || { cat "$tmp/learn-bpe.log" >&2; die "subword-nmt learn-bpe failed (output above)"; }

for L in $src $tgt; do
    for f in train.$L valid.$L test.$L; do
        log "apply-bpe to $f..."
        "$SUBWORD_NMT" apply-bpe -c "$BPE_CODE" < "$tmp/$f" > "$prep/$f"
        check_roundtrip "$prep/$f" "$tmp/$f"
    done
done

if [[ -d "$SHARED" ]]; then
    log "comparing with the staged copy of fairseq's output in $SHARED"
    for l in $src $tgt; do
        compare_staged "tmp/valid.$l" "$tmp/valid.$l" "$SHARED/valid.$l.xz"
        compare_staged "tmp/test.$l" "$tmp/test.$l" "$SHARED/test.$l.xz"
        compare_staged "valid.$l (BPE)" "$prep/valid.$l" "$SHARED/bpe10k/valid.$l.xz"
        compare_staged "test.$l (BPE)" "$prep/test.$l" "$SHARED/bpe10k/test.$l.xz"
    done
    compare_staged "code" "$BPE_CODE" "$SHARED/bpe10k/code.xz"
fi

# ---------------------------------------------------------------------------- binarize
if [[ "$BINARIZE" == 1 ]]; then
    PREPROCESS="$(tool fairseq-preprocess)"
    DICT_OPTS=()
    [[ "$JOINED_DICT" == 1 ]] && DICT_OPTS=(--joined-dictionary)
    log "fairseq-preprocess ${DICT_OPTS[*]} -> $OUT"
    STAGE="$(mktemp -d "$(dirname "$OUT")/.$(basename "$OUT").tmp.XXXXXX")"
    trap 'rm -rf "$STAGE"' EXIT
    "$PREPROCESS" --source-lang $src --target-lang $tgt \
        --trainpref "$prep/train" --validpref "$prep/valid" --testpref "$prep/test" \
        --destdir "$STAGE/bin" "${DICT_OPTS[@]}" --workers "$WORKERS" > "$STAGE/preprocess.stdout" 2>&1 \
        || { cat "$STAGE/preprocess.stdout" >&2; die "fairseq-preprocess failed (output above)"; }
    sed -i -e "s#$STAGE/bin#$OUT#g" "$STAGE/bin/preprocess.log"
    replace_dir "$STAGE/bin" "$OUT" preprocess.log
    log "    $(grep -m1 -o 'Dictionary: [0-9]* types' "$OUT/preprocess.log") (fairseq's count incl. 4 specials)"
fi
log "done in ${SECONDS}s (expected: train 160239, valid 7283, test 6750 pairs)"
