"""The generation benchmark's command line (benchmarks/generation_speed.py): bad combinations fail in one line
naming the flag, before any model is loaded; ``--rows ct2`` keeps the settings a user gives."""
import pytest

from helpers import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("generation_speed")


def test_rows_ct2_refuses_no_ct2(bench, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["DATA", "--path", "ckpt.pt", "--rows", "ct2", "--no-ct2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--rows ct2" in err and "--no-ct2" in err


def test_rows_ct2_parses_with_the_settings_given(bench):
    args = bench.parse_args(["DATA", "--path", "ckpt.pt", "--rows", "ct2", "--settings", "64x5", "--repeats", "5"])
    assert args.rows == "ct2" and args.settings == [(64, 5)] and args.repeats == 5
    assert bench.parse_args(["DATA", "--path", "ckpt.pt"]).rows == "all"


@pytest.mark.parametrize("flags", [["--max-len-a", "-1"], ["--max-len-b", "0"]])
def test_length_limit_flags_refuse_nonsense(bench, capsys, flags):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["DATA", "--path", "ckpt.pt", *flags])
    assert exit_info.value.code == 2
    assert flags[0] in capsys.readouterr().err.strip().splitlines()[-1]


def test_every_engine_gets_fairseqs_length_limit_per_batch(bench):
    """fairseq-generate's --max-len-a/-b rule (int(a * S + b), S the batch's longest source with EOS) reaches
    the CTranslate2 rows per batch; --fixed-length L forces L on every engine."""
    args = bench.parse_args(["DATA", "--path", "ckpt.pt", "--max-len-a", "1.2", "--max-len-b", "10"])
    search = bench.Search(5, args.max_len_b, None, args.max_len_a)
    assert search.fairseq_kwargs() == {"beam_size": 5, "max_len_a": 1.2, "max_len_b": 10}
    assert search.ct2_kwargs(12)["max_decoding_length"] == 24 and search.ct2_kwargs(31)["max_decoding_length"] == 47
    assert search.translator_kwargs() == {"beam": 5, "max_len_a": 1.2, "max_len_b": 10}
    fixed = bench.Search(5, 200, 20, 1.2)
    assert fixed.fairseq_kwargs() == {"beam_size": 5, "max_len_a": 0.0, "max_len_b": 20, "min_len": 20}
    assert fixed.ct2_kwargs(31) == {"beam_size": 5, "max_decoding_length": 20, "min_decoding_length": 20}


def summary(bench, name, kind, tokens_per_s, bleu, ae=6.0):
    return bench.Summary(name, kind, tokens_per_s, tokens_per_s / 10, bleu, ae, ae, 1.0, 11.0)


def test_result_line_reports_the_bf16_rows_against_fairseq(bench):
    """--autocast-bf16: bf16_full is our bfloat16 full depth; bf16_best the fastest bfloat16 row within the BLEU
    tolerance of row 1 (a faster row that loses more is not it); the float32 fields do not change."""
    rows = [summary(bench, "fairseq full", "fairseq", 1000, 30.0),
            summary(bench, "ours (no flags)", "ours", 1100, 30.0),
            summary(bench, "estimator T=0.5", "estimator", 1500, 29.8, ae=3.0),
            summary(bench, "bf16 full", "bf16-ours", 1600, 29.9),
            summary(bench, "bf16 fixed=3", "bf16-fixed", 2400, 29.75, ae=3.0),
            summary(bench, "bf16 fixed=1", "bf16-fixed", 4000, 27.0, ae=1.0)]
    bench.add_speedups(rows, {6: 1 / 1000, 3: 1 / 1800, 1: 1 / 3000})
    fields = dict(f.split("=") for f in bench.result_line(rows, 0.3).split()[1:])
    assert float(fields["speedup"]) == pytest.approx(1.5) and float(fields["overhead"]) == pytest.approx(1000 / 1100, abs=1e-4)
    assert float(fields["bf16_full"]) == pytest.approx(1.6)
    assert float(fields["bf16_best"]) == pytest.approx(2.4) and float(fields["bf16_ae"]) == pytest.approx(3.0)
    assert float(fields["bf16_bleu_delta"]) == pytest.approx(-0.25)
    without = dict(f.split("=") for f in bench.result_line(rows[:3], 0.3).split()[1:])
    assert "bf16_full" not in without and without["speedup"] == fields["speedup"]


def test_autocast_bf16_flag_adds_the_bf16_rows(bench):
    assert bench.parse_args(["DATA", "--path", "ckpt.pt", "--autocast-bf16"]).autocast_bf16
    assert not bench.parse_args(["DATA", "--path", "ckpt.pt"]).autocast_bf16


@pytest.fixture(scope="module")
def profiler():
    return load_benchmark("profile_generation")


def test_the_lockstep_bound_is_the_row_mean_over_the_deepest_row(profiler):
    # two steps of 5 rows: one all at exit 1, one with a row at exit 6 (mean 2) → AE 1.5, deepest 3.5
    mean, deepest, straggling, bound = profiler.lockstep_bound([(1, 1.0, 5), (6, 2.0, 5)])
    assert (mean, deepest, straggling) == (1.5, 3.5, 0.5) and abs(bound - 1.5 / 3.5) < 1e-12
    assert profiler.lockstep_bound([(1, 1.0, 320)] * 3)[3] == 1.0  # nobody deeper: no bound
    # a step that costs 2 without its blocks and 1 per block: (2 + 1.5) / (2 + 3.5)
    assert abs(profiler.lockstep_bound([(1, 1.0, 5), (6, 2.0, 5)], 2.0, 1.0)[3] - 3.5 / 5.5) < 1e-12


def test_steps_needs_numeric_thresholds(profiler, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["profile_generation.py", "DATA", "--path", "c.pt", "--steps"])
    with pytest.raises(SystemExit):
        profiler.parse_args()
    assert "--steps needs --exit-threshold" in capsys.readouterr().err
