"""`flashcomm demo`: every attention-output strategy at TP=4 on CPU, compared in one table.

On first use a small random-weight Llama checkpoint with a byte-level tokenizer is written to the
cache directory (no downloads; models.random_checkpoint.demo_checkpoint). One spawned group of
4 gloo ranks then loads it once per strategy and generates the same batch
(models.launcher.run_demo); the single-process model gives the reference tokens.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from flashcomm.models.launcher import run_demo
from flashcomm.models.random_checkpoint import demo_checkpoint, moe_demo_checkpoint


def format_table(names: list[str], per_rank: list[list[dict]], reference: list[list[int]]) -> str:
    """The demo table: one row per strategy, rank 0 timings, per-rank memory maxima."""
    head = (f"{'strategy':<22} {'tokens':>9} {'prefill ms':>10} {'decode ms/tok':>13} "
            f"{'o_proj MiB/rank':>15} {'comm KiB prefill':>16} {'comm KiB/decode':>15} "
            f"{'fetch KiB pre/dec':>17} {'blocked ms':>10}")
    lines = [head, "-" * len(head)]
    for i, name in enumerate(names):
        ranks = [r[i] for r in per_rank]
        r0 = ranks[0]
        same = all(r["tokens"] == reference for r in ranks)
        o_mib = [r["o_proj_bytes"] / 2**20 for r in ranks]
        o_txt = f"{o_mib[0]:.3f}" if max(o_mib) == min(o_mib) else \
            f"{min(o_mib):.3f}-{max(o_mib):.3f}"
        fetch = (f"{max(r['prefill_fetch_bytes'] for r in ranks) / 1024:.0f}/"
                 f"{max(r['decode_fetch_bytes_per_step'] for r in ranks) / 1024:.0f}")
        lines.append(
            f"{name:<22} {'identical' if same else 'DIFFERENT':>9} {r0['prefill_ms']:>10.1f} "
            f"{r0['decode_ms_per_token']:>13.2f} {o_txt:>15} "
            f"{max(r['prefill_comm_bytes'] for r in ranks) / 1024:>16.1f} "
            f"{max(r['decode_comm_bytes_per_step'] for r in ranks) / 1024:>15.1f} "
            f"{fetch:>17} "
            f"{max(r['blocked_wait_ms'] for r in ranks):>10.2f}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `flashcomm demo`."""
    parser.add_argument("--model", help="checkpoint directory, or 'moe' for the cached random "
                        "Qwen3-MoE (default: the cached demo Llama)")
    parser.add_argument("--nproc", type=int, default=4, help="TP size")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--prefetch-step", type=int, default=1, help="O-Shard prefetch step k")


def main(args: argparse.Namespace) -> int:
    """Entry point of `flashcomm demo`."""
    t0 = time.perf_counter()
    model = moe_demo_checkpoint() if args.model == "moe" else \
        Path(args.model) if args.model else demo_checkpoint()
    res = run_demo(model, args.nproc, args.max_new_tokens, args.prefetch_step)
    m, prompts = res["args"], res["prompts"]
    print(f"model {model} ({m.n_layers} layers, hidden {m.dim}, {m.n_heads} heads, "
          f"{m.n_kv_heads} kv heads), TP={args.nproc} gloo, {len(prompts)} prompts of "
          f"{[len(p) for p in prompts]} tokens, {args.max_new_tokens} new tokens each")
    print(format_table([r.label for r in res["rows"]], res["per_rank"],
                       res["reference"]["tokens"]))
    print(f"reference text[0]: {res['reference']['text'][0]!r}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0
