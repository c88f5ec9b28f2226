"""`flashcomm run`: generate with a tensor-parallel Llama-family checkpoint.

Spawns --nproc local ranks (gloo on CPU, NCCL when CUDA is available), or joins the group that
torchrun set up (RANK / WORLD_SIZE in the environment); --pp P splits the layers over P pipeline
stages and --dp D runs D replicas, each with every prompt. Every input is checked here, before
any rank starts: the knobs (stage split and per-stage prefetch step included), the checkpoint
(models.loader.preflight) and the prompts against the model's vocabulary and
max_position_embeddings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from flashcomm.config import AttnOut, FlashCommConfig, strategy_config
from flashcomm.knobs import ConfigError, parse_int
from flashcomm.models.engine import RequestError, chat_prompt_ids, check_request
from flashcomm.models.gguf import resolve_checkpoint
from flashcomm.models.launcher import DTYPES, RunSpec, run_spec, under_torchrun
from flashcomm.models.loader import preflight
from flashcomm.plan.auto import FIT, load_profile


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `flashcomm run`."""
    parser.add_argument("--model", required=True, help="checkpoint directory (config.json + "
                        "safetensors [+ tokenizer.json]), or a llama GGUF file (converted once "
                        "into a cached safetensors checkpoint)")
    parser.add_argument("--nproc", default="1", help="ranks to spawn in all: pp stages x dp "
                        "replicas x tp = nproc / (pp*dp) TP ranks")
    knobs = FlashCommConfig.knobs()
    for name in ("pp", "dp"):  # tp follows from --nproc
        parser.add_argument(f"--{name}", dest=name, help=knobs[name].help + " (default 1)")
    parser.add_argument("--attn-out", choices=[a.value for a in AttnOut],
                        help="attention-output strategy (auto: FlashComm2 from the cost model's "
                        "crossover token count, all-reduce below)")
    FlashCommConfig.add_cli_arguments(parser, parallel_sizes=False)
    parser.add_argument("--prompt", nargs="+", action="extend", default=[],
                        help="prompt texts, one sequence each (repeatable; all are kept)")
    parser.add_argument("--prompt-file", action="append", default=[],
                        help="prompts, one per line, or JSONL lines {\"prompt\": ...}")
    parser.add_argument("--token-ids", nargs="+", action="extend", default=[],
                        help="prompts as comma-separated token ids (repeatable)")
    parser.add_argument("--max-new-tokens", default="32", help="new tokens per prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto")
    parser.add_argument("--stop-at-eos", action="store_true", help="stop at eos_token_id")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the "
                        "checkpoint's chat template as a user turn; stop at the end of the "
                        "assistant's turn")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before giving up")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def read_prompt_file(path: str) -> list[str]:
    """Prompts of a file: JSONL (every non-blank line a JSON object with a "prompt" string) or
    plain text (every non-blank line one prompt)."""
    f = Path(path)
    if not f.is_file():
        raise ConfigError(f"prompt_file={path!r}: no such file")
    lines = [(i + 1, line) for i, line in enumerate(f.read_text().splitlines()) if line.strip()]
    if not lines:
        raise RequestError(f"{path}: no prompt in the file")
    if not lines[0][1].lstrip().startswith("{"):
        return [line for _, line in lines]
    out = []
    for n, line in lines:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise RequestError(f"{path}:{n}: not a JSON object ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise RequestError(f'{path}:{n}: expected {{"prompt": "..."}}')
        out.append(obj["prompt"])
    return out


def prompt_ids(args: argparse.Namespace) -> tuple[tuple[int, ...], ...]:
    """Token ids of every prompt given (--prompt, --prompt-file, --token-ids), in order."""
    texts = list(args.prompt) + [p for f in args.prompt_file for p in read_prompt_file(f)]
    if texts and args.token_ids:
        raise ConfigError("token_ids: pass either text prompts (--prompt / --prompt-file) or "
                          "--token-ids, not both")
    if args.token_ids:
        try:
            return tuple(tuple(int(t) for t in p.split(",") if t.strip()) for p in args.token_ids)
        except ValueError:
            raise ConfigError(
                f"token_ids={args.token_ids}: expected comma-separated integers") from None
    if args.chat and args.token_ids:
        raise ConfigError("chat: --chat templates text prompts; pass --prompt or --prompt-file, "
                          "not --token-ids")
    if not texts:
        raise ConfigError("prompt: none given; pass --prompt, --prompt-file or --token-ids")
    empty = [i for i, p in enumerate(texts) if not p]
    if empty:
        raise RequestError(f"prompt {empty[0]} is empty: every prompt needs at least one token")
    if args.chat:
        return tuple(tuple(p) for p in chat_prompt_ids(args.model, texts))
    from tokenizers import Tokenizer

    tok_file = Path(args.model) / "tokenizer.json"
    if not tok_file.is_file():
        raise RequestError(f"{tok_file}: no tokenizer.json for text prompts; pass --token-ids")
    tok = Tokenizer.from_file(str(tok_file))
    return tuple(tuple(tok.encode(p).ids) for p in texts)


def summary(results: list[dict], cfg: FlashCommConfig) -> dict:
    """The --json object: rank 0's tokens/text/timings plus per-rank memory and traffic."""
    r0 = results[0]
    return {
        "tokens": r0["tokens"],
        "text": r0["text"],
        "prefill_ms": r0["prefill_ms"],
        "decode_ms_per_token": r0["decode_ms_per_token"],
        "config": cfg.to_dict(),
        "ranks": [
            {k: r[k] for k in ("rank", "layers", "o_proj_bytes", "weight_bytes",
                               "kv_cache_bytes", "comm_bytes", "comm_bytes_by_op",
                               "prefill_comm_bytes",
                               "decode_comm_bytes_per_step", "fetch_bytes_per_step",
                               "blocked_wait_ms", "prefill_fetch_bytes",
                               "decode_fetch_bytes_per_step", "prefill_blocked_wait_ms",
                               "decode_blocked_wait_ms_per_step")}
            for r in results
        ],
        **({"auto": r0["auto"]} if "auto" in r0 else {}),
    }


def format_summary(out: dict) -> str:
    """The human-readable report of one run."""
    lines = []
    for i, toks in enumerate(out["tokens"]):
        body = out["text"][i] if out["text"] is not None else " ".join(map(str, toks))
        lines.append(f"[{i}] {body!r}")
    lines.append(f"prefill {out['prefill_ms']:.1f} ms, decode {out['decode_ms_per_token']:.2f} "
                 "ms/token")
    for r in out["ranks"]:
        a, b = r["layers"]
        lines.append(f"rank {r['rank']} (layers {a}..{b - 1}): o_proj "
                     f"{r['o_proj_bytes'] / 2**20:.2f} MiB, weights "
                     f"{r['weight_bytes'] / 2**20:.2f} MiB, comm {r['comm_bytes'] / 2**10:.1f} "
                     f"KiB, blocked wait {r['blocked_wait_ms']:.2f} ms")
    if "auto" in out:
        t = out["auto"]["flashcomm2_min_tokens"]
        when = "never (all-reduce every step)" if t is None else f"from T >= {t} tokens per step"
        lines.append(f"attn-out auto: FlashComm2 {when}, all-reduce below (profile "
                     f"{out['auto']['profile']['name']}); one resident FlashComm2 W_o serves both "
                     "paths, so o_proj memory is FlashComm2's")
    return "\n".join(lines)


def _note(message: str) -> None:
    print(f"flashcomm run: {message}", file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    """Entry point of `flashcomm run`."""
    nproc = int(os.environ["WORLD_SIZE"]) if under_torchrun() else parse_int("nproc", args.nproc)
    cfg = strategy_config(FlashCommConfig.from_cli(args), args.attn_out, nproc)
    if cfg.attn_out == AttnOut.AUTO and cfg.profile != FIT:
        load_profile(cfg.profile)  # a bad --profile fails here, before any rank starts
    args.model = str(resolve_checkpoint(args.model, notify=_note))  # a GGUF: converted, cached
    model_args = preflight(args.model, cfg)
    prompts = prompt_ids(args)
    max_new = parse_int("max_new_tokens", args.max_new_tokens)
    check_request(model_args, [list(p) for p in prompts], max_new)
    spec = RunSpec(args.model, cfg, prompts, max_new, args.temperature, args.seed, args.dtype,
                   args.stop_at_eos or args.chat)
    results = run_spec(spec, nproc, args.timeout)
    if results is None:  # a torchrun rank other than 0
        return 0
    out = summary(results, cfg)
    print(json.dumps(out) if args.json else format_summary(out))
    return 0
