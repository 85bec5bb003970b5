"""benchmarks/cascade_offline.py: re-translating the least confident sentences deeper, against the fixed exits."""
import pytest

from helpers import load_benchmark


@pytest.fixture(scope="module")
def cascade():
    return load_benchmark("cascade_offline")


REFS = [f"a man number {i} rides a red bike" for i in range(20)]


def write_generate(path, hyps, scores):
    lines = []
    for i, (hyp, score) in enumerate(zip(hyps, scores)):
        lines += [f"S-{i}\tsource {i}", f"T-{i}\t{REFS[i]}", f"H-{i}\t{score}\t{hyp}", f"D-{i}\t{score}\t{hyp}"]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_the_fixed_exit_line_interpolates_and_clamps(cascade):
    points = {1: 30.0, 2: 34.0, 4: 35.0}
    assert cascade.fixed_exit_line(points, 1.5) == 32.0
    assert cascade.fixed_exit_line(points, 3.0) == 34.5
    assert cascade.fixed_exit_line(points, 0.5) == 30.0 and cascade.fixed_exit_line(points, 6) == 35.0


def test_cost_counts_both_passes_of_the_retranslated_sentences(cascade):
    low = ({0: "a b", 1: "c"}, {0: -1.0, 1: -0.1}, {0: "r", 1: "r"})
    high = ({0: "a b c", 1: "d"}, {0: -0.5, 1: -0.2}, {0: "r", 1: "r"})
    hyps, cost = cascade.cascade(low, high, 1, 3, {0}, [0, 1])
    assert hyps == ["a b c", "c"]
    # output tokens (with EOS) 4 + 2; blocks: exit 1 for 3 + 2 tokens, then exit 3 for the 4 of sentence 0
    assert cost == pytest.approx((1 * 3 + 1 * 2 + 3 * 4) / 6)


def test_the_least_confident_go_deeper(cascade, tmp_path, capsys):
    """Exit 1 is wrong exactly where it is unsure: the cascade recovers them, a random choice does not."""
    wrong = set(range(0, 20, 4))
    low = write_generate(tmp_path / "e1.txt", ["the cat sleeps" if i in wrong else REFS[i] for i in range(20)],
                         [-2.0 if i in wrong else -0.1 for i in range(20)])
    high = write_generate(tmp_path / "e2.txt", REFS, [-0.1] * 20)
    cascade.main([low, high, "--fixed", f"1={low},2={high}", "--fractions", "0.25"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    fields = dict(kv.split("=") for kv in line.split()[2:])
    assert float(fields["bleu"]) == pytest.approx(100.0) and float(fields["random_bleu"]) < 95, line
    assert float(fields["gain"]) > 0, line  # cost 1.5 (with equal lengths), line 50/50 of the two fixed exits
