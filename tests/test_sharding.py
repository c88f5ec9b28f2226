"""ShardedSeries on real gloo ranks: every wait returns the owner's weight bit for bit, for every
L, G, start and k, over three forward passes; memory, traffic and misuse are checked too."""

from __future__ import annotations

from datetime import timedelta
from functools import partial

import pytest
import series_helpers as sh
import torch
import torch.distributed as dist

from flashcomm.groups import GroupHandle
from flashcomm.launch import run_local
from flashcomm.series import prefetch_target
from flashcomm.sharding import ShardedSeries

PASSES = 3


def _weight(layer: int, dtype: torch.dtype) -> torch.Tensor:
    """The raw weight of `layer`, the same on every rank: [3, 5]."""
    g = torch.Generator().manual_seed(1000 + layer)
    return torch.randn(3, 5, generator=g).to(dtype)


def _post(w: torch.Tensor) -> torch.Tensor:
    """A repacking stand-in: [3, 5] -> [5, 3], scaled exactly."""
    return (w.t() * 0.5).contiguous()


def _make(handle: GroupHandle | dist.ProcessGroup | None, name: str, start: int, L: int, k: int,
          dtype: torch.dtype, sync: bool = False) -> tuple[ShardedSeries, list[torch.Tensor]]:
    """A finalized series over layers start..start+L-1 and the post_process inputs it saw."""
    s = ShardedSeries(name, handle, k, sync=sync, layers=range(start, start + L))
    for i in range(start, start + L):
        w = _weight(i, dtype)
        s.register(i, w if s.owns(i) else torch.empty_like(w, device="meta"))
    return s, sh.finalize_recording(s, _post)


def _check_case(group: GroupHandle | dist.ProcessGroup | None, start: int, L: int, k: int,
                dtype: torch.dtype, sync: bool) -> list[str]:
    """One series through finalize and three passes; returns failure descriptions."""
    handle = GroupHandle.of(group)
    tag = f"G={handle.size} rank={handle.rank} L={L} start={start} k={k} {dtype} sync={sync}"
    s, seen = _make(group, f"case{L}.{start}.{k}", start, L, k, dtype, sync)
    bad: list[str] = []
    layers = range(start, start + L)
    if len(seen) != L or not all(sh.same_bits(x, _weight(i, dtype))
                                 for x, i in zip(seen, layers, strict=False)):
        bad.append(f"{tag}: post_process saw {len(seen)} inputs, not the {L} real layers")
    for p in range(PASSES):
        for i in layers:
            s.prefetch(i)
            w = s.wait(i)
            if not sh.same_bits(w, _post(_weight(i, dtype))):
                bad.append(f"{tag}: pass {p} wait({i}) returned other bits")
    st = s.stats()
    G, W = handle.size, st.layer_bytes
    owned = sum(1 for i in layers if i % G == handle.rank)
    expect = (owned + k + 1) * W if G > 1 else L * W
    if W != 15 * torch.empty(0, dtype=dtype).element_size() or st.resident_bytes != expect:
        bad.append(f"{tag}: resident {st.resident_bytes} != (owned {owned} + k + 1) * {W}")
    if st.finalize_peak_bytes > expect + W:
        bad.append(f"{tag}: finalize peak {st.finalize_peak_bytes} > resident {expect} + {W}")
    fetches = PASSES * L if G > 1 else 0
    received = PASSES * (L - owned) * W if G > 1 else 0
    if (st.fetches, st.bytes_received, st.waits) != (fetches, received, PASSES * L):
        bad.append(f"{tag}: fetches/bytes/waits {st.fetches}/{st.bytes_received}/{st.waits} "
                   f"!= {fetches}/{received}/{PASSES * L}")
    if (s.start, s.num_layers, st.owned_layers) != (start, L, owned):
        bad.append(f"{tag}: start/L/owned {s.start}/{s.num_layers}/{st.owned_layers}")
    return bad


def _sweep(handle: GroupHandle) -> tuple[int, list[str]]:
    """Every L in 2..9, start in STARTS and k in 0..L-2 on one group."""
    return sh.sweep(9, _check_case, handle)


def _two_series_at_once(full: GroupHandle, sub: GroupHandle | None) -> list[str]:
    """o_proj on the full group and q_b_proj on a subgroup, prefetched in the same layer loop."""
    a, _ = _make(full, "o_proj", 3, 5, 1, torch.float32)
    b = _make(sub, "q_b_proj", 3, 5, 2, torch.bfloat16)[0] if sub is not None else None
    bad = []
    for _ in range(PASSES):
        for i in range(3, 8):
            a.prefetch(i)
            if b is not None:
                b.prefetch(i)
                if not sh.same_bits(b.wait(i), _post(_weight(i, torch.bfloat16))):
                    bad.append(f"q_b_proj layer {i} wrong on rank {dist.get_rank()}")
            if not sh.same_bits(a.wait(i), _post(_weight(i, torch.float32))):
                bad.append(f"o_proj layer {i} wrong on rank {dist.get_rank()}")
    return bad


def _misuse(h: GroupHandle) -> dict[str, str]:
    """Every rank makes the same mistake, so errors are local and no collective diverges."""
    out: dict[str, str] = {}
    meta = torch.empty(3, 5, device="meta")

    def reg(s: ShardedSeries, i: int) -> None:
        s.register(i, _weight(i, torch.float32) if s.owns(i) else meta)

    s = ShardedSeries("dup", h, 0)
    reg(s, 4)
    out["duplicate"] = sh.error_of(lambda: reg(s, 4))
    s = ShardedSeries("mtp", h, 1, layers=range(3, 7))
    out["mtp"] = sh.error_of(lambda: reg(s, 7))
    s = ShardedSeries("gap", h, 0)
    for i in (3, 4, 6):
        reg(s, i)
    out["gap"] = sh.error_of(s.finalize)
    out["k_init"] = sh.error_of(lambda: ShardedSeries("k", h, 3, layers=range(0, 4)))
    out["k_neg"] = sh.error_of(lambda: ShardedSeries("k", h, -1))
    s = ShardedSeries("kfin", h, 3)
    for i in range(4):
        reg(s, i)
    out["k_finalize"] = sh.error_of(s.finalize)
    out["wait_early"] = sh.error_of(lambda: s.wait(0))
    out["owner_meta"] = sh.error_of(lambda: ShardedSeries("m", h, 0).register(h.rank, meta))

    s, _ = _make(h, "order", 5, 4, 1, torch.float32)
    s.prefetch(5)
    out["out_of_order"] = sh.error_of(lambda: s.wait(6))
    out["double_prefetch"] = sh.error_of(lambda: s.prefetch(6))
    ok = sh.same_bits(s.wait(5), _post(_weight(5, torch.float32)))  # still usable after errors
    out["wait_before_prefetch"] = sh.error_of(lambda: s.wait(6))
    out["recovered"] = str(ok)

    s = ShardedSeries("plan", h, 0)  # ranks disagree on the start: caught before any broadcast
    for i in range(h.rank, h.rank + 3):
        s.register(i, _weight(i, torch.float32) if s.owns(i) else meta)
    out["plan"] = sh.error_of(s.finalize)
    return out


def _plain_groups(rank: int, world: int) -> dict[str, object]:
    """The series on torch's own groups: None (the world), the WORLD group and a subgroup of the
    ranks 1.. whose group ranks differ from the global ones (one rank alone when world = 2)."""
    sub_ranks = list(range(1, world))
    sub = dist.new_group(sub_ranks, timeout=timedelta(seconds=30))  # every rank creates it
    out: dict[str, object] = {
        "none": _check_case(None, 3, 4, 1, torch.float32, sync=False),
        "world": _check_case(dist.group.WORLD, 59, 5, 2, torch.bfloat16, sync=True),
        "handle": [(h.ranks, h.rank) for h in map(GroupHandle.of, (None, dist.group.WORLD))],
    }
    if rank in sub_ranks:
        out["sub"] = _check_case(sub, 0, 3, 1, torch.float32, sync=False)
        h = GroupHandle.of(sub)
        out["sub_handle"] = (h.ranks, h.rank, h.group is None)
    else:
        out["sub"] = sh.error_of(lambda: ShardedSeries("x", sub, 0))
    return out


def _world_worker(rank: int, world: int) -> dict[str, object]:
    full = sh.new_handle(list(range(world)))
    assert full is not None
    sweeps: dict[str, tuple[int, list[str]]] = {f"G={world}": _sweep(full)}
    if world == 4:  # two G=2 groups run their sweeps concurrently
        pairs = [sh.new_handle([0, 1]), sh.new_handle([2, 3])]  # every rank makes both
        pair = pairs[rank // 2]
        assert pair is not None
        sweeps[f"G=2 pair {rank // 2}"] = _sweep(pair)
    sub = sh.new_handle([0, 1])
    one = GroupHandle(None, (rank,), 0)
    return {
        "sweeps": sweeps,
        "single": _check_case(one, 3, 4, 1, torch.float32, sync=False),
        "two_series": _two_series_at_once(full, sub),
        "misuse": _misuse(full),
        "plain": _plain_groups(rank, world),
    }


def _check_world(world: int) -> None:
    results = run_local(_world_worker, world, timeout_s=240, group_timeout_s=60)
    for rank, res in enumerate(results):
        sh.assert_sweeps_passed(res["sweeps"], rank, 9)
        assert not res["single"], res["single"]
        assert not res["two_series"], res["two_series"]
        m = res["misuse"]
        assert "layer 4 is already registered" in m["duplicate"]
        assert "outside this stage's layers 3..6" in m["mtp"] and "draft/MTP" in m["mtp"]
        assert "consecutive" in m["gap"] and "[5]" in m["gap"]
        for key in ("k_init", "k_finalize"):
            assert "prefetch_step k=3 must satisfy 0 <= k <= L-2 = 2" in m[key], m[key]
        assert "prefetch_step=-1" in m["k_neg"]
        assert "wait before finalize()" in m["wait_early"]
        assert "must pass the real tensor" in m["owner_meta"]
        assert "wait(layer 6) but ring slot 0 holds layer 5" in m["out_of_order"]
        assert "expects wait(layer 5) first" in m["double_prefetch"]
        assert "wait(layer 6) before prefetch(layer 6)" in m["wait_before_prefetch"]
        assert m["recovered"] == "True"
        assert "disagree" in m["plan"] and "rank 1: start=1" in m["plan"]
        plain = res["plain"]
        assert not plain["none"] and not plain["world"], (plain["none"], plain["world"])
        assert plain["handle"] == [(tuple(range(world)), rank)] * 2
        if rank == 0:
            assert "global rank 0 is not a member" in plain["sub"], plain["sub"]
        else:
            assert not plain["sub"], plain["sub"]
            assert plain["sub_handle"] == (tuple(range(1, world)), rank - 1, world == 2)


def test_series_two_ranks() -> None:
    _check_world(2)


def test_series_three_ranks() -> None:
    _check_world(3)


def test_series_four_ranks_with_concurrent_subgroups() -> None:
    _check_world(4)


def test_prefetch_skipped_on_one_rank_fails_within_group_timeout() -> None:
    o_proj = partial(_make, name="o_proj", start=59, L=5, k=2, dtype=torch.float32)
    sh.check_skipped_prefetch_fails_fast(o_proj)


def test_prefetch_target_wraps_within_the_stage() -> None:
    # start=3, L=4: the original (i + k) % L + start fetched layer 6 again at i=6, k=1
    assert [prefetch_target(i, 3, 4, 1) for i in range(3, 7)] == [4, 5, 6, 3]
    assert (6 + 1) % 4 + 3 == 6
    assert [prefetch_target(i, 59, 5, 2) for i in range(59, 64)] == [61, 62, 63, 59, 60]
    for start in sh.STARTS:
        for L in range(2, 10):
            for k in range(L - 1):
                got = [prefetch_target(i, start, L, k) for i in range(start, start + L)]
                assert sorted(got) == list(range(start, start + L))
                assert all(t != i for t, i in zip(got, range(start, start + L), strict=True)
                           if k > 0)


def test_local_errors_need_no_process_group() -> None:
    alone = ShardedSeries("x", None, 0)  # no torch.distributed: the world is this process
    assert (alone.group.ranks, alone.group.rank, alone.group.group) == ((0,), 0, None)
    assert _check_case(None, 5, 3, 1, torch.float32, sync=False) == []
    with pytest.raises(TypeError, match="expected a GroupHandle, a torch.distributed"):
        ShardedSeries("x", "world", 0)  # type: ignore[arg-type]
    one = GroupHandle(None, (0,), 0)
    with pytest.raises(ValueError, match="k=1 must satisfy 0 <= k <= L-2 = 0"):
        ShardedSeries("x", one, 1, layers=range(5, 7))
    with pytest.raises(ValueError, match="non-empty range"):
        ShardedSeries("x", one, 0, layers=range(5, 5))
    s = ShardedSeries("x", one, 0)
    with pytest.raises(RuntimeError, match="prefetch before finalize"):
        s.prefetch(0)
    with pytest.raises(RuntimeError, match="stats before finalize"):
        s.stats()
