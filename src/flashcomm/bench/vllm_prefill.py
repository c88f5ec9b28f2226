"""vLLM prefill latency: stock vLLM vs the flashcomm plugin (FlashComm2, + O-Shard), one run.

Needs the vLLM virtualenv (`make test-vllm` builds .venv-vllm). Every strategy is one LLM
instance (TP=2 by default, eager, fp32) created in turn in this process; the plugin reads its
FLASHCOMM* environment in the spawned workers. Prefill = generate() with max_tokens=1 on the same
batch of long prompts, median of 2 x --rounds (forward then reverse order, after a throwaway
instance and one warm-up call each). JSON + PNG go to --out.

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

STRATEGIES: dict[str, dict[str, str]] = {
    "stock": {},
    "fc2": {"FLASHCOMM2_PARALLEL_SIZE": "1"},
    "fc2_oshard_k1": {"FLASHCOMM2_PARALLEL_SIZE": "1", "FLASHCOMM_LAYER_SHARDING": "o_proj",
                      "FLASHCOMM_PREFETCH_STEP": "1"},
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
    """Options of the vLLM prefill benchmark."""
    parser.add_argument("--out", default="results/vllm_prefill", help="output directory")
    parser.add_argument("--model", help="checkpoint dir (default: build a random Llama)")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=512, help="tokens per prompt")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per batch")
    parser.add_argument("--rounds", type=int, default=5, help="timed prefill rounds")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help=f"comma-separated subset of {list(STRATEGIES)}")


def _measure(model: str, env: dict[str, str], prompts: list[str], tp: int,
             rounds: int) -> dict[str, Any]:
    from vllm import SamplingParams

    from flashcomm.vllm import llm_with_env

    max_len = len(prompts[0].split()) + 16
    with llm_with_env(env, model=model, tensor_parallel_size=tp, dtype="float32",
                      enforce_eager=True, kv_cache_memory_bytes=512 << 20, max_model_len=max_len,
                      max_num_batched_tokens=max_len * len(prompts), max_num_seqs=len(prompts),
                      seed=0, distributed_executor_backend="mp",
                      enable_prefix_caching=False) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        first = llm.generate(prompts, params, use_tqdm=False)  # warm-up
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            times.append(time.perf_counter() - t0)
    return {"prefill_s": times, "median_s": statistics.median(times),
            "first_tokens": [o.outputs[0].token_ids[0] for o in first]}


def main(args: argparse.Namespace) -> int:
    """Run every strategy on the same prompts; write JSON + PNG with ratios to stock."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model or str(build_random_llama(
        out / "model", layers=args.layers, hidden=args.hidden, heads=args.heads,
        kv_heads=args.heads // 2, head_dim=args.head_dim, intermediate=args.hidden * 2))
    prompts = [" ".join(WORDS[(13 * p + 7 * j) % len(WORDS)] for j in range(args.prompt_tokens))
               for p in range(args.prompts)]
    names = [s for s in args.strategies.split(",") if s]
    # The first LLM instance of a process runs ~1.4x slower (measured: whichever strategy came
    # first looked fastest or slowest by that much), so one throwaway instance warms the process
    # up, then the strategies run forward and again in reverse order, and the samples pool.
    _measure(model, STRATEGIES[names[0]], prompts, args.tp, 1)
    results: dict[str, dict[str, Any]] = {}
    for name in [*names, *reversed(names)]:
        res = _measure(model, STRATEGIES[name], prompts, args.tp, args.rounds)
        if name in results:
            res["prefill_s"] = results[name]["prefill_s"] + res["prefill_s"]
            res["median_s"] = statistics.median(res["prefill_s"])
        results[name] = res
    base = results.get("stock", results[names[0]])["median_s"]
    for res in results.values():
        res["ratio_to_stock"] = res["median_s"] / base
    report = {"args": vars(args), "model": model, "tokens_per_batch":
              args.prompt_tokens * args.prompts, "results": results}
    (out / "vllm_prefill.json").write_text(json.dumps(report, indent=1))
    _plot(results, out / "vllm_prefill.png")
    for name, res in results.items():
        print(f"{name:16s} median {res['median_s'] * 1e3:8.1f} ms  "
              f"ratio {res['ratio_to_stock']:.3f}  first tokens {res['first_tokens']}")
    return 0


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    names = list(results)
    ax.bar(names, [results[n]["ratio_to_stock"] for n in names])
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("prefill time / stock vLLM")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
