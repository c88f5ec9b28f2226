"""otp > 1 inside vLLM: TP=4 with FLASHCOMM2_PARALLEL_SIZE=2 (odp groups [0,1], [2,3]) on the
tiny Llama, eager (4 workers on this machine's 2 cores; the ops are the compiled mode's).

The per-step threshold sends the prefill through FlashComm2 (all-to-all in the odp group, the
[H, D/2] slice, the otp reduce-scatter, all-gather) and decode steps through the row-parallel
product on each rank's own columns of that slice plus vLLM's all-reduce; with O-Shard the
shard group is the pair of ranks holding the same otp slice."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# "vllm" alone would resolve to this tests/vllm directory when vLLM is not installed
pytest.importorskip("vllm.config", reason="vllm not installed; run make test-vllm")

HERE = Path(__file__).parent
NUM_LAYERS = 3
HIDDEN = 128
OTP2 = {"FLASHCOMM2_PARALLEL_SIZE": "2", "FLASHCOMM2_MIN_TOKENS": "8"}
RUNS = {  # resident otp slices are TP=2's ResidentWeights; the ring covers both paths here
    "stock": ({}, True),
    "otp2_oshard_k0": ({**OTP2, "FLASHCOMM_LAYER_SHARDING": "o_proj",
                        "FLASHCOMM_PREFETCH_STEP": "0"}, True),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Build the checkpoint, run the TP=4 instances in one subprocess."""
    sys.path.insert(0, str(HERE))
    from tiny_llama import build_tiny_llama
    from vllm_runs import run_instances

    tmp = tmp_path_factory.mktemp("vllm_otp")
    model = build_tiny_llama(tmp / "tiny", num_layers=NUM_LAYERS)
    return run_instances(tmp, model, RUNS, tp=4, timeout=300, max_tokens=6)


@pytest.mark.timeout(1200)
def test_otp2_tokens_match_stock(runs):
    stock, res = runs["stock"], runs["otp2_oshard_k0"]
    assert "error" not in stock and "error" not in res, res.get("traceback")
    assert res["tokens"] == stock["tokens"]
    workers = sorted(res["workers"], key=lambda w: w["rank"])
    assert [w["rank"] for w in workers] == [0, 1, 2, 3]
    w_bytes = HIDDEN * HIDDEN // 2 * 4  # the [H, D/otp] slice, fp32
    for w in workers:
        assert w["layer_bytes"] == w_bytes
        assert 0 < w["o_proj_fc2_calls"] < w["o_proj_calls"]  # both paths ran
        # the shard group: the odp group holding the same otp slice
        assert w["shard_group"] == ([0, 1] if w["rank"] < 2 else [2, 3])
        owned = sum(1 for i in range(NUM_LAYERS) if i % 2 == w["rank"] % 2)
        assert w["resident_o_proj_bytes"] == (owned + 1) * w_bytes
        assert w["series"]["waits"] == w["o_proj_calls"]  # the ring turned on every step
