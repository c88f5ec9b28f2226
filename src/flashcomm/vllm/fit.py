"""flashcomm2_min_tokens=auto inside vLLM: the FlashComm2 threshold from the cost model.

With profile='fit' (the default) every worker measures, at start-up, the collectives each path
really runs inside vLLM, then fits an alpha-beta HardwareProfile to them:
- row-parallel path: vLLM's TP all-reduce (SHM on CPU, custom all-reduce on GPUs);
- FlashComm2 path: the exchange the op uses (vLLM's TP all-gather or our odp all-to-all, see
  `choose_exchange`), the otp reduce-scatter when otp > 1, and vLLM's TP all-gather that
  restores [T, H].
Bytes per call are the cost model's logical bytes (costmodel.layer_traffic), so fit and model
agree on units; times are the slowest rank's (all-reduced with MAX), so every rank fits the same
profile. `plan.auto.auto_min_tokens` then finds the crossover T, and TP rank 0 broadcasts it so
every rank takes the same path at every step. Collective over the TP group.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from flashcomm import comm
from flashcomm.plan.auto import FIT, auto_min_tokens, load_profile
from flashcomm.plan.costmodel import HardwareProfile, OpCost, fit_op
from flashcomm.vllm import ops

ROWS = (1, 16, 128, 1024, 4096)
"""Step sizes T sampled: decode-sized ones fix alpha, prefill-sized ones the bandwidth."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def op_calls(ctx: Any, tp: Any, rows: int, hidden: int, q_dim: int, dtype: torch.dtype,
             device: torch.device) -> dict[str, tuple[int, float, Callable[[], object]]]:
    """op -> (group size, logical bytes per rank, call) at `rows` tokens, for each collective
    either o_proj path issues."""
    n, otp, odp = ctx.cfg.tp, ctx.cfg.flashcomm2_otp, ctx.cfg.odp
    t_pad = comm.padded_tokens(rows, n)
    e = torch.empty((), dtype=dtype).element_size()
    x_h = torch.zeros(t_pad, hidden, dtype=dtype, device=device)  # [T_pad, H]
    chunk = torch.zeros(t_pad // n, hidden, dtype=dtype, device=device)  # [T_pad/N, H]
    x_dn = torch.zeros(t_pad, q_dim // n, dtype=dtype, device=device)  # [T_pad, D/N]
    if ctx.exchange == "all_gather":
        def exchange() -> object:
            return ops.exchange_all_gather(x_dn, tp)
    else:
        def exchange() -> object:
            return comm.all_to_all(x_dn, ctx.groups.odp)
    group = ctx.groups.tp
    calls = {
        "all_reduce": (n, 2 * (n - 1) * t_pad // n * hidden * e, lambda: tp.all_reduce(x_h)),
        "all_gather": (n, (n - 1) * t_pad // n * hidden * e, lambda: tp.all_gather(chunk, 0)),
        "all_to_all": (odp, (odp - 1) * t_pad // odp * (q_dim // n) * e, exchange),
        "broadcast": (n, t_pad * hidden * e,
                      lambda: dist.broadcast(x_h, src=group.global_rank(0), group=group.group)),
    }
    if otp > 1:
        y = torch.zeros(otp * (t_pad // n), hidden, dtype=dtype, device=device)  # [otp*c, H]
        calls["reduce_scatter"] = (otp, (otp - 1) * t_pad // n * hidden * e,
                                   lambda: comm.reduce_scatter_tokens(y, ctx.groups.otp))
    return calls


def fit_vllm_profile(ctx: Any, tp: Any, hidden: int, q_dim: int, dtype: torch.dtype, *,
                     rows: tuple[int, ...] = ROWS, rounds: int = 5, calls: int = 3,
                     matmul_size: int = 512) -> HardwareProfile:
    """Time every op of `op_calls` at each size; fit per-group-size OpCosts (collective)."""
    device = tp.device
    group = ctx.groups.tp.group
    t_start = time.perf_counter()
    keys: list[tuple[str, int, int]] = []
    times: list[list[float]] = []  # [sample][round]
    for r in rows:
        for op, (size, nbytes, fn) in op_calls(ctx, tp, r, hidden, q_dim, dtype, device).items():
            fn()  # warm-up
            samples = []
            for _ in range(rounds):
                _sync(device)
                dist.barrier(group=group)
                t0 = time.perf_counter()
                for _ in range(calls):  # back to back, as a step issues them
                    fn()
                _sync(device)
                samples.append((time.perf_counter() - t0) / calls)
            keys.append((op, size, nbytes))
            times.append(samples)
    a = torch.randn(matmul_size, matmul_size, device=device).to(dtype)  # [M, M]
    samples = []
    for _ in range(rounds):
        _sync(device)
        t0 = time.perf_counter()
        a @ a
        _sync(device)
        samples.append(time.perf_counter() - t0)
    times.append(samples)
    slowest = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)  # same samples on every rank
    measured = [statistics.median(s) for s in slowest.tolist()]
    per_tp: dict[int, dict[str, OpCost]] = {}
    for op, size in dict.fromkeys((op, size) for op, size, _ in keys):
        pts = [(float(b), t) for (o, s, b), t in zip(keys, measured, strict=False)
               if (o, s) == (op, size)]
        per_tp.setdefault(size, {})[op] = fit_op(pts, relative=True)
    default = {op: c for m in sorted(per_tp, key=lambda s: s == ctx.cfg.tp)
               for op, c in per_tp[m].items()}
    return HardwareProfile(
        name=f"vllm-fit-N{ctx.cfg.tp}", ops=default,
        matmul_flops_per_s=2.0 * matmul_size**3 / measured[-1], per_tp=per_tp,
        source=(f"fitted in a vLLM worker: all_reduce/all_gather = vLLM's TP group "
                f"({type(tp.device_communicator).__name__}), all_to_all = {ctx.exchange}, "
                f"rows {list(rows)}, {rounds} rounds x {calls} calls, "
                f"{time.perf_counter() - t_start:.1f} s"))


def resolve_auto(ctx: Any) -> tuple[int | None, dict[str, Any]]:
    """The agreed threshold for flashcomm2_min_tokens='auto' (None: FlashComm2 never wins) and
    what it came from; collective over the TP group when fitting or agreeing."""
    tp = ctx.tp_coordinator()
    hidden, d_otp = ctx.o_proj_shape
    q_dim = d_otp * ctx.cfg.flashcomm2_otp
    elt = torch.empty((), dtype=ctx.dtype).element_size()
    if ctx.cfg.profile == FIT:
        profile = fit_vllm_profile(ctx, tp, hidden, q_dim, ctx.dtype)
    else:
        profile = load_profile(ctx.cfg.profile)
    found = auto_min_tokens(hidden, q_dim, ctx.cfg, profile, elt)
    agreed = torch.tensor([-1 if found is None else found], dtype=torch.int64)
    group = ctx.groups.tp
    if group.group is not None:  # every rank must take the same path at every step
        dist.broadcast(agreed, src=group.global_rank(0), group=group.group)
    threshold = None if int(agreed) < 0 else int(agreed)
    return threshold, {"profile": profile.name, "source": profile.source,
                       "flashcomm2_min_tokens": threshold, "costs": profile.to_dict()}
