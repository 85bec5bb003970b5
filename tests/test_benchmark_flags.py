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
