"""Checkpoints from elsewhere: a stock ``--arch transformer`` checkpoint starts an adaptive model, and
an adaptive checkpoint decodes with fairseq's stock task and generator.

Decision (estimator stage from a checkpoint without exit heads): accepted. ``--finetune-from-model``
of a stock transformer into a model with ``--depth-estimator`` loads the trunk, starts the exit
classifiers as copies of the trunk's output projection and the estimator from its initialization,
and one log line names every newly initialized tensor; the aligned loss then trains the exits while
the estimator learns, so the paper's two stages may also be run as one.
"""
import torch
from fairseq import checkpoint_utils, options, tasks

from cli_helpers import check_ok, hypotheses, run_tool, train_args, train_log

NEW_EXITS = "decoder.exit_projections.0.weight, decoder.exit_projections.1.weight"


def newly_initialized_line(output):
    lines = [line for line in output.splitlines() if "newly initialized" in line]
    assert len(lines) == 1, output[-3000:]
    return lines[0]


def test_init_from_transformer_copies_the_trunk_and_starts_exits_from_its_classifier(corpus, stock_checkpoint):
    """Python level, real fairseq parser/task/checkpoint loader: every stock tensor lands unchanged."""
    parser = options.get_training_parser()
    argv = [str(corpus), "--user-dir", "fairseq_dat", "--task", "translation",
            "--arch", "adaptive_transformer_tiny", "--init-from-transformer", str(stock_checkpoint)]
    args = options.parse_args_and_arch(parser, argv)
    model = tasks.setup_task(args).build_model(args)
    stock = checkpoint_utils.load_checkpoint_to_cpu(str(stock_checkpoint))["model"]
    own = model.state_dict()
    for key, value in stock.items():
        assert torch.equal(own[key], value), key
    for n in range(2):
        assert torch.equal(own[f"decoder.exit_projections.{n}.weight"], stock["decoder.output_projection.weight"])
    assert set(own) - set(stock) == {f"decoder.exit_projections.{n}.weight" for n in range(2)} | \
        {k for k in own if k.startswith("decoder.exit_layer_norms.")}


def test_init_from_transformer_on_the_command_line(corpus, stock_checkpoint, tmp_path):
    args = train_args(corpus, tmp_path, "--init-from-transformer", stock_checkpoint, "--no-save", max_update=2)
    proc = check_ok(run_tool("fairseq-train", *args))
    out = proc.stdout + proc.stderr
    assert newly_initialized_line(out).endswith(f"2 parameter tensors not in the checkpoint were newly initialized: "
                                                f"{NEW_EXITS}")
    assert f"trunk initialized from {stock_checkpoint}" in out
    assert sorted(train_log(out)) == [1, 2]


def test_estimator_stage_finetuned_from_a_stock_checkpoint(corpus, stock_checkpoint, tmp_path):
    """``--finetune-from-model`` (fairseq's own flag) with a checkpoint that has neither exit heads
    nor an estimator: accepted, the missing tensors are named, and the estimator loss is trained."""
    proc = check_ok(run_tool("fairseq-train", *train_args(
        corpus, tmp_path, "--finetune-from-model", stock_checkpoint, "--depth-estimator", "token-geometric",
        "--exit-loss-alpha", "1", max_update=3)))
    out = proc.stdout + proc.stderr
    line = newly_initialized_line(out)
    assert NEW_EXITS in line and "decoder.depth_estimator." in line
    assert f"loading pretrained model from {stock_checkpoint}" in out
    log = train_log(out)
    assert sorted(log) == [1, 2, 3] and all(r["exit_loss"] >= 0 for r in log.values())
    saved = checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "checkpoint_last.pt"))["model"]
    assert any(k.startswith("decoder.depth_estimator.") for k in saved)


def test_adaptive_checkpoint_decodes_in_the_stock_generator(corpus, adaptive_checkpoint):
    """fairseq's own translation task and SequenceGenerator on the adaptive checkpoint give the
    hypotheses and scores of the adaptive task without exit flags, and of the exit-aware path forced
    to the last block."""
    common = (corpus, "--user-dir", "fairseq_dat", "--path", adaptive_checkpoint, "--cpu", "--beam", "4",
              "--batch-size", "8", "--max-len-b", "12")
    runs = {name: hypotheses(check_ok(run_tool("fairseq-generate", *common, "--task", task, *extra)).stdout)
            for name, task, extra in (("stock", "translation", ()), ("adaptive", "adaptive_translation", ()),
                                      ("fixed_last", "adaptive_translation", ("--fixed-exit", "3")))}
    assert len(runs["stock"]) == 24
    for name in ("adaptive", "fixed_last"):
        assert runs[name].keys() == runs["stock"].keys()
        for sid, (score, tokens) in runs["stock"].items():
            assert runs[name][sid][1] == tokens, (name, sid)
            assert abs(runs[name][sid][0] - score) <= 2e-4, (name, sid)  # 4-decimal scores of two generators
    assert len({tokens for _, tokens in runs["stock"].values()}) > 1  # not one degenerate output
