"""Generate text with a tensor-parallel Llama-family checkpoint (`flashcomm run`).

Spawns --nproc local ranks (gloo on CPU, NCCL when CUDA is available), or joins the group that
torchrun set up (RANK / WORLD_SIZE in the environment).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from flashcomm.config import ConfigError, FlashCommConfig, parse_int
from flashcomm.layout import ParallelLayout
from flashcomm.models.loader import (
    check_strategy,
    checkpoint_index,
    tensor_specs,
    validate_checkpoint,
)
from flashcomm.models.transformer import CheckpointError, ModelArgs, TPPlan
from flashcomm.plan.costmodel import HardwareProfile, Shape, crossover_tokens
from flashcomm.plan.costmodel import Strategy as CostStrategy

if TYPE_CHECKING:
    from flashcomm.groups import ParallelGroups
    from flashcomm.models.engine import Engine

ATTN_OUT = ("allreduce", "flashcomm2", "auto")
NEVER = 1 << 62
"""flashcomm2_min_tokens when FlashComm2 never wins: every step takes the all-reduce path."""
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


@dataclass(frozen=True)
class RunSpec:
    """Everything a rank needs to load and generate (picklable, sent to spawned ranks)."""

    model: str
    """Checkpoint directory."""
    cfg: FlashCommConfig
    """Validated strategy and sizes (tp = world)."""
    prompts: tuple[tuple[int, ...], ...]
    """Token ids per prompt."""
    max_new_tokens: int
    """New tokens per prompt."""
    temperature: float = 0.0
    """0 = greedy."""
    seed: int = 0
    """Sampling seed."""
    dtype: str = "auto"
    """Weight/activation dtype name from DTYPES (auto = the checkpoint's)."""
    stop_at_eos: bool = False
    """Stop a sequence at the config's eos_token_id."""
    flashcomm2_min_tokens: int = 0
    """Steps with fewer tokens use the row-parallel o_proj instead of FlashComm2."""
    auto_profile: str | None = None
    """--attn-out auto: 'fit' (measure at start-up) or a profile name/file; None = not auto."""


def auto_min_tokens(args: ModelArgs, cfg: FlashCommConfig, profile: HardwareProfile,
                    elt_bytes: int) -> int:
    """--attn-out auto's threshold: the crossover T from which FlashComm2's per-layer comm
    beats all-reduce's on `profile` (NEVER when it never does)."""
    shape = Shape(hidden=args.dim, q_dim=args.q_dim, tp=cfg.tp, elt_bytes=elt_bytes)
    fc2 = CostStrategy("flashcomm2", cfg.flashcomm2_otp, cfg.flashcomm1, cfg.comm_dtype)
    cross = crossover_tokens(profile, shape, fc2, CostStrategy(flashcomm1=cfg.flashcomm1))
    return NEVER if cross is None else cross


def load_profile(name_or_path: str) -> HardwareProfile:
    """A shipped profile or JSON file; ConfigError naming --profile otherwise."""
    try:
        return HardwareProfile.load(name_or_path)
    except (ValueError, KeyError) as e:
        raise ConfigError(str(e)) from None


def strategy_config(cfg: FlashCommConfig, attn_out: str | None, nproc: int) -> FlashCommConfig:
    """Merge --attn-out into the knobs (flashcomm2 implies otp >= 1) and validate for nproc."""
    if attn_out is not None and attn_out not in ATTN_OUT:
        raise ConfigError(f"attn_out={attn_out!r}: allowed values are {ATTN_OUT}")
    if attn_out in ("flashcomm2", "auto") and cfg.flashcomm2_otp == 0:
        cfg = replace(cfg, flashcomm2_otp=1)
    if attn_out == "auto":
        cfg = replace(cfg, flashcomm2_min_tokens="auto")
    if attn_out == "allreduce" and cfg.flashcomm2_otp > 0:
        raise ConfigError(
            f"attn_out='allreduce' with flashcomm2_otp={cfg.flashcomm2_otp}: --otp > 0 means "
            "FlashComm2; use --attn-out flashcomm2 or drop --otp"
        )
    if nproc < 1:
        raise ConfigError(f"nproc={nproc}: must be >= 1")
    if nproc == 1 and (cfg.flashcomm2 or cfg.layer_sharding or cfg.flashcomm1):
        raise ConfigError("nproc=1: FlashComm and layer sharding need nproc >= 2")
    return replace(cfg, tp=nproc, pp=1, dp=1).validate(world=nproc)


def check_model(path: str, cfg: FlashCommConfig) -> ModelArgs:
    """Check config.json, the split over cfg.tp ranks and the safetensors headers (no process
    started, no tensor data read)."""
    args = ModelArgs.from_dir(path)
    plan = TPPlan.build(args, cfg.tp, 0, cfg.flashcomm2_otp)
    check_strategy(args, cfg)
    validate_checkpoint(checkpoint_index(path), tensor_specs(args, plan))
    return args


def rank_main(rank: int, world: int, spec: RunSpec) -> dict:
    """One rank: build groups, load, generate; return this rank's result as a dict."""
    from flashcomm.groups import ParallelGroups
    from flashcomm.models.engine import Engine

    device = _device()
    shard = ("o_proj",) if "o_proj" in spec.cfg.layer_sharding else ()
    groups = ParallelGroups.build(ParallelLayout.from_config(spec.cfg, world), shard)
    engine = Engine.from_checkpoint(spec.model, spec.cfg, groups, device=device,
                                    dtype=DTYPES[spec.dtype], progress=rank == 0,
                                    flashcomm2_min_tokens=spec.flashcomm2_min_tokens)
    auto = {}
    if spec.auto_profile is not None:
        auto = resolve_auto(engine, groups, spec.auto_profile)
    res = engine.generate([list(p) for p in spec.prompts], spec.max_new_tokens,
                          temperature=spec.temperature, seed=spec.seed,
                          stop_at_eos=spec.stop_at_eos)
    return {"rank": rank, **res.to_dict(), **auto}


def resolve_auto(engine: Engine, groups: ParallelGroups, profile: str) -> dict:
    """Set the engine's per-step threshold from `profile` ('fit': measure now, collectively);
    one resident FlashComm2 W_o serves both paths, so memory is FlashComm2's."""
    import torch.distributed as dist

    if profile == "fit":
        from flashcomm.plan.fit import fit_profile

        prof = fit_profile(groups, width=engine.model.args.dim)
    else:
        prof = load_profile(profile)
    model = engine.model
    elt = model.tok_embeddings.weight.element_size()
    threshold = torch.tensor([auto_min_tokens(model.args, model.ctx.cfg, prof, elt)])
    if groups.tp.group is not None:  # every rank must take the same path at every step
        dist.broadcast(threshold, src=groups.tp.global_rank(0), group=groups.tp.group)
    model.ctx.flashcomm2_min_tokens = int(threshold)
    return {"flashcomm2_min_tokens": int(threshold), "profile": prof.name,
            "profile_dict": prof.to_dict()}


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def run_spec(spec: RunSpec, nproc: int, timeout_s: float = 600.0) -> list[dict]:
    """Per-rank results of `spec` on nproc spawned ranks (or in-process when nproc == 1)."""
    if nproc == 1:
        from flashcomm.models.engine import Engine

        engine = Engine.from_checkpoint(spec.model, spec.cfg, None, device=_device(),
                                        dtype=DTYPES[spec.dtype])
        res = engine.generate([list(p) for p in spec.prompts], spec.max_new_tokens,
                              temperature=spec.temperature, seed=spec.seed,
                              stop_at_eos=spec.stop_at_eos)
        return [{"rank": 0, **res.to_dict()}]
    from flashcomm.launch import default_backend, run_local

    return run_local(rank_main, nproc, spec, backend=default_backend(), timeout_s=timeout_s)


def summary(results: list[dict], cfg: FlashCommConfig) -> dict:
    """The --json object: rank 0's tokens/text/timings plus per-rank memory and traffic."""
    r0 = results[0]
    auto = {}
    if "flashcomm2_min_tokens" in r0:
        t = r0["flashcomm2_min_tokens"]
        auto = {"auto": {"flashcomm2_min_tokens": None if t >= NEVER else t,
                         "profile": r0["profile_dict"]}}
    return {
        "tokens": r0["tokens"],
        "text": r0["text"],
        "prefill_ms": r0["prefill_ms"],
        "decode_ms_per_token": r0["decode_ms_per_token"],
        "config": cfg.to_dict(),
        "ranks": [
            {k: r[k] for k in ("rank", "o_proj_bytes", "weight_bytes", "kv_cache_bytes",
                               "comm_bytes", "comm_bytes_by_op", "prefill_comm_bytes",
                               "decode_comm_bytes_per_step", "fetch_bytes_per_step",
                               "blocked_wait_ms")}
            for r in results
        ],
        **auto,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `flashcomm run`."""
    parser.add_argument("--model", required=True, help="checkpoint directory (config.json + "
                        "safetensors [+ tokenizer.json])")
    parser.add_argument("--nproc", default="1", help="number of TP ranks to spawn")
    parser.add_argument("--attn-out", choices=ATTN_OUT, help="attention-output strategy")
    FlashCommConfig.add_cli_arguments(parser, parallel_sizes=False)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", nargs="+", help="prompt texts (one sequence each)")
    src.add_argument("--token-ids", nargs="+", help="prompts as comma-separated token ids")
    parser.add_argument("--max-new-tokens", default="32", help="new tokens per prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto")
    parser.add_argument("--stop-at-eos", action="store_true", help="stop at eos_token_id")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before giving up")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    """Entry point of `flashcomm run`."""
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    nproc = int(os.environ["WORLD_SIZE"]) if torchrun else parse_int("nproc", args.nproc)
    cfg = strategy_config(FlashCommConfig.from_cli(args), args.attn_out, nproc)
    try:
        check_model(args.model, cfg)
        prompts = _prompts(args)
    except CheckpointError as e:
        print(f"flashcomm run: {e}", file=sys.stderr)
        return 2
    min_tokens = cfg.flashcomm2_min_tokens
    auto_profile = None
    if args.attn_out == "auto" and args.flashcomm2_min_tokens is not None:
        raise ConfigError(f"--flashcomm2-min-tokens={args.flashcomm2_min_tokens} with --attn-out "
                          "auto: auto chooses the threshold itself; pass one or the other")
    if min_tokens == "auto":
        min_tokens = 0
        auto_profile = cfg.profile
        if auto_profile != "fit":
            load_profile(auto_profile)  # a bad --profile fails here, before any rank starts
    spec = RunSpec(args.model, cfg, prompts, parse_int("max_new_tokens", args.max_new_tokens),
                   args.temperature, args.seed, args.dtype, args.stop_at_eos,
                   min_tokens, auto_profile)
    if torchrun:
        from flashcomm.launch import init_distributed

        rank = int(os.environ["RANK"])
        init_distributed(rank, nproc)
        result = rank_main(rank, nproc, spec)
        gathered = [None] * nproc if rank == 0 else None
        torch.distributed.gather_object(result, gathered, dst=0)
        torch.distributed.destroy_process_group()
        if rank != 0:
            return 0
        results = gathered
    else:
        results = run_spec(spec, nproc, args.timeout)
    out = summary(results, cfg)
    if args.json:
        print(json.dumps(out))
        return 0
    for i, toks in enumerate(out["tokens"]):
        body = out["text"][i] if out["text"] is not None else " ".join(map(str, toks))
        print(f"[{i}] {body!r}")
    print(f"prefill {out['prefill_ms']:.1f} ms, decode {out['decode_ms_per_token']:.2f} ms/token")
    for r in out["ranks"]:
        print(f"rank {r['rank']}: o_proj {r['o_proj_bytes'] / 2**20:.2f} MiB, weights "
              f"{r['weight_bytes'] / 2**20:.2f} MiB, comm {r['comm_bytes'] / 2**10:.1f} KiB, "
              f"blocked wait {r['blocked_wait_ms']:.2f} ms")
    if "auto" in out:
        t = out["auto"]["flashcomm2_min_tokens"]
        when = "never (all-reduce every step)" if t is None else f"from T >= {t} tokens per step"
        print(f"attn-out auto: FlashComm2 {when}, all-reduce below (profile "
              f"{out['auto']['profile']['name']}); one resident FlashComm2 W_o serves both "
              f"paths, so o_proj memory is FlashComm2's")
    return 0


def _prompts(args: argparse.Namespace) -> tuple[tuple[int, ...], ...]:
    if args.token_ids:
        try:
            return tuple(tuple(int(t) for t in p.split(",") if t.strip()) for p in args.token_ids)
        except ValueError:
            raise ConfigError(
                f"token_ids={args.token_ids}: expected comma-separated integers") from None
    from tokenizers import Tokenizer

    tok_file = Path(args.model) / "tokenizer.json"
    if not tok_file.is_file():
        raise CheckpointError(f"{tok_file}: no tokenizer.json, pass --token-ids instead")
    tok = Tokenizer.from_file(str(tok_file))
    return tuple(tuple(tok.encode(p).ids) for p in args.prompt)
