"""Pipeline parallelism for the engine: the layers of this rank's stage, and one forward step
across the stages.

Stage s holds layers `stage_layers(L, pp, pp_layer_partition)[s]`, split exactly as vLLM's
get_pp_indices splits them (flashcomm.layout). Embeddings live on the first stage, the final
norm and lm_head on the last. One step:
  * the first stage embeds the tokens; every other stage receives its hidden states from the
    previous stage by point-to-point recv over its PP group (the same TP index, the same DP
    replica): [T, H], or under FlashComm1 this TP rank's token chunk [T_pad/N, H];
  * each stage runs its layers and sends the result to the next stage;
  * the last stage computes the logits, picks the next tokens (the engine does) and broadcasts
    them over its PP group, so every rank feeds the same ids to the next step.
A single batch is in flight: stage s+1 works on a step only after stage s is done with it, so
the stages take turns (no micro-batch pipelining). The receiver knows the shape from the step
(T and FlashComm1 are the same on every rank), so no shape message precedes the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from flashcomm.comm import CommCounter, padded_tokens
from flashcomm.config import FlashCommConfig
from flashcomm.groups import GroupHandle, ParallelGroups
from flashcomm.layout import check_prefetch_step, stage_layers
from flashcomm.model_args import ModelArgs
from flashcomm.models.step import KVCache, Step
from flashcomm.models.transformer import Transformer


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: its index among `count` stages and its layers."""

    index: int
    """Stage index s (the rank's PP coordinate)."""
    count: int
    """Number of stages (pp)."""
    layers: range
    """Absolute indices of the decoder layers this stage holds."""

    @property
    def first(self) -> bool:
        """Whether this stage embeds the tokens."""
        return self.index == 0

    @property
    def last(self) -> bool:
        """Whether this stage holds the final norm and lm_head."""
        return self.index == self.count - 1


def stage_ranges(args: ModelArgs, cfg: FlashCommConfig) -> list[range]:
    """Every stage's layers, validated before any collective: pp <= L, a pp_layer_partition
    (VLLM_PP_LAYER_PARTITION) that adds up to L, and for a layer-sharded o_proj
    0 <= prefetch_step <= L_s - 2 on every stage (ConfigError naming the stage and its range)."""
    ranges = stage_layers(args.n_layers, cfg.pp, cfg.pp_layer_partition)
    if "o_proj" in cfg.layer_sharding:
        check_prefetch_step(cfg.prefetch_step, ranges)
    return ranges


def stage_of(args: ModelArgs, cfg: FlashCommConfig, groups: ParallelGroups | None) -> Stage:
    """This rank's stage (the whole model for the single-process reference)."""
    if groups is None:
        return Stage(0, 1, range(args.n_layers))
    s = groups.layout.coords(groups.rank).pp
    return Stage(s, cfg.pp, stage_ranges(args, cfg)[s])


def hidden_shape(model: Transformer, step: Step) -> tuple[int, int]:
    """Shape of the hidden states passed between stages: [T, H] or [T_pad/N, H] (FlashComm1)."""
    t = step.num_tokens
    if model.ctx.flashcomm1:
        n = model.ctx.tp_group.size
        t = padded_tokens(t, n) // n
    return (t, model.args.dim)


def forward(model: Transformer, tokens: Tensor, step: Step, cache: KVCache) -> Tensor | None:
    """One step of this rank's stage: tokens [T] (used by the first stage) -> float logits
    [R, V] on the last stage, None on the others (their hidden states went to the next)."""
    if model.first and model.last:
        return model(tokens, step, cache)
    pp = model.ctx.groups.pp
    if model.first:
        h = model.embed(tokens)  # [T, H] or [T_pad/N, H]
    else:
        h = torch.empty(hidden_shape(model, step), dtype=model.anchor.dtype,
                        device=model.anchor.device)
        dist.recv(h, src=pp.global_rank(pp.rank - 1), group=pp.group)
    h = model.run_layers(h, step, cache)
    if model.last:
        return model.head(h, step)
    send_hidden(h.contiguous(), pp, model.ctx.counter)
    return None


def send_hidden(h: Tensor, pp: GroupHandle, counter: CommCounter | None = None) -> None:
    """Send this stage's output to the next stage (same TP index and replica), counted as
    'pp_send'."""
    dist.send(h, dst=pp.global_rank(pp.rank + 1), group=pp.group)
    if counter is not None:
        counter.add("pp_send", h.numel() * h.element_size())


def share_tokens(nxt: Tensor | None, batch: int, groups: ParallelGroups | None,
                 device: torch.device) -> Tensor:
    """The next token ids [B] on every rank: the last stage's `nxt`, broadcast over the PP
    group (the others pass None)."""
    if groups is None or groups.pp.group is None:
        if nxt is None:
            raise RuntimeError("share_tokens: a single stage must pass its own next tokens")
        return nxt
    pp = groups.pp
    if nxt is None:
        nxt = torch.empty(batch, dtype=torch.long, device=device)
    dist.broadcast(nxt, src=pp.global_rank(pp.size - 1), group=pp.group)
    return nxt
