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

# subcommand -> (module implementing add_arguments(parser) and main(args) -> int, help)
COMMANDS = {
    "run": ("flashcomm.cli.run", "generate with a tensor-parallel model on N local ranks"),
    "demo": ("flashcomm.cli.demo", "every strategy at TP=4 on a cached random checkpoint"),
    "plan": ("flashcomm.plan.planner", "predict memory and communication per strategy"),
}
BENCHES = {
    "series": ("flashcomm.bench.series", "layer-sharding ring: blocked wait vs compute window"),
    "comm": ("flashcomm.bench.comm", "per-layer communication time of every strategy"),
    "e2e": ("flashcomm.bench.e2e", "end-to-end latency, bytes and memory of every strategy"),
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


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The argparse tree; only the module of the chosen subcommand is imported."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="flashcomm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    lay = sub.add_parser("layout", help="print the process groups of a deployment")
    _layout_arguments(lay)
    lay.set_defaults(handler=_layout_main)
    chosen = argv[0] if argv else None
    for name, (module, help_text) in COMMANDS.items():
        _add(sub, name, module, help_text, load=name == chosen)
    bench = sub.add_parser("bench", help="benchmarks that write JSON (and plots)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    chosen_bench = argv[1] if chosen == "bench" and len(argv) > 1 else None
    for name, (module, help_text) in BENCHES.items():
        _add(bench_sub, name, module, help_text, load=name == chosen_bench)
    return parser


def _add(sub: argparse._SubParsersAction, name: str, module: str, help_text: str,
         load: bool) -> None:
    p = sub.add_parser(name, help=help_text)
    if load:
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(handler=mod.main)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `flashcomm` console script."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except ConfigError as e:
        print(f"flashcomm: configuration error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
