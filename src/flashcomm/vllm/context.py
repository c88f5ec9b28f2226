"""Per-model FlashComm state inside one vLLM worker: config, groups, the o_proj series, report.

vLLM builds layers from their constructor arguments only, so the layers of one model find their
shared state through the VllmConfig that vLLM sets while it builds the model: the first
FlashComm layer attaches a `VllmFlashComm` to it, the others read it back. Process groups are
created there, i.e. after vLLM's model-parallel init and never at plugin load.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch.distributed as dist

from flashcomm.config import ConfigError, FlashCommConfig
from flashcomm.groups import ParallelGroups
from flashcomm.layout import ParallelLayout
from flashcomm.sharding import ShardedSeries

logger = logging.getLogger("flashcomm.vllm")

ENV_REPORT_DIR = "FLASHCOMM_REPORT_DIR"
ENV_VARS = ("FLASHCOMM2_PARALLEL_SIZE", "FLASHCOMM_LAYER_SHARDING", "FLASHCOMM_PREFETCH_STEP",
            "FLASHCOMM1", "FLASHCOMM_COMM_DTYPE")
_ATTR = "_flashcomm_vllm"
# Attention projections of the main decoder stack only: vision towers ("vision_tower.…",
# "visual.…") and draft models under their own prefix never match.
MAIN_LAYER = r"^(?:language_model\.)?model\.(?:language_model\.)?layers\.(\d+)\.self_attn\.{}$"
O_PROJ_PATTERN = re.compile(MAIN_LAYER.format("o_proj"))
QKV_PATTERN = re.compile(MAIN_LAYER.format("qkv_proj"))


def env_requests_flashcomm(env: dict[str, str] | None = None) -> bool:
    """Whether any FlashComm variable is set, so the plugin must hook in (and validate)."""
    env = os.environ if env is None else env
    return any(v in env for v in ENV_VARS)


@dataclass
class VllmFlashComm:
    """FlashComm state of one model in one vLLM worker (attached to its VllmConfig)."""

    cfg: FlashCommConfig
    """Validated knobs with vLLM's tp/pp/dp filled in."""
    layers: range
    """Main-model layer indices of this pipeline stage: only their o_proj/qkv are replaced."""
    groups: ParallelGroups | None = None
    """Our process groups (None when FlashComm2 is off)."""
    series: ShardedSeries | None = None
    """The o_proj series when FLASHCOMM_LAYER_SHARDING=o_proj."""
    registered: dict[int, int] = field(default_factory=dict)
    """o_proj layer index -> bytes of its (full or otp-slice) weight, as constructed."""
    loaded: set[int] = field(default_factory=set)
    """o_proj layers whose post-load hook ran."""
    sealed: bool = False
    """True once the main model is loaded: layers built later (draft models) stay stock."""

    @property
    def enabled(self) -> bool:
        """Whether o_proj layers take the FlashComm2 path."""
        return self.cfg.flashcomm2

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def of(cls, vllm_config: Any) -> VllmFlashComm:
        """The state attached to `vllm_config`, created (and validated) on first use."""
        ctx = getattr(vllm_config, _ATTR, None)
        if ctx is None:
            ctx = cls._create(vllm_config)
            setattr(vllm_config, _ATTR, ctx)
        return ctx

    @classmethod
    def _create(cls, vllm_config: Any) -> VllmFlashComm:
        from vllm.config import CompilationMode
        from vllm.distributed import parallel_state as ps
        from vllm.distributed.utils import get_pp_indices

        pc = vllm_config.parallel_config
        cfg = replace(FlashCommConfig.from_env(), tp=pc.tensor_parallel_size,
                      pp=pc.pipeline_parallel_size, dp=pc.data_parallel_size)
        world = dist.get_world_size() if dist.is_initialized() else cfg.world
        cfg.validate(world)
        _check_plugin_limits(cfg, vllm_config, CompilationMode.NONE)
        pp_rank = ps.get_pp_group().rank_in_group
        num_layers = vllm_config.model_config.hf_text_config.num_hidden_layers
        start, end = get_pp_indices(num_layers, pp_rank, cfg.pp)
        ctx = cls(cfg=cfg, layers=range(start, end))
        if not cfg.flashcomm2:
            return ctx
        layout = ParallelLayout.from_config(cfg, world)
        rank = dist.get_rank()
        for name, mine, theirs in (("tp", layout.tp_groups(), ps.get_tp_group()),
                                   ("pp", layout.pp_groups(), ps.get_pp_group()),
                                   ("dp", layout.dp_groups(), ps.get_dp_group())):
            if list(theirs.ranks) != layout.group_of(rank, mine):
                raise RuntimeError(
                    f"flashcomm: vLLM's {name} group of rank {rank} is {list(theirs.ranks)}, our "
                    f"layout expects {layout.group_of(rank, mine)}; unsupported rank order")
        shard = ("o_proj",) if "o_proj" in cfg.layer_sharding else ()
        ctx.groups = ParallelGroups.build(layout, shard_weights=shard)
        if shard:
            ctx.series = ShardedSeries("o_proj", ctx.groups.shard["o_proj"], cfg.prefetch_step,
                                       layers=ctx.layers)
        logger.info("flashcomm: rank %d enabled %s, layers %d..%d", rank, cfg.to_dict(),
                    start, end - 1)
        return ctx

    # ---- which layers ----------------------------------------------------------------------

    def o_proj_index(self, prefix: str) -> int | None:
        """Layer index if `prefix` is a main-model attention o_proj this plugin replaces."""
        return self._index(O_PROJ_PATTERN, prefix)

    def qkv_index(self, prefix: str) -> int | None:
        """Layer index if `prefix` is the QKV projection that triggers that layer's prefetch."""
        return self._index(QKV_PATTERN, prefix) if self.series is not None else None

    def _index(self, pattern: re.Pattern, prefix: str) -> int | None:
        m = pattern.match(prefix)
        if not self.enabled or self.sealed or m is None or int(m.group(1)) not in self.layers:
            return None
        return int(m.group(1))

    # ---- loading ---------------------------------------------------------------------------

    def register(self, layer_idx: int, nbytes: int) -> None:
        """Record one constructed o_proj (its weight is registered in the series by the layer)."""
        if layer_idx in self.registered:
            raise RuntimeError(f"flashcomm: o_proj of layer {layer_idx} constructed twice")
        self.registered[layer_idx] = nbytes

    def after_loading(self, layer_idx: int) -> None:
        """Post-load hook of one o_proj; the last one distributes the series (collective)."""
        self.loaded.add(layer_idx)
        if self.sealed or self.loaded != set(self.registered):
            return
        self.sealed = True
        if self.series is not None:
            self.series.finalize()
        report = self.report()
        logger.info("flashcomm: rank %d resident o_proj bytes %d", report["rank"],
                    report["resident_o_proj_bytes"])
        out = os.environ.get(ENV_REPORT_DIR)
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / f"rank{report['rank']}.json").write_text(json.dumps(report, indent=1))

    def resident_o_proj_bytes(self) -> int:
        """Bytes of o_proj weights this worker holds (series: owned layers + ring)."""
        if self.series is not None:
            return self.series.stats().resident_bytes
        return sum(self.registered.values())

    def report(self) -> dict[str, Any]:
        """JSON-ready facts: config, layers, resident o_proj bytes and series counters."""
        return {
            "rank": dist.get_rank() if dist.is_initialized() else 0,
            "config": self.cfg.to_dict(),
            "layers": [self.layers.start, self.layers.stop],
            "o_proj_layers": sorted(self.registered),
            "layer_bytes": next(iter(self.registered.values()), 0),
            "resident_o_proj_bytes": self.resident_o_proj_bytes(),
            "shard_group": list(self.series.group.ranks) if self.series is not None else None,
            "series": self.series.stats().to_dict() if self.series is not None else None,
        }


def _check_plugin_limits(cfg: FlashCommConfig, vllm_config: Any, eager_mode: Any) -> None:
    """What the plugin cannot do inside vLLM, as ConfigErrors naming the knob."""
    if cfg.flashcomm1:
        raise ConfigError(
            "FLASHCOMM1=1 (knob flashcomm1): the vLLM plugin cannot run vLLM's own decoder "
            "layers sequence-parallel (vLLM only offers that as a CUDA compile pass); unset "
            "FLASHCOMM1 (FlashComm2 alone keeps vLLM's [T, H] layout) or use the flashcomm engine")
    if any(name != "o_proj" for name in cfg.layer_sharding):
        raise ConfigError(f"FLASHCOMM_LAYER_SHARDING={','.join(cfg.layer_sharding)}: the vLLM "
                          "plugin shards only 'o_proj'")
    if cfg.layer_sharding and not cfg.flashcomm2:
        raise ConfigError("FLASHCOMM_LAYER_SHARDING=o_proj: the vLLM plugin shards the replicated "
                          "FlashComm2 o_proj, so set FLASHCOMM2_PARALLEL_SIZE >= 1 as well")
    if cfg.layer_sharding and cfg.dp > 1:
        raise ConfigError(
            f"FLASHCOMM_LAYER_SHARDING=o_proj with data_parallel_size={cfg.dp}: vLLM's DP "
            "replicas of a dense model do not run forward passes in step, so a shard group "
            "spanning them would hang; use data_parallel_size=1")
    pc = vllm_config.parallel_config
    for knob in ("prefill_context_parallel_size", "decode_context_parallel_size"):
        if getattr(pc, knob, 1) != 1:
            raise ConfigError(f"{knob}={getattr(pc, knob)}: the flashcomm vLLM plugin needs 1")
    if cfg.flashcomm2 and vllm_config.compilation_config.mode != eager_mode:
        raise ConfigError(
            f"compilation mode {vllm_config.compilation_config.mode}: the flashcomm vLLM plugin "
            "issues its collectives eagerly; start vLLM with enforce_eager=True")
    if cfg.flashcomm2 and vllm_config.quant_config is not None:
        raise ConfigError("quantization: the flashcomm vLLM plugin supports unquantized o_proj "
                          "weights only")
