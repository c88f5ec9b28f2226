"""The sparse mixture-of-experts MLP of Qwen3-MoE and Mixtral, tensor- or expert-parallel.

The router (`gate`, [E, H]) is replicated: top-k of the softmax over E experts, renormalised to
sum to 1 where the config asks (`norm_topk_prob`; Mixtral always). The experts are SwiGLU MLPs
held in one of two ways over the N TP ranks (TPPlan.experts / TPPlan.expert_ffn):

  * TP experts (default): every rank holds the inner columns [r*I/N, (r+1)*I/N) of every
    expert's gate/up and the same rows of its down. `forward` returns a partial sum [T, H] that
    the TransformerBlock reduces exactly like the dense MLP's (all-reduce, or reduce-scatter
    under FlashComm1);
  * expert parallel (`expert_parallel` knob): rank r holds whole experts, floor(E/N) of them
    and one more on the first E mod N ranks (vLLM's linear placement, model_args.expert_range;
    6 experts at N = 4: 2, 2, 1, 1). `forward_ep` routes only this rank's token chunk
    [T_pad/N, H] (FlashComm1's chunk, or the rank's slice of the replicated [T, H]), sends every
    (token, expert) row to the expert's owner with one all-to-all over the TP group (split sizes
    per owner, so ranks holding different expert counts exchange alike), runs the rows it
    received through its experts and sends them back with a second all-to-all. The chunk it
    returns is complete (no reduction); without FlashComm1 an all-gather restores [T, H].

Dispatch: the (token, slot) pairs are sorted by expert, and each active expert runs one matmul
chain over all of its rows: the Python loop is over experts, never over tokens. Experts that
receive no row cost nothing.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from flashcomm import comm
from flashcomm.groups import GroupHandle
from flashcomm.model_args import ModelArgs, expert_range
from flashcomm.models.parallel import TPContext, TPPlan

MOE_TENSOR_NAMES = {
    "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
    "deepseek_v3": ("mlp", "gate_proj", "up_proj", "down_proj"),
}
"""model_type -> (MoE block name in the checkpoint, expert gate, up and down projection names)."""


class Expert(nn.Module):
    """One SwiGLU expert (or this rank's inner-column slice of it)."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, inner, bias=False)  # gate_proj
        self.w3 = nn.Linear(dim, inner, bias=False)  # up_proj
        self.w2 = nn.Linear(inner, dim, bias=False)  # down_proj

    def forward(self, x: Tensor) -> Tensor:
        """x [R, H] -> [R, H] (a partial sum when this is an inner-column slice)."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoEFeedForward(nn.Module):
    """Replicated router + this rank's experts (all of them sliced, or some of them whole)."""

    def __init__(self, args: ModelArgs, plan: TPPlan) -> None:
        super().__init__()
        e0, e1 = plan.experts
        self.n_experts, self.top_k, self.first_expert = args.n_experts, args.n_experts_per_tok, e0
        self.norm_topk_prob = args.norm_topk_prob
        # Qwen3-MoE casts the routing weights to the activation dtype, Mixtral keeps them fp32
        self.cast_weights = args.model_type == "qwen3_moe"
        self.expert_parallel = e1 - e0 < args.n_experts
        """Whether this rank holds whole experts (forward_ep) instead of slices of all."""
        self.owned = tuple(b - a for a, b in (expert_range(args.n_experts, plan.tp, i)
                                              for i in range(plan.tp)))
        """Expert parallel: how many experts each TP rank holds, in rank order."""
        self.gate = nn.Linear(args.dim, args.n_experts, bias=False)
        inner = plan.expert_ffn[1] - plan.expert_ffn[0]
        self.experts = nn.ModuleList(Expert(args.dim, inner) for _ in range(e0, e1))
        self.w2_bias = None  # same interface as FeedForward: these experts have no bias

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [T, H] -> (weights [T, k], expert ids [T, k]): top-k of the fp32 softmax."""
        probs = torch.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # [T, E]
        weights, ids = torch.topk(probs, self.top_k, dim=-1)  # [T, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights.to(x.dtype) if self.cast_weights else weights), ids

    def run_experts(self, xs: Tensor, counts: list[int]) -> Tensor:
        """xs [R, H] sorted by local expert, counts[j] rows for expert j -> [R, H]."""
        ys = torch.empty_like(xs)
        start = 0
        for expert, n in zip(self.experts, counts, strict=True):
            if n:  # one matmul chain over every row of this expert
                ys[start:start + n] = expert(xs[start:start + n])
            start += n
        return ys

    def combine(self, ys: Tensor, weights: Tensor, order: Tensor, rows: int) -> Tensor:
        """ys [R, H] of the (token, slot) pairs in `order` -> [rows, H] weighted sums per token."""
        ys = (ys * weights.reshape(-1)[order, None]).to(ys.dtype)  # [R, H]
        return ys.new_zeros(rows, ys.shape[1]).index_add_(0, order // self.top_k, ys)

    def forward(self, x: Tensor) -> Tensor:
        """TP experts: x [T, H] -> partial [T, H] over this rank's inner columns."""
        weights, ids = self.route(x)  # [T, k]
        flat = ids.reshape(-1)  # [T*k] expert of each (token, slot)
        order = flat.argsort(stable=True)  # pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        ys = self.run_experts(x[order // self.top_k], counts)  # [T*k, H]
        return self.combine(ys, weights, order, x.shape[0])

    def forward_ep(self, x: Tensor, num_tokens: int, ctx: TPContext) -> Tensor:
        """Expert parallel: x [T, H] (or this rank's chunk [T_pad/N, H] under FlashComm1) ->
        the complete MoE output in the same layout."""
        group, counter = ctx.tp_group, ctx.counter
        n, r = group.size, group.rank
        c = comm.padded_tokens(num_tokens, n) // n
        valid = max(0, min(c, num_tokens - r * c))  # real tokens in this rank's chunk
        mine = x[:valid] if ctx.flashcomm1 else x[r * c:r * c + valid]  # [v, H]
        weights, ids = self.route(mine)  # [v, k]
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)
        per_expert = torch.bincount(flat, minlength=self.n_experts)  # [E] rows sent per expert
        # how many rows each source sends to each of my experts: [N, E_r]
        recv_counts = _exchange_counts(per_expert, self.owned, group, counter).view(n, -1)
        owner = torch.repeat_interleave(torch.arange(n), torch.tensor(self.owned))  # [E]
        send_splits = per_expert.new_zeros(n).index_add_(  # rows per owner, one host sync
            0, owner.to(per_expert.device), per_expert).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        recv = _all_to_all_rows(mine[order // self.top_k], send_splits, recv_splits, group,
                                counter, "ep_dispatch")  # [R, H]: by source, then by expert
        local = torch.arange(self.owned[r]).repeat(n)  # [N*E_r] my expert of each block
        by_expert = torch.repeat_interleave(local, recv_counts.reshape(-1)).argsort(stable=True)
        by_expert = by_expert.to(x.device)  # [R] received rows grouped by my expert
        ys = torch.empty_like(recv)
        ys[by_expert] = self.run_experts(recv[by_expert], recv_counts.sum(0).tolist())
        back = _all_to_all_rows(ys, recv_splits, send_splits, group, counter,
                                "ep_combine")  # [v*k, H] in `order`
        out = self.combine(back, weights, order, c)  # [c, H]; padding rows stay zero
        if ctx.flashcomm1:
            return out
        return comm.all_gather_tokens(out, num_tokens, group, counter)  # [T, H]


def _exchange_counts(per_expert: Tensor, owned: tuple[int, ...], group: GroupHandle,
                     counter: comm.CommCounter | None) -> Tensor:
    """[E] rows this rank sends per expert, owned[i] experts on member i -> [N * owned[rank]]
    (N blocks): rows each source sends to each of this rank's experts. One small all-to-all,
    then a host sync for the split sizes."""
    mine = owned[group.rank]
    out = per_expert.new_empty(group.size * mine)
    dist.all_to_all_single(out, per_expert, [mine] * group.size, list(owned), group=group.group)
    if counter is not None:
        counter.add("ep_counts", (per_expert.numel() - mine) * per_expert.element_size())
    return out.cpu()


def _all_to_all_rows(x: Tensor, send: list[int], recv: list[int], group: GroupHandle,
                     counter: comm.CommCounter | None, op: str) -> Tensor:
    """Variable-size all-to-all: send[i] rows of x [sum(send), H] to member i -> [sum(recv), H]."""
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=group.group)
    if counter is not None:
        counter.add(op, (sum(send) - send[group.rank]) * math.prod(x.shape[1:]) * x.element_size())
    return out
