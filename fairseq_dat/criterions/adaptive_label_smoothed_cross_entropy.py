"""Multi-exit training (paper §2.2, Appendix A) and the depth-estimator loss (§3).

L = L_dec + α · L_exit, where
- aligned training (default): one forward; L_dec = Σ_n ω_n L^n / Σ_n ω_n over the N exits'
  label-smoothed losses (ω uniform: the paper's best, Appendix A);
- mixed training: M exit sequences sampled per sentence (uniform per token over 1..N), each
  decoded teacher-forced with the copy rule; L_dec = mean over the M samples;
- L_exit = Σ_t H(q*_t, q_t), the estimator's cross-entropy against the oracle built from the
  exits' own (detached) predictions (:mod:`fairseq_dat.oracles`).

Every exit's loss, nll_loss and ppl are logged (``loss_exit1`` …), plus the estimator's loss,
accuracy against the oracle and the oracle's average exit.
"""
import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from fairseq import utils
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
    label_smoothed_nll_loss,
)
from fairseq.logging import metrics

from ..errors import ConfigError
from ..modules.depth_estimators import estimator_correct_count, estimator_loss
from ..modules.fused_exit_loss import fused_exit_loss
from ..oracles import exit_oracle

EXIT_WEIGHT_SCHEMES = {
    "uniform": lambda n: 1.0,
    "n": lambda n: float(n),
    "sqrt_n": lambda n: math.sqrt(n),
    "inv_sqrt_n": lambda n: 1.0 / math.sqrt(n),
    "inv_n": lambda n: 1.0 / n,
}


@dataclass
class AdaptiveLabelSmoothedCrossEntropyConfig(LabelSmoothedCrossEntropyCriterionConfig):
    exit_training: str = field(default="aligned", metadata={
        "help": "aligned: all exits from one forward pass (§2.2, the paper's final models); "
                "mixed: --mixed-samples sampled exit sequences with the copy rule"})
    mixed_samples: int = field(default=1, metadata={"help": "M, exit sequences sampled per sentence (mixed)"})
    exit_weights: str = field(default="uniform", metadata={
        "help": "ω_n of aligned training (Appendix A): uniform, n, sqrt_n, inv_sqrt_n, inv_n, or N "
                "comma-separated numbers"})
    exit_grad_scale: Optional[float] = field(default=None, metadata={
        "help": "γ of Appendix A: gradients flowing from block n+1 into block n are scaled by γ "
                "(SCALE_GRADIENT); off by default, as in the paper's final models"})
    depth_oracle: str = field(default="correctness", metadata={
        "help": "oracle the depth estimator learns (§3): likelihood (LL) or correctness (C)"})
    oracle_lambda: float = field(default=0.1, metadata={"help": "λ ≥ 0, the oracle's depth penalty (q* = argmax_n S^n − λn)"})
    oracle_sigma: float = field(default=0.0, metadata={
        "help": "σ ≥ 0 of the RBF smoothing of token-level oracle scores over positions; 0 = local"})
    exit_loss_impl: str = field(default="fused", metadata={
        "help": "aligned training without a depth estimator: fused = each exit's projection and loss "
                "computed in row chunks with their gradients (no tokens x V tensors kept; same loss, "
                "about 20%% faster on CPU); autograd = log_softmax + fairseq's label_smoothed_nll_loss. "
                "fp16/bf16, biased classifiers and the estimator stage (the oracle needs every exit's "
                "log-probabilities) always use autograd"})
    exit_loss_alpha: float = field(default=0.0, metadata={
        "help": "α ≥ 0, weight of the depth-estimator loss (L = L_dec + α L_exit); the paper's stage 1 "
                "uses 0, stage 2 > 0"})


def resolve_exit_weights(spec: str, num_exits: int) -> List[float]:
    """``--exit-weights`` → N weights ω_1..ω_N (Appendix A)."""
    if spec in EXIT_WEIGHT_SCHEMES:
        return [EXIT_WEIGHT_SCHEMES[spec](n) for n in range(1, num_exits + 1)]
    try:
        weights = [float(w) for w in spec.split(",")]
    except ValueError:
        raise ConfigError(f"--exit-weights must be one of {', '.join(EXIT_WEIGHT_SCHEMES)} or {num_exits} "
                         f"comma-separated numbers, got {spec!r}") from None
    if len(weights) != num_exits:
        raise ConfigError(f"--exit-weights gives {len(weights)} weights but the decoder has {num_exits} exits")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"--exit-weights must be finite, non-negative and not all zero, got {spec!r}")
    return weights


@register_criterion("adaptive_label_smoothed_cross_entropy", dataclass=AdaptiveLabelSmoothedCrossEntropyConfig)
class AdaptiveLabelSmoothedCrossEntropyCriterion(LabelSmoothedCrossEntropyCriterion):
    def __init__(self, task, sentence_avg, label_smoothing, ignore_prefix_size=0, report_accuracy=False,
                 exit_training="aligned", mixed_samples=1, exit_weights="uniform", exit_grad_scale=None,
                 depth_oracle="correctness", oracle_lambda=0.1, oracle_sigma=0.0, exit_loss_alpha=0.0,
                 exit_loss_impl="fused"):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        check_criterion_flags(exit_training, mixed_samples, exit_grad_scale, depth_oracle, oracle_lambda,
                              oracle_sigma, exit_loss_alpha)
        self.exit_training = exit_training
        self.mixed_samples = mixed_samples
        self.exit_weights_spec = exit_weights
        self.exit_grad_scale = exit_grad_scale
        self.depth_oracle = depth_oracle
        self.oracle_lambda = oracle_lambda
        self.oracle_sigma = oracle_sigma
        self.exit_loss_alpha = exit_loss_alpha
        if exit_loss_impl not in ("fused", "autograd"):
            raise ConfigError(f"--exit-loss-impl must be fused or autograd, got {exit_loss_impl!r}")
        self.exit_loss_impl = exit_loss_impl

    def forward(self, model, sample, reduce=True):
        decoder = _adaptive_decoder(model)
        weights = resolve_exit_weights(self.exit_weights_spec, decoder.num_layers)
        target = model.get_targets(sample, None)
        if self.exit_training == "mixed":
            loss, nll_loss, logs = self.mixed_loss(model, sample, target)
        else:
            loss, nll_loss, logs = self.aligned_loss(model, sample, target, weights)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {"loss": loss.data, "nll_loss": nll_loss.data, "ntokens": sample["ntokens"],
                          "nsentences": sample["target"].size(0), "sample_size": sample_size, **logs}
        return loss, sample_size, logging_output

    def exit_lprobs(self, decoder, states, n):
        return utils.log_softmax(decoder.exit_logits(states, n), dim=-1)

    def smoothed_loss(self, lprobs, target):
        loss, nll = label_smoothed_nll_loss(lprobs.view(-1, lprobs.size(-1)), target.reshape(-1), self.eps,
                                            ignore_index=self.padding_idx, reduce=True)
        return loss, nll

    def aligned_loss(self, model, sample, target, weights):
        """Weighted mean of the N exits' losses from one forward pass (§2.2, Appendix A)."""
        decoder = _adaptive_decoder(model)
        # through the model's own forward, so a DistributedDataParallel wrapper all-reduces the gradients
        _, extra = model(**sample["net_input"], features_only=True, grad_scale=self.exit_grad_scale)
        total_w = sum(weights)
        loss = nll_loss = 0.0
        logs, lprobs_per_exit = {}, []
        fused = self.can_fuse(decoder, extra)
        for n, (state, w) in enumerate(zip(extra["exit_states"], weights), start=1):
            if fused:
                loss_n, nll_n = fused_exit_loss(decoder.exit_features(state, n), decoder.exit_projection(n),
                                                target, self.eps, self.padding_idx)
            else:
                lprobs = self.exit_lprobs(decoder, state, n)
                loss_n, nll_n = self.smoothed_loss(lprobs, target)
                lprobs_per_exit.append(lprobs.detach())
            loss = loss + (w / total_w) * loss_n
            nll_loss = nll_loss + (w / total_w) * nll_n
            logs[f"loss_exit{n}"] = loss_n.data
            logs[f"nll_loss_exit{n}"] = nll_n.data
        if extra.get("depth_log_q") is not None:
            exit_loss, est_logs = self.estimator_term(decoder, extra["depth_log_q"], lprobs_per_exit, target)
            logs.update(est_logs)
            if self.exit_loss_alpha > 0:
                loss = loss + self.exit_loss_alpha * exit_loss
        return loss, nll_loss, logs

    def can_fuse(self, decoder, extra) -> bool:
        """--exit-loss-impl fused applies: fp32 states, bias-free nn.Linear classifiers, no estimator."""
        if self.exit_loss_impl != "fused" or extra.get("depth_log_q") is not None:
            return False
        if extra["exit_states"][0].dtype != torch.float32:
            return False
        heads = [decoder.exit_projection(n) for n in range(1, decoder.num_layers + 1)]
        return all(type(h) is torch.nn.Linear and h.bias is None for h in heads)

    def estimator_term(self, decoder, log_q, lprobs_per_exit, target):
        """L_exit against the oracle (§3) and its logs: loss, accuracy, the oracle's AE."""
        level = decoder.depth_estimator.level
        oracle, mask = exit_oracle(lprobs_per_exit, target, self.padding_idx, score=self.depth_oracle,
                                   level=level, lam=self.oracle_lambda, sigma=self.oracle_sigma)
        if level == "sequence":
            mask = None
            count = oracle.numel()
            oracle_exit_sum = (oracle + 1).sum()
        else:
            count = mask.sum()
            oracle_exit_sum = ((oracle + 1) * mask).sum()
        loss = estimator_loss(log_q, oracle, mask)
        correct = estimator_correct_count(log_q, oracle, mask)
        logs = {"exit_loss": loss.data, "exit_correct": utils.item(correct),
                "exit_count": utils.item(count), "oracle_exit_sum": utils.item(oracle_exit_sum)}
        logs.update(oracle_histogram_logs(oracle, mask, decoder.num_layers))
        return loss, logs

    def sample_exits(self, target, num_exits):
        """Uniform per-token exits 1..N (§2.2, mixed training: the paper samples "random exits" without
        naming a distribution; uniform is its natural reading).
        Drawn from torch's RNG, which fairseq seeds from --seed and the update number, so runs are
        reproducible, resumable, and every data-parallel rank draws from the same seed."""
        return torch.randint(1, num_exits + 1, target.shape, device=target.device)

    def mixed_loss(self, model, sample, target):
        """Mean over M sampled exit sequences of the per-token loss at each token's exit (§2.2). The M
        samples run as one batch through the model's forward (the encoder once); each exit's loss is
        logged over the tokens that exited there (``loss_exit{n}``, ``ntokens_exit{n}``)."""
        decoder = _adaptive_decoder(model)
        num_exits, m = decoder.num_layers, self.mixed_samples
        exits = torch.stack([self.sample_exits(target, num_exits) for _ in range(m)])  # M x B x T
        logits, _ = model(**sample["net_input"], exits=exits)  # M*B x T x V
        lprobs = utils.log_softmax(logits, dim=-1)
        targets = target.repeat(m, 1)
        tok_loss, tok_nll = label_smoothed_nll_loss(lprobs.view(-1, lprobs.size(-1)), targets.reshape(-1),
                                                    self.eps, ignore_index=self.padding_idx, reduce=False)
        tok_loss, tok_nll = tok_loss.view_as(targets), tok_nll.view_as(targets)
        real = targets.ne(self.padding_idx)
        flat_exits = exits.view_as(targets)
        logs = {}
        for n in range(1, num_exits + 1):
            at_n = real & flat_exits.eq(n)
            logs[f"loss_exit{n}"] = tok_loss[at_n].sum().data / m
            logs[f"nll_loss_exit{n}"] = tok_nll[at_n].sum().data / m
            logs[f"ntokens_exit{n}"] = utils.item(at_n.sum()) / m
        loss, nll_loss = tok_loss.sum() / m, tok_nll.sum() / m
        # exits not drawn in this batch still join the graph (zero gradient): no DDP rank waits on them
        drawn = set(flat_exits[real].unique().tolist())
        loss = loss + 0.0 * sum(p.sum() for n in range(1, num_exits + 1) if n not in drawn
                                for p in decoder.exit_projection(n).parameters())
        return loss, nll_loss, logs

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        n = 1
        while any(f"loss_exit{n}" in log for log in logging_outputs):
            loss_n = sum(log.get(f"loss_exit{n}", 0) for log in logging_outputs)
            nll_n = sum(log.get(f"nll_loss_exit{n}", 0) for log in logging_outputs)
            # aligned: every exit sees every token; mixed: exit n's loss is over the tokens that exited at n
            if any(f"ntokens_exit{n}" in log for log in logging_outputs):
                size_n = tokens_n = sum(log.get(f"ntokens_exit{n}", 0) for log in logging_outputs)
            else:
                size_n, tokens_n = sample_size, ntokens
            if size_n > 0:
                metrics.log_scalar(f"loss_exit{n}", loss_n / size_n / math.log(2), size_n, round=3)
            if tokens_n > 0:
                metrics.log_scalar(f"nll_loss_exit{n}", nll_n / tokens_n / math.log(2), tokens_n, round=3)
                metrics.log_derived(f"ppl_exit{n}",
                                    lambda m, key=f"nll_loss_exit{n}": utils.get_perplexity(m[key].avg))
            n += 1
        count = sum(log.get("exit_count", 0) for log in logging_outputs)
        if count > 0:
            exit_loss = sum(log.get("exit_loss", 0) for log in logging_outputs)
            metrics.log_scalar("exit_loss", exit_loss / count / math.log(2), count, round=3)
            correct = sum(log.get("exit_correct", 0) for log in logging_outputs)
            metrics.log_scalar("exit_acc", 100.0 * correct / count, count, round=2)
            oracle_sum = sum(log.get("oracle_exit_sum", 0) for log in logging_outputs)
            metrics.log_scalar("oracle_ae", oracle_sum / count, count, round=3)
            log_oracle_histogram(logging_outputs)


def oracle_histogram_logs(oracle: torch.Tensor, mask: Optional[torch.Tensor], num_exits: int) -> dict:
    """How often the oracle picks each exit in this batch (``oracle_count{n}``, 1-based n): what
    ``exit_majority`` and ``oracle_entropy`` are computed from."""
    picked = oracle if mask is None else oracle[mask & oracle.ge(0)]
    hist = torch.bincount(picked.flatten().clamp(min=0), minlength=num_exits)
    return {f"oracle_count{n}": utils.item(hist[n - 1]) for n in range(1, num_exits + 1)}


def log_oracle_histogram(logging_outputs) -> None:
    """Beside ``exit_acc`` and ``exit_loss`` (§3), what an estimator that ignores its input reaches:
    ``exit_majority`` (%), the share of the oracle's most frequent exit (the accuracy of always
    predicting it), and ``oracle_entropy`` (bits), the cross-entropy of always predicting the oracle's
    exit distribution. Both are over the whole split (or log interval): the histogram is summed first."""
    n = 1
    while any(f"oracle_count{n}" in log for log in logging_outputs):
        metrics.log_scalar_sum(f"oracle_count{n}", sum(log.get(f"oracle_count{n}", 0) for log in logging_outputs))
        n += 1
    num_exits = n - 1
    if num_exits == 0:
        return

    def histogram(meters):
        return [float(meters[f"oracle_count{k}"].sum) for k in range(1, num_exits + 1)]  # tensors after all-reduce

    def majority(meters):
        hist = histogram(meters)
        return round(100.0 * max(hist) / max(sum(hist), 1), 2)

    def entropy(meters):
        hist = histogram(meters)
        total = max(sum(hist), 1)
        return round(-sum(c / total * math.log2(c / total) for c in hist if c > 0), 3)

    metrics.log_derived("exit_majority", majority)
    metrics.log_derived("oracle_entropy", entropy)


def check_criterion_flags(exit_training, mixed_samples, exit_grad_scale, depth_oracle, oracle_lambda,
                          oracle_sigma, exit_loss_alpha):
    """Clear one-line errors for flags out of range (each names its flag)."""
    if exit_training not in ("aligned", "mixed"):
        raise ConfigError(f"--exit-training must be aligned or mixed, got {exit_training!r}")
    if mixed_samples < 1:
        raise ConfigError(f"--mixed-samples must be >= 1, got {mixed_samples}")
    if depth_oracle not in ("likelihood", "correctness"):
        raise ConfigError(f"--depth-oracle must be likelihood or correctness, got {depth_oracle!r}")
    for flag, value in (("--oracle-lambda", oracle_lambda), ("--oracle-sigma", oracle_sigma),
                        ("--exit-loss-alpha", exit_loss_alpha)):
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{flag} must be a finite number >= 0, got {value}")
    if exit_grad_scale is not None and not (math.isfinite(exit_grad_scale) and exit_grad_scale > 0):
        raise ConfigError(f"--exit-grad-scale must be a finite number > 0, got {exit_grad_scale}")
    if exit_training == "mixed" and exit_loss_alpha > 0:
        raise ConfigError("--exit-loss-alpha > 0 needs --exit-training aligned (the oracle needs every exit)")


def _adaptive_decoder(model):
    decoder = getattr(model, "decoder", None)
    if decoder is None or not hasattr(decoder, "exit_logits"):
        raise ConfigError("--criterion adaptive_label_smoothed_cross_entropy needs --arch adaptive_transformer "
                         f"(or one of its variants), got {type(model).__name__}")
    return decoder
