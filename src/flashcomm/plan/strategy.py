"""The one Strategy type: an attention-output strategy as the engine, planner, benchmarks and
tests name it, built from a FlashCommConfig and turned back into one.

A Strategy holds only what changes a layer's collectives or its o_proj memory (attn_out, otp,
FlashComm1, the exchange dtype, layer sharding and its source, the per-step threshold); the
parallel sizes and the rest of the knobs stay in FlashCommConfig. Labels are one scheme:
`allreduce`, `flashcomm1`, `fc2`, `fc2(otp=2)`, `auto`, then `+fc1`, `+int8`, `+oshard(k=1)`
(owner source) or `+gather(k=1)`. Pure Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from flashcomm.config import AttnOut, CommDtype, FlashCommConfig, ShardSource, divisors_below
from flashcomm.knobs import AUTO, ConfigError


@dataclass(frozen=True)
class Strategy:
    """One attention-output strategy; strings are accepted for the enum fields."""

    attn_out: AttnOut = AttnOut.ALLREDUCE
    """allreduce (row-parallel o_proj), flashcomm2, or auto (per step by the crossover)."""
    otp: int = 0
    """FlashComm2 o_proj parallel size: 0 with allreduce, >= 1 otherwise (0 there means 1)."""
    flashcomm1: bool = False
    """Sequence-parallel layout around the norms."""
    comm_dtype: CommDtype = CommDtype.AUTO
    """Payload dtype of the FlashComm2 all-to-all."""
    oshard_k: int | None = None
    """Prefetch step k when o_proj is layer-sharded; None when it is resident."""
    shard_source: ShardSource = ShardSource.OWNER
    """Where a layer-sharded W_o comes from (owner broadcast or gather of TP slices)."""
    min_tokens: int | None = 0
    """flashcomm2 only: steps with fewer tokens take the all-reduce path (None: every step,
    what auto resolves to when FlashComm2 never wins)."""
    expert_parallel: bool = False
    """MoE models: whole experts per rank (floor(E/N), one more on the first E mod N ranks),
    tokens exchanged by all-to-all (the MLP's collectives; the cost model leaves them out:
    their bytes depend on the routing)."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once, here
        for name, cls in (("attn_out", AttnOut), ("comm_dtype", CommDtype),
                          ("shard_source", ShardSource)):
            value = getattr(self, name)
            try:
                set_(self, name, cls(value))
            except ValueError:
                raise ConfigError(f"{name}={value!r}: allowed values are "
                                  f"{[m.value for m in cls]}") from None
        if self.attn_out == AttnOut.ALLREDUCE:
            if self.otp:
                raise ConfigError(f"otp={self.otp} with attn_out='allreduce': otp > 0 means "
                                  "FlashComm2; use attn_out='flashcomm2' or otp=0")
            if self.min_tokens != 0:
                raise ConfigError(f"min_tokens={self.min_tokens} with attn_out='allreduce': "
                                  "the threshold chooses FlashComm2 per step; it needs FlashComm2")
        elif self.otp == 0:
            set_(self, "otp", 1)
        if self.attn_out == AttnOut.AUTO and self.min_tokens != 0:
            raise ConfigError(f"min_tokens={self.min_tokens} with attn_out='auto': auto sets "
                              "the threshold itself")

    # ---- to and from the knobs --------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: FlashCommConfig) -> Strategy:
        """The strategy `cfg` selects (its sizes and profile are left out)."""
        mt = cfg.flashcomm2_min_tokens
        return cls(attn_out=cfg.attn_out, otp=cfg.flashcomm2_otp, flashcomm1=cfg.flashcomm1,
                   comm_dtype=cfg.comm_dtype,
                   oshard_k=cfg.prefetch_step if "o_proj" in cfg.layer_sharding else None,
                   shard_source=cfg.shard_source,
                   min_tokens=0 if mt == AUTO else mt, expert_parallel=cfg.expert_parallel)

    def to_config(self, tp: int, **knobs: Any) -> FlashCommConfig:
        """A validated FlashCommConfig of this strategy at TP size `tp`; `knobs` sets others
        (pp, dp, profile, ...)."""
        sharded = self.oshard_k is not None
        cfg = FlashCommConfig(
            tp=tp, flashcomm1=self.flashcomm1, flashcomm2_otp=self.otp,
            flashcomm2_min_tokens=AUTO if self.attn_out == AttnOut.AUTO else self.min_tokens,
            layer_sharding=("o_proj",) if sharded else (),
            shard_source=self.shard_source if sharded else ShardSource.OWNER,
            prefetch_step=self.oshard_k if sharded else FlashCommConfig.prefetch_step,
            comm_dtype=self.comm_dtype, expert_parallel=self.expert_parallel)
        return replace(cfg, **knobs).validate()

    # ---- names -------------------------------------------------------------------------------

    @property
    def label(self) -> str:
        """The one readable name, e.g. 'fc2(otp=2)+fc1+int8' or 'auto+gather(k=1)'."""
        if self.attn_out == AttnOut.ALLREDUCE:
            s = "flashcomm1" if self.flashcomm1 else "allreduce"
        else:
            params = [f"otp={self.otp}"] if self.otp != 1 else []
            if self.min_tokens != 0:
                params.append(f"min={'never' if self.min_tokens is None else self.min_tokens}")
            head = "fc2" if self.attn_out == AttnOut.FLASHCOMM2 else "auto"
            s = head + (f"({','.join(params)})" if params else "")
            s += "+fc1" if self.flashcomm1 else ""
        s += "+int8" if self.comm_dtype == CommDtype.INT8 else ""
        if self.oshard_k is not None:
            src = "oshard" if self.shard_source == ShardSource.OWNER else "gather"
            s += f"+{src}(k={self.oshard_k})"
        return s + ("+ep" if self.expert_parallel else "")

    def __str__(self) -> str:
        return self.label

    # ---- the paths a step can take -----------------------------------------------------------

    @property
    def flashcomm2(self) -> bool:
        """Whether some steps (all, or those above a threshold) take FlashComm2."""
        return self.attn_out != AttnOut.ALLREDUCE

    def fixed(self) -> Strategy:
        """The FlashComm2 path alone, every step (auto and thresholds dropped)."""
        if not self.flashcomm2:
            return self
        return replace(self, attn_out=AttnOut.FLASHCOMM2, min_tokens=0)

    def baseline(self) -> Strategy:
        """The all-reduce path with the same FlashComm1 choice: what small steps fall back to."""
        return Strategy(flashcomm1=self.flashcomm1)

    def path(self, tokens: int, threshold: int | None = None) -> Strategy:
        """The collectives a step of `tokens` tokens issues (layer sharding dropped); for auto,
        `threshold` is the resolved crossover (None: FlashComm2 never wins)."""
        if not self.flashcomm2:
            return replace(self, oshard_k=None, shard_source=ShardSource.OWNER)
        cut = self.min_tokens if self.attn_out == AttnOut.FLASHCOMM2 else threshold
        if cut is None or tokens < cut:
            return self.baseline()
        return replace(self.fixed(), oshard_k=None, shard_source=ShardSource.OWNER)


def candidates(tp: int, n_layers: int, otps: list[int] | None = None, *,
               ks: tuple[int, ...] = (0, 1, 2),
               sources: tuple[ShardSource, ...] = (ShardSource.OWNER,)) -> list[Strategy]:
    """Every strategy the engine runs at TP size `tp`: all-reduce, FlashComm1, and per otp
    FlashComm2 (+fc1, +int8, layer-sharded at each k <= L-2 per source, auto)."""
    out = [Strategy(), Strategy(flashcomm1=True)]
    for otp in divisors_below(tp) if otps is None else otps:
        fc2 = Strategy(AttnOut.FLASHCOMM2, otp)
        out += [fc2, replace(fc2, flashcomm1=True), replace(fc2, comm_dtype=CommDtype.INT8)]
        out += [replace(fc2, oshard_k=k, shard_source=src)
                for src in sources for k in ks if k <= n_layers - 2]
        out.append(replace(fc2, attn_out=AttnOut.AUTO))
    return out
