"""One rank of the engine across hosts: every strategy on one torchrun group, with the bytes that
crossed this host's link and (optionally) interleaved timings.

Run under torchrun on every host (flashcomm.bench.hosts starts it on an emulated cluster)::

    torchrun --nnodes 2 --nproc-per-node P --node-rank R --master-addr A --master-port 29500 \
        -m flashcomm.bench.hosts_rank --spec spec.json

For each strategy of the spec: its process groups and engine, the generated tokens of the
spec's prompts, then one prefill of the `bytes_prompts` batch bracketed by barriers, with this
host's link counters (/sys/class/net/IFACE/statistics, read by local rank 0) before and after.
With `rounds` > 0, the prefill of `prefill_tokens` tokens and a decode-heavy generate are then
timed round-robin over the strategies (the order rotates every round), each round's time the
slowest rank's, together with the link bytes of each timed run; stock's collectives of one
prefill are also replayed alone (no compute), for its communication share. Global rank 0 writes
everything to `spec["out"]`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist

from flashcomm.bench.cluster import IFACE, LinkCounters
from flashcomm.bench.replay import step_replay
from flashcomm.groups import ParallelGroups
from flashcomm.launch import init_distributed
from flashcomm.model_args import ModelArgs
from flashcomm.models.engine import Engine
from flashcomm.plan.auto import resolve_auto
from flashcomm.plan.strategy import Strategy


def read_counters(iface: str = IFACE) -> LinkCounters:
    """This host's counters of `iface` (its network namespace's sysfs)."""
    base = Path("/sys/class/net") / iface / "statistics"
    vals = [int((base / n).read_text()) for n in ("tx_bytes", "tx_packets", "rx_bytes",
                                                   "rx_packets")]
    return LinkCounters(*vals)


class _Link:
    """Link bytes this host sent during a bracketed region (local rank 0 reads; others 0)."""

    def __init__(self, iface: str) -> None:
        self.iface = iface
        self.reader = int(os.environ.get("LOCAL_RANK", "0")) == 0

    def __enter__(self) -> _Link:
        dist.barrier()
        self.before = read_counters(self.iface) if self.reader else None
        self.sent: dict | None = None
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            return
        dist.barrier()
        if self.reader and self.before is not None:
            d = read_counters(self.iface) - self.before
            self.sent = {"payload": d.payload(), "tx_bytes": d.tx_bytes,
                         "tx_packets": d.tx_packets}


def _say(rank: int, what: str) -> None:
    if rank == 0:
        print(f"flashcomm-hosts: {what}", flush=True)


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _ids(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def run(spec: dict) -> dict | None:
    """This rank's part of `spec` (see the module doc); the whole result on global rank 0."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout_s = float(spec.get("group_timeout_s", 60.0))
    init_distributed(rank, world, group_timeout_s=timeout_s)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    link = _Link(spec.get("iface", IFACE))
    model = spec["model"]
    args = ModelArgs.from_dir(model)
    # a "profile" entry goes to the config (what resolves auto), the rest makes the Strategy
    extra = [{k: v for k, v in s.items() if k == "profile"} for s in spec["strategies"]]
    strategies = [Strategy(**{k: v for k, v in s.items() if k != "profile"})
                  for s in spec["strategies"]]
    labels = spec.get("labels") or [s.label for s in strategies]

    engines, rows = [], []
    namer: ParallelGroups | None = None
    thresholds = []
    for s, label, knobs in zip(strategies, labels, extra, strict=True):
        cfg = s.to_config(world, group_timeout_s=int(timeout_s), **knobs)
        groups = ParallelGroups.from_config(cfg, world)
        namer = namer or groups
        with groups.naming_link_errors():
            cfg, _ = resolve_auto(cfg, groups, args.dim, args.q_dim, 4)
            thresholds.append(cfg.flashcomm2_min_tokens if cfg.flashcomm2 else None)
            eng = Engine.from_checkpoint(model, cfg, groups, progress=False, dtype=torch.float32)
            res = eng.generate(spec["prompts"], spec["max_new_tokens"])
            eng.generate(spec["bytes_prompts"], 1)  # warm-up of the counted prefill
            with link as lk:
                counted = eng.generate(spec["bytes_prompts"], 1)
        rows.append({"tokens": res.tokens, "link": lk.sent,
                     "comm_bytes_by_op": counted.comm_bytes_by_op,
                     "prefill_fetch_bytes": counted.prefill_fetch_bytes})
        engines.append(eng)
        _say(rank, f"{label}: tokens and link bytes done")
    timing = None
    if spec.get("rounds") and namer is not None:
        _say(rank, "timing")
        with namer.naming_link_errors():
            timing = _timing(spec, engines, link, strategies, args)
    host_rows = [None] * world
    dist.all_gather_object(host_rows, {"rank": rank, "host": os.environ.get("FLASHCOMM_HOST"),
                                       "rows": rows, "timing": timing})
    dist.destroy_process_group()
    if rank != 0:
        return None
    out = {"world": world, "labels": labels, "strategies": spec["strategies"],
           "thresholds": thresholds, "ranks": host_rows}
    Path(spec["out"]).write_text(json.dumps(out))
    return out


def _timing(spec: dict, engines: list[Engine], link: _Link, strategies: list[Strategy],
            args: ModelArgs) -> dict:
    """Interleaved rounds: prefill of T tokens and a decode-heavy generate per strategy."""
    t_pre = int(spec["prefill_tokens"])
    prefill = [_ids(t_pre, args.vocab_size, 1)]
    dec_batch, dec_new = int(spec.get("decode_batch", 4)), int(spec.get("decode_tokens", 32))
    decode = [_ids(16, args.vocab_size, 2 + b) for b in range(dec_batch)]
    n = len(engines)
    pre = [[] for _ in range(n)]
    gen = [[] for _ in range(n)]
    pre_link: list[list] = [[] for _ in range(n)]
    for e in engines:  # warm-up at the timed sizes
        e.generate(prefill, 1)
        e.generate(decode, 2)
    for r in range(int(spec["rounds"])):
        _say(dist.get_rank(), f"round {r}")
        # a fresh order each round (seeded: the same on every rank): rotating one fixed order
        # ran each strategy right after the same other one (`auto` always after fc2+gather's
        # heavy fetches)
        for i in random.Random(r).sample(range(n), n):
            with link as lk:
                t0 = time.perf_counter()
                engines[i].generate(prefill, 1)
                dt = time.perf_counter() - t0
            pre[i].append(_slowest(dt))
            pre_link[i].append(lk.sent)
            t0 = time.perf_counter()
            res = engines[i].generate(decode, dec_new)
            gen[i].append(_slowest(time.perf_counter() - t0))
            del res
    sweep = _sweep(spec.get("sweep") or {}, engines, args)
    # stock's collectives of one prefill replayed alone: its communication time
    base = engines[[s.label for s in strategies].index("allreduce")] if any(
        s.label == "allreduce" for s in strategies) else engines[0]
    replay = step_replay(base.model.ctx.groups, Strategy(), args.dim, args.q_dim, t_pre,
                         args.n_layers)
    replay()
    comm = []
    for _ in range(int(spec["rounds"])):
        dist.barrier()
        t0 = time.perf_counter()
        replay()
        comm.append(_slowest(time.perf_counter() - t0))
    return {"prefill_tokens": t_pre, "decode_batch": dec_batch, "decode_tokens": dec_new,
            "prefill_s": pre, "generate_s": gen, "prefill_link": pre_link,
            "stock_comm_s": comm, "sweep": sweep}


SWEEP_SAMPLE_S = 0.25
"""Least seconds one sweep sample lasts: short prefills repeat until then, so one scheduler
hiccup moves a sample by a few percent, not by half (7 single prefills of 16-256 tokens put
the measured crossover anywhere from 20 to 240 tokens between runs)."""


def _sweep(sweep: dict, engines: list[Engine], args: ModelArgs) -> dict | None:
    """Prefill at each of sweep["tokens"] for the strategies sweep["strategies"] (indices),
    interleaved in rotating order over sweep["rounds"] rounds, each sample `reps` prefills of
    at least SWEEP_SAMPLE_S in all: where the measured crossover lies."""
    tokens, which = [int(t) for t in sweep.get("tokens", [])], list(sweep.get("strategies", []))
    rounds = int(sweep.get("rounds", 7))
    if not tokens or not which:
        return None
    prompts = [[_ids(t, args.vocab_size, 100 + t)] for t in tokens]
    reps = []
    for p in prompts:
        once = []
        for i in which:
            engines[i].generate(p, 1)  # warm-up
            t0 = time.perf_counter()
            engines[i].generate(p, 1)
            once.append(_slowest(time.perf_counter() - t0))
        reps.append(max(1, min(32, math.ceil(SWEEP_SAMPLE_S / max(min(once), 1e-6)))))
    secs = {i: [[] for _ in tokens] for i in which}  # [strategy][T][round], per prefill
    for r in range(rounds):
        _say(dist.get_rank(), f"sweep round {r}")
        for k, p in enumerate(prompts):
            for j in range(len(which)):
                i = which[(j + r) % len(which)]
                t0 = time.perf_counter()
                for _ in range(reps[k]):
                    engines[i].generate(p, 1)
                secs[i][k].append(_slowest(time.perf_counter() - t0) / reps[k])
    return {"tokens": tokens, "strategies": which, "reps": reps,
            "prefill_s": [secs[i] for i in which]}


def main() -> None:
    """`python -m flashcomm.bench.hosts_rank --spec FILE` (under torchrun)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", required=True, help="JSON spec written by flashcomm.bench.hosts")
    run(json.loads(Path(p.parse_args().spec).read_text()))


if __name__ == "__main__":
    main()
