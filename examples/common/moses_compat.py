#!/usr/bin/env python3
"""Drop-in replacements for the Moses perl scripts fairseq's data recipes use.

fairseq's ``examples/translation/prepare-iwslt14.sh`` (and ``prepare-wmt14en2fr.sh``) clone
mosesdecoder and run ``tokenizer.perl``, ``lowercase.perl`` and ``clean-corpus-n.perl``.
This module reproduces them in Python (sacremoses) so the recipes run without perl/git:

``tokenize``
    ``tokenizer.perl -l LANG [-a]`` (XML escaping on, as the perl default) via sacremoses,
    with two fixes that make it match the perl script fairseq used byte for byte on the
    staged IWSLT14 test set: (1) the *last* word of a line ending in "." is always split
    ("usw." -> "usw ."), as in Moses since 2016 ("split last words independently as they are
    unlikely to be non-breaking prefixes"), which sacremoses 0.1/0.2 lacks; (2) blank /
    whitespace-only lines are passed through unchanged (perl: ``/^\\s*$/ -> print $_``).
``lowercase``
    ``lowercase.perl`` (perl ``lc``: no Greek final-sigma rule, unlike ``str.lower``).
``clean-corpus``
    ``clean-corpus-n.perl [-ratio R] CORPUS L1 L2 OUT MIN MAX``.
``normalize``, ``remove-non-printing``
    ``normalize-punctuation.perl LANG`` (sacremoses ``MosesPunctNormalizer(perl_parity=True)``)
    and ``remove-non-printing-char.perl``, for fairseq's WMT'14 recipe.

Lines are split on "\\n" only (never on "\\r" or other Unicode line breaks), as perl does.

Usage::

    python moses_compat.py tokenize -l de [-a] [-j 4]  < in > out
    python moses_compat.py lowercase                   < in > out
    python moses_compat.py normalize -l fr [-j 4]      < in > out
    python moses_compat.py remove-non-printing [-j 4]  < in > out
    python moses_compat.py clean-corpus --ratio 1.5 CORPUS de en OUT 1 175
"""

import argparse
import gzip
import io
import multiprocessing
import os
import re
import sys

# perl's \s on character strings (Unicode White_Space minus nothing; unlike Python's \s it
# does not include the ASCII separators \x1c-\x1f).
_PERL_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WS_RUN = re.compile("[" + _PERL_WS + "]+")
_ONLY_WS = re.compile("^[" + _PERL_WS + "]*$")


def _open_text(path, mode):
    """utf-8, newline="\\n" only, surrogateescape so odd bytes survive like they do in perl."""
    return open(path, mode, encoding="utf-8", errors="surrogateescape", newline="\n")


def _stdin():
    return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="surrogateescape", newline="\n")


def _stdout():
    return io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", errors="surrogateescape", newline="\n")


# --------------------------------------------------------------------------- line filters
# Each filter maps one input line (with its "\n") to one output line; _run() applies it in
# order, optionally over a process pool (tokenizer.perl -threads N).
_FILTER = None


def _make_tokenizer(lang, aggressive):
    from sacremoses import MosesTokenizer

    class PerlCompatibleMosesTokenizer(MosesTokenizer):
        def handles_nonbreaking_prefixes(self, text):
            # tokenizer.perl: `if ($i == scalar(@words)-1) { $word = $pre." ."; }` comes
            # before the non-breaking-prefix tests; sacremoses skips that branch.
            tokens = text.split()
            if tokens:
                m = re.search(r"^(\S+)\.$", tokens[-1])
                if m:
                    tokens[-1] = m.group(1) + " ."
            return super().handles_nonbreaking_prefixes(" ".join(tokens))

    tok = PerlCompatibleMosesTokenizer(lang=lang)

    def tokenize(line):
        if _ONLY_WS.match(line.rstrip("\n")):
            return line if line.endswith("\n") else line + "\n"  # perl prints such lines as is
        text = line[:-1] if line.endswith("\n") else line
        return tok.tokenize(text, aggressive_dash_splits=aggressive, return_str=True, escape=True) + "\n"

    return tokenize


def _make_normalizer(lang):
    from sacremoses import MosesPunctNormalizer

    norm = MosesPunctNormalizer(lang=lang, perl_parity=True)  # penn=True here == perl default

    def normalize(line):
        return norm.normalize(line[:-1] if line.endswith("\n") else line) + "\n"

    return normalize


def _make_remove_non_printing():
    import regex

    other = regex.compile(r"\p{C}")

    def remove_non_printing(line):  # remove-non-printing-char.perl: chomp; s/\p{C}/ /g
        return other.sub(" ", line[:-1] if line.endswith("\n") else line) + "\n"

    return remove_non_printing


def _init_worker(kind, lang, aggressive):
    global _FILTER
    if kind == "tokenize":
        _FILTER = _make_tokenizer(lang, aggressive)
    elif kind == "normalize":
        _FILTER = _make_normalizer(lang)
    else:
        _FILTER = _make_remove_non_printing()


def _apply(line):
    return _FILTER(line)


def _run(kind, jobs, lang="en", aggressive=False):
    fin, fout = _stdin(), _stdout()
    if jobs <= 1:
        _init_worker(kind, lang, aggressive)
        for line in fin:
            fout.write(_FILTER(line))
    else:
        with multiprocessing.Pool(jobs, _init_worker, (kind, lang, aggressive)) as pool:
            for out in pool.imap(_apply, fin, chunksize=500):
                fout.write(out)
    fout.flush()


def cmd_tokenize(args):
    _run("tokenize", args.jobs, args.lang, args.aggressive)


def cmd_normalize(args):
    _run("normalize", args.jobs, args.lang)


def cmd_remove_non_printing(args):
    _run("remove-non-printing", args.jobs)


# --------------------------------------------------------------------------- lowercase
def perl_lc(s):
    low = s.lower()
    if "\u03a3" in s:  # Python applies the final-sigma rule (Σ -> ς); perl's lc does not
        low = "".join(c.lower() for c in s)
    return low


def cmd_lowercase(args):
    fin, fout = _stdin(), _stdout()
    for line in fin:
        fout.write(perl_lc(line))
    fout.flush()


# --------------------------------------------------------------------------- clean-corpus
def _open_corpus(path):
    if os.path.exists(path):
        return _open_text(path, "r")
    if os.path.exists(path + ".gz"):
        return io.TextIOWrapper(gzip.open(path + ".gz", "rb"), encoding="utf-8",
                                errors="surrogateescape", newline="\n")
    sys.exit(f"Error: {path} does not exist")


def _normalise(s, factored):
    if not factored:
        s = s.replace("|", "")
    s = _WS_RUN.sub(" ", s)
    if s.startswith(" "):
        s = s[1:]
    if s.endswith(" "):
        s = s[:-1]
    return s


def cmd_clean_corpus(args):
    """clean-corpus-n.perl: drop pairs with an empty side, a side outside [min, max] tokens,
    a length ratio above --ratio, or a token longer than --max-word-length characters."""
    c, l1, l2, out = args.corpus, args.l1, args.l2, args.out
    print(f"clean-corpus: processing {c}.{l1} & .{l2} to {out}, cutoff {args.min}-{args.max}, "
          f"ratio {args.ratio}", file=sys.stderr)
    long_word = re.compile("[^" + _PERL_WS + r"|]{%d}" % (args.max_word_length + 1))
    blank_factor = re.compile(r"[ |]\|")
    n_in = n_out = 0
    factored = False
    with _open_corpus(f"{c}.{l1}") as F, _open_corpus(f"{c}.{l2}") as E, \
            _open_text(f"{out}.{l1}", "w") as FO, _open_text(f"{out}.{l2}", "w") as EO:
        for f in F:
            n_in += 1
            e = E.readline()
            if e == "":
                sys.exit(f"{c}.{l2} is too short!")
            e, f = e[:-1] if e.endswith("\n") else e, f[:-1] if f.endswith("\n") else f
            if n_in == 1:
                factored = "|" in e or "|" in f
            if args.lowercase:
                e, f = perl_lc(e), perl_lc(f)
            e, f = _normalise(e, factored), _normalise(f, factored)
            if f == "" or e == "":
                continue
            ec, fc = len(e.split(" ")), len(f.split(" "))
            if ec > args.max or fc > args.max or ec < args.min or fc < args.min:
                continue
            if not args.ignore_ratio and (ec / fc > args.ratio or fc / ec > args.ratio):
                continue
            if long_word.search(e) or long_word.search(f):
                continue
            if blank_factor.search(f):
                sys.exit(f"There is a blank factor in {c}.{l1} on line {n_in}: {f}")
            if blank_factor.search(e):
                sys.exit(f"There is a blank factor in {c}.{l2} on line {n_in}: {e}")
            n_out += 1
            FO.write(f + "\n")
            EO.write(e + "\n")
        if E.readline() != "":
            sys.exit(f"{c}.{l2} is too long!")
    print(f"Input sentences: {n_in}  Output sentences:  {n_out}", file=sys.stderr)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenize", help="tokenizer.perl -l LANG [-a] (escaping on)")
    t.add_argument("-l", "--lang", default="en")
    t.add_argument("-a", "--aggressive", action="store_true", help="aggressive hyphen splitting (@-@)")
    t.add_argument("-j", "--jobs", type=int, default=1)
    t.set_defaults(func=cmd_tokenize)
    n = sub.add_parser("normalize", help="normalize-punctuation.perl LANG (sacremoses, perl_parity)")
    n.add_argument("-l", "--lang", default="en")
    n.add_argument("-j", "--jobs", type=int, default=1)
    n.set_defaults(func=cmd_normalize)
    r = sub.add_parser("remove-non-printing", help="remove-non-printing-char.perl")
    r.add_argument("-j", "--jobs", type=int, default=1)
    r.set_defaults(func=cmd_remove_non_printing)
    lc = sub.add_parser("lowercase", help="lowercase.perl")
    lc.set_defaults(func=cmd_lowercase)
    cl = sub.add_parser("clean-corpus", help="clean-corpus-n.perl")
    cl.add_argument("--ratio", type=float, default=9.0)
    cl.add_argument("--lowercase", "--lc", action="store_true")
    cl.add_argument("--ignore-ratio", action="store_true")
    cl.add_argument("--max-word-length", type=int, default=1000)
    for name in ("corpus", "l1", "l2", "out"):
        cl.add_argument(name)
    cl.add_argument("min", type=int)
    cl.add_argument("max", type=int)
    cl.set_defaults(func=cmd_clean_corpus)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
