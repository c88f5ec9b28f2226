"""GGUF checkpoints: conversion against transformers' own GGUF loader, the cache, and bad files.

Small GGUFs are written here with the format's library (gguf.GGUFWriter) from a random Llama,
the way llama.cpp's converter writes them: Q/K rows permuted into rotary pairs, a gpt2 (byte-level
BPE) tokenizer with a chat template, weights in several quantization types.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flashcomm.config import FlashCommConfig
from flashcomm.model_args import CheckpointError, ModelArgs
from flashcomm.models.engine import Engine, chat_prompt_ids
from flashcomm.models.gguf import convert_gguf, converted_checkpoint, resolve_checkpoint
from flashcomm.models.random_checkpoint import (
    _byte_to_unicode,
    random_state_dict,
    small_llama_config,
)

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


@pytest.fixture(scope="module")
def original() -> dict[str, torch.Tensor]:
    return random_state_dict(ModelArgs.from_hf_config(CONFIG), seed=3)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, original) -> Path:
    return write_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", original, CONFIG)


@pytest.fixture(scope="module")
def converted(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return converted_checkpoint(tiny_gguf, cache=tmp_path_factory.mktemp("cache"))


def test_conversion_matches_transformers_gguf_loader(tiny_gguf, converted, original) -> None:
    """Every converted tensor equals what transformers' gguf_file loader builds; Q/K (stored
    lossless) equal the original weights, so llama.cpp's permutation is undone exactly."""
    from transformers import AutoModelForCausalLM

    ours = load_file(str(converted / "model.safetensors"))
    hf = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name,
                                              dtype=torch.float32).eval()
    theirs = hf.state_dict()
    assert set(ours) == set(original) == set(theirs)
    for name, t in ours.items():
        assert t.dtype == torch.float32
        torch.testing.assert_close(t, theirs[name].float(), rtol=0, atol=0, msg=name)
        if "q_proj" in name or "k_proj" in name or "norm" in name:
            torch.testing.assert_close(t, original[name], rtol=0, atol=0, msg=name)
    # the engine on the converted checkpoint gives transformers' logits
    engine = Engine.from_checkpoint(converted, FlashCommConfig(), progress=False)
    prompt = [5, 200, 17, 256, 3]
    m = engine.model
    with torch.no_grad():
        ours_logits = m(torch.tensor(prompt), m.step([0], [5], last_only=False),
                        m.allocate_cache(1, 8))
        ref = hf(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(ours_logits, ref, rtol=1e-4, atol=1e-4)


def test_config_tokenizer_and_chat_template_come_from_the_metadata(tiny_gguf, converted) -> None:
    from transformers import AutoTokenizer

    cfg = json.loads((converted / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "eos_token_id", "bos_token_id"):
        assert cfg[key] == CONFIG[key], key
    assert cfg["tie_word_embeddings"] is False and cfg["architectures"] == ["LlamaForCausalLM"]
    hf_tok = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    engine = Engine.from_checkpoint(converted, FlashCommConfig(), progress=False)
    text = "the tokenizer: bytes é and a merge"
    assert engine.encode([text])[0] == hf_tok(text)["input_ids"]
    assert 256 in engine.encode([" t"])[0]  # the merge survived
    ids = chat_prompt_ids(converted, ["hi there"])[0]
    assert ids == list(hf_tok.apply_chat_template([{"role": "user", "content": "hi there"}],
                                                  add_generation_prompt=True, return_dict=False))
    assert ids[0] == 257 and engine.tokenizer.decode(ids, skip_special_tokens=False) \
        .endswith("assistant\n")
    assert engine.eos_token_ids == (258,)


def test_conversion_is_cached_by_file_hash(tiny_gguf, tmp_path, original) -> None:
    """Same bytes -> the cached directory (no second conversion); other bytes -> another one."""
    first = converted_checkpoint(tiny_gguf, cache=tmp_path)
    marker = first / "model.safetensors"
    mtime = marker.stat().st_mtime_ns
    assert converted_checkpoint(tiny_gguf, cache=tmp_path) == first
    assert marker.stat().st_mtime_ns == mtime
    (tmp_path / "x").mkdir()
    other = write_llama_gguf(tmp_path / "x" / "tiny.gguf", {k: v * 2 for k, v in original.items()},
                             CONFIG)
    assert converted_checkpoint(other, cache=tmp_path) != first
    assert resolve_checkpoint(first) == first  # a directory is used as it is


def _gpt2_gguf(path: Path) -> Path:
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _unknown_type(src: Path, dst: Path) -> Path:
    """`src` with the type field of tensor 'output_norm.weight' set to 99 (no such type)."""
    data = bytearray(src.read_bytes())
    name = b"output_norm.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, 99)
    dst.write_bytes(bytes(data))
    return dst


@pytest.fixture(scope="module")
def bad_files(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    data = tiny_gguf.read_bytes()
    (d / "truncated.gguf").write_bytes(data[: len(data) - 1000])
    (d / "header.gguf").write_bytes(data[:100])
    (d / "notgguf.gguf").write_bytes(b"PK\x03\x04" + data[4:200])
    return {"gpt2": _gpt2_gguf(d / "gpt2.gguf"), "truncated": d / "truncated.gguf",
            "header": d / "header.gguf", "notgguf": d / "notgguf.gguf",
            "unknown": _unknown_type(tiny_gguf, d / "unknown.gguf")}


PROBLEMS = {"gpt2": "architecture 'gpt2' is not supported; allowed: llama",
            "truncated": "truncated GGUF file", "header": "truncated GGUF file",
            "notgguf": "not a GGUF file", "unknown": "unknown quantization type 99"}


@pytest.mark.parametrize("kind", sorted(PROBLEMS))
def test_bad_file_raises_checkpoint_error(bad_files, kind, tmp_path) -> None:
    with pytest.raises(CheckpointError) as e:
        convert_gguf(bad_files[kind], tmp_path / "out")
    msg = str(e.value)
    assert str(bad_files[kind]) in msg and PROBLEMS[kind] in msg, msg
    assert "\n" not in msg and not (tmp_path / "out" / "config.json").exists()


@pytest.mark.parametrize("kind", ["gpt2", "truncated", "unknown"])
def test_run_on_a_bad_gguf_exits_2_with_one_line(bad_files, kind, tmp_path) -> None:
    env = {"FLASHCOMM_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "flashcomm.cli", "run", "--model",
                          str(bad_files[kind]), "--prompt", "hi"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, **env})
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("flashcomm run: error: ") and str(bad_files[kind]) in lines[-1]
    assert "Traceback" not in out.stderr and not list((tmp_path / "gguf").glob("[!.]*"))
