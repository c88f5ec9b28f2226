"""The knobs of flashcomm, their options and their validation.

Each knob is one dataclass field of `FlashCommConfig`; its metadata (`knobs.Knob`) names its CLI
flag and environment variable and how a string becomes a value, so flags, environment, JSON keys
and error messages are all derived from that one definition.

Everything here is pure Python: a configuration is checked before any process group or
collective exists, so a bad value fails on every rank with the same message instead of hanging.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from typing import Any

from flashcomm.knobs import (
    AUTO,
    ConfigError,
    Knob,
    MinTokens,
    enum_parser,
    knob,
    parse_bool,
    parse_int,
    parse_min_tokens,
    parse_names,
    parse_partition,
    parse_str,
)

# Weights that can be layer-sharded: the replicated projections of FlashComm2-style layouts.
# o_proj is FlashComm2's replicated output projection; q_b_proj / kv_b_proj are MLA's (DeepSeek)
# replicated up-projections, kept for library users with such models.
SHARDABLE_WEIGHTS = ("o_proj", "q_b_proj", "kv_b_proj")


class AttnOut(StrEnum):
    """How attention's output reaches the residual stream."""

    ALLREDUCE = "allreduce"
    """Row-parallel o_proj, then an all-reduce (or reduce-scatter under FlashComm1)."""
    FLASHCOMM2 = "flashcomm2"
    """All-to-all of the attention output, then the replicated (or otp-sliced) W_o."""
    AUTO = "auto"
    """FlashComm2 from the cost model's crossover token count, all-reduce below it."""


class CommDtype(StrEnum):
    """Payload dtype of the FlashComm2 all-to-all."""

    AUTO = "auto"
    """The activation dtype."""
    INT8 = "int8"
    """Row-wise absmax int8 plus one fp32 scale per token row."""


class ShardSource(StrEnum):
    """Where a layer-sharded FlashComm2 W_o comes from at a FlashComm2 step."""

    OWNER = "owner"
    """Layer i lives on shard-group member i mod G and is broadcast from it (original O-Shard)."""
    GATHER = "gather"
    """Every rank keeps its row-parallel D/N slice; FlashComm2 steps all-gather the W_o."""


# ---- the knobs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlashCommConfig:
    """Parallel sizes and FlashComm knobs, validated by `validate` before anything runs."""

    tp: int = knob(1, flag="--tp", help="tensor-parallel size N", parse=parse_int,
                   parallel_size=True)
    """Tensor-parallel size N."""
    pp: int = knob(1, flag="--pp", help="pipeline-parallel size (stages)", parse=parse_int,
                   parallel_size=True)
    """Pipeline-parallel size (number of stages)."""
    dp: int = knob(1, flag="--dp", help="data-parallel size (replicas)", parse=parse_int,
                   parallel_size=True)
    """Data-parallel size (number of model replicas)."""
    flashcomm1: bool = knob(False, flag="--flashcomm1", env="FLASHCOMM1",
                            help="sequence-parallel norms (reduce-scatter / all-gather)",
                            parse=parse_bool)
    """Sequence-parallel layout around the norms (reduce-scatter / all-gather over tokens)."""
    flashcomm2_otp: int = knob(0, flag="--otp", env="FLASHCOMM2_PARALLEL_SIZE",
                               help="FlashComm2 o_proj parallel size (0 = off, 1 = full W_o)",
                               parse=parse_int)
    """FlashComm2 o_proj tensor-parallel size; 0 turns FlashComm2 off, 1 replicates W_o fully."""
    flashcomm2_min_tokens: MinTokens = knob(
        0, flag="--flashcomm2-min-tokens", env="FLASHCOMM2_MIN_TOKENS",
        help="steps with fewer tokens take the row-parallel o_proj; 'auto' = from the cost model",
        parse=parse_min_tokens)
    """Per-step threshold: FlashComm2 at T >= this, row-parallel + all-reduce below; 'auto'
    resolves it from the cost model and a hardware profile at start-up."""
    layer_sharding: tuple[str, ...] = knob(
        (), flag="--layer-sharding", env="FLASHCOMM_LAYER_SHARDING",
        help=f"comma-separated weight names from {SHARDABLE_WEIGHTS}", parse=parse_names)
    """Weight names stored on one rank of their shard group and fetched just in time."""
    shard_source: ShardSource = knob(
        ShardSource.OWNER, flag="--shard-source", env="FLASHCOMM_SHARD_SOURCE",
        help="layer-sharded W_o source: owner (broadcast) or gather (resident TP slices)",
        parse=enum_parser(ShardSource))
    """Where a layer-sharded FlashComm2 W_o comes from (see ShardSource)."""
    prefetch_step: int = knob(1, flag="--prefetch-step", env="FLASHCOMM_PREFETCH_STEP",
                              help="layer-sharding prefetch distance k (0 <= k <= L-2)",
                              parse=parse_int)
    """k: how many layers ahead the layer-sharding ring prefetches (0 <= k <= L-2)."""
    comm_dtype: CommDtype = knob(CommDtype.AUTO, flag="--comm-dtype", env="FLASHCOMM_COMM_DTYPE",
                                 help="FlashComm2 all-to-all payload: auto or int8",
                                 parse=enum_parser(CommDtype))
    """Payload dtype of the FlashComm2 all-to-all."""
    expert_parallel: bool = knob(False, flag="--expert-parallel", env="FLASHCOMM_EXPERT_PARALLEL",
                                 help="MoE: each TP rank holds whole experts (floor(E/N), one "
                                 "more on the first E mod N ranks; all-to-all token "
                                 "exchange) instead of a 1/N slice of every expert",
                                 parse=parse_bool)
    """MoE models: whole experts per TP rank (vLLM's placement: floor(E/N), one more on the first
    E mod N ranks) and an all-to-all token exchange, instead of
    tensor-parallel experts (a 1/N slice of every expert, reduced like the dense MLP)."""
    pp_layer_partition: tuple[int, ...] = knob(
        (), flag="--pp-layer-partition", env="VLLM_PP_LAYER_PARTITION",
        help="layers per pipeline stage, e.g. 4,3 (default: vLLM's even split)",
        parse=parse_partition)
    """Layers of each pipeline stage, overriding the even split (vLLM's own variable)."""
    profile: str = knob("fit", flag="--profile", env="FLASHCOMM_PROFILE",
                        help="hardware profile for flashcomm2_min_tokens=auto: 'fit' (measure at "
                        "start-up), a shipped name (h100-nvlink, pcie-gen4) or a JSON file",
                        parse=parse_str)
    """Collective costs that resolve flashcomm2_min_tokens='auto'."""
    group_timeout_s: int = knob(120, flag="--group-timeout", env="FLASHCOMM_GROUP_TIMEOUT",
                                help="seconds a collective waits for a peer before the rank "
                                "fails naming it (a dead rank or a lost link)", parse=parse_int)
    """Timeout of every process group flashcomm builds: how long a lost peer or link takes to
    end the run."""

    @property
    def flashcomm2(self) -> bool:
        """Whether FlashComm2 replaces the o_proj all-reduce (at least on large steps)."""
        return self.flashcomm2_otp > 0

    @property
    def odp(self) -> int:
        """Size of FlashComm2's all-to-all group (tp / otp), or 0 when FlashComm2 is off."""
        return self.tp // self.flashcomm2_otp if self.flashcomm2 else 0

    @property
    def world(self) -> int:
        """The world size these sizes describe."""
        return self.tp * self.pp * self.dp

    @property
    def attn_out(self) -> AttnOut:
        """The attention-output strategy these knobs select."""
        if not self.flashcomm2:
            return AttnOut.ALLREDUCE
        return AttnOut.AUTO if self.flashcomm2_min_tokens == AUTO else AttnOut.FLASHCOMM2

    def flashcomm2_step(self, num_tokens: int) -> bool:
        """Whether a step of `num_tokens` tokens takes FlashComm2 (else the row-parallel o_proj
        and its all-reduce); 'auto' must have been resolved to a threshold first."""
        mt = self.flashcomm2_min_tokens
        if mt == AUTO:
            raise ConfigError("flashcomm2_min_tokens='auto': resolve it to a threshold before "
                              "running a step (flashcomm.plan.auto.resolve_auto)")
        return self.flashcomm2 and mt is not None and num_tokens >= mt

    @property
    def gather_source(self) -> bool:
        """Whether the layer-sharded o_proj series all-gathers resident TP slices."""
        return "o_proj" in self.layer_sharding and self.shard_source == ShardSource.GATHER

    def validate(self, world: int | None = None) -> FlashCommConfig:
        """Raise ConfigError for the first bad knob; return self so calls can chain."""
        for f in fields(self):  # type and range of each knob, by its own parser
            value = getattr(self, f.name)
            if value != f.metadata["knob"].parse(f.name, value):
                raise ConfigError(f"{f.name}={value!r}: not a valid value")
        for name in ("tp", "pp", "dp", "group_timeout_s"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1")
        if world is not None and world != self.world:
            raise ConfigError(
                f"world={world}: must equal tp*pp*dp = {self.tp}*{self.pp}*{self.dp} = {self.world}"
            )
        otp = self.flashcomm2_otp
        if otp < 0:
            raise ConfigError(f"flashcomm2_otp={otp}: must be 0 (off) or a divisor of tp below tp")
        if otp > 0:
            if otp >= self.tp:
                raise ConfigError(
                    f"flashcomm2_otp={otp}: must be smaller than tp={self.tp} "
                    f"(allowed: {divisors_below(self.tp) or 'none, tp must be >= 2'})"
                )
            if self.tp % otp:
                raise ConfigError(
                    f"flashcomm2_otp={otp}: must divide tp={self.tp} "
                    f"(allowed: {divisors_below(self.tp)})"
                )
        if self.flashcomm2_min_tokens != 0 and otp == 0:
            raise ConfigError(
                f"flashcomm2_min_tokens={self.flashcomm2_min_tokens!r}: chooses between "
                "FlashComm2 and the all-reduce per step, so it needs flashcomm2_otp >= 1 "
                "(FLASHCOMM2_PARALLEL_SIZE / --otp)")
        if self.comm_dtype == CommDtype.INT8 and otp == 0:
            raise ConfigError(
                "comm_dtype='int8': quantizes the FlashComm2 all-to-all, so it needs "
                "flashcomm2_otp >= 1 (FLASHCOMM2_PARALLEL_SIZE / --otp)"
            )
        if self.prefetch_step < 0:
            raise ConfigError(
                f"prefetch_step={self.prefetch_step}: must be >= 0 (and <= L-2 for L layers)"
            )
        if self.pp_layer_partition and len(self.pp_layer_partition) != self.pp:
            raise ConfigError(
                f"pp_layer_partition={','.join(map(str, self.pp_layer_partition))} "
                f"(VLLM_PP_LAYER_PARTITION): has {len(self.pp_layer_partition)} stages, "
                f"pp={self.pp}")
        self._validate_sharding()
        return self

    def _validate_sharding(self) -> None:
        seen = set()
        for name in self.layer_sharding:
            if name not in SHARDABLE_WEIGHTS:
                raise ConfigError(
                    f"layer_sharding: unknown weight name {name!r}; allowed: {SHARDABLE_WEIGHTS}"
                )
            if name in seen:
                raise ConfigError(f"layer_sharding: weight name {name!r} is listed twice")
            seen.add(name)
        otp = self.flashcomm2_otp
        if "o_proj" in self.layer_sharding and otp == 0 and self.dp == 1:
            raise ConfigError(
                "layer_sharding=['o_proj'] with flashcomm2_otp=0 and dp=1: o_proj is row-parallel, "
                "so no rank holds a copy of another's slice and there is nothing to shard. "
                "Turn on FlashComm2 (flashcomm2_otp >= 1, FLASHCOMM2_PARALLEL_SIZE / --otp) "
                "or use dp > 1"
            )
        if self.shard_source == ShardSource.GATHER:
            if "o_proj" not in self.layer_sharding:
                raise ConfigError(
                    "shard_source='gather': applies to the layer-sharded o_proj, so set "
                    "layer_sharding=o_proj (FLASHCOMM_LAYER_SHARDING / --layer-sharding) too")
            if otp == 0:
                raise ConfigError(
                    "shard_source='gather': gathers the FlashComm2 W_o from the resident TP "
                    "slices, so it needs flashcomm2_otp >= 1 (FLASHCOMM2_PARALLEL_SIZE / --otp)")
        for name in ("q_b_proj", "kv_b_proj"):
            if name in self.layer_sharding and self.tp * self.dp == 1:
                raise ConfigError(
                    f"layer_sharding=[{name!r}] with tp=1 and dp=1: a single rank has no copy to "
                    "share; use tp > 1 or dp > 1"
                )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict of every knob (enums as their strings)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else \
                (str(value) if isinstance(value, StrEnum) else value)
        return out

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def knobs(cls) -> dict[str, Knob]:
        """Field name -> Knob, in declaration order."""
        return {f.name: f.metadata["knob"] for f in fields(cls)}

    @classmethod
    def env_names(cls) -> tuple[str, ...]:
        """Every environment variable a knob reads."""
        return tuple(k.env for k in cls.knobs().values() if k.env)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: FlashCommConfig | None = None):
        """Build from a dict of knob names (unknown keys are an error), on top of `base`."""
        knobs = cls.knobs()
        unknown = sorted(set(values) - set(knobs))
        if unknown:
            raise ConfigError(f"unknown knob(s) {unknown}; allowed: {sorted(knobs)}")
        parsed = {key: knobs[key].parse(key, value) for key, value in values.items()}
        return replace(base or cls(), **parsed)

    @classmethod
    def from_json(cls, text: str, base: FlashCommConfig | None = None) -> FlashCommConfig:
        """Build from a JSON object string such as '{"tp": 4, "flashcomm2_otp": 1}'."""
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config JSON: not valid JSON ({e})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config JSON: expected an object, got {type(values).__name__}")
        return cls.from_mapping(values, base)

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, base: FlashCommConfig | None = None
    ) -> FlashCommConfig:
        """Build from the knobs' environment variables (FLASHCOMM*), on top of `base`."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name, k in cls.knobs().items():
            if k.env and k.env in env:
                try:
                    values[name] = k.parse(name, env[k.env])
                except ConfigError as e:
                    raise ConfigError(f"{k.env} (knob {e})") from None
        return replace(base or cls(), **values)

    @classmethod
    def add_cli_arguments(cls, parser: argparse.ArgumentParser,
                          parallel_sizes: bool = True) -> None:
        """Add the knobs as CLI flags; values stay strings so validation owns every message."""
        for name, k in cls.knobs().items():
            if k.flag is None or (k.parallel_size and not parallel_sizes):
                continue
            env = f" [env {k.env}]" if k.env else ""
            if isinstance(getattr(cls(), name), bool):
                parser.add_argument(k.flag, dest=name, action="store_true", default=None,
                                    help=k.help + env)
            else:
                parser.add_argument(k.flag, dest=name, help=k.help + env)
        parser.add_argument("--config-json", help="all knobs as one JSON object")

    @classmethod
    def from_cli(
        cls, args: argparse.Namespace, env: Mapping[str, str] | None = None
    ) -> FlashCommConfig:
        """Environment first, then --config-json, then explicit flags win."""
        cfg = cls.from_env(env)
        if getattr(args, "config_json", None):
            cfg = cls.from_json(args.config_json, cfg)
        flags = {name: getattr(args, name, None) for name in cls.knobs()}
        return cls.from_mapping({k: v for k, v in flags.items() if v is not None}, cfg)


def divisors_below(n: int) -> list[int]:
    """The divisors of n below n: the flashcomm2_otp values allowed at tp = n."""
    return [d for d in range(1, n) if n % d == 0]


def strategy_config(cfg: FlashCommConfig, attn_out: str | None, nproc: int) -> FlashCommConfig:
    """Merge an attn_out choice (--attn-out) into the knobs, for `nproc` ranks in all: cfg.pp
    stages times cfg.dp replicas of tp = nproc / (pp*dp) TP ranks; flashcomm2 and auto imply
    otp >= 1, auto sets flashcomm2_min_tokens."""
    if attn_out is not None:
        attn_out = enum_parser(AttnOut)("attn_out", attn_out)
    if nproc < 1:
        raise ConfigError(f"nproc={nproc}: must be >= 1")
    for name in ("pp", "dp"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}={getattr(cfg, name)}: must be >= 1")
    if nproc % (cfg.pp * cfg.dp):
        raise ConfigError(f"nproc={nproc}: must be a multiple of pp*dp = {cfg.pp}*{cfg.dp} "
                          f"(tp = nproc / (pp*dp) ranks per stage and replica)")
    tp = nproc // (cfg.pp * cfg.dp)
    if attn_out in (AttnOut.FLASHCOMM2, AttnOut.AUTO) and cfg.flashcomm2_otp == 0:
        cfg = replace(cfg, flashcomm2_otp=1)
    if attn_out == AttnOut.AUTO:
        if cfg.flashcomm2_min_tokens not in (0, AUTO):
            raise ConfigError(
                f"flashcomm2_min_tokens={cfg.flashcomm2_min_tokens!r} (--flashcomm2-min-tokens / "
                "FLASHCOMM2_MIN_TOKENS) with attn_out='auto': auto chooses the threshold itself; "
                "pass one or the other")
        cfg = replace(cfg, flashcomm2_min_tokens=AUTO)
    if attn_out == AttnOut.ALLREDUCE and cfg.flashcomm2_otp > 0:
        raise ConfigError(
            f"attn_out='allreduce' with flashcomm2_otp={cfg.flashcomm2_otp}: --otp > 0 means "
            "FlashComm2; use --attn-out flashcomm2 or drop --otp")
    if nproc == 1 and (cfg.flashcomm2 or cfg.layer_sharding or cfg.flashcomm1):
        raise ConfigError("nproc=1: FlashComm and layer sharding need nproc >= 2")
    if tp == 1 and (cfg.flashcomm2 or cfg.flashcomm1):
        raise ConfigError(f"tp=1 (nproc={nproc} / pp*dp = {cfg.pp}*{cfg.dp}): FlashComm needs "
                          "tp >= 2 ranks per stage")
    return replace(cfg, tp=tp).validate(world=nproc)
