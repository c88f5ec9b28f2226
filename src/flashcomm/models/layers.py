"""The building blocks of the decoders: RMSNorm, RoPE (frequencies and rotation), the GQA
Attention whose o_proj follows the strategy, and the dense SwiGLU MLP. The model files
(transformer.py, mla.py, moe.py, deepseek_moe.py) build on these; nothing here imports them."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flashcomm import comm
from flashcomm.groups import GroupHandle
from flashcomm.model_args import ModelArgs
from flashcomm.models.parallel import TPContext, TPPlan
from flashcomm.models.step import KVCache, Step


def rope_inv_freq(args: ModelArgs) -> Tensor:
    """[rope_dim/2] float32 inverse frequencies (rope_dim: head_dim, MLA's qk_rope_head_dim),
    llama3- or yarn-scaled when configured."""
    d = args.qk_rope_head_dim or args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, device="cpu").float() / d))
    s = args.rope_scaling
    if s is None:
        return inv
    if s.get("rope_type") == "yarn":
        return _yarn_inv_freq(d, args.rope_theta, s)
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


def _yarn_inv_freq(d: int, base: float, s: dict[str, Any]) -> Tensor:
    """yarn: interpolated (inv / factor) below the beta_slow..beta_fast correction range,
    extrapolated (inv) above it, a linear ramp in between (transformers' formula)."""
    def dim_of(rotations: float) -> float:
        return d * math.log(s["original_max_position_embeddings"] / (rotations * 2 * math.pi)) / (
            2 * math.log(base))

    low, high = dim_of(s["beta_fast"]), dim_of(s["beta_slow"])
    if s["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    high += 0.001 if low == high else 0  # no zero-width ramp
    idx = torch.arange(0, d, 2, device="cpu").float()  # cpu: built under torch.device("meta")
    extrapolation = 1 - ((idx / 2 - low) / (high - low)).clamp(0, 1)  # 1 - linear ramp
    pos = base ** (idx / d)
    return 1.0 / (s["factor"] * pos) * (1 - extrapolation) + 1.0 / pos * extrapolation


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32 (as Hugging Face does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """x [..., dim] -> same shape."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, heads, hd]; cos/sin [T, hd] (two halves, Hugging Face's rotate_half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def token_chunk(x: Tensor, group: GroupHandle) -> Tensor:
    """[T, H] replicated -> this rank's chunk [T_pad/N, H] of the zero-padded token dim."""
    n = group.size
    t_pad = -(-x.shape[0] // n) * n
    chunk = t_pad // n
    x = F.pad(x, (0, 0, 0, t_pad - x.shape[0]))
    return x[group.rank * chunk:(group.rank + 1) * chunk]


class Attention(nn.Module):
    """GQA attention over this rank's heads; o_proj follows the TPContext's strategy."""

    def __init__(self, args: ModelArgs, plan: TPPlan, layer_idx: int, sharded_o: bool,
                 cache_idx: int | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # absolute: the series and attention windows use it
        self.cache_idx = layer_idx if cache_idx is None else cache_idx  # in this stage's cache
        self.n_q, self.n_kv, self.head_dim = plan.n_q, plan.n_kv, args.head_dim
        self.window = args.sliding_windows[layer_idx] if args.sliding_windows else None
        self.wq = nn.Linear(args.dim, plan.n_q * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, plan.n_kv * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, plan.n_kv * args.head_dim, bias=args.qkv_bias)
        o_width = plan.o_cols[1] - plan.o_cols[0]
        # a layer-sharded W_o lives in the series, not here
        self.wo = None if sharded_o else nn.Parameter(torch.empty(args.dim, o_width))
        self.o_bias = nn.Parameter(torch.zeros(args.dim)) if args.o_bias else None
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        # this rank's own D/N columns inside the held W_o columns (row-parallel fallback)
        own = plan.q_heads[0] * args.head_dim - plan.o_cols[0]
        self.own_cols = (own, own + plan.n_q * args.head_dim)
        # local kv head of each local q head; a plain tensor (not loaded), see init_buffers
        self.kv_index = torch.tensor(plan.kv_index, device="cpu")

    def forward(self, x: Tensor, step: Step, cache: KVCache, ctx: TPContext) -> Tensor:
        """x [T, H] -> [T, H], or [T_pad/N, H] with FlashComm1."""
        t, hd = x.shape[0], self.head_dim
        if ctx.o_series is not None:  # overlaps QKV + attention (k = 0) or more; the gather
            # source moves nothing on a row-parallel step (full=False)
            ctx.o_series.prefetch(self.layer_idx, full=ctx.cfg.flashcomm2_step(t))
        q = self.wq(x).view(t, self.n_q, hd)
        k = self.wk(x).view(t, self.n_kv, hd)
        v = self.wv(x).view(t, self.n_kv, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, step.cos, step.sin), apply_rope(k, step.cos, step.sin)
        k_cache, v_cache = cache.k[self.cache_idx], cache.v[self.cache_idx]
        k_cache[step.seq, step.pos] = k
        v_cache[step.seq, step.pos] = v
        kv_index = self.kv_index
        qp = q[step.gather].transpose(1, 2)  # [B, hq, n_max, hd]
        kp = k_cache[:, :step.kv_len].index_select(2, kv_index).transpose(1, 2)  # [B, hq, S, hd]
        vp = v_cache[:, :step.kv_len].index_select(2, kv_index).transpose(1, 2)
        o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=step.mask(self.window))
        o = o.transpose(1, 2)[step.seq, step.offset]  # [T, hq, hd]
        return self.o_proj(o.reshape(t, self.n_q * hd), ctx)

    def o_proj(self, x: Tensor, ctx: TPContext) -> Tensor:
        """x [T, D/N] -> [T, H] (or [T_pad/N, H] with FlashComm1), bias added once."""
        fc2 = ctx.groups is not None and ctx.cfg.flashcomm2_step(x.shape[0])
        w = self.wo if ctx.o_series is None else ctx.o_series.wait(self.layer_idx, full=fc2)
        if ctx.groups is None:
            return F.linear(x, w, self.o_bias)
        fc1 = ctx.cfg.flashcomm1
        if fc2:
            return comm.flashcomm2_o_proj(x, w, self.o_bias, ctx.groups, flashcomm1=fc1,
                                          comm_dtype=ctx.cfg.comm_dtype, counter=ctx.counter)
        if w.shape[1] != x.shape[1]:  # few tokens: row-parallel on W_o's own D/N columns
            w = w[:, self.own_cols[0]:self.own_cols[1]]  # (the gather source's is resident)
        return comm.row_parallel_o_proj(x, w, self.o_bias, ctx.groups.tp, flashcomm1=fc1,
                                        counter=ctx.counter)


class FeedForward(nn.Module):
    """SwiGLU MLP: gate/up column-parallel, down row-parallel (returns partial sums)."""

    def __init__(self, args: ModelArgs, plan: TPPlan) -> None:
        super().__init__()
        ff = plan.ffn[1] - plan.ffn[0]
        self.w1 = nn.Linear(args.dim, ff, bias=args.mlp_bias)  # gate_proj
        self.w3 = nn.Linear(args.dim, ff, bias=args.mlp_bias)  # up_proj
        self.w2 = nn.Linear(ff, args.dim, bias=False)  # down_proj; its bias is added once
        self.w2_bias = nn.Parameter(torch.zeros(args.dim)) if args.mlp_bias else None

    def forward(self, x: Tensor) -> Tensor:
        """x [T, H] -> partial [T, H] (this rank's intermediate columns only)."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
