# Helpers shared by the examples/*/prepare*.sh scripts. Source it, don't run it.
# Expects the caller to have `set -euo pipefail`.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
COMMON="$REPO/examples/common"

log() { echo "[$(basename "$0") $(date +%H:%M:%S)] $*"; }
die() { echo "$(basename "$0"): error: $*" >&2; exit 1; }

# need_file FILE...: stop with a one-line error naming the first missing input.
need_file() {
    local f
    for f in "$@"; do
        [[ -f "$f" ]] || die "missing input file: $f"
    done
}

# tool NAME: path of a console script, from $REPO/.venv/bin first, then $PATH.
tool() {
    if [[ -x "$REPO/.venv/bin/$1" ]]; then
        echo "$REPO/.venv/bin/$1"
    elif command -v "$1" >/dev/null 2>&1; then
        command -v "$1"
    else
        die "'$1' not found in $REPO/.venv/bin or on PATH (install fairseq, subword-nmt and sacremoses, see README)"
    fi
}

# python_tool: the venv's python, else python3 on PATH.
python_tool() {
    if [[ -x "$REPO/.venv/bin/python" ]]; then echo "$REPO/.venv/bin/python"
    else tool python3; fi
}

# abspath PATH: absolute, normalized path (need not exist).
abspath() {
    if realpath -m / >/dev/null 2>&1; then realpath -m -- "$1"; return; fi
    case "$1" in
        /*) echo "$1" ;;
        *) echo "$PWD/$1" ;;
    esac
}

# nlines FILE: number of lines.
nlines() { wc -l < "$1" | tr -d ' '; }

# same_lines A B: stop unless the two files have the same number of lines.
same_lines() {
    local a b
    a=$(nlines "$1"); b=$(nlines "$2")
    [[ "$a" == "$b" ]] || die "line counts differ: $1 ($a) vs $2 ($b)"
}

# unbpe: remove subword-nmt continuation markers (the inverse of apply-bpe).
unbpe() { sed -E 's/(@@ )|(@@ ?$)//g'; }

# check_roundtrip BPE_FILE TOK_FILE: the BPE text minus '@@ ' must be the tokenized text.
check_roundtrip() {
    cmp -s <(unbpe < "$1") "$2" || die "BPE round-trip failed: removing '@@ ' from $1 does not give $2"
}

# out_dir_done OUT: true (0) when OUT/dict.en.txt exists and FORCE!=1 (caller should stop);
# stops if OUT is a non-empty directory that fairseq-preprocess did not write.
out_dir_done() {
    local out="$1"
    if [[ -f "$out/dict.en.txt" && "${FORCE:-0}" != 1 ]]; then
        log "$out/dict.en.txt exists, nothing to do (FORCE=1 to rebuild)"
        return 0
    fi
    if [[ -d "$out" && -n "$(ls -A "$out")" && ! -f "$out/preprocess.log" && ! -f "$out/dict.en.txt" ]]; then
        die "$out exists, is not empty and is not a fairseq-preprocess output; remove it or pick another OUT_DIR"
    fi
    return 1
}

# replace_dir NEW DEST MARKER: move NEW into place as DEST. An old DEST is removed only if it
# is empty or holds MARKER (a file this pipeline writes), so nothing unrelated is deleted.
replace_dir() {
    if [[ -e "$2" ]]; then
        if [[ -n "$(ls -A "$2")" && ! -e "$2/$3" ]]; then
            die "$2 exists without $3 (not made by this script); remove it or pick another OUT_DIR"
        fi
        rm -rf "$2"
    fi
    mv "$1" "$2"
}
