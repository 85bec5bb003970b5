#!/usr/bin/env python
"""Would a confidence cascade beat the fixed exits? Re-translate the least confident sentences deeper.

    python benchmarks/cascade_offline.py LOW.txt HIGH.txt --fixed 1=EXIT1.txt,2=EXIT2.txt,3=EXIT3.txt \\
        [--low-exit 1 --high-exit 2] [--fractions 0.1,0.2,0.3,0.4,0.5,0.6]

Each file is the output of ``fairseq-generate … --fixed-exit k --remove-bpe`` on the same subset (its
``H-`` lines: hypothesis and score, the mean log-probability per token; ``T-`` lines: references). A
cascade decodes every sentence at exit ``--low-exit`` and decodes again at ``--high-exit`` the fraction f
whose exit-low hypothesis scored lowest (the engine's own confidence, known only after decoding: what a
sequence-level router that reads the source cannot see). Its cost in decoder blocks per output token is
``low`` for every sentence plus ``high`` for the re-translated ones (nothing shared between the two
passes). Printed per fraction: the cost, corpus BLEU (sacreBLEU on the tokens as written, ``tokenize=none``),
the BLEU of re-translating a random fraction f (same cost in expectation), and the line joining the
fixed exits of ``--fixed`` at that cost. A cascade is worth building only where it is above that line.
"""
import argparse
import random
from typing import Dict, List, Sequence, Tuple

import sacrebleu

from fairseq_dat.fixed_exit_curve import fixed_exit_bleu_at

Run = Tuple[Dict[int, str], Dict[int, float], Dict[int, str]]  # hypotheses, scores, references by sentence id


def read_generate(path: str) -> Run:
    """``H-i<TAB>score<TAB>hypothesis`` and ``T-i<TAB>reference`` lines of a fairseq-generate output."""
    hyps, scores, refs = {}, {}, {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            tag, _, rest = line.rstrip("\n").partition("\t")
            if tag.startswith("H-"):
                score, _, hyp = rest.partition("\t")
                hyps[int(tag[2:])], scores[int(tag[2:])] = hyp, float(score)
            elif tag.startswith("T-"):
                refs[int(tag[2:])] = rest
    if not hyps:
        raise SystemExit(f"{path}: no H- lines (a fairseq-generate output?)")
    return hyps, scores, refs


def corpus_bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
    return sacrebleu.corpus_bleu(list(hyps), [list(refs)], tokenize="none", force=True).score


def fixed_exit_line(points: Dict[int, float], cost: float) -> float:
    """BLEU of mixing the two fixed exits around ``cost`` (the package's fixed-exit curve, §4.2), clamped to
    the exits given."""
    exits = sorted(points)
    return fixed_exit_bleu_at(list(points.items()), min(max(cost, exits[0]), exits[-1]))


def cascade(low: Run, high: Run, low_exit: int, high_exit: int, redo: set, ids: List[int]) -> Tuple[List[str], float]:
    """Hypotheses (in ``ids`` order) and cost in blocks per output token when ``redo`` is re-translated."""
    hyps = [high[0][i] if i in redo else low[0][i] for i in ids]
    tokens = sum(len(h.split()) + 1 for h in hyps)  # output tokens with EOS, as AE counts them
    blocks = sum(low_exit * (len(low[0][i].split()) + 1) for i in ids)
    blocks += sum(high_exit * (len(high[0][i].split()) + 1) for i in redo)
    return hyps, blocks / tokens


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("low", help="fairseq-generate output at --fixed-exit LOW")
    p.add_argument("high", help="fairseq-generate output at --fixed-exit HIGH")
    p.add_argument("--low-exit", type=int, default=1)
    p.add_argument("--high-exit", type=int, default=2)
    p.add_argument("--fixed", required=True, help="k=FILE,... fairseq-generate outputs at fixed exits (the line)")
    p.add_argument("--fractions", default="0.1,0.2,0.3,0.4,0.5,0.6")
    p.add_argument("--seed", type=int, default=1, help="the random re-translation baseline")
    args = p.parse_args(argv)
    low, high = read_generate(args.low), read_generate(args.high)
    ids = sorted(low[2])
    if sorted(high[2]) != ids:
        raise SystemExit(f"{args.low} and {args.high} cover different sentences")
    refs = [low[2][i] for i in ids]
    points = {}
    for item in args.fixed.split(","):
        k, _, path = item.partition("=")
        run = read_generate(path)
        points[int(k)] = corpus_bleu([run[0][i] for i in ids], refs)
    print("fixed exits: " + ", ".join(f"{k}: {b:.2f}" for k, b in sorted(points.items())))
    by_confidence = sorted(ids, key=lambda i: low[1][i])
    shuffled = random.Random(args.seed).sample(ids, len(ids))
    for f in (float(x) for x in args.fractions.split(",")):
        count = int(f * len(ids))
        hyps, cost = cascade(low, high, args.low_exit, args.high_exit, set(by_confidence[:count]), ids)
        random_hyps, random_cost = cascade(low, high, args.low_exit, args.high_exit, set(shuffled[:count]), ids)
        bleu = corpus_bleu(hyps, refs)
        line = fixed_exit_line(points, cost)
        print(f"CASCADE {args.low_exit}->{args.high_exit} fraction={f:.2f} cost={cost:.2f} bleu={bleu:.2f} "
              f"random_bleu={corpus_bleu(random_hyps, refs):.2f} random_cost={random_cost:.2f} "
              f"fixed_line={line:.2f} gain={bleu - line:+.2f}")


if __name__ == "__main__":
    main()
