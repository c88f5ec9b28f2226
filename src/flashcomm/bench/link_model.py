"""The bytes the cost model says must cross the links between hosts: flashcomm.plan.costmodel's
count (the calls a step issues and the W_o fetches) mapped onto hosts through the pattern of
gloo's algorithm for each op, as flashcomm.comm issues them on gloo:
- all_reduce: gloo's ring; with each host holding a contiguous block of ranks, one ring edge per
  host crosses the link, carrying one rank's bytes;
- all_to_all, and reduce_scatter (comm.py runs it as an all-to-all): pairwise; a rank sends
  bytes/(N-1) to each peer, N-P of them on other hosts (P ranks per host);
- all_gather across hosts (comm.py): a chunk of one piece (comm.PIECE_BYTES) or less goes to
  every peer, pairwise like the all-to-all; a larger one crosses to each other host once
  (comm._host_all_gather), so N chunks cross (hosts-1) times each;
- the gather source's W_o fetch (one broadcast per member) and broadcast (the O-Shard owner
  fetch): gloo's binomial tree, whose edges across hosts depend on the root (bcast_crossings).
On 2 hosts x 1 rank every op's bytes cross the link as the cost model counts them.
"""

from __future__ import annotations

from flashcomm.comm import PIECE_BYTES
from flashcomm.plan.costmodel import Shape, step_calls, step_fetches
from flashcomm.plan.strategy import Strategy


def bcast_crossings(root: int, group: int, per_host: int) -> int:
    """Edges of gloo's binomial broadcast tree (gloo/broadcast.cc: in round i every virtual rank
    v < 2^i, v = (rank - root) mod N, sends to v + 2^i) that join ranks of different hosts."""
    crossings, step = 0, 1
    while step < group:
        for v in range(step):  # the senders of this round
            if v + step < group:
                a, b = (v + root) % group, (v + step + root) % group
                crossings += a // per_host != b // per_host
        step *= 2
    return crossings


def crossing_bytes(op: str, nbytes: int, group: int, per_host: int, root: int = 0,
                   fetch: bool = False) -> float:
    """Bytes of one call (`nbytes` sent per rank, cost-model count) crossing links, all hosts;
    `root`: the broadcast's root (member index); `fetch`: a W_o fetch (broadcasts)."""
    hosts = group // per_host
    if hosts <= 1:
        return 0.0
    if op == "all_reduce":  # gloo's ring: one edge per host crosses, carrying one rank's bytes
        return hosts * nbytes
    if op in ("all_to_all", "reduce_scatter"):  # pairwise: N-P of a rank's N-1 blocks cross
        return group * (group - per_host) * nbytes / (group - 1)
    if op == "all_gather" and fetch:  # one broadcast of nbytes/(N-1) rooted at each member
        return sum(bcast_crossings(r, group, per_host) for r in range(group)) * nbytes / (
            group - 1)
    if op == "all_gather" and nbytes / (group - 1) > PIECE_BYTES:  # each chunk to each host once
        return group * (hosts - 1) * nbytes / (group - 1)
    if op == "all_gather":  # the chunk to every peer
        return group * (group - per_host) * nbytes / (group - 1)
    if op == "broadcast":
        return bcast_crossings(root, group, per_host) * nbytes
    raise ValueError(f"op={op!r}: no crossing pattern")


def link_bytes(s: Strategy, shape: Shape, tokens: int, per_host: int,
               threshold: int | None = None) -> float:
    """Bytes one forward step of `tokens` tokens on strategy `s` sends across the links of all
    hosts together, by the cost model (shape.tp ranks, `per_host` contiguous ranks per host;
    layer i's owner broadcast is rooted at member i mod N, as ShardedSeries places it);
    `threshold`: auto's resolved crossover."""
    calls = step_calls(s.path(tokens, threshold), shape, tokens)
    total = sum(crossing_bytes(c.op, c.nbytes, c.group, per_host) for c in calls)
    fetches = step_fetches(s, shape, tokens, threshold)
    return total + sum(crossing_bytes(c.op, c.nbytes, c.group, per_host, root=i % c.group,
                                      fetch=True) for i, c in enumerate(fetches))
