"""CTranslate2 deployment (fairseq_dat/ctranslate2.py, cli/export_ctranslate2.py, cli/ct2_translate.py).

A tiny adaptive_transformer with a sequence-level estimator (Seq-multinomial, paper §3.1) is trained
by fairseq-train on the first 300 Multi30k pairs (200 updates: it then translates each of the 200
test sentences to its own short output, most of them ended by EOS), exported with the export command,
and compared with ``fairseq-generate --task adaptive_translation`` on the same checkpoint:
- each exported exit k gives fairseq-generate --fixed-exit k's hypotheses (>= 98% identical, BLEU
  within 0.1: the engines differ only on hypotheses cut by the length limit, where fairseq forces EOS);
- routing gives every sentence exactly the depth of fairseq-generate's E- lines (with and without a
  threshold), and the routed translations are fairseq-generate's.
Bad input ends in one-line errors naming the flag or file.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu
import torch
from cli_helpers import build_corpus, check_ok, run_tool, tool_env, train_args, USER_DIR
from helpers import tiny_model
from hypothesis import given, settings, strategies as st

from fairseq_dat.errors import ConfigError

ctranslate2 = pytest.importorskip("ctranslate2")  # noqa: F841  (the PyPI engine)
from fairseq_dat.ctranslate2 import AdaptiveTranslator, average_exit, export, parse_exits  # noqa: E402
from fairseq_dat.stock_exits import stock_args, truncated_stock_model  # noqa: E402

SENTENCES = 200
MAX_LEN = 50  # fairseq-generate's and AdaptiveTranslator.translate's --max-len-b / max_len_b
BEAM = 5


# ---- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(binarized data, checkpoint, source sentences, reference sentences) of the tiny Seq-C model."""
    tmp = tmp_path_factory.mktemp("ct2")
    data = build_corpus(tmp / "corpus", n_train=300, n_valid=40, n_test=SENTENCES)
    save = tmp / "ckpt"
    check_ok(run_tool("fairseq-train", *train_args(data, save, "--depth-estimator", "sequence", "--exit-loss-alpha",
                                                   "1", "--max-tokens", "1000", max_update=200), timeout=600))
    text = tmp / "corpus" / "text"
    sources = (text / "test.de").read_text(encoding="utf-8").splitlines()
    references = (text / "test.en").read_text(encoding="utf-8").splitlines()
    return data, save / "checkpoint_last.pt", sources, references


def run_module(module, *args, stdin=None):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=300, env=tool_env())


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """The export command's output directory (float32, all exits)."""
    out = tmp_path_factory.mktemp("ct2_export") / "model"
    check_ok(run_module("fairseq_dat.cli.export_ctranslate2", trained[1], out))
    return out


@pytest.fixture(scope="module")
def translator(exported):
    return AdaptiveTranslator(str(exported), threads=1)


def generate(trained, *flags):
    """fairseq-generate on the test split: ({id: hypothesis}, {id: set of exits in its E- line})."""
    data, checkpoint = trained[0], trained[1]
    out = check_ok(run_tool("fairseq-generate", data, "--user-dir", USER_DIR, "--task", "adaptive_translation",
                            "--path", checkpoint, "--beam", BEAM, "--batch-size", 64, "--max-len-b", MAX_LEN,
                            "--cpu", "--print-exits", *flags, timeout=300)).stdout
    hyps, exits = {}, {}
    for line in out.splitlines():
        if line.startswith("H-"):
            sid, _, text = line.split("\t")
            hyps[int(sid[2:])] = text
        elif line.startswith("E-"):
            sid, text = line.split("\t")
            exits[int(sid[2:])] = {int(e) for e in text.split()}
    assert len(hyps) == len(exits) == SENTENCES, out[-2000:]
    return hyps, exits


def bleu(hypotheses, references):
    return sacrebleu.corpus_bleu(hypotheses, [references], tokenize="none").score


def assert_same_translations(results, fairseq_hyps, references, what):
    ours = [" ".join(r.tokens) for r in results]
    theirs = [fairseq_hyps[i] for i in range(SENTENCES)]
    same = sum(a == b for a, b in zip(ours, theirs))
    assert same >= 0.98 * SENTENCES, f"{what}: only {same}/{SENTENCES} hypotheses equal fairseq-generate's"
    assert abs(bleu(ours, references) - bleu(theirs, references)) <= 0.1, what
    assert len(set(ours)) > SENTENCES // 2, f"{what}: degenerate outputs, the comparison would prove little"


# ---- equivalence with fairseq-generate --------------------------------------------------------------

def test_export_writes_one_model_per_exit_and_the_estimator(exported):
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["exits"] == [1, 2, 3] and manifest["num_exits"] == 3
    assert manifest["estimator"] == "sequence" and manifest["router"] == "encoder"
    assert (manifest["source_lang"], manifest["target_lang"]) == ("de", "en")
    for k in (1, 2, 3):
        assert (exported / f"exit{k}" / "model.bin").is_file()
    record = torch.load(exported / "estimator.pt", weights_only=True)  # plain tensors and names only
    assert record["name"] == "sequence" and record["level"] == "sequence"
    assert set(record["state_dict"]) == {"proj.weight", "proj.bias"}
    assert (exported / "dict.de.txt").is_file() and (exported / "dict.en.txt").is_file()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_exit_k_translates_as_fairseq_generate_fixed_exit_k(trained, translator, k):
    hyps, exits = generate(trained, "--fixed-exit", k)
    assert all(e == {k} for e in exits.values())
    results = translator.translate(trained[2], beam=BEAM, fixed_exit=k, max_len_b=MAX_LEN)
    assert all(r.depth == k for r in results)
    assert_same_translations(results, hyps, trained[3], f"exit {k}")


@pytest.mark.parametrize("threshold", [None, "0.7"])
def test_routing_gives_the_generators_depth_and_translation(trained, translator, threshold):
    """fairseq-generate's sequence-estimator policy (E- lines) and the translator's routing agree on
    every sentence; without a threshold both take argmax q."""
    flags = ("--exit-threshold", threshold) if threshold else ("--exit-strategy", "estimator")
    hyps, exits = generate(trained, *flags)
    assert all(len(e) == 1 for e in exits.values())  # one depth per sentence
    expected = [next(iter(exits[i])) for i in range(SENTENCES)]
    depths = translator.predict_depths(trained[2], threshold)
    assert depths == expected
    results = translator.translate(trained[2], beam=BEAM, exit_threshold=threshold, max_len_b=MAX_LEN)
    assert [r.depth for r in results] == expected
    assert_same_translations(results, hyps, trained[3], f"routing at {threshold}")
    if threshold == "0.7":  # a threshold where the sentences really are split between depths
        assert len(set(expected)) >= 2, f"all sentences at one depth: {set(expected)}"


def test_length_limit_is_fairseq_generates_per_batch(trained, translator):
    """--max-len-a/-b: each batch may generate int(a * S + b) tokens, S its longest source with EOS, as
    fairseq-generate does (one sentence per batch here, so every sentence has its own limit). The limit
    binds on many sentences; a single limit for the whole call would let short sentences run past theirs."""
    a, b, k = 0.5, 1, 3
    hyps, _ = generate(trained, "--fixed-exit", k, "--max-len-a", a, "--max-len-b", b, "--batch-size", 1)
    results = translator.translate(trained[2], beam=BEAM, fixed_exit=k, batch_size=1, max_len_a=a, max_len_b=b)
    limits = [int(a * (len(line.split()) + 1) + b) for line in trained[2]]
    ours = [len(r.tokens) for r in results]
    theirs = [len(hyps[i].split()) for i in range(SENTENCES)]
    assert all(n <= limit for n, limit in zip(ours, limits)), "an output ran past its batch's limit"
    assert all(n <= limit for n, limit in zip(theirs, limits)), "fairseq-generate's limit is not int(a * S + b)"
    at_limit = sum(n == limit for n, limit in zip(ours, limits))
    assert at_limit >= SENTENCES // 10, f"the limit binds on only {at_limit} sentences: it is not tested"
    assert sum(n == m for n, m in zip(ours, theirs)) >= 0.9 * SENTENCES


def test_translate_command_reads_stdin_and_prints_depths_and_ae(trained, translator, exported):
    lines = trained[2][:20]
    proc = check_ok(run_module("fairseq_dat.cli.ct2_translate", exported, "--exit-threshold", "0.7", "--beam", BEAM,
                               "--max-len-b", MAX_LEN, "--threads", 1, "--print-exits",
                               stdin="\n".join(lines) + "\n"))
    out = proc.stdout.splitlines()
    hyps = [line.split("\t") for line in out if line.startswith("H-")]
    exits = [line.split("\t")[1].split() for line in out if line.startswith("E-")]
    results = translator.translate(lines, beam=BEAM, exit_threshold=0.7, max_len_b=MAX_LEN)
    assert [h[0] for h in hyps] == [f"H-{i}" for i in range(20)]
    assert [h[2] for h in hyps] == [" ".join(r.tokens) for r in results]
    assert [set(e) for e in exits] == [{str(r.depth)} for r in results]
    assert out[-1].startswith("Adaptive exits (N=3): AE=")
    assert float(out[-1].split("AE=")[1].split()[0]) == pytest.approx(average_exit(results), abs=1e-4)


# ---- bad input ------------------------------------------------------------------------------------

def assert_one_line_error(proc, tool, *needles):
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{tool}.py: error: "), last
    for needle in needles:
        assert needle in last, last


def test_export_command_errors(trained, tmp_path):
    tool = "export_ctranslate2"
    missing = tmp_path / "missing.pt"
    assert_one_line_error(run_module(f"fairseq_dat.cli.{tool}", missing, tmp_path / "out"), tool, str(missing))
    # a real checkpoint of fairseq's stock transformer (the tiny model's full depth as --arch transformer)
    from fairseq_dat.cli.export_ctranslate2 import load_adaptive_checkpoint, read_checkpoint
    model, model_args, task = load_adaptive_checkpoint(str(trained[1]))
    state = read_checkpoint(str(trained[1]), None)
    state["cfg"].model = stock_args(model_args)
    state["model"] = truncated_stock_model(model, model_args, task, 3).state_dict()
    stock = tmp_path / "stock.pt"
    torch.save(state, stock)
    assert_one_line_error(run_module(f"fairseq_dat.cli.{tool}", stock, tmp_path / "out"), tool, str(stock),
                          "'transformer' checkpoint, not adaptive_transformer")
    assert_one_line_error(run_module(f"fairseq_dat.cli.{tool}", trained[1], tmp_path / "out", "--exits", "2,4"),
                          tool, "--exits", "1..3")
    assert_one_line_error(run_module(f"fairseq_dat.cli.{tool}", trained[1], tmp_path / "out", "--quantization",
                                     "int7"), tool, "--quantization", "int8")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_translate_command_errors(exported):
    tool = "ct2_translate"
    for flags, needle in ((["--fixed-exit", "4"], "--fixed-exit 4"),
                          (["--exit-threshold", "1.5"], "--exit-threshold"),
                          (["--fixed-exit", "1", "--exit-threshold", "0.5"], "exclude each other"),
                          (["--beam", "0"], "--beam"),
                          (["--max-len-a", "-0.5"], "--max-len-a")):
        proc = run_module(f"fairseq_dat.cli.{tool}", exported, *flags, stdin="ein mann .\n")
        assert_one_line_error(proc, tool, needle)
        assert "H-" not in proc.stdout


@given(st.text(alphabet="0123456789,-x all", max_size=8))
@settings(max_examples=60, deadline=None)
def test_exits_flag_is_all_or_blocks_in_range(text):
    try:
        exits = parse_exits(text, 6)
    except ConfigError as err:
        assert "--exits" in str(err)
    else:
        assert exits == sorted(set(exits)) and exits and all(1 <= k <= 6 for k in exits)


def tiny_export(tmp_path, *extra):
    model, task, args = tiny_model(extra=("--source-lang", "de", "--target-lang", "en", *extra))
    return export(model, args, task, str(tmp_path / "export"), [1, 2, 3], log=lambda *_: None)


def test_a_token_level_estimator_exports_but_cannot_route(tmp_path):
    manifest = tiny_export(tmp_path, "--depth-estimator", "token-geometric")
    assert manifest["estimator"] == "token-geometric" and manifest["router"] is None
    translator = AdaptiveTranslator(str(tmp_path / "export"), threads=1)
    with pytest.raises(ConfigError, match="decides per token.*--fixed-exit"):
        translator.translate(["w4 w5 w6"], exit_threshold=0.5)
    assert [r.depth for r in translator.translate(["w4 w5 w6"], beam=2, fixed_exit=2, max_len_b=5)] == [2]


@pytest.mark.parametrize("extra, needle", [
    (("--encoder-normalize-before",), "--encoder-normalize-before and --decoder-normalize-before"),
    (("--decoder-embed-dim", "16"), "--encoder-embed-dim"),
])
def test_features_the_engine_lacks_are_one_line_errors(tmp_path, extra, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        tiny_export(tmp_path, *extra)
    assert "\n" not in str(err.value)
