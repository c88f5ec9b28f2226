"""Run a function on N local ranks (gloo on CPU, NCCL on CUDA) or under torchrun.

`run_local` is the one place that spawns processes: tests, benchmarks and the engine all use it,
so every spawned group gets the same bounded wait, the same error propagation and the same
process-group timeout.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_GROUP_TIMEOUT_S = 60.0


class RankFailure(RuntimeError):
    """A spawned rank raised, timed out or died; the message carries each rank's story."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    """NCCL when CUDA is available, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(
    rank: int,
    world: int,
    backend: str | None = None,
    group_timeout_s: float = DEFAULT_GROUP_TIMEOUT_S,
    init_method: str | None = None,
) -> torch.device:
    """Initialise the default group (env:// unless `init_method` is given); return the device."""
    backend = backend or default_backend()
    device = torch.device("cpu")
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=group_timeout_s),
        init_method=init_method,
        device_id=device if backend == "nccl" else None,
    )
    return device


def _worker(
    rank: int,
    world: int,
    init_method: str,
    backend: str,
    group_timeout_s: float,
    threads: int,
    results: Any,
    fn: Callable[..., Any],
    args: tuple,
) -> None:
    torch.set_num_threads(threads)
    phase = "init"
    try:
        init_distributed(rank, world, backend, group_timeout_s, init_method)
        phase = "run"
        out = fn(rank, world, *args)
        results.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - the parent reports it with the rank attached
        results.put((rank, phase, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a failed peer may already be gone
                pass


# glibc serves tensors above its mmap threshold (at most 32 MiB by default) with fresh mmaps and
# returns them on free, so every large temporary (all-to-all receive buffers, all-gather
# outputs, padded copies) page-faults again on each call: measured 41 ms to allocate and fill a
# [8192, 2048] fp32 tensor against 6.6 ms to copy into a warm one. That penalised the composed
# collectives against gloo's in-place all_reduce. Keeping freed memory in the heap (what CUDA's
# caching allocator does on GPUs) removes the artifact; a user's own setting is kept.
CPU_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 35), "MALLOC_TRIM_THRESHOLD_": str(1 << 35)}


@contextlib.contextmanager
def _cpu_malloc_env(backend: str) -> Iterator[None]:
    """Spawned CPU ranks inherit CPU_MALLOC_ENV (glibc reads it at process start)."""
    added = {k: v for k, v in CPU_MALLOC_ENV.items() if k not in os.environ}
    if backend != "gloo":
        added = {}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def run_local(
    fn: Callable[..., Any],
    nproc: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 300.0,
    group_timeout_s: float = DEFAULT_GROUP_TIMEOUT_S,
    threads_per_rank: int | None = None,
    init_retries: int = 2,
) -> list[Any]:
    """Call `fn(rank, world, *args)` on `nproc` spawned ranks and return their results by rank.

    `fn` must be importable (module level) and its result picklable. Raises RankFailure if any
    rank raises, or if the ranks do not all finish within `timeout_s` (the survivors are killed,
    so a hang becomes an error). A group whose rendezvous itself failed (gloo's full-mesh connect
    can time out on an overloaded machine) is started again, up to `init_retries` times."""
    if nproc < 1:
        raise ValueError(f"nproc={nproc}: must be >= 1")
    for attempt in range(init_retries + 1):
        try:
            return _run_once(fn, nproc, args, backend, timeout_s, group_timeout_s,
                             threads_per_rank)
        except _InitFailure as e:
            if attempt == init_retries:
                raise RankFailure(str(e)) from None
    raise AssertionError("unreachable")


class _InitFailure(RankFailure):
    """Process-group initialisation failed on some rank; nothing of `fn` ran there."""


def _run_once(
    fn: Callable[..., Any],
    nproc: int,
    args: tuple,
    backend: str,
    timeout_s: float,
    group_timeout_s: float,
    threads_per_rank: int | None,
) -> list[Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    # a file rendezvous cannot race with other process groups for a TCP port
    store_dir = tempfile.mkdtemp(prefix="flashcomm-store-")
    init_method = f"file://{os.path.join(store_dir, 'store')}"
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // nproc)
    procs = [
        ctx.Process(
            target=_worker,
            args=(r, nproc, init_method, backend, group_timeout_s, threads, results, fn, args),
            daemon=True,
        )
        for r in range(nproc)
    ]
    with _cpu_malloc_env(backend):
        for p in procs:
            p.start()
    outputs: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    error_deadline = 0.0
    init_failed = False
    try:
        while len(outputs) + len(errors) < nproc:
            if errors and not error_deadline:
                # peers of a failed rank may block until their own group timeout
                error_deadline = time.monotonic() + group_timeout_s + 5.0
            remaining = min(deadline, error_deadline or deadline) - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, phase, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if not p.is_alive() and p.exitcode not in (0, None)
                        and r not in outputs and r not in errors]
                for r in dead:
                    errors[r] = f"process exited with code {procs[r].exitcode}"
                continue
            if phase == "ok":
                outputs[rank] = value
            else:
                errors[rank] = value
                init_failed |= phase == "init"
    finally:
        for p in procs:
            p.join(timeout=5.0 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(store_dir, ignore_errors=True)
    missing = [r for r in range(nproc) if r not in outputs and r not in errors]
    if errors or missing:
        story = [f"--- rank {r} ---\n{errors[r]}" for r in sorted(errors)]
        if missing:
            story.append(f"ranks {missing} did not finish within {timeout_s:.0f}s (killed)")
        error = _InitFailure if init_failed else RankFailure
        raise error(f"{len(errors)} of {nproc} ranks failed\n" + "\n".join(story))
    return [outputs[r] for r in range(nproc)]
