"""`flashcomm plan`: predicted memory and communication per strategy, and a recommendation."""

from __future__ import annotations

import argparse
import json

from flashcomm.config import FlashCommConfig
from flashcomm.knobs import parse_int
from flashcomm.model_args import ModelArgs
from flashcomm.models.random_checkpoint import demo_checkpoint
from flashcomm.plan.auto import load_profile
from flashcomm.plan.planner import GIB, make_plan


def format_plan(plan: dict) -> str:
    """The plan as a readable table (memory in GiB once a rank holds 1 GiB of weights)."""
    big = max((r["weight_bytes"] for r in plan["strategies"]), default=0) >= 2**30
    unit, div, fmt = ("GiB", 2**30, ".2f") if big else ("MiB", 2**20, ".1f")
    hdr = (f"{'strategy':<34} {'o_proj ' + unit:>10} {'weights ' + unit:>11} {'prefill ms':>10} "
           f"{'decode ms':>9} {'crossover T':>11} {'fetch KiB pre/dec':>17} "
           f"{'hidden pre/dec':>14} {'fits':>4}")
    yes_no = {None: "-", True: "yes", False: "NO"}
    lines = [f"tp={plan['tp']}  profile={plan['profile']}  prefill T={plan['prefill_tokens']}  "
             f"decode batch={plan['decode_batch']}  bytes/elt: activations {plan['elt_bytes']}, "
             f"weights {plan['weight_elt_bytes']}", hdr, "-" * len(hdr)]
    for r in plan["strategies"]:
        hidden = f"{yes_no[r['oshard_hidden']]}/{yes_no[r['decode_fetch_hidden']]}"
        fetch = f"{r['prefill_fetch_bytes'] / 1024:.0f}/{r['decode_fetch_bytes'] / 1024:.0f}"
        cross = "-" if r["crossover_tokens"] is None else str(r["crossover_tokens"])
        lines.append(
            f"{r['strategy']:<34} {r['o_proj_bytes'] / div:>10{fmt}} "
            f"{r['weight_bytes'] / div:>11{fmt}} {r['prefill_comm_s'] * 1e3:>10.3f} "
            f"{r['decode_comm_s'] * 1e3:>9.3f} {cross:>11} {fetch:>17} {hidden:>14} "
            f"{'yes' if r['fits_budget'] else 'no':>4}")
    rec = plan["recommendation"]
    lines += ["", f"recommendation: {rec['strategy']}", f"  {rec['why']}"]
    for dep, d in plan["deployments"].items():
        t = d["flashcomm2_min_tokens"]
        lines += [f"{dep.replace('_', '-')}: {d['strategy']} (shard source "
                  f"{d['shard_source'] or '-'}, FlashComm2 "
                  f"{'never' if t is None else f'from T >= {t}'})", f"  {d['why']}"]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `flashcomm plan`."""
    parser.add_argument("--model", required=True,
                        help="checkpoint dir with config.json, or demo (the demo's checkpoint)")
    parser.add_argument("--tp", required=True, help="tensor-parallel size")
    parser.add_argument("--otp", action="append", help="only these otp values (repeatable)")
    parser.add_argument("--memory-budget", type=float, help="weight memory per rank, GiB")
    parser.add_argument("--profile", default="h100-nvlink",
                        help="shipped profile (h100-nvlink, pcie-gen4) or a JSON file")
    parser.add_argument("--prefill-tokens", type=int, default=4096)
    parser.add_argument("--decode-batch", type=int, default=16)
    parser.add_argument("--decode-steps", type=int, default=256,
                        help="decode steps per prefill in mixed serving (the mixed deployment)")
    parser.add_argument("--dtype-bytes", type=int, default=2, help="2 for bf16, 4 for fp32")
    parser.add_argument("--weight-bytes", type=int,
                        help="bytes per weight element, e.g. 1 for int8 weights (memory and "
                             "W_o fetches; default: --dtype-bytes)")
    parser.add_argument("--pp", help="pipeline stages: adds each stage's layers and o_proj "
                        "per rank (layers split as vLLM splits them)")
    parser.add_argument("--pp-layer-partition", help="layers per stage, e.g. 4,3 (with --pp)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    """Entry point of `flashcomm plan`: the model's args and a profile in, the plan printed."""
    model_dir = demo_checkpoint() if args.model == "demo" else args.model
    plan = make_plan(
        ModelArgs.from_dir(model_dir), parse_int("tp", args.tp), load_profile(args.profile),
        otps=None if not args.otp else [parse_int("otp", o) for o in args.otp],
        prefill_tokens=args.prefill_tokens, decode_batch=args.decode_batch, elt=args.dtype_bytes,
        memory_budget_bytes=None if args.memory_budget is None else args.memory_budget * GIB,
        decode_steps=args.decode_steps, weight_elt=args.weight_bytes,
    )
    text = None if args.json else format_plan(plan)
    if args.pp is not None:  # per pipeline stage: layers and o_proj per rank
        from flashcomm.config import ShardSource
        from flashcomm.plan.stages import format_stage_plan, stage_plan
        from flashcomm.plan.strategy import candidates

        m, tp = ModelArgs.from_dir(model_dir), parse_int("tp", args.tp)
        otps = None if not args.otp else [parse_int("otp", o) for o in args.otp]
        partition = FlashCommConfig.knobs()["pp_layer_partition"].parse(
            "pp_layer_partition", args.pp_layer_partition or "")
        plan["stages"] = stage_plan(
            candidates(tp, m.n_layers, otps, sources=(ShardSource.OWNER, ShardSource.GATHER)),
            tp, m.n_layers, m.dim, m.q_dim, args.weight_bytes or args.dtype_bytes,
            parse_int("pp", args.pp), partition)
        text = None if args.json else "\n".join([text, "", *format_stage_plan(plan["stages"])])
    print(json.dumps(plan, indent=1) if args.json else text)
    return 0
