"""Pipeline stages of a deployment: each stage's layer range and every rank's resident o_proj.

Pure Python, no torch (so `flashcomm layout` stays instant). A rank of stage s, whose stage holds
L_s layers, keeps in units of |W| (one layer's o_proj as the strategy holds it: H x D/otp under
FlashComm2, the row-parallel H x D/N slice otherwise):
  * resident o_proj: L_s;
  * owner source (O-Shard): owned + k + 1, owned = #{i in the stage : i mod G == g} for shard
    group size G > 1 and group rank g, so at most ceil(L_s/G) + k + 1; L_s when G = 1;
  * gather source: L_s/G + k + 1 with G the odp group size; L_s when G = 1.
The layers are split as vLLM splits them (flashcomm.layout.stage_layers) and k is checked
against every stage (0 <= k <= L_s - 2) before anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from flashcomm.config import FlashCommConfig
from flashcomm.knobs import ConfigError
from flashcomm.layout import ParallelLayout, check_prefetch_step, stage_layers
from flashcomm.plan.strategy import Strategy


@dataclass(frozen=True)
class StageMemory:
    """One pipeline stage: its layers, its ranks and their resident o_proj in units of |W|."""

    stage: int
    """Stage index s."""
    layers: range
    """Absolute indices of the stage's decoder layers."""
    o_proj_layers: dict[int, Fraction]
    """Global rank -> resident o_proj weight in units of one layer's |W| (ring included)."""

    @property
    def max_layers(self) -> Fraction:
        """The most |W| any rank of the stage holds (what sizes its devices)."""
        return max(self.o_proj_layers.values())

    def to_dict(self, layer_bytes: int | None = None) -> dict:
        """JSON-ready: layers as [start, stop), units as floats, bytes when |W| is known."""
        out: dict = {"stage": self.stage, "layers": [self.layers.start, self.layers.stop],
                     "num_layers": len(self.layers),
                     "o_proj_layers": {r: float(u) for r, u in self.o_proj_layers.items()}}
        if layer_bytes is not None:
            out["o_proj_bytes"] = {r: int(u * layer_bytes) for r, u in self.o_proj_layers.items()}
        return out


def layer_bytes(cfg: FlashCommConfig, hidden: int, q_dim: int, elt: int) -> int:
    """|W|: one layer's o_proj bytes as one rank holds it (H x D/otp, or H x D/N without
    FlashComm2)."""
    cols = q_dim // cfg.flashcomm2_otp if cfg.flashcomm2 else q_dim // cfg.tp
    return hidden * cols * elt


def stage_memory(cfg: FlashCommConfig, num_layers: int) -> list[StageMemory]:
    """Every stage of `cfg` (validated: pp <= L, the partition, k per stage) for a model of
    `num_layers` decoder layers, with each rank's resident o_proj in units of |W|."""
    layout = ParallelLayout.from_config(cfg)
    ranges = stage_layers(num_layers, cfg.pp, cfg.pp_layer_partition)
    sharded = "o_proj" in cfg.layer_sharding
    if sharded:
        check_prefetch_step(cfg.prefetch_step, ranges)
    shard = layout.shard_groups("o_proj") if sharded else []
    fetch = layout.odp_groups() if cfg.gather_source else []
    out = []
    for s, layers in enumerate(ranges):
        units: dict[int, Fraction] = {}
        for r in range(layout.world):
            if layout.coords(r).pp != s:
                continue
            units[r] = Fraction(len(layers))
            if cfg.gather_source:
                g = len(layout.group_of(r, fetch))
                if g > 1:
                    units[r] = Fraction(len(layers), g) + cfg.prefetch_step + 1
            elif sharded:
                group = layout.group_of(r, shard)
                g, me = len(group), group.index(r)
                if g > 1:
                    owned = sum(1 for i in layers if i % g == me)
                    units[r] = Fraction(owned + cfg.prefetch_step + 1)
        out.append(StageMemory(s, layers, units))
    return out


def format_stages(stages: list[StageMemory], layer_bytes: int | None = None) -> list[str]:
    """One line per stage: its layers and the o_proj its ranks hold (|W| units, MiB if known)."""
    lines = []
    for st in stages:
        per_rank = "  ".join(f"r{r}={_units(u)}" for r, u in st.o_proj_layers.items())
        size = "" if layer_bytes is None else \
            f" = {float(st.max_layers) * layer_bytes / 2**20:.2f} MiB max"
        lines.append(f"stage {st.stage}: layers {st.layers.start}..{st.layers.stop - 1} "
                     f"(L_s={len(st.layers)})  o_proj per rank in |W|: {per_rank}{size}")
    return lines


def _units(u: Fraction) -> str:
    return str(u.numerator) if u.denominator == 1 else f"{float(u):.2f}"


def stage_plan(strategies: list[Strategy], tp: int, num_layers: int, hidden: int, q_dim: int,
               elt: int, pp: int, partition: tuple[int, ...] = ()) -> dict:
    """`flashcomm plan --pp`: each stage's layers and, per strategy, the most o_proj bytes a
    rank of each stage holds (None on every stage when k does not fit the smallest stage)."""
    ranges = stage_layers(num_layers, pp, partition)
    rows = {}
    for s in strategies:
        cfg = s.to_config(tp, pp=pp, pp_layer_partition=partition)
        w = layer_bytes(cfg, hidden, q_dim, elt)
        try:
            rows[s.label] = [int(st.max_layers * w) for st in stage_memory(cfg, num_layers)]
        except ConfigError:  # prefetch_step too large for a stage
            rows[s.label] = [None] * pp
    return {"pp": pp, "layers": [[r.start, r.stop] for r in ranges], "o_proj_bytes": rows}


def format_stage_plan(plan: dict) -> list[str]:
    """The per-stage table of stage_plan: one column per stage, MiB."""
    cols = [f"s{s} {a}..{b - 1}" for s, (a, b) in enumerate(plan["layers"])]
    lines = [f"o_proj MiB per rank by pipeline stage (pp={plan['pp']}; the stage's fullest rank)",
             f"{'strategy':<34} " + " ".join(f"{c:>10}" for c in cols)]
    for label, per_stage in plan["o_proj_bytes"].items():
        cells = ["k>L_s-2" if b is None else f"{b / 2**20:.2f}" for b in per_stage]
        lines.append(f"{label:<34} " + " ".join(f"{c:>10}" for c in cells))
    return lines
