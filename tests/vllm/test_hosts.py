"""vLLM across two emulated hosts (flashcomm.bench.cluster): stock vs the plugin, same tokens.

Two hosts (network namespaces with a private /dev/shm, one bridge, 1 Gbit/s tbf egress, one core
each). Each instance is vLLM's offline engine with nnodes=2 on host 0 and vLLM's headless
multiproc executor (node_rank=1) on host 1, eager, on the tiny Llama: 4 prompts as one batch, 8
greedy tokens, plus one timed round whose bytes are read off the link. vLLM's CPU SHM
communicator turns itself off across hosts, so stock's all-reduce is gloo over the link.
- TP=4 over 2 hosts x 2 ranks: stock, FlashComm2, FlashComm2 + int8, auto (its fit runs across
  the link), O-Shard with the gather source (per-step threshold: prefill gathers, decode not);
- TP=2 over 2 hosts: stock and FlashComm2.
Needs root and iproute2; skips with the cluster's one-line reason where they are missing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# "vllm" alone would resolve to this tests/vllm directory when vLLM is not installed
pytest.importorskip("vllm.config", reason="vllm not installed; run make test-vllm")

from flashcomm.bench import vllm_hosts, vllm_hosts_work  # noqa: E402
from flashcomm.bench.cluster import Cluster, unavailable  # noqa: E402
from flashcomm.bench.vllm_hosts_report import summarize  # noqa: E402

HERE = Path(__file__).parent
FC2 = vllm_hosts_work.FC2
TP4 = {
    "stock": {},
    "fc2": FC2,
    "fc2_int8": {**FC2, "FLASHCOMM_COMM_DTYPE": "int8"},
    "auto": {**FC2, "FLASHCOMM2_MIN_TOKENS": "auto"},
    "gather": {**FC2, "FLASHCOMM2_MIN_TOKENS": "8", "FLASHCOMM_LAYER_SHARDING": "o_proj",
               "FLASHCOMM_SHARD_SOURCE": "gather", "FLASHCOMM_PREFETCH_STEP": "1"},
}
TP2 = {"stock": {}, "fc2": FC2}
EXACT = ("fc2", "auto", "gather")  # int8 changes the numbers: agreement is reported

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Both TP sizes on one 2-host cluster, one driver each; the summaries by TP."""
    sys.path.insert(0, str(HERE))
    from tiny_llama import build_tiny_llama, prompts

    tmp = tmp_path_factory.mktemp("hosts")
    model = build_tiny_llama(tmp / "tiny", num_layers=5)
    work = {"prefill": {"prompts": prompts(), "max_tokens": 1},
            "generate": {"prompts": prompts(), "max_tokens": 8}}
    out = {}
    with Cluster(hosts=2, rate_mbit=1000) as cluster:
        for tp, instances, port in ((4, TP4, 29600), (2, TP2, 29700)):
            # TP=2 also measures the share: one stock prefill unshaped, one shaped again
            spec = {"model": str(model), "tp": tp, "max_len": 128, "instances": instances,
                    "work": work, "rounds": 1, "unshaped_rounds": int(tp == 2), "base_port": port,
                    "out": str(tmp / f"tp{tp}")}
            raw = vllm_hosts.run_instances(cluster, spec, timeout=900)
            out[tp] = {"raw": raw, "summary": summarize(raw)["strategies"],
                       "share": summarize(raw)["stock_comm_share"],
                       "log": (tmp / f"tp{tp}" / "host0.log").read_text()}
    return out


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("tp", [4, 2])
def test_hosts_tokens_equal_stock(runs, tp):
    raw, summary = runs[tp]["raw"], runs[tp]["summary"]
    for name, res in raw.items():
        assert "error" not in res, f"TP={tp} {name}: {res['error']}"
    stock = raw["stock"]["generate_tokens"]
    assert len({tuple(t) for t in stock}) == 4  # the prompts give different tokens
    for name in (n for n in raw if n in EXACT):
        assert raw[name]["generate_tokens"] == stock, name
        assert raw[name]["prefill_tokens"] == raw["stock"]["prefill_tokens"], name
    if "fc2_int8" in summary:
        agree = summary["fc2_int8"]["generate_token_agreement"]
        print(f"TP={tp} fc2_int8 token agreement with stock: {agree:.3f}")
        assert raw["fc2_int8"]["prefill_tokens"] == raw["stock"]["prefill_tokens"]
    # across hosts vLLM's SHM all-reduce is off: stock's collectives go over gloo, on the link
    assert "CPU SHM communicator disabled for group tp" in runs[tp]["log"]
    assert summary["stock"]["prefill_link_bytes"] > 0


@pytest.mark.timeout(1200)
def test_hosts_plugin_ran_on_every_rank(runs):
    raw = runs[4]["raw"]
    for name in ("fc2", "fc2_int8", "gather"):
        facts = raw[name]["facts"]
        assert sorted(f["rank"] for f in facts) == [0, 1, 2, 3], name  # host 1's ranks too
        assert all(f["o_proj_fc2_calls"] > 0 for f in facts), name
    gather = raw["gather"]["facts"]
    assert all(f["o_proj_calls"] > f["o_proj_fc2_calls"] for f in gather)  # decode: row path
    auto = raw["auto"]["facts"]
    assert len({f["flashcomm2_min_tokens"] for f in auto}) == 1  # one threshold on every rank


@pytest.mark.timeout(1200)
def test_hosts_share_from_paired_rounds(runs):
    # the orchestrator unshaped the link for one prefill and shaped it again for the next
    stock = runs[2]["raw"]["stock"]
    assert len(stock["prefill_unshaped_s"]) == len(stock["prefill_shaped_s"]) == 1
    assert runs[2]["share"] == pytest.approx(
        1 - stock["prefill_unshaped_s"][0] / stock["prefill_shaped_s"][0])
    assert runs[2]["share"] < 1 and runs[4]["share"] is None
