"""The `flashcomm` command: layout, run, demo, plan and bench subcommands.

Each heavy subcommand lives in its own module with `add_arguments(parser)` and
`main(args) -> int`; they are imported only when chosen, so `flashcomm layout` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from flashcomm.config import ConfigError, FlashCommConfig, parse_int
from flashcomm.layout import ParallelLayout

# subcommand -> module implementing add_arguments(parser) and main(args) -> int
COMMANDS = {
    "run": "flashcomm.engine_cli",
    "demo": "flashcomm.demo",
    "plan": "flashcomm.plan",
}
BENCHES = {
    "series": "flashcomm.bench.series",
    "comm": "flashcomm.bench.comm",
    "e2e": "flashcomm.bench.e2e",
}


def _layout_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world", help="total number of ranks (default tp*pp*dp)")
    FlashCommConfig.add_cli_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _layout_main(args: argparse.Namespace) -> int:
    cfg = FlashCommConfig.from_cli(args, env={})
    world = None if args.world is None else parse_int("world", args.world)
    layout = ParallelLayout.from_config(cfg, world)
    if args.json:
        print(json.dumps(layout.to_dict()))
        return 0
    print(format_layout(layout))
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every subcommand."""
    parser = argparse.ArgumentParser(prog="flashcomm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    lay = sub.add_parser("layout", help="print the process groups of a deployment")
    _layout_arguments(lay)
    lay.set_defaults(handler=_layout_main)
    for name, module in COMMANDS.items():
        _lazy(sub, name, module)
    bench = sub.add_parser("bench", help="benchmarks that write JSON (and plots)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    for name, module in BENCHES.items():
        _lazy(bench_sub, name, module)
    return parser


def _lazy(sub: argparse._SubParsersAction, name: str, module: str) -> None:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        return  # not built yet
    p = sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0])
    mod.add_arguments(p)
    p.set_defaults(handler=mod.main)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `flashcomm` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except ConfigError as e:
        print(f"flashcomm: configuration error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
