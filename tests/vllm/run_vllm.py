"""Run vLLM (fp32, TP=2 by default) on the tiny Llama and write greedy tokens and layer facts.

Usage: python run_vllm.py MODEL_DIR OUT_JSON RUNS_JSON
RUNS_JSON maps a run name to {"env": {...}, "eager": bool, "tp": int, "timeout": s, "llm": {...},
"prompt_scale": k} ("llm": more LLM arguments, e.g. pipeline_parallel_size; "prompt_scale": the
prompts k times as long, default 1): one LLM instance per run, in order,
created with those extra environment variables (read by the plugin
in the spawned workers; VLLM_CACHE_ROOT there picks the compile cache). All prompts of one
instance run as one batch. Each instance gets its own timeout (SIGALRM); the JSON is rewritten
after every run, so partial results survive a later hang.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback


def _layer_facts(worker) -> dict:
    """Runs inside each worker via collective_rpc: o_proj/qkv classes and the plugin report."""
    from flashcomm.vllm import worker_report

    return worker_report(worker)


def _alarm(signum, frame):
    raise TimeoutError("instance timed out")


def run_one(model: str, spec: dict, prompts: list[str], max_tokens: int) -> dict:
    """One LLM instance per `spec`; returns tokens, per-worker facts and timings."""
    from vllm import SamplingParams

    from flashcomm.vllm import llm_with_env

    t0 = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(spec.get("timeout", 600)))
    try:
        with llm_with_env(spec.get("env", {}), model=model, tensor_parallel_size=spec.get("tp", 2),
                          dtype="float32", enforce_eager=spec.get("eager", False),
                          kv_cache_memory_bytes=64 << 20, max_model_len=128, max_num_seqs=8,
                          seed=0, distributed_executor_backend="mp", **spec.get("llm", {})) as llm:
            t1 = time.perf_counter()
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            outs = llm.generate(prompts, params, use_tqdm=False)
            t2 = time.perf_counter()
            facts = llm.collective_rpc(_layer_facts)
        return {"tokens": [list(o.outputs[0].token_ids) for o in outs], "workers": facts,
                "startup_s": t1 - t0, "generate_s": t2 - t1}
    except BaseException as e:  # reported to the test, which asserts on it
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                "seconds": time.perf_counter() - t0}
    finally:
        signal.alarm(0)


def main() -> None:
    """Parse argv, run every named instance in order, write the JSON."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tiny_llama import prompts

    model, out, runs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    results = {}
    for name, spec in runs.items():
        print(f"=== run {name}: {spec}", flush=True)
        results[name] = run_one(model, spec, prompts(spec.get("prompt_scale", 1)),
                                max_tokens=spec.get("max_tokens", 16))
        print(f"=== run {name} done: {results[name].get('error', 'ok')}", flush=True)
        with open(out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    main()
