"""Where the o_proj op finds layer i's W_o at a step: one interface, one class per weight source.

The op decides the step's path from its token count T (see ops.py) and then asks the source:
- `prefetch(i, full)` when layer i starts (its QKV), `full` = this step takes FlashComm2;
- `wait(i, full)` in layer i's o_proj: `full` -> the FlashComm2 weight `[H, D/otp]` (the whole
  W_o at otp = 1); not full -> this rank's own row-parallel columns `[H, D/N]` (a view).
Every rank calls both in the same order with the same `full`, so ring collectives stay matched.

Sources:
- `ResidentWeights`: FlashComm2 without layer sharding; every layer's `[H, D/otp]` is resident,
  the row-parallel path reads a column view of it. No traffic.
- `OwnerRing`: O-Shard's owner source (`ShardedSeries`). A non-owner holds no slice of a layer,
  so the ring turns on every step, row-parallel steps included: decode steps pay the broadcast.
- `GatherRing`: shard_source=gather (`flashcomm.gathered.GatheredSeries`, whose prefetch/wait
  take `full` as they are): every rank keeps only its own `[H, D/N]` columns, what stock TP
  holds; FlashComm2 steps all-gather the odp group's `[H, D/otp]` into the ring, row-parallel
  steps read the resident slice and move no weight byte.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch

from flashcomm.gathered import GatheredSeries, ResidentForm
from flashcomm.sharding import ShardedSeries


class OProjWeights(Protocol):
    """The weight source of a model's attention o_proj series on one rank."""

    def prefetch(self, layer_idx: int, full: bool = True) -> None:
        """Layer i begins: start fetching what wait(i, full) will return (may do nothing)."""

    form: ResidentForm | None
    """The resident slices' packed form (GatherRing on CPU), else None: plain tensors."""

    @property
    def detached(self) -> bool:
        """Whether the source holds its own copies of the weights (packed or sliced), so the
        layers' weight parameters may be emptied."""

    @property
    def fetches(self) -> bool:
        """Whether prefetch may move weights (else the QKV layers skip the prefetch op)."""

    def wait(self, layer_idx: int, full: bool = True) -> torch.Tensor:
        """Layer i's `[H, D/otp]` weight (full) or this rank's `[H, D/N]` columns (not full)."""

    def row_gemm(self, layer_idx: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """After finalize: x -> x @ layer i's own columns^T for row-parallel steps, when those
        columns never change (None: the op asks wait(i, False) every step)."""


def own_columns(weight: torch.Tensor, offset: int, width: int) -> torch.Tensor:
    """This rank's row-parallel columns `[H, D/N]` of a `[H, D/otp]` weight, as a view."""
    return weight.narrow(1, offset, width)


class ResidentWeights:
    """Every layer's FlashComm2 weight stays resident; row-parallel steps read a column view."""

    form: ResidentForm | None = None
    """Plain tensors: nothing packed."""
    detached = False
    """The parameters are the weights."""
    fetches = False
    """Nothing to fetch: the QKV layers issue no prefetch."""

    def __init__(self, offset: int, width: int) -> None:
        """`offset`, `width`: this rank's D/N columns inside the `[H, D/otp]` weight."""
        self.offset, self.width = offset, width
        self.tensors: dict[int, torch.Tensor] = {}
        self.row_bytes = 0
        """Bytes of the packed row-parallel copies that row_gemm made."""

    def register(self, layer_idx: int, weight: torch.Tensor) -> None:
        """Record layer i's resident `[H, D/otp]` weight (the parameter's storage)."""
        if layer_idx in self.tensors:
            raise ValueError(f"o_proj of layer {layer_idx} registered twice")
        self.tensors[layer_idx] = weight

    def finalize(self) -> None:
        """Nothing to distribute: every rank loaded its own copy."""

    def prefetch(self, layer_idx: int, full: bool = True) -> None:
        """Nothing to fetch."""

    def wait(self, layer_idx: int, full: bool = True) -> torch.Tensor:
        """The resident weight, or a view of this rank's columns of it."""
        w = self.tensors[layer_idx]
        return w if full else own_columns(w, self.offset, self.width)

    def row_gemm(self, layer_idx: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """Layer i's own columns as vLLM's own CPU GEMM: a packed copy (|W|/odp more bytes, what
        stock holds) multiplies as fast as stock's at decode, a strided column view does not."""
        from flashcomm.vllm.ops import row_gemm

        cols = own_columns(self.tensors[layer_idx], self.offset, self.width)
        self.row_bytes += cols.numel() * cols.element_size()
        return row_gemm(cols)

    def resident_bytes(self) -> int:
        """Bytes of every layer's weight, plus the row-parallel copies if any."""
        return tensor_bytes(self.tensors.values()) + self.row_bytes

    def stats(self) -> dict[str, Any] | None:
        """No ring, no counters."""
        return None


class OwnerRing:
    """O-Shard's owner source: layer i lives on shard-group member i mod G and is broadcast into
    the ring for every step; row-parallel steps slice their columns out of the fetched weight."""

    form: ResidentForm | None = None
    """Plain tensors: nothing packed."""

    def __init__(self, series: ShardedSeries, offset: int, width: int) -> None:
        """`offset`, `width`: this rank's D/N columns inside the `[H, D/otp]` weight."""
        self.series, self.offset, self.width = series, offset, width

    detached = False
    """The series keeps the owners' parameters as its storage."""
    fetches = True
    """The ring turns on every step."""

    def register(self, layer_idx: int, weight: torch.Tensor) -> None:
        """Owners pass the real tensor, others a meta placeholder (see ShardedSeries)."""
        self.series.register(layer_idx, weight)

    def finalize(self) -> None:
        """Collective: one broadcast per layer, then the ring (see ShardedSeries.finalize)."""
        self.series.finalize()

    def prefetch(self, layer_idx: int, full: bool = True) -> None:
        """Broadcast layer i+k into the ring whatever the step: non-owners have no slice."""
        self.series.prefetch(layer_idx)

    def wait(self, layer_idx: int, full: bool = True) -> torch.Tensor:
        """Layer i's fetched weight, or a view of this rank's columns of it."""
        w = self.series.wait(layer_idx)
        return w if full else own_columns(w, self.offset, self.width)

    def row_gemm(self, layer_idx: int) -> None:
        """None: a non-owner's columns arrive with the ring on every step."""
        return None

    def resident_bytes(self) -> int:
        """Owned layers plus the k+1 ring slots."""
        return self.series.stats().resident_bytes

    def stats(self) -> dict[str, Any] | None:
        """The series counters (bytes moved, waits, blocked time)."""
        return self.series.stats().to_dict()


class GatherRing:
    """The gather source: this rank's resident `[H, D/N]` columns of every layer; a FlashComm2
    step all-gathers `[H, D/otp]` into the ring; a row-parallel step reads the slice, no traffic."""

    def __init__(self, series: GatheredSeries, form: ResidentForm | None = None) -> None:
        """`series`: the GatheredSeries on the odp group's fetch communicator; `form`: the
        resident slices' packed form (ops.onednn_form), None for plain `[D/N, H]`."""
        self.series, self.form = series, form

    fetches = True
    """FlashComm2 steps gather."""

    @property
    def detached(self) -> bool:
        """Packed slices are copies: the parameters are no longer read."""
        return self.form is not None

    def register(self, layer_idx: int, weight: torch.Tensor) -> None:
        """Layer i's own `[H, D/N]` columns, the parameter's storage (kept, not copied, when it
        is laid out `[D/N, H]` as GatheredSeries stores it; with a form, packed at finalize and
        the parameter emptied by the caller)."""
        self.series.register(layer_idx, weight)

    def finalize(self) -> None:
        """Collective over the odp group: pack the slices (if a form), allocate the ring,
        gather the first k layers."""
        self.series.finalize(form=self.form)

    def prefetch(self, layer_idx: int, full: bool = True) -> None:
        """FlashComm2 step: all-gather layer i+k into the ring; row-parallel step: nothing."""
        self.series.prefetch(layer_idx, full)

    def wait(self, layer_idx: int, full: bool = True) -> torch.Tensor:
        """The gathered `[H, D/otp]` weight (full) or the resident `[H, D/N]` slice."""
        return self.series.wait(layer_idx, full)

    def row_gemm(self, layer_idx: int) -> None:
        """None: every step, row-parallel ones included, goes through wait(), whose schedule
        checks keep the ring's slots matched to their layers."""
        return None

    def resident_bytes(self) -> int:
        """L * |W| / odp resident slices plus the k+1 ring slots of |W|."""
        return self.series.stats().resident_bytes

    def stats(self) -> dict[str, Any] | None:
        """The series counters (bytes gathered, fetches, waits, blocked time)."""
        return self.series.stats().to_dict()


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of `tensors`' elements (packed oneDNN tensors included, which have no storage)."""
    return sum(t.numel() * t.element_size() for t in tensors)
