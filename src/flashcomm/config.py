"""The knobs of flashcomm, their parsing (CLI, environment, JSON) and their validation.

Everything here is pure Python: a configuration is checked before any process group or
collective exists, so a bad value fails on every rank with the same message instead of hanging.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

# Weights that can be layer-sharded: the replicated projections of FlashComm2-style layouts.
# o_proj is FlashComm2's replicated output projection; q_b_proj / kv_b_proj are MLA's (DeepSeek)
# replicated up-projections, kept for library users with such models.
SHARDABLE_WEIGHTS = ("o_proj", "q_b_proj", "kv_b_proj")
COMM_DTYPES = ("auto", "int8")

ENV_OTP = "FLASHCOMM2_PARALLEL_SIZE"
ENV_LAYER_SHARDING = "FLASHCOMM_LAYER_SHARDING"
ENV_PREFETCH_STEP = "FLASHCOMM_PREFETCH_STEP"
ENV_FLASHCOMM1 = "FLASHCOMM1"
ENV_COMM_DTYPE = "FLASHCOMM_COMM_DTYPE"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(ValueError):
    """A configuration value is not allowed; the message names the knob, the value and the rule."""


@dataclass(frozen=True)
class FlashCommConfig:
    """Parallel sizes and FlashComm knobs, validated by `validate` before anything runs."""

    tp: int = 1
    """Tensor-parallel size N."""
    pp: int = 1
    """Pipeline-parallel size (number of stages)."""
    dp: int = 1
    """Data-parallel size (number of model replicas)."""
    flashcomm1: bool = False
    """Sequence-parallel layout around the norms (reduce-scatter / all-gather over tokens)."""
    flashcomm2_otp: int = 0
    """FlashComm2 o_proj tensor-parallel size; 0 turns FlashComm2 off, 1 replicates W_o fully."""
    layer_sharding: tuple[str, ...] = ()
    """Weight names stored on one rank of their shard group and fetched just in time."""
    prefetch_step: int = 1
    """k: how many layers ahead the layer-sharding ring prefetches (0 <= k <= L-2)."""
    comm_dtype: str = "auto"
    """Payload dtype of the FlashComm2 all-to-all: `auto` (the activation dtype) or `int8`."""

    @property
    def flashcomm2(self) -> bool:
        """Whether FlashComm2 replaces the o_proj all-reduce."""
        return self.flashcomm2_otp > 0

    @property
    def odp(self) -> int:
        """Size of FlashComm2's all-to-all group (tp / otp), or 0 when FlashComm2 is off."""
        return self.tp // self.flashcomm2_otp if self.flashcomm2 else 0

    @property
    def world(self) -> int:
        """The world size these sizes describe."""
        return self.tp * self.pp * self.dp

    def validate(self, world: int | None = None) -> FlashCommConfig:
        """Raise ConfigError for the first bad knob; return self so calls can chain."""
        for name in ("tp", "pp", "dp", "flashcomm2_otp", "prefetch_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name}={value!r}: expected an integer")
        for name in ("tp", "pp", "dp"):
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
                    f"(allowed: {_divisors_below(self.tp) or 'none, tp must be >= 2'})"
                )
            if self.tp % otp:
                raise ConfigError(
                    f"flashcomm2_otp={otp}: must divide tp={self.tp} "
                    f"(allowed: {_divisors_below(self.tp)})"
                )
        if not isinstance(self.flashcomm1, bool):
            raise ConfigError(f"flashcomm1={self.flashcomm1!r}: expected true or false")
        if self.comm_dtype not in COMM_DTYPES:
            raise ConfigError(f"comm_dtype={self.comm_dtype!r}: allowed values are {COMM_DTYPES}")
        if self.comm_dtype == "int8" and otp == 0:
            raise ConfigError(
                "comm_dtype='int8': quantizes the FlashComm2 all-to-all, so it needs "
                "flashcomm2_otp >= 1 (FLASHCOMM2_PARALLEL_SIZE / --otp)"
            )
        if self.prefetch_step < 0:
            raise ConfigError(
                f"prefetch_step={self.prefetch_step}: must be >= 0 (and <= L-2 for L layers)"
            )
        seen = set()
        for name in self.layer_sharding:
            if name not in SHARDABLE_WEIGHTS:
                raise ConfigError(
                    f"layer_sharding: unknown weight name {name!r}; allowed: {SHARDABLE_WEIGHTS}"
                )
            if name in seen:
                raise ConfigError(f"layer_sharding: weight name {name!r} is listed twice")
            seen.add(name)
        if "o_proj" in self.layer_sharding and otp == 0 and self.dp == 1:
            raise ConfigError(
                "layer_sharding=['o_proj'] with flashcomm2_otp=0 and dp=1: o_proj is row-parallel, "
                "so no rank holds a copy of another's slice and there is nothing to shard. "
                "Turn on FlashComm2 (flashcomm2_otp >= 1, FLASHCOMM2_PARALLEL_SIZE / --otp) "
                "or use dp > 1"
            )
        for name in ("q_b_proj", "kv_b_proj"):
            if name in self.layer_sharding and self.tp * self.dp == 1:
                raise ConfigError(
                    f"layer_sharding=[{name!r}] with tp=1 and dp=1: a single rank has no copy to "
                    "share; use tp > 1 or dp > 1"
                )
        return self

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict of every knob."""
        d = asdict(self)
        d["layer_sharding"] = list(self.layer_sharding)
        return d

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: FlashCommConfig | None = None):
        """Build from a dict of knob names (unknown keys are an error), on top of `base`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown knob(s) {unknown}; allowed: {sorted(known)}")
        parsed: dict[str, Any] = {}
        for key, value in values.items():
            if key in ("tp", "pp", "dp", "flashcomm2_otp", "prefetch_step"):
                parsed[key] = parse_int(key, value)
            elif key == "flashcomm1":
                parsed[key] = _parse_bool(key, value)
            elif key == "layer_sharding":
                parsed[key] = _parse_names(key, value)
            else:
                parsed[key] = value
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
        """Build from FLASHCOMM2_PARALLEL_SIZE, FLASHCOMM_LAYER_SHARDING, FLASHCOMM_PREFETCH_STEP,
        FLASHCOMM1 and FLASHCOMM_COMM_DTYPE, on top of `base`."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        pairs = (
            (ENV_OTP, "flashcomm2_otp"),
            (ENV_LAYER_SHARDING, "layer_sharding"),
            (ENV_PREFETCH_STEP, "prefetch_step"),
            (ENV_FLASHCOMM1, "flashcomm1"),
            (ENV_COMM_DTYPE, "comm_dtype"),
        )
        for var, knob in pairs:
            if var in env:
                try:
                    values[knob] = getattr(cls.from_mapping({knob: env[var]}), knob)
                except ConfigError as e:
                    raise ConfigError(f"{var} (knob {e})") from None
        return replace(base or cls(), **values)

    @staticmethod
    def add_cli_arguments(parser: argparse.ArgumentParser, parallel_sizes: bool = True) -> None:
        """Add the knobs as CLI flags; values stay strings so validation owns every message."""
        if parallel_sizes:
            parser.add_argument("--tp", help="tensor-parallel size")
            parser.add_argument("--pp", help="pipeline-parallel size")
            parser.add_argument("--dp", help="data-parallel size")
        parser.add_argument(
            "--otp",
            help="FlashComm2 o_proj parallel size (0 = off, 1 = full replication)",
        )
        parser.add_argument(
            "--flashcomm1", action="store_true", default=None, help="sequence-parallel norms"
        )
        parser.add_argument(
            "--layer-sharding", help=f"comma-separated weight names from {SHARDABLE_WEIGHTS}"
        )
        parser.add_argument("--prefetch-step", help="layer-sharding prefetch distance k")
        parser.add_argument("--comm-dtype", help=f"all-to-all payload dtype, one of {COMM_DTYPES}")
        parser.add_argument("--config-json", help="all knobs as one JSON object")

    @classmethod
    def from_cli(
        cls, args: argparse.Namespace, env: Mapping[str, str] | None = None
    ) -> FlashCommConfig:
        """Environment first, then --config-json, then explicit flags win."""
        cfg = cls.from_env(env)
        if getattr(args, "config_json", None):
            cfg = cls.from_json(args.config_json, cfg)
        flags = {
            "tp": getattr(args, "tp", None),
            "pp": getattr(args, "pp", None),
            "dp": getattr(args, "dp", None),
            "flashcomm2_otp": args.otp,
            "flashcomm1": args.flashcomm1,
            "layer_sharding": args.layer_sharding,
            "prefetch_step": args.prefetch_step,
            "comm_dtype": args.comm_dtype,
        }
        return cls.from_mapping({k: v for k, v in flags.items() if v is not None}, cfg)


def _divisors_below(n: int) -> list[int]:
    return [d for d in range(1, n) if n % d == 0]


def parse_int(knob: str, value: Any) -> int:
    """An int from an int or a numeric string; ConfigError naming `knob` otherwise."""
    if isinstance(value, bool):
        raise ConfigError(f"{knob}={value!r}: expected an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ConfigError(f"{knob}={value!r}: expected an integer")


def _parse_bool(knob: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"{knob}={value!r}: expected a boolean (1/0, true/false, on/off)")


def _parse_names(knob: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{knob}={value!r}: not a valid JSON list ({e})") from None
        else:
            return tuple(n.strip() for n in text.split(",") if n.strip())
    if isinstance(value, list | tuple) and all(isinstance(n, str) for n in value):
        return tuple(value)
    raise ConfigError(f"{knob}={value!r}: expected a list of weight names from {SHARDABLE_WEIGHTS}")
