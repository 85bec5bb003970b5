"""``python -m fairseq_dat.cli.estimator_probe``: fits depth estimators on a frozen trunk's cached states.

- the probe tells a predictable oracle from an unpredictable one (accuracy far above the majority class
  versus at most the majority), for a token-level, a sequence-level and the confidence reference;
- the oracles it caches for a batch are the criterion's (``exit_oracle``) on the same states, and the
  states are the teacher-forced block outputs, paired token by token;
- end to end on a trained checkpoint: one PROBE line per (oracle, estimator); bad flags: one-line errors.
"""
import re
import sys

import pytest
import torch

from cli_helpers import assert_one_line_error, check_ok, corpus, adaptive_checkpoint, tool_env  # noqa: F401
from fairseq_dat.cli.estimator_probe import (
    OracleSpec, ProbeSplit, build_probe_estimator, fit, majority_and_entropy, parse_oracles, probe_batch,
    probe_inputs, score,
)
from fairseq_dat.oracles import exit_oracle
from helpers import random_batch, tiny_model

N, DIM = 4, 16


def synthetic_split(rows, sentences, learnable, seed):
    """Token oracle = first block whose state crosses a margin along u (what χ expresses), sequence
    oracle = argmax of a linear map of the source mean; or, not learnable, labels drawn at random
    with the same skew."""
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(rows, N, DIM, generator=g)
    u = torch.ones(DIM) / DIM ** 0.5
    fires = states[:, :N - 1] @ u > 0.8
    token = torch.where(fires.any(-1), fires.float().argmax(-1), torch.full((rows,), N - 1))
    means = torch.randn(sentences, DIM, generator=g)
    sequence = (means @ torch.eye(DIM)[:, :N] * 3).argmax(-1)
    confidence = torch.stack([states[:, 0] @ u, torch.randn(rows, generator=g), torch.randn(rows, generator=g)], -1)
    if not learnable:
        token = token[torch.randperm(rows, generator=g)]
        sequence = sequence[torch.randperm(sentences, generator=g)]
    return ProbeSplit(states=states, confidence=confidence, token_oracles=token.unsqueeze(1),
                      source_means=means, sequence_oracles=sequence.unsqueeze(1))


@pytest.mark.parametrize("name", ["token-geometric", "sequence", "confidence"])
def test_the_probe_tells_a_predictable_oracle_from_an_unpredictable_one(name):
    gains = {}
    for learnable in (True, False):
        train, valid = synthetic_split(2000, 800, learnable, 0), synthetic_split(1000, 400, learnable, 1)
        torch.manual_seed(0)
        estimator = build_probe_estimator(name, False, train, N)
        fit(estimator, *probe_inputs(estimator, train, 0), steps=200, lr=0.02, batch_size=256, seed=0)
        inputs, target = probe_inputs(estimator, valid, 0)
        majority, entropy, _ = majority_and_entropy(target, N)
        accuracy, loss = score(estimator, inputs, target)
        gains[learnable] = (accuracy - majority, entropy - loss)
    assert gains[True][0] > 20 and gains[True][1] > 0.5, gains
    assert gains[False][0] < 2 and gains[False][1] < 0.05, gains


def test_cached_oracles_are_the_criterions_on_the_teacher_forced_states():
    model, task, _ = tiny_model(extra=["--decoder-layers", "3"])
    d = task.target_dictionary
    net_input, target = random_batch(d, bsz=5, tgt_len=7, seed=3)
    oracles = [OracleSpec("C", 0.1, 0.0), OracleSpec("LL", 0.3, 2.0)]
    cached = probe_batch(model, {"net_input": net_input, "target": target}, d.pad(), oracles)
    _, extra = model(**net_input)  # fairseq's forward: the block outputs the criterion sees
    lprobs = [torch.log_softmax(model.decoder.exit_logits(s, n), -1) for n, s in enumerate(extra["exit_states"], 1)]
    mask = target.ne(d.pad())
    assert torch.allclose(cached["states"], torch.stack(extra["exit_states"], 2)[mask], atol=1e-5)
    for column, (score_name, lam, sigma) in enumerate([("correctness", 0.1, 0.0), ("likelihood", 0.3, 2.0)]):
        token, _ = exit_oracle(lprobs, target, d.pad(), score=score_name, level="token", lam=lam, sigma=sigma)
        sequence, _ = exit_oracle(lprobs, target, d.pad(), score=score_name, level="sequence", lam=lam)
        assert torch.equal(cached["token_oracles"][:, column], token[mask])
        assert torch.equal(cached["sequence_oracles"][:, column], sequence)


def test_majority_and_entropy():
    majority, entropy, shares = majority_and_entropy(torch.tensor([0, 0, 0, 1]), 3)
    assert majority == 75.0 and shares == [0.75, 0.25, 0.0]
    assert entropy == pytest.approx(-(0.75 * torch.tensor(0.75).log2() + 0.25 * torch.tensor(0.25).log2()).item())


def test_parse_oracles():
    assert parse_oracles("C:0.1:0, LL:0.5") == [OracleSpec("C", 0.1, 0.0), OracleSpec("LL", 0.5, 0.0)]


def run_probe(*args):
    import subprocess
    return subprocess.run([sys.executable, "-m", "fairseq_dat.cli.estimator_probe", *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=tool_env())


def test_end_to_end_one_probe_line_per_oracle_and_estimator(corpus, adaptive_checkpoint):  # noqa: F811
    proc = check_ok(run_probe(corpus, "--path", adaptive_checkpoint, "--oracles", "C:0.1:0,LL:0.1:1",
                              "--estimators", "token-geometric,sequence,confidence", "--steps", "20"))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    assert len(lines) == 6, proc.stdout
    for line in lines:
        fields = dict(kv.split("=", 1) for kv in line.split()[1:])
        assert 0 <= float(fields["acc"]) <= 100 and 0 < float(fields["majority"]) <= 100
        assert float(fields["acc_gain"]) == pytest.approx(float(fields["acc"]) - float(fields["majority"]), abs=0.011)
        assert abs(sum(map(float, fields["oracle_shares"].split(","))) - 1) < 0.01
    assert re.search(r"level=sequence estimator=sequence ", proc.stdout)


@pytest.mark.parametrize("flag,value,needle", [
    ("--oracles", "X:0.1", "--oracles"),
    ("--oracles", "C:abc", "--oracles"),
    ("--estimators", "token-bogus", "--estimators"),
])
def test_bad_flags_are_one_line_errors(flag, value, needle):
    proc = run_probe("data-bin-that-is-never-read", "--path", "never-read.pt", flag, value)
    proc.args = ["estimator_probe.py"]  # the program name the error line starts with
    assert_one_line_error(proc, needle)
