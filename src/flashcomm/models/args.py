"""Hugging Face config.json -> ModelArgs for the Llama family (Llama, Mistral, Qwen2, Qwen3).

Pure Python + torch: parsing and validation happen before any process group exists, so a bad
checkpoint fails on every rank with the same message naming the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class CheckpointError(ValueError):
    """A checkpoint (config.json or tensors) cannot be used; the message names the field/tensor."""


@dataclass(frozen=True)
class ModelArgs:
    """Architecture of a Llama-family decoder, parsed from a Hugging Face config.json."""

    model_type: str
    """One of SUPPORTED_MODEL_TYPES."""
    vocab_size: int
    """Number of token ids."""
    dim: int
    """Hidden size H."""
    n_layers: int
    """Number of decoder layers L."""
    n_heads: int
    """Query heads."""
    n_kv_heads: int
    """Key/value heads (GQA when fewer than n_heads)."""
    head_dim: int
    """Per-head dimension; D = n_heads * head_dim may differ from H (Qwen3)."""
    intermediate_size: int
    """MLP inner size."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: dict[str, Any] | None = None
    """llama3 RoPE scaling parameters, or None."""
    qkv_bias: bool = False
    """Bias on q/k/v projections (Qwen2, Llama attention_bias)."""
    o_bias: bool = False
    """Bias on o_proj (Llama attention_bias)."""
    mlp_bias: bool = False
    """Bias on gate/up/down (Llama mlp_bias)."""
    qk_norm: bool = False
    """Per-head RMSNorm on q and k (Qwen3)."""
    tie_word_embeddings: bool = False
    """lm_head shares the embedding matrix."""
    sliding_windows: tuple[int | None, ...] = ()
    """Per layer: attention window (keys with q_pos - k_pos < window), or None for full causal."""

    @property
    def q_dim(self) -> int:
        """D = n_heads * head_dim, the o_proj input width."""
        return self.n_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        """Parse a config.json dict; CheckpointError names the offending field."""
        mt = cfg.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"config.json: model_type={mt!r} is not supported; allowed: {SUPPORTED_MODEL_TYPES}"
            )

        def need(name: str) -> Any:
            if name not in cfg or cfg[name] is None:
                raise CheckpointError(f"config.json: field {name!r} is missing ({mt})")
            return cfg[name]

        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"config.json: hidden_act={act!r} not supported; allowed: silu")
        n_heads = int(need("num_attention_heads"))
        dim = int(need("hidden_size"))
        n_kv = int(cfg.get("num_key_value_heads") or n_heads)
        head_dim = int(cfg.get("head_dim") or dim // n_heads)
        n_layers = int(need("num_hidden_layers"))
        if n_heads % n_kv:
            raise CheckpointError(
                f"config.json: num_attention_heads={n_heads} must be a multiple of "
                f"num_key_value_heads={n_kv}"
            )
        theta, scaling = _rope_params(cfg)
        windows = _sliding_windows(cfg, mt, n_layers)
        bias = bool(cfg.get("attention_bias", False))
        return cls(
            model_type=mt, vocab_size=int(need("vocab_size")), dim=dim, n_layers=n_layers,
            n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
            intermediate_size=int(need("intermediate_size")),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
            qkv_bias=True if mt == "qwen2" else bias, o_bias=False if mt == "qwen2" else bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)), qk_norm=mt == "qwen3",
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_windows=windows,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelArgs:
        """Parse `path`/config.json."""
        f = Path(path) / "config.json"
        if not f.is_file():
            raise CheckpointError(f"{f}: config.json not found")
        try:
            return cls.from_hf_config(json.loads(f.read_text()))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{f}: not valid JSON ({e})") from None


def _rope_params(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    # transformers >= 5 writes rope_parameters; older checkpoints rope_theta + rope_scaling
    params = dict(cfg.get("rope_parameters") or {})
    params.update(cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise CheckpointError(
            f"config.json: rope_scaling type {kind!r} is not supported; allowed: default, llama3"
        )
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in params]
    if missing:
        raise CheckpointError(f"config.json: llama3 rope_scaling is missing {missing}")
    return theta, {k: float(params[k]) for k in keys}


def _sliding_windows(cfg: dict[str, Any], mt: str, n_layers: int) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    if mt == "mistral":  # Mistral applies its window (if any) on every layer
        return (window,) * n_layers
    types = cfg.get("layer_types") or ["full_attention"] * n_layers
    if mt in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        types = ["full_attention"] * n_layers
    return tuple(window if t == "sliding_attention" else None for t in types)


def rope_inv_freq(args: ModelArgs) -> Tensor:
    """[head_dim/2] float32 inverse frequencies, llama3-scaled when configured."""
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, device="cpu").float() / d))
    s = args.rope_scaling
    if s is None:
        return inv
    low_wl = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wl = s["original_max_position_embeddings"] / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wl, inv / s["factor"], inv)
    smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
        s["high_freq_factor"] - s["low_freq_factor"]
    )
    smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
    medium = (wavelen >= high_wl) & (wavelen <= low_wl)
    return torch.where(medium, smoothed, scaled)
