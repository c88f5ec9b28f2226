"""Per-phase W_o traffic of the two weight sources and the per-deployment recommendation of
`flashcomm plan` (prefill-only, decode-only, mixed serving) within a memory budget."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flashcomm.model_args import ModelArgs
from flashcomm.plan import costmodel as cm
from flashcomm.plan.deploy import DEPLOYMENTS
from flashcomm.plan.planner import GIB, make_plan
from flashcomm.plan.strategy import Strategy

LLAMA70B = {"model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80,
            "num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 28672,
            "vocab_size": 128256, "hidden_act": "silu"}
SHAPE = cm.Shape(hidden=64, q_dim=128, tp=4, elt_bytes=2, layers=6, head_dim=32, kv_heads=2,
                 intermediate=256)


@pytest.mark.parametrize("otp", [1, 2])
def test_fetch_traffic_per_step_and_phase_by_source(otp: int) -> None:
    w = 64 * 128 // otp * 2  # |W| = H * D/otp * bf16
    g = 4 // otp
    per_step = 6 * (g - 1) * w / g  # every layer, (G-1)/G of |W| per rank
    for src in ("owner", "gather"):
        fixed = Strategy("flashcomm2", otp, oshard_k=1, shard_source=src)
        threshold = Strategy("flashcomm2", otp, oshard_k=1, shard_source=src, min_tokens=64)
        auto = Strategy("auto", otp, oshard_k=1, shard_source=src)
        for t in (1, 16, 4096):  # FlashComm2 on every step: both sources fetch every layer
            assert cm.fetch_bytes_per_step(fixed, SHAPE, t) == per_step
            assert len(cm.step_fetches(fixed, SHAPE, t)) == 6
        # below the threshold: the owner ring still turns, the gather source moves nothing
        small = per_step if src == "owner" else 0.0
        assert cm.fetch_bytes_per_step(threshold, SHAPE, 16) == small
        assert cm.fetch_bytes_per_step(auto, SHAPE, 16, threshold=64) == small
        assert cm.fetch_bytes_per_step(auto, SHAPE, 64, threshold=64) == per_step
        assert cm.fetch_bytes_per_step(auto, SHAPE, 4096, threshold=None) == small  # auto: never
    slow = cm.HardwareProfile.load("pcie-gen4")
    gather = Strategy("auto", otp, oshard_k=0, shard_source="gather")
    owner = Strategy("auto", otp, oshard_k=0, shard_source="owner")
    assert cm.exposed_fetch_s(slow, gather, SHAPE, 16, threshold=64) == 0.0
    assert cm.exposed_fetch_s(slow, owner, SHAPE, 16, threshold=64) > 0.0  # one token's window


def test_gather_crossover_counts_the_fetch_compute_does_not_hide() -> None:
    shape = cm.Shape(hidden=8192, q_dim=8192, tp=8, elt_bytes=2, layers=80, head_dim=128,
                     kv_heads=8, intermediate=28672)
    prof = cm.HardwareProfile.load("h100-nvlink")
    plain = cm.crossover_tokens(prof, shape, Strategy("flashcomm2", 1), Strategy())
    owner = Strategy("flashcomm2", 1, oshard_k=1)
    assert cm.crossover_tokens(prof, shape, owner, Strategy()) == plain
    for k in (0, 1, 2):
        g = Strategy("flashcomm2", 1, oshard_k=k, shard_source="gather")
        t = cm.crossover_tokens(prof, shape, g, Strategy())
        assert t is not None and t > plain
        # at the threshold k layers of compute hide the fetch and FlashComm2's comm beats the
        # all-reduce; just below, one of the two fails
        for tokens, wins in ((t, True), (t - 1, False)):
            hidden = cm.oshard_window_fits(prof, g, shape, tokens)[0]
            fc2 = cm.comm_time(prof, cm.layer_calls(g, shape, tokens))
            base = cm.comm_time(prof, cm.layer_calls(Strategy(), shape, tokens))
            assert (hidden and fc2 < base) == wins
            assert hidden or cm.exposed_fetch_s(prof, g, shape, tokens) > 0
        assert cm.exposed_fetch_s(prof, g, shape, t) == 0.0


def test_plan_rows_report_fetch_per_phase_and_whether_it_is_hidden() -> None:
    m = ModelArgs.from_hf_config(LLAMA70B)
    plan = make_plan(m, 8, cm.HardwareProfile.load("h100-nvlink"), otps=[1])
    rows = {r["strategy"]: r for r in plan["strategies"]}
    w = 8192 * 8192 * 2
    fetch = 80 * 7 * w / 8
    cross = rows["auto"]["crossover_tokens"]
    assert plan["decode_batch"] < cross < plan["prefill_tokens"]
    gather, owner = rows["auto+gather(k=1)"], rows["auto+oshard(k=1)"]
    # owner: the ring turns on both paths, so the crossover is FlashComm2's; gather: only
    # FlashComm2 steps fetch, so its exposed fetch moves the threshold up to where k=1 hides it
    assert owner["threshold"] == cross < gather["threshold"] < plan["prefill_tokens"]
    assert gather["threshold"] == gather["crossover_tokens"]
    assert gather["prefill_fetch_bytes"] == owner["prefill_fetch_bytes"] == fetch
    assert (gather["decode_fetch_bytes"], gather["decode_fetch_hidden"]) == (0, None)
    assert owner["decode_fetch_bytes"] == fetch and owner["decode_fetch_hidden"] is False
    assert owner["decode_exposed_s"] > 0 == gather["decode_exposed_s"]
    assert gather["oshard_hidden"] is True  # k=1 at 4096 tokens hides a 128 MiB all-gather
    assert gather["decode_comm_s"] == rows["allreduce"]["decode_comm_s"]
    assert rows["fc2+gather(k=1)"]["threshold"] == 0 and rows["allreduce"]["threshold"] is None


def test_deployments_recommend_a_source_and_threshold() -> None:
    m = ModelArgs.from_hf_config(LLAMA70B)
    plan = make_plan(m, 8, cm.HardwareProfile.load("h100-nvlink"), memory_budget_bytes=21 * GIB)
    dep = plan["deployments"]
    assert set(dep) == set(DEPLOYMENTS)
    # decode never pays for FlashComm2 or a fetch: plain TP, the least memory
    assert dep["decode_only"]["strategy"] == "allreduce"
    assert dep["decode_only"]["flashcomm2_min_tokens"] is None
    # prefill: FlashComm2 on every step, its W_o layer-sharded to fit 21 GiB, fetch hidden
    pre = dep["prefill_only"]
    assert pre["flashcomm2_min_tokens"] == 0 and pre["prefill"]["fetch_hidden"] is True
    assert pre["shard_source"] in ("owner", "gather") and "memory budget" in pre["why"]
    # mixed: FlashComm2 on prefill, all-reduce on decode, and no W_o bytes on decode
    mixed = dep["mixed"]
    assert mixed["strategy"].startswith("auto+gather") and mixed["shard_source"] == "gather"
    assert plan["decode_batch"] < mixed["flashcomm2_min_tokens"] < plan["prefill_tokens"]
    assert mixed["decode"]["fetch_bytes"] == 0 and mixed["prefill"]["flashcomm2"]
    assert mixed["weight_bytes"] <= 21 * GIB


def test_cli_budget_below_the_gather_formula_falls_back_and_says_why() -> None:
    """flashcomm plan --model demo --tp 4 --memory-budget X --json, X just below the cheapest
    gather footprint: the mixed deployment takes the owner source or plain TP, and says why."""
    cmd = [sys.executable, "-m", "flashcomm.cli", "plan", "--model", "demo", "--tp", "4",
           "--profile", "pcie-gen4", "--dtype-bytes", "4", "--json"]

    def plan(*extra: str) -> dict:
        out = subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    free = plan()
    mixed = free["deployments"]["mixed"]
    assert mixed["shard_source"] == "gather", mixed  # unconstrained, gather wins mixed serving
    gathers = [r for r in free["strategies"] if "+gather" in r["strategy"]]
    below = min(r["weight_bytes"] for r in gathers) - 1
    tight = plan("--memory-budget", str(below / GIB))
    got = tight["deployments"]["mixed"]
    assert got["strategy"] is not None and got["shard_source"] in (None, "owner"), got
    assert got["weight_bytes"] <= below
    assert mixed["strategy"] in got["why"] and "memory budget" in got["why"]
    assert "L*|W|/odp + (k+1)*|W| under the gather source" in got["why"]
