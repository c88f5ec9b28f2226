"""Small random Hugging Face checkpoints (saved by transformers itself) shared by engine tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Awkward on purpose: layer counts 3 and 5 (not divisible by shard groups of 2 or 4),
# 2 kv heads (fewer than N = 4), D != H for qwen3, biases, tied embeddings, llama3 RoPE.
HF_MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        attention_bias=True, mlp_bias=True, max_position_embeddings=64,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=2,
        tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=24)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, sliding_window=5)),
}
COMMON = dict(hidden_size=64, intermediate_size=96, vocab_size=300, initializer_range=0.2,
              eos_token_id=None, bos_token_id=None)
PROMPTS = [[5], [17, 230, 4], [100, 200, 250, 3, 3, 42, 7]]  # T = 11; lengths 1, 3, 7


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> directory written by transformers' save_pretrained (random weights)."""
    import transformers

    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, (name, (cfg_cls, model_cls, extra)) in enumerate(HF_MODELS.items()):
        torch.manual_seed(i)
        cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra})
        model = getattr(transformers, model_cls)(cfg).eval()
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def prefill_logits(engine, prompts: list[list[int]]) -> torch.Tensor:
    """[T, V] logits of every prompt token of `engine`'s model in one varlen step."""
    m = engine.model
    step = m.step([0] * len(prompts), [len(p) for p in prompts], last_only=False)
    cache = m.allocate_cache(len(prompts), 16)
    with torch.no_grad():
        return m(torch.tensor([t for p in prompts for t in p]), step, cache)


def per_strategy(cfgs: dict, ckpts: dict[str, str], world: int,
                 report: Callable[..., dict]) -> dict:
    """On one spawned rank: every checkpoint loaded under every strategy (one set of groups per
    strategy); {(strategy name, checkpoint name): report(engine)}."""
    from flashcomm.groups import ParallelGroups
    from flashcomm.models.engine import Engine

    out = {}
    for name, cfg in cfgs.items():
        groups = ParallelGroups.from_config(cfg, world)
        for ck, path in ckpts.items():
            out[name, ck] = report(Engine.from_checkpoint(path, cfg, groups, progress=False))
    return out


def _per_strategy_rank(rank: int, world: int, strategies: Callable[[int], dict],
                       ckpts: dict[str, str], report: Callable[..., dict]) -> dict:
    return per_strategy(strategies(world), ckpts, world, report)


def run_per_strategy(strategies: Callable[[int], dict], report: Callable[..., dict],
                     ckpts: dict[str, Path], n: int, timeout_s: float) -> list[dict]:
    """Spawn n gloo ranks; rank r's per_strategy(strategies(n), ckpts, n, report) at index r."""
    from flashcomm.launch import run_local

    paths = {ck: str(p) for ck, p in ckpts.items()}
    return run_local(_per_strategy_rank, n, strategies, paths, report, timeout_s=timeout_s,
                     group_timeout_s=120)
