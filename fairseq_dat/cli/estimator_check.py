"""Did the depth estimator learn? (Elbayad et al., ICLR 2020, §3: q is trained against the oracle q*.)

    python -m fairseq_dat.cli.estimator_check CKPT [--train-log LOG] [--min-margin 1.0]

Two checks, printed one line each, then a verdict line ``ESTIMATOR learned=yes|no …``:
- parameters: the estimator's parameters in CKPT against their initialization, rebuilt exactly as
  ``fairseq-train`` built them (same config, ``utils.set_torch_seed(seed)``, ``task.build_model``):
  the L2 distance and the norms, per tensor. A stage 2 that leaves them at their random init
  (distance ≈ 0) trained nothing, whatever its loss says.
- validation (with ``--train-log``, the ``fairseq-train`` log of the estimator stage): from the ``valid``
  line written at the checkpoint's update (the last one if none matches), ``exit_acc`` against
  ``exit_majority`` (the accuracy of always predicting the oracle's most frequent exit) and ``exit_loss``
  against ``oracle_entropy`` (the cross-entropy of always predicting the oracle's exit distribution,
  bits). An estimator that beats neither is a majority classifier.
The verdict: learned=yes when the parameters moved (relative distance > 1% for some tensor) and, with a
log, exit_acc ≥ exit_majority + ``--min-margin`` points or exit_loss ≤ oracle_entropy − ``--min-loss-gain``
bits (0.01: a loss a hair under the entropy is the prior, not a learned estimator).
"""
import argparse
import re
import sys
from typing import Dict, Optional

import torch

from . import run_main
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


def verdict(report: Dict[str, dict], valid: Optional[Dict[str, float]], min_margin: float,
            min_loss_gain: float = 0.01) -> str:
    moved = max(r["relative"] for r in report.values()) > 0.01
    parts = [f"params_moved={'yes' if moved else 'no'}"]
    beats = True
    if valid is not None:
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
    args = p.parse_args(argv)
    cfg, trained, num_updates = load_run(args.checkpoint)
    report = parameter_report(initial_estimator_state(cfg), trained)
    for key, r in report.items():
        print(f"{key}: init_norm={r['init_norm']:.4f} norm={r['norm']:.4f} distance={r['distance']:.4f} "
              f"relative={r['relative']:.3f}")
    valid = valid_metrics(args.train_log, num_updates) if args.train_log else None
    if args.train_log and valid is None:
        print(f"warning: no valid line in {args.train_log}", file=sys.stderr)
    print(verdict(report, valid, args.min_margin, args.min_loss_gain))


if __name__ == "__main__":
    run_main(main)
