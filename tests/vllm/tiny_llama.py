"""A tiny random fp32 Llama checkpoint with a local tokenizer, for the vLLM plugin tests."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = [f"w{i}" for i in range(200)]


SPECIALS = ["<unk>", "<s>", "</s>"]
VOCAB_SIZE = len(SPECIALS) + len(WORDS)


def save_word_tokenizer(out: Path) -> None:
    """A word-level tokenizer over SPECIALS + WORDS (ids 0..VOCAB_SIZE-1) saved into `out`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(out)


def widen_weights(model, std: float = 0.1) -> None:
    """Redraw every matrix with a larger std than the default init, so greedy tokens vary."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)


def build_tiny_llama(out: Path, num_layers: int = 5, seed: int = 0) -> Path:
    """Write config.json, model.safetensors and a word-level tokenizer into `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    save_word_tokenizer(out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=256, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(cfg).to(torch.float32)
    widen_weights(model)
    model.save_pretrained(out, safe_serialization=True)
    (out / "flashcomm_tiny.json").write_text(json.dumps({"num_layers": num_layers}))
    return out


def prompts(scale: int = 1) -> list[str]:
    """Four prompts of different lengths (3, 8, 17 and 30 words, times `scale`)."""
    return [" ".join(WORDS[(7 * j + n) % len(WORDS)] for j in range(scale * n))
            for n in (3, 8, 17, 30)]
