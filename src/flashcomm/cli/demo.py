"""Run every attention-output strategy at TP=4 on CPU and compare them in one table.

On first use a small random-weight Llama checkpoint with a byte-level tokenizer is written to the
cache directory (no downloads). One spawned group of 4 gloo ranks then loads it once per strategy
and generates the same batch; the single-process model gives the reference tokens.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from flashcomm.config import FlashCommConfig
from flashcomm.models.random_checkpoint import small_llama_config, write_checkpoint

DEMO_NAME = "demo-llama-v1"
PROMPTS = (
    "FlashComm2 trades storage for transmission.",
    "Hello",
    "Tensor parallelism splits the heads.",
)


@dataclass(frozen=True)
class Strategy:
    """One row of the demo table."""

    name: str
    """Row label."""
    cfg: FlashCommConfig
    """Knobs (tp is set by the demo)."""


def strategies(tp: int, prefetch_step: int = 1) -> list[Strategy]:
    """The five strategies the demo compares (otp=2 only where tp allows it)."""
    base = FlashCommConfig(tp=tp)
    fc2 = replace(base, flashcomm2_otp=1)
    rows = [
        Strategy("allreduce", base),
        Strategy("flashcomm2", fc2),
        Strategy("flashcomm2+flashcomm1", replace(fc2, flashcomm1=True)),
        Strategy("flashcomm2+oshard", replace(fc2, layer_sharding=("o_proj",),
                                              prefetch_step=prefetch_step)),
    ]
    if tp > 2 and tp % 2 == 0:
        rows.append(Strategy("flashcomm2 otp=2", replace(base, flashcomm2_otp=2)))
    return rows


def cache_dir() -> Path:
    """Where the demo checkpoint lives ($FLASHCOMM_CACHE or ~/.cache/flashcomm)."""
    root = os.environ.get("FLASHCOMM_CACHE") or Path.home() / ".cache" / "flashcomm"
    return Path(root) / DEMO_NAME


def ensure_checkpoint(path: Path) -> Path:
    """Write the demo checkpoint into `path` unless it is already there (atomic rename)."""
    if (path / "config.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
    write_checkpoint(tmp, small_llama_config(), seed=0)
    try:
        tmp.rename(path)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def demo_rank(rank: int, world: int, model: str, rows: list[Strategy], prompts: list[list[int]],
              max_new_tokens: int) -> list[dict]:
    """One rank of the demo group: every strategy in turn, a warm-up then a measured batch."""
    from flashcomm.groups import ParallelGroups
    from flashcomm.layout import ParallelLayout
    from flashcomm.models.engine import Engine

    out = []
    for row in rows:
        shard = ("o_proj",) if "o_proj" in row.cfg.layer_sharding else ()
        groups = ParallelGroups.build(ParallelLayout.from_config(row.cfg, world), shard)
        engine = Engine.from_checkpoint(model, row.cfg, groups, progress=False)
        engine.generate(prompts, 2)  # warm-up: first-call allocations and lazy inits
        out.append(engine.generate(prompts, max_new_tokens).to_dict())
    return out


def format_table(names: list[str], per_rank: list[list[dict]], reference: list[list[int]]) -> str:
    """The demo table: one row per strategy, rank 0 timings, per-rank memory maxima."""
    head = (f"{'strategy':<22} {'tokens':>9} {'prefill ms':>10} {'decode ms/tok':>13} "
            f"{'o_proj MiB/rank':>15} {'comm KiB prefill':>16} {'comm KiB/decode':>15} "
            f"{'fetch KiB/step':>14} {'blocked ms':>10}")
    lines = [head, "-" * len(head)]
    for i, name in enumerate(names):
        ranks = [r[i] for r in per_rank]
        r0 = ranks[0]
        same = all(r["tokens"] == reference for r in ranks)
        o_mib = [r["o_proj_bytes"] / 2**20 for r in ranks]
        o_txt = f"{o_mib[0]:.3f}" if max(o_mib) == min(o_mib) else \
            f"{min(o_mib):.3f}-{max(o_mib):.3f}"
        lines.append(
            f"{name:<22} {'identical' if same else 'DIFFERENT':>9} {r0['prefill_ms']:>10.1f} "
            f"{r0['decode_ms_per_token']:>13.2f} {o_txt:>15} "
            f"{max(r['prefill_comm_bytes'] for r in ranks) / 1024:>16.1f} "
            f"{max(r['decode_comm_bytes_per_step'] for r in ranks) / 1024:>15.1f} "
            f"{max(r['fetch_bytes_per_step'] for r in ranks) / 1024:>14.1f} "
            f"{max(r['blocked_wait_ms'] for r in ranks):>10.2f}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `flashcomm demo`."""
    parser.add_argument("--model", help="checkpoint directory (default: the cached demo model)")
    parser.add_argument("--nproc", type=int, default=4, help="TP size")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--prefetch-step", type=int, default=1, help="O-Shard prefetch step k")


def main(args: argparse.Namespace) -> int:
    """Entry point of `flashcomm demo`."""
    from flashcomm.launch import run_local
    from flashcomm.models.engine import Engine

    t0 = time.perf_counter()
    model = Path(args.model) if args.model else ensure_checkpoint(cache_dir())
    ref = Engine.from_checkpoint(model, FlashCommConfig(), None, progress=False)
    prompts = ref.encode(list(PROMPTS))
    reference = ref.generate(prompts, args.max_new_tokens)
    rows = strategies(args.nproc, args.prefetch_step)
    print(f"model {model} ({ref.model.args.n_layers} layers, hidden {ref.model.args.dim}, "
          f"{ref.model.args.n_heads} heads, {ref.model.args.n_kv_heads} kv heads), "
          f"TP={args.nproc} gloo, {len(prompts)} prompts of {[len(p) for p in prompts]} tokens, "
          f"{args.max_new_tokens} new tokens each")
    per_rank = run_local(demo_rank, args.nproc, str(model), rows, prompts, args.max_new_tokens,
                         timeout_s=600.0)
    print(format_table([r.name for r in rows], per_rank, reference.tokens))
    print(f"reference text[0]: {reference.text[0]!r}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0
