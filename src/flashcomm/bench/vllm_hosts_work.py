"""What flashcomm.bench.vllm_hosts runs: its strategies (FLASHCOMM* knobs per instance), the
workloads (prefill of exactly T tokens, generate, and with --in-instance the prefill of T - 1)
and the exact token ids of the prompts."""

from __future__ import annotations

from typing import Any

FC2 = {"FLASHCOMM2_PARALLEL_SIZE": "1"}
STRATEGIES: dict[str, dict[str, str]] = {
    "stock": {},
    "stock_again": {},  # a second stock instance: the A/A control
    "fc2": FC2,
    "fc2_int8": {**FC2, "FLASHCOMM_COMM_DTYPE": "int8"},
    "auto": {**FC2, "FLASHCOMM2_MIN_TOKENS": "auto"},  # threshold fitted across the link
    "auto_gather": {**FC2, "FLASHCOMM2_MIN_TOKENS": "auto", "FLASHCOMM_LAYER_SHARDING": "o_proj",
                    "FLASHCOMM_SHARD_SOURCE": "gather", "FLASHCOMM_PREFETCH_STEP": "1"},
}
DEFAULT_GROUPS = "stock,stock_again,fc2_int8;stock,fc2,auto;stock,auto_gather"
"""Instances alive together: ratios are to the stock instance of the same group."""


def workloads(prompt_tokens: int, gen_prompts: int, gen_tokens: int,
              in_instance: bool = False) -> dict[str, Any]:
    """Prefill: one prompt of exactly prompt_tokens tokens (exact_prompts cuts the text; the
    random Llama's tokenizer has a token per word); generate: short prompts; with in_instance,
    prefill_below: the same prompt one token shorter."""
    from flashcomm.bench.vllm_prefill import WORDS

    text = " ".join(WORDS[(7 * j + 3) % len(WORDS)] for j in range(prompt_tokens))
    short = [" ".join(WORDS[(11 * p + 3 * j) % len(WORDS)] for j in range(8 + 4 * p))
             for p in range(gen_prompts)]
    work = {"prefill": {"prompts": [text], "tokens": prompt_tokens, "max_tokens": 1},
            "generate": {"prompts": short, "max_tokens": gen_tokens}}
    if in_instance:
        work["prefill_below"] = {"prompts": [text], "tokens": prompt_tokens - 1, "max_tokens": 1}
    return work


def strategy_env(name: str, prompt_tokens: int, in_instance: bool) -> dict[str, str]:
    """The FLASHCOMM* knobs of one strategy; with in_instance, FlashComm2 without a threshold
    of its own gets FLASHCOMM2_MIN_TOKENS=prompt_tokens, so that its prefill takes FlashComm2
    and prefill_below (one token fewer) vLLM's all-reduce, in the same instance."""
    env = dict(STRATEGIES[name])
    if in_instance and env.get("FLASHCOMM2_PARALLEL_SIZE") and "FLASHCOMM2_MIN_TOKENS" not in env:
        env["FLASHCOMM2_MIN_TOKENS"] = str(prompt_tokens)
    return env


def exact_prompts(llm: Any, w: dict[str, Any]) -> list:
    """A workload's prompts; where it names `tokens`, its one text cut to exactly that many
    token ids of the model's tokenizer (the threshold of --in-instance sits between two)."""
    if not w.get("tokens"):
        return w["prompts"]
    ids = llm.get_tokenizer().encode(w["prompts"][0])
    if len(ids) < w["tokens"]:
        raise ValueError(f"the prompt text gives {len(ids)} tokens, fewer than {w['tokens']}")
    return [{"prompt_token_ids": ids[:w["tokens"]]}]
