"""vLLM across emulated hosts: stock vs the flashcomm plugin over one shaped link, per link rate.

Needs root, iproute2 (flashcomm.bench.cluster) and the vLLM virtualenv. For each --rates value a
2-host cluster is built (network namespaces, private /dev/shm, one bridge, tbf egress; each host
owns its core). Every strategy is one vLLM instance of TP=--tp over the 2 hosts (TP/2 ranks per
host): vLLM's offline engine with nnodes=2, node_rank=0 on host 0 (the driver, this file's
`driver` role) and vLLM's headless multiproc executor (node_rank=1, as `vllm serve --headless`
runs it) on host 1, each instance on its own master port; the instances of one --strategies
group are alive at once (memory: ~3.8 GB per TP=4 instance), each group with its own stock,
on a fresh cluster at the same rate. vLLM's CPU SHM
communicator turns itself off across hosts, so stock's TP all-reduce is gloo over the link.

Workloads: prefill = one prompt of --prompt-tokens tokens, max_tokens=1; generate = --gen-prompts
short prompts x --gen-tokens greedy tokens. After a warm-up call (tokens kept) and
--warmup-rounds untimed rounds, --rounds rounds call every instance once per workload in a
rotating order; a ratio to stock is the median over
rounds of time / stock's time in that round; `stock_again` is the A/A control. The bytes of each
call are read off host 0's link counters (both directions). Then --unshaped-rounds rounds time
stock's prefill on the unshaped link next to one on the shaped link (the orchestrator switches
the shaping between them): share = 1 - median over rounds of t(unshaped) / t(rate) is stock's
communication share of its prefill (a lower bound: the unshaped veth still costs a little).
limit = 1 - share * (1 - bytes_ratio) is the best a strategy moving bytes_ratio of stock's link
bytes can reach.

Two instances running the same code differ by up to 13 % on the 2-core rig, more than the
differences being measured. --in-instance removes that offset: fc2 and fc2_int8 get the threshold
FLASHCOMM2_MIN_TOKENS=--prompt-tokens, and every instance also prefills the prompt one token
shorter (workload prefill_below), which takes vLLM's own GEMM and all-reduce there. The ratio of
the two in each round is FlashComm2 against the all-reduce inside one instance; stock's own ratio
is the control for the one token.

    sudo .venv-vllm/bin/python -m flashcomm.bench.vllm_hosts --out results/vllm_hosts
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from flashcomm.bench.vllm_hosts_report import plot, print_rate, summarize
from flashcomm.bench.vllm_hosts_work import (
    DEFAULT_GROUPS,
    STRATEGIES,
    exact_prompts,
    strategy_env,
    workloads,
)

MARK = "@@vllm_hosts"
"""Prefix of the driver's requests to the orchestrator on stdout (vLLM logs share the stream)."""
COUNTS = ("bytes", "frames", "retrans")
"""What each timed call records off host 0 besides its time (_link_counts)."""
BASE_PORT = 29600
UNSHAPED_MBIT = 100_000.0
"""'Unshaped': tbf at 100 Gbit/s, far above what the veth carries."""
WORKER_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
              "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
"""Every process of an instance: vllm-cpu's platform (outside the offline path it is not
detected), taskset already pins each host to its cores, engine core in the driver process."""


def engine_kwargs(spec: dict[str, Any], port: int, node_rank: int) -> dict[str, Any]:
    """vLLM EngineArgs of one instance on one host; identical on every host but node_rank."""
    local = spec["tp"] // 2
    # vLLM 0.32 tells which ranks share a node by rank // device_count(), and a CPU platform
    # counts 1 device: with 2 ranks per host the driver then finds no local response queue for
    # its second rank (AssertionError in MultiprocExecutor). device_ids sets the count per node.
    extra = {"device_ids": list(range(local))} if local > 1 else {}
    return dict(**extra, model=spec["model"], tensor_parallel_size=spec["tp"], dtype="float32",
                enforce_eager=spec.get("eager", True), seed=0,
                kv_cache_memory_bytes=spec.get("kv_bytes", 128 << 20),
                max_model_len=spec["max_len"], max_num_batched_tokens=spec["max_len"],
                max_num_seqs=spec.get("max_seqs", 8), enable_prefix_caching=False,
                distributed_executor_backend="mp", nnodes=2, node_rank=node_rank,
                master_addr=spec["master_addr"], master_port=port)


def instance_env(spec: dict[str, Any], name: str, env: dict[str, str]) -> dict[str, str]:
    """The FLASHCOMM* knobs of one instance and its own compile-cache root."""
    return {**env, "VLLM_CACHE_ROOT": str(Path(spec["out"]) / "cache" / name)}


# ---- host 1: vLLM's headless workers ----------------------------------------------------------

def headless(spec: dict[str, Any], name: str) -> None:
    """Host 1's side of one instance: vLLM's multiproc executor with node_rank=1, as
    `vllm serve --nnodes 2 --node-rank 1 --headless` starts it, until SIGTERM."""
    import signal

    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    port = spec["ports"][name]
    cfg = EngineArgs(**engine_kwargs(spec, port, 1)).create_engine_config(
        UsageContext.OPENAI_API_SERVER, headless=True)
    executor = MultiprocExecutor(cfg, monitor_workers=False)
    try:
        executor.start_worker_monitor(inline=True)
    finally:
        executor.shutdown()


# ---- host 0: the engines, the rounds ----------------------------------------------------------

def _link_counts() -> tuple[int, int, int]:
    """(bytes, frames, TCP segments retransmitted) through this host's link so far, both
    directions; the TCP counter is this network namespace's (/proc/net/snmp), i.e. the host's."""
    from flashcomm.bench.cluster import IFACE

    base = Path("/sys/class/net") / IFACE / "statistics"
    read = [int((base / f).read_text()) for f in ("tx_bytes", "rx_bytes", "tx_packets",
                                                  "rx_packets")]
    names, values = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines()
                     if ln.startswith("Tcp:")]
    return read[0] + read[1], read[2] + read[3], int(values[names.index("RetransSegs")])


def _call(llm: Any, prompts: list[str], params: Any) -> tuple[float, list[int], list]:
    """One generate(): seconds, what it added to the link counts (_link_counts), outputs
    (after the other instances' workers have stopped polling)."""
    from flashcomm.bench.vllm_prefill import settle

    settle()
    c0 = _link_counts()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    return dt, [b - a for a, b in zip(c0, _link_counts(), strict=True)], outs


def _facts(worker: Any) -> dict[str, Any]:
    from flashcomm.vllm import worker_report

    r = worker_report(worker)
    return {k: r.get(k) for k in ("rank", "flashcomm2_min_tokens", "impl", "impl_seconds",
                                  "o_proj_calls", "o_proj_fc2_calls", "resident_o_proj_bytes")}


def _ask(what: str) -> None:
    """Ask the orchestrator for `what` and wait for its answer on stdin."""
    print(f"{MARK} {what}", flush=True)
    if sys.stdin.readline().strip() != "ok":
        raise RuntimeError(f"orchestrator did not grant {what}")


def driver(spec: dict[str, Any]) -> None:
    """Host 0: every instance alive at once; warm-up, interleaved rounds, unshaped stock, JSON."""
    from vllm import SamplingParams

    from flashcomm.vllm import llm_with_env

    names, work = list(spec["instances"]), spec["work"]
    params = {k: SamplingParams(temperature=0.0, max_tokens=w["max_tokens"], ignore_eos=True)
              for k, w in work.items()}
    res: dict[str, dict[str, Any]] = {n: {} for n in names}
    prompts: dict[str, list] | None = None
    out = Path(spec["out"]) / "driver.json"
    with contextlib.ExitStack() as stack:
        llms = {}
        for n in names:
            _ask(f"start {n}")  # host 1's side first, one instance at a time (imports are slow)
            t0 = time.perf_counter()
            try:
                llms[n] = stack.enter_context(llm_with_env(
                    instance_env(spec, n, spec["instances"][n]),
                    **engine_kwargs(spec, spec["ports"][n], 0)))
            except Exception as e:  # reported per instance; the rest still run
                res[n]["error"] = f"{type(e).__name__}: {e}"
                print(f"{MARK} failed {n}: {traceback.format_exc()}", flush=True)
                continue
            res[n]["startup_s"] = time.perf_counter() - t0
            if prompts is None:  # the tokenizer is the model's, the same in every instance
                prompts = {k: exact_prompts(llms[n], w) for k, w in work.items()}
            for k in work:
                outs = _call(llms[n], prompts[k], params[k])[2]
                res[n][f"{k}_tokens"] = [list(o.outputs[0].token_ids) for o in outs]
                res[n][f"{k}_prompt_tokens"] = [len(o.prompt_token_ids) for o in outs]
                res[n].update({f"{k}_{m}": [] for m in ("s", *COUNTS)})
        alive = [n for n in names if n in llms]
        warmup, kinds = spec.get("warmup_rounds", 0), list(work)
        for r in range(warmup + spec["rounds"]):
            for i in range(len(alive)):
                n = alive[(i + r) % len(alive)]
                for j in range(len(kinds)):  # workloads rotate too: none always runs first
                    k = kinds[(j + r) % len(kinds)]
                    dt, counts, _ = _call(llms[n], prompts[k], params[k])
                    if r < warmup:  # stock_again's first timed round ran 15-50 % slow in two runs
                        continue
                    res[n][f"{k}_s"].append(dt)
                    for m, v in zip(COUNTS, counts, strict=True):
                        res[n][f"{k}_{m}"].append(v)
        controls = [n for n in ("stock", "stock_again") if n in llms]
        if spec.get("unshaped_rounds") and controls:
            for n in controls:  # paired: each unshaped prefill next to a shaped one
                res[n]["prefill_unshaped_s"], res[n]["prefill_shaped_s"] = [], []
            for r in range(spec["unshaped_rounds"]):
                for shaped in (r % 2 == 1, r % 2 == 0):  # which one first alternates
                    _ask("shape" if shaped else "unshape")
                    for n in controls[r % 2:] + controls[:r % 2]:
                        res[n]["prefill_shaped_s" if shaped else "prefill_unshaped_s"].append(
                            _call(llms[n], prompts["prefill"], params["prefill"])[0])
        for n in alive:
            if STRATEGIES.get(n) or spec["instances"][n]:
                res[n]["facts"] = llms[n].collective_rpc(_facts)
        out.write_text(json.dumps(res))
    print(f"{MARK} done", flush=True)


# ---- the orchestrator (root namespace) --------------------------------------------------------

def _module_argv(role: str, spec_path: Path, name: str = "") -> list[str]:
    return [sys.executable, "-m", "flashcomm.bench.vllm_hosts", "--role", role,
            "--spec", str(spec_path), *(["--name", name] if name else [])]


def run_instances(cluster: Any, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run `spec` on a started 2-host cluster: host 1's headless side of every instance, then the
    driver on host 0; unshape the link when the driver asks. Returns the driver's results."""
    from flashcomm.config import FlashCommConfig

    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "master_addr": cluster.addr(0),
            "ports": {n: spec.get("base_port", BASE_PORT) + 10 * i
                      for i, n in enumerate(spec["instances"])}}
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(spec))
    base = {k: v for k, v in os.environ.items() if k not in FlashCommConfig.env_names()}
    procs = []
    with open(out / "host1.log", "w") as log1, open(out / "host0.log", "w") as log0:
        try:
            drv = cluster.popen(0, _module_argv("driver", spec_path), env={**base, **WORKER_ENV},
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
            timer = threading.Timer(timeout, drv.kill)
            timer.start()
            assert drv.stdout is not None and drv.stdin is not None
            for line in drv.stdout:
                log0.write(line)
                if not line.startswith(MARK):
                    continue
                what = line.split()[1:]
                if what[:1] in (["unshape"], ["shape"]):
                    for i in range(2):
                        cluster.set_rate(i, UNSHAPED_MBIT if what[0] == "unshape"
                                         else cluster.rate_mbit)
                elif what[:1] == ["start"]:
                    name = what[1]
                    procs.append(cluster.popen(
                        1, _module_argv("headless", spec_path, name),
                        env={**base, **WORKER_ENV,
                             **instance_env(spec, name, spec["instances"][name])},
                        stdout=log1, stderr=subprocess.STDOUT))
                else:
                    continue
                drv.stdin.write("ok\n")
                drv.stdin.flush()
            rc = drv.wait()
            timer.cancel()
        finally:
            for p in procs:
                with contextlib.suppress(OSError):
                    os.killpg(p.pid, 15)
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, 9)
    result = out / "driver.json"
    if rc != 0 or not result.exists():
        tail = (out / "host0.log").read_text()[-3000:]
        raise RuntimeError(f"vllm_hosts driver on host 0 ended with {rc} (timeout {timeout} s):"
                           f"\n{tail}")
    return json.loads(result.read_text())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the cross-host vLLM benchmark."""
    parser.add_argument("--out", default="results/vllm_hosts", help="output directory")
    parser.add_argument("--model", help="checkpoint dir (default: build a random Llama)")
    parser.add_argument("--tp", type=int, default=4, help="TP size over the 2 hosts (even)")
    parser.add_argument("--rates", default="100,1000,10000", help="link rates, Mbit/s")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--gen-prompts", type=int, default=4)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds")
    parser.add_argument("--warmup-rounds", type=int, default=2,
                        help="untimed rounds before them (every instance, every workload)")
    parser.add_argument("--unshaped-rounds", type=int, default=6,
                        help="rounds of a stock prefill on the unshaped link next to one on the "
                        "shaped link (the share)")
    parser.add_argument("--strategies", default=DEFAULT_GROUPS,
                        help=f"groups separated by ';' of comma-separated names from "
                        f"{list(STRATEGIES)}, each starting with stock: the instances of a group "
                        "are alive together (a TP=4 instance holds ~3.8 GB over the 2 hosts: "
                        "at most 3 per group on 24 GB)")
    parser.add_argument("--in-instance", action="store_true",
                        help="fc2 and fc2_int8 take FlashComm2 from --prompt-tokens tokens on, "
                        "and every instance also prefills a prompt one token shorter (vLLM's "
                        "all-reduce below that threshold): FlashComm2 against the all-reduce "
                        "inside one instance, free of the offset between instances")
    parser.add_argument("--timeout", type=float, default=3000, help="seconds per rate")


def main(args: argparse.Namespace) -> int:
    """One cluster per rate, every strategy's instance alive in it; JSON + plot to --out."""
    from flashcomm.bench.cluster import Cluster, unavailable
    from flashcomm.bench.vllm_prefill import build_random_llama

    why = unavailable()
    if why:
        print(f"vllm_hosts: {why}", file=sys.stderr)
        return 2
    if (args.rounds < 1 or args.warmup_rounds < 0 or args.unshaped_rounds < 0
            or args.prompt_tokens < 2):
        raise SystemExit(f"--rounds={args.rounds} --warmup-rounds={args.warmup_rounds} "
                         f"--unshaped-rounds={args.unshaped_rounds} --prompt-tokens="
                         f"{args.prompt_tokens}: allowed are --rounds >= 1, --warmup-rounds >= 0, "
                         "--unshaped-rounds >= 0 and --prompt-tokens >= 2")
    groups = [[s for s in g.split(",") if s] for g in args.strategies.split(";") if g]
    for names in groups:
        bad = [s for s in names if s not in STRATEGIES]
        if bad or names[:1] != ["stock"]:
            raise SystemExit(f"--strategies={args.strategies}: each group starts with stock; "
                             f"names from {list(STRATEGIES)}")
    out = Path(args.out).resolve()
    model = args.model or str(build_random_llama(
        out / "model", layers=args.layers, hidden=args.hidden, heads=args.heads,
        kv_heads=args.heads // 2, head_dim=args.head_dim, intermediate=args.hidden * 2))
    work = workloads(args.prompt_tokens, args.gen_prompts, args.gen_tokens, args.in_instance)
    report: dict[str, Any] = {"args": vars(args), "model": model, "rates": {}}
    cores = sorted(os.sched_getaffinity(0))
    half = max(1, len(cores) // 2)
    for rate in [float(r) for r in args.rates.split(",")]:
        t0 = time.perf_counter()
        raws, rows, share = [], {}, None
        for k, names in enumerate(groups):  # the first group measures the share
            spec = {"model": model, "tp": args.tp,
                    "max_len": args.prompt_tokens + args.gen_tokens + 64,
                    "instances": {n: strategy_env(n, args.prompt_tokens, args.in_instance)
                                  for n in names}, "work": work,
                    "rounds": args.rounds, "warmup_rounds": args.warmup_rounds,
                    "unshaped_rounds": args.unshaped_rounds if k == 0 else 0,
                    "out": str(out / f"rate_{rate:g}" / f"group{k}")}
            with Cluster(hosts=2, rate_mbit=rate,
                         cores=[cores[:half], cores[half:] or cores[:1]]) as c:
                raws.append(run_instances(c, spec, args.timeout))
            summary = summarize(raws[-1], share)
            share = summary["stock_comm_share"]
            rows.update({n: r for n, r in summary["strategies"].items() if n not in rows})
        report["rates"][f"{rate:g}"] = {"stock_comm_share": share, "strategies": rows,
                                        "raw": raws, "loadavg": os.getloadavg(),
                                        "wall_s": time.perf_counter() - t0}
        (out / "vllm_hosts.json").write_text(json.dumps(report, indent=1))
        print_rate(rate, report["rates"][f"{rate:g}"])
    plot(report, out / "vllm_hosts.png")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--role", choices=("main", "driver", "headless"), default="main",
                        help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.role == "driver":
        driver(json.loads(Path(cli.spec).read_text()))
    elif cli.role == "headless":
        headless(json.loads(Path(cli.spec).read_text()), cli.name)
    else:
        import signal

        # SIGTERM (e.g. from `timeout`) must unwind through `with Cluster`, which kills every
        # process on the hosts and deletes the namespaces
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        raise SystemExit(main(cli))
