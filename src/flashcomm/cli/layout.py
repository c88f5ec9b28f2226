"""`flashcomm layout`: the process groups of a deployment, as a table or one JSON object; with
the layer count (--model DIR or --num-layers L), each pipeline stage's layers and the o_proj
every rank of it holds (units of |W|, and bytes when --model gives the shapes)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flashcomm.config import FlashCommConfig
from flashcomm.knobs import ConfigError, parse_int
from flashcomm.layout import ParallelLayout
from flashcomm.plan.stages import format_stages, layer_bytes, stage_memory

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `flashcomm layout`: the knobs, plus --world."""
    parser.add_argument("--world", help="total number of ranks (default tp*pp*dp)")
    parser.add_argument("--model", help="checkpoint dir: its layer count and o_proj shape give "
                        "the per-stage layers and o_proj bytes")
    parser.add_argument("--num-layers", help="decoder layers (instead of --model): per-stage "
                        "layers and o_proj in units of |W|")
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


def model_facts(model: str) -> tuple[int, int, int, int]:
    """(num_layers, hidden, q_dim, bytes per element) of a checkpoint's config.json, the element
    size from its torch_dtype (2 when absent)."""
    from flashcomm.model_args import ModelArgs  # torch: only when --model is given

    m = ModelArgs.from_dir(model)
    raw = json.loads((Path(model) / "config.json").read_text())
    dtype = raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"
    return m.n_layers, m.dim, m.q_dim, DTYPE_BYTES.get(str(dtype), 2)


def main(args: argparse.Namespace) -> int:
    """Entry point of `flashcomm layout` (environment ignored: the flags say it all)."""
    cfg = FlashCommConfig.from_cli(args, env={})
    world = None if args.world is None else parse_int("world", args.world)
    layout = ParallelLayout.from_config(cfg, world)
    if args.model is not None and args.num_layers is not None:
        raise ConfigError("num_layers: pass --model or --num-layers, not both")
    num_layers, w_bytes = None, None
    if args.model is not None:
        num_layers, hidden, q_dim, elt = model_facts(args.model)
        w_bytes = layer_bytes(cfg, hidden, q_dim, elt)
    elif args.num_layers is not None:
        num_layers = parse_int("num_layers", args.num_layers)
    out = layout.to_dict()
    stages = None if num_layers is None else stage_memory(cfg, num_layers)
    if stages is not None:
        out["stages"] = [st.to_dict(w_bytes) for st in stages]
        out["o_proj_layer_bytes"] = w_bytes
    if args.json:
        print(json.dumps(out))
    else:
        text = format_layout(layout)
        if stages is not None:
            text += "\n\n" + "\n".join(format_stages(stages, w_bytes))
        print(text)
    return 0
