"""Both sources of the layer-sharded W_o (owner broadcast, gather of resident TP slices) in the
engine at N = 4: every combination of source x k x otp x FlashComm1 x {per-step threshold,
FlashComm2 every step} gives the single-process model's greedy tokens, holds the source's o_proj
bytes, and moves the weight bytes its formula (and the cost model) says, per phase. One
spawned group runs them all.
"""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import product

import pytest
import torch
from conftest import PROMPTS, prefill_logits

from flashcomm.config import FlashCommConfig, ShardSource
from flashcomm.layout import ParallelLayout
from flashcomm.model_args import ModelArgs
from flashcomm.models.engine import Engine
from flashcomm.plan.costmodel import Shape, fetch_bytes_per_step
from flashcomm.plan.strategy import Strategy

N, CKPT, NEW_TOKENS = 4, "qwen2", 6  # qwen2: L = 5, so k = 0..2 fit (k <= L-2)
PREFILL_T, DECODE_T = sum(map(len, PROMPTS)), len(PROMPTS)  # 11 and 3 tokens per step
THRESHOLD = 4  # the per-step ("auto") path: FlashComm2 prefill, row-parallel decode
SMALL = [[5], [17], [100]]  # a 3-token step: row-parallel under the threshold
COMBOS = list(product(ShardSource, (0, 1, 2), (1, 2), (False, True), ("auto", "fc2")))


def config(src: ShardSource, k: int, otp: int, fc1: bool, mode: str) -> FlashCommConfig:
    """The knobs of one combination (auto as its resolved threshold, fc2 as threshold 0)."""
    return FlashCommConfig(tp=N, flashcomm2_otp=otp, flashcomm1=fc1, layer_sharding=("o_proj",),
                           shard_source=src, prefetch_step=k,
                           flashcomm2_min_tokens=THRESHOLD if mode == "auto" else 0)


def _worker(rank: int, world: int, path: str) -> dict:
    from flashcomm.groups import ParallelGroups

    groups = {otp: ParallelGroups.from_config(config(ShardSource.GATHER, 0, otp, False, "fc2"),
                                              world) for otp in (1, 2)}
    out = {}
    for combo in COMBOS:
        cfg = config(*combo)
        engine = Engine.from_checkpoint(path, cfg, groups[cfg.flashcomm2_otp], progress=False)
        res = engine.generate(PROMPTS, NEW_TOKENS)
        out[combo] = {"logits": [prefill_logits(engine, p) for p in (PROMPTS, SMALL)]}
        out[combo] |= {k: getattr(res, k) for k in (
            "tokens", "o_proj_bytes", "prefill_fetch_bytes", "decode_fetch_bytes_per_step",
            "prefill_blocked_wait_ms", "decode_blocked_wait_ms_per_step")}
    return out


def formula(cfg: FlashCommConfig, args: ModelArgs, rank: int) -> dict[str, float]:
    """The source's o_proj bytes and weight bytes received per step and phase on `rank`."""
    L, k, otp = args.n_layers, cfg.prefetch_step, cfg.flashcomm2_otp
    odp = N // otp
    w = args.dim * args.q_dim // otp * 4  # |W| = H * D/otp * fp32
    fc2 = {t: cfg.flashcomm2_step(t) for t in (PREFILL_T, DECODE_T)}
    if cfg.gather_source:  # resident D/N slices + ring; a FlashComm2 step gathers L layers
        per_step = {t: L * (odp - 1) * w // odp if fc2[t] else 0 for t in fc2}
        resident = L * w // odp + (k + 1) * w
    else:  # owner: every step turns the ring, whatever its path
        g = ParallelLayout(tp=N, otp=otp).group_of(rank, ParallelLayout(tp=N, otp=otp)
                                                   .shard_groups("o_proj"))
        owned = sum(1 for i in range(L) if i % len(g) == g.index(rank))
        per_step = dict.fromkeys(fc2, (L - owned) * w)
        resident = (owned + k + 1) * w
    return {"o_proj_bytes": resident, "prefill_fetch_bytes": per_step[PREFILL_T],
            "decode_fetch_bytes_per_step": per_step[DECODE_T]}


@pytest.fixture(scope="module")
def reference(hf_checkpoints) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens and the logits of a FlashComm2-sized and a small step, single process."""
    engine = Engine.from_checkpoint(hf_checkpoints[CKPT], FlashCommConfig(), progress=False)
    logits = [prefill_logits(engine, p) for p in (PROMPTS, SMALL)]
    return engine.generate(PROMPTS, NEW_TOKENS).tokens, logits


def test_every_source_combination_matches_the_reference(hf_checkpoints, reference) -> None:
    from flashcomm.launch import run_local

    path = hf_checkpoints[CKPT]
    args = ModelArgs.from_dir(path)
    per_rank = run_local(_worker, N, str(path), timeout_s=400, group_timeout_s=120)
    for combo in COMBOS:
        cfg = config(*combo)
        for rank, out in enumerate(per_rank):
            got, where = out[combo], f"{combo} rank {rank}"
            assert got["tokens"] == reference[0], where
            for a, b in zip(got["logits"], reference[1], strict=True):  # both paths, both steps
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4,
                                           msg=lambda m, w=where: f"{w}: {m}")
            want = formula(cfg, args, rank)
            assert {key: got[key] for key in want} == want, where
            assert min(got["prefill_blocked_wait_ms"], got["decode_blocked_wait_ms_per_step"]) >= 0
        # the cost model (the planner's numbers) predicts the mean over ranks of each phase
        s, shape = Strategy.from_config(cfg), Shape(args.dim, args.q_dim, N, 4, args.n_layers)
        for key, t in (("prefill_fetch_bytes", PREFILL_T),
                       ("decode_fetch_bytes_per_step", DECODE_T)):
            mean = sum(out[combo][key] for out in per_rank) / N
            assert mean == fetch_bytes_per_step(s, shape, t), (combo, key)
    # the point of the gather source: the per-step path moves no weight byte on decode
    gather_auto = [c for c in COMBOS if c[0] == ShardSource.GATHER and c[4] == "auto"]
    assert all(out[c]["decode_fetch_bytes_per_step"] == 0 for c in gather_auto for out in per_rank)
    owner_auto = [c for c in COMBOS if c[0] == ShardSource.OWNER and c[4] == "auto"]
    assert all(out[c]["decode_fetch_bytes_per_step"] > 0 for c in owner_auto for out in per_rank)


def test_run_cli_json_reports_fetch_bytes_per_phase(hf_checkpoints, reference) -> None:
    """flashcomm run --attn-out auto --shard-source gather --json: per-rank phase counters."""
    path = hf_checkpoints[CKPT]
    ids = [",".join(map(str, p)) for p in PROMPTS]
    out = subprocess.run(
        [sys.executable, "-m", "flashcomm.cli", "run", "--model", str(path), "--nproc", "2",
         "--attn-out", "flashcomm2", "--flashcomm2-min-tokens", str(THRESHOLD),
         "--layer-sharding", "o_proj", "--shard-source", "gather", "--prefetch-step", "1",
         "--token-ids", *ids, "--max-new-tokens", str(NEW_TOKENS), "--json"],
        capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["tokens"] == reference[0]
    args = ModelArgs.from_dir(path)
    w = args.dim * args.q_dim * 4
    for r in d["ranks"]:
        assert r["o_proj_bytes"] == args.n_layers * w // 2 + 2 * w
        assert r["prefill_fetch_bytes"] == args.n_layers * w // 2
        assert r["decode_fetch_bytes_per_step"] == 0
        assert r["prefill_blocked_wait_ms"] >= 0 and r["decode_blocked_wait_ms_per_step"] == 0
