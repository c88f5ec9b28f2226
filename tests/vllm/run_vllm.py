"""Run vLLM (TP=2, eager, fp32) on the tiny Llama and write greedy tokens and layer facts as JSON.

Usage: python run_vllm.py MODEL_DIR OUT_JSON [NAME=ENV_JSON ...]
Each NAME=ENV_JSON is one LLM instance created with those extra environment variables (read by
the plugin in the spawned workers); all prompts of one instance run as one batch.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback


def _layer_facts(worker) -> dict:
    """Runs inside each worker via collective_rpc: o_proj/qkv classes and the plugin report."""
    from flashcomm.vllm import worker_report

    return worker_report(worker)


def run_one(model: str, env: dict[str, str], prompts: list[str], max_tokens: int) -> dict:
    """One LLM instance with `env` set; returns tokens, per-worker facts and timings."""
    from vllm import SamplingParams

    from flashcomm.vllm import llm_with_env

    t0 = time.perf_counter()
    try:
        with llm_with_env(env, model=model, tensor_parallel_size=2, dtype="float32",
                          enforce_eager=True, kv_cache_memory_bytes=64 << 20, max_model_len=128,
                          max_num_seqs=8, seed=0, distributed_executor_backend="mp") as llm:
            t1 = time.perf_counter()
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            outs = llm.generate(prompts, params, use_tqdm=False)
            t2 = time.perf_counter()
            facts = llm.collective_rpc(_layer_facts)
        return {"tokens": [list(o.outputs[0].token_ids) for o in outs], "workers": facts,
                "startup_s": t1 - t0, "generate_s": t2 - t1}
    except Exception as e:  # reported to the test, which asserts on it
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def main() -> None:
    """Parse argv, run every named instance in order, write the JSON."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tiny_llama import prompts

    model, out = sys.argv[1], sys.argv[2]
    results = {}
    for spec in sys.argv[3:]:
        name, env = spec.split("=", 1)
        results[name] = run_one(model, json.loads(env), prompts(), max_tokens=16)
        with open(out, "w") as f:  # partial results survive a later hang
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    main()
