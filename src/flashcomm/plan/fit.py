"""Fit an alpha-beta HardwareProfile to a quick micro-benchmark on the current backend.

Every op of costmodel.OPS is timed THROUGH the flashcomm.comm functions the engine calls (so the
fit reflects the primitive comm.py chose for this backend; broadcast is the plain
dist.broadcast that ShardedSeries issues), at a few sizes, on every group size the caller's
ParallelGroups has (TP, plus FlashComm2's odp / otp groups when they differ). Bytes per call are
the CommCounter's logical bytes, i.e. exactly what costmodel.layer_traffic predicts, so the fit
and the model agree on units. Each sample's time is the median over rounds of the slowest
rank's time (all-reduced with MAX), so every rank gets the same samples and the same fit: a
threshold derived from it is identical on every rank (a prerequisite of per-step choice).
The fit minimises relative error, so decode-sized samples fix alpha and large ones bandwidth.
Collective over the group's world: every rank must call fit_profile alike.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from flashcomm import comm
from flashcomm.groups import GroupHandle, ParallelGroups
from flashcomm.plan.costmodel import HardwareProfile, OpCost, fit_op

DEFAULT_ROWS = (1, 16, 256, 1024, 4096)
"""Token rows per sample: from decode-sized (alpha-bound) to prefill-sized (bandwidth-bound)."""


def _op_calls(group: GroupHandle, rows: int, width: int, dtype: torch.dtype,
              counter: comm.CommCounter) -> dict[str, tuple[float, Callable[[], object]]]:
    """op -> (bytes sent per rank, call) at `rows` tokens of `width` features in `group`."""
    n = group.size
    rows = comm.padded_tokens(rows, n)
    x = torch.zeros(rows, width, dtype=dtype)  # [T, W]; zeros: repeated in-place sums stay 0
    chunk = x[: rows // n].clone()  # [T/N, W]
    src, buf = group.global_rank(0), x.clone()

    def bcast() -> None:
        dist.broadcast(buf, src=src, group=group.group)

    calls = {
        "all_reduce": lambda: comm.all_reduce(x, group, counter),
        "reduce_scatter": lambda: comm.reduce_scatter_tokens(x, group, counter),
        "all_gather": lambda: comm.all_gather_tokens(chunk, rows, group, counter),
        "all_to_all": lambda: comm.all_to_all(x, group, counter),
    }
    out = {}
    for op, fn in calls.items():
        counter.reset()
        fn()  # warm-up; also records the logical bytes of one call
        out[op] = (float(counter.total()), fn)
    out["broadcast"] = (float(x.nbytes), bcast)  # a series prefetch: the whole tensor
    bcast()
    return out


def fit_profile(
    groups: ParallelGroups,
    *,
    rows: tuple[int, ...] = DEFAULT_ROWS,
    width: int = 256,
    rounds: int = 7,
    calls: int = 4,
    dtype: torch.dtype = torch.float32,
    matmul_size: int = 512,
    name: str | None = None,
) -> HardwareProfile:
    """Time each collective at each size in each distinct group size; fit per-N OpCosts.

    A sample is `calls` back-to-back calls after a barrier (per call), which fixes each op's
    bandwidth. Back to back, calls overlap their latencies, and a step's calls never do: each
    follows compute. So each op's alpha is at least its latency after a matmul at the smallest
    size (after_compute_s): across a 500 Mbit/s link the all-to-all's alpha went from 0.16 ms
    back to back to 0.45 ms, the all-reduce's from 0.70 to 1.81 ms."""
    if len(rows) < 2 or rounds < 1:
        raise ValueError(f"fit_profile: need >= 2 sizes (rows={rows}) and rounds >= 1")
    handles: dict[int, GroupHandle] = {}
    for h in (groups.tp, groups.odp, groups.otp):
        if h is not None and h.group is not None:
            handles.setdefault(h.size, h)  # equal sizes: one fit (ops cost by size, not members)
    if not handles:
        raise ValueError("fit_profile: the TP group has one rank, nothing to measure")
    t_start = time.perf_counter()
    counter = comm.CommCounter()
    keys: list[tuple[int, str, float]] = []
    times: list[list[float]] = []  # [sample][round]
    for n, h in sorted(handles.items()):
        for r in rows:
            for op, (nbytes, fn) in _op_calls(h, r, width, dtype, counter).items():
                samples = []
                for _ in range(rounds):
                    dist.barrier()
                    t0 = time.perf_counter()
                    for _ in range(calls):  # back to back, as a step issues them
                        fn()
                    samples.append((time.perf_counter() - t0) / calls)
                keys.append((n, op, nbytes))
                times.append(samples)
    # the matmul rate, with every rank computing at once as in a real step
    a = torch.randn(matmul_size, matmul_size).to(dtype)
    a @ a
    samples = []
    for _ in range(rounds):
        dist.barrier()
        t0 = time.perf_counter()
        a @ a
        samples.append(time.perf_counter() - t0)
    times.append(samples)
    slowest = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # a round lasts as long as its slowest rank
    measured = [statistics.median(r) for r in slowest.tolist()]  # identical on every rank
    flops = 2.0 * matmul_size**3 / measured[-1]
    overlap = fetch_overlap(handles[max(handles)], a, measured[-1], rounds)
    per_tp: dict[int, dict[str, OpCost]] = {}
    for n in handles:
        for op in dict.fromkeys(op for m, op, _ in keys if m == n):
            pts = [(b, t) for (m, o, b), t in zip(keys, measured, strict=False)
                   if m == n and o == op]
            per_tp.setdefault(n, {})[op] = fit_op(pts, relative=True)
    for n, h in sorted(handles.items()):  # a step's collectives follow compute, not each other
        for op, (_, fn) in _op_calls(h, rows[0], width, dtype, counter).items():
            after = after_compute_s(fn, a, rounds, calls)
            fitted = per_tp[n][op]
            per_tp[n][op] = OpCost(max(fitted.alpha_s, after), fitted.bytes_per_s)
    tp = groups.tp.size
    backend = dist.get_backend(groups.tp.group)
    return HardwareProfile(
        name=name or f"{backend}-fit-N{tp}",
        ops=dict(per_tp[max(per_tp, key=lambda m: (m == tp, m))]),
        matmul_flops_per_s=flops,
        per_tp=per_tp,
        overlap=overlap,
        source=(f"fitted by flashcomm.plan.fit on {backend}, torch {torch.__version__}, "
                f"{torch.get_num_threads()} thread(s)/rank, group sizes {sorted(per_tp)}, "
                f"rows {list(rows)} x width {width} {str(dtype).removeprefix('torch.')}, "
                f"{rounds} rounds x {calls} calls, {time.perf_counter() - t_start:.1f} s"),
    )


def slowest_times(fn: Callable[[], object], rounds: int) -> list[float]:
    """Per-round seconds of fn after a barrier, the slowest rank's, after one warm-up call
    (collective; every rank gets the same list)."""
    fn()
    samples = []
    for _ in range(rounds):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    t = torch.tensor(samples, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def after_compute_s(fn: Callable[[], object], a: torch.Tensor, rounds: int, calls: int) -> float:
    """Seconds one call of `fn` adds after a matmul `a @ a`: per round, `calls` x (matmul, call)
    against `calls` matmuls alone, the slowest rank's of each; the median over rounds, >= 0.
    Collective; every rank gets the same value."""
    fn()
    pairs = []
    for _ in range(rounds):
        for with_call in (True, False):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(calls):
                a @ a
                if with_call:
                    fn()
            pairs.append(time.perf_counter() - t0)
    t = torch.tensor(pairs, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    both, alone = t.view(rounds, 2).unbind(1)
    return max(0.0, float(((both - alone) / calls).median()))


OVERLAP_BYTES = 4 << 20
"""Bytes of the all-gather `fetch_overlap` hides behind matmuls: a W_o of H = D = 1024 in fp32."""


def fetch_overlap(group: GroupHandle, a: torch.Tensor, matmul_s: float, rounds: int) -> float:
    """How much of a background W_o fetch a concurrent matmul hides: F = the members' async
    broadcasts of OVERLAP_BYTES alone (the gather source's fetch on gloo), W = about F of
    matmuls `a @ a` (one takes matmul_s), B = both at once; (W + F - B) / min(W, F), in [0, 1].
    1: the transfer runs beside compute (a GPU's copy engines); near 0: it waits for the core
    (a one-core host). Collective over `group`'s world; every rank gets the same value."""
    n, src = group.size, [group.global_rank(p) for p in range(group.size)]
    buf = torch.zeros(OVERLAP_BYTES // 4)
    rows = buf.numel() // n

    def start() -> list[dist.Work]:
        return [dist.broadcast(buf[p * rows:(p + 1) * rows], src=src[p], group=group.group,
                               async_op=True) for p in range(n)]

    def fetch() -> None:
        for w in start():
            w.wait()

    def timed(fn: Callable[[], object]) -> float:
        return statistics.median(slowest_times(fn, rounds))

    f = timed(fetch)
    reps = max(1, round(f / matmul_s))

    def window() -> None:
        for _ in range(reps):
            a @ a

    def both() -> None:
        works = start()
        window()
        for w in works:
            w.wait()

    w, b = timed(window), timed(both)
    return min(1.0, max(0.0, (w + f - b) / max(min(w, f), 1e-12)))


def write_profile(profile: HardwareProfile, path: str | Path) -> Path:
    """Write `profile` as JSON (loadable with HardwareProfile.load / `plan --profile FILE`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.to_dict(), indent=1))
    return path


def fit_rank(rank: int, world: int, otp: int, kwargs: dict) -> dict:
    """run_local worker: build the groups of (tp=world, otp) and return the fitted profile."""
    from flashcomm.layout import ParallelLayout

    groups = ParallelGroups.build(ParallelLayout(tp=world, otp=otp), shard_weights=())
    return fit_profile(groups, **kwargs).to_dict()


def fit_local(nproc: int, otp: int = 0, timeout_s: float = 120.0, **kwargs) -> HardwareProfile:
    """Spawn `nproc` local ranks, fit, return the profile (`flashcomm bench comm --fit`)."""
    from flashcomm.launch import default_backend, run_local

    out = run_local(fit_rank, nproc, otp, kwargs, backend=default_backend(), timeout_s=timeout_s)
    return HardwareProfile.from_dict(out[0])


def under_torchrun() -> bool:
    """Whether torchrun (or another launcher) set RANK and WORLD_SIZE for this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def fit_torchrun(otp: int = 0, group_timeout_s: float = 120.0,
                 **kwargs) -> HardwareProfile | None:
    """Fit on the group torchrun started (tp = its world; `otp` adds FlashComm2's groups): the
    profile of whatever links join its ranks, e.g. hosts. Global rank 0 gets the profile, the
    other ranks None; the group is destroyed before returning."""
    from flashcomm.launch import init_distributed
    from flashcomm.layout import ParallelLayout

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    init_distributed(rank, world, group_timeout_s=group_timeout_s)
    try:
        groups = ParallelGroups.build(ParallelLayout(tp=world, otp=otp), shard_weights=())
        profile = fit_profile(groups, name=f"gloo-fit-N{world}-torchrun", **kwargs)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return profile if rank == 0 else None
