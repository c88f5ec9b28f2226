"""Small GGUF files written with the format's library (gguf.GGUFWriter), the way llama.cpp's
converter writes them: a random Llama with Q/K rows permuted into rotary pairs, a gpt2 (byte-level
BPE) tokenizer with a chat template, weights in several quantization types; plus bad files."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from flashcomm.models.random_checkpoint import _byte_to_unicode, small_llama_config

gguf = pytest.importorskip("gguf", reason="gguf is a dependency of flashcomm: pip install -e .")
Q = gguf.GGMLQuantizationType
CONFIG = small_llama_config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            vocab_size=259, tie_word_embeddings=False, bos_token_id=257,
                            eos_token_id=258, max_position_embeddings=128)
CHAT = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
# HF tensor suffix -> (GGUF name, quantization): lossless types on Q/K so the round trip is exact
LAYER = {"input_layernorm.weight": ("attn_norm.weight", Q.F32),
         "post_attention_layernorm.weight": ("ffn_norm.weight", Q.F32),
         "self_attn.q_proj.weight": ("attn_q.weight", Q.F32),
         "self_attn.k_proj.weight": ("attn_k.weight", Q.F32),
         "self_attn.v_proj.weight": ("attn_v.weight", Q.Q8_0),
         "self_attn.o_proj.weight": ("attn_output.weight", Q.Q4_1),
         "mlp.gate_proj.weight": ("ffn_gate.weight", Q.Q4_1),
         "mlp.up_proj.weight": ("ffn_up.weight", Q.F16),
         "mlp.down_proj.weight": ("ffn_down.weight", Q.Q8_0)}
GLOBAL = {"model.embed_tokens.weight": ("token_embd.weight", Q.Q8_0),
          "model.norm.weight": ("output_norm.weight", Q.F32),
          "lm_head.weight": ("output.weight", Q.Q8_0)}


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter: each head's rows as interleaved rotary pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def write_llama_gguf(path: Path, state: dict[str, torch.Tensor], cfg: dict) -> Path:
    """A llama GGUF of `state` (Hugging Face names) with a byte-level BPE tokenizer."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    # the tokenizer: 256 byte symbols, one merge ("Ġ" + "t"), then <s>, </s>
    byte_chars = [_byte_to_unicode()[b] for b in range(256)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(byte_chars + ["Ġt", "<s>", "</s>"])
    w.add_token_types([1] * 257 + [3, 3])
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT)
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    for name, t in state.items():
        if name in GLOBAL:
            gname, qtype = GLOBAL[name]
        else:
            layer, suffix = name.split(".", 3)[2], name.split(".", 3)[3]
            gname, qtype = f"blk.{layer}.{LAYER[suffix][0]}", LAYER[suffix][1]
            if suffix.startswith("self_attn.q_proj"):
                t = permute(t, heads)
            elif suffix.startswith("self_attn.k_proj"):
                t = permute(t, kv)
        arr = t.numpy().astype(np.float32)
        if qtype in (Q.F32, Q.F16):  # the numpy dtype says the type
            w.add_tensor(gname, arr.astype(np.float16 if qtype == Q.F16 else np.float32))
        else:  # bytes: the writer derives the shape from the byte rows
            w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gpt2_gguf(path: Path) -> Path:
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def unknown_type_gguf(src: Path, dst: Path) -> Path:
    """`src` with the type field of tensor 'output_norm.weight' set to 99 (no such type)."""
    data = bytearray(src.read_bytes())
    name = b"output_norm.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, 99)
    dst.write_bytes(bytes(data))
    return dst


