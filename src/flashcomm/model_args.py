"""Hugging Face config.json -> ModelArgs: the Llama family (Llama, Mistral, Qwen2, Qwen3), its
mixture-of-experts relatives (Qwen3-MoE, Mixtral) and DeepSeek-V3 (latent attention, MLA).

Pure Python, no torch: the engine (models/) and the planner (plan/) both read it, so it sits
in the core below both. Parsing and validation happen before any process group exists, so a
bad checkpoint fails on every rank with the same message naming the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flashcomm.knobs import FlashCommError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral",
                         "deepseek_v3")
MOE_MODEL_TYPES = ("qwen3_moe", "mixtral", "deepseek_v3")
_DEFAULT_ROPE_THETA = {"mixtral": 1e6}  # what transformers assumes when config.json is silent


class CheckpointError(FlashCommError, ValueError):
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
    """Per-head dimension; D = n_heads * head_dim may differ from H (Qwen3). MLA: v_head_dim,
    the per-head width of the attention output (config.json's head_dim is the rope width)."""
    intermediate_size: int
    """MLP inner size."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: dict[str, Any] | None = None
    """llama3 RoPE scaling parameters, yarn's (with rope_type='yarn'), or None."""
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
    max_position_embeddings: int | None = None
    """Longest sequence (prompt + new tokens) the model was trained for; None: not stated."""
    n_experts: int = 0
    """Routed experts of each MoE layer (0: no MoE layer)."""
    n_experts_per_tok: int = 0
    """Top-k: experts each token is routed to."""
    moe_intermediate_size: int = 0
    """Inner size of one expert's SwiGLU MLP."""
    norm_topk_prob: bool = False
    """Renormalise the top-k routing probabilities to sum to 1 (Mixtral always does)."""
    moe_layers: tuple[int, ...] = ()
    """Layers whose MLP is the sparse MoE block; every other layer has the dense MLP."""
    n_shared_experts: int = 0
    """DeepSeek: shared experts (one SwiGLU of inner size n * moe_intermediate_size) every token
    passes through besides its routed ones."""
    routed_scaling_factor: float = 1.0
    """DeepSeek: factor on the routed experts' weights."""
    n_group: int = 1
    """DeepSeek: expert groups; a token picks experts from its topk_group best groups only."""
    topk_group: int = 1
    """DeepSeek: groups a token may route to."""
    q_lora_rank: int | None = None
    """MLA: rank of the low-rank query path (q_a_proj, q_a_layernorm, q_b_proj); None: q_proj."""
    kv_lora_rank: int = 0
    """MLA: width of the compressed key/value latent (0: not an MLA model)."""
    qk_nope_head_dim: int = 0
    """MLA: per-head query/key width without position encoding."""
    qk_rope_head_dim: int = 0
    """MLA: per-head query/key width with RoPE (the key part is shared by every head)."""
    rope_interleave: bool = False
    """MLA: the rope dims come as interleaved pairs (x0, x1), (x2, x3)... (DeepSeek's layout)."""

    @property
    def q_dim(self) -> int:
        """D = n_heads * head_dim, the o_proj input width (MLA: n_heads * v_head_dim)."""
        return self.n_heads * self.head_dim

    @property
    def is_mla(self) -> bool:
        """Whether attention is DeepSeek's multi-head latent attention (models/mla.py)."""
        return self.kv_lora_rank > 0

    def attn_weights(self, tp: int) -> int:
        """Attention weight elements one of `tp` ranks holds per layer, all but o_proj's weight:
        q/k/v of its heads (+ Qwen3's q/k norms); MLA: the replicated latent projections and
        norms, q_b_proj (or q_proj) and kv_b_proj of its heads; biases included."""
        h, hq, bias = self.dim, self.n_heads // tp, self.dim if self.o_bias else 0
        if not self.is_mla:
            kv = max(1, self.n_kv_heads // tp) * self.head_dim
            qkv = hq * self.head_dim + 2 * kv
            return h * qkv + (qkv if self.qkv_bias else 0) + bias + (
                2 * self.head_dim if self.qk_norm else 0)
        qk, r = self.qk_nope_head_dim + self.qk_rope_head_dim, self.q_lora_rank
        q = h * hq * qk if r is None else (h + 1 + int(self.qkv_bias)) * r + r * hq * qk
        kv_a = (h + int(self.qkv_bias)) * (self.kv_lora_rank + self.qk_rope_head_dim)
        kv_b = self.kv_lora_rank * hq * (self.qk_nope_head_dim + self.head_dim)
        return q + kv_a + self.kv_lora_rank + kv_b + bias

    @property
    def is_moe(self) -> bool:
        """Whether any layer routes its tokens to experts."""
        return bool(self.moe_layers)

    def mlp_weights(self, tp: int, expert_parallel: bool = False) -> int:
        """MLP weight elements one of `tp` ranks holds over all layers: dense 3*H*I/N; MoE the
        replicated router E*H plus 3*H*I_moe*E/N (1/N of every expert), or under expert
        parallelism the largest rank's ceil(E/N) whole experts (expert_range's rank 0);
        DeepSeek adds the router's bias E and 1/N of the shared experts."""
        n_moe = len(self.moe_layers)
        dense = (self.n_layers - n_moe) * 3 * self.dim * self.intermediate_size // tp
        one = 3 * self.dim * self.moe_intermediate_size  # one expert's gate, up and down
        if expert_parallel and tp > 1:
            e0, e1 = expert_range(self.n_experts, tp, 0)
            experts = one * (e1 - e0) + one * self.n_shared_experts // tp
        else:
            experts = one * (self.n_experts + self.n_shared_experts) // tp
        bias = self.n_experts if self.model_type == "deepseek_v3" else 0
        return dense + n_moe * (self.n_experts * self.dim + bias + experts)

    def mlp_active_weights(self, tp: int) -> float:
        """MLP weight elements one token multiplies on one of `tp` ranks, averaged over layers
        (its top-k and the shared experts in MoE layers, plus the router)."""
        n_moe = len(self.moe_layers)
        dense = (self.n_layers - n_moe) * 3 * self.dim * self.intermediate_size / tp
        routed = 3 * self.dim * self.moe_intermediate_size * (
            self.n_experts_per_tok + self.n_shared_experts) / tp
        return (dense + n_moe * (self.n_experts * self.dim + routed)) / self.n_layers

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
        deepseek = _deepseek_fields(cfg, need) if mt == "deepseek_v3" else {}
        if deepseek:  # MLA has no kv heads; head_dim is the attention output's per-head width
            n_kv, head_dim = n_heads, int(need("v_head_dim"))
        if n_heads % n_kv:
            raise CheckpointError(
                f"config.json: num_attention_heads={n_heads} must be a multiple of "
                f"num_key_value_heads={n_kv}"
            )
        theta, scaling = _rope_params(cfg, _DEFAULT_ROPE_THETA.get(mt, 10000.0),
                                      ("yarn",) if deepseek else ())
        windows = _sliding_windows(cfg, mt, n_layers)
        bias = bool(cfg.get("attention_bias", False))
        return cls(
            model_type=mt, vocab_size=int(need("vocab_size")), dim=dim, n_layers=n_layers,
            n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
            intermediate_size=int(need("intermediate_size")),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
            qkv_bias=True if mt == "qwen2" else bias, o_bias=False if mt == "qwen2" else bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)), qk_norm=mt in ("qwen3", "qwen3_moe"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_windows=windows, max_position_embeddings=_max_positions(cfg),
            **_moe_fields(cfg, mt, n_layers, need), **deepseek,
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


def expert_range(n_experts: int, tp: int, rank: int) -> tuple[int, int]:
    """[start, end) of the whole experts TP rank `rank` of `tp` holds under expert parallelism."""
    # vLLM's linear placement (determine_expert_map), so both engines hold the same experts:
    # floor(E/N) each, and the first E mod N ranks one more
    base, extra = divmod(n_experts, tp)
    start = rank * base + min(rank, extra)
    return start, start + base + int(rank < extra)


def _rope_params(cfg: dict[str, Any], default_theta: float,
                 more: tuple[str, ...] = ()) -> tuple[float, dict[str, Any] | None]:
    # transformers >= 5 writes rope_parameters; older checkpoints rope_theta + rope_scaling
    params = dict(cfg.get("rope_parameters") or {})
    params.update(cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", default_theta)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "yarn" and kind in more:
        return theta, _yarn_params(params, cfg)
    if kind != "llama3":
        raise CheckpointError(
            f"config.json: rope_scaling type {kind!r} is not supported; allowed: "
            f"{', '.join(('default', 'llama3', *more))}")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in params]
    if missing:
        raise CheckpointError(f"config.json: llama3 rope_scaling is missing {missing}")
    return theta, {k: float(params[k]) for k in keys}


def _yarn_params(params: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """yarn's parameters with transformers' defaults, plus the cos/sin attention_factor."""
    orig = params.get("original_max_position_embeddings") or cfg.get("max_position_embeddings")
    if not orig:
        raise CheckpointError("config.json: yarn rope_scaling needs "
                              "original_max_position_embeddings (or max_position_embeddings)")
    factor = float(params.get("factor") or cfg.get("max_position_embeddings", orig) / orig)
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    attn = params.get("attention_factor")
    if attn is None:
        attn = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                if mscale and mscale_all_dim else yarn_mscale(factor))
    return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": orig,
            "beta_fast": float(params.get("beta_fast") or 32),
            "beta_slow": float(params.get("beta_slow") or 1), "mscale": mscale,
            "mscale_all_dim": mscale_all_dim, "attention_factor": float(attn),
            "truncate": bool(params.get("truncate", True))}


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """yarn's magnitude correction 0.1 * mscale * ln(scale) + 1 (1 when scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


_DEEPSEEK_DEFAULTS = {"q_lora_rank": 1536, "n_shared_experts": 1, "routed_scaling_factor": 2.5,
                      "n_group": 8, "topk_group": 4, "rope_interleave": True}
"""What transformers' DeepseekV3Config assumes for a field config.json does not write."""


def _deepseek_fields(cfg: dict[str, Any], need: Callable[[str], Any]) -> dict[str, Any]:
    """DeepSeek-V3's MLA dims (from their own keys, never head_dim) and routing fields."""
    def get(name: str) -> Any:
        return cfg[name] if name in cfg else _DEEPSEEK_DEFAULTS[name]

    for key, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"),
                      ("moe_layer_freq", 1)):
        if cfg.get(key, want) != want:
            raise CheckpointError(f"config.json: {key}={cfg[key]!r} is not supported; allowed: "
                                  f"{want!r} (DeepSeek-V3 as transformers runs it)")
    out = {k: int(need(k)) for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim")}
    q_rank = get("q_lora_rank")
    out |= {"q_lora_rank": None if q_rank is None else int(q_rank),
            "n_shared_experts": int(get("n_shared_experts") or 0),
            "routed_scaling_factor": float(get("routed_scaling_factor")),
            "n_group": int(get("n_group") or 1), "topk_group": int(get("topk_group") or 1),
            "rope_interleave": bool(get("rope_interleave"))}
    e, g, tg = int(cfg.get("n_routed_experts") or 0), out["n_group"], out["topk_group"]
    if e and (e % g or e // g < 2 or not 1 <= tg <= g
              or int(need("num_experts_per_tok")) > tg * e // g):
        raise CheckpointError(
            f"config.json: n_routed_experts={e}, n_group={g}, topk_group={tg}, "
            f"num_experts_per_tok={cfg.get('num_experts_per_tok')}: the groups must split the "
            f"experts evenly, >= 2 each, 1 <= topk_group <= n_group, and the chosen groups hold "
            f"at least num_experts_per_tok experts")
    return out


def _max_positions(cfg: dict[str, Any]) -> int | None:
    n = cfg.get("max_position_embeddings")
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CheckpointError(f"config.json: max_position_embeddings={n!r} must be an int >= 1")
    return n


def _sliding_windows(cfg: dict[str, Any], mt: str, n_layers: int) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    if mt in ("mistral", "mixtral"):  # the window (if any) applies on every layer
        return (window,) * n_layers
    if mt == "qwen3_moe":  # every layer, and only with use_sliding_window
        return (window if cfg.get("use_sliding_window", False) else None,) * n_layers
    types = cfg.get("layer_types") or ["full_attention"] * n_layers
    if mt in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        types = ["full_attention"] * n_layers
    return tuple(window if t == "sliding_attention" else None for t in types)


def _moe_fields(cfg: dict[str, Any], mt: str, n_layers: int,
                need: Callable[[str], Any]) -> dict[str, Any]:
    """ModelArgs' MoE fields; Qwen3-MoE in both spellings (transformers < 5 writes num_experts,
    5 writes num_local_experts), its dense layers from mlp_only_layers and decoder_sparse_step."""
    if mt not in MOE_MODEL_TYPES:
        return {}
    if mt == "mixtral":
        n_experts, inner = int(need("num_local_experts")), int(need("intermediate_size"))
        norm = True
        sparse = list(range(n_layers))
    elif mt == "deepseek_v3":  # transformers' defaults where config.json is silent
        n_experts, inner = int(need("n_routed_experts")), int(need("moe_intermediate_size"))
        norm = bool(cfg.get("norm_topk_prob", True))
        first = int(cfg.get("first_k_dense_replace", 3))
        sparse = list(range(first, n_layers)) if n_experts else []
    else:
        given = {k: cfg[k] for k in ("num_experts", "num_local_experts") if cfg.get(k) is not None}
        if len(set(given.values())) > 1:
            raise CheckpointError(f"config.json: {given} disagree; write one of them")
        if not given:
            raise CheckpointError(f"config.json: field 'num_experts' (or 'num_local_experts') is "
                                  f"missing ({mt})")
        n_experts, inner = int(next(iter(given.values()))), int(need("moe_intermediate_size"))
        norm = bool(cfg.get("norm_topk_prob", False))
        step = int(cfg.get("decoder_sparse_step") or 1)
        if step < 1:
            raise CheckpointError(f"config.json: decoder_sparse_step={step} must be >= 1")
        dense = set(cfg.get("mlp_only_layers") or ())
        sparse = [i for i in range(n_layers)
                  if n_experts > 0 and i not in dense and (i + 1) % step == 0]
    top_k = int(need("num_experts_per_tok")) if sparse else int(cfg.get("num_experts_per_tok") or 0)
    if sparse and not 1 <= top_k <= n_experts:
        raise CheckpointError(f"config.json: num_experts_per_tok={top_k} must be in "
                              f"[1, {n_experts}] (the number of experts)")
    return {"n_experts": n_experts, "n_experts_per_tok": top_k, "moe_intermediate_size": inner,
            "norm_topk_prob": norm, "moe_layers": tuple(sparse)}
