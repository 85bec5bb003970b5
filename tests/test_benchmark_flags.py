"""The generation benchmark's command line (benchmarks/generation_speed.py): bad combinations fail in one line
naming the flag, before any model is loaded; ``--rows ct2`` keeps the settings a user gives."""
import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("generation_speed", os.path.join(REPO, "benchmarks", "generation_speed.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
