"""Run vLLM instances (fp32) on one checkpoint with the given prompt ids; write greedy tokens.

Usage: python run_chat.py MODEL_DIR OUT_JSON RUNS_JSON PROMPT_IDS_JSON
RUNS_JSON maps a run name to {"env": {...}, "eager": bool, "tp": int, "timeout": s,
"max_tokens": n}: one LLM instance per run, in order, each with exactly those FLASHCOMM*
variables (llm_with_env), prompts given as token ids (already chat-templated), one batch,
stopping at the model's end-of-turn. The JSON is rewritten after every run.
"""

from __future__ import annotations

import json
import signal
import sys
import time
import traceback


def _alarm(signum, frame):
    raise TimeoutError("instance timed out")


def run_one(model: str, spec: dict, prompt_ids: list[list[int]]) -> dict:
    """One LLM instance per `spec`: tokens per prompt and timings, or the error."""
    from vllm import SamplingParams

    from flashcomm.vllm import llm_with_env

    t0 = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(spec.get("timeout", 600)))
    try:
        with llm_with_env(spec.get("env", {}), model=model, tensor_parallel_size=spec["tp"],
                          dtype="float32", enforce_eager=spec.get("eager", True),
                          kv_cache_memory_bytes=64 << 20, max_model_len=256, max_num_seqs=8,
                          seed=0, distributed_executor_backend="mp") as llm:
            t1 = time.perf_counter()
            params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"])
            outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params,
                                use_tqdm=False)
            t2 = time.perf_counter()
        return {"tokens": [list(o.outputs[0].token_ids) for o in outs],
                "text": [o.outputs[0].text for o in outs],
                "startup_s": t1 - t0, "generate_s": t2 - t1}
    except BaseException as e:  # reported to the test, which asserts on it
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    finally:
        signal.alarm(0)


def main() -> None:
    """Parse argv, run every named instance in order, write the JSON."""
    model, out, runs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    prompt_ids = json.loads(sys.argv[4])
    results = {}
    for name, spec in runs.items():
        print(f"=== run {name}: {spec}", flush=True)
        results[name] = run_one(model, spec, prompt_ids)
        print(f"=== run {name} done: {results[name].get('error', 'ok')}", flush=True)
        with open(out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
