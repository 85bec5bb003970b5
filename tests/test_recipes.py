"""The reproduction recipes' evaluation stage (examples/common/stages.sh) on a tiny real model.

``EVAL_SENTENCES=N`` decodes only the first N pairs of a split (the IWSLT14 smoke test's default:
decoding all 7,283 valid pairs per setting took minutes); these tests check that every setting of
the stage decodes exactly those pairs, and that a bad value is refused in one line.
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from fairseq.data import Dictionary

from cli_helpers import REPO, tool_env

RECIPE = REPO / "examples" / "iwslt14_de_en" / "reproduce.sh"


def run_recipe(tmp_path, corpus, checkpoint, *args, **env):
    """Lay out DATA_BIN (+ its .bpe text) and RUN_DIR/aligned as the recipe expects; run it."""
    data = tmp_path / "data"
    if not data.exists():
        data.symlink_to(corpus)
        (tmp_path / "data.bpe").symlink_to(corpus.parent / "text")
        (tmp_path / "runs" / "aligned").mkdir(parents=True)
        shutil.copy(checkpoint, tmp_path / "runs" / "aligned" / "checkpoint_best.pt")
    full_env = dict(tool_env(), SMOKE="1", DATA_BIN=str(data), RUN_DIR=str(tmp_path / "runs"), CONF_THRESHOLDS="0.9")
    full_env.update(env)
    return subprocess.run(["bash", str(RECIPE), *args], capture_output=True, text=True, env=full_env, timeout=600)


def test_eval_sentences_decodes_the_first_pairs_in_every_setting(tmp_path, corpus, adaptive_checkpoint):
    proc = run_recipe(tmp_path, corpus, adaptive_checkpoint, "eval", "aligned", "valid", EVAL_SENTENCES="7")
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = sorted((tmp_path / "runs" / "aligned").glob("generate-valid7-*.log"))
    settings = {re.match(r"generate-valid7-(.+)\.log", p.name).group(1) for p in logs}
    assert settings == {"full", "uniform", "exit1", "exit2", "exit3", "conf0.9"}
    vocab = Dictionary.load(str(corpus / "dict.en.txt"))
    first = [" ".join(w if vocab.index(w) != vocab.unk() else "<<unk>>" for w in line.split())
             for line in (corpus.parent / "text" / "valid.en").read_text(encoding="utf-8").splitlines()[:7]]
    for log in logs:
        text = log.read_text(encoding="utf-8")
        targets = [line.split("\t", 1)[1] for line in text.splitlines() if line.startswith("T-")]
        assert sorted(targets) == sorted(first), log.name
        assert re.search(r"AE=[0-9.]+", text), log.name
    summary = [line for line in proc.stdout.splitlines() if line.startswith("aligned")]
    assert len(summary) == 6 and all("valid7" in line and "BLEU4 = " in line for line in summary)


def test_the_recipe_finds_the_repos_environment_without_an_activated_venv(tmp_path, corpus, adaptive_checkpoint):
    """PATH without the fairseq tools (a shell where the venv is not activated): the stages take them
    from the repo's .venv instead of failing every setting with 'fairseq-generate: command not found'."""
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if d and not (Path(d) / "fairseq-generate").exists())
    proc = run_recipe(tmp_path, corpus, adaptive_checkpoint, "eval", "aligned", "valid", EVAL_SENTENCES="7", PATH=path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = [line for line in proc.stdout.splitlines() if line.startswith("aligned")]
    assert len(summary) == 6 and all("BLEU4 = " in line for line in summary), proc.stdout


def test_eval_sentences_must_be_a_positive_integer(tmp_path, corpus, adaptive_checkpoint):
    proc = run_recipe(tmp_path, corpus, adaptive_checkpoint, "eval", "aligned", "valid", EVAL_SENTENCES="all")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == "error: EVAL_SENTENCES must be a positive integer, got 'all'"
    assert not list((tmp_path / "runs" / "aligned").glob("generate-*.log"))


@pytest.mark.parametrize("train_subset, covered", [("train", 296), ("valid", 300)])
def test_only_the_training_split_is_batched_in_multiples(corpus, train_subset, covered):
    """fairseq 0.12 drops the last len % 8 sentences of a split with --required-batch-size-multiple 8;
    adaptive_translation keeps that for the training split only (300 pairs: 296 batched) and batches
    every other split whole (here the same 300 pairs loaded as a non-training split)."""
    from fairseq import options, tasks
    import fairseq_dat  # noqa: F401

    parser = options.get_generation_parser()
    args = options.parse_args_and_arch(parser, [str(corpus), "--task", "adaptive_translation",
                                                "--train-subset", train_subset, "--cpu"])
    task = tasks.setup_task(args)
    task.load_dataset("train")
    itr = task.get_batch_iterator(task.dataset("train"), max_sentences=64, required_batch_size_multiple=8)
    batches = list(itr.next_epoch_itr(shuffle=False))
    assert sum(len(b["id"]) for b in batches) == covered


def test_stage2_train_subset_must_be_a_binarized_split(tmp_path, corpus, adaptive_checkpoint):
    """STAGE2_TRAIN_SUBSET (the estimator stage on held-out sentences) names a split of DATA_BIN; a split
    that is not there stops the recipe in one line naming it, before any training."""
    proc = run_recipe(tmp_path, corpus, adaptive_checkpoint, "train", "sequence-LL+frozen",
                      STAGE2_TRAIN_SUBSET="heldout")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: STAGE2_TRAIN_SUBSET=heldout: ") and last.endswith("heldout.de-en.de.idx not found")
    assert not (tmp_path / "runs" / "sequence-LL+frozen").exists()


HOLD_OUT = REPO / "examples" / "multi30k_de_en" / "hold_out.sh"


def run_hold_out(*args, **env):
    return subprocess.run(["bash", str(HOLD_OUT), *map(str, args)], capture_output=True, text=True,
                          env=dict(tool_env(), **env), timeout=300)


def sentences(data, split, lang="de"):
    from fairseq.data import data_utils
    d = Dictionary.load(str(data / f"dict.{lang}.txt"))
    ds = data_utils.load_indexed_dataset(str(data / f"{split}.de-en.{lang}"), d)
    return [d.string(ds[i][:-1]) for i in range(len(ds))]


def test_hold_out_moves_the_last_training_pairs_to_the_held_out_splits(tmp_path, corpus):
    """hold_out.sh: train loses its last N pairs, which become the next heldout split, binarized with the same
    dictionary; valid/test are the source's; an existing output is kept; N must leave training pairs."""
    text, out = corpus.parent / "text", tmp_path / "split"
    check = run_hold_out("--pairs", 50, "--text", text, corpus, out)
    assert check.returncode == 0, check.stderr[-2000:]
    lines = (text / "train.de").read_text(encoding="utf-8").splitlines()
    assert sentences(out, "train") == lines[:250]
    assert sentences(out, "heldout") == lines[250:]  # the corpus has no test1..3: the pairs are the first heldout split
    assert (out / "dict.de.txt").read_text() == (corpus / "dict.de.txt").read_text()
    assert sentences(out, "valid") == sentences(corpus, "valid") and sentences(out, "test", "en") == sentences(corpus, "test", "en")
    again = run_hold_out("--pairs", 50, "--text", text, corpus, out)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    too_many = run_hold_out("--pairs", 300, "--text", text, corpus, tmp_path / "other")
    assert too_many.returncode != 0 and "--pairs 300" in too_many.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "other").exists()


def test_hold_out_with_a_seed_holds_out_a_random_sample_in_corpus_order(tmp_path, corpus):
    """--seed S: the held-out pairs are random.Random(S).sample of the line indices, both splits in corpus order,
    together the whole training set; their line numbers are written beside them; a bad seed is refused."""
    import random
    text = corpus.parent / "text"
    lines = (text / "train.de").read_text(encoding="utf-8").splitlines()
    en = (text / "train.en").read_text(encoding="utf-8").splitlines()
    picked = sorted(random.Random(7).sample(range(len(lines)), 50))
    out = tmp_path / "split"
    check = run_hold_out("--pairs", 50, "--seed", 7, "--text", text, corpus, out)
    assert check.returncode == 0, check.stderr[-2000:]
    assert sentences(out, "heldout") == [lines[i] for i in picked]
    assert sentences(out, "heldout", "en") == [en[i] for i in picked]
    held = set(picked)
    assert sentences(out, "train") == [line for i, line in enumerate(lines) if i not in held]
    assert (out / "heldout.lines").read_text().split() == [str(i + 1) for i in picked]
    assert picked != list(range(250, 300))  # not the last pairs
    other = run_hold_out("--pairs", 50, "--seed", 8, "--text", text, corpus, tmp_path / "other")
    assert other.returncode == 0 and sentences(tmp_path / "other", "heldout") != sentences(out, "heldout")
    bad = run_hold_out("--pairs", 50, "--seed", "x", "--text", text, corpus, tmp_path / "bad")
    assert bad.returncode != 0 and "--seed" in bad.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "bad").exists()


def test_hold_out_puts_the_extra_test_sets_first(tmp_path, corpus):
    """With test1 present (Multi30k's extra test sets), heldout = test1 and the held-out pairs come next."""
    source = tmp_path / "source"
    shutil.copytree(corpus, source)
    for name in os.listdir(corpus):
        if name.startswith("test."):
            shutil.copy(corpus / name, source / name.replace("test.", "test1.", 1))
    out = tmp_path / "split"
    check = run_hold_out("--pairs", 20, "--text", corpus.parent / "text", source, out)
    assert check.returncode == 0, check.stderr[-2000:]
    lines = (corpus.parent / "text" / "train.de").read_text(encoding="utf-8").splitlines()
    assert sentences(out, "heldout") == sentences(corpus, "test") and sentences(out, "heldout1") == lines[280:]
    assert not (out / "heldout2.de-en.de.bin").exists()
