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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flashcomm import comm
from flashcomm.model_args import ModelArgs
from flashcomm.models.deepseek_moe import DeepSeekMoE
from flashcomm.models.layers import Attention, FeedForward, RMSNorm, rope_inv_freq, token_chunk
from flashcomm.models.mla import MLAAttention
from flashcomm.models.moe import MoEFeedForward
from flashcomm.models.parallel import TPContext, TPPlan
from flashcomm.models.step import KVCache, Step


class TransformerBlock(nn.Module):
    """Pre-norm decoder layer: attention then MLP, each with a residual."""

    def __init__(self, args: ModelArgs, plan: TPPlan, layer_idx: int, sharded_o: bool,
                 cache_idx: int | None = None) -> None:
        super().__init__()
        if args.is_mla:  # DeepSeek's latent attention builds on Attention's o_proj path
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
        """Move the non-weight index tensors (RoPE frequencies, kv head map) to `device`; lay
        a resident W_o wider than this rank's heads out column-major."""
        self.inv_freq = self.inv_freq.to(device)
        for layer in self.layers:
            if isinstance(layer.attention, Attention):  # MLA has no kv head map
                attn = layer.attention
                attn.kv_index = attn.kv_index.to(device)
                own = attn.own_cols[1] - attn.own_cols[0]
                if attn.wo is not None and attn.wo.shape[1] > own:
                    # a row-parallel step (auto, a threshold) reads this rank's own D/N columns:
                    # strided rows in row-major took 2x as long as contiguous ones at T = 1-4
                    # (H = D = 1024, one core), column-major makes them one block; FlashComm2's
                    # full GEMM runs as fast either way
                    attn.wo.data = attn.wo.data.t().contiguous().t()

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
