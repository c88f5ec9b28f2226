"""The engine across emulated hosts: torchrun on every host of a flashcomm.bench.cluster, the
bytes the cost model says must cross the link, and the check of both against each other.

`torchrun_on_hosts` starts the README's multi-node recipe (one `torchrun --nnodes K
--node-rank i --master-addr <host 0>` per host) and waits for every host. The bytes the cost
model says must cross the link are flashcomm.bench.link_model.link_bytes.
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
from flashcomm.model_args import ModelArgs

MASTER_PORT = 29500
POSITION_ROOM = 8
"""Positions a prefill needs beyond its prompt: its one new token, with room to spare."""


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
    parser.add_argument("--sweep-tokens", default="1,4,16,64,256,1024",
                        help="prefill sizes at which stock and fc2 are timed to locate the "
                        "measured crossover (comma-separated; empty: no sweep)")
    parser.add_argument("--sweep-rounds", type=int, default=9,
                        help="interleaved rounds of the sweep (its prefills are short)")
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
    hidden = ModelArgs.from_dir(model).dim  # the in-context layers at the model's width
    fit = torchrun_on_hosts(c, 1, ["-m", "flashcomm.cli", "bench", "comm", "--fit", "--hidden",
                                   str(hidden), "--out", str(out)], timeout_s=args.timeout)
    for i, r in enumerate(fit):
        if r.returncode:
            raise RuntimeError(f"bench comm --fit on host {i} failed:\n{r.stderr[-3000:]}")
    profile = str(out / "profile.json")
    strategies, labels = bench_strategies(profile)
    spec = dict(model=model, strategies=strategies, labels=labels, prompts=[_ids(12, 0)],
                max_new_tokens=4, bytes_prompts=[_ids(args.prefill_tokens, 1)],
                out=str(out / "ranks.json"), group_timeout_s=300, rounds=args.rounds,
                prefill_tokens=args.prefill_tokens, decode_batch=args.decode_batch,
                decode_tokens=args.decode_tokens,
                sweep={"tokens": [int(t) for t in args.sweep_tokens.split(",") if t],
                       "rounds": args.sweep_rounds,
                       "strategies": [labels.index("allreduce"), labels.index("fc2")]})
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
    need = args.prefill_tokens + POSITION_ROOM
    if not args.model and not (out / "model" / "config.json").exists():
        write_checkpoint(out / "model", small_llama_config(
            **BENCH_MODEL, max_position_embeddings=max(2048, 1 << (need - 1).bit_length())), seed=0)
    limit = json.loads((Path(model) / "config.json").read_text()).get("max_position_embeddings")
    if limit is not None and need > limit:
        raise FlashCommError(f"--prefill-tokens={args.prefill_tokens}: the prefill needs {need} "
                             f"positions and {model} has max_position_embeddings={limit}; "
                             f"allowed: at most {limit - POSITION_ROOM}")
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
        cross = row["measured_crossover"]
        others = ", ".join(f"{k.replace('_', ' ')} {'never' if v is None else f'{v:.0f}'}"
                           for k, v in cross.items() if k in ("sign_test", "first_win"))
        print(f"  fc2 crossover: measured {cross['text']} ({others}), planner "
              f"{row['predicted_crossover_tokens']}")
    print(f"wrote {out / 'hosts.json'} and {out / 'hosts.png'}")
    return 0
