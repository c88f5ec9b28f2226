"""Helpers the ShardedSeries and GatheredSeries tests share: bit-exact comparison, groups made
collectively, error capture, the finalize hook that records post_process inputs, the (L, start,
k) sweep and the skipped-prefetch-on-one-rank check."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from flashcomm.groups import GroupHandle
from flashcomm.launch import RankFailure, run_local

STARTS = (0, 3, 59)
"""First layer indices every sweep covers: 0, a small offset, a PP stage deep in the model."""


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bit pattern (so -0.0 != 0.0 and NaNs compare by payload)."""
    view = torch.int16 if a.element_size() == 2 else torch.int32
    return (a.shape == b.shape and a.dtype == b.dtype
            and torch.equal(a.contiguous().view(view), b.contiguous().view(view)))


def new_handle(ranks: list[int]) -> GroupHandle | None:
    """Collective over the world: every rank creates the group, members get a handle."""
    pg = dist.new_group(ranks, timeout=timedelta(seconds=30)) if len(ranks) > 1 else None
    me = dist.get_rank()
    return GroupHandle(pg, tuple(ranks), ranks.index(me)) if me in ranks else None


def error_of(fn: Callable[[], object]) -> str:
    """'ValueError: ...' or 'RuntimeError: ...' that fn() raises, else 'no error'."""
    try:
        fn()
    except (ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def finalize_recording(series, post: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """series.finalize(post), returning a copy of every tensor post_process was given."""
    seen: list[torch.Tensor] = []

    def recording(w: torch.Tensor) -> torch.Tensor:
        seen.append(w.clone())
        return post(w)

    series.finalize(recording)
    return seen


def sweep(max_layers: int, check: Callable[..., list[str]], *args: object
          ) -> tuple[int, list[str]]:
    """check(*args, start, L, k, dtype, sync) for every L in 2..max_layers, start in STARTS and
    k in 0..L-2, bf16/fp32 and sync/async mixed over the cases; (cases run, their failures)."""
    count, bad = 0, []
    for L in range(2, max_layers + 1):
        for start in STARTS:
            for k in range(L - 1):
                dtype = torch.bfloat16 if (L + k) % 3 == 0 else torch.float32
                bad += check(*args, start, L, k, dtype, (L + start + k) % 4 == 0)
                count += 1
    return count, bad


def assert_sweeps_passed(sweeps: dict[str, tuple[int, list[str]]], rank: int,
                         max_layers: int) -> None:
    """Every sweep(max_layers, ...) of `rank`, by name, ran all its cases and none failed."""
    for name, (count, bad) in sweeps.items():
        assert count == sum(L - 1 for L in range(2, max_layers + 1)) * len(STARTS), name
        assert not bad, f"rank {rank} {name}: {bad[:5]}"


def _skip_prefetch_on_rank0(rank: int, world: int, make: Callable[[GroupHandle], tuple]) -> None:
    """Two passes over layers 59..63 of make(world group)[0]; rank 0 skips prefetch(61)."""
    s = make(GroupHandle(dist.group.WORLD, tuple(range(world)), rank))[0]
    for p in range(2):
        for i in range(59, 64):
            if not (rank == 0 and p == 1 and i == 61):
                s.prefetch(i)
            s.wait(i)


def check_skipped_prefetch_fails_fast(make: Callable[[GroupHandle], tuple]) -> None:
    """A prefetch skipped on one of 2 ranks fails that rank at its wait, and the group within
    its timeout. `make(handle)` (picklable) gives (finalized series over layers 59..63, _)."""
    t0 = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_local(_skip_prefetch_on_rank0, 2, make, timeout_s=60, group_timeout_s=3)
    assert time.monotonic() - t0 < 30
    assert "wait(layer 61) before prefetch(layer 61)" in str(info.value)
