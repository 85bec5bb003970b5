"""Depth estimators q(n): which decoder exit to use (Elbayad et al., 2020, §3).

Every estimator outputs log-probabilities over the N exits (last dim N, shallowest first). At inference
(``fairseq_dat.exit_policy``) two decision rules turn them into exits, and the generator calls exactly
these: ``decide_by_cumulative`` (multinomial and Poisson-binomial estimators: 0-based exit index i means
"run blocks 1..i+1 and emit with C_{i+1}") and ``geometric_halts`` (Tok-geometric-like, after each block).

==========================  =========  ==================  ========================================
registry name               level      input               paper
==========================  =========  ==================  ========================================
sequence                    sequence   encoder output      Seq-multinomial, §3.1
token-multinomial           token      h^1 (after block 1) Tok-multinomial, §3.2
token-geometric             token      h^1 .. h^{N-1}      Tok-geometric-like, §3.2
sequence-poisson-binomial   sequence   encoder output      not in the final paper (defined below)
token-poisson-binomial      token      h^1                 not in the final paper (defined below)
==========================  =========  ==================  ========================================

Common interface (class attributes ``level`` and ``inputs``; constructor
``(input_dim, num_exits, separate_halting=False)``):

* ``log_q(...)``: class-specific inputs, returns (..., N) log-probabilities (exp sums to 1).
* ``log_q_from(encoder_out=None, encoder_padding_mask=None, block_states=None)``: the same, picking the
  inputs the estimator needs, so a criterion or generator can treat all estimators alike.
  ``block_states`` are the decoder states after blocks 1, 2, ... (fairseq's ``inner_states[1:]``);
  token-level outputs keep the states' layout,
  so time-major (T, B, C) states give (T, B, N): transpose before comparing with (B, T) oracles.

``input_dim`` is the encoder output dim for sequence-level estimators and the decoder dim for
token-level ones. All probabilities are computed in float32 (safe under ``--fp16``).
"""

from numbers import Real
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Threshold = Union[None, float, str, Sequence[float]]

THRESHOLD_FLAG = "--exit-threshold"


# ----------------------------------------------------------------------------------------------
# thresholds
# ----------------------------------------------------------------------------------------------


def _parse_threshold_values(threshold) -> List[float]:
    """Flatten a float, a "0.5,0.7" string or a sequence into a list of floats (unchecked)."""
    if isinstance(threshold, str):
        parts = [part for part in threshold.replace(",", " ").split()]
        try:
            return [float(part) for part in parts]
        except ValueError:
            raise ValueError(
                f"{THRESHOLD_FLAG} must be numbers in [0, 1] separated by commas, got {threshold!r}"
            ) from None
    if isinstance(threshold, Tensor):
        threshold = threshold.tolist()
    if isinstance(threshold, Real) and not isinstance(threshold, bool):
        return [float(threshold)]
    if isinstance(threshold, Sequence) and all(
        isinstance(value, Real) and not isinstance(value, bool) for value in threshold
    ):
        return [float(value) for value in threshold]
    raise ValueError(f"{THRESHOLD_FLAG} must be a number in [0, 1] or a list of them, got {threshold!r}")


def thresholds_from_arg(threshold: Threshold, num_exits: int) -> Optional[Tuple[float, ...]]:
    """Validate ``--exit-threshold`` and return one threshold per halting decision, τ_1..τ_{N−1}.

    Accepts None (estimator default, returned as None), one number (used for every block), a list
    of 1 or N−1 numbers, or the same as a comma/space-separated string. Every value must lie in [0, 1].

    Raises:
        ValueError naming ``--exit-threshold`` and the valid range on NaN, out-of-range values, a wrong
        count or non-numbers.
    """
    if threshold is None:
        return None
    values = _parse_threshold_values(threshold)
    for value in values:
        if not 0.0 <= value <= 1.0:  # also False for NaN
            raise ValueError(f"{THRESHOLD_FLAG} values must be in [0, 1], got {value}")
    num_decisions = num_exits - 1
    if len(values) == 1:
        return tuple(values) * num_decisions
    if len(values) != num_decisions:
        raise ValueError(
            f"{THRESHOLD_FLAG} takes 1 value or N-1 = {num_decisions} values (one per block "
            f"1..{num_decisions}), got {len(values)}: {values}"
        )
    return tuple(values)


def single_threshold(threshold: Threshold, estimator: str) -> Optional[float]:
    """One validated threshold in [0, 1] (or None) for estimators that make a single decision."""
    if threshold is None:
        return None
    values = _parse_threshold_values(threshold)
    if len(set(values)) != 1:
        raise ValueError(f"{THRESHOLD_FLAG} takes a single value with the {estimator} estimator, got {values}")
    return thresholds_from_arg(values[0], num_exits=2)[0]


# ----------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------


def _linear(input_dim: int, output_dim: int) -> nn.Linear:
    """Xavier-initialised linear layer with zero bias, like fairseq's transformer projections."""
    layer = nn.Linear(input_dim, output_dim)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def masked_mean_over_source(encoder_out: Tensor, encoder_padding_mask: Optional[Tensor]) -> Tensor:
    """s̄: mean of the encoder outputs over real source positions (paper §3.1, padding excluded).

    Args:
        encoder_out: (S, B, C) encoder states (fairseq layout).
        encoder_padding_mask: (B, S) bool, True on padding, or None.

    Returns:
        (B, C) float32.
    """
    states = encoder_out.float()  # S x B x C
    if encoder_padding_mask is None:
        return states.mean(dim=0)
    keep = (~encoder_padding_mask).t().unsqueeze(-1).to(states.dtype)  # S x B x 1
    total = (states * keep).sum(dim=0)  # B x C
    count = keep.sum(dim=0).clamp(min=1.0)  # B x 1
    return total / count


def decide_by_cumulative(log_q: Tensor, threshold: Optional[float]) -> Tensor:
    """First exit whose cumulative probability q(1) + … + q(n) reaches ``threshold``.

    ``threshold`` is a quantile of the depth distribution: higher means deeper. None takes the most
    likely exit instead (argmax, the paper's rule for the multinomial estimators; ties → shallower).
    Returns (...) long 0-based exits.
    """
    if threshold is None:
        return log_q.argmax(dim=-1)
    cumulative = log_q.float().exp().cumsum(dim=-1)  # ... x N
    below = (cumulative < threshold).sum(dim=-1)
    return below.clamp(max=log_q.size(-1) - 1)  # rounding may leave the total just under 1


def geometric_halts(halting_prob: Tensor, threshold: float) -> Tensor:
    """The Tok-geometric-like inference rule (§3.2), after block n: halt when χ^n > τ_n (strictly, so
    τ = 1 never halts). (...) halting probabilities → (...) bool."""
    return halting_prob > threshold


def poisson_binomial_log_pmf(logits: Tensor) -> Tensor:
    """log P(K = k), k = 0..M, for K = Σ_m B_m with independent B_m ~ Bernoulli(sigmoid(logits_m)).

    Exact O(M²) recursion on the number of successes among the first m trials, in log space:
    P_m(k) = P_{m−1}(k)(1 − p_m) + P_{m−1}(k − 1) p_m. Only finite terms enter ``logaddexp``, so
    values and gradients stay finite for any finite logits.

    Args:
        logits: (..., M).

    Returns:
        (..., M + 1) float32.
    """
    log_success = F.logsigmoid(logits.float())  # ... x M, log p_m
    log_failure = F.logsigmoid(-logits.float())  # ... x M, log (1 - p_m)
    log_pmf = torch.zeros_like(log_success[..., :1])  # ... x 1: zero trials, P(K = 0) = 1
    for m in range(logits.size(-1)):
        stay = log_pmf + log_failure[..., m : m + 1]  # k successes, trial m fails
        move = log_pmf + log_success[..., m : m + 1]  # k - 1 successes, trial m succeeds
        middle = torch.logaddexp(stay[..., 1:], move[..., :-1])
        log_pmf = torch.cat([stay[..., :1], middle, move[..., -1:]], dim=-1)
    return log_pmf


class DepthEstimator(nn.Module):
    """Base class: validates ``num_exits`` and maps generic model inputs to ``log_q``."""

    level: str = ""  # "sequence" (one exit per sentence) or "token" (one exit per target token)
    inputs: str = ""  # "encoder", "first_block" (h^1) or "blocks" (h^1..h^{N-1})
    name: str = ""

    def __init__(self, input_dim: int, num_exits: int, separate_halting: bool = False):
        super().__init__()
        if num_exits < 2:
            raise ValueError(f"a depth estimator needs at least 2 exits (decoder layers), got {num_exits}")
        self.input_dim = input_dim
        self.num_exits = num_exits
        self.separate_halting = separate_halting

    def _select_inputs(self, encoder_out, encoder_padding_mask, block_states) -> tuple:
        if self.inputs == "encoder":
            if encoder_out is None:
                raise ValueError(f"the {self.name} depth estimator needs the encoder output")
            return (encoder_out, encoder_padding_mask)
        needed = 1 if self.inputs == "first_block" else self.num_exits - 1
        if block_states is None or len(block_states) < needed:
            raise ValueError(f"the {self.name} depth estimator needs the states after blocks 1..{needed}")
        if self.inputs == "first_block":
            return (block_states[0],)
        return (list(block_states[:needed]),)

    def log_q_from(
        self,
        encoder_out: Optional[Tensor] = None,
        encoder_padding_mask: Optional[Tensor] = None,
        block_states: Optional[Sequence[Tensor]] = None,
    ) -> Tensor:
        """``log_q`` on whichever of the model's tensors this estimator reads."""
        return self.log_q(*self._select_inputs(encoder_out, encoder_padding_mask, block_states))

    def forward(self, *args, **kwargs) -> Tensor:
        return self.log_q(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# multinomial estimators
# ----------------------------------------------------------------------------------------------


class SequenceMultinomial(DepthEstimator):
    """Seq-multinomial (paper §3.1): q(n | x) = softmax(W_h s̄ + b_h), s̄ = mean source encoding.

    One exit for the whole output sentence. Padding is masked out of the mean, so a sentence's depth
    does not depend on how much it was padded in the batch, and beam rows (copies of the same
    encoder output) get the same depth.
    """

    level = "sequence"
    inputs = "encoder"
    name = "sequence"

    def __init__(self, input_dim: int, num_exits: int, separate_halting: bool = False):
        super().__init__(input_dim, num_exits, separate_halting)  # separate_halting: unused
        self.proj = _linear(input_dim, num_exits)

    def log_q(self, encoder_out: Tensor, encoder_padding_mask: Optional[Tensor] = None) -> Tensor:
        """(S, B, C) encoder states, (B, S) padding mask → (B, N) log q."""
        pooled = masked_mean_over_source(encoder_out, encoder_padding_mask)  # B x C
        logits = self.proj(pooled.to(self.proj.weight.dtype))  # B x N
        return F.log_softmax(logits.float(), dim=-1)


class TokenMultinomial(DepthEstimator):
    """Tok-multinomial (paper §3.2): q_t(n | x, y_<t) = softmax(W_h h_t^1 + b_h).

    Computed from the state after block 1, so every token runs at least one block.
    """

    level = "token"
    inputs = "first_block"
    name = "token-multinomial"

    def __init__(self, input_dim: int, num_exits: int, separate_halting: bool = False):
        super().__init__(input_dim, num_exits, separate_halting)  # separate_halting: unused
        self.proj = _linear(input_dim, num_exits)

    def log_q(self, first_block_state: Tensor) -> Tensor:
        """(..., C) state h^1 → (..., N) log q."""
        return F.log_softmax(self.proj(first_block_state).float(), dim=-1)


# ----------------------------------------------------------------------------------------------
# geometric-like estimator
# ----------------------------------------------------------------------------------------------


class TokenGeometric(DepthEstimator):
    """Tok-geometric-like (paper §3.2): a halting probability after each block but the last.

    χ_t^n = sigmoid(w_h · h_t^n + b_h) for n = 1..N−1, and
    q_t(n) = χ_t^n Π_{n'<n} (1 − χ_t^{n'}) for n < N,   q_t(N) = Π_{n'<N} (1 − χ_t^{n'}),
    computed in log space with logsigmoid (log χ = logsigmoid(z), log(1 − χ) = logsigmoid(−z)).

    Inference (paper): exit at the first block n with χ_t^n > τ_n, else at N; τ_n = 0.5 by default.
    The generator calls ``halting_prob`` and ``geometric_halts`` after each block it runs.

    ``separate_halting``: False (default) shares one Linear(C, 1) across blocks, as the paper's formula
    writes a single (w_h, b_h) for the geometric-like estimator (§3.2). True gives each block n its own
    Linear(C, 1), a variant the paper does not report.
    """

    level = "token"
    inputs = "blocks"
    name = "token-geometric"
    default_threshold = 0.5

    def __init__(self, input_dim: int, num_exits: int, separate_halting: bool = False):
        super().__init__(input_dim, num_exits, separate_halting)
        num_halters = num_exits - 1 if separate_halting else 1
        self.halting = nn.ModuleList([_linear(input_dim, 1) for _ in range(num_halters)])

    def halting_logit(self, state: Tensor, exit_idx: int) -> Tensor:
        """z with χ = sigmoid(z), for the (..., C) state after block ``exit_idx`` + 1 → (...) float32."""
        if not 0 <= exit_idx < self.num_exits - 1:
            raise IndexError(f"halting is decided after blocks 1..{self.num_exits - 1}, got exit index {exit_idx}")
        halter = self.halting[exit_idx if self.separate_halting else 0]
        return halter(state).squeeze(-1).float()

    def halting_prob(self, state: Tensor, exit_idx: int) -> Tensor:
        """χ^n, n = exit_idx + 1 (0-based ``exit_idx`` like every exit in this package) → (...)."""
        return torch.sigmoid(self.halting_logit(state, exit_idx))

    def thresholds(self, threshold: Threshold) -> Tuple[float, ...]:
        """τ_1..τ_{N−1}; None gives the paper's default 0.5 for every block."""
        validated = thresholds_from_arg(threshold, self.num_exits)
        return validated if validated is not None else (self.default_threshold,) * (self.num_exits - 1)

    def _stack_logits(self, states: Sequence[Tensor]) -> Tensor:
        if len(states) != self.num_exits - 1:
            raise ValueError(
                f"{self.name} takes the states after blocks 1..{self.num_exits - 1}, got {len(states)} states"
            )
        return torch.stack([self.halting_logit(h, i) for i, h in enumerate(states)], dim=-1)  # ... x N-1

    def log_q(self, states: Sequence[Tensor]) -> Tensor:
        """N−1 states (..., C) after blocks 1..N−1 → (..., N) log q."""
        logits = self._stack_logits(states)  # ... x N-1
        log_halt = F.logsigmoid(logits)  # log χ^n
        log_go_on = F.logsigmoid(-logits)  # log (1 - χ^n)
        log_reach = torch.cumsum(log_go_on, dim=-1)  # log Π_{n' <= n} (1 - χ^{n'})
        log_reach_before = F.pad(log_reach[..., :-1], (1, 0))  # log Π_{n' < n}, 0 for n = 1
        return torch.cat([log_halt + log_reach_before, log_reach[..., -1:]], dim=-1)


# ----------------------------------------------------------------------------------------------
# Poisson-binomial estimators (not in the final paper)
# ----------------------------------------------------------------------------------------------


class _PoissonBinomialMixin:
    """Depth D = 1 + Σ_{n=1}^{N−1} B_n with independent B_n ~ Bernoulli(p_n), p = sigmoid(Linear(C, N−1)(x)).

    Each p_n reads as "block n+1 is needed" and all N−1 are predicted at once from one input, so q is
    the Poisson-binomial law of the number of extra blocks, shifted to 1..N, computed exactly by
    ``poisson_binomial_log_pmf``. Unlike the geometric halter the B_n are not ordered: any N−1
    choices with the same count give the same depth. Inference uses the same rule as the multinomial
    estimators: argmax q (mode) by default, or the first n with cumulative q ≥ threshold.
    """

    def _build_projection(self, input_dim: int, num_exits: int) -> None:
        self.proj = _linear(input_dim, num_exits - 1)

    def _log_q_from_vector(self, vector: Tensor) -> Tensor:
        logits = self.proj(vector.to(self.proj.weight.dtype))  # ... x N-1
        return poisson_binomial_log_pmf(logits)  # ... x N


class SequencePoissonBinomial(_PoissonBinomialMixin, DepthEstimator):
    """Poisson-binomial depth (see ``_PoissonBinomialMixin``) from the masked mean source encoding s̄.

    One exit per sentence, input as for ``sequence`` (Seq-multinomial).
    """

    level = "sequence"
    inputs = "encoder"
    name = "sequence-poisson-binomial"

    def __init__(self, input_dim: int, num_exits: int, separate_halting: bool = False):
        super().__init__(input_dim, num_exits, separate_halting)  # separate_halting: unused
        self._build_projection(input_dim, num_exits)

    def log_q(self, encoder_out: Tensor, encoder_padding_mask: Optional[Tensor] = None) -> Tensor:
        """(S, B, C) encoder states, (B, S) padding mask → (B, N) log q."""
        return self._log_q_from_vector(masked_mean_over_source(encoder_out, encoder_padding_mask))


class TokenPoissonBinomial(_PoissonBinomialMixin, DepthEstimator):
    """Poisson-binomial depth (see ``_PoissonBinomialMixin``) from the block-1 state h_t^1.

    One exit per token, input as for ``token-multinomial``.
    """

    level = "token"
    inputs = "first_block"
    name = "token-poisson-binomial"

    def __init__(self, input_dim: int, num_exits: int, separate_halting: bool = False):
        super().__init__(input_dim, num_exits, separate_halting)  # separate_halting: unused
        self._build_projection(input_dim, num_exits)

    def log_q(self, first_block_state: Tensor) -> Tensor:
        """(..., C) state h^1 → (..., N) log q."""
        return self._log_q_from_vector(first_block_state)


DEPTH_ESTIMATORS = {
    cls.name: cls
    for cls in (SequenceMultinomial, TokenMultinomial, TokenGeometric, SequencePoissonBinomial, TokenPoissonBinomial)
}


def build_depth_estimator(name: str, input_dim: int, num_exits: int, separate_halting: bool = False) -> DepthEstimator:
    """Instantiate ``DEPTH_ESTIMATORS[name]``; ValueError listing the choices for an unknown name."""
    if name not in DEPTH_ESTIMATORS:
        raise ValueError(f"unknown depth estimator {name!r}; choose from {sorted(DEPTH_ESTIMATORS)}")
    return DEPTH_ESTIMATORS[name](input_dim, num_exits, separate_halting=separate_halting)


# ----------------------------------------------------------------------------------------------
# training loss and accuracy
# ----------------------------------------------------------------------------------------------


def _check_oracle_shape(log_q: Tensor, oracle_idx: Tensor) -> None:
    if log_q.shape[:-1] != oracle_idx.shape:
        raise ValueError(
            f"log_q {tuple(log_q.shape)} does not match oracle {tuple(oracle_idx.shape)}: expected "
            "log_q = oracle shape + (N,); token-level estimators on time-major states give (T, B, N), "
            "transpose them to (B, T, N)"
        )


def _valid(oracle_idx: Tensor, mask: Optional[Tensor]) -> Tensor:
    return oracle_idx.ge(0) if mask is None else mask & oracle_idx.ge(0)


def estimator_loss(log_q: Tensor, oracle_idx: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """L_exit = Σ H(δ_{q*}, q) = −Σ log q(q*) over valid tokens or sentences (paper §3), summed.

    fairseq criteria sum losses and divide by ``sample_size`` later, so no mean is taken here.

    Args:
        log_q: (..., N) estimator log-probabilities.
        oracle_idx: (...) long 0-based oracle exits; negative entries (``IGNORE_EXIT``) are ignored.
        mask: optional (...) bool, True where the oracle counts (e.g. ``target.ne(pad)``).

    Returns:
        scalar float32 loss.
    """
    _check_oracle_shape(log_q, oracle_idx)
    valid = _valid(oracle_idx, mask)
    index = oracle_idx.clamp(min=0).unsqueeze(-1)  # ... x 1, padding points at exit 0, then masked
    log_likelihood = log_q.float().gather(-1, index).squeeze(-1)
    return -(log_likelihood * valid).sum()


def estimator_correct_count(log_q: Tensor, oracle_idx: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Number of valid entries where argmax q equals the oracle exit (scalar long)."""
    _check_oracle_shape(log_q, oracle_idx)
    valid = _valid(oracle_idx, mask)
    return (log_q.argmax(dim=-1).eq(oracle_idx) & valid).sum()
