"""How much of the oracle exit can a depth estimator predict from a trained trunk's states? (§3)

    python -m fairseq_dat.cli.estimator_probe DATA --path STAGE1_CKPT \\
        [--oracles C:0.1:0,C:0.1:3,LL:0.1:0] [--estimators token-geometric,token-multinomial,sequence,confidence] \\
        [--train-sentences 8000] [--steps 3000]

A frozen-trunk stage 2 in minutes instead of hours, for choosing the oracle (score, λ, σ) before
training one: the teacher-forced states of ``--train-subset`` (up to ``--train-sentences`` sentences)
and of ``--valid-subset`` are computed once (inference mode: no dropout), with every oracle of
``--oracles`` (``score:λ:σ``, score C (correctness) or LL (likelihood), σ only at token level), and
each estimator of ``--estimators`` is fitted by Adam on the train states against each oracle, with
the criterion's loss (``estimator_loss``). Reported on valid, next to what an estimator that ignores its
input reaches:

- ``acc`` (argmax q = oracle, %) against ``majority`` (the share of the oracle's most frequent exit),
- ``loss`` (bits per token / sentence) against ``entropy`` (bits: the cross-entropy of always predicting
  the oracle's exit distribution),

the same quantities ``fairseq-train`` logs as exit_acc / exit_majority / exit_loss / oracle_entropy.

Estimators are the registry's (``token-geometric``, ``token-geometric+separate``, ``token-multinomial``,
``token-poisson-binomial``, ``sequence``, ``sequence-poisson-binomial``), fitted on the states they read
(h^1..h^{N-1}, h^1, or the encoder output's masked mean), plus one reference that is not the paper's:
``confidence``, a multinomial logistic regression on exit 1's own confidence (its top log-probability,
top-2 margin and entropy: what ``--exit-strategy confidence`` thresholds). A probe that stays at the
majority class with every estimator says the oracle is not predictable from those inputs at this scale,
whatever stage 2's optimizer does. Differences from stage 2: the trunk is frozen, states are computed
without dropout, and the fit sees ``--train-sentences`` sentences for ``--steps`` Adam steps.

One line per (oracle, estimator) starts with ``PROBE`` (machine-readable ``key=value`` fields).
"""
import argparse
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import quiet_root_logger, run_main
from ..errors import ConfigError
from ..modules.depth_estimators import DEPTH_ESTIMATORS, build_depth_estimator, estimator_loss
from ..oracles import ORACLE_SCORES, sequence_oracle, token_oracle

SCORES = {"C": "correctness", "LL": "likelihood"}
REFERENCE = "confidence"
CONFIDENCE_FEATURES = 3


@dataclass(frozen=True)
class OracleSpec:
    score: str  # "C" or "LL"
    lam: float
    sigma: float

    def __str__(self):
        return f"{self.score} lambda={self.lam:g} sigma={self.sigma:g}"


def parse_oracles(spec: str) -> List[OracleSpec]:
    """``C:0.1:0,LL:0.5:3`` → oracle specs; one-line errors naming ``--oracles``."""
    specs = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        parts = item.split(":")
        if len(parts) not in (2, 3) or parts[0] not in SCORES:
            raise ConfigError(f"--oracles: {item!r} is not score:lambda[:sigma] with score C or LL")
        try:
            lam, sigma = float(parts[1]), float(parts[2]) if len(parts) == 3 else 0.0
        except ValueError:
            raise ConfigError(f"--oracles: {item!r}: lambda and sigma must be numbers") from None
        if sigma < 0 or sigma != sigma or lam != lam:
            raise ConfigError(f"--oracles: {item!r}: sigma must be >= 0")
        specs.append(OracleSpec(parts[0], lam, sigma))
    if not specs:
        raise ConfigError("--oracles: give at least one score:lambda[:sigma]")
    return specs


def parse_estimators(spec: str) -> List[Tuple[str, bool]]:
    """``token-geometric+separate,sequence`` → [(registry name or 'confidence', separate_halting)]."""
    chosen = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, option = item.partition("+")
        if (name not in DEPTH_ESTIMATORS and name != REFERENCE) or option not in ("", "separate"):
            raise ConfigError(f"--estimators: unknown {item!r}; choose from {sorted(DEPTH_ESTIMATORS)}, "
                              f"{REFERENCE}, and token-geometric+separate")
        chosen.append((name, option == "separate"))
    if not chosen:
        raise ConfigError("--estimators: give at least one estimator")
    return chosen


# ---- the cached split ------------------------------------------------------------------------


@dataclass
class ProbeSplit:
    """One split's inputs and oracles: token level (one row per target token) and sequence level."""
    states: Tensor  # tokens x N x C, the N block outputs
    confidence: Tensor  # tokens x 3, exit 1's top log-prob, top-2 margin, entropy
    token_oracles: Tensor  # tokens x K, 0-based exits, one column per oracle spec
    source_means: Tensor  # sentences x C, masked mean of the encoder output
    sequence_oracles: Tensor  # sentences x K
    token_sentences: Optional[Tensor] = None  # tokens: the index of each token's sentence in the split


def exit1_confidence(lprobs: Tensor) -> Tensor:
    """(..., V) log-probabilities of exit 1 → (..., 3): top log-prob, top-2 margin, entropy (nats)."""
    top2 = lprobs.topk(2, dim=-1).values
    entropy = -(lprobs.exp() * lprobs).sum(-1)
    return torch.stack([top2[..., 0], top2[..., 0] - top2[..., 1], entropy], dim=-1)


@torch.no_grad()
def probe_batch(model, sample, pad: int, oracles: Sequence[OracleSpec]) -> Dict[str, Tensor]:
    """Teacher-forced block states of one batch and its oracles (the criterion's ``exit_oracle``)."""
    from fairseq import utils

    from ..modules.depth_estimators import masked_mean_over_source
    from ..modules.exit_aware_decoding import encoder_tensors

    net_input, target = sample["net_input"], sample["target"]
    decoder = model.decoder
    encoder_out = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
    states, _ = decoder.teacher_forced_block_states(net_input["prev_output_tokens"], encoder_out)
    states = [s.transpose(0, 1) for s in states]  # each B x T x C
    lprobs = [utils.log_softmax(decoder.exit_logits(s, n), dim=-1).float() for n, s in enumerate(states, start=1)]
    scores = {name: ORACLE_SCORES[SCORES[name]](lprobs, target, pad) for name in {o.score for o in oracles}}
    mask = target.ne(pad)
    token = [token_oracle(scores[o.score][0], mask, o.lam, o.sigma)[mask] for o in oracles]
    sequence = [sequence_oracle(scores[o.score][0], mask, o.lam) for o in oracles]
    enc, enc_mask = encoder_tensors(encoder_out)
    sentence_of_token = torch.arange(target.size(0), device=target.device).unsqueeze(1).expand_as(target)[mask]
    return {"states": torch.stack(states, dim=2)[mask].float(), "confidence": exit1_confidence(lprobs[0])[mask],
            "token_oracles": torch.stack(token, dim=-1), "source_means": masked_mean_over_source(enc, enc_mask),
            "sequence_oracles": torch.stack(sequence, dim=-1), "token_sentences": sentence_of_token}


def collect_split(model, task, split: str, max_sentences: int, max_tokens: int,
                  oracles: Sequence[OracleSpec], device) -> ProbeSplit:
    from fairseq import utils

    task.load_dataset(split)
    batches = task.get_batch_iterator(task.dataset(split), max_tokens=max_tokens, seed=1,
                                      ignore_invalid_inputs=True).next_epoch_itr(shuffle=False)
    parts: Dict[str, List[Tensor]] = {}
    seen = 0
    for sample in batches:
        if max_sentences and seen >= max_sentences:
            break
        sample = utils.move_to_cuda(sample, device=device) if device.type == "cuda" else sample
        batch = probe_batch(model, sample, task.target_dictionary.pad(), oracles)
        batch["token_sentences"] = batch["token_sentences"] + seen  # index within the split
        for key, value in batch.items():
            parts.setdefault(key, []).append(value.cpu())
        seen += sample["nsentences"]
    if not parts:
        raise ConfigError(f"estimator_probe: split {split!r} gave no batches")
    return ProbeSplit(**{key: torch.cat(values) for key, values in parts.items()})


# ---- fitting -----------------------------------------------------------------------------------


class ConfidenceReference(torch.nn.Module):
    """Multinomial logistic regression on exit 1's confidence features (standardized on train)."""

    level = "token"

    def __init__(self, train_features: Tensor, num_exits: int):
        super().__init__()
        self.register_buffer("mean", train_features.mean(0))
        self.register_buffer("scale", train_features.std(0) + 1e-5)
        self.proj = torch.nn.Linear(train_features.size(1), num_exits)

    def forward(self, features: Tensor) -> Tensor:
        return F.log_softmax(self.proj((features - self.mean) / self.scale), dim=-1)


def build_probe_estimator(name: str, separate: bool, split: ProbeSplit, num_exits: int):
    if name == REFERENCE:
        return ConfidenceReference(split.confidence, num_exits)
    dim = split.source_means.size(1) if DEPTH_ESTIMATORS[name].level == "sequence" else split.states.size(2)
    return build_depth_estimator(name, dim, num_exits, separate_halting=separate)


def probe_inputs(estimator, split: ProbeSplit, column: int) -> Tuple[Tensor, Tensor]:
    """(inputs, oracle) the estimator is fitted or scored on: one row per token or per sentence."""
    if isinstance(estimator, ConfidenceReference):
        return split.confidence, split.token_oracles[:, column]
    if estimator.level == "sequence":
        return split.source_means, split.sequence_oracles[:, column]
    return split.states, split.token_oracles[:, column]


def log_q_of(estimator, inputs: Tensor) -> Tensor:
    if isinstance(estimator, ConfidenceReference):
        return estimator(inputs)
    if estimator.level == "sequence":  # a one-position "source" whose mean is the cached mean
        return estimator.log_q_from(encoder_out=inputs.unsqueeze(0), encoder_padding_mask=None)
    return estimator.log_q_from(block_states=inputs.unbind(dim=1))


def minibatches(rows: int, batch_size: int, steps: int, generator):
    """``steps`` index batches of ``batch_size`` rows, passes over a new permutation each time."""
    done = 0
    while done < steps:
        order = torch.randperm(rows, generator=generator)
        for start in range(0, rows, batch_size):
            if done == steps:
                return
            yield order[start:start + batch_size]
            done += 1


def fit(estimator, inputs: Tensor, oracle: Tensor, steps: int, lr: float, batch_size: int, seed: int):
    """``steps`` Adam steps on the criterion's loss (mean per row), minibatches of ``batch_size`` rows
    (the same number of steps at token and at sequence level, which has ~10x fewer rows)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(estimator.parameters(), lr=lr)
    for rows in minibatches(inputs.size(0), batch_size, steps, generator):
        optimizer.zero_grad()
        (estimator_loss(log_q_of(estimator, inputs[rows]), oracle[rows]) / rows.numel()).backward()
        optimizer.step()
    return estimator


def majority_and_entropy(oracle: Tensor, num_exits: int) -> Tuple[float, float, List[float]]:
    """(% share of the most frequent exit, entropy in bits, the exit distribution)."""
    counts = torch.bincount(oracle, minlength=num_exits).double()
    shares = counts / counts.sum().clamp(min=1)
    nonzero = shares[shares > 0]
    return 100.0 * float(shares.max()), float(-(nonzero * nonzero.log2()).sum()), shares.tolist()


@torch.no_grad()
def score(estimator, inputs: Tensor, oracle: Tensor) -> Tuple[float, float]:
    """(% argmax q = oracle, loss in bits per row) — as exit_acc / exit_loss are logged."""
    log_q = log_q_of(estimator, inputs)
    accuracy = 100.0 * float((log_q.argmax(-1) == oracle).double().mean())
    return accuracy, float(estimator_loss(log_q, oracle)) / oracle.numel() / math.log(2)


# ---- the command -------------------------------------------------------------------------------


def load_stage1(data: str, path: str, cpu: bool, source: str = "estimator_probe: --path"):
    """(model in eval mode, task, device) of an adaptive_transformer checkpoint on ``data``; errors name
    ``source`` (the tool and flag the path came from)."""
    from fairseq import checkpoint_utils

    import fairseq_dat  # noqa: F401  (registers the plugin)
    try:
        models, _, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": data})
    except (OSError, FileNotFoundError) as err:
        raise ConfigError(f"{source} {path}: {err}") from None
    model = models[0]
    if not hasattr(model.decoder, "teacher_forced_block_states"):
        raise ConfigError(f"{source} {path} is not an adaptive_transformer checkpoint")
    device = torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")
    return model.to(device).eval(), task, device


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fairseq_dat.cli.estimator_probe", description=__doc__.split("\n")[0],
                                epilog="See the module docstring for what is fitted and reported.")
    p.add_argument("data", help="fairseq data-bin directory the checkpoint was trained on")
    p.add_argument("--path", required=True, help="adaptive_transformer checkpoint (stage 1: aligned or mixed)")
    p.add_argument("--oracles", default="C:0.1:0,C:0.1:3,LL:0.1:0,LL:0.5:0",
                   help="comma-separated score:lambda[:sigma], score C (correctness) or LL (likelihood) (§3)")
    p.add_argument("--estimators", default="token-geometric,token-multinomial,sequence,confidence",
                   help="comma-separated depth estimators (token-geometric+separate: one halting unit per block), "
                        "and 'confidence' (reference: logistic regression on exit 1's confidence)")
    p.add_argument("--train-subset", default="train", help="split the estimators are fitted on")
    p.add_argument("--valid-subset", default="valid", help="split they are scored on")
    p.add_argument("--train-sentences", type=int, default=8000, help="fit on the first this many sentences (0: all)")
    p.add_argument("--max-tokens", type=int, default=4000, help="tokens per batch when computing the states")
    p.add_argument("--steps", type=int, default=3000, help="Adam steps per fit (minibatches of cached train rows)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    p.add_argument("--batch-size", type=int, default=512, help="rows (tokens or sentences) per Adam step")
    p.add_argument("--seed", type=int, default=1, help="initialization and minibatch order")
    p.add_argument("--cpu", action="store_true", help="compute the states on the CPU even if CUDA is available")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.train_sentences < 0:
        raise ConfigError("estimator_probe: --steps and --batch-size must be >= 1, --train-sentences >= 0")
    oracles, estimators = parse_oracles(args.oracles), parse_estimators(args.estimators)
    model, task, device = load_stage1(args.data, args.path, args.cpu)
    quiet_root_logger()
    num_exits = model.decoder.num_layers
    train = collect_split(model, task, args.train_subset, args.train_sentences, args.max_tokens, oracles, device)
    valid = collect_split(model, task, args.valid_subset, 0, args.max_tokens, oracles, device)
    print(f"train: {train.states.size(0)} tokens, {train.source_means.size(0)} sentences; "
          f"valid: {valid.states.size(0)} tokens, {valid.source_means.size(0)} sentences; {num_exits} exits")
    fitted = {}  # σ does not enter sequence-level oracles: one fit serves oracles that differ only in σ
    for column, oracle in enumerate(oracles):
        for name, separate in estimators:
            torch.manual_seed(args.seed)
            estimator = build_probe_estimator(name, separate, train, num_exits)
            level = "sequence" if getattr(estimator, "level", "") == "sequence" else "token"
            key = (name, separate, oracle.score, oracle.lam, oracle.sigma if level == "token" else None)
            if key not in fitted:
                fit(estimator, *probe_inputs(estimator, train, column), args.steps, args.lr, args.batch_size,
                    args.seed)
                inputs, target = probe_inputs(estimator, valid, column)
                fitted[key] = (*majority_and_entropy(target, num_exits), *score(estimator, inputs, target))
            majority, entropy, shares, accuracy, loss = fitted[key]
            print(f"PROBE oracle={oracle.score} lambda={oracle.lam:g} sigma={oracle.sigma:g} level={level} "
                  f"estimator={name}{'+separate' if separate else ''} acc={accuracy:.2f} majority={majority:.2f} "
                  f"acc_gain={accuracy - majority:+.2f} loss={loss:.3f} entropy={entropy:.3f} "
                  f"loss_gain={entropy - loss:+.3f} oracle_shares={','.join(f'{s:.3f}' for s in shares)}",
                  flush=True)


if __name__ == "__main__":
    run_main(main)
