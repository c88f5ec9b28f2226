"""Where FlashComm2 starts to beat the all-reduce, from paired timings at a few step sizes.

Both the fit (its in-context layers, plan/fit.py) and `flashcomm bench hosts` (the engine's
prefill sweep) time FlashComm2 against the baseline in paired rounds at sizes T_1 < ... < T_m
and ask where FlashComm2 starts to win: the first size after the last loss whose median
difference is <= 0, interpolated on log T from the size before it. What counts as a loss is
the caller's rule:
- `median_slower`, the fit's: a median above 0. It is the more conservative rule, as `auto`
  must be: a threshold set where FlashComm2 might still lose costs the user, and with the
  sign test 5 rounds call a loss only when all 5 agree.
- `significantly_slower`, one reading of a measurement: a one-sided sign test over the size's
  rounds (p < 0.05: slower in 8 of 9 rounds, 12 of 15). Across a 500 Mbit/s link the two
  paths differ by under 3 % from T = 96 to 256; one median above 1 there put "wins from here
  on" anywhere from 146 to 242 in runs of one benchmark, while the first win sat at 19-27 in
  every run.
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
