"""The auto policy: flashcomm2_min_tokens='auto' resolved from the cost model and a profile.

FlashComm2 pays at many tokens per step; below the crossover token count the row-parallel o_proj
with its all-reduce is cheaper. `auto_min_tokens` finds that crossover for one model shape on one
hardware profile (None: FlashComm2 never wins, every step takes the all-reduce path).
`load_profile` turns the `profile` knob into a HardwareProfile. Pure Python: no torch.
"""

from __future__ import annotations

import json

from flashcomm.config import ConfigError, FlashCommConfig
from flashcomm.plan.costmodel import SHIPPED_PROFILES, HardwareProfile, Shape, crossover_tokens
from flashcomm.plan.strategy import Strategy

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
