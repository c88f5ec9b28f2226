"""Replays of a strategy's collectives with no compute, for communication-only timings.

The closures call the same flashcomm.comm functions, on the same groups and shapes, as the
model's forward (models/transformer.py) and flashcomm2_o_proj, so a replay times exactly the
communication a step issues (the calls flashcomm.plan.costmodel.step_calls predicts), without the
matmuls that dominate step time on CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flashcomm import comm
from flashcomm.config import CommDtype
from flashcomm.groups import ParallelGroups
from flashcomm.plan.strategy import Strategy


def attn_out_replay(groups: ParallelGroups, s: Strategy, h: int, d: int,
                    t: int) -> Callable[[], None]:
    """Collectives of path `s`'s attention output, from [T, D/N] until every rank holds [T, H]
    again (FlashComm1's later all-gather included)."""
    tp, n = groups.tp, groups.tp.size
    otp, flashcomm1 = s.otp, s.flashcomm1
    t_pad = comm.padded_tokens(t, n)
    c = t_pad // n
    full = torch.zeros(t, h)  # [T, H] partial sums (zeros: repeated in-place sums stay finite)
    chunk = torch.zeros(c, h)  # [T_pad/N, H]
    if otp:
        dn = d // n
        payload = (torch.zeros(t_pad, dn + 4, dtype=torch.int8) if s.comm_dtype == CommDtype.INT8
                   else torch.zeros(t_pad, dn))  # [T_pad, D/N] (+4 fp32-scale bytes per row)
        partial = torch.zeros(otp * c, h)  # [otp*T_pad/N, H] before the otp reduce-scatter

    def run() -> None:
        if not otp:
            if flashcomm1:
                comm.reduce_scatter_tokens(full, tp)
            else:
                comm.all_reduce(full, tp)
        else:
            comm.all_to_all(payload, groups.odp)
            if otp > 1:
                comm.reduce_scatter_tokens(partial, groups.otp)
        if otp or flashcomm1:
            comm.all_gather_tokens(chunk, t, tp)

    return run


def step_replay(groups: ParallelGroups, s: Strategy, h: int, d: int, t: int,
                n_layers: int) -> Callable[[], None]:
    """Collectives of one whole forward step on path `s`: per layer the attention-output path
    and the MLP's all-reduce (or FlashComm1's reduce-scatter + all-gather before the next
    layer), plus FlashComm1's final all-gather before the LM head."""
    tp, flashcomm1 = groups.tp, s.flashcomm1
    attn = attn_out_replay(groups, s, h, d, t)
    full = torch.zeros(t, h)  # [T, H]
    chunk = torch.zeros(comm.padded_tokens(t, tp.size) // tp.size, h)  # [T_pad/N, H]

    def run() -> None:
        for _ in range(n_layers):
            attn()
            if flashcomm1:
                comm.reduce_scatter_tokens(full, tp)
                comm.all_gather_tokens(chunk, t, tp)
            else:
                comm.all_reduce(full, tp)
        if flashcomm1:
            comm.all_gather_tokens(chunk, t, tp)

    return run
