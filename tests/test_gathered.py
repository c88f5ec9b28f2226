"""GatheredSeries on real gloo ranks: every FlashComm2 wait returns the group's columns of the full
W_o bit for bit and every row-parallel wait this rank's own columns, for N = 2 and 4, otp 1 and
2, start != 0, k = 0..L-2, over mixed schedules of FlashComm2 and row-parallel steps; the
counters (resident bytes, fetches, bytes moved) follow the formulas, misuse fails loudly."""

from __future__ import annotations

from datetime import timedelta
from functools import partial

import pytest
import series_helpers as sh
import torch
import torch.distributed as dist

from flashcomm.gathered import GatheredSeries, ResidentForm
from flashcomm.groups import GroupHandle, ParallelGroups
from flashcomm.launch import run_local
from flashcomm.layout import ParallelLayout

H, DN = 3, 2  # hidden size and D/N columns per rank: full W_o is [H, N*DN]
SCHEDULE = "FRRFFRF"  # F: a FlashComm2 step (ring), R: a row-parallel step (resident slice)


def _full(layer: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The whole W_o [H, N*DN] of `layer`, the same on every rank."""
    g = torch.Generator().manual_seed(1000 + layer)
    return torch.randn(H, n * DN, generator=g).to(dtype)


def _post(w: torch.Tensor) -> torch.Tensor:
    """A per-column-block post-process: an exact scale."""
    return w * 0.5


def _make(h: GroupHandle | dist.ProcessGroup | None, name: str, start: int, L: int, k: int,
          n: int, dtype: torch.dtype, sync: bool = False
          ) -> tuple[GatheredSeries, list[torch.Tensor]]:
    """A finalized series whose rank t holds columns t*DN.. of each layer (t = TP rank)."""
    t = dist.get_rank() % n
    s = GatheredSeries(name, h, k, sync=sync, layers=range(start, start + L))
    for i in range(start, start + L):
        s.register(i, _full(i, n, dtype)[:, t * DN:(t + 1) * DN].clone())
    return s, sh.finalize_recording(s, _post)


def _check_case(group: GroupHandle | dist.ProcessGroup | None, n: int, start: int, L: int,
                k: int, dtype: torch.dtype, sync: bool) -> list[str]:
    """One series through finalize and the mixed SCHEDULE; returns failure descriptions."""
    h = GroupHandle.of(group)
    G, t = h.size, dist.get_rank() % n
    tag = f"N={n} G={G} rank={dist.get_rank()} L={L} start={start} k={k} {dtype} sync={sync}"
    s, seen = _make(group, f"c{L}.{start}.{k}", start, L, k, n, dtype, sync)
    layers = range(start, start + L)
    bad: list[str] = []
    if [x.shape for x in seen] != [(H, DN)] * L:
        bad.append(f"{tag}: post_process saw {[tuple(x.shape) for x in seen]}")
    j = h.ranks[0] % n // G  # the group's first TP rank tells its column block
    fetch_counts = []
    for p, kind in enumerate(SCHEDULE):
        full = kind == "F"
        for i in layers:
            s.prefetch(i, full=full)
            w = s.wait(i, full=full)
            cols = slice(j * G * DN, (j + 1) * G * DN) if full else slice(t * DN, (t + 1) * DN)
            if not sh.same_bits(w, _post(_full(i, n, dtype)[:, cols])):
                bad.append(f"{tag}: step {p} ({kind}) wait({i}) returned other bits")
        fetch_counts.append(s.stats().fetches)
    st, slice_b = s.stats(), H * DN * torch.empty(0, dtype=dtype).element_size()
    W = G * slice_b
    full_steps = SCHEDULE.count("F")
    # the ring stays warm: each FlashComm2 step gathers exactly L layers, row steps none
    want = [L * SCHEDULE[:p + 1].count("F") for p in range(len(SCHEDULE))] if G > 1 else \
        [0] * len(SCHEDULE)
    if fetch_counts != want:
        bad.append(f"{tag}: fetches after each step {fetch_counts} != {want}")
    resident = L * slice_b + (k + 1) * W if G > 1 else L * W
    moved = full_steps * L * (G - 1) * slice_b
    got = (st.resident_bytes, st.bytes_received, st.bytes_sent, st.waits, st.layer_bytes,
           st.owned_layers, st.slots, st.finalize_bytes_received)
    exp = (resident, moved, moved, len(SCHEDULE) * L, W, L, k + 1 if G > 1 else 0,
           k * (G - 1) * slice_b)
    if got != exp:
        bad.append(f"{tag}: resident/recv/sent/waits/|W|/owned/slots/fin {got} != {exp}")
    if st.finalize_peak_bytes > resident + slice_b:
        bad.append(f"{tag}: finalize peak {st.finalize_peak_bytes} > {resident} + {slice_b}")
    if (s.start, s.num_layers) != (start, L) or len(s.blocked_wait_by_layer()) != L:
        bad.append(f"{tag}: start/L {s.start}/{s.num_layers}")
    return bad


def _sweep(h: GroupHandle | dist.ProcessGroup | None, n: int) -> tuple[int, list[str]]:
    """Every L in 2..5, start in STARTS and k in 0..L-2 on one gather group (any spelling)."""
    return sh.sweep(5, _check_case, h, n)


def _misuse(h: GroupHandle, n: int) -> dict[str, str]:
    """Every rank makes the same mistake, so errors are local and no collective diverges."""
    out: dict[str, str] = {}
    w = torch.zeros(H, DN)
    s = GatheredSeries("meta", h, 0)
    out["meta"] = sh.error_of(lambda: s.register(0, torch.empty(H, DN, device="meta")))
    s.register(4, w)
    out["duplicate"] = sh.error_of(lambda: s.register(4, w))
    mtp = GatheredSeries("mtp", h, 1, layers=range(3, 7))
    out["mtp"] = sh.error_of(lambda: mtp.register(7, w))
    out["k"] = sh.error_of(lambda: GatheredSeries("k", h, 3, layers=range(0, 4)))
    s = GatheredSeries("gap", h, 0)
    for i in (3, 4, 6):
        s.register(i, w)
    out["gap"] = sh.error_of(s.finalize)
    out["early"] = sh.error_of(lambda: s.prefetch(3))

    s, _ = _make(h, "order", 5, 4, 1, n, torch.float32)
    s.prefetch(5, full=True)
    out["out_of_order"] = sh.error_of(lambda: s.wait(6))
    out["double_prefetch"] = sh.error_of(lambda: s.prefetch(6))
    out["kind_at_wait"] = sh.error_of(lambda: s.wait(5, full=False))
    s.wait(5)
    out["mixed_step"] = sh.error_of(lambda: s.prefetch(6, full=False))
    for i in (6, 7, 8):  # the rest of the FlashComm2 pass, then a row-parallel one is fine
        s.prefetch(i)
        s.wait(i)
    s.prefetch(5, full=False)
    out["recovered"] = str(s.wait(5, full=False).shape == (H, DN))
    out["wait_before_prefetch"] = sh.error_of(lambda: s.wait(6, full=False))

    s = GatheredSeries("plan", h, 0)  # ranks disagree on the start: caught before any gather
    for i in range(h.rank, h.rank + 3):
        s.register(i, w)
    out["plan"] = sh.error_of(s.finalize)
    return out


def _packed(h: GroupHandle, n: int) -> list[str]:
    """A ResidentForm (here an exact x4 'layout'): row-parallel waits return the packed slice as
    it is, FlashComm2 waits the plain gathered columns (each rank unpacks its own), and the
    resident bytes stay the formula's."""
    form = ResidentForm(pack=lambda w: (w * 4).contiguous(), unpack=lambda p: p / 4)
    t, L, k, bad = dist.get_rank() % n, 3, 1, []
    s = GatheredSeries("packed", h, k, layers=range(2, 2 + L))
    for i in range(2, 2 + L):
        s.register(i, _full(i, n, torch.float32)[:, t * DN:(t + 1) * DN].clone())
    s.finalize(_post, form=form)
    for kind in "FRRF":
        for i in range(2, 2 + L):
            s.prefetch(i, full=kind == "F")
            w = _post(_full(i, n, torch.float32))
            want = w if kind == "F" else 4 * w[:, t * DN:(t + 1) * DN]
            if not sh.same_bits(s.wait(i, full=kind == "F"), want):
                bad.append(f"rank {dist.get_rank()} {kind} wait({i}) returned other bits")
    slice_b = H * DN * 4
    if s.stats().resident_bytes != L * slice_b + (k + 1) * n * slice_b:
        bad.append(f"resident bytes {s.stats().resident_bytes}")
    return bad


def _parallel_groups(rank: int, world: int) -> list[str]:
    """ParallelGroups.fetch: the odp ranks, the o_proj shard group itself when they agree."""
    layouts = [ParallelLayout(tp=world, otp=1)]
    if world == 4:
        layouts += [ParallelLayout(tp=4, otp=2), ParallelLayout(tp=2, dp=2, otp=1)]
    bad = []
    for lay in layouts:
        g = ParallelGroups.build(lay, shard_weights=("o_proj",))
        assert g.fetch is not None and g.odp is not None
        shared = lay.shard_groups("o_proj") == sorted(lay.odp_groups())
        if g.fetch.ranks != g.odp.ranks or (g.fetch is g.shard["o_proj"]) != shared:
            bad.append(f"{lay}: fetch {g.fetch.ranks} odp {g.odp.ranks} shared={shared}")
        n = lay.tp
        s, _ = _make(g.fetch, "pg", 2, 3, 1, n, torch.float32)
        j = lay.coords(rank).tp // lay.odp
        for i in range(2, 5):
            s.prefetch(i)
            cols = slice(j * lay.odp * DN, (j + 1) * lay.odp * DN)
            if not sh.same_bits(s.wait(i), _post(_full(i, n, torch.float32)[:, cols])):
                bad.append(f"{lay}: rank {rank} layer {i} wrong through ParallelGroups.fetch")
        if ParallelGroups.build(lay, shard_weights=()).fetch is not None:
            bad.append(f"{lay}: fetch built without a layer-sharded o_proj")
    return bad


def _world_worker(rank: int, world: int) -> dict[str, object]:
    full = sh.new_handle(list(range(world)))
    assert full is not None
    sweeps = {f"N={world} otp=1": _sweep(full, world),
              f"N={world} otp=1, None = the world": _sweep(None, world)}
    if world == 4:  # otp = 2: two odp groups of 2 (plain torch groups) gather concurrently
        pairs = [dist.new_group(r, timeout=timedelta(seconds=30)) for r in ([0, 1], [2, 3])]
        sweeps["N=4 otp=2"] = _sweep(pairs[rank // 2], world)
    return {"sweeps": sweeps, "groups": _parallel_groups(rank, world),
            "packed": _packed(full, world),
            "misuse": _misuse(full, world)}


@pytest.mark.parametrize("world", [2, 4])
def test_gathered_series(world: int) -> None:
    results = run_local(_world_worker, world, timeout_s=300, group_timeout_s=60)
    for rank, res in enumerate(results):
        sh.assert_sweeps_passed(res["sweeps"], rank, 5)
        assert not res["groups"], res["groups"]
        assert not res["packed"], res["packed"]
        m = res["misuse"]
        assert "pass the real 2-D [H, D/N] tensor" in m["meta"], m["meta"]
        assert "layer 4 is already registered" in m["duplicate"]
        assert "outside this stage's layers 3..6" in m["mtp"]
        assert "prefetch_step k=3 must satisfy 0 <= k <= L-2 = 2" in m["k"]
        assert "consecutive" in m["gap"] and "[5]" in m["gap"]
        assert "prefetch before finalize()" in m["early"]
        assert "expects wait(layer 5)" in m["out_of_order"]
        assert "expects wait(layer 5) first" in m["double_prefetch"]
        for key in ("kind_at_wait", "mixed_step"):
            assert "began as FlashComm2 (full)" in m[key] and "one path" in m[key], m[key]
        assert m["recovered"] == "True"
        assert "wait(layer 6) before prefetch(layer 6)" in m["wait_before_prefetch"]
        assert "disagree" in m["plan"] and "rank 1: start=1" in m["plan"]


def test_single_rank_group_keeps_every_layer() -> None:
    """G = 1: no ring, the resident slice is the whole weight, nothing moves."""
    one = GroupHandle(None, (0,), 0)
    s = GatheredSeries("x", one, 1)
    for i in range(3, 7):
        s.register(i, _full(i, 1, torch.float32))
    s.finalize()
    for kind in "FRF":
        for i in range(3, 7):
            s.prefetch(i, full=kind == "F")
            assert torch.equal(s.wait(i, full=kind == "F"), _full(i, 1, torch.float32))
    st = s.stats()
    assert (st.resident_bytes, st.slots, st.fetches, st.bytes_received) == (4 * H * DN * 4, 0,
                                                                             0, 0)
    with pytest.raises(ValueError, match="k=1 must satisfy 0 <= k <= L-2 = 0"):
        GatheredSeries("x", one, 1, layers=range(5, 7))


def test_prefetch_skipped_on_one_rank_fails_within_group_timeout() -> None:
    sh.check_skipped_prefetch_fails_fast(
        partial(_make, name="o_proj", start=59, L=5, k=2, n=2, dtype=torch.float32))
