"""Depth estimators q(n) (paper §3): normalisation, closed forms, decisions, loss, thresholds."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fairseq_dat.modules.depth_estimators import (
    DEPTH_ESTIMATORS,
    SequenceMultinomial,
    TokenGeometric,
    TokenPoissonBinomial,
    build_depth_estimator,
    decide_by_cumulative,
    estimator_correct_count,
    estimator_loss,
    geometric_halts,
    poisson_binomial_log_pmf,
    single_threshold,
    thresholds_from_arg,
)
from fairseq_dat.oracles import IGNORE_EXIT

DIM, EXITS, SRC, TGT, BSZ = 8, 4, 5, 3, 2


def model_inputs(scale=1.0, seed=0):
    """Encoder output (S, B, C), padding mask (B, S), decoder states after blocks 1..N (T, B, C)."""
    generator = torch.Generator().manual_seed(seed)
    encoder_out = scale * torch.randn(SRC, BSZ, DIM, generator=generator)
    padding_mask = torch.zeros(BSZ, SRC, dtype=torch.bool)
    padding_mask[1, -2:] = True
    block_states = [scale * torch.randn(TGT, BSZ, DIM, generator=generator) for _ in range(EXITS)]
    return encoder_out, padding_mask, block_states


def all_estimators():
    torch.manual_seed(0)
    estimators = [cls(DIM, EXITS) for cls in DEPTH_ESTIMATORS.values()]
    return estimators + [TokenGeometric(DIM, EXITS, separate_halting=True)]


def estimator_id(estimator):
    return estimator.name + ("-separate" if estimator.separate_halting else "")


ESTIMATORS = all_estimators()


def expected_shape(estimator):
    return (BSZ, EXITS) if estimator.level == "sequence" else (TGT, BSZ, EXITS)


# --------------------------------------------------------------------------- q is a distribution


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=estimator_id)
@pytest.mark.parametrize("scale", [1.0, 1e3, 1e5])
def test_q_sums_to_one_even_with_extreme_logits(estimator, scale):
    encoder_out, padding_mask, block_states = model_inputs(scale=scale)
    log_q = estimator.log_q_from(encoder_out, padding_mask, block_states)
    assert log_q.shape == expected_shape(estimator)
    assert torch.isfinite(log_q).all()
    torch.testing.assert_close(log_q.exp().sum(-1), torch.ones(log_q.shape[:-1]), atol=1e-5, rtol=0)


def geometric_exits(estimator, states, taus):
    """0-based exits of the generator's Tok-geometric loop: after block n, ``geometric_halts``."""
    exits = torch.full(states[0].shape[:-1], EXITS - 1)
    undecided = torch.ones_like(exits, dtype=torch.bool)
    for i, h in enumerate(states[: EXITS - 1]):
        halt = geometric_halts(estimator.halting_prob(h, i), taus[i]) & undecided
        exits[halt] = i
        undecided &= ~halt
    return exits


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=estimator_id)
def test_decisions_are_valid_exit_indices(estimator):
    """The two inference rules the exit policies call give valid exits for every estimator."""
    encoder_out, padding_mask, block_states = model_inputs()
    for threshold in (None, 0.0, 0.5, 1.0):
        if estimator.inputs == "blocks":
            exits = geometric_exits(estimator, block_states, estimator.thresholds(threshold))
        else:
            log_q = estimator.log_q_from(encoder_out, padding_mask, block_states)
            exits = decide_by_cumulative(log_q, threshold)
        assert exits.shape == expected_shape(estimator)[:-1]
        assert exits.dtype == torch.long and exits.min() >= 0 and exits.max() < EXITS


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=estimator_id)
def test_log_q_from_reads_the_right_model_tensors(estimator):
    encoder_out, padding_mask, block_states = model_inputs()
    if estimator.inputs == "encoder":
        direct = estimator.log_q(encoder_out, padding_mask)
    elif estimator.inputs == "first_block":
        direct = estimator.log_q(block_states[0])
    else:
        direct = estimator.log_q(block_states[: EXITS - 1])
    torch.testing.assert_close(estimator.log_q_from(encoder_out, padding_mask, block_states), direct)
    with pytest.raises(ValueError, match="needs"):
        estimator.log_q_from()


def test_registry_and_builder():
    assert set(DEPTH_ESTIMATORS) == {
        "sequence",
        "token-multinomial",
        "token-geometric",
        "sequence-poisson-binomial",
        "token-poisson-binomial",
    }
    for name, cls in DEPTH_ESTIMATORS.items():
        assert cls.level in ("sequence", "token") and cls.name == name
    assert isinstance(build_depth_estimator("token-geometric", DIM, EXITS, separate_halting=True), TokenGeometric)
    with pytest.raises(ValueError, match="token-geometric"):
        build_depth_estimator("geometric", DIM, EXITS)
    with pytest.raises(ValueError, match="at least 2 exits"):
        build_depth_estimator("sequence", DIM, 1)


# --------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("separate_halting", [False, True])
def test_geometric_matches_closed_formula(separate_halting):
    torch.manual_seed(0)
    estimator = TokenGeometric(DIM, EXITS, separate_halting=separate_halting)
    _, _, block_states = model_inputs()
    states = block_states[: EXITS - 1]
    chi = [estimator.halting_prob(h, i) for i, h in enumerate(states)]  # χ^1..χ^{N-1}
    expected = []
    for n in range(EXITS):
        reach = torch.ones_like(chi[0])
        for earlier in chi[:n]:
            reach = reach * (1 - earlier)
        expected.append(reach * chi[n] if n < EXITS - 1 else reach)
    torch.testing.assert_close(estimator.log_q(states).exp(), torch.stack(expected, -1))
    if separate_halting:  # block 2 has its own halter, not block 1's
        block1_halter_on_block2 = torch.sigmoid(estimator.halting[0](states[1]).squeeze(-1))
        assert not torch.allclose(chi[1], block1_halter_on_block2)


def test_geometric_shared_halter_is_one_linear_layer():
    assert len(TokenGeometric(DIM, EXITS).halting) == 1
    assert len(TokenGeometric(DIM, EXITS, separate_halting=True).halting) == EXITS - 1


def test_poisson_binomial_matches_enumeration_for_four_exits():
    torch.manual_seed(0)
    logits = 3 * torch.randn(5, EXITS - 1)
    p = torch.sigmoid(logits)
    expected = torch.zeros(5, EXITS)
    for outcome in itertools.product([0, 1], repeat=EXITS - 1):
        chosen = torch.tensor(outcome, dtype=torch.float32)
        probability = (p * chosen + (1 - p) * (1 - chosen)).prod(-1)
        expected[:, sum(outcome)] += probability
    torch.testing.assert_close(poisson_binomial_log_pmf(logits).exp(), expected)


def test_poisson_binomial_estimator_uses_the_pmf_of_its_projection():
    torch.manual_seed(0)
    estimator = TokenPoissonBinomial(DIM, EXITS)
    h = torch.randn(TGT, BSZ, DIM)
    torch.testing.assert_close(estimator.log_q(h), poisson_binomial_log_pmf(estimator.proj(h)))


# --------------------------------------------------------------------------- decisions


def test_cumulative_decision_rule():
    log_q = torch.tensor([0.2, 0.3, 0.5]).log()
    assert decide_by_cumulative(log_q, None).item() == 2  # argmax
    assert decide_by_cumulative(log_q, 0.0).item() == 0
    assert decide_by_cumulative(log_q, 0.19).item() == 0  # cumulative q: 0.2, 0.5, 1.0
    assert decide_by_cumulative(log_q, 0.21).item() == 1
    assert decide_by_cumulative(log_q, 0.49).item() == 1
    assert decide_by_cumulative(log_q, 0.51).item() == 2
    assert decide_by_cumulative(log_q, 1.0).item() == 2  # even if the cumsum rounds below 1


def test_geometric_halts_at_first_block_above_threshold():
    estimator = TokenGeometric(DIM, EXITS)
    _, _, block_states = model_inputs()
    states = block_states[: EXITS - 1]
    chi = torch.stack([estimator.halting_prob(h, i) for i, h in enumerate(states)], -1)  # T x B x N-1
    for taus in ([0.5] * (EXITS - 1), [0.9, 0.1, 0.5], [1.0] * (EXITS - 1)):
        halted = chi > torch.tensor(taus)
        expected = torch.where(halted.any(-1), halted.int().argmax(-1), torch.tensor(EXITS - 1))
        assert geometric_exits(estimator, states, taus).tolist() == expected.tolist()
    assert estimator.thresholds(None) == (0.5,) * (EXITS - 1)  # the paper's default
    assert (geometric_exits(estimator, states, [1.0] * (EXITS - 1)) == EXITS - 1).all()  # χ > 1 never fires
    chi_one = torch.tensor([0.25, 0.5, 0.75])
    assert geometric_halts(chi_one, 0.5).tolist() == [False, False, True]  # strictly above τ


def test_geometric_halting_prob_rejects_the_last_block():
    with pytest.raises(IndexError):
        TokenGeometric(DIM, EXITS).halting_prob(torch.randn(1, DIM), EXITS - 1)


def test_sequence_estimator_same_depth_for_beam_copies():
    torch.manual_seed(0)
    estimator = SequenceMultinomial(DIM, EXITS)
    encoder_out, padding_mask, _ = model_inputs()
    beam = 5
    beam_out = encoder_out.repeat_interleave(beam, dim=1)  # S x (B*beam) x C, like reorder_encoder_out
    beam_mask = padding_mask.repeat_interleave(beam, dim=0)
    exits = decide_by_cumulative(estimator.log_q(beam_out, beam_mask), None).view(BSZ, beam)
    assert (exits == exits[:, :1]).all()
    assert exits[:, 0].tolist() == decide_by_cumulative(estimator.log_q(encoder_out, padding_mask), None).tolist()


@pytest.mark.parametrize("name", ["sequence", "sequence-poisson-binomial"])
def test_sequence_estimator_ignores_source_padding(name):
    torch.manual_seed(0)
    estimator = DEPTH_ESTIMATORS[name](DIM, EXITS)
    short = torch.randn(3, 1, DIM)
    padded = torch.cat([short, 1e3 * torch.randn(2, 1, DIM)], dim=0)  # garbage at padded positions
    mask = torch.tensor([[False, False, False, True, True]])
    torch.testing.assert_close(estimator.log_q(padded, mask), estimator.log_q(short, None))


def test_multinomial_rejects_per_block_thresholds():
    with pytest.raises(ValueError, match="--exit-threshold"):
        single_threshold([0.1, 0.5, 0.9], "token-multinomial")
    with pytest.raises(ValueError, match="--exit-threshold"):
        single_threshold(1.5, "token-multinomial")
    assert single_threshold("0.3,0.3", "token-multinomial") == 0.3


# --------------------------------------------------------------------------- loss


@pytest.mark.parametrize("estimator", all_estimators(), ids=estimator_id)
def test_gradients_reach_every_estimator_parameter(estimator):
    encoder_out, padding_mask, block_states = model_inputs()
    log_q = estimator.log_q_from(encoder_out, padding_mask, block_states)
    if estimator.level == "token":
        log_q = log_q.transpose(0, 1)  # B x T x N, the oracles' layout
    oracle = torch.arange(log_q[..., 0].numel()).remainder(EXITS).view(log_q.shape[:-1])  # every exit
    mask = torch.ones_like(oracle, dtype=torch.bool)
    estimator.zero_grad()
    estimator_loss(log_q, oracle, mask).backward()
    for name, param in estimator.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_poisson_binomial_gradients_finite_for_extreme_logits():
    logits = torch.tensor([[80.0, -80.0, 0.0], [1e4, 1e4, -1e4]], requires_grad=True)
    log_q = poisson_binomial_log_pmf(logits)
    estimator_loss(log_q, torch.tensor([3, 0])).backward()
    assert torch.isfinite(logits.grad).all()


def test_estimator_loss_sums_cross_entropy_over_valid_entries():
    log_q = torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]]).log()  # B=1, T=2, N=3
    oracle = torch.tensor([[1, IGNORE_EXIT]])
    mask = torch.tensor([[True, False]])
    torch.testing.assert_close(estimator_loss(log_q, oracle, mask), torch.tensor(-math.log(0.2)))
    torch.testing.assert_close(estimator_loss(log_q, oracle), torch.tensor(-math.log(0.2)))  # -100 ignored
    assert estimator_correct_count(log_q, torch.tensor([[0, 2]]), torch.tensor([[True, True]])).item() == 2
    assert estimator_correct_count(log_q, torch.tensor([[0, 2]]), mask).item() == 1


def test_estimator_loss_names_a_transposed_input():
    with pytest.raises(ValueError, match="transpose"):
        estimator_loss(torch.zeros(TGT, BSZ, EXITS), torch.zeros(BSZ, TGT, dtype=torch.long))


# --------------------------------------------------------------------------- thresholds


def test_thresholds_broadcast_and_parse():
    assert thresholds_from_arg(None, 4) is None
    assert thresholds_from_arg(0.5, 4) == (0.5, 0.5, 0.5)
    assert thresholds_from_arg([0.25], 4) == (0.25, 0.25, 0.25)
    assert thresholds_from_arg([0.1, 0.2, 0.3], 4) == (0.1, 0.2, 0.3)
    assert thresholds_from_arg("0.1,0.2, 0.3", 4) == (0.1, 0.2, 0.3)
    assert thresholds_from_arg(1, 3) == (1.0, 1.0)
    assert thresholds_from_arg(torch.tensor(0.0), 3) == (0.0, 0.0)


@pytest.mark.parametrize("bad", [[0.1, 0.2], [0.1] * 4, "0.1,x", "", True, object()])
def test_thresholds_wrong_count_or_type(bad):
    with pytest.raises(ValueError, match="--exit-threshold"):
        thresholds_from_arg(bad, 4)


OUT_OF_RANGE = st.one_of(
    st.just(float("nan")),
    st.floats(max_value=0.0, exclude_max=True),
    st.floats(min_value=1.0, exclude_min=True),
)


@settings(max_examples=200, deadline=None)
@given(bad=OUT_OF_RANGE, num_exits=st.integers(2, 8), as_list=st.booleans())
def test_thresholds_outside_unit_interval_raise(bad, num_exits, as_list):
    threshold = [0.5] * (num_exits - 2) + [bad] if as_list else bad
    with pytest.raises(ValueError, match="--exit-threshold") as error:
        thresholds_from_arg(threshold, num_exits)
    assert "[0, 1]" in str(error.value)


@settings(max_examples=100, deadline=None)
@given(good=st.floats(0.0, 1.0), num_exits=st.integers(2, 8))
def test_thresholds_inside_unit_interval_accepted(good, num_exits):
    assert thresholds_from_arg(good, num_exits) == (good,) * (num_exits - 1)
