"""The measured crossover of `flashcomm bench hosts`: where fc2's prefill starts to beat stock's
in the sweep's paired rounds (a size is a loss only when a sign test says so), interpolated on
log T, with the naive first-win and wins-for-good readings of the medians next to it."""

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
    assert got["first_win"] == pytest.approx(32.0) and got["for_good"] == pytest.approx(32.0)


def test_a_loss_within_noise_does_not_move_it_and_a_clear_one_does() -> None:
    """Wins from 32 on, except that 128 is slower in 6 of 9 rounds (median 1.02): within
    noise by the sign test, so the crossover stays near 16-32; the naive "for good" reading
    moves past 128. Slower in all 9 rounds at 128 moves both."""
    tokens = [1, 16, 32, 128, 256]
    noisy = [[1.2] * 9, [1.1] * 9, [0.9] * 9, [1.02] * 6 + [0.97] * 3, [0.95] * 9]
    got = measured_crossover(tokens, *sweep(noisy))
    assert got["tokens"] == pytest.approx(math.exp(math.log(16) + math.log(2) / 2))
    assert got["first_win"] == pytest.approx(got["tokens"])
    assert 128 < got["for_good"] < 256
    clear = [*noisy[:3], [1.02] * 9, noisy[4]]
    assert measured_crossover(tokens, *sweep(clear))["tokens"] == pytest.approx(
        got["for_good"])


@pytest.mark.parametrize(("ratios", "bound", "text"), [
    ([0.9, 0.8, 0.7], "below", "<= 2"),
    ([1.2, 1.1, 1.01], "above", "> 32"),
])
def test_outside_the_sweep_is_a_bound(ratios: list[float], bound: str, text: str) -> None:
    got = measured_crossover([2, 8, 32], *sweep([[r] * 9 for r in ratios]))
    assert (got["bound"], got["text"]) == (bound, text)
    assert (got["first_win"] is None) == (bound == "above")
