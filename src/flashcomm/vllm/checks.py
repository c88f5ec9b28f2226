"""What the vLLM plugin refuses and what it changes in vLLM's configuration, before any weight
is loaded. Pure functions of the knobs and vLLM's config objects, so tests need no GPU.

- `check_env`: at plugin load (vLLM's `register()` in the front-end process, before the engine
  starts): the FLASHCOMM* variables parse and the plugin can serve them at all.
- `check_plugin_limits`: in each worker, at model construction, against the VllmConfig.
- `configure_vllm`: puts the knobs into `additional_config["flashcomm"]`, which vLLM hashes
  into its compile-cache key, so a stock run and a plugin run in one cache root never share a
  compiled graph.
- `configure_compilation`: only when the per-step op will be traced (mode PER_STEP, decided in
  context.py): on GPUs, adds our ops to `splitting_ops` under VLLM_COMPILE so piecewise CUDA
  graphs run around them, and refuses a full-graph `cudagraph_mode`. In RANGES mode
  (ranges.configure_ranges) and STOCK mode nothing is refused.
"""

from __future__ import annotations

from typing import Any

from flashcomm.config import FlashCommConfig, ShardSource
from flashcomm.knobs import ConfigError

ADDITIONAL_CONFIG_KEY = "flashcomm"
"""Key of our knobs in `vllm_config.additional_config` (part of vLLM's config hash)."""
SPLITTING_OPS = ("flashcomm::o_proj", "flashcomm::prefetch")
"""Ops with Python state (step counters, ring slots): graph-splitting ops under VLLM_COMPILE."""


def check_env(cfg: FlashCommConfig) -> None:
    """The plugin-level limits that need no vLLM config (knobs already parsed)."""
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
    if cfg.shard_source == ShardSource.GATHER and not cfg.layer_sharding:
        raise ConfigError("FLASHCOMM_SHARD_SOURCE=gather (knob shard_source): the gather source "
                          "feeds the layer-sharded o_proj, so set FLASHCOMM_LAYER_SHARDING=o_proj "
                          "and FLASHCOMM2_PARALLEL_SIZE >= 1 as well")


def check_plugin_limits(cfg: FlashCommConfig, vllm_config: Any) -> None:
    """What the plugin cannot do inside this vLLM deployment, as ConfigErrors naming the knob."""
    check_env(cfg)
    if cfg.layer_sharding and cfg.dp > 1:
        raise ConfigError(
            f"FLASHCOMM_LAYER_SHARDING=o_proj with data_parallel_size={cfg.dp}: vLLM's DP "
            "replicas of a dense model do not run forward passes in step, so a shard group "
            "spanning them would hang; use data_parallel_size=1")
    pc = vllm_config.parallel_config
    for knob in ("prefill_context_parallel_size", "decode_context_parallel_size"):
        if getattr(pc, knob, 1) != 1:
            raise ConfigError(f"{knob}={getattr(pc, knob)}: the flashcomm vLLM plugin needs 1")
    if cfg.flashcomm2 and vllm_config.quant_config is not None:
        raise ConfigError("quantization: the flashcomm vLLM plugin supports unquantized o_proj "
                          "weights only")


def configure_vllm(cfg: FlashCommConfig, vllm_config: Any) -> None:
    """Hash our knobs into vLLM's compile-cache key."""
    extra = vllm_config.additional_config
    if not isinstance(extra, dict):
        raise ConfigError(f"additional_config={extra!r}: the flashcomm vLLM plugin needs a dict "
                          f"there to record its knobs under {ADDITIONAL_CONFIG_KEY!r}")
    extra[ADDITIONAL_CONFIG_KEY] = cfg.to_dict()


def configure_compilation(compilation_config: Any, *, cuda: bool) -> None:
    """CUDA: refuse full-graph CUDA graphs; under VLLM_COMPILE add SPLITTING_OPS (idempotent).
    CPU has no CUDA graphs and compiles one fullgraph (DYNAMO_TRACE_ONCE): nothing to change."""
    from vllm.config import CompilationMode, CUDAGraphMode

    if not cuda:
        return
    mode = compilation_config.cudagraph_mode
    if mode is not None and mode.has_full_cudagraphs():
        raise ConfigError(
            f"cudagraph_mode={mode.name}: full CUDA graphs would replay the per-step flashcomm "
            "op's Python state (path, counters, O-Shard ring) frozen at capture time. The "
            "per-step op is used only where compile ranges cannot carry the threshold: "
            "FLASHCOMM_LAYER_SHARDING=o_proj, FLASHCOMM2_PARALLEL_SIZE > 1, "
            "FLASHCOMM_COMM_DTYPE=int8, or a compilation mode other than VLLM_COMPILE; "
            "drop those, or use "
            f"cudagraph_mode={CUDAGraphMode.PIECEWISE.name} (piecewise graphs split at the "
            "flashcomm ops), e.g. compilation_config={'cudagraph_mode': 'PIECEWISE'}, or "
            "enforce_eager=True")
    if compilation_config.mode == CompilationMode.VLLM_COMPILE:
        ops = compilation_config.splitting_ops
        if ops is None:
            ops = compilation_config.splitting_ops = []
        ops.extend(op for op in SPLITTING_OPS if op not in ops)
