"""The auto policy: flashcomm2_min_tokens='auto' resolved from the cost model and a profile.

FlashComm2 pays at many tokens per step; below the crossover token count the row-parallel o_proj
with its all-reduce is cheaper. `auto_min_tokens` finds that crossover for one model shape on one
hardware profile (None: FlashComm2 never wins, every step takes the all-reduce path).
`load_profile` turns the `profile` knob into a HardwareProfile; `resolve_auto` does both at
start-up, before the model is built (torch is imported only there).
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import TYPE_CHECKING

from flashcomm.config import FlashCommConfig
from flashcomm.knobs import AUTO, ConfigError
from flashcomm.plan.costmodel import SHIPPED_PROFILES, HardwareProfile, Shape, crossover_tokens
from flashcomm.plan.strategy import Strategy

if TYPE_CHECKING:
    from flashcomm.groups import ParallelGroups

FIT = "fit"
"""profile='fit': measure the collectives at start-up instead of loading a profile."""


def auto_min_tokens(hidden: int, q_dim: int, cfg: FlashCommConfig, profile: HardwareProfile,
                    elt_bytes: int) -> int | None:
    """Smallest step size T from which FlashComm2's per-layer comm beats all-reduce's under
    `cfg` (tp, otp, flashcomm1, comm_dtype) on `profile`; None when it never does."""
    shape = Shape(hidden=hidden, q_dim=q_dim, tp=cfg.tp, elt_bytes=elt_bytes)
    fc2 = Strategy.from_config(cfg).fixed()
    return crossover_tokens(profile, shape, fc2, fc2.baseline())


def load_profile(name_or_path: str) -> HardwareProfile:
    """A shipped profile by name or a profile JSON file; ConfigError naming `profile`."""
    try:
        return HardwareProfile.load(name_or_path)
    except (ValueError, KeyError, TypeError, OSError) as e:
        if isinstance(e, json.JSONDecodeError):
            e = f"not valid JSON ({e})"
        raise ConfigError(
            f"profile={name_or_path!r}: {e} (allowed: {FIT!r}, a shipped profile "
            f"{SHIPPED_PROFILES} or a profile JSON file)") from None


def resolve_auto(cfg: FlashCommConfig, groups: ParallelGroups | None, hidden: int, q_dim: int,
                 elt_bytes: int) -> tuple[FlashCommConfig, HardwareProfile | None]:
    """`cfg` with flashcomm2_min_tokens='auto' replaced by the crossover threshold (None:
    never), and the profile it came from; collective over the TP group when profile='fit'
    (measured now) and always for the threshold, which TP rank 0 broadcasts so every rank takes
    the same path at every step. Any other cfg comes back unchanged, with no profile."""
    if cfg.flashcomm2_min_tokens != AUTO:
        return cfg, None
    if groups is None or groups.tp.group is None:
        raise ConfigError("flashcomm2_min_tokens='auto': chooses between FlashComm2 and the "
                          "all-reduce of a TP group, so it needs tp >= 2")
    import torch
    import torch.distributed as dist

    if cfg.profile == FIT:
        from flashcomm.plan.fit import fit_profile

        profile = fit_profile(groups, width=hidden)
    else:
        profile = load_profile(cfg.profile)
    threshold = auto_min_tokens(hidden, q_dim, cfg, profile, elt_bytes)
    sent = torch.tensor([-1 if threshold is None else threshold])  # -1: never, on the wire only
    dist.broadcast(sent, src=groups.tp.global_rank(0), group=groups.tp.group)
    got = int(sent)
    return replace(cfg, flashcomm2_min_tokens=None if got < 0 else got), profile
