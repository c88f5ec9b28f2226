"""flashcomm2_min_tokens=auto inside vLLM: the FlashComm2 threshold from the cost model.

With profile='fit' (the default) every worker measures, at start-up, the collectives each path
really runs inside vLLM, then fits an alpha-beta HardwareProfile to them:
- row-parallel path: vLLM's TP all-reduce (SHM on CPU, custom all-reduce on GPUs);
- FlashComm2 path: the all-to-all, the otp reduce-scatter when otp > 1 and the all-gather that
  restores [T, H], each in the implementation `choose_impl` kept. It times both candidates of
  each (vLLM's TP group: SHM on CPU, its device communicator on GPUs; or ours, comm.py on our
  groups) in the same workers at start-up and keeps the faster: which one wins depends on the
  machine (SHM busy-waits, so it loses to gloo on oversubscribed cores, see BENCHMARKS.md).
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
CHOICE_ROWS = (16, 4096)
"""Step sizes at which the two implementations of an op are compared (choose_impl): a decode
step, and a prefill step as large as the largest vLLM schedules (max_num_batched_tokens, at most
4096 rows), so the prefill-sized sample is the size FlashComm2 steps really run at."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


Call = tuple[str, int, int, Callable[[], object]]
"""(cost-model op, group size, logical bytes sent per rank, the call)."""


def candidate_calls(ctx: Any, tp: Any, rows: int, hidden: int, q_dim: int,
                    dtype: torch.dtype, device: torch.device) -> dict[str, Call]:
    """Every implementation of every collective the two o_proj paths can issue, at `rows`
    tokens, named 'op/impl': 'vllm' = vLLM's TP GroupCoordinator, 'ours' = our groups."""
    n, otp, odp = ctx.cfg.tp, ctx.cfg.flashcomm2_otp, ctx.cfg.odp
    t_pad = comm.padded_tokens(rows, n)
    e = torch.empty((), dtype=dtype).element_size()
    x_h = torch.zeros(t_pad, hidden, dtype=dtype, device=device)  # [T_pad, H]
    chunk = torch.zeros(t_pad // n, hidden, dtype=dtype, device=device)  # [T_pad/N, H]
    x_dn = torch.zeros(t_pad, q_dim // n, dtype=dtype, device=device)  # [T_pad, D/N]
    g = ctx.groups
    ag_bytes = (n - 1) * t_pad // n * hidden * e
    a2a_bytes = (odp - 1) * t_pad // odp * (q_dim // n) * e
    calls: dict[str, Call] = {
        "all_reduce/vllm": ("all_reduce", n, 2 * ag_bytes, lambda: tp.all_reduce(x_h)),
        "all_gather/vllm": ("all_gather", n, ag_bytes, lambda: tp.all_gather(chunk, 0)),
        "all_gather/ours": ("all_gather", n, ag_bytes,
                            lambda: comm.all_gather_tokens(chunk, t_pad, g.tp)),
        "all_to_all/ours": ("all_to_all", odp, a2a_bytes, lambda: comm.all_to_all(x_dn, g.odp)),
        "broadcast/ours": ("broadcast", n, t_pad * hidden * e,
                           lambda: dist.broadcast(x_h, src=g.tp.global_rank(0), group=g.tp.group)),
    }
    if otp == 1:
        calls["all_to_all/vllm"] = ("all_to_all", odp, a2a_bytes,
                                    lambda: ops.exchange_all_gather(x_dn, tp))
    else:
        y = torch.zeros(otp * (t_pad // n), hidden, dtype=dtype, device=device)  # [otp*c, H]
        calls["reduce_scatter/ours"] = ("reduce_scatter", otp, (otp - 1) * t_pad // n * hidden * e,
                                        lambda: comm.reduce_scatter_tokens(y, g.otp))
    return calls


def used_calls(ctx: Any) -> tuple[str, ...]:
    """The implementations the o_proj op issues under ctx.impl (what 'fit' must time)."""
    rs = ("reduce_scatter/ours",) if ctx.cfg.flashcomm2_otp > 1 else ()
    return ("all_reduce/vllm", f"all_gather/{ctx.impl['all_gather']}",
            f"all_to_all/{ctx.impl['all_to_all']}", "broadcast/ours", *rs)


def choose_impl(ctx: Any, rows: tuple[int, ...] = CHOICE_ROWS, rounds: int = 3
                ) -> tuple[dict[str, str], dict[str, float]]:
    """Time both implementations of FlashComm2's all-to-all and all-gather at a decode- and a
    prefill-sized step (no larger than the largest step vLLM schedules); keep, per op, the one
    with the smaller total (same on every rank)."""
    if ctx.max_step_tokens:
        rows = tuple(sorted({min(r, ctx.max_step_tokens) for r in rows}))
    tp = ctx.tp_coordinator()
    hidden, d_otp = ctx.o_proj_shape
    names = ("all_gather/vllm", "all_gather/ours", "all_to_all/ours")
    if ctx.cfg.flashcomm2_otp == 1 and ctx.cfg.comm_dtype == "auto":
        names += ("all_to_all/vllm",)
    samples = time_calls(ctx, tp, names, hidden, d_otp * ctx.cfg.flashcomm2_otp, ctx.dtype,
                         rows=rows, rounds=rounds, calls=2)
    total: dict[str, float] = {}
    for name, _, _, t in samples:
        total[name] = total.get(name, 0.0) + t
    impl = {op: min((n for n in total if n.startswith(op + "/")), key=total.get).split("/")[1]
            for op in ("all_to_all", "all_gather")}
    return impl, total


def time_calls(ctx: Any, tp: Any, names: tuple[str, ...], hidden: int, q_dim: int,
               dtype: torch.dtype, *, rows: tuple[int, ...] = ROWS, rounds: int = 5,
               calls: int = 3) -> list[tuple[str, int, Call, float]]:
    """(name, rows, call, seconds): the least over `rounds` x `calls` samples of the slowest
    rank's time for one call issued right after a barrier (collective: every rank gets the same
    numbers). One call per sample, as a step issues each collective once between computes:
    back-to-back calls of the same op overlap one call's tail with the next one's head, and
    across two emulated hosts that made gloo's all-to-all look 1.7 ms a call instead of 2.9 ms,
    so `auto` put FlashComm2 on decode steps where it cost 12 % (BENCHMARKS.md, two hosts).
    The least, not the median: other processes only ever add time, and on a shared 2-core
    machine a spike in one op's rounds moved the median enough to put the threshold at 39
    tokens in one start-up and never in the next."""
    device, group = tp.device, ctx.groups.tp.group
    keys: list[tuple[str, int, Call]] = []
    times: list[list[float]] = []  # [sample][round]
    for r in rows:
        every = candidate_calls(ctx, tp, r, hidden, q_dim, dtype, device)
        for name in names:
            fn = every[name][3]
            fn()  # warm-up
            samples = []
            for _ in range(rounds * calls):
                _sync(device)
                dist.barrier(group=group)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                samples.append(time.perf_counter() - t0)
            keys.append((name, r, every[name]))
            times.append(samples)
    slowest = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)  # same samples on every rank
    return [(name, r, call, min(s))
            for (name, r, call), s in zip(keys, slowest.tolist(), strict=True)]


def fit_vllm_profile(ctx: Any, tp: Any, hidden: int, q_dim: int, dtype: torch.dtype, *,
                     rows: tuple[int, ...] = ROWS, rounds: int = 5, calls: int = 3,
                     matmul_size: int = 512) -> HardwareProfile:
    """Time the collectives the op issues at each size; fit per-group-size OpCosts
    (collective)."""
    t_start = time.perf_counter()
    samples = time_calls(ctx, tp, used_calls(ctx), hidden, q_dim, dtype, rows=rows,
                         rounds=rounds, calls=calls)
    per_tp: dict[int, dict[str, OpCost]] = {}
    for name in used_calls(ctx):
        pts = [(float(call[2]), t) for n, _, call, t in samples if n == name]
        op, size = next(call[:2] for n, _, call, _ in samples if n == name)
        per_tp.setdefault(size, {})[op] = fit_op(pts, relative=True)
    default = {op: c for m in sorted(per_tp, key=lambda s: s == ctx.cfg.tp)
               for op, c in per_tp[m].items()}
    return HardwareProfile(
        name=f"vllm-fit-N{ctx.cfg.tp}", ops=default,
        matmul_flops_per_s=_matmul_rate(tp, ctx.groups.tp.group, dtype, matmul_size, rounds),
        per_tp=per_tp,
        source=(f"fitted in a vLLM worker: {', '.join(used_calls(ctx))} "
                f"({type(tp.device_communicator).__name__}), rows {list(rows)}, "
                f"{rounds} rounds x {calls} calls, {time.perf_counter() - t_start:.1f} s"))


def _matmul_rate(tp: Any, group: Any, dtype: torch.dtype, size: int, rounds: int) -> float:
    """FLOP/s of a [size, size] matmul, the slowest rank's median."""
    a = torch.randn(size, size, device=tp.device).to(dtype)  # [M, M]
    samples = []
    for _ in range(rounds):
        _sync(tp.device)
        t0 = time.perf_counter()
        a @ a
        _sync(tp.device)
        samples.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(samples)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return 2.0 * size**3 / float(t)


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
