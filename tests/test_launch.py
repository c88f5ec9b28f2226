"""run_local turns errors and hangs on spawned ranks into prompt, readable failures."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from flashcomm.launch import RankFailure, run_local


def _echo(rank: int, world: int, tag: str) -> tuple[int, int, str]:
    return rank, world, tag


def _rank1_raises(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("bad knob on rank 1")
    dist.barrier()  # rank 0 would wait forever without the group timeout


def _rank1_skips_collective(rank: int, world: int) -> None:
    if rank == 0:
        dist.all_reduce(torch.ones(1))
    else:
        time.sleep(60)


def test_results_come_back_in_rank_order() -> None:
    assert run_local(_echo, 3, "x", timeout_s=60) == [(0, 3, "x"), (1, 3, "x"), (2, 3, "x")]


def test_a_raising_rank_fails_with_its_traceback_and_no_hang() -> None:
    t0 = time.monotonic()
    with pytest.raises(RankFailure, match=r"(?s)rank 1.*bad knob on rank 1"):
        run_local(_rank1_raises, 2, timeout_s=60, group_timeout_s=5)
    assert time.monotonic() - t0 < 45


def test_a_diverging_rank_fails_within_the_timeout() -> None:
    t0 = time.monotonic()
    with pytest.raises(RankFailure):
        run_local(_rank1_skips_collective, 2, timeout_s=15, group_timeout_s=5)
    assert time.monotonic() - t0 < 40
