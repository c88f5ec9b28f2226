"""The `flashcomm` command: layout, run, demo, plan and bench subcommands.

One module per command (cli/layout.py, run.py, demo.py, plan.py) holds its `add_arguments(parser)`,
`main(args) -> int` and the formatting of what it prints; the benchmark programs keep theirs in
flashcomm/bench/. A module is imported only when its command is chosen, so `flashcomm layout`
stays instant. Every FlashCommError (a bad knob, checkpoint, prompt or profile, a failed rank)
ends the command with exit code 2 and its message (one line naming the knob or file; a failed
rank's report names every rank), without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from flashcomm.knobs import FlashCommError

# subcommand -> (module implementing add_arguments(parser) and main(args) -> int, help)
COMMANDS = {
    "layout": ("flashcomm.cli.layout", "print the process groups of a deployment"),
    "run": ("flashcomm.cli.run", "generate with a tensor-parallel model on N local ranks"),
    "demo": ("flashcomm.cli.demo", "every strategy at TP=3 on SmolLM2-135M (or a random model)"),
    "plan": ("flashcomm.cli.plan", "predict memory and communication per strategy"),
}
BENCHES = {
    "series": ("flashcomm.bench.series", "layer-sharding ring: blocked wait vs compute window"),
    "comm": ("flashcomm.bench.comm", "per-layer communication time of every strategy"),
    "e2e": ("flashcomm.bench.e2e", "end-to-end latency, bytes and memory of every strategy"),
    "cluster": ("flashcomm.bench.cluster", "emulated hosts on one machine: check, --sweep"),
    "hosts": ("flashcomm.bench.hosts", "the engine across emulated hosts at several link rates"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The argparse tree; only the module of the chosen subcommand is imported."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="flashcomm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
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
    except FlashCommError as e:
        name = " ".join(n for n in (args.command, getattr(args, "bench", None)) if n)
        print(f"flashcomm {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the launcher has already killed every rank
        print(f"flashcomm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
