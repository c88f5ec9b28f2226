"""The gather source of a layer-sharded FlashComm2 W_o: resident TP slices, all-gathered just in
time into a ring of k+1 buffers on FlashComm2 steps only.

Every rank keeps its own row-parallel slice of every layer, exactly what stock TP holds: its own
heads' D/N input columns, `[H, D/N]`. A FlashComm2 step needs its odp group's `[H, D/otp]` (the
full W_o at otp = 1); its prefetch(i) all-gathers that from the G = odp members of the group
into the ring, with DESIGN.md section 3's schedule and ShardedSeries' interface and stats:
- prefetch(i) gathers layer `prefetch_target(i, start, L, k)` into slot (m + k) mod (k+1), where
  m counts FlashComm2 prefetches; wait(i) reads slot m mod (k+1) and checks its tag;
- a row-parallel step (`full=False`) reads the resident slice and moves no weight byte: the ring
  does not turn, and its position is unchanged.
Memory per rank: `L * |W| / G + (k+1) * |W|`, |W| = H * D/otp * elt (`L * |W|` when G = 1).

The ring stays warm. finalize() pre-fills slots 0..k-1 with layers start..start+k-1, and every
FlashComm2 pass ends by gathering them again (the wrap-around of its last k prefetches). Weights
never change, so those slots stay valid across any number of row-parallel steps: the first k
layers of every FlashComm2 step find their weight already there and never block (k >= 1), and
each FlashComm2 step gathers exactly L layers whatever ran between. A step takes one path for
all its layers: `full` may change only at the first layer of a pass; anything else raises.

Storage is transposed: slices are kept as `[D/N, H]` and ring slots as `[D/otp, H]`, so member
p's slice is the contiguous row block p of a slot (one all_gather_into_tensor on NCCL, G async
broadcasts into row blocks on gloo, as comm.py measured). wait() returns `[H, D/otp]` or
`[H, D/N]` views (non-contiguous; matmuls take them as they are). A post_process runs on each
rank's own slice, so it must act per input column block (casts, transposes of the [H, D/N]
slice), not over whole rows of W_o.

The group is the odp group on its own communicator (ParallelGroups.fetch), so the in-flight
gather of layer i+k never queues behind layer i's all-to-all. CUDA ordering is ShardedSeries':
slots are allocated once, NCCL orders the next gather into a slot after the o_proj that read
it, and Work.wait() joins the current stream without blocking the CPU; `sync=True` gathers
synchronously (graph capture).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable

import torch
import torch.distributed as dist

from flashcomm.groups import GroupHandle
from flashcomm.sharding import SeriesStats, prefetch_target


class GatheredSeries:
    """One weight name across the L layers of a stage: resident `[H, D/N]` slices, and a ring
    the FlashComm2 steps all-gather the group's `[H, G*D/N]` weight into."""

    def __init__(
        self,
        name: str,
        group: GroupHandle | dist.ProcessGroup | None,
        prefetch_step: int,
        *,
        sync: bool = False,
        layers: range | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """`group`: the G ranks whose slices make up the gathered weight, in column order (our
        GroupHandle, a plain torch ProcessGroup or None = the world); `layers`, if given, is the
        exact index range this stage must register."""
        if not isinstance(prefetch_step, int) or prefetch_step < 0:
            raise ValueError(f"series {name!r}: prefetch_step={prefetch_step!r} must be an "
                             f"int >= 0")
        if layers is not None:
            if layers.step != 1 or len(layers) == 0 or layers.start < 0:
                raise ValueError(f"series {name!r}: layers={layers} must be a non-empty range "
                                 f"of consecutive indices >= 0")
            _check_k(prefetch_step, len(layers), name)
        self.name, self.k, self.sync = name, prefetch_step, sync
        self.group = GroupHandle.of(group)
        self._layers = layers
        self._device = None if device is None else torch.device(device)
        self._registered: dict[int, torch.Tensor] = {}
        self._finalized = False
        self._start = self._num_layers = 0
        self._resident: dict[int, torch.Tensor] = {}  # layer -> own slice, stored [D/N, H]
        self._slots: list[torch.Tensor] = []  # ring, stored [G*D/N, H]
        self._slot_layer: list[int | None] = []
        self._slot_work: list[list[dist.Work]] = []
        self._pos = 0  # position (0..L-1) of the next layer to prefetch, both kinds of step
        self._pending = False  # prefetch(start + pos) done, its wait not yet
        self._full = True  # the kind of the pass in progress
        self._writes = self._reads = 0  # FlashComm2 prefetches / waits (the ring's m)
        self._layer_bytes = self._slice_bytes = 0
        self._fetches = self._waits = 0
        self._blocked_s = 0.0
        self._blocked_by_pos: list[float] = []
        self._peak = self._finalize_received = 0

    # ---- loading ---------------------------------------------------------------------------

    @property
    def start(self) -> int:
        """First layer index of the series (valid after finalize)."""
        self._need_finalized("start")
        return self._start

    @property
    def num_layers(self) -> int:
        """L, the number of layers in the series (valid after finalize)."""
        self._need_finalized("num_layers")
        return self._num_layers

    def owner(self, layer_idx: int) -> int:
        """Every member holds its slice of every layer: this rank's own group rank."""
        return self.group.rank

    def owns(self, layer_idx: int) -> bool:
        """Always True: the loader reads this rank's slice of every layer."""
        return True

    def register(self, layer_idx: int, weight: torch.Tensor) -> None:
        """This rank's row-parallel slice `[H, D/N]` of layer `layer_idx` (a real tensor)."""
        where = f"series {self.name!r}: register(layer {layer_idx})"
        if self._finalized:
            raise RuntimeError(f"{where} after finalize()")
        if not isinstance(layer_idx, int) or layer_idx < 0:
            raise ValueError(f"{where}: layer index must be an int >= 0")
        if self._layers is not None and layer_idx not in self._layers:
            raise ValueError(f"{where}: outside this stage's layers {self._layers.start}.."
                             f"{self._layers.stop - 1} (draft/MTP layers do not belong here)")
        if layer_idx in self._registered:
            raise ValueError(f"{where}: layer {layer_idx} is already registered")
        if weight.dim() != 2 or weight.device.type == "meta":
            raise ValueError(f"{where}: the gather source keeps every rank's own slice, so pass "
                             f"the real 2-D [H, D/N] tensor (got {tuple(weight.shape)} on "
                             f"{weight.device.type})")
        self._registered[layer_idx] = weight.detach()

    def finalize(self, post_process: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Collective over the group: post-process each own slice, keep it transposed, allocate
        the ring and gather layers start..start+k-1 into slots 0..k-1."""
        if self._finalized:
            raise RuntimeError(f"series {self.name!r}: finalize() called twice")
        idx = sorted(self._registered)
        if not idx:
            raise ValueError(f"series {self.name!r}: finalize() with no registered layers")
        start, L, k = idx[0], len(idx), self.k
        if idx[-1] - start + 1 != L:
            missing = sorted(set(range(start, idx[-1] + 1)) - set(idx))
            raise ValueError(f"series {self.name!r}: layer indices must be consecutive; "
                             f"registered {start}..{idx[-1]} misses {missing}")
        if self._layers is not None and (start, L) != (self._layers.start, len(self._layers)):
            raise ValueError(f"series {self.name!r}: registered {start}..{idx[-1]} but the stage "
                             f"has layers {self._layers.start}..{self._layers.stop - 1}")
        _check_k(k, L, self.name)
        shapes = {(tuple(w.shape), w.dtype) for w in self._registered.values()}
        if len(shapes) != 1:
            raise ValueError(f"series {self.name!r}: layers differ in shape/dtype: {shapes}")
        self._start, self._num_layers = start, L
        self._device = self._device or self._registered[start].device
        self._check_same_plan()

        like: torch.Tensor | None = None
        for i in idx:
            raw = self._registered[i]
            out = raw if post_process is None else post_process(raw)
            if out.dim() != 2:
                raise ValueError(f"series {self.name!r}: post_process gave layer {i} "
                                 f"{tuple(out.shape)}; a slice must stay 2-D [H, D/N]")
            if like is not None and (out.shape, out.dtype) != (like.shape, like.dtype):
                raise ValueError(f"series {self.name!r}: post_process gave layer {i} "
                                 f"{tuple(out.shape)} {out.dtype}, the first layer "
                                 f"{tuple(like.shape)} {like.dtype}")
            like = out
            self._resident[i] = out.t().contiguous().to(self._device)  # [D/N, H]
            self._registered[i] = self._resident[i]  # drop the raw copy now
            self._note_peak(raw, out)
            del raw, out
        self._registered = {}
        first = self._resident[start]
        self._slice_bytes = first.numel() * first.element_size()
        G = self.group.size
        self._layer_bytes = G * self._slice_bytes
        if self.group.group is not None:
            rows, hidden = first.shape
            self._slots = [first.new_empty((G * rows, hidden)) for _ in range(k + 1)]
            self._slot_work = [[] for _ in range(k + 1)]
            for p in range(k):  # the warm ring: windows 0..k-1 hold the first k layers
                self._gather(start + p, p, sync=True)
                self._finalize_received += (G - 1) * self._slice_bytes
            self._note_peak()
        self._slot_layer = [start + p if p < k else None for p in range(k + 1)]
        self._blocked_by_pos = [0.0] * L
        self._finalized = True

    # ---- forward ---------------------------------------------------------------------------

    def prefetch(self, layer_idx: int, full: bool = True) -> None:
        """Layer i begins (its QKV). full: a FlashComm2 step, gather layer start + ((i - start
        + k) mod L) into the next ring slot; not full: a row-parallel step, nothing moves."""
        self._need_finalized("prefetch")
        expected = self._start + self._pos
        if layer_idx != expected or self._pending:
            raise RuntimeError(
                f"series {self.name!r}: prefetch(layer {layer_idx}) but the schedule expects "
                + (f"wait(layer {expected}) first" if self._pending
                   else f"prefetch(layer {expected})")
                + "; every rank must call prefetch(i), wait(i) for i = start..start+L-1 in order")
        if self._pos == 0:
            self._full = bool(full)
        elif bool(full) != self._full:
            raise RuntimeError(self._mixed(layer_idx, full))
        self._pending = True
        if not full:
            return
        target = prefetch_target(layer_idx, self._start, self._num_layers, self.k)
        slot = (self._writes + self.k) % (self.k + 1)
        self._writes += 1
        self._slot_layer[slot] = target
        if self.group.group is not None:
            self._gather(target, slot, sync=self.sync)
            self._fetches += 1

    def wait(self, layer_idx: int, full: bool = True) -> torch.Tensor:
        """full: the gathered `[H, G*D/N]` weight of layer i, after waiting for its gather only;
        not full: this rank's resident `[H, D/N]` slice (no wait, no traffic)."""
        self._need_finalized("wait")
        t0 = time.perf_counter()
        expected = self._start + self._pos
        if not self._pending:
            raise RuntimeError(
                f"series {self.name!r}: wait(layer {layer_idx}) before prefetch(layer "
                f"{expected}); call prefetch(i) when layer i starts, on every rank")
        if layer_idx != expected:
            raise RuntimeError(f"series {self.name!r}: wait(layer {layer_idx}) but the schedule "
                               f"expects wait(layer {expected}); layers are waited in order")
        if bool(full) != self._full:
            raise RuntimeError(self._mixed(layer_idx, full))
        self._pending = False
        self._pos = (self._pos + 1) % self._num_layers
        self._waits += 1
        if not full:
            return self._resident[layer_idx].t()
        if self.group.group is None:
            self._reads += 1
            return self._resident[layer_idx].t()
        slot = self._reads % (self.k + 1)
        held = self._slot_layer[slot]
        if held != layer_idx:
            raise RuntimeError(
                f"series {self.name!r}: wait(layer {layer_idx}) but ring slot {slot} holds layer "
                f"{held}; a skipped or extra FlashComm2 prefetch on this rank shows up here")
        self._reads += 1
        works, self._slot_work[slot] = self._slot_work[slot], []
        for w in works:
            w.wait()  # NCCL: the current stream waits, the CPU does not
        dt = time.perf_counter() - t0
        self._blocked_s += dt
        self._blocked_by_pos[layer_idx - self._start] += dt
        return self._slots[slot].t()

    def stats(self) -> SeriesStats:
        """Counters of this rank; resident_bytes = L*|W|/G + (k+1)*|W| (L*|W| if G == 1);
        bytes_sent/received count a ring all-gather: (G-1)/G * |W| each per fetch;
        owned_layers = L (each a 1/G slice)."""
        self._need_finalized("stats")
        moved = self._fetches * (self.group.size - 1) * self._slice_bytes
        return SeriesStats(
            resident_bytes=sum(t.nbytes for t in [*self._resident.values(), *self._slots]),
            bytes_received=moved,
            bytes_sent=moved,
            fetches=self._fetches,
            waits=self._waits,
            blocked_wait_s=self._blocked_s,
            layer_bytes=self._layer_bytes,
            owned_layers=len(self._resident),
            slots=len(self._slots),
            finalize_peak_bytes=self._peak,
            finalize_bytes_received=self._finalize_received,
        )

    def blocked_wait_by_layer(self) -> list[float]:
        """Host seconds blocked in FlashComm2 waits, per layer position 0..L-1, since finalize."""
        self._need_finalized("blocked_wait_by_layer")
        return list(self._blocked_by_pos)

    # ---- helpers ---------------------------------------------------------------------------

    def _gather(self, layer_idx: int, slot: int, sync: bool) -> None:
        """All-gather the members' slices of `layer_idx` into ring slot `slot` (row block p =
        member p's slice); async works are kept for the slot's wait."""
        mine, buf, g = self._resident[layer_idx], self._slots[slot], self.group
        rows = mine.shape[0]
        if dist.get_backend(g.group) == "gloo":  # gloo: broadcasts beat its ring all-gather
            buf[g.rank * rows:(g.rank + 1) * rows].copy_(mine)
            works = [dist.broadcast(buf[p * rows:(p + 1) * rows], src=g.global_rank(p),
                                    group=g.group, async_op=True) for p in range(g.size)]
            if sync:
                for w in works:
                    w.wait()
                works = []
        else:
            work = dist.all_gather_into_tensor(buf, mine, group=g.group, async_op=not sync)
            works = [] if sync else [work]
        self._slot_work[slot] = works

    def _mixed(self, layer_idx: int, full: bool) -> str:
        kind = {True: "FlashComm2 (full)", False: "row-parallel"}
        return (f"series {self.name!r}: layer {layer_idx} asks for a {kind[bool(full)]} weight "
                f"in a step that began as {kind[self._full]}; a step takes one path for all "
                f"its layers (the path may change only at layer {self._start})")

    def _need_finalized(self, what: str) -> None:
        if not self._finalized:
            raise RuntimeError(f"series {self.name!r}: {what} before finalize()")

    def _check_same_plan(self) -> None:
        """All-gather (start, L, k, name/shape/dtype) so diverging ranks fail, not hang."""
        if self.group.group is None:
            return
        w = self._registered[self._start]
        key = f"{self.name}|{tuple(w.shape)}|{w.dtype}"
        mine = torch.tensor([self._start, self._num_layers, self.k, zlib.crc32(key.encode())],
                            dtype=torch.int64, device=self._device)
        every = [torch.empty_like(mine) for _ in range(self.group.size)]
        dist.all_gather(every, mine, group=self.group.group)
        plans = [tuple(t.tolist()) for t in every]
        if len(set(plans)) != 1:
            rows = ", ".join(f"rank {r}: start={p[0]} L={p[1]} k={p[2]}"
                             for r, p in zip(self.group.ranks, plans, strict=True))
            raise RuntimeError(f"series {self.name!r}: ranks of the gather group disagree on the "
                               f"series (name/slice shape/dtype/start/L/k): {rows}")

    def _note_peak(self, *transient: torch.Tensor) -> None:
        held = {(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
                for t in [*self._registered.values(), *self._resident.values(), *self._slots,
                          *transient] if t.device.type != "meta"}
        self._peak = max(self._peak, sum(n for _, n in held))


def _check_k(k: int, num_layers: int, name: str) -> None:
    if not 0 <= k <= num_layers - 2:
        raise ValueError(f"series {name!r}: prefetch_step k={k} must satisfy 0 <= k <= L-2 = "
                         f"{num_layers - 2} for L={num_layers} layers"
                         + (" (a series needs L >= 2)" if num_layers < 2 else ""))
