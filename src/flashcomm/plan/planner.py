"""Predict memory and communication per strategy for a model and recommend one (`flashcomm plan`).

Uses the alpha-beta cost model of flashcomm.plan.costmodel with a shipped hardware profile
(h100-nvlink, pcie-gen4) or one fitted by `flashcomm bench comm --fit`.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass

from flashcomm.config import ConfigError, parse_int
from flashcomm.models.args import ModelArgs
from flashcomm.plan.costmodel import (
    HardwareProfile,
    Shape,
    Strategy,
    comm_time,
    crossover_tokens,
    layer_traffic,
    oshard_window_fits,
)

GIB = 1 << 30


@dataclass(frozen=True)
class PlanRow:
    """Predictions for one strategy."""

    strategy: str
    """Strategy label."""
    o_proj_bytes: int
    """Resident o_proj bytes per rank (ring included for O-Shard)."""
    weight_bytes: int
    """All resident weight bytes per rank."""
    prefill_comm_s: float
    """Predicted communication seconds of one prefill step over all layers."""
    decode_comm_s: float
    """Predicted communication seconds of one decode step over all layers."""
    crossover_tokens: int | None
    """Token count from which this strategy's comm beats all-reduce's (None: never / baseline)."""
    oshard_hidden: bool | None
    """Whether the O-Shard broadcast fits in its compute window at the prefill size."""
    exposed_s: float
    """Predicted broadcast time not hidden by compute, per prefill step (all layers)."""
    fits_budget: bool
    """Whether weight_bytes is within the memory budget."""


def candidate_strategies(tp: int, n_layers: int, otps: list[int]) -> list[Strategy]:
    """Every strategy the engine can run at this TP size."""
    out = [Strategy(), Strategy(flashcomm1=True)]
    for otp in otps:
        out += [Strategy("flashcomm2", otp), Strategy("flashcomm2", otp, flashcomm1=True),
                Strategy("flashcomm2", otp, comm_dtype="int8")]
        out += [Strategy("flashcomm2", otp, oshard_k=k) for k in range(3) if k <= n_layers - 2]
    return out


def weight_bytes_per_rank(m: ModelArgs, tp: int, s: Strategy, elt: int) -> tuple[int, int]:
    """(o_proj bytes, all weight bytes) resident on one rank for strategy `s`."""
    h, d, L = m.dim, m.q_dim, m.n_layers
    if s.attn_out == "allreduce":
        o_layer = h * d // tp * elt
        o_total = L * o_layer
    else:
        o_layer = h * d // s.otp * elt
        if s.oshard_k is None:
            o_total = L * o_layer
        else:
            group = tp // s.otp  # odp ranks share a slice (dp = 1 here)
            o_total = (math.ceil(L / group) + s.oshard_k + 1) * o_layer
    kv_heads = max(1, m.n_kv_heads // tp)
    qkv = h * (d // tp + 2 * kv_heads * m.head_dim)
    mlp = 3 * h * m.intermediate_size // tp
    embed = m.vocab_size * h * (1 if m.tie_word_embeddings else 2)
    other = (L * (qkv + mlp + 2 * h) + embed + h) * elt
    return o_total, o_total + other


def layer_flops(m: ModelArgs, tp: int, tokens: int) -> tuple[float, float]:
    """(whole-layer FLOPs, QKV + attention FLOPs) per rank for a prefill of `tokens` tokens."""
    kv = max(1, m.n_kv_heads // tp) * m.head_dim
    qkv = 2 * tokens * m.dim * (m.q_dim // tp + 2 * kv)
    attn = 2 * tokens * tokens * m.q_dim // tp  # causal QK^T + PV, halved by the mask
    o = 2 * tokens * m.dim * m.q_dim // tp
    mlp = 2 * tokens * 3 * m.dim * m.intermediate_size // tp
    return float(qkv + attn + o + mlp), float(qkv + attn)


def make_plan(
    m: ModelArgs, tp: int, profile: HardwareProfile, *, otps: list[int] | None = None,
    prefill_tokens: int = 4096, decode_batch: int = 16, elt: int = 2,
    memory_budget_bytes: float | None = None,
) -> dict:
    """Predictions per strategy and a recommendation, as one JSON-ready dict."""
    if tp < 2:
        raise ConfigError(f"tp={tp}: planning compares TP strategies, so tp must be >= 2")
    valid = [o for o in range(1, tp) if tp % o == 0]
    otps = valid if otps is None else otps
    for o in otps:
        if o not in valid:
            raise ConfigError(f"otp={o}: must divide tp={tp} and be below it (allowed: {valid})")
    shape = Shape(hidden=m.dim, q_dim=m.q_dim, tp=tp, elt_bytes=elt)
    rows = []
    for s in candidate_strategies(tp, m.n_layers, otps):
        o_bytes, w_bytes = weight_bytes_per_rank(m, tp, s, elt)
        prefill = m.n_layers * comm_time(profile, layer_traffic(s, shape, prefill_tokens))
        decode = m.n_layers * comm_time(profile, layer_traffic(s, shape, decode_batch))
        base = Strategy(flashcomm1=s.flashcomm1)
        cross = None if s.attn_out == "allreduce" else crossover_tokens(profile, shape, s, base)
        hidden, exposed = None, 0.0
        if s.oshard_k is not None:
            full, attn = layer_flops(m, tp, prefill_tokens)
            hidden, bcast, window = oshard_window_fits(
                profile, m.dim * m.q_dim // s.otp * elt, tp // s.otp, s.oshard_k, full, attn)
            exposed = m.n_layers * max(0.0, bcast - window)
        fits = memory_budget_bytes is None or w_bytes <= memory_budget_bytes
        rows.append(PlanRow(s.label, o_bytes, w_bytes, prefill, decode, cross, hidden, exposed,
                            fits))
    fitting = [r for r in rows if r.fits_budget]
    best = min(fitting, key=lambda r: (r.prefill_comm_s + r.exposed_s, r.weight_bytes),
               default=None)
    return {
        "model": {"model_type": m.model_type, "layers": m.n_layers, "hidden": m.dim,
                  "q_dim": m.q_dim},
        "tp": tp, "profile": profile.name, "prefill_tokens": prefill_tokens,
        "decode_batch": decode_batch, "elt_bytes": elt,
        "memory_budget_bytes": memory_budget_bytes,
        "strategies": [r.__dict__ for r in rows],
        "recommendation": _recommend(best, rows, decode_batch),
    }


def _recommend(best: PlanRow | None, rows: list[PlanRow], decode_batch: int) -> dict:
    if best is None:
        return {"strategy": None, "why": "no strategy fits the memory budget; raise it or tp"}
    why = [f"lowest predicted prefill communication ({best.prefill_comm_s * 1e3:.2f} ms) "
           f"among strategies within the budget"]
    if best.crossover_tokens is not None:
        why.append(f"FlashComm2 wins from {best.crossover_tokens} tokens per step; "
                   f"with --attn-out auto smaller steps use all-reduce")
        if best.crossover_tokens > decode_batch:
            why.append(f"decode at batch {decode_batch} stays on all-reduce")
    if best.oshard_hidden is False:
        why.append("warning: the O-Shard broadcast is not fully hidden at this size")
    return {"strategy": best.strategy, "why": "; ".join(why)}


def format_plan(plan: dict) -> str:
    """The plan as a readable table."""
    hdr = (f"{'strategy':<34} {'o_proj MiB':>10} {'weights MiB':>11} {'prefill ms':>10} "
           f"{'decode ms':>9} {'crossover T':>11} {'hidden':>6} {'fits':>4}")
    lines = [f"tp={plan['tp']}  profile={plan['profile']}  prefill T={plan['prefill_tokens']}  "
             f"decode batch={plan['decode_batch']}", hdr, "-" * len(hdr)]
    for r in plan["strategies"]:
        hidden = {None: "-", True: "yes", False: "NO"}[r["oshard_hidden"]]
        cross = "-" if r["crossover_tokens"] is None else str(r["crossover_tokens"])
        lines.append(
            f"{r['strategy']:<34} {r['o_proj_bytes'] / 2**20:>10.1f} "
            f"{r['weight_bytes'] / 2**20:>11.1f} {r['prefill_comm_s'] * 1e3:>10.3f} "
            f"{r['decode_comm_s'] * 1e3:>9.3f} {cross:>11} {hidden:>6} "
            f"{'yes' if r['fits_budget'] else 'no':>4}")
    rec = plan["recommendation"]
    lines += ["", f"recommendation: {rec['strategy']}", f"  {rec['why']}"]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `flashcomm plan`."""
    parser.add_argument("--model", required=True, help="checkpoint dir with config.json, or demo")
    parser.add_argument("--tp", required=True, help="tensor-parallel size")
    parser.add_argument("--otp", action="append", help="only these otp values (repeatable)")
    parser.add_argument("--memory-budget", type=float, help="weight memory per rank, GiB")
    parser.add_argument("--profile", default="h100-nvlink",
                        help="shipped profile (h100-nvlink, pcie-gen4) or a JSON file")
    parser.add_argument("--prefill-tokens", type=int, default=4096)
    parser.add_argument("--decode-batch", type=int, default=16)
    parser.add_argument("--dtype-bytes", type=int, default=2, help="2 for bf16, 4 for fp32")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    """Run `flashcomm plan`."""
    model_dir = args.model
    if model_dir == "demo":
        from flashcomm.cli.demo import cache_dir, ensure_checkpoint  # the cached demo checkpoint

        model_dir = ensure_checkpoint(cache_dir())
    m = ModelArgs.from_dir(model_dir)
    try:
        profile = HardwareProfile.load(args.profile)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    plan = make_plan(
        m, parse_int("tp", args.tp), profile,
        otps=None if not args.otp else [parse_int("otp", o) for o in args.otp],
        prefill_tokens=args.prefill_tokens, decode_batch=args.decode_batch, elt=args.dtype_bytes,
        memory_budget_bytes=None if args.memory_budget is None else args.memory_budget * GIB,
    )
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan))
    return 0
