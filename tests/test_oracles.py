"""Oracle exits (paper §3, Eq. 12-17) on hand-computed examples."""

import math

import pytest
import torch

from fairseq_dat.oracles import (
    IGNORE_EXIT,
    correctness_scores,
    exit_oracle,
    likelihood_scores,
    sequence_oracle,
    smooth_over_positions,
    token_oracle,
)

PAD = 1


def scores_of(*per_token):
    """One sentence: per_token[t] = [score at exit 1, ..., exit N] → (1, T, N), mask (1, T)."""
    scores = torch.tensor([per_token], dtype=torch.float32)
    return scores, torch.ones(scores.shape[:2], dtype=torch.bool)


# --------------------------------------------------------------------------- smoothing


def test_smoothing_sigma_one_matches_hand_computation():
    # exit 1 scores (1, 0, 0), exit 2 scores (0, 0.2, 0) over 3 tokens; κ = exp(-d²): 1, e^-1, e^-4
    scores, mask = scores_of([1.0, 0.0], [0.0, 0.2], [0.0, 0.0])
    smoothed = smooth_over_positions(scores, mask, sigma=1.0)
    expected = torch.tensor(
        [[[1.0, 0.2 * math.exp(-1)], [math.exp(-1), 0.2], [math.exp(-4), 0.2 * math.exp(-1)]]]
    )
    torch.testing.assert_close(smoothed, expected)


def test_smoothing_width_changes_the_token_oracle():
    scores, mask = scores_of([1.0, 0.0], [0.0, 0.2], [0.0, 0.0])
    # local: token 1 prefers exit 2 and token 2 ties (→ exit 1). Smoothed with σ=1 (values above):
    # token 1: e^-1 ≈ 0.37 > 0.2 → exit 1; token 2: e^-4 ≈ 0.018 < 0.2·e^-1 ≈ 0.074 → exit 2
    assert token_oracle(scores, mask, lam=0.0, sigma=0.0).tolist() == [[0, 1, 0]]
    assert token_oracle(scores, mask, lam=0.0, sigma=1.0).tolist() == [[0, 0, 1]]


@pytest.mark.parametrize("sigma", [0.0, None])
def test_zero_sigma_is_identity(sigma):
    torch.manual_seed(0)
    scores = torch.randn(2, 5, 3)
    mask = torch.ones(2, 5, dtype=torch.bool)
    torch.testing.assert_close(smooth_over_positions(scores, mask, sigma), scores)


def test_negative_sigma_rejected():
    scores, mask = scores_of([0.0, 1.0])
    with pytest.raises(ValueError, match="sigma"):
        smooth_over_positions(scores, mask, sigma=-1.0)


# --------------------------------------------------------------------------- token oracle


def test_depth_penalty_lambda_moves_the_token_oracle_shallower():
    scores, mask = scores_of([-3.0, -2.0, -1.9, -1.85])
    assert token_oracle(scores, mask, lam=0.0).item() == 3
    assert token_oracle(scores, mask, lam=0.08).item() == 2  # -3.08, -2.16, -2.14, -2.17
    assert token_oracle(scores, mask, lam=0.5).item() == 1  # -3.5, -3.0, -3.4, -3.85


def test_ties_go_to_the_shallower_exit():
    scores, mask = scores_of([0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0])
    assert token_oracle(scores, mask, lam=0.0).tolist() == [[1, 0, 3]]


def test_sequence_tie_goes_to_the_shallower_exit():
    scores, mask = scores_of([1.0, 1.0, 1.0], [0.0, 1.0, 1.0])  # totals 1, 2, 2
    assert sequence_oracle(scores, mask, lam=0.0).tolist() == [1]


def test_padding_is_ignored_by_the_token_oracle():
    torch.manual_seed(0)
    scores = torch.randn(1, 4, 3)
    mask = torch.ones(1, 4, dtype=torch.bool)
    garbage = 100 * torch.randn(1, 2, 3)  # padded positions hold huge scores
    padded_scores = torch.cat([scores, garbage], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 2, dtype=torch.bool)], dim=1)
    for sigma in (0.0, 2.0):
        unpadded = token_oracle(scores, mask, lam=0.1, sigma=sigma)
        padded = token_oracle(padded_scores, padded_mask, lam=0.1, sigma=sigma)
        assert padded[:, :4].tolist() == unpadded.tolist()
        assert padded[:, 4:].tolist() == [[IGNORE_EXIT, IGNORE_EXIT]]
        smoothed = smooth_over_positions(padded_scores, padded_mask, sigma)
        assert smoothed[:, 4:].abs().sum() == 0


def test_padding_is_ignored_by_the_sequence_oracle():
    torch.manual_seed(0)
    scores = torch.randn(1, 4, 3)
    mask = torch.ones(1, 4, dtype=torch.bool)
    padded_scores = torch.cat([scores, torch.tensor([[[0.0, 0.0, 100.0]] * 2])], dim=1)  # favours exit 3
    padded_mask = torch.cat([mask, torch.zeros(1, 2, dtype=torch.bool)], dim=1)
    assert sequence_oracle(padded_scores, padded_mask, 0.1).tolist() == sequence_oracle(scores, mask, 0.1).tolist()


# --------------------------------------------------------------------------- sequence oracle


def test_sequence_oracle_sums_over_the_sentence_then_penalises():
    # LL^n = (-5, -3, -2.5); λ=0 → exit 3; λ=1 → -6, -5, -5.5 → exit 2; λ=3 → -8, -9, -11.5 → exit 1
    scores, mask = scores_of([-3.0, -2.0, -1.5], [-2.0, -1.0, -1.0])
    assert sequence_oracle(scores, mask, lam=0.0).tolist() == [2]
    assert sequence_oracle(scores, mask, lam=1.0).tolist() == [1]
    assert sequence_oracle(scores, mask, lam=3.0).tolist() == [0]


def test_sequence_oracle_is_per_sentence():
    scores = torch.tensor([[[0.0, 1.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 0.0]]])  # B=2, T=2, N=2
    mask = torch.tensor([[True, True], [True, False]])
    assert sequence_oracle(scores, mask, lam=0.0).tolist() == [1, 0]


# --------------------------------------------------------------------------- score helpers


def per_exit_lprobs():
    """N=2 exits, B=1, T=3 (last is padding, where exit 2 predicts the pad token), V=4."""
    exit1 = torch.log_softmax(torch.tensor([[[5.0, 0, 0, 0], [0, 0, 5.0, 0], [0, 0, 0, 5.0]]]), dim=-1)
    exit2 = torch.log_softmax(torch.tensor([[[0, 0, 0, 5.0], [0, 0, 5.0, 0], [0, 5.0, 0, 0]]]), dim=-1)
    target = torch.tensor([[3, 2, PAD]])
    return [exit1.requires_grad_(), exit2.requires_grad_()], target


def test_likelihood_scores_gather_target_log_probs():
    lprobs, target = per_exit_lprobs()
    scores, mask = likelihood_scores(lprobs, target, PAD)
    assert scores.shape == (1, 3, 2) and not scores.requires_grad
    assert mask.tolist() == [[True, True, False]]
    torch.testing.assert_close(scores[0, 0], torch.stack([lprobs[0][0, 0, 3], lprobs[1][0, 0, 3]]).detach())
    assert scores[0, 2].tolist() == [0.0, 0.0]
    stacked, _ = likelihood_scores(torch.stack([lp.detach() for lp in lprobs]), target, PAD)
    torch.testing.assert_close(stacked, scores)


def test_correctness_scores_compare_argmax_with_target():
    lprobs, target = per_exit_lprobs()
    scores, mask = correctness_scores(lprobs, target, PAD)
    assert scores.tolist() == [[[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]]
    assert token_oracle(scores, mask, lam=0.0).tolist() == [[1, 0, IGNORE_EXIT]]


def test_likelihood_scores_floor_keeps_smoothing_finite():
    lprobs = [torch.full((1, 2, 3), float("-inf")), torch.zeros(1, 2, 3)]
    scores, mask = likelihood_scores(lprobs, torch.tensor([[0, 2]]), PAD)
    oracle = token_oracle(scores, mask, lam=0.0, sigma=1e-3)
    assert torch.isfinite(smooth_over_positions(scores, mask, 1e-3)).all()
    assert oracle.tolist() == [[1, 1]]


def test_exit_oracle_dispatch():
    lprobs, target = per_exit_lprobs()
    token, mask = exit_oracle(lprobs, target, PAD, score="correctness", level="token", lam=0.0)
    assert token.tolist() == [[1, 0, IGNORE_EXIT]]
    sequence, _ = exit_oracle(lprobs, target, PAD, score="likelihood", level="sequence", lam=0.0)
    assert sequence.shape == (1,)
    with pytest.raises(ValueError, match="oracle score"):
        exit_oracle(lprobs, target, PAD, score="bleu", level="token", lam=0.0)
    with pytest.raises(ValueError, match="oracle level"):
        exit_oracle(lprobs, target, PAD, score="likelihood", level="word", lam=0.0)
