"""End-to-end step latency, bytes and memory of every strategy, side by side in one run.

`flashcomm bench e2e --model DIR|demo --nproc N`: ONE spawned group of N ranks (1) fits an
alpha-beta profile of the collectives (flashcomm.plan.fit, through flashcomm.comm), (2) loads
the checkpoint once per strategy (all-reduce, FlashComm1, FlashComm2 otp=1/2, FlashComm2 +
O-Shard k=0..2, int8 exchange; `auto` reuses the FlashComm2 otp=1 model, whose resident W_o
serves both paths, with the crossover of the fitted profile as its per-step threshold),
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
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from flashcomm.config import FlashCommConfig
from flashcomm.models.random_checkpoint import small_llama_config, write_checkpoint
from flashcomm.plan.costmodel import Strategy as CostStrategy

MODEL_SIZES = {
    "small": None,  # the demo checkpoint of flashcomm.cli.demo
    "medium": dict(hidden_size=1024, intermediate_size=2048, num_hidden_layers=6,
                   num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                   max_position_embeddings=8192),
}
"""--model demo --model-size: the cached random checkpoint to use (small = flashcomm demo's)."""
SMALL_STEP_TOKENS = 1024
"""Steps of at most this many tokens are repeated SMALL_STEP_FACTOR times more."""
SMALL_STEP_FACTOR = 3


@dataclass(frozen=True)
class Row:
    """One strategy of the benchmark."""

    name: str
    """Label, e.g. 'fc2(otp=1)+oshard(k=1)'."""
    cfg: FlashCommConfig
    """Knobs of the model it runs (auto shares FlashComm2 otp=1's)."""
    auto: bool = False
    """Per-step choice between all-reduce and FlashComm2 by the crossover threshold."""

    @property
    def cost(self) -> CostStrategy:
        """The cost model's description of this strategy's collectives."""
        c = self.cfg
        k = c.prefetch_step if c.layer_sharding else None
        if not c.flashcomm2_otp:
            return CostStrategy(flashcomm1=c.flashcomm1)
        return CostStrategy("flashcomm2", c.flashcomm2_otp, c.flashcomm1, c.comm_dtype, k)


def strategy_rows(n: int, n_layers: int) -> list[Row]:
    """Every strategy of the issue at TP size n (otp=2 and k <= L-2 only where valid)."""
    base = FlashCommConfig(tp=n)
    fc2 = replace(base, flashcomm2_otp=1)
    rows = [Row("allreduce", base), Row("flashcomm1", replace(base, flashcomm1=True)),
            Row("fc2(otp=1)", fc2)]
    if n > 2 and n % 2 == 0:
        rows.append(Row("fc2(otp=2)", replace(base, flashcomm2_otp=2)))
    rows += [Row(f"fc2+oshard(k={k})",
                 replace(fc2, layer_sharding=("o_proj",), prefetch_step=k))
             for k in range(3) if k <= n_layers - 2]
    rows += [Row("fc2+int8", replace(fc2, comm_dtype="int8")), Row("auto", fc2, auto=True)]
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


def e2e_rank(rank: int, world: int, model_dir: str, opts: dict) -> dict:
    """One rank of the benchmark group; rank 0 returns the timings, every rank its memory."""
    from flashcomm.bench.replay import step_replay
    from flashcomm.cli.run import NEVER, auto_min_tokens
    from flashcomm.groups import ParallelGroups
    from flashcomm.layout import ParallelLayout
    from flashcomm.models.engine import Engine
    from flashcomm.models.transformer import KVCache, ModelArgs, Step
    from flashcomm.plan.fit import fit_profile

    args = ModelArgs.from_dir(model_dir)
    rows = strategy_rows(world, args.n_layers)
    if opts.get("strategies"):
        rows = [r for r in rows if r.name in opts["strategies"] or r.name == "allreduce"]
    grid = cases(opts["prefill"], opts["decode"])
    t_start = time.perf_counter()

    # (1) the profile, fitted in this group on every group size the strategies use
    fit_groups = ParallelGroups.build(
        ParallelLayout(tp=world, otp=2 if world > 2 and world % 2 == 0 else 1), shard_weights=())
    profile = fit_profile(fit_groups, width=args.dim,
                          rows=tuple(sorted({1, 16, 256, 1024, 4096} | {t for _, t in grid})))
    fit_s = time.perf_counter() - t_start

    # (2) one model per distinct config
    models: dict[FlashCommConfig, object] = {}
    for row in rows:
        if row.cfg not in models:
            shard = ("o_proj",) if row.cfg.layer_sharding else ()
            groups = ParallelGroups.build(ParallelLayout.from_config(row.cfg, world), shard)
            models[row.cfg] = Engine.from_checkpoint(model_dir, row.cfg, groups,
                                                     progress=False).model
    any_model = next(iter(models.values()))
    dtype = any_model.tok_embeddings.weight.dtype
    elt = any_model.tok_embeddings.weight.element_size()
    threshold = auto_min_tokens(args, rows[-1].cfg, profile, elt) if rows[-1].auto else 0

    # KV caches shared by every strategy (the same TP split of kv heads everywhere)
    plan = any_model.plan
    gen = torch.Generator().manual_seed(0)
    ctx_len = opts["decode_context"]
    inputs = []
    for kind, size in grid:
        if kind == "prefill":
            cache = KVCache.allocate(args.n_layers, 1, size, plan.n_kv, args.head_dim, dtype,
                                     torch.device("cpu"))
            step = Step.build([0], [size], torch.device("cpu"))
            toks = torch.randint(0, args.vocab_size, (size,), generator=gen)
        else:
            cache = KVCache.allocate(args.n_layers, size, ctx_len + 1, plan.n_kv, args.head_dim,
                                     dtype, torch.device("cpu"))
            step = Step.build([ctx_len] * size, [1] * size, torch.device("cpu"))
            toks = torch.randint(0, args.vocab_size, (size,), generator=gen)
        inputs.append((toks, step, cache))
    kv_bytes = max(c.nbytes for _, _, c in inputs)

    def forward(row: Row, ci: int) -> tuple[torch.Tensor, float]:
        model = models[row.cfg]
        model.ctx.flashcomm2_min_tokens = threshold if row.auto else 0
        series = model.ctx.o_series
        w0 = series.stats().blocked_wait_s if series else 0.0
        toks, step, cache = inputs[ci]
        with torch.no_grad():
            out = model(toks, step, cache)
        return out, (series.stats().blocked_wait_s - w0 if series else 0.0)

    # warm-up of every (strategy, case); records bytes per step and the greedy tokens
    bytes_sent, fetched, same_tokens = {}, {}, {}
    ref = {}
    for ci in range(len(grid)):
        for ri, row in enumerate(rows):
            model = models[row.cfg]
            model.ctx.counter.reset()
            series = model.ctx.o_series
            r0 = series.stats().bytes_received if series else 0
            logits, _ = forward(row, ci)
            bytes_sent[(ri, ci)] = dict(model.ctx.counter.bytes_sent)
            fetched[(ri, ci)] = (series.stats().bytes_received - r0) if series else 0
            ids = logits.argmax(-1)
            if ri == 0:
                ref[ci] = ids
            same_tokens[(ri, ci)] = bool(torch.equal(ids, ref[ci]))

    # (3) timed steps, strategies in a rotating order per repeat
    reps = opts["repeats"]
    # cheap steps (<= SMALL_STEP_TOKENS tokens) get SMALL_STEP_FACTOR x the repeats: noise
    # weighs most on them and they cost little
    case_reps = [reps * (SMALL_STEP_FACTOR if size <= SMALL_STEP_TOKENS else 1)
                 for _, size in grid]
    lat = torch.full((len(rows), len(grid), max(case_reps)), float("nan"), dtype=torch.float64)
    wait = torch.zeros_like(lat)
    for rep in range(max(case_reps)):
        for ci in range(len(grid)):
            if rep >= case_reps[ci]:
                continue
            order = [(rep + j) % len(rows) for j in range(len(rows))]
            for ri in order:
                dist.barrier()
                t0 = time.perf_counter()
                _, w = forward(rows[ri], ci)
                lat[ri, ci, rep] = time.perf_counter() - t0
                wait[ri, ci, rep] = w

    # (4) communication alone: each distinct collective pattern, interleaved the same way
    patterns = {r.cost: r.cfg for r in rows if not r.auto and not r.cfg.layer_sharding}
    pat_keys = list(patterns)
    creps = 2 * max(case_reps)  # comm alone is cheap: more samples against scheduling noise
    comm_t = torch.zeros(len(pat_keys), len(grid), creps, dtype=torch.float64)
    for ci, (_, size) in enumerate(grid):
        fns = [step_replay(models[patterns[k]].ctx.groups, patterns[k].flashcomm2_otp,
                           patterns[k].flashcomm1, patterns[k].comm_dtype, args.dim,
                           args.q_dim, size, args.n_layers) for k in pat_keys]
        for f in fns:
            f()
        for rep in range(creps):
            for j in range(len(fns)):
                pi = (rep + j) % len(fns)
                dist.barrier()
                t0 = time.perf_counter()
                fns[pi]()
                comm_t[pi, ci, rep] = time.perf_counter() - t0
    for t in (lat, wait, comm_t):
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank's sample

    def samples(t: torch.Tensor, ci: int) -> list[float]:
        return [v for v in t[ci].tolist() if v == v][: case_reps[ci]]  # drop the NaN padding

    memory = {row.name: _memory(models[row.cfg], kv_bytes) for row in rows}
    if rank != 0:
        return {"rank": rank, "memory": memory}
    return {
        "rank": 0, "memory": memory,
        "model": {"dir": model_dir, "layers": args.n_layers, "hidden": args.dim,
                  "q_dim": args.q_dim, "intermediate": args.intermediate_size,
                  "heads": args.n_heads, "kv_heads": args.n_kv_heads, "elt_bytes": elt},
        "N": world, "threads_per_rank": torch.get_num_threads(), "torch": torch.__version__,
        "backend": dist.get_backend(), "repeats": reps, "decode_context": ctx_len,
        "profile": profile.to_dict(), "fit_s": fit_s,
        "auto_threshold": None if threshold >= NEVER else threshold,
        "cases": [{"kind": k, "size": s, "tokens": s, "label": case_label(k, s)}
                  for k, s in grid],
        "strategies": [{
            "name": row.name, "config": row.cfg.to_dict(), "auto": row.auto,
            "cost": {"attn_out": row.cost.attn_out, "otp": row.cost.otp,
                     "flashcomm1": row.cost.flashcomm1, "comm_dtype": row.cost.comm_dtype,
                     "oshard_k": row.cost.oshard_k},
            "comm_pattern": (None if row.auto else
                             pat_keys.index(replace(row.cost, oshard_k=None))),
            "steps": [{
                "latency_s": samples(lat[ri], ci),
                "blocked_wait_s": wait[ri, ci, :case_reps[ci]].tolist(),
                "bytes_sent": bytes_sent[(ri, ci)], "fetch_bytes": fetched[(ri, ci)],
                "same_argmax_as_allreduce": same_tokens[(ri, ci)],
            } for ci in range(len(grid))],
        } for ri, row in enumerate(rows)],
        "comm_replay": [{"pattern": i, "cost": k.label, "times_s": comm_t[i].tolist()}
                        for i, k in enumerate(pat_keys)],
        "wall_s": time.perf_counter() - t_start,
    }


# ---- the command ------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `flashcomm bench e2e`."""
    parser.add_argument("--model", default="demo", help="checkpoint directory, or demo")
    parser.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="small",
                        help="with --model demo: which cached random checkpoint")
    parser.add_argument("--nproc", type=int, default=4, help="TP size N")
    parser.add_argument("--prefill-tokens", type=_ints, default=[256, 1024, 4096])
    parser.add_argument("--decode-batch", type=_ints, default=[1, 16])
    parser.add_argument("--decode-context", type=int, default=256,
                        help="tokens already in the cache at a decode step")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per step")
    parser.add_argument("--strategies", help="comma-separated subset (allreduce always runs)")
    parser.add_argument("--out", default="results/e2e", help="output directory")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds for the group")


def model_dir(model: str, size: str) -> Path:
    """The checkpoint directory: DIR as given, or the cached demo-like random checkpoint."""
    if model != "demo":
        return Path(model)
    from flashcomm.cli.demo import cache_dir, ensure_checkpoint

    if MODEL_SIZES[size] is None:
        return ensure_checkpoint(cache_dir())
    path = cache_dir().parent / f"e2e-llama-{size}-v1"
    if not (path / "config.json").is_file():
        write_checkpoint(path, small_llama_config(**MODEL_SIZES[size]), seed=0)
    return path


def main(args: argparse.Namespace) -> int:
    """Run the group, write e2e.json, profile.json and the plots, print the report."""
    from flashcomm.bench import e2e_report
    from flashcomm.launch import default_backend, run_local

    if args.nproc < 2:
        raise SystemExit("--nproc must be >= 2 (the strategies differ only with TP)")
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    path = model_dir(args.model, args.model_size)
    opts = {"prefill": args.prefill_tokens, "decode": args.decode_batch,
            "decode_context": args.decode_context, "repeats": args.repeats,
            "strategies": args.strategies.split(",") if args.strategies else None}
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
