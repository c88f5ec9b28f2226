"""DeepSeek's multi-head latent attention (MLA), tensor-parallel, with the dense Attention's o_proj.

Per token, kv_a_proj_with_mqa ([kv_lora + rope, H], replicated) produces the compressed latent c
[kv_lora] and one rope key k_rot [rope] shared by every head; kv_b_proj expands the latent into
each head's key part k_nope [nope] and value [v]. Queries come from q_proj, or from the low-rank
path q_a_proj -> q_a_layernorm -> q_b_proj (q_lora_rank). Scores span nope + rope dims; the
output has v_head_dim per head, so o_proj's input is D = n_heads * v_head_dim (16384 for
DeepSeek-V3, against H = 7168).

TP over N ranks: heads split; q_b_proj (or q_proj) and kv_b_proj column-parallel by head (the
rows of this rank's heads); q_a_proj, kv_a_proj_with_mqa and both norms replicated. o_proj IS
the dense Attention's method (row-parallel + all-reduce, FlashComm2's all-to-all before the
replicated W_o, int8 exchange, O-Shard through the series), so the collectives are the same
code; this module only computes the [T, D/N] it is fed.

KV cache: the compressed latent, not per-head keys/values. Each layer caches the normalised
latent [B, S, kv_lora] (KVCache.k) and the rotated rope key [B, S, rope] (KVCache.v), identical
on every TP rank (the latent projection is replicated). Every step expands the cached latents of
this rank's heads through kv_b_proj, as transformers does. Per token and layer that is
kv_lora + rope elements on each rank (576 for DeepSeek-V3) instead of n_heads/N * (nope + rope
+ v) for expanded K/V (5120 at N = 8, so 8.9x more).

RoPE: yarn-scaled inverse frequencies (args.rope_inv_freq) in the Step's tables; cos/sin times
yarn's attention_factor; softmax scale (nope + rope)^-0.5 times mscale(factor, mscale_all_dim)^2;
DeepSeek's interleaved rope pairs (x0, x1), (x2, x3)... are de-interleaved first, which is the
rotation transformers applies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flashcomm.model_args import ModelArgs, yarn_mscale
from flashcomm.models.layers import Attention, RMSNorm, apply_rope
from flashcomm.models.parallel import TPContext, TPPlan
from flashcomm.models.step import KVCache, Step

LATENT_NORM_EPS = 1e-6
"""eps of q_a_layernorm and kv_a_layernorm: transformers builds them with its default, not
config.json's rms_norm_eps."""

TensorRow = tuple[str, str, tuple[int, ...], int, "tuple[int, int] | None"]
"""(checkpoint name under self_attn., parameter name under attention., full shape, sliced dim,
[start, end) this rank reads or None for all of it)."""


def mla_tensors(args: ModelArgs, plan: TPPlan) -> list[TensorRow]:
    """One layer's MLA weights other than o_proj (the loader's own, as for every model), with
    this rank's rows: the heads' rows of q_b_proj / q_proj and kv_b_proj, all of the rest."""
    h, r, lora, rope = args.dim, args.q_lora_rank, args.kv_lora_rank, args.qk_rope_head_dim
    qk, kv = args.qk_nope_head_dim + rope, args.qk_nope_head_dim + args.head_dim  # per head
    (h0, h1), heads = plan.q_heads, args.n_heads
    q_rows, kv_rows = (h0 * qk, h1 * qk), (h0 * kv, h1 * kv)
    if r is None:
        out: list[TensorRow] = [("q_proj.weight", "q_proj.weight", (heads * qk, h), 0, q_rows)]
    else:
        out = [("q_a_proj.weight", "q_a_proj.weight", (r, h), 0, None),
               ("q_a_layernorm.weight", "q_a_norm.weight", (r,), 0, None),
               ("q_b_proj.weight", "q_b_proj.weight", (heads * qk, r), 0, q_rows)]
        if args.qkv_bias:  # attention_bias: q_a_proj and kv_a_proj_with_mqa (and o_proj)
            out.append(("q_a_proj.bias", "q_a_proj.bias", (r,), 0, None))
    out += [("kv_a_proj_with_mqa.weight", "kv_a_proj.weight", (lora + rope, h), 0, None),
            ("kv_a_layernorm.weight", "kv_a_norm.weight", (lora,), 0, None),
            ("kv_b_proj.weight", "kv_b_proj.weight", (heads * kv, lora), 0, kv_rows)]
    if args.qkv_bias:
        out.append(("kv_a_proj_with_mqa.bias", "kv_a_proj.bias", (lora + rope,), 0, None))
    return out


class MLAAttention(nn.Module):
    """Latent attention over this rank's heads; o_proj follows the TPContext's strategy."""

    o_proj = Attention.o_proj
    """The dense Attention's strategy path, shared: x [T, D/N] -> [T, H] (or [T_pad/N, H] with
    FlashComm1). It reads wo, o_bias, own_cols and layer_idx, set below as Attention sets them."""

    def __init__(self, args: ModelArgs, plan: TPPlan, layer_idx: int, sharded_o: bool,
                 cache_idx: int | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # absolute: the series uses it
        self.cache_idx = layer_idx if cache_idx is None else cache_idx  # in this stage's cache
        self.window = None  # full causal attention (Transformer.step asks every layer)
        self.n_q, self.v_dim = plan.n_q, args.head_dim
        self.nope, self.rope, self.lora = args.qk_nope_head_dim, args.qk_rope_head_dim, \
            args.kv_lora_rank
        self.interleave = args.rope_interleave
        qk, r = self.nope + self.rope, args.q_lora_rank
        self.q_proj = nn.Linear(args.dim, self.n_q * qk, bias=False) if r is None else None
        self.q_a_proj = None if r is None else nn.Linear(args.dim, r, bias=args.qkv_bias)
        self.q_a_norm = None if r is None else RMSNorm(r, LATENT_NORM_EPS)
        self.q_b_proj = None if r is None else nn.Linear(r, self.n_q * qk, bias=False)
        self.kv_a_proj = nn.Linear(args.dim, self.lora + self.rope, bias=args.qkv_bias)
        self.kv_a_norm = RMSNorm(self.lora, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.lora, self.n_q * (self.nope + self.v_dim), bias=False)
        o_width = plan.o_cols[1] - plan.o_cols[0]
        # a layer-sharded W_o lives in the series, not here
        self.wo = None if sharded_o else nn.Parameter(torch.empty(args.dim, o_width))
        self.o_bias = nn.Parameter(torch.zeros(args.dim)) if args.o_bias else None
        own = plan.q_heads[0] * self.v_dim - plan.o_cols[0]  # row-parallel fallback columns
        self.own_cols = (own, own + self.n_q * self.v_dim)
        s = args.rope_scaling or {}
        self.rope_factor = float(s.get("attention_factor", 1.0))
        self.scale = qk ** -0.5
        if s.get("mscale_all_dim"):
            self.scale *= yarn_mscale(s["factor"], s["mscale_all_dim"]) ** 2

    def forward(self, x: Tensor, step: Step, cache: KVCache, ctx: TPContext) -> Tensor:
        """x [T, H] -> [T, H], or [T_pad/N, H] with FlashComm1."""
        t, hq = x.shape[0], self.n_q
        if ctx.o_series is not None:  # as Attention: overlaps the projections + attention
            ctx.o_series.prefetch(self.layer_idx, full=ctx.cfg.flashcomm2_step(t))
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        q = q.view(t, hq, self.nope + self.rope)  # [T, hq, nope + rope]
        latent, k_rot = self.kv_a_proj(x).split([self.lora, self.rope], dim=-1)  # [T, lora + rope]
        cos, sin = step.cos, step.sin  # [T, rope]
        if self.rope_factor != 1.0:
            cos, sin = cos * self.rope_factor, sin * self.rope_factor
        q_rot = apply_rope(self._pairs(q[..., self.nope:]), cos, sin)  # [T, hq, rope]
        k_rot = apply_rope(self._pairs(k_rot[:, None]), cos, sin)[:, 0]  # [T, rope]
        c_cache, r_cache = cache.k[self.cache_idx], cache.v[self.cache_idx]
        c_cache[step.seq, step.pos] = self.kv_a_norm(latent)
        r_cache[step.seq, step.pos] = k_rot
        b, s = c_cache.shape[0], step.kv_len
        kv = self.kv_b_proj(c_cache[:, :s]).view(b, s, hq, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # [B, S, hq, nope], [B, S, hq, v]
        k = torch.cat((k_nope, r_cache[:, :s, None].expand(b, s, hq, self.rope)), dim=-1)
        q = torch.cat((q[..., :self.nope], q_rot), dim=-1)  # [T, hq, nope + rope]
        qp = q[step.gather].transpose(1, 2)  # [B, hq, n_max, nope + rope]
        o = F.scaled_dot_product_attention(qp, k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=step.mask(None), scale=self.scale)
        o = o.transpose(1, 2)[step.seq, step.offset]  # [T, hq, v]
        return self.o_proj(o.reshape(t, hq * self.v_dim), ctx)

    def _pairs(self, x: Tensor) -> Tensor:
        """[..., rope] in DeepSeek's interleaved pair layout -> the two-halves layout apply_rope
        rotates (evens then odds); unchanged when the checkpoint is not interleaved."""
        return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1) if self.interleave else x
