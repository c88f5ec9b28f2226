"""The measured crossover of `flashcomm bench hosts`: where fc2's prefill ratio to stock drops to
1 or below for good, interpolated on log T, or a bound when the sweep never brackets it."""

import math

import pytest

from flashcomm.bench.hosts_report import measured_crossover


def test_interpolates_on_log_tokens_between_the_bracketing_sizes() -> None:
    got = measured_crossover([1, 4, 16, 64], [1.3, 1.2, 1.1, 0.9])
    assert got["bound"] == "at"
    assert got["tokens"] == pytest.approx(32.0)  # halfway between 16 and 64 on log T
    assert math.isclose(math.log2(got["tokens"]), 5.0)


def test_a_late_loss_moves_the_crossover_past_an_early_win() -> None:
    """A win at small T followed by a loss is noise or a second crossing; the crossover is
    where fc2 wins from then on."""
    got = measured_crossover([1, 4, 16, 64], [0.9, 1.05, 0.95, 0.8])
    assert got["bound"] == "at" and 4 < got["tokens"] < 16
    assert got["first_win"] == 1.0  # the first size already wins


def test_first_win_is_where_the_ratio_first_reaches_one() -> None:
    """At 1, 16, 32, 128, 256: wins from 32 on, except at 128."""
    got = measured_crossover([1, 16, 32, 128, 256], [1.2, 1.1, 0.9, 1.05, 0.95])
    assert got["first_win"] == pytest.approx(math.exp(math.log(16) + math.log(2) / 2))
    assert 128 < got["tokens"] < 256


@pytest.mark.parametrize(("ratios", "bound", "text"), [
    ([0.9, 0.8, 0.7], "below", "<= 2"),
    ([1.2, 1.1, 1.01], "above", "> 32"),
])
def test_outside_the_sweep_is_a_bound(ratios: list[float], bound: str, text: str) -> None:
    got = measured_crossover([2, 8, 32], ratios)
    assert (got["bound"], got["text"]) == (bound, text)
    assert (got["first_win"] is None) == (bound == "above")

