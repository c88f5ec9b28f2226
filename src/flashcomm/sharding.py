"""Layer-sharded weight series (O-Shard): each layer's copy of a replicated weight lives on one
rank of its shard group and is fetched just in time into a ring of k+1 buffers.

Schedule (DESIGN.md section 3), with positions p = i - start in 0..L-1 and k = prefetch step:
- layer i is owned by group member `i mod G` (absolute index, so PP stages agree on ownership);
- finalize() broadcasts every layer once from its owner, runs post_process on every rank, keeps
  the owned layers and pre-fills ring slots 0..k-1 with layers start..start+k-1;
- prefetch(i) broadcasts layer `start + ((p + k) mod L)` into the next ring slot (wrapping into
  the next forward pass); wait(i) returns layer i from its slot, or the owner's own copy.

The m-th prefetch writes slot (m + k) mod (k+1) and the m-th wait reads slot m mod (k+1), so the
slot a prefetch overwrites is the one the previous layer read. Calls must alternate
prefetch(i), wait(i), prefetch(i+1), ... cyclically; anything else raises before any collective.
series.LayerSeries holds that schedule, the ring's slot tags and the counters; ShardedSeries (the
owner source, here) and GatheredSeries (the gather source, gathered.py) only differ in what they
store and how a slot is filled.

CUDA/NCCL: the ring buffers are allocated once and never freed, so nothing relies on
`record_stream`. ProcessGroupNCCL makes its stream wait on the *current* stream when a collective
is issued, so the next broadcast into a slot is ordered after every kernel already enqueued on the
current stream, including the previous layer's o_proj that read that slot. `Work.wait()` makes
the current stream wait on the broadcast without blocking the CPU. Compute that reads a slot on
another stream must be joined to the current stream before the next prefetch. `sync=True` issues
blocking collectives and keeps no handles across calls, for CUDA-graph capture.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from flashcomm.series import LayerSeries, SeriesStats, storage_bytes


class ShardedSeries(LayerSeries):
    """One weight name across the L consecutive layers of a stage, sharded over a shard group.

    Resident bytes per rank after finalize are `(owned + k + 1) * |W|`, owned = #{i : i mod G ==
    group rank}; a one-rank group keeps every layer and no ring: `L * |W|`. Owners keep their
    idle ring slot rather than share it, so the figure does not depend on the schedule.
    `device` (default: the device of owned weights) holds the ring."""

    def owner(self, layer_idx: int) -> int:
        """Group rank that stores layer `layer_idx`."""
        return layer_idx % self.group.size

    def owns(self, layer_idx: int) -> bool:
        """Whether this rank stores layer `layer_idx` (the loader reads it only then)."""
        return self.owner(layer_idx) == self.group.rank

    def register(self, layer_idx: int, weight: torch.Tensor) -> None:
        """Owners pass the real tensor, others a placeholder of the right shape/dtype (meta)."""
        where = self._check_register(layer_idx)
        if self.owns(layer_idx):
            if weight.device.type == "meta":
                raise ValueError(f"{where}: this rank owns the layer (i mod G = "
                                 f"{self.owner(layer_idx)}) and must pass the real tensor")
            self._registered[layer_idx] = weight.detach()
        else:  # keep only shape/dtype: non-owners never hold a copy outside the ring
            self._registered[layer_idx] = torch.empty_like(weight, device="meta")

    def finalize(self, post_process: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Collective over the group: broadcast each layer from its owner, post-process it on
        every rank, keep owned layers and pre-fill ring slots 0..k-1."""
        idx = self._check_registered()
        start, k = self._start, self.k
        self._device = self._device or self._default_device()
        self._check_same_plan()

        pg = self.group.group
        self._slots = [None] * k  # type: ignore[list-item]  # windows 0..k-1, None if owned
        like: torch.Tensor | None = None
        for i in idx:  # one broadcast per layer, so post_process sees the real data everywhere
            raw = self._registered[i]
            if raw.device.type == "meta":
                raw = torch.empty_like(raw, device=self._device)
                self._finalize_received += raw.numel() * raw.element_size()
            if pg is not None:
                dist.broadcast(raw, src=self.group.global_rank(self.owner(i)), group=pg)
            out = raw if post_process is None else post_process(raw)
            out = out.contiguous()  # broadcasts need dense buffers, so every copy is contiguous
            like = self._check_processed(i, out, like)
            self._note_peak(raw, out)
            if self.owns(i):
                self._kept[i] = out
                self._registered[i] = out  # drop the raw copy now, not at the end
            elif i - start < k:
                self._slots[i - start] = out
            del raw, out
        self._registered = {}

        if self.group.size > 1:  # the ring: k+1 real buffers, also where an owner reads its own
            self._slots.append(None)  # type: ignore[arg-type]
            self._slots = [torch.empty_like(like, device=self._device) if s is None else s
                           for s in self._slots]
            self._note_peak()
        else:
            self._slots = []
        self._init_ring()
        self._finalized = True

    def prefetch(self, layer_idx: int, full: bool = True) -> None:
        """Layer i begins (its QKV): start broadcasting layer start + ((i - start + k) mod L).
        `full` (GatheredSeries' per-step path) is ignored: the owner ring turns on every step."""
        self._check_prefetch(layer_idx)
        self._pending = True
        target, slot = self._turn_ring(layer_idx)
        if self.group.group is None:
            return
        # NCCL orders this after the o_proj that last read `slot` (enqueued on the current stream)
        buf = self._kept[target] if self.owns(target) else self._slots[slot]
        work = dist.broadcast(buf, src=self.group.global_rank(self.owner(target)),
                              group=self.group.group, async_op=not self.sync)
        self._slot_work[slot] = [] if self.sync else [work]
        self._fetches += 1
        nbytes = buf.numel() * buf.element_size()
        if self.owns(target):
            self._bytes_sent += nbytes
        else:
            self._bytes_received += nbytes

    def wait(self, layer_idx: int, full: bool = True) -> torch.Tensor:
        """The post-processed weight of layer i; waits only for that layer's broadcast (`full`
        is ignored: a row-parallel step slices its own columns out of it)."""
        t0 = time.perf_counter()
        self._begin_wait(layer_idx)
        slot = self._read_slot(layer_idx, "layers must be waited in order start..start+L-1, "
                               "each after its prefetch (a skipped or extra prefetch on this "
                               "rank also shows up here)")
        self._end_wait()
        self._note_blocked(layer_idx, t0)
        if layer_idx in self._kept:
            return self._kept[layer_idx]
        return self._slots[slot]

    def stats(self) -> SeriesStats:
        """Counters of this rank; resident_bytes = (owned + k + 1) * |W| (L * |W| if G == 1)."""
        return self._stats(storage_bytes([*self._kept.values(), *self._slots]))

    def _default_device(self) -> torch.device:
        real = [w for w in self._registered.values() if w.device.type != "meta"]
        if real:
            return real[0].device
        if self.group.group is not None and dist.get_backend(self.group.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())  # CUDA-only
        return torch.device("cpu")
