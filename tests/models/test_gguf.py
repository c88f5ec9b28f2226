"""GGUF checkpoints: conversion against transformers' own GGUF loader, the cache, and bad files.

The GGUFs are small ones that tests/gguf_files.py writes with the format's library from a random
Llama, the way llama.cpp's converter does (Q/K rows permuted, several quantization types, a
byte-level BPE tokenizer with a chat template), and broken copies of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf_files import CONFIG, gpt2_gguf, unknown_type_gguf, write_llama_gguf
from safetensors.torch import load_file

from flashcomm.config import FlashCommConfig
from flashcomm.model_args import CheckpointError, ModelArgs
from flashcomm.models.engine import Engine, chat_prompt_ids
from flashcomm.models.gguf import convert_gguf, converted_checkpoint, resolve_checkpoint
from flashcomm.models.random_checkpoint import random_state_dict


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


@pytest.fixture(scope="module")
def bad_files(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    data = tiny_gguf.read_bytes()
    (d / "truncated.gguf").write_bytes(data[: len(data) - 1000])
    (d / "header.gguf").write_bytes(data[:100])
    (d / "notgguf.gguf").write_bytes(b"PK\x03\x04" + data[4:200])
    return {"gpt2": gpt2_gguf(d / "gpt2.gguf"), "truncated": d / "truncated.gguf",
            "header": d / "header.gguf", "notgguf": d / "notgguf.gguf",
            "unknown": unknown_type_gguf(tiny_gguf, d / "unknown.gguf")}


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
