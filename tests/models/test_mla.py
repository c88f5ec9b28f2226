"""DeepSeek-V3 (MLA attention, DeepSeek MoE routing): config parsing, the router, the loaded
weights and every o_proj strategy on real gloo ranks (N = 2 and 4) against Hugging Face
transformers on the same random checkpoints; the planner on the published DeepSeek-V3 shape.

Two random checkpoints written by transformers' save_pretrained, both with 4 layers (1 dense, 3
MoE), 8 routed experts in 2 groups (top-2 within 1 group), 1 shared expert, a random noaux_tc
bias and yarn RoPE: "q_lora" has q_lora_rank set, interleaved rope, attention_factor != 1 and an
mscale_all_dim softmax scale, D = 4*24 = 96 > H = 64; "no_q_lora" has q_lora_rank null, rope not
interleaved, attention biases, D = 4*8 = 32 < H. One spawned group per N runs every (strategy,
checkpoint) pair.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, prefill_logits, run_per_strategy

from flashcomm.config import FlashCommConfig
from flashcomm.model_args import CheckpointError, ModelArgs
from flashcomm.models.engine import Engine
from flashcomm.models.layers import rope_inv_freq
from flashcomm.plan.costmodel import Shape, counted_bytes, step_calls
from flashcomm.plan.planner import make_plan, weight_bytes_per_rank
from flashcomm.plan.strategy import Strategy

NEW_TOKENS = 10
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0}
COMMON = dict(hidden_size=64, vocab_size=300, num_attention_heads=4, num_key_value_heads=4,
              intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
              num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
              first_k_dense_replace=1, num_hidden_layers=4, kv_lora_rank=32, qk_nope_head_dim=16,
              qk_rope_head_dim=8, routed_scaling_factor=2.5, max_position_embeddings=64,
              initializer_range=0.2, eos_token_id=None, bos_token_id=None,
              topk_method="noaux_tc", scoring_func="sigmoid")
HF_MLA = {
    "q_lora": dict(q_lora_rank=24, v_head_dim=24, rope_interleave=True,
                   rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 0.5}),
    "no_q_lora": dict(q_lora_rank=None, v_head_dim=8, rope_interleave=False, attention_bias=True,
                      rope_parameters=dict(YARN)),
}


@pytest.fixture(scope="module")
def mla_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """name -> directory written by transformers' save_pretrained (random weights, a random
    e_score_correction_bias so the bias changes which experts are picked)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    root = tmp_path_factory.mktemp("mla")
    for i, (name, extra) in enumerate(HF_MLA.items()):
        torch.manual_seed(20 + i)
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**{**COMMON, **extra})).eval()
        with torch.no_grad():
            for layer in model.model.layers[1:]:
                layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.3)
        model.save_pretrained(root / name)
    return {name: root / name for name in HF_MLA}


@pytest.fixture(scope="module")
def hf_reference(mla_checkpoints) -> dict[str, dict]:
    """Per checkpoint: transformers' logits of PROMPTS ([T, V], concatenated) and greedy tokens
    of each prompt generated alone."""
    from transformers import AutoModelForCausalLM

    out = {}
    for name, path in mla_checkpoints.items():
        hf = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            logits = torch.cat([hf(torch.tensor([p])).logits[0] for p in PROMPTS])
            tokens = [hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS,
                                  min_new_tokens=NEW_TOKENS, do_sample=False)[0, len(p):].tolist()
                      for p in PROMPTS]
        out[name] = {"logits": logits, "tokens": tokens}
    return out


# ---- config.json --------------------------------------------------------------------------------


def test_mla_dims_come_from_their_own_keys(mla_checkpoints) -> None:
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = json.loads((mla_checkpoints["q_lora"] / "config.json").read_text())
    assert cfg["head_dim"] == 8 and cfg["qk_head_dim"] == 24  # transformers 5: rope, nope + rope
    a = ModelArgs.from_hf_config(cfg)
    assert (a.head_dim, a.q_dim, a.n_kv_heads, a.kv_lora_rank, a.q_lora_rank) == (24, 96, 4, 32, 24)
    assert (a.qk_nope_head_dim, a.qk_rope_head_dim, a.rope_interleave) == (16, 8, True)
    assert a.moe_layers == (1, 2, 3) and (a.n_experts, a.n_experts_per_tok) == (8, 2)
    assert (a.n_group, a.topk_group, a.n_shared_experts, a.routed_scaling_factor) == (2, 1, 1, 2.5)
    for name in HF_MLA:  # yarn: inverse frequencies and cos/sin factor exactly transformers'
        c = json.loads((mla_checkpoints[name] / "config.json").read_text())
        inv, factor = ROPE_INIT_FUNCTIONS["yarn"](DeepseekV3Config(**c))
        args = ModelArgs.from_hf_config(c)
        assert torch.equal(rope_inv_freq(args), inv), name
        assert args.rope_scaling["attention_factor"] == pytest.approx(factor), name
    assert a.rope_scaling["attention_factor"] != 1.0  # mscale / mscale_all_dim
    # transformers 4 spelling: rope_theta + rope_scaling {"type": "yarn"}, no rope_parameters
    old = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "qk_head_dim")}
    params = {k: v for k, v in cfg["rope_parameters"].items() if k not in ("rope_type",
                                                                          "rope_theta")}
    old |= {"rope_theta": 10000.0, "rope_scaling": {**params, "type": "yarn"}}
    assert ModelArgs.from_hf_config(old) == a
    assert ModelArgs.from_hf_config({**cfg, "q_lora_rank": None}).q_lora_rank is None
    for bad, text in ((dict(scoring_func="softmax"), "scoring_func='softmax'.*'sigmoid'"),
                      (dict(topk_method="greedy"), "topk_method"),
                      (dict(n_group=3), "n_group=3"), (dict(topk_group=3), "topk_group=3"),
                      (dict(v_head_dim=None), "'v_head_dim' is missing"),
                      (dict(rope_parameters={**YARN, "rope_type": "dynamic"}),
                       "'dynamic'.*default, llama3, yarn")):
        with pytest.raises(CheckpointError, match=text):
            ModelArgs.from_hf_config({**cfg, **bad})
    llama = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
             "num_attention_heads": 2, "intermediate_size": 8, "rope_parameters": YARN}
    with pytest.raises(CheckpointError, match="'yarn'.*allowed: default, llama3$"):
        ModelArgs.from_hf_config(llama)  # our dense attention does not apply yarn's factor


def test_router_matches_transformers(mla_checkpoints) -> None:
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    from flashcomm.models.deepseek_moe import DeepSeekMoE
    from flashcomm.models.parallel import TPPlan

    cfg = json.loads((mla_checkpoints["q_lora"] / "config.json").read_text())
    args = ModelArgs.from_hf_config(cfg)
    torch.manual_seed(0)
    hf = DeepseekV3TopkRouter(DeepseekV3Config(**cfg))
    with torch.no_grad():
        hf.weight.normal_(0.0, 0.3)
        hf.e_score_correction_bias.normal_(0.0, 0.3)
    ours = DeepSeekMoE(args, TPPlan.build(args, 1, 0))
    with torch.no_grad():
        ours.gate.weight.copy_(hf.weight)
        ours.e_score_correction_bias.copy_(hf.e_score_correction_bias)
    x = torch.randn(256, args.dim)
    _, hf_w, hf_ids = hf(x)
    w, ids = ours.route(x)
    torch.testing.assert_close(w, hf_w, rtol=0, atol=0)
    assert torch.equal(ids, hf_ids)
    assert (ids // 4 == ids[:, :1] // 4).all()  # topk_group=1: both experts in one group
    # the groups and the bias matter: plain top-2 of the scores picks other experts
    plain = torch.sigmoid(x @ hf.weight.T).topk(2, dim=-1).indices
    assert (plain.sort(-1).values != ids.sort(-1).values).any(-1).float().mean() > 0.2
    assert w.sum(-1).allclose(torch.full((256,), 2.5))  # renormalised, times the scaling factor


# ---- the single-process model ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(HF_MLA))
def test_single_process_matches_transformers(mla_checkpoints, hf_reference, name) -> None:
    engine = Engine.from_checkpoint(mla_checkpoints[name], FlashCommConfig(), progress=False)
    ref, args = hf_reference[name], engine.model.args
    torch.testing.assert_close(prefill_logits(engine, PROMPTS), ref["logits"], rtol=1e-4,
                               atol=1e-4)
    res = engine.generate(PROMPTS, NEW_TOKENS)
    assert res.tokens == ref["tokens"]
    # the cache holds the latent + the rope key per token and layer (fp32)
    s = max(len(p) for p in PROMPTS) + NEW_TOKENS
    per_token = args.kv_lora_rank + args.qk_rope_head_dim
    assert res.kv_cache_bytes == args.n_layers * len(PROMPTS) * s * per_token * 4
    # the planner counts what is loaded (MLA projections, router + bias, shared expert)
    held = sum(p.numel() for p in engine.model.parameters())
    assert weight_bytes_per_rank(args, 1, Strategy(), 4)[1] == held * 4


# ---- every strategy on N ranks -----------------------------------------------------------------


def strategies(n: int) -> dict[str, FlashCommConfig]:
    """label -> knobs: the o_proj strategies, plus the gather source with expert parallelism."""
    fc2 = Strategy("flashcomm2", 1)
    rows = [Strategy(), fc2, replace(fc2, flashcomm1=True), replace(fc2, oshard_k=1),
            replace(fc2, flashcomm1=True, oshard_k=1, shard_source="gather", expert_parallel=True)]
    return {s.label: s.to_config(n) for s in rows}


def _report(engine: Engine) -> dict:
    res = engine.generate(PROMPTS, NEW_TOKENS)
    return {"logits": prefill_logits(engine, PROMPTS), "tokens": res.tokens,
            "comm": res.comm_bytes_by_op, "weight_bytes": res.weight_bytes,
            "o_proj_bytes": res.o_proj_bytes, "kv": res.kv_cache_bytes}


@pytest.mark.parametrize("n", [2, 4])
def test_every_strategy_matches_transformers(mla_checkpoints, hf_reference, n) -> None:
    per_rank = run_per_strategy(strategies, _report, mla_checkpoints, n, timeout_s=500)
    for name, cfg in strategies(n).items():
        s = Strategy.from_config(cfg)
        for ck in HF_MLA:
            ref, args = hf_reference[ck], ModelArgs.from_dir(mla_checkpoints[ck])
            shape = Shape(hidden=args.dim, q_dim=args.q_dim, tp=n, elt_bytes=4,
                          layers=args.n_layers)
            # FlashComm2's exchange moves [T, D/N] (D = 96 or 32, H = 64): prefill, then the
            # decode steps of one token per prompt, as the cost model counts it
            steps = [sum(map(len, PROMPTS))] + [len(PROMPTS)] * (NEW_TOKENS - 1)
            a2a = sum(counted_bytes(step_calls(s, shape, t)).get("all_to_all", 0) for t in steps)
            for rank, out in enumerate(per_rank):
                got, where = out[name, ck], f"{name} {ck} rank {rank} of {n}"
                torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-4, atol=1e-4,
                                           msg=lambda m, w=where: f"{w}: {m}")
                assert got["tokens"] == ref["tokens"], where
                assert got["comm"].get("all_to_all", 0) == a2a, (where, got["comm"])
                assert got["kv"] == out["allreduce", ck]["kv"], where  # latent: same on all N
                if not cfg.layer_sharding:  # EP: E/N whole experts weigh 1/N of each
                    planned = weight_bytes_per_rank(args, n, s, 4)
                    assert (got["o_proj_bytes"], got["weight_bytes"]) == planned, where


# ---- the planner on DeepSeek-V3 ------------------------------------------------------------------

DEEPSEEK_V3 = {  # the published config.json's shape (no weights needed to plan)
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
    "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc",
    "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1,
    "first_k_dense_replace": 3, "norm_topk_prob": True, "scoring_func": "sigmoid",
    "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
    "rope_theta": 10000, "tie_word_embeddings": False, "attention_bias": False,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                     "type": "yarn"},
}


def test_plan_deepseek_v3_o_proj_memory(tmp_path) -> None:
    import subprocess
    import sys

    from flashcomm.plan.costmodel import HardwareProfile

    (tmp_path / "config.json").write_text(json.dumps(DEEPSEEK_V3))
    m = ModelArgs.from_dir(tmp_path)
    assert (m.q_dim, m.dim, m.n_layers, len(m.moe_layers)) == (16384, 7168, 61, 58)
    assert weight_bytes_per_rank(m, 1, Strategy(), 1)[1] / 1e9 == pytest.approx(671, rel=2e-3)
    plan = make_plan(m, 8, HardwareProfile.load("h100-nvlink"), elt=2, weight_elt=1)
    rows = {r["strategy"]: r for r in plan["strategies"]}
    gib = 2 ** 30
    assert rows["fc2"]["o_proj_bytes"] / gib == pytest.approx(6.7, rel=0.02)  # published, int8
    assert rows["fc2(otp=2)"]["o_proj_bytes"] * 2 == rows["fc2"]["o_proj_bytes"]
    assert rows["allreduce"]["o_proj_bytes"] * 8 == rows["fc2"]["o_proj_bytes"]
    bf16 = make_plan(m, 8, HardwareProfile.load("h100-nvlink"), elt=2)
    assert {r["strategy"]: r for r in bf16["strategies"]}["fc2"]["o_proj_bytes"] == \
        2 * rows["fc2"]["o_proj_bytes"]  # 13.4 GB in bf16
    # D > H: FlashComm2's exchange [T, D/N] is 16384/7168 of a [T, H/N] chunk
    shape = Shape(hidden=7168, q_dim=16384, tp=8)
    a2a = counted_bytes(step_calls(Strategy("flashcomm2", 1), shape, 4096))["all_to_all"]
    assert a2a == 7 * 4096 // 8 * 16384 // 8 * 2
    out = subprocess.run([sys.executable, "-m", "flashcomm.cli", "plan", "--model", str(tmp_path),
                          "--tp", "8", "--weight-bytes", "1"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    table = {line.split()[0]: line.split() for line in out.stdout.splitlines() if line.strip()}
    assert "o_proj GiB" in out.stdout and "weights 1" in out.stdout
    assert table["fc2"][1] == "6.67" and table["fc2(otp=2)"][1] == "3.34"
