"""Did the depth estimator learn? (Elbayad et al., ICLR 2020, §3: q is trained against the oracle q*.)

    python -m fairseq_dat.cli.estimator_check CKPT [--train-log LOG] [--min-margin 1.0]
        [--data DATA [--subset valid] [--bootstrap 1000]]

Two checks (three with ``--data``), printed one line each, then a verdict line ``ESTIMATOR learned=yes|no …``:
- parameters: the estimator's parameters in CKPT against their initialization, rebuilt exactly as
  ``fairseq-train`` built them (same config, ``utils.set_torch_seed(seed)``, ``task.build_model``):
  the L2 distance and the norms, per tensor. A stage 2 that leaves them at their random init
  (distance ≈ 0) trained nothing, whatever its loss says.
- validation (with ``--train-log``, the ``fairseq-train`` log of the estimator stage): from the ``valid``
  line written at the checkpoint's update (the last one if none matches), ``exit_acc`` against
  ``exit_majority`` (the accuracy of always predicting the oracle's most frequent exit) and ``exit_loss``
  against ``oracle_entropy`` (the cross-entropy of always predicting the oracle's exit distribution,
  bits). An estimator that beats neither is a majority classifier.
- significance (with ``--data``, the checkpoint's data-bin): the same two comparisons recomputed on
  ``--subset`` (teacher-forced, no dropout, the checkpoint's own oracle: ``--depth-oracle``,
  ``--oracle-lambda``, ``--oracle-sigma``), per sentence (sequence level) or per token (token level), each
  gain with a 95% paired bootstrap interval over sentences (``--bootstrap`` resamples; a sentence's tokens
  move together). The baseline is the subset's own oracle distribution (majority class; its cross-entropy
  is the entropy), which a trained estimator never saw: a strict prior. One line
  ``SIGNIFICANCE level=… acc_gain=… [lo, hi] loss_gain=… [lo, hi] …``.
The verdict: learned=yes when the parameters moved (relative distance > 1% for some tensor) and, with
``--data``, the interval of the accuracy gain or of the loss gain lies above zero; else, with a log,
exit_acc ≥ exit_majority + ``--min-margin`` points or exit_loss ≤ oracle_entropy − ``--min-loss-gain``
bits (0.01: a loss a hair under the entropy is the prior, not a learned estimator).
"""
import argparse
import math
import re
import sys
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from . import quiet_root_logger, run_main
from ..errors import ConfigError

VALID_LINE = re.compile(r"\| valid on '([^']+)' subset \| (.*)$")


def initial_estimator_state(cfg) -> Dict[str, torch.Tensor]:
    """The estimator's parameters as ``fairseq-train`` initialized them for this run's config."""
    from fairseq import tasks, utils

    utils.set_torch_seed(cfg.common.seed)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("decoder.depth_estimator.")}


def load_run(path: str):
    from fairseq import checkpoint_utils

    import fairseq_dat  # noqa: F401  (registers the plugin)
    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(path)
    except (OSError, FileNotFoundError) as err:
        raise ConfigError(f"estimator_check: cannot read checkpoint {path}: {err}") from None
    trained = {k: v for k, v in state["model"].items() if k.startswith("decoder.depth_estimator.")}
    if not trained:
        raise ConfigError(f"estimator_check: {path} has no depth estimator (train with --depth-estimator)")
    history = state.get("optimizer_history") or [{}]
    return state["cfg"], trained, history[-1].get("num_updates")


def parameter_report(initial: Dict[str, torch.Tensor], trained: Dict[str, torch.Tensor]) -> Dict[str, dict]:
    report = {}
    for key, now in trained.items():
        before = initial[key].float()
        now = now.float()
        distance = float((now - before).norm())
        report[key] = {"init_norm": float(before.norm()), "norm": float(now.norm()), "distance": distance,
                       "relative": distance / max(float(before.norm()), float(now.norm()), 1e-12)}
    return report


def parse_valid_fields(fields: str) -> Dict[str, float]:
    metrics = {}
    for field in fields.split(" | "):
        parts = field.strip().split(" ")
        if len(parts) == 2:
            try:
                metrics[parts[0]] = float(parts[1])
            except ValueError:
                pass
    return metrics


def valid_metrics(log_path: str, num_updates: Optional[int] = None) -> Optional[Dict[str, float]]:
    """The ``valid on 'valid' subset`` line of a fairseq-train log written at the checkpoint's update
    (``num_updates``: with ``--patience`` the best checkpoint is not the last validation), else the last."""
    found = []
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                match = VALID_LINE.search(line.rstrip())
                if match and match.group(1) == "valid":
                    found.append(parse_valid_fields(match.group(2)))
    except OSError as err:
        raise ConfigError(f"estimator_check: --train-log {log_path}: {err}") from None
    if not found:
        return None
    at_checkpoint = [m for m in found if num_updates is not None and m.get("num_updates") == num_updates]
    return at_checkpoint[-1] if at_checkpoint else found[-1]


def paired_bootstrap(diff: Tensor, groups: Optional[Tensor] = None, samples: int = 1000,
                     seed: int = 1) -> Tuple[float, float, float]:
    """Mean of the per-row differences ``diff`` and its 95% percentile bootstrap interval: ``samples``
    resamples of the groups with replacement (``groups``: one id per row, e.g. the sentence of each token,
    whose rows move together; None: rows are independent), each resample's mean over its rows."""
    diff = diff.detach().double().flatten()
    if diff.numel() == 0:
        return float("nan"), float("nan"), float("nan")
    ids = torch.arange(diff.numel()) if groups is None else torch.unique(groups.flatten(), return_inverse=True)[1]
    count = int(ids.max()) + 1
    sums = torch.zeros(count, dtype=torch.float64).index_add_(0, ids, diff)
    sizes = torch.bincount(ids, minlength=count).double()
    draws = torch.randint(count, (samples, count), generator=torch.Generator().manual_seed(seed))
    means = sums[draws].sum(1) / sizes[draws].sum(1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float(sums.sum() / sizes.sum()), low, high


def gains_against_prior(log_q: Tensor, oracle: Tensor, num_exits: int, groups: Optional[Tensor] = None,
                        samples: int = 1000, seed: int = 1) -> Dict[str, object]:
    """The estimator (``log_q``: rows x N) against always predicting the oracle's own distribution on these
    rows: accuracy gain over the majority class (points) and loss gain over the entropy (bits per row), each
    (mean, low, high) by :func:`paired_bootstrap`."""
    shares = torch.bincount(oracle, minlength=num_exits).double()
    shares = shares / shares.sum()
    ours_bits = -log_q.double().gather(1, oracle.unsqueeze(1)).squeeze(1) / math.log(2)
    prior_bits = -shares.log2().index_select(0, oracle)
    ours_right = log_q.argmax(-1).eq(oracle).double()
    majority_right = oracle.eq(int(shares.argmax())).double()
    return {"rows": oracle.numel(), "groups": int(groups.unique().numel()) if groups is not None else oracle.numel(),
            "accuracy": 100 * float(ours_right.mean()), "majority": 100 * float(majority_right.mean()),
            "loss": float(ours_bits.mean()), "entropy": float(prior_bits.mean()),
            "acc_gain": paired_bootstrap(100 * (ours_right - majority_right), groups, samples, seed),
            "loss_gain": paired_bootstrap(prior_bits - ours_bits, groups, samples, seed)}


def oracle_of(cfg):
    """The oracle the checkpoint's estimator stage trained against (criterion flags), as a probe spec."""
    from .estimator_probe import OracleSpec

    criterion = cfg.criterion
    score = {"correctness": "C", "likelihood": "LL"}[getattr(criterion, "depth_oracle", "correctness")]
    return OracleSpec(score, float(getattr(criterion, "oracle_lambda", 0.1)),
                      float(getattr(criterion, "oracle_sigma", 0.0) or 0.0))


def held_out_significance(path: str, spec, data: str, subset: str, samples: int, seed: int, cpu: bool = False,
                          max_tokens: int = 4000) -> Dict[str, object]:
    """:func:`gains_against_prior` of the checkpoint's estimator on ``subset`` of ``data`` (module docstring)."""
    from .estimator_probe import collect_split, load_stage1, log_q_of, probe_inputs

    model, task, device = load_stage1(data, path, cpu, source="estimator_check:")
    estimator = model.decoder.depth_estimator
    if estimator is None:
        raise ConfigError(f"estimator_check: {path} has no depth estimator (train with --depth-estimator)")
    quiet_root_logger()
    try:
        split = collect_split(model, task, subset, 0, max_tokens, [spec], device)
    except (FileNotFoundError, ConfigError) as err:  # the task's own error names its split flags, not ours
        raise ConfigError(f"estimator_check: --subset {subset}: {str(err).split('; ')[0]}") from None
    inputs, oracle = probe_inputs(estimator, split, 0)
    with torch.no_grad():
        log_q = log_q_of(estimator, inputs.to(device)).float().cpu()
    groups = split.token_sentences if estimator.level == "token" else None
    result = gains_against_prior(log_q, oracle, model.decoder.num_layers, groups, samples, seed)
    result.update(level=estimator.level, oracle=str(spec), subset=subset)
    return result


def significance_line(sig: Dict[str, object]) -> str:
    acc, loss = sig["acc_gain"], sig["loss_gain"]
    return (f"SIGNIFICANCE subset={sig['subset']} level={sig['level']} oracle=({sig['oracle']}) rows={sig['rows']} "
            f"sentences={sig['groups']} acc={sig['accuracy']:.2f} majority={sig['majority']:.2f} "
            f"acc_gain={acc[0]:+.2f} [{acc[1]:+.2f}, {acc[2]:+.2f}] loss={sig['loss']:.4f} "
            f"entropy={sig['entropy']:.4f} loss_gain={loss[0]:+.4f} [{loss[1]:+.4f}, {loss[2]:+.4f}] bits")


def verdict(report: Dict[str, dict], valid: Optional[Dict[str, float]], min_margin: float,
            min_loss_gain: float = 0.01, significance: Optional[Dict[str, object]] = None) -> str:
    moved = max(r["relative"] for r in report.values()) > 0.01
    parts = [f"params_moved={'yes' if moved else 'no'}"]
    beats = True
    if significance is not None:  # recomputed with intervals: decides over the log's point values
        beats = significance["acc_gain"][1] > 0 or significance["loss_gain"][1] > 0
        parts.append(f"{significance['subset']} acc_gain_low={significance['acc_gain'][1]:+.2f} "
                     f"loss_gain_low={significance['loss_gain'][1]:+.4f}")
    elif valid is not None:
        acc, majority = valid.get("exit_acc"), valid.get("exit_majority")
        loss, entropy = valid.get("exit_loss"), valid.get("oracle_entropy")
        if None in (acc, majority, loss, entropy):
            parts.append("valid=incomplete (a log without exit_majority/oracle_entropy)")
            beats = False
        else:
            beats = acc >= majority + min_margin or loss <= entropy - min_loss_gain
            parts.append(f"valid exit_acc={acc:.2f} exit_majority={majority:.2f} exit_loss={loss:.3f} "
                         f"oracle_entropy={entropy:.3f}")
    learned = moved and beats
    return f"ESTIMATOR learned={'yes' if learned else 'no'} " + " ".join(parts)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fairseq_dat.cli.estimator_check", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="checkpoint of an estimator stage (--depth-estimator …)")
    p.add_argument("--train-log", help="that stage's fairseq-train log (valid lines with exit_acc, exit_majority)")
    p.add_argument("--min-margin", type=float, default=1.0,
                   help="exit_acc must beat exit_majority by this many points (or exit_loss beat the entropy, below)")
    p.add_argument("--min-loss-gain", type=float, default=0.01,
                   help="or exit_loss must be at least this many bits below oracle_entropy")
    p.add_argument("--data", help="the checkpoint's data-bin: recompute the gains on --subset with bootstrap intervals")
    p.add_argument("--subset", default="valid", help="with --data: the split the gains are measured on")
    p.add_argument("--bootstrap", type=int, default=1000, help="with --data: bootstrap resamples of the sentences")
    p.add_argument("--seed", type=int, default=1, help="with --data: the resampling seed")
    p.add_argument("--cpu", action="store_true", help="with --data: run on the CPU even if CUDA is available")
    args = p.parse_args(argv)
    if args.bootstrap < 10:
        raise ConfigError(f"--bootstrap must be >= 10, got {args.bootstrap}")
    cfg, trained, num_updates = load_run(args.checkpoint)
    report = parameter_report(initial_estimator_state(cfg), trained)
    for key, r in report.items():
        print(f"{key}: init_norm={r['init_norm']:.4f} norm={r['norm']:.4f} distance={r['distance']:.4f} "
              f"relative={r['relative']:.3f}")
    valid = valid_metrics(args.train_log, num_updates) if args.train_log else None
    if args.train_log and valid is None:
        print(f"warning: no valid line in {args.train_log}", file=sys.stderr)
    significance = None
    if args.data:
        significance = held_out_significance(args.checkpoint, oracle_of(cfg), args.data, args.subset, args.bootstrap,
                                             args.seed, args.cpu)
        print(significance_line(significance))
    print(verdict(report, valid, args.min_margin, args.min_loss_gain, significance))


if __name__ == "__main__":
    run_main(main)
