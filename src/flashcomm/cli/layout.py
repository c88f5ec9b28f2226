"""`flashcomm layout`: the process groups of a deployment, as a table or one JSON object."""

from __future__ import annotations

import argparse
import json

from flashcomm.config import FlashCommConfig, parse_int
from flashcomm.layout import ParallelLayout


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `flashcomm layout`: the knobs, plus --world."""
    parser.add_argument("--world", help="total number of ranks (default tp*pp*dp)")
    FlashCommConfig.add_cli_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def format_layout(layout: ParallelLayout) -> str:
    """A readable table of every group family."""
    d = layout.to_dict()
    lines = [
        f"world={layout.world}  tp={layout.tp}  pp={layout.pp}  dp={layout.dp}  "
        f"otp={layout.otp}  odp={layout.odp}",
        "",
        f"{'family':<8} {'groups':>6}  members",
    ]
    for name in ("tp", "pp", "dp", "odp", "otp", "shard"):
        groups = d[name]
        body = "  ".join("[" + ",".join(map(str, g)) + "]" for g in groups) or "(off)"
        lines.append(f"{name:<8} {len(groups):>6}  {body}")
    lines.append("")
    lines.append(f"chunk_order (all-to-all send order of the {layout.tp} token chunks): "
                 f"{d['chunk_order']}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Entry point of `flashcomm layout` (environment ignored: the flags say it all)."""
    cfg = FlashCommConfig.from_cli(args, env={})
    world = None if args.world is None else parse_int("world", args.world)
    layout = ParallelLayout.from_config(cfg, world)
    print(json.dumps(layout.to_dict()) if args.json else format_layout(layout))
    return 0
