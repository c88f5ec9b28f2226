"""DeepSeek-V3's MoE MLP: a sigmoid router with group-limited top-k and the noaux_tc bias, the
routed experts dispatched by moe.py, plus shared experts every token passes through.

Routing (transformers' DeepseekV3TopkRouter, in fp32): scores = sigmoid(x W_g^T) [T, E]; the
choice adds e_score_correction_bias (it picks experts, it never weighs them); the E experts form
n_group groups, a group scores the sum of its two best choices, and a token picks its top-k among
the experts of its topk_group best groups only. Its weights are the plain sigmoid scores of the
picked experts, renormalised (norm_topk_prob) and times routed_scaling_factor.

TP: the router (weight and bias) is replicated and loaded in fp32, as transformers keeps it; the
routed experts are moe.py's (TP slices of every expert, or floor(E/N) whole ones, one more on the
first E mod N ranks, under expert parallelism); the shared experts (one SwiGLU of inner size
n_shared * moe_intermediate_size) are split over the TP ranks like the dense MLP, so their
partial sum joins the routed one in the block's reduction. Under expert parallelism the routed
output is already complete, so the shared partial sum is reduced on its own (all-reduce;
all-gather + reduce-scatter under FlashComm1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flashcomm import comm
from flashcomm.knobs import ConfigError
from flashcomm.model_args import ModelArgs
from flashcomm.models.moe import Expert, MoEFeedForward
from flashcomm.models.parallel import TPContext, TPPlan

TensorRow = tuple[str, str, tuple[int, ...], int, "tuple[int, int] | None", "torch.dtype | None"]
"""(checkpoint name under mlp., parameter name under feed_forward., full shape, sliced dim,
[start, end) this rank reads or None, dtype to load in or None for the model's)."""


def shared_cols(args: ModelArgs, plan: TPPlan) -> tuple[int, int]:
    """[start, end) of the shared experts' inner columns this rank holds (1/N of them)."""
    inner = args.moe_intermediate_size * args.n_shared_experts
    if inner % plan.tp:
        raise ConfigError(
            f"tp={plan.tp}: the shared experts' inner size n_shared_experts * "
            f"moe_intermediate_size = {inner} is not divisible by tp; allowed tp: "
            f"{[n for n in range(1, min(inner, 64) + 1) if not inner % n]}")
    return plan.rank * inner // plan.tp, (plan.rank + 1) * inner // plan.tp


def deepseek_moe_tensors(args: ModelArgs, plan: TPPlan) -> list[TensorRow]:
    """One MoE layer's router bias and shared experts, with this rank's part (the router weight
    and the routed experts are moe.py's, as for every MoE model)."""
    h, cols = args.dim, shared_cols(args, plan)
    inner = args.moe_intermediate_size * args.n_shared_experts
    out: list[TensorRow] = [("gate.e_score_correction_bias", "e_score_correction_bias",
                             (args.n_experts,), 0, None, torch.float32)]
    if args.n_shared_experts:
        p, t = "shared_experts.", "shared."
        out += [(p + "gate_proj.weight", t + "w1.weight", (inner, h), 0, cols, None),
                (p + "up_proj.weight", t + "w3.weight", (inner, h), 0, cols, None),
                (p + "down_proj.weight", t + "w2.weight", (h, inner), 1, cols, None)]
    return out


class DeepSeekMoE(MoEFeedForward):
    """moe.py's routed experts behind DeepSeek's router, plus this rank's slice of the shared
    experts."""

    def __init__(self, args: ModelArgs, plan: TPPlan) -> None:
        super().__init__(args, plan)
        self.n_group, self.topk_group = args.n_group, args.topk_group
        self.scaling = args.routed_scaling_factor
        self.e_score_correction_bias = nn.Parameter(torch.zeros(args.n_experts))
        lo, hi = shared_cols(args, plan)
        self.shared = Expert(args.dim, hi - lo) if args.n_shared_experts else None

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [T, H] -> (fp32 weights [T, k], expert ids [T, k]), group-limited."""
        t, e = x.shape[0], self.n_experts  # t may be 0 (a rank's empty chunk under EP)
        scores = F.linear(x.float(), self.gate.weight.float()).sigmoid()  # [T, E]
        choice = scores + self.e_score_correction_bias.float()  # [T, E]
        groups = choice.view(t, self.n_group, e // self.n_group)  # [T, G, E/G]
        best = groups.topk(2, dim=-1).values.sum(-1)  # [T, G]: each group's two best
        picked = best.topk(self.topk_group, dim=-1, sorted=False).indices  # [T, topk_group]
        keep = torch.zeros_like(best, dtype=torch.bool).scatter_(1, picked, True)  # [T, G]
        choice = choice.masked_fill(~keep[:, :, None].expand_as(groups).reshape(t, e),
                                    float("-inf"))
        ids = choice.topk(self.top_k, dim=-1, sorted=False).indices  # [T, k]
        weights = scores.gather(1, ids)  # [T, k]: the bias picks, the plain scores weigh
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, ids

    def forward(self, x: Tensor) -> Tensor:
        """TP experts: x [T, H] -> partial [T, H] of the routed and the shared experts."""
        y = super().forward(x)  # [T, H]
        return y if self.shared is None else y + self.shared(x)

    def forward_ep(self, x: Tensor, num_tokens: int, ctx: TPContext) -> Tensor:
        """Expert parallel: x [T, H] (or this rank's chunk [T_pad/N, H] under FlashComm1) ->
        the complete output in the same layout; the shared partial sums reduced here."""
        y = super().forward_ep(x, num_tokens, ctx)
        if self.shared is None:
            return y
        group, counter = ctx.tp_group, ctx.counter
        if ctx.flashcomm1:
            full = comm.all_gather_tokens(x, num_tokens, group, counter)  # [T, H]
            return y + comm.reduce_scatter_tokens(self.shared(full), group, counter)
        return y + comm.all_reduce(self.shared(x), group, counter)
