"""Per-model FlashComm state inside one vLLM worker: config, groups, weight source, threshold.

vLLM builds layers from their constructor arguments only, so the layers of one model find their
shared state through the VllmConfig that vLLM sets while it builds the model: the first
FlashComm layer attaches a `VllmFlashComm` to it, the others read it back. Process groups are
created there, i.e. after vLLM's model-parallel init and never at plugin load. Each FlashComm
o_proj also registers itself in `compilation_config.static_forward_context` under its prefix, so
the custom ops (ops.py), which only get a layer name, find it through vLLM's forward context.

The threshold: a step of T tokens takes FlashComm2 when `T >= min_tokens`, else the row-parallel
product plus vLLM's all-reduce. It is decided once, when the first main-model QKV or o_proj is
built (the TP group exists, nothing is loaded or traced yet; `auto` is fitted there, fit.py).
What the plugin then does (`mode`, logged once per worker):
- STOCK: FlashComm2 can never run (auto found no crossover, or the threshold exceeds
  max_num_batched_tokens): every layer is built by vLLM's own constructor and forward, so the
  graph vLLM traces is stock's; no flashcomm op, no counter on the hot path;
- RANGES (GPUs, VLLM_COMPILE, otp = 1, no O-Shard, no int8 exchange): the threshold is a
  compile-range endpoint; o_proj traces stock's row-parallel product on a view of the resident
  W_o plus vLLM's all-reduce, and a post-grad pass rewrites it into FlashComm2 only in graphs of
  steps T >= threshold (ranges.py). No custom op per step, full CUDA graphs allowed;
- PER_STEP: the o_proj op chooses the path at every step (one graph for every T: CPU's
  DYNAMO_TRACE_ONCE, eager, or what RANGES cannot express).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from flashcomm.config import CommDtype, FlashCommConfig
from flashcomm.gathered import GatheredSeries, ResidentForm
from flashcomm.groups import ParallelGroups
from flashcomm.knobs import AUTO
from flashcomm.layout import ParallelLayout, stage_layers
from flashcomm.sharding import ShardedSeries
from flashcomm.vllm.checks import check_plugin_limits, configure_compilation, configure_vllm
from flashcomm.vllm.weights import GatherRing, OProjWeights, OwnerRing, ResidentWeights

logger = logging.getLogger("vllm.flashcomm")  # under vLLM's logger: its handlers and level

ENV_REPORT_DIR = "FLASHCOMM_REPORT_DIR"
"""Plugin-only variable (not a knob): write rank<r>.json with the report after loading."""
_ATTR = "_flashcomm_vllm"
# Attention projections of the main decoder stack only: vision towers ("vision_tower.…",
# "visual.…") and draft models under their own prefix never match.
MAIN_LAYER = r"^(?:language_model\.)?model\.(?:language_model\.)?layers\.(\d+)\.self_attn\.{}$"
O_PROJ_PATTERN = re.compile(MAIN_LAYER.format("o_proj"))
QKV_PATTERN = re.compile(MAIN_LAYER.format("qkv_proj"))
STOCK, PER_STEP, RANGES = "stock", "per_step_op", "ranges"
"""VllmFlashComm.mode values: vLLM's own layers and graph / the o_proj op chooses per step /
stock's o_proj traced, rewritten into FlashComm2 in the graphs of large steps (ranges.py)."""


def plugin_env_names() -> tuple[str, ...]:
    """The knobs' FLASHCOMM* variables (vLLM's own ones, e.g. VLLM_PP_LAYER_PARTITION, do not
    enable the plugin)."""
    return tuple(n for n in FlashCommConfig.env_names() if n.startswith("FLASHCOMM"))


def env_requests_flashcomm(env: dict[str, str] | None = None) -> bool:
    """Whether any FlashComm variable is set, so the plugin must hook in (and validate)."""
    env = os.environ if env is None else env
    return any(v in env for v in plugin_env_names())


@dataclass
class VllmFlashComm:
    """FlashComm state of one model in one vLLM worker (attached to its VllmConfig)."""

    cfg: FlashCommConfig
    """Validated knobs with vLLM's tp/pp/dp filled in."""
    layers: range
    """Main-model layer indices of this pipeline stage: only their o_proj/qkv are replaced."""
    static_layers: dict[str, Any] = field(default_factory=dict, repr=False)
    """vLLM's static forward context (name -> layer): where the ops look layers up."""
    groups: ParallelGroups | None = None
    """Our process groups (None when FlashComm2 is off)."""
    series: ShardedSeries | GatheredSeries | None = None
    """The O-Shard ring when FLASHCOMM_LAYER_SHARDING=o_proj (FLASHCOMM_SHARD_SOURCE: owner
    = ShardedSeries on the shard group, gather = GatheredSeries on the odp fetch group)."""
    weights: OProjWeights | None = None
    """The o_proj weight source (resident or the ring), set up by the first register()."""
    min_tokens: int | None = 0
    """Steps with T >= min_tokens take FlashComm2; None: never (auto found no crossover)."""
    auto: dict[str, Any] | None = None
    """How 'auto' was resolved (profile name, fitted costs), for the report."""
    impl: dict[str, str] = field(default_factory=lambda: {"all_to_all": "ours",
                                                          "all_gather": "vllm"})
    """FlashComm2's collectives -> 'ours' or 'vllm', the faster measured at start-up."""
    impl_seconds: dict[str, float] = field(default_factory=dict)
    """The start-up timings behind `impl` ('op/impl' -> seconds, slowest rank)."""
    o_proj_shape: tuple[int, int] = (0, 0)
    """[H, D/otp] of one o_proj weight (set by the first register())."""
    dtype: torch.dtype = torch.float32
    """The o_proj weight's (and activations') dtype."""
    qkv_prefetch: set[int] = field(default_factory=set)
    """Layers whose QKVParallelLinear issues the o_proj prefetch; any other layer's o_proj op
    issues its own (DeepSeek's MLA has no QKVParallelLinear)."""
    registered: dict[int, int] = field(default_factory=dict)
    """o_proj layer index -> |W|, bytes of its FlashComm2 weight [H, D/otp] (under gather
    the layer holds only its D/N columns of it)."""
    row_form: ResidentForm | None = None
    """How the gather source keeps its row-parallel slices (ops.onednn_form: oneDNN-prepacked
    on CPU, None: plain), decided once from the first o_proj weight."""
    mode: str | None = None
    """STOCK or PER_STEP once decided (decide()); None before, or with FlashComm2 off."""
    threshold_source: str = ""
    """Where min_tokens came from, for the start-up line and the report."""
    max_step_tokens: int = 0
    """vLLM's max_num_batched_tokens: no step is larger (a threshold above it means never)."""
    cuda: bool = False
    """Whether the platform is CUDA-like (graph splitting and CUDA-graph checks apply)."""
    vllm_config: Any = field(default=None, repr=False)
    """vLLM's config; its compilation settings change only when a flashcomm op or pass is
    traced (PER_STEP, RANGES)."""
    range_pass: Any = field(default=None, repr=False)
    """RANGES: the FlashComm2RangePass installed into Inductor."""
    modules: dict[int, Any] = field(default_factory=dict, repr=False)
    """o_proj layer index -> its FlashComm o_proj module."""
    loaded: set[int] = field(default_factory=set)
    """o_proj layers whose post-load hook ran."""
    sealed: bool = False
    """True once the main model is loaded: layers built later (draft models) stay stock."""
    o_proj_calls: int = 0
    """Times the o_proj op ran on this worker (every layer of every step, warm-up included)."""
    o_proj_fc2_calls: int = 0
    """How many of them took the FlashComm2 path."""

    @property
    def enabled(self) -> bool:
        """Whether o_proj layers are replaced by the FlashComm op (decided, and not STOCK)."""
        return self.mode in (PER_STEP, RANGES)

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
        from vllm.distributed import parallel_state as ps
        from vllm.platforms import current_platform

        pc = vllm_config.parallel_config
        cfg = replace(FlashCommConfig.from_env(), tp=pc.tensor_parallel_size,
                      pp=pc.pipeline_parallel_size, dp=pc.data_parallel_size)
        world = dist.get_world_size() if dist.is_initialized() else cfg.world
        cfg.validate(world)
        check_plugin_limits(cfg, vllm_config)
        configure_vllm(cfg, vllm_config)
        pp_rank = ps.get_pp_group().rank_in_group
        num_layers = vllm_config.model_config.hf_text_config.num_hidden_layers
        layers = stage_layers(num_layers, cfg.pp, cfg.pp_layer_partition)[pp_rank]
        ctx = cls(cfg=cfg, layers=layers,
                  static_layers=vllm_config.compilation_config.static_forward_context,
                  max_step_tokens=vllm_config.scheduler_config.max_num_batched_tokens,
                  cuda=current_platform.is_cuda_alike(), vllm_config=vllm_config)
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
        ctx.groups = ParallelGroups.from_config(cfg, world)  # shard group for o_proj if sharded
        return ctx

    def decide(self, prefix: str, hidden: int, q_dim: int, dtype: torch.dtype) -> None:
        """At the first main-model QKV or o_proj built (`prefix`; o_proj weight [hidden, q_dim]):
        resolve the threshold (auto: collective fit over TP) and choose the mode, once."""
        m = O_PROJ_PATTERN.match(prefix) or QKV_PATTERN.match(prefix)
        if (self.mode is not None or not self.cfg.flashcomm2 or self.sealed or m is None
                or int(m.group(1)) not in self.layers):
            return
        from flashcomm.vllm.fit import choose_impl, resolve_auto  # registers the ops

        cfg = self.cfg
        self.o_proj_shape, self.dtype = (hidden, q_dim // cfg.flashcomm2_otp), dtype
        if cfg.flashcomm2_min_tokens == AUTO:
            self.impl, self.impl_seconds = choose_impl(self)
            self.min_tokens, self.auto = resolve_auto(self)
            self.threshold_source = f"auto, profile {self.auto['profile']}"
        else:
            self.min_tokens = int(cfg.flashcomm2_min_tokens)
            self.threshold_source = f"FLASHCOMM2_MIN_TOKENS={cfg.flashcomm2_min_tokens}"
        never = self.min_tokens is None or self.min_tokens > self.max_step_tokens
        self.mode = STOCK if never else RANGES if self._ranges_hold() else PER_STEP
        if self.mode == STOCK:
            why = ("FlashComm2 never beats the all-reduce on this group" if self.min_tokens is None
                   else f"no step exceeds max_num_batched_tokens={self.max_step_tokens}")
            action = ("stock graph: vLLM's own o_proj/qkv layers, weights and GEMM, no flashcomm "
                      f"op traced ({why})")
            self._write_report()
        else:
            if cfg.flashcomm2_min_tokens != AUTO:
                self.impl, self.impl_seconds = choose_impl(self)
            if cfg.gather_source:  # resident D/N columns, all-gathered on FlashComm2 steps only
                self.series = GatheredSeries("o_proj", self.groups.fetch, cfg.prefetch_step,
                                             layers=self.layers)
            elif cfg.layer_sharding:
                self.series = ShardedSeries("o_proj", self.groups.shard["o_proj"],
                                            cfg.prefetch_step, layers=self.layers)
            if self.mode == RANGES:
                action = self._install_ranges()
            else:
                configure_compilation(self.vllm_config.compilation_config, cuda=self.cuda)
                action = ("per-step op: flashcomm::o_proj takes FlashComm2 at T >= threshold, "
                          "vLLM's all-reduce below (one graph for every T)")
        logger.info("flashcomm: rank %d threshold %s (%s) -> %s; layers %d..%d, %s",
                    dist.get_rank(), "never" if never else self.min_tokens, self.threshold_source,
                    action, self.layers.start, self.layers.stop - 1, cfg.to_dict())

    def _ranges_hold(self) -> bool:
        """Whether compile ranges can carry the threshold: VLLM_COMPILE on a GPU (per-range
        graphs), and FlashComm2 expressible in vLLM's collectives without Python state."""
        from vllm.config import CompilationMode

        cfg = self.cfg
        return (self.cuda and self.vllm_config.compilation_config.mode
                == CompilationMode.VLLM_COMPILE and cfg.flashcomm2_otp == 1
                and not cfg.layer_sharding and cfg.comm_dtype == CommDtype.AUTO)

    def _install_ranges(self) -> str:
        """RANGES: the threshold as a compile-range endpoint and the rewriting pass."""
        from flashcomm.vllm.ranges import FlashComm2RangePass, configure_ranges

        tp = self.tp_coordinator()
        self.range_pass = FlashComm2RangePass(
            self.vllm_config, threshold=self.min_tokens, tp_size=self.cfg.tp,
            tp_rank=tp.rank_in_group, width=self.o_proj_shape[1] // self.cfg.tp,
            group_name=tp.unique_name)
        configure_ranges(self.vllm_config, self.range_pass)
        ranges = self.vllm_config.compilation_config.get_compile_ranges()
        return (f"compile ranges {[(r.start, r.end) for r in ranges]}: stock's o_proj graphs "
                f"below {self.min_tokens} tokens, FlashComm2 rewritten in from there")

    # ---- which layers ----------------------------------------------------------------------

    def o_proj_index(self, prefix: str) -> int | None:
        """Layer index if `prefix` is a main-model attention o_proj this plugin replaces."""
        return self._index(O_PROJ_PATTERN, prefix)

    def qkv_index(self, prefix: str) -> int | None:
        """Layer index if `prefix` is the QKV projection that triggers that layer's prefetch."""
        return self._index(QKV_PATTERN, prefix) if self.series is not None else None

    def allocates(self, layer_idx: int) -> bool:
        """Whether this rank holds layer i's o_proj weight (non-owners of O-Shard do not)."""
        return self.series is None or self.series.owns(layer_idx)

    def _index(self, pattern: re.Pattern, prefix: str) -> int | None:
        m = pattern.match(prefix)
        if not self.enabled or self.sealed or m is None or int(m.group(1)) not in self.layers:
            return None
        return int(m.group(1))

    # ---- loading ---------------------------------------------------------------------------

    def register(self, layer_idx: int, weight: torch.Tensor, name: str, layer: Any) -> None:
        """Record one constructed o_proj: its weight into the source, the layer under `name`."""
        if layer_idx in self.registered:
            raise RuntimeError(f"flashcomm: o_proj of layer {layer_idx} constructed twice")
        if name in self.static_layers:
            raise RuntimeError(f"flashcomm: layer name {name!r} is already in vLLM's static "
                               "forward context")
        gather = self.cfg.gather_source  # weight [H, D/N], else [H, D/otp]
        if self.weights is None:  # [H, D/otp] = odp blocks of D/N columns
            d_otp = weight.shape[1] * (self.cfg.odp if gather else 1)
            width = d_otp // self.cfg.odp
            offset = self.groups.tp.rank % self.cfg.odp * width  # this rank's own heads
            from flashcomm.vllm.ops import onednn_form

            self.row_form = onednn_form(weight)
            if gather:
                self.weights = GatherRing(self.series, self.row_form)
            elif self.series is not None:
                self.weights = OwnerRing(self.series, offset, width)
            else:
                self.weights = ResidentWeights(offset, width)
            self.o_proj_shape, self.dtype = (weight.shape[0], d_otp), weight.dtype
        self.weights.register(layer_idx, weight)
        self.static_layers[name] = layer
        self.modules[layer_idx] = layer
        self.registered[layer_idx] = (self.o_proj_shape[0] * self.o_proj_shape[1]
                                      * weight.element_size())

    def after_loading(self, layer_idx: int) -> None:
        """Post-load hook of one o_proj; the last one distributes the series and resolves the
        threshold (both collective: every rank loads every one of its layers)."""
        self.loaded.add(layer_idx)
        if self.sealed or self.loaded != set(self.registered):
            return
        self.sealed = True
        self.weights.finalize()
        # a threshold of 0: every step FlashComm2, no row path; RANGES: the graph holds it
        rows = self.mode == PER_STEP and self.min_tokens > 0
        for i, layer in self.modules.items():
            layer.flashcomm_bind(self.weights.row_gemm(i) if rows else None)
        if self.weights.detached:
            for layer in self.modules.values():  # the kept slices replace the parameters
                layer.weight.data = layer.weight.data.new_empty(0)
        self._write_report()

    def _write_report(self) -> None:
        """rank<r>.json into FLASHCOMM_REPORT_DIR when set (after loading, or when STOCK)."""
        out = os.environ.get(ENV_REPORT_DIR)
        if out:
            report = self.report()
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / f"rank{report['rank']}.json").write_text(json.dumps(report, indent=1))

    # ---- per step (inside the ops) ---------------------------------------------------------

    def takes_flashcomm2(self, num_tokens: int) -> bool:
        """Whether a step of `num_tokens` tokens takes FlashComm2 (same answer on every rank)."""
        return self.min_tokens is not None and num_tokens >= self.min_tokens

    def step_takes_flashcomm2(self, num_tokens: int, layer_idx: int) -> bool:
        """takes_flashcomm2, counted as one o_proj call of layer `layer_idx`."""
        full = self.takes_flashcomm2(num_tokens)
        first = self.o_proj_fc2_calls == 0 if full else self.o_proj_fc2_calls == self.o_proj_calls
        self.o_proj_calls += 1
        self.o_proj_fc2_calls += full
        if first:  # once per path and worker: the log shows the op ran after compilation
            logger.info("flashcomm: rank %d first %s o_proj step: T=%d tokens, layer %d",
                        dist.get_rank(), "FlashComm2" if full else "row-parallel", num_tokens,
                        layer_idx)
        return full

    @staticmethod
    def tp_coordinator() -> Any:
        """vLLM's TP GroupCoordinator (its SHM / custom all-reduce and all-gather)."""
        from vllm.distributed import get_tp_group

        return get_tp_group()

    # ---- facts -----------------------------------------------------------------------------

    def resident_o_proj_bytes(self) -> int:
        """Bytes of o_proj weights this worker holds (owner: owned layers + ring; gather: every
        layer's D/N columns + ring; STOCK: vLLM's own [H, D/N] slices)."""
        if self.mode == STOCK:
            hidden, d_otp = self.o_proj_shape
            elt = torch.empty((), dtype=self.dtype).element_size()
            return len(self.layers) * hidden * d_otp // self.cfg.odp * elt
        return self.weights.resident_bytes() if self.weights is not None else 0

    def report(self) -> dict[str, Any]:
        """JSON-ready facts: config, layers, resident bytes, threshold, counters, series."""
        series = self.weights.stats() if self.weights is not None else None
        ring = self.series
        return {
            "rank": dist.get_rank() if dist.is_initialized() else 0,
            "config": self.cfg.to_dict(),
            "layers": [self.layers.start, self.layers.stop],
            "o_proj_layers": sorted(self.registered),
            "layer_bytes": next(iter(self.registered.values()), 0),
            "resident_o_proj_bytes": self.resident_o_proj_bytes(),
            "o_proj_param_bytes": sum(m.weight.nbytes for m in self.modules.values()),
            "packed_slices": self.weights is not None and self.weights.form is not None,
            "mode": self.mode,
            "row_only": self.mode == STOCK,
            "flashcomm2_min_tokens": self.min_tokens,
            "threshold_source": self.threshold_source,
            "auto": self.auto,
            "impl": self.impl,
            "impl_seconds": self.impl_seconds,
            # STOCK traces no op, so nothing counts per step: FlashComm2 ran 0 times by
            # construction and the row-parallel calls are vLLM's own (not counted: None)
            "o_proj_calls": self.o_proj_calls if self.mode == PER_STEP else None,
            "o_proj_fc2_calls": None if self.mode == RANGES else self.o_proj_fc2_calls,
            "range_pass_matches": getattr(self.range_pass, "total_matched", None),
            "shard_group": list(ring.group.ranks) if ring is not None else None,
            "series": series,
        }

