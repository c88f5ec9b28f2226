"""Write small random-weight Llama-family checkpoints in Hugging Face layout (no downloads).

Used by `flashcomm demo`, `plan --model demo`, `bench e2e --model demo` (the cached demo
checkpoint, `demo_checkpoint`) and the tests: config.json + model.safetensors + a byte-level
tokenizer.json built with `tokenizers`. Weights are scaled so logits are well separated
(greedy decoding is then stable under fp32 reduction-order noise).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from flashcomm.model_args import ModelArgs
from flashcomm.models.loader import tensor_specs
from flashcomm.models.parallel import TPPlan

DEMO_NAME = "demo-llama-v1"
"""Directory name of the demo checkpoint in the cache (bump the version when its config changes)."""
MOE_DEMO_NAME = "demo-qwen3-moe-v1"
"""Directory name of the MoE demo checkpoint in the cache."""
BYTE_VOCAB = 256
SPECIAL_TOKENS = ("<s>", "</s>")


def small_llama_config(**overrides: Any) -> dict[str, Any]:
    """A Hugging Face LlamaConfig dict for a small model; `overrides` replace fields."""
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": BYTE_VOCAB + len(SPECIAL_TOKENS),
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": BYTE_VOCAB,
        "eos_token_id": BYTE_VOCAB + 1,
        "torch_dtype": "float32",
    }
    cfg.update(overrides)
    return cfg


def byte_tokenizer() -> Tokenizer:
    """A byte-level BPE tokenizer with no merges: ids 0..255 are bytes, then <s>, </s>."""
    # ByteLevel maps each byte to a printable unicode char; the token id is the byte value
    mapping = _byte_to_unicode()
    byte_chars = [mapping[b] for b in range(256)]
    assert set(byte_chars) == set(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(byte_chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def _byte_to_unicode() -> dict[int, str]:
    # GPT-2's printable mapping of the 256 byte values (what ByteLevel uses)
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def random_state_dict(args: ModelArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    """Hugging Face-named float32 tensors with fan-in scaled random values."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for spec in tensor_specs(args, TPPlan.build(args, 1, 0)):
        shape = spec.shape
        if spec.name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) == 1:  # biases
            t = 0.1 * torch.randn(shape, generator=gen)
        elif spec.name == "model.embed_tokens.weight":
            t = torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) / shape[1] ** 0.5
        out[spec.name] = t.contiguous()
    return out


def write_checkpoint(path: str | Path, config: dict[str, Any], seed: int = 0,
                     tokenizer: bool = True) -> Path:
    """Write config.json, model.safetensors (random weights) and tokenizer.json into `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    args = ModelArgs.from_hf_config(config)
    save_file(random_state_dict(args, seed), str(path / "model.safetensors"),
              metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer:
        byte_tokenizer().save(str(path / "tokenizer.json"))
    return path


def cache_root() -> Path:
    """Where cached checkpoints live: $FLASHCOMM_CACHE or ~/.cache/flashcomm."""
    return Path(os.environ.get("FLASHCOMM_CACHE") or Path.home() / ".cache" / "flashcomm")


def cached_checkpoint(name: str, config: dict[str, Any], seed: int = 0) -> Path:
    """The random checkpoint `name` in the cache, written on first use (atomic rename, so
    concurrent first uses are safe)."""
    path = cache_root() / name
    if (path / "config.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
    write_checkpoint(tmp, config, seed=seed)
    try:
        tmp.rename(path)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def demo_checkpoint() -> Path:
    """The demo's small random Llama with a byte-level tokenizer (written on first use)."""
    return cached_checkpoint(DEMO_NAME, small_llama_config())


def small_qwen3_moe_config(**overrides: Any) -> dict[str, Any]:
    """A Hugging Face Qwen3MoeConfig dict: the small Llama's attention (with Qwen3's q/k norms),
    4 layers, the first dense, the others 8 experts of inner size 256, top-2 renormalised."""
    return small_llama_config(**{
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "num_hidden_layers": 4, "mlp_only_layers": [0], "decoder_sparse_step": 1,
        "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 256,
        "norm_topk_prob": True, **overrides})


def moe_demo_checkpoint() -> Path:
    """`flashcomm demo --model moe`'s small random Qwen3-MoE (written on first use)."""
    return cached_checkpoint(MOE_DEMO_NAME, small_qwen3_moe_config())
