"""Pure rank math: every process group as lists of global ranks, and FlashComm2's chunk order.

Global ranks are ordered (dp, pp, tp) with tp fastest:
    rank = (dp_idx * pp + pp_idx) * tp + tp_idx

Within each TP group of size N with FlashComm2 o_proj parallel size otp (odp = N / otp):
  * odp groups are contiguous blocks of TP ranks  [j*odp, ..., (j+1)*odp - 1]   for j < otp;
  * otp groups are strided                        [i, i+odp, ..., i+(otp-1)*odp] for i < odp.
TP rank t sits in odp group j = t // odp and therefore holds row slice j of W_o (D/otp rows).

Shard groups (layer sharding) are *derived*, not listed: two ranks share a group exactly when
they sit in the same pipeline stage and hold the same slice of the weight (`weight_slice`).
No torch here: this module is importable and testable anywhere.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from flashcomm.config import FlashCommConfig
from flashcomm.knobs import ConfigError


def stage_layers(num_layers: int, pp: int, partition: tuple[int, ...] = ()) -> list[range]:
    """The decoder layers of each pipeline stage, split exactly as vLLM's `get_pp_indices`:
    L // pp each, the remainder spread one by one over the stages before the last (walking
    back from the second-to-last), or `partition` (VLLM_PP_LAYER_PARTITION) when given."""
    if pp < 1:
        raise ConfigError(f"pp={pp}: must be >= 1")
    if pp > num_layers:
        raise ConfigError(f"pp={pp}: larger than num_hidden_layers={num_layers}; every pipeline "
                          f"stage needs at least one layer (allowed: 1..{num_layers})")
    if partition:
        text = ",".join(map(str, partition))
        if len(partition) != pp:
            raise ConfigError(f"pp_layer_partition={text} (VLLM_PP_LAYER_PARTITION): "
                              f"{len(partition)} stages given, pp={pp}")
        if sum(partition) != num_layers:
            raise ConfigError(f"pp_layer_partition={text} (VLLM_PP_LAYER_PARTITION): adds up to "
                              f"{sum(partition)} layers, the model has {num_layers}")
        counts = list(partition)
    else:
        counts = [num_layers // pp] * pp
        for i in range(2, num_layers % pp + 2):
            counts[-i] += 1
    starts = [sum(counts[:s]) for s in range(pp)]
    return [range(a, a + c) for a, c in zip(starts, counts, strict=True)]


def check_prefetch_step(k: int, stages: list[range]) -> None:
    """ConfigError unless 0 <= k <= L_s - 2 for every stage's layer count L_s."""
    smallest = min(len(layers) for layers in stages)
    for s, layers in enumerate(stages):
        if not 0 <= k <= len(layers) - 2:
            where = f"stage {s} (layers {layers.start}..{layers.stop - 1}, L_s={len(layers)})"
            raise ConfigError(
                f"prefetch_step={k}: must satisfy 0 <= k <= L_s-2 = {len(layers) - 2} for "
                f"{where}" + ("; a sharded series needs L_s >= 2" if len(layers) < 2 else
                              f"; every stage allows [0, {smallest - 2}]" if smallest >= 2
                              else ""))


@dataclass(frozen=True)
class RankCoords:
    """Where one global rank sits in the (dp, pp, tp) grid."""

    dp: int
    """Data-parallel replica index."""
    pp: int
    """Pipeline stage index."""
    tp: int
    """Tensor-parallel index within its TP group."""


@dataclass(frozen=True)
class ParallelLayout:
    """The group structure of a (tp, pp, dp, otp) deployment, as global rank lists."""

    tp: int
    """Tensor-parallel size N."""
    pp: int = 1
    """Pipeline-parallel size."""
    dp: int = 1
    """Data-parallel size."""
    otp: int = 0
    """FlashComm2 o_proj parallel size (0 = FlashComm2 off)."""

    @classmethod
    def from_config(cls, cfg: FlashCommConfig, world: int | None = None) -> ParallelLayout:
        """Validate `cfg` (against `world` if given) and build its layout."""
        cfg.validate(world)
        return cls(tp=cfg.tp, pp=cfg.pp, dp=cfg.dp, otp=cfg.flashcomm2_otp)

    @property
    def world(self) -> int:
        """Total number of ranks."""
        return self.tp * self.pp * self.dp

    @property
    def odp(self) -> int:
        """All-to-all group size N / otp, or 0 when FlashComm2 is off."""
        return self.tp // self.otp if self.otp else 0

    def rank(self, dp: int, pp: int, tp: int) -> int:
        """Global rank of grid position (dp, pp, tp)."""
        return (dp * self.pp + pp) * self.tp + tp

    def coords(self, rank: int) -> RankCoords:
        """Grid position of a global rank."""
        if not 0 <= rank < self.world:
            raise ValueError(f"rank={rank}: must be in [0, {self.world})")
        return RankCoords(dp=rank // (self.pp * self.tp), pp=(rank // self.tp) % self.pp,
                          tp=rank % self.tp)

    # ---- the standard families ------------------------------------------------------------

    def tp_groups(self) -> list[list[int]]:
        """One group per (dp, pp): the N ranks that split each layer."""
        return [[self.rank(d, p, t) for t in range(self.tp)]
                for d in range(self.dp) for p in range(self.pp)]

    def pp_groups(self) -> list[list[int]]:
        """One group per (dp, tp index): the stages of one pipeline."""
        return [[self.rank(d, p, t) for p in range(self.pp)]
                for d in range(self.dp) for t in range(self.tp)]

    def dp_groups(self) -> list[list[int]]:
        """One group per (pp, tp index): the replicas of one model position."""
        return [[self.rank(d, p, t) for d in range(self.dp)]
                for p in range(self.pp) for t in range(self.tp)]

    # ---- FlashComm2 ------------------------------------------------------------------------

    def odp_groups(self) -> list[list[int]]:
        """All-to-all groups: contiguous blocks of odp TP ranks (empty when FlashComm2 is off)."""
        if not self.otp:
            return []
        return [tp_group[j * self.odp:(j + 1) * self.odp]
                for tp_group in self.tp_groups() for j in range(self.otp)]

    def otp_groups(self) -> list[list[int]]:
        """Reduce-scatter groups: TP ranks strided by odp (empty when FlashComm2 is off)."""
        if not self.otp:
            return []
        return [tp_group[i::self.odp] for tp_group in self.tp_groups() for i in range(self.odp)]

    @property
    def chunk_order(self) -> list[int]:
        """Token-chunk send order of the all-to-all: the N chunks of T_pad/N tokens, permuted so
        that odp peer i receives chunks [i, i+odp, ..., i+(otp-1)*odp]; after the otp
        reduce-scatter TP rank r then holds chunk r. Identity when otp = 1 (or FlashComm2 off)."""
        if not self.otp:
            return list(range(self.tp))
        return [i + j * self.odp for i in range(self.odp) for j in range(self.otp)]

    # ---- layer sharding --------------------------------------------------------------------

    def weight_slice(self, rank: int, weight: str = "o_proj") -> tuple[int, int, int]:
        """(stage, first row, end row) of the weight's input rows that `rank` holds, with the
        input dimension normalised to tp*otp units so slices compare exactly."""
        c = self.coords(rank)
        unit = self.tp * max(self.otp, 1)
        if weight != "o_proj":  # fully replicated weights (e.g. MLA up-projections)
            return (c.pp, 0, unit)
        if self.otp:  # FlashComm2: TP rank t holds slice t // odp, D/otp rows
            j = c.tp // self.odp
            rows = unit // self.otp
            return (c.pp, j * rows, (j + 1) * rows)
        rows = unit // self.tp  # row-parallel: TP rank t holds D/N rows
        return (c.pp, c.tp * rows, (c.tp + 1) * rows)

    def shard_groups(self, weight: str = "o_proj") -> list[list[int]]:
        """Ranks of one pipeline stage holding bit-identical copies of `weight`, sorted."""
        by_slice: dict[tuple[int, int, int], list[int]] = defaultdict(list)
        for r in range(self.world):
            by_slice[self.weight_slice(r, weight)].append(r)
        return sorted(by_slice.values())

    def group_of(self, rank: int, groups: list[list[int]]) -> list[int]:
        """The group in `groups` that contains `rank`."""
        for g in groups:
            if rank in g:
                return g
        raise ValueError(f"rank={rank} is in none of the groups")

    def to_dict(self) -> dict[str, object]:
        """Every group family plus chunk_order, as JSON-ready lists."""
        return {
            "world": self.world,
            "tp": self.tp_groups(),
            "pp": self.pp_groups(),
            "dp": self.dp_groups(),
            "otp": self.otp_groups(),
            "odp": self.odp_groups(),
            "shard": self.shard_groups(),
            "chunk_order": self.chunk_order,
        }
