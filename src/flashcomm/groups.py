"""torch.distributed process groups built from a ParallelLayout, held in one explicit object.

Building the groups also records where every rank runs (`HostInfo`: host name, the address of
the interface gloo/NCCL use, pid), so that a collective that fails on a lost link or peer can be
reported by `ParallelGroups.naming_link_errors()` as a `LinkFailure` naming this rank's host,
the hosts and ranks it was talking to and their addresses, instead of gloo's bare
`Timed out waiting 120000ms for send operation`. The group timeout is the config's
`group_timeout_s` (FLASHCOMM_GROUP_TIMEOUT / --group-timeout).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist

from flashcomm.config import FlashCommConfig
from flashcomm.knobs import FlashCommError
from flashcomm.layout import ParallelLayout

DEFAULT_TIMEOUT = timedelta(seconds=120)
_IFACE_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
# what gloo's and NCCL's transports raise when a peer or the link to it is gone
_LINK_ERRORS = ("Timed out waiting", "Connection reset", "Connection closed", "Connection refused",
                "Broken pipe", "No route to host", "Network is unreachable", "Read error",
                "Write error", "NCCL communicator was aborted", "Socket Timeout")
_PEER_ADDR = re.compile(r"\[?(\d+\.\d+\.\d+\.\d+)\]?:\d+")


@dataclass(frozen=True)
class HostInfo:
    """Where one rank runs."""

    rank: int
    """Global rank."""
    host: str
    """Host name (socket.gethostname())."""
    address: str
    """IPv4 address of the interface the backend uses (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME),
    else of the host name."""
    iface: str
    """That interface's name ('' when not set)."""
    pid: int
    """Process id."""

    @classmethod
    def here(cls, rank: int) -> HostInfo:
        """This process."""
        iface = next((os.environ[v].split(",")[0] for v in _IFACE_VARS if os.environ.get(v)), "")
        addr = ""
        if iface:
            with contextlib.suppress(OSError), socket.socket(socket.AF_INET,
                                                             socket.SOCK_DGRAM) as s:
                req = struct.pack("256s", iface.encode()[:15])
                addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, req)[20:24])  # SIOCGIFADDR
        if not addr:
            with contextlib.suppress(OSError):
                addr = socket.gethostbyname(socket.gethostname())
        return cls(rank, socket.gethostname(), addr, iface, os.getpid())


class LinkFailure(FlashCommError, RuntimeError):
    """A collective failed because a peer or the link to it is gone (the backend timed out or
    lost the connection); the message names this rank's host and the peers it lost."""


@dataclass(frozen=True)
class GroupHandle:
    """One process group this rank belongs to, with its member list."""

    group: dist.ProcessGroup | None
    """The torch process group (None for a one-rank group, which needs no communication)."""
    ranks: tuple[int, ...]
    """Global ranks in group-rank order."""
    rank: int
    """This process's rank inside the group."""
    member_hosts: tuple[int, ...] = ()
    """Host index of each member, in group-rank order (hosts numbered 0, 1, ... in the order of
    their lowest global rank); empty when unknown, read as one host. Known for groups
    ParallelGroups builds; comm.py routes cross-host traffic by it."""

    @property
    def spans_hosts(self) -> bool:
        """Whether its members run on more than one host, so its traffic crosses a network link
        (comm.py then sends large blocks in pieces, each across the link once per host)."""
        return len(set(self.member_hosts)) > 1

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
    hosts: tuple[HostInfo, ...] = ()
    """Where each global rank runs, by rank."""
    timeout: timedelta = DEFAULT_TIMEOUT
    """Timeout of every group."""

    @classmethod
    def from_config(
        cls, cfg: FlashCommConfig, world: int | None = None, timeout: timedelta | None = None
    ) -> ParallelGroups:
        """Validate `cfg` for `world` ranks (default: the initialized world) and build its groups,
        with a shard group for every weight in cfg.layer_sharding; collective over the world.
        Every group times out after `timeout` (default: cfg.group_timeout_s)."""
        if world is None and dist.is_initialized():
            world = dist.get_world_size()
        timeout = timeout or timedelta(seconds=cfg.group_timeout_s)
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

        gathered: list[HostInfo | None] = [None] * world
        dist.all_gather_object(gathered, HostInfo.here(rank))  # before any failure can happen
        hosts = tuple(h for h in gathered if h is not None)
        where = [(h.host, h.address) for h in hosts]
        host_index = [list(dict.fromkeys(where)).index(w) for w in where]  # 0, 1, ... by rank

        def family(groups: list[list[int]]) -> GroupHandle:
            mine = None
            for ranks in groups:  # every rank creates every group, in the same order
                pg = dist.new_group(ranks, timeout=timeout) if len(ranks) > 1 else None
                if rank in ranks:
                    mine = GroupHandle(pg, tuple(ranks), ranks.index(rank),
                                       tuple(host_index[r] for r in ranks))
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
        return cls(layout, rank, tp, pp, dp, odp, otp, shard, fetch, hosts, timeout)

    @contextlib.contextmanager
    def naming_link_errors(self) -> Iterator[None]:
        """Re-raise a backend error caused by a lost peer or link as a LinkFailure naming it."""
        try:
            yield
        except RuntimeError as e:
            if isinstance(e, FlashCommError) or not any(m in str(e) for m in _LINK_ERRORS):
                raise
            raise LinkFailure(self.describe_link_error(e)) from e

    def describe_link_error(self, e: BaseException) -> str:
        """One line: this rank and host, the peers on other hosts (or the one the backend named),
        the timeout, and the backend's own last line."""
        me = self.hosts[self.rank] if self.rank < len(self.hosts) else HostInfo.here(self.rank)
        raw = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        named = {m.group(1) for m in _PEER_ADDR.finditer(str(e))} - {me.address}
        remote = [h for h in self.hosts if (h.host, h.address) != (me.host, me.address)
                  and (not named or h.address in named)]
        via = f" over {me.iface}" if me.iface else ""
        if remote:
            by_host: dict[tuple[str, str], list[int]] = {}
            for h in remote:
                by_host.setdefault((h.host, h.address), []).append(h.rank)
            lost = f"lost the link{via} to " + "; ".join(
                f"host {host} ({addr}: rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))})"
                for (host, addr), r in by_host.items())
        else:
            lost = "lost a peer on its own host: " + ", ".join(
                f"rank {h.rank} (pid {h.pid})" for h in self.hosts if h.rank != self.rank)
        secs = self.timeout.total_seconds()
        return (f"rank {self.rank} on host {me.host} ({me.address}, pid {me.pid}) {lost}: a "
                f"collective failed or got no answer within the group timeout of {secs:.0f} s "
                f"(FLASHCOMM_GROUP_TIMEOUT / --group-timeout); the link is down, drops packets, "
                f"or a peer died. Backend: {raw}")
