"""The alpha-beta cost model: traffic formulas, fitting, crossover and profiles."""

from __future__ import annotations

import json

import pytest

from flashcomm.plan.costmodel import (
    OPS,
    HardwareProfile,
    OpCost,
    Shape,
    Strategy,
    attn_out_traffic,
    comm_time,
    crossover_tokens,
    fit_op,
    layer_traffic,
)

FC2 = Strategy("flashcomm2", otp=1)


def test_allreduce_layer_moves_two_all_reduces() -> None:
    shape = Shape(hidden=64, q_dim=96, tp=4, elt_bytes=4)
    ops = layer_traffic(Strategy(), shape, 10)  # counted at T_pad = 12, as CommCounter does
    assert ops == [("all_reduce", 4, 2 * 3 / 4 * 12 * 64 * 4)] * 2


def test_flashcomm1_same_bytes_as_allreduce_when_tokens_divide() -> None:
    shape = Shape(hidden=64, q_dim=96, tp=4, elt_bytes=2)
    ar = sum(b for _, _, b in layer_traffic(Strategy(), shape, 12))
    fc1 = sum(b for _, _, b in layer_traffic(Strategy(flashcomm1=True), shape, 12))
    assert ar == fc1


@pytest.mark.parametrize("n, otp", [(2, 1), (4, 1), (4, 2), (8, 2), (8, 4)])
def test_flashcomm2_exchange_is_small_against_the_reduce_scatter(n: int, otp: int) -> None:
    h, d, t = 4096, 8192, 2048
    shape = Shape(hidden=h, q_dim=d, tp=n, elt_bytes=2)
    rs = (n - 1) / n * t * h * 2
    odp = n // otp
    ops = dict((op, b) for op, _, b in attn_out_traffic(Strategy("flashcomm2", otp), shape, t))
    assert ops["all_to_all"] == (odp - 1) / odp * t * d / n * 2
    assert ops["all_to_all"] <= (1 / n) * (d / h) * rs
    if otp > 1:
        assert ops["reduce_scatter"] == (otp - 1) / n * t * h * 2
    int8 = dict((op, b) for op, _, b in
                attn_out_traffic(Strategy("flashcomm2", otp, comm_dtype="int8"), shape, t))
    scales = (odp - 1) / odp * t * 4
    assert int8["all_to_all"] - scales == ops["all_to_all"] / 2  # a quarter of fp32's


def test_tp1_has_no_traffic() -> None:
    assert layer_traffic(FC2, Shape(64, 64, 1), 100) == []


def test_fit_recovers_alpha_and_bandwidth() -> None:
    truth = OpCost(alpha_s=5e-5, bytes_per_s=2e9)
    samples = [(b, truth.time(b)) for b in (1e3, 1e5, 1e6, 1e7)]
    fit = fit_op(samples)
    assert fit.alpha_s == pytest.approx(5e-5, rel=1e-6)
    assert fit.bytes_per_s == pytest.approx(2e9, rel=1e-6)
    with pytest.raises(ValueError, match="two"):
        fit_op([(1.0, 1.0)])
    flat = fit_op([(1e3, 2e-3), (1e6, 1e-3)])  # noise: bigger took less time
    assert flat == OpCost(alpha_s=0.0, bytes_per_s=1e6 / 1e-3)


def test_crossover_separates_losing_and_winning_token_counts() -> None:
    prof = HardwareProfile.load("pcie-gen4")
    shape = Shape(hidden=4096, q_dim=4096, tp=8, elt_bytes=2)
    t = crossover_tokens(prof, shape, FC2, Strategy())
    assert t is not None and t > 1

    def cost(s: Strategy, n: int) -> float:
        return comm_time(prof, layer_traffic(s, shape, n))

    assert cost(FC2, t) < cost(Strategy(), t)
    assert cost(FC2, t - 1) >= cost(Strategy(), t - 1)


def test_crossover_none_when_flashcomm2_never_wins() -> None:
    slow_a2a = {op: OpCost(1e-5, 1e10) for op in OPS} | {"all_to_all": OpCost(1e-3, 1e6)}
    prof = HardwareProfile("slow-a2a", slow_a2a, 1e12)
    assert crossover_tokens(prof, Shape(64, 64, 4), FC2, Strategy(), max_tokens=4096) is None


def test_profiles_load_round_trip_and_reject_bad_input(tmp_path) -> None:
    for name in ("h100-nvlink", "pcie-gen4"):
        p = HardwareProfile.load(name)
        assert set(p.ops) == set(OPS) and p.matmul_flops_per_s > 0 and p.source
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps(p.to_dict()))
        assert HardwareProfile.load(str(f)) == p
    fitted = HardwareProfile("fit", {}, 1e9, per_tp={2: {op: OpCost(1e-4, 1e8) for op in OPS},
                                                     4: {op: OpCost(2e-4, 5e7) for op in OPS}})
    assert HardwareProfile.from_dict(fitted.to_dict()) == fitted
    assert fitted.cost("all_to_all", 3).alpha_s == 1e-4  # nearest fitted N, ties to smaller
    assert fitted.cost("all_to_all", 8).alpha_s == 2e-4
    with pytest.raises(ValueError, match="not a file and not a shipped profile"):
        HardwareProfile.load("nope")
    with pytest.raises(ValueError, match="unknown op"):
        HardwareProfile.from_dict({"name": "x", "matmul_flops_per_s": 1,
                                   "ops": {"allreduce": {"alpha_s": 0, "bytes_per_s": 1}}})
