"""The collective fit and the auto policy (flashcomm.plan.fit / plan.auto) on real gloo ranks.

One spawned group (N = 2) fits a profile and resolves flashcomm2_min_tokens='auto' from flat
profiles with known crossovers and from the fit, then generates with each resolved threshold.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from flashcomm.config import FlashCommConfig
from flashcomm.knobs import ConfigError
from flashcomm.model_args import ModelArgs
from flashcomm.models.random_checkpoint import small_llama_config, write_checkpoint
from flashcomm.plan.auto import auto_min_tokens, load_profile
from flashcomm.plan.costmodel import OPS, HardwareProfile, OpCost

PROMPTS = [[5, 9, 200, 17, 3, 3, 42], [100, 7, 250, 1]]  # prefill T = 11, decode T = 2
NEW_TOKENS = 6
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)
AUTO = FlashCommConfig(tp=2, flashcomm2_otp=1, flashcomm2_min_tokens="auto")


def flat_profile(alpha: float, bandwidth: float) -> HardwareProfile:
    """Every op costs alpha + bytes / bandwidth."""
    return HardwareProfile("flat", {op: OpCost(alpha, bandwidth) for op in OPS}, 1e9)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer random Llama (H = D = 64) written by flashcomm.models.random_checkpoint."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), small_llama_config(**TINY), seed=3)


def test_load_profile_names_the_knob(tmp_path: Path) -> None:
    assert load_profile("pcie-gen4").name == "pcie-gen4"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for value in ("nope", str(bad)):
        with pytest.raises(ConfigError, match=rf"profile='{value}': .*allowed: 'fit'"):
            load_profile(value)


def _fit_and_auto_worker(rank: int, world: int, ckpt: str, profiles: dict[str, str]) -> dict:
    from flashcomm.groups import ParallelGroups
    from flashcomm.models.engine import Engine
    from flashcomm.plan.auto import resolve_auto
    from flashcomm.plan.fit import fit_profile

    groups = ParallelGroups.from_config(AUTO, world)
    fitted = fit_profile(groups, rows=(1, 64, 512), width=64, rounds=3).to_dict()
    out = {"fitted": fitted, "auto": {}}
    for name, prof in {**profiles, "fit": "fit"}.items():
        cfg, profile = resolve_auto(replace(AUTO, profile=prof), groups, 64, 64, 4)
        res = Engine.from_checkpoint(ckpt, cfg, groups, progress=False).generate(PROMPTS,
                                                                                 NEW_TOKENS)
        out["auto"][name] = {"threshold": cfg.flashcomm2_min_tokens, "profile": profile.to_dict(),
                             "tokens": res.tokens, "bytes": res.comm_bytes_by_op,
                             "o_proj": res.o_proj_bytes}
    return out


def test_fit_and_auto_on_gloo(tiny: Path, tmp_path: Path) -> None:
    from flashcomm import cli
    from flashcomm.launch import run_local
    from flashcomm.models.engine import Engine
    from flashcomm.plan.fit import write_profile

    args = ModelArgs.from_dir(tiny)
    # flat profile, N = 2, H = D = 64, fp32: all-reduce wins below ~alpha*B/64 tokens
    profiles = {"between": flat_profile(5e-4, 6.4e5), "always": flat_profile(0.0, 1e9),
                "never": flat_profile(1.0, 1e9)}
    thresholds = {k: auto_min_tokens(64, 64, AUTO, p, 4) for k, p in profiles.items()}
    assert 2 < thresholds["between"] <= 11, thresholds  # decode below, prefill above
    assert thresholds["always"] == 1 and thresholds["never"] is None
    paths = {k: str(write_profile(p, tmp_path / f"{k}.json")) for k, p in profiles.items()}

    ref = Engine.from_checkpoint(tiny, FlashCommConfig(), None, progress=False)
    reference = ref.generate(PROMPTS, NEW_TOKENS).tokens
    res = run_local(_fit_and_auto_worker, 2, str(tiny), paths, timeout_s=240)

    # the fit: every op of every rank identical, positive alpha and bandwidth, loadable
    fitted = res[0]["fitted"]
    assert res[1]["fitted"]["per_tp"] == fitted["per_tp"]
    assert res[1]["fitted"]["overlap"] == fitted["overlap"] and 0.0 <= fitted["overlap"] <= 1.0
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
        fit_thr = auto_min_tokens(64, 64, AUTO, HardwareProfile.from_dict(got["fit"]["profile"]),
                                  4)
        assert got["fit"]["threshold"] == fit_thr
    assert res[0]["auto"]["fit"]["threshold"] == res[1]["auto"]["fit"]["threshold"]
