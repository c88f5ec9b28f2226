"""Shared by the plugin tests: run several LLM instances through run_vllm.py in one subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from flashcomm.config import FlashCommConfig

HERE = Path(__file__).parent
FC2 = {"FLASHCOMM2_PARALLEL_SIZE": "1"}
STOCK_FC2_OSHARD = {
    "stock": {},
    "fc2": FC2,
    "fc2_oshard_k1": {**FC2, "FLASHCOMM_LAYER_SHARDING": "o_proj", "FLASHCOMM_PREFETCH_STEP": "1"},
}
"""Stock vLLM, FlashComm2, and FlashComm2 + O-Shard k=1: the plugin's basic comparison."""


def run_instances(tmp: Path, model: Path, runs: dict[str, tuple[dict[str, str], bool]], *,
                  tp: int = 2, timeout: int = 240, max_tokens: int = 8,
                  prompt_scale: int = 1, llm: dict | None = None) -> dict:
    """run_vllm.py on `runs` (name -> (env, eager)) in one subprocess and ONE compile-cache
    root, each instance with its own timeout (`llm`: more LLM arguments for every instance);
    adds each run's report dir and the log path."""
    out, log = tmp / "runs.json", tmp / "vllm.log"
    specs = {}
    for name, (env, eager) in runs.items():
        env = {**env, "VLLM_CACHE_ROOT": str(tmp / "cache")}
        if "FLASHCOMM2_PARALLEL_SIZE" in env:
            env["FLASHCOMM_REPORT_DIR"] = str(tmp / "report" / name)
        specs[name] = {"env": env, "eager": eager, "tp": tp, "timeout": timeout,
                       "max_tokens": max_tokens, "prompt_scale": prompt_scale,
                       "llm": llm or {}}
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}
    for var in FlashCommConfig.env_names():  # the parent's environment must not leak in
        env.pop(var, None)
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(HERE / "run_vllm.py"), str(model), str(out),
                               json.dumps(specs)], stdout=f, stderr=subprocess.STDOUT, env=env,
                              timeout=timeout * len(runs) + 60, cwd=tmp)
    tail = log.read_text()[-4000:]
    assert proc.returncode == 0 and out.exists(), f"run_vllm.py failed:\n{tail}"
    results = json.loads(out.read_text())
    assert set(results) == set(runs), f"missing runs:\n{tail}"
    for name, res in results.items():
        res["report_dir"] = tmp / "report" / name
        res["log"] = log  # worker tracebacks (vLLM re-raises a generic error in the driver)
    return results


def run_eager(tmp_path_factory, build, runs: dict[str, dict[str, str]], max_tokens: int,
              llm: dict | None = None) -> dict:
    """Write a checkpoint with `build(dir)`, then run_instances with every run eager (name ->
    env, `llm`: more LLM arguments) on it; each run must end without error."""
    tmp = tmp_path_factory.mktemp(build.__name__)
    model = build(tmp / "model")
    results = run_instances(tmp, model, {name: (env, True) for name, env in runs.items()},
                            timeout=150, max_tokens=max_tokens, llm=llm)
    for name, res in results.items():
        assert "error" not in res, f"{name}: {res.get('traceback')}"
    return results
