"""vLLM decode tax: the plugin's o_proj op against stock's o_proj + all-reduce, and generate.

Needs the vLLM virtualenv (`make test-vllm` builds .venv-vllm). A small random fp32 Llama
(default H=512, L=8), TP=2, vLLM's compiled mode; every strategy is one LLM instance, all alive
in this process (each its own compile-cache root):
- stock, stock_again (the A/A control: a second stock instance);
- never: FLASHCOMM2_MIN_TOKENS=auto (fitted at start-up; on one machine FlashComm2 never wins,
  so the plugin keeps stock's layers and graph, see `mode` in the facts);
- t64: FLASHCOMM2_MIN_TOKENS=64, the per-step op (decode steps take its row-parallel path).
--rounds rounds of one decode-heavy generate per instance, in an order that rotates; then
--rounds rounds, inside the workers of stock and t64, of microseconds per call of one layer's
o_proj at a decode-sized T (stock: vLLM's GEMM, its all-reduce, both; ours: the flashcomm::o_proj
op as the compiled graph calls it), the slowest rank's mean over --calls back-to-back calls.
Ratios are medians over rounds of (time / stock's time in the same round); every timed call
first waits for the other instances' workers to stop polling (vllm_prefill.settle). JSON + PNG
go to --out.

    .venv-vllm/bin/python -m flashcomm.bench.vllm_decode --out results/vllm_decode
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

from flashcomm.bench.vllm_prefill import WORDS, build_random_llama, set_cpu_worker_env, settle

FC2 = {"FLASHCOMM2_PARALLEL_SIZE": "1"}
STRATEGIES: dict[str, dict[str, str]] = {
    "stock": {},
    "stock_again": {},
    "never": {**FC2, "FLASHCOMM2_MIN_TOKENS": "auto"},
    "t64": {**FC2, "FLASHCOMM2_MIN_TOKENS": "64"},
}
O_PROJ = "model.layers.0.self_attn.o_proj"


def time_o_proj(worker: Any, tokens: int, calls: int, reps: int = 5) -> dict[str, float]:
    """Inside a worker: microseconds per call of layer 0's o_proj paths at `tokens` tokens: the
    least over `reps` samples of the slowest rank's mean over `calls` back-to-back calls (load
    from other processes only adds time; collective over TP)."""
    import torch
    import torch.distributed as dist
    from vllm.distributed import get_tp_group
    from vllm.forward_context import set_forward_context

    layer = dict(worker.model_runner.model.named_modules())[O_PROJ]
    tp = get_tp_group()
    x = torch.randn(tokens, layer.input_size // tp.world_size)  # [T, D/N]
    if getattr(layer, "flashcomm_layer", None) is None:  # vLLM's own layer
        y = layer.quant_method.apply(layer, x, None)
        paths = {"gemm": lambda: layer.quant_method.apply(layer, x, None),
                 "all_reduce": lambda: tp.device_communicator.all_reduce(y),
                 "o_proj": lambda: tp.device_communicator.all_reduce(
                     layer.quant_method.apply(layer, x, None))}
    else:  # the op as the graph calls it, its Python body alone, its GEMM and collective
        paths = {"o_proj": lambda: torch.ops.flashcomm.o_proj(x, layer.output_size,
                                                              layer.layer_name),
                 "body": lambda: layer.flashcomm_o_proj(x)}
        if getattr(layer, "row_gemm", None) is not None:
            y = layer.row_gemm(x)
            paths.update(gemm=lambda: layer.row_gemm(x),
                         all_reduce=lambda: tp.device_communicator.all_reduce(y))
    samples = []  # [path][rep] microseconds per call on this rank
    with set_forward_context(None, worker.vllm_config):
        for fn in paths.values():
            for _ in range(10):
                fn()
            samples.append([])
            for _ in range(reps):
                dist.barrier(group=tp.cpu_group)
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                samples[-1].append((time.perf_counter() - t0) / calls * 1e6)
    slowest = torch.tensor(samples, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=tp.cpu_group)
    return {k: min(s) for k, s in zip(paths, slowest.tolist(), strict=True)}


def _facts(worker: Any) -> dict[str, Any]:
    from flashcomm.vllm import worker_report

    r = worker_report(worker)
    return {k: r.get(k) for k in ("mode", "flashcomm2_min_tokens", "threshold_source",
                                  "o_proj_calls", "o_proj_fc2_calls", "compiled_ops")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the decode benchmark."""
    parser.add_argument("--out", default="results/vllm_decode", help="output directory")
    parser.add_argument("--model", help="checkpoint dir (default: build a random Llama)")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--gen-prompts", type=int, default=4, help="prompts of the generate run")
    parser.add_argument("--gen-tokens", type=int, default=32, help="greedy tokens per prompt")
    parser.add_argument("--tokens", type=int, default=4, help="T of the per-call timing")
    parser.add_argument("--calls", type=int, default=100, help="calls per timing sample")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timed rounds")
    parser.add_argument("--eager", action="store_true", help="enforce_eager (default: compiled)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help=f"comma-separated subset of {list(STRATEGIES)}")


def _start(stack: contextlib.ExitStack, model: str, env: dict[str, str],
           args: argparse.Namespace, cache: Path) -> Any:
    from flashcomm.vllm import llm_with_env

    return stack.enter_context(llm_with_env(
        {**env, "VLLM_CACHE_ROOT": str(cache)}, model=model, tensor_parallel_size=args.tp,
        dtype="float32", enforce_eager=args.eager, kv_cache_memory_bytes=64 << 20,
        max_model_len=256, max_num_batched_tokens=1024, max_num_seqs=8, seed=0,
        distributed_executor_backend="mp", enable_prefix_caching=False))


def _ratios(times: list[float], base: list[float]) -> dict[str, Any]:
    per_round = [t / b for t, b in zip(times, base, strict=True)]
    return {"median": statistics.median(times), "ratio": statistics.median(per_round),
            "ratio_range": [min(per_round), max(per_round)],
            "best_ratio": min(times) / min(base)}


def main(args: argparse.Namespace) -> int:
    """Every strategy alive at once; per round, the per-call timings then one generate each."""
    from vllm import SamplingParams

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model or str(build_random_llama(
        out / "model", layers=args.layers, hidden=args.hidden, heads=args.heads,
        kv_heads=args.heads // 2, head_dim=args.head_dim, intermediate=args.hidden * 2))
    prompts = [" ".join(WORDS[(11 * p + 3 * j) % len(WORDS)] for j in range(8 + 4 * p))
               for p in range(args.gen_prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=args.gen_tokens, ignore_eos=True)
    names = [s for s in args.strategies.split(",") if s]
    timed = [n for n in names if n in ("stock", "t64")]  # per-call: stock's path and our op
    res: dict[str, dict[str, Any]] = {n: {"generate_s": [], "us": {}} for n in names}
    with contextlib.ExitStack() as stack:
        llms = {}
        for n in names:
            t0 = time.perf_counter()
            llms[n] = _start(stack, model, STRATEGIES[n], args, out / "cache" / n)
            res[n]["startup_s"] = time.perf_counter() - t0
            outs = llms[n].generate(prompts, params, use_tqdm=False)  # warm-up; keep tokens
            res[n]["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
        # generate rounds first, per-call rounds after: the in-worker timing loops leave
        # nothing behind that a generate of the same round could pay for
        for r in range(args.rounds):
            for n in (names[(i + r) % len(names)] for i in range(len(names))):
                settle()
                t0 = time.perf_counter()
                llms[n].generate(prompts, params, use_tqdm=False)
                res[n]["generate_s"].append(time.perf_counter() - t0)
        for r in range(args.rounds):
            for n in (timed[(i + r) % len(timed)] for i in range(len(timed))):
                settle()
                for k, v in llms[n].collective_rpc(time_o_proj,
                                                   args=(args.tokens, args.calls))[0].items():
                    res[n]["us"].setdefault(k, []).append(v)
        for n in names:
            res[n]["facts"] = llms[n].collective_rpc(_facts)[0]
    base = res[names[0]]
    for r_ in res.values():
        r_["generate"] = _ratios(r_["generate_s"], base["generate_s"])
        r_["us_median"] = {k: statistics.median(v) for k, v in r_["us"].items()}
        r_["same_tokens_as_stock"] = r_["tokens"] == base["tokens"]
    report = {"args": vars(args), "model": model, "mode": "eager" if args.eager else "compiled",
              "results": res}
    (out / "vllm_decode.json").write_text(json.dumps(report, indent=1))
    _plot(res, out / "vllm_decode.png")
    for n, r_ in res.items():
        g = r_["generate"]
        print(f"{n:12s} generate {g['median'] * 1e3:7.1f} ms ratio {g['ratio']:.3f} "
              f"[{g['ratio_range'][0]:.3f}, {g['ratio_range'][1]:.3f}] best {g['best_ratio']:.3f}"
              f"  us/call {({k: round(v, 1) for k, v in r_['us_median'].items()})}"
              f"  same tokens {r_['same_tokens_as_stock']}  mode {r_['facts'].get('mode')} "
              f"threshold {r_['facts'].get('flashcomm2_min_tokens')}")
    return 0


def _plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    names = list(res)
    axes[0].bar(names, [res[n]["generate"]["ratio"] for n in names])
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set_ylabel("generate time / stock vLLM")
    timed = {n: res[n]["us_median"]["o_proj"] for n in names if "o_proj" in res[n]["us_median"]}
    axes[1].bar(list(timed), list(timed.values()))
    axes[1].set_ylabel("o_proj + all-reduce, us per call")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    set_cpu_worker_env()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
