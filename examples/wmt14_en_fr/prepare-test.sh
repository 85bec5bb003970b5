#!/usr/bin/env bash
# WMT'14 English-French test set (newstest2014, "full" version, 3,003 sentences) from the
# staged SGML, tokenized and BPE'd exactly as fairseq's prepare-wmt14en2fr.sh treats its test
# set (seg extraction with grep/sed, ’ -> ', Moses tokenizer -a; no normalization, no
# lowercasing, no length filter), with YOUR BPE codes. The training data (~36M pairs) is not
# staged: build it and its codes with prepare-full.sh on a machine with internet.
#
# Usage: examples/wmt14_en_fr/prepare-test.sh BPE_CODES [SHARED_DATA_DIR] [OUT_DIR] [--dict DICT_DIR]
#   BPE_CODES        subword-nmt codes, e.g. <prep>/code written by prepare-full.sh
#   SHARED_DATA_DIR  staged corpora (default: <repo>/../shared/data); reads wmt14-en-fr/sgm/
#   OUT_DIR          default <repo>/data-bin/wmt14_en_fr_test; gets tok/test.{en,fr}
#                    (tokenized), test.{en,fr} (BPE) and MANIFEST.txt
#   --dict DICT_DIR  a fairseq data dir with dict.en.txt and dict.fr.txt (the training data's):
#                    also binarize the test set into OUT_DIR/bin (not binarized without it)
# Environment: FORCE=1 (rebuild an existing OUT_DIR), JOBS=N (tokenizer processes, default 2).
# Score detokenized output with sacrebleu against the raw reference named in MANIFEST.txt
# (SHARED_DATA_DIR/wmt14-en-fr/test.fr.xz == sacrebleu -t wmt14/full -l en-fr).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../common/lib.sh
source "$HERE/../common/lib.sh"

FORCE="${FORCE:-0}"
JOBS="${JOBS:-2}"
DICT_DIR=""
parse_args 3 --dict=DICT_DIR --force=FORCE:1 -- "$@"
[[ ${#POS[@]} -ge 1 ]] || die "BPE_CODES is required (see --help)"

CODES="$(abspath "${POS[0]}")"
SHARED="$(abspath "${POS[1]:-$REPO/../shared/data}")"
OUT="$(abspath "${POS[2]:-$REPO/data-bin/wmt14_en_fr_test}")"
SRC="$SHARED/wmt14-en-fr"
src=en
tgt=fr

need_file "$CODES" "$SRC/sgm/newstest2014-fren-src.en.sgm.xz" "$SRC/sgm/newstest2014-fren-ref.fr.sgm.xz"
if [[ -n "$DICT_DIR" ]]; then
    need_file "$DICT_DIR/dict.$src.txt" "$DICT_DIR/dict.$tgt.txt"
fi
if [[ -f "$OUT/MANIFEST.txt" && "$FORCE" != 1 ]]; then
    log "$OUT/MANIFEST.txt exists, nothing to do (FORCE=1 to rebuild)"; exit 0
fi
PY="$(python_tool)"
SUBWORD_NMT="$(tool subword-nmt)"

log "newstest2014 en-fr: $SRC/sgm -> $OUT (codes: $CODES)"
mkdir -p "$(dirname "$OUT")"
STAGE="$(mktemp -d "$(dirname "$OUT")/.$(basename "$OUT").tmp.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/tok"
for l in $src $tgt; do
    if [[ "$l" == "$src" ]]; then t=src; else t=ref; fi
    xz -dc "$SRC/sgm/newstest2014-fren-$t.$l.sgm.xz" | grep '<seg id' | \
        sed -e 's/<seg id="[0-9]*">\s*//g' | \
        sed -e 's/\s*<\/seg>\s*//g' | \
        sed -e "s/\’/\'/g" | \
        "$PY" "$COMMON/moses_compat.py" tokenize -a -l "$l" -j "$JOBS" > "$STAGE/tok/test.$l"
    "$SUBWORD_NMT" apply-bpe -c "$CODES" < "$STAGE/tok/test.$l" > "$STAGE/test.$l"
    check_roundtrip "$STAGE/test.$l" "$STAGE/tok/test.$l"
done
same_lines "$STAGE/test.$src" "$STAGE/test.$tgt"
log "    test: $(nlines "$STAGE/test.$src") pairs, $(wc -w < "$STAGE/test.$src" | tr -d ' ') en / $(wc -w < "$STAGE/test.$tgt" | tr -d ' ') fr BPE tokens"

if [[ -n "$DICT_DIR" ]]; then
    log "binarizing with $DICT_DIR/dict.{$src,$tgt}.txt"
    "$(tool fairseq-preprocess)" --source-lang $src --target-lang $tgt --testpref "$STAGE/test" \
        --destdir "$STAGE/bin" --srcdict "$DICT_DIR/dict.$src.txt" --tgtdict "$DICT_DIR/dict.$tgt.txt" \
        --workers 2 > "$STAGE/preprocess.stdout" 2>&1 \
        || { cat "$STAGE/preprocess.stdout" >&2; die "fairseq-preprocess failed (output above)"; }
    sed -i -e "s#$STAGE/#$OUT/#g" "$STAGE/bin/preprocess.log"
fi
{
    echo "newstest2014 en-fr (full, 3,003), prepared by examples/wmt14_en_fr/prepare-test.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "source: $SRC/sgm/newstest2014-fren-{src.en,ref.fr}.sgm.xz"
    echo "tokenization: fairseq prepare-wmt14en2fr.sh test steps, Moses tokenizer -a via sacremoses"
    echo "BPE codes: $CODES"
    echo "binary: $([[ -n "$DICT_DIR" ]] && echo "$OUT/bin (dictionaries from $DICT_DIR)" || echo "none (no --dict given)")"
    echo "cased raw references for sacrebleu: $SRC/test.{en,fr}.xz"
} > "$STAGE/MANIFEST.txt"
rm -f "$STAGE/preprocess.stdout"
replace_dir "$STAGE" "$OUT" MANIFEST.txt
trap - EXIT
log "done in ${SECONDS}s"
