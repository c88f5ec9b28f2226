"""Every strategy on real gloo ranks (N = 2 and 4) against the single-process model.

The single-process model is itself checked against transformers in test_model.py, so identical
tokens and close logits here mean identical to Hugging Face as well. One spawned group per N runs
every (strategy, checkpoint) pair.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, prefill_logits

from flashcomm.config import FlashCommConfig
from flashcomm.layout import ParallelLayout
from flashcomm.models.engine import Engine
from flashcomm.models.transformer import ModelArgs

CKPTS = ("llama", "qwen2", "qwen3")
NEW_TOKENS = 32


def strategies(n: int) -> dict[str, tuple[FlashCommConfig, int]]:
    """name -> (knobs, flashcomm2_min_tokens)."""
    base = FlashCommConfig(tp=n)
    fc2 = replace(base, flashcomm2_otp=1)
    shard = ("o_proj",)
    rows = {
        "allreduce": (base, 0),
        "allreduce+fc1": (replace(base, flashcomm1=True), 0),
        "fc2": (fc2, 0),
        "fc2+fc1": (replace(fc2, flashcomm1=True), 0),
        "fc2+oshard k0": (replace(fc2, layer_sharding=shard, prefetch_step=0), 0),
        "fc2+fc1+oshard k1": (replace(fc2, flashcomm1=True, layer_sharding=shard), 0),
        "fc2 prefill-only": (fc2, 4),  # decode steps (T = 3) fall back to row-parallel
        "fc2 int8": (replace(fc2, comm_dtype="int8"), 0),  # lossy: logits close, not exact
    }
    if n == 4:
        otp2 = replace(base, flashcomm2_otp=2)
        rows["otp2"] = (otp2, 0)
        rows["otp2+fc1+oshard k1"] = (replace(otp2, flashcomm1=True, layer_sharding=shard), 0)
        # two TP=2 replicas: the shard group spans the replicas (plain TP needs dp > 1)
        dp2 = FlashCommConfig(tp=2, dp=2, layer_sharding=shard)
        rows["dp2 allreduce+oshard"] = (dp2, 0)
        rows["dp2 fc2+oshard k0"] = (replace(dp2, flashcomm2_otp=1, prefetch_step=0), 0)
    return rows


def _strategies_worker(rank: int, world: int, ckpts: dict[str, str]) -> dict:
    from flashcomm.groups import ParallelGroups

    out = {}
    for name, (cfg, min_tokens) in strategies(world).items():
        groups = ParallelGroups.build(ParallelLayout.from_config(cfg, world), cfg.layer_sharding)
        for ck, path in ckpts.items():
            engine = Engine.from_checkpoint(path, cfg, groups, progress=False,
                                            flashcomm2_min_tokens=min_tokens)
            logits = prefill_logits(engine, PROMPTS)
            res = engine.generate(PROMPTS, NEW_TOKENS)
            out[name, ck] = {"logits": logits, "tokens": res.tokens,
                             "o_proj_bytes": res.o_proj_bytes, "comm": res.comm_bytes_by_op,
                             "read": engine.load_report.names}
    return out


@pytest.fixture(scope="module")
def references(hf_checkpoints) -> dict[str, tuple[torch.Tensor, list[list[int]]]]:
    out = {}
    for ck in CKPTS:
        engine = Engine.from_checkpoint(hf_checkpoints[ck], FlashCommConfig(), progress=False)
        out[ck] = (prefill_logits(engine, PROMPTS), engine.generate(PROMPTS, NEW_TOKENS).tokens)
    return out


def expected_o_proj_bytes(cfg: FlashCommConfig, args: ModelArgs, rank: int) -> int:
    """DESIGN.md: row-parallel L*|W|/N, replicated L*|W|/otp, O-Shard (owned + k + 1)*|W_slice|."""
    w_full = args.dim * args.q_dim * 4  # fp32
    n_layers = args.n_layers
    w = w_full // cfg.flashcomm2_otp if cfg.flashcomm2 else w_full // cfg.tp
    if "o_proj" not in cfg.layer_sharding:
        return n_layers * w
    group = ParallelLayout.from_config(cfg).group_of(
        rank, ParallelLayout.from_config(cfg).shard_groups("o_proj"))
    g, size = group.index(rank), len(group)
    owned = sum(1 for i in range(n_layers) if i % size == g)
    assert owned <= math.ceil(n_layers / size)
    return (owned + cfg.prefetch_step + 1) * w


def predicted_comm_bytes(cfg: FlashCommConfig, args: ModelArgs, min_tokens: int) -> int:
    """What the cost model says generate() sends per rank: every step's layer_traffic, plus
    FlashComm1's final all-gather before the LM head."""
    from flashcomm.plan.costmodel import Shape, layer_traffic
    from flashcomm.plan.costmodel import Strategy as CostStrategy

    n = cfg.tp
    shape = Shape(hidden=args.dim, q_dim=args.q_dim, tp=n, elt_bytes=4)
    total = 0.0
    for t in [sum(map(len, PROMPTS))] + [len(PROMPTS)] * (NEW_TOKENS - 1):
        fc2 = cfg.flashcomm2 and t >= min_tokens
        s = CostStrategy("flashcomm2" if fc2 else "allreduce", cfg.flashcomm2_otp,
                         cfg.flashcomm1, cfg.comm_dtype)
        total += args.n_layers * sum(b for _, _, b in layer_traffic(s, shape, t))
        if cfg.flashcomm1:
            total += (n - 1) * -(-t // n) * args.dim * 4
    return round(total)


@pytest.mark.parametrize("n", [2, 4])
def test_every_strategy_matches_the_single_process_model(hf_checkpoints, references, n) -> None:
    from flashcomm.launch import run_local

    ckpts = {ck: str(hf_checkpoints[ck]) for ck in CKPTS}
    per_rank = run_local(_strategies_worker, n, ckpts, timeout_s=400, group_timeout_s=120)
    for name, (cfg, min_tokens) in strategies(n).items():
        for ck in CKPTS:
            ref_logits, ref_tokens = references[ck]
            args = ModelArgs.from_dir(hf_checkpoints[ck])
            for rank, out in enumerate(per_rank):
                got = out[name, ck]
                where = f"{name} {ck} rank {rank}"
                # the cost model's bytes are the bytes the engine really counted
                assert sum(got["comm"].values()) == predicted_comm_bytes(cfg, args, min_tokens), (
                    where, got["comm"])
                if cfg.comm_dtype == "int8":  # per-row int8 payload: about 1% error
                    err = (got["logits"] - ref_logits).abs().max() / ref_logits.abs().max()
                    assert 0 < err < 0.05, (where, err)
                    continue
                torch.testing.assert_close(got["logits"], ref_logits, rtol=1e-4, atol=1e-4,
                                           msg=lambda m, w=where: f"{w}: {m}")
                assert got["tokens"] == ref_tokens, where
                assert got["o_proj_bytes"] == expected_o_proj_bytes(cfg, args, rank), where
                if "o_proj" in cfg.layer_sharding:  # a non-owner never reads the layer
                    group = ParallelLayout.from_config(cfg).shard_groups("o_proj")
                    members = ParallelLayout.from_config(cfg).group_of(rank, group)
                    read = {int(s.split(".")[2]) for s in got["read"] if "o_proj.weight" in s}
                    owned = {i for i in range(args.n_layers)
                             if i % len(members) == members.index(rank)}
                    assert read == owned, where
                if cfg.flashcomm2 and name != "fc2 prefill-only":
                    assert got["comm"].get("all_to_all", 0) > 0, where


def test_run_cli_json(hf_checkpoints, references) -> None:
    path = hf_checkpoints["qwen2"]
    ids = [",".join(map(str, p)) for p in PROMPTS]
    out = subprocess.run(
        [sys.executable, "-m", "flashcomm.cli", "run", "--model", str(path), "--nproc", "2",
         "--attn-out", "flashcomm2", "--layer-sharding", "o_proj", "--prefetch-step", "1",
         "--flashcomm1", "--token-ids", *ids, "--max-new-tokens", str(NEW_TOKENS), "--json"],
        capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["tokens"] == references["qwen2"][1]
    assert d["text"] is None  # transformers' save_pretrained wrote no tokenizer.json
    assert d["prefill_ms"] > 0 and d["decode_ms_per_token"] > 0
    cfg = FlashCommConfig(tp=2, flashcomm2_otp=1, flashcomm1=True, layer_sharding=("o_proj",))
    args = ModelArgs.from_dir(path)
    for rank, r in enumerate(d["ranks"]):
        assert r["o_proj_bytes"] == expected_o_proj_bytes(cfg, args, rank)
        assert r["weight_bytes"] > r["o_proj_bytes"] and r["comm_bytes"] > 0
        assert r["blocked_wait_ms"] >= 0


def test_run_cli_attn_out_auto(hf_checkpoints, references) -> None:
    from flashcomm.cli.run import auto_min_tokens
    from flashcomm.plan.costmodel import HardwareProfile

    path = hf_checkpoints["qwen2"]
    ids = [",".join(map(str, p)) for p in PROMPTS]
    out = subprocess.run(
        [sys.executable, "-m", "flashcomm.cli", "run", "--model", str(path), "--nproc", "2",
         "--attn-out", "auto", "--profile", "pcie-gen4", "--token-ids", *ids,
         "--max-new-tokens", str(NEW_TOKENS), "--json"],
        capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["tokens"] == references["qwen2"][1]
    cfg = FlashCommConfig(tp=2, flashcomm2_otp=1)
    args = ModelArgs.from_dir(path)
    want = auto_min_tokens(args, cfg, HardwareProfile.load("pcie-gen4"), 4)
    assert d["auto"]["flashcomm2_min_tokens"] == want
    for rank, r in enumerate(d["ranks"]):  # both paths share FlashComm2's one resident W_o
        assert r["o_proj_bytes"] == expected_o_proj_bytes(cfg, args, rank)


def _tiny_checkpoint(tmp_path) -> Path:
    from flashcomm.models.random_checkpoint import small_llama_config, write_checkpoint

    return write_checkpoint(tmp_path / "ck", small_llama_config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        head_dim=16))


def test_demo_prints_identical_rows(tmp_path) -> None:
    ckpt = _tiny_checkpoint(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "flashcomm.cli", "demo", "--model", str(ckpt), "--nproc", "4",
         "--max-new-tokens", "4"],
        capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith(("allreduce", "flash"))]
    assert len(rows) == 5 and all("identical" in r for r in rows), out.stdout


def test_sampling_is_seeded_and_eos_stops(hf_checkpoints, references) -> None:
    engine = Engine.from_checkpoint(hf_checkpoints["qwen3"], FlashCommConfig(), progress=False)
    a = engine.generate(PROMPTS, 8, temperature=1.0, seed=1).tokens
    assert a == engine.generate(PROMPTS, 8, temperature=1.0, seed=1).tokens
    assert a != engine.generate(PROMPTS, 8, temperature=1.0, seed=2).tokens
    greedy = references["qwen3"][1]
    engine.eos_token_ids = (greedy[0][2],)  # pretend the third token of prompt 0 is EOS
    cut = engine.generate(PROMPTS, NEW_TOKENS, stop_at_eos=True).tokens
    assert cut[0] == greedy[0][:3]
    for got, full in zip(cut, greedy, strict=True):
        assert got == full[:len(got)] and (len(got) == NEW_TOKENS or got[-1] in full)


def test_run_cli_text_prompts_single_process(tmp_path) -> None:
    from flashcomm.models.random_checkpoint import small_llama_config, write_checkpoint

    ckpt = write_checkpoint(tmp_path / "ck", small_llama_config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        head_dim=16))
    out = subprocess.run(
        [sys.executable, "-m", "flashcomm.cli", "run", "--model", str(ckpt), "--prompt",
         "Hello", "naïve café", "--max-new-tokens", "5", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    engine = Engine.from_checkpoint(ckpt, FlashCommConfig(), progress=False)
    ids = engine.encode(["Hello", "naïve café"])
    assert ids[0] == list(b"Hello") and ids[1] == list("naïve café".encode())
    ref = engine.generate(ids, 5)
    assert d["tokens"] == ref.tokens and d["text"] == ref.text and len(d["ranks"]) == 1


def test_run_cli_rejects_conflicting_auto_threshold(tmp_path) -> None:
    ckpt = _tiny_checkpoint(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "flashcomm.cli", "run", "--model", str(ckpt), "--nproc", "2",
         "--attn-out", "auto", "--flashcomm2-min-tokens", "5", "--token-ids", "1,2"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2 and "--flashcomm2-min-tokens=5" in out.stderr, out.stderr
