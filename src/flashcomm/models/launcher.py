"""Runs of the engine on spawned local ranks or under torchrun: `flashcomm run` and `demo`.

A rank builds its process groups, resolves flashcomm2_min_tokens='auto' (flashcomm.plan.auto)
before the model exists, loads its part of the checkpoint and generates; the command modules
under flashcomm.cli only parse flags and print what comes back.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from flashcomm.config import FlashCommConfig
from flashcomm.groups import ParallelGroups
from flashcomm.model_args import ModelArgs
from flashcomm.models.engine import Engine, chat_prompt_ids
from flashcomm.models.loader import checkpoint_dtype
from flashcomm.plan.auto import resolve_auto
from flashcomm.plan.strategy import Strategy

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
"""--dtype names; auto = the checkpoint's own dtype."""
DEMO_PROMPTS = (
    "FlashComm2 trades storage for transmission.",
    "Hello",
    "Tensor parallelism splits the heads.",
)
"""The random demo checkpoint's prompts (plain text: it has no chat template)."""
DEMO_QUESTIONS = (
    "What is the capital of France?",
    "What is 2 + 2?",
    "Explain what a CPU does in two sentences.",
)
"""The real model's questions, each one chat turn."""


@dataclass(frozen=True)
class RunSpec:
    """Everything a rank needs to load and generate (picklable, sent to spawned ranks)."""

    model: str
    """Checkpoint directory."""
    cfg: FlashCommConfig
    """Validated knobs, tp = world; flashcomm2_min_tokens may still be 'auto'."""
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


def device() -> torch.device:
    """The current CUDA device when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank_main(rank: int, world: int, spec: RunSpec) -> dict:
    """One rank: groups, the auto threshold, load, generate; this rank's result as a dict
    (with `auto`: the resolved threshold and its profile, when the knob was 'auto')."""
    groups = ParallelGroups.from_config(spec.cfg, world) if world > 1 else None
    with groups.naming_link_errors() if groups else contextlib.nullcontext():
        res, cfg, profile = _load_and_generate(spec, groups, rank)
    out = {"rank": rank, **res.to_dict()}
    if profile is not None:
        out["auto"] = {"flashcomm2_min_tokens": cfg.flashcomm2_min_tokens,
                       "profile": profile.to_dict()}
    return out


def _load_and_generate(spec: RunSpec, groups: ParallelGroups | None, rank: int) -> tuple:
    dtype = DTYPES[spec.dtype] or checkpoint_dtype(spec.model)
    args = ModelArgs.from_dir(spec.model)
    cfg, profile = resolve_auto(spec.cfg, groups, args.dim, args.q_dim, dtype.itemsize)
    engine = Engine.from_checkpoint(spec.model, cfg, groups, device=device(), dtype=dtype,
                                    progress=rank == 0)
    res = engine.generate([list(p) for p in spec.prompts], spec.max_new_tokens,
                          temperature=spec.temperature, seed=spec.seed,
                          stop_at_eos=spec.stop_at_eos)
    return res, cfg, profile


def under_torchrun() -> bool:
    """Whether torchrun (or another launcher) set RANK and WORLD_SIZE for this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run_spec(spec: RunSpec, nproc: int, timeout_s: float = 600.0) -> list[dict] | None:
    """Per-rank results of `spec`: on nproc spawned ranks, in-process when nproc == 1, or on
    the group torchrun started (then only rank 0 gets the results; other ranks get None)."""
    from flashcomm.launch import default_backend, init_distributed, run_local

    if under_torchrun():
        rank = int(os.environ["RANK"])
        init_distributed(rank, nproc, group_timeout_s=spec.cfg.group_timeout_s)
        result = rank_main(rank, nproc, spec)
        gathered = [None] * nproc if rank == 0 else None
        torch.distributed.gather_object(result, gathered, dst=0)
        torch.distributed.destroy_process_group()
        return gathered
    if nproc == 1:
        return [rank_main(0, 1, spec)]
    return run_local(rank_main, nproc, spec, backend=default_backend(), timeout_s=timeout_s,
                     group_timeout_s=spec.cfg.group_timeout_s)


# ---- the demo ------------------------------------------------------------------------------


def demo_rows(tp: int, prefetch_step: int = 1, moe: bool = False) -> list[Strategy]:
    """The strategies the demo compares: all-reduce, FlashComm2 (+FlashComm1, +O-Shard from its
    owner, +gather of the resident TP slices, auto+gather: FlashComm2 only from the crossover, so
    decode fetches nothing), FlashComm2 otp=2 where tp allows it, and for an MoE model expert
    parallelism (+FlashComm2)."""
    fc2 = Strategy("flashcomm2", otp=1)
    gather = Strategy("flashcomm2", 1, oshard_k=prefetch_step, shard_source="gather")
    rows = [Strategy(), fc2, Strategy("flashcomm2", 1, flashcomm1=True),
            Strategy("flashcomm2", 1, oshard_k=prefetch_step), gather,
            Strategy("auto", 1, oshard_k=prefetch_step, shard_source="gather")]
    if tp > 2 and tp % 2 == 0:
        rows.append(Strategy("flashcomm2", otp=2))
    if moe:
        rows += [Strategy(expert_parallel=True), Strategy("flashcomm2", 1, expert_parallel=True)]
    return rows


def demo_rank(rank: int, world: int, model: str, rows: list[Strategy], prompts: list[list[int]],
              max_new_tokens: int, stop_at_eos: bool = False) -> list[dict]:
    """One rank of the demo group: every strategy in turn, a warm-up then a measured batch."""
    out = []
    args, elt = ModelArgs.from_dir(model), checkpoint_dtype(model).itemsize
    for row in rows:
        cfg = row.to_config(world)
        groups = ParallelGroups.from_config(cfg, world)
        cfg, _ = resolve_auto(cfg, groups, args.dim, args.q_dim, elt)  # auto: fitted here
        engine = Engine.from_checkpoint(model, cfg, groups, progress=False)
        engine.generate(prompts, 2)  # warm-up: first-call allocations and lazy inits
        out.append(engine.generate(prompts, max_new_tokens, stop_at_eos=stop_at_eos).to_dict())
    return out


def run_demo(model: str | Path, nproc: int, max_new_tokens: int, prefetch_step: int = 1,
             timeout_s: float = 600.0, chat: bool = False) -> dict:
    """The single-process reference, then every demo row on one group of `nproc` ranks:
    {"args", "questions", "prompts", "reference" (GenerationResult dict), "rows", "per_rank"}.
    chat: DEMO_QUESTIONS through the checkpoint's chat template, each answer ending at its
    end-of-turn token; otherwise DEMO_PROMPTS as plain text for max_new_tokens."""
    from flashcomm.launch import run_local

    ref = Engine.from_checkpoint(model, FlashCommConfig(), None, progress=False)
    questions = list(DEMO_QUESTIONS if chat else DEMO_PROMPTS)
    prompts = chat_prompt_ids(model, questions) if chat else ref.encode(questions)
    reference = ref.generate(prompts, max_new_tokens, stop_at_eos=chat)
    rows = demo_rows(nproc, prefetch_step, ref.model.args.is_moe)
    per_rank = run_local(demo_rank, nproc, str(model), rows, prompts, max_new_tokens, chat,
                         timeout_s=timeout_s)
    return {"args": ref.model.args, "questions": questions, "prompts": prompts,
            "reference": reference.to_dict(), "rows": rows, "per_rank": per_rank}
