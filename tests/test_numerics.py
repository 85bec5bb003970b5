"""Reduced precision: fp16 on a GPU (skipped without CUDA) and bf16, which this fairseq cannot do on CPU.

- fairseq 0.12's ``--bf16`` implies ``--tpu`` (options.py) and fails without torch_xla in
  ``utils.get_tpu_device``; ``--task adaptive_translation`` refuses it up front in one line
  (fairseq_dat/checks.py). With fairseq's plain ``--task translation`` the crash remains.
- fp16 training with the depth-estimator loss must keep its loss scale (no repeated overflow), and
  fp16 decoding must match fp32 decoding in BLEU within 0.1, at full depth and with early exits
  (the exit tests compare probabilities in float32).
"""
import math
import re

import pytest
import torch

from cli_helpers import assert_one_line_error, build_corpus, check_ok, run_tool, train_args, train_log

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 tests need a CUDA GPU")
FP16_UPDATES = 300


def test_bf16_on_cpu_is_a_one_line_error_naming_the_flag(corpus, tmp_path):
    save = tmp_path / "save"
    proc = run_tool("fairseq-train", *train_args(corpus, save, "--bf16"))
    assert_one_line_error(proc, "--bf16", "torch_xla", "--fp16")
    assert not save.exists() or not any(save.iterdir())


def gpu_train_args(*args, **kwargs):
    return [a for a in train_args(*args, **kwargs) if a != "--cpu"]


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory):
    """5,000 Multi30k pairs, a few hundred fp16 updates of the estimator stage on the GPU."""
    data = build_corpus(tmp_path_factory.mktemp("multi30k_5k"), n_train=5000, n_valid=200, n_test=500)
    save = tmp_path_factory.mktemp("fp16")
    proc = check_ok(run_tool("fairseq-train", *gpu_train_args(
        data, save, "--fp16", "--depth-estimator", "token-geometric", "--exit-loss-alpha", "1",
        "--max-tokens", "4096", "--lr", "0.001", "--log-interval", "10", max_update=FP16_UPDATES), timeout=600))
    return data, save / "checkpoint_last.pt", proc.stdout + proc.stderr


@needs_cuda
def test_fp16_training_with_the_estimator_loss_keeps_its_loss_scale(fp16_run):
    _, _, out = fp16_run
    log = train_log(out)
    assert max(log) == FP16_UPDATES
    for record in log.values():
        assert math.isfinite(record["loss"]) and math.isfinite(record["exit_loss"]), record
    assert out.count("gradient overflow detected") <= 8  # the scaler's first calibration only
    assert log[max(log)]["loss_scale"] >= 1.0
    assert log[max(log)]["loss"] < log[min(log)]["loss"] - 1.0


def bleu(output):
    m = re.search(r"BLEU4 = ([\d.]+)", output)
    assert m, output[-2000:]
    return float(m.group(1))


@needs_cuda
@pytest.mark.parametrize("exit_flags", [(), ("--exit-threshold", "0.5")])
def test_fp16_decoding_matches_fp32_in_bleu(fp16_run, exit_flags):
    data, checkpoint, _ = fp16_run
    common = (data, "--user-dir", "fairseq_dat", "--task", "adaptive_translation", "--path", checkpoint,
              "--beam", "5", "--batch-size", "64", *exit_flags)
    fp32 = bleu(check_ok(run_tool("fairseq-generate", *common, timeout=300)).stdout)
    fp16 = bleu(check_ok(run_tool("fairseq-generate", *common, "--fp16", timeout=300)).stdout)
    assert fp32 > 1.0, "the model should translate something after the fp16 run"
    assert abs(fp16 - fp32) <= 0.1, (fp16, fp32)
