"""Where FlashComm2 starts to win, from paired rounds: where the non-increasing fit of the
per-size medians reaches 0 (the fit's and the benchmark's reading), or the first win after the
last loss, where a loss is a median above 0 or a sign test that says FlashComm2 is slower;
interpolated on log T."""

import math

import pytest

from flashcomm.plan.crossing import (
    crossover,
    median_slower,
    monotone_crossover,
    monotone_fit,
    significantly_slower,
    slower_p,
)

MS = 1e-3


def test_sign_test_p_values() -> None:
    assert slower_p([1.0] * 5) == pytest.approx(1 / 32)
    assert slower_p([1.0] * 8 + [-1.0]) == pytest.approx(10 / 512)
    assert slower_p([1.0] * 7 + [-1.0] * 2) == pytest.approx(46 / 512)
    assert significantly_slower([1.0] * 5) and significantly_slower([1.0] * 8 + [-1.0])
    assert not significantly_slower([1.0] * 4 + [-1.0])  # p = 6/32
    assert not significantly_slower([1.0] * 7 + [-1.0] * 2)  # p = 46/512
    assert not significantly_slower([])


def test_interpolates_on_log_tokens_after_the_last_loss() -> None:
    diffs = [[3 * MS] * 5, [2 * MS] * 5, [MS] * 5, [-MS] * 5]  # every size unanimous
    got = crossover([1, 4, 16, 64], diffs, significantly_slower)
    assert got == pytest.approx(32.0)
    assert math.isclose(math.log2(got), 5.0)


def test_a_loss_the_rounds_cannot_tell_from_noise_does_not_move_the_crossover() -> None:
    """Loses at 1 and 16 in every round, wins at 32 and 1024; at 128 slower in 6 of 9 rounds
    (median +1 ms, p = 0.25): not a loss."""
    tokens = [1, 16, 32, 128, 1024]
    diffs = [[2 * MS] * 9, [MS] * 9, [-MS] * 9, [MS] * 6 + [-MS] * 3, [-5 * MS] * 9]
    assert crossover(tokens, diffs, significantly_slower) == pytest.approx(math.sqrt(16 * 32))
    # the fit's rule: the median at 128 is a loss, so the win is from 1024
    assert crossover(tokens, diffs, median_slower) == pytest.approx(128 * 8 ** (1 / 6))
    assert median_slower([MS] * 5 + [-MS] * 4) and not median_slower([MS] * 4 + [-MS] * 5)
    diffs[3] = [MS] * 8 + [-MS]  # slower in 8 of 9 (p = 0.02): a loss; the win is from 1024
    from_1024 = 128 * 8 ** (1 / 6)  # +1 ms at 128 to -5 ms at 1024
    assert crossover(tokens, diffs, significantly_slower) == pytest.approx(from_1024)


def test_bounds() -> None:
    slower = significantly_slower
    assert crossover([1, 4], [[-MS] * 5, [-MS] * 5], slower) == 1.0  # wins everywhere
    assert crossover([1, 4], [[-MS] * 5, [MS] * 5], slower) is None  # loses at the last size
    # after the last loss only ties that lean slower: no win to cross at
    assert crossover([1, 4, 16], [[MS] * 5, [MS] * 3 + [-MS] * 2, [MS] * 3 + [-MS] * 2],
                     significantly_slower) is None
    with pytest.raises(ValueError, match="2 sizes but 1"):
        crossover([1, 4], [[MS]], median_slower)


def test_monotone_fit_pools_every_rise_with_what_came_before() -> None:
    assert monotone_fit([3.0, 1.0, 2.0, 0.0]) == pytest.approx([3.0, 1.5, 1.5, 0.0])
    assert monotone_fit([0.3, 0.2, -0.1]) == pytest.approx([0.3, 0.2, -0.1])  # already falls
    assert monotone_fit([1.0, 2.0, 3.0]) == pytest.approx([2.0, 2.0, 2.0])
    # a late rise pools back over several blocks: [1, 0, 0.5, 0.9] -> 1 and three of 0.467
    assert monotone_fit([1.0, 0.0, 0.5, 0.9]) == pytest.approx([1.0] + [1.4 / 3] * 3)


def test_monotone_crossover_pools_a_tie_between_wins_and_not_a_clear_loss() -> None:
    """Medians +20 %, +10 %, -10 %, +2 %, -5 %: the +2 % between wins is pooled with the -10 %
    before it (-4 %), so FlashComm2 wins from between 16 and 32; the median rule waits for 1024.
    At +30 % the pool stays above 0 up to 256 and the crossover moves past it."""
    tokens = [1, 16, 32, 128, 1024]
    diffs = [[0.2] * 5, [0.1] * 5, [-0.1] * 5, [0.02] * 3 + [-0.01] * 2, [-0.05] * 5]
    assert monotone_crossover(tokens, diffs) == pytest.approx(16 * 2 ** (0.1 / 0.14))
    assert crossover(tokens, diffs, median_slower) == pytest.approx(128 * 8 ** (0.02 / 0.07))
    diffs[3] = [0.3] * 5
    assert monotone_crossover(tokens, diffs) == pytest.approx(128 * 8 ** (0.1 / 0.15))


def test_monotone_crossover_bounds() -> None:
    assert monotone_crossover([1, 4], [[-0.1] * 3, [-0.2] * 3]) == 1.0  # wins everywhere
    # an early win outweighed by losses at the larger sizes: no crossover
    assert monotone_crossover([1, 4, 16, 64], [[0.2], [-0.05], [0.1], [0.1]]) is None
    with pytest.raises(ValueError, match="2 sizes but 1"):
        monotone_crossover([1, 4], [[0.1]])
    with pytest.raises(ValueError, match="at least one round"):
        monotone_crossover([1, 4], [[0.1], []])
