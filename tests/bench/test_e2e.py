"""The collective fit, `--attn-out auto` and `flashcomm bench e2e`, on real gloo ranks (N = 2).

One spawned group runs the fit and every auto case; the e2e smoke run spawns its own group.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from flashcomm.cli.run import NEVER, auto_min_tokens
from flashcomm.config import FlashCommConfig
from flashcomm.models.random_checkpoint import small_llama_config, write_checkpoint
from flashcomm.models.transformer import ModelArgs
from flashcomm.plan.costmodel import OPS, HardwareProfile, OpCost

PROMPTS = [[5, 9, 200, 17, 3, 3, 42], [100, 7, 250, 1]]  # prefill T = 11, decode T = 2
NEW_TOKENS = 6
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)


def flat_profile(alpha: float, bandwidth: float) -> HardwareProfile:
    """Every op costs alpha + bytes / bandwidth."""
    return HardwareProfile("flat", {op: OpCost(alpha, bandwidth) for op in OPS}, 1e9)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer random Llama (H = D = 64) written by flashcomm.models.random_checkpoint."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), small_llama_config(**TINY), seed=3)


def _fit_and_auto_worker(rank: int, world: int, ckpt: str, profiles: dict[str, str]) -> dict:
    from flashcomm.cli.run import resolve_auto
    from flashcomm.groups import ParallelGroups
    from flashcomm.layout import ParallelLayout
    from flashcomm.models.engine import Engine
    from flashcomm.plan.fit import fit_profile

    cfg = FlashCommConfig(tp=world, flashcomm2_otp=1)
    groups = ParallelGroups.build(ParallelLayout.from_config(cfg, world), shard_weights=())
    fitted = fit_profile(groups, rows=(1, 64, 512), width=64, rounds=3).to_dict()
    engine = Engine.from_checkpoint(ckpt, cfg, groups, progress=False)
    out = {"fitted": fitted, "auto": {}}
    for name, prof in {**profiles, "fit": "fit"}.items():
        auto = resolve_auto(engine, groups, prof)
        res = engine.generate(PROMPTS, NEW_TOKENS)
        out["auto"][name] = {"threshold": auto["flashcomm2_min_tokens"],
                             "profile": auto["profile_dict"], "tokens": res.tokens,
                             "bytes": res.comm_bytes_by_op, "o_proj": res.o_proj_bytes}
    return out


def test_fit_and_auto_on_gloo(tiny: Path, tmp_path: Path) -> None:
    from flashcomm import cli
    from flashcomm.launch import run_local
    from flashcomm.models.engine import Engine
    from flashcomm.plan.fit import write_profile

    args = ModelArgs.from_dir(tiny)
    cfg = FlashCommConfig(tp=2, flashcomm2_otp=1)
    # flat profile, N = 2, H = D = 64, fp32: all-reduce wins below ~alpha*B/64 tokens
    between = flat_profile(5e-4, 6.4e5)
    profiles = {"between": between, "always": flat_profile(0.0, 1e9),
                "never": flat_profile(1.0, 1e9)}
    thresholds = {k: auto_min_tokens(args, cfg, p, 4) for k, p in profiles.items()}
    assert 2 < thresholds["between"] <= 11, thresholds  # decode below, prefill above
    assert thresholds["always"] == 1 and thresholds["never"] == NEVER
    paths = {k: str(write_profile(p, tmp_path / f"{k}.json")) for k, p in profiles.items()}

    ref = Engine.from_checkpoint(tiny, FlashCommConfig(), None, progress=False)
    reference = ref.generate(PROMPTS, NEW_TOKENS).tokens
    res = run_local(_fit_and_auto_worker, 2, str(tiny), paths, timeout_s=240)

    # the fit: every op of every rank identical, positive alpha and bandwidth, loadable
    fitted = res[0]["fitted"]
    assert res[1]["fitted"]["per_tp"] == fitted["per_tp"]
    prof = HardwareProfile.from_dict(fitted)
    assert set(prof.per_tp) == {2} and set(prof.per_tp[2]) == set(OPS)
    for op, c in prof.per_tp[2].items():
        assert c.alpha_s >= 0 and 0 < c.bytes_per_s < 1e14, (op, c)
    assert prof.matmul_flops_per_s > 0
    path = write_profile(prof, tmp_path / "fit.json")
    assert HardwareProfile.load(str(path)) == prof
    assert cli.main(["plan", "--model", str(tiny), "--tp", "2", "--profile", str(path),
                     "--json"]) == 0

    # auto: the threshold from the profile; prefill (T = 11) above it takes FlashComm2's
    # all-to-all, decode (T = 2) below it the all-reduce; tokens identical to the reference
    layers, dn = args.n_layers, args.q_dim // 2
    prefill_a2a = layers * 1 * (12 // 2) * dn * 4  # (odp-1) * T_pad/odp * D/N * 4, T_pad = 12
    decode_a2a = (NEW_TOKENS - 1) * layers * 1 * (2 // 2) * dn * 4  # T = T_pad = 2 per step
    for r in res:
        for name, a in r["auto"].items():
            assert a["tokens"] == reference, name
            assert a["o_proj"] == layers * args.dim * args.q_dim * 4  # one full W_o per layer
        got = r["auto"]
        assert {k: got[k]["threshold"] for k in profiles} == thresholds
        assert got["between"]["bytes"]["all_to_all"] == prefill_a2a  # decode steps: none
        assert got["always"]["bytes"]["all_to_all"] == prefill_a2a + decode_a2a
        assert "all_to_all" not in got["never"]["bytes"]
        fit_thr = auto_min_tokens(args, cfg, HardwareProfile.from_dict(got["fit"]["profile"]), 4)
        assert got["fit"]["threshold"] == fit_thr
    assert res[0]["auto"]["fit"]["threshold"] == res[1]["auto"]["fit"]["threshold"]


def test_bench_e2e_smoke(tiny: Path, tmp_path: Path) -> None:
    from flashcomm import cli

    out = tmp_path / "e2e"
    rc = cli.main(["bench", "e2e", "--model", str(tiny), "--nproc", "2", "--prefill-tokens",
                   "8,24", "--decode-batch", "1,2", "--decode-context", "4", "--repeats", "1",
                   "--out", str(out), "--timeout", "240"])
    assert rc == 0
    res = json.loads((out / "e2e.json").read_text())
    names = [s["name"] for s in res["strategies"]]
    assert names == ["allreduce", "flashcomm1", "fc2(otp=1)", "fc2+oshard(k=0)",
                     "fc2+oshard(k=1)", "fc2+int8", "auto"]  # L = 3: k <= 1; N = 2: no otp=2
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
        if s["name"] == "allreduce":
            assert all(st["ratio_to_allreduce"] == 1.0 for st in s["steps"])
    assert {"predicted_grid_index", "measured_comm_grid_index", "within_one_step"} <= set(
        res["crossover"])
    assert set(res["checks"]) == {"oshard_k1_o_proj_memory_ratio", "auto_vs_best_fixed"}
    assert res["checks"]["oshard_k1_o_proj_memory_ratio"]["ok"]  # (ceil(3/2)+2)/3 >= 4/4 * ...
    mem = res["memory_per_rank"]
    assert len(mem) == 2 and mem[0]["fc2(otp=1)"]["o_proj"] == 3 * 64 * 64 * 4
    assert mem[0]["auto"] == mem[0]["fc2(otp=1)"]  # one resident W_o serves both paths
    HardwareProfile.load(str(out / "profile.json"))
    assert (out / "e2e_latency.png").stat().st_size > 0
    assert (out / "e2e_memory.png").stat().st_size > 0


def test_strategy_rows_cover_the_issue() -> None:
    from flashcomm.bench.e2e import strategy_rows

    names = [r.name for r in strategy_rows(4, 6)]
    assert names == ["allreduce", "flashcomm1", "fc2(otp=1)", "fc2(otp=2)", "fc2+oshard(k=0)",
                     "fc2+oshard(k=1)", "fc2+oshard(k=2)", "fc2+int8", "auto"]
    rows = {r.name: r for r in strategy_rows(4, 6)}
    assert rows["auto"].cfg == rows["fc2(otp=1)"].cfg  # auto reuses FlashComm2's model
    assert rows["fc2+oshard(k=1)"].cost.oshard_k == 1
    assert replace(rows["fc2+int8"].cost).comm_dtype == "int8"
