"""End to end through fairseq's own command-line tools on a slice of real Multi30k data:
fairseq-preprocess, fairseq-train (aligned, then the estimator stage from the stage-1 checkpoint),
fairseq-generate --task adaptive_translation with --exit-threshold, --fixed-exit and --print-exits."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import multi30k_bpe_text
from fairseq_dat.exit_summary import ExitSummary, parse_exit_summary

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(*argv, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([str(BIN / argv[0]), *map(str, argv[1:])], capture_output=True, text=True, env=env,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """300 training pairs (Multi30k BPE text from examples/multi30k_de_en/prepare.sh, or built here
    from ../shared with LIMIT) binarized with a joined dictionary."""
    tmp = tmp_path_factory.mktemp("cli")
    bpe = multi30k_bpe_text(tmp)
    text = tmp / "text"
    text.mkdir()
    for split, n in (("train", 300), ("valid", 40), ("test", 24)):
        for lang in ("de", "en"):
            lines = (bpe / f"{split}.{lang}").read_text().splitlines()[:n]
            (text / f"{split}.{lang}").write_text("\n".join(lines) + "\n")
    run("fairseq-preprocess", "--source-lang", "de", "--target-lang", "en", "--joined-dictionary",
        "--trainpref", text / "train", "--validpref", text / "valid", "--testpref", text / "test",
        "--destdir", tmp / "bin", "--workers", "1")
    return tmp


def exit_summary_after_bleu(output: str, subset="test") -> ExitSummary:
    """The ``Adaptive exits`` line that follows fairseq-generate's BLEU line, parsed."""
    lines = output.splitlines()
    bleu = [i for i, line in enumerate(lines) if line.startswith(f"Generate {subset} with beam=")]
    summaries = [parse_exit_summary(line) for line in lines[bleu[0] + 1:]] if bleu else []
    summaries = [s for s in summaries if s is not None]
    assert summaries, output[-2000:]
    return summaries[0]


TRAIN_ARGS = ["--user-dir", REPO / "fairseq_dat", "--task", "adaptive_translation", "--arch",
              "adaptive_transformer_tiny", "--criterion", "adaptive_label_smoothed_cross_entropy",
              "--label-smoothing", "0.1", "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "2000",
              "--cpu", "--log-format", "simple", "--log-interval", "1", "--no-epoch-checkpoints", "--seed", "1"]


def test_train_two_stages_then_generate_with_exit_threshold(tiny_data):
    data = tiny_data / "bin"
    stage1, stage2 = tiny_data / "stage1", tiny_data / "stage2"
    proc = run("fairseq-train", data, *TRAIN_ARGS, "--max-update", "6", "--save-dir", stage1)
    assert re.search(r"loss_exit1=[0-9.]+.*loss_exit3=[0-9.]+.*ppl_exit3=", proc.stdout + proc.stderr)
    proc = run("fairseq-train", data, *TRAIN_ARGS, "--max-update", "4", "--save-dir", stage2,
               "--depth-estimator", "token-geometric", "--depth-oracle", "correctness", "--oracle-lambda", "0.1",
               "--exit-loss-alpha", "1.0", "--finetune-from-model", stage1 / "checkpoint_last.pt")
    logs = proc.stdout + proc.stderr
    assert "newly initialized" in logs and "decoder.depth_estimator" in logs
    assert re.search(r"exit_loss[ =]", logs) and re.search(r"oracle_ae[ =]", logs)

    gen = run("fairseq-generate", data, "--user-dir", REPO / "fairseq_dat", "--task", "adaptive_translation",
              "--path", stage2 / "checkpoint_last.pt", "--beam", "3", "--batch-size", "8", "--max-len-b", "10",
              "--cpu", "--exit-threshold", "0.5", "--print-exits", "--remove-bpe").stdout
    lines = gen.splitlines()
    summary = exit_summary_after_bleu(gen)
    assert summary.num_exits == 3 and summary.tokens == sum(summary.exit_hist) > 0
    hyps = {l.split("\t")[0][2:]: l for l in lines if l.startswith("H-")}
    exits = {l.split("\t")[0][2:]: l.split("\t")[1].split() for l in lines if l.startswith("E-")}
    assert len(hyps) == len(exits) == 24
    for sid, line in hyps.items():
        n_tokens = len(line.split("\t")[2].split()) if len(line.split("\t")) > 2 else 0
        assert all(e in {"1", "2", "3"} for e in exits[sid])
        assert len(exits[sid]) >= n_tokens  # one exit per output token, EOS included (BPE merged in H)
    assert 1.0 <= summary.average_exit <= 3.0


@pytest.fixture(scope="module")
def stage1_checkpoint(tiny_data):
    save = tiny_data / "stage1_shared"
    run("fairseq-train", tiny_data / "bin", *TRAIN_ARGS, "--max-update", "3", "--save-dir", save)
    return save / "checkpoint_last.pt"


@pytest.mark.parametrize("oracle", ["likelihood", "correctness"])
@pytest.mark.parametrize("estimator", ["sequence", "token-multinomial", "token-geometric",
                                       "sequence-poisson-binomial", "token-poisson-binomial"])
def test_every_estimator_and_oracle_trains_and_decodes(tiny_data, stage1_checkpoint, estimator, oracle):
    """Stage 2 with each estimator x oracle through fairseq-train lands in the checkpoint, and
    fairseq-generate --exit-threshold decodes with it (AE line after the BLEU line)."""
    data, save = tiny_data / "bin", tiny_data / f"stage2-{estimator}-{oracle}"
    proc = run("fairseq-train", data, *TRAIN_ARGS, "--max-update", "2", "--save-dir", save,
               "--depth-estimator", estimator, "--depth-oracle", oracle, "--oracle-lambda", "0.1",
               "--exit-loss-alpha", "1.0", "--finetune-from-model", stage1_checkpoint)
    assert re.search(r"exit_loss[ =][0-9.]+", proc.stdout + proc.stderr)
    gen = run("fairseq-generate", data, "--user-dir", REPO / "fairseq_dat", "--task", "adaptive_translation",
              "--path", save / "checkpoint_last.pt", "--beam", "2", "--batch-size", "8", "--max-len-b", "5",
              "--cpu", "--exit-threshold", "0.5").stdout
    assert exit_summary_after_bleu(gen).num_exits == 3


def test_fixed_exit_and_bad_flags_on_the_command_line(tiny_data):
    data, ckpt_dir = tiny_data / "bin", tiny_data / "fixed"
    run("fairseq-train", data, *TRAIN_ARGS, "--max-update", "2", "--save-dir", ckpt_dir)
    common = ["--user-dir", REPO / "fairseq_dat", "--task", "adaptive_translation", "--path",
              ckpt_dir / "checkpoint_last.pt", "--beam", "2", "--batch-size", "8", "--max-len-b", "5", "--cpu"]
    out = run("fairseq-generate", data, *common, "--fixed-exit", "1").stdout
    summary = exit_summary_after_bleu(out)
    assert (summary.num_exits, summary.average_exit, summary.exit_hist[1:]) == (3, 1.0, (0, 0))
    for flags, needle in ((["--fixed-exit", "7"], "--fixed-exit must be in 1..3"),
                          (["--exit-threshold", "nan"], "--exit-threshold"),
                          (["--exit-threshold", "0.5"], "--exit-threshold needs a checkpoint with a trained depth estimator")):
        proc = run("fairseq-generate", data, *common, *flags, check=False)
        assert proc.returncode != 0
        assert needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-1500:]
        assert "H-" not in proc.stdout  # stopped before decoding anything


def test_average_last_checkpoints(tiny_data):
    data, run_dir = tiny_data / "bin", tiny_data / "avg"
    run("fairseq-train", data, *TRAIN_ARGS, "--max-update", "3", "--save-interval-updates", "1",
        "--save-dir", run_dir)
    import torch
    from fairseq import checkpoint_utils
    from fairseq_dat.cli.average_checkpoints import average, last_checkpoints
    paths = last_checkpoints(str(run_dir), 3, "updates")
    assert [Path(p).name for p in paths] == ["checkpoint_1_3.pt", "checkpoint_1_2.pt", "checkpoint_1_1.pt"]
    averaged = average(paths)["model"]
    models = [checkpoint_utils.load_checkpoint_to_cpu(p)["model"] for p in paths]
    key = "decoder.exit_projections.0.weight"
    torch.testing.assert_close(averaged[key], sum(m[key] for m in models) / 3)
    proc = subprocess.run([sys.executable, "-m", "fairseq_dat.cli.average_checkpoints", str(run_dir), "--last", "9",
                           "--output", str(run_dir / "avg.pt")], capture_output=True, text=True)
    assert proc.returncode != 0 and "--last 9" in proc.stderr and "Traceback" not in proc.stderr
