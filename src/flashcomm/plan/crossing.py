"""Where FlashComm2 starts to beat the all-reduce, from paired timings at a few step sizes.

Both the fit (its in-context layers, plan/fit.py) and `flashcomm bench hosts` (the engine's
prefill sweep) time FlashComm2 against the baseline in paired rounds at sizes T_1 < ... < T_m
and ask where FlashComm2 starts to win.

`monotone_crossover`, the fit's and the benchmark's reading: FlashComm2's relative difference
can only fall as T grows (its extra collective is a fixed cost per call, the bytes it saves
grow with T), so the per-size medians are fitted by the closest non-increasing sequence
(least squares, pool-adjacent-violators) and the crossover is where that fit first reaches 0,
interpolated on log T. A size that reads slower between wins is pooled with its neighbours
instead of deciding alone. Across a 500 Mbit/s link the two paths differ by under 3 % from
T = 96 to 256; on the sweeps of six runs of `bench hosts` this reading said 25, 29, 26, 23, 26
and 22, where "the first win after the last median loss" said 242, 168, 28, 168, 144 and 160,
and the fit's in-context layers under that rule put the planner's crossover anywhere from 11 to
175 in five runs (under this one: 23, 23 and 27).

`crossover` takes the caller's rule of what a loss is and answers the first size after the last
loss whose median difference is <= 0:
- `median_slower`: a median above 0 ("wins for good");
- `significantly_slower`: a one-sided sign test over the size's rounds (p < 0.05: slower in
  8 of 9 rounds, 12 of 15).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence

SIGNIFICANCE = 0.05
"""One-sided p below which FlashComm2's slower rounds at a size count as a loss."""


def slower_p(diffs: Sequence[float]) -> float:
    """One-sided sign-test p-value of "FlashComm2 is slower" from paired differences
    (FlashComm2's time minus the baseline's, one per round; ties count against slower)."""
    n, k = len(diffs), sum(d > 0 for d in diffs)
    return sum(math.comb(n, j) for j in range(k, n + 1)) / 2**n


def median_slower(diffs: Sequence[float]) -> bool:
    """Whether FlashComm2's median over the rounds is slower at this size."""
    return statistics.median(diffs) > 0


def significantly_slower(diffs: Sequence[float]) -> bool:
    """Whether the rounds show FlashComm2 slower at this size (sign test, p < SIGNIFICANCE)."""
    return len(diffs) > 0 and slower_p(diffs) < SIGNIFICANCE


def crossover(tokens: Sequence[int], diffs: Sequence[Sequence[float]],
              is_loss: Callable[[Sequence[float]], bool]) -> float | None:
    """The T from which FlashComm2 wins (module doc): tokens[0] when no size is a loss and the
    first one wins, None when no size after the last loss wins; `diffs[i]` holds the paired
    differences at tokens[i] (positive: FlashComm2 slower), `is_loss` says which sizes are
    losses (median_slower or significantly_slower)."""
    if len(tokens) != len(diffs) or not tokens:
        raise ValueError(f"{len(tokens)} sizes but {len(diffs)} lists of differences")
    med = [statistics.median(d) for d in diffs]
    last_loss = max((i for i, d in enumerate(diffs) if is_loss(d)), default=-1)
    win = next((i for i in range(last_loss + 1, len(med)) if med[i] <= 0), None)
    if win is None:
        return None
    if win == 0:
        return float(tokens[0])
    return log_interpolate(tokens[win - 1], tokens[win], med[win - 1], med[win])


def log_interpolate(t0: float, t1: float, e0: float, e1: float) -> float:
    """T where a difference of e0 at t0 and e1 at t1 (e0 > 0 >= e1) passes 0, linear in log T;
    t1 when e0 <= 0 too."""
    if e0 <= 0:
        return float(t1)
    return math.exp(math.log(t0) + (math.log(t1) - math.log(t0)) * e0 / (e0 - e1))


def monotone_fit(values: Sequence[float]) -> list[float]:
    """The non-increasing sequence closest to `values` in least squares (pool adjacent
    violators: a rise is averaged with what came before it until none is left)."""
    blocks: list[tuple[float, int]] = []  # (mean, count)
    for v in values:
        mean, count = float(v), 1
        while blocks and blocks[-1][0] < mean:
            m, c = blocks.pop()
            mean, count = (m * c + mean * count) / (c + count), c + count
        blocks.append((mean, count))
    return [m for m, c in blocks for _ in range(c)]


def monotone_crossover(tokens: Sequence[int], diffs: Sequence[Sequence[float]]) -> float | None:
    """The T from which FlashComm2 wins by the non-increasing fit of the per-size medians
    (module doc): tokens[0] when the fit is <= 0 there already, None when it stays above 0;
    `diffs[i]` holds the paired relative differences at tokens[i] (FlashComm2's time over the
    baseline's, minus 1, one per round)."""
    if len(tokens) != len(diffs) or not tokens or not all(diffs):
        raise ValueError(f"{len(tokens)} sizes but {len(diffs)} lists of differences "
                         "(each needs at least one round)")
    fit = monotone_fit([statistics.median(d) for d in diffs])
    win = next((i for i, v in enumerate(fit) if v <= 0), None)
    if win is None:
        return None
    if win == 0:
        return float(tokens[0])
    return log_interpolate(tokens[win - 1], tokens[win], fit[win - 1], fit[win])
