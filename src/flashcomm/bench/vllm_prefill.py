"""vLLM end to end: stock vLLM vs the flashcomm plugin, prefill and decode-heavy generate, one run.

Needs the vLLM virtualenv (`make test-vllm` builds .venv-vllm). Every strategy is one LLM
instance (TP=2 by default, fp32, vLLM's default compiled mode unless --eager, its own compile
cache root), and all of them stay alive in this process; the plugin reads its FLASHCOMM*
environment in the spawned workers. Two workloads on the same prompts:
- prefill: generate() with max_tokens=1 on --prompts prompts of --prompt-tokens tokens;
- generate: --gen-prompts short prompts x --gen-tokens greedy tokens (decode-heavy).
After one warm-up call each, --rounds rounds call every strategy once per workload, in an order
that rotates per round; a ratio to stock is the median over rounds of (time / stock's time in the
same round), so machine load that drifts between rounds cancels; `best` is the ratio of the
fastest rounds (load spikes only add time). `stock_again`, a second stock instance, shows the
noise floor (A/A). Each timed call first waits until the other instances' workers have stopped
polling (`settle`).
JSON + PNG with the ratios go to --out.

    .venv-vllm/bin/python -m flashcomm.bench.vllm_prefill --out results/vllm_prefill
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

FC2 = {"FLASHCOMM2_PARALLEL_SIZE": "1"}
STRATEGIES: dict[str, dict[str, str]] = {
    "stock": {},
    "stock_again": {},  # a second stock instance: the A/A noise floor of this run
    "fc2": FC2,  # every step FlashComm2 (threshold 0)
    "fc2_oshard_k1": {**FC2, "FLASHCOMM_LAYER_SHARDING": "o_proj",
                      "FLASHCOMM_PREFETCH_STEP": "1"},
    "auto": {**FC2, "FLASHCOMM2_MIN_TOKENS": "auto"},  # per step, threshold fitted at start-up
    "auto_gather": {**FC2, "FLASHCOMM2_MIN_TOKENS": "auto", "FLASHCOMM_LAYER_SHARDING": "o_proj",
                    "FLASHCOMM_SHARD_SOURCE": "gather", "FLASHCOMM_PREFETCH_STEP": "1"},
}
WORDS = [f"w{i}" for i in range(500)]
QUIET_AFTER_S = 1.2
"""vLLM's workers busy-poll their shared-memory queue for 1 s after each read (MessageQueue's
busy_loop_s) before they sleep; a call to another instance inside that second shares the cores
with them (on 2 cores an A/A ratio of 1.07 with rounds up to 4x). Timed calls wait this long."""


def settle() -> None:
    """Wait until every idle instance's workers have stopped polling (QUIET_AFTER_S)."""
    time.sleep(QUIET_AFTER_S)


def build_random_llama(out: Path, *, layers: int, hidden: int, heads: int, kv_heads: int,
                       head_dim: int, intermediate: int, seed: int = 0, std: float = 0.1) -> Path:
    """A random fp32 Llama checkpoint with a local word-level tokenizer (w0 .. w499)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False, torch_dtype="float32")
    model = LlamaForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():  # larger than the default init so greedy tokens are well separated
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, std)
    model.save_pretrained(out, safe_serialization=True)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the vLLM benchmark."""
    parser.add_argument("--out", default="results/vllm_prefill", help="output directory")
    parser.add_argument("--model", help="checkpoint dir (default: build a random Llama)")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=512, help="tokens per prefill prompt")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per prefill batch")
    parser.add_argument("--gen-prompts", type=int, default=4, help="prompts of the generate run")
    parser.add_argument("--gen-tokens", type=int, default=32, help="greedy tokens per prompt")
    parser.add_argument("--rounds", type=int, default=21, help="interleaved timed rounds")
    parser.add_argument("--eager", action="store_true", help="enforce_eager (default: compiled)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help=f"comma-separated subset of {list(STRATEGIES)}")


def _facts(worker: Any) -> dict[str, Any]:
    from flashcomm.vllm import worker_report

    r = worker_report(worker)
    return {k: r.get(k) for k in ("flashcomm2_min_tokens", "impl", "o_proj_calls",
                                  "o_proj_fc2_calls", "resident_o_proj_bytes")}


def _start(stack: contextlib.ExitStack, model: str, env: dict[str, str], max_len: int,
           max_seqs: int, args: argparse.Namespace, cache: Path) -> Any:
    """One LLM instance, kept alive until `stack` closes (its own compile-cache root)."""
    from flashcomm.vllm import llm_with_env

    return stack.enter_context(llm_with_env(
        {**env, "VLLM_CACHE_ROOT": str(cache)}, model=model, tensor_parallel_size=args.tp,
        dtype="float32", enforce_eager=args.eager, kv_cache_memory_bytes=128 << 20,
        max_model_len=max_len, max_num_batched_tokens=max_len * max_seqs, max_num_seqs=max_seqs,
        seed=0, distributed_executor_backend="mp", enable_prefix_caching=False))


def _call(llm: Any, prompts: list[str], params: Any) -> tuple[float, list]:
    settle()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - t0, outs


def main(args: argparse.Namespace) -> int:
    """Every strategy's LLM alive at once; rounds interleave them (rotating order), so each
    round's ratio to stock compares calls made under the same machine load."""
    from vllm import SamplingParams

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model or str(build_random_llama(
        out / "model", layers=args.layers, hidden=args.hidden, heads=args.heads,
        kv_heads=args.heads // 2, head_dim=args.head_dim, intermediate=args.hidden * 2))
    work = {"prefill": [" ".join(WORDS[(13 * p + 7 * j) % len(WORDS)]
                                 for j in range(args.prompt_tokens)) for p in range(args.prompts)],
            "generate": [" ".join(WORDS[(11 * p + 3 * j) % len(WORDS)] for j in range(8 + 4 * p))
                         for p in range(args.gen_prompts)]}
    params = {"prefill": SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
              "generate": SamplingParams(temperature=0.0, max_tokens=args.gen_tokens,
                                         ignore_eos=True)}
    names = [s for s in args.strategies.split(",") if s]
    max_len = args.prompt_tokens + args.gen_tokens + 8
    max_seqs = max(args.prompts, args.gen_prompts)
    results: dict[str, dict[str, Any]] = {n: {"prefill_s": [], "generate_s": []} for n in names}
    with contextlib.ExitStack() as stack:
        llms = {}
        for n in names:
            t0 = time.perf_counter()
            llms[n] = _start(stack, model, STRATEGIES[n], max_len, max_seqs, args,
                             out / "cache" / n)
            results[n]["startup_s"] = time.perf_counter() - t0
            for key in ("prefill", "generate"):  # warm-up; keep the tokens
                results[n][f"{key}_tokens"] = [list(o.outputs[0].token_ids)
                                               for o in _call(llms[n], work[key], params[key])[1]]
        for r in range(args.rounds):
            for i in range(len(names)):
                n = names[(i + r) % len(names)]  # rotate who goes first
                for key in ("prefill", "generate"):
                    results[n][f"{key}_s"].append(_call(llms[n], work[key], params[key])[0])
        for n in names:
            results[n]["facts"] = llms[n].collective_rpc(_facts)[0] if STRATEGIES[n] else {}
    base = results.get("stock", results[names[0]])
    for res in results.values():
        for key in ("prefill", "generate"):
            res[f"{key}_median_s"] = statistics.median(res[f"{key}_s"])
            per_round = [t / b for t, b in zip(res[f"{key}_s"], base[f"{key}_s"], strict=True)]
            res[f"{key}_ratio"] = statistics.median(per_round)  # median of paired ratios
            res[f"{key}_ratio_range"] = [min(per_round), max(per_round)]
            # best of rounds: load spikes only add time, so the minima compare the costs
            res[f"{key}_best_ratio"] = min(res[f"{key}_s"]) / min(base[f"{key}_s"])
        res["same_tokens_as_stock"] = all(res[f"{k}_tokens"] == base[f"{k}_tokens"]
                                          for k in ("prefill", "generate"))
    report = {"args": vars(args), "model": model, "mode": "eager" if args.eager else "compiled",
              "prefill_tokens_per_batch": args.prompt_tokens * args.prompts, "results": results}
    (out / "vllm_prefill.json").write_text(json.dumps(report, indent=1))
    _plot(results, out / "vllm_prefill.png")
    for name, res in results.items():
        print(f"{name:14s} prefill {res['prefill_median_s'] * 1e3:7.1f} ms "
              f"ratio {res['prefill_ratio']:.3f} best {res['prefill_best_ratio']:.3f}  "
              f"generate {res['generate_median_s'] * 1e3:7.1f} ms "
              f"ratio {res['generate_ratio']:.3f} best {res['generate_best_ratio']:.3f}  "
              f"same tokens {res['same_tokens_as_stock']}  {res['facts']}")
    return 0


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    names = list(results)
    for ax, key in zip(axes, ("prefill", "generate"), strict=True):
        ax.bar(names, [results[n][f"{key}_ratio"] for n in names])
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_ylabel(f"{key} time / stock vLLM")
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def set_cpu_worker_env() -> None:
    """Defaults for vLLM CPU workers of a benchmark: no core binding, in-process engine, one
    OpenMP thread per worker (no spin contention), freed memory kept as our ranks keep it."""
    from flashcomm.launch import CPU_MALLOC_ENV

    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for var, value in CPU_MALLOC_ENV.items():
        os.environ.setdefault(var, value)


if __name__ == "__main__":
    set_cpu_worker_env()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
