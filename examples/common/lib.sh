# Helpers shared by the examples/*/prepare*.sh scripts. Source it, don't run it.
# Expects the caller to have `set -euo pipefail`.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
COMMON="$REPO/examples/common"

log() { echo "[$(basename "$0") $(date +%H:%M:%S)] $*"; }
die() { echo "$(basename "$0"): error: $*" >&2; exit 1; }

# usage: the calling script's header comment (line 2 up to `set -euo pipefail`), without the '#'.
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

# parse_args MAX_POSITIONAL SPEC... -- "$@": a prepare script's command line.
#   SPEC "--flag=VAR"        an option with a value: `--flag V`, `--flag=V` or `VAR=V` sets VAR
#   SPEC "--flag=VAR:VALUE"  a switch: `--flag` or `VAR=VALUE` sets VAR to VALUE
# -h/--help prints the header comment (usage) and exits; an unknown option, an option without its
# value or more than MAX_POSITIONAL positional arguments stop with a one-line error. The positional
# arguments are left in the array POS.
parse_args() {
    local max_positional=$1 spec flag var value matched
    local -a specs=()
    shift
    while [[ $# -gt 0 && "$1" != -- ]]; do specs+=("$1"); shift; done
    [[ $# -gt 0 ]] && shift  # the --
    POS=()
    while [[ $# -gt 0 ]]; do
        matched=0
        for spec in "${specs[@]}"; do
            flag="${spec%%=*}"; var="${spec#*=}"
            if [[ "$var" == *:* ]]; then  # a switch
                value="${var#*:}"; var="${var%%:*}"
                if [[ "$1" == "$flag" || "$1" == "$var=$value" ]]; then printf -v "$var" '%s' "$value"; matched=1; break; fi
            elif [[ "$1" == "$flag" ]]; then
                [[ $# -ge 2 ]] || die "$flag needs a value (see --help)"
                printf -v "$var" '%s' "$2"; shift; matched=1; break
            elif [[ "$1" == "$flag="* || "$1" == "$var="* ]]; then
                printf -v "$var" '%s' "${1#*=}"; matched=1; break
            fi
        done
        if [[ $matched == 0 ]]; then
            case "$1" in
                -h|--help) usage; exit 0 ;;
                -*) die "unknown option $1 (see --help)" ;;
                *) POS+=("$1") ;;
            esac
        fi
        shift
    done
    [[ ${#POS[@]} -le $max_positional ]] || die "too many arguments: ${POS[*]} (see --help)"
}

# data_dirs SUBDIR DEFAULT_OUT: the positional arguments [SHARED_DATA_DIR] [OUT_DIR] of a prepare script
# that reads staged corpora: SHARED (default <repo>/../shared/data), SRC=SHARED/SUBDIR, OUT (absolute,
# default <repo>/data-bin/DEFAULT_OUT) and BPE_DIR, OUT's sibling OUT.bpe for the text.
data_dirs() {
    SHARED="$(abspath "${POS[0]:-$REPO/../shared/data}")"
    SRC="$SHARED/$1"
    OUT="$(abspath "${POS[1]:-$REPO/data-bin/$2}")"
    OUT="${OUT%/}"
    BPE_DIR="$(dirname "$OUT")/$(basename "$OUT").bpe"
}

# need_count NAME MIN: stop unless the variable NAME holds an integer >= MIN (MIN is 0 or 1).
need_count() {
    local pattern='^[0-9]+$' what="a non-negative integer"
    if [[ "$2" == 1 ]]; then pattern='^[1-9][0-9]*$'; what="a positive integer"; fi
    [[ "${!1}" =~ $pattern ]] || die "$1 must be $what, got '${!1}'"
}

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
