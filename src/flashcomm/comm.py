"""FlashComm2 o_proj exchange, FlashComm1 token scatter/gather, int8 codec and byte counters.

Token dim first: activations are `[T, ...]`. Token collectives pad T to T_pad = ceil(T/N)*N and
TP rank r owns token chunk r, rows `[r*T_pad/N, (r+1)*T_pad/N)`. Padding rows are unspecified
(zero plus bias) and are stripped by `all_gather_tokens`.

Byte accounting (`CommCounter`): every op records the *logical* bytes one rank sends under the
ring/pairwise algorithm of DESIGN.md section 2, with T padded to T_pad for every token op so
the formulas are exact integers (c = T_pad/N tokens, elt = bytes per element):
    all_reduce       2*(N-1) * c*H*elt        (= 2(N-1)/N * T_pad*H*elt)
    reduce_scatter     (N-1) * c*H*elt
    all_gather         (N-1) * c*H*elt
    all_to_all     (odp-1) * (T_pad/odp) * (D/N) * elt       (int8: elt = 1, payload only)
    all_to_all_scales  (odp-1) * (T_pad/odp) * 4             (int8 only: one fp32 scale per row)
    otp_reduce_scatter (otp-1) * c*H*elt                      (= (otp-1)/N * T_pad*H*elt)
The counters record these formulas whatever primitive runs underneath.

Primitives per backend: one implementation per op and backend, the fastest measured
(`flashcomm bench comm --candidates` re-measures them; the figures are in BENCHMARKS.md).
- gloo in one host: N async broadcasts for the all-gather, all_to_all_single for the
  all-to-all.
- gloo across hosts (GroupHandle.spans_hosts): blocks larger than PIECE_BYTES travel in
  pieces, all posted at once, so both directions of every link stay busy. The all-to-all is a
  pairwise exchange (`_pairwise`). The all-gather sends each chunk across to each other host
  once, to one member there that forwards its pieces as they arrive (`_host_all_gather`,
  routed by GroupHandle.member_hosts): at 2 hosts x 2 ranks 2 chunks cross per direction,
  where a ring sent 3 (an all-gather of 1 MiB chunks at 100 Mbit/s: 207 against 299 ms). One
  whole-block message per direction (all_to_all_single, broadcasts) left a shaped link half
  idle on some calls (BENCHMARKS.md, "The engine across two hosts"). Blocks of one piece or
  less (decode) keep one message per block in one gloo work: all_to_all_single, for the
  all-gather of n copies of the chunk (0.4 ms a call at T = 2 across a 500 Mbit/s link, where n
  async broadcasts took 0.8 ms and point-to-point calls about 2 ms). Over loopback the pieces
  cost more than they save (a [4096, 1024] fp32 all-gather: 14.9 against 11.7 ms at N=2), hence
  the split.
- The reduce-scatter is the all-to-all plus a local sum (same (N-1)/N bytes); gloo's own ring
  collectives lose to these.
- NCCL keeps the native reduce_scatter_single / all_gather_single / all_to_all_single /
  all_reduce.

int8 (`comm_dtype="int8"`): each token row of the all-to-all payload x `[T, D/N]` is sent as
int8 q = round(x / s) with s = absmax(row) / 127, plus s in fp32 (packed as 4 extra bytes of
the same row, so it is one message). After dequantisation |x - x_hat| <= s/2 elementwise, so
each output element obeys
    |y_int8 - y| <= sum over TP slices k of  absmax(x[t, slice k]) / 254 * ||W[h, slice k]||_1
(plus the activation dtype's rounding of x_hat). tests/test_comm.py asserts this bound. For
Gaussian activations and weights the measured relative Frobenius error of x @ W^T is 0.47%
(D/N=16), 0.54% (32), 0.65% (128), 0.74% (512), 0.78% (1024): under 1%.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from flashcomm.config import CommDtype
from flashcomm.groups import GroupHandle, ParallelGroups


@dataclass
class CommCounter:
    """Logical bytes this rank sent, per op name (formulas in the module docstring)."""

    bytes_sent: dict[str, int] = field(default_factory=dict)
    """Bytes sent per op name, e.g. "all_reduce", "all_to_all"."""

    def add(self, op: str, nbytes: int) -> None:
        """Record `nbytes` sent by `op`."""
        self.bytes_sent[op] = self.bytes_sent.get(op, 0) + int(nbytes)

    def total(self) -> int:
        """Bytes sent over all ops."""
        return sum(self.bytes_sent.values())

    def reset(self) -> None:
        """Forget everything recorded."""
        self.bytes_sent.clear()


def padded_tokens(num_tokens: int, n: int) -> int:
    """T rounded up to a multiple of n."""
    return -(-num_tokens // n) * n


def pad_tokens(x: torch.Tensor, n: int) -> torch.Tensor:
    """Zero-pad dim 0 of x to a multiple of n (x itself when already aligned)."""
    t_pad = padded_tokens(x.shape[0], n)
    if t_pad == x.shape[0]:
        return x
    out = x.new_zeros((t_pad, *x.shape[1:]))
    out[: x.shape[0]] = x
    return out


def _row_bytes(x: torch.Tensor) -> int:
    """Bytes of one token row of x."""
    return (x.numel() // max(x.shape[0], 1) if x.dim() > 1 else 1) * x.element_size()


def _count(counter: CommCounter | None, op: str, nbytes: int) -> None:
    if counter is not None:
        counter.add(op, nbytes)


def _gloo(group: GroupHandle) -> bool:
    return dist.get_backend(group.group) == "gloo"


def _across_hosts(group: GroupHandle) -> bool:
    return group.spans_hosts and _gloo(group)


# ---- primitives: one fastest implementation per backend ---------------------------------


PIECE_BYTES = 256 * 1024
"""Largest message of a gloo pairwise exchange, and the block size above which it is used. A
whole multi-MiB block per direction left one direction idle on about half the calls across a
tbf-shaped link (72 or 141 ms for a 4 MiB all-gather at 500 Mbit/s); 128-512 KiB pieces, all
posted at once, kept both busy (75-77 ms, every call; 4, 8 or all pieces outstanding alike)."""


def _pieces(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """x [R, ...] contiguous -> dim-0 views of at most PIECE_BYTES each (one piece per row at
    least); sender and receiver cut equal-shaped blocks identically."""
    rows = max(1, PIECE_BYTES // max(_row_bytes(x), 1))
    return x.split(rows) if x.shape[0] else ()


def _pairwise(sends: list[torch.Tensor], recvs: list[torch.Tensor], group: GroupHandle) -> None:
    """Send sends[p] to member p and receive recvs[p] from it, for every member p but this rank
    (contiguous, equal shapes per pair), every piece posted at once. Offset k pairs this rank
    with r+k (send) and r-k (receive), so every link carries both directions at once."""
    n, r = group.size, group.rank
    works = []
    for k in range(1, n):
        to, frm = (r + k) % n, (r - k) % n
        for a, b in zip(_pieces(sends[to]), _pieces(recvs[frm]), strict=True):
            works.append(dist.irecv(b, group.global_rank(frm), group=group.group))
            works.append(dist.isend(a, group.global_rank(to), group=group.group))
    for w in works:
        w.wait()


def _all_to_all(out: torch.Tensor, inp: torch.Tensor, group: GroupHandle) -> None:
    """Pairwise exchange of the group.size equal dim-0 blocks of inp into out (all backends)."""
    n, r = group.size, group.rank
    if _across_hosts(group) and inp.nbytes > n * PIECE_BYTES:  # blocks of several pieces
        ins, outs = inp.chunk(n), out.chunk(n)
        outs[r].copy_(ins[r])
        _pairwise(list(ins), list(outs), group)
        return
    dist.all_to_all_single(out, inp, group=group.group)


def _reduce_scatter(x: torch.Tensor, group: GroupHandle) -> torch.Tensor:
    """x [n*c, ...] partial sums -> [c, ...] summed block group.rank."""
    n = group.size
    if _gloo(group):  # gloo: pairwise all_to_all + local sum beats its ring reduce-scatter
        recv = torch.empty_like(x)
        _all_to_all(recv, x, group)
        return recv.view(n, -1, *x.shape[1:]).sum(0)
    out = x.new_empty((x.shape[0] // n, *x.shape[1:]))
    dist.reduce_scatter_single(out, x, group=group.group)
    return out


def _host_all_gather(out: torch.Tensor, chunk: torch.Tensor, group: GroupHandle) -> None:
    """All-gather across hosts into out [n*c, ...], in pieces: every block crosses to each other
    host once, to one member there (its entry), which forwards each piece to its host's other
    members as soon as it has arrived; members of one host send each other their own blocks
    directly. A host so sends each of its blocks over the link once per other host, where a ring
    sends n-1 blocks over each host-crossing edge (3 against 2 per direction at 2 hosts x 2)."""
    n, r, c = group.size, group.rank, chunk.shape[0]
    host = group.member_hosts
    blocks = out.split(c)
    blocks[r].copy_(chunk)
    members = {h: [m for m in range(n) if host[m] == h] for h in host}

    def entry(b: int, h: int) -> int:  # the member of host h that block b crosses to
        return members[h][members[host[b]].index(b) % len(members[h])]

    def source(b: int) -> int:  # who sends this rank block b: its owner, or our host's entry
        return b if host[b] == host[r] or entry(b, host[r]) == r else entry(b, host[r])

    def send(piece: torch.Tensor, to: int, b: int) -> dist.Work:  # tag = block: pairs carry several
        return dist.isend(piece, group.global_rank(to), group=group.group, tag=b)

    pieces = [_pieces(block) for block in blocks]  # equal shapes: equal cuts on every rank
    recvs = {b: [dist.irecv(p, group.global_rank(source(b)), group=group.group, tag=b)
                 for p in pieces[b]] for b in range(n) if b != r}
    peers = [m for m in members[host[r]] if m != r]
    sends = [send(p, entry(r, h), r) for h in members if h != host[r] for p in pieces[r]]
    sends += [send(p, m, r) for m in peers for p in pieces[r]]
    forwarded = [b for b in recvs if host[b] != host[r] and source(b) == b]
    for j in range(len(pieces[r])):  # piece j of each block this rank is the entry for, in turn
        for b in forwarded:
            recvs[b][j].wait()
            sends += [send(pieces[b][j], m, b) for m in peers]
    # a gloo work must be waited once: a second wait blocks for a message that never comes
    for w in [*(w for b, ws in recvs.items() if b not in forwarded for w in ws), *sends]:
        w.wait()


def _all_gather(chunk: torch.Tensor, group: GroupHandle) -> torch.Tensor:
    """chunk [c, ...] of every member -> [n*c, ...] in group-rank order."""
    n, c = group.size, chunk.shape[0]
    out = chunk.new_empty((n * c, *chunk.shape[1:]))
    chunk = chunk.contiguous()
    if not _gloo(group):
        dist.all_gather_single(out, chunk, group=group.group)
    elif _across_hosts(group) and chunk.nbytes > PIECE_BYTES:
        _host_all_gather(out, chunk, group)
    elif _across_hosts(group):  # one piece: one all_to_all_single of n copies, one gloo work
        dist.all_to_all_single(out, chunk.repeat(n, *([1] * (chunk.dim() - 1))),
                               group=group.group)
    else:  # one host: async broadcasts into the output slices beat gloo's ring all-gather
        out[group.rank * c:(group.rank + 1) * c] = chunk
        works = [dist.broadcast(out[i * c:(i + 1) * c], src=group.global_rank(i),
                                group=group.group, async_op=True) for i in range(n)]
        for w in works:
            w.wait()
    return out


# ---- public collectives -------------------------------------------------------------------


def all_to_all(x: torch.Tensor, group: GroupHandle,
               counter: CommCounter | None = None) -> torch.Tensor:
    """Send dim-0 block i of x [n*b, ...] to member i; returns the n received blocks in order."""
    n = group.size
    if x.shape[0] % n:
        raise ValueError(f"all_to_all: {x.shape[0]} rows do not split into N={n} equal blocks")
    _count(counter, "all_to_all", (n - 1) * (x.shape[0] // n) * _row_bytes(x))
    if group.group is None or x.numel() == 0:
        return x
    out = torch.empty_like(x)
    _all_to_all(out, x.contiguous(), group)
    return out


def all_reduce(x: torch.Tensor, group: GroupHandle,
               counter: CommCounter | None = None) -> torch.Tensor:
    """Sum x [T, ...] over the group (in place when communicating); returns the sum."""
    n = group.size
    _count(counter, "all_reduce", 2 * (n - 1) * padded_tokens(x.shape[0], n) // n * _row_bytes(x))
    if group.group is None or x.numel() == 0:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group.group)
    return x


def reduce_scatter_tokens(x: torch.Tensor, group: GroupHandle,
                          counter: CommCounter | None = None) -> torch.Tensor:
    """x [T, H] partial sums on every rank -> [T_pad/N, H] summed token chunk of this rank."""
    n = group.size
    c = padded_tokens(x.shape[0], n) // n
    _count(counter, "reduce_scatter", (n - 1) * c * _row_bytes(x))
    if group.group is None:
        return x
    if c == 0:
        return x.new_empty((0, *x.shape[1:]))
    return _reduce_scatter(pad_tokens(x, n).contiguous(), group)  # [c, H]


def all_gather_tokens(x: torch.Tensor, num_tokens: int, group: GroupHandle,
                      counter: CommCounter | None = None) -> torch.Tensor:
    """x [T_pad/N, H] token chunk of this rank -> [num_tokens, H] (padding stripped)."""
    n = group.size
    c = padded_tokens(num_tokens, n) // n
    if x.shape[0] != c:
        raise ValueError(f"all_gather_tokens: chunk has {x.shape[0]} rows, expected "
                         f"ceil(num_tokens={num_tokens} / N={n}) = {c}")
    _count(counter, "all_gather", (n - 1) * c * _row_bytes(x))
    if group.group is None or c == 0:
        return x[:num_tokens]
    return _all_gather(x, group)[:num_tokens]  # [T, H]


# ---- int8 codec ---------------------------------------------------------------------------


def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """x [R, K] -> [R, K + 4] int8: per-row symmetric int8 values, then the fp32 scale's bytes."""
    xf = x.float()
    scale = xf.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / 127.0  # [R, 1]
    q = torch.round(xf / scale).clamp_(-127, 127).to(torch.int8)  # [R, K]
    return torch.cat([q, scale.reshape(-1).view(torch.int8).view(-1, 4)], dim=1)  # [R, K + 4]


def dequantize_rows(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[R, K + 4] int8 from `quantize_rows` -> [R, K] in dtype."""
    scale = packed[:, -4:].reshape(-1).view(torch.float32).view(-1, 1)  # [R, 1]
    return (packed[:, :-4].float() * scale).to(dtype)


# ---- o_proj paths -------------------------------------------------------------------------


def row_parallel_o_proj(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        group: GroupHandle, *, flashcomm1: bool,
                        counter: CommCounter | None = None) -> torch.Tensor:
    """Baseline o_proj: x [T, D/N] @ W_slice [H, D/N]^T, then all-reduce -> [T, H] or
    (flashcomm1) reduce-scatter -> [T_pad/N, H]; bias added once, after the reduction."""
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"row_parallel_o_proj: x has {x.shape[1]} features, weight slice "
                         f"expects {weight.shape[1]} (weight is [H, D/N])")
    y = x @ weight.t()  # [T, H] partial over this rank's heads
    y = reduce_scatter_tokens(y, group, counter) if flashcomm1 else all_reduce(y, group, counter)
    return y if bias is None else y + bias


def _exchange(x: torch.Tensor, groups: ParallelGroups, int8: bool,
              counter: CommCounter | None) -> torch.Tensor:
    """x [T_pad, D/N] -> [otp*c, D/otp]: this rank's odp peer chunks with all heads of its
    odp group, rows in chunk order [i + j*odp for j < otp]."""
    layout, odp_group = groups.layout, groups.odp
    n, odp, otp = layout.tp, layout.odp, layout.otp
    t_pad, dn = x.shape
    c = t_pad // n
    rows = otp * c  # rows sent to each odp peer
    # [N, c, D/N] chunks -> chunk_order so odp peer i gets chunks i + j*odp for j < otp
    send = x.view(n, c, dn)[layout.chunk_order].reshape(t_pad, dn)
    if int8:
        payload = quantize_rows(send)  # [T_pad, D/N + 4]
        _count(counter, "all_to_all", (odp - 1) * rows * dn)
        _count(counter, "all_to_all_scales", (odp - 1) * rows * 4)
    else:
        payload = send.contiguous()
        _count(counter, "all_to_all", (odp - 1) * rows * dn * x.element_size())
    recv = all_to_all(payload, odp_group)  # block p = odp peer p's heads of my rows
    if int8:
        recv = dequantize_rows(recv, x.dtype)
    # [odp(p), rows, D/N] -> [rows, odp*D/N]: heads of peer p sit at columns p*D/N
    return recv.view(odp, rows, dn).transpose(0, 1).reshape(rows, odp * dn)


def flashcomm2_o_proj(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      groups: ParallelGroups, *, flashcomm1: bool,
                      comm_dtype: CommDtype | str = CommDtype.AUTO,
                      counter: CommCounter | None = None,
                      linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                      ) -> torch.Tensor:
    """FlashComm2 o_proj: all-to-all before the projection; [T_pad/N, H] chunk (flashcomm1)
    or [T, H] (flashcomm1 off), equal to row-parallel o_proj + all-reduce. `linear(x, w)`
    computes x @ w.T (default: the @ operator; the vLLM plugin passes its platform GEMM)."""
    layout = groups.layout
    if not layout.otp or groups.odp is None or groups.otp is None:
        raise ValueError("flashcomm2_o_proj: FlashComm2 is off in this layout "
                         "(flashcomm2_otp=0); use row_parallel_o_proj or set otp >= 1")
    if comm_dtype not in set(CommDtype):
        raise ValueError(f"comm_dtype={comm_dtype!r}: allowed values are "
                         f"{[d.value for d in CommDtype]}")
    n, odp, otp = layout.tp, layout.odp, layout.otp
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1] * odp:
        raise ValueError(
            f"flashcomm2_o_proj: x {tuple(x.shape)} must be [T, D/N] and weight "
            f"{tuple(weight.shape)} [H, D/otp] = [H, odp*D/N] with odp={odp} (otp={otp})")
    num_tokens = x.shape[0]
    xp = pad_tokens(x, n)  # [T_pad, D/N]
    c = xp.shape[0] // n
    mine = _exchange(xp, groups, comm_dtype == CommDtype.INT8, counter)  # [otp*c, D/otp]
    # [otp*c, H] partial over odp group's D/otp slice when otp > 1
    y = mine @ weight.t() if linear is None else linear(mine, weight)
    if otp > 1:
        _count(counter, "otp_reduce_scatter", (otp - 1) * c * _row_bytes(y))
        if c:
            y = _reduce_scatter(y, groups.otp)  # [c, H]: TP rank r now holds token chunk r
    if bias is not None:
        y = y + bias
    if flashcomm1:
        return y
    return all_gather_tokens(y, num_tokens, groups.tp, counter)
