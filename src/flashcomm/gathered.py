"""The gather source of a layer-sharded FlashComm2 W_o: resident TP slices, all-gathered just in
time into a ring of k+1 buffers on FlashComm2 steps only.

Every rank keeps its own row-parallel slice of every layer, exactly what stock TP holds: its own
heads' D/N input columns, `[H, D/N]`. A FlashComm2 step needs its odp group's `[H, D/otp]` (the
full W_o at otp = 1); its prefetch(i) all-gathers that from the G = odp members of the group
into the ring, with DESIGN.md section 3's schedule and ShardedSeries' interface and stats (both
are series.LayerSeries, which holds the schedule, the slot tags and the counters):
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

A backend may keep the resident slices in its own GEMM layout (`ResidentForm`, e.g. the vLLM
plugin's prepacked oneDNN weight on CPU): the row-parallel path then multiplies the packed slice
as it is, and a FlashComm2 gather unpacks this rank's slice into its row block of the slot first.
No plain copy is kept, so the memory formula holds.

The group is the odp group on its own communicator (ParallelGroups.fetch), so the in-flight
gather of layer i+k never queues behind layer i's all-to-all. CUDA ordering is ShardedSeries':
slots are allocated once, NCCL orders the next gather into a slot after the o_proj that read
it, and Work.wait() joins the current stream without blocking the CPU; `sync=True` gathers
synchronously (graph capture).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from flashcomm.series import LayerSeries, SeriesStats


@dataclass(frozen=True)
class ResidentForm:
    """How the resident slices are kept when not as plain `[D/N, H]` tensors."""

    pack: Callable[[torch.Tensor], torch.Tensor]
    """A post-processed `[H, D/N]` slice -> the tensor kept (what wait(full=False) returns)."""
    unpack: Callable[[torch.Tensor], torch.Tensor]
    """The kept tensor -> the same `[H, D/N]` values as a plain tensor (for a gather)."""


class GatheredSeries(LayerSeries):
    """One weight name across the L layers of a stage: resident `[H, D/N]` slices, and a ring
    the FlashComm2 steps all-gather the group's `[H, G*D/N]` weight into.

    `group` (LayerSeries' arguments) is the G ranks whose slices make up the gathered weight, in
    column order; `device` defaults to the device of the registered slices."""

    _PLAN_WORDS = ("gather group", "name/slice shape/dtype/start/L/k")
    _full = True
    """The kind of the pass in progress (set by each pass's first prefetch)."""
    _slice_bytes = 0
    """Bytes of one post-processed slice, |W| / G (set by finalize)."""
    _form: ResidentForm | None = None
    """The resident slices' packed form (None: plain `[D/N, H]`), set by finalize."""

    # ---- loading ---------------------------------------------------------------------------

    def owner(self, layer_idx: int) -> int:
        """Every member holds its slice of every layer: this rank's own group rank."""
        return self.group.rank

    def owns(self, layer_idx: int) -> bool:
        """Always True: the loader reads this rank's slice of every layer."""
        return True

    def register(self, layer_idx: int, weight: torch.Tensor) -> None:
        """This rank's row-parallel slice `[H, D/N]` of layer `layer_idx` (a real tensor)."""
        where = self._check_register(layer_idx)
        if weight.dim() != 2 or weight.device.type == "meta":
            raise ValueError(f"{where}: the gather source keeps every rank's own slice, so pass "
                             f"the real 2-D [H, D/N] tensor (got {tuple(weight.shape)} on "
                             f"{weight.device.type})")
        self._registered[layer_idx] = weight.detach()

    def finalize(self, post_process: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 form: ResidentForm | None = None) -> None:
        """Collective over the group: post-process each own slice, keep it transposed (or in
        `form`), allocate the ring and gather layers start..start+k-1 into slots 0..k-1."""
        idx = self._check_registered()
        start, k = self._start, self.k
        self._device = self._device or self._registered[start].device
        self._check_same_plan()

        like: torch.Tensor | None = None
        for i in idx:
            raw = self._registered[i]
            out = raw if post_process is None else post_process(raw)
            if out.dim() != 2:
                raise ValueError(f"series {self.name!r}: post_process gave layer {i} "
                                 f"{tuple(out.shape)}; a slice must stay 2-D [H, D/N]")
            like = self._check_processed(i, out, like)
            out = out.to(self._device)
            self._kept[i] = out.t().contiguous() if form is None else form.pack(out)  # [D/N, H]
            self._registered[i] = self._kept[i]  # drop the raw copy now
            self._note_peak(raw, out)
            del raw, out
        self._registered = {}
        self._form = form
        first = self._kept[start]
        self._slice_bytes = first.numel() * first.element_size()
        G = self.group.size
        self._layer_bytes = G * self._slice_bytes
        self._init_ring()
        if self.group.group is not None:
            rows, hidden = like.shape[::-1]  # [D/N, H]
            self._slots = [torch.empty((G * rows, hidden), dtype=like.dtype, device=self._device)
                           for _ in range(k + 1)]
            for p in range(k):  # the warm ring: windows 0..k-1 hold the first k layers
                self._gather(start + p, p, sync=True)
                self._finalize_received += (G - 1) * self._slice_bytes
            self._note_peak()
        self._finalized = True

    # ---- forward ---------------------------------------------------------------------------

    def prefetch(self, layer_idx: int, full: bool = True) -> None:
        """Layer i begins (its QKV). full: a FlashComm2 step, gather layer start + ((i - start
        + k) mod L) into the next ring slot; not full: a row-parallel step, nothing moves."""
        self._check_prefetch(layer_idx)
        if self._pos == 0:
            self._full = bool(full)
        elif bool(full) != self._full:
            raise RuntimeError(self._mixed(layer_idx, full))
        self._pending = True
        if not full:
            return
        target, slot = self._turn_ring(layer_idx)
        if self.group.group is not None:
            self._gather(target, slot, sync=self.sync)
            self._fetches += 1
            moved = (self.group.size - 1) * self._slice_bytes  # a ring all-gather, each way
            self._bytes_received += moved
            self._bytes_sent += moved

    def wait(self, layer_idx: int, full: bool = True) -> torch.Tensor:
        """full: the gathered `[H, G*D/N]` weight of layer i, after waiting for its gather only;
        not full: this rank's resident `[H, D/N]` slice (no wait, no traffic)."""
        t0 = time.perf_counter()
        expected = self._begin_wait(layer_idx)
        if layer_idx != expected:
            raise RuntimeError(f"series {self.name!r}: wait(layer {layer_idx}) but the schedule "
                               f"expects wait(layer {expected}); layers are waited in order")
        if bool(full) != self._full:
            raise RuntimeError(self._mixed(layer_idx, full))
        self._end_wait()
        if self.group.group is None or not full:
            self._reads += full  # G = 1: the resident slice is the whole FlashComm2 weight
            return self.resident(layer_idx)
        slot = self._read_slot(layer_idx, "a skipped or extra FlashComm2 prefetch on this rank "
                               "shows up here")
        self._note_blocked(layer_idx, t0)
        return self._slots[slot].t()

    def stats(self) -> SeriesStats:
        """Counters of this rank; resident_bytes = L*|W|/G + (k+1)*|W| (L*|W| if G == 1);
        bytes_sent/received count a ring all-gather: (G-1)/G * |W| each per fetch;
        owned_layers = L (each a 1/G slice)."""
        return self._stats(sum(t.nbytes for t in [*self._kept.values(), *self._slots]))

    # ---- helpers ---------------------------------------------------------------------------

    def resident(self, layer_idx: int) -> torch.Tensor:
        """This rank's kept slice of layer i as the row path multiplies it: `[H, D/N]`."""
        kept = self._kept[layer_idx]
        return kept.t() if self._form is None else kept

    def _gather(self, layer_idx: int, slot: int, sync: bool) -> None:
        """All-gather the members' slices of `layer_idx` into ring slot `slot` (row block p =
        member p's slice); async works are kept for the slot's wait."""
        buf, g = self._slots[slot], self.group
        rows = buf.shape[0] // g.size
        kept = self._kept[layer_idx]
        mine = kept if self._form is None else self._form.unpack(kept).t()  # [D/N, H]
        if dist.get_backend(g.group) == "gloo":  # gloo: broadcasts beat its ring all-gather
            buf[g.rank * rows:(g.rank + 1) * rows].copy_(mine)
            works = [dist.broadcast(buf[p * rows:(p + 1) * rows], src=g.global_rank(p),
                                    group=g.group, async_op=True) for p in range(g.size)]
            if sync:
                for w in works:
                    w.wait()
                works = []
        else:
            work = dist.all_gather_into_tensor(buf, mine.contiguous(), group=g.group,
                                               async_op=not sync)
            works = [] if sync else [work]
        self._slot_work[slot] = works

    def _mixed(self, layer_idx: int, full: bool) -> str:
        kind = {True: "FlashComm2 (full)", False: "row-parallel"}
        return (f"series {self.name!r}: layer {layer_idx} asks for a {kind[bool(full)]} weight "
                f"in a step that began as {kind[self._full]}; a step takes one path for all "
                f"its layers (the path may change only at layer {self._start})")
