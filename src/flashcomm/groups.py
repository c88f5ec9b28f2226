"""torch.distributed process groups built from a ParallelLayout, held in one explicit object."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist

from flashcomm.config import FlashCommConfig
from flashcomm.layout import ParallelLayout

DEFAULT_TIMEOUT = timedelta(seconds=120)


@dataclass(frozen=True)
class GroupHandle:
    """One process group this rank belongs to, with its member list."""

    group: dist.ProcessGroup | None
    """The torch process group (None for a one-rank group, which needs no communication)."""
    ranks: tuple[int, ...]
    """Global ranks in group-rank order."""
    rank: int
    """This process's rank inside the group."""

    @property
    def size(self) -> int:
        """Number of members."""
        return len(self.ranks)

    def global_rank(self, group_rank: int) -> int:
        """Global rank of member `group_rank`."""
        return self.ranks[group_rank]

    @classmethod
    def of(cls, group: GroupHandle | dist.ProcessGroup | None) -> GroupHandle:
        """A handle for our handle, a plain torch ProcessGroup this rank belongs to, or None: the
        world (a one-rank group when torch.distributed is not initialized)."""
        if isinstance(group, GroupHandle):
            return group
        if group is None:
            if not dist.is_initialized():
                return cls(None, (0,), 0)
            group = dist.group.WORLD
        if isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER:  # new_group
            raise ValueError(f"group: global rank {dist.get_rank()} is not a member of it; only "
                             "members may use the group")
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"group={group!r}: expected a GroupHandle, a torch.distributed "
                            "ProcessGroup or None (the world)")
        ranks = tuple(dist.get_process_group_ranks(group))
        me = dist.get_rank()
        if me not in ranks:
            raise ValueError(f"group with ranks {list(ranks)}: global rank {me} is not a member; "
                             "only members may use the group")
        return cls(group if len(ranks) > 1 else None, ranks, ranks.index(me))


@dataclass(frozen=True)
class ParallelGroups:
    """Every group of this rank: tp, pp, dp, FlashComm2's odp/otp and per-weight shard groups."""

    layout: ParallelLayout
    """The rank math the groups were built from."""
    rank: int
    """This process's global rank."""
    tp: GroupHandle
    """Tensor-parallel group."""
    pp: GroupHandle
    """Pipeline group."""
    dp: GroupHandle
    """Data-parallel group."""
    odp: GroupHandle | None
    """FlashComm2 all-to-all group (None when FlashComm2 is off)."""
    otp: GroupHandle | None
    """FlashComm2 reduce-scatter group (None when FlashComm2 is off)."""
    shard: dict[str, GroupHandle] = field(default_factory=dict)
    """Layer-sharding group per weight name."""
    fetch: GroupHandle | None = None
    """The odp group's ranks on a communicator of their own, for the gather source's W_o
    all-gathers (so they never queue behind the odp all-to-all); built when o_proj is
    layer-sharded under FlashComm2, and the o_proj shard group itself when the ranks agree."""

    @classmethod
    def from_config(
        cls, cfg: FlashCommConfig, world: int | None = None, timeout: timedelta = DEFAULT_TIMEOUT
    ) -> ParallelGroups:
        """Validate `cfg` for `world` ranks (default: the initialized world) and build its groups,
        with a shard group for every weight in cfg.layer_sharding; collective over the world."""
        if world is None and dist.is_initialized():
            world = dist.get_world_size()
        return cls.build(ParallelLayout.from_config(cfg, world), cfg.layer_sharding, timeout)

    @classmethod
    def build(
        cls,
        layout: ParallelLayout,
        shard_weights: tuple[str, ...] = ("o_proj",),
        timeout: timedelta = DEFAULT_TIMEOUT,
    ) -> ParallelGroups:
        """Create the groups; collective over the world, so every rank must call it alike."""
        if not dist.is_initialized():
            raise RuntimeError("ParallelGroups.build needs torch.distributed to be initialized")
        world, rank = dist.get_world_size(), dist.get_rank()
        if world != layout.world:
            raise ValueError(
                f"world={world}: the layout needs tp*pp*dp = {layout.world} ranks "
                f"(tp={layout.tp}, pp={layout.pp}, dp={layout.dp})"
            )

        def family(groups: list[list[int]]) -> GroupHandle:
            mine = None
            for ranks in groups:  # every rank creates every group, in the same order
                pg = dist.new_group(ranks, timeout=timeout) if len(ranks) > 1 else None
                if rank in ranks:
                    mine = GroupHandle(pg, tuple(ranks), ranks.index(rank))
            assert mine is not None, f"rank {rank} missing from {groups}"
            return mine

        tp = family(layout.tp_groups())
        pp = family(layout.pp_groups())
        dp = family(layout.dp_groups())
        odp = family(layout.odp_groups()) if layout.otp else None
        otp = family(layout.otp_groups()) if layout.otp else None
        shard = {w: family(layout.shard_groups(w)) for w in shard_weights}
        fetch = None
        if layout.otp and "o_proj" in shard:  # one series uses it: owner or gather, not both
            same = sorted(layout.odp_groups()) == layout.shard_groups("o_proj")
            fetch = shard["o_proj"] if same else family(layout.odp_groups())
        return cls(layout, rank, tp, pp, dp, odp, otp, shard, fetch)
