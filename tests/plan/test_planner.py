"""`flashcomm plan`: memory formulas, predictions, recommendation and errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from flashcomm.knobs import ConfigError
from flashcomm.model_args import ModelArgs
from flashcomm.plan.costmodel import HardwareProfile
from flashcomm.plan.planner import GIB, make_plan

LLAMA70B = {"model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80,
            "num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 28672,
            "vocab_size": 128256, "hidden_act": "silu"}


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA70B))
    return tmp_path


def test_o_proj_memory_follows_the_design_formulas() -> None:
    m = ModelArgs.from_hf_config(LLAMA70B)
    plan = make_plan(m, 8, HardwareProfile.load("h100-nvlink"), otps=[1, 2])
    rows = {r["strategy"]: r for r in plan["strategies"]}
    w = 8192 * 8192 * 2  # |W_o| in bf16
    assert rows["allreduce"]["o_proj_bytes"] == 80 * w // 8
    assert rows["fc2"]["o_proj_bytes"] == rows["auto"]["o_proj_bytes"] == 80 * w
    assert rows["fc2(otp=2)"]["o_proj_bytes"] == 80 * w // 2
    for k in (0, 1, 2):
        assert rows[f"fc2+oshard(k={k})"]["o_proj_bytes"] == (math.ceil(80 / 8) + k + 1) * w
        assert rows[f"fc2(otp=2)+oshard(k={k})"]["o_proj_bytes"] == (
            math.ceil(80 / 4) + k + 1) * w // 2
        # gather: every rank keeps its D/N slice resident (L|W|/odp) plus the k+1 ring
        assert rows[f"fc2+gather(k={k})"]["o_proj_bytes"] == 80 * w // 8 + (k + 1) * w
        assert rows[f"fc2(otp=2)+gather(k={k})"]["o_proj_bytes"] == (
            80 * w // 2 // 4 + (k + 1) * w // 2)


def test_recommendation_respects_the_budget_and_flashcomm2_wins_prefill() -> None:
    m = ModelArgs.from_hf_config(LLAMA70B)
    plan = make_plan(m, 8, HardwareProfile.load("h100-nvlink"), memory_budget_bytes=24 * GIB)
    rows = {r["strategy"]: r for r in plan["strategies"]}
    best = rows[plan["recommendation"]["strategy"]]
    assert best["fits_budget"] and best["weight_bytes"] <= 24 * GIB
    assert not rows["fc2"]["fits_budget"]  # 10 GiB of replicated o_proj
    assert rows["fc2"]["prefill_comm_s"] < rows["allreduce"]["prefill_comm_s"]
    cross = rows["fc2"]["crossover_tokens"]
    assert cross is not None and plan["decode_batch"] < cross < plan["prefill_tokens"]
    # auto takes FlashComm2 at the prefill size and the all-reduce at the decode batch
    assert rows["auto"]["crossover_tokens"] == cross
    assert rows["auto"]["prefill_comm_s"] == rows["fc2"]["prefill_comm_s"]
    assert rows["auto"]["decode_comm_s"] == rows["allreduce"]["decode_comm_s"]
    tight = make_plan(m, 8, HardwareProfile.load("h100-nvlink"), memory_budget_bytes=1 * GIB)
    assert tight["recommendation"]["strategy"] is None


def test_bad_otp_names_the_knob() -> None:
    m = ModelArgs.from_hf_config(LLAMA70B)
    with pytest.raises(ConfigError, match=r"otp=3: must divide tp=8"):
        make_plan(m, 8, HardwareProfile.load("pcie-gen4"), otps=[3])


def test_cli_json_and_errors(model_dir) -> None:
    cmd = [sys.executable, "-m", "flashcomm.cli", "plan", "--model", str(model_dir), "--tp", "8"]
    out = subprocess.run([*cmd, "--json", "--profile", "pcie-gen4"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["profile"] == "pcie-gen4" and plan["recommendation"]["strategy"]
    out = subprocess.run([*cmd, "--profile", "nope.json"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "profile='nope.json'" in out.stderr
    assert len(out.stderr.splitlines()) == 1 and "Traceback" not in out.stderr


QWEN3_30B = {"model_type": "qwen3_moe", "hidden_size": 2048, "num_hidden_layers": 48,
             "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
             "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128,
             "num_experts_per_tok": 8, "vocab_size": 151936}


def test_uneven_expert_parallel_counts_the_largest_rank() -> None:
    from flashcomm.model_args import expert_range
    from flashcomm.plan.planner import weight_bytes_per_rank
    from flashcomm.plan.strategy import Strategy

    one = 3 * 2048 * 768 * 48 * 2  # one expert of every layer, bf16
    for e, tp in ((60, 8), (40, 6), (128, 8)):  # 60 at tp=8: 8, 8, 8, 8, 7, 7, 7, 7 per rank
        m = ModelArgs.from_hf_config({**QWEN3_30B, "num_experts": e})
        most = max(b - a for a, b in (expert_range(e, tp, r) for r in range(tp)))
        assert most == math.ceil(e / tp)
        tp_experts = weight_bytes_per_rank(m, tp, Strategy(), 2)[1]  # 1/N of every expert
        ep = weight_bytes_per_rank(m, tp, Strategy(expert_parallel=True), 2)[1]
        assert ep - tp_experts == pytest.approx((most - e / tp) * one), (e, tp)
