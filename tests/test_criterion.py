"""adaptive_label_smoothed_cross_entropy: aligned and mixed multi-exit losses (§2.2, App. A) and the
depth-estimator loss against oracles (§3)."""
import math

import pytest
import torch
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
from fairseq.logging import metrics

from fairseq_dat.criterions.adaptive_label_smoothed_cross_entropy import (
    AdaptiveLabelSmoothedCrossEntropyCriterion as Criterion,
    resolve_exit_weights,
)
import fairseq_dat.modules.fused_exit_loss as fused_module
from fairseq_dat.errors import ConfigError
from helpers import random_batch, tiny_model


def make_sample(dictionary, seed=0):
    net_input, target = random_batch(dictionary, bsz=4, tgt_len=6, seed=seed)
    target = target.clone()
    target[1, -1] = dictionary.pad()
    return {"net_input": net_input, "target": target, "ntokens": int(target.ne(dictionary.pad()).sum()),
            "id": torch.arange(4)}


def criterion(task, **kwargs):
    return Criterion(task, sentence_avg=False, label_smoothing=0.1, **kwargs)


def test_aligned_loss_is_the_weighted_mean_of_the_exit_losses():
    model, task, _ = tiny_model()
    sample = make_sample(task.target_dictionary)
    crit = criterion(task, exit_weights="n")
    loss, sample_size, logs = crit(model, sample)
    _, extra = model(**sample["net_input"])
    pad = task.target_dictionary.pad()
    by_hand = []
    for n, state in enumerate(extra["exit_states"], start=1):
        lprobs = torch.log_softmax(model.decoder.exit_logits(state, n), dim=-1)
        l_n, _ = label_smoothed_nll_loss(lprobs.view(-1, lprobs.size(-1)), sample["target"].view(-1), 0.1,
                                         ignore_index=pad)
        by_hand.append(l_n)
        torch.testing.assert_close(logs[f"loss_exit{n}"], l_n.data)
    expected = (1 * by_hand[0] + 2 * by_hand[1] + 3 * by_hand[2]) / 6
    torch.testing.assert_close(loss, expected)
    assert sample_size == sample["ntokens"]


@pytest.mark.parametrize("exit_grad_scale", [None, 0.5])
def test_fused_exit_loss_equals_autograd_in_loss_logs_and_gradients(exit_grad_scale):
    """--exit-loss-impl fused (chunked projection + loss with gradients in the forward pass) gives
    the autograd path's loss, per-exit logs and every parameter's gradient; chunks smaller than the
    batch and a padded target included."""
    model, task, _ = tiny_model()
    model.train()
    sample = make_sample(task.target_dictionary, seed=3)
    results = []
    for impl in ("fused", "autograd"):
        model.zero_grad()
        torch.manual_seed(0)  # same dropout masks
        crit = criterion(task, exit_loss_impl=impl, exit_weights="sqrt_n", exit_grad_scale=exit_grad_scale)
        loss, _, logs = crit(model, sample) if impl == "autograd" else _with_chunk(fused_module, 5, crit, model, sample)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), logs, grads))
    (loss_f, logs_f, grads_f), (loss_a, logs_a, grads_a) = results
    torch.testing.assert_close(loss_f, loss_a, rtol=1e-5, atol=1e-5)
    for key in ("nll_loss", "loss_exit1", "nll_loss_exit2", "loss_exit3"):
        torch.testing.assert_close(logs_f[key], logs_a[key], rtol=1e-5, atol=1e-5)
    assert grads_f.keys() == grads_a.keys()
    for key in grads_a:
        torch.testing.assert_close(grads_f[key], grads_a[key], rtol=1e-4, atol=1e-6, msg=key)


def _with_chunk(module, chunk, crit, model, sample):
    """Run the criterion with the fused loss's chunk forced to ``chunk`` rows."""
    original = module.fused_exit_loss.__defaults__
    module.fused_exit_loss.__defaults__ = (chunk,)
    try:
        return crit(model, sample)
    finally:
        module.fused_exit_loss.__defaults__ = original


def test_fused_exit_loss_is_not_used_with_an_estimator_and_validates_without_gradients():
    model, task, _ = tiny_model(extra=["--depth-estimator", "token-geometric"])
    crit = criterion(task, exit_loss_alpha=1.0)
    _, extra = model(**make_sample(task.target_dictionary)["net_input"])
    assert not crit.can_fuse(model.decoder, extra)  # the oracle needs every exit's log-probabilities
    plain, ptask, _ = tiny_model()
    with torch.no_grad():
        loss, _, _ = criterion(ptask)(plain, make_sample(ptask.target_dictionary))
    assert torch.isfinite(loss)


def test_every_exit_receives_gradient():
    model, task, _ = tiny_model()
    model.train()
    loss, _, _ = criterion(task)(model, make_sample(task.target_dictionary))
    loss.backward()
    for n in (1, 2, 3):
        grad = model.decoder.exit_projection(n).weight.grad
        assert grad is not None and grad.abs().sum() > 0
    for layer in model.decoder.layers:
        assert layer.fc1.weight.grad.abs().sum() > 0


def test_gradient_scaling_changes_only_gradients():
    model, task, _ = tiny_model()
    sample = make_sample(task.target_dictionary)
    plain, _, _ = criterion(task)(model, sample)
    scaled, _, _ = criterion(task, exit_grad_scale=0.3)(model, sample)
    torch.testing.assert_close(plain, scaled)
    plain.backward()
    g_plain = model.decoder.layers[0].fc1.weight.grad.clone()
    model.zero_grad()
    scaled.backward()
    assert not torch.allclose(g_plain, model.decoder.layers[0].fc1.weight.grad)


def test_mixed_training_is_reproducible_under_a_seed_and_averages_samples():
    model, task, _ = tiny_model()
    sample = make_sample(task.target_dictionary)
    crit = criterion(task, exit_training="mixed", mixed_samples=3)
    torch.manual_seed(7)
    a, _, _ = crit(model, sample)
    torch.manual_seed(7)
    b, _, _ = crit(model, sample)
    torch.manual_seed(8)
    c, _, _ = crit(model, sample)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the same draws by hand: mean over M of the per-token losses at each token's exit
    torch.manual_seed(7)
    losses = []
    for _ in range(3):
        exits = torch.randint(1, 4, sample["target"].shape)
        logits, _ = model(**sample["net_input"], exits=exits)
        lprobs = torch.log_softmax(logits, -1)
        l_m, _ = label_smoothed_nll_loss(lprobs.view(-1, lprobs.size(-1)), sample["target"].view(-1), 0.1,
                                         ignore_index=task.target_dictionary.pad())
        losses.append(l_m)
    torch.testing.assert_close(a, sum(losses) / 3)


def test_mixed_training_gives_every_exit_head_a_gradient_even_if_not_drawn():
    model, task, _ = tiny_model()
    crit = criterion(task, exit_training="mixed", mixed_samples=1)
    crit.sample_exits = lambda target, n: torch.full(target.shape, 3)  # exits 1, 2 never drawn
    loss, _, _ = crit(model, make_sample(task.target_dictionary))
    loss.backward()
    assert model.decoder.exit_projections[0].weight.grad is not None  # zero, but present (DDP-safe)
    assert model.decoder.exit_projections[0].weight.grad.abs().sum() == 0


@pytest.mark.parametrize("estimator", ["token-geometric", "token-multinomial", "sequence",
                                       "token-poisson-binomial", "sequence-poisson-binomial"])
@pytest.mark.parametrize("oracle", ["likelihood", "correctness"])
def test_estimator_loss_reaches_estimator_and_trunk(estimator, oracle):
    model, task, _ = tiny_model(extra=["--depth-estimator", estimator])
    crit = criterion(task, depth_oracle=oracle, exit_loss_alpha=1.0, oracle_sigma=1.0)
    loss, _, logs = crit(model, make_sample(task.target_dictionary))
    assert {"exit_loss", "exit_correct", "exit_count", "oracle_exit_sum"} <= set(logs)
    base, _, _ = criterion(task, depth_oracle=oracle)(model, make_sample(task.target_dictionary))
    torch.testing.assert_close(loss, base + logs["exit_loss"])
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.depth_estimator.parameters())
    assert model.encoder.layers[0].fc1.weight.grad.abs().sum() > 0


def test_detach_estimator_keeps_the_trunk_out_of_the_exit_loss():
    model, task, _ = tiny_model(extra=["--depth-estimator", "token-geometric", "--detach-estimator"])
    sample = make_sample(task.target_dictionary)
    _, _, logs = criterion(task, exit_loss_alpha=1.0)(model, sample)
    _, extra = model(**sample["net_input"])
    extra["depth_log_q"].sum().backward()
    assert all(p.grad is None for p in model.decoder.layers.parameters())
    assert all(p.grad is not None for p in model.decoder.depth_estimator.parameters())


def test_per_exit_metrics_are_logged():
    model, task, _ = tiny_model(extra=["--depth-estimator", "token-geometric"])
    _, _, logs = criterion(task, exit_loss_alpha=0.5)(model, make_sample(task.target_dictionary))
    with metrics.aggregate() as agg:
        Criterion.reduce_metrics([logs])
        values = agg.get_smoothed_values()
    for n in (1, 2, 3):
        assert f"loss_exit{n}" in values and f"ppl_exit{n}" in values
    assert {"exit_loss", "exit_acc", "oracle_ae"} <= set(values)
    assert 1.0 <= values["oracle_ae"] <= 3.0
    assert math.isclose(values[f"nll_loss_exit3"], float(logs["nll_loss_exit3"]) / logs["ntokens"] / math.log(2),
                        rel_tol=1e-3)


def test_exit_weight_schemes():
    assert resolve_exit_weights("uniform", 3) == [1.0, 1.0, 1.0]
    assert resolve_exit_weights("inv_n", 2) == [1.0, 0.5]
    assert resolve_exit_weights("1,2,3", 3) == [1.0, 2.0, 3.0]
    with pytest.raises(ConfigError, match="--exit-weights gives 2 weights but the decoder has 3"):
        resolve_exit_weights("1,2", 3)
    with pytest.raises(ConfigError, match="--exit-weights"):
        resolve_exit_weights("heavy", 3)


@pytest.mark.parametrize("kwargs, flag", [
    ({"oracle_lambda": -1.0}, "--oracle-lambda"), ({"oracle_sigma": -0.5}, "--oracle-sigma"),
    ({"exit_loss_alpha": float("nan")}, "--exit-loss-alpha"), ({"mixed_samples": 0}, "--mixed-samples"),
    ({"exit_training": "sideways"}, "--exit-training"), ({"depth_oracle": "bleu"}, "--depth-oracle"),
    ({"exit_grad_scale": 0.0}, "--exit-grad-scale"),
])
def test_bad_criterion_flags(kwargs, flag):
    _, task, _ = tiny_model()
    with pytest.raises(ConfigError, match=flag):
        criterion(task, **kwargs)
