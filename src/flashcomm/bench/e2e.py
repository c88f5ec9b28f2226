"""End-to-end step latency, bytes and memory of every strategy, side by side in one run.

`flashcomm bench e2e --model DIR|demo --nproc N`: ONE spawned group of N ranks (1) fits an
alpha-beta profile of the collectives (flashcomm.plan.fit, through flashcomm.comm), (2) loads
the checkpoint once per strategy (all-reduce, FlashComm1, FlashComm2 otp=1/2, FlashComm2 +
O-Shard k=0..2, int8 exchange, and `auto`: FlashComm2's weights with the crossover of the
fitted profile as its per-step threshold, flashcomm.plan.auto; then the two W_o sources at k=1:
fc2+gather, auto+oshard (the owner ring turns on decode too) and auto+gather (decode steps
take the row-parallel path on the resident slices and fetch nothing)),
(3) times one forward step per (strategy, case): prefill of T tokens (one sequence) and decode
steps of B sequences (one token each after a context), strategies interleaved in a rotating
order inside every repeat so machine noise hits all alike; each sample is the slowest rank's,
(4) replays each step's collectives alone (same comm functions and shapes, no compute) to
measure its communication time, which is compared with the cost model's prediction.
bench/e2e_report.py turns the raw result into ratios, checks, tables and plots.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist

from flashcomm.config import AttnOut, CommDtype, ShardSource
from flashcomm.knobs import ConfigError
from flashcomm.model_args import ModelArgs
from flashcomm.models.random_checkpoint import (
    cached_checkpoint,
    demo_checkpoint,
    moe_demo_checkpoint,
    small_llama_config,
)
from flashcomm.plan.auto import FIT, auto_min_tokens, load_profile
from flashcomm.plan.strategy import Strategy

MODEL_SIZES = {
    "small": None,  # the demo checkpoint (models.random_checkpoint.demo_checkpoint)
    "medium": dict(hidden_size=1024, intermediate_size=2048, num_hidden_layers=6,
                   num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                   max_position_embeddings=8192),
}
"""--model demo --model-size: the cached random checkpoint to use (small = flashcomm demo's)."""
SMALL_STEP_TOKENS = 1024
"""Steps of at most this many tokens are repeated SMALL_STEP_FACTOR times more."""
SMALL_STEP_FACTOR = 3


def strategy_rows(n: int, n_layers: int, moe: bool = False) -> list[Strategy]:
    """The strategies of the benchmark at TP size n (otp=2 and k <= L-2 only where valid; expert
    parallel, alone and with FlashComm2 / FlashComm1, for an MoE model)."""
    fc2 = Strategy(AttnOut.FLASHCOMM2, otp=1)
    rows = [Strategy(), Strategy(flashcomm1=True), fc2]
    if n > 2 and n % 2 == 0:
        rows.append(Strategy(AttnOut.FLASHCOMM2, otp=2))
    rows += [replace(fc2, oshard_k=k) for k in range(3) if k <= n_layers - 2]
    rows += [replace(fc2, comm_dtype=CommDtype.INT8), replace(fc2, attn_out=AttnOut.AUTO)]
    if n_layers >= 3:  # the weight sources at k=1: gather on FlashComm2 steps, owner every step
        gather = replace(fc2, oshard_k=1, shard_source=ShardSource.GATHER)
        rows += [gather, replace(fc2, attn_out=AttnOut.AUTO, oshard_k=1),
                 replace(gather, attn_out=AttnOut.AUTO)]
    if moe:  # TP experts against expert parallel, with and without FlashComm2 / FlashComm1
        ep = [Strategy(), fc2, replace(fc2, flashcomm1=True)]
        rows += [ep[2]] + [replace(s, expert_parallel=True) for s in ep]
    return rows


def cases(prefill: list[int], decode: list[int]) -> list[tuple[str, int]]:
    """(kind, size): decode steps of B sequences, then prefills of T tokens (ascending tokens)."""
    return [("decode", b) for b in sorted(decode)] + [("prefill", t) for t in sorted(prefill)]


def case_label(kind: str, size: int) -> str:
    """'decode B=16' or 'prefill T=1024'."""
    return f"decode B={size}" if kind == "decode" else f"prefill T={size}"


# ---- the spawned group ------------------------------------------------------------------------


def _memory(model, kv_bytes: int) -> dict[str, int]:
    """Per-rank bytes by category: o_proj (stored layers), ring, other weights, KV cache."""
    series = model.ctx.o_series
    o_total = model.o_proj_bytes()
    ring = 0
    if series is not None:
        st = series.stats()
        ring = st.slots * st.layer_bytes
    return {"o_proj": o_total - ring, "ring": ring,
            "other_weights": model.weight_bytes() - o_total, "kv_cache": kv_bytes}


def _interleaved(fns: list[list[Callable[[], float | None]]], reps: list[int],
                 out: torch.Tensor, returned: torch.Tensor | None = None) -> None:
    """out[i, c, rep] = seconds of fns[i][c]() (and returned[i, c, rep] = what it returned):
    the functions of case c in a rotating order per repeat, so machine noise hits all alike;
    case c runs reps[c] repeats."""
    for rep in range(max(reps)):
        for ci in range(out.shape[1]):
            if rep >= reps[ci]:
                continue
            for j in range(len(fns)):
                i = (rep + j) % len(fns)
                dist.barrier()
                t0 = time.perf_counter()
                value = fns[i][ci]()
                out[i, ci, rep] = time.perf_counter() - t0
                if returned is not None:
                    returned[i, ci, rep] = value


def e2e_rank(rank: int, world: int, model_dir: str, opts: dict) -> dict:
    """One rank of the benchmark group; rank 0 returns the timings, every rank its memory."""
    from flashcomm.bench.replay import step_replay
    from flashcomm.comm import CommCounter
    from flashcomm.groups import ParallelGroups
    from flashcomm.layout import ParallelLayout
    from flashcomm.models.loader import checkpoint_dtype, load_model
    from flashcomm.plan.fit import fit_profile
    from flashcomm.plan.planner import model_shape

    args = ModelArgs.from_dir(model_dir)
    rows = strategy_rows(world, args.n_layers, args.is_moe)
    if opts.get("strategies"):
        rows = [r for r in rows if r.label in opts["strategies"] or r == Strategy()]
    grid = cases(opts["prefill"], opts["decode"])
    t_start = time.perf_counter()
    elt = checkpoint_dtype(model_dir).itemsize

    # (1) the profile, fitted in this group on every group size the strategies use (or given:
    # --profile, e.g. a quiet machine's fit, when load makes a fit here unreliable)
    if opts.get("profile", FIT) == FIT:
        fit_groups = ParallelGroups.build(
            ParallelLayout(tp=world, otp=2 if world > 2 and world % 2 == 0 else 1),
            shard_weights=())
        profile = fit_profile(fit_groups, width=args.dim,
                              rows=tuple(sorted({1, 16, 256, 1024, 4096} | {t for _, t in grid})))
    else:
        profile = load_profile(opts["profile"])
    fit_s = time.perf_counter() - t_start
    threshold = auto_min_tokens(args.dim, args.q_dim, Strategy(AttnOut.AUTO).to_config(world),
                                profile, elt)
    # per auto row, as `flashcomm run` resolves it: the gather source's counts its exposed fetch
    thresholds = {row: auto_min_tokens(args.dim, args.q_dim, row.to_config(world), profile, elt)
                  for row in rows if row.attn_out == AttnOut.AUTO}

    # (2) one model per strategy; auto's threshold is resolved before its model is built
    models = {}
    for row in rows:
        cfg = row.to_config(world)
        if row.attn_out == AttnOut.AUTO:
            cfg = replace(cfg, flashcomm2_min_tokens=thresholds[row])
        groups = ParallelGroups.from_config(cfg, world)
        models[row], _ = load_model(model_dir, cfg, groups, progress=False, counter=CommCounter())
    any_model = models[rows[0]]

    # inputs shared by every strategy (the same TP split of kv heads everywhere)
    gen = torch.Generator().manual_seed(0)
    ctx_len = opts["decode_context"]
    inputs = []
    for kind, size in grid:
        if kind == "prefill":
            step, cache = any_model.step([0], [size]), any_model.allocate_cache(1, size)
        else:
            step = any_model.step([ctx_len] * size, [1] * size)
            cache = any_model.allocate_cache(size, ctx_len + 1)
        inputs.append((torch.randint(0, args.vocab_size, (size,), generator=gen), step, cache))
    kv_bytes = max(c.nbytes for _, _, c in inputs)

    def forward(row: Strategy, ci: int) -> tuple[torch.Tensor, float]:
        model = models[row]
        series = model.ctx.o_series
        w0 = series.stats().blocked_wait_s if series else 0.0
        toks, step, cache = inputs[ci]
        with torch.no_grad():
            out = model(toks, step, cache)
        return out, (series.stats().blocked_wait_s - w0 if series else 0.0)

    # warm-up of every (strategy, case); records bytes per step and the greedy tokens
    bytes_sent, fetched, same_tokens, ref = {}, {}, {}, {}
    for ci in range(len(grid)):
        for ri, row in enumerate(rows):
            model = models[row]
            model.ctx.counter.reset()
            series = model.ctx.o_series
            r0 = series.stats().bytes_received if series else 0
            ids = forward(row, ci)[0].argmax(-1)
            bytes_sent[(ri, ci)] = dict(model.ctx.counter.bytes_sent)
            fetched[(ri, ci)] = (series.stats().bytes_received - r0) if series else 0
            ref.setdefault(ci, ids)
            same_tokens[(ri, ci)] = bool(torch.equal(ids, ref[ci]))

    # (3) timed steps; cheap steps (<= SMALL_STEP_TOKENS tokens) get SMALL_STEP_FACTOR x the
    # repeats: noise weighs most on them and they cost little
    reps = opts["repeats"]
    case_reps = [reps * (SMALL_STEP_FACTOR if size <= SMALL_STEP_TOKENS else 1)
                 for _, size in grid]
    lat = torch.full((len(rows), len(grid), max(case_reps)), float("nan"), dtype=torch.float64)
    wait = torch.zeros_like(lat)
    _interleaved([[lambda r=r, c=c: forward(r, c)[1] for c in range(len(grid))] for r in rows],
                 case_reps, lat, wait)

    # (4) communication alone: each distinct path's collectives, interleaved the same way
    paths = [[row.path(size, thresholds.get(row)) for _, size in grid] for row in rows]
    patterns = list(dict.fromkeys(p for ps in paths for p in ps))
    groups_of = {p: models[rows[ri]].ctx.groups for ri, ps in enumerate(paths) for p in ps}
    replays = [[step_replay(groups_of[p], p, args.dim, args.q_dim, size, args.n_layers)
                for _, size in grid] for p in patterns]
    for per_case in replays:
        for f in per_case:
            f()
    creps = [2 * n for n in case_reps]  # comm alone is cheap: more samples against noise
    comm_t = torch.full((len(patterns), len(grid), max(creps)), float("nan"), dtype=torch.float64)
    _interleaved(replays, creps, comm_t)
    for t in (lat, wait, comm_t):
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank's sample

    def samples(t: torch.Tensor) -> list[float]:
        return [v for v in t.tolist() if v == v]  # drop the NaN padding

    memory = {row.label: _memory(models[row], kv_bytes) for row in rows}
    if rank != 0:
        return {"rank": rank, "memory": memory}
    return {
        "rank": 0, "memory": memory,
        "model": {"dir": model_dir, "layers": args.n_layers, "hidden": args.dim,
                  "q_dim": args.q_dim, "intermediate": args.intermediate_size,
                  "heads": args.n_heads, "kv_heads": args.n_kv_heads, "elt_bytes": elt,
                  "experts": args.n_experts, "moe_layers": list(args.moe_layers)},
        "shape": asdict(model_shape(args, world, elt)),
        "N": world, "threads_per_rank": torch.get_num_threads(), "torch": torch.__version__,
        "backend": dist.get_backend(), "repeats": reps, "decode_context": ctx_len,
        "profile": profile.to_dict(), "fit_s": fit_s, "auto_threshold": threshold,
        "cases": [{"kind": k, "size": s, "tokens": s, "label": case_label(k, s)}
                  for k, s in grid],
        "strategies": [{
            "name": row.label, "config": row.to_config(world).to_dict(),
            "auto_threshold": thresholds.get(row),
            "steps": [{
                "latency_s": samples(lat[ri, ci]),
                "blocked_wait_s": wait[ri, ci, :case_reps[ci]].tolist(),
                "bytes_sent": bytes_sent[(ri, ci)], "fetch_bytes": fetched[(ri, ci)],
                "same_argmax_as_allreduce": same_tokens[(ri, ci)],
                "path": paths[ri][ci].label, "comm_pattern": patterns.index(paths[ri][ci]),
            } for ci in range(len(grid))],
        } for ri, row in enumerate(rows)],
        "comm_replay": [{"pattern": p.label, "times_s": [samples(comm_t[i, ci])
                                                         for ci in range(len(grid))]}
                        for i, p in enumerate(patterns)],
        "wall_s": time.perf_counter() - t_start,
    }


# ---- the command ------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `flashcomm bench e2e`."""
    parser.add_argument("--model", default="demo",
                        help="checkpoint directory, demo, or moe (flashcomm demo --model moe's)")
    parser.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="small",
                        help="with --model demo: which cached random checkpoint")
    parser.add_argument("--nproc", type=int, default=4, help="TP size N")
    parser.add_argument("--prefill-tokens", type=_ints, default=[256, 1024, 4096])
    parser.add_argument("--decode-batch", type=_ints, default=[1, 16])
    parser.add_argument("--decode-context", type=int, default=256,
                        help="tokens already in the cache at a decode step")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per step")
    parser.add_argument("--strategies", help="comma-separated subset (allreduce always runs)")
    parser.add_argument("--profile", default="fit",
                        help="collective costs for auto's thresholds and the predictions: 'fit' "
                        "(measured in the run), a shipped profile or a profile JSON file")
    parser.add_argument("--out", default="results/e2e", help="output directory")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds for the group")


def model_dir(model: str, size: str) -> Path:
    """The checkpoint directory: DIR as given, or the cached demo-like random checkpoint."""
    if model == "moe":
        return moe_demo_checkpoint()
    if model != "demo":
        return Path(model)
    if MODEL_SIZES[size] is None:
        return demo_checkpoint()
    return cached_checkpoint(f"e2e-llama-{size}-v1", small_llama_config(**MODEL_SIZES[size]))


def main(args: argparse.Namespace) -> int:
    """Run the group, write e2e.json, profile.json and the plots, print the report."""
    from flashcomm.bench import e2e_report
    from flashcomm.launch import default_backend, run_local

    if args.nproc < 2:
        raise ConfigError(f"nproc={args.nproc}: must be >= 2 (the strategies differ only "
                          "with TP)")
    if args.repeats < 1:
        raise ConfigError(f"repeats={args.repeats}: must be >= 1")
    path = model_dir(args.model, args.model_size)
    m = ModelArgs.from_dir(path)
    known = [r.label for r in strategy_rows(args.nproc, m.n_layers, m.is_moe)]
    unknown = sorted(set(args.strategies.split(",") if args.strategies else ()) - set(known))
    if unknown:
        raise ConfigError(f"strategies={unknown}: not strategies of this run; allowed: {known}")
    opts = {"prefill": args.prefill_tokens, "decode": args.decode_batch,
            "decode_context": args.decode_context, "repeats": args.repeats,
            "strategies": args.strategies.split(",") if args.strategies else None,
            "profile": args.profile}
    if args.profile != FIT:
        load_profile(args.profile)  # a bad --profile fails here, before any rank starts
    t0 = time.monotonic()
    per_rank = run_local(e2e_rank, args.nproc, str(path), opts, backend=default_backend(),
                         timeout_s=args.timeout, group_timeout_s=300)
    raw = per_rank[0]
    raw["memory_per_rank"] = [r["memory"] for r in per_rank]
    result = e2e_report.summarize(raw)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "e2e.json").write_text(json.dumps(result, indent=1))
    (out / "profile.json").write_text(json.dumps(result["profile"], indent=1))
    e2e_report.plot(result, out)
    print(e2e_report.format_report(result))
    print(f"total {time.monotonic() - t0:.1f} s; wrote {out / 'e2e.json'}, "
          f"{out / 'profile.json'}, {out / 'e2e_latency.png'}, {out / 'e2e_memory.png'}")
    return 0
