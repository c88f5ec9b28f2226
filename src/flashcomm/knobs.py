"""How a knob is spelled outside Python, and how a raw value becomes a typed one.

`config.FlashCommConfig` declares each knob once as a dataclass field whose metadata is a `Knob`
(CLI flag, environment variable, help, parser). The parsers here turn a raw value (a CLI or
environment string, a JSON value) into the field's type, or raise a `ConfigError` that names
the knob, the value and what is allowed. `FlashCommError` is the base of every error flashcomm
reports to a user.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class FlashCommError(Exception):
    """Base of every error flashcomm reports to a user: the message names the knob or file."""


class ConfigError(FlashCommError, ValueError):
    """A configuration value is not allowed; the message names the knob, the value and the rule."""


AUTO = "auto"
"""flashcomm2_min_tokens=auto: the threshold comes from the cost model at start-up."""
MinTokens = int | Literal["auto"] | None
"""flashcomm2_min_tokens: a threshold, 'auto', or None (FlashComm2 never: what 'auto' resolves to
when the cost model finds no crossover)."""


@dataclass(frozen=True)
class Knob:
    """How one FlashCommConfig field is spelled outside Python."""

    flag: str | None
    """CLI flag (None: not a flag)."""
    env: str | None
    """Environment variable (None: not read from the environment)."""
    help: str
    """One line for --help."""
    parse: Callable[[str, Any], Any]
    """(knob name, raw value) -> typed value; raises ConfigError naming the knob."""
    parallel_size: bool = False
    """tp/pp/dp: commands that derive them from --nproc leave the flag out."""


def knob(default: Any, *, flag: str | None = None, env: str | None = None, help: str,
         parse: Callable[[str, Any], Any], parallel_size: bool = False) -> Any:
    """A dataclass field carrying its Knob metadata."""
    return field(default=default,
                 metadata={"knob": Knob(flag, env, help, parse, parallel_size)})


# ---- parsers: (knob, raw) -> value ------------------------------------------------------------


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


def parse_bool(knob: str, value: Any) -> bool:
    """A bool from a bool, 0/1 or a word such as on/off; ConfigError naming `knob` otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"{knob}={value!r}: expected a boolean (1/0, true/false, on/off)")


def parse_names(knob: str, value: Any) -> tuple[str, ...]:
    """Names from a comma-separated string, a JSON list or a list (checked by the caller)."""
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
    raise ConfigError(f"{knob}={value!r}: expected a list of names, e.g. o_proj or a,b")


def enum_parser(cls: type[StrEnum]) -> Callable[[str, Any], StrEnum]:
    """A parser into `cls`; the error lists the allowed values."""
    def parse(knob: str, value: Any) -> StrEnum:
        try:
            return cls(value.strip().lower() if isinstance(value, str) else value)
        except ValueError:
            allowed = [m.value for m in cls]
            raise ConfigError(f"{knob}={value!r}: allowed values are {allowed}") from None
    return parse


def parse_min_tokens(knob: str, value: Any) -> MinTokens:
    """An int >= 0, 'auto', or None (never; only from Python or JSON null)."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    n = parse_int(knob, value)
    if n < 0:
        raise ConfigError(f"{knob}={n}: must be >= 0 (0 = every step takes FlashComm2) or 'auto'")
    return n


def parse_partition(knob: str, value: Any) -> tuple[int, ...]:
    """Layer counts per pipeline stage from "4,3" or a list; each >= 1."""
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v] if value.strip() else []
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{knob}={value!r}: expected comma-separated layer counts, e.g. 4,3")
    counts = tuple(parse_int(knob, v) for v in value)
    if any(c < 1 for c in counts):
        raise ConfigError(f"{knob}={','.join(map(str, counts))}: every stage needs >= 1 layer")
    return counts


def parse_str(knob: str, value: Any) -> str:
    """A non-empty, stripped string."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{knob}={value!r}: expected a non-empty string")
    return value.strip()
