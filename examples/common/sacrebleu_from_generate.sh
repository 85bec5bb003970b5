#!/usr/bin/env bash
# Detokenized, case-insensitive sacreBLEU of a fairseq-generate log against a raw reference.
#   examples/common/sacrebleu_from_generate.sh GENERATE_LOG RAW_REFERENCE(.gz|.xz|plain) [LANG]
# The hypotheses (H- lines, BPE removed by --remove-bpe) are put back in input order, Moses-
# detokenized with sacremoses and scored with sacrebleu -lc (Multi30k's and IWSLT's tokenized
# data are lowercased, the raw references are cased).
set -euo pipefail
LOG=${1:?usage: sacrebleu_from_generate.sh GENERATE_LOG RAW_REFERENCE [LANG]}
REF=${2:?usage: sacrebleu_from_generate.sh GENERATE_LOG RAW_REFERENCE [LANG]}
LANG_=${3:-en}
[ -f "$LOG" ] || { echo "error: generate log $LOG not found" >&2; exit 1; }
[ -f "$REF" ] || { echo "error: reference $REF not found" >&2; exit 1; }
case "$REF" in *.gz) CAT="gzip -dc" ;; *.xz) CAT="xz -dc" ;; *) CAT=cat ;; esac
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
grep -P '^H-[0-9]+\t' "$LOG" | sed 's/^H-//' | sort -n -k1,1 -s | cut -f3 > "$TMP/hyp.tok"
$CAT "$REF" > "$TMP/ref"
if [ "$(wc -l < "$TMP/hyp.tok")" -ne "$(wc -l < "$TMP/ref")" ]; then
  echo "error: $LOG has $(wc -l < "$TMP/hyp.tok") hypotheses, $REF has $(wc -l < "$TMP/ref") lines" >&2; exit 1
fi
# sacremoses draws a progress bar on stderr: keep it out of the output, show it only on failure
sacremoses -l "$LANG_" -j 2 detokenize < "$TMP/hyp.tok" > "$TMP/hyp.detok" 2> "$TMP/moses.err" \
  || { cat "$TMP/moses.err" >&2; exit 1; }
sacrebleu "$TMP/ref" -i "$TMP/hyp.detok" -lc -m bleu -b -w 2 | sed 's/^/sacreBLEU(detok,lc) = /'
sacrebleu "$TMP/ref" -i "$TMP/hyp.detok" -lc -m bleu 2>/dev/null | grep -o '"verbose_score".*\|nrefs.*' | head -1 | sed 's/^/signature: /' || true
