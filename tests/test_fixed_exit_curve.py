"""The fixed-exit curve (piecewise-linear between integer exits) and the gain of an adaptive front over it."""
import pytest

from fairseq_dat.fixed_exit_curve import best_gain_below, fixed_exit_bleu_at, gains_over_fixed_exits

FIXED = [(1, 30.0), (2, 34.0), (3, 35.0), (6, 35.0)]


def test_interpolates_between_integer_exits_and_does_not_extrapolate():
    assert fixed_exit_bleu_at(FIXED, 1.0) == 30.0
    assert fixed_exit_bleu_at(FIXED, 1.5) == pytest.approx(32.0)
    assert fixed_exit_bleu_at(FIXED, 2.25) == pytest.approx(34.25)
    assert fixed_exit_bleu_at(FIXED, 4.5) == pytest.approx(35.0)
    assert fixed_exit_bleu_at(list(reversed(FIXED)), 1.5) == pytest.approx(32.0)  # order does not matter
    assert fixed_exit_bleu_at(FIXED, 0.9) is None and fixed_exit_bleu_at(FIXED, 6.1) is None


def test_gain_is_bleu_above_the_curve_at_the_same_ae():
    front = [{"ae": 1.42, "bleu": 34.73}, {"ae": 1.0, "bleu": 29.0}, {"ae": 2.5, "bleu": 34.5}]
    rows = gains_over_fixed_exits(front, FIXED)
    assert rows[0]["fixed_bleu"] == pytest.approx(31.68)
    assert rows[0]["gain"] == pytest.approx(3.05)
    assert rows[1]["gain"] == pytest.approx(-1.0)
    assert rows[2]["gain"] == pytest.approx(-0.0)
    assert best_gain_below(rows, 2.0) is rows[0]
    assert best_gain_below(rows, 1.0) is None
