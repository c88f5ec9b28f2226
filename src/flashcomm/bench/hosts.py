"""The engine across emulated hosts: torchrun on every host of a flashcomm.bench.cluster, the
bytes the cost model says must cross the link, and the check of both against each other.

`torchrun_on_hosts` starts the README's multi-node recipe (one `torchrun --nnodes K
--node-rank i --master-addr <host 0>` per host) and waits for every host. `link_bytes` is the
cost model's count (flashcomm.plan.costmodel: the calls a step issues and the W_o fetches) mapped
onto hosts through the pattern of gloo's algorithm for each op, as flashcomm.comm issues them on
gloo:
- all_reduce: gloo's ring; with each host holding a contiguous block of ranks, one ring edge per
  host crosses the link, carrying one rank's bytes;
- all_to_all, and reduce_scatter (comm.py runs it as an all-to-all): pairwise; a rank sends
  bytes/(N-1) to each peer, N-P of them on other hosts (P ranks per host);
- all_gather (comm.py: one broadcast per member) and broadcast (the O-Shard owner fetch):
  gloo's binomial tree, whose edges across hosts depend on the root (bcast_crossings).
On 2 hosts x 1 rank every op's bytes cross the link as the cost model counts them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flashcomm.bench.cluster import Cluster
from flashcomm.launch import CPU_MALLOC_ENV
from flashcomm.plan.costmodel import Shape, step_calls, step_fetches
from flashcomm.plan.strategy import Strategy

MASTER_PORT = 29500


def torchrun_argv(nnodes: int, nproc_per_node: int, node_rank: int, master_addr: str,
                  port: int, program: Sequence[str]) -> list[str]:
    """The README's multi-node line for one host; `program` is `-m module args...`."""
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return [torchrun, "--nnodes", str(nnodes), "--nproc-per-node", str(nproc_per_node),
            "--node-rank", str(node_rank), "--master-addr", master_addr, "--master-port",
            str(port), *program]


def torchrun_on_hosts(cluster: Cluster, nproc_per_node: int, program: Sequence[str],
                      timeout_s: float, env: dict[str, str] | None = None,
                      port: int = MASTER_PORT) -> list[subprocess.CompletedProcess]:
    """Run `program` under torchrun on every host of `cluster` (host 0 is the master); wait for
    all, killing every host's torchrun at `timeout_s`. Output is captured per host."""
    extra = {**CPU_MALLOC_ENV, "PYTHONUNBUFFERED": "1", **(env or {})}
    procs = [cluster.popen(i, torchrun_argv(cluster.hosts, nproc_per_node, i, cluster.addr(0),
                                            port, program), env=extra,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(cluster.hosts)]
    deadline = time.monotonic() + timeout_s
    out = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                with contextlib.suppress(OSError):
                    os.killpg(q.pid, signal.SIGKILL)
            o, e = p.communicate()
            e += f"\n[flashcomm.bench.hosts: killed after {timeout_s:.0f}s]"
            p.returncode = p.returncode if p.returncode is not None else -9
        out.append(subprocess.CompletedProcess(p.args, p.returncode, o, e))
    return out


def bcast_crossings(root: int, group: int, per_host: int) -> int:
    """Edges of gloo's binomial broadcast tree (gloo/broadcast.cc: in round i every virtual rank
    v < 2^i, v = (rank - root) mod N, sends to v + 2^i) that join ranks of different hosts."""
    crossings, step = 0, 1
    while step < group:
        for v in range(step):  # the senders of this round
            if v + step < group:
                a, b = (v + root) % group, (v + step + root) % group
                crossings += a // per_host != b // per_host
        step *= 2
    return crossings


def _crossing(op: str, nbytes: int, group: int, per_host: int, root: int = 0) -> float:
    """Bytes of one call (`nbytes` sent per rank, cost-model count) crossing links, all hosts;
    `root`: the broadcast's root (member index)."""
    hosts = group // per_host
    if hosts <= 1:
        return 0.0
    if op == "all_reduce":  # gloo's ring: one edge per host crosses, carrying one rank's bytes
        return hosts * nbytes
    if op in ("all_to_all", "reduce_scatter"):  # pairwise: N-P of a rank's N-1 blocks cross
        return group * (group - per_host) * nbytes / (group - 1)
    if op == "all_gather":  # one broadcast of nbytes/(N-1) rooted at each member
        return sum(bcast_crossings(r, group, per_host) for r in range(group)) * nbytes / (
            group - 1)
    if op == "broadcast":
        return bcast_crossings(root, group, per_host) * nbytes
    raise ValueError(f"op={op!r}: no crossing pattern")


def link_bytes(s: Strategy, shape: Shape, tokens: int, per_host: int,
               threshold: int | None = None) -> float:
    """Bytes one forward step of `tokens` tokens on strategy `s` sends across the links of all
    hosts together, by the cost model (shape.tp ranks, `per_host` contiguous ranks per host;
    layer i's owner broadcast is rooted at member i mod N, as ShardedSeries places it);
    `threshold`: auto's resolved crossover."""
    calls = step_calls(s.path(tokens, threshold), shape, tokens)
    total = sum(_crossing(c.op, c.nbytes, c.group, per_host) for c in calls)
    fetches = step_fetches(s, shape, tokens, threshold)
    return total + sum(_crossing(c.op, c.nbytes, c.group, per_host, root=i % c.group)
                       for i, c in enumerate(fetches))


# ---- the benchmark: `flashcomm bench hosts` ---------------------------------------------------

BENCH_MODEL = dict(hidden_size=1024, intermediate_size=2048, num_hidden_layers=4,
                   num_attention_heads=16, num_key_value_heads=4, head_dim=64)
"""H = D = 1024, fp32: the size DESIGN.md's link measurements used."""


def bench_strategies(profile: str) -> tuple[list[dict], list[str]]:
    """(Strategy kwargs, label) of the benchmark: stock twice (the A/A control), FlashComm2,
    + int8, + the gather source, and auto on the profile fitted across the hosts."""
    fc2 = dict(attn_out="flashcomm2", otp=1)
    rows = [({}, "allreduce"), ({}, "allreduce(A/A)"), (fc2, "fc2"),
            ({**fc2, "comm_dtype": "int8"}, "fc2+int8"),
            ({**fc2, "oshard_k": 1, "shard_source": "gather"}, "fc2+gather(k=1)"),
            ({"attn_out": "auto", "otp": 1, "profile": profile}, "auto")]
    return [r for r, _ in rows], [label for _, label in rows]


def add_arguments(parser: Any) -> None:
    """Options of `flashcomm bench hosts`."""
    parser.add_argument("--out", default="results/hosts", help="output directory")
    parser.add_argument("--rates", default="500,2000,10000",
                        help="link rates in Mbit/s, comma-separated")
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--decode-batch", type=int, default=4)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds")
    parser.add_argument("--model", default="", help="checkpoint (default: a random "
                        "H=1024, 4-layer Llama written under --out)")
    parser.add_argument("--timeout", type=float, default=1500.0, help="seconds per launch")


def _ids(n: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(3, 250) for _ in range(n)]


def run_rate(c: Cluster, rate: float, model: str, out: Path, args: Any) -> dict:
    """One link rate: `bench comm --fit` across the hosts, then every strategy timed."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    fit = torchrun_on_hosts(c, 1, ["-m", "flashcomm.cli", "bench", "comm", "--fit", "--out",
                                   str(out)], timeout_s=args.timeout)
    for i, r in enumerate(fit):
        if r.returncode:
            raise RuntimeError(f"bench comm --fit on host {i} failed:\n{r.stderr[-3000:]}")
    profile = str(out / "profile.json")
    strategies, labels = bench_strategies(profile)
    spec = dict(model=model, strategies=strategies, labels=labels, prompts=[_ids(12, 0)],
                max_new_tokens=4, bytes_prompts=[_ids(args.prefill_tokens, 1)],
                out=str(out / "ranks.json"), group_timeout_s=300, rounds=args.rounds,
                prefill_tokens=args.prefill_tokens, decode_batch=args.decode_batch,
                decode_tokens=args.decode_tokens)
    (out / "spec.json").write_text(json.dumps(spec))
    res = torchrun_on_hosts(c, 1, ["-m", "flashcomm.bench.hosts_rank", "--spec",
                                   str(out / "spec.json")], timeout_s=args.timeout)
    for i, r in enumerate(res):
        if r.returncode:
            raise RuntimeError(f"hosts_rank on host {i} failed:\n{r.stderr[-3000:]}")
    ranks = json.loads((out / "ranks.json").read_text())
    print(f"rate {rate:g} Mbit/s: fit and {args.rounds} rounds in "
          f"{time.monotonic() - t0:.0f} s", flush=True)
    return {"rate_mbit": rate, "profile": json.loads(Path(profile).read_text()),
            "ranks": ranks}


def main(args: Any) -> int:
    """Every rate: a fresh 2-host cluster (one core each), the fit, the timed strategies; then
    hosts.json and hosts.png (speed-up over stock against the link rate)."""
    from flashcomm.bench.cluster import unavailable
    from flashcomm.bench.hosts_report import plot, summarize
    from flashcomm.knobs import FlashCommError
    from flashcomm.models.random_checkpoint import small_llama_config, write_checkpoint

    why = unavailable()
    if why:
        raise FlashCommError(why)
    out = Path(args.out)
    model = args.model or str(out / "model")
    if not args.model and not (out / "model" / "config.json").exists():
        write_checkpoint(out / "model", small_llama_config(**BENCH_MODEL), seed=0)
    cores = sorted(os.sched_getaffinity(0))
    raw = []
    for rate in [float(r) for r in args.rates.split(",") if r]:
        with Cluster(2, rate_mbit=rate, cores=[[cores[0]], [cores[-1]]]) as c:
            raw.append(run_rate(c, rate, model, out / f"rate{rate:g}", args))
    result = summarize(raw, model, args)
    (out / "hosts.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "hosts.png")
    for row in result["rates"]:
        print(f"{row['rate_mbit']:g} Mbit/s: stock comm share {row['stock_comm_share']:.2f}")
        for st in row["strategies"]:
            print(f"  {st['label']:<16} prefill x{st['prefill_ratio']:.3f} (planner "
                  f"{st['predicted_prefill_ratio']:.3f}, limit {st['limit']:.3f}) generate "
                  f"x{st['generate_ratio']:.3f}  link {st['prefill_link_bytes'] / 2**20:.1f} MiB "
                  f"(model {st['model_link_bytes'] / 2**20:.1f})")
    print(f"wrote {out / 'hosts.json'} and {out / 'hosts.png'}")
    return 0
