"""Does the depth estimator learn what the paper trains it on (§3)?

- an estimator recovers a synthetic oracle that depends on its input state (accuracy far above the
  majority class), for the token-geometric and token-multinomial estimators;
- the criterion pairs oracle[b, t] with the state that emits target[b, t]: checked against an
  independent incremental decoding, step by step;
- the χ / q that decoding uses at block n equals what the criterion trained on for the same states;
- ``--estimator-lr-multiplier``: the same function at initialization, C times the Adam step;
- ``exit_majority`` / ``oracle_entropy`` and the mixed per-exit losses are logged.
"""
import math

import pytest
import torch
from fairseq.logging import metrics

from fairseq_dat.criterions.adaptive_label_smoothed_cross_entropy import (
    AdaptiveLabelSmoothedCrossEntropyCriterion as Criterion,
)
from fairseq_dat.modules.depth_estimators import TokenGeometric, TokenMultinomial, estimator_loss
from fairseq_dat.oracles import exit_oracle
from helpers import random_batch, tiny_model

NUM_EXITS = 4
DIM = 16


def train_estimator(estimator, log_q_of, oracle, steps=300, lr=0.05):
    opt = torch.optim.Adam(estimator.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = estimator_loss(log_q_of(), oracle) / oracle.numel()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (log_q_of().argmax(-1) == oracle).float().mean().item()


def majority_share(oracle):
    return torch.bincount(oracle.flatten()).max().item() / oracle.numel()


def test_token_geometric_recovers_a_state_dependent_oracle():
    g = torch.Generator().manual_seed(0)
    states = [torch.randn(512, DIM, generator=g) for _ in range(NUM_EXITS - 1)]  # after blocks 1..N-1
    u = torch.randn(DIM, generator=g)
    # exit at the first block whose state scores above a margin (else the last): what χ can express
    fires = torch.stack([s @ u > 1.0 for s in states], dim=-1)  # 512 x N-1
    oracle = torch.where(fires.any(-1), fires.float().argmax(-1), torch.full((512,), NUM_EXITS - 1))
    assert majority_share(oracle) < 0.7  # the task is not solved by the majority class
    torch.manual_seed(0)
    est = TokenGeometric(DIM, NUM_EXITS)
    accuracy = train_estimator(est, lambda: est.log_q(states), oracle)
    assert accuracy > majority_share(oracle) + 0.2, (accuracy, majority_share(oracle))


def test_token_multinomial_recovers_a_state_dependent_oracle():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(512, DIM, generator=g)
    oracle = (h @ torch.randn(DIM, NUM_EXITS, generator=g)).argmax(-1)
    torch.manual_seed(0)
    est = TokenMultinomial(DIM, NUM_EXITS)
    accuracy = train_estimator(est, lambda: est.log_q(h), oracle)
    assert accuracy > majority_share(oracle) + 0.3, (accuracy, majority_share(oracle))


def sample_for(task, seed=0, bsz=4, tgt_len=6):
    d = task.target_dictionary
    net_input, target = random_batch(d, bsz=bsz, tgt_len=tgt_len, seed=seed)
    return {"net_input": net_input, "target": target, "ntokens": int(target.ne(d.pad()).sum()), "id": torch.arange(bsz)}


def incremental_full_depth_states(model, net_input):
    """Decode the reference prefix one token at a time through fairseq's own incremental path (full depth);
    returns, per step t, the N block outputs (B x C) of the state that predicts target[:, t]."""
    decoder = model.decoder
    encoder_out = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
    prev = net_input["prev_output_tokens"]
    incremental_state = {}
    per_step = []
    for t in range(prev.size(1)):
        _, extra = decoder.extract_features(prev[:, : t + 1], encoder_out=encoder_out,
                                            incremental_state=incremental_state)
        per_step.append([s[-1] for s in extra["inner_states"][1:]])  # each 1 x B x C → B x C
    return encoder_out, per_step


def test_criterion_pairs_the_oracle_with_the_state_that_emits_the_target():
    torch.manual_seed(0)
    model, task, _ = tiny_model(extra=["--depth-estimator", "token-geometric", "--decoder-layers", "4"])
    sample = sample_for(task)
    target, pad = sample["target"], task.target_dictionary.pad()
    _, per_step = incremental_full_depth_states(model, sample["net_input"])
    # independent oracle (correctness, λ > 0, σ = 0): the shallowest exit whose step-t prediction is
    # target[:, t]; exit 1 when none is (argmax of all-zero scores minus λn)
    expected = torch.zeros_like(target)
    for t, states in enumerate(per_step):
        right = torch.stack([model.decoder.exit_logits(s, n).argmax(-1) == target[:, t]
                             for n, s in enumerate(states, start=1)], dim=-1)  # B x N
        expected[:, t] = torch.where(right.any(-1), right.float().argmax(-1), torch.zeros_like(target[:, t]))
    _, extra = model(**sample["net_input"], features_only=True)
    lprobs = [torch.log_softmax(model.decoder.exit_logits(s, n), -1) for n, s in enumerate(extra["exit_states"], 1)]
    oracle, mask = exit_oracle(lprobs, target, pad, score="correctness", level="token", lam=0.1, sigma=0.0)
    assert torch.equal(oracle[mask], expected[mask])
    # and the criterion trains log_q[b, t] towards exactly that oracle[b, t]
    crit = Criterion(task, sentence_avg=False, label_smoothing=0.1, exit_loss_alpha=1.0)
    _, _, logs = crit(model, sample)
    log_q = extra["depth_log_q"]
    by_hand = -log_q.gather(-1, expected.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask].sum()
    torch.testing.assert_close(logs["exit_loss"], by_hand.data)
    assert logs["exit_count"] == int(mask.sum())


@pytest.mark.parametrize("estimator", ["token-geometric", "token-multinomial"])
def test_decoding_uses_the_halting_probabilities_the_criterion_trained(estimator):
    torch.manual_seed(0)
    model, task, _ = tiny_model(extra=["--depth-estimator", estimator, "--decoder-layers", "4"])
    sample = sample_for(task, seed=3)
    encoder_out, per_step = incremental_full_depth_states(model, sample["net_input"])
    _, extra = model(**sample["net_input"], features_only=True)
    trained_log_q = extra["depth_log_q"]  # B x T x N: what the criterion's L_exit reads
    est = model.decoder.depth_estimator
    mask = sample["target"].ne(task.target_dictionary.pad())
    for t, states in enumerate(per_step):
        decoded_log_q = est.log_q_from(block_states=states)  # what the decoder's policy computes at step t
        rows = mask[:, t]
        torch.testing.assert_close(decoded_log_q[rows], trained_log_q[rows, t], rtol=1e-5, atol=1e-5)
        if estimator == "token-geometric":  # χ_n at block n, as the generator's halting test reads it
            q = trained_log_q[:, t].exp()
            reach = 1 - torch.cat([torch.zeros_like(q[:, :1]), q.cumsum(-1)[:, :-1]], dim=-1)
            for n in range(1, NUM_EXITS):
                chi = est.halting_prob(states[n - 1], n - 1)
                torch.testing.assert_close(chi[rows], (q[:, n - 1] / reach[:, n - 1])[rows], rtol=1e-4, atol=1e-5)


def test_estimator_lr_multiplier_keeps_the_function_and_multiplies_the_step():
    sample = None
    outputs, steps = {}, {}
    for c in (1.0, 10.0):
        torch.manual_seed(0)
        model, task, _ = tiny_model(extra=["--depth-estimator", "token-geometric", "--estimator-lr-multiplier", str(c)],
                                    seed=5)
        sample = sample or sample_for(task, seed=4)
        model.train()
        est_params = list(model.decoder.depth_estimator.parameters())
        _, extra = model(**sample["net_input"], features_only=True)
        outputs[c] = extra["depth_log_q"].detach()
        opt = torch.optim.Adam(est_params, lr=1e-3)
        (-extra["depth_log_q"][..., 0].sum()).backward()
        opt.step()
        with torch.no_grad():
            _, after = model(**sample["net_input"], features_only=True)
        steps[c] = (after["depth_log_q"] - outputs[c]).abs().max().item()
    torch.testing.assert_close(outputs[1.0], outputs[10.0], rtol=1e-5, atol=1e-6)
    assert 5 < steps[10.0] / steps[1.0] < 20, steps


def reduce(logs_list):
    with metrics.aggregate() as agg:
        Criterion.reduce_metrics(logs_list)
        return agg.get_smoothed_values()


def test_exit_majority_and_oracle_entropy_are_logged_over_the_summed_histogram():
    model, task, _ = tiny_model(extra=["--depth-estimator", "token-geometric"])
    crit = Criterion(task, sentence_avg=False, label_smoothing=0.1, exit_loss_alpha=1.0)
    logs = [crit(model, sample_for(task, seed=s))[2] for s in (0, 1)]
    hist = [sum(log[f"oracle_count{n}"] for log in logs) for n in (1, 2, 3)]
    assert sum(hist) == sum(log["exit_count"] for log in logs)
    values = reduce(logs)
    assert values["exit_majority"] == pytest.approx(100 * max(hist) / sum(hist), abs=0.01)
    p = [c / sum(hist) for c in hist if c]
    assert values["oracle_entropy"] == pytest.approx(-sum(x * math.log2(x) for x in p), abs=1e-3)


def test_mixed_training_logs_each_exit_over_its_own_tokens():
    model, task, _ = tiny_model()
    model.train()
    crit = Criterion(task, sentence_avg=False, label_smoothing=0.1, exit_training="mixed", mixed_samples=3)
    sample = sample_for(task, seed=2, bsz=6, tgt_len=8)
    torch.manual_seed(11)
    loss, _, logs = crit(model, sample)
    counts = [logs[f"ntokens_exit{n}"] for n in (1, 2, 3)]
    assert sum(counts) == pytest.approx(sample["ntokens"])  # every token at one exit per sample, averaged over M
    assert sum(float(logs[f"loss_exit{n}"]) for n in (1, 2, 3)) == pytest.approx(float(loss), rel=1e-5)
    values = reduce([logs])
    for n in (1, 2, 3):
        if counts[n - 1]:
            assert values[f"loss_exit{n}"] == pytest.approx(float(logs[f"loss_exit{n}"]) / counts[n - 1] / math.log(2),
                                                            rel=1e-2)
            assert f"ppl_exit{n}" in values
