"""Inside vLLM's workers: every implementation of the collectives the plugin's o_proj op can issue.

Candidates, per step size T (rows), timed in the same worker processes, in one run:
- all_reduce/vllm    vLLM's TP all-reduce (SHM on CPU): the row-parallel path, as stock
- all_gather/vllm    vLLM's TP all-gather (SHM on CPU)    | restores [T, H] after FlashComm2
- all_gather/ours    comm.all_gather_tokens on our group  |
- all_to_all/ours    comm.all_to_all on our odp group     | FlashComm2's exchange
- all_to_all/vllm    vLLM's TP all-gather + local select  | (otp = 1 only)
Each time is the slowest rank's median over rounds (flashcomm.vllm.fit.time_calls). JSON + PNG
go to --out; the ratios say which implementation the plugin should keep.

    .venv-vllm/bin/python -m flashcomm.bench.vllm_collectives --out results/vllm_collectives
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

NAMES = ("all_reduce/vllm", "all_gather/vllm", "all_gather/ours", "all_to_all/ours",
         "all_to_all/vllm")


def measure_in_worker(worker: Any, rows: list[int], rounds: int) -> list[dict[str, Any]]:
    """collective_rpc target: time every candidate on this worker's FlashComm state."""
    from flashcomm.vllm.fit import time_calls

    ctx = next(m.ctx for m in worker.model_runner.model.modules()
               if getattr(m, "flashcomm_layer", None) is not None and hasattr(m, "ctx"))
    hidden, d_otp = ctx.o_proj_shape
    out = time_calls(ctx, ctx.tp_coordinator(), NAMES, hidden, d_otp * ctx.cfg.flashcomm2_otp,
                     ctx.dtype, rows=tuple(rows), rounds=rounds)
    return [{"name": name, "rows": r, "bytes": call[2], "seconds": t}
            for name, r, call, t in out]


def main(args: argparse.Namespace) -> int:
    """One eager LLM with FlashComm2 on (so our groups exist); time; write JSON + PNG."""
    from flashcomm.bench.vllm_prefill import build_random_llama
    from flashcomm.vllm import llm_with_env

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model or str(build_random_llama(
        out / "model", layers=2, hidden=args.hidden, heads=args.hidden // 64,
        kv_heads=args.hidden // 128, head_dim=64, intermediate=args.hidden * 2))
    rows = [int(r) for r in args.rows.split(",")]
    with llm_with_env({"FLASHCOMM2_PARALLEL_SIZE": "1"}, model=model,
                      tensor_parallel_size=args.tp, dtype="float32", enforce_eager=True,
                      kv_cache_memory_bytes=64 << 20, max_model_len=256, seed=0,
                      distributed_executor_backend="mp") as llm:
        per_rank = llm.collective_rpc(measure_in_worker, args=(rows, args.rounds))
    results = per_rank[0]  # identical on every rank (slowest rank's times)
    table: dict[str, dict[int, float]] = {}
    for r in results:
        table.setdefault(r["name"], {})[r["rows"]] = r["seconds"]
    (out / "vllm_collectives.json").write_text(json.dumps(
        {"args": vars(args), "model": model, "results": results}, indent=1))
    print(f"{'candidate':18s}" + "".join(f"{f'T={t}':>11s}" for t in rows) + "   (ms)")
    for name, by_rows in table.items():
        print(f"{name:18s}" + "".join(f"{by_rows[t] * 1e3:11.3f}" for t in rows))
    _plot(table, rows, out / "vllm_collectives.png")
    return 0


def _plot(table: dict[str, dict[int, float]], rows: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, by_rows in table.items():
        ax.plot(rows, [by_rows[t] * 1e3 for t in rows], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens per step T")
    ax.set_ylabel("ms per call (slowest rank)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    from flashcomm.bench.vllm_prefill import set_cpu_worker_env

    set_cpu_worker_env()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/vllm_collectives")
    parser.add_argument("--model", help="checkpoint dir (default: a random 2-layer Llama)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--rows", default="1,4,16,128,512,2048")
    parser.add_argument("--rounds", type=int, default=7)
    raise SystemExit(main(parser.parse_args()))
