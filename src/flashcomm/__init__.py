"""flashcomm: FlashComm2 + layer-sharded weights (O-Shard) for tensor-parallel LLM inference.

The library API is importable from here (`from flashcomm import ParallelGroups, ShardedSeries`).
Names resolve on first use, so `import flashcomm` itself loads neither torch nor any submodule
(the `flashcomm layout` command stays instant).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "flashcomm.knobs": ("FlashCommError", "ConfigError"),
    "flashcomm.config": ("FlashCommConfig", "AttnOut", "CommDtype", "ShardSource"),
    "flashcomm.layout": ("ParallelLayout",),
    "flashcomm.groups": ("ParallelGroups", "GroupHandle"),
    "flashcomm.comm": ("flashcomm2_o_proj", "row_parallel_o_proj", "CommCounter"),
    "flashcomm.series": ("SeriesStats",),
    "flashcomm.sharding": ("ShardedSeries",),
    "flashcomm.gathered": ("GatheredSeries",),
    "flashcomm.launch": ("run_local", "init_distributed", "RankFailure"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [  # every name of _EXPORTS (a test checks both lists agree)
    "AttnOut", "CommCounter", "CommDtype", "ConfigError", "FlashCommConfig", "FlashCommError",
    "GatheredSeries", "GroupHandle", "ParallelGroups", "ParallelLayout", "RankFailure",
    "SeriesStats", "ShardSource", "ShardedSeries", "flashcomm2_o_proj", "init_distributed",
    "row_parallel_o_proj", "run_local",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports lazily
    from flashcomm.comm import CommCounter, flashcomm2_o_proj, row_parallel_o_proj
    from flashcomm.config import AttnOut, CommDtype, FlashCommConfig, ShardSource
    from flashcomm.gathered import GatheredSeries
    from flashcomm.groups import GroupHandle, ParallelGroups
    from flashcomm.knobs import ConfigError, FlashCommError
    from flashcomm.launch import RankFailure, init_distributed, run_local
    from flashcomm.layout import ParallelLayout
    from flashcomm.series import SeriesStats
    from flashcomm.sharding import ShardedSeries


def __getattr__(name: str) -> Any:
    """Import the module that defines an exported `name` when it is first asked for."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'flashcomm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    """The exported names next to the module's own."""
    return sorted({*globals(), *__all__})
