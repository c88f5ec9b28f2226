"""The single-process model against Hugging Face transformers on the same random checkpoints."""

from __future__ import annotations

import pytest
import torch
from conftest import HF_MODELS, PROMPTS, prefill_logits

from flashcomm.config import FlashCommConfig
from flashcomm.knobs import ConfigError
from flashcomm.model_args import CheckpointError, ModelArgs
from flashcomm.models.engine import Engine
from flashcomm.models.layers import rope_inv_freq
from flashcomm.models.parallel import TPPlan
from flashcomm.models.step import Step


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_logits_and_greedy_tokens_match_transformers(hf_checkpoints, name: str) -> None:
    from transformers import AutoModelForCausalLM

    path = hf_checkpoints[name]
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    engine = Engine.from_checkpoint(path, FlashCommConfig(), progress=False)
    ours = prefill_logits(engine, PROMPTS)  # one varlen batch of three prompts
    out = engine.generate(PROMPTS, 32)
    off = 0
    for prompt, tokens in zip(PROMPTS, out.tokens, strict=True):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0]
            ref_tokens = hf.generate(torch.tensor([prompt]), max_new_tokens=32,
                                     min_new_tokens=32, do_sample=False)[0, len(prompt):]
        torch.testing.assert_close(ours[off:off + len(prompt)], ref, rtol=1e-4, atol=1e-4)
        off += len(prompt)
        assert tokens == ref_tokens.tolist()


def test_sliding_window_and_llama3_rope_are_exercised(hf_checkpoints) -> None:
    mistral = ModelArgs.from_dir(hf_checkpoints["mistral"])
    assert mistral.sliding_windows == (5, 5) and max(map(len, PROMPTS)) + 32 > 5
    llama = ModelArgs.from_dir(hf_checkpoints["llama"])
    assert llama.rope_scaling is not None and llama.o_bias and llama.mlp_bias
    plain = ModelArgs(**{**llama.__dict__, "rope_scaling": None})
    assert not torch.equal(rope_inv_freq(llama), rope_inv_freq(plain))
    assert ModelArgs.from_dir(hf_checkpoints["qwen2"]).tie_word_embeddings
    assert ModelArgs.from_dir(hf_checkpoints["qwen3"]).q_dim == 4 * 24 != 64


def test_legacy_rope_fields_parse() -> None:
    cfg = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
           "num_attention_heads": 2, "intermediate_size": 16, "rope_theta": 500000.0,
           "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    args = ModelArgs.from_hf_config(cfg)
    assert args.rope_theta == 500000.0 and args.rope_scaling["factor"] == 8.0
    assert args.n_kv_heads == 2 and args.head_dim == 4


@pytest.mark.parametrize(
    "patch, match",
    [
        ({"model_type": "gpt2"}, "model_type='gpt2'"),
        ({"model_type": None}, "model_type=None"),
        ({"hidden_size": None}, "'hidden_size'"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "'yarn'"),
        ({"num_key_value_heads": 3}, "num_key_value_heads=3"),
    ],
)
def test_bad_config_fields_are_named(patch: dict, match: str) -> None:
    cfg = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
           "num_attention_heads": 2, "intermediate_size": 16, **patch}
    with pytest.raises(CheckpointError, match=match):
        ModelArgs.from_hf_config(cfg)


def test_tp_plan_replicates_kv_heads_for_the_q_heads_each_rank_has() -> None:
    args = ModelArgs("llama", 10, 64, 2, n_heads=8, n_kv_heads=2, head_dim=8,
                     intermediate_size=32)
    plans = [TPPlan.build(args, 4, r) for r in range(4)]
    assert [p.q_heads for p in plans] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [p.kv_heads for p in plans] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert all(p.kv_index == (0, 0) for p in plans)
    wide = TPPlan.build(args, 2, 1)  # 4 q heads -> 2 groups -> kv head 1 only
    assert wide.kv_heads == (1, 2) and wide.kv_index == (0, 0, 0, 0)
    # FlashComm2 otp=2 at N=4: odp groups {0,1}, {2,3} hold W_o columns [0, 32) and [32, 64)
    assert [TPPlan.build(args, 4, r, otp=2).o_cols for r in range(4)] == [
        (0, 32), (0, 32), (32, 64), (32, 64)]
    assert TPPlan.build(args, 4, 3, otp=1).o_cols == (0, 64)
    assert TPPlan.build(args, 4, 3).o_cols == (48, 64)
    with pytest.raises(ConfigError, match=r"tp=3 \(--nproc\): .* tp in \[1, 2, 4, 8\]"):
        TPPlan.build(args, 3, 0)
    odd = ModelArgs(**{**args.__dict__, "n_heads": 12, "n_kv_heads": 4, "intermediate_size": 36})
    with pytest.raises(ConfigError, match=r"tp=6 .* tp in \[1, 2, 4, 12\] .*num_key_value_heads=4"):
        TPPlan.build(odd, 6, 0)


def test_varlen_step_metadata() -> None:
    step = Step.build([4, 0], [1, 3], torch.device("cpu"))
    assert step.num_tokens == 4 and step.kv_len == 5
    assert step.seq.tolist() == [0, 1, 1, 1] and step.pos.tolist() == [4, 0, 1, 2]
    assert step.gather.tolist() == [[0, 0, 0], [1, 2, 3]]
    assert step.logit_rows.tolist() == [0, 3]
    mask = step.mask(None)
    assert mask[0, 0, 0].tolist() == [True] * 5
    assert mask[1, 0, 1].tolist() == [True, True, False, False, False]
    assert step.mask(2)[1, 0, 2].tolist() == [False, True, True, False, False]


def test_model_step_builds_rope_and_masks_once(hf_checkpoints) -> None:
    model = Engine.from_checkpoint(hf_checkpoints["mistral"], FlashCommConfig(),
                                   progress=False).model
    step = model.step([4, 0], [1, 3])
    inv = rope_inv_freq(model.args)
    angles = step.pos[:, None].float() * inv[None, :]  # [T, hd/2]
    torch.testing.assert_close(step.cos, torch.cat((angles, angles), -1).cos())
    assert step.cos.shape == step.sin.shape == (4, model.args.head_dim)
    assert set(step.masks) == {5}  # Mistral: one window on every layer
    assert step.mask(5) is step.masks[5]  # every layer reads the one built with the step
    assert torch.equal(step.masks[5], Step.build([4, 0], [1, 3], torch.device("cpu")).mask(5))
    with pytest.raises(ValueError, match="Transformer.step"):
        model(torch.tensor([1, 2, 3, 4]), Step.build([4, 0], [1, 3], torch.device("cpu")),
              model.allocate_cache(2, 8))


def test_tp_context_is_frozen_and_takes_a_resolved_threshold() -> None:
    from dataclasses import FrozenInstanceError

    from flashcomm.knobs import ConfigError
    from flashcomm.models.parallel import TPContext

    ctx = TPContext(FlashCommConfig(tp=2, flashcomm2_otp=1, flashcomm2_min_tokens=8))
    with pytest.raises(FrozenInstanceError):
        ctx.counter = None
    assert [ctx.cfg.flashcomm2_step(t) for t in (7, 8)] == [False, True]
    never = TPContext(FlashCommConfig(tp=2, flashcomm2_otp=1, flashcomm2_min_tokens=None))
    assert not never.cfg.flashcomm2_step(10**9)
    with pytest.raises(ConfigError, match="flashcomm2_min_tokens='auto': resolve it"):
        TPContext(FlashCommConfig(tp=2, flashcomm2_otp=1, flashcomm2_min_tokens="auto"))
