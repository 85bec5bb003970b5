"""Where the exits go: by position in the hypothesis and by confidence (paper §4, Figures 6–9).

    python -m fairseq_dat.cli.exit_analysis GENERATE_LOG --out-dir DIR [--position-bins 10]
        [--confidence-bins 10]

Input: a ``fairseq-generate --task adaptive_translation --print-exits`` log, without ``--quiet``:
``E-<id>`` lines give the exit (1-based block) of every output token, EOS included, and fairseq's
``P-<id>`` lines the per-token scores in the same order. Only the first hypothesis of each
sentence is used (as for BLEU).

- **Exits by relative position** (Figures 6–7: deeper exits in the first 10% of a hypothesis,
  shallower in the last 10%): token t = 1..|y| falls in bin ⌊B·(t−1)/|y|⌋ of ``--position-bins`` B.
- **Exits by confidence** (Figures 8–9: exits 1–2 dominate at confidence 0.8–1, exits ≥ 4 at
  0–0.5). The paper's confidence is the exit classifier's; the log carries no such number, so the
  proxy is the probability of the emitted token, 2^P (fairseq-generate prints P in base 2, i.e.
  exp(P·ln 2)), from the classifier of the block the token exited at. Under greedy decoding it is
  that classifier's top probability; under beam search it is the chosen token's, usually the top one.

Writes ``DIR/exits_by_position.png``, ``DIR/exits_by_confidence.png`` (stacked shares of each exit
per bin) and ``DIR/exit_analysis.json`` (the counts), and prints the tables.
"""
import argparse
import json
import os
from typing import List, Optional, Sequence, Tuple

from . import quiet_root_logger, run_main
from ..errors import ConfigError
from .make_tables import GenerateLog, parse_generate_log

Counts = List[List[int]]  # bins x exits


def sentence_pairs(log: GenerateLog) -> List[Tuple[List[int], Optional[List[float]]]]:
    """(exits, token probabilities or None) per sentence, by id. One-line errors for a log without
    E- lines or with E-/P- lines of different lengths."""
    if not log.exits:
        raise ConfigError(f"{log.path}: no E- lines; make the log with fairseq-generate --task "
                          "adaptive_translation --print-exits")
    pairs = []
    for sid in sorted(log.exits):
        exits, scores = log.exits[sid], log.scores.get(sid)
        if scores is not None and len(scores) != len(exits):
            raise ConfigError(f"{log.path}: E-{sid} has {len(exits)} exits but P-{sid} has {len(scores)} scores")
        pairs.append((exits, [2.0 ** s for s in scores] if scores is not None else None))
    return pairs


def num_exits_of(log: GenerateLog, pairs) -> int:
    return log.num_exits or max(max(exits) for exits, _ in pairs if exits)


def by_position(pairs, bins: int, num_exits: int) -> Counts:
    """counts[b][n−1]: tokens in relative-position bin b that exited at block n."""
    counts = [[0] * num_exits for _ in range(bins)]
    for exits, _ in pairs:
        length = len(exits)
        for t, e in enumerate(exits):
            counts[min(bins * t // length, bins - 1)][e - 1] += 1
    return counts


def by_confidence(pairs, bins: int, num_exits: int) -> Optional[Counts]:
    """counts[b][n−1]: tokens with probability in [b/B, (b+1)/B) (1.0 in the last bin) exiting at n;
    None when the log has no P- lines."""
    if any(probs is None for _, probs in pairs):
        return None
    counts = [[0] * num_exits for _ in range(bins)]
    for exits, probs in pairs:
        for e, p in zip(exits, probs):
            counts[min(int(p * bins), bins - 1)][e - 1] += 1
    return counts


def position_labels(bins: int) -> List[str]:
    return [f"{100 * b // bins}-{100 * (b + 1) // bins}%" for b in range(bins)]


def confidence_labels(bins: int) -> List[str]:
    return [f"{b / bins:.2f}-{(b + 1) / bins:.2f}" for b in range(bins)]


def format_counts(title: str, labels: Sequence[str], counts: Counts) -> str:
    """Per bin: tokens, mean exit, share (%) of each exit."""
    n = len(counts[0])
    head = f"{'bin':<12} {'tokens':>7} {'mean exit':>9} " + " ".join(f"{'exit' + str(e + 1):>6}" for e in range(n))
    lines = [title, head, "-" * len(head)]
    for label, row in zip(labels, counts):
        total = sum(row)
        mean = sum((e + 1) * c for e, c in enumerate(row)) / total if total else float("nan")
        shares = " ".join(f"{100 * c / total if total else 0:>6.1f}" for c in row)
        lines.append(f"{label:<12} {total:>7} {mean:>9.2f} {shares}")
    return "\n".join(lines)


def plot_stacked(path: str, labels: Sequence[str], counts: Counts, xlabel: str, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    bottoms = [0.0] * len(counts)
    for e in range(len(counts[0])):
        shares = [row[e] / sum(row) if sum(row) else 0.0 for row in counts]
        ax.bar(range(len(counts)), shares, bottom=bottoms, label=f"exit {e + 1}")
        bottoms = [b + s for b, s in zip(bottoms, shares)]
    ax.set_xticks(range(len(counts)))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("share of tokens")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fairseq_dat.cli.exit_analysis",
                                description="Exit histograms by relative position and by confidence (paper "
                                            "Figures 6-9) from a fairseq-generate --print-exits log.")
    p.add_argument("log", metavar="GENERATE_LOG", help="fairseq-generate output with E- and P- lines")
    p.add_argument("--out-dir", required=True, help="directory for the PNGs and exit_analysis.json")
    p.add_argument("--position-bins", type=int, default=10, help="bins of relative position t/|y| (10: 10%% each)")
    p.add_argument("--confidence-bins", type=int, default=10, help="bins of the token probability 2^P over [0, 1]")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    quiet_root_logger()
    for flag, value in (("--position-bins", args.position_bins), ("--confidence-bins", args.confidence_bins)):
        if value < 1:
            raise ConfigError(f"{flag} must be a positive integer, got {value}")
    if not os.path.isfile(args.log):
        raise ConfigError(f"GENERATE_LOG: {args.log} not found")
    log = parse_generate_log(args.log)
    pairs = sentence_pairs(log)
    n = num_exits_of(log, pairs)
    os.makedirs(args.out_dir, exist_ok=True)
    result = {"log": args.log, "num_exits": n, "sentences": len(pairs),
              "position_bins": position_labels(args.position_bins),
              "by_position": by_position(pairs, args.position_bins, n)}
    print(format_counts(f"Exits by relative position t/|y| ({len(pairs)} hypotheses)", result["position_bins"],
                        result["by_position"]))
    plot_stacked(os.path.join(args.out_dir, "exits_by_position.png"), result["position_bins"],
                 result["by_position"], "relative position in the hypothesis", "Exits by position (Fig. 6-7)")
    confidence = by_confidence(pairs, args.confidence_bins, n)
    if confidence is None:
        print("no P- lines for some hypotheses (log made with --quiet?): exits by confidence skipped")
    else:
        result["confidence_bins"] = confidence_labels(args.confidence_bins)
        result["by_confidence"] = confidence
        print(format_counts("Exits by confidence 2^P (probability of the emitted token)", result["confidence_bins"],
                            confidence))
        plot_stacked(os.path.join(args.out_dir, "exits_by_confidence.png"), result["confidence_bins"], confidence,
                     "confidence (probability of the emitted token)", "Exits by confidence (Fig. 8-9)")
    with open(os.path.join(args.out_dir, "exit_analysis.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    run_main(main)
