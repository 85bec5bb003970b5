"""fairseq_dat.cli.make_tables and exit_analysis on synthetic, well-formed fairseq-generate logs:
the expected cells (ours / paper) with their sources, "not run" where a log is missing, FLOPs from
E-/P-/S- lines, plots; the E-/P- parsing of the exit analysis."""
import io
import contextlib
import json
import re

import pytest

from fairseq_dat.cli import exit_analysis, make_tables
from fairseq_dat.errors import ConfigError
from fairseq_dat.exit_summary import ExitSummary, parse_exit_summary
from fairseq_dat.flops import DecoderDims, decoder_flops

DIMS = {"num_layers": 6, "embed_dim": 16, "ffn_dim": 32, "encoder_dim": 16, "vocab": 50}
# two hypotheses: source words, per-token exits (EOS included), log2 probabilities (P- lines)
SENTENCES = {0: ("ein mann schläft .", [3, 2, 1, 1], [-0.1520, -1.0000, -0.0144, -3.3219]),
             1: ("zwei hunde", [6, 5, 1], [-2.0000, -0.5000, -0.0100])}


def generate_log(path, subset, bleu, n=6, exits=None, with_lines=False, complete=True):
    """What fairseq-generate --task adaptive_translation [--print-exits] prints (stdout + stderr)."""
    lines = ["2026-01-01 00:00:00 | INFO | fairseq_cli.generate | loading model(s) from ckpt.pt"]
    if with_lines:
        for sid, (src, ex, scores) in SENTENCES.items():
            lines += [f"S-{sid}\t{src}", f"T-{sid}\tref", f"H-{sid}\t-1.2\thyp", f"D-{sid}\t-1.2\thyp",
                      f"P-{sid}\t" + " ".join(f"{s:.4f}" for s in scores), f"E-{sid}\t" + " ".join(map(str, ex))]
    if complete:
        lines.append(f"Generate {subset} with beam=5: BLEU4 = {bleu:.2f}, 60.1/40.2/30.3/20.4 "
                     "(BP=1.000, ratio=1.000, syslen=100, reflen=100)")
    if exits is not None:
        hist = tuple(exits.count(e) for e in range(1, n + 1))
        ae = sum(exits) / len(exits)
        lines.append(ExitSummary(n, ae, hist, ae, 5 * len(exits)).line())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def run_dir(tmp_path):
    root = tmp_path / "runs"
    for n in range(1, 7):
        generate_log(root / "aligned" / f"generate-valid-exit{n}.log", "valid", 30.0 + n, exits=[n] * 7)
    generate_log(root / "baseline-6" / "generate-valid-full.log", "valid", 35.55)
    generate_log(root / "baseline-2" / "generate-test-full.log", "test", 33.25)
    generate_log(root / "omega-n" / "generate-test-exit3.log", "test", 34.4, exits=[3] * 7)
    generate_log(root / "gamma-0.5" / "generate-valid-uniform.log", "valid", 35.05, exits=[1, 2, 3, 4, 5, 6, 6])
    all_exits = [e for _, ex, _ in SENTENCES.values() for e in ex]
    generate_log(root / "geometric-C" / "generate-test-thr0.5.log", "test", 34.12, exits=all_exits, with_lines=True)
    generate_log(root / "geometric-C" / "generate-test-thr0.9.log", "test", 0, complete=False)  # crashed run
    (root / "geometric-C" / "model.json").write_text(json.dumps({"tool": "threshold_search", "model": {
        "dims": DIMS, "estimator": "token-geometric", "depth_oracle": "correctness"}}))
    (root / "aligned" / "search-conf.json").write_text(json.dumps({
        "tool": "threshold_search", "model": {"dims": DIMS, "estimator": "none"}, "pareto": ["conf0.9"],
        "points": [
            {"setting": "full", "subset": "valid", "role": "reference", "bleu": 36.3, "ae": 6.0, "flops_per_token": 9e5,
             "exit_hist": [0, 0, 0, 0, 0, 7]},
            {"setting": "conf0.9", "subset": "valid", "role": "search", "bleu": 35.9, "ae": 2.1,
             "flops_per_token": 6e5, "exit_hist": [3, 1, 1, 1, 0, 1]},
            {"setting": "conf0.5", "subset": "valid", "role": "search", "bleu": 30.0, "ae": 2.5,
             "flops_per_token": 7e5, "exit_hist": [1, 2, 2, 1, 0, 1]},
            {"setting": "conf0.9", "subset": "test", "role": "front-test", "bleu": 35.1, "ae": 2.2,
             "flops_per_token": 6.1e5, "exit_hist": [3, 1, 1, 1, 0, 1]}]}))
    return root


def table_row(text, title, label):
    section = text.split(f"### {title}")[1].split("###")[0]
    row = next(l for l in section.splitlines() if l.startswith(f"| {label} |"))
    return [c.strip() for c in row.strip("|").split("|")][1:]


def test_tables_have_measured_cells_sources_and_not_run(run_dir, tmp_path):
    out, plots = tmp_path / "RESULTS.md", tmp_path / "plots"
    with contextlib.redirect_stdout(io.StringIO()):
        text = make_tables.main([str(run_dir), "--out", str(out), "--plots-dir", str(plots)])
    assert out.read_text() == text
    t1 = "Table 1: aligned vs mixed training (valid BLEU)"
    assert table_row(text, t1, "Aligned (ω=1)") == [
        "not run / 35.5", "31.00 / 34.1", "32.00 / 35.5", "33.00 / 35.8", "34.00 / 36.1", "35.00 / 36.1",
        "36.00 / 36.2", "33.50 / 35.6"]
    assert table_row(text, t1, "Baseline") == ["–"] + [f"not run / {v}" for v in (34.2, 35.3, 35.6, 35.7, 35.6)] + [
        "35.55 / 35.9", "not run / 35.4"]
    assert all(c.startswith("not run / ") for c in table_row(text, t1, "Mixed M=3"))
    assert "- Aligned (ω=1), n=3: `aligned/generate-valid-exit3.log`" in text
    assert "- Baseline, n=6: `baseline-6/generate-valid-full.log`" in text
    assert "- Aligned (ω=1), Avg: `mean of n=1..6`" in text
    t2b = "Appendix Table 2 (test): loss weights ω_n"
    assert table_row(text, t2b, "n")[3] == "34.40 / 34.7" and table_row(text, t2b, "Baseline")[2] == "33.25 / 34.6"
    assert table_row(text, "Appendix Table 3 (valid): gradient scaling γ", "0.5")[0] == "35.05 / 35.4"
    assert table_row(text, "Appendix Table 3 (valid): gradient scaling γ", "Ø")[1] == "31.00 / 34.1"
    assert "`geometric-C/generate-test-thr0.9.log`" in text.split("Logs without a BLEU line")[1]


def test_operating_points_with_flops_from_exit_lines(run_dir, tmp_path):
    with contextlib.redirect_stdout(io.StringIO()):
        text = make_tables.main([str(run_dir), "--out", str(tmp_path / "R.md"), "--plots-dir", str(tmp_path / "p")])
    rows = [l for l in text.split("### Figures 3 and 5")[1].splitlines() if l.startswith("| ")]
    geo = next(r for r in rows if "geometric-C" in r)
    cells = [c.strip() for c in geo.strip("|").split("|")]
    dims = DecoderDims(**DIMS)
    flops = sum(decoder_flops(dims, ex, len(src.split()) + 1, "token-geometric") for src, ex, _ in SENTENCES.values())
    tokens = sum(len(ex) for _, ex, _ in SENTENCES.values())
    assert cells[:5] == ["Tok-C geometric-like", "geometric-C", "test", "thr0.5", "34.12"]
    assert float(cells[5]) == pytest.approx(sum(e for _, ex, _ in SENTENCES.values() for e in ex) / tokens, abs=1e-3)
    assert float(cells[6]) == pytest.approx(flops / tokens / 1e6, abs=1e-3)
    conf = [r for r in rows if r.startswith("| Confidence thresholding | aligned |")]
    assert len(conf) == 2  # the valid front point and its test decode; the dominated conf0.5 is left out
    assert any("| test | conf0.9 | 35.10 |" in r and "(front-test)" in r for r in conf)
    assert "| 3 (IWSLT) | Tok-C geometric-like, σ=0, λ=0.1 | 34.73 | 1.42 |" in text
    names = {p.name for p in (tmp_path / "p").iterdir()}
    assert {"bleu_vs_ae_valid.png", "bleu_vs_ae_test.png", "bleu_vs_flops_test.png",
            "exit_hist_geometric-C_test.png", "exit_hist_aligned_valid.png"} <= names
    assert "![bleu_vs_ae_valid.png](p/bleu_vs_ae_valid.png)" in text


def test_empty_run_dir_is_all_not_run_and_bad_logs_are_named(tmp_path):
    (tmp_path / "runs").mkdir()
    with contextlib.redirect_stdout(io.StringIO()):
        text = make_tables.main([str(tmp_path / "runs"), "--out", str(tmp_path / "R.md")])
    cells = (5 * 8 - 1) + 2 * (6 * 8 - 1) + 2 * (7 * 8 - 1)  # Tables 1, 2a/b, 3a/b; the baselines' Uniform is "–"
    assert text.count("not run / ") == cells and "| not run |" in text  # no operating points either
    with pytest.raises(ConfigError, match="RUN_DIR: .* is not a directory"):
        make_tables.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "R.md")])
    generate_log(tmp_path / "runs" / "aligned" / "generate-valid-exit1.log", "test", 30.0)
    with pytest.raises(ConfigError, match=r"generate-valid-exit1.log: named for subset 'valid' but its BLEU line is"):
        make_tables.main([str(tmp_path / "runs"), "--out", str(tmp_path / "R.md")])


def test_exit_summary_line_round_trips():
    summary = ExitSummary(num_exits=4, average_exit=1.75, exit_hist=(2, 1, 0, 1), compute_average_exit=2.0625,
                          rows=16)
    line = summary.line()
    assert line == "Adaptive exits (N=4): AE=1.7500 tokens=4 exits=[2,1,0,1] compute_AE=2.0625 rows=16"
    assert parse_exit_summary(f"2026-01-01 | INFO | x\n{line}\nmore") == summary
    assert parse_exit_summary("Adaptive exits (N=4): AE=") is None


def test_table_columns_follow_the_depth_in_the_logs(tmp_path):
    """A 4-block decoder: Table 1 has n=1..4 and Avg over them; the paper's n=1..4 stand beside ours."""
    root = tmp_path / "runs"
    for n in range(1, 5):
        generate_log(root / "aligned" / f"generate-valid-exit{n}.log", "valid", 30.0 + n, n=4, exits=[n] * 5)
    with contextlib.redirect_stdout(io.StringIO()):
        text = make_tables.main([str(root), "--out", str(tmp_path / "R.md")])
    t1 = text.split("### Table 1")[1].split("###")[0]
    assert "| Uniform | n=1 | n=2 | n=3 | n=4 | Avg |" in t1 and "n=5" not in t1
    assert table_row(text, "Table 1: aligned vs mixed training (valid BLEU)", "Aligned (ω=1)") == [
        "not run / 35.5", "31.00 / 34.1", "32.00 / 35.5", "33.00 / 35.8", "34.00 / 36.1", "32.50 / 35.6"]
    assert "- Aligned (ω=1), Avg: `mean of n=1..4`" in text


def test_exit_analysis_parses_exit_and_score_lines(tmp_path, capsys):
    log = tmp_path / "generate-test-thr0.5.log"
    generate_log(log, "test", 34.0, exits=[3, 2, 1, 1, 6, 5, 1], with_lines=True)
    result = exit_analysis.main([str(log), "--out-dir", str(tmp_path / "ea"), "--position-bins", "2",
                                 "--confidence-bins", "2"])
    # positions: sentence 0 (|y| = 4): exits 3 2 | 1 1; sentence 1 (|y| = 3): exits 6 5 | 1
    assert result["by_position"] == [[0, 1, 1, 0, 1, 1], [3, 0, 0, 0, 0, 0]]
    # probabilities 2^P: 0.90 0.50 0.99 0.10 | 0.25 0.71 0.99 → [0, 0.5): exits 1, 6; [0.5, 1]: 3 2 1 5 1
    assert result["by_confidence"] == [[1, 0, 0, 0, 0, 1], [2, 1, 1, 0, 1, 0]]
    assert result["num_exits"] == 6 and result["sentences"] == 2
    assert {p.name for p in (tmp_path / "ea").iterdir()} == {
        "exits_by_position.png", "exits_by_confidence.png", "exit_analysis.json"}
    out = capsys.readouterr().out
    assert re.search(r"0-50%\s+4\s+4\.00\s+0\.0\s+25\.0\s+25\.0\s+0\.0\s+25\.0\s+25\.0", out)
    assert json.loads((tmp_path / "ea" / "exit_analysis.json").read_text())["by_position"] == result["by_position"]


def test_exit_analysis_rejects_logs_it_cannot_read(tmp_path):
    plain = tmp_path / "plain.log"
    generate_log(plain, "test", 34.0)
    with pytest.raises(ConfigError, match="no E- lines; make the log with .*--print-exits"):
        exit_analysis.main([str(plain), "--out-dir", str(tmp_path / "ea")])
    bad = tmp_path / "bad.log"
    bad.write_text("E-0\t1 2 3\nP-0\t-0.1 -0.2\n")
    with pytest.raises(ConfigError, match="E-0 has 3 exits but P-0 has 2 scores"):
        exit_analysis.main([str(bad), "--out-dir", str(tmp_path / "ea")])
    with pytest.raises(ConfigError, match="--position-bins must be a positive integer"):
        exit_analysis.main([str(bad), "--out-dir", str(tmp_path / "ea"), "--position-bins", "0"])
    with pytest.raises(ConfigError, match="GENERATE_LOG: .* not found"):
        exit_analysis.main([str(tmp_path / "missing.log"), "--out-dir", str(tmp_path / "ea")])
