"""plan.fit beyond the alpha-beta fit: each op's alpha where a decode step issues it, and the
all-gather's alpha moved so the model's crossover falls where the in-context layers cross.

The in-context "collectives" are sleeps between real barriers on real gloo ranks, so the
expected seconds are known: the unit under test is the timing harness, not gloo."""

from __future__ import annotations

import time

import pytest
import torch

from flashcomm.launch import run_local
from flashcomm.plan.costmodel import (
    HardwareProfile,
    OpCost,
    Shape,
    comm_time,
    crossover_tokens,
    layer_calls,
)
from flashcomm.plan.fit import align_crossover
from flashcomm.plan.strategy import Strategy

MS = 5e-3
"""The time unit: far above a sleep's overshoot on a loaded machine."""


def _alphas_worker(rank: int, world: int) -> dict[str, float]:
    from flashcomm.plan.fit import in_context_alphas

    def op(seconds: float):
        return 0.0, lambda: time.sleep(seconds)

    ops = {"all_reduce": op(2 * MS), "all_to_all": op(MS), "all_gather": op(MS / 2)}
    return in_context_alphas(ops, 64, torch.float32, rounds=3, calls=4)


def test_in_context_alphas_time_each_op_after_a_decode_gemv() -> None:
    got = run_local(_alphas_worker, 2, timeout_s=120)
    assert got[0] == got[1]  # every rank the same values
    a = got[0]
    assert a["all_reduce"] == pytest.approx(2 * MS, abs=0.4 * MS)
    assert a["all_to_all"] == pytest.approx(MS, abs=0.4 * MS)
    assert a["all_gather"] == pytest.approx(MS / 2, abs=0.4 * MS)


@pytest.mark.parametrize("target", [8.0, 20.0, 140.0])
def test_align_crossover_puts_the_models_crossover_at_the_measured_one(target: float) -> None:
    costs = {"all_reduce": OpCost(1.5e-3, 60e6), "all_to_all": OpCost(0.3e-3, 52e6),
             "all_gather": OpCost(0.9e-3, 54e6), "reduce_scatter": OpCost(1e-3, 55e6),
             "broadcast": OpCost(0.5e-3, 70e6)}
    aligned = align_crossover(costs, 2, 1024, torch.float32, target)
    assert {op: c for op, c in aligned.items() if op != "all_gather"} == {
        op: c for op, c in costs.items() if op != "all_gather"}
    profile = HardwareProfile("aligned", aligned, 1e11, per_tp={2: aligned})
    shape = Shape(hidden=1024, q_dim=1024, tp=2, elt_bytes=4)
    got = crossover_tokens(profile, shape, Strategy("flashcomm2", 1), Strategy())
    assert got == pytest.approx(target, abs=1.0)
    # later_only leaves a model whose crossover is already later than the target alone
    assert align_crossover(aligned, 2, 1024, torch.float32, target / 2, later_only=True) \
        == aligned
    gap = (comm_time(profile, layer_calls(Strategy("flashcomm2", 1), shape, round(target)))
           - comm_time(profile, layer_calls(Strategy(), shape, round(target))))
    assert abs(gap) < 1e-6
