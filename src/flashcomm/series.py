"""The schedule both sources of a layer-sharded weight share: `LayerSeries`, its stats and the
prefetch target.

Schedule (DESIGN.md section 3), with positions p = i - start in 0..L-1 and k = prefetch step:
prefetch(i) fetches layer `start + ((p + k) mod L)` into the next ring slot (wrapping into the
next forward pass); wait(i) returns layer i from its slot. The m-th prefetch writes slot
(m + k) mod (k+1) and the m-th wait reads slot m mod (k+1), so the slot a prefetch overwrites is
the one the previous layer read. Calls must alternate prefetch(i), wait(i), prefetch(i+1), ...
cyclically; anything else raises before any collective. LayerSeries holds that schedule, the
ring's slot tags, the cross-rank plan check and the counters; ShardedSeries (the owner source,
sharding.py) and GatheredSeries (the gather source, gathered.py) only differ in what they store
and how a slot is filled.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from flashcomm.groups import GroupHandle


@dataclass(frozen=True)
class SeriesStats:
    """Memory and traffic counters of one series on this rank."""

    resident_bytes: int
    """Bytes held after finalize: (owned + slots) * layer_bytes, see ShardedSeries.stats."""
    bytes_received: int
    """Bytes this rank received into its ring slots (prefetches only)."""
    bytes_sent: int
    """Bytes this rank broadcast as the owner (prefetches only, counted once per broadcast)."""
    fetches: int
    """Ring broadcasts this rank took part in (as sender or receiver)."""
    waits: int
    """Calls to wait()."""
    blocked_wait_s: float
    """Host seconds spent inside wait() (CUDA: host time only, the GPU stall is not included)."""
    layer_bytes: int
    """|W|: bytes of one post-processed layer."""
    owned_layers: int
    """Layers stored on this rank (i mod G == group rank)."""
    slots: int
    """Ring buffers allocated on this rank (k+1, or 0 for a one-rank group)."""
    finalize_peak_bytes: int
    """Most bytes held by the series (registered, kept, ring and in-flight tensors) in finalize."""
    finalize_bytes_received: int
    """Bytes received during finalize's one-broadcast-per-layer pass."""

    def to_dict(self) -> dict[str, float | int]:
        """JSON-ready fields."""
        return asdict(self)


def prefetch_target(layer_idx: int, start: int, num_layers: int, k: int) -> int:
    """Layer that prefetch(layer_idx) fetches: start + ((i - start + k) mod L)."""
    return start + (layer_idx - start + k) % num_layers


def storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct real storages behind `tensors` (meta and None count zero)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        if t.is_mkldnn:  # an opaque packed layout (oneDNN) has no storage to share
            seen[("opaque", id(t))] = t.numel() * t.element_size()
            continue
        s = t.untyped_storage()
        seen[(str(t.device), s.data_ptr())] = s.nbytes()
    return sum(seen.values())


class LayerSeries:
    """What both sources of a layer-sharded weight share: argument and registration checks, the
    prefetch(i)/wait(i) schedule, the ring's slot tags and in-flight works, the cross-rank plan
    check and the SeriesStats counters. Subclasses fill `_kept`, the ring and its slots."""

    _PLAN_WORDS = ("shard group", "name/shape/dtype/start/L/k")
    """How the plan-mismatch error names the group and what its ranks must agree on."""

    def __init__(self, name: str, group: GroupHandle | dist.ProcessGroup | None,
                 prefetch_step: int, *, sync: bool = False, layers: range | None = None,
                 device: torch.device | str | None = None) -> None:
        """`group`: our GroupHandle, a plain torch ProcessGroup or None (the world); `layers`, if
        given, is the exact index range this stage must register (rejects draft/MTP layers);
        `device` holds the ring."""
        if not isinstance(prefetch_step, int) or prefetch_step < 0:
            raise ValueError(f"series {name!r}: prefetch_step={prefetch_step!r} must be an "
                             f"int >= 0")
        if layers is not None:
            if layers.step != 1 or len(layers) == 0 or layers.start < 0:
                raise ValueError(f"series {name!r}: layers={layers} must be a non-empty range "
                                 f"of consecutive indices >= 0")
            self._check_k(prefetch_step, len(layers), name)
        self.name, self.k, self.sync = name, prefetch_step, sync
        self.group = GroupHandle.of(group)
        self._layers = layers
        self._device = None if device is None else torch.device(device)
        self._registered: dict[int, torch.Tensor] = {}
        self._finalized = False
        self._start = self._num_layers = 0
        self._slots: list[torch.Tensor] = []
        self._slot_layer: list[int | None] = []  # tag: which layer each slot holds (or will hold)
        self._slot_work: list[list[dist.Work]] = []  # in-flight collectives into each slot
        self._pos = 0  # position (0..L-1) of the next layer to prefetch
        self._pending = False  # prefetch(start + pos) done, its wait not yet
        self._writes = self._reads = 0  # ring prefetches (m) / ring reads
        self._kept: dict[int, torch.Tensor] = {}  # owned layers, or resident slices
        self._fetches = self._waits = self._bytes_received = self._bytes_sent = 0
        self._blocked_s = 0.0
        self._blocked_by_pos: list[float] = []
        self._layer_bytes = self._peak = self._finalize_received = 0

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

    # ---- checks shared by register and finalize --------------------------------------------

    def _check_register(self, layer_idx: int) -> str:
        """Raise unless `layer_idx` may be registered now; the error prefix for further checks."""
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
        return where

    def _check_registered(self) -> list[int]:
        """finalize's local checks (consecutive layers, the stage's range, k, one shape/dtype);
        sets start and L and returns the sorted layer indices."""
        if self._finalized:
            raise RuntimeError(f"series {self.name!r}: finalize() called twice")
        idx = sorted(self._registered)
        if not idx:
            raise ValueError(f"series {self.name!r}: finalize() with no registered layers")
        start, L = idx[0], len(idx)
        if idx[-1] - start + 1 != L:
            missing = sorted(set(range(start, idx[-1] + 1)) - set(idx))
            raise ValueError(f"series {self.name!r}: layer indices must be consecutive; "
                             f"registered {start}..{idx[-1]} misses {missing}")
        if self._layers is not None and (start, L) != (self._layers.start, len(self._layers)):
            raise ValueError(f"series {self.name!r}: registered {start}..{idx[-1]} but the stage "
                             f"has layers {self._layers.start}..{self._layers.stop - 1}")
        self._check_k(self.k, L, self.name)
        shapes = {(tuple(w.shape), w.dtype) for w in self._registered.values()}
        if len(shapes) != 1:
            raise ValueError(f"series {self.name!r}: layers differ in shape/dtype: {shapes}")
        self._start, self._num_layers = start, L
        return idx

    @staticmethod
    def _check_k(k: int, num_layers: int, name: str) -> None:
        if not 0 <= k <= num_layers - 2:
            raise ValueError(f"series {name!r}: prefetch_step k={k} must satisfy 0 <= k <= L-2 = "
                             f"{num_layers - 2} for L={num_layers} layers"
                             + (" (a series needs L >= 2)" if num_layers < 2 else ""))

    def _check_same_plan(self) -> None:
        """All-gather (start, L, k, name/shape/dtype) so diverging ranks fail here, not hang."""
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
            group, what = self._PLAN_WORDS
            raise RuntimeError(f"series {self.name!r}: ranks of the {group} disagree on the "
                               f"series ({what}): {rows}")

    def _check_processed(self, layer_idx: int, out: torch.Tensor,
                         like: torch.Tensor | None) -> torch.Tensor:
        """Every post-processed layer must match the first in shape and dtype (ring buffers)."""
        if like is not None and (out.shape, out.dtype) != (like.shape, like.dtype):
            raise ValueError(f"series {self.name!r}: post_process gave layer {layer_idx} "
                             f"{tuple(out.shape)} {out.dtype}, the first layer "
                             f"{tuple(like.shape)} {like.dtype}")
        self._layer_bytes = out.numel() * out.element_size()
        return like if like is not None else torch.empty_like(out, device="meta")

    def _need_finalized(self, what: str) -> None:
        if not self._finalized:
            raise RuntimeError(f"series {self.name!r}: {what} before finalize()")

    # ---- the schedule and the ring ----------------------------------------------------------

    def _check_prefetch(self, layer_idx: int) -> None:
        """Raise unless prefetch(layer_idx) is the schedule's next call (the caller then sets
        `_pending`: its wait is the next call)."""
        self._need_finalized("prefetch")
        expected = self._start + self._pos
        if layer_idx != expected or self._pending:
            raise RuntimeError(
                f"series {self.name!r}: prefetch(layer {layer_idx}) but the schedule expects "
                + (f"wait(layer {expected}) first" if self._pending
                   else f"prefetch(layer {expected})")
                + "; every rank must call prefetch(i), wait(i) for i = start..start+L-1 in order")

    def _turn_ring(self, layer_idx: int) -> tuple[int, int]:
        """The ring's next write: (layer to fetch, slot to fetch it into), tagged in the slot."""
        target = prefetch_target(layer_idx, self._start, self._num_layers, self.k)
        slot = (self._writes + self.k) % (self.k + 1)
        self._writes += 1
        self._slot_layer[slot] = target
        return target, slot

    def _begin_wait(self, layer_idx: int) -> int:
        """Raise if wait(layer_idx) has no pending prefetch; the layer the schedule expects."""
        self._need_finalized("wait")
        expected = self._start + self._pos
        if not self._pending:
            raise RuntimeError(
                f"series {self.name!r}: wait(layer {layer_idx}) before prefetch(layer "
                f"{expected}); call prefetch(i) when layer i starts, on every rank")
        return expected

    def _end_wait(self) -> None:
        """The pending wait is done: the schedule moves to the next layer."""
        self._pending = False
        self._pos = (self._pos + 1) % self._num_layers
        self._waits += 1

    def _read_slot(self, layer_idx: int, hint: str) -> int:
        """The ring's next read: check its tag is `layer_idx` (else raise with `hint`), join its
        in-flight collectives on the current stream and return the slot."""
        slot = self._reads % (self.k + 1)
        held = self._slot_layer[slot]
        if held != layer_idx:
            raise RuntimeError(f"series {self.name!r}: wait(layer {layer_idx}) but ring slot "
                               f"{slot} holds layer {held}; {hint}")
        self._reads += 1
        works, self._slot_work[slot] = self._slot_work[slot], []
        for w in works:
            w.wait()  # NCCL: the current stream waits, the CPU does not
        return slot

    def _init_ring(self) -> None:
        """Slot tags after finalize (slots 0..k-1 hold layers start..start+k-1), no work."""
        self._slot_layer = [self._start + p if p < self.k else None for p in range(self.k + 1)]
        self._slot_work = [[] for _ in range(self.k + 1)]
        self._blocked_by_pos = [0.0] * self._num_layers

    # ---- counters ---------------------------------------------------------------------------

    def blocked_wait_by_layer(self) -> list[float]:
        """Host seconds blocked in ring waits, per layer position 0..L-1, since finalize."""
        self._need_finalized("blocked_wait_by_layer")
        return list(self._blocked_by_pos)

    def _note_blocked(self, layer_idx: int, t0: float) -> None:
        dt = time.perf_counter() - t0
        self._blocked_s += dt
        self._blocked_by_pos[layer_idx - self._start] += dt

    def _note_peak(self, *transient: torch.Tensor) -> None:
        held = [*self._registered.values(), *self._kept.values(), *self._slots, *transient]
        self._peak = max(self._peak, storage_bytes(held))

    def _stats(self, resident_bytes: int) -> SeriesStats:
        """SeriesStats: the subclass's resident bytes, the shared counters."""
        self._need_finalized("stats")
        return SeriesStats(
            resident_bytes=resident_bytes, bytes_received=self._bytes_received,
            bytes_sent=self._bytes_sent, fetches=self._fetches, waits=self._waits,
            blocked_wait_s=self._blocked_s, layer_bytes=self._layer_bytes,
            owned_layers=len(self._kept), slots=len(self._slots),
            finalize_peak_bytes=self._peak, finalize_bytes_received=self._finalize_received)
