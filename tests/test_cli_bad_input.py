"""Bad input on the command line: each case ends with one line ``<prog>: error: …`` naming the flag or
file (no traceback, exit status 1), and nothing is lost: no checkpoint or ``crash.pt`` is written by a
run that stops on a flag, no partial hypotheses are printed by a run that stops before decoding, and
the translations of the good lines around a bad one are printed.

The data-directory and dictionary checks live in ``--task adaptive_translation`` (fairseq_dat/checks.py);
with fairseq's plain ``--task translation`` the same mistakes end in fairseq's own tracebacks, except
the dictionary mismatch, which the model itself reports (without the file name).
"""
import shutil

import pytest

from cli_helpers import assert_one_line_error, check_ok, hypotheses, run_tool, train_args


def generate(data, checkpoint, *extra, task="adaptive_translation"):
    return run_tool("fairseq-generate", data, "--user-dir", "fairseq_dat", "--task", task, "--path", checkpoint,
                    "--cpu", "--beam", "2", "--batch-size", "8", "--max-len-b", "5", *extra)


@pytest.mark.parametrize("task,needle", [("adaptive_translation", "dict.de.txt has "),
                                         ("translation", "the source dictionary has")])
def test_dictionary_that_does_not_match_the_checkpoint(corpus, adaptive_checkpoint, tmp_path, task, needle):
    other = tmp_path / "other_dict"
    shutil.copytree(corpus, other)
    for lang in ("de", "en"):
        with open(other / f"dict.{lang}.txt", "a", encoding="utf-8") as f:
            f.writelines(f"extraword{i} 1\n" for i in range(8))
    proc = generate(other, adaptive_checkpoint, task=task)
    last = assert_one_line_error(proc, needle, "entries but the checkpoint was trained with a source dictionary of")
    if task == "adaptive_translation":
        assert str(other / "dict.de.txt") in last
    assert not hypotheses(proc.stdout)


@pytest.mark.parametrize("tool,content", [("fairseq-train", "empty"), ("fairseq-generate", "empty"),
                                          ("fairseq-generate", "dictionaries only")])
def test_data_directory_without_binarized_data(corpus, adaptive_checkpoint, tmp_path, tool, content):
    data = tmp_path / "data"
    data.mkdir()
    if content == "dictionaries only":
        for lang in ("de", "en"):
            shutil.copy(corpus / f"dict.{lang}.txt", data)
    save = tmp_path / "save"
    if tool == "fairseq-train":
        proc = run_tool(tool, *train_args(data, save))
    else:
        proc = generate(data, adaptive_checkpoint, "-s", "de", "-t", "en") if content != "empty" else \
            generate(data, adaptive_checkpoint)
    if content == "empty":
        assert_one_line_error(proc, f"data directory {data} has no binarized data", "fairseq-preprocess")
    else:
        assert_one_line_error(proc, f"no binarized 'test' split in {data}", str(data / "test.de-en.de.bin"))
    assert not save.exists() or not any(save.iterdir())
    assert not hypotheses(proc.stdout)


def test_missing_data_directory(adaptive_checkpoint, tmp_path):
    assert_one_line_error(generate(tmp_path / "nowhere", adaptive_checkpoint),
                          f"data directory {tmp_path / 'nowhere'} does not exist")


@pytest.fixture(scope="module")
def interactive_input(corpus):
    """Source lines: three sentences, an empty line, one far over --max-source-positions 40, one more."""
    lines = (corpus.parent / "text" / "test.de").read_text(encoding="utf-8").splitlines()
    long_line = " ".join([lines[3]] * 8)
    assert all(len(line.split()) < 39 for line in lines[:5]) and len(long_line.split()) > 60
    return "\n".join([lines[0], lines[1], lines[2], "", long_line, lines[4]]) + "\n"


def interactive(checkpoint, corpus, text, *extra):
    return run_tool("fairseq-interactive", corpus, "--user-dir", "fairseq_dat", "--task", "adaptive_translation",
                    "--path", checkpoint, "-s", "de", "-t", "en", "--cpu", "--beam", "2", "--max-len-b", "5",
                    "--buffer-size", "1", "--batch-size", "1", "--max-source-positions", "40", *extra, stdin=text)


def test_interactive_skips_empty_and_overlong_lines_as_fairseq_does(adaptive_checkpoint, corpus, interactive_input):
    proc = check_ok(interactive(adaptive_checkpoint, corpus, interactive_input,
                                "--skip-invalid-size-inputs-valid-test"))
    hyps = hypotheses(proc.stdout)
    assert sorted(hyps) == [0, 1, 2, 3, 5]  # the empty line is translated (from EOS alone), line 4 skipped
    assert "1 samples have invalid sizes and will be skipped" in proc.stdout + proc.stderr


def test_interactive_overlong_line_without_skip_is_one_line_after_the_earlier_translations(
        adaptive_checkpoint, corpus, interactive_input):
    proc = interactive(adaptive_checkpoint, corpus, interactive_input)
    assert_one_line_error(proc, "longer than max_positions=(40, ", "--skip-invalid-size-inputs-valid-test",
                          "--max-source-positions")
    assert sorted(hypotheses(proc.stdout)) == [0, 1, 2, 3]


@pytest.mark.parametrize("flag,value,needle", [
    ("--exit-weights", "1,1", "--exit-weights gives 2 weights but the decoder has 3 exits"),
    ("--oracle-lambda", "-1", "--oracle-lambda must be a finite number >= 0"),
    ("--exit-loss-alpha", "-1", "--exit-loss-alpha must be a finite number >= 0"),
    ("--oracle-sigma", "-1", "--oracle-sigma must be a finite number >= 0"),
])
def test_invalid_training_flags_stop_before_training(corpus, tmp_path, flag, value, needle):
    save = tmp_path / "save"
    proc = run_tool("fairseq-train", *train_args(corpus, save, flag, value))
    assert_one_line_error(proc, needle)
    assert not save.exists() or not any(save.iterdir()), sorted(p.name for p in save.iterdir())  # no crash.pt


@pytest.mark.parametrize("flag,value,needle", [
    ("--exit-threshold", "1.5", "--exit-threshold values must be in [0, 1], got 1.5"),
    ("--exit-threshold", "nan", "--exit-threshold values must be in [0, 1], got nan"),
    ("--fixed-exit", "9", "--fixed-exit must be in 1..3 for this checkpoint, got 9"),
    ("--exit-sequence-order", "sorted", "--exit-sequence-order must be one of depth, batch, got 'sorted'"),
])
def test_invalid_generation_flags_stop_before_decoding(corpus, adaptive_checkpoint, flag, value, needle):
    proc = generate(corpus, adaptive_checkpoint, flag, value)
    assert_one_line_error(proc, needle)
    assert not hypotheses(proc.stdout)
