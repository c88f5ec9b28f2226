"""A tensor-parallel Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) in plain PyTorch.

Reads top to bottom: TPPlan (what this rank holds) -> TPContext (the strategy) -> Step (the
flattened varlen batch of one forward, with its RoPE tables and masks) -> KVCache -> the modules
-> Transformer. ModelArgs, parsed from a Hugging Face config.json, lives in models/args.py.

Layout of one step: the T tokens of every sequence in the batch are flattened into one token
dimension ([T, H], token dim first), which is exactly FlashComm's token dimension. Parallelism:
  * QKV and gate/up are column-parallel (heads / intermediate split over the N TP ranks);
    when kv heads < N, kv heads are replicated so each rank holds the kv heads its q heads need;
  * down_proj is row-parallel (partial sums, then all-reduce, or reduce-scatter with FlashComm1);
  * o_proj follows the strategy: row-parallel + all-reduce ("allreduce"), or FlashComm2's
    all-to-all before a replicated W_o (full [H, D] at otp=1, the [H, D/otp] slice otherwise),
    optionally layer-sharded through a ShardedSeries (prefetch at QKV start, wait at o_proj)
    or a GatheredSeries (resident D/N slices, gathered on FlashComm2 steps only);
  * with FlashComm1 the residual stream between layers is this rank's token chunk [T_pad/N, H];
  * embeddings, final norm and lm_head are replicated on every TP rank (simplest; small models).
Pipeline stages: a Transformer holds the layers of one stage (`layer_range`, absolute indices;
KV cache and module list local), embeddings only on the first stage, final norm and lm_head only
on the last; models/pipeline.py passes hidden states between stages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flashcomm import comm
from flashcomm.config import FlashCommConfig
from flashcomm.gathered import GatheredSeries
from flashcomm.groups import GroupHandle, ParallelGroups
from flashcomm.knobs import AUTO, ConfigError
from flashcomm.models.args import CheckpointError, ModelArgs, rope_inv_freq
from flashcomm.models.deepseek_moe import DeepSeekMoE
from flashcomm.models.moe import MoEFeedForward, expert_split
from flashcomm.models.step import KVCache, Step
from flashcomm.sharding import ShardedSeries

__all__ = ["CheckpointError", "KVCache", "ModelArgs", "Step", "TPContext", "TPPlan",
           "Transformer", "rope_inv_freq"]

# ---- what this rank holds -------------------------------------------------------------------


@dataclass(frozen=True)
class TPPlan:
    """The slices of every weight that one TP rank holds (head / column ranges)."""

    tp: int
    """TP size N (1 = single process)."""
    rank: int
    """This rank's TP index."""
    q_heads: tuple[int, int]
    """[start, end) of the query heads computed here."""
    kv_heads: tuple[int, int]
    """[start, end) of the kv heads held here (replicated when n_kv_heads < N)."""
    kv_index: tuple[int, ...]
    """For each local q head, its local kv head."""
    ffn: tuple[int, int]
    """[start, end) of the MLP intermediate columns."""
    o_cols: tuple[int, int]
    """[start, end) of o_proj input columns (of D) held: D/N, D/otp or all of D."""
    experts: tuple[int, int] = (0, 0)
    """MoE: [start, end) of the experts held (all of them, or E/N under expert parallelism)."""
    expert_ffn: tuple[int, int] = (0, 0)
    """MoE: [start, end) of each held expert's inner columns (I/N, or all of I under EP)."""

    @classmethod
    def build(cls, args: ModelArgs, tp: int, rank: int, otp: int = 0,
              expert_parallel: bool = False) -> TPPlan:
        """Split `args` over `tp` ranks; otp > 0 means FlashComm2 (W_o slice of its odp group);
        expert_parallel: MoE ranks hold E/N whole experts instead of 1/N of every expert."""
        if args.n_heads % tp or args.intermediate_size % tp or (
                args.n_kv_heads % tp and tp % args.n_kv_heads):
            ok = [n for n in range(1, args.n_heads + 1) if not args.n_heads % n
                  and not args.intermediate_size % n
                  and not (args.n_kv_heads % n and n % args.n_kv_heads)]
            raise ConfigError(
                f"tp={tp} (--nproc): this model splits over tp in {ok} (num_attention_heads="
                f"{args.n_heads}, num_key_value_heads={args.n_kv_heads} and intermediate_size="
                f"{args.intermediate_size} must divide evenly)")
        hq = args.n_heads // tp
        group = args.n_heads // args.n_kv_heads  # q heads per kv head
        q0, q1 = rank * hq, (rank + 1) * hq
        kv0, kv1 = q0 // group, (q1 - 1) // group + 1
        kv_index = tuple(q // group - kv0 for q in range(q0, q1))
        ff = args.intermediate_size // tp
        d = args.q_dim
        if otp:  # FlashComm2: odp group j = rank // odp holds rows j of W_o's otp split
            j, width = rank // (tp // otp), d // otp
            o_cols = (j * width, (j + 1) * width)
        else:
            o_cols = (rank * d // tp, (rank + 1) * d // tp)
        experts, expert_ffn = expert_split(args, tp, rank, expert_parallel)
        return cls(tp, rank, (q0, q1), (kv0, kv1), kv_index, (rank * ff, (rank + 1) * ff), o_cols,
                   experts, expert_ffn)

    @property
    def n_q(self) -> int:
        """Local query heads."""
        return self.q_heads[1] - self.q_heads[0]

    @property
    def n_kv(self) -> int:
        """Local kv heads."""
        return self.kv_heads[1] - self.kv_heads[0]


@dataclass(frozen=True)
class TPContext:
    """Everything a forward needs about parallelism; one per rank, passed explicitly."""

    cfg: FlashCommConfig
    """The strategy knobs (tp, flashcomm2_otp, flashcomm1, layer_sharding, comm_dtype)."""
    groups: ParallelGroups | None = None
    """This rank's process groups; None for the single-process reference."""
    counter: comm.CommCounter | None = None
    """Bytes moved by this rank's collectives."""
    o_series: ShardedSeries | GatheredSeries | None = None
    """The layer-sharded o_proj weights, owner or gather source (None when not layer-sharded)."""

    def __post_init__(self) -> None:
        if self.cfg.flashcomm2_min_tokens == AUTO:
            raise ConfigError("flashcomm2_min_tokens='auto': resolve it to a threshold before "
                              "building the model (flashcomm.plan.auto.resolve_auto)")

    @property
    def tp_group(self) -> GroupHandle | None:
        """The TP group, or None when single-process."""
        return None if self.groups is None else self.groups.tp

    @property
    def flashcomm1(self) -> bool:
        """Whether the residual stream is token-chunked between layers."""
        return self.groups is not None and self.cfg.flashcomm1


# ---- modules ---------------------------------------------------------------------------------


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


class TransformerBlock(nn.Module):
    """Pre-norm decoder layer: attention then MLP, each with a residual."""

    def __init__(self, args: ModelArgs, plan: TPPlan, layer_idx: int, sharded_o: bool,
                 cache_idx: int | None = None) -> None:
        super().__init__()
        if args.is_mla:  # DeepSeek's latent attention builds on Attention's o_proj path
            from flashcomm.models.mla import MLAAttention
            self.attention = MLAAttention(args, plan, layer_idx, sharded_o, cache_idx)
        else:
            self.attention = Attention(args, plan, layer_idx, sharded_o, cache_idx)
        moe = DeepSeekMoE if args.model_type == "deepseek_v3" else MoEFeedForward
        is_moe = layer_idx in args.moe_layers
        self.feed_forward = moe(args, plan) if is_moe else FeedForward(args, plan)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, h: Tensor, step: Step, cache: KVCache, ctx: TPContext) -> Tensor:
        """h [T, H], or this rank's chunk [T_pad/N, H] with FlashComm1 -> same layout."""
        t, group = step.num_tokens, ctx.tp_group
        x = self.attention_norm(h)
        if ctx.flashcomm1:
            x = comm.all_gather_tokens(x, t, group, ctx.counter)  # [T, H]
        h = h + self.attention(x, step, cache, ctx)
        x = self.ffn_norm(h)
        if getattr(self.feed_forward, "expert_parallel", False):  # EP: its own token exchange
            return h + self.feed_forward.forward_ep(x, t, ctx)  # same layout as h
        if ctx.flashcomm1:
            x = comm.all_gather_tokens(x, t, group, ctx.counter)
        y = self.feed_forward(x)  # [T, H] partial sums
        if ctx.flashcomm1:
            y = comm.reduce_scatter_tokens(y, group, ctx.counter)  # [T_pad/N, H]
        elif group is not None:
            y = comm.all_reduce(y, group, ctx.counter)
        if self.feed_forward.w2_bias is not None:
            y = y + self.feed_forward.w2_bias
        return h + y


class Transformer(nn.Module):
    """The decoder layers of one pipeline stage (all of them when pp = 1); embeddings on the
    first stage, final norm and lm_head on the last, replicated on every TP rank."""

    def __init__(self, args: ModelArgs, plan: TPPlan, ctx: TPContext,
                 layer_range: range | None = None) -> None:
        super().__init__()
        self.args, self.plan, self.ctx = args, plan, ctx
        self.layer_range = range(args.n_layers) if layer_range is None else layer_range
        self.first = self.layer_range.start == 0
        self.last = self.layer_range.stop == args.n_layers
        sharded_o = ctx.o_series is not None
        start = self.layer_range.start
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim) if self.first else None
        self.layers = nn.ModuleList(  # local index i - start; state dict keys layers.<local>
            TransformerBlock(args, plan, i, sharded_o, i - start) for i in self.layer_range
        )
        self.norm = RMSNorm(args.dim, args.norm_eps) if self.last else None
        tied = args.tie_word_embeddings and self.first  # a last stage alone reads its own copy
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False) \
            if self.last and not tied else None
        self.inv_freq = rope_inv_freq(args)  # plain attribute: not a weight, never loaded

    @property
    def anchor(self) -> Tensor:
        """A weight every stage holds: its device and dtype are the model's."""
        return self.layers[0].attention_norm.weight

    def forward(self, tokens: Tensor, step: Step, cache: KVCache) -> Tensor:
        """tokens [T] -> float logits [R, V] of step.logit_rows (all T rows if None); a single
        stage only (models/pipeline.py runs several)."""
        if not (self.first and self.last):
            raise RuntimeError(f"layers {self.layer_range.start}..{self.layer_range.stop - 1}: "
                               "one pipeline stage; run it with flashcomm.models.pipeline.forward")
        return self.head(self.run_layers(self.embed(tokens), step, cache), step)

    def embed(self, tokens: Tensor) -> Tensor:
        """First stage: tokens [T] -> h [T, H], or this rank's chunk [T_pad/N, H] (FlashComm1)."""
        h = self.tok_embeddings(tokens)  # [T, H]
        return token_chunk(h, self.ctx.tp_group) if self.ctx.flashcomm1 else h

    def run_layers(self, h: Tensor, step: Step, cache: KVCache) -> Tensor:
        """This stage's layers: h [T, H] (or [T_pad/N, H] with FlashComm1) -> same layout."""
        if step.cos is None:
            raise ValueError("step has no RoPE tables: build it with Transformer.step")
        for layer in self.layers:
            h = layer(h, step, cache, self.ctx)
        return h

    def head(self, h: Tensor, step: Step) -> Tensor:
        """Last stage: h [T, H] (or [T_pad/N, H]) -> float logits [R, V] of step.logit_rows."""
        ctx = self.ctx
        if ctx.flashcomm1:
            h = comm.all_gather_tokens(self.norm(h), step.num_tokens, ctx.tp_group, ctx.counter)
        if step.logit_rows is not None:
            h = h[step.logit_rows]
        if not ctx.flashcomm1:
            h = self.norm(h)
        w = self.tok_embeddings.weight if self.output is None else self.output.weight
        return F.linear(h, w).float()

    def step(self, starts: list[int], counts: list[int], last_only: bool = True) -> Step:
        """A Step for this model (its device, dtype, RoPE and attention windows): sequence b
        adds counts[b] tokens after its first starts[b]; logits of the last ones only."""
        w = self.anchor
        windows = tuple(layer.attention.window for layer in self.layers)
        return Step.build(starts, counts, w.device, last_only, inv_freq=self.inv_freq,
                          dtype=w.dtype, windows=windows)

    def allocate_cache(self, batch: int, max_len: int) -> KVCache:
        """Zeroed KV buffers for `batch` sequences of up to `max_len` positions, this rank's
        kv heads and this stage's layers, in the weights' dtype and device."""
        w = self.anchor
        shape = (batch, max_len, self.plan.n_kv, self.args.head_dim)
        k_shape, v_shape = shape, shape
        if self.args.is_mla:  # the latent [B, S, kv_lora] and the rope key [B, S, rope] (mla.py)
            k_shape = (batch, max_len, self.args.kv_lora_rank)
            v_shape = (batch, max_len, self.args.qk_rope_head_dim)
        n = len(self.layers)  # this stage's layers only
        return KVCache([torch.zeros(k_shape, dtype=w.dtype, device=w.device) for _ in range(n)],
                       [torch.zeros(v_shape, dtype=w.dtype, device=w.device) for _ in range(n)])

    def init_buffers(self, device: torch.device) -> None:
        """Move the non-weight index tensors (RoPE frequencies, kv head map) to `device`."""
        self.inv_freq = self.inv_freq.to(device)
        for layer in self.layers:
            if isinstance(layer.attention, Attention):  # MLA has no kv head map
                layer.attention.kv_index = layer.attention.kv_index.to(device)

    def o_proj_bytes(self) -> int:
        """Resident o_proj weight bytes on this rank (the series' ring included)."""
        if self.ctx.o_series is not None:
            return self.ctx.o_series.stats().resident_bytes
        return sum(b.attention.wo.nbytes for b in self.layers)

    def weight_bytes(self) -> int:
        """Every resident weight byte on this rank (parameters plus the o_proj series)."""
        params = sum(p.nbytes for p in self.parameters())
        series = self.ctx.o_series.stats().resident_bytes if self.ctx.o_series else 0
        return params + series
