"""``python -m fairseq_dat.cli.estimator_check``: the estimator's parameters against their rebuilt
initialization, and the valid line written at the checkpoint's update (not the last one: with
``--patience`` the best checkpoint is older)."""
import subprocess
import sys

from cli_helpers import adaptive_checkpoint, check_ok, corpus, tool_env  # noqa: F401
from fairseq_dat.cli.estimator_check import valid_metrics, verdict

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
