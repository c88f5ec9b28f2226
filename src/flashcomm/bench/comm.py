"""Per-layer attention-output communication: all-reduce vs FlashComm1 vs FlashComm2 (+int8).

Every strategy runs the o_proj path from the local attention output [T, D/N] until every rank
holds [T, H] again (FlashComm1 strategies include their later all-gather; the norms between run
on T/N tokens and are not timed). Time per round is the slowest rank's. One spawned group per
N runs every (strategy, T, D) side by side, so results compare as ratios to the all-reduce path.
`comm_*_s` times the same collectives replayed alone (flashcomm.bench.replay, no matmul), the
communication-only figure: on CPU the o_proj matmul dominates the path time.
JSON: `strategies` (bytes per op, the cost model's bytes, times, ratios), `primitives`
(op, bytes, seconds of each chosen primitive: input for an alpha-beta fit) and, with
--candidates, `candidates` (alternative implementations of each primitive on this backend).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from flashcomm.bench.replay import attn_out_replay
from flashcomm.comm import (
    CommCounter,
    all_gather_tokens,
    all_reduce,
    all_to_all,
    flashcomm2_o_proj,
    reduce_scatter_tokens,
    row_parallel_o_proj,
)
from flashcomm.config import AttnOut, CommDtype
from flashcomm.groups import GroupHandle, ParallelGroups
from flashcomm.knobs import ConfigError
from flashcomm.launch import run_local
from flashcomm.layout import ParallelLayout
from flashcomm.plan.costmodel import Shape, attn_out_calls, counted_bytes
from flashcomm.plan.fit import (
    fit_local,
    fit_torchrun,
    slowest_times,
    under_torchrun,
    write_profile,
)
from flashcomm.plan.strategy import Strategy

BASE = Strategy()
ELT = 4  # the benchmark runs fp32


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `flashcomm bench comm`."""
    parser.add_argument("--out", default="results/comm", help="output directory")
    parser.add_argument("--tokens", type=_ints, default=[128, 512, 2048, 8192], help="T values")
    parser.add_argument("--world", type=_ints, default=[2, 4], help="TP sizes N")
    parser.add_argument("--hidden", type=int, default=2048,
                        help="H (o_proj output); with --fit, the width of the in-context "
                        "layers that place the crossover")
    parser.add_argument("--attn-dim", type=_ints, default=[2048, 4096],
                        help="D values (o_proj input = heads * head_dim)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per case")
    parser.add_argument("--candidates", action="store_true",
                        help="also time alternative primitive implementations at T=2048")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per spawned group")
    parser.add_argument("--fit", action="store_true",
                        help="only fit the alpha-beta cost model (quick) and write profile.json")


def strategies(n: int) -> list[Strategy]:
    """All-reduce, FlashComm1, and per otp in (1, 2) FlashComm2 (+fc1, +fc1+int8)."""
    out = [BASE, Strategy(flashcomm1=True)]
    for otp in (o for o in (1, 2) if o < n and n % o == 0):
        fc2 = Strategy(AttnOut.FLASHCOMM2, otp)
        out += [fc2, replace(fc2, flashcomm1=True),
                replace(fc2, flashcomm1=True, comm_dtype=CommDtype.INT8)]
    return out


def _stats(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def _path(groups: ParallelGroups, s: Strategy, x, w, b, counter):
    """One strategy's path: [T, D/N] -> [T, H] on every rank."""
    t = x.shape[0]
    if not s.flashcomm2:
        y = row_parallel_o_proj(x, w, b, groups.tp, flashcomm1=s.flashcomm1, counter=counter)
    else:
        y = flashcomm2_o_proj(x, w, b, groups, flashcomm1=s.flashcomm1, comm_dtype=s.comm_dtype,
                              counter=counter)
    return all_gather_tokens(y, t, groups.tp, counter) if s.flashcomm1 else y


def _strategy_worker(rank: int, world: int, tokens: list[int], h: int, dims: list[int],
                     rounds: int, candidates: bool) -> dict:
    groups = {otp: ParallelGroups.build(ParallelLayout(tp=world, otp=otp), shard_weights=())
              for otp in {s.otp for s in strategies(world)}}
    tp = groups[0].tp
    records, prims = [], []
    gen = torch.Generator().manual_seed(rank)
    for d in dims:
        for t in tokens:
            x = torch.randn(t, d // world, generator=gen)  # [T, D/N]
            b = torch.randn(h)
            for s in strategies(world):
                g = groups[s.otp]
                cols = d // world if s.otp == 0 else d // s.otp
                w = torch.randn(h, cols, generator=gen) / d**0.5  # [H, D/N] or [H, D/otp]
                counter = CommCounter()
                _path(g, s, x, w, b, counter)
                times = slowest_times(
                    lambda g=g, s=s, x=x, w=w, b=b: _path(g, s, x, w, b, None), rounds)
                # the same collectives alone (no matmul): the communication-only time
                comm_st = _stats(slowest_times(attn_out_replay(g, s, h, d, t), rounds))
                records.append({"strategy": s.label, "N": world, "T": t, "H": h, "D": d,
                                "otp": s.otp, "flashcomm1": s.flashcomm1,
                                "comm_dtype": str(s.comm_dtype),
                                "bytes_sent": dict(counter.bytes_sent),
                                "bytes_total": counter.total(), **_stats(times),
                                **{f"comm_{k}": v for k, v in comm_st.items()}})
    for t in tokens:  # the chosen primitives alone, for a later alpha-beta fit
        y = torch.randn(t, h, generator=gen)  # [T, H]
        c = CommCounter()
        chunk = reduce_scatter_tokens(y, tp, c)
        all_gather_tokens(chunk, t, tp, c)
        all_reduce(y.clone(), tp, c)
        all_to_all(y[: t - t % world], tp, c)
        ops = {"all_reduce": lambda y=y: all_reduce(y.clone(), tp),
               "reduce_scatter": lambda y=y: reduce_scatter_tokens(y, tp),
               "all_gather": lambda ch=chunk, t=t: all_gather_tokens(ch, t, tp),
               "all_to_all": lambda y=y, t=t: all_to_all(y[: t - t % world], tp)}
        for op, fn in ops.items():
            prims.append({"op": op, "N": world, "T": t, "H": h, "bytes": c.bytes_sent[op],
                          **_stats(slowest_times(fn, rounds))})
    cands = _candidates(rank, world, h, rounds) if candidates else []
    return {"strategies": records, "primitives": prims, "candidates": cands}


def _candidates(rank: int, n: int, h: int, rounds: int, t: int = 2048) -> list[dict]:
    """Alternative implementations of each primitive on this backend, interleaved per round."""
    c = t // n
    x = torch.randn(t, h)  # [T, H]
    mine = x[rank * c:(rank + 1) * c].clone()  # [T/N, H]
    a = torch.randn(t, h // n)  # [T, H/N] all-to-all payload

    def ag_broadcast():
        out = torch.empty_like(x)
        out[rank * c:(rank + 1) * c] = mine
        for w in [dist.broadcast(out[i * c:(i + 1) * c], i, async_op=True) for i in range(n)]:
            w.wait()

    def rs_reduce():
        z = x.clone()
        for w in [dist.reduce(z[i * c:(i + 1) * c], i, async_op=True) for i in range(n)]:
            w.wait()

    def a2a_p2p():
        ins, outs = list(a.chunk(n)), [torch.empty(c, h // n) for _ in range(n)]
        ops = [dist.P2POp(f, (ins if f is dist.isend else outs)[p], p)
               for p in range(n) if p != rank for f in (dist.isend, dist.irecv)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()

    cands = {
        ("reduce_scatter", "reduce_scatter_single"):
            lambda: dist.reduce_scatter_single(torch.empty(c, h), x),
        ("reduce_scatter", "reduce_scatter_list"):
            lambda: dist.reduce_scatter(torch.empty(c, h), list(x.chunk(n))),
        ("reduce_scatter", "all_reduce_slice"): lambda: dist.all_reduce(x.clone()),
        ("reduce_scatter", "async_reduces"): rs_reduce,
        ("reduce_scatter", "all_to_all_sum"):
            lambda: all_to_all(x, _world_handle(rank, n)).view(n, c, h).sum(0),
        ("all_gather", "all_gather_single"):
            lambda: dist.all_gather_single(torch.empty_like(x), mine),
        ("all_gather", "all_gather_list"):
            lambda: torch.cat(_gather_list(mine, n)),
        ("all_gather", "async_broadcasts"): ag_broadcast,
        ("all_gather", "all_to_all_of_copies"):
            lambda: dist.all_to_all_single(torch.empty_like(x), mine.repeat(n, 1)),
        ("all_to_all", "all_to_all_single"):
            lambda: dist.all_to_all_single(torch.empty_like(a), a),
        ("all_to_all", "all_to_all_list"):
            lambda: dist.all_to_all([torch.empty(c, h // n) for _ in range(n)], list(a.chunk(n))),
        ("all_to_all", "batch_isend_irecv"): a2a_p2p,
        ("all_reduce", "all_reduce"): lambda: dist.all_reduce(x.clone()),
    }
    times: dict = {k: [] for k in cands}
    for fn in cands.values():
        fn()
    for _ in range(rounds):
        for k, fn in cands.items():
            times[k].extend(slowest_times(fn, 1))
    return [{"op": op, "impl": impl, "N": n, "T": t, "H": h, **_stats(times[(op, impl)])}
            for op, impl in cands]


def _world_handle(rank: int, n: int) -> GroupHandle:
    return GroupHandle(dist.group.WORLD, tuple(range(n)), rank)


def _gather_list(mine: torch.Tensor, n: int) -> list[torch.Tensor]:
    out = [torch.empty_like(mine) for _ in range(n)]
    dist.all_gather(out, mine)
    return out


def summarize(records: list[dict]) -> None:
    """Add the cost model's bytes, exchange ratios and time ratios to the all-reduce path, in
    place."""
    base = {(r["N"], r["T"], r["D"]): r for r in records if r["strategy"] == BASE.label}
    for r in records:
        n, t, h, d = r["N"], r["T"], r["H"], r["D"]
        s = Strategy(AttnOut.FLASHCOMM2 if r["otp"] else AttnOut.ALLREDUCE, r["otp"],
                     r["flashcomm1"], r["comm_dtype"])
        shape = Shape(hidden=h, q_dim=d, tp=n, elt_bytes=ELT)
        r["formula_bytes"] = counted_bytes(attn_out_calls(s, shape, t))
        r["bytes_match_formula"] = r["bytes_sent"] == r["formula_bytes"]
        r["time_ratio_to_all_reduce"] = r["median_s"] / base[(n, t, d)]["median_s"]
        r["comm_ratio_to_all_reduce"] = r["comm_median_s"] / max(
            base[(n, t, d)]["comm_median_s"], 1e-9)
        if r["otp"]:
            # the FlashComm1 reduce-scatter it replaces
            rs = counted_bytes(attn_out_calls(Strategy(flashcomm1=True), shape, t))[
                "reduce_scatter"]
            sent = r["bytes_sent"]
            r["all_to_all_over_reduce_scatter"] = sent["all_to_all"] / rs
            r["exchange_over_reduce_scatter"] = (
                sent["all_to_all"] + sent.get("all_to_all_scales", 0)
                + sent.get("otp_reduce_scatter", 0)) / rs
            r["bound_D_over_NH"] = d / (n * h)


def plot(records: list[dict], out: Path) -> None:
    """Communication-only time (collectives replayed alone) and bytes vs T, per (N, D)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["N"], r["D"]) for r in records})
    fig, axes = plt.subplots(2, len(keys), figsize=(4.5 * len(keys), 8), squeeze=False)
    for col, (n, d) in enumerate(keys):
        rows = [r for r in records if r["N"] == n and r["D"] == d]
        for name in dict.fromkeys(r["strategy"] for r in rows):
            sel = sorted((r for r in rows if r["strategy"] == name), key=lambda r: r["T"])
            ts = [r["T"] for r in sel]
            axes[0][col].plot(ts, [r["comm_median_s"] * 1e3 for r in sel], marker="o",
                              label=name)
            axes[1][col].plot(ts, [r["bytes_total"] / 2**20 for r in sel], marker="o", label=name)
        for ax, lab in zip(axes[:, col], ("comm-only median ms", "MiB sent per rank"), strict=True):
            ax.set(xscale="log", yscale="log", xlabel="T tokens", ylabel=lab,
                   title=f"N={n} H={rows[0]['H']} D={d}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][col].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "comm.png", dpi=110)
    plt.close(fig)


def fit_main(args: argparse.Namespace, out: Path) -> int:
    """`--fit`: one quick fit per N, merged into one profile (per_tp) in profile.json. Under
    torchrun (RANK / WORLD_SIZE set, e.g. one node per host) the fit runs on torchrun's group
    instead, N = its world, so the profile is that of the link between the hosts."""
    if under_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        fitted = fit_torchrun(otp=world // 2 if world > 2 else 0, layer_width=args.hidden)
        if fitted is None:  # not global rank 0: rank 0 writes and prints
            return 0
        fits = {world: fitted}
    else:
        fits = {n: fit_local(n, otp=n // 2 if n > 2 else 0, timeout_s=args.timeout,
                            layer_width=args.hidden)
                for n in args.world}
    per_tp = {m: ops for p in fits.values() for m, ops in p.per_tp.items()}
    widest = fits[max(fits)]
    profile = replace(widest, name=f"gloo-fit-N{'-'.join(map(str, sorted(per_tp)))}",
                      per_tp=per_tp, source=" | ".join(p.source for p in fits.values()))
    path = write_profile(profile, out / "profile.json")
    for n, ops in sorted(per_tp.items()):
        for op, c in ops.items():
            print(f"N={n} {op:<15} alpha {c.alpha_s * 1e6:9.1f} us   "
                  f"{c.bytes_per_s / 1e9:7.3f} GB/s")
    print(f"matmul {profile.matmul_flops_per_s / 1e9:.1f} GFLOP/s, fetch overlap "
          f"{profile.overlap:.2f}\nwrote {path} "
          f"(use: flashcomm plan --profile {path})")
    return 0


def main(args: argparse.Namespace) -> int:
    """Run every world size, write comm.json and comm.png (or only fit, with --fit)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.fit:
        return fit_main(args, out)
    result: dict = {"strategies": [], "primitives": [], "candidates": [], "backend": "gloo",
                    "threads": torch.get_num_threads(), "torch": torch.__version__}
    for n in args.world:
        for d in args.attn_dim:
            if d % n:
                raise ConfigError(f"attn_dim={d}: must be divisible by N={n} (--attn-dim, --world)")
        start = time.monotonic()
        res = run_local(_strategy_worker, n, args.tokens, args.hidden, args.attn_dim, args.rounds,
                        args.candidates, timeout_s=args.timeout, group_timeout_s=300)[0]
        for k in result:
            if isinstance(result[k], list):
                result[k].extend(res[k])
        print(f"N={n}: {time.monotonic() - start:.1f}s")
    summarize(result["strategies"])
    (out / "comm.json").write_text(json.dumps(result, indent=1))
    plot(result["strategies"], out)
    print(f"{'N':>2} {'D':>5} {'T':>5} {'strategy':<22} {'ms':>8} {'x all-red':>9} {'comm x':>6} "
          f"{'MiB':>8} {'a2a/rs':>7} formula")
    for r in result["strategies"]:
        print(f"{r['N']:>2} {r['D']:>5} {r['T']:>5} {r['strategy']:<22} {r['median_s'] * 1e3:8.2f} "
              f"{r['time_ratio_to_all_reduce']:9.2f} {r['comm_ratio_to_all_reduce']:6.2f} "
              f"{r['bytes_total'] / 2**20:8.2f} "
              f"{r.get('all_to_all_over_reduce_scatter', float('nan')):7.3f} "
              f"{'ok' if r['bytes_match_formula'] else 'MISMATCH'}")
    for c in result["candidates"]:
        print(f"candidate N={c['N']} {c['op']:<15} {c['impl']:<22} "
              f"median {c['median_s'] * 1e3:7.2f} ms  min {c['min_s'] * 1e3:7.2f} ms")
    print(f"wrote {out / 'comm.json'} and {out / 'comm.png'}")
    return 0 if all(r["bytes_match_formula"] for r in result["strategies"]) else 1
