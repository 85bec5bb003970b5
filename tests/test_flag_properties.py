"""Property tests of the numeric flags at the Python level (no process per example): every value is
either accepted as given or refused with a one-line ConfigError that names its flag.

The same checks run on the command line (tests/test_cli_bad_input.py shows a few end to end):
``check_criterion_flags`` when fairseq builds the criterion, ``resolve_exit_weights`` when the
task builds the model, ``build_exit_policy`` when the generator is built.
"""
import functools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fairseq_dat.criterions.adaptive_label_smoothed_cross_entropy import (
    EXIT_WEIGHT_SCHEMES,
    check_criterion_flags,
    resolve_exit_weights,
)
from fairseq_dat.errors import ConfigError
from fairseq_dat.exit_policy import ConfidencePolicy, FixedExit, GeometricPolicy, build_exit_policy
from helpers import tiny_model

any_float = st.floats(allow_nan=True, allow_infinity=True)
VALID = dict(exit_training="aligned", mixed_samples=1, exit_grad_scale=None, depth_oracle="correctness",
             oracle_lambda=0.1, oracle_sigma=0.0, exit_loss_alpha=0.0)
N_EXITS = 3  # adaptive_transformer_tiny


def refused(fn, flag):
    """Run fn; True if it raised a one-line ConfigError starting with ``flag``, False if it returned."""
    try:
        fn()
    except ConfigError as err:
        message = str(err)
        assert flag in message and "\n" not in message, message
        return True
    return False


@settings(max_examples=150, deadline=None)
@given(flag=st.sampled_from(["oracle_lambda", "oracle_sigma", "exit_loss_alpha"]), value=any_float)
def test_non_negative_criterion_flags(flag, value):
    kwargs = dict(VALID, **{flag: value})
    was_refused = refused(lambda: check_criterion_flags(**kwargs), "--" + flag.replace("_", "-"))
    assert was_refused == (not (math.isfinite(value) and value >= 0))


@settings(max_examples=100, deadline=None)
@given(value=st.none() | any_float)
def test_exit_grad_scale_must_be_positive(value):
    was_refused = refused(lambda: check_criterion_flags(**dict(VALID, exit_grad_scale=value)), "--exit-grad-scale")
    assert was_refused == (value is not None and not (math.isfinite(value) and value > 0))


@settings(max_examples=50, deadline=None)
@given(samples=st.integers(-5, 20), alpha=st.floats(0, 10))
def test_mixed_samples_and_mixed_training_without_estimator_loss(samples, alpha):
    kwargs = dict(VALID, exit_training="mixed", mixed_samples=samples, exit_loss_alpha=alpha)
    flag = "--mixed-samples" if samples < 1 else ("--exit-loss-alpha" if alpha > 0 else None)
    assert refused(lambda: check_criterion_flags(**kwargs), flag or "-") == (flag is not None)


@settings(max_examples=200, deadline=None)
@given(weights=st.lists(any_float, min_size=1, max_size=6), num_exits=st.integers(1, 6))
def test_exit_weights_count_and_values(weights, num_exits):
    spec = ",".join(repr(w) for w in weights)
    valid = (len(weights) == num_exits and all(math.isfinite(w) and w >= 0 for w in weights)
             and sum(weights) > 0)
    assert refused(lambda: resolve_exit_weights(spec, num_exits), "--exit-weights") == (not valid)
    if valid:
        assert resolve_exit_weights(spec, num_exits) == [float(repr(w)) for w in weights]


@settings(max_examples=50, deadline=None)
@given(spec=st.text(max_size=12), num_exits=st.integers(1, 6))
def test_exit_weights_text_is_a_scheme_numbers_or_refused(spec, num_exits):
    try:
        weights = resolve_exit_weights(spec, num_exits)
    except ConfigError as err:
        assert "--exit-weights" in str(err) and "\n" not in str(err)
        return
    assert len(weights) == num_exits
    assert spec in EXIT_WEIGHT_SCHEMES or all(math.isfinite(w) and w >= 0 for w in weights)


@functools.lru_cache(maxsize=None)
def geometric_decoder():
    model, _, _ = tiny_model(extra=("--depth-estimator", "token-geometric"))
    return model.decoder


@settings(max_examples=60, deadline=None)
@given(k=st.integers(-3, 12))
def test_fixed_exit_must_be_a_block_of_the_checkpoint(k):
    decoder = geometric_decoder()
    if refused(lambda: build_exit_policy(decoder, fixed_exit=k), "--fixed-exit"):
        assert not 1 <= k <= N_EXITS
    else:
        policy = build_exit_policy(decoder, fixed_exit=k)
        assert 1 <= k <= N_EXITS and isinstance(policy, FixedExit) and policy.exit_block == k


@settings(max_examples=150, deadline=None)
@given(t=any_float)
def test_estimator_threshold_in_the_unit_interval(t):
    decoder = geometric_decoder()
    if refused(lambda: build_exit_policy(decoder, threshold=str(t)), "--exit-threshold"):
        assert not 0 <= t <= 1
    else:
        policy = build_exit_policy(decoder, threshold=str(t))
        assert 0 <= t <= 1 and isinstance(policy, GeometricPolicy) and policy.thresholds == [t] * (N_EXITS - 1)


@settings(max_examples=150, deadline=None)
@given(ts=st.lists(any_float, min_size=1, max_size=4))
def test_confidence_thresholds_one_or_one_per_block(ts):
    decoder = geometric_decoder()
    spec = ",".join(repr(t) for t in ts)
    valid = len(ts) in (1, N_EXITS - 1) and all(0 <= t <= 1 for t in ts)
    call = functools.partial(build_exit_policy, decoder, strategy="confidence", threshold=spec)
    assert refused(call, "--exit-threshold") == (not valid)
    if valid:
        policy = call()
        assert isinstance(policy, ConfidencePolicy) and len(policy.thresholds) == N_EXITS - 1


@settings(max_examples=60, deadline=None)
@given(ratio=any_float)
def test_gather_ratio_in_the_unit_interval(ratio):
    decoder = geometric_decoder()
    call = functools.partial(build_exit_policy, decoder, fixed_exit=2, gather_ratio=ratio)
    assert refused(call, "--exit-gather-ratio") == (not 0 <= ratio <= 1)


@pytest.mark.parametrize("spec", sorted(EXIT_WEIGHT_SCHEMES))
def test_named_exit_weight_schemes_fit_any_depth(spec):
    for n in range(1, 7):
        assert len(resolve_exit_weights(spec, n)) == n
