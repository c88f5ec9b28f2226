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
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from flashcomm import comm
from flashcomm.groups import GroupHandle, ParallelGroups
from flashcomm.plan.costmodel import (
    HardwareProfile,
    OpCost,
    Shape,
    comm_time,
    fit_op,
    layer_calls,
)
from flashcomm.plan.crossing import monotone_crossover
from flashcomm.plan.strategy import Strategy

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
    layer_width: int | None = None,
) -> HardwareProfile:
    """Time each collective at each size in each distinct group size; fit per-N OpCosts.

    A sample is `calls` back-to-back calls after a barrier (per call), which fixes each op's
    bandwidth; the ops of one size take turns round by round, as their ratios set the
    crossover. Back to back, calls overlap their latencies, and a step's calls never do: each
    follows compute. So each op's alpha is at least its latency right after a decode GEMV
    (in_context_alphas). Last, the crossover: miniature layers of H = D = `layer_width` (default
    `width`; the model's hidden size is best) time FlashComm2 against the row-parallel layer at
    CROSSOVER_ROWS, and where FlashComm2 starts to win (plan.crossing.monotone_crossover), the
    all-gather's alpha is moved so that the alpha-beta model's crossover falls at that T
    (align_crossover)."""
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
            ops = list(_op_calls(h, r, width, dtype, counter).items())
            samples: list[list[float]] = [[] for _ in ops]
            for k in range(rounds):  # ops interleaved, rotating: drift hits each op alike
                for j in range(len(ops)):
                    i = (j + k) % len(ops)
                    dist.barrier()
                    t0 = time.perf_counter()
                    for _ in range(calls):  # back to back, as a step issues them
                        ops[i][1][1]()
                    samples[i].append((time.perf_counter() - t0) / calls)
            keys += [(n, op, nbytes) for op, (nbytes, _) in ops]
            times += samples
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
        ops = _op_calls(h, rows[0], width, dtype, counter)
        for op, after in in_context_alphas(ops, width, dtype, rounds).items():
            fitted = per_tp[n][op]
            per_tp[n][op] = OpCost(max(fitted.alpha_s, after), fitted.bytes_per_s)
    tp = groups.tp.size
    layer_width = layer_width or width
    extra = layer_extra_ratio(groups.tp, layer_width, dtype, min(rounds, LAYER_ROUNDS))
    win = monotone_crossover(CROSSOVER_ROWS, extra)
    if win is not None:
        per_tp[tp] = align_crossover(per_tp[tp], tp, layer_width, dtype, win)
    else:  # no win up to the last row: the model must not put one before it
        per_tp[tp] = align_crossover(per_tp[tp], tp, layer_width, dtype, CROSSOVER_ROWS[-1],
                                     later_only=True)
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
                f"{rounds} rounds x {calls} calls, in-context layers at H = D = {layer_width}: "
                f"FlashComm2 wins from T = {'never' if win is None else f'{win:.0f}'} (rows "
                f"{list(CROSSOVER_ROWS)}, median time ratios "
                f"{[round(1 + statistics.median(e), 3) for e in extra]}), "
                f"{time.perf_counter() - t_start:.1f} s"),
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


DECODE_WEIGHT_BYTES = 16 << 20
"""Weight a decode step's GEMV streams before a collective in `in_context_alphas`: larger than
the caches, as a layer's QKV or MLP weights are."""


def paired_times(seq: Sequence[Callable[[], object]], base: Sequence[Callable[[], object]],
                 rounds: int, calls: int) -> list[tuple[float, float]]:
    """(seconds of one pass of `seq`, of one pass of `base`) per round: per round, `calls`
    passes of each after a barrier, the slowest rank's. Collective; every rank gets the same
    values."""
    for f in (*seq, *base):
        f()
    pairs = []
    for _ in range(rounds):
        for fns in (seq, base):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(calls):
                for f in fns:
                    f()
            pairs.append(time.perf_counter() - t0)
    t = torch.tensor(pairs, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [(a / calls, b / calls) for a, b in t.view(rounds, 2).tolist()]


def _decode_gemv(width: int, dtype: torch.dtype) -> Callable[[], object]:
    """One decode token's GEMV through DECODE_WEIGHT_BYTES of weight [K, width]."""
    k = max(width, DECODE_WEIGHT_BYTES // (width * torch.finfo(dtype).bits // 8))
    weight, x = torch.randn(k, width).to(dtype), torch.randn(1, width).to(dtype)
    return lambda: x @ weight.t()  # [1, K]: streams the weight


def in_context_alphas(ops: dict[str, tuple[float, Callable[[], object]]], width: int,
                      dtype: torch.dtype, rounds: int, calls: int = 8) -> dict[str, float]:
    """op -> seconds one call of `ops` adds right after a decode GEMV (QKV, the MLP), as a
    step issues it. Collective; every rank gets the same values."""
    decode = _decode_gemv(width, dtype)
    added = {op: [a - b for a, b in paired_times([decode, fn], [decode], rounds, calls)]
             for op, (_, fn) in ops.items()}  # seconds beyond the GEMV alone, per round
    return {op: max(0.0, statistics.median(d)) for op, d in added.items()}


CROSSOVER_ROWS = (1, 4, 16, 32, 64, 128, 256, 1024)
"""Token rows at which `layer_extra_ratio` compares FlashComm2's miniature layer with the
row-parallel one: where the crossover lies on links of 0.5-2 Gbit/s."""
LAYER_ROUNDS = 5
"""Most rounds of `layer_extra_ratio` (each round times both miniature layers at every size)."""
COMPUTE_ROWS = 128
"""Most rows of the matmuls between a miniature layer's collectives: enough to refill a shaped
link's bucket, and bounded, so the largest sizes cost communication, not compute."""


def layer_extra_ratio(group: GroupHandle, width: int, dtype: torch.dtype, rounds: int,
                      rows: tuple[int, ...] = CROSSOVER_ROWS, calls: int = 2) -> list[list[float]]:
    """Per T in `rows`, one per round: FlashComm2's layer time over the row-parallel layer's,
    minus 1, each layer's communication issued as a decoder layer does, between the same matmuls of
    T rows (at most COMPUTE_ROWS) through DECODE_WEIGHT_BYTES (QKV, the MLP: the compute that
    lets a shaped link's bucket refill):
    all-to-all, o_proj, all-gather, MLP all-reduce against o_proj, all-reduce, MLP all-reduce
    (H = D = width, otp = 1). Negative where FlashComm2 wins. Collective over `group`'s world."""
    k = max(width, DECODE_WEIGHT_BYTES // (width * torch.finfo(dtype).bits // 8))
    weight, w_o = torch.randn(k, width).to(dtype), torch.randn(width, width).to(dtype)
    out = []
    counter = comm.CommCounter()
    for r in rows:
        x = torch.randn(min(r, COMPUTE_ROWS), width).to(dtype)  # [T, W], T capped
        chunk = x[: max(1, r // group.size)]  # [T/N, W]: FlashComm2's o_proj rows
        ops = {op: fn for op, (_, fn) in _op_calls(group, r, width, dtype, counter).items()}
        ar, ag = ops["all_reduce"], ops["all_gather"]
        heads = torch.zeros(comm.padded_tokens(r, group.size), width // group.size).to(dtype)

        def a2a(heads: torch.Tensor = heads) -> None:  # [T_pad, D/N]: this rank's heads
            comm.all_to_all(heads, group)

        def layer(x: torch.Tensor = x) -> None:
            x @ weight.t()  # [T, K]

        def o_proj(x: torch.Tensor = chunk) -> None:
            x @ w_o.t()

        fc2 = [layer, a2a, o_proj, ag, layer, ar]
        row_parallel = [layer, o_proj, ar, layer, ar]
        out.append([a / b - 1.0 for a, b in paired_times(fc2, row_parallel, rounds, calls)])
    return out


def align_crossover(costs: dict[str, OpCost], tp: int, width: int, dtype: torch.dtype,
                    tokens: float, later_only: bool = False) -> dict[str, OpCost]:
    """`costs` with the all-gather's alpha moved (never below 0) so that a layer of
    H = D = `width` at otp = 1 takes as long with FlashComm2 as with the all-reduce at `tokens`
    (later_only: only if FlashComm2 wins there, which moves the crossover later).
    Why: the alpha-beta model is linear in T, and on a link that lets a small message pass in
    one burst (tbf's bucket) the real difference is not. Across 500 Mbit/s FlashComm2's chain
    cost 1.7 ms a layer more than the all-reduce at T = 1, 0.35 ms at 16, and won from about
    20; alphas from T = 1 put the model's crossover at 143, those from back-to-back calls at 1
    (auto then took FlashComm2 for decode, 8 % slower)."""
    elt = torch.finfo(dtype).bits // 8
    shape = Shape(hidden=width, q_dim=width, tp=tp, elt_bytes=elt)
    fc2 = Strategy("flashcomm2", 1)
    profile = HardwareProfile("align", dict(costs), 1.0, per_tp={tp: dict(costs)})
    t = max(1, round(tokens))
    gap = (comm_time(profile, layer_calls(fc2, shape, t))
           - comm_time(profile, layer_calls(Strategy(), shape, t)))
    if later_only and gap >= 0:
        return costs
    ag = costs["all_gather"]
    return {**costs, "all_gather": OpCost(max(0.0, ag.alpha_s - gap), ag.bytes_per_s)}


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
