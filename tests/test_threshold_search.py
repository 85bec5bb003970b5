"""fairseq_dat.cli.threshold_search on a tiny random adaptive model (token-geometric estimator) and a
40-sentence Multi30k slice binarized here with fairseq-preprocess: one encoder pass per batch across
settings, BLEU/AE equal to fairseq-generate's, a non-dominated Pareto front, calibration."""
import contextlib
import io
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fairseq.data import Dictionary

from cli_helpers import multi30k_bpe_text
from helpers import tiny_model
from fairseq_dat.cli import threshold_search as ts
from fairseq_dat.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GEN_FLAGS = ["--beam", "5", "--batch-size", "8", "--max-len-b", "10"]  # shared by both tools


def run(*argv):
    proc = subprocess.run([str(BIN / argv[0]), *map(str, argv[1:])], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    return proc


def save_checkpoint(data_bin: Path, path: Path, extra=()) -> Path:
    """A tiny random adaptive_transformer over the data's dictionary, saved as fairseq-train would
    (an argparse namespace the loader upgrades to a config)."""
    dictionary = Dictionary.load(str(data_bin / "dict.en.txt"))
    model, _, args = tiny_model(extra=[*extra, "--task", "adaptive_translation"], dictionary=dictionary)
    args.data, args.source_lang, args.target_lang = str(data_bin), "de", "en"
    torch.save({"args": args, "cfg": None, "model": model.state_dict(), "extra_state": {"train_iterator": None},
                "optimizer_history": [{"criterion_name": "AdaptiveLabelSmoothedCrossEntropyCriterion",
                                       "optimizer_name": "Adam", "lr_scheduler_state": {"best": None},
                                       "num_updates": 0}]}, path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(data-bin, checkpoint): 40 valid and 40 test pairs of Multi30k BPE text; the dictionary is
    built from all three splits so no reference word is unknown."""
    tmp = tmp_path_factory.mktemp("threshold_search")
    bpe_dir = multi30k_bpe_text(tmp)
    text = tmp / "text"
    text.mkdir()
    for lang in ("de", "en"):
        splits = {s: (bpe_dir / f"{s}.{lang}").read_text().splitlines()[:40] for s in ("train", "valid", "test")}
        (text / f"train.{lang}").write_text("\n".join(splits["train"] + splits["valid"] + splits["test"]) + "\n")
        for split in ("valid", "test"):
            (text / f"{split}.{lang}").write_text("\n".join(splits[split]) + "\n")
    proc = run("fairseq-preprocess", "--source-lang", "de", "--target-lang", "en", "--joined-dictionary",
               "--trainpref", text / "train", "--validpref", text / "valid", "--testpref", text / "test",
               "--destdir", tmp / "bin", "--workers", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tmp / "bin", save_checkpoint(tmp / "bin", tmp / "geometric.pt", ["--depth-estimator", "token-geometric"])


@pytest.fixture(scope="module")
def search(tiny, tmp_path_factory):
    """One CLI run: sweep 0.3/0.5/0.7 on valid, raw BPE tokens scored (--remove-bpe none), calibration."""
    data, ckpt = tiny
    out = tmp_path_factory.mktemp("search") / "search.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        result = ts.main([str(data), "--path", str(ckpt), "--thresholds", "0.3,0.5,0.7", *GEN_FLAGS,
                          "--remove-bpe", "none", "--calibrate", "--max-bleu-drop", "0.5", "--out", str(out)])
    return result, stdout.getvalue(), out


def point(result, setting, subset="valid", role=None):
    return next(p for p in result["points"] if p["setting"] == setting and p["subset"] == subset
                and (role is None or p["role"] == role))


def test_encoder_runs_once_per_batch_across_settings(tiny):
    data, ckpt = tiny
    gen = ts.generation_config(5, 1.0, 0.0, 10, 1)
    session = ts.SearchSession(str(data), str(ckpt), gen, 8, None, None, 1, "subword_nmt")
    encoder, calls = session.models[0].encoder, []
    real_forward = encoder.forward
    encoder.forward = lambda *a, **k: calls.append(1) or real_forward(*a, **k)
    settings = [ts.FULL_DEPTH, ts.Setting("estimator", "0.3"), ts.Setting("estimator", "0.7"),
                ts.Setting("confidence", "0.5"), ts.Setting("fixed", fixed_exit=1)]
    together = session.evaluate("valid", "--valid-subset", settings, ["search"] * len(settings))
    batches = len(session.batches("valid", "--valid-subset"))
    assert batches == 5 and len(calls) == batches == session.memo.computed  # not 5 settings x 5 batches
    # sharing the encoder output changes nothing: each setting alone decodes the same
    for s, shared in zip(settings[1:3], together[1:3]):
        alone = session.evaluate("valid", "--valid-subset", [s], ["search"])[0]
        assert (alone["bleu_string"], alone["exit_summary"]) == (shared["bleu_string"], shared["exit_summary"])
    assert together[-1]["ae"] == 1.0 and together[0]["ae"] == 3.0
    session.max_sentences = 8  # --max-sentences: sentence ids below 8, not the 8 first in length order
    assert sorted(i for b in session.batches("valid", "--valid-subset") for i in b["id"].tolist()) == list(range(8))
    assert together[-1]["flops_per_token"] < together[1]["flops_per_token"] < together[0]["flops_per_token"]


def test_bleu_and_exits_equal_fairseq_generate(tiny, search):
    """Same batches, generator and scorer as fairseq-generate: its BLEU line and AE line, verbatim."""
    data, ckpt = tiny
    result, _, _ = search
    common = [data, "--user-dir", REPO / "fairseq_dat", "--task", "adaptive_translation", "--path", ckpt,
              "--gen-subset", "valid", "--cpu", *GEN_FLAGS]
    gen = run("fairseq-generate", *common, "--exit-threshold", "0.5")
    assert gen.returncode == 0, gen.stderr[-2000:]
    ours = point(result, "thr0.5")
    assert f"Generate valid with beam=5: {ours['bleu_string']}\n" in gen.stdout
    assert ours["exit_summary"] + "\n" in gen.stdout
    assert ours["sentences"] == 40 and 1.0 < ours["ae"] < 3.0


def test_bleu_with_remove_bpe_equals_fairseq_generate(tiny):
    """--remove-bpe: merged words and unknown-word escapes scored as generate.py does (full depth)."""
    data, ckpt = tiny
    session = ts.SearchSession(str(data), str(ckpt), ts.generation_config(5, 1.0, 0.0, 10, 1), 8, None, None, 1,
                               "subword_nmt")
    ours = session.evaluate("test", "--test-subset", [ts.FULL_DEPTH], ["reference"])[0]
    gen = run("fairseq-generate", data, "--user-dir", REPO / "fairseq_dat", "--task", "adaptive_translation",
              "--path", ckpt, "--gen-subset", "test", "--cpu", *GEN_FLAGS, "--remove-bpe")
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert f"Generate test with beam=5: {ours['bleu_string']}\n" in gen.stdout
    assert "@@" in (data.parent / "text" / "test.en").read_text()  # merging really happened


def dominated(p, q):
    """q dominates p."""
    return q["ae"] <= p["ae"] and q["bleu"] >= p["bleu"] and (q["ae"] < p["ae"] or q["bleu"] > p["bleu"])


def test_pareto_front_is_non_dominated_and_covers_the_rest(search):
    rng = random.Random(0)
    synthetic = [{"setting": str(i), "ae": rng.choice([1.0, 1.5, 2.0, 2.5]) + rng.random(),
                  "bleu": round(rng.uniform(20, 35), 1)} for i in range(300)]
    result, _, _ = search
    searched = [p for p in result["points"] if p["role"] == "search"]
    for points in (synthetic, searched):
        front = ts.pareto_front(points)
        assert front and all(not dominated(p, q) for p in front for q in points)
        assert all(any(dominated(p, f) or (f["ae"], f["bleu"]) == (p["ae"], p["bleu"]) for f in front)
                   for p in points)
        assert [f["ae"] for f in front] == sorted(f["ae"] for f in front)
    assert result["pareto"] == [p["setting"] for p in ts.pareto_front(searched)]


def test_calibration_picks_the_cheapest_setting_within_the_drop():
    pts = [{"setting": s, "ae": ae, "bleu": b} for s, ae, b in
           (("a", 1.2, 33.0), ("b", 1.5, 30.0), ("c", 2.0, 34.6), ("d", 2.0, 34.8), ("e", 2.5, 34.9))]
    assert ts.pick_calibrated(pts, 35.0, 0.5)["setting"] == "d"  # c and d tie on AE: the better BLEU
    assert ts.pick_calibrated(pts, 35.0, 0.2)["setting"] == "d"
    assert ts.pick_calibrated(pts, 35.0, 0.1)["setting"] == "e"
    assert ts.pick_calibrated(pts, 35.0, 2.0)["setting"] == "a"
    assert ts.pick_calibrated(pts, 35.0, 0.0) is None


def test_calibrate_cli_line_matches_its_valid_and_test_decodes(search):
    result, stdout, out = search
    line = [l for l in stdout.splitlines() if l.startswith("CALIBRATION ")]
    assert len(line) == 1 and out.exists()
    fields = dict(kv.split("=", 1) for kv in line[0].split()[1:])
    assert set(fields) == {"threshold", "valid_drop", "test_drop", "held", "ae"}
    full, searched = point(result, "full"), [p for p in result["points"] if p["role"] == "search"]
    eligible = [p for p in searched if p["bleu"] >= full["bleu"] - 0.5]
    chosen = min(eligible, key=lambda p: (p["ae"], -p["bleu"]))
    assert fields["threshold"] == chosen["threshold"] == result["calibration"]["threshold"]
    test_full = point(result, "full", "test", "calibration")
    test_chosen = point(result, chosen["setting"], "test", "calibration")
    drop = test_full["bleu"] - test_chosen["bleu"]
    assert float(fields["test_drop"]) == pytest.approx(drop, abs=0.006)
    assert fields["held"] == ("yes" if drop <= 0.5 else "no")
    assert float(fields["ae"]) == pytest.approx(test_chosen["ae"], abs=5e-4)
    assert "Pareto front, valid" in stdout and "full depth (reference)" in stdout


def test_setting_labels_round_trip():
    """The names of settings in log files and tables (read back by make_tables) name one setting each."""
    for setting in (ts.FULL_DEPTH, ts.Setting("uniform"), ts.Setting("fixed", fixed_exit=3),
                    ts.Setting("estimator", "0.5"), ts.Setting("confidence", "0.2,0.9")):
        assert ts.Setting.from_label(setting.label) == setting
    assert [ts.Setting.from_label(label) for label in ("thr", "exit", "best")] == [None, None, None]


def test_random_draws_and_buckets():
    draws = ts.random_settings("confidence", 5, 7, seed=3)
    assert draws == ts.random_settings("confidence", 5, 7, seed=3) and len(set(draws)) == 7
    for s in draws:
        values = [float(v) for v in s.threshold.split(",")]
        assert len(values) == 5 and all(0 < v < 1 for v in values) and s.label == "conf" + s.threshold
    pts = [{"setting": s, "ae": ae, "bleu": b} for s, ae, b in
           (("a", 1.1, 30.0), ("b", 1.3, 31.0), ("c", 3.9, 34.0), ("d", 6.0, 35.0), ("e", 5.8, 35.0))]
    buckets = ts.best_per_bucket(pts, buckets=5, num_exits=6)  # bins of width 1 over [1, 6]
    assert [(b["bucket"], b["setting"]) for b in buckets] == [(0, "b"), (2, "c"), (4, "e")]


def test_random_mode_draws_one_threshold_per_block(tiny, tmp_path):
    data, ckpt = tiny
    with contextlib.redirect_stdout(io.StringIO()):
        result = ts.main([str(data), "--path", str(ckpt), "--mode", "random", "--samples", "3", "--buckets", "2",
                          "--max-sentences", "8", *GEN_FLAGS])
    searched = [p for p in result["points"] if p["role"] == "search"]
    assert len(searched) == 3 and all(len(p["threshold"].split(",")) == 2 for p in searched)  # N − 1 = 2
    assert all(p["sentences"] == 8 for p in result["points"])
    assert result["buckets"] and {b["setting"] for b in result["buckets"]} <= {p["setting"] for p in searched}


@pytest.mark.parametrize("flags, needle", [
    (["--thresholds", "0.5,1.5"], "--thresholds must be numbers in [0, 1]"),
    (["--thresholds", "nan"], "--thresholds must be numbers in [0, 1]"),
    (["--max-bleu-drop", "-1"], "--max-bleu-drop must be"),
    (["--samples", "0", "--mode", "random"], "--samples must be a positive integer"),
    (["--valid-subset", "nosuch"], "--valid-subset nosuch"),
])
def test_bad_flags_name_the_flag(tiny, flags, needle):
    data, ckpt = tiny
    with pytest.raises(ConfigError, match=re.escape(needle)):
        ts.main([str(data), "--path", str(ckpt), *GEN_FLAGS, *flags])


def test_bad_files_name_the_flag(tiny, tmp_path):
    data, _ = tiny
    with pytest.raises(ConfigError, match="--path: checkpoint .* not found"):
        ts.main([str(data), "--path", str(tmp_path / "missing.pt")])
    with pytest.raises(ConfigError, match="DATA: .* is not a directory"):
        ts.main([str(tmp_path / "nodata"), "--path", str(tmp_path / "missing.pt")])
    plain = save_checkpoint(data, tmp_path / "no_estimator.pt")
    with pytest.raises(ConfigError, match="--strategy estimator: this checkpoint has no depth estimator"):
        ts.main([str(data), "--path", str(plain), *GEN_FLAGS])


def test_remove_bpe_with_exit_threshold_equals_fairseq_generate(tiny):
    """Regression: fairseq-generate --remove-bpe grows the target dictionary while scoring; the decoder
    must size its mixed-exit logits by the classifiers, not by len(dictionary)."""
    data, ckpt = tiny
    session = ts.SearchSession(str(data), str(ckpt), ts.generation_config(5, 1.0, 0.0, 10, 1), 8, None, None, 1,
                               "subword_nmt")
    ours = session.evaluate("test", "--test-subset", [ts.Setting("estimator", "0.5")], ["search"])[0]
    gen = run("fairseq-generate", data, "--user-dir", REPO / "fairseq_dat", "--task", "adaptive_translation",
              "--path", ckpt, "--gen-subset", "test", "--cpu", *GEN_FLAGS, "--remove-bpe", "--exit-threshold", "0.5")
    assert gen.returncode == 0, gen.stderr[-300:]
    assert f"Generate test with beam=5: {ours['bleu_string']}\n" in gen.stdout
