"""Mixture-of-experts models (Qwen3-MoE, Mixtral): config parsing, loading, and every strategy on
real gloo ranks (N = 2 and 4) against Hugging Face transformers on the same random checkpoints.

8 experts, top-2, 3-4 layers, kv heads (2) < N = 4; the Qwen3-MoE has a dense layer (1), D != H
and no renormalisation of the top-k weights, the Mixtral renormalises and writes head_dim null.
Two more Qwen3-MoE with 6 and 10 experts run the expert-parallel strategies at N = 4, where the
experts split unevenly (2, 2, 1, 1 and 3, 3, 2, 2 per rank, as vLLM places them).
One spawned group per N runs every (strategy, checkpoint) pair.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, prefill_logits
from safetensors.torch import load_file, save_file

from flashcomm.config import FlashCommConfig
from flashcomm.knobs import ConfigError
from flashcomm.layout import ParallelLayout
from flashcomm.model_args import CheckpointError, ModelArgs, expert_range
from flashcomm.models.engine import Engine
from flashcomm.models.moe import MoEFeedForward
from flashcomm.plan.planner import weight_bytes_per_rank
from flashcomm.plan.strategy import Strategy

NEW_TOKENS = 12
FEW = [[7] * 6]  # identical tokens route identically: only a few experts get any token
COMMON = dict(hidden_size=64, vocab_size=300, num_attention_heads=4, num_key_value_heads=2,
              initializer_range=0.2, num_experts_per_tok=2, eos_token_id=None, bos_token_id=None)
HF_MOE = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_hidden_layers=4, head_dim=24, intermediate_size=96, moe_intermediate_size=32,
        num_experts=8, mlp_only_layers=[1], norm_topk_prob=False)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        num_hidden_layers=3, intermediate_size=64, num_local_experts=8)),
}


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """name -> directory written by transformers' save_pretrained (random weights)."""
    import transformers

    root = tmp_path_factory.mktemp("moe")
    for i, (name, (cfg_cls, model_cls, extra)) in enumerate(HF_MOE.items()):
        torch.manual_seed(10 + i)
        cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra})
        getattr(transformers, model_cls)(cfg).eval().save_pretrained(root / name)
    return {name: root / name for name in HF_MOE}


UNEVEN = {"qwen3_moe_e6": dict(num_experts=6),
          "qwen3_moe_e10": dict(num_experts=10, num_experts_per_tok=3, norm_topk_prob=True)}
"""Qwen3-MoE checkpoints whose experts do not divide over N = 4 ranks."""


@pytest.fixture(scope="module")
def uneven_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """name -> directory of a Qwen3-MoE with 6 or 10 experts (random weights)."""
    import transformers

    root = tmp_path_factory.mktemp("uneven")
    for i, (name, extra) in enumerate(UNEVEN.items()):
        torch.manual_seed(20 + i)
        cfg = transformers.Qwen3MoeConfig(**{**COMMON, **HF_MOE["qwen3_moe"][2], **extra})
        transformers.Qwen3MoeForCausalLM(cfg).eval().save_pretrained(root / name)
    return {name: root / name for name in UNEVEN}


def _hf_outputs(checkpoints: dict[str, Path]) -> dict[str, dict]:
    """Per checkpoint: transformers' logits of PROMPTS ([T, V], concatenated) and greedy tokens
    of PROMPTS and FEW, each prompt generated alone."""
    from transformers import AutoModelForCausalLM

    out = {}
    for name, path in checkpoints.items():
        hf = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            logits = torch.cat([hf(torch.tensor([p])).logits[0] for p in PROMPTS])

            def greedy(prompts, hf=hf):
                return [hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS,
                                    min_new_tokens=NEW_TOKENS, do_sample=False)[0, len(p):]
                        .tolist() for p in prompts]
            out[name] = {"logits": logits, "tokens": greedy(PROMPTS), "few": greedy(FEW)}
    return out


@pytest.fixture(scope="module")
def hf_reference(moe_checkpoints, uneven_checkpoints) -> dict[str, dict]:
    """_hf_outputs of every checkpoint of this file."""
    return _hf_outputs({**moe_checkpoints, **uneven_checkpoints})


# ---- config.json -------------------------------------------------------------------------------


def test_both_transformers_generations_parse_alike(moe_checkpoints, tmp_path) -> None:
    new = json.loads((moe_checkpoints["qwen3_moe"] / "config.json").read_text())
    assert "num_local_experts" in new and "rope_parameters" in new  # what transformers 5 writes
    old = {k: v for k, v in new.items() if k not in ("num_local_experts", "rope_parameters")}
    old |= {"num_experts": 8, "rope_theta": new["rope_parameters"]["rope_theta"],
            "rope_scaling": None}  # what transformers 4 writes
    a, b = ModelArgs.from_hf_config(new), ModelArgs.from_hf_config(old)
    assert a == b
    assert (a.n_experts, a.n_experts_per_tok, a.moe_intermediate_size) == (8, 2, 32)
    assert a.moe_layers == (0, 2, 3) and not a.norm_topk_prob and a.qk_norm
    mix = json.loads((moe_checkpoints["mixtral"] / "config.json").read_text())
    assert mix["head_dim"] is None
    m = ModelArgs.from_hf_config(mix)
    assert m.head_dim == 16 and m.moe_layers == (0, 1, 2) and m.norm_topk_prob
    assert m.moe_intermediate_size == 64 and m.rope_theta == 1e6
    del mix["rope_parameters"]  # transformers' own default for Mixtral
    assert ModelArgs.from_hf_config(mix).rope_theta == 1e6
    with pytest.raises(CheckpointError, match="disagree"):
        ModelArgs.from_hf_config({**new, "num_experts": 4})
    with pytest.raises(CheckpointError, match="num_experts_per_tok=9"):
        ModelArgs.from_hf_config({**new, "num_experts_per_tok": 9})


def test_sparse_layers_follow_transformers() -> None:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    for step, dense in ((1, []), (2, []), (2, [3]), (3, [0, 2])):
        cfg = Qwen3MoeConfig(**{**COMMON, **HF_MOE["qwen3_moe"][2], "num_hidden_layers": 6,
                                "decoder_sparse_step": step, "mlp_only_layers": dense})
        hf = Qwen3MoeForCausalLM(cfg)
        want = tuple(i for i, layer in enumerate(hf.model.layers)
                     if isinstance(layer.mlp, Qwen3MoeSparseMoeBlock))
        assert ModelArgs.from_hf_config(cfg.to_dict()).moe_layers == want, (step, dense)


def test_expert_parallel_knob_and_split_errors(moe_checkpoints) -> None:
    from flashcomm.models.loader import check_strategy
    from flashcomm.models.parallel import TPPlan

    cfg = FlashCommConfig.from_env({"FLASHCOMM_EXPERT_PARALLEL": "1"})
    assert cfg.expert_parallel and "FLASHCOMM_EXPERT_PARALLEL" in FlashCommConfig.env_names()
    with pytest.raises(ConfigError, match="FLASHCOMM_EXPERT_PARALLEL"):
        FlashCommConfig.from_env({"FLASHCOMM_EXPERT_PARALLEL": "maybe"})
    args = ModelArgs.from_dir(moe_checkpoints["mixtral"])
    assert [TPPlan.build(args, 4, r, expert_parallel=True).experts for r in range(4)] == [
        (0, 2), (2, 4), (4, 6), (6, 8)]
    assert TPPlan.build(args, 4, 1).experts == (0, 8)
    assert TPPlan.build(args, 4, 1).expert_ffn == (16, 32)
    assert TPPlan.build(args, 4, 1, expert_parallel=True).expert_ffn == (0, 64)
    # uneven: floor(E/N) each, one more on the first E mod N ranks (vLLM's determine_expert_map)
    for e, want in ((6, [(0, 2), (2, 4), (4, 5), (5, 6)]), (10, [(0, 3), (3, 6), (6, 8), (8, 10)]),
                    (60, [(0, 15), (15, 30), (30, 45), (45, 60)])):
        odd = replace(args, n_experts=e)
        assert [TPPlan.build(odd, 4, r, expert_parallel=True).experts for r in range(4)] == want
    assert [expert_range(40, 6, r) for r in range(6)] == [
        (0, 7), (7, 14), (14, 21), (21, 28), (28, 34), (34, 40)]
    few = replace(args, n_experts=3)  # a rank without an expert is refused
    with pytest.raises(ConfigError, match=r"expert_parallel=True \(--expert-parallel\) at tp=4: "
                                          r"num_experts=3 is below tp.*allowed tp: 1 to 3"):
        TPPlan.build(few, 4, 0, expert_parallel=True)
    assert TPPlan.build(few, 2, 1, expert_parallel=True).experts == (2, 3)
    with pytest.raises(ConfigError, match=r"moe_intermediate_size=30.*--expert-parallel"):
        TPPlan.build(replace(args, moe_intermediate_size=30), 4, 0)
    dense = replace(args, model_type="llama", moe_layers=(), n_experts=0)
    with pytest.raises(ConfigError, match="expert_parallel=True.*'llama' has no experts"):
        check_strategy(dense, FlashCommConfig(tp=2, expert_parallel=True))


# ---- loading -----------------------------------------------------------------------------------

E5 = "model.layers.2.mlp.experts.5.down_proj.weight"  # owned by TP rank 1 under EP at N=2


def _rewrite(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _load_ep(rank: int, world: int, path: str) -> None:
    from flashcomm.groups import ParallelGroups

    cfg = FlashCommConfig(tp=world, expert_parallel=True, flashcomm2_otp=1,
                          layer_sharding=("o_proj",))
    groups = ParallelGroups.build(ParallelLayout.from_config(cfg, world), ("o_proj",))
    Engine.from_checkpoint(path, cfg, groups, progress=False)


def test_expert_tensors_are_checked_and_named(moe_checkpoints, tmp_path) -> None:
    from flashcomm.launch import RankFailure, run_local

    src = moe_checkpoints["qwen3_moe"]
    missing = _rewrite(src, tmp_path / "missing", lambda t: t.pop(E5))
    shape = _rewrite(src, tmp_path / "shape",
                     lambda t: t.__setitem__(E5, t[E5][:, :-1].contiguous()))
    truncated = tmp_path / "truncated"
    shutil.copytree(src, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:-1000])
    router = _rewrite(src, tmp_path / "router",
                      lambda t: t.pop("model.layers.3.mlp.gate.weight"))
    for path, text in ((missing, f"{E5!r} is missing"), (shape, f"{E5!r}.*shape \\[64, 31\\]"),
                       (truncated, "truncated"), (router, "layers.3.mlp.gate.weight")):
        with pytest.raises(CheckpointError, match=text):
            Engine.from_checkpoint(path, FlashCommConfig(), progress=False)
    # expert parallel: rank 0 holds experts 0-3 only, yet fails alike instead of waiting on rank 1
    with pytest.raises(RankFailure, match=rf"(?s)rank 0.*{E5}"):
        run_local(_load_ep, 2, str(missing), timeout_s=90, group_timeout_s=20)


# ---- the single-process model against transformers ----------------------------------------------


def _routing(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    """Tokens per expert of every router call (each MoE layer of each step) while generating."""
    calls: list[list[int]] = []

    def record(module, inputs, logits) -> None:
        ids = logits.topk(2, dim=-1).indices  # softmax is monotone: the same top-2
        calls.append(torch.bincount(ids.reshape(-1), minlength=logits.shape[-1]).tolist())

    handles = [b.feed_forward.gate.register_forward_hook(record) for b in engine.model.layers
               if isinstance(b.feed_forward, MoEFeedForward)]
    try:
        engine.generate(prompts, NEW_TOKENS)
    finally:
        for h in handles:
            h.remove()
    return calls


@pytest.mark.parametrize("name", list(HF_MOE))
def test_single_process_matches_transformers(moe_checkpoints, hf_reference, name) -> None:
    engine = Engine.from_checkpoint(moe_checkpoints[name], FlashCommConfig(), progress=False)
    ref = hf_reference[name]
    torch.testing.assert_close(prefill_logits(engine, PROMPTS), ref["logits"], rtol=1e-4,
                               atol=1e-4)
    assert engine.generate(PROMPTS, NEW_TOKENS).tokens == ref["tokens"]
    assert engine.generate(FEW, NEW_TOKENS).tokens == ref["few"]
    args = engine.model.args
    calls = _routing(engine, PROMPTS)
    assert len(calls) == NEW_TOKENS * len(args.moe_layers)
    assert any(0 in c for c in calls[len(args.moe_layers):])  # a decode step leaves experts idle
    few = _routing(engine, FEW)[:len(args.moe_layers)]  # FEW's prefill, every MoE layer
    assert all(sum(n > 0 for n in c) <= 4 for c in few), few  # only some experts get tokens


# ---- every strategy on N ranks -------------------------------------------------------------------


def strategies(n: int) -> dict[str, FlashCommConfig]:
    """label -> knobs; TP experts and expert parallel, with and without FlashComm2 / FlashComm1."""
    fc2 = Strategy("flashcomm2", 1)
    rows = [Strategy(), fc2, replace(fc2, flashcomm1=True), replace(fc2, oshard_k=1)]
    rows += [replace(s, expert_parallel=True) for s in (
        Strategy(), Strategy(flashcomm1=True), fc2, replace(fc2, flashcomm1=True, oshard_k=1))]
    return {s.label: s.to_config(n) for s in rows}


def _report(engine: Engine) -> dict:
    res = engine.generate(PROMPTS, NEW_TOKENS)
    return {"logits": prefill_logits(engine, PROMPTS), "tokens": res.tokens,
            "few": engine.generate(FEW, NEW_TOKENS).tokens, "comm": res.comm_bytes_by_op,
            "weight_bytes": res.weight_bytes, "read": engine.load_report.names}


def _rank(rank: int, world: int, paths: dict[str, str], uneven: dict[str, str]) -> dict:
    """Every strategy on `paths`, the expert-parallel ones on `uneven` too (one set of groups
    per strategy): {(strategy, checkpoint): _report}."""
    from flashcomm.groups import ParallelGroups

    out = {}
    for name, cfg in strategies(world).items():
        groups = ParallelGroups.from_config(cfg, world)
        for ck, path in {**paths, **(uneven if cfg.expert_parallel else {})}.items():
            out[name, ck] = _report(Engine.from_checkpoint(path, cfg, groups, progress=False))
    return out


@pytest.mark.parametrize("n", [2, 4])
def test_every_strategy_matches_transformers(moe_checkpoints, uneven_checkpoints, hf_reference,
                                             n) -> None:
    from flashcomm.launch import run_local

    # 6 and 10 experts divide evenly over 2 ranks: the uneven checkpoints run at N = 4 only
    uneven = {ck: str(p) for ck, p in uneven_checkpoints.items()} if n == 4 else {}
    per_rank = run_local(_rank, n, {ck: str(p) for ck, p in moe_checkpoints.items()}, uneven,
                         timeout_s=400, group_timeout_s=120)
    for name, cfg in strategies(n).items():
        for ck in [*HF_MOE, *(uneven if cfg.expert_parallel else ())]:
            ref, args = hf_reference[ck], ModelArgs.from_dir(
                (moe_checkpoints | uneven_checkpoints)[ck])
            planned = weight_bytes_per_rank(args, n, Strategy.from_config(cfg), 4)
            for rank, out in enumerate(per_rank):
                got, where = out[name, ck], f"{name} {ck} rank {rank} of {n}"
                torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-4, atol=1e-4,
                                           msg=lambda m, w=where: f"{w}: {m}")
                assert got["tokens"] == ref["tokens"], where
                assert got["few"] == ref["few"], where
                ep_bytes = sum(v for op, v in got["comm"].items() if op.startswith("ep_"))
                assert (ep_bytes > 0) == cfg.expert_parallel, (where, got["comm"])
                experts = {int(s.split(".")[5]) for s in got["read"] if ".experts." in s}
                want = range(*expert_range(args.n_experts, n, rank)) if cfg.expert_parallel \
                    else range(args.n_experts)
                assert experts == set(want), where
            if "o_proj" in cfg.layer_sharding:
                continue
            held = [out[name, ck]["weight_bytes"] for out in per_rank]
            # the planner counts the rank holding the most experts: rank 0 under EP
            assert held[0] == max(held) == planned[1], (name, ck, held, planned)
            if ck in HF_MOE:  # E/N whole experts weigh what 1/N of every expert does
                plain = [out["fc2" if cfg.flashcomm2 else "allreduce", ck]["weight_bytes"]
                         for out in per_rank]
                assert held == plain, (name, ck)
            elif n == 4:  # one expert more on the first E mod N ranks
                one = 3 * args.dim * args.moe_intermediate_size * len(args.moe_layers) * 4
                extra = args.n_experts % n
                assert held == [planned[1]] * extra + [planned[1] - one] * (n - extra), (name, ck)


def test_mlp_weight_counts_match_the_loaded_model(moe_checkpoints) -> None:
    for ck, path in moe_checkpoints.items():
        engine = Engine.from_checkpoint(path, FlashCommConfig(), progress=False)
        args, blocks = engine.model.args, engine.model.layers
        held = sum(p.numel() for b in blocks for p in b.feed_forward.parameters())
        assert args.mlp_weights(1) == held, ck
        assert args.mlp_weights(2) < held  # the router is replicated, the experts split
        per_token = [b.feed_forward.gate.weight.numel() + sum(
            e.w1.weight.numel() * 3 for e in b.feed_forward.experts[:args.n_experts_per_tok])
            if isinstance(b.feed_forward, MoEFeedForward) else
            sum(p.numel() for p in b.feed_forward.parameters()) for b in blocks]
        assert args.mlp_active_weights(1) == sum(per_token) / len(blocks), ck


def test_demo_moe_rows_are_identical(tmp_path) -> None:
    env = {**os.environ, "FLASHCOMM_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "flashcomm.cli", "demo", "--model", "moe",
                          "--nproc", "2", "--max-new-tokens", "3"],
                         capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr
    args = ModelArgs.from_dir(tmp_path / "demo-qwen3-moe-v1")
    assert args.is_moe and args.moe_layers == (1, 2, 3)  # layer 0 is dense
    rows = {line.split()[0]: line for line in out.stdout.splitlines()
            if line.startswith(("allreduce", "fc2"))}
    assert {"allreduce", "fc2", "allreduce+ep", "fc2+ep"} <= set(rows), out.stdout
    assert all("identical" in r for r in rows.values()), out.stdout
