"""Oracle exits for training the depth estimators (Elbayad et al., 2020, §3).

The estimators q(n) are trained by cross-entropy against a one-hot oracle q* (L_exit = Σ_t H(q*_t, q_t)).
The oracle picks, for every target token (token level) or every sentence (sequence level), the exit n
that maximises a per-exit score minus a depth penalty λ·n:

* likelihood score   LL_t^n = log p(y_t | h^n)                  (Eq. 12 sequence, Eq. 14-15 token)
* correctness score  C_t^n  = 1[argmax_y p(y | h^n) = y_t]       (Eq. 13 sequence, Eq. 16-17 token)

and, for token-level oracles, smooths the scores over neighbouring positions of the same sentence with
the RBF kernel κ(t, t') = exp(−|t − t'|² / σ) before the argmax (Eq. 14-17; σ → 0 is the local oracle).
Eq. 16 writes C_t^n inside the sum where C_{t'}^n is meant, and Eq. 17's argmax "over x" is over n.

Layout and the paper's off-by-one
---------------------------------
The paper indexes LL_t^n = log p(y_t | h_{t−1}^n): the score of token t comes from state t − 1. fairseq
shifts the *input* instead: decoder position t reads ``prev_output_tokens[t]`` (= ``target[t−1]``, EOS at
t = 0) and its state h_t scores ``target[t]``. So in this module

    scores[b, t, n] = score of target[b, t] under exit n + 1, computed from state h_t,

and the exit decision made on state h_t (q_t from h_t^1, or χ_t^n from h_t^n) concerns exactly the token
that state emits, ``target[b, t]``. **No shift is needed in fairseq's layout**: the oracle at [b, t]
supervises the estimator output at decoder position t of sentence b. Estimators that work on fairseq's
time-major states (T, B, C) must be transposed to (B, T, ·) before meeting these (B, T) oracles.

Conventions
-----------
* Oracles return 0-based exit *indices* i = 0..N−1, the class index of the estimators' N-way output
  (index i = block n = i + 1: "run blocks 1..n and emit with C_n"); the depth penalty uses the paper's
  1-based depth n = i + 1, i.e. λ·(i + 1). Everything user-facing (flags, logs, ``hypo["exits"]``)
  counts exits as 1-based blocks n.
* ``mask`` is a bool (B, T) tensor, True on real target tokens (``target.ne(pad)``).
* Ties (equal penalised scores) go to the **shallower** exit: it is cheaper and nothing says it is worse.
  This matters for correctness scores, which are integers and often tie (e.g. λ = 0).
* λ works on the scale of the scores. For the sequence-level likelihood oracle the score is a sum of
  log-probabilities over the sentence, so a fixed λ weighs less against long sentences than short ones;
  this is the paper's definition (Eq. 12) and is kept as is. The token-level smoothed sums (unnormalised,
  as in Eq. 14) likewise grow with σ, since more neighbours contribute.
* Oracles are targets: the score helpers return detached float32 tensors.
"""

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

#: Oracle value written at padded target positions of ``token_oracle``. Matches torch's default
#: ``ignore_index`` so a forgotten mask fails loudly in ``gather``/``index_select`` instead of training
#: the estimator towards exit 0.
IGNORE_EXIT = -100

#: Lower bound on likelihood scores: a −inf log-probability would turn the kernel's zero weights into
#: NaN (0 · −inf) and tie every exit; e^−10000 is zero in any precision anyway.
LOG_PROB_FLOOR = -1e4


def likelihood_scores(
    lprobs_per_exit: Sequence[Tensor], target: Tensor, pad: int
) -> Tuple[Tensor, Tensor]:
    """Per-token log-likelihood of the target under every exit, LL_t^n (paper Eq. 12, 14).

    Args:
        lprobs_per_exit: N log-probability tensors (B, T, V), one per exit, shallowest first
            (a list, or a stacked (N, B, T, V) tensor; only one (B, T) slice per exit is kept).
        target: (B, T) target token ids.
        pad: padding index of the target dictionary.

    Returns:
        scores (B, T, N) float32, detached, clamped to ``LOG_PROB_FLOOR``, 0 at padded positions;
        mask (B, T) bool, True on tokens.
    """
    mask = target.ne(pad)  # B x T
    index = target.unsqueeze(-1)  # B x T x 1
    per_exit = [lprobs.detach().gather(-1, index).squeeze(-1) for lprobs in lprobs_per_exit]
    scores = torch.stack(per_exit, dim=-1).float().clamp(min=LOG_PROB_FLOOR)  # B x T x N
    return scores.masked_fill(~mask.unsqueeze(-1), 0.0), mask


def correctness_scores(
    lprobs_per_exit: Sequence[Tensor], target: Tensor, pad: int
) -> Tuple[Tensor, Tensor]:
    """Per-token correctness of every exit, C_t^n = 1[argmax_y p(y | h^n) = y_t] (paper Eq. 13, 16).

    Args:
        lprobs_per_exit: N tensors (B, T, V) of log-probabilities or logits (argmax is the same).
        target: (B, T) target token ids.
        pad: padding index of the target dictionary.

    Returns:
        scores (B, T, N) float32 in {0, 1}, 0 at padded positions; mask (B, T) bool.
    """
    mask = target.ne(pad)  # B x T
    per_exit = [lprobs.detach().argmax(dim=-1).eq(target) for lprobs in lprobs_per_exit]
    scores = torch.stack(per_exit, dim=-1).float()  # B x T x N
    return scores.masked_fill(~mask.unsqueeze(-1), 0.0), mask


def rbf_kernel(length: int, sigma: float, device=None) -> Tensor:
    """κ(t, t') = exp(−|t − t'|² / σ) for t, t' in 0..length−1 (paper Eq. 14); (T, T) float32."""
    positions = torch.arange(length, device=device, dtype=torch.float32)
    squared_distance = (positions.unsqueeze(0) - positions.unsqueeze(1)) ** 2  # T x T
    return torch.exp(-squared_distance / sigma)


def smooth_over_positions(scores: Tensor, mask: Tensor, sigma: Optional[float]) -> Tensor:
    """S~_t^n = Σ_{t' valid} κ(t, t') S_{t'}^n within each sentence (paper Eq. 14 and 16).

    The sum is unnormalised, as in the paper. σ = 0 or None means no smoothing (the σ → 0 limit,
    κ(t, t') = 1[t = t']). Padded positions contribute nothing and their output is 0.

    Args:
        scores: (B, T, N) per-token scores.
        mask: (B, T) bool, True on real tokens.
        sigma: kernel width σ ≥ 0.

    Returns:
        (B, T, N) smoothed scores (float32).
    """
    if sigma is not None and (sigma != sigma or sigma < 0):
        raise ValueError(f"oracle smoothing width sigma must be >= 0, got {sigma}")
    valid = mask.unsqueeze(-1)  # B x T x 1
    scores = scores.float().masked_fill(~valid, 0.0)
    if not sigma:
        return scores
    kernel = rbf_kernel(scores.size(1), sigma, device=scores.device)  # T x T'
    smoothed = torch.einsum("ts,bsn->btn", kernel, scores)  # B x T x N
    return smoothed.masked_fill(~valid, 0.0)


def first_best_exit(penalised: Tensor) -> Tensor:
    """0-based index of the largest value along the last dim; ties go to the smallest index."""
    num_exits = penalised.size(-1)
    is_best = penalised == penalised.max(dim=-1, keepdim=True).values  # ... x N
    exit_ids = torch.arange(num_exits, device=penalised.device).expand_as(penalised)
    return exit_ids.masked_fill(~is_best, num_exits).min(dim=-1).values


def depth_penalty(num_exits: int, lam: float, device=None) -> Tensor:
    """λ·n for the 1-based depths n = 1..N; (N,) float32."""
    depths = torch.arange(1, num_exits + 1, device=device, dtype=torch.float32)
    return lam * depths


def token_oracle(scores: Tensor, mask: Tensor, lam: float, sigma: Optional[float] = 0.0) -> Tensor:
    """Token-level oracle q*_t = δ(argmax_n S~_t^n − λ·n) (paper Eq. 15 likelihood, Eq. 17 correctness).

    Args:
        scores: (B, T, N) per-token scores from ``likelihood_scores`` or ``correctness_scores``.
        mask: (B, T) bool, True on real tokens.
        lam: depth penalty λ (on the scale of the smoothed scores).
        sigma: RBF width σ of the positional smoothing; 0/None = local oracle.

    Returns:
        (B, T) long 0-based exit indices; ties go to the shallower exit; padded positions hold
        ``IGNORE_EXIT`` (-100).
    """
    smoothed = smooth_over_positions(scores, mask, sigma)  # B x T x N
    penalised = smoothed - depth_penalty(scores.size(-1), lam, device=scores.device)
    return first_best_exit(penalised).masked_fill(~mask, IGNORE_EXIT)  # B x T


def sequence_oracle(scores: Tensor, mask: Tensor, lam: float) -> Tensor:
    """Sequence-level oracle q* = δ(argmax_n Σ_t S_t^n − λ·n) (paper Eq. 12 likelihood, Eq. 13 correctness).

    With likelihood scores Σ_t S_t^n = LL^n, the sentence log-likelihood at exit n; with correctness
    scores it is C^n, the number of tokens exit n gets right. λ is not normalised by the length.

    Args:
        scores: (B, T, N) per-token scores.
        mask: (B, T) bool, True on real tokens.
        lam: depth penalty λ.

    Returns:
        (B,) long 0-based exit indices; ties go to the shallower exit.
    """
    totals = scores.float().masked_fill(~mask.unsqueeze(-1), 0.0).sum(dim=1)  # B x N
    penalised = totals - depth_penalty(scores.size(-1), lam, device=scores.device)
    return first_best_exit(penalised)  # B


ORACLE_SCORES = {"likelihood": likelihood_scores, "correctness": correctness_scores}


def exit_oracle(
    lprobs_per_exit: Sequence[Tensor],
    target: Tensor,
    pad: int,
    *,
    score: str,
    level: str,
    lam: float,
    sigma: Optional[float] = 0.0,
) -> Tuple[Tensor, Tensor]:
    """Oracle exits in one call, for a criterion.

    Args:
        lprobs_per_exit: N tensors (B, T, V), shallowest exit first.
        target: (B, T) target ids; pad: its padding index.
        score: "likelihood" (LL oracle) or "correctness" (C oracle).
        level: "token" (returns (B, T), ``IGNORE_EXIT`` at padding) or "sequence" (returns (B,)).
        lam: depth penalty λ; sigma: smoothing width σ (token level only).

    Returns:
        oracle exit indices and the (B, T) token mask.
    """
    if score not in ORACLE_SCORES:
        raise ValueError(f"unknown oracle score {score!r}; expected one of {sorted(ORACLE_SCORES)}")
    scores, mask = ORACLE_SCORES[score](lprobs_per_exit, target, pad)
    if level == "token":
        return token_oracle(scores, mask, lam, sigma), mask
    if level == "sequence":
        return sequence_oracle(scores, mask, lam), mask
    raise ValueError(f"unknown oracle level {level!r}; expected 'token' or 'sequence'")
