"""vLLM end to end: stock vLLM vs the flashcomm plugin, prefill and decode-heavy generate, one run.

Needs the vLLM virtualenv (`make test-vllm` builds .venv-vllm). Every strategy is one LLM
instance (TP=2 by default, fp32, vLLM's default compiled mode unless --eager) created in turn in
this process; the plugin reads its FLASHCOMM* environment in the spawned workers. Each instance
runs both workloads on the same prompts:
- prefill: generate() with max_tokens=1 on --prompts prompts of --prompt-tokens tokens;
- generate: --gen-prompts short prompts x --gen-tokens greedy tokens (decode-heavy).
Each sample is the median of --rounds calls; strategies run forward then in reverse order after a
throwaway instance, and the samples pool. Each strategy compiles into its own cache root, so its
second instance loads its graph. JSON + PNG with ratios to stock go to --out.

    .venv-vllm/bin/python -m flashcomm.bench.vllm_prefill --out results/vllm_prefill
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

FC2 = {"FLASHCOMM2_PARALLEL_SIZE": "1"}
STRATEGIES: dict[str, dict[str, str]] = {
    "stock": {},
    "fc2": FC2,  # every step FlashComm2 (threshold 0)
    "fc2_oshard_k1": {**FC2, "FLASHCOMM_LAYER_SHARDING": "o_proj",
                      "FLASHCOMM_PREFETCH_STEP": "1"},
    "auto": {**FC2, "FLASHCOMM2_MIN_TOKENS": "auto"},  # per step, threshold fitted at start-up
}
WORDS = [f"w{i}" for i in range(500)]


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
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per sample")
    parser.add_argument("--eager", action="store_true", help="enforce_eager (default: compiled)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help=f"comma-separated subset of {list(STRATEGIES)}")


def _timed(llm: Any, prompts: list[str], params: Any, rounds: int) -> tuple[float, list]:
    """Median seconds of `rounds` generate() calls (after one warm-up) and the first outputs."""
    first = llm.generate(prompts, params, use_tqdm=False)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first


def _facts(worker: Any) -> dict[str, Any]:
    from flashcomm.vllm import worker_report

    r = worker_report(worker)
    return {k: r.get(k) for k in ("flashcomm2_min_tokens", "impl", "o_proj_calls",
                                  "o_proj_fc2_calls", "resident_o_proj_bytes")}


def _measure(model: str, env: dict[str, str], work: dict[str, list[str]], args: argparse.Namespace,
             cache: Path) -> dict[str, Any]:
    from vllm import SamplingParams

    from flashcomm.vllm import llm_with_env

    max_len = max(len(p.split()) for p in work["prefill"]) + args.gen_tokens + 8
    with llm_with_env({**env, "VLLM_CACHE_ROOT": str(cache)}, model=model,
                      tensor_parallel_size=args.tp, dtype="float32", enforce_eager=args.eager,
                      kv_cache_memory_bytes=512 << 20, max_model_len=max_len,
                      max_num_batched_tokens=max_len * len(work["prefill"]),
                      max_num_seqs=max(len(work["prefill"]), len(work["generate"])), seed=0,
                      distributed_executor_backend="mp", enable_prefix_caching=False) as llm:
        one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        gen = SamplingParams(temperature=0.0, max_tokens=args.gen_tokens, ignore_eos=True)
        prefill_s, first = _timed(llm, work["prefill"], one, args.rounds)
        generate_s, outs = _timed(llm, work["generate"], gen, args.rounds)
        facts = llm.collective_rpc(_facts)[0] if env else {}
    return {"prefill_s": [prefill_s], "generate_s": [generate_s], "facts": facts,
            "first_tokens": [o.outputs[0].token_ids[0] for o in first],
            "generated": [list(o.outputs[0].token_ids) for o in outs]}


def main(args: argparse.Namespace) -> int:
    """Run every strategy on the same prompts; write JSON + PNG with ratios to stock."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model or str(build_random_llama(
        out / "model", layers=args.layers, hidden=args.hidden, heads=args.heads,
        kv_heads=args.heads // 2, head_dim=args.head_dim, intermediate=args.hidden * 2))
    work = {"prefill": [" ".join(WORDS[(13 * p + 7 * j) % len(WORDS)]
                                 for j in range(args.prompt_tokens)) for p in range(args.prompts)],
            "generate": [" ".join(WORDS[(11 * p + 3 * j) % len(WORDS)] for j in range(8 + 4 * p))
                         for p in range(args.gen_prompts)]}
    names = [s for s in args.strategies.split(",") if s]
    # The first LLM instance of a process runs slower (measured ~1.4x), so one throwaway
    # instance warms the process up; then forward and reverse order, samples pooled.
    _measure(model, STRATEGIES[names[0]], work, args, out / "cache" / names[0])
    results: dict[str, dict[str, Any]] = {}
    for name in [*names, *reversed(names)]:
        res = _measure(model, STRATEGIES[name], work, args, out / "cache" / name)
        if name in results:
            for key in ("prefill_s", "generate_s"):
                res[key] = results[name][key] + res[key]
        results[name] = res
    base = results.get("stock", results[names[0]])
    for res in results.values():
        for key in ("prefill", "generate"):
            res[f"{key}_median_s"] = statistics.median(res[f"{key}_s"])
            res[f"{key}_ratio"] = res[f"{key}_median_s"] / statistics.median(base[f"{key}_s"])
        res["same_tokens_as_stock"] = res["generated"] == base["generated"]
    report = {"args": vars(args), "model": model, "mode": "eager" if args.eager else "compiled",
              "prefill_tokens_per_batch": args.prompt_tokens * args.prompts, "results": results}
    (out / "vllm_prefill.json").write_text(json.dumps(report, indent=1))
    _plot(results, out / "vllm_prefill.png")
    for name, res in results.items():
        print(f"{name:14s} prefill {res['prefill_median_s'] * 1e3:8.1f} ms "
              f"({res['prefill_ratio']:.3f})  generate {res['generate_median_s'] * 1e3:8.1f} ms "
              f"({res['generate_ratio']:.3f})"
              f"  same tokens {res['same_tokens_as_stock']}  {res['facts']}")
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


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
