"""`flashcomm bench e2e` on real gloo ranks (N = 2): one smoke run through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from doc_commands import doc_argv, doc_command

from flashcomm.models.random_checkpoint import small_llama_config, write_checkpoint
from flashcomm.plan.costmodel import HardwareProfile
from flashcomm.plan.strategy import Strategy

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer random Llama (H = D = 64) written by flashcomm.models.random_checkpoint."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), small_llama_config(**TINY), seed=3)


def test_bench_e2e_smoke(tiny: Path, tmp_path: Path) -> None:
    from flashcomm import cli

    out = tmp_path / "e2e"
    shown = doc_argv(doc_command("docs/commands.md", "flashcomm bench e2e"), DIR=str(tiny))[1]
    rc = cli.main([*shown[1:], "--nproc", "2", "--prefill-tokens",
                   "8,24", "--decode-batch", "1,2", "--decode-context", "4", "--repeats", "1",
                   "--out", str(out), "--timeout", "240"])
    assert rc == 0
    res = json.loads((out / "e2e.json").read_text())
    names = [s["name"] for s in res["strategies"]]
    assert names == ["allreduce", "flashcomm1", "fc2", "fc2+oshard(k=0)",
                     "fc2+oshard(k=1)", "fc2+int8", "auto", "fc2+gather(k=1)",
                     "auto+oshard(k=1)", "auto+gather(k=1)"]  # L = 3: k <= 1; N = 2: no otp=2
    assert [c["label"] for c in res["cases"]] == ["decode B=1", "decode B=2", "prefill T=8",
                                                  "prefill T=24"]
    for s in res["strategies"]:
        assert len(s["steps"]) == 4
        for st in s["steps"]:
            for key in ("median_s", "min_s", "max_s", "ratio_to_allreduce", "bytes_total",
                        "blocked_wait_median_s", "measured_comm_s", "predicted_comm_s"):
                assert key in st, key
            assert st["min_s"] <= st["median_s"] <= st["max_s"]
            assert st["ratio_to_allreduce"] > 0
            if s["name"] != "fc2+int8":
                assert st["same_argmax_as_allreduce"]
            # the cost model's bytes are the bytes the engine counted, on the path it took
            assert st["bytes_sent"] == st["predicted_bytes"], (s["name"], st["path"])
            if s["auto"]:
                assert st["path"] == ("fc2" if st["auto_path"] == "flashcomm2" else "allreduce")
        if s["name"] == "allreduce":
            assert all(st["ratio_to_allreduce"] == 1.0 for st in s["steps"])
    assert {"predicted_grid_index", "measured_comm_grid_index", "within_one_step"} <= set(
        res["crossover"])
    assert set(res["checks"]) == {"oshard_k1_o_proj_memory_ratio", "auto_vs_best_fixed",
                                  "gather_auto_k1_decode_B1_ratio_to_allreduce",
                                  "gather_auto_k1_o_proj_memory_ratio",
                                  "gather_auto_k1_decode_fetch_bytes"}  # no T=1024 here
    assert res["checks"]["gather_auto_k1_decode_fetch_bytes"]["ok"]  # the counters, not time
    assert res["checks"]["gather_auto_k1_o_proj_memory_ratio"]["ok"]
    assert res["checks"]["oshard_k1_o_proj_memory_ratio"]["ok"]  # (ceil(3/2)+2)/3 >= 4/4 * ...
    mem = res["memory_per_rank"]
    assert len(mem) == 2 and mem[0]["fc2"]["o_proj"] == 3 * 64 * 64 * 4
    assert mem[0]["auto"] == mem[0]["fc2"]  # one resident W_o serves both paths
    HardwareProfile.load(str(out / "profile.json"))
    assert (out / "e2e_latency.png").stat().st_size > 0
    assert (out / "e2e_memory.png").stat().st_size > 0


def test_strategy_rows_cover_the_issue() -> None:
    from flashcomm.bench.e2e import strategy_rows

    rows = strategy_rows(4, 6)
    assert [r.label for r in rows] == ["allreduce", "flashcomm1", "fc2", "fc2(otp=2)",
                                       "fc2+oshard(k=0)", "fc2+oshard(k=1)", "fc2+oshard(k=2)",
                                       "fc2+int8", "auto", "fc2+gather(k=1)", "auto+oshard(k=1)",
                                       "auto+gather(k=1)"]
    assert rows[8].fixed() == rows[2] == Strategy("flashcomm2", 1)  # auto: FlashComm2's W_o
