"""Exit decision rules used while decoding (paper §3, "inference"), one small class per rule.

The decoder's incremental step (:mod:`fairseq_dat.modules.exit_aware_decoding`) asks
its ``exit_policy`` two things: ``plan_step`` (decisions that can be made before the blocks run:
fixed exits, sequence-level depths) and ``halt`` (after block n < N, which of the still-running rows
stop here). Exits are 1-based block numbers. Every policy also counts the exits of all beam rows it
decided (``ExitStats``), which is what decoding time follows.

=================  ===============================================================================
strategy           rule
=================  ===============================================================================
full               every token runs every block (through the lean step; ``--decoder-step fairseq``:
                   fairseq's own decoder, no exit-aware code at all)
fixed              every token exits at block ``--fixed-exit`` k
estimator          the checkpoint's depth estimator and ``--exit-threshold`` T:
                   token-geometric: halt at the first block n with χ_n > T_n (T: one value or N−1);
                   multinomial / Poisson-binomial (token after block 1, sequence from the encoder
                   output): the first n with q(1)+…+q(n) ≥ T (no T: argmax q, the paper's rule);
                   both rules are the functions of ``modules.depth_estimators`` (``geometric_halts``,
                   ``decide_by_cumulative``), called here and nowhere re-derived
confidence         exit at the first block n whose classifier's top probability exceeds T_n
                   (the paper's baseline; projects onto the vocabulary at every visited block)
=================  ===============================================================================
"""
import logging
from typing import Optional, Sequence

import torch
from torch import Tensor

from .errors import ConfigError
from .modules.depth_estimators import decide_by_cumulative, geometric_halts, single_threshold, thresholds_from_arg
from .modules.exit_aware_decoding import DECODER_STEPS, KV_MODES, lean_step_unsupported

SEQUENCE_ORDERS = ("depth", "batch")  # the first is the default

logger = logging.getLogger(__name__)

STRATEGIES = ("auto", "full", "fixed", "estimator", "confidence", "uniform", "oracle")


class ExitStats:
    """Histogram of exits over every beam row decoded (compute) and over the returned hypotheses'
    tokens (the paper's AE)."""

    def __init__(self, num_exits: int):
        self.num_exits = num_exits
        self.row_hist = torch.zeros(num_exits, dtype=torch.long)
        self.token_hist = torch.zeros(num_exits, dtype=torch.long)

    def add_rows(self, exits: Tensor):
        self.row_hist += torch.bincount(exits.cpu() - 1, minlength=self.num_exits)

    def add_hypothesis(self, exits: Tensor):
        self.token_hist += torch.bincount(exits.cpu() - 1, minlength=self.num_exits)

    @staticmethod
    def _mean(hist: Tensor) -> float:
        total = int(hist.sum())
        return float((hist * torch.arange(1, hist.numel() + 1)).sum()) / total if total else float("nan")

    @property
    def average_exit(self) -> float:
        """AE: mean exit (1-based) over the tokens of the returned hypotheses, EOS included."""
        return self._mean(self.token_hist)

    @property
    def compute_average_exit(self) -> float:
        """Mean exit over every beam row at every step (finished or not): what time follows."""
        return self._mean(self.row_hist)

    def summary(self) -> str:
        """The body of the ``Adaptive exits (N=…):`` line (written by :mod:`fairseq_dat.exit_summary`)."""
        from .exit_summary import ExitSummary  # local: exit_summary is a leaf module users import alone

        return ExitSummary.of_stats(self).line().split(": ", 1)[1]


class ExitPolicy:
    """Base: no early exit. Subclasses override ``halt`` and/or ``plan_step``. ``decoder_step``,
    ``kv_mode`` and ``gather_ratio`` choose how the decoder's step runs the blocks (see
    :mod:`fairseq_dat.modules.exit_aware_decoding`)."""

    gather_ratio = 0.5
    kv_mode = "deferred"
    decoder_step = DECODER_STEPS[0]
    can_halt = True  # False: no row ever stops before the last block (``halt`` is not called)

    def __init__(self, stats: Optional[ExitStats] = None, gather_ratio: Optional[float] = None,
                 kv_mode: Optional[str] = None, decoder_step: Optional[str] = None):
        self.stats = stats
        if gather_ratio is not None:
            self.gather_ratio = gather_ratio
        if kv_mode is not None:
            self.kv_mode = kv_mode
        if decoder_step is not None:
            self.decoder_step = decoder_step

    def plan_step(self, decoder, encoder_out, incremental_state, prev_output_tokens) -> dict:
        return {}

    def halt(self, decoder, n: int, h: Tensor, active: Tensor, plan: dict):
        """h: |active| x C states after block n of the still-running rows → (bool |active|, logits
        of those rows at exit n or None)."""
        return None, None

    def count(self, step_exits: Tensor):
        if self.stats is not None:
            self.stats.add_rows(step_exits)


class FullDepth(ExitPolicy):
    """Every row runs every block, through the exit-aware step (the lean one): no skipped blocks,
    so no keys/values to defer (``--exit-kv`` does not apply)."""

    can_halt = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.kv_mode = "eager"


class PlannedDepth(ExitPolicy):
    """Rows stop where ``plan["depth"]`` (B, 1-based) says."""

    def halt(self, decoder, n, h, active, plan):
        return plan["depth"].index_select(0, active) == n, None


class FixedExit(PlannedDepth):
    """``--fixed-exit k``: every token exits at block k (Table 1's per-exit rows)."""

    def __init__(self, exit_block: int, **kwargs):
        super().__init__(**kwargs)
        self.exit_block = exit_block

    def halt(self, decoder, n, h, active, plan):
        stop = torch.full((active.numel(),), n == self.exit_block, dtype=torch.bool, device=h.device)
        return stop, None


class UniformExits(PlannedDepth):
    """``--exit-strategy uniform``: each token of each hypothesis exits at a block drawn uniformly
    from 1..N (Table 1's "Uniform" column: the anytime decoder under random exits). The draws come
    from torch's generator, which fairseq seeds with ``--seed``."""

    def plan_step(self, decoder, encoder_out, incremental_state, prev_output_tokens):
        bsz = prev_output_tokens.size(0)
        depth = torch.randint(1, decoder.num_layers + 1, (bsz,))
        return {"depth": depth.to(prev_output_tokens.device)}


class ReferenceOracle(ExitPolicy):
    """``--exit-strategy oracle`` (analysis, needs the references): each token exits at the first
    block whose classifier's top prediction is the reference token at that position (the
    correctness oracle of §3 with λ > 0 picks the same exit whenever some exit is right), or at the
    last block when none is; tokens past the reference's end run all blocks. The exits' logits
    computed for the test are reused as the output. An upper bound for correctness-trained
    estimators, with the search on its own hypotheses rather than on the reference prefix."""

    needs_reference = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.reference: Optional[Tensor] = None  # set per batch by the generator: B x T target tokens

    def plan_step(self, decoder, encoder_out, incremental_state, prev_output_tokens):
        buf = decoder.get_incremental_state(incremental_state, "exits") or {}
        if buf.get("reference") is None:  # first step: one copy per beam row, reordered with the beam after
            rows = prev_output_tokens.size(0)
            buf = dict(buf)
            buf["reference"] = self.reference.repeat_interleave(rows // self.reference.size(0), dim=0)
            decoder.set_incremental_state(incremental_state, "exits", buf)
        reference, step = buf["reference"], prev_output_tokens.size(1) - 1
        gold = reference[:, step] if step < reference.size(1) else reference.new_full((reference.size(0),), -1)
        return {"gold": gold.to(prev_output_tokens.device)}

    def halt(self, decoder, n, h, active, plan):
        logits = decoder.exit_logits(h, n)
        return logits.argmax(dim=-1) == plan["gold"].index_select(0, active), logits


class SequenceEstimatorPolicy(PlannedDepth):
    """Sequence-level estimators: one depth per source sentence, decided from the encoder output
    before the first step and kept (reordered with the beam) in the decoder's incremental state.

    With ``sequence_order`` "depth" (the default on the lean step) the generator decides the depths
    first and decodes the batch's sentences deepest first (:meth:`sort_batch`): every token of a
    sentence exits at the same block, so the rows that reach block n are then the batch's leading rows
    and the decoder runs each block on a slice of the batch, keeping keys/values only for those rows
    (``plan["prefix"]``; :meth:`ExitAwareDecoding.depth_prefix_step`)."""

    def __init__(self, threshold=None, sequence_order: Optional[str] = None, **kwargs):
        super().__init__(**kwargs)
        self.threshold = threshold
        self.sequence_order = sequence_order or SEQUENCE_ORDERS[0]
        self.sorted_depths: Optional[Tensor] = None  # per sentence, set by the generator for one batch

    @property
    def sorts_sentences(self) -> bool:
        return self.sequence_order == "depth" and self.decoder_step == "lean"

    def sentence_depths(self, decoder, encoder_out) -> Tensor:
        """The estimator's depth (1-based) for each row of ``encoder_out`` at this policy's threshold."""
        enc = encoder_out["encoder_out"][0]
        mask = encoder_out["encoder_padding_mask"][0] if len(encoder_out["encoder_padding_mask"]) else None
        log_q = decoder.depth_estimator.log_q_from(encoder_out=enc, encoder_padding_mask=mask)
        return decide_by_cumulative(log_q, self.threshold) + 1

    def sort_batch(self, decoder, encoder_out) -> Tensor:
        """Before a batch: each sentence's depth, and the order that puts the deepest first (stable,
        so sentences of equal depth keep fairseq's order). Keeps the sorted depths for ``plan_step``."""
        depths = self.sentence_depths(decoder, encoder_out)
        order = torch.sort(depths, descending=True, stable=True).indices
        self.sorted_depths = depths.index_select(0, order)
        return order

    def plan_step(self, decoder, encoder_out, incremental_state, prev_output_tokens):
        buf = decoder.get_incremental_state(incremental_state, "exits") or {}
        if buf.get("planned") is None:
            buf = dict(buf)
            if self.sorted_depths is not None:  # decided before the batch (one row per sentence), per beam row now
                rows = prev_output_tokens.size(0)
                buf["planned"] = self.sorted_depths.repeat_interleave(rows // self.sorted_depths.numel())
            else:
                buf["planned"] = self.sentence_depths(decoder, encoder_out)
            decoder.set_incremental_state(incremental_state, "exits", buf)
        return {"depth": buf["planned"], "prefix": self.sorted_depths is not None}


class TokenDepthPolicy(ExitPolicy):
    """Token-multinomial / token-Poisson-binomial: the depth of each token is decided from its
    block-1 state (every token runs block 1, §3.2)."""

    def __init__(self, threshold=None, **kwargs):
        super().__init__(**kwargs)
        self.threshold = threshold

    def halt(self, decoder, n, h, active, plan):
        if n == 1:
            log_q = decoder.depth_estimator.log_q_from(block_states=[h])
            plan["depth"] = decide_by_cumulative(log_q, self.threshold) + 1  # |active| == B at block 1
            return plan["depth"] == 1, None
        return plan["depth"].index_select(0, active) == n, None


class GeometricPolicy(ExitPolicy):
    """Tok-geometric-like: halt at the first block n with χ_n > τ_n (§3.2; default τ = 0.5)."""

    def __init__(self, thresholds: Sequence[float], **kwargs):
        super().__init__(**kwargs)
        self.thresholds = list(thresholds)

    def halt(self, decoder, n, h, active, plan):
        return geometric_halts(decoder.depth_estimator.halting_prob(h, n - 1), self.thresholds[n - 1]), None


class ConfidencePolicy(ExitPolicy):
    """Confidence thresholding (§3, the paper's baseline): exit at block n when the top probability
    of C_n exceeds τ_n; the logits computed for the test are reused as the output."""

    def __init__(self, thresholds: Sequence[float], **kwargs):
        super().__init__(**kwargs)
        self.thresholds = list(thresholds)

    def halt(self, decoder, n, h, active, plan):
        logits = decoder.exit_logits(h, n)
        top = torch.softmax(logits.float(), dim=-1).max(dim=-1).values  # float32 also under fp16
        return top > self.thresholds[n - 1], logits


def build_exit_policy(decoder, strategy: str = "auto", threshold=None, fixed_exit: Optional[int] = None,
                      stats: Optional[ExitStats] = None, gather_ratio: Optional[float] = None,
                      kv_mode: Optional[str] = None, decoder_step: Optional[str] = None,
                      sequence_order: Optional[str] = None) -> Optional[ExitPolicy]:
    """The policy for the generation flags, or None for full-depth decoding through fairseq's own
    decoder (``--decoder-step fairseq``). Raises ConfigError naming the flag on any setting the model
    cannot serve."""
    if not hasattr(decoder, "exit_logits"):
        raise ConfigError("--exit-threshold/--exit-strategy/--fixed-exit need a checkpoint of --arch "
                          f"adaptive_transformer; this one has a {type(decoder).__name__}")
    if gather_ratio is not None and not 0.0 <= gather_ratio <= 1.0:
        raise ConfigError(f"--exit-gather-ratio must be in [0, 1], got {gather_ratio}")
    if kv_mode is not None and kv_mode not in KV_MODES:
        raise ConfigError(f"--exit-kv must be one of {', '.join(KV_MODES)}, got {kv_mode!r}")
    if sequence_order is not None and sequence_order not in SEQUENCE_ORDERS:
        raise ConfigError(f"--exit-sequence-order must be one of {', '.join(SEQUENCE_ORDERS)}, got {sequence_order!r}")
    decoder_step = lean_or_fallback(decoder, decoder_step)
    try:
        return _policy_for_flags(decoder, strategy, threshold, fixed_exit, stats, gather_ratio, kv_mode, decoder_step,
                                 sequence_order)
    except ConfigError:
        raise
    except ValueError as err:  # threshold parsing: the message already names --exit-threshold
        raise ConfigError(str(err)) from None


def lean_or_fallback(decoder, decoder_step: Optional[str]) -> str:
    """``--decoder-step``, validated; a model whose layers the lean step does not mirror decodes
    through fairseq's layers (one log line says why)."""
    decoder_step = decoder_step or DECODER_STEPS[0]
    if decoder_step not in DECODER_STEPS:
        raise ConfigError(f"--decoder-step must be one of {', '.join(DECODER_STEPS)}, got {decoder_step!r}")
    if decoder_step == "lean":
        reason = next(filter(None, (lean_step_unsupported(layer) for layer in decoder.layers)), None)
        if reason is not None:
            logger.warning("--decoder-step lean does not support %s: decoding with --decoder-step fairseq", reason)
            return "fairseq"
    return decoder_step


def _policy_for_flags(decoder, strategy, threshold, fixed_exit, stats, gather_ratio, kv_mode, decoder_step,
                      sequence_order=None):
    n_exits = decoder.num_layers
    estimator = decoder.depth_estimator
    kwargs = {"stats": stats, "gather_ratio": gather_ratio, "kv_mode": kv_mode, "decoder_step": decoder_step}
    if strategy not in STRATEGIES:
        raise ConfigError(f"--exit-strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if fixed_exit is not None and strategy not in ("auto", "fixed"):
        raise ConfigError(f"--fixed-exit cannot be combined with --exit-strategy {strategy}")
    if strategy == "auto":
        if fixed_exit is not None:
            strategy = "fixed"
        elif threshold is None:
            strategy = "full"
        elif estimator is not None:
            strategy = "estimator"
        elif getattr(decoder, "depth_estimator_name", "none") == "confidence":
            strategy = "confidence"
        else:
            raise ConfigError("--exit-threshold needs a checkpoint with a trained depth estimator "
                             "(this one has none); use --exit-strategy confidence or --fixed-exit N")
    if strategy == "full":
        return None if decoder_step == "fairseq" else FullDepth(**kwargs)
    if strategy == "fixed":
        if fixed_exit is None:
            raise ConfigError("--exit-strategy fixed needs --fixed-exit N")
        if not 1 <= fixed_exit <= n_exits:
            raise ConfigError(f"--fixed-exit must be in 1..{n_exits} for this checkpoint, got {fixed_exit}")
        return FixedExit(fixed_exit, **kwargs)
    if strategy == "oracle":
        if threshold is not None:
            raise ConfigError("--exit-strategy oracle decides from the references: drop --exit-threshold")
        return ReferenceOracle(**kwargs)
    if strategy == "uniform":
        if threshold is not None:
            raise ConfigError("--exit-strategy uniform draws every exit at random: drop --exit-threshold")
        return UniformExits(**kwargs)
    if strategy == "confidence":
        if threshold is None:
            raise ConfigError("--exit-strategy confidence needs --exit-threshold T (T in [0, 1], one value "
                             f"or {n_exits - 1} per-block values)")
        return ConfidencePolicy(thresholds_from_arg(threshold, n_exits), **kwargs)
    if estimator is None:
        raise ConfigError("--exit-strategy estimator needs a checkpoint trained with --depth-estimator "
                         "(this one has none); use --exit-strategy confidence or --fixed-exit N")
    if estimator.inputs == "blocks":
        return GeometricPolicy(estimator.thresholds(threshold), **kwargs)
    value = single_threshold(threshold, estimator.name)
    if estimator.level == "sequence":
        return SequenceEstimatorPolicy(value, sequence_order=sequence_order, **kwargs)
    return TokenDepthPolicy(value, **kwargs)
