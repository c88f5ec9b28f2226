"""The measured crossover of `flashcomm bench hosts`: where fc2's prefill starts to beat stock's
in the sweep's paired rounds, by the planner's rule (the non-increasing fit of the median ratios
reaches 1), interpolated on log T, with the sign-test, first-win and wins-for-good readings
next to it."""

import math

import pytest

from flashcomm.bench.hosts_report import measured_crossover


def sweep(ratio_rounds: list[list[float]]) -> tuple[list[list[float]], list[list[float]]]:
    """(fc2, stock) seconds per size and round with these fc2/stock ratios (stock 1 s)."""
    return ratio_rounds, [[1.0] * len(r) for r in ratio_rounds]


def test_interpolates_on_log_tokens_between_the_bracketing_sizes() -> None:
    got = measured_crossover([1, 4, 16, 64], *sweep([[1.3] * 9, [1.2] * 9, [1.1] * 9,
                                                      [0.9] * 9]))
    assert got["bound"] == "at"
    assert got["tokens"] == pytest.approx(32.0)  # halfway between 16 and 64 on log T
    assert math.isclose(math.log2(got["tokens"]), 5.0)
    for reading in ("sign_test", "first_win", "for_good"):
        assert got[reading] == pytest.approx(32.0)


def test_a_small_loss_between_wins_does_not_move_it_and_a_large_one_does() -> None:
    """Wins from 32 on, except that 128 is slower in 6 of 9 rounds (median 1.02): pooled with
    the win at 32, so the crossover stays between 16 and 32, where the sign test puts it too;
    the naive "for good" reading moves past 128. At 1.3 in every round the pool stays above 1
    up to 128, and every reading but the first win moves past it."""
    tokens = [1, 16, 32, 128, 256]
    noisy = [[1.2] * 9, [1.1] * 9, [0.9] * 9, [1.02] * 6 + [0.97] * 3, [0.95] * 9]
    got = measured_crossover(tokens, *sweep(noisy))
    assert got["bound"] == "at"
    assert got["tokens"] == pytest.approx(16 * 2 ** (0.1 / 0.14))  # fit +10 % -> -4 %
    assert got["sign_test"] == pytest.approx(math.sqrt(16 * 32))
    assert got["first_win"] == pytest.approx(got["sign_test"])
    assert 128 < got["for_good"] < 256
    clear = [*noisy[:3], [1.3] * 9, noisy[4]]
    got = measured_crossover(tokens, *sweep(clear))
    assert got["tokens"] == pytest.approx(128 * 2 ** (0.1 / 0.15))  # pooled +10 % -> -5 %
    assert 128 < got["sign_test"] < 256 and got["first_win"] < 32


@pytest.mark.parametrize(("ratios", "bound", "text"), [
    ([0.9, 0.8, 0.7], "below", "<= 2"),
    ([1.2, 1.1, 1.01], "above", "> 32"),
])
def test_outside_the_sweep_is_a_bound(ratios: list[float], bound: str, text: str) -> None:
    got = measured_crossover([2, 8, 32], *sweep([[r] * 9 for r in ratios]))
    assert (got["bound"], got["text"]) == (bound, text)
    assert (got["first_win"] is None) == (bound == "above")
