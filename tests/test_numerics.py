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


# ---- --autocast-bf16: mixed precision that works on a CPU ---------------------------------------

def autocast_task(*extra):
    """A tiny adaptive model, the adaptive criterion and fairseq's Adam under ``--task adaptive_translation``
    (dropout 0: the float32 and bfloat16 steps see the same network)."""
    from fairseq import optim
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_dat.tasks.adaptive_translation import AdaptiveTranslationTask
    from helpers import parse_model_args, tiny_dictionary

    d = tiny_dictionary()
    args = parse_model_args(extra=("--task", "adaptive_translation", "--criterion",
                                   "adaptive_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
                                   "--optimizer", "adam", "--lr", "0.001", *extra))
    task = AdaptiveTranslationTask(args, d, d)
    torch.manual_seed(1)
    model = task.build_model(args)
    return task, model, task.build_criterion(args), optim.build_optimizer(
        convert_namespace_to_omegaconf(args).optimizer, list(model.parameters())), d


def linear_output_dtypes(model):
    """The dtypes the decoder's and exits' Linear layers produce in the next forward passes."""
    seen = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
    return seen


def tiny_sample(d):
    from helpers import random_batch
    net_input, target = random_batch(d, bsz=6, src_len=8, tgt_len=7)
    return {"net_input": net_input, "target": target, "ntokens": int(target.ne(d.pad()).sum()),
            "nsentences": target.size(0), "id": torch.arange(target.size(0))}


def test_autocast_bf16_runs_matrix_products_in_bf16_and_keeps_float32_weights_and_gradients():
    task32, model32, crit32, opt32, d = autocast_task()
    task16, model16, crit16, opt16, _ = autocast_task("--autocast-bf16")
    model16.load_state_dict(model32.state_dict())
    sample = tiny_sample(d)
    dtypes32, dtypes16 = linear_output_dtypes(model32), linear_output_dtypes(model16)
    loss32, n32, _ = task32.train_step(sample, model32, crit32, opt32, update_num=0)
    loss16, n16, _ = task16.train_step(sample, model16, crit16, opt16, update_num=0)
    assert dtypes32 == {torch.float32} and dtypes16 == {torch.bfloat16}
    assert n16 == n32
    assert abs(loss16.item() - loss32.item()) <= 0.02 * abs(loss32.item())  # bf16: ~3 significant digits
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model16.parameters()
               if p.grad is not None)
    # the same gradient, to bf16's precision: direction and norm of all parameters' gradients together
    g32, g16 = (torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]) for m in (model32, model16))
    assert torch.nn.functional.cosine_similarity(g32, g16, dim=0) > 0.99
    assert abs(g16.norm() / g32.norm() - 1) < 0.05
    dtypes16.clear()
    with torch.no_grad():
        task16.valid_step(sample, model16, crit16)
    assert dtypes16 == {torch.bfloat16}


def test_autocast_bf16_with_fp16_is_a_one_line_error_naming_both(corpus, tmp_path):
    save = tmp_path / "save"
    proc = run_tool("fairseq-train", *train_args(corpus, save, "--autocast-bf16", "--amp"))
    assert_one_line_error(proc, "--autocast-bf16", "--amp")
    assert not save.exists() or not any(save.iterdir())


def test_fairseq_train_with_autocast_bf16_trains_and_saves_float32_weights(corpus, tmp_path):
    save = tmp_path / "save"
    proc = check_ok(run_tool("fairseq-train", *train_args(corpus, save, "--autocast-bf16", "--log-interval", "1",
                                                          max_update=8)))
    log = train_log(proc.stdout + proc.stderr)
    assert max(log) == 8 and all(math.isfinite(r["loss"]) for r in log.values())
    state = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert all(t.dtype == torch.float32 for t in state["model"].values() if t.is_floating_point())


def test_fairseq_generate_with_autocast_bf16_prints_bleu_and_ae(corpus, adaptive_checkpoint):
    common = (corpus, "--user-dir", "fairseq_dat", "--task", "adaptive_translation", "--path", adaptive_checkpoint,
              "--beam", "5", "--batch-size", "8", "--exit-threshold", "0.5", "--cpu")
    fp32 = check_ok(run_tool("fairseq-generate", *common)).stdout
    bf16 = check_ok(run_tool("fairseq-generate", *common, "--autocast-bf16")).stdout
    assert re.search(r"^Adaptive exits \(N=\d\): AE=", bf16, re.M), bf16[-1500:]
    assert abs(bleu(bf16) - bleu(fp32)) <= 5.0  # a 3-update model: near-ties flip under bf16's rounding
    assert bf16.count("\nH-") == fp32.count("\nH-") > 0
