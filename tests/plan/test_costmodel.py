"""The alpha-beta cost model: traffic formulas, fitting, crossover and profiles."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from flashcomm.plan.costmodel import (
    OPS,
    Call,
    HardwareProfile,
    OpCost,
    Shape,
    attn_out_calls,
    comm_time,
    counted_bytes,
    crossover_tokens,
    exposed_fetch_s,
    fetch_call,
    fit_op,
    layer_calls,
    layer_flops,
    oshard_window_fits,
    step_calls,
)
from flashcomm.plan.strategy import Strategy

FC2 = Strategy("flashcomm2", otp=1)


def test_allreduce_layer_moves_two_all_reduces() -> None:
    shape = Shape(hidden=64, q_dim=96, tp=4, elt_bytes=4)
    calls = layer_calls(Strategy(), shape, 10)  # counted at T_pad = 12, as CommCounter does
    assert calls == [Call("all_reduce", 4, (("all_reduce", 2 * 3 * 3 * 64 * 4),))] * 2


def test_flashcomm1_same_bytes_as_allreduce_when_tokens_divide() -> None:
    shape = Shape(hidden=64, q_dim=96, tp=4, elt_bytes=2)
    ar = counted_bytes(layer_calls(Strategy(), shape, 12))
    fc1 = counted_bytes(layer_calls(Strategy(flashcomm1=True), shape, 12))
    assert sum(ar.values()) == sum(fc1.values())
    assert fc1["reduce_scatter"] == fc1["all_gather"] == ar["all_reduce"] // 2


def test_step_adds_flashcomm1_final_all_gather_and_auto_takes_its_path() -> None:
    shape = Shape(hidden=64, q_dim=96, tp=4, elt_bytes=4, layers=3)
    fc1 = Strategy("flashcomm2", 1, flashcomm1=True)
    assert step_calls(fc1, shape, 7) == 3 * layer_calls(fc1, shape, 7) + [
        Call("all_gather", 4, (("all_gather", 3 * 2 * 64 * 4),))]
    auto = Strategy("auto", 1)
    assert auto.path(5, 6) == Strategy() and auto.path(6, 6) == FC2
    assert auto.path(10**6, None) == Strategy()  # no crossover: all-reduce every step


@pytest.mark.parametrize("n, otp", [(2, 1), (4, 1), (4, 2), (8, 2), (8, 4)])
def test_flashcomm2_exchange_is_small_against_the_reduce_scatter(n: int, otp: int) -> None:
    h, d, t = 4096, 8192, 2048
    shape = Shape(hidden=h, q_dim=d, tp=n, elt_bytes=2)
    rs = (n - 1) / n * t * h * 2
    odp = n // otp
    calls = attn_out_calls(Strategy("flashcomm2", otp), shape, t)
    ops = counted_bytes(calls)
    assert ops["all_to_all"] == (odp - 1) / odp * t * d / n * 2
    assert ops["all_to_all"] <= (1 / n) * (d / h) * rs
    assert [(c.op, c.group) for c in calls] == [("all_to_all", odp)] + (
        [("reduce_scatter", otp)] if otp > 1 else []) + [("all_gather", n)]
    if otp > 1:
        assert ops["otp_reduce_scatter"] == (otp - 1) / n * t * h * 2
    int8_calls = attn_out_calls(Strategy("flashcomm2", otp, comm_dtype="int8"), shape, t)
    int8 = counted_bytes(int8_calls)
    assert int8["all_to_all_scales"] == (odp - 1) / odp * t * 4
    assert int8["all_to_all"] == ops["all_to_all"] / 2  # one byte per element instead of two
    assert len(int8_calls) == len(calls)  # payload and scales travel as one message


def test_tp1_has_no_traffic() -> None:
    assert layer_calls(FC2, Shape(64, 64, 1), 100) == []


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
        return comm_time(prof, layer_calls(s, shape, n))

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
    shared = replace(fitted, overlap=0.25)
    assert HardwareProfile.from_dict(shared.to_dict()) == shared
    assert HardwareProfile.load("pcie-gen4").overlap == 1.0  # profiles without it: GPUs
    with pytest.raises(ValueError, match="overlap=1.5; allowed: 0 to 1"):
        HardwareProfile.from_dict({**fitted.to_dict(), "overlap": 1.5})


def test_fetch_of_a_layer_sharded_w_o_by_source() -> None:
    shape = Shape(hidden=64, q_dim=128, tp=4, elt_bytes=2, layers=4, head_dim=32, kv_heads=2,
                  intermediate=256)
    owner = Strategy("flashcomm2", 2, oshard_k=1)
    gather = Strategy("flashcomm2", 2, oshard_k=1, shard_source="gather")
    # owner: the whole [H, D/otp] slice from its owner; gather: odp-1 resident [H, D/N] slices
    assert fetch_call(owner, shape) == Call("broadcast", 2, (("fetch", 64 * 64 * 2),))
    assert fetch_call(gather, shape) == Call("all_gather", 2, (("fetch", 1 * 64 * 32 * 2),))
    assert fetch_call(FC2, shape) is None and exposed_fetch_s(
        HardwareProfile.load("pcie-gen4"), FC2, shape, 100) == 0.0
    slow = HardwareProfile("slow", {op: OpCost(1.0, 1.0) for op in OPS}, 1e15)
    assert exposed_fetch_s(slow, owner, shape, 10) == pytest.approx(4 * (1.0 + 64 * 64 * 2),
                                                                    rel=1e-6)


def test_fetch_hides_behind_compute_only_to_the_profiles_overlap() -> None:
    shape = Shape(hidden=1024, q_dim=1024, tp=2, elt_bytes=4, layers=4, head_dim=64, kv_heads=4,
                  intermediate=2048)
    gather = Strategy("flashcomm2", 1, oshard_k=1, shard_source="gather")
    ops = {op: OpCost(1e-4, 6e7) for op in OPS}  # 500 Mbit/s-like
    fetch = 1e-4 + 1024 * 512 * 4 / 6e7  # one layer's W_o: the other rank's [H, D/N] slice
    window = layer_flops(shape, 2048)[0] / 1.5e11  # one whole layer (k = 1)
    assert window > fetch  # hidden entirely at full overlap
    for overlap, exposed in ((1.0, 0.0), (0.0, fetch), (0.1, fetch - 0.1 * window)):
        p = HardwareProfile("cpu", ops, 1.5e11, overlap=overlap)
        fits, f, w = oshard_window_fits(p, gather, shape, 2048)
        assert fits == (exposed == 0.0)
        assert (f, w) == (pytest.approx(fetch), pytest.approx(window * overlap))
        assert exposed_fetch_s(p, gather, shape, 2048) == pytest.approx(4 * exposed)
