"""``python -m fairseq_dat.cli.estimator_check``: the estimator's parameters against their rebuilt
initialization, and the valid line written at the checkpoint's update (not the last one: with
``--patience`` the best checkpoint is older)."""
import subprocess
import sys

import torch

from cli_helpers import adaptive_checkpoint, assert_one_line_error, check_ok, corpus, tool_env  # noqa: F401
from fairseq_dat.cli.estimator_check import gains_against_prior, paired_bootstrap, valid_metrics, verdict

LINE = ("2026-12-02 17:30:00 | INFO | valid | epoch 003 | valid on 'valid' subset | loss 4.1 | exit_loss {loss} | "
        "exit_acc {acc} | exit_majority 91.42 | oracle_entropy 0.59 | num_updates {updates} | best_exit_loss 0.604")


def write_log(tmp_path, rows):
    log = tmp_path / "train.log"
    log.write_text("\n".join(LINE.format(loss=loss, acc=acc, updates=u) for u, loss, acc in rows) + "\n")
    return log


def test_the_valid_line_of_the_checkpoints_update_is_used(tmp_path):
    log = write_log(tmp_path, [(700, 0.604, 93.0), (800, 0.613, 91.40), (900, 0.618, 91.41)])
    assert valid_metrics(str(log), 700)["exit_loss"] == 0.604
    assert valid_metrics(str(log), None)["exit_loss"] == 0.618  # no update known: the last line
    assert valid_metrics(str(log), 12345)["exit_loss"] == 0.618


def test_verdict_needs_moved_parameters_and_a_beaten_baseline():
    moved, still = {"w": {"relative": 0.5}}, {"w": {"relative": 0.001}}
    beats = {"exit_acc": 93.0, "exit_majority": 91.42, "exit_loss": 0.62, "oracle_entropy": 0.59}
    prior = {"exit_acc": 91.42, "exit_majority": 91.42, "exit_loss": 0.61, "oracle_entropy": 0.59}
    assert verdict(moved, beats, 1.0).startswith("ESTIMATOR learned=yes")
    assert verdict(moved, prior, 1.0).startswith("ESTIMATOR learned=no")
    assert verdict(still, beats, 1.0).startswith("ESTIMATOR learned=no")
    hair = {"exit_acc": 91.12, "exit_majority": 91.12, "exit_loss": 0.610, "oracle_entropy": 0.612}  # make demo, stop 19
    assert verdict(moved, hair, 1.0).startswith("ESTIMATOR learned=no")
    below = {"exit_acc": 91.12, "exit_majority": 91.12, "exit_loss": 0.590, "oracle_entropy": 0.612}
    assert verdict(moved, below, 1.0).startswith("ESTIMATOR learned=yes")


def test_end_to_end_on_a_trained_checkpoint(adaptive_checkpoint):  # noqa: F811
    proc = check_ok(subprocess.run([sys.executable, "-m", "fairseq_dat.cli.estimator_check", str(adaptive_checkpoint)],
                                   capture_output=True, text=True, timeout=300, env=tool_env()))
    lines = proc.stdout.strip().splitlines()
    weight = next(line for line in lines if line.startswith("decoder.depth_estimator.halting.0.weight: init_norm="))
    # 3 updates move it a little; a wrongly rebuilt initialization (another seed) would be ~1.4 away
    assert 0.0 < float(weight.split("relative=")[1]) < 0.5, weight
    assert lines[-1].startswith("ESTIMATOR learned=") and "params_moved=yes" in lines[-1], lines[-1]


def test_the_bootstrap_interval_excludes_zero_only_for_a_real_shift():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1000, generator=g)
    mean, low, high = paired_bootstrap(noise + 0.3, samples=500)
    assert low > 0 and low < mean < high, (mean, low, high)
    mean, low, high = paired_bootstrap(noise - noise.mean(), samples=500)
    assert low < 0 < high, (low, high)


def test_rows_of_one_sentence_move_together():
    """20 sentences of 50 identical tokens each carry 20 samples' worth of evidence, not 1,000."""
    g = torch.Generator().manual_seed(1)
    per_sentence = torch.randn(20, generator=g) + 0.2
    rows, groups = per_sentence.repeat_interleave(50), torch.arange(20).repeat_interleave(50)
    _, row_low, row_high = paired_bootstrap(rows, samples=500)
    _, group_low, group_high = paired_bootstrap(rows, groups, samples=500)
    assert group_high - group_low > 4 * (row_high - row_low), (row_low, row_high, group_low, group_high)


def test_gains_are_measured_against_the_oracles_own_distribution():
    g = torch.Generator().manual_seed(2)
    oracle = torch.multinomial(torch.tensor([0.5, 0.3, 0.2]), 600, replacement=True, generator=g)
    shares = torch.bincount(oracle, minlength=3).double() / 600
    prior = shares.log().float().expand(600, 3)
    same = gains_against_prior(prior, oracle, 3, samples=200)
    assert abs(same["loss_gain"][0]) < 1e-6 and abs(same["acc_gain"][0]) < 1e-9, same  # float32 log_q
    assert abs(same["entropy"] - float(-(shares * shares.log2()).sum())) < 1e-9
    knows = torch.full((600, 3), -6.0).scatter(1, oracle.unsqueeze(1), -0.01)
    sharp = gains_against_prior(knows, oracle, 3, samples=200)
    assert sharp["acc_gain"][1] > 30 and sharp["loss_gain"][1] > 1.0, sharp
    guesses = torch.randn(600, 3, generator=g).log_softmax(-1)
    noise = gains_against_prior(guesses, oracle, 3, samples=200)
    assert noise["acc_gain"][1] < 0 and noise["loss_gain"][1] < 0, noise


def test_the_interval_decides_over_the_logs_point_values():
    moved = {"w": {"relative": 0.5}}
    log_says_yes = {"exit_acc": 93.0, "exit_majority": 91.42, "exit_loss": 0.58, "oracle_entropy": 0.59}
    above = {"subset": "valid", "acc_gain": (1.0, 0.2, 1.8), "loss_gain": (0.01, -0.01, 0.03)}
    straddles = {"subset": "valid", "acc_gain": (1.5, -0.4, 3.4), "loss_gain": (0.02, -0.001, 0.04)}
    assert verdict(moved, log_says_yes, 1.0, significance=above).startswith("ESTIMATOR learned=yes")
    assert verdict(moved, log_says_yes, 1.0, significance=straddles).startswith("ESTIMATOR learned=no")
    assert verdict({"w": {"relative": 0.0}}, None, 1.0, significance=above).startswith("ESTIMATOR learned=no")


def test_significance_end_to_end(adaptive_checkpoint, corpus):  # noqa: F811
    """3 updates: the token estimator has not learned, and the recomputed gains must say so."""
    cmd = [sys.executable, "-m", "fairseq_dat.cli.estimator_check", str(adaptive_checkpoint), "--data", str(corpus),
           "--bootstrap", "200"]
    lines = check_ok(subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=tool_env())).stdout
    line = next(x for x in lines.splitlines() if x.startswith("SIGNIFICANCE "))
    assert "level=token" in line and "sentences=40" in line and "oracle=(C lambda=0.1 sigma=0)" in line, line
    assert lines.strip().splitlines()[-1].startswith("ESTIMATOR learned=no"), lines
    bad = subprocess.run(cmd + ["--subset", "nosuch"], capture_output=True, text=True, timeout=300, env=tool_env())
    bad.args = ["estimator_check.py"]  # the program name the error line starts with
    assert_one_line_error(bad, "--subset nosuch")
